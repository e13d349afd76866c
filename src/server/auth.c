/* SigV4 verification of each request against the credentials file (DESIGN §3). */
#include "config.h"

#include <microhttpd.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "common/sigv4.h"
#include "server/server.h"

#define MAX_SKEW_SECONDS (5 * 60)
#define MAX_FIELDS 64

struct fields {
    struct kms_header headers[MAX_FIELDS];
    size_t nheaders;
    struct kms_query_param query[MAX_FIELDS];
    size_t nquery;
    int overflow;
};

static enum MHD_Result collect(void *cls, enum MHD_ValueKind kind, const char *key,
                               const char *value)
{
    struct fields *f = cls;
    if (kind == MHD_HEADER_KIND) {
        if (f->nheaders == MAX_FIELDS)
            return f->overflow = 1, MHD_NO;
        f->headers[f->nheaders].name = key;
        f->headers[f->nheaders++].value = value ? value : "";
    } else {
        if (f->nquery == MAX_FIELDS)
            return f->overflow = 1, MHD_NO;
        f->query[f->nquery].name = key;
        f->query[f->nquery++].value = value ? value : "";
    }
    return MHD_YES;
}

static int digits(const char *s, int n)
{
    int v = 0;
    for (int i = 0; i < n; i++)
        v = v * 10 + (s[i] - '0');
    return v;
}

/* Parses YYYYMMDDTHHMMSSZ. */
static int parse_amz_date(const char *s, time_t *out)
{
    struct tm tm = {0};
    if (strlen(s) != 16 || s[8] != 'T' || s[15] != 'Z')
        return 0;
    for (int i = 0; i < 15; i++)
        if (i != 8 && (s[i] < '0' || s[i] > '9'))
            return 0;
    tm.tm_year = digits(s, 4) - 1900;
    tm.tm_mon = digits(s + 4, 2) - 1;
    tm.tm_mday = digits(s + 6, 2);
    tm.tm_hour = digits(s + 9, 2);
    tm.tm_min = digits(s + 11, 2);
    tm.tm_sec = digits(s + 13, 2);
    if (tm.tm_mon < 0 || tm.tm_mon > 11 || tm.tm_mday < 1 || tm.tm_mday > 31 || tm.tm_hour > 23 ||
        tm.tm_min > 59 || tm.tm_sec > 60)
        return 0;
    *out = timegm(&tm);
    return 1;
}

static int signed_list_has(const char *list, size_t len, const char *name)
{
    size_t n = strlen(name);
    const char *p = list, *end = list + len;
    while (p < end) {
        const char *semi = memchr(p, ';', (size_t)(end - p));
        size_t l = semi ? (size_t)(semi - p) : (size_t)(end - p);
        if (l == n && strncasecmp(p, name, n) == 0)
            return 1;
        p += l + 1;
    }
    return 0;
}

/*
 * p's signing key for the request's date. Region and service are checked to
 * be this server's and "kms" before, so the key depends on the date alone:
 * the one derived last is kept per principal (clients sign with today's date;
 * near midnight both days may alternate, which costs a derivation, not an
 * error).
 */
static kms_err signing_key(struct kms_credentials *creds, const struct kms_principal *p,
                           const struct kms_sigv4_auth *a, uint8_t key[KMS_SHA256_LEN])
{
    struct kms_signing_key_slot *slot = &creds->keys[p - creds->p];
    int hit;

    if (a->date_len != sizeof slot->date)
        return kms_sigv4_signing_key(p->secret, a->date, a->date_len, a->region, a->region_len,
                                     a->service, a->service_len, key);
    pthread_mutex_lock(&slot->lock);
    hit = memcmp(slot->date, a->date, sizeof slot->date) == 0;
    if (hit)
        memcpy(key, slot->key, KMS_SHA256_LEN);
    pthread_mutex_unlock(&slot->lock);
    if (hit)
        return KMS_OK;
    KMS_GUARD(kms_sigv4_signing_key(p->secret, a->date, a->date_len, a->region, a->region_len,
                                    a->service, a->service_len, key));
    pthread_mutex_lock(&slot->lock);
    memcpy(slot->date, a->date, sizeof slot->date);
    memcpy(slot->key, key, KMS_SHA256_LEN);
    pthread_mutex_unlock(&slot->lock);
    return KMS_OK;
}

kms_err kms_auth_verify(struct kms_server *srv, struct MHD_Connection *c, const char *method,
                        const char *url, const struct kms_buf *body,
                        char principal[KMS_PRINCIPAL_MAX + 1])
{
    struct kms_sigv4_auth auth;
    struct fields f;
    const char *authz = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    const char *amz_date = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Amz-Date");
    const char *content_sha =
        MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Amz-Content-Sha256");
    const struct kms_principal *p;
    char payload_hash[KMS_SHA256_HEX_LEN + 1], signature[KMS_SHA256_HEX_LEN + 1];
    uint8_t key[KMS_SHA256_LEN];
    struct kms_buf creq = KMS_BUF_INIT, sts = KMS_BUF_INIT;
    time_t when, now = time(NULL);
    kms_err rc;

    principal[0] = '\0';
    KMS_ENSURE(authz != NULL, KMS_ERR_MISSING_AUTH, "Request is missing Authentication Token");
    KMS_GUARD(kms_sigv4_parse_auth(authz, &auth));
    KMS_ENSURE(amz_date != NULL, KMS_ERR_INCOMPLETE_SIGNATURE,
               "Authorization header requires existence of a 'X-Amz-Date' header.");
    KMS_ENSURE(parse_amz_date(amz_date, &when), KMS_ERR_INCOMPLETE_SIGNATURE,
               "X-Amz-Date must be in the form YYYYMMDD'T'HHMMSS'Z'");
    KMS_ENSURE(when <= now + MAX_SKEW_SECONDS && when >= now - MAX_SKEW_SECONDS,
               KMS_ERR_INVALID_SIGNATURE,
               "Signature expired: %s is not within 5 minutes of the server's time", amz_date);
    KMS_ENSURE(memcmp(auth.date, amz_date, 8) == 0, KMS_ERR_INVALID_SIGNATURE,
               "Credential date does not match X-Amz-Date");
    KMS_ENSURE(auth.service_len == 3 && memcmp(auth.service, "kms", 3) == 0,
               KMS_ERR_INVALID_SIGNATURE, "Credential should be scoped to correct service: 'kms'.");
    KMS_ENSURE(auth.region_len == strlen(srv->cfg.region) &&
                   memcmp(auth.region, srv->cfg.region, auth.region_len) == 0,
               KMS_ERR_INVALID_SIGNATURE, "Credential should be scoped to a valid region: '%s'.",
               srv->cfg.region);
    KMS_ENSURE(signed_list_has(auth.signed_headers, auth.signed_headers_len, "host"),
               KMS_ERR_INVALID_SIGNATURE, "'Host' must be a signed header");
    KMS_ENSURE(signed_list_has(auth.signed_headers, auth.signed_headers_len, "x-amz-date"),
               KMS_ERR_INVALID_SIGNATURE, "'X-Amz-Date' must be a signed header");
    KMS_GUARD(
        kms_sha256_hex(body->data ? body->data : (const uint8_t *)"", body->len, payload_hash));
    KMS_ENSURE(!content_sha || strcmp(content_sha, payload_hash) == 0, KMS_ERR_INVALID_SIGNATURE,
               "The provided 'x-amz-content-sha256' header does not match what was computed.");

    memset(&f, 0, sizeof f);
    MHD_get_connection_values(c, MHD_HEADER_KIND, collect, &f);
    MHD_get_connection_values(c, MHD_GET_ARGUMENT_KIND, collect, &f);
    KMS_ENSURE(!f.overflow, KMS_ERR_VALIDATION, "The request has too many headers");

    rc = kms_sigv4_canonical_request(method, url, f.query, f.nquery, f.headers, f.nheaders,
                                     auth.signed_headers, auth.signed_headers_len, payload_hash,
                                     &creq);
    /* The operation too, when one is named: SigV4 itself asks only for host, so
       a signature over DescribeKey would otherwise also serve DisableKey. */
    if (rc == KMS_OK && MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Amz-Target") &&
        !signed_list_has(auth.signed_headers, auth.signed_headers_len, "x-amz-target"))
        rc = KMS_FAIL(KMS_ERR_INVALID_SIGNATURE, "'X-Amz-Target' must be a signed header");
    if (rc == KMS_OK)
        rc = kms_sigv4_string_to_sign(amz_date, auth.scope, auth.scope_len, &creq, &sts);
    /* The credentials may be replaced (SIGHUP): the name is copied out under the lock. */
    pthread_rwlock_rdlock(&srv->creds_lock);
    p = kms_credentials_find(&srv->creds, auth.access_key, auth.access_key_len);
    if (rc == KMS_OK && !p)
        rc = KMS_FAIL(KMS_ERR_UNRECOGNIZED_CLIENT,
                      "The security token included in the request is invalid.");
    if (rc == KMS_OK)
        rc = signing_key(&srv->creds, p, &auth, key);
    if (rc == KMS_OK)
        snprintf(principal, KMS_PRINCIPAL_MAX + 1, "%s", p->name);
    pthread_rwlock_unlock(&srv->creds_lock);
    if (rc == KMS_OK)
        rc = kms_sigv4_signature(key, &sts, signature);
    if (rc == KMS_OK && (auth.signature_len != KMS_SHA256_HEX_LEN ||
                         CRYPTO_memcmp(signature, auth.signature, KMS_SHA256_HEX_LEN) != 0))
        rc = KMS_FAIL(KMS_ERR_INVALID_SIGNATURE,
                      "The request signature we calculated does not match the signature you "
                      "provided. Check your AWS Secret Access Key and signing method.");
    if (rc != KMS_OK)
        principal[0] = '\0';
    OPENSSL_cleanse(key, sizeof key);
    kms_buf_free(&creq);
    kms_buf_free(&sts);
    return rc;
}
