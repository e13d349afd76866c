/*
 * p11kmsd's metrics, served at /metrics in Prometheus text format (see
 * docs/operations.md for each metric and what to watch).
 */
#ifndef P11KMS_STATS_H
#define P11KMS_STATS_H

#include <stdint.h>

#include "common/buf.h"
#include "server/ratelimit.h"
#include "server/server.h"

/* Makes srv->stats and hooks the token's call timings; before the server serves. */
KMS_MUST_CHECK kms_err kms_stats_start(struct kms_server *srv);
void kms_stats_free(struct kms_server *srv);

/* A request answered: op NULL when none was named; started from kms_monotonic_ns(). */
void kms_stats_request(struct kms_server *srv, const struct kms_op *op, kms_err outcome,
                       int64_t started_ns);
void kms_stats_throttled(struct kms_server *srv, enum kms_op_class cls);
/* A decryption breaker opened, and a request its open breaker refused. */
void kms_stats_breaker_trip(struct kms_server *srv, int kind);
void kms_stats_breaker_refusal(struct kms_server *srv);
/* An audit line that could not be written (the request failed closed). */
void kms_stats_audit_failure(struct kms_server *srv);

KMS_MUST_CHECK kms_err kms_stats_render(struct kms_server *srv, struct kms_buf *out);

#endif
