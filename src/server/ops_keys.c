/*
 * Key and alias management: CreateKey, DescribeKey, ListKeys, CreateAlias,
 * UpdateAlias, DeleteAlias, ListAliases.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/keyspec.h"
#include "server/ops.h"

/* AWS's ranges and defaults of Limit: ListKeys 1-1000 (100), ListAliases 1-100 (50). */
#define KEYS_LIMIT_MAX 1000
#define KEYS_LIMIT_DEFAULT 100
#define ALIASES_LIMIT_MAX 100
#define ALIASES_LIMIT_DEFAULT 50

static kms_err check_choice(json_t *in, const char *name, const char *only)
{
    const char *v;
    KMS_GUARD(kms_in_string(in, name, 0, 1, 64, &v));
    KMS_ENSURE(!v || strcmp(v, only) == 0, KMS_ERR_UNSUPPORTED,
               "%s %.64s is not supported; only %s", name, v, only);
    return KMS_OK;
}

/* Specs AWS has that p11kms does not make. */
static const char *const foreign_specs[] = {"ECC_SECG_P256K1", "SM2", "ML_DSA_44", "ML_DSA_65",
                                            "ML_DSA_87"};
#define SPEC_NAMES                                                                                 \
    "RSA_2048, RSA_3072, RSA_4096, ECC_NIST_P256, ECC_NIST_P384, ECC_NIST_P521, ECC_SECG_P256K1, " \
    "ECC_NIST_EDWARDS25519, X25519, SYMMETRIC_DEFAULT, HMAC_224, HMAC_256, HMAC_384, HMAC_512, "   \
    "SM2, ML_DSA_44, ML_DSA_65, ML_DSA_87"

/*
 * KeySpec, or CustomerMasterKeySpec (its deprecated name, same values): both
 * may be given only when equal. SYMMETRIC_DEFAULT when neither is.
 */
static kms_err key_spec(json_t *in, int *spec)
{
    const char *ks, *cmk;
    KMS_GUARD(kms_in_string(in, "KeySpec", 0, 1, 64, &ks));
    KMS_GUARD(kms_in_string(in, "CustomerMasterKeySpec", 0, 1, 64, &cmk));
    KMS_ENSURE(!ks || !cmk || strcmp(ks, cmk) == 0, KMS_ERR_VALIDATION,
               "KeySpec %.64s and CustomerMasterKeySpec %.64s differ. CustomerMasterKeySpec is "
               "deprecated: specify KeySpec only.",
               ks, cmk);
    const char *name = ks ? ks : cmk;
    *spec = KMS_SPEC_SYMMETRIC_DEFAULT;
    if (!name)
        return KMS_OK;
    for (size_t i = 0; i < sizeof foreign_specs / sizeof foreign_specs[0]; i++)
        KMS_ENSURE(strcmp(name, foreign_specs[i]) != 0, KMS_ERR_UNSUPPORTED,
                   "KeySpec %s is not supported by p11kms", name);
    *spec = kms_spec_by_name(name);
    KMS_ENSURE(*spec >= 0, KMS_ERR_VALIDATION,
               "1 validation error detected: Value '%.64s' at '%s' failed to satisfy constraint: "
               "Member must satisfy enum value set: [" SPEC_NAMES "]",
               name, ks ? "keySpec" : "customerMasterKeySpec");
    return KMS_OK;
}

/* KeyUsage, ENCRYPT_DECRYPT when absent (as AWS): one the spec allows. */
static kms_err key_usage(json_t *in, int spec, int *usage)
{
    const struct kms_spec_info *s = kms_spec(spec);
    const char *name;
    char allowed[96] = "";

    KMS_GUARD(kms_in_string(in, "KeyUsage", 0, 1, 64, &name));
    *usage = name ? kms_usage_by_name(name) : KMS_USAGE_ENCRYPT_DECRYPT;
    KMS_ENSURE(*usage >= 0, KMS_ERR_VALIDATION,
               "1 validation error detected: Value '%.64s' at 'keyUsage' failed to satisfy "
               "constraint: Member must satisfy enum value set: [SIGN_VERIFY, ENCRYPT_DECRYPT, "
               "GENERATE_VERIFY_MAC, KEY_AGREEMENT]",
               name);
    if (s->usages & KMS_USAGE_BIT(*usage))
        return KMS_OK;
    for (int u = 0; u < KMS_USAGE_COUNT; u++)
        if (s->usages & KMS_USAGE_BIT(u))
            snprintf(allowed + strlen(allowed), sizeof allowed - strlen(allowed), "%s%s",
                     allowed[0] ? " or " : "", kms_usage_name(u));
    return KMS_FAIL(KMS_ERR_VALIDATION,
                    "KeyUsage %s is not compatible with KeySpec %s: it takes %s%s",
                    kms_usage_name(*usage), s->name, allowed,
                    name ? "" : " (KeyUsage defaults to ENCRYPT_DECRYPT)");
}

kms_err kms_op_create_key(struct kms_request *r)
{
    const char *description, *policy;
    int spec = KMS_SPEC_SYMMETRIC_DEFAULT, usage = KMS_USAGE_ENCRYPT_DECRYPT;
    struct kms_key_info k = {0};
    json_t *multi = json_object_get(r->in, "MultiRegion");

    KMS_GUARD(kms_in_string(r->in, "Description", 0, 0, KMS_DESCRIPTION_MAX, &description));
    KMS_GUARD(kms_in_string(r->in, "Policy", 0, 1, 32768, &policy));
    KMS_GUARD(key_spec(r->in, &spec));
    KMS_GUARD(key_usage(r->in, spec, &usage));
    KMS_GUARD(check_choice(r->in, "Origin", "AWS_KMS"));
    KMS_ENSURE(!json_object_get(r->in, "CustomKeyStoreId"), KMS_ERR_UNSUPPORTED,
               "Custom key stores are not supported");
    KMS_ENSURE(!multi || json_is_false(multi), KMS_ERR_UNSUPPORTED,
               "Multi-Region keys are not supported");
    json_t *bypass = json_object_get(r->in, "BypassPolicyLockoutSafetyCheck");
    KMS_ENSURE(!bypass || json_is_boolean(bypass), KMS_ERR_SERIALIZATION,
               "BypassPolicyLockoutSafetyCheck must be a boolean");
    struct kms_tag *tags = NULL;
    size_t ntags = 0;
    KMS_GUARD(kms_in_tags(r->in, "Tags", 0, &tags, &ntags));
    kms_err rc = kms_authorize_create(r);
    char *text = NULL;
    if (rc == KMS_OK)
        rc = policy ? kms_check_new_policy(r, policy, "kms:PutKeyPolicy")
                    : kms_default_policy(r, &text);
    if (rc == KMS_OK)
        rc = kms_keystore_create_key_tagged(r->srv->ks, description, policy ? policy : text, spec,
                                            usage, tags, ntags, &k);
    free(text);
    free(tags);
    KMS_GUARD(rc);
    snprintf(r->key_arn, sizeof r->key_arn, "%s", k.arn);
    r->out = json_pack("{s:o}", "KeyMetadata", kms_key_metadata(r->srv, &k));
    kms_key_info_clear(&k);
    KMS_ENSURE(r->out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

kms_err kms_op_put_key_policy(struct kms_request *r)
{
    const char *ref, *name, *policy;
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(kms_in_string(r->in, "PolicyName", 0, 1, 128, &name));
    KMS_ENSURE(!name || strcmp(name, "default") == 0, KMS_ERR_NOT_FOUND,
               "A key has one policy, named \"default\"");
    KMS_GUARD(kms_in_string(r->in, "Policy", 1, 1, 32768, &policy));
    KMS_ENSURE(strncmp(ref, "alias/", 6) != 0 && !strstr(ref, ":alias/"), KMS_ERR_NOT_FOUND,
               "Key '%.256s' does not exist: this operation takes a key id or key ARN", ref);
    KMS_GUARD(kms_authorize(r, "kms:PutKeyPolicy", ref, 0, NULL, &key));
    kms_keystore_unhold(r->srv->ks, &key);
    KMS_GUARD(kms_check_new_policy(r, policy, "kms:PutKeyPolicy"));
    return kms_keystore_put_policy(r->srv->ks, key.id_text, policy);
}

kms_err kms_op_get_key_policy(struct kms_request *r)
{
    const char *ref, *name;
    char *policy = NULL;
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(kms_in_string(r->in, "PolicyName", 0, 1, 128, &name));
    KMS_ENSURE(!name || strcmp(name, "default") == 0, KMS_ERR_NOT_FOUND,
               "A key has one policy, named \"default\"");
    KMS_ENSURE(strncmp(ref, "alias/", 6) != 0 && !strstr(ref, ":alias/"), KMS_ERR_NOT_FOUND,
               "Key '%.256s' does not exist: this operation takes a key id or key ARN", ref);
    KMS_GUARD(kms_authorize(r, "kms:GetKeyPolicy", ref, 0, NULL, &key));
    kms_keystore_unhold(r->srv->ks, &key);
    KMS_GUARD(kms_keystore_get_policy(r->srv->ks, key.id_text, &policy));
    r->out = json_pack("{s:s, s:s}", "Policy", policy, "PolicyName", "default");
    free(policy);
    KMS_ENSURE(r->out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

kms_err kms_op_list_key_policies(struct kms_request *r)
{
    const char *ref;
    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(kms_authorize(r, "kms:ListKeyPolicies", ref, 0, NULL, NULL));
    r->out = json_pack("{s:[s], s:b}", "PolicyNames", "default", "Truncated", 0);
    KMS_ENSURE(r->out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

kms_err kms_op_describe_key(struct kms_request *r)
{
    const char *ref;
    struct kms_key_info k = {0};
    struct kms_key_ref key = KMS_KEY_REF_INIT;

    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_GUARD(kms_in_grant_tokens(r->in));
    KMS_GUARD(kms_authorize(r, "kms:DescribeKey", ref, KMS_REF_ALIAS, NULL, &key));
    kms_err rc = kms_keystore_key_info(r->srv->ks, &key, &k);
    kms_keystore_unhold(r->srv->ks, &key);
    KMS_GUARD(rc);
    r->out = json_pack("{s:o}", "KeyMetadata", kms_key_metadata(r->srv, &k));
    kms_key_info_clear(&k);
    KMS_ENSURE(r->out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

/*
 * Tries of UpdateAlias and DeleteAlias when the alias is moved by another
 * request between their authorization and their change: each try authorizes
 * again against the key it names then.
 */
#define ALIAS_TRIES 4

kms_err kms_op_update_alias(struct kms_request *r)
{
    const char *name, *target;
    KMS_GUARD(kms_in_string(r->in, "AliasName", 1, 1, KMS_ALIAS_MAX, &name));
    KMS_GUARD(kms_in_string(r->in, "TargetKeyId", 1, 1, 2048, &target));
    KMS_GUARD(kms_alias_name_check(name));
    KMS_GUARD(kms_authorize_alias(r, "kms:UpdateAlias", name));
    for (int tries = 1;; tries++) {
        /* Both keys' policies: the one the alias leaves and the one it moves to. */
        struct kms_key_ref from = KMS_KEY_REF_INIT, to = KMS_KEY_REF_INIT;
        int moved = 0;
        kms_err rc = kms_authorize(r, "kms:UpdateAlias", name, KMS_REF_ALIAS, NULL, &from);
        if (rc == KMS_OK)
            rc = kms_authorize(r, "kms:UpdateAlias", target, 0, NULL, &to);
        if (rc == KMS_OK)
            rc = kms_keystore_update_alias(r->srv->ks, name, to.id_text, from.id, &moved);
        kms_keystore_unhold(r->srv->ks, &from);
        kms_keystore_unhold(r->srv->ks, &to);
        if (!moved || tries == ALIAS_TRIES)
            return rc;
    }
}

kms_err kms_op_delete_alias(struct kms_request *r)
{
    const char *name;
    KMS_GUARD(kms_in_string(r->in, "AliasName", 1, 1, KMS_ALIAS_MAX, &name));
    KMS_GUARD(kms_alias_name_check(name));
    KMS_GUARD(kms_authorize_alias(r, "kms:DeleteAlias", name));
    for (int tries = 1;; tries++) {
        struct kms_key_ref from = KMS_KEY_REF_INIT;
        int moved = 0;
        kms_err rc = kms_authorize(r, "kms:DeleteAlias", name, KMS_REF_ALIAS, NULL, &from);
        if (rc == KMS_OK)
            rc = kms_keystore_delete_alias(r->srv->ks, name, from.id, &moved);
        kms_keystore_unhold(r->srv->ks, &from);
        if (!moved || tries == ALIAS_TRIES)
            return rc;
    }
}

/*
 * Both lists fetch one entry more than asked: when it is there, the page is
 * truncated and that entry's name is the marker the next page starts from.
 */
kms_err kms_op_list_keys(struct kms_request *r)
{
    size_t limit, n = 0;
    const char *marker;
    struct kms_key_info *keys;
    kms_err rc;

    KMS_GUARD(kms_in_limit(r->in, KEYS_LIMIT_MAX, KEYS_LIMIT_DEFAULT, &limit));
    KMS_GUARD(kms_in_marker(r->in, &marker));
    keys = calloc(limit + 1, sizeof *keys);
    KMS_ENSURE(keys != NULL, KMS_ERR_INTERNAL, "out of memory");
    rc = kms_keystore_list_keys(r->srv->ks, marker, limit + 1, keys, &n);
    if (rc == KMS_OK) {
        json_t *list = json_array();
        for (size_t i = 0; i < n && i < limit; i++)
            json_array_append_new(
                list, json_pack("{s:s, s:s}", "KeyId", keys[i].id_text, "KeyArn", keys[i].arn));
        r->out = json_pack("{s:o}", "Keys", list);
        rc = r->out ? kms_out_page(r->out, n > limit ? keys[limit].id_text : NULL)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    for (size_t i = 0; i < n; i++)
        kms_key_info_clear(&keys[i]);
    free(keys);
    return rc;
}

kms_err kms_op_create_alias(struct kms_request *r)
{
    const char *name, *target;
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    KMS_GUARD(kms_in_string(r->in, "AliasName", 1, 1, KMS_ALIAS_MAX, &name));
    KMS_GUARD(kms_in_string(r->in, "TargetKeyId", 1, 1, 2048, &target));
    KMS_GUARD(kms_alias_name_check(name));
    KMS_GUARD(kms_authorize(r, "kms:CreateAlias", target, 0, NULL, &key));
    kms_keystore_unhold(r->srv->ks, &key);
    KMS_GUARD(kms_authorize_alias(r, "kms:CreateAlias", name));
    KMS_GUARD(kms_keystore_create_alias(r->srv->ks, name, key.id_text));
    r->out = NULL;
    return KMS_OK;
}

kms_err kms_op_list_aliases(struct kms_request *r)
{
    size_t limit, n = 0;
    const char *marker, *key;
    struct kms_alias_info *aliases;
    kms_err rc;

    KMS_GUARD(kms_in_limit(r->in, ALIASES_LIMIT_MAX, ALIASES_LIMIT_DEFAULT, &limit));
    KMS_GUARD(kms_in_marker(r->in, &marker));
    /* A marker is the alias name a page starts from (NextMarker): as
       ListKeys and ListKeyRotations do, anything else is refused. */
    if (marker && kms_alias_name_check(marker) != KMS_OK) {
        kms_err_clear();
        return KMS_FAIL(KMS_ERR_INVALID_MARKER, "Marker is not valid");
    }
    KMS_GUARD(kms_in_string(r->in, "KeyId", 0, 1, 2048, &key));
    aliases = calloc(limit + 1, sizeof *aliases);
    KMS_ENSURE(aliases != NULL, KMS_ERR_INTERNAL, "out of memory");
    rc = kms_keystore_list_aliases(r->srv->ks, key, marker, limit + 1, aliases, &n);
    if (rc == KMS_OK) {
        json_t *list = json_array();
        for (size_t i = 0; i < n && i < limit; i++)
            json_array_append_new(
                list, json_pack("{s:s, s:s, s:s, s:I, s:I}", "AliasName", aliases[i].name,
                                "AliasArn", aliases[i].arn, "TargetKeyId", aliases[i].target_id,
                                "CreationDate", (json_int_t)aliases[i].created, "LastUpdatedDate",
                                (json_int_t)aliases[i].updated));
        r->out = json_pack("{s:o}", "Aliases", list);
        rc = r->out ? kms_out_page(r->out, n > limit ? aliases[limit].name : NULL)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    free(aliases);
    return rc;
}
