/*
 * Public-key work done in the process with OpenSSL, never in the token: the
 * public half is public. Verify, RSAES-OAEP encryption, a peer's public key
 * for key agreement, the digest of a RAW message, and data key pairs
 * (GenerateDataKeyPair returns the private key, so it never was the token's).
 * Keys are DER SubjectPublicKeyInfo; specs and algorithms are keyspec.h's.
 */
#ifndef P11KMS_PUBKEY_H
#define P11KMS_PUBKEY_H

#include <openssl/types.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "common/error.h"

#define KMS_DIGEST_MAX 64
#define KMS_SIGNATURE_MAX 1024 /* RSA-4096: 512 bytes; ECDSA P-521 DER: 139 */

/* alg's digest of a message: *len receives the algorithm's md_len. */
KMS_MUST_CHECK kms_err kms_pubkey_digest(int alg, const uint8_t *msg, size_t n,
                                         uint8_t out[KMS_DIGEST_MAX], size_t *len);
/*
 * A stored DER SubjectPublicKeyInfo decoded (OpenSSL's decoder costs more than
 * a verification: the key store keeps the result beside its version). One
 * that does not parse is KMS_ERR_INTERNAL: a stored row is corrupt.
 */
KMS_MUST_CHECK kms_err kms_pubkey_parse(const uint8_t *spki, size_t n, EVP_PKEY **out);
/*
 * Checks a signature made with alg by the private half of spki. in is the
 * message when digested is 0, its digest (md_len bytes) when 1; Ed25519 takes
 * only the message. KMS_ERR_BAD_SIGNATURE when it does not verify (a
 * malformed signature included); KMS_ERR_INTERNAL for a spki that does not
 * parse (a stored row is corrupt).
 */
KMS_MUST_CHECK kms_err kms_pubkey_verify(const uint8_t *spki, size_t spki_len, int alg,
                                         int digested, const uint8_t *in, size_t n,
                                         const uint8_t *sig, size_t sig_len);
/* The same with the key decoded (kms_pubkey_parse); pkey is only read. */
KMS_MUST_CHECK kms_err kms_pubkey_verify_key(EVP_PKEY *pkey, int alg, int digested,
                                             const uint8_t *in, size_t n, const uint8_t *sig,
                                             size_t sig_len);
/* RSAES-OAEP (alg) of pt under pkey; out receives the modulus' size in bytes. */
KMS_MUST_CHECK kms_err kms_pubkey_oaep_encrypt(EVP_PKEY *pkey, int alg, const uint8_t *pt, size_t n,
                                               struct kms_buf *out);
/*
 * The public point of a peer's DER SubjectPublicKeyInfo for key agreement
 * with a key of spec: the uncompressed point (EC) or the 32 raw bytes
 * (X25519). Not a public key, or one on another curve: KMS_ERR_VALIDATION
 * saying which.
 */
KMS_MUST_CHECK kms_err kms_pubkey_peer_point(int spec, const uint8_t *der, size_t n,
                                             struct kms_buf *point);
/*
 * A new key pair of spec (RSA or NIST EC) for GenerateDataKeyPair:
 * pkcs8 receives the private key (DER PKCS#8 PrivateKeyInfo), spki the public
 * key. Both buffers are cleansed when freed.
 */
KMS_MUST_CHECK kms_err kms_pubkey_generate_pair(int spec, struct kms_buf *pkcs8,
                                                struct kms_buf *spki);

#endif
