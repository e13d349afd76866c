/*
 * Who may do what: each key's policy (policy.h) decides for the operations on
 * that key; admin principals may manage every key whatever its policy (so a
 * policy can never lock a key out of reach) but use keys only as their
 * policies allow; CreateKey is the admins' when admins are configured; the
 * alias policy (alias_policy_file), when there is one, decides for alias
 * names, and without one they are the admins' when admins are configured.
 * A request is authorized against the key it then works on: the reference
 * is resolved once, here, and the key held for the operation.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/encoding.h"
#include "common/log.h"
#include "server/grants.h"
#include "server/ops.h"
#include "server/policy.h"

/*
 * Operations that use key material, which admins get only through the key's
 * policy. GetPublicKey is not one: a public key is public (AWS's key
 * administrators get it too, through kms:Get*).
 */
static int cryptographic(const char *action)
{
    static const char *const uses[] = {"kms:Encrypt",
                                       "kms:Decrypt",
                                       "kms:ReEncryptFrom",
                                       "kms:ReEncryptTo",
                                       "kms:GenerateDataKey",
                                       "kms:GenerateDataKeyWithoutPlaintext",
                                       "kms:Sign",
                                       "kms:Verify",
                                       "kms:GenerateMac",
                                       "kms:VerifyMac",
                                       "kms:DeriveSharedSecret",
                                       "kms:GenerateDataKeyPair",
                                       "kms:GenerateDataKeyPairWithoutPlaintext"};
    for (size_t i = 0; i < sizeof uses / sizeof uses[0]; i++)
        if (strcmp(uses[i], action) == 0)
            return 1;
    return 0;
}

kms_err kms_alias_policy_load(const char *path, const char *account, struct kms_policy **out)
{
    char *text = NULL;
    size_t len = 0;
    KMS_GUARD(kms_read_file(path, &text, &len));
    kms_err rc = kms_policy_parse(text, len, account, out);
    free(text);
    if (rc != KMS_OK)
        return KMS_FAIL(rc, "alias_policy_file %s: %s", path, kms_err_message());
    return KMS_OK;
}

int kms_is_admin(struct kms_server *srv, const char *principal)
{
    for (size_t i = 0; i < srv->cfg.nadmins; i++)
        if (strcmp(srv->cfg.admins[i], principal) == 0)
            return 1;
    return 0;
}

#define TOKENS_MAX 10

struct check {
    struct kms_request *r;
    const char *action;
    struct kms_policy_request pr;
    char grantee[KMS_GRANT_PRINCIPAL_MAX + 1]; /* the caller as a grantee: its user ARN */
    /* The grants the request's tokens name: looked for before the key is read again. */
    uint8_t token_key[TOKENS_MAX][KMS_UUID_LEN];
    char token_grant[TOKENS_MAX][KMS_GRANT_ID_LEN + 1];
    size_t ntokens;
    int reread;                        /* a token names a grant of the key that its entry lacks: */
    char unseen[KMS_GRANT_ID_LEN + 1]; /* that grant */
};

/* The grants the request's GrantTokens name (checked by kms_in_grant_tokens; others skipped). */
static void read_tokens(struct check *c, json_t *in)
{
    json_t *list = json_object_get(in, "GrantTokens"), *t;
    size_t i;
    json_array_foreach(list, i, t)
    {
        if (c->ntokens == TOKENS_MAX || !json_is_string(t))
            break;
        if (kms_grant_token_read(json_string_value(t), json_string_length(t),
                                 c->token_key[c->ntokens], c->token_grant[c->ntokens]) == KMS_OK)
            c->ntokens++;
        else
            kms_err_clear();
    }
}

/* Whether a token names a grant of this key that the key's entry does not hold yet (c->unseen). */
static int token_unseen(struct check *c, const struct kms_key_guard *g)
{
    uint8_t id[KMS_UUID_LEN];
    if (kms_uuid_parse(g->id_text, strlen(g->id_text), id) != KMS_OK) {
        kms_err_clear();
        return 0;
    }
    for (size_t i = 0; i < c->ntokens; i++)
        if (memcmp(c->token_key[i], id, KMS_UUID_LEN) == 0 &&
            !kms_grant_set_has(g->grants, c->token_grant[i])) {
            memcpy(c->unseen, c->token_grant[i], sizeof c->unseen);
            return 1;
        }
    return 0;
}

static kms_err decide(void *arg, const struct kms_key_guard *g)
{
    struct check *c = arg;
    struct kms_request *r = c->r;
    char why[48] = "", grant[KMS_GRANT_ID_LEN + 1];

    snprintf(r->key_arn, sizeof r->key_arn, "%s", g->arn);
    c->pr.key_arn = g->arn;
    enum kms_policy_decision d = g->policy ? kms_policy_evaluate(g->policy, &c->pr, why, sizeof why)
                                           : KMS_POLICY_IMPLICIT_DENY;
    if (d == KMS_POLICY_ALLOW) {
        snprintf(r->decision, sizeof r->decision, "allow %s", why);
        return KMS_OK;
    }
    /*
     * A policy's explicit deny wins over every grant; without one, a grant
     * may allow. A grant's RetireGrant is for retiring that grant alone
     * (ops_grants.c), not others of the key.
     */
    int op = kms_grant_op_index(c->action + 4);
    if (d == KMS_POLICY_IMPLICIT_DENY && op != kms_grant_op_index("RetireGrant") &&
        kms_grant_set_allows(g->grants, c->grantee, op, c->pr.context, c->pr.ncontext, grant)) {
        snprintf(r->decision, sizeof r->decision, "allow grant %s", grant);
        return KMS_OK;
    }
    c->reread = d == KMS_POLICY_IMPLICIT_DENY && token_unseen(c, g);
    if (d == KMS_POLICY_EXPLICIT_DENY)
        snprintf(r->decision, sizeof r->decision, "deny %s", why);
    else
        snprintf(r->decision, sizeof r->decision, "%s", g->policy ? "deny" : "deny (no policy)");
    return KMS_FAIL(KMS_ERR_ACCESS_DENIED,
                    "User: %s is not authorized to perform: %s on resource: %s because %s",
                    r->principal, c->action, g->arn,
                    d == KMS_POLICY_EXPLICIT_DENY ? "a statement of the key policy denies it"
                                                  : "no statement of the key policy allows it");
}

/*
 * Whether the grant a token named (c->unseen) is in the database, of the key
 * decided on and the caller's: only then is the key read again, so made-up
 * tokens cost one lookup by grant id, never a reload of a key and its grants.
 * Its key id goes to c->token_key[0].
 */
static int grant_is_new(struct kms_server *srv, struct check *c)
{
    const char *slash = strrchr(c->r->key_arn, '/');
    uint8_t id[KMS_UUID_LEN];
    int yes = 0;
    struct kms_grant_row *g = malloc(sizeof *g);
    if (g && slash && kms_uuid_parse(slash + 1, strlen(slash + 1), id) == KMS_OK &&
        kms_keystore_grant_get(srv->ks, c->unseen, g) == KMS_OK)
        yes = memcmp(g->key_id, id, KMS_UUID_LEN) == 0 && strcmp(g->grantee, c->grantee) == 0;
    if (yes)
        memcpy(c->token_key[0], id, KMS_UUID_LEN);
    kms_err_clear();
    free(g);
    return yes;
}

kms_err kms_authorize(struct kms_request *r, const char *action, const char *ref, int how,
                      json_t *context, struct kms_key_ref *out)
{
    struct kms_server *srv = r->srv;
    struct kms_context_pair pairs[64], *p = pairs;
    size_t n = json_object_size(context), i = 0;
    const char *k;
    json_t *v;
    kms_err rc;

    if (!cryptographic(action) && kms_is_admin(srv, r->principal)) {
        /* Admins manage every key; the key must still exist. */
        snprintf(r->decision, sizeof r->decision, "admin");
        return kms_keystore_authorize(srv->ks, ref, how, kms_note_key, r, out);
    }
    if (n > sizeof pairs / sizeof pairs[0]) {
        p = calloc(n, sizeof *p);
        KMS_ENSURE(p != NULL, KMS_ERR_INTERNAL, "out of memory");
    }
    json_object_foreach(context, k, v)
    {
        if (!json_is_string(v) || i == n)
            continue;
        p[i].key = k;
        p[i].key_len = strlen(k);
        p[i].value = json_string_value(v);
        p[i].value_len = json_string_length(v);
        i++;
    }
    struct check c = {r,  action, {r->principal, srv->cfg.account, action, NULL, i ? p : NULL, i},
                      "", {{0}},  {""},
                      0,  0,      ""};
    snprintf(c.grantee, sizeof c.grantee, "arn:aws:iam::%s:user/%s", srv->cfg.account,
             r->principal);
    read_tokens(&c, r->in);
    rc = kms_keystore_authorize(srv->ks, ref, how, decide, &c, out);
    if (rc == KMS_ERR_ACCESS_DENIED && c.reread) {
        char message[512];
        snprintf(message, sizeof message, "%s", kms_err_message());
        if (grant_is_new(srv, &c)) {
            /*
             * A grant token names a grant of the caller's that this node has
             * not read yet (made on another node a moment ago): read the key
             * again, once, and decide.
             */
            kms_keystore_key_refresh(srv->ks, c.token_key[0]);
            c.reread = 0;
            rc = kms_keystore_authorize(srv->ks, ref, how, decide, &c, out);
        } else {
            rc = KMS_FAIL(KMS_ERR_ACCESS_DENIED, "%s", message);
        }
    }
    if (p != pairs)
        free(p);
    return rc;
}

kms_err kms_authorize_blob(struct kms_request *r, const char *action, const struct kms_blob *b,
                           json_t *context, struct kms_key_ref *out)
{
    char id[KMS_UUID_TEXT_LEN + 1];

    kms_uuid_format(b->key_id, id);
    /* A destroyed key's tombstone keeps its policy: its callers learn it is gone, no one else. */
    kms_err rc = kms_authorize(r, action, id, KMS_REF_DESTROYED, context, out);
    if (rc == KMS_ERR_NOT_FOUND)
        snprintf(r->decision, sizeof r->decision, "deny (no such key)");
    /*
     * Whether the key is unknown or not the caller's to use, the answer is
     * the one every blob that does not open gets; the audit line keeps the
     * reason (the decision).
     */
    if (rc == KMS_ERR_NOT_FOUND || rc == KMS_ERR_ACCESS_DENIED)
        return KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT, KMS_BLOB_INVALID);
    return rc;
}

kms_err kms_authorize_alias(struct kms_request *r, const char *action, const char *name)
{
    struct kms_server *srv = r->srv;
    char arn[KMS_ARN_MAX + KMS_ALIAS_MAX], why[48] = "";

    if (kms_is_admin(srv, r->principal) || (!srv->alias_policy && srv->cfg.nadmins == 0))
        return KMS_OK;
    snprintf(arn, sizeof arn, "arn:aws:kms:%s:%s:%s", srv->cfg.region, srv->cfg.account, name);
    if (!srv->alias_policy) {
        /* As CreateKey: a server with admins gives nobody else a name without a policy. */
        snprintf(r->decision, sizeof r->decision, "deny alias (admins only)");
        return KMS_FAIL(KMS_ERR_ACCESS_DENIED,
                        "User: %s is not authorized to perform: %s on resource: %s because only "
                        "admin principals manage alias names when no alias policy is configured",
                        r->principal, action, arn);
    }
    struct kms_policy_request pr = {r->principal, srv->cfg.account, action, arn, NULL, 0};
    enum kms_policy_decision d = kms_policy_evaluate(srv->alias_policy, &pr, why, sizeof why);
    if (d == KMS_POLICY_ALLOW)
        return KMS_OK;
    snprintf(r->decision, sizeof r->decision, "deny alias %s",
             d == KMS_POLICY_EXPLICIT_DENY ? why : "(implicit)");
    return KMS_FAIL(KMS_ERR_ACCESS_DENIED,
                    "User: %s is not authorized to perform: %s on resource: %s because %s",
                    r->principal, action, arn,
                    d == KMS_POLICY_EXPLICIT_DENY ? "a statement of the alias policy denies it"
                                                  : "no statement of the alias policy allows it");
}

kms_err kms_note_key(void *arg, const struct kms_key_guard *g)
{
    struct kms_request *r = arg;
    snprintf(r->key_arn, sizeof r->key_arn, "%s", g->arn);
    return KMS_OK;
}

kms_err kms_authorize_create(struct kms_request *r)
{
    if (r->srv->cfg.nadmins == 0) {
        snprintf(r->decision, sizeof r->decision, "allow (no admins configured)");
        return KMS_OK;
    }
    if (kms_is_admin(r->srv, r->principal)) {
        snprintf(r->decision, sizeof r->decision, "admin");
        return KMS_OK;
    }
    snprintf(r->decision, sizeof r->decision, "deny (not an admin)");
    return KMS_FAIL(KMS_ERR_ACCESS_DENIED,
                    "User: %s is not authorized to perform: kms:CreateKey: only the admin "
                    "principals may create keys",
                    r->principal);
}

kms_err kms_policy_compile(void *arg, const char *text, size_t n, void **out)
{
    struct kms_server *srv = arg;
    struct kms_policy *p = NULL;
    KMS_GUARD(kms_policy_parse(text, n, srv->cfg.account, &p));
    *out = p;
    return KMS_OK;
}

void kms_policy_release(void *compiled)
{
    kms_policy_free(compiled);
}

kms_err kms_account_policy(const char *account, char **out)
{
    char text[512];
    snprintf(text, sizeof text,
             "{\"Version\":\"2012-10-17\",\"Id\":\"p11kms-default\",\"Statement\":[{\"Sid\":"
             "\"Enable the account's principals\",\"Effect\":\"Allow\",\"Principal\":{\"AWS\":"
             "\"arn:aws:iam::%s:root\"},\"Action\":\"kms:*\",\"Resource\":\"*\"}]}",
             account);
    *out = strdup(text);
    KMS_ENSURE(*out != NULL, KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

kms_err kms_default_policy(struct kms_request *r, char **out)
{
    struct kms_server *srv = r->srv;
    if (srv->cfg.default_policy_creator) {
        const char *who[] = {r->principal};
        return kms_policy_default(srv->cfg.account, who, 1, out);
    }
    return kms_account_policy(srv->cfg.account, out);
}

kms_err kms_check_new_policy(struct kms_request *r, const char *text, const char *action)
{
    struct kms_server *srv = r->srv;
    struct kms_policy *p = NULL;
    char arn[KMS_ARN_MAX];
    json_t *bypass = json_object_get(r->in, "BypassPolicyLockoutSafetyCheck");

    KMS_ENSURE(!bypass || json_is_boolean(bypass), KMS_ERR_SERIALIZATION,
               "BypassPolicyLockoutSafetyCheck must be a boolean");
    KMS_GUARD(kms_policy_parse(text, strlen(text), srv->cfg.account, &p));
    if (json_is_true(bypass) || kms_is_admin(srv, r->principal)) {
        kms_policy_free(p);
        return KMS_OK;
    }
    /*
     * AWS's lockout safety check: the caller must still be able to change
     * the policy under the new one. A new key has no ARN yet: its statements
     * are checked against any key of this account.
     */
    if (r->key_arn[0])
        snprintf(arn, sizeof arn, "%s", r->key_arn);
    else
        snprintf(arn, sizeof arn, "arn:aws:kms:%s:%s:key/*", srv->cfg.region, srv->cfg.account);
    struct kms_policy_request pr = {r->principal, srv->cfg.account, action, arn, NULL, 0};
    enum kms_policy_decision d = kms_policy_evaluate(p, &pr, NULL, 0);
    kms_policy_free(p);
    KMS_ENSURE(d == KMS_POLICY_ALLOW, KMS_ERR_MALFORMED_POLICY,
               "The new key policy will not allow you to update the key policy in the future.");
    return KMS_OK;
}
