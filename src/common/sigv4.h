/*
 * AWS Signature Version 4: the canonical request, string to sign, signing key
 * and signature. Shared by the server's verifier and the client's signer so
 * the two cannot drift apart.
 */
#ifndef P11KMS_SIGV4_H
#define P11KMS_SIGV4_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "common/buf.h"
#include "common/digest.h"

#define KMS_SIGV4_ALGORITHM "AWS4-HMAC-SHA256"
#define KMS_SHA256_HEX_LEN 64

/* One header as received: name in any case, value untrimmed. */
struct kms_header {
    const char *name;
    const char *value;
};

/* One query parameter, already percent-decoded. */
struct kms_query_param {
    const char *name;
    const char *value;
};

/* The parsed parts of an Authorization header. Points into the header text. */
struct kms_sigv4_auth {
    const char *access_key;
    size_t access_key_len;
    const char *date; /* YYYYMMDD */
    size_t date_len;
    const char *region;
    size_t region_len;
    const char *service;
    size_t service_len;
    const char *scope; /* date/region/service/aws4_request */
    size_t scope_len;
    const char *signed_headers; /* lower-case names joined by ';' */
    size_t signed_headers_len;
    const char *signature; /* 64 hex digits */
    size_t signature_len;
};

/*
 * Parses "AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request,
 * SignedHeaders=a;b, Signature=hex". Missing or malformed parts are
 * KMS_ERR_INCOMPLETE_SIGNATURE.
 */
KMS_MUST_CHECK kms_err kms_sigv4_parse_auth(const char *header, struct kms_sigv4_auth *out);

/* Percent-encodes per SigV4 (RFC 3986 unreserved kept); '/' kept when keep_slash. */
KMS_MUST_CHECK kms_err kms_sigv4_uri_encode(const char *s, size_t n, int keep_slash,
                                            struct kms_buf *out);

/*
 * Builds the canonical request. signed_headers is the ';'-joined lower-case
 * list in order; each of its names must appear in headers (case-insensitive;
 * repeated headers are joined with ','), else KMS_ERR_INCOMPLETE_SIGNATURE.
 * path is the decoded path ("/" when empty).
 */
KMS_MUST_CHECK kms_err kms_sigv4_canonical_request(
    const char *method, const char *path, const struct kms_query_param *query, size_t nquery,
    const struct kms_header *headers, size_t nheaders, const char *signed_headers,
    size_t signed_headers_len, const char *payload_hash_hex, struct kms_buf *out);

/* "AWS4-HMAC-SHA256\n<amz_date>\n<scope>\n<hex sha256 of canonical request>". */
KMS_MUST_CHECK kms_err kms_sigv4_string_to_sign(const char *amz_date, const char *scope,
                                                size_t scope_len,
                                                const struct kms_buf *canonical_request,
                                                struct kms_buf *out);

/* kSigning = HMAC chain over "AWS4"+secret, date, region, service, "aws4_request". */
KMS_MUST_CHECK kms_err kms_sigv4_signing_key(const char *secret, const char *date, size_t date_len,
                                             const char *region, size_t region_len,
                                             const char *service, size_t service_len,
                                             uint8_t out[KMS_SHA256_LEN]);

/* Hex HMAC-SHA256 of the string to sign; out holds 65 bytes. */
KMS_MUST_CHECK kms_err kms_sigv4_signature(const uint8_t key[KMS_SHA256_LEN],
                                           const struct kms_buf *string_to_sign, char *out);

/* Hex SHA-256 of bytes; out holds 65 bytes. */
KMS_MUST_CHECK kms_err kms_sha256_hex(const void *p, size_t n, char *out);

/* ---- the client's side: signing with the code above ---- */

#define KMS_AMZ_DATE_LEN 16 /* YYYYMMDDTHHMMSSZ */
#define KMS_SIGV4_MAX_HEADERS 32

/* A request to sign. Every header in it is signed. */
struct kms_sigv4_request {
    const char *method;
    const char *path; /* decoded; "/" when NULL or empty */
    const struct kms_query_param *query;
    size_t nquery;
    const struct kms_header *headers; /* Host and X-Amz-Date among them */
    size_t nheaders;
    const void *payload;
    size_t payload_len;
};

/* X-Amz-Date's form of a UTC time; out holds KMS_AMZ_DATE_LEN + 1 bytes. */
KMS_MUST_CHECK kms_err kms_sigv4_amz_date(time_t when, char *out);

/*
 * Signs req for access_key under the scope <date>/region/service/aws4_request
 * with amz_date (which must equal req's X-Amz-Date header) and writes the
 * value of the Authorization header into out. It goes through the verifier's
 * own kms_sigv4_canonical_request, _string_to_sign, _signing_key and
 * _signature, with every header of req signed (names lower-cased, sorted,
 * each once), so a request this signs is one the verifier accepts. The
 * signing key is wiped before returning; out holds no secret.
 */
KMS_MUST_CHECK kms_err kms_sigv4_sign(const struct kms_sigv4_request *req, const char *access_key,
                                      const char *secret, const char *region, const char *service,
                                      const char *amz_date, struct kms_buf *out);

#endif
