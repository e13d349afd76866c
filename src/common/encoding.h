/* Base64 (standard and URL-safe), hex and UUID text forms. */
#ifndef P11KMS_ENCODING_H
#define P11KMS_ENCODING_H

#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"

#define KMS_UUID_LEN 16
#define KMS_UUID_TEXT_LEN 36

/* Standard alphabet with padding, as AWS's JSON protocol carries blobs. */
KMS_MUST_CHECK kms_err kms_b64_encode(const uint8_t *in, size_t n, struct kms_buf *out);
/*
 * Strict decode: standard alphabet, length a multiple of 4, padding only at
 * the end, unused trailing bits zero. Anything else is KMS_ERR_VALIDATION.
 */
KMS_MUST_CHECK kms_err kms_b64_decode(const char *in, size_t n, struct kms_buf *out);
/* URL-safe alphabet without padding (RFC 4648 §5), as JOSE uses it. */
KMS_MUST_CHECK kms_err kms_b64url_encode(const uint8_t *in, size_t n, struct kms_buf *out);
KMS_MUST_CHECK kms_err kms_b64url_decode(const char *in, size_t n, struct kms_buf *out);

/* Bytes that n characters of unpadded base64url decode to (n % 4 == 1 is not base64url). */
static inline size_t kms_b64url_decoded_len(size_t n)
{
    return n / 4 * 3 + (n % 4 ? n % 4 - 1 : 0);
}

/*
 * base64url for data that is not secret (a JWE's protected header, IV,
 * ciphertext and tag; a blob that is itself a ciphertext): a table lookup,
 * so its time and the memory it touches depend on the characters. It
 * accepts and refuses exactly what kms_b64url_decode does and gives the same
 * bytes. Anything that decodes a secret (a data key, a plaintext) uses
 * kms_b64url_decode / kms_b64_decode, which look nothing up by the character.
 *
 * _public_to decodes into out, which has room for cap bytes (at least
 * kms_b64url_decoded_len(n), else KMS_ERR_INTERNAL), and sets *out_len; on
 * KMS_ERR_VALIDATION out may hold garbage. _public appends to out and
 * NUL-terminates, as kms_b64url_decode does; out->len is unchanged on failure.
 */
KMS_MUST_CHECK kms_err kms_b64url_decode_public_to(const char *in, size_t n, uint8_t *out,
                                                   size_t cap, size_t *out_len);
KMS_MUST_CHECK kms_err kms_b64url_decode_public(const char *in, size_t n, struct kms_buf *out);

/* Lower-case hex; out holds 2n+1 bytes. */
void kms_hex_encode(const uint8_t *in, size_t n, char *out);

/* Random (version 4) UUID from OpenSSL's DRBG. */
KMS_MUST_CHECK kms_err kms_uuid_new(uint8_t out[KMS_UUID_LEN]);
/* Sets the version (4) and variant bits of 16 random bytes. */
void kms_uuid_mark(uint8_t id[KMS_UUID_LEN]);
/* Lower-case 8-4-4-4-12 form; out holds KMS_UUID_TEXT_LEN + 1 bytes. */
void kms_uuid_format(const uint8_t id[KMS_UUID_LEN], char *out);
/* Parses the 8-4-4-4-12 form (either case) of exactly n bytes. */
KMS_MUST_CHECK kms_err kms_uuid_parse(const char *s, size_t n, uint8_t out[KMS_UUID_LEN]);

/* Length of the valid UTF-8 sequence at p (n bytes there), or 0 when the bytes there are not one.
 */
size_t kms_utf8_len(const unsigned char *p, size_t n);

#endif
