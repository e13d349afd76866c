/*
 * The libmicrohttpd front end: one request state per connection request,
 * the body read into a capped buffer, SigV4 checked, the operation picked by
 * X-Amz-Target, the answer written as AWS's JSON 1.1 protocol writes it.
 */
#include "config.h"

#include <microhttpd.h>
#include <netdb.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "common/digest.h"
#include "common/encoding.h"
#include "common/json_alloc.h"
#include "common/log.h"
#include "common/metrics.h"
#include "common/random.h"
#include "server/breaker.h"
#include "server/addrlimit.h"
#include "server/pool.h"
#include "server/ratelimit.h"
#include "server/server.h"
#include "server/audit.h"
#include "server/stats.h"
#include "server/tls.h"

#define JSON_TYPE "application/x-amz-json-1.1"
#define TARGET_PREFIX "TrentService."

/*
 * A request that uses the token: run here while the token is prompt (an
 * inline slot of pool.h), else by the worker pool with its connection
 * suspended, so that a slow or hung token holds no more HTTP threads than
 * the inline slots and every request given to a worker is answered by
 * request_timeout_ms. Requests served from the index always run here.
 */
struct job {
    struct kms_task task;
    pthread_mutex_t lock;
    int refs;
    struct kms_server *srv;
    struct MHD_Connection *c;
    const struct kms_op *op;
    char principal[KMS_PRINCIPAL_MAX + 1];
    char request_id[KMS_UUID_TEXT_LEN + 1];
    char source[64];
    struct kms_request r; /* principal points to the above */
    kms_err rc;           /* the operation's outcome, on the worker */
    char message[512];    /* its message: kms_err_message() is per thread */
    int64_t started_ns;   /* CLOCK_MONOTONIC */
    uint64_t ticket;      /* the request's audit line, by the thread that ran it (0: none) */
    /* The answer, set once; the connection is resumed when it is suspended. */
    int answered, suspended;
    unsigned status;
    kms_err error;
    struct kms_buf body;
    uint64_t answer_ticket; /* the audit line the answer waits for (0: none) */
};

/*
 * An answer parked until its audit line is on disk (group commit,
 * kms_audit_wait): the connection is suspended, and the log's committer
 * resumes it once it knows.
 */
struct parked {
    struct kms_audit_wait wait;
    struct MHD_Connection *c;
    const struct kms_op *op; /* for the request's metrics, counted when it is answered */
    int64_t started_ns;
    unsigned status, retry_after_s;
    kms_err error;
    struct kms_buf body;
    /* For its log line (log_requests). */
    char principal[KMS_PRINCIPAL_MAX + 1];
    char key[KMS_ARN_MAX];
    int waiting; /* suspended for it */
    int durable; /* atomic, set by the committer: 1 on disk, 0 its flush failed */
};

struct req_state {
    struct kms_buf body;
    int too_large;
    char client_cert[65]; /* the connection's client certificate fingerprint, or "" */
    char request_id[KMS_UUID_TEXT_LEN + 1];
    char source[64];      /* client address, "ip:port" */
    struct kms_addr addr; /* the client address as failed authentications are counted */
    struct job *job;      /* while a worker has the request, and until its answer is sent */
    struct parked park;
};

/* Response bodies may hold plaintext: cleansed when MHD lets go of them. */
static void free_body(void *cls)
{
    struct kms_buf *b = cls;
    kms_buf_free(b);
    free(b);
}

/* A fresh request id (uuid text): unique, not secret. */
static void new_request_id(char out[KMS_UUID_TEXT_LEN + 1])
{
    uint8_t id[KMS_UUID_LEN];
    if (kms_random_public(id, sizeof id) == KMS_OK) {
        kms_uuid_mark(id);
        kms_uuid_format(id, out);
    } else {
        snprintf(out, KMS_UUID_TEXT_LEN + 1, "00000000-0000-0000-0000-000000000000");
    }
}

/* What an answer carries besides its status and body. */
struct answer_opts {
    unsigned retry_after_s; /* with ThrottlingException */
    int close;              /* Connection: close (the request's framing is in doubt) */
    int bearer;             /* WWW-Authenticate: Bearer (GET /metrics without its token) */
};

/* request_id: the id the audit log has for this request; NULL for a fresh one. */
static enum MHD_Result send_buf(struct kms_server *srv, struct MHD_Connection *c, unsigned status,
                                struct kms_buf *body, const char *content_type, kms_err e,
                                const struct answer_opts *o, const char *request_id)
{
    static const struct answer_opts none = {0, 0, 0};
    struct kms_buf *owned = malloc(sizeof *owned);
    struct MHD_Response *resp;
    char fresh[KMS_UUID_TEXT_LEN + 1];
    enum MHD_Result ret;

    if (!owned) {
        kms_buf_free(body);
        return MHD_NO;
    }
    *owned = *body;
    *body = (struct kms_buf)KMS_BUF_INIT;
    resp = MHD_create_response_from_buffer_with_free_callback_cls(owned->len, owned->data,
                                                                  free_body, owned);
    if (!resp) {
        free_body(owned);
        return MHD_NO;
    }
    if (!request_id) {
        new_request_id(fresh);
        request_id = fresh;
    }
    MHD_add_response_header(resp, "Content-Type", content_type);
    MHD_add_response_header(resp, "x-amzn-RequestId", request_id);
    if (e != KMS_OK)
        MHD_add_response_header(resp, "X-Amzn-ErrorType", kms_err_type(e));
    if (!o)
        o = &none;
    if (e == KMS_ERR_THROTTLED) {
        char retry[16];
        snprintf(retry, sizeof retry, "%u", o->retry_after_s ? o->retry_after_s : 1);
        MHD_add_response_header(resp, "Retry-After", retry);
    }
    if (o->bearer)
        MHD_add_response_header(resp, "WWW-Authenticate", "Bearer realm=\"p11kms metrics\"");
    if (srv->draining || o->close)
        MHD_add_response_header(resp, "Connection", "close");
    ret = MHD_queue_response(c, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

/* An AWS JSON error body for e with message. */
static kms_err error_body(kms_err e, const char *message, struct kms_buf *out)
{
    json_t *j = json_pack("{s:s, s:s}", "__type", kms_err_type(e), "message", message);
    KMS_ENSURE(j != NULL, KMS_ERR_INTERNAL, "out of memory");
    kms_err rc = kms_json_dump(j, 0, out);
    json_decref(j);
    return rc;
}

/* An error answer with a status of its own (not kms_err_status(e)) and options. */
static enum MHD_Result send_error_as(struct kms_server *srv, struct MHD_Connection *c, kms_err e,
                                     unsigned status, const struct answer_opts *o,
                                     const char *request_id)
{
    struct kms_buf body = KMS_BUF_INIT;
    if (error_body(e, kms_err_message(), &body) != KMS_OK) {
        kms_buf_free(&body);
        return MHD_NO;
    }
    return send_buf(srv, c, status, &body, JSON_TYPE, e, o, request_id);
}

static enum MHD_Result send_error(struct kms_server *srv, struct MHD_Connection *c, kms_err e,
                                  unsigned retry_after_s, const char *request_id)
{
    struct answer_opts o = {retry_after_s, 0, 0};
    return send_error_as(srv, c, e, kms_err_status(e), &o, request_id);
}

static enum MHD_Result send_text(struct kms_server *srv, struct MHD_Connection *c, unsigned status,
                                 const char *content_type, struct kms_buf *body)
{
    return send_buf(srv, c, status, body, content_type, KMS_OK, NULL, NULL);
}

static enum MHD_Result serve_get(struct kms_server *srv, struct MHD_Connection *c, const char *url)
{
    struct kms_buf body = KMS_BUF_INIT;
    unsigned status = 200;
    const char *type = "text/plain";
    kms_err rc;

    if (strcmp(url, "/healthz") == 0) {
        rc = kms_buf_append_str(&body, "ok\n");
    } else if (strcmp(url, "/readyz") == 0) {
        int ready = !srv->draining && kms_hsm_ready(srv->hsm);
        status = ready ? 200 : 503;
        rc = kms_buf_append_str(&body, ready           ? "ready\n"
                                       : srv->draining ? "shutting down\n"
                                                       : "token not ready\n");
    } else {
        type = KMS_METRICS_CONTENT_TYPE;
        rc = kms_stats_render(srv, &body);
    }
    if (rc != KMS_OK) {
        kms_buf_free(&body);
        return MHD_NO;
    }
    return send_text(srv, c, status, type, &body);
}

static kms_err parse_body(const struct kms_buf *body, json_t **out)
{
    json_error_t jerr;
    if (body->len == 0) {
        *out = json_object();
        KMS_ENSURE(*out != NULL, KMS_ERR_INTERNAL, "out of memory");
        return KMS_OK;
    }
    *out = json_loadb((const char *)body->data, body->len, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY,
                      &jerr);
    KMS_ENSURE(*out != NULL, KMS_ERR_SERIALIZATION, "The request body is not valid JSON");
    if (!json_is_object(*out)) {
        json_decref(*out);
        *out = NULL;
        return KMS_FAIL(KMS_ERR_SERIALIZATION, "The request body must be a JSON object");
    }
    return KMS_OK;
}

struct framing {
    unsigned lengths, encodings;
    int bad_length;   /* a Content-Length that is not a plain decimal number */
    int bad_encoding; /* a Transfer-Encoding other than "chunked" alone */
};

static enum MHD_Result count_framing(void *cls, enum MHD_ValueKind kind, const char *key,
                                     const char *value)
{
    struct framing *f = cls;
    (void)kind;
    if (strcasecmp(key, "Content-Length") == 0) {
        f->lengths++;
        size_t n = value ? strlen(value) : 0;
        if (n == 0 || n > 19 || strspn(value, "0123456789") != n)
            f->bad_length = 1;
    } else if (strcasecmp(key, "Transfer-Encoding") == 0) {
        f->encodings++;
        if (!value || strcasecmp(value, "chunked") != 0)
            f->bad_encoding = 1;
    }
    return MHD_YES;
}

/*
 * NULL when the request's body is framed one way only; else why not. With
 * two Content-Lengths (even equal), a Content-Length beside Transfer-Encoding
 * or a Transfer-Encoding other than chunked alone (libmicrohttpd would read
 * such a body up to the connection's end), libmicrohttpd and a proxy in front
 * may each find another end of the body, and what one takes for the body the
 * other takes for a next request (request smuggling; RFC 9112 sections 6.1
 * and 6.3). Such a request is answered 400 and its connection closed.
 * libmicrohttpd itself answers a Content-Length that is not a number, and a
 * malformed chunk size, with its own 400 page and closes; the check of the
 * number here is for a libmicrohttpd that would not.
 */
static const char *framing_error(struct MHD_Connection *c)
{
    struct framing f = {0, 0, 0, 0};
    MHD_get_connection_values(c, MHD_HEADER_KIND, count_framing, &f);
    if (f.lengths && f.encodings)
        return "The request has both Content-Length and Transfer-Encoding";
    if (f.lengths > 1)
        return "The request has more than one Content-Length header";
    if (f.encodings > 1)
        return "The request has more than one Transfer-Encoding header";
    if (f.bad_length)
        return "The request's Content-Length is not a decimal number";
    if (f.bad_encoding)
        return "The request's Transfer-Encoding is not chunked";
    return NULL;
}

/* The AWS JSON types, alone or with parameters ("; charset=utf-8"). */
static int json_content_type(const char *type)
{
    static const char *const ok[] = {JSON_TYPE, "application/x-amz-json-1.0"};
    for (size_t i = 0; type && i < sizeof ok / sizeof ok[0]; i++) {
        size_t n = strlen(ok[i]);
        if (strncasecmp(type, ok[i], n) == 0 &&
            (type[n] == '\0' || type[n] == ';' || type[n] == ' '))
            return 1;
    }
    return 0;
}

static kms_err pick_operation(struct MHD_Connection *c, const struct kms_op **op)
{
    const char *target = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Amz-Target");
    const char *type = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Type");
    KMS_ENSURE(target != NULL, KMS_ERR_UNKNOWN_OPERATION,
               "The request names no operation (X-Amz-Target)");
    KMS_ENSURE(strncmp(target, TARGET_PREFIX, sizeof TARGET_PREFIX - 1) == 0,
               KMS_ERR_UNKNOWN_OPERATION, "Unknown operation %.128s", target);
    *op = kms_op_lookup(target + sizeof TARGET_PREFIX - 1);
    KMS_ENSURE(*op != NULL, KMS_ERR_UNKNOWN_OPERATION, "Unknown operation %.128s", target);
    KMS_ENSURE(json_content_type(type), KMS_ERR_SERIALIZATION, "Content-Type must be " JSON_TYPE);
    return KMS_OK;
}

/* A principal bound to a client certificate must have come with that one. */
static kms_err check_binding(struct kms_server *srv, const char *principal, const char *fingerprint)
{
    for (size_t i = 0; i < srv->cfg.nbindings; i++)
        if (strcmp(srv->cfg.bindings[i].principal, principal) == 0)
            KMS_ENSURE(strcmp(srv->cfg.bindings[i].fingerprint, fingerprint) == 0,
                       KMS_ERR_ACCESS_DENIED,
                       "%s must connect with the client certificate bound to it", principal);
    return KMS_OK;
}

/* Takes the request's cost from its principal's and the global buckets. */
static kms_err admit(struct kms_server *srv, const struct kms_op *op, const char *principal,
                     unsigned *retry_after_s)
{
    enum kms_op_class cls;
    double cost;
    uint32_t retry_ms = 0;
    kms_ratelimit_classify(op->name, &cls, &cost);
    if (kms_ratelimit_take(srv->limits, principal, cls, cost, kms_monotonic_ns(), &retry_ms))
        return KMS_OK;
    *retry_after_s = (retry_ms + 999) / 1000;
    kms_stats_throttled(srv, cls);
    return KMS_FAIL(KMS_ERR_THROTTLED, "Rate exceeded");
}

/* ---- the decryption breaker (breaker.h) --------------------------------------- */

static int decrypting(const struct kms_op *op)
{
    return strcmp(op->name, "Decrypt") == 0 || strcmp(op->name, "ReEncrypt") == 0;
}

/* The wall-clock time left_ns from now, as the audit log writes times. */
static void time_after(int64_t left_ns, char out[KMS_AUDIT_TIME_LEN + 1])
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    int64_t ns = (int64_t)t.tv_nsec + left_ns % 1000000000;
    kms_audit_format_time(t.tv_sec + left_ns / 1000000000 + ns / 1000000000, ns % 1000000000, out);
}

/*
 * A principal whose decryptions kept failing gets no Decrypt or ReEncrypt
 * answer until its breaker closes: ThrottlingException, with Retry-After.
 */
static kms_err check_breaker(struct kms_server *srv, const struct kms_op *op, struct kms_request *r,
                             unsigned *retry_after_s)
{
    int64_t now = kms_monotonic_ns(), until = 0;
    char when[KMS_AUDIT_TIME_LEN + 1];

    if (!decrypting(op) ||
        !kms_breaker_is_open(srv->breaker, KMS_BREAKER_PRINCIPAL, r->principal, now, &until))
        return KMS_OK;
    const struct kms_breaker_config *cfg = kms_breaker_config(srv->breaker);
    time_after(until - now, when);
    *retry_after_s = (unsigned)((until - now + 999999999) / 1000000000);
    snprintf(r->decision, sizeof r->decision, "decryption suspended until %s", when);
    kms_stats_breaker_refusal(srv);
    return KMS_FAIL(KMS_ERR_THROTTLED,
                    "Decryption is suspended for %s until %s: %u decryptions failed within %u s "
                    "(InvalidCiphertextException or IncorrectKeyException)",
                    r->principal, when, cfg->failures, cfg->window_s);
}

/* A breaker opened: the alert, on stderr and syslog, in the audit log and in /metrics. */
static void breaker_alert(struct kms_server *srv, enum kms_breaker_kind kind, const char *name,
                          int64_t left_ns)
{
    const struct kms_breaker_config *cfg = kms_breaker_config(srv->breaker);
    const char *kind_name = kind == KMS_BREAKER_PRINCIPAL ? "principal" : "key";
    char until[KMS_AUDIT_TIME_LEN + 1];

    time_after(left_ns, until);
    kms_log_alert("decryption breaker opened for %s %s: %u decryptions failed within %u s; %s "
                  "until %s",
                  kind_name, name, cfg->failures, cfg->window_s,
                  kind == KMS_BREAKER_PRINCIPAL ? "its Decrypt and ReEncrypt calls are refused"
                                                : "the key is still served (alert only)",
                  until);
    kms_stats_breaker_trip(srv, kind);
    if (!srv->audit)
        return;
    struct kms_audit_alert al = {"decrypt_breaker", kind_name,       name, cfg->failures,
                                 cfg->window_s,     cfg->cooldown_s, until};
    if (kms_audit_alert(srv->audit, &al) != KMS_OK) {
        kms_stats_audit_failure(srv);
        kms_error("audit log: the breaker's alert could not be written: %s", kms_err_message());
        kms_err_clear();
    }
}

/*
 * Counts a decryption that failed as the caller's fault: against the
 * principal, and for Decrypt against the key the blob names when it exists
 * and its policy allowed the caller (ReEncrypt's r->key_arn may name its
 * destination key by then). A blob whose key the caller may not use gets
 * the same InvalidCiphertextException and counts against the principal the
 * same way (otherwise the breaker would tell such a key from an unknown
 * one). Other failures (throttling, a token or database fault) are not the
 * blob's doing and do not count.
 */
static void note_decryption(struct kms_server *srv, const struct kms_op *op,
                            const struct kms_request *r, kms_err rc)
{
    int64_t now = kms_monotonic_ns(), until = 0;
    if (!decrypting(op) || (rc != KMS_ERR_INVALID_CIPHERTEXT && rc != KMS_ERR_INCORRECT_KEY))
        return;
    if (kms_breaker_fail(srv->breaker, KMS_BREAKER_PRINCIPAL, r->principal, now, &until))
        breaker_alert(srv, KMS_BREAKER_PRINCIPAL, r->principal, until - now);
    /*
     * Against the key only when its policy allowed the caller: made-up blobs naming a key
     * the caller may not use say nothing about that key (and must not raise its alarm).
     */
    if (strcmp(op->name, "Decrypt") == 0 && r->key_arn[0] &&
        strncmp(r->decision, "allow", 5) == 0 &&
        kms_breaker_fail(srv->breaker, KMS_BREAKER_KEY, r->key_arn, now, &until))
        breaker_alert(srv, KMS_BREAKER_KEY, r->key_arn, until - now);
}

/* A server-side failure, with its message; every answer has its line with log_requests. */
static void log_outcome(const char *op, const char *principal, kms_err rc, const char *message)
{
    if (rc != KMS_OK && kms_err_status(rc) >= 500)
        kms_error("%s by %s failed: %s", op, *principal ? principal : "-", message);
}

/*
 * An answer leaves: counted in the request metrics and, with log_requests,
 * given its line (what was asked, by whom, and how it went).
 */
static void count_answer(struct kms_server *srv, const char *request_id, const char *principal,
                         const struct kms_op *op, const char *key, unsigned status, kms_err e,
                         int64_t started)
{
    kms_stats_request(srv, op, e, started);
    if (!srv->cfg.log_requests)
        return;
    struct kms_log_request r = {
        request_id,
        principal,
        op ? op->name : NULL,
        key,
        status,
        e == KMS_OK ? NULL : kms_err_type(e),
        (kms_monotonic_ns() - started) / 1000,
    };
    kms_log_request(&r);
}

/* ---- requests run by a worker ----------------------------------------------- */

/*
 * One audit line per request. KMS_ERR_INTERNAL when it could not be written:
 * the request then fails closed. A failing log is reported once, not per line.
 */
static kms_err audit(struct kms_server *srv, const struct kms_request *r, const char *request_id,
                     const char *source, const struct kms_op *op, kms_err outcome, int64_t started,
                     uint64_t *ticket)
{
    static volatile int failing;
    if (ticket)
        *ticket = 0;
    if (!srv->audit)
        return KMS_OK;
    int64_t us = (kms_monotonic_ns() - started) / 1000;
    struct kms_audit_record rec = {
        request_id,
        r && r->principal ? r->principal : "",
        source,
        op ? op->name : "none",
        r && r->key_arn[0] ? r->key_arn : NULL,
        r ? r->key_version : 0,
        r && r->context.len ? &r->context : NULL,
        outcome == KMS_OK ? "ok" : kms_err_type(outcome),
        r && r->decision[0] ? r->decision : NULL,
        us > 0 ? (uint64_t)us : 0,
        0,
    };
    if (kms_audit_write(srv->audit, &rec, ticket) == KMS_OK) {
        if (failing) {
            failing = 0;
            kms_info("audit log: written again; requests are served");
        }
        return KMS_OK;
    }
    kms_stats_audit_failure(srv);
    if (!failing) {
        failing = 1;
        kms_error("audit log: %s; requests fail until it can be written", kms_err_message());
    }
    return KMS_FAIL(KMS_ERR_INTERNAL, "The request could not be audited");
}

static void job_release(struct job *j)
{
    pthread_mutex_lock(&j->lock);
    int last = --j->refs == 0;
    pthread_mutex_unlock(&j->lock);
    if (!last)
        return;
    json_decref(j->r.in);
    json_decref(j->r.out);
    kms_buf_free(&j->r.context);
    kms_buf_free(&j->body);
    OPENSSL_cleanse(j->message, sizeof j->message);
    pthread_mutex_destroy(&j->lock);
    free(j);
}

/* The request this worker thread runs: the changes it makes are audited under its id. */
static __thread const struct job *current_job;

kms_err kms_http_change_intent(void *arg, struct kms_change_event *e)
{
    struct kms_server *srv = arg;
    const struct job *j = e->automatic ? NULL : current_job;
    uint8_t id[KMS_UUID_LEN];
    if (j) {
        snprintf(e->request_id, sizeof e->request_id, "%s", j->request_id);
    } else {
        KMS_GUARD(kms_uuid_new(id));
        kms_uuid_format(id, e->request_id);
    }
    if (!srv->audit)
        return KMS_OK;
    struct kms_audit_change c = {
        .request_id = e->request_id,
        .operation = e->operation,
        .principal = j ? j->principal : "",
        .source = j ? j->source : "p11kmsd",
        .key_arn = e->key_arn[0] ? e->key_arn : NULL,
        .alias = e->alias,
    };
    kms_err rc = kms_audit_intent(srv->audit, &c);
    if (rc != KMS_OK)
        kms_stats_audit_failure(srv);
    return rc;
}

void kms_http_change_outcome(void *arg, const struct kms_change_event *e, int result)
{
    struct kms_server *srv = arg;
    if (srv->audit)
        kms_audit_outcome(srv->audit, e->request_id,
                          result == KMS_CHANGE_COMMITTED       ? KMS_AUDIT_COMMITTED
                          : result == KMS_CHANGE_NOT_COMMITTED ? KMS_AUDIT_NOT_COMMITTED
                                                               : KMS_AUDIT_UNKNOWN);
}

static void job_run(struct kms_task *t)
{
    struct job *j = (struct job *)t;
    kms_err_clear();
    current_job = j;
    j->rc = j->op->fn(&j->r);
    current_job = NULL;
    snprintf(j->message, sizeof j->message, "%s", j->rc == KMS_OK ? "" : kms_err_message());
    note_decryption(j->srv, j->op, &j->r, j->rc);
    log_outcome(j->op->name, j->principal, j->rc, j->message);
    if (audit(j->srv, &j->r, j->request_id, j->source, j->op, j->rc, j->started_ns, &j->ticket) !=
            KMS_OK &&
        j->rc == KMS_OK) {
        /* Fail closed: no answer (no plaintext) leaves without its audit line. */
        j->rc = KMS_ERR_INTERNAL;
        snprintf(j->message, sizeof j->message, "%s", kms_err_message());
        json_decref(j->r.out);
        j->r.out = NULL;
    }
}

/*
 * Sets the answer (once) and resumes the connection when it waits for it;
 * ticket: the audit line it waits for.
 */
static void job_answer(struct job *j, unsigned status, kms_err e, struct kms_buf *body,
                       uint64_t ticket)
{
    pthread_mutex_lock(&j->lock);
    if (!j->answered) {
        j->answered = 1;
        j->status = status;
        j->error = e;
        j->answer_ticket = ticket;
        j->body = *body;
        *body = (struct kms_buf)KMS_BUF_INIT;
        if (j->suspended)
            MHD_resume_connection(j->c);
    }
    pthread_mutex_unlock(&j->lock);
    kms_buf_free(body);
}

static void job_answer_error(struct job *j, kms_err e, const char *message, uint64_t ticket)
{
    struct kms_buf body = KMS_BUF_INIT;
    if (error_body(e, message, &body) != KMS_OK) {
        kms_buf_free(&body);
        e = KMS_ERR_INTERNAL;
    }
    job_answer(j, kms_err_status(e), e, &body, ticket);
}

static void task_answer(struct kms_task *t, int expired)
{
    struct job *j = (struct job *)t;
    struct kms_buf body = KMS_BUF_INIT;
    if (expired) {
        char message[128];
        snprintf(message, sizeof message, "The key store did not answer within %u ms",
                 j->srv->cfg.request_timeout_ms);
        kms_error("%s by %s: %s", j->op->name, j->principal, message);
        /* Not the request's own fields: its worker may still be filling them in. */
        struct kms_request bare = {0};
        uint64_t ticket;
        bare.principal = j->principal;
        if (audit(j->srv, &bare, j->request_id, j->source, j->op, KMS_ERR_DEPENDENCY_TIMEOUT,
                  j->started_ns, &ticket) != KMS_OK)
            kms_err_clear();
        job_answer_error(j, KMS_ERR_DEPENDENCY_TIMEOUT, message, ticket);
        return;
    }
    if (j->rc != KMS_OK) {
        job_answer_error(j, j->rc, j->message, j->ticket);
        return;
    }
    if (j->r.out && kms_json_dump(j->r.out, 0, &body) != KMS_OK) {
        kms_buf_free(&body);
        job_answer_error(j, KMS_ERR_INTERNAL, "The answer could not be encoded", j->ticket);
        return;
    }
    json_decref(j->r.out); /* may hold plaintext: the cleansing allocator wipes it */
    j->r.out = NULL;
    job_answer(j, 200, KMS_OK, &body, j->ticket);
}

static void task_release(struct kms_task *t)
{
    job_release((struct job *)t);
}

/*
 * How long a request may take: request_timeout_ms, or keygen_timeout_ms for
 * one that makes an RSA key (CreateKey with an RSA KeySpec in the token,
 * GenerateDataKeyPair with an RSA KeyPairSpec in the process): RSA key
 * generation takes seconds, and a CreateKey answered 503 while its key is
 * made anyway would leave the caller a key it never heard of.
 */
static unsigned job_timeout_ms(const struct kms_server *srv, const struct kms_op *op, json_t *in)
{
    const char *member = strcmp(op->name, "CreateKey") == 0                  ? "KeySpec"
                         : strncmp(op->name, "GenerateDataKeyPair", 19) == 0 ? "KeyPairSpec"
                                                                             : NULL;
    unsigned ms = srv->cfg.request_timeout_ms;
    if (!member)
        return ms;
    const char *spec = json_string_value(json_object_get(in, member));
    if (!spec && strcmp(member, "KeySpec") == 0)
        spec = json_string_value(json_object_get(in, "CustomerMasterKeySpec"));
    if (spec && strncmp(spec, "RSA_", 4) == 0 && srv->cfg.keygen_timeout_ms > ms)
        ms = srv->cfg.keygen_timeout_ms;
    return ms;
}
/* The request as a job: one reference, the caller's. */
static struct job *new_job(struct kms_server *srv, struct MHD_Connection *c,
                           const struct req_state *st, const struct kms_op *op,
                           const char *principal, json_t *in, int64_t started)
{
    struct job *j = calloc(1, sizeof *j);
    if (!j)
        return NULL;
    pthread_mutex_init(&j->lock, NULL);
    j->refs = 1;
    j->srv = srv;
    j->c = c;
    j->op = op;
    snprintf(j->principal, sizeof j->principal, "%s", principal);
    memcpy(j->request_id, st->request_id, sizeof j->request_id);
    memcpy(j->source, st->source, sizeof j->source);
    j->r.srv = srv;
    j->r.principal = j->principal;
    j->r.in = in;
    j->started_ns = started;
    j->task.run = job_run;
    j->task.answer = task_answer;
    j->task.release = task_release;
    j->task.deadline_ns = started + (int64_t)job_timeout_ms(srv, op, in) * 1000000;
    return j;
}

/* ---- answers wait for their audit line to be on disk ------------------------ */

/* The committer's word on a parked answer: the connection goes on (send_parked). */
static void parked_done(struct kms_audit_wait *w, int durable)
{
    struct parked *p = (struct parked *)((char *)w - offsetof(struct parked, wait));
    __atomic_store_n(&p->durable, durable, __ATOMIC_RELEASE);
    MHD_resume_connection(p->c);
}

/*
 * The parked answer leaves, or its connection ends first: it is no longer
 * parked, and it is counted. When its line could not be written or flushed,
 * a success fails closed (500, no data); an error goes as it is: it gives
 * nothing away. Returns 1 when the answer may go as it is.
 */
static int unpark(struct kms_server *srv, struct req_state *st)
{
    struct parked *p = &st->park;
    int durable = __atomic_load_n(&p->durable, __ATOMIC_ACQUIRE);
    int as_is = durable || p->error != KMS_OK;
    if (p->waiting)
        __atomic_sub_fetch(&srv->parked, 1, __ATOMIC_RELEASE);
    p->waiting = 0;
    if (!durable)
        kms_stats_audit_failure(srv);
    count_answer(srv, st->request_id, p->principal, p->op, p->key, as_is ? p->status : 500,
                 as_is ? p->error : KMS_ERR_INTERNAL, p->started_ns);
    return as_is;
}

/* Sends the parked answer, or fails it closed (unpark). */
static enum MHD_Result send_parked(struct kms_server *srv, struct MHD_Connection *c,
                                   struct req_state *st)
{
    struct parked *p = &st->park;
    struct answer_opts o = {p->retry_after_s, 0, 0};
    if (!unpark(srv, st)) {
        kms_buf_free(&p->body); /* may hold plaintext */
        kms_err_clear();
        return send_error(srv, c, KMS_FAIL(KMS_ERR_INTERNAL, "The request could not be audited"), 0,
                          st->request_id);
    }
    return send_buf(srv, c, p->status, &p->body, JSON_TYPE, p->error, &o, st->request_id);
}

/*
 * Sends a request's answer once its audit line (ticket; 0: none) is on disk:
 * until then it is parked with the connection suspended (one hand-off, to the
 * log's committer, shared by every answer its flush covers). Takes body.
 */
static enum MHD_Result deliver(struct kms_server *srv, struct MHD_Connection *c,
                               struct req_state *st, const struct kms_op *op,
                               const struct kms_request *r, int64_t started, uint64_t ticket,
                               unsigned status, kms_err e, struct kms_buf *body,
                               unsigned retry_after_s)
{
    struct parked *p = &st->park;
    kms_buf_free(&p->body);
    if (srv->cfg.log_requests) {
        snprintf(p->principal, sizeof p->principal, "%s", r->principal);
        snprintf(p->key, sizeof p->key, "%s", r->key_arn);
    }
    p->c = c;
    p->op = op;
    p->started_ns = started;
    p->status = status;
    p->retry_after_s = retry_after_s;
    p->error = e;
    p->body = *body;
    *body = (struct kms_buf)KMS_BUF_INIT;
    p->durable = 1;
    if (!ticket || !srv->audit)
        return send_parked(srv, c, st);
    /* Suspended before the committer can hear of it: its resume must come after. */
    __atomic_add_fetch(&srv->parked, 1, __ATOMIC_RELEASE);
    p->waiting = 1;
    p->wait.ticket = ticket;
    p->wait.done = parked_done;
    MHD_suspend_connection(c);
    int v = kms_audit_wait(srv->audit, &p->wait);
    if (v != 0) {
        __atomic_store_n(&p->durable, v > 0, __ATOMIC_RELEASE);
        MHD_resume_connection(c);
    }
    return MHD_YES;
}

/* A job's answer, once set, on its connection's thread. */
static enum MHD_Result deliver_job(struct kms_server *srv, struct MHD_Connection *c,
                                   struct req_state *st, struct job *j)
{
    enum MHD_Result ret = deliver(srv, c, st, j->op, &j->r, j->started_ns, j->answer_ticket,
                                  j->status, j->error, &j->body, 0);
    st->job = NULL;
    job_release(j);
    return ret;
}

/* Runs the request on this HTTP thread (inline slot `slot`) and sends its answer. */
static enum MHD_Result run_here(struct kms_server *srv, struct MHD_Connection *c,
                                struct req_state *st, struct job *j, unsigned slot)
{
    job_run(&j->task);
    kms_pool_inline_end(srv->pool, slot);
    task_answer(&j->task, 0);
    return deliver_job(srv, c, st, j);
}

/*
 * Serves a request that uses the token: here, while the token is prompt (no
 * thread hand-off), else by a worker with the connection suspended until its
 * answer, which the pool gives by the request's deadline whatever the token does.
 */
static enum MHD_Result hand_over(struct kms_server *srv, struct MHD_Connection *c,
                                 struct req_state *st, const struct kms_op *op,
                                 const char *principal, json_t *in, int64_t started)
{
    struct job *j = new_job(srv, c, st, op, principal, in, started);
    if (!j) {
        json_decref(in);
        return MHD_NO;
    }
    unsigned slot;
    if (!op->worker_only && kms_pool_inline_begin(srv->pool, &slot))
        return run_here(srv, c, st, j, slot);
    j->refs = 2; /* the connection's and the pool's */
    st->job = j;
    if (kms_pool_submit(srv->pool, &j->task) != KMS_OK) {
        j->refs = 1;
        char message[256];
        snprintf(message, sizeof message, "%s", kms_err_message());
        log_outcome(op->name, principal, KMS_ERR_DEPENDENCY_TIMEOUT, message);
        uint64_t ticket;
        if (audit(srv, &j->r, j->request_id, j->source, op, KMS_ERR_DEPENDENCY_TIMEOUT, started,
                  &ticket) != KMS_OK)
            kms_err_clear();
        job_answer_error(j, KMS_ERR_DEPENDENCY_TIMEOUT, message, ticket);
    }
    /* Suspended only while the answer is still to come (a worker may be done already). */
    pthread_mutex_lock(&j->lock);
    if (!j->answered) {
        MHD_suspend_connection(c);
        j->suspended = 1;
    }
    int answered = j->answered;
    pthread_mutex_unlock(&j->lock);
    if (answered)
        return deliver_job(srv, c, st, j);
    return MHD_YES;
}

/*
 * The caller's failure to authenticate, which counts against its address: not a
 * malformed request (too many headers) nor a fault of the server's own.
 */
static int authentication_failure(kms_err rc)
{
    return rc == KMS_ERR_MISSING_AUTH || rc == KMS_ERR_INCOMPLETE_SIGNATURE ||
           rc == KMS_ERR_INVALID_SIGNATURE || rc == KMS_ERR_UNRECOGNIZED_CLIENT ||
           rc == KMS_ERR_ACCESS_DENIED;
}

static enum MHD_Result serve_kms(struct kms_server *srv, struct MHD_Connection *c, const char *url,
                                 const char *method, struct req_state *st)
{
    char principal[KMS_PRINCIPAL_MAX + 1];
    struct kms_request r;
    const struct kms_op *op = NULL;
    int64_t started = kms_monotonic_ns();
    unsigned retry_after_s = 0;
    uint64_t ticket = 0;
    struct kms_buf body = KMS_BUF_INIT;
    enum MHD_Result ret;
    kms_err rc;

    memset(&r, 0, sizeof r);
    r.srv = srv;
    r.principal = principal;
    kms_err_clear();
    rc = kms_auth_verify(srv, c, method, url, &st->body, principal);
    int own_line = rc == KMS_OK || !authentication_failure(rc) ||
                   kms_addrlimit_fail(srv->addrlimit, &st->addr, kms_err_type(rc), started);
    if (rc == KMS_OK)
        rc = check_binding(srv, principal, st->client_cert);
    if (rc == KMS_OK)
        rc = pick_operation(c, &op);
    if (rc == KMS_OK)
        rc = admit(srv, op, principal, &retry_after_s);
    if (rc == KMS_OK)
        rc = check_breaker(srv, op, &r, &retry_after_s);
    if (rc == KMS_OK)
        rc = parse_body(&st->body, &r.in);
    if (rc == KMS_OK && !op->index_only) {
        kms_buf_free(&st->body);
        return hand_over(srv, c, st, op, principal, r.in, started);
    }
    if (rc == KMS_OK)
        rc = op->fn(&r);
    log_outcome(op ? op->name : "-", principal, rc, kms_err_message());
    if (rc != KMS_OK) {
        /* The error's message, kept across the audit write. */
        char message[512];
        snprintf(message, sizeof message, "%s", kms_err_message());
        /* A failed authentication not on a line of its own is in its address's next summary. */
        if (own_line &&
            audit(srv, &r, st->request_id, st->source, op, rc, started, &ticket) != KMS_OK)
            rc = KMS_ERR_INTERNAL;
        else
            KMS_FAIL(rc, "%s", message);
    } else {
        rc = audit(srv, &r, st->request_id, st->source, op, rc, started, &ticket);
    }
    kms_err dumped = rc != KMS_OK ? error_body(rc, kms_err_message(), &body)
                     : r.out      ? kms_json_dump(r.out, 0, &body)
                                  : KMS_OK;
    if (dumped != KMS_OK) {
        kms_buf_free(&body);
        ret = MHD_NO;
    } else {
        ret = deliver(srv, c, st, op, &r, started, ticket, rc == KMS_OK ? 200 : kms_err_status(rc),
                      rc, &body, retry_after_s);
    }
    json_decref(r.in);
    json_decref(r.out);
    kms_buf_free(&r.context);
    return ret;
}

static void request_done(struct kms_server *srv);

/* "ip:port" of the client, for the audit log. */
static void client_address(struct MHD_Connection *c, char *out, size_t n)
{
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    char host[NI_MAXHOST], port[NI_MAXSERV];
    snprintf(out, n, "-");
    if (!info || !info->client_addr)
        return;
    socklen_t len = info->client_addr->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                             : sizeof(struct sockaddr_in);
    if (getnameinfo(info->client_addr, len, host, sizeof host, port, sizeof port,
                    NI_NUMERICHOST | NI_NUMERICSERV) == 0)
        snprintf(out, n, strchr(host, ':') ? "[%s]:%s" : "%s:%s", host, port);
}

/* The client address as failed authentications are counted (addrlimit.h). */
static void client_key(struct MHD_Connection *c, struct kms_addr *out)
{
    const union MHD_ConnectionInfo *info =
        MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    kms_addr_from_sockaddr(info ? info->client_addr : NULL, out);
}

/* The audit line for an address's failed authentications since its last line. */
static void audit_summary(void *arg, const struct kms_addrlimit_summary *sum)
{
    struct kms_server *srv = arg;
    char id[KMS_UUID_TEXT_LEN + 1];
    if (!srv->audit)
        return;
    new_request_id(id);
    struct kms_audit_record rec = {
        id, "", sum->source, "none", NULL, 0, NULL, sum->outcome, NULL, 0, sum->count,
    };
    if (kms_audit_write(srv->audit, &rec, NULL) != KMS_OK) {
        kms_stats_audit_failure(srv);
        kms_error("audit log: the summary of %llu failed requests from %s: %s",
                  (unsigned long long)sum->count, sum->source, kms_err_message());
    }
}

/* A failed authentication before any operation: audited when it gets a line of its own. */
static void audit_failure(struct kms_server *srv, struct MHD_Connection *c,
                          const struct kms_addr *addr, kms_err e, const char *request_id)
{
    char source[64];
    int64_t now = kms_monotonic_ns();
    count_answer(srv, request_id, NULL, NULL, NULL, kms_err_status(e), e, now);
    if (!kms_addrlimit_fail(srv->addrlimit, addr, kms_err_type(e), now))
        return;
    client_address(c, source, sizeof source);
    if (audit(srv, NULL, request_id, source, NULL, e, now, NULL) != KMS_OK)
        kms_err_clear();
}

/* An address beyond its failed authentications, refused before any other work. */
static enum MHD_Result refuse_address(struct kms_server *srv, struct MHD_Connection *c,
                                      unsigned wait_s)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    int64_t now = kms_monotonic_ns();
    new_request_id(id);
    count_answer(srv, id, NULL, NULL, NULL, kms_err_status(KMS_ERR_THROTTLED), KMS_ERR_THROTTLED,
                 now);
    kms_err_clear();
    return send_error(srv, c,
                      KMS_FAIL(KMS_ERR_THROTTLED,
                               "Too many failed authentications from this address; its requests "
                               "are refused for %u more seconds",
                               wait_s),
                      wait_s, id);
}

/* "Bearer <token>" with the token of metrics_token_file, compared in constant time. */
static int metrics_token_ok(struct kms_server *srv, struct MHD_Connection *c)
{
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    uint8_t digest[32];
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return 0;
    h += 7;
    while (*h == ' ')
        h++;
    if (kms_sha256(h, strlen(h), digest) != KMS_OK)
        return 0;
    return CRYPTO_memcmp(digest, srv->metrics_token, sizeof digest) == 0;
}

/*
 * GET /metrics: with metrics_token_file, to a caller with its bearer token
 * (401 otherwise, counted as a failed authentication of the address); without
 * it, in --dev mode on a loopback listener only, and else never (403).
 */
static enum MHD_Result serve_metrics(struct kms_server *srv, struct MHD_Connection *c,
                                     const struct kms_addr *addr)
{
    kms_err_clear();
    if (srv->metrics_token_set) {
        if (metrics_token_ok(srv, c))
            return serve_get(srv, c, "/metrics");
        char id[KMS_UUID_TEXT_LEN + 1];
        new_request_id(id);
        audit_failure(srv, c, addr, KMS_ERR_ACCESS_DENIED, id);
        struct answer_opts o = {0, 0, 1};
        KMS_FAIL(KMS_ERR_ACCESS_DENIED,
                 "GET /metrics needs the bearer token of metrics_token_file");
        return send_error_as(srv, c, KMS_ERR_ACCESS_DENIED, 401, &o, id);
    }
    if (srv->cfg.metrics_open_loopback && kms_host_is_loopback(srv->host))
        return serve_get(srv, c, "/metrics");
    KMS_FAIL(KMS_ERR_ACCESS_DENIED, "GET /metrics is served only with metrics_token_file set");
    return send_error_as(srv, c, KMS_ERR_ACCESS_DENIED, 403, NULL, NULL);
}

/* 400 and the connection closed: see framing_error. */
static enum MHD_Result refuse_framing(struct kms_server *srv, struct MHD_Connection *c,
                                      const char *why)
{
    struct answer_opts o = {0, 1, 0};
    kms_err_clear();
    KMS_FAIL(KMS_ERR_VALIDATION, "%s", why);
    return send_error_as(srv, c, KMS_ERR_VALIDATION, 400, &o, NULL);
}

static enum MHD_Result too_large(struct kms_server *srv, struct MHD_Connection *c,
                                 struct req_state *st)
{
    int64_t now = kms_monotonic_ns();
    count_answer(srv, st->request_id, NULL, NULL, NULL, kms_err_status(KMS_ERR_TOO_LARGE),
                 KMS_ERR_TOO_LARGE, now);
    if (audit(srv, NULL, st->request_id, st->source, NULL, KMS_ERR_TOO_LARGE, now, NULL) != KMS_OK)
        kms_err_clear();
    return send_error(
        srv, c,
        KMS_FAIL(KMS_ERR_TOO_LARGE, "The request body is larger than %zu bytes", srv->cfg.max_body),
        0, st->request_id);
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    struct kms_server *srv = cls;
    struct req_state *st = *con_cls;
    (void)version;

    if (!st) {
        char fingerprint[65];
        struct kms_addr addr;
        const char *framing = framing_error(c);
        if (framing)
            return refuse_framing(srv, c, framing);
        int health = strcmp(method, "GET") == 0 &&
                     (strcmp(url, "/healthz") == 0 || strcmp(url, "/readyz") == 0);
        if (health)
            return serve_get(srv, c, url);
        client_key(c, &addr);
        unsigned wait_s = kms_addrlimit_check(srv->addrlimit, &addr, kms_monotonic_ns());
        if (wait_s)
            return refuse_address(srv, c, wait_s);
        /* Load balancers probe health without a client certificate; nothing else does. */
        kms_err_clear();
        if (kms_tls_client(srv->tls, c, fingerprint) != KMS_OK) {
            char id[KMS_UUID_TEXT_LEN + 1], message[128];
            snprintf(message, sizeof message, "%s", kms_err_message());
            new_request_id(id);
            audit_failure(srv, c, &addr, KMS_ERR_ACCESS_DENIED, id);
            KMS_FAIL(KMS_ERR_ACCESS_DENIED, "%s", message);
            return send_error(srv, c, KMS_ERR_ACCESS_DENIED, 0, id);
        }
        if (strcmp(method, "GET") == 0 && strcmp(url, "/metrics") == 0)
            return serve_metrics(srv, c, &addr);
        if (strcmp(method, "POST") != 0 || strcmp(url, "/") != 0) {
            kms_err_clear();
            return send_error(
                srv, c,
                KMS_FAIL(KMS_ERR_UNKNOWN_OPERATION,
                         "Only POST / and GET /healthz, /readyz, /metrics are served"),
                0, NULL);
        }
        pthread_mutex_lock(&srv->active_lock);
        int stopping = srv->stopping;
        if (!stopping)
            srv->active++;
        pthread_mutex_unlock(&srv->active_lock);
        if (stopping) {
            kms_err_clear();
            return send_error(srv, c,
                              KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT, "The server is shutting down"),
                              0, NULL);
        }
        st = calloc(1, sizeof *st);
        if (!st) {
            request_done(srv);
            return MHD_NO;
        }
        memcpy(st->client_cert, fingerprint, sizeof fingerprint);
        st->addr = addr;
        new_request_id(st->request_id);
        client_address(c, st->source, sizeof st->source);
        *con_cls = st;
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > srv->cfg.max_body) {
            st->too_large = 1;
            return too_large(srv, c, st);
        }
        return MHD_YES;
    }
    /* Resumed: the answer's audit line is on disk (or could not be flushed). */
    if (st->park.waiting)
        return send_parked(srv, c, st);
    /* Resumed: the worker's (or the watchdog's) answer is ready. */
    if (st->job)
        return deliver_job(srv, c, st, st->job);
    if (*upload_size) {
        if (!st->too_large && st->body.len + *upload_size <= srv->cfg.max_body) {
            if (kms_buf_append(&st->body, upload, *upload_size) != KMS_OK)
                return MHD_NO;
        } else {
            st->too_large = 1;
            kms_buf_free(&st->body);
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (st->too_large)
        return too_large(srv, c, st);
    return serve_kms(srv, c, url, method, st);
}

static void request_done(struct kms_server *srv)
{
    pthread_mutex_lock(&srv->active_lock);
    if (--srv->active == 0)
        pthread_cond_broadcast(&srv->active_done);
    pthread_mutex_unlock(&srv->active_lock);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    struct req_state *st = *con_cls;
    (void)c;
    (void)toe;
    if (!st)
        return;
    if (st->job)
        job_release(st->job);
    /* Resumed, and the client went away before its answer: counted all the same. */
    if (st->park.waiting)
        unpark(cls, st);
    kms_buf_free(&st->body);
    kms_buf_free(&st->park.body);
    free(st);
    *con_cls = NULL;
    request_done(cls);
}

/* Counts the connections open: libmicrohttpd tells of each one it took and of its close. */
static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode code)
{
    struct kms_server *srv = cls;
    (void)c;
    (void)socket_context;
    if (code == MHD_CONNECTION_NOTIFY_STARTED)
        __atomic_add_fetch(&srv->connections, 1, __ATOMIC_RELAXED);
    else if (code == MHD_CONNECTION_NOTIFY_CLOSED)
        __atomic_sub_fetch(&srv->connections, 1, __ATOMIC_RELAXED);
}

/* libmicrohttpd's own messages (a client that went away, ...) are for debugging only. */
static void mhd_log(void *cls, const char *fmt, va_list ap)
{
    char line[512];
    (void)cls;
    vsnprintf(line, sizeof line, fmt, ap);
    line[strcspn(line, "\n")] = '\0';
    kms_debug("libmicrohttpd: %s", line);
}

/* The SHA-256 of metrics_token_file's token: only the digest is kept. */
static kms_err load_metrics_token(struct kms_server *srv)
{
    if (!srv->cfg.metrics_token_file)
        return KMS_OK;
    kms_err rc = kms_read_metrics_token(srv->cfg.metrics_token_file, srv->metrics_token);
    srv->metrics_token_set = rc == KMS_OK;
    return rc;
}

static kms_err start_addrlimit(struct kms_server *srv)
{
    struct kms_addrlimit_config ac = {
        srv->cfg.auth_failures_per_minute / 60.0,
        srv->cfg.auth_failure_burst,
        srv->cfg.auth_failure_cooldown_s,
        srv->cfg.auth_failure_audit_interval_s,
        1000,
    };
    return kms_addrlimit_new(&ac, audit_summary, srv, &srv->addrlimit);
}

kms_err kms_http_start(struct kms_server *srv)
{
    struct addrinfo hints = {0}, *ai = NULL;
    char port_text[8];
    unsigned port;
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG |
                     MHD_USE_ITC | MHD_ALLOW_SUSPEND_RESUME;
    /* A call a quarter of the way to the deadline (at most 250 ms) is no token working normally. */
    unsigned stall_ms =
        srv->cfg.request_timeout_ms / 4 < 250 ? srv->cfg.request_timeout_ms / 4 : 250;
    struct kms_pool_config pc = {srv->cfg.workers, srv->cfg.queue_max, srv->cfg.inline_requests,
                                 stall_ms};

    KMS_GUARD(kms_parse_listen(srv->cfg.listen, srv->host, sizeof srv->host, &port));
    KMS_GUARD(load_metrics_token(srv));
    KMS_GUARD(start_addrlimit(srv));
    snprintf(port_text, sizeof port_text, "%u", port);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE;
    KMS_ENSURE(getaddrinfo(srv->host, port_text, &hints, &ai) == 0 && ai, KMS_ERR_VALIDATION,
               "cannot resolve listen address %s", srv->cfg.listen);
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    kms_err rc = kms_pool_start(&pc, &srv->pool);
    if (rc != KMS_OK) {
        freeaddrinfo(ai);
        return rc;
    }
    struct MHD_OptionItem tls[5];
    size_t ntls = 0;
    if (srv->tls) {
        flags |= MHD_USE_TLS;
        tls[ntls++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_CERT, 0, srv->tls->cert};
        tls[ntls++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_KEY, 0, srv->tls->key};
        tls[ntls++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_PRIORITIES, 0, srv->tls->priorities};
        if (srv->tls->ca && srv->tls->client_cert != KMS_CLIENT_CERT_NONE)
            tls[ntls++] = (struct MHD_OptionItem){MHD_OPTION_HTTPS_MEM_TRUST, 0, srv->tls->ca};
    }
    tls[ntls] = (struct MHD_OptionItem){MHD_OPTION_END, 0, NULL};
    srv->daemon = MHD_start_daemon(
        flags, (uint16_t)port, NULL, NULL, on_request, srv, MHD_OPTION_ARRAY, tls,
        MHD_OPTION_SOCK_ADDR, ai->ai_addr, MHD_OPTION_THREAD_POOL_SIZE,
        (unsigned int)srv->cfg.threads, MHD_OPTION_CONNECTION_TIMEOUT,
        (unsigned int)srv->cfg.connection_timeout_s, MHD_OPTION_CONNECTION_LIMIT,
        (unsigned int)srv->cfg.max_connections, MHD_OPTION_PER_IP_CONNECTION_LIMIT,
        (unsigned int)srv->cfg.per_ip_connections, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
        (size_t)srv->cfg.max_header, MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
        MHD_OPTION_NOTIFY_CONNECTION, on_connection, srv, MHD_OPTION_EXTERNAL_LOGGER, mhd_log, NULL,
        MHD_OPTION_END);
    freeaddrinfo(ai);
    KMS_ENSURE(srv->daemon != NULL, KMS_ERR_INTERNAL, "cannot listen on %s", srv->cfg.listen);
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(srv->daemon, MHD_DAEMON_INFO_BIND_PORT);
    srv->port = info ? info->port : port;
    return KMS_OK;
}

/* Waits until no request is active or until ms have passed; 1 when none is. */
static int wait_idle(struct kms_server *srv, unsigned ms)
{
    int64_t end = kms_monotonic_ns() + (int64_t)ms * 1000000;
    pthread_mutex_lock(&srv->active_lock);
    while (srv->active > 0 && kms_monotonic_ns() < end) {
        struct timespec until = kms_realtime_after_ms(10);
        pthread_cond_timedwait(&srv->active_done, &srv->active_lock, &until);
    }
    int idle = srv->active == 0;
    pthread_mutex_unlock(&srv->active_lock);
    return idle;
}

int kms_http_drain(struct kms_server *srv)
{
    if (!srv->daemon)
        return 1;
    srv->draining = 1;
    MHD_socket fd = MHD_quiesce_daemon(srv->daemon);
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
    /*
     * Requests on connections already open are still served (their answers
     * close the connection), until every one begun has been answered and
     * sent, or drain_timeout_ms.
     */
    int idle = wait_idle(srv, srv->cfg.drain_timeout_ms);
    pthread_mutex_lock(&srv->active_lock);
    srv->stopping = 1;
    pthread_mutex_unlock(&srv->active_lock);
    if (!idle) {
        /* What is still with a worker (a hung token) is answered 503 now. */
        kms_warn("requests still in flight after %u ms: answering them 503",
                 srv->cfg.drain_timeout_ms);
        kms_pool_expire_all(srv->pool);
        idle = wait_idle(srv, 2000);
    }
    /* A worker may still be between sending its answer and letting go of the task. */
    int workers_idle = kms_pool_wait_idle(srv->pool, 1000);
    unsigned queued = 0, running = 0;
    kms_pool_load(srv->pool, &queued, &running);
    if (idle && workers_idle) {
        kms_info("every request begun was answered; stopping");
        return 1;
    }
    if (idle)
        kms_error("%u workers are stuck in token calls", running);
    else
        kms_error("requests could not be completed");
    return 0;
}

void kms_http_stop(struct kms_server *srv)
{
    if (srv->daemon)
        MHD_stop_daemon(srv->daemon);
    srv->daemon = NULL;
    kms_addrlimit_free(srv->addrlimit); /* its last summaries, while the audit log is open */
    srv->addrlimit = NULL;
    kms_pool_free(srv->pool);
    srv->pool = NULL;
}
