#include "config.h"

#include "common/log.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

static enum kms_log_level current = KMS_LOG_INFO;

void kms_log_set_level(enum kms_log_level level)
{
    current = level;
}

void kms_log(enum kms_log_level level, const char *fmt, ...)
{
    static const char *names[] = {"error", "warn", "info", "debug"};
    char stamp[32];
    struct tm tm;
    time_t now;
    va_list ap;

    if (level > current)
        return;
    now = time(NULL);
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &tm);
    /* One fprintf call per line keeps lines from threads whole. */
    char line[1024];
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s p11kmsd %s: %s\n", stamp, names[level], line);
}
