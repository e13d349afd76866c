/*
 * p11kms, the command-line client: shared declarations.
 *   main.c          global options, the command table, --help, dispatch
 *   profile.c       credentials and region from ~/.aws/credentials and ~/.aws/config
 *   output.c        exit codes, errors, --json and human output, progress
 *   commands_keys.c keys, aliases, policies and data-keys (p11kms_call)
 *   commands_data.c encrypt and decrypt (streams and JWE)
 *   commands_asym.c sign, verify, mac, verify-mac, get-public-key
 *   commands_manage.c tag, untag, tags; grant create, list, retire, revoke
 *
 * The CLI uses the public API of libp11kms only (include/p11kms.h).
 */
#ifndef P11KMS_CLI_H
#define P11KMS_CLI_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "p11kms.h"

/* Exit codes (docs/cli.md, docs/p11kms.1). */
enum cli_exit {
    CLI_EXIT_OK = 0,
    CLI_EXIT_SERVICE = 1,   /* the service refused: NotFound, AccessDenied, Disabled... */
    CLI_EXIT_USAGE = 2,     /* bad command line */
    CLI_EXIT_TRANSPORT = 3, /* no answer, circuit open, an answer the protocol forbids */
    CLI_EXIT_INTEGRITY = 4, /* decryption failed: altered, wrong context, truncated, not ours */
    CLI_EXIT_LOCAL = 5      /* I/O, memory, configuration */
};

/* One option a command takes. */
struct cli_opt {
    const char *name; /* without the leading "--" */
    char shortname;   /* 0: none */
    int has_arg;
    const char *help;
};

/* What was given on the command line for the command's options, in order. */
#define CLI_MAX_ARGS 64
struct cli_args {
    size_t n;
    const char *name[CLI_MAX_ARGS];
    const char *value[CLI_MAX_ARGS]; /* NULL for flags */
};

struct cli {
    /* global options */
    const char *endpoint, *region, *profile, *ca_file;
    int json, quiet;
    /* the command running */
    const struct cli_cmd *cmd;
    p11kms_client *client; /* made on first use */
};

struct cli_cmd {
    const char *group; /* NULL: a top-level command (encrypt, decrypt) */
    const char *name;
    const char *summary;
    const char *usage; /* after "p11kms [global options] <group> <name> " */
    const struct cli_opt *opts;
    int (*run)(struct cli *cli, const struct cli_args *a);
    /* Takes words after the command (tag's TAGKEY=VALUE...): in the args as "arg". */
    int positionals;
};

extern const struct cli_cmd cli_key_commands[];
extern const size_t cli_key_commands_count;
extern const struct cli_cmd cli_data_commands[];
extern const size_t cli_data_commands_count;
extern const struct cli_cmd cli_asym_commands[];
extern const size_t cli_asym_commands_count;
extern const struct cli_cmd cli_manage_commands[];
extern const size_t cli_manage_commands_count;

/* ---- main.c ---- */
/* The client, made from the global options and the environment on first use. */
int cli_client(struct cli *cli, p11kms_client **out);

/* ---- options ---- */
/* The last value given for an option, or NULL. */
const char *cli_arg(const struct cli_args *a, const char *name);
int cli_flag(const struct cli_args *a, const char *name);
/*
 * Every --context k=v as pairs (strings point into argv). Returns 0, or
 * prints a usage error and returns CLI_EXIT_USAGE. *out is freed by the caller.
 */
int cli_contexts(const struct cli_args *a, struct p11kms_context **out, size_t *n);
/* A required option; prints a usage error when missing. */
const char *cli_required(struct cli *cli, const struct cli_args *a, const char *name);

/* ---- commands_data.c: input and output shared by the commands ---- */
/*
 * The whole of path (stdin for NULL or "-"), 1 to max bytes: *out is the
 * caller's to free. hint (may be NULL) follows the message when it is longer.
 */
int cli_read_input(struct cli *cli, const char *path, const char *what, const char *hint,
                   size_t max, uint8_t **out, size_t *n);
/* Refuses -o naming the -i file (it would be overwritten) before anything is read or sent. */
int cli_check_paths(struct cli *cli, const struct cli_args *a);

/* ---- profile.c ---- */
struct cli_profile {
    char *access_key_id, *secret_access_key, *session_token, *region;
};
/*
 * Reads profile `name` from AWS_SHARED_CREDENTIALS_FILE (~/.aws/credentials)
 * and its region from AWS_CONFIG_FILE (~/.aws/config). Returns 0 when found
 * with credentials, -1 when not (the message printed unless quiet_missing).
 */
int cli_profile_load(const char *name, struct cli_profile *p);
/* Wipes and frees. */
void cli_profile_clear(struct cli_profile *p);

/* ---- output.c ---- */
int cli_exit_code(p11kms_status s);
/* Prints "p11kms: <StatusName>: <message>" (and {"error":...} on stdout with --json
   unless stdout carries data); returns the exit code for s. */
int cli_fail_status(struct cli *cli, p11kms_status s, int stdout_is_data);
/* A local error: "p11kms: <type>: <message>"; returns code. */
int cli_fail(struct cli *cli, int code, const char *type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
int cli_usage_error(struct cli *cli, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Prints an answer: as JSON with --json, else for people. */
void cli_print(struct cli *cli, const json_t *answer);
/* For people: one line per array element of member `list`, the named fields. */
void cli_print_table(struct cli *cli, const json_t *answer, const char *list,
                     const char *const *fields);

struct cli_progress {
    int on;
    const char *verb;
    uint64_t total; /* 0: unknown */
    double start, last;
    int shown;
    unsigned delay_ms;
};
void cli_progress_init(struct cli_progress *p, const struct cli *cli, const char *verb,
                       uint64_t total);
void cli_progress_update(void *arg, uint64_t done);
void cli_progress_end(struct cli_progress *p, uint64_t done);

/* ---- commands_data.c: input and output files, shared with commands_asym.c ---- */
#define CLI_DETECT_LEN 16
/* One side of a command's I/O: a file, stdin or stdout. */
struct cli_io {
    int fd;
    const char *name; /* for messages */
    /* bytes read ahead (decrypt's detection), served first */
    uint8_t pre[CLI_DETECT_LEN];
    size_t pre_len, pre_off;
    uint64_t count; /* bytes through this side */
    int err;        /* errno of a failure, 0 when none */
};
/* p11kms_read_fn and p11kms_write_fn over a struct cli_io. */
p11kms_status cli_io_read(void *arg, uint8_t *buf, size_t cap, size_t *got);
p11kms_status cli_io_write(void *arg, const uint8_t *buf, size_t n);
/* Reads until cap bytes or the end; *n what was read. 0, or -1 with in->err set. */
int cli_read_full(struct cli_io *in, uint8_t *buf, size_t cap, size_t *n);
/* path NULL or "-": stdin. *size: a regular file's size, else 0. */
int cli_in_open(struct cli *cli, const char *path, struct cli_io *in, uint64_t *size);
void cli_in_close(struct cli_io *in);
/*
 * An output file is written as a temporary file beside it (mode 0600) and
 * renamed over path by cli_out_close(ok = 1); ok = 0 removes it. path NULL
 * or "-": stdout.
 */
struct cli_out_file {
    const char *path; /* NULL: stdout */
    char *tmp;
};
int cli_out_open(struct cli *cli, const char *path, struct cli_out_file *of, struct cli_io *out);
int cli_out_close(struct cli *cli, struct cli_out_file *of, struct cli_io *out, int ok);
/* An I/O failure inside a stream call wins over the status it caused. */
int cli_io_fail(struct cli *cli, const struct cli_io *in, const struct cli_io *out);

/* ---- commands_keys.c ---- */
/*
 * Calls operation with request (borrowed; NULL: {}), parsing the answer into
 * *answer. Returns 0 or an exit code (the error printed).
 */
int cli_call(struct cli *cli, const char *operation, json_t *request, json_t **answer);

#endif
