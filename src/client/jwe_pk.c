/*
 * JWE to public keys (RFC 7516, 7518 §4.3 and §4.6). Stub.
 */
#include "config.h"

#include "client/internal.h"

p11kms_status kms_jwe_pk_seal(int json, p11kms_recipient *const *r, size_t nr, const uint8_t *pt,
                              size_t n, uint8_t **out, size_t *out_len)
{
    (void)json, (void)r, (void)nr, (void)pt, (void)n, (void)out, (void)out_len;
    return kms_client_fail(P11KMS_ERR_UNSUPPORTED, "JWE to public keys is not supported yet");
}

p11kms_status kms_jwe_pk_open(const struct p11kms_opener *o, const uint8_t *in, size_t n,
                              uint8_t **out, size_t *out_len)
{
    /* Until the public-key algorithms land, "dir" only: p11kms_open's own JWE. */
    if (!o->client)
        return kms_client_fail(P11KMS_ERR_UNSUPPORTED, "JWE to public keys is not supported yet");
    return p11kms_open(o->client, (const char *)in, n, o->context, o->n_context, out, out_len);
}
