/*
 * libFuzzer target: the streaming envelope decoder (src/client/stream.c:
 * kms_stream_decrypt_with_key, i.e. header parse, context check and chunk
 * loop). The input is the stream, served through a read callback in uneven
 * pieces (so read_full's loop is exercised); the key and the context are
 * fixed: those of docs/format.md's worked example (key 0x00 ... 0x1f,
 * context {"tenant":"acme","purpose":"test"}), so its stream decrypts and
 * mutations of it reach every check.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

struct source {
    const uint8_t *p;
    size_t left;
    unsigned calls;
};

struct sink {
    size_t written;
};

static p11kms_status read_cb(void *arg, uint8_t *buf, size_t cap, size_t *got)
{
    struct source *s = arg;
    /* 1, 2, ... 17 bytes, then again: short reads a real pipe would give. */
    size_t n = 1 + s->calls++ % 17;
    if (n > cap)
        n = cap;
    if (n > s->left)
        n = s->left;
    memcpy(buf, s->p, n);
    s->p += n;
    s->left -= n;
    *got = n;
    return P11KMS_OK;
}

static p11kms_status write_cb(void *arg, const uint8_t *buf, size_t n)
{
    struct sink *k = arg;
    (void)buf;
    k->written += n;
    return P11KMS_OK;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* SHA-256 of the canonical form of {"tenant":"acme","purpose":"test"} (docs/format.md). */
    static const uint8_t digest[KMS_STREAM_DIGEST_LEN] = {
        0xff, 0xa5, 0x7b, 0x35, 0xe2, 0xb3, 0x6e, 0xf3, 0x2e, 0x3f, 0x87,
        0x4e, 0x29, 0x46, 0xc5, 0x83, 0x64, 0xa5, 0x53, 0x34, 0x43, 0x3f,
        0x1b, 0x09, 0x82, 0x8d, 0xb9, 0x94, 0xda, 0xbd, 0x4c, 0x9a};
    uint8_t key[KMS_STREAM_KEY_LEN];
    struct source src = {data, size, 0};
    struct sink dst = {0};

    for (size_t i = 0; i < sizeof key; i++)
        key[i] = (uint8_t)i;
    p11kms_status st =
        kms_stream_decrypt_with_key(key, digest, NULL, read_cb, &src, write_cb, &dst);
    /* Never more plaintext out than ciphertext in. */
    if (dst.written > size)
        abort();
    (void)st;
    return 0;
}
