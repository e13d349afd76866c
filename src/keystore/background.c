/*
 * The key store's thread: blocks of uses reserved ahead (crypto.c), the
 * change sequence polled every refresh_ms (entries other nodes changed are
 * read again at their next use), rotations and deletions that fall due, and
 * housekeeping (the counts for the metrics, old changes pruned).
 *
 * The change feed's thread waits on kms_store_wait_change (PostgreSQL's
 * LISTEN/NOTIFY; an engine without a feed ends it at once) and, when a change
 * is announced, sets feed_changed and signals the condition variable the key
 * store's thread sleeps on, which then reads the change sequence at once
 * instead of at its next tick: a change reaches this node within a round trip
 * or two, whatever refresh_ms. The key store's thread never waits on the
 * feed itself, so blocks queued by requests are reserved as promptly as
 * before; the timer's poll still runs every refresh_ms and covers whatever
 * the feed missed (its connection lost, a notification dropped).
 */
#include "config.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "common/log.h"
#include "keystore/internal.h"

#define CHANGES_PAGE 1000
#define DUE_PAGE 100
#define COUNT_SECONDS 10
#define PRUNE_SECONDS 3600
#define KEEP_CHANGES_SECONDS 86400 /* a node away longer re-reads everything */
#define FEED_WAIT_MS 60000         /* kms_keystore_stop wakes the wait early */

static kms_err on_change(void *arg, const struct kms_change *c)
{
    struct kms_keystore *ks = arg;
    if (c->kind == KMS_CHANGE_KEY && c->id)
        kms_cache_key_changed_at(ks, c->id, c->seq);
    else if (c->kind == KMS_CHANGE_ALIAS && c->name)
        kms_cache_alias_changed(ks, c->name);
    ks->seen_seq = c->seq;
    return KMS_OK;
}

kms_err kms_changes_poll(struct kms_keystore *ks)
{
    for (int page = 0; page < 100; page++) {
        struct kms_tx *tx = NULL;
        int64_t tail = 0, before = ks->seen_seq, head = 0;
        kms_err rc = kms_store_begin(ks->store, KMS_TX_READ, &tx);
        if (rc == KMS_OK)
            rc = kms_store_change_tail(tx, &tail);
        if (rc == KMS_OK)
            rc = kms_store_change_head(tx, &head);
        if (rc == KMS_OK && tail > ks->seen_seq + 1 && ks->seen_seq > 0) {
            /* Changes this node has not read were pruned: anything may have changed. */
            kms_warn("the change sequence moved past this node's last look; re-reading all");
            kms_cache_all_changed(ks);
            ks->seen_seq = head;
        } else if (rc == KMS_OK) {
            rc = kms_store_changes(tx, ks->seen_seq, CHANGES_PAGE, on_change, ks);
        }
        if (rc == KMS_OK)
            rc = kms_store_commit(tx);
        kms_store_rollback(tx);
        if (rc != KMS_OK) {
            /* Cached entries stay as they are: nothing is known to have changed. */
            if (!ks->poll_failing)
                kms_warn("reading the change sequence failed: %s (said once until it works "
                         "again)",
                         kms_err_message());
            ks->poll_failing = 1;
            kms_err_clear();
            return rc;
        }
        if (ks->poll_failing)
            kms_info("reading the change sequence works again");
        ks->poll_failing = 0;
        if (ks->seen_seq - before < CHANGES_PAGE)
            return KMS_OK;
    }
    return KMS_OK;
}

/* ---- deletion ---- */

struct destroy_args {
    int64_t now;
    int not_due;
    int token_resident;
    uint32_t *vids;
    size_t nvids;
    char **aliases;
    size_t naliases;
    kms_err failed;
};

static kms_err note_vid(void *arg, const struct kms_version_row *r)
{
    struct destroy_args *a = arg;
    uint32_t *p = realloc(a->vids, (a->nvids + 1) * sizeof *p);
    KMS_ENSURE(p != NULL, KMS_ERR_INTERNAL, "out of memory");
    a->vids = p;
    a->vids[a->nvids++] = r->vid;
    return KMS_OK;
}

static void note_alias(void *arg, const char *name)
{
    struct destroy_args *a = arg;
    char **p = realloc(a->aliases, (a->naliases + 1) * sizeof *p);
    char *copy = name ? strdup(name) : NULL;
    if (!p || !copy) {
        free(copy);
        if (p)
            a->aliases = p;
        a->failed = KMS_ERR_INTERNAL;
        return;
    }
    a->aliases = p;
    a->aliases[a->naliases++] = copy;
}

static kms_err destroy_in(struct kms_keystore *ks, struct kms_tx *tx, struct kms_key_row *r,
                          void *arg)
{
    struct destroy_args *a = arg;
    (void)ks;
    if (r->state != KMS_STORE_PENDING || r->deletion_date > a->now) {
        a->not_due = 1;
        return KMS_ERR_NOT_FOUND;
    }
    a->token_resident = r->token_resident;
    if (r->token_resident)
        KMS_GUARD(kms_store_versions(tx, r->id, note_vid, a));
    /* The key material goes with the rows; a tombstone row answers NotFound for its blobs. */
    KMS_GUARD(kms_store_versions_delete(tx, r->id));
    /* Its grants go too: a destroyed key grants nothing, and ListGrants no longer shows them. */
    KMS_GUARD(kms_store_grants_delete(tx, r->id));
    KMS_GUARD(kms_store_tags_delete(tx, r->id));
    KMS_GUARD(kms_store_aliases_of_key_delete(tx, r->id, note_alias, a));
    KMS_ENSURE(a->failed == KMS_OK, KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < a->naliases; i++)
        KMS_GUARD(kms_store_note_change(tx, KMS_CHANGE_ALIAS, NULL, a->aliases[i]));
    r->state = KMS_STORE_DESTROYED;
    return KMS_OK;
}

static void destroy(struct kms_keystore *ks, const uint8_t id[KMS_UUID_LEN], int64_t now)
{
    struct destroy_args a = {.now = now, .failed = KMS_OK};
    char text[KMS_UUID_TEXT_LEN + 1];
    kms_uuid_format(id, text);
    kms_err rc = kms_key_change(ks, id, "DeleteKey", 1, destroy_in, &a);
    if (a.not_due) {
        kms_err_clear();
    } else if (rc != KMS_OK) {
        kms_warn("deleting key %s failed: %s", text, kms_err_message());
        kms_err_clear();
    } else {
        for (size_t i = 0; i < a.naliases; i++)
            kms_cache_alias_changed(ks, a.aliases[i]);
        size_t removed = 0;
        struct kms_session *s;
        /* A token-resident key's objects: after the commit, so no row names a missing one. */
        if (a.nvids && kms_hsm_acquire(ks->hsm, &s) == KMS_OK) {
            for (size_t i = 0; i < a.nvids; i++) {
                uint8_t cka_id[KMS_TOKEN_KEY_ID_LEN];
                CK_OBJECT_HANDLE h = CK_INVALID_HANDLE;
                kms_token_key_id(id, a.vids[i], cka_id);
                if (kms_hsm_find_secret(s, cka_id, sizeof cka_id, &h) == KMS_OK &&
                    h != CK_INVALID_HANDLE && kms_hsm_destroy(s, h) == KMS_OK)
                    removed++;
                kms_err_clear();
            }
            kms_hsm_release(s);
        }
        kms_err_clear();
        pthread_mutex_lock(&ks->lock);
        if (ks->count_keys)
            ks->count_keys--;
        pthread_mutex_unlock(&ks->lock);
        kms_info("key %s destroyed%s", text,
                 a.token_resident ? " (its token objects removed)" : "");
        (void)removed;
    }
    for (size_t i = 0; i < a.naliases; i++)
        free(a.aliases[i]);
    free(a.aliases);
    free(a.vids);
}

/* ---- due work ---- */

struct due {
    uint8_t id[KMS_UUID_LEN];
    int what;
};

struct due_list {
    struct due items[2 * DUE_PAGE];
    size_t n;
};

static kms_err note_due(void *arg, const uint8_t id[KMS_UUID_LEN], int what)
{
    struct due_list *l = arg;
    if (l->n < sizeof l->items / sizeof l->items[0]) {
        memcpy(l->items[l->n].id, id, KMS_UUID_LEN);
        l->items[l->n++].what = what;
    }
    return KMS_OK;
}

static void do_due_work(struct kms_keystore *ks)
{
    struct due_list *l = calloc(1, sizeof *l);
    struct kms_tx *tx;
    int64_t now = kms_now();
    if (!l)
        return;
    kms_err rc = kms_store_begin(ks->store, KMS_TX_READ, &tx);
    if (rc == KMS_OK) {
        rc = kms_store_keys_due(tx, now, DUE_PAGE, note_due, l);
        if (rc == KMS_OK)
            rc = kms_store_commit(tx);
        kms_store_rollback(tx);
    }
    if (rc != KMS_OK) {
        kms_warn("reading the keys due failed: %s", kms_err_message());
        kms_err_clear();
    }
    for (size_t i = 0; i < l->n; i++) {
        if (l->items[i].what == KMS_DUE_DELETION) {
            destroy(ks, l->items[i].id, now);
        } else if (kms_key_rotate(ks, l->items[i].id, KMS_ROTATE_SCHEDULE, 0) != KMS_OK) {
            kms_warn("scheduled rotation failed: %s", kms_err_message());
            kms_err_clear();
        }
    }
    free(l);
}

static void housekeeping(struct kms_keystore *ks)
{
    int64_t now = kms_now();
    struct kms_tx *tx;
    if (now - ks->last_count >= COUNT_SECONDS) {
        size_t keys = 0, versions = 0;
        ks->last_count = now;
        if (kms_store_begin(ks->store, KMS_TX_READ, &tx) == KMS_OK) {
            if (kms_store_key_count(tx, &keys, &versions) == KMS_OK &&
                kms_store_commit(tx) == KMS_OK) {
                pthread_mutex_lock(&ks->lock);
                ks->count_keys = keys;
                ks->count_versions = versions;
                pthread_mutex_unlock(&ks->lock);
            }
            kms_store_rollback(tx);
        }
        kms_err_clear();
    }
    if (now - ks->last_prune >= PRUNE_SECONDS) {
        ks->last_prune = now;
        if (kms_store_begin(ks->store, KMS_TX_WRITE, &tx) == KMS_OK) {
            if (kms_store_changes_prune(tx, now - KEEP_CHANGES_SECONDS) != KMS_OK ||
                kms_store_commit(tx) != KMS_OK)
                kms_warn("pruning the change sequence failed: %s", kms_err_message());
            kms_store_rollback(tx);
        }
        kms_err_clear();
    }
}

void kms_keystore_tick(struct kms_keystore *ks)
{
    /* The database is down: the due work and the housekeeping would fail the same way. */
    if (kms_changes_poll(ks) != KMS_OK)
        return;
    do_due_work(ks);
    housekeeping(ks);
}

static void *run(void *arg)
{
    struct kms_keystore *ks = arg;
    struct timespec t = {0, 0}, now;
    pthread_mutex_lock(&ks->queue_lock);
    while (!ks->stopping) {
        int announced = ks->feed_changed;
        ks->feed_changed = 0;
        pthread_mutex_unlock(&ks->queue_lock);
        /* Blocks of uses requests queued first, then the poll when it is due or announced. */
        kms_keystore_refill(ks);
        clock_gettime(CLOCK_MONOTONIC, &now);
        int due = now.tv_sec > t.tv_sec || (now.tv_sec == t.tv_sec && now.tv_nsec >= t.tv_nsec);
        if (announced && !due && kms_changes_poll(ks) != KMS_OK)
            kms_err_clear();
        if (due) {
            kms_keystore_tick(ks);
            clock_gettime(CLOCK_MONOTONIC, &t);
            t.tv_sec += ks->cfg.refresh_ms / 1000;
            t.tv_nsec += (long)(ks->cfg.refresh_ms % 1000) * 1000000L;
            if (t.tv_nsec >= 1000000000L) {
                t.tv_sec++;
                t.tv_nsec -= 1000000000L;
            }
        }
        pthread_mutex_lock(&ks->queue_lock);
        if (!ks->stopping && ks->nrefills == 0 && !ks->feed_changed)
            pthread_cond_timedwait(&ks->wake, &ks->queue_lock, &t);
    }
    pthread_mutex_unlock(&ks->queue_lock);
    return NULL;
}

/* The change feed's thread: waits on the database, then wakes the key store's thread. */
static void *listen_run(void *arg)
{
    struct kms_keystore *ks = arg;
    for (;;) {
        int changed = 0;
        pthread_mutex_lock(&ks->queue_lock);
        int stop = ks->stopping;
        pthread_mutex_unlock(&ks->queue_lock);
        if (stop)
            break;
        kms_err rc = kms_store_wait_change(ks->store, FEED_WAIT_MS, &changed);
        if (rc == KMS_ERR_UNSUPPORTED)
            break; /* no feed (SQLite): the timer's poll is all there is */
        if (rc != KMS_OK) {
            kms_warn("the change feed: %s", kms_err_message());
            kms_err_clear();
            struct timespec pause = {0, 100 * 1000000L};
            nanosleep(&pause, NULL);
        }
        if (changed) {
            pthread_mutex_lock(&ks->queue_lock);
            ks->feed_changed = 1;
            pthread_cond_signal(&ks->wake);
            pthread_mutex_unlock(&ks->queue_lock);
        }
    }
    return NULL;
}

kms_err kms_keystore_start(struct kms_keystore *ks)
{
    ks->last_prune = kms_now();
    KMS_ENSURE(pthread_create(&ks->thread, NULL, run, ks) == 0, KMS_ERR_INTERNAL,
               "cannot start the key store thread");
    ks->running = 1;
    if (pthread_create(&ks->listener, NULL, listen_run, ks) == 0)
        ks->listening = 1;
    else
        kms_warn("cannot start the change feed's thread: changes are read every %u ms",
                 ks->cfg.refresh_ms);
    return KMS_OK;
}

void kms_keystore_stop(struct kms_keystore *ks)
{
    if (!ks->running)
        return;
    pthread_mutex_lock(&ks->queue_lock);
    ks->stopping = 1;
    pthread_cond_signal(&ks->wake);
    pthread_mutex_unlock(&ks->queue_lock);
    if (ks->listening) {
        kms_store_wake(ks->store);
        pthread_join(ks->listener, NULL);
        ks->listening = 0;
    }
    pthread_join(ks->thread, NULL);
    ks->running = 0;
}
