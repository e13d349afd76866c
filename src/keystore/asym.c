/*
 * Asymmetric and HMAC keys: their one version's private-key operations in
 * the token (through the same unwrapped session objects as AES versions:
 * kms_with_version), their public key from the stored version. Creation is
 * rotation.c's (kms_keystore_create_key_as); they are never rotated and count
 * no uses: only AES-GCM's random IVs need a bound.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "common/keyspec.h"
#include "common/pubkey.h"
#include "keystore/internal.h"

/*
 * The held key is usable and its spec and usage allow alg (alg < 0: any
 * asymmetric key); *vid is its current version, known to this node.
 */
static kms_err usable_for(struct kms_keystore *ks, struct kms_key_ref *key, int alg, uint32_t *vid,
                          int *spec, struct kms_key_info *info)
{
    KMS_ENSURE(key->entry != NULL, KMS_ERR_INTERNAL, "no key held");
    struct key *k = key->entry;
    pthread_mutex_lock(&ks->lock);
    const struct kms_spec_info *si = kms_spec(k->row.spec);
    const struct kms_alg_info *ai = kms_alg(alg);
    kms_err rc = k->row.state == KMS_STORE_DESTROYED
                     ? KMS_FAIL(KMS_ERR_NOT_FOUND, "Key '%skey/%s' does not exist", ks->arn_prefix,
                                k->id_text)
                     : kms_key_usable_locked(ks, k);
    if (rc == KMS_OK && alg >= 0 && !kms_alg_allowed(k->row.spec, k->row.usage, alg))
        rc = KMS_FAIL(KMS_ERR_INVALID_KEY_USAGE,
                      "%skey/%s is a %s key for %s: it does not support %s", ks->arn_prefix,
                      k->id_text, si ? si->name : "?", kms_usage_name(k->row.usage),
                      ai ? ai->name : "that algorithm");
    if (rc == KMS_OK && alg < 0 && (!si || si->kind == KMS_KIND_AES || si->kind == KMS_KIND_HMAC))
        rc = KMS_FAIL(KMS_ERR_UNSUPPORTED, "%skey/%s is a %s key: it has no public key",
                      ks->arn_prefix, k->id_text, si ? si->name : "?");
    *vid = k->row.current;
    *spec = k->row.spec;
    if (rc == KMS_OK)
        rc = kms_info_copy_locked(ks, k, info);
    int known = rc == KMS_OK && kms_version_locked(k, *vid) != NULL;
    pthread_mutex_unlock(&ks->lock);
    if (rc == KMS_OK && !known) {
        rc = kms_key_learn_version(ks, k, *vid);
        if (rc == KMS_ERR_NOT_FOUND)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "key %s: its current version is missing", k->id_text);
    }
    return rc;
}

kms_err kms_keystore_public_key(struct kms_keystore *ks, struct kms_key_ref *key,
                                struct kms_buf *spki, struct kms_key_info *info)
{
    uint32_t vid;
    int spec;
    KMS_GUARD(usable_for(ks, key, -1, &vid, &spec, info));
    pthread_mutex_lock(&ks->lock);
    const struct version *v = kms_version_locked(key->entry, vid);
    kms_err rc = v && v->public_key
                     ? kms_buf_append(spki, v->public_key, v->public_key_len)
                     : KMS_FAIL(KMS_ERR_INTERNAL, "key %s: no public key stored", key->id_text);
    pthread_mutex_unlock(&ks->lock);
    return rc;
}

kms_err kms_keystore_public_pkey(struct kms_keystore *ks, struct kms_key_ref *key, EVP_PKEY **out,
                                 struct kms_key_info *info)
{
    uint32_t vid;
    int spec;
    *out = NULL;
    KMS_GUARD(usable_for(ks, key, -1, &vid, &spec, info));
    pthread_mutex_lock(&ks->lock);
    struct version *v = kms_version_locked(key->entry, vid);
    kms_err rc = v && v->public_key
                     ? KMS_OK
                     : KMS_FAIL(KMS_ERR_INTERNAL, "key %s: no public key stored", key->id_text);
    if (rc == KMS_OK && !v->pkey)
        rc = kms_pubkey_parse(v->public_key, v->public_key_len, &v->pkey);
    if (rc == KMS_OK && EVP_PKEY_up_ref(v->pkey) != 1)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot take a reference to a public key");
    if (rc == KMS_OK)
        *out = v->pkey;
    pthread_mutex_unlock(&ks->lock);
    return rc;
}

struct sign_args {
    int spec, alg;
    const uint8_t *in;
    size_t n;
    uint8_t *sig;
    size_t *sig_len;
    size_t room;
};

static kms_err sign_in(void *arg, struct kms_session *s, CK_OBJECT_HANDLE h)
{
    struct sign_args *a = arg;
    *a->sig_len = a->room; /* a second try starts over */
    return kms_hsm_sign_alg(s, h, a->spec, a->alg, a->in, a->n, a->sig, a->sig_len);
}

kms_err kms_keystore_sign(struct kms_keystore *ks, struct kms_key_ref *key, int alg,
                          const uint8_t *in, size_t n, uint8_t *sig, size_t *sig_len,
                          struct kms_key_info *info)
{
    uint32_t vid;
    struct sign_args a = {0, alg, in, n, sig, sig_len, *sig_len};
    KMS_GUARD(usable_for(ks, key, alg, &vid, &a.spec, info));
    return kms_with_version(ks, key->entry, vid, sign_in, &a);
}

struct decrypt_args {
    int spec, alg;
    const uint8_t *ct;
    size_t n;
    struct kms_buf *pt;
    size_t len; /* pt's length before */
};

static kms_err decrypt_in(void *arg, struct kms_session *s, CK_OBJECT_HANDLE h)
{
    struct decrypt_args *a = arg;
    a->pt->len = a->len;
    return kms_hsm_oaep_decrypt(s, h, a->spec, a->alg, a->ct, a->n, a->pt);
}

kms_err kms_keystore_oaep_decrypt(struct kms_keystore *ks, struct kms_key_ref *key, int alg,
                                  const uint8_t *ct, size_t n, struct kms_buf *pt,
                                  struct kms_key_info *info)
{
    uint32_t vid;
    struct decrypt_args a = {0, alg, ct, n, pt, pt->len};
    const struct kms_alg_info *ai = kms_alg(alg);
    KMS_ENSURE(ai && ai->scheme == KMS_SCHEME_OAEP, KMS_ERR_INVALID_KEY_USAGE,
               "%s is not an RSAES_OAEP algorithm", ai ? ai->name : "that");
    KMS_GUARD(usable_for(ks, key, alg, &vid, &a.spec, info));
    return kms_with_version(ks, key->entry, vid, decrypt_in, &a);
}

struct derive_args {
    int spec;
    const uint8_t *peer;
    size_t n;
    struct kms_buf *secret;
    size_t len;
};

static kms_err derive_in(void *arg, struct kms_session *s, CK_OBJECT_HANDLE h)
{
    struct derive_args *a = arg;
    a->secret->len = a->len;
    return kms_hsm_ecdh(s, h, a->spec, a->peer, a->n, a->secret);
}

kms_err kms_keystore_derive(struct kms_keystore *ks, struct kms_key_ref *key, const uint8_t *peer,
                            size_t n, struct kms_buf *secret, struct kms_key_info *info)
{
    uint32_t vid;
    struct derive_args a = {0, peer, n, secret, secret->len};
    KMS_GUARD(usable_for(ks, key, KMS_ALG_ECDH, &vid, &a.spec, info));
    return kms_with_version(ks, key->entry, vid, derive_in, &a);
}
