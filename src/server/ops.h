/* The operations p11kmsd serves, one function each. */
#ifndef P11KMS_OPS_H
#define P11KMS_OPS_H

#include "server/server.h"

kms_err kms_op_create_key(struct kms_request *r);
kms_err kms_op_describe_key(struct kms_request *r);
kms_err kms_op_list_keys(struct kms_request *r);
kms_err kms_op_create_alias(struct kms_request *r);
kms_err kms_op_list_aliases(struct kms_request *r);
kms_err kms_op_update_alias(struct kms_request *r);
kms_err kms_op_delete_alias(struct kms_request *r);

kms_err kms_op_enable_key(struct kms_request *r);
kms_err kms_op_disable_key(struct kms_request *r);
kms_err kms_op_schedule_key_deletion(struct kms_request *r);
kms_err kms_op_cancel_key_deletion(struct kms_request *r);
kms_err kms_op_enable_key_rotation(struct kms_request *r);
kms_err kms_op_disable_key_rotation(struct kms_request *r);
kms_err kms_op_get_key_rotation_status(struct kms_request *r);
kms_err kms_op_rotate_key_on_demand(struct kms_request *r);
kms_err kms_op_list_key_rotations(struct kms_request *r);

kms_err kms_op_generate_data_key(struct kms_request *r);
kms_err kms_op_generate_data_key_without_plaintext(struct kms_request *r);
kms_err kms_op_encrypt(struct kms_request *r);
kms_err kms_op_decrypt(struct kms_request *r);
kms_err kms_op_re_encrypt(struct kms_request *r);
kms_err kms_op_generate_random(struct kms_request *r);

kms_err kms_op_put_key_policy(struct kms_request *r);
kms_err kms_op_get_key_policy(struct kms_request *r);
kms_err kms_op_list_key_policies(struct kms_request *r);

/* ---- authorization (authz.c) ---- */
int kms_is_admin(struct kms_server *srv, const char *principal);
/*
 * The key ref names (an alias too when allow_alias) must exist and its policy
 * must allow r's principal action ("kms:Decrypt") with context (the request's
 * EncryptionContext object, or NULL); admins need no policy for management
 * actions. Sets r->key_arn and r->decision. AccessDeniedException otherwise.
 */
KMS_MUST_CHECK kms_err kms_authorize(struct kms_request *r, const char *action, const char *ref,
                                     int allow_alias, json_t *context);
/* CreateKey: the admins', or everyone's when no admin is configured. */
KMS_MUST_CHECK kms_err kms_authorize_create(struct kms_request *r);
/* A policy a request wants to set: it parses, and passes AWS's lockout safety check. */
KMS_MUST_CHECK kms_err kms_check_new_policy(struct kms_request *r, const char *text,
                                            const char *action);
/* The policy that lets every principal of the account use and manage a key (malloc'd JSON). */
KMS_MUST_CHECK kms_err kms_account_policy(const char *account, char **out);
/* The policy of a key created without one (malloc'd JSON). */
KMS_MUST_CHECK kms_err kms_default_policy(struct kms_request *r, char **out);
/* kms_keystore_authorize callback that only notes the key's ARN in the request. */
kms_err kms_note_key(void *arg, const struct kms_key_guard *g);
/* The key store's policy hooks (struct kms_keystore_config). */
kms_err kms_policy_compile(void *arg, const char *text, size_t n, void **out);
void kms_policy_release(void *compiled);
/* For the audit log: the key and version a blob names, and the canonical context. */
void kms_note_blob(struct kms_request *r, const struct kms_buf *blob, const struct kms_buf *ctx);

#endif
