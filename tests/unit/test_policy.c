/*
 * Unit tests for src/server/policy.h: the key-policy parser (every malformed
 * case with its exact error code and a message naming the statement and the
 * member), the evaluator (principals, actions, resources, conditions, Deny
 * over Allow), the default policy and the glob matcher.
 *
 * Policies are written with ' for " to stay readable; policy() swaps them.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "server/policy.h"

#define N_ELEMS(a) (sizeof(a) / sizeof((a)[0]))

#define ACCOUNT "111122223333"
#define OTHER_ACCOUNT "444455556666"
#define KEY_ARN "arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab"
#define OTHER_KEY_ARN "arn:aws:kms:eu-west-1:111122223333:key/99999999-12ab-34cd-56ef-1234567890ab"

#define IMPLICIT KMS_POLICY_IMPLICIT_DENY
#define ALLOW KMS_POLICY_ALLOW
#define DENY KMS_POLICY_EXPLICIT_DENY

/* A statement that parses, for documents that test something else. */
#define GOOD_STATEMENT \
    "{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':'kms:Decrypt','Resource':'*'}"

/* ---- helpers ---------------------------------------------------------------------- */

/* text with every ' turned into ", malloc'd */
static char *dq(const char *text)
{
    char *s = strdup(text);
    assert_non_null(s);
    for (char *p = s; *p; p++)
        if (*p == '\'')
            *p = '"';
    return s;
}

static int valid_utf8(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        size_t len = *p < 0x80             ? 1
                     : (*p & 0xe0) == 0xc0 ? 2
                     : (*p & 0xf0) == 0xe0 ? 3
                     : (*p & 0xf8) == 0xf0 ? 4
                                           : 0;
        if (len == 0)
            return 0;
        for (size_t i = 1; i < len; i++)
            if ((p[i] & 0xc0) != 0x80)
                return 0;
        p += len;
    }
    return 1;
}

static struct kms_policy *policy(const char *text)
{
    struct kms_policy *p = NULL;
    char *doc = dq(text);
    kms_err rc = kms_policy_parse(doc, strlen(doc), ACCOUNT, &p);
    if (rc != KMS_OK)
        fail_msg("policy refused (%d: %s): %s", (int)rc, kms_err_message(), doc);
    free(doc);
    assert_non_null(p);
    return p;
}

/* A document of the given statements (an array's contents). */
static struct kms_policy *statements(const char *list)
{
    char doc[8192];
    snprintf(doc, sizeof doc, "{'Version':'2012-10-17','Statement':[%s]}", list);
    return policy(doc);
}

static void expect_message(const char *want)
{
    if (want && strstr(kms_err_message(), want) == NULL)
        fail_msg("message \"%s\" does not contain \"%s\"", kms_err_message(), want);
    if (!valid_utf8(kms_err_message()))
        fail_msg("message \"%s\" is not valid UTF-8", kms_err_message());
}

/* Parses len bytes, expecting KMS_ERR_MALFORMED_POLICY with a message holding want1 and want2. */
static void expect_malformed_bytes(const char *doc, size_t len, const char *want1,
                                   const char *want2)
{
    struct kms_policy *p = (struct kms_policy *)&p; /* must be reset to NULL */
    kms_err_clear();
    kms_err rc = kms_policy_parse(doc, len, ACCOUNT, &p);
    if (rc != KMS_ERR_MALFORMED_POLICY)
        fail_msg("got %d (%s), want KMS_ERR_MALFORMED_POLICY for %.*s", (int)rc, kms_err_message(),
                 (int)len, doc);
    assert_null(p);
    expect_message(want1);
    expect_message(want2);
}

static void expect_malformed(const char *text, const char *want1, const char *want2)
{
    char *doc = dq(text);
    expect_malformed_bytes(doc, strlen(doc), want1, want2);
    free(doc);
}

static struct kms_context_pair pair(const char *key, const char *value)
{
    struct kms_context_pair p = {key, strlen(key), value, strlen(value)};
    return p;
}

static enum kms_policy_decision decide_as(const struct kms_policy *p, const char *account,
                                          const char *principal, const char *action,
                                          const struct kms_context_pair *ctx, size_t n)
{
    struct kms_policy_request r = {principal, account, action, KEY_ARN, ctx, n};
    char why[64];
    return kms_policy_evaluate(p, &r, why, sizeof why);
}

static enum kms_policy_decision decide(const struct kms_policy *p, const char *principal,
                                       const char *action)
{
    return decide_as(p, ACCOUNT, principal, action, NULL, 0);
}

/* Decrypt by alice with the given context. */
static enum kms_policy_decision decrypt_with(const struct kms_policy *p,
                                             const struct kms_context_pair *ctx, size_t n)
{
    return decide_as(p, ACCOUNT, "alice", "kms:Decrypt", ctx, n);
}

/* Allows alice kms:Decrypt under the given Condition object. */
static struct kms_policy *decrypt_if(const char *condition)
{
    char st[4096];
    snprintf(st, sizeof st,
             "{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':'kms:Decrypt',"
             "'Resource':'*','Condition':%s}",
             condition);
    return statements(st);
}

static const char *const all_operations[] = {
    "Encrypt",
    "Decrypt",
    "ReEncryptFrom",
    "ReEncryptTo",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "DescribeKey",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "GetKeyRotationStatus",
    "RotateKeyOnDemand",
    "ListKeyRotations",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "PutKeyPolicy",
    "GetKeyPolicy",
    "CreateGrant",
    "ListGrants",
    "RevokeGrant",
    "RetireGrant",
};

static void kms_action(char *out, size_t n, const char *op)
{
    snprintf(out, n, "kms:%s", op);
}

/* ---- the error code ------------------------------------------------------------- */

static void test_error_code(void **state)
{
    (void)state;
    assert_string_equal(kms_err_type(KMS_ERR_MALFORMED_POLICY), "MalformedPolicyDocumentException");
    assert_int_equal(kms_err_status(KMS_ERR_MALFORMED_POLICY), 400);
    /* every code has a type and a status */
    for (int e = 1; e < KMS_ERR_COUNT; e++) {
        assert_true(kms_err_type((kms_err)e)[0] != '\0');
        assert_true(kms_err_status((kms_err)e) >= 400);
    }
}

/* ---- glob ---------------------------------------------------------------------- */

static void test_glob_table(void **state)
{
    static const struct {
        const char *pattern, *text;
        bool ignore_case, want;
    } cases[] = {
        {"", "", false, true},
        {"", "a", false, false},
        {"a", "", false, false},
        {"*", "", false, true},
        {"*", "abc", false, true},
        {"**", "x", false, true},
        {"a*", "abc", false, true},
        {"*c", "abc", false, true},
        {"a*c", "ac", false, true},
        {"a*c", "abdc", false, true},
        {"a*c", "abcd", false, false},
        {"?", "", false, false},
        {"?", "a", false, true},
        {"??", "a", false, false},
        {"a?c", "abc", false, true},
        {"a?c", "ac", false, false},
        {"*?*", "", false, false},
        {"*?*", "x", false, true},
        {"*a*b*c*", "xxaxxbxxcxx", false, true},
        {"*a*b*c*", "xxcxxbxxaxx", false, false},
        {"a*b?d", "aXbYbcd", false, true},
        {"a*b?d", "aXbYbccd", false, false},
        {"abc", "ABC", false, false},
        {"abc", "ABC", true, true},
        {"A*C", "abxc", true, true},
        {"GenerateDataKey*", "GenerateDataKeyWithoutPlaintext", false, true},
        {"GenerateDataKey*", "GenerateDataKe", false, false},
        /* '?' is one UTF-8 character; case folding is ASCII only */
        {"?", "\xc3\xa9", false, true},       /* é */
        {"??", "\xc3\xa9", false, false},     /* é is one character */
        {"t?st", "t\xc3\xa9st", false, true}, /* tést */
        {"*?", "\xc3\xa9", false, true},
        {"a*??", "a\xc3\xa9", false, false},
        {"*\xc3\xa9*", "caf\xc3\xa9x", false, true},
        {"\xc3\x89", "\xc3\xa9", true, false}, /* É is not é: ASCII folding only */
        {"?", "\xff", false, true},            /* a stray byte counts as one character */
        {"??", "\xc3", false, false},          /* so does a cut-off sequence */
        {"?\xa9", "\xc3\xa9", false, false},   /* '?' took the whole é */
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(cases); i++) {
        bool got = kms_policy_glob(cases[i].pattern, strlen(cases[i].pattern), cases[i].text,
                                   strlen(cases[i].text), cases[i].ignore_case);
        if (got != cases[i].want)
            fail_msg("glob(\"%s\", \"%s\", %d) = %d, want %d", cases[i].pattern, cases[i].text,
                     cases[i].ignore_case, got, cases[i].want);
    }
    /* bytes with lengths, not C strings */
    assert_true(kms_policy_glob("a?b", 3, "a\0b", 3, false));
    assert_true(kms_policy_glob("ab*", 2, "abc", 2, false));
    assert_false(kms_policy_glob("abc", 3, "abcdef", 2, false));
}

static double seconds_since(const struct timespec *t0)
{
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    return (double)(t1.tv_sec - t0->tv_sec) + (double)(t1.tv_nsec - t0->tv_nsec) / 1e9;
}

static void test_glob_pathological(void **state)
{
    enum { N = 100000 };
    char *a = malloc(N + 1), *stars = malloc(2 * 1000 + 2);
    struct timespec t0;
    (void)state;

    assert_non_null(a);
    assert_non_null(stars);
    memset(a, 'a', N);
    a[N] = '\0';
    /* "*a*a...*a" then "b": a thousand stars */
    for (int i = 0; i < 1000; i++)
        memcpy(stars + 2 * i, "*a", 2);
    memcpy(stars + 2000, "b", 2);

    clock_gettime(CLOCK_MONOTONIC, &t0);
    /* Exponential backtracking would not finish any of these. */
    assert_false(kms_policy_glob("a*a*a*a*b", 9, a, N, false));
    assert_true(kms_policy_glob("a*a*a*a*a", 9, a, N, false));
    assert_false(kms_policy_glob("*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b", 30, a, N, true));
    assert_false(kms_policy_glob("?*?*?*?*?*?*?*?*b", 17, a, N, false));
    assert_false(kms_policy_glob("*aaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", 32, a, N, false));
    assert_true(kms_policy_glob("*aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 32, a, N, false));
    assert_false(kms_policy_glob(stars, strlen(stars), a, 10000, false));
    stars[2000] = '\0';
    assert_true(kms_policy_glob(stars, strlen(stars), a, 10000, false));
    double took = seconds_since(&t0);
    if (took > 2.0)
        fail_msg("pathological globs took %.3f s", took);
    free(a);
    free(stars);
}

/* ---- parsing: what is accepted ------------------------------------------------------ */

static void test_parse_accepted_forms(void **state)
{
    static const char *const docs[] = {
        /* Statement as a single object, no Version */
        "{'Statement':" GOOD_STATEMENT "}",
        "{'Version':'2008-10-17','Statement':[" GOOD_STATEMENT "]}",
        "{'Version':'2012-10-17','Id':'key-policy-1','Statement':[" GOOD_STATEMENT "]}",
        /* whitespace, members in any order, Principal "*", arrays everywhere */
        "  {\n 'Statement' : [ { 'Resource' : ['*'], 'Action' : ['kms:Decrypt'],\n"
        "  'Principal' : '*', 'Effect' : 'Allow', 'Sid' : 'S' } ],\n 'Version':'2012-10-17' } \n",
        "{'Statement':{'Effect':'Allow','Principal':{'AWS':['alice','bob']},"
        "'Action':['kms:Encrypt','kms:Decrypt'],'Resource':'" KEY_ARN "'}}",
        /* a name with every allowed character */
        "{'Statement':{'Effect':'Allow','Principal':{'AWS':'a.b@c+d=e,f-g_h9'},"
        "'Action':'kms:Decrypt','Resource':'*'}}",
        /* principals of another account: valid, they just match no one here */
        "{'Statement':{'Effect':'Allow','Principal':{'AWS':'arn:aws:iam::" OTHER_ACCOUNT
        ":root'},'Action':'kms:Decrypt','Resource':'*'}}",
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(docs); i++) {
        struct kms_policy *p = policy(docs[i]);
        kms_policy_free(p);
    }
    kms_policy_free(NULL);
}

static void test_parse_document_errors(void **state)
{
    static const struct {
        const char *doc, *want1, *want2;
    } cases[] = {
        {"", "not valid JSON", NULL},
        {"{'Statement':", "not valid JSON", NULL},
        {"'x'", "not valid JSON", NULL},
        {"{} x", "not valid JSON", NULL},
        {"[]", "the policy must be a JSON object", NULL},
        {"[" GOOD_STATEMENT "]", "the policy must be a JSON object", NULL},
        {"{'Version':'2012-10-17','Version':'2012-10-17','Statement':" GOOD_STATEMENT "}",
         "not valid JSON", "duplicate"},
        {"{'Statement':{'Effect':'Allow','Effect':'Deny','Principal':'*','Action':'kms:*',"
         "'Resource':'*'}}",
         "not valid JSON", "duplicate"},
        {"{'Foo':1,'Statement':" GOOD_STATEMENT "}", "policy: unknown member \"Foo\"", NULL},
        {"{'statement':" GOOD_STATEMENT "}", "policy: unknown member \"statement\"", NULL},
        {"{'Version':'2012-10-18','Statement':" GOOD_STATEMENT "}", "policy: Version must be",
         NULL},
        {"{'Version':'','Statement':" GOOD_STATEMENT "}", "policy: Version must be", NULL},
        {"{'Version':2012,'Statement':" GOOD_STATEMENT "}", "policy: Version must be", NULL},
        {"{'Id':'','Statement':" GOOD_STATEMENT "}", "policy: Id must be a non-empty string", NULL},
        {"{'Id':5,'Statement':" GOOD_STATEMENT "}", "policy: Id must be a non-empty string", NULL},
        {"{}", "policy: Statement is missing", NULL},
        {"{'Version':'2012-10-17'}", "policy: Statement is missing", NULL},
        {"{'Statement':[]}", "policy: Statement must be an object or a non-empty array", NULL},
        {"{'Statement':'x'}", "policy: Statement must be an object or a non-empty array", NULL},
        {"{'Statement':null}", "policy: Statement must be an object or a non-empty array", NULL},
        {"{'Statement':[1]}", "Statement #0 must be an object", NULL},
        {"{'Statement':[" GOOD_STATEMENT ",[]]}", "Statement #1 must be an object", NULL},
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(cases); i++)
        expect_malformed(cases[i].doc, cases[i].want1, cases[i].want2);
    /* an exact message */
    expect_malformed("{'Statement':{'Effect':'Allow','Principal':'*','Action':'kms:Foo',"
                     "'Resource':'*'}}",
                     NULL, NULL);
    assert_string_equal(kms_err_message(), "Statement #0: Action \"kms:Foo\" matches no operation");
}

/* NUL bytes, escaped or raw, and invalid UTF-8 are refused; the message stays valid UTF-8. */
static void test_parse_bytes_refused(void **state)
{
    static const char escaped_nul[] =
        "{\"Statement\":{\"Sid\":\"a\\u0000b\",\"Effect\":\"Allow\","
        "\"Principal\":\"*\",\"Action\":\"kms:*\",\"Resource\":\"*\"}}";
    static const char raw_nul[] = "{\"Statement\":{\"Sid\":\"a\0b\",\"Effect\":\"Allow\","
                                  "\"Principal\":\"*\",\"Action\":\"kms:*\",\"Resource\":\"*\"}}";
    static const char nul_after[] = "{\"Statement\":{\"Effect\":\"Allow\",\"Principal\":\"*\","
                                    "\"Action\":\"kms:*\",\"Resource\":\"*\"}}\0";
    static const char bad_utf8[] = "{\"Statement\":{\"Sid\":\"\xff\xfe\",\"Effect\":\"Allow\","
                                   "\"Principal\":\"*\",\"Action\":\"kms:*\",\"Resource\":\"*\"}}";
    static const char cut_utf8[] = "{\"Statement\":{\"Sid\":\"\xc3\",\"Effect\":\"Allow\","
                                   "\"Principal\":\"*\",\"Action\":\"kms:*\",\"Resource\":\"*\"}}";
    (void)state;
    expect_malformed_bytes(escaped_nul, sizeof escaped_nul - 1, "not valid JSON", NULL);
    expect_malformed_bytes(raw_nul, sizeof raw_nul - 1, "not valid JSON", NULL);
    expect_malformed_bytes(nul_after, sizeof nul_after - 1, "not valid JSON", NULL);
    expect_malformed_bytes(bad_utf8, sizeof bad_utf8 - 1, "not valid JSON", NULL);
    expect_malformed_bytes(cut_utf8, sizeof cut_utf8 - 1, "not valid JSON", NULL);
    /* text need not be NUL-terminated: only len bytes are read */
    struct kms_policy *p = NULL;
    assert_int_equal(kms_policy_parse(nul_after, sizeof nul_after - 2, ACCOUNT, &p), KMS_OK);
    kms_policy_free(p);
}

static void test_parse_statement_errors(void **state)
{
#define ST(rest) "{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':'kms:Decrypt'," rest "}"
#define WITH_PRINCIPAL(pr) "{'Effect':'Allow','Principal':" pr ",'Action':'kms:*','Resource':'*'}"
#define WITH_ACTION(ac) "{'Effect':'Allow','Principal':'*','Action':" ac ",'Resource':'*'}"
#define WITH_RESOURCE(rs) "{'Effect':'Allow','Principal':'*','Action':'kms:*','Resource':" rs "}"
#define WITH_CONDITION(c) ST("'Resource':'*','Condition':" c)
    static const struct {
        const char *statement, *want;
    } cases[] = {
        {ST("'Resource':'*','Foo':1"), "Statement #0: unknown member \"Foo\""},
        {ST("'Resource':'*','effect':'Allow'"), "Statement #0: unknown member \"effect\""},
        {ST("'Resource':'*','NotPrincipal':{'AWS':'bob'}"),
         "Statement #0: NotPrincipal is not supported"},
        {ST("'Resource':'*','NotAction':'kms:Encrypt'"),
         "Statement #0: NotAction is not supported"},
        {ST("'Resource':'*','NotResource':'*'"), "Statement #0: NotResource is not supported"},
        {ST("'Resource':'*','Sid':''"), "Statement #0: Sid must be a non-empty string"},
        {ST("'Resource':'*','Sid':5"), "Statement #0: Sid must be a non-empty string"},
        {ST("'Resource':'*','Sid':'a\\nb'"), "Statement #0: Sid must be a non-empty string"},
        /* Effect */
        {"{'Principal':'*','Action':'kms:*','Resource':'*'}", "Statement #0: Effect is missing"},
        {"{'Effect':'allow','Principal':'*','Action':'kms:*','Resource':'*'}",
         "Statement #0: Effect must be \"Allow\" or \"Deny\""},
        {"{'Effect':['Allow'],'Principal':'*','Action':'kms:*','Resource':'*'}",
         "Statement #0: Effect must be \"Allow\" or \"Deny\""},
        {"{'Effect':'','Principal':'*','Action':'kms:*','Resource':'*'}",
         "Statement #0: Effect must be \"Allow\" or \"Deny\""},
        /* Principal */
        {"{'Effect':'Allow','Action':'kms:*','Resource':'*'}",
         "Statement #0: Principal is missing"},
        {WITH_PRINCIPAL("'alice'"), "Statement #0: Principal must be \"*\" or {\"AWS\""},
        {WITH_PRINCIPAL("{}"), "Statement #0: Principal must be \"*\" or {\"AWS\""},
        {WITH_PRINCIPAL("['*']"), "Statement #0: Principal must be \"*\" or {\"AWS\""},
        {WITH_PRINCIPAL("{'Service':'kms.amazonaws.com'}"),
         "Statement #0: Principal \"Service\" is not supported"},
        {WITH_PRINCIPAL("{'AWS':'alice','Federated':'x'}"),
         "Statement #0: Principal \"Federated\" is not supported"},
        {WITH_PRINCIPAL("{'aws':'alice'}"), "Statement #0: Principal \"aws\" is not supported"},
        {WITH_PRINCIPAL("{'AWS':[]}"),
         "Statement #0: Principal AWS must be a string or a non-empty array of strings"},
        {WITH_PRINCIPAL("{'AWS':5}"),
         "Statement #0: Principal AWS must be a string or a non-empty array of strings"},
        {WITH_PRINCIPAL("{'AWS':['alice',5]}"),
         "Statement #0: Principal AWS must be a string or a non-empty array of strings"},
        {WITH_PRINCIPAL("{'AWS':''}"), "Statement #0: Principal \"\" is not a principal name"},
        {WITH_PRINCIPAL("{'AWS':'bad name'}"),
         "Statement #0: Principal \"bad name\" is not a principal name"},
        {WITH_PRINCIPAL("{'AWS':'al*'}"), "Principal \"al*\" is not a principal name"},
        {WITH_PRINCIPAL(
             "{'AWS':'x1234567890123456789012345678901234567890123456789012345678901234'}"),
         "is not a principal name"},
        {WITH_PRINCIPAL("{'AWS':'" ACCOUNT "'}"),
         "Statement #0: Principal \"111122223333\" is ambiguous"},
        {WITH_PRINCIPAL("{'AWS':'arn:aws:iam::1234:root'}"),
         "Principal \"arn:aws:iam::1234:root\" is not arn:aws:iam::<12-digit account>"},
        {WITH_PRINCIPAL("{'AWS':'arn:aws:sts::" ACCOUNT ":assumed-role/r/s'}"),
         "is not arn:aws:iam::<12-digit account>"},
        {WITH_PRINCIPAL("{'AWS':'arn:aws-cn:iam::" ACCOUNT ":root'}"),
         "is not arn:aws:iam::<12-digit account>"},
        {WITH_PRINCIPAL("{'AWS':'arn:aws:iam::" ACCOUNT ":role/admin'}"),
         "Principal \"arn:aws:iam::111122223333:role/admin\" is not supported"},
        {WITH_PRINCIPAL("{'AWS':'arn:aws:iam::" ACCOUNT ":user/'}"), "is not supported"},
        {WITH_PRINCIPAL("{'AWS':'arn:aws:iam::" ACCOUNT ":user/a*'}"), "is not supported"},
        {WITH_PRINCIPAL("{'AWS':'arn:aws:iam::" ACCOUNT ":user/path/alice'}"), "is not supported"},
        {WITH_PRINCIPAL("{'AWS':'arn:aws:iam::" ACCOUNT ":Root'}"), "is not supported"},
        /* Action */
        {"{'Effect':'Allow','Principal':'*','Resource':'*'}", "Statement #0: Action is missing"},
        {WITH_ACTION("[]"), "Statement #0: Action must be a string or a non-empty array"},
        {WITH_ACTION("5"), "Statement #0: Action must be a string or a non-empty array"},
        {WITH_ACTION("{}"), "Statement #0: Action must be a string or a non-empty array"},
        {WITH_ACTION("''"), "Statement #0: Action \"\" does not start with kms:"},
        {WITH_ACTION("'Decrypt'"), "Statement #0: Action \"Decrypt\" does not start with kms:"},
        {WITH_ACTION("'iam:*'"), "Statement #0: Action \"iam:*\" does not start with kms:"},
        {WITH_ACTION("'kms:Foo'"), "Statement #0: Action \"kms:Foo\" matches no operation"},
        {WITH_ACTION("'kms:'"), "Statement #0: Action \"kms:\" matches no operation"},
        {WITH_ACTION("'kms:GenerateRandom'"), "Action \"kms:GenerateRandom\" matches no operation"},
        {WITH_ACTION("'kms:ImportKeyMaterial'"),
         "Action \"kms:ImportKeyMaterial\" matches no operation"},
        {WITH_ACTION("'kms:Decrypt '"), "Action \"kms:Decrypt \" matches no operation"},
        {WITH_ACTION("['kms:Decrypt','kms:Decrypt2']"),
         "Action \"kms:Decrypt2\" matches no operation"},
        /* Resource */
        {"{'Effect':'Allow','Principal':'*','Action':'kms:*'}",
         "Statement #0: Resource is missing"},
        {WITH_RESOURCE("'key/abc'"), "Statement #0: Resource \"key/abc\" is neither"},
        {WITH_RESOURCE("''"), "Statement #0: Resource \"\" is neither"},
        {WITH_RESOURCE("['*','**']"), "Statement #0: Resource \"**\" is neither"},
        {WITH_RESOURCE("[]"), "Statement #0: Resource must be a string or a non-empty array"},
        {WITH_RESOURCE("true"), "Statement #0: Resource must be a string or a non-empty array"},
        /* Condition: shape */
        {WITH_CONDITION("{}"), "Statement #0: Condition must be a non-empty object"},
        {WITH_CONDITION("'x'"), "Statement #0: Condition must be a non-empty object"},
        {WITH_CONDITION("[]"), "Statement #0: Condition must be a non-empty object"},
        {WITH_CONDITION("{'StringEquals':{}}"),
         "Statement #0: Condition StringEquals must be a non-empty object of keys"},
        {WITH_CONDITION("{'StringEquals':'x'}"),
         "Statement #0: Condition StringEquals must be a non-empty object of keys"},
        /* Condition: operators */
        {WITH_CONDITION("{'StringEqualz':{'kms:CallerAccount':'1'}}"),
         "Statement #0: Condition operator \"StringEqualz\" is not supported"},
        {WITH_CONDITION("{'stringequals':{'kms:CallerAccount':'1'}}"),
         "Condition operator \"stringequals\" is not supported"},
        {WITH_CONDITION("{'StringEqualsIfExists':{'kms:CallerAccount':'1'}}"),
         "Condition operator \"StringEqualsIfExists\" is not supported"},
        {WITH_CONDITION("{'NumericEquals':{'kms:CallerAccount':'1'}}"),
         "Condition operator \"NumericEquals\" is not supported"},
        {WITH_CONDITION("{'ForAllValues:Null':{'kms:EncryptionContextKeys':'true'}}"),
         "Condition operator \"ForAllValues:Null\" is not supported"},
        {WITH_CONDITION("{'ForAnyValue:Bool':{'kms:EncryptionContextKeys':'true'}}"),
         "Condition operator \"ForAnyValue:Bool\" is not supported"},
        {WITH_CONDITION("{'ForAllValues:StringFoo':{'kms:EncryptionContextKeys':'a'}}"),
         "Condition operator \"ForAllValues:StringFoo\" is not supported"},
        {WITH_CONDITION("{'ForAllValues:':{'kms:EncryptionContextKeys':'a'}}"),
         "Condition operator \"ForAllValues:\" is not supported"},
        /* Condition: keys */
        {WITH_CONDITION("{'StringEquals':{'kms:Foo':'x'}}"),
         "Statement #0: Condition StringEquals: key \"kms:Foo\" is not supported"},
        {WITH_CONDITION("{'StringEquals':{'aws:PrincipalArn':'x'}}"),
         "key \"aws:PrincipalArn\" is not supported"},
        {WITH_CONDITION("{'StringEquals':{'kms:EncryptionContext':'x'}}"),
         "key \"kms:EncryptionContext\" is not supported"},
        {WITH_CONDITION("{'StringEquals':{'kms:EncryptionContext:':'x'}}"),
         "Statement #0: Condition StringEquals: key \"kms:EncryptionContext:\" names no "
         "encryption context key"},
        {WITH_CONDITION("{'StringEquals':{'kms:EncryptionContextKeys':'x'}}"),
         "Condition StringEquals: key \"kms:EncryptionContextKeys\" has many values: use "
         "ForAllValues:StringEquals or ForAnyValue:StringEquals"},
        {WITH_CONDITION("{'Bool':{'kms:EncryptionContextKeys':'true'}}"),
         "Condition Bool: key \"kms:EncryptionContextKeys\" has many values: Bool does not apply"},
        {WITH_CONDITION("{'ForAllValues:StringEquals':{'kms:EncryptionContext:t':'x'}}"),
         "Condition ForAllValues:StringEquals: key \"kms:EncryptionContext:t\" has one value"},
        {WITH_CONDITION("{'ForAnyValue:StringLike':{'aws:username':'x'}}"),
         "key \"aws:username\" has one value"},
        /* Condition: values */
        {WITH_CONDITION("{'StringEquals':{'kms:EncryptionContext:t':5}}"),
         "Statement #0: Condition StringEquals: key \"kms:EncryptionContext:t\" takes a string "
         "or a non-empty array of strings"},
        {WITH_CONDITION("{'StringEquals':{'kms:EncryptionContext:t':[]}}"),
         "key \"kms:EncryptionContext:t\" takes a string or a non-empty array of strings"},
        {WITH_CONDITION("{'StringEquals':{'kms:EncryptionContext:t':['a',5]}}"),
         "key \"kms:EncryptionContext:t\" takes a string or a non-empty array of strings"},
        {WITH_CONDITION("{'StringEquals':{'kms:EncryptionContext:t':{}}}"),
         "key \"kms:EncryptionContext:t\" takes a string or a non-empty array of strings"},
        {WITH_CONDITION("{'StringEquals':{'kms:EncryptionContext:t':true}}"),
         "key \"kms:EncryptionContext:t\" takes a string or a non-empty array of strings"},
        {WITH_CONDITION("{'StringEquals':{'kms:EncryptionContext:t':null}}"),
         "key \"kms:EncryptionContext:t\" takes a string or a non-empty array of strings"},
        {WITH_CONDITION("{'Null':{'kms:EncryptionContext:t':'maybe'}}"),
         "Statement #0: Condition Null: key \"kms:EncryptionContext:t\" takes \"true\" or "
         "\"false\", not \"maybe\""},
        {WITH_CONDITION("{'Null':{'kms:EncryptionContext:t':'True'}}"),
         "takes \"true\" or \"false\", not \"True\""},
        {WITH_CONDITION("{'Null':{'kms:EncryptionContext:t':5}}"),
         "Condition Null: key \"kms:EncryptionContext:t\" takes \"true\", \"false\" or an array"},
        {WITH_CONDITION("{'Bool':{'kms:EncryptionContext:t':'yes'}}"),
         "Condition Bool: key \"kms:EncryptionContext:t\" takes \"true\" or \"false\", not "
         "\"yes\""},
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(cases); i++) {
        char doc[4096];
        snprintf(doc, sizeof doc, "{'Statement':[%s]}", cases[i].statement);
        expect_malformed(doc, cases[i].want, NULL);
        /* the second statement is named #1 */
        snprintf(doc, sizeof doc, "{'Statement':[" GOOD_STATEMENT ",%s]}", cases[i].statement);
        expect_malformed(doc, strstr(cases[i].want, "Statement #0") ? "Statement #1" : NULL, NULL);
    }
#undef ST
#undef WITH_PRINCIPAL
#undef WITH_ACTION
#undef WITH_RESOURCE
#undef WITH_CONDITION
}

static void test_parse_errors_name_the_sid(void **state)
{
    (void)state;
    expect_malformed("{'Statement':[" GOOD_STATEMENT ",{'Sid':'Second','Effect':'allow',"
                     "'Principal':'*','Action':'kms:*','Resource':'*'}]}",
                     "Statement #1 (\"Second\"): Effect must be", NULL);
    /* non-ASCII Sids are shown as they are, long ones clipped on a character boundary */
    expect_malformed("{'Statement':{'Sid':'Zugriff f\xc3\xbcr alle','Effect':'Allow',"
                     "'Principal':'*','Action':'kms:Nope','Resource':'*'}}",
                     "Statement #0 (\"Zugriff f\xc3\xbcr alle\"): Action \"kms:Nope\"", NULL);
    expect_malformed("{'Statement':{'Sid':'\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3"
                     "\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9"
                     "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9',"
                     "'Effect':'Allow','Principal':'*','Action':'kms:Nope','Resource':'*'}}",
                     "Statement #0 (\"", "\"): Action \"kms:Nope\" matches no operation");
    /* Sids must differ */
    expect_malformed("{'Statement':[{'Sid':'A','Effect':'Allow','Principal':'*','Action':'kms:*',"
                     "'Resource':'*'},{'Sid':'A','Effect':'Deny','Principal':'*',"
                     "'Action':'kms:*','Resource':'*'}]}",
                     "Statement #1 (\"A\"): Sid is the same as Statement #0's", NULL);
}

static void test_parse_size_limit(void **state)
{
    char *doc = malloc(KMS_POLICY_MAX_LEN + 2);
    char *head = dq("{'Statement':" GOOD_STATEMENT "}");
    struct kms_policy *p = NULL;
    size_t n = strlen(head);
    (void)state;

    assert_non_null(doc);
    memcpy(doc, head, n);
    memset(doc + n, ' ', KMS_POLICY_MAX_LEN + 1 - n); /* trailing whitespace is valid JSON */
    doc[KMS_POLICY_MAX_LEN + 1] = '\0';
    assert_int_equal(kms_policy_parse(doc, KMS_POLICY_MAX_LEN, ACCOUNT, &p), KMS_OK);
    assert_int_equal(decide(p, "alice", "kms:Decrypt"), ALLOW);
    kms_policy_free(p);
    expect_malformed_bytes(doc, KMS_POLICY_MAX_LEN + 1,
                           "the policy is 32769 bytes, more than 32768", NULL);
    free(head);
    free(doc);
}

/* ---- the glob matcher against a plain reference ------------------------------------ */

static size_t ref_char_len(const char *s, size_t n)
{
    unsigned char c = (unsigned char)s[0];
    size_t len = c < 0xc0 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : c < 0xf8 ? 4 : 1;
    if (len > n)
        return 1;
    for (size_t k = 1; k < len; k++)
        if (((unsigned char)s[k] & 0xc0) != 0x80)
            return 1;
    return len;
}

static int ref_fold(int c)
{
    return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c;
}

/* policy.h's definition of a match, word for word, by backtracking (small inputs only). */
static bool ref_glob(const char *p, size_t pn, const char *t, size_t tn, bool ic)
{
    if (pn == 0)
        return tn == 0;
    if (p[0] == '*') {
        for (size_t k = 0;; k += ref_char_len(t + k, tn - k)) {
            if (ref_glob(p + 1, pn - 1, t + k, tn - k, ic))
                return true;
            if (k == tn)
                return false;
        }
    }
    if (tn == 0)
        return false;
    if (p[0] == '?') {
        size_t len = ref_char_len(t, tn);
        return ref_glob(p + 1, pn - 1, t + len, tn - len, ic);
    }
    int a = (unsigned char)p[0], b = (unsigned char)t[0];
    if (ic ? ref_fold(a) != ref_fold(b) : a != b)
        return false;
    return ref_glob(p + 1, pn - 1, t + 1, tn - 1, ic);
}

static uint32_t rng_state = 0x12345678u;
static uint32_t rng(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

static void random_string(char *out, size_t *n, size_t max, const char *alphabet, size_t an)
{
    *n = rng() % (max + 1);
    for (size_t i = 0; i < *n; i++)
        out[i] = alphabet[rng() % an];
}

static void test_glob_against_reference(void **state)
{
    /* ASCII either case, UTF-8 lead and continuation bytes, stray bytes */
    static const char pattern_bytes[] = "aaAb**??\xc3\xa9\xe2\x82\xac\xff";
    static const char text_bytes[] = "aaAbB*?\xc3\xa9\xe2\x82\xac\xff\x80";
    char pat[12], text[16];
    size_t pn, tn, matched = 0;
    (void)state;

    for (int i = 0; i < 40000; i++) {
        random_string(pat, &pn, sizeof pat, pattern_bytes, sizeof pattern_bytes - 1);
        random_string(text, &tn, sizeof text, text_bytes, sizeof text_bytes - 1);
        /* half the time a text made from the pattern, so that matches are common */
        if (i % 2) {
            tn = 0;
            for (size_t k = 0; k < pn && tn + 3 < sizeof text; k++) {
                if (pat[k] == '*')
                    for (uint32_t r = rng() % 3; r > 0; r--)
                        text[tn++] = text_bytes[rng() % (sizeof text_bytes - 1)];
                else
                    text[tn++] =
                        pat[k] == '?' ? text_bytes[rng() % (sizeof text_bytes - 1)] : pat[k];
            }
        }
        bool ic = rng() % 2;
        bool want = ref_glob(pat, pn, text, tn, ic);
        bool got = kms_policy_glob(pat, pn, text, tn, ic);
        matched += want;
        if (got != want)
            fail_msg("case %d: glob(\"%.*s\", \"%.*s\", %d) = %d, reference says %d", i, (int)pn,
                     pat, (int)tn, text, ic, got, want);
    }
    /* both answers are well represented */
    assert_true(matched > 4000);
    assert_true(matched < 36000);
}

/* The worst patterns at the bound cost at most one pass of the text, not one per restart. */
static void test_glob_steps_are_linear(void **state)
{
    enum { N = 8192, M = KMS_POLICY_PATTERN_MAX };
    char *a = malloc(N), *p1 = malloc(M), *p2 = malloc(M), *p3 = malloc(M);
    const unsigned long long words = M / 64 + 1;
    (void)state;

    assert_non_null(a);
    assert_non_null(p1);
    assert_non_null(p2);
    assert_non_null(p3);
    memset(a, 'a', N);
    for (size_t i = 0; i + 1 < M; i += 2)
        memcpy(p1 + i, "a*", 2); /* a*a*a*...a*b */
    p1[M - 1] = 'b';
    p2[0] = '*'; /* *aaaa...ab: a restart at every byte for a backtracking matcher */
    memset(p2 + 1, 'a', M - 2);
    p2[M - 1] = 'b';
    for (size_t i = 0; i + 1 < M; i += 2)
        memcpy(p3 + i, "?*", 2);
    p3[M - 1] = 'b';

    const char *patterns[] = {p1, p2, p3};
    for (size_t i = 0; i < N_ELEMS(patterns); i++) {
        kms_policy_glob_steps = 0;
        assert_false(kms_policy_glob(patterns[i], M, a, N, false));
        if (kms_policy_glob_steps > (unsigned long long)N * words)
            fail_msg("pattern %zu: %llu steps over %d bytes, more than %llu", i,
                     kms_policy_glob_steps, N, (unsigned long long)N * words);
    }
    /* and in a policy, through StringLike on a context value */
    char *doc = malloc(2 * M + 512);
    assert_non_null(doc);
    int n = snprintf(doc, 2 * M + 512,
                     "{\"Statement\":{\"Effect\":\"Allow\",\"Principal\":\"*\",\"Action\":"
                     "\"kms:Decrypt\",\"Resource\":\"*\",\"Condition\":{\"StringLike\":{"
                     "\"kms:EncryptionContext:k\":\"%.*s\"}}}}",
                     M, p2);
    struct kms_policy *p = NULL;
    assert_int_equal(kms_policy_parse(doc, (size_t)n, ACCOUNT, &p), KMS_OK);
    struct kms_context_pair ctx = {"k", 1, a, N};
    kms_policy_glob_steps = 0;
    assert_int_equal(decide_as(p, ACCOUNT, "alice", "kms:Decrypt", &ctx, 1), IMPLICIT);
    assert_true(kms_policy_glob_steps <= (unsigned long long)N * words);
    assert_true(kms_policy_glob_steps > 0);
    kms_policy_free(p);
    free(doc);
    free(a);
    free(p1);
    free(p2);
    free(p3);
}

/* A policy with a Resource list of n patterns of len bytes each. */
static char *resources_policy(size_t n, size_t len, size_t *out_len)
{
    size_t cap = 256 + n * (len + 3);
    char *doc = malloc(cap);
    size_t o;
    assert_non_null(doc);
    o = (size_t)snprintf(doc, cap,
                         "{\"Statement\":{\"Effect\":\"Allow\",\"Principal\":\"*\",\"Action\":"
                         "\"kms:Decrypt\",\"Resource\":[");
    for (size_t i = 0; i < n; i++) {
        o += (size_t)snprintf(doc + o, cap - o, "%s\"arn:", i ? "," : "");
        memset(doc + o, '*', len - 4);
        o += len - 4;
        doc[o++] = '"';
    }
    o += (size_t)snprintf(doc + o, cap - o, "]}}");
    *out_len = o;
    return doc;
}

static void test_pattern_limits(void **state)
{
    struct kms_policy *p = NULL;
    size_t n;
    char *doc;
    char want[128];
    (void)state;

    /* at the bounds: accepted */
    doc = resources_policy(1, KMS_POLICY_PATTERN_MAX, &n);
    assert_int_equal(kms_policy_parse(doc, n, ACCOUNT, &p), KMS_OK);
    assert_int_equal(decide(p, "alice", "kms:Decrypt"), ALLOW);
    kms_policy_free(p);
    free(doc);
    doc = resources_policy(KMS_POLICY_MAX_PATTERNS, 8, &n);
    assert_int_equal(kms_policy_parse(doc, n, ACCOUNT, &p), KMS_OK);
    kms_policy_free(p);
    free(doc);

    /* past them: refused, saying which bound */
    doc = resources_policy(1, KMS_POLICY_PATTERN_MAX + 1, &n);
    snprintf(want, sizeof want, "is %d bytes, more than %d", KMS_POLICY_PATTERN_MAX + 1,
             KMS_POLICY_PATTERN_MAX);
    expect_malformed_bytes(doc, n, "Statement #0: Resource \"arn:**", want);
    free(doc);
    doc = resources_policy(KMS_POLICY_MAX_PATTERNS + 1, 8, &n);
    snprintf(want, sizeof want, "the policy has more than %d patterns", KMS_POLICY_MAX_PATTERNS);
    expect_malformed_bytes(doc, n, "Statement #0: Resource: ", want);
    free(doc);

    /* StringLike values and Actions count too */
    char *big = malloc(KMS_POLICY_PATTERN_MAX + 2);
    char *text = malloc(KMS_POLICY_PATTERN_MAX + 512);
    assert_non_null(big);
    assert_non_null(text);
    memset(big, 'x', KMS_POLICY_PATTERN_MAX + 1);
    big[KMS_POLICY_PATTERN_MAX + 1] = '\0';
    snprintf(text, KMS_POLICY_PATTERN_MAX + 512,
             "{'Statement':{'Effect':'Allow','Principal':'*','Action':'kms:Decrypt',"
             "'Resource':'*','Condition':{'StringLike':{'kms:EncryptionContext:k':'%s'}}}}",
             big);
    expect_malformed(text, "Statement #0: Condition value \"xxx", "more than 1024");
    snprintf(text, KMS_POLICY_PATTERN_MAX + 512,
             "{'Statement':{'Effect':'Allow','Principal':'*','Action':'kms:%s',"
             "'Resource':'*'}}",
             big);
    expect_malformed(text, "Statement #0: Action \"kms:xxx", "more than 1024");
    /* StringEquals values are no patterns: not bounded but by the document */
    snprintf(text, KMS_POLICY_PATTERN_MAX + 512,
             "{'Statement':{'Effect':'Allow','Principal':'*','Action':'kms:Decrypt',"
             "'Resource':'*','Condition':{'StringEquals':{'kms:EncryptionContext:k':'%s'}}}}",
             big);
    kms_policy_free(policy(text));
    free(big);
    free(text);
}

static void test_parse_bad_arguments(void **state)
{
    struct kms_policy *p = NULL;
    char *doc = dq("{'Statement':" GOOD_STATEMENT "}");
    (void)state;
    assert_int_equal(kms_policy_parse(doc, strlen(doc), "12345", &p), KMS_ERR_INTERNAL);
    assert_int_equal(kms_policy_parse(doc, strlen(doc), "11112222333a", &p), KMS_ERR_INTERNAL);
    assert_int_equal(kms_policy_parse(doc, strlen(doc), NULL, &p), KMS_ERR_INTERNAL);
    assert_int_equal(kms_policy_parse(doc, strlen(doc), ACCOUNT, NULL), KMS_ERR_INTERNAL);
    assert_int_equal(kms_policy_parse(NULL, 5, ACCOUNT, &p), KMS_ERR_INTERNAL);
    assert_null(p);
    assert_int_equal(kms_policy_parse(NULL, 0, ACCOUNT, &p), KMS_ERR_MALFORMED_POLICY);
    free(doc);
}

static void test_statement_limit(void **state)
{
    enum { CAP = 40000 };
    char *doc = malloc(CAP), *sq;
    struct kms_policy *p = NULL;
    size_t n = 0;
    (void)state;

    assert_non_null(doc);
    /* 99 statements allow user<i> to decrypt; the last denies everyone when blocked=yes */
    n += (size_t)snprintf(doc + n, CAP - n, "{'Statement':[");
    for (int i = 0; i < 99; i++)
        n += (size_t)snprintf(doc + n, CAP - n,
                              "{'Sid':'S%d','Effect':'Allow','Principal':{'AWS':'user%d'},"
                              "'Action':'kms:Decrypt','Resource':'*'},",
                              i, i);
    n += (size_t)snprintf(doc + n, CAP - n,
                          "{'Sid':'S99','Effect':'Deny','Principal':'*','Action':'kms:*',"
                          "'Resource':'*','Condition':{'StringEquals':"
                          "{'kms:EncryptionContext:blocked':'yes'}}}]}");
    assert_true(n < CAP);
    sq = dq(doc);
    assert_int_equal(kms_policy_parse(sq, strlen(sq), ACCOUNT, &p), KMS_OK);
    struct kms_context_pair blocked = pair("blocked", "yes"), open = pair("blocked", "no");
    for (int i = 0; i < 100; i++) {
        char user[16], why[16], want[16];
        struct kms_policy_request r = {user, ACCOUNT, "kms:Decrypt", KEY_ARN, &open, 1};
        snprintf(user, sizeof user, "user%d", i);
        snprintf(want, sizeof want, "S%d", i);
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), i < 99 ? ALLOW : IMPLICIT);
        assert_string_equal(why, i < 99 ? want : "");
        r.context = &blocked;
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), DENY);
        assert_string_equal(why, "S99");
        r.action = "kms:Encrypt";
        r.ncontext = 0;
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
    }
    kms_policy_free(p);
    free(sq);

    /* 101 statements are one too many */
    n = 0;
    n += (size_t)snprintf(doc + n, CAP - n, "{'Statement':[");
    for (int i = 0; i < 101; i++)
        n += (size_t)snprintf(doc + n, CAP - n, "%s" GOOD_STATEMENT, i ? "," : "");
    n += (size_t)snprintf(doc + n, CAP - n, "]}");
    assert_true(n < KMS_POLICY_MAX_LEN);
    expect_malformed(doc, "policy: Statement has 101 entries, more than 100", NULL);
    free(doc);
}

/* ---- evaluation ------------------------------------------------------------------------ */

static void test_principals(void **state)
{
    static const struct {
        const char *principal;               /* the policy's Principal */
        const char *alice, *bob, *other_acc; /* "A" allow, "-" implicit, for alice, bob, and
                                                alice calling from another account */
    } cases[] = {
        {"{'AWS':'alice'}", "A", "-", "A"},
        {"{'AWS':['alice']}", "A", "-", "A"},
        {"{'AWS':'arn:aws:iam::" ACCOUNT ":user/alice'}", "A", "-", "-"},
        {"{'AWS':'arn:aws:iam::" ACCOUNT ":root'}", "A", "A", "-"},
        {"{'AWS':'arn:aws:iam::" OTHER_ACCOUNT ":root'}", "-", "-", "-"},
        {"{'AWS':'arn:aws:iam::" OTHER_ACCOUNT ":user/alice'}", "-", "-", "-"},
        {"'*'", "A", "A", "A"},
        {"{'AWS':'*'}", "A", "A", "A"},
        {"{'AWS':['carol','arn:aws:iam::" ACCOUNT ":user/bob']}", "-", "A", "-"},
        {"{'AWS':'Alice'}", "-", "-", "-"}, /* names are case-sensitive */
        {"{'AWS':'alic'}", "-", "-", "-"},
        {"{'AWS':'arn:aws:iam::" ACCOUNT ":user/ALICE'}", "-", "-", "-"},
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(cases); i++) {
        char st[512];
        snprintf(st, sizeof st,
                 "{'Effect':'Allow','Principal':%s,'Action':'kms:Decrypt','Resource':'*'}",
                 cases[i].principal);
        struct kms_policy *p = statements(st);
        enum kms_policy_decision want[3] = {
            cases[i].alice[0] == 'A' ? ALLOW : IMPLICIT,
            cases[i].bob[0] == 'A' ? ALLOW : IMPLICIT,
            cases[i].other_acc[0] == 'A' ? ALLOW : IMPLICIT,
        };
        enum kms_policy_decision got[3] = {
            decide(p, "alice", "kms:Decrypt"),
            decide(p, "bob", "kms:Decrypt"),
            decide_as(p, OTHER_ACCOUNT, "alice", "kms:Decrypt", NULL, 0),
        };
        for (int k = 0; k < 3; k++)
            if (got[k] != want[k])
                fail_msg("Principal %s, case %d: got %d, want %d", cases[i].principal, k, got[k],
                         want[k]);
        kms_policy_free(p);
    }
}

static void test_actions(void **state)
{
    static const struct {
        const char *action;  /* the policy's Action */
        const char *allowed; /* the operations it allows, space-separated, each surrounded */
    } cases[] = {
        {"'kms:Decrypt'", " Decrypt "},
        {"'KMS:decrypt'", " Decrypt "},
        {"'kms:DECRYPT'", " Decrypt "},
        {"['kms:Encrypt','kms:Decrypt']", " Encrypt Decrypt "},
        {"'kms:GenerateDataKey*'", " GenerateDataKey GenerateDataKeyWithoutPlaintext "},
        {"'kms:generatedatakey'", " GenerateDataKey "},
        {"'kms:ReEncrypt*'", " ReEncryptFrom ReEncryptTo "},
        {"'kms:ReEncryptFrom'", " ReEncryptFrom "},
        {"'kms:Describe*'", " DescribeKey "},
        {"'kms:?ncrypt'", " Encrypt "},
        {"'kms:*crypt'", " Encrypt Decrypt "},
        {"'kms:*Alias'", " CreateAlias UpdateAlias DeleteAlias "},
        {"'kms:*KeyRotation*'",
         " EnableKeyRotation DisableKeyRotation GetKeyRotationStatus ListKeyRotations "},
        {"'kms:*KeyPolicy'", " PutKeyPolicy GetKeyPolicy "},
        {"'kms:*Key'", " DescribeKey EnableKey DisableKey GenerateDataKey "},
        {"['kms:Decrypt','kms:Decrypt']", " Decrypt "},
        /* grants: past the 32nd operation (the action bits are 64) */
        {"'kms:*Grant*'", " CreateGrant ListGrants RevokeGrant RetireGrant "},
        {"'kms:RetireGrant'", " RetireGrant "},
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(cases); i++) {
        char st[512];
        snprintf(st, sizeof st,
                 "{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':%s,'Resource':'*'}",
                 cases[i].action);
        struct kms_policy *p = statements(st);
        for (size_t k = 0; k < N_ELEMS(all_operations); k++) {
            char action[64], needle[64];
            kms_action(action, sizeof action, all_operations[k]);
            snprintf(needle, sizeof needle, " %s ", all_operations[k]);
            enum kms_policy_decision want = strstr(cases[i].allowed, needle) ? ALLOW : IMPLICIT;
            enum kms_policy_decision got = decide(p, "alice", action);
            if (got != want)
                fail_msg("Action %s, %s: got %d, want %d", cases[i].action, action, got, want);
        }
        kms_policy_free(p);
    }

    /* kms:* and * cover every operation; requests are matched without regard to case */
    const char *every[] = {"'kms:*'", "'*'", "['kms:Decrypt','*']", "'kms:**'"};
    for (size_t i = 0; i < N_ELEMS(every); i++) {
        char st[256];
        snprintf(st, sizeof st,
                 "{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':%s,'Resource':'*'}",
                 every[i]);
        struct kms_policy *p = statements(st);
        for (size_t k = 0; k < N_ELEMS(all_operations); k++) {
            char action[64];
            kms_action(action, sizeof action, all_operations[k]);
            assert_int_equal(decide(p, "alice", action), ALLOW);
            assert_int_equal(decide(p, "bob", action), IMPLICIT);
        }
        assert_int_equal(decide(p, "alice", "KMS:decrypt"), ALLOW);
        /* requests for anything else are denied by default */
        assert_int_equal(decide(p, "alice", "kms:GenerateRandom"), IMPLICIT);
        assert_int_equal(decide(p, "alice", "kms:ListKeys"), IMPLICIT);
        assert_int_equal(decide(p, "alice", "kms:Frobnicate"), IMPLICIT);
        assert_int_equal(decide(p, "alice", "Decrypt"), IMPLICIT);
        assert_int_equal(decide(p, "alice", "kms:Decrypt*"), IMPLICIT);
        assert_int_equal(decide(p, "alice", "kms:*"), IMPLICIT);
        assert_int_equal(decide(p, "alice", ""), IMPLICIT);
        kms_policy_free(p);
    }
}

static void test_deny_overrides_allow(void **state)
{
    static const char allow_all[] =
        "{'Sid':'AllowAll','Effect':'Allow','Principal':'*','Action':'kms:*','Resource':'*'}";
    static const char deny_bob[] =
        "{'Sid':'NoBobDecrypt','Effect':'Deny','Principal':{'AWS':'bob'},"
        "'Action':'kms:Decrypt','Resource':'*'}";
    char list[1024], why[64];
    struct kms_policy_request r = {"bob", ACCOUNT, "kms:Decrypt", KEY_ARN, NULL, 0};
    (void)state;

    for (int order = 0; order < 2; order++) {
        snprintf(list, sizeof list, "%s,%s", order ? deny_bob : allow_all,
                 order ? allow_all : deny_bob);
        struct kms_policy *p = statements(list);
        r.principal = "bob";
        r.action = "kms:Decrypt";
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), DENY);
        assert_string_equal(why, "NoBobDecrypt");
        r.action = "kms:Encrypt";
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), ALLOW);
        assert_string_equal(why, "AllowAll");
        r.principal = "alice";
        r.action = "kms:Decrypt";
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), ALLOW);
        assert_string_equal(why, "AllowAll");
        kms_policy_free(p);
    }

    /* a Deny alone denies; a Deny whose condition fails does not */
    struct kms_policy *p = statements(deny_bob);
    assert_int_equal(decide(p, "bob", "kms:Decrypt"), DENY);
    assert_int_equal(decide(p, "alice", "kms:Decrypt"), IMPLICIT);
    kms_policy_free(p);
    p = statements("{'Effect':'Allow','Principal':'*','Action':'kms:*','Resource':'*'},"
                   "{'Effect':'Deny','Principal':'*','Action':'kms:*','Resource':'*',"
                   "'Condition':{'StringEquals':{'kms:EncryptionContext:stage':'prod'}}}");
    struct kms_context_pair prod = pair("stage", "prod"), test = pair("stage", "test");
    assert_int_equal(decrypt_with(p, &test, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &prod, 1), DENY);
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    kms_policy_free(p);
}

static void test_why(void **state)
{
    char why[64];
    struct kms_policy_request r = {"alice", ACCOUNT, "kms:Decrypt", KEY_ARN, NULL, 0};
    struct kms_policy *p =
        statements("{'Effect':'Allow','Principal':{'AWS':'bob'},'Action':'kms:*','Resource':'*'},"
                   "{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':'kms:*','Resource':'*'},"
                   "{'Sid':'LongStatementName','Effect':'Allow','Principal':{'AWS':'carol'},"
                   "'Action':'kms:*','Resource':'*'},"
                   "{'Sid':'Zugriff f\xc3\xbcr Dave','Effect':'Allow','Principal':{'AWS':'dave'},"
                   "'Action':'kms:*','Resource':'*'}");
    (void)state;

    /* no Sid: "#<index>", counting from 0 */
    assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), ALLOW);
    assert_string_equal(why, "#1");
    r.principal = "bob";
    assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), ALLOW);
    assert_string_equal(why, "#0");
    /* implicit deny: the empty string */
    r.principal = "eve";
    memset(why, 'x', sizeof why);
    assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
    assert_string_equal(why, "");
    /* clipped to fit, never inside a UTF-8 character */
    r.principal = "carol";
    assert_int_equal(kms_policy_evaluate(p, &r, why, 5), ALLOW);
    assert_string_equal(why, "Long");
    r.principal = "dave";
    assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), ALLOW);
    assert_string_equal(why, "Zugriff f\xc3\xbcr Dave");
    assert_int_equal(kms_policy_evaluate(p, &r, why, 11), ALLOW);
    assert_string_equal(why, "Zugriff f");
    assert_int_equal(kms_policy_evaluate(p, &r, why, 12), ALLOW);
    assert_string_equal(why, "Zugriff f\xc3\xbc");
    /* no room, or no buffer at all */
    why[0] = 'x';
    assert_int_equal(kms_policy_evaluate(p, &r, why, 0), ALLOW);
    assert_int_equal(why[0], 'x');
    assert_int_equal(kms_policy_evaluate(p, &r, NULL, 64), ALLOW);
    r.principal = "alice";
    assert_int_equal(kms_policy_evaluate(p, &r, why, 2), ALLOW);
    assert_string_equal(why, "#");
    kms_policy_free(p);
}

static void test_incomplete_requests(void **state)
{
    struct kms_policy *p =
        statements("{'Effect':'Allow','Principal':'*','Action':'kms:*','Resource':'*'}");
    struct kms_policy_request ok = {"alice", ACCOUNT, "kms:Decrypt", KEY_ARN, NULL, 0}, r;
    char why[16];
    (void)state;

    assert_int_equal(kms_policy_evaluate(p, &ok, why, sizeof why), ALLOW);
    assert_int_equal(kms_policy_evaluate(NULL, &ok, why, sizeof why), IMPLICIT);
    assert_string_equal(why, "");
    assert_int_equal(kms_policy_evaluate(p, NULL, why, sizeof why), IMPLICIT);
    r = ok;
    r.principal = NULL;
    assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
    r = ok;
    r.account = NULL;
    assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
    r = ok;
    r.action = NULL;
    assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
    r = ok;
    r.key_arn = NULL;
    assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
    r = ok;
    r.ncontext = 1; /* and no pairs */
    assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
    kms_policy_free(p);
}

static void test_resources(void **state)
{
    static const struct {
        const char *resource;
        enum kms_policy_decision want;
    } cases[] = {
        {"'*'", ALLOW},
        {"'" KEY_ARN "'", ALLOW},
        {"'" OTHER_KEY_ARN "'", IMPLICIT},
        {"['" OTHER_KEY_ARN "','" KEY_ARN "']", ALLOW},
        {"['" OTHER_KEY_ARN "','*']", ALLOW},
        {"'arn:aws:kms:*:" ACCOUNT ":key/*'", ALLOW},
        {"'arn:aws:kms:eu-west-1:" ACCOUNT ":key/1234abcd-*'", ALLOW},
        {"'arn:aws:kms:eu-west-1:" OTHER_ACCOUNT ":key/*'", IMPLICIT},
        {"'arn:aws:kms:eu-west-1:" ACCOUNT ":alias/*'", IMPLICIT},
        {"'arn:aws:kms:EU-WEST-1:" ACCOUNT ":key/1234ABCD-12AB-34CD-56EF-1234567890AB'", IMPLICIT},
        {"'arn:*'", ALLOW},
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(cases); i++) {
        char st[512];
        snprintf(st, sizeof st,
                 "{'Effect':'Allow','Principal':'*','Action':'kms:Decrypt','Resource':%s}",
                 cases[i].resource);
        struct kms_policy *p = statements(st);
        enum kms_policy_decision got = decide(p, "alice", "kms:Decrypt");
        if (got != cases[i].want)
            fail_msg("Resource %s: got %d, want %d", cases[i].resource, got, cases[i].want);
        kms_policy_free(p);
    }
}

/* ---- conditions ------------------------------------------------------------------------- */

static void test_condition_string_equals(void **state)
{
    static const char *const conditions[] = {
        "{'StringEquals':{'kms:EncryptionContext:tenant':'acme'}}",
        "{'StringEquals':{'KMS:encryptioncontext:tenant':'acme'}}", /* the prefix's case is free */
        "{'StringEquals':{'kms:EncryptionContext:tenant':['acme']}}",
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(conditions); i++) {
        struct kms_policy *p = decrypt_if(conditions[i]);
        struct kms_context_pair acme = pair("tenant", "acme"), other = pair("tenant", "globex"),
                                upper = pair("tenant", "ACME"), key_case = pair("Tenant", "acme"),
                                longer = pair("tenant", "acmex"), shorter = pair("tenant", "acm"),
                                two[] = {pair("purpose", "backup"), pair("tenant", "acme")};
        assert_int_equal(decrypt_with(p, &acme, 1), ALLOW);
        assert_int_equal(decrypt_with(p, two, 2), ALLOW);
        assert_int_equal(decrypt_with(p, &other, 1), IMPLICIT);
        assert_int_equal(decrypt_with(p, &upper, 1), IMPLICIT);
        assert_int_equal(decrypt_with(p, &key_case, 1), IMPLICIT);
        assert_int_equal(decrypt_with(p, &longer, 1), IMPLICIT);
        assert_int_equal(decrypt_with(p, &shorter, 1), IMPLICIT);
        assert_int_equal(decrypt_with(p, NULL, 0), IMPLICIT); /* absent */
        assert_int_equal(decrypt_with(p, two, 1), IMPLICIT);  /* absent */
        /* context bytes are not C strings */
        struct kms_context_pair bytes = {"tenantXX", 6, "acmeYY", 4};
        assert_int_equal(decrypt_with(p, &bytes, 1), ALLOW);
        /* other principals and actions are still not allowed */
        assert_int_equal(decide_as(p, ACCOUNT, "bob", "kms:Decrypt", &acme, 1), IMPLICIT);
        assert_int_equal(decide_as(p, ACCOUNT, "alice", "kms:Encrypt", &acme, 1), IMPLICIT);
        kms_policy_free(p);
    }

    /* values OR'd; an empty value; non-ASCII keys and values */
    struct kms_policy *p =
        decrypt_if("{'StringEquals':{'kms:EncryptionContext:tenant':['acme','globex','']}}");
    struct kms_context_pair globex = pair("tenant", "globex"), initech = pair("tenant", "initech"),
                            empty = pair("tenant", "");
    assert_int_equal(decrypt_with(p, &globex, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &empty, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &initech, 1), IMPLICIT);
    kms_policy_free(p);
    p = decrypt_if("{'StringEquals':{'kms:EncryptionContext:Mandant':'M\xc3\xbcller GmbH'}}");
    struct kms_context_pair mueller = pair("Mandant", "M\xc3\xbcller GmbH"),
                            muller = pair("Mandant", "Muller GmbH");
    assert_int_equal(decrypt_with(p, &mueller, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &muller, 1), IMPLICIT);
    kms_policy_free(p);
}

static void test_condition_string_like(void **state)
{
    struct kms_policy *p = decrypt_if("{'StringLike':{'kms:EncryptionContext:tenant':'acme-*'}}");
    struct kms_context_pair prod = pair("tenant", "acme-prod"), bare = pair("tenant", "acme"),
                            upper = pair("tenant", "ACME-prod"), dash = pair("tenant", "acme-");
    (void)state;
    assert_int_equal(decrypt_with(p, &prod, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &dash, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &bare, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &upper, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, NULL, 0), IMPLICIT);
    kms_policy_free(p);

    p = decrypt_if("{'StringLike':{'kms:EncryptionContext:tenant':['?cme','M?ller*']}}");
    struct kms_context_pair acme = pair("tenant", "acme"), xcme = pair("tenant", "xcme"),
                            mueller = pair("tenant", "M\xc3\xbcller GmbH"),
                            cme = pair("tenant", "cme");
    assert_int_equal(decrypt_with(p, &acme, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &xcme, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &mueller, 1), ALLOW); /* '?' is one character: ü */
    assert_int_equal(decrypt_with(p, &cme, 1), IMPLICIT);
    kms_policy_free(p);
}

static void test_condition_ignore_case(void **state)
{
    struct kms_policy *p =
        decrypt_if("{'StringEqualsIgnoreCase':{'kms:EncryptionContext:tenant':'Acme'}}");
    struct kms_context_pair lower = pair("tenant", "acme"), upper = pair("tenant", "ACME"),
                            other = pair("tenant", "acne"), key_case = pair("TENANT", "acme");
    (void)state;
    assert_int_equal(decrypt_with(p, &lower, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &upper, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &other, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &key_case, 1), IMPLICIT); /* the context key still exact */
    assert_int_equal(decrypt_with(p, NULL, 0), IMPLICIT);
    kms_policy_free(p);

    /* ASCII letters only */
    p = decrypt_if("{'StringEqualsIgnoreCase':{'kms:EncryptionContext:t':'\xc3\xa9t\xc3\xa9'}}");
    struct kms_context_pair same = pair("t", "\xc3\xa9T\xc3\xa9"),
                            accent = pair("t", "\xc3\x89t\xc3\x89");
    assert_int_equal(decrypt_with(p, &same, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &accent, 1), IMPLICIT);
    kms_policy_free(p);

    p = decrypt_if("{'StringNotEqualsIgnoreCase':{'kms:EncryptionContext:tenant':'acme'}}");
    assert_int_equal(decrypt_with(p, &upper, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &lower, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &other, 1), ALLOW);
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    kms_policy_free(p);
}

static void test_condition_negated(void **state)
{
    struct kms_context_pair acme = pair("tenant", "acme"), globex = pair("tenant", "globex"),
                            initech = pair("tenant", "initech"), prod = pair("tenant", "acme-prod");
    (void)state;

    /* absent: a negated operator holds */
    struct kms_policy *p =
        decrypt_if("{'StringNotEquals':{'kms:EncryptionContext:tenant':'acme'}}");
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    assert_int_equal(decrypt_with(p, &globex, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &acme, 1), IMPLICIT);
    kms_policy_free(p);

    /* several values: none may match (NOR) */
    p = decrypt_if("{'StringNotEquals':{'kms:EncryptionContext:tenant':['acme','globex']}}");
    assert_int_equal(decrypt_with(p, &acme, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &globex, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &initech, 1), ALLOW);
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    kms_policy_free(p);

    p = decrypt_if("{'StringNotLike':{'kms:EncryptionContext:tenant':'acme*'}}");
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    assert_int_equal(decrypt_with(p, &globex, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &prod, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &acme, 1), IMPLICIT);
    kms_policy_free(p);

    /* so a Deny "unless tenant is acme" also denies a request without a tenant */
    p = statements("{'Effect':'Allow','Principal':'*','Action':'kms:*','Resource':'*'},"
                   "{'Sid':'OnlyAcme','Effect':'Deny','Principal':'*','Action':'kms:Decrypt',"
                   "'Resource':'*','Condition':{'StringNotEquals':"
                   "{'kms:EncryptionContext:tenant':'acme'}}}");
    assert_int_equal(decrypt_with(p, &acme, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &globex, 1), DENY);
    assert_int_equal(decrypt_with(p, NULL, 0), DENY);
    kms_policy_free(p);
}

static void test_condition_sets(void **state)
{
    struct kms_context_pair tenant = pair("tenant", "acme"), purpose = pair("purpose", "backup"),
                            other = pair("other", "x"), upper = pair("Tenant", "acme"),
                            secret = pair("secret", "1"),
                            tenant_purpose[] = {pair("purpose", "backup"), pair("tenant", "acme")},
                            tenant_other[] = {pair("other", "x"), pair("tenant", "acme")},
                            other_secret[] = {pair("other", "x"), pair("secret", "1")};
    (void)state;

    /* ForAllValues: every key of the context is listed; true for an empty context */
    struct kms_policy *p = decrypt_if(
        "{'ForAllValues:StringEquals':{'kms:EncryptionContextKeys':['tenant','purpose']}}");
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    assert_int_equal(decrypt_with(p, &tenant, 1), ALLOW);
    assert_int_equal(decrypt_with(p, tenant_purpose, 2), ALLOW);
    assert_int_equal(decrypt_with(p, tenant_other, 2), IMPLICIT);
    assert_int_equal(decrypt_with(p, &upper, 1), IMPLICIT);
    kms_policy_free(p);

    /* ForAnyValue: some key is listed; false for an empty context */
    p = decrypt_if("{'ForAnyValue:StringEquals':{'kms:EncryptionContextKeys':'tenant'}}");
    assert_int_equal(decrypt_with(p, NULL, 0), IMPLICIT);
    assert_int_equal(decrypt_with(p, &tenant, 1), ALLOW);
    assert_int_equal(decrypt_with(p, tenant_other, 2), ALLOW);
    assert_int_equal(decrypt_with(p, &other, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &upper, 1), IMPLICIT);
    kms_policy_free(p);

    /* negated: ForAllValues = no key is listed; ForAnyValue = some key is not listed */
    p = decrypt_if("{'ForAllValues:StringNotEquals':{'kms:EncryptionContextKeys':'secret'}}");
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    assert_int_equal(decrypt_with(p, &other, 1), ALLOW);
    assert_int_equal(decrypt_with(p, other_secret, 2), IMPLICIT);
    assert_int_equal(decrypt_with(p, &secret, 1), IMPLICIT);
    kms_policy_free(p);
    p = decrypt_if("{'ForAnyValue:StringNotEquals':{'kms:EncryptionContextKeys':'tenant'}}");
    assert_int_equal(decrypt_with(p, NULL, 0), IMPLICIT);
    assert_int_equal(decrypt_with(p, &tenant, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, tenant_other, 2), ALLOW);
    kms_policy_free(p);

    /* the other string operators */
    p = decrypt_if("{'ForAnyValue:StringLike':{'kms:EncryptionContextKeys':'ten*'}}");
    assert_int_equal(decrypt_with(p, &tenant, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &purpose, 1), IMPLICIT);
    kms_policy_free(p);
    p = decrypt_if("{'ForAllValues:StringNotLike':{'kms:EncryptionContextKeys':'sec*'}}");
    assert_int_equal(decrypt_with(p, &tenant, 1), ALLOW);
    assert_int_equal(decrypt_with(p, other_secret, 2), IMPLICIT);
    kms_policy_free(p);
    p = decrypt_if(
        "{'ForAllValues:StringEqualsIgnoreCase':{'kms:EncryptionContextKeys':'TENANT'}}");
    assert_int_equal(decrypt_with(p, &tenant, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &upper, 1), ALLOW);
    assert_int_equal(decrypt_with(p, tenant_other, 2), IMPLICIT);
    kms_policy_free(p);
    p = decrypt_if(
        "{'ForAnyValue:StringNotEqualsIgnoreCase':{'kms:EncryptionContextKeys':'TENANT'}}");
    assert_int_equal(decrypt_with(p, &upper, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, tenant_other, 2), ALLOW);
    kms_policy_free(p);
}

static void test_condition_null(void **state)
{
    struct kms_context_pair tenant = pair("tenant", "acme"), empty = pair("tenant", "");
    static const char *const absent_ok[] = {
        "{'Null':{'kms:EncryptionContext:tenant':'true'}}",
        "{'Null':{'kms:EncryptionContext:tenant':true}}",
        "{'Null':{'kms:EncryptionContext:tenant':['true']}}",
    };
    static const char *const present_ok[] = {
        "{'Null':{'kms:EncryptionContext:tenant':'false'}}",
        "{'Null':{'kms:EncryptionContext:tenant':false}}",
    };
    (void)state;
    for (size_t i = 0; i < N_ELEMS(absent_ok); i++) {
        struct kms_policy *p = decrypt_if(absent_ok[i]);
        assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
        assert_int_equal(decrypt_with(p, &tenant, 1), IMPLICIT);
        assert_int_equal(decrypt_with(p, &empty, 1), IMPLICIT); /* present, though empty */
        kms_policy_free(p);
    }
    for (size_t i = 0; i < N_ELEMS(present_ok); i++) {
        struct kms_policy *p = decrypt_if(present_ok[i]);
        assert_int_equal(decrypt_with(p, NULL, 0), IMPLICIT);
        assert_int_equal(decrypt_with(p, &tenant, 1), ALLOW);
        kms_policy_free(p);
    }
    struct kms_policy *p = decrypt_if("{'Null':{'kms:EncryptionContext:tenant':['true',false]}}");
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    assert_int_equal(decrypt_with(p, &tenant, 1), ALLOW);
    kms_policy_free(p);

    /* the multi-valued key is absent when the context is empty */
    p = decrypt_if("{'Null':{'kms:EncryptionContextKeys':'true'}}");
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    assert_int_equal(decrypt_with(p, &tenant, 1), IMPLICIT);
    kms_policy_free(p);
    p = decrypt_if("{'Null':{'kms:EncryptionContextKeys':'false'}}");
    assert_int_equal(decrypt_with(p, NULL, 0), IMPLICIT);
    assert_int_equal(decrypt_with(p, &tenant, 1), ALLOW);
    kms_policy_free(p);

    /* kms:CallerAccount and aws:username are always present */
    p = decrypt_if("{'Null':{'kms:CallerAccount':'false','aws:username':false}}");
    assert_int_equal(decrypt_with(p, NULL, 0), ALLOW);
    kms_policy_free(p);
}

static void test_condition_bool(void **state)
{
    struct kms_context_pair yes = pair("audited", "true"), upper = pair("audited", "TRUE"),
                            no = pair("audited", "false"), other = pair("audited", "yes");
    (void)state;
    struct kms_policy *p = decrypt_if("{'Bool':{'kms:EncryptionContext:audited':'true'}}");
    assert_int_equal(decrypt_with(p, &yes, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &upper, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &no, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &other, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, NULL, 0), IMPLICIT);
    kms_policy_free(p);
    p = decrypt_if("{'Bool':{'kms:EncryptionContext:audited':false}}");
    assert_int_equal(decrypt_with(p, &no, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &yes, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, NULL, 0), IMPLICIT);
    kms_policy_free(p);
}

static void test_condition_and_or(void **state)
{
    struct kms_policy *p = decrypt_if("{'StringEquals':{'kms:EncryptionContext:tenant':'acme',"
                                      "'kms:EncryptionContext:stage':['prod','test']},"
                                      "'Null':{'kms:EncryptionContext:debug':'true'}}");
    struct kms_context_pair prod[] = {pair("stage", "prod"), pair("tenant", "acme")},
                            test[] = {pair("stage", "test"), pair("tenant", "acme")},
                            dev[] = {pair("stage", "dev"), pair("tenant", "acme")},
                            no_stage[] = {pair("tenant", "acme")},
                            debug[] = {pair("debug", "1"), pair("stage", "prod"),
                                       pair("tenant", "acme")};
    (void)state;
    assert_int_equal(decrypt_with(p, prod, 2), ALLOW);
    assert_int_equal(decrypt_with(p, test, 2), ALLOW);
    assert_int_equal(decrypt_with(p, dev, 2), IMPLICIT);
    assert_int_equal(decrypt_with(p, no_stage, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, debug, 3), IMPLICIT);
    kms_policy_free(p);

    /* the same key under two operators: both must hold */
    p = decrypt_if("{'StringLike':{'kms:EncryptionContext:tenant':'a*'},"
                   "'StringNotEquals':{'kms:EncryptionContext:tenant':'acme'}}");
    struct kms_context_pair acme = pair("tenant", "acme"), abc = pair("tenant", "abc"),
                            xyz = pair("tenant", "xyz");
    assert_int_equal(decrypt_with(p, &abc, 1), ALLOW);
    assert_int_equal(decrypt_with(p, &acme, 1), IMPLICIT);
    assert_int_equal(decrypt_with(p, &xyz, 1), IMPLICIT);
    kms_policy_free(p);
}

static void test_condition_account_and_username(void **state)
{
    struct kms_policy *p =
        statements("{'Effect':'Allow','Principal':'*','Action':'kms:Decrypt','Resource':'*',"
                   "'Condition':{'StringEquals':{'kms:CallerAccount':'" ACCOUNT "'}}}");
    (void)state;
    assert_int_equal(decide(p, "alice", "kms:Decrypt"), ALLOW);
    assert_int_equal(decide_as(p, OTHER_ACCOUNT, "alice", "kms:Decrypt", NULL, 0), IMPLICIT);
    kms_policy_free(p);

    p = statements("{'Effect':'Allow','Principal':'*','Action':'kms:*','Resource':'*',"
                   "'Condition':{'StringLike':{'AWS:UserName':'svc-*'}}}");
    assert_int_equal(decide(p, "svc-backup", "kms:Decrypt"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:Decrypt"), IMPLICIT);
    assert_int_equal(decide(p, "SVC-backup", "kms:Decrypt"), IMPLICIT);
    kms_policy_free(p);
}

static void test_reencrypt(void **state)
{
    struct kms_policy *p =
        statements("{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':'kms:ReEncryptFrom',"
                   "'Resource':'*'}");
    (void)state;
    assert_int_equal(decide(p, "alice", "kms:ReEncryptFrom"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:ReEncryptTo"), IMPLICIT);
    assert_int_equal(decide(p, "alice", "kms:ReEncrypt"), IMPLICIT);
    assert_int_equal(decide(p, "alice", "kms:Decrypt"), IMPLICIT);
    kms_policy_free(p);

    p = statements("{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':'kms:ReEncrypt*',"
                   "'Resource':'*'},"
                   "{'Effect':'Deny','Principal':{'AWS':'alice'},'Action':'kms:ReEncryptTo',"
                   "'Resource':'*','Condition':{'Null':{'kms:EncryptionContext:tenant':'true'}}}");
    struct kms_context_pair tenant = pair("tenant", "acme");
    assert_int_equal(decide(p, "alice", "kms:ReEncryptFrom"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:ReEncryptTo"), DENY);
    assert_int_equal(decide_as(p, ACCOUNT, "alice", "kms:ReEncryptTo", &tenant, 1), ALLOW);
    kms_policy_free(p);
}

/* The actions of asymmetric and HMAC keys: each its own, and the globs AWS users write. */
static void test_asymmetric_actions(void **state)
{
    static const char *const actions[] = {"kms:GetPublicKey",
                                          "kms:Sign",
                                          "kms:Verify",
                                          "kms:GenerateMac",
                                          "kms:VerifyMac",
                                          "kms:DeriveSharedSecret",
                                          "kms:GenerateDataKeyPair",
                                          "kms:GenerateDataKeyPairWithoutPlaintext"};
    struct kms_policy *p =
        statements("{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':'kms:Verify',"
                   "'Resource':'*'}");
    (void)state;
    assert_int_equal(decide(p, "alice", "kms:Verify"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:Sign"), IMPLICIT);
    assert_int_equal(decide(p, "alice", "kms:VerifyMac"), IMPLICIT);
    kms_policy_free(p);

    p = statements(
        "{'Effect':'Allow','Principal':{'AWS':'alice'},'Action':'kms:*','Resource':'*'}");
    for (size_t i = 0; i < N_ELEMS(actions); i++)
        if (decide(p, "alice", actions[i]) != ALLOW)
            fail_msg("kms:* does not cover %s", actions[i]);
    kms_policy_free(p);

    p = statements("{'Effect':'Allow','Principal':{'AWS':'alice'},"
                   "'Action':['kms:GenerateDataKey*','kms:Verify*'],'Resource':'*'}");
    assert_int_equal(decide(p, "alice", "kms:GenerateDataKeyPair"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:GenerateDataKeyPairWithoutPlaintext"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:VerifyMac"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:Verify"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:Sign"), IMPLICIT);
    assert_int_equal(decide(p, "alice", "kms:GenerateMac"), IMPLICIT);
    kms_policy_free(p);

    p = statements("{'Effect':'Allow','Principal':{'AWS':'alice'},"
                   "'Action':['kms:sign','KMS:DeriveSharedSecret'],'Resource':'*'}");
    assert_int_equal(decide(p, "alice", "kms:Sign"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:DeriveSharedSecret"), ALLOW);
    assert_int_equal(decide(p, "alice", "kms:GetPublicKey"), IMPLICIT);
    kms_policy_free(p);
}

/* ---- the default policy ------------------------------------------------------------- */

static void test_default_policy(void **state)
{
    static const char *const names[] = {"alice", "admin", "alice"};
    char *json = NULL, why[16];
    struct kms_policy *p = NULL;
    (void)state;

    assert_int_equal(kms_policy_default(ACCOUNT, names, N_ELEMS(names), &json), KMS_OK);
    assert_string_equal(json,
                        "{\"Version\":\"2012-10-17\",\"Id\":\"key-default-1\",\"Statement\":[{"
                        "\"Sid\":\"Default\",\"Effect\":\"Allow\",\"Principal\":{\"AWS\":["
                        "\"arn:aws:iam::111122223333:user/alice\","
                        "\"arn:aws:iam::111122223333:user/admin\"]},"
                        "\"Action\":\"kms:*\",\"Resource\":\"*\"}]}");
    assert_int_equal(kms_policy_parse(json, strlen(json), ACCOUNT, &p), KMS_OK);
    for (size_t k = 0; k < N_ELEMS(all_operations); k++) {
        char action[64];
        struct kms_policy_request r = {"alice", ACCOUNT, action, KEY_ARN, NULL, 0};
        kms_action(action, sizeof action, all_operations[k]);
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), ALLOW);
        assert_string_equal(why, "Default");
        r.principal = "admin";
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), ALLOW);
        r.principal = "bob";
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
        r.principal = "Alice";
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
        r.account = OTHER_ACCOUNT;
        r.principal = "alice";
        assert_int_equal(kms_policy_evaluate(p, &r, why, sizeof why), IMPLICIT);
    }
    kms_policy_free(p);
    free(json);

    /* a single principal is still an array */
    const char *one[] = {"creator"};
    assert_int_equal(kms_policy_default(ACCOUNT, one, 1, &json), KMS_OK);
    assert_non_null(strstr(json, "{\"AWS\":[\"arn:aws:iam::111122223333:user/creator\"]}"));
    free(json);
}

static void test_default_policy_errors(void **state)
{
    const char *bad[] = {"alice", "bad name"};
    const char *null_name[] = {"alice", NULL};
    const char *good[] = {"alice"};
    char *json = (char *)&json;
    (void)state;

    assert_int_equal(kms_policy_default(ACCOUNT, good, 0, &json), KMS_ERR_VALIDATION);
    assert_null(json);
    assert_int_equal(kms_policy_default(ACCOUNT, bad, 2, &json), KMS_ERR_VALIDATION);
    expect_message("\"bad name\" is not a principal name");
    assert_int_equal(kms_policy_default(ACCOUNT, null_name, 2, &json), KMS_ERR_VALIDATION);
    assert_int_equal(kms_policy_default("1234", good, 1, &json), KMS_ERR_INTERNAL);
    assert_int_equal(kms_policy_default(NULL, good, 1, &json), KMS_ERR_INTERNAL);
    assert_int_equal(kms_policy_default(ACCOUNT, NULL, 1, &json), KMS_ERR_INTERNAL);
    assert_int_equal(kms_policy_default(ACCOUNT, good, 1, NULL), KMS_ERR_INTERNAL);
    assert_null(json);

    /* more principals than a policy can hold */
    enum { MANY = 400 };
    char(*names)[65] = calloc(MANY, sizeof *names);
    const char **list = calloc(MANY, sizeof *list);
    assert_non_null(names);
    assert_non_null(list);
    for (int i = 0; i < MANY; i++) {
        snprintf(names[i], sizeof names[i], "%060d", i);
        list[i] = names[i];
    }
    assert_int_equal(kms_policy_default(ACCOUNT, list, MANY, &json), KMS_ERR_VALIDATION);
    expect_message("over 32768 bytes");
    assert_null(json);
    /* as many as fit round-trip */
    assert_int_equal(kms_policy_default(ACCOUNT, list, 300, &json), KMS_OK);
    struct kms_policy *p = NULL;
    assert_int_equal(kms_policy_parse(json, strlen(json), ACCOUNT, &p), KMS_OK);
    assert_int_equal(decide(p, names[299], "kms:Decrypt"), ALLOW);
    kms_policy_free(p);
    free(json);
    free(names);
    free(list);
}

/* ---- threads -------------------------------------------------------------------------- */

struct worker {
    const struct kms_policy *p;
    int failures;
};

static void *evaluate_many(void *arg)
{
    struct worker *w = arg;
    struct kms_context_pair acme = pair("tenant", "acme"), other = pair("tenant", "globex");
    for (int i = 0; i < 20000; i++) {
        char why[16];
        struct kms_policy_request r = {i % 3 ? "alice" : "bob", ACCOUNT, "kms:Decrypt", KEY_ARN,
                                       i % 2 ? &acme : &other,  1};
        enum kms_policy_decision want = i % 3 == 0 ? DENY : i % 2 ? ALLOW : IMPLICIT;
        if (kms_policy_evaluate(w->p, &r, why, sizeof why) != want)
            w->failures++;
    }
    return NULL;
}

static void test_concurrent_evaluation(void **state)
{
    struct kms_policy *p =
        statements("{'Sid':'Tenant','Effect':'Allow','Principal':{'AWS':['alice','bob']},"
                   "'Action':'kms:Decrypt','Resource':'*','Condition':{'StringLike':"
                   "{'kms:EncryptionContext:tenant':'a*'}}},"
                   "{'Sid':'NoBob','Effect':'Deny','Principal':{'AWS':'bob'},'Action':'kms:*',"
                   "'Resource':'*'}");
    pthread_t t[4];
    struct worker w[4];
    (void)state;
    for (int i = 0; i < 4; i++) {
        w[i] = (struct worker){p, 0};
        assert_int_equal(pthread_create(&t[i], NULL, evaluate_many, &w[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        assert_int_equal(w[i].failures, 0);
    }
    kms_policy_free(p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_error_code),
        cmocka_unit_test(test_glob_table),
        cmocka_unit_test(test_glob_pathological),
        cmocka_unit_test(test_glob_against_reference),
        cmocka_unit_test(test_glob_steps_are_linear),
        cmocka_unit_test(test_pattern_limits),
        cmocka_unit_test(test_parse_accepted_forms),
        cmocka_unit_test(test_parse_document_errors),
        cmocka_unit_test(test_parse_bytes_refused),
        cmocka_unit_test(test_parse_statement_errors),
        cmocka_unit_test(test_parse_errors_name_the_sid),
        cmocka_unit_test(test_parse_size_limit),
        cmocka_unit_test(test_parse_bad_arguments),
        cmocka_unit_test(test_statement_limit),
        cmocka_unit_test(test_principals),
        cmocka_unit_test(test_actions),
        cmocka_unit_test(test_deny_overrides_allow),
        cmocka_unit_test(test_why),
        cmocka_unit_test(test_incomplete_requests),
        cmocka_unit_test(test_resources),
        cmocka_unit_test(test_condition_string_equals),
        cmocka_unit_test(test_condition_string_like),
        cmocka_unit_test(test_condition_ignore_case),
        cmocka_unit_test(test_condition_negated),
        cmocka_unit_test(test_condition_sets),
        cmocka_unit_test(test_condition_null),
        cmocka_unit_test(test_condition_bool),
        cmocka_unit_test(test_condition_and_or),
        cmocka_unit_test(test_condition_account_and_username),
        cmocka_unit_test(test_reencrypt),
        cmocka_unit_test(test_asymmetric_actions),
        cmocka_unit_test(test_default_policy),
        cmocka_unit_test(test_default_policy_errors),
        cmocka_unit_test(test_concurrent_evaluation),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
