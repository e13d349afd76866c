/*
 * libFuzzer target: the client's JWE parser (compact and flattened JSON
 * serializations) and AES-256-GCM open under a fixed data key
 * (src/client/jwe.c: kms_jwe_parse, kms_jwe_decrypt). The key is the one of
 * the vector in tests/unit/test_jwe.c (bytes 0x00 ... 0x1f), so the seed
 * opens and mutations of it reach the tag check.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    uint8_t key[KMS_JWE_KEY_LEN];
    struct kms_jwe j;
    uint8_t *out = NULL;
    size_t out_len = 0;

    for (size_t i = 0; i < sizeof key; i++)
        key[i] = (uint8_t)i;
    if (kms_jwe_parse((const char *)data, size, &j) != P11KMS_OK)
        return 0;
    if (kms_jwe_decrypt(&j, key, sizeof key, &out, &out_len) == P11KMS_OK) {
        if (out_len != j.ciphertext_len)
            abort();
        p11kms_free(out, out_len);
    } else if (out != NULL) {
        abort(); /* fail closed: no plaintext handed out on a bad tag */
    }
    kms_jwe_clear(&j);
    return 0;
}
