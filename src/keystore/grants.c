/*
 * Grants (DESIGN §5): rows of the database that belong to a key. Each change
 * is a change of the key (kms_key_change: one write transaction that records
 * the key in the change sequence and marks this node's entry changed), so
 * this node reads the key with its grants again at its next use and every
 * other node at its next look at the change sequence.
 */
#include "config.h"

#include <openssl/rand.h>
#include <stdio.h>
#include <string.h>

#include "common/encoding.h"
#include "keystore/internal.h"

struct create_args {
    struct kms_grant_row *g;
    int existing;
    size_t limit;
};

static int same_grant(const struct kms_grant_row *a, const struct kms_grant_row *b)
{
    return strcmp(a->grantee, b->grantee) == 0 && strcmp(a->retiring, b->retiring) == 0 &&
           a->operations == b->operations && strcmp(a->constraints, b->constraints) == 0;
}

static kms_err find_same(void *arg, const struct kms_grant_row *r)
{
    struct create_args *a = arg;
    if (!a->existing && same_grant(a->g, r)) {
        a->existing = 1;
        memcpy(a->g->grant_id, r->grant_id, sizeof a->g->grant_id);
        a->g->created = r->created;
    }
    return KMS_OK;
}

static kms_err new_grant_id(char out[KMS_GRANT_ID_LEN + 1])
{
    uint8_t raw[KMS_GRANT_ID_LEN / 2];
    KMS_ENSURE(RAND_bytes(raw, sizeof raw) == 1, KMS_ERR_INTERNAL, "random generator failed");
    kms_hex_encode(raw, sizeof raw, out);
    return KMS_OK;
}

static kms_err create_in(struct kms_keystore *ks, struct kms_tx *tx, struct kms_key_row *r,
                         void *arg)
{
    struct create_args *a = arg;
    size_t n = 0;
    char text[KMS_UUID_TEXT_LEN + 1];

    kms_uuid_format(r->id, text);
    KMS_ENSURE(r->state == KMS_STORE_ENABLED || r->state == KMS_STORE_DISABLED,
               KMS_ERR_INVALID_STATE, "%skey/%s is pending deletion.", ks->arn_prefix, text);
    if (a->g->name[0]) {
        KMS_GUARD(kms_store_grants_named(tx, r->id, a->g->name, find_same, a));
        /* Nothing to write: the caller answers with the grant that is there. */
        if (a->existing)
            return KMS_ERR_ALREADY_EXISTS;
    }
    KMS_GUARD(kms_store_grant_count(tx, r->id, &n));
    KMS_ENSURE(n < a->limit, KMS_ERR_LIMIT_EXCEEDED,
               "The request was rejected because %skey/%s already has %zu grants, the most a "
               "key may have.",
               ks->arn_prefix, text, a->limit);
    memcpy(a->g->key_id, r->id, KMS_UUID_LEN);
    a->g->created = kms_now();
    /* 256 random bits: a clash is not expected, but the unique index would refuse one. */
    KMS_GUARD(new_grant_id(a->g->grant_id));
    return kms_store_grant_insert(tx, a->g);
}

kms_err kms_keystore_create_grant(struct kms_keystore *ks, struct kms_grant_row *g, int *existing)
{
    struct create_args a = {g, 0,
                            ks->cfg.grants_per_key ? ks->cfg.grants_per_key : KMS_GRANTS_PER_KEY};
    *existing = 0;
    kms_err rc = kms_key_change(ks, g->key_id, "CreateGrant", 0, create_in, &a);
    if (rc == KMS_ERR_ALREADY_EXISTS && a.existing) {
        kms_err_clear();
        *existing = 1;
        return KMS_OK;
    }
    return rc;
}

kms_err kms_keystore_grant_get(struct kms_keystore *ks, const char *grant_id,
                               struct kms_grant_row *out)
{
    struct kms_tx *tx;
    KMS_GUARD(kms_store_begin(ks->store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_grant_get(tx, grant_id, out);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    return rc;
}

struct delete_args {
    const char *grant_id;
    int missing;
};

static kms_err delete_in(struct kms_keystore *ks, struct kms_tx *tx, struct kms_key_row *r,
                         void *arg)
{
    struct delete_args *a = arg;
    (void)ks;
    kms_err rc = kms_store_grant_delete(tx, r->id, a->grant_id);
    a->missing = rc == KMS_ERR_NOT_FOUND;
    return rc;
}

kms_err kms_keystore_delete_grant(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                                  const char *grant_id, const char *operation)
{
    struct delete_args a = {grant_id, 0};
    kms_err rc = kms_key_change(ks, id, operation, 0, delete_in, &a);
    if (rc == KMS_ERR_NOT_FOUND && a.missing) {
        kms_err_clear();
        return KMS_ERR_NOT_FOUND;
    }
    return rc;
}

kms_err kms_keystore_list_grants(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                                 const char *marker, size_t limit,
                                 kms_err (*fn)(void *arg, const struct kms_grant_row *g), void *arg)
{
    struct kms_tx *tx;
    KMS_GUARD(kms_store_begin(ks->store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_grants_list(tx, id, marker, limit, fn, arg);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    return rc;
}

kms_err kms_keystore_list_retirable(struct kms_keystore *ks, const char *retiring,
                                    const char *marker, size_t limit,
                                    kms_err (*fn)(void *arg, const struct kms_grant_row *g),
                                    void *arg)
{
    struct kms_tx *tx;
    KMS_GUARD(kms_store_begin(ks->store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_grants_retirable(tx, retiring, marker, limit, fn, arg);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    return rc;
}

void kms_keystore_key_refresh(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    kms_cache_key_changed(ks, id);
}
