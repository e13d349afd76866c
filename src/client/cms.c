/*
 * CMS AuthEnvelopedData (RFC 5652, 5083, 5084) through OpenSSL's CMS API
 * (docs/format.md, "CMS AuthEnvelopedData").
 *
 * Sealing: a fresh AES-256-GCM content key, wrapped for each recipient --
 * RSA: KeyTransRecipientInfo with RSAES-OAEP (SHA-256, MGF1-SHA-256); EC:
 * KeyAgreeRecipientInfo, ephemeral-static ECDH with the X9.63 KDF over
 * SHA-256 and AES-256 key wrap; a symmetric KMS key: KEKRecipientInfo under a
 * data key from GenerateDataKey (AES-256 key wrap), its blob in the kekid.
 * A recipient with a certificate is named by issuer and serial number; a bare
 * public key by its SubjectKeyIdentifier (RFC 5280 method 1).
 *
 * Opening: every RecipientInfo the opener can serve, in order, until one
 * gives the content key; the content is read only once the GCM tag has
 * verified, into one buffer wiped on failure. OpenSSL 3.0 accepts a tag of
 * any length from 1 to 16 bytes, so the structure is checked first: AES-256
 * GCM, a 12-byte nonce, a 16-byte tag.
 *
 * Everything is in memory: OpenSSL 3.0's CMS streams sealing (CMS_STREAM)
 * for EnvelopedData only, and CMS_decrypt writes plaintext before the tag is
 * checked; KMS_ENVELOPE_MAX_PAYLOAD bounds the payload.
 */
#include "config.h"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/cms.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/objects.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/sha.h>
#include <openssl/x509v3.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"

#define CMS_TAG_LEN 16
#define CMS_NONCE_LEN 12
#define CMS_KEK_LEN 32
/* Room for the PEM (base64 and line breaks) of a 64 MiB payload with 64 recipients. */
#define CMS_INPUT_MAX (2 * KMS_ENVELOPE_MAX_PAYLOAD)

/* OpenSSL's last error as text for a message (no secrets in it); clears the queue. */
static const char *ossl_why(char *buf, size_t cap)
{
    unsigned long e = ERR_peek_last_error();

    if (e)
        ERR_error_string_n(e, buf, cap);
    else
        snprintf(buf, cap, "no detail");
    ERR_clear_error();
    return buf;
}

static p11kms_status ossl_fail(p11kms_status st, const char *what)
{
    char why[256];

    return kms_client_fail(st, "CMS: %s (%s)", what, ossl_why(why, sizeof why));
}

/* ---- sealing ------------------------------------------------------------------- */

/*
 * OpenSSL's CMS names a recipient through an X509. For a bare public key,
 * one that holds only the key and its SubjectKeyIdentifier. OpenSSL 3.0
 * reads the SKID through its extension cache, which refuses a certificate
 * that does not encode, and the signature algorithm is set only by signing:
 * so it is signed, by a throw-away key made once per process. Nothing reads
 * that signature, and the certificate is not written into the envelope.
 *
 * Making it costs more than the rest of a seal (OpenSSL 3.0 encodes and
 * decodes the key through its provider machinery), so it is made once per
 * recipient key and kept on the key (EVP_PKEY ex_data, freed with it). It
 * holds a duplicate of the key, so that the two do not keep each other alive.
 */
static EVP_PKEY *cert_signer;
static int cert_index = -1;
static pthread_once_t cert_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t cert_lock = PTHREAD_MUTEX_INITIALIZER;

static void cert_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent, (void)ad, (void)idx, (void)argl, (void)argp;
    X509_free(ptr);
}

/* A copy of the key (EVP_PKEY_dup) shares its certificate. */
static int cert_dup(CRYPTO_EX_DATA *to, const CRYPTO_EX_DATA *from, void **from_d, int idx,
                    long argl, void *argp)
{
    (void)to, (void)from, (void)idx, (void)argl, (void)argp;
    return !*from_d || X509_up_ref(*from_d);
}

static void cert_init(void)
{
    cert_signer = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    cert_index = EVP_PKEY_get_ex_new_index(0, NULL, NULL, cert_dup, cert_free);
}

static p11kms_status key_only_cert_make(EVP_PKEY *pkey, X509 **out)
{
    uint8_t skid[20];
    const unsigned char *bits;
    int bits_len;
    ASN1_OCTET_STRING *os = ASN1_OCTET_STRING_new();
    X509_NAME *name = X509_NAME_new();
    X509 *x = X509_new();
    EVP_PKEY *copy = EVP_PKEY_dup(pkey);
    p11kms_status st = P11KMS_OK;

    *out = NULL;
    /* The key is encoded once, by X509_set_pubkey; the SKID is of those bits
       (kms_public_key_skid's RFC 5280 method 1, without encoding it again). */
    if (!os || !name || !x || !copy || !cert_signer || !X509_set_version(x, X509_VERSION_3) ||
        !ASN1_INTEGER_set(X509_get_serialNumber(x), 1) || !X509_set_issuer_name(x, name) ||
        !X509_set_subject_name(x, name) || !X509_gmtime_adj(X509_getm_notBefore(x), 0) ||
        !X509_gmtime_adj(X509_getm_notAfter(x), 0) || !X509_set_pubkey(x, copy) ||
        X509_PUBKEY_get0_param(NULL, &bits, &bits_len, NULL, X509_get_X509_PUBKEY(x)) != 1 ||
        bits_len < 0 || !SHA1(bits, (size_t)bits_len, skid) ||
        !ASN1_OCTET_STRING_set(os, skid, sizeof skid) ||
        !X509_add1_ext_i2d(x, NID_subject_key_identifier, os, 0, X509V3_ADD_DEFAULT) ||
        !X509_sign(x, cert_signer, NULL) || X509_check_purpose(x, -1, 0) != 1) {
        st = ossl_fail(P11KMS_ERR_MEMORY, "cannot name a bare public key");
        goto cleanup;
    }
    *out = x; /* its extensions are cached: threads may share it read-only */
    x = NULL;
cleanup:
    EVP_PKEY_free(copy);
    X509_free(x);
    X509_NAME_free(name);
    ASN1_OCTET_STRING_free(os);
    return st;
}

/* pkey's key-only certificate (a reference the caller frees), made on first use. */
static p11kms_status key_only_cert(EVP_PKEY *pkey, X509 **out)
{
    X509 *x;
    p11kms_status st = P11KMS_OK;

    *out = NULL;
    pthread_once(&cert_once, cert_init);
    if (cert_index < 0)
        return kms_client_fail(P11KMS_ERR_MEMORY, "CMS: cannot keep certificates on keys");
    pthread_mutex_lock(&cert_lock);
    x = EVP_PKEY_get_ex_data(pkey, cert_index);
    if (!x && (st = key_only_cert_make(pkey, &x)) == P11KMS_OK &&
        !EVP_PKEY_set_ex_data(pkey, cert_index, x)) {
        X509_free(x);
        st = kms_client_fail(P11KMS_ERR_MEMORY, "CMS: out of memory");
    }
    if (st == P11KMS_OK && X509_up_ref(x))
        *out = x;
    else if (st == P11KMS_OK)
        st = kms_client_fail(P11KMS_ERR_MEMORY, "CMS: out of memory");
    pthread_mutex_unlock(&cert_lock);
    return st;
}

/* RSA: RSAES-OAEP with SHA-256 and MGF1-SHA-256. EC: X9.63 KDF with SHA-256, AES-256 wrap. */
static p11kms_status add_public(CMS_ContentInfo *cms, const p11kms_recipient *r)
{
    X509 *cert = r->cert, *bare = NULL;
    unsigned flags = CMS_KEY_PARAM;
    CMS_RecipientInfo *ri;
    EVP_PKEY_CTX *pctx;
    EVP_CIPHER_CTX *wrap;
    p11kms_status st = P11KMS_OK;
    int ok;

    if (!cert) {
        if ((st = key_only_cert(r->pkey, &bare)) != P11KMS_OK)
            return st;
        cert = bare;
        flags |= CMS_USE_KEYID;
    }
    ri = CMS_add1_recipient_cert(cms, cert, flags);
    pctx = ri ? CMS_RecipientInfo_get0_pkey_ctx(ri) : NULL;
    if (!pctx)
        ok = 0;
    else if (r->kind == KMS_RECIPIENT_RSA)
        ok = CMS_RecipientInfo_type(ri) == CMS_RECIPINFO_TRANS &&
             EVP_PKEY_CTX_set_rsa_padding(pctx, RSA_PKCS1_OAEP_PADDING) > 0 &&
             EVP_PKEY_CTX_set_rsa_oaep_md(pctx, EVP_sha256()) > 0 &&
             EVP_PKEY_CTX_set_rsa_mgf1_md(pctx, EVP_sha256()) > 0;
    else
        ok = CMS_RecipientInfo_type(ri) == CMS_RECIPINFO_AGREE &&
             EVP_PKEY_CTX_set_ecdh_kdf_md(pctx, EVP_sha256()) > 0 &&
             (wrap = CMS_RecipientInfo_kari_get0_ctx(ri)) != NULL &&
             EVP_EncryptInit_ex(wrap, EVP_aes_256_wrap(), NULL, NULL, NULL) == 1;
    if (!ok)
        st = ossl_fail(P11KMS_ERR_ARGUMENT, "cannot add the recipient");
    X509_free(bare);
    return st;
}

/*
 * A symmetric KMS key: KEKRecipientInfo whose KEK is a data key from
 * GenerateDataKey under it. kekid.keyIdentifier is the key's ARN, kekid.other
 * { KMS_CMS_KEKRI_BLOB_OID, OCTET STRING the CiphertextBlob }: any CMS reader
 * given the data key opens it; through the service, Decrypt of the blob gives
 * it. The KEK (dk's, in the secure heap) is lent to CMS until the content key
 * is wrapped: kms_cms_seal takes it back (CMS_RecipientInfo_set0_key NULL).
 */
static p11kms_status add_kms_symmetric(CMS_ContentInfo *cms, const p11kms_recipient *r,
                                       struct p11kms_data_key *dk, CMS_RecipientInfo **out)
{
    size_t arn_len = strlen(r->key_arn);
    unsigned char *id = NULL;
    ASN1_OBJECT *oid = NULL;
    ASN1_OCTET_STRING *blob = NULL;
    ASN1_TYPE *attr = NULL;
    p11kms_status st;

    *out = NULL;
    if (!r->client)
        return kms_client_fail(P11KMS_ERR_ARGUMENT,
                               "a symmetric KMS key recipient needs its client");
    if ((st = p11kms_generate_data_key(r->client, r->key_arn, NULL, 0, dk)) != P11KMS_OK)
        return st;
    if (dk->plaintext_len != CMS_KEK_LEN || !dk->blob_len)
        return kms_client_fail(P11KMS_ERR_PROTOCOL,
                               "GenerateDataKey answered without a 32-byte key or a blob");
    if (!(id = OPENSSL_memdup(r->key_arn, arn_len)) ||
        !(oid = OBJ_txt2obj(KMS_CMS_KEKRI_BLOB_OID, 1)) || !(blob = ASN1_OCTET_STRING_new()) ||
        !ASN1_OCTET_STRING_set(blob, dk->blob, (int)dk->blob_len) || !(attr = ASN1_TYPE_new())) {
        st = ossl_fail(P11KMS_ERR_MEMORY, "out of memory");
        goto cleanup;
    }
    ASN1_TYPE_set(attr, V_ASN1_OCTET_STRING, blob);
    blob = NULL;
    *out = CMS_add0_recipient_key(cms, NID_id_aes256_wrap, dk->plaintext, CMS_KEK_LEN, id, arn_len,
                                  NULL, oid, attr);
    if (!*out) {
        st = ossl_fail(P11KMS_ERR_MEMORY, "cannot add the KEK recipient");
        goto cleanup;
    }
    id = NULL, oid = NULL, attr = NULL; /* the RecipientInfo's now */
cleanup:
    OPENSSL_free(id);
    ASN1_OBJECT_free(oid);
    ASN1_OCTET_STRING_free(blob);
    ASN1_TYPE_free(attr);
    return st;
}

p11kms_status kms_cms_seal(p11kms_client *c, p11kms_recipient *const *r, size_t nr,
                           const uint8_t *pt, size_t n, uint8_t **out, size_t *out_len)
{
    CMS_ContentInfo *cms = CMS_AuthEnvelopedData_create(EVP_aes_256_gcm());
    struct p11kms_data_key dks[KMS_ENVELOPE_MAX_RECIPIENTS];
    CMS_RecipientInfo *kekri[KMS_ENVELOPE_MAX_RECIPIENTS];
    BIO *in = NULL;
    unsigned char *der = NULL, *q;
    int der_len;
    size_t i;
    p11kms_status st = P11KMS_OK;

    (void)c; /* a symmetric KMS key recipient carries its own client */
    *out = NULL;
    *out_len = 0;
    memset(dks, 0, sizeof dks);
    memset(kekri, 0, sizeof kekri);
    if (nr > KMS_ENVELOPE_MAX_RECIPIENTS || n > KMS_ENVELOPE_MAX_PAYLOAD)
        return kms_client_fail(P11KMS_ERR_ARGUMENT, "CMS: too many recipients or too large");
    if (!cms)
        return ossl_fail(P11KMS_ERR_MEMORY, "cannot make an AuthEnvelopedData");
    for (i = 0; i < nr && st == P11KMS_OK; i++) {
        if (r[i]->kind == KMS_RECIPIENT_KMS_SYMMETRIC)
            st = add_kms_symmetric(cms, r[i], &dks[i], &kekri[i]);
        else if (r[i]->kind == KMS_RECIPIENT_RSA || r[i]->kind == KMS_RECIPIENT_EC)
            st = add_public(cms, r[i]);
        else
            st = kms_client_fail(P11KMS_ERR_ARGUMENT, "CMS recipients are RSA or EC keys");
    }
    if (st != P11KMS_OK)
        goto cleanup;
    CMS_set_detached(cms, 0);
    if (!(in = BIO_new_mem_buf(n ? pt : (const uint8_t *)"", (int)n)) ||
        !CMS_final(cms, in, NULL, CMS_BINARY)) {
        st = ossl_fail(P11KMS_ERR_MEMORY, "cannot seal");
        goto cleanup;
    }
    if ((der_len = i2d_CMS_ContentInfo(cms, NULL)) <= 0 || !(der = malloc((size_t)der_len))) {
        st = ossl_fail(P11KMS_ERR_MEMORY, "cannot encode");
        goto cleanup;
    }
    q = der;
    i2d_CMS_ContentInfo(cms, &q);
    *out = der;
    *out_len = (size_t)der_len;
cleanup:
    for (i = 0; i < nr && i < KMS_ENVELOPE_MAX_RECIPIENTS; i++) {
        if (kekri[i])
            CMS_RecipientInfo_set0_key(kekri[i], NULL, 0); /* dks[i] holds the KEK */
        p11kms_data_key_clear(&dks[i]);
    }
    BIO_free(in);
    CMS_ContentInfo_free(cms); /* wipes the content key */
    return st;
}

/* ---- what OpenSSL does not check ----------------------------------------------- */

/* Steps into (enter) or over the TLV at *p, which must have the tag and class given. */
static int der_next(const unsigned char **p, const unsigned char *end, int tag, int cls, int enter,
                    const unsigned char **value, long *len)
{
    int t, c, r;

    if (*p >= end)
        return 0;
    r = ASN1_get_object(p, len, &t, &c, end - *p);
    if ((r & 0x80) || r == 0x21 || t != tag || c != cls)
        return 0;
    if (value)
        *value = *p;
    if (!enter)
        *p += *len;
    return 1;
}

/*
 * The AuthEnvelopedData (OpenSSL's own DER of it) has AES-256-GCM content
 * with a 12-byte nonce, ICVlen 16 and a 16-byte mac; the content is at most
 * the payload bound.
 */
static p11kms_status check_structure(const unsigned char *der, long der_len)
{
    const unsigned char *p = der, *end = der + der_len, *v, *aed_end, *eci_end, *alg;
    long len, alg_len;
    X509_ALGOR *calg = NULL;
    STACK_OF(ASN1_TYPE) *gcm = NULL;
    ASN1_TYPE *nonce, *icv;
    int64_t icvlen = 12; /* GCMParameters' default */
    int t, c, have_mac = 0, have_content = 0;
    p11kms_status st = P11KMS_ERR_MALFORMED;

    if (!der_next(&p, end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, 1, NULL, &len) ||
        !der_next(&p, end, V_ASN1_OBJECT, V_ASN1_UNIVERSAL, 0, NULL, &len) ||
        !der_next(&p, end, 0, V_ASN1_CONTEXT_SPECIFIC, 1, NULL, &len) ||
        !der_next(&p, end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, 1, &v, &len))
        goto fail;
    aed_end = v + len;
    while (p < aed_end) {
        v = p;
        if (ASN1_get_object(&v, &len, &t, &c, aed_end - p) & 0x80)
            goto fail;
        p = v + len; /* the next member */
        if (c == V_ASN1_UNIVERSAL && t == V_ASN1_OCTET_STRING) {
            /* mac */
            if (have_mac)
                goto fail;
            if (len != CMS_TAG_LEN) {
                st = kms_client_fail(P11KMS_ERR_MALFORMED, "CMS: the tag has %ld bytes, not %d",
                                     len, CMS_TAG_LEN);
                goto cleanup;
            }
            have_mac = 1;
        } else if (c == V_ASN1_UNIVERSAL && t == V_ASN1_SEQUENCE) {
            /* authEncryptedContentInfo */
            if (have_content)
                goto fail;
            eci_end = v + len;
            if (!der_next(&v, eci_end, V_ASN1_OBJECT, V_ASN1_UNIVERSAL, 0, NULL, &len))
                goto fail;
            alg = v;
            if (!der_next(&v, eci_end, V_ASN1_SEQUENCE, V_ASN1_UNIVERSAL, 0, NULL, &alg_len) ||
                !(calg = d2i_X509_ALGOR(NULL, &alg, v - alg)))
                goto fail;
            if (OBJ_obj2nid(calg->algorithm) != NID_aes_256_gcm) {
                st = kms_client_fail(P11KMS_ERR_MALFORMED, "CMS: the content is not AES-256-GCM");
                goto cleanup;
            }
            if (!calg->parameter || calg->parameter->type != V_ASN1_SEQUENCE)
                goto fail;
            alg = calg->parameter->value.sequence->data;
            gcm = d2i_ASN1_SEQUENCE_ANY(NULL, &alg, calg->parameter->value.sequence->length);
            if (!gcm || sk_ASN1_TYPE_num(gcm) < 1 || sk_ASN1_TYPE_num(gcm) > 2)
                goto fail;
            nonce = sk_ASN1_TYPE_value(gcm, 0);
            icv = sk_ASN1_TYPE_num(gcm) == 2 ? sk_ASN1_TYPE_value(gcm, 1) : NULL;
            if (nonce->type != V_ASN1_OCTET_STRING ||
                ASN1_STRING_length(nonce->value.octet_string) != CMS_NONCE_LEN ||
                (icv && (icv->type != V_ASN1_INTEGER ||
                         !ASN1_INTEGER_get_int64(&icvlen, icv->value.integer))))
                goto fail;
            if (icvlen != CMS_TAG_LEN) {
                st = kms_client_fail(P11KMS_ERR_MALFORMED, "CMS: ICVlen is %lld, not %d",
                                     (long long)icvlen, CMS_TAG_LEN);
                goto cleanup;
            }
            /* encryptedContent [0] IMPLICIT OCTET STRING */
            if (!der_next(&v, eci_end, 0, V_ASN1_CONTEXT_SPECIFIC, 0, NULL, &len))
                goto fail;
            if ((size_t)len > KMS_ENVELOPE_MAX_PAYLOAD) {
                st = kms_client_fail(P11KMS_ERR_MALFORMED, "CMS: the content is over %zu bytes",
                                     KMS_ENVELOPE_MAX_PAYLOAD);
                goto cleanup;
            }
            have_content = 1;
        }
    }
    if (!have_mac || !have_content)
        goto fail;
    st = P11KMS_OK;
    goto cleanup;
fail:
    st = kms_client_fail(P11KMS_ERR_MALFORMED, "CMS: the AuthEnvelopedData is not well formed");
cleanup:
    X509_ALGOR_free(calg);
    sk_ASN1_TYPE_pop_free(gcm, ASN1_TYPE_free);
    ERR_clear_error();
    return st;
}

/* ---- opening ------------------------------------------------------------------- */

/* in (DER or PEM) as a ContentInfo of libctx holding an AuthEnvelopedData we accept. */
static p11kms_status parse(const uint8_t *in, size_t n, OSSL_LIB_CTX *libctx, CMS_ContentInfo **out)
{
    unsigned char *pem_der = NULL, *der = NULL;
    char *name = NULL, *header = NULL;
    const unsigned char *p, *end;
    long len = 0;
    int der_len;
    BIO *bio = NULL;
    CMS_ContentInfo *cms = NULL;
    p11kms_status st = P11KMS_OK;

    *out = NULL;
    if (n == 0 || n > CMS_INPUT_MAX)
        return kms_client_fail(P11KMS_ERR_MALFORMED, "CMS: the input is empty or too long");
    if (in[0] != 0x30) {
        if (!(bio = BIO_new_mem_buf(in, (int)n)))
            return ossl_fail(P11KMS_ERR_MEMORY, "out of memory");
        if (!PEM_read_bio(bio, &name, &header, &pem_der, &len) ||
            (strcmp(name, "CMS") != 0 && strcmp(name, "PKCS7") != 0)) {
            st = ossl_fail(P11KMS_ERR_MALFORMED, "not PEM \"CMS\" or \"PKCS7\"");
            goto cleanup;
        }
        p = pem_der;
    } else {
        p = in;
        len = (long)n;
    }
    if (!(cms = CMS_ContentInfo_new_ex(libctx, NULL))) {
        st = ossl_fail(P11KMS_ERR_MEMORY, "out of memory");
        goto cleanup;
    }
    end = p + len;
    if (!d2i_CMS_ContentInfo(&cms, &p, len) || p != end) {
        st = ossl_fail(P11KMS_ERR_MALFORMED, "not a CMS ContentInfo");
        goto cleanup;
    }
    if (OBJ_obj2nid(CMS_get0_type(cms)) != NID_id_smime_ct_authEnvelopedData) {
        st = kms_client_fail(P11KMS_ERR_MALFORMED,
                             "CMS: not AuthEnvelopedData (an EnvelopedData has no integrity)");
        goto cleanup;
    }
    /* OpenSSL's DER of what it parsed: what it will use, in definite lengths. */
    if ((der_len = i2d_CMS_ContentInfo(cms, &der)) <= 0) {
        st = ossl_fail(P11KMS_ERR_MALFORMED, "the ContentInfo does not encode");
        goto cleanup;
    }
    if ((st = check_structure(der, der_len)) != P11KMS_OK)
        goto cleanup;
    *out = cms;
    cms = NULL;
cleanup:
    CMS_ContentInfo_free(cms);
    OPENSSL_free(der);
    OPENSSL_free(pem_der);
    OPENSSL_free(name);
    OPENSSL_free(header);
    BIO_free(bio);
    return st;
}

/* What the opener holds, resolved as the recipients need it. */
struct keys {
    const struct p11kms_opener *o;
    EVP_PKEY *local;  /* o->private_key */
    int kms_resolved; /* o->key_id looked up (kms_* below), with this outcome: */
    p11kms_status kms_status;
    EVP_PKEY *kms; /* o->key_id's private half, through the service (cms_provider.c) */
    uint8_t kms_skid[20];
    char kms_arn[256]; /* o->key_id's ARN ("": not resolved) */
};

/* What the RecipientInfos tried came to, for the error when none opened. */
struct tally {
    int tried;          /* attempts with a key that could serve */
    p11kms_status last; /* the last one's failure */
    char last_why[256]; /* and its message */
    int unnamed;        /* a KTRI/KARI the client could try given a key_id */
    int rejected;       /* a RecipientInfo whose algorithm is not accepted */
    char rejected_why[160];
};

/* Records a failed attempt; the service's InvalidCiphertext (another key) is DECRYPT. */
static void tally_attempt(struct tally *t, p11kms_status st)
{
    t->tried++;
    t->last = st == P11KMS_ERR_INVALID_CIPHERTEXT || st == P11KMS_ERR_INCORRECT_KEY
                  ? P11KMS_ERR_DECRYPT
                  : st;
    snprintf(t->last_why, sizeof t->last_why, "%s", p11kms_last_error());
}

/* o->key_id's public half and ARN, once. */
static p11kms_status resolve_kms(struct keys *k)
{
    struct p11kms_public_key pk;
    const unsigned char *q;
    EVP_PKEY *pub = NULL;
    p11kms_status st;

    if (k->kms_resolved)
        return k->kms_status;
    k->kms_resolved = 1;
    if ((st = kms_client_public_key(k->o->client, k->o->key_id, &pk)) != P11KMS_OK)
        return k->kms_status = st;
    snprintf(k->kms_arn, sizeof k->kms_arn, "%s", pk.key_arn);
    if (pk.der) {
        q = pk.der;
        if (!(pub = d2i_PUBKEY(NULL, &q, (long)pk.der_len)))
            st = kms_client_fail(P11KMS_ERR_PROTOCOL,
                                 "GetPublicKey: PublicKey is not a SubjectPublicKeyInfo");
        else if ((st = kms_public_key_skid(pub, k->kms_skid)) == P11KMS_OK)
            st = kms_cms_kms_pkey(k->o->client, pk.key_arn, pub, &k->kms);
        EVP_PKEY_free(pub);
    }
    p11kms_public_key_clear(&pk);
    return k->kms_status = st;
}

/* 1 when keyid (a rid's SubjectKeyIdentifier; NULL: issuer and serial) may name skid. */
static int may_be(const ASN1_OCTET_STRING *keyid, const uint8_t skid[20])
{
    return !keyid ||
           (ASN1_STRING_length(keyid) == 20 && memcmp(ASN1_STRING_get0_data(keyid), skid, 20) == 0);
}

static int key_skid(EVP_PKEY *pkey, uint8_t skid[20])
{
    p11kms_status st = kms_public_key_skid(pkey, skid);
    return st == P11KMS_OK;
}

/* The provider's status for a failure in a service call, else DECRYPT. */
static p11kms_status attempt_failed(const char *what)
{
    p11kms_status st = kms_cms_provider_status();

    if (st != P11KMS_OK) {
        ERR_clear_error();
        return st; /* its message is the thread's last error already */
    }
    return ossl_fail(P11KMS_ERR_DECRYPT, what);
}

static p11kms_status ktri_with(CMS_ContentInfo *cms, CMS_RecipientInfo *ri, EVP_PKEY *pkey)
{
    int r;

    if (!EVP_PKEY_up_ref(pkey))
        return ossl_fail(P11KMS_ERR_MEMORY, "out of memory");
    CMS_RecipientInfo_set0_pkey(ri, pkey);
    kms_cms_provider_status(); /* reset */
    r = CMS_RecipientInfo_decrypt(cms, ri);
    CMS_RecipientInfo_set0_pkey(ri, NULL);
    return r > 0 ? P11KMS_OK : attempt_failed("the key transport did not open");
}

static p11kms_status ktri(CMS_ContentInfo *cms, CMS_RecipientInfo *ri, struct keys *k,
                          struct tally *t)
{
    ASN1_OCTET_STRING *keyid = NULL;
    X509_NAME *issuer = NULL;
    ASN1_INTEGER *serial = NULL;
    X509_ALGOR *alg = NULL;
    uint8_t skid[20];
    p11kms_status st;

    if (!CMS_RecipientInfo_ktri_get0_algs(ri, NULL, NULL, &alg) ||
        !CMS_RecipientInfo_ktri_get0_signer_id(ri, &keyid, &issuer, &serial))
        return ossl_fail(P11KMS_ERR_MALFORMED, "a KeyTransRecipientInfo does not read");
    if (OBJ_obj2nid(alg->algorithm) != NID_rsaesOaep) {
        t->rejected = 1;
        snprintf(t->rejected_why, sizeof t->rejected_why,
                 "CMS: a KeyTransRecipientInfo uses %s; only RSAES-OAEP is accepted",
                 OBJ_nid2sn(OBJ_obj2nid(alg->algorithm)));
        return P11KMS_ERR_DECRYPT;
    }
    if (k->local && EVP_PKEY_is_a(k->local, "RSA") && key_skid(k->local, skid) &&
        may_be(keyid, skid)) {
        if ((st = ktri_with(cms, ri, k->local)) == P11KMS_OK)
            return st;
        tally_attempt(t, st);
    }
    if (!k->o->client)
        return P11KMS_ERR_DECRYPT;
    if (!k->o->key_id) {
        t->unnamed = 1;
        return P11KMS_ERR_DECRYPT;
    }
    if ((st = resolve_kms(k)) != P11KMS_OK) {
        tally_attempt(t, st);
        return st;
    }
    if (!k->kms || !EVP_PKEY_is_a(k->kms, "RSA") || !may_be(keyid, k->kms_skid))
        return P11KMS_ERR_DECRYPT;
    if ((st = ktri_with(cms, ri, k->kms)) != P11KMS_OK)
        tally_attempt(t, st);
    return st;
}

static p11kms_status kari_with(CMS_ContentInfo *cms, CMS_RecipientInfo *ri,
                               CMS_RecipientEncryptedKey *rek, EVP_PKEY *pkey)
{
    kms_cms_provider_status(); /* reset */
    if (!CMS_RecipientInfo_kari_set0_pkey(ri, pkey))
        return attempt_failed("the key agreement does not take the key");
    if (CMS_RecipientInfo_kari_decrypt(cms, ri, rek) <= 0) {
        CMS_RecipientInfo_kari_set0_pkey(ri, NULL);
        return attempt_failed("the key agreement did not open");
    }
    return P11KMS_OK;
}

static p11kms_status kari(CMS_ContentInfo *cms, CMS_RecipientInfo *ri, struct keys *k,
                          struct tally *t)
{
    STACK_OF(CMS_RecipientEncryptedKey) *reks = CMS_RecipientInfo_kari_get0_reks(ri);
    CMS_RecipientEncryptedKey *rek;
    ASN1_OCTET_STRING *keyid;
    uint8_t skid[20];
    int i, have_local = k->local && EVP_PKEY_is_a(k->local, "EC") && key_skid(k->local, skid);
    p11kms_status st;

    for (i = 0; i < sk_CMS_RecipientEncryptedKey_num(reks); i++) {
        rek = sk_CMS_RecipientEncryptedKey_value(reks, i);
        if (!CMS_RecipientEncryptedKey_get0_id(rek, &keyid, NULL, NULL, NULL, NULL))
            continue;
        if (have_local && may_be(keyid, skid)) {
            if ((st = kari_with(cms, ri, rek, k->local)) == P11KMS_OK)
                return st;
            tally_attempt(t, st);
        }
        if (!k->o->client)
            continue;
        if (!k->o->key_id) {
            t->unnamed = 1;
            continue;
        }
        if ((st = resolve_kms(k)) != P11KMS_OK) {
            tally_attempt(t, st);
            return st;
        }
        if (!k->kms || !EVP_PKEY_is_a(k->kms, "EC") || !may_be(keyid, k->kms_skid))
            continue;
        if ((st = kari_with(cms, ri, rek, k->kms)) == P11KMS_OK)
            return st;
        tally_attempt(t, st);
    }
    return P11KMS_ERR_DECRYPT;
}

/* 1 when key_id (an id, ARN, alias or alias ARN) may be arn: the service decides aliases. */
static int key_id_names(struct keys *k, const char *arn, size_t arn_len)
{
    const char *id = k->o->key_id, *slash;

    if (!id)
        return 1;
    if (strncmp(id, "alias/", 6) == 0 || (strncmp(id, "arn:", 4) == 0 && strstr(id, ":alias/"))) {
        if (resolve_kms(k) != P11KMS_OK)
            return 0;
        id = k->kms_arn;
    }
    if (strlen(id) == arn_len && memcmp(id, arn, arn_len) == 0)
        return 1;
    slash = memchr(arn, '/', arn_len);
    return slash && strncmp(arn, "arn:", 4) == 0 &&
           strlen(id) == arn_len - (size_t)(slash + 1 - arn) &&
           memcmp(id, slash + 1, strlen(id)) == 0;
}

static p11kms_status kekri(CMS_ContentInfo *cms, CMS_RecipientInfo *ri, struct keys *k,
                           struct tally *t)
{
    X509_ALGOR *alg;
    ASN1_OCTET_STRING *id;
    ASN1_OBJECT *other_id, *ours = NULL;
    ASN1_TYPE *other;
    struct p11kms_data_key dk;
    p11kms_status st;
    int r;

    memset(&dk, 0, sizeof dk);
    if (!k->o->client)
        return P11KMS_ERR_DECRYPT;
    if (!CMS_RecipientInfo_kekri_get0_id(ri, &alg, &id, NULL, &other_id, &other))
        return ossl_fail(P11KMS_ERR_MALFORMED, "a KEKRecipientInfo does not read");
    if (!other_id || !other || other->type != V_ASN1_OCTET_STRING ||
        !(ours = OBJ_txt2obj(KMS_CMS_KEKRI_BLOB_OID, 1)) || OBJ_cmp(other_id, ours) != 0) {
        ASN1_OBJECT_free(ours);
        return P11KMS_ERR_DECRYPT; /* not a KMS key's */
    }
    ASN1_OBJECT_free(ours);
    if (OBJ_obj2nid(alg->algorithm) != NID_id_aes256_wrap) {
        t->rejected = 1;
        snprintf(t->rejected_why, sizeof t->rejected_why,
                 "CMS: a KEKRecipientInfo uses %s; only id-aes256-wrap is accepted",
                 OBJ_nid2sn(OBJ_obj2nid(alg->algorithm)));
        return P11KMS_ERR_DECRYPT;
    }
    if (!key_id_names(k, (const char *)ASN1_STRING_get0_data(id), (size_t)ASN1_STRING_length(id)))
        return P11KMS_ERR_DECRYPT;
    st = p11kms_decrypt_data_key(k->o->client, ASN1_STRING_get0_data(other->value.octet_string),
                                 (size_t)ASN1_STRING_length(other->value.octet_string), NULL, 0,
                                 &dk);
    if (st == P11KMS_OK && dk.plaintext_len != CMS_KEK_LEN)
        st = kms_client_fail(P11KMS_ERR_DECRYPT, "CMS: the KEK is not 32 bytes");
    if (st == P11KMS_OK) {
        CMS_RecipientInfo_set0_key(ri, dk.plaintext, dk.plaintext_len);
        r = CMS_RecipientInfo_decrypt(cms, ri);
        CMS_RecipientInfo_set0_key(ri, NULL, 0); /* dk holds the KEK */
        if (r <= 0)
            st = ossl_fail(P11KMS_ERR_DECRYPT, "the KEK does not unwrap the key");
    }
    p11kms_data_key_clear(&dk);
    if (st != P11KMS_OK)
        tally_attempt(t, st);
    return st;
}

/*
 * The content, under the content key a RecipientInfo gave, read into one
 * buffer (cap: the ciphertext's length, as GCM's plaintext has) that is
 * handed out only when the tag verifies and wiped otherwise.
 */
static p11kms_status read_content(const struct p11kms_opener *o, CMS_ContentInfo *cms,
                                  uint8_t **out, size_t *out_len)
{
    ASN1_OCTET_STRING **ct = CMS_get0_content(cms);
    size_t cap = ct && *ct ? (size_t)ASN1_STRING_length(*ct) : 0, got = 0;
    uint8_t *buf = kms_client_secret_alloc(o->client, cap + 1);
    BIO *cont = NULL;
    int r = 0;
    p11kms_status st = P11KMS_OK;

    if (!buf)
        return kms_client_fail(P11KMS_ERR_MEMORY, "CMS: out of memory for the payload");
    if (!(cont = CMS_dataInit(cms, NULL)) || BIO_method_type(cont) != BIO_TYPE_CIPHER) {
        st = ossl_fail(P11KMS_ERR_DECRYPT, "the content does not decrypt");
        goto cleanup;
    }
    while (got <= cap && (r = BIO_read(cont, buf + got, (int)(cap + 1 - got))) > 0)
        got += (size_t)r;
    if (got > cap || r < 0 || BIO_get_cipher_status(cont) <= 0) {
        st = ossl_fail(P11KMS_ERR_DECRYPT, "the content's tag does not verify");
        goto cleanup;
    }
    *out = buf;
    *out_len = got;
    buf = NULL;
cleanup:
    p11kms_free(buf, cap + 1);
    BIO_free_all(cont); /* the cipher context is wiped with it */
    return st;
}

p11kms_status kms_cms_open(const struct p11kms_opener *o, const uint8_t *in, size_t n,
                           uint8_t **out, size_t *out_len)
{
    STACK_OF(CMS_RecipientInfo) * ris;
    CMS_RecipientInfo *ri;
    CMS_ContentInfo *cms = NULL;
    struct keys k;
    struct tally t;
    int i, opened = 0;
    p11kms_status st;

    *out = NULL;
    *out_len = 0;
    memset(&k, 0, sizeof k);
    memset(&t, 0, sizeof t);
    k.o = o;
    if ((st = parse(in, n, o->client ? kms_cms_libctx() : NULL, &cms)) != P11KMS_OK)
        return st;
    if (o->private_key &&
        (st = kms_private_key_parse(o->private_key, o->private_key_len, &k.local)) != P11KMS_OK)
        goto cleanup;
    ris = CMS_get0_RecipientInfos(cms);
    for (i = 0; i < sk_CMS_RecipientInfo_num(ris) && !opened; i++) {
        ri = sk_CMS_RecipientInfo_value(ris, i);
        switch (CMS_RecipientInfo_type(ri)) {
        case CMS_RECIPINFO_TRANS: st = ktri(cms, ri, &k, &t); break;
        case CMS_RECIPINFO_AGREE: st = kari(cms, ri, &k, &t); break;
        case CMS_RECIPINFO_KEK: st = kekri(cms, ri, &k, &t); break;
        default: st = P11KMS_ERR_DECRYPT; break;
        }
        opened = st == P11KMS_OK;
        if (st == P11KMS_ERR_MALFORMED)
            goto cleanup;
    }
    if (opened)
        st = read_content(o, cms, out, out_len);
    else if (t.tried == 1) /* one recipient could be served: its failure as it is */
        st = kms_client_fail(t.last, "%s", t.last_why);
    else if (t.tried > 1)
        st = kms_client_fail(P11KMS_ERR_DECRYPT, "CMS: no recipient opened; the last: %s",
                             t.last_why);
    else if (t.unnamed)
        st = kms_client_fail(P11KMS_ERR_ARGUMENT, "CMS recipient names no KMS key: give key_id");
    else if (t.rejected)
        st = kms_client_fail(P11KMS_ERR_MALFORMED, "%s", t.rejected_why);
    else
        st = kms_client_fail(P11KMS_ERR_DECRYPT, "CMS: no recipient the opener can serve opened");
cleanup:
    EVP_PKEY_free(k.local);
    EVP_PKEY_free(k.kms);
    CMS_ContentInfo_free(cms);
    ERR_clear_error();
    return st;
}
