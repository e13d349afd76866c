/*
 * Asymmetric and HMAC key versions in the token (hsm.h, "asymmetric and HMAC
 * key versions"): generated as session objects, wrapped at once under a root
 * and destroyed; unwrapped into the holder session for use; signatures,
 * MACs, RSAES-OAEP decryption and ECDH with them.
 *
 * Measured on Debian 12's SoftHSM2 2.6.1:
 * - mechanisms listed: RSA (PKCS, X_509, OAEP, PSS), CKM_EC_KEY_PAIR_GEN,
 *   CKM_ECDSA, CKM_ECDH1_DERIVE, CKM_EC_EDWARDS_KEY_PAIR_GEN, CKM_EDDSA,
 *   CKM_GENERIC_SECRET_KEY_GEN, CKM_SHA{224,256,384,512}_HMAC; not
 *   CKM_EC_MONTGOMERY_KEY_PAIR_GEN (no X25519 keys).
 * - CKM_RSA_PKCS_OAEP takes only hashAlg CKM_SHA_1 with CKG_MGF1_SHA1: SHA-256
 *   is refused at C_DecryptInit with CKR_ARGUMENTS_BAD. For it the token does
 *   the raw RSA operation (CKM_RSA_X_509) and the padding is removed here.
 * - CKA_EC_POINT is a DER OCTET STRING around the point, for Weierstrass and
 *   Edwards keys alike; CKM_ECDH1_DERIVE takes the peer's point raw or in
 *   an OCTET STRING (we pass it raw, which PKCS#11 requires every token to take).
 * - CKM_EC_EDWARDS_KEY_PAIR_GEN takes CKA_EC_PARAMS as the OID 1.3.101.112
 *   or as the PrintableString "edwards25519"; we send the OID (RFC 8410).
 *   CKM_EDDSA signs with such a key, but C_WrapKey refuses its private half
 *   (CKR_KEY_NOT_WRAPPABLE: 2.6.1 wraps RSA, DSA, DH and EC private keys
 *   only), so Ed25519 keys cannot be wrapped versions on it: UNSUPPORTED.
 */
#include "config.h"

#include <openssl/asn1.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/param_build.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <p11-kit/p11-kit.h>
#include <stdlib.h>
#include <string.h>

#include "common/keyspec.h"
#include "common/log.h"
#include "common/pubkey.h"
#include "hsm/hsm.h"
#include "hsm/internal.h"

/* The one answer to every ciphertext that does not decrypt: no padding oracle. */
#define OAEP_INVALID "The ciphertext is not valid for this key and algorithm"

#define RSA_MAX_BYTES 512 /* RSA-4096 */
#define EC_FIELD_MAX 66   /* P-521 */

int kms_hsm_has_mechanism(struct kms_hsm *hsm, CK_MECHANISM_TYPE m)
{
    int found = 0;
    pthread_mutex_lock(&hsm->caps_lock);
    if (!hsm->mechs_read) {
        /* The whole list at once: one call, asked the first time any mechanism is. */
        CK_ULONG n = 0;
        CK_RV rv = hsm->fn->C_GetMechanismList(hsm->slot, NULL, &n);
        CK_MECHANISM_TYPE *list = rv == CKR_OK ? calloc(n ? n : 1, sizeof *list) : NULL;
        if (list)
            rv = hsm->fn->C_GetMechanismList(hsm->slot, list, &n);
        if (rv == CKR_OK && list) {
            hsm->mechs = list;
            hsm->nmechs = n;
            hsm->mechs_read = 1;
        } else {
            /* Not remembered: asked again next time. */
            free(list);
            kms_error("C_GetMechanismList failed: %s", p11_kit_strerror(rv));
        }
    }
    for (size_t i = 0; i < hsm->nmechs && !found; i++)
        found = hsm->mechs[i] == m;
    pthread_mutex_unlock(&hsm->caps_lock);
    return found;
}

static const char *mechanism_name(CK_MECHANISM_TYPE m)
{
    switch (m) {
    case CKM_RSA_PKCS_KEY_PAIR_GEN: return "CKM_RSA_PKCS_KEY_PAIR_GEN";
    case CKM_EC_KEY_PAIR_GEN: return "CKM_EC_KEY_PAIR_GEN";
    case CKM_EC_EDWARDS_KEY_PAIR_GEN: return "CKM_EC_EDWARDS_KEY_PAIR_GEN";
    case CKM_EC_MONTGOMERY_KEY_PAIR_GEN: return "CKM_EC_MONTGOMERY_KEY_PAIR_GEN";
    case CKM_GENERIC_SECRET_KEY_GEN: return "CKM_GENERIC_SECRET_KEY_GEN";
    case CKM_RSA_X_509: return "CKM_RSA_X_509";
    default: return "a mechanism";
    }
}

static kms_err need_mechanism(struct kms_hsm *hsm, CK_MECHANISM_TYPE m, const char *spec)
{
    KMS_ENSURE(kms_hsm_has_mechanism(hsm, m), KMS_ERR_UNSUPPORTED,
               "The key store's token does not offer %s, which %s keys need", mechanism_name(m),
               spec);
    return KMS_OK;
}

/* The spec's table entry, when spec is an asymmetric or HMAC spec that allows usage. */
static kms_err spec_for(int spec, int usage, const struct kms_spec_info **out)
{
    const struct kms_spec_info *info = kms_spec(spec);
    KMS_ENSURE(info && info->kind != KMS_KIND_AES, KMS_ERR_VALIDATION,
               "Key spec %d is not an asymmetric or HMAC key spec", spec);
    KMS_ENSURE(usage >= 0 && usage < KMS_USAGE_COUNT && (info->usages & KMS_USAGE_BIT(usage)),
               KMS_ERR_VALIDATION, "Key spec %s does not allow key usage %s", info->name,
               kms_usage_name(usage));
    *out = info;
    return KMS_OK;
}

static CK_KEY_TYPE key_type(enum kms_key_kind kind)
{
    switch (kind) {
    case KMS_KIND_RSA: return CKK_RSA;
    case KMS_KIND_EC: return CKK_EC;
    case KMS_KIND_EDWARDS: return CKK_EC_EDWARDS;
    case KMS_KIND_MONTGOMERY: return CKK_EC_MONTGOMERY;
    case KMS_KIND_HMAC: return CKK_GENERIC_SECRET;
    case KMS_KIND_AES: break;
    }
    return CKK_AES;
}

static CK_MECHANISM_TYPE generator(enum kms_key_kind kind)
{
    switch (kind) {
    case KMS_KIND_RSA: return CKM_RSA_PKCS_KEY_PAIR_GEN;
    case KMS_KIND_EC: return CKM_EC_KEY_PAIR_GEN;
    case KMS_KIND_EDWARDS: return CKM_EC_EDWARDS_KEY_PAIR_GEN;
    case KMS_KIND_MONTGOMERY: return CKM_EC_MONTGOMERY_KEY_PAIR_GEN;
    case KMS_KIND_HMAC: return CKM_GENERIC_SECRET_KEY_GEN;
    case KMS_KIND_AES: break;
    }
    return CKM_AES_KEY_GEN;
}

/* Bytes of a coordinate (EC), of a key (Edwards, Montgomery). */
static size_t field_bytes(const struct kms_spec_info *info)
{
    return (info->bits + 7) / 8;
}

/* CKA_EC_PARAMS: the DER OID of the spec's curve (RFC 5480, RFC 8410). */
static kms_err curve_params(const struct kms_spec_info *info, uint8_t *out, size_t room,
                            size_t *len)
{
    const ASN1_OBJECT *oid = OBJ_nid2obj(info->nid);
    int n = oid ? i2d_ASN1_OBJECT(oid, NULL) : -1;
    KMS_ENSURE(n > 0 && (size_t)n <= room, KMS_ERR_INTERNAL, "no OID for the curve of %s",
               info->name);
    unsigned char *p = out;
    KMS_ENSURE(i2d_ASN1_OBJECT(oid, &p) == n, KMS_ERR_INTERNAL, "cannot encode the OID of %s",
               info->name);
    *len = (size_t)n;
    return KMS_OK;
}

/*
 * The point in a CKA_EC_POINT: a DER OCTET STRING around it (SoftHSM2, as
 * PKCS#11 says), or the bare point (some tokens). want is its length.
 */
static kms_err ec_point(const struct kms_buf *attr, size_t want, const uint8_t **pt)
{
    if (attr->len == want) {
        *pt = attr->data;
        return KMS_OK;
    }
    const unsigned char *p = attr->data;
    ASN1_OCTET_STRING *os = d2i_ASN1_OCTET_STRING(NULL, &p, (long)attr->len);
    int ok = os && p == attr->data + attr->len && (size_t)ASN1_STRING_length(os) == want;
    ASN1_OCTET_STRING_free(os);
    KMS_ENSURE(ok, KMS_ERR_INTERNAL, "the token's CKA_EC_POINT is not a point of %zu bytes", want);
    /* The content is the tail of the encoding. */
    *pt = attr->data + attr->len - want;
    return KMS_OK;
}

static kms_err append_spki(EVP_PKEY *pkey, struct kms_buf *out)
{
    int n = pkey ? i2d_PUBKEY(pkey, NULL) : -1;
    KMS_ENSURE(n > 0, KMS_ERR_INTERNAL, "cannot encode the public key");
    KMS_GUARD(kms_buf_reserve(out, (size_t)n));
    unsigned char *p = out->data + out->len;
    KMS_ENSURE(i2d_PUBKEY(pkey, &p) == n, KMS_ERR_INTERNAL, "cannot encode the public key");
    out->len += (size_t)n;
    return KMS_OK;
}

/* The public half of a key pair in the token, as DER SubjectPublicKeyInfo appended to out. */
static kms_err public_spki(struct kms_session *s, CK_OBJECT_HANDLE pub,
                           const struct kms_spec_info *info, struct kms_buf *out)
{
    struct kms_buf a = KMS_BUF_INIT, b = KMS_BUF_INIT;
    EVP_PKEY *pkey = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    OSSL_PARAM_BLD *bld = NULL;
    OSSL_PARAM *params = NULL;
    BIGNUM *n = NULL, *e = NULL;
    const uint8_t *pt;
    kms_err rc;

    if (info->kind == KMS_KIND_RSA) {
        rc = kms_hsm_get_bytes(s, pub, CKA_MODULUS, &a);
        if (rc == KMS_OK)
            rc = kms_hsm_get_bytes(s, pub, CKA_PUBLIC_EXPONENT, &b);
        if (rc != KMS_OK)
            goto cleanup;
        n = BN_bin2bn(a.data, (int)a.len, NULL);
        e = BN_bin2bn(b.data, (int)b.len, NULL);
        bld = OSSL_PARAM_BLD_new();
        if (n && e && bld && OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n) &&
            OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e))
            params = OSSL_PARAM_BLD_to_param(bld);
        ctx = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    } else if (info->kind == KMS_KIND_EC) {
        rc = kms_hsm_get_bytes(s, pub, CKA_EC_POINT, &a);
        if (rc == KMS_OK)
            rc = ec_point(&a, 1 + 2 * field_bytes(info), &pt);
        if (rc != KMS_OK)
            goto cleanup;
        bld = OSSL_PARAM_BLD_new();
        if (bld &&
            OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, OBJ_nid2sn(info->nid),
                                            0) &&
            OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, pt,
                                             1 + 2 * field_bytes(info)))
            params = OSSL_PARAM_BLD_to_param(bld);
        ctx = EVP_PKEY_CTX_new_from_name(NULL, "EC", NULL);
    } else {
        /* Edwards, Montgomery: the 32 raw bytes of RFC 8032 / RFC 7748. */
        rc = kms_hsm_get_bytes(s, pub, CKA_EC_POINT, &a);
        if (rc == KMS_OK)
            rc = ec_point(&a, field_bytes(info), &pt);
        if (rc != KMS_OK)
            goto cleanup;
        pkey = EVP_PKEY_new_raw_public_key(info->kind == KMS_KIND_EDWARDS ? EVP_PKEY_ED25519
                                                                          : EVP_PKEY_X25519,
                                           NULL, pt, field_bytes(info));
    }
    if (!pkey && !(params && ctx && EVP_PKEY_fromdata_init(ctx) == 1 &&
                   EVP_PKEY_fromdata(ctx, &pkey, EVP_PKEY_PUBLIC_KEY, params) == 1)) {
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "the token's public key of %s does not load", info->name);
        goto cleanup;
    }
    rc = append_spki(pkey, out);
cleanup:
    ERR_clear_error();
    EVP_PKEY_free(pkey);
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(n);
    BN_free(e);
    kms_buf_free(&a);
    kms_buf_free(&b);
    return rc;
}

static kms_err destroy_object(struct kms_session *s, CK_OBJECT_HANDLE h)
{
    if (h == CK_INVALID_HANDLE)
        return KMS_OK;
    TIMED(s->hsm, KMS_HSM_DESTROY);
    return SESSION_ERR(s, s->hsm->fn->C_DestroyObject(s->handle, h), "C_DestroyObject");
}

kms_err kms_hsm_new_wrapped_key(struct kms_session *s, CK_OBJECT_HANDLE root, int spec, int usage,
                                uint8_t *wrapped, size_t *len, struct kms_buf *spki)
{
    const struct kms_spec_info *info;
    KMS_GUARD(spec_for(spec, usage, &info));
    CK_MECHANISM gen = {generator(info->kind), NULL, 0}, wrap = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
    KMS_GUARD(need_mechanism(s->hsm, gen.mechanism, info->name));

    CK_FUNCTION_LIST *fn = s->hsm->fn;
    CK_KEY_TYPE kt = key_type(info->kind);
    CK_OBJECT_CLASS secret = CKO_SECRET_KEY;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_BBOOL dec = usage == KMS_USAGE_ENCRYPT_DECRYPT ? CK_TRUE : CK_FALSE;
    CK_BBOOL sign = usage == KMS_USAGE_SIGN_VERIFY || usage == KMS_USAGE_GENERATE_VERIFY_MAC
                        ? CK_TRUE
                        : CK_FALSE;
    CK_BBOOL derive = usage == KMS_USAGE_KEY_AGREEMENT ? CK_TRUE : CK_FALSE;
    CK_ULONG bits = info->bits, vlen = info->bits / 8, wlen = *len;
    static const uint8_t e65537[] = {0x01, 0x00, 0x01};
    uint8_t params[16];
    size_t params_len = 0;
    CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
    struct kms_buf der = KMS_BUF_INIT;
    kms_err rc = KMS_OK, drc;
    CK_RV rv;

    /*
     * The private half (or the secret): a session object, extractable only
     * so that it can be wrapped once; it lives until the wrap.
     */
    CK_ATTRIBUTE priv_tmpl[] = {
        {CKA_TOKEN, &no, sizeof no},          {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_SENSITIVE, &yes, sizeof yes},    {CKA_EXTRACTABLE, &yes, sizeof yes},
        {CKA_DECRYPT, &dec, sizeof dec},      {CKA_SIGN, &sign, sizeof sign},
        {CKA_DERIVE, &derive, sizeof derive}, {CKA_UNWRAP, &no, sizeof no},
        {CKA_KEY_TYPE, &kt, sizeof kt},       {CKA_CLASS, &secret, sizeof secret},
        {CKA_VALUE_LEN, &vlen, sizeof vlen},  {CKA_ENCRYPT, &no, sizeof no},
        {CKA_VERIFY, &sign, sizeof sign},     {CKA_WRAP, &no, sizeof no},
    };
    /* The public half, read once for its SubjectPublicKeyInfo. */
    CK_ATTRIBUTE pub_tmpl[] = {
        {CKA_TOKEN, &no, sizeof no},
        {CKA_PRIVATE, &no, sizeof no},
        {CKA_ENCRYPT, &dec, sizeof dec},
        {CKA_VERIFY, &sign, sizeof sign},
        {CKA_DERIVE, &derive, sizeof derive},
        {CKA_WRAP, &no, sizeof no},
        {CKA_MODULUS_BITS, &bits, sizeof bits},
        {CKA_PUBLIC_EXPONENT, (void *)e65537, sizeof e65537},
    };
    CK_ULONG npub = 6;
    if (info->kind == KMS_KIND_RSA) {
        npub = 8;
    } else if (info->kind != KMS_KIND_HMAC) {
        KMS_GUARD(curve_params(info, params, sizeof params, &params_len));
        pub_tmpl[6].type = CKA_EC_PARAMS;
        pub_tmpl[6].pValue = params;
        pub_tmpl[6].ulValueLen = params_len;
        npub = 7;
    }

    if (info->kind == KMS_KIND_HMAC) {
        /* All fourteen: class, key type and length, and sign/verify alone. */
        TIMED(s->hsm, KMS_HSM_GENERATE);
        rv = fn->C_GenerateKey(s->handle, &gen, priv_tmpl, sizeof priv_tmpl / sizeof priv_tmpl[0],
                               &priv);
    } else {
        /* The first eight: the rest are for a secret key only. */
        TIMED(s->hsm, KMS_HSM_GENERATE_PAIR);
        rv = fn->C_GenerateKeyPair(s->handle, &gen, pub_tmpl, npub, priv_tmpl, 8, &pub, &priv);
    }
    rc = SESSION_ERR(s, rv,
                     info->kind == KMS_KIND_HMAC ? "C_GenerateKey (HMAC key version)"
                                                 : "C_GenerateKeyPair (key version)");
    if (rc == KMS_OK && info->kind != KMS_KIND_HMAC)
        rc = public_spki(s, pub, info, &der);
    if (rc == KMS_OK) {
        TIMED(s->hsm, KMS_HSM_WRAP);
        rv = fn->C_WrapKey(s->handle, &wrap, root, priv, wrapped, &wlen);
        /*
         * A token that makes a kind of key but cannot wrap it (SoftHSM2 2.6.1
         * and Ed25519) cannot hold it as a wrapped version.
         */
        if (rv == CKR_KEY_NOT_WRAPPABLE)
            rc = KMS_FAIL(KMS_ERR_UNSUPPORTED,
                          "The key store's token cannot wrap %s private keys (C_WrapKey with "
                          "CKM_AES_KEY_WRAP_PAD)",
                          info->name);
        else
            rc = SESSION_ERR(s, rv, "C_WrapKey");
    }
    /* Both objects go, whatever happened. */
    drc = destroy_object(s, priv);
    if (rc == KMS_OK)
        rc = drc;
    drc = destroy_object(s, pub);
    if (rc == KMS_OK)
        rc = drc;
    if (rc == KMS_OK)
        rc = kms_buf_append(spki, der.data, der.len);
    if (rc == KMS_OK)
        *len = wlen;
    else
        OPENSSL_cleanse(wrapped, *len);
    kms_buf_free(&der);
    return rc;
}

kms_err kms_hsm_unwrap_key(struct kms_session *holder, CK_OBJECT_HANDLE root, int spec, int usage,
                           const uint8_t *wrapped, size_t len, CK_OBJECT_HANDLE *out)
{
    const struct kms_spec_info *info;
    KMS_GUARD(spec_for(spec, usage, &info));
    TIMED(holder->hsm, KMS_HSM_UNWRAP);
    CK_MECHANISM wrap = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
    CK_OBJECT_CLASS cls = info->kind == KMS_KIND_HMAC ? CKO_SECRET_KEY : CKO_PRIVATE_KEY;
    CK_KEY_TYPE kt = key_type(info->kind);
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    /* Only what the usage needs: an HMAC key signs (verifying is signing again). */
    CK_BBOOL dec = usage == KMS_USAGE_ENCRYPT_DECRYPT ? CK_TRUE : CK_FALSE;
    CK_BBOOL sign = usage == KMS_USAGE_SIGN_VERIFY || usage == KMS_USAGE_GENERATE_VERIFY_MAC
                        ? CK_TRUE
                        : CK_FALSE;
    CK_BBOOL derive = usage == KMS_USAGE_KEY_AGREEMENT ? CK_TRUE : CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_TOKEN, &no, sizeof no},
        {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no},
        {CKA_DECRYPT, &dec, sizeof dec},
        {CKA_SIGN, &sign, sizeof sign},
        {CKA_DERIVE, &derive, sizeof derive},
        {CKA_UNWRAP, &no, sizeof no},
        /* secret keys only */
        {CKA_ENCRYPT, &no, sizeof no},
        {CKA_VERIFY, &no, sizeof no},
        {CKA_WRAP, &no, sizeof no},
    };
    CK_ULONG n = info->kind == KMS_KIND_HMAC ? sizeof tmpl / sizeof tmpl[0] : 10;
    CK_RV rv = holder->hsm->fn->C_UnwrapKey(holder->handle, &wrap, root, (CK_BYTE *)wrapped, len,
                                            tmpl, n, out);
    if (rv != CKR_OK)
        return kms_hsm_unwrap_failed(holder, rv, __FILE__, __LINE__);
    holder->last_rv = rv;
    return KMS_OK;
}

/* ---- signatures and MACs ------------------------------------------------------ */

static CK_MECHANISM_TYPE hash_mechanism(int md_nid)
{
    switch (md_nid) {
    case NID_sha1: return CKM_SHA_1;
    case NID_sha224: return CKM_SHA224;
    case NID_sha256: return CKM_SHA256;
    case NID_sha384: return CKM_SHA384;
    default: return CKM_SHA512;
    }
}

static CK_RSA_PKCS_MGF_TYPE mgf1(int md_nid)
{
    switch (md_nid) {
    case NID_sha1: return CKG_MGF1_SHA1;
    case NID_sha224: return CKG_MGF1_SHA224;
    case NID_sha256: return CKG_MGF1_SHA256;
    case NID_sha384: return CKG_MGF1_SHA384;
    default: return CKG_MGF1_SHA512;
    }
}

static CK_MECHANISM_TYPE hmac_mechanism(int md_nid)
{
    switch (md_nid) {
    case NID_sha224: return CKM_SHA224_HMAC;
    case NID_sha256: return CKM_SHA256_HMAC;
    case NID_sha384: return CKM_SHA384_HMAC;
    default: return CKM_SHA512_HMAC;
    }
}

/*
 * The DER DigestInfo prefix for each digest (RFC 8017 §9.2, note 1): the
 * SEQUENCE of the AlgorithmIdentifier (OID, NULL) and the OCTET STRING's
 * header; the digest follows.
 */
static const uint8_t digest_info_sha256[] = {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60,
                                             0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                                             0x01, 0x05, 0x00, 0x04, 0x20};
static const uint8_t digest_info_sha384[] = {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60,
                                             0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                                             0x02, 0x05, 0x00, 0x04, 0x30};
static const uint8_t digest_info_sha512[] = {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60,
                                             0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
                                             0x03, 0x05, 0x00, 0x04, 0x40};

static kms_err digest_info(int md_nid, const uint8_t *digest, size_t n, uint8_t *out, size_t *len)
{
    const uint8_t *prefix;
    size_t plen;
    switch (md_nid) {
    case NID_sha256:
        prefix = digest_info_sha256;
        plen = sizeof digest_info_sha256;
        break;
    case NID_sha384:
        prefix = digest_info_sha384;
        plen = sizeof digest_info_sha384;
        break;
    case NID_sha512:
        prefix = digest_info_sha512;
        plen = sizeof digest_info_sha512;
        break;
    default: return KMS_FAIL(KMS_ERR_INTERNAL, "no DigestInfo for digest %d", md_nid);
    }
    KMS_ENSURE(prefix[plen - 1] == n, KMS_ERR_INTERNAL, "DigestInfo length mismatch");
    memcpy(out, prefix, plen);
    memcpy(out + plen, digest, n);
    *len = plen + n;
    return KMS_OK;
}

/* r || s (each half the length) as DER ECDSA-Sig-Value, AWS's form; *len: room in, length out. */
static kms_err ecdsa_der(const uint8_t *rs, size_t n, uint8_t *out, size_t *len)
{
    ECDSA_SIG *sig = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(rs, (int)(n / 2), NULL), *sv = BN_bin2bn(rs + n / 2, (int)(n / 2), NULL);
    int dn = -1;
    if (sig && r && sv && ECDSA_SIG_set0(sig, r, sv) == 1) {
        r = sv = NULL; /* the signature owns them now */
        dn = i2d_ECDSA_SIG(sig, NULL);
        unsigned char *p = out;
        if (dn <= 0 || (size_t)dn > *len || i2d_ECDSA_SIG(sig, &p) != dn)
            dn = -1;
    }
    BN_free(r);
    BN_free(sv);
    ECDSA_SIG_free(sig);
    KMS_ENSURE(dn > 0, KMS_ERR_INTERNAL, "cannot encode the ECDSA signature in %zu bytes", *len);
    *len = (size_t)dn;
    return KMS_OK;
}

kms_err kms_hsm_sign_alg(struct kms_session *s, CK_OBJECT_HANDLE key, int spec, int alg,
                         const uint8_t *in, size_t n, uint8_t *out, size_t *out_len)
{
    const struct kms_spec_info *info = kms_spec(spec);
    const struct kms_alg_info *a = kms_alg(alg);
    KMS_ENSURE(info && a && a->scheme != KMS_SCHEME_OAEP && a->scheme != KMS_SCHEME_ECDH &&
                   kms_alg_allowed(spec, a->usage, alg),
               KMS_ERR_VALIDATION, "Algorithm %s does not sign with a key of spec %s",
               a ? a->name : "?", info ? info->name : "?");
    int digested = a->scheme == KMS_SCHEME_PSS || a->scheme == KMS_SCHEME_PKCS1 ||
                   a->scheme == KMS_SCHEME_ECDSA;
    KMS_ENSURE(!digested || n == a->md_len, KMS_ERR_VALIDATION,
               "The digest is %zu bytes; %s takes a digest of %zu bytes", n, a->name, a->md_len);

    CK_RSA_PKCS_PSS_PARAMS pss = {hash_mechanism(a->md_nid), mgf1(a->md_nid), a->md_len};
    CK_MECHANISM mech = {CKM_RSA_PKCS, NULL, 0};
    uint8_t input[128], sig[KMS_SIGNATURE_MAX];
    size_t input_len = n;
    const uint8_t *data = in;
    CK_ULONG sig_len = sizeof sig;
    kms_err rc;

    switch (a->scheme) {
    case KMS_SCHEME_PSS:
        mech.mechanism = CKM_RSA_PKCS_PSS;
        mech.pParameter = &pss;
        mech.ulParameterLen = sizeof pss;
        break;
    case KMS_SCHEME_PKCS1:
        KMS_GUARD(digest_info(a->md_nid, in, n, input, &input_len));
        data = input;
        break;
    case KMS_SCHEME_ECDSA: mech.mechanism = CKM_ECDSA; break;
    case KMS_SCHEME_EDDSA: mech.mechanism = CKM_EDDSA; break;
    default: mech.mechanism = hmac_mechanism(a->md_nid); break;
    }

    {
        TIMED(s->hsm, KMS_HSM_SIGN);
        CK_FUNCTION_LIST *fn = s->hsm->fn;
        CK_RV rv = fn->C_SignInit(s->handle, &mech, key);
        rc = SESSION_ERR(s, rv, "C_SignInit");
        if (rc == KMS_OK)
            rc = SESSION_ERR(s, fn->C_Sign(s->handle, (CK_BYTE *)data, input_len, sig, &sig_len),
                             "C_Sign");
    }
    if (rc == KMS_OK && a->scheme == KMS_SCHEME_ECDSA) {
        size_t want = 2 * field_bytes(info);
        if (sig_len != want) {
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "token returned %lu bytes for ECDSA, not %zu",
                          (unsigned long)sig_len, want);
        } else {
            size_t dlen = *out_len;
            rc = ecdsa_der(sig, sig_len, out, &dlen);
            if (rc == KMS_OK)
                *out_len = dlen;
        }
    } else if (rc == KMS_OK) {
        size_t want = a->scheme == KMS_SCHEME_HMAC    ? a->md_len
                      : a->scheme == KMS_SCHEME_EDDSA ? 64
                                                      : info->bits / 8;
        if (sig_len != want || sig_len > *out_len) {
            rc =
                KMS_FAIL(KMS_ERR_INTERNAL, "token returned %lu bytes for %s (%zu wanted, room %zu)",
                         (unsigned long)sig_len, a->name, want, *out_len);
        } else {
            memcpy(out, sig, sig_len);
            *out_len = sig_len;
        }
    }
    /* A MAC is a secret until it is handed out. */
    OPENSSL_cleanse(sig, sizeof sig);
    OPENSSL_cleanse(input, sizeof input);
    return rc;
}

/* ---- RSAES-OAEP ----------------------------------------------------------------- */

/*
 * Removes OAEP padding from em (k bytes, the raw RSA result) into pt, in
 * constant time: OpenSSL's check is the only one we trust to be. It is
 * deprecated in OpenSSL 3 only because EVP_PKEY_decrypt does the whole of it
 * for keys OpenSSL holds; ours is in the token, so the padding check must
 * stand alone. The suppression covers this call and nothing else.
 */
static int oaep_unpad(uint8_t *pt, size_t room, const uint8_t *em, size_t k, const EVP_MD *md)
{
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
    int n = RSA_padding_check_PKCS1_OAEP_mgf1(pt, (int)room, em, (int)k, (int)k, NULL, 0, md, md);
#pragma GCC diagnostic pop
    ERR_clear_error();
    return n;
}

kms_err kms_hsm_oaep_decrypt(struct kms_session *s, CK_OBJECT_HANDLE key, int spec, int alg,
                             const uint8_t *ct, size_t n, struct kms_buf *out)
{
    const struct kms_spec_info *info = kms_spec(spec);
    const struct kms_alg_info *a = kms_alg(alg);
    KMS_ENSURE(info && a && a->scheme == KMS_SCHEME_OAEP &&
                   kms_alg_allowed(spec, KMS_USAGE_ENCRYPT_DECRYPT, alg),
               KMS_ERR_VALIDATION, "Algorithm %s does not decrypt with a key of spec %s",
               a ? a->name : "?", info ? info->name : "?");
    size_t k = info->bits / 8;
    /* The length is public: checked before the token sees it, with the same answer. */
    KMS_ENSURE(n == k, KMS_ERR_INVALID_CIPHERTEXT, OAEP_INVALID);

    struct kms_hsm *hsm = s->hsm;
    CK_FUNCTION_LIST *fn = hsm->fn;
    CK_RSA_PKCS_OAEP_PARAMS params = {hash_mechanism(a->md_nid), mgf1(a->md_nid),
                                      CKZ_DATA_SPECIFIED, NULL, 0};
    CK_MECHANISM oaep = {CKM_RSA_PKCS_OAEP, &params, sizeof params}, raw = {CKM_RSA_X_509, NULL, 0};
    uint8_t buf[RSA_MAX_BYTES], pt[RSA_MAX_BYTES];
    CK_ULONG len = sizeof buf;
    int mode = __atomic_load_n(&hsm->oaep_mode[alg], __ATOMIC_ACQUIRE);
    int plen = -1;
    kms_err rc = KMS_OK;
    CK_RV rv;

    TIMED(hsm, KMS_HSM_DECRYPT);
    if (mode == KMS_OAEP_UNKNOWN && !kms_hsm_has_mechanism(hsm, CKM_RSA_PKCS_OAEP))
        mode = KMS_OAEP_RAW;
    if (mode != KMS_OAEP_RAW) {
        rv = fn->C_DecryptInit(s->handle, &oaep, key);
        if (mode == KMS_OAEP_UNKNOWN) {
            /* Decided once per algorithm: the token takes these parameters or it does not. */
            if (rv == CKR_ARGUMENTS_BAD || rv == CKR_MECHANISM_PARAM_INVALID ||
                rv == CKR_MECHANISM_INVALID)
                mode = KMS_OAEP_RAW;
            else if (rv == CKR_OK)
                mode = KMS_OAEP_TOKEN;
            if (mode != KMS_OAEP_UNKNOWN) {
                __atomic_store_n(&hsm->oaep_mode[alg], (unsigned char)mode, __ATOMIC_RELEASE);
                kms_info("token: %s %s", a->name,
                         mode == KMS_OAEP_TOKEN
                             ? "is done by the token (CKM_RSA_PKCS_OAEP)"
                             : "padding is removed in the process (the token does CKM_RSA_X_509)");
            }
        }
        if (mode != KMS_OAEP_RAW) {
            if (rv == CKR_OK)
                rv = fn->C_Decrypt(s->handle, (CK_BYTE *)ct, n, pt, &len);
            plen = rv == CKR_OK ? (int)len : -1;
        }
    }
    if (mode == KMS_OAEP_RAW) {
        rc = need_mechanism(hsm, CKM_RSA_X_509, info->name);
        if (rc == KMS_OK) {
            rv = fn->C_DecryptInit(s->handle, &raw, key);
            if (rv == CKR_OK)
                rv = fn->C_Decrypt(s->handle, (CK_BYTE *)ct, n, buf, &len);
            if (rv == CKR_OK && len <= k) {
                /* A token may drop the leading zero bytes: put them back. */
                memmove(buf + (k - len), buf, len);
                memset(buf, 0, k - len);
                plen = oaep_unpad(pt, sizeof pt, buf, k, EVP_get_digestbynid(a->md_nid));
            }
        }
    }
    if (rc == KMS_OK) {
        s->last_rv = rv;
        if (kms_hsm_session_fault(rv)) {
            s->broken = 1;
            rc = kms_hsm_fail(rv, "C_Decrypt (RSAES-OAEP)", __FILE__, __LINE__);
        } else if (rv == CKR_OK || rv == CKR_ENCRYPTED_DATA_INVALID ||
                   rv == CKR_ENCRYPTED_DATA_LEN_RANGE || rv == CKR_GENERAL_ERROR ||
                   rv == CKR_FUNCTION_FAILED || rv == CKR_DATA_INVALID ||
                   rv == CKR_DATA_LEN_RANGE) {
            /* The token's refusal and a bad padding look alike from outside. */
            rc = plen >= 0 ? kms_buf_append(out, pt, (size_t)plen)
                           : KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT, OAEP_INVALID);
        } else {
            rc = kms_hsm_fail(rv, "C_Decrypt (RSAES-OAEP)", __FILE__, __LINE__);
        }
    }
    OPENSSL_cleanse(buf, sizeof buf);
    OPENSSL_cleanse(pt, sizeof pt);
    return rc;
}

/* ---- ECDH ----------------------------------------------------------------------- */

kms_err kms_hsm_ecdh(struct kms_session *s, CK_OBJECT_HANDLE key, int spec, const uint8_t *peer,
                     size_t n, struct kms_buf *out)
{
    const struct kms_spec_info *info = kms_spec(spec);
    KMS_ENSURE(info && (info->kind == KMS_KIND_EC || info->kind == KMS_KIND_MONTGOMERY),
               KMS_ERR_VALIDATION, "Key spec %s does not do key agreement",
               info ? info->name : "?");
    size_t fs = field_bytes(info);
    size_t want = info->kind == KMS_KIND_EC ? 1 + 2 * fs : fs;
    KMS_ENSURE(n == want && (info->kind != KMS_KIND_EC || peer[0] == 0x04), KMS_ERR_VALIDATION,
               "The peer's public point is not an uncompressed point of %s", info->name);

    TIMED(s->hsm, KMS_HSM_DERIVE);
    CK_FUNCTION_LIST *fn = s->hsm->fn;
    /* The raw point: every token must take it (PKCS#11 2.40 §2.3.13). */
    CK_ECDH1_DERIVE_PARAMS params = {CKD_NULL, 0, NULL, n, (CK_BYTE *)peer};
    CK_MECHANISM mech = {CKM_ECDH1_DERIVE, &params, sizeof params};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ULONG vlen = fs;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    /* Readable, so that its value can be handed out; it lives only until read. */
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},       {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_VALUE_LEN, &vlen, sizeof vlen}, {CKA_TOKEN, &no, sizeof no},
        {CKA_PRIVATE, &yes, sizeof yes},     {CKA_SENSITIVE, &no, sizeof no},
        {CKA_EXTRACTABLE, &yes, sizeof yes},
    };
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    uint8_t secret[EC_FIELD_MAX];
    CK_ATTRIBUTE value = {CKA_VALUE, secret, sizeof secret};
    kms_err rc, drc;

    rc = SESSION_ERR(s,
                     fn->C_DeriveKey(s->handle, &mech, key, tmpl, sizeof tmpl / sizeof tmpl[0], &h),
                     "C_DeriveKey (ECDH)");
    if (rc == KMS_OK)
        rc = SESSION_ERR(s, fn->C_GetAttributeValue(s->handle, h, &value, 1),
                         "C_GetAttributeValue (ECDH secret)");
    if (rc == KMS_OK && value.ulValueLen != fs)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "token derived %lu bytes for ECDH on %s, not %zu",
                      (unsigned long)value.ulValueLen, info->name, fs);
    drc = destroy_object(s, h);
    if (rc == KMS_OK)
        rc = drc;
    if (rc == KMS_OK)
        rc = kms_buf_append(out, secret, fs);
    OPENSSL_cleanse(secret, sizeof secret);
    return rc;
}
