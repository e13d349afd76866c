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
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/digest.h"
#include "common/encoding.h"
#include "common/json_alloc.h"

#define KID_MAX (sizeof(((struct p11kms_data_key *)0)->key_arn) - 1)

/* Encoded length of n bytes in unpadded base64url. */
static size_t b64url_len(size_t n)
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

static p11kms_status gcm_seal(const uint8_t *key, const uint8_t *iv, const char *aad,
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
    if ((st = gcm_seal(key, ivb, (const char *)aad.data, aad.len, payload, n, ct, tag)) !=
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

static p11kms_status malformed(const char *what)
{
    return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: %s", what);
}

/* Strict base64url of exactly want bytes (want 0: any length up to max). */
static p11kms_status decode_seg(const char *s, size_t n, size_t want, size_t max,
                                struct kms_buf *out, const char *what)
{
    if (want ? n != b64url_len(want) : n > b64url_len(max))
        return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: the %s has the wrong size", what);
    if (kms_b64url_decode(s, n, out) != KMS_OK)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: the %s is not strict base64url", what);
    if (want && out->len != want)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: the %s has the wrong size", what);
    return P11KMS_OK;
}

static p11kms_status parse_header(struct kms_jwe *j, const uint8_t *p, size_t n)
{
    json_error_t err;
    j->header = json_loadb((const char *)p, n, JSON_REJECT_DUPLICATES, &err);
    if (!j->header || !json_is_object(j->header))
        return malformed("the protected header is not a JSON object without duplicate members");
    json_t *h = j->header;
    const char *alg = json_string_value(json_object_get(h, "alg"));
    const char *enc = json_string_value(json_object_get(h, "enc"));
    if (!alg || strcmp(alg, "dir") != 0)
        return malformed("alg is not \"dir\"");
    if (!enc || strcmp(enc, "A256GCM") != 0)
        return malformed("enc is not \"A256GCM\"");
    if (json_object_get(h, "zip"))
        return malformed("compressed payloads (zip) are not accepted");
    if (json_object_get(h, "crit"))
        return malformed("no critical header extension (crit) is understood");
    json_t *kid = json_object_get(h, "kid");
    j->kid = json_string_value(kid);
    if (!j->kid || !json_string_length(kid) || json_string_length(kid) > KID_MAX)
        return malformed("kid is missing, not a string, empty or too long");

    json_t *blob = json_object_get(h, "p11kms_blob");
    if (!json_is_string(blob))
        return malformed("p11kms_blob is missing or not a string");
    struct kms_buf b = KMS_BUF_INIT;
    p11kms_status st = decode_seg(json_string_value(blob), json_string_length(blob), 0,
                                  KMS_JWE_MAX_BLOB, &b, "p11kms_blob");
    if (st == P11KMS_OK && (b.len == 0 || b.len > KMS_JWE_MAX_BLOB))
        st = malformed("p11kms_blob is empty or too long");
    if (st != P11KMS_OK) {
        kms_buf_free(&b);
        return st;
    }
    j->blob = b.data;
    j->blob_len = b.len;

    json_t *ctx = json_object_get(h, "p11kms_ctx");
    if (!json_is_object(ctx))
        return malformed("p11kms_ctx is missing or not an object");
    size_t nctx = json_object_size(ctx);
    if (nctx) {
        j->ctx = calloc(nctx, sizeof *j->ctx);
        if (!j->ctx)
            return oom();
    }
    const char *k;
    json_t *v;
    json_object_foreach(ctx, k, v)
    {
        if (!json_is_string(v))
            return malformed("a p11kms_ctx value is not a string");
        j->ctx[j->nctx].key = k;
        j->ctx[j->nctx].value = json_string_value(v);
        j->nctx++;
    }
    return P11KMS_OK;
}

/* The five pieces, wherever they came from. */
static p11kms_status parse_pieces(struct kms_jwe *j, const char *h, size_t h_len, size_t ek_len,
                                  const char *iv, size_t iv_len, const char *ct, size_t ct_len,
                                  const char *tag, size_t tag_len)
{
    p11kms_status st;
    struct kms_buf hb = KMS_BUF_INIT, b = KMS_BUF_INIT;
    if (!h_len) {
        st = malformed("the protected header is empty");
        goto cleanup;
    }
    if (ek_len) {
        st = malformed("the encrypted key is not empty, as \"dir\" requires");
        goto cleanup;
    }
    if ((st = decode_seg(h, h_len, 0, KMS_JWE_MAX_HEADER, &hb, "protected header")) != P11KMS_OK)
        goto cleanup;
    if ((st = parse_header(j, hb.data, hb.len)) != P11KMS_OK)
        goto cleanup;
    if ((st = decode_seg(iv, iv_len, KMS_JWE_IV_LEN, 0, &b, "IV")) != P11KMS_OK)
        goto cleanup;
    memcpy(j->iv, b.data, KMS_JWE_IV_LEN);
    kms_buf_free(&b);
    if ((st = decode_seg(tag, tag_len, KMS_JWE_TAG_LEN, 0, &b, "tag")) != P11KMS_OK)
        goto cleanup;
    memcpy(j->tag, b.data, KMS_JWE_TAG_LEN);
    kms_buf_free(&b);
    if ((st = decode_seg(ct, ct_len, 0, KMS_JWE_MAX_PAYLOAD, &b, "ciphertext")) != P11KMS_OK)
        goto cleanup;
    j->ciphertext = b.data;
    j->ciphertext_len = b.len;
    b.data = NULL;
    j->aad = malloc(h_len + 1);
    if (!j->aad) {
        st = oom();
        goto cleanup;
    }
    memcpy(j->aad, h, h_len);
    j->aad[h_len] = '\0';
    j->aad_len = h_len;
    st = P11KMS_OK;
cleanup:
    kms_buf_free(&hb);
    kms_buf_free(&b);
    return st;
}

static p11kms_status parse_compact(struct kms_jwe *j, const char *t, size_t len)
{
    const char *seg[5];
    size_t seg_len[5];
    size_t k = 0, start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i == len || t[i] == '.') {
            if (k == 5)
                return malformed("the compact serialization has more than five segments");
            seg[k] = t + start;
            seg_len[k] = i - start;
            k++;
            start = i + 1;
        }
    }
    if (k != 5)
        return malformed("the compact serialization does not have five segments");
    return parse_pieces(j, seg[0], seg_len[0], seg_len[1], seg[2], seg_len[2], seg[3], seg_len[3],
                        seg[4], seg_len[4]);
}

static p11kms_status parse_flattened(struct kms_jwe *j, const char *t, size_t len)
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
        st = parse_pieces(j, h, h_len, ek_len, iv, iv_len, ct, ct_len, tag, tag_len);
    json_decref(o);
    return st;
}

p11kms_status kms_jwe_parse(const char *token, size_t len, struct kms_jwe *out)
{
    if (!out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE parse: NULL argument");
    memset(out, 0, sizeof *out);
    if (!token || !len)
        return malformed("empty");
    /* The largest token we accept: a flattened one with the largest pieces, and slack. */
    size_t max = b64url_len(KMS_JWE_MAX_HEADER) + b64url_len(KMS_JWE_MAX_PAYLOAD) + 4096;
    if (len > max)
        return malformed("too long");
    size_t i = 0;
    while (i < len && (token[i] == ' ' || token[i] == '\t' || token[i] == '\n' || token[i] == '\r'))
        i++;
    p11kms_status st = i < len && token[i] == '{' ? parse_flattened(out, token, len)
                                                  : parse_compact(out, token, len);
    if (st != P11KMS_OK)
        kms_jwe_clear(out);
    return st;
}

p11kms_status kms_jwe_decrypt(const struct kms_jwe *j, const uint8_t *key, size_t key_len,
                              uint8_t **out, size_t *out_len)
{
    if (!j || !j->aad || !key || !out || !out_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE decrypt: NULL argument");
    *out = NULL;
    *out_len = 0;
    if (key_len != KMS_JWE_KEY_LEN)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE decrypt: the data key is not 32 bytes");
    size_t n = j->ciphertext_len;
    uint8_t *pt = malloc(n ? n : 1);
    if (!pt)
        return oom();
    p11kms_status st = P11KMS_ERR_DECRYPT;
    int len;
    uint8_t tag[KMS_JWE_TAG_LEN];
    memcpy(tag, j->tag, sizeof tag);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    if (!c) {
        st = oom();
        goto cleanup;
    }
    if (EVP_DecryptInit_ex(c, kms_cipher_aes256gcm(), NULL, NULL, NULL) != 1 ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_IVLEN, KMS_JWE_IV_LEN, NULL) != 1 ||
        EVP_DecryptInit_ex(c, NULL, NULL, key, j->iv) != 1 ||
        EVP_DecryptUpdate(c, NULL, &len, (const uint8_t *)j->aad, (int)j->aad_len) != 1 ||
        (n && EVP_DecryptUpdate(c, pt, &len, j->ciphertext, (int)n) != 1) ||
        EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, KMS_JWE_TAG_LEN, tag) != 1) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "JWE: AES-256-GCM failed");
        goto cleanup;
    }
    if (EVP_DecryptFinal_ex(c, pt + n, &len) != 1) {
        st = kms_client_fail(P11KMS_ERR_DECRYPT,
                             "JWE: the tag does not verify (altered, another data key, or "
                             "another encryption context)");
        goto cleanup;
    }
    *out = pt;
    *out_len = n;
    pt = NULL;
    st = P11KMS_OK;
cleanup:
    EVP_CIPHER_CTX_free(c);
    /* Fail closed: whatever was decrypted before the tag failed is wiped. */
    kms_free_secret(pt, n ? n : 1);
    return st;
}

void kms_jwe_clear(struct kms_jwe *j)
{
    if (!j)
        return;
    json_decref(j->header);
    free(j->blob);
    free(j->ctx);
    free(j->aad);
    free(j->ciphertext);
    memset(j, 0, sizeof *j);
}
