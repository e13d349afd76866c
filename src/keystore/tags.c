/*
 * Tags of keys (keystore.h): TagResource, UntagResource and ListResourceTags
 * on the database. Nothing here is cached: a change writes the tags rows in
 * one audited transaction holding the key's row (its state is read there, so
 * a key scheduled for deletion meanwhile is refused), and notes no change in
 * the change sequence, since no node keeps anything that depends on tags.
 */
#include "config.h"

#include <string.h>

#include "keystore/internal.h"

/*
 * One change to a key's tags: fn writes them in a write transaction that
 * read the key's row (locked against other writers), committed the audited
 * way under operation's name.
 */
static kms_err tag_change(struct kms_keystore *ks, const char *ref, const char *operation,
                          kms_err (*fn)(struct kms_tx *tx, const uint8_t id[KMS_UUID_LEN],
                                        const void *arg),
                          const void *arg)
{
    uint8_t id[KMS_UUID_LEN];
    char text[KMS_UUID_TEXT_LEN + 1];
    struct kms_key_row row = {0};
    struct kms_change_event e;
    struct kms_tx *tx;

    KMS_GUARD(kms_resolve_id(ks, ref, 0, id));
    kms_uuid_format(id, text);
    kms_change_event_init(ks, &e, operation, 0, id, NULL);
    pthread_mutex_lock(&ks->change);
    kms_err rc = kms_store_begin(ks->store, KMS_TX_WRITE, &tx);
    if (rc == KMS_OK) {
        rc = kms_store_key_get(tx, id, &row);
        if (rc == KMS_OK && row.state == KMS_STORE_DESTROYED)
            rc = KMS_ERR_NOT_FOUND;
        if (rc == KMS_ERR_NOT_FOUND)
            rc = KMS_FAIL(KMS_ERR_NOT_FOUND, "Key '%skey/%s' does not exist", ks->arn_prefix, text);
        else if (rc == KMS_OK && row.state == KMS_STORE_PENDING)
            rc = KMS_FAIL(KMS_ERR_INVALID_STATE, "%skey/%s is pending deletion.", ks->arn_prefix,
                          text);
        if (rc == KMS_OK)
            rc = fn(tx, id, arg);
        if (rc == KMS_OK)
            rc = kms_change_commit(ks, tx, &e);
        kms_store_rollback(tx);
    }
    pthread_mutex_unlock(&ks->change);
    kms_key_row_clear(&row);
    return rc;
}

struct tag_list {
    const struct kms_tag *tags;
    size_t n;
};

static kms_err put_tags(struct kms_tx *tx, const uint8_t id[KMS_UUID_LEN], const void *arg)
{
    const struct tag_list *l = arg;
    size_t count = 0;
    for (size_t i = 0; i < l->n; i++)
        KMS_GUARD(kms_store_tag_put(tx, id, l->tags[i].key, l->tags[i].value));
    /* Counted after the writes: a tag key the key had already is no new tag. */
    KMS_GUARD(kms_store_tag_count(tx, id, &count));
    KMS_ENSURE(count <= KMS_TAGS_MAX, KMS_ERR_LIMIT_EXCEEDED,
               "A key can have at most %d tags; this request would leave it %zu", KMS_TAGS_MAX,
               count);
    return KMS_OK;
}

kms_err kms_keystore_tag(struct kms_keystore *ks, const char *ref, const struct kms_tag *tags,
                         size_t n)
{
    struct tag_list l = {tags, n};
    return tag_change(ks, ref, "TagResource", put_tags, &l);
}

struct key_list {
    const char *const *keys;
    size_t n;
};

static kms_err delete_tags(struct kms_tx *tx, const uint8_t id[KMS_UUID_LEN], const void *arg)
{
    const struct key_list *l = arg;
    for (size_t i = 0; i < l->n; i++) {
        kms_err rc = kms_store_tag_delete(tx, id, l->keys[i]);
        if (rc != KMS_ERR_NOT_FOUND)
            KMS_GUARD(rc);
    }
    return KMS_OK;
}

kms_err kms_keystore_untag(struct kms_keystore *ks, const char *ref, const char *const *keys,
                           size_t n)
{
    struct key_list l = {keys, n};
    return tag_change(ks, ref, "UntagResource", delete_tags, &l);
}

kms_err kms_keystore_list_tags(struct kms_keystore *ks, const char *ref, const char *from,
                               size_t limit,
                               kms_err (*fn)(void *arg, const char *tag_key, const char *tag_value),
                               void *arg)
{
    struct key *k;
    uint8_t id[KMS_UUID_LEN];
    struct kms_tx *tx;

    /* The key must exist and not be destroyed: its entry says so, without the database. */
    KMS_GUARD(kms_resolve(ks, ref, 0, &k));
    memcpy(id, k->id, KMS_UUID_LEN);
    kms_key_put(ks, k);
    KMS_GUARD(kms_store_begin(ks->store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_tags_list(tx, id, from, limit, fn, arg);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    return rc;
}
