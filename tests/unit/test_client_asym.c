/*
 * Unit tests for src/client/headers.c (the canonical form of a header list:
 * a fixed vector, the cases that would be ambiguous without length prefixes,
 * order, case, empty values, what is refused) and the argument checks of
 * src/client/asym.c, none of which may reach the service: the client points
 * at a closed port with a breaker that opens on the first failed call, so a
 * check that let a request through would show as TransportError and an open
 * breaker.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "offline_client.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* ---- the canonical form ----------------------------------------------------------- */

struct canon {
    uint8_t *p;
    size_t n;
};

static struct canon canon_of(const char *const *names, const char *const *values, size_t n)
{
    struct canon c = {NULL, 0};
    p11kms_status st = p11kms_headers_canonical(names, values, n, &c.p, &c.n);
    if (st != P11KMS_OK)
        fail_msg("p11kms_headers_canonical: %s: %s", p11kms_status_name(st), p11kms_last_error());
    return c;
}

static int same(struct canon a, struct canon b)
{
    int r = a.n == b.n && memcmp(a.p, b.p, a.n) == 0;
    p11kms_free(a.p, a.n);
    p11kms_free(b.p, b.n);
    return r;
}

/* docs/client.md's example, byte for byte. */
static void test_canonical_vector(void **state)
{
    const char *names[] = {"X-Request-Id", "Content-Type", "x-request-id", "Date"};
    const char *values[] = {"r-1", "application/json", "r-2", ""};
    static const char want[] = "p11kms-headers-v1\0"
                               "\0\0\0\4"
                               "\0\0\0\14"
                               "content-type"
                               "\0\0\0\20"
                               "application/json"
                               "\0\0\0\4"
                               "date"
                               "\0\0\0\0"
                               "\0\0\0\14"
                               "x-request-id"
                               "\0\0\0\3"
                               "r-1"
                               "\0\0\0\14"
                               "x-request-id"
                               "\0\0\0\3"
                               "r-2";
    struct canon c;
    (void)state;
    c = canon_of(names, values, N_ELEMS(names));
    assert_int_equal(c.n, sizeof want - 1);
    assert_int_equal(c.n, 116);
    assert_memory_equal(c.p, want, c.n);
    p11kms_free(c.p, c.n);
}

static void test_canonical_empty_list(void **state)
{
    static const char want[] = "p11kms-headers-v1\0"
                               "\0\0\0\0";
    struct canon c;
    (void)state;
    c = canon_of(NULL, NULL, 0);
    assert_int_equal(c.n, sizeof want - 1);
    assert_memory_equal(c.p, want, c.n);
    p11kms_free(c.p, c.n);
}

/* Where a split moves between name and value, or between fields. */
static void test_canonical_splits_differ(void **state)
{
    const char *n1[] = {"a"}, *v1[] = {"bc"};
    const char *n2[] = {"ab"}, *v2[] = {"c"};
    const char *n3[] = {"a", "b"}, *v3[] = {"", "c"};
    const char *n4[] = {"a"}, *v4[] = {"bc"};
    const char *n5[] = {"ab", "c"}, *v5[] = {"1", "2"};
    const char *n6[] = {"a", "bc"}, *v6[] = {"1", "2"};
    (void)state;
    assert_false(same(canon_of(n1, v1, 1), canon_of(n2, v2, 1)));
    assert_false(same(canon_of(n3, v3, 2), canon_of(n4, v4, 1)));
    assert_false(same(canon_of(n5, v5, 2), canon_of(n6, v6, 2)));
    /* a value holding what looks like a second field is still one value */
    {
        const char *na[] = {"a", "b"}, *va[] = {"1", "2"};
        const char *nb[] = {"a"}, *vb[] = {"1 b 2"};
        assert_false(same(canon_of(na, va, 2), canon_of(nb, vb, 1)));
    }
}

static void test_canonical_order(void **state)
{
    const char *n1[] = {"b", "a"}, *v1[] = {"2", "1"};
    const char *n2[] = {"a", "b"}, *v2[] = {"1", "2"};
    const char *d1[] = {"a", "a"}, *dv1[] = {"1", "2"}, *dv2[] = {"2", "1"};
    /* a name that is a prefix of another sorts first; '-' before letters */
    const char *p1[] = {"ab", "a-b", "a"}, *pv[] = {"x", "y", "z"};
    const char *p2[] = {"a", "a-b", "ab"}, *pv2[] = {"z", "y", "x"};
    (void)state;
    /* different names: the caller's order does not matter */
    assert_true(same(canon_of(n1, v1, 2), canon_of(n2, v2, 2)));
    /* one name twice: it does */
    assert_false(same(canon_of(d1, dv1, 2), canon_of(d1, dv2, 2)));
    assert_true(same(canon_of(p1, pv, 3), canon_of(p2, pv2, 3)));
    {
        struct canon c = canon_of(p1, pv, 3);
        /* label 18, count 4, then "a" (4 + 1 + 4 + 1) and the length of "a-b" */
        assert_int_equal(c.p[22 + 3], 1);
        assert_int_equal(c.p[22 + 4], 'a');
        assert_int_equal(c.p[22 + 9], 'z');
        assert_memory_equal(c.p + 22 + 10, "\0\0\0\3a-b", 7);
        p11kms_free(c.p, c.n);
    }
}

static void test_canonical_case(void **state)
{
    const char *upper[] = {"Content-TYPE"}, *lowered[] = {"content-type"}, *v[] = {"Text/Plain"};
    const char *vlow[] = {"text/plain"};
    const char *mixed[] = {"A", "a"}, *mv[] = {"1", "2"};
    const char *mixed2[] = {"a", "A"};
    (void)state;
    /* names are case-insensitive in HTTP: lower-cased */
    assert_true(same(canon_of(upper, v, 1), canon_of(lowered, v, 1)));
    /* values are not */
    assert_false(same(canon_of(lowered, v, 1), canon_of(lowered, vlow, 1)));
    /* "A" and "a" are one name: the caller's order of the two counts */
    assert_true(same(canon_of(mixed, mv, 2), canon_of(mixed2, mv, 2)));
    {
        const char *other[] = {"a", "A"}, *ov[] = {"2", "1"};
        assert_false(same(canon_of(mixed, mv, 2), canon_of(other, ov, 2)));
    }
}

static void test_canonical_empty_value(void **state)
{
    const char *n[] = {"x-empty"}, *v[] = {""};
    const char *n2[] = {"x-empty", "x-other"}, *v2[] = {"", "1"};
    const char *n3[] = {"x-other"}, *v3[] = {"1"};
    struct canon c;
    (void)state;
    c = canon_of(n, v, 1);
    assert_int_equal(c.n, 18 + 4 + 4 + 7 + 4);
    assert_memory_equal(c.p + c.n - 4, "\0\0\0\0", 4);
    p11kms_free(c.p, c.n);
    /* an empty header is a header: present differs from absent */
    assert_false(same(canon_of(n2, v2, 2), canon_of(n3, v3, 1)));
    assert_false(same(canon_of(n, v, 1), canon_of(NULL, NULL, 0)));
}

static void expect_refused(const char *name, const char *value)
{
    const char *n[] = {"ok", name}, *v[] = {"1", value};
    uint8_t *out = (uint8_t *)0x1;
    size_t len = 99;
    assert_int_equal(p11kms_headers_canonical(n, v, 2, &out, &len), P11KMS_ERR_ARGUMENT);
    assert_null(out);
    assert_int_equal(len, 0);
    assert_non_null(strstr(p11kms_last_error(), "header 1"));
}

static void test_canonical_refused(void **state)
{
    char long_name[258], long_value[4098];
    uint8_t *out;
    size_t len;
    (void)state;
    /* names: HTTP tokens only */
    expect_refused("", "v");
    expect_refused("a b", "v");
    expect_refused("a:b", "v");
    expect_refused("a\tb", "v");
    expect_refused("(a)", "v");
    expect_refused("\xc3\xa9", "v");
    expect_refused("a\r\nb", "v");
    expect_refused(NULL, "v");
    memset(long_name, 'n', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';
    expect_refused(long_name, "v");
    long_name[256] = '\0'; /* exactly 256: fine */
    {
        const char *n[] = {long_name}, *v[] = {"v"};
        assert_int_equal(p11kms_headers_canonical(n, v, 1, &out, &len), P11KMS_OK);
        p11kms_free(out, len);
    }
    /* values: no controls but tab, no whitespace at either end */
    expect_refused("a", "x\r\ny: z");
    expect_refused("a", "x\ny");
    expect_refused("a", "x\x01y");
    expect_refused("a", "x\x7fy");
    expect_refused("a", " lead");
    expect_refused("a", "trail ");
    expect_refused("a", "\ttab");
    expect_refused("a", NULL);
    memset(long_value, 'v', sizeof long_value - 1);
    long_value[sizeof long_value - 1] = '\0';
    expect_refused("a", long_value);
    {
        /* tab and space inside, obs-text, punctuation: taken as they are */
        const char *n[] = {"!#$%&'*+-.^_`|~09AZaz"}, *v[] = {"a\tb c\xc3\xa9\"(),;=?@[]{}"};
        assert_int_equal(p11kms_headers_canonical(n, v, 1, &out, &len), P11KMS_OK);
        assert_memory_equal(out + 22 + 4, "!#$%&'*+-.^_`|~09azaz", 21);
        p11kms_free(out, len);
    }
    /* the whole form over P11KMS_MESSAGE_MAX, GenerateMac's bound */
    {
        const char *n[] = {"a", "b"}, *v[2];
        char half[2100];
        memset(half, 'h', sizeof half - 1);
        half[sizeof half - 1] = '\0';
        v[0] = v[1] = half;
        assert_int_equal(p11kms_headers_canonical(n, v, 2, &out, &len), P11KMS_ERR_ARGUMENT);
        assert_null(out);
        assert_non_null(strstr(p11kms_last_error(), "over 4096"));
        /* and one that just fits: 18 + 4 + 8 + 1 + 4061 = 4092, then 4096 */
        long_value[4061] = '\0';
        v[0] = long_value;
        assert_int_equal(p11kms_headers_canonical(n, v, 1, &out, &len), P11KMS_OK);
        assert_int_equal(len, 4092);
        p11kms_free(out, len);
        long_value[4061] = 'v';
        long_value[4065] = '\0';
        assert_int_equal(p11kms_headers_canonical(n, v, 1, &out, &len), P11KMS_OK);
        assert_int_equal(len, P11KMS_MESSAGE_MAX);
        p11kms_free(out, len);
        long_value[4065] = 'v';
        long_value[4066] = '\0';
        assert_int_equal(p11kms_headers_canonical(n, v, 1, &out, &len), P11KMS_ERR_ARGUMENT);
    }
    /* NULL arrays and outputs */
    assert_int_equal(p11kms_headers_canonical(NULL, NULL, 1, &out, &len), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_headers_canonical(NULL, NULL, 0, NULL, &len), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_headers_canonical(NULL, NULL, 0, &out, NULL), P11KMS_ERR_ARGUMENT);
}

/* ---- argument checks that must not reach the service ------------------------------- */

static void test_sign_verify_arguments(void **state)
{
    p11kms_client *c = unreachable_client();
    uint8_t msg[P11KMS_MESSAGE_MAX + 1] = {0}, *sig = (uint8_t *)0x1;
    size_t sig_len = 7;
    (void)state;
#define SIGN(alg, type, n) p11kms_sign(c, "alias/k", alg, type, msg, n, &sig, &sig_len)
    assert_int_equal(SIGN("RSASSA_PSS_SHA_999", P11KMS_MESSAGE_RAW, 10), P11KMS_ERR_ARGUMENT);
    assert_null(sig);
    assert_int_equal(sig_len, 0);
    assert_non_null(strstr(p11kms_last_error(), "RSASSA_PSS_SHA_999 is not a signing algorithm"));
    assert_int_equal(SIGN(NULL, P11KMS_MESSAGE_RAW, 10), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SIGN("rsassa_pss_sha_256", P11KMS_MESSAGE_RAW, 10), P11KMS_ERR_ARGUMENT);
    /* algorithms of other usages */
    assert_int_equal(SIGN("HMAC_SHA_256", P11KMS_MESSAGE_RAW, 10), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SIGN("RSAES_OAEP_SHA_256", P11KMS_MESSAGE_RAW, 10), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SIGN("ECDH", P11KMS_MESSAGE_RAW, 10), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SIGN("SYMMETRIC_DEFAULT", P11KMS_MESSAGE_RAW, 10), P11KMS_ERR_ARGUMENT);
    /* messages: 1 to 4096 bytes */
    assert_int_equal(SIGN("ECDSA_SHA_256", P11KMS_MESSAGE_RAW, 0), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SIGN("ECDSA_SHA_256", P11KMS_MESSAGE_RAW, P11KMS_MESSAGE_MAX + 1),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(
        p11kms_sign(c, "alias/k", "ECDSA_SHA_256", P11KMS_MESSAGE_RAW, NULL, 1, &sig, &sig_len),
        P11KMS_ERR_ARGUMENT);
    /* a digest is the algorithm's length; Ed25519 takes none */
    assert_int_equal(SIGN("ECDSA_SHA_384", P11KMS_MESSAGE_DIGEST, 32), P11KMS_ERR_ARGUMENT);
    assert_non_null(strstr(p11kms_last_error(), "48 bytes, not 32"));
    assert_int_equal(SIGN("RSASSA_PKCS1_V1_5_SHA_512", P11KMS_MESSAGE_DIGEST, 63),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(SIGN("ED25519_SHA_512", P11KMS_MESSAGE_DIGEST, 64), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SIGN("ECDSA_SHA_256", (p11kms_message_type)2, 32), P11KMS_ERR_ARGUMENT);
    /* key ids and outputs */
    assert_int_equal(
        p11kms_sign(c, "", "ECDSA_SHA_256", P11KMS_MESSAGE_RAW, msg, 1, &sig, &sig_len),
        P11KMS_ERR_ARGUMENT);
    assert_int_equal(
        p11kms_sign(c, NULL, "ECDSA_SHA_256", P11KMS_MESSAGE_RAW, msg, 1, &sig, &sig_len),
        P11KMS_ERR_ARGUMENT);
    assert_int_equal(
        p11kms_sign(c, "k", "ECDSA_SHA_256", P11KMS_MESSAGE_RAW, msg, 1, NULL, &sig_len),
        P11KMS_ERR_ARGUMENT);
    assert_int_equal(
        p11kms_sign(NULL, "k", "ECDSA_SHA_256", P11KMS_MESSAGE_RAW, msg, 1, &sig, &sig_len),
        P11KMS_ERR_ARGUMENT);
    /* Verify: the same checks, and the signature's bounds */
    assert_int_equal(p11kms_verify(c, "k", "ECDSA_SHA_256", P11KMS_MESSAGE_RAW, msg, 1, NULL, 64),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_verify(c, "k", "ECDSA_SHA_256", P11KMS_MESSAGE_RAW, msg, 1, msg, 0),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_verify(c, "k", "ECDSA_SHA_256", P11KMS_MESSAGE_RAW, msg, 1, msg, 6145),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_verify(c, "k", "HMAC_SHA_256", P11KMS_MESSAGE_RAW, msg, 1, msg, 64),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(
        p11kms_verify(c, "k", "ECDSA_SHA_256", P11KMS_MESSAGE_DIGEST, msg, 31, msg, 64),
        P11KMS_ERR_ARGUMENT);
    assert_nothing_sent(c);
    /* and what passes the checks goes: exactly 32 bytes for a SHA-256 digest */
    assert_int_equal(SIGN("ECDSA_SHA_256", P11KMS_MESSAGE_DIGEST, 32), P11KMS_ERR_TRANSPORT);
    assert_null(sig);
    assert_int_equal(kms_transport_breaker_state(c->transport), KMS_BREAKER_OPEN);
#undef SIGN
    p11kms_client_free(c);
}

static void test_mac_arguments(void **state)
{
    p11kms_client *c = unreachable_client();
    uint8_t msg[16] = {0}, *mac = (uint8_t *)0x1;
    size_t mac_len = 3;
    const char *names[] = {"a"}, *values[] = {"1"}, *bad[] = {"a b"}, *bad_value[] = {"1\r\n"};
    (void)state;
    assert_int_equal(p11kms_generate_mac(c, "k", "HMAC_SHA_385", msg, 16, &mac, &mac_len),
                     P11KMS_ERR_ARGUMENT);
    assert_null(mac);
    assert_int_equal(mac_len, 0);
    assert_non_null(strstr(p11kms_last_error(), "is not a MAC algorithm"));
    assert_int_equal(p11kms_generate_mac(c, "k", "ECDSA_SHA_256", msg, 16, &mac, &mac_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_mac(c, "k", NULL, msg, 16, &mac, &mac_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_mac(c, "k", "HMAC_SHA_256", msg, 0, &mac, &mac_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_mac(c, "k", "HMAC_SHA_256", msg, 16, &mac, NULL),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_verify_mac(c, "k", "HMAC_SHA_256", msg, 16, NULL, 32),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_verify_mac(c, "k", "HMAC_SHA_256", msg, 16, msg, 0),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_verify_mac(c, "", "HMAC_SHA_256", msg, 16, msg, 16),
                     P11KMS_ERR_ARGUMENT);
    /* the headers helper: its list and its algorithm checked first */
    assert_int_equal(p11kms_headers_mac(c, "k", names, bad_value, 1, NULL, &mac, &mac_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_headers_mac(c, "k", bad, values, 1, NULL, &mac, &mac_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(
        p11kms_headers_mac(c, "k", names, values, 1, "RSASSA_PSS_SHA_384", &mac, &mac_len),
        P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_headers_mac(NULL, "k", names, values, 1, NULL, &mac, &mac_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_headers_verify(c, "k", names, bad_value, 1, NULL, msg, 48),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_headers_verify(c, "k", names, values, 1, NULL, NULL, 48),
                     P11KMS_ERR_ARGUMENT);
    assert_nothing_sent(c);
    /* NULL is HMAC_SHA_384, and goes */
    assert_int_equal(p11kms_headers_mac(c, "k", names, values, 1, NULL, &mac, &mac_len),
                     P11KMS_ERR_TRANSPORT);
    assert_null(mac);
    p11kms_client_free(c);
}

static void test_other_arguments(void **state)
{
    p11kms_client *c = unreachable_client();
    struct p11kms_public_key pk;
    struct p11kms_data_key_pair pair;
    const struct p11kms_context dup[] = {{"a", "1"}, {"a", "2"}};
    uint8_t buf[16] = {0}, *out = (uint8_t *)0x1;
    size_t out_len = 5;
    (void)state;
    memset(&pk, 0x5a, sizeof pk);
    assert_int_equal(p11kms_get_public_key(c, "", &pk), P11KMS_ERR_ARGUMENT);
    assert_null(pk.der);
    assert_int_equal(pk.key_spec[0], 0);
    assert_int_equal(p11kms_get_public_key(c, "k", NULL), P11KMS_ERR_ARGUMENT);
    /* DeriveSharedSecret: a peer key of 1 to 8192 bytes */
    assert_int_equal(p11kms_derive_shared_secret(c, "k", NULL, 10, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    assert_null(out);
    assert_int_equal(out_len, 0);
    assert_int_equal(p11kms_derive_shared_secret(c, "k", buf, 0, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_derive_shared_secret(c, "k", buf, 8193, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_derive_shared_secret(c, "k", buf, 16, NULL, &out_len),
                     P11KMS_ERR_ARGUMENT);
    /* GenerateDataKeyPair: RSA and NIST EC pair specs only */
    memset(&pair, 0x5a, sizeof pair);
    assert_int_equal(p11kms_generate_data_key_pair(c, "k", "HMAC_256", NULL, 0, &pair),
                     P11KMS_ERR_ARGUMENT);
    assert_null(pair.private_key);
    assert_null(pair.public_key);
    assert_int_equal(p11kms_generate_data_key_pair(c, "k", "SYMMETRIC_DEFAULT", NULL, 0, &pair),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key_pair(c, "k", "ECC_NIST_EDWARDS25519", NULL, 0, &pair),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key_pair(c, "k", NULL, NULL, 0, &pair),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key_pair(c, "k", "RSA_2048", NULL, 1, &pair),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key_pair(c, "k", "RSA_2048", dup, 2, &pair),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(
        p11kms_generate_data_key_pair_without_plaintext(c, "", "ECC_NIST_P256", NULL, 0, &pair),
        P11KMS_ERR_ARGUMENT);
    /* RSA Encrypt/Decrypt: OAEP algorithms only, sizes bounded */
    assert_int_equal(p11kms_rsa_encrypt(c, "k", "SYMMETRIC_DEFAULT", buf, 16, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_rsa_encrypt(c, "k", "RSASSA_PSS_SHA_256", buf, 16, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_rsa_encrypt(c, "k", NULL, buf, 0, &out, &out_len), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_rsa_encrypt(c, "k", NULL, buf, 4097, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_rsa_decrypt(c, "k", "RSAES_OAEP_SHA_384", buf, 16, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_rsa_decrypt(c, "k", NULL, buf, 6145, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_rsa_decrypt(c, NULL, NULL, buf, 16, &out, &out_len),
                     P11KMS_ERR_ARGUMENT);
    assert_null(out);
    assert_nothing_sent(c);
    /* the clears take NULL and empty structs */
    p11kms_public_key_clear(NULL);
    p11kms_data_key_pair_clear(NULL);
    p11kms_public_key_clear(&pk);
    p11kms_data_key_pair_clear(&pair);
    assert_int_equal(p11kms_rsa_decrypt(c, "k", "RSAES_OAEP_SHA_1", buf, 16, &out, &out_len),
                     P11KMS_ERR_TRANSPORT);
    p11kms_client_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_canonical_vector),
        cmocka_unit_test(test_canonical_empty_list),
        cmocka_unit_test(test_canonical_splits_differ),
        cmocka_unit_test(test_canonical_order),
        cmocka_unit_test(test_canonical_case),
        cmocka_unit_test(test_canonical_empty_value),
        cmocka_unit_test(test_canonical_refused),
        cmocka_unit_test(test_sign_verify_arguments),
        cmocka_unit_test(test_mac_arguments),
        cmocka_unit_test(test_other_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
