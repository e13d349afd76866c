/* X-Amz-Target → operation. */
#include "config.h"

#include <string.h>

#include "server/ops.h"

static const struct {
    const char *name;
    kms_op_fn fn;
} operations[] = {
    {"CancelKeyDeletion", kms_op_cancel_key_deletion},
    {"CreateAlias", kms_op_create_alias},
    {"CreateKey", kms_op_create_key},
    {"Decrypt", kms_op_decrypt},
    {"DeleteAlias", kms_op_delete_alias},
    {"DescribeKey", kms_op_describe_key},
    {"DisableKey", kms_op_disable_key},
    {"DisableKeyRotation", kms_op_disable_key_rotation},
    {"EnableKey", kms_op_enable_key},
    {"EnableKeyRotation", kms_op_enable_key_rotation},
    {"Encrypt", kms_op_encrypt},
    {"GenerateDataKey", kms_op_generate_data_key},
    {"GenerateDataKeyWithoutPlaintext", kms_op_generate_data_key_without_plaintext},
    {"GenerateRandom", kms_op_generate_random},
    {"GetKeyRotationStatus", kms_op_get_key_rotation_status},
    {"ListAliases", kms_op_list_aliases},
    {"ListKeyRotations", kms_op_list_key_rotations},
    {"ListKeys", kms_op_list_keys},
    {"ReEncrypt", kms_op_re_encrypt},
    {"RotateKeyOnDemand", kms_op_rotate_key_on_demand},
    {"ScheduleKeyDeletion", kms_op_schedule_key_deletion},
    {"UpdateAlias", kms_op_update_alias},
};

kms_op_fn kms_op_lookup(const char *target)
{
    for (size_t i = 0; i < sizeof operations / sizeof operations[0]; i++)
        if (strcmp(operations[i].name, target) == 0)
            return operations[i].fn;
    return NULL;
}
