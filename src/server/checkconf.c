#include "config.h"

#include "server/checkconf.h"

#include <errno.h>
#include <libgen.h>
#include <netdb.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"
#include "hsm/hsm.h"
#include "keystore/keystore.h"
#include "server/ops.h"
#include "server/policy.h"
#include "server/settings.h"
#include "server/tls.h"
#include "store/store.h"

#define KEYS_MAX 256

struct check {
    const char *path;
    unsigned problems;
    /* The line each key was set on, so that a problem found later names it. */
    struct {
        char key[64];
        unsigned line;
    } keys[KEYS_MAX];
    size_t nkeys;
};

static unsigned line_of(const struct check *ck, const char *key)
{
    for (size_t i = 0; key && i < ck->nkeys; i++)
        if (strcmp(ck->keys[i].key, key) == 0)
            return ck->keys[i].line;
    return 0;
}

static void say(const struct check *ck, unsigned line, const char *kind, const char *message)
{
    if (line)
        fprintf(stderr, "%s:%u: %s%s\n", ck->path, line, kind, message);
    else
        fprintf(stderr, "%s: %s%s\n", ck->path, kind, message);
}

static void problem_at(struct check *ck, unsigned line, const char *message)
{
    ck->problems++;
    say(ck, line, "", message);
}

/* A problem with the setting key (on its line when the file sets it). */
static void problem(struct check *ck, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void problem(struct check *ck, const char *key, const char *fmt, ...)
{
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    problem_at(ck, line_of(ck, key), message);
}

/* Something that works as it is but is likely not meant: said, not counted. */
static void warning(struct check *ck, unsigned line, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void warning(struct check *ck, unsigned line, const char *fmt, ...)
{
    char message[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    say(ck, line, "warning: ", message);
}

/* The parser's and the settings check's reports. */
static void on_report(void *arg, unsigned line, const char *key, const char *message)
{
    struct check *ck = arg;
    if (message) {
        problem_at(ck, line ? line : line_of(ck, key), message);
        return;
    }
    unsigned before = line_of(ck, key);
    if (before) {
        warning(ck, line, "%s is set again (line %u set it too); this line's value is used", key,
                before);
        for (size_t i = 0; i < ck->nkeys; i++)
            if (strcmp(ck->keys[i].key, key) == 0)
                ck->keys[i].line = line;
        return;
    }
    if (ck->nkeys < KEYS_MAX && strlen(key) < sizeof ck->keys[0].key) {
        snprintf(ck->keys[ck->nkeys].key, sizeof ck->keys[0].key, "%s", key);
        ck->keys[ck->nkeys++].line = line;
    }
}

/* The configuration file itself: who may change it, and who may read a password in it. */
static void check_own_mode(struct check *ck, const struct kms_config *c, mode_t mode)
{
    if (mode & S_IWOTH)
        problem(ck, NULL, "others may change this file (mode %03o): chmod o-w it",
                (unsigned)(mode & 0777));
    if (kms_config_mode_check(c, ck->path, (unsigned)mode) != KMS_OK)
        problem(ck, "database", "%s", kms_err_message());
}

/* A file the server writes (audit_log, log_file): there, or makeable, and writable. */
static void check_writable(struct check *ck, const char *key, const char *path)
{
    struct stat st;
    if (stat(path, &st) == 0) {
        if (!S_ISREG(st.st_mode))
            problem(ck, key, "%s %s is not a regular file", key, path);
        else if (access(path, W_OK) != 0)
            problem(ck, key, "%s %s cannot be written: %s", key, path, strerror(errno));
        return;
    }
    if (errno != ENOENT) {
        problem(ck, key, "%s %s: %s", key, path, strerror(errno));
        return;
    }
    char *copy = strdup(path);
    if (!copy) {
        problem(ck, key, "out of memory");
        return;
    }
    const char *dir = dirname(copy);
    if (access(dir, W_OK | X_OK) != 0)
        problem(ck, key, "%s %s cannot be made in %s: %s", key, path, dir, strerror(errno));
    free(copy);
}

static void check_files(struct check *ck, const struct kms_config *c)
{
    if (c->credentials_file) {
        struct kms_credentials creds = {0};
        if (kms_credentials_load(c->credentials_file, &creds) != KMS_OK)
            problem(ck, "credentials_file", "%s", kms_err_message());
        kms_credentials_free(&creds);
    }
    uint8_t digest[KMS_SHA256_LEN];
    if (c->metrics_token_file && kms_read_metrics_token(c->metrics_token_file, digest) != KMS_OK)
        problem(ck, "metrics_token_file", "%s", kms_err_message());
    if (c->alias_policy_file && c->account) {
        struct kms_policy *policy = NULL;
        if (kms_alias_policy_load(c->alias_policy_file, c->account, &policy) != KMS_OK)
            problem(ck, "alias_policy_file", "%s", kms_err_message());
        kms_policy_free(policy);
    }
    if (c->tls_cert_file && c->tls_key_file) {
        struct kms_tls *tls = NULL;
        if (kms_tls_load(c, &tls) != KMS_OK)
            problem(ck, "tls_cert_file", "%s", kms_err_message());
        kms_tls_free(tls);
    }
    if (c->audit_log)
        check_writable(ck, "audit_log", c->audit_log);
    if (c->log_file)
        check_writable(ck, "log_file", c->log_file);
}

/* The address can be served: it resolves, and it can be bound now (not kept). */
static void check_listen(struct check *ck, const struct kms_config *c)
{
    char host[256], port[8];
    unsigned p;
    struct addrinfo hints = {0}, *ai = NULL;
    if (!c->listen || kms_parse_listen(c->listen, host, sizeof host, &p) != KMS_OK)
        return; /* said already */
    snprintf(port, sizeof port, "%u", p);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    int e = getaddrinfo(host, port, &hints, &ai);
    if (e != 0 || !ai) {
        problem(ck, "listen", "listen %s: cannot resolve %s: %s", c->listen, host,
                e ? gai_strerror(e) : "no address");
        return;
    }
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    int on = 1;
    if (fd < 0) {
        problem(ck, "listen", "listen %s: %s", c->listen, strerror(errno));
    } else {
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) != 0) {
            if (errno == EADDRINUSE)
                warning(ck, line_of(ck, "listen"),
                        "listen %s is in use now (by a running p11kmsd?): a server started "
                        "while it is would not start",
                        c->listen);
            else
                problem(ck, "listen", "listen %s cannot be bound: %s", c->listen, strerror(errno));
        }
        close(fd);
    }
    freeaddrinfo(ai);
}

/* Locked memory as the server asks for it; released again at once. */
static void check_memory(struct check *ck, const struct kms_config *c)
{
    if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0) {
        munlockall();
        return;
    }
    if (c->require_locked_memory)
        problem(ck, "require_locked_memory",
                "memory cannot be locked (%s) and require_locked_memory is set: raise "
                "RLIMIT_MEMLOCK (systemd LimitMEMLOCK=infinity) or grant CAP_IPC_LOCK",
                strerror(errno));
    else
        warning(ck, 0, "memory cannot be locked here (%s): secrets may be swapped out",
                strerror(errno));
}

/* The token (log-in with the PIN), the database as it is, and the root keys between them. */
static void check_token_and_database(struct check *ck, const struct kms_config *c)
{
    struct kms_hsm *hsm = NULL;
    struct kms_store *store = NULL;
    char *pin = NULL;
    size_t pin_len = 0;

    if (c->module && c->token) {
        if (kms_read_pin(c, 0, &pin, &pin_len) != KMS_OK) {
            problem(ck, "pin_file", "%s", kms_err_message());
        } else {
            struct kms_hsm_config hc = {c->module, c->token, pin, 1, c->session_timeout_ms};
            if (kms_hsm_open(&hc, &hsm) != KMS_OK) {
                problem(ck, c->token ? "token" : "module", "%s", kms_err_message());
                hsm = NULL;
            }
            kms_free_secret(pin, pin_len + 1);
        }
    }
    if (c->database) {
        struct kms_store_config sc = kms_config_store(c, KMS_STORE_OPEN);
        if (kms_store_open(&sc, &store) != KMS_OK) {
            problem(ck, "database", "%s", kms_err_message());
            store = NULL;
        }
    }
    if (hsm && store && kms_keystore_check_roots(hsm, store) != KMS_OK)
        problem(ck, "database", "%s", kms_err_message());
    kms_store_close(store);
    kms_hsm_close(hsm);
}

int kms_check_config(const char *path)
{
    struct check *ck = calloc(1, sizeof *ck);
    struct kms_config cfg;
    char *text = NULL;
    size_t len = 0;
    struct stat st;

    if (!ck) {
        fprintf(stderr, "p11kmsd: out of memory\n");
        return 1;
    }
    ck->path = path;
    kms_config_defaults(&cfg);
    if (kms_read_file(path, &text, &len) != KMS_OK || stat(path, &st) != 0) {
        problem(ck, NULL, "%s", kms_err_message());
    } else if (strlen(text) != len) {
        problem(ck, NULL, "the file contains a NUL byte");
    } else {
        if (kms_config_parse_each(&cfg, text, on_report, ck) != KMS_OK)
            kms_err_clear(); /* each line said already */
        check_own_mode(ck, &cfg, st.st_mode);
        if (kms_config_check_each(&cfg, on_report, ck) != KMS_OK)
            kms_err_clear();
        check_files(ck, &cfg);
        check_listen(ck, &cfg);
        check_memory(ck, &cfg);
        check_token_and_database(ck, &cfg);
    }
    if (text)
        kms_free_secret(text, len + 1); /* it may hold the database's password */
    kms_config_free(&cfg);
    int status = ck->problems ? 1 : 0;
    if (status)
        fprintf(stderr, "p11kmsd: %s: %u problem%s\n", path, ck->problems,
                ck->problems == 1 ? "" : "s");
    else
        printf("p11kmsd: %s: configuration is valid\n", path);
    free(ck);
    return status;
}
