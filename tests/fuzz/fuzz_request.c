/*
 * libFuzzer target: the operations' request decoders (src/server/ops_util.c).
 * The input is a request body; it is parsed as http.c parses one (jansson,
 * duplicate keys refused, the cleansing allocator p11kmsd installs) and, when
 * it is an object, every kms_in_* helper is called on it with the members and
 * bounds the operations use.
 */
#include "config.h"

#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/json_alloc.h"
#include "common/keyspec.h"
#include "server/server.h"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    kms_json_use_cleansing_alloc(); /* as p11kmsd's main does, once per process */
    return 0;
}

/* A decoded member always honours the bounds it was decoded with. */
static void string_in(json_t *in, const char *name, int required, size_t min, size_t max)
{
    const char *s = NULL;
    if (kms_in_string(in, name, required, min, max, &s) != KMS_OK)
        return;
    if ((required && !s) || (s && (strlen(s) < min || strlen(s) > max)))
        abort();
}

static void int_in(json_t *in, const char *name, long min, long max)
{
    long v = 0;
    int present = 0;
    if (kms_in_int(in, name, min, max, &v, &present) == KMS_OK && present && (v < min || v > max))
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t jerr;
    json_t *in = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &jerr);
    if (!in)
        return 0;
    if (!json_is_object(in)) {
        json_decref(in);
        return 0;
    }

    struct kms_buf blob = KMS_BUF_INIT, ctx = KMS_BUF_INIT;

    string_in(in, "KeyId", 1, 1, 2048);
    string_in(in, "DestinationKeyId", 0, 1, 2048);
    string_in(in, "AliasName", 1, 1, 256);
    string_in(in, "Description", 0, 0, 8192);
    string_in(in, "Policy", 0, 1, 32768);
    string_in(in, "KeySpec", 0, 1, 64);
    string_in(in, "Marker", 0, 1, 1024);
    int_in(in, "NumberOfBytes", 1, 1024);
    int_in(in, "Limit", 1, 1000);
    int_in(in, "PendingWindowInDays", 7, 30);
    int present;
    if (kms_in_blob(in, "CiphertextBlob", 1, 1, 6144, &blob, &present) == KMS_OK && present &&
        (blob.len < 1 || blob.len > 6144))
        abort();
    kms_buf_free(&blob);
    if (kms_in_blob(in, "Plaintext", 1, 1, 4096, &blob, &present) == KMS_OK && present &&
        (blob.len < 1 || blob.len > 4096))
        abort();
    kms_buf_free(&blob);
    if (kms_in_context(in, "EncryptionContext", &ctx) == KMS_OK && ctx.len < 4)
        abort();
    kms_buf_free(&ctx);
    /* Accepted or refused: both are outcomes; only a crash or leak is a fault. */
    (void)!kms_in_grant_tokens(in);
    (void)!kms_in_algorithm(in);
    /* The algorithm members of asymmetric and HMAC keys: a decoded one is of its usage. */
    static const struct {
        const char *name;
        int usage;
    } algs[] = {{"EncryptionAlgorithm", KMS_USAGE_ENCRYPT_DECRYPT},
                {"SigningAlgorithm", KMS_USAGE_SIGN_VERIFY},
                {"MacAlgorithm", KMS_USAGE_GENERATE_VERIFY_MAC},
                {"KeyAgreementAlgorithm", KMS_USAGE_KEY_AGREEMENT}};
    for (size_t i = 0; i < sizeof algs / sizeof algs[0]; i++) {
        int alg = -2;
        if (kms_in_enum_alg(in, algs[i].name, 0, algs[i].usage, &alg) == KMS_OK && alg != -1 &&
            (!kms_alg(alg) || kms_alg(alg)->usage != (enum kms_key_usage)algs[i].usage))
            abort();
    }
    if (kms_in_blob(in, "Message", 1, 1, 4096, &blob, &present) == KMS_OK && present &&
        (blob.len < 1 || blob.len > 4096))
        abort();
    kms_buf_free(&blob);
    json_decref(in);
    return 0;
}
