/*
 * The token's ceilings for p11kmsd's calls (issues 11 and 21): raw PKCS#11
 * calls on session-object keys, as src/hsm makes them for one request, with
 * nothing of p11kmsd around them.
 *
 *   SOFTHSM2_CONF=DIR/softhsm2.conf bench/p11_ceiling --token LABEL --pin-file DIR/user.pin
 *       [--module PATH] [--threads T] [--seconds S] [--token-object] [--mode M[,M...]]
 *
 * The module is --module, else $SOFTHSM_MODULE, else Debian's SoftHSM2; the
 * PIN the first line of --pin-file, else $P11KMS_PIN (never an argument). The
 * keys the modes need are generated in the token as session objects, as
 * p11kmsd's unwrapped key versions are: private, sensitive, not extractable,
 * allowed only the mode's use (--token-object: token objects, as the
 * token-only release's keys and token-resident versions are, destroyed at
 * exit). Each of T threads opens its own session and, for S seconds (default
 * 3) per mode, in the order given (default wrap,unwrap), loops
 *   wrap:         C_EncryptInit(CKM_AES_GCM, 12-byte IV, 64-byte AAD, 128-bit
 *                 tag) + C_Encrypt of 32 random bytes (GenerateDataKey), AES-256
 *   unwrap:       C_DecryptInit + C_Decrypt of such a ciphertext (Decrypt)
 *   rsa_pss_sign: C_SignInit(CKM_RSA_PKCS_PSS: SHA-256, MGF1-SHA-256, sLen 32)
 *                 + C_Sign of a 32-byte digest, RSA-2048 (Sign with
 *                 RSASSA_PSS_SHA_256, MessageType DIGEST)
 *   rsa_decrypt:  C_DecryptInit(CKM_RSA_X_509) + C_Decrypt of a 256-byte
 *                 ciphertext made by C_Encrypt under the public key, RSA-2048:
 *                 the private-key operation of Decrypt with RSAES_OAEP_SHA_256,
 *                 whose padding p11kmsd removes itself when the token has no
 *                 OAEP with SHA-256 (SoftHSM2 2.6.1 takes CKM_RSA_PKCS_OAEP
 *                 with SHA-1 only)
 *   ecdsa_sign:   C_SignInit(CKM_ECDSA) + C_Sign of a 32-byte digest, P-256
 *                 (Sign with ECDSA_SHA_256)
 *   ecdh_derive:  C_DeriveKey(CKM_ECDH1_DERIVE, CKD_NULL, a fixed raw peer point)
 *                 into a 32-byte private CKK_GENERIC_SECRET session object, then
 *                 C_GetAttributeValue(CKA_VALUE) and C_DestroyObject, P-256
 *                 (DeriveSharedSecret)
 *   hmac_sha384:  C_SignInit(CKM_SHA384_HMAC) + C_Sign of 64 bytes under a
 *                 48-byte generic secret (GenerateMac with HMAC_SHA_384)
 * Every CHECK_EVERY calls the result is checked (exit 1 if wrong): a
 * signature with C_Verify under the public key, a plaintext against the
 * input, a shared secret or MAC against the thread's first one. Prints one
 * line per mode, with the CPU time the process took meanwhile (all threads,
 * user and system: what the calls cost, whatever else runs on the machine):
 *   p11_wrap threads=1 ops=123456 seconds=3.00 ops_per_s=41152 cpu_seconds=2.98
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
#include <sys/resource.h>
#include <time.h>

#define DEFAULT_MODULE "/usr/lib/softhsm/libsofthsm2.so"
#define KEY_LEN 32
#define IV_LEN 12
#define AAD_LEN 64 /* a blob header (21) and a canonical context of a pair or two */
#define TAG_LEN 16
#define RSA_BITS 2048
#define RSA_LEN (RSA_BITS / 8)
#define DIGEST_LEN 32 /* SHA-256 */
#define ECDSA_LEN 64  /* r || s on P-256, as the token gives it */
#define SECRET_LEN 32 /* a P-256 shared secret: the x coordinate */
#define HMAC_KEY_LEN 48
#define HMAC_MSG_LEN 64
#define HMAC_LEN 48
#define CHECK_EVERY 1024
#define MAX_THREADS 64

enum mode {
    WRAP,
    UNWRAP,
    RSA_PSS_SIGN,
    RSA_DECRYPT,
    ECDSA_SIGN,
    ECDH_DERIVE,
    HMAC_SHA384,
    N_MODES
};

/* One key (or key pair) per use, as p11kmsd has one KMS key per key usage. */
enum key { KEY_AES, KEY_RSA_SIGN, KEY_RSA_DECRYPT, KEY_EC_SIGN, KEY_EC_DERIVE, KEY_HMAC, N_KEYS };

static const char *const mode_names[N_MODES] = {
    "wrap", "unwrap", "rsa_pss_sign", "rsa_decrypt", "ecdsa_sign", "ecdh_derive", "hmac_sha384",
};
static const enum key mode_keys[N_MODES] = {
    KEY_AES, KEY_AES, KEY_RSA_SIGN, KEY_RSA_DECRYPT, KEY_EC_SIGN, KEY_EC_DERIVE, KEY_HMAC,
};

/* The DER of prime256v1's OID, CKA_EC_PARAMS of a P-256 key. */
static const uint8_t p256_params[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};

/* The peer of ecdh_derive: the uncompressed point of a P-256 key made once by openssl genpkey. */
static const uint8_t peer_point[65] = {
    0x04, 0xa3, 0xac, 0xc0, 0x36, 0x9a, 0xb9, 0xd0, 0xfd, 0x00, 0x55, 0x70, 0x0c,
    0x0c, 0xf1, 0x5d, 0x0f, 0xb0, 0x80, 0xe9, 0x2c, 0xca, 0xee, 0xef, 0x23, 0x9f,
    0xcb, 0x29, 0xa5, 0x72, 0x5e, 0xaf, 0x9a, 0xee, 0x83, 0x7e, 0x0d, 0x38, 0x63,
    0x6d, 0x1f, 0x83, 0x72, 0x75, 0x80, 0x28, 0x75, 0x02, 0xdd, 0x7f, 0xbc, 0xb4,
    0x9b, 0x4b, 0xca, 0x56, 0xf6, 0xff, 0x5f, 0xf3, 0x1c, 0xb1, 0x12, 0x80, 0xf8,
};

struct bench {
    CK_FUNCTION_LIST *fn;
    CK_SLOT_ID slot;
    CK_OBJECT_HANDLE key[N_KEYS]; /* the secret or the private half */
    CK_OBJECT_HANDLE pub[N_KEYS]; /* a key pair's public half */
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
    uint8_t key[KEY_LEN], aad[AAD_LEN], iv[IV_LEN], ct[KEY_LEN + TAG_LEN]; /* wrap, unwrap */
    /* The other modes: the call's input (digest, ciphertext, message) and
     * what it must give (plaintext, shared secret, MAC). */
    uint8_t in[RSA_LEN], want[RSA_LEN];
    CK_ULONG in_len;
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

/* The process's CPU time so far, user and system, ended threads included. */
static double cpu_s(void)
{
    struct rusage u;
    getrusage(RUSAGE_SELF, &u);
    return (double)(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
           (double)(u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
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

static int generate_secret(struct bench *b, CK_SESSION_HANDLE s, enum key k, CK_BBOOL on_token)
{
    int aes = k == KEY_AES;
    CK_MECHANISM mech = {aes ? CKM_AES_KEY_GEN : CKM_GENERIC_SECRET_KEY_GEN, NULL, 0};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = aes ? CKK_AES : CKK_GENERIC_SECRET;
    CK_ULONG len = aes ? KEY_LEN : HMAC_KEY_LEN;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE tmpl[10] = {
        {CKA_CLASS, &cls, sizeof cls},     {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_VALUE_LEN, &len, sizeof len}, {CKA_TOKEN, &on_token, sizeof on_token},
        {CKA_PRIVATE, &yes, sizeof yes},   {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no}, {CKA_LABEL, "p11_ceiling", 11},
    };
    CK_ULONG n = 8;
    if (aes) {
        tmpl[n++] = (CK_ATTRIBUTE){CKA_ENCRYPT, &yes, sizeof yes};
        tmpl[n++] = (CK_ATTRIBUTE){CKA_DECRYPT, &yes, sizeof yes};
    } else {
        tmpl[n++] = (CK_ATTRIBUTE){CKA_SIGN, &yes, sizeof yes};
    }
    GUARD_CKR(b->fn->C_GenerateKey(s, &mech, tmpl, n, &b->key[k]), "C_GenerateKey");
    return 0;
}

/*
 * An RSA-2048 (e = 65537) or P-256 key pair. The private half gets the one
 * use its key has (CKA_SIGN, CKA_DECRYPT or CKA_DERIVE), the public half the
 * matching one for the checks (CKA_VERIFY, CKA_ENCRYPT).
 */
static int generate_pair(struct bench *b, CK_SESSION_HANDLE s, enum key k, CK_BBOOL on_token)
{
    int rsa = k == KEY_RSA_SIGN || k == KEY_RSA_DECRYPT;
    CK_MECHANISM mech = {rsa ? CKM_RSA_PKCS_KEY_PAIR_GEN : CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_ATTRIBUTE_TYPE use = k == KEY_RSA_DECRYPT ? CKA_DECRYPT
                            : k == KEY_EC_DERIVE ? CKA_DERIVE
                                                 : CKA_SIGN;
    CK_ATTRIBUTE_TYPE pub_use = k == KEY_RSA_DECRYPT ? CKA_ENCRYPT : CKA_VERIFY;
    CK_ULONG bits = RSA_BITS;
    CK_BYTE e[] = {0x01, 0x00, 0x01};
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE pub[4] = {
        {CKA_TOKEN, &on_token, sizeof on_token},
        {pub_use, &yes, sizeof yes},
    };
    CK_ULONG npub = 2;
    if (rsa) {
        pub[npub++] = (CK_ATTRIBUTE){CKA_MODULUS_BITS, &bits, sizeof bits};
        pub[npub++] = (CK_ATTRIBUTE){CKA_PUBLIC_EXPONENT, e, sizeof e};
    } else {
        pub[npub++] = (CK_ATTRIBUTE){CKA_EC_PARAMS, (void *)p256_params, sizeof p256_params};
    }
    CK_ATTRIBUTE priv[] = {
        {CKA_TOKEN, &on_token, sizeof on_token},
        {CKA_PRIVATE, &yes, sizeof yes},
        {CKA_SENSITIVE, &yes, sizeof yes},
        {CKA_EXTRACTABLE, &no, sizeof no},
        {use, &yes, sizeof yes},
        {CKA_LABEL, "p11_ceiling", 11},
    };
    GUARD_CKR(b->fn->C_GenerateKeyPair(s, &mech, pub, npub, priv, sizeof priv / sizeof priv[0],
                                       &b->pub[k], &b->key[k]),
              "C_GenerateKeyPair");
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
    GUARD_CKR(w->b->fn->C_EncryptInit(w->s, &m, w->b->key[KEY_AES]), "C_EncryptInit");
    GUARD_CKR(w->b->fn->C_Encrypt(w->s, w->key, KEY_LEN, w->ct, &n), "C_Encrypt");
    return n == sizeof w->ct ? 0 : fail("C_Encrypt gave the wrong length");
}

/* out has room for the ciphertext's length: some modules write it all before the tag check. */
static int unwrap(struct worker *w, uint8_t out[KEY_LEN + TAG_LEN])
{
    CK_GCM_PARAMS p;
    CK_MECHANISM m = gcm(w, &p);
    CK_ULONG n = KEY_LEN + TAG_LEN;
    GUARD_CKR(w->b->fn->C_DecryptInit(w->s, &m, w->b->key[KEY_AES]), "C_DecryptInit");
    GUARD_CKR(w->b->fn->C_Decrypt(w->s, w->ct, sizeof w->ct, out, &n), "C_Decrypt");
    return n == KEY_LEN ? 0 : fail("C_Decrypt gave the wrong length");
}

/* The signing modes' mechanism (HMAC for any other); pss: room for RSA-PSS's parameters. */
static CK_MECHANISM sign_mechanism(enum mode mode, CK_RSA_PKCS_PSS_PARAMS *pss)
{
    *pss = (CK_RSA_PKCS_PSS_PARAMS){CKM_SHA256, CKG_MGF1_SHA256, DIGEST_LEN};
    if (mode == RSA_PSS_SIGN)
        return (CK_MECHANISM){CKM_RSA_PKCS_PSS, pss, sizeof *pss};
    return (CK_MECHANISM){mode == ECDSA_SIGN ? CKM_ECDSA : CKM_SHA384_HMAC, NULL, 0};
}

/* C_SignInit + C_Sign of w->in under the mode's key; out has RSA_LEN bytes of room. */
static int sign(struct worker *w, uint8_t out[RSA_LEN], CK_ULONG *n)
{
    CK_RSA_PKCS_PSS_PARAMS pss;
    CK_MECHANISM m = sign_mechanism(w->b->mode, &pss);
    *n = RSA_LEN;
    GUARD_CKR(w->b->fn->C_SignInit(w->s, &m, w->b->key[mode_keys[w->b->mode]]), "C_SignInit");
    GUARD_CKR(w->b->fn->C_Sign(w->s, w->in, w->in_len, out, n), "C_Sign");
    return 0;
}

/*
 * A signature or MAC of the expected length; check: a signature verified
 * with C_Verify under the public half, a MAC (no public half) compared with
 * the thread's first.
 */
static int sign_checked(struct worker *w, int check)
{
    enum key k = mode_keys[w->b->mode];
    CK_ULONG want = k == KEY_RSA_SIGN ? RSA_LEN : k == KEY_EC_SIGN ? ECDSA_LEN : HMAC_LEN;
    uint8_t sig[RSA_LEN];
    CK_ULONG n;
    if (sign(w, sig, &n) != 0)
        return -1;
    if (n != want)
        return fail("C_Sign gave the wrong length");
    if (!check)
        return 0;
    if (k == KEY_HMAC)
        return memcmp(sig, w->want, n) == 0 ? 0
                                            : fail("C_Sign gave another MAC of the same message");
    CK_RSA_PKCS_PSS_PARAMS pss;
    CK_MECHANISM m = sign_mechanism(w->b->mode, &pss);
    GUARD_CKR(w->b->fn->C_VerifyInit(w->s, &m, w->b->pub[k]), "C_VerifyInit");
    GUARD_CKR(w->b->fn->C_Verify(w->s, w->in, w->in_len, sig, n), "C_Verify of the signature");
    return 0;
}

/* The raw RSA operation: out receives the whole k-byte block. */
static int rsa_decrypt(struct worker *w, int check)
{
    CK_MECHANISM m = {CKM_RSA_X_509, NULL, 0};
    uint8_t out[RSA_LEN];
    CK_ULONG n = sizeof out;
    GUARD_CKR(w->b->fn->C_DecryptInit(w->s, &m, w->b->key[KEY_RSA_DECRYPT]), "C_DecryptInit");
    GUARD_CKR(w->b->fn->C_Decrypt(w->s, w->in, w->in_len, out, &n), "C_Decrypt");
    if (n != RSA_LEN)
        return fail("C_Decrypt gave the wrong length");
    if (check && memcmp(out, w->want, RSA_LEN) != 0)
        return fail("C_Decrypt did not give back the encrypted block");
    return 0;
}

/* As the server takes a shared secret out: derived, read and destroyed. */
static int ecdh_derive(struct worker *w, uint8_t out[SECRET_LEN])
{
    CK_ECDH1_DERIVE_PARAMS p = {CKD_NULL, 0, NULL, sizeof peer_point, (CK_BYTE *)peer_point};
    CK_MECHANISM m = {CKM_ECDH1_DERIVE, &p, sizeof p};
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE kt = CKK_GENERIC_SECRET;
    CK_ULONG len = SECRET_LEN;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    /* kms_hsm_ecdh's template: private, readable until destroyed. */
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls},       {CKA_KEY_TYPE, &kt, sizeof kt},
        {CKA_VALUE_LEN, &len, sizeof len},   {CKA_TOKEN, &no, sizeof no},
        {CKA_PRIVATE, &yes, sizeof yes},     {CKA_SENSITIVE, &no, sizeof no},
        {CKA_EXTRACTABLE, &yes, sizeof yes},
    };
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    GUARD_CKR(w->b->fn->C_DeriveKey(w->s, &m, w->b->key[KEY_EC_DERIVE], tmpl,
                                    sizeof tmpl / sizeof tmpl[0], &h),
              "C_DeriveKey");
    CK_ATTRIBUTE value = {CKA_VALUE, out, SECRET_LEN};
    CK_RV rv = w->b->fn->C_GetAttributeValue(w->s, h, &value, 1);
    CK_RV destroyed = w->b->fn->C_DestroyObject(w->s, h);
    if (rv != CKR_OK)
        return ckr_fail("C_GetAttributeValue(CKA_VALUE)", rv);
    if (destroyed != CKR_OK)
        return ckr_fail("C_DestroyObject", destroyed);
    return value.ulValueLen == SECRET_LEN ? 0 : fail("C_DeriveKey gave the wrong length");
}

static int ecdh_check(struct worker *w, int check)
{
    uint8_t secret[SECRET_LEN];
    if (ecdh_derive(w, secret) != 0)
        return -1;
    if (check && memcmp(secret, w->want, SECRET_LEN) != 0)
        return fail("C_DeriveKey gave another secret with the same peer");
    return 0;
}

/* The thread's session and its mode's input: a random key to wrap (and, for
 * unwrap, its ciphertext), a random digest, block or message, and what the
 * call must give for it. */
static int prepare(struct worker *w)
{
    CK_FUNCTION_LIST *fn = w->b->fn;
    GUARD_CKR(fn->C_OpenSession(w->b->slot, CKF_SERIAL_SESSION, NULL, NULL, &w->s),
              "C_OpenSession");
    GUARD_CKR(fn->C_GenerateRandom(w->s, w->key, sizeof w->key), "C_GenerateRandom");
    GUARD_CKR(fn->C_GenerateRandom(w->s, w->in, sizeof w->in), "C_GenerateRandom");
    memset(w->aad, 'a', sizeof w->aad);
    memcpy(w->iv, &w->id, sizeof w->id); /* IVs: the thread's id, then a counter */
    switch (w->b->mode) {
    case WRAP: return 0;
    case UNWRAP: return wrap(w);
    case RSA_PSS_SIGN:
    case ECDSA_SIGN: w->in_len = DIGEST_LEN; return 0;
    case HMAC_SHA384: {
        CK_ULONG n;
        w->in_len = HMAC_MSG_LEN;
        return sign(w, w->want, &n);
    }
    case ECDH_DERIVE: return ecdh_derive(w, w->want);
    case RSA_DECRYPT: {
        /* A block below the modulus (its top byte zero) encrypted with the public key. */
        CK_MECHANISM m = {CKM_RSA_X_509, NULL, 0};
        CK_ULONG n = RSA_LEN;
        w->in[0] = 0;
        memcpy(w->want, w->in, RSA_LEN);
        w->in_len = RSA_LEN;
        GUARD_CKR(fn->C_EncryptInit(w->s, &m, w->b->pub[KEY_RSA_DECRYPT]), "C_EncryptInit");
        GUARD_CKR(fn->C_Encrypt(w->s, w->want, RSA_LEN, w->in, &n), "C_Encrypt");
        return n == RSA_LEN ? 0 : fail("C_Encrypt gave the wrong length");
    }
    default: return fail("no such mode");
    }
}

static int one_call(struct worker *w, uint64_t i, uint8_t pt[KEY_LEN + TAG_LEN])
{
    int check = i % CHECK_EVERY == 1;
    switch (w->b->mode) {
    case WRAP: memcpy(w->iv + 4, &i, sizeof i); return wrap(w);
    case UNWRAP:
        if (unwrap(w, pt) != 0)
            return -1;
        if (check && memcmp(pt, w->key, KEY_LEN) != 0)
            return fail("C_Decrypt did not give back the wrapped key");
        return 0;
    case RSA_PSS_SIGN:
    case ECDSA_SIGN:
    case HMAC_SHA384: return sign_checked(w, check);
    case RSA_DECRYPT: return rsa_decrypt(w, check);
    case ECDH_DERIVE: return ecdh_check(w, check);
    default: return fail("no such mode");
    }
}

static int loop(struct worker *w)
{
    uint8_t pt[KEY_LEN + TAG_LEN];
    for (uint64_t i = 1; !atomic_load_explicit(&w->b->stop, memory_order_relaxed); i++) {
        if (one_call(w, i, pt) != 0)
            return -1;
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
    double t0 = now_s(), cpu0 = cpu_s();
    struct timespec nap = {(time_t)seconds, (long)((seconds - (double)(time_t)seconds) * 1e9)};
    nanosleep(&nap, NULL);
    atomic_store(&b->stop, 1);
    for (unsigned i = 0; i < threads; i++) {
        pthread_join(w[i].thread, NULL);
        ops += w[i].ops;
        failed |= w[i].failed;
    }
    double dt = now_s() - t0, cpu = cpu_s() - cpu0;
    pthread_barrier_destroy(&b->start);
    if (failed)
        return -1;
    printf("p11_%s threads=%u ops=%llu seconds=%.2f ops_per_s=%.0f cpu_seconds=%.2f\n",
           mode_names[mode], threads, (unsigned long long)ops, dt, (double)ops / dt, cpu);
    fflush(stdout);
    return 0;
}

struct opts {
    const char *module, *token, *pin_file;
    unsigned threads;
    double seconds;
    CK_BBOOL token_object;
    enum mode modes[N_MODES]; /* in the order given, each at most once */
    size_t n_modes;
};

static int usage(void)
{
    fprintf(stderr,
            "usage: p11_ceiling --token LABEL [--pin-file FILE] [--module PATH]\n"
            "                   [--threads T] [--seconds S] [--token-object] [--mode M[,M...]]\n"
            "modes: wrap unwrap rsa_pss_sign rsa_decrypt ecdsa_sign ecdh_derive hmac_sha384\n"
            "       (default: wrap,unwrap)\n");
    return 2;
}

/* A comma-separated list of mode names, each at most once. */
static int parse_modes(const char *list, struct opts *o)
{
    o->n_modes = 0;
    for (const char *p = list; *p;) {
        size_t len = strcspn(p, ",");
        enum mode m = N_MODES;
        for (enum mode i = 0; i < N_MODES; i++)
            if (strlen(mode_names[i]) == len && strncmp(p, mode_names[i], len) == 0)
                m = i;
        if (m == N_MODES)
            return -1;
        for (size_t j = 0; j < o->n_modes; j++)
            if (o->modes[j] == m)
                return -1;
        o->modes[o->n_modes++] = m;
        p += len;
        if (*p == ',' && *++p == '\0')
            return -1;
    }
    return o->n_modes ? 0 : -1;
}

static int parse(int argc, char **argv, struct opts *o)
{
    const char *env = getenv("SOFTHSM_MODULE");
    *o = (struct opts){
        env && *env ? env : DEFAULT_MODULE, NULL, NULL, 1, 3.0, CK_FALSE, {WRAP, UNWRAP}, 2};
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
        else if (strcmp(a, "--mode") == 0) {
            if (parse_modes(v, o) != 0)
                return -1;
        } else
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

/* The main session: its login holds for the threads' sessions, and the keys live as long as it. */
static int set_up(struct bench *b, const struct opts *o, CK_SESSION_HANDLE *s)
{
    if (find_slot(b->fn, o->token, &b->slot) != 0)
        return -1;
    GUARD_CKR(b->fn->C_OpenSession(b->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, s),
              "C_OpenSession");
    if (log_in(b, o->pin_file, *s) != 0)
        return -1;
    for (size_t i = 0; i < o->n_modes; i++) {
        enum key k = mode_keys[o->modes[i]];
        if (b->key[k] != CK_INVALID_HANDLE)
            continue; /* wrap and unwrap share theirs */
        int rc = k == KEY_AES || k == KEY_HMAC ? generate_secret(b, *s, k, o->token_object)
                                               : generate_pair(b, *s, k, o->token_object);
        if (rc != 0)
            return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    struct opts o;
    struct bench b = {0};
    CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
    int rc = 1;

    if (parse(argc, argv, &o) != 0)
        return usage();
    for (int k = 0; k < N_KEYS; k++)
        b.key[k] = b.pub[k] = CK_INVALID_HANDLE;
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
    if (set_up(&b, &o, &s) == 0) {
        rc = 0;
        for (size_t i = 0; i < o.n_modes && rc == 0; i++)
            rc = measure(&b, o.modes[i], o.threads, o.seconds) == 0 ? 0 : 1;
    }
    for (int k = 0; k < N_KEYS && o.token_object; k++) {
        if (b.key[k] != CK_INVALID_HANDLE)
            b.fn->C_DestroyObject(s, b.key[k]);
        if (b.pub[k] != CK_INVALID_HANDLE)
            b.fn->C_DestroyObject(s, b.pub[k]);
    }
    if (s != CK_INVALID_HANDLE)
        b.fn->C_CloseSession(s);
    p11_kit_module_finalize(b.fn);
cleanup:
    p11_kit_module_release(b.fn);
    return rc;
}
