/*
 * JWKs (RFC 7517, 7518 §6, 8037) to and from EVP_PKEYs.
 *
 * Strict on what a key is made of: every member base64url without padding,
 * EC coordinates and private scalars exactly the curve's size (RFC 7518
 * §6.2.1.2, §6.2.2.1), X25519 keys exactly 32 bytes, RSA's n and e without
 * leading zero bytes (§6.3.1). A point not on its curve and a private member
 * that does not match the public ones are refused. Members we do not know
 * ("use", "alg", "key_ops"...) are ignored, as RFC 7517 §4 asks. Private
 * members are decoded with the constant-time decoder into buffers that are
 * cleansed when freed.
 */
#include "config.h"

#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/encoding.h"

#define RSA_MAX_BYTES 2048 /* a 16384-bit modulus */
#define RSA_E_MAX_BYTES 8
#define JWK_MAX_TEXT (64 << 10)

struct curve {
    const char *crv;   /* the JWK name */
    const char *group; /* OpenSSL's */
    size_t size;       /* bytes of a coordinate and of d */
};

static const struct curve curves[] = {
    {"P-256", "prime256v1", 32},
    {"P-384", "secp384r1", 48},
    {"P-521", "secp521r1", 66},
};

#define X25519_LEN 32

static p11kms_status bad(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static p11kms_status bad(const char *fmt, ...)
{
    char msg[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWK: %s", msg);
}

static p11kms_status oom(void)
{
    return kms_client_fail(P11KMS_ERR_MEMORY, "JWK: out of memory");
}

/*
 * Member name of o, base64url, into out: exactly want bytes, or (want 0) 1 to
 * max bytes. secret: the constant-time decoder.
 */
static p11kms_status member(const json_t *o, const char *name, size_t want, size_t max, int secret,
                            struct kms_buf *out)
{
    json_t *v = json_object_get(o, name);
    const char *s = json_string_value(v);
    size_t n = json_string_length(v);
    kms_err e;

    if (!s)
        return bad("\"%s\" is missing or not a string", name);
    if (n > (want ? want : max) / 3 * 4 + 4)
        return bad("\"%s\" is too long", name);
    e = secret ? kms_b64url_decode(s, n, out) : kms_b64url_decode_public(s, n, out);
    if (e != KMS_OK)
        return bad("\"%s\" is not base64url without padding", name);
    if (want && out->len != want)
        return bad("\"%s\" is %zu bytes, not %zu", name, out->len, want);
    if (!want && (out->len == 0 || out->len > max))
        return bad("\"%s\" is empty or over %zu bytes", name, max);
    return P11KMS_OK;
}

/* Cleanses every value of params (some held private members), then frees them. */
static void params_free(OSSL_PARAM *params)
{
    if (!params)
        return;
    for (OSSL_PARAM *p = params; p->key; p++)
        if (p->data)
            OPENSSL_cleanse(p->data, p->data_size);
    OSSL_PARAM_free(params);
}

/* A key of type from params; selection EVP_PKEY_PUBLIC_KEY or EVP_PKEY_KEYPAIR. */
static p11kms_status from_params(const char *type, OSSL_PARAM_BLD *bld, int selection,
                                 EVP_PKEY **out)
{
    OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_name(NULL, type, NULL);
    p11kms_status st = P11KMS_OK;

    if (!params || !ctx)
        st = oom();
    else if (EVP_PKEY_fromdata_init(ctx) != 1 ||
             EVP_PKEY_fromdata(ctx, out, selection, params) != 1)
        st = bad("the %s key's members do not make a key", type);
    params_free(params);
    EVP_PKEY_CTX_free(ctx);
    return st;
}

/* Appends the big-endian integer p[0..n) to bld as a BN (secure memory when secret). */
static int push_bn(OSSL_PARAM_BLD *bld, const char *key, const uint8_t *p, size_t n, int secret,
                   BIGNUM **keep)
{
    BIGNUM *b = secret ? BN_secure_new() : BN_new();

    if (!b || !BN_bin2bn(p, (int)n, b)) {
        BN_clear_free(b);
        return 0;
    }
    *keep = b; /* the builder refers to it until OSSL_PARAM_BLD_to_param */
    return OSSL_PARAM_BLD_push_BN(bld, key, b) == 1;
}

static p11kms_status rsa_key(const json_t *o, int want_private, EVP_PKEY **out)
{
    static const char *const priv_names[] = {"d", "p", "q", "dp", "dq", "qi"};
    static const char *const priv_params[] = {
        OSSL_PKEY_PARAM_RSA_D,         OSSL_PKEY_PARAM_RSA_FACTOR1,
        OSSL_PKEY_PARAM_RSA_FACTOR2,   OSSL_PKEY_PARAM_RSA_EXPONENT1,
        OSSL_PKEY_PARAM_RSA_EXPONENT2, OSSL_PKEY_PARAM_RSA_COEFFICIENT1,
    };
    struct kms_buf n = KMS_BUF_INIT, e = KMS_BUF_INIT, priv[6];
    BIGNUM *bn[8] = {NULL};
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    p11kms_status st;
    size_t i;

    for (i = 0; i < 6; i++)
        priv[i] = (struct kms_buf)KMS_BUF_INIT;
    if (!bld) {
        st = oom();
        goto cleanup;
    }
    if ((st = member(o, "n", 0, RSA_MAX_BYTES, 0, &n)) != P11KMS_OK ||
        (st = member(o, "e", 0, RSA_E_MAX_BYTES, 0, &e)) != P11KMS_OK)
        goto cleanup;
    if (n.data[0] == 0 || e.data[0] == 0) {
        st = bad("\"n\" and \"e\" must not begin with a zero byte");
        goto cleanup;
    }
    if (!push_bn(bld, OSSL_PKEY_PARAM_RSA_N, n.data, n.len, 0, &bn[0]) ||
        !push_bn(bld, OSSL_PKEY_PARAM_RSA_E, e.data, e.len, 0, &bn[1])) {
        st = oom();
        goto cleanup;
    }
    if (want_private) {
        if (json_object_get(o, "oth")) {
            st = bad("multi-prime RSA keys (\"oth\") are not supported");
            goto cleanup;
        }
        for (i = 0; i < 6; i++) {
            if ((st = member(o, priv_names[i], 0, RSA_MAX_BYTES, 1, &priv[i])) != P11KMS_OK)
                goto cleanup;
            if (!push_bn(bld, priv_params[i], priv[i].data, priv[i].len, 1, &bn[2 + i])) {
                st = oom();
                goto cleanup;
            }
        }
    }
    st = from_params("RSA", bld, want_private ? EVP_PKEY_KEYPAIR : EVP_PKEY_PUBLIC_KEY, out);
cleanup:
    OSSL_PARAM_BLD_free(bld);
    for (i = 0; i < 8; i++)
        BN_clear_free(bn[i]);
    for (i = 0; i < 6; i++)
        kms_buf_free(&priv[i]);
    kms_buf_free(&n);
    kms_buf_free(&e);
    return st;
}

/* A key built from d alone must have the public key the JWK states. */
static p11kms_status check_pair(EVP_PKEY *k)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, k, NULL);
    p11kms_status st = P11KMS_OK;

    if (!ctx)
        return oom();
    if (EVP_PKEY_pairwise_check(ctx) != 1)
        st = bad("\"d\" is not the private half of the public key");
    EVP_PKEY_CTX_free(ctx);
    return st;
}

static p11kms_status ec_key(const json_t *o, const char *crv, int want_private, EVP_PKEY **out)
{
    const struct curve *cv = NULL;
    struct kms_buf x = KMS_BUF_INIT, y = KMS_BUF_INIT, d = KMS_BUF_INIT;
    uint8_t point[1 + 2 * 66];
    BIGNUM *bn = NULL;
    OSSL_PARAM_BLD *bld = NULL;
    EVP_PKEY_CTX *ctx = NULL;
    p11kms_status st;

    for (size_t i = 0; i < sizeof curves / sizeof curves[0]; i++)
        if (strcmp(crv, curves[i].crv) == 0)
            cv = &curves[i];
    if (!cv)
        return bad("EC curve \"%s\" is not P-256, P-384 or P-521", crv);
    if ((st = member(o, "x", cv->size, 0, 0, &x)) != P11KMS_OK ||
        (st = member(o, "y", cv->size, 0, 0, &y)) != P11KMS_OK ||
        (want_private && (st = member(o, "d", cv->size, 0, 1, &d)) != P11KMS_OK))
        goto cleanup;
    point[0] = 0x04;
    memcpy(point + 1, x.data, cv->size);
    memcpy(point + 1 + cv->size, y.data, cv->size);
    if (!(bld = OSSL_PARAM_BLD_new()) ||
        OSSL_PARAM_BLD_push_utf8_string(bld, OSSL_PKEY_PARAM_GROUP_NAME, cv->group, 0) != 1 ||
        OSSL_PARAM_BLD_push_octet_string(bld, OSSL_PKEY_PARAM_PUB_KEY, point, 1 + 2 * cv->size) !=
            1 ||
        (want_private && !push_bn(bld, OSSL_PKEY_PARAM_PRIV_KEY, d.data, d.len, 1, &bn))) {
        st = oom();
        goto cleanup;
    }
    if ((st = from_params("EC", bld, want_private ? EVP_PKEY_KEYPAIR : EVP_PKEY_PUBLIC_KEY, out)) !=
        P11KMS_OK) {
        st = bad("(x, y) is not a point on %s", crv);
        goto cleanup;
    }
    /* fromdata decodes the point; the full check also refuses the point at
       infinity and points outside the group's order. */
    if (!(ctx = EVP_PKEY_CTX_new_from_pkey(NULL, *out, NULL))) {
        st = oom();
        goto cleanup;
    }
    if (EVP_PKEY_public_check(ctx) != 1)
        st = bad("(x, y) is not a valid public key on %s", crv);
    else if (want_private)
        st = check_pair(*out);
cleanup:
    if (st != P11KMS_OK && *out) {
        EVP_PKEY_free(*out);
        *out = NULL;
    }
    EVP_PKEY_CTX_free(ctx);
    OSSL_PARAM_BLD_free(bld);
    BN_clear_free(bn);
    kms_buf_free(&x);
    kms_buf_free(&y);
    kms_buf_free(&d);
    return st;
}

static p11kms_status x25519_key(const json_t *o, const char *crv, int want_private, EVP_PKEY **out)
{
    struct kms_buf x = KMS_BUF_INIT, d = KMS_BUF_INIT;
    uint8_t pub[X25519_LEN];
    size_t pub_len = sizeof pub;
    p11kms_status st;

    if (strcmp(crv, "X25519") != 0)
        return bad("OKP curve \"%s\" is not X25519", crv);
    if ((st = member(o, "x", X25519_LEN, 0, 0, &x)) != P11KMS_OK ||
        (want_private && (st = member(o, "d", X25519_LEN, 0, 1, &d)) != P11KMS_OK))
        goto cleanup;
    if (want_private) {
        *out = EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, NULL, d.data, d.len);
        if (!*out)
            st = bad("\"d\" is not an X25519 private key");
        else if (EVP_PKEY_get_raw_public_key(*out, pub, &pub_len) != 1 || pub_len != X25519_LEN ||
                 CRYPTO_memcmp(pub, x.data, X25519_LEN) != 0)
            st = bad("\"d\" is not the private half of \"x\"");
    } else {
        *out = EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, NULL, x.data, x.len);
        if (!*out)
            st = bad("\"x\" is not an X25519 public key");
    }
cleanup:
    if (st != P11KMS_OK && *out) {
        EVP_PKEY_free(*out);
        *out = NULL;
    }
    kms_buf_free(&x);
    kms_buf_free(&d);
    return st;
}

p11kms_status kms_jwk_to_pkey(const uint8_t *p, size_t n, int want_private, EVP_PKEY **out,
                              char **kid)
{
    json_error_t err;
    json_t *o = NULL;
    const char *kty, *crv, *k;
    p11kms_status st;

    if (out)
        *out = NULL;
    if (kid)
        *kid = NULL;
    if (!p || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "kms_jwk_to_pkey: NULL argument");
    if (n == 0 || n > JWK_MAX_TEXT)
        return bad("a JWK is 1 to %d bytes of JSON", JWK_MAX_TEXT);
    o = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, &err);
    if (!json_is_object(o)) {
        st = bad("not a JSON object without duplicate members");
        goto cleanup;
    }
    kty = json_string_value(json_object_get(o, "kty"));
    crv = json_string_value(json_object_get(o, "crv"));
    if (!kty) {
        st = bad("\"kty\" is missing or not a string");
        goto cleanup;
    }
    if (strcmp(kty, "RSA") == 0)
        st = rsa_key(o, want_private, out);
    else if (strcmp(kty, "EC") == 0 || strcmp(kty, "OKP") == 0) {
        if (!crv) {
            st = bad("\"crv\" is missing or not a string");
            goto cleanup;
        }
        st = kty[0] == 'E' ? ec_key(o, crv, want_private, out)
                           : x25519_key(o, crv, want_private, out);
    } else {
        st = bad("kty \"%s\" is not RSA, EC or OKP", kty);
    }
    if (st != P11KMS_OK)
        goto cleanup;
    k = json_string_value(json_object_get(o, "kid"));
    if (kid && k && !(*kid = strdup(k))) {
        EVP_PKEY_free(*out);
        *out = NULL;
        st = oom();
    }
cleanup:
    json_decref(o);
    return st;
}

/* ---- to JWK ---------------------------------------------------------------------- */

/* o[name] = BASE64URL(p[0..n)). */
static int set_b64(json_t *o, const char *name, const uint8_t *p, size_t n)
{
    struct kms_buf b = KMS_BUF_INIT;
    int ok = kms_b64url_encode(p, n, &b) == KMS_OK &&
             json_object_set_new(o, name, json_stringn((const char *)b.data, b.len)) == 0;

    kms_buf_free(&b);
    return ok;
}

/* o[name] = BASE64URL of the BN parameter param of pkey, pad bytes wide (0: minimal). */
static int set_bn(json_t *o, const char *name, EVP_PKEY *pkey, const char *param, size_t pad)
{
    BIGNUM *b = NULL;
    uint8_t *buf = NULL;
    size_t len;
    int ok = 0;

    if (EVP_PKEY_get_bn_param(pkey, param, &b) != 1)
        return 0;
    len = pad ? pad : (size_t)BN_num_bytes(b);
    if (len == 0)
        len = 1;
    if ((buf = malloc(len)) && BN_bn2binpad(b, buf, (int)len) == (int)len)
        ok = set_b64(o, name, buf, len);
    free(buf);
    BN_free(b);
    return ok;
}

p11kms_status kms_jwk_from_public(EVP_PKEY *pkey, json_t **out)
{
    char group[32] = "";
    size_t glen = 0;
    uint8_t raw[X25519_LEN];
    size_t raw_len = sizeof raw;
    json_t *o;
    int ok = 0;

    if (out)
        *out = NULL;
    if (!pkey || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "kms_jwk_from_public: NULL argument");
    if (!(o = json_object()))
        return oom();
    if (EVP_PKEY_is_a(pkey, "RSA")) {
        ok = json_object_set_new(o, "kty", json_string("RSA")) == 0 &&
             set_bn(o, "n", pkey, OSSL_PKEY_PARAM_RSA_N, 0) &&
             set_bn(o, "e", pkey, OSSL_PKEY_PARAM_RSA_E, 0);
    } else if (EVP_PKEY_is_a(pkey, "X25519")) {
        ok = EVP_PKEY_get_raw_public_key(pkey, raw, &raw_len) == 1 && raw_len == X25519_LEN &&
             json_object_set_new(o, "kty", json_string("OKP")) == 0 &&
             json_object_set_new(o, "crv", json_string("X25519")) == 0 &&
             set_b64(o, "x", raw, raw_len);
    } else if (EVP_PKEY_is_a(pkey, "EC") &&
               EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                              &glen) == 1) {
        const struct curve *cv = NULL;
        for (size_t i = 0; i < sizeof curves / sizeof curves[0]; i++)
            if (strcmp(group, curves[i].group) == 0)
                cv = &curves[i];
        ok = cv && json_object_set_new(o, "kty", json_string("EC")) == 0 &&
             json_object_set_new(o, "crv", json_string(cv->crv)) == 0 &&
             set_bn(o, "x", pkey, OSSL_PKEY_PARAM_EC_PUB_X, cv->size) &&
             set_bn(o, "y", pkey, OSSL_PKEY_PARAM_EC_PUB_Y, cv->size);
        if (!cv) {
            json_decref(o);
            return bad("EC group %s has no JWK curve name", group);
        }
    } else {
        json_decref(o);
        return bad("a %s key has no JWK form here",
                   EVP_PKEY_get0_type_name(pkey) ? EVP_PKEY_get0_type_name(pkey) : "?");
    }
    if (!ok) {
        json_decref(o);
        return oom();
    }
    *out = o;
    return P11KMS_OK;
}
