/*
 * The state machines of keys and aliases as record kinds (record.h): how each
 * change applies to an entity's state. Pure functions of (state, change), so
 * every node merging the same records reaches the same state.
 */
#ifndef P11KMS_MODEL_H
#define P11KMS_MODEL_H

#include "keystore/record.h"

extern const struct kms_record_kind kms_key_kind;
extern const struct kms_record_kind kms_alias_kind;

/* Key states as stored; "Destroyed" marks a key whose objects are being removed. */
#define KMS_STATE_ENABLED "Enabled"
#define KMS_STATE_DISABLED "Disabled"
#define KMS_STATE_PENDING "PendingDeletion"
#define KMS_STATE_DESTROYED "Destroyed"

/* Why a version was made: the rotation types ListKeyRotations reports. */
#define KMS_ROTATE_SCHEDULE "schedule" /* AUTOMATIC, on the rotation period */
#define KMS_ROTATE_USAGE "usage"       /* AUTOMATIC, the current version reached its bound */
#define KMS_ROTATE_DEMAND "demand"     /* ON_DEMAND */

/* A version json object of a key state with this vid, or NULL. */
json_t *kms_model_version(const json_t *state, uint32_t vid);

#endif
