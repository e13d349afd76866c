/*
 * Asymmetric and HMAC keys: GetPublicKey, Sign, Verify, GenerateMac,
 * VerifyMac, DeriveSharedSecret, GenerateDataKeyPair(WithoutPlaintext).
 * Private keys and HMAC secrets are used only in the token (the key store's
 * calls); what needs only the public key (Verify, RSA Encrypt, a RAW
 * message's digest, data key pairs) is done here with OpenSSL
 * (common/pubkey.h). Messages, signatures, MACs, shared secrets and private
 * keys never reach the audit log: it gets the key's ARN and version only.
 */
#include "config.h"

#include <openssl/evp.h>

#include <openssl/crypto.h>
#include <string.h>

#include "common/keyspec.h"
#include "common/pubkey.h"
#include "server/ops.h"

#define MESSAGE_MAX 4096   /* Sign, Verify, GenerateMac, VerifyMac: AWS's limit */
#define SIGNATURE_MAX 6144 /* Verify's Signature, VerifyMac's Mac */
#define PEER_KEY_MAX 8192  /* DeriveSharedSecret's PublicKey */
#define MAC_MAX 64         /* HMAC-SHA-512 */

/* DryRun (newer SDKs) would ask for a check without the operation: not offered. */
static kms_err no_dry_run(json_t *in)
{
    json_t *v = json_object_get(in, "DryRun");
    KMS_ENSURE(!v || json_is_boolean(v) || json_is_null(v), KMS_ERR_SERIALIZATION,
               "DryRun must be a boolean");
    KMS_ENSURE(!json_is_true(v), KMS_ERR_UNSUPPORTED, "DryRun is not supported");
    return KMS_OK;
}

/*
 * The key ref names, authorized for action and held in *held, when its usage
 * is usage: InvalidKeyUsageException (naming operation) otherwise, before
 * the key store is asked. k receives what the key is; the audit record
 * names its current version.
 */
static kms_err use_key(struct kms_request *r, const char *action, const char *operation, int usage,
                       const char *ref, struct kms_key_ref *held, struct kms_key_info *k)
{
    KMS_GUARD(kms_authorize(r, action, ref, KMS_REF_ALIAS, NULL, held));
    KMS_GUARD(kms_keystore_key_info(r->srv->ks, held, k));
    r->key_version = k->current_version;
    return kms_check_usage(k, usage, operation);
}

/* MessageType: RAW (the default) or DIGEST; *digested says which. */
static kms_err message_type(json_t *in, int *digested)
{
    const char *v;
    KMS_GUARD(kms_in_string(in, "MessageType", 0, 1, 32, &v));
    *digested = v && strcmp(v, "DIGEST") == 0;
    if (!v || *digested || strcmp(v, "RAW") == 0)
        return KMS_OK;
    KMS_ENSURE(strcmp(v, "EXTERNAL_MU") != 0, KMS_ERR_UNSUPPORTED,
               "MessageType EXTERNAL_MU is for ML-DSA keys, which p11kms does not have");
    return KMS_FAIL(KMS_ERR_VALIDATION,
                    "1 validation error detected: Value '%.32s' at 'messageType' failed to "
                    "satisfy constraint: Member must satisfy enum value set: [RAW, DIGEST, "
                    "EXTERNAL_MU]",
                    v);
}

/* SigningAlgorithm, required. */
static kms_err signing_algorithm(json_t *in, int *alg)
{
    const char *v;
    KMS_GUARD(kms_in_string(in, "SigningAlgorithm", 1, 1, 64, &v));
    KMS_ENSURE(strcmp(v, "ED25519_PH_SHA_512") != 0 && strcmp(v, "SM2DSA") != 0 &&
                   strncmp(v, "ML_DSA_", 7) != 0,
               KMS_ERR_UNSUPPORTED, "SigningAlgorithm %.64s is not supported by p11kms", v);
    return kms_in_enum_alg(in, "SigningAlgorithm", 1, KMS_USAGE_SIGN_VERIFY, alg);
}

/*
 * What a signature covers, as the token and kms_pubkey_verify take it: a
 * RAW message's digest (hashed here), a DIGEST as given when it has the
 * algorithm's length; Ed25519 signs the message itself and takes RAW only.
 */
static kms_err to_be_signed(int alg, int digested, const struct kms_buf *msg,
                            uint8_t digest[KMS_DIGEST_MAX], const uint8_t **in, size_t *n)
{
    const struct kms_alg_info *a = kms_alg(alg);
    if (a->scheme == KMS_SCHEME_EDDSA) {
        KMS_ENSURE(!digested, KMS_ERR_VALIDATION,
                   "%s takes MessageType RAW: Ed25519 signs the message itself", a->name);
        *in = msg->data;
        *n = msg->len;
        return KMS_OK;
    }
    if (digested) {
        KMS_ENSURE(msg->len == a->md_len, KMS_ERR_VALIDATION,
                   "Digest is invalid length for algorithm %s: it must be %zu bytes, not %zu.",
                   a->name, a->md_len, msg->len);
        *in = msg->data;
        *n = msg->len;
        return KMS_OK;
    }
    KMS_GUARD(kms_pubkey_digest(alg, msg->data, msg->len, digest, n));
    *in = digest;
    return KMS_OK;
}

/*
 * Sign's and Verify's common part: KeyId, GrantTokens, DryRun, MessageType,
 * SigningAlgorithm, Message and (sig not NULL: Verify) Signature read, then
 * the key authorized for action, held in *held, of usage SIGN_VERIFY and
 * taking the algorithm.
 */
static kms_err signing_request(struct kms_request *r, const char *action, const char *operation,
                               int *alg, int *digested, struct kms_buf *msg, struct kms_buf *sig,
                               struct kms_key_ref *held, struct kms_key_info *k)
{
    const char *ref;
    int present;
    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    KMS_GUARD(no_dry_run(r->in));
    KMS_GUARD(message_type(r->in, digested));
    KMS_GUARD(signing_algorithm(r->in, alg));
    KMS_GUARD(kms_in_blob(r->in, "Message", 1, 1, MESSAGE_MAX, msg, &present));
    if (sig)
        KMS_GUARD(kms_in_blob(r->in, "Signature", 1, 1, SIGNATURE_MAX, sig, &present));
    KMS_GUARD(use_key(r, action, operation, KMS_USAGE_SIGN_VERIFY, ref, held, k));
    return kms_check_algorithm(k, *alg);
}

kms_err kms_op_sign(struct kms_request *r)
{
    int alg = -1, digested = 0;
    uint8_t digest[KMS_DIGEST_MAX], sig[KMS_SIGNATURE_MAX];
    size_t n = 0, sig_len = sizeof sig;
    const uint8_t *in = NULL;
    struct kms_buf msg = KMS_BUF_INIT;
    struct kms_key_info k = {0}, used = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;

    kms_err rc = signing_request(r, "kms:Sign", "Sign", &alg, &digested, &msg, NULL, &held, &k);
    if (rc == KMS_OK)
        rc = to_be_signed(alg, digested, &msg, digest, &in, &n);
    if (rc == KMS_OK)
        rc = kms_keystore_sign(r->srv->ks, &held, alg, in, n, sig, &sig_len, &used);
    if (rc == KMS_OK) {
        r->out = json_pack("{s:s, s:s}", "KeyId", used.arn, "SigningAlgorithm", kms_alg(alg)->name);
        rc = r->out ? kms_out_blob(r->out, "Signature", sig, sig_len)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    OPENSSL_cleanse(digest, sizeof digest);
    kms_keystore_unhold(r->srv->ks, &held);
    kms_buf_free(&msg);
    kms_key_info_clear(&k);
    kms_key_info_clear(&used);
    return rc;
}

kms_err kms_op_verify(struct kms_request *r)
{
    int alg = -1, digested = 0;
    struct kms_buf msg = KMS_BUF_INIT, sig = KMS_BUF_INIT;
    EVP_PKEY *pkey = NULL;
    struct kms_key_info k = {0}, used = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;

    kms_err rc = signing_request(r, "kms:Verify", "Verify", &alg, &digested, &msg, &sig, &held, &k);
    if (rc == KMS_OK && digested) {
        /* The same refusals as Sign's (a DIGEST of the wrong length, Ed25519). */
        uint8_t unused[KMS_DIGEST_MAX];
        const uint8_t *in;
        size_t n;
        rc = to_be_signed(alg, digested, &msg, unused, &in, &n);
    }
    /* The public key is public: the signature is checked here, not in the token. */
    if (rc == KMS_OK)
        rc = kms_keystore_public_pkey(r->srv->ks, &held, &pkey, &used);
    if (rc == KMS_OK)
        rc = kms_pubkey_verify_key(pkey, alg, digested, msg.data, msg.len, sig.data, sig.len);
    if (rc == KMS_OK) {
        r->out = json_pack("{s:s, s:b, s:s}", "KeyId", used.arn, "SignatureValid", 1,
                           "SigningAlgorithm", kms_alg(alg)->name);
        if (!r->out)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    kms_keystore_unhold(r->srv->ks, &held);
    kms_buf_free(&msg);
    kms_buf_free(&sig);
    EVP_PKEY_free(pkey);
    kms_key_info_clear(&k);
    kms_key_info_clear(&used);
    return rc;
}

/* GenerateMac's and VerifyMac's common part: the MAC of Message under the held key. */
static kms_err mac_of(struct kms_request *r, const char *action, const char *operation,
                      struct kms_key_ref *held, int *alg, uint8_t mac[MAC_MAX], size_t *mac_len,
                      struct kms_key_info *used)
{
    const char *ref;
    int present;
    struct kms_buf msg = KMS_BUF_INIT;
    struct kms_key_info k = {0};
    kms_err rc;

    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    KMS_GUARD(no_dry_run(r->in));
    KMS_GUARD(kms_in_enum_alg(r->in, "MacAlgorithm", 1, KMS_USAGE_GENERATE_VERIFY_MAC, alg));
    rc = kms_in_blob(r->in, "Message", 1, 1, MESSAGE_MAX, &msg, &present);
    if (rc == KMS_OK)
        rc = use_key(r, action, operation, KMS_USAGE_GENERATE_VERIFY_MAC, ref, held, &k);
    if (rc == KMS_OK)
        rc = kms_check_algorithm(&k, *alg);
    if (rc == KMS_OK) {
        *mac_len = MAC_MAX;
        rc = kms_keystore_sign(r->srv->ks, held, *alg, msg.data, msg.len, mac, mac_len, used);
    }
    kms_buf_free(&msg);
    kms_key_info_clear(&k);
    return rc;
}

kms_err kms_op_generate_mac(struct kms_request *r)
{
    int alg = -1;
    uint8_t mac[MAC_MAX];
    size_t mac_len = 0;
    struct kms_key_info used = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;

    kms_err rc = mac_of(r, "kms:GenerateMac", "GenerateMac", &held, &alg, mac, &mac_len, &used);
    if (rc == KMS_OK) {
        r->out = json_pack("{s:s, s:s}", "KeyId", used.arn, "MacAlgorithm", kms_alg(alg)->name);
        rc = r->out ? kms_out_blob(r->out, "Mac", mac, mac_len)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    OPENSSL_cleanse(mac, sizeof mac);
    kms_keystore_unhold(r->srv->ks, &held);
    kms_key_info_clear(&used);
    return rc;
}

kms_err kms_op_verify_mac(struct kms_request *r)
{
    int alg = -1, present;
    uint8_t mac[MAC_MAX];
    size_t mac_len = 0;
    struct kms_buf given = KMS_BUF_INIT;
    struct kms_key_info used = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;

    kms_err rc = kms_in_blob(r->in, "Mac", 1, 1, SIGNATURE_MAX, &given, &present);
    if (rc == KMS_OK)
        rc = mac_of(r, "kms:VerifyMac", "VerifyMac", &held, &alg, mac, &mac_len, &used);
    /* The lengths are public (the algorithm's); the bytes are compared in constant time. */
    if (rc == KMS_OK && (given.len != mac_len || CRYPTO_memcmp(given.data, mac, mac_len) != 0))
        rc = KMS_FAIL(KMS_ERR_BAD_MAC,
                      "The MAC is not valid for this message, KMS key and MAC algorithm");
    if (rc == KMS_OK) {
        r->out = json_pack("{s:s, s:s, s:b}", "KeyId", used.arn, "MacAlgorithm", kms_alg(alg)->name,
                           "MacValid", 1);
        if (!r->out)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    OPENSSL_cleanse(mac, sizeof mac);
    kms_keystore_unhold(r->srv->ks, &held);
    kms_buf_free(&given);
    kms_key_info_clear(&used);
    return rc;
}

kms_err kms_op_get_public_key(struct kms_request *r)
{
    const char *ref;
    struct kms_buf spki = KMS_BUF_INIT;
    struct kms_key_info k = {0}, used = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;
    kms_err rc;

    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    rc = kms_authorize(r, "kms:GetPublicKey", ref, KMS_REF_ALIAS, NULL, &held);
    if (rc == KMS_OK)
        rc = kms_keystore_key_info(r->srv->ks, &held, &k);
    if (rc == KMS_OK) {
        enum kms_key_kind kind = kms_spec(k.spec) ? kms_spec(k.spec)->kind : KMS_KIND_AES;
        r->key_version = k.current_version;
        if (kind == KMS_KIND_AES || kind == KMS_KIND_HMAC)
            rc = KMS_FAIL(KMS_ERR_UNSUPPORTED,
                          "%s has no public key: its KeySpec is %s. GetPublicKey takes an "
                          "asymmetric KMS key.",
                          k.arn, kms_spec(k.spec) ? kms_spec(k.spec)->name : "?");
    }
    if (rc == KMS_OK)
        rc = kms_keystore_public_key(r->srv->ks, &held, &spki, &used);
    if (rc == KMS_OK) {
        r->out = json_pack("{s:s}", "KeyId", used.arn);
        rc = r->out ? kms_out_key_type(r->out, used.spec, used.usage)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    if (rc == KMS_OK)
        rc = kms_out_blob(r->out, "PublicKey", spki.data, spki.len);
    kms_keystore_unhold(r->srv->ks, &held);
    kms_buf_free(&spki);
    kms_key_info_clear(&k);
    kms_key_info_clear(&used);
    return rc;
}

kms_err kms_op_derive_shared_secret(struct kms_request *r)
{
    const char *ref;
    int alg, present;
    struct kms_buf peer = KMS_BUF_INIT, point = KMS_BUF_INIT, secret = KMS_BUF_INIT;
    struct kms_key_info k = {0}, used = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;
    kms_err rc;

    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    KMS_GUARD(no_dry_run(r->in));
    KMS_ENSURE(!json_object_get(r->in, "Recipient"), KMS_ERR_UNSUPPORTED,
               "Recipient (Nitro Enclaves attestation) is not supported");
    KMS_GUARD(kms_in_enum_alg(r->in, "KeyAgreementAlgorithm", 1, KMS_USAGE_KEY_AGREEMENT, &alg));
    rc = kms_in_blob(r->in, "PublicKey", 1, 1, PEER_KEY_MAX, &peer, &present);
    if (rc == KMS_OK)
        rc = use_key(r, "kms:DeriveSharedSecret", "DeriveSharedSecret", KMS_USAGE_KEY_AGREEMENT,
                     ref, &held, &k);
    if (rc == KMS_OK)
        rc = kms_check_algorithm(&k, alg);
    if (rc == KMS_OK)
        rc = kms_pubkey_peer_point(k.spec, peer.data, peer.len, &point);
    if (rc == KMS_OK)
        rc = kms_keystore_derive(r->srv->ks, &held, point.data, point.len, &secret, &used);
    if (rc == KMS_OK) {
        r->out = json_pack("{s:s, s:s, s:s}", "KeyId", used.arn, "KeyAgreementAlgorithm",
                           kms_alg(alg)->name, "KeyOrigin", "AWS_KMS");
        rc = r->out ? kms_out_blob(r->out, "SharedSecret", secret.data, secret.len)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    kms_keystore_unhold(r->srv->ks, &held);
    kms_buf_free(&peer);
    kms_buf_free(&point);
    kms_buf_free(&secret);
    kms_key_info_clear(&k);
    kms_key_info_clear(&used);
    return rc;
}

/* KeyPairSpec, required: the RSA and NIST curve specs. */
static kms_err key_pair_spec(json_t *in, int *spec)
{
    static const int made[] = {KMS_SPEC_RSA_2048,      KMS_SPEC_RSA_3072,
                               KMS_SPEC_RSA_4096,      KMS_SPEC_ECC_NIST_P256,
                               KMS_SPEC_ECC_NIST_P384, KMS_SPEC_ECC_NIST_P521};
    const char *v;
    KMS_GUARD(kms_in_string(in, "KeyPairSpec", 1, 1, 64, &v));
    for (size_t i = 0; i < sizeof made / sizeof made[0]; i++) {
        if (strcmp(v, kms_spec(made[i])->name) == 0) {
            *spec = made[i];
            return KMS_OK;
        }
    }
    KMS_ENSURE(strcmp(v, "ECC_SECG_P256K1") != 0 && strcmp(v, "SM2") != 0 &&
                   strcmp(v, "ECC_NIST_EDWARDS25519") != 0,
               KMS_ERR_UNSUPPORTED, "KeyPairSpec %s is not supported by p11kms", v);
    return KMS_FAIL(
        KMS_ERR_VALIDATION,
        "1 validation error detected: Value '%.64s' at 'keyPairSpec' failed to satisfy "
        "constraint: Member must satisfy enum value set: [RSA_2048, RSA_3072, RSA_4096, "
        "ECC_NIST_P256, ECC_NIST_P384, ECC_NIST_P521, ECC_SECG_P256K1, SM2, "
        "ECC_NIST_EDWARDS25519]",
        v);
}

/*
 * A key pair made here (the private key is handed out, so it never was the
 * token's), its private key encrypted under a symmetric KMS key exactly as
 * GenerateDataKey encrypts a data key: same authorization, same blob, same
 * audit record.
 */
static kms_err generate_data_key_pair(struct kms_request *r, int with_plaintext)
{
    const char *operation =
        with_plaintext ? "GenerateDataKeyPair" : "GenerateDataKeyPairWithoutPlaintext";
    const char *action =
        with_plaintext ? "kms:GenerateDataKeyPair" : "kms:GenerateDataKeyPairWithoutPlaintext";
    const char *ref;
    int spec = -1;
    struct kms_buf ctx = KMS_BUF_INIT, pkcs8 = KMS_BUF_INIT, spki = KMS_BUF_INIT,
                   blob = KMS_BUF_INIT;
    struct kms_key_info k = {0}, used = {0};
    struct kms_key_ref held = KMS_KEY_REF_INIT;
    kms_err rc;

    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(key_pair_spec(r->in, &spec));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    KMS_GUARD(no_dry_run(r->in));
    KMS_ENSURE(!with_plaintext || !json_object_get(r->in, "Recipient"), KMS_ERR_UNSUPPORTED,
               "Recipient (Nitro Enclaves attestation) is not supported");
    rc = kms_in_context(r->in, "EncryptionContext", &ctx);
    if (rc == KMS_OK)
        rc = kms_authorize(r, action, ref, KMS_REF_ALIAS,
                           json_object_get(r->in, "EncryptionContext"), &held);
    if (rc == KMS_OK)
        rc = kms_keystore_key_info(r->srv->ks, &held, &k);
    if (rc == KMS_OK)
        rc = kms_check_symmetric(&k, operation);
    if (rc == KMS_OK)
        rc = kms_pubkey_generate_pair(spec, &pkcs8, &spki);
    if (rc == KMS_OK)
        rc = kms_keystore_encrypt_key(r->srv->ks, &held, &ctx, pkcs8.data, pkcs8.len, &blob, &used);
    if (rc == KMS_OK) {
        r->out = json_pack("{s:s, s:s}", "KeyId", used.arn, "KeyPairSpec", kms_spec(spec)->name);
        if (!r->out)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    if (rc == KMS_OK)
        rc = kms_out_blob(r->out, "PrivateKeyCiphertextBlob", blob.data, blob.len);
    if (rc == KMS_OK && with_plaintext)
        rc = kms_out_blob(r->out, "PrivateKeyPlaintext", pkcs8.data, pkcs8.len);
    if (rc == KMS_OK)
        rc = kms_out_blob(r->out, "PublicKey", spki.data, spki.len);
    kms_note_blob(r, NULL, &blob, &ctx);
    kms_keystore_unhold(r->srv->ks, &held);
    kms_buf_free(&pkcs8);
    kms_buf_free(&spki);
    kms_buf_free(&blob);
    kms_buf_free(&ctx);
    kms_key_info_clear(&k);
    kms_key_info_clear(&used);
    return rc;
}

kms_err kms_op_generate_data_key_pair(struct kms_request *r)
{
    return generate_data_key_pair(r, 1);
}

kms_err kms_op_generate_data_key_pair_without_plaintext(struct kms_request *r)
{
    return generate_data_key_pair(r, 0);
}
