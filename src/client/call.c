/*
 * p11kms_call: any operation of the service, JSON text in and out, for the
 * management operations the CLI offers (CreateKey, ListKeys, PutKeyPolicy...).
 *
 * The answer may carry secrets (GenerateDataKey's Plaintext), so its text is
 * placed as kms_client_secret_alloc places secrets and the serialising buffer
 * is wiped; the caller releases it with p11kms_free.
 */
#include "config.h"

#include <string.h>

#include "client/internal.h"
#include "common/json_alloc.h"

#define OPERATION_MAX 128

static int operation_name_ok(const char *op)
{
    size_t n = strlen(op);
    if (n == 0 || n > OPERATION_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = op[i];
        if (!((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9')))
            return 0;
    }
    return 1;
}

p11kms_status p11kms_call(p11kms_client *c, const char *operation, const char *request_json,
                          char **response_json, size_t *response_len)
{
    json_t *req = NULL, *resp = NULL;
    struct kms_buf text = KMS_BUF_INIT;
    json_error_t jerr;
    p11kms_status st;
    char *out;

    if (response_json)
        *response_json = NULL;
    if (response_len)
        *response_len = 0;
    if (!c || !operation || !response_json)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_call: NULL argument");
    if (!operation_name_ok(operation))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_call: not an operation name");

    if (request_json) {
        req = json_loadb(request_json, strlen(request_json), JSON_REJECT_DUPLICATES, &jerr);
        if (!req)
            return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_call: the request is not JSON: %s",
                                   jerr.text);
        if (!json_is_object(req)) {
            json_decref(req);
            return kms_client_fail(P11KMS_ERR_ARGUMENT,
                                   "p11kms_call: the request is not a JSON object");
        }
    } else if (!(req = json_object())) {
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    }

    st = kms_transport_call(c, operation, req, &resp);
    json_decref(req);
    if (st != P11KMS_OK)
        return st;

    if (kms_json_dump(resp, 0, &text) != KMS_OK) {
        json_decref(resp);
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    }
    json_decref(resp);

    out = kms_client_secret_alloc(c, text.len + 1);
    if (!out) {
        kms_buf_free(&text);
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    }
    memcpy(out, text.data, text.len);
    out[text.len] = '\0';
    *response_json = out;
    if (response_len)
        *response_len = text.len;
    kms_buf_free(&text);
    return P11KMS_OK;
}
