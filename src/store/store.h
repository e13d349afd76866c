/*
 * The database behind the key store (DESIGN §5): keys, their versions
 * (wrapped under a root key of the token), aliases, root keys, the change
 * sequence. One small interface; an engine behind it, picked by the URL's
 * scheme (store.c): SQLite (sqlite:PATH, store_sqlite.c) for one node,
 * PostgreSQL (postgresql:// or postgres://, store_pg.c) for several. One
 * logical schema with numbered migrations, in each engine's SQL (schema.c).
 *
 * Every read and write happens inside a transaction of the calling thread:
 * kms_store_begin, the row calls, kms_store_commit (or kms_store_rollback).
 * What a write transaction read cannot change under it: SQLite's holds the
 * database's write lock from its first statement, PostgreSQL's locks each row
 * it reads (store_pg.c). Updates are compare-and-set on the row's revision
 * all the same. A refused insert (KMS_ERR_ALREADY_EXISTS), a missing row or a
 * stale revision leaves the transaction usable; after any other failure it
 * can only be rolled back.
 *
 * Failures: KMS_ERR_NOT_FOUND for a row that is not there (nothing logged),
 * KMS_ERR_ALREADY_EXISTS for a unique constraint, KMS_ERR_DEPENDENCY_TIMEOUT
 * when the database stays busy past its timeout, KMS_ERR_INTERNAL for every
 * other fault (full, read-only, corrupt, I/O), logged with the engine's words
 * and never with a row's contents.
 */
#ifndef P11KMS_STORE_H
#define P11KMS_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "common/blob.h"
#include "common/error.h"

#define KMS_STORE_DESCRIPTION_MAX 8192
#define KMS_STORE_ALIAS_MAX 256
#define KMS_WRAPPED_MAX 4096    /* a wrapped version: AES-256 is 40 bytes; room for RSA-4096 */
#define KMS_ROOT_ID_LEN 16      /* CKA_ID of a root key object */
#define KMS_PUBLIC_KEY_MAX 1024 /* DER SubjectPublicKeyInfo: RSA-4096's is 550 bytes */

struct kms_store;
struct kms_tx;

/* Key states as stored; the first three are enum kms_key_state's. */
enum kms_store_key_state {
    KMS_STORE_ENABLED = 0,
    KMS_STORE_DISABLED = 1,
    KMS_STORE_PENDING = 2,
    KMS_STORE_DESTROYED = 3, /* a tombstone: its versions' rows are gone */
};

/* Why a version was made (ListKeyRotations' RotationType). */
enum kms_store_rotation {
    KMS_ROTATION_NONE = 0,      /* a key's first version */
    KMS_ROTATION_AUTOMATIC = 1, /* the schedule, or the usage bound */
    KMS_ROTATION_ON_DEMAND = 2,
};

struct kms_key_row {
    uint8_t id[KMS_UUID_LEN];
    int64_t created;
    int state; /* enum kms_store_key_state */
    int64_t deletion_date;
    int rotation_enabled;
    int64_t rotation_days;
    int64_t rotation_seconds; /* one period in seconds (day_seconds × days) */
    int64_t next_rotation;
    uint32_t current;   /* the current version's vid */
    uint32_t on_demand; /* on-demand rotations made */
    int token_resident; /* versions are token objects (migrated keys), not wrapped rows */
    int spec;           /* enum kms_key_spec; set at creation, never updated */
    int usage;          /* enum kms_key_usage; likewise */
    int64_t rev;        /* bumped by every update; kms_store_key_update compares it */
    char *description;  /* malloc'd, never NULL once read; kms_key_row_clear frees it */
    char *policy;       /* malloc'd, NULL: the configured default; kms_key_row_clear frees it */
};

struct kms_version_row {
    uint8_t key_id[KMS_UUID_LEN];
    uint32_t vid; /* the blob's "key version": random, unique per key */
    uint32_t n;   /* ordinal: 1 for the first version */
    int64_t created;
    int rotation;      /* enum kms_store_rotation */
    uint64_t reserved; /* uses reserved by every node: at least the wraps made */
    uint64_t bound;
    uint32_t root; /* the root key it is wrapped under; 0 for a token-resident version */
    size_t wrapped_len;
    uint8_t wrapped[KMS_WRAPPED_MAX];
    size_t public_key_len; /* 0: none (symmetric and HMAC versions) */
    uint8_t public_key[KMS_PUBLIC_KEY_MAX];
};

struct kms_alias_row {
    char name[KMS_STORE_ALIAS_MAX + 1];
    uint8_t target[KMS_UUID_LEN];
    int64_t created;
    int64_t updated;
};

enum kms_root_state { KMS_ROOT_CURRENT = 1, KMS_ROOT_RETIRED = 0 };

struct kms_root_row {
    uint32_t id; /* versions name it */
    uint8_t cka_id[KMS_ROOT_ID_LEN];
    char label[64];
    int64_t created;
    int state; /* enum kms_root_state */
};

/* What the change sequence says changed. */
enum kms_change_kind { KMS_CHANGE_KEY = 1, KMS_CHANGE_ALIAS = 2, KMS_CHANGE_ROOT = 3 };

struct kms_change {
    int64_t seq;
    int kind;          /* enum kms_change_kind */
    const char *name;  /* alias name, or NULL */
    const uint8_t *id; /* key id (KMS_UUID_LEN), or NULL */
};

/* ---- the database ---- */

struct kms_store_config {
    /* "sqlite:/path/to/p11kms.db", or a libpq URI "postgresql://user@host:5432/kms?sslmode=..." */
    const char *url;
    /*
     * Longest wait for a busy database (default 5000): SQLite's busy timeout;
     * PostgreSQL's statement timeout, the wait for a free connection of the
     * pool, and (in whole seconds, at least 2) the connect timeout.
     */
    unsigned timeout_ms;
    /*
     * KMS_STORE_OPEN: the schema must be this binary's (refuses a database
     * that is empty, older or newer). KMS_STORE_INIT: creates the database or
     * migrates an older schema; still refuses a newer one.
     */
    int mode;
    /* PostgreSQL: connections of the pool (0: 8). SQLite has one per thread. */
    unsigned pool_size;
    /*
     * PostgreSQL: the longest a new connection may take, the server's answer
     * to its login included (0: timeout_ms). SQLite opens a file.
     */
    unsigned connect_timeout_ms;
};
enum { KMS_STORE_OPEN = 0, KMS_STORE_INIT = 1 };
#define KMS_STORE_POOL_DEFAULT 8
#define KMS_STORE_POOL_MAX 256

KMS_MUST_CHECK kms_err kms_store_open(const struct kms_store_config *cfg, struct kms_store **out);
/*
 * Told of every transaction as it ends (p11kmsd's metrics): a write or a
 * read, whether the database failed it (it could not begin, failed one of
 * its statements — not a conflict such as a duplicate name — or could not
 * commit), and its time from the begin call to its commit or rollback.
 */
typedef void (*kms_store_observer)(void *arg, int write, int failed, uint64_t ns);
/* fn NULL: no more. The caller keeps arg alive until every transaction it may see has ended. */
void kms_store_observe(struct kms_store *st, kms_store_observer fn, void *arg);
void kms_store_close(struct kms_store *st);
/* The URL without secrets (PostgreSQL's password), for logs. */
const char *kms_store_name(const struct kms_store *st);
/*
 * Whether a database URL carries a secret: a PostgreSQL password (user:pw@,
 * password=) or client key passphrase (sslpassword=). The server refuses one
 * on its command line, where every user of the machine can read it.
 */
int kms_store_url_has_secret(const char *url);
/* The schema version this binary writes, and the database's. */
int kms_store_schema_version(void);
KMS_MUST_CHECK kms_err kms_store_database_version(struct kms_store *st, int *out);
/*
 * A consistent copy of the whole database into a new file (SQLite's online
 * backup). PostgreSQL: KMS_ERR_UNSUPPORTED, use pg_dump or WAL archiving.
 */
KMS_MUST_CHECK kms_err kms_store_backup(struct kms_store *st, const char *path);

/* ---- transactions (one at a time per thread) ---- */
enum { KMS_TX_READ = 0, KMS_TX_WRITE = 1 };
/* *out is NULL after a failure, so kms_store_rollback(*out) is always safe. */
KMS_MUST_CHECK kms_err kms_store_begin(struct kms_store *st, int mode, struct kms_tx **out);
KMS_MUST_CHECK kms_err kms_store_commit(struct kms_tx *tx);
/* Undoes an open transaction; nothing when tx is NULL or done. */
void kms_store_rollback(struct kms_tx *tx);

/* ---- keys ---- */
void kms_key_row_clear(struct kms_key_row *r);
KMS_MUST_CHECK kms_err kms_store_key_get(struct kms_tx *tx, const uint8_t id[KMS_UUID_LEN],
                                         struct kms_key_row *out);
KMS_MUST_CHECK kms_err kms_store_key_insert(struct kms_tx *tx, const struct kms_key_row *r);
/*
 * Writes r when the row's revision is still r->rev (else KMS_ERR_INVALID_STATE,
 * "changed meanwhile"), and sets r->rev to the new revision.
 */
KMS_MUST_CHECK kms_err kms_store_key_update(struct kms_tx *tx, struct kms_key_row *r);
/* Keys not destroyed, in id order from `from` on (NULL: the start), at most limit. */
KMS_MUST_CHECK kms_err kms_store_keys_list(struct kms_tx *tx, const uint8_t *from, size_t limit,
                                           kms_err (*fn)(void *arg, const struct kms_key_row *r),
                                           void *arg);
KMS_MUST_CHECK kms_err kms_store_key_count(struct kms_tx *tx, size_t *keys, size_t *versions);
/* Keys due at now: rotation (Enabled, rotation on, next_rotation passed) or deletion. */
enum { KMS_DUE_ROTATION = 1, KMS_DUE_DELETION = 2 };
KMS_MUST_CHECK kms_err kms_store_keys_due(struct kms_tx *tx, int64_t now, size_t limit,
                                          kms_err (*fn)(void *arg, const uint8_t id[KMS_UUID_LEN],
                                                        int what),
                                          void *arg);

/* ---- versions ---- */
KMS_MUST_CHECK kms_err kms_store_version_get(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                             uint32_t vid, struct kms_version_row *out);
KMS_MUST_CHECK kms_err kms_store_version_insert(struct kms_tx *tx, const struct kms_version_row *r);
/* A key's versions in ordinal order. */
KMS_MUST_CHECK kms_err kms_store_versions(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                          kms_err (*fn)(void *arg, const struct kms_version_row *r),
                                          void *arg);
/* The highest ordinal of a key's versions (0: none). */
KMS_MUST_CHECK kms_err kms_store_version_max_n(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                               uint32_t *out);
/*
 * Reserves up to want uses of a version: *granted is how many (0 at the
 * bound), *reserved the version's total after.
 */
KMS_MUST_CHECK kms_err kms_store_reserve(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                         uint32_t vid, uint64_t want, uint64_t *granted,
                                         uint64_t *reserved);
/* Removes every version row of a key (its key material: the key is destroyed). */
KMS_MUST_CHECK kms_err kms_store_versions_delete(struct kms_tx *tx,
                                                 const uint8_t key[KMS_UUID_LEN]);

/* ---- aliases ---- */
KMS_MUST_CHECK kms_err kms_store_alias_get(struct kms_tx *tx, const char *name,
                                           struct kms_alias_row *out);
/* KMS_ERR_ALREADY_EXISTS when the name is taken. */
KMS_MUST_CHECK kms_err kms_store_alias_insert(struct kms_tx *tx, const struct kms_alias_row *r);
/* KMS_ERR_NOT_FOUND when there is no such alias. */
KMS_MUST_CHECK kms_err kms_store_alias_update(struct kms_tx *tx, const struct kms_alias_row *r);
KMS_MUST_CHECK kms_err kms_store_alias_delete(struct kms_tx *tx, const char *name);
/* Deletes a key's aliases, calling fn (may be NULL) with each name first. */
KMS_MUST_CHECK kms_err kms_store_aliases_of_key_delete(struct kms_tx *tx,
                                                       const uint8_t key[KMS_UUID_LEN],
                                                       void (*fn)(void *arg, const char *name),
                                                       void *arg);
/* Aliases in name order from `from` on (NULL: start), only key's when key is given. */
KMS_MUST_CHECK kms_err
kms_store_aliases_list(struct kms_tx *tx, const char *from, const uint8_t *key, size_t limit,
                       kms_err (*fn)(void *arg, const struct kms_alias_row *r), void *arg);

/* ---- grants ---- */
#define KMS_GRANT_ID_LEN 64            /* lowercase hex, as AWS's */
#define KMS_GRANT_NAME_MAX 256         /* CreateGrant's Name */
#define KMS_GRANT_PRINCIPAL_MAX 256    /* a principal ARN */
#define KMS_GRANT_CONSTRAINTS_MAX 8192 /* the Constraints object as JSON text */
#define KMS_GRANTS_PER_KEY 50000       /* AWS's grants per key */

/* A grant of a key: who (grantee) may do which operations (a bit set) on it. */
struct kms_grant_row {
    uint8_t key_id[KMS_UUID_LEN];
    char grant_id[KMS_GRANT_ID_LEN + 1];
    char name[KMS_GRANT_NAME_MAX + 1]; /* "": none */
    char grantee[KMS_GRANT_PRINCIPAL_MAX + 1];
    char retiring[KMS_GRANT_PRINCIPAL_MAX + 1]; /* "": none */
    uint32_t operations;
    char constraints[KMS_GRANT_CONSTRAINTS_MAX + 1]; /* "": none */
    char issuer[KMS_GRANT_PRINCIPAL_MAX + 1];
    int64_t created;
};

/* KMS_ERR_ALREADY_EXISTS when the grant id is taken (by any key). */
KMS_MUST_CHECK kms_err kms_store_grant_insert(struct kms_tx *tx, const struct kms_grant_row *r);
/* A grant by its id, whatever its key; KMS_ERR_NOT_FOUND when none. */
KMS_MUST_CHECK kms_err kms_store_grant_get(struct kms_tx *tx, const char *grant_id,
                                           struct kms_grant_row *out);
/* Deletes one grant of key; KMS_ERR_NOT_FOUND when the key has no such grant. */
KMS_MUST_CHECK kms_err kms_store_grant_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                              const char *grant_id);
/* A key's grants in grant id order from `from` on (NULL: the start), at most limit. */
KMS_MUST_CHECK kms_err kms_store_grants_list(
    struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *from, size_t limit,
    kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg);
/* Grants of any key that retiring may retire, in grant id order from `from` on. */
KMS_MUST_CHECK kms_err
kms_store_grants_retirable(struct kms_tx *tx, const char *retiring, const char *from, size_t limit,
                           kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg);
/* A key's grants named name (CreateGrant's retries), in grant id order. */
KMS_MUST_CHECK kms_err
kms_store_grants_named(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *name,
                       kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg);
KMS_MUST_CHECK kms_err kms_store_grant_count(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                             size_t *out);
/* Deletes every grant of a key (the key is destroyed). */
KMS_MUST_CHECK kms_err kms_store_grants_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN]);

/* ---- root keys ---- */
KMS_MUST_CHECK kms_err kms_store_roots(struct kms_tx *tx,
                                       kms_err (*fn)(void *arg, const struct kms_root_row *r),
                                       void *arg);
/* Inserts a root; r->id is assigned. */
KMS_MUST_CHECK kms_err kms_store_root_insert(struct kms_tx *tx, struct kms_root_row *r);

/* ---- settings the database keeps (the migration's mark, ...) ---- */
KMS_MUST_CHECK kms_err kms_store_meta_get(struct kms_tx *tx, const char *name, char *out, size_t n);
KMS_MUST_CHECK kms_err kms_store_meta_set(struct kms_tx *tx, const char *name, const char *value);

/* ---- the audit log's records (audit.h) ---- */
#define KMS_REQUEST_ID_MAX 64
#define KMS_AUDIT_NODE_MAX 255
/*
 * Records in the transaction that it is the change of request_id (the id its
 * audit intent line names): KMS_ERR_ALREADY_EXISTS when that id made a change.
 */
KMS_MUST_CHECK kms_err kms_store_change_request(struct kms_tx *tx, const char *request_id);
/* Whether the change of request_id committed: *found 1 or 0. */
KMS_MUST_CHECK kms_err kms_store_change_request_find(struct kms_tx *tx, const char *request_id,
                                                     int *found);

/* A node's latest audit checkpoint: its log, seq and the line's SHA-256, MAC'd in the token. */
struct kms_audit_head_row {
    char node[KMS_AUDIT_NODE_MAX + 1];
    char log[33]; /* hex log id */
    uint64_t seq;
    char hash[65]; /* hex SHA-256 of the checkpoint line */
    char key[33];  /* hex CKA_ID of the token's audit key that made mac */
    char mac[65];  /* hex */
    int64_t updated;
};
/* KMS_ERR_NOT_FOUND when the node has none. */
KMS_MUST_CHECK kms_err kms_store_audit_head_get(struct kms_tx *tx, const char *node,
                                                struct kms_audit_head_row *out);
/* Writes (or replaces) the node's head. */
KMS_MUST_CHECK kms_err kms_store_audit_head_put(struct kms_tx *tx,
                                                const struct kms_audit_head_row *r);

/* ---- the change sequence ---- */
/* Records in the transaction that a key (id) or an alias (name) changed. */
KMS_MUST_CHECK kms_err kms_store_note_change(struct kms_tx *tx, int kind, const uint8_t *id,
                                             const char *name);
/* The last sequence number written (0: none). */
KMS_MUST_CHECK kms_err kms_store_change_head(struct kms_tx *tx, int64_t *out);
/* The oldest sequence number kept (0: none). */
KMS_MUST_CHECK kms_err kms_store_change_tail(struct kms_tx *tx, int64_t *out);
/* Changes after seq in order, at most limit. */
KMS_MUST_CHECK kms_err kms_store_changes(struct kms_tx *tx, int64_t after, size_t limit,
                                         kms_err (*fn)(void *arg, const struct kms_change *c),
                                         void *arg);
/* Forgets changes older than before (seconds since the epoch). */
KMS_MUST_CHECK kms_err kms_store_changes_prune(struct kms_tx *tx, int64_t before);

/* ---- the change feed ---- */
/*
 * Waits at most timeout_ms for a change committed by any node, this one's
 * included, and sets *changed to 1 when one was announced: read the change
 * sequence now. PostgreSQL announces every transaction that notes a change
 * (NOTIFY at its commit) to a connection of its own that LISTENs, outside the
 * pool, made at the first call. When that connection is lost the call goes
 * on as a plain timed wait (*changed 0) and makes it again at later calls,
 * backing off from 100 ms to 5 s between tries; announcements sent meanwhile
 * are lost, so a call that (re)makes it sets *changed to 1. Waiting is never
 * the only way to learn of changes: read the sequence every so often anyway.
 *
 * One thread at a time may wait. KMS_ERR_UNSUPPORTED, at once, when the
 * engine has no feed (SQLite): poll the sequence on a timer instead.
 */
KMS_MUST_CHECK kms_err kms_store_wait_change(struct kms_store *st, unsigned timeout_ms,
                                             int *changed);
/* Makes the current or the next kms_store_wait_change return at once (shutting down). */
void kms_store_wake(struct kms_store *st);

/* ---- tags ---- */
/*
 * A key's tags: (key, tag key) -> value, in the key's transaction. Tag keys
 * compare and sort byte by byte (UTF-8), in both engines. The callers check
 * AWS's limits (the key store); the store only keeps the rows.
 */
/* Writes a key's tag, replacing the value of one it has. */
KMS_MUST_CHECK kms_err kms_store_tag_put(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                         const char *tag_key, const char *tag_value);
/* Removes one tag of a key: KMS_ERR_NOT_FOUND when the key has no such tag. */
KMS_MUST_CHECK kms_err kms_store_tag_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                            const char *tag_key);
/* A key's tags in tag-key order from `from` on (NULL: the start), at most limit. */
KMS_MUST_CHECK kms_err kms_store_tags_list(
    struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *from, size_t limit,
    kms_err (*fn)(void *arg, const char *tag_key, const char *tag_value), void *arg);
/* How many tags a key has. */
KMS_MUST_CHECK kms_err kms_store_tag_count(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN],
                                           size_t *out);
/* Removes every tag of a key (the key is destroyed). */
KMS_MUST_CHECK kms_err kms_store_tags_delete(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN]);

#endif
