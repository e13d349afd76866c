/*
 * The audit log: line formats and the writer (one file, one chain of hashes,
 * a thread for periodic checkpoints); the verifier is audit_verify.c. The
 * format is described in audit.h.
 */
#include "config.h"

#include "server/audit.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "common/digest.h"
#include "common/encoding.h"
#include "common/log.h"

#define DEFAULT_LINES 1000
#define DEFAULT_SECONDS 60
/* The per-log context digest key is HMAC(audit key, DIGEST_INFO || raw log id). */
#define DIGEST_INFO "p11kms context digest v1"
/* Longest any one string member may be in the log: enough for an ARN, not for a flood. */
#define MAX_TEXT 1024
/* Longest a line waits for a checkpoint that holds the log (the token may hang). */
#define HOLD_MAX_MS 200
/* How long a line nobody waits for may stay unwritten: refusals, summaries. */
#define LAZY_MS 20
/* The longest a batch gathers lines before its flush (as long as the last flush took). */
#define GATHER_MAX_NS 1000000

/* ---- line formats ------------------------------------------------------------ */

void kms_audit_format_time(int64_t sec, long nsec, char out[KMS_AUDIT_TIME_LEN + 1])
{
    struct tm tm;
    time_t t = (time_t)sec;
    char date[64];
    unsigned ms = (unsigned)(nsec / 1000000) % 1000u;
    gmtime_r(&t, &tm);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out, KMS_AUDIT_TIME_LEN + 1, "%.19s.%03uZ", date, ms);
}

/* Escapes as jansson does, so a dump with JSON_SORT_KEYS gives back the same bytes. */
kms_err kms_audit_json_string(struct kms_buf *out, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    KMS_GUARD(kms_buf_reserve(out, n + 2));
    KMS_GUARD(kms_buf_append_u8(out, '"'));
    for (size_t i = 0; i < n;) {
        unsigned c = p[i];
        char esc[8];
        /* A run of printable ASCII needing no escape (nearly every byte of a line): one append. */
        size_t run = 0;
        while (i + run < n && p[i + run] >= 0x20 && p[i + run] < 0x80 && p[i + run] != '"' &&
               p[i + run] != '\\')
            run++;
        if (run) {
            KMS_GUARD(kms_buf_append(out, p + i, run));
            i += run;
        } else if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c;
            KMS_GUARD(kms_buf_append(out, esc, 2));
            i++;
        } else if (c < 0x20) {
            const char *named = c == '\b'   ? "\\b"
                                : c == '\f' ? "\\f"
                                : c == '\n' ? "\\n"
                                : c == '\r' ? "\\r"
                                : c == '\t' ? "\\t"
                                            : NULL;
            if (named) {
                KMS_GUARD(kms_buf_append_str(out, named));
            } else {
                snprintf(esc, sizeof esc, "\\u%04X", c);
                KMS_GUARD(kms_buf_append_str(out, esc));
            }
            i++;
        } else {
            size_t len = kms_utf8_len(p + i, n - i);
            if (len == 0) {
                KMS_GUARD(kms_buf_append_str(out, "\xef\xbf\xbd"));
                i++;
            } else {
                KMS_GUARD(kms_buf_append(out, p + i, len));
                i += len;
            }
        }
    }
    return kms_buf_append_u8(out, '"');
}

/* `"name":"text",` with text cut at MAX_TEXT bytes (NULL: ""). */
static kms_err member_text(struct kms_buf *b, const char *name, const char *text)
{
    size_t n = text ? strlen(text) : 0;
    KMS_GUARD(kms_buf_append_str(b, name));
    KMS_GUARD(kms_audit_json_string(b, text ? text : "", n > MAX_TEXT ? MAX_TEXT : n));
    return kms_buf_append_u8(b, ',');
}

static kms_err member_u64(struct kms_buf *b, const char *name, uint64_t v)
{
    char num[32];
    snprintf(num, sizeof num, "%" PRIu64 ",", v);
    KMS_GUARD(kms_buf_append_str(b, name));
    return kms_buf_append_str(b, num);
}

/* `"context_keys":[...],`: the names from a canonical context; values are skipped. */
static kms_err context_keys(struct kms_buf *b, const struct kms_buf *context)
{
    struct kms_reader r = kms_reader_init(context->data, context->len);
    uint32_t count;

    KMS_ENSURE(kms_read_u32be(&r, &count) == KMS_OK, KMS_ERR_INTERNAL,
               "the encryption context is not canonical");
    KMS_GUARD(kms_buf_append_str(b, "\"context_keys\":["));
    for (uint32_t i = 0; i < count; i++) {
        uint32_t klen, vlen;
        const uint8_t *key, *value;
        KMS_ENSURE(
            kms_read_u32be(&r, &klen) == KMS_OK && kms_read_bytes(&r, klen, &key) == KMS_OK &&
                kms_read_u32be(&r, &vlen) == KMS_OK && kms_read_bytes(&r, vlen, &value) == KMS_OK,
            KMS_ERR_INTERNAL, "the encryption context is not canonical");
        if (i)
            KMS_GUARD(kms_buf_append_u8(b, ','));
        KMS_GUARD(kms_audit_json_string(b, (const char *)key, klen));
    }
    KMS_ENSURE(r.left == 0, KMS_ERR_INTERNAL, "the encryption context is not canonical");
    return kms_buf_append_str(b, "],");
}

kms_err kms_audit_context_digest(const uint8_t key[32], const struct kms_buf *context, char hex[65])
{
    uint8_t md[32];
    KMS_GUARD(kms_hmac_sha256(key, 32, context->data, context->len, md));
    kms_hex_encode(md, sizeof md, hex);
    return KMS_OK;
}

/* Room for a whole usual request line at once, instead of growing 64, 128, ... 1024. */
#define LINE_GUESS 1024

static kms_err template_build(const struct kms_audit_record *r, const char *log_id,
                              const uint8_t *digest_key, struct kms_audit_template *t)
{
    struct kms_buf *b = &t->text;
    KMS_GUARD(kms_buf_reserve(b, LINE_GUESS));
    KMS_GUARD(kms_buf_append_u8(b, '{'));
    if (r->context) {
        char digest[65];
        KMS_ENSURE(digest_key != NULL, KMS_ERR_INTERNAL, "no context digest key");
        KMS_GUARD(kms_audit_context_digest(digest_key, r->context, digest));
        KMS_GUARD(member_text(b, "\"context_digest\":", digest));
        KMS_GUARD(context_keys(b, r->context));
    }
    if (r->count)
        KMS_GUARD(member_u64(b, "\"count\":", r->count));
    if (r->decision)
        KMS_GUARD(member_text(b, "\"decision\":", r->decision));
    if (r->key_arn)
        KMS_GUARD(member_text(b, "\"key_arn\":", r->key_arn));
    if (r->key_version)
        KMS_GUARD(member_u64(b, "\"key_version\":", r->key_version));
    KMS_GUARD(member_u64(b, "\"latency_us\":", r->latency_us));
    KMS_GUARD(member_text(b, "\"log\":", log_id));
    KMS_GUARD(member_text(b, "\"operation\":", r->operation));
    KMS_GUARD(member_text(b, "\"outcome\":", r->outcome));
    KMS_GUARD(kms_buf_append_str(b, "\"prev\":\""));
    t->at_prev = b->len;
    KMS_GUARD(kms_buf_append_str(b, "\","));
    KMS_GUARD(member_text(b, "\"principal\":", r->principal));
    KMS_GUARD(member_text(b, "\"request_id\":", r->request_id));
    KMS_GUARD(kms_buf_append_str(b, "\"seq\":"));
    t->at_seq = b->len;
    KMS_GUARD(kms_buf_append_u8(b, ','));
    KMS_GUARD(member_text(b, "\"source\":", r->source));
    KMS_GUARD(kms_buf_append_str(b, "\"time\":\""));
    t->at_time = b->len;
    return kms_buf_append_str(b, "\",\"type\":\"request\",\"v\":1}");
}

kms_err kms_audit_template_build(const struct kms_audit_record *r, const char *log_id,
                                 const uint8_t *digest_key, struct kms_audit_template *out)
{
    memset(out, 0, sizeof *out);
    kms_err rc = template_build(r, log_id, digest_key, out);
    if (rc != KMS_OK)
        kms_audit_template_free(out);
    return rc;
}

kms_err kms_audit_template_fill(const struct kms_audit_template *t, uint64_t seq,
                                const uint8_t prev[32], const char *time, struct kms_buf *line)
{
    char hex[65], num[24];
    const uint8_t *p = t->text.data;
    kms_hex_encode(prev, 32, hex);
    snprintf(num, sizeof num, "%" PRIu64, seq);
    KMS_GUARD(kms_buf_reserve(line, t->text.len + 64 + 24 + KMS_AUDIT_TIME_LEN));
    KMS_GUARD(kms_buf_append(line, p, t->at_prev));
    KMS_GUARD(kms_buf_append(line, hex, 64));
    KMS_GUARD(kms_buf_append(line, p + t->at_prev, t->at_seq - t->at_prev));
    KMS_GUARD(kms_buf_append_str(line, num));
    KMS_GUARD(kms_buf_append(line, p + t->at_seq, t->at_time - t->at_seq));
    KMS_GUARD(kms_buf_append_str(line, time));
    return kms_buf_append(line, p + t->at_time, t->text.len - t->at_time);
}

void kms_audit_template_free(struct kms_audit_template *t)
{
    kms_buf_free(&t->text);
    t->at_prev = t->at_seq = t->at_time = 0;
}

/* `"open":["id",...],` */
static kms_err member_list(struct kms_buf *b, const char *name, const char *const *items, size_t n)
{
    KMS_GUARD(kms_buf_append_str(b, name));
    KMS_GUARD(kms_buf_append_u8(b, '['));
    for (size_t i = 0; i < n; i++) {
        if (i)
            KMS_GUARD(kms_buf_append_u8(b, ','));
        size_t len = strlen(items[i]);
        KMS_GUARD(kms_audit_json_string(b, items[i], len > MAX_TEXT ? MAX_TEXT : len));
    }
    return kms_buf_append_str(b, "],");
}

kms_err kms_audit_checkpoint_body(const char *key_hex, const char *kind, const char *log_id,
                                  uint64_t seq, const uint8_t prev[32], const char *time,
                                  const struct kms_audit_checkpoint_extra *extra,
                                  struct kms_buf *out)
{
    char hex[65];
    kms_hex_encode(prev, 32, hex);
    KMS_GUARD(kms_buf_append_u8(out, '{'));
    if (extra && extra->after_log) {
        KMS_GUARD(member_text(out, "\"after_hash\":", extra->after_hash));
        KMS_GUARD(member_text(out, "\"after_log\":", extra->after_log));
        KMS_GUARD(member_u64(out, "\"after_seq\":", extra->after_seq));
    }
    KMS_GUARD(member_text(out, "\"key\":", key_hex));
    KMS_GUARD(member_text(out, "\"kind\":", kind));
    KMS_GUARD(member_text(out, "\"log\":", log_id));
    if (extra && extra->node)
        KMS_GUARD(member_text(out, "\"node\":", extra->node));
    if (extra && extra->nopen)
        KMS_GUARD(member_list(out, "\"open\":", extra->open, extra->nopen));
    KMS_GUARD(member_text(out, "\"prev\":", hex));
    KMS_GUARD(member_u64(out, "\"seq\":", seq));
    KMS_GUARD(member_text(out, "\"time\":", time));
    return kms_buf_append_str(out, "\"type\":\"checkpoint\",\"v\":1}");
}

kms_err kms_audit_head_body(const char *node, const char *log_id, uint64_t seq,
                            const char *hash_hex, struct kms_buf *out)
{
    char num[24];
    snprintf(num, sizeof num, "%" PRIu64, seq);
    const char *parts[] = {KMS_AUDIT_HEAD_INFO, node, log_id, num, hash_hex};
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++) {
        KMS_GUARD(kms_buf_append_str(out, parts[i]));
        KMS_GUARD(kms_buf_append_u8(out, '\n'));
    }
    return KMS_OK;
}

void kms_audit_default_node(const char *path, char *out, size_t n)
{
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    snprintf(out, n, "%s:%s", host, path ? path : "");
}

/* An intent line: built whole under the lock (changes are few). */
static kms_err intent_line(const struct kms_audit_change *c, const char *log_id, uint64_t seq,
                           const uint8_t prev[32], const char *time, struct kms_buf *line)
{
    char hex[65];
    kms_hex_encode(prev, 32, hex);
    KMS_GUARD(kms_buf_append_u8(line, '{'));
    if (c->alias)
        KMS_GUARD(member_text(line, "\"alias\":", c->alias));
    if (c->key_arn)
        KMS_GUARD(member_text(line, "\"key_arn\":", c->key_arn));
    KMS_GUARD(member_text(line, "\"log\":", log_id));
    KMS_GUARD(member_text(line, "\"operation\":", c->operation));
    KMS_GUARD(member_text(line, "\"prev\":", hex));
    KMS_GUARD(member_text(line, "\"principal\":", c->principal));
    KMS_GUARD(member_text(line, "\"request_id\":", c->request_id));
    KMS_GUARD(member_u64(line, "\"seq\":", seq));
    KMS_GUARD(member_text(line, "\"source\":", c->source));
    KMS_GUARD(member_text(line, "\"time\":", time));
    return kms_buf_append_str(line, "\"type\":\"intent\",\"v\":1}");
}

/* An outcome or recovery line. */
static kms_err result_line(const char *type, const char *request_id, int committed,
                           const char *log_id, uint64_t seq, const uint8_t prev[32],
                           const char *time, struct kms_buf *line)
{
    char hex[65];
    kms_hex_encode(prev, 32, hex);
    KMS_GUARD(kms_buf_append_u8(line, '{'));
    KMS_GUARD(member_text(line, "\"log\":", log_id));
    KMS_GUARD(member_text(line, "\"prev\":", hex));
    KMS_GUARD(member_text(line, "\"request_id\":", request_id));
    KMS_GUARD(member_text(line, "\"result\":", committed ? "committed" : "not committed"));
    KMS_GUARD(member_u64(line, "\"seq\":", seq));
    KMS_GUARD(member_text(line, "\"time\":", time));
    KMS_GUARD(member_text(line, "\"type\":", type));
    return kms_buf_append_str(line, "\"v\":1}");
}

kms_err kms_audit_checkpoint_line(const struct kms_buf *body, const uint8_t mac[32],
                                  struct kms_buf *line)
{
    char hex[65];
    KMS_ENSURE(body->len >= 2 && body->data[body->len - 1] == '}', KMS_ERR_INTERNAL,
               "not a checkpoint body");
    kms_hex_encode(mac, 32, hex);
    KMS_GUARD(kms_buf_append(line, body->data, body->len - 1));
    KMS_GUARD(kms_buf_append_str(line, KMS_AUDIT_MAC_MEMBER));
    KMS_GUARD(kms_buf_append(line, hex, 64));
    return kms_buf_append_str(line, "\"}");
}

kms_err kms_audit_reopen_line(const char *log_id, uint64_t seq, const uint8_t prev[32],
                              const char *time, const char *reason, struct kms_buf *line)
{
    char hex[65];
    kms_hex_encode(prev, 32, hex);
    KMS_GUARD(kms_buf_append_u8(line, '{'));
    KMS_GUARD(member_text(line, "\"log\":", log_id));
    KMS_GUARD(member_text(line, "\"prev\":", hex));
    KMS_GUARD(member_text(line, "\"reason\":", reason));
    KMS_GUARD(member_u64(line, "\"seq\":", seq));
    KMS_GUARD(member_text(line, "\"time\":", time));
    return kms_buf_append_str(line, "\"type\":\"reopen\",\"v\":1}");
}

kms_err kms_audit_alert_line(const struct kms_audit_alert *al, const char *log_id, uint64_t seq,
                             const uint8_t prev[32], const char *time, struct kms_buf *line)
{
    char hex[65];
    kms_hex_encode(prev, 32, hex);
    KMS_GUARD(kms_buf_append_u8(line, '{'));
    KMS_GUARD(member_text(line, "\"alert\":", al->alert));
    KMS_GUARD(member_u64(line, "\"cooldown_s\":", al->cooldown_s));
    KMS_GUARD(member_u64(line, "\"failures\":", al->failures));
    KMS_GUARD(member_text(line, "\"kind\":", al->kind));
    KMS_GUARD(member_text(line, "\"log\":", log_id));
    KMS_GUARD(member_text(line, "\"name\":", al->name));
    KMS_GUARD(member_text(line, "\"prev\":", hex));
    KMS_GUARD(member_u64(line, "\"seq\":", seq));
    KMS_GUARD(member_text(line, "\"time\":", time));
    KMS_GUARD(kms_buf_append_str(line, "\"type\":\"alert\","));
    KMS_GUARD(member_text(line, "\"until\":", al->until));
    KMS_GUARD(kms_buf_append_str(line, "\"v\":1,"));
    KMS_GUARD(member_u64(line, "\"window_s\":", al->window_s));
    line->data[line->len - 1] = '}'; /* the last member's ',' */
    return KMS_OK;
}

int kms_audit_is_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

/* ---- the writer ---------------------------------------------------------------- */

/* Where an intent without its outcome line stands. */
enum {
    OPEN_IN_FLIGHT,     /* its change is being committed */
    OPEN_UNKNOWN,       /* the commit failed (or a run before left it): look it up */
    OPEN_NOT_COMMITTED, /* known: the line is to be written */
    OPEN_COMMITTED,
};

struct open_intent {
    char id[KMS_REQUEST_ID_MAX + 1];
    int state;
    int recovery; /* left open by a run before: settled with a "recovery" line */
};

struct kms_audit {
    char *path;
    unsigned cp_lines, cp_seconds;
    struct kms_hsm *hsm;
    struct kms_store *store; /* NULL: no head, no settling of intents */
    char node[KMS_AUDIT_NODE_MAX + 1];
    CK_OBJECT_HANDLE key; /* the token's audit key */
    int opened;           /* the "open" checkpoint was written: a "close" one is due */
    char key_hex[2 * KMS_AUDIT_KEY_ID_LEN + 1];
    /* The node's run before, named by the "open" checkpoint (after_log[0] == 0: none). */
    char after_log[2 * KMS_AUDIT_LOG_ID_LEN + 1];
    uint64_t after_seq;
    char after_hash[65];
    uint8_t log_raw[KMS_AUDIT_LOG_ID_LEN];
    char log_id[2 * KMS_AUDIT_LOG_ID_LEN + 1];
    uint8_t *digest_key; /* 32 bytes from the secure heap */

    /* One checkpoint or reopen at a time, in seq order: taken before lock. */
    pthread_mutex_t cp_lock;
    /* The file and the chain. */
    pthread_mutex_t lock;
    pthread_cond_t wake; /* for the checkpoint thread */
    pthread_cond_t held; /* for lines waiting while a checkpoint holds the log */
    int hold;            /* a checkpoint wants the next place in the chain */
    int fd;              /* -1: none (the path could not be opened) */
    dev_t dev;
    ino_t ino;
    int failing; /* the last write or open failed: look at the path again before the next */
    /*
     * Whether the file was removed is looked at (fstat) only after the kernel
     * said something changed its links or name (inotify, read by the watcher
     * thread), not before every line: look is set by the watcher, taken by
     * the next line. Without a watch (ino_wd < 0) every line looks.
     */
    int ino_fd;     /* inotify instance; -1: none */
    int ino_wd;     /* the watch on the file fd is; -1: none */
    int stop_fd[2]; /* the watcher's stop pipe; -1: none */
    int look;       /* atomic: the file's links or name changed since the last look */
    pthread_t watcher;
    int watcher_started;
    int partial;                 /* the file ends with part of a line that could not be removed */
    uint64_t seq;                /* of the last line written */
    uint8_t last[32];            /* its hash */
    uint64_t since_cp;           /* lines written since the last checkpoint */
    struct timespec first_since; /* when the first of them was written (monotonic) */
    struct timespec retry_at;    /* after a failed checkpoint, not before this */
    struct open_intent open[KMS_AUDIT_OPEN_MAX]; /* intents without a written outcome */
    size_t nopen;
    int stopping;
    pthread_t thread;
    int thread_started;

    /*
     * Lines are chained here and written in batches (write_pending_locked):
     * pend holds the chained lines not yet in the file, each with its '\n';
     * pend_seq is the seq of its first, pend_prev the hash before it. A
     * request's line waits there for the committer; a line that must be in
     * the file at once (checkpoint, reopen, intent, outcome, alert) is
     * written with those before it (write_line_locked).
     */
    struct kms_buf pend;
    uint64_t pend_seq, pend_lines;
    uint8_t pend_prev[32];
    /*
     * Group commit (kms_audit_wait). A ticket numbers every line chained,
     * and unlike seq never goes back when lines are lost. durable: every
     * line up to this ticket is on disk; lost_lo..lost_hi: lines that could
     * not be written or flushed (lost_hi 0: none), whose answers fail
     * closed. A file is written and flushed before it is let go
     * (retire_fd_locked), so one flush of the file being written covers
     * every line written so far.
     */
    pthread_cond_t commit_wake;     /* lines or waits to see to: for the committer */
    struct kms_audit_wait *waiters; /* not yet settled */
    uint64_t tickets;               /* of the last line chained */
    uint64_t durable, lost_lo, lost_hi;
    uint64_t flushes, flushed;  /* the committer's flushes and the lines they made durable */
    kms_audit_observer observe; /* told how long each of the committer's flushes took */
    void *observe_arg;
    int flush_failing; /* the last flush failed: logged once */
    int commit_stop;
    int commit_idle;   /* the committer sleeps with nothing to write: the next line wakes it */
    int64_t gather_ns; /* how long the next batch gathers lines before its flush */
    pthread_t committer;
    int committer_started;
};

static struct timespec mono_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t;
}

/* CLOCK_MONOTONIC ns from now. */
static struct timespec mono_after(int64_t ns)
{
    struct timespec t = mono_now();
    ns += t.tv_nsec;
    t.tv_sec += ns / 1000000000;
    t.tv_nsec = ns % 1000000000;
    return t;
}

static int ts_before(struct timespec a, struct timespec b)
{
    return a.tv_sec < b.tv_sec || (a.tv_sec == b.tv_sec && a.tv_nsec < b.tv_nsec);
}

static void now_text(char out[KMS_AUDIT_TIME_LEN + 1])
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    kms_audit_format_time(t.tv_sec, t.tv_nsec, out);
}

const char *kms_audit_id(const struct kms_audit *a)
{
    return a->log_id;
}

/* Opens the path for appending; reports its identity and whether it ends inside a line. */
static kms_err open_path(const char *path, int *fd_out, struct stat *st, int *partial)
{
    int fd = open(path, O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
    KMS_ENSURE(fd >= 0, KMS_ERR_INTERNAL, "cannot open the audit log %s: %s", path,
               strerror(errno));
    if (fstat(fd, st) != 0) {
        int e = errno;
        close(fd);
        return KMS_FAIL(KMS_ERR_INTERNAL, "cannot stat the audit log %s: %s", path, strerror(e));
    }
    *partial = 0;
    if (S_ISREG(st->st_mode) && st->st_size > 0) {
        char c;
        if (pread(fd, &c, 1, st->st_size - 1) != 1) {
            int e = errno;
            close(fd);
            return KMS_FAIL(KMS_ERR_INTERNAL, "cannot read the audit log %s: %s", path,
                            strerror(e));
        }
        *partial = c != '\n';
    }
    *fd_out = fd;
    return KMS_OK;
}

/*
 * At the start after a crash: the line the process was killed while writing
 * (a write(2) to a regular file stops at a page boundary on SIGKILL) is cut
 * off. It was never answered for: a request's line is written before its
 * answer, a change's intent before its commit. Only bytes after the last
 * '\n' go: every whole line stays.
 */
static kms_err cut_torn_tail(int fd, struct stat *st, const char *path)
{
    uint8_t buf[4096];
    off_t size = st->st_size, pos = size, keep = -1;

    while (pos > 0 && keep < 0) {
        size_t n = pos > (off_t)sizeof buf ? sizeof buf : (size_t)pos;
        KMS_ENSURE(pread(fd, buf, n, pos - (off_t)n) == (ssize_t)n, KMS_ERR_INTERNAL,
                   "cannot read the audit log %s: %s", path, strerror(errno));
        for (size_t i = n; i > 0 && keep < 0; i--)
            if (buf[i - 1] == '\n')
                keep = pos - (off_t)n + (off_t)i;
        pos -= (off_t)n;
    }
    if (keep < 0)
        keep = 0;
    KMS_ENSURE(ftruncate(fd, keep) == 0 && fstat(fd, st) == 0, KMS_ERR_INTERNAL,
               "cannot cut the torn last line of the audit log %s: %s", path, strerror(errno));
    kms_warn("audit log %s ended with %lld bytes of a line cut short by a crash; they are removed",
             path, (long long)(size - keep));
    return KMS_OK;
}

/* The hash of the file's last line (a fragment without '\n' counts as one), or zeros. */
static kms_err last_line_hash(int fd, const struct stat *st, const char *path, uint8_t out[32])
{
    uint8_t buf[4096];
    off_t end, start, pos;

    memset(out, 0, 32);
    if (!S_ISREG(st->st_mode) || st->st_size == 0)
        return KMS_OK;
    end = st->st_size;
    KMS_ENSURE(pread(fd, buf, 1, end - 1) == 1, KMS_ERR_INTERNAL,
               "cannot read the audit log %s: %s", path, strerror(errno));
    if (buf[0] == '\n')
        end--;
    /* Back to the '\n' before the line. */
    start = 0;
    for (pos = end; pos > 0 && start == 0;) {
        size_t n = pos > (off_t)sizeof buf ? sizeof buf : (size_t)pos;
        ssize_t got = pread(fd, buf, n, pos - (off_t)n);
        KMS_ENSURE(got == (ssize_t)n, KMS_ERR_INTERNAL, "cannot read the audit log %s: %s", path,
                   strerror(errno));
        for (size_t i = n; i > 0; i--)
            if (buf[i - 1] == '\n') {
                start = pos - (off_t)n + (off_t)i;
                break;
            }
        pos -= (off_t)n;
    }
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    KMS_ENSURE(md != NULL, KMS_ERR_INTERNAL, "out of memory");
    kms_err rc = KMS_OK;
    if (EVP_DigestInit_ex(md, kms_md_sha256(), NULL) != 1)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "SHA-256 failed");
    for (pos = start; pos < end && rc == KMS_OK;) {
        size_t n = end - pos > (off_t)sizeof buf ? sizeof buf : (size_t)(end - pos);
        ssize_t got = pread(fd, buf, n, pos);
        if (got != (ssize_t)n)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot read the audit log %s: %s", path,
                          strerror(errno));
        else if (EVP_DigestUpdate(md, buf, n) != 1)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "SHA-256 failed");
        pos += (off_t)n;
    }
    unsigned len = 32;
    if (rc == KMS_OK && EVP_DigestFinal_ex(md, out, &len) != 1)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "SHA-256 failed");
    EVP_MD_CTX_free(md);
    return rc;
}

/*
 * Appends whole lines (each ending in '\n') with one writev(2). A short write
 * is cut off again, so the file holds all of them or none. With a fragment
 * left at the end of the file by an earlier failure, a '\n' goes first: the
 * fragment stays a line of its own (verify reports it) and ours stay whole.
 */
static kms_err append_locked(struct kms_audit *a, const uint8_t *data, size_t len)
{
    static const char newline = '\n';
    struct iovec iov[2];
    int n = 0;
    size_t total = 0;
    struct stat st;
    off_t before = -1;
    ssize_t w;

    if (a->partial)
        iov[n++] = (struct iovec){(void *)&newline, 1};
    iov[n++] = (struct iovec){(void *)data, len};
    for (int i = 0; i < n; i++)
        total += iov[i].iov_len;
    do
        w = writev(a->fd, iov, n);
    while (w < 0 && errno == EINTR);
    if (w == (ssize_t)total) {
        a->partial = 0;
        return KMS_OK;
    }
    int e = w < 0 ? errno : ENOSPC;
    /* The file is appended to by this process alone: it was w bytes shorter. */
    if (w > 0 && fstat(a->fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size >= w)
        before = st.st_size - w;
    if (w > 0 && (before < 0 || ftruncate(a->fd, before) != 0))
        a->partial = 1;
    return KMS_FAIL(KMS_ERR_INTERNAL, "cannot write the audit log %s: %s", a->path, strerror(e));
}

/* The first failure after a success is logged; a run of them is not. */
static kms_err failed_locked(struct kms_audit *a, kms_err rc)
{
    if (!a->failing)
        kms_error("audit log: %s; requests fail until it can be written", kms_err_message());
    a->failing = 1;
    return rc;
}

/* Counts a line towards the next checkpoint and wakes the thread that writes it. */
static void counted_locked(struct kms_audit *a)
{
    if (++a->since_cp == 1)
        a->first_since = mono_now();
    if (a->since_cp == 1 || a->since_cp % a->cp_lines == 0)
        pthread_cond_signal(&a->wake);
}

/* Lines from..to (tickets) could not be made durable: their answers fail closed. */
static void lost_locked(struct kms_audit *a, uint64_t from, uint64_t to)
{
    if (to < from)
        return;
    if (!a->lost_hi || from < a->lost_lo)
        a->lost_lo = from;
    if (to > a->lost_hi)
        a->lost_hi = to;
}

/*
 * Chains a line as the next one, in memory (pend): written by the committer
 * with the lines around it, or by write_pending_locked. Never fails for the
 * file's sake; only when there is no memory.
 */
static kms_err chain_line_locked(struct kms_audit *a, const struct kms_buf *line)
{
    uint8_t hash[32];
    size_t was = a->pend.len;
    kms_err rc = kms_sha256(line->data, line->len, hash);
    if (rc == KMS_OK)
        rc = kms_buf_append(&a->pend, line->data, line->len);
    if (rc == KMS_OK)
        rc = kms_buf_append(&a->pend, "\n", 1);
    if (rc != KMS_OK) {
        a->pend.len = was;
        return failed_locked(a, rc);
    }
    if (!was) {
        a->pend_seq = a->seq + 1;
        a->pend_lines = 0;
        memcpy(a->pend_prev, a->last, sizeof a->pend_prev);
        if (a->commit_idle)
            pthread_cond_signal(&a->commit_wake);
    }
    a->pend_lines++;
    a->tickets++;
    a->seq++;
    memcpy(a->last, hash, sizeof hash);
    counted_locked(a);
    return KMS_OK;
}

/*
 * Writes the chained lines not yet in the file, with one writev. When that
 * fails none of them is in the file: the chain goes back to the line before
 * them, they count as lost (their answers fail closed), and the next line
 * opens the path again.
 */
static kms_err write_pending_locked(struct kms_audit *a)
{
    if (!a->pend.len)
        return KMS_OK;
    kms_err rc = a->fd >= 0 ? append_locked(a, a->pend.data, a->pend.len)
                            : KMS_FAIL(KMS_ERR_INTERNAL, "the audit log %s is not open", a->path);
    uint64_t lines = a->pend_lines;
    a->pend.len = 0;
    a->pend_lines = 0;
    if (rc != KMS_OK) {
        lost_locked(a, a->tickets - lines + 1, a->tickets);
        a->seq = a->pend_seq - 1;
        memcpy(a->last, a->pend_prev, sizeof a->last);
        a->since_cp = a->since_cp > lines ? a->since_cp - lines : 0;
        return failed_locked(a, rc);
    }
    if (a->failing)
        kms_info("audit log %s is written again", a->path);
    a->failing = 0;
    return KMS_OK;
}

/* Chains a line and writes it now, with the lines chained before it. */
static kms_err write_line_locked(struct kms_audit *a, const struct kms_buf *line)
{
    KMS_GUARD(chain_line_locked(a, line));
    return write_pending_locked(a);
}

/* fdatasync; a file that cannot be synced (a pipe, /dev/null) counts as flushed. */
static int flush_fd(int fd)
{
    return fdatasync(fd) == 0 || errno == EINVAL || errno == EROFS;
}

/* 1: the line is on disk, -1: its flush failed, 0: not known yet. */
static int verdict_locked(const struct kms_audit *a, uint64_t ticket)
{
    if (a->lost_hi && ticket >= a->lost_lo && ticket <= a->lost_hi)
        return -1;
    return ticket <= a->durable ? 1 : 0;
}

/*
 * Lets go of the file being written, its lines written and flushed first:
 * the committer flushes only the file being written when it runs. Under
 * the lock, but only when the file changes (rotation, removal, a failure).
 */
static void retire_fd_locked(struct kms_audit *a)
{
    if (a->fd < 0)
        return;
    if (write_pending_locked(a) != KMS_OK)
        kms_err_clear(); /* lost, and said so */
    if (a->durable < a->tickets) {
        if (flush_fd(a->fd)) {
            a->durable = a->tickets;
        } else {
            kms_error("audit log %s: fdatasync failed: %s; the answers waiting for it fail",
                      a->path, strerror(errno));
            lost_locked(a, a->durable + 1, a->tickets);
        }
    }
    close(a->fd);
    a->fd = -1;
}

/*
 * The committer: while answers wait, one fdatasync of the file being written
 * makes every line written before it durable; then each wait it settled is
 * handed back (outside the lock). Lines written during a flush wait for the
 * next one, so a flush covers all that came while the one before ran.
 */
static void *commit_thread(void *arg)
{
    struct kms_audit *a = arg;
    pthread_mutex_lock(&a->lock);
    for (;;) {
        if (!a->waiters && !a->commit_stop) {
            /*
             * Woken by the first wait, not by every line (a wake-up costs more
             * than the line): a line nobody waits for (a refusal's) is written
             * with the next batch, or LAZY_MS after the committer saw it.
             */
            if (!a->pend.len) {
                a->commit_idle = 1;
                pthread_cond_wait(&a->commit_wake, &a->lock);
                a->commit_idle = 0;
                continue;
            }
            struct timespec until = mono_after(LAZY_MS * 1000000L);
            if (pthread_cond_timedwait(&a->commit_wake, &a->lock, &until) == 0)
                continue;
        }
        /*
         * A flush costs the machine far more than a line (on a virtual disk,
         * tens of microseconds of CPU): while requests come faster than one
         * a flush, wait as long as the last flush took for more lines to
         * share the next one. One at a time (the last flush covered one
         * line) waits for nothing.
         */
        if (a->waiters && a->gather_ns && !a->commit_stop) {
            struct timespec until = mono_after(a->gather_ns);
            while (pthread_cond_timedwait(&a->commit_wake, &a->lock, &until) == 0)
                ; /* a wait registered: more to gather, until the time is up */
        }
        /* The lines chained since the last batch, in one write. */
        if (write_pending_locked(a) != KMS_OK)
            kms_err_clear(); /* lost (their waits fail below), and said so */
        if (!a->waiters) {
            if (a->commit_stop)
                break;
            continue;
        }
        uint64_t from = a->durable + 1, target = a->tickets;
        int have = a->fd >= 0;
        int fd = have ? dup(a->fd) : -1;
        pthread_mutex_unlock(&a->lock);
        /* No file: every line was flushed (or lost) when its file was let go. */
        struct timespec t0 = mono_now();
        int ok = !have || (fd >= 0 && flush_fd(fd));
        int e = errno;
        struct timespec t1 = mono_now();
        int64_t took = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000 + (t1.tv_nsec - t0.tv_nsec);
        if (fd >= 0)
            close(fd);
        pthread_mutex_lock(&a->lock);
        /* Under the lock, so that kms_audit_observe(a, NULL, NULL) stops it at once. */
        if (fd >= 0 && a->observe)
            a->observe(a->observe_arg, took > 0 ? (uint64_t)took : 0);
        a->gather_ns = target - from >= 1 ? (took < GATHER_MAX_NS ? took : GATHER_MAX_NS) : 0;
        if (!ok) {
            if (!a->flush_failing)
                kms_error("audit log %s: fdatasync failed: %s; requests fail until it works",
                          a->path, fd < 0 ? "no descriptor" : strerror(e));
            a->flush_failing = 1;
            lost_locked(a, from, target);
        } else {
            if (a->flush_failing)
                kms_info("audit log %s: fdatasync works again", a->path);
            a->flush_failing = 0;
            if (have && target > a->durable) {
                a->flushes++;
                a->flushed += target - a->durable;
            }
            if (target > a->durable)
                a->durable = target;
        }
        struct kms_audit_wait *ready = NULL, **p = &a->waiters;
        while (*p) {
            struct kms_audit_wait *w = *p;
            w->result = verdict_locked(a, w->ticket);
            if (w->result) {
                *p = w->next;
                w->next = ready;
                ready = w;
            } else {
                p = &w->next;
            }
        }
        pthread_mutex_unlock(&a->lock);
        while (ready) {
            struct kms_audit_wait *w = ready;
            ready = w->next; /* w is the caller's again once done runs */
            w->done(w, w->result > 0);
        }
        pthread_mutex_lock(&a->lock);
    }
    pthread_mutex_unlock(&a->lock);
    return NULL;
}

int kms_audit_wait(struct kms_audit *a, struct kms_audit_wait *w)
{
    pthread_mutex_lock(&a->lock);
    int v = verdict_locked(a, w->ticket);
    if (v == 0 && a->commit_stop) {
        /* The committer is gone or going: written and flushed here. */
        if (write_pending_locked(a) != KMS_OK)
            kms_err_clear();
        if (a->fd < 0 || flush_fd(a->fd))
            a->durable = a->tickets;
        else
            lost_locked(a, a->durable + 1, a->tickets);
        v = verdict_locked(a, w->ticket);
    }
    if (v == 0) {
        w->next = a->waiters;
        a->waiters = w;
        if (!w->next)
            pthread_cond_signal(&a->commit_wake);
    }
    pthread_mutex_unlock(&a->lock);
    return v;
}

void kms_audit_observe(struct kms_audit *a, kms_audit_observer fn, void *arg)
{
    pthread_mutex_lock(&a->lock);
    a->observe = fn;
    a->observe_arg = arg;
    pthread_mutex_unlock(&a->lock);
}

void kms_audit_commit_stats(struct kms_audit *a, struct kms_audit_commit_stats *out)
{
    pthread_mutex_lock(&a->lock);
    out->flushes = a->flushes;
    out->lines = a->flushed;
    pthread_mutex_unlock(&a->lock);
}

/*
 * Watches the file a->fd now is (through /proc/self/fd, so it is that file
 * and not whatever the path names by now) for changes of its links or name:
 * IN_ATTRIB (link count: unlink, rename over it), IN_MOVE_SELF,
 * IN_DELETE_SELF; not IN_MODIFY, so our own lines wake nobody. The next line
 * looks once anyway: the file may have gone between its open and the watch.
 * Without a watch, every line looks, as it did before there was one.
 */
static void watch_file_locked(struct kms_audit *a)
{
    char proc[64];

    if (a->ino_fd < 0)
        return;
    if (a->ino_wd >= 0)
        inotify_rm_watch(a->ino_fd, a->ino_wd); /* EINVAL when the kernel dropped it: fine */
    a->ino_wd = -1;
    if (a->fd >= 0) {
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", a->fd);
        a->ino_wd = inotify_add_watch(a->ino_fd, proc, IN_ATTRIB | IN_MOVE_SELF | IN_DELETE_SELF);
    }
    __atomic_store_n(&a->look, 1, __ATOMIC_RELEASE);
}

/* No watch from now on (its thread stopped or failed): every line looks. */
static void unwatch_locked(struct kms_audit *a)
{
    if (a->ino_fd >= 0)
        close(a->ino_fd);
    a->ino_fd = -1;
    a->ino_wd = -1;
}

/*
 * The watcher: sets look whenever the kernel reports a change of the file's
 * links or name (or lost events: IN_Q_OVERFLOW). It reads events only to
 * drain them; which file they name does not matter, one more look is cheap.
 */
static void *watch_thread(void *arg)
{
    struct kms_audit *a = arg;
    char buf[4096] __attribute__((aligned(__alignof__(struct inotify_event))));
    struct pollfd p[2] = {{a->ino_fd, POLLIN, 0}, {a->stop_fd[0], POLLIN, 0}};

    const char *why = NULL;
    while (!why) {
        if (poll(p, 2, -1) < 0) {
            if (errno != EINTR)
                why = strerror(errno);
            continue;
        }
        if (p[1].revents)
            return NULL;
        if (p[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
            why = "the inotify descriptor failed";
            continue;
        }
        ssize_t n = read(a->ino_fd, buf, sizeof buf);
        if (n < 0 && errno != EAGAIN && errno != EINTR)
            why = strerror(errno);
        else if (n > 0)
            __atomic_store_n(&a->look, 1, __ATOMIC_RELEASE);
    }
    kms_warn("audit log %s: watching the file failed (%s); it is looked at before every line",
             a->path, why);
    pthread_mutex_lock(&a->lock);
    unwatch_locked(a);
    pthread_mutex_unlock(&a->lock);
    return NULL;
}

/*
 * Makes sure there is a file to write to. When the last write failed or the
 * file was removed, opens the path again: the same file is kept, another
 * one starts with a "reopen" line. Never uses the token.
 */
static kms_err ensure_file_locked(struct kms_audit *a, const char *reason)
{
    struct stat st;
    int fd, partial;
    kms_err rc;

    if (a->fd >= 0 && !a->failing) {
        /*
         * A removed log would swallow every line from now on: look for a new
         * one. Looked at only when the watch says the file's links or name
         * changed (or there is no watch): a line's only file-system call is
         * then its write. A line racing the removal may still go to the
         * removed file, as it could when the look was an fstat before the
         * write.
         */
        if (a->ino_wd >= 0 && !__atomic_exchange_n(&a->look, 0, __ATOMIC_ACQ_REL))
            return KMS_OK;
        if (fstat(a->fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_nlink > 0)
            return KMS_OK;
        kms_warn("audit log %s was removed: opening it again", a->path);
    }
    rc = open_path(a->path, &fd, &st, &partial);
    if (rc != KMS_OK)
        return failed_locked(a, rc);
    if (a->fd >= 0 && st.st_dev == a->dev && st.st_ino == a->ino) {
        close(fd);
        return KMS_OK; /* the same file: try the write again */
    }
    retire_fd_locked(a);
    a->fd = fd;
    a->dev = st.st_dev;
    a->ino = st.st_ino;
    a->partial = partial;
    watch_file_locked(a);
    char time[KMS_AUDIT_TIME_LEN + 1];
    struct kms_buf line = KMS_BUF_INIT;
    now_text(time);
    rc = kms_audit_reopen_line(a->log_id, a->seq + 1, a->last, time, reason, &line);
    if (rc == KMS_OK)
        rc = write_line_locked(a, &line);
    kms_buf_free(&line);
    return rc;
}

/* Lets a checkpoint that lost its place to lines have the next one, but not for long. */
static void wait_hold_locked(struct kms_audit *a)
{
    struct timespec until = mono_after(HOLD_MAX_MS * 1000000L);
    while (a->hold)
        if (pthread_cond_timedwait(&a->held, &a->lock, &until) != 0) {
            a->hold = 0; /* the token is slow or hung: lines go on, the checkpoint waits */
            pthread_cond_broadcast(&a->held);
            break;
        }
}

static struct open_intent *find_open_locked(struct kms_audit *a, const char *id)
{
    for (size_t i = 0; i < a->nopen; i++)
        if (strcmp(a->open[i].id, id) == 0)
            return &a->open[i];
    return NULL;
}

static struct open_intent *add_open_locked(struct kms_audit *a, const char *id, int state,
                                           int recovery)
{
    struct open_intent *o = find_open_locked(a, id);
    if (o)
        return o;
    if (a->nopen >= KMS_AUDIT_OPEN_MAX || strlen(id) > KMS_REQUEST_ID_MAX)
        return NULL;
    o = &a->open[a->nopen++];
    snprintf(o->id, sizeof o->id, "%s", id);
    o->state = state;
    o->recovery = recovery;
    return o;
}

/*
 * Writes the outcome (or recovery) lines whose result is known and not yet
 * written, in the order their intents came. A line that cannot be written
 * fails the caller's line too: the log is not writable.
 */
static kms_err flush_results_locked(struct kms_audit *a)
{
    size_t kept = 0;
    kms_err rc = KMS_OK;
    for (size_t i = 0; i < a->nopen; i++) {
        struct open_intent *o = &a->open[i];
        int known = o->state == OPEN_COMMITTED || o->state == OPEN_NOT_COMMITTED;
        if (known && rc == KMS_OK) {
            struct kms_buf line = KMS_BUF_INIT;
            char time[KMS_AUDIT_TIME_LEN + 1];
            now_text(time);
            rc =
                result_line(o->recovery ? "recovery" : "outcome", o->id, o->state == OPEN_COMMITTED,
                            a->log_id, a->seq + 1, a->last, time, &line);
            if (rc == KMS_OK)
                rc = write_line_locked(a, &line);
            kms_buf_free(&line);
            if (rc == KMS_OK)
                continue; /* written: no longer open */
        }
        if (kept != i)
            a->open[kept] = *o;
        kept++;
    }
    a->nopen = kept;
    return rc;
}

kms_err kms_audit_intent(struct kms_audit *a, const struct kms_audit_change *c)
{
    struct kms_buf line = KMS_BUF_INIT;
    char time[KMS_AUDIT_TIME_LEN + 1];
    int fd = -1;
    kms_err rc;

    KMS_ENSURE(a && c && c->request_id, KMS_ERR_INTERNAL, "no audit log");
    pthread_mutex_lock(&a->lock);
    wait_hold_locked(a);
    rc = a->nopen < KMS_AUDIT_OPEN_MAX && !find_open_locked(a, c->request_id)
             ? ensure_file_locked(a, "recover")
             : KMS_FAIL(KMS_ERR_INTERNAL, "%zu changes wait for their outcome lines", a->nopen);
    if (rc == KMS_OK)
        rc = flush_results_locked(a);
    if (rc == KMS_OK) {
        now_text(time);
        rc = intent_line(c, a->log_id, a->seq + 1, a->last, time, &line);
    }
    if (rc == KMS_OK)
        rc = write_line_locked(a, &line);
    if (rc == KMS_OK) {
        add_open_locked(a, c->request_id, OPEN_IN_FLIGHT, 0);
        fd = dup(a->fd);
    }
    pthread_mutex_unlock(&a->lock);
    kms_buf_free(&line);
    /* On disk before the change commits, outside the lock: other lines need not wait. */
    if (rc == KMS_OK && (fd < 0 || !flush_fd(fd))) {
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot flush the audit log %s: %s", a->path,
                      strerror(errno));
        kms_audit_outcome(a, c->request_id, KMS_AUDIT_NOT_COMMITTED);
    }
    if (fd >= 0)
        close(fd);
    if (rc != KMS_OK) {
        kms_error("audit log: a change's intent: %s; the change is refused", kms_err_message());
        return KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT,
                        "The change could not be audited and was not made; retry later");
    }
    return KMS_OK;
}

void kms_audit_outcome(struct kms_audit *a, const char *request_id, int result)
{
    if (!a || !request_id)
        return;
    pthread_mutex_lock(&a->lock);
    struct open_intent *o = find_open_locked(a, request_id);
    if (o) {
        o->state = result == KMS_AUDIT_COMMITTED       ? OPEN_COMMITTED
                   : result == KMS_AUDIT_NOT_COMMITTED ? OPEN_NOT_COMMITTED
                                                       : OPEN_UNKNOWN;
        if (o->state != OPEN_UNKNOWN) {
            wait_hold_locked(a);
            /* Not written now: before the next line that is, and listed open until then. */
            if (ensure_file_locked(a, "recover") != KMS_OK || flush_results_locked(a) != KMS_OK)
                kms_err_clear();
        }
    }
    pthread_mutex_unlock(&a->lock);
}

/*
 * A request thread's buffers for its audit lines, kept from one request to
 * the next (freed when the thread ends): a line then costs no allocation.
 * They hold no secret (a line never holds key material or plaintext, and the
 * context only as a keyed digest), but kms_buf_free cleanses them anyway.
 */
struct line_scratch {
    struct kms_audit_template t;
    struct kms_buf line;
};
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
static int scratch_ok;

static void scratch_free(void *p)
{
    struct line_scratch *s = p;
    kms_audit_template_free(&s->t);
    kms_buf_free(&s->line);
    free(s);
}

static void scratch_init(void)
{
    scratch_ok = pthread_key_create(&scratch_key, scratch_free) == 0;
}

/* This thread's buffers, emptied; NULL when there are none (then the caller's own are used). */
static struct line_scratch *scratch_get(void)
{
    struct line_scratch *s;
    pthread_once(&scratch_once, scratch_init);
    if (!scratch_ok)
        return NULL;
    s = pthread_getspecific(scratch_key);
    if (!s) {
        s = calloc(1, sizeof *s);
        if (s && pthread_setspecific(scratch_key, s) != 0) {
            free(s);
            s = NULL;
        }
    }
    if (s) {
        s->t.text.len = 0;
        s->t.at_prev = s->t.at_seq = s->t.at_time = 0;
        s->line.len = 0;
    }
    return s;
}

kms_err kms_audit_write(struct kms_audit *a, const struct kms_audit_record *r, uint64_t *ticket)
{
    struct line_scratch own = {{KMS_BUF_INIT, 0, 0, 0}, KMS_BUF_INIT};
    struct line_scratch *s = scratch_get();
    char time[KMS_AUDIT_TIME_LEN + 1];
    kms_err rc;

    KMS_ENSURE(a && r, KMS_ERR_INTERNAL, "no audit log");
    if (!s)
        s = &own;
    struct kms_audit_template *tp = &s->t;
    struct kms_buf *line = &s->line;
    rc = template_build(r, a->log_id, a->digest_key, tp);
    if (rc != KMS_OK) {
        kms_audit_template_free(&own.t);
        return rc;
    }
    pthread_mutex_lock(&a->lock);
    wait_hold_locked(a);
    rc = ensure_file_locked(a, "recover");
    if (rc == KMS_OK && a->nopen)
        rc = flush_results_locked(a);
    if (rc == KMS_OK) {
        now_text(time);
        rc = kms_audit_template_fill(tp, a->seq + 1, a->last, time, line);
    }
    if (rc == KMS_OK)
        rc = chain_line_locked(a, line); /* written by the committer, with the lines around it */
    if (rc == KMS_OK && ticket)
        *ticket = a->tickets;
    pthread_mutex_unlock(&a->lock);
    kms_buf_free(&own.line);
    kms_audit_template_free(&own.t);
    return rc;
}

kms_err kms_audit_alert(struct kms_audit *a, const struct kms_audit_alert *al)
{
    struct kms_buf line = KMS_BUF_INIT;
    char time[KMS_AUDIT_TIME_LEN + 1];
    kms_err rc;

    KMS_ENSURE(a && al, KMS_ERR_INTERNAL, "no audit log");
    pthread_mutex_lock(&a->lock);
    wait_hold_locked(a);
    rc = ensure_file_locked(a, "recover");
    if (rc == KMS_OK) {
        now_text(time);
        rc = kms_audit_alert_line(al, a->log_id, a->seq + 1, a->last, time, &line);
    }
    if (rc == KMS_OK)
        rc = write_line_locked(a, &line);
    pthread_mutex_unlock(&a->lock);
    kms_buf_free(&line);
    return rc;
}

enum {
    CP_FORCE = 1,  /* even when no line was written since the last */
    CP_AS_IS = 2,  /* to the file as it is (at open, and to seal a rotated file) */
    CP_SWITCH = 4, /* then, under the same lock, go on in a new file at the path */
};

/*
 * The node's head in the database: this checkpoint, MAC'd in the token. A
 * head that cannot be written leaves the one before, which the log still
 * reaches: it is logged, not fatal.
 */
static kms_err put_head(struct kms_audit *a, struct kms_session *s, uint64_t seq,
                        const uint8_t hash[32])
{
    struct kms_audit_head_row h;
    struct kms_buf body = KMS_BUF_INIT;
    struct kms_tx *tx = NULL;
    uint8_t mac[32];
    kms_err rc;

    if (!a->store)
        return KMS_OK;
    memset(&h, 0, sizeof h);
    snprintf(h.node, sizeof h.node, "%s", a->node);
    snprintf(h.log, sizeof h.log, "%s", a->log_id);
    snprintf(h.key, sizeof h.key, "%s", a->key_hex);
    h.seq = seq;
    kms_hex_encode(hash, 32, h.hash);
    h.updated = (int64_t)time(NULL);
    rc = kms_audit_head_body(h.node, h.log, h.seq, h.hash, &body);
    if (rc == KMS_OK)
        rc = kms_hsm_hmac_sha256(s, a->key, body.data, body.len, mac);
    kms_buf_free(&body);
    if (rc == KMS_OK) {
        kms_hex_encode(mac, 32, h.mac);
        rc = kms_store_begin(a->store, KMS_TX_WRITE, &tx);
    }
    if (rc == KMS_OK)
        rc = kms_store_audit_head_put(tx, &h);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    return rc;
}

/* The open intents' ids, copied under lock for a checkpoint. */
struct open_ids {
    char ids[KMS_AUDIT_OPEN_MAX][KMS_REQUEST_ID_MAX + 1];
    const char *list[KMS_AUDIT_OPEN_MAX];
    size_t n;
};

static void copy_open_locked(const struct kms_audit *a, struct open_ids *out)
{
    out->n = 0;
    for (size_t i = 0; i < a->nopen; i++) {
        memcpy(out->ids[out->n], a->open[i].id, sizeof out->ids[0]);
        out->list[out->n] = out->ids[out->n];
        out->n++;
    }
}

/*
 * Writes a checkpoint of the given kind, MAC'd in the token, and makes it the
 * node's head in the database. Call with cp_lock held and lock not held.
 * With CP_SWITCH and the checkpoint written, *tried is set and *switched
 * receives the result of opening the new file.
 *
 * The token is not asked under lock: a slow or hung token must not stop the
 * lines of requests that do not use it. The MAC covers the checkpoint's own
 * seq and prev, so a line written meanwhile takes its place; then it tries
 * again while lines wait for it (HOLD_MAX_MS at most).
 */
static kms_err checkpoint_cp_locked(struct kms_audit *a, struct kms_session *s, const char *kind,
                                    int flags, kms_err *switched, int *tried)
{
    struct kms_buf body = KMS_BUF_INIT, line = KMS_BUF_INIT;
    char time[KMS_AUDIT_TIME_LEN + 1];
    uint8_t mac[32], hash[32], prev[32];
    uint64_t seq = 0, base = 0, tick = 0;
    int sync_fd = -1;
    kms_err rc = KMS_OK;
    int opening = strcmp(kind, "open") == 0;
    struct open_ids *open = malloc(sizeof *open);
    struct kms_audit_checkpoint_extra extra = {
        .node = opening ? a->node : NULL,
        .after_log = opening && a->after_log[0] ? a->after_log : NULL,
        .after_seq = a->after_seq,
        .after_hash = a->after_hash,
    };

    KMS_ENSURE(open != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (int attempt = 0;; attempt++) {
        pthread_mutex_lock(&a->lock);
        if (!(flags & CP_FORCE) && a->since_cp == 0) {
            pthread_mutex_unlock(&a->lock);
            break;
        }
        if (!(flags & CP_AS_IS)) {
            rc = ensure_file_locked(a, "recover");
            if (rc == KMS_OK && a->nopen)
                rc = flush_results_locked(a);
        } else if (a->fd < 0)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "the audit log %s is not open", a->path);
        if (rc == KMS_OK) {
            a->hold = attempt > 0;
            base = a->seq;
            memcpy(prev, a->last, 32);
            now_text(time);
            copy_open_locked(a, open);
            extra.open = open->list;
            extra.nopen = open->n;
        }
        pthread_mutex_unlock(&a->lock);
        if (rc != KMS_OK)
            break;
        body.len = line.len = 0;
        rc = kms_audit_checkpoint_body(a->key_hex, kind, a->log_id, base + 1, prev, time, &extra,
                                       &body);
        if (rc == KMS_OK)
            rc = kms_hsm_hmac_sha256(s, a->key, body.data, body.len, mac);
        if (rc == KMS_OK)
            rc = kms_audit_checkpoint_line(&body, mac, &line);
        pthread_mutex_lock(&a->lock);
        if (a->hold) {
            a->hold = 0;
            pthread_cond_broadcast(&a->held);
        }
        if (rc == KMS_OK && a->seq != base) {
            pthread_mutex_unlock(&a->lock);
            if (attempt < 3)
                continue;
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "the checkpoint kept losing its place to other lines");
            break;
        }
        if (rc == KMS_OK)
            rc = write_line_locked(a, &line);
        if (rc == KMS_OK) {
            seq = a->seq;
            tick = a->tickets;
            memcpy(hash, a->last, 32);
            a->since_cp = 0;
            if (flags & CP_SWITCH) {
                /* No line may come between the seal and the new file. */
                retire_fd_locked(a); /* flushed, before the database says it is there */
                *switched = ensure_file_locked(a, "sighup");
                *tried = 1;
            } else {
                sync_fd = dup(a->fd);
            }
        }
        pthread_mutex_unlock(&a->lock);
        break;
    }
    kms_buf_free(&body);
    kms_buf_free(&line);
    free(open);
    if (rc != KMS_OK || seq == 0)
        return rc;
    /* On disk before the database says it is there: else a crash could look like a cut. */
    if (sync_fd >= 0) {
        if (!flush_fd(sync_fd)) {
            kms_warn("audit log %s: fdatasync failed: %s", a->path, strerror(errno));
        } else {
            /* Every line up to the checkpoint is in this file or one flushed before. */
            pthread_mutex_lock(&a->lock);
            if (tick > a->durable)
                a->durable = tick;
            pthread_mutex_unlock(&a->lock);
        }
        close(sync_fd);
    }
    if (put_head(a, s, seq, hash) != KMS_OK) {
        kms_warn("audit log: the node's head in the database was not updated: %s",
                 kms_err_message());
        kms_err_clear();
    }
    return KMS_OK;
}

/*
 * Looks up in the database the intents whose result is not known (a commit
 * that failed, a run before that stopped first): found, its change
 * committed. Their lines are written with the next line. The lookups happen
 * under no lock; a database that does not answer leaves them open.
 */
static void settle_unknown(struct kms_audit *a)
{
    char id[KMS_REQUEST_ID_MAX + 1];
    if (!a->store)
        return;
    for (size_t done = 0; done < KMS_AUDIT_OPEN_MAX; done++) {
        int found = 0, have = 0;
        pthread_mutex_lock(&a->lock);
        for (size_t i = 0; i < a->nopen && !have; i++)
            if (a->open[i].state == OPEN_UNKNOWN) {
                memcpy(id, a->open[i].id, sizeof id);
                a->open[i].state = OPEN_IN_FLIGHT; /* being looked up */
                have = 1;
            }
        pthread_mutex_unlock(&a->lock);
        if (!have)
            return;
        struct kms_tx *tx = NULL;
        kms_err rc = kms_store_begin(a->store, KMS_TX_READ, &tx);
        if (rc == KMS_OK)
            rc = kms_store_change_request_find(tx, id, &found);
        if (rc == KMS_OK)
            rc = kms_store_commit(tx);
        kms_store_rollback(tx);
        pthread_mutex_lock(&a->lock);
        struct open_intent *o = find_open_locked(a, id);
        if (o)
            o->state = rc != KMS_OK ? OPEN_UNKNOWN : found ? OPEN_COMMITTED : OPEN_NOT_COMMITTED;
        pthread_mutex_unlock(&a->lock);
        if (rc != KMS_OK) {
            kms_warn("audit log: cannot settle the change of request %s yet: %s", id,
                     kms_err_message());
            kms_err_clear();
            return;
        }
    }
}

static kms_err checkpoint(struct kms_audit *a, const char *kind, int flags)
{
    struct kms_session *s;
    settle_unknown(a);
    KMS_GUARD(kms_hsm_acquire(a->hsm, &s));
    pthread_mutex_lock(&a->cp_lock);
    kms_err rc = checkpoint_cp_locked(a, s, kind, flags, NULL, NULL);
    pthread_mutex_unlock(&a->cp_lock);
    kms_hsm_release(s);
    return rc;
}

kms_err kms_audit_checkpoint(struct kms_audit *a)
{
    return checkpoint(a, "periodic", 0);
}

static struct timespec add_seconds(struct timespec t, unsigned s)
{
    t.tv_sec += s;
    return t;
}

/* Writes a checkpoint every cp_lines lines, and cp_seconds at most after a line. */
static void *checkpoint_thread(void *arg)
{
    struct kms_audit *a = arg;
    pthread_mutex_lock(&a->lock);
    while (!a->stopping) {
        if (a->since_cp == 0) {
            pthread_cond_wait(&a->wake, &a->lock);
            continue;
        }
        struct timespec now = mono_now(), due = add_seconds(a->first_since, a->cp_seconds);
        if (a->since_cp >= a->cp_lines)
            due = now;
        if (ts_before(due, a->retry_at))
            due = a->retry_at;
        if (ts_before(now, due)) {
            pthread_cond_timedwait(&a->wake, &a->lock, &due);
            continue;
        }
        pthread_mutex_unlock(&a->lock);
        kms_err rc = checkpoint(a, "periodic", 0);
        if (rc != KMS_OK)
            kms_error("audit log: could not write a checkpoint: %s", kms_err_message());
        kms_err_clear();
        pthread_mutex_lock(&a->lock);
        if (rc != KMS_OK)
            a->retry_at = add_seconds(mono_now(), a->cp_seconds < 5 ? a->cp_seconds : 5);
    }
    pthread_mutex_unlock(&a->lock);
    return NULL;
}

kms_err kms_audit_reopen(struct kms_audit *a)
{
    struct kms_session *s;
    struct stat st;
    kms_err rc = KMS_OK, switched = KMS_OK;
    int tried = 0;

    pthread_mutex_lock(&a->cp_lock);
    pthread_mutex_lock(&a->lock);
    int same = a->fd >= 0 && stat(a->path, &st) == 0 && st.st_dev == a->dev && st.st_ino == a->ino;
    int sealable = a->fd >= 0 && !a->failing;
    pthread_mutex_unlock(&a->lock);
    if (same) {
        pthread_mutex_unlock(&a->cp_lock);
        return KMS_OK; /* nothing was rotated */
    }
    if (sealable) {
        /* Seal the old file: its last line says the log goes on in another file. */
        rc = kms_hsm_acquire(a->hsm, &s);
        if (rc == KMS_OK) {
            rc = checkpoint_cp_locked(a, s, "rotate", CP_FORCE | CP_AS_IS | CP_SWITCH, &switched,
                                      &tried);
            kms_hsm_release(s);
        }
        if (rc != KMS_OK) {
            kms_warn("audit log: the rotated file could not be sealed with a checkpoint: %s",
                     kms_err_message());
            kms_err_clear();
        }
    }
    if (tried) {
        rc = switched;
    } else {
        pthread_mutex_lock(&a->lock);
        retire_fd_locked(a);
        rc = ensure_file_locked(a, "sighup");
        pthread_mutex_unlock(&a->lock);
    }
    pthread_mutex_unlock(&a->cp_lock);
    return rc;
}

/* The token's audit key, made when there is none: the lowest CKA_ID of those found. */
static kms_err find_key(struct kms_session *s, CK_OBJECT_HANDLE *out, char *id_hex)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_LABEL, (void *)KMS_AUDIT_KEY_LABEL, sizeof KMS_AUDIT_KEY_LABEL - 1},
    };
    CK_OBJECT_HANDLE *handles = NULL;
    size_t n = 0;
    uint8_t best[KMS_AUDIT_KEY_ID_LEN];
    int found = 0;
    kms_err rc;

    for (int round = 0; round < 2 && !found; round++) {
        rc = kms_hsm_find(s, tmpl, 3, &handles, &n);
        if (rc != KMS_OK)
            return rc;
        for (size_t i = 0; i < n && rc == KMS_OK; i++) {
            struct kms_buf id = KMS_BUF_INIT;
            rc = kms_hsm_get_bytes(s, handles[i], CKA_ID, &id);
            if (rc == KMS_OK && id.len == KMS_AUDIT_KEY_ID_LEN &&
                (!found || memcmp(id.data, best, sizeof best) < 0)) {
                memcpy(best, id.data, sizeof best);
                *out = handles[i];
                found = 1;
            }
            kms_buf_free(&id);
        }
        free(handles);
        handles = NULL;
        if (rc != KMS_OK)
            return rc;
        if (!found && round == 0) {
            /*
             * First start. Two nodes starting at once may each make one: every
             * checkpoint names its key, and the next start takes the lowest id.
             */
            CK_OBJECT_HANDLE h;
            KMS_ENSURE(RAND_bytes(best, sizeof best) == 1, KMS_ERR_INTERNAL,
                       "random generator failed");
            KMS_GUARD(kms_hsm_generate_hmac(s, best, sizeof best, KMS_AUDIT_KEY_LABEL, &h));
            kms_info("audit log: made the token's audit key");
        }
    }
    KMS_ENSURE(found, KMS_ERR_INTERNAL, "the token's audit key was made but cannot be found");
    kms_hex_encode(best, sizeof best, id_hex);
    return KMS_OK;
}

/* Longest tail of the file read at start for the run before's last checkpoint. */
#define SCAN_MAX (16u << 20)

/* The node's head in the database: *have 0 when there is none (or no database). */
static kms_err read_head(struct kms_audit *a, struct kms_session *s, struct kms_audit_head_row *h,
                         int *have)
{
    struct kms_tx *tx = NULL;
    struct kms_buf body = KMS_BUF_INIT;
    uint8_t mac[32];
    char hex[65];

    *have = 0;
    if (!a->store)
        return KMS_OK;
    kms_err rc = kms_store_begin(a->store, KMS_TX_READ, &tx);
    if (rc == KMS_OK)
        rc = kms_store_audit_head_get(tx, a->node, h);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    if (rc == KMS_ERR_NOT_FOUND)
        return KMS_OK;
    KMS_GUARD(rc);
    KMS_ENSURE(strlen(h->log) == 2 * KMS_AUDIT_LOG_ID_LEN && strlen(h->hash) == 64,
               KMS_ERR_INTERNAL, "the database's audit head of node %s is malformed", a->node);
    *have = 1;
    /* Checked here too so the log says so at once; verify reports it. */
    rc = kms_audit_head_body(h->node, h->log, h->seq, h->hash, &body);
    if (rc == KMS_OK && strcmp(h->key, a->key_hex) == 0)
        rc = kms_hsm_hmac_sha256(s, a->key, body.data, body.len, mac);
    kms_buf_free(&body);
    KMS_GUARD(rc);
    kms_hex_encode(mac, 32, hex);
    if (strcmp(h->key, a->key_hex) != 0 || CRYPTO_memcmp(hex, h->mac, 64) != 0)
        kms_error("audit log: the database's head of node %s does not verify (altered?): "
                  "p11kms-audit verify will report it",
                  a->node);
    return KMS_OK;
}

/* One line of the tail read at start: its log, seq, type, and the parsed object. */
static json_t *parse_tail_line(const char *p, size_t n, const char **log, uint64_t *seq,
                               const char **type)
{
    json_t *o = json_loadb(p, n, JSON_REJECT_DUPLICATES, NULL);
    json_t *sq = json_object_get(o, "seq");
    *log = json_string_value(json_object_get(o, "log"));
    *type = json_string_value(json_object_get(o, "type"));
    *seq = json_is_integer(sq) ? (uint64_t)json_integer_value(sq) : 0;
    if (!o || !*log || !*type) {
        json_decref(o);
        return NULL;
    }
    return o;
}

/* An intent of a run before, to be settled. */
static void carry(struct kms_audit *a, const char *id)
{
    if (id && !add_open_locked(a, id, OPEN_UNKNOWN, 1))
        kms_warn("audit log: more than %d open intents to settle: %s is left to p11kms-audit "
                 "verify",
                 KMS_AUDIT_OPEN_MAX, id);
}

/* Intents of the run before that lines after its last checkpoint leave open. */
static void carry_line(struct kms_audit *a, json_t *o, const char *type)
{
    const char *id = json_string_value(json_object_get(o, "request_id"));
    if (strcmp(type, "checkpoint") == 0) {
        json_t *list = json_object_get(o, "open");
        for (size_t i = 0; i < json_array_size(list); i++)
            carry(a, json_string_value(json_array_get(list, i)));
    } else if (strcmp(type, "intent") == 0) {
        carry(a, id);
    } else if (id && (strcmp(type, "outcome") == 0 || strcmp(type, "recovery") == 0)) {
        struct open_intent *x = find_open_locked(a, id);
        if (x) {
            size_t k = (size_t)(x - a->open);
            memmove(x, x + 1, (a->nopen - k - 1) * sizeof *x);
            a->nopen--;
        }
    }
}

/*
 * The run before on this node, from its head and the end of the file: what
 * the "open" checkpoint names (its last line when it is the file's last, else
 * the head), and the intents it left without an outcome, from its last
 * checkpoint on, to be settled after the "open" checkpoint.
 */
static kms_err scan_previous(struct kms_audit *a, int fd, const struct stat *st,
                             const struct kms_audit_head_row *h)
{
    off_t size = S_ISREG(st->st_mode) ? st->st_size : 0;
    off_t from = size > (off_t)SCAN_MAX ? size - (off_t)SCAN_MAX : 0;
    size_t n = (size_t)(size - from), nlines = 0, found = SIZE_MAX;
    char *buf = malloc(n + 1);
    size_t *starts = NULL;
    kms_err rc = KMS_OK;

    snprintf(a->after_log, sizeof a->after_log, "%s", h->log);
    a->after_seq = h->seq;
    snprintf(a->after_hash, sizeof a->after_hash, "%s", h->hash);
    KMS_ENSURE(buf != NULL, KMS_ERR_INTERNAL, "out of memory");
    if (n && pread(fd, buf, n, from) != (ssize_t)n) {
        free(buf);
        return KMS_FAIL(KMS_ERR_INTERNAL, "cannot read the audit log %s: %s", a->path,
                        strerror(errno));
    }
    buf[n] = '\n';
    size_t count = 2;
    for (size_t k = 0; k < n; k++)
        count += buf[k] == '\n';
    starts = malloc(count * sizeof *starts);
    if (!starts) {
        free(buf);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    /* Lines as [starts[i], starts[i + 1] - 1); a cut first line is skipped. */
    size_t i = 0;
    if (from > 0) {
        while (i < n && buf[i] != '\n')
            i++;
        i++;
    }
    for (; i < n; i++) {
        starts[nlines++] = i;
        while (buf[i] != '\n')
            i++;
    }
    /* One past the last line's end: its '\n', or the sentinel after a cut-off line. */
    starts[nlines] = n && buf[n - 1] == '\n' ? n : n + 1;
    /* The file's last line: the run before's last when it is of its log. */
    if (nlines) {
        const char *log, *type;
        uint64_t seq;
        size_t k = nlines - 1, len = starts[k + 1] - 1 - starts[k];
        json_t *o = parse_tail_line(buf + starts[k], len, &log, &seq, &type);
        uint8_t hash[32];
        if (o && strcmp(log, h->log) == 0 && seq >= h->seq &&
            kms_sha256(buf + starts[k], len, hash) == KMS_OK) {
            a->after_seq = seq;
            kms_hex_encode(hash, 32, a->after_hash);
        }
        json_decref(o);
    }
    /* Its last checkpoint, by seq and hash. */
    for (size_t k = nlines; k-- > 0 && found == SIZE_MAX;) {
        size_t len = starts[k + 1] - 1 - starts[k];
        uint8_t hash[32];
        char hex[65];
        if (kms_sha256(buf + starts[k], len, hash) != KMS_OK)
            break;
        kms_hex_encode(hash, 32, hex);
        if (strcmp(hex, h->hash) == 0)
            found = k;
    }
    if (found == SIZE_MAX) {
        kms_warn("audit log: the run before on node %s (log %s, checkpoint seq %" PRIu64
                 ") is not at the end of %s: intents it left open are not settled here "
                 "(p11kms-audit verify settles them from the database)",
                 a->node, h->log, h->seq, a->path);
    } else {
        pthread_mutex_lock(&a->lock);
        for (size_t k = found; k < nlines; k++) {
            const char *log, *type;
            uint64_t seq;
            json_t *o =
                parse_tail_line(buf + starts[k], starts[k + 1] - 1 - starts[k], &log, &seq, &type);
            if (o && strcmp(log, h->log) == 0)
                carry_line(a, o, type);
            json_decref(o);
        }
        pthread_mutex_unlock(&a->lock);
    }
    free(starts);
    free(buf);
    return rc;
}

/* Key, digest key, head, file and the "open" checkpoint: everything but the thread. */
static kms_err start(struct kms_audit *a, struct kms_session *s)
{
    uint8_t info[sizeof DIGEST_INFO - 1 + KMS_AUDIT_LOG_ID_LEN];
    struct kms_audit_head_row head;
    struct stat st;
    int partial, have_head = 0;

    KMS_ENSURE(RAND_bytes(a->log_raw, sizeof a->log_raw) == 1, KMS_ERR_INTERNAL,
               "random generator failed");
    kms_hex_encode(a->log_raw, sizeof a->log_raw, a->log_id);
    KMS_GUARD(find_key(s, &a->key, a->key_hex));
    /*
     * Context values may be guessable (tenant names): a plain hash in the log
     * would confirm guesses. Keyed per log, in the token, so only a holder of
     * the token can.
     */
    a->digest_key = OPENSSL_secure_zalloc(32);
    KMS_ENSURE(a->digest_key != NULL, KMS_ERR_INTERNAL, "out of memory");
    memcpy(info, DIGEST_INFO, sizeof DIGEST_INFO - 1);
    memcpy(info + sizeof DIGEST_INFO - 1, a->log_raw, KMS_AUDIT_LOG_ID_LEN);
    KMS_GUARD(kms_hsm_hmac_sha256(s, a->key, info, sizeof info, a->digest_key));
    KMS_GUARD(read_head(a, s, &head, &have_head));
    KMS_GUARD(open_path(a->path, &a->fd, &st, &partial));
    if (partial) {
        KMS_GUARD(cut_torn_tail(a->fd, &st, a->path));
        partial = 0;
    }
    a->dev = st.st_dev;
    a->ino = st.st_ino;
    a->partial = partial;
    watch_file_locked(a);
    /* A log that goes on in an existing file chains to its last line. */
    KMS_GUARD(last_line_hash(a->fd, &st, a->path, a->last));
    if (have_head)
        KMS_GUARD(scan_previous(a, a->fd, &st, &head));
    pthread_mutex_lock(&a->cp_lock);
    kms_err rc = checkpoint_cp_locked(a, s, "open", CP_FORCE | CP_AS_IS, NULL, NULL);
    pthread_mutex_unlock(&a->cp_lock);
    KMS_GUARD(rc);
    a->opened = 1;
    /* The intents the run before left open: settled now, "recovery" lines after the opening. */
    settle_unknown(a);
    pthread_mutex_lock(&a->lock);
    if (a->nopen && flush_results_locked(a) != KMS_OK) {
        kms_warn("audit log: the recovery lines were not written: %s", kms_err_message());
        kms_err_clear();
    }
    pthread_mutex_unlock(&a->lock);
    return KMS_OK;
}

kms_err kms_audit_open(const struct kms_audit_config *cfg, struct kms_hsm *hsm,
                       struct kms_audit **out)
{
    struct kms_audit *a;
    struct kms_session *s;
    pthread_condattr_t ca;
    kms_err rc;

    KMS_ENSURE(cfg && cfg->path && *cfg->path && hsm && out, KMS_ERR_INTERNAL,
               "the audit log needs a path and a token");
    a = calloc(1, sizeof *a);
    KMS_ENSURE(a != NULL, KMS_ERR_INTERNAL, "out of memory");
    a->fd = -1;
    a->ino_wd = -1;
    a->stop_fd[0] = a->stop_fd[1] = -1;
    a->ino_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
    if (a->ino_fd >= 0 && pipe2(a->stop_fd, O_CLOEXEC) != 0) {
        close(a->ino_fd);
        a->ino_fd = -1;
    }
    if (a->ino_fd < 0)
        kms_warn("audit log: cannot watch the file (%s); it is looked at before every line",
                 strerror(errno));
    a->hsm = hsm;
    a->store = cfg->store;
    if (cfg->node && *cfg->node)
        snprintf(a->node, sizeof a->node, "%s", cfg->node);
    else
        kms_audit_default_node(cfg->path, a->node, sizeof a->node);
    a->cp_lines = cfg->checkpoint_lines ? cfg->checkpoint_lines : DEFAULT_LINES;
    a->cp_seconds = cfg->checkpoint_seconds ? cfg->checkpoint_seconds : DEFAULT_SECONDS;
    pthread_mutex_init(&a->cp_lock, NULL);
    pthread_mutex_init(&a->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&a->wake, &ca);
    pthread_cond_init(&a->held, &ca);
    pthread_cond_init(&a->commit_wake, &ca);
    pthread_condattr_destroy(&ca);
    a->path = strdup(cfg->path);
    if (!a->path) {
        kms_audit_close(a);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    rc = kms_hsm_acquire(hsm, &s);
    if (rc == KMS_OK) {
        rc = start(a, s);
        kms_hsm_release(s);
    }
    if (rc == KMS_OK) {
        if (pthread_create(&a->thread, NULL, checkpoint_thread, a) == 0)
            a->thread_started = 1;
        else
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot start the audit checkpoint thread");
    }
    if (rc == KMS_OK) {
        if (pthread_create(&a->committer, NULL, commit_thread, a) == 0)
            a->committer_started = 1;
        else
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot start the audit commit thread");
    }
    if (rc == KMS_OK && a->ino_fd >= 0) {
        if (pthread_create(&a->watcher, NULL, watch_thread, a) == 0) {
            a->watcher_started = 1;
        } else {
            /* No watcher: every line looks, as before. */
            pthread_mutex_lock(&a->lock);
            unwatch_locked(a);
            pthread_mutex_unlock(&a->lock);
        }
    }
    if (rc != KMS_OK) {
        a->opened = 0; /* no "close" checkpoint for a log that did not open */
        kms_audit_close(a);
        return rc;
    }
    kms_info("audit log %s: log %s", a->path, a->log_id);
    *out = a;
    return KMS_OK;
}

/* Sets *stop under the log's lock, wakes the thread that waits on wake, and waits for it. */
static void stop_thread(struct kms_audit *a, int *stop, pthread_cond_t *wake, pthread_t t)
{
    pthread_mutex_lock(&a->lock);
    *stop = 1;
    pthread_cond_signal(wake);
    pthread_mutex_unlock(&a->lock);
    pthread_join(t, NULL);
}

void kms_audit_close(struct kms_audit *a)
{
    if (!a)
        return;
    if (a->watcher_started) {
        ssize_t w;
        do
            w = write(a->stop_fd[1], "", 1);
        while (w < 0 && errno == EINTR);
        pthread_join(a->watcher, NULL);
    }
    /* The closing checkpoint's line looks at the file itself. */
    pthread_mutex_lock(&a->lock);
    unwatch_locked(a);
    pthread_mutex_unlock(&a->lock);
    if (a->thread_started)
        stop_thread(a, &a->stopping, &a->wake, a->thread);
    if (a->committer_started) /* it settles the waits still registered, then stops */
        stop_thread(a, &a->commit_stop, &a->commit_wake, a->committer);
    if (a->opened && checkpoint(a, "close", CP_FORCE) != KMS_OK) {
        kms_error("audit log: could not write the closing checkpoint: %s", kms_err_message());
        kms_err_clear();
    }
    if (a->fd >= 0)
        close(a->fd);
    kms_buf_free(&a->pend);
    for (int i = 0; i < 2; i++)
        if (a->stop_fd[i] >= 0)
            close(a->stop_fd[i]);
    if (a->digest_key)
        OPENSSL_secure_clear_free(a->digest_key, 32);
    pthread_cond_destroy(&a->wake);
    pthread_cond_destroy(&a->held);
    pthread_cond_destroy(&a->commit_wake);
    pthread_mutex_destroy(&a->lock);
    pthread_mutex_destroy(&a->cp_lock);
    free(a->path);
    free(a);
}
