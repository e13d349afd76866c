/* X-Amz-Target → operation. */
#include "config.h"

#include <string.h>

#include "server/ops.h"

/*
 * Sorted by name. index_only: served from the index, without a token call;
 * worker_only: may make an RSA key, so never on an HTTP thread.
 */
static const struct kms_op operations[] = {
    {"CancelKeyDeletion", kms_op_cancel_key_deletion, 0, 0},
    {"CreateAlias", kms_op_create_alias, 0, 0},
    {"CreateGrant", kms_op_create_grant, 0, 0},
    {"CreateKey", kms_op_create_key, 0, 1},
    {"Decrypt", kms_op_decrypt, 0, 0},
    {"DeleteAlias", kms_op_delete_alias, 0, 0},
    {"DeriveSharedSecret", kms_op_derive_shared_secret, 0, 0},
    {"DescribeKey", kms_op_describe_key, 1, 0},
    {"DisableKey", kms_op_disable_key, 0, 0},
    {"DisableKeyRotation", kms_op_disable_key_rotation, 0, 0},
    {"EnableKey", kms_op_enable_key, 0, 0},
    {"EnableKeyRotation", kms_op_enable_key_rotation, 0, 0},
    {"Encrypt", kms_op_encrypt, 0, 0},
    {"GenerateDataKey", kms_op_generate_data_key, 0, 0},
    {"GenerateDataKeyPair", kms_op_generate_data_key_pair, 0, 1},
    {"GenerateDataKeyPairWithoutPlaintext", kms_op_generate_data_key_pair_without_plaintext, 0, 1},
    {"GenerateDataKeyWithoutPlaintext", kms_op_generate_data_key_without_plaintext, 0, 0},
    {"GenerateMac", kms_op_generate_mac, 0, 0},
    {"GenerateRandom", kms_op_generate_random, 0, 0},
    {"GetKeyPolicy", kms_op_get_key_policy, 1, 0},
    {"GetKeyRotationStatus", kms_op_get_key_rotation_status, 1, 0},
    {"GetPublicKey", kms_op_get_public_key, 0, 0},
    {"ListAliases", kms_op_list_aliases, 1, 0},
    {"ListGrants", kms_op_list_grants, 1, 0},
    {"ListKeyPolicies", kms_op_list_key_policies, 1, 0},
    {"ListKeyRotations", kms_op_list_key_rotations, 1, 0},
    {"ListKeys", kms_op_list_keys, 1, 0},
    {"ListRetirableGrants", kms_op_list_retirable_grants, 1, 0},
    {"ListResourceTags", kms_op_list_resource_tags, 1, 0},
    {"PutKeyPolicy", kms_op_put_key_policy, 0, 0},
    {"ReEncrypt", kms_op_re_encrypt, 0, 0},
    {"RetireGrant", kms_op_retire_grant, 0, 0},
    {"RevokeGrant", kms_op_revoke_grant, 0, 0},
    {"RotateKeyOnDemand", kms_op_rotate_key_on_demand, 0, 0},
    {"ScheduleKeyDeletion", kms_op_schedule_key_deletion, 0, 0},
    {"Sign", kms_op_sign, 0, 0},
    {"TagResource", kms_op_tag_resource, 0, 0},
    {"UntagResource", kms_op_untag_resource, 0, 0},
    {"UpdateAlias", kms_op_update_alias, 0, 0},
    {"Verify", kms_op_verify, 0, 0},
    {"VerifyMac", kms_op_verify_mac, 0, 0},
};

const struct kms_op *kms_op_lookup(const char *target)
{
    for (size_t i = 0; i < KMS_OP_COUNT; i++)
        if (strcmp(operations[i].name, target) == 0)
            return &operations[i];
    return NULL;
}

const struct kms_op *kms_op_at(size_t i)
{
    return i < KMS_OP_COUNT ? &operations[i] : NULL;
}

size_t kms_op_index(const struct kms_op *op)
{
    return (size_t)(op - operations);
}

_Static_assert(sizeof operations / sizeof operations[0] == KMS_OP_COUNT, "KMS_OP_COUNT");
