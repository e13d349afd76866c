/* p11kmsd --check-config FILE: a configuration checked without serving it. */
#ifndef P11KMS_CHECKCONF_H
#define P11KMS_CHECKCONF_H

/*
 * Parses path, then checks what the server would use: the settings' values
 * and agreement, the files (modes of those that hold secrets, the TLS
 * certificate and key, the credentials, the policies), the token (log-in
 * with the PIN, the root keys), the database (opened as it is, schema
 * version) and the listen address. Every problem is printed on stderr as
 * "FILE:LINE: message" (no line when no one line is to blame); nothing is
 * made or changed. Returns the exit status: 0 none, 1 some.
 */
int kms_check_config(const char *path);

#endif
