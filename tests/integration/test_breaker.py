#!/usr/bin/python3
"""The decryption breaker against p11kmsd on a fresh SoftHSM2 token (behind the
fault-injecting module): a principal sending made-up and tampered blobs is
refused Decrypt and ReEncrypt after exactly decrypt_breaker_failures failures,
with an alert in the audit log, on stderr and in /metrics, while another
principal decrypts as before; after the cool-down it is served again. A key
failing for several principals raises the alarm without being refused to
anyone, and failures that are the token's fault count for nothing. TAP output."""

import base64
import json
import os
import re
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultmod as fm  # noqa: E402
import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

FAILURES = 5
WINDOW_S = 10
COOLDOWN_S = 3
ARN = "arn:aws:kms:%s:%s:key/" % (h.REGION, h.ACCOUNT)
TIME_RE = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
AUDIT_TOOL = os.environ.get("P11KMS_AUDIT") or os.path.join(h.SRCDIR, "p11kms-audit")


class Ctx:
    ws = None
    token = None
    config = None
    faults = None
    server = None
    alice = None
    bob = None
    carol = None
    key = None
    blob = None  # a valid blob of key, empty context


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.alice = h.new_principal("alice")
    C.bob = h.new_principal("bob")
    C.carol = h.new_principal("carol")
    C.token = h.make_token(C.ws.sub("token"), "p11kms-it-breaker")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.alice, C.bob, C.carol])
    C.faults = fm.FaultControl(C.ws.sub("faults"))
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, creds,
                              module=fm.faultmod_module(),
                              decrypt_breaker_failures=str(FAILURES),
                              decrypt_breaker_window_s=str(WINDOW_S),
                              decrypt_breaker_cooldown_s=str(COOLDOWN_S))
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"),
                                     env=C.faults.env())
    C.key = new_key()
    C.blob = encrypt(C.alice, C.key)


def teardown():
    h.finish(T, C.ws, C.server)


def call(who, op, body):
    return h.kms_call(C.server.endpoint, op, body, who)


def ok(who, op, body):
    return h.kms_ok(C.server.endpoint, op, body, who)


def new_key():
    return ok(C.alice, "CreateKey", {})["KeyMetadata"]["KeyId"]


def encrypt(who, key):
    return base64.b64decode(ok(who, "Encrypt", {"KeyId": key, "Plaintext": b64(b"secret")})
                            ["CiphertextBlob"])


def b64(data):
    return base64.b64encode(data).decode()


def decrypt(who, blob, **extra):
    return call(who, "Decrypt", dict({"CiphertextBlob": b64(blob)}, **extra))


def decrypts(who, blob, what):
    r = decrypt(who, blob)
    eq(r.status, 200, "%s: %s decrypts (%r)" % (what, who.name, r.body))
    eq(base64.b64decode(r.json()["Plaintext"]), b"secret", "%s: plaintext" % what)


def tampered(blob):
    b = bytearray(blob)
    b[-1] ^= 1  # the GCM tag
    return bytes(b)


def made_up(i):
    return os.urandom(40 + i)


def fails(who, blob, error, what, **extra):
    r = decrypt(who, blob, **extra)
    h.check_error_response(r, error, 400)
    check(True, what)


def metrics():
    r = h.get_metrics(C.server.endpoint)
    eq(r.status, 200, "GET /metrics")
    return promtext.parse(r.body.decode("utf-8"))


def metric(parsed, name, **labels):
    try:
        return promtext.value(parsed, name, **labels)
    except KeyError:
        return 0


def audit_lines():
    with open(C.config + ".audit.log") as f:
        return [json.loads(line) for line in f]


def alerts(kind):
    return [x for x in audit_lines() if x.get("type") == "alert" and x.get("kind") == kind]


@test
def test_token_faults_do_not_count():
    before = metric(metrics(), "p11kms_decrypt_breaker_trips_total", kind="principal")
    C.faults.set("C_Decrypt", rv="CKR_DEVICE_ERROR")
    try:
        for i in range(FAILURES + 2):
            r = decrypt(C.alice, C.blob)
            h.check_error_response(r, "KeyUnavailableException", 500)
        check(C.faults.injected("C_Decrypt") >= FAILURES + 2, "the token failed each time")
    finally:
        C.faults.clear()
    decrypts(C.alice, C.blob, "after %d token faults" % (FAILURES + 2))
    eq(metric(metrics(), "p11kms_decrypt_breaker_trips_total", kind="principal"), before,
       "no breaker opened for faults that are the token's")
    eq(alerts("principal"), [], "no alert")


@test
def test_principal_breaker_opens_after_exactly_the_threshold():
    other = new_key()
    # FAILURES - 1 failures of every kind the caller can cause: not yet
    fails(C.alice, made_up(0), "InvalidCiphertextException", "a made-up blob")
    fails(C.alice, made_up(1), "InvalidCiphertextException", "another made-up blob")
    fails(C.alice, tampered(C.blob), "InvalidCiphertextException", "a tampered blob")
    fails(C.alice, C.blob, "IncorrectKeyException", "the wrong KeyId", KeyId=other)
    decrypts(C.alice, C.blob, "after %d failures" % (FAILURES - 1))
    eq(metric(metrics(), "p11kms_decrypt_breakers_open", kind="principal"), 0, "none open yet")
    # the last one opens it
    fails(C.alice, made_up(2), "InvalidCiphertextException", "failure #%d" % FAILURES)
    opened = time.monotonic()

    r = decrypt(C.alice, C.blob)
    doc = h.check_error_response(r, "ThrottlingException", 429)
    m = re.match(r"^Decryption is suspended for alice until (%s): %d decryptions failed within "
                 r"%d s \(InvalidCiphertextException or IncorrectKeyException\)$"
                 % (TIME_RE, FAILURES, WINDOW_S), doc["message"])
    check(m, "the refusal's message: %r" % doc["message"])
    check(r.header("Retry-After") in [str(s) for s in range(1, COOLDOWN_S + 1)],
          "Retry-After: %r" % r.header("Retry-After"))
    r = call(C.alice, "ReEncrypt", {"CiphertextBlob": b64(C.blob), "DestinationKeyId": C.key})
    h.check_error_response(r, "ThrottlingException", 429)
    parsed = metrics()
    eq(metric(parsed, "p11kms_decrypt_breaker_trips_total", kind="principal"), 1, "trips")
    eq(metric(parsed, "p11kms_decrypt_breaker_trips_total", kind="key"), 0, "key trips")
    eq(metric(parsed, "p11kms_decrypt_breakers_open", kind="principal"), 1, "open breakers")
    eq(metric(parsed, "p11kms_decrypt_breaker_refused_total"), 2, "refused requests")
    # meanwhile bob decrypts the same blob, and alice may still encrypt
    decrypts(C.bob, C.blob, "while alice's breaker is open")
    ok(C.bob, "ReEncrypt", {"CiphertextBlob": b64(C.blob), "DestinationKeyId": C.key})
    check(encrypt(C.alice, C.key), "alice still encrypts")
    h.check_error_response(decrypt(C.alice, C.blob), "ThrottlingException", 429)
    check(time.monotonic() < opened + COOLDOWN_S, "all of this within the cool-down")

    found = alerts("principal")
    eq(len(found), 1, "one alert line: %r" % found)
    a = found[0]
    eq((a["alert"], a["name"], a["failures"], a["window_s"], a["cooldown_s"]),
       ("decrypt_breaker", "alice", FAILURES, WINDOW_S, COOLDOWN_S), "the alert line")
    eq(a["until"], m.group(1), "the alert and the refusal name the same time")
    refused = [x for x in audit_lines() if x.get("type") == "request"
               and x.get("principal") == "alice" and x.get("outcome") == "ThrottlingException"]
    eq([x["operation"] for x in refused], ["Decrypt", "ReEncrypt", "Decrypt"],
       "the refusals are audited")
    eq(refused[0]["decision"], "decryption suspended until %s" % m.group(1), "their decision")
    text = C.server.stderr_text()
    check("p11kmsd alert: decryption breaker opened for principal alice: %d decryptions failed "
          "within %d s; its Decrypt and ReEncrypt calls are refused until %s"
          % (FAILURES, WINDOW_S, m.group(1)) in text, "the alert on stderr: %r" % text[-2000:])
    env = dict(os.environ, SOFTHSM2_CONF=C.token.conf)
    v = subprocess.run([AUDIT_TOOL, "verify", "--config", C.config, C.config + ".audit.log"],
                       env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, timeout=60)
    eq(v.returncode, 0, "p11kms-audit verify with the alert line in the chain: %s"
       % v.stdout.decode("utf-8", "replace"))

    # after the cool-down: served again
    time.sleep(max(0.0, opened + COOLDOWN_S + 0.3 - time.monotonic()))
    decrypts(C.alice, C.blob, "after the cool-down")
    eq(metric(metrics(), "p11kms_decrypt_breakers_open", kind="principal"), 0, "closed again")
    # and counting starts afresh: one failure does not reopen it
    fails(C.alice, made_up(3), "InvalidCiphertextException", "a failure after the cool-down")
    decrypts(C.alice, C.blob, "one failure after the cool-down")


@test
def test_a_refused_blob_counts_as_one_that_does_not_open():
    """A blob whose key the caller may not use gets the one answer of a blob that does not
    open, and counts against the principal the same way: the breaker opens after exactly
    FAILURES of them, as it does for made-up blobs, so it cannot tell such a key from an
    unknown one. It does not count against the key: no key alert."""
    before = metric(metrics(), "p11kms_decrypt_breaker_trips_total", kind="key")
    policy = {"Version": "2012-10-17", "Statement": [
        {"Sid": "Admin", "Effect": "Allow", "Principal": {"AWS": "alice"}, "Action": "kms:*",
         "Resource": "*"}]}
    key = ok(C.alice, "CreateKey", {"Policy": json.dumps(policy)})["KeyMetadata"]["KeyId"]
    blob = base64.b64decode(ok(C.alice, "Encrypt", {"KeyId": key, "Plaintext": b64(b"secret")})
                            ["CiphertextBlob"])
    for i in range(FAILURES):
        fails(C.carol, blob, "InvalidCiphertextException", "refused blob #%d" % (i + 1))
    h.check_error_response(decrypt(C.carol, C.blob), "ThrottlingException", 429)
    eq(metric(metrics(), "p11kms_decrypt_breaker_trips_total", kind="key"), before,
       "no key trip from a principal its policy refuses")
    decrypts(C.alice, blob, "alice, whom the key's policy allows")


@test
def test_key_breaker_alerts_without_refusing():
    key = new_key()
    blob = encrypt(C.bob, key)
    bad = tampered(blob)
    # failures spread over two principals, none of them at the threshold
    for who in (C.alice, C.bob, C.alice, C.bob, C.alice):
        fails(who, bad, "InvalidCiphertextException", "%s: a tampered blob of the key" % who.name)
    found = alerts("key")
    eq(len(found), 1, "one alert for the key: %r" % found)
    eq((found[0]["name"], found[0]["failures"]), (ARN + key, FAILURES), "the key's alert")
    parsed = metrics()
    eq(metric(parsed, "p11kms_decrypt_breaker_trips_total", kind="key"), 1, "key trips")
    eq(metric(parsed, "p11kms_decrypt_breakers_open", kind="key"), 1, "key breakers open")
    # the key is still served to both
    decrypts(C.bob, blob, "bob, the key's breaker open")
    r = decrypt(C.alice, blob)
    eq(r.status, 200, "alice, the key's breaker open (%r)" % r.body)
    check("decryption breaker opened for key %s%s" % (ARN, key) in C.server.stderr_text(),
          "the key's alert on stderr")


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
