/*
 * The PKCS#11 layer: a module loaded through p11-kit, one token, a logged-in
 * user and a bounded pool of sessions. Every CK_RV is checked and mapped to a
 * kms_err; the CK_RV's name goes to the log, never to a client.
 */
#ifndef P11KMS_HSM_H
#define P11KMS_HSM_H

#include <p11-kit/pkcs11.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"

struct kms_hsm_config {
    const char *module; /* module path, or a name p11-kit resolves */
    const char *token;  /* token label, or an RFC 7512 "pkcs11:" URI */
    const char *pin;    /* user PIN; copied, the caller wipes its own */
    unsigned sessions;  /* pool size, at least 1 */
    unsigned acquire_timeout_ms;
};

struct kms_hsm;

struct kms_session {
    CK_SESSION_HANDLE handle;
    struct kms_hsm *hsm;
    int broken;    /* a session-level fault: reopen before reuse */
    CK_RV last_rv; /* the last call's answer */
};

/* The token calls p11kmsd times, for its metrics (one per kms_hsm_* function). */
enum kms_hsm_call {
    KMS_HSM_RANDOM,        /* C_GenerateRandom */
    KMS_HSM_GENERATE,      /* C_GenerateKey */
    KMS_HSM_ENCRYPT,       /* C_EncryptInit + C_Encrypt */
    KMS_HSM_DECRYPT,       /* C_DecryptInit + C_Decrypt */
    KMS_HSM_CREATE,        /* C_CreateObject */
    KMS_HSM_SET_ATTRIBUTE, /* C_SetAttributeValue */
    KMS_HSM_DESTROY,       /* C_DestroyObject */
    KMS_HSM_FIND,          /* C_FindObjectsInit, C_FindObjects..., C_FindObjectsFinal */
    KMS_HSM_GET_ATTRIBUTE, /* C_GetAttributeValue (twice: length, then value) */
    KMS_HSM_SIGN,          /* C_SignInit + C_Sign: the audit log's HMACs */
    KMS_HSM_WRAP,          /* C_WrapKey: a new key version under a root key */
    KMS_HSM_UNWRAP,        /* C_UnwrapKey: a stored version into a session object */
    KMS_HSM_GENERATE_PAIR, /* C_GenerateKeyPair: a new asymmetric key version */
    KMS_HSM_DERIVE,        /* C_DeriveKey: ECDH */
    KMS_HSM_CALL_COUNT
};
/* "C_Encrypt", ...: one name per call above. */
extern const char *const kms_hsm_call_names[KMS_HSM_CALL_COUNT + 1];
/*
 * Token calls that failed (each one logged as an error) in this process, by
 * return value: up to n pairs of a name ("CKR_DEVICE_ERROR", ..., and last
 * "other" for any return value not named) and a count, always in the same
 * order; answers how many pairs it wrote.
 */
#define KMS_HSM_FAILURE_KINDS 18
size_t kms_hsm_failures(const char **names, uint64_t *counts, size_t n);

/* Called after every timed call, from the calling thread; must be cheap. */
typedef void (*kms_hsm_observer)(void *arg, enum kms_hsm_call call, uint64_t ns);

struct kms_hsm_load {
    unsigned sessions; /* in the pool */
    unsigned in_use;
    unsigned waiting; /* threads waiting for one */
};

KMS_MUST_CHECK kms_err kms_hsm_open(const struct kms_hsm_config *cfg, struct kms_hsm **out);
/* Set before the first call is made. */
void kms_hsm_observe(struct kms_hsm *hsm, kms_hsm_observer fn, void *arg);
void kms_hsm_load(struct kms_hsm *hsm, struct kms_hsm_load *out);
void kms_hsm_close(struct kms_hsm *hsm);
/* True when the token answers and the user is logged in. */
int kms_hsm_ready(struct kms_hsm *hsm);

/* Takes a session from the pool, waiting at most the configured time. */
KMS_MUST_CHECK kms_err kms_hsm_acquire(struct kms_hsm *hsm, struct kms_session **out);
void kms_hsm_release(struct kms_session *s);

KMS_MUST_CHECK kms_err kms_hsm_random(struct kms_session *s, uint8_t *out, size_t n);

/* ---- root keys and wrapped key versions (DESIGN §5) ---- */

/*
 * Generates a root key: AES-256 token object, private, sensitive, not
 * extractable, CKA_WRAP and CKA_UNWRAP only (no encrypt, decrypt, sign).
 */
KMS_MUST_CHECK kms_err kms_hsm_generate_root(struct kms_session *s, const uint8_t *id,
                                             size_t id_len, const char *label,
                                             CK_OBJECT_HANDLE *out);
/* The secret key object with this CKA_ID, or CK_INVALID_HANDLE when there is none. */
KMS_MUST_CHECK kms_err kms_hsm_find_secret(struct kms_session *s, const uint8_t *id, size_t id_len,
                                           CK_OBJECT_HANDLE *out);
/*
 * A new AES-256 key generated in the token as a session object, wrapped at
 * once under root with CKM_AES_KEY_WRAP_PAD (RFC 5649) and destroyed: only
 * the wrapped form leaves the token. *len is in: the room in out, out: the
 * wrapped length (40 bytes for AES-256).
 */
KMS_MUST_CHECK kms_err kms_hsm_new_wrapped_aes(struct kms_session *s, CK_OBJECT_HANDLE root,
                                               uint8_t *out, size_t *len);
/*
 * Unwraps a stored version into a session object of the holder session
 * (kms_hsm_hold): sensitive, not extractable, encrypt/decrypt only. A wrapped
 * key the root refuses (tampered, truncated, another root) is
 * KMS_ERR_INTERNAL: a stored row is corrupt, not a bad request.
 */
KMS_MUST_CHECK kms_err kms_hsm_unwrap_aes(struct kms_session *holder, CK_OBJECT_HANDLE root,
                                          const uint8_t *wrapped, size_t len,
                                          CK_OBJECT_HANDLE *out);
/*
 * The holder session: one long-lived session outside the pool that owns the
 * node's unwrapped session objects (they live as long as it does). Taken by
 * one thread at a time; reopened (and logged in again) when the token lost
 * it. Every reopening, and every new login on any session, loses the session
 * objects: kms_hsm_epoch changes then, and every handle of a session object
 * or a token object found before must be dropped.
 */
KMS_MUST_CHECK kms_err kms_hsm_hold(struct kms_hsm *hsm, struct kms_session **out);
void kms_hsm_unhold(struct kms_session *holder);
unsigned long kms_hsm_epoch(struct kms_hsm *hsm);

/* ---- asymmetric and HMAC key versions (hsm_keys.c; specs in common/keyspec.h) ---- */

/*
 * Whether the token lists mechanism m. The token's whole list is read on the
 * first question and remembered (a failed read is not: the answer is then 0
 * and the next question asks again).
 */
int kms_hsm_has_mechanism(struct kms_hsm *hsm, CK_MECHANISM_TYPE m);
/*
 * A new key of spec (enum kms_key_spec, not SYMMETRIC_DEFAULT) for usage
 * (enum kms_key_usage): a key pair (RSA, e = 65537; EC on the spec's curve;
 * Edwards; Montgomery) or an HMAC secret of the spec's length, generated in
 * the token as session objects; the private half (or the secret) is wrapped
 * at once under root with CKM_AES_KEY_WRAP_PAD and every object destroyed:
 * only the wrapped form and the public key leave the token. *len is in: the
 * room in wrapped, out: its length. spki receives the public key as DER
 * SubjectPublicKeyInfo (nothing for HMAC). A spec the token has no mechanism
 * for is KMS_ERR_UNSUPPORTED, the message naming the mechanism (SoftHSM2
 * 2.6.1: X25519, CKM_EC_MONTGOMERY_KEY_PAIR_GEN); so is a key the token makes
 * but will not wrap (SoftHSM2 2.6.1: Ed25519). A spec that does not allow
 * usage is KMS_ERR_VALIDATION. On failure wrapped is wiped, spki untouched,
 * and no object is left in the token.
 */
KMS_MUST_CHECK kms_err kms_hsm_new_wrapped_key(struct kms_session *s, CK_OBJECT_HANDLE root,
                                               int spec, int usage, uint8_t *wrapped, size_t *len,
                                               struct kms_buf *spki);
/*
 * Unwraps a version made by kms_hsm_new_wrapped_key into a session object of
 * the holder session (kms_hsm_hold): sensitive, not extractable, allowed only
 * what usage needs (CKA_DECRYPT, CKA_SIGN, CKA_DERIVE; CKA_SIGN for HMAC).
 * Refused by the root: KMS_ERR_INTERNAL, as kms_hsm_unwrap_aes.
 */
KMS_MUST_CHECK kms_err kms_hsm_unwrap_key(struct kms_session *holder, CK_OBJECT_HANDLE root,
                                          int spec, int usage, const uint8_t *wrapped, size_t len,
                                          CK_OBJECT_HANDLE *out);
/*
 * A signature or MAC by key (of spec) with alg (enum kms_alg). in is the
 * digest (the algorithm's md_len bytes) for RSASSA-PSS, RSASSA-PKCS1-v1_5 and
 * ECDSA; the message for Ed25519 and HMAC. out receives it in AWS's form
 * (ECDSA: DER ECDSA-Sig-Value); *out_len is in: the room, out: the length.
 * A digest of the wrong length, or an alg the spec does not allow, is
 * KMS_ERR_VALIDATION; a key without CKA_SIGN is refused by the token
 * (KMS_ERR_INTERNAL).
 */
KMS_MUST_CHECK kms_err kms_hsm_sign_alg(struct kms_session *s, CK_OBJECT_HANDLE key, int spec,
                                        int alg, const uint8_t *in, size_t n, uint8_t *out,
                                        size_t *out_len);
/*
 * RSAES-OAEP decryption under key with alg (the private-key operation in the
 * token). A ciphertext that does not decrypt is KMS_ERR_INVALID_CIPHERTEXT
 * with one message whatever the cause; out is left as it was on failure.
 * The plaintext is appended to out. Where the token does not take
 * CKM_RSA_PKCS_OAEP with alg's digest (SoftHSM2 2.6.1 takes SHA-1 only) it
 * does the raw RSA operation (CKM_RSA_X_509) and the padding is removed in
 * the process, in constant time; which, is found once per alg and remembered.
 */
KMS_MUST_CHECK kms_err kms_hsm_oaep_decrypt(struct kms_session *s, CK_OBJECT_HANDLE key, int spec,
                                            int alg, const uint8_t *ct, size_t n,
                                            struct kms_buf *out);
/*
 * ECDH (CKM_ECDH1_DERIVE, CKD_NULL) between key and the peer's public point
 * (the uncompressed point for an EC key, 32 bytes for X25519): out receives
 * the shared secret (the x coordinate, the field's size in bytes), appended.
 * A point of the wrong length or form is KMS_ERR_VALIDATION (check a peer's
 * key with kms_pubkey_peer_point first: that one also checks the curve).
 */
KMS_MUST_CHECK kms_err kms_hsm_ecdh(struct kms_session *s, CK_OBJECT_HANDLE key, int spec,
                                    const uint8_t *peer, size_t n, struct kms_buf *out);

/*
 * Generates a 256-bit AES key inside the token: token object, private,
 * sensitive, not extractable, encrypt/decrypt only.
 */
KMS_MUST_CHECK kms_err kms_hsm_generate_aes(struct kms_session *s, const uint8_t *id, size_t id_len,
                                            const char *label, CK_OBJECT_HANDLE *out);

/* AES-GCM with a 96-bit IV and 128-bit tag; out receives n + 16 bytes. */
KMS_MUST_CHECK kms_err kms_hsm_gcm_encrypt(struct kms_session *s, CK_OBJECT_HANDLE key,
                                           const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
                                           const uint8_t *in, size_t n, uint8_t *out);
/*
 * in is ciphertext followed by the tag (n >= 16); out receives n - 16 bytes.
 * A wrong tag is KMS_ERR_INVALID_CIPHERTEXT and out is wiped.
 */
KMS_MUST_CHECK kms_err kms_hsm_gcm_decrypt(struct kms_session *s, CK_OBJECT_HANDLE key,
                                           const uint8_t iv[12], const uint8_t *aad, size_t aad_len,
                                           const uint8_t *in, size_t n, uint8_t *out);

/* A private token CKO_DATA object with CKA_APPLICATION "p11kms" and the given CKA_OBJECT_ID. */
KMS_MUST_CHECK kms_err kms_hsm_create_data(struct kms_session *s, const char *label,
                                           const uint8_t *oid, size_t oid_len, const void *value,
                                           size_t n, CK_OBJECT_HANDLE *out);
/* Replaces an object's CKA_LABEL. */
KMS_MUST_CHECK kms_err kms_hsm_set_label(struct kms_session *s, CK_OBJECT_HANDLE h,
                                         const char *label);
KMS_MUST_CHECK kms_err kms_hsm_destroy(struct kms_session *s, CK_OBJECT_HANDLE h);

/* All objects matching tmpl; *out is malloc'd (free it), *count may be 0. */
KMS_MUST_CHECK kms_err kms_hsm_find(struct kms_session *s, CK_ATTRIBUTE *tmpl, CK_ULONG n,
                                    CK_OBJECT_HANDLE **out, size_t *count);
/* One variable-length attribute's bytes, appended to out. */
KMS_MUST_CHECK kms_err kms_hsm_get_bytes(struct kms_session *s, CK_OBJECT_HANDLE h,
                                         CK_ATTRIBUTE_TYPE type, struct kms_buf *out);

/*
 * Several attributes in one call, into the caller's buffers (pValue,
 * ulValueLen: their sizes; on return the lengths). An attribute that does
 * not fit or that the object lacks is KMS_ERR_NOT_FOUND, nothing logged.
 */
KMS_MUST_CHECK kms_err kms_hsm_get_attributes(struct kms_session *s, CK_OBJECT_HANDLE h,
                                              CK_ATTRIBUTE *tmpl, CK_ULONG n);

/*
 * Initialises a fresh token on the first slot that has none, with the given
 * label, SO PIN and user PIN. For development mode; the module is loaded,
 * used and released here.
 */
KMS_MUST_CHECK kms_err kms_hsm_init_token(const char *module, const char *label, const char *so_pin,
                                          const char *user_pin);

/* Maps a CK_RV to our error, logging its name with what was being done. */
kms_err kms_hsm_fail(CK_RV rv, const char *what, const char *file, int line);
#define KMS_GUARD_CKR(rv, what)                                        \
    do {                                                               \
        CK_RV kms_ckr_ = (rv);                                         \
        if (kms_ckr_ != CKR_OK)                                        \
            return kms_hsm_fail(kms_ckr_, (what), __FILE__, __LINE__); \
    } while (0)

/* ---- the audit log's key and records (src/server/audit.c) ---- */

/*
 * Generates a 256-bit generic secret inside the token for HMAC-SHA256: token
 * object, private, sensitive, not extractable, sign/verify only.
 */
KMS_MUST_CHECK kms_err kms_hsm_generate_hmac(struct kms_session *s, const uint8_t *id,
                                             size_t id_len, const char *label,
                                             CK_OBJECT_HANDLE *out);
/* HMAC-SHA256 of data under a token key (CKM_SHA256_HMAC); out receives 32 bytes. */
KMS_MUST_CHECK kms_err kms_hsm_hmac_sha256(struct kms_session *s, CK_OBJECT_HANDLE key,
                                           const uint8_t *data, size_t n, uint8_t out[32]);
/*
 * As kms_hsm_create_data, under another CKA_APPLICATION: objects the key
 * store's scans (application "p11kms") neither see nor pay for.
 */
KMS_MUST_CHECK kms_err kms_hsm_create_app_data(struct kms_session *s, const char *application,
                                               const char *label, const uint8_t *oid,
                                               size_t oid_len, const void *value, size_t n,
                                               CK_OBJECT_HANDLE *out);

#endif
