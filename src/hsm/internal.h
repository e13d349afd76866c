/*
 * What hsm.c and hsm_keys.c share and nobody else sees: the handle's
 * insides, the timing of token calls for the observer, and the handling of
 * a session the token dropped.
 */
#ifndef P11KMS_HSM_INTERNAL_H
#define P11KMS_HSM_INTERNAL_H

#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <stdint.h>
#include <time.h>

#include "common/error.h"
#include "common/keyspec.h"
#include "hsm/hsm.h"

/* PKCS#11 3.0 names p11-kit's header may not have yet. */
#ifndef CKM_EC_MONTGOMERY_KEY_PAIR_GEN
#define CKM_EC_MONTGOMERY_KEY_PAIR_GEN 0x1056UL
#endif
#ifndef CKK_EC_MONTGOMERY
#define CKK_EC_MONTGOMERY 0x41UL
#endif

struct kms_hsm {
    CK_FUNCTION_LIST *fn;
    CK_SLOT_ID slot;
    char *pin;
    size_t pin_len;
    unsigned timeout_ms;

    pthread_mutex_t lock;
    pthread_cond_t available;
    /*
     * Changes to token objects (create, generate, set an attribute, destroy)
     * exclude searches and attribute reads in this process. SoftHSM2 2.6.1's
     * file store is not safe against them: with one thread creating objects
     * while others search, some creations fail with CKR_GENERAL_ERROR although
     * the object is made, and the process loses some of its own objects from
     * its list for good.
     */
    pthread_rwlock_t objects;
    struct kms_session *sessions;
    struct kms_session **free_list;
    size_t nsessions;
    size_t nfree;
    unsigned waiting;

    kms_hsm_observer observe;
    void *observe_arg;

    /* The holder session (kms_hsm_hold) and the epoch of session objects. */
    pthread_mutex_t holder_lock;
    struct kms_session holder;
    int holder_open;
    unsigned long epoch; /* atomic */

    /* kms_hsm_has_mechanism: the token's mechanism list, read once (under caps_lock). */
    pthread_mutex_t caps_lock;
    int mechs_read;
    CK_MECHANISM_TYPE *mechs;
    size_t nmechs;
    /*
     * kms_hsm_oaep_decrypt: per OAEP algorithm, whether the token does the
     * whole of it (KMS_OAEP_TOKEN) or only the raw RSA operation, the padding
     * being removed in the process (KMS_OAEP_RAW). Found on first use (atomic).
     */
    unsigned char oaep_mode[KMS_ALG_COUNT];
};

enum { KMS_OAEP_UNKNOWN = 0, KMS_OAEP_TOKEN, KMS_OAEP_RAW };

struct kms_timed {
    struct kms_hsm *hsm;
    enum kms_hsm_call call;
    struct timespec start;
};

static inline void kms_timed_end(struct kms_timed *t)
{
    struct timespec end;
    if (!t->hsm->observe)
        return;
    clock_gettime(CLOCK_MONOTONIC, &end);
    int64_t ns =
        (int64_t)(end.tv_sec - t->start.tv_sec) * 1000000000 + (end.tv_nsec - t->start.tv_nsec);
    t->hsm->observe(t->hsm->observe_arg, t->call, ns > 0 ? (uint64_t)ns : 0);
}

static inline struct kms_timed kms_timed_begin(struct kms_hsm *hsm, enum kms_hsm_call call)
{
    struct kms_timed t = {hsm, call, {0, 0}};
    if (hsm->observe)
        clock_gettime(CLOCK_MONOTONIC, &t.start);
    return t;
}

/* Times the rest of the enclosing block, however it is left. */
#define TIMED(h, c)                                                           \
    struct kms_timed timed_ __attribute__((cleanup(kms_timed_end), unused)) = \
        kms_timed_begin((h), (c))

/* Whether rv says the session is gone (it must be reopened before reuse). */
static inline int kms_hsm_session_fault(CK_RV rv)
{
    return rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED || rv == CKR_DEVICE_ERROR ||
           rv == CKR_DEVICE_REMOVED || rv == CKR_TOKEN_NOT_PRESENT || rv == CKR_USER_NOT_LOGGED_IN;
}

/*
 * rv as a kms_err, for functions with one cleanup path: records it as the
 * session's last answer and marks the session for reopening when rv says it
 * is gone; logs the failure through kms_hsm_fail.
 */
static inline kms_err kms_hsm_session_err(struct kms_session *s, CK_RV rv, const char *what,
                                          const char *file, int line)
{
    s->last_rv = rv;
    if (rv == CKR_OK)
        return KMS_OK;
    if (kms_hsm_session_fault(rv))
        s->broken = 1;
    return kms_hsm_fail(rv, what, file, line);
}
#define SESSION_ERR(s, rv, what) kms_hsm_session_err((s), (rv), (what), __FILE__, __LINE__)

/* Marks the session for reopening when rv says it is gone, then maps rv and returns. */
#define SESSION_CKR(s, rv, what)                                   \
    do {                                                           \
        CK_RV ckr_ = (rv);                                         \
        (s)->last_rv = ckr_;                                       \
        if (ckr_ != CKR_OK) {                                      \
            if (kms_hsm_session_fault(ckr_))                       \
                (s)->broken = 1;                                   \
            return kms_hsm_fail(ckr_, (what), __FILE__, __LINE__); \
        }                                                          \
    } while (0)

/*
 * The answer to a C_UnwrapKey of a stored key version that failed: a
 * wrapped key the root refuses is KMS_ERR_INTERNAL (a corrupt row, DESIGN
 * §5), a root that is gone KMS_ERR_KEY_UNAVAILABLE, anything else as
 * kms_hsm_fail says.
 */
kms_err kms_hsm_unwrap_failed(struct kms_session *holder, CK_RV rv, const char *file, int line);

#endif
