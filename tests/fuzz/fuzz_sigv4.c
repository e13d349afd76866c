/*
 * libFuzzer target: the SigV4 verifier's parsers (src/common/sigv4.c).
 *
 * Input: the first line is an Authorization header value, given to
 * kms_sigv4_parse_auth; each further line is a request header "Name: value"
 * (a line without ':' is a name with an empty value). The canonical request
 * is then built from those headers with the parsed SignedHeaders (or
 * "host;x-amz-date" when the header did not parse), and, when that succeeds,
 * the string to sign over the parsed scope.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common/sigv4.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define EMPTY_SHA256 "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
#define MAX_HEADERS 64

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct kms_header headers[MAX_HEADERS];
    size_t nheaders = 0;
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';

    char *authz = text, *line = strchr(text, '\n');
    if (line)
        *line++ = '\0';
    while (line && nheaders < MAX_HEADERS) {
        char *next = strchr(line, '\n');
        if (next)
            *next++ = '\0';
        char *colon = strchr(line, ':');
        if (colon)
            *colon++ = '\0';
        headers[nheaders].name = line;
        headers[nheaders].value = colon ? colon : "";
        nheaders++;
        line = next;
    }

    struct kms_sigv4_auth auth;
    const char *sh = "host;x-amz-date";
    size_t sh_len = strlen(sh);
    int parsed = kms_sigv4_parse_auth(authz, &auth) == KMS_OK;
    if (parsed) {
        /* Everything the parser hands back lies inside the header it was given. */
        const char *end = authz + strlen(authz);
        if (auth.signed_headers < authz || auth.signed_headers + auth.signed_headers_len > end ||
            auth.scope < authz || auth.scope + auth.scope_len > end || auth.signature < authz ||
            auth.signature + auth.signature_len > end)
            abort();
        sh = auth.signed_headers;
        sh_len = auth.signed_headers_len;
    }

    struct kms_query_param query[1] = {{"Param", "va lue/~"}};
    struct kms_buf creq = KMS_BUF_INIT, sts = KMS_BUF_INIT;
    if (kms_sigv4_canonical_request("POST", "/a b/c", query, 1, headers, nheaders, sh, sh_len,
                                    EMPTY_SHA256, &creq) == KMS_OK &&
        parsed) {
        if (kms_sigv4_string_to_sign("20150830T123600Z", auth.scope, auth.scope_len, &creq, &sts) ==
            KMS_OK) {
            uint8_t key[KMS_SHA256_LEN];
            char sig[KMS_SHA256_HEX_LEN + 1];
            if (kms_sigv4_signing_key("secret", auth.date, auth.date_len, auth.region,
                                      auth.region_len, auth.service, auth.service_len,
                                      key) == KMS_OK &&
                kms_sigv4_signature(key, &sts, sig) == KMS_OK && strlen(sig) != KMS_SHA256_HEX_LEN)
                abort(); /* a signature is always 64 hex digits */
        }
    }
    kms_buf_free(&sts);
    kms_buf_free(&creq);
    free(text);
    return 0;
}
