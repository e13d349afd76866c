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

/* Asymmetric and HMAC keys (ops_asym.c). */
kms_err kms_op_get_public_key(struct kms_request *r);
kms_err kms_op_sign(struct kms_request *r);
kms_err kms_op_verify(struct kms_request *r);
kms_err kms_op_generate_mac(struct kms_request *r);
kms_err kms_op_verify_mac(struct kms_request *r);
kms_err kms_op_derive_shared_secret(struct kms_request *r);
kms_err kms_op_generate_data_key_pair(struct kms_request *r);
kms_err kms_op_generate_data_key_pair_without_plaintext(struct kms_request *r);

/* ---- grants (ops_grants.c) ---- */
kms_err kms_op_create_grant(struct kms_request *r);
kms_err kms_op_list_grants(struct kms_request *r);
kms_err kms_op_list_retirable_grants(struct kms_request *r);
kms_err kms_op_retire_grant(struct kms_request *r);
kms_err kms_op_revoke_grant(struct kms_request *r);

kms_err kms_op_put_key_policy(struct kms_request *r);
kms_err kms_op_get_key_policy(struct kms_request *r);
kms_err kms_op_list_key_policies(struct kms_request *r);

/* ---- authorization (authz.c) ---- */
int kms_is_admin(struct kms_server *srv, const char *principal);
/* alias_policy_file's policy (path), compiled for account: the file's faults name it. */
KMS_MUST_CHECK kms_err kms_alias_policy_load(const char *path, const char *account,
                                             struct kms_policy **out);
/*
 * The key ref names (more as how says: KMS_REF_ALIAS, KMS_REF_DESTROYED) must
 * exist and its policy must allow r's principal action ("kms:Decrypt") with
 * context (the request's EncryptionContext object, or NULL); admins need no
 * policy for management actions. Sets r->key_arn and r->decision.
 * AccessDeniedException otherwise. On success *out holds the key the decision
 * was about (release with kms_keystore_unhold; out NULL: released): the
 * operation works on it and never resolves ref again, so an alias changed
 * meanwhile cannot point the operation at a key the policy was not asked about.
 */
KMS_MUST_CHECK kms_err kms_authorize(struct kms_request *r, const char *action, const char *ref,
                                     int how, json_t *context, struct kms_key_ref *out);
/*
 * Decrypt's and ReEncrypt's source: the policy of the key a blob names allows
 * action, before anything about that key is looked at. A blob naming a key
 * that does not exist and one naming a key the caller may not use get the
 * same answer, the one of every blob that does not open
 * (InvalidCiphertextException, KMS_BLOB_INVALID); r->decision keeps the
 * reason. b is the blob decoded by the caller (kms_blob_decode: a malformed
 * blob names no key, and saying so tells nothing about any key), once for the
 * whole request. On success *out holds the key.
 */
KMS_MUST_CHECK kms_err kms_authorize_blob(struct kms_request *r, const char *action,
                                          const struct kms_blob *b, json_t *context,
                                          struct kms_key_ref *out);
/*
 * CreateAlias, UpdateAlias, DeleteAlias on the alias name (alias/...): the
 * alias policy must allow action on arn:aws:kms:<region>:<account>:<name>.
 * Admins always may; without an alias policy everyone may (the target keys'
 * policies still decide for the keys). AccessDeniedException otherwise.
 */
KMS_MUST_CHECK kms_err kms_authorize_alias(struct kms_request *r, const char *action,
                                           const char *name);
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
/*
 * For the audit log: the key and version a blob names, and the canonical
 * context. decoded: the blob as the request decoded it, or NULL (not decoded,
 * or malformed: the header is then read as far as it goes). ctx's bytes are
 * handed to the request (r->context) when it has none yet: ctx is then left
 * empty (its old buffer, still to be freed by the caller).
 */
void kms_note_blob(struct kms_request *r, const struct kms_blob *decoded,
                   const struct kms_buf *blob, struct kms_buf *ctx);

/* ---- tags (ops_tags.c) ---- */
kms_err kms_op_tag_resource(struct kms_request *r);
kms_err kms_op_untag_resource(struct kms_request *r);
kms_err kms_op_list_resource_tags(struct kms_request *r);
/*
 * A request's list of {TagKey, TagValue} (CreateKey's and TagResource's Tags)
 * checked as AWS does; *out (free() it; NULL when there are none) points
 * into in's strings.
 */
KMS_MUST_CHECK kms_err kms_in_tags(json_t *in, const char *name, int required, struct kms_tag **out,
                                   size_t *n);

#endif
