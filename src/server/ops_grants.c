/*
 * Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant,
 * RevokeGrant (docs/api.md). A grant lets its grantee use a key for the
 * operations it names (authz.c decides with the key's grants after its
 * policy); the key store keeps grants with their key (keystore/grants.c).
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/encoding.h"
#include "common/keyspec.h"
#include "server/grants.h"
#include "server/ops.h"

#define GRANT_LIMIT_MAX 100
#define GRANT_LIMIT_DEFAULT 50
#define NAME_CHARS "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789:/_-"

/* DryRun would ask for a check without the change: not offered (as ops_asym.c). */
static kms_err no_dry_run(json_t *in)
{
    json_t *v = json_object_get(in, "DryRun");
    KMS_ENSURE(!v || json_is_boolean(v) || json_is_null(v), KMS_ERR_SERIALIZATION,
               "DryRun must be a boolean");
    KMS_ENSURE(!json_is_true(v), KMS_ERR_UNSUPPORTED, "DryRun is not supported");
    return KMS_OK;
}

static int all_of(const char *s, const char *chars)
{
    return s[0] && strspn(s, chars) == strlen(s);
}

/*
 * A principal member as a grant keeps it: a principal name of this server
 * (alice) becomes its user ARN; a user ARN (arn:aws:iam::<12 digits>:user/<name>)
 * stays as it is.
 */
static kms_err principal_arn(struct kms_server *srv, const char *member, const char *in,
                             char out[KMS_GRANT_PRINCIPAL_MAX + 1])
{
    static const char prefix[] = "arn:aws:iam::";
    const size_t plen = sizeof prefix - 1;
    if (strlen(in) <= KMS_PRINCIPAL_MAX && all_of(in, KMS_PRINCIPAL_CHARS)) {
        snprintf(out, KMS_GRANT_PRINCIPAL_MAX + 1, "arn:aws:iam::%s:user/%s", srv->cfg.account, in);
        return KMS_OK;
    }
    const char *acct = in + plen, *user = acct + 12;
    int ok = strncmp(in, prefix, plen) == 0 && strlen(in) > plen + 12 &&
             strspn(acct, "0123456789") == 12 && strncmp(user, ":user/", 6) == 0 &&
             strlen(user + 6) <= KMS_PRINCIPAL_MAX && all_of(user + 6, KMS_PRINCIPAL_CHARS);
    KMS_ENSURE(ok, KMS_ERR_VALIDATION,
               "%s '%.256s' is not a principal: give a principal name or "
               "arn:aws:iam::<account>:user/<name>",
               member, in);
    snprintf(out, KMS_GRANT_PRINCIPAL_MAX + 1, "%s", in);
    return KMS_OK;
}

static void caller_arn(struct kms_request *r, char out[KMS_GRANT_PRINCIPAL_MAX + 1])
{
    snprintf(out, KMS_GRANT_PRINCIPAL_MAX + 1, "arn:aws:iam::%s:user/%s", r->srv->cfg.account,
             r->principal);
}

/* A grant id: 64 lowercase hex characters, else InvalidGrantIdException. */
static kms_err grant_id_check(const char *id)
{
    KMS_ENSURE(strlen(id) == KMS_GRANT_ID_LEN && all_of(id, "0123456789abcdef"),
               KMS_ERR_INVALID_GRANT_ID, "Invalid grant ID '%.128s'", id);
    return KMS_OK;
}

/* KeyId of these operations: a key id or key ARN (not an alias), as AWS's. */
static kms_err key_ref(json_t *in, const char **ref)
{
    KMS_GUARD(kms_in_string(in, "KeyId", 1, 1, 2048, ref));
    KMS_ENSURE(strncmp(*ref, "alias/", 6) != 0 && !strstr(*ref, ":alias/"), KMS_ERR_NOT_FOUND,
               "Key '%.256s' does not exist: this operation takes a key id or key ARN", *ref);
    return KMS_OK;
}

static kms_err operations_in(json_t *in, uint32_t *out)
{
    json_t *v = json_object_get(in, "Operations"), *op;
    size_t i;
    *out = 0;
    KMS_ENSURE(v && !json_is_null(v), KMS_ERR_VALIDATION,
               "1 validation error detected: Value null at 'operations' failed to satisfy "
               "constraint: Member must not be null");
    KMS_ENSURE(json_is_array(v), KMS_ERR_SERIALIZATION, "Operations must be a list of strings");
    KMS_ENSURE(json_array_size(v) > 0, KMS_ERR_VALIDATION,
               "1 validation error detected: Value '[]' at 'operations' failed to satisfy "
               "constraint: Member must have length greater than or equal to 1");
    json_array_foreach(v, i, op)
    {
        KMS_ENSURE(json_is_string(op), KMS_ERR_SERIALIZATION,
                   "Operations must be a list of strings");
        int bit = kms_grant_op_index(json_string_value(op));
        KMS_ENSURE(bit >= 0, KMS_ERR_VALIDATION,
                   "1 validation error detected: Value '[%.64s]' at 'operations' failed to "
                   "satisfy constraint: Member must satisfy constraint: [Member must satisfy "
                   "enum value set: [Decrypt, Encrypt, GenerateDataKey, "
                   "GenerateDataKeyWithoutPlaintext, ReEncryptFrom, ReEncryptTo, Sign, Verify, "
                   "GetPublicKey, CreateGrant, RetireGrant, DescribeKey, GenerateDataKeyPair, "
                   "GenerateDataKeyPairWithoutPlaintext, GenerateMac, VerifyMac, "
                   "DeriveSharedSecret]]",
                   json_string_value(op));
        *out |= UINT32_C(1) << bit;
    }
    return KMS_OK;
}

/* The grant's operations and constraints must suit the key (AWS's key type rules). */
static kms_err suits_key(const struct kms_key_info *k, uint32_t ops, const char *constraints)
{
    uint32_t bad = ops & ~kms_grant_ops_for_key(k->spec, k->usage);
    const struct kms_spec_info *s = kms_spec(k->spec);
    for (int i = 0; i < KMS_GRANT_OP_COUNT; i++)
        KMS_ENSURE(!(bad & (UINT32_C(1) << i)), KMS_ERR_VALIDATION,
                   "Grant operation %s is not valid for %s: its KeySpec is %s and its KeyUsage "
                   "%s",
                   kms_grant_op_name(i), k->arn, s ? s->name : "?", kms_usage_name(k->usage));
    KMS_ENSURE(!constraints[0] || k->spec == KMS_SPEC_SYMMETRIC_DEFAULT, KMS_ERR_VALIDATION,
               "Grant constraints are not supported for %s: encryption context constraints are "
               "only for symmetric encryption keys",
               k->arn);
    return KMS_OK;
}

/*
 * A grant made by a grantee through its grant's CreateGrant: no more
 * operations than that grant has, constraints at least as strict.
 */
static kms_err within_parent(struct kms_request *r, const char *parent_id,
                             const struct kms_grant_row *g)
{
    struct kms_grant_row *p = malloc(sizeof *p);
    KMS_ENSURE(p != NULL, KMS_ERR_INTERNAL, "out of memory");
    kms_err rc = kms_keystore_grant_get(r->srv->ks, parent_id, p);
    if (rc == KMS_OK && ((g->operations & ~p->operations) ||
                         !kms_grant_constraints_within(p->constraints, g->constraints)))
        rc = KMS_FAIL(KMS_ERR_ACCESS_DENIED,
                      "User: %s is not authorized to perform: kms:CreateGrant on resource: %s "
                      "because the grant that allows it (%s) allows no more operations and no "
                      "weaker constraints than its own",
                      r->principal, r->key_arn, parent_id);
    else if (rc == KMS_ERR_NOT_FOUND)
        rc = KMS_FAIL(KMS_ERR_ACCESS_DENIED,
                      "User: %s is not authorized to perform: kms:CreateGrant on resource: %s",
                      r->principal, r->key_arn);
    free(p);
    return rc;
}

/* Appends "; grant <id>" to the decision: the audit line names the grant. */
static void note_grant(struct kms_request *r, const char *id)
{
    size_t n = strlen(r->decision);
    snprintf(r->decision + n, sizeof r->decision - n, "; grant %s", id);
}

kms_err kms_op_create_grant(struct kms_request *r)
{
    const char *ref, *grantee, *retiring, *name;
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    struct kms_key_info k = {0};
    char token[KMS_GRANT_TOKEN_LEN + 1];
    int existing = 0;

    struct kms_grant_row *g = calloc(1, sizeof *g);
    KMS_ENSURE(g != NULL, KMS_ERR_INTERNAL, "out of memory");
    kms_err rc = key_ref(r->in, &ref);
    if (rc == KMS_OK)
        rc = kms_in_string(r->in, "GranteePrincipal", 1, 1, KMS_GRANT_PRINCIPAL_MAX, &grantee);
    if (rc == KMS_OK)
        rc = kms_in_string(r->in, "RetiringPrincipal", 0, 1, KMS_GRANT_PRINCIPAL_MAX, &retiring);
    if (rc == KMS_OK)
        rc = kms_in_string(r->in, "Name", 0, 1, KMS_GRANT_NAME_MAX, &name);
    if (rc == KMS_OK && name && !all_of(name, NAME_CHARS))
        rc = KMS_FAIL(KMS_ERR_VALIDATION,
                      "1 validation error detected: Value '%.256s' at 'name' failed to satisfy "
                      "constraint: Member must satisfy regular expression pattern: "
                      "^[a-zA-Z0-9:/_-]+$",
                      name);
    if (rc == KMS_OK)
        rc = operations_in(r->in, &g->operations);
    if (rc == KMS_OK)
        rc = kms_grant_constraints_text(json_object_get(r->in, "Constraints"), g->constraints,
                                        sizeof g->constraints);
    if (rc == KMS_OK)
        rc = kms_in_grant_tokens(r->in);
    if (rc == KMS_OK)
        rc = no_dry_run(r->in);
    if (rc == KMS_OK)
        rc = principal_arn(r->srv, "GranteePrincipal", grantee, g->grantee);
    if (rc == KMS_OK && retiring)
        rc = principal_arn(r->srv, "RetiringPrincipal", retiring, g->retiring);
    if (rc == KMS_OK)
        rc = kms_authorize(r, "kms:CreateGrant", ref, 0, NULL, &key);
    if (rc == KMS_OK)
        rc = kms_keystore_key_info(r->srv->ks, &key, &k);
    if (rc == KMS_OK)
        rc = suits_key(&k, g->operations, g->constraints);
    if (rc == KMS_OK && strncmp(r->decision, "allow grant ", 12) == 0)
        rc = within_parent(r, r->decision + 12, g);
    if (rc == KMS_OK) {
        memcpy(g->key_id, key.id, KMS_UUID_LEN);
        snprintf(g->name, sizeof g->name, "%s", name ? name : "");
        caller_arn(r, g->issuer);
        rc = kms_keystore_create_grant(r->srv->ks, g, &existing);
    }
    if (rc == KMS_OK) {
        note_grant(r, g->grant_id);
        kms_grant_token_make(key.id, g->grant_id, token);
        r->out = json_pack("{s:s, s:s}", "GrantId", g->grant_id, "GrantToken", token);
        if (!r->out)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    kms_key_info_clear(&k);
    kms_keystore_unhold(r->srv->ks, &key);
    free(g);
    return rc;
}

/* ---- lists ---- */

struct page {
    struct kms_request *r;
    json_t *list;
    size_t limit;
    const char *grantee;             /* ListGrants' GranteePrincipal filter (an ARN), or NULL */
    const char *grant_id;            /* ListGrants' GrantId filter, or NULL */
    char next[KMS_GRANT_ID_LEN + 1]; /* the first grant past the page: the next marker */
    kms_err failed;
};

static json_t *grant_json(struct kms_request *r, const struct kms_grant_row *g)
{
    char id[KMS_UUID_TEXT_LEN + 1], arn[KMS_ARN_MAX], issuer[64];
    json_t *ops = json_array(), *o;
    kms_uuid_format(g->key_id, id);
    snprintf(arn, sizeof arn, "arn:aws:kms:%s:%s:key/%s", r->srv->cfg.region, r->srv->cfg.account,
             id);
    snprintf(issuer, sizeof issuer, "arn:aws:iam::%s:root", r->srv->cfg.account);
    for (int i = 0; ops && i < KMS_GRANT_OP_COUNT; i++)
        if (g->operations & (UINT32_C(1) << i))
            json_array_append_new(ops, json_string(kms_grant_op_name(i)));
    o = json_pack("{s:s, s:s, s:I, s:s, s:s, s:o}", "KeyId", arn, "GrantId", g->grant_id,
                  "CreationDate", (json_int_t)g->created, "GranteePrincipal", g->grantee,
                  "IssuingAccount", issuer, "Operations", ops);
    if (o && g->name[0])
        json_object_set_new(o, "Name", json_string(g->name));
    if (o && g->retiring[0])
        json_object_set_new(o, "RetiringPrincipal", json_string(g->retiring));
    if (o && g->constraints[0]) {
        json_t *c = json_loads(g->constraints, JSON_REJECT_DUPLICATES, NULL);
        if (c)
            json_object_set_new(o, "Constraints", c);
    }
    return o;
}

/* Stops the store's walk: the page is full and the next grant is known. */
#define PAGE_FULL KMS_ERR_LIMIT_EXCEEDED

static kms_err page_add(void *arg, const struct kms_grant_row *g)
{
    struct page *p = arg;
    if (p->grantee && strcmp(p->grantee, g->grantee) != 0)
        return KMS_OK;
    if (p->grant_id && strcmp(p->grant_id, g->grant_id) != 0)
        return KMS_OK;
    if (json_array_size(p->list) == p->limit) {
        memcpy(p->next, g->grant_id, sizeof p->next);
        return PAGE_FULL;
    }
    json_t *o = grant_json(p->r, g);
    if (!o || json_array_append_new(p->list, o) != 0) {
        p->failed = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
        return p->failed;
    }
    return KMS_OK;
}

/* Limit and Marker of the list operations. */
static kms_err page_in(json_t *in, size_t *limit, const char **marker)
{
    KMS_GUARD(kms_in_limit(in, GRANT_LIMIT_MAX, GRANT_LIMIT_DEFAULT, limit));
    KMS_GUARD(kms_in_marker(in, marker));
    /* A page ends at a grant: a marker that is no grant id is one no page answered. */
    KMS_ENSURE(!*marker ||
                   (strlen(*marker) == KMS_GRANT_ID_LEN && all_of(*marker, "0123456789abcdef")),
               KMS_ERR_INVALID_MARKER, "Marker is not valid");
    return KMS_OK;
}

static kms_err page_out(struct kms_request *r, struct page *p, kms_err rc)
{
    if (rc == PAGE_FULL && p->next[0] && p->failed == KMS_OK) {
        kms_err_clear();
        rc = KMS_OK;
    }
    if (rc != KMS_OK) {
        json_decref(p->list);
        return rc;
    }
    r->out = json_pack("{s:o, s:b}", "Grants", p->list, "Truncated", p->next[0] != '\0');
    KMS_ENSURE(r->out != NULL, KMS_ERR_INTERNAL, "out of memory");
    if (p->next[0])
        json_object_set_new(r->out, "NextMarker", json_string(p->next));
    return KMS_OK;
}

kms_err kms_op_list_grants(struct kms_request *r)
{
    const char *ref, *marker, *grant_id, *grantee;
    char grantee_arn[KMS_GRANT_PRINCIPAL_MAX + 1];
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    struct page p = {r, NULL, 0, NULL, NULL, "", KMS_OK};

    KMS_GUARD(key_ref(r->in, &ref));
    KMS_GUARD(page_in(r->in, &p.limit, &marker));
    KMS_GUARD(kms_in_string(r->in, "GrantId", 0, 1, 128, &grant_id));
    KMS_GUARD(kms_in_string(r->in, "GranteePrincipal", 0, 1, KMS_GRANT_PRINCIPAL_MAX, &grantee));
    if (grant_id)
        KMS_GUARD(grant_id_check(grant_id));
    if (grantee) {
        KMS_GUARD(principal_arn(r->srv, "GranteePrincipal", grantee, grantee_arn));
        p.grantee = grantee_arn;
    }
    p.grant_id = grant_id;
    /* A destroyed key's tombstone answers with no grants, as AWS lists them until then. */
    KMS_GUARD(kms_authorize(r, "kms:ListGrants", ref, 0, NULL, &key));
    KMS_ENSURE((p.list = json_array()) != NULL, KMS_ERR_INTERNAL, "out of memory");
    kms_err rc =
        kms_keystore_list_grants(r->srv->ks, key.id, marker, KMS_GRANTS_PER_KEY, page_add, &p);
    kms_keystore_unhold(r->srv->ks, &key);
    return page_out(r, &p, rc);
}

kms_err kms_op_list_retirable_grants(struct kms_request *r)
{
    const char *retiring, *marker;
    char arn[KMS_GRANT_PRINCIPAL_MAX + 1], me[KMS_GRANT_PRINCIPAL_MAX + 1];
    struct page p = {r, NULL, 0, NULL, NULL, "", KMS_OK};

    KMS_GUARD(kms_in_string(r->in, "RetiringPrincipal", 1, 1, KMS_GRANT_PRINCIPAL_MAX, &retiring));
    KMS_GUARD(page_in(r->in, &p.limit, &marker));
    KMS_GUARD(principal_arn(r->srv, "RetiringPrincipal", retiring, arn));
    /*
     * No key to ask: a principal lists the grants it may retire itself; the
     * admins anyone's (AWS asks the caller's IAM policy, which p11kms has not).
     */
    caller_arn(r, me);
    if (kms_is_admin(r->srv, r->principal)) {
        snprintf(r->decision, sizeof r->decision, "admin");
    } else if (strcmp(me, arn) == 0) {
        snprintf(r->decision, sizeof r->decision, "allow (own retirable grants)");
    } else {
        snprintf(r->decision, sizeof r->decision, "deny (another principal's retirable grants)");
        return KMS_FAIL(KMS_ERR_ACCESS_DENIED,
                        "User: %s is not authorized to perform: kms:ListRetirableGrants for "
                        "RetiringPrincipal %.256s: only that principal and the admins may",
                        r->principal, retiring);
    }
    KMS_ENSURE((p.list = json_array()) != NULL, KMS_ERR_INTERNAL, "out of memory");
    kms_err rc = kms_keystore_list_retirable(r->srv->ks, arn, marker, p.limit + 1, page_add, &p);
    return page_out(r, &p, rc);
}

/* ---- retire and revoke ---- */

/* The grant named by a token or by KeyId and GrantId; NotFoundException when there is none. */
static kms_err find_grant(struct kms_request *r, const char *ref, const char *grant_id,
                          const uint8_t *token_key, struct kms_grant_row *g)
{
    struct kms_key_info k = {0};
    uint8_t id[KMS_UUID_LEN];
    kms_err rc = kms_keystore_grant_get(r->srv->ks, grant_id, g);
    if (rc == KMS_ERR_NOT_FOUND)
        return KMS_FAIL(KMS_ERR_NOT_FOUND, "Grant ID %s not found", grant_id);
    KMS_GUARD(rc);
    if (token_key)
        memcpy(id, token_key, KMS_UUID_LEN);
    if (ref) {
        KMS_GUARD(kms_keystore_describe(r->srv->ks, ref, &k));
        memcpy(id, k.id, KMS_UUID_LEN);
        kms_key_info_clear(&k);
    }
    KMS_ENSURE(memcmp(id, g->key_id, KMS_UUID_LEN) == 0, KMS_ERR_NOT_FOUND, "Grant ID %s not found",
               grant_id);
    return KMS_OK;
}

kms_err kms_op_retire_grant(struct kms_request *r)
{
    const char *token, *ref, *grant_id;
    uint8_t token_key[KMS_UUID_LEN];
    char token_grant[KMS_GRANT_ID_LEN + 1], me[KMS_GRANT_PRINCIPAL_MAX + 1];
    char key_text[KMS_UUID_TEXT_LEN + 1];

    KMS_GUARD(kms_in_string(r->in, "GrantToken", 0, 1, 8192, &token));
    KMS_GUARD(kms_in_string(r->in, "KeyId", 0, 1, 2048, &ref));
    KMS_GUARD(kms_in_string(r->in, "GrantId", 0, 1, 128, &grant_id));
    KMS_GUARD(no_dry_run(r->in));
    KMS_ENSURE(token || (ref && grant_id), KMS_ERR_VALIDATION,
               "Either GrantToken, or both KeyId and GrantId, must be given");
    if (ref)
        KMS_GUARD(key_ref(r->in, &ref));
    if (grant_id)
        KMS_GUARD(grant_id_check(grant_id));
    if (token) {
        KMS_GUARD(kms_grant_token_read(token, strlen(token), token_key, token_grant));
        KMS_ENSURE(!grant_id || strcmp(grant_id, token_grant) == 0, KMS_ERR_INVALID_GRANT_ID,
                   "GrantId %s is not the grant GrantToken names", grant_id);
        grant_id = token_grant;
    }
    struct kms_grant_row *g = malloc(sizeof *g);
    KMS_ENSURE(g != NULL, KMS_ERR_INTERNAL, "out of memory");
    kms_err rc = find_grant(r, ref, grant_id, token ? token_key : NULL, g);
    if (rc == KMS_OK) {
        kms_uuid_format(g->key_id, key_text);
        snprintf(r->key_arn, sizeof r->key_arn, "arn:aws:kms:%s:%s:key/%s", r->srv->cfg.region,
                 r->srv->cfg.account, key_text);
        caller_arn(r, me);
        /* AWS: the retiring principal; the grantee of a grant with RetireGrant; the key's account.
         */
        if (g->retiring[0] && strcmp(g->retiring, me) == 0)
            snprintf(r->decision, sizeof r->decision, "allow retiring principal");
        else if (strcmp(g->grantee, me) == 0 &&
                 (g->operations & (UINT32_C(1) << kms_grant_op_index("RetireGrant"))))
            snprintf(r->decision, sizeof r->decision, "allow grantee");
        else
            rc = kms_authorize(r, "kms:RetireGrant", key_text, KMS_REF_DESTROYED, NULL, NULL);
    }
    if (rc == KMS_OK) {
        note_grant(r, grant_id);
        rc = kms_keystore_delete_grant(r->srv->ks, g->key_id, grant_id, "RetireGrant");
        if (rc == KMS_ERR_NOT_FOUND) /* retired or revoked meanwhile */
            rc = KMS_FAIL(KMS_ERR_NOT_FOUND, "Grant ID %s not found", grant_id);
    }
    free(g);
    return rc;
}

kms_err kms_op_revoke_grant(struct kms_request *r)
{
    const char *ref, *grant_id;
    struct kms_key_ref key = KMS_KEY_REF_INIT;

    KMS_GUARD(key_ref(r->in, &ref));
    KMS_GUARD(kms_in_string(r->in, "GrantId", 1, 1, 128, &grant_id));
    KMS_GUARD(no_dry_run(r->in));
    KMS_GUARD(grant_id_check(grant_id));
    KMS_GUARD(kms_authorize(r, "kms:RevokeGrant", ref, 0, NULL, &key));
    note_grant(r, grant_id);
    kms_err rc = kms_keystore_delete_grant(r->srv->ks, key.id, grant_id, "RevokeGrant");
    if (rc == KMS_ERR_NOT_FOUND)
        rc = KMS_FAIL(KMS_ERR_NOT_FOUND, "Grant ID %s not found", grant_id);
    kms_keystore_unhold(r->srv->ks, &key);
    return rc;
}
