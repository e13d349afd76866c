#include "config.h"

#include "common/sigv4.h"

#include <ctype.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/encoding.h"

static const char *find_part(const char *s, const char *name, size_t *len)
{
    size_t nl = strlen(name);
    const char *p = s;
    while ((p = strstr(p, name)) != NULL) {
        /* The name must start the header's parameter list or follow ',' or ' '. */
        if (p == s || p[-1] == ' ' || p[-1] == ',') {
            const char *v = p + nl;
            size_t n = strcspn(v, ", ");
            *len = n;
            return v;
        }
        p += nl;
    }
    return NULL;
}

kms_err kms_sigv4_parse_auth(const char *header, struct kms_sigv4_auth *out)
{
    static const char alg[] = KMS_SIGV4_ALGORITHM " ";
    size_t cred_len = 0;
    const char *cred, *p, *slash[4];
    size_t nslash = 0;

    memset(out, 0, sizeof *out);
    KMS_ENSURE(strncmp(header, alg, sizeof alg - 1) == 0, KMS_ERR_INCOMPLETE_SIGNATURE,
               "Authorization header must use " KMS_SIGV4_ALGORITHM);
    header += sizeof alg - 1;
    cred = find_part(header, "Credential=", &cred_len);
    out->signed_headers = find_part(header, "SignedHeaders=", &out->signed_headers_len);
    out->signature = find_part(header, "Signature=", &out->signature_len);
    KMS_ENSURE(cred && cred_len, KMS_ERR_INCOMPLETE_SIGNATURE,
               "Authorization header requires 'Credential' parameter");
    KMS_ENSURE(out->signed_headers && out->signed_headers_len, KMS_ERR_INCOMPLETE_SIGNATURE,
               "Authorization header requires 'SignedHeaders' parameter");
    KMS_ENSURE(out->signature && out->signature_len, KMS_ERR_INCOMPLETE_SIGNATURE,
               "Authorization header requires 'Signature' parameter");

    for (p = cred; p < cred + cred_len; p++) {
        if (*p == '/') {
            KMS_ENSURE(nslash < 4, KMS_ERR_INCOMPLETE_SIGNATURE, "Credential is malformed");
            slash[nslash++] = p;
        }
    }
    KMS_ENSURE(nslash == 4, KMS_ERR_INCOMPLETE_SIGNATURE, "Credential is malformed");
    out->access_key = cred;
    out->access_key_len = (size_t)(slash[0] - cred);
    out->scope = slash[0] + 1;
    out->scope_len = (size_t)(cred + cred_len - out->scope);
    out->date = slash[0] + 1;
    out->date_len = (size_t)(slash[1] - out->date);
    out->region = slash[1] + 1;
    out->region_len = (size_t)(slash[2] - out->region);
    out->service = slash[2] + 1;
    out->service_len = (size_t)(slash[3] - out->service);
    KMS_ENSURE(out->access_key_len > 0 && out->date_len == 8 && out->region_len > 0 &&
                   out->service_len > 0,
               KMS_ERR_INCOMPLETE_SIGNATURE, "Credential is malformed");
    KMS_ENSURE((size_t)(cred + cred_len - slash[3] - 1) == strlen("aws4_request") &&
                   memcmp(slash[3] + 1, "aws4_request", 12) == 0,
               KMS_ERR_INCOMPLETE_SIGNATURE,
               "Credential should be scoped with a valid terminator: 'aws4_request'");
    for (size_t i = 0; i < 8; i++)
        KMS_ENSURE(isdigit((unsigned char)out->date[i]), KMS_ERR_INCOMPLETE_SIGNATURE,
                   "Credential date is malformed");
    return KMS_OK;
}

kms_err kms_sigv4_uri_encode(const char *s, size_t n, int keep_slash, struct kms_buf *out)
{
    static const char hex[] = "0123456789ABCDEF";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~' ||
            (keep_slash && c == '/')) {
            KMS_GUARD(kms_buf_append_u8(out, c));
        } else {
            char e[3] = {'%', hex[c >> 4], hex[c & 15]};
            KMS_GUARD(kms_buf_append(out, e, 3));
        }
    }
    return kms_buf_terminate(out);
}

/* Appends a header value trimmed, with runs of spaces folded into one. */
static kms_err append_trimmed(struct kms_buf *out, const char *v)
{
    int pending_space = 0, started = 0;
    for (; *v; v++) {
        if (*v == ' ' || *v == '\t') {
            pending_space = started;
            continue;
        }
        if (pending_space)
            KMS_GUARD(kms_buf_append_u8(out, ' '));
        pending_space = 0;
        started = 1;
        KMS_GUARD(kms_buf_append_u8(out, (uint8_t)*v));
    }
    return KMS_OK;
}

struct encoded_param {
    struct kms_buf name, value;
};

static int param_cmp(const void *a, const void *b)
{
    const struct encoded_param *x = a, *y = b;
    int c = strcmp((const char *)x->name.data, (const char *)y->name.data);
    return c ? c : strcmp((const char *)x->value.data, (const char *)y->value.data);
}

static kms_err append_query(struct kms_buf *out, const struct kms_query_param *query, size_t n)
{
    kms_err rc = KMS_OK;
    struct encoded_param *enc;

    if (n == 0)
        return KMS_OK;
    enc = calloc(n, sizeof *enc);
    KMS_ENSURE(enc != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        const char *v = query[i].value ? query[i].value : "";
        rc = kms_sigv4_uri_encode(query[i].name, strlen(query[i].name), 0, &enc[i].name);
        if (rc == KMS_OK)
            rc = kms_sigv4_uri_encode(v, strlen(v), 0, &enc[i].value);
    }
    if (rc == KMS_OK) {
        qsort(enc, n, sizeof *enc, param_cmp);
        for (size_t i = 0; i < n && rc == KMS_OK; i++) {
            if (i > 0)
                rc = kms_buf_append_u8(out, '&');
            if (rc == KMS_OK)
                rc = kms_buf_append(out, enc[i].name.data, enc[i].name.len);
            if (rc == KMS_OK)
                rc = kms_buf_append_u8(out, '=');
            if (rc == KMS_OK)
                rc = kms_buf_append(out, enc[i].value.data, enc[i].value.len);
        }
    }
    for (size_t i = 0; i < n; i++) {
        kms_buf_free(&enc[i].name);
        kms_buf_free(&enc[i].value);
    }
    free(enc);
    return rc;
}

static kms_err append_header(struct kms_buf *out, const char *name, size_t name_len,
                             const struct kms_header *headers, size_t n)
{
    int found = 0;
    for (size_t i = 0; i < name_len; i++)
        KMS_GUARD(kms_buf_append_u8(out, (uint8_t)tolower((unsigned char)name[i])));
    KMS_GUARD(kms_buf_append_u8(out, ':'));
    for (size_t i = 0; i < n; i++) {
        if (strlen(headers[i].name) != name_len ||
            strncasecmp(headers[i].name, name, name_len) != 0)
            continue;
        if (found++)
            KMS_GUARD(kms_buf_append_u8(out, ','));
        KMS_GUARD(append_trimmed(out, headers[i].value));
    }
    KMS_ENSURE(found, KMS_ERR_INCOMPLETE_SIGNATURE, "A signed header is missing from the request");
    return kms_buf_append_u8(out, '\n');
}

kms_err kms_sigv4_canonical_request(const char *method, const char *path,
                                    const struct kms_query_param *query, size_t nquery,
                                    const struct kms_header *headers, size_t nheaders,
                                    const char *signed_headers, size_t signed_headers_len,
                                    const char *payload_hash_hex, struct kms_buf *out)
{
    const char *sh = signed_headers, *end = signed_headers + signed_headers_len;

    KMS_GUARD(kms_buf_append_str(out, method));
    KMS_GUARD(kms_buf_append_u8(out, '\n'));
    if (!path || !*path)
        path = "/";
    KMS_GUARD(kms_sigv4_uri_encode(path, strlen(path), 1, out));
    KMS_GUARD(kms_buf_append_u8(out, '\n'));
    KMS_GUARD(append_query(out, query, nquery));
    KMS_GUARD(kms_buf_append_u8(out, '\n'));
    while (sh < end) {
        const char *semi = memchr(sh, ';', (size_t)(end - sh));
        size_t len = semi ? (size_t)(semi - sh) : (size_t)(end - sh);
        KMS_ENSURE(len > 0, KMS_ERR_INCOMPLETE_SIGNATURE, "SignedHeaders is malformed");
        KMS_GUARD(append_header(out, sh, len, headers, nheaders));
        sh += len + (semi ? 1 : 0);
    }
    KMS_GUARD(kms_buf_append_u8(out, '\n'));
    KMS_GUARD(kms_buf_append(out, signed_headers, signed_headers_len));
    KMS_GUARD(kms_buf_append_u8(out, '\n'));
    KMS_GUARD(kms_buf_append_str(out, payload_hash_hex));
    return kms_buf_terminate(out);
}

kms_err kms_sha256_hex(const void *p, size_t n, char *out)
{
    uint8_t md[KMS_SHA256_LEN];
    KMS_GUARD(kms_sha256(p, n, md));
    kms_hex_encode(md, sizeof md, out);
    return KMS_OK;
}

kms_err kms_sigv4_string_to_sign(const char *amz_date, const char *scope, size_t scope_len,
                                 const struct kms_buf *canonical_request, struct kms_buf *out)
{
    char hash[KMS_SHA256_HEX_LEN + 1];
    KMS_GUARD(kms_sha256_hex(canonical_request->data, canonical_request->len, hash));
    KMS_GUARD(kms_buf_append_str(out, KMS_SIGV4_ALGORITHM "\n"));
    KMS_GUARD(kms_buf_append_str(out, amz_date));
    KMS_GUARD(kms_buf_append_u8(out, '\n'));
    KMS_GUARD(kms_buf_append(out, scope, scope_len));
    KMS_GUARD(kms_buf_append_u8(out, '\n'));
    KMS_GUARD(kms_buf_append_str(out, hash));
    return kms_buf_terminate(out);
}

static kms_err hmac(const uint8_t *key, size_t key_len, const void *msg, size_t msg_len,
                    uint8_t out[KMS_SHA256_LEN])
{
    return kms_hmac_sha256(key, key_len, msg, msg_len, out);
}

kms_err kms_sigv4_signing_key(const char *secret, const char *date, size_t date_len,
                              const char *region, size_t region_len, const char *service,
                              size_t service_len, uint8_t out[KMS_SHA256_LEN])
{
    struct kms_buf k = KMS_BUF_INIT;
    uint8_t a[KMS_SHA256_LEN], b[KMS_SHA256_LEN];
    kms_err rc = kms_buf_append_str(&k, "AWS4");
    if (rc == KMS_OK)
        rc = kms_buf_append_str(&k, secret);
    if (rc == KMS_OK)
        rc = hmac(k.data, k.len, date, date_len, a);
    if (rc == KMS_OK)
        rc = hmac(a, sizeof a, region, region_len, b);
    if (rc == KMS_OK)
        rc = hmac(b, sizeof b, service, service_len, a);
    if (rc == KMS_OK)
        rc = hmac(a, sizeof a, "aws4_request", 12, out);
    kms_buf_free(&k);
    OPENSSL_cleanse(a, sizeof a);
    OPENSSL_cleanse(b, sizeof b);
    return rc;
}

kms_err kms_sigv4_signature(const uint8_t key[KMS_SHA256_LEN], const struct kms_buf *string_to_sign,
                            char *out)
{
    uint8_t mac[KMS_SHA256_LEN];
    KMS_GUARD(hmac(key, KMS_SHA256_LEN, string_to_sign->data, string_to_sign->len, mac));
    kms_hex_encode(mac, sizeof mac, out);
    return KMS_OK;
}

kms_err kms_sigv4_amz_date(time_t when, char *out)
{
    struct tm tm;
    KMS_ENSURE(gmtime_r(&when, &tm) != NULL, KMS_ERR_INTERNAL, "cannot convert the time");
    KMS_ENSURE(strftime(out, KMS_AMZ_DATE_LEN + 1, "%Y%m%dT%H%M%SZ", &tm) == KMS_AMZ_DATE_LEN,
               KMS_ERR_INTERNAL, "cannot format the time");
    return KMS_OK;
}

/* Longest header name the signer takes; ours are all far shorter. */
#define SIGN_NAME_MAX 64

static int name_cmp(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

static const char *header_value(const struct kms_sigv4_request *req, const char *name)
{
    for (size_t i = 0; i < req->nheaders; i++)
        if (strcasecmp(req->headers[i].name, name) == 0)
            return req->headers[i].value;
    return NULL;
}

/* The ';'-joined list of req's header names, lower-cased, sorted, each once. */
static kms_err signed_header_list(const struct kms_sigv4_request *req, struct kms_buf *out)
{
    char names[KMS_SIGV4_MAX_HEADERS][SIGN_NAME_MAX + 1];
    const char *sorted[KMS_SIGV4_MAX_HEADERS];

    KMS_ENSURE(req->nheaders > 0 && req->nheaders <= KMS_SIGV4_MAX_HEADERS, KMS_ERR_VALIDATION,
               "a request to sign needs 1 to %d headers", KMS_SIGV4_MAX_HEADERS);
    for (size_t i = 0; i < req->nheaders; i++) {
        size_t n = strlen(req->headers[i].name);
        KMS_ENSURE(n > 0 && n <= SIGN_NAME_MAX, KMS_ERR_VALIDATION,
                   "a header name to sign is empty or too long");
        for (size_t j = 0; j <= n; j++)
            names[i][j] = (char)tolower((unsigned char)req->headers[i].name[j]);
        sorted[i] = names[i];
    }
    qsort(sorted, req->nheaders, sizeof sorted[0], name_cmp);
    for (size_t i = 0; i < req->nheaders; i++) {
        if (i > 0 && strcmp(sorted[i], sorted[i - 1]) == 0)
            continue;
        if (out->len > 0)
            KMS_GUARD(kms_buf_append_u8(out, ';'));
        KMS_GUARD(kms_buf_append_str(out, sorted[i]));
    }
    return kms_buf_terminate(out);
}

kms_err kms_sigv4_sign(const struct kms_sigv4_request *req, const char *access_key,
                       const char *secret, const char *region, const char *service,
                       const char *amz_date, struct kms_buf *out)
{
    struct kms_buf signed_headers = KMS_BUF_INIT, creq = KMS_BUF_INIT, scope = KMS_BUF_INIT,
                   sts = KMS_BUF_INIT;
    char payload_hash[KMS_SHA256_HEX_LEN + 1], signature[KMS_SHA256_HEX_LEN + 1];
    uint8_t key[KMS_SHA256_LEN];
    const char *date_header;
    kms_err rc;

    KMS_ENSURE(req && req->method && access_key && *access_key && secret && region && *region &&
                   service && *service && amz_date,
               KMS_ERR_VALIDATION, "a request to sign needs a method, credentials and a scope");
    KMS_ENSURE(strlen(amz_date) == KMS_AMZ_DATE_LEN, KMS_ERR_VALIDATION,
               "X-Amz-Date must be in the form YYYYMMDD'T'HHMMSS'Z'");
    date_header = header_value(req, "X-Amz-Date");
    KMS_ENSURE(date_header && strcmp(date_header, amz_date) == 0, KMS_ERR_VALIDATION,
               "the request to sign must carry X-Amz-Date %s", amz_date);
    KMS_ENSURE(header_value(req, "Host") != NULL, KMS_ERR_VALIDATION,
               "the request to sign must carry Host");

    rc = signed_header_list(req, &signed_headers);
    if (rc != KMS_OK)
        goto cleanup;
    rc = kms_sha256_hex(req->payload ? req->payload : "", req->payload_len, payload_hash);
    if (rc != KMS_OK)
        goto cleanup;
    rc = kms_sigv4_canonical_request(req->method, req->path, req->query, req->nquery, req->headers,
                                     req->nheaders, (const char *)signed_headers.data,
                                     signed_headers.len, payload_hash, &creq);
    if (rc == KMS_OK)
        rc = kms_buf_append(&scope, amz_date, 8);
    if (rc == KMS_OK)
        rc = kms_buf_append_u8(&scope, '/');
    if (rc == KMS_OK)
        rc = kms_buf_append_str(&scope, region);
    if (rc == KMS_OK)
        rc = kms_buf_append_u8(&scope, '/');
    if (rc == KMS_OK)
        rc = kms_buf_append_str(&scope, service);
    if (rc == KMS_OK)
        rc = kms_buf_append_str(&scope, "/aws4_request");
    if (rc == KMS_OK)
        rc = kms_sigv4_string_to_sign(amz_date, (const char *)scope.data, scope.len, &creq, &sts);
    if (rc == KMS_OK)
        rc = kms_sigv4_signing_key(secret, amz_date, 8, region, strlen(region), service,
                                   strlen(service), key);
    if (rc == KMS_OK)
        rc = kms_sigv4_signature(key, &sts, signature);
    if (rc != KMS_OK)
        goto cleanup;

    rc = kms_buf_append_str(out, KMS_SIGV4_ALGORITHM " Credential=");
    if (rc == KMS_OK)
        rc = kms_buf_append_str(out, access_key);
    if (rc == KMS_OK)
        rc = kms_buf_append_u8(out, '/');
    if (rc == KMS_OK)
        rc = kms_buf_append(out, scope.data, scope.len);
    if (rc == KMS_OK)
        rc = kms_buf_append_str(out, ", SignedHeaders=");
    if (rc == KMS_OK)
        rc = kms_buf_append(out, signed_headers.data, signed_headers.len);
    if (rc == KMS_OK)
        rc = kms_buf_append_str(out, ", Signature=");
    if (rc == KMS_OK)
        rc = kms_buf_append_str(out, signature);
    if (rc == KMS_OK)
        rc = kms_buf_terminate(out);

cleanup:
    OPENSSL_cleanse(key, sizeof key);
    kms_buf_free(&signed_headers);
    kms_buf_free(&creq);
    kms_buf_free(&scope);
    kms_buf_free(&sts);
    return rc;
}
