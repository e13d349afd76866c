#include "config.h"

#include "server/dev.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/encoding.h"
#include "common/log.h"

#define DEV_REGION "us-east-1"
#define DEV_ACCOUNT "111122223333"

kms_err kms_write_private_file(const char *path, const char *text)
{
    char tmp[4096];
    size_t n = strlen(text), done = 0;
    int fd;

    KMS_ENSURE(snprintf(tmp, sizeof tmp, "%s.tmp", path) < (int)sizeof tmp, KMS_ERR_VALIDATION,
               "path too long: %s", path);
    unlink(tmp);
    fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    KMS_ENSURE(fd >= 0, KMS_ERR_INTERNAL, "cannot create %s: %s", tmp, strerror(errno));
    while (done < n) {
        ssize_t w = write(fd, text + done, n - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            close(fd);
            unlink(tmp);
            return KMS_FAIL(KMS_ERR_INTERNAL, "cannot write %s: %s", tmp, strerror(errno));
        }
        done += (size_t)w;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        unlink(tmp);
        return KMS_FAIL(KMS_ERR_INTERNAL, "cannot write %s: %s", tmp, strerror(errno));
    }
    KMS_ENSURE(rename(tmp, path) == 0, KMS_ERR_INTERNAL, "cannot rename %s: %s", tmp,
               strerror(errno));
    return KMS_OK;
}

static kms_err make_dir(const char *path)
{
    KMS_ENSURE(mkdir(path, 0700) == 0 || errno == EEXIST, KMS_ERR_INTERNAL, "cannot create %s: %s",
               path, strerror(errno));
    return KMS_OK;
}

/*
 * The state folder holds the PINs and the credentials: it must be ours and
 * nobody else may write in it, or someone could plant a file there before we
 * read it (a softhsm2.conf naming their token, a credentials file of theirs).
 * Checked on the open folder (fstat), not on its name.
 */
static kms_err check_folder(int fd, const char *what, const char *path)
{
    struct stat st;
    KMS_ENSURE(fstat(fd, &st) == 0, KMS_ERR_INTERNAL, "cannot stat %s: %s", path, strerror(errno));
    KMS_ENSURE(S_ISDIR(st.st_mode), KMS_ERR_VALIDATION, "%s %s is not a folder", what, path);
    KMS_ENSURE(st.st_uid == geteuid(), KMS_ERR_VALIDATION,
               "%s %s belongs to uid %u, not to uid %u that p11kmsd runs as", what, path,
               (unsigned)st.st_uid, (unsigned)geteuid());
    KMS_ENSURE((st.st_mode & (S_IWGRP | S_IWOTH)) == 0, KMS_ERR_VALIDATION,
               "%s %s is writable by its group or others (mode %04o): chmod 700 %s", what, path,
               (unsigned)(st.st_mode & 07777), path);
    return KMS_OK;
}

static kms_err open_folder(int at, const char *name, const char *what, const char *path, int *out)
{
    int fd = openat(at, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0 && (errno == ELOOP || errno == ENOTDIR))
        return KMS_FAIL(KMS_ERR_VALIDATION,
                        "%s %s is a symbolic link or not a folder: p11kmsd does not follow links "
                        "in its state folder",
                        what, path);
    KMS_ENSURE(fd >= 0, KMS_ERR_INTERNAL, "cannot open %s: %s", path, strerror(errno));
    kms_err rc = check_folder(fd, what, path);
    if (rc != KMS_OK) {
        close(fd);
        return rc;
    }
    *out = fd;
    return KMS_OK;
}

/*
 * A state file p11kmsd would read or reuse: absent (*present = 0), or a
 * regular file of ours that only we can read and write. Opened without
 * following a link and checked on the open file, so what is checked is what
 * is there.
 */
static kms_err check_file(int dirfd, const char *dir, const char *name, int *present)
{
    struct stat st;
    kms_err rc = KMS_OK;
    int fd = openat(dirfd, name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC);

    *present = 0;
    if (fd < 0 && errno == ENOENT)
        return KMS_OK;
    if (fd < 0 && errno == ELOOP)
        return KMS_FAIL(KMS_ERR_VALIDATION,
                        "state file %s/%s is a symbolic link: p11kmsd does not follow links in its "
                        "state folder",
                        dir, name);
    KMS_ENSURE(fd >= 0, KMS_ERR_INTERNAL, "cannot open %s/%s: %s", dir, name, strerror(errno));
    if (fstat(fd, &st) != 0)
        rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot stat %s/%s: %s", dir, name, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        rc = KMS_FAIL(KMS_ERR_VALIDATION, "state file %s/%s is not a regular file", dir, name);
    else if (st.st_uid != geteuid())
        rc = KMS_FAIL(KMS_ERR_VALIDATION,
                      "state file %s/%s belongs to uid %u, not to uid %u that p11kmsd runs as", dir,
                      name, (unsigned)st.st_uid, (unsigned)geteuid());
    else if (st.st_mode & 077)
        rc = KMS_FAIL(KMS_ERR_VALIDATION,
                      "state file %s/%s has mode %04o: only its owner may read or write it "
                      "(chmod 600 %s/%s)",
                      dir, name, (unsigned)(st.st_mode & 07777), dir, name);
    close(fd);
    *present = rc == KMS_OK;
    return rc;
}

/* The files of a state folder; those p11kmsd reads are trusted only once checked. */
static const char *const state_files[] = {
    "softhsm2.conf", "so.pin",    "user.pin",      "credentials",   "env",
    "audit.log",     "p11kms.db", "p11kms.db-wal", "p11kms.db-shm", "p11kms.db-journal",
};

enum { HAVE_CONF = 0, HAVE_CREDENTIALS = 3 };

/* The folder, its tokens folder and every state file there is, checked; have[i]: state_files[i]. */
/*
 * Each folder above the state folder is root's or ours and writable by no one
 * else unless sticky (as /tmp): otherwise another user could put a folder of
 * theirs in place of the checked one between the checks and the later opens
 * by name (SoftHSM2 reads its files by name).
 */
static kms_err check_ancestors(const char *dir)
{
    char *real = realpath(dir, NULL);
    struct stat st;
    kms_err rc = KMS_OK;
    KMS_ENSURE(real != NULL, KMS_ERR_INTERNAL, "cannot resolve %s: %s", dir, strerror(errno));
    for (char *slash = strrchr(real, '/'); rc == KMS_OK && slash; slash = strrchr(real, '/')) {
        int top = slash == real;
        slash[top] = '\0'; /* "/a/b" -> "/a", "/a" -> "/" */
        if (stat(real, &st) != 0)
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot stat %s: %s", real, strerror(errno));
        else if (st.st_uid != 0 && st.st_uid != geteuid())
            rc = KMS_FAIL(KMS_ERR_VALIDATION,
                          "folder %s above the state folder belongs to uid %u: another user could "
                          "replace the state folder",
                          real, (unsigned)st.st_uid);
        else if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))
            rc = KMS_FAIL(KMS_ERR_VALIDATION,
                          "folder %s above the state folder is writable by its group or others "
                          "(mode %04o): another user could replace the state folder",
                          real, (unsigned)(st.st_mode & 07777));
        if (top)
            break;
    }
    free(real);
    return rc;
}

static kms_err check_state(const char *dir, int have[sizeof state_files / sizeof state_files[0]])
{
    char tokens[4096];
    int dirfd = -1, tokfd = -1;
    kms_err rc;

    KMS_GUARD(make_dir(dir));
    KMS_ENSURE(snprintf(tokens, sizeof tokens, "%s/tokens", dir) < (int)sizeof tokens,
               KMS_ERR_VALIDATION, "state directory path is too long");
    KMS_GUARD(open_folder(AT_FDCWD, dir, "state folder", dir, &dirfd));
    rc = check_ancestors(dir);
    if (rc == KMS_OK)
        rc = mkdirat(dirfd, "tokens", 0700) == 0 || errno == EEXIST
                 ? KMS_OK
                 : KMS_FAIL(KMS_ERR_INTERNAL, "cannot create %s: %s", tokens, strerror(errno));
    if (rc == KMS_OK)
        rc = open_folder(dirfd, "tokens", "tokens folder", tokens, &tokfd);
    for (size_t i = 0; rc == KMS_OK && i < sizeof state_files / sizeof state_files[0]; i++)
        rc = check_file(dirfd, dir, state_files[i], &have[i]);
    if (tokfd >= 0)
        close(tokfd);
    close(dirfd);
    return rc;
}

static int dir_is_empty(const char *path)
{
    DIR *d = opendir(path);
    struct dirent *e;
    int empty = 1;
    if (!d)
        return 1;
    while (empty && (e = readdir(d)) != NULL)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            empty = 0;
    closedir(d);
    return empty;
}

/* n random characters from alphabet (a power-of-two length, so no bias). */
static kms_err random_text(const char *alphabet, size_t alphabet_len, char *out, size_t n)
{
    uint8_t r[64];
    KMS_ENSURE(n < sizeof r && (alphabet_len & (alphabet_len - 1)) == 0, KMS_ERR_INTERNAL,
               "random text request out of range");
    KMS_ENSURE(RAND_bytes(r, (int)n) == 1, KMS_ERR_INTERNAL, "random generator failed");
    for (size_t i = 0; i < n; i++)
        out[i] = alphabet[r[i] & (alphabet_len - 1)];
    out[n] = '\0';
    OPENSSL_cleanse(r, sizeof r);
    return KMS_OK;
}

static const char hex_digits[] = "0123456789abcdef";
static const char base32[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
static const char base64ish[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static kms_err create_token(const char *dir, const char *so_pin_path, const char *user_pin_path,
                            const char *module)
{
    char so[33], user[33];
    kms_err rc = random_text(hex_digits, 16, so, 32);
    if (rc == KMS_OK)
        rc = random_text(hex_digits, 16, user, 32);
    if (rc == KMS_OK)
        rc = kms_write_private_file(so_pin_path, so);
    if (rc == KMS_OK)
        rc = kms_write_private_file(user_pin_path, user);
    if (rc == KMS_OK) {
        kms_info("initialising a SoftHSM2 token in %s", dir);
        rc = kms_hsm_init_token(module, KMS_DEV_TOKEN_LABEL, so, user);
    }
    OPENSSL_cleanse(so, sizeof so);
    OPENSSL_cleanse(user, sizeof user);
    return rc;
}

static kms_err create_credentials(const char *path)
{
    char akid[21], secret[41], line[128];
    kms_err rc;

    memcpy(akid, "AKIA", 4);
    rc = random_text(base32, 32, akid + 4, 16);
    if (rc == KMS_OK)
        rc = random_text(base64ish, 64, secret, 40);
    if (rc == KMS_OK) {
        snprintf(line, sizeof line, "# access-key-id secret-access-key principal\n%s %s dev\n",
                 akid, secret);
        rc = kms_write_private_file(path, line);
    }
    OPENSSL_cleanse(secret, sizeof secret);
    OPENSSL_cleanse(line, sizeof line);
    return rc;
}

static kms_err path_join(char *out, size_t n, const char *dir, const char *name)
{
    KMS_ENSURE(snprintf(out, n, "%s/%s", dir, name) < (int)n, KMS_ERR_VALIDATION,
               "state directory path is too long");
    return KMS_OK;
}

kms_err kms_dev_prepare(const char *dir, struct kms_config *cfg)
{
    char conf[4096], tokens[4096], so_pin[4096], user_pin[4096], creds[4096], text[8400];
    int have[sizeof state_files / sizeof state_files[0]] = {0};

    KMS_GUARD(check_state(dir, have));
    KMS_GUARD(path_join(conf, sizeof conf, dir, "softhsm2.conf"));
    KMS_GUARD(path_join(tokens, sizeof tokens, dir, "tokens"));
    KMS_GUARD(path_join(so_pin, sizeof so_pin, dir, "so.pin"));
    KMS_GUARD(path_join(user_pin, sizeof user_pin, dir, "user.pin"));
    KMS_GUARD(path_join(creds, sizeof creds, dir, "credentials"));
    if (!have[HAVE_CONF]) {
        snprintf(text, sizeof text,
                 "# SoftHSM2 configuration of this p11kmsd --dev state folder\n"
                 "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
                 "slots.removable = false\n",
                 tokens);
        KMS_GUARD(kms_write_private_file(conf, text));
    }
    KMS_ENSURE(setenv("SOFTHSM2_CONF", conf, 1) == 0, KMS_ERR_INTERNAL, "setenv failed");

    if (!cfg->module)
        KMS_GUARD(kms_config_set(cfg, "module", P11KMS_SOFTHSM_MODULE));
    if (dir_is_empty(tokens))
        KMS_GUARD(create_token(dir, so_pin, user_pin, cfg->module));
    if (!have[HAVE_CREDENTIALS])
        KMS_GUARD(create_credentials(creds));

    KMS_GUARD(kms_config_set(cfg, "token", KMS_DEV_TOKEN_LABEL));
    KMS_GUARD(kms_config_set(cfg, "pin_file", user_pin));
    KMS_GUARD(kms_config_set(cfg, "credentials_file", creds));
    if (!cfg->listen)
        KMS_GUARD(kms_config_set(cfg, "listen", KMS_DEV_LISTEN));
    if (!cfg->region)
        KMS_GUARD(kms_config_set(cfg, "region", DEV_REGION));
    if (!cfg->account)
        KMS_GUARD(kms_config_set(cfg, "account", DEV_ACCOUNT));
    if (!cfg->database) {
        char db[4096], url[4200];
        KMS_GUARD(path_join(db, sizeof db, dir, "p11kms.db"));
        snprintf(url, sizeof url, "sqlite:%s", db);
        KMS_GUARD(kms_config_set(cfg, "database", url));
    }
    /* Development convenience: /metrics without a token, but only on a loopback listener. */
    cfg->metrics_open_loopback = 1;
    if (!cfg->audit_log) {
        char audit[4096];
        KMS_GUARD(path_join(audit, sizeof audit, dir, "audit.log"));
        KMS_GUARD(kms_config_set(cfg, "audit_log", audit));
    }
    return KMS_OK;
}

kms_err kms_dev_ensure_key(struct kms_server *srv)
{
    struct kms_key_info k = {0};
    kms_err rc = kms_keystore_describe(srv->ks, KMS_DEV_ALIAS, &k);
    if (rc == KMS_OK) {
        kms_key_info_clear(&k);
        return KMS_OK;
    }
    kms_err_clear();
    KMS_GUARD(kms_keystore_create_key(srv->ks, "p11kms development key", NULL, &k));
    rc = kms_keystore_create_alias(srv->ks, KMS_DEV_ALIAS, k.id_text);
    if (rc == KMS_OK)
        kms_info("created key %s with alias %s", k.arn, KMS_DEV_ALIAS);
    kms_key_info_clear(&k);
    return rc;
}

kms_err kms_dev_write_env(const char *dir, struct kms_server *srv)
{
    char path[4096], endpoint[300], text[2048];
    const struct kms_principal *p = &srv->creds.p[0];
    const char *host = srv->host;
    int ipv6 = strchr(host, ':') != NULL;
    kms_err rc;

    if (strcmp(host, "0.0.0.0") == 0)
        host = "127.0.0.1";
    else if (strcmp(host, "::") == 0)
        host = "::1";
    snprintf(endpoint, sizeof endpoint, ipv6 ? "http://[%s]:%u" : "http://%s:%u", host, srv->port);
    KMS_GUARD(path_join(path, sizeof path, dir, "env"));
    snprintf(text, sizeof text,
             "export AWS_ACCESS_KEY_ID=%s\nexport AWS_SECRET_ACCESS_KEY='%s'\n"
             "export AWS_DEFAULT_REGION=%s\nexport AWS_REGION=%s\nexport AWS_ENDPOINT_URL=%s\n"
             "export P11KMS_ENDPOINT=%s\n",
             p->access_key, p->secret, srv->cfg.region, srv->cfg.region, endpoint, endpoint);
    rc = kms_write_private_file(path, text);
    OPENSSL_cleanse(text, sizeof text);
    if (rc == KMS_OK) {
        printf("p11kmsd: serving %s (key alias %s)\n", endpoint, KMS_DEV_ALIAS);
        printf("p11kmsd: credentials and endpoint for the aws CLI: . %s\n", path);
        fflush(stdout);
    }
    return rc;
}
