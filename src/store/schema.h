/* The schema's migrations, shared by every engine (schema.c). */
#ifndef P11KMS_SCHEMA_H
#define P11KMS_SCHEMA_H

/* The number of migrations: the schema version this binary writes. */
int kms_schema_count(void);
/* The SQL that takes schema version - 1 to version (1-based), or NULL. */
const char *kms_schema_migration(int version);

#endif
