#include "config.h"

#include "keystore/keystore.h"

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/json_alloc.h"
#include "common/log.h"

#define META_LABEL_PREFIX "p11kms-key:"
#define KEK_LABEL_PREFIX "p11kms-kek:"
#define KEK_ID_LEN (KMS_UUID_LEN + 4)

struct version {
    uint32_t number;
    int64_t created;
    CK_OBJECT_HANDLE handle; /* CK_INVALID_HANDLE until found in the token */
};

struct key_alias {
    char *name;
    int64_t created;
    int64_t updated;
};

struct key {
    uint8_t id[KMS_UUID_LEN];
    char id_text[KMS_UUID_TEXT_LEN + 1];
    int64_t created;
    char *description;
    enum kms_key_state state;
    uint32_t current;
    struct version *versions;
    size_t nversions;
    struct key_alias *aliases;
    size_t naliases;
    uint64_t generation;
    CK_OBJECT_HANDLE meta;
};

/* One alias in the index: the name (owned by its key) and the key. */
struct alias_entry {
    const struct key_alias *alias;
    struct key *key;
};

struct kms_keystore {
    struct kms_hsm *hsm;
    char region[64];
    char account[32];
    char arn_prefix[128]; /* arn:aws:kms:<region>:<account>: */

    /* Readers copy what they need out under rd; writers also hold write. */
    pthread_rwlock_t rw;
    pthread_mutex_t write;
    struct key **keys; /* sorted by id */
    size_t nkeys, capkeys;
    struct alias_entry *aliases; /* sorted by name */
    size_t naliases, capaliases;
};

static int64_t now_seconds(void)
{
    return (int64_t)time(NULL);
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

static int state_from_name(const char *s, enum kms_key_state *out)
{
    for (int i = KMS_KEY_ENABLED; i <= KMS_KEY_PENDING_DELETION; i++) {
        if (strcmp(s, kms_key_state_name((enum kms_key_state)i)) == 0) {
            *out = (enum kms_key_state)i;
            return 1;
        }
    }
    return 0;
}

static void key_free(struct key *k)
{
    if (!k)
        return;
    free(k->description);
    for (size_t i = 0; i < k->naliases; i++)
        free(k->aliases[i].name);
    free(k->aliases);
    free(k->versions);
    free(k);
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

static struct key *key_find_locked(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    int found;
    size_t i = key_position(ks, id, &found);
    return found ? ks->keys[i] : NULL;
}

static size_t alias_position(struct kms_keystore *ks, const char *name, int *found)
{
    size_t lo = 0, hi = ks->naliases;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(ks->aliases[mid].alias->name, name);
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

static void alias_index_remove_key_locked(struct kms_keystore *ks, const struct key *k)
{
    size_t o = 0;
    for (size_t i = 0; i < ks->naliases; i++)
        if (ks->aliases[i].key != k)
            ks->aliases[o++] = ks->aliases[i];
    ks->naliases = o;
}

static kms_err alias_index_add_key_locked(struct kms_keystore *ks, struct key *k)
{
    KMS_GUARD(grow((void **)&ks->aliases, &ks->capaliases, ks->naliases + k->naliases,
                   sizeof *ks->aliases));
    for (size_t j = 0; j < k->naliases; j++) {
        int found;
        size_t i = alias_position(ks, k->aliases[j].name, &found);
        if (found) {
            /* Two keys claim one alias (a race between nodes): the first key id wins. */
            if (memcmp(ks->aliases[i].key->id, k->id, KMS_UUID_LEN) > 0)
                ks->aliases[i].key = k, ks->aliases[i].alias = &k->aliases[j];
            continue;
        }
        memmove(&ks->aliases[i + 1], &ks->aliases[i], (ks->naliases - i) * sizeof *ks->aliases);
        ks->aliases[i].alias = &k->aliases[j];
        ks->aliases[i].key = k;
        ks->naliases++;
    }
    return KMS_OK;
}

/* Puts k in the index, replacing (and freeing) an older copy of the same key. */
static kms_err index_put_locked(struct kms_keystore *ks, struct key *k)
{
    int found;
    size_t i = key_position(ks, k->id, &found);
    if (found) {
        struct key *old = ks->keys[i];
        alias_index_remove_key_locked(ks, old);
        ks->keys[i] = k;
        key_free(old);
    } else {
        KMS_GUARD(grow((void **)&ks->keys, &ks->capkeys, ks->nkeys + 1, sizeof *ks->keys));
        memmove(&ks->keys[i + 1], &ks->keys[i], (ks->nkeys - i) * sizeof *ks->keys);
        ks->keys[i] = k;
        ks->nkeys++;
    }
    return alias_index_add_key_locked(ks, k);
}

/* ---- metadata ------------------------------------------------------------- */

static kms_err meta_encode(const struct key *k, struct kms_buf *out)
{
    json_t *versions = json_array(), *aliases = json_array(), *root;
    kms_err rc = KMS_OK;

    for (size_t i = 0; i < k->nversions; i++)
        json_array_append_new(versions,
                              json_pack("{s:I, s:I}", "v", (json_int_t)k->versions[i].number,
                                        "created", (json_int_t)k->versions[i].created));
    for (size_t i = 0; i < k->naliases; i++)
        json_array_append_new(aliases, json_pack("{s:s, s:I, s:I}", "name", k->aliases[i].name,
                                                 "created", (json_int_t)k->aliases[i].created,
                                                 "updated", (json_int_t)k->aliases[i].updated));
    root = json_pack("{s:i, s:s, s:I, s:I, s:s, s:s, s:s, s:s, s:I, s:o, s:o}", "format", 1, "id",
                     k->id_text, "gen", (json_int_t)k->generation, "created",
                     (json_int_t)k->created, "description", k->description ? k->description : "",
                     "state", kms_key_state_name(k->state), "usage", "ENCRYPT_DECRYPT", "spec",
                     "SYMMETRIC_DEFAULT", "current", (json_int_t)k->current, "versions", versions,
                     "aliases", aliases);
    KMS_ENSURE(root != NULL, KMS_ERR_INTERNAL, "cannot encode key metadata");
    rc = kms_json_dump(root, JSON_SORT_KEYS, out);
    json_decref(root);
    return rc;
}

static kms_err meta_decode(const uint8_t *p, size_t n, struct key **out)
{
    json_error_t jerr;
    json_t *root = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, &jerr);
    json_t *versions = NULL, *aliases = NULL;
    const char *id = NULL, *description = NULL, *state = NULL;
    json_int_t gen = 0, created = 0, current = 0;
    int format = 0;
    struct key *k = NULL;
    kms_err rc = KMS_FAIL(KMS_ERR_INTERNAL, "key metadata is not valid");

    if (!root || json_unpack_ex(root, &jerr, 0, "{s:i, s:s, s:I, s:I, s:s, s:s, s:I, s:o, s:o}",
                                "format", &format, "id", &id, "gen", &gen, "created", &created,
                                "description", &description, "state", &state, "current", &current,
                                "versions", &versions, "aliases", &aliases) != 0)
        goto done;
    if (format != 1 || !json_is_array(versions) || !json_is_array(aliases) || gen < 1 ||
        current < 1 || current > UINT32_MAX)
        goto done;
    k = calloc(1, sizeof *k);
    if (!k)
        goto done;
    if (kms_uuid_parse(id, strlen(id), k->id) != KMS_OK || !state_from_name(state, &k->state))
        goto done;
    kms_uuid_format(k->id, k->id_text);
    k->generation = (uint64_t)gen;
    k->created = created;
    k->current = (uint32_t)current;
    k->description = strdup(description);
    k->nversions = json_array_size(versions);
    k->versions = calloc(k->nversions ? k->nversions : 1, sizeof *k->versions);
    k->naliases = json_array_size(aliases);
    k->aliases = calloc(k->naliases ? k->naliases : 1, sizeof *k->aliases);
    if (!k->description || !k->versions || !k->aliases)
        goto done;
    for (size_t i = 0; i < k->nversions; i++) {
        json_int_t v = 0, c = 0;
        if (json_unpack(json_array_get(versions, i), "{s:I, s:I}", "v", &v, "created", &c) != 0 ||
            v < 1 || v > UINT32_MAX)
            goto done;
        k->versions[i].number = (uint32_t)v;
        k->versions[i].created = c;
        k->versions[i].handle = CK_INVALID_HANDLE;
    }
    for (size_t i = 0; i < k->naliases; i++) {
        const char *name = NULL;
        json_int_t c = 0, u = 0;
        if (json_unpack(json_array_get(aliases, i), "{s:s, s:I, s:I}", "name", &name, "created", &c,
                        "updated", &u) != 0 ||
            !(k->aliases[i].name = strdup(name)))
            goto done;
        k->aliases[i].created = c;
        k->aliases[i].updated = u;
    }
    *out = k;
    k = NULL;
    rc = KMS_OK;
done:
    key_free(k);
    json_decref(root);
    return rc;
}

static void meta_label(const struct key *k, char *out, size_t n)
{
    snprintf(out, n, META_LABEL_PREFIX "%s:%llu", k->id_text, (unsigned long long)k->generation);
}

/*
 * Writes k's metadata as generation k->generation (the caller has bumped it)
 * and then removes the generation it replaces. A crash between the two leaves
 * both; readers take the higher.
 */
static kms_err meta_store(struct kms_session *s, struct key *k, CK_OBJECT_HANDLE previous)
{
    struct kms_buf json = KMS_BUF_INIT;
    char label[128];
    kms_err rc = meta_encode(k, &json);
    meta_label(k, label, sizeof label);
    if (rc == KMS_OK)
        rc = kms_hsm_create_data(s, label, json.data, json.len, &k->meta);
    kms_buf_free(&json);
    if (rc == KMS_OK && previous != CK_INVALID_HANDLE && kms_hsm_destroy(s, previous) != KMS_OK)
        kms_warn("could not remove an old metadata generation of key %s", k->id_text);
    return rc;
}

/* ---- loading -------------------------------------------------------------- */

static kms_err load_metadata(struct kms_keystore *ks, struct kms_session *s)
{
    CK_OBJECT_CLASS cls = CKO_DATA;
    static const char app[] = "p11kms";
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_APPLICATION, (void *)app, sizeof app - 1},
    };
    CK_OBJECT_HANDLE *handles = NULL;
    size_t n = 0;
    kms_err rc;

    KMS_GUARD(kms_hsm_find(s, tmpl, 2, &handles, &n));
    rc = KMS_OK;
    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        struct kms_buf value = KMS_BUF_INIT;
        struct key *k = NULL, *have;
        rc = kms_hsm_get_bytes(s, handles[i], CKA_VALUE, &value);
        if (rc == KMS_OK && meta_decode(value.data, value.len, &k) != KMS_OK) {
            kms_warn("skipping a p11kms data object whose metadata does not parse");
            kms_err_clear();
        }
        kms_buf_free(&value);
        if (!k)
            continue;
        k->meta = handles[i];
        have = key_find_locked(ks, k->id);
        if (have && have->generation >= k->generation) {
            key_free(k); /* an older generation a crash left behind */
            continue;
        }
        rc = index_put_locked(ks, k);
        if (rc != KMS_OK)
            key_free(k);
    }
    free(handles);
    return rc;
}

static kms_err load_versions(struct kms_keystore *ks, struct kms_session *s)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_KEY_TYPE, &kt, sizeof kt},
    };
    CK_OBJECT_HANDLE *handles = NULL;
    size_t n = 0;
    kms_err rc;

    KMS_GUARD(kms_hsm_find(s, tmpl, 2, &handles, &n));
    rc = KMS_OK;
    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        struct kms_buf id = KMS_BUF_INIT;
        rc = kms_hsm_get_bytes(s, handles[i], CKA_ID, &id);
        if (rc == KMS_OK && id.len == KEK_ID_LEN) {
            struct key *k = key_find_locked(ks, id.data);
            uint32_t v = (uint32_t)id.data[16] << 24 | (uint32_t)id.data[17] << 16 |
                         (uint32_t)id.data[18] << 8 | id.data[19];
            for (size_t j = 0; k && j < k->nversions; j++)
                if (k->versions[j].number == v)
                    k->versions[j].handle = handles[i];
        }
        kms_buf_free(&id);
    }
    free(handles);
    return rc;
}

kms_err kms_keystore_open(struct kms_hsm *hsm, const struct kms_keystore_config *cfg,
                          struct kms_keystore **out)
{
    struct kms_keystore *ks = calloc(1, sizeof *ks);
    struct kms_session *s;
    kms_err rc;

    KMS_ENSURE(ks != NULL, KMS_ERR_INTERNAL, "out of memory");
    ks->hsm = hsm;
    snprintf(ks->region, sizeof ks->region, "%s", cfg->region);
    snprintf(ks->account, sizeof ks->account, "%s", cfg->account);
    snprintf(ks->arn_prefix, sizeof ks->arn_prefix, "arn:aws:kms:%s:%s:", ks->region, ks->account);
    pthread_rwlock_init(&ks->rw, NULL);
    pthread_mutex_init(&ks->write, NULL);

    rc = kms_hsm_acquire(hsm, &s);
    if (rc == KMS_OK) {
        rc = load_metadata(ks, s);
        if (rc == KMS_OK)
            rc = load_versions(ks, s);
        kms_hsm_release(s);
    }
    if (rc != KMS_OK) {
        kms_keystore_close(ks);
        return rc;
    }
    for (size_t i = 0; i < ks->nkeys; i++)
        for (size_t j = 0; j < ks->keys[i]->nversions; j++)
            if (ks->keys[i]->versions[j].handle == CK_INVALID_HANDLE)
                kms_warn("key %s version %u has no key object in the token", ks->keys[i]->id_text,
                         ks->keys[i]->versions[j].number);
    *out = ks;
    return KMS_OK;
}

void kms_keystore_close(struct kms_keystore *ks)
{
    if (!ks)
        return;
    for (size_t i = 0; i < ks->nkeys; i++)
        key_free(ks->keys[i]);
    free(ks->keys);
    free(ks->aliases);
    pthread_rwlock_destroy(&ks->rw);
    pthread_mutex_destroy(&ks->write);
    free(ks);
}

size_t kms_keystore_count(struct kms_keystore *ks)
{
    pthread_rwlock_rdlock(&ks->rw);
    size_t n = ks->nkeys;
    pthread_rwlock_unlock(&ks->rw);
    return n;
}

const char *kms_keystore_region(struct kms_keystore *ks)
{
    return ks->region;
}

/* ---- lookups -------------------------------------------------------------- */

void kms_key_info_clear(struct kms_key_info *info)
{
    free(info->description);
    memset(info, 0, sizeof *info);
}

static kms_err info_copy_locked(struct kms_keystore *ks, const struct key *k,
                                struct kms_key_info *out)
{
    kms_key_info_clear(out);
    memcpy(out->id, k->id, KMS_UUID_LEN);
    memcpy(out->id_text, k->id_text, sizeof out->id_text);
    snprintf(out->arn, sizeof out->arn, "%skey/%s", ks->arn_prefix, k->id_text);
    out->created = k->created;
    out->state = k->state;
    out->current_version = k->current;
    out->description = strdup(k->description ? k->description : "");
    KMS_ENSURE(out->description != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

/* Finds the key a reference names: id, key ARN, alias name or alias ARN. */
static kms_err resolve_locked(struct kms_keystore *ks, const char *ref, int allow_alias,
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
        int found;
        KMS_ENSURE(allow_alias, KMS_ERR_NOT_FOUND, "Key '%.256s' does not exist", ref);
        size_t i = alias_position(ks, rest, &found);
        KMS_ENSURE(found, KMS_ERR_NOT_FOUND, "Alias '%.256s' is not found.", ref);
        *out = ks->aliases[i].key;
        return KMS_OK;
    }
    if (kms_uuid_parse(rest, strlen(rest), id) != KMS_OK)
        return KMS_FAIL(KMS_ERR_NOT_FOUND, "Invalid keyId '%.256s'", ref);
    *out = key_find_locked(ks, id);
    KMS_ENSURE(*out != NULL, KMS_ERR_NOT_FOUND, "Key '%skey/%.36s' does not exist", ks->arn_prefix,
               rest);
    return KMS_OK;
}

kms_err kms_keystore_describe(struct kms_keystore *ks, const char *ref, struct kms_key_info *out)
{
    struct key *k;
    pthread_rwlock_rdlock(&ks->rw);
    kms_err rc = resolve_locked(ks, ref, 1, &k);
    if (rc == KMS_OK)
        rc = info_copy_locked(ks, k, out);
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
        memset(&ids[*n], 0, sizeof ids[*n]);
        rc = info_copy_locked(ks, ks->keys[i], &ids[*n]);
        if (rc == KMS_OK)
            (*n)++;
    }
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

/* ---- mutations ------------------------------------------------------------ */

static kms_err key_dup(const struct key *k, struct key **out)
{
    struct key *c = calloc(1, sizeof *c);
    KMS_ENSURE(c != NULL, KMS_ERR_INTERNAL, "out of memory");
    *c = *k;
    c->description = strdup(k->description ? k->description : "");
    c->versions = calloc(k->nversions + 1, sizeof *c->versions);
    c->aliases = calloc(k->naliases + 1, sizeof *c->aliases);
    c->naliases = 0;
    if (c->versions)
        memcpy(c->versions, k->versions, k->nversions * sizeof *k->versions);
    for (size_t i = 0; c->aliases && i < k->naliases; i++) {
        c->aliases[i] = k->aliases[i];
        if (!(c->aliases[i].name = strdup(k->aliases[i].name)))
            break;
        c->naliases++;
    }
    if (!c->description || !c->versions || !c->aliases || c->naliases != k->naliases) {
        key_free(c);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    *out = c;
    return KMS_OK;
}

kms_err kms_keystore_create_key(struct kms_keystore *ks, const char *description,
                                struct kms_key_info *out)
{
    struct key *k = calloc(1, sizeof *k);
    struct kms_session *s = NULL;
    uint8_t kek_id[KEK_ID_LEN];
    char label[96];
    kms_err rc;

    KMS_ENSURE(k != NULL, KMS_ERR_INTERNAL, "out of memory");
    k->description = strdup(description ? description : "");
    k->versions = calloc(1, sizeof *k->versions);
    k->aliases = calloc(1, sizeof *k->aliases);
    if (!k->description || !k->versions || !k->aliases) {
        key_free(k);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    rc = kms_uuid_new(k->id);
    kms_uuid_format(k->id, k->id_text);
    k->created = now_seconds();
    k->state = KMS_KEY_ENABLED;
    k->current = 1;
    k->generation = 1;
    k->nversions = 1;
    k->versions[0].number = 1;
    k->versions[0].created = k->created;
    memcpy(kek_id, k->id, KMS_UUID_LEN);
    kek_id[16] = kek_id[17] = kek_id[18] = 0;
    kek_id[19] = 1;
    snprintf(label, sizeof label, KEK_LABEL_PREFIX "%s:1", k->id_text);

    if (rc == KMS_OK)
        rc = kms_hsm_acquire(ks->hsm, &s);
    /* The KEK first: metadata that names a version must find its object. */
    if (rc == KMS_OK)
        rc = kms_hsm_generate_aes(s, kek_id, sizeof kek_id, label, &k->versions[0].handle);
    if (rc == KMS_OK) {
        rc = meta_store(s, k, CK_INVALID_HANDLE);
        if (rc != KMS_OK && kms_hsm_destroy(s, k->versions[0].handle) != KMS_OK)
            kms_warn("could not remove the key object of a key whose creation failed");
    }
    if (s)
        kms_hsm_release(s);
    if (rc != KMS_OK) {
        key_free(k);
        return rc;
    }
    pthread_mutex_lock(&ks->write);
    pthread_rwlock_wrlock(&ks->rw);
    rc = index_put_locked(ks, k);
    if (rc == KMS_OK)
        rc = info_copy_locked(ks, k, out);
    pthread_rwlock_unlock(&ks->rw);
    pthread_mutex_unlock(&ks->write);
    return rc;
}

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

kms_err kms_keystore_create_alias(struct kms_keystore *ks, const char *name, const char *target_ref)
{
    struct key *k, *next = NULL;
    struct kms_session *s = NULL;
    struct key_alias *a;
    int found;
    kms_err rc;

    KMS_GUARD(kms_alias_name_check(name));
    pthread_mutex_lock(&ks->write);
    /* Writers are serialised by ks->write, so reading the index without rw is safe here. */
    rc = resolve_locked(ks, target_ref, 0, &k);
    if (rc == KMS_OK) {
        alias_position(ks, name, &found);
        if (found)
            rc = KMS_FAIL(KMS_ERR_ALREADY_EXISTS, "An alias with the name %s%s already exists",
                          ks->arn_prefix, name);
    }
    if (rc == KMS_OK && k->state == KMS_KEY_PENDING_DELETION)
        rc = KMS_FAIL(KMS_ERR_INVALID_STATE, "%skey/%s is pending deletion.", ks->arn_prefix,
                      k->id_text);
    if (rc == KMS_OK)
        rc = key_dup(k, &next);
    if (rc == KMS_OK) {
        a = &next->aliases[next->naliases];
        a->name = strdup(name);
        a->created = a->updated = now_seconds();
        if (!a->name)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        else
            next->naliases++;
    }
    if (rc == KMS_OK) {
        next->generation = k->generation + 1;
        rc = kms_hsm_acquire(ks->hsm, &s);
    }
    if (rc == KMS_OK) {
        rc = meta_store(s, next, k->meta);
        kms_hsm_release(s);
    }
    if (rc == KMS_OK) {
        pthread_rwlock_wrlock(&ks->rw);
        rc = index_put_locked(ks, next);
        pthread_rwlock_unlock(&ks->rw);
        next = NULL;
    }
    pthread_mutex_unlock(&ks->write);
    key_free(next);
    return rc;
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
        rc = resolve_locked(ks, key_ref, 0, &only);
    if (rc == KMS_OK && marker) {
        int found;
        i = alias_position(ks, marker, &found);
    }
    for (; rc == KMS_OK && i < ks->naliases; i++) {
        const struct alias_entry *e = &ks->aliases[i];
        if (only && e->key != only)
            continue;
        if (*n == limit)
            break;
        struct kms_alias_info *a = &out[(*n)++];
        snprintf(a->name, sizeof a->name, "%s", e->alias->name);
        snprintf(a->arn, sizeof a->arn, "%s%s", ks->arn_prefix, e->alias->name);
        memcpy(a->target_id, e->key->id_text, sizeof a->target_id);
        a->created = e->alias->created;
        a->updated = e->alias->updated;
    }
    pthread_rwlock_unlock(&ks->rw);
    return rc;
}

/* ---- cryptography --------------------------------------------------------- */

static kms_err usable_locked(struct kms_keystore *ks, const struct key *k)
{
    KMS_ENSURE(k->state != KMS_KEY_DISABLED, KMS_ERR_DISABLED, "%skey/%s is disabled.",
               ks->arn_prefix, k->id_text);
    KMS_ENSURE(k->state == KMS_KEY_ENABLED, KMS_ERR_INVALID_STATE, "%skey/%s is pending deletion.",
               ks->arn_prefix, k->id_text);
    return KMS_OK;
}

static kms_err version_handle_locked(struct kms_keystore *ks, const struct key *k, uint32_t v,
                                     CK_OBJECT_HANDLE *out)
{
    for (size_t i = 0; i < k->nversions; i++) {
        if (k->versions[i].number == v) {
            KMS_ENSURE(k->versions[i].handle != CK_INVALID_HANDLE, KMS_ERR_KEY_UNAVAILABLE,
                       "%skey/%s version %u is unavailable", ks->arn_prefix, k->id_text, v);
            *out = k->versions[i].handle;
            return KMS_OK;
        }
    }
    return KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT,
                    "The ciphertext names a key version that does not exist");
}

kms_err kms_keystore_encrypt(struct kms_keystore *ks, const char *ref,
                             const struct kms_buf *canonical_context, const uint8_t *plaintext,
                             size_t n, struct kms_buf *blob, struct kms_key_info *info)
{
    uint8_t header[KMS_BLOB_HEADER_LEN], iv[KMS_GCM_IV_LEN];
    struct kms_buf aad = KMS_BUF_INIT;
    struct kms_session *s = NULL;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    struct key *k;
    kms_err rc;

    pthread_rwlock_rdlock(&ks->rw);
    rc = resolve_locked(ks, ref, 1, &k);
    if (rc == KMS_OK)
        rc = usable_locked(ks, k);
    if (rc == KMS_OK)
        rc = version_handle_locked(ks, k, k->current, &h);
    if (rc == KMS_OK) {
        kms_blob_header(k->id, k->current, header);
        rc = info_copy_locked(ks, k, info);
    }
    pthread_rwlock_unlock(&ks->rw);

    if (rc == KMS_OK && RAND_bytes(iv, sizeof iv) != 1)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "random generator failed");
    if (rc == KMS_OK)
        rc = kms_blob_aad(header, canonical_context, &aad);
    if (rc == KMS_OK)
        rc = kms_buf_reserve(blob, KMS_BLOB_OVERHEAD + n);
    if (rc == KMS_OK)
        rc = kms_hsm_acquire(ks->hsm, &s);
    if (rc == KMS_OK) {
        size_t at = blob->len + sizeof header + sizeof iv;
        rc = kms_hsm_gcm_encrypt(s, h, iv, aad.data, aad.len, plaintext, n, blob->data + at);
        kms_hsm_release(s);
    }
    if (rc == KMS_OK) {
        /* header and IV go in front of what the token wrote */
        memcpy(blob->data + blob->len, header, sizeof header);
        memcpy(blob->data + blob->len + sizeof header, iv, sizeof iv);
        blob->len += KMS_BLOB_OVERHEAD + n;
    }
    kms_buf_free(&aad);
    return rc;
}

kms_err kms_keystore_decrypt(struct kms_keystore *ks, const uint8_t *p, size_t n,
                             const struct kms_buf *canonical_context, const char *expect_ref,
                             struct kms_buf *plaintext, struct kms_key_info *info)
{
    struct kms_blob blob;
    struct kms_buf aad = KMS_BUF_INIT;
    struct kms_session *s = NULL;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    struct key *k, *expected = NULL;
    kms_err rc;

    KMS_GUARD(kms_blob_decode(p, n, &blob));
    pthread_rwlock_rdlock(&ks->rw);
    if (expect_ref)
        rc = resolve_locked(ks, expect_ref, 1, &expected);
    else
        rc = KMS_OK;
    if (rc == KMS_OK) {
        k = key_find_locked(ks, blob.key_id);
        if (!k)
            rc = KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT,
                          "The ciphertext refers to a customer master key that does not exist");
        else if (expected && expected != k)
            rc = KMS_FAIL(KMS_ERR_INCORRECT_KEY, "The key ID in the request does not identify the "
                                                 "key that encrypted the ciphertext");
    }
    if (rc == KMS_OK)
        rc = usable_locked(ks, k);
    if (rc == KMS_OK)
        rc = version_handle_locked(ks, k, blob.key_version, &h);
    if (rc == KMS_OK)
        rc = info_copy_locked(ks, k, info);
    pthread_rwlock_unlock(&ks->rw);

    if (rc == KMS_OK)
        rc = kms_blob_aad(blob.header, canonical_context, &aad);
    if (rc == KMS_OK)
        rc = kms_buf_reserve(plaintext, blob.ciphertext_len);
    if (rc == KMS_OK)
        rc = kms_hsm_acquire(ks->hsm, &s);
    if (rc == KMS_OK) {
        rc = kms_hsm_gcm_decrypt(s, h, blob.iv, aad.data, aad.len, blob.ciphertext,
                                 blob.ciphertext_len + KMS_GCM_TAG_LEN,
                                 plaintext->data + plaintext->len);
        kms_hsm_release(s);
    }
    if (rc == KMS_OK)
        plaintext->len += blob.ciphertext_len;
    kms_buf_free(&aad);
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
