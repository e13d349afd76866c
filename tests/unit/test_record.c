/*
 * Generational records and the key and alias state machines: the merge every
 * node computes from the records it finds must be the same whatever order it
 * reads them in, and no acknowledged change may be lost.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <cmocka.h>

#include <jansson.h>
#include <stdio.h>
#include <string.h>

#include "keystore/model.h"
#include "keystore/record.h"

#define KEY "0b5c4a43-51a4-4bd7-8b0a-0dd6cbb0f2f1"

/* A key state with one version (vid 100) and the given state name. */
static json_t *key_state(const char *state)
{
    return json_pack("{s:I, s:s, s:s, s:I, s:b, s:I, s:I, s:I, s:I, s:I, "
                     "s:[{s:I, s:I, s:I, s:I, s:I, s:s, s:b}]}",
                     "created", (json_int_t)1000, "description", "", "state", state,
                     "deletion_date", (json_int_t)0, "rotation_enabled", 1, "rotation_period_days",
                     (json_int_t)1, "rotation_period_seconds", (json_int_t)10, "next_rotation",
                     (json_int_t)1010, "on_demand", (json_int_t)0, "current", (json_int_t)100,
                     "versions", "vid", (json_int_t)100, "n", (json_int_t)1, "created",
                     (json_int_t)1000, "reserved", (json_int_t)0, "bound", (json_int_t)10,
                     "rotation", "", "listed", 0);
}

/* A record as the token holds it; steals op and state. */
static struct kms_record make(const struct kms_record_kind *kind, const char *name, int gen,
                              const char *nonce, const char *applied_ids, json_t *op, json_t *state)
{
    struct kms_record r;
    json_t *applied = json_array();
    char ids[256];
    snprintf(ids, sizeof ids, "%s", applied_ids);
    for (char *save = NULL, *t = strtok_r(ids, ",", &save); t; t = strtok_r(NULL, ",", &save))
        json_array_append_new(applied, json_string(t));
    json_t *doc = json_pack("{s:i, s:s, s:s, s:i, s:s, s:o, s:o, s:o}", "format", 2, "kind",
                            kind->kind, "name", name, "gen", gen, "nonce", nonce, "applied",
                            applied, "op", op, "state", state ? state : json_null());
    char *text = json_dumps(doc, 0);
    assert_int_equal(kms_record_parse(kind, name, (const uint8_t *)text, strlen(text), &r), KMS_OK);
    free(text);
    json_decref(doc);
    return r;
}

static json_t *op(const char *id, const char *type)
{
    return json_pack("{s:s, s:s}", "id", id, "type", type);
}

static json_t *rotate(const char *id, int vid, const char *reason, int date)
{
    return json_pack("{s:s, s:s, s:i, s:s, s:i, s:i, s:i, s:i}", "id", id, "type", "rotate", "vid",
                     vid, "reason", reason, "date", date, "bound", 10, "from", 100, "limit", 10);
}

static json_t *reserve(const char *id, int count)
{
    return json_pack("{s:s, s:s, s:i, s:i}", "id", id, "type", "reserve", "vid", 100, "count",
                     count);
}

static int applied_has(const struct kms_view *v, const char *id)
{
    size_t i;
    json_t *x;
    json_array_foreach(v->applied, i, x)
    {
        if (strcmp(json_string_value(x), id) == 0)
            return 1;
    }
    return 0;
}

static json_int_t num(const json_t *o, const char *k)
{
    return json_integer_value(json_object_get(o, k));
}

static const char *str(const json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

/* The view of records in the given order. */
static void view_of(const struct kms_record_kind *kind, struct kms_record *r, size_t n,
                    struct kms_view *v)
{
    assert_int_equal(kms_records_view(kind, r, n, v), KMS_OK);
}

static void release(struct kms_record *r, size_t n)
{
    for (size_t i = 0; i < n; i++)
        json_decref(r[i].doc);
}

static void test_single_record(void **unused)
{
    (void)unused;
    struct kms_record r[1] = {
        make(&kms_key_kind, KEY, 1, "aa", "c1", op("c1", "create"), key_state("Enabled"))};
    struct kms_view v;
    view_of(&kms_key_kind, r, 1, &v);
    assert_int_equal(v.gen, 1);
    assert_string_equal(str(v.state, "state"), "Enabled");
    assert_true(applied_has(&v, "c1"));
    kms_view_clear(&v);
    release(r, 1);
}

static void test_highest_generation_wins(void **unused)
{
    (void)unused;
    struct kms_record r[2] = {
        make(&kms_key_kind, KEY, 2, "ff", "c1,c2", op("c2", "disable"), key_state("Disabled")),
        make(&kms_key_kind, KEY, 1, "00", "c1", op("c1", "create"), key_state("Enabled")),
    };
    struct kms_view v;
    view_of(&kms_key_kind, r, 2, &v);
    assert_int_equal(v.gen, 2);
    assert_string_equal(str(v.state, "state"), "Disabled");
    kms_view_clear(&v);
    release(r, 2);
}

/* Two nodes wrote generation 2 from the same base: both changes hold, in any reading order. */
static void test_same_generation_merges_in_any_order(void **unused)
{
    (void)unused;
    json_t *rotated = key_state("Enabled");
    json_t *on_demand = rotate("c3", 200, KMS_ROTATE_DEMAND, 1005);
    json_t *tmp = rotated;
    assert_int_equal(kms_key_kind.apply(&tmp, on_demand), KMS_OK);
    struct kms_record a =
        make(&kms_key_kind, KEY, 2, "11", "c1,c2", op("c2", "disable"), key_state("Disabled"));
    struct kms_record b = make(&kms_key_kind, KEY, 2, "22", "c1,c3", on_demand, rotated);
    struct kms_record order1[2] = {a, b}, order2[2] = {b, a};
    struct kms_view v1, v2;
    view_of(&kms_key_kind, order1, 2, &v1);
    view_of(&kms_key_kind, order2, 2, &v2);

    /* The lowest nonce ("11", the disable) is the base; the rotation cannot be re-applied to a
     * disabled key, so it is not in applied and its writer must write it again. */
    assert_string_equal(str(v1.state, "state"), "Disabled");
    assert_true(applied_has(&v1, "c2"));
    assert_false(applied_has(&v1, "c3"));
    /* ...but its version object is still named, unlisted, so no blob is lost. */
    assert_int_equal(json_array_size(json_object_get(v1.state, "versions")), 2);
    assert_non_null(kms_model_version(v1.state, 200));
    assert_false(json_is_true(json_object_get(kms_model_version(v1.state, 200), "listed")));
    assert_int_equal(num(v1.state, "current"), 100);
    assert_true(json_equal(v1.state, v2.state));
    assert_true(json_equal(v1.applied, v2.applied));
    kms_view_clear(&v1);
    kms_view_clear(&v2);
    release(order1, 2);
}

/* Two on-demand rotations racing: both are acknowledged and both appear, once each. */
static void test_racing_on_demand_rotations_both_count(void **unused)
{
    (void)unused;
    json_t *s1 = key_state("Enabled"), *s2 = key_state("Enabled");
    json_t *o1 = rotate("r1", 201, KMS_ROTATE_DEMAND, 1005);
    json_t *o2 = rotate("r2", 202, KMS_ROTATE_DEMAND, 1005);
    assert_int_equal(kms_key_kind.apply(&s1, o1), KMS_OK);
    assert_int_equal(kms_key_kind.apply(&s2, o2), KMS_OK);
    struct kms_record r[2] = {make(&kms_key_kind, KEY, 2, "aa", "c1,r1", o1, s1),
                              make(&kms_key_kind, KEY, 2, "bb", "c1,r2", o2, s2)};
    struct kms_view v;
    view_of(&kms_key_kind, r, 2, &v);
    assert_true(applied_has(&v, "r1"));
    assert_true(applied_has(&v, "r2"));
    assert_int_equal(num(v.state, "on_demand"), 2);
    assert_int_equal(num(v.state, "current"), 202);
    assert_int_equal(num(kms_model_version(v.state, 201), "n"), 2);
    assert_int_equal(num(kms_model_version(v.state, 202), "n"), 3);
    assert_true(json_is_true(json_object_get(kms_model_version(v.state, 202), "listed")));
    kms_view_clear(&v);
    release(r, 2);
}

/*
 * A writer whose scan missed a record (written between its scan and its write) wrote the next
 * generation without that record's change and won the merge: the change, which its own writer
 * saw merged in and acknowledged, still holds, once.
 */
static void test_change_missed_by_a_writer_still_holds(void **unused)
{
    (void)unused;
    json_t *r1 = rotate("r1", 201, KMS_ROTATE_DEMAND, 1005);
    json_t *with_r1 = key_state("Enabled");
    assert_int_equal(kms_key_kind.apply(&with_r1, r1), KMS_OK);
    json_t *sibling = json_deep_copy(with_r1), *u2 = reserve("u2", 2);
    assert_int_equal(kms_key_kind.apply(&sibling, u2), KMS_OK);
    json_t *winner = key_state("Enabled"), *u1 = reserve("u1", 3);
    assert_int_equal(kms_key_kind.apply(&winner, u1), KMS_OK);
    struct kms_record r[3] = {
        make(&kms_key_kind, KEY, 3, "aa", "c1,u1", u1, winner),
        make(&kms_key_kind, KEY, 3, "bb", "c1,r1,u2", u2, sibling),
        make(&kms_key_kind, KEY, 2, "cc", "c1,r1", r1, with_r1),
    };
    struct kms_view v;
    view_of(&kms_key_kind, r, 3, &v);
    assert_true(applied_has(&v, "u1"));
    assert_true(applied_has(&v, "u2"));
    assert_true(applied_has(&v, "r1"));
    assert_int_equal(num(v.state, "on_demand"), 1);
    assert_int_equal(num(v.state, "current"), 201);
    assert_int_equal(json_array_size(json_object_get(v.state, "versions")), 2);
    assert_true(json_is_true(json_object_get(kms_model_version(v.state, 201), "listed")));
    assert_int_equal(num(kms_model_version(v.state, 100), "reserved"), 5);
    kms_view_clear(&v);
    release(r, 3);
}

/* ...but a missed state change is not applied late: it would undo the later one. */
static void test_missed_state_change_is_not_applied_late(void **unused)
{
    (void)unused;
    struct kms_record r[2] = {
        make(&kms_key_kind, KEY, 3, "aa", "c1,e1", op("e1", "enable"), key_state("Enabled")),
        make(&kms_key_kind, KEY, 2, "bb", "c1,d1", op("d1", "disable"), key_state("Disabled")),
    };
    struct kms_view v;
    view_of(&kms_key_kind, r, 2, &v);
    assert_string_equal(str(v.state, "state"), "Enabled");
    assert_false(applied_has(&v, "d1"));
    kms_view_clear(&v);
    release(r, 2);
}

/* Two schedulers rotating one due key: one rotation, the other version kept unlisted. */
static void test_racing_scheduled_rotations_count_once(void **unused)
{
    (void)unused;
    json_t *s1 = key_state("Enabled"), *s2 = key_state("Enabled");
    json_t *o1 = rotate("a1", 301, KMS_ROTATE_SCHEDULE, 1010);
    json_t *o2 = rotate("a2", 302, KMS_ROTATE_SCHEDULE, 1011);
    assert_int_equal(kms_key_kind.apply(&s1, o1), KMS_OK);
    assert_int_equal(kms_key_kind.apply(&s2, o2), KMS_OK);
    assert_int_equal(num(s1, "next_rotation"), 1020);
    struct kms_record r[2] = {make(&kms_key_kind, KEY, 2, "02", "c1,a2", o2, s2),
                              make(&kms_key_kind, KEY, 2, "01", "c1,a1", o1, s1)};
    struct kms_view v;
    view_of(&kms_key_kind, r, 2, &v);
    assert_int_equal(num(v.state, "current"), 301);
    assert_true(applied_has(&v, "a2")); /* settled: no longer due, nothing to retry */
    assert_true(json_is_true(json_object_get(kms_model_version(v.state, 301), "listed")));
    assert_false(json_is_true(json_object_get(kms_model_version(v.state, 302), "listed")));
    assert_int_equal(num(v.state, "next_rotation"), 1020);
    kms_view_clear(&v);
    release(r, 2);
}

/* Reservations from two nodes add up; one that would pass the bound is refused. */
static void test_reservations_add_up_to_the_bound(void **unused)
{
    (void)unused;
    json_t *s1 = key_state("Enabled"), *s2 = key_state("Enabled"), *s3 = key_state("Enabled");
    json_t *o1 = reserve("u1", 4), *o2 = reserve("u2", 4), *o3 = reserve("u3", 4);
    assert_int_equal(kms_key_kind.apply(&s1, o1), KMS_OK);
    assert_int_equal(kms_key_kind.apply(&s2, o2), KMS_OK);
    assert_int_equal(kms_key_kind.apply(&s3, o3), KMS_OK);
    struct kms_record r[3] = {make(&kms_key_kind, KEY, 2, "a", "u1", o1, s1),
                              make(&kms_key_kind, KEY, 2, "b", "u2", o2, s2),
                              make(&kms_key_kind, KEY, 2, "c", "u3", o3, s3)};
    struct kms_view v;
    view_of(&kms_key_kind, r, 3, &v);
    assert_int_equal(num(kms_model_version(v.state, 100), "reserved"), 8);
    assert_true(applied_has(&v, "u1"));
    assert_true(applied_has(&v, "u2"));
    assert_false(applied_has(&v, "u3")); /* 12 > 10: its writer learns it got nothing */
    json_t *more = reserve("u4", 3);
    assert_int_equal(kms_key_kind.apply(&v.state, more), KMS_ERR_LIMIT_EXCEEDED);
    json_decref(more);
    kms_view_clear(&v);
    release(r, 3);
}

/* A version named only by an older record is still known. */
static void test_versions_of_older_records_are_kept(void **unused)
{
    (void)unused;
    json_t *old = key_state("Enabled");
    json_t *o = rotate("x", 400, KMS_ROTATE_DEMAND, 1001);
    assert_int_equal(kms_key_kind.apply(&old, o), KMS_OK);
    json_object_set_new(kms_model_version(old, 100), "reserved", json_integer(7));
    struct kms_record r[2] = {
        make(&kms_key_kind, KEY, 3, "aa", "c1", op("d", "disable"), key_state("Disabled")),
        make(&kms_key_kind, KEY, 2, "bb", "c1,x", o, old)};
    struct kms_view v;
    view_of(&kms_key_kind, r, 2, &v);
    assert_non_null(kms_model_version(v.state, 400));
    assert_false(json_is_true(json_object_get(kms_model_version(v.state, 400), "listed")));
    assert_int_equal(num(kms_model_version(v.state, 100), "reserved"), 7);
    kms_view_clear(&v);
    release(r, 2);
}

static json_t *archive_op(const char *id, json_int_t upto, json_int_t vid1, json_int_t vid2)
{
    return json_pack("{s:s, s:s, s:[I, I], s:I}", "id", id, "type", "archive", "vids", vid1, vid2,
                     "upto", upto);
}

/* Versions 100 (n 1), 201 (n 2), 202 (n 3, current). */
static json_t *three_versions(void)
{
    json_t *s = key_state("Enabled"), *a = rotate("ra", 201, KMS_ROTATE_DEMAND, 1001),
           *b = rotate("rb", 202, KMS_ROTATE_DEMAND, 1002);
    assert_int_equal(kms_key_kind.apply(&s, a), KMS_OK);
    assert_int_equal(kms_key_kind.apply(&s, b), KMS_OK);
    json_decref(a);
    json_decref(b);
    assert_int_equal(num(kms_model_version(s, 202), "n"), 3);
    return s;
}

/* An archive drops the named versions but never the current one; ordinals go on. */
static void test_archive_moves_versions_and_ordinals_go_on(void **unused)
{
    (void)unused;
    json_t *s = three_versions(), *a = archive_op("ar", 3, 100, 202);
    assert_int_equal(kms_key_kind.apply(&s, a), KMS_OK);
    assert_null(kms_model_version(s, 100));
    assert_non_null(kms_model_version(s, 201));
    assert_non_null(kms_model_version(s, 202)); /* current */
    assert_int_equal(num(s, "archived_n"), 3);
    json_t *r = rotate("rc", 203, KMS_ROTATE_DEMAND, 1003);
    assert_int_equal(kms_key_kind.apply(&s, r), KMS_OK);
    assert_int_equal(num(kms_model_version(s, 203), "n"), 4);
    /* A smaller archive later does not lower archived_n. */
    json_t *b = archive_op("as", 1, 201, 201);
    assert_int_equal(kms_key_kind.apply(&s, b), KMS_OK);
    assert_int_equal(num(s, "archived_n"), 3);
    assert_null(kms_model_version(s, 201));
    json_decref(a);
    json_decref(b);
    json_decref(r);
    json_decref(s);
}

/* Older records still naming archived versions do not bring them back. */
static void test_archived_versions_are_not_revived(void **unused)
{
    (void)unused;
    json_t *before = three_versions(), *after = json_deep_copy(before);
    json_t *a = archive_op("ar", 2, 100, 201);
    assert_int_equal(kms_key_kind.apply(&after, a), KMS_OK);
    struct kms_record r[2] = {
        make(&kms_key_kind, KEY, 3, "aa", "c1,ra,rb,ar", a, after),
        make(&kms_key_kind, KEY, 2, "bb", "c1,ra,rb", rotate("rb", 202, KMS_ROTATE_DEMAND, 1002),
             before),
    };
    struct kms_view v;
    view_of(&kms_key_kind, r, 2, &v);
    assert_int_equal(json_array_size(json_object_get(v.state, "versions")), 1);
    assert_non_null(kms_model_version(v.state, 202));
    assert_int_equal(num(v.state, "archived_n"), 2);
    kms_view_clear(&v);
    release(r, 2);
}

/* An archive that lost a same-generation race to a rotation is applied on top of it. */
static void test_archive_racing_a_rotation(void **unused)
{
    (void)unused;
    json_t *base = three_versions(), *arch = json_deep_copy(base), *rot = json_deep_copy(base);
    json_t *a = archive_op("ar", 2, 100, 201), *o = rotate("rd", 204, KMS_ROTATE_DEMAND, 1004);
    assert_int_equal(kms_key_kind.apply(&arch, a), KMS_OK);
    assert_int_equal(kms_key_kind.apply(&rot, o), KMS_OK);
    json_decref(base);
    struct kms_record r[2] = {
        make(&kms_key_kind, KEY, 3, "bb", "c1,ra,rb,ar", a, arch),
        make(&kms_key_kind, KEY, 3, "aa", "c1,ra,rb,rd", o, rot),
    };
    struct kms_view v;
    view_of(&kms_key_kind, r, 2, &v);
    assert_true(applied_has(&v, "ar"));
    assert_true(applied_has(&v, "rd"));
    assert_int_equal(num(v.state, "current"), 204);
    assert_int_equal(num(v.state, "archived_n"), 2);
    assert_null(kms_model_version(v.state, 100));
    assert_null(kms_model_version(v.state, 201));
    assert_int_equal(num(kms_model_version(v.state, 202), "n"), 3);
    assert_int_equal(num(kms_model_version(v.state, 204), "n"), 4);
    kms_view_clear(&v);
    release(r, 2);
}

static void test_key_state_transitions(void **unused)
{
    (void)unused;
    json_t *s = key_state("Enabled");
    json_t *dis = op("1", "disable"), *en = op("2", "enable"), *cancel = op("3", "cancel_deletion");
    json_t *sched =
        json_pack("{s:s, s:s, s:i}", "id", "4", "type", "schedule_deletion", "deletion_date", 2000);
    json_t *demand = rotate("5", 500, KMS_ROTATE_DEMAND, 1001);
    json_t *destroy_early =
        json_pack("{s:s, s:s, s:i}", "id", "6", "type", "destroy", "date", 1999);
    json_t *destroy = json_pack("{s:s, s:s, s:i}", "id", "7", "type", "destroy", "date", 2000);

    assert_int_equal(kms_key_kind.apply(&s, dis), KMS_OK);
    assert_string_equal(str(s, "state"), "Disabled");
    assert_int_equal(kms_key_kind.apply(&s, demand), KMS_ERR_DISABLED);
    assert_int_equal(kms_key_kind.apply(&s, cancel), KMS_ERR_INVALID_STATE);
    assert_int_equal(kms_key_kind.apply(&s, sched), KMS_OK);
    assert_string_equal(str(s, "state"), "PendingDeletion");
    assert_int_equal(num(s, "deletion_date"), 2000);
    assert_int_equal(kms_key_kind.apply(&s, en), KMS_ERR_INVALID_STATE);
    assert_int_equal(kms_key_kind.apply(&s, sched), KMS_ERR_INVALID_STATE);
    assert_int_equal(kms_key_kind.apply(&s, destroy_early), KMS_ERR_INVALID_STATE);
    assert_int_equal(kms_key_kind.apply(&s, cancel), KMS_OK);
    assert_string_equal(str(s, "state"), "Disabled");
    assert_int_equal(kms_key_kind.apply(&s, sched), KMS_OK);
    assert_int_equal(kms_key_kind.apply(&s, destroy), KMS_OK);
    assert_string_equal(str(s, "state"), "Destroyed");
    assert_int_equal(kms_key_kind.apply(&s, en), KMS_ERR_NOT_FOUND);
    json_t *none = NULL;
    assert_int_equal(kms_key_kind.apply(&none, dis), KMS_ERR_NOT_FOUND);
    json_t *all[] = {dis, en, cancel, sched, demand, destroy_early, destroy};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        json_decref(all[i]);
    json_decref(s);
}

static void test_on_demand_limit(void **unused)
{
    (void)unused;
    json_t *s = key_state("Enabled");
    json_object_set_new(s, "on_demand", json_integer(10));
    json_t *o = rotate("r", 600, KMS_ROTATE_DEMAND, 1001);
    assert_int_equal(kms_key_kind.apply(&s, o), KMS_ERR_LIMIT_EXCEEDED);
    json_decref(o);
    json_decref(s);
}

static void test_alias_create_race_has_one_winner(void **unused)
{
    (void)unused;
    json_t *c1 = json_pack("{s:s, s:s, s:s, s:i}", "id", "p", "type", "create", "target", "key-1",
                           "date", 5);
    json_t *c2 = json_pack("{s:s, s:s, s:s, s:i}", "id", "q", "type", "create", "target", "key-2",
                           "date", 5);
    json_t *s1 = NULL, *s2 = NULL;
    assert_int_equal(kms_alias_kind.apply(&s1, c1), KMS_OK);
    assert_int_equal(kms_alias_kind.apply(&s2, c2), KMS_OK);
    struct kms_record r[2] = {make(&kms_alias_kind, "alias/a", 1, "9", "q", c2, s2),
                              make(&kms_alias_kind, "alias/a", 1, "1", "p", c1, s1)};
    struct kms_view v;
    view_of(&kms_alias_kind, r, 2, &v);
    assert_string_equal(str(v.state, "target"), "key-1");
    assert_true(applied_has(&v, "p"));
    assert_false(applied_has(&v, "q")); /* the loser is told AlreadyExists when it retries */
    kms_view_clear(&v);
    release(r, 2);
}

static void test_alias_update_and_delete(void **unused)
{
    (void)unused;
    json_t *s = NULL;
    json_t *upd =
        json_pack("{s:s, s:s, s:s, s:i}", "id", "u", "type", "update", "target", "k2", "date", 9);
    json_t *del = json_pack("{s:s, s:s, s:i}", "id", "d", "type", "delete", "date", 10);
    json_t *cre =
        json_pack("{s:s, s:s, s:s, s:i}", "id", "c", "type", "create", "target", "k1", "date", 8);
    assert_int_equal(kms_alias_kind.apply(&s, upd), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_alias_kind.apply(&s, cre), KMS_OK);
    assert_int_equal(kms_alias_kind.apply(&s, cre), KMS_ERR_ALREADY_EXISTS);
    assert_int_equal(kms_alias_kind.apply(&s, upd), KMS_OK);
    assert_string_equal(str(s, "target"), "k2");
    assert_int_equal(num(s, "created"), 8);
    assert_int_equal(num(s, "updated"), 9);
    assert_int_equal(kms_alias_kind.apply(&s, del), KMS_OK);
    assert_string_equal(str(s, "target"), "");
    assert_int_equal(kms_alias_kind.apply(&s, del), KMS_ERR_NOT_FOUND);
    assert_int_equal(kms_alias_kind.apply(&s, cre), KMS_OK); /* a tombstone can be reused */
    json_decref(upd);
    json_decref(del);
    json_decref(cre);
    json_decref(s);
}

static void test_parse_refuses_other_kinds_and_names(void **unused)
{
    (void)unused;
    static const char doc[] = "{\"format\":2,\"kind\":\"alias\",\"name\":\"alias/a\",\"gen\":1,"
                              "\"nonce\":\"x\",\"applied\":[],\"op\":{},\"state\":null}";
    struct kms_record r;
    assert_int_equal(kms_record_parse(&kms_key_kind, NULL, (const uint8_t *)doc, strlen(doc), &r),
                     KMS_ERR_INTERNAL);
    assert_int_equal(
        kms_record_parse(&kms_alias_kind, "alias/b", (const uint8_t *)doc, strlen(doc), &r),
        KMS_ERR_INTERNAL);
    assert_int_equal(
        kms_record_parse(&kms_alias_kind, "alias/a", (const uint8_t *)doc, strlen(doc), &r),
        KMS_OK);
    assert_int_equal(r.gen, 1);
    json_decref(r.doc);
    static const char bad[] = "{\"format\":1,\"kind\":\"key\"}";
    assert_int_equal(kms_record_parse(&kms_key_kind, NULL, (const uint8_t *)bad, strlen(bad), &r),
                     KMS_ERR_INTERNAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_record),
        cmocka_unit_test(test_highest_generation_wins),
        cmocka_unit_test(test_same_generation_merges_in_any_order),
        cmocka_unit_test(test_racing_on_demand_rotations_both_count),
        cmocka_unit_test(test_change_missed_by_a_writer_still_holds),
        cmocka_unit_test(test_missed_state_change_is_not_applied_late),
        cmocka_unit_test(test_racing_scheduled_rotations_count_once),
        cmocka_unit_test(test_reservations_add_up_to_the_bound),
        cmocka_unit_test(test_versions_of_older_records_are_kept),
        cmocka_unit_test(test_archive_moves_versions_and_ordinals_go_on),
        cmocka_unit_test(test_archived_versions_are_not_revived),
        cmocka_unit_test(test_archive_racing_a_rotation),
        cmocka_unit_test(test_key_state_transitions),
        cmocka_unit_test(test_on_demand_limit),
        cmocka_unit_test(test_alias_create_race_has_one_winner),
        cmocka_unit_test(test_alias_update_and_delete),
        cmocka_unit_test(test_parse_refuses_other_kinds_and_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
