/*
 * p11kms [global options] <group> <command> [options]
 * p11kms [global options] encrypt|decrypt [options]
 * p11kms [global options] sign|verify|mac|verify-mac|get-public-key [options]
 * p11kms [global options] tag|untag|tags [options] [words]
 *
 * Options may come anywhere after the program name; global ones are the same
 * for every command. Credentials never come from the command line: only from
 * the environment (AWS_ACCESS_KEY_ID...) or a profile file.
 */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

static const struct cli_opt global_opts[] = {
    {"endpoint", 0, 1, "the service URL (default: P11KMS_ENDPOINT, then AWS_ENDPOINT_URL)"},
    {"region", 0, 1,
     "the region to sign for (default: AWS_REGION, AWS_DEFAULT_REGION, "
     "the profile's, us-east-1)"},
    {"profile", 0, 1,
     "credentials from this profile of ~/.aws/credentials (default: "
     "AWS_PROFILE when AWS_ACCESS_KEY_ID is not set)"},
    {"ca-file", 0, 1, "PEM CA certificates to verify an https endpoint with"},
    {"json", 0, 0, "print answers (and errors) as JSON, for scripts"},
    {"quiet", 'q', 0, "no progress line, no notes on stderr (errors still)"},
    {"help", 'h', 0, "help for the program, a group or a command"},
    {"version", 0, 0, "print the version and exit"},
    {NULL, 0, 0, NULL},
};

static const char *const groups[][2] = {
    {"keys", "create, describe, list, enable and disable keys; rotation and deletion"},
    {"aliases", "create, update, delete and list aliases"},
    {"policies", "get and put key policies"},
    {"data-keys", "generate data keys and decrypt their blobs"},
    {"grant", "create, list, retire and revoke grants"},
};

/* ---- the command table ---- */

/* Every file's commands, in the order help lists them. */
static const struct {
    const struct cli_cmd *cmds;
    const size_t *count;
} tables[] = {
    {cli_key_commands, &cli_key_commands_count},
    {cli_data_commands, &cli_data_commands_count},
    {cli_asym_commands, &cli_asym_commands_count},
    {cli_manage_commands, &cli_manage_commands_count},
};
#define N_TABLES (sizeof tables / sizeof tables[0])

/* Whether c is group's (NULL: a top-level command). */
static int in_group(const struct cli_cmd *c, const char *group)
{
    return group ? c->group && strcmp(c->group, group) == 0 : c->group == NULL;
}

static const struct cli_cmd *find_cmd(const char *group, const char *name)
{
    for (size_t t = 0; name && t < N_TABLES; t++)
        for (size_t i = 0; i < *tables[t].count; i++)
            if (in_group(&tables[t].cmds[i], group) && strcmp(tables[t].cmds[i].name, name) == 0)
                return &tables[t].cmds[i];
    return NULL;
}

static int is_group(const char *s)
{
    for (size_t i = 0; i < sizeof groups / sizeof groups[0]; i++)
        if (strcmp(groups[i][0], s) == 0)
            return 1;
    return 0;
}

static const struct cli_opt *find_opt(const struct cli_opt *opts, const char *name, char shortname)
{
    for (; opts && opts->name; opts++) {
        if (name && strcmp(opts->name, name) == 0)
            return opts;
        if (!name && shortname && opts->shortname == shortname)
            return opts;
    }
    return NULL;
}

/* ---- help ---- */

#define HELP_WIDTH 80

/*
 * Prints text's words after what the line already holds (col columns), the
 * first one on that line, the rest wrapped within HELP_WIDTH with the next
 * lines indented by indent; ends the line. A word longer than a line stands
 * alone on its own.
 */
static void wrap(FILE *f, const char *text, size_t col, size_t indent)
{
    int first = 1;
    while (*text) {
        size_t n;
        while (*text == ' ')
            text++;
        n = strcspn(text, " ");
        if (n == 0)
            break;
        if (!first && col + 1 + n > HELP_WIDTH) {
            fprintf(f, "\n%*s", (int)indent, "");
            col = indent;
        } else if (!first) {
            fputc(' ', f);
            col++;
        }
        fprintf(f, "%.*s", (int)n, text);
        col += n;
        text += n;
        first = 0;
    }
    fputc('\n', f);
}

static void print_opts(FILE *f, const struct cli_opt *opts)
{
    for (; opts && opts->name; opts++) {
        char left[64];
        if (opts->shortname)
            snprintf(left, sizeof left, "-%c, --%s%s", opts->shortname, opts->name,
                     opts->has_arg ? " ARG" : "");
        else
            snprintf(left, sizeof left, "    --%s%s", opts->name, opts->has_arg ? " ARG" : "");
        fprintf(f, "  %-26s ", left);
        wrap(f, opts->help, 29, 29);
    }
}

static void help_main(FILE *f)
{
    fprintf(f, "Usage: p11kms [global options] <group> <command> [options]\n"
               "       p11kms [global options] encrypt|decrypt [options]\n"
               "       p11kms [global options] sign|verify|mac|verify-mac|get-public-key ...\n"
               "       p11kms [global options] tag|untag|tags --key KEY ...\n\n"
               "A client for p11kmsd (the AWS KMS JSON protocol).\n\nGroups and commands:\n");
    for (size_t g = 0; g < sizeof groups / sizeof groups[0]; g++) {
        char names[512];
        size_t k = 0;
        names[0] = '\0';
        for (size_t t = 0; t < N_TABLES; t++)
            for (size_t i = 0; i < *tables[t].count; i++)
                if (in_group(&tables[t].cmds[i], groups[g][0]) && k < sizeof names)
                    k += (size_t)snprintf(names + k, sizeof names - k, " %s",
                                          tables[t].cmds[i].name);
        fprintf(f, "  %s: ", groups[g][0]);
        wrap(f, names, 4 + strlen(groups[g][0]), 4);
    }
    for (size_t t = 0; t < N_TABLES; t++) {
        for (size_t i = 0; i < *tables[t].count; i++) {
            if (!in_group(&tables[t].cmds[i], NULL))
                continue;
            fprintf(f, "  %-14s ", tables[t].cmds[i].name);
            wrap(f, tables[t].cmds[i].summary, 17, 17);
        }
    }
    fprintf(f, "\nGlobal options:\n");
    print_opts(f, global_opts);
    fprintf(f, "\nCredentials come from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and\n"
               "AWS_SESSION_TOKEN, or from a profile; never from the command line.\n"
               "Exit codes: 0 ok, 1 the service refused (verify, verify-mac: not valid),\n"
               "2 usage, 3 service unreachable, 4 decryption or integrity failure,\n"
               "5 other local errors.\n"
               "`p11kms <group> --help` and `p11kms <group> <command> --help` say more;\n"
               "see also p11kms(1).\n");
}

static void help_group(FILE *f, const char *group)
{
    fprintf(f, "Usage: p11kms [global options] %s <command> [options]\n\nCommands:\n", group);
    for (size_t t = 0; t < N_TABLES; t++) {
        for (size_t i = 0; i < *tables[t].count; i++) {
            if (in_group(&tables[t].cmds[i], group)) {
                fprintf(f, "  %-18s ", tables[t].cmds[i].name);
                wrap(f, tables[t].cmds[i].summary, 21, 21);
            }
        }
    }
    fprintf(f, "\n`p11kms %s <command> --help` for a command's options.\n", group);
}

static void help_cmd(FILE *f, const struct cli_cmd *c)
{
    int col = fprintf(f, "Usage: p11kms [global options] %s%s%s ", c->group ? c->group : "",
                      c->group ? " " : "", c->name);
    wrap(f, c->usage, col > 0 ? (size_t)col : 0, 8);
    fprintf(f, "\n");
    wrap(f, c->summary, 0, 0);
    if (c->opts && c->opts->name) {
        fprintf(f, "\nOptions:\n");
        print_opts(f, c->opts);
    }
    fprintf(f, "\nGlobal options:\n");
    print_opts(f, global_opts);
}

/* ---- the client ---- */

int cli_client(struct cli *cli, p11kms_client **out)
{
    struct p11kms_options o;
    struct cli_profile prof = {0};
    const char *profile = cli->profile;
    p11kms_status st;

    if (cli->client) {
        *out = cli->client;
        return 0;
    }
    p11kms_options_init(&o);
    o.endpoint = cli->endpoint;
    o.region = cli->region;
    o.ca_file = cli->ca_file;
    /* As the aws CLI: --profile wins; then credentials in the environment; then
       AWS_PROFILE, then the default profile when the file has one. */
    if (!profile && !getenv("AWS_ACCESS_KEY_ID")) {
        const char *env = getenv("AWS_PROFILE");
        if (env && *env)
            profile = env;
        else if (cli_profile_load("default", &prof) == 0)
            profile = "default";
    }
    if (profile && !prof.access_key_id && cli_profile_load(profile, &prof) != 0)
        return cli_fail(cli, CLI_EXIT_LOCAL, "ConfigError",
                        "profile %s: no credentials for it in the credentials file", profile);
    if (prof.access_key_id) {
        o.access_key_id = prof.access_key_id;
        o.secret_access_key = prof.secret_access_key;
        o.session_token = prof.session_token;
        if (!o.region && !getenv("AWS_REGION") && !getenv("AWS_DEFAULT_REGION"))
            o.region = prof.region;
    }
    st = p11kms_client_new(&o, &cli->client);
    cli_profile_clear(&prof); /* the client keeps its own copies */
    if (st != P11KMS_OK)
        return cli_fail_status(cli, st, 0);
    *out = cli->client;
    return 0;
}

/* ---- the command line ---- */

static int take(struct cli *cli, struct cli_args *a, const struct cli_opt *o, const char *inline_v,
                int argc, char **argv, int *i)
{
    const char *v = NULL;
    if (o->has_arg) {
        if (inline_v)
            v = inline_v;
        else if (*i + 1 < argc)
            v = argv[++*i];
        else
            return cli_usage_error(cli, "--%s needs a value", o->name);
    } else if (inline_v) {
        return cli_usage_error(cli, "--%s takes no value", o->name);
    }
    if (strcmp(o->name, "endpoint") == 0)
        cli->endpoint = v;
    else if (strcmp(o->name, "region") == 0)
        cli->region = v;
    else if (strcmp(o->name, "profile") == 0)
        cli->profile = v;
    else if (strcmp(o->name, "ca-file") == 0)
        cli->ca_file = v;
    else if (strcmp(o->name, "json") == 0 && o == find_opt(global_opts, "json", 0))
        cli->json = 1;
    else if (strcmp(o->name, "quiet") == 0 && o == find_opt(global_opts, "quiet", 0))
        cli->quiet = 1;
    if (a->n == CLI_MAX_ARGS)
        return cli_usage_error(cli, "too many options");
    a->name[a->n] = o->name;
    a->value[a->n] = v;
    a->n++;
    return 0;
}

int main(int argc, char **argv)
{
    struct cli cli = {0};
    struct cli_args a = {0};
    const char *pos[3] = {NULL, NULL, NULL};
    size_t npos = 0;
    int rc, only_positionals = 0;

    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        const struct cli_opt *o = NULL;
        const char *inline_v = NULL;
        char name[64];

        if (only_positionals || arg[0] != '-' || arg[1] == '\0') {
            /* The words after a command that takes them (tag's TAGKEY=VALUE...). */
            if (cli.cmd && cli.cmd->positionals && npos == (cli.cmd->group ? 2u : 1u)) {
                if (a.n == CLI_MAX_ARGS)
                    return cli_usage_error(&cli, "too many arguments");
                a.name[a.n] = "arg";
                a.value[a.n++] = arg;
                continue;
            }
            if (npos == 3)
                return cli_usage_error(&cli, "unexpected argument: %s", arg);
            pos[npos++] = arg;
            if (npos == 1 && !is_group(arg) && strcmp(arg, "help") != 0)
                cli.cmd = find_cmd(NULL, arg);
            else if (npos == 2 && is_group(pos[0]))
                cli.cmd = find_cmd(pos[0], arg);
            continue;
        }
        if (strcmp(arg, "--") == 0) {
            only_positionals = 1;
            continue;
        }
        if (arg[1] == '-') {
            const char *eq = strchr(arg + 2, '=');
            size_t n = eq ? (size_t)(eq - (arg + 2)) : strlen(arg + 2);
            if (n >= sizeof name)
                return cli_usage_error(&cli, "unknown option: %s", arg);
            memcpy(name, arg + 2, n);
            name[n] = '\0';
            inline_v = eq ? eq + 1 : NULL;
            o = find_opt(global_opts, name, 0);
            if (!o && cli.cmd)
                o = find_opt(cli.cmd->opts, name, 0);
        } else {
            if (arg[2] != '\0')
                inline_v = arg + 2;
            o = find_opt(global_opts, NULL, arg[1]);
            if (!o && cli.cmd)
                o = find_opt(cli.cmd->opts, NULL, arg[1]);
        }
        if (!o)
            return cli_usage_error(&cli, "unknown option: %s%s", arg,
                                   cli.cmd ? "" : " (options of a command come after it)");
        if ((rc = take(&cli, &a, o, inline_v, argc, argv, &i)) != 0)
            return rc;
    }

    if (cli_flag(&a, "version")) {
        printf("p11kms %s\n", P11KMS_VERSION_STRING);
        return CLI_EXIT_OK;
    }
    if (npos > 0 && strcmp(pos[0], "help") == 0) {
        /* p11kms help [group [command]] */
        pos[0] = pos[1];
        pos[1] = pos[2];
        npos = npos - 1;
        if (npos == 0) {
            help_main(stdout);
            return CLI_EXIT_OK;
        }
        cli.cmd = is_group(pos[0]) ? (npos > 1 ? find_cmd(pos[0], pos[1]) : NULL)
                                   : find_cmd(NULL, pos[0]);
        a.name[a.n] = "help";
        a.value[a.n++] = NULL;
    }
    if (npos == 0) {
        if (cli_flag(&a, "help")) {
            help_main(stdout);
            return CLI_EXIT_OK;
        }
        help_main(stderr);
        return CLI_EXIT_USAGE;
    }
    if (!cli.cmd) {
        if (is_group(pos[0]) && npos == 1) {
            if (cli_flag(&a, "help")) {
                help_group(stdout, pos[0]);
                return CLI_EXIT_OK;
            }
            help_group(stderr, pos[0]);
            return CLI_EXIT_USAGE;
        }
        if (is_group(pos[0]))
            return cli_usage_error(&cli, "%s: no command %s (p11kms %s --help)", pos[0], pos[1],
                                   pos[0]);
        return cli_usage_error(&cli, "no command or group %s (p11kms --help)", pos[0]);
    }
    if (cli_flag(&a, "help")) {
        help_cmd(stdout, cli.cmd);
        return CLI_EXIT_OK;
    }
    if (npos > (cli.cmd->group ? 2u : 1u))
        return cli_usage_error(&cli, "unexpected argument: %s", pos[npos - 1]);

    rc = cli.cmd->run(&cli, &a);
    p11kms_client_free(cli.client);
    return rc;
}

/* ---- option helpers ---- */

const char *cli_arg(const struct cli_args *a, const char *name)
{
    const char *v = NULL;
    for (size_t i = 0; i < a->n; i++)
        if (strcmp(a->name[i], name) == 0)
            v = a->value[i];
    return v;
}

int cli_flag(const struct cli_args *a, const char *name)
{
    for (size_t i = 0; i < a->n; i++)
        if (strcmp(a->name[i], name) == 0)
            return 1;
    return 0;
}

const char *cli_required(struct cli *cli, const struct cli_args *a, const char *name)
{
    const char *v = cli_arg(a, name);
    if (!v || !*v) {
        cli_usage_error(cli, "%s %s needs --%s", cli->cmd->group ? cli->cmd->group : "",
                        cli->cmd->name, name);
        return NULL;
    }
    return v;
}

int cli_contexts(const struct cli_args *a, struct p11kms_context **out, size_t *n)
{
    size_t count = 0, k = 0;
    struct p11kms_context *ctx;
    *out = NULL;
    *n = 0;
    for (size_t i = 0; i < a->n; i++)
        if (strcmp(a->name[i], "context") == 0)
            count++;
    if (count == 0)
        return 0;
    ctx = calloc(count, sizeof *ctx);
    if (!ctx)
        return CLI_EXIT_LOCAL;
    for (size_t i = 0; i < a->n; i++) {
        const char *v = a->value[i], *eq;
        if (strcmp(a->name[i], "context") != 0)
            continue;
        eq = strchr(v, '=');
        if (!eq || eq == v) {
            free(ctx);
            return cli_usage_error(NULL, "--context wants KEY=VALUE, not %s", v);
        }
        /* argv is ours to cut: the key ends at the '=' */
        ((char *)eq)[0] = '\0';
        ctx[k].key = v;
        ctx[k].value = eq + 1;
        k++;
    }
    *out = ctx;
    *n = k;
    return 0;
}
