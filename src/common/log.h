/*
 * The server's log: one line per event, as text (the default) or as one JSON
 * object per line (log_format = json), on stderr or in a file (log_file),
 * reopened on SIGHUP for rotation. Never pass secrets.
 */
#ifndef P11KMS_LOG_H
#define P11KMS_LOG_H

#include <stdint.h>

#include "common/error.h"

/* KMS_LOG_NONE: no line but alerts (p11kmsd --check-config prints its own). */
enum kms_log_level { KMS_LOG_NONE = -1, KMS_LOG_ERROR, KMS_LOG_WARN, KMS_LOG_INFO, KMS_LOG_DEBUG };
enum kms_log_format { KMS_LOG_TEXT = 0, KMS_LOG_JSON = 1 };

void kms_log_set_level(enum kms_log_level level);
void kms_log_set_format(enum kms_log_format format);

/*
 * Lines go to path (appended, made 0640 when new) instead of stderr; NULL:
 * stderr again. The file is opened here, so a path that cannot be written is
 * an error at start-up, not a silent loss later.
 */
KMS_MUST_CHECK kms_err kms_log_open(const char *path);
/* Opens the file again under its name (after logrotate moved it); keeps the old one on failure. */
KMS_MUST_CHECK kms_err kms_log_reopen(void);
void kms_log_close(void);

void kms_log(enum kms_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Something an operator must act on now: an "alert" line in the log and the
 * same text to syslog at LOG_ALERT (facility LOG_DAEMON, ident p11kmsd).
 */
void kms_log_alert(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* One answered request, at level info (log_requests). Empty strings and NULL are left out. */
struct kms_log_request {
    const char *request_id;
    const char *principal;
    const char *operation;
    const char *key;
    unsigned status;   /* the HTTP status sent */
    const char *error; /* the error type ("ThrottlingException"), or NULL for a success */
    int64_t duration_us;
};
void kms_log_request(const struct kms_log_request *r);

#define kms_error(...) kms_log(KMS_LOG_ERROR, __VA_ARGS__)
#define kms_warn(...) kms_log(KMS_LOG_WARN, __VA_ARGS__)
#define kms_info(...) kms_log(KMS_LOG_INFO, __VA_ARGS__)
#define kms_debug(...) kms_log(KMS_LOG_DEBUG, __VA_ARGS__)

#endif
