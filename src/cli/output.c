/*
 * What the CLI prints: exit codes from statuses, errors on stderr (and as
 * JSON on stdout with --json), answers for people or as JSON, and the
 * progress line of encrypt/decrypt.
 */
#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"

int cli_exit_code(p11kms_status s)
{
    switch (s) {
    case P11KMS_OK: return CLI_EXIT_OK;
    case P11KMS_ERR_ARGUMENT: return CLI_EXIT_USAGE;
    case P11KMS_ERR_TRANSPORT:
    case P11KMS_ERR_CIRCUIT_OPEN:
    case P11KMS_ERR_PROTOCOL: return CLI_EXIT_TRANSPORT;
    case P11KMS_ERR_MALFORMED:
    case P11KMS_ERR_DECRYPT:
    case P11KMS_ERR_TRUNCATED:
    case P11KMS_ERR_INVALID_CIPHERTEXT:
    case P11KMS_ERR_INCORRECT_KEY: return CLI_EXIT_INTEGRITY;
    case P11KMS_ERR_MEMORY:
    case P11KMS_ERR_MEMORY_LOCK:
    case P11KMS_ERR_CONFIG: return CLI_EXIT_LOCAL;
    default: return CLI_EXIT_SERVICE;
    }
}

static void json_error(const char *type, const char *message)
{
    json_t *e = json_pack("{s:{s:s,s:s}}", "error", "type", type, "message", message);
    char *text = e ? json_dumps(e, JSON_INDENT(2)) : NULL;
    if (text) {
        printf("%s\n", text);
        free(text);
    }
    json_decref(e);
}

static int report(const struct cli *cli, int code, const char *type, const char *message,
                  int stdout_is_data)
{
    fprintf(stderr, "p11kms: %s: %s\n", type, message);
    if (cli && cli->json && !stdout_is_data)
        json_error(type, message);
    return code;
}

int cli_fail_status(struct cli *cli, p11kms_status s, int stdout_is_data)
{
    const char *msg = p11kms_last_error();
    return report(cli, cli_exit_code(s), p11kms_status_name(s),
                  msg && *msg ? msg : p11kms_status_name(s), stdout_is_data);
}

int cli_fail(struct cli *cli, int code, const char *type, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return report(cli, code, type, msg, 0);
}

int cli_usage_error(struct cli *cli, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return report(cli, CLI_EXIT_USAGE, "UsageError", msg, 0);
}

/* ---- answers ---- */

/* AWS's dates are seconds since the epoch in members named *Date (and ValidTo). */
static int is_date(const char *name)
{
    size_t n = name ? strlen(name) : 0;
    return (n >= 4 && strcmp(name + n - 4, "Date") == 0) || (name && strcmp(name, "ValidTo") == 0);
}

/* A date for people: ISO 8601 in UTC ("2026-12-06T23:47:16Z"); 0 when v is no date. */
static int print_date(const json_t *v)
{
    char text[32];
    struct tm tm;
    if (!json_is_number(v))
        return 0;
    double secs = json_number_value(v);
    if (secs < 0 || secs > 253402300799.0) /* 9999-12-31T23:59:59Z */
        return 0;
    time_t t = (time_t)secs;
    if (!gmtime_r(&t, &tm) || !strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%SZ", &tm))
        return 0;
    fputs(text, stdout);
    return 1;
}

/* name: the member v is the value of, or NULL. */
static void print_scalar(const char *name, const json_t *v)
{
    if (is_date(name) && print_date(v))
        return;
    if (json_is_string(v))
        fputs(json_string_value(v), stdout);
    else if (json_is_integer(v))
        printf("%" JSON_INTEGER_FORMAT, json_integer_value(v));
    else if (json_is_real(v))
        printf("%.3f", json_real_value(v));
    else if (json_is_true(v))
        fputs("true", stdout);
    else if (json_is_false(v))
        fputs("false", stdout);
    else
        fputs("-", stdout);
}

static void print_human(const json_t *v, int depth)
{
    const char *k;
    json_t *m;
    size_t i;
    json_object_foreach((json_t *)v, k, m)
    {
        printf("%*s%s:", depth * 2, "", k);
        if (json_is_object(m)) {
            printf("\n");
            print_human(m, depth + 1);
        } else if (json_is_array(m)) {
            json_t *e;
            printf("\n");
            json_array_foreach(m, i, e)
            {
                if (json_is_object(e)) {
                    printf("%*s-\n", depth * 2 + 2, "");
                    print_human(e, depth + 2);
                } else {
                    printf("%*s- ", depth * 2 + 2, "");
                    print_scalar(NULL, e);
                    printf("\n");
                }
            }
        } else {
            printf(" ");
            print_scalar(k, m);
            printf("\n");
        }
    }
}

static void print_json(const json_t *answer)
{
    char *text = json_dumps(answer, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (text) {
        printf("%s\n", text);
        free(text);
    }
}

void cli_print(struct cli *cli, const json_t *answer)
{
    if (cli->json)
        print_json(answer);
    else
        print_human(answer, 0);
}

void cli_print_table(struct cli *cli, const json_t *answer, const char *list,
                     const char *const *fields)
{
    const json_t *arr = json_object_get(answer, list);
    json_t *e;
    size_t i;
    if (cli->json) {
        print_json(answer);
        return;
    }
    json_array_foreach(arr, i, e)
    {
        for (size_t f = 0; fields[f]; f++) {
            if (f)
                fputs("  ", stdout);
            print_scalar(fields[f], json_object_get(e, fields[f]));
        }
        fputs("\n", stdout);
    }
}

/* ---- progress ---- */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void human_bytes(char *out, size_t n, double b)
{
    const char *units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    size_t u = 0;
    while (b >= 1024 && u + 1 < sizeof units / sizeof units[0]) {
        b /= 1024;
        u++;
    }
    snprintf(out, n, u ? "%.1f %s" : "%.0f %s", b, units[u]);
}

void cli_progress_init(struct cli_progress *p, const struct cli *cli, const char *verb,
                       uint64_t total)
{
    const char *d = getenv("P11KMS_PROGRESS_DELAY_MS");
    memset(p, 0, sizeof *p);
    /* Only for a person watching: stderr on a terminal, and not --quiet. */
    p->on = !cli->quiet && isatty(STDERR_FILENO);
    p->verb = verb;
    p->total = total;
    p->start = p->last = now_s();
    p->delay_ms = d && *d ? (unsigned)strtoul(d, NULL, 10) : 1000;
}

static void draw(struct cli_progress *p, uint64_t done, double t)
{
    char sdone[32], stotal[32], srate[32], eta[32] = "";
    double secs = t - p->start, rate = secs > 0 ? (double)done / secs : 0;
    human_bytes(sdone, sizeof sdone, (double)done);
    human_bytes(srate, sizeof srate, rate);
    if (p->total) {
        human_bytes(stotal, sizeof stotal, (double)p->total);
        if (rate > 0 && done <= p->total) {
            unsigned left = (unsigned)((double)(p->total - done) / rate + 0.5);
            snprintf(eta, sizeof eta, ", ETA %u:%02u", left / 60, left % 60);
        }
        fprintf(stderr, "\r%s %s / %s (%.0f%%), %s/s%s\033[K", p->verb, sdone, stotal,
                100.0 * (double)done / (double)p->total, srate, eta);
    } else {
        fprintf(stderr, "\r%s %s, %s/s\033[K", p->verb, sdone, srate);
    }
    fflush(stderr);
    p->shown = 1;
    p->last = t;
}

void cli_progress_update(void *arg, uint64_t done)
{
    struct cli_progress *p = arg;
    double t;
    if (!p->on)
        return;
    t = now_s();
    /* Long operations only: nothing in the first delay_ms, then five times a second. */
    if ((t - p->start) * 1000 < p->delay_ms || (p->shown && t - p->last < 0.2))
        return;
    draw(p, done, t);
}

void cli_progress_end(struct cli_progress *p, uint64_t done)
{
    if (p->on && p->shown) {
        draw(p, done, now_s());
        fputs("\n", stderr);
    }
}
