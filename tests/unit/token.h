/*
 * A throw-away SoftHSM2 token for unit tests that need a real one: made in a
 * fresh temporary folder (SOFTHSM2_CONF pointing there for this process,
 * kms_hsm_init_token, as p11kmsd --dev does) and removed after the test.
 */
#ifndef P11KMS_TEST_TOKEN_H
#define P11KMS_TEST_TOKEN_H

#include <stddef.h>

#include "common/error.h"
#include "hsm/hsm.h"

#define TEST_TOKEN_LABEL "p11kms-unit"
#define TEST_TOKEN_SO_PIN "unit-so-pin-0000"
#define TEST_TOKEN_USER_PIN "unit-user-pin-0000"

/* The SoftHSM2 module: $SOFTHSM_MODULE, else the one configure found. */
const char *test_token_module(void);
/* Makes the folder (its name into dir) and the token; 0 on success. */
int test_token_make(char *dir, size_t n);
/* Opens the token made by test_token_make, with a pool of two sessions. */
kms_err test_token_open(struct kms_hsm **out);
/* Removes the folder and everything in it. */
void test_token_remove(const char *dir);

#endif
