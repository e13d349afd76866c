/*
 * The audit log's verifier core (what `p11kms-audit verify` runs): reads
 * lines in order and names the first one changed, removed, inserted or
 * reordered, a run whose file is missing and a log cut short; checkpoint MACs
 * come through the config's callback, the database's heads through its list.
 * The format is described in audit.h.
 */
#include "config.h"

#include "server/audit.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <openssl/sha.h>
#include <string.h>

#include "common/digest.h"
#include "common/encoding.h"

static const uint8_t zero_hash[32];

/* ---- the verifier ---------------------------------------------------------------- */

enum line_type { T_REQUEST, T_CHECKPOINT, T_REOPEN, T_INTENT, T_OUTCOME };
enum cp_kind { K_NONE, K_OPEN, K_PERIODIC, K_ROTATE, K_CLOSE };

/* What the checks need of one line. */
struct line_info {
    uint64_t index; /* in the whole stream, from 0 */
    char log[2 * KMS_AUDIT_LOG_ID_LEN + 1];
    uint64_t seq;
    enum line_type type;
    enum cp_kind kind;
    uint8_t prev[32];
    uint8_t hash[32];
    int mac_ok; /* a checkpoint whose MAC was checked and verifies */
    /* an "open" checkpoint: the run before on its node */
    int has_after;
    char after_log[2 * KMS_AUDIT_LOG_ID_LEN + 1];
    uint64_t after_seq;
    char after_hash[65];
    char node[256];
    /* an intent, outcome or recovery line */
    char request_id[KMS_REQUEST_ID_MAX + 1];
    int committed;
};

/* A checkpoint of a chain: where a head or the next run may point. */
struct mark {
    uint64_t seq, index;
    uint8_t hash[32];
};

/* One log's lines, which follow each other in the stream. */
struct chain {
    char log[2 * KMS_AUDIT_LOG_ID_LEN + 1];
    uint64_t first_seq, first_index;
    uint64_t last_seq, last_index;
    uint8_t last_hash[32];
    int last_rotate; /* its last line is a "rotate" checkpoint: it goes on in a later file */
    const struct kms_audit_head *head; /* the database's head naming this log, or NULL */
    struct mark *marks;                /* its checkpoints */
    size_t nmarks;
};

struct file_start {
    const char *name;
    uint64_t index;
};

enum pending {
    P_NONE,
    P_PREV,   /* the last line's prev does not match the line before: which one changed? */
    P_RIVAL,  /* the last two lines claim one place: which does the next line follow? */
    P_SEARCH, /* a jump in seq: is the missing seq further on (out of order) or gone? */
};

struct kms_audit_verifier {
    struct kms_audit_verify_config cfg;
    struct file_start *files;
    size_t nfiles;
    uint64_t index;         /* lines fed so far */
    struct line_info p, pp; /* the last line and the one before it */
    int have_p, have_pp;
    struct chain *chains;
    size_t nchains;
    enum pending pending;
    struct line_info at; /* P_SEARCH: the line where seq jumped */
    uint64_t search_seq; /* P_SEARCH: the seq looked for */
    int done;
    struct kms_audit_report rep;
    size_t open_cap;
};

kms_err kms_audit_verifier_new(const struct kms_audit_verify_config *cfg,
                               struct kms_audit_verifier **out)
{
    struct kms_audit_verifier *v = calloc(1, sizeof *v);
    KMS_ENSURE(v != NULL, KMS_ERR_INTERNAL, "out of memory");
    if (cfg)
        v->cfg = *cfg;
    *out = v;
    return KMS_OK;
}

void kms_audit_verify_file(struct kms_audit_verifier *v, const char *name)
{
    struct file_start *f = realloc(v->files, (v->nfiles + 1) * sizeof *f);
    if (!f) {
        v->done = 1;
        v->rep.finding = KMS_AUDIT_NOT_JSON;
        snprintf(v->rep.text, sizeof v->rep.text, "out of memory");
        return;
    }
    v->files = f;
    v->files[v->nfiles].name = name;
    v->files[v->nfiles].index = v->index;
    v->nfiles++;
}

/* Where a line of the stream is: its file and 1-based line number there. */
static void position(const struct kms_audit_verifier *v, uint64_t index, const char **file,
                     uint64_t *line)
{
    size_t k = 0;
    for (size_t i = 0; i < v->nfiles; i++)
        if (v->files[i].index <= index)
            k = i;
    *file = v->nfiles ? v->files[k].name : "-";
    *line = index - (v->nfiles ? v->files[k].index : 0) + 1;
}

/* "line 8", or "line 8 of FILE" when FILE is not the file of the line reported. */
static const char *name_line(const struct kms_audit_verifier *v, uint64_t index, uint64_t about,
                             char *out, size_t n)
{
    const char *f, *g;
    uint64_t l, m;
    position(v, index, &f, &l);
    position(v, about, &g, &m);
    if (f == g)
        snprintf(out, n, "line %" PRIu64, l);
    else
        snprintf(out, n, "line %" PRIu64 " of %s", l, f);
    return out;
}

__attribute__((format(printf, 4, 5))) static void report(struct kms_audit_verifier *v,
                                                         enum kms_audit_finding finding,
                                                         uint64_t index, const char *fmt, ...)
{
    char what[700];
    va_list ap;
    if (v->done)
        return;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    v->done = 1;
    v->rep.finding = finding;
    position(v, index, &v->rep.file, &v->rep.line);
    snprintf(v->rep.text, sizeof v->rep.text, "line %" PRIu64 ": %s", v->rep.line, what);
}

static const char *str_member(json_t *o, const char *name)
{
    json_t *m = json_object_get(o, name);
    return json_is_string(m) ? json_string_value(m) : NULL;
}

static int hex_member(json_t *o, const char *name, size_t len, char *out)
{
    const char *s = str_member(o, name);
    if (!s || strlen(s) != len || !kms_audit_is_hex(s, len))
        return 0;
    if (out)
        memcpy(out, s, len + 1);
    return 1;
}

static void unhex(const char *s, uint8_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int hi = s[2 * i] <= '9' ? s[2 * i] - '0' : s[2 * i] - 'a' + 10;
        int lo = s[2 * i + 1] <= '9' ? s[2 * i + 1] - '0' : s[2 * i + 1] - 'a' + 10;
        out[i] = (uint8_t)(hi << 4 | lo);
    }
}

/*
 * Parses and checks one line's form. 0 with the finding and why (without
 * "line N: ") when it is not an audit line.
 */
static int parse_line(const char *text, size_t n, int complete, struct line_info *L,
                      enum kms_audit_finding *finding, char *why, size_t why_len)
{
    json_error_t err;
    json_t *o = json_loadb(text, n, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &err);
    const char *type, *bad = NULL;
    char hex[65];
    json_t *seq, *ver;
    int ok = 0;

    if (!json_is_object(o)) {
        *finding = KMS_AUDIT_NOT_JSON;
        snprintf(why, why_len, "not JSON%s", complete ? "" : " (an incomplete line at the end)");
        json_decref(o);
        return 0;
    }
    *finding = KMS_AUDIT_NOT_AUDIT;
    ver = json_object_get(o, "v");
    seq = json_object_get(o, "seq");
    type = str_member(o, "type");
    if (!json_is_integer(ver) || json_integer_value(ver) != 1)
        bad = "\"v\" is not 1";
    else if (!type ||
             (strcmp(type, "request") && strcmp(type, "alert") && strcmp(type, "checkpoint") &&
              strcmp(type, "reopen") && strcmp(type, "intent") && strcmp(type, "outcome") &&
              strcmp(type, "recovery")))
        bad = "no known \"type\"";
    else if (!json_is_integer(seq) || json_integer_value(seq) < 1)
        bad = "no \"seq\"";
    else if (!hex_member(o, "log", 2 * KMS_AUDIT_LOG_ID_LEN, L->log))
        bad = "no \"log\"";
    else if (!hex_member(o, "prev", 64, hex))
        bad = "no \"prev\"";
    else if (!str_member(o, "time"))
        bad = "no \"time\"";
    if (!bad) {
        L->seq = (uint64_t)json_integer_value(seq);
        unhex(hex, L->prev, 32);
        /* An alert is in the chain as a request line is. */
        L->type = !strcmp(type, "request") || !strcmp(type, "alert") ? T_REQUEST
                  : !strcmp(type, "checkpoint")                      ? T_CHECKPOINT
                  : !strcmp(type, "reopen")                          ? T_REOPEN
                  : !strcmp(type, "intent")                          ? T_INTENT
                                                                     : T_OUTCOME;
        L->kind = K_NONE;
    }
    if (!bad && (L->type == T_INTENT || L->type == T_OUTCOME)) {
        const char *id = str_member(o, "request_id"), *result = str_member(o, "result");
        if (!id || !*id || strlen(id) > KMS_REQUEST_ID_MAX)
            bad = "no \"request_id\"";
        else if (L->type == T_OUTCOME &&
                 (!result || (strcmp(result, "committed") && strcmp(result, "not committed"))))
            bad = "no known \"result\"";
        else {
            snprintf(L->request_id, sizeof L->request_id, "%s", id);
            L->committed = L->type == T_OUTCOME && strcmp(result, "committed") == 0;
        }
    }
    if (!bad && L->type == T_CHECKPOINT) {
        const char *kind = str_member(o, "kind");
        L->kind = !kind                       ? K_NONE
                  : !strcmp(kind, "open")     ? K_OPEN
                  : !strcmp(kind, "periodic") ? K_PERIODIC
                  : !strcmp(kind, "rotate")   ? K_ROTATE
                  : !strcmp(kind, "close")    ? K_CLOSE
                                              : K_NONE;
        if (L->kind == K_NONE)
            bad = "no known checkpoint \"kind\"";
        else if (L->kind == K_OPEN && L->seq != 1)
            bad = "an opening checkpoint with \"seq\" other than 1";
        else if (!hex_member(o, "key", 2 * KMS_AUDIT_KEY_ID_LEN, NULL))
            bad = "no checkpoint \"key\"";
        else if (json_object_get(o, "after_log") &&
                 (!hex_member(o, "after_log", 2 * KMS_AUDIT_LOG_ID_LEN, L->after_log) ||
                  !hex_member(o, "after_hash", 64, L->after_hash) ||
                  !json_is_integer(json_object_get(o, "after_seq"))))
            bad = "a malformed \"after_*\"";
        else if (!hex_member(o, "mac", 64, NULL) || n < KMS_AUDIT_MAC_SUFFIX_LEN + 2 ||
                 memcmp(text + n - KMS_AUDIT_MAC_SUFFIX_LEN, KMS_AUDIT_MAC_MEMBER,
                        sizeof KMS_AUDIT_MAC_MEMBER - 1) != 0 ||
                 text[n - 1] != '}' || text[n - 2] != '"')
            bad = "no \"mac\" as its last member";
    }
    if (!bad && L->type == T_CHECKPOINT && L->after_log[0]) {
        L->has_after = 1;
        L->after_seq = (uint64_t)json_integer_value(json_object_get(o, "after_seq"));
    }
    if (!bad && L->type == T_CHECKPOINT && str_member(o, "node"))
        snprintf(L->node, sizeof L->node, "%s", str_member(o, "node"));
    if (bad) {
        snprintf(why, why_len, "not an audit line (%s)", bad);
    } else {
        ok = kms_sha256(text, n, L->hash) == KMS_OK;
    }
    json_decref(o);
    return ok;
}

/* 1: verifies, 0: does not, -1: unknown key, 2: not checked. */
static int check_mac(struct kms_audit_verifier *v, const char *text, size_t n, char *key_hex)
{
    json_t *o;
    uint8_t mac[32];
    char mac_hex[65];
    int r;

    if (!v->cfg.mac)
        return 2;
    o = json_loadb(text, n, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, NULL);
    if (!o)
        return 0;
    hex_member(o, "key", 2 * KMS_AUDIT_KEY_ID_LEN, key_hex);
    hex_member(o, "mac", 64, mac_hex);
    json_decref(o);
    unhex(mac_hex, mac, 32);
    /* The body: the line without `,"mac":"…"` and with its '}'. */
    uint8_t *body = malloc(n - KMS_AUDIT_MAC_SUFFIX_LEN + 1);
    if (!body)
        return 0;
    memcpy(body, text, n - KMS_AUDIT_MAC_SUFFIX_LEN);
    body[n - KMS_AUDIT_MAC_SUFFIX_LEN] = '}';
    r = v->cfg.mac(v->cfg.mac_arg, key_hex, body, n - KMS_AUDIT_MAC_SUFFIX_LEN + 1, mac);
    free(body);
    return r;
}

static struct chain *find_chain(struct kms_audit_verifier *v, const char *log)
{
    for (size_t i = 0; i < v->nchains; i++)
        if (strcmp(v->chains[i].log, log) == 0)
            return &v->chains[i];
    return NULL;
}

static const struct kms_audit_head *find_head(struct kms_audit_verifier *v, const char *log)
{
    for (size_t i = 0; i < v->cfg.nheads; i++)
        if (strcmp(v->cfg.heads[i].log, log) == 0)
            return &v->cfg.heads[i];
    return NULL;
}

/* The hash a chain's line of seq has, when known (its last line or a checkpoint); else NULL. */
static const uint8_t *hash_at(const struct chain *c, uint64_t seq, uint64_t *index)
{
    if (seq == c->last_seq) {
        *index = c->last_index;
        return c->last_hash;
    }
    for (size_t i = 0; i < c->nmarks; i++)
        if (c->marks[i].seq == seq) {
            *index = c->marks[i].index;
            return c->marks[i].hash;
        }
    return NULL;
}

static void start_chain(struct kms_audit_verifier *v, const struct line_info *L)
{
    struct chain *c = realloc(v->chains, (v->nchains + 1) * sizeof *c);
    if (!c) {
        report(v, KMS_AUDIT_NOT_JSON, L->index, "out of memory");
        return;
    }
    v->chains = c;
    c = &v->chains[v->nchains++];
    memcpy(c->log, L->log, sizeof c->log);
    c->first_seq = c->last_seq = L->seq;
    c->first_index = c->last_index = L->index;
    memcpy(c->last_hash, L->hash, 32);
    c->last_rotate = 0;
    c->head = find_head(v, L->log);
    c->marks = NULL;
    c->nmarks = 0;
    v->rep.logs++;
}

/* The database's head is past P in P's log, and P does not hand over to another file. */
static const struct kms_audit_head *cut_after(struct kms_audit_verifier *v,
                                              const struct line_info *P)
{
    struct chain *c = find_chain(v, P->log);
    if (!c || !c->head || c->head->seq <= P->seq)
        return NULL;
    if (P->type == T_CHECKPOINT && P->kind == K_ROTATE)
        return NULL;
    return c->head;
}

/*
 * An opening checkpoint names the last line of the run before on its node:
 * that run must be among the lines and reach it. 1 when it did (or the
 * opening names none, or the run is the first expected), 0 when reported.
 */
static int check_after(struct kms_audit_verifier *v, const struct line_info *L)
{
    char a[300];
    uint64_t at = 0;
    if (!L->has_after || (v->cfg.since && strcmp(v->cfg.since, L->log) == 0))
        return 1;
    struct chain *A = find_chain(v, L->after_log);
    if (!A) {
        report(v, KMS_AUDIT_MISSING_RUN, L->index,
               "lines are missing before it (the run before it on node %s, log %s up to seq "
               "%" PRIu64 ", is not among the files given)",
               L->node[0] ? L->node : "?", L->after_log, L->after_seq);
        return 0;
    }
    if (A->last_seq < L->after_seq) {
        report(v, KMS_AUDIT_MISSING, L->index,
               "lines are missing before it (log %s ends at %s with seq %" PRIu64
               ", but the run after it says it reached seq %" PRIu64 ")",
               A->log, name_line(v, A->last_index, L->index, a, sizeof a), A->last_seq,
               L->after_seq);
        return 0;
    }
    const uint8_t *h = hash_at(A, L->after_seq, &at);
    char hex[65];
    if (h) {
        kms_hex_encode(h, 32, hex);
        if (strcmp(hex, L->after_hash) != 0) {
            report(v, KMS_AUDIT_CHANGED, at,
                   "changed (the run after log %s records another hash for its seq %" PRIu64 ")",
                   A->log, L->after_seq);
            return 0;
        }
    }
    return 1;
}

/* Keeps count of intents and their results; those left without one are in the report. */
static void track_intent(struct kms_audit_verifier *v, const struct line_info *L)
{
    struct kms_audit_report *r = &v->rep;
    if (L->type == T_INTENT) {
        r->intents++;
        if (r->nopen == v->open_cap) {
            size_t cap = v->open_cap ? 2 * v->open_cap : 16;
            void *p = realloc(r->open, cap * sizeof *r->open);
            if (!p)
                return;
            r->open = p;
            v->open_cap = cap;
        }
        snprintf(r->open[r->nopen++], sizeof r->open[0], "%s", L->request_id);
        return;
    }
    if (L->type != T_OUTCOME)
        return;
    if (L->committed)
        r->committed++;
    else
        r->not_committed++;
    for (size_t i = r->nopen; i-- > 0;)
        if (strcmp(r->open[i], L->request_id) == 0) {
            memmove(r->open[i], r->open[i + 1], (r->nopen - i - 1) * sizeof r->open[0]);
            r->nopen--;
            return;
        }
}

void kms_audit_report_free(struct kms_audit_report *r)
{
    free(r->open);
    r->open = NULL;
    r->nopen = 0;
}

static const char *lines_missing(uint64_t n)
{
    return n == 1 ? "a line is missing" : "lines are missing";
}

/* The checks between a line and the line before it. */
static void check_order(struct kms_audit_verifier *v, const struct line_info *L)
{
    const struct line_info *P = &v->p;
    struct chain *X = find_chain(v, L->log);
    char a[300], b[300];

    if (!v->have_p) {
        if (L->type == T_CHECKPOINT && L->kind == K_OPEN && !check_after(v, L))
            ;
        else if (L->type == T_CHECKPOINT && L->kind == K_OPEN &&
                 memcmp(L->prev, zero_hash, 32) == 0)
            ;
        else if (L->type == T_REOPEN)
            ; /* the log goes on from an earlier file */
        else if (L->type == T_CHECKPOINT && L->kind == K_OPEN)
            report(v, KMS_AUDIT_MISSING, L->index,
                   "lines are missing before it (it follows a line that is not there)");
        else
            report(v, KMS_AUDIT_MISSING, L->index,
                   "lines are missing before it (the file begins with seq %" PRIu64
                   " of log %s, not with an opening checkpoint or a reopen line)",
                   L->seq, L->log);
        start_chain(v, L);
        return;
    }
    int prev_ok = memcmp(L->prev, P->hash, 32) == 0;
    name_line(v, P->index, L->index, a, sizeof a);

    if (strcmp(L->log, P->log) == 0) {
        uint64_t e = P->seq + 1;
        if (L->seq == e) {
            if (prev_ok)
                return;
            if (L->mac_ok)
                report(v, KMS_AUDIT_CHANGED, P->index,
                       "changed (its hash does not match %s's prev)",
                       name_line(v, L->index, P->index, b, sizeof b));
            else if (P->mac_ok)
                report(v, KMS_AUDIT_CHANGED, L->index, "changed (its prev does not match %s)", a);
            else
                v->pending = P_PREV;
        } else if (L->seq > e) {
            if (prev_ok) {
                report(v, KMS_AUDIT_CHANGED, L->index,
                       "changed (seq %" PRIu64 " where %" PRIu64 " was expected after %s)", L->seq,
                       e, a);
            } else {
                v->pending = P_SEARCH;
                v->at = *L;
                v->search_seq = e;
            }
        } else if (X && L->seq >= X->first_seq) {
            uint64_t j = X->first_index + (L->seq - X->first_seq);
            if (j == P->index && memcmp(L->hash, P->hash, 32) == 0)
                report(v, KMS_AUDIT_INSERTED, L->index, "inserted (a copy of %s)", a);
            else if (j == P->index && memcmp(L->prev, P->prev, 32) == 0 && !P->mac_ok)
                v->pending = P_RIVAL;
            else
                report(v, KMS_AUDIT_INSERTED, L->index, "inserted (seq %" PRIu64 " repeats %s)",
                       L->seq, name_line(v, j, L->index, b, sizeof b));
        } else {
            report(v, KMS_AUDIT_OUT_OF_ORDER, L->index,
                   "out of order (seq %" PRIu64 " after seq %" PRIu64 ")", L->seq, P->seq);
        }
        return;
    }

    /* Another log. */
    if (X && L->seq >= X->first_seq && L->seq <= X->last_seq) {
        report(v, KMS_AUDIT_INSERTED, L->index, "inserted (seq %" PRIu64 " of log %s repeats %s)",
               L->seq, L->log,
               name_line(v, X->first_index + (L->seq - X->first_seq), L->index, b, sizeof b));
        return;
    }
    if (X) {
        report(v, KMS_AUDIT_OUT_OF_ORDER, L->index,
               "out of order (log %s ended at %s; this line of it comes after %s of log %s)",
               L->log, name_line(v, X->last_index, L->index, b, sizeof b), a, P->log);
        return;
    }
    const struct kms_audit_head *rec = cut_after(v, P);
    if (L->type == T_CHECKPOINT && L->kind == K_OPEN) {
        /* A run that began in a new file (zeros) and names the run before it: linked so. */
        int linked = L->has_after && memcmp(L->prev, zero_hash, 32) == 0;
        if (!check_after(v, L))
            ;
        else if (rec)
            report(v, KMS_AUDIT_MISSING, L->index,
                   "lines are missing before it (log %s ends at %s with seq %" PRIu64
                   ", but the database's head of node %s records its checkpoint seq %" PRIu64 ")",
                   P->log, a, P->seq, rec->node, rec->seq);
        else if (linked)
            ;
        else if (!prev_ok && P->mac_ok)
            report(v, KMS_AUDIT_MISSING, L->index,
                   "lines are missing before it (its prev does not match %s)", a);
        else if (!prev_ok)
            report(v, KMS_AUDIT_CHANGED, P->index,
                   "changed, or lines after it were removed (its hash does not match %s's prev)",
                   name_line(v, L->index, P->index, b, sizeof b));
    } else {
        report(v, KMS_AUDIT_MISSING, L->index,
               "lines are missing before it (log %s begins here at seq %" PRIu64
               " without its opening checkpoint)",
               L->log, L->seq);
    }
    start_chain(v, L);
}

/* Decides a pending question with the next line (NULL: there is none). */
static void settle(struct kms_audit_verifier *v, const struct line_info *N)
{
    char a[300];
    const struct line_info *P = &v->p, *PP = &v->pp;
    switch (v->pending) {
    case P_PREV:
        /* P's prev does not match PP: if N follows P, P is intact and PP changed. */
        if (!N || memcmp(N->prev, P->hash, 32) == 0)
            report(v, KMS_AUDIT_CHANGED, PP->index, "changed (its hash does not match %s's prev)",
                   name_line(v, P->index, PP->index, a, sizeof a));
        else
            report(v, KMS_AUDIT_CHANGED, P->index, "changed (its prev does not match %s)",
                   name_line(v, PP->index, P->index, a, sizeof a));
        break;
    case P_RIVAL:
        /* P and PP claim one place: the one N follows is the real one. */
        if (N && memcmp(N->prev, P->hash, 32) == 0)
            report(v, KMS_AUDIT_INSERTED, PP->index,
                   "inserted (%s has its seq and the line after follows that one)",
                   name_line(v, P->index, PP->index, a, sizeof a));
        else
            report(v, KMS_AUDIT_INSERTED, P->index, "inserted (seq %" PRIu64 " repeats %s)", P->seq,
                   name_line(v, PP->index, P->index, a, sizeof a));
        break;
    case P_SEARCH:
        if (N) {
            report(v, KMS_AUDIT_OUT_OF_ORDER, v->at.index,
                   "out of order (seq %" PRIu64 " where %" PRIu64 " was expected; seq %" PRIu64
                   " is at %s)",
                   v->at.seq, v->search_seq, v->search_seq,
                   name_line(v, N->index, v->at.index, a, sizeof a));
        } else {
            uint64_t gone = v->at.seq - v->search_seq;
            report(v, KMS_AUDIT_MISSING, v->at.index,
                   "%s before it (seq %" PRIu64 " expected, %" PRIu64 " found)",
                   lines_missing(gone), v->search_seq, v->at.seq);
        }
        break;
    case P_NONE: break;
    }
    v->pending = P_NONE;
}

int kms_audit_verify_line(struct kms_audit_verifier *v, const char *text, size_t n, int complete)
{
    struct line_info L;
    enum kms_audit_finding finding;
    char why[200], key_hex[2 * KMS_AUDIT_KEY_ID_LEN + 1] = "";

    if (v->done)
        return 1;
    memset(&L, 0, sizeof L);
    L.index = v->index++;
    int parsed = parse_line(text, n, complete, &L, &finding, why, sizeof why);
    if (v->pending == P_SEARCH) {
        if (parsed && strcmp(L.log, v->at.log) == 0 && L.seq == v->search_seq)
            settle(v, &L);
        return v->done;
    }
    if (!parsed) {
        if (v->pending != P_NONE)
            settle(v, NULL);
        report(v, finding, L.index, "%s", why);
        return 1;
    }
    if (v->pending != P_NONE) {
        settle(v, &L);
        return 1;
    }
    v->rep.lines++;
    if (L.type == T_CHECKPOINT) {
        v->rep.checkpoints++;
        int r = check_mac(v, text, n, key_hex);
        if (r == 0) {
            report(v, KMS_AUDIT_BAD_MAC, L.index, "checkpoint MAC does not verify");
            return 1;
        }
        if (r < 0) {
            report(v, KMS_AUDIT_UNKNOWN_KEY, L.index,
                   "checkpoint made with key %s, which the token does not hold", key_hex);
            return 1;
        }
        if (r == 1) {
            L.mac_ok = 1;
            v->rep.macs_checked++;
        }
    }
    check_order(v, &L);
    if (!v->done && L.type == T_CHECKPOINT) {
        struct chain *c = find_chain(v, L.log);
        char hex[65];
        kms_hex_encode(L.hash, 32, hex);
        if (c && c->head && c->head->seq == L.seq && strcmp(hex, c->head->hash) != 0)
            report(v, KMS_AUDIT_CHANGED, L.index,
                   "changed (the database's head of node %s records another hash for "
                   "checkpoint seq %" PRIu64 ")",
                   c->head->node, L.seq);
        struct mark *m = c ? realloc(c->marks, (c->nmarks + 1) * sizeof *m) : NULL;
        if (m) {
            c->marks = m;
            m[c->nmarks].seq = L.seq;
            m[c->nmarks].index = L.index;
            memcpy(m[c->nmarks].hash, L.hash, 32);
            c->nmarks++;
        }
    }
    if (!v->done)
        track_intent(v, &L);
    if (!v->done) {
        struct chain *c = find_chain(v, L.log);
        if (c) {
            c->last_seq = L.seq;
            c->last_index = L.index;
            memcpy(c->last_hash, L.hash, 32);
            c->last_rotate = L.type == T_CHECKPOINT && L.kind == K_ROTATE;
        }
        v->pp = v->p;
        v->have_pp = v->have_p;
        v->p = L;
        v->have_p = 1;
    }
    return v->done;
}

void kms_audit_verify_finish(struct kms_audit_verifier *v, struct kms_audit_report *out)
{
    if (!v->done && v->pending != P_NONE)
        settle(v, NULL);
    if (!v->done && v->have_p) {
        const struct kms_audit_head *rec = cut_after(v, &v->p);
        if (rec) {
            /* Named as the line after the last: the first one missing. */
            const char *file;
            uint64_t line;
            position(v, v->p.index, &file, &line);
            v->done = 1;
            v->rep.finding = KMS_AUDIT_MISSING;
            v->rep.file = file;
            v->rep.line = line + 1;
            snprintf(v->rep.text, sizeof v->rep.text,
                     "line %" PRIu64 ": missing (the file ends at line %" PRIu64
                     " with seq %" PRIu64 " of log %s, but the database's head of node %s "
                     "records its checkpoint seq %" PRIu64 ")",
                     line + 1, line, v->p.seq, v->p.log, rec->node, rec->seq);
        }
    }
    /* A head names a log none of the lines are of: its run (or its newest file) is missing. */
    for (size_t i = 0; !v->done && i < v->cfg.nheads; i++) {
        const struct kms_audit_head *h = &v->cfg.heads[i];
        struct chain *c = find_chain(v, h->log);
        if (!c) {
            v->done = 1;
            v->rep.finding = KMS_AUDIT_MISSING_RUN;
            position(v, v->have_p ? v->p.index : 0, &v->rep.file, &v->rep.line);
            v->rep.line = v->have_p ? v->rep.line + 1 : 1;
            snprintf(v->rep.text, sizeof v->rep.text,
                     "line %" PRIu64 ": missing (the database's head of node %s names log %s "
                     "at seq %" PRIu64 ", which is not among the files given: that run's "
                     "file is missing)",
                     v->rep.line, h->node, h->log, h->seq);
        } else if (c->last_seq < h->seq && !c->last_rotate) {
            char a[300];
            uint64_t at = c->last_index;
            v->done = 1;
            v->rep.finding = KMS_AUDIT_MISSING;
            position(v, at, &v->rep.file, &v->rep.line);
            v->rep.line++;
            name_line(v, at, at, a, sizeof a);
            snprintf(v->rep.text, sizeof v->rep.text,
                     "line %" PRIu64 ": missing (log %s ends at %s with seq %" PRIu64
                     ", but the database's head of node %s records its checkpoint seq %" PRIu64 ")",
                     v->rep.line, h->log, a, c->last_seq, h->node, h->seq);
        }
    }
    if (!v->done) {
        v->rep.finding = KMS_AUDIT_INTACT;
        v->rep.file = NULL;
        v->rep.line = 0;
        v->rep.continues = v->have_p && v->p.type == T_CHECKPOINT && v->p.kind == K_ROTATE;
        if (!v->have_p)
            snprintf(v->rep.text, sizeof v->rep.text, "no lines");
        else
            snprintf(v->rep.text, sizeof v->rep.text,
                     "intact: %" PRIu64 " lines, %" PRIu64 " logs, %" PRIu64 " checkpoints",
                     v->rep.lines, v->rep.logs, v->rep.checkpoints);
    }
    *out = v->rep;
    free(v->files);
    for (size_t i = 0; i < v->nchains; i++)
        free(v->chains[i].marks);
    free(v->chains);
    free(v);
}
