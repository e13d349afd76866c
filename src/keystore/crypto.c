/*
 * Wrapping and unwrapping under KEK versions, with each version's uses
 * counted durably: a node reserves a block of uses in the key's record before
 * spending them, so a crash wastes at most a block and never lets a version
 * wrap past its bound (NIST SP 800-38D: random 96-bit IVs).
 */
#include "config.h"

#include <openssl/rand.h>
#include <string.h>

#include "common/log.h"
#include "keystore/internal.h"

static kms_err usable_locked(struct kms_keystore *ks, const struct key *k)
{
    KMS_ENSURE(k->state != KMS_KEY_DISABLED, KMS_ERR_DISABLED, "%skey/%s is disabled.",
               ks->arn_prefix, k->id_text);
    KMS_ENSURE(k->state == KMS_KEY_ENABLED, KMS_ERR_INVALID_STATE, "%skey/%s is pending deletion.",
               ks->arn_prefix, k->id_text);
    return KMS_OK;
}

static const struct version *version_locked(const struct key *k, uint32_t vid)
{
    for (size_t i = 0; i < k->nversions; i++)
        if (k->versions[i].vid == vid)
            return &k->versions[i];
    return NULL;
}

/* Reserves uses of version vid for this node; *granted is how many. */
static kms_err reserve(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], uint32_t vid,
                       uint64_t count, uint64_t *granted)
{
    struct kms_session *s;
    uint64_t room = 0;
    kms_err rc;

    pthread_rwlock_rdlock(&ks->rw);
    struct key *k = kms_key_find_locked(ks, id);
    const struct version *v = k ? version_locked(k, vid) : NULL;
    if (v && v->bound > v->reserved)
        room = v->bound - v->reserved;
    pthread_rwlock_unlock(&ks->rw);
    KMS_ENSURE(room > 0, KMS_ERR_LIMIT_EXCEEDED, "The key version has reached its usage bound.");
    if (count > room)
        count = room;

    KMS_GUARD(kms_hsm_acquire(ks->hsm, &s));
    json_t *op = kms_op_new("reserve");
    if (!op) {
        kms_hsm_release(s);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    json_object_set_new(op, "vid", json_integer(vid));
    json_object_set_new(op, "count", json_integer((json_int_t)count));
    pthread_mutex_lock(&ks->write);
    rc = kms_key_change(ks, s, id, op);
    pthread_mutex_unlock(&ks->write);
    kms_hsm_release(s);
    json_decref(op);
    if (rc == KMS_OK)
        *granted = count;
    return rc;
}

/*
 * Blocks are reserved ahead, while half of the last one remains, by the key
 * store's background thread: a record write costs two token searches, linear
 * in the token's objects (0.2 s each at 20,000 objects on SoftHSM2), and no
 * request should wait for it or hold a worker through it. A key whose blocks
 * go within AHEAD_BUSY_SECONDS reserves four times as many at a time, up to
 * AHEAD_MAX_FACTOR times usage_block (a crash wastes at most that). Blocks of
 * fewer than AHEAD_MIN uses are only reserved when they run out.
 */
#define AHEAD_MIN 64
#define AHEAD_BUSY_SECONDS 30
#define AHEAD_MAX_FACTOR 64

/* Queues u for the background thread; 0 when the queue is full. */
static int queue_refill(struct kms_keystore *ks, struct usage *u)
{
    int queued = 0;
    pthread_mutex_lock(&ks->stop_lock);
    if (ks->nrefills < sizeof ks->refills / sizeof ks->refills[0]) {
        ks->refills[ks->nrefills++] = u;
        queued = 1;
        pthread_cond_signal(&ks->stop_cond);
    }
    pthread_mutex_unlock(&ks->stop_lock);
    return queued;
}

static void refill(struct kms_keystore *ks, struct usage *u)
{
    int64_t now = kms_now();
    uint64_t granted = 0;

    pthread_mutex_lock(&u->lock);
    uint32_t vid = u->vid;
    uint64_t want = u->block;
    if (u->granted_at && now - u->granted_at < AHEAD_BUSY_SECONDS)
        want = want * 4 < ks->cfg.usage_block * AHEAD_MAX_FACTOR
                   ? want * 4
                   : ks->cfg.usage_block * AHEAD_MAX_FACTOR;
    pthread_mutex_unlock(&u->lock);
    /* The block counts only once written: every use is reserved durably first. */
    kms_err rc = reserve(ks, u->id, vid, want, &granted);
    if (rc != KMS_OK && rc != KMS_ERR_LIMIT_EXCEEDED)
        kms_warn("could not reserve uses ahead: %s", kms_err_message());
    pthread_mutex_lock(&u->lock);
    if (rc == KMS_OK && u->vid == vid) {
        u->remaining += granted;
        u->block = want;
        u->granted_at = now;
    }
    u->refilling = 0;
    pthread_mutex_unlock(&u->lock);
    kms_err_clear(); /* at the bound, or a fault: the request that finds none left sees it */
}

void kms_keystore_refill(struct kms_keystore *ks)
{
    for (;;) {
        struct usage *u = NULL;
        pthread_mutex_lock(&ks->stop_lock);
        if (ks->nrefills > 0 && !ks->stopping)
            u = ks->refills[--ks->nrefills];
        pthread_mutex_unlock(&ks->stop_lock);
        if (!u)
            return;
        refill(ks, u);
    }
}

/*
 * Takes one use of the key's current version for this node. When the
 * version is at its bound, rotates the key and answers with the new current
 * version through *vid.
 *
 * The current version is read again under u->lock: a request that read it
 * before another request's rotation must not switch this node back to the
 * used-up version (that threw away the new version's reserved block, made a
 * needless version object, and could exhaust the new version so that the
 * request failed with LimitExceededException).
 */
static kms_err take_use(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], struct usage *u,
                        uint32_t *vid)
{
    kms_err rc = KMS_OK;
    uint32_t rotated_from = 0;

    pthread_mutex_lock(&u->lock);
    for (int attempt = 0;; attempt++) {
        uint64_t granted = 0;
        pthread_rwlock_rdlock(&ks->rw);
        struct key *k = kms_key_find_locked(ks, id);
        if (k)
            *vid = k->current;
        pthread_rwlock_unlock(&ks->rw);
        if (rotated_from && *vid == rotated_from) {
            /* The rotation did not take (the key is no longer Enabled). */
            rc = KMS_FAIL(KMS_ERR_INVALID_STATE,
                          "The key's current version reached its usage bound and the key could "
                          "not be rotated.");
            break;
        }
        if (u->vid != *vid) {
            u->vid = *vid;
            u->remaining = 0;
        }
        if (u->remaining > 0)
            break;
        rc = reserve(ks, id, *vid, u->block, &granted);
        if (rc == KMS_OK) {
            u->remaining = granted;
            u->granted_at = kms_now();
            break;
        }
        if (rc != KMS_ERR_LIMIT_EXCEEDED)
            break;
        kms_err_clear();
        /* Another node may use up a fresh version first: try a few rotations. */
        if (attempt < 4) {
            kms_info("key %02x%02x%02x%02x...: version %u reached its usage bound; rotating", id[0],
                     id[1], id[2], id[3], *vid);
            rotated_from = *vid;
            rc = kms_key_rotate(ks, id, KMS_ROTATE_USAGE, *vid);
        }
        if (attempt >= 4 || rc != KMS_OK) {
            kms_err_clear();
            rc = KMS_FAIL(KMS_ERR_INVALID_STATE,
                          "The key's current version reached its usage bound and the key could "
                          "not be rotated.");
            break;
        }
    }
    int ahead = 0;
    if (rc == KMS_OK) {
        u->remaining--;
        ahead = ks->running && ks->cfg.usage_block >= AHEAD_MIN && !u->refilling &&
                u->remaining <= u->block / 2;
        u->refilling |= ahead;
    }
    pthread_mutex_unlock(&u->lock);
    if (ahead && !queue_refill(ks, u)) {
        pthread_mutex_lock(&u->lock);
        u->refilling = 0;
        pthread_mutex_unlock(&u->lock);
    }
    return rc;
}

/*
 * A version this node indexed a moment ago may not have its key object's
 * handle yet: a refresh indexes the views first and attaches handles after,
 * and a rotation sets its new version's handle only after writing the record
 * and touching the change marker. A request meeting such a version looks the
 * object up itself rather than failing with KeyUnavailableException.
 */
static void attach_version(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], uint32_t vid)
{
    struct kms_session *s;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;

    pthread_rwlock_rdlock(&ks->rw);
    struct key *k = kms_key_find_locked(ks, id);
    const struct version *v = k ? version_locked(k, vid) : NULL;
    int unattached = v && v->handle == CK_INVALID_HANDLE;
    pthread_rwlock_unlock(&ks->rw);
    if (!unattached)
        return;
    if (kms_hsm_acquire(ks->hsm, &s) == KMS_OK) {
        if (kms_kek_find(s, id, vid, &h) != KMS_OK)
            h = CK_INVALID_HANDLE;
        kms_hsm_release(s);
    }
    kms_err_clear();
    if (h == CK_INVALID_HANDLE)
        return; /* the refresh marks it missing */
    pthread_rwlock_wrlock(&ks->rw);
    k = kms_key_find_locked(ks, id);
    for (size_t i = 0; k && i < k->nversions; i++)
        if (k->versions[i].vid == vid && k->versions[i].handle == CK_INVALID_HANDLE)
            k->versions[i].handle = h;
    pthread_rwlock_unlock(&ks->rw);
}

kms_err kms_keystore_encrypt(struct kms_keystore *ks, const char *ref,
                             const struct kms_buf *canonical_context, const uint8_t *plaintext,
                             size_t n, struct kms_buf *blob, struct kms_key_info *info)
{
    uint8_t header[KMS_BLOB_HEADER_LEN], iv[KMS_GCM_IV_LEN], id[KMS_UUID_LEN];
    struct kms_buf aad = KMS_BUF_INIT;
    struct kms_session *s = NULL;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    struct usage *u = NULL;
    uint32_t vid = 0, taken;
    struct key *k;
    kms_err rc;

    pthread_rwlock_rdlock(&ks->rw);
    rc = kms_resolve_locked(ks, ref, 1, &k);
    if (rc == KMS_OK)
        rc = usable_locked(ks, k);
    if (rc == KMS_OK) {
        memcpy(id, k->id, KMS_UUID_LEN);
        vid = k->current;
        u = k->usage;
    }
    pthread_rwlock_unlock(&ks->rw);
    KMS_GUARD(rc);

    taken = vid;
    KMS_GUARD(take_use(ks, id, u, &taken));
    attach_version(ks, id, taken);
    pthread_rwlock_rdlock(&ks->rw);
    k = kms_key_find_locked(ks, id);
    const struct version *v = k ? version_locked(k, taken) : NULL;
    if (!k)
        rc = KMS_FAIL(KMS_ERR_NOT_FOUND, "The key no longer exists");
    else if (!v || v->handle == CK_INVALID_HANDLE || v->handle == KEK_MISSING)
        rc = KMS_FAIL(KMS_ERR_KEY_UNAVAILABLE, "%skey/%s: its current key material is unavailable",
                      ks->arn_prefix, k->id_text);
    else
        rc = usable_locked(ks, k);
    if (rc == KMS_OK) {
        h = v->handle;
        kms_blob_header(k->id, taken, header);
        rc = kms_info_copy_locked(ks, k, info);
    }
    pthread_rwlock_unlock(&ks->rw);

    if (rc == KMS_OK && RAND_bytes(iv, sizeof iv) != 1)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "random generator failed");
    if (rc == KMS_OK)
        rc = kms_blob_aad(header, canonical_context, &aad);
    if (rc == KMS_OK)
        rc = kms_buf_reserve(blob, KMS_BLOB_OVERHEAD + n);
    if (rc == KMS_OK)
        rc = kms_hsm_acquire(ks->hsm, &s);
    if (rc == KMS_OK) {
        size_t at = blob->len + sizeof header + sizeof iv;
        rc = kms_hsm_gcm_encrypt(s, h, iv, aad.data, aad.len, plaintext, n, blob->data + at);
        kms_hsm_release(s);
    }
    if (rc == KMS_OK) {
        memcpy(blob->data + blob->len, header, sizeof header);
        memcpy(blob->data + blob->len + sizeof header, iv, sizeof iv);
        blob->len += KMS_BLOB_OVERHEAD + n;
    }
    kms_buf_free(&aad);
    return rc;
}

/* The handle of a blob's version, re-reading the key once when this node has not seen it. */
static kms_err blob_key(struct kms_keystore *ks, const struct kms_blob *blob,
                        const char *expect_ref, CK_OBJECT_HANDLE *h, struct kms_key_info *info)
{
    for (int pass = 0;; pass++) {
        struct key *k, *expected = NULL;
        const struct version *v = NULL;
        kms_err rc = KMS_OK;
        int unseen = 0;

        attach_version(ks, blob->key_id, blob->key_version);
        pthread_rwlock_rdlock(&ks->rw);
        if (expect_ref)
            rc = kms_resolve_locked(ks, expect_ref, 1, &expected);
        k = kms_key_any_locked(ks, blob->key_id);
        if (rc == KMS_OK) {
            if (!k) {
                unseen = 1;
                rc = KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT,
                              "The ciphertext refers to a key that does not exist");
            } else if (k->destroyed) {
                rc = KMS_FAIL(KMS_ERR_NOT_FOUND, "Key '%skey/%s' does not exist", ks->arn_prefix,
                              k->id_text);
            } else if (expected && expected != k) {
                rc = KMS_FAIL(KMS_ERR_INCORRECT_KEY,
                              "The key ID in the request does not identify the key that "
                              "encrypted the ciphertext");
            } else if ((v = version_locked(k, blob->key_version)) == NULL) {
                unseen = 1;
                rc = KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT,
                              "The ciphertext names a key version that does not exist");
            }
        }
        if (rc == KMS_OK)
            rc = usable_locked(ks, k);
        if (rc == KMS_OK && (v->handle == CK_INVALID_HANDLE || v->handle == KEK_MISSING))
            rc = KMS_FAIL(KMS_ERR_KEY_UNAVAILABLE, "%skey/%s: that key material is unavailable",
                          ks->arn_prefix, k->id_text);
        if (rc == KMS_OK) {
            *h = v->handle;
            rc = kms_info_copy_locked(ks, k, info);
        }
        pthread_rwlock_unlock(&ks->rw);
        if (rc == KMS_OK || !unseen || pass > 0)
            return rc;
        /* Made on another node since our last look: read that key now. */
        char msg[256];
        snprintf(msg, sizeof msg, "%s", kms_err_message());
        if (kms_refresh_key(ks, blob->key_id, blob->key_version) != KMS_OK) {
            kms_err_clear();
            return KMS_FAIL(rc, "%s", msg);
        }
    }
}

kms_err kms_keystore_decrypt(struct kms_keystore *ks, const uint8_t *p, size_t n,
                             const struct kms_buf *canonical_context, const char *expect_ref,
                             struct kms_buf *plaintext, struct kms_key_info *info)
{
    struct kms_blob blob;
    struct kms_buf aad = KMS_BUF_INIT;
    struct kms_session *s = NULL;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    kms_err rc;

    KMS_GUARD(kms_blob_decode(p, n, &blob));
    rc = blob_key(ks, &blob, expect_ref, &h, info);
    if (rc == KMS_OK)
        rc = kms_blob_aad(blob.header, canonical_context, &aad);
    if (rc == KMS_OK)
        rc = kms_buf_reserve(plaintext, blob.ciphertext_len);
    if (rc == KMS_OK)
        rc = kms_hsm_acquire(ks->hsm, &s);
    if (rc == KMS_OK) {
        rc = kms_hsm_gcm_decrypt(s, h, blob.iv, aad.data, aad.len, blob.ciphertext,
                                 blob.ciphertext_len + KMS_GCM_TAG_LEN,
                                 plaintext->data + plaintext->len);
        kms_hsm_release(s);
    }
    if (rc == KMS_OK)
        plaintext->len += blob.ciphertext_len;
    kms_buf_free(&aad);
    return rc;
}
