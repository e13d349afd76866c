/*
 * Replays a fuzz target's committed corpus without libFuzzer, so `make check`
 * (and its sanitizer build) runs every input that ever mattered through the
 * same LLVMFuzzerTestOneInput as `make fuzz` does, built with the project's
 * compiler and flags.
 *
 * Each tests/fuzz/replay_<target> is this file linked with fuzz_<target>.c;
 * FUZZ_TARGET names the corpus: $P11KMS_SRCDIR/tests/fuzz/corpus/<target>
 * unless files or directories are given as arguments. TAP: one line per
 * input. A target that finds a fault aborts (or a sanitizer stops it), which
 * the TAP driver reports as a failure with the input's name on the last line.
 */
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#ifndef FUZZ_TARGET
#error "FUZZ_TARGET must name the target (its corpus directory)"
#endif

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerInitialize(int *argc, char ***argv) __attribute__((weak));

#define MAX_INPUTS 4096
#define MAX_INPUT_SIZE (1u << 20)

static char *inputs[MAX_INPUTS];
static size_t ninputs;

static int by_name(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int add_input(const char *path)
{
    if (ninputs == MAX_INPUTS) {
        fprintf(stderr, "replay: more than %d inputs\n", MAX_INPUTS);
        return -1;
    }
    if (!(inputs[ninputs] = strdup(path)))
        return -1;
    ninputs++;
    return 0;
}

/* A file is one input; a directory's regular files are, in name order. */
static int collect(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode))
        return add_input(path);

    DIR *d = opendir(path);
    if (!d) {
        fprintf(stderr, "replay: %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t first = ninputs;
    int rc = 0;
    struct dirent *e;
    while (rc == 0 && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        char full[4096];
        if (snprintf(full, sizeof full, "%s/%s", path, e->d_name) >= (int)sizeof full) {
            rc = -1;
            break;
        }
        if (stat(full, &st) == 0 && S_ISREG(st.st_mode))
            rc = add_input(full);
    }
    closedir(d);
    qsort(inputs + first, ninputs - first, sizeof inputs[0], by_name);
    return rc;
}

static int read_input(const char *path, uint8_t **data, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    uint8_t *buf = malloc(MAX_INPUT_SIZE + 1);
    size_t n = buf ? fread(buf, 1, MAX_INPUT_SIZE + 1, f) : 0;
    int bad = !buf || ferror(f) || n > MAX_INPUT_SIZE;
    fclose(f);
    if (bad) {
        free(buf);
        return -1;
    }
    *data = buf;
    *size = n;
    return 0;
}

int main(int argc, char **argv)
{
    int rc = 0;
    if (argc > 1) {
        for (int i = 1; i < argc && rc == 0; i++)
            rc = collect(argv[i]);
    } else {
        const char *src = getenv("P11KMS_SRCDIR");
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/tests/fuzz/corpus/%s", src ? src : ".", FUZZ_TARGET);
        rc = collect(dir);
    }
    if (rc != 0 || ninputs == 0) {
        printf("1..1\nnot ok 1 - %s: no corpus to replay\n", FUZZ_TARGET);
        return 1;
    }
    if (LLVMFuzzerInitialize)
        LLVMFuzzerInitialize(&argc, &argv);

    printf("1..%zu\n", ninputs);
    int failed = 0;
    for (size_t i = 0; i < ninputs; i++) {
        uint8_t *data = NULL;
        size_t size = 0;
        const char *name = strrchr(inputs[i], '/') ? strrchr(inputs[i], '/') + 1 : inputs[i];
        if (read_input(inputs[i], &data, &size) != 0) {
            printf("not ok %zu - %s: %s is unreadable or over %u bytes\n", i + 1, FUZZ_TARGET, name,
                   MAX_INPUT_SIZE);
            failed = 1;
        } else {
            /* Named before the run: if the target aborts, this is the last line. */
            printf("# %s: %s (%zu bytes)\n", FUZZ_TARGET, name, size);
            fflush(stdout);
            LLVMFuzzerTestOneInput(data, size);
            free(data);
            printf("ok %zu - %s: %s\n", i + 1, FUZZ_TARGET, name);
        }
        free(inputs[i]);
    }
    return failed;
}
