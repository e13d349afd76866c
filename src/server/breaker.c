/*
 * Per principal and per key failure counts (breaker.h). One mutex guards the
 * tables: it is taken for a failure (rare, and already an expensive answer)
 * and, on the request path, only while some breaker of the kind is open:
 * latest[kind] holds the latest time any of them closes, read without a lock.
 */
#include "config.h"

#include "server/breaker.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#define PROBE 16
#define NS_PER_S INT64_C(1000000000)

struct entry {
    char name[KMS_BREAKER_NAME_MAX + 1]; /* "" when free */
    int64_t window_start_ns;
    unsigned count;
    int64_t open_until_ns; /* 0 when never opened */
};

struct kms_breaker {
    struct kms_breaker_config cfg;
    pthread_mutex_t mu;
    struct entry *slots[KMS_BREAKER_KINDS]; /* KMS_BREAKER_SLOTS each */
    _Atomic int64_t latest[KMS_BREAKER_KINDS];
};

kms_err kms_breaker_new(const struct kms_breaker_config *cfg, struct kms_breaker **out)
{
    struct kms_breaker *b = calloc(1, sizeof *b);
    KMS_ENSURE(b != NULL, KMS_ERR_INTERNAL, "out of memory");
    b->cfg = *cfg;
    for (int k = 0; k < KMS_BREAKER_KINDS; k++) {
        b->slots[k] = calloc(KMS_BREAKER_SLOTS, sizeof *b->slots[k]);
        atomic_init(&b->latest[k], 0);
        if (!b->slots[k]) {
            kms_breaker_free(b);
            return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        }
    }
    pthread_mutex_init(&b->mu, NULL);
    *out = b;
    return KMS_OK;
}

void kms_breaker_free(struct kms_breaker *b)
{
    if (!b)
        return;
    for (int k = 0; k < KMS_BREAKER_KINDS; k++)
        free(b->slots[k]);
    pthread_mutex_destroy(&b->mu);
    free(b);
}

const struct kms_breaker_config *kms_breaker_config(const struct kms_breaker *b)
{
    return &b->cfg;
}

static uint64_t hash(const char *s)
{
    uint64_t h = UINT64_C(1469598103934665603); /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * UINT64_C(1099511628211);
    return h;
}

static int idle_locked(const struct kms_breaker *b, const struct entry *e, int64_t now_ns)
{
    return e->name[0] == '\0' ||
           (now_ns >= e->open_until_ns &&
            now_ns - e->window_start_ns >= (int64_t)b->cfg.window_s * NS_PER_S);
}

/* name's entry; with make, a free or idle one taken for it; NULL when there is none. */
static struct entry *find_locked(struct kms_breaker *b, enum kms_breaker_kind kind,
                                 const char *name, int64_t now_ns, int make)
{
    struct entry *table = b->slots[kind], *spare = NULL;
    uint64_t h = hash(name);
    for (size_t i = 0; i < PROBE; i++) {
        struct entry *e = &table[(h + i) % KMS_BREAKER_SLOTS];
        if (strcmp(e->name, name) == 0)
            return e;
        if (!spare && idle_locked(b, e, now_ns))
            spare = e;
    }
    if (!make || !spare)
        return NULL;
    memset(spare, 0, sizeof *spare);
    memcpy(spare->name, name, strlen(name) + 1);
    return spare;
}

static int usable(const struct kms_breaker *b, enum kms_breaker_kind kind, const char *name)
{
    return b && b->cfg.failures > 0 && (unsigned)kind < KMS_BREAKER_KINDS && name && *name &&
           strlen(name) <= KMS_BREAKER_NAME_MAX;
}

int kms_breaker_is_open(struct kms_breaker *b, enum kms_breaker_kind kind, const char *name,
                        int64_t now_ns, int64_t *until_ns)
{
    if (!usable(b, kind, name) || now_ns >= atomic_load(&b->latest[kind]))
        return 0;
    pthread_mutex_lock(&b->mu);
    struct entry *e = find_locked(b, kind, name, now_ns, 0);
    int open = e && now_ns < e->open_until_ns;
    if (open && until_ns)
        *until_ns = e->open_until_ns;
    pthread_mutex_unlock(&b->mu);
    return open;
}

int kms_breaker_fail(struct kms_breaker *b, enum kms_breaker_kind kind, const char *name,
                     int64_t now_ns, int64_t *until_ns)
{
    int tripped = 0;
    if (!usable(b, kind, name))
        return 0;
    pthread_mutex_lock(&b->mu);
    struct entry *e = find_locked(b, kind, name, now_ns, 1);
    if (e && now_ns >= e->open_until_ns) {
        if (e->count == 0 || now_ns - e->window_start_ns >= (int64_t)b->cfg.window_s * NS_PER_S) {
            e->window_start_ns = now_ns;
            e->count = 0;
        }
        if (++e->count >= b->cfg.failures) {
            e->open_until_ns = now_ns + (int64_t)b->cfg.cooldown_s * NS_PER_S;
            e->count = 0;
            if (e->open_until_ns > atomic_load(&b->latest[kind]))
                atomic_store(&b->latest[kind], e->open_until_ns);
            if (until_ns)
                *until_ns = e->open_until_ns;
            tripped = 1;
        }
    }
    pthread_mutex_unlock(&b->mu);
    return tripped;
}

size_t kms_breaker_open_count(struct kms_breaker *b, enum kms_breaker_kind kind, int64_t now_ns)
{
    size_t n = 0;
    if (!b || (unsigned)kind >= KMS_BREAKER_KINDS || now_ns >= atomic_load(&b->latest[kind]))
        return 0;
    pthread_mutex_lock(&b->mu);
    for (size_t i = 0; i < KMS_BREAKER_SLOTS; i++)
        n += now_ns < b->slots[kind][i].open_until_ns;
    pthread_mutex_unlock(&b->mu);
    return n;
}
