/*
 * Metrics for /metrics, in the Prometheus text exposition format 0.0.4.
 *
 * Counters and histograms are arrays of C11 atomics whose shape is fixed when
 * they are made: a family has zero, one or two labels (counters) or zero or
 * one label (histograms), each label with a fixed list of values. Recording
 * is a relaxed atomic add or two: no lock, no allocation, safe from any
 * thread. Histograms take nanoseconds so their sums stay exact integers; they
 * are shown in seconds.
 *
 * A registry (struct kms_metrics) owns the families added to it and renders
 * them in the order they were added. Values that live elsewhere (sessions in
 * use, keys, a version's wrap count) are written at render time by a
 * callback through kms_metrics_write_gauge / kms_metrics_write_counter.
 *
 * Threads: make families and add them to the registry before other threads
 * see it; after that, recording and any number of concurrent renders are
 * safe. A render reads each cell once without stopping writers, so a sample
 * may miss an observation in flight (a histogram's _sum can lag its _count
 * by one), but a histogram's _count always equals its +Inf bucket.
 *
 * Rendering rules:
 *   - # HELP (backslash and newline escaped) and # TYPE once per family, then
 *     its samples; families in registration order, callbacks in their slot.
 *   - a counter family with no label: one sample, zero included;
 *     one label: one sample per value, zeros included (a known label set);
 *     two labels: only the non-zero cells, label1 varying slowest
 *     (an operation x outcome matrix is mostly zeros).
 *   - a histogram with no label: always rendered; with one label: only the
 *     values observed at least once. Each series is its cumulative
 *     name_bucket{...,le="..."} lines ending with le="+Inf", then name_sum
 *     (seconds) and name_count.
 *   - label values escape backslash, double quote and newline.
 *   - integers print as integers; bounds and sums are nanoseconds printed as
 *     exact decimal seconds ("0.00025", "1.5", "2"); gauges print the
 *     shortest decimal that reads back to the same double, "+Inf", "-Inf",
 *     "NaN". Numbers are formatted under the "C" locale's decimal point
 *     (p11kmsd never calls setlocale).
 *
 * Names: metric names match [a-zA-Z_:][a-zA-Z0-9_:]*, label names
 * [a-zA-Z_][a-zA-Z0-9_]* and do not start with "__"; counter names end in
 * "_total"; histograms may not use the label "le" nor end in _total, _bucket,
 * _sum or _count. Label values are non-empty, distinct within a label, and
 * the two labels of a family differ. Help text is not empty. Anything else is KMS_ERR_INTERNAL: the
 * names are ours, so a bad one is a bug found at start-up.
 */
#ifndef P11KMS_METRICS_H
#define P11KMS_METRICS_H

#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/error.h"

/* The Content-Type to serve a rendering with. */
#define KMS_METRICS_CONTENT_TYPE "text/plain; version=0.0.4; charset=utf-8"

/* Bucket bounds used when a histogram is made with bounds_ns == NULL. */
#define KMS_METRICS_DEFAULT_BUCKETS 16
extern const uint64_t kms_metrics_default_bounds_ns[KMS_METRICS_DEFAULT_BUCKETS];

struct kms_counter_family;
struct kms_histogram_family;
struct kms_metrics;
struct kms_metrics_writer;

/*
 * Makes a counter family.
 * @param name   metric name, ending in "_total"
 * @param help   help text, not empty (backslash and newline are escaped)
 * @param label1 NULL for no label, else the first label's name
 * @param values1 NULL-terminated values of label1 (NULL when label1 is NULL)
 * @param label2 NULL for at most one label, else the second label's name
 *               (only with label1)
 * @param values2 NULL-terminated values of label2
 * @param out    the family, freed by kms_counter_family_free or by the
 *               registry it is added to
 * @returns KMS_OK, or KMS_ERR_INTERNAL on a bad name or out of memory.
 * Every string is copied.
 */
KMS_MUST_CHECK kms_err kms_counter_family_new(const char *name, const char *help,
                                              const char *label1, const char *const *values1,
                                              const char *label2, const char *const *values2,
                                              struct kms_counter_family **out);
void kms_counter_family_free(struct kms_counter_family *f);

/*
 * Adds n to the cell (i1, i2): indexes into values1 and values2, 0 for a
 * dimension the family lacks. A NULL family or an index out of range does
 * nothing, so callers may record unconditionally.
 */
void kms_counter_add(struct kms_counter_family *f, size_t i1, size_t i2, uint64_t n);
/* The cell's value now; 0 for a NULL family or an index out of range. */
uint64_t kms_counter_get(const struct kms_counter_family *f, size_t i1, size_t i2);

/*
 * Makes a histogram family.
 * @param name    metric name (the base: _bucket, _sum and _count are added)
 * @param help    help text, not empty
 * @param label1  NULL for no label, else the label's name
 * @param values1 NULL-terminated values of label1
 * @param bounds_ns upper bounds of the finite buckets in nanoseconds,
 *                strictly increasing and non-zero; NULL for
 *                kms_metrics_default_bounds_ns (100 µs .. 10 s)
 * @param n_bounds number of bounds (1..64), ignored when bounds_ns is NULL
 * @param out     the family, freed by kms_histogram_family_free or by the
 *                registry it is added to
 * @returns KMS_OK, or KMS_ERR_INTERNAL on a bad name or bounds or out of
 * memory.
 */
KMS_MUST_CHECK kms_err kms_histogram_family_new(const char *name, const char *help,
                                                const char *label1, const char *const *values1,
                                                const uint64_t *bounds_ns, size_t n_bounds,
                                                struct kms_histogram_family **out);
void kms_histogram_family_free(struct kms_histogram_family *f);

/*
 * Records one observation of ns nanoseconds for label value i1 (0 when the
 * family has no label). It falls in the first bucket whose bound is >= ns
 * (Prometheus' le is "less than or equal"). A NULL family or an index out of
 * range does nothing.
 */
void kms_histogram_observe_ns(struct kms_histogram_family *f, size_t i1, uint64_t ns);
/* Observations so far for label value i1; 0 for NULL or out of range. */
uint64_t kms_histogram_count(const struct kms_histogram_family *f, size_t i1);

/* CLOCK_MONOTONIC in nanoseconds, for timing what a histogram observes. */
uint64_t kms_metrics_now_ns(void);

/*
 * Writes gauges (or counters kept elsewhere) at render time. It returns
 * KMS_OK or the error of a kms_metrics_write_* call, which fails the render.
 */
typedef kms_err (*kms_metrics_collect_fn)(void *arg, struct kms_metrics_writer *w);

KMS_MUST_CHECK kms_err kms_metrics_new(struct kms_metrics **out);
/* Frees the registry and every family added to it. NULL is fine. */
void kms_metrics_free(struct kms_metrics *m);

/*
 * Adds a family, rendered after those added before it. The registry takes f
 * whatever the outcome: on failure (a name already used, out of memory) f is
 * freed and KMS_ERR_INTERNAL returned. f stays valid for recording until
 * kms_metrics_free.
 */
KMS_MUST_CHECK kms_err kms_metrics_add_counter(struct kms_metrics *m, struct kms_counter_family *f);
KMS_MUST_CHECK kms_err kms_metrics_add_histogram(struct kms_metrics *m,
                                                 struct kms_histogram_family *f);
/* Adds a callback, called at each render in this slot of the order; arg is borrowed. */
KMS_MUST_CHECK kms_err kms_metrics_add_collector(struct kms_metrics *m, kms_metrics_collect_fn fn,
                                                 void *arg);

/*
 * Appends the exposition of every family to out (not NUL-terminated: call
 * kms_buf_terminate to read it as a string). On failure out is cut back to
 * its length on entry. Errors: a collector's, KMS_ERR_INTERNAL for a family
 * name used twice or out of memory.
 */
KMS_MUST_CHECK kms_err kms_metrics_render(const struct kms_metrics *m, struct kms_buf *out);

/*
 * From a collector: one sample of gauge family name. The first sample of a
 * family writes its HELP (help must not be empty) and TYPE lines; further
 * samples of the same family must follow at once, and their help is ignored.
 * Returns KMS_ERR_INTERNAL for an invalid name or label name, a family
 * reopened after another one, a name that is already another family's (or
 * a histogram's _bucket, _sum, _count), or out of memory.
 * @param labels NULL, or {name1, value1, name2, value2, ..., NULL}; values
 *               are escaped here and may be anything (not NULL)
 */
KMS_MUST_CHECK kms_err kms_metrics_write_gauge(struct kms_metrics_writer *w, const char *name,
                                               const char *help, const char *const *labels,
                                               double value);
/* As kms_metrics_write_gauge, for a counter (name ending in "_total") kept elsewhere. */
KMS_MUST_CHECK kms_err kms_metrics_write_counter(struct kms_metrics_writer *w, const char *name,
                                                 const char *help, const char *const *labels,
                                                 uint64_t value);

#endif
