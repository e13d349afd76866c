/*
 * Unit tests for src/client/cache.c: the data-key cache.
 *
 * Each bound is checked at exactly its value with an injected clock (age,
 * grace), counts (messages, bytes) and the LRU order (entries); evicted slots
 * are read back through kms_cache_debug_slot and must be zero; a forked child
 * must find the cache empty and its slots zero while the parent keeps its
 * entries; eight threads hammering one cache must always get the key that
 * belongs to what they asked for, and no seal key may serve more messages than
 * its bound. The first test runs before anything sets up OpenSSL's secure heap
 * and checks, in a child without CAP_IPC_LOCK and with RLIMIT_MEMLOCK 0, that a
 * cache that cannot lock its memory says so, and fails with
 * require_locked_memory.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <linux/capability.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "client/internal.h"

#define KEY_LEN 32
#define NSLOTS 64 /* entries in the tests' caches unless they say otherwise */

/* ---- helpers ---------------------------------------------------------------- */

struct fake_clock {
    uint64_t now_ms;
};

static uint64_t fake_now(void *arg)
{
    return ((struct fake_clock *)arg)->now_ms;
}

static struct p11kms_options options(unsigned max_age_s)
{
    struct p11kms_options o;
    p11kms_options_init(&o);
    o.cache_max_age_s = max_age_s;
    o.cache_max_entries = NSLOTS;
    return o;
}

static struct kms_cache *new_cache(const struct p11kms_options *o, struct fake_clock *clk)
{
    struct kms_cache *c = NULL;
    assert_int_equal(kms_cache_new(o, &c), P11KMS_OK);
    assert_non_null(c);
    if (clk)
        kms_cache_set_clock(c, fake_now, clk);
    return c;
}

/* A data key whose every byte is fill, with a blob of blob_len bytes of ~fill. */
struct test_key {
    uint8_t key[KEY_LEN];
    uint8_t blob[64];
    struct p11kms_data_key k;
};

static void make_key(struct test_key *t, uint8_t fill, size_t blob_len)
{
    memset(t, 0, sizeof *t);
    memset(t->key, fill, sizeof t->key);
    memset(t->blob, (uint8_t)~fill, blob_len);
    t->blob[0] = fill;
    t->k.plaintext = t->key;
    t->k.plaintext_len = KEY_LEN;
    t->k.blob = t->blob;
    t->k.blob_len = blob_len;
    snprintf(t->k.key_arn, sizeof t->k.key_arn, "arn:aws:kms:us-east-1:123456789012:key/k%02x",
             fill);
}

static void drop(struct p11kms_data_key *k)
{
    OPENSSL_secure_clear_free(k->plaintext, k->plaintext_len);
    free(k->blob);
    memset(k, 0, sizeof *k);
}

static const uint8_t CTX_A[] = {0, 0, 0, 1, 0, 0, 0, 1, 'a', 0, 0, 0, 1, 'x'};
static const uint8_t CTX_B[] = {0, 0, 0, 1, 0, 0, 0, 1, 'a', 0, 0, 0, 1, 'y'};

/* Decrypt-side lookup of t's blob; returns the status and checks the key on a hit. */
static p11kms_status get_dec(struct kms_cache *c, const struct test_key *t, int grace)
{
    struct p11kms_data_key out;
    p11kms_status st =
        kms_cache_get_decrypt(c, t->blob, t->k.blob_len, CTX_A, sizeof CTX_A, grace, &out);
    if (st == P11KMS_OK) {
        assert_int_equal(out.plaintext_len, KEY_LEN);
        assert_memory_equal(out.plaintext, t->key, KEY_LEN);
        assert_int_equal(out.blob_len, t->k.blob_len);
        assert_memory_equal(out.blob, t->blob, t->k.blob_len);
        assert_string_equal(out.key_arn, t->k.key_arn);
        drop(&out);
    } else {
        assert_null(out.plaintext);
        assert_null(out.blob);
    }
    return st;
}

static p11kms_status take(struct kms_cache *c, const char *key_id, const struct test_key *t,
                          uint64_t bytes)
{
    struct p11kms_data_key out;
    p11kms_status st = kms_cache_take_for_seal(c, key_id, CTX_A, sizeof CTX_A, bytes, &out);
    if (st == P11KMS_OK) {
        assert_memory_equal(out.plaintext, t->key, KEY_LEN);
        assert_int_equal(out.blob_len, t->k.blob_len);
        assert_memory_equal(out.blob, t->blob, t->k.blob_len);
        assert_string_equal(out.key_arn, t->k.key_arn);
        drop(&out);
    }
    return st;
}

/* The slot holding t's key, or -1. */
static long slot_of(struct kms_cache *c, size_t nslots, const struct test_key *t)
{
    for (size_t i = 0; i < nslots; i++) {
        const uint8_t *p;
        size_t n;
        assert_int_equal(kms_cache_debug_slot(c, i, &p, &n), P11KMS_OK);
        assert_int_equal(n, KEY_LEN);
        if (memcmp(p, t->key, KEY_LEN) == 0)
            return (long)i;
    }
    return -1;
}

static void assert_slot_zero(struct kms_cache *c, long i)
{
    static const uint8_t zero[KEY_LEN];
    const uint8_t *p;
    size_t n;
    assert_true(i >= 0);
    assert_int_equal(kms_cache_debug_slot(c, (size_t)i, &p, &n), P11KMS_OK);
    assert_memory_equal(p, zero, n);
}

static void assert_all_zero(struct kms_cache *c, size_t nslots)
{
    for (size_t i = 0; i < nslots; i++)
        assert_slot_zero(c, (long)i);
}

static int wait_child(pid_t pid, unsigned timeout_s)
{
    for (unsigned i = 0; i < timeout_s * 100; i++) {
        int status;
        pid_t r = waitpid(pid, &status, WNOHANG);
        if (r == pid)
            return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        usleep(10000);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return -1; /* hung: a deadlock */
}

/* ---- the secure heap -------------------------------------------------------- */

static int drop_ipc_lock(void)
{
    struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    if (syscall(SYS_capget, &h, d) != 0)
        return -1;
    d[CAP_IPC_LOCK / 32].effective &= ~(1u << (CAP_IPC_LOCK % 32));
    d[CAP_IPC_LOCK / 32].permitted &= ~(1u << (CAP_IPC_LOCK % 32));
    return (int)syscall(SYS_capset, &h, d);
}

/* Runs first: nothing in this process has set up the secure heap yet. */
static void test_memory_lock_failure(void **state)
{
    (void)state;
    assert_false(CRYPTO_secure_malloc_initialized());
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        struct rlimit rl = {0, 0};
        if (setrlimit(RLIMIT_MEMLOCK, &rl) != 0 || drop_ipc_lock() != 0)
            _exit(10);
        struct p11kms_options o = options(60);
        o.require_locked_memory = 1;
        struct kms_cache *c = NULL;
        if (kms_cache_new(&o, &c) != P11KMS_ERR_MEMORY_LOCK || c)
            _exit(11);
        if (!strstr(p11kms_last_error(), "RLIMIT_MEMLOCK") ||
            !strstr(p11kms_last_error(), "require_locked_memory"))
            _exit(12);
        o.require_locked_memory = 0;
        if (kms_cache_new(&o, &c) != P11KMS_OK || kms_cache_locked(c))
            _exit(13);
        if (!strstr(p11kms_last_error(), "not locked"))
            _exit(14);
        /* Unlocked, it still works. */
        struct test_key t;
        make_key(&t, 0x42, 40);
        kms_cache_put_decrypt(c, &t.k, CTX_A, sizeof CTX_A);
        struct p11kms_data_key out;
        if (kms_cache_get_decrypt(c, t.blob, 40, CTX_A, sizeof CTX_A, 0, &out) != P11KMS_OK ||
            memcmp(out.plaintext, t.key, KEY_LEN) != 0)
            _exit(15);
        drop(&out);
        kms_cache_free(c);
        _exit(0);
    }
    assert_int_equal(wait_child(pid, 30), 0);
}

static void test_dont_mlock_switch(void **state)
{
    (void)state;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        setenv("P11KMS_DONT_MLOCK", "1", 1);
        struct p11kms_options o = options(60);
        o.require_locked_memory = 1;
        struct kms_cache *c = NULL;
        if (kms_cache_new(&o, &c) != P11KMS_ERR_MEMORY_LOCK)
            _exit(1);
        if (!strstr(p11kms_last_error(), "P11KMS_DONT_MLOCK"))
            _exit(2);
        o.require_locked_memory = 0;
        if (kms_cache_new(&o, &c) != P11KMS_OK || kms_cache_locked(c))
            _exit(3);
        kms_cache_free(c);
        _exit(0);
    }
    assert_int_equal(wait_child(pid, 30), 0);
}

static void test_locked(void **state)
{
    (void)state;
    struct p11kms_options o = options(60);
    o.require_locked_memory = 1;
    o.cache_max_entries = 0; /* the default, 1000, sizes the heap: 64 KiB */
    struct kms_cache *c = NULL;
    p11kms_status st = kms_cache_new(&o, &c);
    if (st != P11KMS_OK)
        fail_msg("cannot lock the cache: %s", p11kms_last_error());
    assert_int_equal(kms_cache_locked(c), 1);
    assert_true(CRYPTO_secure_malloc_initialized());
    const uint8_t *p;
    size_t n;
    assert_int_equal(kms_cache_debug_slot(c, 0, &p, &n), P11KMS_OK);
    assert_true(CRYPTO_secure_allocated(p));
    assert_int_equal(kms_cache_debug_slot(c, 999, &p, &n), P11KMS_OK);
    assert_int_equal(kms_cache_debug_slot(c, 1000, &p, &n), P11KMS_ERR_ARGUMENT);
    kms_cache_free(c);
}

static void test_off_and_arguments(void **state)
{
    (void)state;
    struct p11kms_options o = options(0);
    struct kms_cache *c = (struct kms_cache *)&o;
    assert_int_equal(kms_cache_new(&o, &c), P11KMS_ERR_ARGUMENT);
    assert_null(c);
    assert_int_equal(kms_cache_new(NULL, &c), P11KMS_ERR_ARGUMENT);

    /* A NULL cache is a cache that never hits. */
    struct test_key t;
    make_key(&t, 1, 40);
    struct p11kms_data_key out;
    assert_int_equal(kms_cache_get_decrypt(NULL, t.blob, 40, CTX_A, sizeof CTX_A, 0, &out),
                     P11KMS_ERR_NOT_FOUND);
    kms_cache_put_decrypt(NULL, &t.k, CTX_A, sizeof CTX_A);
    kms_cache_put_for_seal(NULL, "k", CTX_A, sizeof CTX_A, &t.k, 1);
    assert_int_equal(kms_cache_take_for_seal(NULL, "k", CTX_A, sizeof CTX_A, 1, &out),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_count(NULL), 0);
    assert_int_equal(kms_cache_locked(NULL), 0);
    kms_cache_free(NULL);

    /* Keys that are not 32 bytes are not cached. */
    o = options(60);
    c = new_cache(&o, NULL);
    t.k.plaintext_len = 16;
    kms_cache_put_decrypt(c, &t.k, CTX_A, sizeof CTX_A);
    kms_cache_put_for_seal(c, "k", CTX_A, sizeof CTX_A, &t.k, 1);
    assert_int_equal(kms_cache_count(c), 0);
    kms_cache_free(c);
}

/* ---- keys ------------------------------------------------------------------- */

static void test_keys_are_separate(void **state)
{
    (void)state;
    struct p11kms_options o = options(60);
    struct kms_cache *c = new_cache(&o, NULL);
    struct test_key t;
    make_key(&t, 7, 40);
    kms_cache_put_decrypt(c, &t.k, CTX_A, sizeof CTX_A);
    assert_int_equal(get_dec(c, &t, 0), P11KMS_OK);
    /* Another context, or a blob one byte shorter, is another entry. */
    struct p11kms_data_key out;
    assert_int_equal(kms_cache_get_decrypt(c, t.blob, 40, CTX_B, sizeof CTX_B, 0, &out),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_get_decrypt(c, t.blob, 39, CTX_A, sizeof CTX_A, 0, &out),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_get_decrypt(c, t.blob, 40, NULL, 0, 0, &out), P11KMS_ERR_NOT_FOUND);
    /* The seal side does not see decrypt entries, even under the same bytes. */
    assert_int_equal(kms_cache_take_for_seal(c, (const char *)t.blob, CTX_A, sizeof CTX_A, 1, &out),
                     P11KMS_ERR_NOT_FOUND);
    kms_cache_put_for_seal(c, "alias/a", CTX_A, sizeof CTX_A, &t.k, 10);
    assert_int_equal(take(c, "alias/a", &t, 1), P11KMS_OK);
    assert_int_equal(kms_cache_take_for_seal(c, "alias/a", CTX_B, sizeof CTX_B, 1, &out),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_take_for_seal(c, "alias/b", CTX_A, sizeof CTX_A, 1, &out),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_count(c), 2);

    /* A put under an id already there replaces it and wipes the old slot. */
    long old = slot_of(c, NSLOTS, &t);
    assert_true(old >= 0);
    struct test_key t2;
    make_key(&t2, 8, 40);
    memcpy(t2.blob, t.blob, 40);
    kms_cache_put_decrypt(c, &t2.k, CTX_A, sizeof CTX_A);
    assert_int_equal(kms_cache_count(c), 2);
    assert_int_equal(get_dec(c, &t2, 0), P11KMS_OK);
    kms_cache_free(c);
}

/* ---- bounds, each at exactly its value ---------------------------------------- */

static void test_age(void **state)
{
    (void)state;
    struct fake_clock clk = {1000000};
    struct p11kms_options o = options(10);
    struct kms_cache *c = new_cache(&o, &clk);
    struct test_key d, s;
    make_key(&d, 0xd1, 48);
    make_key(&s, 0x51, 48);
    kms_cache_put_decrypt(c, &d.k, CTX_A, sizeof CTX_A);
    kms_cache_put_for_seal(c, "k", CTX_A, sizeof CTX_A, &s.k, 1);
    long ds = slot_of(c, NSLOTS, &d), ss = slot_of(c, NSLOTS, &s);
    assert_true(ds >= 0 && ss >= 0);

    clk.now_ms += 9999;
    assert_int_equal(get_dec(c, &d, 0), P11KMS_OK);
    assert_int_equal(take(c, "k", &s, 1), P11KMS_OK);
    clk.now_ms += 1; /* exactly max age: expired */
    assert_int_equal(get_dec(c, &d, 0), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(take(c, "k", &s, 1), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_count(c), 0);
    assert_slot_zero(c, ds);
    assert_slot_zero(c, ss);
    assert_all_zero(c, NSLOTS);

    /* A clock that goes back does not make an entry older. */
    kms_cache_put_decrypt(c, &d.k, CTX_A, sizeof CTX_A);
    clk.now_ms -= 5000;
    assert_int_equal(get_dec(c, &d, 0), P11KMS_OK);
    kms_cache_free(c);
}

static void test_grace(void **state)
{
    (void)state;
    struct fake_clock clk = {5};
    struct p11kms_options o = options(10);
    o.cache_grace_s = 5;
    struct kms_cache *c = new_cache(&o, &clk);
    struct test_key d, s;
    make_key(&d, 0xd2, 30);
    make_key(&s, 0x52, 30);
    kms_cache_put_decrypt(c, &d.k, CTX_A, sizeof CTX_A);
    kms_cache_put_for_seal(c, "k", CTX_A, sizeof CTX_A, &s.k, 1);
    long ds = slot_of(c, NSLOTS, &d);

    clk.now_ms += 10000; /* expired, but within grace */
    assert_int_equal(get_dec(c, &d, 0), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_count(c), 2); /* kept for grace */
    assert_int_equal(get_dec(c, &d, 1), P11KMS_OK);
    /* Grace is for opening only: sealing fails closed to a fresh key. */
    assert_int_equal(take(c, "k", &s, 1), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_count(c), 1);
    clk.now_ms += 4999;
    assert_int_equal(get_dec(c, &d, 1), P11KMS_OK);
    clk.now_ms += 1; /* exactly max age + grace */
    assert_int_equal(get_dec(c, &d, 1), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_count(c), 0);
    assert_slot_zero(c, ds);

    /* Without grace configured, grace lookups end at max age. */
    kms_cache_free(c);
    o.cache_grace_s = 0;
    c = new_cache(&o, &clk);
    kms_cache_put_decrypt(c, &d.k, CTX_A, sizeof CTX_A);
    clk.now_ms += 10000;
    assert_int_equal(get_dec(c, &d, 1), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_count(c), 0);
    kms_cache_free(c);
}

/* The key-only lookup p11kms_open uses: the same entries, bounds and misses. */
static p11kms_status get_key(struct kms_cache *c, const struct test_key *t, const uint8_t *ctx,
                             size_t ctx_len)
{
    uint8_t key[KMS_CACHE_KEY_LEN];
    memset(key, 0xee, sizeof key);
    p11kms_status st = kms_cache_get_decrypt_key(c, t->blob, t->k.blob_len, ctx, ctx_len, key);
    if (st == P11KMS_OK)
        assert_memory_equal(key, t->key, KEY_LEN);
    else
        for (size_t i = 0; i < sizeof key; i++)
            assert_int_equal(key[i], 0xee); /* untouched on a miss */
    return st;
}

static void test_get_decrypt_key(void **state)
{
    (void)state;
    struct fake_clock clk = {5};
    struct p11kms_options o = options(10);
    o.cache_grace_s = 5;
    struct kms_cache *c = new_cache(&o, &clk);
    struct test_key d, s, shorter;
    uint8_t key[KMS_CACHE_KEY_LEN];
    make_key(&d, 0xd3, 40);
    make_key(&s, 0x53, 40);
    kms_cache_put_decrypt(c, &d.k, CTX_A, sizeof CTX_A);
    kms_cache_put_for_seal(c, (const char *)"k", CTX_A, sizeof CTX_A, &s.k, 1);
    long ds = slot_of(c, NSLOTS, &d);

    assert_int_equal(get_key(c, &d, CTX_A, sizeof CTX_A), P11KMS_OK);
    /* Another context, a blob one byte shorter, no context: other entries. */
    assert_int_equal(get_key(c, &d, CTX_B, sizeof CTX_B), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(get_key(c, &d, NULL, 0), P11KMS_ERR_NOT_FOUND);
    shorter = d;
    shorter.k.blob_len = 39;
    assert_int_equal(get_key(c, &shorter, CTX_A, sizeof CTX_A), P11KMS_ERR_NOT_FOUND);
    /* The seal side's entries are not the decrypt side's. */
    assert_int_equal(
        kms_cache_get_decrypt_key(c, (const uint8_t *)"k", 1, CTX_A, sizeof CTX_A, key),
        P11KMS_ERR_NOT_FOUND);
    /* Arguments: a miss, never a crash. */
    assert_int_equal(kms_cache_get_decrypt_key(NULL, d.blob, 40, CTX_A, sizeof CTX_A, key),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_get_decrypt_key(c, NULL, 40, CTX_A, sizeof CTX_A, key),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_get_decrypt_key(c, d.blob, 0, CTX_A, sizeof CTX_A, key),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_get_decrypt_key(c, d.blob, 40, NULL, 3, key), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_get_decrypt_key(c, d.blob, 40, CTX_A, sizeof CTX_A, NULL),
                     P11KMS_ERR_NOT_FOUND);

    /* Max age is its bound; grace is not for it (its caller can reach the service). */
    clk.now_ms += 9999;
    assert_int_equal(get_key(c, &d, CTX_A, sizeof CTX_A), P11KMS_OK);
    clk.now_ms += 1;
    assert_int_equal(get_key(c, &d, CTX_A, sizeof CTX_A), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(get_dec(c, &d, 1), P11KMS_OK); /* kept for grace */
    clk.now_ms += 5000;
    assert_int_equal(get_key(c, &d, CTX_A, sizeof CTX_A), P11KMS_ERR_NOT_FOUND);
    /* Past grace too: gone, and its slot wiped (the seal entry, not looked at, stays). */
    assert_int_equal(kms_cache_count(c), 1);
    assert_slot_zero(c, ds);
    kms_cache_free(c);
}

/* The same bytes split another way between blob and context are another id. */
static void test_id_pieces(void **state)
{
    (void)state;
    struct p11kms_options o = options(60);
    struct kms_cache *c = new_cache(&o, NULL);
    struct test_key t;
    uint8_t bytes[48], key[KMS_CACHE_KEY_LEN];
    make_key(&t, 0x44, 40);
    memcpy(bytes, t.blob, 40);
    memcpy(bytes + 40, CTX_A, 8);
    kms_cache_put_decrypt(c, &t.k, bytes + 40, 8);
    assert_int_equal(kms_cache_get_decrypt_key(c, bytes, 40, bytes + 40, 8, key), P11KMS_OK);
    assert_memory_equal(key, t.key, KEY_LEN);
    assert_int_equal(kms_cache_get_decrypt_key(c, bytes, 41, bytes + 41, 7, key),
                     P11KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_cache_get_decrypt_key(c, bytes, 39, bytes + 39, 9, key),
                     P11KMS_ERR_NOT_FOUND);
    /* Every blob length from 1 to 64 and context length from 0 to 14: each finds its own. */
    struct test_key many[64];
    for (size_t n = 1; n <= 64; n++) {
        make_key(&many[n - 1], (uint8_t)n, n);
        kms_cache_put_decrypt(c, &many[n - 1].k, CTX_B, n % 15);
    }
    for (size_t n = 1; n <= 64; n++) {
        assert_int_equal(get_key(c, &many[n - 1], CTX_B, n % 15), P11KMS_OK);
        assert_int_equal(get_key(c, &many[n - 1], CTX_A, n % 15),
                         n % 15 == 14                        ? P11KMS_ERR_NOT_FOUND
                         : memcmp(CTX_A, CTX_B, n % 15) == 0 ? P11KMS_OK
                                                             : P11KMS_ERR_NOT_FOUND);
    }
    kms_cache_free(c);
}

static void test_messages(void **state)
{
    (void)state;
    struct p11kms_options o = options(60);
    o.cache_max_messages = 3;
    struct kms_cache *c = new_cache(&o, NULL);
    struct test_key s;
    make_key(&s, 0x53, 40);
    kms_cache_put_for_seal(c, "k", CTX_A, sizeof CTX_A, &s.k, 1); /* message 1 */
    long ss = slot_of(c, NSLOTS, &s);
    assert_int_equal(take(c, "k", &s, 1), P11KMS_OK); /* 2 */
    assert_int_equal(take(c, "k", &s, 1), P11KMS_OK); /* 3: the last, and it goes */
    assert_int_equal(kms_cache_count(c), 0);
    assert_slot_zero(c, ss);
    assert_int_equal(take(c, "k", &s, 1), P11KMS_ERR_NOT_FOUND);
    kms_cache_free(c);

    /* One message per key: nothing to reuse, nothing kept. */
    o.cache_max_messages = 1;
    c = new_cache(&o, NULL);
    kms_cache_put_for_seal(c, "k", CTX_A, sizeof CTX_A, &s.k, 1);
    assert_int_equal(kms_cache_count(c), 0);
    assert_int_equal(take(c, "k", &s, 1), P11KMS_ERR_NOT_FOUND);
    kms_cache_free(c);
}

static void test_bytes(void **state)
{
    (void)state;
    struct p11kms_options o = options(60);
    o.cache_max_bytes = 100;
    struct kms_cache *c = new_cache(&o, NULL);
    struct test_key s;
    make_key(&s, 0x54, 40);
    kms_cache_put_for_seal(c, "k", CTX_A, sizeof CTX_A, &s.k, 40);
    long ss = slot_of(c, NSLOTS, &s);
    assert_int_equal(take(c, "k", &s, 60), P11KMS_OK); /* exactly 100 */
    assert_int_equal(take(c, "k", &s, 0), P11KMS_OK);  /* still 100 */
    assert_int_equal(kms_cache_count(c), 1);
    assert_int_equal(take(c, "k", &s, 1), P11KMS_ERR_NOT_FOUND); /* 101: it goes */
    assert_int_equal(kms_cache_count(c), 0);
    assert_slot_zero(c, ss);

    /* A message over the bound on its own is never cached nor served. */
    kms_cache_put_for_seal(c, "k", CTX_A, sizeof CTX_A, &s.k, 101);
    assert_int_equal(kms_cache_count(c), 0);
    kms_cache_put_for_seal(c, "k", CTX_A, sizeof CTX_A, &s.k, 100);
    assert_int_equal(kms_cache_count(c), 1);
    assert_int_equal(take(c, "k", &s, 101), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(take(c, "k", &s, 0), P11KMS_OK);
    kms_cache_free(c);
}

static void test_entries_lru(void **state)
{
    (void)state;
    struct p11kms_options o = options(60);
    o.cache_max_entries = 3;
    struct kms_cache *c = new_cache(&o, NULL);
    struct test_key a, b, s, d;
    make_key(&a, 0xa1, 20);
    make_key(&b, 0xb1, 20);
    make_key(&s, 0x55, 20);
    make_key(&d, 0xd3, 20);
    kms_cache_put_decrypt(c, &a.k, CTX_A, sizeof CTX_A);
    kms_cache_put_decrypt(c, &b.k, CTX_A, sizeof CTX_A);
    kms_cache_put_for_seal(c, "s", CTX_A, sizeof CTX_A, &s.k, 1); /* both sides, one LRU */
    assert_int_equal(kms_cache_count(c), 3);
    long bs = slot_of(c, 3, &b);
    assert_int_equal(get_dec(c, &a, 0), P11KMS_OK); /* a is now the most recent; b the least */
    kms_cache_put_decrypt(c, &d.k, CTX_A, sizeof CTX_A);
    assert_int_equal(kms_cache_count(c), 3);
    assert_int_equal(get_dec(c, &b, 0), P11KMS_ERR_NOT_FOUND);
    /* d took b's slot, which was wiped first: no byte of b is left anywhere. */
    assert_int_equal(slot_of(c, 3, &b), -1);
    assert_int_equal(slot_of(c, 3, &d), bs);
    assert_int_equal(get_dec(c, &a, 0), P11KMS_OK);
    assert_int_equal(take(c, "s", &s, 1), P11KMS_OK);
    assert_int_equal(get_dec(c, &d, 0), P11KMS_OK);
    /* Order now (most recent first): d, s, a. */
    kms_cache_put_decrypt(c, &b.k, CTX_A, sizeof CTX_A);
    assert_int_equal(get_dec(c, &a, 0), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(take(c, "s", &s, 1), P11KMS_OK);
    assert_int_equal(get_dec(c, &d, 0), P11KMS_OK);
    assert_int_equal(get_dec(c, &b, 0), P11KMS_OK);
    kms_cache_free(c);

    /* max_entries 1: each put evicts the one before, and its slot is wiped. */
    o.cache_max_entries = 1;
    c = new_cache(&o, NULL);
    kms_cache_put_decrypt(c, &a.k, CTX_A, sizeof CTX_A);
    assert_int_equal(slot_of(c, 1, &a), 0);
    kms_cache_put_decrypt(c, &b.k, CTX_A, sizeof CTX_A);
    assert_int_equal(slot_of(c, 1, &a), -1);
    assert_int_equal(get_dec(c, &a, 0), P11KMS_ERR_NOT_FOUND);
    assert_int_equal(get_dec(c, &b, 0), P11KMS_OK);
    kms_cache_free(c);
}

/* ---- fork -------------------------------------------------------------------- */

static void fill(struct kms_cache *c, struct test_key *keys, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        make_key(&keys[i], (uint8_t)(0x10 + i), 24);
        if (i % 2)
            kms_cache_put_decrypt(c, &keys[i].k, CTX_A, sizeof CTX_A);
        else
            kms_cache_put_for_seal(c, "k", CTX_A, sizeof CTX_A, &keys[i].k, 1);
    }
}

static void test_fork_child_finds_empty_cache(void **state)
{
    (void)state;
    struct p11kms_options o = options(60);
    o.cache_max_entries = 16;
    struct kms_cache *c = new_cache(&o, NULL);
    struct test_key keys[6];
    fill(c, keys, 6);
    size_t before = kms_cache_count(c);
    assert_int_equal(before, 4); /* 3 decrypt entries, 1 seal entry (each put replaced it) */

    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        /* Before any access: the atfork handler has wiped the slab already. */
        for (size_t i = 0; i < 16; i++) {
            const uint8_t *p;
            size_t n;
            static const uint8_t zero[KEY_LEN];
            if (kms_cache_debug_slot(c, i, &p, &n) != P11KMS_OK || memcmp(p, zero, n) != 0)
                _exit(1);
        }
        if (kms_cache_count(c) != 0)
            _exit(2);
        struct p11kms_data_key out;
        if (kms_cache_get_decrypt(c, keys[1].blob, 24, CTX_A, sizeof CTX_A, 0, &out) !=
            P11KMS_ERR_NOT_FOUND)
            _exit(3);
        if (kms_cache_take_for_seal(c, "k", CTX_A, sizeof CTX_A, 1, &out) != P11KMS_ERR_NOT_FOUND)
            _exit(4);
        /* The child's own entries work. */
        kms_cache_put_decrypt(c, &keys[1].k, CTX_A, sizeof CTX_A);
        if (kms_cache_get_decrypt(c, keys[1].blob, 24, CTX_A, sizeof CTX_A, 0, &out) != P11KMS_OK ||
            memcmp(out.plaintext, keys[1].key, KEY_LEN) != 0)
            _exit(5);
        drop(&out);
        kms_cache_free(c);
        _exit(42);
    }
    assert_int_equal(wait_child(pid, 30), 42);
    /* The parent keeps its entries. */
    assert_int_equal(kms_cache_count(c), before);
    assert_int_equal(get_dec(c, &keys[1], 0), P11KMS_OK);
    assert_int_equal(take(c, "k", &keys[4], 1), P11KMS_OK);
    kms_cache_free(c);
}

/* A child made without the atfork handlers (raw clone) still finds nothing: getpid(). */
static void test_fork_without_handlers(void **state)
{
    (void)state;
    struct p11kms_options o = options(60);
    o.cache_max_entries = 4;
    struct kms_cache *c = new_cache(&o, NULL);
    struct test_key t;
    make_key(&t, 0x77, 24);
    kms_cache_put_decrypt(c, &t.k, CTX_A, sizeof CTX_A);
    pid_t pid = (pid_t)syscall(SYS_clone, SIGCHLD, NULL, NULL, NULL, NULL);
    assert_true(pid >= 0);
    if (pid == 0) {
        struct p11kms_data_key out;
        if (kms_cache_get_decrypt(c, t.blob, 24, CTX_A, sizeof CTX_A, 0, &out) !=
            P11KMS_ERR_NOT_FOUND)
            syscall(SYS_exit_group, 1);
        for (size_t i = 0; i < 4; i++) {
            const uint8_t *p;
            size_t n;
            static const uint8_t zero[KEY_LEN];
            if (kms_cache_debug_slot(c, i, &p, &n) != P11KMS_OK || memcmp(p, zero, n) != 0)
                syscall(SYS_exit_group, 2);
        }
        syscall(SYS_exit_group, 43);
    }
    assert_int_equal(wait_child(pid, 30), 43);
    assert_int_equal(get_dec(c, &t, 0), P11KMS_OK);
    kms_cache_free(c);
}

/* ---- threads ----------------------------------------------------------------- */

#define THREADS 8
#define ROUNDS 20000
#define IDS 48
#define MAX_MESSAGES 5
#define GENERATIONS (THREADS * ROUNDS + 1)

struct shared {
    struct kms_cache *cache;
    atomic_uint_fast64_t next_gen;
    atomic_uint *uses; /* per seal-key generation: the messages it served */
    atomic_int bad;
    atomic_int stop;
};

struct worker {
    struct shared *s;
    unsigned seed;
    pthread_t tid;
};

/* Deterministic decrypt keys: the key of blob id i is a function of i. */
static void dec_key(unsigned id, struct test_key *t)
{
    make_key(t, (uint8_t)(id * 7 + 1), 16 + id % 17);
    t->blob[1] = (uint8_t)id;
    t->key[1] = (uint8_t)(id ^ 0x5a);
}

static void one_decrypt(struct shared *s, unsigned id)
{
    struct test_key t;
    struct p11kms_data_key out;
    dec_key(id, &t);
    if (kms_cache_get_decrypt(s->cache, t.blob, t.k.blob_len, CTX_A, sizeof CTX_A, 0, &out) ==
        P11KMS_OK) {
        if (memcmp(out.plaintext, t.key, KEY_LEN) != 0 || out.blob_len != t.k.blob_len ||
            memcmp(out.blob, t.blob, t.k.blob_len) != 0)
            atomic_fetch_add(&s->bad, 1);
        drop(&out);
    } else {
        kms_cache_put_decrypt(s->cache, &t.k, CTX_A, sizeof CTX_A);
    }
}

/* Seals under key-N: a cached key of the right generation, or a new generation. */
static void one_seal(struct shared *s, unsigned id)
{
    char key_id[16];
    struct p11kms_data_key out;
    uint64_t gen, bgen;
    snprintf(key_id, sizeof key_id, "key-%u", id % 8);
    if (kms_cache_take_for_seal(s->cache, key_id, CTX_A, sizeof CTX_A, 10, &out) == P11KMS_OK) {
        memcpy(&gen, out.plaintext, sizeof gen);
        memcpy(&bgen, out.blob, sizeof bgen);
        if (gen != bgen || gen >= GENERATIONS || out.blob_len != 16 ||
            memcmp(out.blob + 8, key_id, 6) != 0)
            atomic_fetch_add(&s->bad, 1);
        else
            atomic_fetch_add(&s->uses[gen], 1);
        drop(&out);
        return;
    }
    /* "GenerateDataKey": a new generation, used once now, then cached. */
    gen = atomic_fetch_add(&s->next_gen, 1);
    if (gen >= GENERATIONS) {
        atomic_fetch_add(&s->bad, 1);
        return;
    }
    struct test_key t;
    make_key(&t, 0, 16);
    memcpy(t.key, &gen, sizeof gen);
    memcpy(t.blob, &gen, sizeof gen);
    memcpy(t.blob + 8, key_id, 6);
    atomic_fetch_add(&s->uses[gen], 1);
    kms_cache_put_for_seal(s->cache, key_id, CTX_A, sizeof CTX_A, &t.k, 10);
}

static void *hammer(void *arg)
{
    struct worker *w = arg;
    for (int r = 0; r < ROUNDS && !atomic_load(&w->s->stop); r++) {
        unsigned id = (unsigned)rand_r(&w->seed) % IDS;
        if (rand_r(&w->seed) % 2)
            one_decrypt(w->s, id);
        else
            one_seal(w->s, id);
    }
    return NULL;
}

static void start(struct shared *s, struct worker *w)
{
    for (int i = 0; i < THREADS; i++) {
        w[i].s = s;
        w[i].seed = (unsigned)i * 7919u + 1;
        assert_int_equal(pthread_create(&w[i].tid, NULL, hammer, &w[i]), 0);
    }
}

static void join(struct worker *w)
{
    for (int i = 0; i < THREADS; i++)
        assert_int_equal(pthread_join(w[i].tid, NULL), 0);
}

static struct shared *new_shared(void)
{
    struct p11kms_options o = options(60);
    o.cache_max_entries = 32; /* fewer than the ids: evictions all the time */
    o.cache_max_messages = MAX_MESSAGES;
    o.cache_max_bytes = 1000;
    struct shared *s = calloc(1, sizeof *s);
    assert_non_null(s);
    s->cache = new_cache(&o, NULL);
    s->uses = calloc(GENERATIONS, sizeof *s->uses);
    assert_non_null(s->uses);
    return s;
}

static void free_shared(struct shared *s)
{
    kms_cache_free(s->cache);
    free(s->uses);
    free(s);
}

static void test_threads(void **state)
{
    (void)state;
    struct shared *s = new_shared();
    struct worker w[THREADS];
    start(s, w);
    join(w);
    assert_int_equal(atomic_load(&s->bad), 0);
    uint64_t gens = atomic_load(&s->next_gen), total = 0;
    assert_true(gens > 0);
    for (uint64_t g = 0; g < gens; g++) {
        unsigned u = atomic_load(&s->uses[g]);
        if (u > MAX_MESSAGES)
            fail_msg("seal key generation %llu served %u messages (bound %d)",
                     (unsigned long long)g, u, MAX_MESSAGES);
        total += u;
    }
    /* Reuse happened: far fewer keys than seal messages. */
    assert_true(gens < total);
    assert_true(kms_cache_count(s->cache) <= 32);
    free_shared(s);
}

/* Forks while eight threads use the cache: each child finds it empty, never hangs. */
static void test_fork_under_load(void **state)
{
    (void)state;
    struct shared *s = new_shared();
    struct worker w[THREADS];
    start(s, w);
    int status = 44;
    for (int i = 0; i < 20 && status == 44; i++) {
        pid_t pid = fork();
        if (pid < 0)
            break;
        if (pid == 0) {
            if (kms_cache_count(s->cache) != 0)
                _exit(1);
            for (size_t k = 0; k < 32; k++) {
                const uint8_t *p;
                size_t n;
                static const uint8_t zero[KEY_LEN];
                if (kms_cache_debug_slot(s->cache, k, &p, &n) != P11KMS_OK ||
                    memcmp(p, zero, n) != 0)
                    _exit(2);
            }
            struct test_key t;
            dec_key(3, &t);
            kms_cache_put_decrypt(s->cache, &t.k, CTX_A, sizeof CTX_A);
            if (kms_cache_count(s->cache) != 1)
                _exit(3);
            _exit(44);
        }
        status = wait_child(pid, 30);
        usleep(1000);
    }
    /* The threads stop before any assertion can leave this function. */
    atomic_store(&s->stop, 1);
    join(w);
    assert_int_equal(status, 44);
    assert_int_equal(atomic_load(&s->bad), 0);
    free_shared(s);
}

/* ---- main --------------------------------------------------------------------- */

int main(void)
{
    const struct CMUnitTest tests[] = {
        /* Must run first: before anything sets up the secure heap. */
        cmocka_unit_test(test_memory_lock_failure),
        cmocka_unit_test(test_dont_mlock_switch),
        cmocka_unit_test(test_locked),
        cmocka_unit_test(test_off_and_arguments),
        cmocka_unit_test(test_keys_are_separate),
        cmocka_unit_test(test_age),
        cmocka_unit_test(test_grace),
        cmocka_unit_test(test_get_decrypt_key),
        cmocka_unit_test(test_id_pieces),
        cmocka_unit_test(test_messages),
        cmocka_unit_test(test_bytes),
        cmocka_unit_test(test_entries_lru),
        cmocka_unit_test(test_fork_child_finds_empty_cache),
        cmocka_unit_test(test_fork_without_handlers),
        cmocka_unit_test(test_threads),
        cmocka_unit_test(test_fork_under_load),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
