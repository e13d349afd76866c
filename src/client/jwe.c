/*
 * JWE (RFC 7516) with "alg":"dir" and "enc":"A256GCM" (RFC 7518 §4.5, §5.3).
 *
 * Compact serialization, five base64url segments (RFC 7516 §7.1):
 *
 *   BASE64URL(UTF8(protected header)) . "" . BASE64URL(IV) . BASE64URL(ciphertext)
 *       . BASE64URL(tag)
 *
 * The encrypted-key segment is empty ("dir": the data key is the content
 * encryption key). The flattened JSON serialization (§7.2.2) carries the same
 * pieces as "protected", "iv", "ciphertext" and "tag" members.
 *
 * The protected header is {"alg":"dir","enc":"A256GCM","kid":ARN,
 * "p11kms_blob":BASE64URL(blob),"p11kms_ctx":{...}}. The GCM additional data
 * is ASCII(BASE64URL(UTF8(protected header))) exactly as it appears in the
 * token (§5.1 step 14), so the blob and the context are bound to the
 * ciphertext: change either and the tag fails.
 *
 * Parsing is strict: exactly five segments, strict base64url in each (no
 * padding, no characters outside the alphabet, unused bits zero), a header
 * that is a JSON object without duplicate members, alg "dir", enc "A256GCM",
 * no "zip" and no "crit" (we understand no extension), an empty encrypted
 * key, a 12-byte IV, a 16-byte tag and bounded sizes. Anything else is
 * P11KMS_ERR_MALFORMED; members we do not know ("typ", "cty") are ignored as
 * RFC 7516 §4 asks.
 */
#include "config.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/digest.h"
#include "common/encoding.h"
#include "common/json_alloc.h"

#define KID_MAX (sizeof(((struct p11kms_data_key *)0)->key_arn) - 1)

size_t kms_jwe_b64url_len(size_t n)
{
    return n / 3 * 4 + (n % 3 ? n % 3 + 1 : 0);
}

static p11kms_status oom(void)
{
    return kms_client_fail(P11KMS_ERR_MEMORY, "JWE: out of memory");
}

static int cmp_key(const void *a, const void *b)
{
    const struct p11kms_context *x = *(const struct p11kms_context *const *)a;
    const struct p11kms_context *y = *(const struct p11kms_context *const *)b;
    return strcmp(x->key, y->key);
}

/* {"k":"v",...} with keys in byte order; duplicates and bad UTF-8 refused. */
static p11kms_status context_object(const struct p11kms_context *ctx, size_t nctx, json_t **out)
{
    p11kms_status st = P11KMS_OK;
    const struct p11kms_context **order = NULL;
    json_t *o = json_object();
    if (!o)
        return oom();
    if (nctx) {
        order = calloc(nctx, sizeof *order);
        if (!order) {
            st = oom();
            goto cleanup;
        }
    }
    for (size_t i = 0; i < nctx; i++) {
        if (!ctx[i].key || !ctx[i].value) {
            st = kms_client_fail(P11KMS_ERR_ARGUMENT, "encryption context pair %zu has NULL", i);
            goto cleanup;
        }
        order[i] = &ctx[i];
    }
    if (nctx > 1)
        qsort(order, nctx, sizeof *order, cmp_key);
    for (size_t i = 0; i < nctx; i++) {
        if (i > 0 && strcmp(order[i - 1]->key, order[i]->key) == 0) {
            st = kms_client_fail(P11KMS_ERR_ARGUMENT, "the encryption context has a duplicate key");
            goto cleanup;
        }
        json_t *v = json_string(order[i]->value);
        if (!v || json_object_set_new(o, order[i]->key, v) != 0) {
            st = kms_client_fail(P11KMS_ERR_ARGUMENT, "the encryption context is not valid UTF-8");
            goto cleanup;
        }
    }
    *out = o;
    o = NULL;
cleanup:
    free(order);
    json_decref(o);
    return st;
}

p11kms_status kms_jwe_gcm_seal(const uint8_t *key, const uint8_t *iv, const char *aad,
                               size_t aad_len, const uint8_t *in, size_t n, uint8_t *ct,
                               uint8_t tag[KMS_JWE_TAG_LEN])
{
    p11kms_status st = kms_client_fail(P11KMS_ERR_MEMORY, "JWE: AES-256-GCM failed");
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    int len;
    if (!c)
        return st;
    if (EVP_EncryptInit_ex(c, kms_cipher_aes256gcm(), NULL, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, KMS_JWE_IV_LEN, NULL) != 1 ||
        EVP_EncryptInit_ex(c, NULL, NULL, key, iv) != 1 ||
        EVP_EncryptUpdate(c, NULL, &len, (const uint8_t *)aad, (int)aad_len) != 1 ||
        (n && EVP_EncryptUpdate(c, ct, &len, in, (int)n) != 1) ||
        EVP_EncryptFinal_ex(c, ct + n, &len) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_GET_TAG, KMS_JWE_TAG_LEN, tag) != 1)
        goto cleanup;
    st = P11KMS_OK;
cleanup:
    EVP_CIPHER_CTX_free(c);
    return st;
}

static int append_b64url(struct kms_buf *b, const uint8_t *p, size_t n)
{
    return kms_b64url_encode(p, n, b) == KMS_OK;
}

static int append_str(struct kms_buf *b, const char *s)
{
    return kms_buf_append_str(b, s) == KMS_OK;
}

p11kms_status kms_jwe_seal(enum kms_jwe_form form, const uint8_t key[KMS_JWE_KEY_LEN],
                           const uint8_t *iv, const char *kid, const uint8_t *blob, size_t blob_len,
                           const struct p11kms_context *ctx, size_t nctx, const uint8_t *payload,
                           size_t n, char **out, size_t *out_len)
{
    if (!key || !kid || !blob || (!ctx && nctx) || (!payload && n) || !out || !out_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE seal: NULL argument");
    *out = NULL;
    *out_len = 0;
    if (!*kid || strlen(kid) > KID_MAX)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE seal: the key ARN is empty or too long");
    if (!blob_len || blob_len > KMS_JWE_MAX_BLOB)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE seal: the blob is empty or too long");
    if (n > KMS_JWE_MAX_PAYLOAD)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE seal: the payload is over %zu bytes",
                               KMS_JWE_MAX_PAYLOAD);

    p11kms_status st;
    json_t *hdr = NULL, *jctx = NULL;
    struct kms_buf blob64 = KMS_BUF_INIT, hjson = KMS_BUF_INIT, aad = KMS_BUF_INIT,
                   tok = KMS_BUF_INIT;
    uint8_t ivb[KMS_JWE_IV_LEN], tag[KMS_JWE_TAG_LEN];
    uint8_t *ct = NULL;

    if ((st = context_object(ctx, nctx, &jctx)) != P11KMS_OK)
        goto cleanup;
    if (kms_b64url_encode(blob, blob_len, &blob64) != KMS_OK) {
        st = oom();
        goto cleanup;
    }
    hdr = json_object();
    if (!hdr || json_object_set_new(hdr, "alg", json_string("dir")) != 0 ||
        json_object_set_new(hdr, "enc", json_string("A256GCM")) != 0) {
        st = oom();
        goto cleanup;
    }
    json_t *jkid = json_string(kid);
    if (!jkid || json_object_set_new(hdr, "kid", jkid) != 0) {
        st = kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE seal: the key ARN is not valid UTF-8");
        goto cleanup;
    }
    if (json_object_set_new(hdr, "p11kms_blob", json_stringn((char *)blob64.data, blob64.len)) !=
            0 ||
        json_object_set(hdr, "p11kms_ctx", jctx) != 0 || kms_json_dump(hdr, 0, &hjson) != KMS_OK) {
        st = oom();
        goto cleanup;
    }
    if (hjson.len > KMS_JWE_MAX_HEADER) {
        st =
            kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE seal: the protected header is over %zu bytes",
                            KMS_JWE_MAX_HEADER);
        goto cleanup;
    }
    if (kms_b64url_encode(hjson.data, hjson.len, &aad) != KMS_OK) {
        st = oom();
        goto cleanup;
    }

    if (iv)
        memcpy(ivb, iv, sizeof ivb);
    else if (RAND_bytes(ivb, sizeof ivb) != 1) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "JWE seal: the random generator failed");
        goto cleanup;
    }
    ct = malloc(n ? n : 1);
    if (!ct) {
        st = oom();
        goto cleanup;
    }
    if ((st = kms_jwe_gcm_seal(key, ivb, (const char *)aad.data, aad.len, payload, n, ct, tag)) !=
        P11KMS_OK)
        goto cleanup;

    int ok;
    if (form == KMS_JWE_FLATTENED) {
        ok = append_str(&tok, "{\"protected\":\"") && append_str(&tok, (char *)aad.data) &&
             append_str(&tok, "\",\"iv\":\"") && append_b64url(&tok, ivb, sizeof ivb) &&
             append_str(&tok, "\",\"ciphertext\":\"") && append_b64url(&tok, ct, n) &&
             append_str(&tok, "\",\"tag\":\"") && append_b64url(&tok, tag, sizeof tag) &&
             append_str(&tok, "\"}");
    } else {
        ok = append_str(&tok, (char *)aad.data) && append_str(&tok, "..") &&
             append_b64url(&tok, ivb, sizeof ivb) && append_str(&tok, ".") &&
             append_b64url(&tok, ct, n) && append_str(&tok, ".") &&
             append_b64url(&tok, tag, sizeof tag);
    }
    if (!ok || kms_buf_terminate(&tok) != KMS_OK) {
        st = oom();
        goto cleanup;
    }
    *out = (char *)tok.data;
    *out_len = tok.len;
    tok.data = NULL;
    st = P11KMS_OK;

cleanup:
    json_decref(hdr);
    json_decref(jctx);
    kms_buf_free(&blob64);
    kms_buf_free(&hjson);
    kms_buf_free(&aad);
    kms_buf_free(&tok);
    kms_free_secret(ct, n ? n : 1);
    OPENSSL_cleanse(ivb, sizeof ivb);
    OPENSSL_cleanse(tag, sizeof tag);
    return st;
}

/* ---- parsing ---------------------------------------------------------------- */

/*
 * A parsed protected header. Immutable once made, it is shared, counted,
 * between the JWEs parsed from the same header text and a client's memo
 * (struct kms_jwe_memo), so any thread may read it while others hold it.
 * Everything in it is a function of text alone: a JWE whose header segment
 * is text byte for byte gets the same pieces whether it parses text again or
 * takes this. Nothing in it is secret.
 */
struct kms_jwe_hdr {
    atomic_size_t refs;
    char *text; /* the header segment as in the token (the AAD), NUL-terminated */
    size_t text_len;
    json_t *json;
    const char *kid; /* in json */
    uint8_t *blob;
    size_t blob_len;
    struct p11kms_context *ctx; /* strings in json */
    size_t nctx;
    uint8_t *canon; /* the canonical form of ctx; NULL when ctx has none */
    size_t canon_len;
};

static void hdr_release(struct kms_jwe_hdr *h)
{
    if (!h || atomic_fetch_sub_explicit(&h->refs, 1, memory_order_acq_rel) != 1)
        return;
    json_decref(h->json);
    free(h->text);
    free(h->blob);
    free(h->ctx);
    free(h->canon);
    free(h);
}

static struct kms_jwe_hdr *hdr_retain(struct kms_jwe_hdr *h)
{
    atomic_fetch_add_explicit(&h->refs, 1, memory_order_relaxed);
    return h;
}

static p11kms_status malformed(const char *what)
{
    return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: %s", what);
}

p11kms_status kms_jwe_decode_seg(const char *s, size_t n, size_t want, size_t max, uint8_t *out,
                                 size_t *out_len, const char *what)
{
    if (want ? n != kms_jwe_b64url_len(want) : n > kms_jwe_b64url_len(max))
        return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: the %s has the wrong size", what);
    if (kms_b64url_decode_public_to(s, n, out, kms_b64url_decoded_len(n), out_len) != KMS_OK)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: the %s is not strict base64url", what);
    if (want && *out_len != want)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: the %s has the wrong size", what);
    return P11KMS_OK;
}

p11kms_status kms_jwe_decode_seg_alloc(const char *s, size_t n, size_t max, uint8_t **out,
                                       size_t *out_len, const char *what)
{
    *out = NULL;
    if (n > kms_jwe_b64url_len(max))
        return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: the %s has the wrong size", what);
    size_t cap = kms_b64url_decoded_len(n);
    uint8_t *p = malloc(cap ? cap : 1);
    if (!p)
        return oom();
    p11kms_status st = kms_jwe_decode_seg(s, n, 0, max, p, out_len, what);
    if (st != P11KMS_OK) {
        free(p);
        return st;
    }
    *out = p;
    return P11KMS_OK;
}

/* The JSON of a protected header, checked, into h. */
static p11kms_status parse_header_json(struct kms_jwe_hdr *h, const uint8_t *p, size_t n)
{
    json_error_t err;
    h->json = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, &err);
    if (!h->json || !json_is_object(h->json))
        return malformed("the protected header is not a JSON object without duplicate members");
    json_t *o = h->json;
    const char *alg = json_string_value(json_object_get(o, "alg"));
    const char *enc = json_string_value(json_object_get(o, "enc"));
    if (!alg || strcmp(alg, "dir") != 0)
        return malformed("alg is not \"dir\"");
    if (!enc || strcmp(enc, "A256GCM") != 0)
        return malformed("enc is not \"A256GCM\"");
    if (json_object_get(o, "zip"))
        return malformed("compressed payloads (zip) are not accepted");
    if (json_object_get(o, "crit"))
        return malformed("no critical header extension (crit) is understood");
    json_t *kid = json_object_get(o, "kid");
    h->kid = json_string_value(kid);
    if (!h->kid || !json_string_length(kid) || json_string_length(kid) > KID_MAX)
        return malformed("kid is missing, not a string, empty or too long");

    json_t *blob = json_object_get(o, "p11kms_blob");
    if (!json_is_string(blob))
        return malformed("p11kms_blob is missing or not a string");
    p11kms_status st =
        kms_jwe_decode_seg_alloc(json_string_value(blob), json_string_length(blob),
                                 KMS_JWE_MAX_BLOB, &h->blob, &h->blob_len, "p11kms_blob");
    if (st != P11KMS_OK)
        return st;
    if (h->blob_len == 0 || h->blob_len > KMS_JWE_MAX_BLOB)
        return malformed("p11kms_blob is empty or too long");

    json_t *ctx = json_object_get(o, "p11kms_ctx");
    if (!json_is_object(ctx))
        return malformed("p11kms_ctx is missing or not an object");
    size_t nctx = json_object_size(ctx);
    if (nctx) {
        h->ctx = calloc(nctx, sizeof *h->ctx);
        if (!h->ctx)
            return oom();
    }
    const char *k;
    json_t *v;
    json_object_foreach(ctx, k, v)
    {
        if (!json_is_string(v))
            return malformed("a p11kms_ctx value is not a string");
        h->ctx[h->nctx].key = k;
        h->ctx[h->nctx].value = json_string_value(v);
        h->nctx++;
    }
    /* Made once here rather than on every open of a JWE with this header. A
       context with no canonical form (too long, say) is the opener's to refuse. */
    if (kms_client_canonical(h->ctx, h->nctx, &h->canon, &h->canon_len) != P11KMS_OK)
        h->canon = NULL;
    return P11KMS_OK;
}

/* A header segment (text, n characters; n > 0), decoded and parsed. */
static p11kms_status parse_header(const char *text, size_t n, struct kms_jwe_hdr **out)
{
    uint8_t *json = NULL;
    size_t json_len = 0;
    struct kms_jwe_hdr *h = calloc(1, sizeof *h);
    if (!h)
        return oom();
    atomic_init(&h->refs, 1);
    p11kms_status st =
        kms_jwe_decode_seg_alloc(text, n, KMS_JWE_MAX_HEADER, &json, &json_len, "protected header");
    if (st == P11KMS_OK)
        st = parse_header_json(h, json, json_len);
    if (st == P11KMS_OK && !(h->text = malloc(n + 1)))
        st = oom();
    if (st != P11KMS_OK) {
        free(json);
        hdr_release(h);
        return st;
    }
    memcpy(h->text, text, n);
    h->text[n] = '\0';
    h->text_len = n;
    free(json);
    *out = h;
    return P11KMS_OK;
}

p11kms_status kms_jwe_memo_init(struct kms_jwe_memo *m)
{
    m->last = NULL;
    if (pthread_mutex_init(&m->lock, NULL) != 0)
        return kms_client_fail(P11KMS_ERR_MEMORY, "cannot create the JWE header memo's mutex");
    return P11KMS_OK;
}

void kms_jwe_memo_destroy(struct kms_jwe_memo *m)
{
    hdr_release(m->last);
    m->last = NULL;
    pthread_mutex_destroy(&m->lock);
}

/*
 * The parsed header for a header segment: the memo's when its text is the
 * segment byte for byte, else parsed afresh (and then remembered). The lock
 * guards only the pointer: the text is compared outside it, on a reference.
 */
static p11kms_status header_of(struct kms_jwe_memo *m, const char *text, size_t n,
                               struct kms_jwe_hdr **out)
{
    struct kms_jwe_hdr *h = NULL;
    if (m) {
        pthread_mutex_lock(&m->lock);
        if (m->last)
            h = hdr_retain(m->last);
        pthread_mutex_unlock(&m->lock);
        if (h && h->text_len == n && memcmp(h->text, text, n) == 0) {
            *out = h;
            return P11KMS_OK;
        }
        hdr_release(h);
    }
    p11kms_status st = parse_header(text, n, &h);
    if (st != P11KMS_OK)
        return st;
    if (m) {
        struct kms_jwe_hdr *old;
        hdr_retain(h);
        pthread_mutex_lock(&m->lock);
        old = m->last;
        m->last = h;
        pthread_mutex_unlock(&m->lock);
        hdr_release(old);
    }
    *out = h;
    return P11KMS_OK;
}

/* The five pieces, wherever they came from. */
static p11kms_status parse_pieces(struct kms_jwe *j, struct kms_jwe_memo *m, const char *h,
                                  size_t h_len, size_t ek_len, const char *iv, size_t iv_len,
                                  const char *ct, size_t ct_len, const char *tag, size_t tag_len)
{
    p11kms_status st;
    size_t n;
    if (!h_len)
        return malformed("the protected header is empty");
    if (ek_len)
        return malformed("the encrypted key is not empty, as \"dir\" requires");
    if ((st = header_of(m, h, h_len, &j->hdr)) != P11KMS_OK)
        return st;
    j->header = j->hdr->json;
    j->kid = j->hdr->kid;
    j->blob = j->hdr->blob;
    j->blob_len = j->hdr->blob_len;
    j->ctx = j->hdr->ctx;
    j->nctx = j->hdr->nctx;
    j->canon = j->hdr->canon;
    j->canon_len = j->hdr->canon_len;
    j->aad = j->hdr->text;
    j->aad_len = j->hdr->text_len;
    if ((st = kms_jwe_decode_seg(iv, iv_len, KMS_JWE_IV_LEN, 0, j->iv, &n, "IV")) != P11KMS_OK)
        return st;
    if ((st = kms_jwe_decode_seg(tag, tag_len, KMS_JWE_TAG_LEN, 0, j->tag, &n, "tag")) != P11KMS_OK)
        return st;
    return kms_jwe_decode_seg_alloc(ct, ct_len, KMS_JWE_MAX_PAYLOAD, &j->ciphertext,
                                    &j->ciphertext_len, "ciphertext");
}

static p11kms_status parse_compact(struct kms_jwe *j, struct kms_jwe_memo *m, const char *t,
                                   size_t len)
{
    const char *seg[5];
    size_t seg_len[5];
    size_t k = 0;
    const char *p = t, *end = t + len;
    for (;;) {
        const char *dot = memchr(p, '.', (size_t)(end - p));
        if (k == 5)
            return malformed("the compact serialization has more than five segments");
        seg[k] = p;
        seg_len[k] = (size_t)((dot ? dot : end) - p);
        k++;
        if (!dot)
            break;
        p = dot + 1;
    }
    if (k != 5)
        return malformed("the compact serialization does not have five segments");
    return parse_pieces(j, m, seg[0], seg_len[0], seg_len[1], seg[2], seg_len[2], seg[3],
                        seg_len[3], seg[4], seg_len[4]);
}

static p11kms_status parse_flattened(struct kms_jwe *j, struct kms_jwe_memo *m, const char *t,
                                     size_t len)
{
    json_error_t err;
    json_t *o = json_loadb(t, len, JSON_REJECT_DUPLICATES, &err);
    const char *h = NULL, *iv = NULL, *ct = NULL, *tag = NULL, *ek = "";
    size_t h_len = 0, iv_len = 0, ct_len = 0, tag_len = 0, ek_len = 0;
    p11kms_status st;
    /* "header", "aad", "recipients" and anything else: not ours. */
    if (!o || json_unpack_ex(o, &err, JSON_STRICT, "{s:s%, s:s%, s:s%, s:s%, s?s%}", "protected",
                             &h, &h_len, "iv", &iv, &iv_len, "ciphertext", &ct, &ct_len, "tag",
                             &tag, &tag_len, "encrypted_key", &ek, &ek_len) != 0)
        st = malformed("not the flattened JSON serialization of a \"dir\" JWE");
    else
        st = parse_pieces(j, m, h, h_len, ek_len, iv, iv_len, ct, ct_len, tag, tag_len);
    json_decref(o);
    return st;
}

p11kms_status kms_jwe_parse_memo(const char *token, size_t len, struct kms_jwe_memo *memo,
                                 struct kms_jwe *out)
{
    if (!out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE parse: NULL argument");
    memset(out, 0, sizeof *out);
    if (!token || !len)
        return malformed("empty");
    /* The largest token we accept: a flattened one with the largest pieces, and slack. */
    size_t max =
        kms_jwe_b64url_len(KMS_JWE_MAX_HEADER) + kms_jwe_b64url_len(KMS_JWE_MAX_PAYLOAD) + 4096;
    if (len > max)
        return malformed("too long");
    size_t i = 0;
    while (i < len && (token[i] == ' ' || token[i] == '\t' || token[i] == '\n' || token[i] == '\r'))
        i++;
    p11kms_status st = i < len && token[i] == '{' ? parse_flattened(out, memo, token, len)
                                                  : parse_compact(out, memo, token, len);
    if (st != P11KMS_OK)
        kms_jwe_clear(out);
    return st;
}

p11kms_status kms_jwe_parse(const char *token, size_t len, struct kms_jwe *out)
{
    return kms_jwe_parse_memo(token, len, NULL, out);
}

p11kms_status kms_jwe_gcm_open(const uint8_t *key, const uint8_t iv[KMS_JWE_IV_LEN],
                               const char *aad, size_t aad_len,
                               const uint8_t tag_in[KMS_JWE_TAG_LEN], const uint8_t *in, size_t n,
                               uint8_t *out)
{
    p11kms_status st;
    int len;
    uint8_t tag[KMS_JWE_TAG_LEN];
    memcpy(tag, tag_in, sizeof tag);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (!c)
        return oom();
    /* One init with cipher, key and IV: 12 bytes is GCM's default IV length. */
    _Static_assert(KMS_JWE_IV_LEN == 12, "the IV is GCM's default length");
    if (EVP_DecryptInit_ex(c, kms_cipher_aes256gcm(), NULL, key, iv) != 1 ||
        EVP_DecryptUpdate(c, NULL, &len, (const uint8_t *)aad, (int)aad_len) != 1 ||
        (n && EVP_DecryptUpdate(c, out, &len, in, (int)n) != 1) ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, KMS_JWE_TAG_LEN, tag) != 1) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "JWE: AES-256-GCM failed");
    } else if (EVP_DecryptFinal_ex(c, out + n, &len) != 1) {
        st = kms_client_fail(P11KMS_ERR_DECRYPT,
                             "JWE: the tag does not verify (altered, another data key, or "
                             "another encryption context)");
    } else {
        st = P11KMS_OK;
    }
    EVP_CIPHER_CTX_free(c);
    return st;
}

/* AES-256-GCM open of j's n bytes from in to out (in == out: in place). */
static p11kms_status gcm_open(const struct kms_jwe *j, const uint8_t *key, const uint8_t *in,
                              size_t n, uint8_t *out)
{
    return kms_jwe_gcm_open(key, j->iv, j->aad, j->aad_len, j->tag, in, n, out);
}

static p11kms_status check_decrypt_args(const struct kms_jwe *j, const uint8_t *key, size_t key_len,
                                        uint8_t **out, size_t *out_len)
{
    if (!j || !j->aad || !key || !out || !out_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE decrypt: NULL argument");
    *out = NULL;
    *out_len = 0;
    if (key_len != KMS_JWE_KEY_LEN)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE decrypt: the data key is not 32 bytes");
    return P11KMS_OK;
}

p11kms_status kms_jwe_decrypt(const struct kms_jwe *j, const uint8_t *key, size_t key_len,
                              uint8_t **out, size_t *out_len)
{
    p11kms_status st = check_decrypt_args(j, key, key_len, out, out_len);
    if (st != P11KMS_OK)
        return st;
    size_t n = j->ciphertext_len;
    uint8_t *pt = malloc(n ? n : 1);
    if (!pt)
        return oom();
    if ((st = gcm_open(j, key, j->ciphertext, n, pt)) == P11KMS_OK) {
        *out = pt;
        *out_len = n;
        pt = NULL;
    }
    /* Fail closed: whatever was decrypted before the tag failed is wiped. */
    kms_free_secret(pt, n ? n : 1);
    return st;
}

p11kms_status kms_jwe_decrypt_in_place(struct kms_jwe *j, const uint8_t *key, size_t key_len,
                                       uint8_t **out, size_t *out_len)
{
    p11kms_status st = check_decrypt_args(j, key, key_len, out, out_len);
    if (st != P11KMS_OK)
        return st;
    if (!j->ciphertext)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE decrypt: the ciphertext is gone");
    size_t n = j->ciphertext_len;
    uint8_t *pt = j->ciphertext;
    j->ciphertext = NULL;
    j->ciphertext_len = 0;
    if ((st = gcm_open(j, key, pt, n, pt)) == P11KMS_OK) {
        *out = pt;
        *out_len = n;
        pt = NULL;
    }
    /* Fail closed: whatever was decrypted before the tag failed is wiped. */
    kms_free_secret(pt, n ? n : 1);
    return st;
}

void kms_jwe_clear(struct kms_jwe *j)
{
    if (!j)
        return;
    hdr_release(j->hdr);
    free(j->ciphertext);
    memset(j, 0, sizeof *j);
}
