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
 * Asymmetric and HMAC keys (tests/integration/test_client_asym.py); files
 * hold raw bytes, ALG "-" is the call's default (NULL), a header is NAME=VALUE:
 *   driver sign KEY ALG raw|digest MSG OUT        p11kms_sign, the signature to OUT
 *   driver verify KEY ALG raw|digest MSG SIG      p11kms_verify
 *   driver mac KEY ALG MSG OUT                    p11kms_generate_mac
 *   driver verify-mac KEY ALG MSG MAC             p11kms_verify_mac
 *   driver headers-mac KEY ALG OUT H...           p11kms_headers_mac
 *   driver headers-verify KEY ALG TAG H...        p11kms_headers_verify
 *   driver headers-canonical OUT H...             p11kms_headers_canonical
 *   driver public-key KEY OUT                     p11kms_get_public_key: DER to OUT, then
 *                                                 "public_key_info\tSPEC\tUSAGE\tARN"
 *   driver derive KEY PEER OUT                    p11kms_derive_shared_secret
 *   driver pair KEY SPEC PRIV PUB BLOB            p11kms_generate_data_key_pair (context
 *                                                 purpose=pair), then p11kms_decrypt_data_key
 *                                                 of the blob: "pair_blob_match\t0|1"
 *   driver pair-no-plaintext KEY SPEC PUB BLOB    the same without plaintext
 *   driver rsa-encrypt KEY ALG IN OUT             p11kms_rsa_encrypt
 *   driver rsa-decrypt KEY ALG IN OUT             p11kms_rsa_decrypt
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

/* ---- asymmetric and HMAC keys ---- */

#define FILE_MAX (64 * 1024)

/* A whole file (at most FILE_MAX bytes); exits 2 when it cannot be read. */
static uint8_t *read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    uint8_t *buf = malloc(FILE_MAX + 1);
    if (!f || !buf) {
        fprintf(stderr, "driver: cannot read %s\n", path);
        exit(2);
    }
    *n = fread(buf, 1, FILE_MAX + 1, f);
    fclose(f);
    if (*n > FILE_MAX) {
        fprintf(stderr, "driver: %s is over %d bytes\n", path, FILE_MAX);
        exit(2);
    }
    return buf;
}

static void write_file(const char *path, const uint8_t *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n || fclose(f) != 0) {
        fprintf(stderr, "driver: cannot write %s\n", path);
        exit(2);
    }
}

static const char *alg_arg(const char *s)
{
    return strcmp(s, "-") == 0 ? NULL : s;
}

static p11kms_message_type type_arg(const char *s)
{
    if (strcmp(s, "raw") == 0)
        return P11KMS_MESSAGE_RAW;
    if (strcmp(s, "digest") == 0)
        return P11KMS_MESSAGE_DIGEST;
    fprintf(stderr, "driver: message type raw or digest, not %s\n", s);
    exit(2);
}

/* NAME=VALUE arguments as two arrays (pointing into argv, cut at the first '='). */
static void headers_arg(char **argv, int n, const char ***names, const char ***values)
{
    *names = calloc((size_t)n + 1, sizeof **names);
    *values = calloc((size_t)n + 1, sizeof **values);
    if (!*names || !*values)
        exit(1);
    for (int i = 0; i < n; i++) {
        char *eq = strchr(argv[i], '=');
        if (!eq) {
            fprintf(stderr, "driver: a header is NAME=VALUE, not %s\n", argv[i]);
            exit(2);
        }
        *eq = '\0';
        (*names)[i] = argv[i];
        (*values)[i] = eq + 1;
    }
}

/* Runs one asymmetric subcommand; -1 when argv names none of them. */
static int cmd_asym(p11kms_client *c, int argc, char **argv)
{
    const char *cmd = argv[0];
    uint8_t *a = NULL, *b = NULL, *out = NULL;
    size_t na = 0, nb = 0, nout = 0;
    p11kms_status st;
    double t0 = now_ms();

    if (strcmp(cmd, "sign") == 0 && argc == 6) {
        a = read_file(argv[4], &na);
        st = p11kms_sign(c, argv[1], alg_arg(argv[2]), type_arg(argv[3]), a, na, &out, &nout);
        report("sign", st, now_ms() - t0);
        if (st == P11KMS_OK)
            write_file(argv[5], out, nout);
    } else if (strcmp(cmd, "verify") == 0 && argc == 6) {
        a = read_file(argv[4], &na);
        b = read_file(argv[5], &nb);
        st = p11kms_verify(c, argv[1], alg_arg(argv[2]), type_arg(argv[3]), a, na, b, nb);
        report("verify", st, now_ms() - t0);
    } else if (strcmp(cmd, "mac") == 0 && argc == 5) {
        a = read_file(argv[3], &na);
        st = p11kms_generate_mac(c, argv[1], alg_arg(argv[2]), a, na, &out, &nout);
        report("mac", st, now_ms() - t0);
        if (st == P11KMS_OK)
            write_file(argv[4], out, nout);
    } else if (strcmp(cmd, "verify-mac") == 0 && argc == 5) {
        a = read_file(argv[3], &na);
        b = read_file(argv[4], &nb);
        st = p11kms_verify_mac(c, argv[1], alg_arg(argv[2]), a, na, b, nb);
        report("verify_mac", st, now_ms() - t0);
    } else if ((strcmp(cmd, "headers-mac") == 0 || strcmp(cmd, "headers-verify") == 0) &&
               argc >= 4) {
        const char **names, **values;
        headers_arg(argv + 4, argc - 4, &names, &values);
        if (strcmp(cmd, "headers-mac") == 0) {
            st = p11kms_headers_mac(c, argv[1], names, values, (size_t)(argc - 4), alg_arg(argv[2]),
                                    &out, &nout);
            report("headers_mac", st, now_ms() - t0);
            if (st == P11KMS_OK)
                write_file(argv[3], out, nout);
        } else {
            b = read_file(argv[3], &nb);
            st = p11kms_headers_verify(c, argv[1], names, values, (size_t)(argc - 4),
                                       alg_arg(argv[2]), b, nb);
            report("headers_verify", st, now_ms() - t0);
        }
        free(names);
        free(values);
    } else if (strcmp(cmd, "headers-canonical") == 0 && argc >= 2) {
        const char **names, **values;
        headers_arg(argv + 2, argc - 2, &names, &values);
        st = p11kms_headers_canonical(names, values, (size_t)(argc - 2), &out, &nout);
        report("headers_canonical", st, now_ms() - t0);
        if (st == P11KMS_OK)
            write_file(argv[1], out, nout);
        free(names);
        free(values);
    } else if (strcmp(cmd, "public-key") == 0 && argc == 3) {
        struct p11kms_public_key pk;
        st = p11kms_get_public_key(c, argv[1], &pk);
        report("public_key", st, now_ms() - t0);
        if (st == P11KMS_OK) {
            write_file(argv[2], pk.der, pk.der_len);
            printf("public_key_info\t%s\t%s\t%s\n", pk.key_spec, pk.key_usage, pk.key_arn);
        }
        p11kms_public_key_clear(&pk);
    } else if (strcmp(cmd, "derive") == 0 && argc == 4) {
        a = read_file(argv[2], &na);
        st = p11kms_derive_shared_secret(c, argv[1], a, na, &out, &nout);
        report("derive", st, now_ms() - t0);
        if (st == P11KMS_OK)
            write_file(argv[3], out, nout);
    } else if ((strcmp(cmd, "pair") == 0 && argc == 6) ||
               (strcmp(cmd, "pair-no-plaintext") == 0 && argc == 5)) {
        const struct p11kms_context ctx[] = {{"purpose", "pair"}};
        struct p11kms_data_key_pair kp;
        int plain = strcmp(cmd, "pair") == 0;
        st = plain ? p11kms_generate_data_key_pair(c, argv[1], argv[2], ctx, 1, &kp)
                   : p11kms_generate_data_key_pair_without_plaintext(c, argv[1], argv[2], ctx, 1,
                                                                     &kp);
        report(plain ? "pair" : "pair_no_plaintext", st, now_ms() - t0);
        if (st == P11KMS_OK) {
            struct p11kms_data_key dk;
            if (plain)
                write_file(argv[3], kp.private_key, kp.private_key_len);
            else
                printf("private_key_null\t%d\n", kp.private_key == NULL);
            write_file(argv[plain ? 4 : 3], kp.public_key, kp.public_key_len);
            write_file(argv[plain ? 5 : 4], kp.private_key_blob, kp.private_key_blob_len);
            printf("pair_info\t%s\t%s\n", kp.key_pair_spec, kp.key_arn);
            if (plain) {
                t0 = now_ms();
                st = p11kms_decrypt_data_key(c, kp.private_key_blob, kp.private_key_blob_len, ctx,
                                             1, &dk);
                report("pair_decrypt_blob", st, now_ms() - t0);
                if (st == P11KMS_OK)
                    printf("pair_blob_match\t%d\n",
                           dk.plaintext_len == kp.private_key_len &&
                               memcmp(dk.plaintext, kp.private_key, dk.plaintext_len) == 0);
                p11kms_data_key_clear(&dk);
            }
        }
        p11kms_data_key_pair_clear(&kp);
    } else if ((strcmp(cmd, "rsa-encrypt") == 0 || strcmp(cmd, "rsa-decrypt") == 0) && argc == 5) {
        int enc = strcmp(cmd, "rsa-encrypt") == 0;
        a = read_file(argv[3], &na);
        st = enc ? p11kms_rsa_encrypt(c, argv[1], alg_arg(argv[2]), a, na, &out, &nout)
                 : p11kms_rsa_decrypt(c, argv[1], alg_arg(argv[2]), a, na, &out, &nout);
        report(enc ? "rsa_encrypt" : "rsa_decrypt", st, now_ms() - t0);
        if (st == P11KMS_OK)
            write_file(argv[4], out, nout);
    } else {
        return -1;
    }
    free(a);
    free(b);
    p11kms_free(out, nout);
    return 0;
}

static int usage(void)
{
    fprintf(stderr,
            "usage: driver [--ca-file F] [--cert F] [--key F] [--max-attempts N]\n"
            "  [--threshold N] [--cooldown-ms N] [--timeout-ms N] [--connect-timeout-ms N]\n"
            "  [--retry-base-ms N] [--retry-cap-ms N] [--budget-ms N]\n"
            "  roundtrip KEY | generate KEY N | threads KEY T N | repl\n"
            "  | sign|verify|mac|verify-mac|headers-mac|headers-verify|headers-canonical\n"
            "  | public-key|derive|pair|pair-no-plaintext|rsa-encrypt|rsa-decrypt ...\n"
            "  (the header comment of tests/client/driver.c says each one's arguments)\n");
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
    else if ((rc = cmd_asym(c, argc - i, argv + i)) < 0)
        rc = usage();
    p11kms_client_free(c);
    return rc;
}
