/*
 * Streaming envelopes (src/client/stream.c): the encryption rate and the
 * maximum RSS of a round trip.
 *
 *   bench/stream_rss [MiB] [chunk_size]     (default 1024 MiB, 65536)
 *
 * The input is a 1 MiB random pattern repeated (never stored whole). First
 * MiB mebibytes are encrypted under an injected data key into a writer that
 * only counts them (the time is the "encrypt alone" rate); then a thread
 * encrypts them again into a pipe while this thread decrypts from the pipe
 * and compares what comes out with the pattern. Prints both times, whether
 * the output matches and getrusage(RUSAGE_SELF).ru_maxrss, which covers both
 * threads. Exits 1 on a failure, a mismatch or when the RSS is 16 MiB or more.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
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

/* The input: this pattern over and over, so making it costs a memcpy. */
#define PATTERN_LEN (1u << 20)
static uint8_t pattern[PATTERN_LEN];

/* Copies the pattern at pos (mod its length) into buf: the stream's bytes there. */
static void pattern_at(uint64_t pos, uint8_t *buf, size_t n)
{
    while (n) {
        size_t off = (size_t)(pos % PATTERN_LEN), k = PATTERN_LEN - off < n ? PATTERN_LEN - off : n;
        memcpy(buf, pattern + off, k);
        buf += k;
        pos += k;
        n -= k;
    }
}

struct gen {
    uint64_t n, pos;
};

static p11kms_status gen_read(void *arg, uint8_t *buf, size_t cap, size_t *got)
{
    struct gen *g = arg;
    size_t k = g->n - g->pos < cap ? (size_t)(g->n - g->pos) : cap;
    pattern_at(g->pos, buf, k);
    g->pos += k;
    *got = k;
    return P11KMS_OK;
}

static p11kms_status null_write(void *arg, const uint8_t *buf, size_t n)
{
    (void)buf;
    *(uint64_t *)arg += n;
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

/* Compares what decryption writes with the pattern. */
struct check {
    uint64_t pos;
    int differs;
    uint8_t want[1 << 16];
};

static p11kms_status check_write(void *arg, const uint8_t *buf, size_t n)
{
    struct check *c = arg;
    while (n) {
        size_t k = n < sizeof c->want ? n : sizeof c->want;
        pattern_at(c->pos, c->want, k);
        c->differs |= CRYPTO_memcmp(buf, c->want, k) != 0;
        c->pos += k;
        buf += k;
        n -= k;
    }
    return P11KMS_OK;
}

static double seconds_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
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
    static struct check out;

    memset(key, 0x42, sizeof key);
    memset(blob, 0x17, sizeof blob);
    if (kms_stream_context_digest(NULL, 0, digest) != P11KMS_OK || pipe(fds) != 0 ||
        RAND_bytes(pattern, sizeof pattern) != 1)
        return 2;
    (void)fcntl(fds[0], F_SETPIPE_SZ, 1 << 20);
    getrusage(RUSAGE_SELF, &ru);
    long start_kib = ru.ru_maxrss;

    /* Encryption alone, into nothing. */
    struct timespec t0;
    struct gen g = {mib << 20, 0};
    struct p11kms_stream_options o = {cs, NULL, NULL};
    uint64_t written = 0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    p11kms_status alone = kms_stream_encrypt_with_key(key, NULL, NULL, blob, sizeof blob, digest,
                                                      &o, gen_read, &g, null_write, &written);
    double enc_s = seconds_since(&t0);

    /* The round trip: encryption in a thread into a pipe, decryption out of it, checked. */
    struct encryptor e = {{mib << 20, 0}, {cs, NULL, NULL}, fds[1], 0};
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_t th;
    if (pthread_create(&th, NULL, encrypt_thread, &e) != 0)
        return 2;
    p11kms_status st =
        kms_stream_decrypt_with_key(key, digest, NULL, fd_read, &fds[0], check_write, &out);
    close(fds[0]);
    pthread_join(th, NULL);
    double s = seconds_since(&t0);

    getrusage(RUSAGE_SELF, &ru);
    int same = !out.differs && out.pos == mib << 20;
    printf("stream_rss: %llu MiB, chunk %zu: encrypt %s, decrypt %s, output %s, %.2f s "
           "(%.0f MiB/s); encrypt alone %s, %.3f s (%.0f MiB/s, %llu bytes out); max RSS %ld KiB "
           "(%ld KiB at start)\n",
           (unsigned long long)mib, cs ? cs : (size_t)KMS_STREAM_DEFAULT_CHUNK,
           p11kms_status_name(e.st), p11kms_status_name(st), same ? "matches" : "DIFFERS", s,
           (double)mib / s, p11kms_status_name(alone), enc_s, (double)mib / enc_s,
           (unsigned long long)written, ru.ru_maxrss, start_kib);
    return alone == P11KMS_OK && e.st == P11KMS_OK && st == P11KMS_OK && same &&
                   ru.ru_maxrss < 16 * 1024
               ? 0
               : 1;
}
