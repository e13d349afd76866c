/*
 * Root keys (DESIGN §5): AES-256 token objects that wrap and unwrap key
 * versions and do nothing else. The database names them (id, CKA_ID, label);
 * the token holds them. `p11kmsd init` makes the first; a node finds them by
 * CKA_ID at start-up and again after the token lost its handles (a new epoch).
 */
#include "config.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>

#include "common/log.h"
#include "keystore/internal.h"

struct roots_read {
    struct kms_root_row rows[KMS_ROOTS_MAX];
    size_t n;
};

static kms_err collect_root(void *arg, const struct kms_root_row *r)
{
    struct roots_read *rr = arg;
    KMS_ENSURE(rr->n < KMS_ROOTS_MAX, KMS_ERR_INTERNAL, "more than %d root keys", KMS_ROOTS_MAX);
    rr->rows[rr->n++] = *r;
    return KMS_OK;
}

static kms_err find_root(struct kms_hsm *hsm, const uint8_t cka_id[KMS_ROOT_ID_LEN],
                         CK_OBJECT_HANDLE *out)
{
    struct kms_session *s;
    KMS_GUARD(kms_hsm_acquire(hsm, &s));
    kms_err rc = kms_hsm_find_secret(s, cka_id, KMS_ROOT_ID_LEN, out);
    kms_hsm_release(s);
    return rc;
}

/* The token's object for a root key the database names: a current one the token lacks fails. */
static kms_err find_named_root(struct kms_hsm *hsm, struct kms_store *store,
                               const struct kms_root_row *row, CK_OBJECT_HANDLE *out)
{
    KMS_GUARD(find_root(hsm, row->cka_id, out));
    KMS_ENSURE(*out != CK_INVALID_HANDLE || row->state != KMS_ROOT_CURRENT, KMS_ERR_INTERNAL,
               "the token does not hold root key %s, which the database %s names: the database "
               "belongs to another token, or the token's objects were lost",
               row->label, kms_store_name(store));
    return KMS_OK;
}

kms_err kms_keystore_init_roots(struct kms_hsm *hsm, struct kms_store *store, int *made)
{
    struct roots_read rr = {.n = 0};
    struct kms_root_row root = {0};
    struct kms_session *s = NULL;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    struct kms_tx *tx;

    *made = 0;
    KMS_GUARD(kms_store_begin(store, KMS_TX_WRITE, &tx));
    kms_err rc = kms_store_roots(tx, collect_root, &rr);
    if (rc == KMS_OK && rr.n > 0) {
        kms_store_rollback(tx);
        for (size_t i = 0; i < rr.n; i++)
            if (rr.rows[i].state == KMS_ROOT_CURRENT)
                KMS_GUARD(find_named_root(hsm, store, &rr.rows[i], &h));
        return KMS_OK;
    }
    /* None yet: made under the database's write lock, so two inits make one. */
    if (rc == KMS_OK && RAND_bytes(root.cka_id, sizeof root.cka_id) != 1)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "random generator failed");
    root.created = kms_now();
    root.state = KMS_ROOT_CURRENT;
    snprintf(root.label, sizeof root.label, "p11kms-root:%lld", (long long)root.created);
    if (rc == KMS_OK)
        rc = kms_hsm_acquire(hsm, &s);
    if (rc == KMS_OK)
        rc = kms_hsm_generate_root(s, root.cka_id, sizeof root.cka_id, root.label, &h);
    if (rc == KMS_OK)
        rc = kms_store_root_insert(tx, &root);
    if (rc == KMS_OK)
        rc = kms_store_note_change(tx, KMS_CHANGE_ROOT, NULL, NULL);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    if (rc != KMS_OK && h != CK_INVALID_HANDLE && kms_hsm_destroy(s, h) != KMS_OK)
        kms_err_clear();
    if (s)
        kms_hsm_release(s);
    KMS_GUARD(rc);
    kms_info("made root key %s (id %u) in the token", root.label, root.id);
    *made = 1;
    return KMS_OK;
}

/* The root keys the database names: at least one. */
static kms_err read_roots(struct kms_store *store, struct roots_read *rr)
{
    struct kms_tx *tx;
    KMS_GUARD(kms_store_begin(store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_roots(tx, collect_root, rr);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    KMS_GUARD(rc);
    KMS_ENSURE(rr->n > 0, KMS_ERR_INTERNAL,
               "the database %s names no root key: run p11kmsd init --config FILE",
               kms_store_name(store));
    return KMS_OK;
}

kms_err kms_keystore_check_roots(struct kms_hsm *hsm, struct kms_store *store)
{
    struct roots_read rr = {.n = 0};
    CK_OBJECT_HANDLE h;
    KMS_GUARD(read_roots(store, &rr));
    for (size_t i = 0; i < rr.n; i++)
        if (rr.rows[i].state == KMS_ROOT_CURRENT)
            KMS_GUARD(find_named_root(hsm, store, &rr.rows[i], &h));
    return KMS_OK;
}

kms_err kms_roots_load(struct kms_keystore *ks)
{
    struct roots_read rr = {.n = 0};
    KMS_GUARD(read_roots(ks->store, &rr));
    unsigned long epoch = kms_hsm_epoch(ks->hsm);
    int current = -1;
    for (size_t i = 0; i < rr.n; i++) {
        struct root *r = &ks->roots[i];
        r->id = rr.rows[i].id;
        memcpy(r->cka_id, rr.rows[i].cka_id, KMS_ROOT_ID_LEN);
        r->state = rr.rows[i].state;
        KMS_GUARD(find_named_root(ks->hsm, ks->store, &rr.rows[i], &r->handle));
        r->epoch = epoch;
        if (r->handle == CK_INVALID_HANDLE)
            kms_warn("retired root key %s is not in the token", rr.rows[i].label);
        if (r->state == KMS_ROOT_CURRENT)
            current = (int)i;
    }
    KMS_ENSURE(current >= 0, KMS_ERR_INTERNAL, "the database names no current root key");
    ks->nroots = rr.n;
    ks->current_root = (size_t)current;
    return KMS_OK;
}

uint32_t kms_root_current(struct kms_keystore *ks)
{
    return ks->roots[ks->current_root].id;
}

kms_err kms_root_handle(struct kms_keystore *ks, uint32_t id, CK_OBJECT_HANDLE *out)
{
    unsigned long epoch = kms_hsm_epoch(ks->hsm);
    struct root *r = NULL;
    uint8_t cka_id[KMS_ROOT_ID_LEN];

    pthread_mutex_lock(&ks->lock);
    for (size_t i = 0; i < ks->nroots; i++)
        if (ks->roots[i].id == id)
            r = &ks->roots[i];
    if (r && r->handle != CK_INVALID_HANDLE && r->epoch == epoch) {
        *out = r->handle;
        pthread_mutex_unlock(&ks->lock);
        return KMS_OK;
    }
    if (r)
        memcpy(cka_id, r->cka_id, sizeof cka_id);
    pthread_mutex_unlock(&ks->lock);
    KMS_ENSURE(r != NULL, KMS_ERR_INTERNAL, "a key version names root key %u, which is unknown",
               id);
    CK_OBJECT_HANDLE h;
    KMS_GUARD(find_root(ks->hsm, cka_id, &h));
    KMS_ENSURE(h != CK_INVALID_HANDLE, KMS_ERR_KEY_UNAVAILABLE,
               "The key store's root key is not available");
    pthread_mutex_lock(&ks->lock);
    r->handle = h;
    r->epoch = epoch;
    pthread_mutex_unlock(&ks->lock);
    *out = h;
    return KMS_OK;
}

void kms_root_forget(struct kms_keystore *ks)
{
    pthread_mutex_lock(&ks->lock);
    for (size_t i = 0; i < ks->nroots; i++)
        ks->roots[i].handle = CK_INVALID_HANDLE;
    pthread_mutex_unlock(&ks->lock);
}
