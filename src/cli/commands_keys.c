/*
 * The management commands: keys, aliases, policies and data-keys, each one
 * or more p11kms_call()s. List commands follow NextMarker through every page
 * and print the pages joined, as one answer.
 */
#include "config.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

#define POLICY_MAX (32 * 1024) /* AWS's bound on a key policy */

int cli_call(struct cli *cli, const char *operation, json_t *request, json_t **answer)
{
    p11kms_client *c;
    char *req = NULL, *resp = NULL;
    size_t resp_len = 0;
    json_error_t jerr;
    p11kms_status st;
    int rc;

    *answer = NULL;
    if ((rc = cli_client(cli, &c)) != 0)
        return rc;
    if (request && !(req = json_dumps(request, JSON_COMPACT)))
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    st = p11kms_call(c, operation, req, &resp, &resp_len);
    free(req);
    if (st != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    *answer = json_loadb(resp, resp_len, 0, &jerr);
    p11kms_free(resp, resp_len + 1);
    if (!*answer)
        return cli_fail(cli, CLI_EXIT_TRANSPORT, "ProtocolError", "the answer is not JSON: %s",
                        jerr.text);
    return 0;
}

/* Calls and prints the answer. */
static int call_print(struct cli *cli, const char *operation, json_t *request)
{
    json_t *answer;
    int rc = cli_call(cli, operation, request, &answer);
    json_decref(request);
    if (rc == 0)
        cli_print(cli, answer);
    json_decref(answer);
    return rc;
}

/* {"KeyId": key} for the commands that name one key. */
static json_t *key_request(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key");
    return key ? json_pack("{s:s}", "KeyId", key) : NULL;
}

/* A decimal option in [lo, hi]; -1 after a usage error. */
static long number(struct cli *cli, const struct cli_args *a, const char *name, long lo, long hi)
{
    const char *v = cli_arg(a, name);
    char *end;
    long n;
    errno = 0;
    n = strtol(v, &end, 10);
    if (errno || end == v || *end || n < lo || n > hi) {
        cli_usage_error(cli, "--%s wants a whole number from %ld to %ld", name, lo, hi);
        return -1;
    }
    return n;
}

/* Every page of a List operation: the arrays under `member` joined into one answer. */
static int list_all(struct cli *cli, const char *operation, json_t *request, const char *member,
                    json_t **out)
{
    json_t *all = json_array();
    int rc = 0;
    *out = NULL;
    for (;;) {
        json_t *answer, *marker;
        if ((rc = cli_call(cli, operation, request, &answer)) != 0)
            break;
        json_array_extend(all, json_object_get(answer, member));
        marker = json_object_get(answer, "NextMarker");
        if (!json_is_true(json_object_get(answer, "Truncated")) || !json_is_string(marker)) {
            json_decref(answer);
            break;
        }
        json_object_set(request, "Marker", marker);
        json_decref(answer);
    }
    json_decref(request);
    if (rc == 0)
        *out = json_pack("{s:o}", member, all);
    else
        json_decref(all);
    return rc;
}

static int list_print(struct cli *cli, const struct cli_args *a, const char *operation,
                      json_t *request, const char *member, const char *const *fields)
{
    json_t *answer;
    int rc;
    if (cli_arg(a, "page-size")) {
        /* AWS's largest page: ListAliases' is 100, the others' 1000 */
        long n = number(cli, a, "page-size", 1, strcmp(operation, "ListAliases") == 0 ? 100 : 1000);
        if (n < 0) {
            json_decref(request);
            return CLI_EXIT_USAGE;
        }
        json_object_set_new(request, "Limit", json_integer(n));
    }
    rc = list_all(cli, operation, request, member, &answer);
    if (rc == 0)
        cli_print_table(cli, answer, member, fields);
    json_decref(answer);
    return rc;
}

/* ---- keys ---- */

static int keys_create(struct cli *cli, const struct cli_args *a)
{
    json_t *req = json_object();
    const char *d = cli_arg(a, "description"), *spec = cli_arg(a, "key-spec"),
               *usage = cli_arg(a, "key-usage");
    if (d)
        json_object_set_new(req, "Description", json_string(d));
    /* Passed as given: the service says which specs and usages it has. */
    if (spec)
        json_object_set_new(req, "KeySpec", json_string(spec));
    if (usage)
        json_object_set_new(req, "KeyUsage", json_string(usage));
    return call_print(cli, "CreateKey", req);
}

static int keys_describe(struct cli *cli, const struct cli_args *a)
{
    json_t *req = key_request(cli, a);
    return req ? call_print(cli, "DescribeKey", req) : CLI_EXIT_USAGE;
}

static int keys_list(struct cli *cli, const struct cli_args *a)
{
    static const char *const fields[] = {"KeyId", "KeyArn", NULL};
    return list_print(cli, a, "ListKeys", json_object(), "Keys", fields);
}

static int simple_key_op(struct cli *cli, const struct cli_args *a, const char *op)
{
    json_t *req = key_request(cli, a);
    return req ? call_print(cli, op, req) : CLI_EXIT_USAGE;
}

static int keys_enable(struct cli *cli, const struct cli_args *a)
{
    return simple_key_op(cli, a, "EnableKey");
}

static int keys_disable(struct cli *cli, const struct cli_args *a)
{
    return simple_key_op(cli, a, "DisableKey");
}

static int keys_rotate(struct cli *cli, const struct cli_args *a)
{
    return simple_key_op(cli, a, "RotateKeyOnDemand");
}

static int keys_rotation_status(struct cli *cli, const struct cli_args *a)
{
    return simple_key_op(cli, a, "GetKeyRotationStatus");
}

static int keys_disable_rotation(struct cli *cli, const struct cli_args *a)
{
    return simple_key_op(cli, a, "DisableKeyRotation");
}

static int keys_cancel_deletion(struct cli *cli, const struct cli_args *a)
{
    return simple_key_op(cli, a, "CancelKeyDeletion");
}

static int keys_rotations(struct cli *cli, const struct cli_args *a)
{
    static const char *const fields[] = {"RotationDate", "RotationType", "KeyId", NULL};
    json_t *req = key_request(cli, a);
    return req ? list_print(cli, a, "ListKeyRotations", req, "Rotations", fields) : CLI_EXIT_USAGE;
}

static int keys_enable_rotation(struct cli *cli, const struct cli_args *a)
{
    json_t *req = key_request(cli, a);
    if (!req)
        return CLI_EXIT_USAGE;
    if (cli_arg(a, "period")) {
        long days = number(cli, a, "period", 1, 2560);
        if (days < 0) {
            json_decref(req);
            return CLI_EXIT_USAGE;
        }
        json_object_set_new(req, "RotationPeriodInDays", json_integer(days));
    }
    return call_print(cli, "EnableKeyRotation", req);
}

static int keys_schedule_deletion(struct cli *cli, const struct cli_args *a)
{
    json_t *req = key_request(cli, a);
    if (!req)
        return CLI_EXIT_USAGE;
    if (cli_arg(a, "days")) {
        long days = number(cli, a, "days", 1, 365);
        if (days < 0) {
            json_decref(req);
            return CLI_EXIT_USAGE;
        }
        json_object_set_new(req, "PendingWindowInDays", json_integer(days));
    }
    return call_print(cli, "ScheduleKeyDeletion", req);
}

/* ---- aliases ---- */

static int alias_op(struct cli *cli, const struct cli_args *a, const char *op, int with_key)
{
    const char *name = cli_required(cli, a, "name"), *key = NULL;
    if (!name || (with_key && !(key = cli_required(cli, a, "key"))))
        return CLI_EXIT_USAGE;
    return call_print(cli, op,
                      with_key ? json_pack("{s:s,s:s}", "AliasName", name, "TargetKeyId", key)
                               : json_pack("{s:s}", "AliasName", name));
}

static int aliases_create(struct cli *cli, const struct cli_args *a)
{
    return alias_op(cli, a, "CreateAlias", 1);
}

static int aliases_update(struct cli *cli, const struct cli_args *a)
{
    return alias_op(cli, a, "UpdateAlias", 1);
}

static int aliases_delete(struct cli *cli, const struct cli_args *a)
{
    return alias_op(cli, a, "DeleteAlias", 0);
}

static int aliases_list(struct cli *cli, const struct cli_args *a)
{
    static const char *const fields[] = {"AliasName", "TargetKeyId", NULL};
    const char *key = cli_arg(a, "key");
    json_t *req = key ? json_pack("{s:s}", "KeyId", key) : json_object();
    return list_print(cli, a, "ListAliases", req, "Aliases", fields);
}

/* ---- policies ---- */

static int policies_get(struct cli *cli, const struct cli_args *a)
{
    json_t *req = key_request(cli, a), *answer;
    const char *name = cli_arg(a, "name");
    int rc;
    if (!req)
        return CLI_EXIT_USAGE;
    json_object_set_new(req, "PolicyName", json_string(name ? name : "default"));
    rc = cli_call(cli, "GetKeyPolicy", req, &answer);
    json_decref(req);
    if (rc != 0)
        return rc;
    if (cli->json) {
        cli_print(cli, answer);
    } else {
        const char *doc = json_string_value(json_object_get(answer, "Policy"));
        printf("%s\n", doc ? doc : "");
    }
    json_decref(answer);
    return 0;
}

/* A file's text (or stdin's for "-"), at most max bytes. */
static int read_text(struct cli *cli, const char *path, size_t max, char **out)
{
    FILE *f = strcmp(path, "-") == 0 ? stdin : fopen(path, "rb");
    char *buf;
    size_t n;
    *out = NULL;
    if (!f)
        return cli_fail(cli, CLI_EXIT_LOCAL, "IOError", "%s: %s", path, strerror(errno));
    if (!(buf = malloc(max + 2))) {
        if (f != stdin)
            fclose(f);
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    }
    n = fread(buf, 1, max + 1, f);
    if (ferror(f) || n > max) {
        int err = ferror(f);
        if (f != stdin)
            fclose(f);
        free(buf);
        return err ? cli_fail(cli, CLI_EXIT_LOCAL, "IOError", "%s: read error", path)
                   : cli_usage_error(cli, "%s: more than %zu bytes", path, max);
    }
    if (f != stdin)
        fclose(f);
    buf[n] = '\0';
    *out = buf;
    return 0;
}

static int policies_put(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key"), *file, *name = cli_arg(a, "name");
    char *doc;
    int rc;
    if (!key || !(file = cli_required(cli, a, "file")))
        return CLI_EXIT_USAGE;
    if ((rc = read_text(cli, file, POLICY_MAX, &doc)) != 0)
        return rc;
    rc = call_print(cli, "PutKeyPolicy",
                    json_pack("{s:s,s:s,s:s}", "KeyId", key, "PolicyName", name ? name : "default",
                              "Policy", doc));
    free(doc);
    return rc;
}

/* ---- data keys ---- */

static int context_object(struct cli *cli, const struct cli_args *a, json_t *req)
{
    struct p11kms_context *ctx;
    size_t n;
    int rc = cli_contexts(a, &ctx, &n);
    json_t *o;
    if (rc != 0)
        return rc;
    if (n == 0)
        return 0;
    o = json_object();
    for (size_t i = 0; i < n; i++) {
        if (json_object_get(o, ctx[i].key)) {
            json_decref(o);
            free(ctx);
            return cli_usage_error(cli, "--context %s is given twice", ctx[i].key);
        }
        json_object_set_new(o, ctx[i].key, json_string(ctx[i].value));
    }
    free(ctx);
    json_object_set_new(req, "EncryptionContext", o);
    return 0;
}

static int datakeys_generate(struct cli *cli, const struct cli_args *a)
{
    json_t *req = key_request(cli, a);
    int rc;
    if (!req)
        return CLI_EXIT_USAGE;
    json_object_set_new(req, "KeySpec", json_string("AES_256"));
    if ((rc = context_object(cli, a, req)) != 0) {
        json_decref(req);
        return rc;
    }
    return call_print(
        cli, cli_flag(a, "no-plaintext") ? "GenerateDataKeyWithoutPlaintext" : "GenerateDataKey",
        req);
}

static int datakeys_decrypt(struct cli *cli, const struct cli_args *a)
{
    const char *blob = cli_required(cli, a, "blob"), *key = cli_arg(a, "key");
    json_t *req;
    int rc;
    if (!blob)
        return CLI_EXIT_USAGE;
    req = json_pack("{s:s}", "CiphertextBlob", blob);
    if (key)
        json_object_set_new(req, "KeyId", json_string(key));
    if ((rc = context_object(cli, a, req)) != 0) {
        json_decref(req);
        return rc;
    }
    return call_print(cli, "Decrypt", req);
}

/* ---- the table ---- */

#define KEY_OPT                                                              \
    {                                                                        \
        "key", 'k', 1, "the key: id, ARN, alias name (alias/x) or alias ARN" \
    }
#define END_OPT          \
    {                    \
        NULL, 0, 0, NULL \
    }

#define PAGE_OPT                                                                \
    {                                                                           \
        "page-size", 0, 1, "ask for this many per page (all pages are fetched)" \
    }

static const struct cli_opt key_only[] = {KEY_OPT, END_OPT};
static const struct cli_opt list_opts[] = {PAGE_OPT, END_OPT};
static const struct cli_opt rotations_opts[] = {KEY_OPT, PAGE_OPT, END_OPT};
static const struct cli_opt create_opts[] = {
    {"description", 'd', 1, "a description of the key"},
    {"key-spec", 0, 1, "SYMMETRIC_DEFAULT, RSA_2048.., ECC_NIST_P256.., HMAC_256.."},
    {"key-usage", 0, 1, "ENCRYPT_DECRYPT, SIGN_VERIFY, GENERATE_VERIFY_MAC, ..."},
    END_OPT};
static const struct cli_opt rotation_opts[] = {
    KEY_OPT,
    {"period", 0, 1, "days between automatic rotations (the service's default: 365)"},
    END_OPT};
static const struct cli_opt deletion_opts[] = {
    KEY_OPT, {"days", 0, 1, "the waiting period in days, 7 to 30 (default 30)"}, END_OPT};
static const struct cli_opt alias_key_opts[] = {
    {"name", 'n', 1, "the alias name, alias/..."}, KEY_OPT, END_OPT};
static const struct cli_opt alias_name_opts[] = {{"name", 'n', 1, "the alias name, alias/..."},
                                                 END_OPT};
static const struct cli_opt alias_list_opts[] = {
    {"key", 'k', 1, "only the aliases of this key"}, PAGE_OPT, END_OPT};
static const struct cli_opt policy_get_opts[] = {
    KEY_OPT, {"name", 'n', 1, "the policy name (default: default)"}, END_OPT};
static const struct cli_opt policy_put_opts[] = {
    KEY_OPT,
    {"file", 'f', 1, "the policy document, a JSON file (- for stdin)"},
    {"name", 'n', 1, "the policy name (default: default)"},
    END_OPT};
static const struct cli_opt generate_opts[] = {
    KEY_OPT,
    {"context", 'c', 1, "an encryption-context pair KEY=VALUE (repeat for more)"},
    {"no-plaintext", 0, 0, "only the encrypted blob (GenerateDataKeyWithoutPlaintext)"},
    END_OPT};
static const struct cli_opt decrypt_key_opts[] = {
    {"blob", 'b', 1, "the data key's CiphertextBlob, base64"},
    {"context", 'c', 1, "an encryption-context pair KEY=VALUE (repeat for more)"},
    {"key", 'k', 1, "refuse unless the blob is under this key"},
    END_OPT};

const struct cli_cmd cli_key_commands[] = {
    {"keys", "create", "Create a key (CreateKey); prints its metadata.",
     "[--description TEXT] [--key-spec SPEC] [--key-usage USAGE]", create_opts, keys_create, 0},
    {"keys", "describe", "Describe a key (DescribeKey).", "--key KEY", key_only, keys_describe, 0},
    {"keys", "list", "List every key (ListKeys, all pages).", "[--page-size N]", list_opts,
     keys_list, 0},
    {"keys", "enable", "Enable a key (EnableKey).", "--key KEY", key_only, keys_enable, 0},
    {"keys", "disable", "Disable a key (DisableKey).", "--key KEY", key_only, keys_disable, 0},
    {"keys", "rotate", "Rotate a key now (RotateKeyOnDemand).", "--key KEY", key_only, keys_rotate,
     0},
    {"keys", "rotations", "List a key's rotations (ListKeyRotations, all pages).",
     "--key KEY [--page-size N]", rotations_opts, keys_rotations, 0},
    {"keys", "rotation-status", "Show a key's automatic rotation (GetKeyRotationStatus).",
     "--key KEY", key_only, keys_rotation_status, 0},
    {"keys", "enable-rotation", "Turn automatic rotation on (EnableKeyRotation).",
     "--key KEY [--period DAYS]", rotation_opts, keys_enable_rotation, 0},
    {"keys", "disable-rotation", "Turn automatic rotation off (DisableKeyRotation).", "--key KEY",
     key_only, keys_disable_rotation, 0},
    {"keys", "schedule-deletion", "Schedule a key's deletion (ScheduleKeyDeletion).",
     "--key KEY [--days DAYS]", deletion_opts, keys_schedule_deletion, 0},
    {"keys", "cancel-deletion", "Cancel a scheduled deletion (CancelKeyDeletion).", "--key KEY",
     key_only, keys_cancel_deletion, 0},
    {"aliases", "create", "Create an alias for a key (CreateAlias).", "--name alias/NAME --key KEY",
     alias_key_opts, aliases_create, 0},
    {"aliases", "update", "Point an alias at another key (UpdateAlias).",
     "--name alias/NAME --key KEY", alias_key_opts, aliases_update, 0},
    {"aliases", "delete", "Delete an alias (DeleteAlias).", "--name alias/NAME", alias_name_opts,
     aliases_delete, 0},
    {"aliases", "list", "List aliases (ListAliases, all pages).", "[--key KEY] [--page-size N]",
     alias_list_opts, aliases_list, 0},
    {"policies", "get", "Print a key's policy (GetKeyPolicy).", "--key KEY [--name NAME]",
     policy_get_opts, policies_get, 0},
    {"policies", "put", "Set a key's policy from a file (PutKeyPolicy).",
     "--key KEY --file FILE [--name NAME]", policy_put_opts, policies_put, 0},
    {"data-keys", "generate",
     "Generate an AES-256 data key (GenerateDataKey): its plaintext and encrypted blob, base64.",
     "--key KEY [--context K=V]... [--no-plaintext]", generate_opts, datakeys_generate, 0},
    {"data-keys", "decrypt", "Decrypt a data key's blob (Decrypt): its plaintext, base64.",
     "--blob BASE64 [--context K=V]... [--key KEY]", decrypt_key_opts, datakeys_decrypt, 0},
};
const size_t cli_key_commands_count = sizeof cli_key_commands / sizeof cli_key_commands[0];
