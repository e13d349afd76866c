/*
 * Fills a token with keys for the benchmark's many-keys runs (issue 11),
 * through the key store's own code, as CreateKey makes them:
 *
 *   bench/make_keys --config FILE --count N [--blobs OUT [--context KEY=VALUE]...]
 *
 * FILE is the p11kmsd configuration the benchmark starts the server with
 * (module, token, PIN: the PIN from its pin_file or $P11KMS_PIN, never an
 * argument; the database, made and given a root key when new). Keys are
 * added until the database holds N. With --blobs, each new
 * key also wraps 32 random bytes under the encryption context given (as
 * GenerateDataKey does: the first block of uses is the creating node's, so
 * no record is written for it), and OUT receives a line "KEY-ID BLOB" per
 * new key, the blob in base64 (a CiphertextBlob Decrypt takes). Prints one line:
 *   make_keys keys=10000 made=9000 seconds=81.2
 * Exits 0, 1 on any failure, 2 on a usage error.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/crypto.h>

#include "common/blob.h"
#include "common/buf.h"
#include "common/encoding.h"
#include "common/log.h"
#include "keystore/keystore.h"
#include "server/settings.h"

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

#define MAX_PAIRS 16

struct options {
    const char *config, *blobs;
    long count;
    struct kms_context_pair pairs[MAX_PAIRS];
    size_t npairs;
};

static int usage(void)
{
    fprintf(stderr, "usage: make_keys --config FILE --count N [--blobs OUT [--context K=V]...]\n");
    return 2;
}

/* Wraps 32 random bytes under the new key and writes "KEY-ID BLOB". */
static kms_err blob_for(struct kms_keystore *ks, const struct kms_key_info *key,
                        const struct kms_buf *context, FILE *out)
{
    uint8_t data_key[32];
    struct kms_buf blob = KMS_BUF_INIT, text = KMS_BUF_INIT;
    struct kms_key_info used = {0};
    kms_err rc = kms_keystore_random(ks, data_key, sizeof data_key);
    if (rc == KMS_OK)
        rc = kms_keystore_encrypt(ks, key->id_text, context, data_key, sizeof data_key, &blob,
                                  &used);
    OPENSSL_cleanse(data_key, sizeof data_key);
    if (rc == KMS_OK)
        rc = kms_b64_encode(blob.data, blob.len, &text);
    if (rc == KMS_OK && fprintf(out, "%s %.*s\n", key->id_text, (int)text.len, text.data) < 0)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot write the blobs");
    kms_key_info_clear(&used);
    kms_buf_free(&blob);
    kms_buf_free(&text);
    return rc;
}

static int fail(const char *what)
{
    fprintf(stderr, "make_keys: %s: %s\n", what, kms_err_message());
    return 1;
}

static int fill(const struct kms_config *cfg, struct options *o)
{
    size_t want = (size_t)o->count;
    struct kms_buf context = KMS_BUF_INIT;
    FILE *blobs = NULL;
    char *pin = NULL;
    size_t pin_len = 0, made = 0, have;
    struct kms_hsm *hsm = NULL;
    struct kms_store *store = NULL;
    struct kms_keystore *ks = NULL;
    double start = now_s();
    int rc = 1;

    if (kms_read_pin(cfg, 1, &pin, &pin_len) != KMS_OK)
        return fail("PIN");
    struct kms_hsm_config hc = {
        .module = cfg->module,
        .token = cfg->token,
        .pin = pin,
        .sessions = 1,
        .acquire_timeout_ms = 10000,
    };
    kms_err err = kms_hsm_open(&hc, &hsm);
    kms_free_secret(pin, pin_len + 1);
    if (err != KMS_OK)
        return fail("token");
    struct kms_keystore_config kc = cfg->keys;
    kc.region = cfg->region;
    kc.account = cfg->account;
    struct kms_store_config sc = kms_config_store(cfg, KMS_STORE_INIT);
    int made_root = 0;
    if (kms_store_open(&sc, &store) != KMS_OK ||
        kms_keystore_init_roots(hsm, store, &made_root) != KMS_OK) {
        rc = fail("database");
        goto out;
    }
    if (kms_keystore_open(hsm, store, &kc, &ks) != KMS_OK) {
        rc = fail("key store");
        goto out;
    }
    if (o->blobs && kms_context_canonical(o->pairs, o->npairs, &context) != KMS_OK) {
        rc = fail("--context");
        goto out;
    }
    if (o->blobs && !(blobs = fopen(o->blobs, "w"))) {
        perror(o->blobs);
        goto out;
    }
    for (have = kms_keystore_count(ks); have < want; have++, made++) {
        struct kms_key_info info = {0};
        err = kms_keystore_create_key(ks, "p11kms bench key", NULL, &info);
        if (err == KMS_OK && blobs)
            err = blob_for(ks, &info, &context, blobs);
        kms_key_info_clear(&info);
        if (err != KMS_OK) {
            rc = fail("CreateKey");
            goto out;
        }
    }
    if (blobs) {
        int bad = fclose(blobs) != 0;
        blobs = NULL;
        if (bad) {
            perror(o->blobs);
            goto out;
        }
    }
    printf("make_keys keys=%zu made=%zu seconds=%.1f\n", kms_keystore_count(ks), made,
           now_s() - start);
    rc = 0;
out:
    if (blobs)
        fclose(blobs);
    kms_buf_free(&context);
    kms_keystore_close(ks);
    kms_store_close(store);
    kms_hsm_close(hsm);
    return rc;
}

int main(int argc, char **argv)
{
    struct options o = {.count = -1};
    struct kms_config cfg;
    int rc;

    for (int i = 1; i + 1 < argc; i += 2) {
        const char *v = argv[i + 1];
        if (strcmp(argv[i], "--config") == 0) {
            o.config = v;
        } else if (strcmp(argv[i], "--count") == 0) {
            o.count = strtol(v, NULL, 10);
        } else if (strcmp(argv[i], "--blobs") == 0) {
            o.blobs = v;
        } else if (strcmp(argv[i], "--context") == 0 && strchr(v, '=') && o.npairs < MAX_PAIRS) {
            const char *eq = strchr(v, '=');
            o.pairs[o.npairs++] =
                (struct kms_context_pair){v, (size_t)(eq - v), eq + 1, strlen(eq + 1)};
        } else {
            return usage();
        }
    }
    if (!o.config || o.count < 0 || argc % 2 != 1)
        return usage();
    kms_config_defaults(&cfg);
    if (kms_config_load(&cfg, o.config) != KMS_OK) {
        rc = fail("configuration");
    } else {
        kms_log_set_level(KMS_LOG_WARN);
        rc = fill(&cfg, &o);
    }
    kms_config_free(&cfg);
    return rc;
}
