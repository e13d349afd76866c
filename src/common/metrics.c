/*
 * Counters, histograms and their Prometheus text exposition (metrics.h).
 *
 * Metrics hold no secrets: names, label values and counts. So the registry's
 * own arrays use plain malloc/realloc, and the rendering goes into a kms_buf
 * only because that is what the HTTP layer sends.
 */
#include "config.h"

#include "common/metrics.h"

#include <inttypes.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NS_PER_S UINT64_C(1000000000)
#define MAX_BOUNDS 64

const uint64_t kms_metrics_default_bounds_ns[KMS_METRICS_DEFAULT_BUCKETS] = {
    100000,   250000,    500000,    1000000,   2500000,  5000000,    10000000,   25000000,
    50000000, 100000000, 250000000, 500000000, NS_PER_S, 2500000000, 5000000000, 10000000000,
};

/* One label: its name and the fixed list of its values. */
struct dim {
    char *name;
    char **values;
    size_t n;
};

struct kms_counter_family {
    char *name;
    char *help;
    size_t ndims;
    struct dim dim[2];
    size_t ncells; /* dim[0].n * dim[1].n, label1 varying slowest */
    _Atomic uint64_t *cells;
};

struct kms_histogram_family {
    char *name;
    char *help;
    size_t ndims;
    struct dim dim[1];
    uint64_t *bounds; /* nanoseconds, strictly increasing */
    size_t nb;
    size_t nseries;
    /* Per series, nb + 2 cells: nb finite buckets, the +Inf bucket (not
     * cumulative: each observation adds to one bucket), then the sum in ns. */
    _Atomic uint64_t *cells;
};

enum family_type { TYPE_COUNTER, TYPE_GAUGE, TYPE_HISTOGRAM };

static const char *const type_names[] = {"counter", "gauge", "histogram"};

enum entry_kind { ENTRY_COUNTER, ENTRY_HISTOGRAM, ENTRY_COLLECTOR };

struct entry {
    enum entry_kind kind;
    struct kms_counter_family *counter;
    struct kms_histogram_family *histogram;
    kms_metrics_collect_fn fn;
    void *arg;
};

struct kms_metrics {
    struct entry *e;
    size_t n;
    size_t cap;
};

/* A family already written in this render, so none is announced twice. */
struct seen {
    char *name;
    enum family_type type;
};

struct kms_metrics_writer {
    struct kms_buf *out;
    struct seen *seen;
    size_t nseen;
    size_t capseen;
    int open; /* seen[nseen - 1] is the family samples are being written to */
};

/* ---- names ------------------------------------------------------------------ */

static int is_alpha_(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static int is_digit(char c)
{
    return c >= '0' && c <= '9';
}

static int valid_metric_name(const char *s)
{
    if (!s || !(is_alpha_(s[0]) || s[0] == ':'))
        return 0;
    for (s++; *s; s++)
        if (!(is_alpha_(*s) || is_digit(*s) || *s == ':'))
            return 0;
    return 1;
}

/* Names starting with "__" are reserved to Prometheus itself. */
static int valid_label_name(const char *s)
{
    if (!s || !is_alpha_(s[0]) || strncmp(s, "__", 2) == 0)
        return 0;
    for (s++; *s; s++)
        if (!(is_alpha_(*s) || is_digit(*s)))
            return 0;
    return 1;
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), k = strlen(suffix);
    return n >= k && strcmp(s + n - k, suffix) == 0;
}

/* Whether full is base immediately followed by suffix. */
static int is_base_suffix(const char *full, const char *base, const char *suffix)
{
    size_t n = strlen(base);
    return strncmp(full, base, n) == 0 && strcmp(full + n, suffix) == 0;
}

/* A histogram also owns name_bucket, name_sum and name_count. */
static int names_clash(const char *a, enum family_type ta, const char *b, enum family_type tb)
{
    static const char *const parts[] = {"_bucket", "_sum", "_count"};
    if (strcmp(a, b) == 0)
        return 1;
    for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
        if ((ta == TYPE_HISTOGRAM && is_base_suffix(b, a, parts[i])) ||
            (tb == TYPE_HISTOGRAM && is_base_suffix(a, b, parts[i])))
            return 1;
    return 0;
}

static kms_err check_family_name(const char *name, const char *help, enum family_type t)
{
    KMS_ENSURE(valid_metric_name(name), KMS_ERR_INTERNAL, "metric name \"%s\" is not valid",
               name ? name : "(null)");
    KMS_ENSURE(help && help[0], KMS_ERR_INTERNAL, "metric %s has no help text", name);
    if (t == TYPE_COUNTER)
        KMS_ENSURE(ends_with(name, "_total"), KMS_ERR_INTERNAL,
                   "counter name %s does not end in _total", name);
    if (t == TYPE_HISTOGRAM)
        KMS_ENSURE(!ends_with(name, "_total") && !ends_with(name, "_bucket") &&
                       !ends_with(name, "_sum") && !ends_with(name, "_count"),
                   KMS_ERR_INTERNAL, "histogram name %s ends in a reserved suffix", name);
    return KMS_OK;
}

/* ---- label dimensions ------------------------------------------------------- */

static void dim_free(struct dim *d)
{
    if (d->values)
        for (size_t i = 0; i < d->n; i++)
            free(d->values[i]);
    free(d->values);
    free(d->name);
    memset(d, 0, sizeof *d);
}

static kms_err dim_copy(struct dim *d, const char *metric, const char *label,
                        const char *const *values)
{
    kms_err ret = KMS_OK;
    size_t n = 0;

    memset(d, 0, sizeof *d);
    if (!valid_label_name(label)) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "metric %s: label name \"%s\" is not valid", metric,
                       label ? label : "(null)");
        goto cleanup;
    }
    while (values && values[n])
        n++;
    if (n == 0) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "metric %s: label %s has no values", metric, label);
        goto cleanup;
    }
    for (size_t i = 0; i < n; i++) {
        if (!values[i][0]) {
            ret =
                KMS_FAIL(KMS_ERR_INTERNAL, "metric %s: label %s has an empty value", metric, label);
            goto cleanup;
        }
        for (size_t j = 0; j < i; j++)
            if (strcmp(values[i], values[j]) == 0) {
                ret = KMS_FAIL(KMS_ERR_INTERNAL, "metric %s: label %s has the value %s twice",
                               metric, label, values[i]);
                goto cleanup;
            }
    }
    d->name = strdup(label);
    d->values = calloc(n, sizeof *d->values);
    if (!d->name || !d->values) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        goto cleanup;
    }
    d->n = n;
    for (size_t i = 0; i < n; i++) {
        d->values[i] = strdup(values[i]);
        if (!d->values[i]) {
            ret = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
            goto cleanup;
        }
    }

cleanup:
    if (ret != KMS_OK)
        dim_free(d);
    return ret;
}

/* calloc of n atomics, each initialised as C11 asks. */
static _Atomic uint64_t *atomics_new(size_t n)
{
    _Atomic uint64_t *a = calloc(n, sizeof *a);
    if (a)
        for (size_t i = 0; i < n; i++)
            atomic_init(&a[i], 0);
    return a;
}

/* ---- counters --------------------------------------------------------------- */

void kms_counter_family_free(struct kms_counter_family *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < 2; i++)
        dim_free(&f->dim[i]);
    free(f->cells);
    free(f->help);
    free(f->name);
    free(f);
}

kms_err kms_counter_family_new(const char *name, const char *help, const char *label1,
                               const char *const *values1, const char *label2,
                               const char *const *values2, struct kms_counter_family **out)
{
    kms_err ret = KMS_OK;
    struct kms_counter_family *f = NULL;

    *out = NULL;
    ret = check_family_name(name, help, TYPE_COUNTER);
    if (ret != KMS_OK)
        goto cleanup;
    if (!label1 && label2) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "metric %s: a second label without a first", name);
        goto cleanup;
    }
    if (label1 && label2 && strcmp(label1, label2) == 0) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "metric %s: label %s given twice", name, label1);
        goto cleanup;
    }
    f = calloc(1, sizeof *f);
    if (!f) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        goto cleanup;
    }
    f->ncells = 1;
    if (label1) {
        ret = dim_copy(&f->dim[0], name, label1, values1);
        if (ret != KMS_OK)
            goto cleanup;
        f->ndims = 1;
        f->ncells = f->dim[0].n;
    }
    if (label2) {
        ret = dim_copy(&f->dim[1], name, label2, values2);
        if (ret != KMS_OK)
            goto cleanup;
        f->ndims = 2;
        if (f->dim[1].n > SIZE_MAX / sizeof *f->cells / f->dim[0].n) {
            ret = KMS_FAIL(KMS_ERR_INTERNAL, "metric %s has too many cells", name);
            goto cleanup;
        }
        f->ncells = f->dim[0].n * f->dim[1].n;
    }
    f->name = strdup(name);
    f->help = strdup(help);
    f->cells = atomics_new(f->ncells);
    if (!f->name || !f->help || !f->cells) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        goto cleanup;
    }
    *out = f;
    f = NULL;

cleanup:
    kms_counter_family_free(f);
    return ret;
}

/* The cell for (i1, i2), or NULL when either index is out of range. */
static _Atomic uint64_t *counter_cell(const struct kms_counter_family *f, size_t i1, size_t i2)
{
    size_t n1 = f->ndims >= 1 ? f->dim[0].n : 1;
    size_t n2 = f->ndims >= 2 ? f->dim[1].n : 1;
    if (i1 >= n1 || i2 >= n2)
        return NULL;
    return &f->cells[i1 * n2 + i2];
}

void kms_counter_add(struct kms_counter_family *f, size_t i1, size_t i2, uint64_t n)
{
    _Atomic uint64_t *c = f ? counter_cell(f, i1, i2) : NULL;
    if (c)
        atomic_fetch_add_explicit(c, n, memory_order_relaxed);
}

uint64_t kms_counter_get(const struct kms_counter_family *f, size_t i1, size_t i2)
{
    _Atomic uint64_t *c = f ? counter_cell(f, i1, i2) : NULL;
    return c ? atomic_load_explicit(c, memory_order_relaxed) : 0;
}

/* ---- histograms ------------------------------------------------------------- */

void kms_histogram_family_free(struct kms_histogram_family *f)
{
    if (!f)
        return;
    dim_free(&f->dim[0]);
    free(f->cells);
    free(f->bounds);
    free(f->help);
    free(f->name);
    free(f);
}

kms_err kms_histogram_family_new(const char *name, const char *help, const char *label1,
                                 const char *const *values1, const uint64_t *bounds_ns,
                                 size_t n_bounds, struct kms_histogram_family **out)
{
    kms_err ret = KMS_OK;
    struct kms_histogram_family *f = NULL;

    *out = NULL;
    ret = check_family_name(name, help, TYPE_HISTOGRAM);
    if (ret != KMS_OK)
        goto cleanup;
    if (label1 && strcmp(label1, "le") == 0) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "histogram %s may not have the label le", name);
        goto cleanup;
    }
    if (!bounds_ns) {
        bounds_ns = kms_metrics_default_bounds_ns;
        n_bounds = KMS_METRICS_DEFAULT_BUCKETS;
    }
    if (n_bounds < 1 || n_bounds > MAX_BOUNDS || bounds_ns[0] == 0) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "histogram %s: bad bucket bounds", name);
        goto cleanup;
    }
    for (size_t i = 1; i < n_bounds; i++)
        if (bounds_ns[i] <= bounds_ns[i - 1]) {
            ret = KMS_FAIL(KMS_ERR_INTERNAL, "histogram %s: bounds are not increasing", name);
            goto cleanup;
        }
    f = calloc(1, sizeof *f);
    if (!f) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        goto cleanup;
    }
    f->nseries = 1;
    if (label1) {
        ret = dim_copy(&f->dim[0], name, label1, values1);
        if (ret != KMS_OK)
            goto cleanup;
        f->ndims = 1;
        f->nseries = f->dim[0].n;
    }
    f->nb = n_bounds;
    if (f->nseries > SIZE_MAX / sizeof *f->cells / (f->nb + 2)) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "histogram %s has too many series", name);
        goto cleanup;
    }
    f->name = strdup(name);
    f->help = strdup(help);
    f->bounds = malloc(n_bounds * sizeof *f->bounds);
    f->cells = atomics_new(f->nseries * (f->nb + 2));
    if (!f->name || !f->help || !f->bounds || !f->cells) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        goto cleanup;
    }
    memcpy(f->bounds, bounds_ns, n_bounds * sizeof *f->bounds);
    *out = f;
    f = NULL;

cleanup:
    kms_histogram_family_free(f);
    return ret;
}

void kms_histogram_observe_ns(struct kms_histogram_family *f, size_t i1, uint64_t ns)
{
    if (!f || i1 >= f->nseries)
        return;
    _Atomic uint64_t *c = &f->cells[i1 * (f->nb + 2)];
    size_t b = 0;
    /* At most 64 bounds, usually 16: a linear scan is as quick as a bisection. */
    while (b < f->nb && ns > f->bounds[b])
        b++;
    atomic_fetch_add_explicit(&c[b], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&c[f->nb + 1], ns, memory_order_relaxed);
}

uint64_t kms_histogram_count(const struct kms_histogram_family *f, size_t i1)
{
    uint64_t n = 0;
    if (!f || i1 >= f->nseries)
        return 0;
    for (size_t b = 0; b <= f->nb; b++)
        n += atomic_load_explicit(&f->cells[i1 * (f->nb + 2) + b], memory_order_relaxed);
    return n;
}

uint64_t kms_metrics_now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * NS_PER_S + (uint64_t)t.tv_nsec;
}

/* ---- the registry ----------------------------------------------------------- */

kms_err kms_metrics_new(struct kms_metrics **out)
{
    *out = calloc(1, sizeof **out);
    KMS_ENSURE(*out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

void kms_metrics_free(struct kms_metrics *m)
{
    if (!m)
        return;
    for (size_t i = 0; i < m->n; i++) {
        kms_counter_family_free(m->e[i].counter);
        kms_histogram_family_free(m->e[i].histogram);
    }
    free(m->e);
    free(m);
}

static kms_err add_entry(struct kms_metrics *m, const struct entry *e)
{
    const char *name = e->counter ? e->counter->name : e->histogram ? e->histogram->name : NULL;
    enum family_type t = e->counter ? TYPE_COUNTER : TYPE_HISTOGRAM;

    if (name)
        for (size_t i = 0; i < m->n; i++) {
            const struct entry *o = &m->e[i];
            if (o->kind == ENTRY_COLLECTOR)
                continue;
            KMS_ENSURE(!names_clash(name, t, o->counter ? o->counter->name : o->histogram->name,
                                    o->counter ? TYPE_COUNTER : TYPE_HISTOGRAM),
                       KMS_ERR_INTERNAL, "metric name %s is already in use", name);
        }
    if (m->n == m->cap) {
        size_t cap = m->cap ? m->cap * 2 : 16;
        struct entry *p = realloc(m->e, cap * sizeof *p);
        KMS_ENSURE(p != NULL, KMS_ERR_INTERNAL, "out of memory");
        m->e = p;
        m->cap = cap;
    }
    m->e[m->n++] = *e;
    return KMS_OK;
}

kms_err kms_metrics_add_counter(struct kms_metrics *m, struct kms_counter_family *f)
{
    struct entry e = {.kind = ENTRY_COUNTER, .counter = f};
    kms_err ret = f ? add_entry(m, &e) : KMS_FAIL(KMS_ERR_INTERNAL, "no counter family");
    if (ret != KMS_OK)
        kms_counter_family_free(f);
    return ret;
}

kms_err kms_metrics_add_histogram(struct kms_metrics *m, struct kms_histogram_family *f)
{
    struct entry e = {.kind = ENTRY_HISTOGRAM, .histogram = f};
    kms_err ret = f ? add_entry(m, &e) : KMS_FAIL(KMS_ERR_INTERNAL, "no histogram family");
    if (ret != KMS_OK)
        kms_histogram_family_free(f);
    return ret;
}

kms_err kms_metrics_add_collector(struct kms_metrics *m, kms_metrics_collect_fn fn, void *arg)
{
    struct entry e = {.kind = ENTRY_COLLECTOR, .fn = fn, .arg = arg};
    KMS_ENSURE(fn != NULL, KMS_ERR_INTERNAL, "no collector function");
    return add_entry(m, &e);
}

/* ---- text ------------------------------------------------------------------- */

/* Appends s, each character in esc written as a backslash escape. */
static kms_err append_escaped(struct kms_buf *out, const char *s, const char *esc)
{
    while (*s) {
        size_t run = strcspn(s, esc);
        KMS_GUARD(kms_buf_append(out, s, run));
        s += run;
        if (!*s)
            break;
        KMS_GUARD(kms_buf_append_str(out, *s == '\n' ? "\\n" : *s == '"' ? "\\\"" : "\\\\"));
        s++;
    }
    return KMS_OK;
}

static void fmt_u64(char buf[32], uint64_t v)
{
    snprintf(buf, 32, "%" PRIu64, v);
}

/* Nanoseconds as exact decimal seconds without trailing zeros: "0.00025", "2". */
static void fmt_seconds(char buf[32], uint64_t ns)
{
    uint64_t frac = ns % NS_PER_S;
    if (frac == 0) {
        snprintf(buf, 32, "%" PRIu64, ns / NS_PER_S);
        return;
    }
    int n = snprintf(buf, 32, "%" PRIu64 ".%09" PRIu64, ns / NS_PER_S, frac);
    while (n > 0 && buf[n - 1] == '0')
        buf[--n] = '\0';
}

/* The shortest %g that reads back as v; Prometheus' spellings of the specials. */
static void fmt_double(char buf[32], double v)
{
    if (isnan(v)) {
        snprintf(buf, 32, "NaN");
        return;
    }
    if (isinf(v)) {
        snprintf(buf, 32, "%s", v > 0 ? "+Inf" : "-Inf");
        return;
    }
    for (int p = 1; p <= 17; p++) {
        snprintf(buf, 32, "%.*g", p, v);
        if (strtod(buf, NULL) == v)
            return;
    }
}

/*
 * name + suffix {l1="v1",...,le="le"} value. pairs is {name, value, ...,
 * NULL} or NULL; le is NULL but for histogram buckets.
 */
static kms_err write_sample(struct kms_buf *out, const char *name, const char *suffix,
                            const char *const *pairs, const char *le, const char *value)
{
    int any = 0;

    KMS_GUARD(kms_buf_append_str(out, name));
    KMS_GUARD(kms_buf_append_str(out, suffix));
    for (size_t i = 0; pairs && pairs[i]; i += 2) {
        KMS_GUARD(kms_buf_append_str(out, any ? "," : "{"));
        KMS_GUARD(kms_buf_append_str(out, pairs[i]));
        KMS_GUARD(kms_buf_append_str(out, "=\""));
        KMS_GUARD(append_escaped(out, pairs[i + 1], "\\\"\n"));
        KMS_GUARD(kms_buf_append_str(out, "\""));
        any = 1;
    }
    if (le) {
        KMS_GUARD(kms_buf_append_str(out, any ? ",le=\"" : "{le=\""));
        KMS_GUARD(kms_buf_append_str(out, le));
        KMS_GUARD(kms_buf_append_str(out, "\""));
        any = 1;
    }
    if (any)
        KMS_GUARD(kms_buf_append_str(out, "}"));
    KMS_GUARD(kms_buf_append_str(out, " "));
    KMS_GUARD(kms_buf_append_str(out, value));
    return kms_buf_append_str(out, "\n");
}

/*
 * Makes name the family being written: nothing to do when it already is
 * (same type), else HELP and TYPE lines, once per render.
 */
static kms_err open_family(struct kms_metrics_writer *w, const char *name, const char *help,
                           enum family_type t)
{
    if (w->open && strcmp(w->seen[w->nseen - 1].name, name) == 0) {
        KMS_ENSURE(w->seen[w->nseen - 1].type == t, KMS_ERR_INTERNAL,
                   "metric %s written as a %s and a %s", name,
                   type_names[w->seen[w->nseen - 1].type], type_names[t]);
        return KMS_OK;
    }
    KMS_GUARD(check_family_name(name, help, t));
    for (size_t i = 0; i < w->nseen; i++)
        KMS_ENSURE(!names_clash(name, t, w->seen[i].name, w->seen[i].type), KMS_ERR_INTERNAL,
                   "metric %s written apart from the rest of its family or clashing with %s", name,
                   w->seen[i].name);
    if (w->nseen == w->capseen) {
        size_t cap = w->capseen ? w->capseen * 2 : 32;
        struct seen *p = realloc(w->seen, cap * sizeof *p);
        KMS_ENSURE(p != NULL, KMS_ERR_INTERNAL, "out of memory");
        w->seen = p;
        w->capseen = cap;
    }
    w->seen[w->nseen].name = strdup(name);
    KMS_ENSURE(w->seen[w->nseen].name != NULL, KMS_ERR_INTERNAL, "out of memory");
    w->seen[w->nseen++].type = t;
    w->open = 1;

    KMS_GUARD(kms_buf_append_str(w->out, "# HELP "));
    KMS_GUARD(kms_buf_append_str(w->out, name));
    KMS_GUARD(kms_buf_append_str(w->out, " "));
    KMS_GUARD(append_escaped(w->out, help, "\\\n"));
    KMS_GUARD(kms_buf_append_str(w->out, "\n# TYPE "));
    KMS_GUARD(kms_buf_append_str(w->out, name));
    KMS_GUARD(kms_buf_append_str(w->out, " "));
    KMS_GUARD(kms_buf_append_str(w->out, type_names[t]));
    return kms_buf_append_str(w->out, "\n");
}

static kms_err check_pairs(const char *name, const char *const *pairs)
{
    for (size_t i = 0; pairs && pairs[i]; i += 2) {
        KMS_ENSURE(valid_label_name(pairs[i]) && strcmp(pairs[i], "le") != 0, KMS_ERR_INTERNAL,
                   "metric %s: label name \"%s\" is not valid", name, pairs[i]);
        KMS_ENSURE(pairs[i + 1] != NULL, KMS_ERR_INTERNAL, "metric %s: label %s has no value", name,
                   pairs[i]);
        for (size_t j = 0; j < i; j += 2)
            KMS_ENSURE(strcmp(pairs[i], pairs[j]) != 0, KMS_ERR_INTERNAL,
                       "metric %s: label %s given twice", name, pairs[i]);
    }
    return KMS_OK;
}

kms_err kms_metrics_write_gauge(struct kms_metrics_writer *w, const char *name, const char *help,
                                const char *const *labels, double value)
{
    char v[32];
    KMS_GUARD(check_pairs(name, labels));
    KMS_GUARD(open_family(w, name, help, TYPE_GAUGE));
    fmt_double(v, value);
    return write_sample(w->out, name, "", labels, NULL, v);
}

kms_err kms_metrics_write_counter(struct kms_metrics_writer *w, const char *name, const char *help,
                                  const char *const *labels, uint64_t value)
{
    char v[32];
    KMS_GUARD(check_pairs(name, labels));
    KMS_GUARD(open_family(w, name, help, TYPE_COUNTER));
    fmt_u64(v, value);
    return write_sample(w->out, name, "", labels, NULL, v);
}

static kms_err render_counter(struct kms_metrics_writer *w, const struct kms_counter_family *f)
{
    size_t n1 = f->ndims >= 1 ? f->dim[0].n : 1;
    size_t n2 = f->ndims >= 2 ? f->dim[1].n : 1;
    char v[32];

    KMS_GUARD(open_family(w, f->name, f->help, TYPE_COUNTER));
    for (size_t i = 0; i < n1; i++)
        for (size_t j = 0; j < n2; j++) {
            uint64_t c = atomic_load_explicit(&f->cells[i * n2 + j], memory_order_relaxed);
            if (f->ndims == 2 && c == 0)
                continue;
            const char *pairs[5] = {NULL};
            if (f->ndims >= 1) {
                pairs[0] = f->dim[0].name;
                pairs[1] = f->dim[0].values[i];
            }
            if (f->ndims >= 2) {
                pairs[2] = f->dim[1].name;
                pairs[3] = f->dim[1].values[j];
            }
            fmt_u64(v, c);
            KMS_GUARD(write_sample(w->out, f->name, "", pairs, NULL, v));
        }
    return KMS_OK;
}

static kms_err render_histogram(struct kms_metrics_writer *w, const struct kms_histogram_family *f)
{
    uint64_t counts[MAX_BOUNDS + 1];
    char v[32], le[32];

    KMS_GUARD(open_family(w, f->name, f->help, TYPE_HISTOGRAM));
    for (size_t s = 0; s < f->nseries; s++) {
        const _Atomic uint64_t *c = &f->cells[s * (f->nb + 2)];
        uint64_t total = 0;
        /* One read per bucket, so _count is exactly the +Inf bucket. */
        for (size_t b = 0; b <= f->nb; b++) {
            counts[b] = atomic_load_explicit(&c[b], memory_order_relaxed);
            total += counts[b];
        }
        if (f->ndims == 1 && total == 0)
            continue;
        uint64_t sum = atomic_load_explicit(&c[f->nb + 1], memory_order_relaxed);
        const char *pairs[3] = {NULL};
        if (f->ndims == 1) {
            pairs[0] = f->dim[0].name;
            pairs[1] = f->dim[0].values[s];
        }
        uint64_t cum = 0;
        for (size_t b = 0; b < f->nb; b++) {
            cum += counts[b];
            fmt_seconds(le, f->bounds[b]);
            fmt_u64(v, cum);
            KMS_GUARD(write_sample(w->out, f->name, "_bucket", pairs, le, v));
        }
        fmt_u64(v, total);
        KMS_GUARD(write_sample(w->out, f->name, "_bucket", pairs, "+Inf", v));
        fmt_seconds(v, sum);
        KMS_GUARD(write_sample(w->out, f->name, "_sum", pairs, NULL, v));
        fmt_u64(v, total);
        KMS_GUARD(write_sample(w->out, f->name, "_count", pairs, NULL, v));
    }
    return KMS_OK;
}

static kms_err render_entry(struct kms_metrics_writer *w, const struct entry *e)
{
    switch (e->kind) {
    case ENTRY_COUNTER: return render_counter(w, e->counter);
    case ENTRY_HISTOGRAM: return render_histogram(w, e->histogram);
    case ENTRY_COLLECTOR: return e->fn(e->arg, w);
    }
    return KMS_FAIL(KMS_ERR_INTERNAL, "unknown metrics entry");
}

kms_err kms_metrics_render(const struct kms_metrics *m, struct kms_buf *out)
{
    struct kms_metrics_writer w = {out, NULL, 0, 0, 0};
    size_t start = out->len;
    kms_err ret = KMS_OK;

    for (size_t i = 0; i < m->n && ret == KMS_OK; i++) {
        ret = render_entry(&w, &m->e[i]);
        /* A collector's next sample never continues the family before it. */
        w.open = 0;
    }
    if (ret != KMS_OK)
        out->len = start;
    for (size_t i = 0; i < w.nseen; i++)
        free(w.seen[i].name);
    free(w.seen);
    return ret;
}
