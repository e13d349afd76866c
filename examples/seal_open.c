/*
 * Seals a JSON payload as a JWE under a data key of a KMS key, then opens it.
 *
 *   P11KMS_ENDPOINT=http://127.0.0.1:8080 AWS_ACCESS_KEY_ID=... \
 *   AWS_SECRET_ACCESS_KEY=... ./seal_open alias/app ['{"card":"4111..."}']
 *
 * The endpoint, region and credentials come from the environment
 * (P11KMS_ENDPOINT or AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
 * AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN). Data keys are cached for five
 * minutes and reused for up to 1000 messages, so sealing twice asks the
 * service for one data key. Build it against the installed library with
 *
 *   cc seal_open.c $(pkg-config --cflags --libs p11kms) -o seal_open
 */
#include <stdio.h>
#include <string.h>

#include <p11kms.h>

static int failed(const char *what, p11kms_status st)
{
    fprintf(stderr, "seal_open: %s: %s: %s\n", what, p11kms_status_name(st), p11kms_last_error());
    return 1;
}

int main(int argc, char **argv)
{
    const char *key_id = argc > 1 ? argv[1] : "alias/app";
    const char *payload = argc > 2 ? argv[2] : "{\"account\":\"12-3456\",\"amount\":\"42.00\"}";
    if (argc > 3) {
        fprintf(stderr, "usage: seal_open [KEY-ID [JSON-PAYLOAD]]\n");
        return 2;
    }

    struct p11kms_options o;
    p11kms_options_init(&o);
    o.cache_max_age_s = 300;
    o.cache_max_messages = 1000;
    p11kms_client *c;
    p11kms_status st = p11kms_client_new(&o, &c);
    if (st != P11KMS_OK)
        return failed("client", st);
    if (!p11kms_client_memory_locked(c))
        fprintf(stderr, "seal_open: warning: data keys are not in locked memory: %s\n",
                p11kms_last_error());

    /* The context is bound to the JWE: opening needs the same pairs. */
    const struct p11kms_context ctx[] = {{"app", "seal_open"}, {"purpose", "example"}};
    char *jwe = NULL;
    size_t jwe_len = 0;
    uint8_t *plain = NULL;
    size_t plain_len = 0;
    int rc = 1;

    st = p11kms_seal(c, key_id, ctx, 2, (const uint8_t *)payload, strlen(payload), &jwe, &jwe_len);
    if (st != P11KMS_OK) {
        rc = failed("seal", st);
        goto cleanup;
    }
    printf("%s\n", jwe);

    st = p11kms_open(c, jwe, jwe_len, ctx, 2, &plain, &plain_len);
    if (st != P11KMS_OK) {
        rc = failed("open", st);
        goto cleanup;
    }
    if (plain_len != strlen(payload) || memcmp(plain, payload, plain_len) != 0) {
        fprintf(stderr, "seal_open: the opened payload differs\n");
        goto cleanup;
    }
    printf("%.*s\n", (int)plain_len, (const char *)plain);

    /* Another context is refused, and no plaintext comes out. */
    const struct p11kms_context other[] = {{"app", "seal_open"}, {"purpose", "other"}};
    p11kms_free(plain, plain_len);
    plain = NULL;
    st = p11kms_open(c, jwe, jwe_len, other, 2, &plain, &plain_len);
    if (st != P11KMS_ERR_DECRYPT || plain) {
        fprintf(stderr, "seal_open: opening under another context gave %s\n",
                p11kms_status_name(st));
        goto cleanup;
    }
    rc = 0;

cleanup:
    p11kms_free(plain, plain_len);
    p11kms_free(jwe, jwe_len);
    p11kms_client_free(c);
    return rc;
}
