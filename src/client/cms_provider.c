/*
 * An OpenSSL 3 provider whose keys are KMS keys, so that OpenSSL's CMS opens
 * a KeyTransRecipientInfo or KeyAgreeRecipientInfo through the service.
 *
 * Why: the private half of a KMS key never leaves the token, and OpenSSL's
 * CMS API has no way to be handed a content key recovered elsewhere for a
 * KTRI or KARI: it wants an EVP_PKEY that can do the private operation. This
 * provider makes such EVP_PKEYs. It implements only what CMS asks of them:
 *   - key management "RSA" and "EC": a key is the KMS key's ARN, the client
 *     and its public half (a default-provider key, which answers bits,
 *     security bits, size, group and encoded public key); an EC key also
 *     stands for the originator's public key CMS makes from it (dup of the
 *     group, then the encoded point set);
 *   - asymmetric cipher "RSA", decryption only: RSAES-OAEP with SHA-1 or
 *     SHA-256 (the digest CMS sets from the RecipientInfo) is a Decrypt call
 *     (RSAES_OAEP_SHA_1 / RSAES_OAEP_SHA_256); anything else is refused;
 *   - key exchange "ECDH": DeriveSharedSecret with the originator's key, then
 *     the X9.63 KDF (digest, SharedInfo and length as CMS sets them) done here
 *     with OpenSSL's X963KDF.
 * It lives in a library context of its own (with the default provider), made
 * once per process, so the application's default context is untouched. A
 * failed service call's status is kept per thread for cms.c.
 */
#include "config.h"

#include <openssl/core_dispatch.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/params.h>
#include <openssl/provider.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"

#define PARAM_CLIENT "p11kms-client"         /* octet ptr: the p11kms_client */
#define PARAM_KEY_ID "p11kms-key-id"         /* utf8: the key's ARN */
#define PARAM_PUBLIC_KEY "p11kms-public-key" /* octet string: DER SubjectPublicKeyInfo */
#define DEFAULT_ONLY "provider=default"
#define MAX_UKM 4096

static OSSL_LIB_CTX *libctx;
static pthread_once_t libctx_once = PTHREAD_ONCE_INIT;
static _Thread_local p11kms_status last_status;

p11kms_status kms_cms_provider_status(void)
{
    p11kms_status st = last_status;

    last_status = P11KMS_OK;
    return st;
}

/* ---- keys ---------------------------------------------------------------------- */

struct kms_key {
    int ec;                /* an EC key, else RSA */
    EVP_PKEY *pub;         /* the public half (for an EC key being made: its group only) */
    int has_pub;           /* pub holds a public key */
    p11kms_client *client; /* NULL: a public key only */
    char key_id[256];
};

static void *key_new(int ec)
{
    struct kms_key *k = calloc(1, sizeof *k);

    if (k)
        k->ec = ec;
    return k;
}

static void *rsa_new(void *provctx)
{
    (void)provctx;
    return key_new(0);
}

static void *ec_new(void *provctx)
{
    (void)provctx;
    return key_new(1);
}

static void key_free(void *kd)
{
    struct kms_key *k = kd;

    if (!k)
        return;
    EVP_PKEY_free(k->pub);
    free(k);
}

static int key_has(const void *kd, int selection)
{
    const struct kms_key *k = kd;
    int ok = k != NULL;

    if (ok && (selection & OSSL_KEYMGMT_SELECT_PUBLIC_KEY))
        ok = k->has_pub;
    if (ok && (selection & OSSL_KEYMGMT_SELECT_PRIVATE_KEY))
        ok = k->client != NULL;
    if (ok && (selection & OSSL_KEYMGMT_SELECT_DOMAIN_PARAMETERS))
        ok = k->pub != NULL;
    return ok;
}

static int key_import(void *kd, int selection, const OSSL_PARAM params[])
{
    struct kms_key *k = kd;
    const OSSL_PARAM *p;
    const void *client = NULL, *der = NULL;
    const unsigned char *q;
    const char *id = NULL;
    size_t der_len = 0;
    EVP_PKEY *pub;

    (void)selection;
    if (!(p = OSSL_PARAM_locate_const(params, PARAM_CLIENT)) ||
        !OSSL_PARAM_get_octet_ptr(p, &client, &der_len) ||
        !(p = OSSL_PARAM_locate_const(params, PARAM_KEY_ID)) ||
        !OSSL_PARAM_get_utf8_string_ptr(p, &id) || strlen(id) >= sizeof k->key_id ||
        !(p = OSSL_PARAM_locate_const(params, PARAM_PUBLIC_KEY)) ||
        !OSSL_PARAM_get_octet_string_ptr(p, &der, &der_len))
        return 0;
    q = der;
    if (!(pub = d2i_PUBKEY_ex(NULL, &q, (long)der_len, libctx, DEFAULT_ONLY)))
        return 0;
    if (!EVP_PKEY_is_a(pub, k->ec ? "EC" : "RSA")) {
        EVP_PKEY_free(pub);
        return 0;
    }
    EVP_PKEY_free(k->pub);
    k->pub = pub;
    k->has_pub = 1;
    k->client = (p11kms_client *)client;
    snprintf(k->key_id, sizeof k->key_id, "%s", id);
    return 1;
}

static const OSSL_PARAM *key_import_types(int selection)
{
    static const OSSL_PARAM types[] = {
        OSSL_PARAM_octet_ptr(PARAM_CLIENT, NULL, 0),
        OSSL_PARAM_utf8_string(PARAM_KEY_ID, NULL, 0),
        OSSL_PARAM_octet_string(PARAM_PUBLIC_KEY, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)selection;
    return types;
}

/* What the public half answers (bits, security bits, max size, group, encoded point). */
static int key_get_params(void *kd, OSSL_PARAM params[])
{
    struct kms_key *k = kd;

    return k->pub && EVP_PKEY_get_params(k->pub, params);
}

static const OSSL_PARAM *key_gettable_params(void *provctx)
{
    static const OSSL_PARAM gettable[] = {
        OSSL_PARAM_int(OSSL_PKEY_PARAM_BITS, NULL),
        OSSL_PARAM_int(OSSL_PKEY_PARAM_SECURITY_BITS, NULL),
        OSSL_PARAM_int(OSSL_PKEY_PARAM_MAX_SIZE, NULL),
        OSSL_PARAM_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)provctx;
    return gettable;
}

/* The originator's point on the key's curve: CMS makes the peer key this way. */
static int key_set_params(void *kd, const OSSL_PARAM params[])
{
    struct kms_key *k = kd;
    const OSSL_PARAM *p = OSSL_PARAM_locate_const(params, OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY);
    char group[64];
    const void *point;
    size_t point_len;
    EVP_PKEY_CTX *ctx = NULL;
    EVP_PKEY *pub = NULL;
    OSSL_PARAM in[3];
    int ok;

    if (!p)
        return 1;
    if (!k->ec || !k->pub || !OSSL_PARAM_get_octet_string_ptr(p, &point, &point_len) ||
        !EVP_PKEY_get_utf8_string_param(k->pub, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                        NULL))
        return 0;
    in[0] = OSSL_PARAM_construct_utf8_string(OSSL_PKEY_PARAM_GROUP_NAME, group, 0);
    in[1] = OSSL_PARAM_construct_octet_string(OSSL_PKEY_PARAM_PUB_KEY, (void *)point, point_len);
    in[2] = OSSL_PARAM_construct_end();
    /* The default provider checks the point is on the curve. */
    ok = (ctx = EVP_PKEY_CTX_new_from_name(libctx, "EC", DEFAULT_ONLY)) != NULL &&
         EVP_PKEY_fromdata_init(ctx) == 1 &&
         EVP_PKEY_fromdata(ctx, &pub, EVP_PKEY_PUBLIC_KEY, in) == 1;
    EVP_PKEY_CTX_free(ctx);
    if (!ok)
        return 0;
    EVP_PKEY_free(k->pub);
    k->pub = pub;
    k->has_pub = 1;
    k->client = NULL; /* a peer's key, not the KMS key */
    k->key_id[0] = '\0';
    return 1;
}

static const OSSL_PARAM *key_settable_params(void *provctx)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_octet_string(OSSL_PKEY_PARAM_ENCODED_PUBLIC_KEY, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)provctx;
    return settable;
}

/* A copy; without the key pair selected, only the group (the start of a peer key). */
static void *key_dup(const void *kd, int selection)
{
    const struct kms_key *from = kd;
    struct kms_key *k = key_new(from->ec);

    if (!k)
        return NULL;
    if (from->pub && !EVP_PKEY_up_ref(from->pub)) {
        free(k);
        return NULL;
    }
    k->pub = from->pub;
    if (selection & OSSL_KEYMGMT_SELECT_KEYPAIR) {
        k->has_pub = from->has_pub;
        k->client = from->client;
        memcpy(k->key_id, from->key_id, sizeof k->key_id);
    }
    return k;
}

static const char *rsa_operation_name(int operation_id)
{
    return operation_id == OSSL_OP_ASYM_CIPHER ? "RSA" : NULL;
}

static const char *ec_operation_name(int operation_id)
{
    return operation_id == OSSL_OP_KEYEXCH ? "ECDH" : NULL;
}

#define KEYMGMT_COMMON                                                            \
    {OSSL_FUNC_KEYMGMT_FREE, (void (*)(void))key_free},                           \
        {OSSL_FUNC_KEYMGMT_HAS, (void (*)(void))key_has},                         \
        {OSSL_FUNC_KEYMGMT_IMPORT, (void (*)(void))key_import},                   \
        {OSSL_FUNC_KEYMGMT_IMPORT_TYPES, (void (*)(void))key_import_types},       \
        {OSSL_FUNC_KEYMGMT_GET_PARAMS, (void (*)(void))key_get_params},           \
        {OSSL_FUNC_KEYMGMT_GETTABLE_PARAMS, (void (*)(void))key_gettable_params}, \
        {OSSL_FUNC_KEYMGMT_SET_PARAMS, (void (*)(void))key_set_params},           \
        {OSSL_FUNC_KEYMGMT_SETTABLE_PARAMS, (void (*)(void))key_settable_params}, \
    {                                                                             \
        OSSL_FUNC_KEYMGMT_DUP, (void (*)(void))key_dup                            \
    }

static const OSSL_DISPATCH rsa_keymgmt[] = {
    {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))rsa_new},
    {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))rsa_operation_name},
    KEYMGMT_COMMON,
    {0, NULL},
};

static const OSSL_DISPATCH ec_keymgmt[] = {
    {OSSL_FUNC_KEYMGMT_NEW, (void (*)(void))ec_new},
    {OSSL_FUNC_KEYMGMT_QUERY_OPERATION_NAME, (void (*)(void))ec_operation_name},
    KEYMGMT_COMMON,
    {0, NULL},
};

/* ---- RSA-OAEP decryption ------------------------------------------------------- */

struct oaep {
    struct kms_key *key;
    int pad;
    int md, mgf1; /* NIDs; NID_undef: not set */
    int label;    /* a non-empty label was set */
};

static void *oaep_new(void *provctx)
{
    struct oaep *o = calloc(1, sizeof *o);

    (void)provctx;
    if (o)
        o->pad = RSA_PKCS1_PADDING;
    return o;
}

static void oaep_free(void *ctx)
{
    free(ctx);
}

static int digest_nid(const OSSL_PARAM *p, int *nid)
{
    const char *name;
    EVP_MD *md;

    if (!OSSL_PARAM_get_utf8_string_ptr(p, &name) || !(md = EVP_MD_fetch(libctx, name, NULL)))
        return 0;
    *nid = EVP_MD_get_type(md);
    EVP_MD_free(md);
    return 1;
}

static int oaep_set_params(void *ctx, const OSSL_PARAM params[])
{
    struct oaep *o = ctx;
    const OSSL_PARAM *p;
    const char *s;
    const void *label;
    size_t label_len;

    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_PAD_MODE))) {
        if (p->data_type == OSSL_PARAM_UTF8_STRING) {
            if (!OSSL_PARAM_get_utf8_string_ptr(p, &s))
                return 0;
            o->pad = strcmp(s, OSSL_PKEY_RSA_PAD_MODE_OAEP) == 0 ? RSA_PKCS1_OAEP_PADDING : -1;
        } else if (!OSSL_PARAM_get_int(p, &o->pad)) {
            return 0;
        }
    }
    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST)) &&
        !digest_nid(p, &o->md))
        return 0;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST)) &&
        !digest_nid(p, &o->mgf1))
        return 0;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL))) {
        if (!OSSL_PARAM_get_octet_string_ptr(p, &label, &label_len))
            return 0;
        o->label = label_len > 0;
    }
    return 1;
}

static const OSSL_PARAM *oaep_settable_params(void *ctx, void *provctx)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL, 0),
        OSSL_PARAM_int(OSSL_ASYM_CIPHER_PARAM_PAD_MODE, NULL),
        OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_OAEP_DIGEST_PROPS, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_ASYM_CIPHER_PARAM_MGF1_DIGEST_PROPS, NULL, 0),
        OSSL_PARAM_octet_string(OSSL_ASYM_CIPHER_PARAM_OAEP_LABEL, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)ctx, (void)provctx;
    return settable;
}

static int oaep_decrypt_init(void *ctx, void *kd, const OSSL_PARAM params[])
{
    struct oaep *o = ctx;
    struct kms_key *k = kd;

    if (!k || k->ec || !k->client)
        return 0;
    o->key = k;
    return oaep_set_params(o, params);
}

static int oaep_decrypt(void *ctx, unsigned char *out, size_t *outlen, size_t outsize,
                        const unsigned char *in, size_t inlen)
{
    struct oaep *o = ctx;
    const char *alg;
    uint8_t *pt = NULL;
    size_t pt_len = 0;
    p11kms_status st;

    if (!out) {
        *outlen = (size_t)EVP_PKEY_get_size(o->key->pub);
        return 1;
    }
    if (o->pad != RSA_PKCS1_OAEP_PADDING || o->label)
        alg = NULL;
    else if (o->md == NID_sha256 && (o->mgf1 == NID_undef || o->mgf1 == NID_sha256))
        alg = "RSAES_OAEP_SHA_256";
    else if (o->md == NID_sha1 && (o->mgf1 == NID_undef || o->mgf1 == NID_sha1))
        alg = "RSAES_OAEP_SHA_1";
    else
        alg = NULL;
    if (!alg) {
        last_status = kms_client_fail(P11KMS_ERR_MALFORMED,
                                      "CMS: a KMS key decrypts RSAES-OAEP with SHA-1 or SHA-256 "
                                      "(MGF1 the same, no label) only");
        return 0;
    }
    st = p11kms_rsa_decrypt(o->key->client, o->key->key_id, alg, in, inlen, &pt, &pt_len);
    if (st == P11KMS_OK && pt_len > outsize)
        st = kms_client_fail(P11KMS_ERR_PROTOCOL, "Decrypt answered more than the key holds");
    if (st != P11KMS_OK) {
        last_status = st;
        p11kms_free(pt, pt_len);
        return 0;
    }
    memcpy(out, pt, pt_len);
    *outlen = pt_len;
    p11kms_free(pt, pt_len);
    return 1;
}

static const OSSL_DISPATCH rsa_cipher[] = {
    {OSSL_FUNC_ASYM_CIPHER_NEWCTX, (void (*)(void))oaep_new},
    {OSSL_FUNC_ASYM_CIPHER_FREECTX, (void (*)(void))oaep_free},
    {OSSL_FUNC_ASYM_CIPHER_DECRYPT_INIT, (void (*)(void))oaep_decrypt_init},
    {OSSL_FUNC_ASYM_CIPHER_DECRYPT, (void (*)(void))oaep_decrypt},
    {OSSL_FUNC_ASYM_CIPHER_SET_CTX_PARAMS, (void (*)(void))oaep_set_params},
    {OSSL_FUNC_ASYM_CIPHER_SETTABLE_CTX_PARAMS, (void (*)(void))oaep_settable_params},
    {0, NULL},
};

/* ---- ECDH with the X9.63 KDF --------------------------------------------------- */

struct ecdh {
    struct kms_key *key;
    unsigned char *peer; /* the originator's DER SubjectPublicKeyInfo */
    size_t peer_len;
    int x963;
    char md[64];
    size_t outlen;
    unsigned char *ukm; /* the KDF's SharedInfo */
    size_t ukm_len;
};

static void *ecdh_new(void *provctx)
{
    (void)provctx;
    return calloc(1, sizeof(struct ecdh));
}

static void ecdh_free(void *ctx)
{
    struct ecdh *e = ctx;

    if (!e)
        return;
    OPENSSL_free(e->peer);
    free(e->ukm);
    free(e);
}

static int ecdh_set_params(void *ctx, const OSSL_PARAM params[])
{
    struct ecdh *e = ctx;
    const OSSL_PARAM *p;
    const char *s;
    const void *ukm;
    size_t ukm_len;
    int mode;

    if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE)) &&
        (!OSSL_PARAM_get_int(p, &mode) || mode < -1 || mode > 1))
        return 0; /* NIST curves have cofactor 1: either mode is plain ECDH */
    if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_TYPE))) {
        if (!OSSL_PARAM_get_utf8_string_ptr(p, &s))
            return 0;
        if (s[0] && strcmp(s, OSSL_KDF_NAME_X963KDF) != 0)
            return 0;
        e->x963 = s[0] != '\0';
    }
    if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_DIGEST))) {
        if (!OSSL_PARAM_get_utf8_string_ptr(p, &s) || strlen(s) >= sizeof e->md)
            return 0;
        snprintf(e->md, sizeof e->md, "%s", s);
    }
    if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_OUTLEN)) &&
        !OSSL_PARAM_get_size_t(p, &e->outlen))
        return 0;
    if ((p = OSSL_PARAM_locate_const(params, OSSL_EXCHANGE_PARAM_KDF_UKM))) {
        if (!OSSL_PARAM_get_octet_string_ptr(p, &ukm, &ukm_len) || ukm_len > MAX_UKM)
            return 0;
        free(e->ukm);
        e->ukm = NULL;
        e->ukm_len = 0;
        if (ukm_len) {
            if (!(e->ukm = malloc(ukm_len)))
                return 0;
            memcpy(e->ukm, ukm, ukm_len);
            e->ukm_len = ukm_len;
        }
    }
    return 1;
}

static const OSSL_PARAM *ecdh_settable_params(void *ctx, void *provctx)
{
    static const OSSL_PARAM settable[] = {
        OSSL_PARAM_int(OSSL_EXCHANGE_PARAM_EC_ECDH_COFACTOR_MODE, NULL),
        OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_TYPE, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST, NULL, 0),
        OSSL_PARAM_utf8_string(OSSL_EXCHANGE_PARAM_KDF_DIGEST_PROPS, NULL, 0),
        OSSL_PARAM_size_t(OSSL_EXCHANGE_PARAM_KDF_OUTLEN, NULL),
        OSSL_PARAM_octet_string(OSSL_EXCHANGE_PARAM_KDF_UKM, NULL, 0),
        OSSL_PARAM_END,
    };
    (void)ctx, (void)provctx;
    return settable;
}

static int ecdh_init(void *ctx, void *kd, const OSSL_PARAM params[])
{
    struct ecdh *e = ctx;
    struct kms_key *k = kd;

    if (!k || !k->ec || !k->client)
        return 0;
    e->key = k;
    return ecdh_set_params(e, params);
}

static int ecdh_set_peer(void *ctx, void *kd)
{
    struct ecdh *e = ctx;
    struct kms_key *peer = kd;
    unsigned char *der = NULL;
    int len;

    if (!peer || !peer->ec || !peer->has_pub || (len = i2d_PUBKEY(peer->pub, &der)) <= 0)
        return 0;
    OPENSSL_free(e->peer);
    e->peer = der;
    e->peer_len = (size_t)len;
    return 1;
}

static int x963(const struct ecdh *e, const uint8_t *z, size_t z_len, unsigned char *out)
{
    EVP_KDF *kdf = EVP_KDF_fetch(libctx, OSSL_KDF_NAME_X963KDF, DEFAULT_ONLY);
    EVP_KDF_CTX *kctx = kdf ? EVP_KDF_CTX_new(kdf) : NULL;
    OSSL_PARAM p[4];
    int ok;

    p[0] = OSSL_PARAM_construct_utf8_string(OSSL_KDF_PARAM_DIGEST, (char *)e->md, 0);
    p[1] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_KEY, (void *)z, z_len);
    p[2] = OSSL_PARAM_construct_octet_string(OSSL_KDF_PARAM_INFO, e->ukm, e->ukm_len);
    p[3] = OSSL_PARAM_construct_end();
    ok = kctx && EVP_KDF_derive(kctx, out, e->outlen, p) == 1;
    EVP_KDF_CTX_free(kctx);
    EVP_KDF_free(kdf);
    return ok;
}

static int ecdh_derive(void *ctx, unsigned char *secret, size_t *secretlen, size_t outlen)
{
    struct ecdh *e = ctx;
    size_t want = e->x963 ? e->outlen : (size_t)(EVP_PKEY_get_bits(e->key->pub) + 7) / 8;
    uint8_t *z = NULL;
    size_t z_len = 0;
    p11kms_status st;
    int ok;

    if (!secret) {
        *secretlen = want;
        return 1;
    }
    if (!e->peer || outlen < want || (e->x963 && (!e->md[0] || !e->outlen)))
        return 0;
    st = p11kms_derive_shared_secret(e->key->client, e->key->key_id, e->peer, e->peer_len, &z,
                                     &z_len);
    if (st != P11KMS_OK) {
        last_status = st;
        return 0;
    }
    if (e->x963)
        ok = x963(e, z, z_len, secret);
    else if ((ok = z_len == want))
        memcpy(secret, z, z_len);
    p11kms_free(z, z_len);
    if (ok)
        *secretlen = want;
    return ok;
}

static const OSSL_DISPATCH ecdh_exchange[] = {
    {OSSL_FUNC_KEYEXCH_NEWCTX, (void (*)(void))ecdh_new},
    {OSSL_FUNC_KEYEXCH_FREECTX, (void (*)(void))ecdh_free},
    {OSSL_FUNC_KEYEXCH_INIT, (void (*)(void))ecdh_init},
    {OSSL_FUNC_KEYEXCH_SET_PEER, (void (*)(void))ecdh_set_peer},
    {OSSL_FUNC_KEYEXCH_DERIVE, (void (*)(void))ecdh_derive},
    {OSSL_FUNC_KEYEXCH_SET_CTX_PARAMS, (void (*)(void))ecdh_set_params},
    {OSSL_FUNC_KEYEXCH_SETTABLE_CTX_PARAMS, (void (*)(void))ecdh_settable_params},
    {0, NULL},
};

/* ---- the provider -------------------------------------------------------------- */

static const OSSL_ALGORITHM keymgmts[] = {
    {"RSA", "provider=p11kms", rsa_keymgmt, "KMS RSA key"},
    {"EC", "provider=p11kms", ec_keymgmt, "KMS EC key"},
    {NULL, NULL, NULL, NULL},
};
static const OSSL_ALGORITHM ciphers[] = {
    {"RSA", "provider=p11kms", rsa_cipher, "RSA-OAEP through Decrypt"},
    {NULL, NULL, NULL, NULL},
};
static const OSSL_ALGORITHM exchanges[] = {
    {"ECDH", "provider=p11kms", ecdh_exchange, "ECDH through DeriveSharedSecret"},
    {NULL, NULL, NULL, NULL},
};

static const OSSL_ALGORITHM *query(void *provctx, int operation_id, int *no_cache)
{
    (void)provctx;
    *no_cache = 0;
    switch (operation_id) {
    case OSSL_OP_KEYMGMT: return keymgmts;
    case OSSL_OP_ASYM_CIPHER: return ciphers;
    case OSSL_OP_KEYEXCH: return exchanges;
    default: return NULL;
    }
}

static const OSSL_DISPATCH provider_functions[] = {
    {OSSL_FUNC_PROVIDER_QUERY_OPERATION, (void (*)(void))query},
    {0, NULL},
};

static int provider_init(const OSSL_CORE_HANDLE *handle, const OSSL_DISPATCH *in,
                         const OSSL_DISPATCH **out, void **provctx)
{
    (void)handle, (void)in;
    *out = provider_functions;
    *provctx = NULL;
    return 1;
}

static void libctx_make(void)
{
    OSSL_LIB_CTX *l = OSSL_LIB_CTX_new();

    if (l && OSSL_PROVIDER_add_builtin(l, "p11kms", provider_init) == 1 &&
        OSSL_PROVIDER_load(l, "default") && OSSL_PROVIDER_load(l, "p11kms")) {
        libctx = l;
        return;
    }
    OSSL_LIB_CTX_free(l);
}

OSSL_LIB_CTX *kms_cms_libctx(void)
{
    pthread_once(&libctx_once, libctx_make);
    return libctx;
}

p11kms_status kms_cms_kms_pkey(p11kms_client *c, const char *key_arn, EVP_PKEY *pub, EVP_PKEY **out)
{
    unsigned char *der = NULL;
    int der_len;
    void *client = c;
    EVP_PKEY_CTX *ctx = NULL;
    OSSL_PARAM params[4];
    p11kms_status st = P11KMS_OK;

    *out = NULL;
    if (!kms_cms_libctx())
        return kms_client_fail(P11KMS_ERR_MEMORY, "CMS: the KMS key provider does not load");
    if ((der_len = i2d_PUBKEY(pub, &der)) <= 0)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "CMS: the public key does not encode");
    params[0] = OSSL_PARAM_construct_octet_ptr(PARAM_CLIENT, &client, 0);
    params[1] = OSSL_PARAM_construct_utf8_string(PARAM_KEY_ID, (char *)key_arn, 0);
    params[2] = OSSL_PARAM_construct_octet_string(PARAM_PUBLIC_KEY, der, (size_t)der_len);
    params[3] = OSSL_PARAM_construct_end();
    if (!(ctx = EVP_PKEY_CTX_new_from_name(libctx, EVP_PKEY_is_a(pub, "RSA") ? "RSA" : "EC",
                                           "provider=p11kms")) ||
        EVP_PKEY_fromdata_init(ctx) != 1 ||
        EVP_PKEY_fromdata(ctx, out, EVP_PKEY_KEYPAIR, params) != 1)
        st = kms_client_fail(P11KMS_ERR_MEMORY, "CMS: cannot make the KMS key's EVP_PKEY");
    EVP_PKEY_CTX_free(ctx);
    OPENSSL_free(der);
    return st;
}
