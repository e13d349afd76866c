/*
 * Envelopes to public keys: who they are sealed to (recipients), the
 * client's cache of GetPublicKey answers, local private keys, and the three
 * entry points that send each format to its own file (jwe_pk.c, cms.c).
 *
 * A KMS key's public half is fetched once per client and key id: sealing to
 * it afterwards is local work only. Public keys are not secret; a cached
 * entry lives until the client is freed (at most PUBKEYS_MAX of them, the
 * oldest dropped first).
 */
#include "config.h"

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"

#define PUBKEYS_MAX 256
#define PUBLIC_INPUT_MAX (64 << 10) /* a PEM certificate chain is far smaller */

struct kms_pubkey_entry {
    struct kms_pubkey_entry *next;
    char *key_id;
    struct p11kms_public_key pk;
};

/* ---- the public-key cache ------------------------------------------------------ */

void kms_pubkeys_init(p11kms_client *c)
{
    pthread_mutex_init(&c->pubkeys_lock, NULL);
    c->pubkeys = NULL;
}

static void entry_free(struct kms_pubkey_entry *e)
{
    if (!e)
        return;
    free(e->key_id);
    p11kms_public_key_clear(&e->pk);
    free(e);
}

void kms_pubkeys_free(p11kms_client *c)
{
    struct kms_pubkey_entry *e = c->pubkeys, *next;

    for (; e; e = next) {
        next = e->next;
        entry_free(e);
    }
    c->pubkeys = NULL;
    pthread_mutex_destroy(&c->pubkeys_lock);
}

static p11kms_status public_key_copy(const struct p11kms_public_key *from,
                                     struct p11kms_public_key *to)
{
    *to = *from;
    to->der = NULL;
    if (from->der_len) {
        to->der = malloc(from->der_len);
        if (!to->der) {
            memset(to, 0, sizeof *to);
            return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        }
        memcpy(to->der, from->der, from->der_len);
    }
    return P11KMS_OK;
}

/* DescribeKey's KeySpec, KeyUsage and Arn for a key GetPublicKey refused. */
static p11kms_status describe_symmetric(p11kms_client *c, const char *key_id,
                                        struct p11kms_public_key *out)
{
    json_t *req = json_pack("{s:s}", "KeyId", key_id), *resp = NULL, *md;
    const char *spec, *usage, *arn;
    p11kms_status st;

    if (!req)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    st = kms_transport_call(c, "DescribeKey", req, &resp);
    json_decref(req);
    if (st != P11KMS_OK)
        return st;
    md = json_object_get(resp, "KeyMetadata");
    spec = json_string_value(json_object_get(md, "KeySpec"));
    usage = json_string_value(json_object_get(md, "KeyUsage"));
    arn = json_string_value(json_object_get(md, "Arn"));
    if (!spec || !usage || !arn || strlen(spec) >= sizeof out->key_spec ||
        strlen(usage) >= sizeof out->key_usage || strlen(arn) >= sizeof out->key_arn)
        st = kms_client_fail(P11KMS_ERR_PROTOCOL, "DescribeKey: KeyMetadata lacks KeySpec, "
                                                  "KeyUsage or Arn");
    else {
        memset(out, 0, sizeof *out);
        snprintf(out->key_spec, sizeof out->key_spec, "%s", spec);
        snprintf(out->key_usage, sizeof out->key_usage, "%s", usage);
        snprintf(out->key_arn, sizeof out->key_arn, "%s", arn);
    }
    json_decref(resp);
    return st;
}

p11kms_status kms_client_public_key(p11kms_client *c, const char *key_id,
                                    struct p11kms_public_key *out)
{
    struct kms_pubkey_entry *e, **pp;
    struct p11kms_public_key pk;
    p11kms_status st;
    size_t count = 0;

    memset(out, 0, sizeof *out);
    if ((st = kms_check_key_id(key_id)) != P11KMS_OK)
        return st;
    pthread_mutex_lock(&c->pubkeys_lock);
    for (e = c->pubkeys; e; e = e->next)
        if (strcmp(e->key_id, key_id) == 0)
            break;
    st = e ? public_key_copy(&e->pk, out) : P11KMS_ERR_NOT_FOUND;
    pthread_mutex_unlock(&c->pubkeys_lock);
    if (st != P11KMS_ERR_NOT_FOUND)
        return st;

    st = p11kms_get_public_key(c, key_id, &pk);
    if (st == P11KMS_ERR_UNSUPPORTED) /* a symmetric key has no public half */
        st = describe_symmetric(c, key_id, &pk);
    if (st != P11KMS_OK)
        return st;
    if ((st = public_key_copy(&pk, out)) != P11KMS_OK) {
        p11kms_public_key_clear(&pk);
        return st;
    }
    e = calloc(1, sizeof *e);
    if (!e || !(e->key_id = strdup(key_id))) {
        free(e);
        p11kms_public_key_clear(&pk);
        return P11KMS_OK; /* not cached: the answer is still good */
    }
    e->pk = pk;
    pthread_mutex_lock(&c->pubkeys_lock);
    e->next = c->pubkeys;
    c->pubkeys = e;
    for (pp = &c->pubkeys; *pp && ++count < PUBKEYS_MAX; pp = &(*pp)->next)
        ;
    if (*pp) { /* over the bound: drop the oldest */
        entry_free((*pp)->next);
        (*pp)->next = NULL;
    }
    pthread_mutex_unlock(&c->pubkeys_lock);
    return P11KMS_OK;
}

/* ---- keys ---------------------------------------------------------------------- */

p11kms_status kms_recipient_kind_of(EVP_PKEY *pkey, enum kms_recipient_kind *out)
{
    char group[32] = "";
    size_t glen = 0;

    if (EVP_PKEY_is_a(pkey, "RSA")) {
        if (EVP_PKEY_get_bits(pkey) < 2048)
            return kms_client_fail(P11KMS_ERR_ARGUMENT,
                                   "an RSA recipient key must have 2048 bits or more, not %d",
                                   EVP_PKEY_get_bits(pkey));
        *out = KMS_RECIPIENT_RSA;
        return P11KMS_OK;
    }
    if (EVP_PKEY_is_a(pkey, "X25519")) {
        *out = KMS_RECIPIENT_X25519;
        return P11KMS_OK;
    }
    if (EVP_PKEY_is_a(pkey, "EC") &&
        EVP_PKEY_get_utf8_string_param(pkey, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group,
                                       &glen) == 1 &&
        (strcmp(group, "prime256v1") == 0 || strcmp(group, "secp384r1") == 0 ||
         strcmp(group, "secp521r1") == 0)) {
        *out = KMS_RECIPIENT_EC;
        return P11KMS_OK;
    }
    return kms_client_fail(P11KMS_ERR_ARGUMENT,
                           "a recipient key is RSA, EC on P-256, P-384 or P-521, or X25519; "
                           "this one is %s%s%s",
                           EVP_PKEY_get0_type_name(pkey) ? EVP_PKEY_get0_type_name(pkey) : "?",
                           group[0] ? " on " : "", group);
}

p11kms_status kms_public_key_skid(EVP_PKEY *pkey, uint8_t out[20])
{
    X509_PUBKEY *xpk = NULL;
    const unsigned char *bits;
    int len;
    p11kms_status st = P11KMS_OK;

    if (X509_PUBKEY_set(&xpk, pkey) != 1 ||
        X509_PUBKEY_get0_param(NULL, &bits, &len, NULL, xpk) != 1 || len < 0)
        st = kms_client_fail(P11KMS_ERR_ARGUMENT, "the public key does not encode");
    else
        SHA1(bits, (size_t)len, out);
    X509_PUBKEY_free(xpk);
    return st;
}

/* First non-space byte of p, or 0. */
static int first_byte(const uint8_t *p, size_t n)
{
    size_t i = 0;

    while (i < n && (p[i] == ' ' || p[i] == '\t' || p[i] == '\r' || p[i] == '\n'))
        i++;
    return i < n ? p[i] : 0;
}

static int contains(const uint8_t *p, size_t n, const char *s)
{
    size_t k = strlen(s), i;

    for (i = 0; k <= n && i <= n - k; i++)
        if (memcmp(p + i, s, k) == 0)
            return 1;
    return 0;
}

p11kms_status kms_private_key_parse(const uint8_t *p, size_t n, EVP_PKEY **out)
{
    const unsigned char *q = p;
    BIO *bio;

    *out = NULL;
    if (!p || n == 0 || n > PUBLIC_INPUT_MAX)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "a private key of 1 to %d bytes is needed",
                               PUBLIC_INPUT_MAX);
    if (first_byte(p, n) == '{')
        return kms_jwk_to_pkey(p, n, 1, out, NULL);
    if (contains(p, n, "-----BEGIN")) {
        if (!(bio = BIO_new_mem_buf(p, (int)n)))
            return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        *out = PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL);
        BIO_free(bio);
    } else {
        *out = d2i_AutoPrivateKey(NULL, &q, (long)n);
        if (*out && q != p + n) {
            EVP_PKEY_free(*out);
            *out = NULL;
        }
    }
    if (!*out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "the private key is neither PEM, DER (PKCS#8, RSA, EC) nor a JWK");
    return P11KMS_OK;
}

/* ---- recipients ---------------------------------------------------------------- */

static p11kms_status recipient_new(EVP_PKEY *pkey, X509 *cert, const char *kid,
                                   p11kms_recipient **out)
{
    p11kms_recipient *r = calloc(1, sizeof *r);
    p11kms_status st;

    if (!r)
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    if (pkey && (st = kms_recipient_kind_of(pkey, &r->kind)) != P11KMS_OK) {
        free(r);
        return st;
    }
    if (kid && !(r->kid = strdup(kid))) {
        free(r);
        return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
    }
    r->pkey = pkey;
    r->cert = cert;
    *out = r;
    return P11KMS_OK;
}

void p11kms_recipient_free(p11kms_recipient *r)
{
    if (!r)
        return;
    EVP_PKEY_free(r->pkey);
    X509_free(r->cert);
    free(r->kid);
    free(r);
}

p11kms_status p11kms_recipient_from_key(p11kms_client *c, const char *key_id,
                                        p11kms_recipient **out)
{
    struct p11kms_public_key pk;
    const unsigned char *q;
    EVP_PKEY *pkey = NULL;
    p11kms_status st;

    if (out)
        *out = NULL;
    if (!c || !key_id || !out)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_recipient_from_key: NULL argument");
    if ((st = kms_client_public_key(c, key_id, &pk)) != P11KMS_OK)
        return st;
    if (strcmp(pk.key_spec, "SYMMETRIC_DEFAULT") == 0 &&
        strcmp(pk.key_usage, "ENCRYPT_DECRYPT") == 0) {
        st = recipient_new(NULL, NULL, pk.key_arn, out);
        if (st == P11KMS_OK)
            (*out)->kind = KMS_RECIPIENT_KMS_SYMMETRIC;
    } else if (strcmp(pk.key_usage, "ENCRYPT_DECRYPT") != 0 &&
               strcmp(pk.key_usage, "KEY_AGREEMENT") != 0) {
        st = kms_client_fail(P11KMS_ERR_INVALID_KEY_USAGE,
                             "%s is a %s key for %s: an envelope needs ENCRYPT_DECRYPT (RSA, "
                             "symmetric) or KEY_AGREEMENT (EC)",
                             pk.key_arn, pk.key_spec, pk.key_usage);
    } else {
        q = pk.der;
        pkey = pk.der ? d2i_PUBKEY(NULL, &q, (long)pk.der_len) : NULL;
        if (!pkey)
            st = kms_client_fail(P11KMS_ERR_PROTOCOL,
                                 "GetPublicKey: PublicKey is not a SubjectPublicKeyInfo");
        else if ((st = recipient_new(pkey, NULL, pk.key_arn, out)) != P11KMS_OK)
            EVP_PKEY_free(pkey);
    }
    if (st == P11KMS_OK) {
        snprintf((*out)->key_arn, sizeof(*out)->key_arn, "%s", pk.key_arn);
        (*out)->client = c;
    }
    p11kms_public_key_clear(&pk);
    return st;
}

p11kms_status p11kms_recipient_from_public(const uint8_t *data, size_t n, const char *kid,
                                           p11kms_recipient **out)
{
    const unsigned char *q = data;
    EVP_PKEY *pkey = NULL;
    X509 *cert = NULL;
    char *jwk_kid = NULL;
    BIO *bio;
    p11kms_status st;

    if (out)
        *out = NULL;
    if (!data || !out || n == 0 || n > PUBLIC_INPUT_MAX)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "p11kms_recipient_from_public: a key of 1 to %d bytes is needed",
                               PUBLIC_INPUT_MAX);
    if (first_byte(data, n) == '{') {
        if ((st = kms_jwk_to_pkey(data, n, 0, &pkey, &jwk_kid)) != P11KMS_OK)
            return st;
    } else if (contains(data, n, "-----BEGIN")) {
        if (!(bio = BIO_new_mem_buf(data, (int)n)))
            return kms_client_fail(P11KMS_ERR_MEMORY, "out of memory");
        if (contains(data, n, "-----BEGIN CERTIFICATE-----"))
            cert = PEM_read_bio_X509(bio, NULL, NULL, NULL);
        else
            pkey = PEM_read_bio_PUBKEY(bio, NULL, NULL, NULL);
        BIO_free(bio);
    } else {
        pkey = d2i_PUBKEY(NULL, &q, (long)n);
        if (pkey && q != data + n) {
            EVP_PKEY_free(pkey);
            pkey = NULL;
        }
        if (!pkey) {
            q = data;
            cert = d2i_X509(NULL, &q, (long)n);
            if (cert && q != data + n) {
                X509_free(cert);
                cert = NULL;
            }
        }
    }
    if (cert && !(pkey = X509_get_pubkey(cert))) {
        X509_free(cert);
        cert = NULL;
    }
    if (!pkey)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "the recipient is neither a PEM public key or certificate, DER "
                               "SubjectPublicKeyInfo or certificate, nor a JWK");
    st = recipient_new(pkey, cert, kid ? kid : jwk_kid, out);
    free(jwk_kid);
    if (st != P11KMS_OK) {
        EVP_PKEY_free(pkey);
        X509_free(cert);
    }
    return st;
}

/* ---- sealing and opening ------------------------------------------------------- */

int p11kms_envelope_detect(const uint8_t *in, size_t n)
{
    size_t i = 0;

    if (!in)
        return -1;
    while (i < n && (in[i] == ' ' || in[i] == '\t' || in[i] == '\r' || in[i] == '\n'))
        i++;
    if (n - i >= 3 && memcmp(in + i, "eyJ", 3) == 0)
        return P11KMS_FORMAT_JWE_COMPACT;
    if (n - i >= 1 && in[i] == '{')
        return P11KMS_FORMAT_JWE_JSON;
    if (n - i >= 2 && in[i] == 0x30 && i == 0) /* DER: a SEQUENCE, no white space before */
        return P11KMS_FORMAT_CMS;
    if (n - i >= 14 && (memcmp(in + i, "-----BEGIN CMS", 14) == 0 ||
                        (n - i >= 16 && memcmp(in + i, "-----BEGIN PKCS7", 16) == 0)))
        return P11KMS_FORMAT_CMS;
    return -1;
}

p11kms_status p11kms_envelope_seal(p11kms_client *c, p11kms_envelope_format format,
                                   p11kms_recipient *const *recipients, size_t n_recipients,
                                   const uint8_t *payload, size_t n, uint8_t **out, size_t *out_len)
{
    size_t i;

    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!recipients || !out || !out_len || (!payload && n))
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_envelope_seal: NULL argument");
    if (n_recipients == 0 || n_recipients > KMS_ENVELOPE_MAX_RECIPIENTS)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "an envelope has 1 to %d recipients, not %zu",
                               KMS_ENVELOPE_MAX_RECIPIENTS, n_recipients);
    if (n > KMS_ENVELOPE_MAX_PAYLOAD)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "an envelope holds at most %zu bytes; use the stream format",
                               KMS_ENVELOPE_MAX_PAYLOAD);
    for (i = 0; i < n_recipients; i++) {
        if (!recipients[i])
            return kms_client_fail(P11KMS_ERR_ARGUMENT, "recipient %zu is NULL", i);
        if (recipients[i]->kind == KMS_RECIPIENT_KMS_SYMMETRIC && format != P11KMS_FORMAT_CMS)
            return kms_client_fail(P11KMS_ERR_ARGUMENT,
                                   "%s is a symmetric key: seal a JWE to it with p11kms_seal",
                                   recipients[i]->key_arn);
        if (recipients[i]->kind == KMS_RECIPIENT_X25519 && format == P11KMS_FORMAT_CMS)
            return kms_client_fail(P11KMS_ERR_ARGUMENT,
                                   "CMS recipients are RSA or NIST-curve keys, not X25519");
    }
    switch (format) {
    case P11KMS_FORMAT_JWE_COMPACT:
        if (n_recipients != 1)
            return kms_client_fail(P11KMS_ERR_ARGUMENT,
                                   "a compact JWE has one recipient; use P11KMS_FORMAT_JWE_JSON");
        return kms_jwe_pk_seal(0, recipients, 1, payload, n, out, out_len);
    case P11KMS_FORMAT_JWE_JSON:
        return kms_jwe_pk_seal(1, recipients, n_recipients, payload, n, out, out_len);
    case P11KMS_FORMAT_CMS:
        return kms_cms_seal(c, recipients, n_recipients, payload, n, out, out_len);
    }
    return kms_client_fail(P11KMS_ERR_ARGUMENT, "unknown envelope format %d", (int)format);
}

p11kms_status p11kms_envelope_open(const struct p11kms_opener *o, const uint8_t *in, size_t n,
                                   uint8_t **out, size_t *out_len)
{
    if (out)
        *out = NULL;
    if (out_len)
        *out_len = 0;
    if (!o || !in || !out || !out_len)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "p11kms_envelope_open: NULL argument");
    if (!o->client && !o->private_key)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "p11kms_envelope_open: the opener has neither a client nor a "
                               "private key");
    switch (p11kms_envelope_detect(in, n)) {
    case P11KMS_FORMAT_JWE_COMPACT:
    case P11KMS_FORMAT_JWE_JSON: return kms_jwe_pk_open(o, in, n, out, out_len);
    case P11KMS_FORMAT_CMS: return kms_cms_open(o, in, n, out, out_len);
    default: return kms_client_fail(P11KMS_ERR_MALFORMED, "the input is neither a JWE nor CMS");
    }
}
