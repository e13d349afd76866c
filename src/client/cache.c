/*
 * The data-key cache (DESIGN §8), bounded as the AWS Encryption SDK's caching
 * materials manager bounds its cache.
 *
 * Two sides share one store and one LRU list:
 *   decrypt  (blob, canonical context)   -> the blob's data key; age only
 *   seal     (key id, canonical context) -> one GenerateDataKey result reused
 *                                           for many messages, within age,
 *                                           messages and bytes
 * An entry is usable while its age is below max age (it expires at exactly
 * max age); a seal entry serves at most max_messages messages and max_bytes
 * bytes, counting the message that generated it. Past max age a decrypt entry
 * is kept for cache_grace_s more, served only to a caller that says the
 * service cannot be reached (grace); then it goes.
 *
 * Memory. The 32-byte keys live in one slab of max_entries slots allocated
 * from OpenSSL's secure heap (mmap'd, mlock'd, guard pages, MADV_DONTDUMP).
 * The secure heap is one per process, so the first cache sizes it:
 * 2 * next_pow2(max_entries * 32), at least 64 KiB; the slab takes half of it
 * and the copies handed to callers (p11kms_data_key.plaintext) the rest. When
 * the heap cannot be locked (RLIMIT_MEMLOCK) the slab comes from ordinary
 * memory, cleansed all the same, kms_cache_locked() says 0 and the reason is
 * left as the thread's last error -- or, with require_locked_memory,
 * kms_cache_new fails with P11KMS_ERR_MEMORY_LOCK. A slot is cleansed as soon
 * as its entry goes (eviction, replacement, expiry, destruction).
 *
 * Fork. A forked child must never use its parent's keys. A pthread_atfork
 * handler takes every cache's lock before fork (so no entry is half-written),
 * and in the child cleanses every slab in place, drops every entry and
 * re-locks the slab pages (mlock is not inherited). It does not free the slab
 * nor call the secure heap's allocator, whose lock another parent thread may
 * have held at fork time: the slab is the child's own copy-on-write copy and
 * is reused for the child's own entries. Every access also compares getpid()
 * with the owner's, for a child made without the handlers (a raw clone).
 *
 * Locking: one mutex per cache, held only for lookups, copies of 32 bytes and
 * list surgery; allocations and frees happen outside it, but for the copy of
 * the blob a seal hit hands out (its length is known only then). Lock order:
 * heap_lock, reg_lock, a cache's lock (only the fork handlers hold more than
 * one).
 */
#include "config.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "client/internal.h"

#define KEY_LEN 32
_Static_assert(KEY_LEN == KMS_CACHE_KEY_LEN && KEY_LEN == KMS_JWE_KEY_LEN, "one key size");
#define MIN_HEAP ((size_t)64 << 10)

enum side { SIDE_DECRYPT = 1, SIDE_SEAL = 2 };

struct entry {
    struct entry *hnext;       /* bucket chain */
    struct entry *prev, *next; /* LRU: head is the most recently used */
    uint64_t hash;
    uint8_t *id; /* side | u32 length | blob or key id | canonical context */
    size_t id_len;
    uint8_t *blob;
    size_t blob_len;
    char key_arn[sizeof(((struct p11kms_data_key *)0)->key_arn)];
    size_t slot;
    uint64_t created_ms;
    uint64_t messages, bytes; /* seal side: what the key has sealed so far */
};

struct kms_cache {
    pthread_mutex_t lock;
    uint64_t max_age_ms, grace_ms, max_messages, max_bytes;
    size_t max_entries;

    uint8_t *slab; /* max_entries * KEY_LEN */
    size_t slab_len;
    int locked;
    size_t *free_slots; /* a stack */
    size_t nfree;

    struct entry **buckets;
    size_t nbuckets; /* a power of two */
    struct entry *head, *tail;
    size_t count;
    uint64_t seed;

    pid_t pid;
    uint64_t (*now)(void *);
    void *now_arg;

    struct kms_cache *reg_prev, *reg_next; /* every live cache, for the fork handler */
};

/* ---- the secure heap, once per process --------------------------------------- */

static pthread_mutex_t heap_lock = PTHREAD_MUTEX_INITIALIZER;
static int heap_state;     /* 0 untried, 1 locked, 2 in use but unlocked, -1 unusable */
static char heap_why[160]; /* why it is not locked */
static size_t heap_size;

static size_t next_pow2(size_t n)
{
    size_t p = 1;
    while (p < n) {
        if (p > SIZE_MAX / 2)
            return 0;
        p <<= 1;
    }
    return p;
}

/* Sets up the secure heap if no one has; returns heap_state. */
static int secure_heap_init(size_t slab_len)
{
    pthread_mutex_lock(&heap_lock);
    if (heap_state == 0) {
        size_t half = next_pow2(slab_len);
        size_t want = half && half <= SIZE_MAX / 2 ? 2 * half : 0;
        if (want && want < MIN_HEAP)
            want = MIN_HEAP;
        const char *skip = getenv("P11KMS_DONT_MLOCK");
        if (skip && *skip && strcmp(skip, "0") != 0) {
            heap_state = -1;
            snprintf(heap_why, sizeof heap_why, "P11KMS_DONT_MLOCK is set");
        } else if (CRYPTO_secure_malloc_initialized()) {
            /* The application's: we cannot tell whether its mlock worked. */
            heap_state = 1;
        } else if (!want) {
            heap_state = -1;
            snprintf(heap_why, sizeof heap_why, "cache_max_entries is too large");
        } else {
            errno = 0;
            int r = CRYPTO_secure_malloc_init(want, KEY_LEN);
            int e = errno;
            heap_size = want;
            if (r == 1) {
                heap_state = 1;
            } else if (r == 2) {
                heap_state = 2;
                snprintf(heap_why, sizeof heap_why,
                         "the secure heap (%zu bytes) could not be locked in memory (%s); "
                         "raise RLIMIT_MEMLOCK (ulimit -l, LimitMEMLOCK=)",
                         want, e ? strerror(e) : "mlock failed");
            } else {
                heap_state = -1;
                snprintf(heap_why, sizeof heap_why,
                         "the secure heap (%zu bytes) could not be set up (%s)", want,
                         e ? strerror(e) : "CRYPTO_secure_malloc_init failed");
            }
        }
    }
    int s = heap_state;
    pthread_mutex_unlock(&heap_lock);
    return s;
}

/* ---- the registry and the fork handlers --------------------------------------- */

static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct kms_cache *reg_head;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void purge_locked(struct kms_cache *cache, struct entry **dead);

static void relock_slab(struct kms_cache *cache)
{
    if (!cache->locked)
        return;
    long page = sysconf(_SC_PAGESIZE);
    if (page <= 0)
        page = 4096;
    uintptr_t start = (uintptr_t)cache->slab & ~((uintptr_t)page - 1);
    uintptr_t end =
        ((uintptr_t)cache->slab + cache->slab_len + (uintptr_t)page - 1) & ~((uintptr_t)page - 1);
    if (mlock((void *)start, end - start) != 0)
        cache->locked = 0;
}

static void free_entries(struct entry *e)
{
    while (e) {
        struct entry *n = e->hnext;
        free(e->id);
        free(e->blob);
        OPENSSL_cleanse(e, sizeof *e);
        free(e);
        e = n;
    }
}

static void atfork_prepare(void)
{
    pthread_mutex_lock(&heap_lock);
    pthread_mutex_lock(&reg_lock);
    for (struct kms_cache *c = reg_head; c; c = c->reg_next)
        pthread_mutex_lock(&c->lock);
}

static void atfork_parent(void)
{
    for (struct kms_cache *c = reg_head; c; c = c->reg_next)
        pthread_mutex_unlock(&c->lock);
    pthread_mutex_unlock(&reg_lock);
    pthread_mutex_unlock(&heap_lock);
}

static void atfork_child(void)
{
    for (struct kms_cache *c = reg_head; c; c = c->reg_next) {
        struct entry *dead = NULL;
        purge_locked(c, &dead);
        c->pid = getpid();
        relock_slab(c);
        pthread_mutex_unlock(&c->lock);
        /* glibc's malloc is usable again by the time child handlers run. */
        free_entries(dead);
    }
    pthread_mutex_unlock(&reg_lock);
    pthread_mutex_unlock(&heap_lock);
}

static void atfork_register(void)
{
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

/* ---- clock, hashing, ids ------------------------------------------------------- */

static uint64_t default_now(void *arg)
{
    (void)arg;
    struct timespec ts;
#ifdef CLOCK_BOOTTIME
    if (clock_gettime(CLOCK_BOOTTIME, &ts) != 0)
#endif
        clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/*
 * An entry's id: side | u32 length | blob or key id | canonical context,
 * stored in one piece in the entry and looked up in pieces, so a lookup
 * copies nothing.
 */
struct id_parts {
    uint8_t head[5]; /* side, then a_len big-endian */
    const uint8_t *a;
    size_t a_len;
    const uint8_t *canon;
    size_t canon_len;
};

/* 0 when the id cannot be (a longer than 4 GiB, a total past SIZE_MAX). */
static int id_parts(enum side side, const uint8_t *a, size_t a_len, const uint8_t *canon,
                    size_t canon_len, struct id_parts *out)
{
    if (a_len > UINT32_MAX || canon_len > SIZE_MAX - 5 - a_len)
        return 0;
    out->head[0] = (uint8_t)side;
    out->head[1] = (uint8_t)(a_len >> 24);
    out->head[2] = (uint8_t)(a_len >> 16);
    out->head[3] = (uint8_t)(a_len >> 8);
    out->head[4] = (uint8_t)a_len;
    out->a = a;
    out->a_len = a_len;
    out->canon = canon;
    out->canon_len = canon_len;
    return 1;
}

/* The pieces of a stored id (one made by make_id). */
static struct id_parts parts_of(const uint8_t *id, size_t id_len)
{
    struct id_parts p;
    size_t a_len = (size_t)id[1] << 24 | (size_t)id[2] << 16 | (size_t)id[3] << 8 | id[4];
    (void)id_parts((enum side)id[0], id + 5, a_len, id + 5 + a_len, id_len - 5 - a_len, &p);
    return p;
}

static uint8_t *make_id(const struct id_parts *p, size_t *out_len)
{
    size_t n = 5 + p->a_len + p->canon_len;
    uint8_t *id = malloc(n);
    if (!id)
        return NULL;
    memcpy(id, p->head, 5);
    if (p->a_len)
        memcpy(id + 5, p->a, p->a_len);
    if (p->canon_len)
        memcpy(id + 5 + p->a_len, p->canon, p->canon_len);
    *out_len = n;
    return id;
}

static uint64_t mix(uint64_t h, uint64_t w)
{
    h = (h ^ w) * 0x9e3779b97f4a7c15ull;
    return h ^ (h >> 29);
}

/* Eight bytes at a time; the last word zero-filled and marked with how many bytes it has. */
static uint64_t hash_bytes(uint64_t h, const uint8_t *p, size_t n)
{
    uint64_t w;
    for (; n >= 8; p += 8, n -= 8) {
        memcpy(&w, p, 8);
        h = mix(h, w);
    }
    w = 0;
    if (n)
        memcpy(&w, p, n);
    return mix(h, w ^ (uint64_t)n << 56);
}

/*
 * A multiply-xorshift over 8-byte words with a per-cache random seed (FNV-1a,
 * a byte at a time, was a good part of what a cache hit cost); chains are
 * bounded by max_entries anyway.
 */
static uint64_t hash_id(uint64_t seed, const struct id_parts *p)
{
    uint64_t h = hash_bytes(seed, p->head, 5);
    h = hash_bytes(h, p->a, p->a_len);
    return hash_bytes(h, p->canon, p->canon_len);
}

static int id_equal(const struct entry *e, const struct id_parts *p)
{
    return e->id_len == 5 + p->a_len + p->canon_len && memcmp(e->id, p->head, 5) == 0 &&
           (!p->a_len || memcmp(e->id + 5, p->a, p->a_len) == 0) &&
           (!p->canon_len || memcmp(e->id + 5 + p->a_len, p->canon, p->canon_len) == 0);
}

/* ---- store operations; all _locked ones expect cache->lock held ------------------ */

static struct entry *find_locked(struct kms_cache *cache, const struct id_parts *id, uint64_t h)
{
    for (struct entry *e = cache->buckets[h & (cache->nbuckets - 1)]; e; e = e->hnext)
        if (e->hash == h && id_equal(e, id))
            return e;
    return NULL;
}

static void lru_unlink_locked(struct kms_cache *cache, struct entry *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        cache->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        cache->tail = e->prev;
    e->prev = e->next = NULL;
}

static void lru_push_locked(struct kms_cache *cache, struct entry *e)
{
    e->prev = NULL;
    e->next = cache->head;
    if (cache->head)
        cache->head->prev = e;
    cache->head = e;
    if (!cache->tail)
        cache->tail = e;
}

static void touch_locked(struct kms_cache *cache, struct entry *e)
{
    if (cache->head != e) {
        lru_unlink_locked(cache, e);
        lru_push_locked(cache, e);
    }
}

/* Takes e out of the store, wipes its slot and chains it on *dead to be freed unlocked. */
static void evict_locked(struct kms_cache *cache, struct entry *e, struct entry **dead)
{
    struct entry **pp = &cache->buckets[e->hash & (cache->nbuckets - 1)];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    lru_unlink_locked(cache, e);
    OPENSSL_cleanse(cache->slab + e->slot * KEY_LEN, KEY_LEN);
    cache->free_slots[cache->nfree++] = e->slot;
    cache->count--;
    e->hnext = *dead;
    *dead = e;
}

static void purge_locked(struct kms_cache *cache, struct entry **dead)
{
    while (cache->tail)
        evict_locked(cache, cache->tail, dead);
    /* Belt and braces: every slot, used or not, is zero afterwards. */
    OPENSSL_cleanse(cache->slab, cache->slab_len);
}

/* Locks the cache; in a process that is not the owner (a child), empties it first. */
static void lock_cache(struct kms_cache *cache, struct entry **dead)
{
    pthread_mutex_lock(&cache->lock);
    pid_t me = getpid();
    if (cache->pid != me) {
        purge_locked(cache, dead);
        cache->pid = me;
        relock_slab(cache);
    }
}

static uint64_t age_ms_locked(struct kms_cache *cache, const struct entry *e)
{
    uint64_t now = cache->now(cache->now_arg);
    return now >= e->created_ms ? now - e->created_ms : 0;
}

/* Inserts n (id, hash, blob, arn filled in) with key, replacing an entry with its id. */
static void insert_locked(struct kms_cache *cache, struct entry *n, const uint8_t *key,
                          struct entry **dead)
{
    struct id_parts id = parts_of(n->id, n->id_len);
    struct entry *old = find_locked(cache, &id, n->hash);
    if (old)
        evict_locked(cache, old, dead);
    if (cache->count >= cache->max_entries)
        evict_locked(cache, cache->tail, dead);
    n->slot = cache->free_slots[--cache->nfree];
    memcpy(cache->slab + n->slot * KEY_LEN, key, KEY_LEN);
    n->created_ms = cache->now(cache->now_arg);
    size_t b = n->hash & (cache->nbuckets - 1);
    n->hnext = cache->buckets[b];
    cache->buckets[b] = n;
    lru_push_locked(cache, n);
    cache->count++;
}

/* ---- public (to the library) ---------------------------------------------------- */

p11kms_status kms_cache_new(const struct p11kms_options *o, struct kms_cache **out)
{
    if (!o || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "kms_cache_new: NULL argument");
    *out = NULL;
    if (o->cache_max_age_s == 0)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the cache is off when its max age is 0");
    struct kms_cache *cache = calloc(1, sizeof *cache);
    if (!cache)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory for the data-key cache");
    p11kms_status st = P11KMS_OK;
    cache->max_age_ms = (uint64_t)o->cache_max_age_s * 1000u;
    cache->grace_ms = (uint64_t)o->cache_grace_s * 1000u;
    cache->max_entries = o->cache_max_entries ? o->cache_max_entries : 1000;
    cache->max_messages = o->cache_max_messages ? o->cache_max_messages : (uint64_t)1 << 32;
    cache->max_bytes = o->cache_max_bytes ? o->cache_max_bytes : (uint64_t)1 << 62;
    cache->now = default_now;
    cache->pid = getpid();
    if (pthread_mutex_init(&cache->lock, NULL) != 0) {
        free(cache);
        return kms_client_fail(P11KMS_ERR_MEMORY, "cannot create the cache's mutex");
    }

    if (cache->max_entries > SIZE_MAX / KEY_LEN / 2 ||
        !(cache->nbuckets = next_pow2(cache->max_entries < 16 ? 16 : cache->max_entries))) {
        st = kms_client_fail(P11KMS_ERR_CONFIG, "cache_max_entries %zu is too large",
                             cache->max_entries);
        goto cleanup;
    }
    cache->slab_len = cache->max_entries * KEY_LEN;
    cache->buckets = calloc(cache->nbuckets, sizeof *cache->buckets);
    cache->free_slots = calloc(cache->max_entries, sizeof *cache->free_slots);
    if (!cache->buckets || !cache->free_slots) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory for the data-key cache");
        goto cleanup;
    }
    for (size_t i = 0; i < cache->max_entries; i++)
        cache->free_slots[i] = cache->max_entries - 1 - i; /* slot 0 first */
    cache->nfree = cache->max_entries;
    if (RAND_bytes((unsigned char *)&cache->seed, sizeof cache->seed) != 1) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "random generator failed");
        goto cleanup;
    }

    int hs = secure_heap_init(cache->slab_len);
    cache->slab = OPENSSL_secure_zalloc(cache->slab_len);
    char why[224];
    if (cache->slab && CRYPTO_secure_allocated(cache->slab) && hs == 1) {
        cache->locked = 1;
    } else {
        if (cache->slab && CRYPTO_secure_allocated(cache->slab))
            snprintf(why, sizeof why, "%s", heap_why);
        else if (hs >= 1)
            snprintf(why, sizeof why,
                     "the secure heap (%zu bytes, sized by the first cache or the "
                     "application) has no room for %zu cache entries",
                     heap_size, cache->max_entries);
        else
            snprintf(why, sizeof why, "%s", heap_why);
        if (o->require_locked_memory) {
            st = kms_client_fail(P11KMS_ERR_MEMORY_LOCK,
                                 "data-key cache: %s, and require_locked_memory is set", why);
            goto cleanup;
        }
        if (!cache->slab)
            cache->slab = OPENSSL_zalloc(cache->slab_len);
        if (!cache->slab) {
            st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory for the data-key cache");
            goto cleanup;
        }
        /* Not a failure: left as the thread's last error so the caller can say why. */
        (void)kms_client_fail(P11KMS_ERR_MEMORY_LOCK,
                              "data-key cache in ordinary memory (cleansed, not locked): %s", why);
    }

    pthread_once(&atfork_once, atfork_register);
    pthread_mutex_lock(&reg_lock);
    cache->reg_next = reg_head;
    if (reg_head)
        reg_head->reg_prev = cache;
    reg_head = cache;
    pthread_mutex_unlock(&reg_lock);
    *out = cache;
    return P11KMS_OK;

cleanup:
    if (cache->slab)
        OPENSSL_secure_clear_free(cache->slab, cache->slab_len);
    free(cache->buckets);
    free(cache->free_slots);
    pthread_mutex_destroy(&cache->lock);
    free(cache);
    return st;
}

void kms_cache_free(struct kms_cache *cache)
{
    if (!cache)
        return;
    pthread_mutex_lock(&reg_lock);
    if (cache->reg_prev)
        cache->reg_prev->reg_next = cache->reg_next;
    else
        reg_head = cache->reg_next;
    if (cache->reg_next)
        cache->reg_next->reg_prev = cache->reg_prev;
    pthread_mutex_unlock(&reg_lock);

    struct entry *dead = NULL;
    pthread_mutex_lock(&cache->lock);
    purge_locked(cache, &dead);
    pthread_mutex_unlock(&cache->lock);
    free_entries(dead);
    /* Frees into the secure heap when it came from there, else cleanses and frees. */
    OPENSSL_secure_clear_free(cache->slab, cache->slab_len);
    free(cache->buckets);
    free(cache->free_slots);
    pthread_mutex_destroy(&cache->lock);
    free(cache);
}

int kms_cache_locked(const struct kms_cache *cache)
{
    return cache ? cache->locked : 0;
}

size_t kms_cache_count(struct kms_cache *cache)
{
    if (!cache)
        return 0;
    struct entry *dead = NULL;
    lock_cache(cache, &dead);
    size_t n = cache->count;
    pthread_mutex_unlock(&cache->lock);
    free_entries(dead);
    return n;
}

void kms_cache_set_clock(struct kms_cache *cache, uint64_t (*now_ms)(void *arg), void *arg)
{
    pthread_mutex_lock(&cache->lock);
    cache->now = now_ms ? now_ms : default_now;
    cache->now_arg = now_ms ? arg : NULL;
    pthread_mutex_unlock(&cache->lock);
}

p11kms_status kms_cache_debug_slot(struct kms_cache *cache, size_t i, const uint8_t **p, size_t *n)
{
    if (!cache || !p || !n || i >= cache->max_entries)
        return P11KMS_ERR_ARGUMENT;
    *p = cache->slab + i * KEY_LEN;
    *n = KEY_LEN;
    return P11KMS_OK;
}

/* A copy for the caller: plaintext in the secure heap, blob and ARN as the entry's. */
static p11kms_status prepare_out(struct p11kms_data_key *out, size_t blob_len)
{
    memset(out, 0, sizeof *out);
    out->plaintext = OPENSSL_secure_malloc(KEY_LEN);
    out->blob = malloc(blob_len ? blob_len : 1);
    if (!out->plaintext || !out->blob) {
        OPENSSL_secure_clear_free(out->plaintext, KEY_LEN);
        free(out->blob);
        memset(out, 0, sizeof *out);
        return P11KMS_ERR_MEMORY;
    }
    out->plaintext_len = KEY_LEN;
    return P11KMS_OK;
}

static void discard_out(struct p11kms_data_key *out)
{
    OPENSSL_secure_clear_free(out->plaintext, KEY_LEN);
    free(out->blob);
    memset(out, 0, sizeof *out);
}

/*
 * The decrypt entry for id (hash h) while it may serve (younger than max age,
 * plus the grace period when grace is set), touched; NULL when not. An entry
 * past its grace period too goes on the way.
 */
static struct entry *usable_decrypt_locked(struct kms_cache *cache, const struct id_parts *id,
                                           uint64_t h, int grace, struct entry **dead)
{
    struct entry *e = find_locked(cache, id, h);
    if (!e)
        return NULL;
    uint64_t age = age_ms_locked(cache, e);
    if (age < cache->max_age_ms + (grace ? cache->grace_ms : 0)) {
        touch_locked(cache, e);
        return e;
    }
    if (age >= cache->max_age_ms + cache->grace_ms)
        evict_locked(cache, e, dead); /* no caller may have it any more */
    return NULL;
}

p11kms_status kms_cache_get_decrypt(struct kms_cache *cache, const uint8_t *blob, size_t blob_len,
                                    const uint8_t *canon_ctx, size_t canon_len, int grace,
                                    struct p11kms_data_key *out)
{
    struct id_parts id;
    if (!cache || !blob || !blob_len || !out || (!canon_ctx && canon_len) ||
        !id_parts(SIDE_DECRYPT, blob, blob_len, canon_ctx, canon_len, &id))
        return P11KMS_ERR_NOT_FOUND;
    uint64_t h = hash_id(cache->seed, &id);
    if (prepare_out(out, blob_len) != P11KMS_OK)
        return P11KMS_ERR_NOT_FOUND;

    int hit = 0;
    struct entry *dead = NULL;
    lock_cache(cache, &dead);
    struct entry *e = usable_decrypt_locked(cache, &id, h, grace, &dead);
    if (e) {
        memcpy(out->plaintext, cache->slab + e->slot * KEY_LEN, KEY_LEN);
        memcpy(out->key_arn, e->key_arn, sizeof out->key_arn);
        hit = 1;
    }
    pthread_mutex_unlock(&cache->lock);
    free_entries(dead);
    if (!hit) {
        discard_out(out);
        return P11KMS_ERR_NOT_FOUND;
    }
    memcpy(out->blob, blob, blob_len);
    out->blob_len = blob_len;
    return P11KMS_OK;
}

p11kms_status kms_cache_get_decrypt_key(struct kms_cache *cache, const uint8_t *blob,
                                        size_t blob_len, const uint8_t *canon_ctx, size_t canon_len,
                                        uint8_t key[KMS_CACHE_KEY_LEN])
{
    struct id_parts id;
    if (!cache || !blob || !blob_len || !key || (!canon_ctx && canon_len) ||
        !id_parts(SIDE_DECRYPT, blob, blob_len, canon_ctx, canon_len, &id))
        return P11KMS_ERR_NOT_FOUND;
    uint64_t h = hash_id(cache->seed, &id);

    int hit = 0;
    struct entry *dead = NULL;
    lock_cache(cache, &dead);
    struct entry *e = usable_decrypt_locked(cache, &id, h, 0, &dead);
    if (e) {
        memcpy(key, cache->slab + e->slot * KEY_LEN, KEY_LEN);
        hit = 1;
    }
    pthread_mutex_unlock(&cache->lock);
    free_entries(dead);
    return hit ? P11KMS_OK : P11KMS_ERR_NOT_FOUND;
}

/* An entry for k under id, outside the lock; NULL when it cannot be cached. */
static struct entry *new_entry(enum side side, const uint8_t *a, size_t a_len, const uint8_t *canon,
                               size_t canon_len, const struct p11kms_data_key *k, uint64_t seed)
{
    if (!k || !k->plaintext || k->plaintext_len != KEY_LEN || !k->blob || !k->blob_len ||
        (!canon && canon_len))
        return NULL;
    struct id_parts id;
    if (!id_parts(side, a, a_len, canon, canon_len, &id))
        return NULL;
    struct entry *n = calloc(1, sizeof *n);
    if (!n)
        return NULL;
    n->id = make_id(&id, &n->id_len);
    n->blob = malloc(k->blob_len);
    if (!n->id || !n->blob) {
        free(n->id);
        free(n->blob);
        free(n);
        return NULL;
    }
    memcpy(n->blob, k->blob, k->blob_len);
    n->blob_len = k->blob_len;
    memcpy(n->key_arn, k->key_arn, sizeof n->key_arn);
    n->key_arn[sizeof n->key_arn - 1] = '\0';
    n->hash = hash_id(seed, &id);
    return n;
}

void kms_cache_put_decrypt(struct kms_cache *cache, const struct p11kms_data_key *k,
                           const uint8_t *canon_ctx, size_t canon_len)
{
    if (!cache || !k)
        return;
    struct entry *n =
        new_entry(SIDE_DECRYPT, k->blob, k->blob_len, canon_ctx, canon_len, k, cache->seed);
    if (!n)
        return;
    struct entry *dead = NULL;
    lock_cache(cache, &dead);
    insert_locked(cache, n, k->plaintext, &dead);
    pthread_mutex_unlock(&cache->lock);
    free_entries(dead);
}

p11kms_status kms_cache_take_for_seal(struct kms_cache *cache, const char *key_id,
                                      const uint8_t *canon_ctx, size_t canon_len, uint64_t bytes,
                                      struct p11kms_data_key *out)
{
    struct id_parts id;
    if (!cache || !key_id || !out || (!canon_ctx && canon_len) || bytes > cache->max_bytes ||
        !id_parts(SIDE_SEAL, (const uint8_t *)key_id, strlen(key_id), canon_ctx, canon_len, &id))
        return P11KMS_ERR_NOT_FOUND;
    uint64_t h = hash_id(cache->seed, &id);
    memset(out, 0, sizeof *out);
    out->plaintext = OPENSSL_secure_malloc(KEY_LEN);
    if (!out->plaintext)
        return P11KMS_ERR_NOT_FOUND;

    int hit = 0;
    uint8_t *blob = NULL;
    struct entry *dead = NULL;
    lock_cache(cache, &dead);
    struct entry *e = find_locked(cache, &id, h);
    if (e) {
        if (age_ms_locked(cache, e) >= cache->max_age_ms || e->messages >= cache->max_messages ||
            bytes > cache->max_bytes - e->bytes) {
            /* Used up: as the Encryption SDK does, the entry goes and the caller
               gets a fresh data key. */
            evict_locked(cache, e, &dead);
        } else if ((blob = malloc(e->blob_len)) != NULL) {
            e->messages++;
            e->bytes += bytes;
            memcpy(out->plaintext, cache->slab + e->slot * KEY_LEN, KEY_LEN);
            memcpy(blob, e->blob, e->blob_len);
            out->blob_len = e->blob_len;
            memcpy(out->key_arn, e->key_arn, sizeof out->key_arn);
            hit = 1;
            if (e->messages >= cache->max_messages)
                evict_locked(cache, e, &dead); /* this was its last message */
            else
                touch_locked(cache, e);
        }
    }
    pthread_mutex_unlock(&cache->lock);
    free_entries(dead);
    if (!hit) {
        OPENSSL_secure_clear_free(out->plaintext, KEY_LEN);
        memset(out, 0, sizeof *out);
        return P11KMS_ERR_NOT_FOUND;
    }
    out->plaintext_len = KEY_LEN;
    out->blob = blob;
    return P11KMS_OK;
}

void kms_cache_put_for_seal(struct kms_cache *cache, const char *key_id, const uint8_t *canon_ctx,
                            size_t canon_len, const struct p11kms_data_key *k, uint64_t bytes)
{
    /* The message that got k counts: a key for one message only is not kept, nor
       one whose first message already passes the byte bound. */
    if (!cache || !key_id || bytes > cache->max_bytes || cache->max_messages <= 1)
        return;
    struct entry *n = new_entry(SIDE_SEAL, (const uint8_t *)key_id, strlen(key_id), canon_ctx,
                                canon_len, k, cache->seed);
    if (!n)
        return;
    n->messages = 1;
    n->bytes = bytes;
    struct entry *dead = NULL;
    lock_cache(cache, &dead);
    insert_locked(cache, n, k->plaintext, &dead);
    pthread_mutex_unlock(&cache->lock);
    free_entries(dead);
}
