/* The server's configuration file and credentials file. */
#ifndef P11KMS_SETTINGS_H
#define P11KMS_SETTINGS_H

#include <pthread.h>
#include <stddef.h>

#include "common/digest.h"
#include "common/error.h"
#include "keystore/keystore.h"
#include "server/ratelimit.h"

enum { KMS_CLIENT_CERT_NONE, KMS_CLIENT_CERT_REQUEST, KMS_CLIENT_CERT_REQUIRE };

/* A principal that must present this client certificate (hex SHA-256 of its DER). */
struct kms_cert_binding {
    char *principal;
    char fingerprint[65];
};

#define KMS_INLINE_DEFAULT 256u

struct kms_config {
    char *module;   /* PKCS#11 module path or p11-kit name */
    char *token;    /* token label or pkcs11: URI */
    char *pin_file; /* file holding the user PIN (or env P11KMS_PIN) */
    char *credentials_file;
    char *database;                       /* "sqlite:/path/to/p11kms.db" or "postgresql://..." */
    unsigned database_timeout_ms;         /* longest wait for a busy database */
    unsigned database_pool;               /* PostgreSQL: connections per node (8) */
    unsigned database_connect_timeout_ms; /* PostgreSQL: per connection; 0: database_timeout_ms */
    char *listen;                         /* HOST:PORT */
    char *region;
    char *account;
    unsigned threads; /* HTTP threads (network and requests served from the index) */
    unsigned workers; /* threads running requests that use the token; defaults to threads */
    /*
     * HTTP threads that may run a request using the token themselves at once,
     * while the token is prompt; below threads. KMS_INLINE_DEFAULT: threads - 1.
     */
    unsigned inline_requests;
    unsigned sessions;           /* token sessions; defaults to workers + inline_requests + 1 */
    unsigned session_timeout_ms; /* longest wait for a token session */
    unsigned queue_max;          /* requests waiting for a worker before 503 */
    unsigned request_timeout_ms; /* a request unanswered by then gets 503 */
    /*
     * Instead of request_timeout_ms when a request makes an RSA key: CreateKey
     * in the token, GenerateDataKeyPair(WithoutPlaintext) in the process
     * (SoftHSM2 took over 5 s for RSA-4096 under load). 60000.
     */
    unsigned keygen_timeout_ms;
    unsigned max_connections;
    unsigned per_ip_connections; /* 0: no limit per client address */
    /* failed authentications per client address (addrlimit.h) */
    unsigned auth_failures_per_minute;      /* refill of an address's bucket; 0: no limit */
    unsigned auth_failure_burst;            /* the bucket's size */
    unsigned auth_failure_cooldown_s;       /* an address beyond it is refused this long */
    unsigned auth_failure_audit_interval_s; /* one summary line per address; 0: a line each */
    unsigned connection_timeout_s;          /* idle time before a connection is closed */
    unsigned max_header;                    /* bytes of request line and headers per connection */
    unsigned drain_timeout_ms;              /* SIGTERM: longest wait for requests in flight */
    size_t max_body;                        /* bytes */
    struct kms_ratelimit_config limits;
    /* TLS: HTTPS when tls_cert_file is set */
    char *tls_cert_file;
    char *tls_key_file; /* refused when group/world-readable */
    char *tls_client_ca_file;
    unsigned tls_min_version; /* 13 (default) or 12 */
    int tls_client_cert;      /* KMS_CLIENT_CERT_*: with tls_client_ca_file, default require */
    struct kms_cert_binding *bindings; /* client_cert.<principal> = SHA-256 fingerprint */
    size_t nbindings;
    char **admins; /* admin_principals: may create keys and manage every key */
    size_t nadmins;
    int default_policy_creator; /* default_key_policy = creator (else: account) */
    char *alias_policy_file;    /* who may create, update, delete which alias names; NULL: all */
    int allow_plain_http;       /* plain HTTP on an address other than loopback */
    int require_locked_memory;  /* refuse to start when mlockall fails */
    char *audit_log;            /* the audit log's path; NULL: none */
    int log_format;             /* KMS_LOG_TEXT or KMS_LOG_JSON (log.h) */
    char *log_file;             /* the log's path; NULL: stderr */
    int log_requests;           /* a line for every answered request */
    char *metrics_token_file;   /* the bearer token GET /metrics needs; NULL: /metrics refused */
    int metrics_key_ids;        /* metrics labelled with key ids */
    int metrics_open_loopback;  /* --dev: /metrics without a token on a loopback listener */
    char *audit_node;           /* this node's name for its audit head; NULL: host:audit_log */
    unsigned audit_checkpoint_lines;
    unsigned audit_checkpoint_seconds;
    /* The decryption breaker (breaker.h): failures within window_s; 0 failures: off. */
    unsigned breaker_failures;
    unsigned breaker_window_s;
    unsigned breaker_cooldown_s;
    struct kms_keystore_config keys; /* lifecycle and multi-node settings */
};

void kms_config_defaults(struct kms_config *c);
void kms_config_free(struct kms_config *c);
/* The database settings as kms_store_open takes them; mode: KMS_STORE_OPEN or KMS_STORE_INIT. */
struct kms_store_config kms_config_store(const struct kms_config *c, int mode);
/* Replaces *field with a copy of value. */
KMS_MUST_CHECK kms_err kms_config_set(struct kms_config *c, const char *key, const char *value);
/*
 * Parses "key = value" lines ('#' starts a comment). Unknown keys, missing
 * '=' and bad numbers are errors naming the line.
 */
KMS_MUST_CHECK kms_err kms_config_parse(struct kms_config *c, const char *text);
/*
 * What kms_config_parse_each and kms_config_check_each tell: a key set on a
 * line (message NULL), or a problem (line 0: none; key NULL: the line's or
 * the file's as a whole). Messages name no secret.
 */
typedef void (*kms_config_report)(void *arg, unsigned line, const char *key, const char *message);
/* kms_config_parse that goes on past a bad line; KMS_ERR_VALIDATION when any was. */
KMS_MUST_CHECK kms_err kms_config_parse_each(struct kms_config *c, const char *text,
                                             kms_config_report report, void *arg);
/*
 * kms_config_parse on a file's text. A database URL with a password in it
 * (user:password@, password=) makes the file hold a secret: refused, as
 * secret files are, when group or others may access it.
 */
KMS_MUST_CHECK kms_err kms_config_load(struct kms_config *c, const char *path);
/*
 * The rule for the configuration file's own mode (bits of path): when its
 * database URL holds a password, group and others may not access it.
 */
KMS_MUST_CHECK kms_err kms_config_mode_check(const struct kms_config *c, const char *path,
                                             unsigned mode);
/* Reads a whole (not secret) file into *out, NUL-terminated, malloc'd; *len its bytes. */
KMS_MUST_CHECK kms_err kms_read_file(const char *path, char **out, size_t *len);
/* Checks that every required setting is present and that the settings agree. */
KMS_MUST_CHECK kms_err kms_config_check(const struct kms_config *c);
/* kms_config_check that reports every problem (line 0, the key concerned). */
KMS_MUST_CHECK kms_err kms_config_check_each(const struct kms_config *c, kms_config_report report,
                                             void *arg);

/* True when host is a loopback address or "localhost". */
int kms_host_is_loopback(const char *host);

/* Splits HOST:PORT; host may be [v6]. */
KMS_MUST_CHECK kms_err kms_parse_listen(const char *s, char *host, size_t host_len, unsigned *port);

/*
 * Reads a whole file that holds a secret, refusing one that group or others
 * may read. *out is NUL-terminated and must be released with kms_free_secret
 * (*len + 1 bytes). Trailing newlines are removed.
 */
KMS_MUST_CHECK kms_err kms_read_secret_file(const char *path, char **out, size_t *len);
/*
 * metrics_token_file's token (a secret file, at least 16 characters): only
 * its SHA-256 is kept, in digest.
 */
KMS_MUST_CHECK kms_err kms_read_metrics_token(const char *path, uint8_t digest[KMS_SHA256_LEN]);
/*
 * The token's user PIN: from cfg->pin_file, else the environment variable
 * P11KMS_PIN (wiped and removed when forget_env). Release with kms_free_secret
 * (*len + 1 bytes).
 */
KMS_MUST_CHECK kms_err kms_read_pin(const struct kms_config *cfg, int forget_env, char **pin,
                                    size_t *len);

/* A principal's name: what policies, limits and the audit log call it. */
#define KMS_PRINCIPAL_MAX 64
#define KMS_PRINCIPAL_CHARS "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.@+=,-"

struct kms_principal {
    char *access_key;
    char *secret;
    char *name;
};

/* One principal's SigV4 signing key for one day (auth.c): the four HMACs of
   the derivation run once a day, not on every request. Cleansed when freed. */
struct kms_signing_key_slot {
    pthread_mutex_t lock;
    char date[8]; /* YYYYMMDD, or all zero when empty */
    uint8_t key[32];
};

struct kms_credentials {
    struct kms_principal *p;
    size_t n;
    struct kms_signing_key_slot *keys; /* keys[i] belongs to p[i] */
};

/*
 * Credentials file: one principal per line, "ACCESS_KEY_ID SECRET NAME";
 * blank lines and '#' comments ignored. Refused when group/world-readable.
 */
KMS_MUST_CHECK kms_err kms_credentials_load(const char *path, struct kms_credentials *out);
KMS_MUST_CHECK kms_err kms_credentials_parse(const char *text, struct kms_credentials *out);
void kms_credentials_free(struct kms_credentials *c);
const struct kms_principal *kms_credentials_find(const struct kms_credentials *c,
                                                 const char *access_key, size_t len);

#endif
