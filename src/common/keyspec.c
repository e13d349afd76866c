/* The tables of keyspec.h. */
#include "config.h"

#include "common/keyspec.h"

#include <openssl/obj_mac.h>
#include <string.h>

#define ENC KMS_USAGE_BIT(KMS_USAGE_ENCRYPT_DECRYPT)
#define SIGN KMS_USAGE_BIT(KMS_USAGE_SIGN_VERIFY)
#define MAC KMS_USAGE_BIT(KMS_USAGE_GENERATE_VERIFY_MAC)
#define AGREE KMS_USAGE_BIT(KMS_USAGE_KEY_AGREEMENT)

static const struct kms_spec_info specs[KMS_SPEC_COUNT] = {
    [KMS_SPEC_SYMMETRIC_DEFAULT] = {"SYMMETRIC_DEFAULT", KMS_KIND_AES, 256, NID_undef, ENC},
    [KMS_SPEC_RSA_2048] = {"RSA_2048", KMS_KIND_RSA, 2048, NID_undef, ENC | SIGN},
    [KMS_SPEC_RSA_3072] = {"RSA_3072", KMS_KIND_RSA, 3072, NID_undef, ENC | SIGN},
    [KMS_SPEC_RSA_4096] = {"RSA_4096", KMS_KIND_RSA, 4096, NID_undef, ENC | SIGN},
    [KMS_SPEC_ECC_NIST_P256] = {"ECC_NIST_P256", KMS_KIND_EC, 256, NID_X9_62_prime256v1,
                                SIGN | AGREE},
    [KMS_SPEC_ECC_NIST_P384] = {"ECC_NIST_P384", KMS_KIND_EC, 384, NID_secp384r1, SIGN | AGREE},
    [KMS_SPEC_ECC_NIST_P521] = {"ECC_NIST_P521", KMS_KIND_EC, 521, NID_secp521r1, SIGN | AGREE},
    [KMS_SPEC_ECC_NIST_EDWARDS25519] = {"ECC_NIST_EDWARDS25519", KMS_KIND_EDWARDS, 255, NID_ED25519,
                                        SIGN},
    [KMS_SPEC_X25519] = {"X25519", KMS_KIND_MONTGOMERY, 255, NID_X25519, AGREE},
    [KMS_SPEC_HMAC_224] = {"HMAC_224", KMS_KIND_HMAC, 224, NID_sha224, MAC},
    [KMS_SPEC_HMAC_256] = {"HMAC_256", KMS_KIND_HMAC, 256, NID_sha256, MAC},
    [KMS_SPEC_HMAC_384] = {"HMAC_384", KMS_KIND_HMAC, 384, NID_sha384, MAC},
    [KMS_SPEC_HMAC_512] = {"HMAC_512", KMS_KIND_HMAC, 512, NID_sha512, MAC},
};

static const char *const usages[KMS_USAGE_COUNT] = {
    [KMS_USAGE_ENCRYPT_DECRYPT] = "ENCRYPT_DECRYPT",
    [KMS_USAGE_SIGN_VERIFY] = "SIGN_VERIFY",
    [KMS_USAGE_GENERATE_VERIFY_MAC] = "GENERATE_VERIFY_MAC",
    [KMS_USAGE_KEY_AGREEMENT] = "KEY_AGREEMENT",
};

static const struct kms_alg_info algs[KMS_ALG_COUNT] = {
    [KMS_ALG_SYMMETRIC_DEFAULT] = {"SYMMETRIC_DEFAULT", KMS_USAGE_ENCRYPT_DECRYPT, KMS_SCHEME_GCM,
                                   NID_undef, 0},
    [KMS_ALG_RSAES_OAEP_SHA_1] = {"RSAES_OAEP_SHA_1", KMS_USAGE_ENCRYPT_DECRYPT, KMS_SCHEME_OAEP,
                                  NID_sha1, 20},
    [KMS_ALG_RSAES_OAEP_SHA_256] = {"RSAES_OAEP_SHA_256", KMS_USAGE_ENCRYPT_DECRYPT,
                                    KMS_SCHEME_OAEP, NID_sha256, 32},
    [KMS_ALG_RSASSA_PSS_SHA_256] = {"RSASSA_PSS_SHA_256", KMS_USAGE_SIGN_VERIFY, KMS_SCHEME_PSS,
                                    NID_sha256, 32},
    [KMS_ALG_RSASSA_PSS_SHA_384] = {"RSASSA_PSS_SHA_384", KMS_USAGE_SIGN_VERIFY, KMS_SCHEME_PSS,
                                    NID_sha384, 48},
    [KMS_ALG_RSASSA_PSS_SHA_512] = {"RSASSA_PSS_SHA_512", KMS_USAGE_SIGN_VERIFY, KMS_SCHEME_PSS,
                                    NID_sha512, 64},
    [KMS_ALG_RSASSA_PKCS1_V1_5_SHA_256] = {"RSASSA_PKCS1_V1_5_SHA_256", KMS_USAGE_SIGN_VERIFY,
                                           KMS_SCHEME_PKCS1, NID_sha256, 32},
    [KMS_ALG_RSASSA_PKCS1_V1_5_SHA_384] = {"RSASSA_PKCS1_V1_5_SHA_384", KMS_USAGE_SIGN_VERIFY,
                                           KMS_SCHEME_PKCS1, NID_sha384, 48},
    [KMS_ALG_RSASSA_PKCS1_V1_5_SHA_512] = {"RSASSA_PKCS1_V1_5_SHA_512", KMS_USAGE_SIGN_VERIFY,
                                           KMS_SCHEME_PKCS1, NID_sha512, 64},
    [KMS_ALG_ECDSA_SHA_256] = {"ECDSA_SHA_256", KMS_USAGE_SIGN_VERIFY, KMS_SCHEME_ECDSA, NID_sha256,
                               32},
    [KMS_ALG_ECDSA_SHA_384] = {"ECDSA_SHA_384", KMS_USAGE_SIGN_VERIFY, KMS_SCHEME_ECDSA, NID_sha384,
                               48},
    [KMS_ALG_ECDSA_SHA_512] = {"ECDSA_SHA_512", KMS_USAGE_SIGN_VERIFY, KMS_SCHEME_ECDSA, NID_sha512,
                               64},
    [KMS_ALG_ED25519_SHA_512] = {"ED25519_SHA_512", KMS_USAGE_SIGN_VERIFY, KMS_SCHEME_EDDSA,
                                 NID_undef, 0},
    [KMS_ALG_HMAC_SHA_224] = {"HMAC_SHA_224", KMS_USAGE_GENERATE_VERIFY_MAC, KMS_SCHEME_HMAC,
                              NID_sha224, 28},
    [KMS_ALG_HMAC_SHA_256] = {"HMAC_SHA_256", KMS_USAGE_GENERATE_VERIFY_MAC, KMS_SCHEME_HMAC,
                              NID_sha256, 32},
    [KMS_ALG_HMAC_SHA_384] = {"HMAC_SHA_384", KMS_USAGE_GENERATE_VERIFY_MAC, KMS_SCHEME_HMAC,
                              NID_sha384, 48},
    [KMS_ALG_HMAC_SHA_512] = {"HMAC_SHA_512", KMS_USAGE_GENERATE_VERIFY_MAC, KMS_SCHEME_HMAC,
                              NID_sha512, 64},
    [KMS_ALG_ECDH] = {"ECDH", KMS_USAGE_KEY_AGREEMENT, KMS_SCHEME_ECDH, NID_undef, 0},
};

const struct kms_spec_info *kms_spec(int spec)
{
    return spec >= 0 && spec < KMS_SPEC_COUNT ? &specs[spec] : NULL;
}

const struct kms_alg_info *kms_alg(int alg)
{
    return alg >= 0 && alg < KMS_ALG_COUNT ? &algs[alg] : NULL;
}

int kms_spec_by_name(const char *name)
{
    for (int i = 0; name && i < KMS_SPEC_COUNT; i++)
        if (strcmp(specs[i].name, name) == 0)
            return i;
    return -1;
}

int kms_usage_by_name(const char *name)
{
    for (int i = 0; name && i < KMS_USAGE_COUNT; i++)
        if (strcmp(usages[i], name) == 0)
            return i;
    return -1;
}

int kms_alg_by_name(const char *name)
{
    for (int i = 0; name && i < KMS_ALG_COUNT; i++)
        if (strcmp(algs[i].name, name) == 0)
            return i;
    return -1;
}

const char *kms_usage_name(int usage)
{
    return usage >= 0 && usage < KMS_USAGE_COUNT ? usages[usage] : "?";
}

int kms_alg_allowed(int spec, int usage, int alg)
{
    const struct kms_spec_info *s = kms_spec(spec);
    const struct kms_alg_info *a = kms_alg(alg);
    if (!s || !a || usage < 0 || usage >= KMS_USAGE_COUNT ||
        a->usage != (enum kms_key_usage)usage || !(s->usages & KMS_USAGE_BIT(usage)))
        return 0;
    switch (a->scheme) {
    case KMS_SCHEME_GCM: return s->kind == KMS_KIND_AES;
    case KMS_SCHEME_OAEP:
    case KMS_SCHEME_PSS:
    case KMS_SCHEME_PKCS1: return s->kind == KMS_KIND_RSA;
    case KMS_SCHEME_ECDSA:
        /* AWS pairs each NIST curve with one digest: P-256 SHA-256, P-384 SHA-384, P-521 SHA-512.
         */
        return s->kind == KMS_KIND_EC &&
               ((spec == KMS_SPEC_ECC_NIST_P256 && alg == KMS_ALG_ECDSA_SHA_256) ||
                (spec == KMS_SPEC_ECC_NIST_P384 && alg == KMS_ALG_ECDSA_SHA_384) ||
                (spec == KMS_SPEC_ECC_NIST_P521 && alg == KMS_ALG_ECDSA_SHA_512));
    case KMS_SCHEME_EDDSA: return s->kind == KMS_KIND_EDWARDS;
    case KMS_SCHEME_HMAC: return s->kind == KMS_KIND_HMAC && s->nid == a->md_nid;
    case KMS_SCHEME_ECDH: return s->kind == KMS_KIND_EC || s->kind == KMS_KIND_MONTGOMERY;
    }
    return 0;
}

size_t kms_spec_algorithms(int spec, int usage, int *out, size_t max)
{
    size_t n = 0;
    for (int a = 0; a < KMS_ALG_COUNT; a++)
        if (kms_alg_allowed(spec, usage, a) && n < max)
            out[n++] = a;
    return n;
}

size_t kms_oaep_max_plaintext(int spec, int alg)
{
    const struct kms_spec_info *s = kms_spec(spec);
    const struct kms_alg_info *a = kms_alg(alg);
    if (!s || !a || s->kind != KMS_KIND_RSA || a->scheme != KMS_SCHEME_OAEP)
        return 0;
    return s->bits / 8 - 2 * a->md_len - 2;
}

/* ---- grant operations ---- */

/* AWS's GrantOperation enum, in its order. */
static const char *const op_names[KMS_GRANT_OP_COUNT] = {
    "Decrypt",
    "Encrypt",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "ReEncryptFrom",
    "ReEncryptTo",
    "Sign",
    "Verify",
    "GetPublicKey",
    "CreateGrant",
    "RetireGrant",
    "DescribeKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
};

const char *kms_grant_op_name(int i)
{
    return i >= 0 && i < KMS_GRANT_OP_COUNT ? op_names[i] : NULL;
}

int kms_grant_op_index(const char *name)
{
    for (int i = 0; i < KMS_GRANT_OP_COUNT; i++)
        if (strcmp(op_names[i], name) == 0)
            return i;
    return -1;
}
