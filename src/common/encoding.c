#include "config.h"

#include "common/encoding.h"

#include <openssl/rand.h>
#include <string.h>

static const char std_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
static const char url_alphabet[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

static kms_err encode(const char *alphabet, int pad, const uint8_t *in, size_t n,
                      struct kms_buf *out)
{
    KMS_ENSURE(n <= (SIZE_MAX / 4) * 3 - 3, KMS_ERR_VALIDATION, "input too large");
    KMS_GUARD(kms_buf_reserve(out, (n + 2) / 3 * 4));
    char *o = (char *)out->data + out->len;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[(v >> 12) & 63];
        *o++ = alphabet[(v >> 6) & 63];
        *o++ = alphabet[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[(v >> 12) & 63];
        if (pad) {
            *o++ = '=';
            *o++ = '=';
        }
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        *o++ = alphabet[v >> 18];
        *o++ = alphabet[(v >> 12) & 63];
        *o++ = alphabet[(v >> 6) & 63];
        if (pad)
            *o++ = '=';
    }
    out->len = (size_t)(o - (char *)out->data);
    return kms_buf_terminate(out);
}

/* All ones when lo <= c <= hi, else 0: a comparison, not a branch. */
static unsigned in_range(unsigned c, unsigned lo, unsigned hi)
{
    return 0u - (unsigned)(c - lo <= hi - lo);
}

/*
 * The 6-bit value of a base64 (or, with url, base64url) character, or -1.
 * Computed with masks rather than a search or a table indexed by the
 * character, so decoding a secret (a data key, a plaintext) takes the same
 * time and touches the same memory whatever its characters are; and it is
 * faster than a search of the alphabet.
 */
static inline int value_of(int url, unsigned char ch)
{
    unsigned c = ch, v = 0, found = 0, m;
    m = in_range(c, 'A', 'Z');
    v |= m & (c - 'A');
    found |= m;
    m = in_range(c, 'a', 'z');
    v |= m & (c - 'a' + 26);
    found |= m;
    m = in_range(c, '0', '9');
    v |= m & (c - '0' + 52);
    found |= m;
    m = in_range(c, url ? '-' : '+', url ? '-' : '+');
    v |= m & 62;
    found |= m;
    m = in_range(c, url ? '_' : '/', url ? '_' : '/');
    v |= m & 63;
    found |= m;
    return (int)(v | ~found); /* ~found is 0 when found, all ones (-1) when not */
}

/*
 * Four characters at a time into three bytes, then the two or three left; a
 * character outside the alphabet makes its value negative, and the OR of
 * all values is checked once at the end, so the loop has no branch on the
 * data.
 */
static inline kms_err decode(int url, int padded, const char *in, size_t n, struct kms_buf *out)
{
    const unsigned char *p = (const unsigned char *)in;
    size_t body = n, i = 0;
    int bad = 0;
    uint32_t rest = 0;

    if (padded) {
        KMS_ENSURE(n % 4 == 0, KMS_ERR_VALIDATION, "base64 length is not a multiple of 4");
        if (body > 0 && in[body - 1] == '=')
            body--;
        if (body > 0 && in[body - 1] == '=')
            body--;
    }
    KMS_ENSURE(body % 4 != 1, KMS_ERR_VALIDATION, "base64 input has a dangling character");
    KMS_GUARD(kms_buf_reserve(out, body / 4 * 3 + 2));
    uint8_t *o = out->data + out->len;
    for (; i + 4 <= body; i += 4) {
        int a = value_of(url, p[i]), b = value_of(url, p[i + 1]), c = value_of(url, p[i + 2]),
            d = value_of(url, p[i + 3]);
        bad |= a | b | c | d;
        uint32_t v = (uint32_t)a << 18 | (uint32_t)b << 12 | (uint32_t)c << 6 | (uint32_t)d;
        o[0] = (uint8_t)(v >> 16);
        o[1] = (uint8_t)(v >> 8);
        o[2] = (uint8_t)v;
        o += 3;
    }
    if (body - i == 2) {
        int a = value_of(url, p[i]), b = value_of(url, p[i + 1]);
        bad |= a | b;
        uint32_t v = (uint32_t)a << 6 | (uint32_t)b;
        *o++ = (uint8_t)(v >> 4);
        rest = v & 0xf;
    } else if (body - i == 3) {
        int a = value_of(url, p[i]), b = value_of(url, p[i + 1]), c = value_of(url, p[i + 2]);
        bad |= a | b | c;
        uint32_t v = (uint32_t)a << 12 | (uint32_t)b << 6 | (uint32_t)c;
        *o++ = (uint8_t)(v >> 10);
        *o++ = (uint8_t)(v >> 2);
        rest = v & 0x3;
    }
    out->len = (size_t)(o - out->data);
    KMS_ENSURE(bad >= 0, KMS_ERR_VALIDATION, "base64 input has a character outside its alphabet");
    /* Leftover bits must be zero, so each byte string has one encoding. */
    KMS_ENSURE(rest == 0, KMS_ERR_VALIDATION, "base64 input has non-zero padding bits");
    return kms_buf_terminate(out);
}

kms_err kms_b64_encode(const uint8_t *in, size_t n, struct kms_buf *out)
{
    return encode(std_alphabet, 1, in, n, out);
}

kms_err kms_b64_decode(const char *in, size_t n, struct kms_buf *out)
{
    return decode(0, 1, in, n, out);
}

kms_err kms_b64url_encode(const uint8_t *in, size_t n, struct kms_buf *out)
{
    return encode(url_alphabet, 0, in, n, out);
}

kms_err kms_b64url_decode(const char *in, size_t n, struct kms_buf *out)
{
    return decode(1, 0, in, n, out);
}

/*
 * The table-driven base64url decoder, for what is not secret. URL_VALUES
 * lists the 6-bit value of each byte as a base64url character, 0xff for
 * every other byte; quad0..quad3 hold it shifted to its place in the 24
 * bits four characters make, and bit 31 for a byte outside the alphabet.
 */
/* clang-format off */
#define URL_VALUES(X) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0x3e) X(0xff) X(0xff) \
    X(0x34) X(0x35) X(0x36) X(0x37) X(0x38) X(0x39) X(0x3a) X(0x3b) \
    X(0x3c) X(0x3d) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0x00) X(0x01) X(0x02) X(0x03) X(0x04) X(0x05) X(0x06) \
    X(0x07) X(0x08) X(0x09) X(0x0a) X(0x0b) X(0x0c) X(0x0d) X(0x0e) \
    X(0x0f) X(0x10) X(0x11) X(0x12) X(0x13) X(0x14) X(0x15) X(0x16) \
    X(0x17) X(0x18) X(0x19) X(0xff) X(0xff) X(0xff) X(0xff) X(0x3f) \
    X(0xff) X(0x1a) X(0x1b) X(0x1c) X(0x1d) X(0x1e) X(0x1f) X(0x20) \
    X(0x21) X(0x22) X(0x23) X(0x24) X(0x25) X(0x26) X(0x27) X(0x28) \
    X(0x29) X(0x2a) X(0x2b) X(0x2c) X(0x2d) X(0x2e) X(0x2f) X(0x30) \
    X(0x31) X(0x32) X(0x33) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) \
    X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff) X(0xff)
#define AT(v, shift) ((v) == 0xff ? UINT32_C(0x80000000) : (uint32_t)(v) << (shift)),
#define AT18(v) AT(v, 18)
#define AT12(v) AT(v, 12)
#define AT6(v) AT(v, 6)
#define AT0(v) AT(v, 0)
static const uint32_t quad0[256] = {URL_VALUES(AT18)};
static const uint32_t quad1[256] = {URL_VALUES(AT12)};
static const uint32_t quad2[256] = {URL_VALUES(AT6)};
static const uint32_t quad3[256] = {URL_VALUES(AT0)};
#undef AT0
#undef AT6
#undef AT12
#undef AT18
#undef AT
#undef URL_VALUES
/* clang-format on */

/*
 * Four characters at a time into three bytes, as decode() does, with their
 * bits looked up rather than computed: the OR of everything looked up has
 * bit 31 set when a character is outside the alphabet, checked once at the
 * end.
 */
kms_err kms_b64url_decode_public_to(const char *in, size_t n, uint8_t *out, size_t cap,
                                    size_t *out_len)
{
    const unsigned char *p = (const unsigned char *)in;
    size_t i = 0;
    uint32_t bad = 0, rest = 0;
    uint8_t *o = out;

    KMS_ENSURE(n % 4 != 1, KMS_ERR_VALIDATION, "base64 input has a dangling character");
    KMS_ENSURE(kms_b64url_decoded_len(n) <= cap, KMS_ERR_INTERNAL,
               "base64 output buffer too small");
    for (; i + 4 <= n; i += 4) {
        uint32_t v = quad0[p[i]] | quad1[p[i + 1]] | quad2[p[i + 2]] | quad3[p[i + 3]];
        bad |= v;
        o[0] = (uint8_t)(v >> 16);
        o[1] = (uint8_t)(v >> 8);
        o[2] = (uint8_t)v;
        o += 3;
    }
    if (n - i == 2) {
        uint32_t v = quad0[p[i]] | quad1[p[i + 1]];
        bad |= v;
        *o++ = (uint8_t)(v >> 16);
        rest = (v >> 12) & 0xf;
    } else if (n - i == 3) {
        uint32_t v = quad0[p[i]] | quad1[p[i + 1]] | quad2[p[i + 2]];
        bad |= v;
        *o++ = (uint8_t)(v >> 16);
        *o++ = (uint8_t)(v >> 8);
        rest = (v >> 6) & 0x3;
    }
    KMS_ENSURE(!(bad & UINT32_C(0x80000000)), KMS_ERR_VALIDATION,
               "base64 input has a character outside its alphabet");
    /* Leftover bits must be zero, so each byte string has one encoding. */
    KMS_ENSURE(rest == 0, KMS_ERR_VALIDATION, "base64 input has non-zero padding bits");
    *out_len = (size_t)(o - out);
    return KMS_OK;
}

kms_err kms_b64url_decode_public(const char *in, size_t n, struct kms_buf *out)
{
    size_t m = 0;
    KMS_ENSURE(n % 4 != 1, KMS_ERR_VALIDATION, "base64 input has a dangling character");
    KMS_GUARD(kms_buf_reserve(out, kms_b64url_decoded_len(n)));
    KMS_GUARD(kms_b64url_decode_public_to(in, n, out->data + out->len, out->cap - out->len, &m));
    out->len += m;
    return kms_buf_terminate(out);
}

void kms_hex_encode(const uint8_t *in, size_t n, char *out)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        out[2 * i] = digits[in[i] >> 4];
        out[2 * i + 1] = digits[in[i] & 15];
    }
    out[2 * n] = '\0';
}

kms_err kms_uuid_new(uint8_t out[KMS_UUID_LEN])
{
    KMS_ENSURE(RAND_bytes(out, KMS_UUID_LEN) == 1, KMS_ERR_INTERNAL, "random generator failed");
    kms_uuid_mark(out);
    return KMS_OK;
}

void kms_uuid_mark(uint8_t id[KMS_UUID_LEN])
{
    id[6] = (uint8_t)((id[6] & 0x0f) | 0x40);
    id[8] = (uint8_t)((id[8] & 0x3f) | 0x80);
}

void kms_uuid_format(const uint8_t id[KMS_UUID_LEN], char *out)
{
    char hex[2 * KMS_UUID_LEN + 1];
    kms_hex_encode(id, KMS_UUID_LEN, hex);
    memcpy(out, hex, 8);
    out[8] = '-';
    memcpy(out + 9, hex + 8, 4);
    out[13] = '-';
    memcpy(out + 14, hex + 12, 4);
    out[18] = '-';
    memcpy(out + 19, hex + 16, 4);
    out[23] = '-';
    memcpy(out + 24, hex + 20, 12);
    out[36] = '\0';
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

kms_err kms_uuid_parse(const char *s, size_t n, uint8_t out[KMS_UUID_LEN])
{
    KMS_ENSURE(n == KMS_UUID_TEXT_LEN, KMS_ERR_NOT_FOUND, "not a key id");
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        if (i == 8 || i == 13 || i == 18 || i == 23) {
            KMS_ENSURE(s[i] == '-', KMS_ERR_NOT_FOUND, "not a key id");
            i++;
            continue;
        }
        int hi = hex_value(s[i]), lo = hex_value(s[i + 1]);
        KMS_ENSURE(hi >= 0 && lo >= 0, KMS_ERR_NOT_FOUND, "not a key id");
        out[o++] = (uint8_t)(hi << 4 | lo);
        i += 2;
    }
    return KMS_OK;
}

size_t kms_utf8_len(const unsigned char *p, size_t n)
{
    unsigned c = p[0];
    size_t len;
    uint32_t cp, min;

    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        len = 2, cp = c & 0x1f, min = 0x80;
    } else if ((c & 0xf0) == 0xe0) {
        len = 3, cp = c & 0x0f, min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4, cp = c & 0x07, min = 0x10000;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return len;
}
