#include "config.h"

#include "keystore/internal.h"

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/digest.h"
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
    c->full_refresh_seconds = 60;
    c->orphan_grace_seconds = 600;
}

const char *kms_key_state_name(enum kms_key_state s)
{
    switch (s) {
    case KMS_KEY_ENABLED: return KMS_STATE_ENABLED;
    case KMS_KEY_DISABLED: return KMS_STATE_DISABLED;
    case KMS_KEY_PENDING_DELETION: return KMS_STATE_PENDING;
    }
    return "Unavailable";
}

static void key_free(struct kms_keystore *ks, struct key *k)
{
    if (!k)
        return;
    if (k->policy && ks->cfg.free_policy)
        ks->cfg.free_policy(k->policy);
    free(k->policy_text);
    free(k->description);
    free(k->versions);
    free(k->history);
    free(k->history_signature);
    free(k->signature);
    free(k);
}

static void alias_free(struct alias *a)
{
    if (!a)
        return;
    free(a->name);
    free(a->signature);
    free(a);
}

/* ---- index ---------------------------------------------------------------- */

static size_t key_position(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], int *found)
{
    size_t lo = 0, hi = ks->nkeys;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = memcmp(ks->keys[mid]->id, id, KMS_UUID_LEN);
        if (c == 0) {
            *found = 1;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = 0;
    return lo;
}

struct key *kms_key_any_locked(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    int found;
    size_t i = key_position(ks, id, &found);
    return found ? ks->keys[i] : NULL;
}

struct key *kms_key_find_locked(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    struct key *k = kms_key_any_locked(ks, id);
    return k && !k->destroyed ? k : NULL;
}

static size_t alias_position(struct kms_keystore *ks, const char *name, int *found)
{
    size_t lo = 0, hi = ks->naliases;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(ks->aliases[mid]->name, name);
        if (c == 0) {
            *found = 1;
            return mid;
        }
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    *found = 0;
    return lo;
}

struct alias *kms_alias_find_locked(struct kms_keystore *ks, const char *name)
{
    int found;
    size_t i = alias_position(ks, name, &found);
    return found ? ks->aliases[i] : NULL;
}

static kms_err grow(void **arr, size_t *cap, size_t need, size_t size)
{
    if (need <= *cap)
        return KMS_OK;
    size_t ncap = *cap ? *cap * 2 : 64;
    while (ncap < need)
        ncap *= 2;
    void *p = realloc(*arr, ncap * size);
    KMS_ENSURE(p != NULL, KMS_ERR_INTERNAL, "out of memory");
    *arr = p;
    *cap = ncap;
    return KMS_OK;
}

static json_int_t int_of(const json_t *o, const char *name)
{
    return json_integer_value(json_object_get(o, name));
}

/* An index entry from a key's view. */
static kms_err key_from_view(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                             const struct kms_view *view, const char *signature, struct key **out)
{
    const json_t *s = view->state, *versions = json_object_get(s, "versions"), *v;
    const char *state = json_string_value(json_object_get(s, "state"));
    const char *description = json_string_value(json_object_get(s, "description"));
    struct key *k = calloc(1, sizeof *k);
    size_t i;

    KMS_ENSURE(k != NULL, KMS_ERR_INTERNAL, "out of memory");
    memcpy(k->id, id, KMS_UUID_LEN);
    kms_uuid_format(id, k->id_text);
    k->gen = view->gen;
    k->created = int_of(s, "created");
    k->description = strdup(description ? description : "");
    k->signature = strdup(signature ? signature : "");
    k->nversions = json_array_size(versions);
    k->versions = calloc(k->nversions + 1, sizeof *k->versions);
    const char *policy = json_string_value(json_object_get(s, "policy"));
    if (!policy)
        policy = ks->cfg.default_policy;
    k->policy_text = strdup(policy ? policy : "");
    if (!k->description || !k->signature || !k->versions || !state || !k->policy_text) {
        kms_err rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory or malformed key %s", k->id_text);
        key_free(ks, k);
        return rc;
    }
    if (strcmp(state, KMS_STATE_ENABLED) == 0)
        k->state = KMS_KEY_ENABLED;
    else if (strcmp(state, KMS_STATE_DISABLED) == 0)
        k->state = KMS_KEY_DISABLED;
    else
        k->state = KMS_KEY_PENDING_DELETION;
    k->destroyed = strcmp(state, KMS_STATE_DESTROYED) == 0;
    k->deletion_date = int_of(s, "deletion_date");
    k->rotation_enabled = json_is_true(json_object_get(s, "rotation_enabled"));
    k->rotation_days = int_of(s, "rotation_period_days");
    k->next_rotation = int_of(s, "next_rotation");
    k->current = (uint32_t)int_of(s, "current");
    k->archived_n = (uint32_t)int_of(s, "archived_n");
    k->nrecord = k->nversions;
    json_array_foreach(versions, i, v)
    {
        kms_version_from_json(v, &k->versions[i]);
    }
    *out = k;
    return KMS_OK;
}

void kms_version_from_json(const json_t *v, struct version *ver)
{
    const char *rot = json_string_value(json_object_get(v, "rotation"));
    ver->vid = (uint32_t)int_of(v, "vid");
    ver->n = (uint32_t)int_of(v, "n");
    ver->created = int_of(v, "created");
    ver->reserved = (uint64_t)int_of(v, "reserved");
    ver->bound = (uint64_t)int_of(v, "bound");
    ver->listed = json_is_true(json_object_get(v, "listed"));
    ver->on_demand = rot && strcmp(rot, "ON_DEMAND") == 0;
    ver->handle = CK_INVALID_HANDLE;
}

static const struct version *version_in(const struct version *v, size_t n, uint32_t vid)
{
    for (size_t i = 0; i < n; i++)
        if (v[i].vid == vid)
            return &v[i];
    return NULL;
}

/*
 * k->versions becomes the record's versions followed by the history
 * versions the record does not name, each keeping a handle found before.
 */
static kms_err merge_history(struct key *k)
{
    struct version *v = calloc(k->nrecord + k->nhistory + 1, sizeof *v);
    size_t n = k->nrecord;
    KMS_ENSURE(v != NULL, KMS_ERR_INTERNAL, "out of memory");
    memcpy(v, k->versions, k->nrecord * sizeof *v);
    for (size_t i = 0; i < k->nhistory; i++) {
        if (version_in(v, n, k->history[i].vid))
            continue;
        const struct version *had = version_in(k->versions, k->nversions, k->history[i].vid);
        v[n] = k->history[i];
        v[n++].handle = had ? had->handle : CK_INVALID_HANDLE;
    }
    free(k->versions);
    k->versions = v;
    k->nversions = n;
    return KMS_OK;
}

kms_err kms_index_key_history(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                              struct version *h, size_t n, uint32_t upto, const char *signature)
{
    char *sig = strdup(signature);
    kms_err rc = KMS_OK;

    pthread_rwlock_wrlock(&ks->rw);
    struct key *k = kms_key_any_locked(ks, id);
    if (k && sig) {
        free(k->history);
        free(k->history_signature);
        k->history = h;
        k->nhistory = n;
        k->history_n = upto;
        k->history_signature = sig;
        h = NULL;
        sig = NULL;
        rc = merge_history(k);
    }
    pthread_rwlock_unlock(&ks->rw);
    free(h);
    free(sig);
    return rc;
}

static struct usage *usage_new(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    struct usage *u = calloc(1, sizeof *u);
    if (!u)
        return NULL;
    pthread_mutex_init(&u->lock, NULL);
    memcpy(u->id, id, KMS_UUID_LEN);
    u->block = ks->cfg.usage_block;
    u->next_all = ks->usages;
    ks->usages = u;
    return u;
}

kms_err kms_index_key_view(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                           const struct kms_view *view, const char *signature)
{
    struct key *k = NULL;
    int found;

    if (!view->state) {
        kms_index_remove_key(ks, id);
        return KMS_OK;
    }
    KMS_GUARD(key_from_view(ks, id, view, signature, &k));
    if (ks->cfg.compile_policy && *k->policy_text &&
        ks->cfg.compile_policy(ks->cfg.policy_arg, k->policy_text, strlen(k->policy_text),
                               &k->policy) != KMS_OK) {
        /* Fail closed: a key whose policy does not compile allows nothing. */
        kms_warn("key %s: its policy does not compile (%s); it allows nothing", k->id_text,
                 kms_err_message());
        kms_err_clear();
        k->policy = NULL;
    }
    pthread_rwlock_wrlock(&ks->rw);
    size_t i = key_position(ks, id, &found);
    if (found) {
        struct key *old = ks->keys[i];
        if (old->gen > k->gen) {
            /* A slower reader's older view: keep what we have. */
            pthread_rwlock_unlock(&ks->rw);
            key_free(ks, k);
            return KMS_OK;
        }
        k->usage = old->usage;
        k->purged = old->destroyed && k->destroyed && old->purged;
        k->history = old->history;
        k->nhistory = old->nhistory;
        k->history_n = old->history_n;
        k->history_signature = old->history_signature;
        old->history = NULL;
        old->history_signature = NULL;
        if (merge_history(k) != KMS_OK) {
            pthread_rwlock_unlock(&ks->rw);
            key_free(ks, k);
            return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        }
        for (size_t a = 0; a < k->nversions; a++)
            for (size_t b = 0; b < old->nversions; b++)
                if (k->versions[a].vid == old->versions[b].vid &&
                    old->versions[b].handle != KEK_MISSING)
                    k->versions[a].handle = old->versions[b].handle;
        ks->keys[i] = k;
        key_free(ks, old);
    } else if (grow((void **)&ks->keys, &ks->capkeys, ks->nkeys + 1, sizeof *ks->keys) != KMS_OK ||
               !(k->usage = usage_new(ks, id))) {
        pthread_rwlock_unlock(&ks->rw);
        key_free(ks, k);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    } else {
        memmove(&ks->keys[i + 1], &ks->keys[i], (ks->nkeys - i) * sizeof *ks->keys);
        ks->keys[i] = k;
        ks->nkeys++;
    }
    pthread_rwlock_unlock(&ks->rw);
    return KMS_OK;
}

void kms_index_remove_key(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    int found;
    pthread_rwlock_wrlock(&ks->rw);
    size_t i = key_position(ks, id, &found);
    if (found) {
        key_free(ks, ks->keys[i]);
        memmove(&ks->keys[i], &ks->keys[i + 1], (ks->nkeys - i - 1) * sizeof *ks->keys);
        ks->nkeys--;
    }
    pthread_rwlock_unlock(&ks->rw);
}

kms_err kms_index_alias_view(struct kms_keystore *ks, const char *name, const struct kms_view *view,
                             const char *signature)
{
    struct alias *a;
    const char *target;
    int found;

    if (!view->state) {
        kms_index_remove_alias(ks, name);
        return KMS_OK;
    }
    a = calloc(1, sizeof *a);
    KMS_ENSURE(a != NULL, KMS_ERR_INTERNAL, "out of memory");
    a->name = strdup(name);
    a->signature = strdup(signature ? signature : "");
    target = json_string_value(json_object_get(view->state, "target"));
    a->live = target && *target && kms_uuid_parse(target, strlen(target), a->target) == KMS_OK;
    a->created = int_of(view->state, "created");
    a->updated = int_of(view->state, "updated");
    a->gen = view->gen;
    kms_err_clear();
    if (!a->name || !a->signature) {
        alias_free(a);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    pthread_rwlock_wrlock(&ks->rw);
    size_t i = alias_position(ks, name, &found);
    if (found) {
        if (ks->aliases[i]->gen > a->gen) {
            alias_free(a);
        } else {
            alias_free(ks->aliases[i]);
            ks->aliases[i] = a;
        }
    } else if (grow((void **)&ks->aliases, &ks->capaliases, ks->naliases + 1,
                    sizeof *ks->aliases) != KMS_OK) {
        pthread_rwlock_unlock(&ks->rw);
        alias_free(a);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    } else {
        memmove(&ks->aliases[i + 1], &ks->aliases[i], (ks->naliases - i) * sizeof *ks->aliases);
        ks->aliases[i] = a;
        ks->naliases++;
    }
    pthread_rwlock_unlock(&ks->rw);
    return KMS_OK;
}

void kms_index_remove_alias(struct kms_keystore *ks, const char *name)
{
    int found;
    pthread_rwlock_wrlock(&ks->rw);
    size_t i = alias_position(ks, name, &found);
    if (found) {
        alias_free(ks->aliases[i]);
        memmove(&ks->aliases[i], &ks->aliases[i + 1], (ks->naliases - i - 1) * sizeof *ks->aliases);
        ks->naliases--;
    }
    pthread_rwlock_unlock(&ks->rw);
}

void kms_oid_of(const char *domain, const void *name, size_t n, uint8_t oid[KMS_OID_LEN])
{
    uint8_t md[32];
    unsigned len = 0;
    EVP_MD_CTX *c = EVP_MD_CTX_new();
    if (c && EVP_DigestInit_ex(c, kms_md_sha256(), NULL) == 1 &&
        EVP_DigestUpdate(c, domain, strlen(domain)) == 1 && EVP_DigestUpdate(c, "\n", 1) == 1 &&
        EVP_DigestUpdate(c, name, n) == 1 && EVP_DigestFinal_ex(c, md, &len) == 1)
        memcpy(oid, md, KMS_OID_LEN);
    else
        memset(oid, 0xff, KMS_OID_LEN);
    EVP_MD_CTX_free(c);
}

void kms_alias_oid(const char *name, uint8_t oid[KMS_OID_LEN])
{
    kms_oid_of("p11kms alias", name, strlen(name), oid);
}

/* ---- open and close ------------------------------------------------------- */

kms_err kms_keystore_open(struct kms_hsm *hsm, const struct kms_keystore_config *cfg,
                          struct kms_keystore **out)
{
    struct kms_keystore *ks = calloc(1, sizeof *ks);
    struct kms_session *s;
    pthread_condattr_t ca;
    kms_err rc;

    KMS_ENSURE(ks != NULL, KMS_ERR_INTERNAL, "out of memory");
    ks->hsm = hsm;
    ks->cfg = *cfg;
    snprintf(ks->region, sizeof ks->region, "%s", cfg->region);
    snprintf(ks->account, sizeof ks->account, "%s", cfg->account);
    ks->cfg.region = ks->region;
    ks->cfg.account = ks->account;
    if (ks->cfg.usage_block > ks->cfg.usage_bound)
        ks->cfg.usage_block = ks->cfg.usage_bound;
    snprintf(ks->arn_prefix, sizeof ks->arn_prefix, "arn:aws:kms:%s:%s:", ks->region, ks->account);
    pthread_rwlock_init(&ks->rw, NULL);
    pthread_mutex_init(&ks->write, NULL);
    pthread_mutex_init(&ks->refresh_one, NULL);
    pthread_mutex_init(&ks->stop_lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&ks->stop_cond, &ca);
    pthread_condattr_destroy(&ca);

    rc = kms_hsm_acquire(hsm, &s);
    if (rc == KMS_OK) {
        rc = kms_refresh_all(ks, s, 1); /* finds the change markers too */
        kms_hsm_release(s);
    }
    if (rc != KMS_OK) {
        kms_keystore_close(ks);
        return rc;
    }
    *out = ks;
    return KMS_OK;
}

void kms_keystore_close(struct kms_keystore *ks)
{
    if (!ks)
        return;
    kms_keystore_stop(ks);
    for (size_t i = 0; i < ks->nkeys; i++)
        key_free(ks, ks->keys[i]);
    for (size_t i = 0; i < ks->naliases; i++)
        alias_free(ks->aliases[i]);
    while (ks->usages) {
        struct usage *u = ks->usages;
        ks->usages = u->next_all;
        pthread_mutex_destroy(&u->lock);
        free(u);
    }
    for (size_t i = 0; i < ks->nmarkers; i++)
        free(ks->marker_labels[i]);
    free(ks->markers);
    free(ks->marker_labels);
    free(ks->keys);
    free(ks->aliases);
    pthread_rwlock_destroy(&ks->rw);
    pthread_mutex_destroy(&ks->write);
    pthread_mutex_destroy(&ks->refresh_one);
    pthread_mutex_destroy(&ks->stop_lock);
    pthread_cond_destroy(&ks->stop_cond);
    free(ks);
}

size_t kms_keystore_count(struct kms_keystore *ks)
{
    size_t n = 0;
    pthread_rwlock_rdlock(&ks->rw);
    for (size_t i = 0; i < ks->nkeys; i++)
        n += !ks->keys[i]->destroyed;
    pthread_rwlock_unlock(&ks->rw);
    return n;
}

/* ---- lookups -------------------------------------------------------------- */

kms_err kms_keystore_survey(struct kms_keystore *ks, size_t *keys, size_t *versions,
                            kms_err (*fn)(void *arg, const struct kms_version_usage *u), void *arg)
{
    kms_err rc = KMS_OK;
    *keys = *versions = 0;
    pthread_rwlock_rdlock(&ks->rw);
    for (size_t i = 0; i < ks->nkeys && rc == KMS_OK; i++) {
        const struct key *k = ks->keys[i];
        if (k->destroyed)
            continue;
        (*keys)++;
        *versions += k->nversions;
        for (size_t j = 0; fn && j < k->nversions && rc == KMS_OK; j++)
            if (k->versions[j].vid == k->current && k->state == KMS_KEY_ENABLED) {
                struct kms_version_usage u = {k->id_text, k->current, k->versions[j].reserved,
                                              k->versions[j].bound};
                rc = fn(arg, &u);
            }
    }
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

void kms_key_info_clear(struct kms_key_info *info)
{
    free(info->description);
    memset(info, 0, sizeof *info);
}

kms_err kms_info_copy_locked(struct kms_keystore *ks, const struct key *k, struct kms_key_info *out)
{
    kms_key_info_clear(out);
    memcpy(out->id, k->id, KMS_UUID_LEN);
    memcpy(out->id_text, k->id_text, sizeof out->id_text);
    snprintf(out->arn, sizeof out->arn, "%skey/%s", ks->arn_prefix, k->id_text);
    out->created = k->created;
    out->state = k->state;
    out->current_version = k->current;
    out->deletion_date = k->deletion_date;
    out->rotation_enabled = k->rotation_enabled;
    out->rotation_period_days = k->rotation_days;
    out->next_rotation = k->next_rotation;
    out->description = strdup(k->description ? k->description : "");
    KMS_ENSURE(out->description != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

kms_err kms_resolve_locked(struct kms_keystore *ks, const char *ref, int allow_alias,
                           struct key **out)
{
    uint8_t id[KMS_UUID_LEN];
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
        KMS_ENSURE(allow_alias, KMS_ERR_NOT_FOUND, "Key '%.256s' does not exist", ref);
        struct alias *a = kms_alias_find_locked(ks, rest);
        KMS_ENSURE(a && a->live, KMS_ERR_NOT_FOUND, "Alias '%s%.256s' is not found.",
                   ks->arn_prefix, rest);
        *out = kms_key_find_locked(ks, a->target);
        KMS_ENSURE(*out != NULL, KMS_ERR_NOT_FOUND, "Alias '%s%.256s' is not found.",
                   ks->arn_prefix, rest);
        return KMS_OK;
    }
    if (kms_uuid_parse(rest, strlen(rest), id) != KMS_OK)
        return KMS_FAIL(KMS_ERR_NOT_FOUND, "Invalid keyId '%.256s'", ref);
    *out = kms_key_find_locked(ks, id);
    KMS_ENSURE(*out != NULL, KMS_ERR_NOT_FOUND, "Key '%skey/%.36s' does not exist", ks->arn_prefix,
               rest);
    return KMS_OK;
}

/* Resolves ref to a key id (copied out) under the read lock. */
static kms_err resolve_id(struct kms_keystore *ks, const char *ref, int allow_alias,
                          uint8_t id[KMS_UUID_LEN])
{
    struct key *k;
    pthread_rwlock_rdlock(&ks->rw);
    kms_err rc = kms_resolve_locked(ks, ref, allow_alias, &k);
    if (rc == KMS_OK)
        memcpy(id, k->id, KMS_UUID_LEN);
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

static kms_err describe_id(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                           struct kms_key_info *out)
{
    pthread_rwlock_rdlock(&ks->rw);
    struct key *k = kms_key_find_locked(ks, id);
    kms_err rc = k ? kms_info_copy_locked(ks, k, out)
                   : KMS_FAIL(KMS_ERR_NOT_FOUND, "The key no longer exists");
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

kms_err kms_keystore_describe(struct kms_keystore *ks, const char *ref, struct kms_key_info *out)
{
    struct key *k;
    pthread_rwlock_rdlock(&ks->rw);
    kms_err rc = kms_resolve_locked(ks, ref, 1, &k);
    if (rc == KMS_OK)
        rc = kms_info_copy_locked(ks, k, out);
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

kms_err kms_keystore_list_keys(struct kms_keystore *ks, const char *marker, size_t limit,
                               struct kms_key_info *ids, size_t *n)
{
    size_t start = 0;
    kms_err rc = KMS_OK;

    *n = 0;
    pthread_rwlock_rdlock(&ks->rw);
    if (marker) {
        uint8_t id[KMS_UUID_LEN];
        int found;
        rc = kms_uuid_parse(marker, strlen(marker), id);
        if (rc != KMS_OK)
            rc = KMS_FAIL(KMS_ERR_VALIDATION, "Marker is not valid");
        else
            start = key_position(ks, id, &found);
    }
    for (size_t i = start; rc == KMS_OK && i < ks->nkeys && *n < limit; i++) {
        if (ks->keys[i]->destroyed)
            continue;
        memset(&ids[*n], 0, sizeof ids[*n]);
        rc = kms_info_copy_locked(ks, ks->keys[i], &ids[*n]);
        if (rc == KMS_OK)
            (*n)++;
    }
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

/* ---- changes -------------------------------------------------------------- */

kms_err kms_key_change(struct kms_keystore *ks, struct kms_session *s,
                       const uint8_t id[KMS_UUID_LEN], const json_t *op)
{
    char name[KMS_UUID_TEXT_LEN + 1];
    struct kms_view view = {0};
    kms_uuid_format(id, name);
    KMS_GUARD(kms_record_change(s, &kms_key_kind, name, id, op, &view));
    /* The index learns the new view now; other nodes at their next poll. */
    kms_err rc = kms_index_key_view(ks, id, &view, NULL);
    kms_view_clear(&view);
    kms_marker_touch(ks, s);
    return rc;
}

/* One change to a key named by ref, serialised with this node's other changes. */
static kms_err change_ref(struct kms_keystore *ks, const char *ref, json_t *op,
                          uint8_t id_out[KMS_UUID_LEN])
{
    struct kms_session *s;
    uint8_t id[KMS_UUID_LEN];
    kms_err rc;

    if (!op)
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    rc = resolve_id(ks, ref, 1, id);
    if (rc == KMS_OK)
        rc = kms_hsm_acquire(ks->hsm, &s);
    if (rc == KMS_OK) {
        pthread_mutex_lock(&ks->write);
        rc = kms_key_change(ks, s, id, op);
        pthread_mutex_unlock(&ks->write);
        kms_hsm_release(s);
    }
    if (rc == KMS_OK && id_out)
        memcpy(id_out, id, KMS_UUID_LEN);
    json_decref(op);
    return rc;
}

void kms_kek_id(const uint8_t id[KMS_UUID_LEN], uint32_t vid, uint8_t out[KEK_ID_LEN])
{
    memcpy(out, id, KMS_UUID_LEN);
    out[16] = (uint8_t)(vid >> 24);
    out[17] = (uint8_t)(vid >> 16);
    out[18] = (uint8_t)(vid >> 8);
    out[19] = (uint8_t)vid;
}

/* A random version id no version of this key has. */
static kms_err new_vid(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], uint32_t *out)
{
    for (int tries = 0; tries < 16; tries++) {
        uint32_t v;
        int taken = 0;
        KMS_ENSURE(RAND_bytes((uint8_t *)&v, sizeof v) == 1, KMS_ERR_INTERNAL,
                   "random generator failed");
        if (v == 0)
            continue;
        pthread_rwlock_rdlock(&ks->rw);
        struct key *k = kms_key_find_locked(ks, id);
        for (size_t i = 0; k && i < k->nversions; i++)
            taken |= k->versions[i].vid == v;
        pthread_rwlock_unlock(&ks->rw);
        if (!taken) {
            *out = v;
            return KMS_OK;
        }
    }
    return KMS_FAIL(KMS_ERR_INTERNAL, "cannot pick a version id");
}

static kms_err make_kek(struct kms_keystore *ks, struct kms_session *s,
                        const uint8_t id[KMS_UUID_LEN], uint32_t vid, CK_OBJECT_HANDLE *out)
{
    uint8_t kek_id[KEK_ID_LEN];
    char label[KEK_LABEL_MAX], text[KMS_UUID_TEXT_LEN + 1];
    kms_kek_id(id, vid, kek_id);
    kms_uuid_format(id, text);
    /* The creation time lets a sweep tell an abandoned object from one being made. */
    snprintf(label, sizeof label, "p11kms-kek:%s:%u:%lld", text, vid, (long long)kms_now());
    /*
     * Look first: SoftHSM2's file store (2.6.1) re-reads its object list only
     * when the token's generation counter differs from the last value this
     * process saw, and every object this process creates sets that value to
     * the counter on disk. Creating an object without a C_FindObjects shortly
     * before hides, from this process, every object other nodes made since its
     * last find, until one of them changes the token again. (The record paths
     * scan just before they write; a new key's first record is written right
     * after this.) A process that is the token's only user need not look.
     */
    CK_OBJECT_HANDLE existing = CK_INVALID_HANDLE;
    if (!ks->cfg.sole_user)
        KMS_GUARD(kms_kek_find(s, id, vid, &existing));
    KMS_ENSURE(existing == CK_INVALID_HANDLE, KMS_ERR_INTERNAL, "key version %u already exists",
               vid);
    return kms_hsm_generate_aes(s, kek_id, sizeof kek_id, label, out);
}

kms_err kms_key_rotate(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], const char *reason,
                       uint32_t from)
{
    struct kms_session *s;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    uint32_t vid = 0;
    json_t *op = kms_op_new("rotate");
    kms_err rc;

    KMS_ENSURE(op != NULL, KMS_ERR_INTERNAL, "out of memory");
    rc = new_vid(ks, id, &vid);
    if (rc == KMS_OK)
        rc = kms_hsm_acquire(ks->hsm, &s);
    if (rc != KMS_OK) {
        json_decref(op);
        return rc;
    }
    json_object_set_new(op, "vid", json_integer(vid));
    json_object_set_new(op, "date", json_integer(kms_now()));
    json_object_set_new(op, "reason", json_string(reason));
    json_object_set_new(op, "bound", json_integer((json_int_t)ks->cfg.usage_bound));
    json_object_set_new(op, "from", json_integer(from));
    json_object_set_new(op, "limit", json_integer(ks->cfg.max_on_demand));
    pthread_mutex_lock(&ks->write);
    /* The key object first: a record must never name a version the token lacks. */
    rc = make_kek(ks, s, id, vid, &h);
    /*
     * When the change fails, the object stays: a record written before the
     * failure may name it (unlisted), and the orphan sweep removes it once
     * no record does.
     */
    if (rc == KMS_OK)
        rc = kms_key_change(ks, s, id, op);
    if (rc == KMS_OK) {
        pthread_rwlock_wrlock(&ks->rw);
        struct key *k = kms_key_find_locked(ks, id);
        for (size_t i = 0; k && i < k->nversions; i++)
            if (k->versions[i].vid == vid)
                k->versions[i].handle = h;
        pthread_rwlock_unlock(&ks->rw);
        /* The rotation stands whatever happens here; a later one archives again. */
        if (kms_history_archive(ks, s, id) != KMS_OK) {
            kms_warn("could not move old key versions to history: %s", kms_err_message());
            kms_err_clear();
        }
    }
    pthread_mutex_unlock(&ks->write);
    kms_hsm_release(s);
    json_decref(op);
    return rc;
}

kms_err kms_keystore_create_key(struct kms_keystore *ks, const char *description,
                                const char *policy, struct kms_key_info *out)
{
    uint8_t id[KMS_UUID_LEN];
    char name[KMS_UUID_TEXT_LEN + 1];
    uint32_t vid = 0;
    struct kms_session *s;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    struct kms_view view = {0};
    json_t *op;
    kms_err rc;
    int64_t now = kms_now();
    /*
     * The first block of uses is reserved for this node in the key's first
     * record: its first wraps here need no write (one with two token
     * searches, linear in the token's objects, DESIGN §5).
     */
    uint64_t block =
        ks->cfg.usage_block < ks->cfg.usage_bound ? ks->cfg.usage_block : ks->cfg.usage_bound;

    KMS_GUARD(kms_uuid_new(id));
    KMS_GUARD(new_vid(ks, id, &vid));
    kms_uuid_format(id, name);
    op = kms_op_new("create");
    KMS_ENSURE(op != NULL, KMS_ERR_INTERNAL, "out of memory");
    json_object_set_new(
        op, "state",
        json_pack("{s:I, s:s, s:s, s:I, s:b, s:I, s:I, s:I, s:I, s:I, s:[{s:I, s:I, s:I, s:I, s:I, "
                  "s:s, s:b}]}",
                  "created", (json_int_t)now, "description", description ? description : "",
                  "state", KMS_STATE_ENABLED, "deletion_date", (json_int_t)0, "rotation_enabled", 0,
                  "rotation_period_days", (json_int_t)0, "rotation_period_seconds", (json_int_t)0,
                  "next_rotation", (json_int_t)0, "on_demand", (json_int_t)0, "current",
                  (json_int_t)vid, "versions", "vid", (json_int_t)vid, "n", (json_int_t)1,
                  "created", (json_int_t)now, "reserved", (json_int_t)block, "bound",
                  (json_int_t)ks->cfg.usage_bound, "rotation", "", "listed", 0));
    if (policy)
        json_object_set_new(json_object_get(op, "state"), "policy", json_string(policy));
    rc = kms_hsm_acquire(ks->hsm, &s);
    if (rc != KMS_OK) {
        json_decref(op);
        return rc;
    }
    pthread_mutex_lock(&ks->write);
    rc = make_kek(ks, s, id, vid, &h);
    /* A fresh random id: no other writer has records of it to settle with. */
    if (rc == KMS_OK)
        rc = kms_record_create(s, &kms_key_kind, name, id, op, &view);
    if (rc == KMS_OK) { /* on failure the object is left to the sweep */
        rc = kms_index_key_view(ks, id, &view, NULL);
        kms_marker_touch(ks, s);
    }
    kms_view_clear(&view);
    if (rc == KMS_OK) {
        struct usage *u = NULL;
        pthread_rwlock_wrlock(&ks->rw);
        struct key *k = kms_key_find_locked(ks, id);
        if (k) {
            k->versions[0].handle = h;
            u = k->usage;
        }
        rc = k ? kms_info_copy_locked(ks, k, out)
               : KMS_FAIL(KMS_ERR_INTERNAL, "the new key is not in the index");
        pthread_rwlock_unlock(&ks->rw);
        /* Usage entries live as long as the key store; take_use locks u before ks->rw. */
        if (u) {
            pthread_mutex_lock(&u->lock);
            if (u->vid == 0) {
                u->vid = vid;
                u->remaining = block;
                u->granted_at = now;
            }
            pthread_mutex_unlock(&u->lock);
        }
    }
    pthread_mutex_unlock(&ks->write);
    kms_hsm_release(s);
    json_decref(op);
    return rc;
}

kms_err kms_keystore_authorize(struct kms_keystore *ks, const char *ref, int allow_alias,
                               kms_err (*fn)(void *arg, const struct kms_key_guard *g), void *arg)
{
    struct key *k;
    char arn[KMS_ARN_MAX];
    pthread_rwlock_rdlock(&ks->rw);
    kms_err rc = kms_resolve_locked(ks, ref, allow_alias, &k);
    if (rc == KMS_OK) {
        snprintf(arn, sizeof arn, "%skey/%s", ks->arn_prefix, k->id_text);
        struct kms_key_guard g = {k->id_text, arn, k->policy};
        rc = fn(arg, &g);
    }
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

void kms_keystore_learn(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], uint32_t vid)
{
    if (kms_refresh_key(ks, id, vid) != KMS_OK)
        kms_err_clear();
}

kms_err kms_keystore_get_policy(struct kms_keystore *ks, const char *ref, char **out)
{
    struct key *k;
    pthread_rwlock_rdlock(&ks->rw);
    kms_err rc = kms_resolve_locked(ks, ref, 0, &k);
    if (rc == KMS_OK) {
        *out = strdup(k->policy_text);
        if (!*out)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

kms_err kms_keystore_put_policy(struct kms_keystore *ks, const char *ref, const char *policy)
{
    json_t *op = kms_op_new("put_policy");
    if (op)
        json_object_set_new(op, "policy", json_string(policy));
    return change_ref(ks, ref, op, NULL);
}

kms_err kms_keystore_enable(struct kms_keystore *ks, const char *ref, int enable)
{
    return change_ref(ks, ref, kms_op_new(enable ? "enable" : "disable"), NULL);
}

static kms_err check_days(long days, unsigned min, unsigned max, const char *member)
{
    KMS_ENSURE(days >= (long)min && days <= (long)max, KMS_ERR_VALIDATION,
               "1 validation error detected: Value '%ld' at '%s' failed to satisfy constraint: "
               "Member must have value between %u and %u",
               days, member, min, max);
    return KMS_OK;
}

kms_err kms_keystore_schedule_deletion(struct kms_keystore *ks, const char *ref, long days,
                                       struct kms_key_info *out)
{
    uint8_t id[KMS_UUID_LEN];
    json_t *op;
    if (days == 0)
        days = (long)ks->cfg.pending_max_days;
    KMS_GUARD(check_days(days, ks->cfg.pending_min_days, ks->cfg.pending_max_days,
                         "pendingWindowInDays"));
    op = kms_op_new("schedule_deletion");
    if (op)
        json_object_set_new(op, "deletion_date",
                            json_integer(kms_now() + (json_int_t)days * ks->cfg.day_seconds));
    KMS_GUARD(change_ref(ks, ref, op, id));
    return describe_id(ks, id, out);
}

kms_err kms_keystore_cancel_deletion(struct kms_keystore *ks, const char *ref,
                                     struct kms_key_info *out)
{
    uint8_t id[KMS_UUID_LEN];
    KMS_GUARD(change_ref(ks, ref, kms_op_new("cancel_deletion"), id));
    return describe_id(ks, id, out);
}

kms_err kms_keystore_enable_rotation(struct kms_keystore *ks, const char *ref, long days)
{
    json_t *op;
    if (days == 0)
        days = 365;
    KMS_GUARD(check_days(days, ks->cfg.rotation_min_days, ks->cfg.rotation_max_days,
                         "rotationPeriodInDays"));
    op = kms_op_new("enable_rotation");
    if (op) {
        json_object_set_new(op, "date", json_integer(kms_now()));
        json_object_set_new(op, "period_days", json_integer(days));
        json_object_set_new(op, "period_seconds",
                            json_integer((json_int_t)days * ks->cfg.day_seconds));
    }
    return change_ref(ks, ref, op, NULL);
}

kms_err kms_keystore_disable_rotation(struct kms_keystore *ks, const char *ref)
{
    return change_ref(ks, ref, kms_op_new("disable_rotation"), NULL);
}

kms_err kms_keystore_rotate_on_demand(struct kms_keystore *ks, const char *ref,
                                      struct kms_key_info *out)
{
    uint8_t id[KMS_UUID_LEN];
    struct key *k;

    pthread_rwlock_rdlock(&ks->rw);
    kms_err rc = kms_resolve_locked(ks, ref, 1, &k);
    if (rc == KMS_OK) {
        memcpy(id, k->id, KMS_UUID_LEN);
        if (k->state == KMS_KEY_DISABLED)
            rc = KMS_FAIL(KMS_ERR_DISABLED, "%skey/%s is disabled.", ks->arn_prefix, k->id_text);
        else if (k->state != KMS_KEY_ENABLED)
            rc = KMS_FAIL(KMS_ERR_INVALID_STATE, "%skey/%s is pending deletion.", ks->arn_prefix,
                          k->id_text);
    }
    pthread_rwlock_unlock(&ks->rw);
    KMS_GUARD(rc);
    KMS_GUARD(kms_key_rotate(ks, id, KMS_ROTATE_DEMAND, 0));
    return describe_id(ks, id, out);
}

kms_err kms_keystore_list_rotations(struct kms_keystore *ks, const char *ref, uint32_t marker,
                                    size_t limit, struct kms_rotation_info *out, size_t *n,
                                    struct kms_key_info *info)
{
    struct key *k;
    *n = 0;
    pthread_rwlock_rdlock(&ks->rw);
    kms_err rc = kms_resolve_locked(ks, ref, 1, &k);
    if (rc == KMS_OK)
        rc = kms_info_copy_locked(ks, k, info);
    /* Versions are kept in the order they were made; n orders them. */
    for (uint32_t want = marker ? marker : 2; rc == KMS_OK && *n < limit; want++) {
        const struct version *v = NULL;
        uint32_t next = UINT32_MAX;
        for (size_t i = 0; i < k->nversions; i++) {
            const struct version *c = &k->versions[i];
            if (c->listed && c->n >= want && c->n < next) {
                next = c->n;
                v = c;
            }
        }
        if (!v)
            break;
        out[*n].n = v->n;
        out[*n].date = v->created;
        out[*n].on_demand = v->on_demand;
        (*n)++;
        want = v->n;
    }
    pthread_rwlock_unlock(&ks->rw);
    return rc;
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
static kms_err alias_target(struct kms_keystore *ks, const char *ref,
                            char out[KMS_UUID_TEXT_LEN + 1])
{
    struct key *k;
    pthread_rwlock_rdlock(&ks->rw);
    kms_err rc = kms_resolve_locked(ks, ref, 0, &k);
    if (rc == KMS_OK && k->state == KMS_KEY_PENDING_DELETION)
        rc = KMS_FAIL(KMS_ERR_INVALID_STATE, "%skey/%s is pending deletion.", ks->arn_prefix,
                      k->id_text);
    if (rc == KMS_OK)
        memcpy(out, k->id_text, KMS_UUID_TEXT_LEN + 1);
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

static kms_err alias_change(struct kms_keystore *ks, const char *name, json_t *op)
{
    struct kms_session *s;
    struct kms_view view = {0};
    uint8_t oid[KMS_OID_LEN];
    kms_err rc;

    if (!op)
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    json_object_set_new(op, "date", json_integer(kms_now()));
    /* An alias of a deleted key went with it, as in AWS: the model treats it as gone. */
    pthread_rwlock_rdlock(&ks->rw);
    struct alias *a = kms_alias_find_locked(ks, name);
    struct key *dead = a && a->live ? kms_key_any_locked(ks, a->target) : NULL;
    if (dead && dead->destroyed)
        json_object_set_new(op, "dead", json_string(dead->id_text));
    pthread_rwlock_unlock(&ks->rw);
    kms_alias_oid(name, oid);
    rc = kms_hsm_acquire(ks->hsm, &s);
    if (rc == KMS_OK) {
        pthread_mutex_lock(&ks->write);
        rc = kms_record_change(s, &kms_alias_kind, name, oid, op, &view);
        if (rc == KMS_OK) {
            rc = kms_index_alias_view(ks, name, &view, NULL);
            kms_marker_touch(ks, s);
        }
        pthread_mutex_unlock(&ks->write);
        kms_hsm_release(s);
    }
    kms_view_clear(&view);
    json_decref(op);
    if (rc == KMS_ERR_ALREADY_EXISTS)
        return KMS_FAIL(rc, "An alias with the name %s%s already exists", ks->arn_prefix, name);
    if (rc == KMS_ERR_NOT_FOUND)
        return KMS_FAIL(rc, "Alias %s%s is not found.", ks->arn_prefix, name);
    return rc;
}

kms_err kms_keystore_create_alias(struct kms_keystore *ks, const char *name, const char *target_ref)
{
    char target[KMS_UUID_TEXT_LEN + 1];
    KMS_GUARD(kms_alias_name_check(name));
    KMS_GUARD(alias_target(ks, target_ref, target));
    json_t *op = kms_op_new("create");
    if (op)
        json_object_set_new(op, "target", json_string(target));
    return alias_change(ks, name, op);
}

kms_err kms_keystore_update_alias(struct kms_keystore *ks, const char *name, const char *target_ref)
{
    char target[KMS_UUID_TEXT_LEN + 1];
    KMS_GUARD(kms_alias_name_check(name));
    KMS_GUARD(alias_target(ks, target_ref, target));
    json_t *op = kms_op_new("update");
    if (op)
        json_object_set_new(op, "target", json_string(target));
    return alias_change(ks, name, op);
}

kms_err kms_keystore_delete_alias(struct kms_keystore *ks, const char *name)
{
    KMS_GUARD(kms_alias_name_check(name));
    return alias_change(ks, name, kms_op_new("delete"));
}

kms_err kms_keystore_list_aliases(struct kms_keystore *ks, const char *key_ref, const char *marker,
                                  size_t limit, struct kms_alias_info *out, size_t *n)
{
    struct key *only = NULL;
    size_t i = 0;
    kms_err rc = KMS_OK;

    *n = 0;
    pthread_rwlock_rdlock(&ks->rw);
    if (key_ref)
        rc = kms_resolve_locked(ks, key_ref, 0, &only);
    if (rc == KMS_OK && marker) {
        int found;
        i = alias_position(ks, marker, &found);
    }
    for (; rc == KMS_OK && i < ks->naliases && *n < limit; i++) {
        const struct alias *a = ks->aliases[i];
        struct key *k = a->live ? kms_key_find_locked(ks, a->target) : NULL;
        if (!k || (only && k != only))
            continue;
        struct kms_alias_info *o = &out[(*n)++];
        snprintf(o->name, sizeof o->name, "%s", a->name);
        snprintf(o->arn, sizeof o->arn, "%s%s", ks->arn_prefix, a->name);
        memcpy(o->target_id, k->id_text, sizeof o->target_id);
        o->created = a->created;
        o->updated = a->updated;
    }
    pthread_rwlock_unlock(&ks->rw);
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
