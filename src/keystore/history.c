/*
 * A key's old versions, moved out of its record so that the record stays
 * small however often the key rotates (a record is rewritten on every change
 * and read on every scan, and SoftHSM2's file store is unreliable with large
 * objects shared between processes).
 *
 * When a record holds more than ARCHIVE_AT versions, the node that just
 * rotated writes the oldest ARCHIVE_BATCH of them (never the current one)
 * into a history object: an immutable CKO_DATA object with its own object id,
 * labelled "p11kms-history:<key>:<upto>:<nonce>", where upto is the highest
 * ordinal it holds. It reads the history back, and only when every version
 * of the batch is there does it write the "archive" change that drops them
 * from the record (model.c). A crash in between leaves a duplicate history
 * object, which readers merge by version id; two nodes archiving at once do
 * the same. History objects go only when their key is destroyed.
 */
#include "config.h"

#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>

#include "common/encoding.h"
#include "common/json_alloc.h"
#include "common/log.h"
#include "keystore/internal.h"

#define ARCHIVE_AT 12
#define ARCHIVE_BATCH 8
#define HISTORY_FORMAT 1

static const char application[] = "p11kms";

static void history_oid(const uint8_t id[KMS_UUID_LEN], uint8_t oid[KMS_OID_LEN])
{
    kms_oid_of("p11kms history", id, KMS_UUID_LEN, oid);
}

static kms_err find_history(struct kms_session *s, const uint8_t id[KMS_UUID_LEN],
                            CK_OBJECT_HANDLE **handles, size_t *n)
{
    CK_OBJECT_CLASS cls = CKO_DATA;
    uint8_t oid[KMS_OID_LEN];
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_APPLICATION, (void *)application, sizeof application - 1},
        {CKA_OBJECT_ID, oid, sizeof oid},
    };
    history_oid(id, oid);
    return kms_hsm_find(s, tmpl, 3, handles, n);
}

struct part {
    json_int_t upto;
    char nonce[33];
};

static int part_cmp(const void *a, const void *b)
{
    const struct part *x = a, *y = b;
    if (x->upto != y->upto)
        return x->upto < y->upto ? -1 : 1;
    return strcmp(x->nonce, y->nonce);
}

/* Parses one history object into its versions (appended to *v) and its part. */
static int parse_history(const char *name, const struct kms_buf *value, struct version **v,
                         size_t *n, size_t *cap, struct part *part)
{
    json_t *doc = json_loadb((const char *)value->data, value->len, JSON_REJECT_DUPLICATES, NULL);
    json_t *versions = NULL, *x;
    const char *kind = NULL, *nm = NULL, *nonce = NULL;
    int format = 0, ok = 0;
    size_t i;

    if (doc &&
        json_unpack(doc, "{s:i, s:s, s:s, s:I, s:s, s:o}", "format", &format, "kind", &kind, "name",
                    &nm, "upto", &part->upto, "nonce", &nonce, "versions", &versions) == 0 &&
        format == HISTORY_FORMAT && strcmp(kind, "history") == 0 && strcmp(nm, name) == 0 &&
        json_is_array(versions) && strlen(nonce) < sizeof part->nonce) {
        snprintf(part->nonce, sizeof part->nonce, "%s", nonce);
        ok = 1;
        json_array_foreach(versions, i, x)
        {
            struct version ver;
            kms_version_from_json(x, &ver);
            int seen = 0;
            for (size_t j = 0; j < *n; j++)
                seen |= (*v)[j].vid == ver.vid;
            if (seen || ver.vid == 0)
                continue;
            if (*n == *cap) {
                struct version *p = realloc(*v, (*cap = *cap ? *cap * 2 : 16) * sizeof *p);
                if (!p) {
                    ok = 0;
                    break;
                }
                *v = p;
            }
            (*v)[(*n)++] = ver;
        }
    }
    json_decref(doc);
    return ok;
}

kms_err kms_history_load(struct kms_keystore *ks, struct kms_session *s,
                         const uint8_t id[KMS_UUID_LEN])
{
    char name[KMS_UUID_TEXT_LEN + 1];
    CK_OBJECT_HANDLE *handles = NULL;
    struct version *v = NULL;
    struct part *parts = NULL;
    struct kms_buf sig = KMS_BUF_INIT;
    size_t count = 0, nv = 0, cap = 0, nparts = 0;
    json_int_t upto = 0;
    kms_err rc;

    kms_uuid_format(id, name);
    KMS_GUARD(find_history(s, id, &handles, &count));
    parts = calloc(count + 1, sizeof *parts);
    rc = parts ? KMS_OK : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < count && rc == KMS_OK; i++) {
        struct kms_buf value = KMS_BUF_INIT;
        rc = kms_hsm_get_bytes(s, handles[i], CKA_VALUE, &value);
        if (rc == KMS_OK) {
            if (parse_history(name, &value, &v, &nv, &cap, &parts[nparts]))
                nparts++;
            else
                kms_warn("key %s: a history object does not parse; left alone", name);
        } else if (rc == KMS_ERR_KEY_UNAVAILABLE && !s->broken) {
            rc = KMS_OK; /* removed since the find: its key is being destroyed */
            kms_err_clear();
        }
        kms_buf_free(&value);
    }
    free(handles);
    if (rc == KMS_OK) {
        qsort(parts, nparts, sizeof *parts, part_cmp);
        for (size_t i = 0; i < nparts && rc == KMS_OK; i++) {
            char one[64];
            snprintf(one, sizeof one, "%s%lld:%s", i ? "," : "", (long long)parts[i].upto,
                     parts[i].nonce);
            rc = kms_buf_append_str(&sig, one);
            if (parts[i].upto > upto)
                upto = parts[i].upto;
        }
    }
    if (rc == KMS_OK)
        rc = kms_buf_terminate(&sig);
    if (rc == KMS_OK) {
        rc = kms_index_key_history(ks, id, v, nv, (uint32_t)upto, (const char *)sig.data);
        v = NULL;
    }
    free(v);
    free(parts);
    kms_buf_free(&sig);
    return rc;
}

static int by_ordinal(const void *a, const void *b)
{
    const struct version *x = a, *y = b;
    return (x->n > y->n) - (x->n < y->n);
}

static json_t *version_json(const struct version *v)
{
    return json_pack("{s:I, s:I, s:I, s:I, s:I, s:s, s:b}", "vid", (json_int_t)v->vid, "n",
                     (json_int_t)v->n, "created", (json_int_t)v->created, "reserved",
                     (json_int_t)v->reserved, "bound", (json_int_t)v->bound, "rotation",
                     v->on_demand ? "ON_DEMAND" : "AUTOMATIC", "listed", v->listed);
}

static kms_err write_history(struct kms_session *s, const uint8_t id[KMS_UUID_LEN],
                             const char *name, const struct version *batch, size_t n, uint32_t upto)
{
    uint8_t oid[KMS_OID_LEN], r[16];
    char nonce[33], label[128];
    struct kms_buf text = KMS_BUF_INIT;
    json_t *versions = json_array();
    CK_OBJECT_HANDLE h;
    kms_err rc;

    KMS_ENSURE(versions != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < n; i++)
        json_array_append_new(versions, version_json(&batch[i]));
    if (RAND_bytes(r, sizeof r) != 1) {
        json_decref(versions);
        return KMS_FAIL(KMS_ERR_INTERNAL, "random generator failed");
    }
    kms_hex_encode(r, sizeof r, nonce);
    json_t *doc =
        json_pack("{s:i, s:s, s:s, s:I, s:s, s:o}", "format", HISTORY_FORMAT, "kind", "history",
                  "name", name, "upto", (json_int_t)upto, "nonce", nonce, "versions", versions);
    KMS_ENSURE(doc != NULL, KMS_ERR_INTERNAL, "cannot encode a history object");
    rc = kms_json_dump(doc, JSON_SORT_KEYS, &text);
    json_decref(doc);
    snprintf(label, sizeof label, "p11kms-history:%s:%u:%s", name, upto, nonce);
    history_oid(id, oid);
    if (rc == KMS_OK)
        rc = kms_hsm_create_data(s, label, oid, sizeof oid, text.data, text.len, &h);
    kms_buf_free(&text);
    return rc;
}

/* True when the index's history of the key holds every version of batch. */
static int history_holds(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN],
                         const struct version *batch, size_t n)
{
    size_t held = 0;
    pthread_rwlock_rdlock(&ks->rw);
    struct key *k = kms_key_any_locked(ks, id);
    for (size_t i = 0; k && i < n; i++)
        for (size_t j = 0; j < k->nhistory; j++)
            if (k->history[j].vid == batch[i].vid) {
                held++;
                break;
            }
    pthread_rwlock_unlock(&ks->rw);
    return held == n;
}

kms_err kms_history_archive(struct kms_keystore *ks, struct kms_session *s,
                            const uint8_t id[KMS_UUID_LEN])
{
    struct version batch[ARCHIVE_AT + 1];
    char name[KMS_UUID_TEXT_LEN + 1];
    size_t n = 0;
    uint32_t upto = 0;

    pthread_rwlock_rdlock(&ks->rw);
    struct key *k = kms_key_find_locked(ks, id);
    if (k && k->nrecord > ARCHIVE_AT) {
        struct version *all = calloc(k->nrecord, sizeof *all);
        size_t m = 0;
        for (size_t i = 0; all && i < k->nrecord; i++)
            if (k->versions[i].vid != k->current)
                all[m++] = k->versions[i];
        qsort(all, m, sizeof *all, by_ordinal);
        for (; all && n < ARCHIVE_BATCH && n < m; n++) {
            batch[n] = all[n];
            if (batch[n].n > upto)
                upto = batch[n].n;
        }
        free(all);
    }
    pthread_rwlock_unlock(&ks->rw);
    if (n == 0)
        return KMS_OK;

    kms_uuid_format(id, name);
    KMS_GUARD(write_history(s, id, name, batch, n, upto));
    KMS_GUARD(kms_history_load(ks, s, id));
    KMS_ENSURE(history_holds(ks, id, batch, n), KMS_ERR_INTERNAL,
               "key %s: the history object just written does not read back", name);

    json_t *op = kms_op_new("archive"), *vids = json_array();
    kms_err rc = op && vids ? KMS_OK : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < n && rc == KMS_OK; i++)
        json_array_append_new(vids, json_integer(batch[i].vid));
    if (rc == KMS_OK) {
        json_object_set_new(op, "vids", vids);
        json_object_set_new(op, "upto", json_integer(upto));
        vids = NULL;
        rc = kms_key_change(ks, s, id, op);
    }
    json_decref(vids);
    json_decref(op);
    if (rc == KMS_OK)
        kms_debug("key %s: %zu versions up to #%u moved to its history", name, n, upto);
    return rc;
}

void kms_history_destroy(struct kms_session *s, const uint8_t id[KMS_UUID_LEN])
{
    CK_OBJECT_HANDLE *handles = NULL;
    size_t n = 0;
    if (find_history(s, id, &handles, &n) == KMS_OK)
        for (size_t i = 0; i < n; i++)
            if (kms_hsm_destroy(s, handles[i]) != KMS_OK)
                break;
    kms_err_clear();
    free(handles);
}
