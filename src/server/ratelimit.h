/*
 * Token-bucket rate limits: one bucket per principal and operation class
 * (cryptographic, asymmetric, HMAC and management, as AWS keeps separate
 * quotas for them), plus
 * one global bucket that every request draws from. A request is allowed only
 * when its principal's class bucket and the global bucket both hold its cost;
 * otherwise it is refused with the time after which a retry can pass, and
 * nothing is taken from any bucket. The server answers a refusal with
 * ThrottlingException, HTTP 429 and Retry-After.
 *
 * Buckets refill continuously: fill = min(burst, fill + rate * elapsed). A
 * new bucket starts full. A rate of 0 means unlimited (the bucket is never
 * consulted).
 *
 * Defaults (kms_ratelimit_config_defaults), per principal:
 *   crypto  KMS_RL_DEFAULT_CRYPTO_RATE = 50000/s, burst 50000
 *   manage  KMS_RL_DEFAULT_MANAGE_RATE =  1000/s, burst  2000
 *   asym    KMS_RL_DEFAULT_ASYM_RATE   =  5000/s, burst  5000
 *   hmac    KMS_RL_DEFAULT_HMAC_RATE   = 50000/s, burst 50000
 *   global  0 = unlimited
 * The crypto and hmac defaults are above what one node serves (about
 * 20,000/s on two cores), so they only stop a runaway client; operators set
 * their own. asym is lower because a private-key operation costs the token
 * far more (an RSA-4096 signature ~100 times an AES-GCM wrap), and a key
 * pair made for GenerateDataKeyPair costs this process more still. With the
 * management costs below that is 1000 reads, 200 changes or 100 new keys
 * or rotations a second.
 *
 * State is bounded: at most KMS_RL_MAX_PRINCIPALS principals get buckets of
 * their own (those named in overrides first, then others as they first make
 * a request). Entries are never removed while the limiter lives. Every later
 * principal, a NULL or empty principal, a name longer than KMS_RL_NAME_MAX, and
 * a newcomer met when memory runs out share one overflow entry with the default
 * rates, so they throttle one another but can never make the table grow.
 *
 * Thread safety: kms_ratelimit_take and kms_ratelimit_configure may be called
 * from any number of threads. Known principals are found without a lock; each
 * bucket has its own mutex, held for a few arithmetic operations only.
 */
#ifndef P11KMS_RATELIMIT_H
#define P11KMS_RATELIMIT_H

#include <stddef.h>
#include <stdint.h>

#include "common/error.h"

/*
 * The limiter classifies a request by its operation alone, before its body
 * (and so its key) is read: RSA Encrypt and Decrypt count as crypto, as the
 * symmetric ones do; the operations only asymmetric keys have count as asym,
 * the HMAC ones as hmac.
 */
enum kms_op_class {
    KMS_CLASS_CRYPTO,
    KMS_CLASS_MANAGE,
    KMS_CLASS_ASYM, /* Sign, Verify, DeriveSharedSecret, GetPublicKey, GenerateDataKeyPair* */
    KMS_CLASS_HMAC, /* GenerateMac, VerifyMac */
    KMS_CLASS_COUNT
};

#define KMS_RL_DEFAULT_CRYPTO_RATE 50000.0
#define KMS_RL_DEFAULT_CRYPTO_BURST 50000.0
#define KMS_RL_DEFAULT_MANAGE_RATE 1000.0
#define KMS_RL_DEFAULT_MANAGE_BURST 2000.0
#define KMS_RL_DEFAULT_ASYM_RATE 5000.0
#define KMS_RL_DEFAULT_ASYM_BURST 5000.0
#define KMS_RL_DEFAULT_HMAC_RATE 50000.0
#define KMS_RL_DEFAULT_HMAC_BURST 50000.0

/* Principals with a bucket of their own; the rest share the overflow entry. */
#define KMS_RL_MAX_PRINCIPALS 4096
/* Longest principal name (the credentials file's third field). */
#define KMS_RL_NAME_MAX 64
/* Largest rate (tokens/s) or burst (tokens) accepted. */
#define KMS_RL_VALUE_MAX 1e9
/* In an override: take this field from the per-principal default. */
#define KMS_RATE_INHERIT (-1.0)

struct kms_rate {
    double rate;  /* tokens per second; 0 = unlimited */
    double burst; /* bucket size in tokens; must be > 0 when rate > 0 */
};

struct kms_rate_override {
    char *principal; /* owned; [A-Za-z0-9_.@+=,-], 1 to KMS_RL_NAME_MAX characters */
    struct kms_rate cls[KMS_CLASS_COUNT]; /* KMS_RATE_INHERIT fields use the defaults */
};

struct kms_ratelimit_config {
    struct kms_rate global;                         /* all requests together */
    struct kms_rate per_principal[KMS_CLASS_COUNT]; /* default for each principal and class */
    struct kms_rate_override *overrides;            /* owned, at most KMS_RL_MAX_PRINCIPALS */
    size_t noverrides;
};

struct kms_ratelimit;

/* Sets the defaults above, with no overrides. Does not free anything. */
void kms_ratelimit_config_defaults(struct kms_ratelimit_config *c);
/* Frees the overrides; *c is left with none, its rates untouched. */
void kms_ratelimit_config_free(struct kms_ratelimit_config *c);

/*
 * 1 when key belongs to the rate limiter: rate_global, burst_global,
 * rate_crypto, burst_crypto, rate_manage, burst_manage, rate_asym,
 * burst_asym, rate_hmac, burst_hmac, or one of those but the global ones
 * followed by ".<principal>". Lets the configuration parser hand such keys
 * to kms_ratelimit_config_set and try its own for the rest.
 */
int kms_ratelimit_config_is_key(const char *key);

/*
 * Sets one "key = value" setting. Values are decimal numbers from 0 to
 * KMS_RL_VALUE_MAX ("100", "0.5", "2e4"); rate 0 means unlimited.
 * "rate_crypto.alice = 50" overrides alice's crypto rate only; the fields an
 * override does not set follow the defaults, wherever they appear in the file.
 * A later setting of the same key wins. On failure *c is unchanged.
 *
 * @returns KMS_ERR_VALIDATION, with a message naming the key, for a value that
 * is not such a number, a principal name that is not valid, a per-principal
 * form of a global key, an unknown key, or too many overrides; KMS_ERR_INTERNAL
 * when out of memory.
 */
KMS_MUST_CHECK kms_err kms_ratelimit_config_set(struct kms_ratelimit_config *c, const char *key,
                                                const char *value);

/*
 * Checks a whole configuration: every value a number from 0 to
 * KMS_RL_VALUE_MAX, a burst above 0 wherever the rate is (after overrides
 * inherit), valid and distinct override names, at most KMS_RL_MAX_PRINCIPALS
 * overrides. KMS_ERR_VALIDATION naming the key otherwise.
 */
KMS_MUST_CHECK kms_err kms_ratelimit_config_check(const struct kms_ratelimit_config *c);

/*
 * Makes a limiter from cfg (which it copies: the caller keeps and frees cfg).
 * Every overridden principal gets its buckets now.
 * @returns KMS_ERR_VALIDATION as kms_ratelimit_config_check, KMS_ERR_INTERNAL
 * when out of memory.
 */
KMS_MUST_CHECK kms_err kms_ratelimit_new(const struct kms_ratelimit_config *cfg,
                                         struct kms_ratelimit **out);

/*
 * Replaces the rates (SIGHUP). Each limited bucket is first refilled up to
 * now_ns at its old rate, then keeps its fill, clamped to its new burst; a
 * bucket that was unlimited or has not been used yet starts full. Principals whose override went
 * away return to the defaults. All or nothing: on failure no rate changes.
 * @param now_ns CLOCK_MONOTONIC in nanoseconds, as for kms_ratelimit_take.
 * @returns KMS_ERR_VALIDATION as kms_ratelimit_config_check;
 * KMS_ERR_LIMIT_EXCEEDED when new overrides do not fit in the table beside
 * the principals already in it.
 */
KMS_MUST_CHECK kms_err kms_ratelimit_configure(struct kms_ratelimit *rl,
                                               const struct kms_ratelimit_config *cfg,
                                               int64_t now_ns);

/*
 * Takes cost tokens from the principal's bucket for cls and from the global
 * bucket.
 * @param rl NULL means no limits: every request is allowed.
 * @param principal the authenticated principal's name; see above for NULL,
 * overlong names and principals past the cap.
 * @param cls a class outside the enum counts as KMS_CLASS_MANAGE.
 * @param cost tokens this request costs (kms_ratelimit_classify); a cost above
 * a bucket's burst could never pass, so that bucket asks for its burst
 * instead (a full bucket). A cost that is NaN or negative counts as 1.
 * @param now_ns CLOCK_MONOTONIC in nanoseconds, passed in so tests control
 * time. A time earlier than one already seen adds no tokens.
 * @param retry_after_ms may be NULL; set to 0 when allowed, and when refused
 * to the whole milliseconds (at least 1, rounded up, at most UINT32_MAX)
 * until the scarcest bucket holds the cost again.
 * @returns 1 when allowed, 0 when refused; a refusal takes nothing. HTTP's
 * Retry-After is in whole seconds: (retry_after_ms + 999) / 1000.
 */
int kms_ratelimit_take(struct kms_ratelimit *rl, const char *principal, enum kms_op_class cls,
                       double cost, int64_t now_ns, uint32_t *retry_after_ms);

/* Principals with buckets of their own (for metrics and tests). */
size_t kms_ratelimit_principals(struct kms_ratelimit *rl);

/*
 * Class and cost of an operation (the part of X-Amz-Target after
 * "TrentService."), weighted by what it costs the token:
 *   crypto 1: Encrypt, Decrypt (RSA keys' included), GenerateDataKey(WithoutPlaintext),
 *             GenerateRandom
 *   crypto 2: ReEncrypt (a decrypt and an encrypt)
 *   asym 1:   Sign, Verify, DeriveSharedSecret, GetPublicKey
 *   asym 10:  GenerateDataKeyPair(WithoutPlaintext) (a key pair made in this process: an
 *             RSA-4096 pair takes a good part of a second of CPU)
 *   hmac 1:   GenerateMac, VerifyMac
 *   manage 1: reads served from the index (DescribeKey, List*, GetKeyRotationStatus)
 *   manage 5: metadata rewrites (Enable/Disable*, *KeyDeletion, *Alias, *Tag*)
 *   manage 10: CreateKey, RotateKeyOnDemand (a new KEK and a metadata object)
 * With the default manage rate that is 1000 reads, 200 changes or 100 new keys a
 * second per principal. An unknown or NULL name is manage 1, so a bad target
 * never spends the crypto quota.
 */
void kms_ratelimit_classify(const char *operation, enum kms_op_class *cls, double *cost);

void kms_ratelimit_free(struct kms_ratelimit *rl);

#endif
