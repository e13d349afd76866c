#include "config.h"

#include "server/settings.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/log.h"
#include "server/breaker.h"

#define MAX_FILE (1u << 20)

void kms_config_defaults(struct kms_config *c)
{
    memset(c, 0, sizeof *c);
    c->threads = 4;
    c->inline_requests = KMS_INLINE_DEFAULT;
    c->session_timeout_ms = 2000;
    c->queue_max = 256;
    c->request_timeout_ms = 5000;
    c->keygen_timeout_ms = 60000;
    c->max_connections = 4096;
    c->per_ip_connections = 256;
    c->auth_failures_per_minute = 60;
    c->auth_failure_burst = 20;
    c->auth_failure_cooldown_s = 30;
    c->auth_failure_audit_interval_s = 60;
    c->connection_timeout_s = 30;
    c->max_header = 16 * 1024;
    c->drain_timeout_ms = 10000;
    c->database_timeout_ms = 5000;
    c->database_pool = KMS_STORE_POOL_DEFAULT;
    c->tls_min_version = 13;
    c->tls_client_cert = -1; /* unset: require with tls_client_ca_file, else none */
    c->max_body = 64 * 1024;
    c->breaker_failures = KMS_BREAKER_DEFAULT_FAILURES;
    c->breaker_window_s = KMS_BREAKER_DEFAULT_WINDOW_S;
    c->breaker_cooldown_s = KMS_BREAKER_DEFAULT_COOLDOWN_S;
    kms_keystore_config_defaults(&c->keys);
    kms_ratelimit_config_defaults(&c->limits);
}

void kms_config_free(struct kms_config *c)
{
    free(c->module);
    free(c->token);
    free(c->pin_file);
    free(c->database);
    free(c->credentials_file);
    free(c->listen);
    free(c->region);
    free(c->account);
    kms_ratelimit_config_free(&c->limits);
    free(c->tls_cert_file);
    free(c->tls_key_file);
    free(c->tls_client_ca_file);
    free(c->audit_log);
    free(c->log_file);
    free(c->alias_policy_file);
    free(c->metrics_token_file);
    free(c->audit_node);
    for (size_t i = 0; i < c->nbindings; i++)
        free(c->bindings[i].principal);
    for (size_t i = 0; i < c->nadmins; i++)
        free(c->admins[i]);
    free(c->admins);
    free(c->bindings);
    memset(c, 0, sizeof *c);
}

static kms_err set_string(char **field, const char *value)
{
    char *copy = strdup(value);
    KMS_ENSURE(copy != NULL, KMS_ERR_INTERNAL, "out of memory");
    free(*field);
    *field = copy;
    return KMS_OK;
}

static kms_err set_unsigned(unsigned long *out, const char *key, const char *value,
                            unsigned long min, unsigned long max)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(value, &end, 10);
    KMS_ENSURE(*value && !*end && errno == 0 && isdigit((unsigned char)*value) && v >= min &&
                   v <= max,
               KMS_ERR_VALIDATION, "%s must be a number from %lu to %lu", key, min, max);
    *out = v;
    return KMS_OK;
}

static kms_err set_bool(int *out, const char *key, const char *value)
{
    if (strcmp(value, "true") == 0 || strcmp(value, "yes") == 0)
        *out = 1;
    else if (strcmp(value, "false") == 0 || strcmp(value, "no") == 0)
        *out = 0;
    else
        return KMS_FAIL(KMS_ERR_VALIDATION, "%s must be true or false", key);
    return KMS_OK;
}

/* admin_principals = name, name, ... (replaces an earlier list). */
static kms_err set_admins(struct kms_config *c, const char *value)
{
    for (size_t i = 0; i < c->nadmins; i++)
        free(c->admins[i]);
    c->nadmins = 0;
    for (const char *p = value; *p;) {
        p += strspn(p, " ,");
        size_t n = strcspn(p, " ,");
        if (n == 0)
            break;
        KMS_ENSURE(n <= KMS_PRINCIPAL_MAX && strspn(p, KMS_PRINCIPAL_CHARS) >= n,
                   KMS_ERR_VALIDATION, "admin_principals: '%.*s' is not a principal name",
                   (int)(n > 64 ? 64 : n), p);
        char **a = realloc(c->admins, (c->nadmins + 1) * sizeof *a);
        KMS_ENSURE(a != NULL, KMS_ERR_INTERNAL, "out of memory");
        c->admins = a;
        a[c->nadmins] = strndup(p, n);
        KMS_ENSURE(a[c->nadmins] != NULL, KMS_ERR_INTERNAL, "out of memory");
        c->nadmins++;
        p += n;
    }
    return KMS_OK;
}

/* client_cert.<principal> = the hex SHA-256 of the certificate (colons allowed). */
static kms_err set_binding(struct kms_config *c, const char *principal, const char *value)
{
    char fp[65];
    size_t n = 0;
    KMS_ENSURE(*principal && strlen(principal) <= KMS_PRINCIPAL_MAX &&
                   strspn(principal, KMS_PRINCIPAL_CHARS) == strlen(principal),
               KMS_ERR_VALIDATION, "client_cert.<principal>: not a principal name");
    for (const char *p = value; *p; p++) {
        if (*p == ':')
            continue;
        KMS_ENSURE(isxdigit((unsigned char)*p) && n < 64, KMS_ERR_VALIDATION,
                   "client_cert.%s must be a SHA-256 fingerprint (64 hex digits)", principal);
        fp[n++] = (char)tolower((unsigned char)*p);
    }
    KMS_ENSURE(n == 64, KMS_ERR_VALIDATION,
               "client_cert.%s must be a SHA-256 fingerprint (64 hex digits)", principal);
    fp[64] = '\0';
    struct kms_cert_binding *b = realloc(c->bindings, (c->nbindings + 1) * sizeof *b);
    KMS_ENSURE(b != NULL, KMS_ERR_INTERNAL, "out of memory");
    c->bindings = b;
    b[c->nbindings].principal = strdup(principal);
    KMS_ENSURE(b[c->nbindings].principal != NULL, KMS_ERR_INTERNAL, "out of memory");
    memcpy(b[c->nbindings].fingerprint, fp, sizeof fp);
    c->nbindings++;
    return KMS_OK;
}

struct kms_store_config kms_config_store(const struct kms_config *c, int mode)
{
    return (struct kms_store_config){
        .url = c->database,
        .timeout_ms = c->database_timeout_ms,
        .mode = mode,
        .pool_size = c->database_pool,
        .connect_timeout_ms = c->database_connect_timeout_ms,
    };
}

kms_err kms_config_set(struct kms_config *c, const char *key, const char *value)
{
    unsigned long v;
    if (strcmp(key, "module") == 0)
        return set_string(&c->module, value);
    if (strcmp(key, "token") == 0)
        return set_string(&c->token, value);
    if (strcmp(key, "pin_file") == 0)
        return set_string(&c->pin_file, value);
    if (strcmp(key, "credentials_file") == 0)
        return set_string(&c->credentials_file, value);
    if (strcmp(key, "database") == 0) {
        int sqlite = strncmp(value, "sqlite:", 7) == 0 && value[7];
        int postgresql =
            strncmp(value, "postgresql://", 13) == 0 || strncmp(value, "postgres://", 11) == 0;
        KMS_ENSURE(sqlite || postgresql, KMS_ERR_VALIDATION,
                   "database must be sqlite:PATH or postgresql://USER@HOST:PORT/NAME");
        return set_string(&c->database, value);
    }
    if (strcmp(key, "listen") == 0) {
        char host[256];
        unsigned port;
        KMS_GUARD(kms_parse_listen(value, host, sizeof host, &port));
        return set_string(&c->listen, value);
    }
    if (strcmp(key, "region") == 0) {
        for (const char *p = value; *p; p++)
            KMS_ENSURE(islower((unsigned char)*p) || isdigit((unsigned char)*p) || *p == '-',
                       KMS_ERR_VALIDATION, "region must be lower-case letters, digits and '-'");
        KMS_ENSURE(*value && strlen(value) < 32, KMS_ERR_VALIDATION,
                   "region must be 1-31 characters");
        return set_string(&c->region, value);
    }
    if (strcmp(key, "account") == 0) {
        KMS_ENSURE(strlen(value) == 12 && strspn(value, "0123456789") == 12, KMS_ERR_VALIDATION,
                   "account must be 12 digits");
        return set_string(&c->account, value);
    }
    static const struct {
        const char *name;
        size_t offset;
        unsigned long min, max;
    } server_numbers[] = {
        {"threads", offsetof(struct kms_config, threads), 1, 256},
        {"workers", offsetof(struct kms_config, workers), 1, 1024},
        {"inline_requests", offsetof(struct kms_config, inline_requests), 0, 255},
        {"sessions", offsetof(struct kms_config, sessions), 1, 1024},
        {"session_timeout_ms", offsetof(struct kms_config, session_timeout_ms), 1, 600000},
        {"queue_max", offsetof(struct kms_config, queue_max), 1, 65536},
        {"request_timeout_ms", offsetof(struct kms_config, request_timeout_ms), 10, 600000},
        {"keygen_timeout_ms", offsetof(struct kms_config, keygen_timeout_ms), 10, 600000},
        {"max_connections", offsetof(struct kms_config, max_connections), 16, 1000000},
        {"per_ip_connections", offsetof(struct kms_config, per_ip_connections), 0, 1000000},
        {"auth_failures_per_minute", offsetof(struct kms_config, auth_failures_per_minute), 0,
         6000000},
        {"auth_failure_burst", offsetof(struct kms_config, auth_failure_burst), 1, 1000000},
        {"auth_failure_cooldown_s", offsetof(struct kms_config, auth_failure_cooldown_s), 1, 86400},
        {"auth_failure_audit_interval_s",
         offsetof(struct kms_config, auth_failure_audit_interval_s), 0, 86400},
        {"connection_timeout_s", offsetof(struct kms_config, connection_timeout_s), 1, 3600},
        {"max_header", offsetof(struct kms_config, max_header), 4096, 1u << 20},
        {"drain_timeout_ms", offsetof(struct kms_config, drain_timeout_ms), 0, 600000},
        {"database_timeout_ms", offsetof(struct kms_config, database_timeout_ms), 1, 600000},
        {"database_pool", offsetof(struct kms_config, database_pool), 1, KMS_STORE_POOL_MAX},
        {"database_connect_timeout_ms", offsetof(struct kms_config, database_connect_timeout_ms), 1,
         600000},
        {"decrypt_breaker_failures", offsetof(struct kms_config, breaker_failures), 0, 1000000},
        {"decrypt_breaker_window_s", offsetof(struct kms_config, breaker_window_s), 1, 86400},
        {"decrypt_breaker_cooldown_s", offsetof(struct kms_config, breaker_cooldown_s), 1, 86400},
    };
    for (size_t i = 0; i < sizeof server_numbers / sizeof server_numbers[0]; i++) {
        if (strcmp(key, server_numbers[i].name) == 0) {
            KMS_GUARD(set_unsigned(&v, key, value, server_numbers[i].min, server_numbers[i].max));
            *(unsigned *)((char *)c + server_numbers[i].offset) = (unsigned)v;
            return KMS_OK;
        }
    }
    if (kms_ratelimit_config_is_key(key))
        return kms_ratelimit_config_set(&c->limits, key, value);
    if (strcmp(key, "max_body") == 0) {
        KMS_GUARD(set_unsigned(&v, key, value, 1024, 16u << 20));
        c->max_body = v;
        return KMS_OK;
    }
    static const struct {
        const char *name;
        size_t offset;
        unsigned long min, max;
    } numbers[] = {
        {"day_seconds", offsetof(struct kms_keystore_config, day_seconds), 1, 86400},
        {"rotation_min_days", offsetof(struct kms_keystore_config, rotation_min_days), 1, 2560},
        {"rotation_max_days", offsetof(struct kms_keystore_config, rotation_max_days), 1, 2560},
        {"pending_min_days", offsetof(struct kms_keystore_config, pending_min_days), 0, 30},
        {"pending_max_days", offsetof(struct kms_keystore_config, pending_max_days), 0, 30},
        {"max_on_demand_rotations", offsetof(struct kms_keystore_config, max_on_demand), 0,
         1000000},
        {"refresh_ms", offsetof(struct kms_keystore_config, refresh_ms), 10, 60000},
        {"key_cache", offsetof(struct kms_keystore_config, key_cache), 1, 10000000},
        {"negative_cache", offsetof(struct kms_keystore_config, negative_cache), 64, 10000000},
    };
    for (size_t i = 0; i < sizeof numbers / sizeof numbers[0]; i++) {
        if (strcmp(key, numbers[i].name) == 0) {
            KMS_GUARD(set_unsigned(&v, key, value, numbers[i].min, numbers[i].max));
            *(unsigned *)((char *)&c->keys + numbers[i].offset) = (unsigned)v;
            return KMS_OK;
        }
    }
    if (strcmp(key, "usage_bound") == 0) {
        /* At most 2^32 wraps under one key with random 96-bit IVs (NIST SP 800-38D). */
        KMS_GUARD(set_unsigned(&v, key, value, 1, 4294967295ul));
        c->keys.usage_bound = v;
        return KMS_OK;
    }
    if (strcmp(key, "usage_block") == 0) {
        KMS_GUARD(set_unsigned(&v, key, value, 1, 1000000000ul));
        c->keys.usage_block = v;
        return KMS_OK;
    }
    if (strcmp(key, "tls_cert_file") == 0)
        return set_string(&c->tls_cert_file, value);
    if (strcmp(key, "tls_key_file") == 0)
        return set_string(&c->tls_key_file, value);
    if (strcmp(key, "tls_client_ca_file") == 0)
        return set_string(&c->tls_client_ca_file, value);
    if (strcmp(key, "tls_min_version") == 0) {
        KMS_ENSURE(strcmp(value, "1.3") == 0 || strcmp(value, "1.2") == 0, KMS_ERR_VALIDATION,
                   "tls_min_version must be 1.3 or 1.2");
        c->tls_min_version = strcmp(value, "1.3") == 0 ? 13 : 12;
        return KMS_OK;
    }
    if (strcmp(key, "tls_client_cert") == 0) {
        static const char *const modes[] = {"none", "request", "require"};
        for (int i = 0; i < 3; i++)
            if (strcmp(value, modes[i]) == 0) {
                c->tls_client_cert = i;
                return KMS_OK;
            }
        return KMS_FAIL(KMS_ERR_VALIDATION, "tls_client_cert must be none, request or require");
    }
    if (strcmp(key, "audit_log") == 0)
        return set_string(&c->audit_log, value);
    if (strcmp(key, "log_format") == 0) {
        KMS_ENSURE(strcmp(value, "text") == 0 || strcmp(value, "json") == 0, KMS_ERR_VALIDATION,
                   "log_format must be text or json");
        c->log_format = strcmp(value, "json") == 0 ? KMS_LOG_JSON : KMS_LOG_TEXT;
        return KMS_OK;
    }
    if (strcmp(key, "log_file") == 0)
        return set_string(&c->log_file, value);
    if (strcmp(key, "log_requests") == 0)
        return set_bool(&c->log_requests, key, value);
    if (strcmp(key, "audit_node") == 0) {
        KMS_ENSURE(*value && strlen(value) <= KMS_AUDIT_NODE_MAX, KMS_ERR_VALIDATION,
                   "audit_node must be 1 to %d characters", KMS_AUDIT_NODE_MAX);
        return set_string(&c->audit_node, value);
    }
    if (strcmp(key, "audit_checkpoint_lines") == 0) {
        KMS_GUARD(set_unsigned(&v, key, value, 1, 1000000));
        c->audit_checkpoint_lines = (unsigned)v;
        return KMS_OK;
    }
    if (strcmp(key, "audit_checkpoint_seconds") == 0) {
        KMS_GUARD(set_unsigned(&v, key, value, 1, 86400));
        c->audit_checkpoint_seconds = (unsigned)v;
        return KMS_OK;
    }
    if (strcmp(key, "metrics_token_file") == 0)
        return set_string(&c->metrics_token_file, value);
    if (strcmp(key, "metrics_key_ids") == 0)
        return set_bool(&c->metrics_key_ids, key, value);
    if (strcmp(key, "admin_principals") == 0)
        return set_admins(c, value);
    if (strcmp(key, "default_key_policy") == 0) {
        KMS_ENSURE(strcmp(value, "account") == 0 || strcmp(value, "creator") == 0,
                   KMS_ERR_VALIDATION, "default_key_policy must be account or creator");
        c->default_policy_creator = strcmp(value, "creator") == 0;
        return KMS_OK;
    }
    if (strcmp(key, "alias_policy_file") == 0)
        return set_string(&c->alias_policy_file, value);
    if (strcmp(key, "allow_plain_http") == 0)
        return set_bool(&c->allow_plain_http, key, value);
    if (strcmp(key, "require_locked_memory") == 0)
        return set_bool(&c->require_locked_memory, key, value);
    if (strncmp(key, "client_cert.", 12) == 0)
        return set_binding(c, key + 12, value);
    return KMS_FAIL(KMS_ERR_VALIDATION, "unknown setting '%.64s'", key);
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

kms_err kms_config_parse_each(struct kms_config *c, const char *text, kms_config_report report,
                              void *arg)
{
    char *copy = strdup(text), *line;
    size_t size = strlen(text) + 1;
    unsigned lineno = 0, bad = 0;
    kms_err rc = KMS_OK;

    KMS_ENSURE(copy != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (char *p = copy; (rc == KMS_OK || report) && p; p = line) {
        char *nl = strchr(p, '\n');
        line = nl ? nl + 1 : NULL;
        if (nl)
            *nl = '\0';
        lineno++;
        char *hash = strchr(p, '#');
        if (hash)
            *hash = '\0';
        char *s = trim(p);
        if (!*s)
            continue;
        char *eq = strchr(s, '=');
        char *key = s, *value = NULL;
        if (eq) {
            *eq = '\0';
            key = trim(s);
            value = trim(eq + 1);
        }
        if (!eq || !*key || !*value) {
            rc = KMS_FAIL(KMS_ERR_VALIDATION, "expected 'key = value'");
        } else {
            rc = kms_config_set(c, key, value);
            if (rc == KMS_OK && report)
                report(arg, lineno, key, NULL);
        }
        if (rc != KMS_OK) {
            bad++;
            char msg[256];
            snprintf(msg, sizeof msg, "%s", kms_err_message());
            if (report)
                report(arg, lineno, eq ? key : NULL, msg);
            rc = KMS_FAIL(rc, "line %u: %s", lineno, msg);
        }
    }
    kms_free_secret(copy, size); /* a database URL may hold a password */
    if (report && bad)
        return KMS_FAIL(KMS_ERR_VALIDATION, "%u lines are not valid", bad);
    return rc;
}

kms_err kms_config_parse(struct kms_config *c, const char *text)
{
    return kms_config_parse_each(c, text, NULL, NULL);
}

/* *mode (may be NULL) gets the file's permission bits. */
static kms_err read_file(const char *path, int secret, char **out, size_t *len, unsigned *mode)
{
    struct kms_buf b = KMS_BUF_INIT;
    struct stat st;
    kms_err rc = KMS_OK;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    KMS_ENSURE(fd >= 0, KMS_ERR_VALIDATION, "cannot open %s: %s", path, strerror(errno));
    if (fstat(fd, &st) != 0)
        rc = KMS_FAIL(KMS_ERR_VALIDATION, "cannot stat %s: %s", path, strerror(errno));
    else if (mode)
        *mode = (unsigned)(st.st_mode & 07777);
    if (rc == KMS_OK && !S_ISREG(st.st_mode))
        rc = KMS_FAIL(KMS_ERR_VALIDATION, "%s is not a regular file", path);
    else if (rc == KMS_OK && secret && (st.st_mode & (S_IRWXG | S_IRWXO)))
        rc =
            KMS_FAIL(KMS_ERR_VALIDATION,
                     "%s holds secrets but group or others may access it (mode %03o); chmod 600 it",
                     path, (unsigned)(st.st_mode & 0777));
    while (rc == KMS_OK) {
        rc = kms_buf_reserve(&b, 4096);
        if (rc != KMS_OK)
            break;
        ssize_t got = read(fd, b.data + b.len, 4096);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            rc = KMS_FAIL(KMS_ERR_VALIDATION, "cannot read %s: %s", path, strerror(errno));
        else if (got == 0)
            break;
        else if ((b.len += (size_t)got) > MAX_FILE)
            rc = KMS_FAIL(KMS_ERR_VALIDATION, "%s is too large", path);
    }
    close(fd);
    if (rc == KMS_OK)
        rc = kms_buf_terminate(&b);
    if (rc != KMS_OK) {
        kms_buf_free(&b);
        return rc;
    }
    /* Hand over the buffer; its capacity is at least len + 1. Shrink by copying. */
    char *copy = malloc(b.len + 1);
    if (!copy) {
        kms_buf_free(&b);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    memcpy(copy, b.data, b.len + 1);
    *len = b.len;
    *out = copy;
    kms_buf_free(&b);
    return KMS_OK;
}

kms_err kms_config_mode_check(const struct kms_config *c, const char *path, unsigned mode)
{
    /* The same rule as pin_file's and credentials_file's. */
    KMS_ENSURE(!c->database || !kms_store_url_has_secret(c->database) ||
                   !(mode & (S_IRWXG | S_IRWXO)),
               KMS_ERR_VALIDATION,
               "%s holds the database password but group or others may access it (mode %03o): "
               "chmod 600 it, or give the password through PGPASSFILE or PGPASSWORD",
               path, mode & 0777);
    return KMS_OK;
}

kms_err kms_config_load(struct kms_config *c, const char *path)
{
    char *text;
    size_t len;
    unsigned mode = 0;
    KMS_GUARD(read_file(path, 0, &text, &len, &mode));
    KMS_ENSURE(strlen(text) == len, KMS_ERR_VALIDATION, "%s contains a NUL byte", path);
    kms_err rc = kms_config_parse(c, text);
    kms_free_secret(text, len + 1); /* it may hold the database's password */
    KMS_GUARD(rc);
    return kms_config_mode_check(c, path, mode);
}

kms_err kms_read_file(const char *path, char **out, size_t *len)
{
    return read_file(path, 0, out, len, NULL);
}

/* Problems of kms_config_check_each: every one reported, or the first one kept. */
struct checks {
    kms_config_report report;
    void *arg;
    kms_err first;
};

static void problem(struct checks *k, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void problem(struct checks *k, const char *key, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    if (!k->report && k->first != KMS_OK)
        return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (k->report)
        k->report(k->arg, 0, key, msg);
    if (k->first == KMS_OK)
        k->first = KMS_FAIL(KMS_ERR_VALIDATION, "%s", msg);
}

static void require(struct checks *k, const void *value, const char *key, const char *example)
{
    if (!value)
        problem(k, NULL, "the configuration needs '%s'%s", key, example);
}

kms_err kms_config_check_each(const struct kms_config *c, kms_config_report report, void *arg)
{
    struct checks k = {report, arg, KMS_OK};
    require(&k, c->module, "module", "");
    require(&k, c->token, "token", "");
    require(&k, c->credentials_file, "credentials_file", "");
    require(&k, c->database, "database", " (sqlite:/path/to/p11kms.db)");
    require(&k, c->listen, "listen", "");
    require(&k, c->region, "region", "");
    require(&k, c->account, "account", "");
    if (c->inline_requests != KMS_INLINE_DEFAULT && c->inline_requests >= c->threads)
        problem(&k, "inline_requests",
                "inline_requests must be below threads: one HTTP thread always stays free of "
                "token calls");
    if (c->keys.rotation_min_days > c->keys.rotation_max_days)
        problem(&k, "rotation_min_days", "rotation_min_days is above rotation_max_days");
    if (c->keys.pending_min_days > c->keys.pending_max_days)
        problem(&k, "pending_min_days", "pending_min_days is above pending_max_days");
    if (!c->tls_cert_file != !c->tls_key_file)
        problem(&k, c->tls_cert_file ? "tls_cert_file" : "tls_key_file",
                "tls_cert_file and tls_key_file go together");
    if (!c->tls_cert_file && (c->tls_client_ca_file || c->nbindings))
        problem(&k, c->tls_client_ca_file ? "tls_client_ca_file" : NULL,
                "client certificates need TLS (tls_cert_file, tls_key_file)");
    if (c->nbindings && !c->tls_client_ca_file)
        problem(&k, NULL, "client_cert.<principal> needs tls_client_ca_file");
    if (c->tls_client_cert > KMS_CLIENT_CERT_NONE && !c->tls_client_ca_file)
        problem(&k, "tls_client_cert", "tls_client_cert needs tls_client_ca_file");
    char host[256];
    unsigned port;
    if (c->listen && kms_parse_listen(c->listen, host, sizeof host, &port) != KMS_OK)
        problem(&k, "listen", "%s", kms_err_message());
    else if (c->listen && !c->tls_cert_file && !c->allow_plain_http && !kms_host_is_loopback(host))
        problem(&k, "listen",
                "plain HTTP is served on loopback only: set tls_cert_file and tls_key_file, or "
                "allow_plain_http = true");
    return k.first;
}

kms_err kms_config_check(const struct kms_config *c)
{
    return kms_config_check_each(c, NULL, NULL);
}

int kms_host_is_loopback(const char *host)
{
    struct in_addr a4;
    struct in6_addr a6;
    if (strcmp(host, "localhost") == 0)
        return 1;
    if (inet_pton(AF_INET, host, &a4) == 1)
        return (ntohl(a4.s_addr) >> 24) == 127;
    if (inet_pton(AF_INET6, host, &a6) == 1)
        return IN6_IS_ADDR_LOOPBACK(&a6);
    return 0;
}

kms_err kms_parse_listen(const char *s, char *host, size_t host_len, unsigned *port)
{
    const char *colon, *h = s;
    size_t hl;
    if (*s == '[') {
        const char *close = strchr(s, ']');
        KMS_ENSURE(close && close[1] == ':', KMS_ERR_VALIDATION, "listen must be HOST:PORT");
        h = s + 1;
        hl = (size_t)(close - h);
        colon = close + 1;
    } else {
        colon = strrchr(s, ':');
        KMS_ENSURE(colon != NULL, KMS_ERR_VALIDATION, "listen must be HOST:PORT");
        hl = (size_t)(colon - s);
    }
    KMS_ENSURE(hl > 0 && hl < host_len, KMS_ERR_VALIDATION, "listen must be HOST:PORT");
    char *end;
    errno = 0;
    unsigned long p = strtoul(colon + 1, &end, 10);
    KMS_ENSURE(colon[1] && !*end && errno == 0 && p <= 65535 && isdigit((unsigned char)colon[1]),
               KMS_ERR_VALIDATION, "listen port must be 0-65535");
    memcpy(host, h, hl);
    host[hl] = '\0';
    *port = (unsigned)p;
    return KMS_OK;
}

kms_err kms_read_pin(const struct kms_config *cfg, int forget_env, char **pin, size_t *len)
{
    char *env = getenv("P11KMS_PIN");
    if (cfg->pin_file)
        return kms_read_secret_file(cfg->pin_file, pin, len);
    KMS_ENSURE(env != NULL, KMS_ERR_VALIDATION, "no PIN: set pin_file or P11KMS_PIN");
    *len = strlen(env);
    *pin = strdup(env);
    KMS_ENSURE(*pin != NULL, KMS_ERR_INTERNAL, "out of memory");
    if (forget_env) {
        /* Keep the PIN out of /proc/self/environ from now on. */
        OPENSSL_cleanse(env, *len);
        unsetenv("P11KMS_PIN");
    }
    return KMS_OK;
}

kms_err kms_read_metrics_token(const char *path, uint8_t digest[KMS_SHA256_LEN])
{
    char *token = NULL;
    size_t len = 0;
    KMS_GUARD(kms_read_secret_file(path, &token, &len));
    kms_err rc = len >= 16 ? kms_sha256(token, len, digest)
                           : KMS_FAIL(KMS_ERR_VALIDATION,
                                      "%s: the token must be at least 16 characters", path);
    kms_free_secret(token, len + 1);
    return rc;
}

kms_err kms_read_secret_file(const char *path, char **out, size_t *len)
{
    KMS_GUARD(read_file(path, 1, out, len, NULL));
    while (*len > 0 && ((*out)[*len - 1] == '\n' || (*out)[*len - 1] == '\r'))
        (*out)[--*len] = '\0';
    return KMS_OK;
}

void kms_credentials_free(struct kms_credentials *c)
{
    if (c->keys) {
        for (size_t i = 0; i < c->n; i++)
            pthread_mutex_destroy(&c->keys[i].lock);
        kms_free_secret(c->keys, c->n * sizeof *c->keys);
        c->keys = NULL;
    }
    for (size_t i = 0; i < c->n; i++) {
        free(c->p[i].access_key);
        if (c->p[i].secret)
            kms_free_secret(c->p[i].secret, strlen(c->p[i].secret));
        free(c->p[i].name);
    }
    free(c->p);
    c->p = NULL;
    c->n = 0;
}

kms_err kms_credentials_parse(const char *text, struct kms_credentials *out)
{
    unsigned lineno = 0;
    const char *p = text;
    kms_err rc = KMS_OK;

    memset(out, 0, sizeof *out);
    while (rc == KMS_OK && *p) {
        const char *nl = strchr(p, '\n');
        size_t n = nl ? (size_t)(nl - p) : strlen(p);
        char field[3][256];
        int nf = 0;
        lineno++;
        for (size_t i = 0; i < n && rc == KMS_OK;) {
            while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\r'))
                i++;
            if (i == n || p[i] == '#')
                break;
            size_t start = i;
            while (i < n && !(p[i] == ' ' || p[i] == '\t' || p[i] == '\r'))
                i++;
            if (nf == 3 || i - start >= sizeof field[0])
                rc = KMS_FAIL(KMS_ERR_VALIDATION,
                              "credentials line %u: expected 'ACCESS_KEY_ID SECRET NAME'", lineno);
            else {
                memcpy(field[nf], p + start, i - start);
                field[nf++][i - start] = '\0';
            }
        }
        if (rc == KMS_OK && nf != 0 && nf != 3)
            rc = KMS_FAIL(KMS_ERR_VALIDATION,
                          "credentials line %u: expected 'ACCESS_KEY_ID SECRET NAME'", lineno);
        if (rc == KMS_OK && nf == 3 &&
            (strlen(field[2]) > KMS_PRINCIPAL_MAX ||
             strspn(field[2], KMS_PRINCIPAL_CHARS) != strlen(field[2])))
            rc = KMS_FAIL(KMS_ERR_VALIDATION,
                          "credentials line %u: NAME must be 1-%d of A-Z a-z 0-9 _ . @ + = , -",
                          lineno, KMS_PRINCIPAL_MAX);
        if (rc == KMS_OK && nf == 3 && kms_credentials_find(out, field[0], strlen(field[0])))
            rc = KMS_FAIL(KMS_ERR_VALIDATION, "credentials line %u: access key id appears twice",
                          lineno);
        if (rc == KMS_OK && nf == 3) {
            struct kms_principal *np = realloc(out->p, (out->n + 1) * sizeof *np);
            if (!np)
                rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
            else {
                out->p = np;
                struct kms_principal *pr = &out->p[out->n++];
                pr->access_key = strdup(field[0]);
                pr->secret = strdup(field[1]);
                pr->name = strdup(field[2]);
                if (!pr->access_key || !pr->secret || !pr->name)
                    rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
            }
        }
        OPENSSL_cleanse(field, sizeof field);
        p += n + (nl ? 1 : 0);
    }
    if (rc == KMS_OK && out->n == 0)
        rc = KMS_FAIL(KMS_ERR_VALIDATION, "the credentials file names no principal");
    if (rc == KMS_OK && !(out->keys = calloc(out->n, sizeof *out->keys)))
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; rc == KMS_OK && i < out->n; i++)
        pthread_mutex_init(&out->keys[i].lock, NULL);
    if (rc != KMS_OK)
        kms_credentials_free(out);
    return rc;
}

kms_err kms_credentials_load(const char *path, struct kms_credentials *out)
{
    char *text;
    size_t len;
    KMS_GUARD(kms_read_secret_file(path, &text, &len));
    kms_err rc = kms_credentials_parse(text, out);
    kms_free_secret(text, len + 1);
    return rc;
}

const struct kms_principal *kms_credentials_find(const struct kms_credentials *c,
                                                 const char *access_key, size_t len)
{
    for (size_t i = 0; i < c->n; i++)
        if (strlen(c->p[i].access_key) == len && memcmp(c->p[i].access_key, access_key, len) == 0)
            return &c->p[i];
    return NULL;
}
