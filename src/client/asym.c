/*
 * Asymmetric and HMAC keys: GetPublicKey, Sign, Verify, GenerateMac,
 * VerifyMac, DeriveSharedSecret, GenerateDataKeyPair(WithoutPlaintext) and
 * RSAES-OAEP Encrypt/Decrypt, with AWS's members and bounds.
 *
 * Algorithm names are checked against the common table (keyspec.h) before
 * anything is sent, so a typo is P11KMS_ERR_ARGUMENT here rather than a
 * ValidationException after a round trip; which algorithm a given key takes
 * is still the service's to say.
 *
 * What is secret in an answer (SharedSecret, PrivateKeyPlaintext, Plaintext)
 * is decoded into the secure heap (kms_client_secret_alloc) and jansson's
 * copy of its base64 text is wiped before the answer is freed; a plaintext
 * sent (Encrypt) is wiped from the request the same way. Signatures, tags,
 * public keys and blobs are not secret and live in ordinary memory; every
 * buffer handed out is released with p11kms_free all the same.
 */
#include "config.h"

#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/encoding.h"
#include "common/keyspec.h"

/* AWS's bounds on the members. */
#define SIGNATURE_MAX 6144
#define MAC_MAX 6144
#define PUBLIC_KEY_MAX 8192
#define BLOB_MAX 6144
#define PLAINTEXT_MAX 4096
#define SHARED_SECRET_MAX 1024 /* P-521: 66 bytes */
#define PRIVATE_KEY_MAX 8192   /* PKCS#8 of RSA_4096: about 2400 bytes */

#define DEFAULT_OAEP "RSAES_OAEP_SHA_256"

/* ---- requests and answers ------------------------------------------------------ */

/* Sets member name of req to the base64 of p (n bytes). */
static p11kms_status set_b64(json_t *req, const char *name, const uint8_t *p, size_t n)
{
    struct kms_buf b64 = KMS_BUF_INIT;
    json_t *v;
    p11kms_status st = P11KMS_OK;

    if (kms_b64_encode(p, n, &b64) != KMS_OK)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    v = json_stringn((const char *)b64.data, b64.len);
    if (!v || json_object_set_new(req, name, v) != 0)
        st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    kms_buf_free(&b64);
    return st;
}

/* Overwrites jansson's copy of a string member that carried a secret. */
static void wipe_member(json_t *j, const char *name)
{
    json_t *v = j ? json_object_get(j, name) : NULL;
    if (json_is_string(v))
        OPENSSL_cleanse((char *)json_string_value(v), json_string_length(v));
}

/*
 * A base64 member of the answer, decoded: 1 to max bytes, into the secure heap
 * when secret, else ordinary memory. *out is released with p11kms_free.
 */
static p11kms_status answer_bytes(const p11kms_client *c, const json_t *resp, const char *name,
                                  size_t max, int secret, uint8_t **out, size_t *out_len)
{
    const json_t *v = json_object_get(resp, name);
    struct kms_buf raw = KMS_BUF_INIT;
    p11kms_status st = P11KMS_OK;

    *out = NULL;
    *out_len = 0;
    if (!json_is_string(v))
        return kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer has no %s", name);
    if (kms_b64_decode(json_string_value(v), json_string_length(v), &raw) != KMS_OK ||
        raw.len == 0 || raw.len > max) {
        st = kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer's %s is not what it should be", name);
        goto cleanup;
    }
    *out = secret ? kms_client_secret_alloc(c, raw.len) : malloc(raw.len);
    if (!*out) {
        st = kms_client_fail(
            P11KMS_ERR_MEMORY,
            secret ? "no room in the secure heap for the %s" : "out of memory for the %s", name);
        goto cleanup;
    }
    memcpy(*out, raw.data, raw.len);
    *out_len = raw.len;
cleanup:
    kms_buf_free(&raw);
    return st;
}

/* A string member of the answer into out (cap bytes with the NUL). */
static p11kms_status answer_string(const json_t *resp, const char *name, char *out, size_t cap)
{
    const json_t *v = json_object_get(resp, name);
    if (!json_is_string(v) || json_string_length(v) == 0 || json_string_length(v) >= cap)
        return kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer's %s is missing or too long", name);
    memcpy(out, json_string_value(v), json_string_length(v) + 1);
    return P11KMS_OK;
}

/* The answer's member name must be true (SignatureValid, MacValid). */
static p11kms_status answer_true(const json_t *resp, const char *name)
{
    if (!json_is_true(json_object_get(resp, name)))
        return kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer's %s is not true", name);
    return P11KMS_OK;
}

/*
 * The algorithm's table entry when it is one of usage's (and, scheme >= 0, of
 * that scheme); else P11KMS_ERR_ARGUMENT naming what was expected.
 */
static p11kms_status check_algorithm(const char *algorithm, enum kms_key_usage usage, int scheme,
                                     const char *what, const struct kms_alg_info **out)
{
    int alg = algorithm ? kms_alg_by_name(algorithm) : -1;
    const struct kms_alg_info *info = alg >= 0 ? kms_alg(alg) : NULL;

    *out = NULL;
    if (!info || info->usage != usage ||
        (scheme >= 0 && info->scheme != (enum kms_alg_scheme)scheme))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "%.64s is not %s",
                               algorithm ? algorithm : "(null)", what);
    *out = info;
    return P11KMS_OK;
}

static p11kms_status check_message(const uint8_t *msg, size_t n)
{
    if (!msg || n == 0 || n > P11KMS_MESSAGE_MAX)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the message must be 1 to %d bytes",
                               P11KMS_MESSAGE_MAX);
    return P11KMS_OK;
}

static p11kms_status check_bytes(const char *what, const uint8_t *p, size_t n, size_t max)
{
    if (!p || n == 0 || n > max)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the %s must be 1 to %zu bytes", what, max);
    return P11KMS_OK;
}

/* ---- GetPublicKey ------------------------------------------------------------------ */

void p11kms_public_key_clear(struct p11kms_public_key *k)
{
    if (!k)
        return;
    p11kms_free(k->der, k->der_len);
    memset(k, 0, sizeof *k);
}

p11kms_status p11kms_get_public_key(p11kms_client *c, const char *key_id,
                                    struct p11kms_public_key *out)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (out)
        memset(out, 0, sizeof *out);
    if (!c || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_get_public_key: NULL argument");
    if ((st = kms_key_request(key_id, &req)) != P11KMS_OK)
        goto cleanup;
    if ((st = kms_transport_call(c, "GetPublicKey", req, &resp)) != P11KMS_OK)
        goto cleanup;
    st = answer_bytes(c, resp, "PublicKey", PUBLIC_KEY_MAX, 0, &out->der, &out->der_len);
    if (st == P11KMS_OK)
        st = answer_string(resp, "KeyId", out->key_arn, sizeof out->key_arn);
    if (st == P11KMS_OK && json_object_get(resp, "KeySpec"))
        st = answer_string(resp, "KeySpec", out->key_spec, sizeof out->key_spec);
    else if (st == P11KMS_OK) /* the deprecated name, which AWS still sends */
        st = answer_string(resp, "CustomerMasterKeySpec", out->key_spec, sizeof out->key_spec);
    if (st == P11KMS_OK)
        st = answer_string(resp, "KeyUsage", out->key_usage, sizeof out->key_usage);
cleanup:
    if (st != P11KMS_OK)
        p11kms_public_key_clear(out);
    json_decref(req);
    json_decref(resp);
    return st;
}

/* ---- Sign and Verify --------------------------------------------------------------- */

/*
 * The request both take: KeyId, Message, MessageType, SigningAlgorithm. A
 * digest must be as long as the algorithm's; Ed25519 signs messages only.
 */
static p11kms_status signing_request(const char *key_id, const char *algorithm,
                                     p11kms_message_type type, const uint8_t *msg, size_t n,
                                     json_t **out)
{
    const struct kms_alg_info *info;
    json_t *req = NULL;
    p11kms_status st;

    *out = NULL;
    if ((st = check_algorithm(algorithm, KMS_USAGE_SIGN_VERIFY, -1, "a signing algorithm",
                              &info)) != P11KMS_OK ||
        (st = check_message(msg, n)) != P11KMS_OK)
        return st;
    if (type != P11KMS_MESSAGE_RAW && type != P11KMS_MESSAGE_DIGEST)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the message type is RAW or DIGEST");
    if (type == P11KMS_MESSAGE_DIGEST && info->scheme == KMS_SCHEME_EDDSA)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "%s signs the message itself, not a digest",
                               info->name);
    if (type == P11KMS_MESSAGE_DIGEST && n != info->md_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "a %s digest is %zu bytes, not %zu", info->name,
                               info->md_len, n);
    if ((st = kms_key_request(key_id, &req)) != P11KMS_OK)
        return st;
    if (json_object_set_new(req, "MessageType",
                            json_string(type == P11KMS_MESSAGE_RAW ? "RAW" : "DIGEST")) != 0 ||
        json_object_set_new(req, "SigningAlgorithm", json_string(info->name)) != 0)
        st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    if (st == P11KMS_OK)
        st = set_b64(req, "Message", msg, n);
    if (st != P11KMS_OK) {
        json_decref(req);
        return st;
    }
    *out = req;
    return P11KMS_OK;
}

p11kms_status p11kms_sign(p11kms_client *c, const char *key_id, const char *algorithm,
                          p11kms_message_type type, const uint8_t *msg, size_t n, uint8_t **sig,
                          size_t *sig_len)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (sig)
        *sig = NULL;
    if (sig_len)
        *sig_len = 0;
    if (!c || !sig || !sig_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_sign: NULL argument");
    if ((st = signing_request(key_id, algorithm, type, msg, n, &req)) != P11KMS_OK)
        goto cleanup;
    if ((st = kms_transport_call(c, "Sign", req, &resp)) != P11KMS_OK)
        goto cleanup;
    st = answer_bytes(c, resp, "Signature", SIGNATURE_MAX, 0, sig, sig_len);
cleanup:
    json_decref(req);
    json_decref(resp);
    return st;
}

p11kms_status p11kms_verify(p11kms_client *c, const char *key_id, const char *algorithm,
                            p11kms_message_type type, const uint8_t *msg, size_t n,
                            const uint8_t *sig, size_t sig_len)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (!c)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_verify: NULL argument");
    if ((st = signing_request(key_id, algorithm, type, msg, n, &req)) != P11KMS_OK)
        goto cleanup;
    if ((st = check_bytes("signature", sig, sig_len, SIGNATURE_MAX)) != P11KMS_OK ||
        (st = set_b64(req, "Signature", sig, sig_len)) != P11KMS_OK)
        goto cleanup;
    if ((st = kms_transport_call(c, "Verify", req, &resp)) != P11KMS_OK)
        goto cleanup;
    st = answer_true(resp, "SignatureValid");
cleanup:
    json_decref(req);
    json_decref(resp);
    return st;
}

/* ---- GenerateMac and VerifyMac ------------------------------------------------------- */

static p11kms_status mac_request(const char *key_id, const char *algorithm, const uint8_t *msg,
                                 size_t n, json_t **out)
{
    const struct kms_alg_info *info;
    json_t *req = NULL;
    p11kms_status st;

    *out = NULL;
    if ((st = check_algorithm(algorithm, KMS_USAGE_GENERATE_VERIFY_MAC, -1, "a MAC algorithm",
                              &info)) != P11KMS_OK ||
        (st = check_message(msg, n)) != P11KMS_OK ||
        (st = kms_key_request(key_id, &req)) != P11KMS_OK)
        return st;
    if (json_object_set_new(req, "MacAlgorithm", json_string(info->name)) != 0)
        st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    if (st == P11KMS_OK)
        st = set_b64(req, "Message", msg, n);
    if (st != P11KMS_OK) {
        json_decref(req);
        return st;
    }
    *out = req;
    return P11KMS_OK;
}

p11kms_status p11kms_generate_mac(p11kms_client *c, const char *key_id, const char *algorithm,
                                  const uint8_t *msg, size_t n, uint8_t **mac, size_t *mac_len)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (mac)
        *mac = NULL;
    if (mac_len)
        *mac_len = 0;
    if (!c || !mac || !mac_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_generate_mac: NULL argument");
    if ((st = mac_request(key_id, algorithm, msg, n, &req)) != P11KMS_OK)
        goto cleanup;
    if ((st = kms_transport_call(c, "GenerateMac", req, &resp)) != P11KMS_OK)
        goto cleanup;
    st = answer_bytes(c, resp, "Mac", MAC_MAX, 0, mac, mac_len);
cleanup:
    json_decref(req);
    json_decref(resp);
    return st;
}

p11kms_status p11kms_verify_mac(p11kms_client *c, const char *key_id, const char *algorithm,
                                const uint8_t *msg, size_t n, const uint8_t *mac, size_t mac_len)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (!c)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_verify_mac: NULL argument");
    if ((st = mac_request(key_id, algorithm, msg, n, &req)) != P11KMS_OK)
        goto cleanup;
    if ((st = check_bytes("MAC", mac, mac_len, MAC_MAX)) != P11KMS_OK ||
        (st = set_b64(req, "Mac", mac, mac_len)) != P11KMS_OK)
        goto cleanup;
    if ((st = kms_transport_call(c, "VerifyMac", req, &resp)) != P11KMS_OK)
        goto cleanup;
    st = answer_true(resp, "MacValid");
cleanup:
    json_decref(req);
    json_decref(resp);
    return st;
}

/* ---- DeriveSharedSecret -------------------------------------------------------------- */

p11kms_status p11kms_derive_shared_secret(p11kms_client *c, const char *key_id, const uint8_t *peer,
                                          size_t peer_len, uint8_t **secret, size_t *secret_len)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (secret)
        *secret = NULL;
    if (secret_len)
        *secret_len = 0;
    if (!c || !secret || !secret_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_derive_shared_secret: NULL argument");
    if ((st = check_bytes("peer's public key", peer, peer_len, PUBLIC_KEY_MAX)) != P11KMS_OK ||
        (st = kms_key_request(key_id, &req)) != P11KMS_OK)
        goto cleanup;
    if (json_object_set_new(req, "KeyAgreementAlgorithm", json_string("ECDH")) != 0) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        goto cleanup;
    }
    if ((st = set_b64(req, "PublicKey", peer, peer_len)) != P11KMS_OK ||
        (st = kms_transport_call(c, "DeriveSharedSecret", req, &resp)) != P11KMS_OK)
        goto cleanup;
    st = answer_bytes(c, resp, "SharedSecret", SHARED_SECRET_MAX, 1, secret, secret_len);
cleanup:
    wipe_member(resp, "SharedSecret");
    json_decref(req);
    json_decref(resp);
    return st;
}

/* ---- GenerateDataKeyPair --------------------------------------------------------------- */

void p11kms_data_key_pair_clear(struct p11kms_data_key_pair *k)
{
    if (!k)
        return;
    p11kms_free(k->private_key, k->private_key_len);
    p11kms_free(k->private_key_blob, k->private_key_blob_len);
    p11kms_free(k->public_key, k->public_key_len);
    OPENSSL_cleanse(k, sizeof *k);
}

static p11kms_status data_key_pair(p11kms_client *c, const char *operation, int with_plaintext,
                                   const char *key_id, const char *key_pair_spec,
                                   const struct p11kms_context *ctx, size_t nctx,
                                   struct p11kms_data_key_pair *out)
{
    json_t *req = NULL, *resp = NULL;
    int spec = key_pair_spec ? kms_spec_by_name(key_pair_spec) : -1;
    const struct kms_spec_info *info = spec >= 0 ? kms_spec(spec) : NULL;
    p11kms_status st;

    if (out)
        memset(out, 0, sizeof *out);
    if (!c || !out || (nctx && !ctx))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "%s: NULL argument", operation);
    /* AWS's KeyPairSpec: RSA and NIST curves (and SM2, which is not ours). */
    if (!info || (info->kind != KMS_KIND_RSA && info->kind != KMS_KIND_EC))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "%.64s is not a key pair spec",
                               key_pair_spec ? key_pair_spec : "(null)");
    if ((st = kms_key_request(key_id, &req)) != P11KMS_OK)
        goto cleanup;
    if (json_object_set_new(req, "KeyPairSpec", json_string(info->name)) != 0) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        goto cleanup;
    }
    if ((st = kms_request_add_context(req, ctx, nctx)) != P11KMS_OK ||
        (st = kms_transport_call(c, operation, req, &resp)) != P11KMS_OK)
        goto cleanup;
    if (with_plaintext &&
        (st = answer_bytes(c, resp, "PrivateKeyPlaintext", PRIVATE_KEY_MAX, 1, &out->private_key,
                           &out->private_key_len)) != P11KMS_OK)
        goto cleanup;
    if ((st = answer_bytes(c, resp, "PrivateKeyCiphertextBlob", BLOB_MAX, 0, &out->private_key_blob,
                           &out->private_key_blob_len)) != P11KMS_OK ||
        (st = answer_bytes(c, resp, "PublicKey", PUBLIC_KEY_MAX, 0, &out->public_key,
                           &out->public_key_len)) != P11KMS_OK ||
        (st = answer_string(resp, "KeyId", out->key_arn, sizeof out->key_arn)) != P11KMS_OK ||
        (st = answer_string(resp, "KeyPairSpec", out->key_pair_spec, sizeof out->key_pair_spec)) !=
            P11KMS_OK)
        goto cleanup;
    if (strcmp(out->key_pair_spec, info->name) != 0)
        st = kms_client_fail(P11KMS_ERR_PROTOCOL, "asked for a %s pair, the answer is %s",
                             info->name, out->key_pair_spec);
cleanup:
    if (st != P11KMS_OK)
        p11kms_data_key_pair_clear(out);
    wipe_member(resp, "PrivateKeyPlaintext");
    json_decref(req);
    json_decref(resp);
    return st;
}

p11kms_status p11kms_generate_data_key_pair(p11kms_client *c, const char *key_id,
                                            const char *key_pair_spec,
                                            const struct p11kms_context *ctx, size_t nctx,
                                            struct p11kms_data_key_pair *out)
{
    return data_key_pair(c, "GenerateDataKeyPair", 1, key_id, key_pair_spec, ctx, nctx, out);
}

p11kms_status p11kms_generate_data_key_pair_without_plaintext(p11kms_client *c, const char *key_id,
                                                              const char *key_pair_spec,
                                                              const struct p11kms_context *ctx,
                                                              size_t nctx,
                                                              struct p11kms_data_key_pair *out)
{
    return data_key_pair(c, "GenerateDataKeyPairWithoutPlaintext", 0, key_id, key_pair_spec, ctx,
                         nctx, out);
}

/* ---- RSAES-OAEP Encrypt and Decrypt ----------------------------------------------------- */

/* {"KeyId", "EncryptionAlgorithm"}: algorithm NULL is RSAES_OAEP_SHA_256. */
static p11kms_status oaep_request(const char *key_id, const char *algorithm, json_t **out)
{
    const struct kms_alg_info *info;
    p11kms_status st;

    *out = NULL;
    if ((st = check_algorithm(algorithm ? algorithm : DEFAULT_OAEP, KMS_USAGE_ENCRYPT_DECRYPT,
                              KMS_SCHEME_OAEP, "an RSAES-OAEP algorithm", &info)) != P11KMS_OK ||
        (st = kms_key_request(key_id, out)) != P11KMS_OK)
        return st;
    if (json_object_set_new(*out, "EncryptionAlgorithm", json_string(info->name)) != 0) {
        json_decref(*out);
        *out = NULL;
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    }
    return P11KMS_OK;
}

p11kms_status p11kms_rsa_encrypt(p11kms_client *c, const char *key_id, const char *algorithm,
                                 const uint8_t *pt, size_t n, uint8_t **ct, size_t *ct_len)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (ct)
        *ct = NULL;
    if (ct_len)
        *ct_len = 0;
    if (!c || !ct || !ct_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_rsa_encrypt: NULL argument");
    if ((st = check_bytes("plaintext", pt, n, PLAINTEXT_MAX)) != P11KMS_OK ||
        (st = oaep_request(key_id, algorithm, &req)) != P11KMS_OK ||
        (st = set_b64(req, "Plaintext", pt, n)) != P11KMS_OK ||
        (st = kms_transport_call(c, "Encrypt", req, &resp)) != P11KMS_OK)
        goto cleanup;
    st = answer_bytes(c, resp, "CiphertextBlob", BLOB_MAX, 0, ct, ct_len);
cleanup:
    wipe_member(req, "Plaintext");
    json_decref(req);
    json_decref(resp);
    return st;
}

p11kms_status p11kms_rsa_decrypt(p11kms_client *c, const char *key_id, const char *algorithm,
                                 const uint8_t *ct, size_t n, uint8_t **pt, size_t *pt_len)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (pt)
        *pt = NULL;
    if (pt_len)
        *pt_len = 0;
    if (!c || !pt || !pt_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_rsa_decrypt: NULL argument");
    if ((st = check_bytes("ciphertext", ct, n, BLOB_MAX)) != P11KMS_OK ||
        (st = oaep_request(key_id, algorithm, &req)) != P11KMS_OK ||
        (st = set_b64(req, "CiphertextBlob", ct, n)) != P11KMS_OK ||
        (st = kms_transport_call(c, "Decrypt", req, &resp)) != P11KMS_OK)
        goto cleanup;
    st = answer_bytes(c, resp, "Plaintext", PLAINTEXT_MAX, 1, pt, pt_len);
cleanup:
    wipe_member(resp, "Plaintext");
    json_decref(req);
    json_decref(resp);
    return st;
}
