/*
 * Byte buffers and a bounds-checked reader.
 *
 * A kms_buf grows as bytes are appended. Every buffer is cleansed before its
 * memory is released (on growth and on free), so one that held a data key or
 * a plaintext never leaves it behind in the heap.
 */
#ifndef P11KMS_BUF_H
#define P11KMS_BUF_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

struct kms_buf {
    uint8_t *data;
    size_t len;
    size_t cap;
};

#define KMS_BUF_INIT \
    {                \
        NULL, 0, 0   \
    }

KMS_MUST_CHECK kms_err kms_buf_reserve(struct kms_buf *b, size_t extra);
KMS_MUST_CHECK kms_err kms_buf_append(struct kms_buf *b, const void *p, size_t n);
KMS_MUST_CHECK kms_err kms_buf_append_str(struct kms_buf *b, const char *s);
KMS_MUST_CHECK kms_err kms_buf_append_u8(struct kms_buf *b, uint8_t v);
KMS_MUST_CHECK kms_err kms_buf_append_u32be(struct kms_buf *b, uint32_t v);
/* Appends a NUL that is not counted in len, so data can be read as a C string. */
KMS_MUST_CHECK kms_err kms_buf_terminate(struct kms_buf *b);
/* Cleanses and frees; the buffer is empty and reusable afterwards. */
void kms_buf_free(struct kms_buf *b);

/* A read-only cursor over bytes someone else owns. */
struct kms_reader {
    const uint8_t *p;
    size_t left;
};

static inline struct kms_reader kms_reader_init(const void *p, size_t n)
{
    struct kms_reader r = {(const uint8_t *)p, n};
    return r;
}

KMS_MUST_CHECK kms_err kms_read_u8(struct kms_reader *r, uint8_t *v);
KMS_MUST_CHECK kms_err kms_read_u32be(struct kms_reader *r, uint32_t *v);
/* Points *p at the next n bytes and steps over them. */
KMS_MUST_CHECK kms_err kms_read_bytes(struct kms_reader *r, size_t n, const uint8_t **p);

/* Cleanse-then-free for heap memory that held secrets. */
void kms_free_secret(void *p, size_t n);

#endif
