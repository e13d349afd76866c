/*
 * JWE to public keys (RFC 7516; RFC 7518 §4.3 RSA-OAEP-256, §4.6
 * ECDH-ES+A256KW; RFC 8037 §3.2 X25519), content always A256GCM.
 *
 * Sealing: a fresh 32-byte content key (CEK) and a 12-byte IV. Each
 * recipient gets the CEK wrapped: RSA-OAEP with SHA-256 and MGF1-SHA-256; or
 * an ephemeral key on the recipient's curve, Z = ECDH, a key-encryption key
 * from the Concat KDF (SHA-256, AlgorithmID "ECDH-ES+A256KW", empty apu and
 * apv, 256 bits) and RFC 3394 AES key wrap, the ephemeral public key going
 * in "epk". Compact: one recipient, everything in the protected header.
 * General JSON: the protected header is {"enc":"A256GCM"} and each
 * recipient's alg, kid and epk are in its unprotected "header".
 *
 * Opening reads compact, flattened and general JSON. alg "dir" is
 * p11kms_seal's own format and goes to p11kms_open. Otherwise every header is
 * checked before any key is used: alg RSA-OAEP-256 or ECDH-ES+A256KW, enc
 * A256GCM, no zip, no crit, the three header parts disjoint. Then the
 * recipients the opener can serve are tried in order, and the content is
 * decrypted only with a CEK one of them gave; nothing comes out unless its
 * tag verifies.
 */
#include "config.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/encoding.h"
#include "common/json_alloc.h"

#define ALG_RSA "RSA-OAEP-256"
#define ALG_ECDH "ECDH-ES+A256KW"
#define ALG_DIR "dir"
#define CEK_LEN 32
#define WRAPPED_LEN (CEK_LEN + 8)
#define RSA_EK_MAX 1024 /* an 8192-bit modulus */
#define Z_MAX 66        /* P-521 */
#define KID_MAX 2048    /* as a key id */
#define SHA256_LEN 32

static p11kms_status oom(void)
{
    return kms_client_fail(P11KMS_ERR_MEMORY, "JWE: out of memory");
}

static p11kms_status malformed(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static p11kms_status malformed(const char *fmt, ...)
{
    char msg[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return kms_client_fail(P11KMS_ERR_MALFORMED, "JWE: %s", msg);
}

/* ---- Concat KDF and AES key wrap ------------------------------------------------- */

static int digest_u32(EVP_MD_CTX *m, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    return EVP_DigestUpdate(m, b, sizeof b) == 1;
}

/* A length-prefixed datum of the OtherInfo (RFC 7518 §4.6.2). */
static int digest_datum(EVP_MD_CTX *m, const uint8_t *p, size_t n)
{
    return digest_u32(m, (uint32_t)n) && (n == 0 || EVP_DigestUpdate(m, p, n) == 1);
}

p11kms_status kms_concat_kdf(const uint8_t *z, size_t z_len, const char *alg, const uint8_t *apu,
                             size_t apu_len, const uint8_t *apv, size_t apv_len, uint8_t *out,
                             size_t out_len)
{
    uint8_t block[SHA256_LEN];
    EVP_MD_CTX *m;
    p11kms_status st = P11KMS_OK;
    size_t done = 0;

    if (!z || !alg || (!apu && apu_len) || (!apv && apv_len) || !out || out_len == 0 ||
        out_len > 1024 || apu_len > 1024 || apv_len > 1024)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "Concat KDF: a bad argument");
    if (!(m = EVP_MD_CTX_new()))
        return oom();
    for (uint32_t counter = 1; done < out_len; counter++) {
        size_t take = out_len - done < sizeof block ? out_len - done : sizeof block;
        if (EVP_DigestInit_ex(m, EVP_sha256(), NULL) != 1 || !digest_u32(m, counter) ||
            EVP_DigestUpdate(m, z, z_len) != 1 ||
            !digest_datum(m, (const uint8_t *)alg, strlen(alg)) || !digest_datum(m, apu, apu_len) ||
            !digest_datum(m, apv, apv_len) || !digest_u32(m, (uint32_t)(out_len * 8)) ||
            EVP_DigestFinal_ex(m, block, NULL) != 1) {
            st = kms_client_fail(P11KMS_ERR_MEMORY, "Concat KDF: SHA-256 failed");
            break;
        }
        memcpy(out + done, block, take);
        done += take;
    }
    if (st != P11KMS_OK)
        OPENSSL_cleanse(out, out_len);
    OPENSSL_cleanse(block, sizeof block);
    EVP_MD_CTX_free(m);
    return st;
}

static const EVP_CIPHER *kw_cipher(size_t kek_len)
{
    return kek_len == 16   ? EVP_aes_128_wrap()
           : kek_len == 24 ? EVP_aes_192_wrap()
           : kek_len == 32 ? EVP_aes_256_wrap()
                           : NULL;
}

/* RFC 3394 either way; out has n + 8 (wrap) or n - 8 (unwrap) bytes. */
static p11kms_status aes_kw(int wrap, const uint8_t *kek, size_t kek_len, const uint8_t *in,
                            size_t n, uint8_t *out)
{
    const EVP_CIPHER *cipher = kw_cipher(kek_len);
    EVP_CIPHER_CTX *c;
    p11kms_status st = P11KMS_OK;
    int len = 0, fin = 0;

    if (!cipher || !kek || !in || !out || n % 8 || n < (wrap ? 16u : 24u) || n > 4096)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "AES key wrap: a bad key or length");
    if (!(c = EVP_CIPHER_CTX_new()))
        return oom();
    EVP_CIPHER_CTX_set_flags(c, EVP_CIPHER_CTX_FLAG_WRAP_ALLOW);
    if (EVP_CipherInit_ex(c, cipher, NULL, kek, NULL, wrap) != 1)
        st = kms_client_fail(P11KMS_ERR_MEMORY, "AES key wrap failed");
    else if (EVP_CipherUpdate(c, out, &len, in, (int)n) != 1 ||
             EVP_CipherFinal_ex(c, out + len, &fin) != 1 ||
             (size_t)(len + fin) != (wrap ? n + 8 : n - 8))
        st = wrap ? kms_client_fail(P11KMS_ERR_MEMORY, "AES key wrap failed")
                  : kms_client_fail(P11KMS_ERR_DECRYPT,
                                    "JWE: the wrapped key does not unwrap (another key)");
    if (st != P11KMS_OK)
        OPENSSL_cleanse(out, wrap ? n + 8 : n - 8);
    EVP_CIPHER_CTX_free(c);
    return st;
}

p11kms_status kms_aes_kw_wrap(const uint8_t *kek, size_t kek_len, const uint8_t *in, size_t n,
                              uint8_t *out)
{
    return aes_kw(1, kek, kek_len, in, n, out);
}

p11kms_status kms_aes_kw_unwrap(const uint8_t *kek, size_t kek_len, const uint8_t *in, size_t n,
                                uint8_t *out)
{
    return aes_kw(0, kek, kek_len, in, n, out);
}

/* ---- the key agreement and the key transport -------------------------------------- */

/* Z, the shared secret of priv and peer (same curve). */
static p11kms_status ecdh(EVP_PKEY *priv, EVP_PKEY *peer, uint8_t z[Z_MAX], size_t *z_len)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, priv, NULL);
    p11kms_status st = P11KMS_OK;
    size_t len = 0;

    if (!ctx)
        return oom();
    if (EVP_PKEY_derive_init(ctx) != 1 || EVP_PKEY_derive_set_peer(ctx, peer) != 1 ||
        EVP_PKEY_derive(ctx, NULL, &len) != 1 || len == 0 || len > Z_MAX ||
        EVP_PKEY_derive(ctx, z, &len) != 1)
        st = kms_client_fail(P11KMS_ERR_DECRYPT, "JWE: ECDH with the epk failed");
    else
        *z_len = len;
    EVP_PKEY_CTX_free(ctx);
    return st;
}

/* The A256KW key-encryption key from Z; z is wiped. */
static p11kms_status kek_of(uint8_t *z, size_t z_len, uint8_t kek[32])
{
    p11kms_status st = kms_concat_kdf(z, z_len, ALG_ECDH, NULL, 0, NULL, 0, kek, 32);
    OPENSSL_cleanse(z, Z_MAX);
    return st;
}

/* The CEK wrapped for an EC or X25519 recipient; *epk the ephemeral public JWK. */
static p11kms_status wrap_ecdh(EVP_PKEY *pub, const uint8_t cek[CEK_LEN], uint8_t ek[WRAPPED_LEN],
                               json_t **epk)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pub, NULL);
    EVP_PKEY *eph = NULL;
    uint8_t z[Z_MAX], kek[32];
    size_t z_len = 0;
    p11kms_status st;

    if (!ctx)
        return oom();
    /* A key generated from pub's context is on pub's curve. */
    if (EVP_PKEY_keygen_init(ctx) != 1 || EVP_PKEY_keygen(ctx, &eph) != 1)
        st = kms_client_fail(P11KMS_ERR_MEMORY, "JWE: no ephemeral key");
    else if ((st = ecdh(eph, pub, z, &z_len)) == P11KMS_OK &&
             (st = kek_of(z, z_len, kek)) == P11KMS_OK &&
             (st = kms_aes_kw_wrap(kek, sizeof kek, cek, CEK_LEN, ek)) == P11KMS_OK)
        st = kms_jwk_from_public(eph, epk);
    OPENSSL_cleanse(z, sizeof z);
    OPENSSL_cleanse(kek, sizeof kek);
    EVP_PKEY_free(eph);
    EVP_PKEY_CTX_free(ctx);
    return st;
}

static int oaep_sha256(EVP_PKEY_CTX *ctx)
{
    return EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_PKCS1_OAEP_PADDING) == 1 &&
           EVP_PKEY_CTX_set_rsa_oaep_md(ctx, EVP_sha256()) == 1 &&
           EVP_PKEY_CTX_set_rsa_mgf1_md(ctx, EVP_sha256()) == 1;
}

/* The CEK under an RSA recipient's key, RSA-OAEP-256; *ek malloc'd. */
static p11kms_status wrap_rsa(EVP_PKEY *pub, const uint8_t cek[CEK_LEN], uint8_t **ek,
                              size_t *ek_len)
{
    EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, pub, NULL);
    p11kms_status st = P11KMS_OK;
    size_t len = 0;

    *ek = NULL;
    if (!ctx)
        return oom();
    if (EVP_PKEY_encrypt_init(ctx) != 1 || !oaep_sha256(ctx) ||
        EVP_PKEY_encrypt(ctx, NULL, &len, cek, CEK_LEN) != 1 || len == 0)
        st = kms_client_fail(P11KMS_ERR_MEMORY, "JWE: RSA-OAEP-256 failed");
    else if (!(*ek = malloc(len)))
        st = oom();
    else if (EVP_PKEY_encrypt(ctx, *ek, &len, cek, CEK_LEN) != 1) {
        free(*ek);
        *ek = NULL;
        st = kms_client_fail(P11KMS_ERR_MEMORY, "JWE: RSA-OAEP-256 failed");
    } else
        *ek_len = len;
    EVP_PKEY_CTX_free(ctx);
    return st;
}

/* ---- sealing ---------------------------------------------------------------------- */

/*
 * Recipient r's header members into h -- alg, then enc when with_enc (the
 * compact form's single header), kid, epk -- and its encrypted key,
 * base64url'd, into ek_b64.
 */
static p11kms_status recipient_seal(const p11kms_recipient *r, const uint8_t cek[CEK_LEN],
                                    int with_enc, json_t *h, struct kms_buf *ek_b64)
{
    uint8_t wrapped[WRAPPED_LEN], *ek = NULL;
    size_t ek_len = 0;
    json_t *epk = NULL;
    p11kms_status st;
    int rsa = r->kind == KMS_RECIPIENT_RSA;

    if (r->kind != KMS_RECIPIENT_RSA && r->kind != KMS_RECIPIENT_EC &&
        r->kind != KMS_RECIPIENT_X25519)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE: a recipient without a public key");
    if (rsa)
        st = wrap_rsa(r->pkey, cek, &ek, &ek_len);
    else if ((st = wrap_ecdh(r->pkey, cek, wrapped, &epk)) == P11KMS_OK) {
        ek = wrapped;
        ek_len = sizeof wrapped;
    }
    if (st != P11KMS_OK)
        goto cleanup;
    if (json_object_set_new(h, "alg", json_string(rsa ? ALG_RSA : ALG_ECDH)) != 0 ||
        (with_enc && json_object_set_new(h, "enc", json_string("A256GCM")) != 0)) {
        st = oom();
        goto cleanup;
    }
    if (r->kid) {
        json_t *kid = json_string(r->kid);
        if (!kid || json_object_set_new(h, "kid", kid) != 0) {
            st = kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE: the kid is not valid UTF-8");
            goto cleanup;
        }
    }
    if ((epk && json_object_set(h, "epk", epk) != 0) ||
        kms_b64url_encode(ek, ek_len, ek_b64) != KMS_OK)
        st = oom();
cleanup:
    OPENSSL_cleanse(wrapped, sizeof wrapped);
    if (rsa)
        free(ek);
    json_decref(epk);
    return st;
}

static int append(struct kms_buf *b, const char *s)
{
    return kms_buf_append_str(b, s) == KMS_OK;
}

static int append_b64(struct kms_buf *b, const uint8_t *p, size_t n)
{
    return kms_b64url_encode(p, n, b) == KMS_OK;
}

/* The protected header's text, base64url'd: the AAD. */
static p11kms_status protect(const json_t *h, struct kms_buf *aad)
{
    struct kms_buf text = KMS_BUF_INIT;
    p11kms_status st = P11KMS_OK;

    if (kms_json_dump(h, 0, &text) != KMS_OK ||
        kms_b64url_encode(text.data, text.len, aad) != KMS_OK || kms_buf_terminate(aad) != KMS_OK)
        st = oom();
    kms_buf_free(&text);
    return st;
}

p11kms_status kms_jwe_pk_seal(int json, p11kms_recipient *const *r, size_t nr, const uint8_t *pt,
                              size_t n, uint8_t **out, size_t *out_len)
{
    uint8_t cek[CEK_LEN], iv[KMS_JWE_IV_LEN], tag[KMS_JWE_TAG_LEN], *ct = NULL;
    struct kms_buf aad = KMS_BUF_INIT, ek = KMS_BUF_INIT, list = KMS_BUF_INIT, tok = KMS_BUF_INIT;
    json_t *prot = json_object(), *recipients = json_array();
    p11kms_status st;
    int ok;

    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!r || !out || !out_len || (!pt && n) || nr == 0 || nr > KMS_ENVELOPE_MAX_RECIPIENTS ||
        (!json && nr != 1) || n > KMS_ENVELOPE_MAX_PAYLOAD) {
        st = kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE seal: a bad argument");
        goto cleanup;
    }
    if (!prot || !recipients || !(ct = malloc(n ? n : 1))) {
        st = oom();
        goto cleanup;
    }
    if (RAND_bytes(cek, sizeof cek) != 1 || RAND_bytes(iv, sizeof iv) != 1) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "JWE seal: the random generator failed");
        goto cleanup;
    }
    if (!json) {
        if ((st = recipient_seal(r[0], cek, 1, prot, &ek)) != P11KMS_OK)
            goto cleanup;
    } else {
        if (json_object_set_new(prot, "enc", json_string("A256GCM")) != 0) {
            st = oom();
            goto cleanup;
        }
        for (size_t i = 0; i < nr; i++) {
            json_t *h = json_object(), *one = json_object();
            if (!h || !one || json_array_append_new(recipients, one) != 0 ||
                json_object_set_new(one, "header", h) != 0) {
                json_decref(h);
                st = oom();
                goto cleanup;
            }
            kms_buf_free(&ek);
            if ((st = recipient_seal(r[i], cek, 0, h, &ek)) != P11KMS_OK)
                goto cleanup;
            if (json_object_set_new(one, "encrypted_key",
                                    json_stringn((const char *)ek.data, ek.len)) != 0) {
                st = oom();
                goto cleanup;
            }
        }
        if (kms_json_dump(recipients, 0, &list) != KMS_OK || kms_buf_terminate(&list) != KMS_OK) {
            st = oom();
            goto cleanup;
        }
    }
    if ((st = protect(prot, &aad)) != P11KMS_OK)
        goto cleanup;
    if (aad.len > kms_jwe_b64url_len(KMS_JWE_MAX_HEADER)) {
        st = kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE seal: the protected header is too long");
        goto cleanup;
    }
    if ((st = kms_jwe_gcm_seal(cek, iv, (const char *)aad.data, aad.len, pt, n, ct, tag)) !=
        P11KMS_OK)
        goto cleanup;
    if (json)
        ok = append(&tok, "{\"protected\":\"") && append(&tok, (const char *)aad.data) &&
             append(&tok, "\",\"recipients\":") && append(&tok, (const char *)list.data) &&
             append(&tok, ",\"iv\":\"") && append_b64(&tok, iv, sizeof iv) &&
             append(&tok, "\",\"ciphertext\":\"") && append_b64(&tok, ct, n) &&
             append(&tok, "\",\"tag\":\"") && append_b64(&tok, tag, sizeof tag) &&
             append(&tok, "\"}");
    else
        ok = append(&tok, (const char *)aad.data) && append(&tok, ".") &&
             kms_buf_append(&tok, ek.data, ek.len) == KMS_OK && append(&tok, ".") &&
             append_b64(&tok, iv, sizeof iv) && append(&tok, ".") && append_b64(&tok, ct, n) &&
             append(&tok, ".") && append_b64(&tok, tag, sizeof tag);
    if (!ok || kms_buf_terminate(&tok) != KMS_OK) {
        st = oom();
        goto cleanup;
    }
    *out = tok.data;
    *out_len = tok.len;
    tok.data = NULL;
cleanup:
    OPENSSL_cleanse(cek, sizeof cek);
    kms_free_secret(ct, n ? n : 1);
    json_decref(prot);
    json_decref(recipients);
    kms_buf_free(&aad);
    kms_buf_free(&ek);
    kms_buf_free(&list);
    kms_buf_free(&tok);
    return st;
}

/* ---- parsing ---------------------------------------------------------------------- */

struct rcpt {
    const json_t *header; /* the per-recipient unprotected header, or NULL */
    const char *alg;      /* in one of the headers */
    const char *kid;      /* NULL: none */
    const json_t *epk;    /* ECDH-ES only */
    uint8_t *ek;
    size_t ek_len;
};

struct pk_jwe {
    json_t *outer;        /* the JSON serialization; NULL for compact */
    json_t *prot;         /* the protected header, an object */
    const json_t *shared; /* the JSON form's "unprotected", or NULL */
    char *aad;            /* ASCII(BASE64URL(protected)) ["." aad], NUL-terminated */
    size_t aad_len;
    const char *iv_b64, *ct_b64, *tag_b64;
    size_t iv_len, ct_len, tag_len;
    struct rcpt r[KMS_ENVELOPE_MAX_RECIPIENTS];
    size_t nr;
};

static void pk_jwe_clear(struct pk_jwe *j)
{
    for (size_t i = 0; i < j->nr; i++)
        free(j->r[i].ek);
    json_decref(j->outer);
    json_decref(j->prot);
    free(j->aad);
}

/* A header parameter from whichever of the three headers has it. */
static const json_t *param(const struct pk_jwe *j, const struct rcpt *r, const char *name)
{
    const json_t *v = json_object_get(j->prot, name);
    if (!v && j->shared)
        v = json_object_get(j->shared, name);
    if (!v && r->header)
        v = json_object_get(r->header, name);
    return v;
}

/* RFC 7516 §7.2.1: no parameter in more than one of the headers. */
static p11kms_status disjoint(const json_t *a, const json_t *b)
{
    const char *k;
    json_t *v;
    if (!a || !b)
        return P11KMS_OK;
    json_object_foreach((json_t *)a, k, v)
    {
        if (json_object_get(b, k))
            return malformed("\"%s\" is in more than one header", k);
    }
    return P11KMS_OK;
}

/* Recipient r's headers checked, its alg, kid, epk and encrypted key taken. */
static p11kms_status check_recipient(struct pk_jwe *j, struct rcpt *r, const char *ek,
                                     size_t ek_len)
{
    const json_t *alg = param(j, r, "alg"), *enc = param(j, r, "enc"), *kid = param(j, r, "kid");
    p11kms_status st;
    size_t max;

    if (r->header && !json_is_object(r->header))
        return malformed("a recipient's header is not an object");
    if ((st = disjoint(j->prot, j->shared)) != P11KMS_OK ||
        (st = disjoint(j->prot, r->header)) != P11KMS_OK ||
        (st = disjoint(j->shared, r->header)) != P11KMS_OK)
        return st;
    if (!json_is_string(alg))
        return malformed("alg is missing or not a string");
    r->alg = json_string_value(alg);
    if (strcmp(r->alg, ALG_RSA) != 0 && strcmp(r->alg, ALG_ECDH) != 0 &&
        strcmp(r->alg, ALG_DIR) != 0)
        return malformed("alg \"%.64s\" is not accepted (RSA-OAEP-256, ECDH-ES+A256KW, dir)",
                         r->alg);
    if (!json_is_string(enc) || strcmp(json_string_value(enc), "A256GCM") != 0)
        return malformed("enc is not \"A256GCM\"");
    if (param(j, r, "zip"))
        return malformed("compressed payloads (zip) are not accepted");
    if (param(j, r, "crit"))
        return malformed("no critical header extension (crit) is understood");
    if (kid) {
        if (!json_is_string(kid) || !json_string_length(kid) || json_string_length(kid) > KID_MAX)
            return malformed("kid is not a string of 1 to %d bytes", KID_MAX);
        r->kid = json_string_value(kid);
    }
    if (strcmp(r->alg, ALG_ECDH) == 0) {
        r->epk = param(j, r, "epk");
        if (!json_is_object(r->epk))
            return malformed("epk is missing or not an object");
    }
    max = strcmp(r->alg, ALG_DIR) == 0   ? 0
          : strcmp(r->alg, ALG_RSA) == 0 ? RSA_EK_MAX
                                         : WRAPPED_LEN;
    if (strcmp(r->alg, ALG_DIR) == 0) {
        if (ek_len)
            return malformed("the encrypted key is not empty, as \"dir\" requires");
        return P11KMS_OK;
    }
    if ((st = kms_jwe_decode_seg_alloc(ek, ek_len, max, &r->ek, &r->ek_len, "encrypted key")) !=
        P11KMS_OK)
        return st;
    if (strcmp(r->alg, ALG_ECDH) == 0 ? r->ek_len != WRAPPED_LEN : r->ek_len < 256)
        return malformed("the encrypted key has the wrong size for %s", r->alg);
    return P11KMS_OK;
}

/* The protected header segment (n characters, maybe none) decoded and parsed. */
static p11kms_status parse_protected(struct pk_jwe *j, const char *p, size_t n)
{
    uint8_t *text = NULL;
    size_t len = 0;
    json_error_t err;
    p11kms_status st;

    if (n == 0) {
        j->prot = json_object();
        return j->prot ? P11KMS_OK : oom();
    }
    if ((st = kms_jwe_decode_seg_alloc(p, n, KMS_JWE_MAX_HEADER, &text, &len,
                                       "protected header")) != P11KMS_OK)
        return st;
    j->prot = json_loadb((const char *)text, len, JSON_REJECT_DUPLICATES, &err);
    free(text);
    if (!json_is_object(j->prot))
        return malformed("the protected header is not a JSON object without duplicate members");
    return P11KMS_OK;
}

/* j->aad: the protected segment, and "." and the JSON form's aad when there is one. */
static p11kms_status set_aad(struct pk_jwe *j, const char *p, size_t n, const char *extra,
                             size_t extra_len)
{
    size_t len = n + (extra ? 1 + extra_len : 0);
    if (!(j->aad = malloc(len + 1)))
        return oom();
    memcpy(j->aad, p, n);
    if (extra) {
        j->aad[n] = '.';
        memcpy(j->aad + n + 1, extra, extra_len);
    }
    j->aad[len] = '\0';
    j->aad_len = len;
    return P11KMS_OK;
}

static p11kms_status parse_compact(struct pk_jwe *j, const char *t, size_t len)
{
    const char *seg[5], *p = t, *end = t + len;
    size_t seg_len[5], k = 0;
    p11kms_status st;

    for (;;) {
        const char *dot = memchr(p, '.', (size_t)(end - p));
        if (k == 5)
            return malformed("the compact serialization has more than five segments");
        seg[k] = p;
        seg_len[k++] = (size_t)((dot ? dot : end) - p);
        if (!dot)
            break;
        p = dot + 1;
    }
    if (k != 5)
        return malformed("the compact serialization does not have five segments");
    if (!seg_len[0])
        return malformed("the protected header is empty");
    if ((st = parse_protected(j, seg[0], seg_len[0])) != P11KMS_OK ||
        (st = set_aad(j, seg[0], seg_len[0], NULL, 0)) != P11KMS_OK)
        return st;
    j->nr = 1;
    j->iv_b64 = seg[2], j->iv_len = seg_len[2];
    j->ct_b64 = seg[3], j->ct_len = seg_len[3];
    j->tag_b64 = seg[4], j->tag_len = seg_len[4];
    return check_recipient(j, &j->r[0], seg[1], seg_len[1]);
}

static p11kms_status parse_json(struct pk_jwe *j, const char *t, size_t len)
{
    json_error_t err;
    const char *prot = "", *aad = NULL, *ek = "";
    size_t prot_len = 0, aad_len = 0, ek_len = 0;
    json_t *shared = NULL, *header = NULL, *list = NULL;
    p11kms_status st;

    j->outer = json_loadb(t, len, JSON_REJECT_DUPLICATES, &err);
    if (!j->outer ||
        json_unpack_ex(j->outer, &err, JSON_STRICT,
                       "{s?s%, s?o, s?o, s?s%, s?o, s?s%, s:s%, s:s%, s:s%}", "protected", &prot,
                       &prot_len, "unprotected", &shared, "header", &header, "encrypted_key", &ek,
                       &ek_len, "recipients", &list, "aad", &aad, &aad_len, "iv", &j->iv_b64,
                       &j->iv_len, "ciphertext", &j->ct_b64, &j->ct_len, "tag", &j->tag_b64,
                       &j->tag_len) != 0)
        return malformed("not a JWE in the JSON serialization (%.80s)", err.text);
    if (shared && !json_is_object(shared))
        return malformed("unprotected is not an object");
    j->shared = shared;
    if (aad) {
        uint8_t *tmp = NULL;
        size_t tmp_len;
        if ((st = kms_jwe_decode_seg_alloc(aad, aad_len, KMS_JWE_MAX_HEADER, &tmp, &tmp_len,
                                           "aad")) != P11KMS_OK)
            return st;
        free(tmp);
    }
    if ((st = parse_protected(j, prot, prot_len)) != P11KMS_OK ||
        (st = set_aad(j, prot, prot_len, aad, aad_len)) != P11KMS_OK)
        return st;
    if (!list) { /* flattened */
        j->nr = 1;
        j->r[0].header = header;
        return check_recipient(j, &j->r[0], ek, ek_len);
    }
    if (header || ek_len)
        return malformed("header and encrypted_key belong in recipients in the general form");
    if (!json_is_array(list) || json_array_size(list) == 0 ||
        json_array_size(list) > KMS_ENVELOPE_MAX_RECIPIENTS)
        return malformed("recipients is not an array of 1 to %d", KMS_ENVELOPE_MAX_RECIPIENTS);
    for (size_t i = 0; i < json_array_size(list); i++) {
        struct rcpt *r = &j->r[i];
        const char *rek = "";
        size_t rek_len = 0;
        json_t *rh = NULL;
        if (json_unpack_ex(json_array_get(list, i), &err, JSON_STRICT, "{s?o, s?s%}", "header", &rh,
                           "encrypted_key", &rek, &rek_len) != 0)
            return malformed("recipient %zu is not {header, encrypted_key}", i);
        r->header = rh;
        j->nr = i + 1;
        if ((st = check_recipient(j, r, rek, rek_len)) != P11KMS_OK)
            return st;
    }
    return P11KMS_OK;
}

static p11kms_status pk_jwe_parse(struct pk_jwe *j, const char *t, size_t len)
{
    size_t i = 0;
    size_t max = kms_jwe_b64url_len(KMS_JWE_MAX_HEADER) +
                 kms_jwe_b64url_len(KMS_ENVELOPE_MAX_PAYLOAD) +
                 KMS_ENVELOPE_MAX_RECIPIENTS * (kms_jwe_b64url_len(RSA_EK_MAX) + 4096) + 4096;

    memset(j, 0, sizeof *j);
    if (!len)
        return malformed("empty");
    if (len > max)
        return malformed("too long");
    while (i < len && (t[i] == ' ' || t[i] == '\t' || t[i] == '\n' || t[i] == '\r'))
        i++;
    return i < len && t[i] == '{' ? parse_json(j, t, len) : parse_compact(j, t, len);
}

/* ---- opening ---------------------------------------------------------------------- */

/* "P-256", "X25519", "RSA"... into name. */
static void curve_name(EVP_PKEY *k, char name[32])
{
    char group[32] = "";
    size_t glen = 0;

    snprintf(name, 32, "%s", EVP_PKEY_get0_type_name(k) ? EVP_PKEY_get0_type_name(k) : "?");
    if (EVP_PKEY_is_a(k, "EC") &&
        EVP_PKEY_get_utf8_string_param(k, "group", group, sizeof group, &glen) == 1)
        snprintf(name, 32, "%s",
                 strcmp(group, "prime256v1") == 0  ? "P-256"
                 : strcmp(group, "secp384r1") == 0 ? "P-384"
                 : strcmp(group, "secp521r1") == 0 ? "P-521"
                                                   : group);
}

/* The epk as an EVP_PKEY; a bad one is MALFORMED. */
static p11kms_status epk_key(const json_t *epk, EVP_PKEY **out)
{
    struct kms_buf text = KMS_BUF_INIT;
    p11kms_status st;
    char why[200];

    if (kms_json_dump(epk, 0, &text) != KMS_OK)
        return oom();
    st = kms_jwk_to_pkey(text.data, text.len, 0, out, NULL);
    kms_buf_free(&text);
    if (st == P11KMS_ERR_ARGUMENT) {
        snprintf(why, sizeof why, "%s", p11kms_last_error());
        st = malformed("the epk: %s", why);
    }
    return st;
}

/* The CEK from Z: KEK, then the unwrap; z is wiped. */
static p11kms_status unwrap_with_z(uint8_t *z, size_t z_len, const struct rcpt *r,
                                   uint8_t cek[CEK_LEN])
{
    uint8_t kek[32];
    p11kms_status st = kek_of(z, z_len, kek);
    if (st == P11KMS_OK)
        st = kms_aes_kw_unwrap(kek, sizeof kek, r->ek, r->ek_len, cek);
    OPENSSL_cleanse(kek, sizeof kek);
    return st;
}

static p11kms_status open_local(EVP_PKEY *priv, const struct rcpt *r, uint8_t cek[CEK_LEN])
{
    p11kms_status st;

    if (strcmp(r->alg, ALG_RSA) == 0) {
        EVP_PKEY_CTX *ctx = EVP_PKEY_CTX_new_from_pkey(NULL, priv, NULL);
        size_t cap = (size_t)EVP_PKEY_get_size(priv), len = cap;
        uint8_t *buf = OPENSSL_secure_malloc(cap ? cap : 1);
        if (!ctx || !buf)
            st = oom();
        else if (EVP_PKEY_decrypt_init(ctx) != 1 || !oaep_sha256(ctx) ||
                 EVP_PKEY_decrypt(ctx, buf, &len, r->ek, r->ek_len) != 1 || len != CEK_LEN)
            st = kms_client_fail(P11KMS_ERR_DECRYPT,
                                 "JWE: RSA-OAEP-256 does not decrypt the key (another key)");
        else {
            memcpy(cek, buf, CEK_LEN);
            st = P11KMS_OK;
        }
        OPENSSL_secure_clear_free(buf, cap ? cap : 1);
        EVP_PKEY_CTX_free(ctx);
        return st;
    }

    EVP_PKEY *epk = NULL;
    uint8_t z[Z_MAX];
    size_t z_len = 0;
    char kc[32], ec[32];
    if ((st = epk_key(r->epk, &epk)) != P11KMS_OK)
        return st;
    curve_name(priv, kc);
    curve_name(epk, ec);
    if (strcmp(kc, ec) != 0)
        st = malformed("epk is on %s, the key on %s", ec, kc);
    else if ((st = ecdh(priv, epk, z, &z_len)) == P11KMS_OK)
        st = unwrap_with_z(z, z_len, r, cek);
    OPENSSL_cleanse(z, sizeof z);
    EVP_PKEY_free(epk);
    return st;
}

static p11kms_status open_service(p11kms_client *c, const char *key, const struct rcpt *r,
                                  uint8_t cek[CEK_LEN])
{
    uint8_t *secret = NULL, *der = NULL;
    size_t secret_len = 0;
    EVP_PKEY *epk = NULL;
    p11kms_status st;
    int der_len;

    if (strcmp(r->alg, ALG_RSA) == 0) {
        st = p11kms_rsa_decrypt(c, key, "RSAES_OAEP_SHA_256", r->ek, r->ek_len, &secret,
                                &secret_len);
        if (st == P11KMS_ERR_INVALID_CIPHERTEXT)
            st = kms_client_fail(P11KMS_ERR_DECRYPT,
                                 "JWE: %s does not decrypt the key (another key)", key);
        else if (st == P11KMS_OK && secret_len != CEK_LEN)
            st = kms_client_fail(P11KMS_ERR_DECRYPT, "JWE: the key is not 32 bytes");
        else if (st == P11KMS_OK)
            memcpy(cek, secret, CEK_LEN);
        p11kms_free(secret, secret_len);
        return st;
    }
    if ((st = epk_key(r->epk, &epk)) != P11KMS_OK)
        return st;
    if ((der_len = i2d_PUBKEY(epk, &der)) <= 0)
        st = oom();
    else if ((st = p11kms_derive_shared_secret(c, key, der, (size_t)der_len, &secret,
                                               &secret_len)) == P11KMS_OK) {
        uint8_t z[Z_MAX];
        if (secret_len == 0 || secret_len > Z_MAX)
            st = kms_client_fail(P11KMS_ERR_PROTOCOL, "DeriveSharedSecret: a %zu-byte secret",
                                 secret_len);
        else {
            memcpy(z, secret, secret_len);
            st = unwrap_with_z(z, secret_len, r, cek);
        }
        OPENSSL_cleanse(z, sizeof z);
    }
    p11kms_free(secret, secret_len);
    OPENSSL_free(der);
    EVP_PKEY_free(epk);
    return st;
}

/* The key-id part of an id or ARN ("arn:...:key/ID" -> "ID"). */
static const char *id_part(const char *s)
{
    const char *k = strstr(s, ":key/");
    return strncmp(s, "arn:", 4) == 0 && k ? k + 5 : s;
}

static int is_alias(const char *s)
{
    return strncmp(s, "alias/", 6) == 0 || (strncmp(s, "arn:", 4) == 0 && strstr(s, ":alias/"));
}

/* A kid the service could take as a key id: an ARN, an alias or a key id (UUID). */
static int looks_like_key_id(const char *kid)
{
    uint8_t id[KMS_UUID_LEN];
    return (strncmp(kid, "arn:", 4) == 0 && (strstr(kid, ":key/") || strstr(kid, ":alias/"))) ||
           strncmp(kid, "alias/", 6) == 0 ||
           (strlen(kid) == KMS_UUID_TEXT_LEN &&
            kms_uuid_parse(kid, KMS_UUID_TEXT_LEN, id) == KMS_OK);
}

/* The KMS key to open r with through the service; NULL: r is not the opener's. */
static const char *service_key(const struct p11kms_opener *o, const struct rcpt *r)
{
    /* KMS key agreement is on NIST curves: an X25519 epk is for a key outside it. */
    const char *kty = json_string_value(json_object_get(r->epk, "kty"));
    if (kty && strcmp(kty, "EC") != 0)
        return NULL;
    if (!o->key_id)
        return r->kid && looks_like_key_id(r->kid) ? r->kid : NULL;
    /* An alias cannot be compared with a kid here: the service decides. */
    if (!r->kid || is_alias(o->key_id) || strcmp(id_part(r->kid), id_part(o->key_id)) == 0)
        return o->key_id;
    return NULL;
}

/* Whether a local key of this type can open a recipient of alg. */
static int local_serves(EVP_PKEY *priv, const struct rcpt *r)
{
    return EVP_PKEY_is_a(priv, "RSA") ? strcmp(r->alg, ALG_RSA) == 0
                                      : strcmp(r->alg, ALG_ECDH) == 0;
}

/* A failure no other recipient would change: returned at once. */
static int fatal(p11kms_status st)
{
    return st == P11KMS_ERR_MEMORY || st == P11KMS_ERR_MEMORY_LOCK || st == P11KMS_ERR_TRANSPORT ||
           st == P11KMS_ERR_CIRCUIT_OPEN;
}

/*
 * The CEK from the first recipient the opener can serve and that unwraps:
 * for each recipient in order, the local key when it is of the recipient's
 * type, then the service when the opener has a client and a key for it.
 */
static p11kms_status find_cek(const struct p11kms_opener *o, EVP_PKEY *priv, const struct pk_jwe *j,
                              uint8_t cek[CEK_LEN])
{
    p11kms_status st = P11KMS_ERR_DECRYPT;
    size_t tried = 0;
    char why[256] = "";

    for (size_t i = 0; i < j->nr; i++) {
        const struct rcpt *r = &j->r[i];
        const char *key = o->client ? service_key(o, r) : NULL;
        for (int local = 1; local >= 0; local--) {
            if (local ? !priv || !local_serves(priv, r) : !key)
                continue;
            tried++;
            st = local ? open_local(priv, r, cek) : open_service(o->client, key, r, cek);
            if (st == P11KMS_OK || fatal(st))
                return st;
            snprintf(why, sizeof why, "%s", p11kms_last_error());
        }
    }
    if (tried == 0)
        return kms_client_fail(
            P11KMS_ERR_DECRYPT, "JWE: no recipient is one the opener can serve (%s%s)",
            priv ? "none for a key of this type" : "",
            !o->client  ? ""
            : o->key_id ? (priv ? "; none names the KMS key" : "none names the KMS key")
                        : (priv ? "; no kid names a KMS key" : "no kid names a KMS key"));
    if (tried == 1) /* its own status (a service error, a wrong curve), its message */
        return kms_client_fail(st, "%s", why);
    return kms_client_fail(P11KMS_ERR_DECRYPT, "JWE: none of %zu attempts opens; the last: %s",
                           tried, why);
}

p11kms_status kms_jwe_pk_open(const struct p11kms_opener *o, const uint8_t *in, size_t n,
                              uint8_t **out, size_t *out_len)
{
    struct pk_jwe *j = NULL;
    EVP_PKEY *priv = NULL;
    uint8_t cek[CEK_LEN], iv[KMS_JWE_IV_LEN], tag[KMS_JWE_TAG_LEN], *ct = NULL, *pt = NULL;
    size_t ct_len = 0, len;
    p11kms_status st;

    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!o || !in || !out || !out_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE open: NULL argument");
    if (!(j = malloc(sizeof *j)))
        return oom();
    if ((st = pk_jwe_parse(j, (const char *)in, n)) != P11KMS_OK)
        goto cleanup;
    for (size_t i = 0; i < j->nr; i++)
        if (strcmp(j->r[i].alg, ALG_DIR) == 0 && (j->nr != 1 || !json_object_get(j->prot, "alg"))) {
            st = malformed("alg \"dir\" only in the protected header of a single recipient");
            goto cleanup;
        }
    if (strcmp(j->r[0].alg, ALG_DIR) == 0) { /* p11kms_seal's */
        if (!o->client)
            st = kms_client_fail(P11KMS_ERR_DECRYPT,
                                 "JWE: a \"dir\" JWE opens through the service: the opener has "
                                 "no client");
        else
            st =
                p11kms_open(o->client, (const char *)in, n, o->context, o->n_context, out, out_len);
        goto cleanup;
    }
    if ((st = kms_jwe_decode_seg(j->iv_b64, j->iv_len, KMS_JWE_IV_LEN, 0, iv, &len, "IV")) !=
            P11KMS_OK ||
        (st = kms_jwe_decode_seg(j->tag_b64, j->tag_len, KMS_JWE_TAG_LEN, 0, tag, &len, "tag")) !=
            P11KMS_OK ||
        (st = kms_jwe_decode_seg_alloc(j->ct_b64, j->ct_len, KMS_ENVELOPE_MAX_PAYLOAD, &ct, &ct_len,
                                       "ciphertext")) != P11KMS_OK)
        goto cleanup;
    if (o->private_key &&
        (st = kms_private_key_parse(o->private_key, o->private_key_len, &priv)) != P11KMS_OK)
        goto cleanup;
    if (!priv && !o->client) {
        st = kms_client_fail(P11KMS_ERR_ARGUMENT, "JWE open: neither a client nor a private key");
        goto cleanup;
    }
    if ((st = find_cek(o, priv, j, cek)) != P11KMS_OK)
        goto cleanup;
    if (!(pt = kms_client_secret_alloc(o->client, ct_len ? ct_len : 1))) {
        st = oom();
        goto cleanup;
    }
    if ((st = kms_jwe_gcm_open(cek, iv, j->aad, j->aad_len, tag, ct, ct_len, pt)) != P11KMS_OK)
        goto cleanup;
    *out = pt;
    *out_len = ct_len;
    pt = NULL;
cleanup:
    OPENSSL_cleanse(cek, sizeof cek);
    p11kms_free(pt, ct_len ? ct_len : 1); /* a tag that failed: nothing goes out */
    free(ct);
    EVP_PKEY_free(priv);
    if (j) {
        pk_jwe_clear(j);
        free(j);
    }
    return st;
}
