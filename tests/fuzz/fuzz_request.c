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

    const char *s;
    long v;
    int present;
    struct kms_buf blob = KMS_BUF_INIT, ctx = KMS_BUF_INIT;

    (void)kms_in_string(in, "KeyId", 1, 1, 2048, &s);
    (void)kms_in_string(in, "DestinationKeyId", 0, 1, 2048, &s);
    (void)kms_in_string(in, "AliasName", 1, 1, 256, &s);
    (void)kms_in_string(in, "Description", 0, 0, 8192, &s);
    (void)kms_in_string(in, "Policy", 0, 1, 32768, &s);
    (void)kms_in_string(in, "KeySpec", 0, 1, 64, &s);
    (void)kms_in_string(in, "Marker", 0, 1, 1024, &s);
    (void)kms_in_int(in, "NumberOfBytes", 1, 1024, &v, &present);
    (void)kms_in_int(in, "Limit", 1, 1000, &v, &present);
    (void)kms_in_int(in, "PendingWindowInDays", 7, 30, &v, &present);
    if (kms_in_blob(in, "CiphertextBlob", 1, 1, 6144, &blob, &present) == KMS_OK && present &&
        (blob.len < 1 || blob.len > 6144))
        abort();
    kms_buf_free(&blob);
    (void)kms_in_blob(in, "Plaintext", 1, 1, 4096, &blob, &present);
    kms_buf_free(&blob);
    if (kms_in_context(in, &ctx) == KMS_OK && ctx.len < 4)
        abort();
    kms_buf_free(&ctx);
    (void)kms_in_grant_tokens(in);
    (void)kms_in_algorithm(in);
    json_decref(in);
    return 0;
}
