/*
 * The key model (DESIGN §5): the token holds only root keys; the database
 * (src/store/) holds keys, their versions wrapped under a root, aliases and
 * usage counters. A node keeps the keys it uses in memory (a bounded LRU),
 * each version it uses unwrapped into a session object of the token, so a
 * request with a cached key touches neither the database nor a token search.
 * A change is one database transaction; other nodes learn of it through the
 * database's change sequence, read as soon as the database announces a change
 * (PostgreSQL's LISTEN/NOTIFY) and every refresh_ms in any case.
 */
#ifndef P11KMS_KEYSTORE_H
#define P11KMS_KEYSTORE_H

#include <openssl/types.h>
#include <stddef.h>
#include <stdint.h>

#include "common/blob.h"
#include "hsm/hsm.h"
#include "store/store.h"

#define KMS_ARN_MAX 256
#define KMS_ALIAS_MAX 256
#define KMS_DESCRIPTION_MAX 8192

enum kms_key_state { KMS_KEY_ENABLED, KMS_KEY_DISABLED, KMS_KEY_PENDING_DELETION };

struct kms_keystore;

/*
 * A change the key store is about to commit, as the audit log names it: the
 * intent callback writes it ahead (and sets request_id, which the transaction
 * stores with the change) before the commit, which does not happen when it
 * fails; the outcome callback follows the commit or its failure.
 */
struct kms_change_event {
    const char *operation; /* "CreateKey", ...; the server's own: "RotateKey", "DeleteKey" */
    int automatic;         /* the server's own (rotation schedule, usage bound, deletion date) */
    char key_arn[KMS_ARN_MAX]; /* "" when the change is of an alias alone */
    const char *alias;         /* NULL when none */
    char request_id[KMS_REQUEST_ID_MAX + 1];
};
enum { KMS_CHANGE_NOT_COMMITTED = 0, KMS_CHANGE_COMMITTED = 1, KMS_CHANGE_UNKNOWN = -1 };
struct kms_change_audit {
    kms_err (*intent)(void *arg, struct kms_change_event *e); /* NULL: changes are not audited */
    void (*outcome)(void *arg, const struct kms_change_event *e, int result);
    void *arg;
};

struct kms_keystore_config {
    const char *region;
    const char *account;
    uint64_t usage_bound;       /* wraps per version; default 2^30 */
    uint64_t usage_block;       /* wraps reserved per metadata write; default 10000 */
    unsigned day_seconds;       /* one "day" of periods and windows; 86400 */
    unsigned rotation_min_days; /* 90 */
    unsigned rotation_max_days; /* 2560 */
    unsigned pending_min_days;  /* 7 */
    unsigned pending_max_days;  /* 30 */
    unsigned max_on_demand;     /* on-demand rotations per key; 10 */
    unsigned refresh_ms;        /* change-sequence poll interval (besides the feed); 1000 */
    unsigned key_cache;         /* keys held in memory, their used versions unwrapped; 4096 */
    unsigned negative_cache;    /* key ids remembered as unknown; 8192 */
    unsigned grants_per_key;    /* grants a key may have; 50,000 (AWS's); 0 is the default */
    /*
     * Key policies: the key store keeps each key's policy text in its record
     * and a compiled form in the index, made by compile_policy (NULL: none is
     * made) and released by free_policy. A policy that does not compile
     * leaves the key with none: authorize callers must then refuse.
     */
    kms_err (*compile_policy)(void *arg, const char *text, size_t n, void **out);
    void (*free_policy)(void *compiled);
    void *policy_arg;
    const char *default_policy; /* for keys whose record has none (made before policies) */
    /*
     * Grants: the key store reads a key's grants with its record and builds
     * their compiled form in the index with add_grant (called once per grant,
     * *set NULL before the first), released by free_grants; policy_arg is
     * the arg. NULL add_grant: grants are not kept. A grant that does not
     * compile leaves the key with no grants (fail closed).
     */
    kms_err (*add_grant)(void *arg, void **set, const struct kms_grant_row *g);
    void (*free_grants)(void *set);
    struct kms_change_audit audit;
};

void kms_keystore_config_defaults(struct kms_keystore_config *c);

/* A copy of what a request needs to know about one key; owned by the caller. */
struct kms_key_info {
    uint8_t id[KMS_UUID_LEN];
    char id_text[KMS_UUID_TEXT_LEN + 1];
    char arn[KMS_ARN_MAX];
    int64_t created;
    enum kms_key_state state;
    uint32_t current_version; /* vid */
    int64_t deletion_date;
    int rotation_enabled;
    int64_t rotation_period_days;
    int64_t next_rotation;
    int spec;          /* enum kms_key_spec (common/keyspec.h) */
    int usage;         /* enum kms_key_usage */
    char *description; /* malloc'd; kms_key_info_clear frees it */
};

struct kms_alias_info {
    char name[KMS_ALIAS_MAX + 1];
    char arn[KMS_ARN_MAX + KMS_ALIAS_MAX];
    char target_id[KMS_UUID_TEXT_LEN + 1];
    int64_t created;
    int64_t updated;
};

struct kms_rotation_info {
    uint32_t n; /* the version's ordinal: the marker of ListKeyRotations */
    int64_t date;
    int on_demand;
};

/*
 * Opens the key store over a logged-in token and an open database; finds the
 * root keys the database names (KMS_ERR_INTERNAL, saying so, when the
 * database has none: run p11kmsd init). Keys are read as they are used.
 */
KMS_MUST_CHECK kms_err kms_keystore_open(struct kms_hsm *hsm, struct kms_store *store,
                                         const struct kms_keystore_config *cfg,
                                         struct kms_keystore **out);
/*
 * Makes a root key in the token and names it in the database when the
 * database names none (p11kmsd init, --dev): idempotent. *made says whether
 * one was made.
 */
KMS_MUST_CHECK kms_err kms_keystore_init_roots(struct kms_hsm *hsm, struct kms_store *store,
                                               int *made);
/*
 * Checks, changing nothing, that the database names a current root key and
 * that the token holds every current one (p11kmsd --check-config).
 */
KMS_MUST_CHECK kms_err kms_keystore_check_roots(struct kms_hsm *hsm, struct kms_store *store);
/*
 * Imports the token-only layout of earlier releases (records and key objects
 * in the token) into the database as token-resident keys, in one
 * transaction, once: a database that holds the import's mark is left alone
 * (migrate.c). quiet: say nothing when there is nothing to import.
 */
KMS_MUST_CHECK kms_err kms_migrate_token(struct kms_hsm *hsm, struct kms_store *store,
                                         const struct kms_keystore_config *cfg, int quiet);
void kms_keystore_close(struct kms_keystore *ks);
size_t kms_keystore_count(struct kms_keystore *ks);

/* One usable key's current version and its uses (for the metrics). */
struct kms_version_usage {
    const char *key_id; /* uuid text */
    uint32_t vid;
    uint64_t reserved; /* uses reserved by all nodes: at least the wraps made */
    uint64_t bound;
};
/*
 * Counts the keys (destroyed ones left out) and their versions, and calls fn
 * for each usable key's current version, under the index's read lock: fn
 * must be quick and must not call back into the key store.
 */
kms_err kms_keystore_survey(struct kms_keystore *ks, size_t *keys, size_t *versions,
                            kms_err (*fn)(void *arg, const struct kms_version_usage *u), void *arg);

/*
 * Keys looked up in the cache since start: found there (a key known not to
 * exist too), or read from the database.
 */
void kms_keystore_cache_counts(struct kms_keystore *ks, uint64_t *hits, uint64_t *misses);

/* Starts and stops the background thread: the change feed, scheduled rotation, deletion. */
KMS_MUST_CHECK kms_err kms_keystore_start(struct kms_keystore *ks);
void kms_keystore_stop(struct kms_keystore *ks);
/* One pass of the background work now (tests and start-up). */
void kms_keystore_tick(struct kms_keystore *ks);

void kms_key_info_clear(struct kms_key_info *info);
const char *kms_key_state_name(enum kms_key_state s);

/* ---- keys ---- */
/* A SYMMETRIC_DEFAULT key for ENCRYPT_DECRYPT: kms_keystore_create_key_as. */
KMS_MUST_CHECK kms_err kms_keystore_create_key(struct kms_keystore *ks, const char *description,
                                               const char *policy, struct kms_key_info *out);
/*
 * A key of spec (enum kms_key_spec) for usage (enum kms_key_usage), which the
 * spec must allow (KMS_ERR_VALIDATION). Its one version is generated in the
 * token and stored wrapped; asymmetric and HMAC keys are never rotated (as in
 * AWS). A spec the token cannot make is KMS_ERR_UNSUPPORTED.
 */
KMS_MUST_CHECK kms_err kms_keystore_create_key_as(struct kms_keystore *ks, const char *description,
                                                  const char *policy, int spec, int usage,
                                                  struct kms_key_info *out);

struct key; /* a key held in memory (internal.h) */

/*
 * A key resolved once for one request and held in memory. Authorization, the
 * operation, the audit record and the answer all work on this key, whatever
 * an alias names meanwhile: an operation never resolves the caller's
 * reference a second time. Release with kms_keystore_unhold.
 */
struct kms_key_ref {
    uint8_t id[KMS_UUID_LEN];
    char id_text[KMS_UUID_TEXT_LEN + 1];
    char arn[KMS_ARN_MAX];
    struct key *entry; /* held; NULL when not held */
};
#define KMS_KEY_REF_INIT  \
    {                     \
        {0}, "", "", NULL \
    }

/* What a reference may name, besides a key id or key ARN (kms_keystore_hold). */
enum {
    KMS_REF_ALIAS = 1,     /* an alias name or alias ARN */
    KMS_REF_DESTROYED = 2, /* a destroyed key (its tombstone keeps its policy) */
};

/*
 * Resolves ref (a key id or key ARN; more as how says, KMS_REF_*) once and
 * holds the key in *out. KMS_ERR_NOT_FOUND when there is no such key.
 */
KMS_MUST_CHECK kms_err kms_keystore_hold(struct kms_keystore *ks, const char *ref, int how,
                                         struct kms_key_ref *out);
/* Releases a held key; one not held is left alone. */
void kms_keystore_unhold(struct kms_keystore *ks, struct kms_key_ref *key);

/* What an authorization callback sees of one key, under the index's read lock. */
struct kms_key_guard {
    const char *id_text;
    const char *arn;
    const void *policy; /* compiled; NULL when the key's policy did not compile */
    const void *grants; /* compiled (add_grant); NULL when it has none */
};
/*
 * kms_keystore_hold, then fn with the key's guard under the index's read
 * lock; fn must be quick. Returns the resolution's error or fn's. On success
 * *out holds the key the guard showed (out NULL: it is released); on failure
 * nothing is held.
 */
KMS_MUST_CHECK kms_err kms_keystore_authorize(struct kms_keystore *ks, const char *ref, int how,
                                              kms_err (*fn)(void *arg,
                                                            const struct kms_key_guard *g),
                                              void *arg, struct kms_key_ref *out);
/* A copy of what a held key is now. */
KMS_MUST_CHECK kms_err kms_keystore_key_info(struct kms_keystore *ks, const struct kms_key_ref *key,
                                             struct kms_key_info *out);
/* The same without the description (NULL): no allocation, for the cryptographic operations. */
KMS_MUST_CHECK kms_err kms_keystore_key_info_brief(struct kms_keystore *ks,
                                                   const struct kms_key_ref *key,
                                                   struct kms_key_info *out);
/* The key's policy text (malloc'd). */
KMS_MUST_CHECK kms_err kms_keystore_get_policy(struct kms_keystore *ks, const char *ref,
                                               char **out);
KMS_MUST_CHECK kms_err kms_keystore_put_policy(struct kms_keystore *ks, const char *ref,
                                               const char *policy);
/* Resolves a key id, key ARN, alias name or alias ARN. */
KMS_MUST_CHECK kms_err kms_keystore_describe(struct kms_keystore *ks, const char *ref,
                                             struct kms_key_info *out);
/*
 * Lists at most limit keys in id order, from the key marker names (NULL for
 * the start) on. Each entry of out must be released with kms_key_info_clear.
 */
KMS_MUST_CHECK kms_err kms_keystore_list_keys(struct kms_keystore *ks, const char *marker,
                                              size_t limit, struct kms_key_info *out, size_t *n);
KMS_MUST_CHECK kms_err kms_keystore_enable(struct kms_keystore *ks, const char *ref, int enable);
/* days 0 means the configured maximum (AWS's default of 30). */
KMS_MUST_CHECK kms_err kms_keystore_schedule_deletion(struct kms_keystore *ks, const char *ref,
                                                      long days, struct kms_key_info *out);
KMS_MUST_CHECK kms_err kms_keystore_cancel_deletion(struct kms_keystore *ks, const char *ref,
                                                    struct kms_key_info *out);

/* ---- rotation ---- */
/* days 0 means AWS's default of 365 (bounded by the configured range). */
KMS_MUST_CHECK kms_err kms_keystore_enable_rotation(struct kms_keystore *ks, const char *ref,
                                                    long days);
KMS_MUST_CHECK kms_err kms_keystore_disable_rotation(struct kms_keystore *ks, const char *ref);
KMS_MUST_CHECK kms_err kms_keystore_rotate_on_demand(struct kms_keystore *ks, const char *ref,
                                                     struct kms_key_info *out);
/* Rotations (versions after the first) in order, from ordinal marker (0: start) on. */
KMS_MUST_CHECK kms_err kms_keystore_list_rotations(struct kms_keystore *ks, const char *ref,
                                                   uint32_t marker, size_t limit,
                                                   struct kms_rotation_info *out, size_t *n,
                                                   struct kms_key_info *key);

/* ---- aliases ---- */
/* Validates an alias name as AWS does (alias/..., not alias/aws/...). */
KMS_MUST_CHECK kms_err kms_alias_name_check(const char *name);
KMS_MUST_CHECK kms_err kms_keystore_create_alias(struct kms_keystore *ks, const char *name,
                                                 const char *target_ref);
/*
 * from: the key the alias must still name when the change is written (the key
 * the caller was authorized on), or NULL for any. When it names another by
 * then, nothing changes, *moved is set and KMS_ERR_INVALID_STATE returned: the
 * caller may authorize again against the key it names now.
 */
KMS_MUST_CHECK kms_err kms_keystore_update_alias(struct kms_keystore *ks, const char *name,
                                                 const char *target_ref, const uint8_t *from,
                                                 int *moved);
KMS_MUST_CHECK kms_err kms_keystore_delete_alias(struct kms_keystore *ks, const char *name,
                                                 const uint8_t *from, int *moved);
/* At most limit aliases in name order from marker on, optionally only one key's. */
KMS_MUST_CHECK kms_err kms_keystore_list_aliases(struct kms_keystore *ks, const char *key_ref,
                                                 const char *marker, size_t limit,
                                                 struct kms_alias_info *out, size_t *n);

/*
 * ---- grants (grants.c) ----
 * Each change is one write transaction that also records a change of the key
 * (so every node reads the key and its grants again) and marks this node's
 * entry changed, so the grant counts on this node at once.
 */
/*
 * Adds g (its key_id, grantee, operations, ...; grant_id and created are set
 * here) to key id. When g->name is given and the key has a grant of that name
 * with the same grantee, retiring principal, operations and constraints, no
 * grant is made: *existing is set and g->grant_id is that grant's (AWS's
 * idempotent retry). KMS_ERR_LIMIT_EXCEEDED past cfg.grants_per_key; a key
 * pending deletion is KMS_ERR_INVALID_STATE.
 */
KMS_MUST_CHECK kms_err kms_keystore_create_grant(struct kms_keystore *ks, struct kms_grant_row *g,
                                                 int *existing);
/* A grant by id (any key); KMS_ERR_NOT_FOUND (no message set) when none. */
KMS_MUST_CHECK kms_err kms_keystore_grant_get(struct kms_keystore *ks, const char *grant_id,
                                              struct kms_grant_row *out);
/*
 * Deletes a grant of key id (RetireGrant, RevokeGrant: operation names the
 * change); KMS_ERR_NOT_FOUND (no message set) when the key has no such grant.
 */
KMS_MUST_CHECK kms_err kms_keystore_delete_grant(struct kms_keystore *ks,
                                                 const uint8_t id[KMS_UUID_LEN],
                                                 const char *grant_id, const char *operation);
/* A key's grants in grant id order from marker on (NULL: the start), at most limit. */
KMS_MUST_CHECK kms_err kms_keystore_list_grants(
    struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], const char *marker, size_t limit,
    kms_err (*fn)(void *arg, const struct kms_grant_row *g), void *arg);
/* Grants of any key retiring may retire, in grant id order from marker on. */
KMS_MUST_CHECK kms_err kms_keystore_list_retirable(
    struct kms_keystore *ks, const char *retiring, const char *marker, size_t limit,
    kms_err (*fn)(void *arg, const struct kms_grant_row *g), void *arg);
/*
 * Makes the next use of key id read it (and its grants) from the database
 * again: a grant token names a grant this node has not seen yet.
 */
void kms_keystore_key_refresh(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN]);

/* ---- cryptography ---- */
/*
 * Wraps plaintext under the held key's current version: out receives the
 * blob, info what the key was (without its description, which stays NULL). canonical_context is the
 * encryption context's canonical form. key->entry may be replaced by a fresher entry of the same
 * key.
 */
KMS_MUST_CHECK kms_err kms_keystore_encrypt_key(struct kms_keystore *ks, struct kms_key_ref *key,
                                                const struct kms_buf *canonical_context,
                                                const uint8_t *plaintext, size_t n,
                                                struct kms_buf *blob, struct kms_key_info *info);
/* kms_keystore_hold(ref, KMS_REF_ALIAS), then kms_keystore_encrypt_key. */
KMS_MUST_CHECK kms_err kms_keystore_encrypt(struct kms_keystore *ks, const char *ref,
                                            const struct kms_buf *canonical_context,
                                            const uint8_t *plaintext, size_t n,
                                            struct kms_buf *blob, struct kms_key_info *info);
/*
 * Unwraps a blob (decoded once by the caller, kms_blob_decode) under the held
 * key it names (held with KMS_REF_DESTROYED: a destroyed key is
 * KMS_ERR_NOT_FOUND). When expect_ref is given, the blob must be under that
 * key (else KMS_ERR_INCORRECT_KEY). A disabled key is KMS_ERR_DISABLED, one
 * pending deletion KMS_ERR_INVALID_STATE; a version the key lacks, an altered
 * blob or another context KMS_ERR_INVALID_CIPHERTEXT (KMS_BLOB_INVALID).
 * plaintext is cleansed on every failure. info (without the description,
 * NULL) may be NULL (the caller has the held key's info already).
 */
KMS_MUST_CHECK kms_err kms_keystore_decrypt_key(struct kms_keystore *ks, struct kms_key_ref *key,
                                                const struct kms_blob *blob,
                                                const struct kms_buf *canonical_context,
                                                const char *expect_ref, struct kms_buf *plaintext,
                                                struct kms_key_info *info);
/*
 * Holds the key the blob names (one it does not know is
 * KMS_ERR_INVALID_CIPHERTEXT), then kms_keystore_decrypt_key.
 */
KMS_MUST_CHECK kms_err kms_keystore_decrypt(struct kms_keystore *ks, const uint8_t *blob, size_t n,
                                            const struct kms_buf *canonical_context,
                                            const char *expect_ref, struct kms_buf *plaintext,
                                            struct kms_key_info *info);
/*
 * ---- asymmetric and HMAC keys (asym.c) ----
 * Each works on the held key's current version and first checks that the key
 * is usable (as Encrypt does: DisabledException, KMSInvalidStateException)
 * and that its spec and usage allow alg (InvalidKeyUsageException
 * otherwise). info receives what the key was.
 */
/* The key's public key, DER SubjectPublicKeyInfo; a key without one is KMS_ERR_UNSUPPORTED. */
KMS_MUST_CHECK kms_err kms_keystore_public_key(struct kms_keystore *ks, struct kms_key_ref *key,
                                               struct kms_buf *spki, struct kms_key_info *info);
/*
 * The same key decoded, for work with it in the process (Verify, RSAES-OAEP
 * Encrypt): decoded once per version and kept with it; *out is a reference
 * of the caller's (EVP_PKEY_free), only to be read.
 */
KMS_MUST_CHECK kms_err kms_keystore_public_pkey(struct kms_keystore *ks, struct kms_key_ref *key,
                                                EVP_PKEY **out, struct kms_key_info *info);
/*
 * A signature (SIGN_VERIFY) or MAC (GENERATE_VERIFY_MAC) in the token, as
 * kms_hsm_sign_alg: in is the digest, or for Ed25519 and HMAC the message.
 */
KMS_MUST_CHECK kms_err kms_keystore_sign(struct kms_keystore *ks, struct kms_key_ref *key, int alg,
                                         const uint8_t *in, size_t n, uint8_t *sig, size_t *sig_len,
                                         struct kms_key_info *info);
/* RSAES-OAEP decryption in the token (ENCRYPT_DECRYPT RSA keys). */
KMS_MUST_CHECK kms_err kms_keystore_oaep_decrypt(struct kms_keystore *ks, struct kms_key_ref *key,
                                                 int alg, const uint8_t *ct, size_t n,
                                                 struct kms_buf *pt, struct kms_key_info *info);
/* ECDH in the token (KEY_AGREEMENT keys) with a peer point (kms_pubkey_peer_point). */
KMS_MUST_CHECK kms_err kms_keystore_derive(struct kms_keystore *ks, struct kms_key_ref *key,
                                           const uint8_t *peer, size_t n, struct kms_buf *secret,
                                           struct kms_key_info *info);

/* Random bytes from the token's generator. */
KMS_MUST_CHECK kms_err kms_keystore_random(struct kms_keystore *ks, uint8_t *out, size_t n);

/* ---- tags (tags.c) ---- */
/*
 * A key's tags live in the database only: no node caches them, so a change
 * is not a key change for the change sequence, and every read sees the
 * database. The callers check each tag (ops_tags.c); the key store keeps
 * AWS's count per key and the key's state.
 */
#define KMS_TAGS_MAX 50 /* per key */

struct kms_tag {
    const char *key;
    const char *value;
};

/*
 * Adds tags to the key ref names (a key id or key ARN), replacing the value
 * of a tag key it has. In one audited transaction: a key pending deletion is
 * KMS_ERR_INVALID_STATE, more than KMS_TAGS_MAX tags after the change
 * KMS_ERR_LIMIT_EXCEEDED, and then nothing is written.
 */
KMS_MUST_CHECK kms_err kms_keystore_tag(struct kms_keystore *ks, const char *ref,
                                        const struct kms_tag *tags, size_t n);
/* Removes the tags of these tag keys; one the key lacks is no error (as AWS). */
KMS_MUST_CHECK kms_err kms_keystore_untag(struct kms_keystore *ks, const char *ref,
                                          const char *const *keys, size_t n);
/* At most limit of a key's tags in tag-key order, from tag key from (NULL: start) on. */
KMS_MUST_CHECK kms_err kms_keystore_list_tags(
    struct kms_keystore *ks, const char *ref, const char *from, size_t limit,
    kms_err (*fn)(void *arg, const char *tag_key, const char *tag_value), void *arg);
/*
 * kms_keystore_create_key_as with tags (distinct tag keys, at most
 * KMS_TAGS_MAX), written in the key's own transaction.
 */
KMS_MUST_CHECK kms_err kms_keystore_create_key_tagged(struct kms_keystore *ks,
                                                      const char *description, const char *policy,
                                                      int spec, int usage,
                                                      const struct kms_tag *tags, size_t ntags,
                                                      struct kms_key_info *out);

#endif
