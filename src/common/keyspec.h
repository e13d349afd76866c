/*
 * Key specs, key usages and algorithms as AWS KMS names them, with what each
 * means to the token: one table each (keyspec.c), read by the key store (what
 * to generate, how to unwrap), the operations (what a request may ask of a
 * key) and DescribeKey (the algorithm lists). Numbers are stored in the
 * database's keys rows: never renumber, only append.
 */
#ifndef P11KMS_KEYSPEC_H
#define P11KMS_KEYSPEC_H

#include <stddef.h>

enum kms_key_spec {
    KMS_SPEC_SYMMETRIC_DEFAULT = 0, /* AES-256-GCM through blobs */
    KMS_SPEC_RSA_2048 = 1,
    KMS_SPEC_RSA_3072 = 2,
    KMS_SPEC_RSA_4096 = 3,
    KMS_SPEC_ECC_NIST_P256 = 4,
    KMS_SPEC_ECC_NIST_P384 = 5,
    KMS_SPEC_ECC_NIST_P521 = 6,
    KMS_SPEC_ECC_NIST_EDWARDS25519 = 7, /* Ed25519, CKM_EDDSA */
    KMS_SPEC_X25519 = 8,                /* key agreement on a Montgomery curve */
    KMS_SPEC_HMAC_224 = 9,
    KMS_SPEC_HMAC_256 = 10,
    KMS_SPEC_HMAC_384 = 11,
    KMS_SPEC_HMAC_512 = 12,
    KMS_SPEC_COUNT
};

enum kms_key_usage {
    KMS_USAGE_ENCRYPT_DECRYPT = 0,
    KMS_USAGE_SIGN_VERIFY = 1,
    KMS_USAGE_GENERATE_VERIFY_MAC = 2,
    KMS_USAGE_KEY_AGREEMENT = 3,
    KMS_USAGE_COUNT
};
#define KMS_USAGE_BIT(u) (1u << (u))

/* What the token generates for a spec. */
enum kms_key_kind {
    KMS_KIND_AES,        /* CKK_AES, 256 bits */
    KMS_KIND_RSA,        /* CKK_RSA, bits of modulus, e = 65537 */
    KMS_KIND_EC,         /* CKK_EC on a Weierstrass curve */
    KMS_KIND_EDWARDS,    /* CKK_EC_EDWARDS */
    KMS_KIND_MONTGOMERY, /* CKK_EC_MONTGOMERY */
    KMS_KIND_HMAC,       /* CKK_GENERIC_SECRET of bits / 8 bytes */
};

struct kms_spec_info {
    const char *name; /* "RSA_4096" */
    enum kms_key_kind kind;
    unsigned bits;   /* modulus, curve order or HMAC key length */
    int nid;         /* OpenSSL's curve NID (EC kinds); the digest's NID (HMAC) */
    unsigned usages; /* KMS_USAGE_BIT of each usage the spec allows */
};

enum kms_alg {
    KMS_ALG_SYMMETRIC_DEFAULT = 0,
    KMS_ALG_RSAES_OAEP_SHA_1,
    KMS_ALG_RSAES_OAEP_SHA_256,
    KMS_ALG_RSASSA_PSS_SHA_256,
    KMS_ALG_RSASSA_PSS_SHA_384,
    KMS_ALG_RSASSA_PSS_SHA_512,
    KMS_ALG_RSASSA_PKCS1_V1_5_SHA_256,
    KMS_ALG_RSASSA_PKCS1_V1_5_SHA_384,
    KMS_ALG_RSASSA_PKCS1_V1_5_SHA_512,
    KMS_ALG_ECDSA_SHA_256,
    KMS_ALG_ECDSA_SHA_384,
    KMS_ALG_ECDSA_SHA_512,
    KMS_ALG_ED25519_SHA_512,
    KMS_ALG_HMAC_SHA_224,
    KMS_ALG_HMAC_SHA_256,
    KMS_ALG_HMAC_SHA_384,
    KMS_ALG_HMAC_SHA_512,
    KMS_ALG_ECDH,
    KMS_ALG_COUNT
};

/* How an algorithm uses its key's private half or secret. */
enum kms_alg_scheme {
    KMS_SCHEME_GCM,   /* the blob format */
    KMS_SCHEME_OAEP,  /* RSAES-OAEP, MGF1 with the same digest, no label */
    KMS_SCHEME_PSS,   /* RSASSA-PSS, MGF1 with the same digest, salt = digest length */
    KMS_SCHEME_PKCS1, /* RSASSA-PKCS1-v1_5 */
    KMS_SCHEME_ECDSA, /* DER-encoded ECDSA-Sig-Value, as AWS answers */
    KMS_SCHEME_EDDSA, /* pure Ed25519 (RFC 8032), the message itself */
    KMS_SCHEME_HMAC,  /* RFC 2104 */
    KMS_SCHEME_ECDH,  /* the shared secret's x coordinate (CKD_NULL) */
};

struct kms_alg_info {
    const char *name; /* "RSASSA_PSS_SHA_256" */
    enum kms_key_usage usage;
    enum kms_alg_scheme scheme;
    int md_nid;    /* the digest's NID; NID_undef for GCM, EdDSA and ECDH */
    size_t md_len; /* its length in bytes; 0 when none */
};

/* NULL when out of range. */
const struct kms_spec_info *kms_spec(int spec);
const struct kms_alg_info *kms_alg(int alg);
/* The number, or -1 when the name is none of ours. */
int kms_spec_by_name(const char *name);
int kms_usage_by_name(const char *name);
int kms_alg_by_name(const char *name);
const char *kms_usage_name(int usage); /* "?" when out of range */

/* Whether a key of spec and usage may be used with alg, as AWS allows. */
int kms_alg_allowed(int spec, int usage, int alg);
/* The algorithms a key of spec and usage allows, in AWS's order; returns how many. */
size_t kms_spec_algorithms(int spec, int usage, int *out, size_t max);
/*
 * The longest plaintext RSAES-OAEP takes under a key of spec with alg (AWS's
 * limits: k - 2 * hLen - 2), 0 when alg is not OAEP or spec is not RSA.
 */
size_t kms_oaep_max_plaintext(int spec, int alg);

/*
 * AWS's grant operations (GrantOperation), in its order: the server keeps a
 * grant's operations as bits of these indexes, the client checks names with them.
 */
#define KMS_GRANT_OP_COUNT 17
/* The name of operation i, NULL when i is out of range. */
const char *kms_grant_op_name(int i);
/* The index of an operation's name, -1 when it is none. */
int kms_grant_op_index(const char *name);

#endif
