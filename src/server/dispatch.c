/* X-Amz-Target → operation. */
#include "config.h"

#include <string.h>

#include "server/ops.h"

static const struct {
    const char *name;
    kms_op_fn fn;
} operations[] = {
    {"CreateAlias", kms_op_create_alias},
    {"CreateKey", kms_op_create_key},
    {"Decrypt", kms_op_decrypt},
    {"DescribeKey", kms_op_describe_key},
    {"Encrypt", kms_op_encrypt},
    {"GenerateDataKey", kms_op_generate_data_key},
    {"GenerateDataKeyWithoutPlaintext", kms_op_generate_data_key_without_plaintext},
    {"GenerateRandom", kms_op_generate_random},
    {"ListAliases", kms_op_list_aliases},
    {"ListKeys", kms_op_list_keys},
};

kms_op_fn kms_op_lookup(const char *target)
{
    for (size_t i = 0; i < sizeof operations / sizeof operations[0]; i++)
        if (strcmp(operations[i].name, target) == 0)
            return operations[i].fn;
    return NULL;
}
