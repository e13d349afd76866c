/*
 * Unit tests for src/common/log.h: the text and JSON line formats written to
 * a log file, escaping (quotes, controls, bytes that are not UTF-8), request
 * lines, levels, and a reopen after the file was moved away.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/log.h"

static char dir[] = "/tmp/p11kms-test-log-XXXXXX";
static char path[256];

static int setup(void **state)
{
    (void)state;
    if (!mkdtemp(dir))
        return -1;
    snprintf(path, sizeof path, "%s/p11kmsd.log", dir);
    return 0;
}

static int teardown(void **state)
{
    char moved[300];
    (void)state;
    kms_log_close();
    snprintf(moved, sizeof moved, "%s.1", path);
    unlink(path);
    unlink(moved);
    rmdir(dir);
    return 0;
}

/* The file's lines; the caller frees each and the array. */
static size_t read_lines(char ***out)
{
    FILE *f = fopen(path, "r");
    char **lines = NULL, *line = NULL;
    size_t n = 0, cap = 0;
    assert_non_null(f);
    while (getline(&line, &cap, f) > 0) {
        line[strcspn(line, "\n")] = '\0';
        lines = realloc(lines, (n + 1) * sizeof *lines);
        assert_non_null(lines);
        lines[n++] = strdup(line);
    }
    free(line);
    fclose(f);
    *out = lines;
    return n;
}

static void free_lines(char **lines, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(lines[i]);
    free(lines);
}

static void fresh_log(enum kms_log_format format)
{
    unlink(path);
    kms_log_set_format(format);
    kms_log_set_level(KMS_LOG_INFO);
    assert_int_equal(kms_log_open(path), KMS_OK);
}

static void test_text_lines(void **state)
{
    char **lines;
    (void)state;
    fresh_log(KMS_LOG_TEXT);
    kms_info("key store opened: %d keys", 3);
    kms_debug("not at level info");
    struct kms_log_request r = {
        "id-1", "alice", "Decrypt", "arn:k", 400, "InvalidCiphertextException", 1234};
    kms_log_request(&r);
    size_t n = read_lines(&lines);
    assert_int_equal(n, 2);
    /* "2026-12-06T23:53:07Z p11kmsd info: ..." */
    assert_int_equal(strlen(lines[0]) > 21, 1);
    assert_int_equal(lines[0][4], '-');
    assert_int_equal(lines[0][10], 'T');
    assert_int_equal(lines[0][19], 'Z');
    assert_string_equal(lines[0] + 21, "p11kmsd info: key store opened: 3 keys");
    assert_string_equal(lines[1] + 21, "p11kmsd info: Decrypt by alice on arn:k: 400 "
                                       "InvalidCiphertextException in 1.234 ms (request id-1)");
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0640);
    free_lines(lines, n);
}

static void test_json_escaping(void **state)
{
    char **lines;
    json_error_t err;
    (void)state;
    fresh_log(KMS_LOG_JSON);
    kms_warn("quote \" backslash \\ tab\t newline\n bell\a bad \xff\xfe end \xc3\xa9");
    size_t n = read_lines(&lines);
    assert_int_equal(n, 1);
    json_t *o = json_loads(lines[0], 0, &err);
    assert_non_null(o);
    assert_string_equal(json_string_value(json_object_get(o, "level")), "warn");
    assert_string_equal(json_string_value(json_object_get(o, "message")),
                        "quote \" backslash \\ tab\t newline\n bell\a bad "
                        "\xef\xbf\xbd\xef\xbf\xbd end \xc3\xa9");
    const char *t = json_string_value(json_object_get(o, "time"));
    assert_non_null(t);
    assert_int_equal(strlen(t), 24); /* 2026-12-06T23:53:54.709Z */
    assert_int_equal(t[23], 'Z');
    assert_int_equal(json_object_size(o), 3);
    json_decref(o);
    free_lines(lines, n);
}

static void test_json_request_line(void **state)
{
    char **lines;
    json_error_t err;
    (void)state;
    fresh_log(KMS_LOG_JSON);
    struct kms_log_request ok = {"id-2", "alice", "GenerateDataKey", "arn:aws:kms:k", 200,
                                 NULL,   5022};
    struct kms_log_request refused = {"id-3", "", NULL, NULL, 413, "RequestTooLarge", 7};
    kms_log_request(&ok);
    kms_log_request(&refused);
    kms_log_set_level(KMS_LOG_WARN);
    kms_log_request(&ok); /* below the level: no line */
    size_t n = read_lines(&lines);
    assert_int_equal(n, 2);
    json_t *o = json_loads(lines[0], 0, &err);
    assert_non_null(o);
    assert_string_equal(json_string_value(json_object_get(o, "message")),
                        "GenerateDataKey by alice: 200 ok");
    assert_string_equal(json_string_value(json_object_get(o, "request_id")), "id-2");
    assert_string_equal(json_string_value(json_object_get(o, "principal")), "alice");
    assert_string_equal(json_string_value(json_object_get(o, "operation")), "GenerateDataKey");
    assert_string_equal(json_string_value(json_object_get(o, "key")), "arn:aws:kms:k");
    assert_int_equal(json_integer_value(json_object_get(o, "status")), 200);
    assert_null(json_object_get(o, "error"));
    assert_true(json_real_value(json_object_get(o, "duration_ms")) == 5.022);
    json_decref(o);
    o = json_loads(lines[1], 0, &err);
    assert_non_null(o);
    assert_string_equal(json_string_value(json_object_get(o, "message")),
                        "- by -: 413 RequestTooLarge");
    assert_null(json_object_get(o, "principal"));
    assert_null(json_object_get(o, "operation"));
    assert_null(json_object_get(o, "key"));
    assert_string_equal(json_string_value(json_object_get(o, "error")), "RequestTooLarge");
    assert_true(json_real_value(json_object_get(o, "duration_ms")) == 0.007);
    json_decref(o);
    free_lines(lines, n);
}

static void test_reopen(void **state)
{
    char **lines, moved[300];
    (void)state;
    fresh_log(KMS_LOG_TEXT);
    kms_info("before");
    snprintf(moved, sizeof moved, "%s.1", path);
    assert_int_equal(rename(path, moved), 0);
    kms_info("moved");
    assert_int_equal(kms_log_reopen(), KMS_OK);
    kms_info("after");
    size_t n = read_lines(&lines);
    assert_int_equal(n, 1);
    assert_string_equal(lines[0] + 21, "p11kmsd info: after");
    free_lines(lines, n);
    unlink(moved);
}

static void test_open_refused(void **state)
{
    (void)state;
    assert_int_equal(kms_log_open("/nonexistent/folder/p11kmsd.log"), KMS_ERR_VALIDATION);
    assert_string_equal(kms_err_message(),
                        "log_file /nonexistent/folder/p11kmsd.log: cannot open it: No such file "
                        "or directory");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_text_lines),        cmocka_unit_test(test_json_escaping),
        cmocka_unit_test(test_json_request_line), cmocka_unit_test(test_reopen),
        cmocka_unit_test(test_open_refused),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
