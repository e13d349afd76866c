/*
 * libFuzzer target: the server's configuration file and credentials file
 * parsers (src/server/settings.c). The same text goes to both, each into a
 * fresh structure that is freed before the next run.
 */
#include "config.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "server/settings.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* p11kmsd --check-config's way: every line reported; a problem always has its words. */
static void on_report(void *arg, unsigned line, const char *key, const char *message)
{
    (void)line;
    if (message ? !*message : !key)
        abort();
    ++*(unsigned *)arg;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    if (!text)
        return 0;
    memcpy(text, data, size);
    text[size] = '\0';

    struct kms_config c;
    kms_config_defaults(&c);
    if (kms_config_parse(&c, text) == KMS_OK)
        (void)!kms_config_check(&c); /* refusal is an outcome, not a fault */
    kms_config_free(&c);

    unsigned reports = 0;
    kms_config_defaults(&c);
    if (kms_config_parse_each(&c, text, on_report, &reports) != KMS_OK && reports == 0)
        abort(); /* refused without saying why */
    (void)!kms_config_check_each(&c, on_report, &reports);
    kms_config_free(&c);

    struct kms_credentials cr;
    if (kms_credentials_parse(text, &cr) == KMS_OK) {
        if (cr.n == 0 || !kms_credentials_find(&cr, cr.p[0].access_key, strlen(cr.p[0].access_key)))
            abort();
        kms_credentials_free(&cr);
    }
    free(text);
    return 0;
}
