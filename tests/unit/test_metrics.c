/*
 * Unit tests for src/common/metrics.h: counters and histograms rendered in
 * the Prometheus text format 0.0.4, compared as exact text; gauges through a
 * collector; escaping; names refused; concurrent recording.
 *
 * With P11KMS_METRICS_DUMP=FILE, test_render_everything also writes its text
 * to FILE, to check by hand with tests/integration/promtext.py.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/metrics.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* ---- helpers ---------------------------------------------------------------- */

/* Renders m and checks the text is exactly want. */
static void expect_render(const struct kms_metrics *m, const char *want)
{
    struct kms_buf b = KMS_BUF_INIT;
    assert_int_equal(kms_metrics_render(m, &b), KMS_OK);
    assert_int_equal(kms_buf_terminate(&b), KMS_OK);
    assert_string_equal((const char *)b.data, want);
    kms_buf_free(&b);
}

static struct kms_metrics *registry_with_counter(struct kms_counter_family *f)
{
    struct kms_metrics *m = NULL;
    assert_int_equal(kms_metrics_new(&m), KMS_OK);
    assert_int_equal(kms_metrics_add_counter(m, f), KMS_OK);
    return m;
}

static struct kms_metrics *registry_with_histogram(struct kms_histogram_family *f)
{
    struct kms_metrics *m = NULL;
    assert_int_equal(kms_metrics_new(&m), KMS_OK);
    assert_int_equal(kms_metrics_add_histogram(m, f), KMS_OK);
    return m;
}

static const char *const ops[] = {"Decrypt", "Encrypt", "ListKeys", NULL};
static const char *const outcomes[] = {"ok", "ValidationException", "ThrottlingException", NULL};

/* ---- counters --------------------------------------------------------------- */

static void test_counter_no_label(void **state)
{
    struct kms_counter_family *f = NULL;
    (void)state;

    assert_int_equal(kms_counter_family_new("p11kms_audit_write_failures_total",
                                            "Audit records that could not be written.", NULL, NULL,
                                            NULL, NULL, &f),
                     KMS_OK);
    struct kms_metrics *m = registry_with_counter(f);
    expect_render(m, "# HELP p11kms_audit_write_failures_total Audit records that could not be "
                     "written.\n"
                     "# TYPE p11kms_audit_write_failures_total counter\n"
                     "p11kms_audit_write_failures_total 0\n");
    kms_counter_add(f, 0, 0, 1);
    kms_counter_add(f, 0, 0, 41);
    assert_int_equal(kms_counter_get(f, 0, 0), 42);
    kms_counter_add(f, 0, 0, UINT64_C(18446744073709551573)); /* 2^64 - 43: wraps to -1 */
    assert_int_equal(kms_counter_get(f, 0, 0), UINT64_MAX);
    expect_render(m, "# HELP p11kms_audit_write_failures_total Audit records that could not be "
                     "written.\n"
                     "# TYPE p11kms_audit_write_failures_total counter\n"
                     "p11kms_audit_write_failures_total 18446744073709551615\n");
    kms_metrics_free(m);
}

static void test_counter_one_label_renders_zeros(void **state)
{
    static const char *const classes[] = {"anonymous", "principal", NULL};
    struct kms_counter_family *f = NULL;
    (void)state;

    assert_int_equal(kms_counter_family_new("p11kms_throttled_total", "Requests refused with 429.",
                                            "class", classes, NULL, NULL, &f),
                     KMS_OK);
    struct kms_metrics *m = registry_with_counter(f);
    kms_counter_add(f, 1, 0, 7);
    expect_render(m, "# HELP p11kms_throttled_total Requests refused with 429.\n"
                     "# TYPE p11kms_throttled_total counter\n"
                     "p11kms_throttled_total{class=\"anonymous\"} 0\n"
                     "p11kms_throttled_total{class=\"principal\"} 7\n");
    kms_metrics_free(m);
}

static void test_counter_two_labels_renders_non_zero_cells(void **state)
{
    struct kms_counter_family *f = NULL;
    (void)state;

    assert_int_equal(kms_counter_family_new("p11kms_requests_total", "Requests answered.",
                                            "operation", ops, "outcome", outcomes, &f),
                     KMS_OK);
    struct kms_metrics *m = registry_with_counter(f);
    /* all zero: the family is announced, without samples */
    expect_render(m, "# HELP p11kms_requests_total Requests answered.\n"
                     "# TYPE p11kms_requests_total counter\n");
    kms_counter_add(f, 2, 0, 3);
    kms_counter_add(f, 0, 2, 1);
    kms_counter_add(f, 0, 0, 2);
    kms_counter_add(f, 1, 1, 0); /* adding zero leaves the cell unrendered */
    assert_int_equal(kms_counter_get(f, 2, 0), 3);
    assert_int_equal(kms_counter_get(f, 0, 2), 1);
    assert_int_equal(kms_counter_get(f, 1, 1), 0);
    /* label1 varies slowest, values in their given order */
    expect_render(m, "# HELP p11kms_requests_total Requests answered.\n"
                     "# TYPE p11kms_requests_total counter\n"
                     "p11kms_requests_total{operation=\"Decrypt\",outcome=\"ok\"} 2\n"
                     "p11kms_requests_total{operation=\"Decrypt\",outcome=\"ThrottlingException\"} "
                     "1\n"
                     "p11kms_requests_total{operation=\"ListKeys\",outcome=\"ok\"} 3\n");
    kms_metrics_free(m);
}

static void test_counter_out_of_range_and_null_do_nothing(void **state)
{
    struct kms_counter_family *f = NULL;
    (void)state;

    assert_int_equal(
        kms_counter_family_new("t_total", "t", "operation", ops, "outcome", outcomes, &f), KMS_OK);
    kms_counter_add(f, 3, 0, 1);
    kms_counter_add(f, 0, 3, 1);
    kms_counter_add(f, SIZE_MAX, SIZE_MAX, 1);
    kms_counter_add(NULL, 0, 0, 1);
    assert_int_equal(kms_counter_get(f, 3, 0), 0);
    assert_int_equal(kms_counter_get(NULL, 0, 0), 0);
    for (size_t i = 0; i < 3; i++)
        for (size_t j = 0; j < 3; j++)
            assert_int_equal(kms_counter_get(f, i, j), 0);
    kms_counter_family_free(f);
    kms_counter_family_free(NULL);

    /* a family without a second label has only index 0 there */
    assert_int_equal(kms_counter_family_new("t_total", "t", "operation", ops, NULL, NULL, &f),
                     KMS_OK);
    kms_counter_add(f, 1, 1, 5);
    kms_counter_add(f, 1, 0, 5);
    assert_int_equal(kms_counter_get(f, 1, 1), 0);
    assert_int_equal(kms_counter_get(f, 1, 0), 5);
    kms_counter_family_free(f);
}

/* ---- histograms ------------------------------------------------------------- */

static void test_histogram_bucket_edges_and_exact_sum(void **state)
{
    static const uint64_t bounds[] = {1000, 5000, 1000000000}; /* 1 µs, 5 µs, 1 s */
    struct kms_histogram_family *f = NULL;
    (void)state;

    assert_int_equal(kms_histogram_family_new("p11kms_token_call_seconds", "Token call latency.",
                                              NULL, NULL, bounds, N_ELEMS(bounds), &f),
                     KMS_OK);
    struct kms_metrics *m = registry_with_histogram(f);
    /* no label: rendered before any observation */
    expect_render(m, "# HELP p11kms_token_call_seconds Token call latency.\n"
                     "# TYPE p11kms_token_call_seconds histogram\n"
                     "p11kms_token_call_seconds_bucket{le=\"0.000001\"} 0\n"
                     "p11kms_token_call_seconds_bucket{le=\"0.000005\"} 0\n"
                     "p11kms_token_call_seconds_bucket{le=\"1\"} 0\n"
                     "p11kms_token_call_seconds_bucket{le=\"+Inf\"} 0\n"
                     "p11kms_token_call_seconds_sum 0\n"
                     "p11kms_token_call_seconds_count 0\n");

    static const uint64_t seen[] = {0, 999, 1000, 1001, 5000, 1000000000, 1000000001, 1};
    for (size_t i = 0; i < N_ELEMS(seen); i++)
        kms_histogram_observe_ns(f, 0, seen[i]);
    kms_histogram_observe_ns(f, 1, 5);    /* out of range */
    kms_histogram_observe_ns(NULL, 0, 5); /* no family */
    assert_int_equal(kms_histogram_count(f, 0), N_ELEMS(seen));
    assert_int_equal(kms_histogram_count(f, 1), 0);
    assert_int_equal(kms_histogram_count(NULL, 0), 0);
    /* an observation equal to a bound is in that bucket (le is <=);
     * sum = 2000008002 ns, exactly */
    expect_render(m, "# HELP p11kms_token_call_seconds Token call latency.\n"
                     "# TYPE p11kms_token_call_seconds histogram\n"
                     "p11kms_token_call_seconds_bucket{le=\"0.000001\"} 4\n"
                     "p11kms_token_call_seconds_bucket{le=\"0.000005\"} 6\n"
                     "p11kms_token_call_seconds_bucket{le=\"1\"} 7\n"
                     "p11kms_token_call_seconds_bucket{le=\"+Inf\"} 8\n"
                     "p11kms_token_call_seconds_sum 2.000008002\n"
                     "p11kms_token_call_seconds_count 8\n");
    kms_metrics_free(m);
}

static void test_histogram_one_label_renders_observed_values(void **state)
{
    static const uint64_t bounds[] = {500000000, 2000000000};
    struct kms_histogram_family *f = NULL;
    (void)state;

    assert_int_equal(kms_histogram_family_new("p11kms_request_duration_seconds", "Request latency.",
                                              "operation", ops, bounds, N_ELEMS(bounds), &f),
                     KMS_OK);
    struct kms_metrics *m = registry_with_histogram(f);
    expect_render(m, "# HELP p11kms_request_duration_seconds Request latency.\n"
                     "# TYPE p11kms_request_duration_seconds histogram\n");
    kms_histogram_observe_ns(f, 2, 1500000000);
    kms_histogram_observe_ns(f, 2, 3000000000);
    kms_histogram_observe_ns(f, 0, 250000000);
    expect_render(m,
                  "# HELP p11kms_request_duration_seconds Request latency.\n"
                  "# TYPE p11kms_request_duration_seconds histogram\n"
                  "p11kms_request_duration_seconds_bucket{operation=\"Decrypt\",le=\"0.5\"} 1\n"
                  "p11kms_request_duration_seconds_bucket{operation=\"Decrypt\",le=\"2\"} 1\n"
                  "p11kms_request_duration_seconds_bucket{operation=\"Decrypt\",le=\"+Inf\"} 1\n"
                  "p11kms_request_duration_seconds_sum{operation=\"Decrypt\"} 0.25\n"
                  "p11kms_request_duration_seconds_count{operation=\"Decrypt\"} 1\n"
                  "p11kms_request_duration_seconds_bucket{operation=\"ListKeys\",le=\"0.5\"} 0\n"
                  "p11kms_request_duration_seconds_bucket{operation=\"ListKeys\",le=\"2\"} 1\n"
                  "p11kms_request_duration_seconds_bucket{operation=\"ListKeys\",le=\"+Inf\"} 2\n"
                  "p11kms_request_duration_seconds_sum{operation=\"ListKeys\"} 4.5\n"
                  "p11kms_request_duration_seconds_count{operation=\"ListKeys\"} 2\n");
    kms_metrics_free(m);
}

static void test_histogram_default_bounds(void **state)
{
    struct kms_histogram_family *f = NULL;
    (void)state;

    assert_int_equal(kms_histogram_family_new("h_seconds", "h", NULL, NULL, NULL, 0, &f), KMS_OK);
    struct kms_metrics *m = registry_with_histogram(f);
    kms_histogram_observe_ns(f, 0, 100000);      /* on the first bound */
    kms_histogram_observe_ns(f, 0, 10000000001); /* past the last: +Inf only */
    expect_render(m, "# HELP h_seconds h\n"
                     "# TYPE h_seconds histogram\n"
                     "h_seconds_bucket{le=\"0.0001\"} 1\n"
                     "h_seconds_bucket{le=\"0.00025\"} 1\n"
                     "h_seconds_bucket{le=\"0.0005\"} 1\n"
                     "h_seconds_bucket{le=\"0.001\"} 1\n"
                     "h_seconds_bucket{le=\"0.0025\"} 1\n"
                     "h_seconds_bucket{le=\"0.005\"} 1\n"
                     "h_seconds_bucket{le=\"0.01\"} 1\n"
                     "h_seconds_bucket{le=\"0.025\"} 1\n"
                     "h_seconds_bucket{le=\"0.05\"} 1\n"
                     "h_seconds_bucket{le=\"0.1\"} 1\n"
                     "h_seconds_bucket{le=\"0.25\"} 1\n"
                     "h_seconds_bucket{le=\"0.5\"} 1\n"
                     "h_seconds_bucket{le=\"1\"} 1\n"
                     "h_seconds_bucket{le=\"2.5\"} 1\n"
                     "h_seconds_bucket{le=\"5\"} 1\n"
                     "h_seconds_bucket{le=\"10\"} 1\n"
                     "h_seconds_bucket{le=\"+Inf\"} 2\n"
                     "h_seconds_sum 10.000100001\n"
                     "h_seconds_count 2\n");
    kms_metrics_free(m);
}

/* ---- gauges, order, escaping ------------------------------------------------ */

static kms_err collect_gauges(void *arg, struct kms_metrics_writer *w)
{
    const int *sessions = arg;
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_sessions", "Token sessions.",
                                      (const char *[]){"state", "in_use", NULL}, sessions[0]));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_sessions", "ignored the second time",
                                      (const char *[]){"state", "waiting", NULL}, sessions[1]));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_keys", "Keys.\nBy state \\ all.", NULL, 12));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_key_version_wraps", "Wraps by a key version.",
                                      (const char *[]){"key", "a\\b\"c\nd", "version", "1", NULL},
                                      0.1));
    KMS_GUARD(kms_metrics_write_gauge(w, "p11kms_key_version_wraps", "",
                                      (const char *[]){"key", "k", "version", "2", NULL}, -2.5));
    KMS_GUARD(kms_metrics_write_gauge(w, "g_special", "Special values.",
                                      (const char *[]){"v", "inf", NULL}, INFINITY));
    KMS_GUARD(kms_metrics_write_gauge(w, "g_special", "", (const char *[]){"v", "-inf", NULL},
                                      -INFINITY));
    KMS_GUARD(kms_metrics_write_gauge(w, "g_special", "", (const char *[]){"v", "nan", NULL}, NAN));
    KMS_GUARD(
        kms_metrics_write_gauge(w, "g_special", "", (const char *[]){"v", "big", NULL}, 1e21));
    KMS_GUARD(
        kms_metrics_write_gauge(w, "g_special", "", (const char *[]){"v", "third", NULL}, 1.0 / 3));
    KMS_GUARD(
        kms_metrics_write_gauge(w, "g_special", "", (const char *[]){"v", "tiny", NULL}, 5e-324));
    return kms_metrics_write_counter(w, "p11kms_wraps_total", "Wraps, kept elsewhere.", NULL,
                                     UINT64_C(12345678901234567890));
}

static void test_collector_gauges_and_escaping(void **state)
{
    struct kms_metrics *m = NULL;
    int sessions[2] = {3, 0};
    (void)state;

    assert_int_equal(kms_metrics_new(&m), KMS_OK);
    assert_int_equal(kms_metrics_add_collector(m, collect_gauges, sessions), KMS_OK);
    expect_render(m, "# HELP p11kms_sessions Token sessions.\n"
                     "# TYPE p11kms_sessions gauge\n"
                     "p11kms_sessions{state=\"in_use\"} 3\n"
                     "p11kms_sessions{state=\"waiting\"} 0\n"
                     "# HELP p11kms_keys Keys.\\nBy state \\\\ all.\n"
                     "# TYPE p11kms_keys gauge\n"
                     "p11kms_keys 12\n"
                     "# HELP p11kms_key_version_wraps Wraps by a key version.\n"
                     "# TYPE p11kms_key_version_wraps gauge\n"
                     "p11kms_key_version_wraps{key=\"a\\\\b\\\"c\\nd\",version=\"1\"} 0.1\n"
                     "p11kms_key_version_wraps{key=\"k\",version=\"2\"} -2.5\n"
                     "# HELP g_special Special values.\n"
                     "# TYPE g_special gauge\n"
                     "g_special{v=\"inf\"} +Inf\n"
                     "g_special{v=\"-inf\"} -Inf\n"
                     "g_special{v=\"nan\"} NaN\n"
                     "g_special{v=\"big\"} 1e+21\n"
                     "g_special{v=\"third\"} 0.3333333333333333\n"
                     "g_special{v=\"tiny\"} 5e-324\n"
                     "# HELP p11kms_wraps_total Wraps, kept elsewhere.\n"
                     "# TYPE p11kms_wraps_total counter\n"
                     "p11kms_wraps_total 12345678901234567890\n");
    kms_metrics_free(m);
}

static kms_err collect_one(void *arg, struct kms_metrics_writer *w)
{
    return kms_metrics_write_gauge(w, "g_middle", "In the middle.", NULL, *(const double *)arg);
}

static void test_registration_order(void **state)
{
    static const uint64_t bounds[] = {1000000000};
    struct kms_metrics *m = NULL;
    struct kms_counter_family *c = NULL;
    struct kms_histogram_family *h = NULL;
    double g = 7;
    (void)state;

    assert_int_equal(kms_metrics_new(&m), KMS_OK);
    assert_int_equal(kms_histogram_family_new("z_seconds", "Z.", NULL, NULL, bounds, 1, &h),
                     KMS_OK);
    assert_int_equal(kms_metrics_add_histogram(m, h), KMS_OK);
    assert_int_equal(kms_metrics_add_collector(m, collect_one, &g), KMS_OK);
    assert_int_equal(kms_counter_family_new("a_total", "A.", NULL, NULL, NULL, NULL, &c), KMS_OK);
    assert_int_equal(kms_metrics_add_counter(m, c), KMS_OK);
    kms_counter_add(c, 0, 0, 1);
    kms_histogram_observe_ns(h, 0, 2000000000);

    /* render appends to what the buffer already holds */
    struct kms_buf b = KMS_BUF_INIT;
    assert_int_equal(kms_buf_append_str(&b, "prefix\n"), KMS_OK);
    assert_int_equal(kms_metrics_render(m, &b), KMS_OK);
    assert_int_equal(kms_buf_terminate(&b), KMS_OK);
    assert_string_equal((const char *)b.data, "prefix\n"
                                              "# HELP z_seconds Z.\n"
                                              "# TYPE z_seconds histogram\n"
                                              "z_seconds_bucket{le=\"1\"} 0\n"
                                              "z_seconds_bucket{le=\"+Inf\"} 1\n"
                                              "z_seconds_sum 2\n"
                                              "z_seconds_count 1\n"
                                              "# HELP g_middle In the middle.\n"
                                              "# TYPE g_middle gauge\n"
                                              "g_middle 7\n"
                                              "# HELP a_total A.\n"
                                              "# TYPE a_total counter\n"
                                              "a_total 1\n");
    kms_buf_free(&b);
    kms_metrics_free(m);

    /* an empty registry renders nothing */
    assert_int_equal(kms_metrics_new(&m), KMS_OK);
    expect_render(m, "");
    kms_metrics_free(m);
    kms_metrics_free(NULL);
}

/* ---- names and shapes refused ------------------------------------------------ */

static void test_bad_names_refused(void **state)
{
    static const char *const bad_metric[] = {"",        "1abc_total", "a-b_total", "a b_total",
                                             "é_total", "a.b_total",  "a{b}_total"};
    static const char *const bad_label[] = {"", "1a", "a:b", "a-b", "__reserved", "a b"};
    static const char *const one[] = {"x", NULL};
    static const char *const none[] = {NULL};
    static const char *const empty_value[] = {"x", "", NULL};
    static const char *const twice[] = {"x", "y", "x", NULL};
    static int dummy;
    /* not NULL, to see a failure reset it */
    struct kms_counter_family *c = (struct kms_counter_family *)(void *)&dummy;
    struct kms_histogram_family *h = NULL;
    (void)state;

    for (size_t i = 0; i < N_ELEMS(bad_metric); i++) {
        kms_err_clear();
        assert_int_equal(kms_counter_family_new(bad_metric[i], "h", NULL, NULL, NULL, NULL, &c),
                         KMS_ERR_INTERNAL);
        assert_null(c);
        assert_non_null(strstr(kms_err_message(), "is not valid"));
        assert_int_equal(kms_histogram_family_new(bad_metric[i], "h", NULL, NULL, NULL, 0, &h),
                         KMS_ERR_INTERNAL);
        assert_null(h);
    }
    assert_int_equal(kms_counter_family_new(NULL, "h", NULL, NULL, NULL, NULL, &c),
                     KMS_ERR_INTERNAL);
    for (size_t i = 0; i < N_ELEMS(bad_label); i++) {
        kms_err_clear();
        assert_int_equal(kms_counter_family_new("c_total", "h", bad_label[i], one, NULL, NULL, &c),
                         KMS_ERR_INTERNAL);
        assert_non_null(strstr(kms_err_message(), "label name"));
        assert_int_equal(kms_counter_family_new("c_total", "h", "ok", one, bad_label[i], one, &c),
                         KMS_ERR_INTERNAL);
        assert_int_equal(kms_histogram_family_new("h", "h", bad_label[i], one, NULL, 0, &h),
                         KMS_ERR_INTERNAL);
    }
    /* the colon is allowed in metric names, and a leading underscore in both */
    assert_int_equal(kms_counter_family_new("_a:b_total", "h", "_x", one, NULL, NULL, &c), KMS_OK);
    kms_counter_family_free(c);

    /* counters end in _total; histograms do not use the suffixes they render */
    assert_int_equal(kms_counter_family_new("requests", "h", NULL, NULL, NULL, NULL, &c),
                     KMS_ERR_INTERNAL);
    static const char *const bad_hist[] = {"h_total", "h_bucket", "h_sum", "h_count"};
    for (size_t i = 0; i < N_ELEMS(bad_hist); i++)
        assert_int_equal(kms_histogram_family_new(bad_hist[i], "h", NULL, NULL, NULL, 0, &h),
                         KMS_ERR_INTERNAL);
    assert_int_equal(kms_histogram_family_new("h", "h", "le", one, NULL, 0, &h), KMS_ERR_INTERNAL);

    /* help text */
    assert_int_equal(kms_counter_family_new("c_total", "", NULL, NULL, NULL, NULL, &c),
                     KMS_ERR_INTERNAL);
    assert_int_equal(kms_counter_family_new("c_total", NULL, NULL, NULL, NULL, NULL, &c),
                     KMS_ERR_INTERNAL);
    assert_int_equal(kms_histogram_family_new("h", "", NULL, NULL, NULL, 0, &h), KMS_ERR_INTERNAL);

    /* label shapes */
    assert_int_equal(kms_counter_family_new("c_total", "h", NULL, NULL, "x", one, &c),
                     KMS_ERR_INTERNAL);
    assert_int_equal(kms_counter_family_new("c_total", "h", "x", one, "x", one, &c),
                     KMS_ERR_INTERNAL);
    assert_int_equal(kms_counter_family_new("c_total", "h", "x", NULL, NULL, NULL, &c),
                     KMS_ERR_INTERNAL);
    assert_int_equal(kms_counter_family_new("c_total", "h", "x", none, NULL, NULL, &c),
                     KMS_ERR_INTERNAL);
    assert_int_equal(kms_counter_family_new("c_total", "h", "x", one, "y", none, &c),
                     KMS_ERR_INTERNAL);
    kms_err_clear();
    assert_int_equal(kms_counter_family_new("c_total", "h", "x", empty_value, NULL, NULL, &c),
                     KMS_ERR_INTERNAL);
    assert_non_null(strstr(kms_err_message(), "empty value"));
    kms_err_clear();
    assert_int_equal(kms_counter_family_new("c_total", "h", "x", one, "y", twice, &c),
                     KMS_ERR_INTERNAL);
    assert_non_null(strstr(kms_err_message(), "value x twice"));
    assert_int_equal(kms_histogram_family_new("h", "h", "x", twice, NULL, 0, &h), KMS_ERR_INTERNAL);
    assert_null(c);
    assert_null(h);
}

static void test_bad_bounds_refused(void **state)
{
    static const uint64_t zero[] = {0, 10};
    static const uint64_t equal[] = {10, 10};
    static const uint64_t down[] = {10, 20, 15};
    uint64_t many[65];
    struct kms_histogram_family *h = NULL;
    (void)state;

    for (size_t i = 0; i < N_ELEMS(many); i++)
        many[i] = i + 1;
    assert_int_equal(kms_histogram_family_new("h", "h", NULL, NULL, zero, 2, &h), KMS_ERR_INTERNAL);
    assert_int_equal(kms_histogram_family_new("h", "h", NULL, NULL, equal, 2, &h),
                     KMS_ERR_INTERNAL);
    assert_int_equal(kms_histogram_family_new("h", "h", NULL, NULL, down, 3, &h), KMS_ERR_INTERNAL);
    assert_int_equal(kms_histogram_family_new("h", "h", NULL, NULL, many, 0, &h), KMS_ERR_INTERNAL);
    assert_int_equal(kms_histogram_family_new("h", "h", NULL, NULL, many, 65, &h),
                     KMS_ERR_INTERNAL);
    assert_null(h);
    assert_int_equal(kms_histogram_family_new("h", "h", NULL, NULL, many, 64, &h), KMS_OK);
    kms_histogram_observe_ns(h, 0, 64);
    kms_histogram_observe_ns(h, 0, 65);
    assert_int_equal(kms_histogram_count(h, 0), 2);
    kms_histogram_family_free(h);
    kms_histogram_family_free(NULL);
}

static void test_registry_refuses_a_name_twice(void **state)
{
    struct kms_metrics *m = NULL;
    struct kms_counter_family *c = NULL;
    struct kms_histogram_family *h = NULL;
    (void)state;

    assert_int_equal(kms_metrics_new(&m), KMS_OK);
    assert_int_equal(kms_counter_family_new("a_total", "A.", NULL, NULL, NULL, NULL, &c), KMS_OK);
    assert_int_equal(kms_metrics_add_counter(m, c), KMS_OK);
    /* the refused family is freed by the registry (LSan/valgrind check it) */
    assert_int_equal(kms_counter_family_new("a_total", "A.", "x", ops, NULL, NULL, &c), KMS_OK);
    kms_err_clear();
    assert_int_equal(kms_metrics_add_counter(m, c), KMS_ERR_INTERNAL);
    assert_non_null(strstr(kms_err_message(), "already in use"));

    assert_int_equal(kms_histogram_family_new("lat", "L.", NULL, NULL, NULL, 0, &h), KMS_OK);
    assert_int_equal(kms_metrics_add_histogram(m, h), KMS_OK);
    assert_int_equal(kms_histogram_family_new("lat", "L.", NULL, NULL, NULL, 0, &h), KMS_OK);
    assert_int_equal(kms_metrics_add_histogram(m, h), KMS_ERR_INTERNAL);
    /* lat_count_total does not clash with lat; a NULL family or callback is refused */
    assert_int_equal(kms_counter_family_new("lat_count_total", "C.", NULL, NULL, NULL, NULL, &c),
                     KMS_OK);
    assert_int_equal(kms_metrics_add_counter(m, c), KMS_OK);
    assert_int_equal(kms_metrics_add_counter(m, NULL), KMS_ERR_INTERNAL);
    assert_int_equal(kms_metrics_add_histogram(m, NULL), KMS_ERR_INTERNAL);
    assert_int_equal(kms_metrics_add_collector(m, NULL, NULL), KMS_ERR_INTERNAL);
    kms_metrics_free(m);
}

/* ---- collector errors ------------------------------------------------------- */

enum bad_collect {
    REOPEN,
    CLASH_WITH_FAMILY,
    CLASH_WITH_HISTOGRAM_PART,
    TYPE_CHANGE,
    BAD_NAME,
    BAD_LABEL,
    LE_LABEL,
    LABEL_TWICE,
    NULL_VALUE,
    COUNTER_NAME,
    OWN_ERROR,
};

static kms_err collect_bad(void *arg, struct kms_metrics_writer *w)
{
    enum bad_collect how = *(const enum bad_collect *)arg;
    KMS_GUARD(kms_metrics_write_gauge(w, "g_first", "First.", NULL, 1));
    switch (how) {
    case REOPEN:
        KMS_GUARD(kms_metrics_write_gauge(w, "g_second", "Second.", NULL, 2));
        return kms_metrics_write_gauge(w, "g_first", "First.", NULL, 3);
    case CLASH_WITH_FAMILY: return kms_metrics_write_gauge(w, "a_total", "A.", NULL, 1);
    case CLASH_WITH_HISTOGRAM_PART: return kms_metrics_write_gauge(w, "lat_sum", "S.", NULL, 1);
    case TYPE_CHANGE:
        KMS_GUARD(kms_metrics_write_gauge(w, "g_total", "G.", NULL, 1));
        return kms_metrics_write_counter(w, "g_total", "G.", NULL, 1);
    case BAD_NAME: return kms_metrics_write_gauge(w, "g-bad", "G.", NULL, 1);
    case BAD_LABEL:
        return kms_metrics_write_gauge(w, "g_first", "", (const char *[]){"a-b", "v", NULL}, 1);
    case LE_LABEL:
        return kms_metrics_write_gauge(w, "g_first", "", (const char *[]){"le", "1", NULL}, 1);
    case LABEL_TWICE:
        return kms_metrics_write_gauge(w, "g_first", "", (const char *[]){"a", "1", "a", "2", NULL},
                                       1);
    case NULL_VALUE:
        return kms_metrics_write_gauge(w, "g_first", "", (const char *[]){"a", NULL}, 1);
    case COUNTER_NAME: return kms_metrics_write_counter(w, "c_no_suffix", "C.", NULL, 1);
    case OWN_ERROR: return KMS_FAIL(KMS_ERR_KEY_UNAVAILABLE, "the key store is gone");
    }
    return KMS_OK;
}

static void test_collector_errors_fail_the_render(void **state)
{
    struct kms_metrics *m = NULL;
    struct kms_counter_family *c = NULL;
    struct kms_histogram_family *h = NULL;
    enum bad_collect how;
    (void)state;

    assert_int_equal(kms_metrics_new(&m), KMS_OK);
    assert_int_equal(kms_counter_family_new("a_total", "A.", NULL, NULL, NULL, NULL, &c), KMS_OK);
    assert_int_equal(kms_metrics_add_counter(m, c), KMS_OK);
    assert_int_equal(kms_histogram_family_new("lat", "L.", NULL, NULL, NULL, 0, &h), KMS_OK);
    assert_int_equal(kms_metrics_add_histogram(m, h), KMS_OK);
    assert_int_equal(kms_metrics_add_collector(m, collect_bad, &how), KMS_OK);

    static const char *const why[] = {
        [REOPEN] = "apart from the rest of its family or clashing with g_first",
        [CLASH_WITH_FAMILY] = "clashing with a_total",
        [CLASH_WITH_HISTOGRAM_PART] = "clashing with lat",
        [TYPE_CHANGE] = "written as a gauge and a counter",
        [BAD_NAME] = "\"g-bad\" is not valid",
        [BAD_LABEL] = "label name \"a-b\"",
        [LE_LABEL] = "label name \"le\"",
        [LABEL_TWICE] = "label a given twice",
        [NULL_VALUE] = "label a has no value",
        [COUNTER_NAME] = "does not end in _total",
        [OWN_ERROR] = "the key store is gone",
    };
    for (how = REOPEN; how <= OWN_ERROR; how++) {
        struct kms_buf b = KMS_BUF_INIT;
        assert_int_equal(kms_buf_append_str(&b, "kept"), KMS_OK);
        kms_err_clear();
        assert_int_equal(kms_metrics_render(m, &b),
                         how == OWN_ERROR ? KMS_ERR_KEY_UNAVAILABLE : KMS_ERR_INTERNAL);
        if (!strstr(kms_err_message(), why[how]))
            fail_msg("case %d: \"%s\" does not say \"%s\"", (int)how, kms_err_message(), why[how]);
        /* cut back to what it held before */
        assert_int_equal(b.len, 4);
        kms_buf_free(&b);
    }
    kms_metrics_free(m);
}

/* A second collector may not continue the family the first one wrote. */
static kms_err collect_first(void *arg, struct kms_metrics_writer *w)
{
    return kms_metrics_write_gauge(w, "g_shared", "Shared.", NULL, 1);
}

static void test_two_collectors_one_family_refused(void **state)
{
    struct kms_metrics *m = NULL;
    struct kms_buf b = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_metrics_new(&m), KMS_OK);
    assert_int_equal(kms_metrics_add_collector(m, collect_first, NULL), KMS_OK);
    expect_render(m, "# HELP g_shared Shared.\n# TYPE g_shared gauge\ng_shared 1\n");
    assert_int_equal(kms_metrics_add_collector(m, collect_first, NULL), KMS_OK);
    assert_int_equal(kms_metrics_render(m, &b), KMS_ERR_INTERNAL);
    assert_int_equal(b.len, 0);
    kms_buf_free(&b);
    kms_metrics_free(m);
}

/* ---- threads ---------------------------------------------------------------- */

#define THREADS 4
#define ADDS 100000

struct shared {
    struct kms_counter_family *c;
    struct kms_histogram_family *h;
};

static void *hammer(void *arg)
{
    struct shared *s = arg;
    for (uint64_t i = 0; i < ADDS; i++) {
        kms_counter_add(s->c, 1, 2, 1);
        kms_counter_add(s->c, 0, 0, 3);
        kms_histogram_observe_ns(s->h, 1, 1000 + i % 3); /* 1000, 1001, 1002 ns */
    }
    return NULL;
}

static void test_concurrent_adds_are_exact(void **state)
{
    static const uint64_t bounds[] = {1000, 1001};
    struct shared s;
    pthread_t t[THREADS];
    (void)state;

    assert_int_equal(
        kms_counter_family_new("c_total", "C.", "operation", ops, "outcome", outcomes, &s.c),
        KMS_OK);
    assert_int_equal(kms_histogram_family_new("h_seconds", "H.", "operation", ops, bounds, 2, &s.h),
                     KMS_OK);
    struct kms_metrics *m = registry_with_counter(s.c);
    assert_int_equal(kms_metrics_add_histogram(m, s.h), KMS_OK);
    for (size_t i = 0; i < THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, hammer, &s), 0);
    for (size_t i = 0; i < THREADS; i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);

    assert_int_equal(kms_counter_get(s.c, 1, 2), THREADS * ADDS);
    assert_int_equal(kms_counter_get(s.c, 0, 0), 3 * THREADS * ADDS);
    assert_int_equal(kms_histogram_count(s.h, 1), THREADS * ADDS);
    /* per thread: 33334 × 1000 + 33333 × 1001 + 33333 × 1002 ns = 100099999 ns */
    expect_render(m, "# HELP c_total C.\n"
                     "# TYPE c_total counter\n"
                     "c_total{operation=\"Decrypt\",outcome=\"ok\"} 1200000\n"
                     "c_total{operation=\"Encrypt\",outcome=\"ThrottlingException\"} 400000\n"
                     "# HELP h_seconds H.\n"
                     "# TYPE h_seconds histogram\n"
                     "h_seconds_bucket{operation=\"Encrypt\",le=\"0.000001\"} 133336\n"
                     "h_seconds_bucket{operation=\"Encrypt\",le=\"0.000001001\"} 266668\n"
                     "h_seconds_bucket{operation=\"Encrypt\",le=\"+Inf\"} 400000\n"
                     "h_seconds_sum{operation=\"Encrypt\"} 0.400399996\n"
                     "h_seconds_count{operation=\"Encrypt\"} 400000\n");
    kms_metrics_free(m);
}

static void test_now_ns_is_monotonic(void **state)
{
    (void)state;
    uint64_t a = kms_metrics_now_ns();
    uint64_t b = kms_metrics_now_ns();
    assert_true(a > 0);
    assert_true(b >= a);
}

/* ---- everything at once, for promtext.py ------------------------------------ */

static void test_render_everything(void **state)
{
    static const char *const classes[] = {"anonymous", "principal", NULL};
    static const char *const fns[] = {"C_Encrypt", "C_Decrypt", "C_WrapKey", NULL};
    struct kms_metrics *m = NULL;
    struct kms_counter_family *req = NULL, *thr = NULL, *audit = NULL;
    struct kms_histogram_family *lat = NULL, *tok = NULL;
    int sessions[2] = {4, 2};
    struct kms_buf b = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_metrics_new(&m), KMS_OK);
    assert_int_equal(kms_counter_family_new("p11kms_requests_total", "Requests by outcome.",
                                            "operation", ops, "outcome", outcomes, &req),
                     KMS_OK);
    assert_int_equal(kms_metrics_add_counter(m, req), KMS_OK);
    assert_int_equal(kms_histogram_family_new("p11kms_request_duration_seconds", "Request latency.",
                                              "operation", ops, NULL, 0, &lat),
                     KMS_OK);
    assert_int_equal(kms_metrics_add_histogram(m, lat), KMS_OK);
    assert_int_equal(kms_histogram_family_new("p11kms_token_call_duration_seconds",
                                              "PKCS#11 call latency.", "function", fns, NULL, 0,
                                              &tok),
                     KMS_OK);
    assert_int_equal(kms_metrics_add_histogram(m, tok), KMS_OK);
    assert_int_equal(kms_metrics_add_collector(m, collect_gauges, sessions), KMS_OK);
    assert_int_equal(kms_counter_family_new("p11kms_throttled_total", "Throttled requests.",
                                            "class", classes, NULL, NULL, &thr),
                     KMS_OK);
    assert_int_equal(kms_metrics_add_counter(m, thr), KMS_OK);
    assert_int_equal(kms_counter_family_new("p11kms_audit_write_failures_total",
                                            "Audit write failures.", NULL, NULL, NULL, NULL,
                                            &audit),
                     KMS_OK);
    assert_int_equal(kms_metrics_add_counter(m, audit), KMS_OK);

    for (uint64_t i = 0; i < 1000; i++) {
        kms_counter_add(req, i % 3, i % 7 == 0 ? 1 : 0, 1);
        kms_histogram_observe_ns(lat, i % 3, i * 37813);
        kms_histogram_observe_ns(tok, i % 2, i * 1777 + 100000);
    }
    kms_counter_add(thr, 0, 0, 9);

    assert_int_equal(kms_metrics_render(m, &b), KMS_OK);
    assert_int_equal(kms_buf_terminate(&b), KMS_OK);
    const char *text = (const char *)b.data;
    assert_non_null(strstr(text, "p11kms_request_duration_seconds_count{operation=\"Decrypt\"} "
                                 "334\n"));
    assert_non_null(strstr(text, "p11kms_throttled_total{class=\"principal\"} 0\n"));
    assert_null(strstr(text, "C_WrapKey"));

    const char *dump = getenv("P11KMS_METRICS_DUMP");
    if (dump && dump[0]) {
        FILE *fp = fopen(dump, "w");
        assert_non_null(fp);
        assert_int_equal(fwrite(b.data, 1, b.len, fp), b.len);
        assert_int_equal(fclose(fp), 0);
    }
    kms_buf_free(&b);
    kms_metrics_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_counter_no_label),
        cmocka_unit_test(test_counter_one_label_renders_zeros),
        cmocka_unit_test(test_counter_two_labels_renders_non_zero_cells),
        cmocka_unit_test(test_counter_out_of_range_and_null_do_nothing),
        cmocka_unit_test(test_histogram_bucket_edges_and_exact_sum),
        cmocka_unit_test(test_histogram_one_label_renders_observed_values),
        cmocka_unit_test(test_histogram_default_bounds),
        cmocka_unit_test(test_collector_gauges_and_escaping),
        cmocka_unit_test(test_registration_order),
        cmocka_unit_test(test_bad_names_refused),
        cmocka_unit_test(test_bad_bounds_refused),
        cmocka_unit_test(test_registry_refuses_a_name_twice),
        cmocka_unit_test(test_collector_errors_fail_the_render),
        cmocka_unit_test(test_two_collectors_one_family_refused),
        cmocka_unit_test(test_concurrent_adds_are_exact),
        cmocka_unit_test(test_now_ns_is_monotonic),
        cmocka_unit_test(test_render_everything),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
