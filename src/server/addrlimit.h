/*
 * Failed authentications per client address: a token bucket per address
 * (an IPv4 address, or an IPv6 address's /64, as one host usually holds a
 * whole /64), and audit lines for those failures aggregated per address.
 *
 * Limit: each failed authentication takes a token from its address's bucket
 * (rate per second, burst). A failure that finds the bucket empty blocks the
 * address for cooldown_s seconds; while blocked every request from it is
 * refused before any signature work (the server answers 429
 * ThrottlingException with Retry-After), and after the cool-down the bucket
 * refills from empty. rate 0: no limit.
 *
 * Audit: the first failure of an address is audited on its own line, as any
 * request is. The failures and refusals that follow within interval_s of
 * that address's last line are only counted; once interval_s has passed a
 * sweep (a thread of this module, once a second) emits one summary with the
 * count. So a flood from one address writes at most one line per interval_s.
 * (Refusals of a blocked address are counted the same way.)
 * interval_s 0: every failure is audited on its own line.
 *
 * State is one table of KMS_ADDRLIMIT_SLOTS slots, an address in the slot its
 * keyed hash picks (the key is random per process, so an attacker cannot aim
 * at another address's slot). An address meeting a slot held by another
 * takes it over only when the other is idle (not blocked, nothing pending,
 * its bucket full again): a blocked address is never forgotten. Otherwise,
 * and for every failure beyond KMS_ADDRLIMIT_LINES own lines per interval
 * over all addresses (a flood from many addresses), the failure is counted
 * in one shared overflow entry, summarised as "several addresses" once per
 * interval; the overflow blocks nobody (it would refuse addresses that made
 * no failure). So the audit log takes at most about 2 × KMS_ADDRLIMIT_LINES
 * + 1 lines per interval, whatever the number of addresses.
 *
 * Cost: kms_addrlimit_check, on every request, is one hash and one atomic
 * load and takes no lock unless the slot holds a blocked address.
 * kms_addrlimit_fail takes the slot's own mutex.
 */
#ifndef P11KMS_ADDRLIMIT_H
#define P11KMS_ADDRLIMIT_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

struct sockaddr;

#define KMS_ADDRLIMIT_SLOTS 4096
/* An address's text: "203.0.113.7" or "2001:db8:1:2::/64". */
#define KMS_ADDR_TEXT_MAX 64
#define KMS_ADDRLIMIT_OUTCOME_MAX 48
/* Own audit lines per interval over all addresses; beyond, failures go to the overflow. */
#define KMS_ADDRLIMIT_LINES 100
/* The overflow's summary source. */
#define KMS_ADDRLIMIT_SEVERAL "several addresses"

struct kms_addrlimit_config {
    double rate;         /* failed authentications per second an address may make; 0: no limit */
    double burst;        /* and in a burst */
    unsigned cooldown_s; /* how long an address that went beyond is refused */
    unsigned interval_s; /* at most one audit line per address this often; 0: one per failure */
    unsigned sweep_ms;   /* how often the thread sweeps; 0: no thread (tests sweep themselves) */
};

/* The key an address is counted under: IPv4 (or IPv4-mapped) whole, IPv6 by its /64. */
struct kms_addr {
    uint8_t b[16];
};

struct kms_addrlimit_summary {
    char source[KMS_ADDR_TEXT_MAX];          /* kms_addr_format of the address */
    uint64_t count;                          /* failures and refusals since its last line */
    char outcome[KMS_ADDRLIMIT_OUTCOME_MAX]; /* the last failure's error type */
};

/* Called by the sweep (and at free) for each address with failures not yet audited. */
typedef void (*kms_addrlimit_emit_fn)(void *arg, const struct kms_addrlimit_summary *s);

struct kms_addrlimit;

/* 0 when sa is NULL or neither IPv4 nor IPv6 (all such share one key). */
void kms_addr_from_sockaddr(const struct sockaddr *sa, struct kms_addr *out);
void kms_addr_format(const struct kms_addr *a, char out[KMS_ADDR_TEXT_MAX]);

/*
 * A limiter; with emit and sweep_ms, a thread sweeps the table every
 * sweep_ms. *out is NULL when neither a rate nor an interval is set.
 * @returns KMS_ERR_INTERNAL when out of memory or the thread cannot start.
 */
KMS_MUST_CHECK kms_err kms_addrlimit_new(const struct kms_addrlimit_config *cfg,
                                         kms_addrlimit_emit_fn emit, void *arg,
                                         struct kms_addrlimit **out);

/*
 * 0 when a request from a may go on; else the whole seconds (at least 1)
 * until its cool-down ends, and the refusal is counted for the address's
 * summary. al NULL: 0.
 */
unsigned kms_addrlimit_check(struct kms_addrlimit *al, const struct kms_addr *a, int64_t now_ns);

/*
 * A failed authentication from a, whose answer is outcome (an AWS error type).
 * @returns 1 when it should be audited on its own line, 0 when it is counted
 * in the address's next summary instead. al NULL: 1.
 */
int kms_addrlimit_fail(struct kms_addrlimit *al, const struct kms_addr *a, const char *outcome,
                       int64_t now_ns);

/* The slot a is counted in (for tests: addresses that meet in one slot). */
size_t kms_addrlimit_slot(const struct kms_addrlimit *al, const struct kms_addr *a);

/* Emits the summaries whose interval has ended by now_ns (the thread's work; for tests). */
void kms_addrlimit_sweep(struct kms_addrlimit *al, int64_t now_ns);

/* Stops the thread, emits every pending summary, frees. NULL is fine. */
void kms_addrlimit_free(struct kms_addrlimit *al);

#endif
