/*
 * The PostgreSQL engine of the store (store.h), through libpq, for several
 * nodes on one database (DESIGN §5). The URL is any libpq connection URI
 * (postgresql:// or postgres://, sslmode and the rest as libpq reads them).
 *
 * Connections: a bounded pool of pool_size (8 by default), each made at its
 * first use. A transaction holds one from kms_store_begin to its commit or
 * rollback; a begin that finds none free within timeout_ms fails with
 * KMS_ERR_DEPENDENCY_TIMEOUT. A connection is made through libpq's
 * non-blocking calls under our own deadline, connect_timeout_ms (libpq's
 * connect_timeout counts whole seconds, at least 2, and only in its blocking
 * calls; one in the URL is read as ours; the host name is still resolved
 * blocking). A URL naming several hosts is connected to by libpq's blocking
 * call instead, which gives each host connect_timeout (connect_timeout_ms in
 * whole seconds, at least 2) before it tries the next. Every statement runs
 * under statement_timeout = timeout_ms, so a statement stuck behind a lock or
 * a busy server gives up the way SQLite's busy timeout does, and no answer is
 * waited for longer than timeout_ms + ANSWER_GRACE_MS: past that the server
 * is not answering at all (stopped, wedged, behind a proxy that lost it) and
 * the connection is given up (dropped when it goes back). TCP keepalives
 * and tcp_user_timeout = timeout_ms notice a server that went silent (a
 * partition) while we wait for it. A connection found dead is closed and
 * made again at its next use; a BEGIN that finds its connection dead (the
 * server restarted since) reconnects once, so the store recovers by itself.
 *
 * The change feed (kms_store_wait_change): every transaction that notes a
 * change also runs pg_notify(FEED_CHANNEL), which the server delivers at its
 * commit, to every connection that LISTENs, and to nothing when it rolls
 * back. A store listens on one connection of its own, outside the pool, made
 * at the first wait; the waiting thread polls its socket and an eventfd
 * (kms_store_wake). A lost listener is made again at a later wait, after a
 * backoff, and its first wait then says "changed": notifications sent while
 * nobody listened are gone, the change sequence still has them.
 *
 * Isolation. store.h's contract is that what a write transaction read cannot
 * change under it. Row locks keep it here, not SERIALIZABLE: a write
 * transaction runs at READ COMMITTED and each of its single-row reads (a key,
 * a version, an alias, a setting) is SELECT ... FOR UPDATE. A second writer of
 * the same row waits for the first to commit and then reads what it wrote
 * (two nodes rotating the same due key make one version: the second finds it
 * no longer due) rather than failing with a serialization error its caller
 * would have to retry. The root keys are read as a whole ("none yet: make
 * one"), so a write transaction that reads them locks their table against
 * other writers first. Other lists read in a write transaction (a key's
 * versions, its highest ordinal) lock nothing themselves: the key store
 * writes them only in transactions holding the key's row (kms_key_change,
 * CreateKey's insert). Read transactions are REPEATABLE READ READ ONLY: one
 * snapshot, never waiting for writers.
 *
 * The change sequence. seq is drawn when a change is written, not when it
 * commits: two writers could commit out of seq order and a node reading
 * "changes after N" between the two commits would never see the lower one. So
 * kms_store_note_change takes a transaction-long advisory lock first: changes
 * commit one at a time, in seq order, as under SQLite's single writer.
 *
 * Statements are prepared once per connection; parameters and results travel
 * in binary (bytea as its bytes, BIGINT as 8 bytes big-endian). A unique
 * constraint is INSERT ... ON CONFLICT DO NOTHING, read as
 * KMS_ERR_ALREADY_EXISTS, so the transaction goes on as it does in SQLite;
 * any other failure aborts it, and it can only be rolled back.
 *
 * Errors: unique_violation KMS_ERR_ALREADY_EXISTS; serialization failure,
 * deadlock, lock or statement timeout, shutdown, refused and lost connections
 * KMS_ERR_DEPENDENCY_TIMEOUT; anything else KMS_ERR_INTERNAL. The message the
 * caller gets is ours (it may reach an API client); the server's primary
 * message and SQLSTATE, or libpq's words, go to the log and into the
 * messages of kms_store_open — never the server's DETAIL, which quotes row
 * contents. The URL's password goes to libpq and nowhere else: the store's
 * name is the URL without it.
 */
#include "config.h"

#include <errno.h>
#include <libpq-fe.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "common/log.h"
#include "store/engine.h"
#include "store/schema.h"

#define MAX_PARAMS 16
#define FEED_CHANNEL "p11kms_changes"
/*
 * How much longer than timeout_ms we wait for any answer: the server's
 * statement_timeout ends a slow statement first, with its own words; past
 * this the server is not answering at all (stopped, hung, a proxy in front of
 * a lost one) and the connection is given up.
 */
#define ANSWER_GRACE_MS 250
#define FEED_BACKOFF_MIN_MS 100
#define FEED_BACKOFF_MAX_MS 5000

/* The built-in types' OIDs (pg_type), fixed since PostgreSQL 7. */
enum { OID_BYTEA = 17, OID_INT8 = 20, OID_TEXT = 25 };

/*
 * pg_advisory_xact_lock(LOCK_CLASS, what): 'p1km', and what is locked. The
 * schema's lock serialises two nodes' p11kmsd init; the change sequence's
 * keeps changes committing in seq order.
 */
#define LOCK_CLASS "1882286957"
#define LOCK_SCHEMA "SELECT pg_advisory_xact_lock(" LOCK_CLASS ", 1)"
/* ... and announces the transaction's changes to every listener, at its commit. */
#define LOCK_CHANGES                                              \
    "SELECT pg_advisory_xact_lock(" LOCK_CLASS ", 2), pg_notify(" \
    "'" FEED_CHANNEL "', '')"

enum stmt {
    S_KEY_GET,
    S_KEY_GET_LOCK,
    S_KEY_INSERT,
    S_KEY_UPDATE,
    S_KEYS_LIST,
    S_KEYS_LIST_AFTER,
    S_KEY_COUNT,
    S_VERSION_COUNT,
    S_KEYS_ROTATION_DUE,
    S_KEYS_DELETION_DUE,
    S_VERSION_GET,
    S_VERSION_GET_LOCK,
    S_VERSION_INSERT,
    S_VERSIONS,
    S_VERSION_MAX_N,
    S_RESERVE_LOCK,
    S_RESERVE,
    S_VERSIONS_DELETE,
    S_ALIAS_GET,
    S_ALIAS_GET_LOCK,
    S_ALIAS_INSERT,
    S_ALIAS_UPDATE,
    S_ALIAS_DELETE,
    S_ALIASES_OF_KEY_DELETE,
    S_ALIASES_OF_KEY_DELETE_NAMES,
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
    S_META_GET_LOCK,
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
#define ALIAS_COLUMNS "name, target, created, updated"
#define GRANT_COLUMNS \
    "key_id, grant_id, name, grantee, retiring, operations, constraints, issuer, created"

static const char *const sql[S_COUNT] = {
    [S_KEY_GET] = "SELECT " KEY_COLUMNS " FROM keys WHERE id = $1",
    [S_KEY_GET_LOCK] = "SELECT " KEY_COLUMNS " FROM keys WHERE id = $1 FOR UPDATE",
    [S_KEY_INSERT] = "INSERT INTO keys (" KEY_COLUMNS ") VALUES "
                     "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 1, "
                     "$14, $15) "
                     "ON CONFLICT DO NOTHING",
    [S_KEY_UPDATE] = "UPDATE keys SET description = $3, state = $4, deletion_date = $5, "
                     "rotation_enabled = $6, rotation_days = $7, rotation_seconds = $8, "
                     "next_rotation = $9, current_vid = $10, on_demand = $11, "
                     "token_resident = $12, policy = $13, rev = rev + 1 "
                     "WHERE id = $1 AND rev = $14",
    [S_KEYS_LIST] = "SELECT " KEY_COLUMNS " FROM keys WHERE state <> 3 ORDER BY id LIMIT $1",
    [S_KEYS_LIST_AFTER] = "SELECT " KEY_COLUMNS " FROM keys WHERE state <> 3 AND id >= $2 "
                          "ORDER BY id LIMIT $1",
    [S_KEY_COUNT] = "SELECT count(*) FROM keys WHERE state <> 3",
    [S_VERSION_COUNT] = "SELECT count(*) FROM versions",
    [S_KEYS_ROTATION_DUE] = "SELECT id FROM keys WHERE state = 0 AND rotation_enabled = 1 "
                            "AND token_resident = 0 AND next_rotation <= $1 "
                            "ORDER BY next_rotation LIMIT $2",
    [S_KEYS_DELETION_DUE] = "SELECT id FROM keys WHERE state = 2 AND deletion_date <= $1 "
                            "ORDER BY deletion_date LIMIT $2",
    [S_VERSION_GET] = "SELECT " VERSION_COLUMNS " FROM versions WHERE key_id = $1 AND vid = $2",
    [S_VERSION_GET_LOCK] = "SELECT " VERSION_COLUMNS " FROM versions "
                           "WHERE key_id = $1 AND vid = $2 FOR UPDATE",
    [S_VERSION_INSERT] = "INSERT INTO versions (" VERSION_COLUMNS ") VALUES "
                         "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING",
    [S_VERSIONS] = "SELECT " VERSION_COLUMNS " FROM versions WHERE key_id = $1 ORDER BY n",
    [S_VERSION_MAX_N] = "SELECT coalesce(max(n), 0) FROM versions WHERE key_id = $1",
    [S_RESERVE_LOCK] = "SELECT reserved FROM versions WHERE key_id = $1 AND vid = $2 FOR UPDATE",
    /* least($3, bound) first: a huge request cannot overflow the sum */
    [S_RESERVE] = "UPDATE versions SET reserved = least(bound, reserved + least($3, bound)) "
                  "WHERE key_id = $1 AND vid = $2 RETURNING reserved",
    [S_VERSIONS_DELETE] = "DELETE FROM versions WHERE key_id = $1",
    [S_ALIAS_GET] = "SELECT " ALIAS_COLUMNS " FROM aliases WHERE name = $1",
    [S_ALIAS_GET_LOCK] = "SELECT " ALIAS_COLUMNS " FROM aliases WHERE name = $1 FOR UPDATE",
    [S_ALIAS_INSERT] = "INSERT INTO aliases (" ALIAS_COLUMNS ") VALUES ($1, $2, $3, $4) "
                       "ON CONFLICT DO NOTHING",
    [S_ALIAS_UPDATE] = "UPDATE aliases SET target = $2, updated = $4 WHERE name = $1",
    [S_ALIAS_DELETE] = "DELETE FROM aliases WHERE name = $1",
    [S_ALIASES_OF_KEY_DELETE] = "DELETE FROM aliases WHERE target = $1",
    [S_ALIASES_OF_KEY_DELETE_NAMES] = "WITH gone AS (DELETE FROM aliases WHERE target = $1 "
                                      "RETURNING name) SELECT name FROM gone ORDER BY name",
    [S_ALIASES_LIST] = "SELECT " ALIAS_COLUMNS " FROM aliases "
                       "WHERE name >= $1 AND ($2 IS NULL OR target = $2) ORDER BY name LIMIT $3",
    [S_GRANT_INSERT] = "INSERT INTO grants (" GRANT_COLUMNS ") VALUES "
                       "($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
    [S_GRANT_GET] = "SELECT " GRANT_COLUMNS " FROM grants WHERE grant_id = $1",
    [S_GRANT_DELETE] = "DELETE FROM grants WHERE key_id = $1 AND grant_id = $2",
    [S_GRANTS_LIST] = "SELECT " GRANT_COLUMNS " FROM grants WHERE key_id = $1 AND grant_id >= $2 "
                      "ORDER BY grant_id LIMIT $3",
    [S_GRANTS_RETIRABLE] = "SELECT " GRANT_COLUMNS " FROM grants WHERE retiring = $1 "
                           "AND grant_id >= $2 ORDER BY grant_id LIMIT $3",
    [S_GRANTS_NAMED] = "SELECT " GRANT_COLUMNS " FROM grants WHERE key_id = $1 AND name = $2 "
                       "ORDER BY grant_id",
    [S_GRANT_COUNT] = "SELECT count(*) FROM grants WHERE key_id = $1",
    [S_GRANTS_DELETE] = "DELETE FROM grants WHERE key_id = $1",
    [S_ROOTS] = "SELECT id, cka_id, label, created, state FROM roots ORDER BY id",
    [S_ROOT_INSERT] = "INSERT INTO roots (cka_id, label, created, state) VALUES ($1, $2, $3, $4) "
                      "ON CONFLICT DO NOTHING RETURNING id",
    [S_META_GET] = "SELECT value FROM meta WHERE name = $1",
    [S_META_GET_LOCK] = "SELECT value FROM meta WHERE name = $1 FOR UPDATE",
    [S_META_SET] = "INSERT INTO meta (name, value) VALUES ($1, $2) "
                   "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
    [S_NOTE_CHANGE] = "INSERT INTO changes (kind, key_id, name, at) VALUES ($1, $2, $3, $4)",
    [S_CHANGE_HEAD] = "SELECT coalesce(max(seq), 0) FROM changes",
    [S_CHANGE_TAIL] = "SELECT coalesce(min(seq), 0) FROM changes",
    [S_CHANGES] = "SELECT seq, kind, key_id, name FROM changes WHERE seq > $1 ORDER BY seq "
                  "LIMIT $2",
    [S_CHANGES_PRUNE] = "DELETE FROM changes WHERE at < $1 AND seq < (SELECT max(seq) FROM "
                        "changes)",
    [S_CHANGE_REQUEST] = "INSERT INTO change_requests (request_id, at) VALUES ($1, $2) "
                         "ON CONFLICT DO NOTHING",
    [S_CHANGE_REQUEST_FIND] = "SELECT 1 FROM change_requests WHERE request_id = $1",
    [S_AUDIT_HEAD_GET] = "SELECT node, log, seq, hash, key, mac, updated FROM audit_heads "
                         "WHERE node = $1",
    [S_AUDIT_HEAD_PUT] = "INSERT INTO audit_heads (node, log, seq, hash, key, mac, updated) "
                         "VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (node) DO UPDATE SET "
                         "log = excluded.log, seq = excluded.seq, hash = excluded.hash, "
                         "key = excluded.key, mac = excluded.mac, updated = excluded.updated",
    /* ---- tags ---- */
    [S_TAG_PUT] = "INSERT INTO tags (key_id, tag_key, tag_value) VALUES ($1, $2, $3) "
                  "ON CONFLICT (key_id, tag_key) DO UPDATE SET tag_value = excluded.tag_value",
    [S_TAG_DELETE] = "DELETE FROM tags WHERE key_id = $1 AND tag_key = $2",
    [S_TAGS_LIST] = "SELECT tag_key, tag_value FROM tags WHERE key_id = $1 AND tag_key >= $2 "
                    "ORDER BY tag_key LIMIT $3",
    [S_TAG_COUNT] = "SELECT count(*) FROM tags WHERE key_id = $1",
    [S_TAGS_DELETE] = "DELETE FROM tags WHERE key_id = $1",
};

/* A connection of the pool. */
struct pg_conn {
    PGconn *pg;                      /* NULL: not made yet, or dropped */
    unsigned char prepared[S_COUNT]; /* statements prepared on this connection */
    int hung; /* a statement went unanswered past its deadline: only fit to be dropped */
    struct pg_conn *next_free;
};

/*
 * A thread's transaction handle (its base is the struct kms_tx handed out):
 * made at the thread's first transaction and kept until the store closes, so
 * a finished transaction's handle never points into another's connection.
 */
struct pg_tx {
    struct kms_tx base;
    struct pg_store *st;
    struct pg_conn *c; /* held while a transaction is open, else NULL */
    int write;
    int roots_locked; /* the roots' table lock is held */
    int changes_lock; /* the change sequence's lock is held */
    struct pg_tx *next;
};

/* The change feed's connection and its state: only the waiting thread's (wake_fd aside). */
struct pg_feed {
    struct pg_conn c;    /* listening when c.pg is set */
    int wake_fd;         /* eventfd: kms_store_wake writes, a wait reads */
    int64_t retry_at;    /* CLOCK_MONOTONIC ms: the next try to make c */
    unsigned backoff_ms; /* before the try after a failed one */
    int down;            /* made once and lost (said once in the log) */
};

struct pg_store {
    struct kms_store base; /* its name: the URL without its password */
    char *url;             /* with its password: for libpq only */
    unsigned timeout_ms;
    unsigned connect_timeout_ms;
    unsigned hosts;            /* in the URL: more than one, and libpq connects (blocking) */
    char keepalive_idle[16];   /* seconds, as libpq reads it: the connect timeout's */
    char tcp_user_timeout[16]; /* ms */
    pthread_mutex_t lock;
    pthread_cond_t freed; /* a connection came back to the pool */
    struct pg_conn *conns;
    unsigned nconns;
    struct pg_conn *free;
    struct pg_feed feed;
    pthread_key_t thread; /* this thread's struct pg_tx */
    struct pg_tx *txs;
};

static struct pg_tx *tx_of(struct kms_tx *tx)
{
    return (struct pg_tx *)tx;
}

static struct pg_store *store_of(struct kms_store *st)
{
    return (struct pg_store *)st;
}

/* ---- the URL ---- */

static int hex_digit(char c)
{
    return c >= '0' && c <= '9'   ? c - '0'
           : c >= 'a' && c <= 'f' ? c - 'a' + 10
           : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                  : -1;
}

/*
 * Whether the query parameter p (n bytes, "key=value") holds a secret: the
 * password, or the client key's. libpq percent-decodes keys too, so the key
 * is compared decoded ("pass%77ord" is the password).
 */
static int secret_param(const char *p, size_t n)
{
    char key[16];
    size_t k = 0;
    for (size_t i = 0; i < n && p[i] != '='; i++) {
        char c = p[i];
        if (c == '%' && i + 2 < n && hex_digit(p[i + 1]) >= 0 && hex_digit(p[i + 2]) >= 0) {
            c = (char)(hex_digit(p[i + 1]) * 16 + hex_digit(p[i + 2]));
            i += 2;
        }
        if (k + 1 >= sizeof key)
            return 0; /* longer than any secret's key */
        key[k++] = c;
    }
    key[k] = '\0';
    return strcmp(key, "password") == 0 || strcmp(key, "sslpassword") == 0;
}

/*
 * The URL without its secrets, for logs and messages: the password of its
 * user information (user:password@) and password parameters go; the rest
 * stays as written. NULL when out of memory.
 */
static char *url_redact(const char *url)
{
    size_t n = strlen(url), o = 0;
    char *out = malloc(n + 1);
    if (!out)
        return NULL;
    const char *auth = strstr(url, "://");
    auth = auth ? auth + 3 : url;
    const char *end = auth + strcspn(auth, "/?");
    const char *at = NULL;
    for (const char *p = auth; p < end; p++)
        if (*p == '@')
            at = p;
    memcpy(out, url, (size_t)(auth - url));
    o = (size_t)(auth - url);
    if (at) {
        const char *colon = memchr(auth, ':', (size_t)(at - auth));
        const char *user_end = colon ? colon : at;
        memcpy(out + o, auth, (size_t)(user_end - auth));
        o += (size_t)(user_end - auth);
        auth = at;
    }
    const char *query = strchr(end, '?');
    size_t upto = query ? (size_t)(query - auth) : strlen(auth);
    memcpy(out + o, auth, upto);
    o += upto;
    if (query) {
        char sep = '?';
        for (const char *p = query + 1; *p;) {
            size_t len = strcspn(p, "&");
            if (len && !secret_param(p, len)) {
                out[o++] = sep;
                memcpy(out + o, p, len);
                o += len;
                sep = '&';
            }
            p += len + (p[len] == '&');
        }
    }
    out[o] = '\0';
    return out;
}

/* Whether the URL holds a secret url_redact would drop: user:password@, password=, sslpassword=. */
static int pg_url_has_secret(const char *url)
{
    const char *auth = strstr(url, "://");
    auth = auth ? auth + 3 : url;
    const char *end = auth + strcspn(auth, "/?");
    const char *at = NULL;
    for (const char *p = auth; p < end; p++)
        if (*p == '@')
            at = p;
    if (at && memchr(auth, ':', (size_t)(at - auth)))
        return 1;
    const char *query = strchr(end, '?');
    for (const char *p = query ? query + 1 : NULL; p && *p;) {
        size_t len = strcspn(p, "&");
        if (len && secret_param(p, len))
            return 1;
        p += len + (p[len] == '&');
    }
    return 0;
}

static int64_t mono_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

/* libpq's message on one line, without its trailing newline. */
static void one_line(const char *msg, char *out, size_t n)
{
    size_t o = 0;
    for (const char *p = msg ? msg : ""; *p && o + 1 < n; p++) {
        char c = *p == '\n' || *p == '\t' ? ' ' : *p;
        if (c == ' ' && (o == 0 || out[o - 1] == ' '))
            continue;
        out[o++] = c;
    }
    while (o > 0 && out[o - 1] == ' ')
        o--;
    out[o] = '\0';
}

/* ---- answers ---- */

/*
 * The answer to what was just sent on c (sent: the PQsend* call's result),
 * as PQexec gives it (the first error, else the last result), waited for at
 * most timeout_ms + ANSWER_GRACE_MS. NULL when it did not come in time: c is
 * then hung, and pg_fail says so.
 */
static PGresult *answer(struct pg_store *st, struct pg_conn *c, int sent)
{
    PGconn *pg = c->pg;
    PGresult *last = NULL, *error = NULL, *r;
    int64_t deadline = mono_ms() + st->timeout_ms + ANSWER_GRACE_MS;
    if (!sent)
        return NULL; /* libpq's words in PQerrorMessage */
    for (;;) {
        while (PQisBusy(pg)) {
            int64_t left = deadline - mono_ms();
            struct pollfd p = {PQsocket(pg), POLLIN, 0};
            int n = left <= 0 ? 0 : poll(&p, 1, left > 60000 ? 60000 : (int)left);
            if ((left <= 0 || n < 0) && (left <= 0 || errno != EINTR)) {
                c->hung = 1; /* mid-answer: only fit to be dropped */
                PQclear(last);
                PQclear(error);
                return NULL;
            }
            if (n > 0 && !PQconsumeInput(pg))
                break; /* lost: PQgetResult answers with the error at once */
        }
        if ((r = PQgetResult(pg)) == NULL)
            break;
        ExecStatusType x = PQresultStatus(r);
        if (x == PGRES_FATAL_ERROR || x == PGRES_NONFATAL_ERROR || x == PGRES_BAD_RESPONSE) {
            if (error)
                PQclear(r);
            else
                error = r;
        } else {
            PQclear(last);
            last = r;
        }
        if (PQstatus(pg) != CONNECTION_OK)
            break;
    }
    if (error) {
        PQclear(last);
        return error;
    }
    return last;
}

/* PQexec with answer's deadline. */
static PGresult *exec_text(struct pg_store *st, struct pg_conn *c, const char *text)
{
    return answer(st, c, PQsendQuery(c->pg, text));
}

/* ---- failures ---- */

/* SQLSTATEs worth a retry later: the database was busy, or went away. */
static int transient(const char *state)
{
    static const char *const codes[] = {
        "40001", /* serialization_failure */
        "40P01", /* deadlock_detected */
        "55P03", /* lock_not_available */
        "57014", /* query_canceled: statement_timeout */
        "57P01", /* admin_shutdown */
        "57P02", /* crash_shutdown */
        "57P03", /* cannot_connect_now: starting or stopping */
        "53300", /* too_many_connections */
    };
    if (!state)
        return 0;
    if (strncmp(state, "08", 2) == 0) /* connection_exception and its kind */
        return 1;
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++)
        if (strcmp(state, codes[i]) == 0)
            return 1;
    return 0;
}

/*
 * The error for a failed statement: r (may be NULL) is cleared. words, when
 * given, gets the server's primary message (for open's own messages).
 */
static kms_err pg_fail(struct pg_store *st, struct pg_conn *c, PGresult *r, const char *what,
                       char *words, size_t n)
{
    PGconn *pg = c->pg;
    const char *state = r ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    const char *primary = r ? PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY) : NULL;
    char msg[256];
    kms_err e;
    /*
     * Only the primary message: DETAIL quotes row contents. Without one, the
     * failure is libpq's own (a lost connection), whose words name no row.
     */
    if (c->hung)
        snprintf(msg, sizeof msg, "no answer within %u ms; the connection is dropped",
                 st->timeout_ms + ANSWER_GRACE_MS);
    else
        one_line(primary ? primary : PQerrorMessage(pg), msg, sizeof msg);
    if (words)
        snprintf(words, n, "%s", msg);
    if (c->hung) {
        kms_warn("database %s: %s: %s", st->base.name, what, msg);
        e = KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT, "The key store's database did not answer in time");
    } else if (state && strcmp(state, "23505") == 0) {
        e = KMS_FAIL(KMS_ERR_ALREADY_EXISTS, "The entry already exists");
    } else if (transient(state) || PQstatus(pg) != CONNECTION_OK) {
        kms_warn("database %s: %s: %s (%s)", st->base.name, what, msg,
                 state ? state : "connection lost");
        e = KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT, "The key store's database did not answer in time");
    } else {
        kms_error("database %s: %s: %s (SQLSTATE %s)", st->base.name, what, msg,
                  state ? state : "none");
        e = KMS_FAIL(KMS_ERR_INTERNAL, "The key store's database failed");
    }
    PQclear(r);
    return kms_store_failed(e);
}

/* ---- connections ---- */

/* Server notices (a WARNING at shutdown, ...): their primary message, at debug level. */
static void on_notice(void *arg, const PGresult *r)
{
    struct pg_store *st = arg;
    char msg[256];
    one_line(PQresultErrorField(r, PG_DIAG_MESSAGE_PRIMARY), msg, sizeof msg);
    kms_debug("database %s: %s", st->base.name, msg);
}

static void conn_drop(struct pg_conn *c)
{
    PQfinish(c->pg);
    c->pg = NULL;
    c->hung = 0;
    memset(c->prepared, 0, sizeof c->prepared);
}

enum connect_outcome { CONNECT_MADE, CONNECT_FAILED, CONNECT_TIMED_OUT, CONNECT_WOKEN };

/*
 * Drives a connection libpq has started (PQconnectStartParams) to its end
 * before deadline (CLOCK_MONOTONIC ms). abort_fd, when not -1, readable: give
 * up at once (the feed's wake-up).
 */
static enum connect_outcome connect_drive(PGconn *pg, int64_t deadline, int abort_fd)
{
    PostgresPollingStatusType s = PGRES_POLLING_WRITING; /* libpq's rule for the first round */
    for (;;) {
        if (s == PGRES_POLLING_OK)
            return CONNECT_MADE;
        if (s == PGRES_POLLING_FAILED || PQsocket(pg) < 0)
            return CONNECT_FAILED;
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return CONNECT_TIMED_OUT;
        struct pollfd p[2] = {
            {PQsocket(pg), s == PGRES_POLLING_READING ? POLLIN : POLLOUT, 0},
            {abort_fd, POLLIN, 0},
        };
        int n = poll(p, abort_fd >= 0 ? 2 : 1, left > 60000 ? 60000 : (int)left);
        if (n < 0 && errno != EINTR)
            return CONNECT_FAILED;
        if (n > 0 && abort_fd >= 0 && p[1].revents)
            return CONNECT_WOKEN;
        if (n > 0 && p[0].revents)
            s = PQconnectPoll(pg);
    }
}

/*
 * Makes c's connection, with the settings every connection has, within
 * connect_timeout_ms. A failure is logged with libpq's words (at debug level
 * unless loud) and answered in ours (callers' messages reach API clients);
 * words, when given, gets libpq's (for open's own messages). abort_fd as for
 * connect_drive: *woken (may be NULL) is then set, and nothing logged.
 */
static kms_err conn_make(struct pg_store *st, struct pg_conn *c, char *words, size_t n, int loud,
                         int abort_fd, int *woken)
{
    /*
     * Ours first, then the URL (dbname, expanded): libpq takes the last value
     * of a key, so the URL's own keepalives or tcp_user_timeout win. The
     * statement timeout is the server's; keepalives (idle as long as the
     * connect timeout, then 2 probes 1 s apart) and tcp_user_timeout (data
     * unacknowledged that long) notice a server that went silent, a
     * partition, while we wait for an answer. connect_timeout is for the
     * blocking connect only (below).
     */
    static const char *const keys[] = {"connect_timeout",  "client_encoding",
                                       "application_name", "keepalives",
                                       "keepalives_idle",  "keepalives_interval",
                                       "keepalives_count", "tcp_user_timeout",
                                       "dbname",           NULL};
    const char *values[] = {
        st->keepalive_idle,   "UTF8",  "p11kmsd", "1", st->keepalive_idle, "1", "2",
        st->tcp_user_timeout, st->url, NULL};
    char msg[256], set[64];

    conn_drop(c);
    if (woken)
        *woken = 0;
    enum connect_outcome how = CONNECT_FAILED;
    if (st->hosts > 1) {
        /*
         * Several hosts (a primary and its standbys): libpq's blocking connect
         * gives each host connect_timeout and then tries the next; our
         * deadline, over them all, would spend itself on the first one
         * silent. Whole seconds, and no wake-up.
         */
        c->pg = PQconnectdbParams(keys, values, 1);
        if (c->pg && PQstatus(c->pg) == CONNECTION_OK)
            how = CONNECT_MADE;
    } else {
        c->pg = PQconnectStartParams(keys, values, 1);
        if (c->pg && PQstatus(c->pg) != CONNECTION_BAD)
            how = connect_drive(c->pg, mono_ms() + st->connect_timeout_ms, abort_fd);
    }
    if (how != CONNECT_MADE) {
        if (how == CONNECT_TIMED_OUT)
            snprintf(msg, sizeof msg, "no connection within %u ms", st->connect_timeout_ms);
        else
            one_line(c->pg ? PQerrorMessage(c->pg) : "out of memory", msg, sizeof msg);
        conn_drop(c);
        if (how == CONNECT_WOKEN) {
            if (woken)
                *woken = 1;
            return KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT, "woken while connecting");
        }
        if (loud)
            kms_warn("database %s: cannot connect: %s", st->base.name, msg);
        else
            kms_debug("database %s: cannot connect: %s", st->base.name, msg);
        if (words)
            snprintf(words, n, "%s", msg);
        return KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT,
                        "The key store's database did not answer in time");
    }
    PQsetNoticeReceiver(c->pg, on_notice, st);
    /* The busy timeout's counterpart: no statement waits longer (a lock, a busy server). */
    snprintf(set, sizeof set, "SET statement_timeout = %u", st->timeout_ms);
    PGresult *r = exec_text(st, c, set);
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        kms_err e = pg_fail(st, c, r, "settings", words, n);
        conn_drop(c);
        return e;
    }
    PQclear(r);
    return KMS_OK;
}

/* A connection of the pool, free within timeout_ms; not necessarily made yet. */
static kms_err pool_take(struct pg_store *st, struct pg_conn **out)
{
    struct timespec end;
    int rc = 0;
    clock_gettime(CLOCK_MONOTONIC, &end);
    end.tv_sec += st->timeout_ms / 1000;
    end.tv_nsec += (long)(st->timeout_ms % 1000) * 1000000L;
    if (end.tv_nsec >= 1000000000L) {
        end.tv_sec++;
        end.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&st->lock);
    while (!st->free && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&st->freed, &st->lock, &end);
    struct pg_conn *c = st->free;
    if (c)
        st->free = c->next_free;
    pthread_mutex_unlock(&st->lock);
    if (!c) {
        kms_warn("database %s: all %u connections stayed busy for %u ms", st->base.name, st->nconns,
                 st->timeout_ms);
        return KMS_FAIL(KMS_ERR_DEPENDENCY_TIMEOUT,
                        "The key store's database did not answer in time");
    }
    *out = c;
    return KMS_OK;
}

/* Gives c back; a connection that is dead or still in a transaction is dropped first. */
static void pool_give(struct pg_store *st, struct pg_conn *c)
{
    if (c->pg &&
        (c->hung || PQstatus(c->pg) != CONNECTION_OK || PQtransactionStatus(c->pg) != PQTRANS_IDLE))
        conn_drop(c);
    pthread_mutex_lock(&st->lock);
    c->next_free = st->free;
    st->free = c;
    pthread_cond_signal(&st->freed);
    pthread_mutex_unlock(&st->lock);
}

static kms_err this_thread(struct pg_store *st, struct pg_tx **out)
{
    struct pg_tx *t = pthread_getspecific(st->thread);
    if (!t) {
        t = calloc(1, sizeof *t);
        KMS_ENSURE(t != NULL, KMS_ERR_INTERNAL, "out of memory");
        t->base.engine = &kms_store_pg;
        t->st = st;
        pthread_mutex_lock(&st->lock);
        t->next = st->txs;
        st->txs = t;
        pthread_mutex_unlock(&st->lock);
        pthread_setspecific(st->thread, t);
    }
    *out = t;
    return KMS_OK;
}

/* Runs SQL without parameters or wanted rows on t's connection (BEGIN, LOCK, DDL, ...). */
static kms_err simple(struct pg_tx *t, const char *text, const char *what, char *words, size_t n)
{
    PGresult *r = exec_text(t->st, t->c, text);
    ExecStatusType x = PQresultStatus(r);
    if (x != PGRES_COMMAND_OK && x != PGRES_TUPLES_OK)
        return pg_fail(t->st, t->c, r, what, words, n);
    PQclear(r);
    return KMS_OK;
}

/* ---- statements ---- */

struct params {
    int n;
    const char *values[MAX_PARAMS];
    int lengths[MAX_PARAMS];
    int formats[MAX_PARAMS];
    Oid types[MAX_PARAMS];
    char ints[MAX_PARAMS][8];
};

static void p_int(struct params *p, int64_t v)
{
    int i = p->n++;
    uint64_t u = (uint64_t)v;
    for (int b = 0; b < 8; b++)
        p->ints[i][b] = (char)(u >> (56 - 8 * b));
    p->values[i] = p->ints[i];
    p->lengths[i] = 8;
    p->formats[i] = 1;
    p->types[i] = OID_INT8;
}

/* A count or a limit: a size_t past int64's range is as good as no limit. */
static void p_size(struct params *p, size_t v)
{
    p_int(p, v > (size_t)INT64_MAX ? INT64_MAX : (int64_t)v);
}

/* A bigint NULL. */
static void p_null_int(struct params *p)
{
    p_int(p, 0);
    p->values[p->n - 1] = NULL;
}

/* Bytes as bytea; NULL is SQL NULL. */
static void p_bytes(struct params *p, const void *b, size_t n)
{
    int i = p->n++;
    p->values[i] = b;
    p->lengths[i] = (int)n;
    p->formats[i] = 1;
    p->types[i] = OID_BYTEA;
}

/* Text (text's binary form is its bytes); NULL is SQL NULL. */
static void p_text(struct params *p, const char *s)
{
    int i = p->n++;
    p->values[i] = s;
    p->lengths[i] = s ? (int)strlen(s) : 0;
    p->formats[i] = 1;
    p->types[i] = OID_TEXT;
}

/*
 * Runs statement s with p in t's open transaction; rows come back in binary.
 * On success *out holds the result, which the caller clears.
 */
static kms_err run(struct pg_tx *t, enum stmt s, const struct params *p, PGresult **out,
                   const char *what)
{
    char name[16];
    KMS_ENSURE(t->c != NULL, KMS_ERR_INTERNAL, "no open transaction");
    PGconn *pg = t->c->pg;
    snprintf(name, sizeof name, "p11kms_%d", (int)s);
    if (!t->c->prepared[s]) {
        PGresult *r = answer(t->st, t->c, PQsendPrepare(pg, name, sql[s], p->n, p->types));
        if (PQresultStatus(r) != PGRES_COMMAND_OK)
            return pg_fail(t->st, t->c, r, what, NULL, 0);
        PQclear(r);
        t->c->prepared[s] = 1;
    }
    PGresult *r = answer(t->st, t->c,
                         PQsendQueryPrepared(pg, name, p->n, p->values, p->lengths, p->formats, 1));
    ExecStatusType x = PQresultStatus(r);
    if (x != PGRES_COMMAND_OK && x != PGRES_TUPLES_OK)
        return pg_fail(t->st, t->c, r, what, NULL, 0);
    *out = r;
    return KMS_OK;
}

/* Runs s for its effect; *changed (may be NULL) is the number of rows it wrote. */
static kms_err run_write(struct pg_tx *t, enum stmt s, const struct params *p, long *changed,
                         const char *what)
{
    PGresult *r;
    KMS_GUARD(run(t, s, p, &r, what));
    if (changed)
        *changed = strtol(PQcmdTuples(r), NULL, 10);
    PQclear(r);
    return KMS_OK;
}

/* A BIGINT column of the binary result (every integer column is one). */
static int64_t col_int(const PGresult *r, int row, int col)
{
    const unsigned char *p = (const unsigned char *)PQgetvalue(r, row, col);
    uint64_t v = 0;
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != 8)
        return 0;
    for (int b = 0; b < 8; b++)
        v = v << 8 | p[b];
    return (int64_t)v;
}

static int col_id(const PGresult *r, int row, int col, uint8_t out[KMS_UUID_LEN])
{
    if (PQgetisnull(r, row, col) || PQgetlength(r, row, col) != KMS_UUID_LEN)
        return 0;
    memcpy(out, PQgetvalue(r, row, col), KMS_UUID_LEN);
    return 1;
}

/* A text column, or NULL (libpq ends even binary values with a zero byte). */
static const char *col_text(const PGresult *r, int row, int col)
{
    return PQgetisnull(r, row, col) ? NULL : PQgetvalue(r, row, col);
}

/* The first column of a one-row answer (a count, a max). */
static kms_err one_int(struct pg_tx *t, enum stmt s, const struct params *p, int64_t *out,
                       const char *what)
{
    PGresult *r;
    KMS_GUARD(run(t, s, p, &r, what));
    *out = PQntuples(r) > 0 ? col_int(r, 0, 0) : 0;
    PQclear(r);
    return KMS_OK;
}

/* ---- the schema ---- */

/* The schema version the database holds: 0 when it has none of our tables. */
static kms_err read_version(struct pg_tx *t, int *out, char *words, size_t n)
{
    PGresult *r = exec_text(t->st, t->c, "SELECT to_regclass('schema_version') IS NOT NULL");
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        return pg_fail(t->st, t->c, r, "schema version", words, n);
    int exists = PQntuples(r) == 1 && strcmp(PQgetvalue(r, 0, 0), "t") == 0;
    PQclear(r);
    *out = 0;
    if (!exists)
        return KMS_OK;
    r = exec_text(t->st, t->c, "SELECT max(version) FROM schema_version");
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
        return pg_fail(t->st, t->c, r, "schema version", words, n);
    *out = PQntuples(r) == 1 ? atoi(PQgetvalue(r, 0, 0)) : 0;
    PQclear(r);
    return KMS_OK;
}

/* Runs the migrations after have in t (a write transaction holding the schema's lock). */
static kms_err migrate(struct pg_tx *t, int have, char *words, size_t n)
{
    char text[96];
    if (have == 0)
        KMS_GUARD(simple(t,
                         "CREATE TABLE schema_version (version INTEGER NOT NULL, "
                         "single BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (single));"
                         "INSERT INTO schema_version (version) VALUES (0)",
                         "migration", words, n));
    for (int v = have + 1; v <= kms_schema_count(); v++) {
        KMS_GUARD(simple(t, kms_schema_migration(KMS_SCHEMA_POSTGRESQL, v), "migration", words, n));
        snprintf(text, sizeof text, "UPDATE schema_version SET version = %d", v);
        KMS_GUARD(simple(t, text, "migration", words, n));
    }
    return KMS_OK;
}

static kms_err begin_on(struct pg_store *st, int mode, struct kms_tx **out, char *words, size_t n);
static kms_err pg_commit(struct kms_tx *base);
static void pg_rollback(struct kms_tx *base);

/*
 * Brings the schema to this binary's version (INIT) or checks it is (OPEN).
 * INIT holds the schema's advisory lock while it reads and migrates, so two
 * nodes initialising at once migrate once.
 */
static kms_err schema(struct pg_store *st, int mode)
{
    struct kms_tx *tx;
    char words[256] = "";
    int have = 0;
    kms_err rc =
        begin_on(st, mode == KMS_STORE_INIT ? KMS_TX_WRITE : KMS_TX_READ, &tx, words, sizeof words);
    KMS_ENSURE(rc == KMS_OK || !words[0], rc, "cannot connect to the database %s: %s",
               st->base.name, words);
    KMS_GUARD(rc);
    struct pg_tx *t = tx_of(tx);
    if (mode == KMS_STORE_INIT)
        rc = simple(t, LOCK_SCHEMA, "migration", words, sizeof words);
    if (rc == KMS_OK)
        rc = read_version(t, &have, words, sizeof words);
    if (rc == KMS_OK) {
        words[0] = '\0';
        rc = kms_store_schema_usable(st->base.name, have, mode);
    }
    if (rc == KMS_OK && have < kms_schema_count())
        rc = migrate(t, have, words, sizeof words);
    if (rc == KMS_OK)
        rc = pg_commit(tx);
    pg_rollback(tx);
    if (rc == KMS_OK)
        kms_store_log_migration(st->base.name, have, kms_schema_count());
    if (rc != KMS_OK && words[0])
        rc = KMS_FAIL(rc, "cannot use the database %s: %s", st->base.name, words);
    return rc;
}

/* ---- the database ---- */

static void pg_close(struct kms_store *base)
{
    struct pg_store *st = store_of(base);
    while (st->txs) {
        struct pg_tx *t = st->txs;
        st->txs = t->next;
        free(t);
    }
    for (unsigned i = 0; st->conns && i < st->nconns; i++)
        conn_drop(&st->conns[i]);
    free(st->conns);
    conn_drop(&st->feed.c);
    if (st->feed.wake_fd >= 0)
        close(st->feed.wake_fd);
    pthread_key_delete(st->thread);
    pthread_cond_destroy(&st->freed);
    pthread_mutex_destroy(&st->lock);
    if (st->url)
        explicit_bzero(st->url, strlen(st->url));
    free(st->url);
    free(st->base.name);
    free(st);
}

static kms_err pg_open(const struct kms_store_config *cfg, struct kms_store **out)
{
    PQconninfoOption *opts;
    char *err = NULL;
    pthread_condattr_t ca;

    /* libpq's words about a bad URL may quote it, password and all: ours only. */
    opts = PQconninfoParse(cfg->url, &err);
    PQfreemem(err);
    KMS_ENSURE(opts != NULL, KMS_ERR_VALIDATION,
               "database: not a PostgreSQL connection URI (postgresql://user@host:port/name)");
    /* The URL's connect_timeout (seconds; libpq reads less than 2 as 2) wins over ours. */
    unsigned url_connect_ms = 0, hosts = 1;
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        int sec = o->val && strcmp(o->keyword, "connect_timeout") == 0 ? atoi(o->val) : 0;
        if (sec > 0)
            url_connect_ms = (unsigned)(sec < 2 ? 2 : sec > 600 ? 600 : sec) * 1000u;
        if (o->val && (strcmp(o->keyword, "host") == 0 || strcmp(o->keyword, "hostaddr") == 0)) {
            unsigned n = 1;
            for (const char *p = o->val; *p; p++)
                n += *p == ',';
            hosts = n > hosts ? n : hosts;
        }
    }
    PQconninfoFree(opts);
    struct pg_store *st = calloc(1, sizeof *st);
    KMS_ENSURE(st != NULL, KMS_ERR_INTERNAL, "out of memory");
    st->base.engine = &kms_store_pg;
    st->url = strdup(cfg->url);
    st->base.name = url_redact(cfg->url);
    st->timeout_ms = cfg->timeout_ms ? cfg->timeout_ms : 5000;
    st->connect_timeout_ms = url_connect_ms            ? url_connect_ms
                             : cfg->connect_timeout_ms ? cfg->connect_timeout_ms
                                                       : st->timeout_ms;
    st->nconns = cfg->pool_size ? cfg->pool_size : KMS_STORE_POOL_DEFAULT;
    st->hosts = hosts;
    /* whole seconds, at least libpq's floor of 2 */
    snprintf(st->keepalive_idle, sizeof st->keepalive_idle, "%u",
             st->connect_timeout_ms < 2000 ? 2 : (st->connect_timeout_ms + 999) / 1000);
    snprintf(st->tcp_user_timeout, sizeof st->tcp_user_timeout, "%u", st->timeout_ms);
    st->conns = calloc(st->nconns, sizeof *st->conns);
    st->feed.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    st->feed.backoff_ms = FEED_BACKOFF_MIN_MS;
    pthread_mutex_init(&st->lock, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&st->freed, &ca);
    pthread_condattr_destroy(&ca);
    for (unsigned i = st->nconns; st->conns && i-- > 0;) {
        st->conns[i].next_free = st->free;
        st->free = &st->conns[i];
    }
    if (!st->url || !st->base.name || !st->conns || st->feed.wake_fd < 0 ||
        pthread_key_create(&st->thread, NULL) != 0) {
        pthread_cond_destroy(&st->freed);
        pthread_mutex_destroy(&st->lock);
        if (st->feed.wake_fd >= 0)
            close(st->feed.wake_fd);
        free(st->conns);
        free(st->url);
        free(st->base.name);
        free(st);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    kms_err rc = schema(st, cfg->mode);
    if (rc != KMS_OK) {
        if (kms_err_message()[0] && strstr(kms_err_message(), st->base.name) == NULL)
            rc = KMS_FAIL(rc, "cannot use the database %s: %s", st->base.name, kms_err_message());
        pg_close(&st->base);
        return rc;
    }
    *out = &st->base;
    return KMS_OK;
}

static kms_err pg_database_version(struct kms_store *base, int *out)
{
    struct kms_tx *tx;
    KMS_GUARD(begin_on(store_of(base), KMS_TX_READ, &tx, NULL, 0));
    kms_err rc = read_version(tx_of(tx), out, NULL, 0);
    if (rc == KMS_OK)
        rc = pg_commit(tx);
    pg_rollback(tx);
    return rc;
}

static kms_err pg_backup(struct kms_store *base, const char *path)
{
    (void)path;
    return KMS_FAIL(KMS_ERR_UNSUPPORTED,
                    "the database %s is PostgreSQL: back it up with pg_dump (or WAL archiving "
                    "for point-in-time recovery); p11kmsd backup copies SQLite databases only",
                    base->name);
}

/* ---- transactions ---- */

/* Begins a transaction; words, when given, gets the server's or libpq's words of a failure. */
static kms_err begin_on(struct pg_store *st, int mode, struct kms_tx **out, char *words, size_t n)
{
    struct pg_tx *t = NULL;
    struct pg_conn *c = NULL;
    const char *begin = mode == KMS_TX_WRITE ? "BEGIN ISOLATION LEVEL READ COMMITTED"
                                             : "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY";
    KMS_GUARD(this_thread(st, &t));
    KMS_ENSURE(!t->c, KMS_ERR_INTERNAL, "a transaction is already open on this thread");
    KMS_GUARD(pool_take(st, &c));
    t->c = c;
    kms_err rc = c->pg && PQstatus(c->pg) == CONNECTION_OK
                     ? KMS_OK
                     : conn_make(st, c, words, n, 1, -1, NULL);
    if (rc == KMS_OK) {
        PGresult *r = exec_text(st, c, begin);
        if (PQresultStatus(r) != PGRES_COMMAND_OK && !c->hung && PQstatus(c->pg) != CONNECTION_OK) {
            /* Dropped by the server since its last use (a restart): made again, once. */
            PQclear(r);
            kms_info("database %s: connection lost since its last use; reconnecting",
                     st->base.name);
            rc = conn_make(st, c, words, n, 1, -1, NULL);
            r = rc == KMS_OK ? exec_text(st, c, begin) : NULL;
        }
        if (rc == KMS_OK && PQresultStatus(r) != PGRES_COMMAND_OK)
            rc = pg_fail(st, c, r, "begin", words, n);
        else
            PQclear(r);
    }
    if (rc != KMS_OK) {
        t->c = NULL;
        pool_give(st, c);
        return rc;
    }
    t->write = mode == KMS_TX_WRITE;
    t->roots_locked = 0;
    t->changes_lock = 0;
    *out = &t->base;
    return KMS_OK;
}

static kms_err pg_begin(struct kms_store *base, int mode, struct kms_tx **out)
{
    return begin_on(store_of(base), mode, out, NULL, 0);
}

/* Ends t's hold on its connection (rolled back first if still in a transaction). */
static void release(struct pg_tx *t)
{
    struct pg_conn *c = t->c;
    t->c = NULL;
    if (c->pg && !c->hung && PQstatus(c->pg) == CONNECTION_OK &&
        PQtransactionStatus(c->pg) != PQTRANS_IDLE)
        PQclear(exec_text(t->st, c, "ROLLBACK"));
    pool_give(t->st, c);
}

static kms_err pg_commit(struct kms_tx *base)
{
    struct pg_tx *t = tx_of(base);
    KMS_ENSURE(t->c != NULL, KMS_ERR_INTERNAL, "no transaction to commit");
    PGresult *r = exec_text(t->st, t->c, "COMMIT");
    kms_err rc = KMS_OK;
    if (PQresultStatus(r) != PGRES_COMMAND_OK) {
        /* Lost while committing: the outcome is unknown to us, and failed to the caller. */
        rc = pg_fail(t->st, t->c, r, "commit", NULL, 0);
    } else {
        /* COMMIT of a transaction a statement failed in answers ROLLBACK. */
        int committed = strcmp(PQcmdStatus(r), "COMMIT") == 0;
        PQclear(r);
        if (!committed)
            rc = KMS_FAIL(KMS_ERR_INTERNAL,
                          "The transaction was rolled back: one of its statements failed");
    }
    release(t);
    return rc;
}

static void pg_rollback(struct kms_tx *base)
{
    struct pg_tx *t = tx_of(base);
    if (t->c)
        release(t);
}

/* ---- keys ---- */

static kms_err key_from(const PGresult *r, int row, struct kms_key_row *k)
{
    const char *d = col_text(r, row, 2);
    const char *p = col_text(r, row, 12);
    memset(k, 0, sizeof *k);
    KMS_ENSURE(col_id(r, row, 0, k->id), KMS_ERR_INTERNAL, "a key row without a valid id");
    k->created = col_int(r, row, 1);
    k->description = strdup(d ? d : "");
    KMS_ENSURE(k->description != NULL, KMS_ERR_INTERNAL, "out of memory");
    k->state = (int)col_int(r, row, 3);
    k->deletion_date = col_int(r, row, 4);
    k->rotation_enabled = (int)col_int(r, row, 5);
    k->rotation_days = col_int(r, row, 6);
    k->rotation_seconds = col_int(r, row, 7);
    k->next_rotation = col_int(r, row, 8);
    k->current = (uint32_t)col_int(r, row, 9);
    k->on_demand = (uint32_t)col_int(r, row, 10);
    k->token_resident = (int)col_int(r, row, 11);
    k->rev = col_int(r, row, 13);
    k->spec = (int)col_int(r, row, 14);
    k->usage = (int)col_int(r, row, 15);
    if (p) {
        k->policy = strdup(p);
        KMS_ENSURE(k->policy != NULL, KMS_ERR_INTERNAL, "out of memory");
    }
    return KMS_OK;
}

static void bind_key(struct params *p, const struct kms_key_row *k)
{
    p_bytes(p, k->id, KMS_UUID_LEN);
    p_int(p, k->created);
    p_text(p, k->description ? k->description : "");
    p_int(p, k->state);
    p_int(p, k->deletion_date);
    p_int(p, k->rotation_enabled);
    p_int(p, k->rotation_days);
    p_int(p, k->rotation_seconds);
    p_int(p, k->next_rotation);
    p_int(p, k->current);
    p_int(p, k->on_demand);
    p_int(p, k->token_resident);
    p_text(p, k->policy);
}

static kms_err pg_key_get(struct kms_tx *base, const uint8_t id[KMS_UUID_LEN],
                          struct kms_key_row *out)
{
    struct pg_tx *t = tx_of(base);
    struct params p = {0};
    PGresult *r;
    p_bytes(&p, id, KMS_UUID_LEN);
    KMS_GUARD(run(t, t->write ? S_KEY_GET_LOCK : S_KEY_GET, &p, &r, "read a key"));
    kms_err rc = PQntuples(r) == 1 ? key_from(r, 0, out) : KMS_ERR_NOT_FOUND;
    PQclear(r);
    return rc;
}

static kms_err pg_key_insert(struct kms_tx *base, const struct kms_key_row *k)
{
    struct params p = {0};
    long n = 0;
    bind_key(&p, k);
    p_int(&p, k->spec);
    p_int(&p, k->usage);
    KMS_GUARD(run_write(tx_of(base), S_KEY_INSERT, &p, &n, "insert a key"));
    KMS_ENSURE(n == 1, KMS_ERR_ALREADY_EXISTS, "The entry already exists");
    return KMS_OK;
}

static kms_err pg_key_update(struct kms_tx *base, struct kms_key_row *k)
{
    struct params p = {0};
    long n = 0;
    bind_key(&p, k);
    p_int(&p, k->rev);
    KMS_GUARD(run_write(tx_of(base), S_KEY_UPDATE, &p, &n, "update a key"));
    KMS_ENSURE(n == 1, KMS_ERR_INVALID_STATE, "The key changed meanwhile; try again");
    k->rev++;
    return KMS_OK;
}

static kms_err pg_keys_list(struct kms_tx *base, const uint8_t *from, size_t limit,
                            kms_err (*fn)(void *arg, const struct kms_key_row *r), void *arg)
{
    struct params p = {0};
    struct kms_key_row k = {0};
    PGresult *r;
    p_size(&p, limit);
    if (from)
        p_bytes(&p, from, KMS_UUID_LEN);
    KMS_GUARD(run(tx_of(base), from ? S_KEYS_LIST_AFTER : S_KEYS_LIST, &p, &r, "list keys"));
    kms_err rc = KMS_OK;
    for (int i = 0; rc == KMS_OK && i < PQntuples(r); i++) {
        rc = key_from(r, i, &k);
        if (rc == KMS_OK)
            rc = fn(arg, &k);
        kms_key_row_clear(&k);
    }
    PQclear(r);
    return rc;
}

static kms_err pg_key_count(struct kms_tx *base, size_t *keys, size_t *versions)
{
    struct params p = {0};
    int64_t n = 0;
    KMS_GUARD(one_int(tx_of(base), S_KEY_COUNT, &p, &n, "count"));
    *keys = (size_t)n;
    if (!versions)
        return KMS_OK;
    KMS_GUARD(one_int(tx_of(base), S_VERSION_COUNT, &p, &n, "count"));
    *versions = (size_t)n;
    return KMS_OK;
}

static kms_err pg_keys_due(struct kms_tx *base, int64_t now, size_t limit,
                           kms_err (*fn)(void *arg, const uint8_t id[KMS_UUID_LEN], int what),
                           void *arg)
{
    static const enum stmt which[2] = {S_KEYS_ROTATION_DUE, S_KEYS_DELETION_DUE};
    kms_err rc = KMS_OK;
    for (int w = 0; w < 2 && rc == KMS_OK; w++) {
        struct params p = {0};
        uint8_t id[KMS_UUID_LEN];
        PGresult *r;
        p_int(&p, now);
        p_size(&p, limit);
        KMS_GUARD(run(tx_of(base), which[w], &p, &r, "due keys"));
        for (int i = 0; rc == KMS_OK && i < PQntuples(r); i++)
            if (col_id(r, i, 0, id))
                rc = fn(arg, id, w == 0 ? KMS_DUE_ROTATION : KMS_DUE_DELETION);
        PQclear(r);
    }
    return rc;
}

/* ---- versions ---- */

static kms_err version_from(const PGresult *r, int row, struct kms_version_row *v)
{
    int wn = PQgetisnull(r, row, 8) ? 0 : PQgetlength(r, row, 8);
    v->wrapped_len = 0;
    KMS_ENSURE(col_id(r, row, 0, v->key_id), KMS_ERR_INTERNAL, "a version row without a key id");
    v->vid = (uint32_t)col_int(r, row, 1);
    v->n = (uint32_t)col_int(r, row, 2);
    v->created = col_int(r, row, 3);
    v->rotation = (int)col_int(r, row, 4);
    v->reserved = (uint64_t)col_int(r, row, 5);
    v->bound = (uint64_t)col_int(r, row, 6);
    v->root = (uint32_t)col_int(r, row, 7);
    KMS_ENSURE((size_t)wn <= sizeof v->wrapped, KMS_ERR_INTERNAL, "a wrapped version is too long");
    if (wn)
        memcpy(v->wrapped, PQgetvalue(r, row, 8), (size_t)wn);
    v->wrapped_len = (size_t)wn;
    int pn = PQgetisnull(r, row, 9) ? 0 : PQgetlength(r, row, 9);
    KMS_ENSURE((size_t)pn <= sizeof v->public_key, KMS_ERR_INTERNAL,
               "a version's public key is too long");
    if (pn)
        memcpy(v->public_key, PQgetvalue(r, row, 9), (size_t)pn);
    v->public_key_len = (size_t)pn;
    return KMS_OK;
}

static kms_err pg_version_get(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], uint32_t vid,
                              struct kms_version_row *out)
{
    struct pg_tx *t = tx_of(base);
    struct params p = {0};
    PGresult *r;
    p_bytes(&p, key, KMS_UUID_LEN);
    p_int(&p, vid);
    KMS_GUARD(run(t, t->write ? S_VERSION_GET_LOCK : S_VERSION_GET, &p, &r, "read a version"));
    kms_err rc = PQntuples(r) == 1 ? version_from(r, 0, out) : KMS_ERR_NOT_FOUND;
    PQclear(r);
    return rc;
}

static kms_err pg_version_insert(struct kms_tx *base, const struct kms_version_row *v)
{
    struct params p = {0};
    long n = 0;
    p_bytes(&p, v->key_id, KMS_UUID_LEN);
    p_int(&p, v->vid);
    p_int(&p, v->n);
    p_int(&p, v->created);
    p_int(&p, v->rotation);
    p_int(&p, (int64_t)v->reserved);
    p_int(&p, (int64_t)v->bound);
    if (v->root)
        p_int(&p, v->root);
    else
        p_null_int(&p);
    p_bytes(&p, v->wrapped_len ? v->wrapped : NULL, v->wrapped_len);
    p_bytes(&p, v->public_key_len ? v->public_key : NULL, v->public_key_len);
    KMS_GUARD(run_write(tx_of(base), S_VERSION_INSERT, &p, &n, "insert a version"));
    KMS_ENSURE(n == 1, KMS_ERR_ALREADY_EXISTS, "The entry already exists");
    return KMS_OK;
}

static kms_err pg_versions(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                           kms_err (*fn)(void *arg, const struct kms_version_row *r), void *arg)
{
    struct params p = {0};
    PGresult *r;
    struct kms_version_row *v = malloc(sizeof *v);
    KMS_ENSURE(v != NULL, KMS_ERR_INTERNAL, "out of memory");
    p_bytes(&p, key, KMS_UUID_LEN);
    kms_err rc = run(tx_of(base), S_VERSIONS, &p, &r, "read versions");
    if (rc == KMS_OK) {
        for (int i = 0; rc == KMS_OK && i < PQntuples(r); i++) {
            rc = version_from(r, i, v);
            if (rc == KMS_OK)
                rc = fn(arg, v);
        }
        PQclear(r);
    }
    free(v);
    return rc;
}

static kms_err pg_version_max_n(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], uint32_t *out)
{
    struct params p = {0};
    int64_t n = 0;
    p_bytes(&p, key, KMS_UUID_LEN);
    KMS_GUARD(one_int(tx_of(base), S_VERSION_MAX_N, &p, &n, "versions"));
    *out = (uint32_t)n;
    return KMS_OK;
}

/* The row is locked first: what was reserved before is then exactly what the update starts from. */
static kms_err pg_reserve(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], uint32_t vid,
                          uint64_t want, uint64_t *granted, uint64_t *reserved)
{
    struct pg_tx *t = tx_of(base);
    struct params p = {0};
    PGresult *r;
    p_bytes(&p, key, KMS_UUID_LEN);
    p_int(&p, vid);
    KMS_GUARD(run(t, S_RESERVE_LOCK, &p, &r, "reserve uses"));
    int found = PQntuples(r) == 1;
    uint64_t before = found ? (uint64_t)col_int(r, 0, 0) : 0;
    PQclear(r);
    if (!found)
        return KMS_ERR_NOT_FOUND;
    p_int(&p, want > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)want);
    KMS_GUARD(run(t, S_RESERVE, &p, &r, "reserve uses"));
    found = PQntuples(r) == 1;
    *reserved = found ? (uint64_t)col_int(r, 0, 0) : 0;
    PQclear(r);
    KMS_ENSURE(found, KMS_ERR_INTERNAL, "a locked version went missing");
    *granted = *reserved - before;
    return KMS_OK;
}

static kms_err pg_versions_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN])
{
    struct params p = {0};
    p_bytes(&p, key, KMS_UUID_LEN);
    return run_write(tx_of(base), S_VERSIONS_DELETE, &p, NULL, "delete versions");
}

/* ---- aliases ---- */

static kms_err alias_from(const PGresult *r, int row, struct kms_alias_row *a)
{
    const char *name = col_text(r, row, 0);
    KMS_ENSURE(name && strlen(name) <= KMS_STORE_ALIAS_MAX && col_id(r, row, 1, a->target),
               KMS_ERR_INTERNAL, "a malformed alias row");
    snprintf(a->name, sizeof a->name, "%s", name);
    a->created = col_int(r, row, 2);
    a->updated = col_int(r, row, 3);
    return KMS_OK;
}

static kms_err pg_alias_get(struct kms_tx *base, const char *name, struct kms_alias_row *out)
{
    struct pg_tx *t = tx_of(base);
    struct params p = {0};
    PGresult *r;
    p_text(&p, name);
    KMS_GUARD(run(t, t->write ? S_ALIAS_GET_LOCK : S_ALIAS_GET, &p, &r, "read an alias"));
    kms_err rc = PQntuples(r) == 1 ? alias_from(r, 0, out) : KMS_ERR_NOT_FOUND;
    PQclear(r);
    return rc;
}

static kms_err alias_write(struct kms_tx *base, enum stmt s, const struct kms_alias_row *a,
                           long *changed, const char *what)
{
    struct params p = {0};
    p_text(&p, a->name);
    p_bytes(&p, a->target, KMS_UUID_LEN);
    p_int(&p, a->created);
    p_int(&p, a->updated);
    return run_write(tx_of(base), s, &p, changed, what);
}

static kms_err pg_alias_insert(struct kms_tx *base, const struct kms_alias_row *a)
{
    long n = 0;
    KMS_GUARD(alias_write(base, S_ALIAS_INSERT, a, &n, "insert an alias"));
    KMS_ENSURE(n == 1, KMS_ERR_ALREADY_EXISTS, "The entry already exists");
    return KMS_OK;
}

static kms_err pg_alias_update(struct kms_tx *base, const struct kms_alias_row *a)
{
    long n = 0;
    KMS_GUARD(alias_write(base, S_ALIAS_UPDATE, a, &n, "update an alias"));
    return n == 1 ? KMS_OK : KMS_ERR_NOT_FOUND;
}

static kms_err pg_alias_delete(struct kms_tx *base, const char *name)
{
    struct params p = {0};
    long n = 0;
    p_text(&p, name);
    KMS_GUARD(run_write(tx_of(base), S_ALIAS_DELETE, &p, &n, "delete an alias"));
    return n == 1 ? KMS_OK : KMS_ERR_NOT_FOUND;
}

static kms_err pg_aliases_of_key_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                                        void (*fn)(void *arg, const char *name), void *arg)
{
    struct params p = {0};
    PGresult *r;
    p_bytes(&p, key, KMS_UUID_LEN);
    if (!fn)
        return run_write(tx_of(base), S_ALIASES_OF_KEY_DELETE, &p, NULL, "delete a key's aliases");
    KMS_GUARD(run(tx_of(base), S_ALIASES_OF_KEY_DELETE_NAMES, &p, &r, "delete a key's aliases"));
    for (int i = 0; i < PQntuples(r); i++)
        fn(arg, col_text(r, i, 0));
    PQclear(r);
    return KMS_OK;
}

static kms_err pg_aliases_list(struct kms_tx *base, const char *from, const uint8_t *key,
                               size_t limit,
                               kms_err (*fn)(void *arg, const struct kms_alias_row *r), void *arg)
{
    struct params p = {0};
    struct kms_alias_row a;
    PGresult *r;
    p_text(&p, from ? from : "");
    p_bytes(&p, key, key ? KMS_UUID_LEN : 0);
    p_size(&p, limit);
    KMS_GUARD(run(tx_of(base), S_ALIASES_LIST, &p, &r, "list aliases"));
    kms_err rc = KMS_OK;
    for (int i = 0; rc == KMS_OK && i < PQntuples(r); i++) {
        rc = alias_from(r, i, &a);
        if (rc == KMS_OK)
            rc = fn(arg, &a);
    }
    PQclear(r);
    return rc;
}

/* ---- grants ---- */

/* A text column into a fixed field (NULL: ""); a value too long for it is a malformed row. */
static int text_into(const PGresult *r, int row, int col, char *out, size_t n)
{
    const char *v = col_text(r, row, col);
    if (!v) {
        out[0] = '\0';
        return 1;
    }
    if ((size_t)PQgetlength(r, row, col) >= n)
        return 0;
    snprintf(out, n, "%s", v);
    return 1;
}

static kms_err grant_from(const PGresult *r, int row, struct kms_grant_row *g)
{
    KMS_ENSURE(col_id(r, row, 0, g->key_id) &&
                   text_into(r, row, 1, g->grant_id, sizeof g->grant_id) &&
                   text_into(r, row, 2, g->name, sizeof g->name) &&
                   text_into(r, row, 3, g->grantee, sizeof g->grantee) &&
                   text_into(r, row, 4, g->retiring, sizeof g->retiring) &&
                   text_into(r, row, 6, g->constraints, sizeof g->constraints) &&
                   text_into(r, row, 7, g->issuer, sizeof g->issuer),
               KMS_ERR_INTERNAL, "a malformed grant row");
    g->operations = (uint32_t)col_int(r, row, 5);
    g->created = col_int(r, row, 8);
    return KMS_OK;
}

/* "" is stored as NULL: no name, no retiring principal, no constraints. */
static void p_optional(struct params *p, const char *s)
{
    p_text(p, s[0] ? s : NULL);
}

static kms_err pg_grant_insert(struct kms_tx *base, const struct kms_grant_row *g)
{
    struct params p = {0};
    long n = 0;
    p_bytes(&p, g->key_id, KMS_UUID_LEN);
    p_text(&p, g->grant_id);
    p_optional(&p, g->name);
    p_text(&p, g->grantee);
    p_optional(&p, g->retiring);
    p_int(&p, g->operations);
    p_optional(&p, g->constraints);
    p_text(&p, g->issuer);
    p_int(&p, g->created);
    KMS_GUARD(run_write(tx_of(base), S_GRANT_INSERT, &p, &n, "insert a grant"));
    KMS_ENSURE(n == 1, KMS_ERR_ALREADY_EXISTS, "The entry already exists");
    return KMS_OK;
}

/* Calls fn with each row of r, which it clears. */
static kms_err grants_each(PGresult *r, kms_err (*fn)(void *arg, const struct kms_grant_row *g),
                           void *arg)
{
    kms_err rc = KMS_OK;
    struct kms_grant_row *g = malloc(sizeof *g);
    if (!g) {
        PQclear(r);
        return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
    }
    for (int i = 0; rc == KMS_OK && i < PQntuples(r); i++) {
        rc = grant_from(r, i, g);
        if (rc == KMS_OK)
            rc = fn(arg, g);
    }
    free(g);
    PQclear(r);
    return rc;
}

static kms_err pg_grant_get(struct kms_tx *base, const char *grant_id, struct kms_grant_row *out)
{
    struct params p = {0};
    PGresult *r;
    p_text(&p, grant_id);
    KMS_GUARD(run(tx_of(base), S_GRANT_GET, &p, &r, "read a grant"));
    kms_err rc = PQntuples(r) == 1 ? grant_from(r, 0, out) : KMS_ERR_NOT_FOUND;
    PQclear(r);
    return rc;
}

static kms_err pg_grant_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                               const char *grant_id)
{
    struct params p = {0};
    long n = 0;
    p_bytes(&p, key, KMS_UUID_LEN);
    p_text(&p, grant_id);
    KMS_GUARD(run_write(tx_of(base), S_GRANT_DELETE, &p, &n, "delete a grant"));
    return n == 1 ? KMS_OK : KMS_ERR_NOT_FOUND;
}

static kms_err pg_grants_list(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                              const char *from, size_t limit,
                              kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg)
{
    struct params p = {0};
    PGresult *r;
    p_bytes(&p, key, KMS_UUID_LEN);
    p_text(&p, from ? from : "");
    p_size(&p, limit);
    KMS_GUARD(run(tx_of(base), S_GRANTS_LIST, &p, &r, "list grants"));
    return grants_each(r, fn, arg);
}

static kms_err pg_grants_retirable(struct kms_tx *base, const char *retiring, const char *from,
                                   size_t limit,
                                   kms_err (*fn)(void *arg, const struct kms_grant_row *r),
                                   void *arg)
{
    struct params p = {0};
    PGresult *r;
    p_text(&p, retiring);
    p_text(&p, from ? from : "");
    p_size(&p, limit);
    KMS_GUARD(run(tx_of(base), S_GRANTS_RETIRABLE, &p, &r, "list retirable grants"));
    return grants_each(r, fn, arg);
}

static kms_err pg_grants_named(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                               const char *name,
                               kms_err (*fn)(void *arg, const struct kms_grant_row *r), void *arg)
{
    struct params p = {0};
    PGresult *r;
    p_bytes(&p, key, KMS_UUID_LEN);
    p_text(&p, name);
    KMS_GUARD(run(tx_of(base), S_GRANTS_NAMED, &p, &r, "read named grants"));
    return grants_each(r, fn, arg);
}

static kms_err pg_grant_count(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], size_t *out)
{
    struct params p = {0};
    int64_t n = 0;
    p_bytes(&p, key, KMS_UUID_LEN);
    KMS_GUARD(one_int(tx_of(base), S_GRANT_COUNT, &p, &n, "count grants"));
    *out = (size_t)n;
    return KMS_OK;
}

static kms_err pg_grants_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN])
{
    struct params p = {0};
    p_bytes(&p, key, KMS_UUID_LEN);
    return run_write(tx_of(base), S_GRANTS_DELETE, &p, NULL, "delete a key's grants");
}

/* ---- root keys ---- */

static kms_err pg_roots(struct kms_tx *base, kms_err (*fn)(void *arg, const struct kms_root_row *r),
                        void *arg)
{
    struct pg_tx *t = tx_of(base);
    struct params p = {0};
    PGresult *r;
    /*
     * A write transaction reads the roots to decide on adding one: no other
     * writer may add one before it commits. The lock is taken before the
     * read, whose snapshot then includes what the last holder committed.
     */
    if (t->write && !t->roots_locked) {
        KMS_ENSURE(t->c != NULL, KMS_ERR_INTERNAL, "no open transaction");
        KMS_GUARD(
            simple(t, "LOCK TABLE roots IN SHARE ROW EXCLUSIVE MODE", "read root keys", NULL, 0));
        t->roots_locked = 1;
    }
    KMS_GUARD(run(t, S_ROOTS, &p, &r, "read root keys"));
    kms_err rc = KMS_OK;
    for (int i = 0; rc == KMS_OK && i < PQntuples(r); i++) {
        struct kms_root_row root = {0};
        const char *label = col_text(r, i, 2);
        if (PQgetisnull(r, i, 1) || PQgetlength(r, i, 1) != KMS_ROOT_ID_LEN) {
            rc = KMS_FAIL(KMS_ERR_INTERNAL, "a malformed root key row");
            break;
        }
        root.id = (uint32_t)col_int(r, i, 0);
        memcpy(root.cka_id, PQgetvalue(r, i, 1), KMS_ROOT_ID_LEN);
        snprintf(root.label, sizeof root.label, "%s", label ? label : "");
        root.created = col_int(r, i, 3);
        root.state = (int)col_int(r, i, 4);
        rc = fn(arg, &root);
    }
    PQclear(r);
    return rc;
}

static kms_err pg_root_insert(struct kms_tx *base, struct kms_root_row *root)
{
    struct params p = {0};
    PGresult *r;
    p_bytes(&p, root->cka_id, KMS_ROOT_ID_LEN);
    p_text(&p, root->label);
    p_int(&p, root->created);
    p_int(&p, root->state);
    KMS_GUARD(run(tx_of(base), S_ROOT_INSERT, &p, &r, "insert a root key"));
    int made = PQntuples(r) == 1;
    if (made)
        root->id = (uint32_t)col_int(r, 0, 0);
    PQclear(r);
    KMS_ENSURE(made, KMS_ERR_ALREADY_EXISTS, "The entry already exists");
    return KMS_OK;
}

/* ---- meta ---- */

static kms_err pg_meta_get(struct kms_tx *base, const char *name, char *out, size_t n)
{
    struct pg_tx *t = tx_of(base);
    struct params p = {0};
    PGresult *r;
    p_text(&p, name);
    KMS_GUARD(run(t, t->write ? S_META_GET_LOCK : S_META_GET, &p, &r, "read a setting"));
    int found = PQntuples(r) == 1;
    if (found) {
        const char *v = col_text(r, 0, 0);
        snprintf(out, n, "%s", v ? v : "");
    }
    PQclear(r);
    return found ? KMS_OK : KMS_ERR_NOT_FOUND;
}

static kms_err pg_meta_set(struct kms_tx *base, const char *name, const char *value)
{
    struct params p = {0};
    p_text(&p, name);
    p_text(&p, value);
    return run_write(tx_of(base), S_META_SET, &p, NULL, "write a setting");
}

/* ---- the audit log's records ---- */

static kms_err pg_change_request(struct kms_tx *base, const char *request_id)
{
    struct params p = {0};
    struct timespec now;
    long n = 0;
    clock_gettime(CLOCK_REALTIME, &now);
    p_text(&p, request_id);
    p_int(&p, (int64_t)now.tv_sec);
    KMS_GUARD(run_write(tx_of(base), S_CHANGE_REQUEST, &p, &n, "record a change's request"));
    KMS_ENSURE(n == 1, KMS_ERR_ALREADY_EXISTS, "The entry already exists");
    return KMS_OK;
}

static kms_err pg_change_request_find(struct kms_tx *base, const char *request_id, int *found)
{
    struct params p = {0};
    PGresult *r;
    p_text(&p, request_id);
    KMS_GUARD(run(tx_of(base), S_CHANGE_REQUEST_FIND, &p, &r, "look up a change's request"));
    *found = PQntuples(r) == 1;
    PQclear(r);
    return KMS_OK;
}

static void copy_col(const PGresult *r, int col, char *out, size_t n)
{
    const char *v = col_text(r, 0, col);
    snprintf(out, n, "%s", v ? v : "");
}

static kms_err pg_audit_head_get(struct kms_tx *base, const char *node,
                                 struct kms_audit_head_row *out)
{
    struct params p = {0};
    PGresult *r;
    p_text(&p, node);
    KMS_GUARD(run(tx_of(base), S_AUDIT_HEAD_GET, &p, &r, "read an audit head"));
    int found = PQntuples(r) == 1;
    if (found) {
        copy_col(r, 0, out->node, sizeof out->node);
        copy_col(r, 1, out->log, sizeof out->log);
        out->seq = (uint64_t)col_int(r, 0, 2);
        copy_col(r, 3, out->hash, sizeof out->hash);
        copy_col(r, 4, out->key, sizeof out->key);
        copy_col(r, 5, out->mac, sizeof out->mac);
        out->updated = col_int(r, 0, 6);
    }
    PQclear(r);
    return found ? KMS_OK : KMS_ERR_NOT_FOUND;
}

static kms_err pg_audit_head_put(struct kms_tx *base, const struct kms_audit_head_row *r)
{
    struct params p = {0};
    p_text(&p, r->node);
    p_text(&p, r->log);
    p_int(&p, (int64_t)r->seq);
    p_text(&p, r->hash);
    p_text(&p, r->key);
    p_text(&p, r->mac);
    p_int(&p, r->updated);
    return run_write(tx_of(base), S_AUDIT_HEAD_PUT, &p, NULL, "write an audit head");
}

/* ---- the change sequence ---- */

static kms_err pg_note_change(struct kms_tx *base, int kind, const uint8_t *id, const char *name)
{
    struct pg_tx *t = tx_of(base);
    struct params p = {0};
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    if (!t->changes_lock) {
        KMS_ENSURE(t->c != NULL, KMS_ERR_INTERNAL, "no open transaction");
        KMS_GUARD(simple(t, LOCK_CHANGES, "record a change", NULL, 0));
        t->changes_lock = 1;
    }
    p_int(&p, kind);
    p_bytes(&p, id, id ? KMS_UUID_LEN : 0);
    p_text(&p, name);
    p_int(&p, (int64_t)now.tv_sec);
    return run_write(t, S_NOTE_CHANGE, &p, NULL, "record a change");
}

static kms_err pg_change_head(struct kms_tx *base, int64_t *out)
{
    struct params p = {0};
    return one_int(tx_of(base), S_CHANGE_HEAD, &p, out, "read changes");
}

static kms_err pg_change_tail(struct kms_tx *base, int64_t *out)
{
    struct params p = {0};
    return one_int(tx_of(base), S_CHANGE_TAIL, &p, out, "read changes");
}

static kms_err pg_changes(struct kms_tx *base, int64_t after, size_t limit,
                          kms_err (*fn)(void *arg, const struct kms_change *c), void *arg)
{
    struct params p = {0};
    PGresult *r;
    p_int(&p, after);
    p_size(&p, limit);
    KMS_GUARD(run(tx_of(base), S_CHANGES, &p, &r, "read changes"));
    kms_err rc = KMS_OK;
    for (int i = 0; rc == KMS_OK && i < PQntuples(r); i++) {
        uint8_t id[KMS_UUID_LEN];
        struct kms_change c = {0};
        c.seq = col_int(r, i, 0);
        c.kind = (int)col_int(r, i, 1);
        c.id = col_id(r, i, 2, id) ? id : NULL;
        c.name = col_text(r, i, 3);
        rc = fn(arg, &c);
    }
    PQclear(r);
    return rc;
}

static kms_err pg_changes_prune(struct kms_tx *base, int64_t before)
{
    struct params p = {0};
    p_int(&p, before);
    return run_write(tx_of(base), S_CHANGES_PRUNE, &p, NULL, "prune changes");
}

/* ---- tags ---- */

static kms_err pg_tag_put(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], const char *tag_key,
                          const char *tag_value)
{
    struct params p = {0};
    p_bytes(&p, key, KMS_UUID_LEN);
    p_text(&p, tag_key);
    p_text(&p, tag_value);
    return run_write(tx_of(base), S_TAG_PUT, &p, NULL, "write a tag");
}

static kms_err pg_tag_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN],
                             const char *tag_key)
{
    struct params p = {0};
    long n = 0;
    p_bytes(&p, key, KMS_UUID_LEN);
    p_text(&p, tag_key);
    KMS_GUARD(run_write(tx_of(base), S_TAG_DELETE, &p, &n, "delete a tag"));
    return n == 1 ? KMS_OK : KMS_ERR_NOT_FOUND;
}

static kms_err pg_tags_list(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], const char *from,
                            size_t limit,
                            kms_err (*fn)(void *arg, const char *tag_key, const char *tag_value),
                            void *arg)
{
    struct params p = {0};
    PGresult *r;
    p_bytes(&p, key, KMS_UUID_LEN);
    p_text(&p, from ? from : "");
    p_size(&p, limit);
    KMS_GUARD(run(tx_of(base), S_TAGS_LIST, &p, &r, "list tags"));
    kms_err rc = KMS_OK;
    for (int i = 0; rc == KMS_OK && i < PQntuples(r); i++) {
        const char *k = col_text(r, i, 0), *v = col_text(r, i, 1);
        rc = k && v ? fn(arg, k, v) : KMS_FAIL(KMS_ERR_INTERNAL, "a malformed tag row");
    }
    PQclear(r);
    return rc;
}

static kms_err pg_tag_count(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN], size_t *out)
{
    struct params p = {0};
    int64_t n = 0;
    p_bytes(&p, key, KMS_UUID_LEN);
    KMS_GUARD(one_int(tx_of(base), S_TAG_COUNT, &p, &n, "count tags"));
    *out = (size_t)n;
    return KMS_OK;
}

static kms_err pg_tags_delete(struct kms_tx *base, const uint8_t key[KMS_UUID_LEN])
{
    struct params p = {0};
    p_bytes(&p, key, KMS_UUID_LEN);
    return run_write(tx_of(base), S_TAGS_DELETE, &p, NULL, "delete a key's tags");
}

/* ---- the change feed ---- */

/* Takes the notifications libpq has read; 1 when there was one. */
static int feed_drain(struct pg_feed *f)
{
    int any = 0;
    PGnotify *n;
    while ((n = PQnotifies(f->c.pg)) != NULL) {
        any = 1;
        PQfreemem(n);
    }
    return any;
}

/* The listening connection is gone: made again after the shortest backoff. */
static void feed_lost(struct pg_store *st, const char *why)
{
    struct pg_feed *f = &st->feed;
    char msg[256];
    one_line(why, msg, sizeof msg);
    conn_drop(&f->c);
    f->backoff_ms = FEED_BACKOFF_MIN_MS;
    f->retry_at = mono_ms() + f->backoff_ms;
    if (!f->down)
        kms_warn("database %s: the change feed's connection was lost (%s); reading the change "
                 "sequence on the timer until it is back",
                 st->base.name, msg[0] ? msg : "connection closed");
    f->down = 1;
}

/*
 * Makes the listening connection: KMS_OK and listening, or a failure with
 * the next try scheduled (*woken: kms_store_wake interrupted it).
 */
static kms_err feed_make(struct pg_store *st, int *woken)
{
    struct pg_feed *f = &st->feed;
    kms_err rc = conn_make(st, &f->c, NULL, 0, !f->down && f->retry_at == 0, f->wake_fd, woken);
    if (rc == KMS_OK) {
        PGresult *r = exec_text(st, &f->c, "LISTEN " FEED_CHANNEL);
        if (PQresultStatus(r) != PGRES_COMMAND_OK) {
            rc = pg_fail(st, &f->c, r, "listen for changes", NULL, 0);
            conn_drop(&f->c);
        } else {
            PQclear(r);
        }
    }
    if (rc == KMS_OK) {
        if (f->down)
            kms_info("database %s: the change feed is back", st->base.name);
        f->down = 0;
        f->backoff_ms = FEED_BACKOFF_MIN_MS;
        return KMS_OK;
    }
    if (!*woken) {
        f->down = 1;
        f->retry_at = mono_ms() + f->backoff_ms;
        f->backoff_ms =
            f->backoff_ms * 2 > FEED_BACKOFF_MAX_MS ? FEED_BACKOFF_MAX_MS : f->backoff_ms * 2;
    }
    return rc;
}

static kms_err pg_wait_change(struct kms_store *base, unsigned timeout_ms, int *changed)
{
    struct pg_store *st = store_of(base);
    struct pg_feed *f = &st->feed;
    int64_t end = mono_ms() + timeout_ms;
    *changed = 0;
    for (;;) {
        int64_t now = mono_ms();
        if (!f->c.pg && now >= f->retry_at) {
            int woken = 0;
            if (feed_make(st, &woken) == KMS_OK) {
                /* What was announced while nobody listened is gone: read the sequence. */
                *changed = 1;
                return KMS_OK;
            }
            kms_err_clear();
            if (woken)
                return KMS_OK;
            now = mono_ms();
        }
        if (f->c.pg && feed_drain(f)) {
            *changed = 1;
            return KMS_OK;
        }
        int64_t until = f->c.pg || f->retry_at > end ? end : f->retry_at;
        if (now >= end)
            return KMS_OK;
        struct pollfd p[2] = {{f->wake_fd, POLLIN, 0},
                              {f->c.pg ? PQsocket(f->c.pg) : -1, POLLIN, 0}};
        int left = until - now > 60000 ? 60000 : (int)(until - now);
        int n = poll(p, 2, left > 0 ? left : 0);
        if (n < 0 && errno != EINTR)
            return KMS_FAIL(KMS_ERR_INTERNAL, "waiting for the change feed failed: %s",
                            strerror(errno));
        if (n > 0 && p[0].revents) {
            uint64_t count;
            if (read(f->wake_fd, &count, sizeof count) < 0) {
                /* nothing to read: another wait took it; either way, return */
            }
            return KMS_OK;
        }
        if (n > 0 && p[1].revents && f->c.pg) {
            if (!PQconsumeInput(f->c.pg) || PQstatus(f->c.pg) != CONNECTION_OK)
                feed_lost(st, PQerrorMessage(f->c.pg));
            else if (feed_drain(f)) {
                *changed = 1;
                return KMS_OK;
            }
        }
    }
}

static void pg_wake(struct kms_store *base)
{
    uint64_t one = 1;
    if (write(store_of(base)->feed.wake_fd, &one, sizeof one) < 0) {
        /* the counter is full: a wake-up is pending anyway */
    }
}

const struct kms_store_engine kms_store_pg = {
    .open = pg_open,
    .close = pg_close,
    .database_version = pg_database_version,
    .backup = pg_backup,
    .begin = pg_begin,
    .commit = pg_commit,
    .rollback = pg_rollback,
    .key_get = pg_key_get,
    .key_insert = pg_key_insert,
    .key_update = pg_key_update,
    .keys_list = pg_keys_list,
    .key_count = pg_key_count,
    .keys_due = pg_keys_due,
    .version_get = pg_version_get,
    .version_insert = pg_version_insert,
    .versions = pg_versions,
    .version_max_n = pg_version_max_n,
    .reserve = pg_reserve,
    .versions_delete = pg_versions_delete,
    .alias_get = pg_alias_get,
    .alias_insert = pg_alias_insert,
    .alias_update = pg_alias_update,
    .alias_delete = pg_alias_delete,
    .aliases_of_key_delete = pg_aliases_of_key_delete,
    .aliases_list = pg_aliases_list,
    .grant_insert = pg_grant_insert,
    .grant_get = pg_grant_get,
    .grant_delete = pg_grant_delete,
    .grants_list = pg_grants_list,
    .grants_retirable = pg_grants_retirable,
    .grants_named = pg_grants_named,
    .grant_count = pg_grant_count,
    .grants_delete = pg_grants_delete,
    .roots = pg_roots,
    .root_insert = pg_root_insert,
    .meta_get = pg_meta_get,
    .meta_set = pg_meta_set,
    .change_request = pg_change_request,
    .change_request_find = pg_change_request_find,
    .audit_head_get = pg_audit_head_get,
    .audit_head_put = pg_audit_head_put,
    .note_change = pg_note_change,
    .change_head = pg_change_head,
    .change_tail = pg_change_tail,
    .changes = pg_changes,
    .changes_prune = pg_changes_prune,
    .wait_change = pg_wait_change,
    .wake = pg_wake,
    .url_has_secret = pg_url_has_secret,
    /* ---- tags ---- */
    .tag_put = pg_tag_put,
    .tag_delete = pg_tag_delete,
    .tags_list = pg_tags_list,
    .tag_count = pg_tag_count,
    .tags_delete = pg_tags_delete,
};
