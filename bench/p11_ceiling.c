/*
 * The token's ceiling for p11kmsd's key wrapping (issue 11): raw PKCS#11
 * AES-256-GCM wrap and unwrap of a 32-byte key, as kms_hsm_gcm_encrypt and
 * kms_hsm_gcm_decrypt (src/hsm/hsm.c) do them for GenerateDataKey and Decrypt,
 * with nothing of p11kmsd around them.
 *
 *   SOFTHSM2_CONF=DIR/softhsm2.conf bench/p11_ceiling --token LABEL --pin-file DIR/user.pin
 *       [--module PATH] [--threads T] [--seconds S] [--token-object]
 *
 * The module is --module, else $SOFTHSM_MODULE, else Debian's SoftHSM2; the
 * PIN the first line of --pin-file, else $P11KMS_PIN (never an argument). An
 * AES-256 key is generated as a session object, as p11kmsd's unwrapped key
 * versions are (--token-object: a token object, as the token-only release's
 * keys and token-resident versions are, destroyed at exit). Each of T threads opens
 * its own session and, for S seconds (default 3) per mode, loops
 *   wrap:   C_EncryptInit(CKM_AES_GCM, 12-byte IV, 64-byte AAD, 128-bit tag)
 *           + C_Encrypt of 32 random bytes
 *   unwrap: C_DecryptInit + C_Decrypt of such a ciphertext, the result
 *           compared with the input every CHECK_EVERY calls (exit 1 if not)
 * and prints one line per mode:
 *   p11_wrap threads=1 ops=123456 seconds=3.00 ops_per_s=41152
 * Exits 0, 1 on any failure, 2 on a usage error.
 */
#include "config.h"

#include <p11-kit/p11-kit.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define KEY_LEN 32
#define IV_LEN 12
#define AAD_LEN 64 /* a blob header (21) and a canonical context of a pair or two */
#define TAG_LEN 16
#define CHECK_EVERY 1024
#define MAX_THREADS 64

enum mode { WRAP, UNWRAP };

struct bench {
    CK_FUNCTION_LIST *fn;
    CK_SLOT_ID slot;
    CK_OBJECT_HANDLE key;
    enum mode mode;
    pthread_barrier_t start;
    atomic_int stop;
};

struct worker {
    struct bench *b;
    pthread_t thread;
    uint32_t id;
    int failed;
    uint64_t ops;
    CK_SESSION_HANDLE s;
    uint8_t key[KEY_LEN], aad[AAD_LEN], iv[IV_LEN], ct[KEY_LEN + TAG_LEN];
};

/* The one way to fail: a message on stderr, -1 up to main, exit status 1. */
static int fail(const char *what)
{
    fprintf(stderr, "p11_ceiling: %s\n", what);
    return -1;
}

static int ckr_fail(const char *what, CK_RV rv)
{
    fprintf(stderr, "p11_ceiling: %s: %s (0x%lx)\n", what, p11_kit_strerror(rv), (unsigned long)rv);
    return -1;
}

/* Returns -1 from the enclosing function, with a message, unless the call gives CKR_OK. */
#define GUARD_CKR(call, what)             \
    do {                                  \
        CK_RV rv_ = (call);               \
        if (rv_ != CKR_OK)                \
            return ckr_fail((what), rv_); \
    } while (0)

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* The user PIN: the first line of file, else $P11KMS_PIN. */
static int read_pin(const char *file, char *pin, size_t cap)
{
    const char *env = getenv("P11KMS_PIN");
    if (!file) {
        if (!env || strlen(env) >= cap)
            return fail("no PIN: give --pin-file or set P11KMS_PIN");
        snprintf(pin, cap, "%s", env);
        return 0;
    }
    FILE *f = fopen(file, "r");
    if (!f)
        return fail("cannot open the PIN file");
    setvbuf(f, NULL, _IONBF, 0); /* no copy of the PIN in stdio's buffer */
    if (!fgets(pin, (int)cap, f))
        pin[0] = '\0';
    fclose(f);
    pin[strcspn(pin, "\r\n")] = '\0';
    return *pin ? 0 : fail("the PIN file is empty");
}

static int find_slot(CK_FUNCTION_LIST *fn, const char *label, CK_SLOT_ID *out)
{
    CK_SLOT_ID slots[64];
    CK_ULONG n = sizeof slots / sizeof slots[0];
    GUARD_CKR(fn->C_GetSlotList(CK_TRUE, slots, &n), "C_GetSlotList");
    for (CK_ULONG i = 0; i < n; i++) {
        CK_TOKEN_INFO info;
        if (fn->C_GetTokenInfo(slots[i], &info) != CKR_OK)
            continue;
        size_t len = p11_kit_space_strlen(info.label, sizeof info.label);
        if (strlen(label) == len && memcmp(label, info.label, len) == 0) {
            *out = slots[i];
            return 0;
        }
    }
    return fail("no token with that label");
}

static int generate_key(struct bench *b, CK_SESSION_HANDLE s, CK_BBOOL on_token)
{
    CK_MECHANISM mech = {CKM_AES_KEY_GEN, NULL, 0};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_AES;
    CK_ULONG len = KEY_LEN;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},     {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_VALUE_LEN, &len, sizeof len}, {CKA_TOKEN, &on_token, sizeof on_token},
        {CKA_PRIVATE, &yes, sizeof yes},   {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no}, {CKA_ENCRYPT, &yes, sizeof yes},
        {CKA_DECRYPT, &yes, sizeof yes},   {CKA_LABEL, "p11_ceiling", 11},
    };
    GUARD_CKR(b->fn->C_GenerateKey(s, &mech, tmpl, sizeof tmpl / sizeof tmpl[0], &b->key),
              "C_GenerateKey");
    return 0;
}

/* The mechanism as hsm.c's gcm_mechanism builds it. */
static CK_MECHANISM gcm(struct worker *w, CK_GCM_PARAMS *p)
{
    *p = (CK_GCM_PARAMS){w->iv, IV_LEN, IV_LEN * 8, w->aad, AAD_LEN, TAG_LEN * 8};
    return (CK_MECHANISM){CKM_AES_GCM, p, sizeof *p};
}

static int wrap(struct worker *w)
{
    CK_GCM_PARAMS p;
    CK_MECHANISM m = gcm(w, &p);
    CK_ULONG n = sizeof w->ct;
    GUARD_CKR(w->b->fn->C_EncryptInit(w->s, &m, w->b->key), "C_EncryptInit");
    GUARD_CKR(w->b->fn->C_Encrypt(w->s, w->key, KEY_LEN, w->ct, &n), "C_Encrypt");
    return n == sizeof w->ct ? 0 : fail("C_Encrypt gave the wrong length");
}

/* out has room for the ciphertext's length: some modules write it all before the tag check. */
static int unwrap(struct worker *w, uint8_t out[KEY_LEN + TAG_LEN])
{
    CK_GCM_PARAMS p;
    CK_MECHANISM m = gcm(w, &p);
    CK_ULONG n = KEY_LEN + TAG_LEN;
    GUARD_CKR(w->b->fn->C_DecryptInit(w->s, &m, w->b->key), "C_DecryptInit");
    GUARD_CKR(w->b->fn->C_Decrypt(w->s, w->ct, sizeof w->ct, out, &n), "C_Decrypt");
    return n == KEY_LEN ? 0 : fail("C_Decrypt gave the wrong length");
}

/* The thread's session, a random key to wrap and, for unwrap, its ciphertext. */
static int prepare(struct worker *w)
{
    GUARD_CKR(w->b->fn->C_OpenSession(w->b->slot, CKF_SERIAL_SESSION, NULL, NULL, &w->s),
              "C_OpenSession");
    GUARD_CKR(w->b->fn->C_GenerateRandom(w->s, w->key, sizeof w->key), "C_GenerateRandom");
    memset(w->aad, 'a', sizeof w->aad);
    memcpy(w->iv, &w->id, sizeof w->id); /* IVs: the thread's id, then a counter */
    return w->b->mode == UNWRAP ? wrap(w) : 0;
}

static int loop(struct worker *w)
{
    uint8_t pt[KEY_LEN + TAG_LEN];
    for (uint64_t i = 1; !atomic_load_explicit(&w->b->stop, memory_order_relaxed); i++) {
        if (w->b->mode == WRAP) {
            memcpy(w->iv + 4, &i, sizeof i);
            if (wrap(w) != 0)
                return -1;
        } else {
            if (unwrap(w, pt) != 0)
                return -1;
            if (i % CHECK_EVERY == 1 && memcmp(pt, w->key, KEY_LEN) != 0)
                return fail("C_Decrypt did not give back the wrapped key");
        }
        w->ops++;
    }
    return 0;
}

/* Every worker reaches the start barrier exactly once, failed or not. */
static void *worker_main(void *arg)
{
    struct worker *w = arg;
    w->failed = prepare(w);
    pthread_barrier_wait(&w->b->start);
    if (!w->failed)
        w->failed = loop(w);
    if (w->s != CK_INVALID_HANDLE)
        w->b->fn->C_CloseSession(w->s);
    return NULL;
}

static int measure(struct bench *b, enum mode mode, unsigned threads, double seconds)
{
    struct worker w[MAX_THREADS];
    uint64_t ops = 0;
    int failed = 0;

    b->mode = mode;
    atomic_store(&b->stop, 0);
    pthread_barrier_init(&b->start, NULL, threads + 1);
    for (unsigned i = 0; i < threads; i++) {
        w[i] = (struct worker){.b = b, .id = i, .s = CK_INVALID_HANDLE};
        if (pthread_create(&w[i].thread, NULL, worker_main, &w[i]) != 0) {
            fail("cannot start a thread");
            exit(1); /* those started wait at the barrier for good */
        }
    }
    pthread_barrier_wait(&b->start);
    double t0 = now_s();
    struct timespec nap = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    nanosleep(&nap, NULL);
    atomic_store(&b->stop, 1);
    for (unsigned i = 0; i < threads; i++) {
        pthread_join(w[i].thread, NULL);
        ops += w[i].ops;
        failed |= w[i].failed;
    }
    double dt = now_s() - t0;
    pthread_barrier_destroy(&b->start);
    if (failed)
        return -1;
    printf("%s threads=%u ops=%llu seconds=%.2f ops_per_s=%.0f\n",
           mode == WRAP ? "p11_wrap" : "p11_unwrap", threads, (unsigned long long)ops, dt,
           (double)ops / dt);
    fflush(stdout);
    return 0;
}

struct opts {
    const char *module, *token, *pin_file;
    unsigned threads;
    double seconds;
    CK_BBOOL token_object;
};

static int usage(void)
{
    fprintf(stderr, "usage: p11_ceiling --token LABEL [--pin-file FILE] [--module PATH]\n"
                    "                   [--threads T] [--seconds S] [--token-object]\n");
    return 2;
}

static int parse(int argc, char **argv, struct opts *o)
{
    const char *env = getenv("SOFTHSM_MODULE");
    *o = (struct opts){env && *env ? env : DEFAULT_MODULE, NULL, NULL, 1, 3.0, CK_FALSE};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--token-object") == 0) {
            o->token_object = CK_TRUE;
            continue;
        }
        if (!v)
            return -1;
        i++;
        if (strcmp(a, "--module") == 0)
            o->module = v;
        else if (strcmp(a, "--token") == 0)
            o->token = v;
        else if (strcmp(a, "--pin-file") == 0)
            o->pin_file = v;
        else if (strcmp(a, "--threads") == 0)
            o->threads = (unsigned)strtoul(v, NULL, 10);
        else if (strcmp(a, "--seconds") == 0)
            o->seconds = strtod(v, NULL);
        else
            return -1;
    }
    return o->token && o->threads >= 1 && o->threads <= MAX_THREADS && o->seconds > 0 ? 0 : -1;
}

static int log_in(struct bench *b, const char *pin_file, CK_SESSION_HANDLE s)
{
    char pin[256];
    int rc = read_pin(pin_file, pin, sizeof pin);
    if (rc == 0) {
        CK_RV rv = b->fn->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin));
        rc = rv == CKR_OK ? 0 : ckr_fail("C_Login", rv);
    }
    explicit_bzero(pin, sizeof pin);
    return rc;
}

/* The main session: its login holds for the threads' sessions, and the key lives as long as it. */
static int set_up(struct bench *b, const struct opts *o, CK_SESSION_HANDLE *s)
{
    if (find_slot(b->fn, o->token, &b->slot) != 0)
        return -1;
    GUARD_CKR(b->fn->C_OpenSession(b->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, s),
              "C_OpenSession");
    if (log_in(b, o->pin_file, *s) != 0)
        return -1;
    return generate_key(b, *s, o->token_object);
}

int main(int argc, char **argv)
{
    struct opts o;
    struct bench b = {0};
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    int rc = 1;

    if (parse(argc, argv, &o) != 0)
        return usage();
    b.key = CK_INVALID_HANDLE;
    b.fn = p11_kit_module_load(o.module, 0);
    if (!b.fn) {
        fprintf(stderr, "p11_ceiling: cannot load %s: %s\n", o.module,
                p11_kit_message() ? p11_kit_message() : "unknown error");
        return 1;
    }
    CK_RV rv = p11_kit_module_initialize(b.fn);
    if (rv != CKR_OK) {
        ckr_fail("C_Initialize", rv);
        goto cleanup;
    }
    if (set_up(&b, &o, &s) == 0 && measure(&b, WRAP, o.threads, o.seconds) == 0 &&
        measure(&b, UNWRAP, o.threads, o.seconds) == 0)
        rc = 0;
    if (o.token_object && b.key != CK_INVALID_HANDLE)
        b.fn->C_DestroyObject(s, b.key);
    if (s != CK_INVALID_HANDLE)
        b.fn->C_CloseSession(s);
    p11_kit_module_finalize(b.fn);
cleanup:
    p11_kit_module_release(b.fn);
    return rc;
}
