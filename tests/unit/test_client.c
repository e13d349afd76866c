/*
 * Unit tests for the client's own parts: src/client/client.c (status names,
 * AWS error types to statuses, where the endpoint, region and credentials
 * come from, the canonical context), src/client/transport.c (full-jitter
 * backoff with an injected random source, the circuit breaker with an
 * injected clock, fail-fast against a closed port) and the SigV4 signer in
 * src/common/sigv4.c, checked against the server's own verification steps
 * (src/server/auth.c does exactly parse, canonical request, string to sign,
 * signing key, signature) and against AWS's published post-vanilla vector
 * (aws-sig-v4-test-suite; its Authorization header is also in
 * aws/aws-sdk-js-v3 packages/signature-v4/src/suite.fixture.ts).
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "client/internal.h"
#include "common/blob.h"
#include "common/error.h"
#include "common/sigv4.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* ---- status names and AWS error types ---------------------------------------- */

static void test_status_names(void **state)
{
    (void)state;
    for (int s = 0; s < P11KMS_STATUS_COUNT; s++) {
        const char *name = p11kms_status_name((p11kms_status)s);
        assert_non_null(name);
        assert_true(strlen(name) > 0);
        assert_string_not_equal(name, "Unknown");
        for (int t = 0; t < s; t++)
            assert_string_not_equal(name, p11kms_status_name((p11kms_status)t));
        /* one status per AWS error type: those names are the types */
        if ((s >= P11KMS_ERR_VALIDATION && s < P11KMS_ERR_SERVICE) ||
            s >= P11KMS_ERR_BAD_SIGNATURE) {
            size_t n = strlen(name);
            assert_true(n > 9 && strcmp(name + n - 9, "Exception") == 0);
        }
    }
    assert_string_equal(p11kms_status_name(P11KMS_OK), "OK");
    assert_string_equal(p11kms_status_name(P11KMS_ERR_CIRCUIT_OPEN), "CircuitOpen");
    assert_string_equal(p11kms_status_name(P11KMS_ERR_TRANSPORT), "TransportError");
    assert_string_equal(p11kms_status_name(P11KMS_ERR_NOT_FOUND), "NotFoundException");
    assert_string_equal(p11kms_status_name(P11KMS_ERR_BAD_SIGNATURE),
                        "KMSInvalidSignatureException");
    assert_string_equal(p11kms_status_name(P11KMS_ERR_BAD_MAC), "KMSInvalidMacException");
    /* appended: the numbers applications compiled against stay */
    assert_int_equal(P11KMS_ERR_SERVICE, 35);
    assert_int_equal(P11KMS_ERR_BAD_SIGNATURE, 36);
    assert_int_equal(P11KMS_ERR_BAD_MAC, 37);
    assert_int_equal(P11KMS_ERR_INVALID_GRANT_ID, 38);
    assert_int_equal(P11KMS_ERR_INVALID_GRANT_TOKEN, 39);
    assert_int_equal(P11KMS_ERR_TAG, 40);
    assert_int_equal(P11KMS_ERR_INVALID_MARKER, 41);
    assert_string_equal(p11kms_status_name(P11KMS_STATUS_COUNT), "Unknown");
    assert_string_equal(p11kms_status_name((p11kms_status)-1), "Unknown");
    assert_string_equal(p11kms_status_name((p11kms_status)1000), "Unknown");
}

/* What each error the server can raise (src/common/error.c's table) must map to. */
static const p11kms_status expected_status[KMS_ERR_COUNT] = {
    [KMS_ERR_VALIDATION] = P11KMS_ERR_VALIDATION,
    [KMS_ERR_SERIALIZATION] = P11KMS_ERR_SERIALIZATION,
    [KMS_ERR_NOT_FOUND] = P11KMS_ERR_NOT_FOUND,
    [KMS_ERR_ALREADY_EXISTS] = P11KMS_ERR_ALREADY_EXISTS,
    [KMS_ERR_DISABLED] = P11KMS_ERR_DISABLED,
    [KMS_ERR_INVALID_STATE] = P11KMS_ERR_INVALID_STATE,
    [KMS_ERR_INVALID_CIPHERTEXT] = P11KMS_ERR_INVALID_CIPHERTEXT,
    [KMS_ERR_INCORRECT_KEY] = P11KMS_ERR_INCORRECT_KEY,
    [KMS_ERR_INVALID_ALIAS] = P11KMS_ERR_INVALID_ALIAS,
    [KMS_ERR_INVALID_ARN] = P11KMS_ERR_INVALID_ARN,
    [KMS_ERR_MALFORMED_POLICY] = P11KMS_ERR_MALFORMED_POLICY,
    [KMS_ERR_INVALID_KEY_USAGE] = P11KMS_ERR_INVALID_KEY_USAGE,
    [KMS_ERR_LIMIT_EXCEEDED] = P11KMS_ERR_LIMIT_EXCEEDED,
    [KMS_ERR_UNSUPPORTED] = P11KMS_ERR_UNSUPPORTED,
    [KMS_ERR_UNKNOWN_OPERATION] = P11KMS_ERR_UNKNOWN_OPERATION,
    [KMS_ERR_ACCESS_DENIED] = P11KMS_ERR_ACCESS_DENIED,
    [KMS_ERR_MISSING_AUTH] = P11KMS_ERR_MISSING_AUTH,
    [KMS_ERR_INCOMPLETE_SIGNATURE] = P11KMS_ERR_INCOMPLETE_SIGNATURE,
    [KMS_ERR_INVALID_SIGNATURE] = P11KMS_ERR_INVALID_SIGNATURE,
    [KMS_ERR_UNRECOGNIZED_CLIENT] = P11KMS_ERR_UNRECOGNIZED_CLIENT,
    [KMS_ERR_TOO_LARGE] = P11KMS_ERR_VALIDATION, /* 413 ValidationException */
    [KMS_ERR_THROTTLED] = P11KMS_ERR_THROTTLED,
    [KMS_ERR_INTERNAL] = P11KMS_ERR_INTERNAL,
    [KMS_ERR_KEY_UNAVAILABLE] = P11KMS_ERR_KEY_UNAVAILABLE,
    [KMS_ERR_DEPENDENCY_TIMEOUT] = P11KMS_ERR_DEPENDENCY_TIMEOUT,
    [KMS_ERR_BAD_SIGNATURE] = P11KMS_ERR_BAD_SIGNATURE,
    [KMS_ERR_BAD_MAC] = P11KMS_ERR_BAD_MAC,
    [KMS_ERR_INVALID_GRANT_ID] = P11KMS_ERR_INVALID_GRANT_ID,
    [KMS_ERR_INVALID_GRANT_TOKEN] = P11KMS_ERR_INVALID_GRANT_TOKEN,
    /* ---- tags and paging ---- */
    [KMS_ERR_TAG] = P11KMS_ERR_TAG,
    [KMS_ERR_INVALID_MARKER] = P11KMS_ERR_INVALID_MARKER,
};

static void test_every_server_type_maps(void **state)
{
    (void)state;
    for (int e = 1; e < KMS_ERR_COUNT; e++) {
        /* a new server error without a line above fails here */
        assert_int_not_equal(expected_status[e], P11KMS_OK);
        assert_int_equal(kms_client_status_of_type(kms_err_type((kms_err)e)), expected_status[e]);
    }
}

static void test_every_service_status_round_trips(void **state)
{
    (void)state;
    for (int s = P11KMS_ERR_VALIDATION; s < P11KMS_ERR_SERVICE; s++)
        assert_int_equal(kms_client_status_of_type(p11kms_status_name((p11kms_status)s)), s);
    for (int s = P11KMS_ERR_BAD_SIGNATURE; s < P11KMS_STATUS_COUNT; s++)
        assert_int_equal(kms_client_status_of_type(p11kms_status_name((p11kms_status)s)), s);
}

static void test_type_forms(void **state)
{
    (void)state;
    assert_int_equal(kms_client_status_of_type("com.amazonaws.kms#NotFoundException"),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_client_status_of_type(
                         "ThrottlingException:http://internal.amazon.com/coral/com.amazon.coral/"),
                     P11KMS_ERR_THROTTLED);
    assert_int_equal(kms_client_status_of_type("KMSInvalidStateException"),
                     P11KMS_ERR_INVALID_STATE);
    /* Verify's "no" is not SigV4's, though the names differ only by the prefix */
    assert_int_equal(kms_client_status_of_type("com.amazonaws.kms#KMSInvalidSignatureException"),
                     P11KMS_ERR_BAD_SIGNATURE);
    assert_int_equal(kms_client_status_of_type("InvalidSignatureException"),
                     P11KMS_ERR_INVALID_SIGNATURE);
    assert_int_equal(kms_client_status_of_type("KMSInvalidMacException:http://internal/"),
                     P11KMS_ERR_BAD_MAC);
    /* unknown types, near misses, and the library's own names are not the service's */
    const char *others[] = {"",
                            "Bogus",
                            "NotFound",
                            "NotFoundExceptionX",
                            "notfoundexception",
                            "CircuitOpen",
                            "TransportError",
                            "OK",
                            "ServiceError",
                            "InvalidMacException",
                            "com.amazonaws.kms#"};
    for (size_t i = 0; i < N_ELEMS(others); i++)
        assert_int_equal(kms_client_status_of_type(others[i]), P11KMS_ERR_SERVICE);
    assert_int_equal(kms_client_status_of_type(NULL), P11KMS_ERR_SERVICE);
}

static void *other_thread_fails(void *arg)
{
    (void)arg;
    if (p11kms_last_error()[0] != '\0')
        return (void *)1; /* a new thread starts with no message */
    kms_client_fail(P11KMS_ERR_TRANSPORT, "the other thread's failure");
    return strcmp(p11kms_last_error(), "the other thread's failure") == 0 ? NULL : (void *)1;
}

static void test_last_error_is_per_thread_and_fail_returns_status(void **state)
{
    pthread_t t;
    void *rc = (void *)1;
    (void)state;
    assert_int_equal(kms_client_fail(P11KMS_ERR_CONFIG, "no %s", "endpoint"), P11KMS_ERR_CONFIG);
    assert_string_equal(p11kms_last_error(), "no endpoint");
    assert_int_equal(pthread_create(&t, NULL, other_thread_fails, NULL), 0);
    assert_int_equal(pthread_join(t, &rc), 0);
    assert_null(rc);
    assert_string_equal(p11kms_last_error(), "no endpoint");
    /* long messages are cut, not overrun */
    char big[2000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    kms_client_fail(P11KMS_ERR_SERVICE, "%s", big);
    assert_true(strlen(p11kms_last_error()) < sizeof big - 1);
}

/* ---- backoff with full jitter ------------------------------------------------- */

struct fixed_rnd {
    uint64_t value;
};

static uint64_t fixed(void *arg)
{
    return ((struct fixed_rnd *)arg)->value;
}

static uint64_t xorshift(void *arg)
{
    uint64_t *s = arg;
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

static void test_backoff_bounds(void **state)
{
    /* base 50, cap 2000: ceilings 100, 200, 400, 800, 1600, then 2000 */
    const uint64_t ceilings[] = {0, 100, 200, 400, 800, 1600, 2000, 2000, 2000};
    (void)state;
    for (unsigned retry = 1; retry < N_ELEMS(ceilings); retry++) {
        uint64_t ceiling = ceilings[retry], seed = 0x9e3779b97f4a7c15u + retry;
        struct fixed_rnd r = {0};
        int low = 0, high = 0;
        /* full jitter: 0 is possible, and the ceiling itself */
        assert_int_equal(kms_backoff_ms(retry, 50, 2000, 0, fixed, &r), 0);
        r.value = ceiling;
        assert_int_equal(kms_backoff_ms(retry, 50, 2000, 0, fixed, &r), ceiling);
        r.value = ceiling + 1;
        assert_int_equal(kms_backoff_ms(retry, 50, 2000, 0, fixed, &r), 0);
        r.value = 7 * (ceiling + 1) + ceiling;
        assert_int_equal(kms_backoff_ms(retry, 50, 2000, 0, fixed, &r), ceiling);
        r.value = UINT64_MAX;
        assert_true(kms_backoff_ms(retry, 50, 2000, 0, fixed, &r) <= ceiling);
        /* spread over the whole range, never above it */
        for (int i = 0; i < 10000; i++) {
            uint64_t w = kms_backoff_ms(retry, 50, 2000, 0, xorshift, &seed);
            assert_true(w <= ceiling);
            low += w < ceiling / 4;
            high += w > ceiling - ceiling / 4;
        }
        assert_true(low > 1000 && high > 1000);
    }
}

static void test_backoff_no_overflow(void **state)
{
    struct fixed_rnd r = {UINT64_MAX - 1};
    const unsigned retries[] = {31, 32, 33, 63, 64, 1000, UINT32_MAX};
    (void)state;
    for (size_t i = 0; i < N_ELEMS(retries); i++) {
        r.value = 2000;
        assert_int_equal(kms_backoff_ms(retries[i], 50, 2000, 0, fixed, &r), 2000);
        r.value = UINT32_MAX;
        assert_true(kms_backoff_ms(retries[i], UINT32_MAX, UINT32_MAX, 0, fixed, &r) <= UINT32_MAX);
    }
}

static void test_backoff_retry_after(void **state)
{
    struct fixed_rnd r = {0};
    (void)state;
    /* honoured as a floor ... */
    assert_int_equal(kms_backoff_ms(1, 50, 2000, 1000, fixed, &r), 1000);
    /* ... up to the cap */
    assert_int_equal(kms_backoff_ms(1, 50, 2000, 5000, fixed, &r), 2000);
    assert_int_equal(kms_backoff_ms(1, 50, 2000, 2000, fixed, &r), 2000);
    /* a jittered wait above it stands */
    r.value = 100;
    assert_int_equal(kms_backoff_ms(1, 50, 2000, 10, fixed, &r), 100);
    /* 0: no Retry-After */
    r.value = 0;
    assert_int_equal(kms_backoff_ms(1, 50, 2000, 0, fixed, &r), 0);
}

/* ---- the circuit breaker, with the clock in hand -------------------------------- */

static void fail_calls(struct kms_breaker *b, unsigned n, uint64_t now)
{
    for (unsigned i = 0; i < n; i++) {
        struct kms_breaker_ticket t;
        assert_int_equal(kms_breaker_admit_locked(b, now, &t), 1);
        assert_int_equal(t.probe, 0);
        kms_breaker_record_locked(b, &t, KMS_BREAKER_FAILURE, now);
    }
}

static void test_breaker_opens_after_exactly_threshold(void **state)
{
    const unsigned thresholds[] = {1, 2, 3, 5, 10};
    (void)state;
    for (size_t i = 0; i < N_ELEMS(thresholds); i++) {
        struct kms_breaker b;
        struct kms_breaker_ticket t;
        kms_breaker_init(&b, thresholds[i], 1000);
        fail_calls(&b, thresholds[i] - 1, 0);
        assert_int_equal(b.state, KMS_BREAKER_CLOSED);
        fail_calls(&b, 1, 0);
        assert_int_equal(b.state, KMS_BREAKER_OPEN);
        assert_int_equal(kms_breaker_admit_locked(&b, 0, &t), 0);
    }
}

static void test_breaker_counts_consecutive_failures_only(void **state)
{
    struct kms_breaker b;
    struct kms_breaker_ticket t;
    (void)state;
    kms_breaker_init(&b, 3, 1000);
    fail_calls(&b, 2, 0);
    /* a client error (4xx) is an answer: the service works, the count restarts */
    assert_int_equal(kms_breaker_admit_locked(&b, 0, &t), 1);
    kms_breaker_record_locked(&b, &t, KMS_BREAKER_SUCCESS, 0);
    fail_calls(&b, 2, 0);
    assert_int_equal(b.state, KMS_BREAKER_CLOSED);
    /* a local error says nothing either way */
    assert_int_equal(kms_breaker_admit_locked(&b, 0, &t), 1);
    kms_breaker_record_locked(&b, &t, KMS_BREAKER_NONE, 0);
    assert_int_equal(b.state, KMS_BREAKER_CLOSED);
    assert_int_equal(b.failures, 2);
    fail_calls(&b, 1, 0);
    assert_int_equal(b.state, KMS_BREAKER_OPEN);
}

static void test_breaker_fails_fast_then_one_probe(void **state)
{
    struct kms_breaker b;
    struct kms_breaker_ticket probe, t;
    (void)state;
    kms_breaker_init(&b, 2, 1000);
    fail_calls(&b, 2, 5000); /* opens at 5000 */
    for (uint64_t now = 5000; now < 6000; now += 111)
        assert_int_equal(kms_breaker_admit_locked(&b, now, &t), 0);
    assert_int_equal(kms_breaker_admit_locked(&b, 5999, &t), 0);
    assert_int_equal(b.state, KMS_BREAKER_OPEN);
    /* the cool-down is over: exactly one call goes, as the probe */
    assert_int_equal(kms_breaker_admit_locked(&b, 6000, &probe), 1);
    assert_int_equal(probe.probe, 1);
    assert_int_equal(b.state, KMS_BREAKER_HALF_OPEN);
    for (int i = 0; i < 10; i++)
        assert_int_equal(kms_breaker_admit_locked(&b, 6000 + (uint64_t)i * 1000, &t), 0);
    /* the probe fails: open again for a whole cool-down from now */
    kms_breaker_record_locked(&b, &probe, KMS_BREAKER_FAILURE, 7000);
    assert_int_equal(b.state, KMS_BREAKER_OPEN);
    assert_int_equal(kms_breaker_admit_locked(&b, 7999, &t), 0);
    assert_int_equal(kms_breaker_admit_locked(&b, 8000, &probe), 1);
    assert_int_equal(probe.probe, 1);
    assert_int_equal(kms_breaker_admit_locked(&b, 8000, &t), 0);
    /* the probe succeeds: closed, and every call goes */
    kms_breaker_record_locked(&b, &probe, KMS_BREAKER_SUCCESS, 8100);
    assert_int_equal(b.state, KMS_BREAKER_CLOSED);
    assert_int_equal(b.failures, 0);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(kms_breaker_admit_locked(&b, 8100, &t), 1);
        assert_int_equal(t.probe, 0);
    }
    /* and it takes the threshold again to open it */
    fail_calls(&b, 1, 8200);
    assert_int_equal(b.state, KMS_BREAKER_CLOSED);
    fail_calls(&b, 1, 8200);
    assert_int_equal(b.state, KMS_BREAKER_OPEN);
}

static void test_breaker_probe_that_learned_nothing(void **state)
{
    struct kms_breaker b;
    struct kms_breaker_ticket probe, t;
    (void)state;
    kms_breaker_init(&b, 1, 1000);
    fail_calls(&b, 1, 0);
    assert_int_equal(kms_breaker_admit_locked(&b, 1000, &probe), 1);
    /* e.g. out of memory before sending: the next call may probe at once */
    kms_breaker_record_locked(&b, &probe, KMS_BREAKER_NONE, 1500);
    assert_int_equal(b.state, KMS_BREAKER_OPEN);
    assert_int_equal(kms_breaker_admit_locked(&b, 1500, &t), 1);
    assert_int_equal(t.probe, 1);
}

static void test_breaker_ignores_calls_from_before_a_change(void **state)
{
    struct kms_breaker b;
    struct kms_breaker_ticket early[3], probe;
    (void)state;
    kms_breaker_init(&b, 2, 1000);
    for (int i = 0; i < 3; i++)
        assert_int_equal(kms_breaker_admit_locked(&b, 0, &early[i]), 1);
    kms_breaker_record_locked(&b, &early[0], KMS_BREAKER_FAILURE, 10);
    kms_breaker_record_locked(&b, &early[1], KMS_BREAKER_FAILURE, 10);
    assert_int_equal(b.state, KMS_BREAKER_OPEN);
    /* a call let in while closed ends late with success: it does not close the breaker */
    kms_breaker_record_locked(&b, &early[2], KMS_BREAKER_SUCCESS, 20);
    assert_int_equal(b.state, KMS_BREAKER_OPEN);
    assert_int_equal(kms_breaker_admit_locked(&b, 1010, &probe), 1);
    /* nor, once half-open, does a late failure re-open it over the probe's head */
    kms_breaker_record_locked(&b, &early[2], KMS_BREAKER_FAILURE, 1020);
    assert_int_equal(b.state, KMS_BREAKER_HALF_OPEN);
    kms_breaker_record_locked(&b, &probe, KMS_BREAKER_SUCCESS, 1030);
    assert_int_equal(b.state, KMS_BREAKER_CLOSED);
    /* nor does a stale failure count towards the next opening */
    kms_breaker_record_locked(&b, &early[0], KMS_BREAKER_FAILURE, 1040);
    assert_int_equal(b.failures, 0);
}

static void test_breaker_threshold_zero_is_one(void **state)
{
    struct kms_breaker b;
    (void)state;
    kms_breaker_init(&b, 0, 10);
    fail_calls(&b, 1, 0);
    assert_int_equal(b.state, KMS_BREAKER_OPEN);
}

/* ---- options and the environment --------------------------------------------------- */

static const char *const env_names[] = {
    "P11KMS_ENDPOINT",   "AWS_ENDPOINT_URL",      "AWS_REGION",        "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
};

static int clear_env(void **state)
{
    (void)state;
    for (size_t i = 0; i < N_ELEMS(env_names); i++)
        unsetenv(env_names[i]);
    return 0;
}

static p11kms_client *make(const struct p11kms_options *o)
{
    p11kms_client *c = NULL;
    p11kms_status st = p11kms_client_new(o, &c);
    if (st != P11KMS_OK)
        fail_msg("p11kms_client_new: %s: %s", p11kms_status_name(st), p11kms_last_error());
    return c;
}

static void expect_status(const struct p11kms_options *o, p11kms_status want)
{
    p11kms_client *c = (p11kms_client *)0x1;
    assert_int_equal(p11kms_client_new(o, &c), want);
    assert_null(c);
    assert_true(strlen(p11kms_last_error()) > 0);
}

static void test_endpoint_order(void **state)
{
    struct p11kms_options o;
    p11kms_client *c;
    (void)state;
    p11kms_options_init(&o);
    setenv("AWS_ACCESS_KEY_ID", "AKIDENV", 1);
    setenv("AWS_SECRET_ACCESS_KEY", "envsecret", 1);

    expect_status(&o, P11KMS_ERR_CONFIG); /* none at all */
    setenv("AWS_ENDPOINT_URL", "http://aws-endpoint.test:8001", 1);
    c = make(&o);
    assert_string_equal(c->endpoint, "http://aws-endpoint.test:8001");
    p11kms_client_free(c);

    setenv("P11KMS_ENDPOINT", "http://p11kms-endpoint.test:8002", 1);
    c = make(&o);
    assert_string_equal(c->endpoint, "http://p11kms-endpoint.test:8002");
    p11kms_client_free(c);

    o.endpoint = "https://option.test";
    c = make(&o);
    assert_string_equal(c->endpoint, "https://option.test");
    assert_string_equal(c->opt.endpoint, "https://option.test");
    p11kms_client_free(c);

    /* set but empty counts as unset */
    o.endpoint = NULL;
    setenv("P11KMS_ENDPOINT", "", 1);
    c = make(&o);
    assert_string_equal(c->endpoint, "http://aws-endpoint.test:8001");
    p11kms_client_free(c);
}

static void test_region_order(void **state)
{
    struct p11kms_options o;
    p11kms_client *c;
    (void)state;
    p11kms_options_init(&o);
    o.endpoint = "http://127.0.0.1:1";
    o.access_key_id = "AKID";
    o.secret_access_key = "secret";

    c = make(&o);
    assert_string_equal(c->region, "us-east-1");
    p11kms_client_free(c);
    setenv("AWS_DEFAULT_REGION", "eu-west-3", 1);
    c = make(&o);
    assert_string_equal(c->region, "eu-west-3");
    p11kms_client_free(c);
    setenv("AWS_REGION", "ap-south-1", 1);
    c = make(&o);
    assert_string_equal(c->region, "ap-south-1");
    p11kms_client_free(c);
    o.region = "sa-east-1";
    c = make(&o);
    assert_string_equal(c->region, "sa-east-1");
    assert_string_equal(c->opt.region, "sa-east-1");
    p11kms_client_free(c);
}

static void test_credentials_order(void **state)
{
    struct p11kms_options o;
    p11kms_client *c;
    (void)state;
    p11kms_options_init(&o);
    o.endpoint = "http://127.0.0.1:1";

    expect_status(&o, P11KMS_ERR_CONFIG); /* none */
    setenv("AWS_ACCESS_KEY_ID", "AKIDENV", 1);
    expect_status(&o, P11KMS_ERR_CONFIG); /* an id without its secret */
    setenv("AWS_SECRET_ACCESS_KEY", "envsecret", 1);
    c = make(&o);
    assert_string_equal(c->access_key_id, "AKIDENV");
    assert_string_equal(c->secret_access_key, "envsecret");
    assert_null(c->session_token);
    p11kms_client_free(c);

    setenv("AWS_SESSION_TOKEN", "envtoken", 1);
    c = make(&o);
    assert_string_equal(c->session_token, "envtoken");
    assert_string_equal(c->opt.session_token, "envtoken");
    p11kms_client_free(c);

    /* the options win, as a whole: the environment's token does not join them */
    o.access_key_id = "AKIDOPT";
    o.secret_access_key = "optsecret";
    c = make(&o);
    assert_string_equal(c->access_key_id, "AKIDOPT");
    assert_string_equal(c->secret_access_key, "optsecret");
    assert_null(c->session_token);
    p11kms_client_free(c);
    o.session_token = "opttoken";
    c = make(&o);
    assert_string_equal(c->session_token, "opttoken");
    p11kms_client_free(c);

    /* half a pair in the options is refused, not completed from the environment */
    o.secret_access_key = NULL;
    expect_status(&o, P11KMS_ERR_CONFIG);
    o.access_key_id = NULL;
    o.secret_access_key = "optsecret";
    expect_status(&o, P11KMS_ERR_CONFIG);
}

static void test_options_refused(void **state)
{
    struct p11kms_options o;
    (void)state;
    p11kms_options_init(&o);
    o.access_key_id = "AKID";
    o.secret_access_key = "secret";
    const char *bad_endpoints[] = {"ftp://host",
                                   "host:443",
                                   "http://",
                                   "http://host/?a=b",
                                   "http://u:p@host/",
                                   "http://host/#frag",
                                   "file:///etc/passwd",
                                   ""};
    for (size_t i = 0; i < N_ELEMS(bad_endpoints); i++) {
        o.endpoint = bad_endpoints[i];
        expect_status(&o, P11KMS_ERR_CONFIG);
    }
    o.endpoint = "https://127.0.0.1:1";
    o.ca_file = "/nonexistent/ca.pem";
    expect_status(&o, P11KMS_ERR_CONFIG);
    o.ca_file = NULL;
    o.client_key_file = "/dev/null";
    expect_status(&o, P11KMS_ERR_CONFIG); /* a key without a certificate */
    o.client_key_file = NULL;
    o.max_attempts = 21;
    expect_status(&o, P11KMS_ERR_CONFIG);
    o.max_attempts = 0;
    o.require_locked_memory = 1; /* the cache is off: nothing locks the keys */
    expect_status(&o, P11KMS_ERR_MEMORY_LOCK);
    assert_int_equal(p11kms_client_new(&o, NULL), P11KMS_ERR_ARGUMENT);
}

static void test_defaults(void **state)
{
    struct p11kms_options o;
    p11kms_client *c;
    (void)state;
    p11kms_options_init(&o);
    o.endpoint = "http://127.0.0.1:1";
    o.access_key_id = "AKID";
    o.secret_access_key = "secret";
    c = make(&o);
    assert_int_equal(c->opt.connect_timeout_ms, 5000);
    assert_int_equal(c->opt.timeout_ms, 10000);
    assert_int_equal(c->opt.max_attempts, 4);
    assert_int_equal(c->opt.retry_base_ms, 50);
    assert_int_equal(c->opt.retry_cap_ms, 2000);
    assert_int_equal(c->opt.retry_budget_ms, 15000);
    assert_int_equal(c->opt.breaker_threshold, 5);
    assert_int_equal(c->opt.breaker_cooldown_ms, 5000);
    assert_null(c->cache);
    assert_int_equal(p11kms_client_memory_locked(c), 0);
    assert_int_equal(kms_transport_breaker_state(c->transport), KMS_BREAKER_CLOSED);
    p11kms_client_free(c);
    p11kms_client_free(NULL);
    assert_int_equal(p11kms_client_memory_locked(NULL), 0);
}

/* ---- the transport against a closed port: retries, breaker, fail fast ---------------- */

/* A loopback port nothing listens on: bound, then closed. */
static unsigned closed_port(void)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static double mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static void test_unreachable_opens_breaker(void **state)
{
    struct p11kms_options o;
    struct p11kms_data_key dk;
    char endpoint[64];
    p11kms_client *c;
    double t0;
    (void)state;
    snprintf(endpoint, sizeof endpoint, "http://127.0.0.1:%u", closed_port());
    p11kms_options_init(&o);
    o.endpoint = endpoint;
    o.access_key_id = "AKID";
    o.secret_access_key = "secret";
    o.max_attempts = 3;
    o.retry_base_ms = 1;
    o.retry_cap_ms = 5;
    o.breaker_threshold = 2;
    o.breaker_cooldown_ms = 60000;
    c = make(&o);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(p11kms_generate_data_key(c, "alias/x", NULL, 0, &dk),
                         P11KMS_ERR_TRANSPORT);
        assert_non_null(strstr(p11kms_last_error(), "(3 attempts)"));
        assert_null(dk.plaintext);
    }
    assert_int_equal(kms_transport_breaker_state(c->transport), KMS_BREAKER_OPEN);
    for (int i = 0; i < 100; i++) {
        t0 = mono_ms();
        assert_int_equal(p11kms_generate_data_key(c, "alias/x", NULL, 0, &dk),
                         P11KMS_ERR_CIRCUIT_OPEN);
        assert_true(mono_ms() - t0 < 50);
    }
    assert_non_null(strstr(p11kms_last_error(), "circuit breaker is open"));
    p11kms_client_free(c);
}

static void test_retry_budget_bounds_a_call(void **state)
{
    struct p11kms_options o;
    struct p11kms_data_key dk;
    char endpoint[64];
    p11kms_client *c;
    double t0, took;
    (void)state;
    snprintf(endpoint, sizeof endpoint, "http://127.0.0.1:%u", closed_port());
    p11kms_options_init(&o);
    o.endpoint = endpoint;
    o.access_key_id = "AKID";
    o.secret_access_key = "secret";
    o.max_attempts = 20;
    o.retry_base_ms = 40;
    o.retry_cap_ms = 40;
    o.retry_budget_ms = 200;
    c = make(&o);
    t0 = mono_ms();
    assert_int_equal(p11kms_generate_data_key(c, "alias/x", NULL, 0, &dk), P11KMS_ERR_TRANSPORT);
    took = mono_ms() - t0;
    /* waits of at most 40 ms, none started past 200 ms: well under 20 x 40 */
    assert_true(took < 400);
    p11kms_client_free(c);
}

static void test_arguments_refused(void **state)
{
    struct p11kms_options o;
    struct p11kms_data_key dk;
    const uint8_t blob[8] = {1};
    const struct p11kms_context dup[] = {{"a", "1"}, {"a", "2"}};
    const struct p11kms_context null_value[] = {{"a", NULL}};
    p11kms_client *c;
    (void)state;
    p11kms_options_init(&o);
    o.endpoint = "http://127.0.0.1:1";
    o.access_key_id = "AKID";
    o.secret_access_key = "secret";
    c = make(&o);
    assert_int_equal(p11kms_generate_data_key(NULL, "k", NULL, 0, &dk), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key(c, NULL, NULL, 0, &dk), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key(c, "", NULL, 0, &dk), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key(c, "k", NULL, 1, &dk), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key(c, "k", dup, 2, &dk), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key(c, "k", null_value, 1, &dk), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_generate_data_key(c, "k", NULL, 0, NULL), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_decrypt_data_key(c, NULL, 8, NULL, 0, &dk), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_decrypt_data_key(c, blob, 0, NULL, 0, &dk), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_decrypt_data_key(c, blob, 6145, NULL, 0, &dk), P11KMS_ERR_ARGUMENT);
    assert_int_equal(p11kms_decrypt_data_key(c, blob, 8, dup, 2, &dk), P11KMS_ERR_ARGUMENT);
    /* none of these reached the service, so the breaker saw nothing */
    assert_int_equal(kms_transport_breaker_state(c->transport), KMS_BREAKER_CLOSED);
    p11kms_client_free(c);
    p11kms_data_key_clear(NULL);
    p11kms_free(NULL, 10);
}

/* ---- contexts ---------------------------------------------------------------------- */

static void test_canonical_is_the_servers(void **state)
{
    const struct p11kms_context ctx[] = {{"tenant", "t-1"}, {"purpose", "x"}, {"a", ""}};
    struct kms_context_pair pairs[3];
    struct kms_buf server = KMS_BUF_INIT;
    uint8_t *canon;
    size_t len;
    (void)state;
    for (size_t i = 0; i < 3; i++)
        pairs[i] = (struct kms_context_pair){ctx[i].key, strlen(ctx[i].key), ctx[i].value,
                                             strlen(ctx[i].value)};
    assert_int_equal(kms_context_canonical(pairs, 3, &server), KMS_OK);
    assert_int_equal(kms_client_canonical(ctx, 3, &canon, &len), P11KMS_OK);
    assert_int_equal(len, server.len);
    assert_memory_equal(canon, server.data, len);
    free(canon);
    kms_buf_free(&server);

    assert_int_equal(kms_client_canonical(NULL, 0, &canon, &len), P11KMS_OK);
    assert_int_equal(len, 4);
    assert_memory_equal(canon, "\0\0\0\0", 4);
    free(canon);

    const struct p11kms_context dup[] = {{"a", "1"}, {"a", "2"}};
    assert_int_equal(kms_client_canonical(dup, 2, &canon, &len), P11KMS_ERR_ARGUMENT);
    assert_null(canon);
    const struct p11kms_context null_key[] = {{NULL, "1"}};
    assert_int_equal(kms_client_canonical(null_key, 1, &canon, &len), P11KMS_ERR_ARGUMENT);
    assert_int_equal(kms_client_canonical(NULL, 1, &canon, &len), P11KMS_ERR_ARGUMENT);
}

/* ---- SigV4: the client's signature through the server's verification ---------------- */

#define SUITE_SECRET "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"

static void test_sign_post_vanilla(void **state)
{
    /* aws-sig-v4-test-suite post-vanilla: POST / with Host and X-Amz-Date only */
    const struct kms_header hdrs[] = {{"Host", "example.amazonaws.com"},
                                      {"X-Amz-Date", "20150830T123600Z"}};
    struct kms_sigv4_request req = {"POST", "/", NULL, 0, hdrs, 2, "", 0};
    struct kms_buf authz = KMS_BUF_INIT;
    (void)state;
    assert_int_equal(kms_sigv4_sign(&req, "AKIDEXAMPLE", SUITE_SECRET, "us-east-1", "service",
                                    "20150830T123600Z", &authz),
                     KMS_OK);
    assert_string_equal(
        (const char *)authz.data,
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/"
        "aws4_request, SignedHeaders=host;x-amz-date, "
        "Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b");
    kms_buf_free(&authz);
}

/* The server's steps (src/server/auth.c) on a signed request; 1 when it verifies. */
static int server_verifies(const char *authz, const struct kms_header *hdrs, size_t n,
                           const char *amz_date, const char *body, const char *secret)
{
    struct kms_sigv4_auth auth;
    struct kms_buf creq = KMS_BUF_INIT, sts = KMS_BUF_INIT;
    char payload_hash[KMS_SHA256_HEX_LEN + 1], signature[KMS_SHA256_HEX_LEN + 1];
    uint8_t key[KMS_SHA256_LEN];
    int ok;

    assert_int_equal(kms_sigv4_parse_auth(authz, &auth), KMS_OK);
    assert_int_equal(kms_sha256_hex(body, strlen(body), payload_hash), KMS_OK);
    assert_int_equal(kms_sigv4_canonical_request("POST", "/", NULL, 0, hdrs, n, auth.signed_headers,
                                                 auth.signed_headers_len, payload_hash, &creq),
                     KMS_OK);
    assert_int_equal(kms_sigv4_string_to_sign(amz_date, auth.scope, auth.scope_len, &creq, &sts),
                     KMS_OK);
    assert_int_equal(kms_sigv4_signing_key(secret, auth.date, auth.date_len, auth.region,
                                           auth.region_len, auth.service, auth.service_len, key),
                     KMS_OK);
    assert_int_equal(kms_sigv4_signature(key, &sts, signature), KMS_OK);
    ok = auth.signature_len == KMS_SHA256_HEX_LEN &&
         CRYPTO_memcmp(signature, auth.signature, KMS_SHA256_HEX_LEN) == 0;
    OPENSSL_cleanse(key, sizeof key);
    kms_buf_free(&creq);
    kms_buf_free(&sts);
    return ok;
}

static void test_sign_verifies_through_server_code(void **state)
{
    const char *date = "20240102T030405Z";
    const char *body = "{\"KeyId\":\"alias/orders\",\"KeySpec\":\"AES_256\"}";
    /* as transport.c sends them: names in its case, one of them repeated */
    struct kms_header hdrs[] = {
        {"Host", "127.0.0.1:4430"},
        {"Content-Type", "application/x-amz-json-1.1"},
        {"X-Amz-Date", date},
        {"X-Amz-Target", "TrentService.GenerateDataKey"},
        {"X-Amz-Security-Token", "FwoGZXIvYXdzEBYaDH  token"},
        {"x-amz-target", "TrentService.GenerateDataKey"},
    };
    struct kms_sigv4_request req = {"POST", "/", NULL, 0, hdrs, N_ELEMS(hdrs), body, strlen(body)};
    struct kms_buf authz = KMS_BUF_INIT;
    struct kms_sigv4_auth auth;
    (void)state;

    assert_int_equal(
        kms_sigv4_sign(&req, "AKIDCLIENT", "client-secret", "eu-west-1", "kms", date, &authz),
        KMS_OK);
    assert_int_equal(kms_sigv4_parse_auth((const char *)authz.data, &auth), KMS_OK);
    assert_int_equal(auth.signed_headers_len,
                     strlen("content-type;host;x-amz-date;x-amz-security-token;x-amz-target"));
    assert_memory_equal(auth.signed_headers,
                        "content-type;host;x-amz-date;x-amz-security-token;x-amz-target",
                        auth.signed_headers_len);
    assert_int_equal(auth.scope_len, strlen("20240102/eu-west-1/kms/aws4_request"));
    assert_memory_equal(auth.scope, "20240102/eu-west-1/kms/aws4_request", auth.scope_len);
    assert_memory_equal(auth.access_key, "AKIDCLIENT", auth.access_key_len);
    assert_true(server_verifies((const char *)authz.data, hdrs, N_ELEMS(hdrs), date, body,
                                "client-secret"));

    /* what it must not survive: another secret, body, header value or date */
    assert_false(
        server_verifies((const char *)authz.data, hdrs, N_ELEMS(hdrs), date, body, "other-secret"));
    assert_false(server_verifies((const char *)authz.data, hdrs, N_ELEMS(hdrs), date,
                                 "{\"KeyId\":\"alias/other\",\"KeySpec\":\"AES_256\"}",
                                 "client-secret"));
    hdrs[3].value = "TrentService.Decrypt";
    assert_false(server_verifies((const char *)authz.data, hdrs, N_ELEMS(hdrs), date, body,
                                 "client-secret"));
    hdrs[3].value = "TrentService.GenerateDataKey";
    hdrs[2].value = "20240102T030406Z";
    assert_false(server_verifies((const char *)authz.data, hdrs, N_ELEMS(hdrs), "20240102T030406Z",
                                 body, "client-secret"));
    kms_buf_free(&authz);
}

static void test_sign_refuses_incomplete_requests(void **state)
{
    const char *date = "20240102T030405Z";
    const struct kms_header no_date[] = {{"Host", "h"}};
    const struct kms_header no_host[] = {{"X-Amz-Date", "20240102T030405Z"}};
    const struct kms_header other_date[] = {{"Host", "h"}, {"X-Amz-Date", "20240102T030406Z"}};
    const struct kms_header good[] = {{"Host", "h"}, {"X-Amz-Date", "20240102T030405Z"}};
    struct kms_buf out = KMS_BUF_INIT;
    struct kms_sigv4_request req = {"POST", "/", NULL, 0, no_date, 1, "", 0};
    (void)state;
    assert_int_equal(kms_sigv4_sign(&req, "A", "s", "r", "kms", date, &out), KMS_ERR_VALIDATION);
    req.headers = no_host;
    assert_int_equal(kms_sigv4_sign(&req, "A", "s", "r", "kms", date, &out), KMS_ERR_VALIDATION);
    req.headers = other_date;
    req.nheaders = 2;
    assert_int_equal(kms_sigv4_sign(&req, "A", "s", "r", "kms", date, &out), KMS_ERR_VALIDATION);
    req.headers = good;
    assert_int_equal(kms_sigv4_sign(&req, "A", "s", "r", "kms", "20240102", &out),
                     KMS_ERR_VALIDATION);
    assert_int_equal(kms_sigv4_sign(&req, "", "s", "r", "kms", date, &out), KMS_ERR_VALIDATION);
    assert_int_equal(kms_sigv4_sign(&req, "A", "s", "", "kms", date, &out), KMS_ERR_VALIDATION);
    assert_int_equal(out.len, 0);
    assert_int_equal(kms_sigv4_sign(&req, "A", "s", "r", "kms", date, &out), KMS_OK);
    kms_buf_free(&out);
}

static void test_amz_date(void **state)
{
    char d[KMS_AMZ_DATE_LEN + 1];
    (void)state;
    assert_int_equal(kms_sigv4_amz_date(0, d), KMS_OK);
    assert_string_equal(d, "19700101T000000Z");
    assert_int_equal(kms_sigv4_amz_date(1700000000, d), KMS_OK);
    assert_string_equal(d, "20231114T221320Z");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_names),
        cmocka_unit_test(test_every_server_type_maps),
        cmocka_unit_test(test_every_service_status_round_trips),
        cmocka_unit_test(test_type_forms),
        cmocka_unit_test(test_last_error_is_per_thread_and_fail_returns_status),
        cmocka_unit_test(test_backoff_bounds),
        cmocka_unit_test(test_backoff_no_overflow),
        cmocka_unit_test(test_backoff_retry_after),
        cmocka_unit_test(test_breaker_opens_after_exactly_threshold),
        cmocka_unit_test(test_breaker_counts_consecutive_failures_only),
        cmocka_unit_test(test_breaker_fails_fast_then_one_probe),
        cmocka_unit_test(test_breaker_probe_that_learned_nothing),
        cmocka_unit_test(test_breaker_ignores_calls_from_before_a_change),
        cmocka_unit_test(test_breaker_threshold_zero_is_one),
        cmocka_unit_test_setup(test_endpoint_order, clear_env),
        cmocka_unit_test_setup(test_region_order, clear_env),
        cmocka_unit_test_setup(test_credentials_order, clear_env),
        cmocka_unit_test_setup(test_options_refused, clear_env),
        cmocka_unit_test_setup(test_defaults, clear_env),
        cmocka_unit_test_setup(test_unreachable_opens_breaker, clear_env),
        cmocka_unit_test_setup(test_retry_budget_bounds_a_call, clear_env),
        cmocka_unit_test_setup(test_arguments_refused, clear_env),
        cmocka_unit_test(test_canonical_is_the_servers),
        cmocka_unit_test(test_sign_post_vanilla),
        cmocka_unit_test(test_sign_verifies_through_server_code),
        cmocka_unit_test(test_sign_refuses_incomplete_requests),
        cmocka_unit_test(test_amz_date),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
