/*
 * Tags: TagResource, UntagResource, ListResourceTags, and the checks of
 * CreateKey's Tags. AWS's rules: a tag key of 1 to 128 and a value of 0 to
 * 256 Unicode characters (characters, not bytes: ValidationException in the
 * service model's words), no tag key beginning with "aws:" in any case and no
 * tag key twice in one request (TagException), at most 50 tags per key
 * (LimitExceededException, the key store's count). Tags are read from the
 * database at every ListResourceTags: nothing caches them.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "common/encoding.h"
#include "server/ops.h"

#define TAG_KEY_MAX 128
#define TAG_VALUE_MAX 256
#define LIST_TAGS_MAX 50
#define RESERVED_PREFIX "aws:"

/* Characters of a UTF-8 string (jansson's are valid UTF-8): bytes that start one. */
static size_t characters(const char *s, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += ((unsigned char)s[i] & 0xc0) != 0x80;
    return c;
}

/* One string of a tag: its member path as AWS names it ("tags.1.member.tagKey"). */
static kms_err tag_string(json_t *v, const char *path, size_t min, size_t max, const char **out)
{
    KMS_ENSURE(v && !json_is_null(v), KMS_ERR_VALIDATION,
               "1 validation error detected: Value null at '%s' failed to satisfy constraint: "
               "Member must not be null",
               path);
    KMS_ENSURE(json_is_string(v), KMS_ERR_SERIALIZATION, "%s must be a string", path);
    size_t n = json_string_length(v);
    const char *s = json_string_value(v);
    KMS_ENSURE(strlen(s) == n, KMS_ERR_VALIDATION, "%s contains a NUL character", path);
    size_t c = characters(s, n);
    KMS_ENSURE(c >= min, KMS_ERR_VALIDATION,
               "1 validation error detected: Value at '%s' failed to satisfy constraint: Member "
               "must have length greater than or equal to %zu",
               path, min);
    KMS_ENSURE(c <= max, KMS_ERR_VALIDATION,
               "1 validation error detected: Value at '%s' failed to satisfy constraint: Member "
               "must have length less than or equal to %zu",
               path, max);
    *out = s;
    return KMS_OK;
}

/* A tag key the caller may set or remove: not aws:..., not twice in the request. */
static kms_err tag_key_allowed(const char *key, const char *const *before, size_t nbefore)
{
    KMS_ENSURE(strncasecmp(key, RESERVED_PREFIX, strlen(RESERVED_PREFIX)) != 0, KMS_ERR_TAG,
               "Tag keys beginning with aws: are reserved for AWS: %.128s", key);
    for (size_t i = 0; i < nbefore; i++)
        KMS_ENSURE(strcmp(before[i], key) != 0, KMS_ERR_TAG, "Duplicate tag keys: %.128s", key);
    return KMS_OK;
}

kms_err kms_in_tags(json_t *in, const char *name, int required, struct kms_tag **out, size_t *n)
{
    json_t *list = json_object_get(in, name), *t;
    const char **keys = NULL;
    struct kms_tag *tags = NULL;
    kms_err rc = KMS_OK;
    size_t i;
    char path[80];

    *out = NULL;
    *n = 0;
    if (!list || json_is_null(list)) {
        KMS_ENSURE(!required, KMS_ERR_VALIDATION,
                   "1 validation error detected: Value null at 'tags' failed to satisfy "
                   "constraint: Member must not be null");
        return KMS_OK;
    }
    KMS_ENSURE(json_is_array(list), KMS_ERR_SERIALIZATION,
               "%s must be a list of {TagKey, TagValue}", name);
    if (json_array_size(list) == 0)
        return KMS_OK;
    tags = calloc(json_array_size(list), sizeof *tags);
    keys = calloc(json_array_size(list), sizeof *keys);
    if (!tags || !keys)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    json_array_foreach(list, i, t)
    {
        if (rc != KMS_OK)
            break;
        if (!json_is_object(t)) {
            rc = KMS_FAIL(KMS_ERR_SERIALIZATION, "%s must be a list of {TagKey, TagValue}", name);
            break;
        }
        snprintf(path, sizeof path, "tags.%zu.member.tagKey", i + 1);
        rc = tag_string(json_object_get(t, "TagKey"), path, 1, TAG_KEY_MAX, &tags[i].key);
        if (rc == KMS_OK) {
            snprintf(path, sizeof path, "tags.%zu.member.tagValue", i + 1);
            rc = tag_string(json_object_get(t, "TagValue"), path, 0, TAG_VALUE_MAX, &tags[i].value);
        }
        if (rc == KMS_OK)
            rc = tag_key_allowed(tags[i].key, keys, i);
        keys[i] = tags[i].key;
    }
    free(keys);
    if (rc != KMS_OK) {
        free(tags);
        return rc;
    }
    *out = tags;
    *n = json_array_size(list);
    return KMS_OK;
}

/* KeyId as TagResource and its kin take it: a key id or key ARN, not an alias (as AWS). */
static kms_err tagged_key(struct kms_request *r, const char *action, struct kms_key_ref *key)
{
    const char *ref;
    KMS_GUARD(kms_in_string(r->in, "KeyId", 1, 1, 2048, &ref));
    KMS_ENSURE(strncmp(ref, "alias/", 6) != 0 && !strstr(ref, ":alias/"), KMS_ERR_NOT_FOUND,
               "Key '%.256s' does not exist: this operation takes a key id or key ARN", ref);
    KMS_GUARD(kms_authorize(r, action, ref, 0, NULL, key));
    kms_keystore_unhold(r->srv->ks, key);
    return KMS_OK;
}

kms_err kms_op_tag_resource(struct kms_request *r)
{
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    struct kms_tag *tags;
    size_t n;

    /* The request is read whole before anything about the key is asked, as AWS does. */
    KMS_GUARD(kms_in_tags(r->in, "Tags", 1, &tags, &n));
    kms_err rc = tagged_key(r, "kms:TagResource", &key);
    if (rc == KMS_OK)
        rc = kms_keystore_tag(r->srv->ks, key.id_text, tags, n);
    free(tags);
    r->out = NULL;
    return rc;
}

kms_err kms_op_untag_resource(struct kms_request *r)
{
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    json_t *list, *v;
    const char **keys = NULL;
    char path[64];
    size_t i, n;
    kms_err rc = KMS_OK;

    list = json_object_get(r->in, "TagKeys");
    KMS_ENSURE(list && !json_is_null(list), KMS_ERR_VALIDATION,
               "1 validation error detected: Value null at 'tagKeys' failed to satisfy "
               "constraint: Member must not be null");
    KMS_ENSURE(json_is_array(list), KMS_ERR_SERIALIZATION, "TagKeys must be a list of strings");
    n = json_array_size(list);
    if (n && !(keys = calloc(n, sizeof *keys)))
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    json_array_foreach(list, i, v)
    {
        snprintf(path, sizeof path, "tagKeys.%zu.member", i + 1);
        rc = tag_string(v, path, 1, TAG_KEY_MAX, &keys[i]);
        if (rc == KMS_OK)
            rc = tag_key_allowed(keys[i], keys, i);
        if (rc != KMS_OK)
            break;
    }
    if (rc == KMS_OK)
        rc = tagged_key(r, "kms:UntagResource", &key);
    if (rc == KMS_OK)
        rc = kms_keystore_untag(r->srv->ks, key.id_text, keys, n);
    free(keys);
    r->out = NULL;
    return rc;
}

/*
 * A page of ListResourceTags. The marker is the next page's first tag key in
 * standard base64: a tag key may hold any Unicode character, and AWS's
 * MarkerType only U+0020 to U+00FF.
 */
struct tag_page {
    json_t *list;
    size_t limit, n;
    char *next; /* the tag key after the page, when there is one */
};

static kms_err page_tag(void *arg, const char *tag_key, const char *tag_value)
{
    struct tag_page *p = arg;
    if (p->n++ == p->limit) {
        p->next = strdup(tag_key);
        KMS_ENSURE(p->next != NULL, KMS_ERR_INTERNAL, "out of memory");
        return KMS_OK;
    }
    KMS_ENSURE(json_array_append_new(
                   p->list, json_pack("{s:s, s:s}", "TagKey", tag_key, "TagValue", tag_value)) == 0,
               KMS_ERR_INTERNAL, "out of memory");
    return KMS_OK;
}

/* The tag key a Marker names: what NextMarker encoded, or InvalidMarkerException. */
static kms_err marker_tag_key(const char *marker, struct kms_buf *out)
{
    kms_err rc = kms_b64_decode(marker, strlen(marker), out);
    if (rc == KMS_OK && kms_buf_reserve(out, 1) == KMS_OK) {
        out->data[out->len] = '\0';
        const char *s = (const char *)out->data;
        json_t *utf8 = json_stringn(s, out->len); /* NULL unless valid UTF-8 */
        int ok =
            utf8 && out->len > 0 && strlen(s) == out->len && characters(s, out->len) <= TAG_KEY_MAX;
        json_decref(utf8);
        if (ok)
            return KMS_OK;
    }
    kms_err_clear();
    kms_buf_free(out);
    return KMS_FAIL(KMS_ERR_INVALID_MARKER, "Marker is not valid");
}

kms_err kms_op_list_resource_tags(struct kms_request *r)
{
    struct kms_key_ref key = KMS_KEY_REF_INIT;
    struct kms_buf from = KMS_BUF_INIT, next = KMS_BUF_INIT;
    struct tag_page page = {0};
    const char *marker;
    kms_err rc;

    KMS_GUARD(tagged_key(r, "kms:ListResourceTags", &key));
    KMS_GUARD(kms_in_limit(r->in, LIST_TAGS_MAX, LIST_TAGS_MAX, &page.limit));
    KMS_GUARD(kms_in_marker(r->in, &marker));
    if (marker)
        KMS_GUARD(marker_tag_key(marker, &from));
    page.list = json_array();
    rc = page.list ? KMS_OK : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    /* One more than asked: when it is there, the page is truncated and it starts the next. */
    if (rc == KMS_OK)
        rc = kms_keystore_list_tags(r->srv->ks, key.id_text, marker ? (char *)from.data : NULL,
                                    page.limit + 1, page_tag, &page);
    if (rc == KMS_OK && page.next)
        rc = kms_b64_encode((const uint8_t *)page.next, strlen(page.next), &next);
    if (rc == KMS_OK && page.next)
        rc = kms_buf_reserve(&next, 1);
    if (rc == KMS_OK && page.next)
        next.data[next.len] = '\0';
    if (rc == KMS_OK) {
        r->out = json_pack("{s:O}", "Tags", page.list);
        rc = r->out ? kms_out_page(r->out, page.next ? (char *)next.data : NULL)
                    : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    json_decref(page.list);
    free(page.next);
    kms_buf_free(&from);
    kms_buf_free(&next);
    return rc;
}
