/*
 * Unit tests for the argument checks of src/client/manage.c (tags and
 * grants), none of which may reach the service: the client points at a
 * closed port with a breaker that opens on the first failed call, so a check
 * that let a request through would show as TransportError and an open
 * breaker. The last test lets one valid call of each through to show that
 * the checks do not refuse what is valid.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "client/internal.h"
#include "offline_client.h"

#define KEY "1234abcd-12ab-34cd-56ef-1234567890ab"
#define GRANT_ID "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

/* The call was refused as an argument, with these words in the thread's last error. */
#define REFUSED(call, words)                                                                     \
    do {                                                                                         \
        assert_int_equal((call), P11KMS_ERR_ARGUMENT);                                           \
        if (!strstr(p11kms_last_error(), (words)))                                               \
            fail_msg("%s: last error \"%s\" lacks \"%s\"", #call, p11kms_last_error(), (words)); \
    } while (0)

/* A string of n copies of the UTF-8 character ch (1 to 4 bytes). */
static char *repeat(const char *ch, size_t n)
{
    size_t len = strlen(ch);
    char *s = malloc(n * len + 1);
    assert_non_null(s);
    for (size_t i = 0; i < n; i++)
        memcpy(s + i * len, ch, len);
    s[n * len] = '\0';
    return s;
}

static void test_tag_arguments(void **state)
{
    p11kms_client *c = unreachable_client();
    struct p11kms_tag tags[P11KMS_TAGS_MAX + 1];
    char keys[P11KMS_TAGS_MAX + 1][8];
    char *k128 = repeat("\xc3\xa9", 128), *k129 = repeat("\xc3\xa9", 129);
    char *v256 = repeat("\xe2\x82\xac", 256), *v257 = repeat("\xe2\x82\xac", 257);
    (void)state;

    for (size_t i = 0; i <= P11KMS_TAGS_MAX; i++) {
        snprintf(keys[i], sizeof keys[i], "k%zu", i);
        tags[i].key = keys[i];
        tags[i].value = "v";
    }
    REFUSED(p11kms_tag_resource(NULL, KEY, tags, 1), "NULL client");
    REFUSED(p11kms_tag_resource(c, KEY, NULL, 1), "give 1 to 50 tags");
    REFUSED(p11kms_tag_resource(c, KEY, tags, 0), "give 1 to 50 tags");
    REFUSED(p11kms_tag_resource(c, KEY, tags, P11KMS_TAGS_MAX + 1), "give 1 to 50 tags");
    REFUSED(p11kms_tag_resource(c, NULL, tags, 1), "key id");
    REFUSED(p11kms_tag_resource(c, "", tags, 1), "key id");
    /* lengths count characters: 129 two-byte characters is too long, 128 is not checked here */
    tags[2].key = k129;
    REFUSED(p11kms_tag_resource(c, KEY, tags, 3), "tag 2: the tag key must be 1 to 128");
    tags[2].key = "";
    REFUSED(p11kms_tag_resource(c, KEY, tags, 3), "tag 2: the tag key");
    tags[2].key = NULL;
    REFUSED(p11kms_tag_resource(c, KEY, tags, 3), "tag 2: the tag key");
    tags[2].key = "\xff\xfe";
    REFUSED(p11kms_tag_resource(c, KEY, tags, 3), "UTF-8");
    tags[2].key = keys[2];
    tags[1].value = v257;
    REFUSED(p11kms_tag_resource(c, KEY, tags, 3), "tag 1: the value must be 0 to 256");
    tags[1].value = NULL;
    REFUSED(p11kms_tag_resource(c, KEY, tags, 3), "tag 1: the value");
    tags[1].value = "v";
    tags[2].key = keys[0];
    REFUSED(p11kms_tag_resource(c, KEY, tags, 3), "given twice");
    tags[2].key = keys[2];
    assert_nothing_sent(c);

    /* valid, at the bounds: sent (and the unreachable service fails it) */
    tags[0].key = k128;
    tags[0].value = v256;
    tags[1].value = "";
    assert_int_equal(p11kms_tag_resource(c, KEY, tags, P11KMS_TAGS_MAX), P11KMS_ERR_TRANSPORT);
    assert_int_equal(kms_transport_breaker_state(c->transport), KMS_BREAKER_OPEN);

    free(k128);
    free(k129);
    free(v256);
    free(v257);
    p11kms_client_free(c);
}

static void test_untag_and_list_arguments(void **state)
{
    p11kms_client *c = unreachable_client();
    const char *keys[P11KMS_TAGS_MAX + 1];
    struct p11kms_tag_list l = {(struct p11kms_tag *)1, 7}; /* emptied even when refused */
    char *k129 = repeat("a", 129);
    (void)state;

    for (size_t i = 0; i <= P11KMS_TAGS_MAX; i++)
        keys[i] = "k";
    REFUSED(p11kms_untag_resource(NULL, KEY, keys, 1), "NULL client");
    REFUSED(p11kms_untag_resource(c, KEY, NULL, 1), "give 1 to 50 tag keys");
    REFUSED(p11kms_untag_resource(c, KEY, keys, 0), "give 1 to 50 tag keys");
    REFUSED(p11kms_untag_resource(c, KEY, keys, P11KMS_TAGS_MAX + 1), "give 1 to 50 tag keys");
    keys[1] = k129;
    REFUSED(p11kms_untag_resource(c, KEY, keys, 2), "tag 1: the tag key");
    keys[1] = "";
    REFUSED(p11kms_untag_resource(c, KEY, keys, 2), "tag 1: the tag key");
    keys[1] = "k";
    REFUSED(p11kms_untag_resource(c, "", keys, 2), "key id");

    REFUSED(p11kms_list_resource_tags(c, KEY, NULL), "NULL argument");
    REFUSED(p11kms_list_resource_tags(NULL, KEY, &l), "NULL argument");
    assert_null(l.tags);
    assert_int_equal(l.n, 0);
    REFUSED(p11kms_list_resource_tags(c, NULL, &l), "key id");
    assert_nothing_sent(c);
    p11kms_tag_list_clear(NULL);
    p11kms_tag_list_clear(&l);
    free(k129);
    p11kms_client_free(c);
}

static void test_create_grant_arguments(void **state)
{
    p11kms_client *c = unreachable_client();
    const char *ops[] = {"Decrypt", "Encrypt"}, *bad_ops[] = {"Decrypt", "ListKeys"};
    const char *twice[] = {"Decrypt", "Decrypt"};
    const char *all[18] = {"Decrypt",
                           "Encrypt",
                           "GenerateDataKey",
                           "GenerateDataKeyWithoutPlaintext",
                           "ReEncryptFrom",
                           "ReEncryptTo",
                           "Sign",
                           "Verify",
                           "GetPublicKey",
                           "CreateGrant",
                           "RetireGrant",
                           "DescribeKey",
                           "GenerateDataKeyPair",
                           "GenerateDataKeyPairWithoutPlaintext",
                           "GenerateMac",
                           "VerifyMac",
                           "DeriveSharedSecret",
                           "Decrypt"};
    struct p11kms_context ctx[] = {{"purpose", "test"}, {"purpose", "twice"}};
    struct p11kms_context null_pair[] = {{"k", NULL}};
    char id[65] = "x", *token = (char *)1;
    char *long_principal = repeat("p", P11KMS_PRINCIPAL_MAX + 1);
    char *long_name = repeat("n", P11KMS_GRANT_NAME_MAX + 1);
    const char *bob = "arn:aws:iam::123456789012:user/bob";
    (void)state;

    REFUSED(p11kms_create_grant(NULL, KEY, bob, NULL, ops, 2, NULL, 0, 0, NULL, id, &token),
            "NULL argument");
    assert_null(token);
    assert_string_equal(id, "");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, ops, 2, NULL, 0, 0, NULL, NULL, &token),
            "NULL argument");
    REFUSED(p11kms_create_grant(c, KEY, NULL, NULL, ops, 2, NULL, 0, 0, NULL, id, &token),
            "grantee principal");
    REFUSED(p11kms_create_grant(c, KEY, "", NULL, ops, 2, NULL, 0, 0, NULL, id, &token),
            "grantee principal");
    REFUSED(p11kms_create_grant(c, KEY, long_principal, NULL, ops, 2, NULL, 0, 0, NULL, id, &token),
            "grantee principal must be 1 to 256");
    REFUSED(p11kms_create_grant(c, KEY, bob, "", ops, 2, NULL, 0, 0, NULL, id, &token),
            "retiring principal");
    REFUSED(p11kms_create_grant(c, KEY, bob, long_principal, ops, 2, NULL, 0, 0, NULL, id, &token),
            "retiring principal");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, ops, 2, NULL, 0, 0, "", id, &token),
            "grant name");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, ops, 2, NULL, 0, 0, "a b", id, &token),
            "grant name");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, ops, 2, NULL, 0, 0, long_name, id, &token),
            "grant name");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, NULL, 2, NULL, 0, 0, NULL, id, &token),
            "operations");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, ops, 0, NULL, 0, 0, NULL, id, &token),
            "give 1 to 17 operations");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, all, 18, NULL, 0, 0, NULL, id, &token),
            "give 1 to 17 operations");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, bad_ops, 2, NULL, 0, 0, NULL, id, &token),
            "operation 1 (ListKeys)");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, twice, 2, NULL, 0, 0, NULL, id, &token),
            "given twice");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, ops, 2, NULL, 1, 0, NULL, id, &token),
            "pairs are NULL");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, ops, 2, ctx, 2, 1, NULL, id, &token),
            "given twice");
    REFUSED(p11kms_create_grant(c, KEY, bob, NULL, ops, 2, null_pair, 1, 0, NULL, id, &token),
            "pair 0 is NULL");
    REFUSED(p11kms_create_grant(c, "", bob, NULL, ops, 2, NULL, 0, 0, NULL, id, &token), "key id");
    assert_nothing_sent(c);

    /* valid: all 17 operations, a constraint, a name; sent, and the service is unreachable */
    assert_int_equal(
        p11kms_create_grant(c, KEY, bob, bob, all, 17, ctx, 1, 0, "nightly:job/1_a-b", id, &token),
        P11KMS_ERR_TRANSPORT);
    assert_null(token);
    assert_string_equal(id, "");
    free(long_principal);
    free(long_name);
    p11kms_client_free(c);
}

static void test_retire_revoke_list_grant_arguments(void **state)
{
    p11kms_client *c = unreachable_client();
    struct p11kms_grant_list l = {(struct p11kms_grant *)1, 3};
    char *long_token = repeat("t", P11KMS_GRANT_TOKEN_MAX + 1);
    (void)state;

    REFUSED(p11kms_retire_grant(NULL, "token", NULL, NULL), "NULL client");
    /* exactly one way: the token, or key and grant id */
    REFUSED(p11kms_retire_grant(c, NULL, NULL, NULL), "one of them");
    REFUSED(p11kms_retire_grant(c, NULL, KEY, NULL), "one of them");
    REFUSED(p11kms_retire_grant(c, NULL, NULL, GRANT_ID), "one of them");
    REFUSED(p11kms_retire_grant(c, "token", KEY, NULL), "one of them");
    REFUSED(p11kms_retire_grant(c, "token", NULL, GRANT_ID), "one of them");
    REFUSED(p11kms_retire_grant(c, "token", KEY, GRANT_ID), "one of them");
    REFUSED(p11kms_retire_grant(c, "", NULL, NULL), "grant token");
    REFUSED(p11kms_retire_grant(c, long_token, NULL, NULL), "grant token must be 1 to 8192");
    REFUSED(p11kms_retire_grant(c, NULL, KEY, "0123"), "64 lower-case hex");
    REFUSED(p11kms_retire_grant(c, NULL, KEY, GRANT_ID "0"), "64 lower-case hex");
    REFUSED(p11kms_retire_grant(c, NULL, KEY,
                                "0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef"),
            "64 lower-case hex");
    REFUSED(p11kms_retire_grant(c, NULL, "", GRANT_ID), "key id");

    REFUSED(p11kms_revoke_grant(NULL, KEY, GRANT_ID), "NULL client");
    REFUSED(p11kms_revoke_grant(c, KEY, NULL), "64 lower-case hex");
    REFUSED(p11kms_revoke_grant(c, KEY, "g"), "64 lower-case hex");
    REFUSED(p11kms_revoke_grant(c, NULL, GRANT_ID), "key id");

    REFUSED(p11kms_list_grants(c, KEY, NULL), "NULL argument");
    REFUSED(p11kms_list_grants(NULL, KEY, &l), "NULL argument");
    assert_null(l.grants);
    assert_int_equal(l.n, 0);
    REFUSED(p11kms_list_grants(c, "", &l), "key id");
    assert_nothing_sent(c);
    p11kms_grant_list_clear(NULL);
    p11kms_grant_list_clear(&l);

    /* valid: sent */
    assert_int_equal(p11kms_revoke_grant(c, KEY, GRANT_ID), P11KMS_ERR_TRANSPORT);
    free(long_token);
    p11kms_client_free(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tag_arguments),
        cmocka_unit_test(test_untag_and_list_arguments),
        cmocka_unit_test(test_create_grant_arguments),
        cmocka_unit_test(test_retire_revoke_list_grant_arguments),
    };
    return cmocka_run_group_tests_name("client tags and grants", tests, NULL, NULL);
}
