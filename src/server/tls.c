#include "config.h"

#include "server/tls.h"

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>
#include <microhttpd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/encoding.h"
#include "common/log.h"

void kms_tls_free(struct kms_tls *t)
{
    if (!t)
        return;
    free(t->cert);
    if (t->key)
        kms_free_secret(t->key, t->key_len + 1);
    free(t->ca);
    free(t);
}

static kms_err read_public(const char *path, char **out)
{
    size_t len = 0;
    char *text = NULL;
    FILE *f = fopen(path, "rb");
    KMS_ENSURE(f != NULL, KMS_ERR_VALIDATION, "cannot read %s", path);
    text = malloc(1u << 20);
    if (text)
        len = fread(text, 1, (1u << 20) - 1, f);
    fclose(f);
    KMS_ENSURE(text != NULL, KMS_ERR_INTERNAL, "out of memory");
    text[len] = '\0';
    if (len == 0 || !strstr(text, "-----BEGIN CERTIFICATE-----")) {
        free(text);
        return KMS_FAIL(KMS_ERR_VALIDATION, "%s holds no PEM certificate", path);
    }
    *out = text;
    return KMS_OK;
}

kms_err kms_tls_load(const struct kms_config *cfg, struct kms_tls **out)
{
    *out = NULL;
    if (!cfg->tls_cert_file)
        return KMS_OK;
    struct kms_tls *t = calloc(1, sizeof *t);
    KMS_ENSURE(t != NULL, KMS_ERR_INTERNAL, "out of memory");
    kms_err rc = read_public(cfg->tls_cert_file, &t->cert);
    if (rc == KMS_OK)
        rc = kms_read_secret_file(cfg->tls_key_file, &t->key, &t->key_len);
    if (rc == KMS_OK && !strstr(t->key, "PRIVATE KEY-----"))
        rc = KMS_FAIL(KMS_ERR_VALIDATION, "%s holds no PEM private key", cfg->tls_key_file);
    if (rc == KMS_OK && cfg->tls_client_ca_file)
        rc = read_public(cfg->tls_client_ca_file, &t->ca);
    if (rc != KMS_OK) {
        kms_tls_free(t);
        return rc;
    }
    /* GnuTLS's NORMAL suites, with only the protocol versions allowed. */
    snprintf(t->priorities, sizeof t->priorities, "NORMAL:-VERS-ALL:+VERS-TLS1.3%s",
             cfg->tls_min_version == 12 ? ":+VERS-TLS1.2" : "");
    t->client_cert = cfg->tls_client_cert >= 0 ? cfg->tls_client_cert
                     : t->ca                   ? KMS_CLIENT_CERT_REQUIRE
                                               : KMS_CLIENT_CERT_NONE;
    *out = t;
    return KMS_OK;
}

kms_err kms_tls_client(const struct kms_tls *t, struct MHD_Connection *c, char fingerprint[65])
{
    const union MHD_ConnectionInfo *info;
    gnutls_session_t session;
    const gnutls_datum_t *chain;
    unsigned n = 0, status = 0;
    uint8_t digest[32];
    size_t digest_len = sizeof digest;

    fingerprint[0] = '\0';
    if (!t || t->client_cert == KMS_CLIENT_CERT_NONE)
        return KMS_OK;
    info = MHD_get_connection_info(c, MHD_CONNECTION_INFO_GNUTLS_SESSION);
    KMS_ENSURE(info && info->tls_session, KMS_ERR_ACCESS_DENIED, "The connection is not TLS");
    session = (gnutls_session_t)info->tls_session;
    chain = gnutls_certificate_get_peers(session, &n);
    if (!chain || n == 0) {
        KMS_ENSURE(t->client_cert != KMS_CLIENT_CERT_REQUIRE, KMS_ERR_ACCESS_DENIED,
                   "A client certificate is required");
        return KMS_OK;
    }
    /* As OpenSSL's purpose check: an Extended Key Usage, where there is one, must allow
       clientAuth (a server's certificate is no client's); none at all is fine. */
    gnutls_typed_vdata_st purpose = {GNUTLS_DT_KEY_PURPOSE_OID,
                                     (unsigned char *)GNUTLS_KP_TLS_WWW_CLIENT, 0};
    KMS_ENSURE(gnutls_certificate_verify_peers(session, &purpose, 1, &status) == GNUTLS_E_SUCCESS,
               KMS_ERR_ACCESS_DENIED, "The client certificate is not trusted");
    KMS_ENSURE(!(status & GNUTLS_CERT_PURPOSE_MISMATCH), KMS_ERR_ACCESS_DENIED,
               "The client certificate's Extended Key Usage does not allow client "
               "authentication");
    KMS_ENSURE(status == 0, KMS_ERR_ACCESS_DENIED, "The client certificate is not trusted");
    KMS_ENSURE(gnutls_fingerprint(GNUTLS_DIG_SHA256, &chain[0], digest, &digest_len) ==
                       GNUTLS_E_SUCCESS &&
                   digest_len == sizeof digest,
               KMS_ERR_INTERNAL, "cannot take the client certificate's fingerprint");
    kms_hex_encode(digest, sizeof digest, fingerprint);
    return KMS_OK;
}
