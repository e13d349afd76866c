/*
 * libFuzzer target: key policies (src/server/policy.c). The input is a policy
 * document compiled for a fixed account; a document that compiles is then
 * asked about a few fixed requests (an allowed principal with an encryption
 * context, one without, and an unknown action).
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/policy.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ACCOUNT "111122223333"
#define KEY_ARN "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const struct kms_context_pair ctx[] = {
        {"order", 5, "o-1", 3},
        {"tenant", 6, "acm\xc3\xa9", 5},
    };
    const struct kms_policy_request requests[] = {
        {"orders-app", ACCOUNT, "kms:Decrypt", KEY_ARN, ctx, 2},
        {"admin", ACCOUNT, "kms:GenerateDataKeyWithoutPlaintext", KEY_ARN, NULL, 0},
        {"alice", "444455556666", "kms:Foo", KEY_ARN, ctx, 1},
    };
    struct kms_policy *p = NULL;
    char why[64];

    if (kms_policy_parse((const char *)data, size, ACCOUNT, &p) != KMS_OK)
        return 0;
    for (size_t i = 0; i < sizeof requests / sizeof requests[0]; i++) {
        enum kms_policy_decision d = kms_policy_evaluate(p, &requests[i], why, sizeof why);
        if (d != KMS_POLICY_IMPLICIT_DENY && d != KMS_POLICY_ALLOW && d != KMS_POLICY_EXPLICIT_DENY)
            abort();
        if (memchr(why, '\0', sizeof why) == NULL)
            abort();
    }
    kms_policy_free(p);
    return 0;
}
