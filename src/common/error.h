/*
 * One way to fail: every internal function that can fail returns a kms_err,
 * which the caller must look at. The server maps each code to AWS's error
 * type name and HTTP status through one table (error.c).
 */
#ifndef P11KMS_ERROR_H
#define P11KMS_ERROR_H

#include <stddef.h>

#define KMS_MUST_CHECK __attribute__((warn_unused_result))

typedef enum kms_err {
    KMS_OK = 0,
    KMS_ERR_VALIDATION,           /* ValidationException 400 */
    KMS_ERR_SERIALIZATION,        /* SerializationException 400: body is not the JSON we expect */
    KMS_ERR_NOT_FOUND,            /* NotFoundException 404 */
    KMS_ERR_ALREADY_EXISTS,       /* AlreadyExistsException 409 */
    KMS_ERR_DISABLED,             /* DisabledException 409 */
    KMS_ERR_INVALID_STATE,        /* KMSInvalidStateException 409 */
    KMS_ERR_INVALID_CIPHERTEXT,   /* InvalidCiphertextException 400 */
    KMS_ERR_INCORRECT_KEY,        /* IncorrectKeyException 400 */
    KMS_ERR_INVALID_ALIAS,        /* InvalidAliasNameException 400 */
    KMS_ERR_INVALID_ARN,          /* InvalidArnException 400 */
    KMS_ERR_MALFORMED_POLICY,     /* MalformedPolicyDocumentException 400 */
    KMS_ERR_INVALID_KEY_USAGE,    /* InvalidKeyUsageException 400 */
    KMS_ERR_LIMIT_EXCEEDED,       /* LimitExceededException 400 */
    KMS_ERR_UNSUPPORTED,          /* UnsupportedOperationException 400 */
    KMS_ERR_UNKNOWN_OPERATION,    /* UnknownOperationException 400 */
    KMS_ERR_ACCESS_DENIED,        /* AccessDeniedException 400 */
    KMS_ERR_MISSING_AUTH,         /* MissingAuthenticationTokenException 400 */
    KMS_ERR_INCOMPLETE_SIGNATURE, /* IncompleteSignatureException 400 */
    KMS_ERR_INVALID_SIGNATURE,    /* InvalidSignatureException 400 */
    KMS_ERR_UNRECOGNIZED_CLIENT,  /* UnrecognizedClientException 400 */
    KMS_ERR_TOO_LARGE,            /* ValidationException 413: request body over the limit */
    KMS_ERR_THROTTLED,            /* ThrottlingException 429 */
    KMS_ERR_INTERNAL,             /* KMSInternalException 500 */
    KMS_ERR_KEY_UNAVAILABLE,      /* KeyUnavailableException 500 */
    KMS_ERR_DEPENDENCY_TIMEOUT,   /* DependencyTimeoutException 503 */
    KMS_ERR_BAD_SIGNATURE,        /* KMSInvalidSignatureException 400: Verify said no */
    KMS_ERR_BAD_MAC,              /* KMSInvalidMacException 400: VerifyMac said no */
    KMS_ERR_INVALID_GRANT_ID,     /* InvalidGrantIdException 400 */
    KMS_ERR_INVALID_GRANT_TOKEN,  /* InvalidGrantTokenException 400 */
    /* ---- tags and paging ---- */
    KMS_ERR_TAG,            /* TagException 400: a tag not allowed (aws: prefix, repeated key) */
    KMS_ERR_INVALID_MARKER, /* InvalidMarkerException 400: a Marker no page ever answered */
    KMS_ERR_COUNT
} kms_err;

/* AWS's __type name for a code. */
const char *kms_err_type(kms_err e);
/* HTTP status for a code. */
unsigned kms_err_status(kms_err e);

/*
 * The message that goes with the last failure on this thread. It never holds
 * key material or plaintext: only our own words and caller-supplied names.
 */
const char *kms_err_message(void);
void kms_err_clear(void);
/* Records code and message (printf-style) for this thread and returns code. */
kms_err kms_err_set(kms_err e, const char *file, int line, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Where the last failure was raised, for debug logs. */
const char *kms_err_where(void);

#define KMS_FAIL(e, ...) kms_err_set((e), __FILE__, __LINE__, __VA_ARGS__)

/* Propagate a failure from a call that already recorded its message. */
#define KMS_GUARD(x)                 \
    do {                             \
        kms_err kms_guard_rc_ = (x); \
        if (kms_guard_rc_ != KMS_OK) \
            return kms_guard_rc_;    \
    } while (0)

/* Fail with code e and a message when cond does not hold. */
#define KMS_ENSURE(cond, e, ...)               \
    do {                                       \
        if (!(cond))                           \
            return KMS_FAIL((e), __VA_ARGS__); \
    } while (0)

#endif
