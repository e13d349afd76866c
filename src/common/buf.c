#include "config.h"

#include "common/buf.h"

#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

kms_err kms_buf_reserve(struct kms_buf *b, size_t extra)
{
    KMS_ENSURE(extra <= SIZE_MAX - b->len - 1, KMS_ERR_INTERNAL, "buffer size overflow");
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return KMS_OK;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    /* Not realloc: the old block may hold secrets and must be cleansed. */
    uint8_t *p = malloc(cap);
    KMS_ENSURE(p != NULL, KMS_ERR_INTERNAL, "out of memory");
    if (b->data) {
        memcpy(p, b->data, b->len);
        kms_free_secret(b->data, b->cap);
    }
    b->data = p;
    b->cap = cap;
    return KMS_OK;
}

kms_err kms_buf_append(struct kms_buf *b, const void *p, size_t n)
{
    KMS_GUARD(kms_buf_reserve(b, n));
    if (n)
        memcpy(b->data + b->len, p, n);
    b->len += n;
    return KMS_OK;
}

kms_err kms_buf_append_str(struct kms_buf *b, const char *s)
{
    return kms_buf_append(b, s, strlen(s));
}

kms_err kms_buf_append_u8(struct kms_buf *b, uint8_t v)
{
    return kms_buf_append(b, &v, 1);
}

kms_err kms_buf_append_u32be(struct kms_buf *b, uint32_t v)
{
    uint8_t be[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    return kms_buf_append(b, be, sizeof be);
}

kms_err kms_buf_terminate(struct kms_buf *b)
{
    KMS_GUARD(kms_buf_reserve(b, 0));
    b->data[b->len] = '\0';
    return KMS_OK;
}

void kms_buf_free(struct kms_buf *b)
{
    kms_free_secret(b->data, b->cap);
    b->data = NULL;
    b->len = b->cap = 0;
}

void kms_free_secret(void *p, size_t n)
{
    if (!p)
        return;
    OPENSSL_cleanse(p, n);
    free(p);
}

kms_err kms_read_bytes(struct kms_reader *r, size_t n, const uint8_t **p)
{
    KMS_ENSURE(r->left >= n, KMS_ERR_VALIDATION, "input is truncated");
    *p = r->p;
    r->p += n;
    r->left -= n;
    return KMS_OK;
}

kms_err kms_read_u8(struct kms_reader *r, uint8_t *v)
{
    KMS_ENSURE(r->left >= 1, KMS_ERR_VALIDATION, "input is truncated");
    *v = r->p[0];
    r->p++;
    r->left--;
    return KMS_OK;
}

kms_err kms_read_u32be(struct kms_reader *r, uint32_t *v)
{
    KMS_ENSURE(r->left >= 4, KMS_ERR_VALIDATION, "input is truncated");
    *v = (uint32_t)r->p[0] << 24 | (uint32_t)r->p[1] << 16 | (uint32_t)r->p[2] << 8 | r->p[3];
    r->p += 4;
    r->left -= 4;
    return KMS_OK;
}
