/*
 * JWKs (RFC 7517, 7518 §6, 8037) to and from EVP_PKEYs. Stub: filled in by
 * the JWE-to-public-keys work.
 */
#include "config.h"

#include "client/internal.h"

p11kms_status kms_jwk_to_pkey(const uint8_t *p, size_t n, int want_private, EVP_PKEY **out,
                              char **kid)
{
    (void)p, (void)n, (void)want_private;
    *out = NULL;
    if (kid)
        *kid = NULL;
    return kms_client_fail(P11KMS_ERR_UNSUPPORTED, "JWKs are not supported yet");
}

p11kms_status kms_jwk_from_public(EVP_PKEY *pkey, json_t **out)
{
    (void)pkey;
    *out = NULL;
    return kms_client_fail(P11KMS_ERR_UNSUPPORTED, "JWKs are not supported yet");
}
