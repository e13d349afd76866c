/*
 * Asymmetric and HMAC keys: their versions' private-key operations in the
 * token, their public keys from the stored version.
 */
#include "config.h"

#include "common/keyspec.h"
#include "keystore/internal.h"

kms_err kms_keystore_create_key_as(struct kms_keystore *ks, const char *description,
                                   const char *policy, int spec, int usage,
                                   struct kms_key_info *out)
{
    if (spec == KMS_SPEC_SYMMETRIC_DEFAULT && usage == KMS_USAGE_ENCRYPT_DECRYPT)
        return kms_keystore_create_key(ks, description, policy, out);
    return KMS_FAIL(KMS_ERR_UNSUPPORTED, "not yet");
}

kms_err kms_keystore_public_key(struct kms_keystore *ks, struct kms_key_ref *key,
                                struct kms_buf *spki, struct kms_key_info *info)
{
    (void)ks, (void)key, (void)spki, (void)info;
    return KMS_FAIL(KMS_ERR_UNSUPPORTED, "not yet");
}

kms_err kms_keystore_sign(struct kms_keystore *ks, struct kms_key_ref *key, int alg,
                          const uint8_t *in, size_t n, uint8_t *sig, size_t *sig_len,
                          struct kms_key_info *info)
{
    (void)ks, (void)key, (void)alg, (void)in, (void)n, (void)sig, (void)sig_len, (void)info;
    return KMS_FAIL(KMS_ERR_UNSUPPORTED, "not yet");
}

kms_err kms_keystore_oaep_decrypt(struct kms_keystore *ks, struct kms_key_ref *key, int alg,
                                  const uint8_t *ct, size_t n, struct kms_buf *pt,
                                  struct kms_key_info *info)
{
    (void)ks, (void)key, (void)alg, (void)ct, (void)n, (void)pt, (void)info;
    return KMS_FAIL(KMS_ERR_UNSUPPORTED, "not yet");
}

kms_err kms_keystore_derive(struct kms_keystore *ks, struct kms_key_ref *key, const uint8_t *peer,
                            size_t n, struct kms_buf *secret, struct kms_key_info *info)
{
    (void)ks, (void)key, (void)peer, (void)n, (void)secret, (void)info;
    return KMS_FAIL(KMS_ERR_UNSUPPORTED, "not yet");
}
