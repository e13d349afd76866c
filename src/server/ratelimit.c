/*
 * Token buckets per principal and operation class, plus a global one.
 *
 * Principals live in an open-addressing table of KMS_RL_SLOTS pointers (twice
 * the cap, so a probe always ends at an empty slot). A slot is written once,
 * with a release store, while table_mu is held, and entries are never moved or
 * removed until the limiter is freed: so a request finds a known principal
 * with acquire loads and no lock, and table_mu is taken only to add a
 * principal or to reconfigure.
 *
 * Locks: a request holds its principal's class bucket, then the global
 * bucket, each for a few arithmetic operations. configure holds table_mu and
 * one bucket at a time (global after releasing table_mu). Insertion holds
 * table_mu alone. So the order is always table_mu → class bucket → global,
 * and nothing slow runs under any of them.
 */
#include "config.h"

#include "server/ratelimit.h"

#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KMS_RL_SLOTS (2 * KMS_RL_MAX_PRINCIPALS)
#define KMS_RL_MASK (KMS_RL_SLOTS - 1)

/*
 * Tolerance in tokens: a bucket short by less than this still pays, so the
 * rounding of refills (fill + rate * elapsed over many steps) never turns a
 * retry at the promised time into a second refusal. Values are capped at
 * 1e9, where one ulp is about 1.2e-7.
 */
#define KMS_RL_EPS 1e-6

struct rl_bucket {
    pthread_mutex_t mu;
    int mu_ok;    /* mu was initialised */
    double rate;  /* tokens per second; 0 = unlimited */
    double burst; /* capacity */
    double fill;  /* tokens held at last_ns */
    int64_t last_ns;
    int started; /* last_ns holds a time: a new bucket is full whenever it is first used */
};

struct rl_entry {
    struct rl_bucket cls[KMS_CLASS_COUNT];
    uint64_t hash;
    size_t len;
    unsigned gen; /* table_mu: the configure that last gave it an override */
    char name[KMS_RL_NAME_MAX + 1];
};

struct kms_ratelimit {
    pthread_mutex_t table_mu; /* adding entries; configure */
    int table_mu_ok;
    struct kms_rate defaults[KMS_CLASS_COUNT]; /* table_mu: rates for new entries */
    unsigned gen;                              /* table_mu */
    atomic_size_t count;                       /* entries in the table */
    _Atomic(struct rl_entry *) *slots;         /* KMS_RL_SLOTS; written once each */
    struct rl_entry overflow;                  /* shared past the cap; default rates */
    struct rl_bucket global;
    atomic_int global_on; /* global.rate > 0, read without a lock to skip it when unlimited */
};

static const char *const class_name[KMS_CLASS_COUNT] = {
    [KMS_CLASS_CRYPTO] = "crypto",
    [KMS_CLASS_MANAGE] = "manage",
    [KMS_CLASS_ASYM] = "asym",
    [KMS_CLASS_HMAC] = "hmac",
};

/* ---- configuration -------------------------------------------------------------- */

void kms_ratelimit_config_defaults(struct kms_ratelimit_config *c)
{
    memset(c, 0, sizeof *c);
    c->global = (struct kms_rate){0, 0};
    c->per_principal[KMS_CLASS_CRYPTO] =
        (struct kms_rate){KMS_RL_DEFAULT_CRYPTO_RATE, KMS_RL_DEFAULT_CRYPTO_BURST};
    c->per_principal[KMS_CLASS_MANAGE] =
        (struct kms_rate){KMS_RL_DEFAULT_MANAGE_RATE, KMS_RL_DEFAULT_MANAGE_BURST};
    c->per_principal[KMS_CLASS_ASYM] =
        (struct kms_rate){KMS_RL_DEFAULT_ASYM_RATE, KMS_RL_DEFAULT_ASYM_BURST};
    c->per_principal[KMS_CLASS_HMAC] =
        (struct kms_rate){KMS_RL_DEFAULT_HMAC_RATE, KMS_RL_DEFAULT_HMAC_BURST};
    c->overrides = NULL;
    c->noverrides = 0;
}

void kms_ratelimit_config_free(struct kms_ratelimit_config *c)
{
    if (!c)
        return;
    for (size_t i = 0; i < c->noverrides; i++)
        free(c->overrides[i].principal);
    free(c->overrides);
    c->overrides = NULL;
    c->noverrides = 0;
}

static int name_ok(const char *s)
{
    static const char extra[] = "_.@+=,-";
    size_t n = 0;
    if (!s)
        return 0;
    for (; s[n]; n++) {
        char ch = s[n];
        int alnum =
            (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9');
        if (n >= KMS_RL_NAME_MAX || (!alnum && !strchr(extra, ch)))
            return 0;
    }
    return n > 0;
}

static double min_d(double a, double b)
{
    return a < b ? a : b;
}

static int value_ok(double v)
{
    return isfinite(v) && v >= 0 && v <= KMS_RL_VALUE_MAX;
}

/* The base keys: which field and which bucket (KMS_CLASS_COUNT = global). */
static const struct {
    const char *name;
    int burst;
    int target;
} base_keys[] = {
    {"rate_global", 0, KMS_CLASS_COUNT},  {"burst_global", 1, KMS_CLASS_COUNT},
    {"rate_crypto", 0, KMS_CLASS_CRYPTO}, {"burst_crypto", 1, KMS_CLASS_CRYPTO},
    {"rate_manage", 0, KMS_CLASS_MANAGE}, {"burst_manage", 1, KMS_CLASS_MANAGE},
    {"rate_asym", 0, KMS_CLASS_ASYM},     {"burst_asym", 1, KMS_CLASS_ASYM},
    {"rate_hmac", 0, KMS_CLASS_HMAC},     {"burst_hmac", 1, KMS_CLASS_HMAC},
};

/* Index into base_keys, or -1; *principal is what follows the '.', or NULL. */
static int parse_key(const char *key, const char **principal)
{
    if (!key)
        return -1;
    for (size_t i = 0; i < sizeof base_keys / sizeof base_keys[0]; i++) {
        size_t n = strlen(base_keys[i].name);
        if (strncmp(key, base_keys[i].name, n) == 0 && (key[n] == '\0' || key[n] == '.')) {
            *principal = key[n] == '.' ? key + n + 1 : NULL;
            return (int)i;
        }
    }
    return -1;
}

int kms_ratelimit_config_is_key(const char *key)
{
    const char *principal;
    return parse_key(key, &principal) >= 0;
}

/* Plain decimal only: strtod alone would also take "nan", "inf", hex and leading blanks. */
static kms_err parse_value(const char *key, const char *value, double *out)
{
    char *end = NULL;
    double v = 0;
    int ok = value && *value >= '0' && *value <= '9' &&
             strspn(value, "0123456789.eE+-") == strlen(value);
    if (ok) {
        errno = 0;
        v = strtod(value, &end);
        ok = end && *end == '\0' && errno == 0 && value_ok(v);
    }
    KMS_ENSURE(ok, KMS_ERR_VALIDATION, "%.100s must be a number from 0 to %.0f, not '%.32s'", key,
               KMS_RL_VALUE_MAX, value ? value : "");
    *out = v;
    return KMS_OK;
}

kms_err kms_ratelimit_config_set(struct kms_ratelimit_config *c, const char *key, const char *value)
{
    const char *principal = NULL;
    int k = parse_key(key, &principal);
    struct kms_rate *r;
    double v = 0;

    KMS_ENSURE(c != NULL, KMS_ERR_INTERNAL, "no rate limit configuration");
    KMS_ENSURE(k >= 0, KMS_ERR_VALIDATION, "unknown rate limit setting '%.100s'", key ? key : "");
    KMS_GUARD(parse_value(key, value, &v));
    if (!principal) {
        r = base_keys[k].target == KMS_CLASS_COUNT ? &c->global
                                                   : &c->per_principal[base_keys[k].target];
    } else {
        KMS_ENSURE(base_keys[k].target != KMS_CLASS_COUNT, KMS_ERR_VALIDATION,
                   "%.100s: the global bucket is shared by all principals and has no "
                   "per-principal form",
                   key);
        KMS_ENSURE(name_ok(principal), KMS_ERR_VALIDATION,
                   "%.100s: a principal name is 1 to %d characters of A-Z a-z 0-9 _ . @ + = , -",
                   key, KMS_RL_NAME_MAX);
        size_t i = 0;
        while (i < c->noverrides && strcmp(c->overrides[i].principal, principal) != 0)
            i++;
        if (i == c->noverrides) {
            KMS_ENSURE(c->noverrides < KMS_RL_MAX_PRINCIPALS, KMS_ERR_VALIDATION,
                       "%.100s: more than %d principals have rate limit overrides", key,
                       KMS_RL_MAX_PRINCIPALS);
            char *name = strdup(principal);
            KMS_ENSURE(name != NULL, KMS_ERR_INTERNAL, "out of memory");
            struct kms_rate_override *grown =
                realloc(c->overrides, (c->noverrides + 1) * sizeof *grown);
            if (!grown) {
                free(name);
                return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
            }
            c->overrides = grown;
            c->overrides[i].principal = name;
            for (int j = 0; j < KMS_CLASS_COUNT; j++)
                c->overrides[i].cls[j] = (struct kms_rate){KMS_RATE_INHERIT, KMS_RATE_INHERIT};
            c->noverrides++;
        }
        r = &c->overrides[i].cls[base_keys[k].target];
    }
    if (base_keys[k].burst)
        r->burst = v;
    else
        r->rate = v;
    return KMS_OK;
}

/* An override's rates with its inherited fields filled from the defaults. */
static struct kms_rate resolve(const struct kms_ratelimit_config *c,
                               const struct kms_rate_override *o, int cls)
{
    struct kms_rate r = o->cls[cls];
    if (r.rate == KMS_RATE_INHERIT)
        r.rate = c->per_principal[cls].rate;
    if (r.burst == KMS_RATE_INHERIT)
        r.burst = c->per_principal[cls].burst;
    return r;
}

/* suffix is "" or ".<principal>". */
static kms_err check_rate(struct kms_rate r, const char *what, const char *suffix, int inherit)
{
    KMS_ENSURE(value_ok(r.rate) || (inherit && r.rate == KMS_RATE_INHERIT), KMS_ERR_VALIDATION,
               "rate_%s%s must be a number from 0 to %.0f", what, suffix, KMS_RL_VALUE_MAX);
    KMS_ENSURE(value_ok(r.burst) || (inherit && r.burst == KMS_RATE_INHERIT), KMS_ERR_VALIDATION,
               "burst_%s%s must be a number from 0 to %.0f", what, suffix, KMS_RL_VALUE_MAX);
    return KMS_OK;
}

static kms_err check_burst(struct kms_rate r, const char *what, const char *suffix)
{
    KMS_ENSURE(r.rate == 0 || r.burst > 0, KMS_ERR_VALIDATION,
               "burst_%s%s must be above 0 when rate_%s%s is (0 would refuse every request)", what,
               suffix, what, suffix);
    return KMS_OK;
}

kms_err kms_ratelimit_config_check(const struct kms_ratelimit_config *c)
{
    char suffix[KMS_RL_NAME_MAX + 2];

    KMS_ENSURE(c != NULL, KMS_ERR_VALIDATION, "no rate limit configuration");
    KMS_GUARD(check_rate(c->global, "global", "", 0));
    KMS_GUARD(check_burst(c->global, "global", ""));
    for (int j = 0; j < KMS_CLASS_COUNT; j++) {
        KMS_GUARD(check_rate(c->per_principal[j], class_name[j], "", 0));
        KMS_GUARD(check_burst(c->per_principal[j], class_name[j], ""));
    }
    KMS_ENSURE(c->noverrides <= KMS_RL_MAX_PRINCIPALS, KMS_ERR_VALIDATION,
               "more than %d principals have rate limit overrides", KMS_RL_MAX_PRINCIPALS);
    KMS_ENSURE(c->noverrides == 0 || c->overrides != NULL, KMS_ERR_VALIDATION,
               "rate limit overrides missing");
    for (size_t i = 0; i < c->noverrides; i++) {
        const struct kms_rate_override *o = &c->overrides[i];
        KMS_ENSURE(name_ok(o->principal), KMS_ERR_VALIDATION,
                   "rate limit override for '%.64s': a principal name is 1 to %d characters of "
                   "A-Z a-z 0-9 _ . @ + = , -",
                   o->principal ? o->principal : "", KMS_RL_NAME_MAX);
        snprintf(suffix, sizeof suffix, ".%s", o->principal);
        for (size_t k = 0; k < i; k++)
            KMS_ENSURE(strcmp(c->overrides[k].principal, o->principal) != 0, KMS_ERR_VALIDATION,
                       "two rate limit overrides for principal '%s'", o->principal);
        for (int j = 0; j < KMS_CLASS_COUNT; j++) {
            KMS_GUARD(check_rate(o->cls[j], class_name[j], suffix, 1));
            KMS_GUARD(check_burst(resolve(c, o, j), class_name[j], suffix));
        }
    }
    return KMS_OK;
}

/* ---- buckets ------------------------------------------------------------------ */

/* A new bucket is unlimited; apply_rates gives it its rates. */
static int bucket_init(struct rl_bucket *b)
{
    memset(b, 0, sizeof *b);
    b->mu_ok = pthread_mutex_init(&b->mu, NULL) == 0;
    return b->mu_ok;
}

static void bucket_destroy(struct rl_bucket *b)
{
    if (b->mu_ok)
        pthread_mutex_destroy(&b->mu);
    b->mu_ok = 0;
}

static void refill_locked(struct rl_bucket *b, int64_t now_ns)
{
    if (!b->started) {
        b->started = 1;
        b->last_ns = now_ns;
        return;
    }
    if (now_ns > b->last_ns) {
        /* unsigned: the difference of two int64 always fits, even where the signed one would not */
        double dt_ns = (double)((uint64_t)now_ns - (uint64_t)b->last_ns);
        b->fill = min_d(b->burst, b->fill + b->rate * dt_ns / 1e9);
        b->last_ns = now_ns;
    }
}

/* ceil(x) within [1, UINT32_MAX]; by hand, so the library needs no libm */
static uint32_t ceil_ms(double x)
{
    uint32_t t;
    if (!(x > 1))
        return 1;
    if (x >= (double)UINT32_MAX)
        return UINT32_MAX;
    t = (uint32_t)x;
    return (double)t < x ? t + 1 : t;
}

/* Whole milliseconds until a bucket holding fill tokens holds need (minus the tolerance). */
static uint32_t wait_ms_locked(const struct rl_bucket *b, double need)
{
    /* half the tolerance here leaves the other half for rounding in the later refill */
    return ceil_ms((need - b->fill - KMS_RL_EPS / 2) * 1000.0 / b->rate);
}

static void apply_rates(struct rl_bucket *b, struct kms_rate r, int64_t now_ns)
{
    pthread_mutex_lock(&b->mu);
    if (b->rate > 0 && b->started && r.rate > 0) {
        /* time so far is paid at the old rate */
        refill_locked(b, now_ns);
        b->fill = min_d(b->fill, r.burst);
    } else if (r.rate > 0) {
        /* unlimited until now, or never used: full, like any new bucket */
        b->fill = r.burst;
        b->started = 0;
    }
    b->rate = r.rate;
    b->burst = r.burst;
    pthread_mutex_unlock(&b->mu);
}

/* ---- the principal table ---------------------------------------------------------- */

static uint64_t hash_name(const char *s, size_t len)
{
    /* FNV-1a: names are authenticated principals, so flooding is not a concern */
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

/* Lock-free: slots only go from NULL to an entry, published with release. */
static struct rl_entry *find(struct kms_ratelimit *rl, const char *name, size_t len, uint64_t h)
{
    for (size_t i = h & KMS_RL_MASK, n = 0; n < KMS_RL_SLOTS; i = (i + 1) & KMS_RL_MASK, n++) {
        struct rl_entry *e = atomic_load_explicit(&rl->slots[i], memory_order_acquire);
        if (!e)
            return NULL;
        if (e->hash == h && e->len == len && memcmp(e->name, name, len) == 0)
            return e;
    }
    return NULL;
}

static void entry_free(struct rl_entry *e)
{
    for (int j = 0; j < KMS_CLASS_COUNT; j++)
        bucket_destroy(&e->cls[j]);
    free(e);
}

/* Finds or adds name (1..KMS_RL_NAME_MAX bytes) with the default rates; NULL when full. */
static struct rl_entry *insert_locked(struct kms_ratelimit *rl, const char *name, size_t len,
                                      uint64_t h, int64_t now_ns)
{
    struct rl_entry *e = find(rl, name, len, h);
    size_t i;

    if (e)
        return e;
    if (atomic_load_explicit(&rl->count, memory_order_relaxed) >= KMS_RL_MAX_PRINCIPALS)
        return NULL;
    e = calloc(1, sizeof *e);
    if (!e)
        return NULL;
    for (int j = 0; j < KMS_CLASS_COUNT; j++) {
        if (!bucket_init(&e->cls[j])) {
            entry_free(e);
            return NULL;
        }
        apply_rates(&e->cls[j], rl->defaults[j], now_ns);
    }
    memcpy(e->name, name, len);
    e->name[len] = '\0';
    e->len = len;
    e->hash = h;
    e->gen = 0;
    /* there is always an empty slot: at most half of them are used */
    for (i = h & KMS_RL_MASK; atomic_load_explicit(&rl->slots[i], memory_order_relaxed);
         i = (i + 1) & KMS_RL_MASK)
        ;
    atomic_store_explicit(&rl->slots[i], e, memory_order_release);
    atomic_fetch_add_explicit(&rl->count, 1, memory_order_relaxed);
    return e;
}

static struct rl_entry *entry_for(struct kms_ratelimit *rl, const char *principal, int64_t now_ns)
{
    size_t len;
    uint64_t h;
    struct rl_entry *e;

    if (!principal)
        return &rl->overflow;
    len = strnlen(principal, KMS_RL_NAME_MAX + 1);
    if (len == 0 || len > KMS_RL_NAME_MAX)
        return &rl->overflow;
    h = hash_name(principal, len);
    e = find(rl, principal, len, h);
    if (e)
        return e;
    /* past the cap, unknown names go straight to the shared entry without the table lock */
    if (atomic_load_explicit(&rl->count, memory_order_relaxed) >= KMS_RL_MAX_PRINCIPALS)
        return &rl->overflow;
    pthread_mutex_lock(&rl->table_mu);
    e = insert_locked(rl, principal, len, h, now_ns);
    pthread_mutex_unlock(&rl->table_mu);
    return e ? e : &rl->overflow;
}

/* ---- the limiter --------------------------------------------------------------- */

kms_err kms_ratelimit_configure(struct kms_ratelimit *rl, const struct kms_ratelimit_config *cfg,
                                int64_t now_ns)
{
    size_t missing = 0;
    kms_err ret = KMS_OK;

    KMS_ENSURE(rl != NULL, KMS_ERR_INTERNAL, "no rate limiter");
    KMS_GUARD(kms_ratelimit_config_check(cfg));

    pthread_mutex_lock(&rl->table_mu);
    for (size_t i = 0; i < cfg->noverrides; i++) {
        const char *p = cfg->overrides[i].principal;
        size_t len = strlen(p);
        if (!find(rl, p, len, hash_name(p, len)))
            missing++;
    }
    if (atomic_load_explicit(&rl->count, memory_order_relaxed) + missing > KMS_RL_MAX_PRINCIPALS) {
        ret = KMS_FAIL(KMS_ERR_LIMIT_EXCEEDED,
                       "%zu new rate limit overrides do not fit beside the %zu principals "
                       "already seen (at most %d); restart to apply them",
                       missing, atomic_load(&rl->count), KMS_RL_MAX_PRINCIPALS);
        goto cleanup;
    }
    /* first give every overridden principal an entry (at today's rates), then change rates */
    for (size_t i = 0; i < cfg->noverrides; i++) {
        const char *p = cfg->overrides[i].principal;
        size_t len = strlen(p);
        if (!insert_locked(rl, p, len, hash_name(p, len), now_ns)) {
            ret = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
            goto cleanup;
        }
    }
    memcpy(rl->defaults, cfg->per_principal, sizeof rl->defaults);
    rl->gen++;
    for (size_t i = 0; i < cfg->noverrides; i++) {
        const struct kms_rate_override *o = &cfg->overrides[i];
        size_t len = strlen(o->principal);
        struct rl_entry *e = find(rl, o->principal, len, hash_name(o->principal, len));
        for (int j = 0; j < KMS_CLASS_COUNT; j++)
            apply_rates(&e->cls[j], resolve(cfg, o, j), now_ns);
        e->gen = rl->gen;
    }
    for (size_t i = 0; i < KMS_RL_SLOTS; i++) {
        struct rl_entry *e = atomic_load_explicit(&rl->slots[i], memory_order_relaxed);
        if (e && e->gen != rl->gen)
            for (int j = 0; j < KMS_CLASS_COUNT; j++)
                apply_rates(&e->cls[j], rl->defaults[j], now_ns);
    }
    for (int j = 0; j < KMS_CLASS_COUNT; j++)
        apply_rates(&rl->overflow.cls[j], rl->defaults[j], now_ns);
    apply_rates(&rl->global, cfg->global, now_ns);
    atomic_store(&rl->global_on, cfg->global.rate > 0);
cleanup:
    pthread_mutex_unlock(&rl->table_mu);
    return ret;
}

kms_err kms_ratelimit_new(const struct kms_ratelimit_config *cfg, struct kms_ratelimit **out)
{
    struct kms_ratelimit *rl = NULL;
    kms_err ret = KMS_OK;
    int ok;

    KMS_ENSURE(out != NULL, KMS_ERR_INTERNAL, "no place for the rate limiter");
    *out = NULL;
    KMS_GUARD(kms_ratelimit_config_check(cfg));
    rl = calloc(1, sizeof *rl);
    KMS_ENSURE(rl != NULL, KMS_ERR_INTERNAL, "out of memory");
    rl->slots = calloc(KMS_RL_SLOTS, sizeof *rl->slots);
    rl->table_mu_ok = pthread_mutex_init(&rl->table_mu, NULL) == 0;
    ok = rl->slots != NULL && rl->table_mu_ok;
    ok &= bucket_init(&rl->global);
    for (int j = 0; j < KMS_CLASS_COUNT; j++)
        ok &= bucket_init(&rl->overflow.cls[j]);
    if (!ok) {
        ret = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory or mutexes for the rate limiter");
        goto cleanup;
    }
    for (size_t i = 0; i < KMS_RL_SLOTS; i++)
        atomic_init(&rl->slots[i], NULL);
    atomic_init(&rl->count, 0);
    atomic_init(&rl->global_on, 0);
    /* every bucket starts unlimited, so configure makes each one full; the time is unused */
    ret = kms_ratelimit_configure(rl, cfg, 0);
    if (ret != KMS_OK)
        goto cleanup;
    *out = rl;
    rl = NULL;
cleanup:
    kms_ratelimit_free(rl);
    return ret;
}

void kms_ratelimit_free(struct kms_ratelimit *rl)
{
    if (!rl)
        return;
    if (rl->slots) {
        for (size_t i = 0; i < KMS_RL_SLOTS; i++) {
            struct rl_entry *e = atomic_load_explicit(&rl->slots[i], memory_order_relaxed);
            if (e)
                entry_free(e);
        }
        free(rl->slots);
    }
    for (int j = 0; j < KMS_CLASS_COUNT; j++)
        bucket_destroy(&rl->overflow.cls[j]);
    bucket_destroy(&rl->global);
    if (rl->table_mu_ok)
        pthread_mutex_destroy(&rl->table_mu);
    free(rl);
}

size_t kms_ratelimit_principals(struct kms_ratelimit *rl)
{
    return rl ? atomic_load(&rl->count) : 0;
}

int kms_ratelimit_take(struct kms_ratelimit *rl, const char *principal, enum kms_op_class cls,
                       double cost, int64_t now_ns, uint32_t *retry_after_ms)
{
    struct rl_bucket *b, *g = NULL;
    double need_b = 0, need_g = 0;
    uint32_t wait = 0, wait_g;
    int limit_b, limit_g = 0, short_b = 0, short_g = 0;

    if (retry_after_ms)
        *retry_after_ms = 0;
    if (!rl)
        return 1;
    if ((unsigned)cls >= KMS_CLASS_COUNT)
        cls = KMS_CLASS_MANAGE;
    if (!(cost >= 0))
        cost = 1.0;
    b = &entry_for(rl, principal, now_ns)->cls[cls];
    if (atomic_load_explicit(&rl->global_on, memory_order_relaxed))
        g = &rl->global;

    pthread_mutex_lock(&b->mu);
    limit_b = b->rate > 0;
    if (limit_b) {
        refill_locked(b, now_ns);
        need_b = min_d(cost, b->burst);
        short_b = b->fill + KMS_RL_EPS < need_b;
    }
    if (g) {
        pthread_mutex_lock(&g->mu);
        limit_g = g->rate > 0;
        if (limit_g) {
            refill_locked(g, now_ns);
            need_g = min_d(cost, g->burst);
            short_g = g->fill + KMS_RL_EPS < need_g;
        }
    }
    if (!short_b && !short_g) {
        if (limit_b)
            b->fill = b->fill > need_b ? b->fill - need_b : 0;
        if (limit_g)
            g->fill = g->fill > need_g ? g->fill - need_g : 0;
    } else {
        if (short_b)
            wait = wait_ms_locked(b, need_b);
        if (short_g && (wait_g = wait_ms_locked(g, need_g)) > wait)
            wait = wait_g;
    }
    if (g)
        pthread_mutex_unlock(&g->mu);
    pthread_mutex_unlock(&b->mu);

    if (!short_b && !short_g)
        return 1;
    if (retry_after_ms)
        *retry_after_ms = wait;
    return 0;
}

/* ---- operation classes ---------------------------------------------------------- */

void kms_ratelimit_classify(const char *operation, enum kms_op_class *cls, double *cost)
{
    static const struct {
        const char *name;
        enum kms_op_class cls;
        double cost;
    } ops[] = {
        {"Decrypt", KMS_CLASS_CRYPTO, 1},
        {"Encrypt", KMS_CLASS_CRYPTO, 1},
        {"GenerateDataKey", KMS_CLASS_CRYPTO, 1},
        {"GenerateDataKeyWithoutPlaintext", KMS_CLASS_CRYPTO, 1},
        {"GenerateRandom", KMS_CLASS_CRYPTO, 1},
        {"ReEncrypt", KMS_CLASS_CRYPTO, 2},
        {"Sign", KMS_CLASS_ASYM, 1},
        {"Verify", KMS_CLASS_ASYM, 1},
        {"DeriveSharedSecret", KMS_CLASS_ASYM, 1},
        {"GetPublicKey", KMS_CLASS_ASYM, 1},
        {"GenerateDataKeyPair", KMS_CLASS_ASYM, 10},
        {"GenerateDataKeyPairWithoutPlaintext", KMS_CLASS_ASYM, 10},
        {"GenerateMac", KMS_CLASS_HMAC, 1},
        {"VerifyMac", KMS_CLASS_HMAC, 1},
        {"DescribeKey", KMS_CLASS_MANAGE, 1},
        {"GetKeyRotationStatus", KMS_CLASS_MANAGE, 1},
        {"ListAliases", KMS_CLASS_MANAGE, 1},
        {"ListKeyRotations", KMS_CLASS_MANAGE, 1},
        {"GetKeyPolicy", KMS_CLASS_MANAGE, 1},
        {"ListKeyPolicies", KMS_CLASS_MANAGE, 1},
        {"PutKeyPolicy", KMS_CLASS_MANAGE, 5},
        {"ListKeys", KMS_CLASS_MANAGE, 1},
        {"ListResourceTags", KMS_CLASS_MANAGE, 1},
        {"CancelKeyDeletion", KMS_CLASS_MANAGE, 5},
        {"CreateAlias", KMS_CLASS_MANAGE, 5},
        {"DeleteAlias", KMS_CLASS_MANAGE, 5},
        {"DisableKey", KMS_CLASS_MANAGE, 5},
        {"DisableKeyRotation", KMS_CLASS_MANAGE, 5},
        {"EnableKey", KMS_CLASS_MANAGE, 5},
        {"EnableKeyRotation", KMS_CLASS_MANAGE, 5},
        {"ScheduleKeyDeletion", KMS_CLASS_MANAGE, 5},
        {"TagResource", KMS_CLASS_MANAGE, 5},
        {"UntagResource", KMS_CLASS_MANAGE, 5},
        {"UpdateAlias", KMS_CLASS_MANAGE, 5},
        {"CreateKey", KMS_CLASS_MANAGE, 10},
        /* ---- grants ---- */
        {"ListGrants", KMS_CLASS_MANAGE, 1},
        {"ListRetirableGrants", KMS_CLASS_MANAGE, 1},
        {"CreateGrant", KMS_CLASS_MANAGE, 5},
        {"RetireGrant", KMS_CLASS_MANAGE, 5},
        {"RevokeGrant", KMS_CLASS_MANAGE, 5},
        {"RotateKeyOnDemand", KMS_CLASS_MANAGE, 10},
    };
    enum kms_op_class c = KMS_CLASS_MANAGE;
    double w = 1;

    for (size_t i = 0; operation && i < sizeof ops / sizeof ops[0]; i++) {
        if (strcmp(ops[i].name, operation) == 0) {
            c = ops[i].cls;
            w = ops[i].cost;
            break;
        }
    }
    if (cls)
        *cls = c;
    if (cost)
        *cost = w;
}
