/*
 * What an engine of the store provides (private to src/store/). store.c
 * picks the engine by the URL's scheme and forwards every call of store.h to
 * the engine's table; an engine never sees another's structures.
 *
 * Each engine's store and transaction embed the bases below as their first
 * member, so the engine turns the pointer it gets back into its own structure
 * with a cast; store.c reads only the engine pointer and the name.
 */
#ifndef P11KMS_STORE_ENGINE_H
#define P11KMS_STORE_ENGINE_H

#include "store/store.h"

struct kms_store_engine;

struct kms_store {
    const struct kms_store_engine *engine;
    char *name; /* the URL without secrets, for logs; the engine's, freed by its close */
    /* kms_store_observe's; atomic: set while the key store's threads run */
    kms_store_observer observe;
    void *observe_arg;
};

struct kms_tx {
    const struct kms_store_engine *engine;
    /* store.c's, once begun: for the observer, at the end */
    struct kms_store *store;
    int64_t began_ns; /* 0: ended (or observed already) */
    int write;
    uint64_t faults; /* the thread's count of kms_store_failed faults when it began */
};

struct kms_store_engine {
    /* cfg->url has the engine's scheme; on success *out is the engine's store */
    kms_err (*open)(const struct kms_store_config *cfg, struct kms_store **out);
    void (*close)(struct kms_store *st);
    kms_err (*database_version)(struct kms_store *st, int *out);
    kms_err (*backup)(struct kms_store *st, const char *path);

    kms_err (*begin)(struct kms_store *st, int mode, struct kms_tx **out);
    kms_err (*commit)(struct kms_tx *tx); /* tx is not NULL */
    void (*rollback)(struct kms_tx *tx);  /* tx is not NULL */

    kms_err (*key_get)(struct kms_tx *tx, const uint8_t id[KMS_UUID_LEN], struct kms_key_row *out);
    kms_err (*key_insert)(struct kms_tx *tx, const struct kms_key_row *r);
    kms_err (*key_update)(struct kms_tx *tx, struct kms_key_row *r);
    kms_err (*keys_list)(struct kms_tx *tx, const uint8_t *from, size_t limit,
                         kms_err (*fn)(void *arg, const struct kms_key_row *r), void *arg);
    kms_err (*key_count)(struct kms_tx *tx, size_t *keys, size_t *versions);
    kms_err (*keys_due)(struct kms_tx *tx, int64_t now, size_t limit,
                        kms_err (*fn)(void *arg, const uint8_t id[KMS_UUID_LEN], int what),
                        void *arg);

    kms_err (*version_get)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], uint32_t vid,
                           struct kms_version_row *out);
    kms_err (*version_insert)(struct kms_tx *tx, const struct kms_version_row *r);
    kms_err (*versions)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                        kms_err (*fn)(void *arg, const struct kms_version_row *r), void *arg);
    kms_err (*version_max_n)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], uint32_t *out);
    kms_err (*reserve)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], uint32_t vid,
                       uint64_t want, uint64_t *granted, uint64_t *reserved);
    kms_err (*versions_delete)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN]);

    kms_err (*alias_get)(struct kms_tx *tx, const char *name, struct kms_alias_row *out);
    kms_err (*alias_insert)(struct kms_tx *tx, const struct kms_alias_row *r);
    kms_err (*alias_update)(struct kms_tx *tx, const struct kms_alias_row *r);
    kms_err (*alias_delete)(struct kms_tx *tx, const char *name);
    kms_err (*aliases_of_key_delete)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                     void (*fn)(void *arg, const char *name), void *arg);
    kms_err (*aliases_list)(struct kms_tx *tx, const char *from, const uint8_t *key, size_t limit,
                            kms_err (*fn)(void *arg, const struct kms_alias_row *r), void *arg);

    /* ---- grants ---- */
    kms_err (*grant_insert)(struct kms_tx *tx, const struct kms_grant_row *r);
    kms_err (*grant_get)(struct kms_tx *tx, const char *grant_id, struct kms_grant_row *out);
    kms_err (*grant_delete)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                            const char *grant_id);
    kms_err (*grants_list)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *from,
                           size_t limit, kms_err (*fn)(void *arg, const struct kms_grant_row *r),
                           void *arg);
    kms_err (*grants_retirable)(struct kms_tx *tx, const char *retiring, const char *from,
                                size_t limit,
                                kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg);
    kms_err (*grants_named)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *name,
                            kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg);
    kms_err (*grant_count)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], size_t *out);
    kms_err (*grants_delete)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN]);

    kms_err (*roots)(struct kms_tx *tx, kms_err (*fn)(void *arg, const struct kms_root_row *r),
                     void *arg);
    kms_err (*root_insert)(struct kms_tx *tx, struct kms_root_row *r);

    kms_err (*meta_get)(struct kms_tx *tx, const char *name, char *out, size_t n);
    kms_err (*meta_set)(struct kms_tx *tx, const char *name, const char *value);

    kms_err (*change_request)(struct kms_tx *tx, const char *request_id);
    kms_err (*change_request_find)(struct kms_tx *tx, const char *request_id, int *found);
    kms_err (*audit_head_get)(struct kms_tx *tx, const char *node, struct kms_audit_head_row *out);
    kms_err (*audit_head_put)(struct kms_tx *tx, const struct kms_audit_head_row *r);

    kms_err (*note_change)(struct kms_tx *tx, int kind, const uint8_t *id, const char *name);
    kms_err (*change_head)(struct kms_tx *tx, int64_t *out);
    kms_err (*change_tail)(struct kms_tx *tx, int64_t *out);
    kms_err (*changes)(struct kms_tx *tx, int64_t after, size_t limit,
                       kms_err (*fn)(void *arg, const struct kms_change *c), void *arg);
    kms_err (*changes_prune)(struct kms_tx *tx, int64_t before);

    /* NULL: no feed (kms_store_wait_change answers KMS_ERR_UNSUPPORTED) */
    kms_err (*wait_change)(struct kms_store *st, unsigned timeout_ms, int *changed);
    void (*wake)(struct kms_store *st);
    /* NULL: the engine's URLs hold no secret */
    int (*url_has_secret)(const char *url);

    /* ---- tags ---- */
    kms_err (*tag_put)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *tag_key,
                       const char *tag_value);
    kms_err (*tag_delete)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *tag_key);
    kms_err (*tags_list)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *from,
                         size_t limit,
                         kms_err (*fn)(void *arg, const char *tag_key, const char *tag_value),
                         void *arg);
    kms_err (*tag_count)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], size_t *out);
    kms_err (*tags_delete)(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN]);
};

extern const struct kms_store_engine kms_store_sqlite;
extern const struct kms_store_engine kms_store_pg;

/*
 * Whether a database at schema version have can be used in mode (store.c):
 * a newer one never, an older or empty one only to migrate it (KMS_STORE_INIT).
 * The refusal names the database and says what to run, the same words for
 * every engine. KMS_OK when have is this binary's version, or older in INIT.
 */
KMS_MUST_CHECK kms_err kms_store_schema_usable(const char *name, int have, int mode);

/*
 * The engines pass every database error through this, classified (e): any
 * but a conflict (KMS_ERR_ALREADY_EXISTS, a duplicate key) means the database
 * failed, and the transaction the calling thread has open then counts as
 * failed when it ends (store.c). Returns e.
 */
kms_err kms_store_failed(kms_err e);

/*
 * After a committed schema check from version have (this binary's is want):
 * the one line a migration logs; nothing when there was none to make.
 */
void kms_store_log_migration(const char *name, int have, int want);

#endif
