#include "config.h"

#include "common/blob.h"

#include <stdlib.h>
#include <string.h>

void kms_blob_header(const uint8_t key_id[KMS_UUID_LEN], uint32_t key_version,
                     uint8_t out[KMS_BLOB_HEADER_LEN])
{
    out[0] = KMS_BLOB_FORMAT_V1;
    memcpy(out + 1, key_id, KMS_UUID_LEN);
    out[17] = (uint8_t)(key_version >> 24);
    out[18] = (uint8_t)(key_version >> 16);
    out[19] = (uint8_t)(key_version >> 8);
    out[20] = (uint8_t)key_version;
}

kms_err kms_blob_decode(const uint8_t *p, size_t n, struct kms_blob *out)
{
    struct kms_reader r = kms_reader_init(p, n);
    uint8_t format;
    const uint8_t *id;

    KMS_ENSURE(n >= KMS_BLOB_MIN_LEN, KMS_ERR_INVALID_CIPHERTEXT, "The ciphertext is too short");
    out->header = p;
    if (kms_read_u8(&r, &format) != KMS_OK || format != KMS_BLOB_FORMAT_V1)
        return KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT, "The ciphertext format is not recognised");
    if (kms_read_bytes(&r, KMS_UUID_LEN, &id) != KMS_OK ||
        kms_read_u32be(&r, &out->key_version) != KMS_OK ||
        kms_read_bytes(&r, KMS_GCM_IV_LEN, &out->iv) != KMS_OK)
        return KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT, "The ciphertext is too short");
    KMS_ENSURE(out->key_version != 0, KMS_ERR_INVALID_CIPHERTEXT,
               "The ciphertext names no key version");
    memcpy(out->key_id, id, KMS_UUID_LEN);
    out->ciphertext = r.p;
    out->ciphertext_len = r.left - KMS_GCM_TAG_LEN;
    out->tag = r.p + out->ciphertext_len;
    return KMS_OK;
}

kms_err kms_blob_aad(const uint8_t header[KMS_BLOB_HEADER_LEN],
                     const struct kms_buf *canonical_context, struct kms_buf *out)
{
    KMS_GUARD(kms_buf_append(out, header, KMS_BLOB_HEADER_LEN));
    return kms_buf_append(out, canonical_context->data, canonical_context->len);
}

static int pair_cmp(const void *a, const void *b)
{
    const struct kms_context_pair *x = a, *y = b;
    size_t n = x->key_len < y->key_len ? x->key_len : y->key_len;
    int c = memcmp(x->key, y->key, n);
    if (c)
        return c;
    return (x->key_len > y->key_len) - (x->key_len < y->key_len);
}

kms_err kms_context_canonical(struct kms_context_pair *pairs, size_t n, struct kms_buf *out)
{
    size_t total = 4;
    KMS_ENSURE(n <= UINT32_MAX, KMS_ERR_VALIDATION, "Too many encryption context pairs");
    if (n > 1)
        qsort(pairs, n, sizeof *pairs, pair_cmp);
    for (size_t i = 0; i < n; i++) {
        KMS_ENSURE(i == 0 || pair_cmp(&pairs[i - 1], &pairs[i]) != 0, KMS_ERR_VALIDATION,
                   "The encryption context has a duplicate key");
        KMS_ENSURE(pairs[i].key_len <= KMS_CONTEXT_MAX_LEN &&
                       pairs[i].value_len <= KMS_CONTEXT_MAX_LEN,
                   KMS_ERR_VALIDATION, "The encryption context is too large");
        total += 8 + pairs[i].key_len + pairs[i].value_len;
        KMS_ENSURE(total <= KMS_CONTEXT_MAX_LEN, KMS_ERR_VALIDATION,
                   "The encryption context is too large");
    }
    KMS_GUARD(kms_buf_reserve(out, total));
    KMS_GUARD(kms_buf_append_u32be(out, (uint32_t)n));
    for (size_t i = 0; i < n; i++) {
        KMS_GUARD(kms_buf_append_u32be(out, (uint32_t)pairs[i].key_len));
        KMS_GUARD(kms_buf_append(out, pairs[i].key, pairs[i].key_len));
        KMS_GUARD(kms_buf_append_u32be(out, (uint32_t)pairs[i].value_len));
        KMS_GUARD(kms_buf_append(out, pairs[i].value, pairs[i].value_len));
    }
    return KMS_OK;
}
