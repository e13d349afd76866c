/*
 * Import of the token-only layout of releases before the database (up to
 * 0.x with generational records): every key and alias was a set of CKO_DATA
 * records (CKA_APPLICATION "p11kms", a JSON document each), old versions of
 * a key sat in "history" objects, and each version was an AES token object
 * with CKA_ID = key uuid || vid.
 *
 * Each entity's state is its newest record (highest generation, then lowest
 * nonce: the base of the old merge rule, exact for a state left by a cleanly
 * stopped server); a key's versions are those any of its records or history
 * objects name, each with the highest reservation seen. Keys become
 * token-resident (their versions stay the token objects they are, so every
 * blob ever issued still decrypts); destroyed keys become tombstones;
 * deleted aliases are left out. All of it is one transaction, marked done in
 * the database: running it again changes nothing. The old objects stay in
 * the token: the key objects are in use, the records are inert.
 */
#include "config.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "common/log.h"
#include "keystore/internal.h"

#define MIGRATED_MARK "migrated_token_layout"
#define RECORD_FORMAT 2  /* a key's or an alias's record */
#define HISTORY_FORMAT 1 /* a history object */

struct entity {
    char kind[16];
    char name[KMS_ALIAS_MAX + 1];
    json_int_t gen;
    char nonce[64];
    json_t *state;    /* the newest record's */
    json_t *versions; /* array: every version named anywhere (keys) */
};

struct import {
    struct entity *e;
    size_t n, cap;
};

static struct entity *entity_of(struct import *im, const char *kind, const char *name)
{
    for (size_t i = 0; i < im->n; i++)
        if (strcmp(im->e[i].kind, kind) == 0 && strcmp(im->e[i].name, name) == 0)
            return &im->e[i];
    if (im->n == im->cap) {
        size_t cap = im->cap ? im->cap * 2 : 64;
        struct entity *p = realloc(im->e, cap * sizeof *p);
        if (!p)
            return NULL;
        im->e = p;
        im->cap = cap;
    }
    struct entity *e = &im->e[im->n++];
    memset(e, 0, sizeof *e);
    snprintf(e->kind, sizeof e->kind, "%s", kind);
    snprintf(e->name, sizeof e->name, "%s", name);
    e->versions = json_array();
    return e->versions ? e : NULL;
}

static json_int_t int_of(const json_t *o, const char *name)
{
    return json_integer_value(json_object_get(o, name));
}

/* Adds versions to e's, keeping for each vid the highest reservation. */
static void fold_versions(struct entity *e, const json_t *versions)
{
    size_t i, j;
    json_t *v, *mine;
    json_array_foreach(versions, i, v)
    {
        json_int_t vid = int_of(v, "vid");
        int found = 0;
        if (vid <= 0)
            continue;
        json_array_foreach(e->versions, j, mine)
        {
            if (int_of(mine, "vid") != vid)
                continue;
            found = 1;
            if (int_of(v, "reserved") > int_of(mine, "reserved"))
                json_object_set_new(mine, "reserved", json_integer(int_of(v, "reserved")));
            if (json_is_true(json_object_get(v, "listed")))
                json_object_set_new(mine, "listed", json_true());
        }
        if (!found)
            json_array_append_new(e->versions, json_deep_copy(v));
    }
}

static kms_err take_document(struct import *im, const uint8_t *p, size_t n)
{
    json_t *doc = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, NULL);
    const char *kind = json_string_value(json_object_get(doc, "kind"));
    const char *name = json_string_value(json_object_get(doc, "name"));
    kms_err rc = KMS_OK;

    json_int_t format = int_of(doc, "format");
    if (!doc || !kind || !name || strlen(name) > KMS_ALIAS_MAX ||
        format != (strcmp(kind, "history") == 0 ? HISTORY_FORMAT : RECORD_FORMAT)) {
        json_decref(doc);
        return KMS_OK; /* not one of ours (a change marker, a foreign object) */
    }
    if (strcmp(kind, "history") == 0) {
        struct entity *e = entity_of(im, "key", name);
        if (e)
            fold_versions(e, json_object_get(doc, "versions"));
        else
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    } else if (strcmp(kind, "key") == 0 || strcmp(kind, "alias") == 0) {
        struct entity *e = entity_of(im, kind, name);
        json_t *state = json_object_get(doc, "state");
        json_int_t gen = int_of(doc, "gen");
        const char *nonce = json_string_value(json_object_get(doc, "nonce"));
        if (!e) {
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        } else if (json_is_object(state) && nonce) {
            if (strcmp(kind, "key") == 0)
                fold_versions(e, json_object_get(state, "versions"));
            if (gen > e->gen || (gen == e->gen && strcmp(nonce, e->nonce) < 0)) {
                json_decref(e->state);
                e->state = json_incref(state);
                e->gen = gen;
                snprintf(e->nonce, sizeof e->nonce, "%s", nonce);
            }
        }
    }
    json_decref(doc);
    return rc;
}

static void import_free(struct import *im)
{
    for (size_t i = 0; i < im->n; i++) {
        json_decref(im->e[i].state);
        json_decref(im->e[i].versions);
    }
    free(im->e);
}

/* Reads every record and history object of the old layout. */
static kms_err read_token(struct kms_hsm *hsm, struct import *im, size_t *objects)
{
    static const char application[] = "p11kms";
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_APPLICATION, (void *)application, sizeof application - 1},
    };
    CK_OBJECT_HANDLE *h = NULL;
    struct kms_session *s;
    size_t n = 0;

    KMS_GUARD(kms_hsm_acquire(hsm, &s));
    kms_err rc = kms_hsm_find(s, tmpl, 2, &h, &n);
    for (size_t i = 0; rc == KMS_OK && i < n; i++) {
        struct kms_buf value = KMS_BUF_INIT;
        rc = kms_hsm_get_bytes(s, h[i], CKA_VALUE, &value);
        if (rc == KMS_OK)
            rc = take_document(im, value.data, value.len);
        kms_buf_free(&value);
    }
    kms_hsm_release(s);
    free(h);
    *objects = n;
    return rc;
}

static int state_code(const char *s)
{
    if (!s)
        return -1;
    if (strcmp(s, "Enabled") == 0)
        return KMS_STORE_ENABLED;
    if (strcmp(s, "Disabled") == 0)
        return KMS_STORE_DISABLED;
    if (strcmp(s, "PendingDeletion") == 0)
        return KMS_STORE_PENDING;
    if (strcmp(s, "Destroyed") == 0)
        return KMS_STORE_DESTROYED;
    return -1;
}

static int version_order(const void *a, const void *b)
{
    const struct kms_version_row *x = a, *y = b;
    return x->n < y->n ? -1 : x->n > y->n;
}

static kms_err import_key(struct kms_tx *tx, const struct entity *e, size_t *versions)
{
    struct kms_key_row row = {0}, had = {0};
    const json_t *s = e->state;
    int state = state_code(json_string_value(json_object_get(s, "state")));
    kms_err rc;

    KMS_ENSURE(kms_uuid_parse(e->name, strlen(e->name), row.id) == KMS_OK && state >= 0,
               KMS_ERR_INTERNAL, "a key record of the old layout does not parse (%.64s)", e->name);
    rc = kms_store_key_get(tx, row.id, &had);
    kms_key_row_clear(&had);
    if (rc == KMS_OK)
        return KMS_OK; /* imported already */
    if (rc != KMS_ERR_NOT_FOUND)
        return rc;
    const char *description = json_string_value(json_object_get(s, "description"));
    const char *policy = json_string_value(json_object_get(s, "policy"));
    row.created = int_of(s, "created");
    row.state = state;
    row.deletion_date = int_of(s, "deletion_date");
    row.rotation_enabled = json_is_true(json_object_get(s, "rotation_enabled"));
    row.rotation_days = int_of(s, "rotation_period_days");
    row.rotation_seconds = int_of(s, "rotation_period_seconds");
    row.next_rotation = int_of(s, "next_rotation");
    row.current = (uint32_t)int_of(s, "current");
    row.on_demand = (uint32_t)int_of(s, "on_demand");
    row.token_resident = 1;
    row.description = strdup(description ? description : "");
    row.policy = policy ? strdup(policy) : NULL;
    if (!row.description || (policy && !row.policy)) {
        kms_key_row_clear(&row);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    rc = kms_store_key_insert(tx, &row);
    /* A destroyed key's material is gone: a tombstone, no versions. */
    size_t nv = state == KMS_STORE_DESTROYED ? 0 : json_array_size(e->versions);
    struct kms_version_row *v = calloc(nv + 1, sizeof *v);
    size_t kept = 0;
    if (rc == KMS_OK && !v)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; rc == KMS_OK && i < nv; i++) {
        const json_t *x = json_array_get(e->versions, i);
        const char *rot = json_string_value(json_object_get(x, "rotation"));
        json_int_t n = int_of(x, "n");
        uint32_t vid = (uint32_t)int_of(x, "vid");
        /* A rotation that lost a race was never current, so nothing was made under it. */
        if (n != 1 && !json_is_true(json_object_get(x, "listed")) && vid != row.current)
            continue;
        struct kms_version_row *r = &v[kept++];
        memcpy(r->key_id, row.id, KMS_UUID_LEN);
        r->vid = vid;
        r->n = (uint32_t)n;
        r->created = int_of(x, "created");
        /* Earlier releases wrote AUTOMATIC for a first version moved to history. */
        r->rotation = n == 1                                 ? KMS_ROTATION_NONE
                      : rot && strcmp(rot, "ON_DEMAND") == 0 ? KMS_ROTATION_ON_DEMAND
                      : rot && strcmp(rot, "AUTOMATIC") == 0 ? KMS_ROTATION_AUTOMATIC
                                                             : KMS_ROTATION_NONE;
        r->reserved = (uint64_t)int_of(x, "reserved");
        r->bound = (uint64_t)int_of(x, "bound");
        if (r->reserved > r->bound)
            r->reserved = r->bound;
        r->root = 0; /* token-resident */
    }
    if (v)
        qsort(v, kept, sizeof *v, version_order);
    for (size_t i = 0; rc == KMS_OK && i < kept; i++)
        rc = kms_store_version_insert(tx, &v[i]);
    *versions += kept;
    free(v);
    kms_key_row_clear(&row);
    return rc;
}

static kms_err import_alias(struct kms_tx *tx, const struct entity *e, int *taken)
{
    struct kms_alias_row a, had;
    memset(&a, 0, sizeof a);
    struct kms_key_row key = {0};
    const char *target = json_string_value(json_object_get(e->state, "target"));
    *taken = 0;
    if (!target || !*target || kms_uuid_parse(target, strlen(target), a.target) != KMS_OK) {
        kms_err_clear();
        return KMS_OK; /* deleted: a tombstone of the old layout */
    }
    snprintf(a.name, sizeof a.name, "%s", e->name);
    a.created = int_of(e->state, "created");
    a.updated = int_of(e->state, "updated");
    kms_err rc = kms_store_alias_get(tx, a.name, &had);
    if (rc == KMS_OK)
        return KMS_OK;
    if (rc != KMS_ERR_NOT_FOUND)
        return rc;
    rc = kms_store_key_get(tx, a.target, &key);
    int live = rc == KMS_OK && key.state != KMS_STORE_DESTROYED;
    kms_key_row_clear(&key);
    if (rc == KMS_ERR_NOT_FOUND || (rc == KMS_OK && !live))
        return KMS_OK; /* went with its key */
    KMS_GUARD(rc);
    KMS_GUARD(kms_store_alias_insert(tx, &a));
    *taken = 1;
    return KMS_OK;
}

kms_err kms_migrate_token(struct kms_hsm *hsm, struct kms_store *store,
                          const struct kms_keystore_config *cfg, int quiet)
{
    struct import im = {0};
    struct kms_tx *tx;
    char mark[64];
    size_t objects = 0, keys = 0, versions = 0, aliases = 0;
    (void)cfg;

    KMS_GUARD(kms_store_begin(store, KMS_TX_READ, &tx));
    kms_err rc = kms_store_meta_get(tx, MIGRATED_MARK, mark, sizeof mark);
    kms_store_rollback(tx);
    if (rc == KMS_OK) {
        if (!quiet)
            kms_info("the token's earlier layout was imported already (%s)", mark);
        return KMS_OK;
    }
    KMS_ENSURE(rc == KMS_ERR_NOT_FOUND, rc, "%s", kms_err_message());

    rc = read_token(hsm, &im, &objects);
    if (rc == KMS_OK)
        rc = kms_store_begin(store, KMS_TX_WRITE, &tx);
    if (rc == KMS_OK) {
        for (size_t i = 0; rc == KMS_OK && i < im.n; i++) {
            if (strcmp(im.e[i].kind, "key") == 0 && im.e[i].state) {
                rc = import_key(tx, &im.e[i], &versions);
                keys += rc == KMS_OK;
            }
        }
        for (size_t i = 0; rc == KMS_OK && i < im.n; i++) {
            int taken = 0;
            if (strcmp(im.e[i].kind, "alias") == 0 && im.e[i].state)
                rc = import_alias(tx, &im.e[i], &taken);
            aliases += taken;
        }
        char text[96];
        snprintf(text, sizeof text, "%zu keys, %zu versions, %zu aliases", keys, versions, aliases);
        if (rc == KMS_OK)
            rc = kms_store_meta_set(tx, MIGRATED_MARK, objects ? text : "none");
        if (rc == KMS_OK && keys)
            rc = kms_store_note_change(tx, KMS_CHANGE_ROOT, NULL, NULL);
        if (rc == KMS_OK)
            rc = kms_store_commit(tx);
        kms_store_rollback(tx);
        if (rc == KMS_OK && (objects || !quiet))
            kms_info("imported the token's earlier layout: %s", text);
    }
    import_free(&im);
    return rc;
}
