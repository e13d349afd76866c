/*
 * p11kms-audit verify [--config FILE] LOGFILE...
 *
 * Checks p11kmsd's audit log (src/server/audit.h): the chain of hashes, and
 * with --config (the server's configuration: module, token, pin_file) the
 * checkpoint MACs in the token and the token's record of each log's latest
 * checkpoint, which catches a log cut short. Several files are one stream, in
 * the order given (oldest first, as logrotate leaves them: audit.log.2
 * audit.log.1 audit.log). Reports the first problem with its line.
 *
 * Exit status: 0 intact, 1 a problem (reported on stdout), 2 usage or I/O error.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/log.h"
#include "hsm/hsm.h"
#include "server/audit.h"
#include "server/settings.h"

#define EXIT_PROBLEM 1
#define EXIT_USAGE 2

static void usage(FILE *f)
{
    fprintf(f, "usage: p11kms-audit verify [--config FILE] LOGFILE...\n"
               "\n"
               "Checks that the audit log is as p11kmsd wrote it and reports the first line\n"
               "that was changed, removed, inserted or reordered. Give rotated files oldest\n"
               "first. With --config (p11kmsd's configuration file: module, token, pin_file;\n"
               "or the PIN in P11KMS_PIN) checkpoint MACs are verified in the token and a log\n"
               "cut short after a checkpoint is found; without it only the chain is checked.\n"
               "\n"
               "Exit status: 0 intact, 1 a problem was found, 2 usage or I/O error.\n");
}

/* ---- the token ------------------------------------------------------------------- */

struct token {
    struct kms_hsm *hsm;
    struct kms_session *s;
    struct kms_audit_token_record *records;
    size_t nrecords;
    /* Keys found so far, by CKA_ID. */
    struct {
        char id[2 * KMS_AUDIT_KEY_ID_LEN + 1];
        CK_OBJECT_HANDLE h; /* CK_INVALID_HANDLE: not in the token */
    } keys[16];
    size_t nkeys;
    int failed; /* a token error while checking: reported, exit 2 */
};

/* The records of every log, read before the log files: a server still writing only adds. */
static kms_err read_records(struct token *t)
{
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_APPLICATION, (void *)KMS_AUDIT_APPLICATION, sizeof KMS_AUDIT_APPLICATION - 1},
    };
    CK_OBJECT_HANDLE *handles = NULL;
    size_t n = 0;
    kms_err rc;

    KMS_GUARD(kms_hsm_find(t->s, tmpl, 2, &handles, &n));
    t->records = calloc(n + 1, sizeof *t->records);
    if (!t->records) {
        free(handles);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    rc = KMS_OK;
    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        struct kms_buf label = KMS_BUF_INIT;
        rc = kms_hsm_get_bytes(t->s, handles[i], CKA_LABEL, &label);
        if (rc == KMS_OK && kms_audit_record_label_parse((const char *)label.data, label.len,
                                                         &t->records[t->nrecords]))
            t->nrecords++;
        kms_buf_free(&label);
    }
    free(handles);
    return rc;
}

static CK_OBJECT_HANDLE find_key(struct token *t, const char *key_hex)
{
    for (size_t i = 0; i < t->nkeys; i++)
        if (strcmp(t->keys[i].id, key_hex) == 0)
            return t->keys[i].h;
    uint8_t id[KMS_AUDIT_KEY_ID_LEN];
    for (size_t i = 0; i < sizeof id; i++) {
        unsigned v;
        sscanf(key_hex + 2 * i, "%2x", &v);
        id[i] = (uint8_t)v;
    }
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_LABEL, (void *)KMS_AUDIT_KEY_LABEL, sizeof KMS_AUDIT_KEY_LABEL - 1},
        {CKA_ID, id, sizeof id},
    };
    CK_OBJECT_HANDLE *handles = NULL, h = CK_INVALID_HANDLE;
    size_t n = 0;
    if (kms_hsm_find(t->s, tmpl, 3, &handles, &n) != KMS_OK) {
        fprintf(stderr, "p11kms-audit: cannot search the token: %s\n", kms_err_message());
        t->failed = 1;
        return CK_INVALID_HANDLE;
    }
    if (n > 0)
        h = handles[0];
    free(handles);
    if (t->nkeys < sizeof t->keys / sizeof t->keys[0]) {
        snprintf(t->keys[t->nkeys].id, sizeof t->keys[t->nkeys].id, "%s", key_hex);
        t->keys[t->nkeys++].h = h;
    }
    return h;
}

static int check_mac(void *arg, const char *key_hex, const uint8_t *body, size_t n,
                     const uint8_t mac[32])
{
    struct token *t = arg;
    uint8_t want[32];
    CK_OBJECT_HANDLE h = find_key(t, key_hex);
    if (h == CK_INVALID_HANDLE)
        return t->failed ? 0 : -1;
    if (kms_hsm_hmac_sha256(t->s, h, body, n, want) != KMS_OK) {
        fprintf(stderr, "p11kms-audit: the token could not compute a MAC: %s\n", kms_err_message());
        t->failed = 1;
        return 0;
    }
    return CRYPTO_memcmp(want, mac, sizeof want) == 0;
}

static kms_err open_token(const char *config_file, struct token *t)
{
    struct kms_config cfg;
    char *pin = NULL;
    size_t pin_len = 0;
    kms_err rc;

    kms_config_defaults(&cfg);
    rc = kms_config_load(&cfg, config_file);
    if (rc == KMS_OK && (!cfg.module || !cfg.token))
        rc = KMS_FAIL(KMS_ERR_VALIDATION, "%s names no module or token", config_file);
    if (rc == KMS_OK)
        rc = kms_read_pin(&cfg, 0, &pin, &pin_len);
    if (rc == KMS_OK) {
        struct kms_hsm_config hc = {
            .module = cfg.module,
            .token = cfg.token,
            .pin = pin,
            .sessions = 1,
            .acquire_timeout_ms = cfg.session_timeout_ms,
        };
        rc = kms_hsm_open(&hc, &t->hsm);
        kms_free_secret(pin, pin_len + 1);
    }
    kms_config_free(&cfg);
    if (rc == KMS_OK)
        rc = kms_hsm_acquire(t->hsm, &t->s);
    if (rc == KMS_OK)
        rc = read_records(t);
    return rc;
}

static void close_token(struct token *t)
{
    if (t->s)
        kms_hsm_release(t->s);
    kms_hsm_close(t->hsm);
    free(t->records);
}

/* ---- verify --------------------------------------------------------------------- */

/* Feeds a file's lines; 1 when the verifier has settled on a problem, -1 on an I/O error. */
static int feed_file(struct kms_audit_verifier *v, const char *path)
{
    FILE *f = fopen(path, "rb");
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int done = 0;

    if (!f) {
        fprintf(stderr, "p11kms-audit: cannot open %s: %s\n", path, strerror(errno));
        return -1;
    }
    kms_audit_verify_file(v, path);
    while (!done && (n = getline(&line, &cap, f)) >= 0) {
        int complete = n > 0 && line[n - 1] == '\n';
        done = kms_audit_verify_line(v, line, (size_t)n - (complete ? 1 : 0), complete);
    }
    int err = ferror(f);
    free(line);
    fclose(f);
    if (err) {
        fprintf(stderr, "p11kms-audit: cannot read %s\n", path);
        return -1;
    }
    return done;
}

static int verify(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *config_file = NULL;
    struct token t;
    struct kms_audit_verify_config vc = {0};
    struct kms_audit_verifier *v;
    struct kms_audit_report rep;
    int c, status = 0;

    while ((c = getopt_long(argc, argv, "c:h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config_file = optarg; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return EXIT_USAGE;
        }
    }
    if (optind >= argc) {
        usage(stderr);
        return EXIT_USAGE;
    }
    memset(&t, 0, sizeof t);
    if (config_file) {
        if (open_token(config_file, &t) != KMS_OK) {
            fprintf(stderr, "p11kms-audit: %s\n", kms_err_message());
            close_token(&t);
            return EXIT_USAGE;
        }
        vc.mac = check_mac;
        vc.mac_arg = &t;
        vc.records = t.records;
        vc.nrecords = t.nrecords;
        vc.have_records = 1;
    }
    if (kms_audit_verifier_new(&vc, &v) != KMS_OK) {
        fprintf(stderr, "p11kms-audit: %s\n", kms_err_message());
        close_token(&t);
        return EXIT_USAGE;
    }
    for (int i = optind; i < argc && status == 0; i++) {
        int r = feed_file(v, argv[i]);
        if (r < 0)
            status = EXIT_USAGE;
        else if (r > 0)
            break;
    }
    kms_audit_verify_finish(v, &rep);
    if (status == 0 && t.failed)
        status = EXIT_USAGE;
    if (status == 0 && rep.finding != KMS_AUDIT_INTACT) {
        printf("%s: %s\n", rep.file, rep.text);
        status = EXIT_PROBLEM;
    } else if (status == 0 && rep.lines == 0) {
        printf("no audit lines in the files given\n");
        status = EXIT_PROBLEM;
    } else if (status == 0) {
        printf("%s", rep.text);
        if (config_file)
            printf("; %" PRIu64 " checkpoint MACs verified in the token and every log reaches the "
                   "checkpoint the token records",
                   rep.macs_checked);
        else
            printf("; checkpoint MACs and truncation not checked (no --config)");
        if (rep.continues)
            printf("; the last log goes on in a later file");
        printf("\n");
    }
    close_token(&t);
    return status;
}

int main(int argc, char **argv)
{
    kms_log_set_level(KMS_LOG_WARN);
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        usage(stdout);
        return 0;
    }
    if (argc < 2 || strcmp(argv[1], "verify") != 0) {
        usage(stderr);
        return EXIT_USAGE;
    }
    return verify(argc - 1, argv + 1);
}
