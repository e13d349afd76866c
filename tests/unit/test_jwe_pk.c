/*
 * Unit tests for src/client/jwk.c and jwe_pk.c: JWKs, and JWE to public keys
 * (RSA-OAEP-256, ECDH-ES+A256KW with A256GCM) opened with local private keys.
 *
 * Known answers: the Concat KDF against RFC 7518 Appendix C (ECDH-ES with
 * A128GCM, apu "Alice", apv "Bob"), AES key wrap against RFC 3394 §4.6, and
 * JWKs from RFC 7517 Appendix A.1 and RFC 8037 Appendix A.6. Then round
 * trips for every key type in both serializations, the wrong key, the wrong
 * curve, refused headers, and every truncation and a flipped bit anywhere:
 * MALFORMED or DECRYPT, never plaintext.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/encoding.h"
#include "common/json_alloc.h"

static const char PAYLOAD[] = "{\"hello\":\"public keys\"}";

/* ---- keys ------------------------------------------------------------------------ */

struct key {
    EVP_PKEY *pkey;
    char *priv_pem; /* PKCS#8 PEM */
    char *pub_pem;
};

static struct key rsa, rsa2, p256, p256b, p384, p521, x25519;

static char *pem_of(EVP_PKEY *k, int priv)
{
    BIO *b = BIO_new(BIO_s_mem());
    char *p, *s;
    long n;

    assert_non_null(b);
    assert_int_equal(priv ? PEM_write_bio_PrivateKey(b, k, NULL, NULL, 0, NULL, NULL)
                          : PEM_write_bio_PUBKEY(b, k),
                     1);
    n = BIO_get_mem_data(b, &p);
    s = malloc((size_t)n + 1);
    assert_non_null(s);
    memcpy(s, p, (size_t)n);
    s[n] = '\0';
    BIO_free(b);
    return s;
}

static void make_key(struct key *k, EVP_PKEY *pkey)
{
    assert_non_null(pkey);
    k->pkey = pkey;
    k->priv_pem = pem_of(pkey, 1);
    k->pub_pem = pem_of(pkey, 0);
}

static int setup(void **state)
{
    (void)state;
    make_key(&rsa, EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048));
    make_key(&rsa2, EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048));
    make_key(&p256, EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256"));
    make_key(&p256b, EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256"));
    make_key(&p384, EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384"));
    make_key(&p521, EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-521"));
    make_key(&x25519, EVP_PKEY_Q_keygen(NULL, NULL, "X25519"));
    return 0;
}

static void free_key(struct key *k)
{
    EVP_PKEY_free(k->pkey);
    free(k->priv_pem);
    free(k->pub_pem);
}

static int teardown(void **state)
{
    (void)state;
    free_key(&rsa);
    free_key(&rsa2);
    free_key(&p256);
    free_key(&p256b);
    free_key(&p384);
    free_key(&p521);
    free_key(&x25519);
    return 0;
}

static p11kms_recipient *recipient(const struct key *k, const char *kid)
{
    p11kms_recipient *r = NULL;
    assert_int_equal(
        p11kms_recipient_from_public((const uint8_t *)k->pub_pem, strlen(k->pub_pem), kid, &r),
        P11KMS_OK);
    return r;
}

static char *b64u(const uint8_t *p, size_t n)
{
    struct kms_buf b = KMS_BUF_INIT;
    assert_int_equal(kms_b64url_encode(p, n, &b), KMS_OK);
    assert_int_equal(kms_buf_terminate(&b), KMS_OK);
    return (char *)b.data;
}

static void set_bn(json_t *o, const char *name, EVP_PKEY *k, const char *param, size_t pad)
{
    BIGNUM *b = NULL;
    uint8_t buf[1024];
    size_t n;
    assert_int_equal(EVP_PKEY_get_bn_param(k, param, &b), 1);
    n = pad ? pad : (size_t)BN_num_bytes(b);
    assert_int_equal(BN_bn2binpad(b, buf, (int)n), (int)n);
    char *s = b64u(buf, n);
    json_object_set_new(o, name, json_string(s));
    free(s);
    BN_clear_free(b);
}

/* The private JWK of k, as text (malloc'd). */
static char *private_jwk(EVP_PKEY *k)
{
    json_t *o = NULL;
    struct kms_buf t = KMS_BUF_INIT;

    assert_int_equal(kms_jwk_from_public(k, &o), P11KMS_OK);
    if (EVP_PKEY_is_a(k, "X25519")) {
        uint8_t d[32];
        size_t n = sizeof d;
        assert_int_equal(EVP_PKEY_get_raw_private_key(k, d, &n), 1);
        char *s = b64u(d, n);
        json_object_set_new(o, "d", json_string(s));
        free(s);
    } else if (EVP_PKEY_is_a(k, "EC")) {
        set_bn(o, "d", k, OSSL_PKEY_PARAM_PRIV_KEY, (size_t)(EVP_PKEY_get_bits(k) + 7) / 8);
    } else {
        set_bn(o, "d", k, OSSL_PKEY_PARAM_RSA_D, 0);
        set_bn(o, "p", k, OSSL_PKEY_PARAM_RSA_FACTOR1, 0);
        set_bn(o, "q", k, OSSL_PKEY_PARAM_RSA_FACTOR2, 0);
        set_bn(o, "dp", k, OSSL_PKEY_PARAM_RSA_EXPONENT1, 0);
        set_bn(o, "dq", k, OSSL_PKEY_PARAM_RSA_EXPONENT2, 0);
        set_bn(o, "qi", k, OSSL_PKEY_PARAM_RSA_COEFFICIENT1, 0);
    }
    assert_int_equal(kms_json_dump(o, 0, &t), KMS_OK);
    assert_int_equal(kms_buf_terminate(&t), KMS_OK);
    json_decref(o);
    return (char *)t.data;
}

/* ---- known answers ------------------------------------------------------------------ */

static void test_concat_kdf_vector(void **state)
{
    (void)state;
    /* RFC 7518 Appendix C: Z, then the A128GCM key "VqqN6vgjbSBcIijNcacQGg". */
    static const uint8_t z[] = {158, 86,  217, 29,  129, 113, 53,  211, 114, 131, 66,
                                131, 191, 132, 38,  156, 251, 49,  110, 163, 218, 128,
                                106, 72,  246, 218, 167, 121, 140, 254, 144, 196};
    static const uint8_t want[] = {86, 170, 141, 234, 248, 35,  109, 32,
                                   92, 34,  40,  205, 113, 167, 16,  26};
    uint8_t out[16];

    assert_int_equal(kms_concat_kdf(z, sizeof z, "A128GCM", (const uint8_t *)"Alice", 5,
                                    (const uint8_t *)"Bob", 3, out, sizeof out),
                     P11KMS_OK);
    assert_memory_equal(out, want, sizeof want);
    char *s = b64u(out, sizeof out);
    assert_string_equal(s, "VqqN6vgjbSBcIijNcacQGg");
    free(s);
    /* Another party info, another key. */
    assert_int_equal(kms_concat_kdf(z, sizeof z, "A128GCM", (const uint8_t *)"Alice", 5, NULL, 0,
                                    out, sizeof out),
                     P11KMS_OK);
    assert_memory_not_equal(out, want, sizeof want);
    assert_int_equal(kms_concat_kdf(z, sizeof z, "A128GCM", NULL, 0, NULL, 0, NULL, 16),
                     P11KMS_ERR_ARGUMENT);
}

static void test_aes_kw_vector(void **state)
{
    (void)state;
    /* RFC 3394 §4.6: 256 bits of key data with a 256-bit KEK. */
    uint8_t kek[32], data[32], out[40], back[32];
    static const uint8_t want[40] = {0x28, 0xC9, 0xF4, 0x04, 0xC4, 0xB8, 0x10, 0xF4, 0xCB, 0xCC,
                                     0xB3, 0x5C, 0xFB, 0x87, 0xF8, 0x26, 0x3F, 0x57, 0x86, 0xE2,
                                     0xD8, 0x0E, 0xD3, 0x26, 0xCB, 0xC7, 0xF0, 0xE7, 0x1A, 0x99,
                                     0xF4, 0x3B, 0xFB, 0x98, 0x8B, 0x9B, 0x7A, 0x02, 0xDD, 0x21};
    static const uint8_t data_hi[16] = {0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
                                        0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE, 0xFF};
    for (int i = 0; i < 32; i++)
        kek[i] = (uint8_t)i;
    memcpy(data, data_hi, 16);
    for (int i = 0; i < 16; i++)
        data[16 + i] = (uint8_t)i;

    assert_int_equal(kms_aes_kw_wrap(kek, 32, data, 32, out), P11KMS_OK);
    assert_memory_equal(out, want, sizeof want);
    assert_int_equal(kms_aes_kw_unwrap(kek, 32, out, 40, back), P11KMS_OK);
    assert_memory_equal(back, data, 32);
    out[17] ^= 1;
    assert_int_equal(kms_aes_kw_unwrap(kek, 32, out, 40, back), P11KMS_ERR_DECRYPT);
    out[17] ^= 1;
    kek[0] ^= 1;
    assert_int_equal(kms_aes_kw_unwrap(kek, 32, out, 40, back), P11KMS_ERR_DECRYPT);
    assert_int_equal(kms_aes_kw_wrap(kek, 31, data, 32, out), P11KMS_ERR_ARGUMENT);
    assert_int_equal(kms_aes_kw_wrap(kek, 32, data, 12, out), P11KMS_ERR_ARGUMENT);
}

/* ---- JWKs -------------------------------------------------------------------------- */

static p11kms_status jwk(const char *text, int priv, EVP_PKEY **k)
{
    return kms_jwk_to_pkey((const uint8_t *)text, strlen(text), priv, k, NULL);
}

static void expect_bad_jwk(const char *text, int priv)
{
    EVP_PKEY *k = (EVP_PKEY *)1;
    if (jwk(text, priv, &k) != P11KMS_ERR_ARGUMENT)
        fail_msg("accepted: %s", text);
    assert_null(k);
}

static void test_jwk_known(void **state)
{
    (void)state;
    EVP_PKEY *k = NULL;
    char *kid = NULL;
    json_t *o = NULL;
    /* RFC 7517 Appendix A.1. */
    static const char ec[] = "{\"kty\":\"EC\",\"crv\":\"P-256\","
                             "\"x\":\"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4\","
                             "\"y\":\"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM\","
                             "\"use\":\"enc\",\"kid\":\"1\"}";
    assert_int_equal(kms_jwk_to_pkey((const uint8_t *)ec, strlen(ec), 0, &k, &kid), P11KMS_OK);
    assert_string_equal(kid, "1");
    assert_int_equal(kms_jwk_from_public(k, &o), P11KMS_OK);
    assert_string_equal(json_string_value(json_object_get(o, "x")),
                        "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4");
    assert_string_equal(json_string_value(json_object_get(o, "crv")), "P-256");
    json_decref(o);
    EVP_PKEY_free(k);
    free(kid);

    /* RFC 8037 Appendix A.6: the ephemeral X25519 key, private and public. */
    static const char okp[] = "{\"kty\":\"OKP\",\"crv\":\"X25519\","
                              "\"d\":\"dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo\","
                              "\"x\":\"hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo\"}";
    assert_int_equal(jwk(okp, 1, &k), P11KMS_OK);
    assert_int_equal(kms_jwk_from_public(k, &o), P11KMS_OK);
    assert_string_equal(json_string_value(json_object_get(o, "x")),
                        "hSDwCYkwp1R0i33ctD73Wg2_Og0mOBr066SpjqqbTmo");
    json_decref(o);
    EVP_PKEY_free(k);
    /* Its d with another x: not the pair. */
    expect_bad_jwk("{\"kty\":\"OKP\",\"crv\":\"X25519\","
                   "\"d\":\"dwdtCnMYpX08FsFyUbJmRd9ML4frwJkqsXf7pR25LCo\","
                   "\"x\":\"3p7bfXt9wbTTW2HC7OQ1Nz-DQ8hbeGdNrfx-FG-IK08\"}",
                   1);
}

/* Every key type through its private JWK and back; its public JWK as a recipient. */
static void test_jwk_round_trips(void **state)
{
    (void)state;
    const struct key *keys[] = {&rsa, &p256, &p384, &p521, &x25519};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        char *text = private_jwk(keys[i]->pkey);
        EVP_PKEY *k = NULL, *pub = NULL;
        assert_int_equal(jwk(text, 1, &k), P11KMS_OK);
        assert_int_equal(EVP_PKEY_eq(k, keys[i]->pkey), 1);
        assert_int_equal(jwk(text, 0, &pub), P11KMS_OK); /* d ignored */
        assert_int_equal(EVP_PKEY_eq(pub, keys[i]->pkey), 1);
        /* kms_private_key_parse takes a JWK as well. */
        EVP_PKEY_free(k);
        assert_int_equal(kms_private_key_parse((const uint8_t *)text, strlen(text), &k), P11KMS_OK);
        assert_int_equal(EVP_PKEY_eq(k, keys[i]->pkey), 1);
        EVP_PKEY_free(k);
        EVP_PKEY_free(pub);
        free(text);
    }
}

/* text with the first occurrence of from replaced by to (malloc'd). */
static char *replace(const char *text, const char *from, const char *to)
{
    const char *at = strstr(text, from);
    assert_non_null(at);
    size_t n = strlen(text) - strlen(from) + strlen(to);
    char *s = malloc(n + 1);
    assert_non_null(s);
    snprintf(s, n + 1, "%.*s%s%s", (int)(at - text), text, to, at + strlen(from));
    return s;
}

/* The value of member name in JSON text (malloc'd). */
static char *member_of(const char *text, const char *name)
{
    json_t *o = json_loads(text, 0, NULL);
    assert_non_null(o);
    char *s = strdup(json_string_value(json_object_get(o, name)));
    json_decref(o);
    return s;
}

static void test_jwk_refusals(void **state)
{
    (void)state;
    char *ec = private_jwk(p256.pkey), *x = member_of(ec, "x"), *y = member_of(ec, "y");
    char *okp = private_jwk(x25519.pkey), *r = private_jwk(rsa.pkey), *s, *t;

    expect_bad_jwk("", 0);
    expect_bad_jwk("[]", 0);
    expect_bad_jwk("{\"kty\":\"oct\",\"k\":\"AAAA\"}", 0);
    expect_bad_jwk("{\"kty\":1}", 0);
    expect_bad_jwk("{\"crv\":\"P-256\"}", 0);
    expect_bad_jwk("{\"kty\":\"EC\",\"kty\":\"EC\"}", 0);
    expect_bad_jwk((s = replace(ec, "P-256", "P-192")), 0), free(s);
    expect_bad_jwk((s = replace(ec, "P-256", "P-384")), 0), free(s); /* 32-byte x on P-384 */
    expect_bad_jwk((s = replace(ec, "\"crv\":\"P-256\",", "")), 0), free(s);
    expect_bad_jwk((s = replace(okp, "X25519", "Ed25519")), 0), free(s);
    expect_bad_jwk((s = replace(okp, "X25519", "X448")), 0), free(s);
    /* Missing members. */
    expect_bad_jwk((s = replace(ec, "\"y\"", "\"Y\"")), 0), free(s);
    expect_bad_jwk((s = replace(ec, "\"d\"", "\"D\"")), 1), free(s);
    expect_bad_jwk((s = replace(r, "\"qi\"", "\"QI\"")), 1), free(s);
    expect_bad_jwk((s = replace(r, "\"e\"", "\"E\"")), 0), free(s);
    /* Wrong lengths, padding, other alphabets. */
    t = strdup(x);
    t[strlen(t) - 1] = '\0';
    expect_bad_jwk((s = replace(ec, x, t)), 0), free(s), free(t);
    expect_bad_jwk((s = replace(ec, x, "AAAA")), 0), free(s);
    t = malloc(strlen(x) + 2);
    snprintf(t, strlen(x) + 2, "%s=", x);
    expect_bad_jwk((s = replace(ec, x, t)), 0), free(s), free(t);
    t = strdup(x);
    t[3] = '+';
    expect_bad_jwk((s = replace(ec, x, t)), 0), free(s), free(t);
    expect_bad_jwk((s = replace(okp, "\"x\":\"", "\"x\":\"AA")), 0), free(s);
    /* A point not on the curve: y of another point. */
    char *other = private_jwk(p256b.pkey), *y2 = member_of(other, "y");
    expect_bad_jwk((s = replace(ec, y, y2)), 0), free(s);
    /* d of another key. */
    char *d2 = member_of(other, "d"), *d = member_of(ec, "d");
    expect_bad_jwk((s = replace(ec, d, d2)), 1), free(s);
    /* RSA: n with a leading zero byte, multi-prime. */
    char *n = member_of(r, "n");
    struct kms_buf nb = KMS_BUF_INIT;
    uint8_t zn[1024] = {0};
    assert_int_equal(kms_b64url_decode(n, strlen(n), &nb), KMS_OK);
    memcpy(zn + 1, nb.data, nb.len);
    t = b64u(zn, nb.len + 1);
    expect_bad_jwk((s = replace(r, n, t)), 0), free(s), free(t);
    kms_buf_free(&nb);
    expect_bad_jwk((s = replace(r, "\"kty\"", "\"oth\":[],\"kty\"")), 1), free(s);
    /* An RSA key under 2048 bits is no recipient. */
    EVP_PKEY *small = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024);
    char *sj = private_jwk(small);
    p11kms_recipient *rc = NULL;
    assert_int_equal(p11kms_recipient_from_public((const uint8_t *)sj, strlen(sj), NULL, &rc),
                     P11KMS_ERR_ARGUMENT);
    assert_null(rc);
    EVP_PKEY_free(small);
    free(sj);

    free(n), free(d), free(d2), free(y2), free(other);
    free(ec), free(x), free(y), free(okp), free(r);
}

/* ---- sealing and opening -------------------------------------------------------------- */

static char *seal(p11kms_envelope_format f, p11kms_recipient *const *r, size_t nr, size_t *len)
{
    uint8_t *out = NULL;
    assert_int_equal(
        p11kms_envelope_seal(NULL, f, r, nr, (const uint8_t *)PAYLOAD, strlen(PAYLOAD), &out, len),
        P11KMS_OK);
    assert_non_null(out);
    assert_int_equal(strlen((char *)out), *len); /* text; no NUL inside */
    return (char *)out;
}

static p11kms_status open_with(const char *priv, const char *in, size_t n, int check)
{
    struct p11kms_opener o;
    uint8_t *out = (uint8_t *)1;
    size_t out_len = 1;
    memset(&o, 0, sizeof o);
    o.private_key = (const uint8_t *)priv;
    o.private_key_len = strlen(priv);
    p11kms_status st = p11kms_envelope_open(&o, (const uint8_t *)in, n, &out, &out_len);
    if (st == P11KMS_OK) {
        if (check) {
            assert_int_equal(out_len, strlen(PAYLOAD));
            assert_memory_equal(out, PAYLOAD, out_len);
        }
        p11kms_free(out, out_len);
    } else {
        assert_null(out);
        assert_int_equal(out_len, 0);
    }
    return st;
}

static void test_round_trips(void **state)
{
    (void)state;
    const struct key *keys[] = {&rsa, &p256, &p384, &p521, &x25519};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        p11kms_recipient *r = recipient(keys[i], i == 0 ? "alice" : NULL);
        for (int f = 0; f < 2; f++) {
            size_t len;
            char *t = seal(f, &r, 1, &len);
            assert_int_equal(p11kms_envelope_detect((uint8_t *)t, len), f);
            assert_int_equal(open_with(keys[i]->priv_pem, t, len, 1), P11KMS_OK);
            char *j = private_jwk(keys[i]->pkey);
            assert_int_equal(open_with(j, t, len, 1), P11KMS_OK);
            free(j);
            if (f == 0) { /* the header says what it should */
                json_t *h = NULL;
                struct kms_buf b = KMS_BUF_INIT;
                assert_int_equal(kms_b64url_decode(t, (size_t)(strchr(t, '.') - t), &b), KMS_OK);
                h = json_loadb((char *)b.data, b.len, 0, NULL);
                assert_non_null(h);
                assert_string_equal(json_string_value(json_object_get(h, "alg")),
                                    i == 0 ? "RSA-OAEP-256" : "ECDH-ES+A256KW");
                assert_string_equal(json_string_value(json_object_get(h, "enc")), "A256GCM");
                if (i == 0) {
                    assert_string_equal(json_string_value(json_object_get(h, "kid")), "alice");
                    assert_null(json_object_get(h, "epk"));
                } else {
                    assert_non_null(json_object_get(h, "epk"));
                    assert_null(json_object_get(json_object_get(h, "epk"), "d"));
                }
                json_decref(h);
                kms_buf_free(&b);
            }
            p11kms_free(t, len);
        }
        p11kms_recipient_free(r);
    }
    /* An empty payload. */
    p11kms_recipient *r = recipient(&p256, NULL);
    uint8_t *t = NULL, *out = NULL;
    size_t len, out_len;
    struct p11kms_opener o = {0};
    assert_int_equal(p11kms_envelope_seal(NULL, P11KMS_FORMAT_JWE_COMPACT, &r, 1,
                                          (const uint8_t *)"", 0, &t, &len),
                     P11KMS_OK);
    o.private_key = (const uint8_t *)p256.priv_pem;
    o.private_key_len = strlen(p256.priv_pem);
    assert_int_equal(p11kms_envelope_open(&o, t, len, &out, &out_len), P11KMS_OK);
    assert_int_equal(out_len, 0);
    p11kms_free(out, 1);
    p11kms_free(t, len);
    p11kms_recipient_free(r);
}

static void test_mixed_recipients(void **state)
{
    (void)state;
    p11kms_recipient *r[3] = {recipient(&rsa, NULL), recipient(&p256, "p"),
                              recipient(&x25519, NULL)};
    size_t len;
    char *t = seal(P11KMS_FORMAT_JWE_JSON, r, 3, &len);
    json_t *o = json_loads(t, 0, NULL);
    assert_non_null(o);
    assert_int_equal(json_array_size(json_object_get(o, "recipients")), 3);
    json_decref(o);

    assert_int_equal(open_with(rsa.priv_pem, t, len, 1), P11KMS_OK);
    assert_int_equal(open_with(p256.priv_pem, t, len, 1), P11KMS_OK);
    assert_int_equal(open_with(x25519.priv_pem, t, len, 1), P11KMS_OK);
    /* Not a recipient: another RSA key; another P-256 key; P-384 (no recipient on it). */
    assert_int_equal(open_with(rsa2.priv_pem, t, len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(p256b.priv_pem, t, len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(p384.priv_pem, t, len, 0), P11KMS_ERR_DECRYPT);
    p11kms_free(t, len);

    /* A compact JWE has exactly one recipient. */
    uint8_t *out = NULL;
    assert_int_equal(p11kms_envelope_seal(NULL, P11KMS_FORMAT_JWE_COMPACT, r, 3,
                                          (const uint8_t *)PAYLOAD, strlen(PAYLOAD), &out, &len),
                     P11KMS_ERR_ARGUMENT);
    assert_null(out);
    for (int i = 0; i < 3; i++)
        p11kms_recipient_free(r[i]);
}

static void test_wrong_keys(void **state)
{
    (void)state;
    p11kms_recipient *r = recipient(&p256, NULL), *rr = recipient(&rsa, NULL);
    size_t len, rlen;
    char *t = seal(P11KMS_FORMAT_JWE_COMPACT, &r, 1, &len);
    char *rt = seal(P11KMS_FORMAT_JWE_COMPACT, &rr, 1, &rlen);

    assert_int_equal(open_with(p256b.priv_pem, t, len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(rsa2.priv_pem, rt, rlen, 0), P11KMS_ERR_DECRYPT);
    /* The epk on another curve than the key. */
    assert_int_equal(open_with(p384.priv_pem, t, len, 0), P11KMS_ERR_MALFORMED);
    assert_non_null(strstr(p11kms_last_error(), "epk is on P-256, the key on P-384"));
    assert_int_equal(open_with(x25519.priv_pem, t, len, 0), P11KMS_ERR_MALFORMED);
    /* A key of another type: no recipient for it. */
    assert_int_equal(open_with(rsa.priv_pem, t, len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(p256.priv_pem, rt, rlen, 0), P11KMS_ERR_DECRYPT);
    /* Not a key at all. */
    assert_int_equal(open_with("nonsense", t, len, 0), P11KMS_ERR_ARGUMENT);
    /* Neither a client nor a key. */
    struct p11kms_opener o = {0};
    uint8_t *out = NULL;
    size_t out_len;
    assert_int_equal(p11kms_envelope_open(&o, (uint8_t *)t, len, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    p11kms_free(t, len);
    p11kms_free(rt, rlen);
    p11kms_recipient_free(r);
    p11kms_recipient_free(rr);
}

static void expect_refused(const char *priv, const char *t, size_t len, const char *what)
{
    p11kms_status st = open_with(priv, t, len, 0);
    if (st != P11KMS_ERR_MALFORMED && st != P11KMS_ERR_DECRYPT)
        fail_msg("%s: status %s (%s)", what, p11kms_status_name(st), p11kms_last_error());
}

static void test_truncations(void **state)
{
    (void)state;
    p11kms_recipient *r[2] = {recipient(&p256, NULL), recipient(&rsa, NULL)};
    for (int f = 0; f < 2; f++) {
        size_t len;
        char *t = seal(f, r, f ? 2 : 1, &len);
        for (size_t n = 0; n < len; n++)
            expect_refused(p256.priv_pem, t, n, "truncated");
        p11kms_free(t, len);
    }
    p11kms_recipient_free(r[0]);
    p11kms_recipient_free(r[1]);
}

/* One bit flipped in each character, in turn; a flip that leaves JSON white space is the
   one change that is allowed to open (there is none in what we write). */
static void flip_all(const struct key *k, p11kms_envelope_format f)
{
    p11kms_recipient *r = recipient(k, NULL);
    size_t len;
    char *t = seal(f, &r, 1, &len);
    for (size_t i = 0; i < len; i++) {
        for (int bit = 0; bit < 8; bit += 5) { /* bits 0 and 5: case and neighbours */
            t[i] ^= (char)(1 << bit);
            char what[64];
            snprintf(what, sizeof what, "bit %d of byte %zu", bit, i);
            expect_refused(k->priv_pem, t, len, what);
            t[i] ^= (char)(1 << bit);
        }
    }
    assert_int_equal(open_with(k->priv_pem, t, len, 1), P11KMS_OK);
    p11kms_free(t, len);
    p11kms_recipient_free(r);
}

static void test_bit_flips(void **state)
{
    (void)state;
    flip_all(&p256, P11KMS_FORMAT_JWE_COMPACT);
    flip_all(&x25519, P11KMS_FORMAT_JWE_COMPACT);
    flip_all(&rsa, P11KMS_FORMAT_JWE_COMPACT);
    flip_all(&p384, P11KMS_FORMAT_JWE_JSON);
    flip_all(&rsa, P11KMS_FORMAT_JWE_JSON);
}

/* A compact token with header h and the other four segments of t. */
static char *with_header(const char *t, const char *h)
{
    char *hb = b64u((const uint8_t *)h, strlen(h));
    const char *rest = strchr(t, '.');
    size_t n = strlen(hb) + strlen(rest);
    char *s = malloc(n + 1);
    snprintf(s, n + 1, "%s%s", hb, rest);
    free(hb);
    return s;
}

static void test_headers(void **state)
{
    (void)state;
    p11kms_recipient *r = recipient(&rsa, NULL);
    size_t len;
    char *t = seal(P11KMS_FORMAT_JWE_COMPACT, &r, 1, &len);
    static const struct {
        const char *h;
        p11kms_status st;
    } cases[] = {
        {"{\"alg\":\"RSA-OAEP-256\",\"enc\":\"A256GCM\",\"typ\":\"JWE\"}",
         P11KMS_ERR_DECRYPT}, /* another AAD */
        {"{\"alg\":\"RSA-OAEP\",\"enc\":\"A256GCM\"}", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"RSA1_5\",\"enc\":\"A256GCM\"}", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"ECDH-ES\",\"enc\":\"A256GCM\"}", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"A256KW\",\"enc\":\"A256GCM\"}", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"RSA-OAEP-256\",\"enc\":\"A128GCM\"}", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"RSA-OAEP-256\",\"enc\":\"A256CBC-HS512\"}", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"RSA-OAEP-256\"}", P11KMS_ERR_MALFORMED},
        {"{\"enc\":\"A256GCM\"}", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"RSA-OAEP-256\",\"enc\":\"A256GCM\",\"zip\":\"DEF\"}", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"RSA-OAEP-256\",\"enc\":\"A256GCM\",\"crit\":[\"exp\"],\"exp\":1}",
         P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"RSA-OAEP-256\",\"enc\":\"A256GCM\",\"kid\":7}", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"RSA-OAEP-256\",\"alg\":\"RSA-OAEP-256\",\"enc\":\"A256GCM\"}",
         P11KMS_ERR_MALFORMED},
        {"[\"alg\"]", P11KMS_ERR_MALFORMED},
        {"{\"alg\":\"dir\",\"enc\":\"A256GCM\"}", P11KMS_ERR_MALFORMED}, /* an encrypted key */
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *s = with_header(t, cases[i].h);
        p11kms_status st = open_with(rsa.priv_pem, s, strlen(s), 0);
        if (st != cases[i].st)
            fail_msg("%s: %s (%s)", cases[i].h, p11kms_status_name(st), p11kms_last_error());
        free(s);
    }
    /* ECDH-ES+A256KW without an epk, and with one that is not a key. */
    p11kms_recipient *re = recipient(&p256, NULL);
    size_t elen;
    char *e = seal(P11KMS_FORMAT_JWE_COMPACT, &re, 1, &elen);
    char *s = with_header(e, "{\"alg\":\"ECDH-ES+A256KW\",\"enc\":\"A256GCM\"}");
    assert_int_equal(open_with(p256.priv_pem, s, strlen(s), 0), P11KMS_ERR_MALFORMED);
    free(s);
    s = with_header(e, "{\"alg\":\"ECDH-ES+A256KW\",\"enc\":\"A256GCM\",\"epk\":{\"kty\":\"EC\"}}");
    assert_int_equal(open_with(p256.priv_pem, s, strlen(s), 0), P11KMS_ERR_MALFORMED);
    free(s);
    p11kms_free(e, elen);
    p11kms_recipient_free(re);
    p11kms_free(t, len);
    p11kms_recipient_free(r);
}

static void test_json_refusals(void **state)
{
    (void)state;
    p11kms_recipient *r = recipient(&rsa, NULL);
    size_t len;
    char *t = seal(P11KMS_FORMAT_JWE_JSON, &r, 1, &len), *s;

    /* A member the serialization does not have. */
    s = replace(t, "{\"protected\"", "{\"extra\":1,\"protected\"");
    assert_int_equal(open_with(rsa.priv_pem, s, strlen(s), 0), P11KMS_ERR_MALFORMED);
    free(s);
    /* A parameter in two headers. */
    s = replace(t, "\"header\":{", "\"header\":{\"enc\":\"A256GCM\",");
    assert_int_equal(open_with(rsa.priv_pem, s, strlen(s), 0), P11KMS_ERR_MALFORMED);
    free(s);
    /* Unknown alg in a recipient's header; zip in the shared one. */
    s = replace(t, "RSA-OAEP-256", "RSA-OAEP-384");
    assert_int_equal(open_with(rsa.priv_pem, s, strlen(s), 0), P11KMS_ERR_MALFORMED);
    free(s);
    s = replace(t, "\"recipients\"", "\"unprotected\":{\"zip\":\"DEF\"},\"recipients\"");
    assert_int_equal(open_with(rsa.priv_pem, s, strlen(s), 0), P11KMS_ERR_MALFORMED);
    free(s);
    /* An empty list; "dir" in a recipient's header. */
    json_t *o = json_loads(t, 0, NULL);
    json_object_set_new(o, "recipients", json_array());
    s = json_dumps(o, JSON_COMPACT);
    assert_int_equal(open_with(rsa.priv_pem, s, strlen(s), 0), P11KMS_ERR_MALFORMED);
    free(s);
    json_decref(o);
    s = replace(t, "RSA-OAEP-256", "dir");
    assert_int_equal(open_with(rsa.priv_pem, s, strlen(s), 0), P11KMS_ERR_MALFORMED);
    free(s);
    /* An unprotected "aad" that is not base64url; a good one not in the AAD. */
    s = replace(t, "\"recipients\"", "\"aad\":\"a+b\",\"recipients\"");
    assert_int_equal(open_with(rsa.priv_pem, s, strlen(s), 0), P11KMS_ERR_MALFORMED);
    free(s);
    s = replace(t, "\"recipients\"", "\"aad\":\"YWFk\",\"recipients\"");
    assert_int_equal(open_with(rsa.priv_pem, s, strlen(s), 0), P11KMS_ERR_DECRYPT);
    free(s);
    p11kms_free(t, len);
    p11kms_recipient_free(r);
}

/* p11kms_seal's own "dir" JWE needs the service. */
static void test_dir_needs_client(void **state)
{
    (void)state;
    uint8_t key[32] = {0}, blob[16] = {1};
    char *t = NULL;
    size_t len;
    assert_int_equal(kms_jwe_seal(KMS_JWE_COMPACT, key, NULL, "arn:aws:kms:r:1:key/k", blob,
                                  sizeof blob, NULL, 0, (const uint8_t *)"x", 1, &t, &len),
                     P11KMS_OK);
    assert_int_equal(open_with(rsa.priv_pem, t, len, 0), P11KMS_ERR_DECRYPT);
    assert_non_null(strstr(p11kms_last_error(), "through the service"));
    free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concat_kdf_vector), cmocka_unit_test(test_aes_kw_vector),
        cmocka_unit_test(test_jwk_known),         cmocka_unit_test(test_jwk_round_trips),
        cmocka_unit_test(test_jwk_refusals),      cmocka_unit_test(test_round_trips),
        cmocka_unit_test(test_mixed_recipients),  cmocka_unit_test(test_wrong_keys),
        cmocka_unit_test(test_truncations),       cmocka_unit_test(test_bit_flips),
        cmocka_unit_test(test_headers),           cmocka_unit_test(test_json_refusals),
        cmocka_unit_test(test_dir_needs_client),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
