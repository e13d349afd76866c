/*
 * The key model (DESIGN §5). All state lives in the token: each KEK version
 * is an AES-256 secret key object with CKA_ID = uuid || version, and each
 * key's metadata is a CKO_DATA object holding JSON, written as a new
 * generation and the previous one removed. The in-memory index maps key ids
 * and alias names to versions and object handles, so a request never
 * searches the token.
 */
#ifndef P11KMS_KEYSTORE_H
#define P11KMS_KEYSTORE_H

#include <stddef.h>
#include <stdint.h>

#include "common/blob.h"
#include "hsm/hsm.h"

#define KMS_ARN_MAX 256
#define KMS_ALIAS_MAX 256
#define KMS_DESCRIPTION_MAX 8192

enum kms_key_state { KMS_KEY_ENABLED, KMS_KEY_DISABLED, KMS_KEY_PENDING_DELETION };

struct kms_keystore;

struct kms_keystore_config {
    const char *region;
    const char *account;
};

/* A copy of what a request needs to know about one key; owned by the caller. */
struct kms_key_info {
    uint8_t id[KMS_UUID_LEN];
    char id_text[KMS_UUID_TEXT_LEN + 1];
    char arn[KMS_ARN_MAX];
    int64_t created;
    enum kms_key_state state;
    uint32_t current_version;
    char *description; /* malloc'd; kms_key_info_clear frees it */
};

struct kms_alias_info {
    char name[KMS_ALIAS_MAX + 1];
    char arn[KMS_ARN_MAX + KMS_ALIAS_MAX];
    char target_id[KMS_UUID_TEXT_LEN + 1];
    int64_t created;
    int64_t updated;
};

/* Opens the key store over a logged-in token and reads every key into the index. */
KMS_MUST_CHECK kms_err kms_keystore_open(struct kms_hsm *hsm, const struct kms_keystore_config *cfg,
                                         struct kms_keystore **out);
void kms_keystore_close(struct kms_keystore *ks);
size_t kms_keystore_count(struct kms_keystore *ks);
const char *kms_keystore_region(struct kms_keystore *ks);

void kms_key_info_clear(struct kms_key_info *info);
const char *kms_key_state_name(enum kms_key_state s);

/* Creates a key with version 1 generated inside the token. */
KMS_MUST_CHECK kms_err kms_keystore_create_key(struct kms_keystore *ks, const char *description,
                                               struct kms_key_info *out);

/* Resolves a key id, key ARN, alias name or alias ARN. */
KMS_MUST_CHECK kms_err kms_keystore_describe(struct kms_keystore *ks, const char *ref,
                                             struct kms_key_info *out);

/*
 * Lists at most limit keys in id order, from the key marker names (NULL for
 * the start) on. Each entry of out must be released with kms_key_info_clear.
 */
KMS_MUST_CHECK kms_err kms_keystore_list_keys(struct kms_keystore *ks, const char *marker,
                                              size_t limit, struct kms_key_info *out, size_t *n);

/* Validates an alias name as AWS does (alias/..., not alias/aws/...). */
KMS_MUST_CHECK kms_err kms_alias_name_check(const char *name);
KMS_MUST_CHECK kms_err kms_keystore_create_alias(struct kms_keystore *ks, const char *name,
                                                 const char *target_ref);
/* At most limit aliases in name order from marker on, optionally only one key's. */
KMS_MUST_CHECK kms_err kms_keystore_list_aliases(struct kms_keystore *ks, const char *key_ref,
                                                 const char *marker, size_t limit,
                                                 struct kms_alias_info *out, size_t *n);

/*
 * Wraps plaintext under the key's newest enabled version: out receives the
 * blob. canonical_context is the encryption context's canonical form.
 */
KMS_MUST_CHECK kms_err kms_keystore_encrypt(struct kms_keystore *ks, const char *ref,
                                            const struct kms_buf *canonical_context,
                                            const uint8_t *plaintext, size_t n,
                                            struct kms_buf *blob, struct kms_key_info *key);

/*
 * Unwraps a blob. When expect_ref is given, the blob must be under that key
 * (else KMS_ERR_INCORRECT_KEY). plaintext is cleansed on every failure.
 */
KMS_MUST_CHECK kms_err kms_keystore_decrypt(struct kms_keystore *ks, const uint8_t *blob, size_t n,
                                            const struct kms_buf *canonical_context,
                                            const char *expect_ref, struct kms_buf *plaintext,
                                            struct kms_key_info *key);

/* Random bytes from the token's generator. */
KMS_MUST_CHECK kms_err kms_keystore_random(struct kms_keystore *ks, uint8_t *out, size_t n);

#endif
