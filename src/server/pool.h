/*
 * The worker pool that runs requests which touch the token, so that a token
 * that hangs costs the workers stuck in it and never the HTTP threads: every
 * request gets an answer by its deadline, and requests past what the pool
 * can queue are refused at once.
 *
 * A task is answered exactly once, by one of:
 *   - a worker, after run() returned in time: answer(t, 0);
 *   - the watchdog, when the deadline passed first (queued or running):
 *     answer(t, 1), while run() may still be going on another thread;
 *   - kms_pool_submit's caller, when the pool refused it (no answer call).
 * After answer, release(t) is called exactly once, when the pool no longer
 * touches t (for a task that expired while running: once run() returned).
 */
#ifndef P11KMS_POOL_H
#define P11KMS_POOL_H

#include <stdint.h>
#include <time.h>

#include "common/error.h"

struct kms_task {
    void (*run)(struct kms_task *t);
    void (*answer)(struct kms_task *t, int expired);
    void (*release)(struct kms_task *t);
    int64_t deadline_ns; /* CLOCK_MONOTONIC */
    /* the pool's */
    struct kms_task *next;
    int state;
    int64_t run_started_ns; /* when a worker began run() */
};

struct kms_pool_config {
    unsigned workers;    /* threads running tasks */
    unsigned queue_max;  /* tasks waiting for a worker, beyond which submit refuses */
    unsigned inline_max; /* callers that may run their work themselves at once (0: none) */
    unsigned stall_ms;   /* a call taking longer says the token is slow */
};

struct kms_pool;

KMS_MUST_CHECK kms_err kms_pool_start(const struct kms_pool_config *cfg, struct kms_pool **out);
/*
 * Queues t. KMS_ERR_DEPENDENCY_TIMEOUT when the queue is full: then nothing
 * of t is called.
 */
KMS_MUST_CHECK kms_err kms_pool_submit(struct kms_pool *p, struct kms_task *t);
/*
 * Work run by its caller instead of a worker: no thread hand-off, but no
 * answer by the deadline either if the token hangs. So a caller may only
 * while the token is prompt: kms_pool_inline_begin gives one of inline_max
 * slots (1) unless all are taken, or a call (inline or on a worker) took
 * longer than stall_ms within the last second, or one running inline has
 * for that long now (the watchdog looks every 10 ms); else 0, and the caller
 * submits a task as usual. kms_pool_inline_end gives the slot back.
 */
KMS_MUST_CHECK int kms_pool_inline_begin(struct kms_pool *p, unsigned *slot);
void kms_pool_inline_end(struct kms_pool *p, unsigned slot);
/* Inline calls running now; 1 while the token counts as slow. */
unsigned kms_pool_inline_running(struct kms_pool *p);
int kms_pool_token_slow(struct kms_pool *p);

/* Tasks waiting and running now. */
void kms_pool_load(struct kms_pool *p, unsigned *queued, unsigned *running);
/*
 * Answers every task not answered yet as expired (answer(t, 1)), at once:
 * for a shutdown that cannot wait for them any longer.
 */
void kms_pool_expire_all(struct kms_pool *p);
/* Waits up to timeout_ms until no task is queued or running; 1 when none is. */
int kms_pool_wait_idle(struct kms_pool *p, unsigned timeout_ms);
/* Stops the threads. Workers still stuck in a task (see drain) are left behind. */
void kms_pool_free(struct kms_pool *p);

int64_t kms_monotonic_ns(void);
/* CLOCK_REALTIME ms from now: the deadline pthread_cond_timedwait takes. */
struct timespec kms_realtime_after_ms(unsigned ms);

#endif
