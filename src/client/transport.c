/*
 * The transport: AWS KMS JSON 1.1 over libcurl, SigV4-signed with the
 * server's own canonical-request code (src/common/sigv4.c), retried with full
 * jitter, behind a circuit breaker.
 *
 * Connections. libcurl keeps a connection open in the easy handle that made
 * it, and sharing one connection cache between threads that run transfers at
 * the same time is not supported (CURLSHOPT_SHARE, CURL_LOCK_DATA_CONNECT).
 * So the client keeps a mutex-guarded pool of easy handles: a call takes one
 * (or makes one when the pool is empty), runs all its attempts on it and
 * gives it back, so the next call -- from any thread -- reuses its kept-alive
 * connection. At most POOL_MAX idle handles are kept; with N threads calling
 * at once there are N handles and N connections. The handles share one curl
 * share object for the DNS cache and TLS sessions (resumption), each kind of
 * data under its own mutex. A forked child does not touch its parent's
 * handles (their sockets are the parent's too): the pool notices the new pid
 * and starts afresh.
 *
 * Each attempt is signed anew (a fresh X-Amz-Date). Host, Content-Type,
 * X-Amz-Date, X-Amz-Target and X-Amz-Security-Token are signed and sent
 * exactly as signed (Host is set here, not by curl). TLS: peer and host
 * verification always on, http and https only, no redirects, TLS 1.2 or
 * later. Answers are read into a capped buffer in the secure heap (they may
 * carry a data key) and wiped after parsing.
 */
#include "config.h"

#include <curl/curl.h>
#include <errno.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "client/internal.h"
#include "common/json_alloc.h"
#include "common/sigv4.h"

#define SERVICE "kms"
#define TARGET_PREFIX "TrentService."
#define JSON_TYPE "application/x-amz-json-1.1"
#define USER_AGENT "libp11kms/" P11KMS_VERSION_STRING
#define POOL_MAX 32
#define RESPONSE_FIRST 1024
#define RESPONSE_MAX ((size_t)1 << 20)
#define ERROR_TYPE_MAX 128
#define OPERATION_MAX 64
#define RETRY_AFTER_MAX_S 3600

struct conn {
    CURL *h;
    char errbuf[CURL_ERROR_SIZE];
};

struct kms_transport {
    p11kms_client *c;
    char *url;  /* the endpoint as curl normalised it */
    char *host; /* the Host header: host, and port unless the scheme's default */
    char *path; /* decoded, for the canonical request */
    CURLSH *share;
    pthread_mutex_t share_locks[CURL_LOCK_DATA_LAST];
    pthread_mutex_t lock; /* the pool and the breaker */
    struct conn *pool[POOL_MAX];
    size_t npool;
    pid_t pid;
    struct kms_breaker breaker;
};

/* ---- the circuit breaker ------------------------------------------------------------ */

void kms_breaker_init(struct kms_breaker *b, unsigned threshold, unsigned cooldown_ms)
{
    memset(b, 0, sizeof *b);
    b->threshold = threshold ? threshold : 1;
    b->cooldown_ms = cooldown_ms;
    b->state = KMS_BREAKER_CLOSED;
}

int kms_breaker_admit_locked(struct kms_breaker *b, uint64_t now_ms, struct kms_breaker_ticket *t)
{
    switch (b->state) {
    case KMS_BREAKER_CLOSED:
        t->generation = b->generation;
        t->probe = 0;
        return 1;
    case KMS_BREAKER_OPEN:
        if (now_ms < b->opened_at_ms + b->cooldown_ms)
            return 0;
        b->state = KMS_BREAKER_HALF_OPEN;
        b->generation++;
        t->generation = b->generation;
        t->probe = 1;
        return 1;
    case KMS_BREAKER_HALF_OPEN: return 0;
    }
    return 0;
}

void kms_breaker_record_locked(struct kms_breaker *b, const struct kms_breaker_ticket *t,
                               enum kms_breaker_result r, uint64_t now_ms)
{
    if (t->generation != b->generation)
        return; /* let in before the last change of state: it no longer counts */
    if (t->probe) {
        if (r == KMS_BREAKER_SUCCESS) {
            b->state = KMS_BREAKER_CLOSED;
            b->failures = 0;
        } else {
            /* A failed probe starts another cool-down; a probe that learned
               nothing hands its turn to the next call at once. */
            b->state = KMS_BREAKER_OPEN;
            if (r == KMS_BREAKER_FAILURE)
                b->opened_at_ms = now_ms;
        }
        b->generation++;
        return;
    }
    if (r == KMS_BREAKER_SUCCESS) {
        b->failures = 0;
    } else if (r == KMS_BREAKER_FAILURE && ++b->failures >= b->threshold) {
        b->state = KMS_BREAKER_OPEN;
        b->opened_at_ms = now_ms;
        b->generation++;
    }
}

enum kms_breaker_state kms_transport_breaker_state(struct kms_transport *t)
{
    enum kms_breaker_state s;
    pthread_mutex_lock(&t->lock);
    s = t->breaker.state;
    pthread_mutex_unlock(&t->lock);
    return s;
}

/* ---- backoff ------------------------------------------------------------------------ */

uint64_t kms_backoff_ms(unsigned retry, unsigned base_ms, unsigned cap_ms, uint64_t retry_after_ms,
                        uint64_t (*rnd)(void *arg), void *rnd_arg)
{
    uint64_t ceiling = cap_ms, wait;
    if (retry < 32 && ((uint64_t)base_ms << retry) < ceiling)
        ceiling = (uint64_t)base_ms << retry;
    wait = rnd(rnd_arg) % (ceiling + 1);
    if (retry_after_ms) {
        uint64_t honoured = retry_after_ms < cap_ms ? retry_after_ms : cap_ms;
        if (honoured > wait)
            wait = honoured;
    }
    return wait;
}

/* Jitter needs no secrecy, but OpenSSL's DRBG is thread-safe and at hand. */
static uint64_t random_u64(void *arg)
{
    uint64_t v = 0;
    (void)arg;
    if (RAND_bytes((unsigned char *)&v, sizeof v) != 1)
        v = (uint64_t)time(NULL) * 2654435761u;
    return v;
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void sleep_ms(uint64_t ms)
{
    struct timespec left = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&left, &left) != 0 && errno == EINTR)
        ;
}

/* ---- libcurl set-up ----------------------------------------------------------------- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_result = CURLE_FAILED_INIT;

/*
 * Once per process and never undone: the application may use libcurl itself.
 * jansson seeds its hash function on the first json_object() unless told
 * before; seeding here, while the client is made, keeps that out of the
 * calls that threads make at once. (An application that seeded already
 * keeps its seed: json_object_seed does nothing then.)
 */
static void curl_init(void)
{
    curl_init_result = curl_global_init(CURL_GLOBAL_DEFAULT);
    json_object_seed(0);
}

static void share_lock(CURL *h, curl_lock_data data, curl_lock_access access, void *arg)
{
    struct kms_transport *t = arg;
    (void)h;
    (void)access;
    if ((unsigned)data < CURL_LOCK_DATA_LAST)
        pthread_mutex_lock(&t->share_locks[data]);
}

static void share_unlock(CURL *h, curl_lock_data data, void *arg)
{
    struct kms_transport *t = arg;
    (void)h;
    if ((unsigned)data < CURL_LOCK_DATA_LAST)
        pthread_mutex_unlock(&t->share_locks[data]);
}

/* What one attempt read: the body in a capped secret buffer, and two headers. */
struct response {
    const p11kms_client *c;
    uint8_t *data;
    size_t len, cap;
    int too_big, no_memory;
    long retry_after_s; /* -1: none */
    char error_type[ERROR_TYPE_MAX];
};

static void response_free(struct response *r)
{
    p11kms_free(r->data, r->cap);
    r->data = NULL;
    r->len = r->cap = 0;
}

static size_t on_body(char *p, size_t size, size_t nmemb, void *arg)
{
    struct response *r = arg;
    size_t n = size * nmemb;

    if (n > RESPONSE_MAX - r->len) {
        r->too_big = 1;
        return 0;
    }
    if (r->len + n + 1 > r->cap) {
        size_t cap = r->cap ? r->cap : RESPONSE_FIRST;
        uint8_t *grown;
        while (cap < r->len + n + 1)
            cap *= 2;
        /* Not realloc: the old block may hold a data key and is wiped. */
        grown = kms_client_secret_alloc(r->c, cap);
        if (!grown) {
            r->no_memory = 1;
            return 0;
        }
        if (r->len)
            memcpy(grown, r->data, r->len);
        p11kms_free(r->data, r->cap);
        r->data = grown;
        r->cap = cap;
    }
    memcpy(r->data + r->len, p, n);
    r->len += n;
    r->data[r->len] = '\0';
    return n;
}

/* The value of header `name` in one raw header line, trimmed; NULL if it is another. */
static const char *header_is(const char *line, size_t n, const char *name, size_t *vlen)
{
    size_t nl = strlen(name);
    const char *v, *end = line + n;
    if (n <= nl || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return NULL;
    v = line + nl + 1;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t'))
        end--;
    *vlen = (size_t)(end - v);
    return v;
}

static size_t on_header(char *p, size_t size, size_t nmemb, void *arg)
{
    struct response *r = arg;
    size_t n = size * nmemb, vlen = 0;
    const char *v;

    if ((v = header_is(p, n, "Retry-After", &vlen)) != NULL) {
        long s = 0;
        size_t i;
        for (i = 0; i < vlen && v[i] >= '0' && v[i] <= '9' && s <= RETRY_AFTER_MAX_S; i++)
            s = s * 10 + (v[i] - '0');
        /* Seconds only; the HTTP-date form is ignored (the backoff still applies). */
        if (i == vlen && vlen > 0)
            r->retry_after_s = s > RETRY_AFTER_MAX_S ? RETRY_AFTER_MAX_S : s;
    } else if ((v = header_is(p, n, "X-Amzn-ErrorType", &vlen)) != NULL) {
        snprintf(r->error_type, sizeof r->error_type, "%.*s", (int)vlen, v);
    }
    return n;
}

static void conn_free(struct conn *cn)
{
    if (!cn)
        return;
    if (cn->h)
        curl_easy_cleanup(cn->h);
    free(cn);
}

#define SET(opt, val) ok = ok && curl_easy_setopt(h, (opt), (val)) == CURLE_OK

/* A fresh easy handle with everything that does not change between calls. */
static struct conn *conn_new(struct kms_transport *t)
{
    const struct p11kms_options *o = &t->c->opt;
    struct conn *cn = calloc(1, sizeof *cn);
    CURL *h;
    int ok = 1;

    if (!cn || !(cn->h = curl_easy_init())) {
        free(cn);
        return NULL;
    }
    h = cn->h;
    SET(CURLOPT_URL, t->url);
#if LIBCURL_VERSION_NUM >= 0x075500
    SET(CURLOPT_PROTOCOLS_STR, "http,https");
#else
    SET(CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
    SET(CURLOPT_FOLLOWLOCATION, 0L);
    SET(CURLOPT_NOSIGNAL, 1L);
    SET(CURLOPT_CONNECTTIMEOUT_MS, (long)o->connect_timeout_ms);
    SET(CURLOPT_TIMEOUT_MS, (long)o->timeout_ms);
    SET(CURLOPT_TCP_KEEPALIVE, 1L);
    SET(CURLOPT_SSL_VERIFYPEER, 1L);
    SET(CURLOPT_SSL_VERIFYHOST, 2L);
    SET(CURLOPT_SSLVERSION, (long)CURL_SSLVERSION_TLSv1_2);
    if (o->ca_file) {
        /* The file replaces the system's CAs: no bundle, no directory. */
        SET(CURLOPT_CAINFO, o->ca_file);
        SET(CURLOPT_CAPATH, (char *)NULL);
    }
    if (o->client_cert_file) {
        SET(CURLOPT_SSLCERTTYPE, "PEM");
        SET(CURLOPT_SSLCERT, o->client_cert_file);
        SET(CURLOPT_SSLKEYTYPE, "PEM");
        SET(CURLOPT_SSLKEY, o->client_key_file ? o->client_key_file : o->client_cert_file);
    }
    SET(CURLOPT_SHARE, t->share);
    SET(CURLOPT_USERAGENT, USER_AGENT);
    SET(CURLOPT_POST, 1L);
    SET(CURLOPT_WRITEFUNCTION, on_body);
    SET(CURLOPT_HEADERFUNCTION, on_header);
    SET(CURLOPT_ERRORBUFFER, cn->errbuf);
    if (!ok) {
        conn_free(cn);
        return NULL;
    }
    return cn;
}

#undef SET

static struct conn *pool_take(struct kms_transport *t)
{
    struct conn *cn = NULL;
    pthread_mutex_lock(&t->lock);
    if (t->pid != getpid()) {
        /* A forked child: the pooled handles' sockets are the parent's. Cleaning
           them up could send on those (a TLS close_notify), so they are left. */
        t->npool = 0;
        t->pid = getpid();
    }
    if (t->npool > 0)
        cn = t->pool[--t->npool];
    pthread_mutex_unlock(&t->lock);
    return cn ? cn : conn_new(t);
}

static void pool_put(struct kms_transport *t, struct conn *cn)
{
    pthread_mutex_lock(&t->lock);
    if (t->pid == getpid() && t->npool < POOL_MAX) {
        t->pool[t->npool++] = cn;
        cn = NULL;
    }
    pthread_mutex_unlock(&t->lock);
    conn_free(cn);
}

/* Host, port and path of the endpoint; queries, fragments and user names refused. */
static p11kms_status parse_endpoint(struct kms_transport *t, const char *endpoint)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL, *path = NULL, *url = NULL, *extra = NULL;
    p11kms_status st = P11KMS_OK;
    size_t hl;

    if (!u)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    if (curl_url_set(u, CURLUPART_URL, endpoint, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || !*host) {
        st = kms_client_fail(P11KMS_ERR_CONFIG, "endpoint '%.200s' is not a URL", endpoint);
        goto cleanup;
    }
    if (strcasecmp(scheme, "http") != 0 && strcasecmp(scheme, "https") != 0) {
        st = kms_client_fail(P11KMS_ERR_CONFIG, "endpoint '%.200s' is not http or https", endpoint);
        goto cleanup;
    }
    if (curl_url_get(u, CURLUPART_QUERY, &extra, 0) == CURLUE_OK ||
        curl_url_get(u, CURLUPART_FRAGMENT, &extra, 0) == CURLUE_OK ||
        curl_url_get(u, CURLUPART_USER, &extra, 0) == CURLUE_OK) {
        st = kms_client_fail(P11KMS_ERR_CONFIG,
                             "endpoint '%.200s' may not carry a query, fragment or user name",
                             endpoint);
        goto cleanup;
    }
    if (curl_url_get(u, CURLUPART_PORT, &port, 0) == CURLUE_OK &&
        ((strcasecmp(scheme, "http") == 0 && strcmp(port, "80") == 0) ||
         (strcasecmp(scheme, "https") == 0 && strcmp(port, "443") == 0))) {
        curl_free(port);
        port = NULL;
    }
    if (curl_url_get(u, CURLUPART_PATH, &path, CURLU_URLDECODE) != CURLUE_OK ||
        curl_url_get(u, CURLUPART_URL, &url, 0) != CURLUE_OK) {
        st = kms_client_fail(P11KMS_ERR_CONFIG, "endpoint '%.200s' is not a URL", endpoint);
        goto cleanup;
    }
    hl = strlen(host) + (port ? strlen(port) + 1 : 0) + 1;
    t->host = malloc(hl);
    t->path = strdup(*path ? path : "/");
    t->url = strdup(url);
    if (!t->host || !t->path || !t->url) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        goto cleanup;
    }
    snprintf(t->host, hl, "%s%s%s", host, port ? ":" : "", port ? port : "");

cleanup:
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_free(path);
    curl_free(url);
    curl_free(extra);
    curl_url_cleanup(u);
    return st;
}

p11kms_status kms_transport_new(p11kms_client *c, struct kms_transport **out)
{
    struct kms_transport *t;
    struct conn *first;
    p11kms_status st;
    int ok;

    *out = NULL;
    if (pthread_once(&curl_once, curl_init) != 0 || curl_init_result != CURLE_OK)
        return kms_client_fail(P11KMS_ERR_CONFIG, "libcurl could not be initialised");
    t = calloc(1, sizeof *t);
    if (!t)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    t->c = c;
    t->pid = getpid();
    pthread_mutex_init(&t->lock, NULL);
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++)
        pthread_mutex_init(&t->share_locks[i], NULL);
    kms_breaker_init(&t->breaker, c->opt.breaker_threshold, c->opt.breaker_cooldown_ms);

    st = parse_endpoint(t, c->opt.endpoint);
    if (st != P11KMS_OK)
        goto fail;
    t->share = curl_share_init();
    ok = t->share != NULL;
    ok = ok && curl_share_setopt(t->share, CURLSHOPT_LOCKFUNC, share_lock) == CURLSHE_OK;
    ok = ok && curl_share_setopt(t->share, CURLSHOPT_UNLOCKFUNC, share_unlock) == CURLSHE_OK;
    ok = ok && curl_share_setopt(t->share, CURLSHOPT_USERDATA, t) == CURLSHE_OK;
    ok = ok && curl_share_setopt(t->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_DNS) == CURLSHE_OK;
    ok = ok &&
         curl_share_setopt(t->share, CURLSHOPT_SHARE, CURL_LOCK_DATA_SSL_SESSION) == CURLSHE_OK;
    if (!ok) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "cannot set up libcurl's share object");
        goto fail;
    }
    /* One handle now, so an option libcurl refuses shows here and not on the first call. */
    first = conn_new(t);
    if (!first) {
        st = kms_client_fail(P11KMS_ERR_CONFIG,
                             "libcurl refused the transport options (TLS files, timeouts)");
        goto fail;
    }
    t->pool[t->npool++] = first;
    *out = t;
    return P11KMS_OK;

fail:
    kms_transport_free(t);
    return st;
}

void kms_transport_free(struct kms_transport *t)
{
    if (!t)
        return;
    if (t->pid == getpid())
        for (size_t i = 0; i < t->npool; i++)
            conn_free(t->pool[i]);
    /* Every easy handle that used the share object is gone: it may go too. */
    if (t->share)
        curl_share_cleanup(t->share);
    pthread_mutex_destroy(&t->lock);
    for (int i = 0; i < CURL_LOCK_DATA_LAST; i++)
        pthread_mutex_destroy(&t->share_locks[i]);
    free(t->url);
    free(t->host);
    free(t->path);
    free(t);
}

/* ---- one attempt -------------------------------------------------------------------- */

struct attempt {
    p11kms_status status;
    enum kms_breaker_result breaker;
    int retry;               /* worth another attempt */
    uint64_t retry_after_ms; /* 0: none given */
    json_t *response;
};

/* curl errors that another attempt will not cure. */
static int permanent(CURLcode cc)
{
    switch (cc) {
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_URL_MALFORMAT:
    case CURLE_NOT_BUILT_IN:
    case CURLE_PEER_FAILED_VERIFICATION:
    case CURLE_SSL_CERTPROBLEM:
    case CURLE_SSL_CIPHER:
    case CURLE_SSL_CACERT_BADFILE:
    case CURLE_SSL_CRL_BADFILE:
    case CURLE_SSL_ISSUER_ERROR:
    case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
    case CURLE_SSL_INVALIDCERTSTATUS:
    case CURLE_BAD_FUNCTION_ARGUMENT:
    case CURLE_OUT_OF_MEMORY: return 1;
    default: return 0;
    }
}

/* Appends "Name: value" to the list; the line is built in a buffer wiped after. */
static int add_header(struct curl_slist **list, const char *name, const char *value)
{
    struct kms_buf line = KMS_BUF_INIT;
    struct curl_slist *grown = NULL;
    if (kms_buf_append_str(&line, name) == KMS_OK && kms_buf_append_str(&line, ": ") == KMS_OK &&
        kms_buf_append_str(&line, value) == KMS_OK && kms_buf_terminate(&line) == KMS_OK)
        grown = curl_slist_append(*list, (const char *)line.data);
    kms_buf_free(&line);
    if (!grown)
        return 0;
    *list = grown;
    return 1;
}

/* The session token travels in a header: the list is wiped before it is freed. */
static void free_headers(struct curl_slist *list)
{
    for (struct curl_slist *l = list; l; l = l->next)
        OPENSSL_cleanse(l->data, strlen(l->data));
    curl_slist_free_all(list);
}

/* The service's error answer: its type and message to a status and the last error. */
static void service_error(struct attempt *a, long http, const struct response *r)
{
    json_t *doc = NULL, *jt, *jm;
    const char *type = r->error_type[0] ? r->error_type : NULL, *message = NULL;

    if (r->len)
        doc = json_loadb((const char *)r->data, r->len, 0, NULL);
    if (json_is_object(doc)) {
        jt = json_object_get(doc, "__type");
        jm = json_object_get(doc, "message");
        if (!json_is_string(jm))
            jm = json_object_get(doc, "Message");
        if (json_is_string(jt) && json_string_length(jt) > 0)
            type = json_string_value(jt);
        if (json_is_string(jm) && json_string_length(jm) > 0)
            message = json_string_value(jm);
    }
    if (type)
        a->status = kms_client_status_of_type(type);
    else
        a->status = http == 429 ? P11KMS_ERR_THROTTLED : P11KMS_ERR_SERVICE;
    if (message)
        kms_client_fail(a->status, "%s", message);
    else
        kms_client_fail(a->status, "%s (HTTP %ld) from the service",
                        type ? type : "an error without a type", http);
    json_decref(doc);

    if (a->status == P11KMS_ERR_THROTTLED || http == 429 || http >= 500) {
        a->breaker = KMS_BREAKER_FAILURE;
        a->retry = 1;
        if (r->retry_after_s > 0)
            a->retry_after_ms = (uint64_t)r->retry_after_s * 1000;
    } else {
        a->breaker = KMS_BREAKER_SUCCESS; /* a client error: the service is up */
    }
}

static void attempt_once(struct kms_transport *t, struct conn *cn, const char *target,
                         const struct kms_buf *body, struct attempt *a)
{
    const p11kms_client *c = t->c;
    char amz_date[KMS_AMZ_DATE_LEN + 1];
    struct kms_header hdrs[5];
    size_t nh = 0;
    struct kms_sigv4_request req;
    struct kms_buf authz = KMS_BUF_INIT;
    struct curl_slist *list = NULL;
    struct response r;
    CURLcode cc;
    long http = 0;
    int ok = 1;

    memset(a, 0, sizeof *a);
    a->breaker = KMS_BREAKER_NONE;
    memset(&r, 0, sizeof r);
    r.c = c;
    r.retry_after_s = -1;

    if (kms_sigv4_amz_date(time(NULL), amz_date) != KMS_OK) {
        a->status = kms_client_fail(P11KMS_ERR_CONFIG, "cannot sign: %s", kms_err_message());
        return;
    }
    hdrs[nh++] = (struct kms_header){"Host", t->host};
    hdrs[nh++] = (struct kms_header){"Content-Type", JSON_TYPE};
    hdrs[nh++] = (struct kms_header){"X-Amz-Date", amz_date};
    hdrs[nh++] = (struct kms_header){"X-Amz-Target", target};
    if (c->session_token)
        hdrs[nh++] = (struct kms_header){"X-Amz-Security-Token", c->session_token};
    req = (struct kms_sigv4_request){"POST", t->path, NULL, 0, hdrs, nh, body->data, body->len};
    if (kms_sigv4_sign(&req, c->access_key_id, c->secret_access_key, c->region, SERVICE, amz_date,
                       &authz) != KMS_OK) {
        a->status = kms_client_fail(P11KMS_ERR_CONFIG, "cannot sign: %s", kms_err_message());
        kms_buf_free(&authz);
        return;
    }
    for (size_t i = 0; i < nh && ok; i++)
        ok = add_header(&list, hdrs[i].name, hdrs[i].value);
    ok = ok && add_header(&list, "Authorization", (const char *)authz.data);
    /* No "Expect: 100-continue" round trip for bodies over 1 KiB. */
    ok = ok && (list = curl_slist_append(list, "Expect:")) != NULL;
    kms_buf_free(&authz);
    if (!ok) {
        free_headers(list);
        a->status = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        return;
    }

    cn->errbuf[0] = '\0';
    cc = curl_easy_setopt(cn->h, CURLOPT_HTTPHEADER, list);
    if (cc == CURLE_OK)
        cc = curl_easy_setopt(cn->h, CURLOPT_POSTFIELDS, body->data);
    if (cc == CURLE_OK)
        cc = curl_easy_setopt(cn->h, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)body->len);
    if (cc == CURLE_OK)
        cc = curl_easy_setopt(cn->h, CURLOPT_WRITEDATA, &r);
    if (cc == CURLE_OK)
        cc = curl_easy_setopt(cn->h, CURLOPT_HEADERDATA, &r);
    if (cc == CURLE_OK)
        cc = curl_easy_perform(cn->h);
    if (cc == CURLE_OK)
        curl_easy_getinfo(cn->h, CURLINFO_RESPONSE_CODE, &http);
    /* The handle goes back to the pool: nothing in it may point at this call. */
    curl_easy_setopt(cn->h, CURLOPT_HTTPHEADER, (struct curl_slist *)NULL);
    curl_easy_setopt(cn->h, CURLOPT_POSTFIELDS, (char *)NULL);
    curl_easy_setopt(cn->h, CURLOPT_WRITEDATA, (void *)NULL);
    curl_easy_setopt(cn->h, CURLOPT_HEADERDATA, (void *)NULL);
    free_headers(list);

    if (cc != CURLE_OK) {
        if (r.no_memory) {
            a->status = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory for the answer");
        } else if (r.too_big) {
            a->status =
                kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer is over %zu bytes", RESPONSE_MAX);
        } else {
            a->status = kms_client_fail(P11KMS_ERR_TRANSPORT, "%s: %s", t->url,
                                        cn->errbuf[0] ? cn->errbuf : curl_easy_strerror(cc));
            a->breaker = KMS_BREAKER_FAILURE;
            a->retry = !permanent(cc);
        }
    } else if (http >= 200 && http < 300) {
        json_error_t jerr;
        a->response = r.len ? json_loadb((const char *)r.data, r.len, JSON_REJECT_DUPLICATES, &jerr)
                            : json_object();
        if (!json_is_object(a->response)) {
            json_decref(a->response);
            a->response = NULL;
            a->status = kms_client_fail(P11KMS_ERR_PROTOCOL,
                                        "the answer (HTTP %ld) is not a JSON object", http);
        } else {
            a->status = P11KMS_OK;
            a->breaker = KMS_BREAKER_SUCCESS;
        }
    } else {
        service_error(a, http, &r);
    }
    response_free(&r);
}

/* ---- a call --------------------------------------------------------------------------- */

static int valid_operation(const char *op)
{
    size_t n = op ? strlen(op) : 0;
    if (n == 0 || n > OPERATION_MAX)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((op[i] >= 'A' && op[i] <= 'Z') || (op[i] >= 'a' && op[i] <= 'z')))
            return 0;
    return 1;
}

p11kms_status kms_transport_call(p11kms_client *c, const char *operation, const json_t *request,
                                 json_t **response)
{
    struct kms_transport *t;
    struct kms_breaker_ticket ticket;
    struct kms_buf body = KMS_BUF_INIT;
    char target[sizeof TARGET_PREFIX + OPERATION_MAX];
    struct attempt a;
    struct conn *cn;
    uint64_t start, open_for = 0;
    unsigned attempts = 0;
    int admitted;

    if (response)
        *response = NULL;
    if (!c || !c->transport || !response || !json_is_object(request))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "kms_transport_call: bad argument");
    if (!valid_operation(operation))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "kms_transport_call: bad operation name");
    t = c->transport;
    snprintf(target, sizeof target, TARGET_PREFIX "%s", operation);
    if (kms_json_dump(request, 0, &body) != KMS_OK)
        return kms_client_fail(P11KMS_ERR_MEMORY, "cannot serialise the request");

    start = now_ms();
    pthread_mutex_lock(&t->lock);
    admitted = kms_breaker_admit_locked(&t->breaker, start, &ticket);
    if (!admitted && t->breaker.state == KMS_BREAKER_OPEN)
        open_for = t->breaker.opened_at_ms + t->breaker.cooldown_ms - start;
    pthread_mutex_unlock(&t->lock);
    if (!admitted) {
        kms_buf_free(&body);
        if (open_for)
            return kms_client_fail(P11KMS_ERR_CIRCUIT_OPEN,
                                   "the circuit breaker is open after %u failed calls: failing "
                                   "fast for %llu ms more, then one probe",
                                   c->opt.breaker_threshold, (unsigned long long)open_for);
        return kms_client_fail(P11KMS_ERR_CIRCUIT_OPEN,
                               "the circuit breaker is half-open: its probe is in flight");
    }

    cn = pool_take(t);
    if (!cn) {
        memset(&a, 0, sizeof a);
        a.breaker = KMS_BREAKER_NONE;
        a.status = kms_client_fail(P11KMS_ERR_MEMORY, "cannot make a libcurl handle");
    } else {
        for (;;) {
            uint64_t wait, elapsed;
            attempt_once(t, cn, target, &body, &a);
            attempts++;
            if (!a.retry || attempts >= c->opt.max_attempts)
                break;
            wait = kms_backoff_ms(attempts, c->opt.retry_base_ms, c->opt.retry_cap_ms,
                                  a.retry_after_ms, random_u64, NULL);
            elapsed = now_ms() - start;
            if (elapsed + wait > c->opt.retry_budget_ms)
                break;
            sleep_ms(wait);
        }
        pool_put(t, cn);
    }
    kms_buf_free(&body);

    pthread_mutex_lock(&t->lock);
    kms_breaker_record_locked(&t->breaker, &ticket, a.breaker, now_ms());
    pthread_mutex_unlock(&t->lock);

    if (a.status == P11KMS_ERR_TRANSPORT && attempts > 1) {
        char msg[400];
        snprintf(msg, sizeof msg, "%s", p11kms_last_error());
        kms_client_fail(a.status, "%s (%u attempts)", msg, attempts);
    }
    *response = a.response;
    return a.status;
}
