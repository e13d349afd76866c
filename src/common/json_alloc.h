/*
 * Routes jansson's allocations through a cleansing allocator, so strings that
 * held base64 plaintext or data keys are wiped when jansson frees them.
 */
#ifndef P11KMS_JSON_ALLOC_H
#define P11KMS_JSON_ALLOC_H

#include <jansson.h>

#include "common/buf.h"

/* Call once, before any other jansson call. */
void kms_json_use_cleansing_alloc(void);

/*
 * Serialises j (compact, keys in insertion order unless flags say otherwise)
 * into out. Use this, not json_dumps, whose result must be released with
 * whichever allocator jansson has at the time.
 */
KMS_MUST_CHECK kms_err kms_json_dump(const json_t *j, size_t flags, struct kms_buf *out);

#endif
