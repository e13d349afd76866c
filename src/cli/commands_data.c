/*
 * encrypt and decrypt: files or stdin/stdout, in the streaming format
 * (p11kms_stream_encrypt, constant memory), as a compact JWE under a data key
 * (p11kms_seal), or as a JWE or CMS sealed to public keys (p11kms_envelope_seal;
 * a symmetric KMS key is a CMS KEKRecipientInfo); the last three in memory, up
 * to JWE_PLAINTEXT_MAX. decrypt tells them apart by the first bytes.
 *
 * Output to a file goes to a temporary file beside it (mode 0600), renamed
 * over the name asked for only when everything verified, and removed
 * otherwise: a failed decryption never leaves a partial file under that name.
 * On stdout the verified chunks of a truncated stream are already out; the
 * error says so.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"

#define JWE_PLAINTEXT_MAX ((size_t)1 << 20) /* --format jwe: the payload in memory */
#define JWE_TEXT_MAX ((size_t)4 << 20)      /* a JWE's text, base64url of the above and more */
p11kms_status cli_io_read(void *arg, uint8_t *buf, size_t cap, size_t *got)
{
    struct cli_io *in = arg;
    ssize_t r;
    *got = 0;
    if (in->pre_off < in->pre_len) {
        size_t n = in->pre_len - in->pre_off;
        if (n > cap)
            n = cap;
        memcpy(buf, in->pre + in->pre_off, n);
        in->pre_off += n;
        *got = n;
        return P11KMS_OK;
    }
    do
        r = read(in->fd, buf, cap);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
        in->err = errno;
        return P11KMS_ERR_ARGUMENT;
    }
    *got = (size_t)r;
    in->count += (uint64_t)r;
    return P11KMS_OK;
}

p11kms_status cli_io_write(void *arg, const uint8_t *buf, size_t n)
{
    struct cli_io *out = arg;
    while (n > 0) {
        ssize_t w = write(out->fd, buf, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            out->err = w < 0 ? errno : EIO;
            return P11KMS_ERR_ARGUMENT;
        }
        buf += w;
        n -= (size_t)w;
        out->count += (uint64_t)w;
    }
    return P11KMS_OK;
}

int cli_read_full(struct cli_io *in, uint8_t *buf, size_t cap, size_t *n)
{
    *n = 0;
    while (*n < cap) {
        size_t got;
        if (cli_io_read(in, buf + *n, cap - *n, &got) != P11KMS_OK)
            return -1;
        if (got == 0)
            break;
        *n += got;
    }
    return 0;
}

/* ---- the output file ---- */

int cli_out_open(struct cli *cli, const char *path, struct cli_out_file *of, struct cli_io *out)
{
    size_t n;
    memset(of, 0, sizeof *of);
    out->name = "stdout";
    out->fd = STDOUT_FILENO;
    if (!path || strcmp(path, "-") == 0)
        return 0;
    of->path = path;
    n = strlen(path) + sizeof ".p11kms-XXXXXX";
    if (!(of->tmp = malloc(n)))
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    snprintf(of->tmp, n, "%s.p11kms-XXXXXX", path);
    if ((out->fd = mkstemp(of->tmp)) < 0) {
        int e = errno;
        free(of->tmp);
        of->tmp = NULL;
        return cli_fail(cli, CLI_EXIT_LOCAL, "IOError", "%s: %s", path, strerror(e));
    }
    out->name = path;
    return 0;
}

int cli_out_close(struct cli *cli, struct cli_out_file *of, struct cli_io *out, int ok)
{
    int rc = 0;
    if (!of->path)
        return 0;
    if (ok && (fsync(out->fd) != 0 || close(out->fd) != 0 || rename(of->tmp, of->path) != 0)) {
        rc = cli_fail(cli, CLI_EXIT_LOCAL, "IOError", "%s: %s", of->path, strerror(errno));
        ok = 0;
    } else if (!ok) {
        close(out->fd);
    }
    if (!ok)
        unlink(of->tmp);
    free(of->tmp);
    of->tmp = NULL;
    return rc;
}

int cli_in_open(struct cli *cli, const char *path, struct cli_io *in, uint64_t *size)
{
    struct stat st;
    memset(in, 0, sizeof *in);
    *size = 0;
    if (!path || strcmp(path, "-") == 0) {
        in->fd = STDIN_FILENO;
        in->name = "stdin";
    } else if ((in->fd = open(path, O_RDONLY | O_CLOEXEC)) < 0) {
        return cli_fail(cli, CLI_EXIT_LOCAL, "IOError", "%s: %s", path, strerror(errno));
    } else {
        in->name = path;
    }
    if (fstat(in->fd, &st) == 0 && S_ISREG(st.st_mode))
        *size = (uint64_t)st.st_size;
    return 0;
}

void cli_in_close(struct cli_io *in)
{
    if (in->fd != STDIN_FILENO)
        close(in->fd);
}

int cli_io_fail(struct cli *cli, const struct cli_io *in, const struct cli_io *out)
{
    const struct cli_io *bad = in->err ? in : out;
    return cli_fail(cli, CLI_EXIT_LOCAL, "IOError", "%s: %s", bad->name, strerror(bad->err));
}

/*
 * The whole of path (stdin for NULL or "-"), 1 to max bytes: *out is the
 * caller's to free. hint (may be NULL) follows the message when it is longer.
 */
int cli_read_input(struct cli *cli, const char *path, const char *what, const char *hint,
                   size_t max, uint8_t **out, size_t *n)
{
    struct cli_io in;
    uint64_t size;
    uint8_t *buf;
    int rc;

    *out = NULL;
    *n = 0;
    if ((rc = cli_in_open(cli, path, &in, &size)) != 0)
        return rc;
    if (!(buf = malloc(max + 1))) {
        cli_in_close(&in);
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    }
    if (cli_read_full(&in, buf, max + 1, n) != 0)
        rc = cli_fail(cli, CLI_EXIT_LOCAL, "IOError", "%s: %s", in.name, strerror(in.err));
    else if (*n == 0)
        rc = cli_usage_error(cli, "%s (%s) is empty", what, in.name);
    else if (*n > max)
        rc = cli_usage_error(cli, "%s (%s) is over %zu bytes%s", what, in.name, max,
                             hint ? hint : "");
    cli_in_close(&in);
    if (rc != 0) {
        free(buf);
        *n = 0;
        return rc;
    }
    *out = buf;
    return 0;
}

/* 1 when out_path names the same file as in_path (the output would replace the input). */
static int same_file(const char *in_path, const char *out_path)
{
    struct stat a, b;
    if (!in_path || !out_path || strcmp(in_path, "-") == 0 || strcmp(out_path, "-") == 0)
        return 0;
    return stat(in_path, &a) == 0 && stat(out_path, &b) == 0 && a.st_dev == b.st_dev &&
           a.st_ino == b.st_ino;
}

/* Refuses -o naming the input file before anything is read or sent. */
int cli_check_paths(struct cli *cli, const struct cli_args *a)
{
    const char *in = cli_arg(a, "in"), *out = cli_arg(a, "out");
    if (same_file(in, out))
        return cli_usage_error(cli, "-o %s is the input file; it would be overwritten", out);
    return 0;
}

static void summary(struct cli *cli, const struct cli_out_file *of, const char *format,
                    uint64_t plaintext)
{
    json_t *s;
    if (!cli->json || !of->path)
        return; /* stdout carries the data */
    s = json_pack("{s:s,s:I,s:s}", "Format", format, "PlaintextBytes", (json_int_t)plaintext,
                  "Output", of->path);
    cli_print(cli, s);
    json_decref(s);
}

/* ---- encrypt ---- */

static int encrypt_jwe(struct cli *cli, p11kms_client *c, const char *key,
                       const struct p11kms_context *ctx, size_t nctx, struct cli_io *in,
                       struct cli_io *out, uint64_t *plain)
{
    uint8_t *buf = malloc(JWE_PLAINTEXT_MAX + 1);
    char *jwe = NULL;
    size_t n = 0, jwe_len = 0;
    p11kms_status st;
    int rc = 0;
    if (!buf)
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    if (cli_read_full(in, buf, JWE_PLAINTEXT_MAX + 1, &n) != 0) {
        rc = cli_io_fail(cli, in, out);
    } else if (n > JWE_PLAINTEXT_MAX) {
        rc = cli_usage_error(cli,
                             "--format jwe takes at most %zu bytes; the stream format "
                             "(the default) takes any size",
                             JWE_PLAINTEXT_MAX);
    } else if ((st = p11kms_seal(c, key, ctx, nctx, buf, n, &jwe, &jwe_len)) != P11KMS_OK) {
        rc = cli_fail_status(cli, st, 0);
    } else if (cli_io_write(out, (const uint8_t *)jwe, jwe_len) != P11KMS_OK ||
               cli_io_write(out, (const uint8_t *)"\n", 1) != P11KMS_OK) {
        rc = cli_io_fail(cli, in, out);
    }
    *plain = n;
    p11kms_free(buf, JWE_PLAINTEXT_MAX + 1);
    p11kms_free(jwe, jwe_len);
    return rc;
}

/* ---- encrypt to public keys (JWE, CMS) ---- */

#define RECIPIENT_FILE_MAX (64 << 10)

enum enc_format { ENC_STREAM, ENC_JWE, ENC_JWE_JSON, ENC_CMS };

struct recipients {
    p11kms_recipient *r[CLI_MAX_ARGS];
    size_t n;
    int symmetric_only; /* one --key, symmetric (or not ours to inspect): p11kms_seal's JWE */
};

static void recipients_free(struct recipients *rs)
{
    for (size_t i = 0; i < rs->n; i++)
        p11kms_recipient_free(rs->r[i]);
    rs->n = 0;
}

/*
 * A --key as a recipient. An asymmetric key's public half comes from one
 * GetPublicKey. A key GetPublicKey refuses (symmetric: UnsupportedOperation;
 * or a caller allowed to GenerateDataKey but not GetPublicKey: AccessDenied)
 * is, for --format jwe alone, p11kms_seal's JWE as before; for cms a
 * symmetric key is a KEKRecipientInfo.
 */
static int key_recipient(struct cli *cli, p11kms_client *c, const char *key, enum enc_format f,
                         int alone, struct recipients *rs)
{
    struct p11kms_public_key pk;
    p11kms_status st = p11kms_get_public_key(c, key, &pk);
    int rc = 0;

    if ((st == P11KMS_ERR_UNSUPPORTED || st == P11KMS_ERR_ACCESS_DENIED) && f == ENC_JWE && alone)
        rs->symmetric_only = 1;
    else if (st == P11KMS_ERR_UNSUPPORTED && f == ENC_CMS)
        st = p11kms_recipient_from_key(c, key, &rs->r[rs->n]);
    else if (st == P11KMS_ERR_UNSUPPORTED)
        rc = cli_usage_error(cli,
                             "%s has no public key: a symmetric key seals --format jwe alone "
                             "(one --key) or --format cms",
                             key);
    else if (st == P11KMS_OK && strcmp(pk.key_usage, "ENCRYPT_DECRYPT") != 0 &&
             strcmp(pk.key_usage, "KEY_AGREEMENT") != 0)
        rc = cli_fail(cli, cli_exit_code(P11KMS_ERR_INVALID_KEY_USAGE),
                      p11kms_status_name(P11KMS_ERR_INVALID_KEY_USAGE),
                      "%s is a %s key for %s; an envelope needs ENCRYPT_DECRYPT or KEY_AGREEMENT",
                      pk.key_arn, pk.key_spec, pk.key_usage);
    else if (st == P11KMS_OK)
        st = p11kms_recipient_from_public(pk.der, pk.der_len, pk.key_arn, &rs->r[rs->n]);
    p11kms_public_key_clear(&pk);
    if (rc != 0 || rs->symmetric_only)
        return rc;
    if (st != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    rs->n++;
    return 0;
}

static int file_recipient(struct cli *cli, const char *path, struct recipients *rs)
{
    uint8_t *data = NULL;
    size_t n = 0;
    p11kms_status st;
    int rc;

    if (strcmp(path, "-") == 0)
        return cli_usage_error(cli, "--to-pem wants a file, not stdin");
    if ((rc = cli_read_input(cli, path, "the recipient's key", NULL, RECIPIENT_FILE_MAX, &data,
                             &n)) != 0)
        return rc;
    st = p11kms_recipient_from_public(data, n, NULL, &rs->r[rs->n]);
    free(data);
    if (st != P11KMS_OK)
        return cli_fail(cli, cli_exit_code(st), p11kms_status_name(st), "%s: %s", path,
                        p11kms_last_error());
    rs->n++;
    return 0;
}

static int make_recipients(struct cli *cli, p11kms_client *c, const struct cli_args *a,
                           enum enc_format f, struct recipients *rs)
{
    size_t total = 0;
    int rc = 0;

    for (size_t i = 0; i < a->n; i++)
        total += strcmp(a->name[i], "key") == 0 || strcmp(a->name[i], "to-pem") == 0;
    for (size_t i = 0; i < a->n && rc == 0; i++) {
        if (strcmp(a->name[i], "key") == 0)
            rc = key_recipient(cli, c, a->value[i], f, total == 1, rs);
        else if (strcmp(a->name[i], "to-pem") == 0)
            rc = file_recipient(cli, a->value[i], rs);
    }
    if (rc != 0)
        recipients_free(rs);
    return rc;
}

/* --format jwe, jwe-json or cms to public keys (or cms to a symmetric KMS key). */
static int encrypt_envelope(struct cli *cli, p11kms_client *c, enum enc_format f,
                            const struct recipients *rs, struct cli_io *in, struct cli_io *out,
                            uint64_t *plain)
{
    uint8_t *buf = malloc(JWE_PLAINTEXT_MAX + 1), *env = NULL;
    size_t n = 0, env_len = 0;
    p11kms_envelope_format ef = f == ENC_CMS                 ? P11KMS_FORMAT_CMS
                                : f == ENC_JWE && rs->n == 1 ? P11KMS_FORMAT_JWE_COMPACT
                                                             : P11KMS_FORMAT_JWE_JSON;
    p11kms_status st;
    int rc = 0;

    if (!buf)
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    if (cli_read_full(in, buf, JWE_PLAINTEXT_MAX + 1, &n) != 0)
        rc = cli_io_fail(cli, in, out);
    else if (n > JWE_PLAINTEXT_MAX)
        rc = cli_usage_error(cli,
                             "--format jwe and cms take at most %zu bytes; the stream format "
                             "(the default) takes any size",
                             JWE_PLAINTEXT_MAX);
    else if ((st = p11kms_envelope_seal(c, ef, rs->r, rs->n, buf, n, &env, &env_len)) != P11KMS_OK)
        rc = cli_fail_status(cli, st, 0);
    else if (cli_io_write(out, env, env_len) != P11KMS_OK ||
             (f != ENC_CMS && cli_io_write(out, (const uint8_t *)"\n", 1) != P11KMS_OK))
        rc = cli_io_fail(cli, in, out);
    *plain = n;
    p11kms_free(buf, JWE_PLAINTEXT_MAX + 1);
    p11kms_free(env, env_len);
    return rc;
}

static const char *const FORMAT_NAMES[] = {"stream", "jwe", "jwe-json", "cms"};

static int parse_format(struct cli *cli, const char *format, enum enc_format *f)
{
    *f = ENC_STREAM;
    for (size_t i = 0; format && i < sizeof FORMAT_NAMES / sizeof FORMAT_NAMES[0]; i++)
        if (strcmp(format, FORMAT_NAMES[i]) == 0) {
            *f = (enum enc_format)i;
            return 0;
        }
    return format ? cli_usage_error(cli, "--format is stream, jwe, jwe-json or cms, not %s", format)
                  : 0;
}

static int cmd_encrypt(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_arg(a, "key");
    struct p11kms_context *ctx = NULL;
    struct recipients rs = {.n = 0};
    size_t nctx = 0, keys = 0, pems = 0;
    struct cli_io in, out = {0};
    struct cli_out_file of;
    struct cli_progress prog;
    struct p11kms_stream_options so = {0};
    p11kms_client *c;
    uint64_t size, plain = 0;
    enum enc_format f;
    int rc;

    for (size_t i = 0; i < a->n; i++) {
        keys += strcmp(a->name[i], "key") == 0;
        pems += strcmp(a->name[i], "to-pem") == 0;
    }
    if ((rc = parse_format(cli, cli_arg(a, "format"), &f)) != 0)
        return rc;
    if (keys + pems == 0)
        return cli_usage_error(cli, "--key KEY%s is required",
                               f == ENC_STREAM ? "" : " or --to-pem FILE");
    if (f == ENC_STREAM && (keys > 1 || pems > 0))
        return cli_usage_error(cli, "the stream format takes one --key; --to-pem and several "
                                    "recipients need --format jwe, jwe-json or cms");
    if ((rc = cli_check_paths(cli, a)) != 0 || (rc = cli_contexts(a, &ctx, &nctx)) != 0)
        return rc;
    if ((rc = cli_client(cli, &c)) != 0 ||
        (f != ENC_STREAM && (rc = make_recipients(cli, c, a, f, &rs)) != 0)) {
        free(ctx);
        return rc;
    }
    if (nctx && f != ENC_STREAM && !rs.symmetric_only) {
        recipients_free(&rs);
        free(ctx);
        return cli_usage_error(cli, "--context binds a data key of a symmetric KMS key; "
                                    "an envelope to public keys has none");
    }
    if ((rc = cli_in_open(cli, cli_arg(a, "in"), &in, &size)) != 0) {
        recipients_free(&rs);
        free(ctx);
        return rc;
    }
    if ((rc = cli_out_open(cli, cli_arg(a, "out"), &of, &out)) != 0) {
        cli_in_close(&in);
        recipients_free(&rs);
        free(ctx);
        return rc;
    }
    if (rs.symmetric_only) {
        rc = encrypt_jwe(cli, c, key, ctx, nctx, &in, &out, &plain);
    } else if (f != ENC_STREAM) {
        rc = encrypt_envelope(cli, c, f, &rs, &in, &out, &plain);
    } else {
        p11kms_status st;
        cli_progress_init(&prog, cli, "encrypting", size);
        so.progress = cli_progress_update;
        so.progress_arg = &prog;
        st = p11kms_stream_encrypt(c, key, ctx, nctx, &so, cli_io_read, &in, cli_io_write, &out);
        plain = in.count;
        cli_progress_end(&prog, plain);
        if (in.err || out.err)
            rc = cli_io_fail(cli, &in, &out);
        else if (st != P11KMS_OK)
            rc = cli_fail_status(cli, st, of.path == NULL);
    }
    cli_in_close(&in);
    recipients_free(&rs);
    free(ctx);
    if (rc == 0)
        rc = cli_out_close(cli, &of, &out, 1);
    else
        cli_out_close(cli, &of, &out, 0);
    if (rc == 0)
        summary(cli, &of, FORMAT_NAMES[f], plain);
    return rc;
}

/* ---- decrypt ---- */

/* A JWE (any alg) or CMS, whole in memory, opened through the service or --private-key. */
static int decrypt_envelope(struct cli *cli, p11kms_client *c, const struct cli_args *a,
                            const struct p11kms_context *ctx, size_t nctx, struct cli_io *in,
                            struct cli_io *out, uint64_t *plain, const char **format)
{
    const char *pk_path = cli_arg(a, "private-key");
    uint8_t *text = malloc(JWE_TEXT_MAX + 1), *pt = NULL, *pk = NULL;
    size_t n = 0, pt_len = 0, pk_len = 0;
    struct p11kms_opener o = {
        .client = c, .key_id = cli_arg(a, "key"), .context = ctx, .n_context = nctx};
    p11kms_status st;
    int rc = 0;

    if (!text)
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    if (cli_read_full(in, text, JWE_TEXT_MAX + 1, &n) != 0) {
        rc = cli_io_fail(cli, in, out);
        goto cleanup;
    }
    if (n > JWE_TEXT_MAX || p11kms_envelope_detect(text, n) < 0) {
        rc = cli_fail(cli, CLI_EXIT_INTEGRITY, "MalformedEnvelope",
                      "%s: neither a stream, a JWE nor CMS of at most %zu bytes", in->name,
                      JWE_TEXT_MAX);
        goto cleanup;
    }
    *format = p11kms_envelope_detect(text, n) == P11KMS_FORMAT_CMS ? "cms" : "jwe";
    if (strcmp(*format, "cms") != 0)
        while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r' || text[n - 1] == ' '))
            n--;
    text[n] = '\0';
    if (pk_path) {
        if (strcmp(pk_path, "-") == 0) {
            rc = cli_usage_error(cli, "--private-key wants a file, not stdin");
            goto cleanup;
        }
        if ((rc = cli_read_input(cli, pk_path, "the private key", NULL, RECIPIENT_FILE_MAX, &pk,
                                 &pk_len)) != 0)
            goto cleanup;
        o.private_key = pk;
        o.private_key_len = pk_len;
    }
    if ((st = p11kms_envelope_open(&o, text, n, &pt, &pt_len)) != P11KMS_OK) {
        rc = cli_fail_status(cli, st, 0);
        goto cleanup;
    }
    if (cli_io_write(out, pt, pt_len) != P11KMS_OK)
        rc = cli_io_fail(cli, in, out);
    *plain = pt_len;
cleanup:
    free(text);
    p11kms_free(pk, pk_len);
    p11kms_free(pt, pt_len);
    return rc;
}

static int cmd_decrypt(struct cli *cli, const struct cli_args *a)
{
    struct p11kms_context *ctx = NULL;
    size_t nctx = 0;
    struct cli_io in, out = {0};
    struct cli_out_file of;
    struct cli_progress prog;
    struct p11kms_stream_options so = {0};
    p11kms_client *c;
    uint64_t size, plain = 0;
    const char *format = "stream";
    int rc;

    if ((rc = cli_check_paths(cli, a)) != 0 || (rc = cli_contexts(a, &ctx, &nctx)) != 0)
        return rc;
    if ((rc = cli_client(cli, &c)) != 0 ||
        (rc = cli_in_open(cli, cli_arg(a, "in"), &in, &size)) != 0) {
        free(ctx);
        return rc;
    }
    if ((rc = cli_out_open(cli, cli_arg(a, "out"), &of, &out)) != 0) {
        cli_in_close(&in);
        free(ctx);
        return rc;
    }
    if (cli_read_full(&in, in.pre, sizeof in.pre, &in.pre_len) != 0) {
        rc = cli_io_fail(cli, &in, &out);
    } else if (in.pre_len >= 4 && p11kms_stream_detect(in.pre, in.pre_len)) {
        p11kms_status st;
        cli_progress_init(&prog, cli, "decrypting", 0);
        so.progress = cli_progress_update;
        so.progress_arg = &prog;
        st = p11kms_stream_decrypt(c, ctx, nctx, &so, cli_io_read, &in, cli_io_write, &out);
        plain = out.count;
        cli_progress_end(&prog, plain);
        if (in.err || out.err) {
            rc = cli_io_fail(cli, &in, &out);
        } else if (st != P11KMS_OK) {
            rc = cli_fail_status(cli, st, of.path == NULL);
            if (st == P11KMS_ERR_TRUNCATED && of.path)
                fprintf(stderr, "p11kms: the stream is incomplete; %s was not written\n", of.path);
            else if (st == P11KMS_ERR_TRUNCATED)
                fprintf(stderr,
                        "p11kms: the stream is incomplete; %llu bytes of verified plaintext "
                        "were written to stdout before its end\n",
                        (unsigned long long)plain);
        }
    } else {
        /* Not a stream: a JWE or CMS, whole in memory. */
        in.pre_off = 0;
        rc = decrypt_envelope(cli, c, a, ctx, nctx, &in, &out, &plain, &format);
    }
    cli_in_close(&in);
    free(ctx);
    if (rc == 0)
        rc = cli_out_close(cli, &of, &out, 1);
    else
        cli_out_close(cli, &of, &out, 0);
    if (rc == 0)
        summary(cli, &of, format, plain);
    return rc;
}

static const struct cli_opt encrypt_opts[] = {
    {"key", 'k', 1, "the key: id, ARN, alias name (alias/x) or alias ARN (repeat: recipients)"},
    {"to-pem", 0, 1, "a recipient's public key or certificate (PEM, DER or JWK file; repeat)"},
    {"context", 'c', 1, "an encryption-context pair KEY=VALUE (repeat for more)"},
    {"in", 'i', 1, "the input file (default: stdin; - for stdin)"},
    {"out", 'o', 1, "the output file (default: stdout; - for stdout)"},
    {"format", 0, 1, "stream (the default: any size), jwe, jwe-json or cms (at most 1 MiB)"},
    {NULL, 0, 0, NULL},
};
static const struct cli_opt decrypt_opts[] = {
    {"context", 'c', 1, "an encryption-context pair KEY=VALUE: the same as encrypt's"},
    {"key", 'k', 1, "the KMS key to open a JWE or CMS with (default: the one it names)"},
    {"private-key", 0, 1, "open a JWE or CMS with this local private key file instead"},
    {"in", 'i', 1, "the input file (default: stdin; - for stdin)"},
    {"out", 'o', 1, "the output file (default: stdout; - for stdout)"},
    {NULL, 0, 0, NULL},
};

const struct cli_cmd cli_data_commands[] = {
    {NULL, "encrypt",
     "Encrypt a file or stdin: a stream or JWE under KEY, or a JWE or CMS to keys.",
     "(--key KEY | --to-pem FILE)... [--format stream|jwe|jwe-json|cms] [--context K=V]... "
     "[-i IN] [-o OUT]",
     encrypt_opts, cmd_encrypt, 0},
    {NULL, "decrypt", "Decrypt what encrypt wrote (any format, told apart by its first bytes).",
     "[--context K=V]... [--key KEY] [--private-key FILE] [-i IN] [-o OUT]", decrypt_opts,
     cmd_decrypt, 0},
};
const size_t cli_data_commands_count = sizeof cli_data_commands / sizeof cli_data_commands[0];
