#!/usr/bin/python3
"""libp11kms's tag and grant calls (src/client/manage.c) through the p11kms
CLI (tag, untag, tags; grant create, list, retire, revoke) against a real
p11kmsd on a fresh SoftHSM2 token: what each prints for people and with
--json, its exit codes (docs/cli.md: 1 the service refused, 2 usage or a
bad argument the library caught before sending), and the effect checked
through boto3 and raw requests rather than through the CLI itself. Grants
take effect for another principal (bob) on a key whose policy gives him
nothing: allowed with the grant's context, refused without it or once the
grant is retired or revoked; 101 grants make ListGrants answer two pages,
which the library joins. The grant tests are skipped (TAP SKIP) only when
the server answers CreateGrant with UnknownOperationException. TAP output."""

import json
import os
import re
import subprocess
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test
TIMEOUT = 120
ALICE_ARN = "arn:aws:iam::%s:user/alice" % h.ACCOUNT
BOB_ARN = "arn:aws:iam::%s:user/bob" % h.ACCOUNT


class Ctx:
    ws = None
    server = None
    alice = None
    bob = None
    kms = None
    grants = None  # None: not asked yet; False: the server has no CreateGrant


C = Ctx()


def cli_path():
    path = os.environ.get("P11KMS_CLI") or os.path.normpath(os.path.join(h.HERE, "..", "..",
                                                                          "p11kms"))
    if not os.access(path, os.X_OK):
        raise RuntimeError("p11kms is not built at %s" % path)
    return path


def cli_env(principal=None):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and not k.startswith("P11KMS_")}
    p = principal or C.alice
    env.update(HOME=C.ws.sub("home"), AWS_CONFIG_FILE="/dev/null",
               AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_ACCESS_KEY_ID=p.access_key,
               AWS_SECRET_ACCESS_KEY=p.secret, AWS_REGION=h.REGION,
               P11KMS_ENDPOINT=C.server.endpoint)
    return env


def run(args, principal=None):
    """Runs p11kms; returns (exit status, stdout text, stderr text)."""
    r = subprocess.run([cli_path()] + list(args), env=cli_env(principal), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
    return r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8", "replace")


def ok(args, principal=None):
    rc, out, err = run(args, principal)
    eq((rc, err), (0, ""), "p11kms %s" % " ".join(args))
    return out


def ok_json(args, principal=None):
    return json.loads(ok(["--json"] + list(args), principal) or "null")


def fails(args, code, error_type):
    rc, out, err = run(["--json"] + list(args))
    eq(rc, code, "exit status of p11kms %s (stderr %r)" % (" ".join(args), err))
    check(err.startswith("p11kms: %s: " % error_type), "stderr names %s: %r" % (error_type, err))
    return err


def setup():
    C.ws = h.Workspace()
    C.alice = h.new_principal("alice")
    C.bob = h.new_principal("bob")
    token = h.make_token(C.ws.sub("token"), "p11kms-it-manage")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.alice, C.bob])
    config = h.write_config(C.ws.sub("p11kmsd.conf"), token, creds)
    C.server = h.start_config_server(config, token, C.ws.sub("p11kmsd.log"))
    os.makedirs(C.ws.sub("home"), exist_ok=True)
    C.kms = h.kms_client(C.server.endpoint, C.alice)
    h.diag("p11kmsd serving %s" % C.server.endpoint)


def teardown():
    h.finish(T, C.ws, C.server)


def new_key(policy=None):
    kw = {"Policy": json.dumps(policy)} if policy else {}
    return C.kms.create_key(**kw)["KeyMetadata"]["KeyId"]


def tags_of(key):
    return [(t["TagKey"], t["TagValue"]) for t in C.kms.list_resource_tags(KeyId=key)["Tags"]]


# ---- tags -----------------------------------------------------------------------------


@test
def test_tag_untag_tags():
    key = new_key()
    eq(ok(["tag", "--key", key, "team=blue", "empty=", "expr=a=b", "été=août"]), "",
       "tag prints nothing")
    eq(tags_of(key), [("empty", ""), ("expr", "a=b"), ("team", "blue"), ("été", "août")],
       "the tags the service holds")
    eq(ok(["tags", "--key", key]).splitlines(),
       ["empty  ", "expr  a=b", "team  blue", "été  août"], "tags for people")
    eq(ok_json(["tags", "-k", key]),
       {"Tags": [{"TagKey": k, "TagValue": v} for k, v in tags_of(key)]}, "tags --json")
    ok(["tag", "--key", key, "team=green"])
    ok(["untag", "--key", key, "empty", "missing"])
    eq(tags_of(key), [("expr", "a=b"), ("team", "green"), ("été", "août")], "after untag")
    eq(ok_json(["tags", "--key", new_key()]), {"Tags": []}, "an untagged key")


@test
def test_fifty_tags_and_the_limit():
    key = new_key()
    ok(["tag", "--key", key] + ["t%02d=%d" % (i, i) for i in range(50)])
    got = ok_json(["tags", "--key", key])["Tags"]
    eq([t["TagKey"] for t in got], ["t%02d" % i for i in range(50)], "50 tags, in order")
    err = fails(["tag", "--key", key, "one=too-many"], 1, "LimitExceededException")
    check("50" in err, "the message says the limit: %r" % err)


@test
def test_tag_errors_and_exit_codes():
    key = new_key()
    # refused by the service: exit 1, AWS's type
    fails(["tag", "--key", key, "aws:name=x"], 1, "TagException")
    fails(["untag", "--key", key, "AWS:name"], 1, "TagException")
    fails(["tag", "--key", "00000000-0000-4000-8000-000000000000", "a=b"], 1, "NotFoundException")
    C.kms.create_alias(AliasName="alias/manage-tags", TargetKeyId=key)
    fails(["tags", "--key", "alias/manage-tags"], 1, "NotFoundException")
    pending = new_key()
    C.kms.schedule_key_deletion(KeyId=pending, PendingWindowInDays=7)
    fails(["tag", "--key", pending, "a=b"], 1, "KMSInvalidStateException")
    # caught before anything is sent: exit 2
    fails(["tag", "--key", key, "k" * 129 + "=v"], 2, "InvalidArgument")
    fails(["tag", "--key", key, "é" * 129 + "=v"], 2, "InvalidArgument")
    fails(["tag", "--key", key, "k=" + "€" * 257], 2, "InvalidArgument")
    fails(["tag", "--key", key, "dup=1", "dup=2"], 2, "InvalidArgument")
    fails(["tag", "--key", key] + ["t%02d=" % i for i in range(51)], 2, "InvalidArgument")
    # the command line itself: exit 2
    for args in (["tag", "--key", key], ["tag", "--key", key, "novalue"],
                 ["tag", "--key", key, "=v"], ["tag", "a=b"], ["untag", "--key", key],
                 ["tags"], ["tags", "--key", key, "extra"]):
        rc, out, err = run(args)
        eq(rc, 2, "p11kms %s exits 2 (stderr %r)" % (" ".join(args), err))
    # aliases list: AWS's largest ListAliases page is 100 (its usage always said --page-size)
    eq(run(["aliases", "list", "--page-size", "101"])[0], 2, "aliases list --page-size 101")
    eq(ok_json(["aliases", "list", "--page-size", "100"])["Aliases"][0]["AliasName"],
       "alias/manage-tags", "aliases list --page-size 100")
    eq(tags_of(key), [], "nothing was tagged by the refusals")
    # 128 characters of é (256 bytes) are a valid tag key
    ok(["tag", "--key", key, "é" * 128 + "=" + "€" * 256])
    eq(tags_of(key), [("é" * 128, "€" * 256)], "the longest tag")


@test
def test_help_within_80_columns():
    for args in (["--help"], ["tag", "--help"], ["untag", "--help"], ["tags", "--help"],
                 ["grant", "--help"], ["grant", "create", "--help"], ["grant", "list", "--help"],
                 ["grant", "retire", "--help"], ["grant", "revoke", "--help"]):
        out = ok(args)
        long = [line for line in out.splitlines() if len(line) > 80]
        eq(long, [], "p11kms %s: lines over 80 columns" % " ".join(args))
    check("grant: create list retire revoke" in ok(["--help"]), "the grant group in --help")


# ---- grants ---------------------------------------------------------------------------


def need_grants():
    if C.grants is None:
        r = h.kms_call(C.server.endpoint, "CreateGrant",
                       {"KeyId": new_key(), "GranteePrincipal": BOB_ARN,
                        "Operations": ["Decrypt"]}, C.alice)
        C.grants = not (r.status == 400 and r.json().get("__type") == "UnknownOperationException")
    if not C.grants:
        raise h.Skip("this p11kmsd has no CreateGrant (UnknownOperationException)")


def alice_only_key():
    """A key whose policy gives bob nothing: what bob may do, grants give him."""
    return new_key({"Version": "2012-10-17", "Statement": [
        {"Sid": "Alice", "Effect": "Allow", "Principal": {"AWS": ALICE_ARN}, "Action": "kms:*",
         "Resource": "*"}]})


def bob_generates(key, context=None):
    """GenerateDataKey by bob: None when allowed, else the error type."""
    body = {"KeyId": key, "KeySpec": "AES_256"}
    if context is not None:
        body["EncryptionContext"] = context
    r = h.kms_call(C.server.endpoint, "GenerateDataKey", body, C.bob)
    return None if r.status == 200 else r.json()["__type"]


def create(args):
    out = ok(["grant", "create"] + args)
    m = re.search(r"GrantId\W+([0-9a-f]{64})", out)
    check(m and "GrantToken" in out, "grant create prints GrantId and GrantToken: %r" % out)
    return m.group(1)


@test
def test_grant_create_list_use():
    need_grants()
    key = alice_only_key()
    eq(bob_generates(key, {"purpose": "test"}), "AccessDeniedException", "bob before any grant")
    made = ok_json(["grant", "create", "--key", key, "--grantee", BOB_ARN, "--operations",
                    "GenerateDataKey,Decrypt", "--context-subset", "purpose=test",
                    "--name", "nightly-job"])
    eq(sorted(made), ["GrantId", "GrantToken"], "grant create --json members")
    check(re.match(r"^[0-9a-f]{64}$", made["GrantId"]), "a 64-hex GrantId: %r" % made)
    check(made["GrantToken"], "a GrantToken")
    # the same name and arguments again: the same grant (AWS's idempotent retry)
    again = ok_json(["grant", "create", "--key", key, "--grantee", BOB_ARN, "--operations",
                     "GenerateDataKey,Decrypt", "--context-subset", "purpose=test",
                     "--name", "nightly-job"])
    eq(again["GrantId"], made["GrantId"], "a retry with the same name")
    eq(bob_generates(key, {"purpose": "test", "more": "x"}), None, "bob within the grant")
    eq(bob_generates(key, {"purpose": "other"}), "AccessDeniedException", "another context")
    eq(bob_generates(key), "AccessDeniedException", "no context")
    listed = ok_json(["grant", "list", "--key", key])["Grants"]
    eq(len(listed), 1, "one grant listed: %r" % listed)
    g = listed[0]
    eq((g["GrantId"], g["GranteePrincipal"], sorted(g["Operations"]), g["Name"],
        g["Constraints"]),
       (made["GrantId"], BOB_ARN, ["Decrypt", "GenerateDataKey"], "nightly-job",
        {"EncryptionContextSubset": {"purpose": "test"}}), "the listed grant")
    check("_operations" not in g, "no table-only member in JSON")
    people = ok(["grant", "list", "--key", key])
    check(made["GrantId"] in people and "Decrypt" in people, "grant list for people: %r" % people)
    # the service's view agrees
    aws = C.kms.list_grants(KeyId=key)["Grants"]
    eq([x["GrantId"] for x in aws], [made["GrantId"]], "ListGrants through boto3")
    C.grant_key = key
    C.grant_id = made["GrantId"]


@test
def test_grant_equals_constraint():
    need_grants()
    key = alice_only_key()
    create(["--key", key, "--grantee", BOB_ARN, "--operations", "GenerateDataKey",
            "--context-equals", "a=1", "--context-equals", "b=2"])
    eq(bob_generates(key, {"a": "1", "b": "2"}), None, "exactly the pairs")
    eq(bob_generates(key, {"a": "1", "b": "2", "c": "3"}), "AccessDeniedException", "one more")
    g = ok_json(["grant", "list", "--key", key])["Grants"][0]
    eq(g["Constraints"], {"EncryptionContextEquals": {"a": "1", "b": "2"}}, "listed constraint")


@test
def test_grant_revoke_and_retire():
    need_grants()
    key = C.grant_key
    eq(ok(["grant", "revoke", "--key", key, "--grant-id", C.grant_id]), "", "revoke prints nothing")
    eq(ok_json(["grant", "list", "--key", key]), {"Grants": []}, "no grant after revoke")
    eq(bob_generates(key, {"purpose": "test"}), "AccessDeniedException", "bob after the revoke")
    # retire by token (alice is its retiring principal)
    made = ok_json(["grant", "create", "--key", key, "--grantee", BOB_ARN, "--retiring",
                    ALICE_ARN, "--operations", "GenerateDataKey"])
    eq(bob_generates(key), None, "bob with an unconstrained grant")
    ok(["grant", "retire", "--token", made["GrantToken"]])
    eq(bob_generates(key), "AccessDeniedException", "bob after the retire")
    # retire by key and grant id
    gid = create(["--key", key, "--grantee", BOB_ARN, "--retiring", ALICE_ARN, "--operations",
                  "Decrypt"])
    ok(["grant", "retire", "--key", key, "--grant-id", gid])
    eq(ok_json(["grant", "list", "--key", key]), {"Grants": []}, "no grant after the retires")
    # a grant id the key does not have: the service refuses (exit 1)
    rc, _, err = run(["grant", "revoke", "--key", key, "--grant-id", gid])
    eq(rc, 1, "revoke of a grant already retired (stderr %r)" % err)


@test
def test_grant_list_pages():
    need_grants()
    key = alice_only_key()
    made = set()
    for i in range(101):
        r = h.kms_ok(C.server.endpoint, "CreateGrant",
                     {"KeyId": key, "GranteePrincipal": BOB_ARN, "Operations": ["Decrypt"],
                      "Name": "g%03d" % i}, C.alice)
        made.add(r["GrantId"])
    page = C.kms.list_grants(KeyId=key, Limit=100)
    eq((len(page["Grants"]), page["Truncated"]), (100, True), "ListGrants' largest page")
    listed = ok_json(["grant", "list", "--key", key])["Grants"]
    eq(len(listed), 101, "grant list joins the pages")
    eq({g["GrantId"] for g in listed}, made, "every grant once")


@test
def test_grant_argument_errors():
    key = new_key()
    # caught by the library or the command line before anything is sent: exit 2, always
    for args in (["grant", "create", "--key", key, "--grantee", BOB_ARN, "--operations",
                  "Decrypt,ListKeys"],
                 ["grant", "create", "--key", key, "--grantee", BOB_ARN, "--operations",
                  "Decrypt,,Encrypt"],
                 ["grant", "create", "--key", key, "--grantee", BOB_ARN, "--operations",
                  "Decrypt", "--name", "a name"],
                 ["grant", "create", "--key", key, "--grantee", BOB_ARN, "--operations",
                  "Decrypt", "--context-subset", "a=1", "--context-equals", "b=2"],
                 ["grant", "create", "--key", key, "--grantee", BOB_ARN, "--operations",
                  "Decrypt", "--context-subset", "novalue"],
                 ["grant", "create", "--key", key, "--operations", "Decrypt"],
                 ["grant", "retire", "--token", "t", "--key", key],
                 ["grant", "retire", "--key", key],
                 ["grant", "retire", "--key", key, "--grant-id", "abc"],
                 ["grant", "revoke", "--key", key],
                 ["grant", "revoke", "--key", key, "--grant-id", "A" * 64],
                 ["grant", "list"]):
        rc, out, err = run(args)
        eq(rc, 2, "p11kms %s exits 2 (stderr %r)" % (" ".join(args), err))


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
