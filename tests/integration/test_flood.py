#!/usr/bin/python3
"""A flood of made-up ciphertext blobs cannot slow anyone else down (DESIGN §5,
"Unknown keys and versions"), against one p11kmsd on a fresh SoftHSM2 token.
TAP output.

Principal "victim" calls GenerateDataKey in a loop over one keep-alive
connection (raw signed requests; the signing is not timed), under a key whose
policy (PutKeyPolicy) lets only victim use it. Principal "attacker", from
FLOOD_THREADS (4) threads of another process, each with its own keep-alive
connection, floods Decrypt with blobs of the valid format (byte 1, 16-byte
key id, 4-byte version, 12-byte IV, ciphertext and 16-byte tag): random key
ids with random versions (and a few such blobs again and again, which the
negative cache answers), made-up versions of the attacker's own key, real
blobs of that key with a tag byte flipped, and made-up versions of the
victim's key.

What is asserted:

  - every answer to a made-up blob is exactly 400 InvalidCiphertextException
    with one message for an unknown key, an unknown version of a real key, a
    flipped tag (IV, ciphertext) byte and a wrong encryption context: the
    message does not say which it was, nor name the key or the version;
  - a blob whose key exists is authorized against that key before anything
    else, and a refusal says nothing more: every blob naming the victim's
    key, real or made up, gets the attacker that same answer, so the answer
    does not tell a key that exists from one that does not;
  - the victim's latency bound:

        p99 of the victim's GenerateDataKey under the flood
            <= 2 x its p99 without the flood + 2 ms

    both measured in alternating windows (quiet, flood, quiet, ...: WINDOWS
    of each, WINDOW_CALLS calls a window, so each p99 is over 3,000 calls),
    so that whatever else the machine (2 shared cores) runs weighs on both
    phases alike; and the flood must be real: the attacker sends at least
    half as many requests as the victim makes calls in the flood windows (in
    practice 1.2 to 2 times as many);
  - the flood leaves nothing behind: the token still holds only the root key
    and the audit log's objects, the database gained no row, and p11kmsd's
    resident memory (VmRSS) grew by at most RSS_GROWTH_MAX (20 MB).

The attacker's client runs at niceness ATTACKER_NICE (5): on this 2-core
machine its Python interpreter alone takes a whole core, which says nothing
about p11kmsd (an attacker's client does not run on the server's CPUs); at
niceness 5 it still sends as fast as it can whenever the victim and p11kmsd
leave the CPU free. p11kmsd's own work for the flood is not favoured.
"""

import base64
import json
import os
import secrets
import sqlite3
import sys
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

ARN = "arn:aws:kms:%s:%s:key/" % (h.REGION, h.ACCOUNT)
INVALID_BLOB = "The ciphertext, its key or its encryption context is not valid"
WINDOWS = 20
WINDOW_CALLS = 150
FLOOD_THREADS = 4
# The attacker's client runs at this niceness: see the docstring.
ATTACKER_NICE = 5
RSS_GROWTH_MAX = 20 * 1024 * 1024
ROOT_PREFIX = "p11kms-root:"
AUDIT_KEY_LABEL = "p11kms-audit-key"


class Ctx:
    ws = None
    token = None
    config = None
    server = None
    admin = None
    victim = None
    attacker = None
    victim_key = None
    attacker_key = None
    attacker_blobs = []   # (blob, context) of real blobs under the attacker's key
    flood = None          # the attacker's results
    figures = {}


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.admin = h.new_principal("admin")
    C.victim = h.new_principal("victim")
    C.attacker = h.new_principal("attacker")
    C.token = h.make_token(C.ws.sub("token"), "p11kms-it-flood")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.admin, C.victim, C.attacker])
    # The flood measures what made-up blobs cost everyone else with nothing to stop
    # them: the decryption breaker, which would refuse the attacker after 100 of them
    # (test_breaker), is off.
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, creds,
                              admin_principals="admin", decrypt_breaker_failures="0")
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))


def teardown():
    h.finish(T, C.ws, C.server)


# ---- requests -------------------------------------------------------------------


def b64(data):
    return base64.b64encode(data).decode()


def call(who, op, body):
    return h.kms_call(C.server.endpoint, op, body, who)


def ok(who, op, body):
    return h.kms_ok(C.server.endpoint, op, body, who)


def denied_message(who, action, key):
    return ("User: %s is not authorized to perform: %s on resource: %s%s because no statement "
            "of the key policy allows it" % (who.name, action, ARN, key))


def check_denied(r, who, action, key, what):
    doc = h.check_error_response(r, "AccessDeniedException", 400)
    eq(doc["message"], denied_message(who, action, key), what + ": message")


def check_invalid(r, what):
    doc = h.check_error_response(r, "InvalidCiphertextException", 400)
    eq(doc["message"], INVALID_BLOB, what + ": message")
    return doc["message"]


def only_for(who):
    """A key policy that lets one principal do everything with the key."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "OnlyThisPrincipal", "Effect": "Allow",
         "Principal": {"AWS": "arn:aws:iam::%s:user/%s" % (h.ACCOUNT, who.name)},
         "Action": "kms:*", "Resource": "*"}]}, separators=(",", ":"))


def made_up_blob(key_id, vid=None):
    """Byte 1, the key id, a version, a random IV, 32 bytes and a 16-byte tag."""
    if vid is None:
        vid = int.from_bytes(secrets.token_bytes(4), "big") or 1
    return (b"\x01" + uuid.UUID(key_id).bytes + vid.to_bytes(4, "big") + secrets.token_bytes(12)
            + secrets.token_bytes(32 + 16))


def blob_vid(blob):
    return int.from_bytes(blob[17:21], "big")


def flip(blob, at):
    b = bytearray(blob)
    b[at] ^= 0x01
    return bytes(b)


def decrypt_request(who, blob, context=None):
    body = {"CiphertextBlob": b64(blob)}
    if context:
        body["EncryptionContext"] = context
    return call(who, "Decrypt", body)


# ---- the database and the token, read from outside ------------------------------


def db_rows(sql, args=()):
    """A query on the server's database, opened read-only."""
    path = C.config + ".db"
    conn = sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def db_counts():
    return {t: db_rows("SELECT count(*) FROM %s" % t)[0][0]
            for t in ("keys", "versions", "aliases", "roots", "changes")}


_LIB = []


def token_objects():
    """Every object in the token, read through PyKCS11 as the user: a list of
    (class, key type or None, label, CKA_ID, CKA_APPLICATION or None)."""
    import PyKCS11

    if not _LIB:
        os.environ["SOFTHSM2_CONF"] = C.token.conf
        lib = PyKCS11.PyKCS11Lib()
        lib.load(h.SOFTHSM_MODULE)
        _LIB.append(lib)
    lib = _LIB[0]
    slots = [s for s in lib.getSlotList(tokenPresent=True)
             if lib.getTokenInfo(s).label.strip() == C.token.label]
    eq(len(slots), 1, "slots holding token %s" % C.token.label)
    session = lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION)
    session.login(C.token.user_pin())
    out = []
    try:
        for o in session.findObjects([]):
            cls = session.getAttributeValue(o, [PyKCS11.CKA_CLASS])[0]
            label, cka_id = session.getAttributeValue(o, [PyKCS11.CKA_LABEL, PyKCS11.CKA_ID],
                                                      allAsBinary=True)
            kt = app = None
            if cls == PyKCS11.CKO_SECRET_KEY:
                kt = session.getAttributeValue(o, [PyKCS11.CKA_KEY_TYPE])[0]
            if cls == PyKCS11.CKO_DATA:
                app = bytes(session.getAttributeValue(o, [PyKCS11.CKA_APPLICATION],
                                                      allAsBinary=True)[0])
            out.append((cls, kt, bytes(label or b"").decode("utf-8", "replace"),
                        bytes(cka_id or b""), app))
    finally:
        session.logout()
        session.closeSession()
    return out


def check_token_holds_only_root_and_audit(what):
    """One AES key, the root the database names as current; then only the
    audit log's HMAC key (the log's head is in the database)."""
    import PyKCS11

    objects = token_objects()
    aes = [o for o in objects if o[0] == PyKCS11.CKO_SECRET_KEY and o[1] == PyKCS11.CKK_AES]
    eq(len(aes), 1, "%s: AES keys in the token (the root only)" % what)
    check(aes[0][2].startswith(ROOT_PREFIX), "%s: the AES key's label %r" % (what, aes[0][2]))
    eq(len(aes[0][3]), 16, what + ": the root's CKA_ID length")
    eq(db_rows("SELECT cka_id, label FROM roots WHERE state = 1"), [(aes[0][3], aes[0][2])],
       what + ": the database's current root is the token's AES key")
    rest = sorted((cls, kt, label if cls == PyKCS11.CKO_SECRET_KEY else "", app)
                  for cls, kt, label, _, app in objects if (cls, kt) != aes[0][:2])
    eq(rest, [(PyKCS11.CKO_SECRET_KEY, PyKCS11.CKK_GENERIC_SECRET, AUDIT_KEY_LABEL, None)],
       what + ": the token's other objects (the audit key)")
    return objects


def vm_rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                parts = line.split()
                eq(parts[2], "kB", "VmRSS unit")
                return int(parts[1]) * 1024
    raise AssertionError("no VmRSS in /proc/%d/status" % pid)


# ---- 1. the keys and who may use them ---------------------------------------------


@test
def test_keys_and_policies():
    C.victim_key = ok(C.admin, "CreateKey", {"Description": "flood: the victim's"})[
        "KeyMetadata"]["KeyId"]
    ok(C.admin, "PutKeyPolicy", {"KeyId": C.victim_key, "PolicyName": "default",
                                 "Policy": only_for(C.victim)})
    C.attacker_key = ok(C.admin, "CreateKey", {"Description": "flood: the attacker's own",
                                               "Policy": only_for(C.attacker)})[
        "KeyMetadata"]["KeyId"]
    d = ok(C.victim, "GenerateDataKey", {"KeyId": C.victim_key, "NumberOfBytes": 32})
    victim_blob = base64.b64decode(d["CiphertextBlob"])
    eq(ok(C.victim, "Decrypt", {"CiphertextBlob": d["CiphertextBlob"]})["Plaintext"],
       d["Plaintext"], "the victim decrypts its own data key")
    check_denied(call(C.attacker, "GenerateDataKey", {"KeyId": C.victim_key, "NumberOfBytes": 32}),
                 C.attacker, "kms:GenerateDataKey", C.victim_key, "attacker's GenerateDataKey")
    # A blob whose key exists is authorized against that key first: the real
    # blob, a made-up version, a real version with a made-up tag, and a
    # context that does not match all get the attacker the answer of a blob
    # naming no key at all (AccessDenied would tell that the key exists).
    for what, blob, ctx in (("a real blob", victim_blob, None),
                            ("a made-up version", made_up_blob(C.victim_key), None),
                            ("the real version, a made-up tag",
                             made_up_blob(C.victim_key, blob_vid(victim_blob)), None),
                            ("a flipped tag byte", flip(victim_blob, len(victim_blob) - 1), None),
                            ("a wrong context", victim_blob, {"made": "up"})):
        check_invalid(decrypt_request(C.attacker, blob, ctx),
                      "attacker's Decrypt of the victim's key, " + what)
    for i in range(4):
        ctx = {"attacker": str(i)}
        d = ok(C.attacker, "GenerateDataKey", {"KeyId": C.attacker_key, "NumberOfBytes": 32,
                                               "EncryptionContext": ctx})
        C.attacker_blobs.append((base64.b64decode(d["CiphertextBlob"]), ctx))
    check_invalid(decrypt_request(C.victim, *C.attacker_blobs[0]),
                  "victim's Decrypt of the attacker's blob")


# ---- 2. one answer for every blob that does not open ------------------------------------


@test
def test_one_answer_for_every_blob_that_does_not_open():
    blob, ctx = C.attacker_blobs[0]
    eq(ok(C.attacker, "Decrypt", {"CiphertextBlob": b64(blob), "EncryptionContext": ctx})["KeyId"],
       ARN + C.attacker_key, "the attacker's real blob decrypts")
    cases = [
        ("an unknown key", made_up_blob(str(uuid.uuid4())), None),
        ("an unknown key, asked again (negative cache)", None, None),
        ("an unknown version of a real key", made_up_blob(C.attacker_key), None),
        ("the real version with a made-up IV, ciphertext and tag",
         made_up_blob(C.attacker_key, blob_vid(blob)), ctx),
        ("a flipped tag byte", flip(blob, len(blob) - 1), ctx),
        ("a flipped ciphertext byte", flip(blob, 1 + 16 + 4 + 12), ctx),
        ("a flipped IV byte", flip(blob, 1 + 16 + 4), ctx),
        ("a wrong encryption context", blob, {"attacker": "someone else"}),
        ("no encryption context", blob, None),
    ]
    cases[1] = (cases[1][0], cases[0][1], None)
    messages = set()
    for what, b, c in cases:
        r = decrypt_request(C.attacker, b, c)
        messages.add(check_invalid(r, what))
        for part in (C.attacker_key, C.attacker_key.replace("-", ""), str(blob_vid(b))):
            check(part not in r.body.decode(), "%s: the answer names %r: %r" % (what, part, r.body))
    eq(messages, {INVALID_BLOB}, "messages")
    # None of those went into the database.
    eq(db_rows("SELECT count(*) FROM keys")[0][0], 2, "keys rows")
    eq(db_rows("SELECT count(*) FROM versions")[0][0], 2, "versions rows")


# ---- 3. the flood -----------------------------------------------------------------


ATTACKER = r"""
import base64, json, os, secrets, sys, threading, time, uuid, http.client
sys.dont_write_bytecode = True
sys.path.insert(0, sys.argv[1])
import harness as h

os.nice(int(sys.argv[2]))
cfg = json.loads(sys.stdin.readline())
me = h.Principal(cfg["access_key"], cfg["secret"], cfg["name"])
real = [(base64.b64decode(b), c) for b, c in cfg["blobs"]]
INVALID = ("InvalidCiphertextException", cfg["invalid"])

def made_up(key_id, vid=None):
    if vid is None:
        vid = int.from_bytes(secrets.token_bytes(4), "big") or 1
    return (b"\x01" + uuid.UUID(key_id).bytes + vid.to_bytes(4, "big") + secrets.token_bytes(12)
            + secrets.token_bytes(48))

# Blobs sent again and again: answered from the negative cache after the first.
again = [made_up(str(uuid.uuid4())) for _ in range(64)]

def pick(i):
    k = i % 10
    if k < 3:
        return "unknown key", made_up(str(uuid.uuid4())), None, INVALID
    if k < 4:
        return "unknown key, again", again[(i // 10) % len(again)], None, INVALID
    if k < 7:
        return "unknown version", made_up(cfg["own_key"]), None, INVALID
    if k < 8:
        blob, ctx = real[i % len(real)]
        b = bytearray(blob)
        b[len(b) - 1 - (i % 16)] ^= 1 << (i % 8)
        return "flipped tag", bytes(b), ctx, INVALID
    return "victim's key", made_up(cfg["victim_key"]), None, INVALID

go = threading.Event()
quit_ = threading.Event()
lock = threading.Condition()
busy = [0]
stats = {}

def reset():
    stats.clear()
    stats.update({"count": 0, "kinds": {}, "messages": {}, "bad": [], "more_bad": 0})

def one(conn, i):
    kind, blob, ctx, want = pick(i)
    body = {"CiphertextBlob": base64.b64encode(blob).decode()}
    if ctx:
        body["EncryptionContext"] = ctx
    headers, data = h.sign(cfg["endpoint"], "TrentService.Decrypt", body, me)
    conn.request("POST", "/", body=data, headers=headers)
    r = conn.getresponse()
    raw = r.read()
    got = None
    try:
        doc = json.loads(raw)
        if (r.status == 400 and sorted(doc) == ["__type", "message"]
                and r.getheader("X-Amzn-ErrorType") == doc["__type"]
                and (r.getheader("Content-Type") or "").split(";")[0] == h.JSON_TYPE):
            got = (doc["__type"], doc["message"])
    except ValueError:
        pass
    with lock:
        stats["count"] += 1
        stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
        if got is not None:
            key = kind + " | " + got[0] + " | " + got[1]
            stats["messages"][key] = stats["messages"].get(key, 0) + 1
        if got != want:
            if len(stats["bad"]) < 5:
                stats["bad"].append([kind, r.status, raw.decode("utf-8", "replace")[:300]])
            else:
                stats["more_bad"] += 1

def worker(n):
    conn = http.client.HTTPConnection(cfg["host"], cfg["port"], timeout=30)
    i = n
    while True:
        go.wait()
        if quit_.is_set():
            break
        with lock:
            if not go.is_set():
                continue
            busy[0] += 1
        try:
            one(conn, i)
        except Exception as e:  # a broken connection: counted as a wrong answer
            with lock:
                stats["bad"].append(["exception", 0, repr(e)])
            conn.close()
            conn = http.client.HTTPConnection(cfg["host"], cfg["port"], timeout=30)
        finally:
            with lock:
                busy[0] -= 1
                lock.notify_all()
        i += int(cfg["threads"])
    conn.close()

reset()
threads = [threading.Thread(target=worker, args=(n,), daemon=True)
           for n in range(int(cfg["threads"]))]
for t in threads:
    t.start()
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.strip()
    if cmd == "go":
        with lock:
            reset()
        began = time.monotonic()
        go.set()
        with lock:  # every thread has a request out (or done)
            lock.wait_for(lambda: stats["count"] + busy[0] >= int(cfg["threads"]), timeout=30)
        print("flooding", flush=True)
    elif cmd == "stop":
        with lock:
            go.clear()
            lock.wait_for(lambda: busy[0] == 0, timeout=60)
            out = json.loads(json.dumps(dict(stats, seconds=time.monotonic() - began)))
        print(json.dumps(out), flush=True)
    elif cmd == "quit":
        break
quit_.set()
go.set()
for t in threads:
    t.join(timeout=10)
"""


class Attacker(h.Flooder):
    """The attacker's process: 4 threads, each with a keep-alive connection,
    sending Decrypt of made-up blobs while told to ("go" ... "stop")."""

    def __init__(self):
        cfg = {"access_key": C.attacker.access_key, "secret": C.attacker.secret,
               "name": C.attacker.name, "endpoint": C.server.endpoint, "host": C.server.host,
               "port": C.server.port, "threads": FLOOD_THREADS, "own_key": C.attacker_key,
               "victim_key": C.victim_key, "invalid": INVALID_BLOB,
               "blobs": [(b64(b), c) for b, c in C.attacker_blobs]}
        super().__init__(ATTACKER, cfg, ATTACKER_NICE)


def victim_window(conn, n):
    """n GenerateDataKey calls of the victim over its keep-alive connection;
    the seconds each took from sending to the last byte of the answer."""
    out = []
    ep = C.server.endpoint
    for i in range(n):
        body = {"KeyId": C.victim_key, "NumberOfBytes": 32}
        headers, data = h.sign(ep, "TrentService.GenerateDataKey", body, C.victim)
        t0 = time.perf_counter()
        conn.request("POST", "/", body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        out.append(time.perf_counter() - t0)
        if r.status != 200:
            raise AssertionError("the victim's GenerateDataKey answered %d: %r" % (r.status, raw))
    # The last answer in full: a data key under the victim's key.
    doc = json.loads(raw)
    eq(doc["KeyId"], ARN + C.victim_key, "the victim's KeyId")
    eq(len(base64.b64decode(doc["Plaintext"])), 32, "the victim's plaintext length")
    return out


def cpu_seconds(pid):
    """User plus system CPU time p11kmsd has used."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def p99(samples):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


def p50(samples):
    s = sorted(samples)
    return s[len(s) // 2]


@test
def test_flood_does_not_slow_the_victim():
    import http.client

    before_counts = db_counts()
    conn = http.client.HTTPConnection(C.server.host, C.server.port, timeout=30)
    attacker = Attacker()
    quiet, flood, results = [], [], []
    try:
        victim_window(conn, WINDOW_CALLS)  # warm-up: connection, key cache, blocks of uses
        rss_before = vm_rss(C.server.proc.pid)
        pid = C.server.proc.pid
        cpu = {"quiet": 0.0, "flood": 0.0}
        for w in range(WINDOWS):
            c0 = cpu_seconds(pid)
            quiet += victim_window(conn, WINDOW_CALLS)
            c1 = cpu_seconds(pid)
            attacker.go()
            try:
                flood += victim_window(conn, WINDOW_CALLS)
            finally:
                c2 = cpu_seconds(pid)
                results.append(attacker.stop())
            cpu["quiet"] += c1 - c0
            cpu["flood"] += c2 - c1
        rss_after = vm_rss(C.server.proc.pid)
    finally:
        conn.close()
        attacker.close()

    count = sum(r["count"] for r in results)
    seconds = sum(r["seconds"] for r in results)
    kinds, messages, bad = {}, {}, []
    for r in results:
        for k, v in r["kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
        for k, v in r["messages"].items():
            messages[k] = messages.get(k, 0) + v
        bad += r["bad"]
    extra_bad = sum(r["more_bad"] for r in results)
    h.diag("flood: %d Decrypt in %.1f s of flood windows (%.0f/s from %d threads): %r"
           % (count, seconds, count / seconds, FLOOD_THREADS, sorted(kinds.items())))
    h.diag("p11kmsd CPU: %.2f s in the quiet windows (%.0f us a victim call), %.2f s in the "
           "flood windows (%.0f us a call, flood and victim)"
           % (cpu["quiet"], 1e6 * cpu["quiet"] / max(len(quiet), 1), cpu["flood"],
              1e6 * cpu["flood"] / max(count + len(flood), 1)))
    for k, v in sorted(messages.items()):
        h.diag("  %6d x %s" % (v, k))
    qp99, fp99 = p99(quiet), p99(flood)
    bound = 2 * qp99 + 0.002
    h.diag("victim GenerateDataKey: quiet p50 %.3f ms p99 %.3f ms (%d calls); under flood "
           "p50 %.3f ms p99 %.3f ms (%d calls); bound %.3f ms"
           % (1e3 * p50(quiet), 1e3 * qp99, len(quiet), 1e3 * p50(flood), 1e3 * fp99,
              len(flood), 1e3 * bound))
    h.diag("p99 of each window, quiet / flood (ms): %s" % ", ".join(
        "%.1f/%.1f" % (1e3 * p99(quiet[i:i + WINDOW_CALLS]), 1e3 * p99(flood[i:i + WINDOW_CALLS]))
        for i in range(0, len(quiet), WINDOW_CALLS)))
    h.diag("p11kmsd VmRSS %.1f MB before the flood, %.1f MB after (%+.1f MB)"
           % (rss_before / 2**20, rss_after / 2**20, (rss_after - rss_before) / 2**20))
    C.figures = {"quiet_p99_ms": 1e3 * qp99, "flood_p99_ms": 1e3 * fp99,
                 "flood_rate": count / seconds, "rss_growth_mb": (rss_after - rss_before) / 2**20}

    check(count >= len(flood) // 2, "the flood sent %d requests while the victim made %d calls"
          % (count, len(flood)))
    eq(bad, [], "flood answers other than the expected error (first ones)")
    eq(extra_bad, 0, "more flood answers other than the expected error")
    for kind in ("unknown key", "unknown key, again", "unknown version", "flipped tag",
                 "victim's key"):
        check(kinds.get(kind, 0) >= 100, "flood blobs of kind %r: %d" % (kind, kinds.get(kind, 0)))
    eq({k.split(" | ", 1)[1] for k in messages}, {"InvalidCiphertextException | " + INVALID_BLOB},
       "the one answer to every made-up blob, the victim's key's too")
    check(fp99 <= bound, "victim's p99 under flood %.3f ms > 2 x quiet p99 %.3f ms + 2 ms"
          % (1e3 * fp99, 1e3 * qp99))
    if h.sanitized_server():
        # AddressSanitizer's quarantine holds freed memory back: no bound on RSS then.
        h.diag("sanitized p11kmsd: VmRSS grew by %.1f MB (not bounded)"
               % ((rss_after - rss_before) / 1048576.0))
    else:
        check(rss_after - rss_before <= RSS_GROWTH_MAX, "p11kmsd's VmRSS grew by %.1f MB over "
              "the flood" % ((rss_after - rss_before) / 2**20))
    eq(db_counts(), before_counts, "database rows after the flood")


@test
def test_flood_leaves_the_token_alone():
    check_token_holds_only_root_and_audit("after the flood")
    # The server still serves both principals.
    d = ok(C.victim, "GenerateDataKey", {"KeyId": C.victim_key, "NumberOfBytes": 32})
    eq(ok(C.victim, "Decrypt", {"CiphertextBlob": d["CiphertextBlob"]})["Plaintext"],
       d["Plaintext"], "the victim's data key after the flood")
    blob, ctx = C.attacker_blobs[-1]
    eq(ok(C.attacker, "Decrypt", {"CiphertextBlob": b64(blob), "EncryptionContext": ctx})["KeyId"],
       ARN + C.attacker_key, "the attacker's real blob after the flood")


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
