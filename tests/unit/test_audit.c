/*
 * Unit tests for src/server/audit.h without a token: the line formats against
 * fixed vectors, record labels, and the verifier's core on logs built here
 * (checkpoints MAC'd with an in-process key) with every kind of tampering.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/blob.h"
#include "common/buf.h"
#include "common/encoding.h"
#include "server/audit.h"

#define LOG_A "0123456789abcdef0123456789abcdef"
#define LOG_B "fedcba9876543210fedcba9876543210"
#define LOG_C "00112233445566778899aabbccddeeff"
#define KEY_HEX "00112233445566778899aabbccddeeff"
#define TIME "2024-05-01T12:34:56.789Z"
#define HEX_AA "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
#define HEX_0F "0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f0f"
#define HEX_C3 "c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3c3"

static const uint8_t mac_key[32] = "p11kms audit test mac key ......";

static const char *str(const struct kms_buf *b)
{
    return (const char *)b->data;
}

/* ---- formats --------------------------------------------------------------------- */

static void test_format_time(void **state)
{
    char t[KMS_AUDIT_TIME_LEN + 1];
    (void)state;
    kms_audit_format_time(0, 0, t);
    assert_string_equal(t, "1970-01-01T00:00:00.000Z");
    kms_audit_format_time(1700000000, 123456789, t);
    assert_string_equal(t, "2023-11-14T22:13:20.123Z");
    kms_audit_format_time(1700000000, 999999999, t);
    assert_string_equal(t, "2023-11-14T22:13:20.999Z");
}

static void check_json_string(const char *in, size_t n, const char *want)
{
    struct kms_buf b = KMS_BUF_INIT;
    assert_int_equal(kms_audit_json_string(&b, in, n), KMS_OK);
    assert_int_equal(kms_buf_terminate(&b), KMS_OK);
    assert_string_equal(str(&b), want);
    kms_buf_free(&b);
}

static void test_json_string(void **state)
{
    (void)state;
    check_json_string("plain", 5, "\"plain\"");
    check_json_string("a\"b\\c/d", 7, "\"a\\\"b\\\\c/d\"");
    check_json_string("\n\t\r\b\f\x01\x1f", 7, "\"\\n\\t\\r\\b\\f\\u0001\\u001F\"");
    check_json_string("a\0b", 3, "\"a\\u0000b\"");
    check_json_string("caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\x91", 14,
                      "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\x91\"");
    /* invalid: a lone byte, an overlong form, a surrogate, a cut sequence */
    check_json_string("\xff", 1, "\"\xef\xbf\xbd\"");
    check_json_string("\xc0\xaf", 2, "\"\xef\xbf\xbd\xef\xbf\xbd\"");
    check_json_string("\xed\xa0\x80", 3, "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\"");
    check_json_string("x\xe2\x82", 3, "\"x\xef\xbf\xbd\xef\xbf\xbd\"");
}

/* A line must come back byte for byte from jansson's sorted compact dump. */
static void assert_sorted_json(const char *line)
{
    json_error_t err;
    json_t *o = json_loads(line, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &err);
    assert_non_null(o);
    char *again = json_dumps(o, JSON_SORT_KEYS | JSON_COMPACT);
    assert_string_equal(again, line);
    free(again);
    json_decref(o);
}

static void make_context(struct kms_buf *out)
{
    struct kms_context_pair pairs[] = {
        {"tenant", 6, "acme", 4},
        {"purpose", 7, "test", 4},
    };
    assert_int_equal(kms_context_canonical(pairs, 2, out), KMS_OK);
}

static void test_record_line(void **state)
{
    struct kms_buf ctx = KMS_BUF_INIT, line = KMS_BUF_INIT;
    struct kms_audit_template t;
    uint8_t dkey[32], prev[32], md[32];
    unsigned md_len = 32;
    char digest[65], want[2048];
    (void)state;

    memset(dkey, 0x11, sizeof dkey);
    memset(prev, 0xaa, sizeof prev);
    make_context(&ctx);
    struct kms_audit_record r = {
        .request_id = "3f1e2d3c-4b5a-4d7e-9a0e-0b5b8f7e1c1a",
        .principal = "alice",
        .source = "192.0.2.1:5555",
        .operation = "Decrypt",
        .key_arn = "arn:aws:kms:us-east-1:123456789012:key/k",
        .key_version = 7,
        .context = &ctx,
        .outcome = "InvalidCiphertextException",
        .decision = "allow #2",
        .latency_us = 1234,
    };
    assert_int_equal(kms_audit_template_build(&r, LOG_A, dkey, &t), KMS_OK);
    assert_int_equal(kms_audit_template_fill(&t, 42, prev, TIME, &line), KMS_OK);
    assert_int_equal(kms_buf_terminate(&line), KMS_OK);

    assert_non_null(HMAC(EVP_sha256(), dkey, 32, ctx.data, ctx.len, md, &md_len));
    kms_hex_encode(md, 32, digest);
    snprintf(want, sizeof want,
             "{\"context_digest\":\"%s\",\"context_keys\":[\"purpose\",\"tenant\"],"
             "\"decision\":\"allow #2\",\"key_arn\":\"arn:aws:kms:us-east-1:123456789012:key/k\","
             "\"key_version\":7,\"latency_us\":1234,\"log\":\"" LOG_A "\","
             "\"operation\":\"Decrypt\",\"outcome\":\"InvalidCiphertextException\","
             "\"prev\":\"%s\",\"principal\":\"alice\","
             "\"request_id\":\"3f1e2d3c-4b5a-4d7e-9a0e-0b5b8f7e1c1a\",\"seq\":42,"
             "\"source\":\"192.0.2.1:5555\",\"time\":\"" TIME "\",\"type\":\"request\",\"v\":1}",
             digest, HEX_AA);
    assert_string_equal(str(&line), want);
    assert_sorted_json(str(&line));
    /* the values are not there */
    assert_null(strstr(str(&line), "acme"));
    assert_null(strstr(str(&line), "\"test\""));
    /* the template is reusable: another seq, another line */
    struct kms_buf again = KMS_BUF_INIT;
    assert_int_equal(kms_audit_template_fill(&t, 43, prev, TIME, &again), KMS_OK);
    assert_int_equal(kms_buf_terminate(&again), KMS_OK);
    assert_non_null(strstr(str(&again), "\"seq\":43,"));
    kms_buf_free(&again);
    kms_audit_template_free(&t);
    kms_buf_free(&line);
    kms_buf_free(&ctx);
}

static void test_record_line_minimal(void **state)
{
    struct kms_buf line = KMS_BUF_INIT;
    struct kms_audit_template t;
    uint8_t prev[32] = {0};
    (void)state;
    struct kms_audit_record r = {
        .request_id = "id",
        .principal = "",
        .source = "[2001:db8::1]:443",
        .operation = "Weird\"Op\n",
        .outcome = "MissingAuthenticationTokenException",
    };
    assert_int_equal(kms_audit_template_build(&r, LOG_A, NULL, &t), KMS_OK);
    assert_int_equal(kms_audit_template_fill(&t, 1, prev, TIME, &line), KMS_OK);
    assert_int_equal(kms_buf_terminate(&line), KMS_OK);
    assert_string_equal(
        str(&line),
        "{\"latency_us\":0,\"log\":\"" LOG_A "\",\"operation\":\"Weird\\\"Op\\n\","
        "\"outcome\":\"MissingAuthenticationTokenException\",\"prev\":\"00000000000000000000000000"
        "00000000000000000000000000000000000000\",\"principal\":\"\",\"request_id\":\"id\","
        "\"seq\":1,\"source\":\"[2001:db8::1]:443\",\"time\":\"" TIME "\",\"type\":\"request\","
        "\"v\":1}");
    assert_sorted_json(str(&line));
    kms_audit_template_free(&t);
    kms_buf_free(&line);

    /* NULL strings are written as "", an overlong one is cut */
    char big[3000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    struct kms_audit_record n = {.operation = big};
    assert_int_equal(kms_audit_template_build(&n, LOG_A, NULL, &t), KMS_OK);
    assert_int_equal(kms_audit_template_fill(&t, 2, prev, TIME, &line), KMS_OK);
    assert_int_equal(kms_buf_terminate(&line), KMS_OK);
    assert_non_null(strstr(str(&line), "\"principal\":\"\",\"request_id\":\"\""));
    assert_true(line.len < 1500);
    kms_audit_template_free(&t);
    kms_buf_free(&line);
}

/* One line for an address's failed authentications: "count", source without a port. */
static void test_record_line_summary(void **state)
{
    struct kms_buf line = KMS_BUF_INIT;
    struct kms_audit_template t;
    uint8_t prev[32] = {0};
    (void)state;
    struct kms_audit_record r = {
        .request_id = "id",
        .principal = "",
        .source = "2001:db8:1:2::/64",
        .operation = "none",
        .outcome = "InvalidSignatureException",
        .count = 123456,
    };
    assert_int_equal(kms_audit_template_build(&r, LOG_A, NULL, &t), KMS_OK);
    assert_int_equal(kms_audit_template_fill(&t, 3, prev, TIME, &line), KMS_OK);
    assert_int_equal(kms_buf_terminate(&line), KMS_OK);
    assert_string_equal(
        str(&line),
        "{\"count\":123456,\"latency_us\":0,\"log\":\"" LOG_A "\",\"operation\":\"none\","
        "\"outcome\":\"InvalidSignatureException\",\"prev\":\"00000000000000000000000000"
        "00000000000000000000000000000000000000\",\"principal\":\"\",\"request_id\":\"id\","
        "\"seq\":3,\"source\":\"2001:db8:1:2::/64\",\"time\":\"" TIME "\",\"type\":\"request\","
        "\"v\":1}");
    assert_sorted_json(str(&line));
    kms_audit_template_free(&t);
    kms_buf_free(&line);
}

static void test_record_bad_context(void **state)
{
    struct kms_audit_template t;
    uint8_t dkey[32] = {0};
    struct kms_buf ctx = KMS_BUF_INIT;
    (void)state;
    make_context(&ctx);
    ctx.len--; /* cut */
    struct kms_audit_record r = {.context = &ctx};
    assert_int_equal(kms_audit_template_build(&r, LOG_A, dkey, &t), KMS_ERR_INTERNAL);
    /* a context needs the digest key */
    ctx.len++;
    assert_int_equal(kms_audit_template_build(&r, LOG_A, NULL, &t), KMS_ERR_INTERNAL);
    /* the empty context */
    struct kms_buf empty = KMS_BUF_INIT;
    struct kms_buf line = KMS_BUF_INIT;
    assert_int_equal(kms_context_canonical(NULL, 0, &empty), KMS_OK);
    r.context = &empty;
    assert_int_equal(kms_audit_template_build(&r, LOG_A, dkey, &t), KMS_OK);
    assert_int_equal(kms_audit_template_fill(&t, 1, dkey, TIME, &line), KMS_OK);
    assert_int_equal(kms_buf_terminate(&line), KMS_OK);
    assert_non_null(strstr(str(&line), "\"context_keys\":[],"));
    kms_audit_template_free(&t);
    kms_buf_free(&line);
    kms_buf_free(&empty);
    kms_buf_free(&ctx);
}

static void test_checkpoint_and_reopen_lines(void **state)
{
    struct kms_buf body = KMS_BUF_INIT, line = KMS_BUF_INIT, re = KMS_BUF_INIT;
    uint8_t prev[32], mac[32];
    (void)state;
    memset(prev, 0x0f, sizeof prev);
    memset(mac, 0xc3, sizeof mac);
    assert_int_equal(
        kms_audit_checkpoint_body(KEY_HEX, "periodic", LOG_A, 9, prev, TIME, NULL, &body), KMS_OK);
    assert_int_equal(kms_buf_terminate(&body), KMS_OK);
    assert_string_equal(str(&body),
                        "{\"key\":\"" KEY_HEX "\",\"kind\":\"periodic\",\"log\":\"" LOG_A "\","
                        "\"prev\":\"" HEX_0F "\",\"seq\":9,\"time\":\"" TIME
                        "\",\"type\":\"checkpoint\",\"v\":1}");
    assert_sorted_json(str(&body));
    assert_int_equal(kms_audit_checkpoint_line(&body, mac, &line), KMS_OK);
    assert_int_equal(kms_buf_terminate(&line), KMS_OK);
    /* the line is the body with the mac put last */
    assert_int_equal(line.len, body.len - 1 + 74); /* less its "}", plus the mac member and "}" */
    assert_memory_equal(line.data, body.data, body.len - 1);
    assert_string_equal(str(&line) + body.len - 1, ",\"mac\":\"" HEX_C3 "\"}");
    struct kms_buf nobrace = {(uint8_t *)"x", 1, 1};
    assert_int_equal(kms_audit_checkpoint_line(&nobrace, mac, &line), KMS_ERR_INTERNAL);

    assert_int_equal(kms_audit_reopen_line(LOG_A, 10, prev, TIME, "sighup", &re), KMS_OK);
    assert_int_equal(kms_buf_terminate(&re), KMS_OK);
    assert_string_equal(str(&re),
                        "{\"log\":\"" LOG_A "\",\"prev\":\"" HEX_0F "\",\"reason\":\"sighup\","
                        "\"seq\":10,\"time\":\"" TIME "\",\"type\":\"reopen\",\"v\":1}");
    assert_sorted_json(str(&re));
    kms_buf_free(&body);
    kms_buf_free(&line);
    kms_buf_free(&re);
}

/* ---- the verifier -------------------------------------------------------------------- */

#define MAX_LINES 96

/* A log built here, lines without '\n'. */
struct log {
    char *line[MAX_LINES];
    size_t n;
    char id[33];
    uint64_t seq;
    uint8_t last[32];
};

static void push(struct log *l, const struct kms_buf *b)
{
    assert_true(l->n < MAX_LINES);
    l->line[l->n] = strndup((const char *)b->data, b->len);
    assert_non_null(l->line[l->n]);
    l->n++;
    l->seq++;
    SHA256(b->data, b->len, l->last);
}

static void add_checkpoint_extra(struct log *l, const char *kind,
                                 const struct kms_audit_checkpoint_extra *extra)
{
    struct kms_buf body = KMS_BUF_INIT, line = KMS_BUF_INIT;
    uint8_t mac[32];
    unsigned len = 32;
    assert_int_equal(
        kms_audit_checkpoint_body(KEY_HEX, kind, l->id, l->seq + 1, l->last, TIME, extra, &body),
        KMS_OK);
    assert_non_null(HMAC(EVP_sha256(), mac_key, 32, body.data, body.len, mac, &len));
    assert_int_equal(kms_audit_checkpoint_line(&body, mac, &line), KMS_OK);
    push(l, &line);
    kms_buf_free(&body);
    kms_buf_free(&line);
}

static void add_checkpoint(struct log *l, const char *kind)
{
    add_checkpoint_extra(l, kind, NULL);
}

static void add_request(struct log *l)
{
    struct kms_audit_template t;
    struct kms_buf line = KMS_BUF_INIT;
    char rid[32];
    snprintf(rid, sizeof rid, "request-%zu", l->n);
    struct kms_audit_record r = {
        .request_id = rid,
        .principal = "tester",
        .source = "127.0.0.1:1",
        .operation = "Encrypt",
        .outcome = "ok",
    };
    assert_int_equal(kms_audit_template_build(&r, l->id, NULL, &t), KMS_OK);
    assert_int_equal(kms_audit_template_fill(&t, l->seq + 1, l->last, TIME, &line), KMS_OK);
    push(l, &line);
    kms_audit_template_free(&t);
    kms_buf_free(&line);
}

static void add_reopen(struct log *l)
{
    struct kms_buf line = KMS_BUF_INIT;
    assert_int_equal(kms_audit_reopen_line(l->id, l->seq + 1, l->last, TIME, "sighup", &line),
                     KMS_OK);
    push(l, &line);
    kms_buf_free(&line);
}

/* A new log (seq 1) after prev: "open", then requests with checkpoints after every 10th line. */
static void begin(struct log *l, const char *id, const uint8_t prev[32])
{
    snprintf(l->id, sizeof l->id, "%s", id);
    l->seq = 0;
    if (prev)
        memmove(l->last, prev, 32); /* prev may be l->last */
    else
        memset(l->last, 0, 32);
    add_checkpoint(l, "open");
}

/* 30 lines: open at 1, checkpoints at 11 and 21, close at 30. */
static void standard(struct log *l)
{
    memset(l, 0, sizeof *l);
    begin(l, LOG_A, NULL);
    while (l->n < 29) {
        if (l->n == 10 || l->n == 20)
            add_checkpoint(l, "periodic");
        else
            add_request(l);
    }
    add_checkpoint(l, "close");
}

static void log_free(struct log *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->line[i]);
    l->n = 0;
}

static int good_mac(void *arg, const char *key_hex, const uint8_t *body, size_t n,
                    const uint8_t mac[32])
{
    uint8_t want[32];
    unsigned len = 32;
    (void)arg;
    if (strcmp(key_hex, KEY_HEX) != 0)
        return -1;
    HMAC(EVP_sha256(), mac_key, 32, body, n, want, &len);
    return CRYPTO_memcmp(want, mac, 32) == 0;
}

struct verify_opts {
    int mac;
    struct kms_audit_head *heads;
    size_t nheads;
    const char *since;
};

/* Feeds lines as file "a.log", switching to "b.log" at line split (0: never). */
static void run_verify(char *const *lines, size_t n, size_t split, const struct verify_opts *o,
                       struct kms_audit_report *rep)
{
    struct kms_audit_verify_config cfg = {0};
    struct kms_audit_verifier *v;
    if (o) {
        cfg.mac = o->mac ? good_mac : NULL;
        cfg.heads = o->heads;
        cfg.nheads = o->nheads;
        cfg.since = o->since;
    }
    assert_int_equal(kms_audit_verifier_new(&cfg, &v), KMS_OK);
    kms_audit_verify_file(v, "a.log");
    for (size_t i = 0; i < n; i++) {
        if (split && i == split)
            kms_audit_verify_file(v, "b.log");
        if (kms_audit_verify_line(v, lines[i], strlen(lines[i]), 1))
            break;
    }
    kms_audit_verify_finish(v, rep);
}

static const struct verify_opts with_mac = {1, NULL, 0, NULL};

static void expect_report(char *const *lines, size_t n, const struct verify_opts *o,
                          enum kms_audit_finding finding, const char *text)
{
    struct kms_audit_report rep;
    run_verify(lines, n, 0, o, &rep);
    if (strncmp(rep.text, text, strlen(text)) != 0)
        fail_msg("report \"%s\" does not begin with \"%s\"", rep.text, text);
    assert_int_equal(rep.finding, finding);
    if (finding != KMS_AUDIT_INTACT)
        assert_string_equal(rep.file, "a.log");
}

/* The database's head of node n1: the log's checkpoint at line_index. */
static struct kms_audit_head head_of(const struct log *l, size_t line_index)
{
    struct kms_audit_head r;
    uint8_t h[32];
    memset(&r, 0, sizeof r);
    SHA256((const uint8_t *)l->line[line_index], strlen(l->line[line_index]), h);
    snprintf(r.node, sizeof r.node, "n1");
    snprintf(r.log, sizeof r.log, "%s", l->id);
    r.seq = line_index + 1;
    for (size_t i = 0; i < 32; i++)
        snprintf(r.hash + 2 * i, 3, "%02x", h[i]);
    return r;
}

static void test_verify_intact(void **state)
{
    struct log l;
    struct kms_audit_report rep;
    (void)state;
    standard(&l);
    struct kms_audit_head rec = head_of(&l, 29);
    struct verify_opts all = {1, &rec, 1, NULL};
    run_verify(l.line, l.n, 0, &all, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_INTACT);
    assert_string_equal(rep.text, "intact: 30 lines, 1 logs, 4 checkpoints");
    assert_int_equal(rep.macs_checked, 4);
    assert_false(rep.continues);
    run_verify(l.line, l.n, 0, NULL, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_INTACT);
    assert_int_equal(rep.macs_checked, 0);
    run_verify(l.line, 0, 0, NULL, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_INTACT);
    assert_int_equal(rep.lines, 0);
    log_free(&l);
}

static void add_alert(struct log *l)
{
    struct kms_buf line = KMS_BUF_INIT;
    struct kms_audit_alert al = {"decrypt_breaker", "principal", "alice", 5, 10, 2, TIME};
    assert_int_equal(kms_audit_alert_line(&al, l->id, l->seq + 1, l->last, TIME, &line), KMS_OK);
    push(l, &line);
    kms_buf_free(&line);
}

/* An alert line: its exact form, members in order, and a link of the chain like any other. */
static void test_alert_line(void **state)
{
    struct log l;
    struct kms_audit_report rep;
    uint8_t prev[32];
    struct kms_buf line = KMS_BUF_INIT;
    struct kms_audit_alert al = {
        "decrypt_breaker", "key", "arn:aws:kms:r:1:key/\"x\"", 100, 60, 300, TIME};
    (void)state;

    memset(prev, 0x0f, sizeof prev);
    assert_int_equal(kms_audit_alert_line(&al, LOG_A, 7, prev, TIME, &line), KMS_OK);
    assert_int_equal(kms_buf_terminate(&line), KMS_OK);
    assert_string_equal(str(&line),
                        "{\"alert\":\"decrypt_breaker\",\"cooldown_s\":300,\"failures\":100,"
                        "\"kind\":\"key\",\"log\":\"" LOG_A "\",\"name\":\"arn:aws:kms:r:1:key/"
                        "\\\"x\\\"\",\"prev\":\"" HEX_0F "\",\"seq\":7,\"time\":\"" TIME
                        "\",\"type\":\"alert\",\"until\":\"" TIME "\",\"v\":1,\"window_s\":60}");
    assert_sorted_json(str(&line));
    kms_buf_free(&line);

    memset(&l, 0, sizeof l);
    begin(&l, LOG_A, NULL);
    add_request(&l);
    add_alert(&l);
    add_request(&l);
    add_checkpoint(&l, "close");
    run_verify(l.line, l.n, 0, &with_mac, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_INTACT);
    assert_string_equal(rep.text, "intact: 5 lines, 1 logs, 2 checkpoints");
    /* and an altered alert is noticed */
    char *a = l.line[2];
    char *at = strstr(a, "\"failures\":5");
    assert_non_null(at);
    at[strlen("\"failures\":")] = '9';
    run_verify(l.line, l.n, 0, &with_mac, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_CHANGED);
    log_free(&l);
}

static void test_verify_edit(void **state)
{
    struct log l;
    (void)state;
    standard(&l);
    char *keep = l.line[6];
    l.line[6] = strdup(keep);
    memcpy(strstr(l.line[6], "tester"), "HACKER", 6);
    expect_report(l.line, l.n, &with_mac, KMS_AUDIT_CHANGED,
                  "line 7: changed (its hash does not match line 8's prev)");
    expect_report(l.line, l.n, NULL, KMS_AUDIT_CHANGED,
                  "line 7: changed (its hash does not match line 8's prev)");
    free(l.line[6]);
    l.line[6] = keep;

    /* before a checkpoint, whose MAC vouches for its prev */
    keep = l.line[9];
    l.line[9] = strdup(keep);
    memcpy(strstr(l.line[9], "tester"), "HACKER", 6);
    expect_report(l.line, l.n, &with_mac, KMS_AUDIT_CHANGED,
                  "line 10: changed (its hash does not match line 11's prev)");
    free(l.line[9]);
    l.line[9] = keep;

    /* after a checkpoint, whose MAC vouches for its own hash */
    keep = l.line[11];
    l.line[11] = strdup(keep);
    memset(strstr(l.line[11], "\"prev\":\"") + 8, 'e', 64);
    expect_report(l.line, l.n, &with_mac, KMS_AUDIT_CHANGED,
                  "line 12: changed (its prev does not match line 11)");
    expect_report(l.line, l.n, NULL, KMS_AUDIT_CHANGED,
                  "line 12: changed (its prev does not match line 11)");
    free(l.line[11]);
    l.line[11] = keep;

    /* the last line: only a MAC can tell */
    keep = l.line[29];
    l.line[29] = strdup(keep);
    memcpy(strstr(l.line[29], TIME), "2025", 4);
    expect_report(l.line, l.n, &with_mac, KMS_AUDIT_BAD_MAC,
                  "line 30: checkpoint MAC does not verify");
    expect_report(l.line, l.n, NULL, KMS_AUDIT_INTACT, "intact");
    free(l.line[29]);
    l.line[29] = keep;

    /* seq */
    keep = l.line[4];
    l.line[4] = strdup(keep);
    memcpy(strstr(l.line[4], "\"seq\":5,"), "\"seq\":7,", 8);
    expect_report(l.line, l.n, NULL, KMS_AUDIT_CHANGED,
                  "line 5: changed (seq 7 where 5 was expected after line 4)");
    free(l.line[4]);
    l.line[4] = keep;

    /* a checkpoint's key */
    keep = l.line[10];
    l.line[10] = strdup(keep);
    memcpy(strstr(l.line[10], KEY_HEX), "ff", 2);
    expect_report(
        l.line, l.n, &with_mac, KMS_AUDIT_UNKNOWN_KEY,
        "line 11: checkpoint made with key ff112233445566778899aabbccddeeff, which the token "
        "does not hold");
    free(l.line[10]);
    l.line[10] = keep;
    log_free(&l);
}

static void test_verify_delete(void **state)
{
    struct log l;
    char *lines[MAX_LINES];
    (void)state;
    standard(&l);
    struct kms_audit_head rec = head_of(&l, 29);
    struct verify_opts all = {1, &rec, 1, NULL};

    /* line 7 */
    memcpy(lines, l.line, 6 * sizeof *lines);
    memcpy(lines + 6, l.line + 7, (l.n - 7) * sizeof *lines);
    expect_report(lines, l.n - 1, &all, KMS_AUDIT_MISSING,
                  "line 7: a line is missing before it (seq 7 expected, 8 found)");
    expect_report(lines, l.n - 1, NULL, KMS_AUDIT_MISSING,
                  "line 7: a line is missing before it (seq 7 expected, 8 found)");
    /* lines 7 to 9 */
    memcpy(lines + 6, l.line + 9, (l.n - 9) * sizeof *lines);
    expect_report(lines, l.n - 3, &all, KMS_AUDIT_MISSING,
                  "line 7: lines are missing before it (seq 7 expected, 10 found)");
    /* a checkpoint */
    memcpy(lines, l.line, 10 * sizeof *lines);
    memcpy(lines + 10, l.line + 11, (l.n - 11) * sizeof *lines);
    expect_report(lines, l.n - 1, &all, KMS_AUDIT_MISSING, "line 11: a line is missing before it");
    /* the first */
    expect_report(l.line + 1, l.n - 1, &all, KMS_AUDIT_MISSING,
                  "line 1: lines are missing before it (the file begins with seq 2 of log " LOG_A);
    /* the last: the token knows */
    expect_report(l.line, l.n - 1, &all, KMS_AUDIT_MISSING,
                  "line 30: missing (the file ends at line 29 with seq 29 of log " LOG_A
                  ", but the database's head of node n1 records its checkpoint seq 30)");
    expect_report(l.line, l.n - 1, NULL, KMS_AUDIT_INTACT, "intact");
    /* cut after a checkpoint */
    expect_report(l.line, 21, &all, KMS_AUDIT_MISSING,
                  "line 22: missing (the file ends at line 21 with seq 21 of log " LOG_A
                  ", but the database's head of node n1 records its checkpoint seq 30)");
    /* a record with a later checkpoint than the file's last line that is one */
    struct kms_audit_head at21 = head_of(&l, 20);
    struct verify_opts o21 = {1, &at21, 1, NULL};
    expect_report(l.line, 21, &o21, KMS_AUDIT_INTACT, "intact");
    expect_report(l.line, 20, &o21, KMS_AUDIT_MISSING, "line 21: missing");
    /* the token's hash of its checkpoint differs */
    at21.hash[0] = at21.hash[0] == '0' ? '1' : '0';
    expect_report(l.line, 21, &o21, KMS_AUDIT_CHANGED,
                  "line 21: changed (the database's head of node n1 records another hash for "
                  "checkpoint seq 21)");
    /* a head naming a log none of the lines are of: that run's file is missing */
    struct kms_audit_head other = rec;
    memcpy(other.log, LOG_B, 32);
    struct verify_opts none = {1, &other, 1, NULL};
    expect_report(l.line, l.n, &none, KMS_AUDIT_MISSING_RUN,
                  "line 31: missing (the database's head of node n1 names log " LOG_B
                  " at seq 30, which is not among the files given: that run's file is missing)");
    log_free(&l);
}

static void test_verify_reorder(void **state)
{
    struct log l;
    char *lines[MAX_LINES];
    (void)state;
    standard(&l);
    memcpy(lines, l.line, l.n * sizeof *lines);
    lines[6] = l.line[7];
    lines[7] = l.line[6];
    expect_report(lines, l.n, &with_mac, KMS_AUDIT_OUT_OF_ORDER,
                  "line 7: out of order (seq 8 where 7 was expected; seq 7 is at line 8)");
    expect_report(lines, l.n, NULL, KMS_AUDIT_OUT_OF_ORDER,
                  "line 7: out of order (seq 8 where 7 was expected; seq 7 is at line 8)");
    /* a line moved down, across a checkpoint */
    memcpy(lines, l.line, l.n * sizeof *lines);
    memmove(lines + 4, lines + 5, 10 * sizeof *lines);
    lines[14] = l.line[4];
    expect_report(lines, l.n, &with_mac, KMS_AUDIT_OUT_OF_ORDER,
                  "line 5: out of order (seq 6 where 5 was expected; seq 5 is at line 15)");
    /* a line moved up */
    memcpy(lines, l.line, l.n * sizeof *lines);
    memmove(lines + 5, lines + 4, 10 * sizeof *lines);
    lines[4] = l.line[14];
    expect_report(lines, l.n, &with_mac, KMS_AUDIT_OUT_OF_ORDER,
                  "line 5: out of order (seq 15 where 5 was expected; seq 5 is at line 6)");
    log_free(&l);
}

static void test_verify_insert(void **state)
{
    struct log l;
    char *lines[MAX_LINES];
    (void)state;
    standard(&l);
    /* a copy further down */
    memcpy(lines, l.line, 12 * sizeof *lines);
    lines[12] = l.line[4];
    memcpy(lines + 13, l.line + 12, (l.n - 12) * sizeof *lines);
    expect_report(lines, l.n + 1, &with_mac, KMS_AUDIT_INSERTED,
                  "line 13: inserted (seq 5 repeats line 5)");
    /* a copy right after */
    memcpy(lines, l.line, 5 * sizeof *lines);
    lines[5] = l.line[4];
    memcpy(lines + 6, l.line + 5, (l.n - 5) * sizeof *lines);
    expect_report(lines, l.n + 1, NULL, KMS_AUDIT_INSERTED, "line 6: inserted (a copy of line 5)");
    /* a made-up line that chains to the line before: the next line skips it */
    struct log fake = {0};
    snprintf(fake.id, sizeof fake.id, "%s", LOG_A);
    fake.seq = 4;
    SHA256((const uint8_t *)l.line[3], strlen(l.line[3]), fake.last);
    add_request(&fake); /* seq 5, prev = line 4, but other bytes (its request id) */
    memcpy(lines, l.line, 4 * sizeof *lines);
    lines[4] = fake.line[0];
    memcpy(lines + 5, l.line + 4, (l.n - 4) * sizeof *lines);
    expect_report(lines, l.n + 1, &with_mac, KMS_AUDIT_INSERTED,
                  "line 5: inserted (line 6 has its seq and the line after follows that one)");
    /* ... or after the real one */
    memcpy(lines, l.line, 5 * sizeof *lines);
    lines[5] = fake.line[0];
    memcpy(lines + 6, l.line + 5, (l.n - 5) * sizeof *lines);
    expect_report(lines, l.n + 1, &with_mac, KMS_AUDIT_INSERTED,
                  "line 6: inserted (seq 5 repeats line 5)");
    log_free(&fake);
    log_free(&l);
}

static void test_verify_not_audit(void **state)
{
    struct log l;
    char *lines[MAX_LINES];
    (void)state;
    standard(&l);
    memcpy(lines, l.line, l.n * sizeof *lines);
    static const struct {
        char *line;
        enum kms_audit_finding finding;
        const char *text;
    } bad[] = {
        {"", KMS_AUDIT_NOT_JSON, "line 4: not JSON"},
        {"[1,2]", KMS_AUDIT_NOT_JSON, "line 4: not JSON"},
        {"{\"a\":1,\"a\":2}", KMS_AUDIT_NOT_JSON, "line 4: not JSON"},
        {"{\"hello\":1}", KMS_AUDIT_NOT_AUDIT, "line 4: not an audit line (\"v\" is not 1)"},
        {"{\"v\":2,\"type\":\"request\"}", KMS_AUDIT_NOT_AUDIT, "line 4: not an audit line"},
        {"{\"v\":1,\"type\":\"request\",\"seq\":4}", KMS_AUDIT_NOT_AUDIT,
         "line 4: not an audit line (no \"log\")"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        lines[3] = bad[i].line;
        expect_report(lines, l.n, NULL, bad[i].finding, bad[i].text);
    }
    /* a checkpoint whose mac is not last */
    char moved[1024];
    const char *cp = l.line[10];
    const char *mac = strstr(cp, ",\"mac\":");
    snprintf(moved, sizeof moved, "{\"mac\":\"%.64s\",%.*s}", mac + 8, (int)(mac - cp - 1), cp + 1);
    lines[3] = l.line[3];
    lines[10] = moved;
    expect_report(lines, l.n, NULL, KMS_AUDIT_NOT_AUDIT,
                  "line 11: not an audit line (no \"mac\" as its last member)");

    /* an incomplete last line */
    struct kms_audit_verifier *v;
    struct kms_audit_report rep;
    assert_int_equal(kms_audit_verifier_new(NULL, &v), KMS_OK);
    kms_audit_verify_file(v, "a.log");
    for (size_t i = 0; i < 5; i++)
        assert_int_equal(kms_audit_verify_line(v, l.line[i], strlen(l.line[i]), 1), 0);
    assert_int_equal(kms_audit_verify_line(v, l.line[5], strlen(l.line[5]) - 3, 0), 1);
    kms_audit_verify_finish(v, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_NOT_JSON);
    assert_string_equal(rep.text, "line 6: not JSON (an incomplete line at the end)");
    log_free(&l);
}

static void test_verify_logs_and_files(void **state)
{
    struct log l;
    struct kms_audit_report rep;
    char *lines[MAX_LINES];
    (void)state;
    standard(&l);
    struct kms_audit_head rec[2];
    rec[0] = head_of(&l, 29);
    /* a second run appends to the file: it chains to the last line */
    begin(&l, LOG_B, l.last);
    add_request(&l);
    add_checkpoint(&l, "close");
    rec[1] = head_of(&l, 32);
    rec[1].seq = 3;
    struct verify_opts all = {1, rec, 2, NULL};
    expect_report(l.line, l.n, &all, KMS_AUDIT_INTACT, "intact: 33 lines, 2 logs, 6 checkpoints");
    /* the first run's closing checkpoint removed */
    memcpy(lines, l.line, 29 * sizeof *lines);
    memcpy(lines + 29, l.line + 30, 3 * sizeof *lines);
    expect_report(lines, 32, &all, KMS_AUDIT_MISSING,
                  "line 30: lines are missing before it (log " LOG_A
                  " ends at line 29 with seq 29, but the database's head of node n1 records its "
                  "checkpoint seq 30)");
    /* ... and without the token's records: line 29 changed or lines after it removed */
    expect_report(lines, 32, NULL, KMS_AUDIT_CHANGED,
                  "line 29: changed, or lines after it were removed");
    /* a line of the first run put into the second */
    memcpy(lines, l.line, 31 * sizeof *lines);
    lines[31] = l.line[12];
    lines[32] = l.line[32];
    expect_report(lines, 33, NULL, KMS_AUDIT_INSERTED,
                  "line 32: inserted (seq 13 of log " LOG_A " repeats line 13)");
    /* a log that begins without its opening checkpoint */
    memcpy(lines, l.line, 30 * sizeof *lines);
    lines[30] = l.line[31];
    expect_report(lines, 31, NULL, KMS_AUDIT_MISSING,
                  "line 31: lines are missing before it (log " LOG_B
                  " begins here at seq 2 without its opening checkpoint)");
    /* a file that begins with an opening checkpoint that follows another line */
    expect_report(l.line + 30, 3, NULL, KMS_AUDIT_MISSING,
                  "line 1: lines are missing before it (it follows a line that is not there)");
    log_free(&l);

    /* rotation: the first file ends with "rotate", the second begins with "reopen" */
    memset(&l, 0, sizeof l);
    begin(&l, LOG_A, NULL);
    add_request(&l);
    add_checkpoint(&l, "rotate");
    add_reopen(&l);
    add_request(&l);
    add_checkpoint(&l, "close");
    rec[0] = head_of(&l, 5);
    struct verify_opts one = {1, rec, 1, NULL};
    run_verify(l.line, l.n, 3, &one, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_INTACT);
    run_verify(l.line + 3, 3, 0, &one, &rep); /* the new file alone */
    assert_int_equal(rep.finding, KMS_AUDIT_INTACT);
    run_verify(l.line, 3, 0, &one, &rep); /* the old file alone: sealed */
    assert_int_equal(rep.finding, KMS_AUDIT_INTACT);
    assert_true(rep.continues);
    /* the old file cut before its seal */
    run_verify(l.line, 2, 0, &one, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_MISSING);
    assert_string_equal(rep.text,
                        "line 3: missing (the file ends at line 2 with seq 2 of log " LOG_A
                        ", but the database's head of node n1 records its checkpoint seq 6)");
    /* a problem in the second file is named there */
    memcpy(lines, l.line, l.n * sizeof *lines);
    char *edited = strdup(l.line[4]);
    memcpy(strstr(edited, "tester"), "HACKER", 6);
    lines[4] = edited;
    run_verify(lines, l.n, 3, &one, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_CHANGED);
    assert_string_equal(rep.file, "b.log");
    assert_string_equal(rep.text, "line 2: changed (its hash does not match line 3's prev)");
    free(edited);
    /* the files given the other way round */
    memcpy(lines, l.line + 3, 3 * sizeof *lines);
    memcpy(lines + 3, l.line, 3 * sizeof *lines);
    run_verify(lines, 6, 3, &one, &rep);
    assert_int_not_equal(rep.finding, KMS_AUDIT_INTACT);
    log_free(&l);
}

/* A run that begins in a new file and names the run before it (a's last line). */
static void begin_after(struct log *l, const char *id, const struct log *before)
{
    char hash[65];
    for (size_t i = 0; i < 32; i++)
        snprintf(hash + 2 * i, 3, "%02x", before->last[i]);
    struct kms_audit_checkpoint_extra extra = {
        .node = "n1", .after_log = before->id, .after_seq = before->seq, .after_hash = hash};
    memset(l, 0, sizeof *l);
    snprintf(l->id, sizeof l->id, "%s", id);
    add_checkpoint_extra(l, "open", &extra);
}

static void test_verify_runs(void **state)
{
    struct log a, b, c;
    struct kms_audit_report rep;
    char *lines[MAX_LINES];
    (void)state;
    standard(&a);
    begin_after(&b, LOG_B, &a);
    add_request(&b);
    add_checkpoint(&b, "close");
    assert_non_null(strstr(b.line[0], "\"after_log\":\"" LOG_A "\",\"after_seq\":30,"));
    assert_non_null(strstr(b.line[0], "\"node\":\"n1\""));
    /* a then b: each run reaches the line the next one names */
    memcpy(lines, a.line, a.n * sizeof *lines);
    memcpy(lines + a.n, b.line, b.n * sizeof *lines);
    run_verify(lines, a.n + b.n, a.n, &with_mac, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_INTACT);
    assert_string_equal(rep.text, "intact: 33 lines, 2 logs, 6 checkpoints");
    /* b alone: the run before it is missing, unless the files begin with b on purpose */
    expect_report(b.line, b.n, &with_mac, KMS_AUDIT_MISSING_RUN,
                  "line 1: lines are missing before it (the run before it on node n1, log " LOG_A
                  " up to seq 30, is not among the files given)");
    struct verify_opts since = {1, NULL, 0, LOG_B};
    expect_report(b.line, b.n, &since, KMS_AUDIT_INTACT, "intact");
    /* a cut after its checkpoint at line 21, then b */
    memcpy(lines, a.line, 21 * sizeof *lines);
    memcpy(lines + 21, b.line, b.n * sizeof *lines);
    run_verify(lines, 21 + b.n, 21, &with_mac, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_MISSING);
    assert_string_equal(rep.file, "b.log");
    assert_string_equal(rep.text, "line 1: lines are missing before it (log " LOG_A
                                  " ends at line 21 of a.log with seq 21, but the run after it "
                                  "says it reached seq 30)");
    /* a, b, c with b's file left out */
    begin_after(&c, LOG_C, &b);
    add_request(&c);
    memcpy(lines, a.line, a.n * sizeof *lines);
    memcpy(lines + a.n, c.line, c.n * sizeof *lines);
    run_verify(lines, a.n + c.n, a.n, &with_mac, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_MISSING_RUN);
    assert_string_equal(rep.text, "line 1: lines are missing before it (the run before it on "
                                  "node n1, log " LOG_B " up to seq 3, is not among the files "
                                  "given)");
    /* the link is MAC'd: pointing it elsewhere is seen */
    char *edited = strdup(b.line[0]);
    memcpy(strstr(edited, "\"after_seq\":30") + 12, "21", 2);
    memcpy(lines, a.line, 21 * sizeof *lines);
    lines[21] = edited;
    run_verify(lines, 22, 21, &with_mac, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_BAD_MAC);
    free(edited);
    log_free(&a);
    log_free(&b);
    log_free(&c);
}

static void test_verify_intents(void **state)
{
    struct log l;
    struct kms_audit_report rep;
    (void)state;
    memset(&l, 0, sizeof l);
    begin(&l, LOG_A, NULL);
    static const char *const ids[] = {"r-1", "r-2", "r-3"};
    for (size_t i = 0; i < 3; i++) {
        struct kms_buf line = KMS_BUF_INIT;
        char text[600], hex[65];
        for (size_t k = 0; k < 32; k++)
            snprintf(hex + 2 * k, 3, "%02x", l.last[k]);
        snprintf(text, sizeof text,
                 "{\"log\":\"%s\",\"operation\":\"CreateKey\",\"prev\":\"%s\","
                 "\"principal\":\"p\",\"request_id\":\"%s\",\"seq\":%zu,\"source\":\"s\","
                 "\"time\":\"" TIME "\",\"type\":\"intent\",\"v\":1}",
                 l.id, hex, ids[i], (size_t)l.seq + 1);
        assert_int_equal(kms_buf_append_str(&line, text), KMS_OK);
        push(&l, &line);
        kms_buf_free(&line);
    }
    for (size_t i = 0; i < 2; i++) {
        struct kms_buf line = KMS_BUF_INIT;
        char text[600], hex[65];
        for (size_t k = 0; k < 32; k++)
            snprintf(hex + 2 * k, 3, "%02x", l.last[k]);
        snprintf(text, sizeof text,
                 "{\"log\":\"%s\",\"prev\":\"%s\",\"request_id\":\"%s\",\"result\":\"%s\","
                 "\"seq\":%zu,\"time\":\"" TIME "\",\"type\":\"%s\",\"v\":1}",
                 l.id, hex, ids[i], i ? "not committed" : "committed", (size_t)l.seq + 1,
                 i ? "recovery" : "outcome");
        assert_int_equal(kms_buf_append_str(&line, text), KMS_OK);
        push(&l, &line);
        kms_buf_free(&line);
    }
    add_checkpoint(&l, "close");
    run_verify(l.line, l.n, 0, &with_mac, &rep);
    assert_int_equal(rep.finding, KMS_AUDIT_INTACT);
    assert_int_equal(rep.intents, 3);
    assert_int_equal(rep.committed, 1);
    assert_int_equal(rep.not_committed, 1);
    assert_int_equal(rep.nopen, 1);
    assert_string_equal(rep.open[0], "r-3");
    kms_audit_report_free(&rep);
    log_free(&l);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_format_time),
        cmocka_unit_test(test_json_string),
        cmocka_unit_test(test_record_line),
        cmocka_unit_test(test_record_line_minimal),
        cmocka_unit_test(test_record_line_summary),
        cmocka_unit_test(test_record_bad_context),
        cmocka_unit_test(test_checkpoint_and_reopen_lines),
        cmocka_unit_test(test_verify_intact),
        cmocka_unit_test(test_alert_line),
        cmocka_unit_test(test_verify_edit),
        cmocka_unit_test(test_verify_delete),
        cmocka_unit_test(test_verify_reorder),
        cmocka_unit_test(test_verify_insert),
        cmocka_unit_test(test_verify_not_audit),
        cmocka_unit_test(test_verify_logs_and_files),
        cmocka_unit_test(test_verify_runs),
        cmocka_unit_test(test_verify_intents),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
