/*
 * The ciphertext blob (DESIGN §4) and the canonical encryption context.
 *
 *   version (1) | key uuid (16) | key version (4, big-endian) | IV (12) | ciphertext | tag (16)
 *
 * The GCM additional data is the header (everything before the IV) followed by
 * the canonical encryption context, so neither can be swapped for another.
 */
#ifndef P11KMS_BLOB_H
#define P11KMS_BLOB_H

#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/encoding.h"

#define KMS_BLOB_FORMAT_V1 1
#define KMS_BLOB_HEADER_LEN (1 + KMS_UUID_LEN + 4)
#define KMS_GCM_IV_LEN 12
#define KMS_GCM_TAG_LEN 16
/* Shortest blob: header, IV, one byte of ciphertext, tag. */
#define KMS_BLOB_MIN_LEN (KMS_BLOB_HEADER_LEN + KMS_GCM_IV_LEN + 1 + KMS_GCM_TAG_LEN)
#define KMS_BLOB_OVERHEAD (KMS_BLOB_HEADER_LEN + KMS_GCM_IV_LEN + KMS_GCM_TAG_LEN)
/*
 * The one message of every well-formed blob that does not open, whatever the
 * reason (its key unknown or not the caller's to use, its version unknown, the
 * ciphertext altered, the context wrong): it says nothing about which keys exist.
 */
#define KMS_BLOB_INVALID "The ciphertext, its key or its encryption context is not valid"

/* A decoded blob: pointers into the bytes it was decoded from. */
struct kms_blob {
    uint8_t key_id[KMS_UUID_LEN];
    uint32_t key_version;
    const uint8_t *header;     /* KMS_BLOB_HEADER_LEN bytes */
    const uint8_t *iv;         /* KMS_GCM_IV_LEN bytes */
    const uint8_t *ciphertext; /* ciphertext_len bytes, followed by the tag */
    size_t ciphertext_len;
    const uint8_t *tag; /* KMS_GCM_TAG_LEN bytes */
};

/* Writes the header for a key version into out. */
void kms_blob_header(const uint8_t key_id[KMS_UUID_LEN], uint32_t key_version,
                     uint8_t out[KMS_BLOB_HEADER_LEN]);
/* Decodes without copying; anything malformed is KMS_ERR_INVALID_CIPHERTEXT. */
KMS_MUST_CHECK kms_err kms_blob_decode(const uint8_t *p, size_t n, struct kms_blob *out);
/* AAD = header || canonical context. */
KMS_MUST_CHECK kms_err kms_blob_aad(const uint8_t header[KMS_BLOB_HEADER_LEN],
                                    const struct kms_buf *canonical_context, struct kms_buf *out);

/* One encryption-context pair; neither string need be NUL-terminated. */
struct kms_context_pair {
    const char *key;
    size_t key_len;
    const char *value;
    size_t value_len;
};

/* Most bytes a canonical context may take (keys, values and prefixes). */
#define KMS_CONTEXT_MAX_LEN 8192

/*
 * Canonical form: u32 count, then for each pair in key-byte order
 * u32 key length | key | u32 value length | value (all big-endian).
 * Sorts pairs in place. Duplicate keys are KMS_ERR_VALIDATION.
 * An empty context canonicalises to four zero bytes.
 */
KMS_MUST_CHECK kms_err kms_context_canonical(struct kms_context_pair *pairs, size_t n,
                                             struct kms_buf *out);

#endif
