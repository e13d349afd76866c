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

#endif
