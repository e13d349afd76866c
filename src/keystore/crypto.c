/*
 * Wrapping and unwrapping under key versions. A version is used through a
 * session object unwrapped from its stored form into the holder session at
 * its first use on this node (then kept with the cached key), or, for a
 * token-resident version, through its token object found once by CKA_ID.
 * Each version's uses are counted durably: a node reserves a block of uses
 * in the database before spending them, so a crash wastes at most a block and
 * never lets a version wrap past its bound (NIST SP 800-38D: random 96-bit
 * IVs).
 */
#include "config.h"

#include <openssl/crypto.h>
#include <string.h>

#include "common/keyspec.h"
#include "common/log.h"
#include "common/random.h"
#include "keystore/internal.h"

/*
 * Blocks are reserved ahead, while half of the last one remains, by the key
 * store's background thread, so no request waits for the database write. A
 * key whose blocks go within AHEAD_BUSY_SECONDS reserves four times as many
 * at a time, up to AHEAD_MAX_FACTOR times usage_block (a crash wastes at most
 * that). Blocks of fewer than AHEAD_MIN uses are only reserved when they run
 * out.
 */
#define AHEAD_MIN 64
#define AHEAD_BUSY_SECONDS 30
#define AHEAD_MAX_FACTOR 64

void kms_token_key_id(const uint8_t id[KMS_UUID_LEN], uint32_t vid,
                      uint8_t out[KMS_TOKEN_KEY_ID_LEN])
{
    memcpy(out, id, KMS_UUID_LEN);
    out[16] = (uint8_t)(vid >> 24);
    out[17] = (uint8_t)(vid >> 16);
    out[18] = (uint8_t)(vid >> 8);
    out[19] = (uint8_t)vid;
}

/* Reserves up to want uses of a version in the database; *granted may be 0 (at the bound). */
static kms_err reserve(struct kms_keystore *ks, struct key *k, uint32_t vid, uint64_t want,
                       uint64_t *granted)
{
    struct kms_tx *tx;
    uint64_t reserved = 0;
    *granted = 0;
    KMS_GUARD(kms_store_begin(ks->store, KMS_TX_WRITE, &tx));
    kms_err rc = kms_store_reserve(tx, k->id, vid, want, granted, &reserved);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    if (rc == KMS_ERR_NOT_FOUND)
        return KMS_FAIL(KMS_ERR_NOT_FOUND, "The key no longer exists");
    KMS_GUARD(rc);
    pthread_mutex_lock(&ks->lock);
    struct version *v = kms_version_locked(k, vid);
    if (v)
        v->reserved = reserved;
    pthread_mutex_unlock(&ks->lock);
    return KMS_OK;
}

static int queue_refill(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    int queued = 0;
    pthread_mutex_lock(&ks->queue_lock);
    if (ks->nrefills < sizeof ks->refills / sizeof ks->refills[0]) {
        memcpy(ks->refills[ks->nrefills++], id, KMS_UUID_LEN);
        queued = 1;
        pthread_cond_signal(&ks->wake);
    }
    pthread_mutex_unlock(&ks->queue_lock);
    return queued;
}

static void refill(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    struct key *k;
    uint64_t granted = 0;
    int64_t now = kms_now();

    if (kms_key_get(ks, id, &k) != KMS_OK) {
        kms_err_clear();
        return;
    }
    pthread_mutex_lock(&ks->lock);
    uint32_t vid = k->use->vid;
    uint64_t want = k->use->block;
    if (k->use->granted && now - k->use->granted < AHEAD_BUSY_SECONDS)
        want = want * 4 < ks->cfg.usage_block * AHEAD_MAX_FACTOR
                   ? want * 4
                   : ks->cfg.usage_block * AHEAD_MAX_FACTOR;
    pthread_mutex_unlock(&ks->lock);
    /* The block counts only once written: every use is reserved durably first. */
    kms_err rc = vid ? reserve(ks, k, vid, want, &granted) : KMS_OK;
    if (rc != KMS_OK)
        kms_warn("could not reserve uses ahead: %s", kms_err_message());
    pthread_mutex_lock(&ks->lock);
    if (rc == KMS_OK && granted && k->use->vid == vid) {
        k->use->remaining += granted;
        k->use->block = want;
        k->use->granted = now;
    }
    /* The database is away: every request would queue another try (and a warning). */
    k->use->ahead_failed = rc == KMS_OK ? 0 : now;
    k->use->refilling = 0;
    pthread_mutex_unlock(&ks->lock);
    kms_key_put(ks, k);
    kms_err_clear(); /* at the bound, or a fault: the request that finds none left sees it */
}

void kms_keystore_refill(struct kms_keystore *ks)
{
    for (;;) {
        uint8_t id[KMS_UUID_LEN];
        int have = 0;
        pthread_mutex_lock(&ks->queue_lock);
        if (ks->nrefills > 0 && !ks->stopping) {
            memcpy(id, ks->refills[--ks->nrefills], KMS_UUID_LEN);
            have = 1;
        }
        pthread_mutex_unlock(&ks->queue_lock);
        if (!have)
            return;
        refill(ks, id);
    }
}

/*
 * Takes one use of the key's current version for this node, reserving a
 * block when none is left; at the bound, rotates the key and takes a use of
 * the new version. *kp is the held entry, and may be replaced by a fresher one.
 * One request at a time reserves a key's block; the others wait for it, so a
 * block reserved for a version is never overwritten by another request's.
 */
static kms_err take_use(struct kms_keystore *ks, struct key **kp, uint32_t *vid)
{
    uint32_t rotated_from = 0;
    for (int rotations = 0, refreshes = 0;;) {
        struct key *k = *kp;
        uint64_t granted = 0;
        int ahead = 0;

        pthread_mutex_lock(&ks->lock);
        const struct version *cv = kms_version_locked(k, k->row.current);
        uint32_t current_n = cv ? cv->n : 0;
        /*
         * An entry replaced meanwhile (this node rotated the key), or read
         * before a rotation whose version the shared uses already follow,
         * names an older current version than they do: read the key again.
         */
        int older = k->use->vid != k->row.current && current_n < k->use->n;
        if ((!k->linked || older) && refreshes < 8) {
            struct key *fresh;
            if (older)
                k->stale = 1;
            pthread_mutex_unlock(&ks->lock);
            refreshes++;
            KMS_GUARD(kms_key_get(ks, k->id, &fresh));
            kms_key_put(ks, k);
            *kp = fresh;
            continue;
        }
        kms_err rc = kms_key_usable_locked(ks, k);
        *vid = k->row.current;
        if (rc == KMS_OK && rotated_from && *vid == rotated_from)
            rc = KMS_FAIL(KMS_ERR_INVALID_STATE,
                          "The key's current version reached its usage bound and the key could "
                          "not be rotated.");
        if (rc == KMS_OK && k->use->vid != *vid) {
            k->use->vid = *vid;
            k->use->n = current_n;
            k->use->remaining = 0;
        }
        if (rc == KMS_OK && k->use->remaining > 0) {
            k->use->remaining--;
            ahead = ks->running && ks->cfg.usage_block >= AHEAD_MIN && !k->use->refilling &&
                    k->use->remaining <= k->use->block / 2 &&
                    (!k->use->ahead_failed || kms_now() != k->use->ahead_failed);
            k->use->refilling |= ahead;
            pthread_mutex_unlock(&ks->lock);
            if (ahead && !queue_refill(ks, k->id)) {
                pthread_mutex_lock(&ks->lock);
                k->use->refilling = 0;
                pthread_mutex_unlock(&ks->lock);
            }
            return KMS_OK;
        }
        if (rc == KMS_OK && k->use->reserving) {
            pthread_cond_wait(&ks->reserved, &ks->lock);
            pthread_mutex_unlock(&ks->lock);
            continue;
        }
        struct usage *u = k->use;
        uint64_t want = u->block;
        u->reserving = rc == KMS_OK;
        pthread_mutex_unlock(&ks->lock);
        KMS_GUARD(rc);

        rc = reserve(ks, k, *vid, want, &granted);
        pthread_mutex_lock(&ks->lock);
        u->reserving = 0;
        pthread_cond_broadcast(&ks->reserved);
        if (rc == KMS_OK && granted) {
            /*
             * One of the block is this request's; the rest stays with the
             * entry unless its current version changed meanwhile (another
             * node rotated the key): then the rest is left unused.
             */
            if (u->vid == *vid) {
                u->remaining += granted - 1;
                u->granted = kms_now();
            }
        }
        pthread_mutex_unlock(&ks->lock);
        KMS_GUARD(rc);
        if (granted)
            return KMS_OK;
        /*
         * At the bound: rotate. Other requests and nodes may use up a fresh
         * version first (with a tiny bound and many callers): a few more tries.
         */
        if (rotations++ >= 32)
            return KMS_FAIL(KMS_ERR_INVALID_STATE,
                            "The key's current version reached its usage bound and the key could "
                            "not be rotated.");
        kms_info("key %s: version %u reached its usage bound; rotating", k->id_text, *vid);
        rotated_from = *vid;
        uint8_t id[KMS_UUID_LEN];
        memcpy(id, k->id, KMS_UUID_LEN);
        KMS_GUARD(kms_key_rotate(ks, id, KMS_ROTATE_USAGE, *vid));
        struct key *fresh;
        KMS_GUARD(kms_key_get(ks, id, &fresh));
        kms_key_put(ks, k);
        *kp = fresh;
    }
}

void kms_unwrapped_destroy(struct kms_keystore *ks, CK_OBJECT_HANDLE h, unsigned long epoch)
{
    struct kms_session *holder;
    if (epoch != kms_hsm_epoch(ks->hsm))
        return; /* gone with its session or login already */
    if (kms_hsm_hold(ks->hsm, &holder) != KMS_OK) {
        kms_err_clear();
        return;
    }
    if (kms_hsm_destroy(holder, h) != KMS_OK)
        kms_err_clear();
    kms_hsm_unhold(holder);
}

/*
 * The handle through which version vid of k is used: unwrapped (or found)
 * now when this node has none in the current epoch.
 */
static kms_err version_handle(struct kms_keystore *ks, struct key *k, uint32_t vid,
                              CK_OBJECT_HANDLE *out)
{
    unsigned long epoch = kms_hsm_epoch(ks->hsm);
    uint8_t wrapped[KMS_WRAPPED_MAX];
    size_t wrapped_len = 0;
    uint32_t root = 0;

    pthread_mutex_lock(&ks->lock);
    int spec = k->row.spec, usage = k->row.usage;
    struct version *v = kms_version_locked(k, vid);
    if (!v) {
        pthread_mutex_unlock(&ks->lock);
        return KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT, KMS_BLOB_INVALID);
    }
    if (v->handle != CK_INVALID_HANDLE && v->epoch == epoch) {
        *out = v->handle;
        pthread_mutex_unlock(&ks->lock);
        return KMS_OK;
    }
    if (v->wrapped) {
        memcpy(wrapped, v->wrapped, v->wrapped_len);
        wrapped_len = v->wrapped_len;
        root = v->root;
    }
    pthread_mutex_unlock(&ks->lock);

    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    kms_err rc;
    if (wrapped_len) {
        CK_OBJECT_HANDLE rh;
        struct kms_session *holder;
        rc = kms_root_handle(ks, root, &rh);
        if (rc == KMS_OK)
            rc = kms_hsm_hold(ks->hsm, &holder);
        if (rc == KMS_OK) {
            epoch = kms_hsm_epoch(ks->hsm);
            rc = spec == KMS_SPEC_SYMMETRIC_DEFAULT
                     ? kms_hsm_unwrap_aes(holder, rh, wrapped, wrapped_len, &h)
                     : kms_hsm_unwrap_key(holder, rh, spec, usage, wrapped, wrapped_len, &h);
            kms_hsm_unhold(holder);
        }
        if (rc == KMS_ERR_INTERNAL)
            kms_error("key %s version %u: the stored key material does not unwrap", k->id_text,
                      vid);
    } else {
        /* A token-resident version: its object, found once. */
        uint8_t cka_id[KMS_TOKEN_KEY_ID_LEN];
        struct kms_session *s;
        kms_token_key_id(k->id, vid, cka_id);
        rc = kms_hsm_acquire(ks->hsm, &s);
        if (rc == KMS_OK) {
            epoch = kms_hsm_epoch(ks->hsm);
            rc = kms_hsm_find_secret(s, cka_id, sizeof cka_id, &h);
            kms_hsm_release(s);
        }
        if (rc == KMS_OK && h == CK_INVALID_HANDLE) {
            kms_error("key %s version %u: its token object is missing", k->id_text, vid);
            rc = KMS_FAIL(KMS_ERR_KEY_UNAVAILABLE, "%skey/%s: that key material is unavailable",
                          ks->arn_prefix, k->id_text);
        }
    }
    OPENSSL_cleanse(wrapped, sizeof wrapped);
    KMS_GUARD(rc);

    CK_OBJECT_HANDLE spare = CK_INVALID_HANDLE;
    pthread_mutex_lock(&ks->lock);
    v = kms_version_locked(k, vid);
    if (v && v->handle != CK_INVALID_HANDLE && v->epoch == epoch) {
        spare = wrapped_len ? h : CK_INVALID_HANDLE; /* another request was first */
        h = v->handle;
    } else if (v) {
        v->handle = h;
        v->epoch = epoch;
    }
    pthread_mutex_unlock(&ks->lock);
    if (spare != CK_INVALID_HANDLE)
        kms_unwrapped_destroy(ks, spare, epoch);
    *out = h;
    return KMS_OK;
}

/* A handle found not to work: forget it so the next use unwraps again. */
static void forget_handle(struct kms_keystore *ks, struct key *k, uint32_t vid, CK_OBJECT_HANDLE h)
{
    pthread_mutex_lock(&ks->lock);
    struct version *v = kms_version_locked(k, vid);
    if (v && v->handle == h)
        v->handle = CK_INVALID_HANDLE;
    pthread_mutex_unlock(&ks->lock);
}

kms_err kms_with_version(struct kms_keystore *ks, struct key *k, uint32_t vid,
                         kms_err (*fn)(void *arg, struct kms_session *s, CK_OBJECT_HANDLE h),
                         void *arg)
{
    for (int attempt = 0;; attempt++) {
        CK_OBJECT_HANDLE h;
        struct kms_session *s;
        kms_err rc = version_handle(ks, k, vid, &h);
        if (rc == KMS_ERR_KEY_UNAVAILABLE && attempt == 0) {
            /* The root's handle went with a lost session: find it again, once. */
            kms_err_clear();
            kms_root_forget(ks);
            continue;
        }
        KMS_GUARD(rc);
        unsigned long epoch = kms_hsm_epoch(ks->hsm);
        KMS_GUARD(kms_hsm_acquire(ks->hsm, &s));
        rc = fn(arg, s, h);
        CK_RV rv = s->last_rv;
        kms_hsm_release(s); /* a broken session is reopened here, perhaps logged in again */
        int gone = rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID ||
                   epoch != kms_hsm_epoch(ks->hsm);
        if (rc != KMS_ERR_KEY_UNAVAILABLE || attempt > 0 || !gone)
            return rc;
        /* The object went (a re-login, a lost holder session): unwrap again, once. */
        kms_err_clear();
        forget_handle(ks, k, vid, h);
    }
}

/*
 * The GCM additional data (kms_blob_aad: header || canonical context) on the
 * stack when it fits, as it does for every usual context; else in a kms_buf.
 * It holds no secret.
 */
#define AAD_SMALL 512
struct aad {
    uint8_t small[AAD_SMALL];
    struct kms_buf big;
    const uint8_t *data;
    size_t len;
};

static kms_err aad_make(struct aad *a, const uint8_t header[KMS_BLOB_HEADER_LEN],
                        const struct kms_buf *canonical_context)
{
    a->big = (struct kms_buf)KMS_BUF_INIT;
    if (canonical_context->len <= sizeof a->small - KMS_BLOB_HEADER_LEN) {
        memcpy(a->small, header, KMS_BLOB_HEADER_LEN);
        if (canonical_context->len)
            memcpy(a->small + KMS_BLOB_HEADER_LEN, canonical_context->data, canonical_context->len);
        a->data = a->small;
        a->len = KMS_BLOB_HEADER_LEN + canonical_context->len;
        return KMS_OK;
    }
    KMS_GUARD(kms_blob_aad(header, canonical_context, &a->big));
    a->data = a->big.data;
    a->len = a->big.len;
    return KMS_OK;
}

struct gcm_args {
    int encrypt;
    const uint8_t *iv;
    const struct aad *aad;
    const uint8_t *in;
    size_t n;
    uint8_t *out;
};

static kms_err gcm_in(void *arg, struct kms_session *s, CK_OBJECT_HANDLE h)
{
    const struct gcm_args *a = arg;
    return a->encrypt
               ? kms_hsm_gcm_encrypt(s, h, a->iv, a->aad->data, a->aad->len, a->in, a->n, a->out)
               : kms_hsm_gcm_decrypt(s, h, a->iv, a->aad->data, a->aad->len, a->in, a->n, a->out);
}

/* GCM under a version, once more with a fresh handle when the token lost the one we had. */
static kms_err gcm(struct kms_keystore *ks, struct key *k, uint32_t vid, int encrypt,
                   const uint8_t iv[12], const struct aad *aad, const uint8_t *in, size_t n,
                   uint8_t *out)
{
    struct gcm_args a = {encrypt, iv, aad, in, n, out};
    return kms_with_version(ks, k, vid, gcm_in, &a);
}

kms_err kms_keystore_encrypt_key(struct kms_keystore *ks, struct kms_key_ref *key,
                                 const struct kms_buf *canonical_context, const uint8_t *plaintext,
                                 size_t n, struct kms_buf *blob, struct kms_key_info *info)
{
    uint8_t header[KMS_BLOB_HEADER_LEN], iv[KMS_GCM_IV_LEN];
    struct aad aad = {.big = KMS_BUF_INIT};
    uint32_t vid = 0;

    KMS_ENSURE(key->entry != NULL, KMS_ERR_INTERNAL, "no key held");
    pthread_mutex_lock(&ks->lock);
    int symmetric = key->entry->row.spec == KMS_SPEC_SYMMETRIC_DEFAULT;
    pthread_mutex_unlock(&ks->lock);
    KMS_ENSURE(symmetric, KMS_ERR_INVALID_KEY_USAGE,
               "%s key usage is not ENCRYPT_DECRYPT with SYMMETRIC_DEFAULT", key->arn);
    /* A fresher entry take_use reads is of the same key, never of whatever an alias names now. */
    kms_err rc = take_use(ks, &key->entry, &vid);
    struct key *k = key->entry;
    if (rc == KMS_OK) {
        pthread_mutex_lock(&ks->lock);
        kms_blob_header(k->id, vid, header);
        rc = kms_info_brief_locked(ks, k, info);
        pthread_mutex_unlock(&ks->lock);
    }
    if (rc == KMS_OK) /* public in the blob: from the per-thread pool */
        rc = kms_random_public(iv, sizeof iv);
    if (rc == KMS_OK)
        rc = aad_make(&aad, header, canonical_context);
    if (rc == KMS_OK)
        rc = kms_buf_reserve(blob, KMS_BLOB_OVERHEAD + n);
    if (rc == KMS_OK)
        rc = gcm(ks, k, vid, 1, iv, &aad, plaintext, n,
                 blob->data + blob->len + sizeof header + sizeof iv);
    if (rc == KMS_OK) {
        memcpy(blob->data + blob->len, header, sizeof header);
        memcpy(blob->data + blob->len + sizeof header, iv, sizeof iv);
        blob->len += KMS_BLOB_OVERHEAD + n;
    }
    kms_buf_free(&aad.big);
    return rc;
}

kms_err kms_keystore_encrypt(struct kms_keystore *ks, const char *ref,
                             const struct kms_buf *canonical_context, const uint8_t *plaintext,
                             size_t n, struct kms_buf *blob, struct kms_key_info *info)
{
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    KMS_GUARD(kms_keystore_hold(ks, ref, KMS_REF_ALIAS, &key));
    kms_err rc = kms_keystore_encrypt_key(ks, &key, canonical_context, plaintext, n, blob, info);
    kms_keystore_unhold(ks, &key);
    return rc;
}

/*
 * Whether expect_ref names key k, and if not the error resolving it gives
 * (KMS_ERR_INCORRECT_KEY when it names another key). The usual case, a
 * reference to the blob's own key, costs no second lookup of the key: its id
 * is compared with the held entry's (an alias is read from memory). Only when
 * it names another key, or k is destroyed (kms_resolve would answer
 * NotFound, in its own words), is it resolved in full as before.
 */
static kms_err expected_key(struct kms_keystore *ks, struct key *k, const char *expect_ref)
{
    uint8_t id[KMS_UUID_LEN];
    struct key *e;

    KMS_GUARD(kms_resolve_id(ks, expect_ref, KMS_REF_ALIAS, id));
    pthread_mutex_lock(&ks->lock);
    int same = memcmp(id, k->id, KMS_UUID_LEN) == 0 && k->row.state != KMS_STORE_DESTROYED;
    pthread_mutex_unlock(&ks->lock);
    if (same)
        return KMS_OK;
    KMS_GUARD(kms_resolve(ks, expect_ref, KMS_REF_ALIAS, &e));
    same = memcmp(e->id, k->id, KMS_UUID_LEN) == 0;
    kms_key_put(ks, e);
    return same ? KMS_OK : KMS_ERR_INCORRECT_KEY;
}

/*
 * The blob's key, held in k, checked against expect_ref and usable, with the
 * blob's version known. A key destroyed is NotFound: only a caller allowed by
 * its policy gets here. info (when not NULL) receives what the key is.
 */
static kms_err blob_key(struct kms_keystore *ks, const struct kms_blob *blob, struct key *k,
                        const char *expect_ref, struct kms_key_info *info)
{
    kms_err expected = KMS_OK, rc;

    KMS_ENSURE(memcmp(blob->key_id, k->id, KMS_UUID_LEN) == 0, KMS_ERR_INVALID_CIPHERTEXT,
               KMS_BLOB_INVALID);
    if (expect_ref) {
        expected = expected_key(ks, k, expect_ref);
        if (expected != KMS_OK && expected != KMS_ERR_INCORRECT_KEY)
            return expected;
    }
    pthread_mutex_lock(&ks->lock);
    if (k->row.state == KMS_STORE_DESTROYED)
        rc = KMS_FAIL(KMS_ERR_NOT_FOUND, "Key '%skey/%s' does not exist", ks->arn_prefix,
                      k->id_text);
    else if (expected == KMS_ERR_INCORRECT_KEY)
        rc = KMS_FAIL(KMS_ERR_INCORRECT_KEY, "The key ID in the request does not identify the "
                                             "key that encrypted the ciphertext");
    else
        rc = kms_key_usable_locked(ks, k);
    /* No blob is ever made under an asymmetric or HMAC key: one naming such a key is made up. */
    if (rc == KMS_OK && k->row.spec != KMS_SPEC_SYMMETRIC_DEFAULT)
        rc = KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT, KMS_BLOB_INVALID);
    int known = rc == KMS_OK && kms_version_locked(k, blob->key_version) != NULL;
    if (known && info)
        rc = kms_info_brief_locked(ks, k, info);
    pthread_mutex_unlock(&ks->lock);
    if (rc == KMS_OK && !known) {
        /* Made on another node since this one read the key: one lookup, then remembered. */
        rc = kms_key_learn_version(ks, k, blob->key_version);
        if (rc == KMS_ERR_NOT_FOUND)
            rc = KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT, KMS_BLOB_INVALID);
        if (rc == KMS_OK && info) {
            pthread_mutex_lock(&ks->lock);
            rc = kms_info_brief_locked(ks, k, info);
            pthread_mutex_unlock(&ks->lock);
        }
    }
    return rc;
}

kms_err kms_keystore_decrypt_key(struct kms_keystore *ks, struct kms_key_ref *key,
                                 const struct kms_blob *blob,
                                 const struct kms_buf *canonical_context, const char *expect_ref,
                                 struct kms_buf *plaintext, struct kms_key_info *info)
{
    struct aad aad = {.big = KMS_BUF_INIT};

    KMS_ENSURE(key->entry != NULL, KMS_ERR_INTERNAL, "no key held");
    kms_err rc = blob_key(ks, blob, key->entry, expect_ref, info);
    if (rc == KMS_OK)
        rc = aad_make(&aad, blob->header, canonical_context);
    if (rc == KMS_OK)
        rc = kms_buf_reserve(plaintext, blob->ciphertext_len);
    if (rc == KMS_OK)
        rc = gcm(ks, key->entry, blob->key_version, 0, blob->iv, &aad, blob->ciphertext,
                 blob->ciphertext_len + KMS_GCM_TAG_LEN, plaintext->data + plaintext->len);
    if (rc == KMS_OK)
        plaintext->len += blob->ciphertext_len;
    kms_buf_free(&aad.big);
    return rc;
}

kms_err kms_keystore_decrypt(struct kms_keystore *ks, const uint8_t *p, size_t n,
                             const struct kms_buf *canonical_context, const char *expect_ref,
                             struct kms_buf *plaintext, struct kms_key_info *info)
{
    struct kms_blob blob;
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    char id[KMS_UUID_TEXT_LEN + 1];

    KMS_GUARD(kms_blob_decode(p, n, &blob));
    kms_uuid_format(blob.key_id, id);
    kms_err rc = kms_keystore_hold(ks, id, KMS_REF_DESTROYED, &key);
    if (rc == KMS_ERR_NOT_FOUND)
        return KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT, KMS_BLOB_INVALID);
    KMS_GUARD(rc);
    rc = kms_keystore_decrypt_key(ks, &key, &blob, canonical_context, expect_ref, plaintext, info);
    kms_keystore_unhold(ks, &key);
    return rc;
}
