/*
 * encrypt and decrypt: files or stdin/stdout, in the streaming format
 * (p11kms_stream_encrypt, constant memory) or as a compact JWE (p11kms_seal,
 * up to JWE_PLAINTEXT_MAX). decrypt tells the two apart by the first bytes.
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

static int cmd_encrypt(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key"), *format = cli_arg(a, "format");
    struct p11kms_context *ctx = NULL;
    size_t nctx = 0;
    struct cli_io in, out = {0};
    struct cli_out_file of;
    struct cli_progress prog;
    struct p11kms_stream_options so = {0};
    p11kms_client *c;
    uint64_t size, plain = 0;
    int jwe, rc;

    if (!key)
        return CLI_EXIT_USAGE;
    if (format && strcmp(format, "stream") != 0 && strcmp(format, "jwe") != 0)
        return cli_usage_error(cli, "--format is stream or jwe, not %s", format);
    jwe = format && strcmp(format, "jwe") == 0;
    if ((rc = cli_contexts(a, &ctx, &nctx)) != 0)
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
    if (jwe) {
        rc = encrypt_jwe(cli, c, key, ctx, nctx, &in, &out, &plain);
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
    free(ctx);
    if (rc == 0)
        rc = cli_out_close(cli, &of, &out, 1);
    else
        cli_out_close(cli, &of, &out, 0);
    if (rc == 0)
        summary(cli, &of, jwe ? "jwe" : "stream", plain);
    return rc;
}

/* ---- decrypt ---- */

static int decrypt_jwe(struct cli *cli, p11kms_client *c, const struct p11kms_context *ctx,
                       size_t nctx, struct cli_io *in, struct cli_io *out, uint64_t *plain)
{
    uint8_t *text = malloc(JWE_TEXT_MAX + 1), *pt = NULL;
    size_t n = 0, pt_len = 0;
    p11kms_status st;
    int rc = 0;
    if (!text)
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    if (cli_read_full(in, text, JWE_TEXT_MAX + 1, &n) != 0) {
        rc = cli_io_fail(cli, in, out);
        goto cleanup;
    }
    if (n > JWE_TEXT_MAX) {
        rc =
            cli_fail(cli, CLI_EXIT_INTEGRITY, "MalformedEnvelope",
                     "%s: neither a stream nor a JWE of at most %zu bytes", in->name, JWE_TEXT_MAX);
        goto cleanup;
    }
    while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r' || text[n - 1] == ' '))
        n--;
    text[n] = '\0';
    if ((st = p11kms_open(c, (const char *)text, n, ctx, nctx, &pt, &pt_len)) != P11KMS_OK) {
        rc = cli_fail_status(cli, st, 0);
        goto cleanup;
    }
    if (cli_io_write(out, pt, pt_len) != P11KMS_OK)
        rc = cli_io_fail(cli, in, out);
    *plain = pt_len;
cleanup:
    free(text);
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
    int stream = 0, rc;

    if ((rc = cli_contexts(a, &ctx, &nctx)) != 0)
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
        stream = 1;
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
        /* Not a stream: a JWE, whole in memory. */
        in.pre_off = 0;
        rc = decrypt_jwe(cli, c, ctx, nctx, &in, &out, &plain);
    }
    cli_in_close(&in);
    free(ctx);
    if (rc == 0)
        rc = cli_out_close(cli, &of, &out, 1);
    else
        cli_out_close(cli, &of, &out, 0);
    if (rc == 0)
        summary(cli, &of, stream ? "stream" : "jwe", plain);
    return rc;
}

static const struct cli_opt encrypt_opts[] = {
    {"key", 'k', 1, "the key: id, ARN, alias name (alias/x) or alias ARN"},
    {"context", 'c', 1, "an encryption-context pair KEY=VALUE (repeat for more)"},
    {"in", 'i', 1, "the input file (default: stdin; - for stdin)"},
    {"out", 'o', 1, "the output file (default: stdout; - for stdout)"},
    {"format", 0, 1, "stream (the default: any size) or jwe (compact JWE, at most 1 MiB)"},
    {NULL, 0, 0, NULL},
};
static const struct cli_opt decrypt_opts[] = {
    {"context", 'c', 1, "an encryption-context pair KEY=VALUE: the same as encrypt's"},
    {"in", 'i', 1, "the input file (default: stdin; - for stdin)"},
    {"out", 'o', 1, "the output file (default: stdout; - for stdout)"},
    {NULL, 0, 0, NULL},
};

const struct cli_cmd cli_data_commands[] = {
    {NULL, "encrypt", "Encrypt a file or stdin under a data key of KEY (streaming format or JWE).",
     "--key KEY [--context K=V]... [-i IN] [-o OUT] [--format stream|jwe]", encrypt_opts,
     cmd_encrypt},
    {NULL, "decrypt", "Decrypt what encrypt wrote (either format, told apart by its first bytes).",
     "[--context K=V]... [-i IN] [-o OUT]", decrypt_opts, cmd_decrypt},
};
const size_t cli_data_commands_count = sizeof cli_data_commands / sizeof cli_data_commands[0];
