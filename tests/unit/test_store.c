/*
 * Unit tests for src/store/store.h on both engines: a real SQLite file in a
 * temporary folder, and a real PostgreSQL database (one per test, made and
 * dropped around it) on the server tests/pgserver.sh starts.
 *
 * Both: the schema made by KMS_STORE_INIT and the refusals of KMS_STORE_OPEN
 * (empty, newer), every row call's round trip and its exact errors (stale
 * revisions, unique constraints, missing rows), the usage reservation's
 * bound, the change sequence, rollback, what one thread's connection sees of
 * another's transaction, concurrent writers.
 *
 * SQLite (the default run): bad URLs, a missing file, a file that is not a
 * database, a write lock held past the busy timeout, the online backup, no
 * change feed; which URLs hold a secret.
 *
 * PostgreSQL (P11KMS_TEST_ENGINE=postgresql, P11KMS_TEST_PG_URL naming a
 * database on a server where its user may create databases; `make check`
 * runs tests/unit/test_store_pg.sh, which sets both): the store's name
 * without the password, a bad URL, a database that does not exist or cannot
 * be reached, a migration that fails leaves nothing behind, concurrent inits
 * migrate once, a unique alias raced from two nodes, a write transaction
 * waiting on another's row lock, changes committing in seq order, the root
 * keys read for a write, concurrent usage reservations, a row lock held past
 * the statement timeout, an exhausted pool, the server crashed and restarted
 * under an open store, and backup refused in favour of pg_dump; the change
 * feed (LISTEN/NOTIFY: a committed change announced at once, a rolled-back
 * one not, a wake-up, a listener the server killed made again), the pool's
 * configured size, a connect deadline in milliseconds (a server that never
 * answers) and the URL's connect_timeout winning over it, a URL of several
 * hosts whose first one never answers.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <ftw.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "common/encoding.h"
#include "common/error.h"
#include "common/log.h"
#include "store/store.h"

/* ---- the PostgreSQL server (P11KMS_TEST_PG_URL) ------------------------------- */

/* The server's address, from P11KMS_TEST_PG_URL; each test makes its own database there. */
static struct {
    char admin[512]; /* P11KMS_TEST_PG_URL: a database to run CREATE DATABASE from */
    char user[64], password[128], host[128], port[16];
} pg;

/* store_pg.c's pool when kms_store_config names none */
#define PG_POOL_SIZE KMS_STORE_POOL_DEFAULT

/* s with every byte but RFC 3986's unreserved ones percent-encoded. */
static void url_encode(const char *s, char *out, size_t n)
{
    size_t o = 0;
    for (; *s && o + 4 < n; s++) {
        unsigned char c = (unsigned char)*s;
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
            strchr("-._~", c))
            out[o++] = (char)c;
        else
            o += (size_t)snprintf(out + o, n - o, "%%%02X", c);
    }
    out[o] = '\0';
}

static int pg_setup(void)
{
    const char *url = getenv("P11KMS_TEST_PG_URL");
    PQconninfoOption *opts;
    if (!url || !*url) {
        fprintf(stderr, "P11KMS_TEST_PG_URL is not set (tests/pgserver.sh run sets it)\n");
        return -1;
    }
    opts = PQconninfoParse(url, NULL);
    if (!opts || strlen(url) >= sizeof pg.admin)
        return -1;
    snprintf(pg.admin, sizeof pg.admin, "%s", url);
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        const char *v = o->val ? o->val : "";
        if (strcmp(o->keyword, "user") == 0)
            url_encode(v, pg.user, sizeof pg.user);
        else if (strcmp(o->keyword, "password") == 0)
            url_encode(v, pg.password, sizeof pg.password);
        else if (strcmp(o->keyword, "host") == 0)
            url_encode(*v ? v : "127.0.0.1", pg.host, sizeof pg.host);
        else if (strcmp(o->keyword, "port") == 0)
            snprintf(pg.port, sizeof pg.port, "%s", *v ? v : "5432");
    }
    PQconninfoFree(opts);
    return pg.user[0] && pg.password[0] ? 0 : -1;
}

/* A connection of the test's own, outside the store; fails the test if it cannot be made. */
static PGconn *pg_connect(const char *url)
{
    PGconn *c = PQconnectdb(url);
    if (PQstatus(c) != CONNECTION_OK)
        fail_msg("cannot connect to PostgreSQL: %s", PQerrorMessage(c));
    return c;
}

/* Runs SQL on c; the rows' first value (or "") goes to out when given. */
static void pg_exec_on(PGconn *c, const char *sql, char *out, size_t n)
{
    PGresult *r = PQexec(c, sql);
    ExecStatusType x = PQresultStatus(r);
    if (x != PGRES_COMMAND_OK && x != PGRES_TUPLES_OK)
        fail_msg("%s: %s", sql, PQerrorMessage(c));
    if (out)
        snprintf(out, n, "%s", PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "");
    PQclear(r);
}

static void pg_exec(const char *url, const char *sql, char *out, size_t n)
{
    PGconn *c = pg_connect(url);
    pg_exec_on(c, sql, out, n);
    PQfinish(c);
}

/* Runs the server's control script (tests/pgserver.sh crash|start DIR). */
static void pg_server(const char *what)
{
    const char *script = getenv("P11KMS_TEST_PG_SERVER"), *dir = getenv("P11KMS_TEST_PG_DIR");
    if (!script || !dir)
        fail_msg("P11KMS_TEST_PG_SERVER and P11KMS_TEST_PG_DIR are not set");
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        execl(script, script, what, dir, (char *)NULL);
        _exit(127);
    }
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    assert_int_equal(WEXITSTATUS(status), 0);
}

/* ---- a temporary folder with a database path in it (or a PostgreSQL database) ---- */

struct fixture {
    char dir[128];
    char db[192];   /* DIR/kms.db; PostgreSQL: the database's name */
    char url[640];  /* sqlite:DIR/kms.db; PostgreSQL: postgresql://USER:PASSWORD@HOST:PORT/DB */
    char name[640]; /* what kms_store_name answers: the URL without the password */
    int pg;         /* the database is PostgreSQL's */
    struct kms_store *st;
};

static int make_fixture(void **state)
{
    struct fixture *f = calloc(1, sizeof *f);
    const char *base = getenv("TMPDIR");
    if (!f)
        return -1;
    snprintf(f->dir, sizeof f->dir, "%s/p11kms-store-XXXXXX",
             base && *base && strlen(base) < 80 ? base : "/tmp");
    if (!mkdtemp(f->dir)) {
        free(f);
        return -1;
    }
    snprintf(f->db, sizeof f->db, "%s/kms.db", f->dir);
    snprintf(f->url, sizeof f->url, "sqlite:%s", f->db);
    snprintf(f->name, sizeof f->name, "%s", f->url);
    *state = f;
    return 0;
}

/* The folder, and a new empty database on the PostgreSQL server. */
static int make_pg_fixture(void **state)
{
    static unsigned made;
    char sql[256];
    if (make_fixture(state) != 0)
        return -1;
    struct fixture *f = *state;
    f->pg = 1;
    snprintf(f->db, sizeof f->db, "p11kms_t%ld_%u", (long)getpid(), ++made);
    snprintf(f->url, sizeof f->url, "postgresql://%s:%s@%s:%s/%s", pg.user, pg.password, pg.host,
             pg.port, f->db);
    snprintf(f->name, sizeof f->name, "postgresql://%s@%s:%s/%s", pg.user, pg.host, pg.port, f->db);
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", f->db);
    pg_exec(pg.admin, sql, NULL, 0);
    return 0;
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int remove_fixture(void **state)
{
    struct fixture *f = *state;
    kms_store_close(f->st);
    if (f->pg) {
        char sql[256];
        snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s WITH (FORCE)", f->db);
        pg_exec(pg.admin, sql, NULL, 0);
    }
    nftw(f->dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

static kms_err open_store(const char *url, int mode, unsigned timeout_ms, struct kms_store **out)
{
    struct kms_store_config c = {.url = url, .timeout_ms = timeout_ms, .mode = mode};
    kms_err_clear();
    return kms_store_open(&c, out);
}

/* The fixture's database, created (KMS_STORE_INIT). */
static struct kms_store *init_store(struct fixture *f)
{
    assert_int_equal(open_store(f->url, KMS_STORE_INIT, 0, &f->st), KMS_OK);
    return f->st;
}

/*
 * open_store with the log in a file of the fixture's folder; the lines that
 * name the schema are copied to out (the caller checks every one).
 */
static kms_err open_logged(struct fixture *f, int mode, struct kms_store **st, char *out, size_t n)
{
    char path[160], line[1024];
    size_t used = 0;
    snprintf(path, sizeof path, "%s/store.log", f->dir);
    unlink(path);
    kms_log_set_level(KMS_LOG_INFO); /* the default, said again */
    assert_int_equal(kms_log_open(path), KMS_OK);
    kms_err rc = open_store(f->url, mode, 0, st);
    kms_log_close();
    FILE *in = fopen(path, "r");
    assert_non_null(in);
    out[0] = '\0';
    while (fgets(line, sizeof line, in))
        if (strstr(line, "schema") && used + strlen(line) < n) {
            memcpy(out + used, line, strlen(line) + 1);
            used += strlen(line);
        }
    fclose(in);
    return rc;
}

/* How often needle occurs in text. */
static int occurrences(const char *text, const char *needle)
{
    int k = 0;
    for (const char *p = strstr(text, needle); p; p = strstr(p + 1, needle))
        k++;
    return k;
}

static struct kms_tx *begin(struct kms_store *st, int mode)
{
    struct kms_tx *tx = NULL;
    assert_int_equal(kms_store_begin(st, mode, &tx), KMS_OK);
    assert_non_null(tx);
    return tx;
}

static void commit(struct kms_tx *tx)
{
    assert_int_equal(kms_store_commit(tx), KMS_OK);
}

static void write_bytes(const char *path, const void *p, size_t n)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, p, n), (ssize_t)n);
    assert_int_equal(close(fd), 0);
}

/* Runs SQL on a connection of our own, outside the store. */
static void raw_exec(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    char *err = NULL;
    assert_int_equal(sqlite3_open_v2(path, &db, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    int rc = sqlite3_exec(db, sql, NULL, NULL, &err);
    if (rc != SQLITE_OK)
        fail_msg("%s: %s", sql, err ? err : sqlite3_errstr(rc));
    sqlite3_free(err);
    assert_int_equal(sqlite3_close(db), SQLITE_OK);
}

static void assert_contains(const char *haystack, const char *needle)
{
    if (!strstr(haystack, needle))
        fail_msg("\"%s\" does not contain \"%s\"", haystack, needle);
}

static void assert_lacks(const char *haystack, const char *needle)
{
    if (strstr(haystack, needle))
        fail_msg("\"%s\" contains \"%s\"", haystack, needle);
}

/* Sets the schema version the fixture's database says it has, behind the store's back. */
static void set_schema_version(struct fixture *f, int version)
{
    char sql[96];
    if (f->pg) {
        snprintf(sql, sizeof sql, "UPDATE schema_version SET version = %d", version);
        pg_exec(f->url, sql, NULL, 0);
    } else {
        snprintf(sql, sizeof sql, "PRAGMA user_version = %d", version);
        raw_exec(f->db, sql);
    }
}

static int64_t elapsed_ms(const struct timespec *since)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (int64_t)(now.tv_sec - since->tv_sec) * 1000 + (now.tv_nsec - since->tv_nsec) / 1000000;
}

static void id_of(uint8_t id[KMS_UUID_LEN], uint8_t first)
{
    memset(id, 0x5a, KMS_UUID_LEN);
    id[0] = first;
}

/* A key row with every field set to something distinct. */
static void key_row(struct kms_key_row *r, uint8_t first, const char *description,
                    const char *policy)
{
    memset(r, 0, sizeof *r);
    id_of(r->id, first);
    r->created = 1700000000 + first;
    r->state = KMS_STORE_ENABLED;
    r->deletion_date = 1700100000;
    r->rotation_enabled = 1;
    r->rotation_days = 90;
    r->rotation_seconds = 90 * 86400;
    r->next_rotation = 1707776000;
    r->current = 0xdeadbeef;
    r->on_demand = 3;
    r->token_resident = 0;
    r->rev = 1;
    r->description = description ? strdup(description) : NULL;
    r->policy = policy ? strdup(policy) : NULL;
}

static void insert_key(struct kms_store *st, uint8_t first, int state)
{
    struct kms_key_row r;
    key_row(&r, first, "k", NULL);
    r.state = state;
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_insert(tx, &r), KMS_OK);
    commit(tx);
    kms_key_row_clear(&r);
}

static void assert_key_equal(const struct kms_key_row *a, const struct kms_key_row *b)
{
    assert_memory_equal(a->id, b->id, KMS_UUID_LEN);
    assert_int_equal(a->created, b->created);
    assert_int_equal(a->state, b->state);
    assert_int_equal(a->deletion_date, b->deletion_date);
    assert_int_equal(a->rotation_enabled, b->rotation_enabled);
    assert_int_equal(a->rotation_days, b->rotation_days);
    assert_int_equal(a->rotation_seconds, b->rotation_seconds);
    assert_int_equal(a->next_rotation, b->next_rotation);
    assert_int_equal(a->current, b->current);
    assert_int_equal(a->on_demand, b->on_demand);
    assert_int_equal(a->token_resident, b->token_resident);
    assert_int_equal(a->spec, b->spec);
    assert_int_equal(a->usage, b->usage);
    assert_int_equal(a->rev, b->rev);
    assert_non_null(a->description);
    assert_non_null(b->description);
    assert_string_equal(a->description, b->description);
    if (a->policy || b->policy) {
        assert_non_null(a->policy);
        assert_non_null(b->policy);
        assert_string_equal(a->policy, b->policy);
    }
}

static uint32_t insert_root(struct kms_store *st, uint8_t fill)
{
    struct kms_root_row r = {0};
    memset(r.cka_id, fill, sizeof r.cka_id);
    snprintf(r.label, sizeof r.label, "p11kms-root:%u", 1700000000u + fill);
    r.created = 1700000000 + fill;
    r.state = KMS_ROOT_CURRENT;
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_root_insert(tx, &r), KMS_OK);
    commit(tx);
    assert_true(r.id > 0);
    return r.id;
}

static void version_row(struct kms_version_row *v, const uint8_t key[KMS_UUID_LEN], uint32_t vid,
                        uint32_t n, uint32_t root)
{
    memset(v, 0, sizeof *v);
    memcpy(v->key_id, key, KMS_UUID_LEN);
    v->vid = vid;
    v->n = n;
    v->created = 1700000000 + n;
    v->rotation = n == 1 ? KMS_ROTATION_NONE : KMS_ROTATION_ON_DEMAND;
    v->reserved = 0;
    v->bound = 10;
    v->root = root;
    v->wrapped_len = 40;
    for (size_t i = 0; i < 40; i++)
        v->wrapped[i] = (uint8_t)(vid + i);
}

/* ---- opening ------------------------------------------------------------------- */

static void test_init_creates_schema(void **state)
{
    struct fixture *f = *state;
    struct stat sb;
    int version = -1;

    char logged[2048], want[800];

    assert_true(kms_store_schema_version() >= 1);
    assert_int_equal(open_logged(f, KMS_STORE_INIT, &f->st, logged, sizeof logged), KMS_OK);
    assert_string_equal(kms_store_name(f->st), f->name);
    /* one line for the schema made, none for each migration in it */
    snprintf(want, sizeof want, "database %s: schema made at version %d\n", f->name,
             kms_store_schema_version());
    assert_int_equal(occurrences(logged, "schema"), 1);
    assert_int_equal(occurrences(logged, want), 1);
    assert_int_equal(kms_store_database_version(f->st, &version), KMS_OK);
    assert_int_equal(version, kms_store_schema_version());
    /* made private: the database holds wrapped keys */
    if (!f->pg) {
        assert_int_equal(stat(f->db, &sb), 0);
        assert_int_equal(sb.st_mode & 077, 0);
    }
    /* an empty database: no keys, no changes */
    size_t keys = 99, versions = 99;
    int64_t head = -1, tail = -1;
    struct kms_tx *tx = begin(f->st, KMS_TX_READ);
    assert_int_equal(kms_store_key_count(tx, &keys, &versions), KMS_OK);
    assert_int_equal(kms_store_change_head(tx, &head), KMS_OK);
    assert_int_equal(kms_store_change_tail(tx, &tail), KMS_OK);
    commit(tx);
    assert_int_equal(keys, 0);
    assert_int_equal(versions, 0);
    assert_int_equal(head, 0);
    assert_int_equal(tail, 0);
    kms_store_close(f->st);
    f->st = NULL;

    /* INIT again is idempotent (and says nothing of the schema); OPEN accepts it */
    assert_int_equal(open_logged(f, KMS_STORE_INIT, &f->st, logged, sizeof logged), KMS_OK);
    assert_int_equal(occurrences(logged, "schema"), 0);
    kms_store_close(f->st);
    f->st = NULL;
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &f->st), KMS_OK);
    assert_int_equal(kms_store_database_version(f->st, &version), KMS_OK);
    assert_int_equal(version, kms_store_schema_version());
    if (f->pg)
        return;

    /* sqlite:///abs/path is the same file */
    char url3[300];
    struct kms_store *again = NULL;
    snprintf(url3, sizeof url3, "sqlite://%s", f->db);
    assert_int_equal(open_store(url3, KMS_STORE_OPEN, 0, &again), KMS_OK);
    kms_store_close(again);
}

static void test_open_refuses_bad_urls(void **state)
{
    struct kms_store *st = NULL;
    (void)state;
    assert_int_equal(open_store("mysql://db/kms", KMS_STORE_INIT, 0, &st), KMS_ERR_VALIDATION);
    assert_contains(kms_err_message(), "sqlite:PATH or a PostgreSQL URL");
    assert_int_equal(open_store("postgresql:/db/kms", KMS_STORE_INIT, 0, &st), KMS_ERR_VALIDATION);
    assert_int_equal(open_store("sqlite:", KMS_STORE_INIT, 0, &st), KMS_ERR_VALIDATION);
    assert_int_equal(open_store(NULL, KMS_STORE_INIT, 0, &st), KMS_ERR_VALIDATION);
    assert_null(st);
}

static void test_open_missing_file(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = NULL;
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &st), KMS_ERR_INTERNAL);
    assert_null(st);
    assert_contains(kms_err_message(), f->url);
    assert_contains(kms_err_message(), "does not exist");
    assert_contains(kms_err_message(), "init");
    /* OPEN creates nothing */
    assert_int_not_equal(access(f->db, F_OK), 0);
}

static void test_open_empty_file(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = NULL;
    if (!f->pg)
        write_bytes(f->db, "", 0); /* PostgreSQL's is new and empty */
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &st), KMS_ERR_INTERNAL);
    assert_null(st);
    assert_contains(kms_err_message(), f->name);
    assert_contains(kms_err_message(), "not initialised");
    assert_contains(kms_err_message(), "init");
    /* INIT makes a database of it */
    assert_int_equal(open_store(f->url, KMS_STORE_INIT, 0, &f->st), KMS_OK);
}

static void test_open_random_bytes(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = NULL;
    uint8_t junk[8192];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (uint8_t)(i * 131 + 7);
    write_bytes(f->db, junk, sizeof junk);
    for (int mode = KMS_STORE_OPEN; mode <= KMS_STORE_INIT; mode++) {
        assert_int_equal(open_store(f->url, mode, 0, &st), KMS_ERR_INTERNAL);
        assert_null(st);
        assert_contains(kms_err_message(), f->url);
        /* the message names the path once, then says what is wrong with it */
        const char *first = strstr(kms_err_message(), f->url);
        assert_null(strstr(first + strlen(f->url), f->url));
        assert_contains(kms_err_message(), "not a database");
    }
}

static void test_open_newer_schema(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = NULL;
    char want[32];
    init_store(f);
    kms_store_close(f->st);
    f->st = NULL;
    set_schema_version(f, 99);
    snprintf(want, sizeof want, "%d", 99);
    for (int mode = KMS_STORE_OPEN; mode <= KMS_STORE_INIT; mode++) {
        assert_int_equal(open_store(f->url, mode, 0, &st), KMS_ERR_INTERNAL);
        assert_null(st);
        assert_contains(kms_err_message(), f->name);
        assert_contains(kms_err_message(), "newer");
        assert_contains(kms_err_message(), want);
    }
}

/* ---- keys ---------------------------------------------------------------------- */

static void test_key_round_trip(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct kms_key_row a, b, got = {0};
    static const char policy[] = "{\"Version\":\"2012-10-17\",\"Statement\":[]}";

    key_row(&a, 1, "first key \xe2\x82\xac 'quoted' \"too\"", NULL);
    key_row(&b, 2, NULL, policy); /* a NULL description is stored as "" */
    b.state = KMS_STORE_PENDING;
    b.rotation_enabled = 0;
    b.token_resident = 1;
    b.current = 1;
    b.spec = 3;  /* RSA_4096 */
    b.usage = 1; /* SIGN_VERIFY */
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_insert(tx, &a), KMS_OK);
    assert_int_equal(kms_store_key_insert(tx, &b), KMS_OK);
    /* the same id again */
    assert_int_equal(kms_store_key_insert(tx, &a), KMS_ERR_ALREADY_EXISTS);
    commit(tx);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_key_get(tx, a.id, &got), KMS_OK);
    assert_key_equal(&got, &a);
    assert_null(got.policy);
    kms_key_row_clear(&got);
    assert_int_equal(kms_store_key_get(tx, b.id, &got), KMS_OK);
    free(b.description);
    b.description = strdup("");
    assert_key_equal(&got, &b);
    assert_string_equal(got.policy, policy);
    kms_key_row_clear(&got);
    uint8_t missing[KMS_UUID_LEN];
    id_of(missing, 3);
    assert_int_equal(kms_store_key_get(tx, missing, &got), KMS_ERR_NOT_FOUND);
    size_t keys = 0;
    assert_int_equal(kms_store_key_count(tx, &keys, NULL), KMS_OK);
    assert_int_equal(keys, 2);
    commit(tx);

    /* an update of every field: policy set, then cleared again */
    tx = begin(st, KMS_TX_WRITE);
    free(a.description);
    a.description = strdup("changed");
    free(a.policy);
    a.policy = strdup(policy);
    a.state = KMS_STORE_DISABLED;
    a.deletion_date = 1800000000;
    a.rotation_enabled = 0;
    a.rotation_days = 365;
    a.rotation_seconds = 365 * 86400;
    a.next_rotation = 1800000001;
    a.current = 7;
    a.on_demand = 4;
    a.token_resident = 1;
    a.spec = 9; /* set at creation only: an update leaves the stored 0 */
    assert_int_equal(kms_store_key_update(tx, &a), KMS_OK);
    assert_int_equal(a.rev, 2);
    assert_int_equal(kms_store_key_get(tx, a.id, &got), KMS_OK);
    assert_int_equal(got.spec, 0);
    a.spec = 0;
    assert_key_equal(&got, &a);
    kms_key_row_clear(&got);
    free(a.policy);
    a.policy = NULL;
    assert_int_equal(kms_store_key_update(tx, &a), KMS_OK);
    assert_int_equal(a.rev, 3);
    commit(tx);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_key_get(tx, a.id, &got), KMS_OK);
    assert_key_equal(&got, &a);
    assert_null(got.policy);
    commit(tx);
    kms_key_row_clear(&got);
    kms_key_row_clear(&a);
    kms_key_row_clear(&b);
}

static void test_key_update_stale_rev(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct kms_key_row r, stale, got = {0};

    key_row(&r, 1, "original", NULL);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_insert(tx, &r), KMS_OK);
    commit(tx);

    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_get(tx, r.id, &stale), KMS_OK);
    assert_int_equal(stale.rev, 1);
    free(r.description);
    r.description = strdup("first writer");
    assert_int_equal(kms_store_key_update(tx, &r), KMS_OK);
    assert_int_equal(r.rev, 2);
    /* a writer that read revision 1 loses */
    free(stale.description);
    stale.description = strdup("second writer");
    stale.state = KMS_STORE_DISABLED;
    kms_err_clear();
    assert_int_equal(kms_store_key_update(tx, &stale), KMS_ERR_INVALID_STATE);
    assert_contains(kms_err_message(), "changed meanwhile");
    assert_int_equal(stale.rev, 1);
    commit(tx);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_key_get(tx, r.id, &got), KMS_OK);
    assert_key_equal(&got, &r);
    assert_string_equal(got.description, "first writer");
    assert_int_equal(got.state, KMS_STORE_ENABLED);
    commit(tx);

    /* an update of a key that is not there is refused the same way */
    struct kms_key_row ghost;
    key_row(&ghost, 9, "ghost", NULL);
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_update(tx, &ghost), KMS_ERR_INVALID_STATE);
    assert_int_equal(kms_store_key_get(tx, ghost.id, &got), KMS_ERR_NOT_FOUND);
    commit(tx);
    kms_key_row_clear(&ghost);
    kms_key_row_clear(&got);
    kms_key_row_clear(&stale);
    kms_key_row_clear(&r);
}

struct seen_keys {
    uint8_t first[16];
    size_t n;
};

static kms_err note_key(void *arg, const struct kms_key_row *r)
{
    struct seen_keys *s = arg;
    assert_true(s->n < 16);
    assert_non_null(r->description);
    s->first[s->n++] = r->id[0];
    return KMS_OK;
}

static kms_err stop_at_second(void *arg, const struct kms_key_row *r)
{
    struct seen_keys *s = arg;
    s->first[s->n++] = r->id[0];
    return s->n == 2 ? KMS_ERR_LIMIT_EXCEEDED : KMS_OK;
}

static void list_keys(struct kms_store *st, const uint8_t *from, size_t limit, struct seen_keys *s)
{
    memset(s, 0, sizeof *s);
    struct kms_tx *tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_keys_list(tx, from, limit, note_key, s), KMS_OK);
    commit(tx);
}

static void test_keys_list_paging(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct seen_keys s;
    uint8_t from[KMS_UUID_LEN];

    /* inserted out of order; 3 and 6 are destroyed */
    static const uint8_t order[] = {5, 1, 7, 3, 2, 6, 4};
    for (size_t i = 0; i < sizeof order; i++)
        insert_key(st, order[i], order[i] % 3 == 0 ? KMS_STORE_DESTROYED : KMS_STORE_ENABLED);

    list_keys(st, NULL, 100, &s);
    assert_int_equal(s.n, 5);
    assert_memory_equal(s.first, ((uint8_t[]){1, 2, 4, 5, 7}), 5);

    list_keys(st, NULL, 2, &s);
    assert_int_equal(s.n, 2);
    assert_memory_equal(s.first, ((uint8_t[]){1, 2}), 2);

    /* the marker is inclusive */
    id_of(from, 2);
    list_keys(st, from, 2, &s);
    assert_int_equal(s.n, 2);
    assert_memory_equal(s.first, ((uint8_t[]){2, 4}), 2);
    /* a destroyed marker starts at the next live key */
    id_of(from, 3);
    list_keys(st, from, 100, &s);
    assert_int_equal(s.n, 3);
    assert_memory_equal(s.first, ((uint8_t[]){4, 5, 7}), 3);
    id_of(from, 8);
    list_keys(st, from, 100, &s);
    assert_int_equal(s.n, 0);
    list_keys(st, NULL, 0, &s);
    assert_int_equal(s.n, 0);

    /* the callback's failure stops the walk and is returned */
    memset(&s, 0, sizeof s);
    struct kms_tx *tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_keys_list(tx, NULL, 100, stop_at_second, &s),
                     KMS_ERR_LIMIT_EXCEEDED);
    assert_int_equal(s.n, 2);
    size_t keys = 0, versions = 9;
    assert_int_equal(kms_store_key_count(tx, &keys, &versions), KMS_OK);
    assert_int_equal(keys, 5);
    assert_int_equal(versions, 0);
    commit(tx);
}

struct due_seen {
    uint8_t first[8];
    int what[8];
    size_t n;
};

static kms_err note_due(void *arg, const uint8_t id[KMS_UUID_LEN], int what)
{
    struct due_seen *d = arg;
    assert_true(d->n < 8);
    d->first[d->n] = id[0];
    d->what[d->n++] = what;
    return KMS_OK;
}

static void test_keys_due(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct kms_key_row r;
    struct due_seen d = {0};

    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    /* 1: rotation due at 100; 2: rotation due at 200; 3: rotation off; 4: disabled */
    for (uint8_t i = 1; i <= 4; i++) {
        key_row(&r, i, "", NULL);
        r.next_rotation = 100 * i;
        r.rotation_enabled = i != 3;
        r.state = i == 4 ? KMS_STORE_DISABLED : KMS_STORE_ENABLED;
        assert_int_equal(kms_store_key_insert(tx, &r), KMS_OK);
        kms_key_row_clear(&r);
    }
    /* 5: deletion due at 150; 6: pending until 1000 */
    for (uint8_t i = 5; i <= 6; i++) {
        key_row(&r, i, "", NULL);
        r.state = KMS_STORE_PENDING;
        r.rotation_enabled = 0;
        r.deletion_date = i == 5 ? 150 : 1000;
        assert_int_equal(kms_store_key_insert(tx, &r), KMS_OK);
        kms_key_row_clear(&r);
    }
    commit(tx);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_keys_due(tx, 99, 10, note_due, &d), KMS_OK);
    assert_int_equal(d.n, 0);
    assert_int_equal(kms_store_keys_due(tx, 200, 10, note_due, &d), KMS_OK);
    assert_int_equal(d.n, 3);
    assert_int_equal(d.first[0], 1);
    assert_int_equal(d.what[0], KMS_DUE_ROTATION);
    assert_int_equal(d.first[1], 2);
    assert_int_equal(d.what[1], KMS_DUE_ROTATION);
    assert_int_equal(d.first[2], 5);
    assert_int_equal(d.what[2], KMS_DUE_DELETION);
    memset(&d, 0, sizeof d);
    assert_int_equal(kms_store_keys_due(tx, 200, 1, note_due, &d), KMS_OK);
    assert_int_equal(d.n, 2); /* the limit is per kind */
    assert_int_equal(d.first[0], 1);
    assert_int_equal(d.first[1], 5);
    commit(tx);
}

/* ---- versions ------------------------------------------------------------------ */

struct seen_versions {
    uint32_t vid[8];
    uint32_t n[8];
    size_t count;
};

static kms_err note_version(void *arg, const struct kms_version_row *r)
{
    struct seen_versions *s = arg;
    assert_true(s->count < 8);
    s->vid[s->count] = r->vid;
    s->n[s->count++] = r->n;
    return KMS_OK;
}

static void test_versions(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    uint8_t key[KMS_UUID_LEN], other[KMS_UUID_LEN];
    struct kms_version_row v, got;
    struct seen_versions s = {0};
    uint32_t max_n = 99;

    uint32_t root = insert_root(st, 0x11);
    insert_key(st, 1, KMS_STORE_ENABLED);
    insert_key(st, 2, KMS_STORE_ENABLED);
    id_of(key, 1);
    id_of(other, 2);

    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_version_max_n(tx, key, &max_n), KMS_OK);
    assert_int_equal(max_n, 0);
    /* inserted out of ordinal order; vids are random, not ordered */
    static const uint32_t vids[] = {0xc0000003, 0x00000007, 0xffffffff};
    static const uint32_t ns[] = {3, 1, 2};
    for (int i = 0; i < 3; i++) {
        version_row(&v, key, vids[i], ns[i], root);
        assert_int_equal(kms_store_version_insert(tx, &v), KMS_OK);
    }
    /* a version with a public key (an asymmetric key's) */
    version_row(&v, other, 43, 3, root);
    v.public_key_len = sizeof v.public_key;
    for (size_t i = 0; i < v.public_key_len; i++)
        v.public_key[i] = (uint8_t)(i * 7);
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_OK);
    /* a token-resident version: no root, no wrapped key */
    version_row(&v, other, 42, 1, 0);
    v.wrapped_len = 0;
    v.reserved = 5;
    v.rotation = KMS_ROTATION_AUTOMATIC;
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_OK);
    commit(tx);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_version_get(tx, key, 0xffffffff, &got), KMS_OK);
    version_row(&v, key, 0xffffffff, 2, root);
    assert_memory_equal(got.key_id, key, KMS_UUID_LEN);
    assert_int_equal(got.vid, 0xffffffff);
    assert_int_equal(got.n, 2);
    assert_int_equal(got.created, v.created);
    assert_int_equal(got.rotation, KMS_ROTATION_ON_DEMAND);
    assert_int_equal(got.reserved, 0);
    assert_int_equal(got.bound, 10);
    assert_int_equal(got.root, root);
    assert_int_equal(got.wrapped_len, 40);
    assert_memory_equal(got.wrapped, v.wrapped, 40);
    assert_int_equal(got.public_key_len, 0);
    assert_int_equal(kms_store_version_get(tx, other, 43, &got), KMS_OK);
    assert_int_equal(got.public_key_len, KMS_PUBLIC_KEY_MAX);
    for (size_t i = 0; i < got.public_key_len; i++)
        assert_int_equal(got.public_key[i], (uint8_t)(i * 7));

    assert_int_equal(kms_store_version_get(tx, other, 42, &got), KMS_OK);
    assert_int_equal(got.root, 0);
    assert_int_equal(got.wrapped_len, 0);
    assert_int_equal(got.reserved, 5);
    assert_int_equal(got.rotation, KMS_ROTATION_AUTOMATIC);

    assert_int_equal(kms_store_version_get(tx, key, 42, &got), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_version_get(tx, other, 7, &got), KMS_ERR_NOT_FOUND);

    assert_int_equal(kms_store_versions(tx, key, note_version, &s), KMS_OK);
    assert_int_equal(s.count, 3);
    assert_int_equal(s.n[0], 1);
    assert_int_equal(s.vid[0], 0x00000007);
    assert_int_equal(s.n[1], 2);
    assert_int_equal(s.vid[1], 0xffffffff);
    assert_int_equal(s.n[2], 3);
    assert_int_equal(s.vid[2], 0xc0000003);
    assert_int_equal(kms_store_version_max_n(tx, key, &max_n), KMS_OK);
    assert_int_equal(max_n, 3);
    size_t keys = 0, versions = 0;
    assert_int_equal(kms_store_key_count(tx, &keys, &versions), KMS_OK);
    assert_int_equal(keys, 2);
    assert_int_equal(versions, 5);
    commit(tx);

    /* UNIQUE (key_id, n) and PRIMARY KEY (key_id, vid) */
    tx = begin(st, KMS_TX_WRITE);
    version_row(&v, key, 0x1234, 2, root);
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_ERR_ALREADY_EXISTS);
    version_row(&v, key, 0x00000007, 4, root);
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_ERR_ALREADY_EXISTS);
    /* the same vid and n under another key are fine */
    version_row(&v, other, 0x00000007, 2, root);
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_OK);
    commit(tx);

    memset(&s, 0, sizeof s);
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_versions(tx, key, note_version, &s), KMS_OK);
    assert_int_equal(s.count, 3);
    commit(tx);

    /* versions_delete takes one key's rows only */
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_versions_delete(tx, key), KMS_OK);
    commit(tx);
    memset(&s, 0, sizeof s);
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_versions(tx, key, note_version, &s), KMS_OK);
    assert_int_equal(s.count, 0);
    assert_int_equal(kms_store_versions(tx, other, note_version, &s), KMS_OK);
    assert_int_equal(s.count, 3);
    commit(tx);
}

static void test_reserve_bound(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    uint8_t key[KMS_UUID_LEN];
    struct kms_version_row v, got;
    uint64_t granted = 99, reserved = 99, total = 0;

    uint32_t root = insert_root(st, 0x22);
    insert_key(st, 1, KMS_STORE_ENABLED);
    id_of(key, 1);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    version_row(&v, key, 77, 1, root);
    v.bound = 10;
    v.reserved = 1;
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_OK);
    commit(tx);

    static const uint64_t want_granted[] = {4, 4, 1, 0, 0};
    static const uint64_t want_reserved[] = {5, 9, 10, 10, 10};
    for (int i = 0; i < 5; i++) {
        tx = begin(st, KMS_TX_WRITE);
        assert_int_equal(kms_store_reserve(tx, key, 77, 4, &granted, &reserved), KMS_OK);
        commit(tx);
        assert_int_equal(granted, want_granted[i]);
        assert_int_equal(reserved, want_reserved[i]);
        total += granted;
        tx = begin(st, KMS_TX_READ);
        assert_int_equal(kms_store_version_get(tx, key, 77, &got), KMS_OK);
        commit(tx);
        assert_int_equal(got.reserved, reserved);
        assert_true(got.reserved <= got.bound);
    }
    assert_int_equal(total + 1, 10);

    /* a huge request is still capped */
    tx = begin(st, KMS_TX_WRITE);
    version_row(&v, key, 78, 2, root);
    v.bound = 1000;
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_OK);
    assert_int_equal(kms_store_reserve(tx, key, 78, UINT64_C(1) << 40, &granted, &reserved),
                     KMS_OK);
    assert_int_equal(granted, 1000);
    assert_int_equal(reserved, 1000);
    /* a version that is not there */
    assert_int_equal(kms_store_reserve(tx, key, 79, 1, &granted, &reserved), KMS_ERR_NOT_FOUND);
    commit(tx);
}

/* ---- aliases ------------------------------------------------------------------- */

struct seen_aliases {
    char names[8][KMS_STORE_ALIAS_MAX + 1];
    size_t n;
};

static kms_err note_alias(void *arg, const struct kms_alias_row *r)
{
    struct seen_aliases *s = arg;
    assert_true(s->n < 8);
    snprintf(s->names[s->n++], sizeof s->names[0], "%s", r->name);
    return KMS_OK;
}

static void note_deleted(void *arg, const char *name)
{
    struct seen_aliases *s = arg;
    assert_true(s->n < 8);
    snprintf(s->names[s->n++], sizeof s->names[0], "%s", name);
}

static void alias_row(struct kms_alias_row *a, const char *name, const uint8_t target[16],
                      int64_t at)
{
    memset(a, 0, sizeof *a);
    snprintf(a->name, sizeof a->name, "%s", name);
    memcpy(a->target, target, KMS_UUID_LEN);
    a->created = a->updated = at;
}

static void test_aliases(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    uint8_t k1[KMS_UUID_LEN], k2[KMS_UUID_LEN];
    struct kms_alias_row a, got;
    struct seen_aliases s = {0};

    insert_key(st, 1, KMS_STORE_ENABLED);
    insert_key(st, 2, KMS_STORE_ENABLED);
    id_of(k1, 1);
    id_of(k2, 2);

    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    alias_row(&a, "alias/b", k1, 100);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_OK);
    alias_row(&a, "alias/a", k2, 101);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_OK);
    alias_row(&a, "alias/c", k1, 102);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_OK);
    alias_row(&a, "alias/d", k2, 103);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_OK);
    /* the name is taken, whatever the target */
    alias_row(&a, "alias/b", k2, 104);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_ERR_ALREADY_EXISTS);
    commit(tx);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_alias_get(tx, "alias/b", &got), KMS_OK);
    assert_string_equal(got.name, "alias/b");
    assert_memory_equal(got.target, k1, KMS_UUID_LEN);
    assert_int_equal(got.created, 100);
    assert_int_equal(got.updated, 100);
    assert_int_equal(kms_store_alias_get(tx, "alias/none", &got), KMS_ERR_NOT_FOUND);
    /* names are case-sensitive */
    assert_int_equal(kms_store_alias_get(tx, "alias/B", &got), KMS_ERR_NOT_FOUND);

    assert_int_equal(kms_store_aliases_list(tx, NULL, NULL, 100, note_alias, &s), KMS_OK);
    assert_int_equal(s.n, 4);
    assert_string_equal(s.names[0], "alias/a");
    assert_string_equal(s.names[1], "alias/b");
    assert_string_equal(s.names[2], "alias/c");
    assert_string_equal(s.names[3], "alias/d");
    memset(&s, 0, sizeof s);
    assert_int_equal(kms_store_aliases_list(tx, NULL, k1, 100, note_alias, &s), KMS_OK);
    assert_int_equal(s.n, 2);
    assert_string_equal(s.names[0], "alias/b");
    assert_string_equal(s.names[1], "alias/c");
    memset(&s, 0, sizeof s);
    /* from is inclusive; limit and key filter together */
    assert_int_equal(kms_store_aliases_list(tx, "alias/b", k2, 1, note_alias, &s), KMS_OK);
    assert_int_equal(s.n, 1);
    assert_string_equal(s.names[0], "alias/d");
    memset(&s, 0, sizeof s);
    assert_int_equal(kms_store_aliases_list(tx, "alias/b", NULL, 2, note_alias, &s), KMS_OK);
    assert_int_equal(s.n, 2);
    assert_string_equal(s.names[0], "alias/b");
    assert_string_equal(s.names[1], "alias/c");
    commit(tx);

    tx = begin(st, KMS_TX_WRITE);
    alias_row(&a, "alias/b", k2, 200);
    a.created = 1; /* update keeps the creation date */
    assert_int_equal(kms_store_alias_update(tx, &a), KMS_OK);
    assert_int_equal(kms_store_alias_get(tx, "alias/b", &got), KMS_OK);
    assert_memory_equal(got.target, k2, KMS_UUID_LEN);
    assert_int_equal(got.created, 100);
    assert_int_equal(got.updated, 200);
    alias_row(&a, "alias/missing", k2, 200);
    assert_int_equal(kms_store_alias_update(tx, &a), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_alias_delete(tx, "alias/missing"), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_alias_delete(tx, "alias/a"), KMS_OK);
    assert_int_equal(kms_store_alias_delete(tx, "alias/a"), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_alias_get(tx, "alias/a", &got), KMS_ERR_NOT_FOUND);
    commit(tx);

    /* a key's aliases go together; fn hears each name first */
    memset(&s, 0, sizeof s);
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_aliases_of_key_delete(tx, k2, note_deleted, &s), KMS_OK);
    assert_int_equal(s.n, 2);
    assert_string_equal(s.names[0], "alias/b");
    assert_string_equal(s.names[1], "alias/d");
    /* again: nothing left, nothing heard */
    memset(&s, 0, sizeof s);
    assert_int_equal(kms_store_aliases_of_key_delete(tx, k2, note_deleted, &s), KMS_OK);
    assert_int_equal(s.n, 0);
    assert_int_equal(kms_store_aliases_of_key_delete(tx, k2, NULL, NULL), KMS_OK);
    commit(tx);

    memset(&s, 0, sizeof s);
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_aliases_list(tx, NULL, NULL, 100, note_alias, &s), KMS_OK);
    assert_int_equal(s.n, 1);
    assert_string_equal(s.names[0], "alias/c");
    commit(tx);
}

/* ---- grants -------------------------------------------------------------------- */

struct seen_grants {
    char ids[16][KMS_GRANT_ID_LEN + 1];
    uint8_t keys[16][KMS_UUID_LEN];
    size_t n;
};

static kms_err note_grant(void *arg, const struct kms_grant_row *r)
{
    struct seen_grants *s = arg;
    assert_true(s->n < 16);
    memcpy(s->keys[s->n], r->key_id, KMS_UUID_LEN);
    snprintf(s->ids[s->n++], sizeof s->ids[0], "%s", r->grant_id);
    return KMS_OK;
}

/* Grant id c repeated 64 times ("aaaa..."), so the order of ids is the order of c. */
static void grant_row(struct kms_grant_row *g, const uint8_t key[16], char c, const char *name,
                      const char *grantee, const char *retiring)
{
    memset(g, 0, sizeof *g);
    memcpy(g->key_id, key, KMS_UUID_LEN);
    memset(g->grant_id, c, KMS_GRANT_ID_LEN);
    snprintf(g->name, sizeof g->name, "%s", name);
    snprintf(g->grantee, sizeof g->grantee, "%s", grantee);
    snprintf(g->retiring, sizeof g->retiring, "%s", retiring);
    g->operations = 0x11;
    snprintf(g->issuer, sizeof g->issuer, "arn:aws:iam::111122223333:user/admin");
    g->created = 1000 + c;
}

static void test_grants(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    uint8_t k1[KMS_UUID_LEN], k2[KMS_UUID_LEN];
    struct kms_grant_row g, got;
    struct seen_grants s = {0};
    size_t n = 99;
    const char *alice = "arn:aws:iam::111122223333:user/alice";
    const char *bob = "arn:aws:iam::111122223333:user/bob";

    insert_key(st, 1, KMS_STORE_ENABLED);
    insert_key(st, 2, KMS_STORE_ENABLED);
    id_of(k1, 1);
    id_of(k2, 2);

    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    grant_row(&g, k1, 'c', "", alice, bob);
    snprintf(g.constraints, sizeof g.constraints, "{\"EncryptionContextSubset\":{\"a\":\"1\"}}");
    assert_int_equal(kms_store_grant_insert(tx, &g), KMS_OK);
    grant_row(&g, k1, 'a', "retry", bob, "");
    assert_int_equal(kms_store_grant_insert(tx, &g), KMS_OK);
    grant_row(&g, k1, 'b', "retry", alice, "");
    assert_int_equal(kms_store_grant_insert(tx, &g), KMS_OK);
    grant_row(&g, k2, 'd', "retry", alice, bob);
    assert_int_equal(kms_store_grant_insert(tx, &g), KMS_OK);
    /* a grant id is unique across keys */
    grant_row(&g, k2, 'a', "", alice, "");
    assert_int_equal(kms_store_grant_insert(tx, &g), KMS_ERR_ALREADY_EXISTS);
    commit(tx);

    tx = begin(st, KMS_TX_READ);
    memset(g.grant_id, 'c', KMS_GRANT_ID_LEN);
    assert_int_equal(kms_store_grant_get(tx, g.grant_id, &got), KMS_OK);
    assert_memory_equal(got.key_id, k1, KMS_UUID_LEN);
    assert_string_equal(got.grant_id, g.grant_id);
    assert_string_equal(got.name, "");
    assert_string_equal(got.grantee, alice);
    assert_string_equal(got.retiring, bob);
    assert_int_equal(got.operations, 0x11);
    assert_string_equal(got.constraints, "{\"EncryptionContextSubset\":{\"a\":\"1\"}}");
    assert_string_equal(got.issuer, "arn:aws:iam::111122223333:user/admin");
    assert_int_equal(got.created, 1000 + 'c');
    memset(g.grant_id, 'e', KMS_GRANT_ID_LEN);
    assert_int_equal(kms_store_grant_get(tx, g.grant_id, &got), KMS_ERR_NOT_FOUND);

    /* a key's grants in id order; from is inclusive; limit */
    assert_int_equal(kms_store_grants_list(tx, k1, NULL, 100, note_grant, &s), KMS_OK);
    assert_int_equal(s.n, 3);
    assert_int_equal(s.ids[0][0], 'a');
    assert_int_equal(s.ids[1][0], 'b');
    assert_int_equal(s.ids[2][0], 'c');
    memset(&s, 0, sizeof s);
    memset(g.grant_id, 'b', KMS_GRANT_ID_LEN);
    assert_int_equal(kms_store_grants_list(tx, k1, g.grant_id, 1, note_grant, &s), KMS_OK);
    assert_int_equal(s.n, 1);
    assert_int_equal(s.ids[0][0], 'b');
    assert_int_equal(kms_store_grant_count(tx, k1, &n), KMS_OK);
    assert_int_equal(n, 3);
    assert_int_equal(kms_store_grant_count(tx, k2, &n), KMS_OK);
    assert_int_equal(n, 1);

    /* retirable by bob: across keys, in id order */
    memset(&s, 0, sizeof s);
    assert_int_equal(kms_store_grants_retirable(tx, bob, NULL, 100, note_grant, &s), KMS_OK);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.ids[0][0], 'c');
    assert_memory_equal(s.keys[0], k1, KMS_UUID_LEN);
    assert_int_equal(s.ids[1][0], 'd');
    assert_memory_equal(s.keys[1], k2, KMS_UUID_LEN);
    memset(&s, 0, sizeof s);
    memset(g.grant_id, 'd', KMS_GRANT_ID_LEN);
    assert_int_equal(kms_store_grants_retirable(tx, bob, g.grant_id, 100, note_grant, &s), KMS_OK);
    assert_int_equal(s.n, 1);
    assert_int_equal(s.ids[0][0], 'd');
    memset(&s, 0, sizeof s);
    assert_int_equal(kms_store_grants_retirable(tx, alice, NULL, 100, note_grant, &s), KMS_OK);
    assert_int_equal(s.n, 0);

    /* by name, of one key only */
    memset(&s, 0, sizeof s);
    assert_int_equal(kms_store_grants_named(tx, k1, "retry", note_grant, &s), KMS_OK);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.ids[0][0], 'a');
    assert_int_equal(s.ids[1][0], 'b');
    memset(&s, 0, sizeof s);
    assert_int_equal(kms_store_grants_named(tx, k1, "Retry", note_grant, &s), KMS_OK);
    assert_int_equal(s.n, 0);
    commit(tx);

    /* delete one: only of its own key */
    tx = begin(st, KMS_TX_WRITE);
    memset(g.grant_id, 'd', KMS_GRANT_ID_LEN);
    assert_int_equal(kms_store_grant_delete(tx, k1, g.grant_id), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_grant_delete(tx, k2, g.grant_id), KMS_OK);
    assert_int_equal(kms_store_grant_delete(tx, k2, g.grant_id), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_grant_get(tx, g.grant_id, &got), KMS_ERR_NOT_FOUND);
    /* and every grant of a key */
    assert_int_equal(kms_store_grants_delete(tx, k1), KMS_OK);
    assert_int_equal(kms_store_grant_count(tx, k1, &n), KMS_OK);
    assert_int_equal(n, 0);
    assert_int_equal(kms_store_grants_delete(tx, k1), KMS_OK);
    commit(tx);

    /* a grant of a key that is not there is a fault, not "already exists" */
    uint8_t k9[KMS_UUID_LEN];
    id_of(k9, 9);
    tx = begin(st, KMS_TX_WRITE);
    grant_row(&g, k9, 'f', "", alice, "");
    assert_int_equal(kms_store_grant_insert(tx, &g), KMS_ERR_INTERNAL);
    kms_store_rollback(tx);
}

/* Paging walks every grant of a key once, whatever the page size. */
static kms_err note_last(void *arg, const struct kms_grant_row *r)
{
    struct seen_grants *s = arg;
    snprintf(s->ids[0], sizeof s->ids[0], "%s", r->grant_id);
    s->n++;
    return KMS_OK;
}

static void test_grants_paging(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    uint8_t k1[KMS_UUID_LEN];
    struct kms_grant_row g;
    char from[KMS_GRANT_ID_LEN + 1] = "";
    size_t total = 0;

    insert_key(st, 1, KMS_STORE_ENABLED);
    id_of(k1, 1);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    for (int i = 0; i < 250; i++) {
        grant_row(&g, k1, 'a', "", "arn:aws:iam::111122223333:user/alice", "");
        snprintf(g.grant_id, sizeof g.grant_id, "%064x", i * 7919);
        assert_int_equal(kms_store_grant_insert(tx, &g), KMS_OK);
    }
    commit(tx);
    for (int page = 0; page < 10; page++) {
        struct seen_grants s = {0};
        tx = begin(st, KMS_TX_READ);
        /* one more than a page: the last is the next page's first */
        assert_int_equal(kms_store_grants_list(tx, k1, from[0] ? from : NULL, 101, note_last, &s),
                         KMS_OK);
        commit(tx);
        total += s.n == 101 ? 100 : s.n;
        if (s.n < 101)
            break;
        memcpy(from, s.ids[0], sizeof from);
    }
    assert_int_equal(total, 250);
}

/*
 * Constraints other than uniqueness are faults, not "already exists" (store.h:
 * KMS_ERR_ALREADY_EXISTS for a unique constraint, KMS_ERR_INTERNAL for every
 * other fault): a version of a key that is not there, under a root that is not
 * there, reserved past its bound; an alias to a key that is not there.
 */
static void test_other_constraints_are_faults(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    uint8_t key[KMS_UUID_LEN], nokey[KMS_UUID_LEN];
    struct kms_version_row v;
    struct kms_alias_row a;

    uint32_t root = insert_root(st, 0x44);
    insert_key(st, 1, KMS_STORE_ENABLED);
    id_of(key, 1);
    id_of(nokey, 9);
    /* one transaction each: after such a fault PostgreSQL's can only be rolled back */
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    version_row(&v, nokey, 1, 1, root);
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_ERR_INTERNAL);
    kms_store_rollback(tx);
    tx = begin(st, KMS_TX_WRITE);
    version_row(&v, key, 0x99, 1, root + 100);
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_ERR_INTERNAL);
    kms_store_rollback(tx);
    tx = begin(st, KMS_TX_WRITE);
    version_row(&v, key, 0x98, 1, root);
    v.reserved = v.bound + 1;
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_ERR_INTERNAL);
    kms_store_rollback(tx);
    tx = begin(st, KMS_TX_WRITE);
    alias_row(&a, "alias/dangling", nokey, 105);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_ERR_INTERNAL);
    kms_store_rollback(tx);
    /* nothing of them stayed */
    size_t keys = 0, versions = 9;
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_key_count(tx, &keys, &versions), KMS_OK);
    assert_int_equal(kms_store_alias_get(tx, "alias/dangling", &a), KMS_ERR_NOT_FOUND);
    commit(tx);
    assert_int_equal(keys, 1);
    assert_int_equal(versions, 0);
}

/* ---- root keys, settings ------------------------------------------------------- */

struct seen_roots {
    struct kms_root_row rows[4];
    size_t n;
};

static kms_err note_root(void *arg, const struct kms_root_row *r)
{
    struct seen_roots *s = arg;
    assert_true(s->n < 4);
    s->rows[s->n++] = *r;
    return KMS_OK;
}

static void test_roots_and_meta(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct seen_roots s = {0};
    char value[64];

    struct kms_tx *tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_roots(tx, note_root, &s), KMS_OK);
    assert_int_equal(s.n, 0);
    assert_int_equal(kms_store_meta_get(tx, "migrated", value, sizeof value), KMS_ERR_NOT_FOUND);
    commit(tx);

    uint32_t a = insert_root(st, 0xa1);
    uint32_t b = insert_root(st, 0xb2);
    assert_true(b > a);

    /* the same CKA_ID twice is refused */
    struct kms_root_row dup = {0};
    memset(dup.cka_id, 0xa1, sizeof dup.cka_id);
    snprintf(dup.label, sizeof dup.label, "dup");
    dup.state = KMS_ROOT_RETIRED;
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_root_insert(tx, &dup), KMS_ERR_ALREADY_EXISTS);
    commit(tx);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_roots(tx, note_root, &s), KMS_OK);
    commit(tx);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.rows[0].id, a);
    assert_int_equal(s.rows[1].id, b);
    uint8_t want[KMS_ROOT_ID_LEN];
    memset(want, 0xb2, sizeof want);
    assert_memory_equal(s.rows[1].cka_id, want, KMS_ROOT_ID_LEN);
    assert_string_equal(s.rows[1].label, "p11kms-root:1700000178");
    assert_int_equal(s.rows[1].created, 1700000000 + 0xb2);
    assert_int_equal(s.rows[1].state, KMS_ROOT_CURRENT);

    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_meta_set(tx, "migrated", "v1 2024-05-01"), KMS_OK);
    assert_int_equal(kms_store_meta_set(tx, "other", ""), KMS_OK);
    commit(tx);
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_meta_get(tx, "migrated", value, sizeof value), KMS_OK);
    assert_string_equal(value, "v1 2024-05-01");
    assert_int_equal(kms_store_meta_get(tx, "other", value, sizeof value), KMS_OK);
    assert_string_equal(value, "");
    /* set again replaces */
    assert_int_equal(kms_store_meta_set(tx, "migrated", "again"), KMS_OK);
    assert_int_equal(kms_store_meta_get(tx, "migrated", value, sizeof value), KMS_OK);
    assert_string_equal(value, "again");
    /* a short buffer gets a terminated prefix */
    char small[4];
    assert_int_equal(kms_store_meta_get(tx, "migrated", small, sizeof small), KMS_OK);
    assert_string_equal(small, "aga");
    commit(tx);
}

/* ---- the audit log's records -------------------------------------------------- */

static struct kms_audit_head_row head_row(const char *node, const char *log, uint64_t seq)
{
    struct kms_audit_head_row h;
    memset(&h, 0, sizeof h);
    snprintf(h.node, sizeof h.node, "%s", node);
    snprintf(h.log, sizeof h.log, "%s", log);
    h.seq = seq;
    memset(h.hash, 'a', 64);
    memset(h.key, 'b', 32);
    memset(h.mac, 'c', 64);
    h.updated = 1700000000 + (int64_t)seq;
    return h;
}

static void test_audit_records(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct kms_audit_head_row got;
    int found = -1;

    /* a change's request id: once, and found only once committed */
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_change_request(tx, "req-1"), KMS_OK);
    assert_int_equal(kms_store_change_request(tx, "req-1"), KMS_ERR_ALREADY_EXISTS);
    /* the refusal leaves the transaction usable */
    assert_int_equal(kms_store_change_request(tx, "req-2"), KMS_OK);
    commit(tx);
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_change_request(tx, "req-3"), KMS_OK);
    kms_store_rollback(tx);
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_change_request_find(tx, "req-1", &found), KMS_OK);
    assert_int_equal(found, 1);
    assert_int_equal(kms_store_change_request_find(tx, "req-2", &found), KMS_OK);
    assert_int_equal(found, 1);
    assert_int_equal(kms_store_change_request_find(tx, "req-3", &found), KMS_OK);
    assert_int_equal(found, 0);
    assert_int_equal(kms_store_change_request_find(tx, "", &found), KMS_OK);
    assert_int_equal(found, 0);
    commit(tx);
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_change_request(tx, ""), KMS_ERR_INTERNAL);
    kms_store_rollback(tx);
    kms_err_clear();

    /* one head per node, replaced in place */
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_audit_head_get(tx, "host:/a.log", &got), KMS_ERR_NOT_FOUND);
    struct kms_audit_head_row a = head_row("host:/a.log", "0123456789abcdef0123456789abcdef", 7);
    struct kms_audit_head_row b = head_row("host:/b.log", "fedcba9876543210fedcba9876543210", 9);
    assert_int_equal(kms_store_audit_head_put(tx, &a), KMS_OK);
    assert_int_equal(kms_store_audit_head_put(tx, &b), KMS_OK);
    commit(tx);
    a.seq = 1000000000000ull;
    a.mac[0] = 'd';
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_audit_head_put(tx, &a), KMS_OK);
    commit(tx);
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_audit_head_get(tx, "host:/a.log", &got), KMS_OK);
    assert_memory_equal(&got, &a, sizeof got);
    assert_int_equal(kms_store_audit_head_get(tx, "host:/b.log", &got), KMS_OK);
    assert_memory_equal(&got, &b, sizeof got);
    commit(tx);
}

/* A database of schema 1 (before the audit log's tables) is migrated, its rows kept. */
static void test_migrate_schema_1(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    uint32_t root = insert_root(st, 0x11);
    kms_store_close(st);
    f->st = NULL;
    /* schema 1: without migration 2's tables, migration 3's columns and 4's tables */
    if (f->pg) {
        pg_exec(f->url,
                "DROP TABLE change_requests, audit_heads, grants, tags; "
                "ALTER TABLE keys DROP COLUMN key_spec, DROP COLUMN key_usage; "
                "ALTER TABLE versions DROP COLUMN public_key",
                NULL, 0);
    } else {
        raw_exec(f->db, "DROP TABLE change_requests; DROP TABLE audit_heads; "
                        "DROP TABLE grants; DROP TABLE tags; "
                        "ALTER TABLE keys DROP COLUMN key_spec; "
                        "ALTER TABLE keys DROP COLUMN key_usage; "
                        "ALTER TABLE versions DROP COLUMN public_key");
    }
    set_schema_version(f, 1);
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &st), KMS_ERR_INTERNAL);
    kms_err_clear();
    /* One line for the whole migration, naming both versions. */
    char logged[2048], want[800];
    assert_int_equal(open_logged(f, KMS_STORE_INIT, &f->st, logged, sizeof logged), KMS_OK);
    snprintf(want, sizeof want, "database %s: schema migrated from version 1 to %d\n", f->name,
             kms_store_schema_version());
    assert_int_equal(occurrences(logged, "schema"), 1);
    assert_int_equal(occurrences(logged, want), 1);
    int version = 0;
    assert_int_equal(kms_store_database_version(f->st, &version), KMS_OK);
    assert_int_equal(version, kms_store_schema_version());
    struct seen_roots s = {0};
    struct kms_tx *tx = begin(f->st, KMS_TX_WRITE);
    assert_int_equal(kms_store_roots(tx, note_root, &s), KMS_OK);
    assert_int_equal(s.n, 1);
    assert_int_equal(s.rows[0].id, root);
    assert_int_equal(kms_store_change_request(tx, "after-migration"), KMS_OK);
    /* migration 3's columns: a key row keeps its spec and usage */
    struct kms_key_row k, got = {0};
    key_row(&k, 5, "after migration 3", NULL);
    k.spec = 12;
    k.usage = 2;
    assert_int_equal(kms_store_key_insert(tx, &k), KMS_OK);
    assert_int_equal(kms_store_key_get(tx, k.id, &got), KMS_OK);
    assert_key_equal(&got, &k);
    kms_key_row_clear(&got);
    kms_key_row_clear(&k);
    commit(tx);
}

/* ---- the change sequence ------------------------------------------------------- */

struct seen_changes {
    int64_t seq[8];
    int kind[8];
    char name[8][32];
    int has_id[8];
    uint8_t id0[8];
    size_t n;
};

static kms_err note_change(void *arg, const struct kms_change *c)
{
    struct seen_changes *s = arg;
    assert_true(s->n < 8);
    s->seq[s->n] = c->seq;
    s->kind[s->n] = c->kind;
    snprintf(s->name[s->n], sizeof s->name[0], "%s", c->name ? c->name : "(null)");
    s->has_id[s->n] = c->id != NULL;
    s->id0[s->n] = c->id ? c->id[0] : 0;
    s->n++;
    return KMS_OK;
}

static void read_changes(struct kms_store *st, int64_t after, size_t limit, struct seen_changes *s,
                         int64_t *head, int64_t *tail)
{
    memset(s, 0, sizeof *s);
    struct kms_tx *tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_changes(tx, after, limit, note_change, s), KMS_OK);
    assert_int_equal(kms_store_change_head(tx, head), KMS_OK);
    assert_int_equal(kms_store_change_tail(tx, tail), KMS_OK);
    commit(tx);
}

static void test_change_sequence(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct seen_changes s;
    uint8_t k1[KMS_UUID_LEN], k2[KMS_UUID_LEN];
    int64_t head = -1, tail = -1;

    id_of(k1, 1);
    id_of(k2, 2);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_KEY, k1, NULL), KMS_OK);
    assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_ALIAS, NULL, "alias/x"), KMS_OK);
    assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_ROOT, NULL, NULL), KMS_OK);
    assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_KEY, k2, NULL), KMS_OK);
    assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_ALIAS, NULL, "alias/y"), KMS_OK);
    commit(tx);
    /* a rolled-back change is not in the sequence */
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_KEY, k1, NULL), KMS_OK);
    kms_store_rollback(tx);

    read_changes(st, 0, 100, &s, &head, &tail);
    assert_int_equal(s.n, 5);
    assert_int_equal(head, 5);
    assert_int_equal(tail, 1);
    for (size_t i = 0; i < 5; i++)
        assert_int_equal(s.seq[i], (int64_t)i + 1);
    assert_int_equal(s.kind[0], KMS_CHANGE_KEY);
    assert_true(s.has_id[0]);
    assert_int_equal(s.id0[0], 1);
    assert_string_equal(s.name[0], "(null)");
    assert_int_equal(s.kind[1], KMS_CHANGE_ALIAS);
    assert_false(s.has_id[1]);
    assert_string_equal(s.name[1], "alias/x");
    assert_int_equal(s.kind[2], KMS_CHANGE_ROOT);
    assert_false(s.has_id[2]);
    assert_string_equal(s.name[2], "(null)");
    assert_int_equal(s.id0[3], 2);

    read_changes(st, 2, 2, &s, &head, &tail);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.seq[0], 3);
    assert_int_equal(s.seq[1], 4);
    read_changes(st, 5, 100, &s, &head, &tail);
    assert_int_equal(s.n, 0);

    /* pruning before the epoch removes nothing */
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_changes_prune(tx, 0), KMS_OK);
    commit(tx);
    read_changes(st, 0, 100, &s, &head, &tail);
    assert_int_equal(s.n, 5);

    /* pruning everything keeps the last change, so the head never goes back */
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_changes_prune(tx, (int64_t)time(NULL) + 3600), KMS_OK);
    commit(tx);
    read_changes(st, 0, 100, &s, &head, &tail);
    assert_int_equal(s.n, 1);
    assert_int_equal(s.seq[0], 5);
    assert_int_equal(head, 5);
    assert_int_equal(tail, 5);

    /* sequence numbers are never reused after a prune */
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_KEY, k1, NULL), KMS_OK);
    commit(tx);
    read_changes(st, 5, 100, &s, &head, &tail);
    assert_int_equal(s.n, 1);
    assert_true(s.seq[0] > 5);
    assert_int_equal(head, s.seq[0]);
}

/* ---- transactions -------------------------------------------------------------- */

static void test_rollback_undoes(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct kms_key_row r, got = {0};
    struct kms_alias_row a;
    char value[16];

    key_row(&r, 1, "rolled back", NULL);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_insert(tx, &r), KMS_OK);
    alias_row(&a, "alias/gone", r.id, 1);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_OK);
    assert_int_equal(kms_store_meta_set(tx, "m", "v"), KMS_OK);
    /* visible inside the transaction */
    assert_int_equal(kms_store_key_get(tx, r.id, &got), KMS_OK);
    kms_key_row_clear(&got);
    kms_store_rollback(tx);
    /* a second rollback, or one of NULL, does nothing */
    kms_store_rollback(tx);
    kms_store_rollback(NULL);
    /* committing a finished transaction is refused */
    assert_int_equal(kms_store_commit(tx), KMS_ERR_INTERNAL);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_key_get(tx, r.id, &got), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_alias_get(tx, "alias/gone", &a), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_meta_get(tx, "m", value, sizeof value), KMS_ERR_NOT_FOUND);
    /* one transaction at a time per thread */
    struct kms_tx *second = tx;
    assert_int_equal(kms_store_begin(st, KMS_TX_READ, &second), KMS_ERR_INTERNAL);
    /* a failed begin leaves no handle: kms_store_rollback(second) is then a no-op */
    assert_null(second);
    commit(tx);
    kms_key_row_clear(&r);
}

struct reader {
    struct kms_store *st;
    uint8_t id[KMS_UUID_LEN];
    kms_err got;
    char description[32];
};

static void *read_key(void *arg)
{
    struct reader *rd = arg;
    struct kms_key_row r = {0};
    struct kms_tx *tx = NULL;
    rd->got = kms_store_begin(rd->st, KMS_TX_READ, &tx);
    if (rd->got == KMS_OK) {
        rd->got = kms_store_key_get(tx, rd->id, &r);
        if (rd->got == KMS_OK)
            snprintf(rd->description, sizeof rd->description, "%s", r.description);
        kms_err c = kms_store_commit(tx);
        if (rd->got == KMS_OK || rd->got == KMS_ERR_NOT_FOUND)
            rd->got = c != KMS_OK ? c : rd->got;
    }
    kms_key_row_clear(&r);
    return NULL;
}

static kms_err read_in_thread(struct kms_store *st, const uint8_t id[KMS_UUID_LEN], char *desc)
{
    pthread_t t;
    struct reader rd = {.st = st, .got = KMS_ERR_COUNT};
    memcpy(rd.id, id, KMS_UUID_LEN);
    assert_int_equal(pthread_create(&t, NULL, read_key, &rd), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    if (desc)
        snprintf(desc, 32, "%s", rd.description);
    return rd.got;
}

static void test_other_thread_sees_committed_only(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct kms_key_row r;
    char desc[32];

    key_row(&r, 1, "v1", NULL);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_insert(tx, &r), KMS_OK);
    /* open, not committed: the other connection does not see it (nor waits for it) */
    assert_int_equal(read_in_thread(st, r.id, NULL), KMS_ERR_NOT_FOUND);
    commit(tx);
    assert_int_equal(read_in_thread(st, r.id, desc), KMS_OK);
    assert_string_equal(desc, "v1");

    /* an uncommitted update is not seen either; the committed one is */
    tx = begin(st, KMS_TX_WRITE);
    free(r.description);
    r.description = strdup("v2");
    assert_int_equal(kms_store_key_update(tx, &r), KMS_OK);
    assert_int_equal(read_in_thread(st, r.id, desc), KMS_OK);
    assert_string_equal(desc, "v1");
    commit(tx);
    assert_int_equal(read_in_thread(st, r.id, desc), KMS_OK);
    assert_string_equal(desc, "v2");
    kms_key_row_clear(&r);
}

#define WRITES_PER_THREAD 40

struct writer {
    struct kms_store *st;
    uint8_t first;
    pthread_barrier_t *go;
    int ok;
    char failure[128];
};

static void *write_keys(void *arg)
{
    struct writer *w = arg;
    pthread_barrier_wait(w->go);
    for (int i = 0; i < WRITES_PER_THREAD; i++) {
        struct kms_key_row r;
        struct kms_tx *tx = NULL;
        key_row(&r, w->first, "concurrent", NULL);
        r.id[1] = (uint8_t)i;
        kms_err rc = kms_store_begin(w->st, KMS_TX_WRITE, &tx);
        if (rc == KMS_OK) {
            rc = kms_store_key_insert(tx, &r);
            if (rc == KMS_OK)
                rc = kms_store_note_change(tx, KMS_CHANGE_KEY, r.id, NULL);
            if (rc == KMS_OK)
                rc = kms_store_commit(tx);
            kms_store_rollback(tx);
        }
        kms_key_row_clear(&r);
        if (rc != KMS_OK) {
            snprintf(w->failure, sizeof w->failure, "write %d: %s %s", i, kms_err_type(rc),
                     kms_err_message());
            return NULL;
        }
        w->ok++;
    }
    return NULL;
}

static void test_concurrent_writers(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    pthread_barrier_t go;
    pthread_t t[2];
    struct writer w[2] = {{.st = st, .first = 0x10, .go = &go},
                          {.st = st, .first = 0x20, .go = &go}};

    assert_int_equal(pthread_barrier_init(&go, NULL, 2), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&t[i], NULL, write_keys, &w[i]), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);
    pthread_barrier_destroy(&go);
    for (int i = 0; i < 2; i++) {
        if (w[i].failure[0])
            fail_msg("writer %d: %s", i, w[i].failure);
        assert_int_equal(w[i].ok, WRITES_PER_THREAD);
    }
    size_t keys = 0;
    int64_t head = 0;
    struct kms_tx *tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_key_count(tx, &keys, NULL), KMS_OK);
    assert_int_equal(kms_store_change_head(tx, &head), KMS_OK);
    commit(tx);
    assert_int_equal(keys, 2 * WRITES_PER_THREAD);
    assert_int_equal(head, 2 * WRITES_PER_THREAD);
}

static void test_write_lock_timeout(void **state)
{
    struct fixture *f = *state;
    sqlite3 *other = NULL;
    char *err = NULL;
    struct kms_tx *tx = NULL;

    init_store(f);
    kms_store_close(f->st);
    f->st = NULL;
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 200, &f->st), KMS_OK);

    assert_int_equal(sqlite3_open_v2(f->db, &other, SQLITE_OPEN_READWRITE, NULL), SQLITE_OK);
    assert_int_equal(sqlite3_exec(other, "BEGIN IMMEDIATE", NULL, NULL, &err), SQLITE_OK);
    kms_err_clear();
    assert_int_equal(kms_store_begin(f->st, KMS_TX_WRITE, &tx), KMS_ERR_DEPENDENCY_TIMEOUT);
    assert_contains(kms_err_message(), "did not answer in time");
    /* readers go on meanwhile (WAL) */
    tx = begin(f->st, KMS_TX_READ);
    size_t keys = 9;
    assert_int_equal(kms_store_key_count(tx, &keys, NULL), KMS_OK);
    assert_int_equal(keys, 0);
    commit(tx);
    /* once the lock goes, a writer gets in */
    assert_int_equal(sqlite3_exec(other, "ROLLBACK", NULL, NULL, &err), SQLITE_OK);
    assert_int_equal(sqlite3_close(other), SQLITE_OK);
    tx = begin(f->st, KMS_TX_WRITE);
    assert_int_equal(kms_store_meta_set(tx, "after", "lock"), KMS_OK);
    commit(tx);
}

/* ---- backup -------------------------------------------------------------------- */

static void test_backup(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct kms_store *copy = NULL;
    char path[256], url[300];
    struct kms_key_row got = {0};
    struct kms_version_row v, vgot;
    struct kms_alias_row a;
    struct seen_roots roots = {0};
    char value[32];

    uint32_t root = insert_root(st, 0x33);
    insert_key(st, 1, KMS_STORE_ENABLED);
    insert_key(st, 2, KMS_STORE_DESTROYED);
    uint8_t k1[KMS_UUID_LEN];
    id_of(k1, 1);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    version_row(&v, k1, 5, 1, root);
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_OK);
    alias_row(&a, "alias/backed-up", k1, 7);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_OK);
    assert_int_equal(kms_store_meta_set(tx, "mark", "yes"), KMS_OK);
    assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_KEY, k1, NULL), KMS_OK);
    commit(tx);

    snprintf(path, sizeof path, "%s/copy.db", f->dir);
    snprintf(url, sizeof url, "sqlite:%s", path);
    kms_err_clear();
    assert_int_equal(kms_store_backup(st, path), KMS_OK);
    /* the copy is one file, private */
    struct stat sb;
    char wal[300];
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 077, 0);
    snprintf(wal, sizeof wal, "%s-wal", path);
    assert_int_not_equal(access(wal, F_OK), 0);

    /* written after the backup: not in the copy */
    insert_key(st, 3, KMS_STORE_ENABLED);

    assert_int_equal(open_store(url, KMS_STORE_OPEN, 0, &copy), KMS_OK);
    tx = begin(copy, KMS_TX_READ);
    size_t keys = 0, versions = 0;
    int64_t head = 0;
    assert_int_equal(kms_store_key_count(tx, &keys, &versions), KMS_OK);
    assert_int_equal(keys, 1); /* 2 is destroyed, 3 came later */
    assert_int_equal(versions, 1);
    assert_int_equal(kms_store_key_get(tx, k1, &got), KMS_OK);
    assert_string_equal(got.description, "k");
    kms_key_row_clear(&got);
    uint8_t k2[KMS_UUID_LEN], k3[KMS_UUID_LEN];
    id_of(k2, 2);
    id_of(k3, 3);
    assert_int_equal(kms_store_key_get(tx, k2, &got), KMS_OK);
    assert_int_equal(got.state, KMS_STORE_DESTROYED);
    kms_key_row_clear(&got);
    assert_int_equal(kms_store_key_get(tx, k3, &got), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_version_get(tx, k1, 5, &vgot), KMS_OK);
    assert_int_equal(vgot.wrapped_len, 40);
    assert_memory_equal(vgot.wrapped, v.wrapped, 40);
    assert_int_equal(vgot.root, root);
    assert_int_equal(kms_store_alias_get(tx, "alias/backed-up", &a), KMS_OK);
    assert_memory_equal(a.target, k1, KMS_UUID_LEN);
    assert_int_equal(kms_store_roots(tx, note_root, &roots), KMS_OK);
    assert_int_equal(roots.n, 1);
    assert_int_equal(roots.rows[0].id, root);
    assert_int_equal(kms_store_meta_get(tx, "mark", value, sizeof value), KMS_OK);
    assert_string_equal(value, "yes");
    assert_int_equal(kms_store_change_head(tx, &head), KMS_OK);
    assert_int_equal(head, 1);
    commit(tx);
    kms_store_close(copy);

    /* an existing target is refused and left as it was */
    char existing[256];
    snprintf(existing, sizeof existing, "%s/existing", f->dir);
    write_bytes(existing, "keep me", 7);
    kms_err_clear();
    assert_int_equal(kms_store_backup(st, existing), KMS_ERR_VALIDATION);
    assert_contains(kms_err_message(), existing);
    assert_int_equal(stat(existing, &sb), 0);
    assert_int_equal(sb.st_size, 7);
    /* so is the copy made above */
    assert_int_equal(kms_store_backup(st, path), KMS_ERR_VALIDATION);
    /* and a folder that does not exist */
    snprintf(existing, sizeof existing, "%s/no/such/dir.db", f->dir);
    assert_int_equal(kms_store_backup(st, existing), KMS_ERR_INTERNAL);
    assert_contains(kms_err_message(), existing);
}

/* ---- PostgreSQL --------------------------------------------------------------- */

static void test_pg_name_hides_password(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = NULL;
    char url[800], want[800];

    init_store(f);
    assert_string_equal(kms_store_name(f->st), f->name);
    assert_lacks(kms_store_name(f->st), pg.password);

    /* a password parameter goes, the others stay in their order */
    snprintf(url, sizeof url,
             "postgresql://%s@%s:%s/%s?sslmode=disable&password=%s&application_name=kms", pg.user,
             pg.host, pg.port, f->db, pg.password);
    snprintf(want, sizeof want, "postgresql://%s@%s:%s/%s?sslmode=disable&application_name=kms",
             pg.user, pg.host, pg.port, f->db);
    assert_int_equal(open_store(url, KMS_STORE_OPEN, 0, &st), KMS_OK);
    assert_string_equal(kms_store_name(st), want);
    kms_store_close(st);

    /* libpq decodes a parameter's name too: pass%77ord is the password */
    snprintf(url, sizeof url, "postgresql://%s@%s:%s/%s?pass%%77ord=%s&sslmode=disable", pg.user,
             pg.host, pg.port, f->db, pg.password);
    snprintf(want, sizeof want, "postgresql://%s@%s:%s/%s?sslmode=disable", pg.user, pg.host,
             pg.port, f->db);
    assert_int_equal(open_store(url, KMS_STORE_OPEN, 0, &st), KMS_OK);
    assert_string_equal(kms_store_name(st), want);
    kms_store_close(st);

    /* the only parameter: no '?' left; postgres:// is the same engine */
    snprintf(url, sizeof url, "postgres://%s@%s:%s/%s?password=%s", pg.user, pg.host, pg.port,
             f->db, pg.password);
    snprintf(want, sizeof want, "postgres://%s@%s:%s/%s", pg.user, pg.host, pg.port, f->db);
    assert_int_equal(open_store(url, KMS_STORE_OPEN, 0, &st), KMS_OK);
    assert_string_equal(kms_store_name(st), want);
    kms_store_close(st);
}

static void test_pg_bad_url(void **state)
{
    struct kms_store *st = NULL;
    (void)state;
    /* libpq's words would quote the URL, password and all: ours do not */
    assert_int_equal(open_store("postgresql://kms:se%zzcret@127.0.0.1/kms", KMS_STORE_OPEN, 0, &st),
                     KMS_ERR_VALIDATION);
    assert_contains(kms_err_message(), "not a PostgreSQL connection URI");
    assert_lacks(kms_err_message(), "cret");
    assert_int_equal(
        open_store("postgresql://127.0.0.1/kms?no_such_option=1", KMS_STORE_OPEN, 0, &st),
        KMS_ERR_VALIDATION);
    assert_null(st);
}

static void test_pg_missing_database(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = NULL;
    char url[800], name[800];
    snprintf(url, sizeof url, "postgresql://%s:%s@%s:%s/%s_missing", pg.user, pg.password, pg.host,
             pg.port, f->db);
    snprintf(name, sizeof name, "postgresql://%s@%s:%s/%s_missing", pg.user, pg.host, pg.port,
             f->db);
    for (int mode = KMS_STORE_OPEN; mode <= KMS_STORE_INIT; mode++) {
        assert_int_equal(open_store(url, mode, 0, &st), KMS_ERR_DEPENDENCY_TIMEOUT);
        assert_null(st);
        assert_contains(kms_err_message(), name);
        assert_contains(kms_err_message(), "does not exist");
        assert_lacks(kms_err_message(), pg.password);
    }
}

static void test_pg_unreachable(void **state)
{
    struct kms_store *st = NULL;
    char url[640];
    struct timespec t0;
    (void)state;
    /* port 1 on loopback: nobody listens, the connection is refused at once */
    snprintf(url, sizeof url, "postgresql://%s:%s@127.0.0.1:1/kms", pg.user, pg.password);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(open_store(url, KMS_STORE_OPEN, 0, &st), KMS_ERR_DEPENDENCY_TIMEOUT);
    assert_true(elapsed_ms(&t0) < 5000);
    assert_null(st);
    assert_contains(kms_err_message(), "cannot connect to the database");
    assert_contains(kms_err_message(), "postgresql://");
    assert_lacks(kms_err_message(), pg.password);
}

/* A migration that fails leaves nothing behind: it is one transaction. */
static void test_pg_failed_migration(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = NULL;
    char value[32];
    pg_exec(f->url, "CREATE TABLE keys (someone_elses INTEGER)", NULL, 0);
    assert_int_equal(open_store(f->url, KMS_STORE_INIT, 0, &st), KMS_ERR_INTERNAL);
    assert_null(st);
    assert_contains(kms_err_message(), f->name);
    assert_contains(kms_err_message(), "already exists");
    /* the message names the database once */
    const char *first = strstr(kms_err_message(), f->name);
    assert_null(strstr(first + strlen(f->name), f->name));
    pg_exec(f->url,
            "SELECT (to_regclass('schema_version') IS NULL AND to_regclass('meta') IS NULL)::text",
            value, sizeof value);
    assert_string_equal(value, "true");
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &st), KMS_ERR_INTERNAL);
    assert_contains(kms_err_message(), "not initialised");
}

#define INITS 4

struct initer {
    const char *url;
    pthread_barrier_t *go;
    kms_err got;
    char failure[256];
};

static void *init_one(void *arg)
{
    struct initer *in = arg;
    struct kms_store *st = NULL;
    pthread_barrier_wait(in->go);
    in->got = open_store(in->url, KMS_STORE_INIT, 0, &st);
    if (in->got != KMS_OK)
        snprintf(in->failure, sizeof in->failure, "%s", kms_err_message());
    kms_store_close(st);
    return NULL;
}

/* Nodes initialising one database at once: the schema's lock makes one of them migrate. */
static void test_pg_concurrent_init(void **state)
{
    struct fixture *f = *state;
    pthread_barrier_t go;
    pthread_t t[INITS];
    struct initer in[INITS];
    char value[32], want[32];

    assert_int_equal(pthread_barrier_init(&go, NULL, INITS), 0);
    for (int i = 0; i < INITS; i++) {
        in[i] = (struct initer){.url = f->url, .go = &go, .got = KMS_ERR_COUNT};
        assert_int_equal(pthread_create(&t[i], NULL, init_one, &in[i]), 0);
    }
    for (int i = 0; i < INITS; i++)
        assert_int_equal(pthread_join(t[i], NULL), 0);
    pthread_barrier_destroy(&go);
    for (int i = 0; i < INITS; i++)
        if (in[i].got != KMS_OK)
            fail_msg("init %d: %s %s", i, kms_err_type(in[i].got), in[i].failure);
    pg_exec(f->url, "SELECT count(*)::text || ' ' || max(version)::text FROM schema_version", value,
            sizeof value);
    snprintf(want, sizeof want, "1 %d", kms_store_schema_version());
    assert_string_equal(value, want);
}

/* A transaction of its own on another thread, run step by step from the test's thread. */
struct racer {
    struct kms_store *st;
    struct kms_alias_row alias;
    uint8_t key[KMS_UUID_LEN];
    volatile int done;
    kms_err got;    /* the insert's (or the key read's) answer */
    kms_err after;  /* the next statement's, in the same transaction */
    kms_err commit; /* the commit's */
    int64_t rev;    /* the revision read */
    char desc[32];  /* the description read */
};

/* Inserts an alias, then another in the same transaction, then commits. */
static void *race_alias(void *arg)
{
    struct racer *r = arg;
    struct kms_tx *tx = NULL;
    struct kms_alias_row other = r->alias;
    r->got = kms_store_begin(r->st, KMS_TX_WRITE, &tx);
    if (r->got == KMS_OK) {
        r->got = kms_store_alias_insert(tx, &r->alias);
        snprintf(other.name, sizeof other.name, "%s-other", r->alias.name);
        r->after = kms_store_alias_insert(tx, &other);
        r->commit = kms_store_commit(tx);
        kms_store_rollback(tx);
    }
    r->done = 1;
    return NULL;
}

static void assert_still_waiting(const struct racer *r)
{
    struct timespec pause = {0, 300 * 1000000L};
    nanosleep(&pause, NULL);
    assert_int_equal(r->done, 0);
}

/* Two nodes create the same alias at once: one has it, the other AlreadyExists. */
static void test_pg_alias_race(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f), *node2 = NULL;
    struct kms_alias_row a, got;
    pthread_t t;
    uint8_t k1[KMS_UUID_LEN], k2[KMS_UUID_LEN];

    insert_key(st, 1, KMS_STORE_ENABLED);
    insert_key(st, 2, KMS_STORE_ENABLED);
    id_of(k1, 1);
    id_of(k2, 2);
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &node2), KMS_OK);

    /* the first commits: the second, which waited on it, finds the name taken */
    struct racer r = {.st = node2, .got = KMS_ERR_COUNT};
    alias_row(&r.alias, "alias/race", k2, 200);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    alias_row(&a, "alias/race", k1, 100);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_OK);
    assert_int_equal(pthread_create(&t, NULL, race_alias, &r), 0);
    assert_still_waiting(&r);
    commit(tx);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(r.got, KMS_ERR_ALREADY_EXISTS);
    /* and its transaction goes on, as after any refused insert */
    assert_int_equal(r.after, KMS_OK);
    assert_int_equal(r.commit, KMS_OK);
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_alias_get(tx, "alias/race", &got), KMS_OK);
    assert_memory_equal(got.target, k1, KMS_UUID_LEN);
    assert_int_equal(got.created, 100);
    assert_int_equal(kms_store_alias_get(tx, "alias/race-other", &got), KMS_OK);
    assert_memory_equal(got.target, k2, KMS_UUID_LEN);
    commit(tx);

    /* the first rolls back: the second gets the name */
    r = (struct racer){.st = node2, .got = KMS_ERR_COUNT};
    alias_row(&r.alias, "alias/race2", k2, 300);
    tx = begin(st, KMS_TX_WRITE);
    alias_row(&a, "alias/race2", k1, 100);
    assert_int_equal(kms_store_alias_insert(tx, &a), KMS_OK);
    assert_int_equal(pthread_create(&t, NULL, race_alias, &r), 0);
    assert_still_waiting(&r);
    kms_store_rollback(tx);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(r.got, KMS_OK);
    assert_int_equal(r.commit, KMS_OK);
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_alias_get(tx, "alias/race2", &got), KMS_OK);
    assert_memory_equal(got.target, k2, KMS_UUID_LEN);
    assert_int_equal(got.created, 300);
    commit(tx);
    kms_store_close(node2);
}

/* Reads a key in a write transaction, then writes it back with a new description. */
static void *change_key(void *arg)
{
    struct racer *r = arg;
    struct kms_tx *tx = NULL;
    struct kms_key_row k = {0};
    r->got = kms_store_begin(r->st, KMS_TX_WRITE, &tx);
    if (r->got == KMS_OK) {
        r->got = kms_store_key_get(tx, r->key, &k);
        if (r->got == KMS_OK) {
            r->rev = k.rev;
            snprintf(r->desc, sizeof r->desc, "%s", k.description);
            free(k.description);
            k.description = strdup("second");
            r->after = kms_store_key_update(tx, &k);
        }
        r->commit = kms_store_commit(tx);
        kms_store_rollback(tx);
    }
    kms_key_row_clear(&k);
    r->done = 1;
    return NULL;
}

/*
 * The isolation store_pg.c keeps (row locks): a write transaction's read of a
 * key another write transaction holds waits for it, then reads what it wrote.
 */
static void test_pg_write_waits_for_row_lock(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f), *node2 = NULL;
    struct kms_key_row k = {0};
    pthread_t t;

    insert_key(st, 1, KMS_STORE_ENABLED);
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &node2), KMS_OK);
    struct racer r = {.st = node2, .got = KMS_ERR_COUNT};
    id_of(r.key, 1);

    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_get(tx, r.key, &k), KMS_OK);
    assert_int_equal(k.rev, 1);
    free(k.description);
    k.description = strdup("first");
    assert_int_equal(kms_store_key_update(tx, &k), KMS_OK);
    assert_int_equal(pthread_create(&t, NULL, change_key, &r), 0);
    assert_still_waiting(&r);
    commit(tx);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(r.got, KMS_OK);
    assert_int_equal(r.rev, 2);
    assert_string_equal(r.desc, "first");
    assert_int_equal(r.after, KMS_OK);
    assert_int_equal(r.commit, KMS_OK);
    kms_key_row_clear(&k);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_key_get(tx, r.key, &k), KMS_OK);
    commit(tx);
    assert_int_equal(k.rev, 3);
    assert_string_equal(k.description, "second");
    kms_key_row_clear(&k);
    kms_store_close(node2);
}

/* Notes a change to key r->key[0] in a write transaction of its own and commits it. */
static void *note_in_thread(void *arg)
{
    struct racer *r = arg;
    struct kms_tx *tx = NULL;
    r->got = kms_store_begin(r->st, KMS_TX_WRITE, &tx);
    if (r->got == KMS_OK) {
        r->got = kms_store_note_change(tx, KMS_CHANGE_KEY, r->key, NULL);
        r->commit = kms_store_commit(tx);
        kms_store_rollback(tx);
    }
    r->done = 1;
    return NULL;
}

/*
 * Changes commit in seq order: a second writer of the change sequence waits
 * for the first's commit, so no reader ever sees seq N + 1 without N.
 */
static void test_pg_changes_commit_in_order(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f), *node2 = NULL;
    struct seen_changes s;
    int64_t head = -1, tail = -1;
    uint8_t k1[KMS_UUID_LEN];
    pthread_t t;

    id_of(k1, 1);
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &node2), KMS_OK);
    struct racer r = {.st = node2, .got = KMS_ERR_COUNT};
    id_of(r.key, 2);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_KEY, k1, NULL), KMS_OK);
    assert_int_equal(pthread_create(&t, NULL, note_in_thread, &r), 0);
    assert_still_waiting(&r);
    /* a reader meanwhile sees neither */
    char count[16];
    pg_exec(f->url, "SELECT count(*) FROM changes", count, sizeof count);
    assert_string_equal(count, "0");
    commit(tx);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(r.got, KMS_OK);
    assert_int_equal(r.commit, KMS_OK);
    read_changes(st, 0, 100, &s, &head, &tail);
    assert_int_equal(s.n, 2);
    assert_int_equal(s.seq[0], 1);
    assert_int_equal(s.id0[0], 1);
    assert_int_equal(s.seq[1], 2);
    assert_int_equal(s.id0[1], 2);
    assert_int_equal(head, 2);
    kms_store_close(node2);
}

struct roots_reader {
    struct kms_store *st;
    volatile int done;
    kms_err got;
    size_t seen;
};

static kms_err count_root(void *arg, const struct kms_root_row *r)
{
    (void)r;
    ((struct roots_reader *)arg)->seen++;
    return KMS_OK;
}

static void *read_roots_for_write(void *arg)
{
    struct roots_reader *rr = arg;
    struct kms_tx *tx = NULL;
    rr->got = kms_store_begin(rr->st, KMS_TX_WRITE, &tx);
    if (rr->got == KMS_OK) {
        rr->got = kms_store_roots(tx, count_root, rr);
        kms_store_rollback(tx);
    }
    rr->done = 1;
    return NULL;
}

/*
 * A write transaction that reads the root keys ("none yet: make one", as
 * p11kmsd init does) keeps other writers from reading them until it commits:
 * two inits make one root.
 */
static void test_pg_roots_read_for_write(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f), *node2 = NULL;
    struct seen_roots seen = {0};
    struct kms_root_row root = {0};
    pthread_t t;

    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &node2), KMS_OK);
    struct roots_reader rr = {.st = node2, .got = KMS_ERR_COUNT};
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_roots(tx, note_root, &seen), KMS_OK);
    assert_int_equal(seen.n, 0);
    assert_int_equal(pthread_create(&t, NULL, read_roots_for_write, &rr), 0);
    struct timespec pause = {0, 300 * 1000000L};
    nanosleep(&pause, NULL);
    assert_int_equal(rr.done, 0);
    memset(root.cka_id, 0x77, sizeof root.cka_id);
    snprintf(root.label, sizeof root.label, "p11kms-root:1");
    root.state = KMS_ROOT_CURRENT;
    assert_int_equal(kms_store_root_insert(tx, &root), KMS_OK);
    commit(tx);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_int_equal(rr.got, KMS_OK);
    assert_int_equal(rr.seen, 1);
    kms_store_close(node2);
}

#define RESERVERS 4
#define RESERVES 25

struct reserver {
    struct kms_store *st;
    pthread_barrier_t *go;
    uint64_t granted;
    char failure[160];
};

static void *reserve_many(void *arg)
{
    struct reserver *rs = arg;
    uint8_t key[KMS_UUID_LEN];
    id_of(key, 1);
    pthread_barrier_wait(rs->go);
    for (int i = 0; i < RESERVES; i++) {
        struct kms_tx *tx = NULL;
        uint64_t granted = 0, reserved = 0;
        kms_err rc = kms_store_begin(rs->st, KMS_TX_WRITE, &tx);
        if (rc == KMS_OK)
            rc = kms_store_reserve(tx, key, 77, 3, &granted, &reserved);
        if (rc == KMS_OK)
            rc = kms_store_commit(tx);
        kms_store_rollback(tx);
        if (rc != KMS_OK) {
            snprintf(rs->failure, sizeof rs->failure, "%s %s", kms_err_type(rc), kms_err_message());
            return NULL;
        }
        rs->granted += granted;
    }
    return NULL;
}

struct reserve_racer {
    struct kms_store *st;
    volatile int done;
    kms_err got;
    uint64_t granted, reserved;
};

static void *reserve_once(void *arg)
{
    struct reserve_racer *r = arg;
    struct kms_tx *tx = NULL;
    uint8_t key[KMS_UUID_LEN];
    id_of(key, 1);
    r->got = kms_store_begin(r->st, KMS_TX_WRITE, &tx);
    if (r->got == KMS_OK) {
        r->got = kms_store_reserve(tx, key, 77, 3, &r->granted, &r->reserved);
        if (r->got == KMS_OK)
            r->got = kms_store_commit(tx);
        kms_store_rollback(tx);
    }
    r->done = 1;
    return NULL;
}

/*
 * Reservations from several connections at once: what each was granted adds
 * up exactly (the GCM bound's uses are never granted twice).
 */
static void test_pg_concurrent_reserve(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct kms_version_row v, got;
    pthread_barrier_t go;
    pthread_t t[RESERVERS];
    struct reserver rs[RESERVERS];
    uint8_t key[KMS_UUID_LEN];
    uint64_t total = 0;

    uint32_t root = insert_root(st, 0x55);
    insert_key(st, 1, KMS_STORE_ENABLED);
    id_of(key, 1);
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    version_row(&v, key, 77, 1, root);
    v.bound = 1000000;
    assert_int_equal(kms_store_version_insert(tx, &v), KMS_OK);
    commit(tx);

    /* one reservation waits for the other's commit, then starts from its total */
    uint64_t granted = 0, reserved = 0;
    struct reserve_racer r = {.st = st, .got = KMS_ERR_COUNT};
    pthread_t other;
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_reserve(tx, key, 77, 3, &granted, &reserved), KMS_OK);
    assert_int_equal(pthread_create(&other, NULL, reserve_once, &r), 0);
    struct timespec pause = {0, 300 * 1000000L};
    nanosleep(&pause, NULL);
    assert_int_equal(r.done, 0);
    commit(tx);
    assert_int_equal(pthread_join(other, NULL), 0);
    assert_int_equal(granted, 3);
    assert_int_equal(reserved, 3);
    assert_int_equal(r.got, KMS_OK);
    assert_int_equal(r.granted, 3);
    assert_int_equal(r.reserved, 6);

    /* many at once */
    assert_int_equal(pthread_barrier_init(&go, NULL, RESERVERS), 0);
    for (int i = 0; i < RESERVERS; i++) {
        rs[i] = (struct reserver){.st = st, .go = &go};
        assert_int_equal(pthread_create(&t[i], NULL, reserve_many, &rs[i]), 0);
    }
    for (int i = 0; i < RESERVERS; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        if (rs[i].failure[0])
            fail_msg("reserver %d: %s", i, rs[i].failure);
        total += rs[i].granted;
    }
    pthread_barrier_destroy(&go);
    assert_int_equal(total, RESERVERS * RESERVES * 3);
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_version_get(tx, key, 77, &got), KMS_OK);
    commit(tx);
    assert_int_equal(got.reserved, 6 + RESERVERS * RESERVES * 3);
}

/* A row locked by another client past the timeout: the statement gives up, readers go on. */
static void test_pg_statement_timeout(void **state)
{
    struct fixture *f = *state;
    struct kms_key_row k = {0};
    uint8_t id[KMS_UUID_LEN];
    struct timespec t0;

    init_store(f);
    insert_key(f->st, 1, KMS_STORE_ENABLED);
    kms_store_close(f->st);
    f->st = NULL;
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 300, &f->st), KMS_OK);
    id_of(id, 1);

    PGconn *other = pg_connect(f->url);
    pg_exec_on(other, "BEGIN", NULL, 0);
    pg_exec_on(other, "SELECT id FROM keys FOR UPDATE", NULL, 0);
    struct kms_tx *tx = begin(f->st, KMS_TX_WRITE);
    kms_err_clear();
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(kms_store_key_get(tx, id, &k), KMS_ERR_DEPENDENCY_TIMEOUT);
    int64_t waited = elapsed_ms(&t0);
    assert_true(waited >= 250);
    assert_true(waited < 3000);
    assert_contains(kms_err_message(), "did not answer in time");
    /* the transaction is done for: its commit says so */
    assert_int_equal(kms_store_commit(tx), KMS_ERR_INTERNAL);
    assert_contains(kms_err_message(), "rolled back");
    /* readers go on meanwhile */
    tx = begin(f->st, KMS_TX_READ);
    assert_int_equal(kms_store_key_get(tx, id, &k), KMS_OK);
    commit(tx);
    kms_key_row_clear(&k);
    /* once the lock goes, a writer gets in */
    pg_exec_on(other, "ROLLBACK", NULL, 0);
    PQfinish(other);
    tx = begin(f->st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_get(tx, id, &k), KMS_OK);
    assert_int_equal(kms_store_key_update(tx, &k), KMS_OK);
    commit(tx);
    kms_key_row_clear(&k);
}

struct holder {
    struct kms_store *st;
    pthread_barrier_t *held, *release;
    kms_err got;
};

/* Holds a read transaction (a pooled connection) until told to let go. */
static void *hold_connection(void *arg)
{
    struct holder *h = arg;
    struct kms_tx *tx = NULL;
    h->got = kms_store_begin(h->st, KMS_TX_READ, &tx);
    pthread_barrier_wait(h->held);
    pthread_barrier_wait(h->release);
    if (h->got == KMS_OK)
        h->got = kms_store_commit(tx);
    return NULL;
}

/* Every connection of the pool busy past the timeout: DependencyTimeout, then service again. */
static void test_pg_pool_timeout(void **state)
{
    struct fixture *f = *state;
    pthread_barrier_t held, release;
    pthread_t t[PG_POOL_SIZE];
    struct holder h[PG_POOL_SIZE];
    struct kms_tx *tx = NULL;
    struct timespec t0;

    char url[800];
    init_store(f);
    kms_store_close(f->st);
    f->st = NULL;
    /* the URL's connect_timeout wins over the store's: making 8 connections may take a while */
    snprintf(url, sizeof url, "%s?connect_timeout=30", f->url);
    assert_int_equal(open_store(url, KMS_STORE_OPEN, 300, &f->st), KMS_OK);
    assert_int_equal(pthread_barrier_init(&held, NULL, PG_POOL_SIZE + 1), 0);
    assert_int_equal(pthread_barrier_init(&release, NULL, PG_POOL_SIZE + 1), 0);
    for (int i = 0; i < PG_POOL_SIZE; i++) {
        h[i] = (struct holder){.st = f->st, .held = &held, .release = &release};
        assert_int_equal(pthread_create(&t[i], NULL, hold_connection, &h[i]), 0);
    }
    pthread_barrier_wait(&held);
    for (int i = 0; i < PG_POOL_SIZE; i++)
        assert_int_equal(h[i].got, KMS_OK);
    kms_err_clear();
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(kms_store_begin(f->st, KMS_TX_READ, &tx), KMS_ERR_DEPENDENCY_TIMEOUT);
    int64_t waited = elapsed_ms(&t0);
    assert_true(waited >= 250);
    assert_true(waited < 3000);
    assert_contains(kms_err_message(), "did not answer in time");
    pthread_barrier_wait(&release);
    for (int i = 0; i < PG_POOL_SIZE; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        assert_int_equal(h[i].got, KMS_OK);
    }
    pthread_barrier_destroy(&held);
    pthread_barrier_destroy(&release);
    tx = begin(f->st, KMS_TX_READ);
    commit(tx);
}

/*
 * pg_ctl stop -m immediate under an open store. A pooled connection idle
 * across a crash and restart is found dead and made again by the next
 * transaction, which succeeds. A transaction open across a crash fails, so
 * does a new one while the server is down, and the first one after the
 * restart succeeds on the same store, with what was committed and nothing else.
 */
static void test_pg_restart(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    struct kms_key_row k = {0}, k3;
    struct kms_tx *tx = NULL;
    uint8_t id[KMS_UUID_LEN];

    insert_key(st, 1, KMS_STORE_ENABLED);
    id_of(id, 1);
    pg_server("crash");
    pg_server("start");
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_key_get(tx, id, &k), KMS_OK);
    commit(tx);
    kms_key_row_clear(&k);

    key_row(&k3, 3, "after", NULL);
    tx = begin(st, KMS_TX_WRITE);
    key_row(&k, 2, "never committed", NULL);
    assert_int_equal(kms_store_key_insert(tx, &k), KMS_OK);
    kms_key_row_clear(&k);
    pg_server("crash");
    kms_err_clear();
    assert_int_equal(kms_store_key_insert(tx, &k3), KMS_ERR_DEPENDENCY_TIMEOUT);
    kms_store_rollback(tx);
    tx = NULL;
    assert_int_equal(kms_store_begin(st, KMS_TX_READ, &tx), KMS_ERR_DEPENDENCY_TIMEOUT);
    /* what an API client would read: ours, no address, no password */
    assert_string_equal(kms_err_message(), "The key store's database did not answer in time");

    pg_server("start");
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_key_get(tx, id, &k), KMS_OK);
    kms_key_row_clear(&k);
    id_of(id, 2);
    assert_int_equal(kms_store_key_get(tx, id, &k), KMS_ERR_NOT_FOUND);
    commit(tx);
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_key_insert(tx, &k3), KMS_OK);
    commit(tx);
    kms_key_row_clear(&k3);
}

static void test_pg_backup_refused(void **state)
{
    struct fixture *f = *state;
    char path[256];
    init_store(f);
    snprintf(path, sizeof path, "%s/copy.db", f->dir);
    kms_err_clear();
    assert_int_equal(kms_store_backup(f->st, path), KMS_ERR_UNSUPPORTED);
    assert_contains(kms_err_message(), "pg_dump");
    assert_contains(kms_err_message(), f->name);
    assert_int_not_equal(access(path, F_OK), 0);
}

/* ---- the change feed ---- */

/* SQLite has none: the wait answers KMS_ERR_UNSUPPORTED at once, and a wake-up does nothing. */
static void test_feed_unsupported(void **state)
{
    struct fixture *f = *state;
    struct timespec t0;
    int changed = 1;
    init_store(f);
    kms_store_wake(f->st);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(kms_store_wait_change(f->st, 5000, &changed), KMS_ERR_UNSUPPORTED);
    assert_int_equal(changed, 0);
    assert_true(elapsed_ms(&t0) < 1000);
}

/* A write transaction that notes a change (or not), committed or rolled back, on st. */
static void note_change_on(struct kms_store *st, int note, int keep)
{
    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_meta_set(tx, "feed", keep ? "kept" : "undone"), KMS_OK);
    if (note)
        assert_int_equal(kms_store_note_change(tx, KMS_CHANGE_ALIAS, NULL, "alias/feed"), KMS_OK);
    if (keep)
        commit(tx);
    else
        kms_store_rollback(tx);
}

/* Waits at most timeout_ms; how long it took comes back in *took_ms. */
static int wait_change(struct kms_store *st, unsigned timeout_ms, int64_t *took_ms)
{
    struct timespec t0;
    int changed = -1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(kms_store_wait_change(st, timeout_ms, &changed), KMS_OK);
    *took_ms = elapsed_ms(&t0);
    assert_true(changed == 0 || changed == 1);
    return changed;
}

struct waker {
    struct kms_store *st;
    unsigned after_ms;
};

static void *wake_later(void *arg)
{
    struct waker *w = arg;
    struct timespec pause = {0, (long)w->after_ms * 1000000L};
    nanosleep(&pause, NULL);
    kms_store_wake(w->st);
    return NULL;
}

/*
 * LISTEN/NOTIFY between two stores on one database: the first wait makes the
 * listener and says "changed" (what came before it is unknown); a change
 * another store commits ends a wait at once; one rolled back, or a write
 * that notes no change, does not; kms_store_wake ends a wait early, and one
 * that comes before the wait ends the next wait at once.
 */
static void test_pg_feed(void **state)
{
    struct fixture *f = *state;
    struct kms_store *other = NULL;
    int64_t took;
    init_store(f);
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &other), KMS_OK);

    assert_int_equal(wait_change(f->st, 5000, &took), 1);
    assert_true(took < 3000);
    assert_int_equal(wait_change(f->st, 200, &took), 0);
    assert_true(took >= 150 && took < 2000);

    note_change_on(other, 1, 1);
    assert_int_equal(wait_change(f->st, 5000, &took), 1);
    assert_true(took < 1000);
    /* several changes, one announcement or more: all read at once, then quiet */
    note_change_on(other, 1, 1);
    note_change_on(other, 1, 1);
    assert_int_equal(wait_change(f->st, 5000, &took), 1);
    while (wait_change(f->st, 100, &took) == 1)
        ;
    note_change_on(other, 1, 0);
    note_change_on(other, 0, 1);
    assert_int_equal(wait_change(f->st, 300, &took), 0);

    struct waker w = {f->st, 100};
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, wake_later, &w), 0);
    assert_int_equal(wait_change(f->st, 10000, &took), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_true(took >= 50 && took < 3000);
    kms_store_wake(f->st);
    assert_int_equal(wait_change(f->st, 10000, &took), 0);
    assert_true(took < 1000);
    kms_store_close(other);
}

/*
 * The listener's connection killed by the server (pg_terminate_backend): the
 * wait goes on as a timed wait, makes it again after the backoff and says
 * "changed", then carries changes again.
 */
static void test_pg_feed_lost(void **state)
{
    struct fixture *f = *state;
    struct kms_store *other = NULL;
    char sql[512], killed[16];
    int64_t took;
    init_store(f);
    assert_int_equal(open_store(f->url, KMS_STORE_OPEN, 0, &other), KMS_OK);
    assert_int_equal(wait_change(f->st, 5000, &took), 1);
    snprintf(sql, sizeof sql,
             "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '%s' "
             "AND query = 'LISTEN p11kms_changes'",
             f->db);
    pg_exec(pg.admin, sql, killed, sizeof killed);
    assert_string_equal(killed, "1");
    int changed = 0;
    for (int i = 0; i < 50 && !changed; i++)
        changed = wait_change(f->st, 200, &took);
    assert_int_equal(changed, 1); /* made again: "changed", for what it missed */
    note_change_on(other, 1, 1);
    assert_int_equal(wait_change(f->st, 5000, &took), 1);
    assert_true(took < 1000);
    kms_store_close(other);
}

/*
 * The pool's size comes from the configuration: pool_size connections, the next one waits.
 * The timeout also bounds open's own statements: 2 s, not less, for a loaded machine under
 * sanitizers (300 ms made open itself time out there).
 */
static void test_pg_pool_size(void **state)
{
    struct fixture *f = *state;
    struct kms_store_config c = {
        .url = f->url, .timeout_ms = 2000, .mode = KMS_STORE_OPEN, .pool_size = 2};
    struct kms_tx *tx = NULL;
    pthread_barrier_t held, release;
    pthread_t t[2];
    struct holder h[2];
    init_store(f);
    kms_store_close(f->st);
    f->st = NULL;
    c.pool_size = KMS_STORE_POOL_MAX + 1;
    kms_err_clear();
    assert_int_equal(kms_store_open(&c, &f->st), KMS_ERR_VALIDATION);
    assert_contains(kms_err_message(), "database_pool");
    c.pool_size = 2;
    assert_int_equal(kms_store_open(&c, &f->st), KMS_OK);
    assert_int_equal(pthread_barrier_init(&held, NULL, 3), 0);
    assert_int_equal(pthread_barrier_init(&release, NULL, 3), 0);
    for (int i = 0; i < 2; i++) {
        h[i] = (struct holder){.st = f->st, .held = &held, .release = &release};
        assert_int_equal(pthread_create(&t[i], NULL, hold_connection, &h[i]), 0);
    }
    pthread_barrier_wait(&held);
    assert_int_equal(h[0].got, KMS_OK);
    assert_int_equal(h[1].got, KMS_OK);
    kms_err_clear();
    assert_int_equal(kms_store_begin(f->st, KMS_TX_READ, &tx), KMS_ERR_DEPENDENCY_TIMEOUT);
    assert_null(tx);
    pthread_barrier_wait(&release);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(pthread_join(t[i], NULL), 0);
        assert_int_equal(h[i].got, KMS_OK);
    }
    pthread_barrier_destroy(&held);
    pthread_barrier_destroy(&release);
    tx = begin(f->st, KMS_TX_READ);
    commit(tx);
}

/*
 * A server that takes the connection and never answers (a listening socket
 * nobody accepts: the kernel completes the handshake): open gives up after
 * connect_timeout_ms, not libpq's whole seconds; a connect_timeout in the
 * URL wins.
 */
static void test_pg_connect_timeout(void **state)
{
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t len = sizeof a;
    struct kms_store *st = NULL;
    struct timespec t0;
    char url[640];
    (void)state;
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(s >= 0);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(s, 16), 0);
    assert_int_equal(getsockname(s, (struct sockaddr *)&a, &len), 0);
    snprintf(url, sizeof url, "postgresql://%s:%s@127.0.0.1:%u/kms", pg.user, pg.password,
             (unsigned)ntohs(a.sin_port));
    struct kms_store_config c = {
        .url = url, .timeout_ms = 5000, .mode = KMS_STORE_OPEN, .connect_timeout_ms = 300};
    kms_err_clear();
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(kms_store_open(&c, &st), KMS_ERR_DEPENDENCY_TIMEOUT);
    int64_t took = elapsed_ms(&t0);
    assert_true(took >= 250 && took < 1500);
    assert_null(st);
    assert_contains(kms_err_message(), "no connection within 300 ms");
    assert_lacks(kms_err_message(), pg.password);
    /* the URL's connect_timeout (2 s) instead */
    snprintf(url, sizeof url, "postgresql://%s:%s@127.0.0.1:%u/kms?connect_timeout=2", pg.user,
             pg.password, (unsigned)ntohs(a.sin_port));
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(kms_store_open(&c, &st), KMS_ERR_DEPENDENCY_TIMEOUT);
    took = elapsed_ms(&t0);
    assert_true(took >= 1900 && took < 4000);
    close(s);
}

/*
 * A URL naming several hosts, the first one silent (it takes the connection
 * and never answers) and the second the server: each host gets the URL's
 * connect_timeout, then the next is tried, and the store opens.
 */
static void test_pg_several_hosts(void **state)
{
    struct fixture *f = *state;
    struct sockaddr_in a = {.sin_family = AF_INET};
    socklen_t len = sizeof a;
    struct timespec t0;
    char url[800];
    init_store(f);
    kms_store_close(f->st);
    f->st = NULL;
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(s >= 0);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(s, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(s, 16), 0);
    assert_int_equal(getsockname(s, (struct sockaddr *)&a, &len), 0);
    snprintf(url, sizeof url, "postgresql://%s:%s@127.0.0.1:%u,%s:%s/%s?connect_timeout=2", pg.user,
             pg.password, (unsigned)ntohs(a.sin_port), pg.host, pg.port, f->db);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    assert_int_equal(open_store(url, KMS_STORE_OPEN, 300, &f->st), KMS_OK);
    int64_t took = elapsed_ms(&t0);
    assert_true(took >= 1900 && took < 6000);
    struct kms_tx *tx = begin(f->st, KMS_TX_READ);
    commit(tx);
    close(s);
}

/* Which URLs hold a secret (the server refuses those on its command line). */
static void test_url_has_secret(void **state)
{
    static const char *const secret[] = {
        "postgresql://kms:pw@db/kms",         "postgres://kms:@db/kms",
        "postgresql://db/kms?password=pw",    "postgresql://db/kms?sslmode=require&pass%77ord=pw",
        "postgresql://db/kms?sslpassword=pw",
    };
    static const char *const clean[] = {
        "postgresql://kms@db:5432/kms?sslmode=verify-full",
        "postgresql://db/kms?passfile=/etc/p11kms/pgpass",
        "postgresql://[::1]:5432/kms",
        "sqlite:/var/lib/p11kms/p11kms.db",
        "sqlite:/tmp/user:pw@x.db",
        "mysql://kms:pw@db/kms",
    };
    (void)state;
    for (size_t i = 0; i < sizeof secret / sizeof secret[0]; i++)
        assert_int_equal(kms_store_url_has_secret(secret[i]), 1);
    for (size_t i = 0; i < sizeof clean / sizeof clean[0]; i++)
        assert_int_equal(kms_store_url_has_secret(clean[i]), 0);
}

/* ---- tags ---- */

struct seen_tags {
    size_t n;
    char keys[8][160];
    char values[8][300];
};

static kms_err note_tag(void *arg, const char *tag_key, const char *tag_value)
{
    struct seen_tags *s = arg;
    assert_true(s->n < 8);
    snprintf(s->keys[s->n], sizeof s->keys[0], "%s", tag_key);
    snprintf(s->values[s->n], sizeof s->values[0], "%s", tag_value);
    s->n++;
    return KMS_OK;
}

static void list_tags(struct kms_tx *tx, const uint8_t key[KMS_UUID_LEN], const char *from,
                      size_t limit, struct seen_tags *s)
{
    memset(s, 0, sizeof *s);
    assert_int_equal(kms_store_tags_list(tx, key, from, limit, note_tag, s), KMS_OK);
}

/*
 * A key's tags: put replaces, lists are in byte order of the tag key (UTF-8,
 * upper case before lower), from is inclusive, each key has its own, and
 * deleting a key's tags leaves the other key's.
 */
static void test_tags(void **state)
{
    struct fixture *f = *state;
    struct kms_store *st = init_store(f);
    uint8_t k1[KMS_UUID_LEN], k2[KMS_UUID_LEN], k9[KMS_UUID_LEN];
    struct seen_tags s;
    size_t n = 99;
    char long_value[257];

    insert_key(st, 1, KMS_STORE_ENABLED);
    insert_key(st, 2, KMS_STORE_ENABLED);
    id_of(k1, 1);
    id_of(k2, 2);
    id_of(k9, 9);
    memset(long_value, 'v', 256);
    long_value[256] = '\0';

    struct kms_tx *tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_tag_put(tx, k1, "team", "blue"), KMS_OK);
    assert_int_equal(kms_store_tag_put(tx, k1, "Team", "upper"), KMS_OK);
    assert_int_equal(kms_store_tag_put(tx, k1, "\xc3\xa9t\xc3\xa9", ""), KMS_OK); /* "été" */
    assert_int_equal(kms_store_tag_put(tx, k1, "cost", long_value), KMS_OK);
    assert_int_equal(kms_store_tag_put(tx, k2, "team", "red"), KMS_OK);
    /* an existing tag key: its value is replaced */
    assert_int_equal(kms_store_tag_put(tx, k1, "team", "green"), KMS_OK);
    commit(tx);

    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_tag_count(tx, k1, &n), KMS_OK);
    assert_int_equal(n, 4);
    assert_int_equal(kms_store_tag_count(tx, k2, &n), KMS_OK);
    assert_int_equal(n, 1);
    assert_int_equal(kms_store_tag_count(tx, k9, &n), KMS_OK);
    assert_int_equal(n, 0);
    list_tags(tx, k1, NULL, 100, &s);
    assert_int_equal(s.n, 4);
    assert_string_equal(s.keys[0], "Team");
    assert_string_equal(s.values[0], "upper");
    assert_string_equal(s.keys[1], "cost");
    assert_string_equal(s.values[1], long_value);
    assert_string_equal(s.keys[2], "team");
    assert_string_equal(s.values[2], "green");
    assert_string_equal(s.keys[3], "\xc3\xa9t\xc3\xa9");
    assert_string_equal(s.values[3], "");
    /* pages: from is inclusive, limit bounds */
    list_tags(tx, k1, NULL, 2, &s);
    assert_int_equal(s.n, 2);
    assert_string_equal(s.keys[1], "cost");
    list_tags(tx, k1, "team", 2, &s);
    assert_int_equal(s.n, 2);
    assert_string_equal(s.keys[0], "team");
    assert_string_equal(s.keys[1], "\xc3\xa9t\xc3\xa9");
    list_tags(tx, k1, "d", 1, &s);
    assert_int_equal(s.n, 1);
    assert_string_equal(s.keys[0], "team");
    list_tags(tx, k1, "\xc3\xa9u", 10, &s);
    assert_int_equal(s.n, 0);
    list_tags(tx, k2, NULL, 10, &s);
    assert_int_equal(s.n, 1);
    assert_string_equal(s.values[0], "red");
    list_tags(tx, k9, NULL, 10, &s);
    assert_int_equal(s.n, 0);
    commit(tx);

    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_tag_delete(tx, k1, "cost"), KMS_OK);
    assert_int_equal(kms_store_tag_delete(tx, k1, "cost"), KMS_ERR_NOT_FOUND);
    /* tag keys are case-sensitive */
    assert_int_equal(kms_store_tag_delete(tx, k1, "TEAM"), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_tag_delete(tx, k2, "Team"), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_store_tag_count(tx, k1, &n), KMS_OK);
    assert_int_equal(n, 3);
    commit(tx);

    /* a rolled back put or delete leaves nothing behind */
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_tag_put(tx, k2, "gone", "soon"), KMS_OK);
    assert_int_equal(kms_store_tag_delete(tx, k2, "team"), KMS_OK);
    kms_store_rollback(tx);
    tx = begin(st, KMS_TX_READ);
    list_tags(tx, k2, NULL, 10, &s);
    assert_int_equal(s.n, 1);
    assert_string_equal(s.keys[0], "team");
    commit(tx);

    /* a destroyed key's tags go together; the other key's stay */
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_tags_delete(tx, k1), KMS_OK);
    assert_int_equal(kms_store_tags_delete(tx, k1), KMS_OK);
    assert_int_equal(kms_store_tags_delete(tx, k9), KMS_OK);
    commit(tx);
    tx = begin(st, KMS_TX_READ);
    assert_int_equal(kms_store_tag_count(tx, k1, &n), KMS_OK);
    assert_int_equal(n, 0);
    assert_int_equal(kms_store_tag_count(tx, k2, &n), KMS_OK);
    assert_int_equal(n, 1);
    commit(tx);

    /* a tag of a key that is not there is a fault, not "already exists" */
    tx = begin(st, KMS_TX_WRITE);
    assert_int_equal(kms_store_tag_put(tx, k9, "team", "x"), KMS_ERR_INTERNAL);
    kms_store_rollback(tx);
    kms_err_clear();
}

#define BOTH(test, setup) cmocka_unit_test_setup_teardown(test, setup, remove_fixture)

static int run_postgresql(void)
{
    const struct CMUnitTest tests[] = {
        BOTH(test_init_creates_schema, make_pg_fixture),
        BOTH(test_open_empty_file, make_pg_fixture),
        BOTH(test_open_newer_schema, make_pg_fixture),
        BOTH(test_key_round_trip, make_pg_fixture),
        BOTH(test_key_update_stale_rev, make_pg_fixture),
        BOTH(test_keys_list_paging, make_pg_fixture),
        BOTH(test_keys_due, make_pg_fixture),
        BOTH(test_versions, make_pg_fixture),
        BOTH(test_reserve_bound, make_pg_fixture),
        BOTH(test_aliases, make_pg_fixture),
        BOTH(test_grants, make_pg_fixture),
        BOTH(test_grants_paging, make_pg_fixture),
        BOTH(test_other_constraints_are_faults, make_pg_fixture),
        BOTH(test_roots_and_meta, make_pg_fixture),
        BOTH(test_change_sequence, make_pg_fixture),
        BOTH(test_audit_records, make_pg_fixture),
        BOTH(test_migrate_schema_1, make_pg_fixture),
        BOTH(test_rollback_undoes, make_pg_fixture),
        BOTH(test_other_thread_sees_committed_only, make_pg_fixture),
        BOTH(test_concurrent_writers, make_pg_fixture),
        BOTH(test_pg_name_hides_password, make_pg_fixture),
        BOTH(test_pg_bad_url, make_pg_fixture),
        BOTH(test_pg_missing_database, make_pg_fixture),
        BOTH(test_pg_unreachable, make_pg_fixture),
        BOTH(test_pg_failed_migration, make_pg_fixture),
        BOTH(test_pg_concurrent_init, make_pg_fixture),
        BOTH(test_pg_alias_race, make_pg_fixture),
        BOTH(test_pg_write_waits_for_row_lock, make_pg_fixture),
        BOTH(test_pg_changes_commit_in_order, make_pg_fixture),
        BOTH(test_pg_roots_read_for_write, make_pg_fixture),
        BOTH(test_pg_concurrent_reserve, make_pg_fixture),
        BOTH(test_pg_statement_timeout, make_pg_fixture),
        BOTH(test_pg_pool_timeout, make_pg_fixture),
        BOTH(test_pg_restart, make_pg_fixture),
        BOTH(test_pg_backup_refused, make_pg_fixture),
        BOTH(test_pg_feed, make_pg_fixture),
        BOTH(test_pg_feed_lost, make_pg_fixture),
        BOTH(test_pg_pool_size, make_pg_fixture),
        BOTH(test_pg_connect_timeout, make_pg_fixture),
        BOTH(test_pg_several_hosts, make_pg_fixture),
        BOTH(test_tags, make_pg_fixture),
    };
    /* Without its server this run fails: it is never skipped. */
    if (pg_setup() != 0) {
        fprintf(stderr, "P11KMS_TEST_PG_URL is not a usable postgresql:// URL with a user and "
                        "a password\n");
        return 1;
    }
    return cmocka_run_group_tests_name("store on PostgreSQL", tests, NULL, NULL);
}

/* One engine per run (TAP has one plan per run): SQLite, or PostgreSQL when asked. */
int main(void)
{
    const char *engine = getenv("P11KMS_TEST_ENGINE");
    if (engine && strcmp(engine, "postgresql") == 0)
        return run_postgresql();
    const struct CMUnitTest tests[] = {
        BOTH(test_init_creates_schema, make_fixture),
        BOTH(test_open_refuses_bad_urls, make_fixture),
        BOTH(test_open_missing_file, make_fixture),
        BOTH(test_open_empty_file, make_fixture),
        BOTH(test_open_random_bytes, make_fixture),
        BOTH(test_open_newer_schema, make_fixture),
        BOTH(test_key_round_trip, make_fixture),
        BOTH(test_key_update_stale_rev, make_fixture),
        BOTH(test_keys_list_paging, make_fixture),
        BOTH(test_keys_due, make_fixture),
        BOTH(test_versions, make_fixture),
        BOTH(test_reserve_bound, make_fixture),
        BOTH(test_aliases, make_fixture),
        BOTH(test_grants, make_fixture),
        BOTH(test_grants_paging, make_fixture),
        BOTH(test_other_constraints_are_faults, make_fixture),
        BOTH(test_roots_and_meta, make_fixture),
        BOTH(test_change_sequence, make_fixture),
        BOTH(test_audit_records, make_fixture),
        BOTH(test_migrate_schema_1, make_fixture),
        BOTH(test_rollback_undoes, make_fixture),
        BOTH(test_other_thread_sees_committed_only, make_fixture),
        BOTH(test_concurrent_writers, make_fixture),
        BOTH(test_write_lock_timeout, make_fixture),
        BOTH(test_backup, make_fixture),
        BOTH(test_feed_unsupported, make_fixture),
        BOTH(test_url_has_secret, make_fixture),
        BOTH(test_tags, make_fixture),
    };
    return cmocka_run_group_tests_name("store on SQLite", tests, NULL, NULL);
}
