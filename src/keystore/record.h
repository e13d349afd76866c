/*
 * Generational records: how p11kms keeps mutable state in a token that has
 * neither compare-and-swap nor unique constraints (DESIGN §5).
 *
 * An entity (a key, an alias) is a set of CKO_DATA objects sharing
 * CKA_OBJECT_ID. Each holds a JSON document: the entity's whole state, its
 * generation, a random nonce, the change (op) that produced it and the ids of
 * recent changes applied. A change is written as generation top+1 and then
 * checked: when two nodes wrote the same generation, every reader takes the
 * one with the lowest nonce and re-applies the others' changes on top, in
 * nonce order, so all nodes compute the same view; a writer whose change is
 * not in the view it reads back writes it again on top. What must never be
 * lost (a key's versions) is folded in from every record, whatever its
 * generation.
 */
#ifndef P11KMS_RECORD_H
#define P11KMS_RECORD_H

#include <jansson.h>
#include <stdint.h>

#include "hsm/hsm.h"

#define KMS_OID_LEN 16
#define KMS_OP_ID_LEN 16 /* hex characters */

struct kms_record {
    CK_OBJECT_HANDLE handle;
    uint64_t gen;
    const char *nonce; /* points into doc */
    json_t *doc;       /* {format, kind, name, gen, nonce, applied, op, state} */
};

struct kms_record_kind {
    const char *kind; /* "key", "alias" */
    /*
     * Applies op to *state in place (*state is NULL when the entity does not
     * exist). Must depend on nothing but *state and op, so that every node
     * computes the same result.
     */
    kms_err (*apply)(json_t **state, const json_t *op);
    /* Folds into state what must survive from another record. May be NULL. */
    void (*keep)(json_t *state, const json_t *other);
    /*
     * True when op still holds if applied after changes made later than it
     * (it commutes with them), so that a view applies it when a writer of a
     * later generation missed it. May be NULL (never).
     */
    int (*late)(const json_t *op);
};

/* The entity as every node sees it. state is NULL when there is none. */
struct kms_view {
    uint64_t gen;
    json_t *applied;
    json_t *state;
};

void kms_view_clear(struct kms_view *v);
void kms_records_free(struct kms_record *r, size_t n);

/* Parses one record's document; refuses one of another kind or name. */
KMS_MUST_CHECK kms_err kms_record_parse(const struct kms_record_kind *kind, const char *name,
                                        const uint8_t *p, size_t n, struct kms_record *out);

/* The view of a set of records of one entity (pure; see above). */
KMS_MUST_CHECK kms_err kms_records_view(const struct kms_record_kind *kind, struct kms_record *r,
                                        size_t n, struct kms_view *out);

/* All records of one entity in the token. */
KMS_MUST_CHECK kms_err kms_records_scan(struct kms_session *s, const struct kms_record_kind *kind,
                                        const char *name, const uint8_t oid[KMS_OID_LEN],
                                        struct kms_record **out, size_t *n);

/*
 * Writes a change to an entity and returns the view that holds it. op must
 * carry a unique "id". The error the change meets on the current state (e.g.
 * KMS_ERR_DISABLED) is returned as is and nothing is written.
 */
KMS_MUST_CHECK kms_err kms_record_change(struct kms_session *s, const struct kms_record_kind *kind,
                                         const char *name, const uint8_t oid[KMS_OID_LEN],
                                         const json_t *op, struct kms_view *out);

/*
 * Writes the first record of an entity no other writer can know of yet (its
 * name is a fresh random id, not yet shown to anyone): generation 1, with no
 * scan before or after, so its cost does not grow with the token's objects.
 */
KMS_MUST_CHECK kms_err kms_record_create(struct kms_session *s, const struct kms_record_kind *kind,
                                         const char *name, const uint8_t oid[KMS_OID_LEN],
                                         const json_t *op, struct kms_view *out);

/* A fresh op {"id": random, "type": type}. */
json_t *kms_op_new(const char *type);

/* The label every record carries: "p11kms-<kind>:<name>:<gen>:<nonce>". */
KMS_MUST_CHECK kms_err kms_record_label(const char *kind, const char *name, uint64_t gen,
                                        const char *nonce, struct kms_buf *out);

#endif
