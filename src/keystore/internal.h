/*
 * Key store internals, shared by its files:
 *
 *   cache.c     the in-memory keys (hash + LRU), aliases and unknown ids
 *   keystore.c  open and close, lookups, key changes, aliases
 *   rotation.c  new versions: creation, rotation, the rotation settings
 *   crypto.c    wrapping and unwrapping under versions, usage reservations
 *   roots.c     root keys: made by init, found at open
 *   background.c the thread: change feed, due rotations and deletions, blocks ahead
 *   migrate.c   import of the token-only layout of earlier releases
 *   grants.c    grants: their changes and lists
 *   tags.c      a key's tags, in the database only (nothing caches them)
 *
 * Lock order (each lock is only ever taken with those above it held, never
 * those below; none is held across a database or token call unless said):
 *
 *   1. ks->change      serialises this node's key changes with the background
 *                      thread's (held across database transactions)
 *   2. hsm holder lock kms_hsm_hold: unwrapping into the holder session
 *   3. ks->lock        the caches and every cached entry's fields; never
 *                      held across a database or token call
 *   4. ks->queue_lock  the blocks-ahead queue and the background thread's wakeups
 *                      (the change feed's thread takes only this one, and
 *                      never while it waits on the database)
 */
#ifndef P11KMS_KEYSTORE_INTERNAL_H
#define P11KMS_KEYSTORE_INTERNAL_H

#include <openssl/types.h>
#include <pthread.h>

#include "keystore/keystore.h"

#define KMS_ROOTS_MAX 8
#define KMS_TOKEN_KEY_ID_LEN (KMS_UUID_LEN + 4) /* CKA_ID of a token-resident version */

/* One version of a cached key. */
struct version {
    uint32_t vid;
    uint32_t n;
    int64_t created;
    int rotation; /* enum kms_store_rotation */
    uint64_t reserved;
    uint64_t bound;
    uint32_t root;
    uint8_t *wrapped; /* malloc'd; NULL for a token-resident version */
    size_t wrapped_len;
    uint8_t *public_key; /* malloc'd DER SubjectPublicKeyInfo; NULL but for asymmetric keys */
    size_t public_key_len;
    EVP_PKEY *pkey; /* public_key decoded on first use (asym.c), one reference; else NULL */
    /* The unwrapped session object (or found token object) and the epoch it belongs to. */
    CK_OBJECT_HANDLE handle;
    unsigned long epoch;
};

/*
 * This node's uses of a key's current version, reserved in the database. One
 * per key, shared by the entry and any older entry of the same key a request
 * still holds, so a block is never stranded on an entry being replaced.
 */
struct usage {
    uint32_t vid;
    uint32_t n; /* vid's ordinal, 0 when not known */
    uint64_t remaining;
    uint64_t block;       /* grows for a busy key (crypto.c) */
    int64_t granted;      /* when the last block was reserved */
    int refilling;        /* a block ahead is queued or being reserved */
    int reserving;        /* a request is reserving a block it ran out of: the others wait */
    int64_t ahead_failed; /* when reserving ahead last failed: not queued again that second */
    int refs;             /* entries pointing here */
};

/*
 * The uses an entry dropped from the cache still had, kept (by key id, one
 * slot each, under ks->lock) for the entry read again: without them every
 * cache miss of GenerateDataKey would reserve a new block (a database write)
 * and waste the rest of the old one. A slot is emptied when taken, so a use
 * is spent at most once; one overwritten only wastes uses, as a restart does.
 */
struct spare_uses {
    uint8_t id[KMS_UUID_LEN];
    uint32_t vid;
    uint64_t remaining; /* 0: the slot is empty */
    uint64_t block;
};

/* A key held in memory. Fields are read and written under ks->lock. */
struct key {
    uint8_t id[KMS_UUID_LEN];
    char id_text[KMS_UUID_TEXT_LEN + 1];
    struct kms_key_row row;
    struct version *versions; /* in ordinal order */
    size_t nversions;
    void *policy; /* compiled; NULL when it does not compile (allows nothing) */
    void *grants; /* compiled by cfg.add_grant; NULL: none */
    /* This node's uses, shared by the entries of one key (an entry read again takes them). */
    struct usage *use;
    /* A version looked up in the database and not found, and when. */
    uint32_t missed_vid;
    int64_t missed_at;
    /*
     * The change sequence its rows reflect: they were read (or, for a key this
     * node created, written) in a transaction that saw every change up to
     * seq. A change seen later with a seq no higher is already in them. 0: unknown.
     */
    int64_t seq;
    int refs;   /* requests holding it; an entry is freed only at 0 */
    int stale;  /* changed in the database: read again at the next use */
    int linked; /* in the hash and the LRU */
    struct key *hnext;
    struct key *lprev, *lnext; /* LRU: head is the most recently used */
};

struct alias_entry {
    char name[KMS_ALIAS_MAX + 1];
    struct kms_alias_row row;
    struct alias_entry *hnext;
};

struct root {
    uint32_t id;
    uint8_t cka_id[KMS_ROOT_ID_LEN];
    int state;
    CK_OBJECT_HANDLE handle;
    unsigned long epoch; /* the handle is re-found after a re-login */
};

struct kms_keystore {
    struct kms_hsm *hsm;
    struct kms_store *store;
    struct kms_keystore_config cfg;
    char region[64];
    char account[32];
    char arn_prefix[128]; /* arn:aws:kms:<region>:<account>: */

    pthread_mutex_t change;  /* lock 1 */
    pthread_mutex_t lock;    /* lock 3 */
    pthread_cond_t reserved; /* with lock: a usage's reserving ended */

    /* cache.c, under lock */
    struct key **keys; /* hash buckets */
    size_t nbuckets;
    size_t nkeys;
    struct key *lru_head, *lru_tail;
    struct key *reaped;  /* dropped entries no request holds, for kms_cache_reap */
    uint64_t change_gen; /* bumped by every change seen: a read racing one is not kept */
    uint64_t cache_hits, cache_misses; /* kms_key_get: from memory, or read from the database */
    void *default_policy; /* cfg.default_policy compiled, shared by keys without their own */
    struct alias_entry **aliases;
    size_t nalias_buckets;
    size_t naliases;
    uint8_t (*unknown)[KMS_UUID_LEN]; /* negative cache: open slots by hash */
    int64_t *unknown_at;
    size_t nunknown;
    struct spare_uses *spares; /* uses of dropped entries: open slots by hash */
    size_t nspares;

    struct root roots[KMS_ROOTS_MAX];
    size_t nroots;
    size_t current_root; /* index into roots */

    /* counts for the metrics, refreshed by the background thread */
    size_t count_keys, count_versions;

    /* background.c */
    int64_t seen_seq; /* the change sequence read so far */
    int poll_failing; /* the last read of the change sequence failed (said once) */
    pthread_t thread;
    int running;
    int stopping;
    pthread_mutex_t queue_lock; /* lock 4 */
    pthread_cond_t wake;
    /* The change feed: a thread waiting on kms_store_wait_change. */
    pthread_t listener;
    int listening;    /* the listener thread was started */
    int feed_changed; /* under queue_lock: a change was announced, read the sequence now */
    uint8_t refills[64][KMS_UUID_LEN];
    size_t nrefills;
    int64_t last_prune;
    int64_t last_count;
};

int64_t kms_now(void);

/* ---- cache.c ---- */
kms_err kms_cache_init(struct kms_keystore *ks);
void kms_cache_free(struct kms_keystore *ks);
/*
 * The key with this id, held (release with kms_key_put): from memory, else
 * read from the database (one lookup by primary key) and kept. A key the
 * database lacks is remembered as unknown (KMS_ERR_NOT_FOUND, nothing set);
 * a destroyed key is returned (row.state KMS_STORE_DESTROYED).
 */
kms_err kms_key_get(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], struct key **out);
void kms_key_put(struct kms_keystore *ks, struct key *k);
/* Marks a key changed: the next kms_key_get reads it again. */
void kms_cache_key_changed(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN]);
/*
 * The change sequence says the key changed at seq: as kms_cache_key_changed,
 * unless the entry's rows already reflect it (this node's own change coming
 * back, or one read since), which then stays usable without the database.
 */
void kms_cache_key_changed_at(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], int64_t seq);
void kms_cache_alias_changed(struct kms_keystore *ks, const char *name);
/* Everything may have changed (the change sequence was lost): every entry is read again. */
void kms_cache_all_changed(struct kms_keystore *ks);
/* The alias row, from memory or the database; KMS_ERR_NOT_FOUND (nothing set) when none. */
kms_err kms_alias_lookup(struct kms_keystore *ks, const char *name, struct kms_alias_row *out);
/* A version of a key under ks->lock, or NULL. */
struct version *kms_version_locked(struct key *k, uint32_t vid);
/* Reads a version the key's entry lacks (made elsewhere since it was read); under no lock. */
kms_err kms_key_learn_version(struct kms_keystore *ks, struct key *k, uint32_t vid);
/*
 * Installs a key this node has just written (no read back), in a transaction
 * that saw the change sequence up to seq; takes r's allocations.
 */
kms_err kms_cache_install(struct kms_keystore *ks, struct kms_key_row *r,
                          const struct kms_version_row *v, uint64_t uses, int64_t seq);
/* Session objects of dropped entries are destroyed by the caller of this, under no lock. */
void kms_cache_reap(struct kms_keystore *ks);

/* ---- keystore.c ---- */
/* Resolves a key id, key ARN (an alias name or alias ARN with KMS_REF_ALIAS) to a key id. */
kms_err kms_resolve_id(struct kms_keystore *ks, const char *ref, int how, uint8_t id[KMS_UUID_LEN]);
/* kms_resolve_id, then the held key; a destroyed key is NotFound unless KMS_REF_DESTROYED. */
kms_err kms_resolve(struct kms_keystore *ks, const char *ref, int how, struct key **out);
kms_err kms_info_copy_locked(struct kms_keystore *ks, const struct key *k,
                             struct kms_key_info *out);
/* The same without the description (left NULL): no allocation, for the cryptographic paths. */
kms_err kms_info_brief_locked(struct kms_keystore *ks, const struct key *k,
                              struct kms_key_info *out);
kms_err kms_key_usable_locked(struct kms_keystore *ks, const struct key *k);
/*
 * One change to a key in one write transaction: fn changes the row read
 * under the database's write lock (or fails, and nothing is written).
 */
kms_err kms_key_change(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                       const char *operation, int automatic,
                       kms_err (*fn)(struct kms_keystore *ks, struct kms_tx *tx,
                                     struct kms_key_row *r, void *arg),
                       void *arg);
/*
 * Commits a change's write transaction the audited way: its intent written
 * ahead (KMS_ERR_DEPENDENCY_TIMEOUT, nothing committed, when it cannot be),
 * the request id stored in the transaction, then the commit and its outcome.
 * The caller rolls back after a failure, as after kms_store_commit's.
 */
kms_err kms_change_commit(struct kms_keystore *ks, struct kms_tx *tx, struct kms_change_event *e);
/* An event naming a key (by id) or an alias; for kms_change_commit. */
void kms_change_event_init(struct kms_keystore *ks, struct kms_change_event *e,
                           const char *operation, int automatic, const uint8_t *key_id,
                           const char *alias);

/* ---- rotation.c ---- */
/* A new version of a key when still due (reason: KMS_ROTATE_*); from: the usage-bound version. */
kms_err kms_key_rotate(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], int reason,
                       uint32_t from);
enum { KMS_ROTATE_SCHEDULE = 1, KMS_ROTATE_USAGE = 2, KMS_ROTATE_DEMAND = 3 };
/* Whether an on-demand rotation of the key may go ahead (state, token residence, limit). */
kms_err kms_rotation_allowed(struct kms_keystore *ks, const struct kms_key_row *r);
/* Asymmetric and HMAC keys are never rotated (as in AWS): KMS_ERR_UNSUPPORTED. */
kms_err kms_rotation_spec_check(struct kms_keystore *ks, const struct kms_key_row *r);
/*
 * A new wrapped version of a key of spec and usage (keyspec.h) under the
 * current root, to be stored as version vid/n of key.
 */
kms_err kms_version_make(struct kms_keystore *ks, int spec, int usage, struct kms_version_row *v);
/* A random vid no version of the key has, read in tx. */
kms_err kms_version_new_vid(struct kms_tx *tx, const uint8_t id[KMS_UUID_LEN], uint32_t *out);

/* ---- crypto.c ---- */
/* Reserves the blocks of uses queued by requests; the background thread's. */
void kms_keystore_refill(struct kms_keystore *ks);
/* Destroys a session object of the holder (dropped cache entries). */
void kms_unwrapped_destroy(struct kms_keystore *ks, CK_OBJECT_HANDLE h, unsigned long epoch);
/*
 * Runs fn with the token session s and the handle of version vid of k
 * (unwrapped now when this node has none), once more with a fresh handle when
 * the token lost the one it had. fn's failure is returned as it is.
 */
kms_err kms_with_version(struct kms_keystore *ks, struct key *k, uint32_t vid,
                         kms_err (*fn)(void *arg, struct kms_session *s, CK_OBJECT_HANDLE h),
                         void *arg);

/* ---- roots.c ---- */
kms_err kms_roots_load(struct kms_keystore *ks);
/* The handle of a root (re-found after a new epoch). */
kms_err kms_root_handle(struct kms_keystore *ks, uint32_t id, CK_OBJECT_HANDLE *out);
/* Every root's handle is found again at its next use (one was refused). */
void kms_root_forget(struct kms_keystore *ks);
/* The current root's id. */
uint32_t kms_root_current(struct kms_keystore *ks);

/* ---- background.c ---- */
/*
 * Reads the change sequence since the last look and drops what changed;
 * KMS_OK, or the database's failure (logged once while it lasts, not set).
 */
kms_err kms_changes_poll(struct kms_keystore *ks);
void kms_token_key_id(const uint8_t id[KMS_UUID_LEN], uint32_t vid,
                      uint8_t out[KMS_TOKEN_KEY_ID_LEN]);

#endif
