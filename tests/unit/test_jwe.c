/*
 * Unit tests for src/client/jwe.c: JWE (RFC 7516) with "dir" and A256GCM.
 *
 * VECTOR was computed independently with Python's cryptography (AESGCM over
 * the base64url protected header as AAD, RFC 7516 §5.1) and checked to
 * decrypt with python3-jwcrypto:
 *
 *   key  = bytes(range(32));  iv = bytes(range(0xa0, 0xac))
 *   blob = bytes(range(1, 82)); payload = b'{"hello":"world"}'
 *   header = {"alg":"dir","enc":"A256GCM","kid":KID,"p11kms_blob":b64u(blob),
 *             "p11kms_ctx":{"path":"a/b","purpose":"test","tenant":"acmé"}}
 *   (compact JSON, ensure_ascii=False)
 *
 * Then: every truncation of a valid token is refused, every part that is not
 * what we accept is P11KMS_ERR_MALFORMED, and a flipped bit anywhere is
 * MALFORMED or DECRYPT and never plaintext, in both serializations.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/encoding.h"

/* ---- the vector -------------------------------------------------------------- */

static const char KID[] =
    "arn:aws:kms:us-east-1:123456789012:key/6f1c2a9e-5304-4b1d-8a77-30c2e5194df0";
static const char PAYLOAD[] = "{\"hello\":\"world\"}";

/* clang-format off */
static const char VECTOR[] =
    "eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIiwia2lkIjoiYXJuOmF3czprbXM6dXMtZWFzdC0xOjEyMzQ1Njc4OTAx"
    "MjprZXkvNmYxYzJhOWUtNTMwNC00YjFkLThhNzctMzBjMmU1MTk0ZGYwIiwicDExa21zX2Jsb2IiOiJBUUlEQkFVR0J3"
    "Z0pDZ3NNRFE0UEVCRVNFeFFWRmhjWUdSb2JIQjBlSHlBaElpTWtKU1luS0NrcUt5d3RMaTh3TVRJek5EVTJOemc1T2pz"
    "OFBUNF9RRUZDUTBSRlJrZElTVXBMVEUxT1QxQlIiLCJwMTFrbXNfY3R4Ijp7InBhdGgiOiJhL2IiLCJwdXJwb3NlIjoi"
    "dGVzdCIsInRlbmFudCI6ImFjbcOpIn19"
    "..oKGio6Slpqeoqaqr.nToUSCmnbZ1YR_C8dRak_A0.LiusE9tFTraxqI8YE1IpfQ";
/* clang-format on */

static uint8_t key[32], iv[12], blob[81];

/* In no particular order: the header has them sorted. */
static const struct p11kms_context CTX[] = {
    {"tenant", "acm\xc3\xa9"},
    {"path", "a/b"},
    {"purpose", "test"},
};

static int setup(void **state)
{
    (void)state;
    for (int i = 0; i < 32; i++)
        key[i] = (uint8_t)i;
    for (int i = 0; i < 12; i++)
        iv[i] = (uint8_t)(0xa0 + i);
    for (int i = 0; i < 81; i++)
        blob[i] = (uint8_t)(i + 1);
    return 0;
}

/* The memo every open_with goes through as well (NULL: none), as p11kms_open's. */
static struct kms_jwe_memo *memo;

/*
 * Parses and decrypts with key: without a memo, with kms_jwe_decrypt; with
 * memo set, through it and with kms_jwe_decrypt_in_place, as p11kms_open
 * does. out is checked to be NULL on failure.
 */
static p11kms_status open_with(const char *tok, size_t len, const uint8_t *k, uint8_t **out,
                               size_t *out_len)
{
    struct kms_jwe j;
    *out = (uint8_t *)"sentinel";
    *out_len = 99;
    p11kms_status st = memo ? kms_jwe_parse_memo(tok, len, memo, &j) : kms_jwe_parse(tok, len, &j);
    if (st == P11KMS_OK) {
        st = memo ? kms_jwe_decrypt_in_place(&j, k, 32, out, out_len)
                  : kms_jwe_decrypt(&j, k, 32, out, out_len);
        kms_jwe_clear(&j);
    } else {
        /* A failed parse leaves nothing behind. */
        assert_null(j.header);
        assert_null(j.aad);
        *out = NULL;
        *out_len = 0;
    }
    if (st != P11KMS_OK) {
        assert_null(*out);
        assert_int_equal(*out_len, 0);
    }
    return st;
}

static p11kms_status try_open(const char *tok)
{
    uint8_t *out;
    size_t n;
    p11kms_status st = open_with(tok, strlen(tok), key, &out, &n);
    if (st == P11KMS_OK)
        p11kms_free(out, n);
    return st;
}

/* The flattened JSON form of a compact token. */
static char *flattened_of(const char *compact)
{
    const char *d[4];
    const char *p = compact;
    for (int i = 0; i < 4; i++) {
        d[i] = strchr(p, '.');
        assert_non_null(d[i]);
        p = d[i] + 1;
    }
    size_t cap = strlen(compact) + 100;
    char *out = malloc(cap);
    assert_non_null(out);
    snprintf(out, cap,
             "{\"protected\":\"%.*s\",\"iv\":\"%.*s\",\"ciphertext\":\"%.*s\",\"tag\":\"%s\"}",
             (int)(d[0] - compact), compact, (int)(d[2] - d[1] - 1), d[1] + 1,
             (int)(d[3] - d[2] - 1), d[2] + 1, d[3] + 1);
    return out;
}

/*
 * A compact token with any protected header, IV and tag sizes, sealed the
 * standard way with OpenSSL directly, so a refusal can only be the parser's.
 */
static char *make_token(const char *header, size_t iv_len, size_t tag_len, const char *ekey)
{
    struct kms_buf h = KMS_BUF_INIT, tok = KMS_BUF_INIT;
    uint8_t ivb[16], tag[20], ct[64];
    size_t n = strlen(PAYLOAD);
    int len;
    assert_int_equal(kms_b64url_encode((const uint8_t *)header, strlen(header), &h), KMS_OK);
    memset(ivb, 7, sizeof ivb);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    assert_non_null(c);
    assert_int_equal(EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL), 1);
    assert_int_equal(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, (int)iv_len, NULL), 1);
    assert_int_equal(EVP_EncryptInit_ex(c, NULL, NULL, key, ivb), 1);
    assert_int_equal(EVP_EncryptUpdate(c, NULL, &len, h.data, (int)h.len), 1);
    assert_int_equal(EVP_EncryptUpdate(c, ct, &len, (const uint8_t *)PAYLOAD, (int)n), 1);
    assert_int_equal(EVP_EncryptFinal_ex(c, ct + n, &len), 1);
    assert_int_equal(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, 16, tag), 1);
    EVP_CIPHER_CTX_free(c);
    memset(tag + 16, 0, 4);
    assert_int_equal(kms_buf_append(&tok, h.data, h.len), KMS_OK);
    assert_int_equal(kms_buf_append_str(&tok, "."), KMS_OK);
    assert_int_equal(kms_buf_append_str(&tok, ekey), KMS_OK);
    assert_int_equal(kms_buf_append_str(&tok, "."), KMS_OK);
    assert_int_equal(kms_b64url_encode(ivb, iv_len, &tok), KMS_OK);
    assert_int_equal(kms_buf_append_str(&tok, "."), KMS_OK);
    assert_int_equal(kms_b64url_encode(ct, n, &tok), KMS_OK);
    assert_int_equal(kms_buf_append_str(&tok, "."), KMS_OK);
    assert_int_equal(kms_b64url_encode(tag, tag_len, &tok), KMS_OK);
    assert_int_equal(kms_buf_terminate(&tok), KMS_OK);
    kms_buf_free(&h);
    return (char *)tok.data;
}

#define GOOD_BLOB "AQID"
#define HDR(rest) "{\"alg\":\"dir\",\"enc\":\"A256GCM\"" rest "}"
#define GOOD_REST ",\"kid\":\"k\",\"p11kms_blob\":\"" GOOD_BLOB "\",\"p11kms_ctx\":{\"a\":\"b\"}"

static p11kms_status header_status(const char *header)
{
    char *tok = make_token(header, 12, 16, "");
    p11kms_status st = try_open(tok);
    free(tok);
    return st;
}

/* ---- the vector -------------------------------------------------------------- */

static void test_vector_seal(void **state)
{
    (void)state;
    char *tok;
    size_t n;
    assert_int_equal(kms_jwe_seal(KMS_JWE_COMPACT, key, iv, KID, blob, sizeof blob, CTX, 3,
                                  (const uint8_t *)PAYLOAD, strlen(PAYLOAD), &tok, &n),
                     P11KMS_OK);
    assert_string_equal(tok, VECTOR);
    assert_int_equal(n, strlen(VECTOR));
    p11kms_free(tok, n);

    char *flat = flattened_of(VECTOR);
    assert_int_equal(kms_jwe_seal(KMS_JWE_FLATTENED, key, iv, KID, blob, sizeof blob, CTX, 3,
                                  (const uint8_t *)PAYLOAD, strlen(PAYLOAD), &tok, &n),
                     P11KMS_OK);
    assert_string_equal(tok, flat);
    p11kms_free(tok, n);
    free(flat);
}

static void check_vector_parts(const struct kms_jwe *j)
{
    assert_string_equal(j->kid, KID);
    assert_int_equal(j->blob_len, sizeof blob);
    assert_memory_equal(j->blob, blob, sizeof blob);
    assert_int_equal(j->nctx, 3);
    assert_string_equal(j->ctx[0].key, "path");
    assert_string_equal(j->ctx[0].value, "a/b");
    assert_string_equal(j->ctx[1].key, "purpose");
    assert_string_equal(j->ctx[2].key, "tenant");
    assert_string_equal(j->ctx[2].value, "acm\xc3\xa9");
    assert_memory_equal(j->iv, iv, sizeof iv);
    assert_int_equal(j->aad_len, (size_t)(strchr(VECTOR, '.') - VECTOR));
    assert_memory_equal(j->aad, VECTOR, j->aad_len);
    assert_int_equal(j->ciphertext_len, strlen(PAYLOAD));
}

static void test_vector_open(void **state)
{
    (void)state;
    struct kms_jwe j;
    uint8_t *out;
    size_t n;
    assert_int_equal(kms_jwe_parse(VECTOR, strlen(VECTOR), &j), P11KMS_OK);
    check_vector_parts(&j);
    assert_int_equal(kms_jwe_decrypt(&j, key, sizeof key, &out, &n), P11KMS_OK);
    assert_int_equal(n, strlen(PAYLOAD));
    assert_memory_equal(out, PAYLOAD, n);
    p11kms_free(out, n);
    /* A key that is not 32 bytes is the caller's mistake; another key fails the tag. */
    assert_int_equal(kms_jwe_decrypt(&j, key, 31, &out, &n), P11KMS_ERR_ARGUMENT);
    uint8_t other[32];
    memcpy(other, key, 32);
    other[31] ^= 1;
    assert_int_equal(kms_jwe_decrypt(&j, other, 32, &out, &n), P11KMS_ERR_DECRYPT);
    assert_null(out);
    kms_jwe_clear(&j);

    char *flat = flattened_of(VECTOR);
    assert_int_equal(kms_jwe_parse(flat, strlen(flat), &j), P11KMS_OK);
    check_vector_parts(&j);
    assert_int_equal(kms_jwe_decrypt(&j, key, sizeof key, &out, &n), P11KMS_OK);
    assert_memory_equal(out, PAYLOAD, n);
    p11kms_free(out, n);
    kms_jwe_clear(&j);
    free(flat);
}

static void test_round_trips(void **state)
{
    (void)state;
    static const size_t sizes[] = {0, 1, 15, 16, 17, 1000, 65537, (size_t)1 << 20};
    uint8_t k[32];
    assert_int_equal(RAND_bytes(k, sizeof k), 1);
    uint8_t *payload = malloc((size_t)1 << 20);
    assert_non_null(payload);
    assert_int_equal(RAND_bytes(payload, 1 << 20), 1);
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        for (int form = KMS_JWE_COMPACT; form <= KMS_JWE_FLATTENED; form++) {
            char *t1, *t2;
            size_t n1, n2, n;
            uint8_t *out;
            assert_int_equal(kms_jwe_seal((enum kms_jwe_form)form, k, NULL, KID, blob, 10, NULL, 0,
                                          payload, sizes[i], &t1, &n1),
                             P11KMS_OK);
            assert_int_equal(kms_jwe_seal((enum kms_jwe_form)form, k, NULL, KID, blob, 10, NULL, 0,
                                          payload, sizes[i], &t2, &n2),
                             P11KMS_OK);
            /* A fresh IV each time. */
            assert_int_equal(n1, n2);
            assert_true(strcmp(t1, t2) != 0);
            assert_int_equal(open_with(t1, n1, k, &out, &n), P11KMS_OK);
            assert_int_equal(n, sizes[i]);
            if (n)
                assert_memory_equal(out, payload, n);
            p11kms_free(out, n);
            p11kms_free(t1, n1);
            p11kms_free(t2, n2);
        }
    }
    free(payload);
}

static void test_seal_arguments(void **state)
{
    (void)state;
    char *tok = (char *)"x";
    size_t n = 1;
    char long_kid[300];
    memset(long_kid, 'k', sizeof long_kid - 1);
    long_kid[sizeof long_kid - 1] = '\0';
    const struct p11kms_context dup[] = {{"a", "1"}, {"a", "2"}};
    const struct p11kms_context bad_utf8[] = {{"a", "\xff"}};
    const struct p11kms_context null_value[] = {{"a", NULL}};
    const uint8_t *p = (const uint8_t *)PAYLOAD;
#define SEAL(kid_, blob_, blen_, ctx_, nctx_, n_) \
    kms_jwe_seal(KMS_JWE_COMPACT, key, NULL, kid_, blob_, blen_, ctx_, nctx_, p, n_, &tok, &n)
    assert_int_equal(SEAL(NULL, blob, 10, NULL, 0, 1), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SEAL("", blob, 10, NULL, 0, 1), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SEAL(long_kid, blob, 10, NULL, 0, 1), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SEAL(KID, blob, 0, NULL, 0, 1), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SEAL(KID, blob, KMS_JWE_MAX_BLOB + 1, NULL, 0, 1), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SEAL(KID, blob, 10, NULL, 1, 1), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SEAL(KID, blob, 10, dup, 2, 1), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SEAL(KID, blob, 10, bad_utf8, 1, 1), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SEAL(KID, blob, 10, null_value, 1, 1), P11KMS_ERR_ARGUMENT);
    assert_int_equal(SEAL(KID, blob, 10, NULL, 0, KMS_JWE_MAX_PAYLOAD + 1), P11KMS_ERR_ARGUMENT);
    assert_null(tok);
    assert_int_equal(n, 0);
#undef SEAL
}

/* ---- refusals ------------------------------------------------------------------ */

/* With a memo: the good token opens, so the memo holds its header (unless it is NULL). */
static void prime_memo(const char *tok)
{
    uint8_t *out;
    size_t n;
    if (!memo)
        return;
    assert_int_equal(open_with(tok, strlen(tok), key, &out, &n), P11KMS_OK);
    assert_int_equal(n, strlen(PAYLOAD));
    assert_memory_equal(out, PAYLOAD, n);
    p11kms_free(out, n);
}

static void test_truncations(void **state)
{
    (void)state;
    char *flat = flattened_of(VECTOR);
    const char *toks[] = {VECTOR, flat};
    struct kms_jwe_memo m;
    assert_int_equal(kms_jwe_memo_init(&m), P11KMS_OK);
    /* Without a memo, then with one that holds the whole token's header throughout. */
    for (int with_memo = 0; with_memo < 2; with_memo++) {
        memo = with_memo ? &m : NULL;
        for (int t = 0; t < 2; t++) {
            size_t len = strlen(toks[t]);
            for (size_t i = 0; i < len; i++) {
                uint8_t *out;
                size_t n;
                prime_memo(toks[t]);
                p11kms_status st = open_with(toks[t], i, key, &out, &n);
                if (st != P11KMS_ERR_MALFORMED && st != P11KMS_ERR_DECRYPT)
                    fail_msg("truncation to %zu bytes of token %d (memo %d): status %d", i, t,
                             with_memo, st);
            }
        }
    }
    memo = NULL;
    kms_jwe_memo_destroy(&m);
    free(flat);
}

static void test_bit_flips(void **state)
{
    (void)state;
    char *flat = flattened_of(VECTOR);
    char *toks[] = {strdup(VECTOR), flat};
    assert_non_null(toks[0]);
    struct kms_jwe_memo m;
    assert_int_equal(kms_jwe_memo_init(&m), P11KMS_OK);
    /* With a memo, the unaltered token is opened before each altered one: an
       altered header must never be taken for the one remembered. */
    for (int with_memo = 0; with_memo < 2; with_memo++) {
        memo = with_memo ? &m : NULL;
        for (int t = 0; t < 2; t++) {
            size_t len = strlen(toks[t]);
            for (size_t i = 0; i < len; i++) {
                for (int b = 0; b < 8; b++) {
                    uint8_t *out;
                    size_t n;
                    prime_memo(toks[t]);
                    toks[t][i] ^= (char)(1 << b);
                    p11kms_status st = open_with(toks[t], len, key, &out, &n);
                    toks[t][i] ^= (char)(1 << b);
                    if (st != P11KMS_ERR_MALFORMED && st != P11KMS_ERR_DECRYPT)
                        fail_msg("bit %d of byte %zu of token %d (memo %d): status %d", b, i, t,
                                 with_memo, st);
                }
            }
        }
    }
    memo = NULL;
    kms_jwe_memo_destroy(&m);
    free(toks[0]);
    free(flat);
}

static void test_segments(void **state)
{
    (void)state;
    const char *dots[4];
    const char *p = VECTOR;
    for (int i = 0; i < 4; i++) {
        dots[i] = strchr(p, '.');
        p = dots[i] + 1;
    }
    char buf[2048];
    /* Segment count. */
    assert_int_equal(try_open(""), P11KMS_ERR_MALFORMED);
    assert_int_equal(try_open("...."), P11KMS_ERR_MALFORMED);
    snprintf(buf, sizeof buf, "%s.", VECTOR);
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
    snprintf(buf, sizeof buf, "%s.AAAA", VECTOR);
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
    snprintf(buf, sizeof buf, "%.*s", (int)(dots[3] - VECTOR), VECTOR);
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
    snprintf(buf, sizeof buf, "%.*s%s", (int)(dots[1] - VECTOR), VECTOR, dots[2]); /* 4 */
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
    /* Whitespace around a compact token is not part of it. */
    snprintf(buf, sizeof buf, " %s", VECTOR);
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
    snprintf(buf, sizeof buf, "%s\n", VECTOR);
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
    /* The same token, one segment at a time: padding, stray characters, a NUL. */
    static const char *stray[] = {"=", "==", "+", "/", "*", " ", "%3D"};
    const char *seg_start[5] = {VECTOR, dots[0] + 1, dots[1] + 1, dots[2] + 1, dots[3] + 1};
    for (int s = 0; s < 5; s++) {
        for (size_t k = 0; k < sizeof stray / sizeof stray[0]; k++) {
            const char *end = s < 4 ? dots[s] : VECTOR + strlen(VECTOR);
            snprintf(buf, sizeof buf, "%.*s%s%s", (int)(end - VECTOR), VECTOR, stray[k], end);
            if (try_open(buf) != P11KMS_ERR_MALFORMED)
                fail_msg("segment %d with '%s' appended was not refused", s, stray[k]);
        }
        (void)seg_start;
    }
    char nul[2048];
    size_t len = strlen(VECTOR);
    memcpy(nul, VECTOR, len);
    nul[20] = '\0';
    uint8_t *out;
    size_t n;
    assert_int_equal(open_with(nul, len, key, &out, &n), P11KMS_ERR_MALFORMED);
    /* A non-empty encrypted key: "dir" has none. */
    char *tok = make_token(HDR(GOOD_REST), 12, 16, "AAAA");
    assert_int_equal(try_open(tok), P11KMS_ERR_MALFORMED);
    free(tok);
    /* IV and tag sizes. */
    tok = make_token(HDR(GOOD_REST), 12, 16, "");
    assert_int_equal(try_open(tok), P11KMS_OK);
    free(tok);
    static const size_t ivs[] = {8, 11, 13, 16};
    for (size_t i = 0; i < 4; i++) {
        tok = make_token(HDR(GOOD_REST), ivs[i], 16, "");
        assert_int_equal(try_open(tok), P11KMS_ERR_MALFORMED);
        free(tok);
    }
    static const size_t tags[] = {12, 15, 17, 20};
    for (size_t i = 0; i < 4; i++) {
        tok = make_token(HDR(GOOD_REST), 12, tags[i], "");
        assert_int_equal(try_open(tok), P11KMS_ERR_MALFORMED);
        free(tok);
    }
    /* Unused bits in the last character of the tag: one byte string, one encoding. */
    tok = make_token(HDR(GOOD_REST), 12, 16, "");
    char *last = tok + strlen(tok) - 1;
    const char *alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    int v = (int)(strchr(alphabet, *last) - alphabet);
    *last = alphabet[v ^ 1];
    assert_int_equal(try_open(tok), P11KMS_ERR_MALFORMED);
    free(tok);
    /* An empty protected header. */
    snprintf(buf, sizeof buf, "%s", dots[0]);
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
}

static void test_headers(void **state)
{
    (void)state;
    /* Ours, with members a JOSE library may add: accepted. */
    assert_int_equal(header_status(HDR(GOOD_REST)), P11KMS_OK);
    assert_int_equal(header_status(HDR(GOOD_REST ",\"typ\":\"JOSE\",\"cty\":\"json\"")), P11KMS_OK);
    assert_int_equal(header_status(" " HDR(GOOD_REST) "\n"), P11KMS_OK);
    assert_int_equal(header_status("{\"alg\":\"dir\",\"enc\":\"A256GCM\",\"kid\":\"k\","
                                   "\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{}}"),
                     P11KMS_OK);

    static const char *bad[] = {
        "",
        "not json",
        "[]",
        "\"dir\"",
        "null",
        "{",
        HDR(GOOD_REST) " x",
        HDR(GOOD_REST) "{}",
        /* alg and enc */
        "{\"enc\":\"A256GCM\"" GOOD_REST "}",
        "{\"alg\":\"A256KW\",\"enc\":\"A256GCM\"" GOOD_REST "}",
        "{\"alg\":\"none\",\"enc\":\"A256GCM\"" GOOD_REST "}",
        "{\"alg\":\"DIR\",\"enc\":\"A256GCM\"" GOOD_REST "}",
        "{\"alg\":1,\"enc\":\"A256GCM\"" GOOD_REST "}",
        "{\"alg\":\"dir\"" GOOD_REST "}",
        "{\"alg\":\"dir\",\"enc\":\"A128GCM\"" GOOD_REST "}",
        "{\"alg\":\"dir\",\"enc\":\"A256CBC-HS512\"" GOOD_REST "}",
        "{\"alg\":\"dir\",\"enc\":[\"A256GCM\"]" GOOD_REST "}",
        /* duplicate members, at the top and in the context */
        "{\"alg\":\"dir\",\"alg\":\"dir\",\"enc\":\"A256GCM\"" GOOD_REST "}",
        "{\"alg\":\"none\",\"alg\":\"dir\",\"enc\":\"A256GCM\"" GOOD_REST "}",
        HDR(GOOD_REST ",\"kid\":\"k2\""),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{\"a\":\"b\",\"a\":\"c\"}"),
        /* extensions we do not understand */
        HDR(GOOD_REST ",\"zip\":\"DEF\""),
        HDR(GOOD_REST ",\"crit\":[\"exp\"],\"exp\":1"),
        /* kid */
        HDR(",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{}"),
        HDR(",\"kid\":\"\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{}"),
        HDR(",\"kid\":7,\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{}"),
        /* p11kms_blob */
        HDR(",\"kid\":\"k\",\"p11kms_ctx\":{}"),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"\",\"p11kms_ctx\":{}"),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQ==\",\"p11kms_ctx\":{}"),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQ+/\",\"p11kms_ctx\":{}"),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AR\",\"p11kms_ctx\":{}"),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":[1],\"p11kms_ctx\":{}"),
        /* p11kms_ctx */
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQID\""),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":[]"),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":\"a=b\""),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{\"a\":1}"),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{\"a\":{}}"),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{\"a\":\"b\\u0000c\"}"),
        HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{\"a\\u0000\":\"b\"}"),
        /* not UTF-8 */
        HDR(",\"kid\":\"k\xff\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{}"),
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        p11kms_status st = header_status(bad[i]);
        if (st != P11KMS_ERR_MALFORMED)
            fail_msg("header %zu (%s): status %d, not MALFORMED", i, bad[i], st);
    }
    /* The same through a memo that holds a good header each time. */
    struct kms_jwe_memo m;
    assert_int_equal(kms_jwe_memo_init(&m), P11KMS_OK);
    memo = &m;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(header_status(HDR(GOOD_REST)), P11KMS_OK);
        p11kms_status st = header_status(bad[i]);
        if (st != P11KMS_ERR_MALFORMED)
            fail_msg("header %zu (%s) after a good one: status %d, not MALFORMED", i, bad[i], st);
    }
    memo = NULL;
    kms_jwe_memo_destroy(&m);

    /* A kid of 255 bytes is the longest. */
    char h[512];
    char kid[257];
    memset(kid, 'k', 256);
    kid[256] = '\0';
    snprintf(h, sizeof h, HDR(",\"kid\":\"%s\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{}"), kid);
    assert_int_equal(header_status(h), P11KMS_ERR_MALFORMED);
    kid[255] = '\0';
    snprintf(h, sizeof h, HDR(",\"kid\":\"%s\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{}"), kid);
    assert_int_equal(header_status(h), P11KMS_OK);
}

static void test_flattened_refusals(void **state)
{
    (void)state;
    char *flat = flattened_of(VECTOR);
    char buf[4096];
    size_t len = strlen(flat);
    assert_int_equal(try_open(flat), P11KMS_OK);
    /* With an empty encrypted_key, as some libraries write it: fine. */
    snprintf(buf, sizeof buf, "%.*s,\"encrypted_key\":\"\"}", (int)(len - 1), flat);
    assert_int_equal(try_open(buf), P11KMS_OK);
    snprintf(buf, sizeof buf, "\n %s \n", flat);
    assert_int_equal(try_open(buf), P11KMS_OK);
    static const char *extra[] = {
        ",\"encrypted_key\":\"AAAA\"",
        ",\"header\":{\"kid\":\"x\"}",
        ",\"unprotected\":{}",
        ",\"aad\":\"AAAA\"",
        ",\"recipients\":[]",
        ",\"iv\":\"AAAAAAAAAAAAAAAA\"",
        ",\"other\":1",
    };
    for (size_t i = 0; i < sizeof extra / sizeof extra[0]; i++) {
        snprintf(buf, sizeof buf, "%.*s%s}", (int)(len - 1), flat, extra[i]);
        if (try_open(buf) != P11KMS_ERR_MALFORMED)
            fail_msg("flattened JWE with %s was not refused", extra[i]);
    }
    assert_int_equal(try_open("{}"), P11KMS_ERR_MALFORMED);
    assert_int_equal(try_open("{\"protected\":1}"), P11KMS_ERR_MALFORMED);
    snprintf(buf, sizeof buf, "[%s]", flat);
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
    snprintf(buf, sizeof buf, "%s{}", flat);
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
    /* Missing a member. */
    char *tag = strstr(flat, ",\"tag\"");
    assert_non_null(tag);
    snprintf(buf, sizeof buf, "%.*s}", (int)(tag - flat), flat);
    assert_int_equal(try_open(buf), P11KMS_ERR_MALFORMED);
    free(flat);
}

/* ---- the header memo and decryption in place --------------------------------------- */

static void test_memo(void **state)
{
    (void)state;
    struct kms_jwe_memo m;
    struct kms_jwe a, b, c;
    uint8_t *out;
    size_t n;
    char *other = make_token(HDR(GOOD_REST), 12, 16, "");
    char *flat = flattened_of(VECTOR);
    assert_int_equal(kms_jwe_memo_init(&m), P11KMS_OK);

    /* The second JWE with the same header shares the first one's parse. */
    assert_int_equal(kms_jwe_parse_memo(VECTOR, strlen(VECTOR), &m, &a), P11KMS_OK);
    assert_int_equal(kms_jwe_parse_memo(VECTOR, strlen(VECTOR), &m, &b), P11KMS_OK);
    assert_ptr_equal(a.hdr, b.hdr);
    check_vector_parts(&a);
    check_vector_parts(&b);
    assert_non_null(a.canon);
    /* The flattened form has the same header text: the same parse again. */
    assert_int_equal(kms_jwe_parse_memo(flat, strlen(flat), &m, &c), P11KMS_OK);
    assert_ptr_equal(c.hdr, a.hdr);
    check_vector_parts(&c);
    kms_jwe_clear(&c);

    /* Another header takes the memo's place; the JWEs that hold the old one keep it. */
    assert_int_equal(kms_jwe_parse_memo(other, strlen(other), &m, &c), P11KMS_OK);
    assert_ptr_not_equal(c.hdr, a.hdr);
    assert_string_equal(c.kid, "k");
    assert_int_equal(c.nctx, 1);
    assert_int_equal(kms_jwe_decrypt_in_place(&c, key, 32, &out, &n), P11KMS_OK);
    assert_memory_equal(out, PAYLOAD, n);
    p11kms_free(out, n);
    kms_jwe_clear(&c);
    kms_jwe_clear(&b);
    assert_int_equal(kms_jwe_parse_memo(VECTOR, strlen(VECTOR), &m, &b), P11KMS_OK);
    assert_ptr_not_equal(b.hdr, a.hdr); /* parsed afresh */
    check_vector_parts(&b);
    assert_int_equal(b.canon_len, a.canon_len);
    assert_memory_equal(b.canon, a.canon, a.canon_len);
    kms_jwe_clear(&b);
    check_vector_parts(&a);
    assert_int_equal(kms_jwe_decrypt(&a, key, 32, &out, &n), P11KMS_OK);
    assert_memory_equal(out, PAYLOAD, n);
    p11kms_free(out, n);
    kms_jwe_clear(&a);

    /* A failed parse leaves the memo as it was. */
    assert_int_equal(kms_jwe_parse_memo(VECTOR, strlen(VECTOR), &m, &a), P11KMS_OK);
    char *bad = strdup(VECTOR);
    assert_non_null(bad);
    bad[strlen(bad) - 1] = '*';
    assert_int_equal(kms_jwe_parse_memo(bad, strlen(bad), &m, &b), P11KMS_ERR_MALFORMED);
    assert_null(b.hdr);
    assert_int_equal(kms_jwe_parse_memo(VECTOR, strlen(VECTOR), &m, &b), P11KMS_OK);
    assert_ptr_equal(a.hdr, b.hdr);
    kms_jwe_clear(&a);
    kms_jwe_clear(&b);
    free(bad);

    /* A header whose context has no canonical form parses; the opener refuses it. */
    char long_value[9000];
    memset(long_value, 'v', sizeof long_value - 1);
    long_value[sizeof long_value - 1] = '\0';
    char *h = malloc(sizeof long_value + 200);
    assert_non_null(h);
    snprintf(h, sizeof long_value + 200,
             HDR(",\"kid\":\"k\",\"p11kms_blob\":\"AQID\",\"p11kms_ctx\":{\"a\":\"%s\"}"),
             long_value);
    char *tok = make_token(h, 12, 16, "");
    assert_int_equal(kms_jwe_parse_memo(tok, strlen(tok), &m, &a), P11KMS_OK);
    assert_null(a.canon);
    kms_jwe_clear(&a);
    free(tok);
    free(h);

    kms_jwe_memo_destroy(&m);
    free(other);
    free(flat);
}

static void test_decrypt_in_place(void **state)
{
    (void)state;
    struct kms_jwe j;
    uint8_t *out;
    size_t n;
    uint8_t other[32];
    memcpy(other, key, 32);
    other[0] ^= 0x80;
    /* Another key: the tag fails and the ciphertext, decrypted or not, is gone. */
    assert_int_equal(kms_jwe_parse(VECTOR, strlen(VECTOR), &j), P11KMS_OK);
    assert_int_equal(kms_jwe_decrypt_in_place(&j, key, 31, &out, &n), P11KMS_ERR_ARGUMENT);
    assert_non_null(j.ciphertext); /* a refused argument takes nothing */
    assert_int_equal(kms_jwe_decrypt_in_place(&j, other, 32, &out, &n), P11KMS_ERR_DECRYPT);
    assert_null(out);
    assert_int_equal(n, 0);
    assert_null(j.ciphertext);
    assert_int_equal(j.ciphertext_len, 0);
    assert_int_equal(kms_jwe_decrypt_in_place(&j, key, 32, &out, &n), P11KMS_ERR_ARGUMENT);
    assert_int_equal(kms_jwe_decrypt(&j, key, 32, &out, &n), P11KMS_ERR_DECRYPT);
    kms_jwe_clear(&j);
    /* The right key: the plaintext in the ciphertext's buffer, which is the caller's now. */
    assert_int_equal(kms_jwe_parse(VECTOR, strlen(VECTOR), &j), P11KMS_OK);
    uint8_t *buf = j.ciphertext;
    assert_int_equal(kms_jwe_decrypt_in_place(&j, key, 32, &out, &n), P11KMS_OK);
    assert_ptr_equal(out, buf);
    assert_int_equal(n, strlen(PAYLOAD));
    assert_memory_equal(out, PAYLOAD, n);
    assert_null(j.ciphertext);
    p11kms_free(out, n);
    kms_jwe_clear(&j);
    /* An empty payload. */
    char *tok;
    size_t tl;
    assert_int_equal(
        kms_jwe_seal(KMS_JWE_COMPACT, key, NULL, KID, blob, 10, NULL, 0, NULL, 0, &tok, &tl),
        P11KMS_OK);
    assert_int_equal(kms_jwe_parse(tok, tl, &j), P11KMS_OK);
    assert_int_equal(kms_jwe_decrypt_in_place(&j, key, 32, &out, &n), P11KMS_OK);
    assert_non_null(out);
    assert_int_equal(n, 0);
    p11kms_free(out, 1);
    kms_jwe_clear(&j);
    p11kms_free(tok, tl);
}

/* Threads open two tokens turn about through one memo, as threads share a client. */
struct memo_thread {
    struct kms_jwe_memo *m;
    const char *toks[2];
    int failures;
};

static void *memo_worker(void *arg)
{
    struct memo_thread *t = arg;
    for (int i = 0; i < 3000; i++) {
        const char *tok = t->toks[i % 2];
        struct kms_jwe j;
        uint8_t *out = NULL;
        size_t n = 0;
        if (kms_jwe_parse_memo(tok, strlen(tok), t->m, &j) != P11KMS_OK) {
            t->failures++;
            continue;
        }
        if (strcmp(j.kid, i % 2 ? "k" : KID) != 0 ||
            kms_jwe_decrypt_in_place(&j, key, 32, &out, &n) != P11KMS_OK || n != strlen(PAYLOAD) ||
            memcmp(out, PAYLOAD, n) != 0)
            t->failures++;
        p11kms_free(out, n ? n : 1);
        kms_jwe_clear(&j);
    }
    return NULL;
}

static void test_memo_threads(void **state)
{
    (void)state;
    struct kms_jwe_memo m;
    char *other = make_token(HDR(GOOD_REST), 12, 16, "");
    assert_int_equal(kms_jwe_memo_init(&m), P11KMS_OK);
    pthread_t th[4];
    struct memo_thread t[4];
    for (int i = 0; i < 4; i++) {
        t[i] = (struct memo_thread){&m, {VECTOR, other}, 0};
        assert_int_equal(pthread_create(&th[i], NULL, memo_worker, &t[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_join(th[i], NULL), 0);
        assert_int_equal(t[i].failures, 0);
    }
    kms_jwe_memo_destroy(&m);
    free(other);
}

static void test_sizes(void **state)
{
    (void)state;
    /* Past the largest token we accept: refused before anything is decoded. */
    size_t len = (KMS_JWE_MAX_PAYLOAD / 3 + 1) * 4 + 100000 + 8192;
    char *big = malloc(len + 1);
    assert_non_null(big);
    memset(big, 'A', len);
    big[len] = '\0';
    struct kms_jwe j;
    assert_int_equal(kms_jwe_parse(big, len, &j), P11KMS_ERR_MALFORMED);
    /* A ciphertext segment longer than 64 MiB encodes to, in a token under the limit. */
    const char *dot = strchr(VECTOR, '.');
    size_t hl = (size_t)(dot - VECTOR);
    size_t ctl = (KMS_JWE_MAX_PAYLOAD / 3) * 4 + 4;
    size_t n = 0;
    memcpy(big, VECTOR, hl + 1);
    n = hl + 1;
    memcpy(big + n, ".oKGio6Slpqeoqaqr.", 18);
    n += 18;
    memset(big + n, 'A', ctl);
    n += ctl;
    memcpy(big + n, ".LiusE9tFTraxqI8YE1IpfQ", 23);
    n += 23;
    assert_true(n <= len);
    assert_int_equal(kms_jwe_parse(big, n, &j), P11KMS_ERR_MALFORMED);
    free(big);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vector_seal),
        cmocka_unit_test(test_vector_open),
        cmocka_unit_test(test_round_trips),
        cmocka_unit_test(test_seal_arguments),
        cmocka_unit_test(test_truncations),
        cmocka_unit_test(test_bit_flips),
        cmocka_unit_test(test_segments),
        cmocka_unit_test(test_headers),
        cmocka_unit_test(test_flattened_refusals),
        cmocka_unit_test(test_memo),
        cmocka_unit_test(test_decrypt_in_place),
        cmocka_unit_test(test_memo_threads),
        cmocka_unit_test(test_sizes),
    };
    return cmocka_run_group_tests(tests, setup, NULL);
}
