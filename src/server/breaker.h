/*
 * The decryption breaker: decryptions that fail as the caller's fault
 * (InvalidCiphertextException, IncorrectKeyException) are counted per
 * principal and per key. When one of them reaches `failures` within
 * `window_s` of the first it counts, its breaker opens for `cooldown_s`:
 *
 *   - a principal's open breaker makes p11kmsd refuse that principal's
 *     Decrypt and ReEncrypt calls (ThrottlingException, HTTP 429, Retry-After)
 *     until it closes: someone probing with made-up or tampered blobs stops
 *     getting answers, every other principal is served as before;
 *   - a key's open breaker only raises the alarm (alert, metric): failures
 *     spread over many principals are worth an operator's look, but refusing
 *     the key to everyone would hand any principal allowed to Decrypt under it
 *     a way to lock the others out.
 *
 * Each opening is an alert (server.c writes the audit line and the syslog
 * LOG_ALERT line) and is counted. While a breaker is open its failures are not
 * counted; when it closes, counting starts afresh.
 *
 * State is bounded: KMS_BREAKER_SLOTS entries per kind, found by a hash and a
 * short probe. An entry whose window is over and whose breaker is closed is
 * reused; a failure that finds neither its entry nor a reusable one in its
 * probe is not counted (only when that many principals or keys fail at once).
 *
 * Thread safety: every call may come from any thread. kms_breaker_is_open
 * takes no lock while no breaker of its kind is open, which is the usual case.
 */
#ifndef P11KMS_BREAKER_H
#define P11KMS_BREAKER_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

enum kms_breaker_kind { KMS_BREAKER_PRINCIPAL, KMS_BREAKER_KEY, KMS_BREAKER_KINDS };

#define KMS_BREAKER_DEFAULT_FAILURES 100
#define KMS_BREAKER_DEFAULT_WINDOW_S 60
#define KMS_BREAKER_DEFAULT_COOLDOWN_S 300
#define KMS_BREAKER_SLOTS 4096
#define KMS_BREAKER_NAME_MAX 255 /* a principal's name or a key's ARN */

struct kms_breaker_config {
    unsigned failures;   /* 0: no breaker */
    unsigned window_s;   /* 1..86400 */
    unsigned cooldown_s; /* 1..86400 */
};

struct kms_breaker;

/* @returns KMS_ERR_INTERNAL when out of memory. */
KMS_MUST_CHECK kms_err kms_breaker_new(const struct kms_breaker_config *cfg,
                                       struct kms_breaker **out);
void kms_breaker_free(struct kms_breaker *b);

/*
 * Whether name's breaker is open at now_ns (CLOCK_MONOTONIC); when it is,
 * *until_ns (may be NULL) is when it closes. NULL b or name: never open.
 */
int kms_breaker_is_open(struct kms_breaker *b, enum kms_breaker_kind kind, const char *name,
                        int64_t now_ns, int64_t *until_ns);

/*
 * Counts one failure against name. Returns 1 when this failure opens the
 * breaker (the caller raises the alert), with *until_ns set; 0 otherwise.
 */
int kms_breaker_fail(struct kms_breaker *b, enum kms_breaker_kind kind, const char *name,
                     int64_t now_ns, int64_t *until_ns);

/* Breakers of kind open at now_ns. */
size_t kms_breaker_open_count(struct kms_breaker *b, enum kms_breaker_kind kind, int64_t now_ns);

/* The configuration the breaker runs with. */
const struct kms_breaker_config *kms_breaker_config(const struct kms_breaker *b);

#endif
