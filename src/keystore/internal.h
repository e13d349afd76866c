/* Key store internals shared by keystore.c, refresh.c and crypto.c. */
#ifndef P11KMS_KEYSTORE_INTERNAL_H
#define P11KMS_KEYSTORE_INTERNAL_H

#include <pthread.h>

#include "keystore/keystore.h"
#include "keystore/model.h"
#include "keystore/record.h"

#define KEK_ID_LEN (KMS_UUID_LEN + 4)
#define KEK_LABEL_MAX 128 /* "p11kms-kek:<uuid>:<vid>:<created>" fits */
/* A version whose key object was looked for and not found. */
#define KEK_MISSING ((CK_OBJECT_HANDLE)-1)

struct version {
    uint32_t vid;
    uint32_t n;
    int64_t created;
    uint64_t reserved;
    uint64_t bound;
    int listed;
    int on_demand;
    CK_OBJECT_HANDLE handle; /* CK_INVALID_HANDLE until found in the token */
};

/* This node's share of a version's reserved uses; outlives index updates. */
struct usage {
    pthread_mutex_t lock;
    uint8_t id[KMS_UUID_LEN]; /* the key's */
    uint32_t vid;
    uint64_t remaining;
    uint64_t block;     /* uses reserved at a time; grows for a busy key (crypto.c) */
    int64_t granted_at; /* when this node last reserved a block */
    int refilling;      /* the next block is queued or being reserved ahead */
    struct usage *next_all;
};

struct key {
    uint8_t id[KMS_UUID_LEN];
    char id_text[KMS_UUID_TEXT_LEN + 1];
    int64_t created;
    char *description;
    enum kms_key_state state;
    int destroyed; /* deleted: only a tombstone record is left, so its blobs answer NotFound */
    int purged;    /* this node has removed the destroyed key's objects */
    int64_t deletion_date;
    int rotation_enabled;
    int64_t rotation_days;
    int64_t next_rotation;
    uint32_t current;
    /* The record's versions first (nrecord of them), then those only history objects hold. */
    struct version *versions;
    size_t nversions;
    size_t nrecord;
    struct version *history; /* every version the key's history objects hold (history.c) */
    size_t nhistory;
    uint32_t archived_n;     /* the record's: versions up to this ordinal moved to history */
    uint32_t history_n;      /* the highest ordinal the history objects read cover */
    char *history_signature; /* the history objects read: "upto:nonce,..." */
    uint64_t gen;
    char *signature; /* the records this view came from: "gen:nonce,..." */
    struct usage *usage;
    char *policy_text;
    void *policy; /* compiled by cfg.compile_policy; NULL when none */
};

struct alias {
    char *name;
    uint8_t target[KMS_UUID_LEN];
    int live; /* 0: a tombstone */
    int64_t created;
    int64_t updated;
    uint64_t gen;
    char *signature;
};

struct kms_keystore {
    struct kms_hsm *hsm;
    struct kms_keystore_config cfg;
    char region[64];
    char account[32];
    char arn_prefix[128]; /* arn:aws:kms:<region>:<account>: */

    /* Readers copy what they need out under rw; writers hold write around token changes. */
    pthread_rwlock_t rw;
    pthread_mutex_t write;
    struct key **keys; /* sorted by id */
    size_t nkeys, capkeys;
    struct alias **aliases; /* sorted by name, tombstones included */
    size_t naliases, capaliases;
    struct usage *usages;

    /* Change marker objects and the labels last seen on them. */
    CK_OBJECT_HANDLE *markers;
    char **marker_labels;
    size_t nmarkers;

    /* Single-flight refresh of one key named by a blob this node has not seen. */
    pthread_mutex_t refresh_one;
    uint8_t missed[16][KMS_UUID_LEN];
    uint32_t missed_vid[16];
    int64_t missed_at[16];
    unsigned missed_next;

    pthread_t thread;
    int running;
    int stopping;
    pthread_mutex_t stop_lock; /* guards stopping and the refill queue */
    pthread_cond_t stop_cond;  /* wakes the background thread */
    struct usage *refills[64]; /* blocks to reserve ahead, for the background thread */
    size_t nrefills;
    int64_t last_full_refresh;
};

int64_t kms_now(void);

/* Reserves the blocks of uses queued by requests (crypto.c); the background thread's. */
void kms_keystore_refill(struct kms_keystore *ks);

/* index (keystore.c) */
/* A usable (not destroyed) key, or NULL. */
struct key *kms_key_find_locked(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN]);
/* Any indexed key, destroyed ones included. */
struct key *kms_key_any_locked(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN]);
struct alias *kms_alias_find_locked(struct kms_keystore *ks, const char *name);
kms_err kms_resolve_locked(struct kms_keystore *ks, const char *ref, int allow_alias,
                           struct key **out);
kms_err kms_info_copy_locked(struct kms_keystore *ks, const struct key *k,
                             struct kms_key_info *out);
/* Builds an index entry from a key view and puts it in (takes the write side of rw). */
kms_err kms_index_key_view(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                           const struct kms_view *view, const char *signature);
kms_err kms_index_alias_view(struct kms_keystore *ks, const char *name, const struct kms_view *view,
                             const char *signature);
void kms_index_remove_key(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN]);
void kms_index_remove_alias(struct kms_keystore *ks, const char *name);
void kms_alias_oid(const char *name, uint8_t oid[KMS_OID_LEN]);
/* An object id for name in a domain ("p11kms alias", "p11kms history"). */
void kms_oid_of(const char *domain, const void *name, size_t n, uint8_t oid[KMS_OID_LEN]);
/* A version from its JSON form in a key's state or history. */
void kms_version_from_json(const json_t *v, struct version *out);
/* Replaces a key's history versions (takes h) and what they cover. */
kms_err kms_index_key_history(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                              struct version *h, size_t n, uint32_t upto, const char *signature);
/* Writes a change to a key and indexes the result. */
kms_err kms_key_change(struct kms_keystore *ks, struct kms_session *s,
                       const uint8_t id[KMS_UUID_LEN], const json_t *op);
/* Makes a KEK object for a new version and writes the rotation. */
kms_err kms_key_rotate(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], const char *reason,
                       uint32_t from);

/* history.c: old versions moved out of a key's record into immutable objects */
/* Reads every history object of a key into the index. */
kms_err kms_history_load(struct kms_keystore *ks, struct kms_session *s,
                         const uint8_t id[KMS_UUID_LEN]);
/* When the key's record holds many versions, moves the oldest to a history object. */
kms_err kms_history_archive(struct kms_keystore *ks, struct kms_session *s,
                            const uint8_t id[KMS_UUID_LEN]);
/* Removes a destroyed key's history objects. */
void kms_history_destroy(struct kms_session *s, const uint8_t id[KMS_UUID_LEN]);

/* refresh.c */
kms_err kms_refresh_all(struct kms_keystore *ks, struct kms_session *s, int sweep_orphans);
/* Re-reads one key; a (key, version) still missing is not looked for again for 2 s. */
kms_err kms_refresh_key(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], uint32_t vid);
kms_err kms_marker_init(struct kms_keystore *ks, struct kms_session *s);
void kms_marker_touch(struct kms_keystore *ks, struct kms_session *s);
kms_err kms_kek_find(struct kms_session *s, const uint8_t id[KMS_UUID_LEN], uint32_t vid,
                     CK_OBJECT_HANDLE *out);
void kms_kek_id(const uint8_t id[KMS_UUID_LEN], uint32_t vid, uint8_t out[KEK_ID_LEN]);

#endif
