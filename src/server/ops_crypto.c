/*
 * Cryptographic operations: GenerateDataKey(WithoutPlaintext), Encrypt,
 * Decrypt (symmetric keys through blobs, RSA keys with RSAES-OAEP),
 * ReEncrypt, GenerateRandom. Every buffer that held a plaintext is a kms_buf,
 * cleansed when freed; jansson's copies are cleansed by its allocator.
 */
#include "config.h"

#include <openssl/evp.h>

#include <stdio.h>
#include <string.h>

#include "common/encoding.h"
#include "common/keyspec.h"
#include "common/pubkey.h"
#include "server/ops.h"

#define DATA_KEY_MAX 1024
#define PLAINTEXT_MAX 4096
#define CIPHERTEXT_MAX 6144
#define RANDOM_MAX 1024

/* NumberOfBytes or KeySpec (AES_256/AES_128), exactly one of them. */
static kms_err data_key_size(json_t *in, size_t *out)
{
    const char *spec;
    long bytes = 0;
    int have_bytes;

    KMS_GUARD(kms_in_int(in, "NumberOfBytes", 1, DATA_KEY_MAX, &bytes, &have_bytes));
    KMS_GUARD(kms_in_string(in, "KeySpec", 0, 1, 16, &spec));
    KMS_ENSURE(!(have_bytes && spec), KMS_ERR_VALIDATION,
               "Please specify either number of bytes or key spec.");
    KMS_ENSURE(have_bytes || spec, KMS_ERR_VALIDATION,
               "Please specify either number of bytes or key spec.");
    if (have_bytes) {
        *out = (size_t)bytes;
        return KMS_OK;
    }
    if (strcmp(spec, "AES_256") == 0)
        *out = 32;
    else if (strcmp(spec, "AES_128") == 0)
        *out = 16;
    else
        return KMS_FAIL(KMS_ERR_VALIDATION,
                        "1 validation error detected: Value '%.16s' at 'keySpec' failed to satisfy "
                        "constraint: Member must satisfy enum value set: [AES_256, AES_128]",
                        spec);
    return KMS_OK;
}

static kms_err generate_data_key(struct kms_request *r, int with_plaintext)
{
    const char *ref;
    size_t n = 0;
    /* The data key on the stack, not the heap: cleansed on the way out. */
    uint8_t key[DATA_KEY_MAX];
    struct kms_buf ctx = KMS_BUF_INIT, blob = KMS_BUF_INIT;
    struct kms_key_info k = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;
    kms_err rc;

    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(data_key_size(r->in, &n));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    KMS_ENSURE(!json_object_get(r->in, "Recipient"), KMS_ERR_UNSUPPORTED,
               "Recipient (Nitro Enclaves attestation) is not supported");
    rc = kms_in_context(r->in, "EncryptionContext", &ctx);
    if (rc == KMS_OK)
        rc = kms_authorize(
            r, with_plaintext ? "kms:GenerateDataKey" : "kms:GenerateDataKeyWithoutPlaintext", ref,
            KMS_REF_ALIAS, json_object_get(r->in, "EncryptionContext"), &held);
    if (rc == KMS_OK)
        rc = kms_keystore_key_info_brief(r->srv->ks, &held, &k);
    if (rc == KMS_OK)
        rc = kms_check_symmetric(&k, with_plaintext ? "GenerateDataKey"
                                                    : "GenerateDataKeyWithoutPlaintext");
    if (rc == KMS_OK)
        rc = kms_keystore_random(r->srv->ks, key, n);
    if (rc == KMS_OK)
        rc = kms_keystore_encrypt_key(r->srv->ks, &held, &ctx, key, n, &blob, &k);
    if (rc == KMS_OK) {
        r->out = json_pack("{s:s}", "KeyId", k.arn);
        if (!r->out)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    if (rc == KMS_OK)
        rc = kms_out_blob(r->out, "CiphertextBlob", blob.data, blob.len);
    if (rc == KMS_OK && with_plaintext)
        rc = kms_out_blob(r->out, "Plaintext", key, n);
    kms_note_blob(r, NULL, &blob, &ctx);
    kms_keystore_unhold(r->srv->ks, &held);
    OPENSSL_cleanse(key, sizeof key);
    kms_buf_free(&blob);
    kms_buf_free(&ctx);
    kms_key_info_clear(&k);
    return rc;
}

kms_err kms_op_generate_data_key(struct kms_request *r)
{
    return generate_data_key(r, 1);
}

kms_err kms_op_generate_data_key_without_plaintext(struct kms_request *r)
{
    return generate_data_key(r, 0);
}

/* Encrypt's and Decrypt's answer: the key's ARN, the algorithm and one base64 member. */
static kms_err respond(struct kms_request *r, const struct kms_key_info *k, int alg,
                       const char *member, const struct kms_buf *value)
{
    r->out = json_pack("{s:s, s:s}", "KeyId", k->arn, "EncryptionAlgorithm", kms_alg(alg)->name);
    KMS_ENSURE(r->out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return kms_out_blob(r->out, member, value->data, value->len);
}

/* EncryptionAlgorithm: SYMMETRIC_DEFAULT when absent. */
static kms_err encryption_algorithm(json_t *in, const char *name, int *alg)
{
    KMS_GUARD(kms_in_enum_alg(in, name, 0, KMS_USAGE_ENCRYPT_DECRYPT, alg));
    if (*alg < 0)
        *alg = KMS_ALG_SYMMETRIC_DEFAULT;
    return KMS_OK;
}

/* AWS takes an encryption context with symmetric keys only. */
static kms_err no_context(json_t *in, const char *name, const struct kms_key_info *k)
{
    KMS_ENSURE(json_object_size(json_object_get(in, name)) == 0, KMS_ERR_VALIDATION,
               "%s is not valid with an asymmetric KMS key (%s has KeySpec %s): an encryption "
               "context is supported only with symmetric encryption KMS keys",
               name, k->arn, kms_spec(k->spec) ? kms_spec(k->spec)->name : "?");
    return KMS_OK;
}

/*
 * The key a request names for an RSAES-OAEP ciphertext (Decrypt's KeyId,
 * ReEncrypt's SourceKeyId): an OAEP ciphertext names no key, so the request
 * must, and the decision is about that key. *held and *k are that key, of
 * usage ENCRYPT_DECRYPT taking alg; the request has no encryption context
 * (context_member).
 */
static kms_err oaep_source(struct kms_request *r, const char *action, const char *operation,
                           const char *ref_member, const char *context_member, const char *ref,
                           int alg, struct kms_key_ref *held, struct kms_key_info *k)
{
    KMS_ENSURE(
        ref != NULL, KMS_ERR_VALIDATION,
        "%s is required with %s %s: an asymmetric ciphertext does not name its KMS key", ref_member,
        strcmp(ref_member, "KeyId") == 0 ? "EncryptionAlgorithm" : "SourceEncryptionAlgorithm",
        kms_alg(alg)->name);
    KMS_GUARD(kms_authorize(r, action, ref, KMS_REF_ALIAS, NULL, held));
    KMS_GUARD(kms_keystore_key_info_brief(r->srv->ks, held, k));
    r->key_version = k->current_version;
    KMS_GUARD(kms_check_usage(k, KMS_USAGE_ENCRYPT_DECRYPT, operation));
    KMS_GUARD(kms_check_algorithm(k, alg));
    return no_context(r->in, context_member, k);
}

/* RSAES-OAEP decryption in the token with the key oaep_source found. */
static kms_err oaep_decrypt(struct kms_request *r, struct kms_key_ref *held,
                            const struct kms_key_info *k, int alg, const struct kms_buf *ct,
                            struct kms_buf *pt, struct kms_key_info *used)
{
    /* An RSAES-OAEP ciphertext is exactly as long as the modulus. */
    KMS_ENSURE(ct->len == kms_spec(k->spec)->bits / 8, KMS_ERR_INVALID_CIPHERTEXT,
               KMS_BLOB_INVALID);
    return kms_keystore_oaep_decrypt(r->srv->ks, held, alg, ct->data, ct->len, pt, used);
}

/* RSAES-OAEP with the held key's public key, in this process. */
static kms_err oaep_encrypt(struct kms_request *r, struct kms_key_ref *held,
                            const struct kms_key_info *k, int alg, const struct kms_buf *pt,
                            struct kms_buf *ct, struct kms_key_info *used)
{
    EVP_PKEY *pkey = NULL;
    size_t max = kms_oaep_max_plaintext(k->spec, alg);

    KMS_ENSURE(pt->len <= max, KMS_ERR_VALIDATION,
               "Plaintext of %zu bytes is too long for %s with a %s key: at most %zu bytes",
               pt->len, kms_alg(alg)->name, kms_spec(k->spec)->name, max);
    kms_err rc = kms_keystore_public_pkey(r->srv->ks, held, &pkey, used);
    if (rc == KMS_OK)
        rc = kms_pubkey_oaep_encrypt(pkey, alg, pt->data, pt->len, ct);
    EVP_PKEY_free(pkey);
    return rc;
}

kms_err kms_op_encrypt(struct kms_request *r)
{
    const char *ref;
    int present, alg;
    struct kms_buf ctx = KMS_BUF_INIT, pt = KMS_BUF_INIT, blob = KMS_BUF_INIT;
    struct kms_key_info k = {0}, used = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;
    kms_err rc;

    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    KMS_GUARD(encryption_algorithm(r->in, "EncryptionAlgorithm", &alg));
    rc = kms_in_blob(r->in, "Plaintext", 1, 1, PLAINTEXT_MAX, &pt, &present);
    if (rc == KMS_OK)
        rc = kms_in_context(r->in, "EncryptionContext", &ctx);
    if (rc == KMS_OK)
        rc = kms_authorize(r, "kms:Encrypt", ref, KMS_REF_ALIAS,
                           json_object_get(r->in, "EncryptionContext"), &held);
    if (rc == KMS_OK)
        rc = kms_keystore_key_info_brief(r->srv->ks, &held, &k);
    if (rc == KMS_OK)
        rc = kms_check_usage(&k, KMS_USAGE_ENCRYPT_DECRYPT, "Encrypt");
    if (rc == KMS_OK)
        rc = kms_check_algorithm(&k, alg);
    if (rc == KMS_OK && alg != KMS_ALG_SYMMETRIC_DEFAULT) {
        r->key_version = k.current_version;
        rc = no_context(r->in, "EncryptionContext", &k);
        if (rc == KMS_OK)
            rc = oaep_encrypt(r, &held, &k, alg, &pt, &blob, &used);
    } else if (rc == KMS_OK) {
        rc = kms_keystore_encrypt_key(r->srv->ks, &held, &ctx, pt.data, pt.len, &blob, &used);
    }
    if (rc == KMS_OK)
        rc = respond(r, &used, alg, "CiphertextBlob", &blob);
    /* An RSAES-OAEP ciphertext is no blob: its key and version are noted above. */
    if (alg == KMS_ALG_SYMMETRIC_DEFAULT)
        kms_note_blob(r, NULL, &blob, &ctx);
    kms_keystore_unhold(r->srv->ks, &held);
    kms_buf_free(&pt);
    kms_buf_free(&blob);
    kms_buf_free(&ctx);
    kms_key_info_clear(&k);
    kms_key_info_clear(&used);
    return rc;
}

kms_err kms_op_decrypt(struct kms_request *r)
{
    const char *ref;
    int present, alg, decoded = 0;
    struct kms_blob b;
    struct kms_buf ctx = KMS_BUF_INIT, pt = KMS_BUF_INIT, blob = KMS_BUF_INIT;
    struct kms_key_info k = {0}, used = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;
    kms_err rc;

    KMS_GUARD(kms_in_string(r->in, "KeyId", 0, 1, 2048, &ref));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    KMS_GUARD(encryption_algorithm(r->in, "EncryptionAlgorithm", &alg));
    KMS_ENSURE(!json_object_get(r->in, "Recipient"), KMS_ERR_UNSUPPORTED,
               "Recipient (Nitro Enclaves attestation) is not supported");
    rc = kms_in_blob(r->in, "CiphertextBlob", 1, 1, CIPHERTEXT_MAX, &blob, &present);
    if (rc == KMS_OK)
        rc = kms_in_context(r->in, "EncryptionContext", &ctx);
    if (rc == KMS_OK && alg != KMS_ALG_SYMMETRIC_DEFAULT) {
        rc = oaep_source(r, "kms:Decrypt", "Decrypt", "KeyId", "EncryptionContext", ref, alg, &held,
                         &k);
        if (rc == KMS_OK)
            rc = oaep_decrypt(r, &held, &k, alg, &blob, &pt, &used);
    } else if (rc == KMS_OK) {
        /* Decoded here once: authorization, the key store and the audit line all read b. */
        rc = kms_blob_decode(blob.data, blob.len, &b);
        decoded = rc == KMS_OK;
        if (rc == KMS_OK)
            rc = kms_authorize_blob(r, "kms:Decrypt", &b,
                                    json_object_get(r->in, "EncryptionContext"), &held);
        if (rc == KMS_OK)
            rc = kms_keystore_key_info_brief(r->srv->ks, &held, &k);
        if (rc == KMS_OK)
            rc = kms_check_symmetric(&k, "Decrypt");
        /* The held key is the blob's: its info (k) is the answer's, no second copy. */
        if (rc == KMS_OK)
            rc = kms_keystore_decrypt_key(r->srv->ks, &held, &b, &ctx, ref, &pt, NULL);
    }
    if (rc == KMS_OK)
        rc = respond(r, alg == KMS_ALG_SYMMETRIC_DEFAULT ? &k : &used, alg, "Plaintext", &pt);
    if (alg == KMS_ALG_SYMMETRIC_DEFAULT)
        kms_note_blob(r, decoded ? &b : NULL, &blob, &ctx);
    kms_keystore_unhold(r->srv->ks, &held);
    kms_buf_free(&pt);
    kms_buf_free(&blob);
    kms_buf_free(&ctx);
    kms_key_info_clear(&k);
    kms_key_info_clear(&used);
    return rc;
}

kms_err kms_op_generate_random(struct kms_request *r)
{
    long n = 0;
    int present;
    struct kms_buf bytes = KMS_BUF_INIT;
    kms_err rc;

    KMS_GUARD(kms_in_int(r->in, "NumberOfBytes", 1, RANDOM_MAX, &n, &present));
    KMS_ENSURE(present, KMS_ERR_VALIDATION,
               "1 validation error detected: Value null at 'numberOfBytes' failed to satisfy "
               "constraint: Member must not be null");
    KMS_ENSURE(!json_object_get(r->in, "CustomKeyStoreId"), KMS_ERR_UNSUPPORTED,
               "Custom key stores are not supported");
    rc = kms_buf_reserve(&bytes, (size_t)n);
    if (rc == KMS_OK)
        rc = kms_keystore_random(r->srv->ks, bytes.data, (size_t)n);
    if (rc == KMS_OK) {
        r->out = json_object();
        rc = r->out ? kms_out_blob(r->out, "Plaintext", bytes.data, (size_t)n)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    kms_buf_free(&bytes);
    return rc;
}

/*
 * ReEncrypt: both keys are authorized (kms:ReEncryptFrom, kms:ReEncryptTo)
 * before anything is decrypted. A symmetric source is the blob's key; an
 * RSAES-OAEP source is SourceKeyId, decrypted in the token; an RSAES-OAEP
 * destination encrypts with its public key here. The plaintext stays in
 * this process, in a buffer cleansed when freed.
 */
kms_err kms_op_re_encrypt(struct kms_request *r)
{
    const char *source, *dest;
    int present, salg, dalg, decoded = 0;
    struct kms_blob b;
    struct kms_buf blob = KMS_BUF_INIT, pt = KMS_BUF_INIT, out = KMS_BUF_INIT;
    struct kms_buf sctx = KMS_BUF_INIT, dctx = KMS_BUF_INIT;
    struct kms_key_info sk = {0}, dk = {0}, used = {0};
    struct kms_key_ref from = KMS_KEY_REF_INIT, to = KMS_KEY_REF_INIT;
    kms_err rc;

    KMS_GUARD(kms_in_string(r->in, "SourceKeyId", 0, 1, 2048, &source));
    KMS_GUARD(kms_in_string(r->in, "DestinationKeyId", 1, 1, 2048, &dest));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    KMS_GUARD(encryption_algorithm(r->in, "SourceEncryptionAlgorithm", &salg));
    KMS_GUARD(encryption_algorithm(r->in, "DestinationEncryptionAlgorithm", &dalg));
    rc = kms_in_blob(r->in, "CiphertextBlob", 1, 1, CIPHERTEXT_MAX, &blob, &present);
    if (rc == KMS_OK)
        rc = kms_in_context(r->in, "SourceEncryptionContext", &sctx);
    if (rc == KMS_OK)
        rc = kms_in_context(r->in, "DestinationEncryptionContext", &dctx);
    if (rc == KMS_OK && salg == KMS_ALG_SYMMETRIC_DEFAULT) {
        /* Decoded here once: authorization, the key store and the audit line all read b. */
        rc = kms_blob_decode(blob.data, blob.len, &b);
        decoded = rc == KMS_OK;
        if (rc == KMS_OK)
            rc = kms_authorize_blob(r, "kms:ReEncryptFrom", &b,
                                    json_object_get(r->in, "SourceEncryptionContext"), &from);
        if (rc == KMS_OK)
            rc = kms_keystore_key_info_brief(r->srv->ks, &from, &sk);
        if (rc == KMS_OK)
            rc = kms_check_symmetric(&sk, "ReEncrypt");
    } else if (rc == KMS_OK) {
        rc = oaep_source(r, "kms:ReEncryptFrom", "ReEncrypt", "SourceKeyId",
                         "SourceEncryptionContext", source, salg, &from, &sk);
    }
    if (rc == KMS_OK)
        rc = kms_authorize(r, "kms:ReEncryptTo", dest, KMS_REF_ALIAS,
                           json_object_get(r->in, "DestinationEncryptionContext"), &to);
    if (rc == KMS_OK)
        rc = kms_keystore_key_info_brief(r->srv->ks, &to, &dk);
    if (rc == KMS_OK)
        rc = kms_check_usage(&dk, KMS_USAGE_ENCRYPT_DECRYPT, "ReEncrypt");
    if (rc == KMS_OK)
        rc = kms_check_algorithm(&dk, dalg);
    if (rc == KMS_OK && dalg != KMS_ALG_SYMMETRIC_DEFAULT)
        rc = no_context(r->in, "DestinationEncryptionContext", &dk);
    /* A blob's source key is the held one, whose info sk has already: no second copy. */
    if (rc == KMS_OK && salg == KMS_ALG_SYMMETRIC_DEFAULT)
        rc = kms_keystore_decrypt_key(r->srv->ks, &from, &b, &sctx, source, &pt, NULL);
    else if (rc == KMS_OK)
        rc = oaep_decrypt(r, &from, &sk, salg, &blob, &pt, &used);
    if (rc == KMS_OK && salg != KMS_ALG_SYMMETRIC_DEFAULT) {
        kms_key_info_clear(&sk);
        sk = used;
        memset(&used, 0, sizeof used);
    }
    if (rc == KMS_OK && dalg == KMS_ALG_SYMMETRIC_DEFAULT)
        rc = kms_keystore_encrypt_key(r->srv->ks, &to, &dctx, pt.data, pt.len, &out, &used);
    else if (rc == KMS_OK)
        rc = oaep_encrypt(r, &to, &dk, dalg, &pt, &out, &used);
    if (rc == KMS_OK) {
        r->out = json_pack("{s:s, s:s, s:s, s:s}", "SourceKeyId", sk.arn, "KeyId", used.arn,
                           "SourceEncryptionAlgorithm", kms_alg(salg)->name,
                           "DestinationEncryptionAlgorithm", kms_alg(dalg)->name);
        rc = r->out ? kms_out_blob(r->out, "CiphertextBlob", out.data, out.len)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    /* The audit line names the source key (and a blob's version and context). */
    if (salg == KMS_ALG_SYMMETRIC_DEFAULT)
        kms_note_blob(r, decoded ? &b : NULL, &blob, &sctx);
    else if (from.entry)
        snprintf(r->key_arn, sizeof r->key_arn, "%s", from.arn);
    kms_keystore_unhold(r->srv->ks, &from);
    kms_keystore_unhold(r->srv->ks, &to);
    kms_buf_free(&blob);
    kms_buf_free(&pt);
    kms_buf_free(&out);
    kms_buf_free(&sctx);
    kms_buf_free(&dctx);
    kms_key_info_clear(&sk);
    kms_key_info_clear(&dk);
    kms_key_info_clear(&used);
    return rc;
}
