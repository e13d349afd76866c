/*
 * Failed authentications per client address (addrlimit.h).
 *
 * The table is direct-mapped: one slot per keyed hash, each with its own
 * mutex. The blocked_until of a slot is also read without the lock by
 * kms_addrlimit_check: a stale read costs at most a lock taken for nothing
 * (the address is compared under the lock) or a request let through in the
 * nanoseconds around a block. Locks: one slot's mutex at a time, never held
 * while emitting.
 */
#include "config.h"

#include "server/addrlimit.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "server/pool.h"

#define SLOT_MASK (KMS_ADDRLIMIT_SLOTS - 1)
#define NS 1000000000LL

struct slot {
    pthread_mutex_t mu;
    _Atomic int64_t blocked_until; /* CLOCK_MONOTONIC ns; 0: not blocked */
    int used;
    struct kms_addr addr;
    double tokens;
    int64_t last_ns;
    int has_line;    /* line_ns holds the time of the address's last audit line */
    int64_t line_ns; /* its last audit line (its own or a summary) */
    uint64_t pending;
    char outcome[KMS_ADDRLIMIT_OUTCOME_MAX];
    int several; /* the overflow: failures of addresses without a slot of their own */
};

struct kms_addrlimit {
    struct kms_addrlimit_config cfg;
    uint64_t seed[2];
    struct slot *slots;
    struct slot overflow;
    pthread_mutex_t lines_mu; /* innermost: own lines this interval, over all addresses */
    int64_t lines_since;
    unsigned lines;
    kms_addrlimit_emit_fn emit;
    void *arg;
    pthread_t thread;
    int thread_ok;
    pthread_mutex_t stop_mu;
    pthread_cond_t stop_cv;
    int stop;
};

static const uint8_t v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

void kms_addr_from_sockaddr(const struct sockaddr *sa, struct kms_addr *out)
{
    memset(out, 0, sizeof *out);
    if (sa && sa->sa_family == AF_INET) {
        memcpy(out->b, v4_mapped, sizeof v4_mapped);
        memcpy(out->b + 12, &((const struct sockaddr_in *)sa)->sin_addr, 4);
    } else if (sa && sa->sa_family == AF_INET6) {
        const uint8_t *a = ((const struct sockaddr_in6 *)sa)->sin6_addr.s6_addr;
        memcpy(out->b, a, 16);
        if (memcmp(a, v4_mapped, sizeof v4_mapped) != 0)
            memset(out->b + 8, 0, 8); /* the /64 */
    }
}

void kms_addr_format(const struct kms_addr *a, char out[KMS_ADDR_TEXT_MAX])
{
    char text[INET6_ADDRSTRLEN];
    if (memcmp(a->b, v4_mapped, sizeof v4_mapped) == 0) {
        inet_ntop(AF_INET, a->b + 12, text, sizeof text);
        snprintf(out, KMS_ADDR_TEXT_MAX, "%s", text);
    } else {
        inet_ntop(AF_INET6, a->b, text, sizeof text);
        snprintf(out, KMS_ADDR_TEXT_MAX, "%s/64", text);
    }
}

static uint64_t mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

size_t kms_addrlimit_slot(const struct kms_addrlimit *al, const struct kms_addr *a)
{
    uint64_t w[2];
    memcpy(w, a->b, sizeof w);
    uint64_t h = mix64(w[0] ^ al->seed[0]);
    h = mix64(h ^ w[1] ^ al->seed[1]);
    return (size_t)(h & SLOT_MASK);
}

static struct slot *slot_of(struct kms_addrlimit *al, const struct kms_addr *a)
{
    return &al->slots[kms_addrlimit_slot(al, a)];
}

/* Takes out the slot's pending count as a summary; 0 when there is none. */
static int take_summary_locked(struct slot *s, int64_t now_ns, struct kms_addrlimit_summary *out)
{
    if (!s->used || s->pending == 0)
        return 0;
    if (s->several)
        snprintf(out->source, sizeof out->source, "%s", KMS_ADDRLIMIT_SEVERAL);
    else
        kms_addr_format(&s->addr, out->source);
    out->count = s->pending;
    memcpy(out->outcome, s->outcome, sizeof out->outcome);
    s->pending = 0;
    s->has_line = 1;
    s->line_ns = now_ns;
    return 1;
}

/* Nothing to keep: not blocked, nothing pending, the bucket full again. */
static int idle_locked(const struct kms_addrlimit *al, const struct slot *s, int64_t now_ns)
{
    if (!s->used)
        return 1;
    if (atomic_load_explicit(&s->blocked_until, memory_order_relaxed) > now_ns || s->pending)
        return 0;
    double tokens = s->tokens;
    if (now_ns > s->last_ns)
        tokens += al->cfg.rate * (double)(now_ns - s->last_ns) / (double)NS;
    return al->cfg.rate <= 0 || tokens >= al->cfg.burst;
}

/* The slot for a, taken over from an idle address when need be; 0: held by a busy other. */
static int claim_locked(struct kms_addrlimit *al, struct slot *s, const struct kms_addr *a,
                        int64_t now_ns)
{
    if (s->used && memcmp(&s->addr, a, sizeof *a) == 0)
        return 1;
    if (!idle_locked(al, s, now_ns))
        return 0;
    s->used = 1;
    s->addr = *a;
    s->tokens = al->cfg.burst;
    s->last_ns = now_ns;
    s->has_line = 0;
    s->pending = 0;
    s->outcome[0] = '\0';
    atomic_store_explicit(&s->blocked_until, 0, memory_order_relaxed);
    return 1;
}

/* One more own line this interval, over all addresses, if the cap allows it. */
static int line_allowed(struct kms_addrlimit *al, int64_t now_ns)
{
    int ok;
    pthread_mutex_lock(&al->lines_mu);
    if (now_ns - al->lines_since >= (int64_t)al->cfg.interval_s * NS) {
        al->lines_since = now_ns;
        al->lines = 0;
    }
    ok = al->lines < KMS_ADDRLIMIT_LINES;
    al->lines += (unsigned)ok;
    pthread_mutex_unlock(&al->lines_mu);
    return ok;
}

/* A failure counted in the overflow's summary (it blocks nobody). */
static void overflow_count(struct kms_addrlimit *al, const char *outcome)
{
    struct slot *o = &al->overflow;
    pthread_mutex_lock(&o->mu);
    o->pending++;
    snprintf(o->outcome, sizeof o->outcome, "%s", outcome);
    pthread_mutex_unlock(&o->mu);
}

/* Takes a token for a failure; none left: the address is blocked for the cool-down. */
static void spend_locked(struct kms_addrlimit *al, struct slot *s, int64_t now_ns)
{
    if (al->cfg.rate <= 0)
        return;
    if (now_ns > s->last_ns) {
        s->tokens += al->cfg.rate * (double)(now_ns - s->last_ns) / (double)NS;
        if (s->tokens > al->cfg.burst)
            s->tokens = al->cfg.burst;
        s->last_ns = now_ns;
    }
    if (s->tokens >= 1.0) {
        s->tokens -= 1.0;
        return;
    }
    /* The bucket refills from empty once the cool-down is over. */
    int64_t until = now_ns + (int64_t)al->cfg.cooldown_s * NS;
    s->tokens = 0;
    s->last_ns = until;
    atomic_store_explicit(&s->blocked_until, until, memory_order_relaxed);
}

unsigned kms_addrlimit_check(struct kms_addrlimit *al, const struct kms_addr *a, int64_t now_ns)
{
    if (!al)
        return 0;
    struct slot *s = slot_of(al, a);
    if (atomic_load_explicit(&s->blocked_until, memory_order_relaxed) <= now_ns)
        return 0;
    unsigned retry = 0;
    pthread_mutex_lock(&s->mu);
    int64_t until = atomic_load_explicit(&s->blocked_until, memory_order_relaxed);
    if (s->used && memcmp(&s->addr, a, sizeof *a) == 0 && until > now_ns) {
        retry = (unsigned)((until - now_ns + NS - 1) / NS);
        s->pending++;
        if (!s->outcome[0])
            snprintf(s->outcome, sizeof s->outcome, "%s", "ThrottlingException");
    }
    pthread_mutex_unlock(&s->mu);
    return retry;
}

int kms_addrlimit_fail(struct kms_addrlimit *al, const struct kms_addr *a, const char *outcome,
                       int64_t now_ns)
{
    int own = 1, several = 0;
    if (!al)
        return 1;
    struct slot *s = slot_of(al, a);
    pthread_mutex_lock(&s->mu);
    if (!claim_locked(al, s, a, now_ns)) {
        several = al->cfg.interval_s > 0;
        own = !several;
    } else {
        spend_locked(al, s, now_ns);
        if (al->cfg.interval_s > 0 &&
            (s->pending > 0 ||
             (s->has_line && now_ns - s->line_ns < (int64_t)al->cfg.interval_s * NS))) {
            own = 0;
            s->pending++;
            snprintf(s->outcome, sizeof s->outcome, "%s", outcome);
        } else if (al->cfg.interval_s > 0 && !line_allowed(al, now_ns)) {
            own = 0;
            several = 1;
        } else {
            s->has_line = 1;
            s->line_ns = now_ns;
        }
    }
    pthread_mutex_unlock(&s->mu);
    if (several)
        overflow_count(al, outcome);
    return own;
}

void kms_addrlimit_sweep(struct kms_addrlimit *al, int64_t now_ns)
{
    int64_t interval = (int64_t)al->cfg.interval_s * NS;
    for (size_t i = 0; i <= KMS_ADDRLIMIT_SLOTS; i++) {
        struct slot *s = i < KMS_ADDRLIMIT_SLOTS ? &al->slots[i] : &al->overflow;
        struct kms_addrlimit_summary sum;
        int emit = 0;
        pthread_mutex_lock(&s->mu);
        if (s->pending > 0 && (!s->has_line || now_ns - s->line_ns >= interval))
            emit = take_summary_locked(s, now_ns, &sum);
        pthread_mutex_unlock(&s->mu);
        if (emit && al->emit)
            al->emit(al->arg, &sum);
    }
}

static void *sweeper(void *arg)
{
    struct kms_addrlimit *al = arg;
    pthread_mutex_lock(&al->stop_mu);
    while (!al->stop) {
        struct timespec until = kms_realtime_after_ms(al->cfg.sweep_ms);
        pthread_cond_timedwait(&al->stop_cv, &al->stop_mu, &until);
        if (al->stop)
            break;
        pthread_mutex_unlock(&al->stop_mu);
        kms_addrlimit_sweep(al, kms_monotonic_ns());
        pthread_mutex_lock(&al->stop_mu);
    }
    pthread_mutex_unlock(&al->stop_mu);
    return NULL;
}

kms_err kms_addrlimit_new(const struct kms_addrlimit_config *cfg, kms_addrlimit_emit_fn emit,
                          void *arg, struct kms_addrlimit **out)
{
    *out = NULL;
    if (cfg->rate <= 0 && cfg->interval_s == 0)
        return KMS_OK;
    struct kms_addrlimit *al = calloc(1, sizeof *al);
    KMS_ENSURE(al != NULL, KMS_ERR_INTERNAL, "out of memory");
    al->slots = calloc(KMS_ADDRLIMIT_SLOTS, sizeof *al->slots);
    if (!al->slots || RAND_bytes((unsigned char *)al->seed, sizeof al->seed) != 1) {
        free(al->slots);
        free(al);
        return KMS_FAIL(KMS_ERR_INTERNAL, "cannot make the address table");
    }
    al->cfg = *cfg;
    al->emit = emit;
    al->arg = arg;
    for (size_t i = 0; i < KMS_ADDRLIMIT_SLOTS; i++)
        pthread_mutex_init(&al->slots[i].mu, NULL);
    pthread_mutex_init(&al->overflow.mu, NULL);
    al->overflow.used = 1;
    al->overflow.several = 1;
    pthread_mutex_init(&al->lines_mu, NULL);
    al->lines_since = INT64_MIN / 2; /* the first line starts an interval */
    pthread_mutex_init(&al->stop_mu, NULL);
    pthread_cond_init(&al->stop_cv, NULL);
    if (emit && cfg->sweep_ms) {
        if (pthread_create(&al->thread, NULL, sweeper, al) != 0) {
            kms_addrlimit_free(al);
            return KMS_FAIL(KMS_ERR_INTERNAL, "cannot start the address table's thread");
        }
        al->thread_ok = 1;
    }
    *out = al;
    return KMS_OK;
}

void kms_addrlimit_free(struct kms_addrlimit *al)
{
    if (!al)
        return;
    if (al->thread_ok) {
        pthread_mutex_lock(&al->stop_mu);
        al->stop = 1;
        pthread_cond_signal(&al->stop_cv);
        pthread_mutex_unlock(&al->stop_mu);
        pthread_join(al->thread, NULL);
    }
    /* Whatever is pending goes out now, interval or not. */
    for (size_t i = 0; i <= KMS_ADDRLIMIT_SLOTS; i++) {
        struct slot *s = i < KMS_ADDRLIMIT_SLOTS ? &al->slots[i] : &al->overflow;
        struct kms_addrlimit_summary sum;
        if (take_summary_locked(s, kms_monotonic_ns(), &sum) && al->emit)
            al->emit(al->arg, &sum);
        pthread_mutex_destroy(&s->mu);
    }
    pthread_mutex_destroy(&al->lines_mu);
    pthread_mutex_destroy(&al->stop_mu);
    pthread_cond_destroy(&al->stop_cv);
    free(al->slots);
    free(al);
}
