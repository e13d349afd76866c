/*
 * Unit tests for src/server/pool.h: tasks answered by a worker or, past
 * their deadline, by the watchdog; and the inline gate: at most inline_max
 * callers at once, none while a call (inline or on a worker) is slower than
 * stall_ms, and again a second after the token is prompt.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "server/pool.h"

#define STALL_MS 50

static void sleep_ms(unsigned ms)
{
    struct timespec t = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) != 0)
        ;
}

struct probe {
    struct kms_task task;
    unsigned run_ms;
    atomic_int ran, answered, expired, released;
};

static void probe_run(struct kms_task *t)
{
    struct probe *p = (struct probe *)t;
    sleep_ms(p->run_ms);
    p->ran = 1;
}

static void probe_answer(struct kms_task *t, int expired)
{
    struct probe *p = (struct probe *)t;
    p->expired = expired;
    p->answered++;
}

static void probe_release(struct kms_task *t)
{
    ((struct probe *)t)->released = 1;
}

static void probe_init(struct probe *p, unsigned run_ms, unsigned deadline_ms)
{
    memset(p, 0, sizeof *p);
    p->run_ms = run_ms;
    p->task.run = probe_run;
    p->task.answer = probe_answer;
    p->task.release = probe_release;
    p->task.deadline_ns = kms_monotonic_ns() + (int64_t)deadline_ms * 1000000;
}

static struct kms_pool *start(unsigned inline_max)
{
    struct kms_pool_config cfg = {2, 8, inline_max, STALL_MS};
    struct kms_pool *p = NULL;
    assert_int_equal(kms_pool_start(&cfg, &p), KMS_OK);
    assert_non_null(p);
    return p;
}

static void wait_released(struct probe *t)
{
    for (int i = 0; i < 500 && !t->released; i++)
        sleep_ms(10);
    assert_true(t->released);
}

static void test_task_answered_by_worker(void **state)
{
    (void)state;
    struct kms_pool *p = start(1);
    struct probe t;
    probe_init(&t, 1, 5000);
    assert_int_equal(kms_pool_submit(p, &t.task), KMS_OK);
    wait_released(&t);
    assert_int_equal(t.ran, 1);
    assert_int_equal(t.answered, 1);
    assert_int_equal(t.expired, 0);
    kms_pool_free(p);
}

static void test_slots_are_bounded(void **state)
{
    (void)state;
    struct kms_pool *p = start(2);
    unsigned a = 9, b = 9, c = 9;
    assert_int_equal(kms_pool_inline_begin(p, &a), 1);
    assert_int_equal(kms_pool_inline_begin(p, &b), 1);
    assert_int_not_equal(a, b);
    assert_int_equal(kms_pool_inline_running(p), 2);
    assert_int_equal(kms_pool_inline_begin(p, &c), 0); /* both taken: to a worker */
    kms_pool_inline_end(p, a);
    assert_int_equal(kms_pool_inline_running(p), 1);
    assert_int_equal(kms_pool_inline_begin(p, &c), 1);
    assert_int_equal(c, a);
    kms_pool_inline_end(p, b);
    kms_pool_inline_end(p, c);
    assert_int_equal(kms_pool_inline_running(p), 0);
    assert_int_equal(kms_pool_token_slow(p), 0);
    kms_pool_free(p);
}

static void test_no_slots_when_inline_max_is_zero(void **state)
{
    (void)state;
    struct kms_pool *p = start(0);
    unsigned s;
    assert_int_equal(kms_pool_inline_begin(p, &s), 0);
    assert_int_equal(kms_pool_inline_running(p), 0);
    kms_pool_free(p);
}

/* An inline call stuck past stall_ms: the watchdog sees it while it still runs. */
static void test_stuck_inline_call_closes_the_gate(void **state)
{
    (void)state;
    struct kms_pool *p = start(2);
    unsigned stuck, other;
    assert_int_equal(kms_pool_inline_begin(p, &stuck), 1);
    sleep_ms(STALL_MS + 40); /* the watchdog looks every 10 ms */
    assert_int_equal(kms_pool_token_slow(p), 1);
    assert_int_equal(kms_pool_inline_begin(p, &other),
                     0); /* a slot is free, but the token is slow */
    kms_pool_inline_end(p, stuck);
    assert_int_equal(kms_pool_inline_begin(p, &other), 0); /* for a second after */
    sleep_ms(1100);
    assert_int_equal(kms_pool_token_slow(p), 0);
    assert_int_equal(kms_pool_inline_begin(p, &other), 1);
    kms_pool_inline_end(p, other);
    kms_pool_free(p);
}

/* A worker's call slower than stall_ms says the same of the token. */
static void test_slow_worker_call_closes_the_gate(void **state)
{
    (void)state;
    struct kms_pool *p = start(2);
    struct probe t;
    probe_init(&t, STALL_MS + 30, 5000);
    assert_int_equal(kms_pool_submit(p, &t.task), KMS_OK);
    wait_released(&t);
    assert_int_equal(t.expired, 0);
    assert_int_equal(kms_pool_token_slow(p), 1);
    unsigned s;
    assert_int_equal(kms_pool_inline_begin(p, &s), 0);
    kms_pool_free(p);
}

/* A prompt call, inline or on a worker, leaves the gate open. */
static void test_prompt_calls_keep_it_open(void **state)
{
    (void)state;
    struct kms_pool *p = start(1);
    struct probe t;
    probe_init(&t, 1, 5000);
    assert_int_equal(kms_pool_submit(p, &t.task), KMS_OK);
    wait_released(&t);
    unsigned s;
    for (int i = 0; i < 100; i++) {
        assert_int_equal(kms_pool_inline_begin(p, &s), 1);
        kms_pool_inline_end(p, s);
    }
    assert_int_equal(kms_pool_token_slow(p), 0);
    kms_pool_free(p);
}

/* A task past its deadline is answered by the watchdog while it still runs. */
static void test_deadline_answered_by_watchdog(void **state)
{
    (void)state;
    struct kms_pool *p = start(1);
    struct probe t;
    probe_init(&t, 300, 40);
    assert_int_equal(kms_pool_submit(p, &t.task), KMS_OK);
    sleep_ms(150);
    assert_int_equal(t.answered, 1);
    assert_int_equal(t.expired, 1);
    assert_int_equal(t.ran, 0);
    wait_released(&t);
    assert_int_equal(t.ran, 1);
    assert_int_equal(t.answered, 1); /* once */
    kms_pool_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_task_answered_by_worker),
        cmocka_unit_test(test_slots_are_bounded),
        cmocka_unit_test(test_no_slots_when_inline_max_is_zero),
        cmocka_unit_test(test_stuck_inline_call_closes_the_gate),
        cmocka_unit_test(test_slow_worker_call_closes_the_gate),
        cmocka_unit_test(test_prompt_calls_keep_it_open),
        cmocka_unit_test(test_deadline_answered_by_watchdog),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
