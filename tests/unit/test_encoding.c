/*
 * Unit tests for src/common/encoding.h: strict base64 (RFC 4648 §4), URL-safe
 * base64 without padding (§5), hex and UUID text forms.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdint.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common/encoding.h"
#include "common/random.h"

/* RFC 4648 §10 test vectors. */
static const struct {
    const char *plain;
    const char *b64;
} rfc4648[] = {
    {"", ""},
    {"f", "Zg=="},
    {"fo", "Zm8="},
    {"foo", "Zm9v"},
    {"foob", "Zm9vYg=="},
    {"fooba", "Zm9vYmE="},
    {"foobar", "Zm9vYmFy"},
};

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* Decodes s (its strlen) and returns the error; out is freed. */
static kms_err b64_decode_rc(const char *s)
{
    struct kms_buf out = KMS_BUF_INIT;
    kms_err rc = kms_b64_decode(s, strlen(s), &out);
    kms_buf_free(&out);
    return rc;
}

static kms_err b64url_decode_rc(const char *s)
{
    struct kms_buf out = KMS_BUF_INIT;
    kms_err rc = kms_b64url_decode(s, strlen(s), &out);
    kms_buf_free(&out);
    return rc;
}

/* ---- standard base64 ------------------------------------------------------------ */

static void test_b64_encode_rfc4648(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_ELEMS(rfc4648); i++) {
        struct kms_buf out = KMS_BUF_INIT;
        size_t n = strlen(rfc4648[i].b64);
        assert_int_equal(
            kms_b64_encode((const uint8_t *)rfc4648[i].plain, strlen(rfc4648[i].plain), &out),
            KMS_OK);
        assert_int_equal(out.len, n);
        assert_memory_equal(out.data, rfc4648[i].b64, n);
        assert_int_equal(out.data[n], '\0');
        kms_buf_free(&out);
    }
}

static void test_b64_decode_rfc4648(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_ELEMS(rfc4648); i++) {
        struct kms_buf out = KMS_BUF_INIT;
        size_t n = strlen(rfc4648[i].plain);
        assert_int_equal(kms_b64_decode(rfc4648[i].b64, strlen(rfc4648[i].b64), &out), KMS_OK);
        assert_int_equal(out.len, n);
        if (n)
            assert_memory_equal(out.data, rfc4648[i].plain, n);
        kms_buf_free(&out);
    }
}

/* Every byte value as the last character of a group: accepted exactly when it
   is in the alphabet (or is the padding), and then decoded to its index in it. */
static void test_b64_every_byte(void **state)
{
    (void)state;
    static const char *const alphabets[2] = {
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"};
    for (int url = 0; url < 2; url++)
        for (int c = 0; c < 256; c++) {
            char in[4] = {'A', 'A', 'A', (char)c};
            struct kms_buf out = KMS_BUF_INIT;
            const char *at = c ? memchr(alphabets[url], c, 64) : NULL;
            kms_err rc = url ? kms_b64url_decode(in, 4, &out) : kms_b64_decode(in, 4, &out);
            if (!url && c == '=') { /* padding: "AAA=" is two zero bytes */
                assert_int_equal(rc, KMS_OK);
                assert_int_equal(out.len, 2);
            } else if (!at) {
                assert_int_equal(rc, KMS_ERR_VALIDATION);
            } else {
                assert_int_equal(rc, KMS_OK);
                assert_int_equal(out.len, 3);
                assert_int_equal(out.data[0], 0);
                assert_int_equal(out.data[1], 0);
                assert_int_equal(out.data[2], at - alphabets[url]);
            }
            kms_buf_free(&out);
        }
}

static void test_b64_decode_bad_length(void **state)
{
    (void)state;
    assert_int_equal(b64_decode_rc("Z"), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zg"), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zg="), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zm9"), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zm9vY"), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zm9vYg="), KMS_ERR_VALIDATION);
}

static void test_b64_decode_bad_characters(void **state)
{
    (void)state;
    assert_int_equal(b64_decode_rc("Zm9v!A=="), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Z m9"), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zm9 "), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zm9\n"), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("-_8="), KMS_ERR_VALIDATION); /* URL-safe alphabet */
    assert_int_equal(b64_decode_rc("Zm\xc3\xa9"), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("+/8="), KMS_OK); /* the same bytes, standard */
}

static void test_b64_decode_padding_misplaced(void **state)
{
    (void)state;
    /* '=' in the middle */
    assert_int_equal(b64_decode_rc("Zg==Zg=="), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Z=g="), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zm=v"), KMS_ERR_VALIDATION);
    /* a third '=' */
    assert_int_equal(b64_decode_rc("Z==="), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("===="), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zm9vZ==="), KMS_ERR_VALIDATION);
}

static void test_b64_decode_nonzero_padding_bits(void **state)
{
    struct kms_buf out = KMS_BUF_INIT;
    (void)state;

    /* "f" is Zg==; Zh== carries the same byte with a stray bit in the padding. */
    assert_int_equal(b64_decode_rc("Zh=="), KMS_ERR_VALIDATION);
    assert_int_equal(b64_decode_rc("Zv=="), KMS_ERR_VALIDATION);
    /* "fo" is Zm8=; Zm9= sets a low bit of the last character. */
    assert_int_equal(b64_decode_rc("Zm9="), KMS_ERR_VALIDATION);
    assert_int_equal(kms_b64_decode("Zg==", 4, &out), KMS_OK);
    assert_int_equal(out.len, 1);
    assert_int_equal(out.data[0], 'f');
    kms_buf_free(&out);
}

static void test_b64_decode_nul_inside(void **state)
{
    static const char with_nul[8] = {'Z', 'm', '9', '\0', 'Y', 'g', '=', '='};
    static const char nul_last[4] = {'Z', 'm', '9', '\0'};
    struct kms_buf out = KMS_BUF_INIT;
    (void)state;

    assert_int_equal(kms_b64_decode(with_nul, sizeof with_nul, &out), KMS_ERR_VALIDATION);
    kms_buf_free(&out);
    assert_int_equal(kms_b64_decode(nul_last, sizeof nul_last, &out), KMS_ERR_VALIDATION);
    kms_buf_free(&out);
}

static void test_b64_binary_round_trip(void **state)
{
    uint8_t all[256];
    struct kms_buf enc = KMS_BUF_INIT, dec = KMS_BUF_INIT;
    (void)state;

    for (size_t i = 0; i < sizeof all; i++)
        all[i] = (uint8_t)i;
    /* every length up to 256, so each tail (0, 1 and 2 leftover bytes) is met */
    for (size_t n = 0; n <= sizeof all; n++) {
        assert_int_equal(kms_b64_encode(all, n, &enc), KMS_OK);
        assert_int_equal(enc.len, (n + 2) / 3 * 4);
        assert_int_equal(kms_b64_decode((const char *)enc.data, enc.len, &dec), KMS_OK);
        assert_int_equal(dec.len, n);
        if (n)
            assert_memory_equal(dec.data, all, n);
        kms_buf_free(&enc);
        kms_buf_free(&dec);
    }
}

/* ---- URL-safe base64 ------------------------------------------------------------ */

static void test_b64url_vectors(void **state)
{
    static const uint8_t fbff[] = {0xfb, 0xff};
    static const uint8_t fbefbe[] = {0xfb, 0xef, 0xbe};
    struct kms_buf out = KMS_BUF_INIT;
    (void)state;

    /* RFC 4648 §10 strings, padding dropped */
    for (size_t i = 0; i < N_ELEMS(rfc4648); i++) {
        const char *b64 = rfc4648[i].b64;
        size_t n = strcspn(b64, "=");
        assert_int_equal(
            kms_b64url_encode((const uint8_t *)rfc4648[i].plain, strlen(rfc4648[i].plain), &out),
            KMS_OK);
        assert_int_equal(out.len, n);
        assert_memory_equal(out.data, b64, n);
        kms_buf_free(&out);

        assert_int_equal(kms_b64url_decode(b64, n, &out), KMS_OK);
        assert_int_equal(out.len, strlen(rfc4648[i].plain));
        if (out.len)
            assert_memory_equal(out.data, rfc4648[i].plain, out.len);
        kms_buf_free(&out);
    }

    /* the two characters that differ from the standard alphabet */
    assert_int_equal(kms_b64url_encode(fbff, sizeof fbff, &out), KMS_OK);
    assert_int_equal(out.len, 3);
    assert_memory_equal(out.data, "-_8", 3);
    kms_buf_free(&out);
    assert_int_equal(kms_b64_encode(fbff, sizeof fbff, &out), KMS_OK);
    assert_int_equal(out.len, 4);
    assert_memory_equal(out.data, "+/8=", 4);
    kms_buf_free(&out);

    assert_int_equal(kms_b64url_encode(fbefbe, sizeof fbefbe, &out), KMS_OK);
    assert_int_equal(out.len, 4);
    assert_memory_equal(out.data, "----", 4);
    kms_buf_free(&out);

    assert_int_equal(kms_b64url_decode("-_8", 3, &out), KMS_OK);
    assert_int_equal(out.len, sizeof fbff);
    assert_memory_equal(out.data, fbff, sizeof fbff);
    kms_buf_free(&out);
}

static void test_b64url_rejects(void **state)
{
    (void)state;
    assert_int_equal(b64url_decode_rc("+_8"), KMS_ERR_VALIDATION);
    assert_int_equal(b64url_decode_rc("-/8"), KMS_ERR_VALIDATION);
    assert_int_equal(b64url_decode_rc("-_8="), KMS_ERR_VALIDATION);
    assert_int_equal(b64url_decode_rc("Zg=="), KMS_ERR_VALIDATION);
    assert_int_equal(b64url_decode_rc("Zm9vY"), KMS_ERR_VALIDATION); /* 4k+1 characters */
    assert_int_equal(b64url_decode_rc("Z"), KMS_ERR_VALIDATION);
    assert_int_equal(b64url_decode_rc("Zh"), KMS_ERR_VALIDATION); /* padding bits */
    assert_int_equal(b64url_decode_rc("Zg"), KMS_OK);
}

static void test_b64url_binary_round_trip(void **state)
{
    uint8_t all[256];
    struct kms_buf enc = KMS_BUF_INIT, dec = KMS_BUF_INIT;
    (void)state;

    for (size_t i = 0; i < sizeof all; i++)
        all[i] = (uint8_t)(255 - i);
    for (size_t n = 0; n <= sizeof all; n++) {
        assert_int_equal(kms_b64url_encode(all, n, &enc), KMS_OK);
        assert_int_equal(enc.len, (4 * n + 2) / 3);
        assert_null(memchr(enc.data, '=', enc.len));
        assert_null(memchr(enc.data, '+', enc.len));
        assert_null(memchr(enc.data, '/', enc.len));
        assert_int_equal(kms_b64url_decode((const char *)enc.data, enc.len, &dec), KMS_OK);
        assert_int_equal(dec.len, n);
        if (n)
            assert_memory_equal(dec.data, all, n);
        kms_buf_free(&enc);
        kms_buf_free(&dec);
    }
}

/* ---- base64url for public data ------------------------------------------------ */

/*
 * The table-driven decoder must accept and refuse exactly what the
 * constant-time one does, with the same bytes: s (n characters) through both,
 * and through kms_b64url_decode_public_to with a buffer of exactly the size.
 */
static void check_same_as_constant_time(const char *s, size_t n)
{
    struct kms_buf ct = KMS_BUF_INIT, pub = KMS_BUF_INIT;
    kms_err want = kms_b64url_decode(s, n, &ct);
    kms_err have = kms_b64url_decode_public(s, n, &pub);
    if (want != have)
        fail_msg("%zu characters: kms_b64url_decode %d, kms_b64url_decode_public %d", n, want,
                 have);
    uint8_t out[512];
    size_t m = 999;
    assert_true(n <= sizeof out);
    kms_err to = kms_b64url_decode_public_to(s, n, out, kms_b64url_decoded_len(n), &m);
    assert_int_equal(to, want);
    if (want == KMS_OK) {
        assert_int_equal(pub.len, ct.len);
        assert_int_equal(m, ct.len);
        assert_int_equal(kms_b64url_decoded_len(n), ct.len);
        if (ct.len) {
            assert_memory_equal(pub.data, ct.data, ct.len);
            assert_memory_equal(out, ct.data, ct.len);
        }
        assert_int_equal(pub.data[pub.len], '\0');
    } else {
        assert_int_equal(pub.len, 0);
    }
    kms_buf_free(&ct);
    kms_buf_free(&pub);
}

static void test_b64url_public_every_byte(void **state)
{
    (void)state;
    /* Every byte value in every position of a quad and of both tails. */
    for (size_t n = 2; n <= 8; n++) {
        if (n % 4 == 1)
            continue;
        for (size_t at = 0; at < n; at++)
            for (int c = 0; c < 256; c++) {
                char in[8];
                memset(in, 'A', sizeof in);
                in[at] = (char)c;
                check_same_as_constant_time(in, n);
            }
    }
    /* Every pair of characters: each two-character tail, padding bits and all. */
    for (int a = 0; a < 256; a++)
        for (int b = 0; b < 256; b++) {
            char in[2] = {(char)a, (char)b};
            check_same_as_constant_time(in, 2);
        }
    /* The last character of a three-character tail over the whole alphabet and beyond. */
    for (int c = 0; c < 256; c++) {
        char in[3] = {'-', '_', (char)c};
        check_same_as_constant_time(in, 3);
    }
}

/* xorshift64*: the same "random" strings on every run. */
static uint64_t next_random(uint64_t *s)
{
    *s ^= *s >> 12;
    *s ^= *s << 25;
    *s ^= *s >> 27;
    return *s * 0x2545f4914f6cdd1dull;
}

static void test_b64url_public_random(void **state)
{
    (void)state;
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    char in[300];
    for (int round = 0; round < 200000; round++) {
        uint64_t r = next_random(&seed);
        size_t n = (size_t)(r % sizeof in);
        /* Mostly the alphabet, so most strings decode; now and then any byte. */
        unsigned odds = (unsigned)(r >> 32) % 4; /* 0: any byte anywhere; else 1 in 2^(3 odds) */
        for (size_t i = 0; i < n; i++) {
            uint64_t x = next_random(&seed);
            if (odds == 0 || x % (1u << (3 * odds)) == 0)
                in[i] = (char)(x >> 8);
            else
                in[i] = alphabet[(x >> 8) % 64];
        }
        check_same_as_constant_time(in, n);
    }
    /* Valid encodings of random bytes, every length up to 200: all decode. */
    for (size_t n = 0; n <= 200; n++) {
        uint8_t bytes[200];
        struct kms_buf enc = KMS_BUF_INIT, dec = KMS_BUF_INIT;
        for (size_t i = 0; i < n; i++)
            bytes[i] = (uint8_t)next_random(&seed);
        assert_int_equal(kms_b64url_encode(bytes, n, &enc), KMS_OK);
        check_same_as_constant_time((const char *)enc.data, enc.len);
        assert_int_equal(kms_b64url_decode_public((const char *)enc.data, enc.len, &dec), KMS_OK);
        assert_int_equal(dec.len, n);
        if (n)
            assert_memory_equal(dec.data, bytes, n);
        kms_buf_free(&enc);
        kms_buf_free(&dec);
    }
}

static void test_b64url_public_buffers(void **state)
{
    (void)state;
    uint8_t out[8];
    size_t m = 0;
    /* The buffer must have room for every byte, even when the input is bad. */
    assert_int_equal(kms_b64url_decode_public_to("Zm9vYmFy", 8, out, 5, &m), KMS_ERR_INTERNAL);
    assert_int_equal(kms_b64url_decode_public_to("Zm9vYmFy", 8, out, 6, &m), KMS_OK);
    assert_int_equal(m, 6);
    assert_memory_equal(out, "foobar", 6);
    assert_int_equal(kms_b64url_decode_public_to("", 0, NULL, 0, &m), KMS_OK);
    assert_int_equal(m, 0);
    assert_int_equal(kms_b64url_decode_public_to("Zm9vY", 5, out, sizeof out, &m),
                     KMS_ERR_VALIDATION);
    /* The kms_buf form appends, as kms_b64url_decode does, and leaves len alone on failure. */
    struct kms_buf b = KMS_BUF_INIT;
    assert_int_equal(kms_buf_append(&b, "x", 1), KMS_OK);
    assert_int_equal(kms_b64url_decode_public("Zm8", 3, &b), KMS_OK);
    assert_int_equal(b.len, 3);
    assert_memory_equal(b.data, "xfo", 3);
    assert_int_equal(kms_b64url_decode_public("Zm+", 3, &b), KMS_ERR_VALIDATION);
    assert_int_equal(kms_b64url_decode_public("Zm9", 3, &b), KMS_ERR_VALIDATION);
    assert_int_equal(kms_b64url_decode_public("Zm9vY", 5, &b), KMS_ERR_VALIDATION);
    assert_int_equal(b.len, 3);
    kms_buf_free(&b);
    /* The decoded length of every length the decoders accept. */
    assert_int_equal(kms_b64url_decoded_len(0), 0);
    assert_int_equal(kms_b64url_decoded_len(2), 1);
    assert_int_equal(kms_b64url_decoded_len(3), 2);
    assert_int_equal(kms_b64url_decoded_len(4), 3);
    assert_int_equal(kms_b64url_decoded_len(22), 16);
}

/* ---- hex ------------------------------------------------------------------------ */

static void test_hex_encode(void **state)
{
    static const uint8_t in[] = {0x00, 0x01, 0x7f, 0x80, 0xab, 0xcd, 0xef, 0xff};
    char out[2 * sizeof in + 1];
    char empty[1] = {'x'};
    (void)state;

    memset(out, 'x', sizeof out);
    kms_hex_encode(in, sizeof in, out);
    assert_memory_equal(out, "00017f80abcdefff", sizeof out); /* includes the NUL */
    kms_hex_encode(in, 0, empty);
    assert_int_equal(empty[0], '\0');
}

/* ---- UUIDs ---------------------------------------------------------------------- */

static void test_uuid_new(void **state)
{
    uint8_t a[KMS_UUID_LEN], b[KMS_UUID_LEN];
    (void)state;

    for (int i = 0; i < 64; i++) {
        assert_int_equal(kms_uuid_new(a), KMS_OK);
        assert_int_equal(a[6] >> 4, 4);      /* version 4 */
        assert_int_equal(a[8] & 0xc0, 0x80); /* variant 10 */
    }
    assert_int_equal(kms_uuid_new(b), KMS_OK);
    assert_memory_not_equal(a, b, sizeof a);
}

/* ---- public random bytes (common/random.h) --------------------------------------- */

static void test_random_public(void **state)
{
    uint8_t a[64], b[64], zero[64] = {0};
    (void)state;

    /* Across many pool refills: never the same twice, never the zeros a cleansed pool holds. */
    assert_int_equal(kms_random_public(a, sizeof a), KMS_OK);
    for (int i = 0; i < 100; i++) {
        assert_int_equal(kms_random_public(b, sizeof b), KMS_OK);
        assert_memory_not_equal(a, b, sizeof a);
        assert_memory_not_equal(b, zero, sizeof b);
        memcpy(a, b, sizeof a);
    }
    assert_int_equal(kms_random_public(a, 65), KMS_ERR_INTERNAL);
    assert_int_equal(kms_random_public(a, 0), KMS_OK);
}

/* A forked child must not hand out the bytes its parent still has in its pool. */
static void test_random_public_after_fork(void **state)
{
    uint8_t parent[16], child[16];
    int fds[2];
    (void)state;

    assert_int_equal(kms_random_public(parent, 1), KMS_OK); /* the pool holds bytes now */
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        uint8_t mine[16];
        int ok = kms_random_public(mine, sizeof mine) == KMS_OK &&
                 write(fds[1], mine, sizeof mine) == (ssize_t)sizeof mine;
        _exit(ok ? 0 : 1);
    }
    close(fds[1]);
    assert_int_equal(read(fds[0], child, sizeof child), (ssize_t)sizeof child);
    close(fds[0]);
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    assert_int_equal(kms_random_public(parent, sizeof parent), KMS_OK);
    assert_memory_not_equal(parent, child, sizeof parent);
}

static void test_uuid_format_parse(void **state)
{
    static const uint8_t id[KMS_UUID_LEN] = {0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77,
                                             0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff};
    static const char text[] = "00112233-4455-6677-8899-aabbccddeeff";
    char out[KMS_UUID_TEXT_LEN + 1];
    uint8_t back[KMS_UUID_LEN];
    (void)state;

    memset(out, 'x', sizeof out);
    kms_uuid_format(id, out);
    assert_memory_equal(out, text, sizeof text);
    assert_int_equal(kms_uuid_parse(out, KMS_UUID_TEXT_LEN, back), KMS_OK);
    assert_memory_equal(back, id, sizeof id);

    /* upper case is accepted too */
    memset(back, 0, sizeof back);
    assert_int_equal(kms_uuid_parse("00112233-4455-6677-8899-AABBCCDDEEFF", 36, back), KMS_OK);
    assert_memory_equal(back, id, sizeof id);

    /* and a fresh random one survives the trip */
    uint8_t fresh[KMS_UUID_LEN];
    assert_int_equal(kms_uuid_new(fresh), KMS_OK);
    kms_uuid_format(fresh, out);
    assert_int_equal(strlen(out), KMS_UUID_TEXT_LEN);
    assert_int_equal(kms_uuid_parse(out, strlen(out), back), KMS_OK);
    assert_memory_equal(back, fresh, sizeof fresh);
}

static void test_uuid_parse_rejects(void **state)
{
    static const char good[] = "00112233-4455-6677-8899-aabbccddeeff";
    char bad[64];
    uint8_t out[KMS_UUID_LEN];
    (void)state;

    /* wrong length, the same text cut short or made longer */
    assert_int_equal(kms_uuid_parse(good, 35, out), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_uuid_parse("00112233-4455-6677-8899-aabbccddeeff0", 37, out),
                     KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_uuid_parse("", 0, out), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_uuid_parse("00112233445566778899aabbccddeeff", 32, out),
                     KMS_ERR_NOT_FOUND);

    /* each dash replaced by a hex digit, length still 36 */
    static const size_t dashes[] = {8, 13, 18, 23};
    for (size_t i = 0; i < N_ELEMS(dashes); i++) {
        memcpy(bad, good, sizeof good);
        bad[dashes[i]] = '0';
        assert_int_equal(kms_uuid_parse(bad, 36, out), KMS_ERR_NOT_FOUND);
    }
    /* dashes in the wrong places */
    assert_int_equal(kms_uuid_parse("0011223-34455-6677-8899-aabbccddeeff", 36, out),
                     KMS_ERR_NOT_FOUND);

    /* a non-hex character at every digit position, both nibbles */
    for (size_t i = 0; i < 36; i++) {
        if (i == 8 || i == 13 || i == 18 || i == 23)
            continue;
        memcpy(bad, good, sizeof good);
        bad[i] = 'g';
        assert_int_equal(kms_uuid_parse(bad, 36, out), KMS_ERR_NOT_FOUND);
        bad[i] = '-';
        assert_int_equal(kms_uuid_parse(bad, 36, out), KMS_ERR_NOT_FOUND);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_b64_encode_rfc4648),
        cmocka_unit_test(test_b64_decode_rfc4648),
        cmocka_unit_test(test_b64_every_byte),
        cmocka_unit_test(test_b64_decode_bad_length),
        cmocka_unit_test(test_b64_decode_bad_characters),
        cmocka_unit_test(test_b64_decode_padding_misplaced),
        cmocka_unit_test(test_b64_decode_nonzero_padding_bits),
        cmocka_unit_test(test_b64_decode_nul_inside),
        cmocka_unit_test(test_b64_binary_round_trip),
        cmocka_unit_test(test_b64url_vectors),
        cmocka_unit_test(test_b64url_rejects),
        cmocka_unit_test(test_b64url_binary_round_trip),
        cmocka_unit_test(test_b64url_public_every_byte),
        cmocka_unit_test(test_b64url_public_random),
        cmocka_unit_test(test_b64url_public_buffers),
        cmocka_unit_test(test_hex_encode),
        cmocka_unit_test(test_uuid_new),
        cmocka_unit_test(test_random_public),
        cmocka_unit_test(test_random_public_after_fork),
        cmocka_unit_test(test_uuid_format_parse),
        cmocka_unit_test(test_uuid_parse_rejects),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
