/*
 * Streaming envelopes (docs/format.md): chunked AEAD for payloads of any
 * size in constant memory.
 *
 *   header  = "P11S" | version 1 | chunk_size u32 | nonce_prefix[7]
 *             | SHA-256(canonical context) | u16 ARN length | ARN
 *             | u16 blob length | blob
 *   chunk i = AES-256-GCM(data key, nonce_prefix | i u32 | final u8,
 *                         aad = SHA-256(header), plaintext) | tag[16]
 *
 * Every chunk but the last holds exactly chunk_size plaintext bytes; the last
 * (flagged final in its nonce) holds fewer, possibly none. So a reader knows
 * from the length alone which chunk claims to be final, and needs no
 * lookahead; the flag in the nonce makes the claim authenticated: a stream cut
 * at a chunk boundary ends on a chunk that verifies only as non-final
 * (P11KMS_ERR_TRUNCATED), and a stream cut inside a chunk ends on one whose
 * tag cannot verify (P11KMS_ERR_DECRYPT). The counter in the nonce catches
 * reordering and repetition, the header digest in every chunk's AAD a changed
 * header.
 *
 * A chunk's plaintext is written only after its tag verifies; the buffer
 * that held it is cleansed. Memory is one buffer of chunk_size + 16 bytes
 * plus the header, whatever the size of the stream.
 */
#include "config.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "common/buf.h"
#include "common/digest.h"

static const uint8_t MAGIC[4] = {'P', '1', '1', 'S'};

/* Reads until n bytes or the end of the input; *got < n only at the end. */
static p11kms_status read_full(p11kms_read_fn in, void *arg, uint8_t *buf, size_t n, size_t *got)
{
    *got = 0;
    while (*got < n) {
        size_t k = 0;
        p11kms_status st = in(arg, buf + *got, n - *got, &k);
        if (st != P11KMS_OK)
            return st;
        if (k > n - *got)
            return kms_client_fail(P11KMS_ERR_ARGUMENT, "stream: the read callback overran");
        if (k == 0)
            break;
        *got += k;
    }
    return P11KMS_OK;
}

static void put_u32be(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 24);
    p[1] = (uint8_t)(v >> 16);
    p[2] = (uint8_t)(v >> 8);
    p[3] = (uint8_t)v;
}

static uint32_t get_u32be(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void make_nonce(uint8_t nonce[KMS_STREAM_NONCE_LEN],
                       const uint8_t prefix[KMS_STREAM_PREFIX_LEN], uint32_t counter, int final)
{
    memcpy(nonce, prefix, KMS_STREAM_PREFIX_LEN);
    put_u32be(nonce + KMS_STREAM_PREFIX_LEN, counter);
    nonce[KMS_STREAM_NONCE_LEN - 1] = final ? 1 : 0;
}

static p11kms_status chunk_size_of(const struct p11kms_stream_options *o, size_t *cs)
{
    *cs = o && o->chunk_size ? o->chunk_size : KMS_STREAM_DEFAULT_CHUNK;
    if (*cs > KMS_STREAM_MAX_CHUNK)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "stream: chunk_size over %u bytes",
                               (unsigned)KMS_STREAM_MAX_CHUNK);
    return P11KMS_OK;
}

p11kms_status kms_stream_context_digest(const struct p11kms_context *ctx, size_t nctx,
                                        uint8_t out[KMS_STREAM_DIGEST_LEN])
{
    uint8_t *canon = NULL;
    size_t canon_len = 0;
    p11kms_status st = kms_client_canonical(ctx, nctx, &canon, &canon_len);
    if (st != P11KMS_OK)
        return st;
    if (EVP_Digest(canon, canon_len, out, NULL, kms_md_sha256(), NULL) != 1)
        st = kms_client_fail(P11KMS_ERR_MEMORY, "stream: SHA-256 failed");
    free(canon);
    return st;
}

/* ---- encryption --------------------------------------------------------------- */

p11kms_status kms_stream_encrypt_with_key(const uint8_t key[KMS_STREAM_KEY_LEN],
                                          const uint8_t *prefix, const char *key_arn,
                                          const uint8_t *blob, size_t blob_len,
                                          const uint8_t ctx_digest[KMS_STREAM_DIGEST_LEN],
                                          const struct p11kms_stream_options *o, p11kms_read_fn in,
                                          void *in_arg, p11kms_write_fn out, void *out_arg)
{
    size_t arn_len = key_arn ? strlen(key_arn) : 0;
    size_t cs = 0;
    p11kms_status st;

    if (!key || !blob || !ctx_digest || !in || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "stream encrypt: a NULL argument");
    if (!blob_len || blob_len > KMS_STREAM_MAX_BLOB || arn_len > KMS_STREAM_MAX_ARN)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "stream encrypt: blob or key ARN too long");
    if ((st = chunk_size_of(o, &cs)) != P11KMS_OK)
        return st;

    uint8_t header[KMS_STREAM_MAX_HEADER];
    uint8_t aad[KMS_STREAM_DIGEST_LEN], nonce[KMS_STREAM_NONCE_LEN];
    uint8_t pfx[KMS_STREAM_PREFIX_LEN];
    uint8_t *buf = NULL;
    EVP_CIPHER_CTX *cctx = NULL;
    size_t hlen = 0, used = 0; /* used: the most of buf ever written */
    uint64_t done = 0;

    if (prefix)
        memcpy(pfx, prefix, sizeof pfx);
    else if (RAND_bytes(pfx, sizeof pfx) != 1) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "stream encrypt: no random bytes");
        goto cleanup;
    }

    /* The header, exactly as docs/format.md lays it out. */
    memcpy(header, MAGIC, sizeof MAGIC);
    hlen = sizeof MAGIC;
    header[hlen++] = KMS_STREAM_VERSION;
    put_u32be(header + hlen, (uint32_t)cs);
    hlen += 4;
    memcpy(header + hlen, pfx, sizeof pfx);
    hlen += sizeof pfx;
    memcpy(header + hlen, ctx_digest, KMS_STREAM_DIGEST_LEN);
    hlen += KMS_STREAM_DIGEST_LEN;
    header[hlen++] = (uint8_t)(arn_len >> 8);
    header[hlen++] = (uint8_t)arn_len;
    if (arn_len)
        memcpy(header + hlen, key_arn, arn_len);
    hlen += arn_len;
    header[hlen++] = (uint8_t)(blob_len >> 8);
    header[hlen++] = (uint8_t)blob_len;
    memcpy(header + hlen, blob, blob_len);
    hlen += blob_len;
    if (EVP_Digest(header, hlen, aad, NULL, kms_md_sha256(), NULL) != 1) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "stream encrypt: SHA-256 failed");
        goto cleanup;
    }

    buf = malloc(cs + KMS_STREAM_TAG_LEN);
    cctx = EVP_CIPHER_CTX_new();
    if (!buf || !cctx || EVP_EncryptInit_ex(cctx, kms_cipher_aes256gcm(), NULL, key, NULL) != 1) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "stream encrypt: out of memory");
        goto cleanup;
    }
    if ((st = out(out_arg, header, hlen)) != P11KMS_OK)
        goto cleanup;

    for (uint32_t counter = 0;; counter++) {
        size_t got = 0;
        int outl = 0;
        st = read_full(in, in_arg, buf, cs, &got);
        used = got + KMS_STREAM_TAG_LEN > used ? got + KMS_STREAM_TAG_LEN : used;
        if (st != P11KMS_OK)
            goto cleanup;
        int final = got < cs;
        /* The last counter value can only be the final chunk's. */
        if (!final && counter == UINT32_MAX) {
            st = kms_client_fail(P11KMS_ERR_ARGUMENT,
                                 "stream encrypt: the input is over 2^32 - 1 chunks");
            goto cleanup;
        }
        make_nonce(nonce, pfx, counter, final);
        if (EVP_EncryptInit_ex(cctx, NULL, NULL, NULL, nonce) != 1 ||
            EVP_EncryptUpdate(cctx, NULL, &outl, aad, sizeof aad) != 1 ||
            (got && EVP_EncryptUpdate(cctx, buf, &outl, buf, (int)got) != 1) ||
            EVP_EncryptFinal_ex(cctx, buf + got, &outl) != 1 ||
            EVP_CIPHER_CTX_ctrl(cctx, EVP_CTRL_GCM_GET_TAG, KMS_STREAM_TAG_LEN, buf + got) != 1) {
            st = kms_client_fail(P11KMS_ERR_MEMORY, "stream encrypt: AES-GCM failed");
            goto cleanup;
        }
        if ((st = out(out_arg, buf, got + KMS_STREAM_TAG_LEN)) != P11KMS_OK)
            goto cleanup;
        done += got;
        if (o && o->progress)
            o->progress(o->progress_arg, done);
        if (final)
            break;
    }

cleanup:
    EVP_CIPHER_CTX_free(cctx);
    /* Only the bytes ever written can hold plaintext: cleansing the whole
       buffer would touch every page of a large chunk size for a short input. */
    if (buf)
        kms_free_secret(buf, used < cs + KMS_STREAM_TAG_LEN ? used : cs + KMS_STREAM_TAG_LEN);
    return st;
}

p11kms_status p11kms_stream_encrypt(p11kms_client *c, const char *key_id,
                                    const struct p11kms_context *ctx, size_t nctx,
                                    const struct p11kms_stream_options *o, p11kms_read_fn in,
                                    void *in_arg, p11kms_write_fn out, void *out_arg)
{
    if (!c || !key_id || !*key_id || (!ctx && nctx) || !in || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_stream_encrypt: a NULL argument");

    uint8_t digest[KMS_STREAM_DIGEST_LEN];
    size_t cs = 0;
    struct p11kms_data_key dk;
    memset(&dk, 0, sizeof dk);
    p11kms_status st = chunk_size_of(o, &cs);
    if (st != P11KMS_OK || (st = kms_stream_context_digest(ctx, nctx, digest)) != P11KMS_OK)
        return st;
    /* A fresh data key per stream, never the seal cache: the nonces of one
       stream are then the only ones ever used under its key. */
    if ((st = kms_service_generate(c, key_id, ctx, nctx, &dk)) != P11KMS_OK)
        goto cleanup;
    if (!dk.plaintext || dk.plaintext_len != KMS_STREAM_KEY_LEN || !dk.blob_len ||
        dk.blob_len > KMS_STREAM_MAX_BLOB) {
        st = kms_client_fail(P11KMS_ERR_PROTOCOL,
                             "GenerateDataKey answered without a 32-byte key or a usable blob");
        goto cleanup;
    }
    st = kms_stream_encrypt_with_key(dk.plaintext, NULL, dk.key_arn, dk.blob, dk.blob_len, digest,
                                     o, in, in_arg, out, out_arg);

cleanup:
    p11kms_data_key_clear(&dk);
    return st;
}

/* ---- decryption --------------------------------------------------------------- */

/* A prefix of a header that ends early is a truncated stream; anything else wrong is malformed. */
static p11kms_status header_part(p11kms_read_fn in, void *arg, struct kms_stream_header *h,
                                 size_t n)
{
    size_t got = 0;
    p11kms_status st = read_full(in, arg, h->raw + h->raw_len, n, &got);
    h->raw_len += got;
    if (st != P11KMS_OK)
        return st;
    size_t m = h->raw_len < sizeof MAGIC ? h->raw_len : sizeof MAGIC;
    if (memcmp(h->raw, MAGIC, m) != 0)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "stream: not a p11kms stream (no P11S)");
    if (got < n)
        return kms_client_fail(P11KMS_ERR_TRUNCATED, "stream: the input ends inside the header");
    return P11KMS_OK;
}

p11kms_status kms_stream_read_header(p11kms_read_fn in, void *in_arg, struct kms_stream_header *h)
{
    if (!in || !h)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "stream: a NULL argument");
    memset(h, 0, sizeof *h);
    p11kms_status st = header_part(in, in_arg, h, KMS_STREAM_FIXED_HEADER);
    if (st != P11KMS_OK)
        return st;
    const uint8_t *p = h->raw + sizeof MAGIC;
    if (p[0] != KMS_STREAM_VERSION)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "stream: version %u is not supported", p[0]);
    h->chunk_size = get_u32be(p + 1);
    if (h->chunk_size == 0 || h->chunk_size > KMS_STREAM_MAX_CHUNK)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "stream: chunk size %u out of range",
                               (unsigned)h->chunk_size);
    memcpy(h->prefix, p + 5, KMS_STREAM_PREFIX_LEN);
    memcpy(h->ctx_digest, p + 5 + KMS_STREAM_PREFIX_LEN, KMS_STREAM_DIGEST_LEN);
    size_t arn_len =
        (size_t)h->raw[KMS_STREAM_FIXED_HEADER - 2] << 8 | h->raw[KMS_STREAM_FIXED_HEADER - 1];
    if (arn_len > KMS_STREAM_MAX_ARN)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "stream: key ARN over %u bytes",
                               (unsigned)KMS_STREAM_MAX_ARN);
    /* The ARN and the blob's length field. */
    if ((st = header_part(in, in_arg, h, arn_len + 2)) != P11KMS_OK)
        return st;
    for (size_t i = 0; i < arn_len; i++) {
        uint8_t ch = h->raw[KMS_STREAM_FIXED_HEADER + i];
        if (ch < 0x21 || ch > 0x7e)
            return kms_client_fail(P11KMS_ERR_MALFORMED, "stream: the key ARN is not printable");
        h->key_arn[i] = (char)ch;
    }
    size_t blob_len = (size_t)h->raw[h->raw_len - 2] << 8 | h->raw[h->raw_len - 1];
    if (blob_len == 0 || blob_len > KMS_STREAM_MAX_BLOB)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "stream: blob length %zu out of range",
                               blob_len);
    h->blob = h->raw + h->raw_len;
    h->blob_len = blob_len;
    if ((st = header_part(in, in_arg, h, blob_len)) != P11KMS_OK)
        return st;
    if (EVP_Digest(h->raw, h->raw_len, h->digest, NULL, kms_md_sha256(), NULL) != 1)
        return kms_client_fail(P11KMS_ERR_MEMORY, "stream: SHA-256 failed");
    return P11KMS_OK;
}

p11kms_status kms_stream_decrypt_chunks(const uint8_t key[KMS_STREAM_KEY_LEN],
                                        const struct kms_stream_header *h,
                                        const struct p11kms_stream_options *o, p11kms_read_fn in,
                                        void *in_arg, p11kms_write_fn out, void *out_arg)
{
    if (!key || !h || !in || !out || !h->chunk_size || h->chunk_size > KMS_STREAM_MAX_CHUNK)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "stream decrypt: a NULL argument");

    const size_t cs = h->chunk_size, cap = cs + KMS_STREAM_TAG_LEN;
    uint8_t nonce[KMS_STREAM_NONCE_LEN];
    uint8_t *buf = malloc(cap);
    EVP_CIPHER_CTX *cctx = EVP_CIPHER_CTX_new();
    uint64_t done = 0;
    size_t used = 0; /* the most of buf ever written */
    p11kms_status st = P11KMS_OK;

    if (!buf || !cctx || EVP_DecryptInit_ex(cctx, kms_cipher_aes256gcm(), NULL, key, NULL) != 1) {
        st = kms_client_fail(P11KMS_ERR_MEMORY, "stream decrypt: out of memory");
        goto cleanup;
    }
    for (uint32_t counter = 0;; counter++) {
        size_t got = 0;
        int outl = 0;
        st = read_full(in, in_arg, buf, cap, &got);
        used = got > used ? got : used;
        if (st != P11KMS_OK)
            goto cleanup;
        if (got < KMS_STREAM_TAG_LEN) {
            st = kms_client_fail(P11KMS_ERR_TRUNCATED,
                                 "stream: the input ends before the final chunk (after %lu "
                                 "verified chunks)",
                                 (unsigned long)counter);
            goto cleanup;
        }
        /* Only the final chunk is shorter than a full one. */
        int final = got < cap;
        size_t n = got - KMS_STREAM_TAG_LEN;
        if (!final && counter == UINT32_MAX) {
            st = kms_client_fail(P11KMS_ERR_MALFORMED, "stream: more than 2^32 chunks");
            goto cleanup;
        }
        make_nonce(nonce, h->prefix, counter, final);
        if (EVP_DecryptInit_ex(cctx, NULL, NULL, NULL, nonce) != 1 ||
            EVP_DecryptUpdate(cctx, NULL, &outl, h->digest, sizeof h->digest) != 1 ||
            (n && EVP_DecryptUpdate(cctx, buf, &outl, buf, (int)n) != 1) ||
            EVP_CIPHER_CTX_ctrl(cctx, EVP_CTRL_GCM_SET_TAG, KMS_STREAM_TAG_LEN, buf + n) != 1) {
            st = kms_client_fail(P11KMS_ERR_MEMORY, "stream decrypt: AES-GCM failed");
            goto cleanup;
        }
        if (EVP_DecryptFinal_ex(cctx, buf + n, &outl) != 1) {
            st = kms_client_fail(P11KMS_ERR_DECRYPT,
                                 "stream: chunk %lu does not verify (altered, reordered, "
                                 "truncated, or another key)",
                                 (unsigned long)counter);
            goto cleanup;
        }
        st = out(out_arg, buf, n);
        OPENSSL_cleanse(buf, n);
        if (st != P11KMS_OK)
            goto cleanup;
        done += n;
        if (o && o->progress)
            o->progress(o->progress_arg, done);
        if (final)
            break;
    }

cleanup:
    EVP_CIPHER_CTX_free(cctx);
    if (buf)
        kms_free_secret(buf, used); /* as in encryption: what was written */
    return st;
}

p11kms_status kms_stream_decrypt_with_key(const uint8_t key[KMS_STREAM_KEY_LEN],
                                          const uint8_t ctx_digest[KMS_STREAM_DIGEST_LEN],
                                          const struct p11kms_stream_options *o, p11kms_read_fn in,
                                          void *in_arg, p11kms_write_fn out, void *out_arg)
{
    struct kms_stream_header h;
    p11kms_status st = kms_stream_read_header(in, in_arg, &h);
    if (st != P11KMS_OK)
        return st;
    if (!ctx_digest || CRYPTO_memcmp(ctx_digest, h.ctx_digest, KMS_STREAM_DIGEST_LEN) != 0)
        return kms_client_fail(P11KMS_ERR_DECRYPT,
                               "the encryption context is not the one the stream was made with");
    return kms_stream_decrypt_chunks(key, &h, o, in, in_arg, out, out_arg);
}

p11kms_status p11kms_stream_decrypt(p11kms_client *c, const struct p11kms_context *ctx, size_t nctx,
                                    const struct p11kms_stream_options *o, p11kms_read_fn in,
                                    void *in_arg, p11kms_write_fn out, void *out_arg)
{
    if (!c || (!ctx && nctx) || !in || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_stream_decrypt: a NULL argument");

    uint8_t digest[KMS_STREAM_DIGEST_LEN];
    struct kms_stream_header h;
    struct p11kms_data_key dk;
    memset(&dk, 0, sizeof dk);
    p11kms_status st = kms_stream_context_digest(ctx, nctx, digest);
    if (st != P11KMS_OK || (st = kms_stream_read_header(in, in_arg, &h)) != P11KMS_OK)
        return st;
    /* The digest is in every chunk's AAD, so another context could only fail
       the tags: say so now, without asking the service for the key. */
    if (CRYPTO_memcmp(digest, h.ctx_digest, sizeof digest) != 0)
        return kms_client_fail(P11KMS_ERR_DECRYPT,
                               "the encryption context is not the one the stream was made with");
    if ((st = p11kms_decrypt_data_key(c, h.blob, h.blob_len, ctx, nctx, &dk)) != P11KMS_OK)
        goto cleanup;
    if (!dk.plaintext || dk.plaintext_len != KMS_STREAM_KEY_LEN) {
        st = kms_client_fail(P11KMS_ERR_PROTOCOL, "Decrypt answered without a 32-byte key");
        goto cleanup;
    }
    st = kms_stream_decrypt_chunks(dk.plaintext, &h, o, in, in_arg, out, out_arg);

cleanup:
    p11kms_data_key_clear(&dk);
    return st;
}

int p11kms_stream_detect(const uint8_t *p, size_t n)
{
    return p && n >= sizeof MAGIC && memcmp(p, MAGIC, sizeof MAGIC) == 0;
}
