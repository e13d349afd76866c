/*
 * p11kms public API.
 *
 * The client library (libp11kms: signed calls, retries, the data-key cache and
 * JWE envelopes) is declared here as it lands; today this header carries the
 * version only.
 */
#ifndef P11KMS_H
#define P11KMS_H

#define P11KMS_VERSION_MAJOR 0
#define P11KMS_VERSION_MINOR 1
#define P11KMS_VERSION_PATCH 0
#define P11KMS_VERSION_STRING "0.1.0"

#endif
