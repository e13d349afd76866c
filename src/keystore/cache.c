/*
 * The keys a node holds in memory: a hash of entries by key id with an LRU
 * bounded by key_cache, the aliases it has resolved, and a bounded negative
 * cache of key ids the database does not have, so that blobs naming made-up
 * keys cost one primary-key lookup the first time and nothing after.
 *
 * An entry is read whole from the database (the key's row and its versions'
 * rows) at its first use, and again after a change marks it stale; the
 * unwrapped session objects of its versions carry over to the new entry
 * (versions never change). A dropped entry still held by a request is freed
 * when the last one lets go; its session objects are destroyed then, under
 * no lock of ours (kms_cache_reap), and what is left of its block of uses is
 * kept for the key's next entry (struct spare_uses).
 */
#include "config.h"

#include <openssl/evp.h>

#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "keystore/internal.h"

#define UNKNOWN_TTL_SECONDS 60
#define MISSED_VERSION_SECONDS 2
#define SPARES_MIN ((size_t)1 << 16)
#define SPARES_MAX ((size_t)1 << 20)

static uint64_t hash_seed;

static uint64_t mix(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t id_hash(const uint8_t id[KMS_UUID_LEN])
{
    uint64_t a, b;
    memcpy(&a, id, 8);
    memcpy(&b, id + 8, 8);
    return mix(a ^ hash_seed) ^ mix(b + hash_seed);
}

static uint64_t name_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL ^ hash_seed;
    for (; *s; s++)
        h = (h ^ (uint8_t)*s) * 1099511628211ULL;
    return mix(h);
}

static size_t pow2_at_least(size_t n)
{
    size_t p = 64;
    while (p < n)
        p *= 2;
    return p;
}

kms_err kms_cache_init(struct kms_keystore *ks)
{
    const char *p = ks->cfg.default_policy;
    if (ks->cfg.compile_policy && p && *p &&
        ks->cfg.compile_policy(ks->cfg.policy_arg, p, strlen(p), &ks->default_policy) != KMS_OK) {
        kms_warn("the default key policy does not compile (%s): keys without a policy of "
                 "their own allow nothing",
                 kms_err_message());
        kms_err_clear();
        ks->default_policy = NULL;
    }
    if (!hash_seed)
        KMS_ENSURE(RAND_bytes((uint8_t *)&hash_seed, sizeof hash_seed) == 1, KMS_ERR_INTERNAL,
                   "random generator failed");
    ks->nbuckets = pow2_at_least((size_t)ks->cfg.key_cache * 2);
    ks->nalias_buckets = pow2_at_least(1024);
    ks->nunknown = pow2_at_least(ks->cfg.negative_cache);
    /*
     * Spare uses outnumber the cache: a hot set larger than the cache cycles
     * through it, and each of its keys should find its block again (40 bytes
     * a slot: 64 Ki slots at least, 1 Mi at most).
     */
    size_t spares = (size_t)ks->cfg.key_cache * 8;
    ks->nspares = pow2_at_least(spares < SPARES_MIN   ? SPARES_MIN
                                : spares > SPARES_MAX ? SPARES_MAX
                                                      : spares);
    ks->keys = calloc(ks->nbuckets, sizeof *ks->keys);
    ks->aliases = calloc(ks->nalias_buckets, sizeof *ks->aliases);
    ks->unknown = calloc(ks->nunknown, sizeof *ks->unknown);
    ks->unknown_at = calloc(ks->nunknown, sizeof *ks->unknown_at);
    ks->spares = calloc(ks->nspares, sizeof *ks->spares);
    KMS_ENSURE(ks->keys && ks->aliases && ks->unknown && ks->unknown_at && ks->spares,
               KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

static void key_free(struct kms_keystore *ks, struct key *k)
{
    if (k->grants && ks->cfg.free_grants)
        ks->cfg.free_grants(k->grants);
    if (k->policy && k->policy != ks->default_policy && ks->cfg.free_policy)
        ks->cfg.free_policy(k->policy);
    for (size_t i = 0; i < k->nversions; i++) {
        free(k->versions[i].wrapped);
        free(k->versions[i].public_key);
        EVP_PKEY_free(k->versions[i].pkey);
    }
    free(k->versions);
    kms_key_row_clear(&k->row);
    if (k->use && --k->use->refs == 0)
        free(k->use);
    free(k);
}

static void aliases_clear_locked(struct kms_keystore *ks)
{
    for (size_t i = 0; i < ks->nalias_buckets; i++) {
        while (ks->aliases[i]) {
            struct alias_entry *a = ks->aliases[i];
            ks->aliases[i] = a->hnext;
            free(a);
        }
    }
    ks->naliases = 0;
}

void kms_cache_free(struct kms_keystore *ks)
{
    /* At close: the holder session goes with the token, and its objects with it. */
    for (size_t i = 0; ks->keys && i < ks->nbuckets; i++) {
        while (ks->keys[i]) {
            struct key *k = ks->keys[i];
            ks->keys[i] = k->hnext;
            key_free(ks, k);
        }
    }
    while (ks->reaped) {
        struct key *k = ks->reaped;
        ks->reaped = k->hnext;
        key_free(ks, k);
    }
    if (ks->aliases)
        aliases_clear_locked(ks);
    if (ks->default_policy && ks->cfg.free_policy)
        ks->cfg.free_policy(ks->default_policy);
    free(ks->keys);
    free(ks->aliases);
    free(ks->unknown);
    free(ks->unknown_at);
    free(ks->spares);
}

/* ---- the hash and the LRU, under ks->lock ---- */

static struct key **bucket(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    return &ks->keys[id_hash(id) & (ks->nbuckets - 1)];
}

static struct key *find_locked(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    for (struct key *k = *bucket(ks, id); k; k = k->hnext)
        if (memcmp(k->id, id, KMS_UUID_LEN) == 0)
            return k;
    return NULL;
}

static void lru_remove(struct kms_keystore *ks, struct key *k)
{
    if (k->lprev)
        k->lprev->lnext = k->lnext;
    else
        ks->lru_head = k->lnext;
    if (k->lnext)
        k->lnext->lprev = k->lprev;
    else
        ks->lru_tail = k->lprev;
    k->lprev = k->lnext = NULL;
}

static void lru_front(struct kms_keystore *ks, struct key *k)
{
    k->lnext = ks->lru_head;
    k->lprev = NULL;
    if (ks->lru_head)
        ks->lru_head->lprev = k;
    ks->lru_head = k;
    if (!ks->lru_tail)
        ks->lru_tail = k;
}

/* Takes k out of the hash and the LRU; frees it (later) when nobody holds it. */
static void unlink_locked(struct kms_keystore *ks, struct key *k)
{
    struct key **p = bucket(ks, k->id);
    while (*p && *p != k)
        p = &(*p)->hnext;
    if (*p)
        *p = k->hnext;
    k->hnext = NULL;
    lru_remove(ks, k);
    k->linked = 0;
    ks->nkeys--;
    if (k->refs == 0) {
        k->hnext = ks->reaped;
        ks->reaped = k;
    }
}

static void link_locked(struct kms_keystore *ks, struct key *k)
{
    struct key **b = bucket(ks, k->id);
    k->hnext = *b;
    *b = k;
    lru_front(ks, k);
    k->linked = 1;
    ks->nkeys++;
    /* Over the bound: drop the least recently used entries nobody holds. */
    struct key *victim = ks->lru_tail;
    while (ks->nkeys > ks->cfg.key_cache && victim) {
        struct key *prev = victim->lprev;
        if (victim->refs == 0 && victim != k)
            unlink_locked(ks, victim);
        victim = prev;
    }
}

/* ---- uses of dropped entries, under ks->lock ---- */

static struct spare_uses *spare_slot(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    return &ks->spares[(size_t)(id_hash(id) >> 11) & (ks->nspares - 1)];
}

/*
 * Lets go of a dropped entry's uses: the last entry of its key keeps what is
 * left of them in the key's spare slot. The count of entries sharing them
 * (refs) changes only under the lock.
 */
static void use_release_locked(struct kms_keystore *ks, struct key *k)
{
    struct usage *u = k->use;
    k->use = NULL;
    if (!u || --u->refs > 0)
        return;
    if (u->remaining > 0) {
        struct spare_uses *s = spare_slot(ks, k->id);
        memcpy(s->id, k->id, KMS_UUID_LEN);
        s->vid = u->vid;
        s->remaining = u->remaining;
        s->block = u->block;
    }
    free(u);
}

/* A new entry of a key no other entry holds takes the uses its last one left. */
static void use_take_locked(struct kms_keystore *ks, struct key *k)
{
    struct spare_uses *s = spare_slot(ks, k->id);
    if (s->remaining == 0 || memcmp(s->id, k->id, KMS_UUID_LEN) != 0)
        return;
    k->use->vid = s->vid;
    k->use->n = 0;
    k->use->remaining = s->remaining;
    k->use->block = s->block;
    s->remaining = 0;
}

void kms_cache_reap(struct kms_keystore *ks)
{
    pthread_mutex_lock(&ks->lock);
    struct key *list = ks->reaped;
    ks->reaped = NULL;
    for (struct key *k = list; k; k = k->hnext)
        use_release_locked(ks, k);
    pthread_mutex_unlock(&ks->lock);
    while (list) {
        struct key *k = list;
        list = k->hnext;
        for (size_t i = 0; i < k->nversions; i++)
            if (k->versions[i].wrapped && k->versions[i].handle != CK_INVALID_HANDLE)
                kms_unwrapped_destroy(ks, k->versions[i].handle, k->versions[i].epoch);
        key_free(ks, k);
    }
}

/* ---- unknown ids ---- */

static size_t unknown_slot(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    return (size_t)(id_hash(id) >> 7) & (ks->nunknown - 1);
}

static int unknown_has_locked(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    size_t i = unknown_slot(ks, id);
    return ks->unknown_at[i] && kms_now() - ks->unknown_at[i] < UNKNOWN_TTL_SECONDS &&
           memcmp(ks->unknown[i], id, KMS_UUID_LEN) == 0;
}

static void unknown_forget_locked(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    size_t i = unknown_slot(ks, id);
    if (memcmp(ks->unknown[i], id, KMS_UUID_LEN) == 0)
        ks->unknown_at[i] = 0;
}

/* ---- entries ---- */

struct version *kms_version_locked(struct key *k, uint32_t vid)
{
    for (size_t i = 0; i < k->nversions; i++)
        if (k->versions[i].vid == vid)
            return &k->versions[i];
    return NULL;
}

static kms_err version_from_row(struct version *v, const struct kms_version_row *r)
{
    memset(v, 0, sizeof *v);
    v->vid = r->vid;
    v->n = r->n;
    v->created = r->created;
    v->rotation = r->rotation;
    v->reserved = r->reserved;
    v->bound = r->bound;
    v->root = r->root;
    v->handle = CK_INVALID_HANDLE;
    if (r->wrapped_len) {
        v->wrapped = malloc(r->wrapped_len);
        KMS_ENSURE(v->wrapped != NULL, KMS_ERR_INTERNAL, "out of memory");
        memcpy(v->wrapped, r->wrapped, r->wrapped_len);
        v->wrapped_len = r->wrapped_len;
    }
    if (r->public_key_len) {
        v->public_key = malloc(r->public_key_len);
        KMS_ENSURE(v->public_key != NULL, KMS_ERR_INTERNAL, "out of memory");
        memcpy(v->public_key, r->public_key, r->public_key_len);
        v->public_key_len = r->public_key_len;
    }
    return KMS_OK;
}

static kms_err add_version(struct key *k, const struct kms_version_row *r)
{
    struct version *v = realloc(k->versions, (k->nversions + 1) * sizeof *v);
    KMS_ENSURE(v != NULL, KMS_ERR_INTERNAL, "out of memory");
    k->versions = v;
    KMS_GUARD(version_from_row(&k->versions[k->nversions], r));
    k->nversions++;
    return KMS_OK;
}

static kms_err collect_version(void *arg, const struct kms_version_row *r)
{
    return add_version(arg, r);
}

static kms_err entry_new(struct kms_keystore *ks, struct kms_key_row *row, struct key **out)
{
    struct key *k = calloc(1, sizeof *k);
    KMS_ENSURE(k != NULL, KMS_ERR_INTERNAL, "out of memory");
    k->row = *row;
    memset(row, 0, sizeof *row);
    memcpy(k->id, k->row.id, KMS_UUID_LEN);
    kms_uuid_format(k->id, k->id_text);
    k->use = calloc(1, sizeof *k->use);
    if (!k->use) {
        kms_key_row_clear(&k->row);
        free(k);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    k->use->block = ks->cfg.usage_block;
    k->use->refs = 1;
    const char *policy = k->row.policy;
    if (!policy) {
        /* Most keys have the configured default: compiled once, shared. */
        k->policy = ks->default_policy;
        *out = k;
        return KMS_OK;
    }
    if (ks->cfg.compile_policy && *policy &&
        ks->cfg.compile_policy(ks->cfg.policy_arg, policy, strlen(policy), &k->policy) != KMS_OK) {
        /* Fail closed: a key whose policy does not compile allows nothing. */
        kms_warn("key %s: its policy does not compile (%s); it allows nothing", k->id_text,
                 kms_err_message());
        kms_err_clear();
        k->policy = NULL;
    }
    *out = k;
    return KMS_OK;
}

/*
 * Puts a freshly read entry in, in place of any older one: the older one's
 * unwrapped versions and this node's uses carry over.
 */
static void install_locked(struct kms_keystore *ks, struct key *k)
{
    struct key *old = find_locked(ks, k->id);
    if (old) {
        for (size_t i = 0; i < old->nversions; i++) {
            struct version *ov = &old->versions[i], *nv = kms_version_locked(k, ov->vid);
            if (nv && ov->handle != CK_INVALID_HANDLE && nv->handle == CK_INVALID_HANDLE) {
                nv->handle = ov->handle;
                nv->epoch = ov->epoch;
                ov->handle = CK_INVALID_HANDLE;
            }
            if (nv && ov->pkey && !nv->pkey) { /* the same stored key, decoded once */
                nv->pkey = ov->pkey;
                ov->pkey = NULL;
            }
        }
        /* The same uses: a request still holding old spends them with the new entry. */
        if (--k->use->refs == 0)
            free(k->use);
        k->use = old->use;
        k->use->refs++;
        unlink_locked(ks, old);
    } else {
        use_take_locked(ks, k);
    }
    unknown_forget_locked(ks, k->id);
    link_locked(ks, k);
}

struct grant_collect {
    struct kms_keystore *ks;
    struct key *k;
    int broken; /* a grant did not compile: the key keeps none */
};

static kms_err collect_grant(void *arg, const struct kms_grant_row *g)
{
    struct grant_collect *c = arg;
    if (c->broken)
        return KMS_OK;
    if (c->ks->cfg.add_grant(c->ks->cfg.policy_arg, &c->k->grants, g) != KMS_OK) {
        /* Fail closed: a key whose grants do not all compile grants nothing. */
        kms_warn("key %s: grant %s does not compile (%s); the key's grants allow nothing",
                 c->k->id_text, g->grant_id, kms_err_message());
        kms_err_clear();
        c->broken = 1;
    }
    return KMS_OK;
}

/* The key's grants, compiled into k->grants (read in the same snapshot as its row). */
static kms_err load_grants(struct kms_keystore *ks, struct kms_tx *tx, struct key *k)
{
    struct grant_collect c = {ks, k, 0};
    if (!ks->cfg.add_grant)
        return KMS_OK;
    KMS_GUARD(kms_store_grants_list(tx, k->id, NULL, KMS_GRANTS_PER_KEY, collect_grant, &c));
    if (c.broken && k->grants) {
        if (ks->cfg.free_grants)
            ks->cfg.free_grants(k->grants);
        k->grants = NULL;
    }
    return KMS_OK;
}

static kms_err load(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], struct key **out)
{
    struct kms_key_row row = {0};
    struct kms_tx *tx;
    struct key *k = NULL;

    KMS_GUARD(kms_store_begin(ks->store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_key_get(tx, id, &row);
    if (rc == KMS_OK)
        rc = entry_new(ks, &row, &k);
    if (rc == KMS_OK)
        rc = kms_store_versions(tx, id, collect_version, k);
    if (rc == KMS_OK)
        rc = load_grants(ks, tx, k);
    /* The same snapshot: every change up to it is in the rows just read. */
    if (rc == KMS_OK)
        rc = kms_store_change_head(tx, &k->seq);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    kms_key_row_clear(&row);
    if (rc != KMS_OK) {
        if (k)
            key_free(ks, k);
        return rc;
    }
    *out = k;
    return KMS_OK;
}

kms_err kms_key_get(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], struct key **out)
{
    struct key *k;

    pthread_mutex_lock(&ks->lock);
    k = find_locked(ks, id);
    if (k && !k->stale) {
        ks->cache_hits++;
        k->refs++;
        lru_remove(ks, k);
        lru_front(ks, k);
        pthread_mutex_unlock(&ks->lock);
        *out = k;
        return KMS_OK;
    }
    int unknown = !k && unknown_has_locked(ks, id);
    if (unknown)
        ks->cache_hits++;
    else
        ks->cache_misses++;
    pthread_mutex_unlock(&ks->lock);
    if (unknown)
        return KMS_ERR_NOT_FOUND;

    pthread_mutex_lock(&ks->lock);
    uint64_t gen = ks->change_gen;
    pthread_mutex_unlock(&ks->lock);
    kms_err rc = load(ks, id, &k);
    if (rc == KMS_ERR_NOT_FOUND) {
        pthread_mutex_lock(&ks->lock);
        /* Unless it was made here meanwhile. */
        if (!find_locked(ks, id) && gen == ks->change_gen) {
            size_t i = unknown_slot(ks, id);
            memcpy(ks->unknown[i], id, KMS_UUID_LEN);
            ks->unknown_at[i] = kms_now();
        }
        pthread_mutex_unlock(&ks->lock);
        return KMS_ERR_NOT_FOUND;
    }
    KMS_GUARD(rc);
    pthread_mutex_lock(&ks->lock);
    install_locked(ks, k);
    /* Something changed while it was read: use it once, read it again next time. */
    k->stale = gen != ks->change_gen;
    k->refs++;
    pthread_mutex_unlock(&ks->lock);
    kms_cache_reap(ks);
    *out = k;
    return KMS_OK;
}

void kms_keystore_cache_counts(struct kms_keystore *ks, uint64_t *hits, uint64_t *misses)
{
    pthread_mutex_lock(&ks->lock);
    *hits = ks->cache_hits;
    *misses = ks->cache_misses;
    pthread_mutex_unlock(&ks->lock);
}

void kms_key_put(struct kms_keystore *ks, struct key *k)
{
    int reap = 0;
    if (!k)
        return;
    pthread_mutex_lock(&ks->lock);
    if (--k->refs == 0 && !k->linked) {
        k->hnext = ks->reaped;
        ks->reaped = k;
        reap = 1;
    }
    pthread_mutex_unlock(&ks->lock);
    if (reap)
        kms_cache_reap(ks);
}

kms_err kms_cache_install(struct kms_keystore *ks, struct kms_key_row *r,
                          const struct kms_version_row *v, uint64_t uses, int64_t seq)
{
    struct key *k;
    KMS_GUARD(entry_new(ks, r, &k));
    k->seq = seq;
    if (add_version(k, v) != KMS_OK) {
        key_free(ks, k);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    pthread_mutex_lock(&ks->lock);
    install_locked(ks, k);
    k->use->vid = v->vid;
    k->use->n = v->n;
    k->use->remaining = uses;
    k->use->granted = kms_now();
    pthread_mutex_unlock(&ks->lock);
    kms_cache_reap(ks);
    return KMS_OK;
}

kms_err kms_key_learn_version(struct kms_keystore *ks, struct key *k, uint32_t vid)
{
    struct kms_version_row *r;
    struct kms_tx *tx;
    int64_t now = kms_now();

    pthread_mutex_lock(&ks->lock);
    int recent = k->missed_vid == vid && now - k->missed_at < MISSED_VERSION_SECONDS;
    pthread_mutex_unlock(&ks->lock);
    if (recent)
        return KMS_ERR_NOT_FOUND;
    r = malloc(sizeof *r);
    KMS_ENSURE(r != NULL, KMS_ERR_INTERNAL, "out of memory");
    kms_err rc = kms_store_begin(ks->store, KMS_TX_READ, &tx);
    if (rc == KMS_OK) {
        rc = kms_store_version_get(tx, k->id, vid, r);
        if (rc == KMS_OK)
            rc = kms_store_commit(tx);
        kms_store_rollback(tx);
    }
    pthread_mutex_lock(&ks->lock);
    if (rc == KMS_OK && !kms_version_locked(k, vid)) {
        rc = add_version(k, r);
        k->stale = 1; /* its row has changed too: read it again at the next use */
    } else if (rc == KMS_ERR_NOT_FOUND) {
        k->missed_vid = vid;
        k->missed_at = now;
    }
    pthread_mutex_unlock(&ks->lock);
    free(r);
    return rc;
}

void kms_cache_key_changed(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    kms_cache_key_changed_at(ks, id, INT64_MAX);
}

void kms_cache_key_changed_at(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], int64_t seq)
{
    pthread_mutex_lock(&ks->lock);
    struct key *k = find_locked(ks, id);
    if (k && k->seq < seq)
        k->stale = 1;
    unknown_forget_locked(ks, id);
    ks->change_gen++;
    pthread_mutex_unlock(&ks->lock);
}

void kms_cache_all_changed(struct kms_keystore *ks)
{
    pthread_mutex_lock(&ks->lock);
    for (struct key *k = ks->lru_head; k; k = k->lnext)
        k->stale = 1;
    ks->change_gen++;
    memset(ks->unknown_at, 0, ks->nunknown * sizeof *ks->unknown_at);
    aliases_clear_locked(ks);
    pthread_mutex_unlock(&ks->lock);
}

/* ---- aliases ---- */

static struct alias_entry **alias_bucket(struct kms_keystore *ks, const char *name)
{
    return &ks->aliases[name_hash(name) & (ks->nalias_buckets - 1)];
}

/* The entry of an alias in its bucket, or the bucket's end. */
static struct alias_entry **alias_find_locked(struct kms_keystore *ks, const char *name)
{
    struct alias_entry **p = alias_bucket(ks, name);
    while (*p && strcmp((*p)->name, name) != 0)
        p = &(*p)->hnext;
    return p;
}

void kms_cache_alias_changed(struct kms_keystore *ks, const char *name)
{
    pthread_mutex_lock(&ks->lock);
    ks->change_gen++;
    struct alias_entry **p = alias_find_locked(ks, name);
    if (*p) {
        struct alias_entry *a = *p;
        *p = a->hnext;
        free(a);
        ks->naliases--;
    }
    pthread_mutex_unlock(&ks->lock);
}

kms_err kms_alias_lookup(struct kms_keystore *ks, const char *name, struct kms_alias_row *out)
{
    struct kms_tx *tx;
    pthread_mutex_lock(&ks->lock);
    for (struct alias_entry *a = *alias_bucket(ks, name); a; a = a->hnext) {
        if (strcmp(a->name, name) == 0) {
            *out = a->row;
            pthread_mutex_unlock(&ks->lock);
            return KMS_OK;
        }
    }
    uint64_t gen = ks->change_gen;
    pthread_mutex_unlock(&ks->lock);
    KMS_ENSURE(strlen(name) <= KMS_ALIAS_MAX, KMS_ERR_NOT_FOUND, "no such alias");
    KMS_GUARD(kms_store_begin(ks->store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_alias_get(tx, name, out);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    KMS_GUARD(rc);
    struct alias_entry *a = calloc(1, sizeof *a);
    if (!a)
        return KMS_OK; /* answered; just not kept */
    snprintf(a->name, sizeof a->name, "%s", name);
    a->row = *out;
    pthread_mutex_lock(&ks->lock);
    /*
     * Changed while read: answered, not kept. Kept already by a request that
     * read it at the same time: one entry only, for a change removes one (a
     * second would survive it and answer the old target from then on).
     */
    if (gen != ks->change_gen || *alias_find_locked(ks, name)) {
        pthread_mutex_unlock(&ks->lock);
        free(a);
        return KMS_OK;
    }
    if (ks->naliases >= (size_t)ks->cfg.key_cache * 4)
        aliases_clear_locked(ks);
    struct alias_entry **b = alias_bucket(ks, name);
    a->hnext = *b;
    *b = a;
    ks->naliases++;
    pthread_mutex_unlock(&ks->lock);
    return KMS_OK;
}
