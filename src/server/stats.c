#include "config.h"

#include "server/stats.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "common/metrics.h"
#include "hsm/hsm.h"
#include "server/audit.h"
#include "server/breaker.h"
#include "server/pool.h"

/* Request outcomes: "ok", then one name per error code (AWS's type, but 413 apart). */
#define OUTCOMES (KMS_ERR_COUNT)

struct kms_stats {
    struct kms_metrics *registry;
    struct kms_counter_family *requests;        /* operation x outcome */
    struct kms_histogram_family *latency;       /* operation */
    struct kms_counter_family *throttled;       /* class */
    struct kms_histogram_family *token_calls;   /* function */
    struct kms_histogram_family *db_tx;         /* kind: read, write */
    struct kms_counter_family *db_failures;     /* kind */
    struct kms_counter_family *audit_failures;  /* no label */
    struct kms_histogram_family *audit_flushes; /* no label */
    struct kms_counter_family *breaker_trips;   /* kind */
    struct kms_counter_family *breaker_refused; /* no label */
    double started;                             /* seconds since the epoch */
    const char *operations[KMS_OP_COUNT + 2];   /* the operations, "none", NULL */
    const char *outcomes[OUTCOMES + 1];
};

static void observe_token(void *arg, enum kms_hsm_call call, uint64_t ns)
{
    struct kms_stats *st = arg;
    kms_histogram_observe_ns(st->token_calls, (size_t)call, ns);
}

static void observe_database(void *arg, int write, int failed, uint64_t ns)
{
    struct kms_stats *st = arg;
    kms_histogram_observe_ns(st->db_tx, write ? 1 : 0, ns);
    if (failed)
        kms_counter_add(st->db_failures, write ? 1 : 0, 0, 1);
}

static void observe_audit_flush(void *arg, uint64_t ns)
{
    struct kms_stats *st = arg;
    kms_histogram_observe_ns(st->audit_flushes, 0, ns);
}

static kms_err write_usage(void *arg, const struct kms_version_usage *u)
{
    struct kms_metrics_writer *w = arg;
    char vid[16];
    snprintf(vid, sizeof vid, "%u", u->vid);
    const char *labels[] = {"key_id", u->key_id, "version", vid, NULL};
    KMS_GUARD(kms_metrics_write_gauge(
        w, "p11kms_key_version_uses_reserved",
        "Uses of each enabled key's current version reserved by all nodes (at least the wraps "
        "made)",
        labels, (double)u->reserved));
    return KMS_OK;
}

static kms_err write_bounds(void *arg, const struct kms_version_usage *u)
{
    struct kms_metrics_writer *w = arg;
    char vid[16];
    snprintf(vid, sizeof vid, "%u", u->vid);
    const char *labels[] = {"key_id", u->key_id, "version", vid, NULL};
    return kms_metrics_write_gauge(
        w, "p11kms_key_version_uses_bound",
        "Uses after which the version is never used to wrap again (the key rotates first)", labels,
        (double)u->bound);
}

/* Values that live elsewhere, read at each rendering. */
static kms_err collect(void *arg, struct kms_metrics_writer *w)
{
    struct kms_server *srv = arg;
    struct kms_hsm_load load;
    unsigned queued = 0, running = 0;
    size_t keys = 0, versions = 0;

    /* Which release runs, and since when: restarts show as changes of the start time. */
    const char *release[] = {"version", PACKAGE_VERSION, NULL};
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_build_info",
                                      "Always 1; its label names the p11kmsd release serving",
                                      release, 1));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_start_time_seconds",
                                      "When this p11kmsd started, in seconds since the epoch", NULL,
                                      srv->stats->started));
    KMS_GUARD(kms_metrics_write_gauge(
        w, "p11kms_connections_open",
        "Client connections open now (max_connections in all, per_ip_connections from one address)",
        NULL, (double)__atomic_load_n(&srv->connections, __ATOMIC_RELAXED)));
    kms_hsm_load(srv->hsm, &load);
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_token_sessions", "Token sessions in the pool",
                                      NULL, load.sessions));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_token_sessions_in_use",
                                      "Token sessions taken by a request or the key store", NULL,
                                      load.in_use));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_token_sessions_waiting",
                                      "Threads waiting for a token session", NULL, load.waiting));
    if (srv->pool)
        kms_pool_load(srv->pool, &queued, &running);
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_requests_queued", "Requests waiting for a worker",
                                      NULL, queued));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_requests_running",
                                      "Requests a worker is running (those stuck in a hung "
                                      "token call included)",
                                      NULL, running));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_requests_inline",
                                      "Requests an HTTP thread is running itself in the token "
                                      "(those stuck in a hung token call included)",
                                      NULL, srv->pool ? kms_pool_inline_running(srv->pool) : 0));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_token_slow",
                                      "1 while a token call took over the stall time within the "
                                      "last second: every request then goes to a worker",
                                      NULL, srv->pool ? kms_pool_token_slow(srv->pool) : 0));
    const char *rv[KMS_HSM_FAILURE_KINDS];
    uint64_t failed[KMS_HSM_FAILURE_KINDS];
    size_t kinds = kms_hsm_failures(rv, failed, KMS_HSM_FAILURE_KINDS);
    for (size_t i = 0; i < kinds; i++) {
        const char *labels[] = {"rv", rv[i], NULL};
        KMS_GUARD(kms_metrics_write_counter(w, "p11kms_token_errors_total",
                                            "Token calls that failed, by PKCS#11 return value "
                                            "(the log names the call)",
                                            labels, failed[i]));
    }
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_token_ready",
                                      "1 when the token answers and the user is logged in", NULL,
                                      kms_hsm_ready(srv->hsm) ? 1 : 0));
    if (srv->audit) {
        struct kms_audit_commit_stats cs;
        kms_audit_commit_stats(srv->audit, &cs);
        KMS_GUARD(kms_metrics_write_counter(w, "p11kms_audit_flushes_total",
                                            "fdatasync calls of the audit log's group commit, each "
                                            "making every line written before it durable",
                                            NULL, cs.flushes));
        KMS_GUARD(kms_metrics_write_counter(w, "p11kms_audit_flushed_lines_total",
                                            "Audit lines those flushes made durable (answers "
                                            "wait for theirs)",
                                            NULL, cs.lines));
        KMS_GUARD(kms_metrics_write_gauge(
            w, "p11kms_audit_answers_waiting", "Answers waiting for their audit line to be on disk",
            NULL, (double)__atomic_load_n(&srv->parked, __ATOMIC_ACQUIRE)));
    }
    for (int k = 0; k < KMS_BREAKER_KINDS; k++) {
        const char *labels[] = {"kind", k == KMS_BREAKER_PRINCIPAL ? "principal" : "key", NULL};
        KMS_GUARD(kms_metrics_write_gauge(
            w, "p11kms_decrypt_breakers_open",
            "Decryption breakers open now, by kind (principal: its decryptions are refused; key: "
            "alert only)",
            labels,
            (double)kms_breaker_open_count(srv->breaker, (enum kms_breaker_kind)k,
                                           kms_monotonic_ns())));
    }
    /* Key ids only when asked for (metrics_key_ids): a scraper needs no list of keys. */
    if (srv->cfg.metrics_key_ids) {
        KMS_GUARD(kms_keystore_survey(srv->ks, &keys, &versions, write_usage, w));
        KMS_GUARD(kms_keystore_survey(srv->ks, &keys, &versions, write_bounds, w));
    } else {
        KMS_GUARD(kms_keystore_survey(srv->ks, &keys, &versions, NULL, NULL));
    }
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_keys", "Keys, pending deletion included", NULL,
                                      (double)keys));
    uint64_t hits = 0, misses = 0;
    kms_keystore_cache_counts(srv->ks, &hits, &misses);
    const char *hit[] = {"result", "hit", NULL}, *miss[] = {"result", "miss", NULL};
    KMS_GUARD(kms_metrics_write_counter(w, "p11kms_key_cache_lookups_total",
                                        "Keys looked up by requests: found in this node's cache "
                                        "(hit), or read from the database (miss)",
                                        hit, hits));
    KMS_GUARD(kms_metrics_write_counter(w, "p11kms_key_cache_lookups_total",
                                        "Keys looked up by requests: found in this node's cache "
                                        "(hit), or read from the database (miss)",
                                        miss, misses));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_key_versions", "Versions of those keys", NULL,
                                      (double)versions));
    return KMS_OK;
}

kms_err kms_stats_start(struct kms_server *srv)
{
    static const char *const classes[] = {"crypto", "manage", "asym", "hmac", NULL};
    static const char *const breaker_kinds[] = {"principal", "key", NULL};
    static const char *const tx_kinds[] = {"read", "write", NULL};
    struct kms_stats *st = calloc(1, sizeof *st);
    kms_err rc;

    KMS_ENSURE(st != NULL, KMS_ERR_INTERNAL, "out of memory");
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    st->started = (double)now.tv_sec + (double)(now.tv_nsec / 1000000) / 1000.0;
    for (size_t i = 0; i < KMS_OP_COUNT; i++)
        st->operations[i] = kms_op_at(i)->name;
    st->operations[KMS_OP_COUNT] = "none";
    st->outcomes[0] = "ok";
    for (int e = 1; e < KMS_ERR_COUNT; e++)
        st->outcomes[e] = e == KMS_ERR_TOO_LARGE ? "RequestTooLarge" : kms_err_type((kms_err)e);
    srv->stats = st;

    rc = kms_metrics_new(&st->registry);
    if (rc == KMS_OK)
        rc = kms_counter_family_new("p11kms_requests_total",
                                    "Requests answered, by operation and outcome (ok or the AWS "
                                    "error type)",
                                    "operation", st->operations, "outcome", st->outcomes,
                                    &st->requests);
    if (rc == KMS_OK)
        rc = kms_metrics_add_counter(st->registry, st->requests);
    if (rc == KMS_OK)
        rc = kms_histogram_family_new("p11kms_request_duration_seconds",
                                      "Time from a request's arrival (body read) to its answer",
                                      "operation", st->operations, NULL, 0, &st->latency);
    if (rc == KMS_OK)
        rc = kms_metrics_add_histogram(st->registry, st->latency);
    if (rc == KMS_OK)
        rc = kms_counter_family_new("p11kms_throttled_total",
                                    "Requests refused by a rate limit, by operation class", "class",
                                    classes, NULL, NULL, &st->throttled);
    if (rc == KMS_OK)
        rc = kms_metrics_add_counter(st->registry, st->throttled);
    if (rc == KMS_OK)
        rc = kms_histogram_family_new("p11kms_token_call_seconds",
                                      "Time spent in token calls, by PKCS#11 function", "function",
                                      kms_hsm_call_names, NULL, 0, &st->token_calls);
    if (rc == KMS_OK)
        rc = kms_metrics_add_histogram(st->registry, st->token_calls);
    if (rc == KMS_OK)
        rc = kms_histogram_family_new("p11kms_database_transaction_seconds",
                                      "Database transactions, from begin to commit or rollback, by "
                                      "kind",
                                      "kind", tx_kinds, NULL, 0, &st->db_tx);
    if (rc == KMS_OK)
        rc = kms_metrics_add_histogram(st->registry, st->db_tx);
    if (rc == KMS_OK)
        rc = kms_counter_family_new("p11kms_database_failures_total",
                                    "Database transactions the database failed (could not begin "
                                    "or commit, or failed a statement), by kind",
                                    "kind", tx_kinds, NULL, NULL, &st->db_failures);
    if (rc == KMS_OK)
        rc = kms_metrics_add_counter(st->registry, st->db_failures);
    if (rc == KMS_OK)
        rc = kms_counter_family_new("p11kms_audit_write_failures_total",
                                    "Audit lines that could not be written (each such request "
                                    "failed closed)",
                                    NULL, NULL, NULL, NULL, &st->audit_failures);
    if (rc == KMS_OK)
        rc = kms_metrics_add_counter(st->registry, st->audit_failures);
    if (rc == KMS_OK)
        rc = kms_histogram_family_new("p11kms_audit_flush_seconds",
                                      "The audit log's group commit: each fdatasync, from call to "
                                      "return (answers wait for it)",
                                      NULL, NULL, NULL, 0, &st->audit_flushes);
    if (rc == KMS_OK)
        rc = kms_metrics_add_histogram(st->registry, st->audit_flushes);
    if (rc == KMS_OK)
        rc = kms_counter_family_new("p11kms_decrypt_breaker_trips_total",
                                    "Decryption breakers opened (that many decryptions failed "
                                    "within the window), by kind",
                                    "kind", breaker_kinds, NULL, NULL, &st->breaker_trips);
    if (rc == KMS_OK)
        rc = kms_metrics_add_counter(st->registry, st->breaker_trips);
    if (rc == KMS_OK)
        rc = kms_counter_family_new("p11kms_decrypt_breaker_refused_total",
                                    "Decrypt and ReEncrypt requests refused by a principal's open "
                                    "decryption breaker",
                                    NULL, NULL, NULL, NULL, &st->breaker_refused);
    if (rc == KMS_OK)
        rc = kms_metrics_add_counter(st->registry, st->breaker_refused);
    if (rc == KMS_OK)
        rc = kms_metrics_add_collector(st->registry, collect, srv);
    if (rc == KMS_OK) {
        kms_hsm_observe(srv->hsm, observe_token, st);
        kms_store_observe(srv->store, observe_database, st);
        if (srv->audit)
            kms_audit_observe(srv->audit, observe_audit_flush, st);
    }
    return rc;
}

void kms_stats_free(struct kms_server *srv)
{
    struct kms_stats *st = srv->stats;
    if (!st)
        return;
    if (srv->hsm)
        kms_hsm_observe(srv->hsm, NULL, NULL);
    if (srv->store)
        kms_store_observe(srv->store, NULL, NULL);
    /* The audit log, closed before (its committer joined), tells nobody any more. */
    kms_metrics_free(st->registry); /* and the families added to it */
    free(st);
    srv->stats = NULL;
}

void kms_stats_request(struct kms_server *srv, const struct kms_op *op, kms_err outcome,
                       int64_t started_ns)
{
    struct kms_stats *st = srv->stats;
    if (!st)
        return;
    size_t i = op ? kms_op_index(op) : KMS_OP_COUNT;
    int64_t ns = kms_monotonic_ns() - started_ns;
    kms_counter_add(st->requests, i, (size_t)outcome, 1);
    kms_histogram_observe_ns(st->latency, i, ns > 0 ? (uint64_t)ns : 0);
}

void kms_stats_throttled(struct kms_server *srv, enum kms_op_class cls)
{
    if (srv->stats)
        kms_counter_add(srv->stats->throttled, (size_t)cls, 0, 1);
}

void kms_stats_breaker_trip(struct kms_server *srv, int kind)
{
    if (srv->stats)
        kms_counter_add(srv->stats->breaker_trips, (size_t)kind, 0, 1);
}

void kms_stats_breaker_refusal(struct kms_server *srv)
{
    if (srv->stats)
        kms_counter_add(srv->stats->breaker_refused, 0, 0, 1);
}

void kms_stats_audit_failure(struct kms_server *srv)
{
    if (srv->stats)
        kms_counter_add(srv->stats->audit_failures, 0, 0, 1);
}

kms_err kms_stats_render(struct kms_server *srv, struct kms_buf *out)
{
    KMS_ENSURE(srv->stats != NULL, KMS_ERR_INTERNAL, "no metrics");
    return kms_metrics_render(srv->stats->registry, out);
}
