/*
 * p11kms-audit verify [--config FILE] [--since LOG] LOGFILE...
 *
 * Checks p11kmsd's audit log (src/server/audit.h): the chain of hashes, and
 * with --config (the server's configuration: module, token, pin_file,
 * database) the checkpoint MACs in the token, each run's link to the run
 * before it, and the database's head of each node (MAC'd in the token), which
 * catch a log cut short and a run's file left out; intents without an
 * outcome are settled from the database. Several files are one stream, in
 * the order given (oldest first, as logrotate leaves them: audit.log.2
 * audit.log.1 audit.log). Reports the first problem with its line.
 *
 * Exit status: 0 intact, 1 a problem (reported on stdout), 2 usage or I/O error.
 */
#include "config.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/log.h"
#include "hsm/hsm.h"
#include "server/audit.h"
#include "server/settings.h"
#include "store/store.h"

#define EXIT_PROBLEM 1
#define EXIT_USAGE 2

static void usage(FILE *f)
{
    fprintf(f, "usage: p11kms-audit verify [--config FILE] [--since LOG] LOGFILE...\n"
               "\n"
               "Checks that the audit log is as p11kmsd wrote it and reports the first line\n"
               "that was changed, removed, inserted or reordered. Give every file of a node's\n"
               "runs, oldest first. With --config (p11kmsd's configuration file: module, token,\n"
               "pin_file, database; or the PIN in P11KMS_PIN) checkpoint MACs are verified in\n"
               "the token, a run whose file is missing or a log cut short after a checkpoint\n"
               "is found through each run's link to the one before and the database's head\n"
               "of each node, and changes without an outcome line are looked up in the\n"
               "database; without it only the chain is checked. --since LOG: the files begin\n"
               "with run LOG on purpose (older ones were archived): its run before is not\n"
               "looked for.\n"
               "\n"
               "Exit status: 0 intact, 1 a problem was found, 2 usage or I/O error.\n");
}

/* ---- the token ------------------------------------------------------------------- */

struct token {
    struct kms_hsm *hsm;
    struct kms_session *s;
    struct kms_store *store;
    char node[KMS_AUDIT_NODE_MAX + 1]; /* the configuration's own node */
    struct kms_audit_head *heads;
    size_t nheads;
    /* Keys found so far, by CKA_ID. */
    struct {
        char id[2 * KMS_AUDIT_KEY_ID_LEN + 1];
        CK_OBJECT_HANDLE h; /* CK_INVALID_HANDLE: not in the token */
    } keys[16];
    size_t nkeys;
    int failed; /* a token error while checking: reported, exit 2 */
};

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
    if (rc == KMS_OK && !cfg.database)
        rc = KMS_FAIL(KMS_ERR_VALIDATION, "%s names no database", config_file);
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
    if (rc == KMS_OK) {
        struct kms_store_config sc = kms_config_store(&cfg, KMS_STORE_OPEN);
        rc = kms_store_open(&sc, &t->store);
    }
    if (rc == KMS_OK && cfg.audit_node)
        snprintf(t->node, sizeof t->node, "%s", cfg.audit_node);
    else if (rc == KMS_OK && cfg.audit_log)
        kms_audit_default_node(cfg.audit_log, t->node, sizeof t->node);
    kms_config_free(&cfg);
    if (rc == KMS_OK)
        rc = kms_hsm_acquire(t->hsm, &t->s);
    return rc;
}

static void close_token(struct token *t)
{
    if (t->s)
        kms_hsm_release(t->s);
    kms_hsm_close(t->hsm);
    kms_store_close(t->store);
    free(t->heads);
}

/*
 * The head of node, when the database holds one: added to t->heads once its
 * MAC verifies in the token. 1 when it does not (reported on stdout).
 */
static int add_head(struct token *t, const char *node)
{
    struct kms_audit_head_row row;
    struct kms_buf body = KMS_BUF_INIT;
    struct kms_tx *tx = NULL;
    uint8_t mac[32];
    char hex[65];

    for (size_t i = 0; i < t->nheads; i++)
        if (strcmp(t->heads[i].node, node) == 0)
            return 0;
    kms_err rc = kms_store_begin(t->store, KMS_TX_READ, &tx);
    if (rc == KMS_OK)
        rc = kms_store_audit_head_get(tx, node, &row);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    if (rc == KMS_ERR_NOT_FOUND) {
        kms_err_clear();
        return 0;
    }
    if (rc != KMS_OK) {
        fprintf(stderr, "p11kms-audit: cannot read the database: %s\n", kms_err_message());
        t->failed = 1;
        return 0;
    }
    size_t klen = strlen(row.key);
    CK_OBJECT_HANDLE key = klen == 2 * KMS_AUDIT_KEY_ID_LEN && kms_audit_is_hex(row.key, klen)
                               ? find_key(t, row.key)
                               : CK_INVALID_HANDLE;
    rc = kms_audit_head_body(row.node, row.log, row.seq, row.hash, &body);
    if (rc == KMS_OK && key != CK_INVALID_HANDLE)
        rc = kms_hsm_hmac_sha256(t->s, key, body.data, body.len, mac);
    kms_buf_free(&body);
    if (rc != KMS_OK) {
        fprintf(stderr, "p11kms-audit: the token could not compute a MAC: %s\n", kms_err_message());
        t->failed = 1;
        return 0;
    }
    kms_hex_encode(mac, 32, hex);
    if (key == CK_INVALID_HANDLE || strlen(row.mac) != 64 || CRYPTO_memcmp(hex, row.mac, 64) != 0) {
        printf("database: the audit head of node %s does not verify: it was altered (it names "
               "log %s, seq %" PRIu64 ")\n",
               node, row.log, row.seq);
        return 1;
    }
    struct kms_audit_head *h = realloc(t->heads, (t->nheads + 1) * sizeof *h);
    if (!h) {
        t->failed = 1;
        return 0;
    }
    t->heads = h;
    h = &t->heads[t->nheads++];
    memset(h, 0, sizeof *h);
    snprintf(h->node, sizeof h->node, "%s", row.node);
    snprintf(h->log, sizeof h->log, "%s", row.log);
    h->seq = row.seq;
    snprintf(h->hash, sizeof h->hash, "%s", row.hash);
    return 0;
}

/*
 * The heads of the nodes the files' runs name (their opening checkpoints'
 * "node") and of the configuration's own node. 1 when one does not verify.
 */
static int read_heads(struct token *t, int nfiles, char **files)
{
    int bad = 0;
    if (t->node[0])
        bad |= add_head(t, t->node);
    for (int i = 0; i < nfiles && !t->failed; i++) {
        FILE *f = fopen(files[i], "rb");
        char *line = NULL;
        size_t cap = 0;
        ssize_t n;
        if (!f)
            continue; /* said when the file is verified */
        while ((n = getline(&line, &cap, f)) >= 0) {
            if (!strstr(line, "\"kind\":\"open\"") || !strstr(line, "\"node\":"))
                continue;
            json_t *o = json_loadb(line, (size_t)n, JSON_REJECT_DUPLICATES, NULL);
            const char *node = json_string_value(json_object_get(o, "node"));
            if (node)
                bad |= add_head(t, node);
            json_decref(o);
        }
        free(line);
        fclose(f);
    }
    return bad;
}

/* Intents with no outcome among the lines: what the database says of each. */
static void settle(struct token *t, const struct kms_audit_report *rep)
{
    for (size_t i = 0; i < rep->nopen; i++) {
        struct kms_tx *tx = NULL;
        int found = 0;
        kms_err rc = kms_store_begin(t->store, KMS_TX_READ, &tx);
        if (rc == KMS_OK)
            rc = kms_store_change_request_find(tx, rep->open[i], &found);
        if (rc == KMS_OK)
            rc = kms_store_commit(tx);
        kms_store_rollback(tx);
        if (rc != KMS_OK) {
            fprintf(stderr, "p11kms-audit: cannot read the database: %s\n", kms_err_message());
            t->failed = 1;
            return;
        }
        printf("request %s: an intent without its outcome line; the database says: %s\n",
               rep->open[i], found ? "committed" : "not committed");
    }
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

/* What the tool prints after a clean run. */
static void summary(const struct kms_audit_report *rep, int with_config, size_t nheads)
{
    printf("%s", rep->text);
    if (with_config)
        printf("; %" PRIu64 " checkpoint MACs verified in the token, every run reaches the line "
               "the next one names, and %zu database heads are reached",
               rep->macs_checked, nheads);
    else
        printf("; checkpoint MACs, missing runs and truncation not checked (no --config)");
    if (rep->continues)
        printf("; the last log goes on in a later file");
    printf("; %" PRIu64 " changes: %" PRIu64 " committed, %" PRIu64 " not committed, %zu without "
           "an outcome line\n",
           rep->intents, rep->committed, rep->not_committed, rep->nopen);
}

static int verify(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"since", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char *config_file = NULL;
    struct token t;
    struct kms_audit_verify_config vc = {0};
    struct kms_audit_verifier *v;
    struct kms_audit_report rep;
    int c, status = 0;

    while ((c = getopt_long(argc, argv, "c:s:h", opts, NULL)) != -1) {
        switch (c) {
        case 'c': config_file = optarg; break;
        case 's': vc.since = optarg; break;
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
        /* Read before the files: a server still writing only moves its head on. */
        if (read_heads(&t, argc - optind, argv + optind))
            status = EXIT_PROBLEM;
        vc.mac = check_mac;
        vc.mac_arg = &t;
        vc.heads = t.heads;
        vc.nheads = t.nheads;
    }
    if (status == 0 && t.failed)
        status = EXIT_USAGE;
    if (status != 0) {
        close_token(&t);
        return status;
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
        summary(&rep, config_file != NULL, t.nheads);
        if (config_file)
            settle(&t, &rep);
        if (t.failed)
            status = EXIT_USAGE;
    }
    kms_audit_report_free(&rep);
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
