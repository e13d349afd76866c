/*
 * libp11kms: the p11kms client library.
 *
 * A client speaks the AWS KMS JSON protocol to p11kmsd (or any service that
 * speaks it) over libcurl with SigV4 signatures, retries with backoff and a
 * circuit breaker, keeps unwrapped data keys in a cache in locked memory
 * (OpenSSL's secure heap), and seals payloads as JWE (RFC 7516, A256GCM)
 * under data keys it gets from the service.
 *
 * One client may be shared by any number of threads. Every function returns
 * a p11kms_status; p11kms_last_error() gives the message of the calling
 * thread's last failure (never key material or plaintext). Buffers this
 * library returns that may hold secrets are released with p11kms_free(),
 * which wipes them.
 *
 * Fail closed: when no data key can be had, sealing fails; nothing is ever
 * sent or stored in plaintext as a fallback.
 */
#ifndef P11KMS_H
#define P11KMS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define P11KMS_VERSION_MAJOR 0
#define P11KMS_VERSION_MINOR 1
#define P11KMS_VERSION_PATCH 0
#define P11KMS_VERSION_STRING "0.1.0"

/* Marks what libp11kms exports; it is built with -fvisibility=hidden. */
#if defined(__GNUC__) && !defined(P11KMS_NO_EXPORT)
#define P11KMS_API __attribute__((visibility("default")))
#else
#define P11KMS_API
#endif

typedef enum p11kms_status {
    P11KMS_OK = 0,
    /* the library's own */
    P11KMS_ERR_ARGUMENT,     /* a bad argument (NULL, too long, malformed key id...) */
    P11KMS_ERR_MEMORY,       /* out of memory, or the secure heap is full */
    P11KMS_ERR_MEMORY_LOCK,  /* memory cannot be locked and require_locked_memory is set */
    P11KMS_ERR_CONFIG,       /* no endpoint, no credentials, an unusable option */
    P11KMS_ERR_TRANSPORT,    /* no answer: connection refused, reset, timed out (after retries) */
    P11KMS_ERR_CIRCUIT_OPEN, /* the circuit breaker is open: the service is failing */
    P11KMS_ERR_PROTOCOL,     /* an answer that is not what the protocol says */
    P11KMS_ERR_MALFORMED,    /* a JWE that does not parse, or a header we do not accept */
    P11KMS_ERR_DECRYPT,      /* a JWE whose tag does not verify (altered, or wrong context) */
    P11KMS_ERR_TRUNCATED,    /* a stream that ends before its final chunk */
    /* the service's, one per AWS error type */
    P11KMS_ERR_VALIDATION,           /* ValidationException */
    P11KMS_ERR_SERIALIZATION,        /* SerializationException */
    P11KMS_ERR_NOT_FOUND,            /* NotFoundException */
    P11KMS_ERR_ALREADY_EXISTS,       /* AlreadyExistsException */
    P11KMS_ERR_DISABLED,             /* DisabledException */
    P11KMS_ERR_INVALID_STATE,        /* KMSInvalidStateException */
    P11KMS_ERR_INVALID_CIPHERTEXT,   /* InvalidCiphertextException */
    P11KMS_ERR_INCORRECT_KEY,        /* IncorrectKeyException */
    P11KMS_ERR_INVALID_ALIAS,        /* InvalidAliasNameException */
    P11KMS_ERR_INVALID_ARN,          /* InvalidArnException */
    P11KMS_ERR_INVALID_KEY_USAGE,    /* InvalidKeyUsageException */
    P11KMS_ERR_LIMIT_EXCEEDED,       /* LimitExceededException */
    P11KMS_ERR_UNSUPPORTED,          /* UnsupportedOperationException */
    P11KMS_ERR_UNKNOWN_OPERATION,    /* UnknownOperationException */
    P11KMS_ERR_ACCESS_DENIED,        /* AccessDeniedException */
    P11KMS_ERR_MISSING_AUTH,         /* MissingAuthenticationTokenException */
    P11KMS_ERR_INCOMPLETE_SIGNATURE, /* IncompleteSignatureException */
    P11KMS_ERR_INVALID_SIGNATURE,    /* InvalidSignatureException */
    P11KMS_ERR_UNRECOGNIZED_CLIENT,  /* UnrecognizedClientException */
    P11KMS_ERR_MALFORMED_POLICY,     /* MalformedPolicyDocumentException */
    P11KMS_ERR_THROTTLED,            /* ThrottlingException */
    P11KMS_ERR_INTERNAL,             /* KMSInternalException */
    P11KMS_ERR_KEY_UNAVAILABLE,      /* KeyUnavailableException */
    P11KMS_ERR_DEPENDENCY_TIMEOUT,   /* DependencyTimeoutException */
    P11KMS_ERR_SERVICE,              /* another error type the service named */
    /* more of the service's, appended so the numbers above stay as they were */
    P11KMS_ERR_BAD_SIGNATURE,       /* KMSInvalidSignatureException: Verify said the signature
                                       does not verify (not SigV4's InvalidSignatureException) */
    P11KMS_ERR_BAD_MAC,             /* KMSInvalidMacException: VerifyMac said the MAC does not */
    P11KMS_ERR_INVALID_GRANT_ID,    /* InvalidGrantIdException */
    P11KMS_ERR_INVALID_GRANT_TOKEN, /* InvalidGrantTokenException */
    /* ---- tags and paging ---- */
    P11KMS_ERR_TAG,            /* TagException: a tag key or value the service refuses */
    P11KMS_ERR_INVALID_MARKER, /* InvalidMarkerException: a Marker no page answered */
    P11KMS_STATUS_COUNT
} p11kms_status;

/* "OK", "CircuitOpen", ... or the AWS error type name ("NotFoundException"). */
P11KMS_API const char *p11kms_status_name(p11kms_status s);
/* The calling thread's last failure message; "" when none. */
P11KMS_API const char *p11kms_last_error(void);

struct p11kms_options {
    /* The service. NULL: P11KMS_ENDPOINT, then AWS_ENDPOINT_URL. */
    const char *endpoint;
    /* NULL: AWS_REGION, then AWS_DEFAULT_REGION, then "us-east-1". */
    const char *region;
    /* NULL: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN. Copied. */
    const char *access_key_id;
    const char *secret_access_key;
    const char *session_token;
    /* TLS: server verification is always on; ca_file replaces the system CAs. */
    const char *ca_file;
    const char *client_cert_file; /* PEM, with client_key_file: a client certificate */
    const char *client_key_file;
    /* Timeouts. */
    unsigned connect_timeout_ms; /* 0: 5000 */
    unsigned timeout_ms;         /* one attempt, whole; 0: 10000 */
    /* Retries (ThrottlingException/429, 5xx, connection errors): full jitter. */
    unsigned max_attempts;    /* 0: 4 (the first and 3 retries); 1: no retry */
    unsigned retry_base_ms;   /* 0: 50; the n-th retry waits random(0, min(cap, base * 2^n)) */
    unsigned retry_cap_ms;    /* 0: 2000; a Retry-After is honoured up to this */
    unsigned retry_budget_ms; /* 0: 15000; no retry starts after this much time in a call */
    /* Circuit breaker: opens after this many consecutive failed calls, fails fast while
       open, lets one probe through (half-open) after the cool-down. */
    unsigned breaker_threshold;   /* 0: 5 */
    unsigned breaker_cooldown_ms; /* 0: 5000 */
    /* Data-key cache, as the AWS Encryption SDK's caching materials manager. */
    unsigned cache_max_age_s;    /* 0: no cache */
    size_t cache_max_entries;    /* 0: 1000; least recently used goes first */
    uint64_t cache_max_messages; /* per data key sealed with; 0: 2^32 */
    uint64_t cache_max_bytes;    /* per data key sealed with; 0: 2^62 */
    unsigned cache_grace_s;      /* open with a cached data key up to this long past its
                                    age while the service cannot be reached; 0: never */
    int require_locked_memory;   /* fail p11kms_client_new when memory cannot be locked */
};

/* The defaults: every field 0 or NULL. */
P11KMS_API void p11kms_options_init(struct p11kms_options *o);

typedef struct p11kms_client p11kms_client;

P11KMS_API p11kms_status p11kms_client_new(const struct p11kms_options *o, p11kms_client **out);
/* Wipes the cache and frees everything; NULL is fine. */
P11KMS_API void p11kms_client_free(p11kms_client *c);

/* 1 when the cache lives in locked memory (the secure heap). */
P11KMS_API int p11kms_client_memory_locked(const p11kms_client *c);

/* One encryption-context pair (NUL-terminated UTF-8). */
struct p11kms_context {
    const char *key;
    const char *value;
};

/* A data key: plaintext in the secure heap, blob and ARN ordinary memory. */
struct p11kms_data_key {
    uint8_t *plaintext;
    size_t plaintext_len;
    uint8_t *blob;
    size_t blob_len;
    char key_arn[256];
};
/* Wipes and frees what the key holds; the struct is zeroed. */
P11KMS_API void p11kms_data_key_clear(struct p11kms_data_key *k);

/* GenerateDataKey (AES_256) under key_id (id, ARN or alias) with the context. */
P11KMS_API p11kms_status p11kms_generate_data_key(p11kms_client *c, const char *key_id,
                                                  const struct p11kms_context *ctx, size_t nctx,
                                                  struct p11kms_data_key *out);
/* Decrypt of a data key's blob (through the cache when it is on). */
P11KMS_API p11kms_status p11kms_decrypt_data_key(p11kms_client *c, const uint8_t *blob,
                                                 size_t blob_len, const struct p11kms_context *ctx,
                                                 size_t nctx, struct p11kms_data_key *out);

/*
 * Seals payload as a JWE in compact serialization under a data key of key_id
 * (from the cache when it is on and within its limits, else from
 * GenerateDataKey). The protected header holds alg "dir", enc "A256GCM",
 * "p11kms_blob" (the data key's blob, base64url), "kid" (the key ARN) and
 * "p11kms_ctx" (the encryption context), so it is the AAD that binds them.
 * *out is NUL-terminated; release it with p11kms_free.
 */
P11KMS_API p11kms_status p11kms_seal(p11kms_client *c, const char *key_id,
                                     const struct p11kms_context *ctx, size_t nctx,
                                     const uint8_t *payload, size_t n, char **out, size_t *out_len);
/*
 * Opens a JWE made by p11kms_seal (or by any JOSE library with the same
 * header): the context must equal the one it was sealed with. *out is
 * released with p11kms_free.
 */
P11KMS_API p11kms_status p11kms_open(p11kms_client *c, const char *jwe, size_t len,
                                     const struct p11kms_context *ctx, size_t nctx, uint8_t **out,
                                     size_t *out_len);

/*
 * Any operation of the service: request_json is the request body (a JSON
 * object; NULL for {}), *response_json the answer's (NUL-terminated, "{}" for
 * an empty answer; release with p11kms_free). For the management operations
 * the CLI offers (CreateKey, ListKeys, PutKeyPolicy, ...).
 */
P11KMS_API p11kms_status p11kms_call(p11kms_client *c, const char *operation,
                                     const char *request_json, char **response_json,
                                     size_t *response_len);

/* ---- streaming envelopes (docs/format.md): large payloads, constant memory ---- */

/* Reads up to cap bytes into buf; *got 0 means the end of the input. */
typedef p11kms_status (*p11kms_read_fn)(void *arg, uint8_t *buf, size_t cap, size_t *got);
/* Writes n bytes (all of them, or fails). */
typedef p11kms_status (*p11kms_write_fn)(void *arg, const uint8_t *buf, size_t n);
/* Called after each chunk with the plaintext bytes done so far. */
typedef void (*p11kms_progress_fn)(void *arg, uint64_t done);

struct p11kms_stream_options {
    size_t chunk_size; /* plaintext bytes per chunk; 0: 65536 (at most 16 MiB); decryption
                          ignores it and uses the stream's own */
    p11kms_progress_fn progress;
    void *progress_arg;
};

/*
 * Encrypts everything in reads under a fresh data key of key_id, writing the
 * stream (header, then chunks, the last one flagged) through out.
 */
P11KMS_API p11kms_status p11kms_stream_encrypt(p11kms_client *c, const char *key_id,
                                               const struct p11kms_context *ctx, size_t nctx,
                                               const struct p11kms_stream_options *o,
                                               p11kms_read_fn in, void *in_arg, p11kms_write_fn out,
                                               void *out_arg);
/*
 * Decrypts a stream: each chunk's plaintext is written only after its tag
 * verifies. A stream that ends before its final chunk is P11KMS_ERR_TRUNCATED
 * (after the verified chunks were written); anything altered, reordered or
 * repeated is P11KMS_ERR_DECRYPT; a context other than the stream's too.
 */
P11KMS_API p11kms_status p11kms_stream_decrypt(p11kms_client *c, const struct p11kms_context *ctx,
                                               size_t nctx, const struct p11kms_stream_options *o,
                                               p11kms_read_fn in, void *in_arg, p11kms_write_fn out,
                                               void *out_arg);
/* 1 when p (n bytes, at least 4) starts a stream rather than a JWE. */
P11KMS_API int p11kms_stream_detect(const uint8_t *p, size_t n);

/* ---- asymmetric and HMAC keys (AWS KMS's operations for them) ---- */

/*
 * Algorithms are AWS's names, as NUL-terminated strings: "RSASSA_PSS_SHA_256",
 * "ECDSA_SHA_384", "HMAC_SHA_384", "RSAES_OAEP_SHA_256"... A name the library
 * does not know, or one of the wrong kind for the call, is P11KMS_ERR_ARGUMENT
 * before anything is sent. Messages (Sign, Verify, GenerateMac, VerifyMac) are
 * 1 to P11KMS_MESSAGE_MAX bytes, as AWS bounds them.
 */
#define P11KMS_MESSAGE_MAX 4096

/* A key's public half, as GetPublicKey answers it. Nothing in it is secret. */
struct p11kms_public_key {
    uint8_t *der; /* DER SubjectPublicKeyInfo */
    size_t der_len;
    char key_spec[32];  /* "RSA_4096", "ECC_NIST_P256", ... */
    char key_usage[32]; /* "SIGN_VERIFY", "ENCRYPT_DECRYPT", "KEY_AGREEMENT" */
    char key_arn[256];
};
/* Frees what the key holds; the struct is zeroed. */
P11KMS_API void p11kms_public_key_clear(struct p11kms_public_key *k);

/*
 * GetPublicKey of an asymmetric key.
 * @param c       the client
 * @param key_id  id, ARN, alias name or alias ARN
 * @param out     filled on P11KMS_OK (zeroed on failure); the caller owns it and
 *                releases it with p11kms_public_key_clear
 * @returns P11KMS_OK; P11KMS_ERR_UNSUPPORTED for a symmetric or HMAC key; any
 *          status of the call
 */
P11KMS_API p11kms_status p11kms_get_public_key(p11kms_client *c, const char *key_id,
                                               struct p11kms_public_key *out);

/* Sign and Verify's MessageType. */
typedef enum p11kms_message_type {
    P11KMS_MESSAGE_RAW = 0,   /* the message itself; the service digests it */
    P11KMS_MESSAGE_DIGEST = 1 /* the message's digest, as long as the algorithm's */
} p11kms_message_type;

/*
 * Sign with an asymmetric key of usage SIGN_VERIFY.
 * @param c, key_id   the client and the key
 * @param algorithm   "RSASSA_PSS_SHA_256", ..., "ECDSA_SHA_512", "ED25519_SHA_512"
 * @param type        RAW: msg is the message; DIGEST: msg is its digest (ED25519 takes RAW only)
 * @param msg, n      1 to P11KMS_MESSAGE_MAX bytes
 * @param sig, sig_len receive the signature (PKCS#1 / PSS bytes, DER ECDSA-Sig-Value, or
 *                    Ed25519's 64 bytes); *sig is the caller's, released with p11kms_free
 * @returns P11KMS_OK; P11KMS_ERR_INVALID_KEY_USAGE for a key that does not sign; any
 *          status of the call. On failure *sig is NULL.
 */
P11KMS_API p11kms_status p11kms_sign(p11kms_client *c, const char *key_id, const char *algorithm,
                                     p11kms_message_type type, const uint8_t *msg, size_t n,
                                     uint8_t **sig, size_t *sig_len);
/*
 * Verify, by the service, a signature made with the key's private half.
 * @param sig, sig_len  the signature, 1 to 6144 bytes
 * @returns P11KMS_OK when it verifies; P11KMS_ERR_BAD_SIGNATURE when it does not
 *          (KMSInvalidSignatureException); any other status of the call
 */
P11KMS_API p11kms_status p11kms_verify(p11kms_client *c, const char *key_id, const char *algorithm,
                                       p11kms_message_type type, const uint8_t *msg, size_t n,
                                       const uint8_t *sig, size_t sig_len);

/*
 * GenerateMac with an HMAC key (the key never leaves the service).
 * @param algorithm  "HMAC_SHA_224", "HMAC_SHA_256", "HMAC_SHA_384" or "HMAC_SHA_512"; the
 *                   key's spec decides which one the service accepts
 * @param msg, n     1 to P11KMS_MESSAGE_MAX bytes
 * @param mac, mac_len receive the tag; *mac is the caller's, released with p11kms_free
 * @returns P11KMS_OK; P11KMS_ERR_INVALID_KEY_USAGE for a key of another usage; any status
 *          of the call. On failure *mac is NULL.
 */
P11KMS_API p11kms_status p11kms_generate_mac(p11kms_client *c, const char *key_id,
                                             const char *algorithm, const uint8_t *msg, size_t n,
                                             uint8_t **mac, size_t *mac_len);
/*
 * VerifyMac: the service recomputes the tag and compares.
 * @returns P11KMS_OK when mac is the message's tag; P11KMS_ERR_BAD_MAC when it is not
 *          (KMSInvalidMacException); any other status of the call
 */
P11KMS_API p11kms_status p11kms_verify_mac(p11kms_client *c, const char *key_id,
                                           const char *algorithm, const uint8_t *msg, size_t n,
                                           const uint8_t *mac, size_t mac_len);

/*
 * DeriveSharedSecret (KeyAgreementAlgorithm ECDH) between the key, of usage
 * KEY_AGREEMENT, and a peer's public key.
 * @param peer, peer_len  the peer's DER SubjectPublicKeyInfo on the key's curve, 1 to 8192
 *                        bytes
 * @param secret, secret_len receive the raw shared secret (the x coordinate); it is a
 *                        secret: in the secure heap when there is one, the caller's,
 *                        released (wiped) with p11kms_free. Derive keys from it with a KDF;
 *                        do not use it as a key directly.
 * @returns P11KMS_OK; P11KMS_ERR_VALIDATION for a peer key on another curve; any status of
 *          the call. On failure *secret is NULL.
 */
P11KMS_API p11kms_status p11kms_derive_shared_secret(p11kms_client *c, const char *key_id,
                                                     const uint8_t *peer, size_t peer_len,
                                                     uint8_t **secret, size_t *secret_len);

/* A data key pair: the private key in the secure heap, the rest ordinary memory. */
struct p11kms_data_key_pair {
    uint8_t *private_key; /* DER PKCS#8 PrivateKeyInfo; NULL from _without_plaintext */
    size_t private_key_len;
    uint8_t *private_key_blob; /* PrivateKeyCiphertextBlob: the private key encrypted under
                                  key_id; p11kms_decrypt_data_key gives the PKCS#8 back */
    size_t private_key_blob_len;
    uint8_t *public_key; /* DER SubjectPublicKeyInfo */
    size_t public_key_len;
    char key_pair_spec[32]; /* "RSA_2048", "ECC_NIST_P256", ... */
    char key_arn[256];
};
/* Wipes and frees what the pair holds; the struct is zeroed. */
P11KMS_API void p11kms_data_key_pair_clear(struct p11kms_data_key_pair *k);

/*
 * GenerateDataKeyPair under a symmetric key, with an encryption context.
 * @param key_pair_spec  "RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256",
 *                       "ECC_NIST_P384" or "ECC_NIST_P521"
 * @param ctx, nctx      the encryption context bound to private_key_blob (may be empty)
 * @param out            filled on P11KMS_OK, zeroed on failure; released with
 *                       p11kms_data_key_pair_clear
 * @returns P11KMS_OK or any status of the call
 */
P11KMS_API p11kms_status p11kms_generate_data_key_pair(p11kms_client *c, const char *key_id,
                                                       const char *key_pair_spec,
                                                       const struct p11kms_context *ctx,
                                                       size_t nctx,
                                                       struct p11kms_data_key_pair *out);
/* The same through GenerateDataKeyPairWithoutPlaintext: out->private_key stays NULL. */
P11KMS_API p11kms_status p11kms_generate_data_key_pair_without_plaintext(
    p11kms_client *c, const char *key_id, const char *key_pair_spec,
    const struct p11kms_context *ctx, size_t nctx, struct p11kms_data_key_pair *out);

/*
 * Encrypt under an RSA key of usage ENCRYPT_DECRYPT (RSAES-OAEP, in the service).
 * @param algorithm  "RSAES_OAEP_SHA_1" or "RSAES_OAEP_SHA_256"; NULL: RSAES_OAEP_SHA_256
 * @param pt, n      1 byte up to the key's limit (RSA_2048 with SHA-256: 190 bytes)
 * @param ct, ct_len receive the ciphertext (the modulus' size); released with p11kms_free
 * @returns P11KMS_OK or any status of the call. On failure *ct is NULL.
 */
P11KMS_API p11kms_status p11kms_rsa_encrypt(p11kms_client *c, const char *key_id,
                                            const char *algorithm, const uint8_t *pt, size_t n,
                                            uint8_t **ct, size_t *ct_len);
/*
 * Decrypt, in the token, what p11kms_rsa_encrypt (or anyone holding the public key)
 * encrypted. key_id is required, as AWS requires it for asymmetric keys.
 * @param pt, pt_len receive the plaintext: a secret, in the secure heap when there is
 *                   one, released (wiped) with p11kms_free
 * @returns P11KMS_OK; P11KMS_ERR_INVALID_CIPHERTEXT when it does not decrypt; any status
 *          of the call. On failure *pt is NULL.
 */
P11KMS_API p11kms_status p11kms_rsa_decrypt(p11kms_client *c, const char *key_id,
                                            const char *algorithm, const uint8_t *ct, size_t n,
                                            uint8_t **pt, size_t *pt_len);

/* ---- authenticated headers: a MAC over a list of HTTP header fields ---- */

/*
 * The canonical form of a list of header fields (docs/client.md, "Authenticated
 * headers"): "p11kms-headers-v1" and a NUL, the count as 4 bytes big-endian, then
 * each field, sorted by its lower-cased name (bytewise; fields of one name keep
 * the caller's order), as 4-byte big-endian length and lower-cased name, 4-byte
 * big-endian length and value. Two different lists (after lower-casing the names)
 * never give the same bytes.
 * @param names, values  n NUL-terminated strings each; a name is an HTTP token
 *                       (RFC 9110 §5.6.2) of 1 to 256 bytes; a value is 0 to 4096 bytes
 *                       of visible ASCII, obs-text, space and tab, without whitespace at
 *                       either end (as an HTTP parser would hand it over)
 * @param out, out_len   receive the bytes (at most P11KMS_MESSAGE_MAX); released with
 *                       p11kms_free
 * @returns P11KMS_OK; P11KMS_ERR_ARGUMENT for a bad name or value, or a list whose form
 *          is over P11KMS_MESSAGE_MAX bytes; P11KMS_ERR_MEMORY
 */
P11KMS_API p11kms_status p11kms_headers_canonical(const char *const *names,
                                                  const char *const *values, size_t n,
                                                  uint8_t **out, size_t *out_len);
/*
 * The MAC (GenerateMac with an HMAC key) of the headers' canonical form.
 * @param algorithm  NULL: "HMAC_SHA_384" (an HMAC_384 key)
 * @param tag, tag_len receive the tag; released with p11kms_free
 * @returns P11KMS_OK, or a status of p11kms_headers_canonical or p11kms_generate_mac
 */
P11KMS_API p11kms_status p11kms_headers_mac(p11kms_client *c, const char *key_id,
                                            const char *const *names, const char *const *values,
                                            size_t n, const char *algorithm, uint8_t **tag,
                                            size_t *tag_len);
/*
 * Checks a tag made by p11kms_headers_mac (VerifyMac of the canonical form).
 * @returns P11KMS_OK when the tag is the headers'; P11KMS_ERR_BAD_MAC when a name, a
 *          value, their order within a name, or the tag differ; any other status
 */
P11KMS_API p11kms_status p11kms_headers_verify(p11kms_client *c, const char *key_id,
                                               const char *const *names, const char *const *values,
                                               size_t n, const char *algorithm, const uint8_t *tag,
                                               size_t tag_len);

/* ---- envelopes to public keys: JWE (RSA-OAEP-256, ECDH-ES+A256KW) and CMS ---- */

/*
 * A recipient of an envelope (docs/client.md, docs/format.md). Sealing to a
 * public key needs no service call; only the holder of the private key --
 * for a KMS key, the service, whose token never lets it out -- can open.
 */
typedef struct p11kms_recipient p11kms_recipient;

/**
 * A KMS key as a recipient. An asymmetric key (RSA ENCRYPT_DECRYPT, EC
 * KEY_AGREEMENT): its public half, fetched with GetPublicKey once per client
 * and key id (later calls take it from the client's cache). A symmetric key
 * (SYMMETRIC_DEFAULT): CMS only, a KEKRecipientInfo that costs one
 * GenerateDataKey at sealing (JWE to a symmetric key is p11kms_seal). A key of
 * another usage is P11KMS_ERR_INVALID_KEY_USAGE. The JWE "kid" is the key's ARN.
 */
P11KMS_API p11kms_status p11kms_recipient_from_key(p11kms_client *c, const char *key_id,
                                                   p11kms_recipient **out);

/**
 * A public key held outside the service: PEM ("PUBLIC KEY" or "CERTIFICATE"),
 * DER SubjectPublicKeyInfo or certificate, or a JWK (JSON; kty RSA, EC with
 * P-256 or P-384, OKP with X25519). RSA keys of 2048 bits or more; EC keys on
 * P-256, P-384 or P-521 (CMS) or X25519 (JWE). kid (NULL: none, or the JWK's
 * own "kid") names the key in a JWE; a certificate's issuer and serial number
 * name it in CMS, else its SubjectKeyIdentifier (RFC 5280 method 1).
 */
P11KMS_API p11kms_status p11kms_recipient_from_public(const uint8_t *data, size_t n,
                                                      const char *kid, p11kms_recipient **out);

/* Frees a recipient; NULL is fine. */
P11KMS_API void p11kms_recipient_free(p11kms_recipient *r);

typedef enum p11kms_envelope_format {
    P11KMS_FORMAT_JWE_COMPACT = 0, /* JWE compact serialization: exactly one recipient */
    P11KMS_FORMAT_JWE_JSON = 1,    /* JWE general JSON serialization: one or more */
    P11KMS_FORMAT_CMS = 2          /* DER ContentInfo, AuthEnvelopedData, AES-256-GCM */
} p11kms_envelope_format;

/**
 * Seals payload (at most 64 MiB) to every recipient: a fresh AES-256 content
 * key encrypts it (A256GCM), and each recipient gets the content key wrapped
 * for it -- RSA: RSA-OAEP-256 (JWE) or RSAES-OAEP with SHA-256 (CMS
 * KeyTransRecipientInfo); EC: ECDH-ES+A256KW (JWE) or ECDH with an ephemeral
 * key, X9.63 KDF with SHA-256 and AES-256 key wrap (CMS KeyAgreeRecipientInfo).
 * c is needed only for a symmetric KMS-key recipient (else it may be NULL).
 * @param out, out_len receive the envelope (for JWE, text without a NUL);
 *                     released with p11kms_free
 */
P11KMS_API p11kms_status p11kms_envelope_seal(p11kms_client *c, p11kms_envelope_format format,
                                              p11kms_recipient *const *recipients,
                                              size_t n_recipients, const uint8_t *payload, size_t n,
                                              uint8_t **out, size_t *out_len);

/* What may open an envelope. Zero it, then set what you have. */
struct p11kms_opener {
    /* Through the service: the recipient's private key stays in the token. */
    p11kms_client *client;
    /* The KMS key to open with; NULL: the one the envelope names (a JWE's kid, a CMS
       KEKRecipientInfo's kekid). A CMS KeyTransRecipientInfo or KeyAgreeRecipientInfo
       names no KMS key: without key_id it is P11KMS_ERR_ARGUMENT. */
    const char *key_id;
    /* A JWE "dir" envelope (p11kms_seal's) is opened with this encryption context. */
    const struct p11kms_context *context;
    size_t n_context;
    /* Or a local private key: PEM or DER (PKCS#8, or the traditional RSA/EC forms),
       or a JWK with its private members. */
    const uint8_t *private_key;
    size_t private_key_len;
};

/**
 * Opens a JWE (compact or JSON, any of the algs above or p11kms_seal's "dir")
 * or a CMS AuthEnvelopedData (DER, or PEM "CMS"/"PKCS7"), telling them apart
 * by their first bytes. Tries each recipient the opener can serve, in order;
 * nothing comes out unless the content's tag verifies.
 * Errors: P11KMS_ERR_MALFORMED (does not parse, an algorithm not accepted,
 * wrong curve), P11KMS_ERR_DECRYPT (no recipient the opener can serve, or a
 * key or tag that does not verify), the service's (P11KMS_ERR_INVALID_KEY_USAGE,
 * P11KMS_ERR_ACCESS_DENIED...).
 * @param out, out_len receive the payload; released (wiped) with p11kms_free
 */
P11KMS_API p11kms_status p11kms_envelope_open(const struct p11kms_opener *o, const uint8_t *in,
                                              size_t n, uint8_t **out, size_t *out_len);

/* The format of in: a p11kms_envelope_format, or -1 when it is neither JWE nor CMS. */
P11KMS_API int p11kms_envelope_detect(const uint8_t *in, size_t n);

/* ---- tags and grants (manage.c) ---------------------------------------------- */

/*
 * Arguments are checked before anything is sent (P11KMS_ERR_ARGUMENT, with
 * p11kms_last_error saying which): the bounds below are AWS's, lengths of
 * tag keys and values in Unicode characters of their UTF-8. The service's
 * own refusals come back as their types: P11KMS_ERR_TAG (an aws: tag key, a
 * tag key twice), P11KMS_ERR_LIMIT_EXCEEDED (over 50 tags on the key),
 * P11KMS_ERR_INVALID_STATE (a key pending deletion), P11KMS_ERR_NOT_FOUND...
 */
#define P11KMS_TAGS_MAX 50
#define P11KMS_TAG_KEY_MAX 128   /* characters */
#define P11KMS_TAG_VALUE_MAX 256 /* characters; 0 is allowed */

struct p11kms_tag {
    const char *key;
    const char *value;
};

/* A key's tags as listed: the strings are the list's, freed by p11kms_tag_list_clear. */
struct p11kms_tag_list {
    struct p11kms_tag *tags;
    size_t n;
};
P11KMS_API void p11kms_tag_list_clear(struct p11kms_tag_list *l);

/*
 * TagResource: adds tags to a key (a key id or key ARN), replacing the value
 * of a tag key it has. n from 1 to P11KMS_TAGS_MAX, tag keys distinct.
 */
P11KMS_API p11kms_status p11kms_tag_resource(p11kms_client *c, const char *key_id,
                                             const struct p11kms_tag *tags, size_t n);
/* UntagResource: removes these tag keys (1 to P11KMS_TAGS_MAX); one the key lacks is no error. */
P11KMS_API p11kms_status p11kms_untag_resource(p11kms_client *c, const char *key_id,
                                               const char *const *keys, size_t n);
/*
 * ListResourceTags, every page: out receives all the key's tags in the
 * service's order (p11kms: byte order of the tag keys). On failure out is
 * empty.
 */
P11KMS_API p11kms_status p11kms_list_resource_tags(p11kms_client *c, const char *key_id,
                                                   struct p11kms_tag_list *out);

/* A grant's operations are AWS's names ("Decrypt", "GenerateDataKey", ...). */
#define P11KMS_GRANT_NAME_MAX 256
#define P11KMS_PRINCIPAL_MAX 256
#define P11KMS_GRANT_TOKEN_MAX 8192

/* One grant as ListGrants shows it; the strings are the list's. */
struct p11kms_grant {
    char grant_id[65];     /* 64 hex digits */
    char *key_id;          /* the key's ARN */
    char *name;            /* NULL: none */
    char *grantee;         /* GranteePrincipal */
    char *retiring;        /* RetiringPrincipal; NULL: none */
    char *issuing_account; /* IssuingAccount */
    long long created;     /* CreationDate, seconds since the epoch */
    char **operations;
    size_t noperations;
    /* The constraint: pairs of EncryptionContextEquals (equals 1) or ...Subset (0). */
    struct p11kms_context *context;
    size_t ncontext;
    int equals;
};
struct p11kms_grant_list {
    struct p11kms_grant *grants;
    size_t n;
};
P11KMS_API void p11kms_grant_list_clear(struct p11kms_grant_list *l);

/*
 * CreateGrant on a key (id, ARN, alias): grantee (a principal, 1 to
 * P11KMS_PRINCIPAL_MAX bytes) may call operations (1 to 17 of AWS's grant
 * operations) on it; retiring (NULL: none) may retire it. nctx pairs of ctx
 * constrain it to requests whose encryption context equals them (equals 1)
 * or contains them (equals 0); nctx 0: no constraint. name (NULL: none; 1 to
 * 256 of [a-zA-Z0-9:/_-]) makes a retry with the same arguments return the
 * same grant.
 * @param grant_id receives the grant id (NUL-terminated)
 * @param grant_token receives the grant token (NUL-terminated; release with
 *                    p11kms_free(*grant_token, strlen(*grant_token) + 1)); NULL when
 *                    not wanted
 */
P11KMS_API p11kms_status p11kms_create_grant(p11kms_client *c, const char *key_id,
                                             const char *grantee, const char *retiring,
                                             const char *const *operations, size_t nops,
                                             const struct p11kms_context *ctx, size_t nctx,
                                             int equals, const char *name, char grant_id[65],
                                             char **grant_token);
/*
 * RetireGrant: by its token (key_id and grant_id NULL), or by key (id or ARN)
 * and grant id (grant_token NULL); exactly one of the two ways.
 */
P11KMS_API p11kms_status p11kms_retire_grant(p11kms_client *c, const char *grant_token,
                                             const char *key_id, const char *grant_id);
/* RevokeGrant: a key's grant, by the key's id or ARN and the grant id. */
P11KMS_API p11kms_status p11kms_revoke_grant(p11kms_client *c, const char *key_id,
                                             const char *grant_id);
/* ListGrants, every page: the key's grants. On failure out is empty. */
P11KMS_API p11kms_status p11kms_list_grants(p11kms_client *c, const char *key_id,
                                            struct p11kms_grant_list *out);

/* Wipes n bytes at p and frees them (p may be NULL). */
P11KMS_API void p11kms_free(void *p, size_t n);

#ifdef __cplusplus
}
#endif

#endif
