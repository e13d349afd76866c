#include "config.h"

#include "server/pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#include "common/log.h"

#define WATCH_MS 10
/* How long the token counts as slow after its last slow call. */
#define SLOW_NS 1000000000LL

enum {
    QUEUED = 1,
    RUNNING,  /* a worker is in run() */
    DONE,     /* run() returned in time: its worker answers */
    EXPIRING, /* the watchdog is answering it */
    EXPIRED,  /* answered by the watchdog */
};

struct kms_pool {
    pthread_mutex_t lock;
    pthread_cond_t work;    /* a task was queued, or stopping */
    pthread_cond_t changed; /* a task was released or answered by the watchdog */
    pthread_cond_t stop_watch;
    struct kms_task *head, *tail;
    unsigned queued, queue_max;
    unsigned inflight;         /* submitted and not yet released */
    struct kms_task **running; /* per worker */
    pthread_t *threads;
    unsigned nworkers, started;
    pthread_t watchdog;
    int watching;
    int stopping;
    /* Inline calls: each slot holds its call's start (CLOCK_MONOTONIC ns), 0 when free. */
    _Atomic int64_t *inline_started;
    unsigned inline_max;
    int64_t stall_ns;
    _Atomic int64_t slow_until; /* no inline call before this */
};

struct worker_arg {
    struct kms_pool *p;
    unsigned index;
};

struct timespec kms_realtime_after_ms(unsigned ms)
{
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    t.tv_sec += ms / 1000;
    t.tv_nsec += (long)(ms % 1000) * 1000000L;
    if (t.tv_nsec >= 1000000000L) {
        t.tv_sec++;
        t.tv_nsec -= 1000000000L;
    }
    return t;
}

int64_t kms_monotonic_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void slow_now(struct kms_pool *p, int64_t now)
{
    atomic_store_explicit(&p->slow_until, now + SLOW_NS, memory_order_relaxed);
}

static void released(struct kms_pool *p)
{
    pthread_mutex_lock(&p->lock);
    p->inflight--;
    pthread_cond_broadcast(&p->changed);
    pthread_mutex_unlock(&p->lock);
}

static void *worker(void *arg)
{
    struct worker_arg *wa = arg;
    struct kms_pool *p = wa->p;
    unsigned me = wa->index;
    free(wa);

    pthread_mutex_lock(&p->lock);
    for (;;) {
        while (!p->head && !p->stopping)
            pthread_cond_wait(&p->work, &p->lock);
        if (!p->head)
            break;
        struct kms_task *t = p->head;
        p->head = t->next;
        if (!p->head)
            p->tail = NULL;
        p->queued--;
        if (t->deadline_ns <= kms_monotonic_ns()) {
            /* Waited past its deadline: answer that without running it. */
            t->state = EXPIRED;
            pthread_mutex_unlock(&p->lock);
            t->answer(t, 1);
            t->release(t);
            pthread_mutex_lock(&p->lock);
            p->inflight--;
            pthread_cond_broadcast(&p->changed);
            continue;
        }
        t->state = RUNNING;
        t->run_started_ns = kms_monotonic_ns();
        p->running[me] = t;
        pthread_mutex_unlock(&p->lock);

        t->run(t);
        int64_t ended = kms_monotonic_ns();
        if (ended - t->run_started_ns > p->stall_ns)
            slow_now(p, ended);

        pthread_mutex_lock(&p->lock);
        p->running[me] = NULL;
        while (t->state == EXPIRING)
            pthread_cond_wait(&p->changed, &p->lock);
        int answer = t->state == RUNNING;
        if (answer)
            t->state = DONE;
        pthread_mutex_unlock(&p->lock);
        if (answer)
            t->answer(t, 0);
        t->release(t);
        pthread_mutex_lock(&p->lock);
        p->inflight--;
        pthread_cond_broadcast(&p->changed);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

/* Answers every task past its deadline, queued or running. */
static void expire(struct kms_pool *p)
{
    int64_t now = kms_monotonic_ns();
    struct kms_task *dead = NULL, *late = NULL;

    for (unsigned i = 0; i < p->inline_max; i++) {
        int64_t began = atomic_load_explicit(&p->inline_started[i], memory_order_relaxed);
        if (began && now - began > p->stall_ns)
            slow_now(p, now);
    }
    pthread_mutex_lock(&p->lock);
    for (unsigned i = 0; i < p->nworkers; i++) {
        struct kms_task *t = p->running[i];
        if (t && t->state == RUNNING && now - t->run_started_ns > p->stall_ns)
            slow_now(p, now);
        if (t && t->state == RUNNING && t->deadline_ns <= now) {
            t->state = EXPIRING;
            t->next = late;
            late = t;
        }
    }
    for (struct kms_task **link = &p->head, *prev = NULL; *link;) {
        struct kms_task *t = *link;
        if (t->deadline_ns <= now) {
            *link = t->next;
            if (p->tail == t)
                p->tail = prev;
            p->queued--;
            t->state = EXPIRED;
            t->next = dead;
            dead = t;
        } else {
            prev = t;
            link = &t->next;
        }
    }
    pthread_mutex_unlock(&p->lock);

    while (dead) {
        struct kms_task *t = dead;
        dead = t->next;
        t->answer(t, 1);
        t->release(t);
        released(p);
    }
    while (late) {
        struct kms_task *t = late;
        late = t->next;
        t->answer(t, 1);
        /* Its worker releases it once run() returns. */
        pthread_mutex_lock(&p->lock);
        t->state = EXPIRED;
        pthread_cond_broadcast(&p->changed);
        pthread_mutex_unlock(&p->lock);
    }
}

static void *watch(void *arg)
{
    struct kms_pool *p = arg;
    pthread_mutex_lock(&p->lock);
    while (p->watching) {
        struct timespec until = kms_realtime_after_ms(WATCH_MS);
        pthread_cond_timedwait(&p->stop_watch, &p->lock, &until);
        if (!p->watching)
            break;
        pthread_mutex_unlock(&p->lock);
        expire(p);
        pthread_mutex_lock(&p->lock);
    }
    pthread_mutex_unlock(&p->lock);
    return NULL;
}

kms_err kms_pool_start(const struct kms_pool_config *cfg, struct kms_pool **out)
{
    struct kms_pool *p = calloc(1, sizeof *p);
    KMS_ENSURE(p != NULL, KMS_ERR_INTERNAL, "out of memory");
    pthread_mutex_init(&p->lock, NULL);
    pthread_cond_init(&p->work, NULL);
    pthread_cond_init(&p->changed, NULL);
    pthread_cond_init(&p->stop_watch, NULL);
    p->nworkers = cfg->workers ? cfg->workers : 1;
    p->queue_max = cfg->queue_max;
    p->running = calloc(p->nworkers, sizeof *p->running);
    p->threads = calloc(p->nworkers, sizeof *p->threads);
    p->inline_max = cfg->inline_max;
    p->stall_ns = (int64_t)(cfg->stall_ms ? cfg->stall_ms : 1) * 1000000;
    p->inline_started = calloc(p->inline_max ? p->inline_max : 1, sizeof *p->inline_started);
    if (!p->running || !p->threads || !p->inline_started) {
        kms_pool_free(p);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    for (; p->started < p->nworkers; p->started++) {
        struct worker_arg *wa = malloc(sizeof *wa);
        if (!wa) {
            kms_pool_free(p);
            return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        }
        *wa = (struct worker_arg){p, p->started};
        if (pthread_create(&p->threads[p->started], NULL, worker, wa) != 0) {
            free(wa);
            kms_pool_free(p);
            return KMS_FAIL(KMS_ERR_INTERNAL, "cannot start a worker thread");
        }
    }
    p->watching = 1;
    if (pthread_create(&p->watchdog, NULL, watch, p) != 0) {
        p->watching = 0;
        kms_pool_free(p);
        return KMS_FAIL(KMS_ERR_INTERNAL, "cannot start the watchdog thread");
    }
    *out = p;
    return KMS_OK;
}

kms_err kms_pool_submit(struct kms_pool *p, struct kms_task *t)
{
    pthread_mutex_lock(&p->lock);
    if (p->stopping || p->queued >= p->queue_max) {
        int stopping = p->stopping;
        pthread_mutex_unlock(&p->lock);
        return KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT, "%s",
                        stopping ? "The server is shutting down"
                                 : "The server is overloaded: too many requests are waiting for "
                                   "the key store");
    }
    t->state = QUEUED;
    t->next = NULL;
    if (p->tail)
        p->tail->next = t;
    else
        p->head = t;
    p->tail = t;
    p->queued++;
    p->inflight++;
    pthread_cond_signal(&p->work);
    pthread_mutex_unlock(&p->lock);
    return KMS_OK;
}

int kms_pool_inline_begin(struct kms_pool *p, unsigned *slot)
{
    if (p->inline_max == 0)
        return 0;
    int64_t now = kms_monotonic_ns();
    if (now < atomic_load_explicit(&p->slow_until, memory_order_relaxed))
        return 0;
    for (unsigned i = 0; i < p->inline_max; i++) {
        int64_t free_slot = 0;
        if (atomic_compare_exchange_strong(&p->inline_started[i], &free_slot, now)) {
            *slot = i;
            return 1;
        }
    }
    return 0;
}

void kms_pool_inline_end(struct kms_pool *p, unsigned slot)
{
    int64_t now = kms_monotonic_ns();
    int64_t began = atomic_exchange(&p->inline_started[slot], 0);
    if (now - began > p->stall_ns)
        slow_now(p, now);
}

unsigned kms_pool_inline_running(struct kms_pool *p)
{
    unsigned n = 0;
    for (unsigned i = 0; i < p->inline_max; i++)
        n += atomic_load_explicit(&p->inline_started[i], memory_order_relaxed) != 0;
    return n;
}

int kms_pool_token_slow(struct kms_pool *p)
{
    return kms_monotonic_ns() < atomic_load_explicit(&p->slow_until, memory_order_relaxed);
}

void kms_pool_load(struct kms_pool *p, unsigned *queued, unsigned *running)
{
    pthread_mutex_lock(&p->lock);
    *queued = p->queued;
    /* Tasks in run() now (stuck ones too); not those answered and being released. */
    *running = 0;
    for (unsigned i = 0; i < p->nworkers; i++)
        *running += p->running[i] != NULL;
    pthread_mutex_unlock(&p->lock);
}

void kms_pool_expire_all(struct kms_pool *p)
{
    pthread_mutex_lock(&p->lock);
    for (unsigned i = 0; i < p->nworkers; i++)
        if (p->running[i])
            p->running[i]->deadline_ns = 0;
    for (struct kms_task *t = p->head; t; t = t->next)
        t->deadline_ns = 0;
    pthread_mutex_unlock(&p->lock);
    expire(p);
}

int kms_pool_wait_idle(struct kms_pool *p, unsigned timeout_ms)
{
    int64_t end = kms_monotonic_ns() + (int64_t)timeout_ms * 1000000;
    pthread_mutex_lock(&p->lock);
    while (p->inflight > 0 && kms_monotonic_ns() < end) {
        struct timespec until = kms_realtime_after_ms(WATCH_MS);
        pthread_cond_timedwait(&p->changed, &p->lock, &until);
    }
    int idle = p->inflight == 0;
    pthread_mutex_unlock(&p->lock);
    return idle;
}

void kms_pool_free(struct kms_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    p->stopping = 1;
    int stuck = p->inflight > p->queued;
    pthread_cond_broadcast(&p->work);
    if (p->watching) {
        p->watching = 0;
        pthread_cond_broadcast(&p->stop_watch);
        pthread_mutex_unlock(&p->lock);
        pthread_join(p->watchdog, NULL);
    } else {
        pthread_mutex_unlock(&p->lock);
    }
    if (stuck) {
        /* A worker is still in a task (a hung token): leave the threads, and the pool. */
        kms_warn("stopping with %s still running in a token call", "a request");
        for (unsigned i = 0; i < p->started; i++)
            pthread_detach(p->threads[i]);
        return;
    }
    for (unsigned i = 0; i < p->started; i++)
        pthread_join(p->threads[i], NULL);
    free(p->running);
    free(p->threads);
    free(p->inline_started);
    pthread_cond_destroy(&p->work);
    pthread_cond_destroy(&p->changed);
    pthread_cond_destroy(&p->stop_watch);
    pthread_mutex_destroy(&p->lock);
    free(p);
}
