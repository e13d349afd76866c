/*
 * Maximum RSS of a streaming-envelope round trip (src/client/stream.c).
 *
 *   bench/stream_rss [MiB] [chunk_size]     (default 1024 MiB, 65536)
 *
 * A thread encrypts MiB mebibytes of a generated pattern (never stored) into
 * a pipe under an injected data key; this thread decrypts from the pipe and
 * hashes what comes out. Prints the time, whether the SHA-256 of the output
 * is that of the input, and getrusage(RUSAGE_SELF).ru_maxrss, which covers
 * both threads. Exits 1 on a mismatch or when the RSS is 16 MiB or more.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "client/internal.h"

static uint8_t key[KMS_STREAM_KEY_LEN], blob[64], digest[KMS_STREAM_DIGEST_LEN];

struct gen {
    uint64_t n, pos;
    EVP_MD_CTX *md;
};

static p11kms_status gen_read(void *arg, uint8_t *buf, size_t cap, size_t *got)
{
    struct gen *g = arg;
    size_t k = g->n - g->pos < cap ? (size_t)(g->n - g->pos) : cap;
    for (size_t i = 0; i < k; i++) {
        uint64_t at = g->pos + i;
        buf[i] = (uint8_t)((at >> 3) >> (8 * (7 - (at & 7))));
    }
    if (k && EVP_DigestUpdate(g->md, buf, k) != 1)
        return P11KMS_ERR_MEMORY;
    g->pos += k;
    *got = k;
    return P11KMS_OK;
}

static p11kms_status fd_write(void *arg, const uint8_t *buf, size_t n)
{
    int fd = *(int *)arg;
    while (n) {
        ssize_t w = write(fd, buf, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return P11KMS_ERR_TRANSPORT;
        buf += w;
        n -= (size_t)w;
    }
    return P11KMS_OK;
}

static p11kms_status fd_read(void *arg, uint8_t *buf, size_t cap, size_t *got)
{
    int fd = *(int *)arg;
    ssize_t r;
    do
        r = read(fd, buf, cap);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return P11KMS_ERR_TRANSPORT;
    *got = (size_t)r;
    return P11KMS_OK;
}

static p11kms_status hash_write(void *arg, const uint8_t *buf, size_t n)
{
    return n && EVP_DigestUpdate(arg, buf, n) != 1 ? P11KMS_ERR_MEMORY : P11KMS_OK;
}

struct encryptor {
    struct gen g;
    struct p11kms_stream_options o;
    int fd;
    p11kms_status st;
};

static void *encrypt_thread(void *arg)
{
    struct encryptor *e = arg;
    e->st = kms_stream_encrypt_with_key(key, NULL, NULL, blob, sizeof blob, digest, &e->o, gen_read,
                                        &e->g, fd_write, &e->fd);
    close(e->fd);
    return NULL;
}

int main(int argc, char **argv)
{
    uint64_t mib = argc > 1 ? strtoull(argv[1], NULL, 10) : 1024;
    size_t cs = argc > 2 ? strtoul(argv[2], NULL, 10) : 0;
    int fds[2];
    struct rusage ru;

    memset(key, 0x42, sizeof key);
    memset(blob, 0x17, sizeof blob);
    if (kms_stream_context_digest(NULL, 0, digest) != P11KMS_OK || pipe(fds) != 0)
        return 2;
    (void)fcntl(fds[0], F_SETPIPE_SZ, 1 << 20);
    getrusage(RUSAGE_SELF, &ru);
    long start_kib = ru.ru_maxrss;

    struct encryptor e = {{mib << 20, 0, EVP_MD_CTX_new()}, {cs, NULL, NULL}, fds[1], 0};
    EVP_MD_CTX *out = EVP_MD_CTX_new();
    if (!e.g.md || !out || EVP_DigestInit_ex(e.g.md, EVP_sha256(), NULL) != 1 ||
        EVP_DigestInit_ex(out, EVP_sha256(), NULL) != 1)
        return 2;

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_t th;
    if (pthread_create(&th, NULL, encrypt_thread, &e) != 0)
        return 2;
    p11kms_status st =
        kms_stream_decrypt_with_key(key, digest, NULL, fd_read, &fds[0], hash_write, out);
    close(fds[0]);
    pthread_join(th, NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);

    uint8_t d1[32], d2[32];
    EVP_DigestFinal_ex(e.g.md, d1, NULL);
    EVP_DigestFinal_ex(out, d2, NULL);
    EVP_MD_CTX_free(e.g.md);
    EVP_MD_CTX_free(out);
    getrusage(RUSAGE_SELF, &ru);
    double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    int same = CRYPTO_memcmp(d1, d2, sizeof d1) == 0;
    printf("stream_rss: %llu MiB, chunk %zu: encrypt %s, decrypt %s, output %s, %.2f s "
           "(%.0f MiB/s); max RSS %ld KiB (%ld KiB at start)\n",
           (unsigned long long)mib, cs ? cs : (size_t)KMS_STREAM_DEFAULT_CHUNK,
           p11kms_status_name(e.st), p11kms_status_name(st), same ? "matches" : "DIFFERS", s,
           (double)mib / s, ru.ru_maxrss, start_kib);
    return e.st == P11KMS_OK && st == P11KMS_OK && same && ru.ru_maxrss < 16 * 1024 ? 0 : 1;
}
