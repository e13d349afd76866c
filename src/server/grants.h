/*
 * Grants as authorization sees them (docs/api.md, docs/policy.md): the
 * operations a grant may name, its constraints, the compiled set of a key's
 * grants the key store keeps in its index, and grant tokens.
 */
#ifndef P11KMS_SERVER_GRANTS_H
#define P11KMS_SERVER_GRANTS_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "common/blob.h"
#include "common/keyspec.h"
#include "store/store.h"

/* Bit i of a grant's operations is kms_grant_op_name(i) (common/keyspec.h). */
/* The operations a grant on a key of spec and usage may name (AWS's key type table). */
uint32_t kms_grant_ops_for_key(int spec, int usage);
/* The operations whose requests carry an encryption context (constraints apply to them). */
uint32_t kms_grant_ops_with_context(void);

/* Constraints: at most this many pairs in each, values up to 384 characters, as AWS. */
#define KMS_GRANT_CONSTRAINT_PAIRS 8
#define KMS_GRANT_CONSTRAINT_VALUE_MAX 384
/*
 * Checks a Constraints object ({"EncryptionContextSubset": {...},
 * "EncryptionContextEquals": {...}}) and writes its stored form (compact JSON,
 * keys sorted) into out. ValidationException when malformed.
 */
KMS_MUST_CHECK kms_err kms_grant_constraints_text(json_t *c, char *out, size_t n);
/*
 * Whether constraints child (stored form) are at least as strict as parent's:
 * a grant made through a constrained grant's CreateGrant must be.
 */
int kms_grant_constraints_within(const char *parent, const char *child);

/*
 * The key store's grant hooks (struct kms_keystore_config): a key's grants
 * compiled into a set (arg: the server).
 */
kms_err kms_grant_add(void *arg, void **set, const struct kms_grant_row *g);
void kms_grant_set_free(void *set);
/*
 * The first grant of set whose grantee is grantee (an ARN), whose operations
 * include op (kms_grant_op_index) and whose constraints the request's context
 * meets (pairs, n); its id is copied to id. 0 when none.
 */
int kms_grant_set_allows(const void *set, const char *grantee, int op,
                         const struct kms_context_pair *pairs, size_t n,
                         char id[KMS_GRANT_ID_LEN + 1]);
/* Whether set holds the grant id. */
int kms_grant_set_has(const void *set, const char *id);

/*
 * Grant tokens: base64url (no padding) of a version byte (1), the key's 16
 * id bytes, the grant id's 32 bytes and 4 check bytes (SHA-256's first of
 * the rest), 71 characters. Not a secret (nor is AWS's): it only says which
 * grant to look for; the check bytes tell a garbled token from another grant's.
 */
#define KMS_GRANT_TOKEN_LEN 71
void kms_grant_token_make(const uint8_t key[KMS_UUID_LEN], const char *grant_id,
                          char out[KMS_GRANT_TOKEN_LEN + 1]);
/* InvalidGrantTokenException unless s is a token this server made. */
KMS_MUST_CHECK kms_err kms_grant_token_read(const char *s, size_t n, uint8_t key[KMS_UUID_LEN],
                                            char grant_id[KMS_GRANT_ID_LEN + 1]);

#endif
