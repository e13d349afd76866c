/*
 * HTTPS through libmicrohttpd's GnuTLS: TLS 1.3 only unless configured to
 * allow 1.2, the certificate and key from files, and client certificates
 * checked against a CA, optionally bound to principals.
 */
#ifndef P11KMS_TLS_H
#define P11KMS_TLS_H

#include "server/settings.h"

struct MHD_Connection;

struct kms_tls {
    char *cert; /* PEM */
    char *key;  /* PEM, secret: cleansed on free */
    size_t key_len;
    char *ca; /* PEM, or NULL */
    char priorities[96];
    int client_cert; /* KMS_CLIENT_CERT_* */
};

/* Reads the files the configuration names; *out is NULL when TLS is off. */
KMS_MUST_CHECK kms_err kms_tls_load(const struct kms_config *cfg, struct kms_tls **out);
void kms_tls_free(struct kms_tls *t);

/*
 * The client certificate of a connection: KMS_OK with its SHA-256
 * fingerprint (hex, lower case) when it presented one the CA vouches for, ""
 * when it presented none and none is required; KMS_ERR_ACCESS_DENIED
 * otherwise.
 */
KMS_MUST_CHECK kms_err kms_tls_client(const struct kms_tls *t, struct MHD_Connection *c,
                                      char fingerprint[65]);

#endif
