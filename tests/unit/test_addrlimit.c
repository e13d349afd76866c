/*
 * Unit tests for src/server/addrlimit.h: failed authentications per client
 * address, with the clock passed in so every block, cool-down and summary is
 * exact.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "server/addrlimit.h"

#define T0 INT64_C(1000000000000)
#define MS INT64_C(1000000)
#define SEC INT64_C(1000000000)

static struct kms_addrlimit_summary seen[16];
static size_t nseen;

static void collect(void *arg, const struct kms_addrlimit_summary *s)
{
    (void)arg;
    if (nseen < 16)
        seen[nseen] = *s;
    nseen++;
}

static struct kms_addr v4(const char *text)
{
    struct sockaddr_in sa = {0};
    struct kms_addr a;
    sa.sin_family = AF_INET;
    assert_int_equal(inet_pton(AF_INET, text, &sa.sin_addr), 1);
    kms_addr_from_sockaddr((struct sockaddr *)&sa, &a);
    return a;
}

static struct kms_addr v6(const char *text)
{
    struct sockaddr_in6 sa = {0};
    struct kms_addr a;
    sa.sin6_family = AF_INET6;
    assert_int_equal(inet_pton(AF_INET6, text, &sa.sin6_addr), 1);
    kms_addr_from_sockaddr((struct sockaddr *)&sa, &a);
    return a;
}

static struct kms_addrlimit *limiter(double rate, double burst, unsigned cooldown_s,
                                     unsigned interval_s)
{
    struct kms_addrlimit_config c = {rate, burst, cooldown_s, interval_s, 0};
    struct kms_addrlimit *al = NULL;
    nseen = 0;
    assert_int_equal(kms_addrlimit_new(&c, collect, NULL, &al), KMS_OK);
    assert_non_null(al);
    return al;
}

static void test_addresses_and_their_text(void **state)
{
    char text[KMS_ADDR_TEXT_MAX];
    (void)state;
    struct kms_addr a = v4("203.0.113.7");
    kms_addr_format(&a, text);
    assert_string_equal(text, "203.0.113.7");
    /* An IPv4-mapped IPv6 address is the IPv4 address. */
    struct kms_addr m = v6("::ffff:203.0.113.7");
    assert_memory_equal(&a, &m, sizeof a);
    /* IPv6 by its /64: one host usually holds a whole /64. */
    struct kms_addr b = v6("2001:db8:1:2::1"), c = v6("2001:db8:1:2:ffff::9");
    struct kms_addr d = v6("2001:db8:1:3::1");
    assert_memory_equal(&b, &c, sizeof b);
    assert_memory_not_equal(&b, &d, sizeof b);
    kms_addr_format(&c, text);
    assert_string_equal(text, "2001:db8:1:2::/64");
    kms_addr_from_sockaddr(NULL, &a);
    kms_addr_format(&a, text);
    assert_string_equal(text, "::/64");
}

static void test_burst_then_blocked_for_the_cooldown(void **state)
{
    (void)state;
    struct kms_addrlimit *al = limiter(1.0, 3, 10, 0);
    struct kms_addr a = v4("192.0.2.1"), b = v4("192.0.2.2");
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kms_addrlimit_check(al, &a, T0 + i * MS), 0);
        assert_int_equal(kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0 + i * MS), 1);
    }
    assert_int_equal(kms_addrlimit_check(al, &a, T0 + 3 * MS), 0);
    /* The fourth within the burst's time finds the bucket empty: blocked 10 s. */
    kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0 + 3 * MS);
    assert_int_equal(kms_addrlimit_check(al, &a, T0 + 4 * MS), 10);
    assert_int_equal(kms_addrlimit_check(al, &a, T0 + 9 * SEC + 4 * MS), 1);
    /* Another address is not. */
    assert_int_equal(kms_addrlimit_check(al, &b, T0 + 4 * MS), 0);
    /* Over: the bucket refills from empty, one token a second. */
    assert_int_equal(kms_addrlimit_check(al, &a, T0 + 10 * SEC + 3 * MS), 0);
    kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0 + 11 * SEC + 3 * MS);
    assert_int_equal(kms_addrlimit_check(al, &a, T0 + 11 * SEC + 4 * MS), 0);
    kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0 + 11 * SEC + 5 * MS);
    assert_int_equal(kms_addrlimit_check(al, &a, T0 + 11 * SEC + 6 * MS), 10);
    kms_addrlimit_free(al);
    /* interval 0: nothing was left for a summary but the refusals. */
    assert_int_equal(nseen, 1);
    assert_string_equal(seen[0].source, "192.0.2.1");
    assert_int_equal(seen[0].count, 3); /* the three checks answered while blocked */
    assert_string_equal(seen[0].outcome, "ThrottlingException");
}

static void test_one_line_per_interval(void **state)
{
    (void)state;
    struct kms_addrlimit *al = limiter(0, 1, 1, 60);
    struct kms_addr a = v6("2001:db8::5");
    /* The first failure is audited on its own line, the next ones counted. */
    assert_int_equal(kms_addrlimit_fail(al, &a, "IncompleteSignatureException", T0), 1);
    for (int i = 1; i <= 1000; i++)
        assert_int_equal(kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0 + i * MS), 0);
    kms_addrlimit_sweep(al, T0 + 59 * SEC);
    assert_int_equal(nseen, 0);
    kms_addrlimit_sweep(al, T0 + 60 * SEC);
    assert_int_equal(nseen, 1);
    assert_string_equal(seen[0].source, "2001:db8::/64");
    assert_int_equal(seen[0].count, 1000);
    assert_string_equal(seen[0].outcome, "InvalidSignatureException");
    /* Within 60 s of that summary: counted again, summed 60 s after it. */
    assert_int_equal(kms_addrlimit_fail(al, &a, "UnrecognizedClientException", T0 + 61 * SEC), 0);
    kms_addrlimit_sweep(al, T0 + 119 * SEC);
    assert_int_equal(nseen, 1);
    kms_addrlimit_sweep(al, T0 + 120 * SEC);
    assert_int_equal(nseen, 2);
    assert_int_equal(seen[1].count, 1);
    assert_string_equal(seen[1].outcome, "UnrecognizedClientException");
    /* A failure long after the last line has a line of its own again. */
    assert_int_equal(kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0 + 200 * SEC), 1);
    kms_addrlimit_sweep(al, T0 + 400 * SEC);
    assert_int_equal(nseen, 2);
    /* No rate: never blocked. */
    assert_int_equal(kms_addrlimit_check(al, &a, T0 + 400 * SEC), 0);
    kms_addrlimit_free(al);
    assert_int_equal(nseen, 2);
}

static void test_free_emits_what_is_pending(void **state)
{
    (void)state;
    struct kms_addrlimit *al = limiter(1.0, 100, 10, 60);
    struct kms_addr a = v4("198.51.100.1");
    assert_int_equal(kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0), 1);
    assert_int_equal(kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0 + MS), 0);
    assert_int_equal(kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0 + 2 * MS), 0);
    kms_addrlimit_free(al);
    assert_int_equal(nseen, 1);
    assert_int_equal(seen[0].count, 2);
}

static void test_off_and_null(void **state)
{
    struct kms_addrlimit_config off = {0, 20, 30, 0, 0};
    struct kms_addrlimit *al = (struct kms_addrlimit *)&off;
    struct kms_addr a = v4("192.0.2.1");
    (void)state;
    assert_int_equal(kms_addrlimit_new(&off, collect, NULL, &al), KMS_OK);
    assert_null(al);
    assert_int_equal(kms_addrlimit_check(NULL, &a, T0), 0);
    assert_int_equal(kms_addrlimit_fail(NULL, &a, "InvalidSignatureException", T0), 1);
    kms_addrlimit_free(NULL);
}

/* Many addresses: each keeps its own count, whatever slots they share. */
static void test_many_addresses(void **state)
{
    (void)state;
    struct kms_addrlimit *al = limiter(1.0, 2, 10, 0);
    char text[32];
    int blocked = 0;
    for (int i = 0; i < 3000; i++) {
        snprintf(text, sizeof text, "10.%d.%d.1", i / 250, i % 250);
        struct kms_addr a = v4(text);
        kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0);
        kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0);
        blocked += kms_addrlimit_check(al, &a, T0) != 0;
    }
    assert_int_equal(blocked, 0); /* two failures each: within the burst */
    /* Two seconds on, every bucket is full again: any slot may be taken by a new address. */
    struct kms_addr last = v4("192.0.2.1");
    for (int i = 0; i < 3; i++)
        kms_addrlimit_fail(al, &last, "InvalidSignatureException", T0 + 2 * SEC);
    assert_int_equal(kms_addrlimit_check(al, &last, T0 + 2 * SEC), 10);
    kms_addrlimit_free(al);
}

/* An address in the same slot as a's (the table's hash is keyed per process: searched for). */
static struct kms_addr same_slot(struct kms_addrlimit *al, const struct kms_addr *a)
{
    char text[32];
    for (int i = 0; i < 1 << 20; i++) {
        snprintf(text, sizeof text, "10.%d.%d.%d", (i >> 16) & 255, (i >> 8) & 255, i & 255);
        struct kms_addr b = v4(text);
        if (memcmp(&b, a, sizeof b) != 0 && kms_addrlimit_slot(al, &b) == kms_addrlimit_slot(al, a))
            return b;
    }
    fail_msg("no address shares the slot");
    return *a;
}

/*
 * A blocked address keeps its block whatever other addresses of its slot do:
 * their failures go to the overflow, which blocks nobody and is summarised as
 * "several addresses".
 */
static void test_a_blocked_address_is_never_forgotten(void **state)
{
    (void)state;
    struct kms_addrlimit *al = limiter(1.0, 2, 30, 60);
    struct kms_addr a = v4("198.51.100.7"), b = same_slot(al, &a);
    for (int i = 0; i < 3; i++)
        kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0);
    assert_int_equal(kms_addrlimit_check(al, &a, T0), 30);
    for (int i = 0; i < 50; i++)
        assert_int_equal(kms_addrlimit_fail(al, &b, "IncompleteSignatureException", T0 + i * MS),
                         0);
    assert_int_equal(kms_addrlimit_check(al, &a, T0 + SEC), 29); /* still blocked */
    assert_int_equal(kms_addrlimit_check(al, &b, T0 + SEC), 0);  /* b was never blocked */
    kms_addrlimit_sweep(al, T0 + 61 * SEC);
    assert_int_equal(nseen, 2);
    assert_string_equal(seen[1].source, "several addresses");
    assert_int_equal(seen[1].count, 50);
    assert_string_equal(seen[1].outcome, "IncompleteSignatureException");
    assert_string_equal(seen[0].source, "198.51.100.7"); /* a's failure and its refusals */
    assert_int_equal(seen[0].count, 2 + 2);
    /* Once a is idle again (its block over, its bucket full), b takes the slot. */
    int64_t later = T0 + 100 * SEC;
    assert_int_equal(kms_addrlimit_fail(al, &b, "InvalidSignatureException", later), 1);
    kms_addrlimit_free(al);
}

/* Many addresses: at most KMS_ADDRLIMIT_LINES own lines an interval, the rest in one summary. */
static void test_own_lines_are_capped(void **state)
{
    (void)state;
    struct kms_addrlimit *al = limiter(1.0, 20, 30, 60);
    char text[32];
    int own = 0;
    for (int i = 0; i < 1000; i++) {
        snprintf(text, sizeof text, "10.1.%d.%d", i / 250, i % 250);
        struct kms_addr a = v4(text);
        own += kms_addrlimit_fail(al, &a, "InvalidSignatureException", T0 + i * MS);
    }
    assert_int_equal(own, KMS_ADDRLIMIT_LINES);
    kms_addrlimit_sweep(al, T0 + 61 * SEC);
    assert_int_equal(nseen, 1);
    assert_string_equal(seen[0].source, "several addresses");
    assert_int_equal(seen[0].count, 1000 - KMS_ADDRLIMIT_LINES);
    /* The next interval allows own lines again. */
    struct kms_addr z = v4("203.0.113.9");
    assert_int_equal(kms_addrlimit_fail(al, &z, "InvalidSignatureException", T0 + 62 * SEC), 1);
    kms_addrlimit_free(al);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_addresses_and_their_text),
        cmocka_unit_test(test_burst_then_blocked_for_the_cooldown),
        cmocka_unit_test(test_one_line_per_interval),
        cmocka_unit_test(test_free_emits_what_is_pending),
        cmocka_unit_test(test_off_and_null),
        cmocka_unit_test(test_many_addresses),
        cmocka_unit_test(test_a_blocked_address_is_never_forgotten),
        cmocka_unit_test(test_own_lines_are_capped),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
