#include "config.h"

#include "keystore/record.h"

#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/encoding.h"
#include "common/json_alloc.h"
#include "common/log.h"

#define FORMAT 2
#define APPLIED_MAX 64
#define CHANGE_ATTEMPTS 8
/* Lower generations whose changes a view still applies (kms_records_view). */
#define RECENT_GENERATIONS 8
/* Generations a writer leaves in place below the one it wrote (kms_record_change). */
#define KEEP_GENERATIONS 2
static const char application[] = "p11kms";

void kms_view_clear(struct kms_view *v)
{
    json_decref(v->applied);
    json_decref(v->state);
    memset(v, 0, sizeof *v);
}

void kms_records_free(struct kms_record *r, size_t n)
{
    for (size_t i = 0; r && i < n; i++)
        json_decref(r[i].doc);
    free(r);
}

static kms_err random_hex(char *out, size_t hex_len)
{
    uint8_t b[32];
    KMS_ENSURE(hex_len / 2 <= sizeof b && RAND_bytes(b, (int)(hex_len / 2)) == 1, KMS_ERR_INTERNAL,
               "random generator failed");
    kms_hex_encode(b, hex_len / 2, out);
    return KMS_OK;
}

json_t *kms_op_new(const char *type)
{
    char id[KMS_OP_ID_LEN + 1];
    if (random_hex(id, KMS_OP_ID_LEN) != KMS_OK)
        return NULL;
    return json_pack("{s:s, s:s}", "id", id, "type", type);
}

kms_err kms_record_label(const char *kind, const char *name, uint64_t gen, const char *nonce,
                         struct kms_buf *out)
{
    char tail[64];
    snprintf(tail, sizeof tail, ":%llu:%s", (unsigned long long)gen, nonce);
    KMS_GUARD(kms_buf_append_str(out, "p11kms-"));
    KMS_GUARD(kms_buf_append_str(out, kind));
    KMS_GUARD(kms_buf_append_u8(out, ':'));
    KMS_GUARD(kms_buf_append_str(out, name));
    KMS_GUARD(kms_buf_append_str(out, tail));
    return kms_buf_terminate(out);
}

kms_err kms_record_parse(const struct kms_record_kind *kind, const char *name, const uint8_t *p,
                         size_t n, struct kms_record *out)
{
    json_error_t jerr;
    json_t *doc = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, &jerr);
    const char *k = NULL, *nm = NULL, *nonce = NULL;
    json_int_t gen = 0;
    json_t *applied = NULL, *op = NULL, *state = NULL;
    int format = 0;

    if (!doc ||
        json_unpack(doc, "{s:i, s:s, s:s, s:I, s:s, s:o, s:o, s:o}", "format", &format, "kind", &k,
                    "name", &nm, "gen", &gen, "nonce", &nonce, "applied", &applied, "op", &op,
                    "state", &state) != 0 ||
        format != FORMAT || gen < 1 || !json_is_array(applied) || !json_is_object(op) ||
        !(json_is_object(state) || json_is_null(state)) || strcmp(k, kind->kind) != 0 ||
        (name && strcmp(nm, name) != 0)) {
        json_decref(doc);
        return KMS_FAIL(KMS_ERR_INTERNAL, "a p11kms record in the token does not parse");
    }
    out->doc = doc;
    out->gen = (uint64_t)gen;
    out->nonce = nonce;
    return KMS_OK;
}

static int nonce_order(const void *a, const void *b)
{
    const struct kms_record *x = *(const struct kms_record *const *)a;
    const struct kms_record *y = *(const struct kms_record *const *)b;
    return strcmp(x->nonce, y->nonce);
}

/* Generation, then nonce: the order in which older changes are applied. */
static int gen_nonce_order(const void *a, const void *b)
{
    const struct kms_record *x = *(const struct kms_record *const *)a;
    const struct kms_record *y = *(const struct kms_record *const *)b;
    if (x->gen != y->gen)
        return x->gen < y->gen ? -1 : 1;
    return strcmp(x->nonce, y->nonce);
}

static int applied_has(const json_t *applied, const char *id)
{
    size_t i;
    json_t *v;
    json_array_foreach(applied, i, v)
    {
        if (json_is_string(v) && strcmp(json_string_value(v), id) == 0)
            return 1;
    }
    return 0;
}

static void applied_add(json_t *applied, const char *id)
{
    json_array_append_new(applied, json_string(id));
    while (json_array_size(applied) > APPLIED_MAX)
        json_array_remove(applied, 0);
}

static const char *op_id(const json_t *op)
{
    const char *id = json_string_value(json_object_get(op, "id"));
    return id ? id : "";
}

/* Applies a change the view does not hold yet on top of it; one that fails is left out. */
static void apply_on_top(const struct kms_record_kind *kind, struct kms_view *out, const json_t *op)
{
    if (applied_has(out->applied, op_id(op)))
        return;
    json_t *next = out->state ? json_deep_copy(out->state) : NULL;
    if (kind->apply(&next, op) == KMS_OK) {
        json_decref(out->state);
        out->state = next;
        applied_add(out->applied, op_id(op));
    } else {
        json_decref(next);
        kms_err_clear();
    }
}

kms_err kms_records_view(const struct kms_record_kind *kind, struct kms_record *r, size_t n,
                         struct kms_view *out)
{
    struct kms_record **top;
    size_t ntop = 0;
    uint64_t gen = 0;

    memset(out, 0, sizeof *out);
    out->applied = json_array();
    KMS_ENSURE(out->applied != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < n; i++)
        if (r[i].gen > gen)
            gen = r[i].gen;
    if (n == 0)
        return KMS_OK;
    top = calloc(n, sizeof *top);
    KMS_ENSURE(top != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < n; i++)
        if (r[i].gen == gen)
            top[ntop++] = &r[i];
    qsort(top, ntop, sizeof *top, nonce_order);

    out->gen = gen;
    json_t *state = json_object_get(top[0]->doc, "state");
    out->state = json_is_null(state) ? NULL : json_deep_copy(state);
    json_array_extend(out->applied, json_object_get(top[0]->doc, "applied"));
    /* Changes written at the same generation by other nodes, on top of the winner. */
    for (size_t i = 1; i < ntop; i++)
        apply_on_top(kind, out, json_object_get(top[i]->doc, "op"));
    /*
     * Changes of lower generations the view does not hold: a writer whose
     * scan missed a record (written between its scan and its write, or not yet
     * shown by the token) wrote the next generation without that change,
     * although the change's own writer had already seen it merged in and
     * answered success. Such a record stays until a winning record holds its
     * change (kms_record_change), and every reader applies it meanwhile,
     * oldest first, when the kind says it may come late (a new version does;
     * a disable would undo a later enable). Only recent generations: an old
     * leftover whose id has left "applied" must not be applied twice.
     */
    size_t nlow = 0;
    for (size_t i = 0; i < n; i++)
        if (r[i].gen < gen && r[i].gen + RECENT_GENERATIONS >= gen && kind->late &&
            kind->late(json_object_get(r[i].doc, "op")))
            top[nlow++] = &r[i];
    qsort(top, nlow, sizeof *top, gen_nonce_order);
    for (size_t i = 0; i < nlow; i++)
        apply_on_top(kind, out, json_object_get(top[i]->doc, "op"));
    free(top);
    if (kind->keep && out->state)
        for (size_t i = 0; i < n; i++) {
            json_t *other = json_object_get(r[i].doc, "state");
            if (json_is_object(other))
                kind->keep(out->state, other);
        }
    return KMS_OK;
}

kms_err kms_records_scan(struct kms_session *s, const struct kms_record_kind *kind,
                         const char *name, const uint8_t oid[KMS_OID_LEN], struct kms_record **out,
                         size_t *n)
{
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_APPLICATION, (void *)application, sizeof application - 1},
        {CKA_OBJECT_ID, (void *)oid, KMS_OID_LEN},
    };

    for (int attempt = 0;; attempt++) {
        CK_OBJECT_HANDLE *handles = NULL;
        size_t count = 0, got = 0;
        struct kms_record *recs;
        int vanished = 0;
        kms_err rc;

        KMS_GUARD(kms_hsm_find(s, tmpl, 3, &handles, &count));
        recs = calloc(count + 1, sizeof *recs);
        if (!recs) {
            free(handles);
            return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        }
        rc = KMS_OK;
        for (size_t i = 0; i < count && rc == KMS_OK; i++) {
            struct kms_buf value = KMS_BUF_INIT;
            rc = kms_hsm_get_bytes(s, handles[i], CKA_VALUE, &value);
            if (rc == KMS_OK &&
                kms_record_parse(kind, name, value.data, value.len, &recs[got]) == KMS_OK)
                recs[got++].handle = handles[i];
            else if (rc == KMS_OK)
                kms_err_clear(); /* another kind sharing the id, or a damaged object: not ours */
            else if (rc == KMS_ERR_KEY_UNAVAILABLE && !s->broken) {
                rc = KMS_OK; /* removed by another node between find and read */
                vanished = 1;
                kms_err_clear();
            }
            kms_buf_free(&value);
        }
        free(handles);
        if (rc != KMS_OK) {
            kms_records_free(recs, got);
            return rc;
        }
        /*
         * A record removed between the find and the read was superseded by
         * one written after the find: without a second look the view would
         * miss the newest state, or the whole entity ("does not exist").
         * Each look waits a little longer, for a token that shows another
         * process's new objects late (SoftHSM2's file store).
         */
        if (vanished && attempt < 4) {
            kms_records_free(recs, got);
            struct timespec pause = {0, (attempt + 1) * 10 * 1000000L};
            nanosleep(&pause, NULL);
            continue;
        }
        *out = recs;
        *n = got;
        return KMS_OK;
    }
}

static kms_err write_record(struct kms_session *s, const struct kms_record_kind *kind,
                            const char *name, const uint8_t oid[KMS_OID_LEN], uint64_t gen,
                            const json_t *applied, const json_t *op, const json_t *state,
                            CK_OBJECT_HANDLE *h, json_t **doc_out)
{
    char nonce[33];
    struct kms_buf label = KMS_BUF_INIT, text = KMS_BUF_INIT;
    json_t *doc;
    kms_err rc;

    KMS_GUARD(random_hex(nonce, 32));
    doc = json_pack("{s:i, s:s, s:s, s:I, s:s, s:O, s:O, s:O}", "format", FORMAT, "kind",
                    kind->kind, "name", name, "gen", (json_int_t)gen, "nonce", nonce, "applied",
                    applied, "op", op, "state", state ? state : json_null());
    KMS_ENSURE(doc != NULL, KMS_ERR_INTERNAL, "cannot encode a record");
    rc = kms_json_dump(doc, JSON_SORT_KEYS, &text);
    if (rc == KMS_OK)
        rc = kms_record_label(kind->kind, name, gen, nonce, &label);
    if (rc == KMS_OK)
        rc = kms_hsm_create_data(s, (const char *)label.data, oid, KMS_OID_LEN, text.data, text.len,
                                 h);
    if (rc == KMS_OK && doc_out)
        *doc_out = doc;
    else
        json_decref(doc);
    kms_buf_free(&label);
    kms_buf_free(&text);
    return rc;
}

kms_err kms_record_create(struct kms_session *s, const struct kms_record_kind *kind,
                          const char *name, const uint8_t oid[KMS_OID_LEN], const json_t *op,
                          struct kms_view *out)
{
    struct kms_record rec = {0};
    CK_OBJECT_HANDLE h;
    json_t *state = NULL, *applied = json_array();
    kms_err rc;

    KMS_ENSURE(applied != NULL, KMS_ERR_INTERNAL, "out of memory");
    KMS_ENSURE(*op_id(op), KMS_ERR_INTERNAL, "a change needs an id");
    applied_add(applied, op_id(op));
    rc = kind->apply(&state, op);
    if (rc == KMS_OK)
        rc = write_record(s, kind, name, oid, 1, applied, op, state, &h, &rec.doc);
    json_decref(state);
    json_decref(applied);
    /* The view every reader computes from this one record. */
    if (rc == KMS_OK) {
        rec.handle = h;
        rec.gen = 1;
        rec.nonce = json_string_value(json_object_get(rec.doc, "nonce"));
        rc = kms_records_view(kind, &rec, 1, out);
    }
    json_decref(rec.doc);
    return rc;
}

/* The "applied" list of the record every reader takes as the base of the view. */
static const json_t *winner_applied(const struct kms_record *r, size_t n)
{
    const struct kms_record *w = NULL;
    for (size_t i = 0; i < n; i++)
        if (!w || r[i].gen > w->gen || (r[i].gen == w->gen && strcmp(r[i].nonce, w->nonce) < 0))
            w = &r[i];
    return w ? json_object_get(w->doc, "applied") : NULL;
}

/*
 * A change that finally failed takes back the records it wrote, so that no
 * reader applies it later (kms_records_view applies older changes it lacks).
 */
static kms_err withdraw(struct kms_session *s, const CK_OBJECT_HANDLE *written, int n, kms_err rc)
{
    char message[512];
    snprintf(message, sizeof message, "%s", kms_err_message());
    for (int i = 0; i < n; i++)
        if (kms_hsm_destroy(s, written[i]) != KMS_OK) {
            kms_err_clear();
            return KMS_FAIL(rc, "%s", message);
        }
    return rc;
}

kms_err kms_record_change(struct kms_session *s, const struct kms_record_kind *kind,
                          const char *name, const uint8_t oid[KMS_OID_LEN], const json_t *op,
                          struct kms_view *out)
{
    const char *id = op_id(op);
    CK_OBJECT_HANDLE written[CHANGE_ATTEMPTS];
    int nwritten = 0;

    KMS_ENSURE(*id, KMS_ERR_INTERNAL, "a change needs an id");
    for (int attempt = 0; attempt < CHANGE_ATTEMPTS; attempt++) {
        struct kms_record *before = NULL, *after = NULL;
        size_t nbefore = 0, nafter = 0;
        struct kms_view view = {0};
        json_t *next = NULL, *applied = NULL;
        kms_err rc;

        rc = kms_records_scan(s, kind, name, oid, &before, &nbefore);
        if (rc == KMS_OK)
            rc = kms_records_view(kind, before, nbefore, &view);
        if (rc == KMS_OK && applied_has(view.applied, id)) {
            /* Written by an earlier attempt and merged in since. */
            kms_records_free(before, nbefore);
            *out = view;
            return KMS_OK;
        }
        if (rc == KMS_OK) {
            next = view.state ? json_deep_copy(view.state) : NULL;
            rc = kind->apply(&next, op);
        }
        if (rc == KMS_OK) {
            applied = json_copy(view.applied);
            applied_add(applied, id);
            rc = write_record(s, kind, name, oid, view.gen + 1, applied, op, next,
                              &written[nwritten], NULL);
            nwritten += rc == KMS_OK;
        }
        json_decref(next);
        json_decref(applied);
        kms_view_clear(&view);
        if (rc == KMS_OK)
            rc = kms_records_scan(s, kind, name, oid, &after, &nafter);
        if (rc == KMS_OK)
            rc = kms_records_view(kind, after, nafter, &view);
        if (rc == KMS_OK && applied_has(view.applied, id)) {
            /*
             * Every record read before the write is folded into ours, but
             * ours may not be the record readers build on: an older record
             * may go only once its change is in that one (or it is too old
             * for any view to apply). And not the generation just below:
             * a writer that read the generation below that one, before
             * some of its records appeared, may still add a record at ours
             * that wins the merge and lacks their changes; while those
             * records remain, every view applies their changes. Records
             * that appeared since are left for their writers to settle.
             */
            const json_t *kept = winner_applied(after, nafter);
            for (size_t i = 0; i < nbefore; i++)
                if (before[i].gen + KEEP_GENERATIONS <= view.gen &&
                    (applied_has(kept, op_id(json_object_get(before[i].doc, "op"))) ||
                     before[i].gen + RECENT_GENERATIONS < view.gen) &&
                    kms_hsm_destroy(s, before[i].handle) != KMS_OK)
                    kms_err_clear();
            kms_records_free(before, nbefore);
            kms_records_free(after, nafter);
            *out = view;
            return KMS_OK;
        }
        kms_records_free(before, nbefore);
        kms_records_free(after, nafter);
        kms_view_clear(&view);
        if (rc != KMS_OK)
            return withdraw(s, written, nwritten, rc);
        kms_debug("%s %s: change %s lost a race, writing it again", kind->kind, name, id);
    }
    return withdraw(
        s, written, nwritten,
        KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT, "The change could not be settled in the key store"));
}
