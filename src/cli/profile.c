/*
 * Profiles as the aws CLI keeps them: [name] sections of
 * AWS_SHARED_CREDENTIALS_FILE (~/.aws/credentials) with aws_access_key_id,
 * aws_secret_access_key and aws_session_token, and the region from
 * [profile name] ([default] for the default) of AWS_CONFIG_FILE (~/.aws/config).
 * Lines holding secrets are wiped once read.
 */
#include "config.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"

static char *trim(char *s)
{
    char *e;
    while (isspace((unsigned char)*s))
        s++;
    e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

static void wipe_str(char *s)
{
    if (s) {
        volatile char *v = s;
        while (*v)
            *v++ = '\0';
    }
}

static void wipe_mem(char *p, size_t n)
{
    volatile char *v = p;
    while (n--)
        *v++ = '\0';
}

static void set(char **dst, const char *v)
{
    if (*dst) {
        wipe_str(*dst);
        free(*dst);
    }
    *dst = strdup(v);
}

/* Reads the keys we know of section `section` of path into p; 1 when the section is there. */
static int read_section(const char *path, const char *section, struct cli_profile *p, int config)
{
    FILE *f;
    char line[4096];
    int in = 0, found = 0;
    if (!path || !(f = fopen(path, "r")))
        return 0;
    while (fgets(line, sizeof line, f)) {
        char *s = trim(line), *eq, *k, *v;
        if (*s == '#' || *s == ';' || *s == '\0')
            continue;
        if (*s == '[') {
            char *end = strchr(s, ']');
            if (end)
                *end = '\0';
            in = strcmp(trim(s + 1), section) == 0;
            found |= in;
            continue;
        }
        if (!in || !(eq = strchr(s, '=')))
            continue;
        *eq = '\0';
        k = trim(s);
        v = trim(eq + 1);
        if (config) {
            if (strcmp(k, "region") == 0)
                set(&p->region, v);
        } else if (strcmp(k, "aws_access_key_id") == 0) {
            set(&p->access_key_id, v);
        } else if (strcmp(k, "aws_secret_access_key") == 0) {
            set(&p->secret_access_key, v);
        } else if (strcmp(k, "aws_session_token") == 0) {
            set(&p->session_token, v);
        }
        wipe_str(v);
    }
    wipe_mem(line, sizeof line);
    fclose(f);
    return found;
}

static char *home_path(const char *env, const char *rel)
{
    const char *v = getenv(env), *home = getenv("HOME");
    char *out;
    size_t n;
    if (v && *v)
        return strdup(v);
    if (!home || !*home)
        return NULL;
    n = strlen(home) + strlen(rel) + 2;
    if (!(out = malloc(n)))
        return NULL;
    snprintf(out, n, "%s/%s", home, rel);
    return out;
}

int cli_profile_load(const char *name, struct cli_profile *p)
{
    char *creds = home_path("AWS_SHARED_CREDENTIALS_FILE", ".aws/credentials");
    char *config = home_path("AWS_CONFIG_FILE", ".aws/config");
    char section[512];

    read_section(creds, name, p, 0);
    if (strcmp(name, "default") == 0)
        snprintf(section, sizeof section, "default");
    else
        snprintf(section, sizeof section, "profile %s", name);
    read_section(config, section, p, 1);
    free(creds);
    free(config);
    if (!p->access_key_id || !p->secret_access_key) {
        cli_profile_clear(p);
        return -1;
    }
    return 0;
}

void cli_profile_clear(struct cli_profile *p)
{
    char **fields[] = {&p->access_key_id, &p->secret_access_key, &p->session_token, &p->region};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        wipe_str(*fields[i]);
        free(*fields[i]);
        *fields[i] = NULL;
    }
}
