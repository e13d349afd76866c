/*
 * Key policies: a parser that compiles a JSON policy document (the subset of
 * AWS's policy language described in docs/policy.md) and an evaluator that
 * answers, for one request, whether the policy allows it.
 *
 * Parsing does all the work that can be done ahead: actions become a bit set,
 * principal ARNs are resolved against the server's account, condition keys
 * and operators become enums. Evaluation walks the compiled statements only:
 * it allocates nothing, takes no lock and never touches JSON, so one parsed
 * policy may be evaluated by any number of threads at once.
 *
 * Strings are UTF-8 and compared as bytes; IgnoreCase folds ASCII letters
 * only, and the wildcard '?' matches one UTF-8 character.
 */
#ifndef P11KMS_POLICY_H
#define P11KMS_POLICY_H

#include <stdbool.h>
#include <stddef.h>

#include "common/blob.h"
#include "common/error.h"

/* Longest policy document, in bytes, as AWS's limit for key policies. */
#define KMS_POLICY_MAX_LEN 32768
/* Most statements in one document. */
#define KMS_POLICY_MAX_STATEMENTS 100
/*
 * Longest pattern (an Action, a Resource ARN, a StringLike or StringNotLike
 * value), in bytes, and most patterns (Resource ARNs and StringLike or
 * StringNotLike values) in one document: together with the encryption
 * context's bound they bound what one request can cost the policy's glob
 * matching (policy.c).
 */
#define KMS_POLICY_PATTERN_MAX 1024
#define KMS_POLICY_MAX_PATTERNS 256

struct kms_policy;

/* One request to decide. Every pointer but context must be non-NULL. */
struct kms_policy_request {
    const char *principal; /* the authenticated principal's name (credentials file) */
    const char *account;   /* the caller's account: the server's configured account */
    const char *action;    /* "kms:<Operation>", e.g. "kms:Decrypt" */
    const char *key_arn;   /* the ARN of the key the policy belongs to */
    /* The request's encryption context (bytes, not NUL-terminated); may be NULL when empty. */
    const struct kms_context_pair *context;
    size_t ncontext;
};

enum kms_policy_decision {
    KMS_POLICY_IMPLICIT_DENY, /* no statement allows the request */
    KMS_POLICY_ALLOW,         /* an Allow statement matches and no Deny does */
    KMS_POLICY_EXPLICIT_DENY, /* a Deny statement matches */
};

/*
 * Compiles a policy document.
 *
 * @param text    the document, len bytes (need not be NUL-terminated)
 * @param account the server's 12-digit account: arn:aws:iam::<account>:... principals
 *                name this service's principals, those of any other account match no one
 * @param out     receives the compiled policy, to release with kms_policy_free
 * @returns KMS_OK; KMS_ERR_MALFORMED_POLICY with a message naming the statement
 *          ("Statement #<index>", with its Sid when it has one) and the member at fault;
 *          KMS_ERR_INTERNAL when account is not 12 digits or memory runs out.
 */
KMS_MUST_CHECK kms_err kms_policy_parse(const char *text, size_t len, const char *account,
                                        struct kms_policy **out);

/*
 * Decides a request: an explicit Deny in any matching statement wins, else an
 * Allow in a matching statement allows, else the request is denied by default.
 * A request with a NULL field or an action that names no known operation is
 * denied by default.
 *
 * @param why     when non-NULL and why_len > 0, receives the deciding statement (its Sid,
 *                or "#<index>" counting from 0) for the audit log, truncated to fit; the
 *                empty string for an implicit deny
 * @returns the decision
 */
enum kms_policy_decision kms_policy_evaluate(const struct kms_policy *p,
                                             const struct kms_policy_request *r, char *why,
                                             size_t why_len);

void kms_policy_free(struct kms_policy *p);

/*
 * The policy of a key created without one: a single statement allowing
 * "kms:*" on the key to each of the n principals (given by name, written as
 * arn:aws:iam::<account>:user/<name>; duplicates are written once).
 *
 * @param out_json receives compact JSON text, NUL-terminated, that kms_policy_parse
 *                 accepts; the caller frees it with free()
 * @returns KMS_OK; KMS_ERR_VALIDATION when n is 0 or a name is not a principal name;
 *          KMS_ERR_INTERNAL when account is not 12 digits or memory runs out.
 */
KMS_MUST_CHECK kms_err kms_policy_default(const char *account, const char *const *principals,
                                          size_t n, char **out_json);

/*
 * Glob matching as policies use it: '*' matches any run of characters, '?'
 * one UTF-8 character (a stray byte or a cut-off sequence counts as one),
 * everything else itself, byte for byte (ASCII letters either case when
 * ignore_case). '*' and '?' take whole characters from where they start:
 * match(p, t) holds when p and t are empty; when p starts with '*' and
 * match(p + 1, u) for t or some u that t's leading characters can be cut
 * from; when p starts with '?' and match(p + 1, t less its first character);
 * when p's first byte is t's and match(p + 1, t + 1).
 *
 * Time: a bit-parallel NFA, at most text_len * (tokens / 64 + 1) word steps,
 * where tokens is pattern_len with runs of '*' counted once: linear in the
 * text for a bounded pattern, whatever either holds. Allocates
 * (34 + 5) * (tokens / 64 + 1) words for the call; false when it cannot.
 */
bool kms_policy_glob(const char *pattern, size_t pattern_len, const char *text, size_t text_len,
                     bool ignore_case);

/* Word steps this thread's glob matching has taken, for tests to check the bound above. */
extern _Thread_local unsigned long long kms_policy_glob_steps;

#endif
