/*
 * The SQLite engine of the store (store.h): WAL, synchronous=FULL, a busy
 * timeout, one connection per thread (each with a 128 KiB page cache: the
 * operating system's cache is shared, and the keys in use are in ours) (each made on the thread's
 * first transaction and kept until the store closes), statements prepared once per connection. A
 * write transaction is BEGIN IMMEDIATE: it takes the write lock before reading, so it never reads
 * what another writer is about to change.
 */
#include "config.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "store/engine.h"
#include "store/schema.h"

enum stmt {
    S_BEGIN_READ,
    S_BEGIN_WRITE,
    S_COMMIT,
    S_ROLLBACK,
    S_KEY_GET,
    S_KEY_INSERT,
    S_KEY_UPDATE,
    S_KEYS_LIST,
    S_KEYS_LIST_AFTER,
    S_KEY_COUNT,
    S_VERSION_COUNT,
    S_KEYS_ROTATION_DUE,
    S_KEYS_DELETION_DUE,
    S_VERSION_GET,
    S_VERSION_INSERT,
    S_VERSIONS,
    S_VERSION_MAX_N,
    S_RESERVE,
    S_VERSIONS_DELETE,
    S_ALIAS_GET,
    S_ALIAS_INSERT,
    S_ALIAS_UPDATE,
    S_ALIAS_DELETE,
    S_ALIASES_OF_KEY,
    S_ALIASES_OF_KEY_DELETE,
    S_ALIASES_LIST,
    S_GRANT_INSERT,
    S_GRANT_GET,
    S_GRANT_DELETE,
    S_GRANTS_LIST,
    S_GRANTS_RETIRABLE,
    S_GRANTS_NAMED,
    S_GRANT_COUNT,
    S_GRANTS_DELETE,
    S_ROOTS,
    S_ROOT_INSERT,
    S_META_GET,
    S_META_SET,
    S_NOTE_CHANGE,
    S_CHANGE_HEAD,
    S_CHANGE_TAIL,
    S_CHANGES,
    S_CHANGES_PRUNE,
    S_CHANGE_REQUEST,
    S_CHANGE_REQUEST_FIND,
    S_AUDIT_HEAD_GET,
    S_AUDIT_HEAD_PUT,
    /* ---- tags ---- */
    S_TAG_PUT,
    S_TAG_DELETE,
    S_TAGS_LIST,
    S_TAG_COUNT,
    S_TAGS_DELETE,
    S_COUNT
};

#define KEY_COLUMNS                                                                          \
    "id, created, description, state, deletion_date, rotation_enabled, rotation_days, "      \
    "rotation_seconds, next_rotation, current_vid, on_demand, token_resident, policy, rev, " \
    "key_spec, key_usage"
#define VERSION_COLUMNS                                                      \
    "key_id, vid, n, created, rotation, reserved, bound, root_id, wrapped, " \
    "public_key"
#define GRANT_COLUMNS \
    "key_id, grant_id, name, grantee, retiring, operations, constraints, issuer, created"

static const char *const sql[S_COUNT] = {
    [S_BEGIN_READ] = "BEGIN DEFERRED",
    [S_BEGIN_WRITE] = "BEGIN IMMEDIATE",
    [S_COMMIT] = "COMMIT",
    [S_ROLLBACK] = "ROLLBACK",
    [S_KEY_GET] = "SELECT " KEY_COLUMNS " FROM keys WHERE id = ?1",
    [S_KEY_INSERT] = "INSERT INTO keys (" KEY_COLUMNS ") VALUES "
                     "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 1, "
                     "?14, ?15)",
    [S_KEY_UPDATE] = "UPDATE keys SET description = ?3, state = ?4, deletion_date = ?5, "
                     "rotation_enabled = ?6, rotation_days = ?7, rotation_seconds = ?8, "
                     "next_rotation = ?9, current_vid = ?10, on_demand = ?11, "
                     "token_resident = ?12, policy = ?13, rev = rev + 1 "
                     "WHERE id = ?1 AND rev = ?14",
    [S_KEYS_LIST] = "SELECT " KEY_COLUMNS " FROM keys WHERE state <> 3 ORDER BY id LIMIT ?1",
    [S_KEYS_LIST_AFTER] = "SELECT " KEY_COLUMNS " FROM keys WHERE state <> 3 AND id >= ?2 "
                          "ORDER BY id LIMIT ?1",
    [S_KEY_COUNT] = "SELECT count(*) FROM keys WHERE state <> 3",
    [S_VERSION_COUNT] = "SELECT count(*) FROM versions",
    [S_KEYS_ROTATION_DUE] = "SELECT id FROM keys WHERE state = 0 AND rotation_enabled = 1 "
                            "AND token_resident = 0 AND next_rotation <= ?1 "
                            "ORDER BY next_rotation LIMIT ?2",
    [S_KEYS_DELETION_DUE] = "SELECT id FROM keys WHERE state = 2 AND deletion_date <= ?1 "
                            "ORDER BY deletion_date LIMIT ?2",
    [S_VERSION_GET] = "SELECT " VERSION_COLUMNS " FROM versions WHERE key_id = ?1 AND vid = ?2",
    [S_VERSION_INSERT] = "INSERT INTO versions (" VERSION_COLUMNS ") VALUES "
                         "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    [S_VERSIONS] = "SELECT " VERSION_COLUMNS " FROM versions WHERE key_id = ?1 ORDER BY n",
    [S_VERSION_MAX_N] = "SELECT coalesce(max(n), 0) FROM versions WHERE key_id = ?1",
    [S_RESERVE] = "UPDATE versions SET reserved = min(bound, reserved + ?3) "
                  "WHERE key_id = ?1 AND vid = ?2 RETURNING reserved",
    [S_VERSIONS_DELETE] = "DELETE FROM versions WHERE key_id = ?1",
    [S_ALIAS_GET] = "SELECT name, target, created, updated FROM aliases WHERE name = ?1",
    [S_ALIAS_INSERT] = "INSERT INTO aliases (name, target, created, updated) "
                       "VALUES (?1, ?2, ?3, ?4)",
    [S_ALIAS_UPDATE] = "UPDATE aliases SET target = ?2, updated = ?4 WHERE name = ?1",
    [S_ALIAS_DELETE] = "DELETE FROM aliases WHERE name = ?1",
    [S_ALIASES_OF_KEY] = "SELECT name FROM aliases WHERE target = ?1 ORDER BY name",
    [S_ALIASES_OF_KEY_DELETE] = "DELETE FROM aliases WHERE target = ?1",
    [S_ALIASES_LIST] = "SELECT name, target, created, updated FROM aliases "
                       "WHERE name >= ?1 AND (?2 IS NULL OR target = ?2) ORDER BY name LIMIT ?3",
    [S_GRANT_INSERT] = "INSERT INTO grants (" GRANT_COLUMNS ") VALUES "
                       "(?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    [S_GRANT_GET] = "SELECT " GRANT_COLUMNS " FROM grants WHERE grant_id = ?1",
    [S_GRANT_DELETE] = "DELETE FROM grants WHERE key_id = ?1 AND grant_id = ?2",
    [S_GRANTS_LIST] = "SELECT " GRANT_COLUMNS " FROM grants WHERE key_id = ?1 AND grant_id >= ?2 "
                      "ORDER BY grant_id LIMIT ?3",
    [S_GRANTS_RETIRABLE] = "SELECT " GRANT_COLUMNS " FROM grants WHERE retiring = ?1 "
                           "AND grant_id >= ?2 ORDER BY grant_id LIMIT ?3",
    [S_GRANTS_NAMED] = "SELECT " GRANT_COLUMNS " FROM grants WHERE key_id = ?1 AND name = ?2 "
                       "ORDER BY grant_id",
    [S_GRANT_COUNT] = "SELECT count(*) FROM grants WHERE key_id = ?1",
    [S_GRANTS_DELETE] = "DELETE FROM grants WHERE key_id = ?1",
    [S_ROOTS] = "SELECT id, cka_id, label, created, state FROM roots ORDER BY id",
    [S_ROOT_INSERT] = "INSERT INTO roots (cka_id, label, created, state) VALUES (?1, ?2, ?3, ?4)",
    [S_META_GET] = "SELECT value FROM meta WHERE name = ?1",
    [S_META_SET] = "INSERT INTO meta (name, value) VALUES (?1, ?2) "
                   "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    [S_NOTE_CHANGE] = "INSERT INTO changes (kind, key_id, name, at) VALUES (?1, ?2, ?3, ?4)",
    [S_CHANGE_HEAD] = "SELECT coalesce(max(seq), 0) FROM changes",
    [S_CHANGE_TAIL] = "SELECT coalesce(min(seq), 0) FROM changes",
    [S_CHANGES] = "SELECT seq, kind, key_id, name FROM changes WHERE seq > ?1 ORDER BY seq "
                  "LIMIT ?2",
    [S_CHANGES_PRUNE] = "DELETE FROM changes WHERE at < ?1 AND seq < (SELECT max(seq) FROM "
                        "changes)",
    [S_CHANGE_REQUEST] = "INSERT INTO change_requests (request_id, at) VALUES (?1, ?2)",
    [S_CHANGE_REQUEST_FIND] = "SELECT 1 FROM change_requests WHERE request_id = ?1",
    [S_AUDIT_HEAD_GET] = "SELECT node, log, seq, hash, key, mac, updated FROM audit_heads "
                         "WHERE node = ?1",
    [S_AUDIT_HEAD_PUT] = "INSERT INTO audit_heads (node, log, seq, hash, key, mac, updated) "
                         "VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (node) DO UPDATE SET "
                         "log = excluded.log, seq = excluded.seq, hash = excluded.hash, "
                         "key = excluded.key, mac = excluded.mac, updated = excluded.updated",
    /* ---- tags ---- */
    [S_TAG_PUT] = "INSERT INTO tags (key_id, tag_key, tag_value) VALUES (?1, ?2, ?3) "
                  "ON CONFLICT (key_id, tag_key) DO UPDATE SET tag_value = excluded.tag_value",
    [S_TAG_DELETE] = "DELETE FROM tags WHERE key_id = ?1 AND tag_key = ?2",
    [S_TAGS_LIST] = "SELECT tag_key, tag_value FROM tags WHERE key_id = ?1 AND tag_key >= ?2 "
                    "ORDER BY tag_key LIMIT ?3",
    [S_TAG_COUNT] = "SELECT count(*) FROM tags WHERE key_id = ?1",
    [S_TAGS_DELETE] = "DELETE FROM tags WHERE key_id = ?1",
};

/* A thread's connection; its base is the struct kms_tx handed out (engine.h). */
struct conn {
    struct kms_tx base;
    struct sq_store *st;
    sqlite3 *db;
    sqlite3_stmt *stmt[S_COUNT];
    int open;  /* a transaction is open */
    int write; /* it is a write transaction */
    struct conn *next;
};

struct sq_store {
    struct kms_store base; /* its name: the URL as given (a path holds no secret) */
    char *path;
    unsigned timeout_ms;
    pthread_key_t conn; /* this thread's struct conn */
    pthread_mutex_t lock;
    struct conn *conns;
};

static struct conn *conn_of(struct kms_tx *tx)
{
    return (struct conn *)tx;
}

static struct sq_store *store_of(struct kms_store *st)
{
    return (struct sq_store *)st;
}

static kms_err db_fail(sqlite3 *db, int rc, const char *what)
{
    const char *msg = db ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    int primary = rc & 0xff;
    if (primary == SQLITE_BUSY || primary == SQLITE_LOCKED) {
        kms_warn("database: %s: %s", what, msg);
        return kms_store_failed(KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT,
                                         "The key store's database did not answer in time"));
    }
    if (rc == SQLITE_CONSTRAINT_PRIMARYKEY || rc == SQLITE_CONSTRAINT_UNIQUE)
        return kms_store_failed(KMS_FAIL(KMS_ERR_ALREADY_EXISTS, "The entry already exists"));
    kms_error("database: %s: %s (%s)", what, msg, sqlite3_errstr(rc));
    return kms_store_failed(KMS_FAIL(KMS_ERR_INTERNAL, "The key store's database failed"));
}

static kms_err exec(sqlite3 *db, const char *text, const char *what)
{
    char *err = NULL;
    int rc = sqlite3_exec(db, text, NULL, NULL, &err);
    sqlite3_free(err);
    return rc == SQLITE_OK ? KMS_OK : db_fail(db, rc, what);
}

/* A connection with the settings every connection has. */
static kms_err db_connect(struct sq_store *st, int create, sqlite3 **out)
{
    sqlite3 *db = NULL;
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_NOMUTEX | (create ? SQLITE_OPEN_CREATE : 0);
    int rc = sqlite3_open_v2(st->path, &db, flags, NULL);
    if (rc != SQLITE_OK) {
        kms_err e = KMS_FAIL(KMS_ERR_INTERNAL, "cannot open the database %s: %s", st->base.name,
                             db ? sqlite3_errmsg(db) : sqlite3_errstr(rc));
        sqlite3_close(db);
        return e;
    }
    sqlite3_extended_result_codes(db, 1);
    sqlite3_busy_timeout(db, (int)st->timeout_ms);
    /* journal_mode answers a row: run it through exec, which ignores rows. */
    kms_err e = exec(db,
                     "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; "
                     "PRAGMA foreign_keys = ON; PRAGMA trusted_schema = OFF; "
                     "PRAGMA cache_size = -128",
                     "settings");
    if (e != KMS_OK) {
        /* The engine's words (no row contents at this point) say why. */
        e = KMS_FAIL(e, "cannot use the database %s: %s", st->base.name, sqlite3_errmsg(db));
        sqlite3_close(db);
        return e;
    }
    *out = db;
    return KMS_OK;
}

static kms_err this_thread(struct sq_store *st, struct conn **out)
{
    struct conn *c = pthread_getspecific(st->conn);
    if (c) {
        *out = c;
        return KMS_OK;
    }
    c = calloc(1, sizeof *c);
    KMS_ENSURE(c != NULL, KMS_ERR_INTERNAL, "out of memory");
    c->base.engine = &kms_store_sqlite;
    c->st = st;
    kms_err rc = db_connect(st, 0, &c->db);
    if (rc != KMS_OK) {
        free(c);
        return rc;
    }
    pthread_mutex_lock(&st->lock);
    c->next = st->conns;
    st->conns = c;
    pthread_mutex_unlock(&st->lock);
    pthread_setspecific(st->conn, c);
    *out = c;
    return KMS_OK;
}

static void conn_free(struct conn *c)
{
    for (int i = 0; i < S_COUNT; i++)
        sqlite3_finalize(c->stmt[i]);
    sqlite3_close(c->db);
    free(c);
}

/* The prepared statement s, reset and with no bindings. */
static kms_err stmt(struct conn *tx, enum stmt s, sqlite3_stmt **out)
{
    if (!tx->stmt[s]) {
        int rc =
            sqlite3_prepare_v3(tx->db, sql[s], -1, SQLITE_PREPARE_PERSISTENT, &tx->stmt[s], NULL);
        if (rc != SQLITE_OK)
            return db_fail(tx->db, rc, "prepare");
    }
    sqlite3_reset(tx->stmt[s]);
    sqlite3_clear_bindings(tx->stmt[s]);
    *out = tx->stmt[s];
    return KMS_OK;
}

/* Runs a statement that answers no rows (or whose rows are not wanted). */
static kms_err run(struct conn *tx, sqlite3_stmt *q, const char *what)
{
    int rc;
    while ((rc = sqlite3_step(q)) == SQLITE_ROW)
        ;
    sqlite3_reset(q);
    return rc == SQLITE_DONE ? KMS_OK : db_fail(tx->db, rc, what);
}

/* Steps to the next row: 1 a row, 0 done; a failure is returned through *err. */
static int next_row(struct conn *tx, sqlite3_stmt *q, kms_err *err, const char *what)
{
    int rc = sqlite3_step(q);
    if (rc == SQLITE_ROW)
        return 1;
    if (rc != SQLITE_DONE)
        *err = db_fail(tx->db, rc, what);
    sqlite3_reset(q);
    return 0;
}

static void bind_id(sqlite3_stmt *q, int i, const uint8_t *id)
{
    if (id)
        sqlite3_bind_blob(q, i, id, KMS_UUID_LEN, SQLITE_STATIC);
    else
        sqlite3_bind_null(q, i);
}

static void bind_text(sqlite3_stmt *q, int i, const char *s)
{
    if (s)
        sqlite3_bind_text(q, i, s, -1, SQLITE_STATIC);
    else
        sqlite3_bind_null(q, i);
}

static int column_id(sqlite3_stmt *q, int i, uint8_t out[KMS_UUID_LEN])
{
    const void *p = sqlite3_column_blob(q, i);
    if (!p || sqlite3_column_bytes(q, i) != KMS_UUID_LEN)
        return 0;
    memcpy(out, p, KMS_UUID_LEN);
    return 1;
}

/* ---- the database ---- */

static kms_err user_version(sqlite3 *db, int *out)
{
    sqlite3_stmt *q = NULL;
    int rc = sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &q, NULL);
    if (rc == SQLITE_OK && (rc = sqlite3_step(q)) == SQLITE_ROW) {
        *out = sqlite3_column_int(q, 0);
        rc = SQLITE_OK;
    }
    sqlite3_finalize(q);
    return rc == SQLITE_OK ? KMS_OK : db_fail(db, rc, "schema version");
}

/* Brings the schema to this binary's version (mode INIT) or checks it is (OPEN). */
static kms_err schema(struct sq_store *st, sqlite3 *db, int mode)
{
    int have = 0, want = kms_schema_count();
    KMS_GUARD(user_version(db, &have));
    KMS_GUARD(kms_store_schema_usable(st->base.name, have, mode));
    if (have == want)
        return KMS_OK;
    KMS_GUARD(exec(db, "BEGIN IMMEDIATE", "migration"));
    /* Read again under the write lock: another process may have migrated meanwhile. */
    kms_err rc = user_version(db, &have);
    if (rc == KMS_OK)
        rc = kms_store_schema_usable(st->base.name, have, mode);
    for (int v = have + 1; rc == KMS_OK && v <= want; v++) {
        char pragma[64];
        rc = exec(db, kms_schema_migration(KMS_SCHEMA_SQLITE, v), "migration");
        snprintf(pragma, sizeof pragma, "PRAGMA user_version = %d", v);
        if (rc == KMS_OK)
            rc = exec(db, pragma, "migration");
    }
    if (rc == KMS_OK)
        rc = exec(db, "COMMIT", "migration");
    if (rc == KMS_OK)
        kms_store_log_migration(st->base.name, have, want);
    if (rc != KMS_OK) {
        char *err = NULL;
        sqlite3_exec(db, "ROLLBACK", NULL, NULL, &err);
        sqlite3_free(err);
    }
    return rc;
}

static void sq_close(struct kms_store *base);

static kms_err sq_open(const struct kms_store_config *cfg, struct kms_store **out)
{
    const char *url = cfg->url;
    struct sq_store *st;
    sqlite3 *db = NULL;
    kms_err rc;

    KMS_ENSURE(url && strncmp(url, "sqlite:", 7) == 0 && url[7], KMS_ERR_VALIDATION,
               "database must be sqlite:PATH");
    const char *path = url + 7;
    if (strncmp(path, "//", 2) == 0)
        path += 2; /* sqlite:///abs/path */
    st = calloc(1, sizeof *st);
    KMS_ENSURE(st != NULL, KMS_ERR_INTERNAL, "out of memory");
    st->base.engine = &kms_store_sqlite;
    st->path = strdup(path);
    st->base.name = strdup(url);
    st->timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : 5000;
    pthread_mutex_init(&st->lock, NULL);
    if (!st->path || !st->base.name || pthread_key_create(&st->conn, NULL) != 0) {
        free(st->path);
        free(st->base.name);
        free(st);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    if (cfg->mode == KMS_STORE_INIT) {
        /* Made private before SQLite writes anything into it (the WAL files take its mode). */
        int fd = open(st->path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
        if (fd < 0) {
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "cannot create the database %s: %s", st->base.name,
                          strerror(errno));
            sq_close(&st->base);
            return rc;
        }
        close(fd);
    } else if (access(st->path, F_OK) != 0) {
        rc = KMS_FAIL(KMS_ERR_INTERNAL,
                      "the database %s does not exist: run p11kmsd init --config FILE",
                      st->base.name);
        sq_close(&st->base);
        return rc;
    }
    rc = db_connect(st, 0, &db);
    if (rc == KMS_OK) {
        rc = schema(st, db, cfg->mode);
        if (rc != KMS_OK && kms_err_message()[0] &&
            strstr(kms_err_message(), st->base.name) == NULL)
            rc = KMS_FAIL(rc, "cannot use the database %s: %s", st->base.name, kms_err_message());
    }
    sqlite3_close(db);
    if (rc != KMS_OK) {
        sq_close(&st->base);
        return rc;
    }
    *out = &st->base;
    return KMS_OK;
}

static void sq_close(struct kms_store *base)
{
    struct sq_store *st = store_of(base);
    while (st->conns) {
        struct conn *c = st->conns;
        st->conns = c->next;
        conn_free(c);
    }
    pthread_key_delete(st->conn);
    pthread_mutex_destroy(&st->lock);
    free(st->path);
    free(st->base.name);
    free(st);
}

static kms_err sq_database_version(struct kms_store *st, int *out)
{
    struct conn *c;
    KMS_GUARD(this_thread(store_of(st), &c));
    return user_version(c->db, out);
}

static kms_err sq_backup(struct kms_store *st, const char *path)
{
    struct conn *c;
    sqlite3 *dst = NULL;
    KMS_GUARD(this_thread(store_of(st), &c));
    KMS_ENSURE(access(path, F_OK) != 0, KMS_ERR_VALIDATION, "%s exists already", path);
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    KMS_ENSURE(fd >= 0, KMS_ERR_INTERNAL, "cannot create %s: %s", path, strerror(errno));
    close(fd);
    int rc = sqlite3_open_v2(path, &dst, SQLITE_OPEN_READWRITE, NULL);
    if (rc == SQLITE_OK) {
        sqlite3_backup *b = sqlite3_backup_init(dst, "main", c->db, "main");
        if (!b) {
            rc = sqlite3_errcode(dst);
        } else {
            /*
             * One step over the whole file: a read of one WAL snapshot, which
             * writers do not wait for (in steps, every write by another
             * connection would restart the copy, and a busy database might
             * never finish).
             */
            do {
                rc = sqlite3_backup_step(b, -1);
                if (rc == SQLITE_BUSY || rc == SQLITE_LOCKED)
                    sqlite3_sleep(10);
            } while (rc == SQLITE_OK || rc == SQLITE_BUSY || rc == SQLITE_LOCKED);
            int fin = sqlite3_backup_finish(b);
            if (rc == SQLITE_DONE)
                rc = fin;
        }
    }
    kms_err e = KMS_OK;
    if (rc != SQLITE_OK) {
        e = KMS_FAIL(KMS_ERR_INTERNAL, "backup to %s failed: %s", path,
                     dst ? sqlite3_errmsg(dst) : sqlite3_errstr(rc));
        sqlite3_close(dst);
        unlink(path);
        return e;
    }
    /* The copy is one file: no WAL beside it. */
    char *err = NULL;
    sqlite3_exec(dst, "PRAGMA journal_mode = DELETE", NULL, NULL, &err);
    sqlite3_free(err);
    rc = sqlite3_close(dst);
    KMS_ENSURE(rc == SQLITE_OK, KMS_ERR_INTERNAL, "backup to %s failed: %s", path,
               sqlite3_errstr(rc));
    return KMS_OK;
}

/* ---- transactions ---- */

static kms_err sq_begin(struct kms_store *st, int mode, struct kms_tx **out)
{
    struct conn *c;
    sqlite3_stmt *q;
    KMS_GUARD(this_thread(store_of(st), &c));
    KMS_ENSURE(!c->open, KMS_ERR_INTERNAL, "a transaction is already open on this thread");
    KMS_GUARD(stmt(c, mode == KMS_TX_WRITE ? S_BEGIN_WRITE : S_BEGIN_READ, &q));
    KMS_GUARD(run(c, q, "begin"));
    c->open = 1;
    c->write = mode == KMS_TX_WRITE;
    *out = &c->base;
    return KMS_OK;
}

static void sq_rollback(struct kms_tx *base);

static kms_err sq_commit(struct kms_tx *base)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_ENSURE(tx->open, KMS_ERR_INTERNAL, "no transaction to commit");
    kms_err rc = stmt(tx, S_COMMIT, &q);
    if (rc == KMS_OK)
        rc = run(tx, q, "commit");
    if (rc != KMS_OK) {
        sq_rollback(base);
        return rc;
    }
    tx->open = 0;
    return KMS_OK;
}

static void sq_rollback(struct kms_tx *base)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    if (!tx->open)
        return;
    tx->open = 0;
    if (sqlite3_get_autocommit(tx->db))
        return; /* SQLite already rolled back (a failed COMMIT, an I/O error) */
    if (stmt(tx, S_ROLLBACK, &q) != KMS_OK || run(tx, q, "rollback") != KMS_OK)
        kms_err_clear();
}

/* ---- keys ---- */

static kms_err key_from(sqlite3_stmt *q, struct kms_key_row *r)
{
    const char *d = (const char *)sqlite3_column_text(q, 2);
    const char *p = (const char *)sqlite3_column_text(q, 12);
    memset(r, 0, sizeof *r);
    KMS_ENSURE(column_id(q, 0, r->id), KMS_ERR_INTERNAL, "a key row without a valid id");
    r->created = sqlite3_column_int64(q, 1);
    r->description = strdup(d ? d : "");
    KMS_ENSURE(r->description != NULL, KMS_ERR_INTERNAL, "out of memory");
    r->state = sqlite3_column_int(q, 3);
    r->deletion_date = sqlite3_column_int64(q, 4);
    r->rotation_enabled = sqlite3_column_int(q, 5);
    r->rotation_days = sqlite3_column_int64(q, 6);
    r->rotation_seconds = sqlite3_column_int64(q, 7);
    r->next_rotation = sqlite3_column_int64(q, 8);
    r->current = (uint32_t)sqlite3_column_int64(q, 9);
    r->on_demand = (uint32_t)sqlite3_column_int64(q, 10);
    r->token_resident = sqlite3_column_int(q, 11);
    r->rev = sqlite3_column_int64(q, 13);
    r->spec = sqlite3_column_int(q, 14);
    r->usage = sqlite3_column_int(q, 15);
    if (p) {
        r->policy = strdup(p);
        KMS_ENSURE(r->policy != NULL, KMS_ERR_INTERNAL, "out of memory");
    }
    return KMS_OK;
}

static void bind_key(sqlite3_stmt *q, const struct kms_key_row *r)
{
    bind_id(q, 1, r->id);
    sqlite3_bind_int64(q, 2, r->created);
    sqlite3_bind_text(q, 3, r->description ? r->description : "", -1, SQLITE_STATIC);
    sqlite3_bind_int(q, 4, r->state);
    sqlite3_bind_int64(q, 5, r->deletion_date);
    sqlite3_bind_int(q, 6, r->rotation_enabled);
    sqlite3_bind_int64(q, 7, r->rotation_days);
    sqlite3_bind_int64(q, 8, r->rotation_seconds);
    sqlite3_bind_int64(q, 9, r->next_rotation);
    sqlite3_bind_int64(q, 10, r->current);
    sqlite3_bind_int64(q, 11, r->on_demand);
    sqlite3_bind_int(q, 12, r->token_resident);
    bind_text(q, 13, r->policy);
}

static kms_err sq_key_get(struct kms_tx *base, const uint8_t id[KMS_UUID_LEN],
                          struct kms_key_row *out)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_KEY_GET, &q));
    bind_id(q, 1, id);
    if (!next_row(tx, q, &rc, "read a key"))
        return rc != KMS_OK ? rc : KMS_ERR_NOT_FOUND;
    rc = key_from(q, out);
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_key_insert(struct kms_tx *base, const struct kms_key_row *r)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_KEY_INSERT, &q));
    bind_key(q, r);
    sqlite3_bind_int(q, 14, r->spec);
    sqlite3_bind_int(q, 15, r->usage);
    return run(tx, q, "insert a key");
}

static kms_err sq_key_update(struct kms_tx *base, struct kms_key_row *r)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_KEY_UPDATE, &q));
    bind_key(q, r);
    sqlite3_bind_int64(q, 14, r->rev);
    KMS_GUARD(run(tx, q, "update a key"));
    KMS_ENSURE(sqlite3_changes(tx->db) == 1, KMS_ERR_INVALID_STATE,
               "The key changed meanwhile; try again");
    r->rev++;
    return KMS_OK;
}

static kms_err sq_keys_list(struct kms_tx *base, const uint8_t *from, size_t limit,
                            kms_err (*fn)(void *arg, const struct kms_key_row *r), void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    struct kms_key_row r = {0};
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, from ? S_KEYS_LIST_AFTER : S_KEYS_LIST, &q));
    sqlite3_bind_int64(q, 1, (sqlite3_int64)limit);
    if (from)
        bind_id(q, 2, from);
    while (rc == KMS_OK && next_row(tx, q, &rc, "list keys")) {
        rc = key_from(q, &r);
        if (rc == KMS_OK)
            rc = fn(arg, &r);
        kms_key_row_clear(&r);
    }
    sqlite3_reset(q);
    return rc;
}

static kms_err count(struct conn *tx, enum stmt s, size_t *out)
{
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, s, &q));
    *out = 0;
    if (next_row(tx, q, &rc, "count"))
        *out = (size_t)sqlite3_column_int64(q, 0);
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_key_count(struct kms_tx *base, size_t *keys, size_t *versions)
{
    struct conn *tx = conn_of(base);
    KMS_GUARD(count(tx, S_KEY_COUNT, keys));
    return versions ? count(tx, S_VERSION_COUNT, versions) : KMS_OK;
}

static kms_err sq_keys_due(struct kms_tx *base, int64_t now, size_t limit,
                           kms_err (*fn)(void *arg, const uint8_t id[KMS_UUID_LEN], int what),
                           void *arg)
{
    struct conn *tx = conn_of(base);
    static const enum stmt which[2] = {S_KEYS_ROTATION_DUE, S_KEYS_DELETION_DUE};
    kms_err rc = KMS_OK;
    for (int w = 0; w < 2 && rc == KMS_OK; w++) {
        sqlite3_stmt *q;
        uint8_t id[KMS_UUID_LEN];
        KMS_GUARD(stmt(tx, which[w], &q));
        sqlite3_bind_int64(q, 1, now);
        sqlite3_bind_int64(q, 2, (sqlite3_int64)limit);
        while (rc == KMS_OK && next_row(tx, q, &rc, "due keys"))
            if (column_id(q, 0, id))
                rc = fn(arg, id, w == 0 ? KMS_DUE_ROTATION : KMS_DUE_DELETION);
        sqlite3_reset(q);
    }
    return rc;
}

/* ---- versions ---- */

static kms_err version_from(sqlite3_stmt *q, struct kms_version_row *r)
{
    const void *w = sqlite3_column_blob(q, 8);
    size_t wn = (size_t)sqlite3_column_bytes(q, 8);
    r->wrapped_len = 0;
    KMS_ENSURE(column_id(q, 0, r->key_id), KMS_ERR_INTERNAL, "a version row without a key id");
    r->vid = (uint32_t)sqlite3_column_int64(q, 1);
    r->n = (uint32_t)sqlite3_column_int64(q, 2);
    r->created = sqlite3_column_int64(q, 3);
    r->rotation = sqlite3_column_int(q, 4);
    r->reserved = (uint64_t)sqlite3_column_int64(q, 5);
    r->bound = (uint64_t)sqlite3_column_int64(q, 6);
    r->root = (uint32_t)sqlite3_column_int64(q, 7);
    KMS_ENSURE(wn <= sizeof r->wrapped, KMS_ERR_INTERNAL, "a wrapped version is too long");
    if (w && wn)
        memcpy(r->wrapped, w, wn);
    r->wrapped_len = wn;
    const void *pk = sqlite3_column_blob(q, 9);
    size_t pn = (size_t)sqlite3_column_bytes(q, 9);
    KMS_ENSURE(pn <= sizeof r->public_key, KMS_ERR_INTERNAL, "a version's public key is too long");
    if (pk && pn)
        memcpy(r->public_key, pk, pn);
    r->public_key_len = pk ? pn : 0;
    return KMS_OK;
}

static kms_err sq_version_get(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], uint32_t vid,
                              struct kms_version_row *out)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_VERSION_GET, &q));
    bind_id(q, 1, key);
    sqlite3_bind_int64(q, 2, vid);
    if (!next_row(tx, q, &rc, "read a version"))
        return rc != KMS_OK ? rc : KMS_ERR_NOT_FOUND;
    rc = version_from(q, out);
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_version_insert(struct kms_tx *base, const struct kms_version_row *r)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_VERSION_INSERT, &q));
    bind_id(q, 1, r->key_id);
    sqlite3_bind_int64(q, 2, r->vid);
    sqlite3_bind_int64(q, 3, r->n);
    sqlite3_bind_int64(q, 4, r->created);
    sqlite3_bind_int(q, 5, r->rotation);
    sqlite3_bind_int64(q, 6, (sqlite3_int64)r->reserved);
    sqlite3_bind_int64(q, 7, (sqlite3_int64)r->bound);
    if (r->root)
        sqlite3_bind_int64(q, 8, r->root);
    else
        sqlite3_bind_null(q, 8);
    if (r->wrapped_len)
        sqlite3_bind_blob(q, 9, r->wrapped, (int)r->wrapped_len, SQLITE_STATIC);
    else
        sqlite3_bind_null(q, 9);
    if (r->public_key_len)
        sqlite3_bind_blob(q, 10, r->public_key, (int)r->public_key_len, SQLITE_STATIC);
    else
        sqlite3_bind_null(q, 10);
    return run(tx, q, "insert a version");
}

static kms_err sq_versions(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                           kms_err (*fn)(void *arg, const struct kms_version_row *r), void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    struct kms_version_row *r = malloc(sizeof *r);
    KMS_ENSURE(r != NULL, KMS_ERR_INTERNAL, "out of memory");
    rc = stmt(tx, S_VERSIONS, &q);
    if (rc == KMS_OK) {
        bind_id(q, 1, key);
        while (rc == KMS_OK && next_row(tx, q, &rc, "read versions")) {
            rc = version_from(q, r);
            if (rc == KMS_OK)
                rc = fn(arg, r);
        }
        sqlite3_reset(q);
    }
    free(r);
    return rc;
}

static kms_err sq_version_max_n(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], uint32_t *out)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_VERSION_MAX_N, &q));
    bind_id(q, 1, key);
    *out = 0;
    if (next_row(tx, q, &rc, "versions"))
        *out = (uint32_t)sqlite3_column_int64(q, 0);
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_reserve(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], uint32_t vid,
                          uint64_t want, uint64_t *granted, uint64_t *reserved)
{
    struct conn *tx = conn_of(base);
    struct kms_version_row *before = malloc(sizeof *before);
    sqlite3_stmt *q;
    kms_err rc;
    KMS_ENSURE(before != NULL, KMS_ERR_INTERNAL, "out of memory");
    rc = sq_version_get(base, key, vid, before);
    if (rc == KMS_OK)
        rc = stmt(tx, S_RESERVE, &q);
    if (rc == KMS_OK) {
        bind_id(q, 1, key);
        sqlite3_bind_int64(q, 2, vid);
        sqlite3_bind_int64(q, 3, (sqlite3_int64)want);
        if (next_row(tx, q, &rc, "reserve uses")) {
            *reserved = (uint64_t)sqlite3_column_int64(q, 0);
            *granted = *reserved - before->reserved;
            rc = run(tx, q, "reserve uses");
        } else if (rc == KMS_OK) {
            rc = KMS_ERR_NOT_FOUND;
        }
    }
    free(before);
    return rc;
}

static kms_err sq_versions_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN])
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_VERSIONS_DELETE, &q));
    bind_id(q, 1, key);
    return run(tx, q, "delete versions");
}

/* ---- aliases ---- */

static kms_err alias_from(sqlite3_stmt *q, struct kms_alias_row *r)
{
    const char *name = (const char *)sqlite3_column_text(q, 0);
    KMS_ENSURE(name && strlen(name) <= KMS_STORE_ALIAS_MAX && column_id(q, 1, r->target),
               KMS_ERR_INTERNAL, "a malformed alias row");
    snprintf(r->name, sizeof r->name, "%s", name);
    r->created = sqlite3_column_int64(q, 2);
    r->updated = sqlite3_column_int64(q, 3);
    return KMS_OK;
}

static kms_err sq_alias_get(struct kms_tx *base, const char *name, struct kms_alias_row *out)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_ALIAS_GET, &q));
    bind_text(q, 1, name);
    if (!next_row(tx, q, &rc, "read an alias"))
        return rc != KMS_OK ? rc : KMS_ERR_NOT_FOUND;
    rc = alias_from(q, out);
    sqlite3_reset(q);
    return rc;
}

static kms_err alias_write(struct conn *tx, enum stmt s, const struct kms_alias_row *r,
                           const char *what)
{
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, s, &q));
    bind_text(q, 1, r->name);
    bind_id(q, 2, r->target);
    sqlite3_bind_int64(q, 3, r->created);
    sqlite3_bind_int64(q, 4, r->updated);
    return run(tx, q, what);
}

static kms_err sq_alias_insert(struct kms_tx *base, const struct kms_alias_row *r)
{
    struct conn *tx = conn_of(base);
    return alias_write(tx, S_ALIAS_INSERT, r, "insert an alias");
}

static kms_err sq_alias_update(struct kms_tx *base, const struct kms_alias_row *r)
{
    struct conn *tx = conn_of(base);
    KMS_GUARD(alias_write(tx, S_ALIAS_UPDATE, r, "update an alias"));
    return sqlite3_changes(tx->db) == 1 ? KMS_OK : KMS_ERR_NOT_FOUND;
}

static kms_err sq_alias_delete(struct kms_tx *base, const char *name)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_ALIAS_DELETE, &q));
    bind_text(q, 1, name);
    KMS_GUARD(run(tx, q, "delete an alias"));
    return sqlite3_changes(tx->db) == 1 ? KMS_OK : KMS_ERR_NOT_FOUND;
}

static kms_err sq_aliases_of_key_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                                        void (*fn)(void *arg, const char *name), void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    if (fn) {
        KMS_GUARD(stmt(tx, S_ALIASES_OF_KEY, &q));
        bind_id(q, 1, key);
        while (next_row(tx, q, &rc, "aliases of a key"))
            fn(arg, (const char *)sqlite3_column_text(q, 0));
        sqlite3_reset(q);
        KMS_GUARD(rc);
    }
    KMS_GUARD(stmt(tx, S_ALIASES_OF_KEY_DELETE, &q));
    bind_id(q, 1, key);
    return run(tx, q, "delete a key's aliases");
}

static kms_err sq_aliases_list(struct kms_tx *base, const char *from, const uint8_t *key,
                               size_t limit,
                               kms_err (*fn)(void *arg, const struct kms_alias_row *r), void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    struct kms_alias_row r;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_ALIASES_LIST, &q));
    bind_text(q, 1, from ? from : "");
    bind_id(q, 2, key);
    sqlite3_bind_int64(q, 3, (sqlite3_int64)limit);
    while (rc == KMS_OK && next_row(tx, q, &rc, "list aliases")) {
        rc = alias_from(q, &r);
        if (rc == KMS_OK)
            rc = fn(arg, &r);
    }
    sqlite3_reset(q);
    return rc;
}

/* ---- grants ---- */

/* A text column into a fixed field; a value too long for it is a malformed row. */
static int text_into(sqlite3_stmt *q, int i, char *out, size_t n)
{
    const char *v = (const char *)sqlite3_column_text(q, i);
    if (!v) {
        out[0] = '\0';
        return 1;
    }
    if ((size_t)sqlite3_column_bytes(q, i) >= n)
        return 0;
    snprintf(out, n, "%s", v);
    return 1;
}

static kms_err grant_from(sqlite3_stmt *q, struct kms_grant_row *r)
{
    KMS_ENSURE(column_id(q, 0, r->key_id) && text_into(q, 1, r->grant_id, sizeof r->grant_id) &&
                   text_into(q, 2, r->name, sizeof r->name) &&
                   text_into(q, 3, r->grantee, sizeof r->grantee) &&
                   text_into(q, 4, r->retiring, sizeof r->retiring) &&
                   text_into(q, 6, r->constraints, sizeof r->constraints) &&
                   text_into(q, 7, r->issuer, sizeof r->issuer),
               KMS_ERR_INTERNAL, "a malformed grant row");
    r->operations = (uint32_t)sqlite3_column_int64(q, 5);
    r->created = sqlite3_column_int64(q, 8);
    return KMS_OK;
}

/* "" is stored as NULL: no name, no retiring principal, no constraints. */
static void bind_optional(sqlite3_stmt *q, int i, const char *s)
{
    bind_text(q, i, s[0] ? s : NULL);
}

static kms_err sq_grant_insert(struct kms_tx *base, const struct kms_grant_row *r)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_GRANT_INSERT, &q));
    bind_id(q, 1, r->key_id);
    bind_text(q, 2, r->grant_id);
    bind_optional(q, 3, r->name);
    bind_text(q, 4, r->grantee);
    bind_optional(q, 5, r->retiring);
    sqlite3_bind_int64(q, 6, r->operations);
    bind_optional(q, 7, r->constraints);
    bind_text(q, 8, r->issuer);
    sqlite3_bind_int64(q, 9, r->created);
    return run(tx, q, "insert a grant");
}

static kms_err sq_grant_get(struct kms_tx *base, const char *grant_id, struct kms_grant_row *out)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_GRANT_GET, &q));
    bind_text(q, 1, grant_id);
    if (!next_row(tx, q, &rc, "read a grant"))
        return rc != KMS_OK ? rc : KMS_ERR_NOT_FOUND;
    rc = grant_from(q, out);
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_grant_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                               const char *grant_id)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_GRANT_DELETE, &q));
    bind_id(q, 1, key);
    bind_text(q, 2, grant_id);
    KMS_GUARD(run(tx, q, "delete a grant"));
    return sqlite3_changes(tx->db) == 1 ? KMS_OK : KMS_ERR_NOT_FOUND;
}

/* Calls fn with each row q answers (bound by the caller). */
static kms_err grants_each(struct conn *tx, sqlite3_stmt *q,
                           kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg)
{
    kms_err rc = KMS_OK;
    struct kms_grant_row *r = malloc(sizeof *r);
    if (!r) {
        sqlite3_reset(q);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    while (rc == KMS_OK && next_row(tx, q, &rc, "read grants")) {
        rc = grant_from(q, r);
        if (rc == KMS_OK)
            rc = fn(arg, r);
    }
    sqlite3_reset(q);
    free(r);
    return rc;
}

static kms_err sq_grants_list(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                              const char *from, size_t limit,
                              kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_GRANTS_LIST, &q));
    bind_id(q, 1, key);
    bind_text(q, 2, from ? from : "");
    sqlite3_bind_int64(q, 3, limit > (size_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)limit);
    return grants_each(tx, q, fn, arg);
}

static kms_err sq_grants_retirable(struct kms_tx *base, const char *retiring, const char *from,
                                   size_t limit,
                                   kms_err (*fn)(void *arg, const struct kms_grant_row *r),
                                   void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_GRANTS_RETIRABLE, &q));
    bind_text(q, 1, retiring);
    bind_text(q, 2, from ? from : "");
    sqlite3_bind_int64(q, 3, limit > (size_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)limit);
    return grants_each(tx, q, fn, arg);
}

static kms_err sq_grants_named(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                               const char *name,
                               kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_GRANTS_NAMED, &q));
    bind_id(q, 1, key);
    bind_text(q, 2, name);
    return grants_each(tx, q, fn, arg);
}

static kms_err sq_grant_count(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], size_t *out)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_GRANT_COUNT, &q));
    bind_id(q, 1, key);
    *out = 0;
    if (next_row(tx, q, &rc, "count grants"))
        *out = (size_t)sqlite3_column_int64(q, 0);
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_grants_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN])
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_GRANTS_DELETE, &q));
    bind_id(q, 1, key);
    return run(tx, q, "delete a key's grants");
}

/* ---- root keys ---- */

static kms_err sq_roots(struct kms_tx *base, kms_err (*fn)(void *arg, const struct kms_root_row *r),
                        void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_ROOTS, &q));
    while (rc == KMS_OK && next_row(tx, q, &rc, "read root keys")) {
        struct kms_root_row r = {0};
        const void *c = sqlite3_column_blob(q, 1);
        const char *label = (const char *)sqlite3_column_text(q, 2);
        if (!c || sqlite3_column_bytes(q, 1) != KMS_ROOT_ID_LEN) {
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "a malformed root key row");
            break;
        }
        r.id = (uint32_t)sqlite3_column_int64(q, 0);
        memcpy(r.cka_id, c, KMS_ROOT_ID_LEN);
        snprintf(r.label, sizeof r.label, "%s", label ? label : "");
        r.created = sqlite3_column_int64(q, 3);
        r.state = sqlite3_column_int(q, 4);
        rc = fn(arg, &r);
    }
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_root_insert(struct kms_tx *base, struct kms_root_row *r)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_ROOT_INSERT, &q));
    sqlite3_bind_blob(q, 1, r->cka_id, KMS_ROOT_ID_LEN, SQLITE_STATIC);
    sqlite3_bind_text(q, 2, r->label, -1, SQLITE_STATIC);
    sqlite3_bind_int64(q, 3, r->created);
    sqlite3_bind_int(q, 4, r->state);
    KMS_GUARD(run(tx, q, "insert a root key"));
    r->id = (uint32_t)sqlite3_last_insert_rowid(tx->db);
    return KMS_OK;
}

/* ---- meta ---- */

static kms_err sq_meta_get(struct kms_tx *base, const char *name, char *out, size_t n)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_META_GET, &q));
    bind_text(q, 1, name);
    if (!next_row(tx, q, &rc, "read a setting"))
        return rc != KMS_OK ? rc : KMS_ERR_NOT_FOUND;
    const char *v = (const char *)sqlite3_column_text(q, 0);
    snprintf(out, n, "%s", v ? v : "");
    sqlite3_reset(q);
    return KMS_OK;
}

static kms_err sq_meta_set(struct kms_tx *base, const char *name, const char *value)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_META_SET, &q));
    bind_text(q, 1, name);
    bind_text(q, 2, value);
    return run(tx, q, "write a setting");
}

/* ---- the audit log's records ---- */

static kms_err sq_change_request(struct kms_tx *base, const char *request_id)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    KMS_GUARD(stmt(tx, S_CHANGE_REQUEST, &q));
    bind_text(q, 1, request_id);
    sqlite3_bind_int64(q, 2, (sqlite3_int64)t.tv_sec);
    return run(tx, q, "record a change's request");
}

static kms_err sq_change_request_find(struct kms_tx *base, const char *request_id, int *found)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_CHANGE_REQUEST_FIND, &q));
    bind_text(q, 1, request_id);
    *found = next_row(tx, q, &rc, "look up a change's request");
    sqlite3_reset(q);
    return rc;
}

static void copy_column(sqlite3_stmt *q, int i, char *out, size_t n)
{
    const char *v = (const char *)sqlite3_column_text(q, i);
    snprintf(out, n, "%s", v ? v : "");
}

static kms_err sq_audit_head_get(struct kms_tx *base, const char *node,
                                 struct kms_audit_head_row *out)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_AUDIT_HEAD_GET, &q));
    bind_text(q, 1, node);
    if (!next_row(tx, q, &rc, "read an audit head"))
        return rc != KMS_OK ? rc : KMS_ERR_NOT_FOUND;
    copy_column(q, 0, out->node, sizeof out->node);
    copy_column(q, 1, out->log, sizeof out->log);
    out->seq = (uint64_t)sqlite3_column_int64(q, 2);
    copy_column(q, 3, out->hash, sizeof out->hash);
    copy_column(q, 4, out->key, sizeof out->key);
    copy_column(q, 5, out->mac, sizeof out->mac);
    out->updated = sqlite3_column_int64(q, 6);
    sqlite3_reset(q);
    return KMS_OK;
}

static kms_err sq_audit_head_put(struct kms_tx *base, const struct kms_audit_head_row *r)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_AUDIT_HEAD_PUT, &q));
    bind_text(q, 1, r->node);
    bind_text(q, 2, r->log);
    sqlite3_bind_int64(q, 3, (sqlite3_int64)r->seq);
    bind_text(q, 4, r->hash);
    bind_text(q, 5, r->key);
    bind_text(q, 6, r->mac);
    sqlite3_bind_int64(q, 7, r->updated);
    return run(tx, q, "write an audit head");
}

/* ---- the change sequence ---- */

static kms_err sq_note_change(struct kms_tx *base, int kind, const uint8_t *id, const char *name)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    struct timespec t;
    clock_gettime(CLOCK_REALTIME, &t);
    KMS_GUARD(stmt(tx, S_NOTE_CHANGE, &q));
    sqlite3_bind_int(q, 1, kind);
    bind_id(q, 2, id);
    bind_text(q, 3, name);
    sqlite3_bind_int64(q, 4, (sqlite3_int64)t.tv_sec);
    return run(tx, q, "record a change");
}

static kms_err seq_of(struct conn *tx, enum stmt s, int64_t *out)
{
    size_t n = 0;
    KMS_GUARD(count(tx, s, &n));
    *out = (int64_t)n;
    return KMS_OK;
}

static kms_err sq_change_head(struct kms_tx *base, int64_t *out)
{
    struct conn *tx = conn_of(base);
    return seq_of(tx, S_CHANGE_HEAD, out);
}

static kms_err sq_change_tail(struct kms_tx *base, int64_t *out)
{
    struct conn *tx = conn_of(base);
    return seq_of(tx, S_CHANGE_TAIL, out);
}

static kms_err sq_changes(struct kms_tx *base, int64_t after, size_t limit,
                          kms_err (*fn)(void *arg, const struct kms_change *c), void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_CHANGES, &q));
    sqlite3_bind_int64(q, 1, after);
    sqlite3_bind_int64(q, 2, (sqlite3_int64)limit);
    while (rc == KMS_OK && next_row(tx, q, &rc, "read changes")) {
        uint8_t id[KMS_UUID_LEN];
        struct kms_change c = {0};
        c.seq = sqlite3_column_int64(q, 0);
        c.kind = sqlite3_column_int(q, 1);
        c.id = column_id(q, 2, id) ? id : NULL;
        c.name = (const char *)sqlite3_column_text(q, 3);
        rc = fn(arg, &c);
    }
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_changes_prune(struct kms_tx *base, int64_t before)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_CHANGES_PRUNE, &q));
    sqlite3_bind_int64(q, 1, before);
    return run(tx, q, "prune changes");
}

/* ---- tags ---- */

static kms_err sq_tag_put(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], const char *tag_key,
                          const char *tag_value)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_TAG_PUT, &q));
    bind_id(q, 1, key);
    bind_text(q, 2, tag_key);
    bind_text(q, 3, tag_value);
    return run(tx, q, "write a tag");
}

static kms_err sq_tag_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                             const char *tag_key)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_TAG_DELETE, &q));
    bind_id(q, 1, key);
    bind_text(q, 2, tag_key);
    KMS_GUARD(run(tx, q, "delete a tag"));
    return sqlite3_changes(tx->db) == 1 ? KMS_OK : KMS_ERR_NOT_FOUND;
}

static kms_err sq_tags_list(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], const char *from,
                            size_t limit,
                            kms_err (*fn)(void *arg, const char *tag_key, const char *tag_value),
                            void *arg)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_TAGS_LIST, &q));
    bind_id(q, 1, key);
    bind_text(q, 2, from ? from : "");
    sqlite3_bind_int64(q, 3, limit > (size_t)INT64_MAX ? INT64_MAX : (sqlite3_int64)limit);
    while (rc == KMS_OK && next_row(tx, q, &rc, "list tags")) {
        const char *k = (const char *)sqlite3_column_text(q, 0);
        const char *v = (const char *)sqlite3_column_text(q, 1);
        rc = k && v ? fn(arg, k, v) : KMS_FAIL(KMS_ERR_INTERNAL, "a malformed tag row");
    }
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_tag_count(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], size_t *out)
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    kms_err rc = KMS_OK;
    KMS_GUARD(stmt(tx, S_TAG_COUNT, &q));
    bind_id(q, 1, key);
    if (next_row(tx, q, &rc, "count tags"))
        *out = (size_t)sqlite3_column_int64(q, 0);
    sqlite3_reset(q);
    return rc;
}

static kms_err sq_tags_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN])
{
    struct conn *tx = conn_of(base);
    sqlite3_stmt *q;
    KMS_GUARD(stmt(tx, S_TAGS_DELETE, &q));
    bind_id(q, 1, key);
    return run(tx, q, "delete a key's tags");
}

const struct kms_store_engine kms_store_sqlite = {
    .open = sq_open,
    .close = sq_close,
    .database_version = sq_database_version,
    .backup = sq_backup,
    .begin = sq_begin,
    .commit = sq_commit,
    .rollback = sq_rollback,
    .key_get = sq_key_get,
    .key_insert = sq_key_insert,
    .key_update = sq_key_update,
    .keys_list = sq_keys_list,
    .key_count = sq_key_count,
    .keys_due = sq_keys_due,
    .version_get = sq_version_get,
    .version_insert = sq_version_insert,
    .versions = sq_versions,
    .version_max_n = sq_version_max_n,
    .reserve = sq_reserve,
    .versions_delete = sq_versions_delete,
    .alias_get = sq_alias_get,
    .alias_insert = sq_alias_insert,
    .alias_update = sq_alias_update,
    .alias_delete = sq_alias_delete,
    .aliases_of_key_delete = sq_aliases_of_key_delete,
    .aliases_list = sq_aliases_list,
    .grant_insert = sq_grant_insert,
    .grant_get = sq_grant_get,
    .grant_delete = sq_grant_delete,
    .grants_list = sq_grants_list,
    .grants_retirable = sq_grants_retirable,
    .grants_named = sq_grants_named,
    .grant_count = sq_grant_count,
    .grants_delete = sq_grants_delete,
    .roots = sq_roots,
    .root_insert = sq_root_insert,
    .meta_get = sq_meta_get,
    .meta_set = sq_meta_set,
    .change_request = sq_change_request,
    .change_request_find = sq_change_request_find,
    .audit_head_get = sq_audit_head_get,
    .audit_head_put = sq_audit_head_put,
    .note_change = sq_note_change,
    .change_head = sq_change_head,
    .change_tail = sq_change_tail,
    .changes = sq_changes,
    .changes_prune = sq_changes_prune,
    /* ---- tags ---- */
    .tag_put = sq_tag_put,
    .tag_delete = sq_tag_delete,
    .tags_list = sq_tags_list,
    .tag_count = sq_tag_count,
    .tags_delete = sq_tags_delete,
};
