/*
 * Keeping the index true to the token, which other nodes change too: the
 * change marker, full and per-key re-reads, the sweep of abandoned key
 * objects, and the background thread that also rotates and deletes keys
 * when they are due.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/rand.h>

#include "common/encoding.h"
#include "common/log.h"
#include "keystore/internal.h"

#define MARKER_PREFIX "p11kms-marker:"
static const char application[] = "p11kms";
static const uint8_t marker_oid[KMS_OID_LEN] = "p11kms-marker..";

/* ---- the change marker ---------------------------------------------------- */

static kms_err read_label(struct kms_session *s, CK_OBJECT_HANDLE h, char **out)
{
    struct kms_buf b = KMS_BUF_INIT;
    kms_err rc = kms_hsm_get_bytes(s, h, CKA_LABEL, &b);
    if (rc == KMS_OK) {
        *out = strndup((const char *)b.data, b.len);
        if (!*out)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    kms_buf_free(&b);
    return rc;
}

static kms_err random_label(char *out, size_t n)
{
    uint8_t r[16];
    char hex[33];
    KMS_ENSURE(RAND_bytes(r, sizeof r) == 1, KMS_ERR_INTERNAL, "random generator failed");
    kms_hex_encode(r, sizeof r, hex);
    snprintf(out, n, MARKER_PREFIX "%s", hex);
    return KMS_OK;
}

/* Takes handles (malloc'd, n > 0) as the markers, their labels read now or given. */
static kms_err adopt_markers(struct kms_keystore *ks, struct kms_session *s,
                             CK_OBJECT_HANDLE *handles, char **labels, size_t n)
{
    for (size_t i = 0; i < ks->nmarkers; i++)
        free(ks->marker_labels[i]);
    free(ks->markers);
    free(ks->marker_labels);
    ks->markers = handles;
    ks->nmarkers = n;
    ks->marker_labels = labels ? labels : calloc(n, sizeof *ks->marker_labels);
    KMS_ENSURE(ks->marker_labels != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; !labels && i < n; i++)
        if (read_label(s, handles[i], &ks->marker_labels[i]) != KMS_OK)
            kms_err_clear();
    return KMS_OK;
}

/*
 * The label and, when it fits VALUE_GUESS bytes, CKA_VALUE in one call (each
 * call costs SoftHSM2 a look at the object's file); *value stays NULL when
 * it did not fit, for the caller to read on its own.
 */
#define VALUE_GUESS 4096
static kms_err read_label_value(struct kms_session *s, CK_OBJECT_HANDLE h, char **label,
                                uint8_t **value, size_t *value_len)
{
    char text[257];
    uint8_t *v = malloc(VALUE_GUESS);
    KMS_ENSURE(v != NULL, KMS_ERR_INTERNAL, "out of memory");
    CK_ATTRIBUTE a[] = {{CKA_LABEL, text, sizeof text - 1}, {CKA_VALUE, v, VALUE_GUESS}};
    kms_err rc = kms_hsm_get_attributes(s, h, a, 2);
    if (rc == KMS_ERR_NOT_FOUND) {
        kms_err_clear();
        free(v);
        return read_label(s, h, label);
    }
    if (rc == KMS_OK) {
        /* Kept until the record is indexed: no more than it needs. */
        uint8_t *fit = realloc(v, a[1].ulValueLen ? a[1].ulValueLen : 1);
        *label = strndup(text, a[0].ulValueLen);
        if (fit)
            v = fit;
        if (!*label || !fit)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    if (rc != KMS_OK) {
        free(v);
        return rc;
    }
    *value = v;
    *value_len = a[1].ulValueLen;
    return KMS_OK;
}

/* Finds every marker (two nodes starting at once may each make one), making one if none. */
kms_err kms_marker_init(struct kms_keystore *ks, struct kms_session *s)
{
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_APPLICATION, (void *)application, sizeof application - 1},
        {CKA_OBJECT_ID, (void *)marker_oid, KMS_OID_LEN},
    };
    CK_OBJECT_HANDLE *handles = NULL;
    size_t n = 0;

    KMS_GUARD(kms_hsm_find(s, tmpl, 3, &handles, &n));
    if (n == 0) {
        char label[64];
        free(handles);
        handles = malloc(sizeof *handles);
        KMS_ENSURE(handles != NULL, KMS_ERR_INTERNAL, "out of memory");
        kms_err rc = random_label(label, sizeof label);
        if (rc == KMS_OK)
            rc = kms_hsm_create_data(s, label, marker_oid, KMS_OID_LEN, "", 0, handles);
        if (rc != KMS_OK) {
            free(handles);
            return rc;
        }
        n = 1;
    }
    return adopt_markers(ks, s, handles, NULL, n);
}

/*
 * Called under ks->write. When the marker still holds the label this node
 * last saw, the new label is recorded as seen: this node already has its own
 * change, and at 10,000 keys re-reading everything for it would cost about a
 * second of token searches. (A change another node makes between the read
 * and the write here is then seen at the next full refresh.)
 */
void kms_marker_touch(struct kms_keystore *ks, struct kms_session *s)
{
    char label[64];
    if (random_label(label, sizeof label) != KMS_OK)
        return;
    for (size_t i = 0; i < ks->nmarkers; i++) {
        char *before = NULL;
        int seen = read_label(s, ks->markers[i], &before) == KMS_OK && ks->marker_labels[i] &&
                   strcmp(before, ks->marker_labels[i]) == 0;
        kms_err_clear();
        free(before);
        if (kms_hsm_set_label(s, ks->markers[i], label) != KMS_OK) {
            kms_warn("could not update the change marker; other nodes will see this change at "
                     "their next full refresh");
            kms_err_clear();
        } else if (seen) {
            free(ks->marker_labels[i]);
            ks->marker_labels[i] = strdup(label); /* NULL: the next poll re-reads */
        }
    }
}

/* True when a marker's label is not what we last saw (someone changed something). */
static int marker_moved(struct kms_keystore *ks, struct kms_session *s)
{
    int moved = 0;
    for (size_t i = 0; i < ks->nmarkers; i++) {
        char *label = NULL;
        if (read_label(s, ks->markers[i], &label) != KMS_OK) {
            kms_err_clear();
            return 1;
        }
        if (!ks->marker_labels[i] || strcmp(label, ks->marker_labels[i]) != 0) {
            free(ks->marker_labels[i]);
            ks->marker_labels[i] = label;
            moved = 1;
        } else {
            free(label);
        }
    }
    return moved;
}

/* ---- key objects ---------------------------------------------------------- */

kms_err kms_kek_find(struct kms_session *s, const uint8_t id[KMS_UUID_LEN], uint32_t vid,
                     CK_OBJECT_HANDLE *out)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    uint8_t kek_id[KEK_ID_LEN];
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_ID, kek_id, sizeof kek_id},
    };
    CK_OBJECT_HANDLE *handles = NULL;
    size_t n = 0;

    kms_kek_id(id, vid, kek_id);
    KMS_GUARD(kms_hsm_find(s, tmpl, 2, &handles, &n));
    *out = n > 0 ? handles[0] : CK_INVALID_HANDLE;
    free(handles);
    return KMS_OK;
}

struct kek {
    uint8_t id[KEK_ID_LEN];
    CK_OBJECT_HANDLE handle;
    int64_t created; /* from the label; 0 when unknown */
};

static int kek_cmp(const void *a, const void *b)
{
    return memcmp(((const struct kek *)a)->id, ((const struct kek *)b)->id, KEK_ID_LEN);
}

/* Every p11kms key object in the token, sorted by CKA_ID. */
static kms_err scan_keks(struct kms_session *s, struct kek **out, size_t *count)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_KEY_TYPE, &kt, sizeof kt}};
    CK_OBJECT_HANDLE *handles = NULL;
    size_t n = 0, got = 0;
    struct kek *keks;
    kms_err rc = KMS_OK;

    KMS_GUARD(kms_hsm_find(s, tmpl, 2, &handles, &n));
    keks = calloc(n + 1, sizeof *keks);
    if (!keks) {
        free(handles);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        /* Both in one call: each costs SoftHSM2 a look at the object's file. */
        uint8_t id[KEK_ID_LEN + 1];
        char label[KEK_LABEL_MAX + 1];
        CK_ATTRIBUTE a[] = {{CKA_ID, id, sizeof id}, {CKA_LABEL, label, sizeof label - 1}};
        rc = kms_hsm_get_attributes(s, handles[i], a, 2);
        if (rc == KMS_OK && a[0].ulValueLen == KEK_ID_LEN && a[1].ulValueLen > 11 &&
            memcmp(label, "p11kms-kek:", 11) == 0) {
            label[a[1].ulValueLen] = '\0';
            const char *colon = strrchr(label, ':');
            memcpy(keks[got].id, id, KEK_ID_LEN);
            keks[got].handle = handles[i];
            keks[got].created = colon ? strtoll(colon + 1, NULL, 10) : 0;
            got++;
        }
        /* Not ours (another application's key), or removed between find and read. */
        if (rc == KMS_ERR_NOT_FOUND || (rc == KMS_ERR_KEY_UNAVAILABLE && !s->broken))
            rc = KMS_OK;
        kms_err_clear();
    }
    free(handles);
    if (rc != KMS_OK) {
        free(keks);
        return rc;
    }
    qsort(keks, got, sizeof *keks, kek_cmp);
    *out = keks;
    *count = got;
    return KMS_OK;
}

struct want {
    uint8_t id[KMS_UUID_LEN];
    uint32_t vid;
    CK_OBJECT_HANDLE handle;
};

/* Gives every indexed version its object handle; with keks, from that scan. */
static kms_err attach_handles(struct kms_keystore *ks, struct kms_session *s,
                              const struct kek *keks, size_t nkeks)
{
    struct want *w = NULL;
    size_t n = 0, cap = 0;
    kms_err rc = KMS_OK;

    pthread_rwlock_rdlock(&ks->rw);
    for (size_t i = 0; i < ks->nkeys && rc == KMS_OK; i++)
        for (size_t j = 0; j < ks->keys[i]->nversions && rc == KMS_OK; j++) {
            /* A deleted key's objects are gone on purpose: nothing to look for. */
            if (ks->keys[i]->destroyed || ks->keys[i]->versions[j].handle != CK_INVALID_HANDLE)
                continue;
            if (n == cap) {
                struct want *p = realloc(w, (cap = cap ? cap * 2 : 16) * sizeof *w);
                if (!p) {
                    rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
                    break;
                }
                w = p;
            }
            memcpy(w[n].id, ks->keys[i]->id, KMS_UUID_LEN);
            w[n++].vid = ks->keys[i]->versions[j].vid;
        }
    pthread_rwlock_unlock(&ks->rw);

    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        w[i].handle = CK_INVALID_HANDLE;
        if (keks) {
            struct kek key;
            kms_kek_id(w[i].id, w[i].vid, key.id);
            const struct kek *hit = bsearch(&key, keks, nkeks, sizeof *keks, kek_cmp);
            if (hit)
                w[i].handle = hit->handle;
        } else {
            rc = kms_kek_find(s, w[i].id, w[i].vid, &w[i].handle);
        }
        if (rc == KMS_OK && w[i].handle == CK_INVALID_HANDLE) {
            kms_warn("a key version (%u) has no key object in the token", w[i].vid);
            w[i].handle = KEK_MISSING;
        }
    }
    pthread_rwlock_wrlock(&ks->rw);
    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        struct key *k = kms_key_find_locked(ks, w[i].id);
        for (size_t j = 0; k && j < k->nversions; j++)
            if (k->versions[j].vid == w[i].vid && k->versions[j].handle == CK_INVALID_HANDLE)
                k->versions[j].handle = w[i].handle;
    }
    pthread_rwlock_unlock(&ks->rw);
    free(w);
    return rc;
}

/* Removes key objects no record names, older than the grace period. */
static void sweep_orphans(struct kms_keystore *ks, struct kms_session *s, const struct kek *keks,
                          size_t nkeks)
{
    int64_t now = kms_now();
    for (size_t i = 0; i < nkeks; i++) {
        uint32_t vid = (uint32_t)keks[i].id[16] << 24 | (uint32_t)keks[i].id[17] << 16 |
                       (uint32_t)keks[i].id[18] << 8 | keks[i].id[19];
        int named = 0;
        pthread_rwlock_rdlock(&ks->rw);
        struct key *k = kms_key_find_locked(ks, keks[i].id);
        for (size_t j = 0; k && j < k->nversions; j++)
            named |= k->versions[j].vid == vid;
        /* Not while some of the key's history is unread: it may name the object. */
        named |= k && k->archived_n > k->history_n;
        pthread_rwlock_unlock(&ks->rw);
        if (named || keks[i].created == 0 ||
            keks[i].created + (int64_t)ks->cfg.orphan_grace_seconds > now)
            continue;
        kms_info("removing an abandoned key object (version %u, made %lld s ago)", vid,
                 (long long)(now - keks[i].created));
        if (kms_hsm_destroy(s, keks[i].handle) != KMS_OK)
            kms_err_clear();
    }
}

/* ---- records -------------------------------------------------------------- */

struct entry {
    char *kind;
    char *name;
    uint64_t gen;
    char *nonce;
    CK_OBJECT_HANDLE handle;
    uint8_t *value; /* CKA_VALUE when read with the label (start-up), else NULL */
    size_t value_len;
};

static int entry_cmp(const void *a, const void *b)
{
    const struct entry *x = a, *y = b;
    int c = strcmp(x->kind, y->kind);
    if (!c)
        c = strcmp(x->name, y->name);
    if (!c)
        c = (x->gen > y->gen) - (x->gen < y->gen);
    if (!c)
        c = strcmp(x->nonce, y->nonce);
    return c;
}

/* "p11kms-<kind>:<name>:<gen>:<nonce>"; the name may hold ':'. */
static int parse_label(const char *label, struct entry *e)
{
    const char *kind, *c1, *last, *prev;
    if (strncmp(label, "p11kms-", 7) != 0)
        return 0;
    kind = label + 7;
    c1 = strchr(kind, ':');
    last = strrchr(label, ':');
    if (!c1 || last == c1)
        return 0;
    for (prev = last - 1; prev > c1 && *prev != ':'; prev--)
        ;
    if (prev == c1)
        return 0;
    char *end;
    errno = 0;
    unsigned long long gen = strtoull(prev + 1, &end, 10);
    if (end != last || errno || gen == 0)
        return 0;
    e->kind = strndup(kind, (size_t)(c1 - kind));
    e->name = strndup(c1 + 1, (size_t)(prev - c1 - 1));
    e->nonce = strdup(last + 1);
    e->gen = gen;
    return e->kind && e->name && e->nonce;
}

static void entries_free(struct entry *e, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(e[i].kind);
        free(e[i].name);
        free(e[i].nonce);
        free(e[i].value);
    }
    free(e);
}

static kms_err signature(const struct entry *e, size_t n, struct kms_buf *out)
{
    for (size_t i = 0; i < n; i++) {
        char part[96];
        snprintf(part, sizeof part, "%s%llu:%s", i ? "," : "", (unsigned long long)e[i].gen,
                 e[i].nonce);
        KMS_GUARD(kms_buf_append_str(out, part));
    }
    return kms_buf_terminate(out);
}

/*
 * Start-up repair of what a crash between "write the next generation" and
 * "remove the previous" left: older records whose every version the single
 * newest record already names are removed.
 */
static void remove_superseded(struct kms_session *s, struct kms_record *recs, size_t n)
{
    size_t top = 0, ntop = 0;
    for (size_t i = 0; i < n; i++)
        if (recs[i].gen > recs[top].gen)
            top = i;
    for (size_t i = 0; i < n; i++)
        ntop += recs[i].gen == recs[top].gen;
    if (ntop != 1)
        return; /* a race not yet settled: its writers settle it */
    const json_t *newest = json_object_get(recs[top].doc, "state");
    for (size_t i = 0; i < n; i++) {
        const json_t *state = json_object_get(recs[i].doc, "state"), *v;
        size_t k;
        int covered = 1;
        if (i == top)
            continue;
        json_int_t archived = json_integer_value(json_object_get(newest, "archived_n"));
        json_array_foreach(json_object_get(state, "versions"), k, v)
        {
            covered &= kms_model_version(newest, (uint32_t)json_integer_value(
                                                     json_object_get(v, "vid"))) != NULL ||
                       json_integer_value(json_object_get(v, "n")) <= archived;
        }
        /*
         * ...and whose change it holds (views still apply a change it lacks),
         * from two generations down, as writers do (record.c).
         */
        const json_t *op = json_object_get(recs[i].doc, "op");
        const char *id = json_string_value(json_object_get(op, "id"));
        size_t a;
        json_t *x;
        int held = 0;
        json_array_foreach(json_object_get(recs[top].doc, "applied"), a, x)
        {
            held |= id && json_is_string(x) && strcmp(json_string_value(x), id) == 0;
        }
        if (covered && held && recs[i].gen + 2 <= recs[top].gen &&
            kms_hsm_destroy(s, recs[i].handle) != KMS_OK)
            kms_err_clear();
    }
}

/* Reads one entity's records (handles from a scan) and indexes its view. */
static kms_err index_entity(struct kms_keystore *ks, struct kms_session *s, const struct entry *e,
                            size_t n, const char *sig, int repair)
{
    const struct kms_record_kind *kind =
        strcmp(e[0].kind, "key") == 0 ? &kms_key_kind : &kms_alias_kind;
    struct kms_record *recs = calloc(n + 1, sizeof *recs);
    struct kms_view view = {0};
    size_t got = 0;
    int vanished = 0;
    kms_err rc = KMS_OK;

    KMS_ENSURE(recs != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        struct kms_buf value = KMS_BUF_INIT;
        if (e[i].value)
            rc = kms_buf_append(&value, e[i].value, e[i].value_len);
        else
            rc = kms_hsm_get_bytes(s, e[i].handle, CKA_VALUE, &value);
        if (rc == KMS_OK &&
            kms_record_parse(kind, e[i].name, value.data, value.len, &recs[got]) == KMS_OK)
            recs[got++].handle = e[i].handle;
        if (rc == KMS_ERR_KEY_UNAVAILABLE && !s->broken) {
            rc = KMS_OK;
            vanished = 1;
        }
        kms_err_clear();
        kms_buf_free(&value);
    }
    /*
     * A record removed since the scan was replaced by one the scan did not
     * see: what is left may be an older state, or nothing, which would drop
     * the entity. Its writer touches the marker after removing it, so the
     * next refresh reads the entity again.
     */
    if (rc == KMS_OK && vanished) {
        kms_records_free(recs, got);
        return KMS_OK;
    }
    if (rc == KMS_OK)
        rc = kms_records_view(kind, recs, got, &view);
    if (rc == KMS_OK && repair && got > 1)
        remove_superseded(s, recs, got);
    if (rc == KMS_OK) {
        if (kind == &kms_key_kind) {
            uint8_t id[KMS_UUID_LEN];
            if (kms_uuid_parse(e[0].name, strlen(e[0].name), id) == KMS_OK)
                rc = kms_index_key_view(ks, id, &view, sig);
            else
                kms_err_clear();
        } else {
            rc = kms_index_alias_view(ks, e[0].name, &view, sig);
        }
    }
    kms_view_clear(&view);
    kms_records_free(recs, got);
    return rc;
}

static int key_signature_is(struct kms_keystore *ks, const char *kind, const char *name,
                            const char *sig)
{
    int same = 0;
    pthread_rwlock_rdlock(&ks->rw);
    if (strcmp(kind, "key") == 0 || strcmp(kind, "history") == 0) {
        uint8_t id[KMS_UUID_LEN];
        struct key *k = NULL;
        if (kms_uuid_parse(name, strlen(name), id) == KMS_OK)
            k = kms_key_any_locked(ks, id);
        kms_err_clear();
        if (k && strcmp(kind, "key") == 0)
            same = strcmp(k->signature, sig) == 0;
        else if (k)
            same = k->history_signature && strcmp(k->history_signature, sig) == 0;
    } else {
        struct alias *a = kms_alias_find_locked(ks, name);
        same = a && strcmp(a->signature, sig) == 0;
    }
    pthread_rwlock_unlock(&ks->rw);
    return same;
}

static int entries_have(const struct entry *e, size_t n, const char *kind, const char *name)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(e[mid].kind, kind);
        if (!c)
            c = strcmp(e[mid].name, name);
        if (c == 0)
            return 1;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return 0;
}

/* Drops index entries whose records are gone from the token (deleted on another node). */
static void drop_vanished(struct kms_keystore *ks, const struct entry *e, size_t n)
{
    for (;;) {
        uint8_t id[KMS_UUID_LEN];
        char *alias = NULL;
        int key = 0;
        pthread_rwlock_rdlock(&ks->rw);
        for (size_t i = 0; i < ks->nkeys && !key; i++)
            if (!entries_have(e, n, "key", ks->keys[i]->id_text)) {
                memcpy(id, ks->keys[i]->id, KMS_UUID_LEN);
                key = 1;
            }
        for (size_t i = 0; i < ks->naliases && !key && !alias; i++)
            if (!entries_have(e, n, "alias", ks->aliases[i]->name))
                alias = strdup(ks->aliases[i]->name);
        pthread_rwlock_unlock(&ks->rw);
        if (key)
            kms_index_remove_key(ks, id);
        else if (alias)
            kms_index_remove_alias(ks, alias);
        else
            return;
        free(alias);
    }
}

/*
 * Reads the history of every key whose history objects changed since the
 * last look, or whose record says it has history this node has not read.
 */
static kms_err load_histories(struct kms_keystore *ks, struct kms_session *s, const struct entry *e,
                              size_t ne)
{
    kms_err rc = KMS_OK;
    for (size_t i = 0; i < ne && rc == KMS_OK;) {
        size_t j = i;
        struct kms_buf sig = KMS_BUF_INIT;
        uint8_t id[KMS_UUID_LEN];
        while (j < ne && strcmp(e[j].kind, e[i].kind) == 0 && strcmp(e[j].name, e[i].name) == 0)
            j++;
        if (strcmp(e[i].kind, "history") == 0 &&
            kms_uuid_parse(e[i].name, strlen(e[i].name), id) == KMS_OK) {
            rc = signature(&e[i], j - i, &sig);
            if (rc == KMS_OK && !key_signature_is(ks, "history", e[i].name, (const char *)sig.data))
                rc = kms_history_load(ks, s, id);
        }
        kms_err_clear();
        kms_buf_free(&sig);
        i = j;
    }
    for (size_t i = 0; rc == KMS_OK;) {
        uint8_t id[KMS_UUID_LEN];
        int behind = 0;
        pthread_rwlock_rdlock(&ks->rw);
        for (; i < ks->nkeys && !behind; i++)
            if (ks->keys[i]->archived_n > ks->keys[i]->history_n && !ks->keys[i]->destroyed) {
                memcpy(id, ks->keys[i]->id, KMS_UUID_LEN);
                behind = 1;
            }
        pthread_rwlock_unlock(&ks->rw);
        if (!behind)
            break;
        rc = kms_history_load(ks, s, id);
    }
    return rc;
}

kms_err kms_refresh_all(struct kms_keystore *ks, struct kms_session *s, int sweep)
{
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_APPLICATION, (void *)application, sizeof application - 1},
    };
    CK_OBJECT_HANDLE *handles = NULL, *markers = NULL;
    char **marker_labels = NULL;
    struct entry *e;
    size_t n = 0, ne = 0, nkeks = 0, nmarkers = 0;
    struct kek *keks = NULL;
    int first = ks->nkeys == 0 && ks->naliases == 0, vanished = 0;
    kms_err rc;

    KMS_GUARD(kms_hsm_find(s, tmpl, 2, &handles, &n));
    e = calloc(n + 1, sizeof *e);
    markers = calloc(n + 1, sizeof *markers);
    marker_labels = calloc(n + 1, sizeof *marker_labels);
    if (!e || !markers || !marker_labels) {
        free(e);
        free(markers);
        free(marker_labels);
        free(handles);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    rc = KMS_OK;
    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        char *label = NULL;
        uint8_t *value = NULL;
        size_t value_len = 0;
        /* At start-up every record is read: its value in the same call as its label. */
        rc = first ? read_label_value(s, handles[i], &label, &value, &value_len)
                   : read_label(s, handles[i], &label);
        /* The change markers are among these objects: no search of their own. */
        if (rc == KMS_OK && strncmp(label, MARKER_PREFIX, sizeof MARKER_PREFIX - 1) == 0) {
            markers[nmarkers] = handles[i];
            marker_labels[nmarkers++] = label;
            label = NULL;
        } else if (rc == KMS_OK && parse_label(label, &e[ne])) {
            e[ne].handle = handles[i];
            e[ne].value = value;
            e[ne].value_len = value_len;
            value = NULL;
            ne++;
        }
        free(value);
        if (rc == KMS_ERR_KEY_UNAVAILABLE && !s->broken) {
            rc = KMS_OK;
            vanished = 1;
            kms_err_clear();
        }
        free(label);
    }
    free(handles);
    /*
     * At start-up and on a sweep the markers found replace the list (two
     * nodes starting at once may each have made one); one is made if none.
     */
    if (rc == KMS_OK && (first || sweep)) {
        if (nmarkers > 0) {
            rc = adopt_markers(ks, s, markers, marker_labels, nmarkers);
            markers = NULL;
            marker_labels = NULL;
        } else {
            rc = kms_marker_init(ks, s);
        }
    }
    for (size_t i = 0; marker_labels && i < nmarkers; i++)
        free(marker_labels[i]);
    free(marker_labels);
    free(markers);
    qsort(e, ne, sizeof *e, entry_cmp);
    for (size_t i = 0; i < ne && rc == KMS_OK;) {
        size_t j = i;
        struct kms_buf sig = KMS_BUF_INIT;
        while (j < ne && strcmp(e[j].kind, e[i].kind) == 0 && strcmp(e[j].name, e[i].name) == 0)
            j++;
        rc = signature(&e[i], j - i, &sig);
        /* With a sweep, entities with several records are read again to repair them. */
        if (rc == KMS_OK && strcmp(e[i].kind, "history") != 0 &&
            ((sweep && j - i > 1) ||
             !key_signature_is(ks, e[i].kind, e[i].name, (const char *)sig.data)))
            rc = index_entity(ks, s, &e[i], j - i, (const char *)sig.data, sweep);
        kms_buf_free(&sig);
        i = j;
    }
    /* Then the keys' history objects, now that the keys are indexed. */
    if (rc == KMS_OK)
        rc = load_histories(ks, s, e, ne);
    /* A record removed between find and read may have been an entity's only one seen. */
    if (rc == KMS_OK && !vanished)
        drop_vanished(ks, e, ne);
    entries_free(e, ne);
    /* At start-up (and on a sweep) one scan of all key objects beats a find per version. */
    if (rc == KMS_OK && (first || sweep))
        rc = scan_keks(s, &keks, &nkeks);
    if (rc == KMS_OK)
        rc = attach_handles(ks, s, keks, nkeks);
    if (rc == KMS_OK && sweep)
        sweep_orphans(ks, s, keks, nkeks);
    free(keks);
    ks->last_full_refresh = kms_now();
    return rc;
}

#define MISS_SLOTS (sizeof((struct kms_keystore *)0)->missed_at / sizeof(int64_t))

static int recently_missed(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], uint32_t vid)
{
    int64_t now = kms_now();
    for (size_t i = 0; i < MISS_SLOTS; i++)
        if (ks->missed_at[i] && ks->missed_at[i] + 2 > now && ks->missed_vid[i] == vid &&
            memcmp(ks->missed[i], id, KMS_UUID_LEN) == 0)
            return 1;
    return 0;
}

static int has_version(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], uint32_t vid)
{
    int has = 0;
    pthread_rwlock_rdlock(&ks->rw);
    struct key *k = kms_key_find_locked(ks, id);
    for (size_t i = 0; k && i < k->nversions; i++)
        has |= k->versions[i].vid == vid;
    pthread_rwlock_unlock(&ks->rw);
    return has;
}

kms_err kms_refresh_key(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], uint32_t vid)
{
    char name[KMS_UUID_TEXT_LEN + 1];
    struct kms_session *s;
    struct kms_record *recs = NULL;
    size_t n = 0;
    struct kms_view view = {0};
    kms_err rc;

    /*
     * One at a time, and a (key, version) that was still missing is not
     * looked for again within two seconds: a flood of made-up blobs cannot
     * turn into a flood of token searches.
     */
    pthread_mutex_lock(&ks->refresh_one);
    if (has_version(ks, id, vid) || recently_missed(ks, id, vid)) {
        pthread_mutex_unlock(&ks->refresh_one);
        return KMS_OK;
    }
    kms_uuid_format(id, name);
    rc = kms_hsm_acquire(ks->hsm, &s);
    if (rc == KMS_OK) {
        rc = kms_records_scan(s, &kms_key_kind, name, id, &recs, &n);
        if (rc == KMS_OK)
            rc = kms_records_view(&kms_key_kind, recs, n, &view);
        if (rc == KMS_OK && view.state)
            rc = kms_index_key_view(ks, id, &view, NULL);
        if (rc == KMS_OK && view.state && !has_version(ks, id, vid))
            rc = kms_history_load(ks, s, id);
        if (rc == KMS_OK)
            rc = attach_handles(ks, s, NULL, 0);
        kms_hsm_release(s);
    }
    if (rc == KMS_OK && !has_version(ks, id, vid)) {
        memcpy(ks->missed[ks->missed_next], id, KMS_UUID_LEN);
        ks->missed_vid[ks->missed_next] = vid;
        ks->missed_at[ks->missed_next] = kms_now();
        ks->missed_next = (ks->missed_next + 1) % MISS_SLOTS;
    }
    pthread_mutex_unlock(&ks->refresh_one);
    kms_view_clear(&view);
    kms_records_free(recs, n);
    return rc;
}

/* ---- the background thread ------------------------------------------------ */

struct due {
    uint8_t id[KMS_UUID_LEN];
    int what; /* 1 rotate, 2 destroy, 3 remove a destroyed key's objects */
};

/*
 * Removes a destroyed key's key objects. Its last record stays as a
 * tombstone, so a blob made under it answers NotFoundException rather than
 * InvalidCiphertextException.
 */
static void finish_destroy(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN])
{
    char name[KMS_UUID_TEXT_LEN + 1];
    struct kms_session *s;
    uint32_t *vids = NULL;
    size_t nv = 0, removed = 0;
    kms_err rc;

    if (kms_hsm_acquire(ks->hsm, &s) != KMS_OK) {
        kms_err_clear();
        return;
    }
    /* Every version, those moved to history included. */
    rc = kms_history_load(ks, s, id);
    pthread_rwlock_rdlock(&ks->rw);
    struct key *k = kms_key_any_locked(ks, id);
    if (k && rc == KMS_OK) {
        nv = k->nversions;
        vids = calloc(nv + 1, sizeof *vids);
        for (size_t j = 0; vids && j < nv; j++)
            vids[j] = k->versions[j].vid;
    }
    pthread_rwlock_unlock(&ks->rw);
    rc = vids ? KMS_OK : KMS_ERR_INTERNAL;
    kms_uuid_format(id, name);
    for (size_t j = 0; j < nv && rc == KMS_OK; j++) {
        CK_OBJECT_HANDLE h;
        rc = kms_kek_find(s, id, vids[j], &h);
        if (rc == KMS_OK && h != CK_INVALID_HANDLE) {
            rc = kms_hsm_destroy(s, h);
            removed += rc == KMS_OK;
        }
    }
    if (rc == KMS_OK)
        kms_history_destroy(s, id);
    kms_hsm_release(s);
    if (rc == KMS_OK) {
        pthread_rwlock_wrlock(&ks->rw);
        k = kms_key_any_locked(ks, id);
        if (k && k->destroyed)
            k->purged = 1;
        pthread_rwlock_unlock(&ks->rw);
        if (removed)
            kms_info("key %s destroyed: %zu key objects removed", name, removed);
    }
    kms_err_clear();
    free(vids);
}

static void do_due_work(struct kms_keystore *ks)
{
    struct due *due = NULL;
    size_t n = 0;
    int64_t now = kms_now();

    pthread_rwlock_rdlock(&ks->rw);
    due = calloc(ks->nkeys + 1, sizeof *due);
    for (size_t i = 0; due && i < ks->nkeys; i++) {
        const struct key *k = ks->keys[i];
        int what = 0;
        if (k->destroyed && !k->purged)
            what = 3;
        else if (!k->destroyed && k->state == KMS_KEY_PENDING_DELETION && k->deletion_date <= now)
            what = 2;
        else if (k->state == KMS_KEY_ENABLED && k->rotation_enabled && k->next_rotation <= now)
            what = 1;
        if (what) {
            memcpy(due[n].id, k->id, KMS_UUID_LEN);
            due[n++].what = what;
        }
    }
    pthread_rwlock_unlock(&ks->rw);
    for (size_t i = 0; i < n; i++) {
        if (due[i].what == 3) {
            finish_destroy(ks, due[i].id);
            continue;
        }
        if (due[i].what == 1) {
            if (kms_key_rotate(ks, due[i].id, KMS_ROTATE_SCHEDULE, 0) != KMS_OK) {
                kms_warn("scheduled rotation failed: %s", kms_err_message());
                kms_err_clear();
            }
            continue;
        }
        struct kms_session *s;
        json_t *op = kms_op_new("destroy");
        if (op && kms_hsm_acquire(ks->hsm, &s) == KMS_OK) {
            json_object_set_new(op, "date", json_integer(now));
            pthread_mutex_lock(&ks->write);
            kms_err rc = kms_key_change(ks, s, due[i].id, op);
            pthread_mutex_unlock(&ks->write);
            kms_hsm_release(s);
            /* Destroyed (now, or already by another node): remove its key objects. */
            if (rc == KMS_OK || rc == KMS_ERR_NOT_FOUND)
                finish_destroy(ks, due[i].id);
        }
        kms_err_clear();
        json_decref(op);
    }
    free(due);
}

void kms_keystore_tick(struct kms_keystore *ks)
{
    struct kms_session *s;
    if (kms_hsm_acquire(ks->hsm, &s) != KMS_OK) {
        kms_err_clear();
        return;
    }
    int full = kms_now() - ks->last_full_refresh >= (int64_t)ks->cfg.full_refresh_seconds;
    /* Writers update the labels seen (kms_marker_touch) under ks->write. */
    pthread_mutex_lock(&ks->write);
    int moved = marker_moved(ks, s);
    pthread_mutex_unlock(&ks->write);
    if (moved || full) {
        /*
         * This node's own writers wait, so a scan never drops what one just
         * made; they touch the markers, which a full refresh replaces.
         */
        pthread_mutex_lock(&ks->write);
        if (kms_refresh_all(ks, s, full) != KMS_OK) {
            kms_warn("refresh from the token failed: %s", kms_err_message());
            kms_err_clear();
        }
        pthread_mutex_unlock(&ks->write);
    }
    kms_hsm_release(s);
    do_due_work(ks);
}

static void *run(void *arg)
{
    struct kms_keystore *ks = arg;
    struct timespec t = {0, 0}, now;
    pthread_mutex_lock(&ks->stop_lock);
    while (!ks->stopping) {
        pthread_mutex_unlock(&ks->stop_lock);
        /* Blocks of uses requests queued first, then the poll when it is due. */
        kms_keystore_refill(ks);
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec > t.tv_sec || (now.tv_sec == t.tv_sec && now.tv_nsec >= t.tv_nsec)) {
            kms_keystore_tick(ks);
            clock_gettime(CLOCK_MONOTONIC, &t);
            t.tv_sec += ks->cfg.refresh_ms / 1000;
            t.tv_nsec += (long)(ks->cfg.refresh_ms % 1000) * 1000000L;
            if (t.tv_nsec >= 1000000000L) {
                t.tv_sec++;
                t.tv_nsec -= 1000000000L;
            }
        }
        pthread_mutex_lock(&ks->stop_lock);
        if (!ks->stopping && ks->nrefills == 0)
            pthread_cond_timedwait(&ks->stop_cond, &ks->stop_lock, &t);
    }
    pthread_mutex_unlock(&ks->stop_lock);
    return NULL;
}

kms_err kms_keystore_start(struct kms_keystore *ks)
{
    KMS_ENSURE(pthread_create(&ks->thread, NULL, run, ks) == 0, KMS_ERR_INTERNAL,
               "cannot start the key store thread");
    ks->running = 1;
    return KMS_OK;
}

void kms_keystore_stop(struct kms_keystore *ks)
{
    if (!ks->running)
        return;
    pthread_mutex_lock(&ks->stop_lock);
    ks->stopping = 1;
    pthread_cond_signal(&ks->stop_cond);
    pthread_mutex_unlock(&ks->stop_lock);
    pthread_join(ks->thread, NULL);
    ks->running = 0;
}
