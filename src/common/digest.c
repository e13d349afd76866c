#include "config.h"

#include "common/digest.h"

#include <openssl/core_names.h>
#include <openssl/params.h>
#include <pthread.h>

static pthread_once_t once = PTHREAD_ONCE_INIT;
static EVP_MD *sha256_md;
static EVP_CIPHER *aes256gcm;
static EVP_MAC_CTX *hmac_sha256; /* keyless template, duplicated per use */

static void fetch_all(void)
{
    char digest[] = "SHA2-256";
    OSSL_PARAM params[] = {OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST, digest, 0),
                           OSSL_PARAM_construct_end()};
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);

    sha256_md = EVP_MD_fetch(NULL, "SHA2-256", NULL);
    aes256gcm = EVP_CIPHER_fetch(NULL, "AES-256-GCM", NULL);
    if (mac) {
        hmac_sha256 = EVP_MAC_CTX_new(mac);
        if (hmac_sha256 && EVP_MAC_CTX_set_params(hmac_sha256, params) != 1) {
            EVP_MAC_CTX_free(hmac_sha256);
            hmac_sha256 = NULL;
        }
        EVP_MAC_free(mac); /* the context holds its own reference */
    }
}

const EVP_MD *kms_md_sha256(void)
{
    pthread_once(&once, fetch_all);
    return sha256_md;
}

const EVP_CIPHER *kms_cipher_aes256gcm(void)
{
    pthread_once(&once, fetch_all);
    return aes256gcm;
}

kms_err kms_sha256(const void *p, size_t n, uint8_t out[KMS_SHA256_LEN])
{
    const EVP_MD *md = kms_md_sha256();
    unsigned len = 0;
    KMS_ENSURE(md && EVP_Digest(p, n, out, &len, md, NULL) == 1 && len == KMS_SHA256_LEN,
               KMS_ERR_INTERNAL, "SHA-256 failed");
    return KMS_OK;
}

kms_err kms_hmac_sha256(const void *key, size_t key_len, const void *msg, size_t n,
                        uint8_t out[KMS_SHA256_LEN])
{
    pthread_once(&once, fetch_all);
    EVP_MAC_CTX *c = hmac_sha256 ? EVP_MAC_CTX_dup(hmac_sha256) : NULL;
    size_t len = 0;
    int ok = c && EVP_MAC_init(c, key, key_len, NULL) == 1 && EVP_MAC_update(c, msg, n) == 1 &&
             EVP_MAC_final(c, out, &len, KMS_SHA256_LEN) == 1 && len == KMS_SHA256_LEN;
    EVP_MAC_CTX_free(c); /* frees (and cleanses) the keyed state */
    KMS_ENSURE(ok, KMS_ERR_INTERNAL, "HMAC-SHA256 failed");
    return KMS_OK;
}
