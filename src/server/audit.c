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
#include <sys/stat.h>
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

static const uint8_t zero_hash[32];

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

/* Length of the valid UTF-8 sequence at p, or 0 when the bytes there are not one. */
static size_t utf8_seq(const unsigned char *p, size_t n)
{
    unsigned c = p[0];
    size_t len;
    uint32_t cp, min;

    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        len = 3, cp = c & 0x0f, min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4, cp = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
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
        if (c == '"' || c == '\\') {
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
            size_t len = utf8_seq(p + i, n - i);
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

static kms_err template_build(const struct kms_audit_record *r, const char *log_id,
                              const uint8_t *digest_key, struct kms_audit_template *t)
{
    struct kms_buf *b = &t->text;
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

kms_err kms_audit_checkpoint_body(const char *key_hex, const char *kind, const char *log_id,
                                  uint64_t seq, const uint8_t prev[32], const char *time,
                                  struct kms_buf *out)
{
    char hex[65];
    kms_hex_encode(prev, 32, hex);
    KMS_GUARD(kms_buf_append_u8(out, '{'));
    KMS_GUARD(member_text(out, "\"key\":", key_hex));
    KMS_GUARD(member_text(out, "\"kind\":", kind));
    KMS_GUARD(member_text(out, "\"log\":", log_id));
    KMS_GUARD(member_text(out, "\"prev\":", hex));
    KMS_GUARD(member_u64(out, "\"seq\":", seq));
    KMS_GUARD(member_text(out, "\"time\":", time));
    return kms_buf_append_str(out, "\"type\":\"checkpoint\",\"v\":1}");
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

void kms_audit_record_label(const char *log_id, uint64_t seq, const uint8_t hash[32], char out[80])
{
    char hex[65] = "";
    if (seq)
        kms_hex_encode(hash, 32, hex);
    hex[16] = '\0';
    snprintf(out, 80, KMS_AUDIT_RECORD_PREFIX "%s:%" PRIu64 ":%s", log_id, seq, hex);
}

int kms_audit_record_label_parse(const char *label, size_t n, struct kms_audit_token_record *out)
{
    const size_t pre = sizeof KMS_AUDIT_RECORD_PREFIX - 1, idlen = 2 * KMS_AUDIT_LOG_ID_LEN;
    char buf[96], *end;
    if (n >= sizeof buf || n < pre + idlen + 3 || memcmp(label, KMS_AUDIT_RECORD_PREFIX, pre) != 0)
        return 0;
    memcpy(buf, label, n);
    buf[n] = '\0';
    const char *id = buf + pre;
    if (!kms_audit_is_hex(id, idlen) || id[idlen] != ':' || id[idlen + 1] < '0' ||
        id[idlen + 1] > '9')
        return 0;
    errno = 0;
    unsigned long long seq = strtoull(id + idlen + 1, &end, 10);
    if (errno || *end != ':')
        return 0;
    size_t hlen = strlen(end + 1);
    if ((seq == 0 && hlen != 0) || (seq != 0 && (hlen != 16 || !kms_audit_is_hex(end + 1, 16))))
        return 0;
    memcpy(out->log, id, idlen);
    out->log[idlen] = '\0';
    out->seq = seq;
    memcpy(out->hash, end + 1, hlen + 1);
    return 1;
}

/* ---- the writer ---------------------------------------------------------------- */

struct kms_audit {
    char *path;
    unsigned cp_lines, cp_seconds;
    struct kms_hsm *hsm;
    CK_OBJECT_HANDLE key;    /* the token's audit key */
    CK_OBJECT_HANDLE record; /* this log's record in the token */
    char key_hex[2 * KMS_AUDIT_KEY_ID_LEN + 1];
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
    int failing;       /* the last write or open failed: look at the path again before the next */
    int partial;       /* the file ends with part of a line that could not be removed */
    uint64_t seq;      /* of the last line written */
    uint8_t last[32];  /* its hash */
    uint64_t since_cp; /* lines written since the last checkpoint */
    struct timespec first_since; /* when the first of them was written (monotonic) */
    struct timespec retry_at;    /* after a failed checkpoint, not before this */
    int stopping;
    pthread_t thread;
    int thread_started;
};

static struct timespec mono_now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
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
 * Appends one line (and its '\n') with one write(2). A short write is cut off
 * again, so the file holds the whole line or none of it. With a fragment left
 * at the end of the file by an earlier failure, a '\n' goes first: the
 * fragment stays a line of its own (verify reports it) and ours stays whole.
 */
static kms_err append_line_locked(struct kms_audit *a, const struct kms_buf *line)
{
    struct kms_buf out = KMS_BUF_INIT;
    struct stat st;
    off_t before = -1;
    ssize_t w;
    kms_err rc;

    if (a->partial)
        rc = kms_buf_append_u8(&out, '\n');
    else
        rc = KMS_OK;
    if (rc == KMS_OK)
        rc = kms_buf_append(&out, line->data, line->len);
    if (rc == KMS_OK)
        rc = kms_buf_append_u8(&out, '\n');
    if (rc != KMS_OK) {
        kms_buf_free(&out);
        return rc;
    }
    do
        w = write(a->fd, out.data, out.len);
    while (w < 0 && errno == EINTR);
    if (w == (ssize_t)out.len) {
        a->partial = 0;
        rc = KMS_OK;
    } else {
        int e = w < 0 ? errno : ENOSPC;
        /* The file is appended to by this process alone: it was w bytes shorter. */
        if (w > 0 && fstat(a->fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_size >= w)
            before = st.st_size - w;
        if (w > 0 && (before < 0 || ftruncate(a->fd, before) != 0))
            a->partial = 1;
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot write the audit log %s: %s", a->path, strerror(e));
    }
    kms_buf_free(&out);
    return rc;
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

/* Writes a line as the next in the chain; the chain advances only when it is written. */
static kms_err chain_line_locked(struct kms_audit *a, const struct kms_buf *line)
{
    uint8_t hash[32];
    kms_err rc = kms_sha256(line->data, line->len, hash);
    if (rc == KMS_OK)
        rc = append_line_locked(a, line);
    if (rc != KMS_OK)
        return failed_locked(a, rc);
    if (a->failing)
        kms_info("audit log %s is written again", a->path);
    a->failing = 0;
    a->seq++;
    memcpy(a->last, hash, sizeof hash);
    counted_locked(a);
    return KMS_OK;
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
        /* A removed log would swallow every line from now on: look for a new one. */
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
    if (a->fd >= 0)
        close(a->fd);
    a->fd = fd;
    a->dev = st.st_dev;
    a->ino = st.st_ino;
    a->partial = partial;
    char time[KMS_AUDIT_TIME_LEN + 1];
    struct kms_buf line = KMS_BUF_INIT;
    now_text(time);
    rc = kms_audit_reopen_line(a->log_id, a->seq + 1, a->last, time, reason, &line);
    if (rc == KMS_OK)
        rc = chain_line_locked(a, &line);
    kms_buf_free(&line);
    return rc;
}

/* Lets a checkpoint that lost its place to lines have the next one, but not for long. */
static void wait_hold_locked(struct kms_audit *a)
{
    struct timespec until = mono_now();
    until.tv_nsec += HOLD_MAX_MS * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec++;
        until.tv_nsec -= 1000000000L;
    }
    while (a->hold)
        if (pthread_cond_timedwait(&a->held, &a->lock, &until) != 0) {
            a->hold = 0; /* the token is slow or hung: lines go on, the checkpoint waits */
            pthread_cond_broadcast(&a->held);
            break;
        }
}

kms_err kms_audit_write(struct kms_audit *a, const struct kms_audit_record *r)
{
    struct kms_audit_template t;
    struct kms_buf line = KMS_BUF_INIT;
    char time[KMS_AUDIT_TIME_LEN + 1];
    kms_err rc;

    KMS_ENSURE(a && r, KMS_ERR_INTERNAL, "no audit log");
    KMS_GUARD(kms_audit_template_build(r, a->log_id, a->digest_key, &t));
    pthread_mutex_lock(&a->lock);
    wait_hold_locked(a);
    rc = ensure_file_locked(a, "recover");
    if (rc == KMS_OK) {
        now_text(time);
        rc = kms_audit_template_fill(&t, a->seq + 1, a->last, time, &line);
    }
    if (rc == KMS_OK)
        rc = chain_line_locked(a, &line);
    pthread_mutex_unlock(&a->lock);
    kms_buf_free(&line);
    kms_audit_template_free(&t);
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
        rc = chain_line_locked(a, &line);
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
 * Writes a checkpoint of the given kind, MAC'd in the token, and records it in
 * the token's record of this log. Call with cp_lock held and lock not held.
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
    char time[KMS_AUDIT_TIME_LEN + 1], label[80];
    uint8_t mac[32], hash[32], prev[32];
    uint64_t seq = 0, base = 0;
    int sync_fd = -1;
    kms_err rc = KMS_OK;

    for (int attempt = 0;; attempt++) {
        pthread_mutex_lock(&a->lock);
        if (!(flags & CP_FORCE) && a->since_cp == 0) {
            pthread_mutex_unlock(&a->lock);
            break;
        }
        if (!(flags & CP_AS_IS))
            rc = ensure_file_locked(a, "recover");
        else if (a->fd < 0)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "the audit log %s is not open", a->path);
        if (rc == KMS_OK) {
            a->hold = attempt > 0;
            base = a->seq;
            memcpy(prev, a->last, 32);
            now_text(time);
        }
        pthread_mutex_unlock(&a->lock);
        if (rc != KMS_OK)
            break;
        body.len = line.len = 0;
        rc = kms_audit_checkpoint_body(a->key_hex, kind, a->log_id, base + 1, prev, time, &body);
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
            rc = chain_line_locked(a, &line);
        if (rc == KMS_OK) {
            seq = a->seq;
            memcpy(hash, a->last, 32);
            a->since_cp = 0;
            if (flags & CP_SWITCH) {
                /* No line may come between the seal and the new file. */
                sync_fd = a->fd;
                a->fd = -1;
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
    if (rc != KMS_OK || seq == 0)
        return rc;
    /* On disk before the token says it is there: else a crash could look like a cut. */
    if (sync_fd >= 0) {
        if (fdatasync(sync_fd) != 0 && errno != EINVAL && errno != EROFS)
            kms_warn("audit log %s: fdatasync failed: %s", a->path, strerror(errno));
        close(sync_fd);
    }
    kms_audit_record_label(a->log_id, seq, hash, label);
    return kms_hsm_set_label(s, a->record, label);
}

static kms_err checkpoint(struct kms_audit *a, const char *kind, int flags)
{
    struct kms_session *s;
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
        if (a->fd >= 0)
            close(a->fd);
        a->fd = -1;
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

/* This log's record in the token: which log, where, and (in its label) its latest checkpoint. */
static kms_err create_record(struct kms_audit *a, struct kms_session *s)
{
    char label[80], host[256] = "", time[KMS_AUDIT_TIME_LEN + 1];
    struct kms_buf value = KMS_BUF_INIT;
    kms_err rc;

    gethostname(host, sizeof host - 1);
    now_text(time);
    kms_audit_record_label(a->log_id, 0, zero_hash, label);
    rc = kms_buf_append_u8(&value, '{');
    if (rc == KMS_OK)
        rc = member_text(&value, "\"host\":", host);
    if (rc == KMS_OK)
        rc = member_text(&value, "\"log\":", a->log_id);
    if (rc == KMS_OK)
        rc = member_text(&value, "\"path\":", a->path);
    if (rc == KMS_OK)
        rc = member_text(&value, "\"started\":", time);
    if (rc == KMS_OK)
        rc = kms_buf_append_str(&value, "\"v\":1}");
    if (rc == KMS_OK)
        rc =
            kms_hsm_create_app_data(s, KMS_AUDIT_APPLICATION, label, (const uint8_t *)KMS_AUDIT_OID,
                                    sizeof KMS_AUDIT_OID - 1, value.data, value.len, &a->record);
    kms_buf_free(&value);
    return rc;
}

/* Key, digest key, record, file and the "open" checkpoint: everything but the thread. */
static kms_err start(struct kms_audit *a, struct kms_session *s)
{
    uint8_t info[sizeof DIGEST_INFO - 1 + KMS_AUDIT_LOG_ID_LEN];
    struct stat st;
    int partial;

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
    KMS_GUARD(create_record(a, s));
    KMS_GUARD(open_path(a->path, &a->fd, &st, &partial));
    a->dev = st.st_dev;
    a->ino = st.st_ino;
    a->partial = partial;
    /* A log that goes on in an existing file chains to its last line. */
    KMS_GUARD(last_line_hash(a->fd, &st, a->path, a->last));
    pthread_mutex_lock(&a->cp_lock);
    kms_err rc = checkpoint_cp_locked(a, s, "open", CP_FORCE | CP_AS_IS, NULL, NULL);
    pthread_mutex_unlock(&a->cp_lock);
    return rc;
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
    a->record = CK_INVALID_HANDLE;
    a->hsm = hsm;
    a->cp_lines = cfg->checkpoint_lines ? cfg->checkpoint_lines : DEFAULT_LINES;
    a->cp_seconds = cfg->checkpoint_seconds ? cfg->checkpoint_seconds : DEFAULT_SECONDS;
    pthread_mutex_init(&a->cp_lock, NULL);
    pthread_mutex_init(&a->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&a->wake, &ca);
    pthread_cond_init(&a->held, &ca);
    pthread_condattr_destroy(&ca);
    a->path = strdup(cfg->path);
    if (!a->path) {
        kms_audit_close(a);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    rc = kms_hsm_acquire(hsm, &s);
    if (rc == KMS_OK) {
        rc = start(a, s);
        if (rc != KMS_OK && a->record != CK_INVALID_HANDLE) {
            /* A record of a log that never began would only mislead. */
            kms_err keep = rc;
            char msg[256];
            snprintf(msg, sizeof msg, "%s", kms_err_message());
            if (kms_hsm_destroy(s, a->record) != KMS_OK)
                kms_err_clear();
            a->record = CK_INVALID_HANDLE;
            rc = KMS_FAIL(keep, "%s", msg);
        }
        kms_hsm_release(s);
    }
    if (rc == KMS_OK) {
        if (pthread_create(&a->thread, NULL, checkpoint_thread, a) == 0)
            a->thread_started = 1;
        else
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot start the audit checkpoint thread");
    }
    if (rc != KMS_OK) {
        a->record = CK_INVALID_HANDLE; /* no "close" checkpoint for a log that did not open */
        kms_audit_close(a);
        return rc;
    }
    kms_info("audit log %s: log %s", a->path, a->log_id);
    *out = a;
    return KMS_OK;
}

void kms_audit_close(struct kms_audit *a)
{
    if (!a)
        return;
    if (a->thread_started) {
        pthread_mutex_lock(&a->lock);
        a->stopping = 1;
        pthread_cond_signal(&a->wake);
        pthread_mutex_unlock(&a->lock);
        pthread_join(a->thread, NULL);
    }
    if (a->record != CK_INVALID_HANDLE && checkpoint(a, "close", CP_FORCE) != KMS_OK) {
        kms_error("audit log: could not write the closing checkpoint: %s", kms_err_message());
        kms_err_clear();
    }
    if (a->fd >= 0)
        close(a->fd);
    if (a->digest_key)
        OPENSSL_secure_clear_free(a->digest_key, 32);
    pthread_cond_destroy(&a->wake);
    pthread_cond_destroy(&a->held);
    pthread_mutex_destroy(&a->lock);
    pthread_mutex_destroy(&a->cp_lock);
    free(a->path);
    free(a);
}
