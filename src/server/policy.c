#include "config.h"

#include "server/policy.h"

#include <jansson.h>
#include <stdalign.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common/buf.h"
#include "common/json_alloc.h"
#include "server/settings.h"

/* ---- the compiled form ------------------------------------------------------ */

struct glob;

/* A string from the document, NUL-terminated in the policy's arena. */
struct str {
    const char *p;
    size_t n;
    const struct glob *glob; /* compiled, when the string is a pattern */
};

enum principal_kind {
    PRINCIPAL_NAME, /* a bare name */
    PRINCIPAL_USER, /* arn:aws:iam::<our account>:user/<name> */
    PRINCIPAL_ROOT, /* arn:aws:iam::<our account>:root: everyone of the account */
    PRINCIPAL_NONE, /* an ARN of another account: matches no one here */
};

struct principal {
    enum principal_kind kind;
    struct str name;
};

enum cond_op { OP_EQ, OP_NEQ, OP_EQ_IC, OP_NEQ_IC, OP_LIKE, OP_NOTLIKE, OP_NULL, OP_BOOL };
enum cond_set { SET_NONE, SET_ALL, SET_ANY };
enum cond_key { KEY_CONTEXT, KEY_CONTEXT_KEYS, KEY_ACCOUNT, KEY_USERNAME };

struct condition {
    enum cond_op op;
    enum cond_set set;
    enum cond_key key;
    struct str context_key; /* KEY_CONTEXT: the encryption context key */
    const struct str *values;
    size_t nvalues;
    bool want_true, want_false; /* OP_NULL, OP_BOOL: the values, as booleans */
};

struct statement {
    struct str sid; /* p is NULL when the statement has none */
    size_t index;
    bool deny;
    uint64_t actions; /* bit i: operations[i] */
    bool any_principal;
    const struct principal *principals;
    size_t nprincipals;
    bool any_resource;
    const struct str *resources;
    size_t nresources;
    const struct condition *conditions;
    size_t nconditions;
};

/* Everything a policy holds lives in a list of blocks, released together. */
struct block {
    struct block *next;
    size_t used, cap;
    max_align_t data[];
};

struct kms_policy {
    struct block *arena;
    char account[13];
    const struct statement *statements;
    size_t n;
};

/* The operations a key policy governs: every key-scoped operation p11kms has. */
static const char *const operations[] = {
    "Encrypt",
    "Decrypt",
    "ReEncryptFrom",
    "ReEncryptTo",
    "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext",
    "DescribeKey",
    "EnableKey",
    "DisableKey",
    "ScheduleKeyDeletion",
    "CancelKeyDeletion",
    "EnableKeyRotation",
    "DisableKeyRotation",
    "GetKeyRotationStatus",
    "RotateKeyOnDemand",
    "ListKeyRotations",
    "CreateAlias",
    "UpdateAlias",
    "DeleteAlias",
    "PutKeyPolicy",
    "GetKeyPolicy",
    "ListKeyPolicies",
    /* asymmetric and HMAC keys */
    "GetPublicKey",
    "Sign",
    "Verify",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    /* grants */
    "CreateGrant",
    "ListGrants",
    "RevokeGrant",
    "RetireGrant",
    /* ---- tags ---- */
    "TagResource",
    "UntagResource",
    "ListResourceTags",
};
#define N_OPERATIONS (sizeof operations / sizeof operations[0])
_Static_assert(N_OPERATIONS <= 64, "the actions of a statement are a uint64_t");

#define ACTION_PREFIX "kms:"
#define ACTION_PREFIX_LEN (sizeof ACTION_PREFIX - 1)
#define CONTEXT_PREFIX "kms:EncryptionContext:"
#define CONTEXT_PREFIX_LEN (sizeof CONTEXT_PREFIX - 1)
#define ACCOUNT_LEN 12

/* ---- bytes ------------------------------------------------------------------ */

static unsigned char fold(unsigned char c)
{
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c - 'A' + 'a') : c;
}

static bool bytes_equal(const char *a, size_t an, const char *b, size_t bn, bool ignore_case)
{
    if (an != bn)
        return false;
    if (!ignore_case)
        return memcmp(a, b, an) == 0;
    for (size_t i = 0; i < an; i++)
        if (fold((unsigned char)a[i]) != fold((unsigned char)b[i]))
            return false;
    return true;
}

static bool str_is(const char *s, const char *lit, bool ignore_case)
{
    return bytes_equal(s, strlen(s), lit, strlen(lit), ignore_case);
}

static bool has_prefix(const char *s, size_t n, const char *prefix, size_t pn, bool ignore_case)
{
    return n >= pn && bytes_equal(s, pn, prefix, pn, ignore_case);
}

/* Bytes in the UTF-8 character at s[i]: a malformed or cut-off sequence counts as one byte. */
static size_t char_len(const char *s, size_t i, size_t n)
{
    unsigned char c = (unsigned char)s[i];
    size_t len = c < 0xc0 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : c < 0xf8 ? 4 : 1;
    if (len > n - i)
        return 1;
    for (size_t k = 1; k < len; k++)
        if (((unsigned char)s[i + k] & 0xc0) != 0x80)
            return 1;
    return len;
}

/*
 * Glob matching in time linear in the text: the pattern's NFA simulated
 * bit-parallel (shift-and). Tokens are the pattern's bytes, a run of '*'
 * counted as one; bit p of a state vector says "the first p tokens match the
 * text read so far", bit m (all of them) is the match. A literal moves its
 * bit on by one byte when the byte is its own; '?' moves it on by one
 * character; '*' keeps it and, matching nothing, also sets the next bit. So
 * '*' and '?' consume whole characters from where they start, literals bytes.
 *
 * A literal's byte is found through two masks per position, one by the
 * byte's high nibble and one by its low nibble: the positions whose byte is
 * c are hi[c >> 4] & lo[c & 15]. Per text byte the cost is a few operations
 * per 64 tokens, whatever the pattern: n * ceil((m + 1) / 64) words, never
 * a rescan.
 */
#define GLOB_HI 0
#define GLOB_LO 16
#define GLOB_ANY 32  /* '?' */
#define GLOB_STAR 33 /* '*' */
#define GLOB_MASKS 34
#define GLOB_AHEAD 5 /* state vectors kept: this position and the 4 a character can reach */

struct glob {
    size_t m;     /* tokens */
    size_t words; /* 64-bit words per state vector: bits 0..m */
    bool ignore_case;
    uint64_t *mask; /* GLOB_MASKS vectors of words each */
};

static size_t glob_tokens(const char *pattern, size_t n)
{
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (!(pattern[i] == '*' && i > 0 && pattern[i - 1] == '*'))
            m++;
    return m;
}

static size_t glob_words(size_t m)
{
    return m / 64 + 1;
}

static void set_bit(uint64_t *v, size_t bit)
{
    v[bit / 64] |= UINT64_C(1) << (bit % 64);
}

/* mask: GLOB_MASKS * glob_words(glob_tokens(pattern)) zeroed words, kept by g. */
static void glob_compile(const char *pattern, size_t n, bool ignore_case, uint64_t *mask,
                         struct glob *g)
{
    size_t p = 0;
    g->m = glob_tokens(pattern, n);
    g->words = glob_words(g->m);
    g->ignore_case = ignore_case;
    g->mask = mask;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)pattern[i];
        if (c == '*' && i > 0 && pattern[i - 1] == '*')
            continue;
        if (c == '*' || c == '?') {
            set_bit(mask + (c == '*' ? GLOB_STAR : GLOB_ANY) * g->words, p++);
            continue;
        }
        if (ignore_case)
            c = fold(c);
        set_bit(mask + (GLOB_HI + (c >> 4)) * g->words, p);
        set_bit(mask + (GLOB_LO + (c & 15)) * g->words, p);
        p++;
    }
}

_Thread_local unsigned long long kms_policy_glob_steps;

/* Bit p + 1 for every '*' at p that has bit p: a '*' matching nothing (runs are one token). */
static uint64_t glob_close(const uint64_t *star, size_t w, uint64_t x, uint64_t *carry)
{
    uint64_t s = x & star[w];
    x |= (s << 1) | *carry;
    *carry = s >> 63;
    return x;
}

/*
 * One text byte c: the positions of cur (closed over '*' here) move on, a
 * literal matching c to to1 (the next byte), '?' and '*' to to (the next
 * character; to may be to1). cur is left empty. Returns which of them got
 * bits: 1 for to1, 2 for to.
 */
static unsigned glob_step(const struct glob *g, uint64_t *cur, unsigned char c, uint64_t *to1,
                          uint64_t *to)
{
    const size_t W = g->words;
    const uint64_t *hi = g->mask + (GLOB_HI + (c >> 4)) * W;
    const uint64_t *lo = g->mask + (GLOB_LO + (c & 15)) * W;
    const uint64_t *any = g->mask + GLOB_ANY * W, *star = g->mask + GLOB_STAR * W;
    uint64_t closed = 0, lit_c = 0, any_c = 0, got1 = 0, got = 0;

    for (size_t w = 0; w < W; w++) {
        uint64_t x = glob_close(star, w, cur[w], &closed);
        uint64_t lit = x & hi[w] & lo[w], q = x & any[w];
        uint64_t o1 = (lit << 1) | lit_c, o = (q << 1) | any_c | (x & star[w]);
        lit_c = lit >> 63;
        any_c = q >> 63;
        to1[w] |= o1;
        to[w] |= o;
        got1 |= o1;
        got |= o;
        cur[w] = 0;
    }
    return (got1 ? 1u : 0u) | (got ? 2u : 0u);
}

/* ring: GLOB_AHEAD * g->words words of scratch. */
static bool glob_run(const struct glob *g, const char *text, size_t n, uint64_t *ring)
{
    const size_t W = g->words;
    bool live[GLOB_AHEAD] = {true};
    size_t pending = 1; /* vectors of the ring that hold bits */

    memset(ring, 0, GLOB_AHEAD * W * sizeof *ring);
    ring[0] = 1;
    for (size_t t = 0; t < n && pending; t++) {
        size_t slot = t % GLOB_AHEAD;
        if (!live[slot])
            continue;
        unsigned char c = (unsigned char)text[t];
        size_t one = (t + 1) % GLOB_AHEAD, next = (t + char_len(text, t, n)) % GLOB_AHEAD;
        unsigned got = glob_step(g, ring + slot * W, g->ignore_case ? fold(c) : c, ring + one * W,
                                 ring + next * W);
        kms_policy_glob_steps += W;
        live[slot] = false;
        pending--;
        if ((got & 1) && !live[one]) {
            live[one] = true;
            pending++;
        }
        if ((got & 2) && !live[next]) {
            live[next] = true;
            pending++;
        }
    }
    const uint64_t *cur = ring + (n % GLOB_AHEAD) * W, *star = g->mask + GLOB_STAR * W;
    if (!pending || !live[n % GLOB_AHEAD])
        return false;
    uint64_t carry = 0, last = 0;
    for (size_t w = 0; w <= g->m / 64; w++)
        last = glob_close(star, w, cur[w], &carry);
    return (last >> (g->m % 64)) & 1;
}

bool kms_policy_glob(const char *pattern, size_t pattern_len, const char *text, size_t text_len,
                     bool ignore_case)
{
    size_t words = glob_words(glob_tokens(pattern, pattern_len));
    uint64_t *mem = calloc((GLOB_MASKS + GLOB_AHEAD) * words, sizeof *mem);
    struct glob g;
    bool r;

    if (!mem)
        return false;
    glob_compile(pattern, pattern_len, ignore_case, mem, &g);
    r = glob_run(&g, text, text_len, mem + GLOB_MASKS * words);
    free(mem);
    return r;
}

/*
 * A document's string clipped for a message or the audit log: whole UTF-8
 * characters only (so the result is valid UTF-8 however it is cut), control
 * characters and stray bytes shown as '?'. Returns out.
 */
static const char *clip(char *out, size_t cap, const char *s, size_t n)
{
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t len = char_len(s, i, n);
        unsigned char c = (unsigned char)s[i];
        bool shown = len > 1 || (c >= 0x20 && c < 0x7f);
        size_t need = shown ? len : 1;
        if (o + need >= cap)
            break;
        if (shown)
            memcpy(out + o, s + i, len);
        else
            out[o] = '?';
        o += need;
        i += len;
    }
    if (cap)
        out[o] = '\0';
    return out;
}

#define SHOW_MAX 40
/* A scratch buffer for one clipped string in a message. */
#define SHOW(buf, s) clip((buf), sizeof(buf), (s), strlen(s))

/* ---- the arena ---------------------------------------------------------------- */

static void *arena_alloc(struct kms_policy *p, size_t n)
{
    const size_t align = alignof(max_align_t);
    if (n > SIZE_MAX / 2)
        return NULL;
    n = (n + align - 1) / align * align;
    struct block *b = p->arena;
    if (!b || b->cap - b->used < n) {
        size_t cap = n > 4096 ? n : 4096;
        b = calloc(1, sizeof *b + cap);
        if (!b)
            return NULL;
        b->cap = cap;
        b->next = p->arena;
        p->arena = b;
    }
    void *r = (unsigned char *)b->data + b->used;
    b->used += n;
    return r;
}

void kms_policy_free(struct kms_policy *p)
{
    if (!p)
        return;
    for (struct block *b = p->arena, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    free(p);
}

/* ---- parsing ------------------------------------------------------------------ */

struct parser {
    struct kms_policy *p;
    const char *account;
    size_t npatterns; /* patterns compiled so far */
    char where[96];   /* "Statement #3 (\"Sid\")": the statement being compiled */
};

#define MALFORMED(...) KMS_FAIL(KMS_ERR_MALFORMED_POLICY, __VA_ARGS__)

static kms_err out_of_memory(void)
{
    return KMS_FAIL(KMS_ERR_INTERNAL, "out of memory");
}

/* n zeroed elements of size bytes from the arena; NULL when memory runs out. */
static void *alloc_array(struct parser *ps, size_t n, size_t size)
{
    if (n && size > SIZE_MAX / 2 / n)
        return NULL;
    return arena_alloc(ps->p, n > 0 ? n * size : 1);
}

static kms_err keep(struct parser *ps, const char *s, size_t n, struct str *out)
{
    char *copy = arena_alloc(ps->p, n + 1);
    if (!copy)
        return out_of_memory();
    memcpy(copy, s, n);
    copy[n] = '\0';
    out->p = copy;
    out->n = n;
    out->glob = NULL;
    return KMS_OK;
}

/* A pattern's length is bounded, so that matching it costs a bounded number of words a byte. */
static kms_err check_pattern(struct parser *ps, const char *member, const char *s, size_t n)
{
    char show[SHOW_MAX];
    if (n > KMS_POLICY_PATTERN_MAX)
        return MALFORMED("%s: %s \"%s...\" is %zu bytes, more than %d", ps->where, member,
                         clip(show, sizeof show, s, n), n, KMS_POLICY_PATTERN_MAX);
    return KMS_OK;
}

/* keep, plus the pattern compiled for matching; patterns per policy are bounded. */
static kms_err keep_pattern(struct parser *ps, const char *member, const char *s, size_t n,
                            struct str *out)
{
    KMS_GUARD(check_pattern(ps, member, s, n));
    if (ps->npatterns == KMS_POLICY_MAX_PATTERNS)
        return MALFORMED("%s: %s: the policy has more than %d patterns (Resource ARNs and "
                         "StringLike/StringNotLike values)",
                         ps->where, member, KMS_POLICY_MAX_PATTERNS);
    ps->npatterns++;
    KMS_GUARD(keep(ps, s, n, out));
    size_t words = glob_words(glob_tokens(s, n));
    struct glob *g = arena_alloc(ps->p, sizeof *g);
    uint64_t *mask = alloc_array(ps, GLOB_MASKS * words, sizeof *mask);
    if (!g || !mask)
        return out_of_memory();
    glob_compile(out->p, n, false, mask, g);
    out->glob = g;
    return KMS_OK;
}

/* Matching a compiled pattern of the policy: its scratch fits on the stack. */
#define GLOB_WORDS_MAX (KMS_POLICY_PATTERN_MAX / 64 + 1)
static bool pattern_matches(const struct str *pattern, const char *text, size_t n)
{
    uint64_t ring[GLOB_AHEAD * GLOB_WORDS_MAX];
    return pattern->glob && pattern->glob->words <= GLOB_WORDS_MAX &&
           glob_run(pattern->glob, text, n, ring);
}

static bool is_account(const char *s, size_t n)
{
    if (n != ACCOUNT_LEN)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] < '0' || s[i] > '9')
            return false;
    return true;
}

static bool is_principal_name(const char *s, size_t n)
{
    if (n == 0 || n > KMS_PRINCIPAL_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (s[i] == '\0' || !strchr(KMS_PRINCIPAL_CHARS, s[i]))
            return false;
    return true;
}

/*
 * A member that is a string or a non-empty array of strings, read as a list:
 * sets *n to the number of strings, each then found with list_at.
 */
static kms_err string_list(struct parser *ps, const char *member, json_t *v, size_t *n)
{
    if (json_is_string(v)) {
        *n = 1;
        return KMS_OK;
    }
    if (!json_is_array(v) || json_array_size(v) == 0)
        return MALFORMED("%s: %s must be a string or a non-empty array of strings", ps->where,
                         member);
    for (size_t i = 0; i < json_array_size(v); i++)
        if (!json_is_string(json_array_get(v, i)))
            return MALFORMED("%s: %s must be a string or a non-empty array of strings", ps->where,
                             member);
    *n = json_array_size(v);
    return KMS_OK;
}

static json_t *list_at(json_t *v, size_t i)
{
    return json_is_array(v) ? json_array_get(v, i) : v;
}

static kms_err compile_principal(struct parser *ps, json_t *js, struct statement *st,
                                 struct principal *out)
{
    static const char arn[] = "arn:aws:iam::";
    const char *s = json_string_value(js);
    size_t n = json_string_length(js);
    char show[SHOW_MAX];

    out->kind = PRINCIPAL_NONE;
    if (n == 1 && s[0] == '*') {
        st->any_principal = true;
        return KMS_OK;
    }
    if (has_prefix(s, n, "arn:", 4, false)) {
        const char *rest = s + sizeof arn - 1;
        size_t left = n - (sizeof arn - 1);
        if (!has_prefix(s, n, arn, sizeof arn - 1, false) || left < ACCOUNT_LEN + 1 ||
            !is_account(rest, ACCOUNT_LEN) || rest[ACCOUNT_LEN] != ':')
            return MALFORMED("%s: Principal \"%s\" is not arn:aws:iam::<12-digit account>:...",
                             ps->where, SHOW(show, s));
        bool ours = memcmp(rest, ps->account, ACCOUNT_LEN) == 0;
        const char *res = rest + ACCOUNT_LEN + 1;
        size_t res_n = left - ACCOUNT_LEN - 1;
        if (res_n == 4 && memcmp(res, "root", 4) == 0) {
            out->kind = ours ? PRINCIPAL_ROOT : PRINCIPAL_NONE;
            return KMS_OK;
        }
        if (has_prefix(res, res_n, "user/", 5, false) && is_principal_name(res + 5, res_n - 5)) {
            out->kind = ours ? PRINCIPAL_USER : PRINCIPAL_NONE;
            return keep(ps, res + 5, res_n - 5, &out->name);
        }
        return MALFORMED("%s: Principal \"%s\" is not supported: only :root and :user/<name>",
                         ps->where, SHOW(show, s));
    }
    /* AWS reads a bare account number as the account's root: too easily taken for a name. */
    if (is_account(s, n))
        return MALFORMED("%s: Principal \"%s\" is ambiguous: write arn:aws:iam::%s:root or "
                         "arn:aws:iam::%s:user/%s",
                         ps->where, s, s, ps->account, s);
    if (!is_principal_name(s, n))
        return MALFORMED("%s: Principal \"%s\" is not a principal name (1-%d of A-Z a-z 0-9 "
                         "_.@+=,-)",
                         ps->where, SHOW(show, s), KMS_PRINCIPAL_MAX);
    out->kind = PRINCIPAL_NAME;
    return keep(ps, s, n, &out->name);
}

static kms_err compile_principals(struct parser *ps, json_t *v, struct statement *st)
{
    static const char shape[] = "Principal must be \"*\" or {\"AWS\": principals}";
    const char *k;
    json_t *m, *aws = NULL;
    size_t n = 0;
    struct principal *list;

    if (json_is_string(v)) {
        if (!str_is(json_string_value(v), "*", false))
            return MALFORMED("%s: %s", ps->where, shape);
        st->any_principal = true;
        return KMS_OK;
    }
    if (!json_is_object(v) || json_object_size(v) == 0)
        return MALFORMED("%s: %s", ps->where, shape);
    json_object_foreach(v, k, m)
    {
        char show[SHOW_MAX];
        if (strcmp(k, "AWS") != 0)
            return MALFORMED("%s: Principal \"%s\" is not supported: only \"AWS\"", ps->where,
                             SHOW(show, k));
        aws = m;
    }
    KMS_GUARD(string_list(ps, "Principal AWS", aws, &n));
    if (!(list = alloc_array(ps, n, sizeof *list)))
        return out_of_memory();
    for (size_t i = 0; i < n; i++)
        KMS_GUARD(compile_principal(ps, list_at(aws, i), st, &list[i]));
    st->principals = list;
    st->nprincipals = n;
    return KMS_OK;
}

static kms_err compile_actions(struct parser *ps, json_t *v, struct statement *st)
{
    size_t n = 0;
    KMS_GUARD(string_list(ps, "Action", v, &n));
    for (size_t i = 0; i < n; i++) {
        json_t *js = list_at(v, i);
        const char *s = json_string_value(js);
        size_t len = json_string_length(js);
        char show[SHOW_MAX];
        uint64_t bits = 0;

        if (len == 1 && s[0] == '*') {
            st->actions = N_OPERATIONS == 64 ? UINT64_MAX : (UINT64_C(1) << N_OPERATIONS) - 1;
            continue;
        }
        KMS_GUARD(check_pattern(ps, "Action", s, len));
        if (!has_prefix(s, len, ACTION_PREFIX, ACTION_PREFIX_LEN, true))
            return MALFORMED("%s: Action \"%s\" does not start with kms:", ps->where,
                             SHOW(show, s));
        for (size_t op = 0; op < N_OPERATIONS; op++)
            if (kms_policy_glob(s + ACTION_PREFIX_LEN, len - ACTION_PREFIX_LEN, operations[op],
                                strlen(operations[op]), true))
                bits |= UINT64_C(1) << op;
        if (!bits)
            return MALFORMED("%s: Action \"%s\" matches no operation", ps->where, SHOW(show, s));
        st->actions |= bits;
    }
    return KMS_OK;
}

static kms_err compile_resources(struct parser *ps, json_t *v, struct statement *st)
{
    size_t n = 0;
    struct str *list;
    KMS_GUARD(string_list(ps, "Resource", v, &n));
    if (!(list = alloc_array(ps, n, sizeof *list)))
        return out_of_memory();
    for (size_t i = 0; i < n; i++) {
        json_t *js = list_at(v, i);
        const char *s = json_string_value(js);
        size_t len = json_string_length(js);
        char show[SHOW_MAX];
        if (len == 1 && s[0] == '*') {
            st->any_resource = true;
            KMS_GUARD(keep(ps, s, len, &list[i]));
            continue;
        }
        if (!has_prefix(s, len, "arn:", 4, false))
            return MALFORMED("%s: Resource \"%s\" is neither \"*\" nor an ARN", ps->where,
                             SHOW(show, s));
        KMS_GUARD(keep_pattern(ps, "Resource", s, len, &list[i]));
    }
    st->resources = list;
    st->nresources = n;
    return KMS_OK;
}

static const struct {
    const char *name;
    enum cond_op op;
} operators[] = {
    {"StringEquals", OP_EQ},
    {"StringNotEquals", OP_NEQ},
    {"StringEqualsIgnoreCase", OP_EQ_IC},
    {"StringNotEqualsIgnoreCase", OP_NEQ_IC},
    {"StringLike", OP_LIKE},
    {"StringNotLike", OP_NOTLIKE},
    {"Null", OP_NULL},
    {"Bool", OP_BOOL},
};

/* Operator names are case-sensitive, as AWS's. */
static kms_err compile_operator(struct parser *ps, const char *name, struct condition *c)
{
    static const char all[] = "ForAllValues:", any[] = "ForAnyValue:";
    const char *base = name;
    char show[SHOW_MAX];

    c->set = SET_NONE;
    if (strncmp(name, all, sizeof all - 1) == 0) {
        c->set = SET_ALL;
        base = name + sizeof all - 1;
    } else if (strncmp(name, any, sizeof any - 1) == 0) {
        c->set = SET_ANY;
        base = name + sizeof any - 1;
    }
    for (size_t i = 0; i < sizeof operators / sizeof operators[0]; i++) {
        if (strcmp(base, operators[i].name) != 0)
            continue;
        c->op = operators[i].op;
        if (c->set != SET_NONE && (c->op == OP_NULL || c->op == OP_BOOL))
            return MALFORMED("%s: Condition operator \"%s\" is not supported", ps->where,
                             SHOW(show, name));
        return KMS_OK;
    }
    return MALFORMED("%s: Condition operator \"%s\" is not supported", ps->where, SHOW(show, name));
}

/* Condition key names are case-insensitive; an encryption context key is not. */
static kms_err compile_key(struct parser *ps, const char *op, const char *name, struct condition *c)
{
    size_t n = strlen(name);
    char show[SHOW_MAX], show_op[SHOW_MAX];

    if (has_prefix(name, n, CONTEXT_PREFIX, CONTEXT_PREFIX_LEN, true)) {
        if (n == CONTEXT_PREFIX_LEN)
            return MALFORMED("%s: Condition %s: key \"%s\" names no encryption context key",
                             ps->where, SHOW(show_op, op), SHOW(show, name));
        c->key = KEY_CONTEXT;
        KMS_GUARD(keep(ps, name + CONTEXT_PREFIX_LEN, n - CONTEXT_PREFIX_LEN, &c->context_key));
    } else if (str_is(name, "kms:EncryptionContextKeys", true)) {
        c->key = KEY_CONTEXT_KEYS;
    } else if (str_is(name, "kms:CallerAccount", true)) {
        c->key = KEY_ACCOUNT;
    } else if (str_is(name, "aws:username", true)) {
        c->key = KEY_USERNAME;
    } else {
        return MALFORMED("%s: Condition %s: key \"%s\" is not supported", ps->where,
                         SHOW(show_op, op), SHOW(show, name));
    }
    /* Multi-valued keys take set operators, single-valued ones plain operators. */
    bool multi = c->key == KEY_CONTEXT_KEYS;
    if (multi && c->op == OP_BOOL)
        return MALFORMED("%s: Condition %s: key \"%s\" has many values: Bool does not apply",
                         ps->where, SHOW(show_op, op), SHOW(show, name));
    if (multi && c->op != OP_NULL && c->set == SET_NONE)
        return MALFORMED("%s: Condition %s: key \"%s\" has many values: use ForAllValues:%s or "
                         "ForAnyValue:%s",
                         ps->where, SHOW(show_op, op), SHOW(show, name), show_op, show_op);
    if (!multi && c->set != SET_NONE)
        return MALFORMED("%s: Condition %s: key \"%s\" has one value: drop the ForAllValues:/"
                         "ForAnyValue: prefix",
                         ps->where, SHOW(show_op, op), SHOW(show, name));
    return KMS_OK;
}

static kms_err compile_values(struct parser *ps, const char *op, const char *key, json_t *v,
                              struct condition *c)
{
    bool boolean = c->op == OP_NULL || c->op == OP_BOOL;
    size_t n = json_is_array(v) ? json_array_size(v) : 1;
    char show[SHOW_MAX], show_op[SHOW_MAX], show_key[SHOW_MAX];
    struct str *list;

    if (n == 0 || json_is_object(v))
        n = 0;
    for (size_t i = 0; i < n; i++) {
        json_t *e = list_at(v, i);
        if (!json_is_string(e) && !(boolean && json_is_boolean(e)))
            n = 0;
    }
    if (n == 0)
        return MALFORMED(boolean ? "%s: Condition %s: key \"%s\" takes \"true\", \"false\" or an "
                                   "array of them"
                                 : "%s: Condition %s: key \"%s\" takes a string or a non-empty "
                                   "array of strings",
                         ps->where, SHOW(show_op, op), SHOW(show, key));
    if (!(list = alloc_array(ps, n, sizeof *list)))
        return out_of_memory();
    for (size_t i = 0; i < n; i++) {
        json_t *e = list_at(v, i);
        if (boolean) {
            const char *s = json_is_string(e) ? json_string_value(e) : NULL;
            if (json_is_true(e) || (s && strcmp(s, "true") == 0))
                c->want_true = true;
            else if (json_is_false(e) || (s && strcmp(s, "false") == 0))
                c->want_false = true;
            else
                return MALFORMED("%s: Condition %s: key \"%s\" takes \"true\" or \"false\", not "
                                 "\"%s\"",
                                 ps->where, SHOW(show_op, op), SHOW(show_key, key),
                                 s ? SHOW(show, s) : "?");
        } else if (c->op == OP_LIKE || c->op == OP_NOTLIKE) {
            KMS_GUARD(keep_pattern(ps, "Condition value", json_string_value(e),
                                   json_string_length(e), &list[i]));
        } else {
            KMS_GUARD(keep(ps, json_string_value(e), json_string_length(e), &list[i]));
        }
    }
    c->values = list;
    c->nvalues = boolean ? 0 : n;
    return KMS_OK;
}

static kms_err compile_conditions(struct parser *ps, json_t *v, struct statement *st)
{
    const char *op, *key;
    json_t *keys, *values;
    size_t n = 0, i = 0;
    struct condition *list;
    char show[SHOW_MAX];

    if (!json_is_object(v) || json_object_size(v) == 0)
        return MALFORMED("%s: Condition must be a non-empty object", ps->where);
    json_object_foreach(v, op, keys)
    {
        if (!json_is_object(keys) || json_object_size(keys) == 0)
            return MALFORMED("%s: Condition %s must be a non-empty object of keys", ps->where,
                             SHOW(show, op));
        n += json_object_size(keys);
    }
    if (!(list = alloc_array(ps, n, sizeof *list)))
        return out_of_memory();
    json_object_foreach(v, op, keys)
    {
        json_object_foreach(keys, key, values)
        {
            struct condition *c = &list[i++];
            KMS_GUARD(compile_operator(ps, op, c));
            KMS_GUARD(compile_key(ps, op, key, c));
            KMS_GUARD(compile_values(ps, op, key, values, c));
        }
    }
    st->conditions = list;
    st->nconditions = n;
    return KMS_OK;
}

static bool has_control(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || *s == 0x7f)
            return true;
    return false;
}

static kms_err compile_statement(struct parser *ps, json_t *j, size_t index,
                                 const struct statement *earlier, struct statement *st)
{
    static const char *const members[] = {"Sid",    "Effect",   "Principal",
                                          "Action", "Resource", "Condition"};
    json_t *sid = json_object_get(j, "Sid"), *v, *m;
    const char *k;
    char show[SHOW_MAX];

    st->index = index;
    snprintf(ps->where, sizeof ps->where, "Statement #%zu", index);
    if (sid) {
        if (!json_is_string(sid) || json_string_length(sid) == 0 ||
            has_control(json_string_value(sid)))
            return MALFORMED("%s: Sid must be a non-empty string without control characters",
                             ps->where);
        KMS_GUARD(keep(ps, json_string_value(sid), json_string_length(sid), &st->sid));
        snprintf(ps->where, sizeof ps->where, "Statement #%zu (\"%s\")", index,
                 clip(show, 32, st->sid.p, st->sid.n));
        for (size_t i = 0; i < index; i++)
            if (earlier[i].sid.p && strcmp(earlier[i].sid.p, st->sid.p) == 0)
                return MALFORMED("%s: Sid is the same as Statement #%zu's", ps->where, i);
    }
    json_object_foreach(j, k, m)
    {
        size_t i = 0;
        while (i < sizeof members / sizeof members[0] && strcmp(k, members[i]) != 0)
            i++;
        if (i < sizeof members / sizeof members[0])
            continue;
        if (strcmp(k, "NotPrincipal") == 0 || strcmp(k, "NotAction") == 0 ||
            strcmp(k, "NotResource") == 0)
            return MALFORMED("%s: %s is not supported", ps->where, k);
        return MALFORMED("%s: unknown member \"%s\"", ps->where, SHOW(show, k));
    }

    v = json_object_get(j, "Effect");
    if (!v)
        return MALFORMED("%s: Effect is missing", ps->where);
    if (json_is_string(v) && strcmp(json_string_value(v), "Deny") == 0)
        st->deny = true;
    else if (!json_is_string(v) || strcmp(json_string_value(v), "Allow") != 0)
        return MALFORMED("%s: Effect must be \"Allow\" or \"Deny\"", ps->where);

    if (!(v = json_object_get(j, "Principal")))
        return MALFORMED("%s: Principal is missing", ps->where);
    KMS_GUARD(compile_principals(ps, v, st));
    if (!(v = json_object_get(j, "Action")))
        return MALFORMED("%s: Action is missing", ps->where);
    KMS_GUARD(compile_actions(ps, v, st));
    if (!(v = json_object_get(j, "Resource")))
        return MALFORMED("%s: Resource is missing", ps->where);
    KMS_GUARD(compile_resources(ps, v, st));
    if ((v = json_object_get(j, "Condition")))
        KMS_GUARD(compile_conditions(ps, v, st));
    return KMS_OK;
}

static kms_err compile_document(struct parser *ps, json_t *doc)
{
    const char *k;
    json_t *v, *statements;
    char show[SHOW_MAX];
    struct statement *list;
    size_t n;

    if (!json_is_object(doc))
        return MALFORMED("the policy must be a JSON object");
    json_object_foreach(doc, k, v)
    {
        if (strcmp(k, "Version") != 0 && strcmp(k, "Id") != 0 && strcmp(k, "Statement") != 0)
            return MALFORMED("policy: unknown member \"%s\"", SHOW(show, k));
    }
    v = json_object_get(doc, "Version");
    if (v && !(json_is_string(v) && (strcmp(json_string_value(v), "2012-10-17") == 0 ||
                                     strcmp(json_string_value(v), "2008-10-17") == 0)))
        return MALFORMED("policy: Version must be \"2012-10-17\" or \"2008-10-17\"");
    v = json_object_get(doc, "Id");
    if (v && (!json_is_string(v) || json_string_length(v) == 0))
        return MALFORMED("policy: Id must be a non-empty string");

    statements = json_object_get(doc, "Statement");
    if (!statements)
        return MALFORMED("policy: Statement is missing");
    if (json_is_object(statements))
        n = 1;
    else if (json_is_array(statements) && json_array_size(statements) > 0)
        n = json_array_size(statements);
    else
        return MALFORMED("policy: Statement must be an object or a non-empty array of objects");
    if (n > KMS_POLICY_MAX_STATEMENTS)
        return MALFORMED("policy: Statement has %zu entries, more than %d", n,
                         KMS_POLICY_MAX_STATEMENTS);
    if (!(list = alloc_array(ps, n, sizeof *list)))
        return out_of_memory();
    for (size_t i = 0; i < n; i++) {
        json_t *j = list_at(statements, i);
        if (!json_is_object(j))
            return MALFORMED("Statement #%zu must be an object", i);
        KMS_GUARD(compile_statement(ps, j, i, list, &list[i]));
    }
    ps->p->statements = list;
    ps->p->n = n;
    return KMS_OK;
}

kms_err kms_policy_parse(const char *text, size_t len, const char *account, struct kms_policy **out)
{
    struct parser ps = {0};
    json_error_t jerr;
    json_t *doc;
    kms_err rc;

    KMS_ENSURE(out != NULL && (text != NULL || len == 0), KMS_ERR_INTERNAL,
               "kms_policy_parse: no text or no output");
    *out = NULL;
    KMS_ENSURE(account && is_account(account, strlen(account)), KMS_ERR_INTERNAL,
               "kms_policy_parse: the account must be 12 digits");
    KMS_ENSURE(len <= KMS_POLICY_MAX_LEN, KMS_ERR_MALFORMED_POLICY,
               "the policy is %zu bytes, more than %d", len, KMS_POLICY_MAX_LEN);
    /* jansson refuses invalid UTF-8, control characters in strings and \u0000. */
    doc = json_loadb(text ? text : "", len, JSON_REJECT_DUPLICATES, &jerr);
    if (!doc) {
        char show[SHOW_MAX * 2];
        return MALFORMED("the policy is not valid JSON: %s (line %d, column %d)",
                         clip(show, sizeof show, jerr.text, strlen(jerr.text)), jerr.line,
                         jerr.column);
    }
    ps.account = account;
    ps.p = calloc(1, sizeof *ps.p);
    if (!ps.p) {
        json_decref(doc);
        return out_of_memory();
    }
    memcpy(ps.p->account, account, ACCOUNT_LEN + 1);
    rc = compile_document(&ps, doc);
    json_decref(doc);
    if (rc != KMS_OK) {
        kms_policy_free(ps.p);
        return rc;
    }
    *out = ps.p;
    return KMS_OK;
}

/* ---- evaluation ------------------------------------------------------------------ */

static int operation_index(const char *action)
{
    size_t n = strlen(action);
    if (!has_prefix(action, n, ACTION_PREFIX, ACTION_PREFIX_LEN, true))
        return -1;
    for (size_t i = 0; i < N_OPERATIONS; i++)
        if (str_is(action + ACTION_PREFIX_LEN, operations[i], true))
            return (int)i;
    return -1;
}

static bool principal_matches(const struct kms_policy *p, const struct statement *st,
                              const struct kms_policy_request *r)
{
    if (st->any_principal)
        return true;
    bool same_account = strcmp(r->account, p->account) == 0;
    for (size_t i = 0; i < st->nprincipals; i++) {
        const struct principal *pr = &st->principals[i];
        switch (pr->kind) {
        case PRINCIPAL_NAME:
            if (strcmp(pr->name.p, r->principal) == 0)
                return true;
            break;
        case PRINCIPAL_USER:
            if (same_account && strcmp(pr->name.p, r->principal) == 0)
                return true;
            break;
        case PRINCIPAL_ROOT:
            if (same_account)
                return true;
            break;
        case PRINCIPAL_NONE: break;
        }
    }
    return false;
}

static bool resource_matches(const struct statement *st, const struct kms_policy_request *r)
{
    if (st->any_resource)
        return true;
    size_t n = strlen(r->key_arn);
    for (size_t i = 0; i < st->nresources; i++)
        if (pattern_matches(&st->resources[i], r->key_arn, n))
            return true;
    return false;
}

/* One request value against one condition value, by the operator without its negation. */
static bool value_matches(enum cond_op op, const char *v, size_t n, const struct str *want)
{
    switch (op) {
    case OP_EQ:
    case OP_NEQ: return bytes_equal(v, n, want->p, want->n, false);
    case OP_EQ_IC:
    case OP_NEQ_IC: return bytes_equal(v, n, want->p, want->n, true);
    case OP_LIKE:
    case OP_NOTLIKE: return pattern_matches(want, v, n);
    case OP_NULL:
    case OP_BOOL: break;
    }
    return false;
}

static bool negated(enum cond_op op)
{
    return op == OP_NEQ || op == OP_NEQ_IC || op == OP_NOTLIKE;
}

/*
 * Whether one request value passes: it matches any of the values (OR), or,
 * for a negated operator, none of them (NOR).
 */
static bool value_passes(const struct condition *c, const char *v, size_t n)
{
    bool any = false;
    for (size_t i = 0; i < c->nvalues && !any; i++)
        any = value_matches(c->op, v, n, &c->values[i]);
    return negated(c->op) ? !any : any;
}

/* The request's value of a single-valued key; false when it has none. */
static bool single_value(const struct condition *c, const struct kms_policy_request *r,
                         const char **v, size_t *n)
{
    switch (c->key) {
    case KEY_CONTEXT:
        for (size_t i = 0; i < r->ncontext; i++) {
            const struct kms_context_pair *pair = &r->context[i];
            if (bytes_equal(pair->key, pair->key_len, c->context_key.p, c->context_key.n, false)) {
                *v = pair->value;
                *n = pair->value_len;
                return true;
            }
        }
        return false;
    case KEY_ACCOUNT: *v = r->account; break;
    case KEY_USERNAME: *v = r->principal; break;
    case KEY_CONTEXT_KEYS: return false;
    }
    *n = strlen(*v);
    return true;
}

static bool condition_holds(const struct condition *c, const struct kms_policy_request *r)
{
    const char *v = NULL;
    size_t n = 0;

    if (c->key == KEY_CONTEXT_KEYS) {
        if (c->op == OP_NULL)
            return r->ncontext == 0 ? c->want_true : c->want_false;
        /* ForAllValues: every key passes (true for none); ForAnyValue: one does. */
        for (size_t i = 0; i < r->ncontext; i++) {
            bool pass = value_passes(c, r->context[i].key, r->context[i].key_len);
            if (c->set == SET_ALL && !pass)
                return false;
            if (c->set == SET_ANY && pass)
                return true;
        }
        return c->set == SET_ALL;
    }
    bool present = single_value(c, r, &v, &n);
    switch (c->op) {
    case OP_NULL: return present ? c->want_false : c->want_true;
    case OP_BOOL:
        return present && ((c->want_true && bytes_equal(v, n, "true", 4, true)) ||
                           (c->want_false && bytes_equal(v, n, "false", 5, true)));
    default:
        /* As AWS: a missing key fails a plain operator and passes a negated one. */
        return present ? value_passes(c, v, n) : negated(c->op);
    }
}

static bool statement_matches(const struct kms_policy *p, const struct statement *st,
                              const struct kms_policy_request *r)
{
    if (!principal_matches(p, st, r) || !resource_matches(st, r))
        return false;
    for (size_t i = 0; i < st->nconditions; i++)
        if (!condition_holds(&st->conditions[i], r))
            return false;
    return true;
}

static void name_statement(const struct statement *st, char *why, size_t why_len)
{
    if (!why || !why_len)
        return;
    if (st->sid.p)
        clip(why, why_len, st->sid.p, st->sid.n);
    else
        snprintf(why, why_len, "#%zu", st->index);
}

enum kms_policy_decision kms_policy_evaluate(const struct kms_policy *p,
                                             const struct kms_policy_request *r, char *why,
                                             size_t why_len)
{
    const struct statement *allow = NULL;

    if (why && why_len)
        why[0] = '\0';
    if (!p || !r || !r->principal || !r->account || !r->action || !r->key_arn ||
        (r->ncontext && !r->context))
        return KMS_POLICY_IMPLICIT_DENY;
    int op = operation_index(r->action);
    if (op < 0)
        return KMS_POLICY_IMPLICIT_DENY;
    uint64_t bit = UINT64_C(1) << op;
    for (size_t i = 0; i < p->n; i++) {
        const struct statement *st = &p->statements[i];
        /* Once allowed, only a Deny can change the answer. */
        if (!(st->actions & bit) || (allow && !st->deny) || !statement_matches(p, st, r))
            continue;
        if (st->deny) {
            name_statement(st, why, why_len);
            return KMS_POLICY_EXPLICIT_DENY;
        }
        allow = st;
    }
    if (!allow)
        return KMS_POLICY_IMPLICIT_DENY;
    name_statement(allow, why, why_len);
    return KMS_POLICY_ALLOW;
}

/* ---- the default policy ----------------------------------------------------------- */

kms_err kms_policy_default(const char *account, const char *const *principals, size_t n,
                           char **out_json)
{
    struct kms_buf text = KMS_BUF_INIT;
    json_t *arns, *doc;
    kms_err rc = KMS_OK;

    KMS_ENSURE(out_json != NULL && (principals != NULL || n == 0), KMS_ERR_INTERNAL,
               "kms_policy_default: no principals or no output");
    *out_json = NULL;
    KMS_ENSURE(account && is_account(account, strlen(account)), KMS_ERR_INTERNAL,
               "kms_policy_default: the account must be 12 digits");
    KMS_ENSURE(n > 0, KMS_ERR_VALIDATION, "the default policy needs at least one principal");
    for (size_t i = 0; i < n; i++) {
        char show[SHOW_MAX];
        KMS_ENSURE(principals[i] && is_principal_name(principals[i], strlen(principals[i])),
                   KMS_ERR_VALIDATION, "\"%s\" is not a principal name",
                   principals[i] ? SHOW(show, principals[i]) : "(null)");
    }

    arns = json_array();
    KMS_ENSURE(arns != NULL, KMS_ERR_INTERNAL, "out of memory");
    for (size_t i = 0; i < n && rc == KMS_OK; i++) {
        char arn[sizeof "arn:aws:iam::123456789012:user/" + KMS_PRINCIPAL_MAX];
        size_t k = 0;
        while (k < i && strcmp(principals[k], principals[i]) != 0)
            k++;
        if (k < i)
            continue;
        snprintf(arn, sizeof arn, "arn:aws:iam::%s:user/%s", account, principals[i]);
        if (json_array_append_new(arns, json_string(arn)) != 0)
            rc = out_of_memory();
    }
    if (rc != KMS_OK) {
        json_decref(arns);
        return rc;
    }
    /* "o" hands arns over to doc, even when packing fails. */
    doc = json_pack("{s:s, s:s, s:[{s:s, s:s, s:{s:o}, s:s, s:s}]}", "Version", "2012-10-17", "Id",
                    "key-default-1", "Statement", "Sid", "Default", "Effect", "Allow", "Principal",
                    "AWS", arns, "Action", "kms:*", "Resource", "*");
    KMS_ENSURE(doc != NULL, KMS_ERR_INTERNAL, "out of memory");
    rc = kms_json_dump(doc, 0, &text);
    json_decref(doc);
    if (rc == KMS_OK)
        rc = kms_buf_terminate(&text);
    if (rc != KMS_OK) {
        kms_buf_free(&text);
        return rc;
    }
    if (text.len > KMS_POLICY_MAX_LEN) {
        kms_buf_free(&text);
        return KMS_FAIL(KMS_ERR_VALIDATION,
                        "the default policy for %zu principals is over %d bytes", n,
                        KMS_POLICY_MAX_LEN);
    }
    *out_json = (char *)text.data; /* malloc'd by kms_buf; nothing secret in it */
    return KMS_OK;
}
