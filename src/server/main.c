/* p11kmsd: the p11kms key management server. */
#include "config.h"

#include <getopt.h>
#include <openssl/crypto.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common/json_alloc.h"
#include "common/log.h"
#include "server/checkconf.h"
#include "server/dev.h"
#include "server/audit.h"
#include "server/grants.h"
#include "server/ops.h"
#include "server/policy.h"
#include "server/pool.h"
#include "server/breaker.h"
#include "server/ratelimit.h"
#include "server/server.h"
#include "server/stats.h"
#include "server/tls.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: p11kmsd --dev [--state-dir DIR] [--listen HOST:PORT] [options]\n"
               "       p11kmsd --config FILE [--listen HOST:PORT] [options]\n"
               "       p11kmsd --check-config FILE      check FILE, the token and the database\n"
               "       p11kmsd init --config FILE       make the database and the root key\n"
               "       p11kmsd migrate --config FILE    import an earlier release's token\n"
               "       p11kmsd backup --config FILE OUT copy the database to OUT\n"
               "\n"
               "  --dev              development mode: a SoftHSM2 token, a database, a principal\n"
               "                     and the key alias/dev in DIR, made on first start\n"
               "  --state-dir DIR    development state folder (default\n"
               "                     $XDG_STATE_HOME/p11kms-dev or ~/.local/state/p11kms-dev)\n"
               "  --config FILE      configuration file (see p11kmsd(8))\n"
               "  --check-config FILE\n"
               "                     report every problem of FILE with its line, and exit 1 if\n"
               "                     there is one; changes nothing\n"
               "  --database URL     the database (sqlite:PATH or postgresql://...), instead of\n"
               "                     the configured one; never with a password in it\n"
               "  --listen HOST:PORT address to serve on (port 0 picks a free port)\n"
               "  --threads N        HTTP worker threads\n"
               "  --verbose          log every request (log_requests) and debugging lines\n"
               "  --version          print the version\n"
               "\n"
               "The token PIN comes from the configured pin_file or the P11KMS_PIN\n"
               "environment variable, never from the command line; PostgreSQL's password\n"
               "from PGPASSFILE or PGPASSWORD (or the configuration file, mode 0600).\n");
}

static char *default_state_dir(void)
{
    const char *xdg = getenv("XDG_STATE_HOME"), *home = getenv("HOME");
    char path[4096];
    if (xdg && *xdg)
        snprintf(path, sizeof path, "%s/p11kms-dev", xdg);
    else
        snprintf(path, sizeof path, "%s/.local/state/p11kms-dev", home && *home ? home : ".");
    /* make the parents; the state folder itself is made 0700 later */
    char parent[4096];
    snprintf(parent, sizeof parent, "%s", path);
    for (char *p = parent + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(parent, 0755);
            *p = '/';
        }
    }
    return strdup(path);
}

/* Room for as many connections as asked, within what the process may open. */
static void fit_connections(struct kms_config *cfg)
{
    struct rlimit files;
    if (getrlimit(RLIMIT_NOFILE, &files) != 0)
        return;
    if (files.rlim_cur < files.rlim_max && files.rlim_cur < cfg->max_connections + 256u) {
        files.rlim_cur = files.rlim_max;
        setrlimit(RLIMIT_NOFILE, &files);
        getrlimit(RLIMIT_NOFILE, &files);
    }
    if (files.rlim_cur != RLIM_INFINITY && files.rlim_cur < cfg->max_connections + 256u) {
        unsigned fit = files.rlim_cur > 512 ? (unsigned)files.rlim_cur - 256 : 256;
        kms_warn("max_connections %u lowered to %u: the open files limit is %llu",
                 cfg->max_connections, fit, (unsigned long long)files.rlim_cur);
        cfg->max_connections = fit;
    }
}

/*
 * Keeps the process's memory (PINs, data keys, plaintext on their way) out of
 * swap. Pages are locked as they are touched (MCL_ONFAULT), so thread stacks
 * do not cost their whole reservation.
 */
static kms_err lock_memory(const struct kms_config *cfg)
{
    if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0)
        return KMS_OK;
    struct rlimit lim = {0, 0};
    getrlimit(RLIMIT_MEMLOCK, &lim);
    KMS_ENSURE(!cfg->require_locked_memory, KMS_ERR_VALIDATION,
               "cannot lock memory (%s; RLIMIT_MEMLOCK %llu bytes) and require_locked_memory is "
               "set: raise the limit (systemd LimitMEMLOCK=infinity) or run with CAP_IPC_LOCK",
               strerror(errno), (unsigned long long)lim.rlim_cur);
    kms_warn("memory is NOT locked (%s; RLIMIT_MEMLOCK %llu bytes): secrets may be swapped out. "
             "Raise the limit (systemd LimitMEMLOCK=infinity), or set require_locked_memory = "
             "true to refuse to start like this",
             strerror(errno), (unsigned long long)lim.rlim_cur);
    return KMS_OK;
}

enum { RUN_SERVE, RUN_DEV, RUN_INIT, RUN_MIGRATE };

/* alias_policy_file: a policy document in the key policies' language, compiled once. */
static kms_err load_alias_policy(struct kms_server *srv)
{
    const char *path = srv->cfg.alias_policy_file;
    if (!path)
        return KMS_OK;
    KMS_GUARD(kms_alias_policy_load(path, srv->cfg.account, &srv->alias_policy));
    kms_info("alias names are governed by the alias policy %s", path);
    return KMS_OK;
}

static kms_err start(struct kms_server *srv, int mode)
{
    char *pin = NULL;
    size_t pin_len = 0;
    kms_err rc;

    KMS_GUARD(kms_config_check(&srv->cfg));
    KMS_GUARD(load_alias_policy(srv));
    KMS_GUARD(kms_credentials_load(srv->cfg.credentials_file, &srv->creds));
    KMS_GUARD(kms_ratelimit_new(&srv->cfg.limits, &srv->limits));
    struct kms_breaker_config breaker = {srv->cfg.breaker_failures, srv->cfg.breaker_window_s,
                                         srv->cfg.breaker_cooldown_s};
    KMS_GUARD(kms_breaker_new(&breaker, &srv->breaker));
    KMS_GUARD(kms_tls_load(&srv->cfg, &srv->tls));
    KMS_GUARD(kms_read_pin(&srv->cfg, 1, &pin, &pin_len));
    if (!srv->cfg.workers)
        srv->cfg.workers = srv->cfg.threads;
    if (srv->cfg.inline_requests == KMS_INLINE_DEFAULT)
        srv->cfg.inline_requests = srv->cfg.threads - 1;
    if (!srv->cfg.sessions) /* and one for the key store's own work */
        srv->cfg.sessions = srv->cfg.workers + srv->cfg.inline_requests + 1;
    fit_connections(&srv->cfg);
    struct kms_hsm_config hc = {
        .module = srv->cfg.module,
        .token = srv->cfg.token,
        .pin = pin,
        .sessions = srv->cfg.sessions,
        .acquire_timeout_ms = srv->cfg.session_timeout_ms,
    };
    rc = kms_hsm_open(&hc, &srv->hsm);
    kms_free_secret(pin, pin_len + 1);
    if (rc != KMS_OK)
        return rc;
    struct kms_store_config sc =
        kms_config_store(&srv->cfg, mode == RUN_SERVE ? KMS_STORE_OPEN : KMS_STORE_INIT);
    KMS_GUARD(kms_store_open(&sc, &srv->store));
    if (mode != RUN_SERVE) {
        int made = 0;
        KMS_GUARD(kms_keystore_init_roots(srv->hsm, srv->store, &made));
        int version = 0;
        KMS_GUARD(kms_store_database_version(srv->store, &version));
        /* A root key just made has had its own line. */
        kms_info("database %s at schema version %d%s", kms_store_name(srv->store), version,
                 made ? "" : "; its root key is in the token");
        /* An earlier release's state in the token: imported once (a no-op after). */
        if (mode == RUN_MIGRATE || mode == RUN_DEV)
            KMS_GUARD(kms_migrate_token(srv->hsm, srv->store, &srv->cfg.keys, mode == RUN_DEV));
        if (mode == RUN_INIT || mode == RUN_MIGRATE)
            return KMS_OK;
    }
    struct kms_keystore_config kc = srv->cfg.keys;
    kc.region = srv->cfg.region;
    kc.account = srv->cfg.account;
    kc.compile_policy = kms_policy_compile;
    kc.add_grant = kms_grant_add;
    kc.free_grants = kms_grant_set_free;
    kc.free_policy = kms_policy_release;
    kc.policy_arg = srv;
    KMS_GUARD(kms_account_policy(srv->cfg.account, &srv->account_policy));
    kc.default_policy = srv->account_policy;
    kc.audit.intent = kms_http_change_intent;
    kc.audit.outcome = kms_http_change_outcome;
    kc.audit.arg = srv;
    KMS_GUARD(kms_keystore_open(srv->hsm, srv->store, &kc, &srv->ks));
    if (srv->cfg.audit_log) {
        struct kms_audit_config ac = {
            .path = srv->cfg.audit_log,
            .checkpoint_lines = srv->cfg.audit_checkpoint_lines,
            .checkpoint_seconds = srv->cfg.audit_checkpoint_seconds,
            .store = srv->store,
            .node = srv->cfg.audit_node,
        };
        KMS_GUARD(kms_audit_open(&ac, srv->hsm, &srv->audit));
    } else {
        kms_warn("no audit_log configured: requests are not audited");
    }
    kms_info("key store opened: %zu keys in %s", kms_keystore_count(srv->ks),
             kms_store_name(srv->store));
    return KMS_OK;
}

/* p11kmsd backup: the database's online backup; the token's root keys are the HSM's to back up. */
static kms_err run_backup(const struct kms_config *cfg, const char *out)
{
    struct kms_store *st;
    KMS_ENSURE(cfg->database, KMS_ERR_VALIDATION,
               "the configuration needs 'database' (sqlite:/path/to/p11kms.db)");
    struct kms_store_config sc = kms_config_store(cfg, KMS_STORE_OPEN);
    KMS_GUARD(kms_store_open(&sc, &st));
    kms_err rc = kms_store_backup(st, out);
    kms_store_close(st);
    if (rc == KMS_OK)
        printf("p11kmsd: backup of %s written to %s\n", cfg->database, out);
    return rc;
}

/*
 * SIGHUP: the credentials file and, with --config, the rate limits are read
 * again. A file that does not load leaves everything as it was.
 */
static void reload(struct kms_server *srv, const char *config_file)
{
    struct kms_credentials creds = {0};
    struct kms_config fresh;
    kms_err rc = KMS_OK;

    /* Log rotation first: whatever the rest of the reload does. */
    if (kms_log_reopen() != KMS_OK) {
        kms_error("%s", kms_err_message());
        kms_err_clear();
    }
    if (srv->audit && kms_audit_reopen(srv->audit) != KMS_OK) {
        kms_error("audit log: %s", kms_err_message());
        kms_err_clear();
    }
    kms_config_defaults(&fresh);
    if (config_file)
        rc = kms_config_load(&fresh, config_file);
    if (rc == KMS_OK)
        rc = kms_credentials_load(config_file ? fresh.credentials_file : srv->cfg.credentials_file,
                                  &creds);
    if (rc == KMS_OK && config_file)
        rc = kms_ratelimit_configure(srv->limits, &fresh.limits, kms_monotonic_ns());
    if (rc == KMS_OK) {
        pthread_rwlock_wrlock(&srv->creds_lock);
        struct kms_credentials old = srv->creds;
        srv->creds = creds;
        pthread_rwlock_unlock(&srv->creds_lock);
        kms_credentials_free(&old);
        kms_info("reloaded: %zu principals%s", srv->creds.n, config_file ? ", rate limits" : "");
    } else {
        kms_error("reload refused, keeping the running settings: %s", kms_err_message());
        kms_credentials_free(&creds);
    }
    kms_config_free(&fresh);
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"dev", no_argument, NULL, 'd'},
        {"state-dir", required_argument, NULL, 's'},
        {"config", required_argument, NULL, 'c'},
        {"listen", required_argument, NULL, 'l'},
        {"threads", required_argument, NULL, 't'},
        {"verbose", no_argument, NULL, 'v'},
        {"version", no_argument, NULL, 'V'},
        {"database", required_argument, NULL, 'D'},
        {"help", no_argument, NULL, 'h'},
        {"check-config", required_argument, NULL, 'C'},
        {NULL, 0, NULL, 0},
    };
    struct kms_server srv;
    const char *config_file = NULL, *listen = NULL, *threads = NULL, *database = NULL;
    const char *backup_out = NULL, *check_file = NULL;
    int command = RUN_SERVE, backup = 0, verbose = 0;
    char *state_dir = NULL;
    int dev = 0, opt, status = 1;
    sigset_t stop;
    struct rlimit no_core = {0, 0};

    memset(&srv, 0, sizeof srv);
    kms_config_defaults(&srv.cfg);
    if (argc > 1 && argv[1][0] != '-') {
        if (strcmp(argv[1], "init") == 0)
            command = RUN_INIT;
        else if (strcmp(argv[1], "migrate") == 0)
            command = RUN_MIGRATE;
        else if (strcmp(argv[1], "backup") == 0)
            backup = 1;
        else {
            fprintf(stderr, "p11kmsd: unknown command '%s'\n", argv[1]);
            usage(stderr);
            return 2;
        }
        argv++;
        argc--;
    }
    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'd': dev = 1; break;
        case 's':
            free(state_dir);
            state_dir = strdup(optarg);
            break;
        case 'c': config_file = optarg; break;
        case 'l': listen = optarg; break;
        case 't': threads = optarg; break;
        case 'v': verbose = 1; break;
        case 'C': check_file = optarg; break;
        case 'D': database = optarg; break;
        case 'V': printf("p11kmsd %s\n", PACKAGE_VERSION); return 0;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (check_file) {
        if (optind != argc || dev || config_file || command != RUN_SERVE || backup) {
            usage(stderr);
            return 2;
        }
        /* It prints the problems, each once: log lines would repeat them. */
        kms_log_set_level(KMS_LOG_NONE);
        kms_json_use_cleansing_alloc();
        return kms_check_config(check_file);
    }
    if (backup && optind + 1 == argc)
        backup_out = argv[optind++];
    if (optind != argc || dev == !!config_file || (backup && !backup_out) ||
        (command != RUN_SERVE && dev) || (backup && dev)) {
        usage(stderr);
        return 2;
    }
    if (dev)
        command = RUN_DEV;

    /* Secrets must not reach a core file, nor another process of this user (ptrace, /proc). */
    setrlimit(RLIMIT_CORE, &no_core);
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    kms_json_use_cleansing_alloc();
    signal(SIGPIPE, SIG_IGN);
    sigemptyset(&stop);
    sigaddset(&stop, SIGINT);
    sigaddset(&stop, SIGTERM);
    sigaddset(&stop, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &stop, NULL);
    pthread_rwlock_init(&srv.creds_lock, NULL);
    pthread_mutex_init(&srv.active_lock, NULL);
    pthread_cond_init(&srv.active_done, NULL);

    kms_err rc = KMS_OK;
    if (config_file)
        rc = kms_config_load(&srv.cfg, config_file);
    if (rc == KMS_OK && listen)
        rc = kms_config_set(&srv.cfg, "listen", listen);
    if (rc == KMS_OK && threads)
        rc = kms_config_set(&srv.cfg, "threads", threads);
    /*
     * Every user of the machine can read a command line (ps, /proc/PID/cmdline):
     * no password there. The URL is not repeated, for it would show it again.
     */
    if (rc == KMS_OK && database && kms_store_url_has_secret(database))
        rc = KMS_FAIL(KMS_ERR_VALIDATION,
                      "--database: the URL holds a password, and every user of this machine can "
                      "read a command line: give the password through PGPASSFILE (or the URL's "
                      "passfile=FILE) or PGPASSWORD, or put the URL in the configuration file "
                      "(mode 0600)");
    if (rc == KMS_OK && database)
        rc = kms_config_set(&srv.cfg, "database", database);
    if (verbose) {
        kms_log_set_level(KMS_LOG_DEBUG);
        srv.cfg.log_requests = 1;
    }
    kms_log_set_format(srv.cfg.log_format);
    if (rc == KMS_OK)
        rc = kms_log_open(srv.cfg.log_file);
    if (rc == KMS_OK && backup) {
        rc = run_backup(&srv.cfg, backup_out);
        if (rc != KMS_OK)
            kms_error("%s", kms_err_message());
        kms_config_free(&srv.cfg);
        return rc == KMS_OK ? 0 : 1;
    }
    if (rc == KMS_OK && dev) {
        if (!state_dir)
            state_dir = default_state_dir();
        rc = state_dir ? kms_dev_prepare(state_dir, &srv.cfg)
                       : KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    if (rc == KMS_OK)
        rc = lock_memory(&srv.cfg);
    if (rc == KMS_OK)
        rc = start(&srv, command);
    if (rc == KMS_OK && (command == RUN_INIT || command == RUN_MIGRATE)) {
        /* The store's name: the URL without its password. */
        printf("p11kmsd: %s done: %s\n", command == RUN_INIT ? "init" : "migrate",
               kms_store_name(srv.store));
        status = 0;
        goto out;
    }
    if (rc == KMS_OK && dev)
        rc = kms_dev_ensure_key(&srv);
    if (rc == KMS_OK)
        rc = kms_keystore_start(srv.ks);
    if (rc == KMS_OK)
        rc = kms_stats_start(&srv);
    if (rc == KMS_OK)
        rc = kms_http_start(&srv);
    if (rc == KMS_OK && dev)
        rc = kms_dev_write_env(state_dir, &srv);
    if (rc == KMS_OK && !dev) {
        printf("p11kmsd: serving %s://%s:%u\n", srv.tls ? "https" : "http", srv.host, srv.port);
        fflush(stdout);
    }
    if (rc == KMS_OK) {
        int sig = 0;
        kms_info("ready on %s:%u", srv.host, srv.port);
        while (sigwait(&stop, &sig) == 0 && sig == SIGHUP)
            reload(&srv, config_file);
        kms_info("stopping on signal %d: no new connections, answering those in flight", sig);
        status = 0;
        if (!kms_http_drain(&srv)) {
            /* A connection still waits on a token call that never returned: just leave. */
            kms_error("exiting without closing the token");
            _exit(status);
        }
    } else {
        kms_error("%s", kms_err_message());
    }
out:
    kms_http_stop(&srv);
    /* The key store's own changes are audited: its thread stops before the log closes. */
    if (srv.ks)
        kms_keystore_stop(srv.ks);
    kms_audit_close(srv.audit); /* its close checkpoint, the node's head */
    kms_stats_free(&srv);       /* after every thread that calls the token, the audit log's too */
    kms_ratelimit_free(srv.limits);
    kms_breaker_free(srv.breaker);
    kms_tls_free(srv.tls);
    kms_keystore_close(srv.ks);
    kms_store_close(srv.store);
    free(srv.account_policy); /* the key store's default policy */
    kms_policy_free(srv.alias_policy);
    kms_hsm_close(srv.hsm);
    kms_credentials_free(&srv.creds);
    kms_config_free(&srv.cfg);
    pthread_rwlock_destroy(&srv.creds_lock);
    free(state_dir);
    kms_log_close();
    return status;
}
