/*
 * Unit tests for src/keystore/keystore.h over a real SoftHSM2 token and a real
 * SQLite database, both made for each test in a temporary folder and removed
 * after it (tests/unit/token.c, then
 * kms_hsm_open, kms_store_open(KMS_STORE_INIT), kms_keystore_init_roots,
 * kms_keystore_open). They prove: encryption round trips under a canonical
 * context; every blob that does not open (unknown key, unknown version, bad
 * tag, wrong context) answers InvalidCiphertext with one message; expect_ref,
 * disabling, rotation on demand, aliases and deletion windows answer AWS's
 * errors; the usage bound rotates a key without ever reserving past it; a
 * small key cache evicts and unwraps again; init is idempotent; a second node
 * over the same database and token sees the first's keys, aliases and (after
 * a tick) its rotations and changes; a tick performs due rotations and
 * deletions; and asymmetric and HMAC keys sign, decrypt (RSAES-OAEP), agree
 * (ECDH, equal to OpenSSL's) and MAC in the token within their usage only,
 * are never rotated, and read back from the database on a second node.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <openssl/evp.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/blob.h"
#include "common/buf.h"
#include "common/encoding.h"
#include "common/error.h"
#include "common/keyspec.h"
#include "common/pubkey.h"
#include "hsm/hsm.h"
#include "keystore/keystore.h"
#include "store/store.h"
#include "token.h"

#define ARN_PREFIX "arn:aws:kms:us-east-1:111122223333:"
#define INVALID_BLOB "The ciphertext, its key or its encryption context is not valid"

/* One node: its token connection, database connection and key store. */
struct node {
    struct kms_hsm *hsm;
    struct kms_store *store;
    struct kms_keystore *ks;
};

struct fixture {
    char dir[128];
    char url[256];
    struct kms_keystore_config cfg;
    struct node a, b;
    struct kms_buf ctx;   /* {"purpose": "unit", "tenant": "acme"} */
    struct kms_buf other; /* {"purpose": "unit", "tenant": "evil"} */
};

/* ---- set-up: a token and a database in a temporary folder ---------------------- */

static void make_context(struct kms_buf *out, const char *tenant)
{
    struct kms_context_pair pairs[] = {
        {"tenant", 6, tenant, strlen(tenant)},
        {"purpose", 7, "unit", 4},
    };
    assert_int_equal(kms_context_canonical(pairs, 2, out), KMS_OK);
}

static int setup(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    if (!f || test_token_make(f->dir, sizeof f->dir) != 0)
        return -1;
    snprintf(f->url, sizeof f->url, "sqlite:%s/kms.db", f->dir);
    kms_keystore_config_defaults(&f->cfg);
    make_context(&f->ctx, "acme");
    make_context(&f->other, "evil");
    *state = f;
    return 0;
}

static void node_close(struct node *n)
{
    kms_keystore_close(n->ks);
    kms_store_close(n->store);
    kms_hsm_close(n->hsm);
    memset(n, 0, sizeof *n);
}

static int teardown(void **state)
{
    struct fixture *f = *state;
    node_close(&f->b);
    node_close(&f->a);
    kms_buf_free(&f->ctx);
    kms_buf_free(&f->other);
    test_token_remove(f->dir);
    free(f);
    return 0;
}

static void open_hsm(struct kms_hsm **out)
{
    struct kms_hsm_config c = {.module = test_token_module(),
                               .token = TEST_TOKEN_LABEL,
                               .pin = TEST_TOKEN_USER_PIN,
                               .sessions = 4};
    kms_err rc = kms_hsm_open(&c, out);
    if (rc != KMS_OK)
        fail_msg("kms_hsm_open: %s", kms_err_message());
}

static void open_store(const char *url, int mode, struct kms_store **out)
{
    struct kms_store_config c = {.url = url, .mode = mode};
    kms_err rc = kms_store_open(&c, out);
    if (rc != KMS_OK)
        fail_msg("kms_store_open: %s", kms_err_message());
}

/* Node a as p11kmsd init then p11kmsd start it, with f->cfg. */
static struct kms_keystore *start(struct fixture *f)
{
    int made = -1;
    open_hsm(&f->a.hsm);
    open_store(f->url, KMS_STORE_INIT, &f->a.store);
    assert_int_equal(kms_keystore_init_roots(f->a.hsm, f->a.store, &made), KMS_OK);
    assert_int_equal(made, 1);
    kms_err rc = kms_keystore_open(f->a.hsm, f->a.store, &f->cfg, &f->a.ks);
    if (rc != KMS_OK)
        fail_msg("kms_keystore_open: %s", kms_err_message());
    return f->a.ks;
}

/* Node b: another p11kmsd over the same token and database. */
static struct kms_keystore *start_second(struct fixture *f)
{
    open_hsm(&f->b.hsm);
    open_store(f->url, KMS_STORE_OPEN, &f->b.store);
    kms_err rc = kms_keystore_open(f->b.hsm, f->b.store, &f->cfg, &f->b.ks);
    if (rc != KMS_OK)
        fail_msg("kms_keystore_open (second node): %s", kms_err_message());
    return f->b.ks;
}

/* ---- helpers ------------------------------------------------------------------- */

static void create(struct kms_keystore *ks, const char *description, struct kms_key_info *out)
{
    memset(out, 0, sizeof *out);
    kms_err rc = kms_keystore_create_key(ks, description, NULL, out);
    if (rc != KMS_OK)
        fail_msg("create_key: %s", kms_err_message());
    assert_int_equal(strlen(out->id_text), KMS_UUID_TEXT_LEN);
}

static kms_err encrypt(struct kms_keystore *ks, const char *ref, const struct kms_buf *ctx,
                       const char *msg, struct kms_buf *blob)
{
    struct kms_key_info info = {0};
    kms_buf_free(blob);
    kms_err_clear();
    kms_err rc = kms_keystore_encrypt(ks, ref, ctx, (const uint8_t *)msg, strlen(msg), blob, &info);
    kms_key_info_clear(&info);
    return rc;
}

static void must_encrypt(struct kms_keystore *ks, const char *ref, const struct kms_buf *ctx,
                         const char *msg, struct kms_buf *blob)
{
    kms_err rc = encrypt(ks, ref, ctx, msg, blob);
    if (rc != KMS_OK)
        fail_msg("encrypt under %s: %s %s", ref, kms_err_type(rc), kms_err_message());
    assert_int_equal(blob->len, KMS_BLOB_OVERHEAD + strlen(msg));
}

/* Decrypts and, when it works, checks the plaintext and the key it names. */
static kms_err decrypt(struct kms_keystore *ks, const struct kms_buf *blob,
                       const struct kms_buf *ctx, const char *expect_ref, const char *want,
                       const char *want_key)
{
    struct kms_buf pt = KMS_BUF_INIT;
    struct kms_key_info info = {0};
    kms_err_clear();
    kms_err rc = kms_keystore_decrypt(ks, blob->data, blob->len, ctx, expect_ref, &pt, &info);
    if (rc == KMS_OK) {
        assert_int_equal(pt.len, strlen(want));
        assert_memory_equal(pt.data, want, pt.len);
        if (want_key)
            assert_string_equal(info.id_text, want_key);
    } else {
        assert_int_equal(pt.len, 0);
    }
    kms_buf_free(&pt);
    kms_key_info_clear(&info);
    return rc;
}

static void must_decrypt(struct kms_keystore *ks, const struct kms_buf *blob,
                         const struct kms_buf *ctx, const char *want, const char *want_key)
{
    kms_err rc = decrypt(ks, blob, ctx, NULL, want, want_key);
    if (rc != KMS_OK)
        fail_msg("decrypt: %s %s", kms_err_type(rc), kms_err_message());
}

static uint32_t blob_vid(const struct kms_buf *blob)
{
    const uint8_t *p = blob->data + 1 + KMS_UUID_LEN;
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* ref may point into *out (describe(ks, k.id_text, &k)): it is copied first. */
static void describe(struct kms_keystore *ks, const char *ref_in, struct kms_key_info *out)
{
    char ref[KMS_ARN_MAX + KMS_ALIAS_MAX];
    snprintf(ref, sizeof ref, "%s", ref_in);
    kms_key_info_clear(out);
    kms_err rc = kms_keystore_describe(ks, ref, out);
    if (rc != KMS_OK)
        fail_msg("describe %s: %s %s", ref, kms_err_type(rc), kms_err_message());
}

static kms_err describe_rc(struct kms_keystore *ks, const char *ref)
{
    struct kms_key_info info = {0};
    kms_err_clear();
    kms_err rc = kms_keystore_describe(ks, ref, &info);
    kms_key_info_clear(&info);
    return rc;
}

static void copy_buf(struct kms_buf *dst, const struct kms_buf *src)
{
    kms_buf_free(dst);
    assert_int_equal(kms_buf_append(dst, src->data, src->len), KMS_OK);
}

struct version_rows {
    uint32_t vid[32];
    uint64_t reserved[32];
    uint64_t bound[32];
    int rotation[32];
    size_t n;
};

static kms_err note_version(void *arg, const struct kms_version_row *r)
{
    struct version_rows *v = arg;
    assert_true(v->n < 32);
    assert_int_equal(r->wrapped_len, 40);
    assert_true(r->root > 0);
    v->vid[v->n] = r->vid;
    v->reserved[v->n] = r->reserved;
    v->bound[v->n] = r->bound;
    v->rotation[v->n++] = r->rotation;
    return KMS_OK;
}

/* A key's version rows, read through the store (as another process would). */
static void read_versions(struct kms_store *st, const uint8_t id[KMS_UUID_LEN],
                          struct version_rows *out)
{
    struct kms_tx *tx;
    memset(out, 0, sizeof *out);
    assert_int_equal(kms_store_begin(st, KMS_TX_READ, &tx), KMS_OK);
    assert_int_equal(kms_store_versions(tx, id, note_version, out), KMS_OK);
    assert_int_equal(kms_store_commit(tx), KMS_OK);
}

/* Polls until cond(arg) holds, ticking the key store each time; fails after 20 s. */
static void tick_until(struct kms_keystore *ks, int (*cond)(void *arg), void *arg)
{
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        kms_keystore_tick(ks);
        if (cond(arg))
            return;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec - start.tv_sec > 20)
            fail_msg("condition not reached within 20 s");
        usleep(100 * 1000);
    }
}

/* ---- encryption ---------------------------------------------------------------- */

static void test_encrypt_decrypt(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0}, info = {0};
    struct kms_buf blob = KMS_BUF_INIT, empty = KMS_BUF_INIT;

    create(ks, "round trip", &k);
    assert_int_equal(k.state, KMS_KEY_ENABLED);
    assert_string_equal(k.description, "round trip");
    assert_true(k.current_version != 0);
    char arn[KMS_ARN_MAX];
    snprintf(arn, sizeof arn, ARN_PREFIX "key/%s", k.id_text);
    assert_string_equal(k.arn, arn);

    /* the blob: version byte, key id, current version, then IV, ciphertext and tag */
    struct kms_buf pt = KMS_BUF_INIT;
    assert_int_equal(
        kms_keystore_encrypt(ks, k.id_text, &f->ctx, (const uint8_t *)"hello", 5, &blob, &info),
        KMS_OK);
    assert_string_equal(info.id_text, k.id_text);
    assert_int_equal(info.current_version, k.current_version);
    assert_int_equal(blob.len, KMS_BLOB_OVERHEAD + 5);
    assert_int_equal(blob.data[0], KMS_BLOB_FORMAT_V1);
    assert_memory_equal(blob.data + 1, k.id, KMS_UUID_LEN);
    assert_int_equal(blob_vid(&blob), k.current_version);
    assert_null(memmem(blob.data, blob.len, "hello", 5));
    kms_key_info_clear(&info);
    assert_int_equal(kms_keystore_decrypt(ks, blob.data, blob.len, &f->ctx, NULL, &pt, &info),
                     KMS_OK);
    assert_int_equal(pt.len, 5);
    assert_memory_equal(pt.data, "hello", 5);
    assert_string_equal(info.id_text, k.id_text);
    kms_buf_free(&pt);

    /* the same plaintext twice: two blobs (random IVs) */
    struct kms_buf blob2 = KMS_BUF_INIT;
    must_encrypt(ks, arn, &f->ctx, "hello", &blob2);
    assert_memory_not_equal(blob.data + KMS_BLOB_HEADER_LEN, blob2.data + KMS_BLOB_HEADER_LEN,
                            blob.len - KMS_BLOB_HEADER_LEN);
    must_decrypt(ks, &blob2, &f->ctx, "hello", k.id_text);

    /* the context is bound: another one, or none, does not open it */
    assert_int_equal(decrypt(ks, &blob, &f->other, NULL, NULL, NULL), KMS_ERR_INVALID_CIPHERTEXT);
    assert_string_equal(kms_err_message(), INVALID_BLOB);
    assert_int_equal(kms_context_canonical(NULL, 0, &empty), KMS_OK);
    assert_int_equal(empty.len, 4);
    assert_int_equal(decrypt(ks, &blob, &empty, NULL, NULL, NULL), KMS_ERR_INVALID_CIPHERTEXT);
    /* an empty context works both ways */
    must_encrypt(ks, k.id_text, &empty, "no context", &blob2);
    must_decrypt(ks, &blob2, &empty, "no context", k.id_text);
    assert_int_equal(decrypt(ks, &blob2, &f->ctx, NULL, NULL, NULL), KMS_ERR_INVALID_CIPHERTEXT);

    /* a key that does not exist */
    assert_int_equal(encrypt(ks, "0b5b8f7e-1c1a-4d7e-9a0e-3f1e2d3c4b5a", &f->ctx, "x", &blob2),
                     KMS_ERR_NOT_FOUND);
    assert_int_equal(encrypt(ks, "not-a-key", &f->ctx, "x", &blob2), KMS_ERR_NOT_FOUND);
    assert_int_equal(encrypt(ks, "alias/none", &f->ctx, "x", &blob2), KMS_ERR_NOT_FOUND);
    assert_int_equal(encrypt(ks, "arn:aws:kms:eu-west-1:111122223333:key/x", &f->ctx, "x", &blob2),
                     KMS_ERR_NOT_FOUND);
    assert_int_equal(encrypt(ks, "arn:aws:s3:::bucket", &f->ctx, "x", &blob2), KMS_ERR_INVALID_ARN);

    kms_buf_free(&blob);
    kms_buf_free(&blob2);
    kms_buf_free(&empty);
    kms_key_info_clear(&k);
    kms_key_info_clear(&info);
}

static void test_bad_blobs_one_answer(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0};
    struct kms_buf blob = KMS_BUF_INIT, bad = KMS_BUF_INIT;

    create(ks, "", &k);
    must_encrypt(ks, k.id_text, &f->ctx, "secret", &blob);

    /* an unknown key id (twice: the second answer comes from the negative cache) */
    for (int i = 0; i < 2; i++) {
        copy_buf(&bad, &blob);
        bad.data[1] ^= 0x40;
        assert_int_equal(decrypt(ks, &bad, &f->ctx, NULL, NULL, NULL), KMS_ERR_INVALID_CIPHERTEXT);
        assert_string_equal(kms_err_message(), INVALID_BLOB);
    }
    /* an unknown version of a real key (twice too) */
    for (int i = 0; i < 2; i++) {
        copy_buf(&bad, &blob);
        bad.data[1 + KMS_UUID_LEN + 3] ^= 0x01;
        assert_int_equal(decrypt(ks, &bad, &f->ctx, NULL, NULL, NULL), KMS_ERR_INVALID_CIPHERTEXT);
        assert_string_equal(kms_err_message(), INVALID_BLOB);
    }
    /* a flipped tag byte, a flipped ciphertext byte, a flipped IV byte */
    static const size_t flips[] = {0, 1, 2};
    for (size_t i = 0; i < sizeof flips / sizeof flips[0]; i++) {
        copy_buf(&bad, &blob);
        size_t at = flips[i] == 0   ? blob.len - 1
                    : flips[i] == 1 ? KMS_BLOB_HEADER_LEN + KMS_GCM_IV_LEN
                                    : KMS_BLOB_HEADER_LEN;
        bad.data[at] ^= 0x01;
        assert_int_equal(decrypt(ks, &bad, &f->ctx, NULL, NULL, NULL), KMS_ERR_INVALID_CIPHERTEXT);
        assert_string_equal(kms_err_message(), INVALID_BLOB);
    }
    /* the wrong context */
    assert_int_equal(decrypt(ks, &blob, &f->other, NULL, NULL, NULL), KMS_ERR_INVALID_CIPHERTEXT);
    assert_string_equal(kms_err_message(), INVALID_BLOB);
    /* malformed: too short, another format version */
    copy_buf(&bad, &blob);
    bad.len = KMS_BLOB_MIN_LEN - 1;
    assert_int_equal(decrypt(ks, &bad, &f->ctx, NULL, NULL, NULL), KMS_ERR_INVALID_CIPHERTEXT);
    copy_buf(&bad, &blob);
    bad.data[0] = 2;
    assert_int_equal(decrypt(ks, &bad, &f->ctx, NULL, NULL, NULL), KMS_ERR_INVALID_CIPHERTEXT);

    /* after all that, the real blob still opens */
    must_decrypt(ks, &blob, &f->ctx, "secret", k.id_text);
    kms_buf_free(&blob);
    kms_buf_free(&bad);
    kms_key_info_clear(&k);
}

static void test_expect_ref(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_key_info a = {0}, b = {0};
    struct kms_buf blob = KMS_BUF_INIT;

    create(ks, "a", &a);
    create(ks, "b", &b);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/a", a.id_text), KMS_OK);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/b", b.id_text), KMS_OK);
    must_encrypt(ks, a.id_text, &f->ctx, "for a", &blob);

    /* the right key, named every way */
    assert_int_equal(decrypt(ks, &blob, &f->ctx, a.id_text, "for a", a.id_text), KMS_OK);
    assert_int_equal(decrypt(ks, &blob, &f->ctx, a.arn, "for a", a.id_text), KMS_OK);
    assert_int_equal(decrypt(ks, &blob, &f->ctx, "alias/a", "for a", a.id_text), KMS_OK);
    assert_int_equal(decrypt(ks, &blob, &f->ctx, ARN_PREFIX "alias/a", "for a", a.id_text), KMS_OK);
    /* another key */
    assert_int_equal(decrypt(ks, &blob, &f->ctx, b.id_text, NULL, NULL), KMS_ERR_INCORRECT_KEY);
    assert_int_equal(decrypt(ks, &blob, &f->ctx, "alias/b", NULL, NULL), KMS_ERR_INCORRECT_KEY);
    /* a key that does not exist: NotFound, not IncorrectKey */
    assert_int_equal(decrypt(ks, &blob, &f->ctx, "alias/none", NULL, NULL), KMS_ERR_NOT_FOUND);
    kms_buf_free(&blob);
    kms_key_info_clear(&a);
    kms_key_info_clear(&b);
}

static void test_disable_enable(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0};
    struct kms_buf blob = KMS_BUF_INIT, blob2 = KMS_BUF_INIT;

    create(ks, "", &k);
    must_encrypt(ks, k.id_text, &f->ctx, "before", &blob);
    assert_int_equal(kms_keystore_enable(ks, k.id_text, 0), KMS_OK);
    describe(ks, k.id_text, &k);
    assert_int_equal(k.state, KMS_KEY_DISABLED);
    assert_int_equal(encrypt(ks, k.id_text, &f->ctx, "during", &blob2), KMS_ERR_DISABLED);
    assert_int_equal(decrypt(ks, &blob, &f->ctx, NULL, NULL, NULL), KMS_ERR_DISABLED);
    struct kms_key_info r = {0};
    assert_int_equal(kms_keystore_rotate_on_demand(ks, k.id_text, &r), KMS_ERR_DISABLED);
    kms_key_info_clear(&r);
    /* disabling twice is fine */
    assert_int_equal(kms_keystore_enable(ks, k.id_text, 0), KMS_OK);
    assert_int_equal(kms_keystore_enable(ks, k.id_text, 1), KMS_OK);
    describe(ks, k.id_text, &k);
    assert_int_equal(k.state, KMS_KEY_ENABLED);
    must_decrypt(ks, &blob, &f->ctx, "before", k.id_text);
    must_encrypt(ks, k.id_text, &f->ctx, "after", &blob2);
    must_decrypt(ks, &blob2, &f->ctx, "after", k.id_text);
    assert_int_equal(kms_keystore_enable(ks, "alias/none", 0), KMS_ERR_NOT_FOUND);
    kms_buf_free(&blob);
    kms_buf_free(&blob2);
    kms_key_info_clear(&k);
}

/* ---- rotation ------------------------------------------------------------------ */

static void test_rotate_on_demand(void **state)
{
    struct fixture *f = *state;
    f->cfg.max_on_demand = 2;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0}, r = {0}, info = {0};
    struct kms_buf b1 = KMS_BUF_INIT, b2 = KMS_BUF_INIT, b3 = KMS_BUF_INIT;
    struct kms_rotation_info rot[8];
    size_t n = 99;

    create(ks, "", &k);
    uint32_t v1 = k.current_version;
    assert_int_equal(kms_keystore_list_rotations(ks, k.id_text, 0, 8, rot, &n, &info), KMS_OK);
    assert_int_equal(n, 0);

    must_encrypt(ks, k.id_text, &f->ctx, "one", &b1);
    assert_int_equal(kms_keystore_rotate_on_demand(ks, k.id_text, &r), KMS_OK);
    uint32_t v2 = r.current_version;
    assert_int_not_equal(v2, v1);
    describe(ks, k.id_text, &k);
    assert_int_equal(k.current_version, v2);
    must_encrypt(ks, k.id_text, &f->ctx, "two", &b2);
    assert_int_equal(blob_vid(&b1), v1);
    assert_int_equal(blob_vid(&b2), v2);

    assert_int_equal(kms_keystore_rotate_on_demand(ks, "alias/none", &r), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/rot", k.id_text), KMS_OK);
    assert_int_equal(kms_keystore_rotate_on_demand(ks, "alias/rot", &r), KMS_OK);
    uint32_t v3 = r.current_version;
    assert_true(v3 != v1 && v3 != v2);
    must_encrypt(ks, "alias/rot", &f->ctx, "three", &b3);
    assert_int_equal(blob_vid(&b3), v3);
    /* old blobs still open */
    must_decrypt(ks, &b1, &f->ctx, "one", k.id_text);
    must_decrypt(ks, &b2, &f->ctx, "two", k.id_text);
    must_decrypt(ks, &b3, &f->ctx, "three", k.id_text);

    /* the limit of on-demand rotations */
    kms_err_clear();
    assert_int_equal(kms_keystore_rotate_on_demand(ks, k.id_text, &r), KMS_ERR_LIMIT_EXCEEDED);
    describe(ks, k.id_text, &k);
    assert_int_equal(k.current_version, v3);

    /* rotations in ordinal order, from the marker on */
    assert_int_equal(kms_keystore_list_rotations(ks, k.id_text, 0, 8, rot, &n, &info), KMS_OK);
    assert_int_equal(n, 2);
    assert_string_equal(info.id_text, k.id_text);
    assert_int_equal(rot[0].n, 2);
    assert_int_equal(rot[1].n, 3);
    assert_true(rot[0].on_demand);
    assert_true(rot[1].on_demand);
    assert_true(rot[0].date <= rot[1].date);
    assert_true(rot[0].date >= k.created);
    assert_int_equal(kms_keystore_list_rotations(ks, k.id_text, 3, 8, rot, &n, &info), KMS_OK);
    assert_int_equal(n, 1);
    assert_int_equal(rot[0].n, 3);
    assert_int_equal(kms_keystore_list_rotations(ks, "alias/rot", 0, 1, rot, &n, &info), KMS_OK);
    assert_int_equal(n, 1);
    assert_int_equal(rot[0].n, 2);

    /* the database agrees: three versions, the later ones ON_DEMAND */
    struct version_rows v;
    read_versions(f->a.store, k.id, &v);
    assert_int_equal(v.n, 3);
    assert_int_equal(v.vid[0], v1);
    assert_int_equal(v.vid[1], v2);
    assert_int_equal(v.vid[2], v3);
    assert_int_equal(v.rotation[0], KMS_ROTATION_NONE);
    assert_int_equal(v.rotation[1], KMS_ROTATION_ON_DEMAND);
    assert_int_equal(v.rotation[2], KMS_ROTATION_ON_DEMAND);

    kms_buf_free(&b1);
    kms_buf_free(&b2);
    kms_buf_free(&b3);
    kms_key_info_clear(&k);
    kms_key_info_clear(&r);
    kms_key_info_clear(&info);
}

static void test_rotation_settings(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0};

    create(ks, "", &k);
    assert_false(k.rotation_enabled);
    int64_t before = time(NULL);
    assert_int_equal(kms_keystore_enable_rotation(ks, k.id_text, 0), KMS_OK);
    describe(ks, k.id_text, &k);
    assert_true(k.rotation_enabled);
    assert_int_equal(k.rotation_period_days, 365);
    assert_true(k.next_rotation >= before + 365 * 86400);
    assert_true(k.next_rotation <= time(NULL) + 365 * 86400);
    kms_err_clear();
    assert_int_equal(kms_keystore_enable_rotation(ks, k.id_text, 89), KMS_ERR_VALIDATION);
    assert_int_equal(kms_keystore_enable_rotation(ks, k.id_text, 2561), KMS_ERR_VALIDATION);
    assert_int_equal(kms_keystore_enable_rotation(ks, k.id_text, 90), KMS_OK);
    describe(ks, k.id_text, &k);
    assert_int_equal(k.rotation_period_days, 90);
    /* not due for 90 days: a tick makes nothing */
    uint32_t v1 = k.current_version;
    kms_keystore_tick(ks);
    describe(ks, k.id_text, &k);
    assert_int_equal(k.current_version, v1);
    assert_int_equal(kms_keystore_disable_rotation(ks, k.id_text), KMS_OK);
    describe(ks, k.id_text, &k);
    assert_false(k.rotation_enabled);
    kms_key_info_clear(&k);
}

static void test_usage_bound(void **state)
{
    struct fixture *f = *state;
    f->cfg.usage_bound = 5;
    f->cfg.usage_block = 2;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0}, info = {0};
    struct kms_buf blobs[12];
    uint32_t vids[12];
    struct version_rows v;

    create(ks, "", &k);
    /* CreateKey reserved the first block in its own transaction */
    read_versions(f->a.store, k.id, &v);
    assert_int_equal(v.n, 1);
    assert_int_equal(v.reserved[0], 2);
    assert_int_equal(v.bound[0], 5);

    for (int i = 0; i < 12; i++) {
        char msg[16];
        snprintf(msg, sizeof msg, "use %d", i);
        memset(&blobs[i], 0, sizeof blobs[i]);
        must_encrypt(ks, k.id_text, &f->ctx, msg, &blobs[i]);
        vids[i] = blob_vid(&blobs[i]);
        /* no version is ever reserved past its bound */
        read_versions(f->a.store, k.id, &v);
        for (size_t j = 0; j < v.n; j++) {
            assert_int_equal(v.bound[j], 5);
            assert_true(v.reserved[j] <= 5);
        }
    }
    /* five uses a version: the sixth and the eleventh rotate */
    assert_int_equal(vids[0], k.current_version);
    for (int i = 1; i < 12; i++) {
        if (i % 5 == 0)
            assert_int_not_equal(vids[i], vids[i - 1]);
        else
            assert_int_equal(vids[i], vids[i - 1]);
    }
    read_versions(f->a.store, k.id, &v);
    assert_int_equal(v.n, 3);
    assert_int_equal(v.vid[0], vids[0]);
    assert_int_equal(v.vid[1], vids[5]);
    assert_int_equal(v.vid[2], vids[10]);
    assert_int_equal(v.reserved[0], 5);
    assert_int_equal(v.reserved[1], 5);
    assert_true(v.reserved[2] >= 2);
    assert_int_equal(v.rotation[1], KMS_ROTATION_AUTOMATIC);
    assert_int_equal(v.rotation[2], KMS_ROTATION_AUTOMATIC);
    describe(ks, k.id_text, &k);
    assert_int_equal(k.current_version, vids[10]);

    /* usage rotations are listed, not on demand */
    struct kms_rotation_info rot[4];
    size_t n = 0;
    assert_int_equal(kms_keystore_list_rotations(ks, k.id_text, 0, 4, rot, &n, &info), KMS_OK);
    assert_int_equal(n, 2);
    assert_false(rot[0].on_demand);
    assert_false(rot[1].on_demand);

    /* decrypting spends no uses: every blob opens, nothing more is reserved */
    for (int i = 0; i < 12; i++) {
        char msg[16];
        snprintf(msg, sizeof msg, "use %d", i);
        must_decrypt(ks, &blobs[i], &f->ctx, msg, k.id_text);
    }
    struct version_rows after;
    read_versions(f->a.store, k.id, &after);
    assert_int_equal(after.n, 3);
    assert_memory_equal(after.reserved, v.reserved, sizeof v.reserved);
    for (int i = 0; i < 12; i++)
        kms_buf_free(&blobs[i]);
    kms_key_info_clear(&k);
    kms_key_info_clear(&info);
}

/* ---- the key cache ------------------------------------------------------------- */

struct survey {
    size_t in_memory;
};

static kms_err count_in_memory(void *arg, const struct kms_version_usage *u)
{
    struct survey *s = arg;
    assert_int_equal(strlen(u->key_id), KMS_UUID_TEXT_LEN);
    s->in_memory++;
    return KMS_OK;
}

/* Secret keys that are session objects: the versions this process has unwrapped. */
static size_t unwrapped_objects(struct kms_hsm *hsm)
{
    struct kms_session *s;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_BBOOL no = CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_TOKEN, &no, sizeof no}};
    CK_OBJECT_HANDLE *found = NULL;
    size_t n = 0;
    assert_int_equal(kms_hsm_acquire(hsm, &s), KMS_OK);
    assert_int_equal(kms_hsm_find(s, tmpl, 2, &found, &n), KMS_OK);
    kms_hsm_release(s);
    free(found);
    return n;
}

static void test_small_key_cache(void **state)
{
    struct fixture *f = *state;
    f->cfg.key_cache = 2;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k[5];
    struct kms_buf blobs[5];
    char msg[5][16];

    for (int i = 0; i < 5; i++) {
        create(ks, "", &k[i]);
        snprintf(msg[i], sizeof msg[i], "key %d", i);
        memset(&blobs[i], 0, sizeof blobs[i]);
        must_encrypt(ks, k[i].id_text, &f->ctx, msg[i], &blobs[i]);
    }
    /* in turn, three times: each use evicts another key, which is read and unwrapped again */
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 5; i++) {
            must_decrypt(ks, &blobs[i], &f->ctx, msg[i], k[i].id_text);
            struct kms_buf again = KMS_BUF_INIT;
            must_encrypt(ks, k[i].id_text, &f->ctx, msg[i], &again);
            must_decrypt(ks, &again, &f->ctx, msg[i], k[i].id_text);
            kms_buf_free(&again);
            /* a blob under another key is still told apart */
            assert_int_equal(decrypt(ks, &blobs[(i + 1) % 5], &f->ctx, k[i].id_text, NULL, NULL),
                             KMS_ERR_INCORRECT_KEY);
        }
    }
    /* at most key_cache keys in memory, and only their versions unwrapped in the token */
    struct survey s = {0};
    size_t keys = 0, versions = 0;
    assert_int_equal(kms_keystore_survey(ks, &keys, &versions, count_in_memory, &s), KMS_OK);
    assert_int_equal(keys, 5);
    assert_int_equal(versions, 5);
    assert_true(s.in_memory >= 1);
    assert_true(s.in_memory <= 2);
    assert_true(unwrapped_objects(f->a.hsm) <= 2);
    for (int i = 0; i < 5; i++) {
        kms_buf_free(&blobs[i]);
        kms_key_info_clear(&k[i]);
    }
}

/*
 * An entry dropped from the cache leaves the rest of its block of uses for
 * the entry read again: a cache miss reserves nothing, and every blob made
 * across the misses opens.
 */
static void test_evicted_keys_keep_their_uses(void **state)
{
    struct fixture *f = *state;
    f->cfg.key_cache = 1;
    f->cfg.usage_block = 50;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k[2];
    struct kms_buf blobs[2][10];
    struct version_rows v;

    create(ks, "", &k[0]);
    create(ks, "", &k[1]);
    /* in turn: each use evicts the other key, whose next use reads it again */
    for (int i = 0; i < 10; i++) {
        for (int j = 0; j < 2; j++) {
            memset(&blobs[j][i], 0, sizeof blobs[j][i]);
            must_encrypt(ks, k[j].id_text, &f->ctx, "evicted", &blobs[j][i]);
        }
    }
    for (int j = 0; j < 2; j++) {
        /* CreateKey's block, nothing since: 20 misses, no reservation */
        read_versions(f->a.store, k[j].id, &v);
        assert_int_equal(v.n, 1);
        assert_int_equal(v.reserved[0], 50);
        for (int i = 0; i < 10; i++) {
            must_decrypt(ks, &blobs[j][i], &f->ctx, "evicted", k[j].id_text);
        }
    }
    for (int j = 0; j < 2; j++) {
        for (int i = 0; i < 10; i++)
            kms_buf_free(&blobs[j][i]);
        kms_key_info_clear(&k[j]);
    }
}

/* ---- aliases ------------------------------------------------------------------- */

static void test_aliases(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_key_info a = {0}, b = {0}, info = {0};
    struct kms_alias_info list[8];
    size_t n = 99;
    struct kms_buf blob = KMS_BUF_INIT;

    create(ks, "a", &a);
    create(ks, "b", &b);
    assert_int_equal(kms_keystore_list_aliases(ks, NULL, NULL, 8, list, &n), KMS_OK);
    assert_int_equal(n, 0);

    assert_int_equal(kms_keystore_create_alias(ks, "alias/app", a.id_text), KMS_OK);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/app-b", b.arn), KMS_OK);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/zz", a.id_text), KMS_OK);
    /* resolution by alias name and alias ARN */
    describe(ks, "alias/app", &info);
    assert_string_equal(info.id_text, a.id_text);
    describe(ks, ARN_PREFIX "alias/app", &info);
    assert_string_equal(info.id_text, a.id_text);
    describe(ks, "alias/app-b", &info);
    assert_string_equal(info.id_text, b.id_text);
    must_encrypt(ks, ARN_PREFIX "alias/app", &f->ctx, "via alias", &blob);
    must_decrypt(ks, &blob, &f->ctx, "via alias", a.id_text);
    /* an alias in another account's ARN is not ours */
    assert_int_equal(describe_rc(ks, "arn:aws:kms:us-east-1:999999999999:alias/app"),
                     KMS_ERR_NOT_FOUND);

    /* errors: taken, bad names, an alias as target, missing targets and aliases */
    kms_err_clear();
    assert_int_equal(kms_keystore_create_alias(ks, "alias/app", b.id_text), KMS_ERR_ALREADY_EXISTS);
    if (!strstr(kms_err_message(), "alias/app"))
        fail_msg("message: %s", kms_err_message());
    assert_int_equal(kms_keystore_create_alias(ks, "app", a.id_text), KMS_ERR_VALIDATION);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/aws/x", a.id_text),
                     KMS_ERR_INVALID_ALIAS);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/bad name", a.id_text),
                     KMS_ERR_VALIDATION);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/other", "alias/app"), KMS_ERR_NOT_FOUND);
    assert_int_equal(
        kms_keystore_create_alias(ks, "alias/other", "0b5b8f7e-1c1a-4d7e-9a0e-3f1e2d3c4b5a"),
        KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_keystore_update_alias(ks, "alias/missing", a.id_text, NULL, NULL),
                     KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_keystore_delete_alias(ks, "alias/missing", NULL, NULL), KMS_ERR_NOT_FOUND);

    /* list: name order, a marker, one key's */
    assert_int_equal(kms_keystore_list_aliases(ks, NULL, NULL, 8, list, &n), KMS_OK);
    assert_int_equal(n, 3);
    assert_string_equal(list[0].name, "alias/app");
    assert_string_equal(list[0].arn, ARN_PREFIX "alias/app");
    assert_string_equal(list[0].target_id, a.id_text);
    assert_true(list[0].created > 0);
    assert_string_equal(list[1].name, "alias/app-b");
    assert_string_equal(list[1].target_id, b.id_text);
    assert_string_equal(list[2].name, "alias/zz");
    assert_int_equal(kms_keystore_list_aliases(ks, a.id_text, NULL, 8, list, &n), KMS_OK);
    assert_int_equal(n, 2);
    assert_string_equal(list[0].name, "alias/app");
    assert_string_equal(list[1].name, "alias/zz");
    assert_int_equal(kms_keystore_list_aliases(ks, NULL, "alias/app-b", 1, list, &n), KMS_OK);
    assert_int_equal(n, 1);
    assert_string_equal(list[0].name, "alias/app-b");

    /* update moves it (and the cached resolution with it) */
    assert_int_equal(kms_keystore_update_alias(ks, "alias/app", b.id_text, NULL, NULL), KMS_OK);
    describe(ks, "alias/app", &info);
    assert_string_equal(info.id_text, b.id_text);
    must_encrypt(ks, "alias/app", &f->ctx, "moved", &blob);
    must_decrypt(ks, &blob, &f->ctx, "moved", b.id_text);
    assert_int_equal(kms_keystore_list_aliases(ks, b.id_text, NULL, 8, list, &n), KMS_OK);
    assert_int_equal(n, 2);

    /* a change made for the key the alias named when the caller was authorized: not another's */
    int moved = 0;
    assert_int_equal(kms_keystore_update_alias(ks, "alias/app", a.id_text, a.id, &moved),
                     KMS_ERR_INVALID_STATE);
    assert_int_equal(moved, 1);
    assert_int_equal(kms_keystore_delete_alias(ks, "alias/app", a.id, &moved),
                     KMS_ERR_INVALID_STATE);
    assert_int_equal(moved, 1);
    describe(ks, "alias/app", &info);
    assert_string_equal(info.id_text, b.id_text);
    assert_int_equal(kms_keystore_update_alias(ks, "alias/app", b.id_text, b.id, &moved), KMS_OK);
    assert_int_equal(moved, 0);
    assert_int_equal(kms_keystore_delete_alias(ks, "alias/missing", a.id, &moved),
                     KMS_ERR_NOT_FOUND);
    assert_int_equal(moved, 0);

    /* delete */
    assert_int_equal(kms_keystore_delete_alias(ks, "alias/app", NULL, NULL), KMS_OK);
    assert_int_equal(describe_rc(ks, "alias/app"), KMS_ERR_NOT_FOUND);
    assert_int_equal(encrypt(ks, "alias/app", &f->ctx, "x", &blob), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_keystore_delete_alias(ks, "alias/app", NULL, NULL), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_keystore_list_aliases(ks, NULL, NULL, 8, list, &n), KMS_OK);
    assert_int_equal(n, 2);
    /* the name is free again */
    assert_int_equal(kms_keystore_create_alias(ks, "alias/app", a.id_text), KMS_OK);
    describe(ks, "alias/app", &info);
    assert_string_equal(info.id_text, a.id_text);

    kms_buf_free(&blob);
    kms_key_info_clear(&a);
    kms_key_info_clear(&b);
    kms_key_info_clear(&info);
}

/* ---- deletion ------------------------------------------------------------------ */

static void test_schedule_and_cancel(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0}, out = {0};
    struct kms_buf blob = KMS_BUF_INIT;

    create(ks, "", &k);
    must_encrypt(ks, k.id_text, &f->ctx, "kept", &blob);
    kms_err_clear();
    assert_int_equal(kms_keystore_schedule_deletion(ks, k.id_text, 6, &out), KMS_ERR_VALIDATION);
    assert_int_equal(kms_keystore_schedule_deletion(ks, k.id_text, 31, &out), KMS_ERR_VALIDATION);
    assert_int_equal(kms_keystore_cancel_deletion(ks, k.id_text, &out), KMS_ERR_INVALID_STATE);

    int64_t before = time(NULL);
    assert_int_equal(kms_keystore_schedule_deletion(ks, k.id_text, 7, &out), KMS_OK);
    assert_int_equal(out.state, KMS_KEY_PENDING_DELETION);
    assert_true(out.deletion_date >= before + 7 * 86400);
    assert_true(out.deletion_date <= time(NULL) + 7 * 86400);
    describe(ks, k.id_text, &k);
    assert_int_equal(k.state, KMS_KEY_PENDING_DELETION);
    /* pending: no use, no second schedule, no alias to it */
    assert_int_equal(encrypt(ks, k.id_text, &f->ctx, "x", &blob), KMS_ERR_INVALID_STATE);
    assert_int_equal(kms_keystore_schedule_deletion(ks, k.id_text, 7, &out), KMS_ERR_INVALID_STATE);
    assert_int_equal(kms_keystore_enable(ks, k.id_text, 1), KMS_ERR_INVALID_STATE);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/late", k.id_text), KMS_ERR_INVALID_STATE);
    /* not due for a week: a tick leaves it */
    kms_keystore_tick(ks);
    describe(ks, k.id_text, &k);
    assert_int_equal(k.state, KMS_KEY_PENDING_DELETION);

    /* cancelled: Disabled, as AWS does */
    assert_int_equal(kms_keystore_cancel_deletion(ks, k.id_text, &out), KMS_OK);
    assert_int_equal(out.state, KMS_KEY_DISABLED);
    assert_int_equal(out.deletion_date, 0);
    assert_int_equal(kms_keystore_enable(ks, k.id_text, 1), KMS_OK);
    must_encrypt(ks, k.id_text, &f->ctx, "kept", &blob);
    must_decrypt(ks, &blob, &f->ctx, "kept", k.id_text);

    /* days 0 means the maximum, 30 */
    before = time(NULL);
    assert_int_equal(kms_keystore_schedule_deletion(ks, k.id_text, 0, &out), KMS_OK);
    assert_true(out.deletion_date >= before + 30 * 86400);
    assert_true(out.deletion_date <= time(NULL) + 30 * 86400);
    kms_buf_free(&blob);
    kms_key_info_clear(&k);
    kms_key_info_clear(&out);
}

struct destroyed {
    struct kms_keystore *ks;
    const char *id;
};

static int is_gone(void *arg)
{
    struct destroyed *d = arg;
    return describe_rc(d->ks, d->id) == KMS_ERR_NOT_FOUND;
}

/* After a deletion: the key, its blobs and its aliases are gone; its row is a tombstone. */
static void assert_destroyed(struct fixture *f, struct kms_keystore *ks,
                             const struct kms_key_info *k, const struct kms_buf *blob)
{
    struct kms_alias_info list[8];
    size_t n = 99;
    struct kms_key_row row = {0};
    struct kms_tx *tx;

    assert_int_equal(describe_rc(ks, k->id_text), KMS_ERR_NOT_FOUND);
    assert_int_equal(decrypt(ks, blob, &f->ctx, NULL, NULL, NULL), KMS_ERR_NOT_FOUND);
    assert_int_equal(describe_rc(ks, "alias/doomed"), KMS_ERR_NOT_FOUND);
    assert_int_equal(describe_rc(ks, "alias/doomed-too"), KMS_ERR_NOT_FOUND);
    struct kms_buf b = KMS_BUF_INIT;
    assert_int_equal(encrypt(ks, k->id_text, &f->ctx, "x", &b), KMS_ERR_NOT_FOUND);
    kms_buf_free(&b);
    assert_int_equal(kms_keystore_list_aliases(ks, NULL, NULL, 8, list, &n), KMS_OK);
    assert_int_equal(n, 1);
    assert_string_equal(list[0].name, "alias/survivor");
    struct kms_key_info keys[4];
    assert_int_equal(kms_keystore_list_keys(ks, NULL, 4, keys, &n), KMS_OK);
    assert_int_equal(n, 1);
    assert_string_not_equal(keys[0].id_text, k->id_text);
    kms_key_info_clear(&keys[0]);

    struct version_rows v;
    read_versions(f->a.store, k->id, &v);
    assert_int_equal(v.n, 0);
    assert_int_equal(kms_store_begin(f->a.store, KMS_TX_READ, &tx), KMS_OK);
    assert_int_equal(kms_store_key_get(tx, k->id, &row), KMS_OK);
    assert_int_equal(row.state, KMS_STORE_DESTROYED);
    assert_int_equal(kms_store_commit(tx), KMS_OK);
    kms_key_row_clear(&row);
}

static void deletion_case(struct fixture *f, int through_store)
{
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0}, keep = {0}, out = {0};
    struct kms_buf blob = KMS_BUF_INIT, kept = KMS_BUF_INIT;

    create(ks, "doomed", &k);
    create(ks, "survivor", &keep);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/doomed", k.id_text), KMS_OK);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/doomed-too", k.id_text), KMS_OK);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/survivor", keep.id_text), KMS_OK);
    must_encrypt(ks, "alias/doomed", &f->ctx, "gone soon", &blob);
    must_encrypt(ks, "alias/survivor", &f->ctx, "stays", &kept);
    /* cached: aliases resolved and the version unwrapped */
    must_decrypt(ks, &blob, &f->ctx, "gone soon", k.id_text);

    if (!through_store) {
        /* pending_max_days = 0: days 0 means a deletion date of now */
        assert_int_equal(kms_keystore_schedule_deletion(ks, k.id_text, 0, &out), KMS_OK);
        assert_true(out.deletion_date <= time(NULL));
    } else {
        /* a week, then made due by writing the row as another node's clock would */
        struct kms_key_row row = {0};
        struct kms_tx *tx;
        assert_int_equal(kms_keystore_schedule_deletion(ks, k.id_text, 7, &out), KMS_OK);
        kms_keystore_tick(ks);
        assert_int_equal(describe_rc(ks, k.id_text), KMS_OK);
        assert_int_equal(kms_store_begin(f->a.store, KMS_TX_WRITE, &tx), KMS_OK);
        assert_int_equal(kms_store_key_get(tx, k.id, &row), KMS_OK);
        assert_int_equal(row.state, KMS_STORE_PENDING);
        row.deletion_date = time(NULL) - 10;
        assert_int_equal(kms_store_key_update(tx, &row), KMS_OK);
        assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_KEY, k.id, NULL), KMS_OK);
        assert_int_equal(kms_store_commit(tx), KMS_OK);
        kms_key_row_clear(&row);
    }
    struct destroyed d = {ks, k.id_text};
    tick_until(ks, is_gone, &d);
    assert_destroyed(f, ks, &k, &blob);
    must_decrypt(ks, &kept, &f->ctx, "stays", keep.id_text);
    /* a second node opened afterwards sees the same */
    struct kms_keystore *ks2 = start_second(f);
    assert_destroyed(f, ks2, &k, &blob);
    must_decrypt(ks2, &kept, &f->ctx, "stays", keep.id_text);

    kms_buf_free(&blob);
    kms_buf_free(&kept);
    kms_key_info_clear(&k);
    kms_key_info_clear(&keep);
    kms_key_info_clear(&out);
}

static void test_tick_due_deletion(void **state)
{
    struct fixture *f = *state;
    f->cfg.pending_min_days = 0;
    f->cfg.pending_max_days = 0;
    deletion_case(f, 0);
}

static void test_tick_deletion_made_due_in_store(void **state)
{
    deletion_case(*state, 1);
}

/* ---- scheduled rotation -------------------------------------------------------- */

struct rotated {
    struct kms_keystore *ks;
    const char *id;
    uint32_t from;
};

static int has_rotated(void *arg)
{
    struct rotated *r = arg;
    struct kms_key_info k = {0};
    assert_int_equal(kms_keystore_describe(r->ks, r->id, &k), KMS_OK);
    uint32_t now = k.current_version;
    kms_key_info_clear(&k);
    return now != r->from;
}

static void test_tick_scheduled_rotation(void **state)
{
    struct fixture *f = *state;
    f->cfg.day_seconds = 1;
    f->cfg.rotation_min_days = 1;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0}, slow = {0}, info = {0};
    struct kms_buf blob = KMS_BUF_INIT, blob2 = KMS_BUF_INIT;

    create(ks, "", &k);
    create(ks, "", &slow);
    must_encrypt(ks, k.id_text, &f->ctx, "before", &blob);
    assert_int_equal(kms_keystore_enable_rotation(ks, k.id_text, 1), KMS_OK);
    /* 90 "days" of a second each: not due during this test */
    assert_int_equal(kms_keystore_enable_rotation(ks, slow.id_text, 90), KMS_OK);
    describe(ks, k.id_text, &k);
    int64_t first_due = k.next_rotation;

    struct rotated r = {ks, k.id_text, k.current_version};
    tick_until(ks, has_rotated, &r);
    describe(ks, k.id_text, &k);
    assert_int_not_equal(k.current_version, r.from);
    assert_true(k.next_rotation > first_due);
    assert_true(k.rotation_enabled);

    size_t n = 0;
    struct kms_rotation_info rot[8];
    assert_int_equal(kms_keystore_list_rotations(ks, k.id_text, 0, 8, rot, &n, &info), KMS_OK);
    assert_true(n >= 1);
    assert_false(rot[0].on_demand);
    assert_true(rot[0].date >= first_due);
    struct version_rows v;
    read_versions(f->a.store, k.id, &v);
    assert_int_equal(v.n, n + 1);
    assert_int_equal(v.rotation[1], KMS_ROTATION_AUTOMATIC);

    must_decrypt(ks, &blob, &f->ctx, "before", k.id_text);
    must_encrypt(ks, k.id_text, &f->ctx, "after", &blob2);
    assert_int_equal(blob_vid(&blob2), k.current_version);
    describe(ks, slow.id_text, &slow);
    read_versions(f->a.store, slow.id, &v);
    assert_int_equal(v.n, 1);

    /* disabled rotation: no more versions */
    assert_int_equal(kms_keystore_disable_rotation(ks, k.id_text), KMS_OK);
    read_versions(f->a.store, k.id, &v);
    size_t versions = v.n;
    usleep(1500 * 1000); /* past the next due time it would have had */
    kms_keystore_tick(ks);
    read_versions(f->a.store, k.id, &v);
    assert_int_equal(v.n, versions);

    kms_buf_free(&blob);
    kms_buf_free(&blob2);
    kms_key_info_clear(&k);
    kms_key_info_clear(&slow);
    kms_key_info_clear(&info);
}

/* ---- init and other nodes ------------------------------------------------------ */

struct roots_seen {
    size_t n;
};

static kms_err count_root(void *arg, const struct kms_root_row *r)
{
    struct roots_seen *s = arg;
    assert_int_equal(r->state, KMS_ROOT_CURRENT);
    assert_int_equal(strncmp(r->label, "p11kms-root:", 12), 0);
    s->n++;
    return KMS_OK;
}

/* Token objects that can wrap: root keys. */
static size_t token_roots(struct kms_hsm *hsm)
{
    struct kms_session *s;
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_BBOOL yes = CK_TRUE;
    CK_ATTRIBUTE tmpl[] = {
        {CKA_CLASS, &cls, sizeof cls}, {CKA_TOKEN, &yes, sizeof yes}, {CKA_WRAP, &yes, sizeof yes}};
    CK_OBJECT_HANDLE *found = NULL;
    size_t n = 0;
    assert_int_equal(kms_hsm_acquire(hsm, &s), KMS_OK);
    assert_int_equal(kms_hsm_find(s, tmpl, 3, &found, &n), KMS_OK);
    kms_hsm_release(s);
    free(found);
    return n;
}

static void test_init_roots(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct roots_seen seen = {0};
    struct kms_tx *tx;
    int made = -1;

    /* init again, and from another connection: nothing new */
    assert_int_equal(kms_keystore_init_roots(f->a.hsm, f->a.store, &made), KMS_OK);
    assert_int_equal(made, 0);
    open_hsm(&f->b.hsm);
    open_store(f->url, KMS_STORE_INIT, &f->b.store);
    assert_int_equal(kms_keystore_init_roots(f->b.hsm, f->b.store, &made), KMS_OK);
    assert_int_equal(made, 0);
    assert_int_equal(kms_store_begin(f->a.store, KMS_TX_READ, &tx), KMS_OK);
    assert_int_equal(kms_store_roots(tx, count_root, &seen), KMS_OK);
    assert_int_equal(kms_store_commit(tx), KMS_OK);
    assert_int_equal(seen.n, 1);
    assert_int_equal(token_roots(f->a.hsm), 1);
    /* the key store works with it */
    struct kms_key_info k = {0};
    struct kms_buf blob = KMS_BUF_INIT;
    create(ks, "", &k);
    must_encrypt(ks, k.id_text, &f->ctx, "rooted", &blob);
    must_decrypt(ks, &blob, &f->ctx, "rooted", k.id_text);
    node_close(&f->b);

    /* a database without a root key: refused, saying to run init */
    char url[300];
    struct kms_store *bare = NULL;
    struct kms_keystore *none = NULL;
    snprintf(url, sizeof url, "sqlite:%s/bare.db", f->dir);
    open_store(url, KMS_STORE_INIT, &bare);
    kms_err_clear();
    assert_int_equal(kms_keystore_open(f->a.hsm, bare, &f->cfg, &none), KMS_ERR_INTERNAL);
    assert_null(none);
    if (!strstr(kms_err_message(), "init"))
        fail_msg("message: %s", kms_err_message());

    /* a database naming a root key the token does not hold: refused, saying so */
    struct kms_root_row fake = {0};
    memset(fake.cka_id, 0x77, sizeof fake.cka_id);
    snprintf(fake.label, sizeof fake.label, "p11kms-root:1");
    fake.state = KMS_ROOT_CURRENT;
    assert_int_equal(kms_store_begin(bare, KMS_TX_WRITE, &tx), KMS_OK);
    assert_int_equal(kms_store_root_insert(tx, &fake), KMS_OK);
    assert_int_equal(kms_store_commit(tx), KMS_OK);
    kms_err_clear();
    assert_int_equal(kms_keystore_open(f->a.hsm, bare, &f->cfg, &none), KMS_ERR_INTERNAL);
    assert_null(none);
    if (!strstr(kms_err_message(), "p11kms-root:1"))
        fail_msg("message: %s", kms_err_message());
    kms_err_clear();
    assert_int_equal(kms_keystore_init_roots(f->a.hsm, bare, &made), KMS_ERR_INTERNAL);
    assert_int_equal(made, 0);
    if (!strstr(kms_err_message(), "does not hold"))
        fail_msg("message: %s", kms_err_message());
    assert_int_equal(token_roots(f->a.hsm), 1);
    kms_store_close(bare);

    kms_buf_free(&blob);
    kms_key_info_clear(&k);
}

static void test_second_node(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_keystore *ks2 = start_second(f);
    struct kms_key_info k = {0}, k2 = {0}, info = {0}, r = {0};
    struct kms_buf blob = KMS_BUF_INIT, blob2 = KMS_BUF_INIT;

    /* made on a, used on b at once: read from the database at first use */
    create(ks, "shared", &k);
    assert_int_equal(kms_keystore_create_alias(ks, "alias/shared", k.id_text), KMS_OK);
    describe(ks2, "alias/shared", &info);
    assert_string_equal(info.id_text, k.id_text);
    assert_string_equal(info.description, "shared");
    must_encrypt(ks, k.id_text, &f->ctx, "from a", &blob);
    must_decrypt(ks2, &blob, &f->ctx, "from a", k.id_text);
    must_encrypt(ks2, "alias/shared", &f->ctx, "from b", &blob2);
    must_decrypt(ks, &blob2, &f->ctx, "from b", k.id_text);
    uint32_t v1 = k.current_version;
    assert_int_equal(blob_vid(&blob2), v1);

    /* a rotates; b learns of it at its next tick */
    assert_int_equal(kms_keystore_rotate_on_demand(ks, k.id_text, &r), KMS_OK);
    uint32_t v2 = r.current_version;
    assert_int_not_equal(v2, v1);
    /* until b polls the change sequence, its cached entry stands (no database read) */
    describe(ks2, k.id_text, &info);
    assert_int_equal(info.current_version, v1);
    kms_keystore_tick(ks2);
    describe(ks2, k.id_text, &info);
    assert_int_equal(info.current_version, v2);
    must_encrypt(ks2, k.id_text, &f->ctx, "from b, v2", &blob2);
    assert_int_equal(blob_vid(&blob2), v2);
    must_decrypt(ks, &blob2, &f->ctx, "from b, v2", k.id_text);
    must_decrypt(ks2, &blob, &f->ctx, "from a", k.id_text);

    /* a blob under a version b has not seen yet: one lookup, and it opens */
    assert_int_equal(kms_keystore_rotate_on_demand(ks, k.id_text, &r), KMS_OK);
    uint32_t v3 = r.current_version;
    must_encrypt(ks, k.id_text, &f->ctx, "from a, v3", &blob);
    assert_int_equal(blob_vid(&blob), v3);
    must_decrypt(ks2, &blob, &f->ctx, "from a, v3", k.id_text);

    /* an alias moved on a: b follows after a tick */
    create(ks, "other", &k2);
    assert_int_equal(kms_keystore_update_alias(ks, "alias/shared", k2.id_text, NULL, NULL), KMS_OK);
    kms_keystore_tick(ks2);
    describe(ks2, "alias/shared", &info);
    assert_string_equal(info.id_text, k2.id_text);

    /* disabled on a: refused on b after a tick */
    assert_int_equal(kms_keystore_enable(ks, k.id_text, 0), KMS_OK);
    kms_keystore_tick(ks2);
    assert_int_equal(encrypt(ks2, k.id_text, &f->ctx, "x", &blob2), KMS_ERR_DISABLED);
    assert_int_equal(kms_keystore_enable(ks2, k.id_text, 1), KMS_OK);
    kms_keystore_tick(ks);
    must_encrypt(ks, k.id_text, &f->ctx, "enabled by b", &blob2);

    /* an alias deleted on b: gone on a after a tick */
    assert_int_equal(kms_keystore_delete_alias(ks2, "alias/shared", NULL, NULL), KMS_OK);
    kms_keystore_tick(ks);
    assert_int_equal(describe_rc(ks, "alias/shared"), KMS_ERR_NOT_FOUND);

    /* both see both keys */
    struct kms_key_info keys[4];
    size_t n = 0;
    assert_int_equal(kms_keystore_list_keys(ks2, NULL, 4, keys, &n), KMS_OK);
    assert_int_equal(n, 2);
    for (size_t i = 0; i < n; i++)
        kms_key_info_clear(&keys[i]);

    kms_buf_free(&blob);
    kms_buf_free(&blob2);
    kms_key_info_clear(&k);
    kms_key_info_clear(&k2);
    kms_key_info_clear(&info);
    kms_key_info_clear(&r);
}

/* ---- grants --------------------------------------------------------------------- */

/* A test's compiled grants: the ids, in the order read. */
struct ids {
    char id[8][KMS_GRANT_ID_LEN + 1];
    size_t n;
};

static kms_err add_id(void *arg, void **set, const struct kms_grant_row *g)
{
    struct ids *s = *set;
    (void)arg;
    if (!s && !(s = *set = calloc(1, sizeof *s)))
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    if (strcmp(g->grantee, "broken") == 0)
        return KMS_FAIL(KMS_ERR_INTERNAL, "a grant that does not compile");
    assert_true(s->n < 8);
    snprintf(s->id[s->n++], sizeof s->id[0], "%s", g->grant_id);
    return KMS_OK;
}

static void free_ids(void *set)
{
    free(set);
}

struct grants_seen {
    size_t n;
    char first[KMS_GRANT_ID_LEN + 1];
};

static kms_err see_grants(void *arg, const struct kms_key_guard *g)
{
    struct grants_seen *seen = arg;
    const struct ids *s = g->grants;
    seen->n = s ? s->n : 0;
    snprintf(seen->first, sizeof seen->first, "%s", s && s->n ? s->id[0] : "");
    return KMS_OK;
}

/* How many grants the key's guard shows on ks. */
static size_t guard_grants(struct kms_keystore *ks, const char *ref)
{
    struct grants_seen seen = {0};
    assert_int_equal(kms_keystore_authorize(ks, ref, 0, see_grants, &seen, NULL), KMS_OK);
    return seen.n;
}

static void grant_of(struct kms_grant_row *g, const struct kms_key_info *k, const char *name,
                     const char *grantee)
{
    memset(g, 0, sizeof *g);
    memcpy(g->key_id, k->id, KMS_UUID_LEN);
    snprintf(g->name, sizeof g->name, "%s", name);
    snprintf(g->grantee, sizeof g->grantee, "%s", grantee);
    g->operations = 1;
    snprintf(g->issuer, sizeof g->issuer, "admin");
}

static kms_err count_row(void *arg, const struct kms_grant_row *g)
{
    (void)g;
    (*(size_t *)arg)++;
    return KMS_OK;
}

static void test_grants(void **state)
{
    struct fixture *f = *state;
    f->cfg.add_grant = add_id;
    f->cfg.free_grants = free_ids;
    f->cfg.pending_min_days = 0;
    f->cfg.pending_max_days = 0;
    f->cfg.grants_per_key = 3;
    struct kms_keystore *ks = start(f);
    struct kms_keystore *ks2 = start_second(f);
    struct kms_key_info k = {0}, out = {0};
    struct kms_grant_row *g = calloc(3, sizeof *g), *got = g + 2;
    int existing = -1;
    size_t n = 0;

    create(ks, "granted", &k);
    assert_int_equal(guard_grants(ks, k.id_text), 0);
    assert_int_equal(guard_grants(ks2, k.id_text), 0);

    /* made on a: a's guard shows it at once; b's after b reads the change sequence */
    grant_of(&g[0], &k, "retry", "alice");
    assert_int_equal(kms_keystore_create_grant(ks, &g[0], &existing), KMS_OK);
    assert_int_equal(existing, 0);
    assert_int_equal(strlen(g[0].grant_id), KMS_GRANT_ID_LEN);
    assert_true(g[0].created > 0);
    assert_int_equal(guard_grants(ks, k.id_text), 1);
    assert_int_equal(guard_grants(ks2, k.id_text), 0);
    kms_keystore_tick(ks2);
    assert_int_equal(guard_grants(ks2, k.id_text), 1);

    /* the same name and parameters: the same grant, nothing written */
    grant_of(&g[1], &k, "retry", "alice");
    assert_int_equal(kms_keystore_create_grant(ks2, &g[1], &existing), KMS_OK);
    assert_int_equal(existing, 1);
    assert_string_equal(g[1].grant_id, g[0].grant_id);
    /* the same name, another grantee: a new grant */
    grant_of(&g[1], &k, "retry", "bob");
    assert_int_equal(kms_keystore_create_grant(ks2, &g[1], &existing), KMS_OK);
    assert_int_equal(existing, 0);
    assert_string_not_equal(g[1].grant_id, g[0].grant_id);
    assert_int_equal(guard_grants(ks2, k.id_text), 2);
    assert_int_equal(kms_keystore_list_grants(ks, k.id, NULL, 100, count_row, &n), KMS_OK);
    assert_int_equal(n, 2);
    assert_int_equal(kms_keystore_grant_get(ks, g[1].grant_id, got), KMS_OK);
    assert_string_equal(got->grantee, "bob");

    /* a refresh (a grant token naming a grant not seen yet) reads the key again at once */
    assert_int_equal(guard_grants(ks, k.id_text), 1);
    kms_keystore_key_refresh(ks, k.id);
    assert_int_equal(guard_grants(ks, k.id_text), 2);

    /* deleted on b: gone on b at once, on a after a tick */
    assert_int_equal(kms_keystore_delete_grant(ks2, k.id, g[0].grant_id, "RevokeGrant"), KMS_OK);
    assert_int_equal(kms_keystore_delete_grant(ks2, k.id, g[0].grant_id, "RevokeGrant"),
                     KMS_ERR_NOT_FOUND);
    assert_int_equal(guard_grants(ks2, k.id_text), 1);
    kms_keystore_tick(ks);
    assert_int_equal(guard_grants(ks, k.id_text), 1);
    assert_int_equal(kms_keystore_grant_get(ks, g[0].grant_id, got), KMS_ERR_NOT_FOUND);

    /* a grant that does not compile leaves the key with none (fail closed) */
    grant_of(&g[2], &k, "", "broken");
    assert_int_equal(kms_keystore_create_grant(ks, &g[2], &existing), KMS_OK);
    assert_int_equal(guard_grants(ks, k.id_text), 0);

    /* grants_per_key (3 here; AWS's 50,000 by default): then LimitExceededException */
    grant_of(&g[2], &k, "", "dave");
    assert_int_equal(kms_keystore_create_grant(ks, &g[2], &existing), KMS_OK);
    grant_of(&g[2], &k, "", "erin");
    assert_int_equal(kms_keystore_create_grant(ks, &g[2], &existing), KMS_ERR_LIMIT_EXCEEDED);
    assert_non_null(strstr(kms_err_message(), "already has 3 grants"));
    /* an idempotent retry at the limit is still answered */
    grant_of(&g[2], &k, "retry", "bob");
    assert_int_equal(kms_keystore_create_grant(ks, &g[2], &existing), KMS_OK);
    assert_int_equal(existing, 1);

    /* a key pending deletion takes no new grant; its destruction removes its grants */
    assert_int_equal(kms_keystore_schedule_deletion(ks, k.id_text, 0, &out), KMS_OK);
    grant_of(&g[1], &k, "", "carol");
    assert_int_equal(kms_keystore_create_grant(ks, &g[1], &existing), KMS_ERR_INVALID_STATE);
    struct destroyed d = {ks, k.id_text};
    tick_until(ks, is_gone, &d);
    n = 0;
    assert_int_equal(kms_keystore_list_grants(ks, k.id, NULL, 100, count_row, &n), KMS_OK);
    assert_int_equal(n, 0);
    assert_int_equal(kms_keystore_create_grant(ks, &g[1], &existing), KMS_ERR_NOT_FOUND);

    free(g);
    kms_key_info_clear(&k);
    kms_key_info_clear(&out);
}

/* ---- asymmetric and HMAC keys --------------------------------------------------- */

static void create_as(struct kms_keystore *ks, int spec, int usage, struct kms_key_info *out)
{
    memset(out, 0, sizeof *out);
    kms_err rc = kms_keystore_create_key_as(ks, "asym", NULL, spec, usage, out);
    if (rc != KMS_OK)
        fprintf(stderr, "create_key_as: %s\n", kms_err_message());
    assert_int_equal(rc, KMS_OK);
    assert_int_equal(out->spec, spec);
    assert_int_equal(out->usage, usage);
}

static void hold(struct kms_keystore *ks, const char *ref, struct kms_key_ref *out)
{
    *out = (struct kms_key_ref)KMS_KEY_REF_INIT;
    assert_int_equal(kms_keystore_hold(ks, ref, KMS_REF_ALIAS, out), KMS_OK);
}

/* Signs "message" with alg on the key ref names (on ks) and checks it with the public key. */
static void sign_and_verify(struct kms_keystore *ks, const char *ref, int alg)
{
    struct kms_key_ref key;
    struct kms_key_info info = {0};
    struct kms_buf spki = KMS_BUF_INIT;
    uint8_t digest[KMS_DIGEST_MAX], sig[KMS_SIGNATURE_MAX];
    size_t dlen = 0, slen = sizeof sig;

    hold(ks, ref, &key);
    assert_int_equal(kms_keystore_public_key(ks, &key, &spki, &info), KMS_OK);
    assert_int_equal(kms_pubkey_digest(alg, (const uint8_t *)"message", 7, digest, &dlen), KMS_OK);
    assert_int_equal(kms_keystore_sign(ks, &key, alg, digest, dlen, sig, &slen, &info), KMS_OK);
    assert_string_equal(info.id_text, key.id_text);
    assert_int_equal(kms_pubkey_verify(spki.data, spki.len, alg, 1, digest, dlen, sig, slen),
                     KMS_OK);
    assert_int_equal(
        kms_pubkey_verify(spki.data, spki.len, alg, 0, (const uint8_t *)"message", 7, sig, slen),
        KMS_OK);
    sig[slen / 2] ^= 0x01;
    assert_int_equal(kms_pubkey_verify(spki.data, spki.len, alg, 1, digest, dlen, sig, slen),
                     KMS_ERR_BAD_SIGNATURE);
    kms_keystore_unhold(ks, &key);
    kms_buf_free(&spki);
    kms_key_info_clear(&info);
}

static void test_asymmetric_sign(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0}, info = {0}, r = {0};
    struct kms_key_ref key;
    struct kms_buf spki = KMS_BUF_INIT, blob = KMS_BUF_INIT, pt = KMS_BUF_INIT;
    uint8_t digest[32] = {1}, sig[KMS_SIGNATURE_MAX];
    size_t slen = sizeof sig;

    create_as(ks, KMS_SPEC_RSA_2048, KMS_USAGE_SIGN_VERIFY, &k);
    describe(ks, k.id_text, &info);
    assert_int_equal(info.spec, KMS_SPEC_RSA_2048);
    assert_int_equal(info.usage, KMS_USAGE_SIGN_VERIFY);
    hold(ks, k.id_text, &key);
    assert_int_equal(kms_keystore_public_key(ks, &key, &spki, &info), KMS_OK);
    const uint8_t *p = spki.data;
    EVP_PKEY *pk = d2i_PUBKEY(NULL, &p, (long)spki.len);
    assert_non_null(pk);
    assert_int_equal(EVP_PKEY_get_base_id(pk), EVP_PKEY_RSA);
    assert_int_equal(EVP_PKEY_get_bits(pk), 2048);
    EVP_PKEY_free(pk);
    for (int alg = 0; alg < KMS_ALG_COUNT; alg++)
        if (kms_alg_allowed(KMS_SPEC_RSA_2048, KMS_USAGE_SIGN_VERIFY, alg))
            sign_and_verify(ks, k.id_text, alg);

    /* outside its usage: InvalidKeyUsage, and never a blob */
    assert_int_equal(
        kms_keystore_sign(ks, &key, KMS_ALG_ECDSA_SHA_256, digest, 32, sig, &slen, &info),
        KMS_ERR_INVALID_KEY_USAGE);
    assert_int_equal(
        kms_keystore_oaep_decrypt(ks, &key, KMS_ALG_RSAES_OAEP_SHA_256, digest, 32, &pt, &info),
        KMS_ERR_INVALID_KEY_USAGE);
    assert_int_equal(
        kms_keystore_encrypt_key(ks, &key, &f->ctx, (const uint8_t *)"x", 1, &blob, &info),
        KMS_ERR_INVALID_KEY_USAGE);
    assert_int_equal(blob.len, 0);
    kms_keystore_unhold(ks, &key);

    /* never rotated */
    assert_int_equal(kms_keystore_rotate_on_demand(ks, k.id_text, &r), KMS_ERR_UNSUPPORTED);
    assert_int_equal(kms_keystore_enable_rotation(ks, k.id_text, 0), KMS_ERR_UNSUPPORTED);
    assert_int_equal(kms_keystore_disable_rotation(ks, k.id_text), KMS_ERR_UNSUPPORTED);

    /* disabled: refused */
    assert_int_equal(kms_keystore_enable(ks, k.id_text, 0), KMS_OK);
    hold(ks, k.id_text, &key);
    slen = sizeof sig;
    assert_int_equal(
        kms_keystore_sign(ks, &key, KMS_ALG_RSASSA_PSS_SHA_256, digest, 32, sig, &slen, &info),
        KMS_ERR_DISABLED);
    kms_keystore_unhold(ks, &key);
    assert_int_equal(kms_keystore_enable(ks, k.id_text, 1), KMS_OK);

    /* a usage the spec does not allow; a spec no token here has */
    struct kms_key_info bad = {0};
    assert_int_equal(kms_keystore_create_key_as(ks, "", NULL, KMS_SPEC_ECC_NIST_P256,
                                                KMS_USAGE_ENCRYPT_DECRYPT, &bad),
                     KMS_ERR_VALIDATION);
    assert_int_equal(
        kms_keystore_create_key_as(ks, "", NULL, KMS_SPEC_HMAC_256, KMS_USAGE_SIGN_VERIFY, &bad),
        KMS_ERR_VALIDATION);
    kms_key_info_clear(&bad);

    /* ECDSA on each curve; Ed25519 */
    static const int curves[] = {KMS_SPEC_ECC_NIST_P256, KMS_SPEC_ECC_NIST_P384,
                                 KMS_SPEC_ECC_NIST_P521};
    for (size_t i = 0; i < 3; i++) {
        struct kms_key_info e = {0};
        create_as(ks, curves[i], KMS_USAGE_SIGN_VERIFY, &e);
        for (int alg = 0; alg < KMS_ALG_COUNT; alg++)
            if (kms_alg_allowed(curves[i], KMS_USAGE_SIGN_VERIFY, alg))
                sign_and_verify(ks, e.id_text, alg);
        kms_key_info_clear(&e);
    }

    kms_buf_free(&spki);
    kms_buf_free(&blob);
    kms_buf_free(&pt);
    kms_key_info_clear(&k);
    kms_key_info_clear(&info);
    kms_key_info_clear(&r);
}

static void test_asymmetric_decrypt_and_derive(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_key_info k = {0}, e = {0}, info = {0};
    struct kms_key_ref key;
    struct kms_buf spki = KMS_BUF_INIT, ct = KMS_BUF_INIT, pt = KMS_BUF_INIT;
    struct kms_buf point = KMS_BUF_INIT, secret = KMS_BUF_INIT;

    /* RSAES-OAEP: encrypted with the public key in the process, decrypted in the token */
    create_as(ks, KMS_SPEC_RSA_2048, KMS_USAGE_ENCRYPT_DECRYPT, &k);
    hold(ks, k.id_text, &key);
    assert_int_equal(kms_keystore_public_key(ks, &key, &spki, &info), KMS_OK);
    /* the decoded key is the stored one, decoded once and shared */
    EVP_PKEY *pkey = NULL, *again = NULL;
    assert_int_equal(kms_keystore_public_pkey(ks, &key, &pkey, &info), KMS_OK);
    assert_int_equal(kms_keystore_public_pkey(ks, &key, &again, &info), KMS_OK);
    assert_ptr_equal(pkey, again);
    EVP_PKEY_free(again);
    unsigned char *enc = NULL;
    int enc_len = i2d_PUBKEY(pkey, &enc);
    assert_int_equal(enc_len, (int)spki.len);
    assert_memory_equal(enc, spki.data, spki.len);
    OPENSSL_free(enc);
    static const int oaep[] = {KMS_ALG_RSAES_OAEP_SHA_1, KMS_ALG_RSAES_OAEP_SHA_256};
    for (size_t i = 0; i < 2; i++) {
        ct.len = pt.len = 0;
        assert_int_equal(
            kms_pubkey_oaep_encrypt(pkey, oaep[i], (const uint8_t *)"a data key", 10, &ct), KMS_OK);
        assert_int_equal(ct.len, 256);
        assert_int_equal(kms_keystore_oaep_decrypt(ks, &key, oaep[i], ct.data, ct.len, &pt, &info),
                         KMS_OK);
        assert_int_equal(pt.len, 10);
        assert_memory_equal(pt.data, "a data key", 10);
        /* the other digest does not open it */
        pt.len = 0;
        assert_int_equal(
            kms_keystore_oaep_decrypt(ks, &key, oaep[1 - i], ct.data, ct.len, &pt, &info),
            KMS_ERR_INVALID_CIPHERTEXT);
        assert_int_equal(pt.len, 0);
    }
    uint8_t sig[KMS_SIGNATURE_MAX], digest[32] = {0};
    size_t slen = sizeof sig;
    assert_int_equal(
        kms_keystore_sign(ks, &key, KMS_ALG_RSASSA_PSS_SHA_256, digest, 32, sig, &slen, &info),
        KMS_ERR_INVALID_KEY_USAGE);
    kms_keystore_unhold(ks, &key);

    /* ECDH: the token's secret equals OpenSSL's with an ephemeral key */
    create_as(ks, KMS_SPEC_ECC_NIST_P384, KMS_USAGE_KEY_AGREEMENT, &e);
    hold(ks, e.id_text, &key);
    spki.len = 0;
    assert_int_equal(kms_keystore_public_key(ks, &key, &spki, &info), KMS_OK);
    EVP_PKEY *eph = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-384");
    assert_non_null(eph);
    uint8_t *der = NULL;
    int der_len = i2d_PUBKEY(eph, &der);
    assert_true(der_len > 0);
    assert_int_equal(kms_pubkey_peer_point(KMS_SPEC_ECC_NIST_P384, der, (size_t)der_len, &point),
                     KMS_OK);
    assert_int_equal(kms_keystore_derive(ks, &key, point.data, point.len, &secret, &info), KMS_OK);
    assert_int_equal(secret.len, 48);
    const uint8_t *p = spki.data;
    EVP_PKEY *peer = d2i_PUBKEY(NULL, &p, (long)spki.len);
    assert_non_null(peer);
    EVP_PKEY_CTX *dc = EVP_PKEY_CTX_new(eph, NULL);
    uint8_t expect[64];
    size_t elen = sizeof expect;
    assert_int_equal(EVP_PKEY_derive_init(dc), 1);
    assert_int_equal(EVP_PKEY_derive_set_peer(dc, peer), 1);
    assert_int_equal(EVP_PKEY_derive(dc, expect, &elen), 1);
    assert_int_equal(elen, 48);
    assert_memory_equal(secret.data, expect, 48);
    EVP_PKEY_CTX_free(dc);
    EVP_PKEY_free(peer);
    EVP_PKEY_free(eph);
    OPENSSL_free(der);
    /* a P-384 key agreement key does not sign */
    slen = sizeof sig;
    assert_int_equal(
        kms_keystore_sign(ks, &key, KMS_ALG_ECDSA_SHA_384, digest, 32, sig, &slen, &info),
        KMS_ERR_INVALID_KEY_USAGE);
    kms_keystore_unhold(ks, &key);

    EVP_PKEY_free(pkey);
    kms_buf_free(&spki);
    kms_buf_free(&ct);
    kms_buf_free(&pt);
    kms_buf_free(&point);
    kms_buf_free(&secret);
    kms_key_info_clear(&k);
    kms_key_info_clear(&e);
    kms_key_info_clear(&info);
}

static void test_hmac_keys(void **state)
{
    struct fixture *f = *state;
    struct kms_keystore *ks = start(f);
    struct kms_keystore *ks2 = start_second(f);
    struct kms_key_info k = {0}, info = {0};
    struct kms_key_ref key;
    struct kms_buf spki = KMS_BUF_INIT;
    uint8_t mac[KMS_SIGNATURE_MAX], mac2[KMS_SIGNATURE_MAX];
    size_t n = sizeof mac, n2 = sizeof mac2;
    static const uint8_t msg[] = "x-tenant: acme";

    create_as(ks, KMS_SPEC_HMAC_384, KMS_USAGE_GENERATE_VERIFY_MAC, &k);
    hold(ks, k.id_text, &key);
    assert_int_equal(
        kms_keystore_sign(ks, &key, KMS_ALG_HMAC_SHA_384, msg, sizeof msg - 1, mac, &n, &info),
        KMS_OK);
    assert_int_equal(n, 48);
    assert_int_equal(
        kms_keystore_sign(ks, &key, KMS_ALG_HMAC_SHA_256, msg, sizeof msg - 1, mac2, &n2, &info),
        KMS_ERR_INVALID_KEY_USAGE);
    assert_int_equal(kms_keystore_public_key(ks, &key, &spki, &info), KMS_ERR_UNSUPPORTED);
    kms_keystore_unhold(ks, &key);

    /* a second node reads the key from the database and unwraps the same secret */
    hold(ks2, k.id_text, &key);
    n2 = sizeof mac2;
    assert_int_equal(
        kms_keystore_sign(ks2, &key, KMS_ALG_HMAC_SHA_384, msg, sizeof msg - 1, mac2, &n2, &info),
        KMS_OK);
    assert_int_equal(n2, 48);
    assert_memory_equal(mac, mac2, 48);
    n2 = sizeof mac2;
    assert_int_equal(
        kms_keystore_sign(ks2, &key, KMS_ALG_HMAC_SHA_384, msg, sizeof msg - 2, mac2, &n2, &info),
        KMS_OK);
    assert_memory_not_equal(mac, mac2, 48);
    assert_int_equal(info.spec, KMS_SPEC_HMAC_384);
    kms_keystore_unhold(ks2, &key);

    /* X25519 needs CKM_EC_MONTGOMERY_KEY_PAIR_GEN, which SoftHSM2 2.6.1 does not list */
    struct kms_key_info x = {0};
    kms_err rc =
        kms_keystore_create_key_as(ks, "", NULL, KMS_SPEC_X25519, KMS_USAGE_KEY_AGREEMENT, &x);
    if (rc == KMS_ERR_UNSUPPORTED)
        assert_non_null(strstr(kms_err_message(), "CKM_EC_MONTGOMERY_KEY_PAIR_GEN"));
    else
        assert_int_equal(rc, KMS_OK);
    kms_key_info_clear(&x);

    kms_buf_free(&spki);
    kms_key_info_clear(&k);
    kms_key_info_clear(&info);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_encrypt_decrypt, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_blobs_one_answer, setup, teardown),
        cmocka_unit_test_setup_teardown(test_expect_ref, setup, teardown),
        cmocka_unit_test_setup_teardown(test_disable_enable, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rotate_on_demand, setup, teardown),
        cmocka_unit_test_setup_teardown(test_rotation_settings, setup, teardown),
        cmocka_unit_test_setup_teardown(test_usage_bound, setup, teardown),
        cmocka_unit_test_setup_teardown(test_small_key_cache, setup, teardown),
        cmocka_unit_test_setup_teardown(test_evicted_keys_keep_their_uses, setup, teardown),
        cmocka_unit_test_setup_teardown(test_aliases, setup, teardown),
        cmocka_unit_test_setup_teardown(test_schedule_and_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tick_due_deletion, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tick_deletion_made_due_in_store, setup, teardown),
        cmocka_unit_test_setup_teardown(test_tick_scheduled_rotation, setup, teardown),
        cmocka_unit_test_setup_teardown(test_init_roots, setup, teardown),
        cmocka_unit_test_setup_teardown(test_second_node, setup, teardown),
        cmocka_unit_test_setup_teardown(test_grants, setup, teardown),
        cmocka_unit_test_setup_teardown(test_asymmetric_sign, setup, teardown),
        cmocka_unit_test_setup_teardown(test_asymmetric_decrypt_and_derive, setup, teardown),
        cmocka_unit_test_setup_teardown(test_hmac_keys, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
