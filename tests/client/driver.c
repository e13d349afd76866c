/*
 * Drives libp11kms through its public API only, for
 * tests/integration/test_client.py. The endpoint, region and credentials
 * come from the environment (P11KMS_ENDPOINT, AWS_*), as an application's
 * would; options on the command line set the rest.
 *
 *   driver [options] roundtrip KEY   generate, decrypt, decrypt under another context
 *   driver [options] generate KEY N  N data keys one after another
 *   driver [options] threads KEY T N T threads sharing one client, N generate/decrypt
 *                                    pairs each, plaintexts compared
 *   driver [options] repl            one client, commands from stdin: "gen KEY",
 *                                    "dec" (the last key's blob), "sleep MS", "quit"
 *
 * Each call prints one line: "<what>\t<status name>\t<milliseconds>\t<message>".
 * The exit status is 0 when the driver ran (whatever the calls gave), 2 on
 * a usage error, 1 when the client cannot be made.
 */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "p11kms.h"

static struct p11kms_options opts;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

/* One result line; tabs and newlines in the message become spaces. */
static void report(const char *what, p11kms_status st, double ms)
{
    char msg[512];
    snprintf(msg, sizeof msg, "%s", st == P11KMS_OK ? "" : p11kms_last_error());
    for (char *p = msg; *p; p++)
        if (*p == '\t' || *p == '\n' || *p == '\r')
            *p = ' ';
    printf("%s\t%s\t%.1f\t%s\n", what, p11kms_status_name(st), ms, msg);
    fflush(stdout);
}

static p11kms_status timed_generate(p11kms_client *c, const char *key,
                                    const struct p11kms_context *ctx, size_t nctx,
                                    struct p11kms_data_key *dk, const char *what)
{
    double t0 = now_ms();
    p11kms_status st = p11kms_generate_data_key(c, key, ctx, nctx, dk);
    if (what)
        report(what, st, now_ms() - t0);
    return st;
}

static int same_key(const struct p11kms_data_key *a, const struct p11kms_data_key *b)
{
    return a->plaintext_len == b->plaintext_len && a->plaintext_len > 0 &&
           memcmp(a->plaintext, b->plaintext, a->plaintext_len) == 0;
}

static int cmd_roundtrip(p11kms_client *c, const char *key)
{
    const struct p11kms_context ctx[] = {{"purpose", "driver"}, {"tenant", "t-1"}};
    const struct p11kms_context other[] = {{"purpose", "driver"}, {"tenant", "t-2"}};
    struct p11kms_data_key gen, dec, bad;
    p11kms_status st;
    double t0;

    st = timed_generate(c, key, ctx, 2, &gen, "generate");
    if (st != P11KMS_OK)
        return 0;
    printf("key\t%zu\t%zu\t%s\n", gen.plaintext_len, gen.blob_len, gen.key_arn);
    t0 = now_ms();
    st = p11kms_decrypt_data_key(c, gen.blob, gen.blob_len, ctx, 2, &dec);
    report("decrypt", st, now_ms() - t0);
    if (st == P11KMS_OK) {
        printf("match\t%d\t%s\n", same_key(&gen, &dec), dec.key_arn);
        p11kms_data_key_clear(&dec);
    }
    /* The context in reverse order is the same context. */
    {
        const struct p11kms_context reversed[] = {ctx[1], ctx[0]};
        t0 = now_ms();
        st = p11kms_decrypt_data_key(c, gen.blob, gen.blob_len, reversed, 2, &dec);
        report("decrypt_reordered", st, now_ms() - t0);
        if (st == P11KMS_OK) {
            printf("match_reordered\t%d\n", same_key(&gen, &dec));
            p11kms_data_key_clear(&dec);
        }
    }
    t0 = now_ms();
    st = p11kms_decrypt_data_key(c, gen.blob, gen.blob_len, other, 2, &bad);
    report("decrypt_other_context", st, now_ms() - t0);
    printf("cleared\t%d\n", bad.plaintext == NULL && bad.plaintext_len == 0);
    p11kms_data_key_clear(&bad);
    t0 = now_ms();
    st = p11kms_decrypt_data_key(c, gen.blob, gen.blob_len, NULL, 0, &bad);
    report("decrypt_no_context", st, now_ms() - t0);
    p11kms_data_key_clear(&bad);
    p11kms_data_key_clear(&gen);
    return 0;
}

static int cmd_generate(p11kms_client *c, const char *key, long n)
{
    for (long i = 0; i < n; i++) {
        struct p11kms_data_key dk;
        char what[32];
        snprintf(what, sizeof what, "generate %ld", i + 1);
        if (timed_generate(c, key, NULL, 0, &dk, what) == P11KMS_OK)
            p11kms_data_key_clear(&dk);
    }
    return 0;
}

struct worker {
    pthread_t tid;
    p11kms_client *c;
    const char *key;
    long id, pairs, ok;
    p11kms_status first_failure;
    char message[256];
};

static void *work(void *arg)
{
    struct worker *w = arg;
    char thread_id[32], pair_id[32];
    for (long i = 0; i < w->pairs; i++) {
        struct p11kms_context ctx[2] = {{"thread", thread_id}, {"pair", pair_id}};
        struct p11kms_data_key gen, dec;
        p11kms_status st;
        snprintf(thread_id, sizeof thread_id, "%ld", w->id);
        snprintf(pair_id, sizeof pair_id, "%ld", i);
        st = p11kms_generate_data_key(w->c, w->key, ctx, 2, &gen);
        if (st == P11KMS_OK) {
            st = p11kms_decrypt_data_key(w->c, gen.blob, gen.blob_len, ctx, 2, &dec);
            if (st == P11KMS_OK) {
                if (same_key(&gen, &dec) && strcmp(gen.key_arn, dec.key_arn) == 0)
                    w->ok++;
                else if (w->first_failure == P11KMS_OK)
                    snprintf(w->message, sizeof w->message, "pair %ld: plaintexts differ", i);
                p11kms_data_key_clear(&dec);
            }
            p11kms_data_key_clear(&gen);
        }
        if (st != P11KMS_OK && w->first_failure == P11KMS_OK) {
            w->first_failure = st;
            snprintf(w->message, sizeof w->message, "pair %ld: %s", i, p11kms_last_error());
        }
    }
    return NULL;
}

static int cmd_threads(p11kms_client *c, const char *key, long nthreads, long pairs)
{
    struct worker *w = calloc((size_t)nthreads, sizeof *w);
    long total = 0;
    double t0 = now_ms();
    if (!w)
        return 1;
    for (long i = 0; i < nthreads; i++) {
        w[i] = (struct worker){.c = c, .key = key, .id = i, .pairs = pairs};
        if (pthread_create(&w[i].tid, NULL, work, &w[i]) != 0) {
            fprintf(stderr, "driver: pthread_create failed\n");
            exit(1);
        }
    }
    for (long i = 0; i < nthreads; i++) {
        pthread_join(w[i].tid, NULL);
        total += w[i].ok;
        if (w[i].first_failure != P11KMS_OK || w[i].message[0])
            printf("failure\t%ld\t%s\t%s\n", i, p11kms_status_name(w[i].first_failure),
                   w[i].message);
    }
    printf("pairs_ok\t%ld\t%.1f\n", total, now_ms() - t0);
    free(w);
    return 0;
}

static int cmd_repl(p11kms_client *c)
{
    char line[512], key[300];
    struct p11kms_data_key last;
    long ms;
    memset(&last, 0, sizeof last);
    printf("ready\t%d\n", p11kms_client_memory_locked(c));
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        struct p11kms_data_key dk;
        if (sscanf(line, "gen %299s", key) == 1) {
            if (timed_generate(c, key, NULL, 0, &dk, "gen") == P11KMS_OK) {
                p11kms_data_key_clear(&last);
                last = dk;
            }
        } else if (strncmp(line, "dec", 3) == 0) {
            /* the last generated key's blob, through the cache when it is on */
            double t0 = now_ms();
            p11kms_status st = p11kms_decrypt_data_key(c, last.blob, last.blob_len, NULL, 0, &dk);
            report(st == P11KMS_OK && !same_key(&dk, &last) ? "dec_mismatch" : "dec", st,
                   now_ms() - t0);
            p11kms_data_key_clear(&dk);
        } else if (sscanf(line, "sleep %ld", &ms) == 1) {
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
            nanosleep(&ts, NULL);
            printf("slept\n");
            fflush(stdout);
        } else if (strncmp(line, "quit", 4) == 0) {
            break;
        } else {
            printf("unknown\n");
            fflush(stdout);
        }
    }
    p11kms_data_key_clear(&last);
    return 0;
}

static int usage(void)
{
    fprintf(stderr,
            "usage: driver [--ca-file F] [--cert F] [--key F] [--max-attempts N]\n"
            "  [--threshold N] [--cooldown-ms N] [--timeout-ms N] [--connect-timeout-ms N]\n"
            "  [--retry-base-ms N] [--retry-cap-ms N] [--budget-ms N]\n"
            "  roundtrip KEY | generate KEY N | threads KEY T N | repl\n");
    return 2;
}

static long number(const char *s)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (!*s || *end || v < 0) {
        fprintf(stderr, "driver: '%s' is not a number\n", s);
        exit(2);
    }
    return v;
}

int main(int argc, char **argv)
{
    p11kms_client *c = NULL;
    p11kms_status st;
    int i = 1, rc = 2;

    p11kms_options_init(&opts);
    for (; i + 1 < argc && strncmp(argv[i], "--", 2) == 0; i += 2) {
        const char *o = argv[i], *v = argv[i + 1];
        if (strcmp(o, "--ca-file") == 0)
            opts.ca_file = v;
        else if (strcmp(o, "--cert") == 0)
            opts.client_cert_file = v;
        else if (strcmp(o, "--key") == 0)
            opts.client_key_file = v;
        else if (strcmp(o, "--max-attempts") == 0)
            opts.max_attempts = (unsigned)number(v);
        else if (strcmp(o, "--threshold") == 0)
            opts.breaker_threshold = (unsigned)number(v);
        else if (strcmp(o, "--cooldown-ms") == 0)
            opts.breaker_cooldown_ms = (unsigned)number(v);
        else if (strcmp(o, "--timeout-ms") == 0)
            opts.timeout_ms = (unsigned)number(v);
        else if (strcmp(o, "--connect-timeout-ms") == 0)
            opts.connect_timeout_ms = (unsigned)number(v);
        else if (strcmp(o, "--retry-base-ms") == 0)
            opts.retry_base_ms = (unsigned)number(v);
        else if (strcmp(o, "--retry-cap-ms") == 0)
            opts.retry_cap_ms = (unsigned)number(v);
        else if (strcmp(o, "--budget-ms") == 0)
            opts.retry_budget_ms = (unsigned)number(v);
        else if (strcmp(o, "--cache-age") == 0)
            opts.cache_max_age_s = (unsigned)number(v);
        else if (strcmp(o, "--grace") == 0)
            opts.cache_grace_s = (unsigned)number(v);
        else
            return usage();
    }
    if (i >= argc)
        return usage();

    st = p11kms_client_new(&opts, &c);
    if (st != P11KMS_OK) {
        report("client_new", st, 0);
        return 1;
    }
    if (strcmp(argv[i], "roundtrip") == 0 && argc - i == 2)
        rc = cmd_roundtrip(c, argv[i + 1]);
    else if (strcmp(argv[i], "generate") == 0 && argc - i == 3)
        rc = cmd_generate(c, argv[i + 1], number(argv[i + 2]));
    else if (strcmp(argv[i], "threads") == 0 && argc - i == 4)
        rc = cmd_threads(c, argv[i + 1], number(argv[i + 2]), number(argv[i + 3]));
    else if (strcmp(argv[i], "repl") == 0 && argc - i == 1)
        rc = cmd_repl(c);
    else
        rc = usage();
    p11kms_client_free(c);
    return rc;
}
