#!/usr/bin/python3
"""Grants (CreateGrant, ListGrants, ListRetirableGrants, RetireGrant,
RevokeGrant) end to end with boto3 and the aws CLI, unmodified, against two
p11kmsd nodes on one SQLite database (each with its own copy of the token, as
test_multinode.py sets them up). TAP output.

With P11KMS_TEST_PG_URL set (tests/integration/test_grants_pg.sh runs it under
tests/pgserver.sh) both nodes use that PostgreSQL database instead, and its
change feed carries the changes.

Node A polls the change sequence every 50 ms, node B every 3 s: a grant made
on A is usable on B with its grant token at once (a token naming a grant B
has not read makes B read the key again), long before B's poll; a grant
retired or revoked on one node stops working there at once and on the other
within that node's bound (its refresh_ms plus a read, with room to spare).

What is checked, with exact error types and HTTP statuses:
  - a principal no statement of the key policy names is refused Decrypt
    (InvalidCiphertextException, as every refused blob: docs/policy.md) and
    GenerateDataKey (AccessDeniedException); after CreateGrant(Decrypt,
    GenerateDataKey, EncryptionContextSubset) it may, only with a context
    holding the constrained pairs (keys without case, values exactly);
    EncryptionContextEquals wants the context exactly; a policy's explicit
    deny beats every grant; the audit line says "allow grant <id>";
  - ReEncrypt through grants of ReEncryptFrom (source key) and ReEncryptTo
    (destination key); Sign through a grant on an ECC key, Verify not granted;
  - ListGrants pages 1,000 grants of one key exactly once (Limit 100,
    Truncated, NextMarker); GrantId and GranteePrincipal filters;
  - RetireGrant (by token, by the retiring principal; by KeyId and GrantId, by
    the grantee of a grant with RetireGrant) and RevokeGrant; ListRetirableGrants;
  - the same Name and parameters give the same GrantId; another grantee a new one;
  - grant operations must suit the key (ValidationException), constraints
    only on symmetric encryption keys;
  - 11 grant tokens: ValidationException; a garbled token:
    InvalidGrantTokenException; a malformed grant id: InvalidGrantIdException;
    a well-formed unknown one: NotFoundException (404);
  - a key's destruction removes its grants (checked in the database);
  - CreateGrant, RetireGrant and RevokeGrant are audited changes: the request
    line names the key and the grant, and an intent line with the request's
    id says it committed.
"""

import base64
import glob
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
REFRESH_MS = {"a": 50, "b": 3000}
# A change acknowledged by one node is seen by the other within its
# refresh_ms plus a read; two seconds of room for a loaded machine.
BOUND = {name: ms / 1000.0 + 2.0 for name, ms in REFRESH_MS.items()}
SETTINGS = {
    "day_seconds": "1",
    "pending_min_days": "1",
    "admin_principals": "admin",
    "rate_manage": "0",
}
GRANT_ID = re.compile(r"^[0-9a-f]{64}$")
PAGED = 1000


PG_URL = os.environ.get("P11KMS_TEST_PG_URL")


class Ctx:
    ws = None
    db = None        # the database URL both nodes use
    a = b = None
    admin = alice = bob = carol = None
    key = None       # a key whose policy names admin only
    denying = None   # a key whose policy denies alice kms:Decrypt
    blob_acme = None  # under key, context tenant=acme, purpose=test
    blob_evil = None  # under key, context tenant=evil, purpose=test


C = Ctx()


def user(name):
    return "arn:aws:iam::%s:user/%s" % (h.ACCOUNT, name)


def policy(*statements):
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(who, action="kms:*"):
    return {"Effect": "Allow", "Principal": {"AWS": user(who)}, "Action": action, "Resource": "*"}


def setup():
    C.ws = h.Workspace(prefix="p11kms-grants-")
    token = h.make_token(C.ws.sub("token"), "p11kms-grants")
    C.admin, C.alice, C.bob, C.carol = (h.new_principal(n)
                                        for n in ("admin", "alice", "bob", "carol"))
    creds = h.write_credentials(C.ws.sub("credentials"), [C.admin, C.alice, C.bob, C.carol])
    C.db = PG_URL or "sqlite:" + C.ws.sub("p11kms.db")
    h.diag("database: %s" % ("PostgreSQL" if PG_URL else "SQLite"))
    h.init_database(h.write_config(C.ws.sub("init.conf"), token, creds, database=C.db,
                                   **SETTINGS), token)
    for name in ("a", "b"):
        copy = h.copy_token(token, C.ws.sub("token-%s" % name))
        conf = h.write_config(C.ws.sub("node-%s.conf" % name), copy, creds,
                              database=C.db, refresh_ms=str(REFRESH_MS[name]),
                              **SETTINGS)
        setattr(C, name, h.start_config_server(conf, copy, C.ws.sub("node-%s.log" % name),
                                               init=False))
    C.key = make_key("granted", policy(allow("admin")))
    C.denying = make_key("denies alice", policy(
        allow("admin"),
        {"Effect": "Deny", "Principal": {"AWS": user("alice")}, "Action": "kms:Decrypt",
         "Resource": "*"}))
    C.blob_acme = encrypt(C.key, {"tenant": "acme", "purpose": "test"})
    C.blob_evil = encrypt(C.key, {"tenant": "evil", "purpose": "test"})


def teardown():
    try:
        for name, node in (("A", C.a), ("B", C.b)):
            if node and T.failed:
                h.diag("node %s's log (tail):\n%s" % (name, node.stderr_text()[-6000:]))
        for node in (C.a, C.b):
            if node:
                node.stop()
    finally:
        if C.ws:
            C.ws.close()


# ---- helpers ---------------------------------------------------------------------


def node(name):
    return C.a if name == "a" else C.b


def boto(who, name="a"):
    return h.kms_client(node(name).endpoint, who)


def ok(who, op, body, name="a"):
    return h.kms_ok(node(name).endpoint, op, body, who)


def call(who, op, body, name="a"):
    return h.kms_call(node(name).endpoint, op, body, who)


def refused(r, error_type, status):
    return h.check_error_response(r, error_type, status)


def make_key(description, text):
    return ok(C.admin, "CreateKey", {"Description": description, "Policy": text})[
        "KeyMetadata"]["KeyId"]


def encrypt(key, context):
    return boto(C.admin).encrypt(KeyId=key, Plaintext=b"granted secret",
                                 EncryptionContext=context)["CiphertextBlob"]


def b64(data):
    return base64.b64encode(data).decode()


def decrypt_call(who, blob, context, name="a", tokens=None):
    body = {"CiphertextBlob": b64(blob), "EncryptionContext": context}
    if tokens is not None:
        body["GrantTokens"] = tokens
    return call(who, "Decrypt", body, name)


def decrypts(who, blob, context, name="a", tokens=None):
    r = decrypt_call(who, blob, context, name, tokens)
    if r.status == 200:
        eq(base64.b64decode(r.json()["Plaintext"]), b"granted secret", "plaintext")
        return True
    refused(r, "InvalidCiphertextException", 400)
    return False


def create_grant(key, grantee, operations, name="a", **extra):
    body = {"KeyId": key, "GranteePrincipal": grantee, "Operations": operations}
    body.update(extra)
    out = ok(C.admin, "CreateGrant", body, name)
    eq(sorted(out), ["GrantId", "GrantToken"], "CreateGrant's answer")
    check(GRANT_ID.match(out["GrantId"]), "GrantId is 64 hex characters: %r" % out["GrantId"])
    return out["GrantId"], out["GrantToken"]


def until(cond, bound, what):
    """Waits for cond() to hold, at most bound seconds; returns the time it took."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > bound:
            raise AssertionError("%s: not within %.1f s" % (what, bound))
        time.sleep(0.02)
    return time.monotonic() - t0


def audit_lines(name="a"):
    with open(C.ws.sub("node-%s.conf" % name) + ".audit.log") as f:
        return [json.loads(line) for line in f if line.startswith("{")]


def grants_in_database(key):
    """The key's rows in the grants table, read beside the server (sqlite3 or psql)."""
    if not PG_URL:
        db = sqlite3.connect("file:%s?mode=ro" % C.db[len("sqlite:"):], uri=True, timeout=30)
        try:
            return db.execute("SELECT count(*) FROM grants WHERE key_id = ?",
                              (uuid.UUID(key).bytes,)).fetchone()[0]
        finally:
            db.close()
    u = urllib.parse.urlsplit(PG_URL)
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"),
                  key=lambda p: [int(x) if x.isdigit() else x for x in p.split("/")])
    psql = os.path.join(os.environ["PG_BIN"], "psql") if os.environ.get("PG_BIN") else (
        bins[-1] if bins else "psql")
    env = dict(os.environ, PGPASSWORD=urllib.parse.unquote(u.password or ""),
               PGCONNECT_TIMEOUT="5")
    r = subprocess.run([psql, "-X", "-q", "-A", "-t", "-h", u.hostname, "-p", str(u.port), "-U",
                        u.username, "-d", u.path.lstrip("/"), "-c",
                        "SELECT count(*) FROM grants WHERE key_id = '\\x%s'" % uuid.UUID(key).hex],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    eq(r.returncode, 0, "psql (stderr %r)" % r.stderr)
    return int(r.stdout.decode().strip())


ACME = {"tenant": "acme", "purpose": "test"}
EVIL = {"tenant": "evil", "purpose": "test"}


# ---- using a key through a grant ------------------------------------------------


@test
def test_a_grant_allows_only_what_it_says():
    # No statement names alice: refused (a refused blob answers as any blob that does not open).
    check(not decrypts(C.alice, C.blob_acme, ACME), "alice decrypts without a grant")
    r = call(C.alice, "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256",
                                          "EncryptionContext": {"tenant": "acme"}})
    refused(r, "AccessDeniedException", 400)

    gid, token = create_grant(C.key, user("alice"), ["Decrypt", "GenerateDataKey"],
                              Constraints={"EncryptionContextSubset": {"tenant": "acme"}})
    # On the node that made it, at once, with or without its token.
    check(decrypts(C.alice, C.blob_acme, ACME, tokens=[token]), "alice decrypts with the token")
    check(decrypts(C.alice, C.blob_acme, ACME), "alice decrypts without the token")
    # Only with a context holding the constrained pair.
    check(not decrypts(C.alice, C.blob_evil, EVIL), "alice decrypts tenant=evil")
    kms = boto(C.alice)
    kms.generate_data_key(KeyId=C.key, KeySpec="AES_256", EncryptionContext={"tenant": "acme"})
    # Keys of a constraint compare without case, values exactly (as AWS).
    kms.generate_data_key(KeyId=C.key, KeySpec="AES_256",
                          EncryptionContext={"TENANT": "acme", "x": "y"})
    for context in ({"tenant": "ACME"}, {"tenant": "evil"}, {}, {"other": "acme"}):
        code, status, _ = h.client_error(kms.generate_data_key, KeyId=C.key, KeySpec="AES_256",
                                         EncryptionContext=context)
        eq((code, status), ("AccessDeniedException", 400), "GenerateDataKey with %r" % context)
    # Not an operation of the grant; not the grantee.
    code, status, _ = h.client_error(kms.encrypt, KeyId=C.key, Plaintext=b"x",
                                     EncryptionContext={"tenant": "acme"})
    eq((code, status), ("AccessDeniedException", 400), "Encrypt, not in the grant")
    check(not decrypts(C.bob, C.blob_acme, ACME, tokens=[token]), "bob decrypts with alice's token")
    # The audit line names the grant that allowed it.
    lines = [d for d in audit_lines() if d.get("type") == "request"
             and d.get("operation") == "Decrypt" and d.get("principal") == "alice"
             and d.get("outcome") == "ok"]
    check(lines, "audit lines of alice's decryptions")
    eq(lines[-1]["decision"], "allow grant " + gid, "decision of alice's decryption")
    eq(lines[-1]["key_arn"], ARN_PREFIX + "key/" + C.key, "key_arn of alice's decryption")


@test
def test_encryption_context_equals_wants_the_context_exactly():
    gid, _ = create_grant(C.key, user("carol"), ["GenerateDataKey"],
                          Constraints={"EncryptionContextEquals": {"tenant": "acme"}})
    kms = boto(C.carol)
    kms.generate_data_key(KeyId=C.key, KeySpec="AES_256", EncryptionContext={"tenant": "acme"})
    for context in ({"tenant": "acme", "purpose": "test"}, {}, {"tenant": "acm"}):
        code, status, _ = h.client_error(kms.generate_data_key, KeyId=C.key, KeySpec="AES_256",
                                         EncryptionContext=context)
        eq((code, status), ("AccessDeniedException", 400), "GenerateDataKey with %r" % context)
    ok(C.admin, "RevokeGrant", {"KeyId": C.key, "GrantId": gid})


@test
def test_an_explicit_deny_beats_a_grant():
    blob = encrypt(C.denying, ACME)
    create_grant(C.denying, "alice", ["Decrypt", "DescribeKey"])
    check(not decrypts(C.alice, blob, ACME), "alice decrypts where the policy denies it")
    # The grant's other operation, which no statement denies, is allowed.
    eq(boto(C.alice).describe_key(KeyId=C.denying)["KeyMetadata"]["KeyId"], C.denying, "KeyId")


@test
def test_a_grant_token_works_on_the_other_node_at_once():
    # B holds the key (and no grant of alice's) before the grant is made.
    key = make_key("token", policy(allow("admin")))
    blob = encrypt(key, ACME)
    eq(boto(C.admin, "b").describe_key(KeyId=key)["KeyMetadata"]["KeyId"], key, "B reads the key")
    check(not decrypts(C.alice, blob, ACME, "b"), "alice decrypts on B before the grant")
    t0 = time.monotonic()
    _, token = create_grant(key, user("alice"), ["Decrypt"], name="a")
    check(decrypts(C.alice, blob, ACME, "b", tokens=[token]), "alice decrypts on B with the token")
    took = time.monotonic() - t0
    h.diag("CreateGrant on A to a decryption on B with its token: %.3f s (B polls every %.1f s)"
           % (took, REFRESH_MS["b"] / 1000.0))
    # And through the aws CLI, unmodified, on B.
    env = {"AWS_ACCESS_KEY_ID": C.alice.access_key, "AWS_SECRET_ACCESS_KEY": C.alice.secret,
           "AWS_DEFAULT_REGION": h.REGION, "AWS_MAX_ATTEMPTS": "1",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    path = C.ws.sub("token-blob")
    with open(path, "wb") as f:
        f.write(blob)
    status, out, err = h.aws(["kms", "decrypt", "--endpoint-url", C.b.endpoint, "--output", "json",
                              "--ciphertext-blob", "fileb://" + path, "--encryption-context",
                              "tenant=acme,purpose=test", "--grant-tokens", token], env)
    eq(status, 0, "aws kms decrypt --grant-tokens (stderr %r)" % err)
    eq(base64.b64decode(json.loads(out)["Plaintext"]), b"granted secret", "the CLI's plaintext")


@test
def test_grants_for_reencrypt_and_signing():
    # ReEncrypt is two grant operations, on the source key and the destination key.
    dest = make_key("reencrypt to", policy(allow("admin")))
    kms = boto(C.bob)
    code, status, _ = h.client_error(kms.re_encrypt, CiphertextBlob=C.blob_acme,
                                     SourceEncryptionContext=ACME, DestinationKeyId=dest)
    eq((code, status), ("InvalidCiphertextException", 400), "ReEncrypt without grants")
    create_grant(C.key, "bob", ["ReEncryptFrom"])
    code, status, _ = h.client_error(kms.re_encrypt, CiphertextBlob=C.blob_acme,
                                     SourceEncryptionContext=ACME, DestinationKeyId=dest)
    eq((code, status), ("AccessDeniedException", 400), "ReEncrypt without ReEncryptTo")
    create_grant(dest, "bob", ["ReEncryptTo"])
    out = kms.re_encrypt(CiphertextBlob=C.blob_acme, SourceEncryptionContext=ACME,
                         DestinationKeyId=dest)
    eq(out["KeyId"], ARN_PREFIX + "key/" + dest, "ReEncrypt's KeyId")
    # An asymmetric key: Sign granted, Verify not.
    signing = ok(C.admin, "CreateKey", {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY",
                                        "Policy": policy(allow("admin"))})["KeyMetadata"]["KeyId"]
    create_grant(signing, "bob", ["Sign", "GetPublicKey"])
    sig = kms.sign(KeyId=signing, Message=b"signed through a grant",
                   SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    check(len(sig) > 0, "a signature")
    kms.get_public_key(KeyId=signing)
    code, status, _ = h.client_error(kms.verify, KeyId=signing, Message=b"signed through a grant",
                                     Signature=sig, SigningAlgorithm="ECDSA_SHA_256")
    eq((code, status), ("AccessDeniedException", 400), "Verify, not granted")


# ---- retiring and revoking ------------------------------------------------------


@test
def test_retire_stops_a_grant_at_once_and_on_the_other_node_in_bound():
    key = make_key("retire", policy(allow("admin")))
    blob = encrypt(key, ACME)
    gid, token = create_grant(key, user("alice"), ["Decrypt"], RetiringPrincipal="carol")
    check(decrypts(C.alice, blob, ACME, "a"), "alice decrypts on A")
    check(decrypts(C.alice, blob, ACME, "b", tokens=[token]), "alice decrypts on B")
    # Only the retiring principal (or the key's account through its policy) may retire it.
    code, status, _ = h.client_error(boto(C.bob).retire_grant, GrantToken=token)
    eq((code, status), ("AccessDeniedException", 400), "bob retires carol's grant")
    listed = boto(C.carol).list_retirable_grants(RetiringPrincipal=user("carol"))
    check(gid in [g["GrantId"] for g in listed["Grants"]], "carol's retirable grants list it")
    code, status, _ = h.client_error(boto(C.bob).list_retirable_grants,
                                     RetiringPrincipal=user("carol"))
    eq((code, status), ("AccessDeniedException", 400), "bob lists carol's retirable grants")
    boto(C.carol, "a").retire_grant(GrantToken=token)
    check(not decrypts(C.alice, blob, ACME, "a"), "alice decrypts on A after the retirement")
    took = until(lambda: not decrypts(C.alice, blob, ACME, "b"), BOUND["b"],
                 "the retirement reaching B")
    h.diag("retired on A, refused on B after %.3f s" % took)
    r = call(C.carol, "RetireGrant", {"GrantToken": token})
    refused(r, "NotFoundException", 404)
    eq(grants_in_database(key), 0, "grants of the key in the database")


@test
def test_revoke_stops_a_grant_at_once_and_on_the_other_node_in_bound():
    key = make_key("revoke", policy(allow("admin")))
    blob = encrypt(key, ACME)
    gid, token = create_grant(key, user("alice"), ["Decrypt"], name="b")
    check(decrypts(C.alice, blob, ACME, "b"), "alice decrypts on B (where it was made)")
    check(decrypts(C.alice, blob, ACME, "a", tokens=[token]), "alice decrypts on A")
    # RevokeGrant is the key policy's (kms:RevokeGrant): not the grantee's.
    refused(call(C.alice, "RevokeGrant", {"KeyId": key, "GrantId": gid}, "a"),
            "AccessDeniedException", 400)
    boto(C.admin, "b").revoke_grant(KeyId=key, GrantId=gid)
    check(not decrypts(C.alice, blob, ACME, "b"), "alice decrypts on B after the revocation")
    took = until(lambda: not decrypts(C.alice, blob, ACME, "a"), BOUND["a"],
                 "the revocation reaching A")
    h.diag("revoked on B, refused on A after %.3f s" % took)
    code, status, _ = h.client_error(boto(C.admin).revoke_grant, KeyId=key, GrantId=gid)
    eq((code, status), ("NotFoundException", 404), "revoking it again")


@test
def test_the_grantee_retires_a_grant_with_retire_grant():
    key = make_key("self-retire", policy(allow("admin")))
    gid, _ = create_grant(key, user("alice"), ["Decrypt", "RetireGrant"])
    other, _ = create_grant(key, user("alice"), ["Decrypt"])
    # RetireGrant in one grant retires that grant, not the key's others.
    refused(call(C.alice, "RetireGrant", {"KeyId": key, "GrantId": other}),
            "AccessDeniedException", 400)
    boto(C.alice).retire_grant(KeyId=key, GrantId=gid)
    ids = [g["GrantId"] for g in boto(C.admin).list_grants(KeyId=key)["Grants"]]
    eq(ids, [other], "the key's grants after the retirement")


# ---- listing ----------------------------------------------------------------------


@test
def test_list_grants_pages_a_thousand_grants_once():
    key = make_key("paged", policy(allow("admin")))
    made = set()
    for i in range(PAGED):
        gid, _ = create_grant(key, "alice" if i % 2 else user("bob"), ["Decrypt"],
                              name="a" if i % 3 else "b")
        made.add(gid)
    eq(len(made), PAGED, "distinct grant ids")
    kms = boto(C.admin)
    seen, pages, marker = [], 0, None
    while True:
        args = {"KeyId": key, "Limit": 100}
        if marker:
            args["Marker"] = marker
        out = kms.list_grants(**args)
        pages += 1
        check(len(out["Grants"]) <= 100, "a page holds at most Limit grants")
        seen += [g["GrantId"] for g in out["Grants"]]
        if not out["Truncated"]:
            check("NextMarker" not in out, "no NextMarker on the last page")
            break
        eq(len(out["Grants"]), 100, "a truncated page is full")
        marker = out["NextMarker"]
        check(pages <= PAGED, "paging ends")
    eq(len(seen), PAGED, "grants listed")
    eq(set(seen), made, "the grants listed are the grants made, each once")
    eq(seen, sorted(seen), "grants in id order")
    eq(pages, 10, "pages")
    # One grant's members.
    g = kms.list_grants(KeyId=key, GrantId=seen[0])["Grants"]
    eq(len(g), 1, "ListGrants with GrantId")
    eq(g[0]["KeyId"], ARN_PREFIX + "key/" + key, "KeyId is the key's ARN")
    eq(g[0]["IssuingAccount"], "arn:aws:iam::%s:root" % h.ACCOUNT, "IssuingAccount")
    eq(g[0]["Operations"], ["Decrypt"], "Operations")
    check(g[0]["GranteePrincipal"] in (user("alice"), user("bob")), "GranteePrincipal")
    # GranteePrincipal filter, through the aws CLI (it pages by itself).
    env = {"AWS_ACCESS_KEY_ID": C.admin.access_key, "AWS_SECRET_ACCESS_KEY": C.admin.secret,
           "AWS_DEFAULT_REGION": h.REGION, "AWS_MAX_ATTEMPTS": "1",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    status, out, err = h.aws(["kms", "list-grants", "--endpoint-url", C.a.endpoint, "--output",
                              "json", "--key-id", key, "--grantee-principal", user("alice")], env)
    eq(status, 0, "aws kms list-grants (stderr %r)" % err)
    alice = json.loads(out)["Grants"]
    eq(len(alice), PAGED // 2, "alice's grants")
    check(all(g["GranteePrincipal"] == user("alice") for g in alice), "only alice's grants")
    refused(call(C.admin, "ListGrants", {"KeyId": key, "Limit": 101}), "ValidationException", 400)
    refused(call(C.admin, "ListGrants", {"KeyId": key, "Marker": "garbage"}),
            "InvalidMarkerException", 400)
    refused(call(C.admin, "ListRetirableGrants",
                 {"RetiringPrincipal": user("alice"), "Marker": "f" * 63}),
            "InvalidMarkerException", 400)
    refused(call(C.admin, "ListGrants", {"KeyId": key, "Marker": "\u0100"}),
            "ValidationException", 400)
    # ListGrants is the key policy's: alice, a grantee, may not list.
    refused(call(C.alice, "ListGrants", {"KeyId": key}), "AccessDeniedException", 400)


# ---- idempotency and validation -----------------------------------------------------


@test
def test_the_same_name_and_parameters_give_the_same_grant():
    key = make_key("idempotent", policy(allow("admin")))
    c = {"EncryptionContextSubset": {"tenant": "acme"}}
    first, _ = create_grant(key, user("alice"), ["Decrypt"], Name="retry", Constraints=c)
    again, _ = create_grant(key, "alice", ["Decrypt"], Name="retry", Constraints=c)
    eq(again, first, "GrantId of the retry")
    other, _ = create_grant(key, user("alice"), ["Decrypt", "Encrypt"], Name="retry",
                            Constraints=c)
    check(other != first, "other operations under the same name make a new grant")
    # Through the aws CLI as well.
    env = {"AWS_ACCESS_KEY_ID": C.admin.access_key, "AWS_SECRET_ACCESS_KEY": C.admin.secret,
           "AWS_DEFAULT_REGION": h.REGION, "AWS_MAX_ATTEMPTS": "1",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    status, out, err = h.aws(["kms", "create-grant", "--endpoint-url", C.b.endpoint, "--output",
                              "json", "--key-id", key, "--grantee-principal", user("alice"),
                              "--operations", "Decrypt", "--name", "retry", "--constraints",
                              "EncryptionContextSubset={tenant=acme}"], env)
    eq(status, 0, "aws kms create-grant (stderr %r)" % err)
    eq(json.loads(out)["GrantId"], first, "GrantId of the CLI's retry on node B")
    named = {g["GrantId"]: g for g in boto(C.admin).list_grants(KeyId=key)["Grants"]
             if g.get("Name") == "retry"}
    eq(sorted(named), sorted([first, other]), "grants named retry")
    eq(named[first]["Constraints"], c, "Constraints listed")
    eq(named[first]["Operations"], ["Decrypt"], "Operations listed")


@test
def test_grant_operations_must_suit_the_key():
    hmac = ok(C.admin, "CreateKey", {"KeySpec": "HMAC_256", "KeyUsage": "GENERATE_VERIFY_MAC",
                                     "Policy": policy(allow("admin"))})["KeyMetadata"]["KeyId"]
    for key, ops, extra in ((C.key, ["Sign"], {}), (C.key, ["GenerateMac"], {}),
                            (hmac, ["Decrypt"], {}),
                            (hmac, ["GenerateMac"],
                             {"Constraints": {"EncryptionContextSubset": {"a": "b"}}})):
        body = {"KeyId": key, "GranteePrincipal": "alice", "Operations": ops}
        body.update(extra)
        refused(call(C.admin, "CreateGrant", body), "ValidationException", 400)
    create_grant(hmac, "alice", ["GenerateMac", "VerifyMac", "DescribeKey"])
    for body in ({"KeyId": C.key, "GranteePrincipal": "alice", "Operations": ["Fly"]},
                 {"KeyId": C.key, "GranteePrincipal": "alice", "Operations": []},
                 {"KeyId": C.key, "GranteePrincipal": "arn:aws:iam::1:role/x",
                  "Operations": ["Decrypt"]},
                 {"KeyId": C.key, "GranteePrincipal": "alice", "Operations": ["Decrypt"],
                  "Name": "no spaces"},
                 {"KeyId": C.key, "GranteePrincipal": "alice", "Operations": ["Decrypt"],
                  "Constraints": {"EncryptionContextSubset": {"k%d" % i: "v" for i in range(9)}}}):
        refused(call(C.admin, "CreateGrant", body), "ValidationException", 400)
    # Not the key policy's: a grantee without CreateGrant may not pass it on.
    refused(call(C.alice, "CreateGrant", {"KeyId": C.key, "GranteePrincipal": "bob",
                                          "Operations": ["Decrypt"]}),
            "AccessDeniedException", 400)


@test
def test_a_grant_passes_on_no_more_than_it_has():
    key = make_key("delegated", policy(allow("admin")))
    create_grant(key, "alice", ["Decrypt", "CreateGrant"],
                 Constraints={"EncryptionContextSubset": {"tenant": "acme"}})
    ok(C.alice, "CreateGrant", {"KeyId": key, "GranteePrincipal": "bob", "Operations": ["Decrypt"],
                                "Constraints": {"EncryptionContextSubset": {"tenant": "acme",
                                                                            "more": "strict"}}})
    for ops, c in ((["Encrypt"], {"EncryptionContextSubset": {"tenant": "acme"}}),
                   (["Decrypt"], None),
                   (["Decrypt"], {"EncryptionContextSubset": {"tenant": "evil"}})):
        body = {"KeyId": key, "GranteePrincipal": "bob", "Operations": ops}
        if c:
            body["Constraints"] = c
        refused(call(C.alice, "CreateGrant", body), "AccessDeniedException", 400)


@test
def test_grant_tokens_and_grant_ids_are_checked():
    _, token = create_grant(C.key, "alice", ["Decrypt"])
    r = decrypt_call(C.alice, C.blob_acme, ACME, tokens=[token] * 11)
    refused(r, "ValidationException", 400)
    garbled = token[:-3] + ("AAA" if not token.endswith("AAA") else "BBB")
    for bad in (garbled, "not a token", token + "x", ""):
        r = decrypt_call(C.alice, C.blob_acme, ACME, tokens=[bad])
        refused(r, "InvalidGrantTokenException" if bad else "ValidationException", 400)
    code, status, _ = h.client_error(boto(C.alice).retire_grant, GrantToken="garbage")
    eq((code, status), ("InvalidGrantTokenException", 400), "RetireGrant with a garbled token")
    code, status, _ = h.client_error(boto(C.admin).revoke_grant, KeyId=C.key, GrantId="abc")
    eq((code, status), ("InvalidGrantIdException", 400), "RevokeGrant with a malformed grant id")
    code, status, _ = h.client_error(boto(C.admin).revoke_grant, KeyId=C.key, GrantId="0" * 64)
    eq((code, status), ("NotFoundException", 404), "RevokeGrant with an unknown grant id")
    code, status, _ = h.client_error(boto(C.admin).retire_grant, KeyId=C.key, GrantId="0" * 64)
    eq((code, status), ("NotFoundException", 404), "RetireGrant with an unknown grant id")
    refused(call(C.alice, "RetireGrant", {}), "ValidationException", 400)
    # A well-formed token of a grant that is not there allows nothing.
    body = b"\x01" + b"\x00" * 48
    fake = base64.urlsafe_b64encode(body + hashlib.sha256(body).digest()[:4]).decode().rstrip("=")
    check(not decrypts(C.bob, C.blob_acme, ACME, tokens=[fake]), "a made-up token allows")


# ---- deletion and audit -----------------------------------------------------------------


@test
def test_destroying_a_key_removes_its_grants():
    key = make_key("doomed", policy(allow("admin")))
    for i in range(3):
        create_grant(key, "alice", ["Decrypt"])
    eq(grants_in_database(key), 3, "grants in the database")
    boto(C.admin).schedule_key_deletion(KeyId=key, PendingWindowInDays=1)
    # A key pending deletion takes no new grant.
    refused(call(C.admin, "CreateGrant", {"KeyId": key, "GranteePrincipal": "alice",
                                          "Operations": ["Decrypt"]}),
            "KMSInvalidStateException", 409)

    def gone():
        return call(C.admin, "DescribeKey", {"KeyId": key}).status == 404
    until(gone, 15, "the key's destruction")
    eq(grants_in_database(key), 0, "grants in the database after the destruction")
    refused(call(C.admin, "ListGrants", {"KeyId": key}), "NotFoundException", 404)


@test
def test_grant_changes_are_audited_changes():
    key = make_key("audited", policy(allow("admin")))
    gid, token = create_grant(key, "alice", ["Decrypt"], RetiringPrincipal="alice")
    other, _ = create_grant(key, "bob", ["Decrypt"])
    boto(C.alice).retire_grant(GrantToken=token)
    boto(C.admin).revoke_grant(KeyId=key, GrantId=other)
    lines = audit_lines()
    intents = {d["request_id"]: d for d in lines if d.get("type") == "intent"}
    outcomes = {d["request_id"]: d for d in lines if d.get("type") == "outcome"}
    for op, grant in (("CreateGrant", gid), ("CreateGrant", other), ("RetireGrant", gid),
                      ("RevokeGrant", other)):
        req = [d for d in lines if d.get("type") == "request" and d.get("operation") == op
               and grant in d.get("decision", "")]
        eq(len(req), 1, "%s request lines naming grant %s" % (op, grant))
        eq(req[0]["key_arn"], ARN_PREFIX + "key/" + key, "%s's key_arn" % op)
        eq(req[0]["outcome"], "ok", "%s's outcome" % op)
        rid = req[0]["request_id"]
        check(rid in intents, "%s has an intent line" % op)
        eq(intents[rid]["key_arn"], ARN_PREFIX + "key/" + key, "%s intent's key_arn" % op)
        eq(outcomes[rid]["result"], "committed", "%s's change committed" % op)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
