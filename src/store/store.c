/*
 * store.h's calls, forwarded to the engine the database URL names
 * (engine.h): sqlite:PATH to store_sqlite.c, postgresql:// or postgres://
 * (any libpq connection URI) to store_pg.c. What every engine shares lives
 * here too: the schema version, the words that refuse a schema and the line
 * a migration logs.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "store/engine.h"
#include "store/schema.h"

static const struct {
    const char *scheme;
    const struct kms_store_engine *engine;
} engines[] = {
    {"sqlite:", &kms_store_sqlite},
    {"postgresql://", &kms_store_pg},
    {"postgres://", &kms_store_pg},
};

static const struct kms_store_engine *engine_of(const char *url)
{
    for (size_t i = 0; url && i < sizeof engines / sizeof engines[0]; i++)
        if (strncmp(url, engines[i].scheme, strlen(engines[i].scheme)) == 0)
            return engines[i].engine;
    return NULL;
}

kms_err kms_store_open(const struct kms_store_config *cfg, struct kms_store **out)
{
    const struct kms_store_engine *e = engine_of(cfg->url);
    KMS_ENSURE(e != NULL, KMS_ERR_VALIDATION,
               "database must be sqlite:PATH or a PostgreSQL URL (postgresql://...)");
    KMS_ENSURE(cfg->pool_size <= KMS_STORE_POOL_MAX, KMS_ERR_VALIDATION,
               "database_pool must be a number from 1 to %d", KMS_STORE_POOL_MAX);
    return e->open(cfg, out);
}

int kms_store_url_has_secret(const char *url)
{
    const struct kms_store_engine *e = engine_of(url);
    return e && e->url_has_secret ? e->url_has_secret(url) : 0;
}

void kms_store_close(struct kms_store *st)
{
    if (st)
        st->engine->close(st);
}

const char *kms_store_name(const struct kms_store *st)
{
    return st->name;
}

int kms_store_schema_version(void)
{
    return kms_schema_count();
}

kms_err kms_store_schema_usable(const char *name, int have, int mode)
{
    int want = kms_schema_count();
    KMS_ENSURE(have <= want, KMS_ERR_INTERNAL,
               "the database %s has schema version %d, newer than this p11kmsd's (%d): run the "
               "release that wrote it, or a newer one",
               name, have, want);
    if (have == want)
        return KMS_OK;
    KMS_ENSURE(mode == KMS_STORE_INIT, KMS_ERR_INTERNAL,
               have == 0 ? "the database %s is not initialised: run p11kmsd init --config FILE"
                         : "the database %s has schema version %d, older than this p11kmsd's "
                           "(%d): run p11kmsd init --config FILE to migrate it",
               name, have, want);
    return KMS_OK;
}

void kms_store_log_migration(const char *name, int have, int want)
{
    if (have >= want)
        return; /* nothing migrated, or another process did it meanwhile */
    if (have == 0)
        kms_info("database %s: schema made at version %d", name, want);
    else
        kms_info("database %s: schema migrated from version %d to %d", name, have, want);
}

kms_err kms_store_database_version(struct kms_store *st, int *out)
{
    return st->engine->database_version(st, out);
}

kms_err kms_store_backup(struct kms_store *st, const char *path)
{
    return st->engine->backup(st, path);
}

/* ---- transactions ---- */

void kms_store_observe(struct kms_store *st, kms_store_observer fn, void *arg)
{
    __atomic_store_n(&st->observe_arg, arg, __ATOMIC_RELAXED);
    __atomic_store_n(&st->observe, fn, __ATOMIC_RELEASE);
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Statements the database failed on this thread (kms_store_failed). */
static __thread uint64_t thread_faults;

kms_err kms_store_failed(kms_err e)
{
    if (e != KMS_ERR_ALREADY_EXISTS)
        thread_faults++;
    return e;
}

static void observe(struct kms_store *st, int write, int failed, int64_t began)
{
    kms_store_observer fn = __atomic_load_n(&st->observe, __ATOMIC_ACQUIRE);
    int64_t ns = now_ns() - began;
    if (fn)
        fn(__atomic_load_n(&st->observe_arg, __ATOMIC_RELAXED), write, failed,
           ns > 0 ? (uint64_t)ns : 0);
}

/*
 * A transaction ends: told once, whichever of commit and rollback comes
 * first; failed when it could not commit or the database failed one of its
 * statements.
 */
static void ended(struct kms_tx *tx, int failed)
{
    if (!tx->began_ns)
        return;
    observe(tx->store, tx->write, failed || tx->faults != thread_faults, tx->began_ns);
    tx->began_ns = 0;
}

kms_err kms_store_begin(struct kms_store *st, int mode, struct kms_tx **out)
{
    /*
     * NULL unless a transaction is open: a caller that rolls back after a
     * failed begin (kms_changes_poll does) then rolls back nothing. The
     * engines leave *out alone on failure, so it was whatever the caller's
     * stack held, and a node crashed (SIGSEGV) at its first poll after the
     * database went away (tests/integration/test_cluster_pg.py).
     */
    *out = NULL;
    int64_t began = now_ns();
    kms_err rc = st->engine->begin(st, mode, out);
    if (rc != KMS_OK) {
        observe(st, mode == KMS_TX_WRITE, 1, began);
        return rc;
    }
    (*out)->store = st;
    (*out)->write = mode == KMS_TX_WRITE;
    (*out)->began_ns = began ? began : 1;
    (*out)->faults = thread_faults;
    return KMS_OK;
}

kms_err kms_store_commit(struct kms_tx *tx)
{
    KMS_ENSURE(tx != NULL, KMS_ERR_INTERNAL, "no transaction to commit");
    kms_err rc = tx->engine->commit(tx);
    ended(tx, rc != KMS_OK);
    return rc;
}

void kms_store_rollback(struct kms_tx *tx)
{
    if (!tx)
        return;
    ended(tx, 0);
    tx->engine->rollback(tx);
}

/* ---- keys ---- */

void kms_key_row_clear(struct kms_key_row *r)
{
    free(r->description);
    free(r->policy);
    memset(r, 0, sizeof *r);
}

kms_err kms_store_key_get(struct kms_tx *tx, const uint8_t id[KMS_UUID_LEN],
                          struct kms_key_row *out)
{
    return tx->engine->key_get(tx, id, out);
}

kms_err kms_store_key_insert(struct kms_tx *tx, const struct kms_key_row *r)
{
    return tx->engine->key_insert(tx, r);
}

kms_err kms_store_key_update(struct kms_tx *tx, struct kms_key_row *r)
{
    return tx->engine->key_update(tx, r);
}

kms_err kms_store_keys_list(struct kms_tx *tx, const uint8_t *from, size_t limit,
                            kms_err (*fn)(void *arg, const struct kms_key_row *r), void *arg)
{
    return tx->engine->keys_list(tx, from, limit, fn, arg);
}

kms_err kms_store_key_count(struct kms_tx *tx, size_t *keys, size_t *versions)
{
    return tx->engine->key_count(tx, keys, versions);
}

kms_err kms_store_keys_due(struct kms_tx *tx, int64_t now, size_t limit,
                           kms_err (*fn)(void *arg, const uint8_t id[KMS_UUID_LEN], int what),
                           void *arg)
{
    return tx->engine->keys_due(tx, now, limit, fn, arg);
}

/* ---- versions ---- */

kms_err kms_store_version_get(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], uint32_t vid,
                              struct kms_version_row *out)
{
    return tx->engine->version_get(tx, key, vid, out);
}

kms_err kms_store_version_insert(struct kms_tx *tx, const struct kms_version_row *r)
{
    return tx->engine->version_insert(tx, r);
}

kms_err kms_store_versions(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                           kms_err (*fn)(void *arg, const struct kms_version_row *r), void *arg)
{
    return tx->engine->versions(tx, key, fn, arg);
}

kms_err kms_store_version_max_n(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], uint32_t *out)
{
    return tx->engine->version_max_n(tx, key, out);
}

kms_err kms_store_reserve(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], uint32_t vid,
                          uint64_t want, uint64_t *granted, uint64_t *reserved)
{
    return tx->engine->reserve(tx, key, vid, want, granted, reserved);
}

kms_err kms_store_versions_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN])
{
    return tx->engine->versions_delete(tx, key);
}

/* ---- aliases ---- */

kms_err kms_store_alias_get(struct kms_tx *tx, const char *name, struct kms_alias_row *out)
{
    return tx->engine->alias_get(tx, name, out);
}

kms_err kms_store_alias_insert(struct kms_tx *tx, const struct kms_alias_row *r)
{
    return tx->engine->alias_insert(tx, r);
}

kms_err kms_store_alias_update(struct kms_tx *tx, const struct kms_alias_row *r)
{
    return tx->engine->alias_update(tx, r);
}

kms_err kms_store_alias_delete(struct kms_tx *tx, const char *name)
{
    return tx->engine->alias_delete(tx, name);
}

kms_err kms_store_aliases_of_key_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                        void (*fn)(void *arg, const char *name), void *arg)
{
    return tx->engine->aliases_of_key_delete(tx, key, fn, arg);
}

kms_err kms_store_aliases_list(struct kms_tx *tx, const char *from, const uint8_t *key,
                               size_t limit,
                               kms_err (*fn)(void *arg, const struct kms_alias_row *r), void *arg)
{
    return tx->engine->aliases_list(tx, from, key, limit, fn, arg);
}

/* ---- grants ---- */

kms_err kms_store_grant_insert(struct kms_tx *tx, const struct kms_grant_row *r)
{
    return tx->engine->grant_insert(tx, r);
}

kms_err kms_store_grant_get(struct kms_tx *tx, const char *grant_id, struct kms_grant_row *out)
{
    return tx->engine->grant_get(tx, grant_id, out);
}

kms_err kms_store_grant_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                               const char *grant_id)
{
    return tx->engine->grant_delete(tx, key, grant_id);
}

kms_err kms_store_grants_list(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *from,
                              size_t limit, kms_err (*fn)(void *arg, const struct kms_grant_row *r),
                              void *arg)
{
    return tx->engine->grants_list(tx, key, from, limit, fn, arg);
}

kms_err kms_store_grants_retirable(struct kms_tx *tx, const char *retiring, const char *from,
                                   size_t limit,
                                   kms_err (*fn)(void *arg, const struct kms_grant_row *r),
                                   void *arg)
{
    return tx->engine->grants_retirable(tx, retiring, from, limit, fn, arg);
}

kms_err kms_store_grants_named(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *name,
                               kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg)
{
    return tx->engine->grants_named(tx, key, name, fn, arg);
}

kms_err kms_store_grant_count(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], size_t *out)
{
    return tx->engine->grant_count(tx, key, out);
}

kms_err kms_store_grants_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN])
{
    return tx->engine->grants_delete(tx, key);
}

/* ---- root keys ---- */

kms_err kms_store_roots(struct kms_tx *tx, kms_err (*fn)(void *arg, const struct kms_root_row *r),
                        void *arg)
{
    return tx->engine->roots(tx, fn, arg);
}

kms_err kms_store_root_insert(struct kms_tx *tx, struct kms_root_row *r)
{
    return tx->engine->root_insert(tx, r);
}

/* ---- meta ---- */

kms_err kms_store_meta_get(struct kms_tx *tx, const char *name, char *out, size_t n)
{
    return tx->engine->meta_get(tx, name, out, n);
}

kms_err kms_store_meta_set(struct kms_tx *tx, const char *name, const char *value)
{
    return tx->engine->meta_set(tx, name, value);
}

/* ---- the change sequence ---- */

kms_err kms_store_change_request(struct kms_tx *tx, const char *request_id)
{
    KMS_ENSURE(request_id && *request_id && strlen(request_id) <= KMS_REQUEST_ID_MAX,
               KMS_ERR_INTERNAL, "a change needs a request id");
    return tx->engine->change_request(tx, request_id);
}

kms_err kms_store_change_request_find(struct kms_tx *tx, const char *request_id, int *found)
{
    *found = 0;
    return tx->engine->change_request_find(tx, request_id, found);
}

kms_err kms_store_audit_head_get(struct kms_tx *tx, const char *node,
                                 struct kms_audit_head_row *out)
{
    memset(out, 0, sizeof *out);
    return tx->engine->audit_head_get(tx, node, out);
}

kms_err kms_store_audit_head_put(struct kms_tx *tx, const struct kms_audit_head_row *r)
{
    return tx->engine->audit_head_put(tx, r);
}

kms_err kms_store_note_change(struct kms_tx *tx, int kind, const uint8_t *id, const char *name)
{
    return tx->engine->note_change(tx, kind, id, name);
}

kms_err kms_store_change_head(struct kms_tx *tx, int64_t *out)
{
    return tx->engine->change_head(tx, out);
}

kms_err kms_store_change_tail(struct kms_tx *tx, int64_t *out)
{
    return tx->engine->change_tail(tx, out);
}

kms_err kms_store_changes(struct kms_tx *tx, int64_t after, size_t limit,
                          kms_err (*fn)(void *arg, const struct kms_change *c), void *arg)
{
    return tx->engine->changes(tx, after, limit, fn, arg);
}

kms_err kms_store_changes_prune(struct kms_tx *tx, int64_t before)
{
    return tx->engine->changes_prune(tx, before);
}

/* ---- the change feed ---- */

kms_err kms_store_wait_change(struct kms_store *st, unsigned timeout_ms, int *changed)
{
    *changed = 0;
    if (!st->engine->wait_change)
        return KMS_ERR_UNSUPPORTED;
    return st->engine->wait_change(st, timeout_ms, changed);
}

void kms_store_wake(struct kms_store *st)
{
    if (st->engine->wake)
        st->engine->wake(st);
}

/* ---- tags ---- */

kms_err kms_store_tag_put(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *tag_key,
                          const char *tag_value)
{
    return tx->engine->tag_put(tx, key, tag_key, tag_value);
}

kms_err kms_store_tag_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                             const char *tag_key)
{
    return tx->engine->tag_delete(tx, key, tag_key);
}

kms_err kms_store_tags_list(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *from,
                            size_t limit,
                            kms_err (*fn)(void *arg, const char *tag_key, const char *tag_value),
                            void *arg)
{
    return tx->engine->tags_list(tx, key, from, limit, fn, arg);
}

kms_err kms_store_tag_count(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], size_t *out)
{
    *out = 0;
    return tx->engine->tag_count(tx, key, out);
}

kms_err kms_store_tags_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN])
{
    return tx->engine->tags_delete(tx, key);
}
