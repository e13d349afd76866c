#include "config.h"

#include "common/log.h"
#include "common/encoding.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <syslog.h>
#include <time.h>
#include <unistd.h>

static enum kms_log_level current = KMS_LOG_INFO;
static enum kms_log_format format = KMS_LOG_TEXT;
/* 2 (stderr) or the log file; a reopen swaps the file under the same descriptor (dup2). */
static int log_fd = 2;
static char *log_path;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

void kms_log_set_level(enum kms_log_level level)
{
    current = level;
}

void kms_log_set_format(enum kms_log_format f)
{
    format = f;
}

static int open_file(const char *path)
{
    return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NOCTTY, 0640);
}

kms_err kms_log_open(const char *path)
{
    if (!path) {
        kms_log_close();
        return KMS_OK;
    }
    char *copy = strdup(path);
    KMS_ENSURE(copy != NULL, KMS_ERR_INTERNAL, "out of memory");
    int fd = open_file(path);
    if (fd < 0) {
        int e = errno;
        free(copy);
        return KMS_FAIL(KMS_ERR_VALIDATION, "log_file %s: cannot open it: %s", path, strerror(e));
    }
    kms_log_close();
    log_fd = fd;
    log_path = copy;
    return KMS_OK;
}

kms_err kms_log_reopen(void)
{
    if (!log_path)
        return KMS_OK;
    int fd = open_file(log_path);
    KMS_ENSURE(fd >= 0, KMS_ERR_INTERNAL, "log_file %s: cannot open it again: %s", log_path,
               strerror(errno));
    /* Atomic for the threads writing meanwhile: each line lands in one file or the other. */
    int rc = dup2(fd, log_fd);
    int e = errno;
    close(fd);
    KMS_ENSURE(rc >= 0, KMS_ERR_INTERNAL, "log_file %s: %s", log_path, strerror(e));
    return KMS_OK;
}

void kms_log_close(void)
{
    if (log_fd != 2)
        close(log_fd);
    log_fd = 2;
    free(log_path);
    log_path = NULL;
}

/*
 * A line being made. It holds the longest: a 1 KiB message with every byte
 * escaped (6 bytes each) and the time and level; what would not fit is cut.
 */
struct line {
    char b[8192];
    size_t n;
};

#define LINE_END_ROOM 4 /* "\"}\n" */

static void put(struct line *l, const char *s, size_t len)
{
    size_t room = sizeof l->b - LINE_END_ROOM - l->n;
    if (len > room)
        len = room;
    memcpy(l->b + l->n, s, len);
    l->n += len;
}

static void puts_(struct line *l, const char *s)
{
    put(l, s, strlen(s));
}

static void putf(struct line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void putf(struct line *l, const char *fmt, ...)
{
    size_t room = sizeof l->b - LINE_END_ROOM - l->n;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(l->b + l->n, room + 1, fmt, ap);
    va_end(ap);
    if (n > 0)
        l->n += (size_t)n > room ? room : (size_t)n;
}

/* A JSON string: quotes, backslashes and controls escaped, bytes that are not UTF-8 as U+FFFD. */
static void put_json_string(struct line *l, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t left = strlen(s);
    puts_(l, "\"");
    while (left > 0 && l->n + 8 < sizeof l->b - LINE_END_ROOM) {
        size_t n = kms_utf8_len(p, left);
        if (n == 0) {
            puts_(l, "\\ufffd");
            n = 1;
        } else if (*p == '"' || *p == '\\') {
            char esc[2] = {'\\', (char)*p};
            put(l, esc, 2);
        } else if (*p == '\n') {
            puts_(l, "\\n");
        } else if (*p == '\t') {
            puts_(l, "\\t");
        } else if (*p < 0x20 || *p == 0x7f) {
            putf(l, "\\u%04x", *p);
        } else {
            put(l, (const char *)p, n);
        }
        p += n;
        left -= n;
    }
    /* The closing quote has room kept for it. */
    l->b[l->n++] = '"';
}

static void put_member(struct line *l, const char *name, const char *value)
{
    if (!value || !*value)
        return;
    putf(l, ",\"%s\":", name);
    put_json_string(l, value);
}

static void put_time(struct line *l, int json)
{
    struct timeval tv;
    struct tm tm;
    char stamp[32];
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
    if (json)
        putf(l, "{\"time\":\"%s.%03dZ\"", stamp, (int)(tv.tv_usec / 1000));
    else
        putf(l, "%sZ p11kmsd ", stamp);
}

/* One write a line: lines from threads stay whole (O_APPEND, or a pipe within PIPE_BUF). */
static void emit(struct line *l)
{
    l->b[l->n++] = '\n';
    for (size_t off = 0; off < l->n;) {
        ssize_t w = write(log_fd, l->b + off, l->n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        off += (size_t)w;
    }
}

static void emit_message(const char *level, const char *message)
{
    struct line l = {.n = 0};
    put_time(&l, format == KMS_LOG_JSON);
    if (format == KMS_LOG_JSON) {
        put_member(&l, "level", level);
        put_member(&l, "message", message);
        l.b[l.n++] = '}';
    } else {
        putf(&l, "%s: %s", level, message);
    }
    emit(&l);
}

void kms_log(enum kms_log_level level, const char *fmt, ...)
{
    char message[1024];
    va_list ap;

    if (level > current)
        return;
    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    emit_message(level_names[level], message);
}

static void open_syslog(void)
{
    openlog("p11kmsd", LOG_PID, LOG_DAEMON);
}

void kms_log_alert(const char *fmt, ...)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    char message[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(message, sizeof message, fmt, ap);
    va_end(ap);
    emit_message("alert", message);
    pthread_once(&once, open_syslog);
    syslog(LOG_ALERT, "%s", message);
}

void kms_log_request(const struct kms_log_request *r)
{
    const char *op = r->operation && *r->operation ? r->operation : "-";
    const char *who = r->principal && *r->principal ? r->principal : "-";
    const char *outcome = r->error ? r->error : "ok";
    int64_t us = r->duration_us > 0 ? r->duration_us : 0;
    struct line l = {.n = 0};

    if (current < KMS_LOG_INFO)
        return;
    put_time(&l, format == KMS_LOG_JSON);
    if (format == KMS_LOG_TEXT) {
        putf(&l, "info: %s by %s", op, who);
        if (r->key && *r->key)
            putf(&l, " on %s", r->key);
        putf(&l, ": %u %s in %lld.%03lld ms (request %s)", r->status, outcome,
             (long long)(us / 1000), (long long)(us % 1000), r->request_id ? r->request_id : "-");
        emit(&l);
        return;
    }
    char message[512];
    snprintf(message, sizeof message, "%s by %s: %u %s", op, who, r->status, outcome);
    put_member(&l, "level", "info");
    put_member(&l, "message", message);
    put_member(&l, "request_id", r->request_id);
    put_member(&l, "principal", r->principal);
    put_member(&l, "operation", r->operation);
    put_member(&l, "key", r->key);
    putf(&l, ",\"status\":%u", r->status);
    put_member(&l, "error", r->error);
    putf(&l, ",\"duration_ms\":%lld.%03lld}", (long long)(us / 1000), (long long)(us % 1000));
    emit(&l);
}
