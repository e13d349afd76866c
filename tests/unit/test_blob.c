/*
 * Unit tests for src/common/blob.h: the ciphertext blob and the canonical
 * encryption context (DESIGN §4).
 *
 * The seal tests build a blob with OpenSSL's EVP AES-256-GCM exactly as the
 * key store does with the token (random 12-byte IV, AAD = header || canonical
 * context, blob = header || IV || ciphertext || tag), then check that no
 * truncation, no single-bit flip and no other context gets past decode + open.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/blob.h"

/* ---- helpers ---------------------------------------------------------------- */

static struct kms_context_pair pair(const char *k, const char *v)
{
    struct kms_context_pair p = {k, strlen(k), v, strlen(v)};
    return p;
}

/* A sealed 32-byte plaintext and everything needed to open it. */
struct sealed {
    uint8_t key[32];
    uint8_t plaintext[32];
    struct kms_buf context; /* canonical context the blob was sealed under */
    struct kms_buf blob;
};

/* clang-format off */
static const uint8_t test_key_id[KMS_UUID_LEN] = {
    0x6f, 0x1c, 0x2a, 0x9e, 0x53, 0x04, 0x4b, 0x1d,
    0x8a, 0x77, 0x30, 0xc2, 0xe5, 0x19, 0x4d, 0xf0,
};
/* clang-format on */
#define TEST_KEY_VERSION 1u

static void canonical_of(const char *k1, const char *v1, const char *k2, const char *v2,
                         struct kms_buf *out)
{
    struct kms_context_pair pairs[2] = {pair(k1, v1), pair(k2, v2)};
    assert_int_equal(kms_context_canonical(pairs, 2, out), KMS_OK);
}

/* Seals s->plaintext under s->key and s->context the way the key store does. */
static void seal(struct sealed *s)
{
    uint8_t header[KMS_BLOB_HEADER_LEN], iv[KMS_GCM_IV_LEN], tag[KMS_GCM_TAG_LEN];
    uint8_t ct[sizeof s->plaintext];
    struct kms_buf aad = KMS_BUF_INIT;
    int len = 0;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();

    assert_non_null(c);
    kms_blob_header(test_key_id, TEST_KEY_VERSION, header);
    assert_int_equal(RAND_bytes(iv, sizeof iv), 1);
    assert_int_equal(kms_blob_aad(header, &s->context, &aad), KMS_OK);

    assert_int_equal(EVP_EncryptInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL), 1);
    assert_int_equal(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, (int)sizeof iv, NULL), 1);
    assert_int_equal(EVP_EncryptInit_ex(c, NULL, NULL, s->key, iv), 1);
    assert_int_equal(EVP_EncryptUpdate(c, NULL, &len, aad.data, (int)aad.len), 1);
    assert_int_equal(EVP_EncryptUpdate(c, ct, &len, s->plaintext, (int)sizeof s->plaintext), 1);
    assert_int_equal(len, (int)sizeof ct);
    assert_int_equal(EVP_EncryptFinal_ex(c, ct + len, &len), 1);
    assert_int_equal(len, 0);
    assert_int_equal(EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, (int)sizeof tag, tag), 1);
    EVP_CIPHER_CTX_free(c);
    kms_buf_free(&aad);

    assert_int_equal(kms_buf_append(&s->blob, header, sizeof header), KMS_OK);
    assert_int_equal(kms_buf_append(&s->blob, iv, sizeof iv), KMS_OK);
    assert_int_equal(kms_buf_append(&s->blob, ct, sizeof ct), KMS_OK);
    assert_int_equal(kms_buf_append(&s->blob, tag, sizeof tag), KMS_OK);
    assert_int_equal(s->blob.len, KMS_BLOB_OVERHEAD + sizeof s->plaintext);
}

static int make_sealed(void **state)
{
    struct sealed *s = calloc(1, sizeof *s);
    if (!s)
        return -1;
    if (RAND_bytes(s->key, sizeof s->key) != 1 ||
        RAND_bytes(s->plaintext, sizeof s->plaintext) != 1)
        return -1;
    canonical_of("tenant", "acme", "purpose", "backup", &s->context);
    seal(s);
    *state = s;
    return 0;
}

static int free_sealed(void **state)
{
    struct sealed *s = *state;
    kms_buf_free(&s->context);
    kms_buf_free(&s->blob);
    free(s);
    return 0;
}

/*
 * Opens a decoded blob: AAD rebuilt from the decoded header and the given
 * context, tag from the blob. Returns 1 when GCM accepts it (pt/pt_len set).
 */
static int gcm_open(const struct kms_blob *b, const struct kms_buf *context, const uint8_t *key,
                    uint8_t *pt, size_t *pt_len)
{
    struct kms_buf aad = KMS_BUF_INIT;
    uint8_t tag[KMS_GCM_TAG_LEN];
    int len = 0, fin = 0, ok;
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();

    assert_non_null(c);
    assert_int_equal(kms_blob_aad(b->header, context, &aad), KMS_OK);
    memcpy(tag, b->tag, sizeof tag);
    ok = EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), NULL, NULL, NULL) == 1 &&
         EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, KMS_GCM_IV_LEN, NULL) == 1 &&
         EVP_DecryptInit_ex(c, NULL, NULL, key, b->iv) == 1 &&
         EVP_DecryptUpdate(c, NULL, &len, aad.data, (int)aad.len) == 1 &&
         EVP_DecryptUpdate(c, pt, &len, b->ciphertext, (int)b->ciphertext_len) == 1 &&
         EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, (int)sizeof tag, tag) == 1 &&
         EVP_DecryptFinal_ex(c, pt + len, &fin) == 1;
    EVP_CIPHER_CTX_free(c);
    kms_buf_free(&aad);
    *pt_len = ok ? (size_t)len + (size_t)fin : 0;
    return ok;
}

/* Decode + open of bytes that decode cleanly; returns whether GCM accepted them. */
static int decode_and_open(const uint8_t *p, size_t n, const struct kms_buf *context,
                           const uint8_t *key)
{
    struct kms_blob b;
    uint8_t pt[64 + 2 * KMS_BLOB_OVERHEAD];
    size_t pt_len;

    assert_int_equal(kms_blob_decode(p, n, &b), KMS_OK);
    assert_true(b.ciphertext_len <= sizeof pt);
    return gcm_open(&b, context, key, pt, &pt_len);
}

/* ---- header and decode -------------------------------------------------------- */

static void test_header_bytes(void **state)
{
    static const uint8_t id[KMS_UUID_LEN] = {0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,
                                             0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f};
    /* clang-format off */
    static const uint8_t want[KMS_BLOB_HEADER_LEN] = {
        0x01,                                            /* format */
        0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07,  /* key id */
        0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
        0xde, 0xad, 0xbe, 0xef,                          /* version, big-endian */
    };
    /* clang-format on */
    uint8_t got[KMS_BLOB_HEADER_LEN];
    (void)state;

    assert_int_equal(KMS_BLOB_HEADER_LEN, 21);
    kms_blob_header(id, 0xdeadbeefu, got);
    assert_memory_equal(got, want, sizeof want);
}

static void test_header_decode_round_trip(void **state)
{
    static const uint8_t id[KMS_UUID_LEN] = {0xf0, 0xe1, 0xd2, 0xc3, 0xb4, 0xa5, 0x96, 0x87,
                                             0x78, 0x69, 0x5a, 0x4b, 0x3c, 0x2d, 0x1e, 0x0f};
    uint8_t blob[KMS_BLOB_HEADER_LEN + KMS_GCM_IV_LEN + 5 + KMS_GCM_TAG_LEN];
    struct kms_blob b;
    (void)state;

    for (size_t i = 0; i < sizeof blob; i++)
        blob[i] = (uint8_t)(0x80 + i);
    kms_blob_header(id, 0x01020304u, blob);

    assert_int_equal(kms_blob_decode(blob, sizeof blob, &b), KMS_OK);
    assert_memory_equal(b.key_id, id, sizeof id);
    assert_int_equal(b.key_version, 0x01020304u);
    assert_ptr_equal(b.header, blob);
    assert_ptr_equal(b.iv, blob + 21);
    assert_ptr_equal(b.ciphertext, blob + 33);
    assert_int_equal(b.ciphertext_len, 5);
    assert_ptr_equal(b.tag, blob + 38);
    assert_int_equal(b.tag + KMS_GCM_TAG_LEN - blob, sizeof blob);
}

static void test_decode_shortest(void **state)
{
    uint8_t blob[KMS_BLOB_MIN_LEN];
    struct kms_blob b;
    (void)state;

    memset(blob, 0x5a, sizeof blob);
    kms_blob_header(test_key_id, 7, blob);
    assert_int_equal(KMS_BLOB_MIN_LEN, 50);
    assert_int_equal(kms_blob_decode(blob, sizeof blob, &b), KMS_OK);
    assert_int_equal(b.ciphertext_len, 1);
    assert_int_equal(b.key_version, 7);
    assert_int_equal(kms_blob_decode(blob, sizeof blob - 1, &b), KMS_ERR_INVALID_CIPHERTEXT);
    assert_int_equal(kms_blob_decode(blob, 0, &b), KMS_ERR_INVALID_CIPHERTEXT);
}

static void test_decode_bad_format(void **state)
{
    uint8_t blob[64];
    struct kms_blob b;
    (void)state;

    memset(blob, 0x11, sizeof blob);
    kms_blob_header(test_key_id, 3, blob);
    assert_int_equal(kms_blob_decode(blob, sizeof blob, &b), KMS_OK);
    blob[0] = 0;
    assert_int_equal(kms_blob_decode(blob, sizeof blob, &b), KMS_ERR_INVALID_CIPHERTEXT);
    blob[0] = 2;
    assert_int_equal(kms_blob_decode(blob, sizeof blob, &b), KMS_ERR_INVALID_CIPHERTEXT);
    blob[0] = 0xff;
    assert_int_equal(kms_blob_decode(blob, sizeof blob, &b), KMS_ERR_INVALID_CIPHERTEXT);
}

static void test_decode_version_zero(void **state)
{
    uint8_t blob[64];
    struct kms_blob b;
    (void)state;

    memset(blob, 0x22, sizeof blob);
    kms_blob_header(test_key_id, 0, blob);
    assert_int_equal(kms_blob_decode(blob, sizeof blob, &b), KMS_ERR_INVALID_CIPHERTEXT);
    kms_blob_header(test_key_id, 1, blob);
    assert_int_equal(kms_blob_decode(blob, sizeof blob, &b), KMS_OK);
    assert_int_equal(b.key_version, 1);
}

static void test_aad_layout(void **state)
{
    uint8_t header[KMS_BLOB_HEADER_LEN];
    struct kms_buf ctx = KMS_BUF_INIT, aad = KMS_BUF_INIT;
    (void)state;

    kms_blob_header(test_key_id, 9, header);
    canonical_of("k", "v", "a", "b", &ctx);
    assert_int_equal(kms_blob_aad(header, &ctx, &aad), KMS_OK);
    assert_int_equal(aad.len, sizeof header + ctx.len);
    assert_memory_equal(aad.data, header, sizeof header);
    assert_memory_equal(aad.data + sizeof header, ctx.data, ctx.len);
    kms_buf_free(&ctx);
    kms_buf_free(&aad);
}

/* ---- a real seal ----------------------------------------------------------------- */

static void test_seal_opens(void **state)
{
    struct sealed *s = *state;
    struct kms_blob b;
    uint8_t pt[64];
    size_t pt_len = 0;

    assert_int_equal(s->blob.len, 21 + 12 + 32 + 16);
    assert_int_equal(kms_blob_decode(s->blob.data, s->blob.len, &b), KMS_OK);
    assert_memory_equal(b.key_id, test_key_id, KMS_UUID_LEN);
    assert_int_equal(b.key_version, TEST_KEY_VERSION);
    assert_int_equal(b.ciphertext_len, 32);
    assert_int_equal(gcm_open(&b, &s->context, s->key, pt, &pt_len), 1);
    assert_int_equal(pt_len, sizeof s->plaintext);
    assert_memory_equal(pt, s->plaintext, sizeof s->plaintext);
}

static void test_seal_every_truncation_rejected(void **state)
{
    struct sealed *s = *state;
    struct kms_blob b;

    for (size_t n = 0; n < s->blob.len; n++) {
        /* A fresh heap copy of exactly n bytes, so ASan sees any read past the end. */
        uint8_t *copy = malloc(n ? n : 1);
        assert_non_null(copy);
        memcpy(copy, s->blob.data, n);
        if (n < KMS_BLOB_MIN_LEN)
            assert_int_equal(kms_blob_decode(copy, n, &b), KMS_ERR_INVALID_CIPHERTEXT);
        else
            assert_int_equal(decode_and_open(copy, n, &s->context, s->key), 0);
        free(copy);
    }
}

static void test_seal_every_bit_flip_rejected(void **state)
{
    struct sealed *s = *state;
    uint8_t *copy = malloc(s->blob.len);
    struct kms_blob b;

    assert_non_null(copy);
    for (size_t i = 0; i < s->blob.len; i++) {
        for (unsigned bit = 0; bit < 8; bit++) {
            memcpy(copy, s->blob.data, s->blob.len);
            copy[i] ^= (uint8_t)(1u << bit);
            if (i == 0) {
                /* format byte is no longer 1 */
                assert_int_equal(kms_blob_decode(copy, s->blob.len, &b),
                                 KMS_ERR_INVALID_CIPHERTEXT);
            } else if (i == KMS_BLOB_HEADER_LEN - 1 && bit == 0) {
                /* version 1 becomes version 0 */
                assert_int_equal(kms_blob_decode(copy, s->blob.len, &b),
                                 KMS_ERR_INVALID_CIPHERTEXT);
            } else {
                assert_int_equal(decode_and_open(copy, s->blob.len, &s->context, s->key), 0);
            }
        }
    }
    free(copy);
}

static void test_seal_other_context_rejected(void **state)
{
    struct sealed *s = *state;
    struct kms_buf other = KMS_BUF_INIT, empty = KMS_BUF_INIT;

    /* one byte of one value changed: "acme" -> "acmf" */
    canonical_of("tenant", "acmf", "purpose", "backup", &other);
    assert_int_equal(other.len, s->context.len);
    assert_int_equal(decode_and_open(s->blob.data, s->blob.len, &other, s->key), 0);

    /* the empty context instead of the one given */
    assert_int_equal(kms_context_canonical(NULL, 0, &empty), KMS_OK);
    assert_int_equal(decode_and_open(s->blob.data, s->blob.len, &empty, s->key), 0);

    /* and the right one still opens, so the two failures above are the context's doing */
    assert_int_equal(decode_and_open(s->blob.data, s->blob.len, &s->context, s->key), 1);
    kms_buf_free(&other);
    kms_buf_free(&empty);
}

static void test_seal_other_key_rejected(void **state)
{
    struct sealed *s = *state;
    uint8_t key[32];

    memcpy(key, s->key, sizeof key);
    key[31] ^= 0x80;
    assert_int_equal(decode_and_open(s->blob.data, s->blob.len, &s->context, key), 0);
}

/* ---- canonical encryption context --------------------------------------------- */

static void test_context_exact_bytes(void **state)
{
    /* {"purpose":"test","app":"kms"}: "app" sorts before "purpose". */
    /* clang-format off */
    static const uint8_t want[] = {
        0x00, 0x00, 0x00, 0x02,                                /* count */
        0x00, 0x00, 0x00, 0x03, 'a', 'p', 'p',                 /* key */
        0x00, 0x00, 0x00, 0x03, 'k', 'm', 's',                 /* value */
        0x00, 0x00, 0x00, 0x07, 'p', 'u', 'r', 'p', 'o', 's', 'e',
        0x00, 0x00, 0x00, 0x04, 't', 'e', 's', 't',
    };
    /* clang-format on */
    struct kms_context_pair pairs[2] = {pair("purpose", "test"), pair("app", "kms")};
    struct kms_buf out = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_context_canonical(pairs, 2, &out), KMS_OK);
    assert_int_equal(out.len, sizeof want);
    assert_memory_equal(out.data, want, sizeof want);
    kms_buf_free(&out);
}

static void test_context_order_independent(void **state)
{
    struct kms_context_pair a[3] = {pair("x", "1"), pair("b", "2"), pair("m", "3")};
    struct kms_context_pair b[3] = {pair("m", "3"), pair("x", "1"), pair("b", "2")};
    struct kms_context_pair c[3] = {pair("b", "2"), pair("m", "3"), pair("x", "1")};
    struct kms_buf oa = KMS_BUF_INIT, ob = KMS_BUF_INIT, oc = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_context_canonical(a, 3, &oa), KMS_OK);
    assert_int_equal(kms_context_canonical(b, 3, &ob), KMS_OK);
    assert_int_equal(kms_context_canonical(c, 3, &oc), KMS_OK);
    assert_int_equal(oa.len, 4 + 3 * 10);
    assert_int_equal(ob.len, oa.len);
    assert_int_equal(oc.len, oa.len);
    assert_memory_equal(oa.data, ob.data, oa.len);
    assert_memory_equal(oa.data, oc.data, oa.len);
    kms_buf_free(&oa);
    kms_buf_free(&ob);
    kms_buf_free(&oc);
}

static void test_context_boundaries_distinct(void **state)
{
    static const uint8_t want_a_bc[] = {0, 0, 0, 1, 0, 0, 0, 1, 'a', 0, 0, 0, 2, 'b', 'c'};
    static const uint8_t want_ab_c[] = {0, 0, 0, 1, 0, 0, 0, 2, 'a', 'b', 0, 0, 0, 1, 'c'};
    struct kms_context_pair p1[1] = {pair("a", "bc")};
    struct kms_context_pair p2[1] = {pair("ab", "c")};
    struct kms_buf o1 = KMS_BUF_INIT, o2 = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_context_canonical(p1, 1, &o1), KMS_OK);
    assert_int_equal(kms_context_canonical(p2, 1, &o2), KMS_OK);
    assert_int_equal(o1.len, sizeof want_a_bc);
    assert_int_equal(o2.len, sizeof want_ab_c);
    assert_memory_equal(o1.data, want_a_bc, sizeof want_a_bc);
    assert_memory_equal(o2.data, want_ab_c, sizeof want_ab_c);
    assert_memory_not_equal(o1.data, o2.data, o1.len);
    kms_buf_free(&o1);
    kms_buf_free(&o2);
}

static void test_context_empty(void **state)
{
    static const uint8_t want[] = {0x00, 0x00, 0x00, 0x00};
    struct kms_buf out = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_context_canonical(NULL, 0, &out), KMS_OK);
    assert_int_equal(out.len, 4);
    assert_memory_equal(out.data, want, sizeof want);
    kms_buf_free(&out);
}

static void test_context_duplicate_key(void **state)
{
    struct kms_context_pair same[2] = {pair("k", "1"), pair("k", "2")};
    struct kms_context_pair apart[3] = {pair("dup", "a"), pair("mid", "b"), pair("dup", "a")};
    struct kms_buf out = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_context_canonical(same, 2, &out), KMS_ERR_VALIDATION);
    kms_buf_free(&out);
    assert_int_equal(kms_context_canonical(apart, 3, &out), KMS_ERR_VALIDATION);
    kms_buf_free(&out);
}

static void test_context_prefix_sorts_first(void **state)
{
    /* clang-format off */
    static const uint8_t want[] = {
        0, 0, 0, 3,
        0, 0, 0, 1, 'a',           0, 0, 0, 1, '1',
        0, 0, 0, 2, 'a', 'b',      0, 0, 0, 1, '2',
        0, 0, 0, 3, 'a', 'b', 'c', 0, 0, 0, 1, '3',
    };
    /* clang-format on */
    struct kms_context_pair pairs[3] = {pair("abc", "3"), pair("ab", "2"), pair("a", "1")};
    struct kms_buf out = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_context_canonical(pairs, 3, &out), KMS_OK);
    assert_int_equal(out.len, sizeof want);
    assert_memory_equal(out.data, want, sizeof want);
    kms_buf_free(&out);
}

static void test_context_sorts_by_unsigned_bytes(void **state)
{
    /* 'B' (0x42) < 'a' (0x61) < 0xc3 (first byte of UTF-8 "é") */
    /* clang-format off */
    static const uint8_t want[] = {
        0, 0, 0, 3,
        0, 0, 0, 1, 'B',        0, 0, 0, 1, '1',
        0, 0, 0, 1, 'a',        0, 0, 0, 1, '2',
        0, 0, 0, 2, 0xc3, 0xa9, 0, 0, 0, 1, '3',
    };
    /* clang-format on */
    struct kms_context_pair pairs[3] = {pair("\xc3\xa9", "3"), pair("a", "2"), pair("B", "1")};
    struct kms_buf out = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_context_canonical(pairs, 3, &out), KMS_OK);
    assert_int_equal(out.len, sizeof want);
    assert_memory_equal(out.data, want, sizeof want);
    kms_buf_free(&out);
}

static void test_context_size_limit(void **state)
{
    /* 4 (count) + 4 + 1 (key "k") + 4 + value: 8179 bytes of value is exactly the limit. */
    size_t at_limit = KMS_CONTEXT_MAX_LEN - 4 - 4 - 1 - 4;
    char *value = malloc(at_limit + 1);
    struct kms_context_pair p[1];
    struct kms_buf out = KMS_BUF_INIT;
    (void)state;

    assert_non_null(value);
    memset(value, 'v', at_limit + 1);
    p[0] = (struct kms_context_pair){"k", 1, value, at_limit};
    assert_int_equal(kms_context_canonical(p, 1, &out), KMS_OK);
    assert_int_equal(out.len, KMS_CONTEXT_MAX_LEN);
    kms_buf_free(&out);

    p[0].value_len = at_limit + 1;
    assert_int_equal(kms_context_canonical(p, 1, &out), KMS_ERR_VALIDATION);
    kms_buf_free(&out);

    /* over the limit through many small pairs, no single one too large */
    struct kms_context_pair *many = calloc(1000, sizeof *many);
    char(*keys)[8] = calloc(1000, sizeof *keys);
    assert_non_null(many);
    assert_non_null(keys);
    for (size_t i = 0; i < 1000; i++) {
        keys[i][0] = (char)('a' + i / 100);
        keys[i][1] = (char)('0' + (i / 10) % 10);
        keys[i][2] = (char)('0' + i % 10);
        many[i] = (struct kms_context_pair){keys[i], 3, "v", 1};
    }
    /* 4 + 1000 * (8 + 3 + 1) = 12004 > 8192 */
    assert_int_equal(kms_context_canonical(many, 1000, &out), KMS_ERR_VALIDATION);
    kms_buf_free(&out);
    /* 4 + 682 * 12 = 8188 fits */
    assert_int_equal(kms_context_canonical(many, 682, &out), KMS_OK);
    assert_int_equal(out.len, 8188);
    kms_buf_free(&out);
    free(keys);
    free(many);
    free(value);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_header_bytes),
        cmocka_unit_test(test_header_decode_round_trip),
        cmocka_unit_test(test_decode_shortest),
        cmocka_unit_test(test_decode_bad_format),
        cmocka_unit_test(test_decode_version_zero),
        cmocka_unit_test(test_aad_layout),
        cmocka_unit_test_setup_teardown(test_seal_opens, make_sealed, free_sealed),
        cmocka_unit_test_setup_teardown(test_seal_every_truncation_rejected, make_sealed,
                                        free_sealed),
        cmocka_unit_test_setup_teardown(test_seal_every_bit_flip_rejected, make_sealed,
                                        free_sealed),
        cmocka_unit_test_setup_teardown(test_seal_other_context_rejected, make_sealed, free_sealed),
        cmocka_unit_test_setup_teardown(test_seal_other_key_rejected, make_sealed, free_sealed),
        cmocka_unit_test(test_context_exact_bytes),
        cmocka_unit_test(test_context_order_independent),
        cmocka_unit_test(test_context_boundaries_distinct),
        cmocka_unit_test(test_context_empty),
        cmocka_unit_test(test_context_duplicate_key),
        cmocka_unit_test(test_context_prefix_sorts_first),
        cmocka_unit_test(test_context_sorts_by_unsigned_bytes),
        cmocka_unit_test(test_context_size_limit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
