/*
 * Unit tests for src/server/settings.h: the configuration file, HOST:PORT
 * parsing, the credentials file and secret files (refused when group or
 * others may read them).
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/buf.h"
#include "server/settings.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

/* ---- configuration file ------------------------------------------------------- */

static void test_config_defaults(void **state)
{
    struct kms_config c;
    (void)state;

    memset(&c, 0xa5, sizeof c);
    kms_config_defaults(&c);
    assert_null(c.module);
    assert_null(c.token);
    assert_null(c.pin_file);
    assert_null(c.credentials_file);
    assert_null(c.listen);
    assert_null(c.region);
    assert_null(c.account);
    assert_int_equal(c.threads, 4);
    assert_int_equal(c.sessions, 0);
    assert_int_equal(c.session_timeout_ms, 2000);
    assert_int_equal(c.request_timeout_ms, 5000);
    assert_int_equal(c.keygen_timeout_ms, 60000); /* RSA key generation takes seconds */
    assert_int_equal(c.max_body, 64 * 1024);
    assert_int_equal(c.database_timeout_ms, 5000);
    assert_int_equal(c.database_pool, 8);
    assert_int_equal(c.database_connect_timeout_ms, 0); /* database_timeout_ms */
    assert_null(c.alias_policy_file); /* no alias policy: the keys' policies alone decide */
    assert_int_equal(c.breaker_failures, 100);
    assert_int_equal(c.breaker_window_s, 60);
    assert_int_equal(c.breaker_cooldown_s, 300);
    assert_int_equal(c.per_ip_connections, 256);
    assert_int_equal(c.auth_failures_per_minute, 60);
    assert_int_equal(c.auth_failure_burst, 20);
    assert_int_equal(c.auth_failure_cooldown_s, 30);
    assert_int_equal(c.auth_failure_audit_interval_s, 60);
    assert_null(c.metrics_token_file);
    assert_int_equal(c.metrics_key_ids, 0);
    assert_int_equal(c.metrics_open_loopback, 0);
    kms_config_free(&c);
}

static void expect_config_error(const char *text, unsigned line);

static void test_config_http_protection_settings(void **state)
{
    static const char text[] = "per_ip_connections = 0\n"
                               "auth_failures_per_minute = 0\n"
                               "auth_failure_burst = 5\n"
                               "auth_failure_cooldown_s = 600\n"
                               "auth_failure_audit_interval_s = 0\n"
                               "metrics_token_file = /etc/p11kms/metrics.token\n"
                               "metrics_key_ids = true\n";
    struct kms_config c;
    (void)state;

    kms_config_defaults(&c);
    assert_int_equal(kms_config_parse(&c, text), KMS_OK);
    assert_int_equal(c.per_ip_connections, 0);
    assert_int_equal(c.auth_failures_per_minute, 0);
    assert_int_equal(c.auth_failure_burst, 5);
    assert_int_equal(c.auth_failure_cooldown_s, 600);
    assert_int_equal(c.auth_failure_audit_interval_s, 0);
    assert_string_equal(c.metrics_token_file, "/etc/p11kms/metrics.token");
    assert_int_equal(c.metrics_key_ids, 1);
    kms_config_free(&c);
    expect_config_error("auth_failure_burst = 0\n", 1);
    expect_config_error("threads = 2\nauth_failure_cooldown_s = 0\n", 2);
    expect_config_error("metrics_key_ids = 1\n", 1);
}

static void test_config_rate_classes(void **state)
{
    static const char text[] = "rate_crypto = 100\n"
                               "rate_asym = 30\n"
                               "burst_asym = 60\n"
                               "rate_hmac = 200\n"
                               "burst_hmac = 400\n"
                               "rate_asym.signer = 5\n";
    struct kms_config c;
    (void)state;

    kms_config_defaults(&c);
    assert_true(c.limits.per_principal[KMS_CLASS_ASYM].rate == KMS_RL_DEFAULT_ASYM_RATE);
    assert_true(c.limits.per_principal[KMS_CLASS_HMAC].burst == KMS_RL_DEFAULT_HMAC_BURST);
    assert_int_equal(kms_config_parse(&c, text), KMS_OK);
    assert_true(c.limits.per_principal[KMS_CLASS_CRYPTO].rate == 100);
    assert_true(c.limits.per_principal[KMS_CLASS_ASYM].rate == 30);
    assert_true(c.limits.per_principal[KMS_CLASS_ASYM].burst == 60);
    assert_true(c.limits.per_principal[KMS_CLASS_HMAC].rate == 200);
    assert_true(c.limits.per_principal[KMS_CLASS_HMAC].burst == 400);
    assert_int_equal(c.limits.noverrides, 1);
    assert_string_equal(c.limits.overrides[0].principal, "signer");
    assert_true(c.limits.overrides[0].cls[KMS_CLASS_ASYM].rate == 5);
    assert_true(c.limits.overrides[0].cls[KMS_CLASS_HMAC].rate == KMS_RATE_INHERIT);
    kms_config_free(&c);
    expect_config_error("rate_rsa = 5\n", 1);
    expect_config_error("threads = 2\nburst_hmac = -1\n", 2);
}

static void test_config_parse_every_key(void **state)
{
    static const char text[] = "# p11kmsd test configuration\n"
                               "module = /usr/lib/softhsm/libsofthsm2.so\n"
                               "token=kms-test\n"
                               "\n"
                               "   pin_file   =   /etc/p11kms/pin   \n"
                               "credentials_file = /etc/p11kms/credentials\n"
                               "database = sqlite:/var/lib/p11kms/p11kms.db\n"
                               "\t# an indented comment\n"
                               "listen = [::1]:8443\n"
                               "region = eu-west-1\n"
                               "account = 123456789012\n"
                               "threads = 8\n"
                               "sessions = 16\n"
                               "session_timeout_ms = 5000   # trailing comment\n"
                               "alias_policy_file = /etc/p11kms/alias-policy.json\n"
                               "max_body = 131072"; /* no final newline */
    struct kms_config c;
    (void)state;

    kms_config_defaults(&c);
    assert_int_equal(kms_config_parse(&c, text), KMS_OK);
    assert_string_equal(c.module, "/usr/lib/softhsm/libsofthsm2.so");
    assert_string_equal(c.token, "kms-test");
    assert_string_equal(c.pin_file, "/etc/p11kms/pin");
    assert_string_equal(c.credentials_file, "/etc/p11kms/credentials");
    assert_string_equal(c.database, "sqlite:/var/lib/p11kms/p11kms.db");
    assert_string_equal(c.listen, "[::1]:8443");
    assert_string_equal(c.region, "eu-west-1");
    assert_string_equal(c.account, "123456789012");
    assert_int_equal(c.threads, 8);
    assert_int_equal(c.sessions, 16);
    assert_int_equal(c.session_timeout_ms, 5000);
    assert_int_equal(c.max_body, 131072);
    assert_string_equal(c.alias_policy_file, "/etc/p11kms/alias-policy.json");
    assert_int_equal(kms_config_check(&c), KMS_OK);
    kms_config_free(&c);
}

static void test_config_later_value_wins(void **state)
{
    struct kms_config c;
    (void)state;

    kms_config_defaults(&c);
    assert_int_equal(kms_config_parse(&c, "token = a\ntoken = b\nthreads = 2\nthreads = 3\n"),
                     KMS_OK);
    assert_string_equal(c.token, "b");
    assert_int_equal(c.threads, 3);
    /* a value may hold '=' itself; only the first one splits */
    assert_int_equal(kms_config_parse(&c, "token = pkcs11:token=kms;object=x\n"), KMS_OK);
    assert_string_equal(c.token, "pkcs11:token=kms;object=x");
    kms_config_free(&c);
}

static void test_config_comments_and_blanks_ignored(void **state)
{
    struct kms_config c, d;
    (void)state;

    kms_config_defaults(&c);
    kms_config_defaults(&d);
    assert_int_equal(kms_config_parse(&c, ""), KMS_OK);
    assert_int_equal(kms_config_parse(&c, "\n\n   \n\t\n# only comments\n  # here = too\n#x\n"),
                     KMS_OK);
    assert_memory_equal(&c, &d, sizeof c);
    assert_int_equal(kms_config_parse(&c, "# one\n\nthreads = 7 # seven\n\n# two\n"), KMS_OK);
    assert_int_equal(c.threads, 7);
    kms_config_free(&c);
}

/* Parses text, expecting KMS_ERR_VALIDATION with a message that names the line. */
static void expect_config_error(const char *text, unsigned line)
{
    struct kms_config c;
    char want[32];

    kms_config_defaults(&c);
    kms_err_clear();
    assert_int_equal(kms_config_parse(&c, text), KMS_ERR_VALIDATION);
    snprintf(want, sizeof want, "line %u:", line);
    if (strstr(kms_err_message(), want) == NULL)
        fail_msg("message \"%s\" does not contain \"%s\"", kms_err_message(), want);
    kms_config_free(&c);
}

static void test_config_errors_name_the_line(void **state)
{
    (void)state;
    /* unknown key */
    expect_config_error("module = m\n# comment\nmodel = x\n", 3);
    expect_config_error("Module = m\n", 1);
    /* missing '=' */
    expect_config_error("\nmodule /usr/lib/x.so\n", 2);
    expect_config_error("token = t\nthreads\n", 2);
    /* empty value, empty key */
    expect_config_error("token = t\n\n\ntoken =\n", 4);
    expect_config_error("token =    # nothing\n", 1);
    expect_config_error(" = value\n", 1);
    /* bad numbers */
    expect_config_error("threads = 4x\n", 1);
    expect_config_error("threads = -1\n", 1);
    expect_config_error("threads = +4\n", 1);
    expect_config_error("# c\nsessions = 99999999999999999999999\n", 2);
    expect_config_error("max_body = 1023\n", 1);
    expect_config_error("session_timeout_ms = 600001\n", 1);
    expect_config_error("keygen_timeout_ms = 9\n", 1);
    /* threads 0 */
    expect_config_error("token = t\nthreads = 0\n", 2);
    expect_config_error("threads = 257\n", 1);
    /* account not 12 digits */
    expect_config_error("account = 12345678901\n", 1);
    expect_config_error("account = 1234567890123\n", 1);
    expect_config_error("\naccount = 12345678901a\n", 2);
    /* bad listen */
    expect_config_error("listen = nohost\n", 1);
    expect_config_error("listen = :80\n", 1);
    expect_config_error("region = eu-west-1\nlisten = 127.0.0.1:99999\n", 2);
    /* bad region */
    expect_config_error("region = EU-West-1\n", 1);
    /* a database URL of no engine we have */
    expect_config_error("\ndatabase = mysql://db/kms\n", 2);
    expect_config_error("database = sqlite:\n", 1);
    expect_config_error("database = postgresql:db\n", 1);
    /* the pool: 1 to 256 connections; the connect timeout: 1 ms to 10 minutes */
    expect_config_error("database_pool = 0\n", 1);
    expect_config_error("\ndatabase_pool = 257\n", 2);
    expect_config_error("database_connect_timeout_ms = 0\n", 1);
    expect_config_error("database_connect_timeout_ms = 600001\n", 1);
    /* the decryption breaker: 0 (off) to a million failures, windows of 1 s to a day */
    expect_config_error("decrypt_breaker_failures = -1\n", 1);
    expect_config_error("decrypt_breaker_failures = 1000001\n", 1);
    expect_config_error("decrypt_breaker_window_s = 0\n", 1);
    expect_config_error("\ndecrypt_breaker_window_s = 86401\n", 2);
    expect_config_error("decrypt_breaker_cooldown_s = 0\n", 1);
    expect_config_error("decrypt_breaker_cooldown_s = 86401\n", 1);
}

/* Both engines' URLs are accepted as written (store.c reads them). */
static void test_config_database_urls(void **state)
{
    static const char *const urls[] = {"sqlite:/var/lib/p11kms/p11kms.db",
                                       "postgresql://kms@db.example:5432/kms?sslmode=verify-full",
                                       "postgres://kms@10.0.0.5/kms"};
    (void)state;
    for (size_t i = 0; i < N_ELEMS(urls); i++) {
        struct kms_config c;
        kms_config_defaults(&c);
        assert_int_equal(kms_config_set(&c, "database", urls[i]), KMS_OK);
        assert_string_equal(c.database, urls[i]);
        kms_config_free(&c);
    }
    struct kms_config c;
    kms_config_defaults(&c);
    assert_int_equal(kms_config_parse(&c, "database_pool = 1\ndatabase_connect_timeout_ms = 250\n"),
                     KMS_OK);
    assert_int_equal(c.database_pool, 1);
    assert_int_equal(c.database_connect_timeout_ms, 250);
    assert_int_equal(kms_config_parse(&c, "database_pool = 256\n"), KMS_OK);
    assert_int_equal(c.database_pool, 256);
    kms_config_free(&c);
}

static void test_config_breaker(void **state)
{
    struct kms_config c;
    (void)state;
    kms_config_defaults(&c);
    assert_int_equal(kms_config_parse(&c, "decrypt_breaker_failures = 5\n"
                                          "decrypt_breaker_window_s = 10\n"
                                          "decrypt_breaker_cooldown_s = 2\n"),
                     KMS_OK);
    assert_int_equal(c.breaker_failures, 5);
    assert_int_equal(c.breaker_window_s, 10);
    assert_int_equal(c.breaker_cooldown_s, 2);
    assert_int_equal(kms_config_parse(&c, "decrypt_breaker_failures = 0\n"), KMS_OK);
    assert_int_equal(c.breaker_failures, 0);
    kms_config_free(&c);
}

static void test_config_audit_node(void **state)
{
    struct kms_config c;
    char long_name[300];
    (void)state;
    kms_config_defaults(&c);
    assert_null(c.audit_node);
    assert_int_equal(kms_config_parse(&c, "audit_node = kms-a\n"), KMS_OK);
    assert_string_equal(c.audit_node, "kms-a");
    assert_int_equal(kms_config_set(&c, "audit_node", ""), KMS_ERR_VALIDATION);
    memset(long_name, 'n', sizeof long_name - 1);
    long_name[sizeof long_name - 1] = '\0';
    assert_int_equal(kms_config_set(&c, "audit_node", long_name), KMS_ERR_VALIDATION);
    long_name[KMS_AUDIT_NODE_MAX] = '\0';
    assert_int_equal(kms_config_set(&c, "audit_node", long_name), KMS_OK);
    assert_int_equal(strlen(c.audit_node), KMS_AUDIT_NODE_MAX);
    kms_config_free(&c);
    kms_err_clear();
}

static void test_config_check_requires(void **state)
{
    static const char *const keys[] = {"module", "token",  "credentials_file", "database",
                                       "listen", "region", "account"};
    static const char *const values[] = {"m.so",        "t", "/c",          "sqlite:/d",
                                         "127.0.0.1:1", "r", "000000000000"};
    (void)state;

    for (size_t skip = 0; skip < N_ELEMS(keys); skip++) {
        struct kms_config c;
        kms_config_defaults(&c);
        for (size_t i = 0; i < N_ELEMS(keys); i++)
            if (i != skip)
                assert_int_equal(kms_config_set(&c, keys[i], values[i]), KMS_OK);
        kms_err_clear();
        assert_int_equal(kms_config_check(&c), KMS_ERR_VALIDATION);
        assert_non_null(strstr(kms_err_message(), keys[skip]));
        assert_int_equal(kms_config_set(&c, keys[skip], values[skip]), KMS_OK);
        assert_int_equal(kms_config_check(&c), KMS_OK);
        kms_config_free(&c);
    }
}

/* inline_requests: unset means threads - 1 (resolved at start); set, it must stay below threads. */
static void test_config_inline_requests(void **state)
{
    static const char *const base[][2] = {{"module", "m.so"},         {"token", "t"},
                                          {"credentials_file", "/c"}, {"database", "sqlite:/d"},
                                          {"listen", "127.0.0.1:1"},  {"region", "r"},
                                          {"account", "000000000000"}};
    struct kms_config c;
    (void)state;

    kms_config_defaults(&c);
    for (size_t i = 0; i < N_ELEMS(base); i++)
        assert_int_equal(kms_config_set(&c, base[i][0], base[i][1]), KMS_OK);
    assert_int_equal(c.inline_requests, KMS_INLINE_DEFAULT);
    assert_int_equal(kms_config_check(&c), KMS_OK);
    assert_int_equal(kms_config_set(&c, "threads", "4"), KMS_OK);
    assert_int_equal(kms_config_set(&c, "inline_requests", "0"), KMS_OK);
    assert_int_equal(c.inline_requests, 0);
    assert_int_equal(kms_config_check(&c), KMS_OK);
    assert_int_equal(kms_config_set(&c, "inline_requests", "3"), KMS_OK);
    assert_int_equal(kms_config_check(&c), KMS_OK);
    assert_int_equal(kms_config_set(&c, "inline_requests", "4"), KMS_OK);
    kms_err_clear();
    assert_int_equal(kms_config_check(&c), KMS_ERR_VALIDATION);
    assert_non_null(strstr(kms_err_message(), "inline_requests must be below threads"));
    kms_err_clear();
    assert_int_equal(kms_config_set(&c, "inline_requests", "256"), KMS_ERR_VALIDATION);
    kms_err_clear();
    kms_config_free(&c);
}

/* ---- listen address -------------------------------------------------------------- */

static void expect_listen(const char *s, const char *host, unsigned port)
{
    char h[256];
    unsigned p = 12345;

    memset(h, 'x', sizeof h);
    assert_int_equal(kms_parse_listen(s, h, sizeof h, &p), KMS_OK);
    assert_string_equal(h, host);
    assert_int_equal(p, port);
}

static void test_parse_listen_good(void **state)
{
    (void)state;
    expect_listen("127.0.0.1:8080", "127.0.0.1", 8080);
    expect_listen("[::1]:0", "::1", 0);
    expect_listen("localhost:65535", "localhost", 65535);
    expect_listen("[fe80::1%lo]:443", "fe80::1%lo", 443);
}

static void test_parse_listen_bad(void **state)
{
    static const char *const bad[] = {
        "nohost",  ":80",   "h:99999", "h:",      "h:8x",  "h:-1",    "h: 80", "h:+80",
        "h:65536", "[::1]", "[::1]:",  "[::1]80", "[]:80", "[::1:80", "",
    };
    char h[64];
    unsigned p;
    (void)state;

    for (size_t i = 0; i < N_ELEMS(bad); i++) {
        kms_err rc = kms_parse_listen(bad[i], h, sizeof h, &p);
        if (rc != KMS_ERR_VALIDATION)
            fail_msg("\"%s\": got %d, want KMS_ERR_VALIDATION", bad[i], (int)rc);
    }
    /* a host that does not fit the caller's buffer */
    assert_int_equal(kms_parse_listen("localhost:80", h, 9, &p), KMS_ERR_VALIDATION);
    assert_int_equal(kms_parse_listen("localhost:80", h, 10, &p), KMS_OK);
    assert_string_equal(h, "localhost");
}

/* ---- credentials --------------------------------------------------------------- */

static void test_credentials_parse_good(void **state)
{
    static const char text[] = "# ACCESS_KEY_ID SECRET NAME\n"
                               "AKIDEXAMPLE wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY alice\n"
                               "\n"
                               "   # indented comment\n"
                               "\tAKIDSECOND\ts3cr3t+/=\t bob   # trailing comment\r\n";
    struct kms_credentials cr;
    const struct kms_principal *p;
    (void)state;

    assert_int_equal(kms_credentials_parse(text, &cr), KMS_OK);
    assert_int_equal(cr.n, 2);
    assert_string_equal(cr.p[0].access_key, "AKIDEXAMPLE");
    assert_string_equal(cr.p[0].secret, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
    assert_string_equal(cr.p[0].name, "alice");
    assert_string_equal(cr.p[1].access_key, "AKIDSECOND");
    assert_string_equal(cr.p[1].secret, "s3cr3t+/=");
    assert_string_equal(cr.p[1].name, "bob");

    p = kms_credentials_find(&cr, "AKIDSECOND", 10);
    assert_ptr_equal(p, &cr.p[1]);
    p = kms_credentials_find(&cr, "AKIDEXAMPLEXYZ", 11); /* length bounds the match */
    assert_ptr_equal(p, &cr.p[0]);
    assert_null(kms_credentials_find(&cr, "AKIDEXAMPL", 10));
    assert_null(kms_credentials_find(&cr, "AKIDEXAMPLEX", 12));
    assert_null(kms_credentials_find(&cr, "akidexample", 11));
    assert_null(kms_credentials_find(&cr, "", 0));
    kms_credentials_free(&cr);
    assert_null(cr.p);
    assert_int_equal(cr.n, 0);
}

static void expect_credentials_error(const char *text, const char *want_in_message)
{
    struct kms_credentials cr;

    kms_err_clear();
    assert_int_equal(kms_credentials_parse(text, &cr), KMS_ERR_VALIDATION);
    assert_null(cr.p);
    assert_int_equal(cr.n, 0);
    if (strstr(kms_err_message(), want_in_message) == NULL)
        fail_msg("message \"%s\" does not contain \"%s\"", kms_err_message(), want_in_message);
}

static void test_credentials_parse_errors(void **state)
{
    (void)state;
    /* two fields */
    expect_credentials_error("AKID1 secret1 alice\nAKID2 secret2\n", "line 2");
    expect_credentials_error("AKID1 secret1\n", "line 1");
    /* four fields */
    expect_credentials_error("# c\nAKID1 secret1 alice extra\n", "line 2");
    /* duplicate access key */
    expect_credentials_error("AKID1 s1 alice\n\nAKID1 s2 bob\n", "line 3");
    /* a field too long for the parser */
    char longline[400];
    memset(longline, 'k', 300);
    memcpy(longline + 300, " s n\n", 6);
    expect_credentials_error(longline, "line 1");
    /* empty file, or nothing but comments and blank lines */
    expect_credentials_error("", "no principal");
    expect_credentials_error("\n# nobody\n   \n", "no principal");
}

/* ---- files with secrets ---------------------------------------------------------- */

struct tmpdir {
    char path[64];
    char file[128];
};

static int make_tmpdir(void **state)
{
    struct tmpdir *t = calloc(1, sizeof *t);
    const char *base = getenv("TMPDIR");

    if (!t)
        return -1;
    snprintf(t->path, sizeof t->path, "%s/p11kms-test-XXXXXX",
             base && *base && strlen(base) < 40 ? base : "/tmp");
    if (!mkdtemp(t->path))
        return -1;
    snprintf(t->file, sizeof t->file, "%s/secret", t->path);
    *state = t;
    return 0;
}

static int remove_tmpdir(void **state)
{
    struct tmpdir *t = *state;
    unlink(t->file);
    rmdir(t->path);
    free(t);
    return 0;
}

/* Writes text to path and sets its mode exactly (whatever the umask). */
static void write_file(const char *path, const char *text, mode_t mode)
{
    int fd;
    size_t n = strlen(text);

    unlink(path);
    fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, text, n), (ssize_t)n);
    assert_int_equal(fchmod(fd, mode), 0);
    assert_int_equal(close(fd), 0);
}

static const char creds_text[] = "AKIDEXAMPLE wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY alice\n"
                                 "AKIDSECOND s3cr3t bob\n";

static void test_credentials_load_modes(void **state)
{
    struct tmpdir *t = *state;
    static const mode_t refused[] = {0640, 0604, 0660, 0644, 0610, 0601, 0620, 0602, 0700 | 0070};
    struct kms_credentials cr;

    for (size_t i = 0; i < N_ELEMS(refused); i++) {
        write_file(t->file, creds_text, refused[i]);
        kms_err_clear();
        assert_int_equal(kms_credentials_load(t->file, &cr), KMS_ERR_VALIDATION);
        assert_non_null(strstr(kms_err_message(), "group or others"));
    }

    write_file(t->file, creds_text, 0600);
    assert_int_equal(kms_credentials_load(t->file, &cr), KMS_OK);
    assert_int_equal(cr.n, 2);
    assert_string_equal(cr.p[0].access_key, "AKIDEXAMPLE");
    assert_string_equal(cr.p[0].secret, "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
    assert_string_equal(cr.p[1].name, "bob");
    kms_credentials_free(&cr);

    write_file(t->file, creds_text, 0400);
    assert_int_equal(kms_credentials_load(t->file, &cr), KMS_OK);
    assert_int_equal(cr.n, 2);
    kms_credentials_free(&cr);

    /* a good mode does not excuse bad content */
    write_file(t->file, "AKID only-two\n", 0600);
    assert_int_equal(kms_credentials_load(t->file, &cr), KMS_ERR_VALIDATION);
}

static void test_credentials_load_missing_and_not_regular(void **state)
{
    struct tmpdir *t = *state;
    struct kms_credentials cr;

    unlink(t->file);
    assert_int_equal(kms_credentials_load(t->file, &cr), KMS_ERR_VALIDATION);
    /* the directory itself (mode 0700) is not a regular file */
    assert_int_equal(kms_credentials_load(t->path, &cr), KMS_ERR_VALIDATION);
}

static void expect_secret(const char *path, const char *text, const char *want)
{
    char *s = NULL;
    size_t len = 0;

    write_file(path, text, 0600);
    assert_int_equal(kms_read_secret_file(path, &s, &len), KMS_OK);
    assert_non_null(s);
    assert_int_equal(len, strlen(want));
    assert_memory_equal(s, want, len + 1); /* and NUL-terminated */
    kms_free_secret(s, len + 1);
}

static void test_read_secret_file(void **state)
{
    struct tmpdir *t = *state;
    char *s = NULL;
    size_t len = 0;

    expect_secret(t->file, "1234\n", "1234");
    expect_secret(t->file, "1234\n\n\n", "1234");
    expect_secret(t->file, "1234\r\n", "1234");
    expect_secret(t->file, "1234", "1234");
    expect_secret(t->file, "12 34 \n", "12 34 "); /* only newlines go, not spaces */
    expect_secret(t->file, "line1\nline2\n", "line1\nline2");
    expect_secret(t->file, "\n\n", "");
    expect_secret(t->file, "", "");

    write_file(t->file, "1234\n", 0640);
    assert_int_equal(kms_read_secret_file(t->file, &s, &len), KMS_ERR_VALIDATION);
    write_file(t->file, "1234\n", 0604);
    assert_int_equal(kms_read_secret_file(t->file, &s, &len), KMS_ERR_VALIDATION);
}

static void test_config_load_file(void **state)
{
    struct tmpdir *t = *state;
    struct kms_config c;

    /* the configuration holds no secret, so 0644 is fine */
    write_file(t->file, "token = from-file\nthreads = 2\n", 0644);
    kms_config_defaults(&c);
    assert_int_equal(kms_config_load(&c, t->file), KMS_OK);
    assert_string_equal(c.token, "from-file");
    assert_int_equal(c.threads, 2);

    write_file(t->file, "token = x\nbogus = 1\n", 0644);
    kms_err_clear();
    assert_int_equal(kms_config_load(&c, t->file), KMS_ERR_VALIDATION);
    assert_non_null(strstr(kms_err_message(), "line 2:"));
    kms_config_free(&c);
}

/*
 * A database URL with a password makes the configuration a secret file: it
 * loads at 0600 (or 0400), not when group or others may access it, and the
 * refusal names the file and mode, never the password. Without one, 0644 is fine.
 */
static void test_config_database_password_needs_private_file(void **state)
{
    struct tmpdir *t = *state;
    static const char *const with[] = {
        "database = postgresql://kms:s3cr3t-pw@db.example/kms\n",
        "database = postgresql://kms@db.example/kms?sslmode=require&password=s3cr3t-pw\n",
    };
    static const mode_t refused[] = {0640, 0604, 0644, 0660, 0620, 0602, 0610, 0601};
    struct kms_config c;

    for (size_t i = 0; i < N_ELEMS(with); i++) {
        for (size_t m = 0; m < N_ELEMS(refused); m++) {
            char mode[8];
            write_file(t->file, with[i], refused[m]);
            kms_config_defaults(&c);
            kms_err_clear();
            assert_int_equal(kms_config_load(&c, t->file), KMS_ERR_VALIDATION);
            snprintf(mode, sizeof mode, "%03o", (unsigned)refused[m]);
            assert_non_null(strstr(kms_err_message(), t->file));
            assert_non_null(strstr(kms_err_message(), mode));
            assert_non_null(strstr(kms_err_message(), "PGPASSFILE"));
            assert_null(strstr(kms_err_message(), "s3cr3t"));
            kms_config_free(&c);
        }
        write_file(t->file, with[i], 0600);
        kms_config_defaults(&c);
        assert_int_equal(kms_config_load(&c, t->file), KMS_OK);
        kms_config_free(&c);
        write_file(t->file, with[i], 0400);
        kms_config_defaults(&c);
        assert_int_equal(kms_config_load(&c, t->file), KMS_OK);
        kms_config_free(&c);
    }
    write_file(t->file, "database = postgresql://kms@db.example/kms?passfile=/etc/pgpass\n", 0644);
    kms_config_defaults(&c);
    assert_int_equal(kms_config_load(&c, t->file), KMS_OK);
    kms_config_free(&c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_defaults),
        cmocka_unit_test(test_config_parse_every_key),
        cmocka_unit_test(test_config_later_value_wins),
        cmocka_unit_test(test_config_comments_and_blanks_ignored),
        cmocka_unit_test(test_config_http_protection_settings),
        cmocka_unit_test(test_config_rate_classes),
        cmocka_unit_test(test_config_errors_name_the_line),
        cmocka_unit_test(test_config_database_urls),
        cmocka_unit_test(test_config_breaker),
        cmocka_unit_test(test_config_audit_node),
        cmocka_unit_test_setup_teardown(test_config_database_password_needs_private_file,
                                        make_tmpdir, remove_tmpdir),
        cmocka_unit_test(test_config_check_requires),
        cmocka_unit_test(test_config_inline_requests),
        cmocka_unit_test(test_parse_listen_good),
        cmocka_unit_test(test_parse_listen_bad),
        cmocka_unit_test(test_credentials_parse_good),
        cmocka_unit_test(test_credentials_parse_errors),
        cmocka_unit_test_setup_teardown(test_credentials_load_modes, make_tmpdir, remove_tmpdir),
        cmocka_unit_test_setup_teardown(test_credentials_load_missing_and_not_regular, make_tmpdir,
                                        remove_tmpdir),
        cmocka_unit_test_setup_teardown(test_read_secret_file, make_tmpdir, remove_tmpdir),
        cmocka_unit_test_setup_teardown(test_config_load_file, make_tmpdir, remove_tmpdir),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
