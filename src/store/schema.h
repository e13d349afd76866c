/* The schema's migrations, one list per engine with the same numbers (schema.c). */
#ifndef P11KMS_SCHEMA_H
#define P11KMS_SCHEMA_H

/* The SQL each engine speaks. */
enum kms_schema_dialect { KMS_SCHEMA_SQLITE, KMS_SCHEMA_POSTGRESQL };

/* The number of migrations: the schema version this binary writes. */
int kms_schema_count(void);
/* The SQL that takes schema version - 1 to version (1-based) in dialect, or NULL. */
const char *kms_schema_migration(enum kms_schema_dialect dialect, int version);

#endif
