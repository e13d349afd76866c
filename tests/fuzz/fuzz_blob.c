/*
 * libFuzzer target: kms_blob_decode, the parser every Decrypt and ReEncrypt
 * runs on the caller's CiphertextBlob (src/common/blob.c).
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/blob.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kms_blob b;
    if (kms_blob_decode(data, size, &b) != KMS_OK)
        return 0;

    /* What the decoder promises: every pointer inside the input, lengths adding up. */
    const uint8_t *end = data + size;
    if (b.header != data || b.iv < data || b.iv + KMS_GCM_IV_LEN > end || b.ciphertext < data ||
        b.ciphertext + b.ciphertext_len > end || b.tag < data || b.tag + KMS_GCM_TAG_LEN != end ||
        b.ciphertext_len + KMS_BLOB_OVERHEAD != size || b.ciphertext_len == 0)
        abort();

    /* The AAD the decrypting side builds from it, with an empty context. */
    struct kms_buf ctx = KMS_BUF_INIT, aad = KMS_BUF_INIT;
    if (kms_context_canonical(NULL, 0, &ctx) == KMS_OK &&
        kms_blob_aad(b.header, &ctx, &aad) == KMS_OK &&
        (aad.len != KMS_BLOB_HEADER_LEN + 4 || memcmp(aad.data, data, KMS_BLOB_HEADER_LEN) != 0))
        abort();
    kms_buf_free(&aad);
    kms_buf_free(&ctx);
    return 0;
}
