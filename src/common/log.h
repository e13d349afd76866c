/* Logging to stderr with a level; never pass secrets. */
#ifndef P11KMS_LOG_H
#define P11KMS_LOG_H

enum kms_log_level { KMS_LOG_ERROR, KMS_LOG_WARN, KMS_LOG_INFO, KMS_LOG_DEBUG };

void kms_log_set_level(enum kms_log_level level);
void kms_log(enum kms_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/*
 * Something an operator must act on now: an "alert" line on stderr and the
 * same text to syslog at LOG_ALERT (facility LOG_DAEMON, ident p11kmsd).
 */
void kms_log_alert(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#define kms_error(...) kms_log(KMS_LOG_ERROR, __VA_ARGS__)
#define kms_warn(...) kms_log(KMS_LOG_WARN, __VA_ARGS__)
#define kms_info(...) kms_log(KMS_LOG_INFO, __VA_ARGS__)
#define kms_debug(...) kms_log(KMS_LOG_DEBUG, __VA_ARGS__)

#endif
