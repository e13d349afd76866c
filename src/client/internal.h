/*
 * libp11kms internals shared by its files:
 *   client.c    options, p11kms_client_new/free, status names, last error
 *   transport.c libcurl, SigV4 signing, retries with full jitter, circuit breaker
 *   keys.c      p11kms_generate_data_key / p11kms_decrypt_data_key (cache-aware)
 *   cache.c     the data-key cache in the secure heap
 *   jwe.c       JWE compact/JSON serialization with A256GCM
 *   envelope.c  p11kms_seal / p11kms_open: data keys + cache + JWE
 *   stream.c    p11kms_stream_*: chunked AES-256-GCM for large payloads
 *   asym.c      asymmetric and HMAC keys: GetPublicKey, Sign, Verify, GenerateMac,
 *               VerifyMac, DeriveSharedSecret, GenerateDataKeyPair, RSA Encrypt/Decrypt
 *   headers.c   authenticated headers: the canonical form, MACed through asym.c
 *   recipient.c envelopes to public keys: recipients, the public-key cache, local
 *               private keys, p11kms_envelope_seal/open/detect
 *   jwk.c       JWKs (RFC 7517/7518/8037) to and from EVP_PKEYs
 *   jwe_pk.c    JWE to public keys: RSA-OAEP-256, ECDH-ES+A256KW; compact and JSON
 *   cms.c       CMS AuthEnvelopedData (RFC 5083/5084) through OpenSSL's CMS API
 *   cms_provider.c  an OpenSSL provider whose keys are KMS keys: CMS opens through
 *               the service (RSA-OAEP decryption, ECDH derivation) with it
 */
#ifndef P11KMS_CLIENT_INTERNAL_H
#define P11KMS_CLIENT_INTERNAL_H

#include <jansson.h>
#include <openssl/evp.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/types.h>

#include "p11kms.h"

struct kms_cache;
struct kms_transport;
struct kms_jwe_hdr;      /* a parsed protected header, shared and counted (jwe.c) */
struct kms_pubkey_entry; /* a cached GetPublicKey answer (recipient.c) */

/*
 * The protected header parsed last, so that opening JWEs sealed under the
 * same data key and context (whose headers are the same text) parses it
 * once. Only a header whose text is byte for byte the memo's is taken from
 * it, and that text is still the AAD the tag is checked against: an altered
 * header is parsed afresh and fails the tag as before. Safe to share between
 * threads.
 */
struct kms_jwe_memo {
    pthread_mutex_t lock;     /* guards last, the pointer, only */
    struct kms_jwe_hdr *last; /* one reference held */
};

struct p11kms_client {
    struct p11kms_options opt; /* strings point into the copies below */
    char *endpoint, *region, *access_key_id, *secret_access_key, *session_token;
    char *ca_file, *client_cert_file, *client_key_file;
    struct kms_transport *transport;
    struct kms_cache *cache;          /* NULL when cache_max_age_s is 0 */
    struct kms_jwe_memo jwe_memo;     /* p11kms_open's last protected header */
    pthread_mutex_t pubkeys_lock;     /* guards pubkeys */
    struct kms_pubkey_entry *pubkeys; /* GetPublicKey answers by key id, newest first */
    int memory_locked;
};

/* Records the calling thread's failure message and returns s. */
p11kms_status kms_client_fail(p11kms_status s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* The status for an AWS error type name ("NotFoundException"), P11KMS_ERR_SERVICE if unknown. */
p11kms_status kms_client_status_of_type(const char *type);
/*
 * n bytes for a secret (a data key, an answer carrying one): from the secure
 * heap when it is set up, else -- unless require_locked_memory is set --
 * ordinary memory. Release with p11kms_free (it wipes either kind).
 */
void *kms_client_secret_alloc(const p11kms_client *c, size_t n);

/* ---- transport.c ---- */
p11kms_status kms_transport_new(p11kms_client *c, struct kms_transport **out);
void kms_transport_free(struct kms_transport *t);
/*
 * One operation ("GenerateDataKey") with a JSON request: signs, sends,
 * retries and goes through the breaker. On P11KMS_OK *response is the answer
 * (an object, maybe empty); else NULL and the service's error maps to its
 * status, with its message as the thread's last error.
 */
p11kms_status kms_transport_call(p11kms_client *c, const char *operation, const json_t *request,
                                 json_t **response);

/*
 * The circuit breaker, with the clock passed in (tests drive it by hand).
 * Closed: calls go; a failed call (transport error, 5xx, throttling, after
 * its retries) counts, any answer from the service resets the count; at
 * threshold consecutive failures it opens. Open: calls fail fast until
 * cooldown_ms have passed; then the first call is let through as the probe
 * (half-open) and every other call fails fast until the probe ends: success
 * closes, failure re-opens for another cool-down. Each change of state bumps
 * generation: results of calls let in before it no longer count. The caller
 * holds the lock that guards b.
 */
enum kms_breaker_state { KMS_BREAKER_CLOSED, KMS_BREAKER_OPEN, KMS_BREAKER_HALF_OPEN };
enum kms_breaker_result {
    KMS_BREAKER_SUCCESS, /* the service answered (2xx, or a 4xx client error) */
    KMS_BREAKER_FAILURE, /* transport error, 5xx or throttling */
    KMS_BREAKER_NONE     /* nothing learned (a local error before sending) */
};
struct kms_breaker {
    unsigned threshold, cooldown_ms;
    enum kms_breaker_state state;
    unsigned failures; /* consecutive, while closed */
    uint64_t opened_at_ms;
    uint64_t generation;
};
struct kms_breaker_ticket {
    uint64_t generation;
    int probe;
};
void kms_breaker_init(struct kms_breaker *b, unsigned threshold, unsigned cooldown_ms);
/* 1: the call may go (*t says how to report it); 0: fail fast. */
int kms_breaker_admit_locked(struct kms_breaker *b, uint64_t now_ms, struct kms_breaker_ticket *t);
void kms_breaker_record_locked(struct kms_breaker *b, const struct kms_breaker_ticket *t,
                               enum kms_breaker_result r, uint64_t now_ms);
/*
 * Full jitter: the wait before retry number `retry` (1 for the first) is
 * rnd() mod (ceiling + 1) with ceiling = min(cap_ms, base_ms * 2^retry); a
 * Retry-After (0: none) raises it to min(retry_after_ms, cap_ms).
 */
uint64_t kms_backoff_ms(unsigned retry, unsigned base_ms, unsigned cap_ms, uint64_t retry_after_ms,
                        uint64_t (*rnd)(void *arg), void *rnd_arg);
/* The breaker's state now (tests and diagnostics). */
enum kms_breaker_state kms_transport_breaker_state(struct kms_transport *t);

/* ---- keys.c: straight to the service, no cache ---- */
p11kms_status kms_service_generate(p11kms_client *c, const char *key_id,
                                   const struct p11kms_context *ctx, size_t nctx,
                                   struct p11kms_data_key *out);
p11kms_status kms_service_decrypt(p11kms_client *c, const uint8_t *blob, size_t blob_len,
                                  const struct p11kms_context *ctx, size_t nctx,
                                  struct p11kms_data_key *out);

/* A key id (id, ARN, alias): 1 to 2048 bytes, else P11KMS_ERR_ARGUMENT. */
p11kms_status kms_check_key_id(const char *key_id);
/* A request {"KeyId": key_id}, the key id checked first; *out is the caller's. */
p11kms_status kms_key_request(const char *key_id, json_t **out);
/* Adds the context as the request's EncryptionContext (nothing when nctx is 0). */
p11kms_status kms_request_add_context(json_t *req, const struct p11kms_context *ctx, size_t nctx);

/*
 * p11kms_decrypt_data_key for a caller that has checked its arguments and
 * made canon, the canonical form of ctx, already.
 */
p11kms_status kms_decrypt_data_key_canon(p11kms_client *c, const uint8_t *blob, size_t blob_len,
                                         const struct p11kms_context *ctx, size_t nctx,
                                         const uint8_t *canon, size_t canon_len,
                                         struct p11kms_data_key *out);

/* ---- cache.c ---- */
p11kms_status kms_cache_new(const struct p11kms_options *o, struct kms_cache **out);
void kms_cache_free(struct kms_cache *cache);
/*
 * Decrypt side: a copy of the data key for (blob, canonical context), if
 * cached and younger than cache_max_age_s (plus cache_grace_s when grace is
 * set: the service cannot be reached). P11KMS_ERR_NOT_FOUND when not.
 */
p11kms_status kms_cache_get_decrypt(struct kms_cache *cache, const uint8_t *blob, size_t blob_len,
                                    const uint8_t *canon_ctx, size_t canon_len, int grace,
                                    struct p11kms_data_key *out);
#define KMS_CACHE_KEY_LEN 32
/*
 * The same without grace, for a caller that needs only the key: copied into
 * key, the caller's to wipe (OPENSSL_cleanse) when done; nothing allocated.
 */
p11kms_status kms_cache_get_decrypt_key(struct kms_cache *cache, const uint8_t *blob,
                                        size_t blob_len, const uint8_t *canon_ctx, size_t canon_len,
                                        uint8_t key[KMS_CACHE_KEY_LEN]);
void kms_cache_put_decrypt(struct kms_cache *cache, const struct p11kms_data_key *k,
                           const uint8_t *canon_ctx, size_t canon_len);
/*
 * Encrypt side: a copy of a cached data key for (key_id, canonical context)
 * that may seal `bytes` more bytes; counts the message and bytes against it.
 */
p11kms_status kms_cache_take_for_seal(struct kms_cache *cache, const char *key_id,
                                      const uint8_t *canon_ctx, size_t canon_len, uint64_t bytes,
                                      struct p11kms_data_key *out);
void kms_cache_put_for_seal(struct kms_cache *cache, const char *key_id, const uint8_t *canon_ctx,
                            size_t canon_len, const struct p11kms_data_key *k, uint64_t bytes);
/* 1 when the cache's entries live in locked memory (the secure heap); 0 when not. */
int kms_cache_locked(const struct kms_cache *cache);
/* Entries held now, both sides together. */
size_t kms_cache_count(struct kms_cache *cache);
/* Tests: the clock in milliseconds (NULL: CLOCK_BOOTTIME); set before any other use. */
void kms_cache_set_clock(struct kms_cache *cache, uint64_t (*now_ms)(void *arg), void *arg);
/* Tests: where key slot i lives and its size, to check evicted slots are zero. */
p11kms_status kms_cache_debug_slot(struct kms_cache *cache, size_t i, const uint8_t **p, size_t *n);

/* The canonical form of a context (the server's, src/common/blob.h); malloc'd. */
p11kms_status kms_client_canonical(const struct p11kms_context *ctx, size_t nctx, uint8_t **out,
                                   size_t *out_len);

/* ---- jwe.c: RFC 7516, "alg":"dir", "enc":"A256GCM" ---- */
#define KMS_JWE_KEY_LEN 32
#define KMS_JWE_IV_LEN 12
#define KMS_JWE_TAG_LEN 16
#define KMS_JWE_MAX_PAYLOAD ((size_t)64 << 20) /* plaintext bytes */
#define KMS_JWE_MAX_HEADER ((size_t)64 << 10)  /* protected header JSON bytes */
#define KMS_JWE_MAX_BLOB 6144                  /* as AWS bounds a CiphertextBlob */

enum kms_jwe_form { KMS_JWE_COMPACT, KMS_JWE_FLATTENED };

/*
 * A parsed JWE; nothing in it is secret. kms_jwe_clear releases it. The
 * header's pieces (kid to aad) live in hdr, which JWEs with the same
 * protected header may share: read-only.
 */
struct kms_jwe {
    struct kms_jwe_hdr *hdr;
    json_t *header;      /* the protected header, an object */
    const char *kid;     /* in header */
    const uint8_t *blob; /* p11kms_blob, decoded */
    size_t blob_len;
    const struct p11kms_context *ctx; /* p11kms_ctx; strings in header */
    size_t nctx;
    const uint8_t *canon; /* kms_client_canonical of ctx; NULL when it has none */
    size_t canon_len;
    const char *aad; /* ASCII(BASE64URL(UTF8(protected header))), NUL-terminated */
    size_t aad_len;
    uint8_t iv[KMS_JWE_IV_LEN];
    uint8_t tag[KMS_JWE_TAG_LEN];
    uint8_t *ciphertext;
    size_t ciphertext_len;
};

/* A memo starts empty; destroying it releases the header it holds. */
p11kms_status kms_jwe_memo_init(struct kms_jwe_memo *m);
void kms_jwe_memo_destroy(struct kms_jwe_memo *m);

/*
 * Seals payload under key: the protected header holds alg, enc, kid,
 * p11kms_blob and p11kms_ctx (members in that order, context keys sorted).
 * iv NULL: a fresh random one (tests pass a fixed one). *out is
 * NUL-terminated, malloc'd.
 */
p11kms_status kms_jwe_seal(enum kms_jwe_form form, const uint8_t key[KMS_JWE_KEY_LEN],
                           const uint8_t *iv, const char *kid, const uint8_t *blob, size_t blob_len,
                           const struct p11kms_context *ctx, size_t nctx, const uint8_t *payload,
                           size_t n, char **out, size_t *out_len);
/* Parses the compact or the flattened JSON serialization; P11KMS_ERR_MALFORMED when not ours. */
p11kms_status kms_jwe_parse(const char *token, size_t len, struct kms_jwe *out);
/* The same, taking the protected header from memo when it is the one parsed last there. */
p11kms_status kms_jwe_parse_memo(const char *token, size_t len, struct kms_jwe_memo *memo,
                                 struct kms_jwe *out);
/*
 * AES-256-GCM open of a parsed JWE. *out (malloc'd, release with
 * p11kms_free) is set only when the tag verifies; else P11KMS_ERR_DECRYPT.
 */
p11kms_status kms_jwe_decrypt(const struct kms_jwe *j, const uint8_t *key, size_t key_len,
                              uint8_t **out, size_t *out_len);
/*
 * The same, decrypting j's ciphertext where it is: on P11KMS_OK *out is that
 * buffer; either way j has no ciphertext afterwards (a failed tag wipes it).
 */
p11kms_status kms_jwe_decrypt_in_place(struct kms_jwe *j, const uint8_t *key, size_t key_len,
                                       uint8_t **out, size_t *out_len);
void kms_jwe_clear(struct kms_jwe *j);

/* Pieces shared with jwe_pk.c. Encoded length of n bytes in unpadded base64url. */
size_t kms_jwe_b64url_len(size_t n);
/*
 * Strict base64url of exactly want bytes (want 0: any length up to max) into
 * out, which has room for kms_b64url_decoded_len(n) bytes (want, when want is
 * set); what names the piece in the P11KMS_ERR_MALFORMED message. The pieces
 * of a JWE are not secret: the table-driven decoder.
 */
p11kms_status kms_jwe_decode_seg(const char *s, size_t n, size_t want, size_t max, uint8_t *out,
                                 size_t *out_len, const char *what);
/* As kms_jwe_decode_seg, into a fresh malloc'd buffer (*out, at least one byte). */
p11kms_status kms_jwe_decode_seg_alloc(const char *s, size_t n, size_t max, uint8_t **out,
                                       size_t *out_len, const char *what);
/* AES-256-GCM of in[0..n) to ct (n bytes) and tag, with aad. */
p11kms_status kms_jwe_gcm_seal(const uint8_t *key, const uint8_t *iv, const char *aad,
                               size_t aad_len, const uint8_t *in, size_t n, uint8_t *ct,
                               uint8_t tag[KMS_JWE_TAG_LEN]);
/* AES-256-GCM open of in[0..n) to out (in == out: in place); P11KMS_ERR_DECRYPT on a bad tag. */
p11kms_status kms_jwe_gcm_open(const uint8_t *key, const uint8_t iv[KMS_JWE_IV_LEN],
                               const char *aad, size_t aad_len,
                               const uint8_t tag_in[KMS_JWE_TAG_LEN], const uint8_t *in, size_t n,
                               uint8_t *out);

/* ---- stream.c: streaming envelopes, chunked AES-256-GCM (docs/format.md) ---- */
#define KMS_STREAM_VERSION 1
#define KMS_STREAM_KEY_LEN 32
#define KMS_STREAM_TAG_LEN 16
#define KMS_STREAM_PREFIX_LEN 7
#define KMS_STREAM_NONCE_LEN 12 /* prefix | counter u32 | final u8 */
#define KMS_STREAM_DIGEST_LEN 32
#define KMS_STREAM_DEFAULT_CHUNK 65536u
#define KMS_STREAM_MAX_CHUNK (16u << 20)
#define KMS_STREAM_MAX_ARN 255u
#define KMS_STREAM_MAX_BLOB 6144u
/* magic, version, chunk size, nonce prefix, context digest, ARN length */
#define KMS_STREAM_FIXED_HEADER (4 + 1 + 4 + KMS_STREAM_PREFIX_LEN + KMS_STREAM_DIGEST_LEN + 2)
#define KMS_STREAM_MAX_HEADER \
    (KMS_STREAM_FIXED_HEADER + KMS_STREAM_MAX_ARN + 2 + KMS_STREAM_MAX_BLOB)

/* A parsed stream header; nothing in it is secret. */
struct kms_stream_header {
    uint8_t raw[KMS_STREAM_MAX_HEADER]; /* the header's bytes as read */
    size_t raw_len;
    uint32_t chunk_size;
    uint8_t prefix[KMS_STREAM_PREFIX_LEN];
    uint8_t ctx_digest[KMS_STREAM_DIGEST_LEN];
    char key_arn[KMS_STREAM_MAX_ARN + 1]; /* "" when the stream names none */
    const uint8_t *blob;                  /* in raw */
    size_t blob_len;
    uint8_t digest[KMS_STREAM_DIGEST_LEN]; /* SHA-256(raw): every chunk's AAD */
};

/* SHA-256 of the canonical form of a context: what a stream header carries. */
p11kms_status kms_stream_context_digest(const struct p11kms_context *ctx, size_t nctx,
                                        uint8_t out[KMS_STREAM_DIGEST_LEN]);
/*
 * The stream under a data key the caller has (p11kms_stream_encrypt gets a
 * fresh one from GenerateDataKey; tests pass their own). prefix NULL: a
 * random nonce prefix (tests pass a fixed one for vectors). key_arn may be
 * NULL (none in the header).
 */
p11kms_status kms_stream_encrypt_with_key(const uint8_t key[KMS_STREAM_KEY_LEN],
                                          const uint8_t *prefix, const char *key_arn,
                                          const uint8_t *blob, size_t blob_len,
                                          const uint8_t ctx_digest[KMS_STREAM_DIGEST_LEN],
                                          const struct p11kms_stream_options *o, p11kms_read_fn in,
                                          void *in_arg, p11kms_write_fn out, void *out_arg);
/* Reads and checks the header: P11KMS_ERR_MALFORMED, or TRUNCATED when the input ends in it. */
p11kms_status kms_stream_read_header(p11kms_read_fn in, void *in_arg, struct kms_stream_header *h);
/* The chunks after a header read by kms_stream_read_header, under key. */
p11kms_status kms_stream_decrypt_chunks(const uint8_t key[KMS_STREAM_KEY_LEN],
                                        const struct kms_stream_header *h,
                                        const struct p11kms_stream_options *o, p11kms_read_fn in,
                                        void *in_arg, p11kms_write_fn out, void *out_arg);
/* Header, context check (P11KMS_ERR_DECRYPT when ctx_digest differs), chunks. */
p11kms_status kms_stream_decrypt_with_key(const uint8_t key[KMS_STREAM_KEY_LEN],
                                          const uint8_t ctx_digest[KMS_STREAM_DIGEST_LEN],
                                          const struct p11kms_stream_options *o, p11kms_read_fn in,
                                          void *in_arg, p11kms_write_fn out, void *out_arg);

/* ---- envelopes to public keys (recipient.c, jwk.c, jwe_pk.c, cms.c, cms_provider.c) ---- */

#define KMS_ENVELOPE_MAX_PAYLOAD ((size_t)64 << 20) /* plaintext bytes, as p11kms_seal's */
#define KMS_ENVELOPE_MAX_RECIPIENTS 64

enum kms_recipient_kind {
    KMS_RECIPIENT_RSA,          /* RSA, 2048 bits or more */
    KMS_RECIPIENT_EC,           /* P-256, P-384 or P-521 */
    KMS_RECIPIENT_X25519,       /* outside the service only; JWE only */
    KMS_RECIPIENT_KMS_SYMMETRIC /* a symmetric KMS key; CMS only (KEKRecipientInfo) */
};

struct p11kms_recipient {
    enum kms_recipient_kind kind;
    EVP_PKEY *pkey;        /* the public key; NULL for KMS_RECIPIENT_KMS_SYMMETRIC */
    X509 *cert;            /* when made from a certificate, else NULL */
    char *kid;             /* the JWE kid: a KMS key's ARN, or the caller's; NULL: none */
    char key_arn[256];     /* a KMS key's ARN; "" for a key outside the service */
    p11kms_client *client; /* a KMS key's client (not owned); NULL outside the service */
};

/* ---- recipient.c ---- */
void kms_pubkeys_init(p11kms_client *c);
void kms_pubkeys_free(p11kms_client *c);
/*
 * key_id's GetPublicKey answer, from the client's cache or fetched (and then
 * cached). A symmetric key's entry has der NULL, key_spec "SYMMETRIC_DEFAULT"
 * and key_usage from DescribeKey. out is the caller's (p11kms_public_key_clear).
 */
p11kms_status kms_client_public_key(p11kms_client *c, const char *key_id,
                                    struct p11kms_public_key *out);
/* A private key: PEM or DER (PKCS#8 or traditional RSA/EC), or a JWK with "d". */
p11kms_status kms_private_key_parse(const uint8_t *p, size_t n, EVP_PKEY **out);
/* The recipient's kind for pkey (RSA >= 2048 bits, P-256/384/521, X25519), else ARGUMENT. */
p11kms_status kms_recipient_kind_of(EVP_PKEY *pkey, enum kms_recipient_kind *out);
/* RFC 5280 method 1 key identifier: SHA-1 of the subjectPublicKey BIT STRING's bytes. */
p11kms_status kms_public_key_skid(EVP_PKEY *pkey, uint8_t out[20]);

/* ---- jwk.c ---- */
/*
 * A JWK (JSON text, n bytes) as an EVP_PKEY: kty RSA, EC (crv P-256, P-384,
 * P-521) or OKP (crv X25519). want_private: "d" (and RSA's CRT members) must
 * be there and are used; else only the public members are read. *kid, when
 * kid is not NULL, gets the JWK's "kid" (malloc'd) or NULL.
 */
p11kms_status kms_jwk_to_pkey(const uint8_t *p, size_t n, int want_private, EVP_PKEY **out,
                              char **kid);
/* The public JWK of pkey (the epk of ECDH-ES: {"kty","crv","x"[,"y"]}), a new object. */
p11kms_status kms_jwk_from_public(EVP_PKEY *pkey, json_t **out);

/* ---- jwe_pk.c ---- */
/* JWE to r[0..nr): compact (nr == 1) or general JSON serialization. */
p11kms_status kms_jwe_pk_seal(int json, p11kms_recipient *const *r, size_t nr, const uint8_t *pt,
                              size_t n, uint8_t **out, size_t *out_len);
/* Opens any JWE p11kms_envelope_detect says is one ("dir": p11kms_open with o's context). */
p11kms_status kms_jwe_pk_open(const struct p11kms_opener *o, const uint8_t *in, size_t n,
                              uint8_t **out, size_t *out_len);
/* RFC 7518 §4.6.2 Concat KDF with SHA-256: out_len bytes from z, alg, apu and apv. */
p11kms_status kms_concat_kdf(const uint8_t *z, size_t z_len, const char *alg, const uint8_t *apu,
                             size_t apu_len, const uint8_t *apv, size_t apv_len, uint8_t *out,
                             size_t out_len);
/* RFC 3394 AES key wrap under a 16-, 24- or 32-byte kek; out has n + 8 bytes. */
p11kms_status kms_aes_kw_wrap(const uint8_t *kek, size_t kek_len, const uint8_t *in, size_t n,
                              uint8_t *out);
/* The unwrap: out has n - 8 bytes; P11KMS_ERR_DECRYPT when the integrity check fails. */
p11kms_status kms_aes_kw_unwrap(const uint8_t *kek, size_t kek_len, const uint8_t *in, size_t n,
                                uint8_t *out);

/* ---- cms.c ---- */
/*
 * The OtherKeyAttribute keyAttrId of a KEKRecipientInfo whose kekid.other
 * carries a KMS CiphertextBlob (keyAttr: OCTET STRING). An arc under 2.25
 * (ITU-T X.667: an OID from a UUID, which anyone may take without
 * registering); the UUID is 3983f0b5-a506-4906-a378-43047282051e, drawn once
 * at random for p11kms. docs/format.md says why and how it is used.
 */
#define KMS_CMS_KEKRI_BLOB_OID "2.25.76451068817883183688253925779633734942"

p11kms_status kms_cms_seal(p11kms_client *c, p11kms_recipient *const *r, size_t nr,
                           const uint8_t *pt, size_t n, uint8_t **out, size_t *out_len);
/* DER or PEM ("CMS", "PKCS7") ContentInfo with AuthEnvelopedData. */
p11kms_status kms_cms_open(const struct p11kms_opener *o, const uint8_t *in, size_t n,
                           uint8_t **out, size_t *out_len);

/* ---- cms_provider.c ---- */
/* The library context of the KMS key provider and the default provider, made once; NULL if not. */
OSSL_LIB_CTX *kms_cms_libctx(void);
/*
 * An EVP_PKEY of that context standing for KMS key key_arn, whose public
 * half is pub (RSA or EC): its private operations (RSA-OAEP decryption, ECDH)
 * are calls to the service through c, which must outlive it.
 */
p11kms_status kms_cms_kms_pkey(p11kms_client *c, const char *key_arn, EVP_PKEY *pub,
                               EVP_PKEY **out);
/* The status of a service call that failed inside the provider on this thread (P11KMS_OK: none);
   reading it resets it. */
p11kms_status kms_cms_provider_status(void);

#endif
