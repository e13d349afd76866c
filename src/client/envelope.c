/*
 * p11kms_seal / p11kms_open: envelope encryption of payloads as JWE under
 * data keys from the service, through the data-key cache when it is on.
 *
 * Nonces. Every message gets a fresh random 96-bit IV from OpenSSL's DRBG. A
 * data key reused from the cache seals at most cache_max_messages messages
 * (default 2^32), and NIST SP 800-38D §8.3 allows 2^32 random IVs under one
 * key: the chance that two of them collide stays below 2^-32. A data key
 * from GenerateDataKey without the cache seals exactly one message.
 *
 * Fail closed: no data key, no JWE. Nothing is ever sealed under anything
 * else, and p11kms_open hands out plaintext only once the tag has verified.
 */
#include "config.h"

#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"

p11kms_status p11kms_seal(p11kms_client *c, const char *key_id, const struct p11kms_context *ctx,
                          size_t nctx, const uint8_t *payload, size_t n, char **out,
                          size_t *out_len)
{
    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!c || !key_id || !*key_id || (!ctx && nctx) || (!payload && n) || !out || !out_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_seal: a NULL or empty argument");
    if (n > KMS_JWE_MAX_PAYLOAD)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_seal: the payload is over %zu bytes",
                               KMS_JWE_MAX_PAYLOAD);

    struct p11kms_data_key dk;
    memset(&dk, 0, sizeof dk);
    uint8_t *canon = NULL;
    size_t canon_len = 0;
    p11kms_status st = kms_client_canonical(ctx, nctx, &canon, &canon_len);
    if (st != P11KMS_OK)
        goto cleanup;

    /* The cache counts this message and its bytes against the key it hands out. */
    st = P11KMS_ERR_NOT_FOUND;
    if (c->cache)
        st = kms_cache_take_for_seal(c->cache, key_id, canon, canon_len, n, &dk);
    if (st != P11KMS_OK) {
        if ((st = kms_service_generate(c, key_id, ctx, nctx, &dk)) != P11KMS_OK)
            goto cleanup;
        if (!dk.plaintext || dk.plaintext_len != KMS_JWE_KEY_LEN || !dk.blob_len ||
            !dk.key_arn[0]) {
            st = kms_client_fail(P11KMS_ERR_PROTOCOL,
                                 "GenerateDataKey answered without a 32-byte key, a blob or "
                                 "a key ARN");
            goto cleanup;
        }
        if (c->cache)
            kms_cache_put_for_seal(c->cache, key_id, canon, canon_len, &dk, n);
    }
    st = kms_jwe_seal(KMS_JWE_COMPACT, dk.plaintext, NULL, dk.key_arn, dk.blob, dk.blob_len, ctx,
                      nctx, payload, n, out, out_len);

cleanup:
    p11kms_data_key_clear(&dk);
    free(canon);
    return st;
}

p11kms_status p11kms_open(p11kms_client *c, const char *jwe, size_t len,
                          const struct p11kms_context *ctx, size_t nctx, uint8_t **out,
                          size_t *out_len)
{
    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!c || !jwe || (!ctx && nctx) || !out || !out_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_open: a NULL argument");

    struct kms_jwe j;
    struct p11kms_data_key dk;
    uint8_t key[KMS_JWE_KEY_LEN];
    memset(&dk, 0, sizeof dk);
    uint8_t *want = NULL;
    size_t want_len = 0;
    p11kms_status st = kms_jwe_parse_memo(jwe, len, &c->jwe_memo, &j);
    if (st != P11KMS_OK)
        return st;
    if ((st = kms_client_canonical(ctx, nctx, &want, &want_len)) != P11KMS_OK)
        goto cleanup;
    if (!j.canon) {
        st = kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: p11kms_ctx is not a usable context");
        goto cleanup;
    }
    /* The context is in the AAD, so another one could only fail the tag: say so
       now, without asking the service for the key. */
    if (want_len != j.canon_len || CRYPTO_memcmp(want, j.canon, want_len) != 0) {
        st = kms_client_fail(P11KMS_ERR_DECRYPT,
                             "the encryption context is not the one the JWE was sealed with");
        goto cleanup;
    }
    /* A cache hit needs the key alone: a copy on the stack, wiped below, rather
       than a p11kms_data_key with its secure-heap copy, blob and ARN. */
    if (c->cache &&
        kms_cache_get_decrypt_key(c->cache, j.blob, j.blob_len, want, want_len, key) == P11KMS_OK)
        st = kms_jwe_decrypt_in_place(&j, key, sizeof key, out, out_len);
    else if ((st = kms_decrypt_data_key_canon(c, j.blob, j.blob_len, ctx, nctx, want, want_len,
                                              &dk)) == P11KMS_OK)
        st = kms_jwe_decrypt_in_place(&j, dk.plaintext, dk.plaintext_len, out, out_len);

cleanup:
    OPENSSL_cleanse(key, sizeof key);
    p11kms_data_key_clear(&dk);
    kms_jwe_clear(&j);
    free(want);
    return st;
}
