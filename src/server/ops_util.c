#include "config.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/blob.h"
#include "common/encoding.h"
#include "common/keyspec.h"
#include "server/grants.h"
#include "server/ops.h"
#include "server/server.h"

/* AWS names members in its messages with a lower-case first letter. */
static void member(const char *name, char *out, size_t n)
{
    snprintf(out, n, "%s", name);
    out[0] = (char)tolower((unsigned char)out[0]);
}

static kms_err missing(const char *name)
{
    char m[64];
    member(name, m, sizeof m);
    return KMS_FAIL(KMS_ERR_VALIDATION,
                    "1 validation error detected: Value null at '%s' failed to satisfy constraint: "
                    "Member must not be null",
                    m);
}

static kms_err wrong_type(const char *name, const char *want)
{
    return KMS_FAIL(KMS_ERR_SERIALIZATION, "%s must be %s", name, want);
}

static kms_err check_length(const char *name, size_t n, size_t min, size_t max)
{
    char m[64];
    member(name, m, sizeof m);
    KMS_ENSURE(n >= min, KMS_ERR_VALIDATION,
               "1 validation error detected: Value at '%s' failed to satisfy constraint: "
               "Member must have length greater than or equal to %zu",
               m, min);
    KMS_ENSURE(n <= max, KMS_ERR_VALIDATION,
               "1 validation error detected: Value at '%s' failed to satisfy constraint: "
               "Member must have length less than or equal to %zu",
               m, max);
    return KMS_OK;
}

kms_err kms_in_string(json_t *in, const char *name, int required, size_t min, size_t max,
                      const char **out)
{
    json_t *v = json_object_get(in, name);
    *out = NULL;
    if (!v || json_is_null(v)) {
        if (required)
            return missing(name);
        return KMS_OK;
    }
    if (!json_is_string(v))
        return wrong_type(name, "a string");
    size_t n = json_string_length(v);
    KMS_ENSURE(strlen(json_string_value(v)) == n, KMS_ERR_VALIDATION, "%s contains a NUL character",
               name);
    KMS_GUARD(check_length(name, n, min, max));
    *out = json_string_value(v);
    return KMS_OK;
}

kms_err kms_in_int(json_t *in, const char *name, long min, long max, long *out, int *present)
{
    json_t *v = json_object_get(in, name);
    char m[64];
    *present = 0;
    if (!v || json_is_null(v))
        return KMS_OK;
    if (!json_is_integer(v))
        return wrong_type(name, "an integer");
    json_int_t x = json_integer_value(v);
    member(name, m, sizeof m);
    KMS_ENSURE(x >= min, KMS_ERR_VALIDATION,
               "1 validation error detected: Value '%lld' at '%s' failed to satisfy constraint: "
               "Member must have value greater than or equal to %ld",
               (long long)x, m, min);
    KMS_ENSURE(x <= max, KMS_ERR_VALIDATION,
               "1 validation error detected: Value '%lld' at '%s' failed to satisfy constraint: "
               "Member must have value less than or equal to %ld",
               (long long)x, m, max);
    *out = (long)x;
    *present = 1;
    return KMS_OK;
}

kms_err kms_in_blob(json_t *in, const char *name, int required, size_t min, size_t max,
                    struct kms_buf *out, int *present)
{
    json_t *v = json_object_get(in, name);
    *present = 0;
    if (!v || json_is_null(v)) {
        if (required)
            return missing(name);
        return KMS_OK;
    }
    if (!json_is_string(v))
        return wrong_type(name, "a base64 string");
    if (kms_b64_decode(json_string_value(v), json_string_length(v), out) != KMS_OK)
        return KMS_FAIL(KMS_ERR_SERIALIZATION, "%s is not valid base64", name);
    KMS_GUARD(check_length(name, out->len, min, max));
    *present = 1;
    return KMS_OK;
}

kms_err kms_in_context(json_t *in, const char *name, struct kms_buf *out)
{
    json_t *ctx = json_object_get(in, name);
    struct kms_context_pair *pairs;
    const char *key;
    json_t *value;
    size_t n = 0;
    kms_err rc;

    if (!ctx || json_is_null(ctx))
        return kms_context_canonical(NULL, 0, out);
    if (!json_is_object(ctx))
        return wrong_type(name, "an object of strings");
    pairs = calloc(json_object_size(ctx) + 1, sizeof *pairs);
    KMS_ENSURE(pairs != NULL, KMS_ERR_INTERNAL, "out of memory");
    json_object_foreach(ctx, key, value)
    {
        if (!json_is_string(value)) {
            free(pairs);
            return wrong_type(name, "an object of strings");
        }
        pairs[n].key = key;
        pairs[n].key_len = strlen(key);
        pairs[n].value = json_string_value(value);
        pairs[n].value_len = json_string_length(value);
        n++;
    }
    rc = kms_context_canonical(pairs, n, out);
    free(pairs);
    return rc;
}

kms_err kms_in_grant_tokens(json_t *in)
{
    json_t *v = json_object_get(in, "GrantTokens"), *t;
    size_t i;
    if (!v || json_is_null(v))
        return KMS_OK;
    if (!json_is_array(v))
        return wrong_type("GrantTokens", "a list of strings");
    KMS_ENSURE(json_array_size(v) <= 10, KMS_ERR_VALIDATION,
               "1 validation error detected: Value at 'grantTokens' failed to satisfy constraint: "
               "Member must have length less than or equal to 10");
    json_array_foreach(v, i, t)
    {
        if (!json_is_string(t))
            return wrong_type("GrantTokens", "a list of strings");
    }
    json_array_foreach(v, i, t)
    {
        uint8_t key[KMS_UUID_LEN];
        char grant[KMS_GRANT_ID_LEN + 1];
        KMS_GUARD(check_length("GrantTokens", json_string_length(t), 1, 8192));
        /* A token names a grant; authorization (authz.c) looks for it. */
        KMS_GUARD(kms_grant_token_read(json_string_value(t), json_string_length(t), key, grant));
    }
    return KMS_OK;
}

kms_err kms_in_algorithm(json_t *in)
{
    const char *alg;
    KMS_GUARD(kms_in_string(in, "EncryptionAlgorithm", 0, 1, 64, &alg));
    KMS_ENSURE(!alg || strcmp(alg, "SYMMETRIC_DEFAULT") == 0, KMS_ERR_VALIDATION,
               "EncryptionAlgorithm must be SYMMETRIC_DEFAULT for a symmetric key");
    return KMS_OK;
}

kms_err kms_out_blob(json_t *out, const char *name, const uint8_t *p, size_t n)
{
    struct kms_buf b64 = KMS_BUF_INIT;
    kms_err rc = kms_b64_encode(p, n, &b64);
    if (rc == KMS_OK &&
        json_object_set_new(out, name, json_stringn((const char *)b64.data, b64.len)) != 0)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    kms_buf_free(&b64);
    return rc;
}

/* The list member each usage's algorithms go in, as AWS names it. */
static const char *algorithm_member(int usage)
{
    switch (usage) {
    case KMS_USAGE_ENCRYPT_DECRYPT: return "EncryptionAlgorithms";
    case KMS_USAGE_SIGN_VERIFY: return "SigningAlgorithms";
    case KMS_USAGE_GENERATE_VERIFY_MAC: return "MacAlgorithms";
    case KMS_USAGE_KEY_AGREEMENT: return "KeyAgreementAlgorithms";
    }
    return NULL;
}

kms_err kms_out_key_type(json_t *out, int spec, int usage)
{
    const struct kms_spec_info *s = kms_spec(spec);
    const char *member = algorithm_member(usage);
    int algs[KMS_ALG_COUNT];
    json_t *list;

    KMS_ENSURE(s != NULL && member != NULL, KMS_ERR_INTERNAL,
               "a key of unknown spec %d or usage %d", spec, usage);
    size_t n = kms_spec_algorithms(spec, usage, algs, KMS_ALG_COUNT);
    KMS_ENSURE(n > 0, KMS_ERR_INTERNAL, "a key of spec %s has no algorithm for usage %s", s->name,
               kms_usage_name(usage));
    KMS_ENSURE((list = json_array()) != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < n; i++)
        json_array_append_new(list, json_string(kms_alg(algs[i])->name));
    /* CustomerMasterKeySpec is KeySpec's deprecated name: AWS answers both, equal. */
    if (json_object_set_new(out, member, list) != 0 ||
        json_object_set_new(out, "KeySpec", json_string(s->name)) != 0 ||
        json_object_set_new(out, "CustomerMasterKeySpec", json_string(s->name)) != 0 ||
        json_object_set_new(out, "KeyUsage", json_string(kms_usage_name(usage))) != 0)
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

json_t *kms_key_metadata(struct kms_server *srv, const struct kms_key_info *k)
{
    json_t *m =
        json_pack("{s:s, s:s, s:s, s:I, s:b, s:s, s:s, s:s, s:s, s:b}", "AWSAccountId",
                  srv->cfg.account, "KeyId", k->id_text, "Arn", k->arn, "CreationDate",
                  (json_int_t)k->created, "Enabled", k->state == KMS_KEY_ENABLED, "Description",
                  k->description ? k->description : "", "KeyState", kms_key_state_name(k->state),
                  "Origin", "AWS_KMS", "KeyManager", "CUSTOMER", "MultiRegion", 0);
    if (m && kms_out_key_type(m, k->spec, k->usage) != KMS_OK) {
        json_decref(m);
        return NULL;
    }
    if (m && k->state == KMS_KEY_PENDING_DELETION)
        json_object_set_new(m, "DeletionDate", json_integer(k->deletion_date));
    return m;
}

kms_err kms_check_usage(const struct kms_key_info *k, int usage, const char *operation)
{
    const struct kms_spec_info *s = kms_spec(k->spec);
    KMS_ENSURE(s != NULL, KMS_ERR_INTERNAL, "%s has an unknown key spec %d", k->arn, k->spec);
    KMS_ENSURE(k->usage == usage, KMS_ERR_INVALID_KEY_USAGE,
               "%s key usage is %s which is not valid for %s.", k->arn, kms_usage_name(k->usage),
               operation);
    return KMS_OK;
}

kms_err kms_check_symmetric(const struct kms_key_info *k, const char *operation)
{
    KMS_GUARD(kms_check_usage(k, KMS_USAGE_ENCRYPT_DECRYPT, operation));
    KMS_ENSURE(k->spec == KMS_SPEC_SYMMETRIC_DEFAULT, KMS_ERR_INVALID_KEY_USAGE,
               "%s key spec is %s which is not valid for %s: it takes a symmetric encryption "
               "key (SYMMETRIC_DEFAULT).",
               k->arn, kms_spec(k->spec)->name, operation);
    return KMS_OK;
}

kms_err kms_check_algorithm(const struct kms_key_info *k, int alg)
{
    KMS_ENSURE(kms_alg_allowed(k->spec, k->usage, alg), KMS_ERR_INVALID_KEY_USAGE,
               "Algorithm %s is incompatible with key spec %s and key usage %s of %s.",
               kms_alg(alg)->name, kms_spec(k->spec) ? kms_spec(k->spec)->name : "?",
               kms_usage_name(k->usage), k->arn);
    return KMS_OK;
}

kms_err kms_in_enum_alg(json_t *in, const char *name, int required, int usage, int *out)
{
    const char *v;
    char m[64], names[512] = "";
    size_t used = 0;

    *out = -1;
    KMS_GUARD(kms_in_string(in, name, required, 1, 64, &v));
    if (!v)
        return KMS_OK;
    int alg = kms_alg_by_name(v);
    if (alg >= 0 && kms_alg(alg)->usage == (enum kms_key_usage)usage) {
        *out = alg;
        return KMS_OK;
    }
    for (int a = 0; a < KMS_ALG_COUNT; a++) {
        if (kms_alg(a)->usage != (enum kms_key_usage)usage)
            continue;
        int w =
            snprintf(names + used, sizeof names - used, "%s%s", used ? ", " : "", kms_alg(a)->name);
        if (w > 0 && (size_t)w < sizeof names - used)
            used += (size_t)w;
    }
    member(name, m, sizeof m);
    return KMS_FAIL(KMS_ERR_VALIDATION,
                    "1 validation error detected: Value '%.64s' at '%s' failed to satisfy "
                    "constraint: Member must satisfy enum value set: [%s]",
                    v, m, names);
}

void kms_note_blob(struct kms_request *r, const struct kms_blob *decoded,
                   const struct kms_buf *blob, struct kms_buf *ctx)
{
    char id[KMS_UUID_TEXT_LEN + 1];
    const uint8_t *key_id = NULL;
    uint32_t version = 0;
    if (decoded) {
        key_id = decoded->key_id;
        version = decoded->key_version;
    } else if (blob->len >= KMS_BLOB_HEADER_LEN && blob->data[0] == KMS_BLOB_FORMAT_V1) {
        /*
         * Not decoded (a blob just made, or a malformed one): read the header
         * by hand, as far as it goes. kms_blob_decode would record a failure
         * and replace the message of the error the operation may be returning.
         */
        const uint8_t *v = blob->data + 1 + KMS_UUID_LEN;
        key_id = blob->data + 1;
        version = (uint32_t)v[0] << 24 | (uint32_t)v[1] << 16 | (uint32_t)v[2] << 8 | v[3];
    }
    if (key_id) {
        kms_uuid_format(key_id, id);
        snprintf(r->key_arn, sizeof r->key_arn, "arn:aws:kms:%s:%s:key/%s", r->srv->cfg.region,
                 r->srv->cfg.account, id);
        r->key_version = version;
    }
    /* Handed over, not copied: the op is done with it. */
    if (ctx->len && !r->context.len) {
        struct kms_buf empty = r->context;
        r->context = *ctx;
        *ctx = empty;
    }
}

/* ---- paging ---- */

kms_err kms_in_limit(json_t *in, long max, long def, size_t *out)
{
    long l = def;
    int present;
    KMS_GUARD(kms_in_int(in, "Limit", 1, max, &l, &present));
    *out = (size_t)l;
    return KMS_OK;
}

kms_err kms_in_marker(json_t *in, const char **out)
{
    const unsigned char *p;
    KMS_GUARD(kms_in_string(in, "Marker", 0, 1, 1024, out));
    /* UTF-8 (jansson's): U+0020..U+007F is one byte, U+0080..U+00FF C2 or C3 and one more */
    for (p = (const unsigned char *)*out; p && *p; p++) {
        if (*p >= 0x20 && *p < 0x80)
            continue;
        if ((*p == 0xc2 || *p == 0xc3) && p[1] >= 0x80 && p[1] <= 0xbf) {
            p++;
            continue;
        }
        *out = NULL;
        return KMS_FAIL(KMS_ERR_VALIDATION,
                        "1 validation error detected: Value at 'marker' failed to satisfy "
                        "constraint: Member must satisfy regular expression pattern: "
                        "[\\u0020-\\u00FF]*");
    }
    return KMS_OK;
}

kms_err kms_out_page(json_t *out, const char *next)
{
    if (json_object_set_new(out, "Truncated", json_boolean(next != NULL)) != 0 ||
        (next && json_object_set_new(out, "NextMarker", json_string(next)) != 0))
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}
