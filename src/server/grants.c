/*
 * Grants as authorization sees them: operations, constraints, a key's
 * compiled grants and grant tokens (grants.h).
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/digest.h"
#include "common/encoding.h"
#include "common/json_alloc.h"
#include "common/keyspec.h"
#include "server/grants.h"

#define BIT(name) (UINT32_C(1) << kms_grant_op_index(name))

uint32_t kms_grant_ops_with_context(void)
{
    return BIT("Decrypt") | BIT("Encrypt") | BIT("GenerateDataKey") |
           BIT("GenerateDataKeyWithoutPlaintext") | BIT("ReEncryptFrom") | BIT("ReEncryptTo") |
           BIT("GenerateDataKeyPair") | BIT("GenerateDataKeyPairWithoutPlaintext");
}

uint32_t kms_grant_ops_for_key(int spec, int usage)
{
    /* Every key: the grant operations that are not cryptographic. */
    uint32_t ops = BIT("CreateGrant") | BIT("RetireGrant") | BIT("DescribeKey");
    if (spec == KMS_SPEC_SYMMETRIC_DEFAULT)
        return ops | kms_grant_ops_with_context();
    switch (usage) {
    case KMS_USAGE_ENCRYPT_DECRYPT:
        return ops | BIT("Encrypt") | BIT("Decrypt") | BIT("ReEncryptFrom") | BIT("ReEncryptTo") |
               BIT("GetPublicKey");
    case KMS_USAGE_SIGN_VERIFY: return ops | BIT("Sign") | BIT("Verify") | BIT("GetPublicKey");
    case KMS_USAGE_GENERATE_VERIFY_MAC: return ops | BIT("GenerateMac") | BIT("VerifyMac");
    case KMS_USAGE_KEY_AGREEMENT: return ops | BIT("DeriveSharedSecret") | BIT("GetPublicKey");
    }
    return ops;
}

/* ---- constraints ---- */

static const char *const constraint_names[2] = {"EncryptionContextSubset",
                                                "EncryptionContextEquals"};

static kms_err check_pairs(const char *member, json_t *v)
{
    const char *k;
    json_t *x;
    KMS_ENSURE(json_is_object(v), KMS_ERR_VALIDATION, "Constraints.%s must be an object of strings",
               member);
    KMS_ENSURE(json_object_size(v) <= KMS_GRANT_CONSTRAINT_PAIRS, KMS_ERR_VALIDATION,
               "Constraints.%s has %zu pairs: at most %d are allowed", member, json_object_size(v),
               KMS_GRANT_CONSTRAINT_PAIRS);
    json_object_foreach(v, k, x)
    {
        KMS_ENSURE(json_is_string(x), KMS_ERR_VALIDATION,
                   "Constraints.%s must be an object of strings", member);
        KMS_ENSURE(k[0] != '\0' && json_string_length(x) <= KMS_GRANT_CONSTRAINT_VALUE_MAX,
                   KMS_ERR_VALIDATION,
                   "Constraints.%s: keys must not be empty and values at most %d characters",
                   member, KMS_GRANT_CONSTRAINT_VALUE_MAX);
    }
    return KMS_OK;
}

kms_err kms_grant_constraints_text(json_t *c, char *out, size_t n)
{
    const char *k;
    json_t *v;
    out[0] = '\0';
    if (!c || json_is_null(c))
        return KMS_OK;
    KMS_ENSURE(json_is_object(c), KMS_ERR_SERIALIZATION, "Constraints must be an object");
    json_object_foreach(c, k, v)
    {
        KMS_ENSURE(strcmp(k, constraint_names[0]) == 0 || strcmp(k, constraint_names[1]) == 0,
                   KMS_ERR_VALIDATION,
                   "Constraints.%.64s is not supported: only EncryptionContextSubset and "
                   "EncryptionContextEquals",
                   k);
        KMS_GUARD(check_pairs(k, v));
    }
    if (json_object_size(c) == 0)
        return KMS_OK;
    struct kms_buf text = KMS_BUF_INIT;
    kms_err rc = kms_json_dump(c, JSON_COMPACT | JSON_SORT_KEYS, &text);
    if (rc == KMS_OK && text.len >= n)
        rc = KMS_FAIL(KMS_ERR_VALIDATION, "Constraints are too long: at most %zu bytes", n - 1);
    if (rc == KMS_OK) {
        memcpy(out, text.data, text.len);
        out[text.len] = '\0';
    }
    kms_buf_free(&text);
    return rc;
}

/* Whether every pair of want is in have (keys compared without case, values exactly). */
static int pairs_within(json_t *want, json_t *have)
{
    const char *k, *hk;
    json_t *v, *hv;
    json_object_foreach(want, k, v)
    {
        int found = 0;
        json_object_foreach(have, hk, hv)
        {
            if (strcasecmp(k, hk) == 0 && json_equal(v, hv)) {
                found = 1;
                break;
            }
        }
        if (!found)
            return 0;
    }
    return 1;
}

int kms_grant_constraints_within(const char *parent, const char *child)
{
    if (!parent[0])
        return 1;
    if (!child[0])
        return 0;
    json_t *p = json_loads(parent, JSON_REJECT_DUPLICATES, NULL);
    json_t *c = json_loads(child, JSON_REJECT_DUPLICATES, NULL);
    int ok = p && c;
    json_t *ps = json_object_get(p, constraint_names[0]),
           *pe = json_object_get(p, constraint_names[1]);
    json_t *cs = json_object_get(c, constraint_names[0]),
           *ce = json_object_get(c, constraint_names[1]);
    /* A subset constraint is met by a child that requires those pairs too, either way. */
    if (ok && ps)
        ok = (cs && pairs_within(ps, cs)) || (ce && pairs_within(ps, ce));
    /* An equals constraint only by the same equals constraint. */
    if (ok && pe)
        ok = ce && json_object_size(ce) == json_object_size(pe) && pairs_within(pe, ce);
    json_decref(p);
    json_decref(c);
    return ok;
}

/* ---- a key's compiled grants ---- */

struct pair {
    char *key;
    char *value;
    size_t value_len;
};

struct compiled {
    char id[KMS_GRANT_ID_LEN + 1];
    char *grantee;
    uint32_t ops;
    int has_subset, has_equals;
    struct pair *subset, *equals;
    size_t nsubset, nequals;
};

struct grant_set {
    struct compiled *g;
    size_t n, cap;
};

static void pairs_free(struct pair *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        free(p[i].key);
        free(p[i].value);
    }
    free(p);
}

static void compiled_free(struct compiled *g)
{
    free(g->grantee);
    pairs_free(g->subset, g->nsubset);
    pairs_free(g->equals, g->nequals);
}

void kms_grant_set_free(void *set)
{
    struct grant_set *s = set;
    if (!s)
        return;
    for (size_t i = 0; i < s->n; i++)
        compiled_free(&s->g[i]);
    free(s->g);
    free(s);
}

static kms_err pairs_from(json_t *obj, struct pair **out, size_t *n)
{
    const char *k;
    json_t *v;
    *n = 0;
    *out = calloc(json_object_size(obj) + 1, sizeof **out);
    KMS_ENSURE(*out != NULL, KMS_ERR_INTERNAL, "out of memory");
    json_object_foreach(obj, k, v)
    {
        KMS_ENSURE(json_is_string(v), KMS_ERR_INTERNAL, "a grant's constraint is not a string");
        struct pair *p = &(*out)[(*n)++];
        p->key = strdup(k);
        p->value = strdup(json_string_value(v));
        p->value_len = json_string_length(v);
        KMS_ENSURE(p->key && p->value, KMS_ERR_INTERNAL, "out of memory");
    }
    return KMS_OK;
}

static kms_err compile(const struct kms_grant_row *r, struct compiled *g)
{
    memcpy(g->id, r->grant_id, sizeof g->id);
    g->ops = r->operations;
    g->grantee = strdup(r->grantee);
    KMS_ENSURE(g->grantee != NULL, KMS_ERR_INTERNAL, "out of memory");
    if (!r->constraints[0])
        return KMS_OK;
    json_t *c = json_loads(r->constraints, JSON_REJECT_DUPLICATES, NULL);
    KMS_ENSURE(json_is_object(c), KMS_ERR_INTERNAL, "a grant's constraints are not JSON");
    json_t *s = json_object_get(c, constraint_names[0]),
           *e = json_object_get(c, constraint_names[1]);
    kms_err rc = KMS_OK;
    if (s) {
        g->has_subset = 1;
        rc = pairs_from(s, &g->subset, &g->nsubset);
    }
    if (rc == KMS_OK && e) {
        g->has_equals = 1;
        rc = pairs_from(e, &g->equals, &g->nequals);
    }
    json_decref(c);
    return rc;
}

kms_err kms_grant_add(void *arg, void **set, const struct kms_grant_row *r)
{
    struct grant_set *s = *set;
    (void)arg;
    if (!s) {
        s = calloc(1, sizeof *s);
        KMS_ENSURE(s != NULL, KMS_ERR_INTERNAL, "out of memory");
        *set = s;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 8;
        struct compiled *g = realloc(s->g, cap * sizeof *g);
        KMS_ENSURE(g != NULL, KMS_ERR_INTERNAL, "out of memory");
        s->g = g;
        s->cap = cap;
    }
    struct compiled *g = &s->g[s->n];
    memset(g, 0, sizeof *g);
    kms_err rc = compile(r, g);
    if (rc != KMS_OK) {
        compiled_free(g);
        return rc;
    }
    s->n++;
    return KMS_OK;
}

/* Whether the request's context has every pair of want (keys without case, values exactly). */
static int context_has(const struct pair *want, size_t nwant, const struct kms_context_pair *pairs,
                       size_t n)
{
    for (size_t i = 0; i < nwant; i++) {
        size_t kl = strlen(want[i].key), j;
        for (j = 0; j < n; j++)
            if (pairs[j].key_len == kl && strncasecmp(pairs[j].key, want[i].key, kl) == 0 &&
                pairs[j].value_len == want[i].value_len &&
                memcmp(pairs[j].value, want[i].value, want[i].value_len) == 0)
                break;
        if (j == n)
            return 0;
    }
    return 1;
}

static int constraints_met(const struct compiled *g, int op, const struct kms_context_pair *pairs,
                           size_t n)
{
    /* Constraints apply only to operations whose requests carry a context (as AWS). */
    if (!(kms_grant_ops_with_context() & (UINT32_C(1) << op)))
        return 1;
    if (g->has_subset && !context_has(g->subset, g->nsubset, pairs, n))
        return 0;
    if (g->has_equals && (n != g->nequals || !context_has(g->equals, g->nequals, pairs, n)))
        return 0;
    return 1;
}

int kms_grant_set_allows(const void *set, const char *grantee, int op,
                         const struct kms_context_pair *pairs, size_t n,
                         char id[KMS_GRANT_ID_LEN + 1])
{
    const struct grant_set *s = set;
    if (!s || op < 0 || op >= KMS_GRANT_OP_COUNT)
        return 0;
    for (size_t i = 0; i < s->n; i++) {
        const struct compiled *g = &s->g[i];
        if ((g->ops & (UINT32_C(1) << op)) && strcmp(g->grantee, grantee) == 0 &&
            constraints_met(g, op, pairs, n)) {
            memcpy(id, g->id, KMS_GRANT_ID_LEN + 1);
            return 1;
        }
    }
    return 0;
}

int kms_grant_set_has(const void *set, const char *id)
{
    const struct grant_set *s = set;
    for (size_t i = 0; s && i < s->n; i++)
        if (strcmp(s->g[i].id, id) == 0)
            return 1;
    return 0;
}

/* ---- grant tokens ---- */

#define TOKEN_VERSION 1
#define TOKEN_BODY (1 + KMS_UUID_LEN + KMS_GRANT_ID_LEN / 2)
#define TOKEN_CHECK 4
#define TOKEN_BYTES (TOKEN_BODY + TOKEN_CHECK)

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* The check bytes: SHA-256's first four of the body, so a garbled token is told apart. */
static kms_err token_check(const uint8_t *body, uint8_t out[TOKEN_CHECK])
{
    uint8_t md[KMS_SHA256_LEN];
    KMS_GUARD(kms_sha256(body, TOKEN_BODY, md));
    memcpy(out, md, TOKEN_CHECK);
    return KMS_OK;
}

void kms_grant_token_make(const uint8_t key[KMS_UUID_LEN], const char *grant_id,
                          char out[KMS_GRANT_TOKEN_LEN + 1])
{
    uint8_t raw[TOKEN_BYTES];
    struct kms_buf b = KMS_BUF_INIT;
    raw[0] = TOKEN_VERSION;
    memcpy(raw + 1, key, KMS_UUID_LEN);
    for (size_t i = 0; i < KMS_GRANT_ID_LEN / 2; i++)
        raw[1 + KMS_UUID_LEN + i] =
            (uint8_t)(hex_value(grant_id[2 * i]) << 4 | hex_value(grant_id[2 * i + 1]));
    out[0] = '\0';
    if (token_check(raw, raw + TOKEN_BODY) == KMS_OK &&
        kms_b64url_encode(raw, sizeof raw, &b) == KMS_OK && b.len == KMS_GRANT_TOKEN_LEN) {
        memcpy(out, b.data, b.len);
        out[b.len] = '\0';
    }
    kms_buf_free(&b);
}

kms_err kms_grant_token_read(const char *s, size_t n, uint8_t key[KMS_UUID_LEN],
                             char grant_id[KMS_GRANT_ID_LEN + 1])
{
    uint8_t raw[TOKEN_BYTES], check[TOKEN_CHECK];
    size_t len = 0;
    if (n != KMS_GRANT_TOKEN_LEN ||
        kms_b64url_decode_public_to(s, n, raw, sizeof raw, &len) != KMS_OK || len != TOKEN_BYTES ||
        raw[0] != TOKEN_VERSION || token_check(raw, check) != KMS_OK ||
        memcmp(check, raw + TOKEN_BODY, TOKEN_CHECK) != 0) {
        kms_err_clear();
        return KMS_FAIL(KMS_ERR_INVALID_GRANT_TOKEN, "Invalid grant token");
    }
    memcpy(key, raw + 1, KMS_UUID_LEN);
    kms_hex_encode(raw + 1 + KMS_UUID_LEN, KMS_GRANT_ID_LEN / 2, grant_id);
    return KMS_OK;
}
