/*
 * Random bytes that are public once used (GCM IVs, request ids), from a
 * per-thread buffer filled by OpenSSL's RAND_bytes 512 bytes at a time:
 * one DRBG call (and its fork check, a getpid system call) per 512 bytes
 * instead of one per value. Never for keys or anything secret: unused bytes
 * wait in the buffer. A forked child starts with an empty buffer
 * (pthread_atfork), so parent and child never hand out the same bytes.
 */
#ifndef P11KMS_RANDOM_H
#define P11KMS_RANDOM_H

#include <stddef.h>

#include "common/error.h"

/* n <= 64. */
KMS_MUST_CHECK kms_err kms_random_public(void *out, size_t n);

#endif
