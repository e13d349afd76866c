/*
 * New key versions: a key's first at creation, then rotations on demand, on
 * the schedule and at the usage bound. The version is made in the token and
 * wrapped before the transaction (kms_version_make); the transaction reads
 * the key under the database's write lock and stores the version only when
 * the rotation is still due, so two nodes rotating one due key make exactly
 * one version.
 */
#include "config.h"

#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>

#include "common/keyspec.h"
#include "common/log.h"
#include "keystore/internal.h"

kms_err kms_version_make(struct kms_keystore *ks, int spec, int usage, struct kms_version_row *v)
{
    struct kms_session *s;
    CK_OBJECT_HANDLE root;
    uint32_t rid = kms_root_current(ks);
    size_t len = sizeof v->wrapped;
    struct kms_buf spki = KMS_BUF_INIT;
    kms_err rc;

    KMS_GUARD(kms_root_handle(ks, rid, &root));
    KMS_GUARD(kms_hsm_acquire(ks->hsm, &s));
    if (spec == KMS_SPEC_SYMMETRIC_DEFAULT)
        rc = kms_hsm_new_wrapped_aes(s, root, v->wrapped, &len);
    else
        rc = kms_hsm_new_wrapped_key(s, root, spec, usage, v->wrapped, &len, &spki);
    kms_hsm_release(s);
    if (rc == KMS_OK && spki.len > sizeof v->public_key)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "a public key is too long");
    if (rc == KMS_OK) {
        v->wrapped_len = len;
        v->root = rid;
        v->public_key_len = spki.len;
        if (spki.len)
            memcpy(v->public_key, spki.data, spki.len);
    }
    kms_buf_free(&spki);
    return rc;
}

kms_err kms_version_new_vid(struct kms_tx *tx, const uint8_t id[KMS_UUID_LEN], uint32_t *out)
{
    struct kms_version_row *row = malloc(sizeof *row);
    KMS_ENSURE(row != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (int tries = 0; tries < 16; tries++) {
        uint32_t v;
        if (RAND_bytes((uint8_t *)&v, sizeof v) != 1) {
            free(row);
            return KMS_FAIL(KMS_ERR_INTERNAL, "random generator failed");
        }
        if (v == 0)
            continue;
        kms_err rc = kms_store_version_get(tx, id, v, row);
        if (rc == KMS_ERR_NOT_FOUND) {
            free(row);
            *out = v;
            return KMS_OK;
        }
        if (rc != KMS_OK) {
            free(row);
            return rc;
        }
    }
    free(row);
    return KMS_FAIL(KMS_ERR_INTERNAL, "cannot pick a version id");
}

static uint64_t first_block(const struct kms_keystore *ks)
{
    return ks->cfg.usage_block < ks->cfg.usage_bound ? ks->cfg.usage_block : ks->cfg.usage_bound;
}

kms_err kms_keystore_create_key(struct kms_keystore *ks, const char *description,
                                const char *policy, struct kms_key_info *out)
{
    return kms_keystore_create_key_as(ks, description, policy, KMS_SPEC_SYMMETRIC_DEFAULT,
                                      KMS_USAGE_ENCRYPT_DECRYPT, out);
}

kms_err kms_keystore_create_key_as(struct kms_keystore *ks, const char *description,
                                   const char *policy, int spec, int usage,
                                   struct kms_key_info *out)
{
    return kms_keystore_create_key_tagged(ks, description, policy, spec, usage, NULL, 0, out);
}

kms_err kms_keystore_create_key_tagged(struct kms_keystore *ks, const char *description,
                                       const char *policy, int spec, int usage,
                                       const struct kms_tag *tags, size_t ntags,
                                       struct kms_key_info *out)
{
    const struct kms_spec_info *si = kms_spec(spec);
    KMS_ENSURE(si && usage >= 0 && usage < KMS_USAGE_COUNT && (si->usages & KMS_USAGE_BIT(usage)),
               KMS_ERR_VALIDATION, "KeyUsage %s is not valid for KeySpec %s", kms_usage_name(usage),
               si ? si->name : "?");
    KMS_ENSURE(ntags <= KMS_TAGS_MAX, KMS_ERR_LIMIT_EXCEEDED,
               "A key can have at most %d tags; the request has %zu", KMS_TAGS_MAX, ntags);
    int gcm = spec == KMS_SPEC_SYMMETRIC_DEFAULT;
    struct kms_version_row *v = calloc(1, sizeof *v);
    struct kms_key_row row = {0};
    struct kms_tx *tx;
    int64_t now = kms_now(), seq = 0;
    /*
     * The creating node's first block of uses is reserved in the same
     * transaction. Only AES-GCM versions count uses (random IVs); the others
     * have no bound, and are never rotated.
     */
    uint64_t block = gcm ? first_block(ks) : 0;
    struct kms_change_event e;
    kms_err rc;

    KMS_ENSURE(v != NULL, KMS_ERR_INTERNAL, "out of memory");
    rc = kms_uuid_new(row.id);
    if (rc == KMS_OK)
        rc = kms_version_make(ks, spec, usage, v);
    row.spec = spec;
    row.usage = usage;
    row.created = now;
    row.state = KMS_STORE_ENABLED;
    row.description = strdup(description ? description : "");
    row.policy = policy ? strdup(policy) : NULL;
    if (rc == KMS_OK && (!row.description || (policy && !row.policy)))
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    memcpy(v->key_id, row.id, KMS_UUID_LEN);
    v->n = 1;
    v->created = now;
    v->rotation = KMS_ROTATION_NONE;
    v->reserved = block;
    v->bound = gcm ? ks->cfg.usage_bound : 0;
    if (rc == KMS_OK && RAND_bytes((uint8_t *)&v->vid, sizeof v->vid) != 1)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "random generator failed");
    if (v->vid == 0)
        v->vid = 1;
    row.current = v->vid;
    if (rc == KMS_OK) {
        pthread_mutex_lock(&ks->change);
        rc = kms_store_begin(ks->store, KMS_TX_WRITE, &tx);
        if (rc == KMS_OK) {
            rc = kms_store_key_insert(tx, &row);
            if (rc == KMS_ERR_ALREADY_EXISTS) /* a random 122-bit id taken: no */
                rc = KMS_FAIL(KMS_ERR_INTERNAL, "key id collision");
            if (rc == KMS_OK)
                rc = kms_store_version_insert(tx, v);
            for (size_t i = 0; rc == KMS_OK && i < ntags; i++)
                rc = kms_store_tag_put(tx, row.id, tags[i].key, tags[i].value);
            if (rc == KMS_OK)
                rc = kms_store_note_change(tx, KMS_CHANGE_KEY, row.id, NULL);
            /*
             * Its own change's seq (changes commit one at a time, in seq order):
             * the entry installed below reflects it, so this node does not
             * read the key again when the change sequence brings it back.
             */
            if (rc == KMS_OK)
                rc = kms_store_change_head(tx, &seq);
            kms_change_event_init(ks, &e, "CreateKey", 0, row.id, NULL);
            if (rc == KMS_OK)
                rc = kms_change_commit(ks, tx, &e);
            kms_store_rollback(tx);
        }
        pthread_mutex_unlock(&ks->change);
    }
    row.rev = 1;
    if (rc == KMS_OK) {
        pthread_mutex_lock(&ks->lock);
        ks->count_keys++;
        ks->count_versions++;
        pthread_mutex_unlock(&ks->lock);
        /* The key's info before the cache takes the row. */
        memset(out, 0, sizeof *out);
        char text[KMS_UUID_TEXT_LEN + 1];
        kms_uuid_format(row.id, text);
        if (kms_cache_install(ks, &row, v, block, seq) != KMS_OK)
            kms_err_clear(); /* read from the database at its first use instead */
        rc = kms_keystore_describe(ks, text, out);
    }
    kms_key_row_clear(&row);
    OPENSSL_cleanse(v->wrapped, sizeof v->wrapped);
    free(v);
    return rc;
}

kms_err kms_rotation_spec_check(struct kms_keystore *ks, const struct kms_key_row *r)
{
    char text[KMS_UUID_TEXT_LEN + 1];
    const struct kms_spec_info *si = kms_spec(r->spec);
    if (r->spec == KMS_SPEC_SYMMETRIC_DEFAULT)
        return KMS_OK;
    kms_uuid_format(r->id, text);
    return KMS_FAIL(KMS_ERR_UNSUPPORTED,
                    "%skey/%s is a %s key: only symmetric encryption keys are rotated",
                    ks->arn_prefix, text, si ? si->name : "?");
}

kms_err kms_rotation_allowed(struct kms_keystore *ks, const struct kms_key_row *r)
{
    char text[KMS_UUID_TEXT_LEN + 1];
    kms_uuid_format(r->id, text);
    KMS_ENSURE(r->state != KMS_STORE_DISABLED, KMS_ERR_DISABLED, "%skey/%s is disabled.",
               ks->arn_prefix, text);
    KMS_ENSURE(r->state == KMS_STORE_ENABLED, KMS_ERR_INVALID_STATE,
               "%skey/%s is pending deletion.", ks->arn_prefix, text);
    KMS_ENSURE(!r->token_resident, KMS_ERR_UNSUPPORTED,
               "%skey/%s keeps its key material in the token and cannot be rotated", ks->arn_prefix,
               text);
    KMS_GUARD(kms_rotation_spec_check(ks, r));
    KMS_ENSURE(r->on_demand < ks->cfg.max_on_demand, KMS_ERR_LIMIT_EXCEEDED,
               "The key has reached its limit of %u on-demand rotations.", ks->cfg.max_on_demand);
    return KMS_OK;
}

struct rotate_args {
    int reason;
    uint32_t from;
    struct kms_version_row *v;
    int made;
    int not_due; /* another node made it, or the key is no longer Enabled */
};

/* In the write transaction: is the rotation still due? Then store the version. */
static kms_err rotate_in(struct kms_keystore *ks, struct kms_tx *tx, struct kms_key_row *r,
                         void *arg)
{
    struct rotate_args *a = arg;
    int64_t now = kms_now();
    char text[KMS_UUID_TEXT_LEN + 1];
    kms_uuid_format(r->id, text);

    if (a->reason == KMS_ROTATE_DEMAND) {
        KMS_GUARD(kms_rotation_allowed(ks, r));
    } else if (a->reason == KMS_ROTATE_SCHEDULE) {
        if (r->state != KMS_STORE_ENABLED || !r->rotation_enabled || r->next_rotation > now ||
            r->token_resident || r->spec != KMS_SPEC_SYMMETRIC_DEFAULT) {
            a->not_due = 1; /* no longer due: another node made it */
            return KMS_ERR_NOT_FOUND;
        }
    } else if (r->state != KMS_STORE_ENABLED || r->current != a->from || r->token_resident ||
               r->spec != KMS_SPEC_SYMMETRIC_DEFAULT) {
        a->not_due = 1;
        return KMS_ERR_NOT_FOUND;
    }
    uint32_t n = 0;
    KMS_GUARD(kms_store_version_max_n(tx, r->id, &n));
    memcpy(a->v->key_id, r->id, KMS_UUID_LEN);
    KMS_GUARD(kms_version_new_vid(tx, r->id, &a->v->vid));
    a->v->n = n + 1;
    a->v->created = now;
    a->v->rotation =
        a->reason == KMS_ROTATE_DEMAND ? KMS_ROTATION_ON_DEMAND : KMS_ROTATION_AUTOMATIC;
    a->v->reserved = 0;
    a->v->bound = ks->cfg.usage_bound;
    KMS_GUARD(kms_store_version_insert(tx, a->v));
    r->current = a->v->vid;
    if (a->reason == KMS_ROTATE_DEMAND)
        r->on_demand++;
    if (a->reason == KMS_ROTATE_SCHEDULE)
        r->next_rotation = now + r->rotation_seconds;
    a->made = 1;
    return KMS_OK;
}

kms_err kms_key_rotate(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], int reason,
                       uint32_t from)
{
    struct rotate_args a = {reason, from, calloc(1, sizeof *a.v), 0, 0};
    KMS_ENSURE(a.v != NULL, KMS_ERR_INTERNAL, "out of memory");
    /* Only symmetric keys rotate: rotate_in refuses the others in the transaction. */
    kms_err rc = kms_version_make(ks, KMS_SPEC_SYMMETRIC_DEFAULT, KMS_USAGE_ENCRYPT_DECRYPT, a.v);
    /* AWS's CloudTrail names the automatic ones RotateKey too. */
    const char *op = reason == KMS_ROTATE_DEMAND ? "RotateKeyOnDemand" : "RotateKey";
    if (rc == KMS_OK)
        rc = kms_key_change(ks, id, op, reason != KMS_ROTATE_DEMAND, rotate_in, &a);
    if (a.not_due) {
        /* Not due any more: another node (or request) made it; this node's view is old. */
        kms_err_clear();
        kms_cache_key_changed(ks, id);
        rc = KMS_OK;
    }
    if (rc == KMS_OK && a.made) {
        pthread_mutex_lock(&ks->lock);
        ks->count_versions++;
        pthread_mutex_unlock(&ks->lock);
    }
    OPENSSL_cleanse(a.v->wrapped, sizeof a.v->wrapped);
    free(a.v);
    return rc;
}

kms_err kms_keystore_rotate_on_demand(struct kms_keystore *ks, const char *ref,
                                      struct kms_key_info *out)
{
    uint8_t id[KMS_UUID_LEN];
    char text[KMS_UUID_TEXT_LEN + 1];
    struct key *k;

    KMS_GUARD(kms_resolve(ks, ref, KMS_REF_ALIAS, &k));
    memcpy(id, k->id, KMS_UUID_LEN);
    /* Checked first on this node's view too, so a refused rotation makes no version. */
    pthread_mutex_lock(&ks->lock);
    kms_err rc = kms_rotation_allowed(ks, &k->row);
    pthread_mutex_unlock(&ks->lock);
    kms_key_put(ks, k);
    KMS_GUARD(rc);
    kms_err_clear();
    KMS_GUARD(kms_key_rotate(ks, id, KMS_ROTATE_DEMAND, 0));
    kms_uuid_format(id, text);
    return kms_keystore_describe(ks, text, out);
}

kms_err kms_keystore_list_rotations(struct kms_keystore *ks, const char *ref, uint32_t marker,
                                    size_t limit, struct kms_rotation_info *out, size_t *n,
                                    struct kms_key_info *info)
{
    struct key *k;
    *n = 0;
    KMS_GUARD(kms_resolve(ks, ref, KMS_REF_ALIAS, &k));
    pthread_mutex_lock(&ks->lock);
    kms_err rc = kms_info_copy_locked(ks, k, info);
    /* Versions are in ordinal order; the first is no rotation. */
    for (size_t i = 0; rc == KMS_OK && i < k->nversions && *n < limit; i++) {
        const struct version *v = &k->versions[i];
        if (v->n < 2 || v->n < marker)
            continue;
        out[*n].n = v->n;
        out[*n].date = v->created;
        out[*n].on_demand = v->rotation == KMS_ROTATION_ON_DEMAND;
        (*n)++;
    }
    pthread_mutex_unlock(&ks->lock);
    kms_key_put(ks, k);
    return rc;
}
