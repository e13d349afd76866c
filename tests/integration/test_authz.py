#!/usr/bin/python3
"""Authorization against the key an operation works on, alias names as
resources, and refusals of blobs that tell nothing, against p11kmsd on a fresh
SoftHSM2 token. TAP output.

1. One key per request: an alias flipped by UpdateAlias, as fast as one
   thread can, between a key whose policy lets principal "racer" use it and
   one whose policy does not, while other threads call GenerateDataKey,
   Encrypt and DescribeKey by the alias's name. Every answer is either 200
   naming the allowed key (KeyId, the blob's key id, KeyMetadata) or
   AccessDeniedException naming the other; every audit line of an allowed call
   names the allowed key. A server that authorized against the key the alias
   named at one instant and then resolved the alias again for the work gave
   data keys under the key whose policy refuses the caller.
2. Alias names are resources, as in AWS: with alias_policy_file configured,
   CreateAlias needs kms:CreateAlias on the alias ARN (the alias policy) and
   on the target key (its key policy); UpdateAlias kms:UpdateAlias on the
   alias, its old target and its new target; DeleteAlias kms:DeleteAlias on
   the alias and its target. Admins are always allowed on alias names.
   Without an alias policy, alias names are the admins' on a server with
   admins (as CreateKey is), and the keys' policies alone decide on one without.
   A policy file that does not parse stops p11kmsd at start.
3. No oracle: a blob naming an unknown key, a key whose policy refuses the
   caller, a version the key lacks, or a disabled (or pending-deletion) key
   the caller may not use gets byte for byte the same answer, from Decrypt
   and from ReEncrypt, and one with a KeyId naming another key does not
   answer IncorrectKeyException to a caller who may not use the blob's key;
   the audit line keeps the real reason.
"""

import base64
import http.client
import json
import os
import sys
import threading
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

ACCOUNT = h.ACCOUNT
ARN = "arn:aws:kms:%s:%s:key/" % (h.REGION, ACCOUNT)
ALIAS_ARN = "arn:aws:kms:%s:%s:" % (h.REGION, ACCOUNT)
INVALID_BLOB = "The ciphertext, its key or its encryption context is not valid"
# How long the alias is flipped under load (seconds), and by how many callers.
RACE_SECONDS = float(os.environ.get("P11KMS_RACE_SECONDS", "10"))
RACE_THREADS = 4


class Ctx:
    ws = None
    token = None
    creds = None
    config = None
    server = None
    admin = alice = bob = racer = None
    allowed = None   # a key racer and alice may use
    refused = None   # a key only bob may use
    allowed2 = None  # another key alice may use


C = Ctx()


def user(name):
    return "arn:aws:iam::%s:user/%s" % (ACCOUNT, name)


def key_policy(*grants):
    """grants: (principal name, actions) pairs."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "%s%d" % (who, i), "Effect": "Allow", "Principal": {"AWS": user(who)},
         "Action": actions, "Resource": "*"} for i, (who, actions) in enumerate(grants)]},
        separators=(",", ":"))


ALIAS_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Sid": "TeamA", "Effect": "Allow", "Principal": {"AWS": "alice"},
         "Action": ["kms:CreateAlias", "kms:UpdateAlias", "kms:DeleteAlias"],
         "Resource": "arn:aws:kms:*:%s:alias/team-a/*" % ACCOUNT},
        {"Sid": "ProdIsFrozen", "Effect": "Deny", "Principal": "*", "Action": "kms:*Alias",
         "Resource": "arn:aws:kms:*:%s:alias/team-a/prod" % ACCOUNT},
    ],
}


def setup():
    C.ws = h.Workspace()
    C.admin = h.new_principal("admin")
    C.alice = h.new_principal("alice")
    C.bob = h.new_principal("bob")
    C.racer = h.new_principal("racer")
    C.token = h.make_token(C.ws.sub("token"), "p11kms-it-authz")
    C.creds = h.write_credentials(C.ws.sub("credentials"), [C.admin, C.alice, C.bob, C.racer])
    # No management rate limit: the alias is moved, and described, thousands of times a second.
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, C.creds,
                              admin_principals="admin", rate_manage="0")
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))
    use = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*",
           "kms:DescribeKey"]
    C.allowed = make_key("allowed", key_policy(("alice", "kms:*"), ("racer", use)))
    C.refused = make_key("refused", key_policy(("bob", "kms:*")))
    C.allowed2 = make_key("allowed too", key_policy(("alice", "kms:*")))


def teardown():
    h.finish(T, C.ws, C.server)


def call(who, op, body):
    return h.kms_call(C.server.endpoint, op, body, who)


def ok(who, op, body):
    return h.kms_ok(C.server.endpoint, op, body, who)


def make_key(description, policy):
    return ok(C.admin, "CreateKey", {"Description": description, "Policy": policy})[
        "KeyMetadata"]["KeyId"]


def denied(r, who, action, resource, because):
    doc = h.check_error_response(r, "AccessDeniedException", 400)
    eq(doc["message"], "User: %s is not authorized to perform: %s on resource: %s because %s"
       % (who.name, action, resource, because), "message")


KEY_SAYS_NO = "no statement of the key policy allows it"
ALIAS_SAYS_NO = "no statement of the alias policy allows it"
ALIAS_DENIES = "a statement of the alias policy denies it"
ADMINS_ONLY = "only admin principals manage alias names when no alias policy is configured"


def b64(data):
    return base64.b64encode(data).decode()


def key_of(blob):
    """The key id a blob names (docs/format.md: format byte, then the key's 16 bytes)."""
    return str(uuid.UUID(bytes=bytes(blob[1:17])))


def audit_lines():
    with open(C.config + ".audit.log") as f:
        return [json.loads(line) for line in f if '"type":"request"' in line]


def target_of(alias):
    for a in ok(C.admin, "ListAliases", {"Limit": 100})["Aliases"]:
        if a["AliasName"] == alias:
            return a["TargetKeyId"]
    return None


# ---- 1. authorize and work on the same key ---------------------------------------


class Caller:
    """Signed requests over one keep-alive connection."""

    def __init__(self, who):
        self.who = who
        self.conn = http.client.HTTPConnection(C.server.host, C.server.port, timeout=30)

    def __call__(self, op, body):
        headers, data = h.sign(C.server.endpoint, "TrentService." + op, body, self.who)
        self.conn.request("POST", "/", body=data, headers=headers)
        r = self.conn.getresponse()
        return r.status, r.read()

    def close(self):
        self.conn.close()


@test
def test_an_alias_moved_under_load_never_lends_a_refused_key():
    alias = "alias/race"
    ok(C.admin, "CreateAlias", {"AliasName": alias, "TargetKeyId": C.allowed})
    stop = threading.Event()
    flips, answers, bad, errors = [0], [], [], []
    lock = threading.Lock()
    requests = [
        ("GenerateDataKey", {"KeyId": alias, "KeySpec": "AES_256"}, "kms:GenerateDataKey"),
        ("Encrypt", {"KeyId": alias, "Plaintext": b64(b"race")}, "kms:Encrypt"),
        ("GenerateDataKeyWithoutPlaintext", {"KeyId": alias, "NumberOfBytes": 16},
         "kms:GenerateDataKeyWithoutPlaintext"),
        ("DescribeKey", {"KeyId": alias}, "kms:DescribeKey"),
    ]
    refused_message = ("User: racer is not authorized to perform: %s on resource: " + ARN
                       + C.refused + " because " + KEY_SAYS_NO)

    def flipper():
        caller = Caller(C.admin)
        try:
            targets = (C.refused, C.allowed)
            while not stop.is_set():
                status, body = caller("UpdateAlias", {"AliasName": alias,
                                                      "TargetKeyId": targets[flips[0] % 2]})
                if status != 200:
                    errors.append(("UpdateAlias", status, body[:200]))
                    return
                flips[0] += 1
        except Exception as e:  # noqa: B902 - reported by the test
            errors.append(("flipper", repr(e)))

    def worker(n):
        caller = Caller(C.racer)
        try:
            i = n
            while not stop.is_set():
                op, body, action = requests[i % len(requests)]
                i += 1
                status, raw = caller(op, body)
                doc = json.loads(raw)
                with lock:
                    answers.append((op, status))
                if status == 200:
                    named = doc["KeyMetadata"]["Arn"] if op == "DescribeKey" else doc["KeyId"]
                    blob = base64.b64decode(doc.get("CiphertextBlob", ""))
                    if named != ARN + C.allowed or (blob and key_of(blob) != C.allowed):
                        with lock:
                            bad.append((op, named, key_of(blob) if blob else None))
                elif (status, doc.get("__type"), doc.get("message")) != (
                        400, "AccessDeniedException", refused_message % action):
                    errors.append((op, status, raw[:200]))
                    return
        except Exception as e:  # noqa: B902
            errors.append(("worker", repr(e)))
        finally:
            caller.close()

    threads = [threading.Thread(target=flipper)]
    threads += [threading.Thread(target=worker, args=(n,)) for n in range(RACE_THREADS)]
    # Hand the interpreter over often, so the flipper is not kept waiting by the callers.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0002)
    try:
        for t in threads:
            t.start()
        time.sleep(RACE_SECONDS)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(interval)
    allowed = sum(1 for _, s in answers if s == 200)
    h.diag("%d alias moves; %d answers (%d allowed, %d refused); %d named the refused key"
           % (flips[0], len(answers), allowed, len(answers) - allowed, len(bad)))
    eq(errors, [], "answers other than 200 or AccessDenied on the refused key")
    check(flips[0] >= 50 and allowed >= 100 and len(answers) - allowed >= 100,
          "the race ran: %d moves, %d allowed, %d refused"
          % (flips[0], allowed, len(answers) - allowed))
    eq(bad[:5], [], "allowed answers naming another key than the allowed one (%d in all)"
       % len(bad))
    # The audit log: every allowed call names the allowed key, every refusal the other.
    lines = [x for x in audit_lines() if x["principal"] == "racer"]
    eq(len(lines), len(answers), "racer's audit lines")
    eq(sorted({x["key_arn"] for x in lines if x["outcome"] == "ok"}), [ARN + C.allowed],
       "the keys audit lines of allowed calls name")
    eq(sum(1 for x in lines if x["outcome"] == "ok"), allowed, "allowed calls audited")
    eq(sorted({(x["outcome"], x["key_arn"]) for x in lines if x["outcome"] != "ok"}),
       [("AccessDeniedException", ARN + C.refused)], "what refusals' audit lines name")
    # This node's resolution of the alias agrees with the database (ListAliases reads it).
    eq(ok(C.admin, "DescribeKey", {"KeyId": alias})["KeyMetadata"]["KeyId"], target_of(alias),
       "the alias resolves to the key the database names")
    ok(C.admin, "DeleteAlias", {"AliasName": alias})


# ---- 3. blobs: one answer, whoever asks about whatever key ----------------------------


def decrypt_answer(who, blob, ctx=None, key_id=None):
    body = {"CiphertextBlob": b64(blob)}
    if ctx:
        body["EncryptionContext"] = ctx
    if key_id:
        body["KeyId"] = key_id
    r = call(who, "Decrypt", body)
    return r.status, r.header("X-Amzn-ErrorType"), r.body


def re_encrypt_answer(who, blob, ctx=None, source=None):
    body = {"CiphertextBlob": b64(blob), "DestinationKeyId": C.allowed2}
    if ctx:
        body["SourceEncryptionContext"] = ctx
    if source:
        body["SourceKeyId"] = source
    r = call(who, "ReEncrypt", body)
    return r.status, r.header("X-Amzn-ErrorType"), r.body


@test
def test_a_refused_blob_says_nothing_about_its_key():
    ctx = {"case": "oracle"}
    mine = base64.b64decode(ok(C.alice, "GenerateDataKey", {
        "KeyId": C.allowed, "KeySpec": "AES_256", "EncryptionContext": ctx})["CiphertextBlob"])
    theirs = base64.b64decode(ok(C.bob, "GenerateDataKey", {
        "KeyId": C.refused, "KeySpec": "AES_256", "EncryptionContext": ctx})["CiphertextBlob"])
    # a key bob may use, disabled; one pending deletion
    C.disabled = make_key("disabled", key_policy(("bob", "kms:*")))
    off = base64.b64decode(ok(C.bob, "GenerateDataKey", {
        "KeyId": C.disabled, "KeySpec": "AES_256", "EncryptionContext": ctx})["CiphertextBlob"])
    ok(C.admin, "DisableKey", {"KeyId": C.disabled})
    C.pending = make_key("pending", key_policy(("bob", "kms:*")))
    going = base64.b64decode(ok(C.bob, "GenerateDataKey", {
        "KeyId": C.pending, "KeySpec": "AES_256", "EncryptionContext": ctx})["CiphertextBlob"])
    ok(C.admin, "ScheduleKeyDeletion", {"KeyId": C.pending, "PendingWindowInDays": 7})

    unknown = bytearray(mine)
    unknown[1:17] = uuid.uuid4().bytes
    no_version = bytearray(mine)
    no_version[17:21] = (int.from_bytes(mine[17:21], "big") ^ 0x5A5A5A5A).to_bytes(4, "big")
    cases = [
        ("(a) an unknown key", bytes(unknown), None),
        ("(b) a key whose policy refuses alice", theirs, None),
        ("(c) a version alice's key lacks", bytes(no_version), None),
        ("(d) a disabled key alice may not use", off, None),
        ("(e) a key pending deletion alice may not use", going, None),
        ("(f) a KeyId other than the blob's key, which alice may not use", theirs, C.allowed),
        ("(g) a wrong context under a key alice may not use", theirs, "ctx"),
    ]
    want = (400, "InvalidCiphertextException",
            json.dumps({"__type": "InvalidCiphertextException", "message": INVALID_BLOB},
                       separators=(",", ":")).encode())
    for name, fn in (("Decrypt", decrypt_answer), ("ReEncrypt", re_encrypt_answer)):
        got = {}
        for what, blob, extra in cases:
            if extra == "ctx":
                got[what] = fn(C.alice, blob, {"case": "other"})
            else:
                got[what] = fn(C.alice, blob, ctx, extra)
        h.diag("%s: %r" % (name, sorted(set(got.values()))))
        for what, answer in got.items():
            eq((answer[0], answer[1]), want[:2], "%s, %s: status and type" % (name, what))
            eq(json.loads(answer[2]), json.loads(want[2]), "%s, %s: body" % (name, what))
        eq(len(set(got.values())), 1, "%s: one answer, byte for byte, for %d cases"
           % (name, len(cases)))

    # Those allowed on the key learn its state, and which key a blob is under.
    r = call(C.bob, "Decrypt", {"CiphertextBlob": b64(off), "EncryptionContext": ctx})
    h.check_error_response(r, "DisabledException", 409)
    r = call(C.bob, "Decrypt", {"CiphertextBlob": b64(going), "EncryptionContext": ctx})
    h.check_error_response(r, "KMSInvalidStateException", 409)
    r = call(C.bob, "Decrypt", {"CiphertextBlob": b64(theirs), "EncryptionContext": ctx,
                                "KeyId": C.allowed})
    h.check_error_response(r, "IncorrectKeyException", 400)
    r = call(C.bob, "ReEncrypt", {"CiphertextBlob": b64(off), "SourceEncryptionContext": ctx,
                                  "DestinationKeyId": C.refused})
    h.check_error_response(r, "DisabledException", 409)
    eq(ok(C.bob, "Decrypt", {"CiphertextBlob": b64(theirs), "EncryptionContext": ctx})["KeyId"],
       ARN + C.refused, "bob decrypts his blob")

    # The audit lines keep the reason.
    lines = [x for x in audit_lines() if x["principal"] == "alice"
             and x["operation"] == "Decrypt"][-len(cases):]
    eq([(x["outcome"], x["decision"], x["key_arn"]) for x in lines], [
        ("InvalidCiphertextException", "deny (no such key)", ARN + key_of(unknown)),
        ("InvalidCiphertextException", "deny", ARN + C.refused),
        ("InvalidCiphertextException", "allow alice0", ARN + C.allowed),
        ("InvalidCiphertextException", "deny", ARN + C.disabled),
        ("InvalidCiphertextException", "deny", ARN + C.pending),
        ("InvalidCiphertextException", "deny", ARN + C.refused),
        ("InvalidCiphertextException", "deny", ARN + C.refused),
    ], "alice's Decrypt lines: outcome, decision, key")
    ok(C.admin, "CancelKeyDeletion", {"KeyId": C.pending})


# ---- 2. alias names are resources ------------------------------------------------------


@test
def test_without_an_alias_policy_admins_name_keys():
    """No alias policy on a server with admins: alias names are the admins' (as CreateKey
    is); a principal may not create, move or delete one, not even for a key it may manage."""
    name = "alias/team-b/free"
    r = call(C.alice, "CreateAlias", {"AliasName": name, "TargetKeyId": C.allowed})
    denied(r, C.alice, "kms:CreateAlias", ALIAS_ARN + name, ADMINS_ONLY)
    eq(target_of(name), None, "no %s" % name)
    # The key's policy still comes first: a key alice may not manage says so.
    r = call(C.alice, "CreateAlias", {"AliasName": name, "TargetKeyId": C.refused})
    denied(r, C.alice, "kms:CreateAlias", ARN + C.refused, KEY_SAYS_NO)
    ok(C.admin, "CreateAlias", {"AliasName": name, "TargetKeyId": C.allowed})
    r = call(C.alice, "UpdateAlias", {"AliasName": name, "TargetKeyId": C.allowed2})
    denied(r, C.alice, "kms:UpdateAlias", ALIAS_ARN + name, ADMINS_ONLY)
    r = call(C.alice, "DeleteAlias", {"AliasName": name})
    denied(r, C.alice, "kms:DeleteAlias", ALIAS_ARN + name, ADMINS_ONLY)
    eq(target_of(name), C.allowed, "%s unmoved" % name)
    ok(C.admin, "UpdateAlias", {"AliasName": name, "TargetKeyId": C.allowed2})
    ok(C.admin, "DeleteAlias", {"AliasName": name})
    eq(target_of(name), None, "%s deleted by the admin" % name)


@test
def test_a_policy_file_that_does_not_parse_stops_the_server():
    bad = C.ws.sub("bad-alias-policy.json")
    with open(bad, "w") as f:
        f.write('{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:Foo", '
                '"Resource": "*"}]}')
    config = h.write_config(C.ws.sub("bad.conf"), C.token, C.creds, admin_principals="admin",
                            alias_policy_file=bad)
    env = h.server_env({"SOFTHSM2_CONF": C.token.conf})
    status, _, err = h.run_failing(["--config", config, "--listen", "127.0.0.1:0"], env)
    eq(status, 1, "exit status")
    check("alias_policy_file %s: Statement #0: Action \"kms:Foo\" matches no operation" % bad
          in err, "the error names the file and the fault: %r" % err)
    missing = C.ws.sub("no-such-file.json")
    config = h.write_config(C.ws.sub("bad.conf"), C.token, C.creds, alias_policy_file=missing)
    status, _, err = h.run_failing(["--config", config, "--listen", "127.0.0.1:0"], env)
    eq(status, 1, "exit status, missing file")
    check("cannot open %s" % missing in err, "the error names the missing file: %r" % err)


@test
def test_alias_names_are_resources():
    path = C.ws.sub("alias-policy.json")
    with open(path, "w") as f:
        json.dump(ALIAS_POLICY, f)
    C.server.stop()
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, C.creds,
                              admin_principals="admin", rate_manage="0", alias_policy_file=path)
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd-2.log"))
    team_b = ALIAS_ARN + "alias/team-b/x"

    # CreateAlias: the alias name and the target key
    r = call(C.alice, "CreateAlias", {"AliasName": "alias/team-b/x", "TargetKeyId": C.allowed})
    denied(r, C.alice, "kms:CreateAlias", team_b, ALIAS_SAYS_NO)
    eq(target_of("alias/team-b/x"), None, "no alias/team-b/x")
    r = call(C.alice, "CreateAlias", {"AliasName": "alias/team-a/prod", "TargetKeyId": C.allowed})
    denied(r, C.alice, "kms:CreateAlias", ALIAS_ARN + "alias/team-a/prod", ALIAS_DENIES)
    r = call(C.alice, "CreateAlias", {"AliasName": "alias/team-a/y", "TargetKeyId": C.refused})
    denied(r, C.alice, "kms:CreateAlias", ARN + C.refused, KEY_SAYS_NO)
    eq(target_of("alias/team-a/y"), None, "no alias/team-a/y")
    ok(C.alice, "CreateAlias", {"AliasName": "alias/team-a/x", "TargetKeyId": C.allowed})
    eq(target_of("alias/team-a/x"), C.allowed, "alice named her key")
    # admins: any name
    ok(C.admin, "CreateAlias", {"AliasName": "alias/team-b/x", "TargetKeyId": C.allowed})
    ok(C.admin, "CreateAlias", {"AliasName": "alias/team-a/bobs", "TargetKeyId": C.refused})

    # UpdateAlias: the alias name, the old target and the new target
    r = call(C.alice, "UpdateAlias", {"AliasName": "alias/team-b/x", "TargetKeyId": C.allowed2})
    denied(r, C.alice, "kms:UpdateAlias", team_b, ALIAS_SAYS_NO)
    r = call(C.alice, "UpdateAlias", {"AliasName": "alias/team-a/bobs",
                                      "TargetKeyId": C.allowed})
    denied(r, C.alice, "kms:UpdateAlias", ARN + C.refused, KEY_SAYS_NO)
    r = call(C.alice, "UpdateAlias", {"AliasName": "alias/team-a/x", "TargetKeyId": C.refused})
    denied(r, C.alice, "kms:UpdateAlias", ARN + C.refused, KEY_SAYS_NO)
    eq((target_of("alias/team-b/x"), target_of("alias/team-a/bobs"), target_of("alias/team-a/x")),
       (C.allowed, C.refused, C.allowed), "targets after the refused updates")
    ok(C.alice, "UpdateAlias", {"AliasName": "alias/team-a/x", "TargetKeyId": C.allowed2})
    eq(target_of("alias/team-a/x"), C.allowed2, "alice moved her alias")

    # DeleteAlias: the alias name and its target
    r = call(C.alice, "DeleteAlias", {"AliasName": "alias/team-b/x"})
    denied(r, C.alice, "kms:DeleteAlias", team_b, ALIAS_SAYS_NO)
    r = call(C.alice, "DeleteAlias", {"AliasName": "alias/team-a/bobs"})
    denied(r, C.alice, "kms:DeleteAlias", ARN + C.refused, KEY_SAYS_NO)
    eq((target_of("alias/team-b/x"), target_of("alias/team-a/bobs")), (C.allowed, C.refused),
       "the aliases alice may not delete")
    ok(C.alice, "DeleteAlias", {"AliasName": "alias/team-a/x"})
    eq(target_of("alias/team-a/x"), None, "alice deleted her alias")
    ok(C.admin, "UpdateAlias", {"AliasName": "alias/team-b/x", "TargetKeyId": C.allowed2})
    ok(C.admin, "DeleteAlias", {"AliasName": "alias/team-b/x"})

    # the audit lines of the refusals say which policy refused
    lines = [x for x in audit_lines() if x["principal"] == "alice"
             and x["operation"] == "CreateAlias" and x["outcome"] != "ok"][-3:]
    eq([(x["outcome"], x["decision"]) for x in lines],
       [("AccessDeniedException", "deny alias (implicit)"),
        ("AccessDeniedException", "deny alias ProdIsFrozen"),
        ("AccessDeniedException", "deny")], "CreateAlias refusals: outcome, decision")
    eq(lines[2]["key_arn"], ARN + C.refused, "the refusal by the key names the key")


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
