/*
 * Authenticated headers: a MAC, made in the service with an HMAC key, over
 * a canonical form of a list of HTTP header fields (docs/client.md,
 * "Authenticated headers").
 *
 *   "p11kms-headers-v1" 0x00               18 bytes: what the bytes are
 *   count                                  u32 big-endian
 *   for each field, in canonical order:
 *     u32 big-endian length, name          lower-cased
 *     u32 big-endian length, value         as given
 *
 * Canonical order: by lower-cased name, bytewise (a name that is a prefix of
 * another comes first); fields with the same name keep the caller's order,
 * because the order of repeated fields is their meaning in HTTP. Every part
 * is length-prefixed and the count comes first, so the bytes decode to
 * exactly one list: no two lists that differ after lower-casing their names
 * share a form. The label keeps these bytes from being taken for any other
 * message MACed with the same key.
 *
 * Names must be HTTP tokens and values must be what an HTTP parser hands
 * over (no CR, LF, NUL or other controls but tab; no whitespace at either
 * end): a list the receiver could not see as given is refused, not
 * normalised, so sender and receiver never disagree about what was MACed.
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/buf.h"

#define LABEL "p11kms-headers-v1"
#define LABEL_LEN (sizeof LABEL) /* with its NUL */
#define NAME_MAX_LEN 256
#define VALUE_MAX_LEN P11KMS_MESSAGE_MAX
#define DEFAULT_ALGORITHM "HMAC_SHA_384"

/* RFC 9110 §5.6.2: tchar. */
static int is_tchar(unsigned char ch)
{
    if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9'))
        return 1;
    return ch != '\0' && strchr("!#$%&'*+-.^_`|~", ch) != NULL;
}

/* RFC 9110 §5.5: field-vchar (VCHAR, obs-text), SP and HTAB inside. */
static int is_field_char(unsigned char ch)
{
    return ch == '\t' || (ch >= 0x20 && ch != 0x7f);
}

static unsigned char lower(unsigned char ch)
{
    return ch >= 'A' && ch <= 'Z' ? (unsigned char)(ch - 'A' + 'a') : ch;
}

struct field {
    const char *name, *value;
    size_t name_len, value_len, index;
};

/* Lower-cased names bytewise, then the caller's order: a stable sort through qsort. */
static int field_cmp(const void *pa, const void *pb)
{
    const struct field *a = pa, *b = pb;
    size_t n = a->name_len < b->name_len ? a->name_len : b->name_len;
    for (size_t i = 0; i < n; i++) {
        unsigned char x = lower((unsigned char)a->name[i]), y = lower((unsigned char)b->name[i]);
        if (x != y)
            return x < y ? -1 : 1;
    }
    if (a->name_len != b->name_len)
        return a->name_len < b->name_len ? -1 : 1;
    return a->index < b->index ? -1 : a->index > b->index;
}

static p11kms_status check_field(size_t i, const char *name, const char *value, struct field *f)
{
    size_t n, v;

    if (!name || !value)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "header %zu: NULL name or value", i);
    n = strnlen(name, NAME_MAX_LEN + 1);
    v = strnlen(value, VALUE_MAX_LEN + 1);
    if (n == 0 || n > NAME_MAX_LEN)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "header %zu: the name must be 1 to %d bytes", i,
                               NAME_MAX_LEN);
    for (size_t k = 0; k < n; k++)
        if (!is_tchar((unsigned char)name[k]))
            return kms_client_fail(P11KMS_ERR_ARGUMENT,
                                   "header %zu: the name is not an HTTP token (byte %zu)", i, k);
    if (v > VALUE_MAX_LEN)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "header %zu: the value is over %d bytes", i,
                               VALUE_MAX_LEN);
    for (size_t k = 0; k < v; k++)
        if (!is_field_char((unsigned char)value[k]))
            return kms_client_fail(P11KMS_ERR_ARGUMENT,
                                   "header %zu: the value holds a control character (byte %zu)", i,
                                   k);
    if (v > 0 &&
        (value[0] == ' ' || value[0] == '\t' || value[v - 1] == ' ' || value[v - 1] == '\t'))
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "header %zu: the value starts or ends with whitespace", i);
    *f = (struct field){name, value, n, v, i};
    return P11KMS_OK;
}

static kms_err append_field(struct kms_buf *b, const struct field *f)
{
    KMS_GUARD(kms_buf_append_u32be(b, (uint32_t)f->name_len));
    KMS_GUARD(kms_buf_reserve(b, f->name_len));
    for (size_t k = 0; k < f->name_len; k++)
        KMS_GUARD(kms_buf_append_u8(b, lower((unsigned char)f->name[k])));
    KMS_GUARD(kms_buf_append_u32be(b, (uint32_t)f->value_len));
    return kms_buf_append(b, f->value, f->value_len);
}

p11kms_status p11kms_headers_canonical(const char *const *names, const char *const *values,
                                       size_t n, uint8_t **out, size_t *out_len)
{
    struct field *fields = NULL;
    struct kms_buf b = KMS_BUF_INIT;
    size_t total = LABEL_LEN + 4;
    p11kms_status st = P11KMS_OK;

    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!out || !out_len || (n && (!names || !values)))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_headers_canonical: NULL argument");
    /* Each field takes at least 9 bytes (two lengths, a name byte). */
    if (n > P11KMS_MESSAGE_MAX / 9)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "too many headers: the canonical form of "
                               "the list would be over %d bytes",
                               P11KMS_MESSAGE_MAX);
    if (n && !(fields = calloc(n, sizeof *fields)))
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    for (size_t i = 0; i < n; i++) {
        if ((st = check_field(i, names[i], values[i], &fields[i])) != P11KMS_OK)
            goto cleanup;
        total += 8 + fields[i].name_len + fields[i].value_len;
    }
    if (total > P11KMS_MESSAGE_MAX) {
        st = kms_client_fail(P11KMS_ERR_ARGUMENT,
                             "the canonical form of the headers is %zu bytes, over %d", total,
                             P11KMS_MESSAGE_MAX);
        goto cleanup;
    }
    if (n > 1)
        qsort(fields, n, sizeof *fields, field_cmp);
    if (kms_buf_reserve(&b, total) != KMS_OK || kms_buf_append(&b, LABEL, LABEL_LEN) != KMS_OK ||
        kms_buf_append_u32be(&b, (uint32_t)n) != KMS_OK) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        goto cleanup;
    }
    for (size_t i = 0; i < n; i++) {
        if (append_field(&b, &fields[i]) != KMS_OK) {
            st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
            goto cleanup;
        }
    }
    if (!(*out = malloc(b.len))) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        goto cleanup;
    }
    memcpy(*out, b.data, b.len);
    *out_len = b.len;
cleanup:
    kms_buf_free(&b);
    free(fields);
    return st;
}

p11kms_status p11kms_headers_mac(p11kms_client *c, const char *key_id, const char *const *names,
                                 const char *const *values, size_t n, const char *algorithm,
                                 uint8_t **tag, size_t *tag_len)
{
    uint8_t *canon = NULL;
    size_t canon_len = 0;
    p11kms_status st;

    if (tag)
        *tag = NULL;
    if (tag_len)
        *tag_len = 0;
    if (!c || !tag || !tag_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_headers_mac: NULL argument");
    if ((st = p11kms_headers_canonical(names, values, n, &canon, &canon_len)) != P11KMS_OK)
        return st;
    st = p11kms_generate_mac(c, key_id, algorithm ? algorithm : DEFAULT_ALGORITHM, canon, canon_len,
                             tag, tag_len);
    p11kms_free(canon, canon_len);
    return st;
}

p11kms_status p11kms_headers_verify(p11kms_client *c, const char *key_id, const char *const *names,
                                    const char *const *values, size_t n, const char *algorithm,
                                    const uint8_t *tag, size_t tag_len)
{
    uint8_t *canon = NULL;
    size_t canon_len = 0;
    p11kms_status st;

    if (!c)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_headers_verify: NULL argument");
    if ((st = p11kms_headers_canonical(names, values, n, &canon, &canon_len)) != P11KMS_OK)
        return st;
    st = p11kms_verify_mac(c, key_id, algorithm ? algorithm : DEFAULT_ALGORITHM, canon, canon_len,
                           tag, tag_len);
    p11kms_free(canon, canon_len);
    return st;
}
