/*
 * A test driver for src/server/audit.c, run by tests/integration/test_audit.py:
 *
 *   audit_writer CONFIG LOGFILE [CHECKPOINT_LINES [CHECKPOINT_SECONDS]]
 *
 * Opens the token and the database named by CONFIG (p11kmsd's configuration
 * file; the database is made when need be) and the audit log at LOGFILE as
 * node CONFIG's audit_node (else the default), prints "open LOG_ID", then
 * reads commands from stdin and answers each with one line, "ok" or
 * "error TYPE MESSAGE":
 *
 *   write [N]     N request records (default 1), each waited for as a request's
 *                 answer waits (on disk, or lost); stops at the first failure
 *   durable N     N records, then a kms_audit_wait for each, all at once, until
 *                 every one is settled: "ok FLUSHES LINES" (what the group
 *                 commit's counters grew by), else "error ..." when one was not
 *                 made durable
 *   threads T N   T threads writing N records each, at once
 *   reopen        kms_audit_reopen, as on SIGHUP
 *   checkpoint    kms_audit_checkpoint
 *   intent ID     kms_audit_intent of a change with request id ID
 *   outcome ID R  kms_audit_outcome: R is 1 committed, 0 not, -1 unknown
 *   crash         exits at once (status 3), as a killed server would
 *   close         (or end of input) closes the log and exits 0
 *
 * Every record carries the encryption context {"purpose": "audit-test",
 * "tenant": "secret-tenant-acme"}: the values must not reach the log.
 */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/blob.h"
#include "common/buf.h"
#include "common/encoding.h"
#include "common/log.h"
#include "hsm/hsm.h"
#include "server/audit.h"
#include "server/settings.h"
#include "store/store.h"

static void answer(kms_err rc)
{
    if (rc == KMS_OK)
        printf("ok\n");
    else
        printf("error %s %s\n", kms_err_type(rc), kms_err_message());
    fflush(stdout);
    kms_err_clear();
}

/* One line's wait, as a request's answer waits for it. */
struct one_wait {
    struct kms_audit_wait w;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int settled, durable;
};

static void one_done(struct kms_audit_wait *w, int durable)
{
    struct one_wait *o = (struct one_wait *)w;
    pthread_mutex_lock(&o->lock);
    o->settled = 1;
    o->durable = durable;
    pthread_cond_signal(&o->cond);
    pthread_mutex_unlock(&o->lock);
}

static kms_err wait_line(struct kms_audit *a, uint64_t ticket)
{
    struct one_wait o = {.w = {.ticket = ticket, .done = one_done}};
    pthread_mutex_init(&o.lock, NULL);
    pthread_cond_init(&o.cond, NULL);
    int v = kms_audit_wait(a, &o.w);
    if (v == 0) {
        pthread_mutex_lock(&o.lock);
        while (!o.settled)
            pthread_cond_wait(&o.cond, &o.lock);
        v = o.durable ? 1 : -1;
        pthread_mutex_unlock(&o.lock);
    }
    pthread_mutex_destroy(&o.lock);
    pthread_cond_destroy(&o.cond);
    return v > 0 ? KMS_OK : KMS_FAIL(KMS_ERR_INTERNAL, "the line could not be written or flushed");
}

/* tickets: NULL to wait for each line in turn, else the lines' tickets, not waited for. */
static kms_err write_records(struct kms_audit *a, unsigned n, const struct kms_buf *context,
                             uint64_t *tickets)
{
    static unsigned counter;
    for (unsigned i = 0; i < n; i++) {
        uint8_t id[KMS_UUID_LEN];
        char rid[KMS_UUID_TEXT_LEN + 1], source[32];
        unsigned k = __atomic_fetch_add(&counter, 1, __ATOMIC_RELAXED);
        KMS_GUARD(kms_uuid_new(id));
        kms_uuid_format(id, rid);
        snprintf(source, sizeof source, "127.0.0.1:%u", 40000 + k % 20000);
        struct kms_audit_record r = {
            .request_id = rid,
            .principal = "tester",
            .source = source,
            .operation = k % 3 == 2 ? "DescribeKey" : "Encrypt",
            .key_arn = "arn:aws:kms:us-east-1:123456789012:key/0b5b8f7e-1c1a-4d7e-9a0e-"
                       "3f1e2d3c4b5a",
            .key_version = 3,
            .context = k % 3 == 2 ? NULL : context,
            .outcome = k % 4 == 3 ? "AccessDeniedException" : "ok",
            .decision = k % 4 == 3 ? "deny (implicit)" : "allow #0",
            .latency_us = 100 + k,
        };
        uint64_t ticket;
        KMS_GUARD(kms_audit_write(a, &r, &ticket));
        if (tickets)
            tickets[i] = ticket;
        else
            KMS_GUARD(wait_line(a, ticket));
    }
    return KMS_OK;
}

struct writer_thread {
    pthread_t t;
    struct kms_audit *a;
    unsigned n;
    const struct kms_buf *context;
    kms_err rc;
    char message[256];
};

static void *writer_main(void *arg)
{
    struct writer_thread *w = arg;
    w->rc = write_records(w->a, w->n, w->context, NULL);
    snprintf(w->message, sizeof w->message, "%s", kms_err_message());
    return NULL;
}

/* T threads at once; answers with the first failure, if any. */
static void write_threads(struct kms_audit *a, unsigned t, unsigned n,
                          const struct kms_buf *context)
{
    struct writer_thread w[64];
    unsigned started = 0;
    if (t > 64)
        t = 64;
    for (; started < t; started++) {
        w[started] = (struct writer_thread){.a = a, .n = n, .context = context};
        if (pthread_create(&w[started].t, NULL, writer_main, &w[started]) != 0)
            break;
    }
    kms_err rc = started == t ? KMS_OK : KMS_FAIL(KMS_ERR_INTERNAL, "cannot start threads");
    for (unsigned i = 0; i < started; i++) {
        pthread_join(w[i].t, NULL);
        if (rc == KMS_OK && w[i].rc != KMS_OK)
            rc = KMS_FAIL(w[i].rc, "%s", w[i].message);
    }
    answer(rc);
}

/* The waits of one "durable" command. */
static pthread_mutex_t settled_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t settled_cond = PTHREAD_COND_INITIALIZER;
static unsigned settled, not_durable;

static void settled_one(struct kms_audit_wait *w, int durable)
{
    (void)w;
    pthread_mutex_lock(&settled_lock);
    settled++;
    if (!durable)
        not_durable++;
    pthread_cond_signal(&settled_cond);
    pthread_mutex_unlock(&settled_lock);
}

static void write_durable(struct kms_audit *a, unsigned n, const struct kms_buf *context)
{
    struct kms_audit_commit_stats s0, s1;
    uint64_t *tickets = calloc(n ? n : 1, sizeof *tickets);
    struct kms_audit_wait *waits = calloc(n ? n : 1, sizeof *waits);
    if (!tickets || !waits) {
        free(tickets);
        free(waits);
        answer(KMS_FAIL(KMS_ERR_INTERNAL, "out of memory"));
        return;
    }
    kms_audit_commit_stats(a, &s0);
    kms_err rc = write_records(a, n, context, tickets);
    if (rc == KMS_OK) {
        unsigned registered = 0, now_bad = 0;
        settled = not_durable = 0;
        for (unsigned i = 0; i < n; i++) {
            waits[i] = (struct kms_audit_wait){.ticket = tickets[i], .done = settled_one};
            int v = kms_audit_wait(a, &waits[i]);
            if (v == 0)
                registered++;
            else if (v < 0)
                now_bad++;
        }
        pthread_mutex_lock(&settled_lock);
        while (settled < registered)
            pthread_cond_wait(&settled_cond, &settled_lock);
        now_bad += not_durable;
        pthread_mutex_unlock(&settled_lock);
        if (now_bad)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "%u of %u lines were not made durable", now_bad, n);
    }
    free(tickets);
    free(waits);
    if (rc != KMS_OK) {
        answer(rc);
        return;
    }
    kms_audit_commit_stats(a, &s1);
    printf("ok %llu %llu\n", (unsigned long long)(s1.flushes - s0.flushes),
           (unsigned long long)(s1.lines - s0.lines));
    fflush(stdout);
}

int main(int argc, char **argv)
{
    struct kms_config cfg;
    struct kms_hsm *hsm = NULL;
    struct kms_store *store = NULL;
    struct kms_audit *a = NULL;
    struct kms_buf context = KMS_BUF_INIT;
    char *pin = NULL, line[256];
    size_t pin_len = 0;
    kms_err rc;

    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: audit_writer CONFIG LOGFILE [CHECKPOINT_LINES [SECONDS]]\n");
        return 2;
    }
    kms_log_set_level(KMS_LOG_WARN);
    kms_config_defaults(&cfg);
    rc = kms_config_load(&cfg, argv[1]);
    if (rc == KMS_OK)
        rc = kms_read_secret_file(cfg.pin_file, &pin, &pin_len);
    if (rc == KMS_OK) {
        struct kms_hsm_config hc = {
            .module = cfg.module, .token = cfg.token, .pin = pin, .sessions = 2};
        rc = kms_hsm_open(&hc, &hsm);
        kms_free_secret(pin, pin_len + 1);
    }
    if (rc == KMS_OK) {
        struct kms_context_pair pairs[] = {
            {"tenant", 6, "secret-tenant-acme", 18},
            {"purpose", 7, "audit-test", 10},
        };
        rc = kms_context_canonical(pairs, 2, &context);
    }
    if (rc == KMS_OK) {
        struct kms_store_config sc = kms_config_store(&cfg, KMS_STORE_INIT);
        rc = kms_store_open(&sc, &store);
    }
    if (rc == KMS_OK) {
        struct kms_audit_config ac = {
            .path = argv[2],
            .store = store,
            .node = cfg.audit_node,
            .checkpoint_lines = argc > 3 ? (unsigned)strtoul(argv[3], NULL, 10) : 0,
            .checkpoint_seconds = argc > 4 ? (unsigned)strtoul(argv[4], NULL, 10) : 0,
        };
        rc = kms_audit_open(&ac, hsm, &a);
    }
    if (rc != KMS_OK) {
        answer(rc);
        kms_store_close(store);
        kms_hsm_close(hsm);
        kms_config_free(&cfg);
        kms_buf_free(&context);
        return 1;
    }
    printf("open %s\n", kms_audit_id(a));
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        unsigned n = 1;
        if (strncmp(line, "write", 5) == 0) {
            sscanf(line + 5, "%u", &n);
            answer(write_records(a, n, &context, NULL));
        } else if (strncmp(line, "durable", 7) == 0) {
            sscanf(line + 7, "%u", &n);
            write_durable(a, n, &context);
        } else if (strncmp(line, "threads", 7) == 0) {
            unsigned t = 1;
            sscanf(line + 7, "%u %u", &t, &n);
            write_threads(a, t, n, &context);
        } else if (strncmp(line, "reopen", 6) == 0) {
            answer(kms_audit_reopen(a));
        } else if (strncmp(line, "checkpoint", 10) == 0) {
            answer(kms_audit_checkpoint(a));
        } else if (strncmp(line, "intent ", 7) == 0) {
            char id[65] = "";
            sscanf(line + 7, "%64s", id);
            struct kms_audit_change c = {id, "CreateKey", "tester", "127.0.0.1:40000", NULL, NULL};
            answer(kms_audit_intent(a, &c));
        } else if (strncmp(line, "outcome ", 8) == 0) {
            char id[65] = "";
            int result = 1;
            sscanf(line + 8, "%64s %d", id, &result);
            kms_audit_outcome(a, id, result);
            answer(KMS_OK);
        } else if (strncmp(line, "crash", 5) == 0) {
            fflush(stdout);
            _exit(3);
        } else if (strncmp(line, "close", 5) == 0) {
            break;
        } else {
            printf("error usage unknown command\n");
            fflush(stdout);
        }
    }
    kms_audit_close(a);
    kms_store_close(store);
    kms_hsm_close(hsm);
    kms_config_free(&cfg);
    kms_buf_free(&context);
    printf("closed\n");
    return 0;
}
