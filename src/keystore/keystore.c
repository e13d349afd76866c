/*
 * The key store: lookups through the cache (cache.c), every change one write
 * transaction of the database that also records it in the change sequence,
 * after which this node's entry is read again at its next use and other
 * nodes drop theirs at their next poll (background.c).
 */
#include "config.h"

#include "keystore/internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/keyspec.h"
#include "common/log.h"

int64_t kms_now(void)
{
    /*
     * Not time(): on Linux it reads the coarse clock, up to a tick behind, so
     * a date computed just after a second begins could fall in the previous one.
     */
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    return (int64_t)t.tv_sec;
}

void kms_keystore_config_defaults(struct kms_keystore_config *c)
{
    memset(c, 0, sizeof *c);
    c->region = "us-east-1";
    c->account = "111122223333";
    c->usage_bound = 1ull << 30;
    c->usage_block = 10000;
    c->day_seconds = 86400;
    c->rotation_min_days = 90;
    c->rotation_max_days = 2560;
    c->pending_min_days = 7;
    c->pending_max_days = 30;
    c->max_on_demand = 10;
    c->refresh_ms = 1000;
    /* ≈ 8.3 KB of SoftHSM2 memory per unwrapped version: 4096 keys ≈ 34 MB. */
    c->key_cache = 4096;
    c->negative_cache = 8192;
    c->grants_per_key = KMS_GRANTS_PER_KEY;
}

const char *kms_key_state_name(enum kms_key_state s)
{
    switch (s) {
    case KMS_KEY_ENABLED: return "Enabled";
    case KMS_KEY_DISABLED: return "Disabled";
    case KMS_KEY_PENDING_DELETION: return "PendingDeletion";
    }
    return "Unavailable";
}

/* ---- open and close ------------------------------------------------------- */

kms_err kms_keystore_open(struct kms_hsm *hsm, struct kms_store *store,
                          const struct kms_keystore_config *cfg, struct kms_keystore **out)
{
    struct kms_keystore *ks = calloc(1, sizeof *ks);
    pthread_condattr_t ca;
    struct kms_tx *tx;
    kms_err rc;

    KMS_ENSURE(ks != NULL, KMS_ERR_INTERNAL, "out of memory");
    ks->hsm = hsm;
    ks->store = store;
    ks->cfg = *cfg;
    snprintf(ks->region, sizeof ks->region, "%s", cfg->region);
    snprintf(ks->account, sizeof ks->account, "%s", cfg->account);
    ks->cfg.region = ks->region;
    ks->cfg.account = ks->account;
    if (ks->cfg.usage_block > ks->cfg.usage_bound)
        ks->cfg.usage_block = ks->cfg.usage_bound;
    if (ks->cfg.key_cache < 1)
        ks->cfg.key_cache = 1;
    if (ks->cfg.negative_cache < 64)
        ks->cfg.negative_cache = 64;
    snprintf(ks->arn_prefix, sizeof ks->arn_prefix, "arn:aws:kms:%s:%s:", ks->region, ks->account);
    pthread_mutex_init(&ks->change, NULL);
    pthread_mutex_init(&ks->lock, NULL);
    pthread_mutex_init(&ks->queue_lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ks->wake, &ca);
    pthread_cond_init(&ks->reserved, NULL);
    pthread_condattr_destroy(&ca);

    rc = kms_cache_init(ks);
    if (rc == KMS_OK)
        rc = kms_roots_load(ks);
    /* The change sequence from now on: everything before is read as it is used. */
    if (rc == KMS_OK)
        rc = kms_store_begin(store, KMS_TX_READ, &tx);
    if (rc == KMS_OK) {
        rc = kms_store_change_head(tx, &ks->seen_seq);
        if (rc == KMS_OK)
            rc = kms_store_key_count(tx, &ks->count_keys, &ks->count_versions);
        if (rc == KMS_OK)
            rc = kms_store_commit(tx);
        kms_store_rollback(tx);
    }
    if (rc != KMS_OK) {
        if (!strstr(kms_err_message(), kms_store_name(store)))
            rc = KMS_FAIL(rc, "the database %s: %s", kms_store_name(store), kms_err_message());
        kms_keystore_close(ks);
        return rc;
    }
    ks->last_count = kms_now();
    *out = ks;
    return KMS_OK;
}

void kms_keystore_close(struct kms_keystore *ks)
{
    if (!ks)
        return;
    kms_keystore_stop(ks);
    kms_cache_free(ks);
    pthread_mutex_destroy(&ks->change);
    pthread_mutex_destroy(&ks->lock);
    pthread_mutex_destroy(&ks->queue_lock);
    pthread_cond_destroy(&ks->wake);
    pthread_cond_destroy(&ks->reserved);
    free(ks);
}

size_t kms_keystore_count(struct kms_keystore *ks)
{
    pthread_mutex_lock(&ks->lock);
    size_t n = ks->count_keys;
    pthread_mutex_unlock(&ks->lock);
    return n;
}

/* ---- lookups -------------------------------------------------------------- */

kms_err kms_keystore_survey(struct kms_keystore *ks, size_t *keys, size_t *versions,
                            kms_err (*fn)(void *arg, const struct kms_version_usage *u), void *arg)
{
    kms_err rc = KMS_OK;
    pthread_mutex_lock(&ks->lock);
    *keys = ks->count_keys;
    *versions = ks->count_versions;
    /* The keys in memory: those this node uses. */
    for (struct key *k = ks->lru_head; fn && k && rc == KMS_OK; k = k->lnext) {
        const struct version *v = kms_version_locked(k, k->row.current);
        /* Only AES-GCM versions count their uses (asymmetric and HMAC ones have no bound). */
        if (v && k->row.state == KMS_STORE_ENABLED && k->row.spec == KMS_SPEC_SYMMETRIC_DEFAULT) {
            struct kms_version_usage u = {k->id_text, v->vid, v->reserved, v->bound};
            rc = fn(arg, &u);
        }
    }
    pthread_mutex_unlock(&ks->lock);
    return rc;
}

void kms_key_info_clear(struct kms_key_info *info)
{
    free(info->description);
    memset(info, 0, sizeof *info);
}

static kms_err info_from_row(struct kms_keystore *ks, const struct kms_key_row *r,
                             struct kms_key_info *out, int with_description)
{
    kms_key_info_clear(out);
    memcpy(out->id, r->id, KMS_UUID_LEN);
    kms_uuid_format(r->id, out->id_text);
    snprintf(out->arn, sizeof out->arn, "%skey/%s", ks->arn_prefix, out->id_text);
    out->created = r->created;
    out->state = r->state == KMS_STORE_DISABLED  ? KMS_KEY_DISABLED
                 : r->state == KMS_STORE_ENABLED ? KMS_KEY_ENABLED
                                                 : KMS_KEY_PENDING_DELETION;
    out->current_version = r->current;
    out->deletion_date = r->deletion_date;
    out->rotation_enabled = r->rotation_enabled;
    out->rotation_period_days = r->rotation_days;
    out->next_rotation = r->next_rotation;
    out->spec = r->spec;
    out->usage = r->usage;
    if (!with_description)
        return KMS_OK;
    out->description = strdup(r->description ? r->description : "");
    KMS_ENSURE(out->description != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

kms_err kms_info_copy_locked(struct kms_keystore *ks, const struct key *k, struct kms_key_info *out)
{
    return info_from_row(ks, &k->row, out, 1);
}

kms_err kms_info_brief_locked(struct kms_keystore *ks, const struct key *k,
                              struct kms_key_info *out)
{
    return info_from_row(ks, &k->row, out, 0);
}

kms_err kms_key_usable_locked(struct kms_keystore *ks, const struct key *k)
{
    KMS_ENSURE(k->row.state != KMS_STORE_DISABLED, KMS_ERR_DISABLED, "%skey/%s is disabled.",
               ks->arn_prefix, k->id_text);
    KMS_ENSURE(k->row.state == KMS_STORE_ENABLED, KMS_ERR_INVALID_STATE,
               "%skey/%s is pending deletion.", ks->arn_prefix, k->id_text);
    return KMS_OK;
}

static kms_err alias_missing(struct kms_keystore *ks, const char *name)
{
    return KMS_FAIL(KMS_ERR_NOT_FOUND, "Alias '%s%.256s' is not found.", ks->arn_prefix, name);
}

kms_err kms_resolve_id(struct kms_keystore *ks, const char *ref, int how, uint8_t id[KMS_UUID_LEN])
{
    size_t plen = strlen(ks->arn_prefix);
    const char *rest = ref;

    KMS_ENSURE(ref && *ref, KMS_ERR_VALIDATION, "KeyId is required");
    if (strncmp(ref, "arn:", 4) == 0) {
        KMS_ENSURE(strncmp(ref, "arn:aws:kms:", 12) == 0, KMS_ERR_INVALID_ARN, "Invalid arn %.256s",
                   ref);
        KMS_ENSURE(strncmp(ref, ks->arn_prefix, plen) == 0, KMS_ERR_NOT_FOUND,
                   "Key '%.256s' does not exist", ref);
        rest = ref + plen;
        if (strncmp(rest, "key/", 4) == 0)
            rest += 4;
        else
            KMS_ENSURE(strncmp(rest, "alias/", 6) == 0, KMS_ERR_INVALID_ARN, "Invalid arn %.256s",
                       ref);
    }
    if (strncmp(rest, "alias/", 6) == 0) {
        struct kms_alias_row a;
        KMS_ENSURE(how & KMS_REF_ALIAS, KMS_ERR_NOT_FOUND, "Key '%.256s' does not exist", ref);
        kms_err rc = kms_alias_lookup(ks, rest, &a);
        if (rc == KMS_ERR_NOT_FOUND)
            return alias_missing(ks, rest);
        KMS_GUARD(rc);
        memcpy(id, a.target, KMS_UUID_LEN);
        return KMS_OK;
    }
    if (kms_uuid_parse(rest, strlen(rest), id) != KMS_OK)
        return KMS_FAIL(KMS_ERR_NOT_FOUND, "Invalid keyId '%.256s'", ref);
    return KMS_OK;
}

kms_err kms_resolve(struct kms_keystore *ks, const char *ref, int how, struct key **out)
{
    uint8_t id[KMS_UUID_LEN];
    char text[KMS_UUID_TEXT_LEN + 1];
    KMS_GUARD(kms_resolve_id(ks, ref, how, id));
    kms_err rc = kms_key_get(ks, id, out);
    if (rc == KMS_OK && (*out)->row.state == KMS_STORE_DESTROYED && !(how & KMS_REF_DESTROYED)) {
        kms_key_put(ks, *out);
        rc = KMS_ERR_NOT_FOUND;
    }
    if (rc == KMS_ERR_NOT_FOUND) {
        kms_uuid_format(id, text);
        const char *alias = strstr(ref, "alias/");
        if (alias && (alias == ref || strncmp(ref, "arn:", 4) == 0))
            return alias_missing(ks, alias);
        return KMS_FAIL(KMS_ERR_NOT_FOUND, "Key '%skey/%s' does not exist", ks->arn_prefix, text);
    }
    return rc;
}

kms_err kms_keystore_describe(struct kms_keystore *ks, const char *ref, struct kms_key_info *out)
{
    struct key *k;
    KMS_GUARD(kms_resolve(ks, ref, KMS_REF_ALIAS, &k));
    pthread_mutex_lock(&ks->lock);
    kms_err rc = kms_info_copy_locked(ks, k, out);
    pthread_mutex_unlock(&ks->lock);
    kms_key_put(ks, k);
    return rc;
}

kms_err kms_keystore_hold(struct kms_keystore *ks, const char *ref, int how,
                          struct kms_key_ref *out)
{
    struct key *k;
    out->entry = NULL;
    KMS_GUARD(kms_resolve(ks, ref, how, &k));
    memcpy(out->id, k->id, KMS_UUID_LEN);
    memcpy(out->id_text, k->id_text, sizeof out->id_text);
    snprintf(out->arn, sizeof out->arn, "%skey/%s", ks->arn_prefix, k->id_text);
    out->entry = k;
    return KMS_OK;
}

void kms_keystore_unhold(struct kms_keystore *ks, struct kms_key_ref *key)
{
    if (key->entry)
        kms_key_put(ks, key->entry);
    key->entry = NULL;
}

kms_err kms_keystore_authorize(struct kms_keystore *ks, const char *ref, int how,
                               kms_err (*fn)(void *arg, const struct kms_key_guard *g), void *arg,
                               struct kms_key_ref *out)
{
    struct kms_key_ref held = KMS_KEY_REF_INIT;
    KMS_GUARD(kms_keystore_hold(ks, ref, how, &held));
    pthread_mutex_lock(&ks->lock);
    struct kms_key_guard g = {held.id_text, held.arn, held.entry->policy, held.entry->grants};
    kms_err rc = fn(arg, &g);
    pthread_mutex_unlock(&ks->lock);
    if (rc == KMS_OK && out)
        *out = held;
    else
        kms_keystore_unhold(ks, &held);
    return rc;
}

kms_err kms_keystore_key_info(struct kms_keystore *ks, const struct kms_key_ref *key,
                              struct kms_key_info *out)
{
    KMS_ENSURE(key->entry != NULL, KMS_ERR_INTERNAL, "no key held");
    pthread_mutex_lock(&ks->lock);
    kms_err rc = kms_info_copy_locked(ks, key->entry, out);
    pthread_mutex_unlock(&ks->lock);
    return rc;
}

kms_err kms_keystore_key_info_brief(struct kms_keystore *ks, const struct kms_key_ref *key,
                                    struct kms_key_info *out)
{
    KMS_ENSURE(key->entry != NULL, KMS_ERR_INTERNAL, "no key held");
    pthread_mutex_lock(&ks->lock);
    kms_err rc = kms_info_brief_locked(ks, key->entry, out);
    pthread_mutex_unlock(&ks->lock);
    return rc;
}

struct list_keys {
    struct kms_keystore *ks;
    struct kms_key_info *out;
    size_t *n;
};

static kms_err list_one(void *arg, const struct kms_key_row *r)
{
    struct list_keys *l = arg;
    memset(&l->out[*l->n], 0, sizeof l->out[*l->n]);
    KMS_GUARD(info_from_row(l->ks, r, &l->out[*l->n], 1));
    (*l->n)++;
    return KMS_OK;
}

kms_err kms_keystore_list_keys(struct kms_keystore *ks, const char *marker, size_t limit,
                               struct kms_key_info *ids, size_t *n)
{
    uint8_t from[KMS_UUID_LEN];
    struct kms_tx *tx;
    struct list_keys l = {ks, ids, n};

    *n = 0;
    if (marker && kms_uuid_parse(marker, strlen(marker), from) != KMS_OK) {
        kms_err_clear();
        return KMS_FAIL(KMS_ERR_INVALID_MARKER, "Marker is not valid");
    }
    KMS_GUARD(kms_store_begin(ks->store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_keys_list(tx, marker ? from : NULL, limit, list_one, &l);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    return rc;
}

kms_err kms_keystore_get_policy(struct kms_keystore *ks, const char *ref, char **out)
{
    struct key *k;
    KMS_GUARD(kms_resolve(ks, ref, 0, &k));
    pthread_mutex_lock(&ks->lock);
    const char *p = k->row.policy ? k->row.policy : ks->cfg.default_policy;
    *out = strdup(p ? p : "");
    pthread_mutex_unlock(&ks->lock);
    kms_key_put(ks, k);
    KMS_ENSURE(*out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

/* ---- changes -------------------------------------------------------------- */

void kms_change_event_init(struct kms_keystore *ks, struct kms_change_event *e,
                           const char *operation, int automatic, const uint8_t *key_id,
                           const char *alias)
{
    char text[KMS_UUID_TEXT_LEN + 1];
    memset(e, 0, sizeof *e);
    e->operation = operation;
    e->automatic = automatic;
    e->alias = alias;
    if (key_id) {
        kms_uuid_format(key_id, text);
        snprintf(e->key_arn, sizeof e->key_arn, "%skey/%s", ks->arn_prefix, text);
    }
}

kms_err kms_change_commit(struct kms_keystore *ks, struct kms_tx *tx, struct kms_change_event *e)
{
    const struct kms_change_audit *au = &ks->cfg.audit;
    if (!au->intent)
        return kms_store_commit(tx);
    /* Ahead of the commit, on disk: a change nobody could see never commits. */
    KMS_GUARD(au->intent(au->arg, e));
    kms_err rc = kms_store_change_request(tx, e->request_id);
    int result = KMS_CHANGE_NOT_COMMITTED;
    if (rc == KMS_OK) {
        rc = kms_store_commit(tx);
        /* A commit that failed may have happened all the same (a lost connection): looked up. */
        result = rc == KMS_OK ? KMS_CHANGE_COMMITTED : KMS_CHANGE_UNKNOWN;
    }
    if (au->outcome) {
        char message[512];
        snprintf(message, sizeof message, "%s", kms_err_message());
        au->outcome(au->arg, e, result);
        if (rc != KMS_OK)
            rc = KMS_FAIL(rc, "%s", message);
    }
    return rc;
}

kms_err kms_key_change(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                       const char *operation, int automatic,
                       kms_err (*fn)(struct kms_keystore *ks, struct kms_tx *tx,
                                     struct kms_key_row *r, void *arg),
                       void *arg)
{
    struct kms_key_row row = {0};
    struct kms_tx *tx;
    char text[KMS_UUID_TEXT_LEN + 1];
    struct kms_change_event e;

    kms_change_event_init(ks, &e, operation, automatic, id, NULL);

    pthread_mutex_lock(&ks->change);
    kms_err rc = kms_store_begin(ks->store, KMS_TX_WRITE, &tx);
    if (rc == KMS_OK) {
        rc = kms_store_key_get(tx, id, &row);
        if (rc == KMS_OK && row.state == KMS_STORE_DESTROYED)
            rc = KMS_ERR_NOT_FOUND;
        if (rc == KMS_ERR_NOT_FOUND) {
            kms_uuid_format(id, text);
            rc = KMS_FAIL(KMS_ERR_NOT_FOUND, "Key '%skey/%s' does not exist", ks->arn_prefix, text);
        }
        if (rc == KMS_OK)
            rc = fn(ks, tx, &row, arg);
        if (rc == KMS_OK)
            rc = kms_store_key_update(tx, &row);
        if (rc == KMS_OK)
            rc = kms_store_note_change(tx, KMS_CHANGE_KEY, id, NULL);
        if (rc == KMS_OK)
            rc = kms_change_commit(ks, tx, &e);
        kms_store_rollback(tx);
    }
    /*
     * Before the next change of this node begins: a change that reads the
     * database after this one must find this node's entry stale too. A refused
     * change left the entry as it was.
     */
    if (rc == KMS_OK)
        kms_cache_key_changed(ks, id);
    pthread_mutex_unlock(&ks->change);
    kms_key_row_clear(&row);
    return rc;
}

/* A change to the key ref names, with fn as in kms_key_change; the key's id comes back. */
static kms_err change_ref(struct kms_keystore *ks, const char *ref, const char *operation,
                          kms_err (*fn)(struct kms_keystore *ks, struct kms_tx *tx,
                                        struct kms_key_row *r, void *arg),
                          void *arg, uint8_t id[KMS_UUID_LEN])
{
    struct key *k;
    KMS_GUARD(kms_resolve(ks, ref, KMS_REF_ALIAS, &k));
    memcpy(id, k->id, KMS_UUID_LEN);
    kms_key_put(ks, k);
    return kms_key_change(ks, id, operation, 0, fn, arg);
}

static kms_err describe_id(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                           struct kms_key_info *out)
{
    char text[KMS_UUID_TEXT_LEN + 1];
    kms_uuid_format(id, text);
    return kms_keystore_describe(ks, text, out);
}

/* AWS's errors for a key that is not Enabled. */
static kms_err require_enabled(struct kms_keystore *ks, const struct kms_key_row *r)
{
    char text[KMS_UUID_TEXT_LEN + 1];
    kms_uuid_format(r->id, text);
    KMS_ENSURE(r->state != KMS_STORE_DISABLED, KMS_ERR_DISABLED, "%skey/%s is disabled.",
               ks->arn_prefix, text);
    KMS_ENSURE(r->state == KMS_STORE_ENABLED, KMS_ERR_INVALID_STATE,
               "%skey/%s is pending deletion.", ks->arn_prefix, text);
    return KMS_OK;
}

static kms_err require_not_pending(struct kms_keystore *ks, const struct kms_key_row *r)
{
    char text[KMS_UUID_TEXT_LEN + 1];
    kms_uuid_format(r->id, text);
    KMS_ENSURE(r->state == KMS_STORE_ENABLED || r->state == KMS_STORE_DISABLED,
               KMS_ERR_INVALID_STATE, "%skey/%s is pending deletion.", ks->arn_prefix, text);
    return KMS_OK;
}

static kms_err set_enabled(struct kms_keystore *ks, struct kms_tx *tx, struct kms_key_row *r,
                           void *arg)
{
    (void)tx;
    KMS_GUARD(require_not_pending(ks, r));
    r->state = *(int *)arg ? KMS_STORE_ENABLED : KMS_STORE_DISABLED;
    return KMS_OK;
}

kms_err kms_keystore_enable(struct kms_keystore *ks, const char *ref, int enable)
{
    uint8_t id[KMS_UUID_LEN];
    return change_ref(ks, ref, enable ? "EnableKey" : "DisableKey", set_enabled, &enable, id);
}

static kms_err set_policy(struct kms_keystore *ks, struct kms_tx *tx, struct kms_key_row *r,
                          void *arg)
{
    (void)tx;
    KMS_GUARD(require_not_pending(ks, r));
    char *p = strdup(arg);
    KMS_ENSURE(p != NULL, KMS_ERR_INTERNAL, "out of memory");
    free(r->policy);
    r->policy = p;
    return KMS_OK;
}

kms_err kms_keystore_put_policy(struct kms_keystore *ks, const char *ref, const char *policy)
{
    uint8_t id[KMS_UUID_LEN];
    return change_ref(ks, ref, "PutKeyPolicy", set_policy, (void *)policy, id);
}

static kms_err check_days(long days, unsigned min, unsigned max, const char *member)
{
    KMS_ENSURE(days >= (long)min && days <= (long)max, KMS_ERR_VALIDATION,
               "1 validation error detected: Value '%ld' at '%s' failed to satisfy constraint: "
               "Member must have value between %u and %u",
               days, member, min, max);
    return KMS_OK;
}

static kms_err schedule(struct kms_keystore *ks, struct kms_tx *tx, struct kms_key_row *r,
                        void *arg)
{
    (void)tx;
    KMS_GUARD(require_not_pending(ks, r));
    r->state = KMS_STORE_PENDING;
    r->deletion_date = *(int64_t *)arg;
    return KMS_OK;
}

kms_err kms_keystore_schedule_deletion(struct kms_keystore *ks, const char *ref, long days,
                                       struct kms_key_info *out)
{
    uint8_t id[KMS_UUID_LEN];
    if (days == 0)
        days = (long)ks->cfg.pending_max_days;
    KMS_GUARD(check_days(days, ks->cfg.pending_min_days, ks->cfg.pending_max_days,
                         "pendingWindowInDays"));
    int64_t date = kms_now() + (int64_t)days * ks->cfg.day_seconds;
    KMS_GUARD(change_ref(ks, ref, "ScheduleKeyDeletion", schedule, &date, id));
    return describe_id(ks, id, out);
}

static kms_err cancel(struct kms_keystore *ks, struct kms_tx *tx, struct kms_key_row *r, void *arg)
{
    char text[KMS_UUID_TEXT_LEN + 1];
    (void)tx;
    (void)arg;
    kms_uuid_format(r->id, text);
    KMS_ENSURE(r->state == KMS_STORE_PENDING, KMS_ERR_INVALID_STATE,
               "%skey/%s is not pending deletion.", ks->arn_prefix, text);
    r->state = KMS_STORE_DISABLED;
    r->deletion_date = 0;
    return KMS_OK;
}

kms_err kms_keystore_cancel_deletion(struct kms_keystore *ks, const char *ref,
                                     struct kms_key_info *out)
{
    uint8_t id[KMS_UUID_LEN];
    KMS_GUARD(change_ref(ks, ref, "CancelKeyDeletion", cancel, NULL, id));
    return describe_id(ks, id, out);
}

struct rotation_setting {
    long days;
    int64_t seconds;
};

static kms_err set_rotation(struct kms_keystore *ks, struct kms_tx *tx, struct kms_key_row *r,
                            void *arg)
{
    const struct rotation_setting *s = arg;
    char text[KMS_UUID_TEXT_LEN + 1];
    (void)tx;
    KMS_GUARD(require_enabled(ks, r));
    kms_uuid_format(r->id, text);
    KMS_ENSURE(!s || !r->token_resident, KMS_ERR_UNSUPPORTED,
               "%skey/%s keeps its key material in the token and cannot be rotated", ks->arn_prefix,
               text);
    KMS_GUARD(kms_rotation_spec_check(ks, r));
    if (!s) {
        r->rotation_enabled = 0;
        return KMS_OK;
    }
    if (!r->rotation_enabled || r->rotation_seconds != s->seconds)
        r->next_rotation = kms_now() + s->seconds;
    r->rotation_enabled = 1;
    r->rotation_days = s->days;
    r->rotation_seconds = s->seconds;
    return KMS_OK;
}

kms_err kms_keystore_enable_rotation(struct kms_keystore *ks, const char *ref, long days)
{
    uint8_t id[KMS_UUID_LEN];
    if (days == 0)
        days = 365;
    KMS_GUARD(check_days(days, ks->cfg.rotation_min_days, ks->cfg.rotation_max_days,
                         "rotationPeriodInDays"));
    struct rotation_setting s = {days, (int64_t)days * ks->cfg.day_seconds};
    return change_ref(ks, ref, "EnableKeyRotation", set_rotation, &s, id);
}

kms_err kms_keystore_disable_rotation(struct kms_keystore *ks, const char *ref)
{
    uint8_t id[KMS_UUID_LEN];
    return change_ref(ks, ref, "DisableKeyRotation", set_rotation, NULL, id);
}

/* ---- aliases -------------------------------------------------------------- */

kms_err kms_alias_name_check(const char *name)
{
    size_t n = strlen(name);
    KMS_ENSURE(n >= 7 && n <= KMS_ALIAS_MAX && strncmp(name, "alias/", 6) == 0, KMS_ERR_VALIDATION,
               "AliasName must begin with 'alias/' and be at most 256 characters");
    KMS_ENSURE(strncmp(name, "alias/aws/", 10) != 0, KMS_ERR_INVALID_ALIAS,
               "Alias names beginning with 'alias/aws/' are reserved");
    for (size_t i = 0; i < n; i++) {
        char c = name[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == ':' || c == '/' || c == '_' || c == '-';
        KMS_ENSURE(ok, KMS_ERR_VALIDATION,
                   "AliasName must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$");
    }
    return KMS_OK;
}

/* The alias target must be a key id or key ARN, of a key not pending deletion. */
static kms_err alias_target(struct kms_keystore *ks, const char *ref, uint8_t out[KMS_UUID_LEN])
{
    struct key *k;
    KMS_GUARD(kms_resolve(ks, ref, 0, &k));
    pthread_mutex_lock(&ks->lock);
    kms_err rc = k->row.state == KMS_STORE_PENDING
                     ? KMS_FAIL(KMS_ERR_INVALID_STATE, "%skey/%s is pending deletion.",
                                ks->arn_prefix, k->id_text)
                     : KMS_OK;
    memcpy(out, k->id, KMS_UUID_LEN);
    pthread_mutex_unlock(&ks->lock);
    kms_key_put(ks, k);
    return rc;
}

enum { ALIAS_CREATE, ALIAS_UPDATE, ALIAS_DELETE };

/* The alias still names from (when given), read under the write lock; else *moved. */
static kms_err alias_still_names(struct kms_keystore *ks, struct kms_tx *tx, const char *name,
                                 const uint8_t *from, int *moved)
{
    struct kms_alias_row now;
    if (!from)
        return KMS_OK;
    KMS_GUARD(kms_store_alias_get(tx, name, &now));
    *moved = memcmp(now.target, from, KMS_UUID_LEN) != 0;
    KMS_ENSURE(!*moved, KMS_ERR_INVALID_STATE,
               "The alias %s%s was changed by another request while this one was authorized",
               ks->arn_prefix, name);
    return KMS_OK;
}

static kms_err alias_change(struct kms_keystore *ks, const char *name, int what,
                            const uint8_t target[KMS_UUID_LEN], const uint8_t *from, int *moved)
{
    struct kms_alias_row a;
    memset(&a, 0, sizeof a);
    struct kms_key_row key = {0};
    struct kms_tx *tx;
    int64_t now = kms_now();
    struct kms_change_event e;
    static const char *const ops[] = {"CreateAlias", "UpdateAlias", "DeleteAlias"};

    snprintf(a.name, sizeof a.name, "%s", name);
    kms_change_event_init(ks, &e, ops[what], 0, target, name);
    pthread_mutex_lock(&ks->change);
    kms_err rc = kms_store_begin(ks->store, KMS_TX_WRITE, &tx);
    if (rc == KMS_OK) {
        /* The target is read again under the write lock: it may be going. */
        if (target) {
            rc = kms_store_key_get(tx, target, &key);
            if (rc == KMS_OK && key.state == KMS_STORE_DESTROYED)
                rc = KMS_ERR_NOT_FOUND;
            if (rc == KMS_ERR_NOT_FOUND)
                rc = KMS_FAIL(rc, "The target key does not exist");
            else if (rc == KMS_OK && key.state == KMS_STORE_PENDING)
                rc = KMS_FAIL(KMS_ERR_INVALID_STATE, "The target key is pending deletion.");
            memcpy(a.target, target, KMS_UUID_LEN);
        }
        a.created = a.updated = now;
        if (rc == KMS_OK)
            rc = alias_still_names(ks, tx, name, from, moved);
        if (rc == KMS_OK && what == ALIAS_CREATE)
            rc = kms_store_alias_insert(tx, &a);
        else if (rc == KMS_OK && what == ALIAS_UPDATE)
            rc = kms_store_alias_update(tx, &a);
        else if (rc == KMS_OK)
            rc = kms_store_alias_delete(tx, name);
        if (rc == KMS_OK)
            rc = kms_store_note_change(tx, KMS_CHANGE_ALIAS, NULL, name);
        if (rc == KMS_OK)
            rc = kms_change_commit(ks, tx, &e);
        kms_store_rollback(tx);
    }
    pthread_mutex_unlock(&ks->change);
    kms_key_row_clear(&key);
    kms_cache_alias_changed(ks, name);
    if (rc == KMS_ERR_ALREADY_EXISTS)
        return KMS_FAIL(rc, "An alias with the name %s%s already exists", ks->arn_prefix, name);
    if (rc == KMS_ERR_NOT_FOUND && what != ALIAS_CREATE && kms_err_message()[0] == '\0')
        return alias_missing(ks, name);
    return rc;
}

kms_err kms_keystore_create_alias(struct kms_keystore *ks, const char *name, const char *target_ref)
{
    uint8_t target[KMS_UUID_LEN];
    KMS_GUARD(kms_alias_name_check(name));
    KMS_GUARD(alias_target(ks, target_ref, target));
    return alias_change(ks, name, ALIAS_CREATE, target, NULL, NULL);
}

kms_err kms_keystore_update_alias(struct kms_keystore *ks, const char *name, const char *target_ref,
                                  const uint8_t *from, int *moved)
{
    uint8_t target[KMS_UUID_LEN];
    if (moved)
        *moved = 0;
    KMS_ENSURE(!from || moved, KMS_ERR_INTERNAL, "kms_keystore_update_alias: from without moved");
    KMS_GUARD(kms_alias_name_check(name));
    KMS_GUARD(alias_target(ks, target_ref, target));
    kms_err_clear();
    return alias_change(ks, name, ALIAS_UPDATE, target, from, moved);
}

kms_err kms_keystore_delete_alias(struct kms_keystore *ks, const char *name, const uint8_t *from,
                                  int *moved)
{
    if (moved)
        *moved = 0;
    KMS_ENSURE(!from || moved, KMS_ERR_INTERNAL, "kms_keystore_delete_alias: from without moved");
    KMS_GUARD(kms_alias_name_check(name));
    kms_err_clear();
    return alias_change(ks, name, ALIAS_DELETE, NULL, from, moved);
}

struct list_aliases {
    struct kms_keystore *ks;
    struct kms_alias_info *out;
    size_t *n;
};

static kms_err alias_one(void *arg, const struct kms_alias_row *r)
{
    struct list_aliases *l = arg;
    struct kms_alias_info *o = &l->out[(*l->n)++];
    snprintf(o->name, sizeof o->name, "%s", r->name);
    snprintf(o->arn, sizeof o->arn, "%s%s", l->ks->arn_prefix, r->name);
    kms_uuid_format(r->target, o->target_id);
    o->created = r->created;
    o->updated = r->updated;
    return KMS_OK;
}

kms_err kms_keystore_list_aliases(struct kms_keystore *ks, const char *key_ref, const char *marker,
                                  size_t limit, struct kms_alias_info *out, size_t *n)
{
    uint8_t only[KMS_UUID_LEN];
    struct kms_tx *tx;
    struct list_aliases l = {ks, out, n};

    *n = 0;
    if (key_ref) {
        struct key *k;
        KMS_GUARD(kms_resolve(ks, key_ref, 0, &k));
        memcpy(only, k->id, KMS_UUID_LEN);
        kms_key_put(ks, k);
    }
    KMS_GUARD(kms_store_begin(ks->store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_aliases_list(tx, marker, key_ref ? only : NULL, limit, alias_one, &l);
    if (rc == KMS_OK)
        rc = kms_store_commit(tx);
    kms_store_rollback(tx);
    return rc;
}

kms_err kms_keystore_random(struct kms_keystore *ks, uint8_t *out, size_t n)
{
    struct kms_session *s;
    KMS_GUARD(kms_hsm_acquire(ks->hsm, &s));
    kms_err rc = kms_hsm_random(s, out, n);
    kms_hsm_release(s);
    return rc;
}
