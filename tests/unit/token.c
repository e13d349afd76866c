/* The throw-away token of token.h. */
#include "config.h"

#include "token.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

const char *test_token_module(void)
{
    const char *m = getenv("SOFTHSM_MODULE");
    return m && *m ? m : P11KMS_SOFTHSM_MODULE;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

int test_token_make(char *dir, size_t n)
{
    char conf[256], tokens[192];
    const char *base = getenv("TMPDIR");
    snprintf(dir, n, "%s/p11kms-hsm-XXXXXX", base && *base && strlen(base) < 80 ? base : "/tmp");
    if (!mkdtemp(dir))
        return -1;
    snprintf(tokens, sizeof tokens, "%s/tokens", dir);
    snprintf(conf, sizeof conf, "%s/softhsm2.conf", dir);
    if (mkdir(tokens, 0700) != 0)
        return -1;
    FILE *fp = fopen(conf, "w");
    if (!fp)
        return -1;
    fprintf(fp,
            "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
            "slots.removable = false\n",
            tokens);
    if (fclose(fp) != 0 || setenv("SOFTHSM2_CONF", conf, 1) != 0)
        return -1;
    if (kms_hsm_init_token(test_token_module(), TEST_TOKEN_LABEL, TEST_TOKEN_SO_PIN,
                           TEST_TOKEN_USER_PIN) != KMS_OK) {
        fprintf(stderr, "kms_hsm_init_token: %s\n", kms_err_message());
        return -1;
    }
    return 0;
}

kms_err test_token_open(struct kms_hsm **out)
{
    struct kms_hsm_config c = {.module = test_token_module(),
                               .token = TEST_TOKEN_LABEL,
                               .pin = TEST_TOKEN_USER_PIN,
                               .sessions = 2,
                               .acquire_timeout_ms = 300};
    return kms_hsm_open(&c, out);
}

void test_token_remove(const char *dir)
{
    nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}
