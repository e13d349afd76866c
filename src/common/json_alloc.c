#include "config.h"

#include "common/json_alloc.h"

#include <jansson.h>
#include <openssl/crypto.h>
#include <stdalign.h>
#include <stdlib.h>
#include <string.h>

/* jansson's free gets no size, so each block keeps its size in a prefix. */
#define PREFIX alignof(max_align_t)

static void *cleansing_malloc(size_t n)
{
    if (n > SIZE_MAX - PREFIX)
        return NULL;
    unsigned char *p = malloc(n + PREFIX);
    if (!p)
        return NULL;
    memcpy(p, &n, sizeof n);
    return p + PREFIX;
}

static void cleansing_free(void *ptr)
{
    if (!ptr)
        return;
    unsigned char *p = (unsigned char *)ptr - PREFIX;
    size_t n;
    memcpy(&n, p, sizeof n);
    OPENSSL_cleanse(p, n + PREFIX);
    free(p);
}

void kms_json_use_cleansing_alloc(void)
{
    json_set_alloc_funcs(cleansing_malloc, cleansing_free);
}

static int append(const char *p, size_t n, void *data)
{
    return kms_buf_append(data, p, n) == KMS_OK ? 0 : -1;
}

kms_err kms_json_dump(const json_t *j, size_t flags, struct kms_buf *out)
{
    KMS_ENSURE(json_dump_callback(j, append, out, flags | JSON_COMPACT) == 0, KMS_ERR_INTERNAL,
               "cannot serialise JSON");
    return KMS_OK;
}
