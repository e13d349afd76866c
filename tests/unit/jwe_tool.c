/*
 * Seals and opens JWEs with src/client/jwe.c alone (no service), for
 * tests/integration/test_jwe_interop.py to check against python3-jwcrypto.
 *
 *   jwe_tool seal KEYHEX BLOBB64 ARN CTXJSON < payload > token
 *   jwe_tool seal-json KEYHEX BLOBB64 ARN CTXJSON < payload > token   (flattened)
 *   jwe_tool open KEYHEX [CTXJSON] < token > payload
 *   jwe_tool service KEY-ID N MAX-AGE-S CTXJSON < payload > tokens
 *
 * KEYHEX is the 32-byte data key in hex, BLOBB64 its blob in standard base64,
 * CTXJSON the encryption context as a JSON object of strings. open checks, when
 * CTXJSON is given, that it is the context in the header (as p11kms_open does).
 * On failure the status name goes to stderr and the exit status is 1 (2 for a
 * usage error); nothing goes to stdout.
 *
 * service goes through the public API to the service named by the environment
 * (P11KMS_ENDPOINT, AWS_*): p11kms_seal N times with the cache's max age set to
 * MAX-AGE-S (0: no cache), one token a line on stdout, then p11kms_open of
 * each, which must give the payload back; exit status 0 when all did.
 */
#include "config.h"

#include <jansson.h>
#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/encoding.h"

static int usage(void)
{
    fprintf(stderr, "usage: jwe_tool seal|seal-json KEYHEX BLOBB64 ARN CTXJSON < payload\n"
                    "       jwe_tool open KEYHEX [CTXJSON] < token\n"
                    "       jwe_tool service KEY-ID N MAX-AGE-S CTXJSON < payload\n");
    return 2;
}

static int fail(p11kms_status st)
{
    fprintf(stderr, "jwe_tool: %s: %s\n", p11kms_status_name(st), p11kms_last_error());
    return 1;
}

static int read_all(FILE *f, struct kms_buf *out)
{
    uint8_t chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof chunk, f)) > 0)
        if (kms_buf_append(out, chunk, n) != KMS_OK)
            return -1;
    return ferror(f) ? -1 : 0;
}

static int parse_key(const char *hex, uint8_t key[KMS_JWE_KEY_LEN])
{
    if (strlen(hex) != 2 * KMS_JWE_KEY_LEN)
        return -1;
    for (size_t i = 0; i < KMS_JWE_KEY_LEN; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1)
            return -1;
        key[i] = (uint8_t)v;
    }
    return 0;
}

/* The context pairs of a JSON object of strings; strings stay in *root. */
static int parse_ctx(const char *text, json_t **root, struct p11kms_context **ctx, size_t *n)
{
    json_error_t err;
    *root = json_loads(text, JSON_REJECT_DUPLICATES, &err);
    if (!json_is_object(*root))
        return -1;
    *n = json_object_size(*root);
    *ctx = calloc(*n ? *n : 1, sizeof **ctx);
    if (!*ctx)
        return -1;
    size_t i = 0;
    const char *k;
    json_t *v;
    json_object_foreach(*root, k, v)
    {
        if (!json_is_string(v))
            return -1;
        (*ctx)[i].key = k;
        (*ctx)[i].value = json_string_value(v);
        i++;
    }
    return 0;
}

static int seal(enum kms_jwe_form form, char **argv)
{
    uint8_t key[KMS_JWE_KEY_LEN];
    struct kms_buf blob = KMS_BUF_INIT, payload = KMS_BUF_INIT;
    json_t *root = NULL;
    struct p11kms_context *ctx = NULL;
    size_t nctx = 0;
    int rc = 2;
    if (parse_key(argv[0], key) != 0 || kms_b64_decode(argv[1], strlen(argv[1]), &blob) != KMS_OK ||
        parse_ctx(argv[3], &root, &ctx, &nctx) != 0 || read_all(stdin, &payload) != 0) {
        rc = usage();
        goto cleanup;
    }
    char *tok;
    size_t n;
    p11kms_status st = kms_jwe_seal(form, key, NULL, argv[2], blob.data, blob.len, ctx, nctx,
                                    payload.data, payload.len, &tok, &n);
    if (st != P11KMS_OK) {
        rc = fail(st);
        goto cleanup;
    }
    fwrite(tok, 1, n, stdout);
    p11kms_free(tok, n);
    rc = 0;
cleanup:
    OPENSSL_cleanse(key, sizeof key);
    kms_buf_free(&blob);
    kms_buf_free(&payload);
    free(ctx);
    json_decref(root);
    return rc;
}

static int open_token(char **argv, int argc)
{
    uint8_t key[KMS_JWE_KEY_LEN];
    struct kms_buf tok = KMS_BUF_INIT;
    struct kms_jwe j;
    json_t *root = NULL;
    struct p11kms_context *ctx = NULL;
    size_t nctx = 0;
    uint8_t *want = NULL, *have = NULL, *out = NULL;
    size_t want_len = 0, have_len = 0, n = 0;
    int rc = 2;
    memset(&j, 0, sizeof j);
    if (parse_key(argv[0], key) != 0 || (argc > 1 && parse_ctx(argv[1], &root, &ctx, &nctx)) ||
        read_all(stdin, &tok) != 0) {
        rc = usage();
        goto cleanup;
    }
    p11kms_status st = kms_jwe_parse((const char *)tok.data, tok.len, &j);
    if (st == P11KMS_OK && argc > 1) {
        st = kms_client_canonical(ctx, nctx, &want, &want_len);
        if (st == P11KMS_OK)
            st = kms_client_canonical(j.ctx, j.nctx, &have, &have_len);
        if (st == P11KMS_OK && (want_len != have_len || CRYPTO_memcmp(want, have, want_len) != 0))
            st = kms_client_fail(P11KMS_ERR_DECRYPT, "another encryption context");
    }
    if (st == P11KMS_OK)
        st = kms_jwe_decrypt(&j, key, sizeof key, &out, &n);
    if (st != P11KMS_OK) {
        rc = fail(st);
        goto cleanup;
    }
    fwrite(out, 1, n, stdout);
    rc = 0;
cleanup:
    OPENSSL_cleanse(key, sizeof key);
    p11kms_free(out, n);
    kms_jwe_clear(&j);
    kms_buf_free(&tok);
    free(want);
    free(have);
    free(ctx);
    json_decref(root);
    return rc;
}

static int service(char **argv)
{
    struct kms_buf payload = KMS_BUF_INIT;
    json_t *root = NULL;
    struct p11kms_context *ctx = NULL;
    size_t nctx = 0;
    char **toks = NULL;
    size_t *lens = NULL;
    long n = strtol(argv[1], NULL, 10);
    p11kms_client *c = NULL;
    int rc = 2;
    if (n <= 0 || n > 100000 || parse_ctx(argv[3], &root, &ctx, &nctx) != 0 ||
        read_all(stdin, &payload) != 0 || !(toks = calloc((size_t)n, sizeof *toks)) ||
        !(lens = calloc((size_t)n, sizeof *lens))) {
        rc = usage();
        goto cleanup;
    }
    struct p11kms_options o;
    p11kms_options_init(&o);
    o.cache_max_age_s = (unsigned)strtoul(argv[2], NULL, 10);
    p11kms_status st = p11kms_client_new(&o, &c);
    for (long i = 0; st == P11KMS_OK && i < n; i++) {
        st = p11kms_seal(c, argv[0], ctx, nctx, payload.data, payload.len, &toks[i], &lens[i]);
        if (st == P11KMS_OK)
            printf("%s\n", toks[i]);
    }
    for (long i = 0; st == P11KMS_OK && i < n; i++) {
        uint8_t *out;
        size_t len;
        st = p11kms_open(c, toks[i], lens[i], ctx, nctx, &out, &len);
        if (st == P11KMS_OK && (len != payload.len || (len && memcmp(out, payload.data, len))))
            st = kms_client_fail(P11KMS_ERR_DECRYPT, "token %ld opened to another payload", i);
        if (st == P11KMS_OK)
            p11kms_free(out, len);
    }
    rc = st == P11KMS_OK ? 0 : fail(st);
cleanup:
    for (long i = 0; toks && i < n; i++)
        p11kms_free(toks[i], lens[i]);
    free(toks);
    free(lens);
    p11kms_client_free(c);
    kms_buf_free(&payload);
    free(ctx);
    json_decref(root);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc == 6 && strcmp(argv[1], "seal") == 0)
        return seal(KMS_JWE_COMPACT, argv + 2);
    if (argc == 6 && strcmp(argv[1], "seal-json") == 0)
        return seal(KMS_JWE_FLATTENED, argv + 2);
    if ((argc == 3 || argc == 4) && strcmp(argv[1], "open") == 0)
        return open_token(argv + 2, argc - 2);
    if (argc == 6 && strcmp(argv[1], "service") == 0)
        return service(argv + 2);
    return usage();
}
