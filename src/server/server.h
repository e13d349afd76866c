/* p11kmsd: the HTTP front end, request dispatch and operations. */
#ifndef P11KMS_SERVER_H
#define P11KMS_SERVER_H

#include <jansson.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "common/buf.h"
#include "keystore/keystore.h"
#include "server/settings.h"

struct MHD_Daemon;
struct kms_pool;
struct kms_ratelimit;
struct kms_breaker;
struct kms_stats;
struct kms_tls;
struct kms_audit;
struct kms_policy;
struct kms_addrlimit;

struct kms_server {
    struct kms_config cfg;
    pthread_rwlock_t creds_lock; /* SIGHUP replaces creds */
    struct kms_credentials creds;
    struct kms_hsm *hsm;
    struct kms_store *store;
    struct kms_keystore *ks;
    struct kms_pool *pool;
    struct kms_ratelimit *limits;
    struct kms_breaker *breaker; /* decryption failures per principal and key */
    struct kms_stats *stats;
    struct kms_tls *tls;             /* NULL: plain HTTP */
    struct kms_audit *audit;         /* NULL: no audit_log configured */
    char *account_policy;            /* the policy of keys whose record has none */
    struct kms_policy *alias_policy; /* alias_policy_file compiled; NULL: none configured */
    struct kms_addrlimit *addrlimit; /* failed authentications per address; NULL: none */
    uint8_t metrics_token[32];       /* SHA-256 of metrics_token_file's token */
    int metrics_token_set;
    struct MHD_Daemon *daemon;
    volatile int draining; /* SIGTERM: answers say Connection: close, /readyz 503 */
    /* POST requests begun and not completed; none begins once stopping is set. */
    pthread_mutex_t active_lock;
    pthread_cond_t active_done;
    unsigned active;
    int stopping;
    unsigned long parked;      /* atomic: answers waiting for their audit line to be on disk */
    unsigned long connections; /* atomic: client connections open (past the connection limits) */
    unsigned port;             /* the port actually bound */
    char host[256];
};

/* Starts listening on cfg.listen; the daemon's threads serve from then on. */
KMS_MUST_CHECK kms_err kms_http_start(struct kms_server *srv);
/*
 * The key store's change audit (struct kms_change_audit, arg the server): a
 * change made by a request is named by its request id, principal and source;
 * the server's own changes by a fresh id and source "p11kmsd".
 */
KMS_MUST_CHECK kms_err kms_http_change_intent(void *arg, struct kms_change_event *e);
void kms_http_change_outcome(void *arg, const struct kms_change_event *e, int result);
/*
 * SIGTERM: stops accepting connections and answers what is in flight, for up
 * to drain_timeout_ms; then answers what is left with 503. Returns 0 when
 * some request could not be completed or a worker is stuck in a token
 * call: the daemon cannot be stopped
 * then, only the process.
 */
int kms_http_drain(struct kms_server *srv);
void kms_http_stop(struct kms_server *srv);

/* The signed, parsed request an operation sees. */
struct kms_request {
    struct kms_server *srv;
    const char *principal; /* "" until the signature is verified */
    json_t *in;            /* the request body: always a JSON object */
    json_t *out; /* set by the operation: the response object, or NULL for an empty body */
    /* For the audit log, filled in as the operation learns them. */
    char key_arn[KMS_ARN_MAX];
    uint32_t key_version;
    struct kms_buf context; /* canonical encryption context; cleansed */
    /* how authorization went: "allow <statement>", "allow grant <id>", "admin", "deny ..." */
    char decision[160];
};

typedef kms_err (*kms_op_fn)(struct kms_request *r);

struct kms_op {
    const char *name; /* as in X-Amz-Target after "TrentService." */
    kms_op_fn fn;
    int index_only; /* no token call: served on the HTTP thread, not by a worker */
    /*
     * May take seconds in the token or the process (RSA key generation): always
     * by a worker. Any other request that uses the token runs on its HTTP
     * thread while the token is prompt (kms_pool_inline_begin).
     */
    int worker_only;
};

#define KMS_OP_COUNT 41
/* The operation named target, or NULL. */
const struct kms_op *kms_op_lookup(const char *target);
/* Operations by position 0..KMS_OP_COUNT-1, and an operation's position. */
const struct kms_op *kms_op_at(size_t i);
size_t kms_op_index(const struct kms_op *op);

/*
 * Verifies the request's SigV4 signature against the credentials.
 * On success principal names the caller; else it is empty.
 */
struct MHD_Connection;
KMS_MUST_CHECK kms_err kms_auth_verify(struct kms_server *srv, struct MHD_Connection *c,
                                       const char *method, const char *url,
                                       const struct kms_buf *body,
                                       char principal[KMS_PRINCIPAL_MAX + 1]);

/* ---- request field helpers (ops_util.c) ----------------------------------- */

/* A string member; NULL when absent and not required. */
KMS_MUST_CHECK kms_err kms_in_string(json_t *in, const char *name, int required, size_t min,
                                     size_t max, const char **out);
/* An integer member; *present says whether it was there. */
KMS_MUST_CHECK kms_err kms_in_int(json_t *in, const char *name, long min, long max, long *out,
                                  int *present);
/* A base64 blob member, decoded into out (which the caller frees). */
KMS_MUST_CHECK kms_err kms_in_blob(json_t *in, const char *name, int required, size_t min,
                                   size_t max, struct kms_buf *out, int *present);
/* EncryptionContext in canonical form (empty when absent). */
KMS_MUST_CHECK kms_err kms_in_context(json_t *in, const char *name, struct kms_buf *out);
/*
 * GrantTokens: at most 10, each a grant token (InvalidGrantTokenException
 * otherwise); authorization (kms_authorize) uses the grants they name.
 */
KMS_MUST_CHECK kms_err kms_in_grant_tokens(json_t *in);
/* EncryptionAlgorithm, when given, must be SYMMETRIC_DEFAULT. */
KMS_MUST_CHECK kms_err kms_in_algorithm(json_t *in);

/* Sets a base64 member on out. */
KMS_MUST_CHECK kms_err kms_out_blob(json_t *out, const char *name, const uint8_t *p, size_t n);

/* KeyMetadata as DescribeKey and CreateKey return it. */
json_t *kms_key_metadata(struct kms_server *srv, const struct kms_key_info *k);
/*
 * What kind of key k is, as DescribeKey and GetPublicKey answer it: KeySpec,
 * CustomerMasterKeySpec (the same), KeyUsage and the one list of algorithms
 * that applies (EncryptionAlgorithms, SigningAlgorithms, MacAlgorithms or
 * KeyAgreementAlgorithms).
 */
KMS_MUST_CHECK kms_err kms_out_key_type(json_t *out, int spec, int usage);

/*
 * An operation's checks of the key it was authorized on, before the key
 * store is asked (which checks again): InvalidKeyUsageException naming the
 * key, its usage or spec and the operation when the key is not for it.
 */
KMS_MUST_CHECK kms_err kms_check_usage(const struct kms_key_info *k, int usage,
                                       const char *operation);
/* A SYMMETRIC_DEFAULT key (ENCRYPT_DECRYPT): GenerateDataKey*, ReEncrypt, blobs. */
KMS_MUST_CHECK kms_err kms_check_symmetric(const struct kms_key_info *k, const char *operation);
/* alg is one k's spec and usage allow (common/keyspec.h). */
KMS_MUST_CHECK kms_err kms_check_algorithm(const struct kms_key_info *k, int alg);
/*
 * An algorithm member (EncryptionAlgorithm, SigningAlgorithm, MacAlgorithm,
 * KeyAgreementAlgorithm) naming an algorithm of usage: *out is its enum
 * kms_alg, or -1 when absent and not required. Another name is
 * ValidationException listing the names of that usage, as AWS's enum check.
 */
KMS_MUST_CHECK kms_err kms_in_enum_alg(json_t *in, const char *name, int required, int usage,
                                       int *out);

/* ---- paging (ops_util.c) --------------------------------------------------- */

/*
 * A list's Limit: def when absent, else from 1 to max (AWS's range for the
 * operation), ValidationException outside it in AWS's words.
 */
KMS_MUST_CHECK kms_err kms_in_limit(json_t *in, long max, long def, size_t *out);
/*
 * A list's Marker (NULL when absent) with AWS's MarkerType constraints: 1 to
 * 1024 characters, each from U+0020 to U+00FF (ValidationException). What it
 * names is the operation's to check (KMS_ERR_INVALID_MARKER).
 */
KMS_MUST_CHECK kms_err kms_in_marker(json_t *in, const char **out);
/* The answer's Truncated, and NextMarker only when truncated (next not NULL). */
KMS_MUST_CHECK kms_err kms_out_page(json_t *out, const char *next);

#endif
