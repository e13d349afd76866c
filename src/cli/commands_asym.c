/*
 * sign, verify, mac, verify-mac and get-public-key: asymmetric and HMAC keys.
 *
 * The message comes from -i (a file, or stdin) whole: AWS signs and MACs at
 * most 4096 bytes, so a longer one is refused here with a pointer to
 * --digest (sign a digest made with `openssl dgst -binary`). Signatures,
 * tags and public keys are written raw (DER or PEM for the key) to -o or
 * stdout, as encrypt writes: an output file is a temporary file renamed into
 * place only when everything was written, and never the input file.
 *
 * verify and verify-mac exit 0 when the service says the signature or tag
 * is valid and 1 when it says it is not (KMSInvalidSignatureException,
 * KMSInvalidMacException), with a message naming the file, key and
 * algorithm; other failures exit as every command does.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"

#define MESSAGE_MAX P11KMS_MESSAGE_MAX
#define SIGNATURE_MAX 6144 /* AWS's bound on Signature and Mac */

/* ---- input and output ---- */

/* Writes n bytes to -o (or stdout); with --json and a file, prints what was written. */
static int write_output(struct cli *cli, const char *path, const uint8_t *p, size_t n,
                        const char *what, json_t *summary)
{
    struct cli_io out = {0};
    struct cli_out_file of;
    int rc;

    if ((rc = cli_out_open(cli, path, &of, &out)) != 0)
        return rc;
    if (cli_io_write(&out, p, n) != P11KMS_OK) {
        rc = cli_fail(cli, CLI_EXIT_LOCAL, "IOError", "%s: %s", out.name, strerror(out.err));
        cli_out_close(cli, &of, &out, 0);
        return rc;
    }
    if ((rc = cli_out_close(cli, &of, &out, 1)) != 0)
        return rc;
    if (cli->json && of.path && summary) {
        json_object_set_new(summary, what, json_integer((json_int_t)n));
        json_object_set_new(summary, "Output", json_string(of.path));
        cli_print(cli, summary);
    }
    return 0;
}

static int is_stdin(const char *path)
{
    return !path || strcmp(path, "-") == 0;
}

/* --signature or --mac and the message cannot both be stdin. */
static int check_stdin(struct cli *cli, const struct cli_args *a, const char *what,
                       const char *file)
{
    if (is_stdin(file) && is_stdin(cli_arg(a, "in")))
        return cli_usage_error(cli, "%s and the message cannot both come from stdin: give -i FILE",
                               what);
    return 0;
}

/* ---- sign and verify ---- */

/* The message, or with --digest its digest, from -i. */
static int read_message(struct cli *cli, const struct cli_args *a, uint8_t **msg, size_t *n)
{
    int digest = cli_flag(a, "digest");
    return cli_read_input(cli, cli_arg(a, "in"), digest ? "the digest" : "the message",
                          digest ? NULL
                                 : "; sign its digest instead: openssl dgst -sha256 -binary FILE | "
                                   "p11kms sign --digest ...",
                          MESSAGE_MAX, msg, n);
}

static int cmd_sign(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key"), *alg;
    p11kms_message_type type = cli_flag(a, "digest") ? P11KMS_MESSAGE_DIGEST : P11KMS_MESSAGE_RAW;
    uint8_t *msg = NULL, *sig = NULL;
    size_t n = 0, sig_len = 0;
    p11kms_client *c;
    p11kms_status st;
    json_t *summary;
    int rc;

    if (!key || !(alg = cli_required(cli, a, "algorithm")))
        return CLI_EXIT_USAGE;
    if ((rc = cli_check_paths(cli, a)) != 0 || (rc = cli_client(cli, &c)) != 0 ||
        (rc = read_message(cli, a, &msg, &n)) != 0)
        return rc;
    st = p11kms_sign(c, key, alg, type, msg, n, &sig, &sig_len);
    free(msg);
    if (st != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    summary = json_pack("{s:s,s:s}", "KeyId", key, "SigningAlgorithm", alg);
    rc = write_output(cli, cli_arg(a, "out"), sig, sig_len, "SignatureBytes", summary);
    json_decref(summary);
    p11kms_free(sig, sig_len);
    return rc;
}

/* verify's and verify-mac's answer: valid (0), or not (1) with a message that says so. */
static int report_check(struct cli *cli, p11kms_status st, p11kms_status invalid,
                        const char *member, const char *what, const char *file, const char *key,
                        const char *alg)
{
    json_t *answer;
    if (st == invalid)
        return cli_fail(cli, CLI_EXIT_SERVICE, p11kms_status_name(st),
                        "the %s in %s is not valid for this message under %s with %s", what, file,
                        key, alg);
    if (st != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    if (cli->json) {
        answer =
            json_pack("{s:s,s:b,s:s}", "KeyId", key, member, 1,
                      strcmp(member, "MacValid") == 0 ? "MacAlgorithm" : "SigningAlgorithm", alg);
        cli_print(cli, answer);
        json_decref(answer);
    } else if (!cli->quiet) {
        printf("%s: valid\n", member);
    }
    return 0;
}

static int cmd_verify(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key"), *alg = NULL, *sig_path = NULL;
    p11kms_message_type type = cli_flag(a, "digest") ? P11KMS_MESSAGE_DIGEST : P11KMS_MESSAGE_RAW;
    uint8_t *msg = NULL, *sig = NULL;
    size_t n = 0, sig_len = 0;
    p11kms_client *c;
    p11kms_status st;
    int rc;

    if (!key || !(alg = cli_required(cli, a, "algorithm")) ||
        !(sig_path = cli_required(cli, a, "signature")))
        return CLI_EXIT_USAGE;
    if ((rc = check_stdin(cli, a, "--signature", sig_path)) != 0 ||
        (rc = cli_client(cli, &c)) != 0 ||
        (rc = cli_read_input(cli, sig_path, "the signature", NULL, SIGNATURE_MAX, &sig,
                             &sig_len)) != 0)
        return rc;
    if ((rc = read_message(cli, a, &msg, &n)) != 0) {
        free(sig);
        return rc;
    }
    st = p11kms_verify(c, key, alg, type, msg, n, sig, sig_len);
    free(msg);
    free(sig);
    return report_check(cli, st, P11KMS_ERR_BAD_SIGNATURE, "SignatureValid", "signature", sig_path,
                        key, alg);
}

/* ---- mac and verify-mac ---- */

/*
 * --algorithm, or the one the key allows: DescribeKey's MacAlgorithms (an
 * HMAC key has exactly one), else HMAC_SHA_n from its KeySpec HMAC_n.
 * *alg is malloc'd.
 */
static int mac_algorithm(struct cli *cli, const struct cli_args *a, const char *key, char **alg)
{
    const char *given = cli_arg(a, "algorithm"), *spec;
    json_t *req, *answer = NULL, *meta, *list;
    int rc;

    *alg = NULL;
    if (given) {
        if (!(*alg = strdup(given)))
            return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
        return 0;
    }
    req = json_pack("{s:s}", "KeyId", key);
    rc = cli_call(cli, "DescribeKey", req, &answer);
    json_decref(req);
    if (rc != 0)
        return rc;
    meta = json_object_get(answer, "KeyMetadata");
    list = json_object_get(meta, "MacAlgorithms");
    spec = json_string_value(json_object_get(meta, "KeySpec"));
    if (json_is_array(list) && json_array_size(list) == 1 &&
        json_is_string(json_array_get(list, 0))) {
        *alg = strdup(json_string_value(json_array_get(list, 0)));
    } else if (spec && strncmp(spec, "HMAC_", 5) == 0 && strlen(spec) == 8) {
        char name[16];
        snprintf(name, sizeof name, "HMAC_SHA_%s", spec + 5);
        *alg = strdup(name);
    } else {
        /* The message names the spec: the answer that holds it is released after. */
        rc = cli_fail(cli, CLI_EXIT_SERVICE, "InvalidKeyUsageException",
                      "%s is not an HMAC key (KeySpec %s); name --algorithm for another key", key,
                      spec ? spec : "unknown");
        json_decref(answer);
        return rc;
    }
    json_decref(answer);
    if (!*alg)
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    return 0;
}

static int cmd_mac(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key");
    uint8_t *msg = NULL, *mac = NULL;
    size_t n = 0, mac_len = 0;
    char *alg = NULL;
    p11kms_client *c;
    p11kms_status st;
    json_t *summary;
    int rc;

    if (!key)
        return CLI_EXIT_USAGE;
    if ((rc = cli_check_paths(cli, a)) != 0 || (rc = cli_client(cli, &c)) != 0 ||
        (rc = cli_read_input(cli, cli_arg(a, "in"), "the message", NULL, MESSAGE_MAX, &msg, &n)) !=
            0)
        return rc;
    if ((rc = mac_algorithm(cli, a, key, &alg)) != 0) {
        free(msg);
        return rc;
    }
    st = p11kms_generate_mac(c, key, alg, msg, n, &mac, &mac_len);
    free(msg);
    if (st != P11KMS_OK) {
        free(alg);
        return cli_fail_status(cli, st, 0);
    }
    summary = json_pack("{s:s,s:s}", "KeyId", key, "MacAlgorithm", alg);
    rc = write_output(cli, cli_arg(a, "out"), mac, mac_len, "MacBytes", summary);
    json_decref(summary);
    p11kms_free(mac, mac_len);
    free(alg);
    return rc;
}

static int cmd_verify_mac(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key"), *mac_path = NULL;
    uint8_t *msg = NULL, *mac = NULL;
    size_t n = 0, mac_len = 0;
    char *alg = NULL;
    p11kms_client *c;
    p11kms_status st;
    int rc;

    if (!key || !(mac_path = cli_required(cli, a, "mac")))
        return CLI_EXIT_USAGE;
    if ((rc = check_stdin(cli, a, "--mac", mac_path)) != 0 || (rc = cli_client(cli, &c)) != 0 ||
        (rc = cli_read_input(cli, mac_path, "the MAC", NULL, SIGNATURE_MAX, &mac, &mac_len)) != 0)
        return rc;
    if ((rc = cli_read_input(cli, cli_arg(a, "in"), "the message", NULL, MESSAGE_MAX, &msg, &n)) !=
            0 ||
        (rc = mac_algorithm(cli, a, key, &alg)) != 0) {
        free(mac);
        free(msg);
        return rc;
    }
    st = p11kms_verify_mac(c, key, alg, msg, n, mac, mac_len);
    free(msg);
    free(mac);
    rc = report_check(cli, st, P11KMS_ERR_BAD_MAC, "MacValid", "MAC", mac_path, key, alg);
    free(alg);
    return rc;
}

/* ---- get-public-key ---- */

/* PEM (RFC 7468): base64 in lines of 64 between the labels; *out malloc'd. */
static int pem_encode(const uint8_t *der, size_t n, char **out, size_t *out_len)
{
    static const char alphabet[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    static const char begin[] = "-----BEGIN PUBLIC KEY-----\n",
                      end[] = "-----END PUBLIC KEY-----\n";
    size_t b64 = (n + 2) / 3 * 4, cap = sizeof begin + b64 + b64 / 64 + 2 + sizeof end, k = 0;
    char *p = malloc(cap);

    if (!p)
        return -1;
    memcpy(p, begin, sizeof begin - 1);
    k = sizeof begin - 1;
    for (size_t i = 0, col = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)der[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)der[i + 1] << 8;
        if (i + 2 < n)
            v |= der[i + 2];
        p[k++] = alphabet[(v >> 18) & 63];
        p[k++] = alphabet[(v >> 12) & 63];
        p[k++] = i + 1 < n ? alphabet[(v >> 6) & 63] : '=';
        p[k++] = i + 2 < n ? alphabet[v & 63] : '=';
        col += 4;
        if (col == 64 && i + 3 < n) {
            p[k++] = '\n';
            col = 0;
        }
    }
    p[k++] = '\n';
    memcpy(p + k, end, sizeof end - 1);
    k += sizeof end - 1;
    *out = p;
    *out_len = k;
    return 0;
}

static int cmd_get_public_key(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key");
    struct p11kms_public_key pk;
    p11kms_client *c;
    p11kms_status st;
    char *pem = NULL;
    size_t pem_len = 0;
    json_t *summary;
    int der = cli_flag(a, "der"), rc;

    if (!key)
        return CLI_EXIT_USAGE;
    if (der && cli_flag(a, "pem"))
        return cli_usage_error(cli, "--pem and --der: one or the other");
    if ((rc = cli_client(cli, &c)) != 0)
        return rc;
    if ((st = p11kms_get_public_key(c, key, &pk)) != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    if (!der && pem_encode(pk.der, pk.der_len, &pem, &pem_len) != 0) {
        p11kms_public_key_clear(&pk);
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    }
    summary = json_pack("{s:s,s:s,s:s,s:s}", "KeyId", pk.key_arn, "KeySpec", pk.key_spec,
                        "KeyUsage", pk.key_usage, "Format", der ? "der" : "pem");
    rc = write_output(cli, cli_arg(a, "out"), der ? pk.der : (const uint8_t *)pem,
                      der ? pk.der_len : pem_len, "Bytes", summary);
    json_decref(summary);
    free(pem);
    p11kms_public_key_clear(&pk);
    return rc;
}

/* ---- the table ---- */

#define KEY_OPT                                                              \
    {                                                                        \
        "key", 'k', 1, "the key: id, ARN, alias name (alias/x) or alias ARN" \
    }
#define IN_OPT                                                         \
    {                                                                  \
        "in", 'i', 1, "the message file (default: stdin; - for stdin)" \
    }
#define OUT_OPT                                                          \
    {                                                                    \
        "out", 'o', 1, "the output file (default: stdout; - for stdout)" \
    }
#define END_OPT          \
    {                    \
        NULL, 0, 0, NULL \
    }

static const struct cli_opt sign_opts[] = {
    KEY_OPT,
    {"algorithm", 'a', 1, "RSASSA_PSS_SHA_256, ECDSA_SHA_256, ... (required)"},
    {"digest", 0, 0, "the input is the message's digest, not the message"},
    IN_OPT,
    OUT_OPT,
    END_OPT};
static const struct cli_opt verify_opts[] = {
    KEY_OPT,
    {"algorithm", 'a', 1, "the algorithm the signature was made with"},
    {"signature", 's', 1, "the signature file, as sign wrote it"},
    {"digest", 0, 0, "the input is the message's digest, not the message"},
    IN_OPT,
    END_OPT};
static const struct cli_opt mac_opts[] = {
    KEY_OPT,
    {"algorithm", 'a', 1, "HMAC_SHA_224/256/384/512 (default: the key's)"},
    IN_OPT,
    OUT_OPT,
    END_OPT};
static const struct cli_opt verify_mac_opts[] = {
    KEY_OPT,
    {"algorithm", 'a', 1, "HMAC_SHA_224/256/384/512 (default: the key's)"},
    {"mac", 'm', 1, "the MAC file, as mac wrote it"},
    IN_OPT,
    END_OPT};
static const struct cli_opt public_key_opts[] = {
    KEY_OPT,
    {"pem", 0, 0, "PEM, -----BEGIN PUBLIC KEY----- (the default)"},
    {"der", 0, 0, "DER SubjectPublicKeyInfo, binary"},
    OUT_OPT,
    END_OPT};

const struct cli_cmd cli_asym_commands[] = {
    {NULL, "sign", "Sign a message (at most 4096 bytes) or a digest (Sign); raw signature out.",
     "--key KEY --algorithm ALG [--digest] [-i IN] [-o OUT]", sign_opts, cmd_sign, 0},
    {NULL, "verify", "Verify a signature (Verify): exit 0 valid, 1 not valid.",
     "--key KEY --algorithm ALG --signature FILE [--digest] [-i IN]", verify_opts, cmd_verify, 0},
    {NULL, "mac", "MAC a message of at most 4096 bytes with an HMAC key (GenerateMac).",
     "--key KEY [--algorithm ALG] [-i IN] [-o OUT]", mac_opts, cmd_mac, 0},
    {NULL, "verify-mac", "Verify a MAC (VerifyMac): exit 0 valid, 1 not valid.",
     "--key KEY --mac FILE [--algorithm ALG] [-i IN]", verify_mac_opts, cmd_verify_mac, 0},
    {NULL, "get-public-key", "Write an asymmetric key's public key, PEM or DER (GetPublicKey).",
     "--key KEY [--pem|--der] [-o OUT]", public_key_opts, cmd_get_public_key, 0},
};
const size_t cli_asym_commands_count = sizeof cli_asym_commands / sizeof cli_asym_commands[0];
