/*
 * Tags and grants: TagResource, UntagResource, ListResourceTags, CreateGrant,
 * RetireGrant, RevokeGrant, ListGrants, with AWS's members and bounds.
 *
 * Every argument is checked before anything is sent, so a mistake is
 * P11KMS_ERR_ARGUMENT naming it rather than a ValidationException after a
 * round trip; what the service decides (an aws: tag key, a key's 51st tag,
 * who may do what) is still its to say. The List calls walk every page
 * (Marker, NextMarker) and hand back one list. Nothing here is secret but the
 * grant token, which is the caller's bearer credential for the grant: it is
 * wiped from the answer and handed out in memory released with p11kms_free.
 */
#include "config.h"

#include <openssl/crypto.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/keyspec.h"

#define LIST_TAGS_LIMIT 50    /* AWS's largest ListResourceTags page */
#define LIST_GRANTS_LIMIT 100 /* ... and ListGrants' */
#define GRANT_ID_LEN 64
#define LIST_PAGES_MAX 100000 /* a service that never stops saying Truncated */

/* ---- argument checks ------------------------------------------------------------- */

/* Unicode characters of a UTF-8 string, or -1 when it is not UTF-8 (json_string says). */
static long characters(const char *s)
{
    json_t *probe = json_string(s);
    long n = 0;
    if (!probe)
        return -1;
    json_decref(probe);
    for (; *s; s++)
        n += ((unsigned char)*s & 0xc0) != 0x80;
    return n;
}

static p11kms_status check_tag_key(const char *key, size_t i)
{
    long n = key ? characters(key) : -1;
    if (n < 1 || n > P11KMS_TAG_KEY_MAX)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "tag %zu: the tag key must be 1 to %d characters of UTF-8 text", i,
                               P11KMS_TAG_KEY_MAX);
    return P11KMS_OK;
}

static p11kms_status check_tag_value(const char *value, size_t i)
{
    long n = value ? characters(value) : -1;
    if (n < 0 || n > P11KMS_TAG_VALUE_MAX)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "tag %zu: the value must be 0 to %d characters of UTF-8 text", i,
                               P11KMS_TAG_VALUE_MAX);
    return P11KMS_OK;
}

static p11kms_status check_count(const void *list, size_t n, size_t max, const char *what)
{
    if (!list || n == 0 || n > max)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "give 1 to %zu %s", max, what);
    return P11KMS_OK;
}

/* A principal ARN or name: 1 to P11KMS_PRINCIPAL_MAX bytes of UTF-8. */
static p11kms_status check_principal(const char *p, const char *what)
{
    size_t n = p ? strnlen(p, P11KMS_PRINCIPAL_MAX + 1) : 0;
    if (n == 0 || n > P11KMS_PRINCIPAL_MAX || characters(p) < 0)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the %s must be 1 to %d bytes of UTF-8 text",
                               what, P11KMS_PRINCIPAL_MAX);
    return P11KMS_OK;
}

/* AWS's GrantNameType: 1 to 256 of [a-zA-Z0-9:/_-]. */
static p11kms_status check_grant_name(const char *name)
{
    size_t n = strnlen(name, P11KMS_GRANT_NAME_MAX + 1);
    if (n == 0 || n > P11KMS_GRANT_NAME_MAX ||
        strspn(name, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:/_-") != n)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "the grant name must be 1 to %d of a-z, A-Z, 0-9, :, /, _ and -",
                               P11KMS_GRANT_NAME_MAX);
    return P11KMS_OK;
}

/* A grant id as the service makes them: 64 lower-case hex digits. */
static p11kms_status check_grant_id(const char *id)
{
    if (!id || strnlen(id, GRANT_ID_LEN + 1) != GRANT_ID_LEN ||
        strspn(id, "0123456789abcdef") != GRANT_ID_LEN)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the grant id must be %d lower-case hex digits",
                               GRANT_ID_LEN);
    return P11KMS_OK;
}

static p11kms_status check_grant_token(const char *token)
{
    size_t n = token ? strnlen(token, P11KMS_GRANT_TOKEN_MAX + 1) : 0;
    if (n == 0 || n > P11KMS_GRANT_TOKEN_MAX || characters(token) < 0)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the grant token must be 1 to %d bytes",
                               P11KMS_GRANT_TOKEN_MAX);
    return P11KMS_OK;
}

static p11kms_status check_operation(const char *op, size_t i)
{
    if (op && kms_grant_op_index(op) >= 0)
        return P11KMS_OK;
    return kms_client_fail(P11KMS_ERR_ARGUMENT,
                           "operation %zu (%.64s) is not one a grant can allow (Decrypt, Encrypt, "
                           "GenerateDataKey, ...)",
                           i, op ? op : "NULL");
}

static p11kms_status set_new(json_t *o, const char *name, json_t *v)
{
    if (!v || json_object_set_new(o, name, v) != 0)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    return P11KMS_OK;
}

static char *dup_member(const json_t *o, const char *name)
{
    const json_t *v = json_object_get(o, name);
    return json_is_string(v) ? strdup(json_string_value(v)) : NULL;
}

/*
 * Calls a List operation page by page (Limit, Marker), handing each page's
 * list member to fn, until the answer is no longer Truncated.
 */
static p11kms_status each_page(p11kms_client *c, const char *operation, json_t *req, int limit,
                               const char *member,
                               p11kms_status (*fn)(void *arg, const json_t *item), void *arg)
{
    p11kms_status st = set_new(req, "Limit", json_integer(limit));
    for (size_t pages = 0; st == P11KMS_OK; pages++) {
        json_t *resp = NULL, *item;
        const json_t *list, *next;
        size_t i;
        if (pages == LIST_PAGES_MAX)
            return kms_client_fail(P11KMS_ERR_PROTOCOL, "%s: more than %d pages", operation,
                                   LIST_PAGES_MAX);
        if ((st = kms_transport_call(c, operation, req, &resp)) != P11KMS_OK)
            return st;
        list = json_object_get(resp, member);
        if (!json_is_array(list))
            st = kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer has no %s list", member);
        json_array_foreach(list, i, item)
        {
            if (st == P11KMS_OK)
                st = fn(arg, item);
        }
        next = json_object_get(resp, "NextMarker");
        if (st == P11KMS_OK && !json_is_true(json_object_get(resp, "Truncated"))) {
            json_decref(resp);
            return P11KMS_OK;
        }
        if (st == P11KMS_OK && (!json_is_string(next) || json_string_length(next) == 0))
            st = kms_client_fail(P11KMS_ERR_PROTOCOL, "a truncated page without a NextMarker");
        if (st == P11KMS_OK)
            st = set_new(req, "Marker", json_copy((json_t *)next));
        json_decref(resp);
    }
    return st;
}

/* ---- tags -------------------------------------------------------------------------- */

void p11kms_tag_list_clear(struct p11kms_tag_list *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->n; i++) {
        free((char *)l->tags[i].key);
        free((char *)l->tags[i].value);
    }
    free(l->tags);
    memset(l, 0, sizeof *l);
}

p11kms_status p11kms_tag_resource(p11kms_client *c, const char *key_id,
                                  const struct p11kms_tag *tags, size_t n)
{
    json_t *req = NULL, *list = NULL, *resp = NULL;
    p11kms_status st;

    if (!c)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_tag_resource: NULL client");
    if ((st = check_count(tags, n, P11KMS_TAGS_MAX, "tags")) != P11KMS_OK)
        return st;
    for (size_t i = 0; i < n; i++) {
        if ((st = check_tag_key(tags[i].key, i)) != P11KMS_OK ||
            (st = check_tag_value(tags[i].value, i)) != P11KMS_OK)
            return st;
        for (size_t j = 0; j < i; j++)
            if (strcmp(tags[j].key, tags[i].key) == 0)
                return kms_client_fail(P11KMS_ERR_ARGUMENT, "tag %zu: tag key %.128s given twice",
                                       i, tags[i].key);
    }
    if ((st = kms_key_request(key_id, &req)) != P11KMS_OK)
        return st;
    list = json_array();
    st = set_new(req, "Tags", list ? json_incref(list) : NULL);
    for (size_t i = 0; st == P11KMS_OK && i < n; i++)
        if (json_array_append_new(list, json_pack("{s:s, s:s}", "TagKey", tags[i].key, "TagValue",
                                                  tags[i].value)) != 0)
            st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    if (st == P11KMS_OK)
        st = kms_transport_call(c, "TagResource", req, &resp);
    json_decref(list);
    json_decref(req);
    json_decref(resp);
    return st;
}

p11kms_status p11kms_untag_resource(p11kms_client *c, const char *key_id, const char *const *keys,
                                    size_t n)
{
    json_t *req = NULL, *list = NULL, *resp = NULL;
    p11kms_status st;

    if (!c)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_untag_resource: NULL client");
    if ((st = check_count(keys, n, P11KMS_TAGS_MAX, "tag keys")) != P11KMS_OK)
        return st;
    for (size_t i = 0; i < n; i++)
        if ((st = check_tag_key(keys[i], i)) != P11KMS_OK)
            return st;
    if ((st = kms_key_request(key_id, &req)) != P11KMS_OK)
        return st;
    list = json_array();
    st = set_new(req, "TagKeys", list ? json_incref(list) : NULL);
    for (size_t i = 0; st == P11KMS_OK && i < n; i++)
        if (json_array_append_new(list, json_string(keys[i])) != 0)
            st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    if (st == P11KMS_OK)
        st = kms_transport_call(c, "UntagResource", req, &resp);
    json_decref(list);
    json_decref(req);
    json_decref(resp);
    return st;
}

static p11kms_status add_tag(void *arg, const json_t *item)
{
    struct p11kms_tag_list *l = arg;
    const json_t *k = json_object_get(item, "TagKey"), *v = json_object_get(item, "TagValue");
    struct p11kms_tag *more;
    if (!json_is_string(k) || !json_is_string(v))
        return kms_client_fail(P11KMS_ERR_PROTOCOL, "a tag without TagKey or TagValue");
    more = realloc(l->tags, (l->n + 1) * sizeof *more);
    if (!more)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    l->tags = more;
    l->tags[l->n].key = strdup(json_string_value(k));
    l->tags[l->n].value = strdup(json_string_value(v));
    l->n++; /* counted before the check: clear frees whichever was made */
    if (!l->tags[l->n - 1].key || !l->tags[l->n - 1].value)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    return P11KMS_OK;
}

p11kms_status p11kms_list_resource_tags(p11kms_client *c, const char *key_id,
                                        struct p11kms_tag_list *out)
{
    json_t *req = NULL;
    p11kms_status st;

    if (out)
        memset(out, 0, sizeof *out);
    if (!c || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_list_resource_tags: NULL argument");
    if ((st = kms_key_request(key_id, &req)) != P11KMS_OK)
        return st;
    st = each_page(c, "ListResourceTags", req, LIST_TAGS_LIMIT, "Tags", add_tag, out);
    json_decref(req);
    if (st != P11KMS_OK)
        p11kms_tag_list_clear(out);
    return st;
}

/* ---- grants ------------------------------------------------------------------------ */

p11kms_status p11kms_create_grant(p11kms_client *c, const char *key_id, const char *grantee,
                                  const char *retiring, const char *const *operations, size_t nops,
                                  const struct p11kms_context *ctx, size_t nctx, int equals,
                                  const char *name, char grant_id[65], char **grant_token)
{
    json_t *req = NULL, *resp = NULL, *ops = NULL, *holder = NULL;
    const json_t *id, *token;
    p11kms_status st;

    if (grant_token)
        *grant_token = NULL;
    if (grant_id)
        grant_id[0] = '\0';
    if (!c || !grant_id)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_create_grant: NULL argument");
    if ((st = check_principal(grantee, "grantee principal")) != P11KMS_OK ||
        (retiring && (st = check_principal(retiring, "retiring principal")) != P11KMS_OK) ||
        (name && (st = check_grant_name(name)) != P11KMS_OK) ||
        (st = check_count(operations, nops, KMS_GRANT_OP_COUNT, "operations")) != P11KMS_OK)
        return st;
    for (size_t i = 0; i < nops; i++) {
        if ((st = check_operation(operations[i], i)) != P11KMS_OK)
            return st;
        for (size_t j = 0; j < i; j++)
            if (strcmp(operations[j], operations[i]) == 0)
                return kms_client_fail(P11KMS_ERR_ARGUMENT, "operation %.64s given twice",
                                       operations[i]);
    }
    if (nctx && !ctx)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the constraint's pairs are NULL");
    if ((st = kms_key_request(key_id, &req)) != P11KMS_OK)
        return st;
    st = set_new(req, "GranteePrincipal", json_string(grantee));
    if (st == P11KMS_OK && retiring)
        st = set_new(req, "RetiringPrincipal", json_string(retiring));
    if (st == P11KMS_OK && name)
        st = set_new(req, "Name", json_string(name));
    ops = json_array();
    if (st == P11KMS_OK)
        st = set_new(req, "Operations", ops ? json_incref(ops) : NULL);
    for (size_t i = 0; st == P11KMS_OK && i < nops; i++)
        if (json_array_append_new(ops, json_string(operations[i])) != 0)
            st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    /* The constraint's pairs are checked as an encryption context is (keys.c). */
    if (st == P11KMS_OK && nctx) {
        holder = json_object();
        st = holder ? kms_request_add_context(holder, ctx, nctx)
                    : kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        if (st == P11KMS_OK)
            st = set_new(req, "Constraints",
                         json_pack("{s:O}",
                                   equals ? "EncryptionContextEquals" : "EncryptionContextSubset",
                                   json_object_get(holder, "EncryptionContext")));
    }
    if (st == P11KMS_OK)
        st = kms_transport_call(c, "CreateGrant", req, &resp);
    id = json_object_get(resp, "GrantId");
    token = json_object_get(resp, "GrantToken");
    if (st == P11KMS_OK &&
        (!json_is_string(id) || check_grant_id(json_string_value(id)) != P11KMS_OK ||
         !json_is_string(token) || json_string_length(token) == 0 ||
         json_string_length(token) > P11KMS_GRANT_TOKEN_MAX))
        st = kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer's GrantId or GrantToken is not one");
    if (st == P11KMS_OK)
        memcpy(grant_id, json_string_value(id), GRANT_ID_LEN + 1);
    if (st == P11KMS_OK && grant_token) {
        *grant_token = kms_client_secret_alloc(c, json_string_length(token) + 1);
        if (*grant_token)
            memcpy(*grant_token, json_string_value(token), json_string_length(token) + 1);
        else
            st = kms_client_fail(P11KMS_ERR_MEMORY, "no room for the grant token");
    }
    if (st != P11KMS_OK && grant_id)
        grant_id[0] = '\0';
    if (json_is_string(token))
        OPENSSL_cleanse((char *)json_string_value(token), json_string_length(token));
    json_decref(holder);
    json_decref(ops);
    json_decref(req);
    json_decref(resp);
    return st;
}

p11kms_status p11kms_retire_grant(p11kms_client *c, const char *grant_token, const char *key_id,
                                  const char *grant_id)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (!c)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_retire_grant: NULL client");
    if (grant_token ? key_id || grant_id : !key_id || !grant_id)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "retire a grant by its token, or by key and grant id: one of them");
    if (grant_token) {
        if ((st = check_grant_token(grant_token)) != P11KMS_OK)
            return st;
        req = json_pack("{s:s}", "GrantToken", grant_token);
        if (!req)
            return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    } else {
        if ((st = check_grant_id(grant_id)) != P11KMS_OK ||
            (st = kms_key_request(key_id, &req)) != P11KMS_OK)
            return st;
        if ((st = set_new(req, "GrantId", json_string(grant_id))) != P11KMS_OK) {
            json_decref(req);
            return st;
        }
    }
    st = kms_transport_call(c, "RetireGrant", req, &resp);
    if (grant_token) {
        const json_t *t = json_object_get(req, "GrantToken");
        OPENSSL_cleanse((char *)json_string_value(t), json_string_length(t));
    }
    json_decref(req);
    json_decref(resp);
    return st;
}

p11kms_status p11kms_revoke_grant(p11kms_client *c, const char *key_id, const char *grant_id)
{
    json_t *req = NULL, *resp = NULL;
    p11kms_status st;

    if (!c)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_revoke_grant: NULL client");
    if ((st = check_grant_id(grant_id)) != P11KMS_OK ||
        (st = kms_key_request(key_id, &req)) != P11KMS_OK)
        return st;
    st = set_new(req, "GrantId", json_string(grant_id));
    if (st == P11KMS_OK)
        st = kms_transport_call(c, "RevokeGrant", req, &resp);
    json_decref(req);
    json_decref(resp);
    return st;
}

static void grant_clear(struct p11kms_grant *g)
{
    free(g->key_id);
    free(g->name);
    free(g->grantee);
    free(g->retiring);
    free(g->issuing_account);
    for (size_t i = 0; i < g->noperations; i++)
        free(g->operations[i]);
    free(g->operations);
    for (size_t i = 0; i < g->ncontext; i++) {
        free((char *)g->context[i].key);
        free((char *)g->context[i].value);
    }
    free(g->context);
    memset(g, 0, sizeof *g);
}

void p11kms_grant_list_clear(struct p11kms_grant_list *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->n; i++)
        grant_clear(&l->grants[i]);
    free(l->grants);
    memset(l, 0, sizeof *l);
}

/* The constraint of a listed grant: its pairs, and which kind. */
static p11kms_status grant_constraint(struct p11kms_grant *g, const json_t *constraints)
{
    const json_t *eq = json_object_get(constraints, "EncryptionContextEquals");
    const json_t *sub = json_object_get(constraints, "EncryptionContextSubset");
    const json_t *pairs = eq ? eq : sub, *v;
    const char *k;
    if (!pairs)
        return P11KMS_OK;
    if (!json_is_object(pairs))
        return kms_client_fail(P11KMS_ERR_PROTOCOL, "a grant's constraint is not an object");
    g->equals = eq != NULL;
    g->context = calloc(json_object_size(pairs) + 1, sizeof *g->context);
    if (!g->context)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    json_object_foreach((json_t *)pairs, k, v)
    {
        if (!json_is_string(v))
            return kms_client_fail(P11KMS_ERR_PROTOCOL, "a grant's constraint value is not text");
        g->context[g->ncontext].key = strdup(k);
        g->context[g->ncontext].value = strdup(json_string_value(v));
        g->ncontext++;
        if (!g->context[g->ncontext - 1].key || !g->context[g->ncontext - 1].value)
            return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    }
    return P11KMS_OK;
}

static p11kms_status add_grant(void *arg, const json_t *item)
{
    struct p11kms_grant_list *l = arg;
    const json_t *id = json_object_get(item, "GrantId"), *ops = json_object_get(item, "Operations");
    const json_t *created = json_object_get(item, "CreationDate"), *op;
    struct p11kms_grant *more, *g;
    size_t i;

    if (!json_is_string(id) || check_grant_id(json_string_value(id)) != P11KMS_OK ||
        !json_is_array(ops) || !json_is_string(json_object_get(item, "GranteePrincipal")))
        return kms_client_fail(P11KMS_ERR_PROTOCOL, "a grant without GrantId, Operations or "
                                                    "GranteePrincipal");
    more = realloc(l->grants, (l->n + 1) * sizeof *more);
    if (!more)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    l->grants = more;
    g = &l->grants[l->n++];
    memset(g, 0, sizeof *g);
    memcpy(g->grant_id, json_string_value(id), GRANT_ID_LEN + 1);
    g->key_id = dup_member(item, "KeyId");
    g->name = dup_member(item, "Name");
    g->grantee = dup_member(item, "GranteePrincipal");
    g->retiring = dup_member(item, "RetiringPrincipal");
    g->issuing_account = dup_member(item, "IssuingAccount");
    /* CreationDate: epoch seconds, an integer or (boto3's form) a number */
    g->created = json_is_number(created) ? (long long)json_number_value(created) : 0;
    g->operations = calloc(json_array_size(ops) + 1, sizeof *g->operations);
    if (!g->grantee || !g->operations)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    json_array_foreach(ops, i, op)
    {
        if (!json_is_string(op))
            return kms_client_fail(P11KMS_ERR_PROTOCOL, "a grant's operation is not text");
        if (!(g->operations[g->noperations++] = strdup(json_string_value(op))))
            return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    }
    return grant_constraint(g, json_object_get(item, "Constraints"));
}

p11kms_status p11kms_list_grants(p11kms_client *c, const char *key_id,
                                 struct p11kms_grant_list *out)
{
    json_t *req = NULL;
    p11kms_status st;

    if (out)
        memset(out, 0, sizeof *out);
    if (!c || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_list_grants: NULL argument");
    if ((st = kms_key_request(key_id, &req)) != P11KMS_OK)
        return st;
    st = each_page(c, "ListGrants", req, LIST_GRANTS_LIMIT, "Grants", add_grant, out);
    json_decref(req);
    if (st != P11KMS_OK)
        p11kms_grant_list_clear(out);
    return st;
}
