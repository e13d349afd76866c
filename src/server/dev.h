/* Development mode: a SoftHSM2 token, PINs, a principal and a key in one state folder. */
#ifndef P11KMS_DEV_H
#define P11KMS_DEV_H

#include "server/server.h"

#define KMS_DEV_TOKEN_LABEL "p11kms-dev"
#define KMS_DEV_ALIAS "alias/dev"
#define KMS_DEV_LISTEN "127.0.0.1:4599"

/*
 * Makes (first start) or reuses the state in dir: softhsm2.conf, an
 * initialised token with random SO and user PINs in 0600 files, and a
 * credentials file with one random principal. Fills cfg to use them and
 * points SoftHSM2 at the folder's configuration.
 */
KMS_MUST_CHECK kms_err kms_dev_prepare(const char *dir, struct kms_config *cfg);
/* Creates the development key and its alias when the token has none. */
KMS_MUST_CHECK kms_err kms_dev_ensure_key(struct kms_server *srv);
/* Writes dir/env: export lines for the aws CLI and SDKs. */
KMS_MUST_CHECK kms_err kms_dev_write_env(const char *dir, struct kms_server *srv);

/* Writes a file readable by its owner only, replacing it atomically. */
KMS_MUST_CHECK kms_err kms_write_private_file(const char *path, const char *text);

#endif
