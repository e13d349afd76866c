/*
 * Data keys: GenerateDataKey and Decrypt, straight to the service
 * (kms_service_*) and, for Decrypt, through the cache when it is on.
 *
 * A data key's plaintext lives in the secure heap when it is set up
 * (kms_client_secret_alloc); the base64 text it came in is wiped where this
 * file can reach it (the answer buffer, jansson's string) before it is freed.
 */
#include "config.h"

#include <openssl/crypto.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/encoding.h"

#define KEY_ID_MAX 2048    /* AWS's KeyId bound */
#define BLOB_MAX 6144      /* AWS's CiphertextBlob bound */
#define PLAINTEXT_MAX 4096 /* the most Decrypt can give back */
#define DATA_KEY_LEN 32    /* AES_256 */

/* {"k": "v", ...}; duplicate keys and non-UTF-8 text refused. */
static p11kms_status context_object(const struct p11kms_context *ctx, size_t nctx, json_t **out)
{
    json_t *o = json_object();
    *out = NULL;
    if (!o)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    for (size_t i = 0; i < nctx; i++) {
        json_t *v;
        if (!ctx[i].key || !ctx[i].value) {
            json_decref(o);
            return kms_client_fail(P11KMS_ERR_ARGUMENT, "encryption context: pair %zu is NULL", i);
        }
        if (json_object_get(o, ctx[i].key)) {
            json_decref(o);
            return kms_client_fail(P11KMS_ERR_ARGUMENT, "encryption context: a key is given twice");
        }
        v = json_string(ctx[i].value);
        if (!v || json_object_set_new(o, ctx[i].key, v) != 0) {
            json_decref(o);
            return kms_client_fail(P11KMS_ERR_ARGUMENT,
                                   "encryption context: pair %zu is not UTF-8 text", i);
        }
    }
    *out = o;
    return P11KMS_OK;
}

p11kms_status kms_request_add_context(json_t *req, const struct p11kms_context *ctx, size_t nctx)
{
    json_t *o;
    p11kms_status st;
    if (nctx == 0)
        return P11KMS_OK;
    if (!ctx)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "encryption context: NULL pairs");
    if ((st = context_object(ctx, nctx, &o)) != P11KMS_OK)
        return st;
    if (json_object_set_new(req, "EncryptionContext", o) != 0)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    return P11KMS_OK;
}

/* A base64 member of the answer, decoded; 1 to max bytes. */
static p11kms_status b64_member(const json_t *resp, const char *name, size_t max,
                                struct kms_buf *out)
{
    const json_t *v = json_object_get(resp, name);
    if (!json_is_string(v))
        return kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer has no %s", name);
    if (kms_b64_decode(json_string_value(v), json_string_length(v), out) != KMS_OK ||
        out->len == 0 || out->len > max) {
        kms_buf_free(out);
        return kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer's %s is not what it should be",
                               name);
    }
    return P11KMS_OK;
}

/* jansson's copy of the answer's Plaintext: ours to overwrite before it is freed. */
static void wipe_plaintext(json_t *resp)
{
    json_t *v = resp ? json_object_get(resp, "Plaintext") : NULL;
    if (json_is_string(v))
        OPENSSL_cleanse((char *)json_string_value(v), json_string_length(v));
}

/* The answer's Plaintext into the secure heap. */
static p11kms_status take_plaintext(const p11kms_client *c, json_t *resp, size_t want,
                                    struct p11kms_data_key *out)
{
    struct kms_buf pt = KMS_BUF_INIT;
    p11kms_status st = b64_member(resp, "Plaintext", PLAINTEXT_MAX, &pt);

    if (st == P11KMS_OK && want && pt.len != want)
        st = kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer's data key is %zu bytes, not %zu",
                             pt.len, want);
    if (st == P11KMS_OK) {
        out->plaintext = kms_client_secret_alloc(c, pt.len);
        if (!out->plaintext) {
            st = kms_client_fail(P11KMS_ERR_MEMORY, "no room for the data key in the secure heap");
        } else {
            memcpy(out->plaintext, pt.data, pt.len);
            out->plaintext_len = pt.len;
        }
    }
    kms_buf_free(&pt);
    wipe_plaintext(resp);
    return st;
}

static p11kms_status take_key_arn(const json_t *resp, struct p11kms_data_key *out)
{
    const json_t *v = json_object_get(resp, "KeyId");
    if (!json_is_string(v) || json_string_length(v) == 0 ||
        json_string_length(v) >= sizeof out->key_arn)
        return kms_client_fail(P11KMS_ERR_PROTOCOL, "the answer's KeyId is missing or too long");
    memcpy(out->key_arn, json_string_value(v), json_string_length(v) + 1);
    return P11KMS_OK;
}

p11kms_status kms_check_key_id(const char *key_id)
{
    size_t n = key_id ? strnlen(key_id, KEY_ID_MAX + 1) : 0;
    if (n == 0 || n > KEY_ID_MAX)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the key id must be 1 to %d bytes", KEY_ID_MAX);
    return P11KMS_OK;
}

p11kms_status kms_key_request(const char *key_id, json_t **out)
{
    p11kms_status st;
    *out = NULL;
    if ((st = kms_check_key_id(key_id)) != P11KMS_OK)
        return st;
    *out = json_pack("{s:s}", "KeyId", key_id);
    if (!*out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the key id is not UTF-8 text");
    return P11KMS_OK;
}

static p11kms_status check_blob(const uint8_t *blob, size_t blob_len)
{
    if (!blob || blob_len == 0 || blob_len > BLOB_MAX)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the data key's blob must be 1 to %d bytes",
                               BLOB_MAX);
    return P11KMS_OK;
}

p11kms_status kms_service_generate(p11kms_client *c, const char *key_id,
                                   const struct p11kms_context *ctx, size_t nctx,
                                   struct p11kms_data_key *out)
{
    json_t *req = NULL, *resp = NULL;
    struct kms_buf blob = KMS_BUF_INIT;
    p11kms_status st;

    if (!c || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "GenerateDataKey: NULL argument");
    memset(out, 0, sizeof *out);
    if ((st = kms_check_key_id(key_id)) != P11KMS_OK)
        return st;
    req = json_pack("{s:s, s:s}", "KeyId", key_id, "KeySpec", "AES_256");
    if (!req)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "the key id is not UTF-8 text");
    st = kms_request_add_context(req, ctx, nctx);
    if (st == P11KMS_OK)
        st = kms_transport_call(c, "GenerateDataKey", req, &resp);
    if (st == P11KMS_OK)
        st = take_plaintext(c, resp, DATA_KEY_LEN, out);
    if (st == P11KMS_OK)
        st = take_key_arn(resp, out);
    if (st == P11KMS_OK)
        st = b64_member(resp, "CiphertextBlob", BLOB_MAX, &blob);
    if (st == P11KMS_OK) {
        out->blob = malloc(blob.len);
        if (!out->blob) {
            st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        } else {
            memcpy(out->blob, blob.data, blob.len);
            out->blob_len = blob.len;
        }
    }
    if (st != P11KMS_OK)
        p11kms_data_key_clear(out);
    kms_buf_free(&blob);
    json_decref(req);
    wipe_plaintext(resp);
    json_decref(resp);
    return st;
}

p11kms_status kms_service_decrypt(p11kms_client *c, const uint8_t *blob, size_t blob_len,
                                  const struct p11kms_context *ctx, size_t nctx,
                                  struct p11kms_data_key *out)
{
    json_t *req = NULL, *resp = NULL;
    struct kms_buf b64 = KMS_BUF_INIT;
    p11kms_status st;

    if (!c || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "Decrypt: NULL argument");
    memset(out, 0, sizeof *out);
    if ((st = check_blob(blob, blob_len)) != P11KMS_OK)
        return st;
    if (kms_b64_encode(blob, blob_len, &b64) != KMS_OK || kms_buf_terminate(&b64) != KMS_OK) {
        kms_buf_free(&b64);
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    }
    req = json_pack("{s:s}", "CiphertextBlob", (const char *)b64.data);
    kms_buf_free(&b64);
    if (!req)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    st = kms_request_add_context(req, ctx, nctx);
    if (st == P11KMS_OK)
        st = kms_transport_call(c, "Decrypt", req, &resp);
    if (st == P11KMS_OK)
        st = take_plaintext(c, resp, 0, out);
    if (st == P11KMS_OK)
        st = take_key_arn(resp, out);
    if (st == P11KMS_OK) {
        out->blob = malloc(blob_len);
        if (!out->blob) {
            st = kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        } else {
            memcpy(out->blob, blob, blob_len);
            out->blob_len = blob_len;
        }
    }
    if (st != P11KMS_OK)
        p11kms_data_key_clear(out);
    json_decref(req);
    wipe_plaintext(resp);
    json_decref(resp);
    return st;
}

p11kms_status p11kms_generate_data_key(p11kms_client *c, const char *key_id,
                                       const struct p11kms_context *ctx, size_t nctx,
                                       struct p11kms_data_key *out)
{
    if (out)
        memset(out, 0, sizeof *out);
    if (!c || !out || (nctx && !ctx))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_generate_data_key: NULL argument");
    return kms_service_generate(c, key_id, ctx, nctx, out);
}

p11kms_status p11kms_decrypt_data_key(p11kms_client *c, const uint8_t *blob, size_t blob_len,
                                      const struct p11kms_context *ctx, size_t nctx,
                                      struct p11kms_data_key *out)
{
    uint8_t *canon = NULL;
    size_t canon_len = 0;
    p11kms_status st;

    if (out)
        memset(out, 0, sizeof *out);
    if (!c || !out || (nctx && !ctx))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_decrypt_data_key: NULL argument");
    if ((st = check_blob(blob, blob_len)) != P11KMS_OK)
        return st;
    if (!c->cache)
        return kms_service_decrypt(c, blob, blob_len, ctx, nctx, out);

    if ((st = kms_client_canonical(ctx, nctx, &canon, &canon_len)) != P11KMS_OK)
        return st;
    st = kms_decrypt_data_key_canon(c, blob, blob_len, ctx, nctx, canon, canon_len, out);
    free(canon);
    return st;
}

p11kms_status kms_decrypt_data_key_canon(p11kms_client *c, const uint8_t *blob, size_t blob_len,
                                         const struct p11kms_context *ctx, size_t nctx,
                                         const uint8_t *canon, size_t canon_len,
                                         struct p11kms_data_key *out)
{
    p11kms_status st;

    memset(out, 0, sizeof *out);
    if ((st = check_blob(blob, blob_len)) != P11KMS_OK)
        return st;
    if (!c->cache)
        return kms_service_decrypt(c, blob, blob_len, ctx, nctx, out);
    /* Any miss or trouble in the cache just means asking the service. */
    st = kms_cache_get_decrypt(c->cache, blob, blob_len, canon, canon_len, 0, out);
    if (st != P11KMS_OK) {
        st = kms_service_decrypt(c, blob, blob_len, ctx, nctx, out);
        if (st == P11KMS_OK) {
            kms_cache_put_decrypt(c->cache, out, canon, canon_len);
        } else if ((st == P11KMS_ERR_TRANSPORT || st == P11KMS_ERR_CIRCUIT_OPEN) &&
                   c->opt.cache_grace_s > 0) {
            /* The service cannot be reached: a key a little past its age will do. */
            char why[400];
            snprintf(why, sizeof why, "%s", p11kms_last_error());
            if (kms_cache_get_decrypt(c->cache, blob, blob_len, canon, canon_len, 1, out) ==
                P11KMS_OK) {
                st = P11KMS_OK;
            } else {
                p11kms_data_key_clear(out);
                kms_client_fail(st, "%s", why);
            }
        }
    }
    return st;
}
