/*
 * SHA-256, HMAC-SHA256 and AES-256-GCM through algorithms fetched once per
 * process. OpenSSL 3 looks an algorithm up in its provider store, under a
 * lock, on every EVP_sha256() / SHA256() / HMAC() / EVP_aes_256_gcm() use;
 * on the request path of every thread that lookup was measurable lock
 * contention. The fetched algorithms live as long as the process.
 */
#ifndef P11KMS_DIGEST_H
#define P11KMS_DIGEST_H

#include <openssl/evp.h>
#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

#define KMS_SHA256_LEN 32

/* NULL only when OpenSSL has no such algorithm (a broken installation). */
const EVP_MD *kms_md_sha256(void);
const EVP_CIPHER *kms_cipher_aes256gcm(void);

KMS_MUST_CHECK kms_err kms_sha256(const void *p, size_t n, uint8_t out[KMS_SHA256_LEN]);
/* The key is cleansed from the MAC state before this returns. */
KMS_MUST_CHECK kms_err kms_hmac_sha256(const void *key, size_t key_len, const void *msg, size_t n,
                                       uint8_t out[KMS_SHA256_LEN]);

#endif
