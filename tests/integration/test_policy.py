#!/usr/bin/python3
"""Key policies and the admin role against p11kmsd on a fresh SoftHSM2 token:
PutKeyPolicy/GetKeyPolicy/ListKeyPolicies, CreateKey with a Policy, a
principal allowed only some operations, an encryption-context condition that
allows and refuses as written, an explicit Deny, ReEncryptFrom/To, admins
managing (but not using) every key, the lockout safety check, malformed
documents, and policies surviving a restart. TAP output."""

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

ACCOUNT = h.ACCOUNT
ARN = "arn:aws:kms:%s:%s:key/" % (h.REGION, ACCOUNT)


class Ctx:
    ws = None
    token = None
    config = None
    server = None
    admin = None
    alice = None
    bob = None
    key = None       # the key under a custom policy
    other = None     # a key under the default policy
    policy = None    # its policy text


C = Ctx()


def user(name):
    return "arn:aws:iam::%s:user/%s" % (ACCOUNT, name)


def custom_policy():
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "AliceUsesForAcme", "Effect": "Allow", "Principal": {"AWS": user("alice")},
             "Action": ["kms:GenerateDataKey", "kms:Decrypt", "kms:ReEncrypt*"],
             "Resource": "*",
             "Condition": {"StringEquals": {"kms:EncryptionContext:tenant": "acme"}}},
            {"Sid": "AliceReads", "Effect": "Allow", "Principal": {"AWS": "alice"},
             "Action": ["kms:Describe*", "kms:GetKeyPolicy", "kms:PutKeyPolicy"],
             "Resource": "*"},
            {"Sid": "BobDescribes", "Effect": "Allow", "Principal": {"AWS": [user("bob")]},
             "Action": "kms:DescribeKey", "Resource": "*"},
            {"Sid": "NeverBobDecrypts", "Effect": "Deny", "Principal": "*",
             "Action": "kms:Decrypt", "Resource": "*",
             "Condition": {"StringEquals": {"aws:username": "bob"}}},
        ],
    }, separators=(",", ":"))


def setup():
    C.ws = h.Workspace()
    C.admin = h.new_principal("admin")
    C.alice = h.new_principal("alice")
    C.bob = h.new_principal("bob")
    C.token = h.make_token(C.ws.sub("token"), "p11kms-it-policy")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.admin, C.alice, C.bob])
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, creds,
                              admin_principals="admin")
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))


def teardown():
    h.finish(T, C.ws, C.server)


def call(who, op, body):
    return h.kms_call(C.server.endpoint, op, body, who)


def ok(who, op, body):
    return h.kms_ok(C.server.endpoint, op, body, who)


def denied(who, op, body, action, key, because="no statement of the key policy allows it"):
    r = call(who, op, body)
    doc = h.check_error_response(r, "AccessDeniedException", 400)
    eq(doc["message"], "User: %s is not authorized to perform: %s on resource: %s%s because %s"
       % (who.name, action, ARN, key, because), "%s by %s: message" % (op, who.name))


# The answer of every blob that does not open, the one a blob whose key the caller may not
# use gets too: it does not tell a key that exists from one that does not.
INVALID_BLOB = "The ciphertext, its key or its encryption context is not valid"


def blob_refused(who, op, body):
    r = call(who, op, body)
    doc = h.check_error_response(r, "InvalidCiphertextException", 400)
    eq(doc["message"], INVALID_BLOB, "%s by %s: message" % (op, who.name))


def b64(data):
    return base64.b64encode(data).decode()


@test
def test_create_key_is_for_admins():
    r = call(C.alice, "CreateKey", {})
    doc = h.check_error_response(r, "AccessDeniedException", 400)
    eq(doc["message"], "User: alice is not authorized to perform: kms:CreateKey: only the admin "
       "principals may create keys", "message")
    C.policy = custom_policy()
    md = ok(C.admin, "CreateKey", {"Policy": C.policy, "Description": "policy test"})
    C.key = md["KeyMetadata"]["KeyId"]
    C.other = ok(C.admin, "CreateKey", {})["KeyMetadata"]["KeyId"]
    got = ok(C.alice, "GetKeyPolicy", {"KeyId": C.key, "PolicyName": "default"})
    eq(got, {"Policy": C.policy, "PolicyName": "default"}, "GetKeyPolicy gives the text back")
    eq(ok(C.admin, "ListKeyPolicies", {"KeyId": C.key}),
       {"PolicyNames": ["default"], "Truncated": False}, "ListKeyPolicies")
    default = json.loads(ok(C.bob, "GetKeyPolicy", {"KeyId": C.other})["Policy"])
    eq(default["Statement"][0]["Principal"], {"AWS": "arn:aws:iam::%s:root" % ACCOUNT},
       "a key made without a policy lets the account's principals in")


@test
def test_context_condition():
    acme = {"tenant": "acme"}
    d = ok(C.alice, "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256",
                                        "EncryptionContext": acme})
    back = ok(C.alice, "Decrypt", {"CiphertextBlob": d["CiphertextBlob"],
                                   "EncryptionContext": acme})
    eq(back["Plaintext"], d["Plaintext"], "alice decrypts her acme data key")
    for ctx in ({"tenant": "other"}, {}, {"tenant": "ACME"}, {"Tenant": "acme"}):
        body = {"KeyId": C.key, "KeySpec": "AES_256"}
        if ctx:
            body["EncryptionContext"] = ctx
        denied(C.alice, "GenerateDataKey", body, "kms:GenerateDataKey", C.key)
    # a blob made for another tenant under the default-policy key cannot be moved in
    other = ok(C.alice, "GenerateDataKey", {"KeyId": C.other, "KeySpec": "AES_256",
                                            "EncryptionContext": {"tenant": "zeta"}})
    denied(C.alice, "ReEncrypt", {"CiphertextBlob": other["CiphertextBlob"],
                                  "SourceEncryptionContext": {"tenant": "zeta"},
                                  "DestinationKeyId": C.key,
                                  "DestinationEncryptionContext": {"tenant": "zeta"}},
           "kms:ReEncryptTo", C.key)
    moved = ok(C.alice, "ReEncrypt", {"CiphertextBlob": other["CiphertextBlob"],
                                      "SourceEncryptionContext": {"tenant": "zeta"},
                                      "DestinationKeyId": C.key,
                                      "DestinationEncryptionContext": acme})
    eq(moved["KeyId"], ARN + C.key, "ReEncrypt into the acme key")
    back = ok(C.alice, "Decrypt", {"CiphertextBlob": moved["CiphertextBlob"],
                                   "EncryptionContext": acme})
    eq(back["Plaintext"], other["Plaintext"], "the re-encrypted key decrypts")
    # a Decrypt without the condition's context is refused before the token is asked
    blob_refused(C.alice, "Decrypt", {"CiphertextBlob": d["CiphertextBlob"]})
    C.acme_blob = d["CiphertextBlob"]


@test
def test_operations_a_principal_is_not_given():
    eq(ok(C.bob, "DescribeKey", {"KeyId": C.key})["KeyMetadata"]["KeyId"], C.key,
       "bob may describe the key")
    denied(C.bob, "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256",
                                      "EncryptionContext": {"tenant": "acme"}},
           "kms:GenerateDataKey", C.key)
    blob_refused(C.bob, "Decrypt", {"CiphertextBlob": C.acme_blob,
                                    "EncryptionContext": {"tenant": "acme"}})
    denied(C.bob, "Encrypt", {"KeyId": C.key, "Plaintext": b64(b"x")}, "kms:Encrypt", C.key)
    denied(C.alice, "DisableKey", {"KeyId": C.key}, "kms:DisableKey", C.key)
    denied(C.alice, "CreateAlias", {"AliasName": "alias/pol", "TargetKeyId": C.key},
           "kms:CreateAlias", C.key)
    denied(C.bob, "GetKeyPolicy", {"KeyId": C.key}, "kms:GetKeyPolicy", C.key)
    # through an alias the admin made, the key's policy still decides
    ok(C.admin, "CreateAlias", {"AliasName": "alias/pol", "TargetKeyId": C.key})
    denied(C.bob, "GenerateDataKey", {"KeyId": "alias/pol", "KeySpec": "AES_256"},
           "kms:GenerateDataKey", C.key)
    # a key that does not exist is NotFound, not AccessDenied
    h.check_error_response(call(C.bob, "DescribeKey", {"KeyId": "0" * 8 + "-0000-4000-8000-"
                                                       + "0" * 12}), "NotFoundException", 404)


@test
def test_admins_manage_but_do_not_use():
    ok(C.admin, "DisableKey", {"KeyId": C.key})
    eq(ok(C.admin, "DescribeKey", {"KeyId": C.key})["KeyMetadata"]["KeyState"], "Disabled",
       "the admin disabled a key whose policy does not name it")
    ok(C.admin, "EnableKey", {"KeyId": C.key})
    ok(C.admin, "EnableKeyRotation", {"KeyId": C.key})
    denied(C.admin, "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256",
                                        "EncryptionContext": {"tenant": "acme"}},
           "kms:GenerateDataKey", C.key)
    blob_refused(C.admin, "Decrypt", {"CiphertextBlob": C.acme_blob,
                                      "EncryptionContext": {"tenant": "acme"}})


@test
def test_put_key_policy():
    # malformed documents
    for text, part in (("{", "JSON"), ('{"Statement":[]}', "Statement"),
                       (json.dumps({"Statement": {"Effect": "Allow", "Principal": "*",
                                                  "Action": "kms:Foo", "Resource": "*"}}),
                        "kms:Foo")):
        r = call(C.admin, "PutKeyPolicy", {"KeyId": C.key, "PolicyName": "default",
                                           "Policy": text})
        doc = h.check_error_response(r, "MalformedPolicyDocumentException", 400)
        check(part in doc["message"], "%r names %r: %r" % (text, part, doc["message"]))
    r = call(C.admin, "PutKeyPolicy", {"KeyId": C.key, "PolicyName": "other",
                                       "Policy": C.policy})
    h.check_error_response(r, "NotFoundException", 404)
    # the lockout safety check: alice may not take away her own PutKeyPolicy
    lockout = json.dumps({"Statement": [{"Effect": "Allow", "Principal": {"AWS": "alice"},
                                         "Action": "kms:Decrypt", "Resource": "*"}]})
    r = call(C.alice, "PutKeyPolicy", {"KeyId": C.key, "PolicyName": "default",
                                       "Policy": lockout})
    doc = h.check_error_response(r, "MalformedPolicyDocumentException", 400)
    eq(doc["message"], "The new key policy will not allow you to update the key policy in the "
       "future.", "lockout message")
    eq(ok(C.alice, "GetKeyPolicy", {"KeyId": C.key})["Policy"], C.policy, "policy unchanged")
    # ... unless asked to bypass it
    ok(C.alice, "PutKeyPolicy", {"KeyId": C.key, "PolicyName": "default", "Policy": lockout,
                                 "BypassPolicyLockoutSafetyCheck": True})
    denied(C.alice, "GetKeyPolicy", {"KeyId": C.key}, "kms:GetKeyPolicy", C.key)
    # the admin can always repair it
    ok(C.admin, "PutKeyPolicy", {"KeyId": C.key, "PolicyName": "default", "Policy": C.policy})
    eq(ok(C.alice, "GetKeyPolicy", {"KeyId": C.key})["Policy"], C.policy, "policy restored")
    # a policy change takes effect at once: bob gets GenerateDataKey
    more = json.loads(C.policy)
    more["Statement"].append({"Sid": "BobToo", "Effect": "Allow", "Principal": {"AWS": "bob"},
                              "Action": "kms:GenerateDataKey*", "Resource": ARN + C.key})
    C.policy = json.dumps(more, separators=(",", ":"))
    ok(C.admin, "PutKeyPolicy", {"KeyId": C.key, "Policy": C.policy})
    ok(C.bob, "GenerateDataKeyWithoutPlaintext", {"KeyId": C.key, "KeySpec": "AES_256"})


@test
def test_policies_survive_a_restart():
    C.server.stop()
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd-2.log"))
    eq(ok(C.alice, "GetKeyPolicy", {"KeyId": C.key})["Policy"], C.policy, "policy after restart")
    ok(C.bob, "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256"})
    blob_refused(C.bob, "Decrypt", {"CiphertextBlob": C.acme_blob,
                                    "EncryptionContext": {"tenant": "acme"}})
    back = ok(C.alice, "Decrypt", {"CiphertextBlob": C.acme_blob,
                                   "EncryptionContext": {"tenant": "acme"}})
    check(len(base64.b64decode(back["Plaintext"])) == 32, "alice still decrypts")


# ---- the audit log ---------------------------------------------------------------------


AUDIT_TOOL = os.environ.get("P11KMS_AUDIT") or os.path.join(h.SRCDIR, "p11kms-audit")


def audit_path():
    return C.config + ".audit.log"


def audit_lines():
    with open(audit_path()) as f:
        return [json.loads(line) for line in f]


def verify(*files):
    env = dict(os.environ, SOFTHSM2_CONF=C.token.conf)
    r = subprocess.run([AUDIT_TOOL, "verify", "--config", C.config] + list(files), env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    return r.returncode, (r.stdout + r.stderr).decode("utf-8", "replace")


@test
def test_refusals_are_audited_and_no_secret_is():
    d = ok(C.alice, "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256",
                                        "EncryptionContext": {"tenant": "acme", "order": "42"}})
    blob_refused(C.bob, "Decrypt", {"CiphertextBlob": d["CiphertextBlob"],
                                    "EncryptionContext": {"tenant": "acme", "order": "42"}})
    lines = audit_lines()
    refusal = [x for x in lines if x.get("principal") == "bob" and x.get("operation") == "Decrypt"
               and x.get("type") == "request"][-1]
    # the answer says nothing; the line keeps the reason
    eq((refusal["outcome"], refusal["decision"], refusal["key_arn"]),
       ("InvalidCiphertextException", "deny NeverBobDecrypts", ARN + C.key), "the refusal's line")
    eq(refusal["context_keys"], ["order", "tenant"], "context key names, not values")
    check(len(refusal["context_digest"]) == 64, "a digest of the context")
    check(refusal["key_version"] > 0 and refusal["latency_us"] >= 0, "version and latency")
    made = [x for x in lines if x.get("principal") == "alice"
            and x.get("operation") == "GenerateDataKey" and x.get("outcome") == "ok"][-1]
    eq(made["decision"], "allow AliceUsesForAcme", "the allowing statement is named")
    eq(made["context_digest"], refusal["context_digest"], "same context, same digest")
    with open(audit_path()) as f:
        text = f.read()
    for secret, what in ((d["Plaintext"], "a data key"), ("acme", "a context value"),
                         (C.alice.secret, "a secret access key"), (C.token.user_pin(), "the PIN")):
        check(secret not in text, "%s is not in the audit log" % what)
    rc, out = verify(audit_path())
    eq(rc, 0, "p11kms-audit verify on the live log: %s" % out)


@test
def test_audit_failure_fails_closed():
    """The log's file is rotated to a disk that is full (/dev/full): requests fail with
    KMSInternalException and serve again as soon as the log can be written."""
    log = audit_path()
    os.rename(log, log + ".1")
    os.symlink("/dev/full", log)
    C.server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "audit log:" not in C.server.stderr_text():
        check(time.monotonic() < deadline, "the server reports the unwritable log")
        time.sleep(0.05)
    body = {"KeyId": C.other, "KeySpec": "AES_256"}
    r = call(C.bob, "GenerateDataKey", body)
    doc = h.check_error_response(r, "KMSInternalException", 500)
    eq(doc["message"], "The request could not be audited", "message")
    check("Plaintext" not in r.body.decode(), "no data key leaves unaudited")
    r = call(C.bob, "DescribeKey", {"KeyId": C.other})
    h.check_error_response(r, "KMSInternalException", 500)
    m = h.get_metrics(C.server.endpoint).body.decode()
    check("p11kms_audit_write_failures_total 0\n" not in m, "the failures are counted")
    # Without metrics_key_ids, /metrics names no key.
    check("key_id=" not in m and C.other not in m, "no key ids in /metrics by default")
    os.remove(log)
    ok(C.bob, "GenerateDataKey", body)
    ok(C.bob, "DescribeKey", {"KeyId": C.other})
    rc, out = verify(log + ".1", log)
    eq(rc, 0, "the rotated file and the new one verify together: %s" % out)


@test
def test_sighup_adds_a_principal_without_a_failed_request():
    carol = h.new_principal("carol")
    failures, done = [], threading.Event()

    def load():
        while not done.is_set():
            r = call(C.alice, "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256",
                                                  "EncryptionContext": {"tenant": "acme"}})
            if r.status != 200:
                failures.append((r.status, r.body))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.3)
        h.write_credentials(C.ws.sub("credentials"), [C.admin, C.alice, C.bob, carol])
        C.server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while call(carol, "ListKeys", {}).status != 200:
            check(time.monotonic() < deadline, "carol is known after SIGHUP")
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        done.set()
        for t in threads:
            t.join()
    eq(failures, [], "requests that failed during the reload")
    denied(carol, "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256"},
           "kms:GenerateDataKey", C.key)


# ---- what a policy's patterns can cost -------------------------------------------

PATTERN_MAX = 1024      # bytes in one Action, Resource or StringLike value
PATTERNS_MAX = 256      # Resource ARNs and StringLike values in one policy


def put_policy(key, text):
    return call(C.admin, "PutKeyPolicy", {"KeyId": key, "PolicyName": "default", "Policy": text})


@test
def test_pattern_bounds_at_put_and_create():
    key = ok(C.admin, "CreateKey", {})["KeyMetadata"]["KeyId"]

    def doc(resources):
        return json.dumps({"Statement": [
            {"Effect": "Allow", "Principal": {"AWS": "admin"}, "Action": "kms:*",
             "Resource": resources}]})
    longest = "arn:" + "*" * (PATTERN_MAX - 4)
    eq(put_policy(key, doc(longest)).status, 200, "a Resource of %d bytes" % PATTERN_MAX)
    eq(put_policy(key, doc([ARN + "%d*" % i for i in range(PATTERNS_MAX)])).status, 200,
       "%d Resource patterns" % PATTERNS_MAX)
    for resources, message in (
            (longest + "*", "Statement #0: Resource \"arn:%s...\" is %d bytes, more than %d"
             % ("*" * 35, PATTERN_MAX + 1, PATTERN_MAX)),
            ([ARN + "%d*" % i for i in range(PATTERNS_MAX + 1)],
             "Statement #0: Resource: the policy has more than %d patterns (Resource ARNs and "
             "StringLike/StringNotLike values)" % PATTERNS_MAX)):
        for op, body in (("PutKeyPolicy", {"KeyId": key, "PolicyName": "default",
                                            "Policy": doc(resources)}),
                         ("CreateKey", {"Policy": doc(resources)})):
            r = call(C.admin, op, body)
            got = h.check_error_response(r, "MalformedPolicyDocumentException", 400)
            eq(got["message"], message, "%s: message" % op)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
