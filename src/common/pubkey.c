/* Public-key work in the process (pubkey.h), with OpenSSL 3's EVP calls only. */
#include "config.h"

#include "common/pubkey.h"

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/ec.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/objects.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "common/keyspec.h"

kms_err kms_pubkey_digest(int alg, const uint8_t *msg, size_t n, uint8_t out[KMS_DIGEST_MAX],
                          size_t *len)
{
    const struct kms_alg_info *a = kms_alg(alg);
    KMS_ENSURE(a && a->md_nid != NID_undef, KMS_ERR_VALIDATION,
               "Algorithm %s does not digest its message", a ? a->name : "?");
    const EVP_MD *md = EVP_get_digestbynid(a->md_nid);
    unsigned int mdlen = 0;
    KMS_ENSURE(md && EVP_Digest(msg, n, out, &mdlen, md, NULL) == 1 && mdlen == a->md_len,
               KMS_ERR_INTERNAL, "cannot compute the digest of %s", a->name);
    *len = mdlen;
    return KMS_OK;
}

kms_err kms_pubkey_parse(const uint8_t *der, size_t n, EVP_PKEY **out)
{
    const unsigned char *p = der;
    EVP_PKEY *pkey = der ? d2i_PUBKEY(NULL, &p, (long)n) : NULL;
    if (!pkey || p != der + n) {
        EVP_PKEY_free(pkey);
        ERR_clear_error();
        return KMS_FAIL(KMS_ERR_INTERNAL, "a stored public key does not parse");
    }
    *out = pkey;
    return KMS_OK;
}

/* Whether pkey is the kind of key alg's scheme needs. */
static int key_fits(const EVP_PKEY *pkey, enum kms_alg_scheme scheme)
{
    switch (scheme) {
    case KMS_SCHEME_OAEP:
    case KMS_SCHEME_PSS:
    case KMS_SCHEME_PKCS1: return EVP_PKEY_is_a(pkey, "RSA");
    case KMS_SCHEME_ECDSA: return EVP_PKEY_is_a(pkey, "EC");
    case KMS_SCHEME_EDDSA: return EVP_PKEY_is_a(pkey, "ED25519");
    default: return 0;
    }
}

/* Sets up ctx (verify or encrypt initialised) for alg's padding and digests. */
static int set_padding(EVP_PKEY_CTX *ctx, const struct kms_alg_info *a, const EVP_MD *md)
{
    switch (a->scheme) {
    case KMS_SCHEME_PSS:
        return EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PSS_PADDING) > 0 &&
               EVP_PKEY_CTX_set_signature_md(ctx, md) > 0 &&
               EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, md) > 0 &&
               EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, RSA_PSS_SALTLEN_DIGEST) > 0;
    case KMS_SCHEME_PKCS1:
        return EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_PADDING) > 0 &&
               EVP_PKEY_CTX_set_signature_md(ctx, md) > 0;
    case KMS_SCHEME_ECDSA: return EVP_PKEY_CTX_set_signature_md(ctx, md) > 0;
    case KMS_SCHEME_OAEP:
        return EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) > 0 &&
               EVP_PKEY_CTX_set_rsa_oaep_md(ctx, md) > 0 &&
               EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, md) > 0;
    default: return 0;
    }
}

/* alg signs, and takes a digest when digested is 1. */
static kms_err signing_alg(int alg, int digested)
{
    const struct kms_alg_info *a = kms_alg(alg);
    KMS_ENSURE(a && (a->scheme == KMS_SCHEME_PSS || a->scheme == KMS_SCHEME_PKCS1 ||
                     a->scheme == KMS_SCHEME_ECDSA || a->scheme == KMS_SCHEME_EDDSA),
               KMS_ERR_VALIDATION, "Algorithm %s is not a signing algorithm", a ? a->name : "?");
    KMS_ENSURE(!(digested && a->scheme == KMS_SCHEME_EDDSA), KMS_ERR_VALIDATION,
               "%s signs the message itself, not a digest", a->name);
    return KMS_OK;
}

kms_err kms_pubkey_verify(const uint8_t *spki, size_t spki_len, int alg, int digested,
                          const uint8_t *in, size_t n, const uint8_t *sig, size_t sig_len)
{
    EVP_PKEY *pkey;
    KMS_GUARD(signing_alg(alg, digested)); /* the request's fault before the row's */
    KMS_GUARD(kms_pubkey_parse(spki, spki_len, &pkey));
    kms_err rc = kms_pubkey_verify_key(pkey, alg, digested, in, n, sig, sig_len);
    EVP_PKEY_free(pkey);
    return rc;
}

kms_err kms_pubkey_verify_key(EVP_PKEY *pkey, int alg, int digested, const uint8_t *in, size_t n,
                              const uint8_t *sig, size_t sig_len)
{
    KMS_GUARD(signing_alg(alg, digested));
    const struct kms_alg_info *a = kms_alg(alg);
    uint8_t md_buf[KMS_DIGEST_MAX];
    size_t md_len = n;
    const uint8_t *dgst = in;
    if (a->scheme != KMS_SCHEME_EDDSA) {
        if (!digested) {
            KMS_GUARD(kms_pubkey_digest(alg, in, n, md_buf, &md_len));
            dgst = md_buf;
        }
        KMS_ENSURE(md_len == a->md_len, KMS_ERR_VALIDATION,
                   "The digest is %zu bytes; %s takes a digest of %zu bytes", md_len, a->name,
                   a->md_len);
    }

    kms_err rc = KMS_OK;
    int ok = 0;
    if (!key_fits(pkey, a->scheme)) {
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "a stored public key is not a key for %s", a->name);
    } else if (a->scheme == KMS_SCHEME_EDDSA) {
        EVP_MD_CTX *mctx = EVP_MD_CTX_new();
        ok = mctx && EVP_DigestVerifyInit(mctx, NULL, NULL, NULL, pkey) == 1 &&
             EVP_DigestVerify(mctx, sig, sig_len, in, n) == 1;
        EVP_MD_CTX_free(mctx);
    } else {
        EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new(pkey, NULL);
        ok = ctx && EVP_PKEY_verify_init(ctx) == 1 &&
             set_padding(ctx, a, EVP_get_digestbynid(a->md_nid)) &&
             EVP_PKEY_verify(ctx, sig, sig_len, dgst, md_len) == 1;
        EVP_PKEY_CTX_free(ctx);
    }
    if (rc == KMS_OK && !ok)
        rc = KMS_FAIL(KMS_ERR_BAD_SIGNATURE, "The signature does not verify with this key and %s",
                      a->name);
    ERR_clear_error();
    return rc;
}

kms_err kms_pubkey_oaep_encrypt(EVP_PKEY *pkey, int alg, const uint8_t *pt, size_t n,
                                struct kms_buf *out)
{
    const struct kms_alg_info *a = kms_alg(alg);
    KMS_ENSURE(a && a->scheme == KMS_SCHEME_OAEP, KMS_ERR_VALIDATION,
               "Algorithm %s is not an RSAES-OAEP algorithm", a ? a->name : "?");
    EVP_PKEY_CTX *ctx = NULL;
    kms_err rc = KMS_OK;
    size_t k = (size_t)EVP_PKEY_get_size(pkey), len = 0;
    if (!key_fits(pkey, a->scheme)) {
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "a stored public key is not an RSA key");
        goto cleanup;
    }
    if (n + 2 * a->md_len + 2 > k) {
        rc = KMS_FAIL(KMS_ERR_VALIDATION,
                      "The plaintext is %zu bytes; %s under this key takes at most %zu", n, a->name,
                      k > 2 * a->md_len + 2 ? k - 2 * a->md_len - 2 : 0);
        goto cleanup;
    }
    ctx = EVP_PKEY_CTX_new(pkey, NULL);
    len = k;
    if (!ctx || EVP_PKEY_encrypt_init(ctx) != 1 ||
        !set_padding(ctx, a, EVP_get_digestbynid(a->md_nid)) ||
        (rc = kms_buf_reserve(out, k)) != KMS_OK ||
        EVP_PKEY_encrypt(ctx, out->data + out->len, &len, pt, n) != 1 || len != k) {
        if (rc == KMS_OK)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "RSAES-OAEP encryption failed");
        goto cleanup;
    }
    out->len += len;
cleanup:
    ERR_clear_error();
    EVP_PKEY_CTX_free(ctx);
    return rc;
}

/* The kind of the peer's key, for a message. */
static const char *key_type(EVP_PKEY *pkey)
{
    static const char *const kinds[] = {"RSA",   "EC",  "X25519", "X448", "ED25519",
                                        "ED448", "DSA", "DH",     "SM2"};
    for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++)
        if (EVP_PKEY_is_a(pkey, kinds[i]))
            return kinds[i];
    return "an unknown kind of key";
}

/* The peer's curve, "" when it is not an EC key on a named curve. */
static void group_name(EVP_PKEY *pkey, char *name, size_t n)
{
    size_t got = 0;
    if (!EVP_PKEY_is_a(pkey, "EC") ||
        EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, name, n, &got) != 1)
        *name = '\0';
}

/*
 * The common case without OpenSSL's decoder (which costs as much as the
 * derivation in the token): the SubjectPublicKeyInfo of an uncompressed
 * point on a named NIST curve is always these bytes, then the point. The
 * point is checked to be on the curve; anything else goes the general way.
 */
struct spki_prefix {
    int nid;
    size_t len;
    const uint8_t *bytes;
};
static const uint8_t P256_SPKI[] = {0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48,
                                    0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
                                    0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00};
static const uint8_t P384_SPKI[] = {0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86,
                                    0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
                                    0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00};
static const uint8_t P521_SPKI[] = {0x30, 0x81, 0x9b, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86,
                                    0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81,
                                    0x04, 0x00, 0x23, 0x03, 0x81, 0x86, 0x00};
static const struct spki_prefix PREFIXES[] = {
    {NID_X9_62_prime256v1, sizeof P256_SPKI, P256_SPKI},
    {NID_secp384r1, sizeof P384_SPKI, P384_SPKI},
    {NID_secp521r1, sizeof P521_SPKI, P521_SPKI},
};
static EC_GROUP *groups[sizeof PREFIXES / sizeof PREFIXES[0]];
static pthread_once_t groups_once = PTHREAD_ONCE_INIT;

static void groups_make(void)
{
    for (size_t i = 0; i < sizeof PREFIXES / sizeof PREFIXES[0]; i++)
        groups[i] = EC_GROUP_new_by_curve_name(PREFIXES[i].nid);
}

/* 1: der is a valid uncompressed point of info's curve, appended to point; 0: go the long way. */
static int peer_point_fast(const struct kms_spec_info *info, const uint8_t *der, size_t n,
                           struct kms_buf *point)
{
    size_t fs = (info->bits + 7) / 8, i;
    for (i = 0; i < sizeof PREFIXES / sizeof PREFIXES[0]; i++)
        if (PREFIXES[i].nid == info->nid)
            break;
    if (i == sizeof PREFIXES / sizeof PREFIXES[0] || !der || n != PREFIXES[i].len + 1 + 2 * fs ||
        memcmp(der, PREFIXES[i].bytes, PREFIXES[i].len) != 0 || der[PREFIXES[i].len] != 0x04)
        return 0;
    pthread_once(&groups_once, groups_make);
    EC_POINT *pt = groups[i] ? EC_POINT_new(groups[i]) : NULL;
    int ok = pt &&
             EC_POINT_oct2point(groups[i], pt, der + PREFIXES[i].len, 1 + 2 * fs, NULL) == 1 &&
             EC_POINT_is_on_curve(groups[i], pt, NULL) == 1 &&
             kms_buf_append(point, der + PREFIXES[i].len, 1 + 2 * fs) == KMS_OK;
    EC_POINT_free(pt);
    ERR_clear_error();
    return ok;
}

kms_err kms_pubkey_peer_point(int spec, const uint8_t *der, size_t n, struct kms_buf *point)
{
    const struct kms_spec_info *info = kms_spec(spec);
    KMS_ENSURE(info && (info->kind == KMS_KIND_EC || info->kind == KMS_KIND_MONTGOMERY),
               KMS_ERR_VALIDATION, "Key spec %s does not do key agreement",
               info ? info->name : "?");
    if (info->kind == KMS_KIND_EC && peer_point_fast(info, der, n, point))
        return KMS_OK;
    const unsigned char *p = der;
    EVP_PKEY *pkey = der ? d2i_PUBKEY(NULL, &p, (long)n) : NULL;
    if (!pkey || p != der + n) {
        EVP_PKEY_free(pkey);
        ERR_clear_error();
        return KMS_FAIL(KMS_ERR_VALIDATION,
                        "The peer's public key is not a DER SubjectPublicKeyInfo");
    }
    const char *curve = OBJ_nid2sn(info->nid);
    const char *type = key_type(pkey);
    char name[64] = "";
    size_t fs = (info->bits + 7) / 8, want = info->kind == KMS_KIND_EC ? 1 + 2 * fs : fs, got = 0;
    kms_err rc = KMS_OK;
    group_name(pkey, name, sizeof name);

    if (info->kind == KMS_KIND_EC) {
        if (!EVP_PKEY_is_a(pkey, "EC"))
            rc = KMS_FAIL(KMS_ERR_VALIDATION,
                          "The peer's public key is %s, not an EC key; the key's curve is %s", type,
                          curve);
        else if (OBJ_sn2nid(name) != info->nid)
            rc = KMS_FAIL(KMS_ERR_VALIDATION,
                          "The peer's public key is on %s, the key's curve is %s",
                          *name ? name : "an unnamed curve", curve);
        /* Always the uncompressed form, whichever the peer sent. */
        else if (EVP_PKEY_set_utf8_string_param(
                     pkey, OSSL_PKEY_PARAM_EC_POINT_CONVERSION_FORMAT,
                     OSSL_PKEY_EC_POINT_CONVERSION_FORMAT_UNCOMPRESSED) != 1)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot set the point format");
    } else if (!EVP_PKEY_is_a(pkey, "X25519")) {
        rc = *name ? KMS_FAIL(KMS_ERR_VALIDATION,
                              "The peer's public key is an EC key on %s, not an X25519 key", name)
                   : KMS_FAIL(KMS_ERR_VALIDATION, "The peer's public key is %s, not an X25519 key",
                              type);
    }
    if (rc == KMS_OK)
        rc = kms_buf_reserve(point, want);
    if (rc == KMS_OK) {
        got = want; /* in: the room (raw keys); out: the length */
        int ok = info->kind == KMS_KIND_EC
                     ? EVP_PKEY_get_octet_string_param(pkey, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY,
                                                       point->data + point->len, want, &got) == 1
                     : EVP_PKEY_get_raw_public_key(pkey, point->data + point->len, &got) == 1;
        if (!ok || got != want || (info->kind == KMS_KIND_EC && point->data[point->len] != 0x04))
            rc = KMS_FAIL(KMS_ERR_VALIDATION, "The peer's public key has no usable point");
        else
            point->len += want;
    }
    ERR_clear_error();
    EVP_PKEY_free(pkey);
    return rc;
}

kms_err kms_pubkey_generate_pair(int spec, struct kms_buf *pkcs8, struct kms_buf *spki)
{
    const struct kms_spec_info *info = kms_spec(spec);
    KMS_ENSURE(info && (info->kind == KMS_KIND_RSA || info->kind == KMS_KIND_EC),
               KMS_ERR_VALIDATION, "Key spec %s has no data key pairs", info ? info->name : "?");
    EVP_PKEY *pkey = info->kind == KMS_KIND_RSA
                         ? EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)info->bits)
                         : EVP_PKEY_Q_keygen(NULL, NULL, "EC", OBJ_nid2sn(info->nid));
    PKCS8_PRIV_KEY_INFO *p8 = pkey ? EVP_PKEY2PKCS8(pkey) : NULL;
    kms_err rc = KMS_OK;
    int n8 = p8 ? i2d_PKCS8_PRIV_KEY_INFO(p8, NULL) : -1;
    int ns = pkey ? i2d_PUBKEY(pkey, NULL) : -1;
    if (n8 <= 0 || ns <= 0) {
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot make a %s key pair", info->name);
        goto cleanup;
    }
    /* Encoded straight into the cleansing buffers: no other copy of the private key. */
    rc = kms_buf_reserve(pkcs8, (size_t)n8);
    if (rc == KMS_OK)
        rc = kms_buf_reserve(spki, (size_t)ns);
    if (rc != KMS_OK)
        goto cleanup;
    unsigned char *p = pkcs8->data + pkcs8->len;
    unsigned char *q = spki->data + spki->len;
    if (i2d_PKCS8_PRIV_KEY_INFO(p8, &p) != n8 || i2d_PUBKEY(pkey, &q) != ns) {
        OPENSSL_cleanse(pkcs8->data + pkcs8->len, (size_t)n8);
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot encode a %s key pair", info->name);
        goto cleanup;
    }
    pkcs8->len += (size_t)n8;
    spki->len += (size_t)ns;
cleanup:
    ERR_clear_error();
    /* Both clear the private key as they free it. */
    PKCS8_PRIV_KEY_INFO_free(p8);
    EVP_PKEY_free(pkey);
    return rc;
}
