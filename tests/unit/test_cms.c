/*
 * Unit tests for src/client/cms.c with local keys (no service): CMS
 * AuthEnvelopedData sealed to RSA-2048, P-256 and P-384 keys, named by
 * certificate (self-signed here) or bare public key, opened with each private
 * key; the structure OpenSSL reads back (recipient types, identifiers,
 * algorithms); and refusals, each with its exact status and never any
 * plaintext: a bit flipped in the tag, the ciphertext or an encrypted key, a
 * tag cut to one byte (which OpenSSL 3.0 alone would accept), every
 * twentieth truncation, a wrong private key, an EnvelopedData (AES-CBC, no
 * integrity), a KTRI the client could open only given a key id.
 * tests/integration/test_cms_interop.py covers openssl cms and the service.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <openssl/cms.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"

static const uint8_t PAYLOAD[] = "AuthEnvelopedData payload: \x00\x01\x02 and some more text";
#define PAYLOAD_LEN (sizeof PAYLOAD - 1)

/* A key with its PEMs and a self-signed certificate. */
struct key {
    EVP_PKEY *pkey;
    char *priv_pem, *pub_pem, *cert_pem;
    size_t priv_len, pub_len, cert_len;
};

enum { KRSA, KP256, KP384, KRSA2, KP256B, NKEYS };
static struct key K[NKEYS];

static char *bio_text(BIO *b, size_t *len)
{
    char *p;
    long n = BIO_get_mem_data(b, &p);
    char *out = malloc((size_t)n + 1);

    assert_non_null(out);
    memcpy(out, p, (size_t)n);
    out[n] = '\0';
    *len = (size_t)n;
    BIO_free(b);
    return out;
}

static void make_key(struct key *k, const char *type, const char *arg, const char *cn)
{
    X509 *x = X509_new();
    X509_NAME *name = X509_NAME_new();
    BIO *b;

    k->pkey = strcmp(type, "RSA") == 0 ? EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048)
                                       : EVP_PKEY_Q_keygen(NULL, NULL, "EC", arg);
    assert_non_null(k->pkey);
    assert_true(
        X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0));
    assert_true(X509_set_version(x, X509_VERSION_3) &&
                ASN1_INTEGER_set(X509_get_serialNumber(x), 7) && X509_set_issuer_name(x, name) &&
                X509_set_subject_name(x, name) && X509_gmtime_adj(X509_getm_notBefore(x), 0) &&
                X509_gmtime_adj(X509_getm_notAfter(x), 3600) && X509_set_pubkey(x, k->pkey) &&
                X509_sign(x, k->pkey, EVP_sha256()));
    b = BIO_new(BIO_s_mem());
    assert_true(PEM_write_bio_PrivateKey(b, k->pkey, NULL, NULL, 0, NULL, NULL));
    k->priv_pem = bio_text(b, &k->priv_len);
    b = BIO_new(BIO_s_mem());
    assert_true(PEM_write_bio_PUBKEY(b, k->pkey));
    k->pub_pem = bio_text(b, &k->pub_len);
    b = BIO_new(BIO_s_mem());
    assert_true(PEM_write_bio_X509(b, x));
    k->cert_pem = bio_text(b, &k->cert_len);
    X509_NAME_free(name);
    X509_free(x);
}

static int setup(void **state)
{
    (void)state;
    make_key(&K[KRSA], "RSA", NULL, "rsa");
    make_key(&K[KP256], "EC", "P-256", "p256");
    make_key(&K[KP384], "EC", "P-384", "p384");
    make_key(&K[KRSA2], "RSA", NULL, "rsa2");
    make_key(&K[KP256B], "EC", "P-256", "p256b");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    for (int i = 0; i < NKEYS; i++) {
        EVP_PKEY_free(K[i].pkey);
        free(K[i].priv_pem);
        free(K[i].pub_pem);
        free(K[i].cert_pem);
    }
    return 0;
}

/* A recipient from key i's certificate (cert) or bare public key. */
static p11kms_recipient *recipient(int i, int cert)
{
    p11kms_recipient *r = NULL;

    assert_int_equal(
        p11kms_recipient_from_public((const uint8_t *)(cert ? K[i].cert_pem : K[i].pub_pem),
                                     cert ? K[i].cert_len : K[i].pub_len, NULL, &r),
        P11KMS_OK);
    return r;
}

/* Seals PAYLOAD (n bytes of it) to the recipients given as (key, cert) pairs, -1 ending. */
static void seal(size_t n, uint8_t **der, size_t *der_len, ...)
{
    p11kms_recipient *r[8];
    size_t nr = 0;
    va_list ap;
    int i;

    va_start(ap, der_len);
    while ((i = va_arg(ap, int)) >= 0)
        r[nr++] = recipient(i, va_arg(ap, int));
    va_end(ap);
    assert_int_equal(p11kms_envelope_seal(NULL, P11KMS_FORMAT_CMS, r, nr, PAYLOAD, n, der, der_len),
                     P11KMS_OK);
    assert_int_equal(p11kms_envelope_detect(*der, *der_len), P11KMS_FORMAT_CMS);
    while (nr)
        p11kms_recipient_free(r[--nr]);
}

/* Opens with key i's private key: the status; on P11KMS_OK the payload is checked to be want. */
static p11kms_status open_with(int i, const uint8_t *in, size_t n, size_t want)
{
    struct p11kms_opener o;
    uint8_t *out = (uint8_t *)"x";
    size_t out_len = 1;
    p11kms_status st;

    memset(&o, 0, sizeof o);
    o.private_key = (const uint8_t *)K[i].priv_pem;
    o.private_key_len = K[i].priv_len;
    st = p11kms_envelope_open(&o, in, n, &out, &out_len);
    if (st == P11KMS_OK) {
        assert_int_equal(out_len, want);
        assert_memory_equal(out, PAYLOAD, want);
        p11kms_free(out, out_len);
    } else {
        assert_null(out);
        assert_int_equal(out_len, 0);
    }
    return st;
}

/* ---- round trips --------------------------------------------------------------- */

static void test_round_trips(void **state)
{
    static const int cases[][2] = {{KRSA, 1},  {KRSA, 0},  {KP256, 1},
                                   {KP256, 0}, {KP384, 1}, {KP384, 0}};
    uint8_t *der;
    size_t der_len, sizes[] = {0, 1, PAYLOAD_LEN};

    (void)state;
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
        for (size_t s = 0; s < 3; s++) {
            seal(sizes[s], &der, &der_len, cases[c][0], cases[c][1], -1);
            assert_int_equal(open_with(cases[c][0], der, der_len, sizes[s]), P11KMS_OK);
            p11kms_free(der, der_len);
        }
}

static void test_seal_bounds(void **state)
{
    p11kms_recipient *r = recipient(KRSA, 1);
    uint8_t *der = NULL;
    size_t der_len = 0;

    (void)state;
    /* the payload bound is checked before the payload is read */
    assert_int_equal(p11kms_envelope_seal(NULL, P11KMS_FORMAT_CMS, &r, 1, PAYLOAD,
                                          KMS_ENVELOPE_MAX_PAYLOAD + 1, &der, &der_len),
                     P11KMS_ERR_ARGUMENT);
    assert_null(der);
    assert_int_equal(
        p11kms_envelope_seal(NULL, P11KMS_FORMAT_CMS, &r, 0, PAYLOAD, PAYLOAD_LEN, &der, &der_len),
        P11KMS_ERR_ARGUMENT);
    assert_null(der);
    p11kms_recipient_free(r);
}

/* One recipient sealed to from several threads at once (its key-only certificate is made once). */
struct sealer {
    p11kms_recipient *r;
    int key, failures;
};

static void *seal_many(void *arg)
{
    struct sealer *s = arg;
    uint8_t *der;
    size_t der_len;

    for (int i = 0; i < 20; i++) {
        if (p11kms_envelope_seal(NULL, P11KMS_FORMAT_CMS, &s->r, 1, PAYLOAD, PAYLOAD_LEN, &der,
                                 &der_len) != P11KMS_OK) {
            s->failures++;
            continue;
        }
        if (open_with(s->key, der, der_len, PAYLOAD_LEN) != P11KMS_OK)
            s->failures++;
        p11kms_free(der, der_len);
    }
    return NULL;
}

static void test_shared_recipient(void **state)
{
    static const int keys[] = {KRSA, KP256};
    pthread_t th[4];
    struct sealer s[4];
    EVP_PKEY *copy;

    (void)state;
    for (size_t k = 0; k < 2; k++) {
        p11kms_recipient *r = recipient(keys[k], 0);
        for (int i = 0; i < 4; i++) {
            s[i] = (struct sealer){.r = r, .key = keys[k], .failures = 0};
            assert_int_equal(pthread_create(&th[i], NULL, seal_many, &s[i]), 0);
        }
        for (int i = 0; i < 4; i++) {
            assert_int_equal(pthread_join(th[i], NULL), 0);
            assert_int_equal(s[i].failures, 0);
        }
        /* a copy of the key shares the certificate; each frees its reference */
        assert_non_null(copy = EVP_PKEY_dup(r->pkey));
        p11kms_recipient_free(r);
        EVP_PKEY_free(copy);
    }
}

static void test_mixed_recipients(void **state)
{
    uint8_t *der;
    size_t der_len;

    (void)state;
    seal(PAYLOAD_LEN, &der, &der_len, KRSA, 1, KP256, 0, KP384, 1, -1);
    assert_int_equal(open_with(KRSA, der, der_len, PAYLOAD_LEN), P11KMS_OK);
    assert_int_equal(open_with(KP256, der, der_len, PAYLOAD_LEN), P11KMS_OK);
    assert_int_equal(open_with(KP384, der, der_len, PAYLOAD_LEN), P11KMS_OK);
    /* keys that are not recipients, of each kind */
    assert_int_equal(open_with(KRSA2, der, der_len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(KP256B, der, der_len, 0), P11KMS_ERR_DECRYPT);
    p11kms_free(der, der_len);
}

/* What OpenSSL reads back: types, identifiers and algorithms. */
static void test_structure(void **state)
{
    const unsigned char *p;
    uint8_t *der, skid[20];
    size_t der_len;
    CMS_ContentInfo *cms;
    STACK_OF(CMS_RecipientInfo) * ris;
    CMS_RecipientInfo *ri;
    ASN1_OCTET_STRING *keyid = NULL;
    X509_NAME *issuer = NULL;
    ASN1_INTEGER *serial = NULL;
    X509_ALGOR *alg, *kdf;
    ASN1_OCTET_STRING *ukm;
    CMS_RecipientEncryptedKey *rek;

    (void)state;
    seal(PAYLOAD_LEN, &der, &der_len, KRSA, 1, KRSA, 0, KP256, 0, -1);
    p = der;
    assert_non_null(cms = d2i_CMS_ContentInfo(NULL, &p, (long)der_len));
    assert_int_equal(OBJ_obj2nid(CMS_get0_type(cms)), NID_id_smime_ct_authEnvelopedData);
    ris = CMS_get0_RecipientInfos(cms);
    assert_int_equal(sk_CMS_RecipientInfo_num(ris), 3);

    ri = sk_CMS_RecipientInfo_value(ris, 0); /* by certificate: issuer and serial */
    assert_int_equal(CMS_RecipientInfo_type(ri), CMS_RECIPINFO_TRANS);
    assert_true(CMS_RecipientInfo_ktri_get0_signer_id(ri, &keyid, &issuer, &serial));
    assert_null(keyid);
    assert_non_null(issuer);
    assert_int_equal(ASN1_INTEGER_get(serial), 7);
    assert_true(CMS_RecipientInfo_ktri_get0_algs(ri, NULL, NULL, &alg));
    assert_int_equal(OBJ_obj2nid(alg->algorithm), NID_rsaesOaep);

    ri = sk_CMS_RecipientInfo_value(ris, 1); /* bare key: its RFC 5280 key identifier */
    assert_true(CMS_RecipientInfo_ktri_get0_signer_id(ri, &keyid, &issuer, &serial));
    assert_non_null(keyid);
    assert_int_equal(kms_public_key_skid(K[KRSA].pkey, skid), P11KMS_OK);
    assert_int_equal(ASN1_STRING_length(keyid), 20);
    assert_memory_equal(ASN1_STRING_get0_data(keyid), skid, 20);

    ri = sk_CMS_RecipientInfo_value(ris, 2); /* EC: KARI, SHA-256 KDF, AES-256 wrap */
    assert_int_equal(CMS_RecipientInfo_type(ri), CMS_RECIPINFO_AGREE);
    assert_true(CMS_RecipientInfo_kari_get0_alg(ri, &kdf, &ukm));
    assert_int_equal(OBJ_obj2nid(kdf->algorithm), NID_dhSinglePass_stdDH_sha256kdf_scheme);
    assert_int_equal(kdf->parameter->type, V_ASN1_SEQUENCE);
    p = kdf->parameter->value.sequence->data;
    assert_non_null(alg = d2i_X509_ALGOR(NULL, &p, kdf->parameter->value.sequence->length));
    assert_int_equal(OBJ_obj2nid(alg->algorithm), NID_id_aes256_wrap);
    X509_ALGOR_free(alg);
    rek = sk_CMS_RecipientEncryptedKey_value(CMS_RecipientInfo_kari_get0_reks(ri), 0);
    assert_true(CMS_RecipientEncryptedKey_get0_id(rek, &keyid, NULL, NULL, NULL, NULL));
    assert_int_equal(kms_public_key_skid(K[KP256].pkey, skid), P11KMS_OK);
    assert_memory_equal(ASN1_STRING_get0_data(keyid), skid, 20);
    CMS_ContentInfo_free(cms);
    p11kms_free(der, der_len);
}

static void test_pem(void **state)
{
    uint8_t *der;
    size_t der_len, pem_len;
    BIO *b = BIO_new(BIO_s_mem());
    char *pem, *label;

    (void)state;
    seal(PAYLOAD_LEN, &der, &der_len, KP384, 0, -1);
    assert_true(PEM_write_bio(b, "CMS", "", der, (long)der_len));
    pem = bio_text(b, &pem_len);
    assert_int_equal(p11kms_envelope_detect((uint8_t *)pem, pem_len), P11KMS_FORMAT_CMS);
    assert_int_equal(open_with(KP384, (uint8_t *)pem, pem_len, PAYLOAD_LEN), P11KMS_OK);
    /* the same under the PKCS7 label: "-----BEGIN CMS" -> "-----BEGIN PKCS7" needs room */
    label = malloc(pem_len + 16);
    assert_non_null(label);
    {
        char *begin = strstr(pem, "-----BEGIN CMS-----"), *end = strstr(pem, "-----END CMS-----");
        assert_non_null(begin);
        assert_non_null(end);
        int n = snprintf(label, pem_len + 16, "-----BEGIN PKCS7-----%.*s-----END PKCS7-----\n",
                         (int)(end - begin - 19), begin + 19);
        assert_int_equal(open_with(KP384, (uint8_t *)label, (size_t)n, PAYLOAD_LEN), P11KMS_OK);
    }
    /* another label is not CMS */
    memcpy(strstr(pem, "BEGIN CMS"), "BEGIN XYZ", 9);
    assert_int_equal(open_with(KP384, (uint8_t *)pem, pem_len, 0), P11KMS_ERR_MALFORMED);
    free(label);
    free(pem);
    p11kms_free(der, der_len);
}

/* ---- refusals ------------------------------------------------------------------ */

static uint8_t *dup_bytes(const uint8_t *p, size_t n)
{
    uint8_t *q = malloc(n ? n : 1);

    assert_non_null(q);
    memcpy(q, p, n);
    return q;
}

/* Where needle (n bytes) starts in hay, which must hold it once. */
static size_t find(const uint8_t *hay, size_t hay_len, const uint8_t *needle, size_t n)
{
    size_t at = SIZE_MAX;

    for (size_t i = 0; i + n <= hay_len; i++)
        if (memcmp(hay + i, needle, n) == 0) {
            assert_int_equal(at, SIZE_MAX);
            at = i;
        }
    assert_int_not_equal(at, SIZE_MAX);
    return at;
}

static void test_flipped_bits(void **state)
{
    static const uint8_t rsa_ek[] = {0x04, 0x82, 0x01, 0x00}; /* OCTET STRING, 256 bytes */
    const unsigned char *p;
    uint8_t *der, *bad;
    size_t der_len, at;
    CMS_ContentInfo *cms;
    ASN1_OCTET_STRING **ct;

    (void)state;
    seal(PAYLOAD_LEN, &der, &der_len, KRSA, 0, KP256, 1, -1);
    bad = dup_bytes(der, der_len);

    /* the tag: the AuthEnvelopedData's last member here */
    bad[der_len - 3] ^= 0x20;
    assert_int_equal(open_with(KRSA, bad, der_len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(KP256, bad, der_len, 0), P11KMS_ERR_DECRYPT);
    bad[der_len - 3] ^= 0x20;

    /* the ciphertext */
    p = der;
    assert_non_null(cms = d2i_CMS_ContentInfo(NULL, &p, (long)der_len));
    ct = CMS_get0_content(cms);
    assert_true(ct && *ct && ASN1_STRING_length(*ct) == (int)PAYLOAD_LEN);
    at = find(der, der_len, ASN1_STRING_get0_data(*ct), PAYLOAD_LEN);
    CMS_ContentInfo_free(cms);
    bad[at + 5] ^= 0x01;
    assert_int_equal(open_with(KRSA, bad, der_len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(KP256, bad, der_len, 0), P11KMS_ERR_DECRYPT);
    bad[at + 5] ^= 0x01;

    /* the RSA recipient's encrypted key: RSA cannot open, P-256 still can */
    at = find(der, der_len, rsa_ek, sizeof rsa_ek);
    bad[at + 4 + 100] ^= 0x80;
    assert_int_equal(open_with(KRSA, bad, der_len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(KP256, bad, der_len, PAYLOAD_LEN), P11KMS_OK);
    bad[at + 4 + 100] ^= 0x80;

    /* every 7th bit anywhere: refused or, where it does not matter, the payload */
    for (size_t bit = 0; bit < der_len * 8; bit += 7) {
        bad[bit / 8] ^= (uint8_t)(1u << (bit % 8));
        p11kms_status st = open_with(KRSA, bad, der_len, PAYLOAD_LEN);
        assert_true(st == P11KMS_OK || st == P11KMS_ERR_MALFORMED || st == P11KMS_ERR_DECRYPT);
        bad[bit / 8] ^= (uint8_t)(1u << (bit % 8));
    }
    free(bad);
    p11kms_free(der, der_len);
}

/* Writes a two-byte DER length (the 0x82 form) at p. */
static void set_len(uint8_t *p, size_t len)
{
    assert_int_equal(p[1], 0x82);
    p[2] = (uint8_t)(len >> 8);
    p[3] = (uint8_t)len;
}

/* OpenSSL 3.0 checks a tag of any length from 1 byte: cms.c must not. */
static void test_short_tag(void **state)
{
    uint8_t *der, *bad;
    size_t der_len, cut = 15;

    (void)state;
    seal(PAYLOAD_LEN, &der, &der_len, KRSA, 1, -1);
    /* ContentInfo { OID (13 bytes), [0] { AuthEnvelopedData { ..., mac OCTET STRING(16) } } } */
    assert_true(der_len > 300 && der_len < 65536);
    assert_int_equal(der[0], 0x30);
    assert_int_equal(der[17], 0xa0);
    assert_int_equal(der[21], 0x30);
    assert_int_equal(der[der_len - 18], 0x04);
    assert_int_equal(der[der_len - 17], 16);
    bad = dup_bytes(der, der_len);
    bad[der_len - 17] = 1; /* keep the tag's first byte only */
    set_len(bad, der_len - 4 - cut);
    set_len(bad + 17, der_len - 21 - cut);
    set_len(bad + 21, der_len - 25 - cut);
    assert_int_equal(open_with(KRSA, bad, der_len - cut, 0), P11KMS_ERR_MALFORMED);
    free(bad);
    p11kms_free(der, der_len);
}

static void test_truncations(void **state)
{
    uint8_t *der, *bad;
    size_t der_len;

    (void)state;
    seal(PAYLOAD_LEN, &der, &der_len, KRSA, 1, KP256, 0, -1);
    for (size_t i = 0; i < 20; i++) {
        size_t n = der_len * i / 20;
        bad = dup_bytes(der, n);
        p11kms_status st = open_with(KRSA, bad, n, 0);
        assert_true(st == P11KMS_ERR_MALFORMED || (n == 0 && st == P11KMS_ERR_ARGUMENT));
        free(bad);
    }
    bad = dup_bytes(der, der_len - 1);
    assert_int_equal(open_with(KP256, bad, der_len - 1, 0), P11KMS_ERR_MALFORMED);
    free(bad);
    p11kms_free(der, der_len);
}

static void test_wrong_key(void **state)
{
    uint8_t *der;
    size_t der_len;

    (void)state;
    seal(PAYLOAD_LEN, &der, &der_len, KRSA, 0, -1);
    assert_int_equal(open_with(KRSA2, der, der_len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(KP256, der, der_len, 0), P11KMS_ERR_DECRYPT);
    p11kms_free(der, der_len);
    seal(PAYLOAD_LEN, &der, &der_len, KP256, 1, -1);
    assert_int_equal(open_with(KP256B, der, der_len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(KP384, der, der_len, 0), P11KMS_ERR_DECRYPT);
    assert_int_equal(open_with(KRSA, der, der_len, 0), P11KMS_ERR_DECRYPT);
    p11kms_free(der, der_len);
}

/* An EnvelopedData with AES-256-CBC (no integrity) and other content types. */
static void test_not_auth_enveloped(void **state)
{
    const unsigned char *p;
    STACK_OF(X509) *certs = sk_X509_new_null();
    BIO *b = BIO_new_mem_buf(K[KRSA].cert_pem, (int)K[KRSA].cert_len);
    BIO *in = BIO_new_mem_buf(PAYLOAD, (int)PAYLOAD_LEN);
    X509 *x = PEM_read_bio_X509(b, NULL, NULL, NULL);
    CMS_ContentInfo *cms;
    unsigned char *der = NULL;
    int der_len;

    (void)state;
    assert_non_null(x);
    sk_X509_push(certs, x);
    assert_non_null(cms = CMS_encrypt(certs, in, EVP_aes_256_cbc(), CMS_BINARY));
    assert_true((der_len = i2d_CMS_ContentInfo(cms, &der)) > 0);
    assert_int_equal(open_with(KRSA, der, (size_t)der_len, 0), P11KMS_ERR_MALFORMED);
    OPENSSL_free(der);
    der = NULL;
    CMS_ContentInfo_free(cms);
    /* a plain Data ContentInfo */
    BIO_free(in);
    in = BIO_new_mem_buf(PAYLOAD, (int)PAYLOAD_LEN);
    assert_non_null(cms = CMS_data_create(in, CMS_BINARY));
    assert_true((der_len = i2d_CMS_ContentInfo(cms, &der)) > 0);
    assert_int_equal(open_with(KRSA, der, (size_t)der_len, 0), P11KMS_ERR_MALFORMED);
    /* not even DER */
    p = (const unsigned char *)"\x30\x03\x02\x01";
    assert_int_equal(open_with(KRSA, p, 4, 0), P11KMS_ERR_MALFORMED);
    OPENSSL_free(der);
    CMS_ContentInfo_free(cms);
    sk_X509_pop_free(certs, X509_free);
    BIO_free(in);
    BIO_free(b);
}

/* A client opener without key_id cannot guess which KMS key opens a KTRI. */
static void test_client_without_key_id(void **state)
{
    struct p11kms_options opt;
    struct p11kms_opener o;
    p11kms_client *c = NULL;
    uint8_t *der, *out = NULL;
    size_t der_len, out_len = 0;

    (void)state;
    p11kms_options_init(&opt);
    opt.endpoint = "http://127.0.0.1:9";
    opt.region = "us-east-1";
    opt.access_key_id = "AKIAEXAMPLEEXAMPLE00";
    opt.secret_access_key = "secret";
    opt.max_attempts = 1;
    assert_int_equal(p11kms_client_new(&opt, &c), P11KMS_OK);
    seal(PAYLOAD_LEN, &der, &der_len, KRSA, 1, -1);
    memset(&o, 0, sizeof o);
    o.client = c;
    assert_int_equal(p11kms_envelope_open(&o, der, der_len, &out, &out_len), P11KMS_ERR_ARGUMENT);
    assert_non_null(strstr(p11kms_last_error(), "give key_id"));
    assert_null(out);
    /* with the private key as well, it opens locally */
    o.private_key = (const uint8_t *)K[KRSA].priv_pem;
    o.private_key_len = K[KRSA].priv_len;
    assert_int_equal(p11kms_envelope_open(&o, der, der_len, &out, &out_len), P11KMS_OK);
    assert_int_equal(out_len, PAYLOAD_LEN);
    assert_memory_equal(out, PAYLOAD, PAYLOAD_LEN);
    p11kms_free(out, out_len);
    p11kms_free(der, der_len);
    p11kms_client_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trips),        cmocka_unit_test(test_seal_bounds),
        cmocka_unit_test(test_mixed_recipients),   cmocka_unit_test(test_shared_recipient),
        cmocka_unit_test(test_structure),          cmocka_unit_test(test_pem),
        cmocka_unit_test(test_flipped_bits),       cmocka_unit_test(test_short_tag),
        cmocka_unit_test(test_truncations),        cmocka_unit_test(test_wrong_key),
        cmocka_unit_test(test_not_auth_enveloped), cmocka_unit_test(test_client_without_key_id),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
