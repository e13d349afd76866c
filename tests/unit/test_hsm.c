/*
 * Unit tests for src/hsm/hsm.h on a real SoftHSM2 token, made for each test
 * in a temporary folder (SOFTHSM2_CONF pointing there, kms_hsm_init_token, as
 * p11kmsd --dev does) and removed after it: a root key's attributes as the
 * token reports them; a key version made and wrapped in the token (40 bytes,
 * no object left behind); its unwrapping into the holder session as a
 * sensitive, non-extractable key that does AES-GCM; wrapped keys the root
 * refuses (tampered, truncated, another root's) failing as KMS_ERR_INTERNAL;
 * kms_hsm_find_secret; and kms_hsm_epoch staying put through ordinary calls.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "common/buf.h"
#include "common/error.h"
#include "hsm/hsm.h"
#include "token.h"

struct fixture {
    char dir[128];
    struct kms_hsm *hsm;
    struct kms_session *s;
};

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    if (!f || test_token_make(f->dir, sizeof f->dir) != 0)
        return -1;
    if (test_token_open(&f->hsm) != KMS_OK || kms_hsm_acquire(f->hsm, &f->s) != KMS_OK) {
        fprintf(stderr, "opening the token: %s\n", kms_err_message());
        return -1;
    }
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    if (f->s)
        kms_hsm_release(f->s);
    kms_hsm_close(f->hsm);
    test_token_remove(f->dir);
    free(f);
    return 0;
}

static CK_OBJECT_HANDLE make_root(struct kms_session *s, uint8_t fill)
{
    uint8_t id[16];
    char label[32];
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    memset(id, fill, sizeof id);
    snprintf(label, sizeof label, "p11kms-root:%u", 1700000000u + fill);
    assert_int_equal(kms_hsm_generate_root(s, id, sizeof id, label, &h), KMS_OK);
    assert_int_not_equal(h, CK_INVALID_HANDLE);
    return h;
}

static CK_BBOOL bool_attr(struct kms_session *s, CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type)
{
    CK_BBOOL v = 0x55;
    CK_ATTRIBUTE a = {type, &v, sizeof v};
    assert_int_equal(kms_hsm_get_attributes(s, h, &a, 1), KMS_OK);
    assert_int_equal(a.ulValueLen, sizeof v);
    assert_true(v == CK_TRUE || v == CK_FALSE);
    return v;
}

static CK_ULONG ulong_attr(struct kms_session *s, CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type)
{
    CK_ULONG v = 0;
    CK_ATTRIBUTE a = {type, &v, sizeof v};
    assert_int_equal(kms_hsm_get_attributes(s, h, &a, 1), KMS_OK);
    return v;
}

/* CKA_VALUE cannot be read: the token says it is sensitive, and gives no bytes. */
static void assert_value_unreadable(struct kms_session *s, CK_OBJECT_HANDLE h)
{
    uint8_t value[64];
    memset(value, 0, sizeof value);
    CK_ATTRIBUTE a = {CKA_VALUE, value, sizeof value};
    assert_int_equal(kms_hsm_get_attributes(s, h, &a, 1), KMS_ERR_NOT_FOUND);
    assert_int_equal(a.ulValueLen, CK_UNAVAILABLE_INFORMATION);
    uint8_t zero[64] = {0};
    assert_memory_equal(value, zero, sizeof value);
    struct kms_buf b = KMS_BUF_INIT;
    assert_int_not_equal(kms_hsm_get_bytes(s, h, CKA_VALUE, &b), KMS_OK);
    assert_int_equal(b.len, 0);
    kms_buf_free(&b);
}

/* Secret keys that are session objects: what a wrap or unwrap leaves in the token. */
static size_t session_keys(struct kms_session *s)
{
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_BBOOL no = CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_TOKEN, &no, sizeof no}};
    CK_OBJECT_HANDLE *found = NULL;
    size_t n = 99;
    assert_int_equal(kms_hsm_find(s, tmpl, 2, &found, &n), KMS_OK);
    free(found);
    return n;
}

static void wrap_new(struct kms_session *s, CK_OBJECT_HANDLE root, uint8_t out[64], size_t *len)
{
    *len = 64;
    assert_int_equal(kms_hsm_new_wrapped_aes(s, root, out, len), KMS_OK);
}

static CK_OBJECT_HANDLE unwrap(struct kms_hsm *hsm, CK_OBJECT_HANDLE root, const uint8_t *w,
                               size_t len, kms_err want)
{
    struct kms_session *holder;
    CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
    assert_int_equal(kms_hsm_hold(hsm, &holder), KMS_OK);
    kms_err_clear();
    kms_err rc = kms_hsm_unwrap_aes(holder, root, w, len, &h);
    kms_hsm_unhold(holder);
    assert_int_equal(rc, want);
    return h;
}

/* ---- tests --------------------------------------------------------------------- */

static void test_generate_root_attributes(void **state)
{
    struct fixture *f = *state;
    struct kms_session *s = f->s;
    CK_OBJECT_HANDLE root = make_root(s, 0xa1);

    assert_int_equal(ulong_attr(s, root, CKA_CLASS), CKO_SECRET_KEY);
    assert_int_equal(ulong_attr(s, root, CKA_KEY_TYPE), CKK_AES);
    assert_int_equal(ulong_attr(s, root, CKA_VALUE_LEN), 32);
    assert_int_equal(bool_attr(s, root, CKA_TOKEN), CK_TRUE);
    assert_int_equal(bool_attr(s, root, CKA_PRIVATE), CK_TRUE);
    assert_int_equal(bool_attr(s, root, CKA_SENSITIVE), CK_TRUE);
    assert_int_equal(bool_attr(s, root, CKA_EXTRACTABLE), CK_FALSE);
    assert_int_equal(bool_attr(s, root, CKA_ALWAYS_SENSITIVE), CK_TRUE);
    assert_int_equal(bool_attr(s, root, CKA_NEVER_EXTRACTABLE), CK_TRUE);
    assert_int_equal(bool_attr(s, root, CKA_WRAP), CK_TRUE);
    assert_int_equal(bool_attr(s, root, CKA_UNWRAP), CK_TRUE);
    assert_int_equal(bool_attr(s, root, CKA_ENCRYPT), CK_FALSE);
    assert_int_equal(bool_attr(s, root, CKA_DECRYPT), CK_FALSE);
    assert_int_equal(bool_attr(s, root, CKA_SIGN), CK_FALSE);
    assert_int_equal(bool_attr(s, root, CKA_VERIFY), CK_FALSE);
    assert_int_equal(bool_attr(s, root, CKA_DERIVE), CK_FALSE);

    struct kms_buf b = KMS_BUF_INIT;
    assert_int_equal(kms_hsm_get_bytes(s, root, CKA_LABEL, &b), KMS_OK);
    assert_string_equal((const char *)b.data, "p11kms-root:1700000161");
    kms_buf_free(&b);
    uint8_t id[16];
    memset(id, 0xa1, sizeof id);
    assert_int_equal(kms_hsm_get_bytes(s, root, CKA_ID, &b), KMS_OK);
    assert_int_equal(b.len, 16);
    assert_memory_equal(b.data, id, 16);
    kms_buf_free(&b);
    assert_value_unreadable(s, root);

    /* a root cannot encrypt: GCM under it is refused */
    uint8_t iv[12] = {0}, in[16] = {0}, out[32];
    assert_int_not_equal(kms_hsm_gcm_encrypt(s, root, iv, NULL, 0, in, sizeof in, out), KMS_OK);
    kms_err_clear();
}

static void test_new_wrapped_aes(void **state)
{
    struct fixture *f = *state;
    CK_OBJECT_HANDLE root = make_root(f->s, 0xa2);
    uint8_t a[64], b[64];
    size_t alen, blen;

    assert_int_equal(session_keys(f->s), 0);
    wrap_new(f->s, root, a, &alen);
    wrap_new(f->s, root, b, &blen);
    assert_int_equal(alen, 40);
    assert_int_equal(blen, 40);
    /* a new key each time */
    assert_memory_not_equal(a, b, 40);
    /* the generated key is destroyed once wrapped */
    assert_int_equal(session_keys(f->s), 0);

    /* too little room: refused, the room wiped, nothing left behind */
    uint8_t small[39];
    size_t slen = sizeof small;
    memset(small, 0xee, sizeof small);
    assert_int_equal(kms_hsm_new_wrapped_aes(f->s, root, small, &slen), KMS_ERR_INTERNAL);
    uint8_t zero[39] = {0};
    assert_memory_equal(small, zero, sizeof small);
    assert_int_equal(session_keys(f->s), 0);
}

static void test_unwrap_and_gcm(void **state)
{
    struct fixture *f = *state;
    struct kms_session *s = f->s;
    CK_OBJECT_HANDLE root = make_root(s, 0xa3);
    uint8_t w[64], iv[12], ct[64 + 16], pt[64], again[64];
    size_t wlen;
    static const uint8_t msg[] = "attack at dawn; bring 40 bytes of wrapped key";
    static const uint8_t aad[] = "header||context";

    wrap_new(s, root, w, &wlen);
    CK_OBJECT_HANDLE h = unwrap(f->hsm, root, w, wlen, KMS_OK);
    assert_int_not_equal(h, CK_INVALID_HANDLE);
    assert_int_equal(session_keys(s), 1);

    assert_int_equal(bool_attr(s, h, CKA_TOKEN), CK_FALSE);
    assert_int_equal(bool_attr(s, h, CKA_PRIVATE), CK_TRUE);
    assert_int_equal(bool_attr(s, h, CKA_SENSITIVE), CK_TRUE);
    assert_int_equal(bool_attr(s, h, CKA_EXTRACTABLE), CK_FALSE);
    assert_int_equal(bool_attr(s, h, CKA_ENCRYPT), CK_TRUE);
    assert_int_equal(bool_attr(s, h, CKA_DECRYPT), CK_TRUE);
    assert_int_equal(bool_attr(s, h, CKA_WRAP), CK_FALSE);
    assert_int_equal(bool_attr(s, h, CKA_UNWRAP), CK_FALSE);
    assert_int_equal(ulong_attr(s, h, CKA_KEY_TYPE), CKK_AES);
    /* (SoftHSM2 2.6 leaves CKA_VALUE_LEN 0 on unwrapped keys: the 40-byte wrap says 32.) */
    assert_value_unreadable(s, h);

    /* GCM through a pool session on the holder's object */
    memset(iv, 0x42, sizeof iv);
    assert_int_equal(kms_hsm_gcm_encrypt(s, h, iv, aad, sizeof aad, msg, sizeof msg, ct), KMS_OK);
    assert_memory_not_equal(ct, msg, sizeof msg);
    assert_int_equal(kms_hsm_gcm_decrypt(s, h, iv, aad, sizeof aad, ct, sizeof msg + 16, pt),
                     KMS_OK);
    assert_memory_equal(pt, msg, sizeof msg);

    /* the same wrapped bytes unwrap to the same key */
    CK_OBJECT_HANDLE h2 = unwrap(f->hsm, root, w, wlen, KMS_OK);
    assert_int_not_equal(h2, h);
    memset(again, 0, sizeof again);
    assert_int_equal(kms_hsm_gcm_decrypt(s, h2, iv, aad, sizeof aad, ct, sizeof msg + 16, again),
                     KMS_OK);
    assert_memory_equal(again, msg, sizeof msg);

    /* a wrong tag, a wrong AAD, a wrong IV: refused, the output wiped */
    uint8_t zero[64] = {0};
    ct[sizeof msg + 3] ^= 0x01;
    memset(pt, 0xee, sizeof pt);
    assert_int_equal(kms_hsm_gcm_decrypt(s, h, iv, aad, sizeof aad, ct, sizeof msg + 16, pt),
                     KMS_ERR_INVALID_CIPHERTEXT);
    assert_memory_equal(pt, zero, sizeof msg);
    ct[sizeof msg + 3] ^= 0x01;
    memset(pt, 0xee, sizeof pt);
    assert_int_equal(kms_hsm_gcm_decrypt(s, h, iv, aad, sizeof aad - 1, ct, sizeof msg + 16, pt),
                     KMS_ERR_INVALID_CIPHERTEXT);
    assert_memory_equal(pt, zero, sizeof msg);
    iv[0] ^= 0x80;
    assert_int_equal(kms_hsm_gcm_decrypt(s, h, iv, aad, sizeof aad, ct, sizeof msg + 16, pt),
                     KMS_ERR_INVALID_CIPHERTEXT);
    iv[0] ^= 0x80;
    /* shorter than a tag */
    assert_int_equal(kms_hsm_gcm_decrypt(s, h, iv, aad, sizeof aad, ct, 15, pt),
                     KMS_ERR_INVALID_CIPHERTEXT);

    /* another key version does not open it */
    uint8_t w3[64];
    size_t w3len;
    wrap_new(s, root, w3, &w3len);
    CK_OBJECT_HANDLE h3 = unwrap(f->hsm, root, w3, w3len, KMS_OK);
    assert_int_equal(kms_hsm_gcm_decrypt(s, h3, iv, aad, sizeof aad, ct, sizeof msg + 16, pt),
                     KMS_ERR_INVALID_CIPHERTEXT);

    /* destroyed: the handle is no longer usable */
    assert_int_equal(kms_hsm_destroy(s, h2), KMS_OK);
    assert_int_equal(kms_hsm_gcm_decrypt(s, h2, iv, aad, sizeof aad, ct, sizeof msg + 16, pt),
                     KMS_ERR_KEY_UNAVAILABLE);
    assert_int_equal(session_keys(s), 2);
}

/* Every failed token call kms_hsm_failures has counted so far, whatever its return value. */
static uint64_t failures_counted(void)
{
    const char *names[KMS_HSM_FAILURE_KINDS];
    uint64_t counts[KMS_HSM_FAILURE_KINDS], sum = 0;
    size_t n = kms_hsm_failures(names, counts, KMS_HSM_FAILURE_KINDS);
    assert_int_equal(n, KMS_HSM_FAILURE_KINDS);
    assert_string_equal(names[n - 1], "other");
    for (size_t i = 0; i < n; i++)
        sum += counts[i];
    return sum;
}

static void test_unwrap_refused(void **state)
{
    struct fixture *f = *state;
    struct kms_session *s = f->s;
    CK_OBJECT_HANDLE root = make_root(s, 0xa4), other = make_root(s, 0xb4);
    uint8_t w[64], bad[64];
    size_t wlen;

    wrap_new(s, root, w, &wlen);
    assert_int_equal(wlen, 40);

    /* a flipped bit anywhere: the integrity check of RFC 5649 fails, a token failure each */
    static const size_t where[] = {0, 7, 8, 20, 39};
    uint64_t counted = failures_counted();
    for (size_t i = 0; i < sizeof where / sizeof where[0]; i++) {
        memcpy(bad, w, wlen);
        bad[where[i]] ^= 0x01;
        assert_int_equal(unwrap(f->hsm, root, bad, wlen, KMS_ERR_INTERNAL), CK_INVALID_HANDLE);
        assert_string_equal(kms_err_message(),
                            "The key store could not unwrap a stored key version");
    }
    assert_int_equal(failures_counted() - counted, sizeof where / sizeof where[0]);
    /* truncated: to a whole block shorter, to a part block, to nothing useful */
    static const size_t lens[] = {32, 39, 24, 16, 8};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++)
        assert_int_equal(unwrap(f->hsm, root, w, lens[i], KMS_ERR_INTERNAL), CK_INVALID_HANDLE);
    /* one byte too many */
    memcpy(bad, w, wlen);
    bad[wlen] = 0;
    assert_int_equal(unwrap(f->hsm, root, bad, wlen + 1, KMS_ERR_INTERNAL), CK_INVALID_HANDLE);
    /* under another root */
    assert_int_equal(unwrap(f->hsm, other, w, wlen, KMS_ERR_INTERNAL), CK_INVALID_HANDLE);
    /* nothing was left behind, and the right root still opens it */
    assert_int_equal(session_keys(s), 0);
    assert_int_not_equal(unwrap(f->hsm, root, w, wlen, KMS_OK), CK_INVALID_HANDLE);
    assert_int_equal(session_keys(s), 1);
}

static void test_find_secret(void **state)
{
    struct fixture *f = *state;
    struct kms_session *s = f->s;
    CK_OBJECT_HANDLE a = make_root(s, 0xa5), b = make_root(s, 0xb5), h = 12345;
    uint8_t id[16];

    memset(id, 0xa5, sizeof id);
    assert_int_equal(kms_hsm_find_secret(s, id, sizeof id, &h), KMS_OK);
    assert_int_equal(h, a);
    memset(id, 0xb5, sizeof id);
    assert_int_equal(kms_hsm_find_secret(s, id, sizeof id, &h), KMS_OK);
    assert_int_equal(h, b);
    /* unknown: another id, a prefix of a real one, a longer one */
    memset(id, 0xc5, sizeof id);
    h = 12345;
    assert_int_equal(kms_hsm_find_secret(s, id, sizeof id, &h), KMS_OK);
    assert_int_equal(h, CK_INVALID_HANDLE);
    memset(id, 0xa5, sizeof id);
    h = 12345;
    assert_int_equal(kms_hsm_find_secret(s, id, 15, &h), KMS_OK);
    assert_int_equal(h, CK_INVALID_HANDLE);
    uint8_t longer[20];
    memset(longer, 0xa5, sizeof longer);
    assert_int_equal(kms_hsm_find_secret(s, longer, sizeof longer, &h), KMS_OK);
    assert_int_equal(h, CK_INVALID_HANDLE);

    /* a token object: a new login (another process, a restart) finds it and its wraps work */
    uint8_t w[64], iv[12] = {1}, ct[32], pt[16];
    static const uint8_t msg[16] = "persistent root";
    size_t wlen;
    wrap_new(s, a, w, &wlen);
    CK_OBJECT_HANDLE k = unwrap(f->hsm, a, w, wlen, KMS_OK);
    assert_int_equal(kms_hsm_gcm_encrypt(s, k, iv, NULL, 0, msg, sizeof msg, ct), KMS_OK);
    kms_hsm_release(f->s);
    f->s = NULL;
    kms_hsm_close(f->hsm);
    f->hsm = NULL;
    assert_int_equal(test_token_open(&f->hsm), KMS_OK);
    assert_int_equal(kms_hsm_acquire(f->hsm, &f->s), KMS_OK);
    s = f->s;
    /* the session object went with the old sessions */
    assert_int_equal(session_keys(s), 0);
    memset(id, 0xa5, sizeof id);
    assert_int_equal(kms_hsm_find_secret(s, id, sizeof id, &h), KMS_OK);
    assert_int_not_equal(h, CK_INVALID_HANDLE);
    k = unwrap(f->hsm, h, w, wlen, KMS_OK);
    assert_int_equal(kms_hsm_gcm_decrypt(s, k, iv, NULL, 0, ct, sizeof ct, pt), KMS_OK);
    assert_memory_equal(pt, msg, sizeof msg);
}

static void test_epoch_stable(void **state)
{
    struct fixture *f = *state;
    struct kms_session *s = f->s, *holder, *s2;
    unsigned long epoch = kms_hsm_epoch(f->hsm);
    uint8_t w[64], rnd[32], iv[12] = {0}, ct[32], pt[16] = {0};
    size_t wlen;

    assert_true(kms_hsm_ready(f->hsm));
    CK_OBJECT_HANDLE root = make_root(s, 0xa6);
    wrap_new(s, root, w, &wlen);
    CK_OBJECT_HANDLE k = unwrap(f->hsm, root, w, wlen, KMS_OK);
    assert_int_equal(kms_hsm_random(s, rnd, sizeof rnd), KMS_OK);
    assert_int_equal(kms_hsm_gcm_encrypt(s, k, iv, NULL, 0, pt, sizeof pt, ct), KMS_OK);
    /* a refused unwrap and a refused decrypt are not session faults */
    w[3] ^= 1;
    unwrap(f->hsm, root, w, wlen, KMS_ERR_INTERNAL);
    ct[0] ^= 1;
    assert_int_equal(kms_hsm_gcm_decrypt(s, k, iv, NULL, 0, ct, sizeof ct, pt),
                     KMS_ERR_INVALID_CIPHERTEXT);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(kms_hsm_hold(f->hsm, &holder), KMS_OK);
        kms_hsm_unhold(holder);
        assert_int_equal(kms_hsm_acquire(f->hsm, &s2), KMS_OK);
        kms_hsm_release(s2);
    }
    /* the pool has two sessions: with both taken, a third waits and times out */
    assert_int_equal(kms_hsm_acquire(f->hsm, &s2), KMS_OK);
    struct kms_hsm_load load;
    kms_hsm_load(f->hsm, &load);
    assert_int_equal(load.sessions, 2);
    assert_int_equal(load.in_use, 2);
    struct kms_session *third = NULL;
    assert_int_equal(kms_hsm_acquire(f->hsm, &third), KMS_ERR_DEPENDENCY_TIMEOUT);
    assert_null(third);
    kms_hsm_release(s2);
    assert_true(kms_hsm_ready(f->hsm));
    assert_int_equal(kms_hsm_epoch(f->hsm), epoch);
    /* the unwrapped key is still there and usable */
    ct[0] ^= 1;
    assert_int_equal(kms_hsm_gcm_decrypt(s, k, iv, NULL, 0, ct, sizeof ct, pt), KMS_OK);
    assert_int_equal(kms_hsm_epoch(f->hsm), epoch);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_generate_root_attributes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_new_wrapped_aes, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unwrap_and_gcm, setup, teardown),
        cmocka_unit_test_setup_teardown(test_unwrap_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_find_secret, setup, teardown),
        cmocka_unit_test_setup_teardown(test_epoch_stable, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
