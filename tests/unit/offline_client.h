/*
 * A libp11kms client that must not reach any service, for unit tests of the
 * library's argument checks: it points at a loopback port that was bound and
 * closed (nothing answers there), makes one attempt, and its breaker opens on
 * the first failed call. A check that let a request through shows as an open
 * breaker.
 */
#ifndef P11KMS_TEST_OFFLINE_CLIENT_H
#define P11KMS_TEST_OFFLINE_CLIENT_H

#include "p11kms.h"

/* A new client (the caller's, p11kms_client_free); fails the test when it cannot be made. */
p11kms_client *unreachable_client(void);
/* Asserts that c has sent nothing: its breaker is still closed. */
void assert_nothing_sent(p11kms_client *c);

#endif
