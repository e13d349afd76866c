/*
 * Unit tests for src/server/ratelimit.h: token buckets per principal and
 * class plus a global one, with the clock passed in so every count and every
 * Retry-After is exact.
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

#include "server/ratelimit.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* An arbitrary monotonic start, far from 0 so nothing depends on a zero clock. */
#define T0 INT64_C(1000000000000)
#define MS INT64_C(1000000)
#define SEC INT64_C(1000000000)

/* A configuration with nothing limited; each test limits what it checks. */
static void unlimited(struct kms_ratelimit_config *c)
{
    kms_ratelimit_config_defaults(c);
    for (int j = 0; j < KMS_CLASS_COUNT; j++)
        c->per_principal[j] = (struct kms_rate){0, 0};
}

static struct kms_ratelimit *make(const struct kms_ratelimit_config *c)
{
    struct kms_ratelimit *rl = NULL;
    assert_int_equal(kms_ratelimit_new(c, &rl), KMS_OK);
    assert_non_null(rl);
    return rl;
}

/* Takes until the first refusal (at most limit times); returns how many passed. */
static unsigned drain(struct kms_ratelimit *rl, const char *who, enum kms_op_class cls, double cost,
                      int64_t now, unsigned limit)
{
    uint32_t retry;
    unsigned n = 0;
    while (n < limit && kms_ratelimit_take(rl, who, cls, cost, now, &retry))
        n++;
    return n;
}

static void expect_refused(struct kms_ratelimit *rl, const char *who, enum kms_op_class cls,
                           double cost, int64_t now, uint32_t want_ms)
{
    uint32_t retry = 12345;
    assert_int_equal(kms_ratelimit_take(rl, who, cls, cost, now, &retry), 0);
    assert_int_equal(retry, want_ms);
}

static void expect_allowed(struct kms_ratelimit *rl, const char *who, enum kms_op_class cls,
                           double cost, int64_t now)
{
    uint32_t retry = 12345;
    assert_int_equal(kms_ratelimit_take(rl, who, cls, cost, now, &retry), 1);
    assert_int_equal(retry, 0);
}

/* ---- defaults ------------------------------------------------------------------- */

static void test_defaults(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    memset(&c, 0xa5, sizeof c);
    kms_ratelimit_config_defaults(&c);
    assert_true(c.global.rate == 0);
    assert_true(c.per_principal[KMS_CLASS_CRYPTO].rate == 50000);
    assert_true(c.per_principal[KMS_CLASS_CRYPTO].burst == 50000);
    assert_true(c.per_principal[KMS_CLASS_MANAGE].rate == 1000);
    assert_true(c.per_principal[KMS_CLASS_MANAGE].burst == 2000);
    assert_true(c.per_principal[KMS_CLASS_ASYM].rate == 5000);
    assert_true(c.per_principal[KMS_CLASS_ASYM].burst == 5000);
    assert_true(c.per_principal[KMS_CLASS_HMAC].rate == 50000);
    assert_true(c.per_principal[KMS_CLASS_HMAC].burst == 50000);
    assert_null(c.overrides);
    assert_int_equal(c.noverrides, 0);
    assert_int_equal(kms_ratelimit_config_check(&c), KMS_OK);

    /* the defaults in action: 50000 crypto and 2000 manage at once, then 1/50000 s and 1/1000 s */
    rl = make(&c);
    assert_int_equal(drain(rl, "svc", KMS_CLASS_CRYPTO, 1, T0, 60000), 50000);
    expect_refused(rl, "svc", KMS_CLASS_CRYPTO, 1, T0, 1);
    assert_int_equal(drain(rl, "svc", KMS_CLASS_MANAGE, 1, T0, 3000), 2000);
    expect_refused(rl, "svc", KMS_CLASS_MANAGE, 1, T0, 1);
    /* asym and hmac have buckets of their own: crypto and manage are empty by now */
    assert_int_equal(drain(rl, "svc", KMS_CLASS_ASYM, 1, T0, 6000), 5000);
    expect_refused(rl, "svc", KMS_CLASS_ASYM, 1, T0, 1);
    assert_int_equal(drain(rl, "svc", KMS_CLASS_HMAC, 1, T0, 60000), 50000);
    expect_refused(rl, "svc", KMS_CLASS_HMAC, 1, T0, 1);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

/* ---- one bucket ------------------------------------------------------------------ */

static void test_burst_then_refused_with_exact_retry(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){10, 5};
    rl = make(&c);
    for (int i = 0; i < 5; i++)
        expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 1, T0);
    /* one token at 10/s: 100 ms */
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 100);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 100);
    /* a cost of 3 needs 300 ms */
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 3, T0, 300);
    kms_ratelimit_free(rl);

    /* a rate that does not divide a second: 1/3 s rounds up to 334 ms */
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){3, 2};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 2);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 334);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_refill_after_exact_time(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){10, 5};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 100);
    /* 1 ms early: 0.99 tokens, 1 ms to go */
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 99 * MS, 1);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 100 * MS);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 100 * MS, 100);
    /* half a second: 5 tokens, and never more than the burst */
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 600 * MS, 10), 5);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 3600 * SEC, 10), 5);
    kms_ratelimit_free(rl);

    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){3, 2};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 2);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 334);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 333 * MS, 1);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 334 * MS);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_time_going_back_adds_nothing(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){10, 5};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + SEC, 10), 5);
    /* an earlier time (another thread's older clock reading) neither refills nor breaks */
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 100);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, INT64_MIN, 100);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + SEC + 100 * MS);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_weighted_cost_and_cost_above_burst(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){10, 5};
    rl = make(&c);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 2, T0);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 2, T0);
    /* 1 left, 2 needed: 100 ms */
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 2, T0, 100);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 0.5, T0);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 0.5, T0);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 0.5, T0, 50);
    /* a zero cost always passes */
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 0, T0);
    kms_ratelimit_free(rl);

    /* a cost above the burst asks for a full bucket, and takes all of it */
    rl = make(&c);
    expect_allowed(rl, "bob", KMS_CLASS_CRYPTO, 1000, T0);
    expect_refused(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 100);
    expect_refused(rl, "bob", KMS_CLASS_CRYPTO, INFINITY, T0, 500);
    expect_refused(rl, "bob", KMS_CLASS_CRYPTO, 1000, T0 + 499 * MS, 1);
    expect_allowed(rl, "bob", KMS_CLASS_CRYPTO, 1000, T0 + 500 * MS);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_bad_arguments(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    uint32_t retry = 7;
    (void)state;

    /* no limiter: no limits */
    assert_int_equal(kms_ratelimit_take(NULL, "alice", KMS_CLASS_CRYPTO, 1, T0, &retry), 1);
    assert_int_equal(retry, 0);
    kms_ratelimit_free(NULL);
    assert_int_equal(kms_ratelimit_principals(NULL), 0);

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){10, 5};
    c.per_principal[KMS_CLASS_MANAGE] = (struct kms_rate){1, 2};
    assert_int_equal(kms_ratelimit_new(NULL, &rl), KMS_ERR_VALIDATION);
    assert_int_equal(kms_ratelimit_new(&c, NULL), KMS_ERR_INTERNAL);
    rl = make(&c);
    /* NaN and negative costs count as 1 (a negative one must never add tokens) */
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, NAN, T0);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, -100, T0);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 3);
    /* a class outside the enum is a management call */
    expect_allowed(rl, "alice", (enum kms_op_class)7, 1, T0);
    expect_allowed(rl, "alice", (enum kms_op_class) - 1, 1, T0);
    expect_refused(rl, "alice", KMS_CLASS_MANAGE, 1, T0, 1000);
    /* retry_after_ms may be NULL */
    assert_int_equal(kms_ratelimit_take(rl, "alice", KMS_CLASS_MANAGE, 1, T0, NULL), 0);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

/* ---- several buckets -------------------------------------------------------------- */

static void test_principals_are_independent(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){10, 5};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 100);
    assert_int_equal(drain(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    /* names differ in one byte, or are prefixes of one another */
    assert_int_equal(drain(rl, "alicf", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    assert_int_equal(drain(rl, "alic", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    assert_int_equal(drain(rl, "alice2", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    assert_int_equal(kms_ratelimit_principals(rl), 5);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_classes_are_separate(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){10, 5};
    c.per_principal[KMS_CLASS_MANAGE] = (struct kms_rate){1, 3};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 100);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_MANAGE, 1, T0, 10), 3);
    expect_refused(rl, "alice", KMS_CLASS_MANAGE, 1, T0, 1000);
    /* crypto refilled at its own rate while manage is still empty */
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 100 * MS);
    expect_refused(rl, "alice", KMS_CLASS_MANAGE, 1, T0 + 100 * MS, 900);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_global_throttles_across_principals(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.global = (struct kms_rate){2, 4};
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){100, 100};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 3), 3);
    expect_allowed(rl, "bob", KMS_CLASS_MANAGE, 1, T0);
    /* both classes and every principal draw from it: 1 token at 2/s */
    expect_refused(rl, "carol", KMS_CLASS_CRYPTO, 1, T0, 500);
    expect_refused(rl, "bob", KMS_CLASS_MANAGE, 1, T0, 500);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 500);
    expect_allowed(rl, "carol", KMS_CLASS_CRYPTO, 1, T0 + 500 * MS);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 500 * MS, 500);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_retry_is_for_the_scarcest_bucket(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.global = (struct kms_rate){1, 2};
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){10, 1};
    rl = make(&c);
    /* both empty after two takes: the principal needs 100 ms, the global 1000 ms */
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 1, T0);
    expect_allowed(rl, "bob", KMS_CLASS_CRYPTO, 1, T0);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 1000);
    /* after 950 ms the principal is full again and only the global is short */
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 950 * MS, 50);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 1000 * MS);
    /* both empty again: the global's 1000 ms wins over the principal's 100 ms... */
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 1000 * MS, 1000);
    /* ...and at 1.9 s the global lacks 0.1 tokens (100 ms), the principal none */
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 1900 * MS, 100);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_refusal_takes_nothing(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    /* refused by the principal's bucket: the global keeps its tokens */
    unlimited(&c);
    c.global = (struct kms_rate){0.001, 4};
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){0.001, 2};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 2);
    for (int i = 0; i < 50; i++)
        assert_int_equal(kms_ratelimit_take(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, NULL), 0);
    /* the global still holds exactly 2 */
    assert_int_equal(drain(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 10), 2);
    kms_ratelimit_free(rl);

    /* refused by the global bucket: the principal keeps its tokens */
    c.global = (struct kms_rate){1000, 2};
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){0.001, 5};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 2);
    for (int i = 0; i < 50; i++)
        expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 1);
    /* the global refills every 2 ms; alice's 3 remaining tokens come out, no more */
    unsigned passed = 0;
    for (int64_t t = 1; t <= 10; t++)
        passed += drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + t * 2 * MS, 10);
    assert_int_equal(passed, 3);
    kms_ratelimit_free(rl);

    /* a refused weighted request takes nothing either */
    c.global = (struct kms_rate){0, 0};
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){1, 5};
    rl = make(&c);
    expect_allowed(rl, "alice", KMS_CLASS_CRYPTO, 3, T0);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 3, T0, 1000);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 2);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_rate_zero_is_unlimited(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 100000), 100000);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_MANAGE, 1e12, T0, 1000), 1000);
    kms_ratelimit_free(rl);

    /* unlimited crypto beside a limited manage and global 0 */
    c.per_principal[KMS_CLASS_MANAGE] = (struct kms_rate){1, 1};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 50000), 50000);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_MANAGE, 1, T0, 10), 1);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

/* ---- overrides -------------------------------------------------------------------- */

static void test_override_applies_to_named_principal_only(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){10, 5};
    c.per_principal[KMS_CLASS_MANAGE] = (struct kms_rate){1, 3};
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto.alice", "1"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_crypto.alice", "2"), KMS_OK);
    /* batch may burst higher than the default; its rate follows the default */
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_crypto.batch", "8"), KMS_OK);
    /* admin's management calls are unlimited */
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_manage.admin", "0"), KMS_OK);
    rl = make(&c);
    /* overridden principals have buckets from the start */
    assert_int_equal(kms_ratelimit_principals(rl), 3);

    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 2);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 1000);
    /* alice's manage bucket is the default one */
    assert_int_equal(drain(rl, "alice", KMS_CLASS_MANAGE, 1, T0, 10), 3);
    assert_int_equal(drain(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    expect_refused(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 100);
    assert_int_equal(drain(rl, "batch", KMS_CLASS_CRYPTO, 1, T0, 20), 8);
    expect_refused(rl, "batch", KMS_CLASS_CRYPTO, 1, T0, 100);
    assert_int_equal(drain(rl, "admin", KMS_CLASS_MANAGE, 1, T0, 1000), 1000);
    assert_int_equal(drain(rl, "admin", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    /* case matters: "Alice" is another principal */
    assert_int_equal(drain(rl, "Alice", KMS_CLASS_CRYPTO, 1, T0, 10), 5);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_override_inherits_defaults_set_later(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    /* the override comes first in the file, the default after it */
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto.alice", "1"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_crypto", "4"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto", "1000"), KMS_OK);
    assert_true(c.overrides[0].cls[KMS_CLASS_CRYPTO].burst == KMS_RATE_INHERIT);
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 10), 4);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 1000);
    assert_int_equal(drain(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 10), 4);
    expect_refused(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 1);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

/* ---- reconfiguration ---------------------------------------------------------------- */

static void test_reconfigure_keeps_fill_clamped(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){0.001, 10};
    rl = make(&c);
    /* alice holds 7, bob 2, carol is full (10), dave never came */
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 3), 3);
    assert_int_equal(drain(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 8), 8);
    expect_allowed(rl, "carol", KMS_CLASS_CRYPTO, 0, T0);

    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){0.001, 5};
    assert_int_equal(kms_ratelimit_configure(rl, &c, T0), KMS_OK);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 20), 5);
    assert_int_equal(drain(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 20), 2);
    /* a larger burst does not fill a bucket up */
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){0.001, 50};
    assert_int_equal(kms_ratelimit_configure(rl, &c, T0), KMS_OK);
    assert_int_equal(drain(rl, "carol", KMS_CLASS_CRYPTO, 1, T0, 100), 5);
    /* but a new bucket starts full at the new burst */
    assert_int_equal(drain(rl, "dave", KMS_CLASS_CRYPTO, 1, T0, 100), 50);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_reconfigure_pays_elapsed_time_at_old_rate(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){1, 10};
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 20), 10);
    /* 2 s at 1/s, then 100/s from the reload on */
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){100, 10};
    assert_int_equal(kms_ratelimit_configure(rl, &c, T0 + 2 * SEC), KMS_OK);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 2 * SEC, 20), 2);
    expect_refused(rl, "alice", KMS_CLASS_CRYPTO, 1, T0 + 2 * SEC, 10);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_reconfigure_limits_and_overrides(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    (void)state;

    unlimited(&c);
    rl = make(&c);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 1000), 1000);
    /* unlimited to limited: full */
    c.global = (struct kms_rate){1, 6};
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){1, 4};
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_crypto.bob", "1"), KMS_OK);
    assert_int_equal(kms_ratelimit_configure(rl, &c, T0), KMS_OK);
    assert_int_equal(drain(rl, "alice", KMS_CLASS_CRYPTO, 1, T0, 20), 4);
    assert_int_equal(drain(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 20), 1);
    /* the global had 6: 1 left */
    assert_int_equal(drain(rl, "carol", KMS_CLASS_CRYPTO, 1, T0, 20), 1);
    /* bob's override goes away: back to the default burst, his (empty) fill kept */
    kms_ratelimit_config_free(&c);
    c.global = (struct kms_rate){0, 0};
    assert_int_equal(kms_ratelimit_configure(rl, &c, T0), KMS_OK);
    expect_refused(rl, "bob", KMS_CLASS_CRYPTO, 1, T0, 1000);
    assert_int_equal(drain(rl, "bob", KMS_CLASS_CRYPTO, 1, T0 + 10 * SEC, 20), 4);
    /* carol is no longer held back by the global bucket */
    assert_int_equal(drain(rl, "carol", KMS_CLASS_CRYPTO, 1, T0, 20), 3);

    /* a bad configuration changes nothing */
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){1, 0};
    assert_int_equal(kms_ratelimit_configure(rl, &c, T0), KMS_ERR_VALIDATION);
    assert_int_equal(drain(rl, "erin", KMS_CLASS_CRYPTO, 1, T0, 20), 4);
    assert_int_equal(kms_ratelimit_configure(NULL, &c, T0), KMS_ERR_INTERNAL);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

/* ---- the table cap -------------------------------------------------------------- */

static void test_table_cap(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    char name[32], longname[KMS_RL_NAME_MAX + 2];
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_MANAGE] = (struct kms_rate){1, 3};
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_manage.vip", "1"), KMS_OK);
    rl = make(&c);
    assert_int_equal(kms_ratelimit_principals(rl), 1);
    for (int i = 1; i < KMS_RL_MAX_PRINCIPALS; i++) {
        snprintf(name, sizeof name, "p%d", i);
        expect_allowed(rl, name, KMS_CLASS_MANAGE, 1, T0);
    }
    assert_int_equal(kms_ratelimit_principals(rl), KMS_RL_MAX_PRINCIPALS);

    /* past the cap, newcomers share one bucket with the default rates */
    assert_int_equal(drain(rl, "late1", KMS_CLASS_MANAGE, 1, T0, 10), 3);
    expect_refused(rl, "late2", KMS_CLASS_MANAGE, 1, T0, 1000);
    expect_refused(rl, NULL, KMS_CLASS_MANAGE, 1, T0, 1000);
    assert_int_equal(kms_ratelimit_principals(rl), KMS_RL_MAX_PRINCIPALS);
    /* the principals already in the table keep their own buckets */
    assert_int_equal(drain(rl, "p1", KMS_CLASS_MANAGE, 1, T0, 10), 2);
    assert_int_equal(drain(rl, "p4095", KMS_CLASS_MANAGE, 1, T0, 10), 2);
    assert_int_equal(drain(rl, "vip", KMS_CLASS_MANAGE, 1, T0, 10), 1);

    /* a new override does not fit; an existing principal's does, and replaces vip's */
    kms_ratelimit_config_free(&c);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_manage.late1", "9"), KMS_OK);
    kms_err_clear();
    assert_int_equal(kms_ratelimit_configure(rl, &c, T0), KMS_ERR_LIMIT_EXCEEDED);
    assert_non_null(strstr(kms_err_message(), "4096"));
    kms_ratelimit_config_free(&c);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_manage.p7", "9"), KMS_OK);
    assert_int_equal(kms_ratelimit_configure(rl, &c, T0), KMS_OK);
    assert_int_equal(drain(rl, "p7", KMS_CLASS_MANAGE, 1, T0, 20), 2);
    assert_int_equal(drain(rl, "p7", KMS_CLASS_MANAGE, 1, T0 + 60 * SEC, 20), 9);
    assert_int_equal(drain(rl, "vip", KMS_CLASS_MANAGE, 1, T0 + 60 * SEC, 20), 3);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);

    /* empty and overlong names never get an entry: they share the overflow bucket */
    unlimited(&c);
    c.per_principal[KMS_CLASS_MANAGE] = (struct kms_rate){1, 3};
    rl = make(&c);
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    assert_int_equal(strlen(longname), KMS_RL_NAME_MAX + 1);
    expect_allowed(rl, longname, KMS_CLASS_MANAGE, 1, T0);
    expect_allowed(rl, "", KMS_CLASS_MANAGE, 1, T0);
    expect_allowed(rl, NULL, KMS_CLASS_MANAGE, 1, T0);
    expect_refused(rl, "", KMS_CLASS_MANAGE, 1, T0, 1000);
    assert_int_equal(kms_ratelimit_principals(rl), 0);
    /* 64 characters, the other side of the line: a full bucket of its own */
    expect_allowed(rl, longname + 1, KMS_CLASS_MANAGE, 3, T0);
    assert_int_equal(kms_ratelimit_principals(rl), 1);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

/* ---- threads ------------------------------------------------------------------ */

#define N_THREADS 4
#define ATTEMPTS 20000

struct hammer {
    struct kms_ratelimit *rl;
    const char *principal;
    unsigned allowed;
    unsigned bad_retry; /* refusals whose Retry-After was not the expected one */
    uint32_t want_retry;
};

static void *hammer_run(void *arg)
{
    struct hammer *h = arg;
    for (int i = 0; i < ATTEMPTS; i++) {
        uint32_t retry = 0;
        if (kms_ratelimit_take(h->rl, h->principal, KMS_CLASS_CRYPTO, 1, T0, &retry))
            h->allowed++;
        else if (retry != h->want_retry)
            h->bad_retry++;
    }
    return NULL;
}

static unsigned run_hammers(struct hammer *h)
{
    pthread_t t[N_THREADS];
    unsigned total = 0;
    for (int i = 0; i < N_THREADS; i++)
        assert_int_equal(pthread_create(&t[i], NULL, hammer_run, &h[i]), 0);
    for (int i = 0; i < N_THREADS; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        assert_int_equal(h[i].bad_retry, 0);
        total += h[i].allowed;
    }
    return total;
}

static void test_threads_one_principal(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    struct hammer h[N_THREADS];
    (void)state;

    unlimited(&c);
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){1000, 10000};
    rl = make(&c);
    for (int i = 0; i < N_THREADS; i++)
        h[i] = (struct hammer){rl, "svc", 0, 0, 1};
    assert_int_equal(run_hammers(h), 10000);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

static void test_threads_global(void **state)
{
    static const char *const names[N_THREADS] = {"a", "b", "c", "d"};
    struct kms_ratelimit_config c;
    struct kms_ratelimit *rl;
    struct hammer h[N_THREADS];
    (void)state;

    /* each principal could pass 3000, the global lets 7000 through in all */
    unlimited(&c);
    c.global = (struct kms_rate){1, 7000};
    c.per_principal[KMS_CLASS_CRYPTO] = (struct kms_rate){1, 3000};
    rl = make(&c);
    for (int i = 0; i < N_THREADS; i++)
        h[i] = (struct hammer){rl, names[i], 0, 0, 1000};
    assert_int_equal(run_hammers(h), 7000);
    for (int i = 0; i < N_THREADS; i++)
        assert_in_range(h[i].allowed, 0, 3000);
    kms_ratelimit_free(rl);
    kms_ratelimit_config_free(&c);
}

/* ---- configuration keys ------------------------------------------------------------ */

static void test_config_is_key(void **state)
{
    static const char *const yes[] = {
        "rate_global",       "burst_global", "rate_crypto",       "burst_crypto",
        "rate_manage",       "burst_manage", "rate_crypto.alice", "burst_manage.a.b",
        "rate_global.alice", "rate_crypto.", "rate_asym",         "burst_asym",
        "rate_hmac",         "burst_hmac",   "rate_asym.alice",   "burst_hmac.bob",
    };
    static const char *const no[] = {
        "rate",         "rate_",        "rate_cryptox", "rate_crypt", "Rate_crypto",
        "burst",        "rate_global_", "threads",      "",           "crypto_rate",
        " rate_crypto", "rate_crypto ", "rate_asymx",   "rate_rsa",   "rate_ecc",
        "rate_hma",     "burst_hmac_",
    };
    (void)state;

    for (size_t i = 0; i < N_ELEMS(yes); i++)
        if (!kms_ratelimit_config_is_key(yes[i]))
            fail_msg("'%s' should be a rate limit key", yes[i]);
    for (size_t i = 0; i < N_ELEMS(no); i++)
        if (kms_ratelimit_config_is_key(no[i]))
            fail_msg("'%s' should not be a rate limit key", no[i]);
    assert_false(kms_ratelimit_config_is_key(NULL));
}

static void test_config_set_parses(void **state)
{
    struct kms_ratelimit_config c;
    (void)state;

    kms_ratelimit_config_defaults(&c);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_global", "50000"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_global", "1e5"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto", "2500.5"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_crypto", "5000"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_manage", "0.5"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_manage", "2E+1"), KMS_OK);
    assert_true(c.global.rate == 50000 && c.global.burst == 100000);
    assert_true(c.per_principal[KMS_CLASS_CRYPTO].rate == 2500.5);
    assert_true(c.per_principal[KMS_CLASS_CRYPTO].burst == 5000);
    assert_true(c.per_principal[KMS_CLASS_MANAGE].rate == 0.5);
    assert_true(c.per_principal[KMS_CLASS_MANAGE].burst == 20);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_asym", "300"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_asym", "600"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_hmac", "2000"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_hmac", "4000"), KMS_OK);
    assert_true(c.per_principal[KMS_CLASS_ASYM].rate == 300);
    assert_true(c.per_principal[KMS_CLASS_ASYM].burst == 600);
    assert_true(c.per_principal[KMS_CLASS_HMAC].rate == 2000);
    assert_true(c.per_principal[KMS_CLASS_HMAC].burst == 4000);
    assert_true(c.per_principal[KMS_CLASS_CRYPTO].rate == 2500.5);
    /* limits: 0 and 1e9 are in */
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_global", "0"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_global", "1000000000"), KMS_OK);
    assert_true(c.global.rate == 0 && c.global.burst == 1e9);

    /* overrides: one entry per principal, later settings win, the rest inherit */
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto.svc-orders@prod", "10"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_manage.svc-orders@prod", "7"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto.a.b_c+d=e,f", "1"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto.svc-orders@prod", "20"), KMS_OK);
    assert_int_equal(c.noverrides, 2);
    assert_string_equal(c.overrides[0].principal, "svc-orders@prod");
    assert_true(c.overrides[0].cls[KMS_CLASS_CRYPTO].rate == 20);
    assert_true(c.overrides[0].cls[KMS_CLASS_CRYPTO].burst == KMS_RATE_INHERIT);
    assert_true(c.overrides[0].cls[KMS_CLASS_MANAGE].rate == KMS_RATE_INHERIT);
    assert_true(c.overrides[0].cls[KMS_CLASS_MANAGE].burst == 7);
    assert_string_equal(c.overrides[1].principal, "a.b_c+d=e,f");
    assert_int_equal(kms_ratelimit_config_check(&c), KMS_OK);
    kms_ratelimit_config_free(&c);
    assert_null(c.overrides);
    assert_int_equal(c.noverrides, 0);
    kms_ratelimit_config_free(&c);
    kms_ratelimit_config_free(NULL);
}

static void expect_set_error(const char *key, const char *value, kms_err want)
{
    struct kms_ratelimit_config c, before;

    kms_ratelimit_config_defaults(&c);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto.keep", "3"), KMS_OK);
    before = c;
    kms_err_clear();
    assert_int_equal(kms_ratelimit_config_set(&c, key, value), want);
    /* the message names the key, and the configuration is as it was */
    if (key && *key && strstr(kms_err_message(), key) == NULL)
        fail_msg("message \"%s\" does not name \"%s\"", kms_err_message(), key);
    assert_memory_equal(&c, &before, sizeof c);
    assert_int_equal(c.noverrides, 1);
    assert_true(c.overrides[0].cls[KMS_CLASS_CRYPTO].rate == 3);
    kms_ratelimit_config_free(&c);
}

static void test_config_set_rejects(void **state)
{
    static const char *const bad_numbers[] = {
        "-1", "-0", "+1", "nan", "NaN",   "inf",   "infinity", "abc",        "",    "1x",  "0x10",
        " 1", "1 ", "1e", ".5",  "1.2.3", "1e999", "2e9",      "1000000001", "1,5", "1-2",
    };
    struct kms_ratelimit_config c;
    char key[12 + KMS_RL_NAME_MAX + 2];
    (void)state;

    for (size_t i = 0; i < N_ELEMS(bad_numbers); i++) {
        expect_set_error("rate_crypto", bad_numbers[i], KMS_ERR_VALIDATION);
        expect_set_error("burst_manage.alice", bad_numbers[i], KMS_ERR_VALIDATION);
    }
    expect_set_error("rate_global", NULL, KMS_ERR_VALIDATION);
    /* not ours */
    expect_set_error("rate_cryptox", "1", KMS_ERR_VALIDATION);
    expect_set_error("threads", "1", KMS_ERR_VALIDATION);
    expect_set_error(NULL, "1", KMS_ERR_VALIDATION);
    /* the global bucket has no per-principal form */
    expect_set_error("rate_global.alice", "1", KMS_ERR_VALIDATION);
    expect_set_error("burst_global.alice", "1", KMS_ERR_VALIDATION);
    /* principal names */
    expect_set_error("rate_crypto.", "1", KMS_ERR_VALIDATION);
    expect_set_error("rate_crypto.a/b", "1", KMS_ERR_VALIDATION);
    expect_set_error("rate_crypto.a b", "1", KMS_ERR_VALIDATION);
    expect_set_error("rate_crypto.al\xc3\xa9", "1", KMS_ERR_VALIDATION);
    expect_set_error("rate_crypto.x:y", "1", KMS_ERR_VALIDATION);
    /* 65 characters are too many, 64 are fine */
    memcpy(key, "rate_crypto.", 12);
    memset(key + 12, 'x', KMS_RL_NAME_MAX + 1);
    key[12 + KMS_RL_NAME_MAX + 1] = '\0';
    expect_set_error(key, "1", KMS_ERR_VALIDATION);
    key[12 + KMS_RL_NAME_MAX] = '\0';
    kms_ratelimit_config_defaults(&c);
    assert_int_equal(kms_ratelimit_config_set(&c, key, "1"), KMS_OK);
    assert_int_equal(strlen(c.overrides[0].principal), KMS_RL_NAME_MAX);
    kms_ratelimit_config_free(&c);
    assert_int_equal(kms_ratelimit_config_set(NULL, "rate_crypto", "1"), KMS_ERR_INTERNAL);
}

static void test_config_set_override_cap(void **state)
{
    struct kms_ratelimit_config c;
    char key[64];
    (void)state;

    kms_ratelimit_config_defaults(&c);
    for (int i = 0; i < KMS_RL_MAX_PRINCIPALS; i++) {
        snprintf(key, sizeof key, "rate_crypto.p%d", i);
        assert_int_equal(kms_ratelimit_config_set(&c, key, "1"), KMS_OK);
    }
    /* an existing one may still change; a new one is refused */
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_crypto.p0", "2"), KMS_OK);
    kms_err_clear();
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto.one-more", "1"), KMS_ERR_VALIDATION);
    assert_non_null(strstr(kms_err_message(), "rate_crypto.one-more"));
    assert_int_equal(c.noverrides, KMS_RL_MAX_PRINCIPALS);
    assert_int_equal(kms_ratelimit_config_check(&c), KMS_OK);
    kms_ratelimit_config_free(&c);
}

/* kms_ratelimit_config_check through kms_ratelimit_new: the error and the key it names. */
static void expect_check_error(const struct kms_ratelimit_config *c, const char *names)
{
    struct kms_ratelimit *rl = (struct kms_ratelimit *)1;
    kms_err_clear();
    assert_int_equal(kms_ratelimit_config_check(c), KMS_ERR_VALIDATION);
    assert_int_equal(kms_ratelimit_new(c, &rl), KMS_ERR_VALIDATION);
    assert_null(rl);
    if (strstr(kms_err_message(), names) == NULL)
        fail_msg("message \"%s\" does not name \"%s\"", kms_err_message(), names);
}

static void test_config_check(void **state)
{
    struct kms_ratelimit_config c;
    struct kms_rate_override o[2];
    char alice[] = "alice", bad[] = "a b";
    (void)state;

    /* a rate without a burst would refuse everything */
    kms_ratelimit_config_defaults(&c);
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_global", "100"), KMS_OK);
    expect_check_error(&c, "burst_global");
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_global", "100"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_check(&c), KMS_OK);
    c.per_principal[KMS_CLASS_MANAGE].burst = 0;
    expect_check_error(&c, "burst_manage");
    c.per_principal[KMS_CLASS_MANAGE].rate = 0; /* unlimited: the burst does not matter */
    assert_int_equal(kms_ratelimit_config_check(&c), KMS_OK);
    /* an override that zeroes the burst it inherits a rate for */
    assert_int_equal(kms_ratelimit_config_set(&c, "burst_crypto.alice", "0"), KMS_OK);
    expect_check_error(&c, "burst_crypto.alice");
    assert_int_equal(kms_ratelimit_config_set(&c, "rate_crypto.alice", "0"), KMS_OK);
    assert_int_equal(kms_ratelimit_config_check(&c), KMS_OK);
    kms_ratelimit_config_free(&c);

    /* values set directly, without config_set */
    kms_ratelimit_config_defaults(&c);
    c.per_principal[KMS_CLASS_CRYPTO].rate = NAN;
    expect_check_error(&c, "rate_crypto");
    c.per_principal[KMS_CLASS_CRYPTO].rate = 1;
    c.per_principal[KMS_CLASS_CRYPTO].burst = -1; /* KMS_RATE_INHERIT only means it in overrides */
    expect_check_error(&c, "burst_crypto");
    c.per_principal[KMS_CLASS_CRYPTO].burst = INFINITY;
    expect_check_error(&c, "burst_crypto");
    c.per_principal[KMS_CLASS_CRYPTO].burst = 1;
    c.global.rate = 2e9;
    expect_check_error(&c, "rate_global");
    c.global.rate = 0;

    for (int i = 0; i < 2; i++) {
        o[i].principal = alice;
        for (int j = 0; j < KMS_CLASS_COUNT; j++)
            o[i].cls[j] = (struct kms_rate){KMS_RATE_INHERIT, KMS_RATE_INHERIT};
    }
    c.overrides = o;
    c.noverrides = 2;
    expect_check_error(&c, "alice");
    c.noverrides = 1;
    assert_int_equal(kms_ratelimit_config_check(&c), KMS_OK);
    o[0].cls[KMS_CLASS_MANAGE].rate = -2;
    expect_check_error(&c, "rate_manage.alice");
    o[0].cls[KMS_CLASS_MANAGE].rate = KMS_RATE_INHERIT;
    o[0].principal = bad;
    expect_check_error(&c, "a b");
    o[0].principal = NULL;
    expect_check_error(&c, "principal");
    c.overrides = NULL;
    expect_check_error(&c, "overrides");
    c.noverrides = KMS_RL_MAX_PRINCIPALS + 1;
    expect_check_error(&c, "4096");
    expect_check_error(NULL, "configuration");
}

/* ---- operation classes ------------------------------------------------------------ */

static void test_classify(void **state)
{
    static const struct {
        const char *op;
        enum kms_op_class cls;
        double cost;
    } want[] = {
        {"Encrypt", KMS_CLASS_CRYPTO, 1},
        {"Decrypt", KMS_CLASS_CRYPTO, 1},
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
        {"ListKeys", KMS_CLASS_MANAGE, 1},
        {"ListAliases", KMS_CLASS_MANAGE, 1},
        {"GetKeyRotationStatus", KMS_CLASS_MANAGE, 1},
        {"ListKeyRotations", KMS_CLASS_MANAGE, 1},
        {"EnableKey", KMS_CLASS_MANAGE, 5},
        {"DisableKey", KMS_CLASS_MANAGE, 5},
        {"EnableKeyRotation", KMS_CLASS_MANAGE, 5},
        {"DisableKeyRotation", KMS_CLASS_MANAGE, 5},
        {"ScheduleKeyDeletion", KMS_CLASS_MANAGE, 5},
        {"CancelKeyDeletion", KMS_CLASS_MANAGE, 5},
        {"CreateAlias", KMS_CLASS_MANAGE, 5},
        {"UpdateAlias", KMS_CLASS_MANAGE, 5},
        {"DeleteAlias", KMS_CLASS_MANAGE, 5},
        {"CreateKey", KMS_CLASS_MANAGE, 10},
        {"RotateKeyOnDemand", KMS_CLASS_MANAGE, 10},
        /* unknown targets never spend the crypto quota */
        {"encrypt", KMS_CLASS_MANAGE, 1},
        {"EncryptX", KMS_CLASS_MANAGE, 1},
        {"", KMS_CLASS_MANAGE, 1},
        {NULL, KMS_CLASS_MANAGE, 1},
    };
    (void)state;

    for (size_t i = 0; i < N_ELEMS(want); i++) {
        enum kms_op_class cls = KMS_CLASS_COUNT;
        double cost = -1;
        kms_ratelimit_classify(want[i].op, &cls, &cost);
        if (cls != want[i].cls || cost != want[i].cost)
            fail_msg("%s: class %d cost %g", want[i].op ? want[i].op : "(null)", (int)cls, cost);
    }
    kms_ratelimit_classify("Encrypt", NULL, NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_burst_then_refused_with_exact_retry),
        cmocka_unit_test(test_refill_after_exact_time),
        cmocka_unit_test(test_time_going_back_adds_nothing),
        cmocka_unit_test(test_weighted_cost_and_cost_above_burst),
        cmocka_unit_test(test_bad_arguments),
        cmocka_unit_test(test_principals_are_independent),
        cmocka_unit_test(test_classes_are_separate),
        cmocka_unit_test(test_global_throttles_across_principals),
        cmocka_unit_test(test_retry_is_for_the_scarcest_bucket),
        cmocka_unit_test(test_refusal_takes_nothing),
        cmocka_unit_test(test_rate_zero_is_unlimited),
        cmocka_unit_test(test_override_applies_to_named_principal_only),
        cmocka_unit_test(test_override_inherits_defaults_set_later),
        cmocka_unit_test(test_reconfigure_keeps_fill_clamped),
        cmocka_unit_test(test_reconfigure_pays_elapsed_time_at_old_rate),
        cmocka_unit_test(test_reconfigure_limits_and_overrides),
        cmocka_unit_test(test_table_cap),
        cmocka_unit_test(test_threads_one_principal),
        cmocka_unit_test(test_threads_global),
        cmocka_unit_test(test_config_is_key),
        cmocka_unit_test(test_config_set_parses),
        cmocka_unit_test(test_config_set_rejects),
        cmocka_unit_test(test_config_set_override_cap),
        cmocka_unit_test(test_config_check),
        cmocka_unit_test(test_classify),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
