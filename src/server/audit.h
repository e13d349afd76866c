/*
 * The tamper-evident audit log (DESIGN §7): one JSON line per request, each
 * carrying the SHA-256 of the line before it, and every so often a checkpoint
 * line MAC'd inside the token with a key that never leaves it. The database
 * keeps each node's head (its latest checkpoint: log, seq, the line's hash),
 * MAC'd in the token, and each run's opening checkpoint names the run before
 * it on that node, so a log cut short after a checkpoint, or a whole run's
 * file removed, is noticed too. `p11kms-audit verify` checks it all.
 *
 * A change to the database is written ahead: an "intent" line (flushed to
 * disk) before its transaction commits, carrying the request id that the
 * transaction stores (kms_store_change_request); an "outcome" line after.
 * Intents still without an outcome are listed in every checkpoint ("open"),
 * and the next start settles those of the run before by looking their
 * request ids up in the database ("recovery" lines). So every committed
 * change has an intent line and, but for a crash, an outcome or recovery
 * line saying "committed"; none says so of a change that did not commit.
 *
 * A "log" is one server run (a random 128-bit id); a file may hold several
 * logs one after another (restarts append), and one log may span several
 * files (rotation). Lines are written whole (a batch of them with one write(2)) and end in '\n';
 * hashes cover the bytes before it. Members are in strcmp order, except a
 * checkpoint's "mac", which is always last:
 *
 *   {"context_digest":"<64 hex>","context_keys":["k",...],"count":N,"decision":"...",
 *    "key_arn":"...","key_version":N,"latency_us":N,"log":"<32 hex>",
 *    "operation":"...","outcome":"ok"|"<AWS error type>","prev":"<64 hex>",
 *    "principal":"...","request_id":"...","seq":N,"source":"ip:port",
 *    "time":"YYYY-MM-DDTHH:MM:SS.mmmZ","type":"request","v":1}
 *   {"after_hash":..,"after_log":..,"after_seq":N,"key":"<32 hex>",
 *    "kind":"open|periodic|rotate|close","log":..,"node":"...","open":["<request id>",...],
 *    "prev":..,"seq":N,"time":..,"type":"checkpoint","v":1,"mac":"<64 hex>"}
 *   {"log":..,"prev":..,"reason":"sighup|recover","seq":N,"time":..,"type":"reopen","v":1}
 *   {"alert":"decrypt_breaker","cooldown_s":N,"failures":N,"kind":"principal"|"key",
 *    "log":..,"name":"...","prev":..,"seq":N,"time":..,"type":"alert",
 *    "until":"YYYY-MM-DDTHH:MM:SS.mmmZ","v":1,"window_s":N}
 *   {"alias":"alias/x","key_arn":..,"log":..,"operation":"...","prev":..,"principal":..,
 *    "request_id":..,"seq":N,"source":..,"time":..,"type":"intent","v":1}
 *   {"log":..,"prev":..,"request_id":..,"result":"committed|not committed","seq":N,
 *    "time":..,"type":"outcome|recovery","v":1}
 *
 * after_* and node are in "open" checkpoints only: after_* name the last line
 * of the node's run before (when the database holds a head for the node);
 * "open" is left out when no intent is open. An intent's alias and key_arn
 * are there when the change has one.
 *
 * context_*, decision, key_arn and key_version are left out when the request
 * has none. "seq" counts the lines of one log from 1, its "open" checkpoint.
 * "prev" is the hex SHA-256 of the line written before: the last line of
 * the file (whatever log wrote it) for an "open" checkpoint, 64 zeros when
 * the file was empty; the log's previous line, in the file it left, for a
 * "reopen" line, which begins every file the log goes on in (after SIGHUP, or
 * after a failure when the path now names another file). A "rotate"
 * checkpoint is the last line of a file the log left on SIGHUP.
 *
 * "count" is only in a summary line: N requests from the address in "source"
 * (no port) that failed authentication or were refused for it since that
 * address's last line, "outcome" the last failure's type.
 *
 * A checkpoint's MAC is CKM_SHA256_HMAC, in the token, under the key whose
 * CKA_ID is "key", of the line's bytes up to `,"mac":"` followed by `}`: the
 * checkpoint without its mac member, as kms_audit_checkpoint_body makes it.
 *
 * Never in the log: key material, plaintext, encryption-context values (only
 * their names and an HMAC of the canonical context under a per-log key
 * derived in the token), PINs or secrets.
 */
#ifndef P11KMS_AUDIT_H
#define P11KMS_AUDIT_H

#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "hsm/hsm.h"
#include "store/store.h"

/* The token object. */
#define KMS_AUDIT_KEY_LABEL "p11kms-audit-key" /* CKO_SECRET_KEY, CKK_GENERIC_SECRET */
/* What a database head's MAC covers begins with this line. */
#define KMS_AUDIT_HEAD_INFO "p11kms audit head v1"
/* Intents without an outcome one log keeps track of at most: then changes are refused. */
#define KMS_AUDIT_OPEN_MAX 256

#define KMS_AUDIT_LOG_ID_LEN 16 /* bytes; 32 hex in the log */
#define KMS_AUDIT_KEY_ID_LEN 16 /* the key's CKA_ID */
#define KMS_AUDIT_TIME_LEN 24   /* "2024-01-02T03:04:05.678Z" */

struct kms_audit_config {
    const char *path;            /* the log file; opened O_APPEND, created 0600 */
    unsigned checkpoint_lines;   /* a checkpoint after this many lines; 0: 1000 */
    unsigned checkpoint_seconds; /* and at most this long after a line; 0: 60 */
    struct kms_store *store;     /* the database: the node's head, the changes' request ids */
    const char *node;            /* this node's name for its head (kms_audit_default_node) */
};

/* "<hostname>:<path>": one name per log file per machine. out holds KMS_AUDIT_NODE_MAX + 1. */
void kms_audit_default_node(const char *path, char *out, size_t n);

/* One request. Strings are copied into the line; NULL strings are written as "". */
struct kms_audit_record {
    const char *request_id; /* uuid text */
    const char *principal;  /* "" when unauthenticated */
    const char *source;     /* client address "ip:port" */
    const char *operation;  /* "GenerateDataKey", or "none" */
    const char *key_arn;    /* NULL when none */
    uint32_t key_version;   /* 0 when none */
    const struct kms_buf
        *context;         /* canonical encryption context (kms_context_canonical) or NULL */
    const char *outcome;  /* "ok" or the AWS error type */
    const char *decision; /* policy decision, e.g. "allow #0"; NULL: none */
    uint64_t latency_us;
    uint64_t count; /* a summary of failures from one address (source): how many; 0: none */
};

/*
 * An alert: something an operator must look at now, in the chain like any
 * line. "decrypt_breaker": name (a principal, or a key's ARN) had `failures`
 * decryptions fail within window_s; its breaker is open until `until`.
 */
struct kms_audit_alert {
    const char *alert; /* "decrypt_breaker" */
    const char *kind;  /* "principal" or "key" */
    const char *name;
    unsigned failures, window_s, cooldown_s;
    const char *until; /* KMS_AUDIT_TIME_LEN characters */
};

struct kms_audit;

/*
 * Opens (creating if need be) the log at cfg->path and starts a new log: a
 * random log id, the token's audit key (made on first start), the "open"
 * checkpoint naming the node's run before (from its head in the database),
 * the intents that run left open settled ("recovery" lines), and a thread
 * that writes periodic checkpoints, each one the node's new head. Uses one
 * token session for a moment; the hsm and the store must outlive the log.
 * Any failure is an error: the server must not serve without its log.
 */
KMS_MUST_CHECK kms_err kms_audit_open(const struct kms_audit_config *cfg, struct kms_hsm *hsm,
                                      struct kms_audit **out);
/*
 * Chains one line. Thread-safe; lines are in seq order. The line is written
 * to the file by the log's committer, in one write with the lines around it,
 * and flushed (fdatasync) with them: *ticket (NULL: not wanted) names it to
 * kms_audit_wait, which says when it is on disk, or that it could not be
 * written or flushed (then none of the lines of that write is in the file and
 * the chain goes back to the line before them; the caller fails the request
 * with KMSInternalException). KMS_ERR_INTERNAL at once when the log is
 * failing and its path still cannot be opened. After a failure the next call
 * opens the path again: if it names another file now (the old one was
 * removed, or could not be opened), that file starts with a "reopen" line.
 * Never uses the token.
 */
KMS_MUST_CHECK kms_err kms_audit_write(struct kms_audit *a, const struct kms_audit_record *r,
                                       uint64_t *ticket);

/*
 * Group commit: no answer leaves before its line is on disk, and many lines
 * share one write and one flush. The request's thread chains its line,
 * parks its answer and registers a wait; one committer thread writes every
 * line chained so far and flushes them with one fdatasync, then calls done
 * for each wait whose line that covered. The wait lives in the caller's memory (no allocation) and
 * must stay valid until done is called.
 */
struct kms_audit_wait {
    uint64_t ticket; /* from kms_audit_write */
    /* Called once, on the committer thread, without any of the log's locks: durable is 1 when
     * the line is on disk, 0 when it could not be written or flushed (the request must fail
     * closed). */
    void (*done)(struct kms_audit_wait *w, int durable);
    struct kms_audit_wait *next; /* the log's list */
    int result;                  /* the log's */
};
/*
 * 1: the line is on disk already; -1: it was lost; 0: w is registered
 * and done will be called once the committer knows.
 */
int kms_audit_wait(struct kms_audit *a, struct kms_audit_wait *w);
/* The group commit, for /metrics. */
struct kms_audit_commit_stats {
    uint64_t flushes; /* the committer's fdatasync calls (each covering every line before it) */
    uint64_t lines;   /* the lines they made durable: lines / flushes is the average group */
};
void kms_audit_commit_stats(struct kms_audit *a, struct kms_audit_commit_stats *out);
/*
 * fn is called by the committer after each of its fdatasync calls, failed or
 * not, with the time it took, under the log's lock (it must be quick and take
 * no lock of its own). NULL: no longer, from the moment this returns.
 */
typedef void (*kms_audit_observer)(void *arg, uint64_t ns);
void kms_audit_observe(struct kms_audit *a, kms_audit_observer fn, void *arg);
/* Writes an alert line now (not by the committer); an error when it could not be written. */
KMS_MUST_CHECK kms_err kms_audit_alert(struct kms_audit *a, const struct kms_audit_alert *al);
/*
 * SIGHUP, after log rotation: when the path names another file than the one
 * being written, seals the old file with a "rotate" checkpoint and continues
 * the log in a new file at the path, starting with a "reopen" line. When the
 * new file cannot be opened the error is returned and requests fail (fail
 * closed) until kms_audit_write manages to open it. Uses a token session.
 */
KMS_MUST_CHECK kms_err kms_audit_reopen(struct kms_audit *a);
/* A change to the database, as its intent line names it. */
struct kms_audit_change {
    const char *request_id; /* unique: the transaction stores it */
    const char *operation;  /* "CreateKey", ..., or for the server's own "RotateKey", "DeleteKey" */
    const char *principal;  /* "" for the server's own changes */
    const char *source;     /* client address, or "p11kmsd" */
    const char *key_arn;    /* NULL when none */
    const char *alias;      /* NULL when none */
};
enum { KMS_AUDIT_NOT_COMMITTED = 0, KMS_AUDIT_COMMITTED = 1, KMS_AUDIT_UNKNOWN = -1 };
/*
 * The intent line, written and on disk (fdatasync) when this returns KMS_OK:
 * only then may the change commit. KMS_ERR_DEPENDENCY_TIMEOUT otherwise (or
 * when KMS_AUDIT_OPEN_MAX intents are open): the change must not commit.
 */
KMS_MUST_CHECK kms_err kms_audit_intent(struct kms_audit *a, const struct kms_audit_change *c);
/*
 * After the commit (or the rollback) of an intent's change. An outcome line
 * that cannot be written now is written before the next line that can; an
 * unknown result (a failed commit) is looked up in the database before the
 * next checkpoint. Never fails: until written, the intent is listed open.
 */
void kms_audit_outcome(struct kms_audit *a, const char *request_id, int result);
/* Writes a checkpoint now (when lines were written since the last). Uses a token session. */
KMS_MUST_CHECK kms_err kms_audit_checkpoint(struct kms_audit *a);
/* The log id (32 hex), as in the log's "log" members and the database's head. */
const char *kms_audit_id(const struct kms_audit *a);
/* Stops the checkpoint thread, writes the "close" checkpoint, frees. NULL is fine. */
void kms_audit_close(struct kms_audit *a);

/* ---- line formats: for the writer, the verify tool and the tests -------------------- */

/* A checkpoint line ends with this member: KMS_AUDIT_MAC_MEMBER, 64 hex, "}. */
#define KMS_AUDIT_MAC_MEMBER ",\"mac\":\""
#define KMS_AUDIT_MAC_SUFFIX_LEN (sizeof KMS_AUDIT_MAC_MEMBER - 1 + 64 + 2)

/* 1 when s (n bytes) is lower-case hex. */
int kms_audit_is_hex(const char *s, size_t n);

/* "YYYY-MM-DDTHH:MM:SS.mmmZ" (UTC); out holds KMS_AUDIT_TIME_LEN + 1 bytes. */
void kms_audit_format_time(int64_t sec, long nsec, char out[KMS_AUDIT_TIME_LEN + 1]);

/* Appends s as a JSON string; invalid UTF-8 becomes U+FFFD. */
KMS_MUST_CHECK kms_err kms_audit_json_string(struct kms_buf *out, const char *s, size_t n);

/* HMAC-SHA256 of a canonical context under the log's digest key, as 64 hex. */
KMS_MUST_CHECK kms_err kms_audit_context_digest(const uint8_t key[32],
                                                const struct kms_buf *context, char hex[65]);

/*
 * A request line with three holes (prev, seq, time) filled under the log's
 * lock; built beforehand, off the lock.
 */
struct kms_audit_template {
    struct kms_buf text;
    size_t at_prev, at_seq, at_time; /* offsets of the holes in text */
};
/* digest_key may be NULL only when r->context is NULL. */
KMS_MUST_CHECK kms_err kms_audit_template_build(const struct kms_audit_record *r,
                                                const char *log_id, const uint8_t *digest_key,
                                                struct kms_audit_template *out);
/* Appends the finished line (without '\n') to line. */
KMS_MUST_CHECK kms_err kms_audit_template_fill(const struct kms_audit_template *t, uint64_t seq,
                                               const uint8_t prev[32], const char *time,
                                               struct kms_buf *line);
void kms_audit_template_free(struct kms_audit_template *t);

/* What an "open" checkpoint adds: the run before on this node; and any checkpoint's open intents.
 */
struct kms_audit_checkpoint_extra {
    const char *node;      /* "open" only; NULL: left out */
    const char *after_log; /* NULL: no run before */
    uint64_t after_seq;
    const char *after_hash;  /* 64 hex */
    const char *const *open; /* request ids of intents without an outcome */
    size_t nopen;
};
/* The checkpoint without its mac: the bytes the MAC covers. extra may be NULL. */
KMS_MUST_CHECK kms_err kms_audit_checkpoint_body(const char *key_hex, const char *kind,
                                                 const char *log_id, uint64_t seq,
                                                 const uint8_t prev[32], const char *time,
                                                 const struct kms_audit_checkpoint_extra *extra,
                                                 struct kms_buf *out);
/* What a database head's MAC covers: KMS_AUDIT_HEAD_INFO, node, log, seq, hash, one a line. */
KMS_MUST_CHECK kms_err kms_audit_head_body(const char *node, const char *log_id, uint64_t seq,
                                           const char *hash_hex, struct kms_buf *out);
/* body with `,"mac":"<hex>"}` in place of its final '}'. */
KMS_MUST_CHECK kms_err kms_audit_checkpoint_line(const struct kms_buf *body, const uint8_t mac[32],
                                                 struct kms_buf *line);
/* An alert line (seq, prev and time as in the chain). */
KMS_MUST_CHECK kms_err kms_audit_alert_line(const struct kms_audit_alert *al, const char *log_id,
                                            uint64_t seq, const uint8_t prev[32], const char *time,
                                            struct kms_buf *line);
/* reason: "sighup" or "recover". */
KMS_MUST_CHECK kms_err kms_audit_reopen_line(const char *log_id, uint64_t seq,
                                             const uint8_t prev[32], const char *time,
                                             const char *reason, struct kms_buf *line);

/* ---- verifying: the core of `p11kms-audit verify`, without the token ---------------- */

/* Where a log is known to reach: a node's head in the database (its latest checkpoint). */
struct kms_audit_head {
    char node[256];
    char log[2 * KMS_AUDIT_LOG_ID_LEN + 1];
    uint64_t seq;
    char hash[65]; /* hex SHA-256 of that checkpoint line */
};

/*
 * Checks a checkpoint's MAC: 1 when it verifies, 0 when it does not, -1 when
 * the key named by key_hex is not there.
 */
typedef int (*kms_audit_mac_check)(void *arg, const char *key_hex, const uint8_t *body, size_t n,
                                   const uint8_t mac[32]);

struct kms_audit_verify_config {
    kms_audit_mac_check mac; /* NULL: MACs not checked */
    void *mac_arg;
    /* Each head's log must be among the lines and reach its checkpoint. */
    const struct kms_audit_head *heads;
    size_t nheads;
    /* A log whose run before is not looked for (older files left out on purpose); NULL: none. */
    const char *since;
};

enum kms_audit_finding {
    KMS_AUDIT_INTACT,
    KMS_AUDIT_NOT_JSON,     /* "not JSON" */
    KMS_AUDIT_NOT_AUDIT,    /* JSON, but not an audit line */
    KMS_AUDIT_CHANGED,      /* "changed" */
    KMS_AUDIT_MISSING,      /* lines removed before this one (or from here to the end) */
    KMS_AUDIT_OUT_OF_ORDER, /* "out of order" */
    KMS_AUDIT_INSERTED,     /* "inserted" */
    KMS_AUDIT_BAD_MAC,      /* "checkpoint MAC does not verify" */
    KMS_AUDIT_UNKNOWN_KEY,  /* the checkpoint's key is not in the token */
    KMS_AUDIT_MISSING_RUN,  /* a run named by the next run or a head is not among the lines */
};

struct kms_audit_report {
    enum kms_audit_finding finding;
    const char *file; /* as given to kms_audit_verify_file; NULL when intact */
    uint64_t line;    /* 1-based, in that file */
    char text[800];   /* "line 7: changed (its hash does not match line 8's prev)" */
    uint64_t lines, logs, checkpoints, macs_checked;
    int continues; /* the last log ends with a "rotate" checkpoint: it goes on in a later file */
    /* Intents with no outcome or recovery line among the lines (malloc'd; kms_audit_report_free).
     */
    char (*open)[KMS_REQUEST_ID_MAX + 1];
    size_t nopen;
    uint64_t intents, committed, not_committed; /* intent lines; outcome and recovery results */
};
void kms_audit_report_free(struct kms_audit_report *r);

struct kms_audit_verifier;

KMS_MUST_CHECK kms_err kms_audit_verifier_new(const struct kms_audit_verify_config *cfg,
                                              struct kms_audit_verifier **out);
/* The lines that follow come from this file (name kept, not copied); numbering restarts. */
void kms_audit_verify_file(struct kms_audit_verifier *v, const char *name);
/*
 * One line, without its '\n' (complete: 0 when the file ended without one).
 * Returns 1 when the first problem is settled: stop feeding, then finish.
 */
int kms_audit_verify_line(struct kms_audit_verifier *v, const char *line, size_t n, int complete);
/* Settles what is pending and fills out; the verifier is freed. */
void kms_audit_verify_finish(struct kms_audit_verifier *v, struct kms_audit_report *out);

#endif
