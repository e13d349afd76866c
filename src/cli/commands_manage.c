/*
 * tag, untag and tags (a key's tags); grant create, list, retire and revoke.
 * Each is one typed call of libp11kms (src/client/manage.c), which checks
 * the arguments before anything is sent; the lists it returns hold every
 * page. For people the answers are short lines; with --json they are AWS's
 * members (Tags, Grants, GrantId and GrantToken).
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

#define KEY_OPT                                            \
    {                                                      \
        "key", 'k', 1, "the key: its id or ARN (required)" \
    }
#define END_OPT          \
    {                    \
        NULL, 0, 0, NULL \
    }

/* Every value given for option name, in order (pointers into argv); *out freed by the caller. */
static int values_of(const struct cli_args *a, const char *name, const char ***out, size_t *n)
{
    *out = NULL;
    *n = 0;
    for (size_t i = 0; i < a->n; i++)
        if (strcmp(a->name[i], name) == 0)
            (*n)++;
    if (*n == 0)
        return 0;
    if (!(*out = calloc(*n, sizeof **out)))
        return CLI_EXIT_LOCAL;
    for (size_t i = 0, k = 0; i < a->n; i++)
        if (strcmp(a->name[i], name) == 0)
            (*out)[k++] = a->value[i];
    return 0;
}

/*
 * KEY=VALUE words into pairs, cut at the first '=' (argv is ours to cut);
 * what says which option or word it was, for the usage error.
 */
static int split_pairs(struct cli *cli, const char **words, size_t n, const char *what,
                       int empty_value_ok, struct p11kms_context *out)
{
    for (size_t i = 0; i < n; i++) {
        char *eq = strchr(words[i], '=');
        if (!eq || eq == words[i] || (!empty_value_ok && eq[1] == '\0'))
            return cli_usage_error(cli, "%s wants KEY=VALUE, not %s", what, words[i]);
        *eq = '\0';
        out[i].key = words[i];
        out[i].value = eq + 1;
    }
    return 0;
}

/* ---- tags ---- */

static int cmd_tag(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key");
    const char **words = NULL;
    struct p11kms_context *pairs = NULL;
    struct p11kms_tag *tags = NULL;
    p11kms_client *c;
    size_t n = 0;
    int rc;

    if (!key)
        return CLI_EXIT_USAGE;
    if ((rc = values_of(a, "arg", &words, &n)) != 0)
        return rc;
    if (n == 0)
        rc = cli_usage_error(cli, "tag needs TAGKEY=VALUE words (p11kms tag --help)");
    if (rc == 0 && (!(pairs = calloc(n, sizeof *pairs)) || !(tags = calloc(n, sizeof *tags))))
        rc = cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    if (rc == 0)
        rc = split_pairs(cli, words, n, "a tag", 1, pairs);
    for (size_t i = 0; rc == 0 && i < n; i++) {
        tags[i].key = pairs[i].key;
        tags[i].value = pairs[i].value;
    }
    if (rc == 0)
        rc = cli_client(cli, &c);
    if (rc == 0) {
        p11kms_status st = p11kms_tag_resource(c, key, tags, n);
        if (st != P11KMS_OK)
            rc = cli_fail_status(cli, st, 0);
    }
    free(words);
    free(pairs);
    free(tags);
    return rc;
}

static int cmd_untag(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key");
    const char **words = NULL;
    p11kms_client *c;
    size_t n = 0;
    int rc;

    if (!key)
        return CLI_EXIT_USAGE;
    if ((rc = values_of(a, "arg", &words, &n)) != 0)
        return rc;
    if (n == 0)
        rc = cli_usage_error(cli, "untag needs the TAGKEY words to remove (p11kms untag --help)");
    if (rc == 0)
        rc = cli_client(cli, &c);
    if (rc == 0) {
        p11kms_status st = p11kms_untag_resource(c, key, words, n);
        if (st != P11KMS_OK)
            rc = cli_fail_status(cli, st, 0);
    }
    free(words);
    return rc;
}

static int cmd_tags(struct cli *cli, const struct cli_args *a)
{
    static const char *const fields[] = {"TagKey", "TagValue", NULL};
    const char *key = cli_required(cli, a, "key");
    struct p11kms_tag_list l;
    p11kms_client *c;
    p11kms_status st;
    json_t *list, *answer;
    int rc;

    if (!key)
        return CLI_EXIT_USAGE;
    if ((rc = cli_client(cli, &c)) != 0)
        return rc;
    if ((st = p11kms_list_resource_tags(c, key, &l)) != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    list = json_array();
    for (size_t i = 0; list && i < l.n; i++)
        if (json_array_append_new(list, json_pack("{s:s, s:s}", "TagKey", l.tags[i].key, "TagValue",
                                                  l.tags[i].value)) != 0) {
            json_decref(list);
            list = NULL;
        }
    p11kms_tag_list_clear(&l);
    answer = list ? json_pack("{s:o}", "Tags", list) : NULL;
    if (!answer)
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    cli_print_table(cli, answer, "Tags", fields);
    json_decref(answer);
    return 0;
}

/* ---- grants ---- */

/* Splits "Decrypt,Encrypt" in place (argv is ours to cut); *out freed by the caller. */
static int split_operations(struct cli *cli, char *list, const char ***out, size_t *n)
{
    size_t count = 1, k = 0;
    for (const char *p = list; *p; p++)
        count += *p == ',';
    if (!(*out = calloc(count, sizeof **out)))
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    for (char *p = list;; p++) {
        char *comma = strchr(p, ',');
        if (comma)
            *comma = '\0';
        if (*p == '\0') {
            free(*out);
            *out = NULL;
            return cli_usage_error(cli, "--operations wants names separated by commas, "
                                        "as Decrypt,Encrypt");
        }
        (*out)[k++] = p;
        if (!comma)
            break;
        p = comma;
    }
    *n = k;
    return 0;
}

static int cmd_grant_create(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key"), *grantee = cli_required(cli, a, "grantee");
    const char *ops_arg = cli_required(cli, a, "operations"), **ops = NULL;
    const char **subset = NULL, **equals = NULL;
    struct p11kms_context *ctx = NULL;
    size_t nops = 0, nsubset = 0, nequals = 0;
    char grant_id[65], *token = NULL;
    p11kms_client *c;
    int rc;

    if (!key || !grantee || !ops_arg)
        return CLI_EXIT_USAGE;
    rc = values_of(a, "context-subset", &subset, &nsubset);
    if (rc == 0)
        rc = values_of(a, "context-equals", &equals, &nequals);
    if (rc == 0 && nsubset && nequals)
        rc = cli_usage_error(cli, "--context-subset and --context-equals: one kind or the other");
    if (rc == 0)
        rc = split_operations(cli, (char *)ops_arg, &ops, &nops);
    if (rc == 0 && nsubset + nequals && !(ctx = calloc(nsubset + nequals, sizeof *ctx)))
        rc = cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    if (rc == 0)
        rc = split_pairs(cli, nsubset ? subset : equals, nsubset + nequals,
                         nsubset ? "--context-subset" : "--context-equals", 1, ctx);
    if (rc == 0)
        rc = cli_client(cli, &c);
    if (rc == 0) {
        p11kms_status st = p11kms_create_grant(c, key, grantee, cli_arg(a, "retiring"), ops, nops,
                                               ctx, nsubset + nequals, nequals > 0,
                                               cli_arg(a, "name"), grant_id, &token);
        if (st != P11KMS_OK) {
            rc = cli_fail_status(cli, st, 0);
        } else {
            json_t *answer = json_pack("{s:s, s:s}", "GrantId", grant_id, "GrantToken", token);
            if (answer)
                cli_print(cli, answer);
            else
                rc = cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
            /* jansson's copy of the token is not wiped: the CLI exits at once */
            json_decref(answer);
            p11kms_free(token, strlen(token) + 1);
        }
    }
    free(subset);
    free(equals);
    free(ops);
    free(ctx);
    return rc;
}

/* AWS's form of a listed grant. */
static json_t *grant_json(const struct p11kms_grant *g)
{
    json_t *o = json_pack("{s:s, s:s?, s:s?, s:s?, s:s?, s:s?, s:I}", "GrantId", g->grant_id,
                          "KeyId", g->key_id, "Name", g->name, "GranteePrincipal", g->grantee,
                          "RetiringPrincipal", g->retiring, "IssuingAccount", g->issuing_account,
                          "CreationDate", (json_int_t)g->created);
    json_t *ops = json_array(), *pairs = g->ncontext ? json_object() : NULL;
    char joined[512] = "";
    size_t used = 0;
    for (size_t i = 0; ops && i < g->noperations; i++) {
        json_array_append_new(ops, json_string(g->operations[i]));
        int w =
            snprintf(joined + used, sizeof joined - used, "%s%s", i ? "," : "", g->operations[i]);
        if (w > 0 && (size_t)w < sizeof joined - used)
            used += (size_t)w;
    }
    for (size_t i = 0; pairs && i < g->ncontext; i++)
        json_object_set_new(pairs, g->context[i].key, json_string(g->context[i].value));
    if (!o || !ops) {
        json_decref(o);
        json_decref(ops);
        json_decref(pairs);
        return NULL;
    }
    /* AWS leaves out what a grant does not have (Name, RetiringPrincipal) */
    const char *absent[] = {"KeyId", "Name", "GranteePrincipal", "RetiringPrincipal",
                            "IssuingAccount"};
    for (size_t i = 0; i < sizeof absent / sizeof absent[0]; i++)
        if (json_is_null(json_object_get(o, absent[i])))
            json_object_del(o, absent[i]);
    json_object_set_new(o, "Operations", ops);
    /* for people's table only: dropped before JSON output */
    json_object_set_new(o, "_operations", json_string(joined));
    if (pairs)
        json_object_set_new(
            o, "Constraints",
            json_pack("{s:o}", g->equals ? "EncryptionContextEquals" : "EncryptionContextSubset",
                      pairs));
    return o;
}

static int cmd_grant_list(struct cli *cli, const struct cli_args *a)
{
    static const char *const fields[] = {"GrantId", "GranteePrincipal", "_operations", "Name",
                                         NULL};
    const char *key = cli_required(cli, a, "key");
    struct p11kms_grant_list l;
    p11kms_client *c;
    p11kms_status st;
    json_t *list, *answer, *g;
    size_t i;
    int rc;

    if (!key)
        return CLI_EXIT_USAGE;
    if ((rc = cli_client(cli, &c)) != 0)
        return rc;
    if ((st = p11kms_list_grants(c, key, &l)) != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    list = json_array();
    for (i = 0; list && i < l.n; i++) {
        json_t *one = grant_json(&l.grants[i]);
        if (!one || json_array_append_new(list, one) != 0) {
            json_decref(list);
            list = NULL;
        }
    }
    p11kms_grant_list_clear(&l);
    answer = list ? json_pack("{s:o}", "Grants", list) : NULL;
    if (!answer)
        return cli_fail(cli, CLI_EXIT_LOCAL, "LocalError", "out of memory");
    if (cli->json)
        json_array_foreach(list, i, g) json_object_del(g, "_operations");
    cli_print_table(cli, answer, "Grants", fields);
    json_decref(answer);
    return 0;
}

static int cmd_grant_retire(struct cli *cli, const struct cli_args *a)
{
    const char *token = cli_arg(a, "token"), *key = cli_arg(a, "key"), *id = cli_arg(a, "grant-id");
    p11kms_client *c;
    p11kms_status st;
    int rc;

    if (token ? key || id : !key || !id)
        return cli_usage_error(cli, "grant retire takes --token T, or --key KEY and --grant-id ID");
    if ((rc = cli_client(cli, &c)) != 0)
        return rc;
    if ((st = p11kms_retire_grant(c, token, key, id)) != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    return 0;
}

static int cmd_grant_revoke(struct cli *cli, const struct cli_args *a)
{
    const char *key = cli_required(cli, a, "key"), *id = cli_required(cli, a, "grant-id");
    p11kms_client *c;
    p11kms_status st;
    int rc;

    if (!key || !id)
        return CLI_EXIT_USAGE;
    if ((rc = cli_client(cli, &c)) != 0)
        return rc;
    if ((st = p11kms_revoke_grant(c, key, id)) != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    return 0;
}

static const struct cli_opt key_only_opts[] = {KEY_OPT, END_OPT};
static const struct cli_opt grant_create_opts[] = {
    {"key", 'k', 1, "the key: id, ARN, alias name or alias ARN (required)"},
    {"grantee", 0, 1, "the principal the grant is for, as an ARN (required)"},
    {"operations", 0, 1, "what it may call, separated by commas: Decrypt,Encrypt (required)"},
    {"retiring", 0, 1, "a principal that may retire the grant"},
    {"context-subset", 0, 1, "K=V: only requests whose context holds this pair (repeatable)"},
    {"context-equals", 0, 1, "K=V: only requests whose context is exactly these (repeatable)"},
    {"name", 0, 1, "a name: a retry with the same name and arguments makes no second grant"},
    END_OPT};
static const struct cli_opt grant_retire_opts[] = {
    {"token", 0, 1, "the grant token CreateGrant answered"},
    {"key", 'k', 1, "the key (with --grant-id): its id or ARN"},
    {"grant-id", 0, 1, "the grant's id (with --key)"},
    END_OPT};
static const struct cli_opt grant_revoke_opts[] = {
    KEY_OPT, {"grant-id", 0, 1, "the grant's id (required)"}, END_OPT};

const struct cli_cmd cli_manage_commands[] = {
    {NULL, "tag", "Add tags to a key, or change their values (TagResource).",
     "--key KEY TAGKEY=VALUE...", key_only_opts, cmd_tag, 1},
    {NULL, "untag", "Remove tags from a key (UntagResource).", "--key KEY TAGKEY...", key_only_opts,
     cmd_untag, 1},
    {NULL, "tags", "List a key's tags (ListResourceTags, every page).", "--key KEY", key_only_opts,
     cmd_tags, 0},
    {"grant", "create", "Let a principal use a key (CreateGrant): prints GrantId and GrantToken.",
     "--key KEY --grantee ARN --operations OP,OP [--retiring ARN] "
     "[--context-subset K=V]... | [--context-equals K=V]... [--name N]",
     grant_create_opts, cmd_grant_create, 0},
    {"grant", "list", "List a key's grants (ListGrants, every page).", "--key KEY", key_only_opts,
     cmd_grant_list, 0},
    {"grant", "retire", "Retire a grant (RetireGrant), by its token or by key and grant id.",
     "--token T | --key KEY --grant-id ID", grant_retire_opts, cmd_grant_retire, 0},
    {"grant", "revoke", "Revoke a grant (RevokeGrant).", "--key KEY --grant-id ID",
     grant_revoke_opts, cmd_grant_revoke, 0},
};
const size_t cli_manage_commands_count = sizeof cli_manage_commands / sizeof cli_manage_commands[0];
