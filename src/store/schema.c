/*
 * The database schema as numbered migrations: migration i (from 1) takes a
 * database from schema version i - 1 to i. A migration is never edited once
 * released; a change to the schema is a new one at the end.
 */
#include "config.h"

#include "store/schema.h"

#include <stddef.h>

static const char *const migrations[] = {
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
};

int kms_schema_count(void)
{
    return (int)(sizeof migrations / sizeof migrations[0]);
}

const char *kms_schema_migration(int version)
{
    return version >= 1 && version <= kms_schema_count() ? migrations[version - 1] : NULL;
}
