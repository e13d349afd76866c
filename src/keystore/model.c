#include "config.h"

#include "keystore/model.h"

#include <string.h>

static const char *state_of(const json_t *s)
{
    const char *v = json_string_value(json_object_get(s, "state"));
    return v ? v : "";
}

static json_int_t int_of(const json_t *o, const char *name)
{
    return json_integer_value(json_object_get(o, name));
}

static int is(const json_t *s, const char *state)
{
    return strcmp(state_of(s), state) == 0;
}

json_t *kms_model_version(const json_t *state, uint32_t vid)
{
    size_t i;
    json_t *v;
    json_array_foreach(json_object_get(state, "versions"), i, v)
    {
        if (int_of(v, "vid") == (json_int_t)vid)
            return v;
    }
    return NULL;
}

/* Refuses a change to a key that is not Enabled, with AWS's error for its state. */
static kms_err require_enabled(const json_t *s)
{
    KMS_ENSURE(!is(s, KMS_STATE_DISABLED), KMS_ERR_DISABLED, "The key is disabled.");
    KMS_ENSURE(is(s, KMS_STATE_ENABLED), KMS_ERR_INVALID_STATE, "The key is %s.",
               is(s, KMS_STATE_PENDING) ? "pending deletion" : "not usable");
    return KMS_OK;
}

static kms_err require_not_pending(const json_t *s)
{
    KMS_ENSURE(is(s, KMS_STATE_ENABLED) || is(s, KMS_STATE_DISABLED), KMS_ERR_INVALID_STATE,
               "The key is %s.", is(s, KMS_STATE_PENDING) ? "pending deletion" : "not usable");
    return KMS_OK;
}

static kms_err rotate(json_t *s, const json_t *op)
{
    json_int_t vid = int_of(op, "vid"), date = int_of(op, "date");
    const char *reason = json_string_value(json_object_get(op, "reason"));
    json_t *versions = json_object_get(s, "versions");
    int due;

    if (kms_model_version(s, (uint32_t)vid))
        return KMS_OK; /* already there: the same change seen twice */
    KMS_ENSURE(reason && vid > 0 && json_is_array(versions), KMS_ERR_INTERNAL,
               "malformed rotation");
    if (strcmp(reason, KMS_ROTATE_DEMAND) == 0) {
        KMS_GUARD(require_enabled(s));
        KMS_ENSURE(int_of(s, "on_demand") < int_of(op, "limit"), KMS_ERR_LIMIT_EXCEEDED,
                   "The key has reached its limit of %lld on-demand rotations.",
                   (long long)int_of(op, "limit"));
        due = 1;
    } else if (strcmp(reason, KMS_ROTATE_SCHEDULE) == 0) {
        due = is(s, KMS_STATE_ENABLED) && json_is_true(json_object_get(s, "rotation_enabled")) &&
              int_of(s, "next_rotation") <= date;
    } else {
        due = is(s, KMS_STATE_ENABLED) && int_of(s, "current") == int_of(op, "from");
    }
    /*
     * A rotation that is no longer due (another node made it first) still
     * keeps its version, unlisted: a version object is never forgotten.
     */
    /* Ordinals go on past versions moved to the key's history (archive below). */
    json_int_t n = int_of(s, "archived_n");
    size_t i;
    json_t *v;
    json_array_foreach(versions, i, v)
    {
        if (int_of(v, "n") > n)
            n = int_of(v, "n");
    }
    json_array_append_new(
        versions,
        json_pack("{s:I, s:I, s:I, s:I, s:I, s:s, s:b}", "vid", vid, "n", n + 1, "created", date,
                  "reserved", (json_int_t)0, "bound", int_of(op, "bound"), "rotation",
                  strcmp(reason, KMS_ROTATE_DEMAND) == 0 ? "ON_DEMAND" : "AUTOMATIC", "listed",
                  due));
    if (!due)
        return KMS_OK;
    json_object_set_new(s, "current", json_integer(vid));
    if (strcmp(reason, KMS_ROTATE_DEMAND) == 0)
        json_object_set_new(s, "on_demand", json_integer(int_of(s, "on_demand") + 1));
    if (strcmp(reason, KMS_ROTATE_SCHEDULE) == 0)
        json_object_set_new(s, "next_rotation",
                            json_integer(date + int_of(s, "rotation_period_seconds")));
    return KMS_OK;
}

static kms_err reserve(json_t *s, const json_t *op)
{
    json_t *v = kms_model_version(s, (uint32_t)int_of(op, "vid"));
    json_int_t count = int_of(op, "count");
    KMS_ENSURE(v != NULL && count > 0, KMS_ERR_INTERNAL, "reservation for an unknown version");
    KMS_ENSURE(int_of(v, "reserved") + count <= int_of(v, "bound"), KMS_ERR_LIMIT_EXCEEDED,
               "The key version has reached its usage bound.");
    json_object_set_new(v, "reserved", json_integer(int_of(v, "reserved") + count));
    return KMS_OK;
}

/*
 * Moves versions out of the record once a history object holds them
 * (keystore.c writes that object first), so the record does not grow with
 * every rotation. The current version always stays. archived_n, the highest
 * ordinal moved, only grows.
 */
static kms_err archive(json_t *s, const json_t *op)
{
    json_t *versions = json_object_get(s, "versions"), *vids = json_object_get(op, "vids"), *v;
    json_int_t upto = int_of(op, "upto");
    size_t i, j;

    KMS_ENSURE(json_is_array(versions) && json_is_array(vids) && upto > 0, KMS_ERR_INTERNAL,
               "malformed archive change");
    for (i = json_array_size(versions); i-- > 0;) {
        json_int_t vid = int_of(json_array_get(versions, i), "vid");
        if (vid == int_of(s, "current"))
            continue;
        json_array_foreach(vids, j, v)
        {
            if (json_integer_value(v) == vid) {
                json_array_remove(versions, i);
                break;
            }
        }
    }
    if (upto > int_of(s, "archived_n"))
        json_object_set_new(s, "archived_n", json_integer(upto));
    return KMS_OK;
}

static kms_err key_apply(json_t **state, const json_t *op)
{
    const char *type = json_string_value(json_object_get(op, "type"));
    json_t *s = *state;

    KMS_ENSURE(type != NULL, KMS_ERR_INTERNAL, "a change without a type");
    if (strcmp(type, "create") == 0) {
        KMS_ENSURE(s == NULL, KMS_ERR_ALREADY_EXISTS, "The key already exists.");
        *state = json_deep_copy(json_object_get(op, "state"));
        KMS_ENSURE(*state != NULL, KMS_ERR_INTERNAL, "malformed key creation");
        return KMS_OK;
    }
    KMS_ENSURE(s != NULL && !is(s, KMS_STATE_DESTROYED), KMS_ERR_NOT_FOUND,
               "The key does not exist.");
    if (strcmp(type, "rotate") == 0)
        return rotate(s, op);
    if (strcmp(type, "reserve") == 0)
        return reserve(s, op);
    if (strcmp(type, "archive") == 0)
        return archive(s, op);
    if (strcmp(type, "enable") == 0) {
        KMS_GUARD(require_not_pending(s));
        json_object_set_new(s, "state", json_string(KMS_STATE_ENABLED));
        return KMS_OK;
    }
    if (strcmp(type, "disable") == 0) {
        KMS_GUARD(require_not_pending(s));
        json_object_set_new(s, "state", json_string(KMS_STATE_DISABLED));
        return KMS_OK;
    }
    if (strcmp(type, "enable_rotation") == 0) {
        KMS_GUARD(require_enabled(s));
        json_int_t days = int_of(op, "period_days"), secs = int_of(op, "period_seconds");
        if (!json_is_true(json_object_get(s, "rotation_enabled")) ||
            int_of(s, "rotation_period_seconds") != secs)
            json_object_set_new(s, "next_rotation", json_integer(int_of(op, "date") + secs));
        json_object_set_new(s, "rotation_enabled", json_true());
        json_object_set_new(s, "rotation_period_days", json_integer(days));
        json_object_set_new(s, "rotation_period_seconds", json_integer(secs));
        return KMS_OK;
    }
    if (strcmp(type, "put_policy") == 0) {
        const char *policy = json_string_value(json_object_get(op, "policy"));
        KMS_GUARD(require_not_pending(s));
        KMS_ENSURE(policy != NULL, KMS_ERR_INTERNAL, "malformed policy change");
        json_object_set_new(s, "policy", json_string(policy));
        return KMS_OK;
    }
    if (strcmp(type, "disable_rotation") == 0) {
        KMS_GUARD(require_enabled(s));
        json_object_set_new(s, "rotation_enabled", json_false());
        return KMS_OK;
    }
    if (strcmp(type, "schedule_deletion") == 0) {
        KMS_GUARD(require_not_pending(s));
        json_object_set_new(s, "state", json_string(KMS_STATE_PENDING));
        json_object_set_new(s, "deletion_date", json_integer(int_of(op, "deletion_date")));
        return KMS_OK;
    }
    if (strcmp(type, "cancel_deletion") == 0) {
        KMS_ENSURE(is(s, KMS_STATE_PENDING), KMS_ERR_INVALID_STATE,
                   "The key is not pending deletion.");
        json_object_set_new(s, "state", json_string(KMS_STATE_DISABLED));
        json_object_set_new(s, "deletion_date", json_integer(0));
        return KMS_OK;
    }
    if (strcmp(type, "destroy") == 0) {
        KMS_ENSURE(is(s, KMS_STATE_PENDING) && int_of(s, "deletion_date") <= int_of(op, "date"),
                   KMS_ERR_INVALID_STATE, "The key is not due for deletion.");
        json_object_set_new(s, "state", json_string(KMS_STATE_DESTROYED));
        return KMS_OK;
    }
    return KMS_FAIL(KMS_ERR_INTERNAL, "unknown change type %.32s", type);
}

/*
 * Every version any record names stays known, and its reservations never
 * shrink; except versions already moved to the key's history, which older
 * records still name.
 */
static void key_keep(json_t *state, const json_t *other)
{
    json_t *versions = json_object_get(state, "versions"), *v;
    json_int_t archived = int_of(state, "archived_n");
    size_t i;
    json_array_foreach(json_object_get(other, "versions"), i, v)
    {
        json_t *mine = kms_model_version(state, (uint32_t)int_of(v, "vid"));
        if (!mine && int_of(v, "n") <= archived)
            continue;
        if (!mine) {
            json_t *copy = json_deep_copy(v);
            json_object_set_new(copy, "listed", json_false());
            json_array_append_new(versions, copy);
        } else if (int_of(v, "reserved") > int_of(mine, "reserved")) {
            json_object_set_new(mine, "reserved", json_integer(int_of(v, "reserved")));
        }
    }
}

/*
 * New versions and reservations only add (a version, uses of a version), and
 * an archive only moves what a history object already holds, so one missed by
 * a writer may still be applied after later changes. A state
 * change (enable, disable, deletion, rotation settings) may not: applied after
 * a later one, it would undo it.
 */
static int key_late(const json_t *op)
{
    const char *type = json_string_value(json_object_get(op, "type"));
    return type && (strcmp(type, "rotate") == 0 || strcmp(type, "reserve") == 0 ||
                    strcmp(type, "archive") == 0);
}

const struct kms_record_kind kms_key_kind = {"key", key_apply, key_keep, key_late};

static int alias_exists(const json_t *s)
{
    const char *t = json_string_value(json_object_get(s, "target"));
    return s && t && *t;
}

static kms_err alias_apply(json_t **state, const json_t *op)
{
    const char *type = json_string_value(json_object_get(op, "type"));
    const char *target = json_string_value(json_object_get(op, "target"));
    json_int_t date = int_of(op, "date");

    /* "dead": a deleted key; an alias still naming it went with it, as in AWS. */
    const char *dead = json_string_value(json_object_get(op, "dead"));
    const char *old = json_string_value(json_object_get(*state, "target"));
    int live = alias_exists(*state) && !(dead && old && strcmp(old, dead) == 0);

    KMS_ENSURE(type != NULL, KMS_ERR_INTERNAL, "a change without a type");
    if (strcmp(type, "create") == 0) {
        KMS_ENSURE(!live, KMS_ERR_ALREADY_EXISTS, "The alias already exists.");
        KMS_ENSURE(target && *target, KMS_ERR_INTERNAL, "malformed alias creation");
        json_decref(*state);
        *state = json_pack("{s:s, s:I, s:I}", "target", target, "created", date, "updated", date);
        return KMS_OK;
    }
    KMS_ENSURE(live, KMS_ERR_NOT_FOUND, "The alias does not exist.");
    if (strcmp(type, "update") == 0) {
        KMS_ENSURE(target && *target, KMS_ERR_INTERNAL, "malformed alias update");
        json_object_set_new(*state, "target", json_string(target));
        json_object_set_new(*state, "updated", json_integer(date));
        return KMS_OK;
    }
    if (strcmp(type, "delete") == 0) {
        /* A tombstone: later records of a stale writer cannot bring the alias back. */
        json_object_set_new(*state, "target", json_string(""));
        json_object_set_new(*state, "updated", json_integer(date));
        return KMS_OK;
    }
    return KMS_FAIL(KMS_ERR_INTERNAL, "unknown change type %.32s", type);
}

const struct kms_record_kind kms_alias_kind = {"alias", alias_apply, NULL, NULL};
