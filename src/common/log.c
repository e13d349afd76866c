#include "config.h"

#include "common/log.h"

#include <stdarg.h>
#include <pthread.h>
#include <stdio.h>
#include <syslog.h>
#include <time.h>

static enum kms_log_level current = KMS_LOG_INFO;

void kms_log_set_level(enum kms_log_level level)
{
    current = level;
}

static void emit(const char *level, const char *line)
{
    char stamp[32];
    struct tm tm;
    time_t now = time(NULL);
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);
    /* One fprintf call per line keeps lines from threads whole. */
    fprintf(stderr, "%s p11kmsd %s: %s\n", stamp, level, line);
}

void kms_log(enum kms_log_level level, const char *fmt, ...)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    char line[1024];
    va_list ap;

    if (level > current)
        return;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    emit(names[level], line);
}

static void open_syslog(void)
{
    openlog("p11kmsd", LOG_PID, LOG_DAEMON);
}

void kms_log_alert(const char *fmt, ...)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    char line[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    emit("alert", line);
    pthread_once(&once, open_syslog);
    syslog(LOG_ALERT, "%s", line);
}
