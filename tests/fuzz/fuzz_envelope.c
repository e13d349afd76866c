/*
 * libFuzzer target: envelopes to public keys (src/client/recipient.c,
 * jwe_pk.c, jwk.c, cms.c): p11kms_envelope_open of any input with a fixed
 * local P-256 private key and no client, so JWE (compact and JSON, every
 * alg's parser) and CMS (DER, BER and PEM through OpenSSL's CMS API) are
 * read and, for the seeds sealed to this key (make-envelope-seeds.sh),
 * opened. Fails closed: nothing comes out of a failed open.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <p11kms.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A test key made for the corpus (tests/fuzz/make-envelope-seeds.sh); it protects nothing. */
static const char KEY[] = "-----BEGIN PRIVATE KEY-----\n"
                          "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgOdeH8t6c6Dx+NUtH\n"
                          "cs/Rzl7bzpmCoTTS9bThBtWX8UGhRANCAASQycT+nVt4jtfu2gf6ko6n0P16kM1x\n"
                          "jWOfrYXJKHOV69qgN8aztXAPyT27Fqvb1d3jla81P2UqFtEaLJwjtMWf\n"
                          "-----END PRIVATE KEY-----\n";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct p11kms_opener o;
    uint8_t *out = NULL;
    size_t out_len = 0;

    memset(&o, 0, sizeof o);
    o.private_key = (const uint8_t *)KEY;
    o.private_key_len = sizeof KEY - 1;
    if (p11kms_envelope_open(&o, data, size, &out, &out_len) == P11KMS_OK)
        p11kms_free(out, out_len);
    else if (out != NULL || out_len != 0)
        abort(); /* fail closed */
    return 0;
}
