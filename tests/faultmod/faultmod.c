/*
 * p11kms-faultmod: a PKCS#11 module for tests that forwards every call to a
 * real module (SoftHSM2) and, on request, makes chosen functions fail with
 * chosen CK_RVs or stall (issue 5, item 4).
 *
 * Loading
 *   The module exports C_GetFunctionList only (p11-kit and PyKCS11 load through
 *   it). On the first C_GetFunctionList it reads its environment, once:
 *
 *   P11KMS_FAULT_TARGET   the real module to forward to (dlopen'ed); default the
 *                         SoftHSM2 module found by configure.
 *   P11KMS_FAULT_CONTROL  path of the control file (optional). Statistics are
 *                         written next to it (see below).
 *   P11KMS_FAULTS         rules given directly, separated by ';' (optional).
 *   P11KMS_FAULT_SEED     seed for prob= (optional; default time and pid).
 *
 *   Every function of the PKCS#11 2.40 function list is wrapped; a wrapper
 *   consults the rules and then either forwards the call unchanged or answers
 *   it with the injected CK_RV. The target stays loaded until this module is
 *   unloaded; C_Finalize is forwarded like any other call.
 *
 * Control syntax
 *   One rule a line ('#' starts a comment; blank lines are ignored):
 *
 *     FUNCTION [rv=RV] [TRIGGER] [stall | stall=MS]
 *
 *   FUNCTION  a PKCS#11 2.40 function name (C_Encrypt, C_FindObjectsInit, ...)
 *             or '*' for every function except C_Initialize and C_Finalize
 *             (so that loading and unloading keep working; name them to fault
 *             them). C_GetFunctionList is never faulted.
 *   rv=RV     answer the call with RV instead of forwarding it. RV is a CKR_
 *             name (see rv_names below: CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED,
 *             CKR_SESSION_HANDLE_INVALID, CKR_GENERAL_ERROR, ...) or a number
 *             (0x30, 48). CKR_OK is refused: a call answered without being
 *             forwarded has no outputs.
 *   TRIGGER   which matching calls the rule acts on, counted from the moment
 *             the rule was loaded (one of, default every):
 *               every     every call
 *               nth=N     the Nth call only (N >= 1)
 *               from=N    the Nth call and every later one
 *               prob=P    each call with probability P (0 <= P <= 1)
 *   stall=MS  hold the call MS milliseconds, then forward it (or answer rv=).
 *   stall     hold the call until the rule is gone from the control file (the
 *             same line, compared with blanks collapsed, is no longer there),
 *             then forward it (or answer rv=). Not allowed in P11KMS_FAULTS,
 *             which never changes.
 *
 *   A rule needs rv= or stall. The line `serial TOKEN` names this version of
 *   the file; the statistics echo it so that a reader knows which version
 *   the counts belong to. Examples:
 *
 *     serial 17
 *     C_Encrypt rv=CKR_DEVICE_ERROR nth=3
 *     C_Decrypt rv=CKR_SESSION_HANDLE_INVALID every
 *     C_Sign rv=0x30 prob=0.25
 *     C_FindObjectsInit stall=2000
 *     C_GenerateRandom stall
 *     * rv=CKR_DEVICE_REMOVED from=10
 *
 *   P11KMS_FAULTS='C_Login rv=CKR_PIN_INCORRECT nth=1; C_Encrypt stall=50'
 *
 *   Every rule that matches a call counts it; the first rule (P11KMS_FAULTS
 *   first, then the file from the top) whose trigger fires decides what
 *   happens to it. A line that does not parse is reported on stderr, counted
 *   in the statistics (bad_lines, error) and ignored; the other lines apply.
 *
 * Reloading
 *   The control file is read on every wrapped call (it is small) and parsed
 *   again when its bytes differ from the last version read. Then the file's
 *   rules start afresh (their counts from zero) and so do the statistics. A
 *   missing file means no file rules. Replace the file atomically (write a
 *   temporary file, rename it over the old one): a half-written file would be
 *   read as it stands. Rewriting the same bytes is not a change; the Python
 *   helper (tests/integration/faultmod.py) writes a new serial each time, so
 *   each of its writes restarts the counts.
 *
 * Statistics
 *   With P11KMS_FAULT_CONTROL set, each process writes CONTROL.stats.PID
 *   (replaced atomically through CONTROL.stats.PID.tmp):
 *
 *     pid 1234
 *     serial 17            (the control file's serial; '-' when it has none)
 *     loads 3              (versions of the control file read so far)
 *     bad_lines 0          (lines refused in the version in force and in P11KMS_FAULTS)
 *     error -              (the last refused line's message, or '-')
 *     C_Encrypt calls=4 injected=1 stalled=0 stalling=0
 *
 *   with a line for each function called (or stalled) since the control file
 *   last changed: calls made, calls answered with an injected rv, calls
 *   stalled, and calls stalled right now. A call is counted when it enters
 *   the module, before any stall, and the file is rewritten then (so it is
 *   up to date before the call returns) and again when a stall ends.
 *   "stalling" is a gauge: a change of the control file does not reset it.
 *
 * What an injected fault does to the real module
 *   A faulted call is not forwarded: nothing it would have done happens in
 *   SoftHSM2 (no object made, no login, no session opened or closed). The
 *   exception keeps the real module in the state PKCS#11 gives a failed call:
 *   a failed C_Encrypt, C_Decrypt, C_Sign, C_Verify, C_Digest, their Update
 *   and Final calls, C_DigestKey, C_SignRecover and C_VerifyRecover end the
 *   active operation. So after injecting into one of those the module ends
 *   the real operation itself, with output into its own scratch memory that
 *   it wipes: the one-shot call is made on the caller's input, an Update or
 *   Final is followed by the real Final (C_VerifyFinal with a dummy
 *   signature). The caller sees only the injected rv, and its next
 *   C_EncryptInit on that session works as it would on a real token.
 *   Session-level rvs (CKR_SESSION_HANDLE_INVALID, CKR_DEVICE_REMOVED, ...)
 *   leave the real session open and logged in: the caller must treat them as
 *   the loss of the session (p11kmsd closes it and opens another).
 */
#include "config.h"

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <p11-kit/pkcs11.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef P11KMS_SOFTHSM_MODULE
#define P11KMS_SOFTHSM_MODULE "/usr/lib/softhsm/libsofthsm2.so"
#endif

#define PREFIX "p11kms-faultmod: "
#define MAX_CONTROL 65536 /* bytes of control file read */
#define MAX_RULE_TEXT 200 /* a rule line, blanks collapsed */
#define MAX_SERIAL 64     /* the serial token */
#define STALL_POLL_MS 5   /* how often a stall without end rereads the file */
#define FN_ALL (-1)       /* the rule's function is '*' */

/*
 * The PKCS#11 2.40 function list, in order, without C_GetFunctionList:
 * X(name, how a fault ends the real operation, arity, parameter types...).
 */
#define FAULT_FUNCTIONS(X)                                                                         \
    X(C_Initialize, NONE, 1, CK_VOID_PTR)                                                          \
    X(C_Finalize, NONE, 1, CK_VOID_PTR)                                                            \
    X(C_GetInfo, NONE, 1, CK_INFO_PTR)                                                             \
    X(C_GetSlotList, NONE, 3, CK_BBOOL, CK_SLOT_ID_PTR, CK_ULONG_PTR)                              \
    X(C_GetSlotInfo, NONE, 2, CK_SLOT_ID, CK_SLOT_INFO_PTR)                                        \
    X(C_GetTokenInfo, NONE, 2, CK_SLOT_ID, CK_TOKEN_INFO_PTR)                                      \
    X(C_GetMechanismList, NONE, 3, CK_SLOT_ID, CK_MECHANISM_TYPE_PTR, CK_ULONG_PTR)                \
    X(C_GetMechanismInfo, NONE, 3, CK_SLOT_ID, CK_MECHANISM_TYPE, CK_MECHANISM_INFO_PTR)           \
    X(C_InitToken, NONE, 4, CK_SLOT_ID, CK_UTF8CHAR_PTR, CK_ULONG, CK_UTF8CHAR_PTR)                \
    X(C_InitPIN, NONE, 3, CK_SESSION_HANDLE, CK_UTF8CHAR_PTR, CK_ULONG)                            \
    X(C_SetPIN, NONE, 5, CK_SESSION_HANDLE, CK_UTF8CHAR_PTR, CK_ULONG, CK_UTF8CHAR_PTR, CK_ULONG)  \
    X(C_OpenSession, NONE, 5, CK_SLOT_ID, CK_FLAGS, CK_VOID_PTR, CK_NOTIFY, CK_SESSION_HANDLE_PTR) \
    X(C_CloseSession, NONE, 1, CK_SESSION_HANDLE)                                                  \
    X(C_CloseAllSessions, NONE, 1, CK_SLOT_ID)                                                     \
    X(C_GetSessionInfo, NONE, 2, CK_SESSION_HANDLE, CK_SESSION_INFO_PTR)                           \
    X(C_GetOperationState, NONE, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG_PTR)                  \
    X(C_SetOperationState, NONE, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_OBJECT_HANDLE,    \
      CK_OBJECT_HANDLE)                                                                            \
    X(C_Login, NONE, 4, CK_SESSION_HANDLE, CK_USER_TYPE, CK_UTF8CHAR_PTR, CK_ULONG)                \
    X(C_Logout, NONE, 1, CK_SESSION_HANDLE)                                                        \
    X(C_CreateObject, NONE, 4, CK_SESSION_HANDLE, CK_ATTRIBUTE_PTR, CK_ULONG,                      \
      CK_OBJECT_HANDLE_PTR)                                                                        \
    X(C_CopyObject, NONE, 5, CK_SESSION_HANDLE, CK_OBJECT_HANDLE, CK_ATTRIBUTE_PTR, CK_ULONG,      \
      CK_OBJECT_HANDLE_PTR)                                                                        \
    X(C_DestroyObject, NONE, 2, CK_SESSION_HANDLE, CK_OBJECT_HANDLE)                               \
    X(C_GetObjectSize, NONE, 3, CK_SESSION_HANDLE, CK_OBJECT_HANDLE, CK_ULONG_PTR)                 \
    X(C_GetAttributeValue, NONE, 4, CK_SESSION_HANDLE, CK_OBJECT_HANDLE, CK_ATTRIBUTE_PTR,         \
      CK_ULONG)                                                                                    \
    X(C_SetAttributeValue, NONE, 4, CK_SESSION_HANDLE, CK_OBJECT_HANDLE, CK_ATTRIBUTE_PTR,         \
      CK_ULONG)                                                                                    \
    X(C_FindObjectsInit, NONE, 3, CK_SESSION_HANDLE, CK_ATTRIBUTE_PTR, CK_ULONG)                   \
    X(C_FindObjects, NONE, 4, CK_SESSION_HANDLE, CK_OBJECT_HANDLE_PTR, CK_ULONG, CK_ULONG_PTR)     \
    X(C_FindObjectsFinal, NONE, 1, CK_SESSION_HANDLE)                                              \
    X(C_EncryptInit, NONE, 3, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)               \
    X(C_Encrypt, ONESHOT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR)  \
    X(C_EncryptUpdate, ENCRYPT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR,          \
      CK_ULONG_PTR)                                                                                \
    X(C_EncryptFinal, ENCRYPT, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG_PTR)                    \
    X(C_DecryptInit, NONE, 3, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)               \
    X(C_Decrypt, ONESHOT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR)  \
    X(C_DecryptUpdate, DECRYPT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR,          \
      CK_ULONG_PTR)                                                                                \
    X(C_DecryptFinal, DECRYPT, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG_PTR)                    \
    X(C_DigestInit, NONE, 2, CK_SESSION_HANDLE, CK_MECHANISM_PTR)                                  \
    X(C_Digest, ONESHOT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR)   \
    X(C_DigestUpdate, DIGEST, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG)                         \
    X(C_DigestKey, DIGEST, 2, CK_SESSION_HANDLE, CK_OBJECT_HANDLE)                                 \
    X(C_DigestFinal, DIGEST, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG_PTR)                      \
    X(C_SignInit, NONE, 3, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)                  \
    X(C_Sign, ONESHOT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR)     \
    X(C_SignUpdate, SIGN, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG)                             \
    X(C_SignFinal, SIGN, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG_PTR)                          \
    X(C_SignRecoverInit, NONE, 3, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)           \
    X(C_SignRecover, ONESHOT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR,            \
      CK_ULONG_PTR)                                                                                \
    X(C_VerifyInit, NONE, 3, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)                \
    X(C_Verify, FORWARD, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG)       \
    X(C_VerifyUpdate, VERIFY, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG)                         \
    X(C_VerifyFinal, FORWARD, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG)                         \
    X(C_VerifyRecoverInit, NONE, 3, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE)         \
    X(C_VerifyRecover, ONESHOT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR,          \
      CK_ULONG_PTR)                                                                                \
    X(C_DigestEncryptUpdate, DIGEST_ENCRYPT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG,          \
      CK_BYTE_PTR, CK_ULONG_PTR)                                                                   \
    X(C_DecryptDigestUpdate, DECRYPT_DIGEST, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG,          \
      CK_BYTE_PTR, CK_ULONG_PTR)                                                                   \
    X(C_SignEncryptUpdate, SIGN_ENCRYPT, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, \
      CK_ULONG_PTR)                                                                                \
    X(C_DecryptVerifyUpdate, DECRYPT_VERIFY, 5, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG,          \
      CK_BYTE_PTR, CK_ULONG_PTR)                                                                   \
    X(C_GenerateKey, NONE, 5, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_ATTRIBUTE_PTR, CK_ULONG,     \
      CK_OBJECT_HANDLE_PTR)                                                                        \
    X(C_GenerateKeyPair, NONE, 8, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_ATTRIBUTE_PTR, CK_ULONG, \
      CK_ATTRIBUTE_PTR, CK_ULONG, CK_OBJECT_HANDLE_PTR, CK_OBJECT_HANDLE_PTR)                      \
    X(C_WrapKey, NONE, 6, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE, CK_OBJECT_HANDLE, \
      CK_BYTE_PTR, CK_ULONG_PTR)                                                                   \
    X(C_UnwrapKey, NONE, 8, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE, CK_BYTE_PTR,    \
      CK_ULONG, CK_ATTRIBUTE_PTR, CK_ULONG, CK_OBJECT_HANDLE_PTR)                                  \
    X(C_DeriveKey, NONE, 6, CK_SESSION_HANDLE, CK_MECHANISM_PTR, CK_OBJECT_HANDLE,                 \
      CK_ATTRIBUTE_PTR, CK_ULONG, CK_OBJECT_HANDLE_PTR)                                            \
    X(C_SeedRandom, NONE, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG)                             \
    X(C_GenerateRandom, NONE, 3, CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG)                         \
    X(C_GetFunctionStatus, NONE, 1, CK_SESSION_HANDLE)                                             \
    X(C_CancelFunction, NONE, 1, CK_SESSION_HANDLE)                                                \
    X(C_WaitForSlotEvent, NONE, 3, CK_FLAGS, CK_SLOT_ID_PTR, CK_VOID_PTR)

#define ENUM_ENTRY(name, end, n, ...) FN_##name,
enum { FAULT_FUNCTIONS(ENUM_ENTRY) FN_COUNT };

#define NAME_ENTRY(name, end, n, ...) #name,
static const char *const fn_names[FN_COUNT] = {FAULT_FUNCTIONS(NAME_ENTRY)};

/* ---- rules ------------------------------------------------------------------------------ */

enum trigger { TRIGGER_EVERY, TRIGGER_NTH, TRIGGER_FROM, TRIGGER_PROB };
enum stall { STALL_NONE, STALL_TIMED, STALL_UNTIL_CLEARED };

struct rule {
    int fn; /* FN_x, or FN_ALL */
    enum trigger trigger;
    unsigned long n; /* for nth= and from= */
    double prob;
    int has_rv;
    CK_RV rv;
    enum stall stall;
    unsigned long stall_ms;
    unsigned long calls;      /* matching calls since the rule was loaded */
    char text[MAX_RULE_TEXT]; /* the line, blanks collapsed: names a stall without end */
};

struct rules {
    struct rule *v;
    size_t n;
};

/* What one call is to suffer: a copy, so that it outlives a reload. */
struct action {
    int fn;
    int has_rv;
    CK_RV rv;
    enum stall stall;
    unsigned long stall_ms;
    char text[MAX_RULE_TEXT];
};

struct fn_stats {
    unsigned long calls, injected, stalled;
    unsigned long stalling; /* a gauge: not reset when the file changes */
};

#define RV_NAME(x) \
    {              \
#x, x      \
    }
static const struct {
    const char *name;
    CK_RV rv;
} rv_names[] = {
    RV_NAME(CKR_CANCEL),
    RV_NAME(CKR_HOST_MEMORY),
    RV_NAME(CKR_SLOT_ID_INVALID),
    RV_NAME(CKR_GENERAL_ERROR),
    RV_NAME(CKR_FUNCTION_FAILED),
    RV_NAME(CKR_ARGUMENTS_BAD),
    RV_NAME(CKR_ATTRIBUTE_VALUE_INVALID),
    RV_NAME(CKR_DATA_INVALID),
    RV_NAME(CKR_DATA_LEN_RANGE),
    RV_NAME(CKR_DEVICE_ERROR),
    RV_NAME(CKR_DEVICE_MEMORY),
    RV_NAME(CKR_DEVICE_REMOVED),
    RV_NAME(CKR_ENCRYPTED_DATA_INVALID),
    RV_NAME(CKR_ENCRYPTED_DATA_LEN_RANGE),
    RV_NAME(CKR_FUNCTION_CANCELED),
    RV_NAME(CKR_FUNCTION_NOT_SUPPORTED),
    RV_NAME(CKR_KEY_HANDLE_INVALID),
    RV_NAME(CKR_MECHANISM_INVALID),
    RV_NAME(CKR_OBJECT_HANDLE_INVALID),
    RV_NAME(CKR_OPERATION_ACTIVE),
    RV_NAME(CKR_OPERATION_NOT_INITIALIZED),
    RV_NAME(CKR_PIN_INCORRECT),
    RV_NAME(CKR_PIN_LOCKED),
    RV_NAME(CKR_SESSION_CLOSED),
    RV_NAME(CKR_SESSION_COUNT),
    RV_NAME(CKR_SESSION_HANDLE_INVALID),
    RV_NAME(CKR_SIGNATURE_INVALID),
    RV_NAME(CKR_TEMPLATE_INCOMPLETE),
    RV_NAME(CKR_TEMPLATE_INCONSISTENT),
    RV_NAME(CKR_TOKEN_NOT_PRESENT),
    RV_NAME(CKR_TOKEN_NOT_RECOGNIZED),
    RV_NAME(CKR_USER_ALREADY_LOGGED_IN),
    RV_NAME(CKR_USER_NOT_LOGGED_IN),
    RV_NAME(CKR_RANDOM_NO_RNG),
    RV_NAME(CKR_BUFFER_TOO_SMALL),
    RV_NAME(CKR_CRYPTOKI_NOT_INITIALIZED),
    RV_NAME(CKR_CRYPTOKI_ALREADY_INITIALIZED),
};

/* ---- state ---------------------------------------------------------------------------- */

/* Set once by load_target (pthread_once), read-only afterwards. */
static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static CK_RV load_rv = CKR_GENERAL_ERROR;
static void *target_handle;
static CK_FUNCTION_LIST *real;
static char *control_path;

/* Everything below is guarded by lock, which is never held while forwarding or stalling. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct rules env_rules, file_rules;
static char *content; /* the control file as last read */
static size_t content_len;
static int have_content; /* the file existed when last read */
static char read_buf[MAX_CONTROL + 1];
static char serial[MAX_SERIAL] = "-";
static unsigned long loads;
static unsigned long env_bad_lines, file_bad_lines;
static char last_error[256] = "-";
static int stats_failed; /* a write of the statistics failed (reported once) */
static struct fn_stats stats[FN_COUNT];
static uint64_t rng_state;

__attribute__((format(printf, 1, 2))) static void report(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs(PREFIX, stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* ---- parsing -------------------------------------------------------------------------- */

static int parse_ulong(const char *s, int base, unsigned long *out)
{
    char *end;
    if (*s == '\0' || *s == '-' || *s == '+')
        return -1;
    errno = 0;
    unsigned long v = strtoul(s, &end, base);
    if (errno != 0 || *end != '\0')
        return -1;
    *out = v;
    return 0;
}

static int parse_rv(const char *s, CK_RV *out)
{
    unsigned long v;
    for (size_t i = 0; i < sizeof rv_names / sizeof rv_names[0]; i++) {
        if (strcmp(s, rv_names[i].name) == 0) {
            *out = rv_names[i].rv;
            return 0;
        }
    }
    if (parse_ulong(s, 0, &v) != 0 || v == CKR_OK)
        return -1;
    *out = v;
    return 0;
}

static int function_index(const char *name)
{
    if (strcmp(name, "*") == 0)
        return FN_ALL;
    for (int i = 0; i < FN_COUNT; i++) {
        if (strcmp(name, fn_names[i]) == 0)
            return i;
    }
    return -2;
}

/* Records a refused line: on stderr, in the counts and as the last error. */
static void refuse_locked(const char *where, unsigned lineno, const char *why, const char *token,
                          int from_env)
{
    snprintf(last_error, sizeof last_error, "%s:%u: %s%s%s", where, lineno, why, token ? ": " : "",
             token ? token : "");
    report("%s (line ignored)", last_error);
    if (from_env)
        env_bad_lines++;
    else
        file_bad_lines++;
}

/*
 * Parses one rule line (comment already cut off) into *r.
 * @returns 1 for a rule, 0 for a blank or serial line, -1 for a refused line.
 */
static int parse_line_locked(char *line, const char *where, unsigned lineno, int from_env,
                             struct rule *r)
{
    char *save = NULL;
    char *tok = strtok_r(line, " \t\r\v\f", &save);
    int have_trigger = 0;
    size_t used;

    if (tok == NULL)
        return 0;
    memset(r, 0, sizeof *r);
    if (strcmp(tok, "serial") == 0) {
        char *value = strtok_r(NULL, " \t\r\v\f", &save);
        if (value == NULL || strtok_r(NULL, " \t\r\v\f", &save) != NULL ||
            strlen(value) >= sizeof serial) {
            refuse_locked(where, lineno, "serial takes one word of at most 63 characters", NULL,
                          from_env);
            return -1;
        }
        memcpy(serial, value, strlen(value) + 1);
        return 0;
    }
    r->fn = function_index(tok);
    if (r->fn == -2) {
        refuse_locked(where, lineno, "unknown function", tok, from_env);
        return -1;
    }
    used = (size_t)snprintf(r->text, sizeof r->text, "%s", tok);
    while ((tok = strtok_r(NULL, " \t\r\v\f", &save)) != NULL) {
        int is_trigger = 0;
        if (strncmp(tok, "rv=", 3) == 0) {
            if (r->has_rv || parse_rv(tok + 3, &r->rv) != 0) {
                refuse_locked(where, lineno, "bad or repeated rv (CKR_ name or number, not CKR_OK)",
                              tok, from_env);
                return -1;
            }
            r->has_rv = 1;
        } else if (strcmp(tok, "every") == 0) {
            r->trigger = TRIGGER_EVERY;
            is_trigger = 1;
        } else if (strncmp(tok, "nth=", 4) == 0 || strncmp(tok, "from=", 5) == 0) {
            int nth = tok[0] == 'n';
            if (parse_ulong(tok + (nth ? 4 : 5), 10, &r->n) != 0 || r->n == 0) {
                refuse_locked(where, lineno, "nth= and from= take a count from 1", tok, from_env);
                return -1;
            }
            r->trigger = nth ? TRIGGER_NTH : TRIGGER_FROM;
            is_trigger = 1;
        } else if (strncmp(tok, "prob=", 5) == 0) {
            char *end;
            errno = 0;
            r->prob = strtod(tok + 5, &end);
            if (tok[5] == '\0' || *end != '\0' || errno != 0 || !(r->prob >= 0.0) ||
                r->prob > 1.0) {
                refuse_locked(where, lineno, "prob= takes a number from 0 to 1", tok, from_env);
                return -1;
            }
            r->trigger = TRIGGER_PROB;
            is_trigger = 1;
        } else if (strcmp(tok, "stall") == 0 || strncmp(tok, "stall=", 6) == 0) {
            if (r->stall != STALL_NONE) {
                refuse_locked(where, lineno, "repeated stall", tok, from_env);
                return -1;
            }
            if (tok[5] == '\0') {
                r->stall = STALL_UNTIL_CLEARED;
            } else if (parse_ulong(tok + 6, 10, &r->stall_ms) != 0) {
                refuse_locked(where, lineno, "stall= takes milliseconds", tok, from_env);
                return -1;
            } else {
                r->stall = STALL_TIMED;
            }
        } else {
            refuse_locked(where, lineno, "unknown word", tok, from_env);
            return -1;
        }
        if (is_trigger && have_trigger++) {
            refuse_locked(where, lineno, "more than one of every, nth=, from=, prob=", tok,
                          from_env);
            return -1;
        }
        used += (size_t)snprintf(r->text + used, sizeof r->text - used, " %s", tok);
        if (used >= sizeof r->text) {
            refuse_locked(where, lineno, "line too long", NULL, from_env);
            return -1;
        }
    }
    if (!r->has_rv && r->stall == STALL_NONE) {
        refuse_locked(where, lineno, "a rule needs rv= or stall", NULL, from_env);
        return -1;
    }
    if (from_env && r->stall == STALL_UNTIL_CLEARED) {
        refuse_locked(where, lineno, "a stall without end cannot be cleared in P11KMS_FAULTS", NULL,
                      from_env);
        return -1;
    }
    return 1;
}

/*
 * Parses text (rules separated by newlines, and also by ';' when from_env)
 * into *out, which it replaces.
 */
static void parse_rules_locked(const char *text, size_t len, const char *where, int from_env,
                               struct rules *out)
{
    struct rules rs = {NULL, 0};
    size_t cap = 0;
    unsigned lineno = 0;
    size_t pos = 0;

    while (pos < len) {
        char line[1024];
        size_t start = pos, end = pos;
        while (end < len && text[end] != '\n' && !(from_env && text[end] == ';'))
            end++;
        lineno++;
        size_t n = end - start;
        pos = end + 1;
        if (n >= sizeof line) {
            refuse_locked(where, lineno, "line too long", NULL, from_env);
            continue;
        }
        memcpy(line, text + start, n);
        line[n] = '\0';
        char *hash = strchr(line, '#');
        if (hash)
            *hash = '\0';
        struct rule r;
        if (parse_line_locked(line, where, lineno, from_env, &r) != 1)
            continue;
        if (rs.n == cap) {
            size_t ncap = cap ? cap * 2 : 8;
            struct rule *v = realloc(rs.v, ncap * sizeof *v);
            if (v == NULL) {
                report("out of memory: rule ignored");
                continue;
            }
            rs.v = v;
            cap = ncap;
        }
        rs.v[rs.n++] = r;
    }
    free(out->v);
    *out = rs;
}

/* ---- the control file and the statistics ------------------------------------------------ */

static void write_stats_locked(void)
{
    char path[PATH_MAX], tmp[PATH_MAX + 8];
    FILE *f;
    int ok;

    if (control_path == NULL)
        return;
    snprintf(path, sizeof path, "%s.stats.%ld", control_path, (long)getpid());
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    f = fopen(tmp, "we");
    if (f == NULL) {
        ok = 0;
    } else {
        fprintf(f, "pid %ld\nserial %s\nloads %lu\nbad_lines %lu\nerror %s\n", (long)getpid(),
                serial, loads, env_bad_lines + file_bad_lines, last_error);
        for (int i = 0; i < FN_COUNT; i++) {
            const struct fn_stats *s = &stats[i];
            if (s->calls || s->stalling)
                fprintf(f, "%s calls=%lu injected=%lu stalled=%lu stalling=%lu\n", fn_names[i],
                        s->calls, s->injected, s->stalled, s->stalling);
        }
        ok = fclose(f) == 0 && rename(tmp, path) == 0;
    }
    if (!ok) {
        if (!stats_failed)
            report("cannot write %s: %s", path, strerror(errno));
        stats_failed = 1;
        unlink(tmp);
    }
}

/*
 * Reads the control file into read_buf.
 * @returns its length, 0 with *exists = 0 when it is missing, -1 on error.
 */
static long read_control_locked(int *exists)
{
    int fd = open(control_path, O_RDONLY | O_CLOEXEC);
    size_t len = 0;

    *exists = fd >= 0;
    if (fd < 0)
        return errno == ENOENT ? 0 : -1;
    while (len < sizeof read_buf) {
        ssize_t n = read(fd, read_buf + len, sizeof read_buf - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            close(fd);
            return -1;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    if (len > MAX_CONTROL) {
        errno = EFBIG;
        return -1;
    }
    return (long)len;
}

/*
 * Rereads the control file; when its bytes changed, parses it again and
 * restarts the rules' and the statistics' counts.
 * @returns 1 when it reloaded, 0 otherwise.
 */
static int refresh_locked(void)
{
    int exists;
    long len;

    if (control_path == NULL)
        return 0;
    len = read_control_locked(&exists);
    if (len < 0) {
        /* Keep the rules in force: a transient error must not clear a stall. */
        snprintf(last_error, sizeof last_error, "cannot read %s: %s", control_path,
                 strerror(errno));
        return 0;
    }
    if (exists == have_content && (size_t)len == content_len &&
        (len == 0 || memcmp(content, read_buf, (size_t)len) == 0))
        return 0;

    char *copy = malloc((size_t)len + 1);
    if (copy == NULL)
        return 0;
    memcpy(copy, read_buf, (size_t)len);
    free(content);
    content = copy;
    content_len = (size_t)len;
    have_content = exists;

    memcpy(serial, "-", 2);
    file_bad_lines = 0;
    if (env_bad_lines == 0)
        memcpy(last_error, "-", 2);
    parse_rules_locked(content, content_len, control_path, 0, &file_rules);
    for (int i = 0; i < FN_COUNT; i++) {
        stats[i].calls = 0;
        stats[i].injected = 0;
        stats[i].stalled = 0;
    }
    loads++;
    return 1;
}

/* ---- deciding ----------------------------------------------------------------------------- */

/* xorshift64*: good enough to pick calls, and reproducible with P11KMS_FAULT_SEED. */
static double random_unit_locked(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 0x2545F4914F6CDD1DULL) >> 11) * (1.0 / 9007199254740992.0);
}

static int matches(const struct rule *r, int fn)
{
    if (r->fn == FN_ALL)
        return fn != FN_C_Initialize && fn != FN_C_Finalize;
    return r->fn == fn;
}

static int fires_locked(const struct rule *r)
{
    switch (r->trigger) {
    case TRIGGER_EVERY: return 1;
    case TRIGGER_NTH: return r->calls == r->n;
    case TRIGGER_FROM: return r->calls >= r->n;
    case TRIGGER_PROB: return random_unit_locked() < r->prob;
    }
    return 0;
}

/* Counts the call against every matching rule; the first that fires fills *act. */
static int decide_in_locked(struct rules *rs, int fn, int hit, struct action *act)
{
    for (size_t i = 0; i < rs->n; i++) {
        struct rule *r = &rs->v[i];
        if (!matches(r, fn))
            continue;
        r->calls++;
        if (hit || !fires_locked(r))
            continue;
        hit = 1;
        act->fn = fn;
        act->has_rv = r->has_rv;
        act->rv = r->rv;
        act->stall = r->stall;
        act->stall_ms = r->stall_ms;
        memcpy(act->text, r->text, sizeof act->text);
    }
    return hit;
}

static int stall_rule_present_locked(const struct action *act)
{
    for (size_t i = 0; i < file_rules.n; i++) {
        const struct rule *r = &file_rules.v[i];
        if (r->stall == STALL_UNTIL_CLEARED && strcmp(r->text, act->text) == 0)
            return 1;
    }
    return 0;
}

static void sleep_ms(unsigned long ms)
{
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* Holds the calling thread as the rule says; the lock is not held meanwhile. */
static void hold_call(const struct action *act)
{
    if (act->stall == STALL_TIMED) {
        sleep_ms(act->stall_ms);
        return;
    }
    for (;;) {
        int present;
        sleep_ms(STALL_POLL_MS);
        pthread_mutex_lock(&lock);
        if (refresh_locked())
            write_stats_locked();
        present = stall_rule_present_locked(act);
        pthread_mutex_unlock(&lock);
        if (!present)
            return;
    }
}

/*
 * Called by every wrapper before it forwards: counts the call, applies the
 * rules, stalls if one says so.
 * @returns 1 with *rv set when the call is to fail without being forwarded.
 */
static int fault_enter(int fn, CK_RV *rv)
{
    struct action act = {0};
    int hit;

    pthread_mutex_lock(&lock);
    refresh_locked();
    stats[fn].calls++;
    hit = decide_in_locked(&env_rules, fn, 0, &act);
    hit = decide_in_locked(&file_rules, fn, hit, &act);
    if (hit && act.has_rv)
        stats[fn].injected++;
    if (hit && act.stall != STALL_NONE) {
        stats[fn].stalled++;
        stats[fn].stalling++;
    }
    write_stats_locked();
    pthread_mutex_unlock(&lock);

    if (!hit)
        return 0;
    if (act.stall != STALL_NONE) {
        hold_call(&act);
        pthread_mutex_lock(&lock);
        stats[fn].stalling--;
        write_stats_locked();
        pthread_mutex_unlock(&lock);
    }
    if (!act.has_rv)
        return 0;
    *rv = act.rv;
    return 1;
}

/* ---- ending the real operation after an injected failure --------------------------------- */

typedef CK_RV (*oneshot_fn)(CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR);
typedef CK_RV (*final_fn)(CK_SESSION_HANDLE, CK_BYTE_PTR, CK_ULONG_PTR);

static CK_BYTE dummy[1];

/* Runs a length query, then the call into scratch memory, which it wipes. */
static void run_to_end(oneshot_fn one, final_fn fin, CK_SESSION_HANDLE s, CK_BYTE_PTR in,
                       CK_ULONG n)
{
    CK_ULONG len = 0;
    CK_BYTE_PTR buf;

    /* SoftHSM2 refuses a NULL input without ending the operation. */
    if (in == NULL)
        in = dummy;
    if ((one ? one(s, in, n, NULL, &len) : fin(s, NULL, &len)) != CKR_OK)
        return; /* that error ended the operation */
    buf = calloc(1, len ? len : 1);
    if (buf == NULL)
        return;
    if (one)
        one(s, in, n, buf, &len);
    else
        fin(s, buf, &len);
    explicit_bzero(buf, len ? len : 1);
    free(buf);
}

static void end_oneshot(oneshot_fn f, CK_SESSION_HANDLE s, CK_BYTE_PTR in, CK_ULONG n)
{
    run_to_end(f, NULL, s, in, n);
}

static void end_final(final_fn f, CK_SESSION_HANDLE s)
{
    run_to_end(NULL, f, s, NULL, 0);
}

static void end_verify(CK_SESSION_HANDLE s)
{
    /* A signature of the wrong length fails, and a failed C_VerifyFinal ends the operation. */
    real->C_VerifyFinal(s, dummy, sizeof dummy);
}

#define END_NONE(name, ...) ((void)0)
#define END_ONESHOT(name, s, in, n, ...) end_oneshot(real->name, s, in, n)
#define END_FORWARD(name, ...) ((void)real->name(__VA_ARGS__))
#define END_ENCRYPT(name, s, ...) end_final(real->C_EncryptFinal, s)
#define END_DECRYPT(name, s, ...) end_final(real->C_DecryptFinal, s)
#define END_DIGEST(name, s, ...) end_final(real->C_DigestFinal, s)
#define END_SIGN(name, s, ...) end_final(real->C_SignFinal, s)
#define END_VERIFY(name, s, ...) end_verify(s)
#define END_DIGEST_ENCRYPT(name, s, ...) \
    (end_final(real->C_DigestFinal, s), end_final(real->C_EncryptFinal, s))
#define END_DECRYPT_DIGEST(name, s, ...) \
    (end_final(real->C_DecryptFinal, s), end_final(real->C_DigestFinal, s))
#define END_SIGN_ENCRYPT(name, s, ...) \
    (end_final(real->C_SignFinal, s), end_final(real->C_EncryptFinal, s))
#define END_DECRYPT_VERIFY(name, s, ...) (end_final(real->C_DecryptFinal, s), end_verify(s))

/* ---- the wrappers --------------------------------------------------------------------------- */

#define PARAMS_1(t1) t1 a1
#define PARAMS_2(t1, t2) t1 a1, t2 a2
#define PARAMS_3(t1, t2, t3) t1 a1, t2 a2, t3 a3
#define PARAMS_4(t1, t2, t3, t4) t1 a1, t2 a2, t3 a3, t4 a4
#define PARAMS_5(t1, t2, t3, t4, t5) t1 a1, t2 a2, t3 a3, t4 a4, t5 a5
#define PARAMS_6(t1, t2, t3, t4, t5, t6) t1 a1, t2 a2, t3 a3, t4 a4, t5 a5, t6 a6
#define PARAMS_8(t1, t2, t3, t4, t5, t6, t7, t8) \
    t1 a1, t2 a2, t3 a3, t4 a4, t5 a5, t6 a6, t7 a7, t8 a8
#define ARGS_1 a1
#define ARGS_2 a1, a2
#define ARGS_3 a1, a2, a3
#define ARGS_4 a1, a2, a3, a4
#define ARGS_5 a1, a2, a3, a4, a5
#define ARGS_6 a1, a2, a3, a4, a5, a6
#define ARGS_8 a1, a2, a3, a4, a5, a6, a7, a8
/* Expands the argument list before the END_ macro splits it into parameters. */
#define CALL_WITH(m, ...) m(__VA_ARGS__)

#define DEFINE_WRAPPER(name, end, n, ...)              \
    static CK_RV fault_##name(PARAMS_##n(__VA_ARGS__)) \
    {                                                  \
        CK_RV rv;                                      \
        if (real->name == NULL)                        \
            return CKR_FUNCTION_NOT_SUPPORTED;         \
        if (fault_enter(FN_##name, &rv)) {             \
            CALL_WITH(END_##end, name, ARGS_##n);      \
            return rv;                                 \
        }                                              \
        return real->name(ARGS_##n);                   \
    }
FAULT_FUNCTIONS(DEFINE_WRAPPER)

#define LIST_ENTRY(name, end, n, ...) .name = fault_##name,
static CK_FUNCTION_LIST fault_list = {.version = {CRYPTOKI_VERSION_MAJOR, CRYPTOKI_VERSION_MINOR},
                                      .C_GetFunctionList = C_GetFunctionList,
                                      FAULT_FUNCTIONS(LIST_ENTRY)};

/* ---- loading ---------------------------------------------------------------------------- */

static void load_target(void)
{
    const char *path = getenv("P11KMS_FAULT_TARGET");
    const char *control = getenv("P11KMS_FAULT_CONTROL");
    const char *faults = getenv("P11KMS_FAULTS");
    const char *seed = getenv("P11KMS_FAULT_SEED");
    CK_C_GetFunctionList get;
    unsigned long v;

    if (path == NULL || *path == '\0')
        path = P11KMS_SOFTHSM_MODULE;
    target_handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (target_handle == NULL) {
        report("cannot load %s: %s", path, dlerror());
        return;
    }
    get = (CK_C_GetFunctionList)dlsym(target_handle, "C_GetFunctionList");
    if (get == NULL || get(&real) != CKR_OK || real == NULL) {
        report("%s has no usable C_GetFunctionList", path);
        real = NULL;
        return;
    }
    if (control != NULL && *control != '\0') {
        control_path = strdup(control);
        if (control_path == NULL)
            return;
    }
    if (seed != NULL && parse_ulong(seed, 0, &v) == 0)
        rng_state = v;
    else
        rng_state = (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    if (rng_state == 0)
        rng_state = 0x9E3779B97F4A7C15ULL; /* xorshift never leaves 0 */
    pthread_mutex_lock(&lock);
    if (faults != NULL)
        parse_rules_locked(faults, strlen(faults), "P11KMS_FAULTS", 1, &env_rules);
    pthread_mutex_unlock(&lock);
    load_rv = CKR_OK;
}

__attribute__((visibility("default"))) CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list)
{
    if (list == NULL)
        return CKR_ARGUMENTS_BAD;
    pthread_once(&load_once, load_target);
    if (load_rv != CKR_OK)
        return load_rv;
    *list = &fault_list;
    return CKR_OK;
}

__attribute__((destructor)) static void unload(void)
{
    free(env_rules.v);
    free(file_rules.v);
    free(content);
    free(control_path);
    if (target_handle != NULL)
        dlclose(target_handle);
}
