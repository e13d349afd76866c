/*
 * Key states and rotation: EnableKey, DisableKey, ScheduleKeyDeletion,
 * CancelKeyDeletion, EnableKeyRotation, DisableKeyRotation,
 * GetKeyRotationStatus, RotateKeyOnDemand, ListKeyRotations.
 */
#include "config.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "common/keyspec.h"
#include "server/ops.h"

/* AWS's range and default of ListKeyRotations' Limit. */
#define ROTATIONS_LIMIT_MAX 1000
#define ROTATIONS_LIMIT_DEFAULT 100

/*
 * These operations take a key id or key ARN, as AWS's do, not an alias; the
 * key's policy (or the caller being an admin) must allow action. id receives
 * the key's id: the operation names the key by it, not by the caller's KeyId.
 */
static kms_err key_id(struct kms_request *r, const char *action, char id[KMS_UUID_TEXT_LEN + 1])
{
    const char *ref;
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_ENSURE(strncmp(ref, "alias/", 6) != 0 && !strstr(ref, ":alias/"), KMS_ERR_NOT_FOUND,
               "Key '%.256s' does not exist: this operation takes a key id or key ARN", ref);
    KMS_GUARD(kms_authorize(r, action, ref, 0, NULL, &key));
    memcpy(id, key.id_text, sizeof key.id_text);
    kms_keystore_unhold(r->srv->ks, &key);
    return KMS_OK;
}

/*
 * Rotation is for symmetric encryption keys: asymmetric and HMAC keys are
 * never rotated, automatically or on demand, as in AWS KMS.
 */
static kms_err rotatable(struct kms_request *r, const char *id, const char *operation)
{
    struct kms_key_info k = {0};
    KMS_GUARD(kms_keystore_describe(r->srv->ks, id, &k));
    const struct kms_spec_info *s = kms_spec(k.spec);
    kms_err rc = k.spec == KMS_SPEC_SYMMETRIC_DEFAULT
                     ? KMS_OK
                     : KMS_FAIL(KMS_ERR_UNSUPPORTED,
                                "%s is not supported for %s: it has KeySpec %s, and asymmetric and "
                                "HMAC KMS keys are not rotated",
                                operation, k.arn, s ? s->name : "?");
    kms_key_info_clear(&k);
    return rc;
}

/* The answer of operations that return only the key's ARN. */
static kms_err answer_key_id(struct kms_request *r, struct kms_key_info *k)
{
    r->out = json_pack("{s:s}", "KeyId", k->arn);
    kms_key_info_clear(k);
    KMS_ENSURE(r->out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

kms_err kms_op_enable_key(struct kms_request *r)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    KMS_GUARD(key_id(r, "kms:EnableKey", id));
    return kms_keystore_enable(r->srv->ks, id, 1);
}

kms_err kms_op_disable_key(struct kms_request *r)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    KMS_GUARD(key_id(r, "kms:DisableKey", id));
    return kms_keystore_enable(r->srv->ks, id, 0);
}

kms_err kms_op_schedule_key_deletion(struct kms_request *r)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    long days = 0;
    int present;
    struct kms_key_info k = {0};

    KMS_GUARD(key_id(r, "kms:ScheduleKeyDeletion", id));
    KMS_GUARD(kms_in_int(r->in, "PendingWindowInDays", 0, 365, &days, &present));
    KMS_ENSURE(!present || days > 0, KMS_ERR_VALIDATION,
               "1 validation error detected: Value '0' at 'pendingWindowInDays' failed to satisfy "
               "constraint: Member must have value greater than or equal to 1");
    KMS_GUARD(kms_keystore_schedule_deletion(r->srv->ks, id, days, &k));
    if (!present)
        days = (long)r->srv->cfg.keys.pending_max_days;
    r->out = json_pack("{s:s, s:I, s:s, s:i}", "KeyId", k.arn, "DeletionDate",
                       (json_int_t)k.deletion_date, "KeyState", "PendingDeletion",
                       "PendingWindowInDays", (int)days);
    kms_key_info_clear(&k);
    KMS_ENSURE(r->out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

kms_err kms_op_cancel_key_deletion(struct kms_request *r)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    struct kms_key_info k = {0};
    KMS_GUARD(key_id(r, "kms:CancelKeyDeletion", id));
    KMS_GUARD(kms_keystore_cancel_deletion(r->srv->ks, id, &k));
    return answer_key_id(r, &k);
}

kms_err kms_op_enable_key_rotation(struct kms_request *r)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    long days = 0;
    int present;
    KMS_GUARD(key_id(r, "kms:EnableKeyRotation", id));
    KMS_GUARD(rotatable(r, id, "EnableKeyRotation"));
    KMS_GUARD(kms_in_int(r->in, "RotationPeriodInDays", 1, 100000, &days, &present));
    return kms_keystore_enable_rotation(r->srv->ks, id, present ? days : 0);
}

kms_err kms_op_disable_key_rotation(struct kms_request *r)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    KMS_GUARD(key_id(r, "kms:DisableKeyRotation", id));
    KMS_GUARD(rotatable(r, id, "DisableKeyRotation"));
    return kms_keystore_disable_rotation(r->srv->ks, id);
}

kms_err kms_op_get_key_rotation_status(struct kms_request *r)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    struct kms_key_info k = {0};
    KMS_GUARD(key_id(r, "kms:GetKeyRotationStatus", id));
    KMS_GUARD(rotatable(r, id, "GetKeyRotationStatus"));
    KMS_GUARD(kms_keystore_describe(r->srv->ks, id, &k));
    r->out = json_pack("{s:b, s:s}", "KeyRotationEnabled", k.rotation_enabled, "KeyId", k.arn);
    if (r->out && k.rotation_enabled) {
        json_object_set_new(r->out, "RotationPeriodInDays", json_integer(k.rotation_period_days));
        json_object_set_new(r->out, "NextRotationDate", json_integer(k.next_rotation));
    }
    kms_key_info_clear(&k);
    KMS_ENSURE(r->out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

kms_err kms_op_rotate_key_on_demand(struct kms_request *r)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    struct kms_key_info k = {0};
    KMS_GUARD(key_id(r, "kms:RotateKeyOnDemand", id));
    KMS_GUARD(rotatable(r, id, "RotateKeyOnDemand"));
    KMS_GUARD(kms_keystore_rotate_on_demand(r->srv->ks, id, &k));
    return answer_key_id(r, &k);
}

kms_err kms_op_list_key_rotations(struct kms_request *r)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    const char *marker;
    size_t limit;
    unsigned long from = 0;
    size_t n = 0;
    struct kms_rotation_info *rot;
    struct kms_key_info k = {0};
    kms_err rc;

    KMS_GUARD(key_id(r, "kms:ListKeyRotations", id));
    KMS_GUARD(rotatable(r, id, "ListKeyRotations"));
    KMS_GUARD(kms_in_limit(r->in, ROTATIONS_LIMIT_MAX, ROTATIONS_LIMIT_DEFAULT, &limit));
    KMS_GUARD(kms_in_marker(r->in, &marker));
    if (marker) {
        /* The ordinal of the version the page starts from: NextMarker's, and only digits. */
        char *end;
        errno = 0;
        from = strtoul(marker, &end, 10);
        KMS_ENSURE(marker[0] >= '0' && marker[0] <= '9' && *end == '\0' && errno == 0 &&
                       from >= 2 && from <= UINT32_MAX,
                   KMS_ERR_INVALID_MARKER, "Marker is not valid");
    }
    rot = calloc(limit + 1, sizeof *rot);
    KMS_ENSURE(rot != NULL, KMS_ERR_INTERNAL, "out of memory");
    rc = kms_keystore_list_rotations(r->srv->ks, id, (uint32_t)from, limit + 1, rot, &n, &k);
    if (rc == KMS_OK) {
        json_t *list = json_array();
        for (size_t i = 0; i < n && i < limit; i++)
            json_array_append_new(list, json_pack("{s:s, s:I, s:s}", "KeyId", k.arn, "RotationDate",
                                                  (json_int_t)rot[i].date, "RotationType",
                                                  rot[i].on_demand ? "ON_DEMAND" : "AUTOMATIC"));
        char next[16];
        if (n > limit)
            snprintf(next, sizeof next, "%u", rot[limit].n);
        r->out = json_pack("{s:o}", "Rotations", list);
        rc = r->out ? kms_out_page(r->out, n > limit ? next : NULL)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    kms_key_info_clear(&k);
    free(rot);
    return rc;
}
