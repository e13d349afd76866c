#include "config.h"

#include "hsm/hsm.h"
#include "hsm/internal.h"

#include <errno.h>
#include <openssl/crypto.h>
#include <p11-kit/p11-kit.h>
#include <p11-kit/uri.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/blob.h"
#include "common/log.h"

#define APPLICATION "p11kms"

const char *const kms_hsm_call_names[KMS_HSM_CALL_COUNT + 1] = {
    "C_GenerateRandom",
    "C_GenerateKey",
    "C_Encrypt",
    "C_Decrypt",
    "C_CreateObject",
    "C_SetAttributeValue",
    "C_DestroyObject",
    "C_FindObjects",
    "C_GetAttributeValue",
    "C_Sign",
    "C_WrapKey",
    "C_UnwrapKey",
    "C_GenerateKeyPair",
    "C_DeriveKey",
    NULL,
};

/* The return values kms_hsm_fail counts by name; the last row counts every other. */
/* clang-format off */
#define NAMED(rv) {rv, #rv}
/* clang-format on */
static const struct {
    CK_RV rv;
    const char *name;
} failure_kinds[] = {
    NAMED(CKR_DEVICE_ERROR),
    NAMED(CKR_DEVICE_REMOVED),
    NAMED(CKR_DEVICE_MEMORY),
    NAMED(CKR_TOKEN_NOT_PRESENT),
    NAMED(CKR_TOKEN_NOT_RECOGNIZED),
    NAMED(CKR_SESSION_HANDLE_INVALID),
    NAMED(CKR_SESSION_CLOSED),
    NAMED(CKR_USER_NOT_LOGGED_IN),
    NAMED(CKR_CRYPTOKI_NOT_INITIALIZED),
    NAMED(CKR_KEY_HANDLE_INVALID),
    NAMED(CKR_HOST_MEMORY),
    NAMED(CKR_GENERAL_ERROR),
    NAMED(CKR_FUNCTION_FAILED),
    NAMED(CKR_MECHANISM_INVALID),
    NAMED(CKR_OPERATION_ACTIVE),
    NAMED(CKR_WRAPPED_KEY_INVALID),
    NAMED(CKR_UNWRAPPING_KEY_HANDLE_INVALID),
    {CKR_OK, "other"},
};
#undef NAMED
#define FAILURE_KINDS (sizeof failure_kinds / sizeof failure_kinds[0])
_Static_assert(FAILURE_KINDS == KMS_HSM_FAILURE_KINDS, "hsm.h's count of the rows");

static uint64_t failures[FAILURE_KINDS];

size_t kms_hsm_failures(const char **names, uint64_t *counts, size_t n)
{
    size_t i;
    for (i = 0; i < n && i < FAILURE_KINDS; i++) {
        names[i] = failure_kinds[i].name;
        counts[i] = __atomic_load_n(&failures[i], __ATOMIC_RELAXED);
    }
    return i;
}

static void count_failure(CK_RV rv)
{
    size_t i = 0;
    while (i < FAILURE_KINDS - 1 && failure_kinds[i].rv != rv)
        i++;
    __atomic_fetch_add(&failures[i], 1, __ATOMIC_RELAXED);
}

void kms_hsm_observe(struct kms_hsm *hsm, kms_hsm_observer fn, void *arg)
{
    hsm->observe = fn;
    hsm->observe_arg = arg;
}

void kms_hsm_load(struct kms_hsm *hsm, struct kms_hsm_load *out)
{
    pthread_mutex_lock(&hsm->lock);
    out->sessions = (unsigned)hsm->nsessions;
    out->in_use = (unsigned)(hsm->nsessions - hsm->nfree);
    out->waiting = hsm->waiting;
    pthread_mutex_unlock(&hsm->lock);
}

kms_err kms_hsm_fail(CK_RV rv, const char *what, const char *file, int line)
{
    kms_err e;
    switch (rv) {
    case CKR_DEVICE_ERROR:
    case CKR_DEVICE_REMOVED:
    case CKR_DEVICE_MEMORY:
    case CKR_TOKEN_NOT_PRESENT:
    case CKR_TOKEN_NOT_RECOGNIZED:
    case CKR_SESSION_HANDLE_INVALID:
    case CKR_SESSION_CLOSED:
    case CKR_USER_NOT_LOGGED_IN:
    case CKR_CRYPTOKI_NOT_INITIALIZED: e = KMS_ERR_KEY_UNAVAILABLE; break;
    case CKR_KEY_HANDLE_INVALID:
    case CKR_OBJECT_HANDLE_INVALID: e = KMS_ERR_KEY_UNAVAILABLE; break;
    default: e = KMS_ERR_INTERNAL; break;
    }
    /*
     * An object that vanished (another node removed a superseded record between
     * our search and our read or destroy) is an expected race, not a fault:
     * neither logged as an error nor counted.
     */
    if (rv != CKR_OBJECT_HANDLE_INVALID)
        count_failure(rv);
    kms_log(rv == CKR_OBJECT_HANDLE_INVALID ? KMS_LOG_DEBUG : KMS_LOG_ERROR,
            "%s failed: %s (0x%lx) at %s:%d", what, p11_kit_strerror(rv), (unsigned long)rv, file,
            line);
    return kms_err_set(e, file, line, "The key store could not complete the request");
}

static kms_err load_module(const char *path, CK_FUNCTION_LIST **out)
{
    CK_FUNCTION_LIST *fn = p11_kit_module_load(path, 0);
    KMS_ENSURE(fn != NULL, KMS_ERR_INTERNAL, "cannot load PKCS#11 module %s: %s", path,
               p11_kit_message() ? p11_kit_message() : "unknown error");
    CK_RV rv = p11_kit_module_initialize(fn);
    if (rv != CKR_OK) {
        p11_kit_module_release(fn);
        return kms_hsm_fail(rv, "C_Initialize", __FILE__, __LINE__);
    }
    *out = fn;
    return KMS_OK;
}

static void unload_module(CK_FUNCTION_LIST *fn)
{
    p11_kit_module_finalize(fn);
    p11_kit_module_release(fn);
}

static int token_matches(const char *want, P11KitUri *uri, CK_TOKEN_INFO *info)
{
    if (uri)
        return p11_kit_uri_match_token_info(uri, info);
    size_t n = p11_kit_space_strlen(info->label, sizeof info->label);
    return strlen(want) == n && memcmp(want, info->label, n) == 0;
}

static kms_err find_slot(CK_FUNCTION_LIST *fn, const char *token, CK_SLOT_ID *out)
{
    CK_SLOT_ID slots[64];
    CK_ULONG n = sizeof slots / sizeof slots[0];
    P11KitUri *uri = NULL;
    kms_err rc = KMS_FAIL(KMS_ERR_INTERNAL, "token '%s' not found", token);

    KMS_GUARD_CKR(fn->C_GetSlotList(CK_TRUE, slots, &n), "C_GetSlotList");
    if (strncmp(token, "pkcs11:", 7) == 0) {
        uri = p11_kit_uri_new();
        KMS_ENSURE(uri != NULL, KMS_ERR_INTERNAL, "out of memory");
        if (p11_kit_uri_parse(token, P11_KIT_URI_FOR_TOKEN, uri) != P11_KIT_URI_OK) {
            p11_kit_uri_free(uri);
            return KMS_FAIL(KMS_ERR_INTERNAL, "token URI '%s' is not valid", token);
        }
    }
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        if (fn->C_GetTokenInfo(slots[i], &info) != CKR_OK)
            continue;
        if ((info.flags & CKF_TOKEN_INITIALIZED) && token_matches(token, uri, &info)) {
            *out = slots[i];
            rc = KMS_OK;
            break;
        }
    }
    if (uri)
        p11_kit_uri_free(uri);
    return rc;
}

static kms_err open_session(struct kms_hsm *hsm, CK_SESSION_HANDLE *out)
{
    KMS_GUARD_CKR(
        hsm->fn->C_OpenSession(hsm->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, out),
        "C_OpenSession");
    return KMS_OK;
}

static kms_err login(struct kms_hsm *hsm, CK_SESSION_HANDLE h)
{
    CK_RV rv = hsm->fn->C_Login(h, CKU_USER, (CK_UTF8CHAR *)hsm->pin, hsm->pin_len);
    if (rv == CKR_USER_ALREADY_LOGGED_IN)
        rv = CKR_OK;
    KMS_GUARD_CKR(rv, "C_Login");
    return KMS_OK;
}

kms_err kms_hsm_open(const struct kms_hsm_config *cfg, struct kms_hsm **out)
{
    struct kms_hsm *hsm;
    kms_err rc;
    pthread_condattr_t ca;
    unsigned n = cfg->sessions ? cfg->sessions : 1;

    KMS_ENSURE(cfg->module && cfg->token && cfg->pin, KMS_ERR_INTERNAL,
               "module, token and PIN are required");
    hsm = calloc(1, sizeof *hsm);
    KMS_ENSURE(hsm != NULL, KMS_ERR_INTERNAL, "out of memory");
    pthread_mutex_init(&hsm->lock, NULL);
    pthread_mutex_init(&hsm->holder_lock, NULL);
    pthread_mutex_init(&hsm->caps_lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&hsm->available, &ca);
    pthread_condattr_destroy(&ca);
    pthread_rwlockattr_t ra;
    pthread_rwlockattr_init(&ra);
    /* Searches come often: changes must not wait behind an endless row of them. */
    pthread_rwlockattr_setkind_np(&ra, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&hsm->objects, &ra);
    pthread_rwlockattr_destroy(&ra);
    hsm->timeout_ms = cfg->acquire_timeout_ms ? cfg->acquire_timeout_ms : 2000;
    hsm->pin_len = strlen(cfg->pin);
    hsm->pin = malloc(hsm->pin_len + 1);
    hsm->sessions = calloc(n, sizeof *hsm->sessions);
    hsm->free_list = calloc(n, sizeof *hsm->free_list);
    if (!hsm->pin || !hsm->sessions || !hsm->free_list) {
        kms_hsm_close(hsm);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    memcpy(hsm->pin, cfg->pin, hsm->pin_len + 1);

    rc = load_module(cfg->module, &hsm->fn);
    if (rc == KMS_OK)
        rc = find_slot(hsm->fn, cfg->token, &hsm->slot);
    for (unsigned i = 0; rc == KMS_OK && i < n; i++) {
        hsm->sessions[i].hsm = hsm;
        rc = open_session(hsm, &hsm->sessions[i].handle);
        if (rc == KMS_OK && i == 0 && login(hsm, hsm->sessions[i].handle) != KMS_OK)
            /* At start-up the operator is the one to read why (its log line has the code). */
            rc = KMS_FAIL(KMS_ERR_INTERNAL,
                          "cannot log in to the token %s as its user: check the PIN (pin_file "
                          "or P11KMS_PIN) and that the token is initialised",
                          cfg->token);
        if (rc == KMS_OK) {
            hsm->free_list[hsm->nfree++] = &hsm->sessions[i];
            hsm->nsessions++;
        }
    }
    if (rc == KMS_OK) {
        hsm->holder.hsm = hsm;
        rc = open_session(hsm, &hsm->holder.handle);
        hsm->holder_open = rc == KMS_OK;
    }
    if (rc != KMS_OK) {
        kms_hsm_close(hsm);
        return rc;
    }
    *out = hsm;
    return KMS_OK;
}

void kms_hsm_close(struct kms_hsm *hsm)
{
    if (!hsm)
        return;
    if (hsm->fn) {
        if (hsm->holder_open)
            hsm->fn->C_CloseSession(hsm->holder.handle);
        for (size_t i = 0; i < hsm->nsessions; i++)
            hsm->fn->C_CloseSession(hsm->sessions[i].handle);
        unload_module(hsm->fn);
    }
    if (hsm->pin)
        kms_free_secret(hsm->pin, hsm->pin_len + 1);
    free(hsm->sessions);
    free(hsm->free_list);
    free(hsm->mechs);
    pthread_mutex_destroy(&hsm->caps_lock);
    pthread_cond_destroy(&hsm->available);
    pthread_mutex_destroy(&hsm->lock);
    pthread_mutex_destroy(&hsm->holder_lock);
    pthread_rwlock_destroy(&hsm->objects);
    free(hsm);
}

static kms_err acquire_within(struct kms_hsm *hsm, unsigned timeout_ms, struct kms_session **out);

int kms_hsm_ready(struct kms_hsm *hsm)
{
    struct kms_session *s;
    CK_SESSION_INFO info;
    int ok;

    /* Not long: a probe must not queue behind requests. No free session is not ready. */
    if (acquire_within(hsm, hsm->timeout_ms < 200 ? hsm->timeout_ms : 200, &s) != KMS_OK) {
        kms_err_clear();
        return 0;
    }
    CK_RV rv = hsm->fn->C_GetSessionInfo(s->handle, &info);
    ok = rv == CKR_OK &&
         (info.state == CKS_RW_USER_FUNCTIONS || info.state == CKS_RO_USER_FUNCTIONS);
    if (rv != CKR_OK && kms_hsm_session_fault(rv))
        s->broken = 1;
    kms_hsm_release(s);
    return ok;
}

static kms_err acquire_within(struct kms_hsm *hsm, unsigned timeout_ms, struct kms_session **out)
{
    struct timespec deadline;
    int rc = 0;

    clock_gettime(CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&hsm->lock);
    hsm->waiting++;
    while (hsm->nfree == 0 && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&hsm->available, &hsm->lock, &deadline);
    hsm->waiting--;
    if (hsm->nfree == 0) {
        pthread_mutex_unlock(&hsm->lock);
        return KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT, "No key store session became free in time");
    }
    *out = hsm->free_list[--hsm->nfree];
    pthread_mutex_unlock(&hsm->lock);
    return KMS_OK;
}

static void reopen(struct kms_session *s);

kms_err kms_hsm_acquire(struct kms_hsm *hsm, struct kms_session **out)
{
    KMS_GUARD(acquire_within(hsm, hsm->timeout_ms, out));
    /*
     * A session the token dropped, which could not be replaced when it was
     * released: try again now, and fail rather than use it.
     */
    if ((*out)->broken) {
        reopen(*out);
        if ((*out)->broken) {
            pthread_mutex_lock(&hsm->lock);
            hsm->free_list[hsm->nfree++] = *out;
            pthread_cond_signal(&hsm->available);
            pthread_mutex_unlock(&hsm->lock);
            *out = NULL;
            return KMS_FAIL(KMS_ERR_KEY_UNAVAILABLE, "The key store's token is not available");
        }
    }
    return KMS_OK;
}

/* Replaces a session the token has dropped; logs in again if it must. */
static void reopen(struct kms_session *s)
{
    struct kms_hsm *hsm = s->hsm;
    CK_SESSION_HANDLE h;

    hsm->fn->C_CloseSession(s->handle);
    if (open_session(hsm, &h) != KMS_OK)
        return; /* stays broken; the next user fails and tries again */
    CK_SESSION_INFO info;
    int relogin = 0;
    if (hsm->fn->C_GetSessionInfo(h, &info) != CKR_OK ||
        (info.state != CKS_RW_USER_FUNCTIONS && (relogin = 1, login(hsm, h) != KMS_OK))) {
        hsm->fn->C_CloseSession(h);
        kms_err_clear();
        return;
    }
    s->handle = h;
    s->broken = 0;
    if (relogin || s == &hsm->holder) {
        /* The session objects went with the login or with the holder session. */
        __atomic_add_fetch(&hsm->epoch, 1, __ATOMIC_SEQ_CST);
        kms_info("token: %s; unwrapped keys are unwrapped again as they are used",
                 relogin ? "logged in again" : "holder session reopened");
    }
}

unsigned long kms_hsm_epoch(struct kms_hsm *hsm)
{
    return __atomic_load_n(&hsm->epoch, __ATOMIC_ACQUIRE);
}

kms_err kms_hsm_hold(struct kms_hsm *hsm, struct kms_session **out)
{
    CK_SESSION_INFO info;
    pthread_mutex_lock(&hsm->holder_lock);
    struct kms_session *s = &hsm->holder;
    /* Cheap, and unwraps are rare: make sure the session (and its objects) still stand. */
    if (!s->broken) {
        CK_RV rv = hsm->fn->C_GetSessionInfo(s->handle, &info);
        if (rv != CKR_OK ||
            (info.state != CKS_RW_USER_FUNCTIONS && info.state != CKS_RO_USER_FUNCTIONS))
            s->broken = 1;
    }
    if (s->broken)
        reopen(s);
    if (s->broken) {
        pthread_mutex_unlock(&hsm->holder_lock);
        return KMS_FAIL(KMS_ERR_KEY_UNAVAILABLE, "The key store's token is not available");
    }
    *out = s;
    return KMS_OK;
}

void kms_hsm_unhold(struct kms_session *holder)
{
    pthread_mutex_unlock(&holder->hsm->holder_lock);
}

void kms_hsm_release(struct kms_session *s)
{
    struct kms_hsm *hsm = s->hsm;
    if (s->broken)
        reopen(s);
    pthread_mutex_lock(&hsm->lock);
    hsm->free_list[hsm->nfree++] = s;
    pthread_cond_signal(&hsm->available);
    pthread_mutex_unlock(&hsm->lock);
}

kms_err kms_hsm_random(struct kms_session *s, uint8_t *out, size_t n)
{
    TIMED(s->hsm, KMS_HSM_RANDOM);
    SESSION_CKR(s, s->hsm->fn->C_GenerateRandom(s->handle, out, n), "C_GenerateRandom");
    return KMS_OK;
}

/*
 * A 256-bit secret generated inside the token: token object, private,
 * sensitive, not extractable, usable for exactly one pair of purposes
 * (encrypt/decrypt, or sign/verify).
 */
static kms_err generate_secret(struct kms_session *s, CK_MECHANISM_TYPE gen, CK_KEY_TYPE kt,
                               int crypt, const uint8_t *id, size_t id_len, const char *label,
                               CK_OBJECT_HANDLE *out)
{
    TIMED(s->hsm, KMS_HSM_GENERATE);
    CK_MECHANISM mech = {gen, NULL, 0};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE, c = crypt ? CK_TRUE : CK_FALSE,
             m = crypt ? CK_FALSE : CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},     {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_VALUE_LEN, &len, sizeof len}, {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},   {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no}, {CKA_ENCRYPT, &c, sizeof c},
        {CKA_DECRYPT, &c, sizeof c},       {CKA_WRAP, &no, sizeof no},
        {CKA_UNWRAP, &no, sizeof no},      {CKA_SIGN, &m, sizeof m},
        {CKA_VERIFY, &m, sizeof m},        {CKA_DERIVE, &no, sizeof no},
        {CKA_ID, (void *)id, id_len},      {CKA_LABEL, (void *)label, strlen(label)},
    };
    pthread_rwlock_wrlock(&s->hsm->objects);
    CK_RV rv = s->hsm->fn->C_GenerateKey(s->handle, &mech, tmpl, sizeof tmpl / sizeof tmpl[0], out);
    pthread_rwlock_unlock(&s->hsm->objects);
    SESSION_CKR(s, rv, "C_GenerateKey");
    return KMS_OK;
}

kms_err kms_hsm_generate_root(struct kms_session *s, const uint8_t *id, size_t id_len,
                              const char *label, CK_OBJECT_HANDLE *out)
{
    TIMED(s->hsm, KMS_HSM_GENERATE);
    CK_MECHANISM mech = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG len = 32;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    /*
     * What it unwraps is sensitive and never extractable, whoever asks: with
     * the PIN and a row of the database, nobody can unwrap a version into a
     * readable object.
     */
    CK_ATTRIBUTE unwrapped[] = {
        {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no},
    };
    CK_ATTRIBUTE tmpl[] = {
        {CKA_UNWRAP_TEMPLATE, unwrapped, sizeof unwrapped},
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_VALUE_LEN, &len, sizeof len},
        {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no},
        {CKA_ENCRYPT, &no, sizeof no},
        {CKA_DECRYPT, &no, sizeof no},
        {CKA_WRAP, &yes, sizeof yes},
        {CKA_UNWRAP, &yes, sizeof yes},
        {CKA_SIGN, &no, sizeof no},
        {CKA_VERIFY, &no, sizeof no},
        {CKA_DERIVE, &no, sizeof no},
        {CKA_ID, (void *)id, id_len},
        {CKA_LABEL, (void *)label, strlen(label)},
    };
    pthread_rwlock_wrlock(&s->hsm->objects);
    CK_RV rv = s->hsm->fn->C_GenerateKey(s->handle, &mech, tmpl, sizeof tmpl / sizeof tmpl[0], out);
    pthread_rwlock_unlock(&s->hsm->objects);
    SESSION_CKR(s, rv, "C_GenerateKey (root key)");
    return KMS_OK;
}

kms_err kms_hsm_find_secret(struct kms_session *s, const uint8_t *id, size_t id_len,
                            CK_OBJECT_HANDLE *out)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_ID, (void *)id, id_len}};
    CK_OBJECT_HANDLE *found = NULL;
    size_t n = 0;
    KMS_GUARD(kms_hsm_find(s, tmpl, 2, &found, &n));
    *out = n > 0 ? found[0] : CK_INVALID_HANDLE;
    free(found);
    return KMS_OK;
}

kms_err kms_hsm_new_wrapped_aes(struct kms_session *s, CK_OBJECT_HANDLE root, uint8_t *out,
                                size_t *len)
{
    CK_MECHANISM gen = {CKM_AES_KEY_GEN, NULL, 0}, wrap = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG vlen = 32, wlen = *len;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    /* Extractable so that it can be wrapped: it lives only until the wrap. */
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},       {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_VALUE_LEN, &vlen, sizeof vlen}, {CKA_TOKEN, &no, sizeof no},
        {CKA_PRIVATE, &yes, sizeof yes},     {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &yes, sizeof yes}, {CKA_ENCRYPT, &yes, sizeof yes},
        {CKA_DECRYPT, &yes, sizeof yes},     {CKA_WRAP, &no, sizeof no},
        {CKA_UNWRAP, &no, sizeof no},        {CKA_SIGN, &no, sizeof no},
        {CKA_VERIFY, &no, sizeof no},        {CKA_DERIVE, &no, sizeof no},
    };
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    CK_FUNCTION_LIST *fn = s->hsm->fn;
    CK_RV rv;
    {
        TIMED(s->hsm, KMS_HSM_GENERATE);
        rv = fn->C_GenerateKey(s->handle, &gen, tmpl, sizeof tmpl / sizeof tmpl[0], &h);
    }
    SESSION_CKR(s, rv, "C_GenerateKey (key version)");
    {
        TIMED(s->hsm, KMS_HSM_WRAP);
        rv = fn->C_WrapKey(s->handle, &wrap, root, h, out, &wlen);
    }
    CK_RV drv;
    {
        TIMED(s->hsm, KMS_HSM_DESTROY);
        drv = fn->C_DestroyObject(s->handle, h);
    }
    if (rv == CKR_OK && drv != CKR_OK)
        rv = drv;
    if (rv != CKR_OK)
        OPENSSL_cleanse(out, *len);
    SESSION_CKR(s, rv, "C_WrapKey");
    *len = wlen;
    return KMS_OK;
}

kms_err kms_hsm_unwrap_aes(struct kms_session *holder, CK_OBJECT_HANDLE root,
                           const uint8_t *wrapped, size_t len, CK_OBJECT_HANDLE *out)
{
    TIMED(holder->hsm, KMS_HSM_UNWRAP);
    CK_MECHANISM wrap = {CKM_AES_KEY_WRAP_PAD, NULL, 0};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},     {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_TOKEN, &no, sizeof no},       {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_SENSITIVE, &yes, sizeof yes}, {CKA_EXTRACTABLE, &no, sizeof no},
        {CKA_ENCRYPT, &yes, sizeof yes},   {CKA_DECRYPT, &yes, sizeof yes},
        {CKA_WRAP, &no, sizeof no},        {CKA_UNWRAP, &no, sizeof no},
        {CKA_SIGN, &no, sizeof no},        {CKA_VERIFY, &no, sizeof no},
        {CKA_DERIVE, &no, sizeof no},
    };
    CK_RV rv = holder->hsm->fn->C_UnwrapKey(holder->handle, &wrap, root, (CK_BYTE *)wrapped, len,
                                            tmpl, sizeof tmpl / sizeof tmpl[0], out);
    if (rv != CKR_OK)
        return kms_hsm_unwrap_failed(holder, rv, __FILE__, __LINE__);
    holder->last_rv = rv;
    return KMS_OK;
}

kms_err kms_hsm_unwrap_failed(struct kms_session *holder, CK_RV rv, const char *file, int line)
{
    if (rv == CKR_WRAPPED_KEY_INVALID || rv == CKR_WRAPPED_KEY_LEN_RANGE ||
        rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED ||
        rv == CKR_UNWRAPPING_KEY_HANDLE_INVALID) {
        holder->last_rv = rv;
        count_failure(rv);
        kms_error("C_UnwrapKey refused a stored key version (%s): the database row is corrupt "
                  "or names the wrong root key",
                  p11_kit_strerror(rv));
        return kms_err_set(rv == CKR_UNWRAPPING_KEY_HANDLE_INVALID ? KMS_ERR_KEY_UNAVAILABLE
                                                                   : KMS_ERR_INTERNAL,
                           file, line, "The key store could not unwrap a stored key version");
    }
    return kms_hsm_session_err(holder, rv, "C_UnwrapKey", file, line);
}

kms_err kms_hsm_generate_aes(struct kms_session *s, const uint8_t *id, size_t id_len,
                             const char *label, CK_OBJECT_HANDLE *out)
{
    return generate_secret(s, CKM_AES_KEY_GEN, CKK_AES, 1, id, id_len, label, out);
}

static CK_MECHANISM gcm_mechanism(CK_GCM_PARAMS *p, const uint8_t iv[12], const uint8_t *aad,
                                  size_t aad_len)
{
    p->pIv = (CK_BYTE *)iv;
    p->ulIvLen = 12;
    p->ulIvBits = 96;
    p->pAAD = (CK_BYTE *)aad;
    p->ulAADLen = aad_len;
    p->ulTagBits = 128;
    CK_MECHANISM m = {CKM_AES_GCM, p, sizeof *p};
    return m;
}

kms_err kms_hsm_gcm_encrypt(struct kms_session *s, CK_OBJECT_HANDLE key, const uint8_t iv[12],
                            const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t n,
                            uint8_t *out)
{
    TIMED(s->hsm, KMS_HSM_ENCRYPT);
    CK_GCM_PARAMS params;
    CK_MECHANISM mech = gcm_mechanism(&params, iv, aad, aad_len);
    CK_ULONG out_len = n + 16;
    CK_FUNCTION_LIST *fn = s->hsm->fn;

    SESSION_CKR(s, fn->C_EncryptInit(s->handle, &mech, key), "C_EncryptInit");
    SESSION_CKR(s, fn->C_Encrypt(s->handle, (CK_BYTE *)in, n, out, &out_len), "C_Encrypt");
    KMS_ENSURE(out_len == n + 16, KMS_ERR_INTERNAL, "token returned %lu bytes for GCM, not %zu",
               (unsigned long)out_len, n + 16);
    return KMS_OK;
}

kms_err kms_hsm_gcm_decrypt(struct kms_session *s, CK_OBJECT_HANDLE key, const uint8_t iv[12],
                            const uint8_t *aad, size_t aad_len, const uint8_t *in, size_t n,
                            uint8_t *out)
{
    TIMED(s->hsm, KMS_HSM_DECRYPT);
    CK_GCM_PARAMS params;
    CK_MECHANISM mech = gcm_mechanism(&params, iv, aad, aad_len);
    CK_FUNCTION_LIST *fn = s->hsm->fn;
    CK_RV rv;
    CK_ULONG out_len;
    /* A data key's plaintext fits on the stack (cleansed below); a longer one goes to the heap. */
    uint8_t small[1024 + 16], *tmp;

    KMS_ENSURE(n >= 16, KMS_ERR_INVALID_CIPHERTEXT, "The ciphertext is too short");
    /* Some modules write n bytes before checking the tag; give them room. */
    tmp = n <= sizeof small ? small : malloc(n);
    KMS_ENSURE(tmp != NULL, KMS_ERR_INTERNAL, "out of memory");
    out_len = n;
    rv = fn->C_DecryptInit(s->handle, &mech, key);
    if (rv == CKR_OK)
        rv = fn->C_Decrypt(s->handle, (CK_BYTE *)in, n, tmp, &out_len);
    if (rv == CKR_OK && out_len != n - 16)
        rv = CKR_GENERAL_ERROR;
    if (rv == CKR_OK)
        memcpy(out, tmp, n - 16);
    if (tmp == small)
        OPENSSL_cleanse(small, n);
    else
        kms_free_secret(tmp, n);
    s->last_rv = rv;
    if (rv == CKR_OK)
        return KMS_OK;
    OPENSSL_cleanse(out, n - 16);
    if (kms_hsm_session_fault(rv)) {
        s->broken = 1;
        return kms_hsm_fail(rv, "C_Decrypt", __FILE__, __LINE__);
    }
    if (rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_ENCRYPTED_DATA_LEN_RANGE ||
        rv == CKR_GENERAL_ERROR || rv == CKR_FUNCTION_FAILED) {
        kms_debug("C_Decrypt refused the ciphertext: %s", p11_kit_strerror(rv));
        return KMS_FAIL(KMS_ERR_INVALID_CIPHERTEXT, KMS_BLOB_INVALID);
    }
    return kms_hsm_fail(rv, "C_Decrypt", __FILE__, __LINE__);
}

kms_err kms_hsm_create_data(struct kms_session *s, const char *label, const uint8_t *oid,
                            size_t oid_len, const void *value, size_t n, CK_OBJECT_HANDLE *out)
{
    TIMED(s->hsm, KMS_HSM_CREATE);
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_MODIFIABLE, &yes, sizeof yes},
        {CKA_APPLICATION, (void *)APPLICATION, sizeof APPLICATION - 1},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_OBJECT_ID, (void *)oid, oid_len},
        {CKA_VALUE, (void *)value, n},
    };
    pthread_rwlock_wrlock(&s->hsm->objects);
    CK_RV rv = s->hsm->fn->C_CreateObject(s->handle, tmpl, sizeof tmpl / sizeof tmpl[0], out);
    pthread_rwlock_unlock(&s->hsm->objects);
    SESSION_CKR(s, rv, "C_CreateObject");
    return KMS_OK;
}

kms_err kms_hsm_set_label(struct kms_session *s, CK_OBJECT_HANDLE h, const char *label)
{
    TIMED(s->hsm, KMS_HSM_SET_ATTRIBUTE);
    CK_ATTRIBUTE a = {CKA_LABEL, (void *)label, strlen(label)};
    pthread_rwlock_wrlock(&s->hsm->objects);
    CK_RV rv = s->hsm->fn->C_SetAttributeValue(s->handle, h, &a, 1);
    pthread_rwlock_unlock(&s->hsm->objects);
    SESSION_CKR(s, rv, "C_SetAttributeValue");
    return KMS_OK;
}

kms_err kms_hsm_destroy(struct kms_session *s, CK_OBJECT_HANDLE h)
{
    TIMED(s->hsm, KMS_HSM_DESTROY);
    pthread_rwlock_wrlock(&s->hsm->objects);
    CK_RV rv = s->hsm->fn->C_DestroyObject(s->handle, h);
    pthread_rwlock_unlock(&s->hsm->objects);
    SESSION_CKR(s, rv, "C_DestroyObject");
    return KMS_OK;
}

kms_err kms_hsm_find(struct kms_session *s, CK_ATTRIBUTE *tmpl, CK_ULONG n, CK_OBJECT_HANDLE **out,
                     size_t *count)
{
    TIMED(s->hsm, KMS_HSM_FIND);
    CK_FUNCTION_LIST *fn = s->hsm->fn;
    CK_OBJECT_HANDLE *all = NULL;
    size_t len = 0, cap = 0;
    CK_RV rv;

    pthread_rwlock_rdlock(&s->hsm->objects);
    rv = fn->C_FindObjectsInit(s->handle, tmpl, n);
    if (rv != CKR_OK)
        pthread_rwlock_unlock(&s->hsm->objects);
    SESSION_CKR(s, rv, "C_FindObjectsInit");
    for (;;) {
        CK_ULONG got = 0;
        if (len == cap) {
            size_t ncap = cap ? cap * 2 : 256;
            CK_OBJECT_HANDLE *p = realloc(all, ncap * sizeof *all);
            if (!p) {
                rv = CKR_HOST_MEMORY;
                break;
            }
            all = p;
            cap = ncap;
        }
        rv = fn->C_FindObjects(s->handle, all + len, cap - len, &got);
        if (rv != CKR_OK || got == 0)
            break;
        len += got;
    }
    CK_RV frv = fn->C_FindObjectsFinal(s->handle);
    pthread_rwlock_unlock(&s->hsm->objects);
    if (rv == CKR_OK)
        rv = frv;
    if (rv != CKR_OK) {
        free(all);
        SESSION_CKR(s, rv, "C_FindObjects");
    }
    *out = all;
    *count = len;
    return KMS_OK;
}

#define GUESS 2048 /* bytes kms_hsm_get_bytes offers on its first try */

kms_err kms_hsm_get_bytes(struct kms_session *s, CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type,
                          struct kms_buf *out)
{
    TIMED(s->hsm, KMS_HSM_GET_ATTRIBUTE);
    CK_FUNCTION_LIST *fn = s->hsm->fn;

    /*
     * One call when the value fits in GUESS bytes (labels, ids, most records:
     * at start-up p11kmsd reads tens of thousands of them, and each call
     * costs SoftHSM2 a look at the object's file); else the token says
     * CKR_BUFFER_TOO_SMALL and the length is asked for first.
     */
    KMS_GUARD(kms_buf_reserve(out, GUESS));
    CK_ATTRIBUTE a = {type, out->data + out->len, out->cap - out->len - 1};
    pthread_rwlock_rdlock(&s->hsm->objects);
    CK_RV rv = fn->C_GetAttributeValue(s->handle, h, &a, 1);
    pthread_rwlock_unlock(&s->hsm->objects);
    if (rv == CKR_OK && a.ulValueLen <= out->cap - out->len - 1) {
        out->len += a.ulValueLen;
        return kms_buf_terminate(out);
    }
    a.pValue = NULL;
    a.ulValueLen = 0;
    if (rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL) {
        pthread_rwlock_rdlock(&s->hsm->objects);
        rv = fn->C_GetAttributeValue(s->handle, h, &a, 1);
        pthread_rwlock_unlock(&s->hsm->objects);
    }
    SESSION_CKR(s, rv, "C_GetAttributeValue");
    KMS_ENSURE(a.ulValueLen != CK_UNAVAILABLE_INFORMATION && a.ulValueLen <= (1u << 24),
               KMS_ERR_INTERNAL, "token attribute is unavailable or too large");
    KMS_GUARD(kms_buf_reserve(out, a.ulValueLen));
    a.pValue = out->data + out->len;
    pthread_rwlock_rdlock(&s->hsm->objects);
    rv = fn->C_GetAttributeValue(s->handle, h, &a, 1);
    pthread_rwlock_unlock(&s->hsm->objects);
    SESSION_CKR(s, rv, "C_GetAttributeValue");
    out->len += a.ulValueLen;
    return kms_buf_terminate(out);
}

kms_err kms_hsm_get_attributes(struct kms_session *s, CK_OBJECT_HANDLE h, CK_ATTRIBUTE *tmpl,
                               CK_ULONG n)
{
    TIMED(s->hsm, KMS_HSM_GET_ATTRIBUTE);
    pthread_rwlock_rdlock(&s->hsm->objects);
    CK_RV rv = s->hsm->fn->C_GetAttributeValue(s->handle, h, tmpl, n);
    pthread_rwlock_unlock(&s->hsm->objects);
    if (rv == CKR_BUFFER_TOO_SMALL || rv == CKR_ATTRIBUTE_TYPE_INVALID ||
        rv == CKR_ATTRIBUTE_SENSITIVE)
        return KMS_FAIL(KMS_ERR_NOT_FOUND, "an attribute is not there or does not fit");
    SESSION_CKR(s, rv, "C_GetAttributeValue");
    return KMS_OK;
}

kms_err kms_hsm_init_token(const char *module, const char *label, const char *so_pin,
                           const char *user_pin)
{
    CK_FUNCTION_LIST *fn;
    CK_SLOT_ID slots[64], slot = 0;
    CK_ULONG n = sizeof slots / sizeof slots[0];
    CK_UTF8CHAR padded[32];
    CK_SESSION_HANDLE h;
    CK_RV rv;
    int found = 0;

    KMS_GUARD(load_module(module, &fn));
    rv = fn->C_GetSlotList(CK_TRUE, slots, &n);
    for (CK_ULONG i = 0; rv == CKR_OK && i < n && !found; i++) {
        CK_TOKEN_INFO info;
        if (fn->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
            !(info.flags & CKF_TOKEN_INITIALIZED)) {
            slot = slots[i];
            found = 1;
        }
    }
    if (rv != CKR_OK || !found) {
        unload_module(fn);
        if (rv != CKR_OK)
            return kms_hsm_fail(rv, "C_GetSlotList", __FILE__, __LINE__);
        return KMS_FAIL(KMS_ERR_INTERNAL, "no free slot for a new token");
    }
    memset(padded, ' ', sizeof padded);
    memcpy(padded, label, strlen(label) < sizeof padded ? strlen(label) : sizeof padded);
    rv = fn->C_InitToken(slot, (CK_UTF8CHAR *)so_pin, strlen(so_pin), padded);
    /* SoftHSM2 moves a newly initialised token to a new slot id: find it by label. */
    if (rv == CKR_OK)
        rv = find_slot(fn, label, &slot) == KMS_OK ? CKR_OK : CKR_TOKEN_NOT_PRESENT;
    if (rv == CKR_OK)
        rv = fn->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &h);
    if (rv == CKR_OK) {
        rv = fn->C_Login(h, CKU_SO, (CK_UTF8CHAR *)so_pin, strlen(so_pin));
        if (rv == CKR_OK) {
            rv = fn->C_InitPIN(h, (CK_UTF8CHAR *)user_pin, strlen(user_pin));
            fn->C_Logout(h);
        }
        fn->C_CloseSession(h);
    }
    unload_module(fn);
    KMS_GUARD_CKR(rv, "token initialisation");
    return KMS_OK;
}

/* ---- the audit log's key and records ---------------------------------------- */

kms_err kms_hsm_generate_hmac(struct kms_session *s, const uint8_t *id, size_t id_len,
                              const char *label, CK_OBJECT_HANDLE *out)
{
    return generate_secret(s, CKM_GENERIC_SECRET_KEY_GEN, CKK_GENERIC_SECRET, 0, id, id_len, label,
                           out);
}

kms_err kms_hsm_hmac_sha256(struct kms_session *s, CK_OBJECT_HANDLE key, const uint8_t *data,
                            size_t n, uint8_t out[32])
{
    TIMED(s->hsm, KMS_HSM_SIGN);
    CK_MECHANISM mech = {CKM_SHA256_HMAC, NULL, 0};
    CK_FUNCTION_LIST *fn = s->hsm->fn;
    CK_ULONG out_len = 32;

    SESSION_CKR(s, fn->C_SignInit(s->handle, &mech, key), "C_SignInit");
    SESSION_CKR(s, fn->C_Sign(s->handle, (CK_BYTE *)data, n, out, &out_len), "C_Sign");
    KMS_ENSURE(out_len == 32, KMS_ERR_INTERNAL, "token returned %lu bytes for HMAC-SHA256, not 32",
               (unsigned long)out_len);
    return KMS_OK;
}

kms_err kms_hsm_create_app_data(struct kms_session *s, const char *application, const char *label,
                                const uint8_t *oid, size_t oid_len, const void *value, size_t n,
                                CK_OBJECT_HANDLE *out)
{
    TIMED(s->hsm, KMS_HSM_CREATE);
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},
        {CKA_TOKEN, &yes, sizeof yes},
        {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_MODIFIABLE, &yes, sizeof yes},
        {CKA_APPLICATION, (void *)application, strlen(application)},
        {CKA_LABEL, (void *)label, strlen(label)},
        {CKA_OBJECT_ID, (void *)oid, oid_len},
        {CKA_VALUE, (void *)value, n},
    };
    pthread_rwlock_wrlock(&s->hsm->objects);
    CK_RV rv = s->hsm->fn->C_CreateObject(s->handle, tmpl, sizeof tmpl / sizeof tmpl[0], out);
    pthread_rwlock_unlock(&s->hsm->objects);
    SESSION_CKR(s, rv, "C_CreateObject");
    return KMS_OK;
}
