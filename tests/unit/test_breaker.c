/*
 * Unit tests for src/server/breaker.h, with the clock passed in: a breaker
 * opens at exactly the configured failure, only within the window, stays open
 * for the cool-down and counts afresh after it; principals and keys are
 * counted apart; off when failures is 0; the table is bounded.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <string.h>

#include "server/breaker.h"

#define S INT64_C(1000000000)
#define P KMS_BREAKER_PRINCIPAL
#define K KMS_BREAKER_KEY

static struct kms_breaker *make(unsigned failures, unsigned window_s, unsigned cooldown_s)
{
    struct kms_breaker_config cfg = {failures, window_s, cooldown_s};
    struct kms_breaker *b = NULL;
    assert_int_equal(kms_breaker_new(&cfg, &b), KMS_OK);
    assert_non_null(b);
    return b;
}

static void test_opens_at_exactly_the_threshold(void **state)
{
    struct kms_breaker *b = make(5, 10, 2);
    int64_t t = 1000 * S, until = 0;
    (void)state;

    for (int i = 1; i < 5; i++) {
        assert_int_equal(kms_breaker_fail(b, P, "alice", t + i, &until), 0);
        assert_int_equal(kms_breaker_is_open(b, P, "alice", t + i, NULL), 0);
    }
    assert_int_equal(kms_breaker_open_count(b, P, t + 5), 0);
    assert_int_equal(kms_breaker_fail(b, P, "alice", t + 5, &until), 1);
    assert_true(until == t + 5 + 2 * S);
    int64_t left = 0;
    assert_int_equal(kms_breaker_is_open(b, P, "alice", t + 6, &left), 1);
    assert_true(left == until);
    assert_int_equal(kms_breaker_is_open(b, P, "bob", t + 6, NULL), 0);
    assert_int_equal(kms_breaker_is_open(b, K, "alice", t + 6, NULL), 0);
    assert_int_equal(kms_breaker_open_count(b, P, t + 6), 1);
    assert_int_equal(kms_breaker_open_count(b, K, t + 6), 0);
    /* failures while open are not counted and do not reopen it */
    for (int i = 0; i < 10; i++)
        assert_int_equal(kms_breaker_fail(b, P, "alice", t + 10 + i, NULL), 0);
    /* closed at until, not before */
    assert_int_equal(kms_breaker_is_open(b, P, "alice", until - 1, NULL), 1);
    assert_int_equal(kms_breaker_is_open(b, P, "alice", until, NULL), 0);
    assert_int_equal(kms_breaker_open_count(b, P, until), 0);
    /* and counts afresh */
    for (int i = 1; i < 5; i++)
        assert_int_equal(kms_breaker_fail(b, P, "alice", until + i, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, P, "alice", until + 5, NULL), 1);
    kms_breaker_free(b);
}

static void test_window(void **state)
{
    struct kms_breaker *b = make(3, 10, 60);
    int64_t t = 5 * S;
    (void)state;

    /* two failures, then the window ends: the third starts a new one */
    assert_int_equal(kms_breaker_fail(b, P, "alice", t, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, P, "alice", t + 9 * S, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, P, "alice", t + 10 * S, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, P, "alice", t + 11 * S, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, P, "alice", t + 19 * S, NULL), 1);
    kms_breaker_free(b);
}

static void test_kinds_and_names_apart(void **state)
{
    struct kms_breaker *b = make(2, 10, 60);
    const char *arn = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";
    (void)state;

    assert_int_equal(kms_breaker_fail(b, P, "alice", S, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, P, "bob", S, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, K, arn, S, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, K, arn, S, NULL), 1);
    assert_int_equal(kms_breaker_is_open(b, K, arn, S + 1, NULL), 1);
    assert_int_equal(kms_breaker_is_open(b, P, "alice", S + 1, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, P, "bob", S, NULL), 1);
    assert_int_equal(kms_breaker_is_open(b, P, "alice", S + 1, NULL), 0);
    assert_int_equal(kms_breaker_open_count(b, P, S + 1), 1);
    assert_int_equal(kms_breaker_open_count(b, K, S + 1), 1);
    kms_breaker_free(b);
}

static void test_off_and_bad_arguments(void **state)
{
    struct kms_breaker *b = make(0, 10, 60);
    char longname[KMS_BREAKER_NAME_MAX + 2];
    (void)state;

    for (int i = 0; i < 1000; i++)
        assert_int_equal(kms_breaker_fail(b, P, "alice", S + i, NULL), 0);
    assert_int_equal(kms_breaker_is_open(b, P, "alice", S + 1000, NULL), 0);
    kms_breaker_free(b);

    b = make(1, 10, 60);
    memset(longname, 'x', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    assert_int_equal(kms_breaker_fail(b, P, longname, S, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, P, "", S, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, P, NULL, S, NULL), 0);
    assert_int_equal(kms_breaker_fail(b, KMS_BREAKER_KINDS, "alice", S, NULL), 0);
    assert_int_equal(kms_breaker_is_open(NULL, P, "alice", S, NULL), 0);
    assert_int_equal(kms_breaker_fail(NULL, P, "alice", S, NULL), 0);
    kms_breaker_free(b);
    kms_breaker_free(NULL);
}

/* More names than slots fail at once: the table does not grow, and the names it holds work. */
static void test_bounded(void **state)
{
    struct kms_breaker *b = make(1, 10, 60);
    char name[32];
    size_t opened = 0;
    (void)state;

    for (size_t i = 0; i < 3 * KMS_BREAKER_SLOTS; i++) {
        snprintf(name, sizeof name, "p%zu", i);
        opened += (size_t)kms_breaker_fail(b, P, name, S, NULL);
    }
    assert_true(opened > KMS_BREAKER_SLOTS / 2);
    assert_true(opened <= KMS_BREAKER_SLOTS);
    assert_int_equal(kms_breaker_open_count(b, P, S), opened);
    /* once they closed and their windows ended, their slots serve new names */
    int64_t later = S + 61 * S;
    assert_int_equal(kms_breaker_open_count(b, P, later), 0);
    assert_int_equal(kms_breaker_fail(b, P, "newcomer", later, NULL), 1);
    kms_breaker_free(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_opens_at_exactly_the_threshold),
        cmocka_unit_test(test_window),
        cmocka_unit_test(test_kinds_and_names_apart),
        cmocka_unit_test(test_off_and_bad_arguments),
        cmocka_unit_test(test_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
