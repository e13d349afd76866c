/*
 * The client object: options and where their defaults come from, status
 * names, the thread's last error, and p11kms_free.
 *
 * Resolution order (each field on its own):
 *   endpoint     options, P11KMS_ENDPOINT, AWS_ENDPOINT_URL
 *   region       options, AWS_REGION, AWS_DEFAULT_REGION, "us-east-1"
 *   credentials  options (access_key_id with secret_access_key, and
 *                session_token if any), else AWS_ACCESS_KEY_ID with
 *                AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN; never a mix
 * An environment variable that is set but empty counts as unset.
 *
 * The secret and the session token are copied into the secure heap when it
 * is set up (the cache sets it up, so they are copied after the cache is
 * made), else into ordinary memory; both are wiped on free.
 */
#include "config.h"

#include <openssl/crypto.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>

#include "client/internal.h"
#include "common/blob.h"

#define DEFAULT_REGION "us-east-1"
#define DEFAULT_CONNECT_TIMEOUT_MS 5000
#define DEFAULT_TIMEOUT_MS 10000
#define DEFAULT_MAX_ATTEMPTS 4
#define DEFAULT_RETRY_BASE_MS 50
#define DEFAULT_RETRY_CAP_MS 2000
#define DEFAULT_RETRY_BUDGET_MS 15000
#define DEFAULT_BREAKER_THRESHOLD 5
#define DEFAULT_BREAKER_COOLDOWN_MS 5000
/* Bounds that keep a mistyped option from turning into hours of retrying. */
#define MAX_ATTEMPTS_LIMIT 20
#define MAX_STRING_OPTION 4096

/* ---- statuses and the thread's last error -------------------------------------- */

static const char *const status_names[P11KMS_STATUS_COUNT] = {
    [P11KMS_OK] = "OK",
    [P11KMS_ERR_ARGUMENT] = "InvalidArgument",
    [P11KMS_ERR_MEMORY] = "OutOfMemory",
    [P11KMS_ERR_MEMORY_LOCK] = "MemoryNotLocked",
    [P11KMS_ERR_CONFIG] = "ConfigurationError",
    [P11KMS_ERR_TRANSPORT] = "TransportError",
    [P11KMS_ERR_CIRCUIT_OPEN] = "CircuitOpen",
    [P11KMS_ERR_PROTOCOL] = "ProtocolError",
    [P11KMS_ERR_MALFORMED] = "MalformedEnvelope",
    [P11KMS_ERR_DECRYPT] = "DecryptionFailed",
    [P11KMS_ERR_TRUNCATED] = "TruncatedStream",
    [P11KMS_ERR_VALIDATION] = "ValidationException",
    [P11KMS_ERR_SERIALIZATION] = "SerializationException",
    [P11KMS_ERR_NOT_FOUND] = "NotFoundException",
    [P11KMS_ERR_ALREADY_EXISTS] = "AlreadyExistsException",
    [P11KMS_ERR_DISABLED] = "DisabledException",
    [P11KMS_ERR_INVALID_STATE] = "KMSInvalidStateException",
    [P11KMS_ERR_INVALID_CIPHERTEXT] = "InvalidCiphertextException",
    [P11KMS_ERR_INCORRECT_KEY] = "IncorrectKeyException",
    [P11KMS_ERR_INVALID_ALIAS] = "InvalidAliasNameException",
    [P11KMS_ERR_INVALID_ARN] = "InvalidArnException",
    [P11KMS_ERR_INVALID_KEY_USAGE] = "InvalidKeyUsageException",
    [P11KMS_ERR_LIMIT_EXCEEDED] = "LimitExceededException",
    [P11KMS_ERR_UNSUPPORTED] = "UnsupportedOperationException",
    [P11KMS_ERR_UNKNOWN_OPERATION] = "UnknownOperationException",
    [P11KMS_ERR_ACCESS_DENIED] = "AccessDeniedException",
    [P11KMS_ERR_MISSING_AUTH] = "MissingAuthenticationTokenException",
    [P11KMS_ERR_INCOMPLETE_SIGNATURE] = "IncompleteSignatureException",
    [P11KMS_ERR_INVALID_SIGNATURE] = "InvalidSignatureException",
    [P11KMS_ERR_UNRECOGNIZED_CLIENT] = "UnrecognizedClientException",
    [P11KMS_ERR_MALFORMED_POLICY] = "MalformedPolicyDocumentException",
    [P11KMS_ERR_THROTTLED] = "ThrottlingException",
    [P11KMS_ERR_INTERNAL] = "KMSInternalException",
    [P11KMS_ERR_KEY_UNAVAILABLE] = "KeyUnavailableException",
    [P11KMS_ERR_DEPENDENCY_TIMEOUT] = "DependencyTimeoutException",
    [P11KMS_ERR_SERVICE] = "ServiceError",
    [P11KMS_ERR_BAD_SIGNATURE] = "KMSInvalidSignatureException",
    [P11KMS_ERR_BAD_MAC] = "KMSInvalidMacException",
    [P11KMS_ERR_INVALID_GRANT_ID] = "InvalidGrantIdException",
    [P11KMS_ERR_INVALID_GRANT_TOKEN] = "InvalidGrantTokenException",
    /* ---- tags and paging ---- */
    [P11KMS_ERR_TAG] = "TagException",
    [P11KMS_ERR_INVALID_MARKER] = "InvalidMarkerException",
};

/*
 * The statuses that are the service's AWS error types: FIRST_SERVICE_STATUS up
 * to P11KMS_ERR_SERVICE (the catch-all, not a type), and the ones appended
 * after it from FIRST_LATER_SERVICE_STATUS on, so that no number changed.
 */
#define FIRST_SERVICE_STATUS P11KMS_ERR_VALIDATION
#define FIRST_LATER_SERVICE_STATUS P11KMS_ERR_BAD_SIGNATURE
_Static_assert(FIRST_LATER_SERVICE_STATUS == P11KMS_ERR_SERVICE + 1,
               "the later service statuses follow the catch-all");

static _Thread_local char last_error[512];

const char *p11kms_status_name(p11kms_status s)
{
    if ((int)s < 0 || s >= P11KMS_STATUS_COUNT || !status_names[s])
        return "Unknown";
    return status_names[s];
}

const char *p11kms_last_error(void)
{
    return last_error;
}

p11kms_status kms_client_fail(p11kms_status s, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return s;
}

p11kms_status kms_client_status_of_type(const char *type)
{
    const char *hash, *colon;
    size_t n;

    if (!type)
        return P11KMS_ERR_SERVICE;
    /* AWS's forms: "com.amazonaws.kms#NotFoundException" (the body of some
       protocols) and "NotFoundException:http://internal.amazon.com/..." (the
       X-Amzn-ErrorType header). The name is what is between. */
    hash = strrchr(type, '#');
    if (hash)
        type = hash + 1;
    colon = strchr(type, ':');
    n = colon ? (size_t)(colon - type) : strlen(type);
    for (int s = FIRST_SERVICE_STATUS; s < P11KMS_STATUS_COUNT; s++) {
        if (s == P11KMS_ERR_SERVICE)
            s = FIRST_LATER_SERVICE_STATUS;
        if (strlen(status_names[s]) == n && strncmp(status_names[s], type, n) == 0)
            return (p11kms_status)s;
    }
    return P11KMS_ERR_SERVICE;
}

/* ---- contexts -------------------------------------------------------------------- */

p11kms_status kms_client_canonical(const struct p11kms_context *ctx, size_t nctx, uint8_t **out,
                                   size_t *out_len)
{
    /* A context has a few pairs: those on the stack, more from the heap. */
    struct kms_context_pair few[8];
    struct kms_context_pair *pairs = few;
    struct kms_buf canon = KMS_BUF_INIT;
    p11kms_status st = P11KMS_OK;

    if (!out || !out_len || (nctx && !ctx))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "encryption context: NULL argument");
    *out = NULL;
    *out_len = 0;
    if (nctx > KMS_CONTEXT_MAX_LEN / 8)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "encryption context: too many pairs");
    if (nctx > sizeof few / sizeof few[0]) {
        pairs = calloc(nctx, sizeof *pairs);
        if (!pairs)
            return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    }
    for (size_t i = 0; i < nctx && st == P11KMS_OK; i++) {
        if (!ctx[i].key || !ctx[i].value) {
            st = kms_client_fail(P11KMS_ERR_ARGUMENT, "encryption context: pair %zu is NULL", i);
            break;
        }
        pairs[i].key = ctx[i].key;
        pairs[i].key_len = strlen(ctx[i].key);
        pairs[i].value = ctx[i].value;
        pairs[i].value_len = strlen(ctx[i].value);
    }
    if (st == P11KMS_OK && kms_context_canonical(pairs, nctx, &canon) != KMS_OK)
        st = kms_client_fail(P11KMS_ERR_ARGUMENT, "encryption context: %s", kms_err_message());
    if (st == P11KMS_OK && canon.len > KMS_CONTEXT_MAX_LEN)
        st = kms_client_fail(P11KMS_ERR_ARGUMENT, "encryption context: longer than %d bytes",
                             KMS_CONTEXT_MAX_LEN);
    if (st == P11KMS_OK) {
        /* kms_buf's memory is malloc'd: the caller frees it with free(). */
        *out = canon.data;
        *out_len = canon.len;
        canon = (struct kms_buf)KMS_BUF_INIT;
    }
    kms_buf_free(&canon);
    if (pairs != few)
        free(pairs);
    return st;
}

/* ---- memory ---------------------------------------------------------------------- */

void p11kms_free(void *p, size_t n)
{
    if (!p)
        return;
    if (CRYPTO_secure_malloc_initialized() && CRYPTO_secure_allocated(p)) {
        OPENSSL_secure_clear_free(p, n);
    } else {
        OPENSSL_cleanse(p, n);
        free(p);
    }
}

void p11kms_data_key_clear(struct p11kms_data_key *k)
{
    if (!k)
        return;
    p11kms_free(k->plaintext, k->plaintext_len);
    free(k->blob);
    OPENSSL_cleanse(k, sizeof *k);
}

void *kms_client_secret_alloc(const p11kms_client *c, size_t n)
{
    void *p = NULL;
    if (CRYPTO_secure_malloc_initialized())
        p = OPENSSL_secure_malloc(n);
    if (!p && !(c && c->opt.require_locked_memory))
        p = malloc(n);
    return p;
}

/* A copy of a secret string, as kms_client_secret_alloc places it. */
static char *secret_dup(const p11kms_client *c, const char *s)
{
    size_t n = strlen(s) + 1;
    char *p = kms_client_secret_alloc(c, n);
    if (p)
        memcpy(p, s, n);
    return p;
}

static void secret_free(char *p)
{
    if (p)
        p11kms_free(p, strlen(p) + 1);
}

/* ---- the client -------------------------------------------------------------------- */

void p11kms_options_init(struct p11kms_options *o)
{
    if (o)
        memset(o, 0, sizeof *o);
}

static const char *env(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? v : NULL;
}

static const char *first(const char *a, const char *b, const char *c)
{
    return a ? a : b ? b : c;
}

/* Copies an optional string option; a copy of NULL is NULL. */
static p11kms_status copy_option(const char *what, const char *value, char **out)
{
    *out = NULL;
    if (!value)
        return P11KMS_OK;
    if (strnlen(value, MAX_STRING_OPTION + 1) > MAX_STRING_OPTION)
        return kms_client_fail(P11KMS_ERR_CONFIG, "%s is longer than %d bytes", what,
                               MAX_STRING_OPTION);
    *out = strdup(value);
    if (!*out)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    return P11KMS_OK;
}

static p11kms_status check_readable(const char *what, const char *path)
{
    if (path && access(path, R_OK) != 0)
        return kms_client_fail(P11KMS_ERR_CONFIG, "%s '%.200s' cannot be read", what, path);
    return P11KMS_OK;
}

static unsigned or_default(unsigned v, unsigned d)
{
    return v ? v : d;
}

/* Endpoint, region, TLS files and numbers: everything but the secrets. */
static p11kms_status resolve(p11kms_client *c, const struct p11kms_options *o)
{
    struct p11kms_options *r = &c->opt;
    const char *endpoint = first(o->endpoint, env("P11KMS_ENDPOINT"), env("AWS_ENDPOINT_URL"));
    const char *region = first(o->region, env("AWS_REGION"), env("AWS_DEFAULT_REGION"));
    p11kms_status st;

    *r = *o;
    if (!endpoint || !*endpoint)
        return kms_client_fail(P11KMS_ERR_CONFIG,
                               "no endpoint: set the endpoint option, P11KMS_ENDPOINT or "
                               "AWS_ENDPOINT_URL");
    if (strncasecmp(endpoint, "http://", 7) != 0 && strncasecmp(endpoint, "https://", 8) != 0)
        return kms_client_fail(P11KMS_ERR_CONFIG, "endpoint '%.200s' is not an http(s) URL",
                               endpoint);
    if (!region || !*region)
        region = DEFAULT_REGION;
    if ((st = copy_option("endpoint", endpoint, &c->endpoint)) != P11KMS_OK ||
        (st = copy_option("region", region, &c->region)) != P11KMS_OK ||
        (st = copy_option("ca_file", o->ca_file, &c->ca_file)) != P11KMS_OK ||
        (st = copy_option("client_cert_file", o->client_cert_file, &c->client_cert_file)) !=
            P11KMS_OK ||
        (st = copy_option("client_key_file", o->client_key_file, &c->client_key_file)) != P11KMS_OK)
        return st;
    if (c->client_key_file && !c->client_cert_file)
        return kms_client_fail(P11KMS_ERR_CONFIG, "client_key_file without client_cert_file");
    if ((st = check_readable("ca_file", c->ca_file)) != P11KMS_OK ||
        (st = check_readable("client_cert_file", c->client_cert_file)) != P11KMS_OK ||
        (st = check_readable("client_key_file", c->client_key_file)) != P11KMS_OK)
        return st;
    r->endpoint = c->endpoint;
    r->region = c->region;
    r->ca_file = c->ca_file;
    r->client_cert_file = c->client_cert_file;
    r->client_key_file = c->client_key_file;
    r->access_key_id = r->secret_access_key = r->session_token = NULL;

    r->connect_timeout_ms = or_default(o->connect_timeout_ms, DEFAULT_CONNECT_TIMEOUT_MS);
    r->timeout_ms = or_default(o->timeout_ms, DEFAULT_TIMEOUT_MS);
    r->max_attempts = or_default(o->max_attempts, DEFAULT_MAX_ATTEMPTS);
    r->retry_base_ms = or_default(o->retry_base_ms, DEFAULT_RETRY_BASE_MS);
    r->retry_cap_ms = or_default(o->retry_cap_ms, DEFAULT_RETRY_CAP_MS);
    r->retry_budget_ms = or_default(o->retry_budget_ms, DEFAULT_RETRY_BUDGET_MS);
    r->breaker_threshold = or_default(o->breaker_threshold, DEFAULT_BREAKER_THRESHOLD);
    r->breaker_cooldown_ms = or_default(o->breaker_cooldown_ms, DEFAULT_BREAKER_COOLDOWN_MS);
    if (r->max_attempts > MAX_ATTEMPTS_LIMIT)
        return kms_client_fail(P11KMS_ERR_CONFIG, "max_attempts %u is above %d", r->max_attempts,
                               MAX_ATTEMPTS_LIMIT);
    return P11KMS_OK;
}

/* Credentials from the options or else the environment, never a mix. */
static p11kms_status resolve_credentials(p11kms_client *c, const struct p11kms_options *o)
{
    const char *akid, *secret, *token;

    if (o->access_key_id || o->secret_access_key || o->session_token) {
        if (!o->access_key_id || !*o->access_key_id || !o->secret_access_key ||
            !*o->secret_access_key)
            return kms_client_fail(P11KMS_ERR_CONFIG,
                                   "credentials options need both access_key_id and "
                                   "secret_access_key");
        akid = o->access_key_id;
        secret = o->secret_access_key;
        token = o->session_token && *o->session_token ? o->session_token : NULL;
    } else {
        akid = env("AWS_ACCESS_KEY_ID");
        secret = env("AWS_SECRET_ACCESS_KEY");
        token = env("AWS_SESSION_TOKEN");
        if (!akid || !secret)
            return kms_client_fail(P11KMS_ERR_CONFIG,
                                   "no credentials: set the access_key_id and secret_access_key "
                                   "options, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY");
    }
    if (strlen(akid) > 128 || strlen(secret) > MAX_STRING_OPTION ||
        (token && strlen(token) > MAX_STRING_OPTION))
        return kms_client_fail(P11KMS_ERR_CONFIG, "credentials are too long");
    c->access_key_id = strdup(akid);
    c->secret_access_key = secret_dup(c, secret);
    c->session_token = token ? secret_dup(c, token) : NULL;
    if (!c->access_key_id || !c->secret_access_key || (token && !c->session_token))
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    c->opt.access_key_id = c->access_key_id;
    c->opt.secret_access_key = c->secret_access_key;
    c->opt.session_token = c->session_token;
    return P11KMS_OK;
}

p11kms_status p11kms_client_new(const struct p11kms_options *o, p11kms_client **out)
{
    struct p11kms_options defaults;
    p11kms_client *c;
    p11kms_status st;

    if (!out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_client_new: out is NULL");
    *out = NULL;
    if (!o) {
        p11kms_options_init(&defaults);
        o = &defaults;
    }
    c = calloc(1, sizeof *c);
    if (!c)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    if ((st = kms_jwe_memo_init(&c->jwe_memo)) != P11KMS_OK) {
        free(c);
        return st;
    }
    kms_pubkeys_init(c);

    st = resolve(c, o);
    if (st == P11KMS_OK && o->cache_max_age_s > 0) {
        st = kms_cache_new(&c->opt, &c->cache);
        if (st == P11KMS_OK)
            c->memory_locked = kms_cache_locked(c->cache);
    } else if (st == P11KMS_OK && o->require_locked_memory) {
        /* Without the cache nothing sets up the locked heap the data keys would live in. */
        st = kms_client_fail(P11KMS_ERR_MEMORY_LOCK,
                             "require_locked_memory needs the data-key cache, whose secure heap "
                             "holds the keys (set cache_max_age_s)");
    }
    if (st == P11KMS_OK)
        st = resolve_credentials(c, o);
    if (st == P11KMS_OK)
        st = kms_transport_new(c, &c->transport);
    if (st != P11KMS_OK) {
        p11kms_client_free(c);
        return st;
    }
    *out = c;
    return P11KMS_OK;
}

void p11kms_client_free(p11kms_client *c)
{
    if (!c)
        return;
    kms_transport_free(c->transport);
    kms_cache_free(c->cache);
    kms_jwe_memo_destroy(&c->jwe_memo);
    kms_pubkeys_free(c);
    free(c->endpoint);
    free(c->region);
    free(c->access_key_id);
    secret_free(c->secret_access_key);
    secret_free(c->session_token);
    free(c->ca_file);
    free(c->client_cert_file);
    free(c->client_key_file);
    OPENSSL_cleanse(c, sizeof *c);
    free(c);
}

int p11kms_client_memory_locked(const p11kms_client *c)
{
    return c ? c->memory_locked : 0;
}
