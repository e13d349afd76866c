/*
 * The database schema as numbered migrations: migration i (from 1) takes a
 * database from schema version i - 1 to i. A migration is never edited once
 * released; a change to the schema is a new one at the end.
 *
 * Each engine has its own list in its own SQL, with the same numbers and the
 * same logical schema (tables, columns, keys, constraints, indexes): a change
 * is a new migration at the end of both lists. Where the schema version is
 * kept is the engine's (SQLite: PRAGMA user_version; PostgreSQL: the table
 * schema_version, which store_pg.c keeps beside these).
 */
#include "config.h"

#include "store/schema.h"

#include <stddef.h>

static const char *const sqlite_migrations[] = {
    /* 1: keys, versions, aliases, root keys, the change sequence */
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE roots ("
    "  id INTEGER PRIMARY KEY,"
    "  cka_id BLOB NOT NULL UNIQUE,"
    "  label TEXT NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  state INTEGER NOT NULL);"
    "CREATE TABLE keys ("
    "  id BLOB PRIMARY KEY CHECK (length(id) = 16),"
    "  created INTEGER NOT NULL,"
    "  description TEXT NOT NULL,"
    "  state INTEGER NOT NULL CHECK (state BETWEEN 0 AND 3),"
    "  deletion_date INTEGER NOT NULL,"
    "  rotation_enabled INTEGER NOT NULL,"
    "  rotation_days INTEGER NOT NULL,"
    "  rotation_seconds INTEGER NOT NULL,"
    "  next_rotation INTEGER NOT NULL,"
    "  current_vid INTEGER NOT NULL,"
    "  on_demand INTEGER NOT NULL,"
    "  token_resident INTEGER NOT NULL,"
    "  policy TEXT,"
    "  rev INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE INDEX keys_rotation_due ON keys (next_rotation)"
    "  WHERE state = 0 AND rotation_enabled = 1;"
    "CREATE INDEX keys_deletion_due ON keys (deletion_date) WHERE state = 2;"
    "CREATE TABLE versions ("
    "  key_id BLOB NOT NULL REFERENCES keys (id),"
    "  vid INTEGER NOT NULL CHECK (vid BETWEEN 1 AND 4294967295),"
    "  n INTEGER NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  rotation INTEGER NOT NULL,"
    "  reserved INTEGER NOT NULL,"
    "  bound INTEGER NOT NULL,"
    "  root_id INTEGER REFERENCES roots (id),"
    "  wrapped BLOB,"
    "  CHECK (reserved <= bound),"
    "  PRIMARY KEY (key_id, vid),"
    "  UNIQUE (key_id, n)) WITHOUT ROWID;"
    "CREATE TABLE aliases ("
    "  name TEXT PRIMARY KEY,"
    "  target BLOB NOT NULL REFERENCES keys (id),"
    "  created INTEGER NOT NULL,"
    "  updated INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE INDEX aliases_target ON aliases (target);"
    "CREATE TABLE changes ("
    "  seq INTEGER PRIMARY KEY AUTOINCREMENT,"
    "  kind INTEGER NOT NULL,"
    "  key_id BLOB,"
    "  name TEXT,"
    "  at INTEGER NOT NULL);",
    /*
     * 2: the audit log's links to the database. change_requests: the request
     * id of every committed change, written in its transaction, so an intent
     * line of the audit log without its outcome can be settled (committed or
     * not) after a crash. audit_heads: each node's latest audit checkpoint,
     * MAC'd in the token, so a log cut short or a run's file removed is seen.
     */
    "CREATE TABLE change_requests ("
    "  request_id TEXT PRIMARY KEY,"
    "  at INTEGER NOT NULL) WITHOUT ROWID;"
    "CREATE TABLE audit_heads ("
    "  node TEXT PRIMARY KEY,"
    "  log TEXT NOT NULL,"
    "  seq INTEGER NOT NULL,"
    "  hash TEXT NOT NULL,"
    "  key TEXT NOT NULL,"
    "  mac TEXT NOT NULL,"
    "  updated INTEGER NOT NULL) WITHOUT ROWID;",
    /*
     * 3: asymmetric and HMAC keys. key_spec and key_usage are enum
     * kms_key_spec and kms_key_usage (common/keyspec.h), set at creation and
     * never changed; every key made before is SYMMETRIC_DEFAULT for
     * ENCRYPT_DECRYPT (0, 0). public_key: an asymmetric version's DER
     * SubjectPublicKeyInfo, NULL for symmetric and HMAC versions.
     */
    "ALTER TABLE keys ADD COLUMN key_spec INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE keys ADD COLUMN key_usage INTEGER NOT NULL DEFAULT 0;"
    "ALTER TABLE versions ADD COLUMN public_key BLOB;",
    /*
     * 4: grants and tags. A grant belongs to one key and goes with it
     * (deleted in the transaction that destroys the key). grant_id: 64
     * lowercase hex characters, as AWS's; name: CreateGrant's Name (NULL:
     * none), for idempotent retries; grantee and retiring: principal ARNs
     * (retiring NULL: none); operations: a bit set of the grant's operations;
     * constraints: the Constraints object as JSON text (NULL: none); issuer:
     * the principal that created it. A tag is (key, tag key) -> value.
     */
    "CREATE TABLE grants ("
    "  key_id BLOB NOT NULL REFERENCES keys (id),"
    "  grant_id TEXT NOT NULL CHECK (length(grant_id) = 64),"
    "  name TEXT,"
    "  grantee TEXT NOT NULL,"
    "  retiring TEXT,"
    "  operations INTEGER NOT NULL,"
    "  constraints TEXT,"
    "  issuer TEXT NOT NULL,"
    "  created INTEGER NOT NULL,"
    "  PRIMARY KEY (key_id, grant_id)) WITHOUT ROWID;"
    "CREATE UNIQUE INDEX grants_id ON grants (grant_id);"
    "CREATE INDEX grants_grantee ON grants (grantee);"
    "CREATE INDEX grants_retiring ON grants (retiring) WHERE retiring IS NOT NULL;"
    "CREATE TABLE tags ("
    "  key_id BLOB NOT NULL REFERENCES keys (id),"
    "  tag_key TEXT NOT NULL,"
    "  tag_value TEXT NOT NULL,"
    "  PRIMARY KEY (key_id, tag_key)) WITHOUT ROWID;",
};

/*
 * PostgreSQL: BYTEA for BLOB, BIGINT for every INTEGER (SQLite's are 64-bit),
 * BIGSERIAL for the ids SQLite numbers itself. Names compare and sort in the
 * "C" collation, byte by byte as SQLite's BINARY does, whatever the
 * database's default collation is.
 */
static const char *const postgresql_migrations[] = {
    /* 1: keys, versions, aliases, root keys, the change sequence */
    "CREATE TABLE meta (name TEXT COLLATE \"C\" PRIMARY KEY, value TEXT NOT NULL);"
    "CREATE TABLE roots ("
    "  id BIGSERIAL PRIMARY KEY,"
    "  cka_id BYTEA NOT NULL UNIQUE,"
    "  label TEXT NOT NULL,"
    "  created BIGINT NOT NULL,"
    "  state BIGINT NOT NULL);"
    "CREATE TABLE keys ("
    "  id BYTEA PRIMARY KEY CHECK (octet_length(id) = 16),"
    "  created BIGINT NOT NULL,"
    "  description TEXT NOT NULL,"
    "  state BIGINT NOT NULL CHECK (state BETWEEN 0 AND 3),"
    "  deletion_date BIGINT NOT NULL,"
    "  rotation_enabled BIGINT NOT NULL,"
    "  rotation_days BIGINT NOT NULL,"
    "  rotation_seconds BIGINT NOT NULL,"
    "  next_rotation BIGINT NOT NULL,"
    "  current_vid BIGINT NOT NULL,"
    "  on_demand BIGINT NOT NULL,"
    "  token_resident BIGINT NOT NULL,"
    "  policy TEXT,"
    "  rev BIGINT NOT NULL);"
    "CREATE INDEX keys_rotation_due ON keys (next_rotation)"
    "  WHERE state = 0 AND rotation_enabled = 1;"
    "CREATE INDEX keys_deletion_due ON keys (deletion_date) WHERE state = 2;"
    "CREATE TABLE versions ("
    "  key_id BYTEA NOT NULL REFERENCES keys (id),"
    "  vid BIGINT NOT NULL CHECK (vid BETWEEN 1 AND 4294967295),"
    "  n BIGINT NOT NULL,"
    "  created BIGINT NOT NULL,"
    "  rotation BIGINT NOT NULL,"
    "  reserved BIGINT NOT NULL,"
    "  bound BIGINT NOT NULL,"
    "  root_id BIGINT REFERENCES roots (id),"
    "  wrapped BYTEA,"
    "  CHECK (reserved <= bound),"
    "  PRIMARY KEY (key_id, vid),"
    "  UNIQUE (key_id, n));"
    "CREATE TABLE aliases ("
    "  name TEXT COLLATE \"C\" PRIMARY KEY,"
    "  target BYTEA NOT NULL REFERENCES keys (id),"
    "  created BIGINT NOT NULL,"
    "  updated BIGINT NOT NULL);"
    "CREATE INDEX aliases_target ON aliases (target);"
    "CREATE TABLE changes ("
    "  seq BIGSERIAL PRIMARY KEY,"
    "  kind BIGINT NOT NULL,"
    "  key_id BYTEA,"
    "  name TEXT,"
    "  at BIGINT NOT NULL);",
    /* 2: the audit log's links to the database (as SQLite's) */
    "CREATE TABLE change_requests ("
    "  request_id TEXT COLLATE \"C\" PRIMARY KEY,"
    "  at BIGINT NOT NULL);"
    "CREATE TABLE audit_heads ("
    "  node TEXT COLLATE \"C\" PRIMARY KEY,"
    "  log TEXT NOT NULL,"
    "  seq BIGINT NOT NULL,"
    "  hash TEXT NOT NULL,"
    "  key TEXT NOT NULL,"
    "  mac TEXT NOT NULL,"
    "  updated BIGINT NOT NULL);",
    /* 3: asymmetric and HMAC keys (as SQLite's) */
    "ALTER TABLE keys ADD COLUMN key_spec BIGINT NOT NULL DEFAULT 0;"
    "ALTER TABLE keys ADD COLUMN key_usage BIGINT NOT NULL DEFAULT 0;"
    "ALTER TABLE versions ADD COLUMN public_key BYTEA;",
    /* 4: grants and tags (as SQLite's) */
    "CREATE TABLE grants ("
    "  key_id BYTEA NOT NULL REFERENCES keys (id),"
    "  grant_id TEXT COLLATE \"C\" NOT NULL CHECK (length(grant_id) = 64),"
    "  name TEXT COLLATE \"C\","
    "  grantee TEXT COLLATE \"C\" NOT NULL,"
    "  retiring TEXT COLLATE \"C\","
    "  operations BIGINT NOT NULL,"
    "  constraints TEXT,"
    "  issuer TEXT NOT NULL,"
    "  created BIGINT NOT NULL,"
    "  PRIMARY KEY (key_id, grant_id));"
    "CREATE UNIQUE INDEX grants_id ON grants (grant_id);"
    "CREATE INDEX grants_grantee ON grants (grantee);"
    "CREATE INDEX grants_retiring ON grants (retiring) WHERE retiring IS NOT NULL;"
    "CREATE TABLE tags ("
    "  key_id BYTEA NOT NULL REFERENCES keys (id),"
    "  tag_key TEXT COLLATE \"C\" NOT NULL,"
    "  tag_value TEXT NOT NULL,"
    "  PRIMARY KEY (key_id, tag_key));",
};

#define COUNT(a) (int)(sizeof(a) / sizeof(a)[0])

_Static_assert(COUNT(sqlite_migrations) == COUNT(postgresql_migrations),
               "every engine has every migration");

int kms_schema_count(void)
{
    return COUNT(sqlite_migrations);
}

const char *kms_schema_migration(enum kms_schema_dialect dialect, int version)
{
    const char *const *list =
        dialect == KMS_SCHEMA_POSTGRESQL ? postgresql_migrations : sqlite_migrations;
    return version >= 1 && version <= kms_schema_count() ? list[version - 1] : NULL;
}
