#include "config.h"

#include "common/error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static const struct {
    const char *type;
    unsigned status;
    const char *message;
} table[KMS_ERR_COUNT] = {
    [KMS_OK] = {"", 200, ""},
    [KMS_ERR_VALIDATION] = {"ValidationException", 400, "The request is not valid"},
    [KMS_ERR_SERIALIZATION] = {"SerializationException", 400, "The request body could not be read"},
    [KMS_ERR_NOT_FOUND] = {"NotFoundException", 404, "The requested resource was not found"},
    [KMS_ERR_ALREADY_EXISTS] = {"AlreadyExistsException", 409, "The resource already exists"},
    [KMS_ERR_DISABLED] = {"DisabledException", 409, "The key is disabled"},
    [KMS_ERR_INVALID_STATE] = {"KMSInvalidStateException", 409,
                               "The key is not in a valid state for this request"},
    [KMS_ERR_INVALID_CIPHERTEXT] = {"InvalidCiphertextException", 400,
                                    "The ciphertext or encryption context is not valid"},
    [KMS_ERR_INCORRECT_KEY] = {"IncorrectKeyException", 400,
                               "The ciphertext was not made under the given key"},
    [KMS_ERR_INVALID_ALIAS] = {"InvalidAliasNameException", 400, "The alias name is not valid"},
    [KMS_ERR_INVALID_ARN] = {"InvalidArnException", 400, "The ARN is not valid"},
    [KMS_ERR_MALFORMED_POLICY] = {"MalformedPolicyDocumentException", 400,
                                  "The key policy is not valid"},
    [KMS_ERR_INVALID_KEY_USAGE] = {"InvalidKeyUsageException", 400,
                                   "The key usage does not allow this request"},
    [KMS_ERR_LIMIT_EXCEEDED] = {"LimitExceededException", 400, "A limit was exceeded"},
    [KMS_ERR_UNSUPPORTED] = {"UnsupportedOperationException", 400,
                             "The operation is not supported"},
    [KMS_ERR_UNKNOWN_OPERATION] = {"UnknownOperationException", 400, "The operation is not known"},
    [KMS_ERR_ACCESS_DENIED] = {"AccessDeniedException", 400, "Access denied"},
    [KMS_ERR_MISSING_AUTH] = {"MissingAuthenticationTokenException", 400,
                              "Request is missing Authentication Token"},
    [KMS_ERR_INCOMPLETE_SIGNATURE] = {"IncompleteSignatureException", 400,
                                      "The request signature is incomplete"},
    [KMS_ERR_INVALID_SIGNATURE] = {"InvalidSignatureException", 400,
                                   "The request signature does not match"},
    [KMS_ERR_UNRECOGNIZED_CLIENT] = {"UnrecognizedClientException", 400,
                                     "The security token included in the request is invalid"},
    [KMS_ERR_TOO_LARGE] = {"ValidationException", 413, "The request body is too large"},
    [KMS_ERR_THROTTLED] = {"ThrottlingException", 429, "Rate exceeded"},
    [KMS_ERR_INTERNAL] = {"KMSInternalException", 500, "An internal error occurred"},
    [KMS_ERR_KEY_UNAVAILABLE] = {"KeyUnavailableException", 500, "The key is unavailable"},
    [KMS_ERR_DEPENDENCY_TIMEOUT] = {"DependencyTimeoutException", 503,
                                    "The key store did not answer in time"},
    [KMS_ERR_BAD_SIGNATURE] = {"KMSInvalidSignatureException", 400,
                               "The signature does not verify"},
    [KMS_ERR_BAD_MAC] = {"KMSInvalidMacException", 400, "The MAC does not verify"},
    [KMS_ERR_INVALID_GRANT_ID] = {"InvalidGrantIdException", 400, "The grant id is not valid"},
    [KMS_ERR_INVALID_GRANT_TOKEN] = {"InvalidGrantTokenException", 400,
                                     "The grant token is not valid"},
    /* ---- tags and paging ---- */
    [KMS_ERR_TAG] = {"TagException", 400, "One or more tags are not valid"},
    [KMS_ERR_INVALID_MARKER] = {"InvalidMarkerException", 400, "The marker is not valid"},
};

static _Thread_local char last_message[512]; /* AWS's enum lists run past 256 */
static _Thread_local char last_where[96];

static int valid(kms_err e)
{
    return (int)e > 0 && e < KMS_ERR_COUNT;
}

const char *kms_err_type(kms_err e)
{
    return valid(e) ? table[e].type : table[KMS_ERR_INTERNAL].type;
}

unsigned kms_err_status(kms_err e)
{
    return valid(e) ? table[e].status : table[KMS_ERR_INTERNAL].status;
}

const char *kms_err_message(void)
{
    return last_message;
}

const char *kms_err_where(void)
{
    return last_where;
}

void kms_err_clear(void)
{
    last_message[0] = '\0';
    last_where[0] = '\0';
}

kms_err kms_err_set(kms_err e, const char *file, int line, const char *fmt, ...)
{
    if (!valid(e))
        e = KMS_ERR_INTERNAL;
    if (fmt && *fmt) {
        /* Through a copy: the arguments may include kms_err_message() itself. */
        char text[sizeof last_message];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(text, sizeof text, fmt, ap);
        va_end(ap);
        memcpy(last_message, text, sizeof text);
    } else {
        snprintf(last_message, sizeof last_message, "%s", table[e].message);
    }
    snprintf(last_where, sizeof last_where, "%s:%d", file, line);
    return e;
}
