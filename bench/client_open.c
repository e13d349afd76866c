/*
 * libp11kms's cache-hit open against its raw bound (issue 11).
 *
 *   . STATE/env; bench/client_open [--key KEY-ID] [--seconds S] [--size BYTES]
 *
 * With the endpoint and credentials from the environment (as `. STATE/env` of
 * `p11kmsd --dev` sets them), a client with the data-key cache on seals one
 * payload (--size, default 1024 random bytes) as a compact JWE under a data
 * key of --key (default alias/dev) with a context, opens it once (a miss: one
 * Decrypt on the server), then opens it again and again for --seconds
 * (default 3): every one a cache hit. The raw bound, in the same process and
 * for as long: OpenSSL's base64 decoder (EVP_DecodeBlock) on the ciphertext
 * in base64 (as long as the JWE's segment, with padding), then EVP AES-256-GCM
 * decrypt (key schedule, 12-byte IV, AAD as long as the
 * JWE's protected header, tag check) into a fixed buffer. Both check the
 * plaintext at the end. The library has no cache statistics, so the server's
 * p11kms_requests_total{operation="Decrypt",outcome="ok"} (GET /metrics) must
 * have grown by exactly 1 over the run: p11kmsd serving nobody else (the
 * bearer token /metrics needs in $P11KMS_METRICS_TOKEN). Prints
 *   client_open_hit bytes=1024 ops=... seconds=3.00 ops_per_s=...
 *   raw_evp_b64 bytes=1024 ops=... seconds=3.00 ops_per_s=...
 *   ratio=0.42 (hit / raw)
 * Exits 0, 1 on any failure, 2 on a usage error.
 */
#include "config.h"

#include <curl/curl.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <p11kms.h>

#define MAX_PAYLOAD 65536
#define DECRYPTS "p11kms_requests_total{operation=\"Decrypt\",outcome=\"ok\"} "

struct opts {
    const char *key_id;
    double seconds;
    size_t size;
};

struct result {
    uint64_t ops;
    double seconds;
};

static const struct p11kms_context ctx[] = {{"purpose", "bench"}, {"program", "client_open"}};
static uint8_t payload[MAX_PAYLOAD];

static int fail(const char *what, const char *why)
{
    fprintf(stderr, "client_open: %s: %s\n", what, why);
    return -1;
}

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void report(const char *name, size_t size, struct result r)
{
    printf("%s bytes=%zu ops=%llu seconds=%.2f ops_per_s=%.0f\n", name, size,
           (unsigned long long)r.ops, r.seconds, (double)r.ops / r.seconds);
    fflush(stdout);
}

/* ---- the server's Decrypt count --------------------------------------------- */

struct text {
    char *p;
    size_t n;
};

static size_t gather(char *p, size_t size, size_t nmemb, void *arg)
{
    struct text *t = arg;
    char *q = realloc(t->p, t->n + size * nmemb + 1);
    if (!q)
        return 0;
    memcpy(q + t->n, p, size * nmemb);
    t->p = q;
    t->n += size * nmemb;
    t->p[t->n] = '\0';
    return size * nmemb;
}

/* Decrypts the server answered, from GET /metrics; -1 when it cannot be read. */
static long long server_decrypts(void)
{
    const char *ep =
        getenv("P11KMS_ENDPOINT") ? getenv("P11KMS_ENDPOINT") : getenv("AWS_ENDPOINT_URL");
    char url[512];
    const char *token = getenv("P11KMS_METRICS_TOKEN");
    char bearer[512];
    struct text t = {NULL, 0};
    struct curl_slist *headers = NULL;
    long long n = -1;
    CURL *h = curl_easy_init();
    if (!h || !ep || snprintf(url, sizeof url, "%s/metrics", ep) >= (int)sizeof url)
        goto cleanup;
    if (token &&
        snprintf(bearer, sizeof bearer, "Authorization: Bearer %s", token) < (int)sizeof bearer) {
        headers = curl_slist_append(NULL, bearer);
        curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
    }
    curl_easy_setopt(h, CURLOPT_URL, url);
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, 5000L);
    curl_easy_setopt(h, CURLOPT_FAILONERROR, 1L);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, gather);
    curl_easy_setopt(h, CURLOPT_WRITEDATA, &t);
    if (curl_easy_perform(h) != CURLE_OK || !t.p)
        goto cleanup;
    const char *line = strstr(t.p, DECRYPTS);
    n = line ? strtoll(line + sizeof DECRYPTS - 1, NULL, 10) : 0;
cleanup:
    free(t.p);
    curl_slist_free_all(headers);
    curl_easy_cleanup(h);
    return n;
}

/* ---- libp11kms ---------------------------------------------------------------- */

static int open_checked(p11kms_client *c, const char *jwe, size_t len, size_t size)
{
    uint8_t *out = NULL;
    size_t n = 0;
    p11kms_status st = p11kms_open(c, jwe, len, ctx, 2, &out, &n);
    int ok = st == P11KMS_OK && n == size && memcmp(out, payload, n) == 0;
    p11kms_free(out, n);
    return ok ? 0 : fail("open", st == P11KMS_OK ? "the plaintext differs" : p11kms_last_error());
}

static int time_opens(p11kms_client *c, const char *jwe, size_t len, const struct opts *o,
                      struct result *r)
{
    double t0 = now_s(), t = t0;
    r->ops = 0;
    while (t - t0 < o->seconds) {
        uint8_t *out = NULL;
        size_t n = 0;
        if (p11kms_open(c, jwe, len, ctx, 2, &out, &n) != P11KMS_OK)
            return fail("open", p11kms_last_error());
        p11kms_free(out, n);
        r->ops++;
        t = now_s();
    }
    r->seconds = t - t0;
    return open_checked(c, jwe, len, o->size);
}

static int bench_client(const struct opts *o, char **jwe, size_t *len, struct result *r)
{
    struct p11kms_options po;
    p11kms_client *c = NULL;
    int rc = -1;

    p11kms_options_init(&po);
    po.cache_max_age_s = 3600;
    if (p11kms_client_new(&po, &c) != P11KMS_OK) {
        fail("client", p11kms_last_error());
        goto cleanup;
    }
    if (p11kms_seal(c, o->key_id, ctx, 2, payload, o->size, jwe, len) != P11KMS_OK) {
        fail("seal", p11kms_last_error());
        goto cleanup;
    }
    long long before = server_decrypts();
    if (open_checked(c, *jwe, *len, o->size) != 0 || time_opens(c, *jwe, *len, o, r) != 0)
        goto cleanup;
    long long after = server_decrypts();
    if (before < 0 || after < 0)
        fprintf(stderr, "client_open: cannot read the server's /metrics: cache hits unchecked\n");
    else if (after - before != 1) {
        fail("open", "the server answered other than exactly one Decrypt: not all cache hits");
        goto cleanup;
    }
    rc = 0;
cleanup:
    p11kms_client_free(c);
    return rc;
}

/* ---- the raw bound ------------------------------------------------------------ */

struct raw {
    uint8_t key[32], iv[12], tag[16], ct[MAX_PAYLOAD + 4], pt[MAX_PAYLOAD];
    char aad[8192], ct64[MAX_PAYLOAD / 3 * 4 + 8];
    size_t aad_len, ct64_len;
};

/* What one open must do at the least: decode the ciphertext, decrypt it, check the tag. */
static int raw_open(EVP_CIPHER_CTX *e, struct raw *x, size_t size)
{
    int len;
    /* With its padding the decoder gives up to two bytes more. */
    int n = EVP_DecodeBlock(x->ct, (const uint8_t *)x->ct64, (int)x->ct64_len);
    return n >= (int)size && n <= (int)size + 2 &&
                   EVP_DecryptInit_ex(e, NULL, NULL, x->key, x->iv) == 1 &&
                   EVP_DecryptUpdate(e, NULL, &len, (uint8_t *)x->aad, (int)x->aad_len) == 1 &&
                   EVP_DecryptUpdate(e, x->pt, &len, x->ct, (int)size) == 1 &&
                   EVP_CIPHER_CTX_ctrl(e, EVP_CTRL_GCM_SET_TAG, 16, x->tag) == 1 &&
                   EVP_DecryptFinal_ex(e, x->pt + size, &len) == 1
               ? 0
               : -1;
}

/* x->aad and x->ct64 as long as the JWE's protected header and ciphertext segments. */
static int raw_prepare(EVP_CIPHER_CTX *e, struct raw *x, const char *jwe, size_t size)
{
    const char *dot[4] = {strchr(jwe, '.')};
    for (int i = 1; i < 4; i++)
        dot[i] = dot[i - 1] ? strchr(dot[i - 1] + 1, '.') : NULL;
    if (!dot[3] || (size_t)(dot[0] - jwe) >= sizeof x->aad)
        return fail("raw", "the JWE is not in compact form");
    x->aad_len = (size_t)(dot[0] - jwe);
    memset(x->aad, 'e', x->aad_len);
    int len;
    if (RAND_bytes(x->key, sizeof x->key) != 1 || RAND_bytes(x->iv, sizeof x->iv) != 1 ||
        EVP_EncryptInit_ex(e, EVP_aes_256_gcm(), NULL, x->key, x->iv) != 1 ||
        EVP_EncryptUpdate(e, NULL, &len, (uint8_t *)x->aad, (int)x->aad_len) != 1 ||
        EVP_EncryptUpdate(e, x->ct, &len, payload, (int)size) != 1 ||
        EVP_EncryptFinal_ex(e, x->ct + size, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(e, EVP_CTRL_GCM_GET_TAG, 16, x->tag) != 1 ||
        EVP_DecryptInit_ex(e, EVP_aes_256_gcm(), NULL, NULL, NULL) != 1)
        return fail("raw", "AES-256-GCM failed");
    x->ct64_len = (size_t)EVP_EncodeBlock((uint8_t *)x->ct64, x->ct, (int)size);
    size_t unpadded = x->ct64_len;
    while (unpadded && x->ct64[unpadded - 1] == '=')
        unpadded--;
    if (unpadded != (size_t)(dot[3] - dot[2] - 1))
        return fail("raw", "the ciphertext segment is not as long as the JWE's");
    return 0;
}

static int bench_raw(const char *jwe, size_t size, double seconds, struct result *r)
{
    static struct raw x;
    EVP_CIPHER_CTX *e = EVP_CIPHER_CTX_new();
    int rc = e ? raw_prepare(e, &x, jwe, size) : fail("raw", "out of memory");
    double t0 = now_s(), t = t0;
    for (r->ops = 0; rc == 0 && t - t0 < seconds; r->ops++, t = now_s())
        if (raw_open(e, &x, size) != 0)
            rc = fail("raw", "the tag does not verify");
    r->seconds = t - t0;
    if (rc == 0 && memcmp(x.pt, payload, size) != 0)
        rc = fail("raw", "the plaintext differs");
    EVP_CIPHER_CTX_free(e);
    return rc;
}

/* ---- main --------------------------------------------------------------------- */

static int parse(int argc, char **argv, struct opts *o)
{
    *o = (struct opts){"alias/dev", 3.0, 1024};
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--key") == 0)
            o->key_id = argv[i + 1];
        else if (strcmp(argv[i], "--seconds") == 0)
            o->seconds = strtod(argv[i + 1], NULL);
        else if (strcmp(argv[i], "--size") == 0)
            o->size = strtoul(argv[i + 1], NULL, 10);
        else
            return -1;
    }
    return argc % 2 == 1 && o->seconds > 0 && o->size >= 1 && o->size <= MAX_PAYLOAD ? 0 : -1;
}

int main(int argc, char **argv)
{
    struct opts o;
    struct result hit, raw;
    char *jwe = NULL;
    size_t len = 0;
    int rc = 1;

    if (parse(argc, argv, &o) != 0) {
        fprintf(stderr, "usage: client_open [--key KEY-ID] [--seconds S] [--size BYTES]\n");
        return 2;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK || RAND_bytes(payload, (int)o.size) != 1)
        return 1;
    if (bench_client(&o, &jwe, &len, &hit) == 0 && bench_raw(jwe, o.size, o.seconds, &raw) == 0) {
        report("client_open_hit", o.size, hit);
        report("raw_evp_b64", o.size, raw);
        printf("ratio=%.3f (hit / raw)\n",
               ((double)hit.ops / hit.seconds) / ((double)raw.ops / raw.seconds));
        rc = 0;
    }
    p11kms_free(jwe, len);
    curl_global_cleanup();
    return rc;
}
