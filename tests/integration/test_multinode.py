#!/usr/bin/python3
"""Two p11kmsd nodes on one SQLite database, each with its own copy of the token, with nginx
in front of them (DESIGN §5 and §10): data keys cross nodes, lifecycle changes
made on one node reach the other within a stated bound, and concurrent changes
fired at both nodes at the same moment are neither lost nor duplicated. What
each node answers is checked against the database itself (opened read-only
with sqlite3), and the token against what it may hold. TAP output.

Both nodes' configurations name the same `database = sqlite:...` file (WAL:
several processes on one machine). `p11kmsd init` makes the root key once,
before either node starts; each node then has its own copy of that token
(as an HSM cluster clones its keys; nodes never share one token folder),
whose only other object is its audit log's HMAC key (each node's audit head
is a row of the database).

The propagation bound this test asserts:

    A change acknowledged by one node is visible on the other within BOUND
    (2 s): each node polls the database's change sequence every refresh_ms
    (50 ms here) and reads what changed again at its next use, so the bound
    is refresh_ms plus one read, with ample room for a loaded machine. A
    blob naming a key or a key version the node has not seen yet does not
    wait for that poll at all: the node looks it up in the database at once,
    so a blob made on one node decrypts on the other on the first try.

The invariants of the races (P11KMS_MULTINODE_ROUNDS rounds, default 100,
each firing two changes at both nodes at the same moment, with a
GenerateDataKey on each):

  - RotateKeyOnDemand on both: exactly two new ON_DEMAND versions rows (each
    call is one rotation), ordinals 1..N without gaps or repeats;
  - DisableKey on one, EnableKey on the other: the final state is one of the
    two, the same in the database and on both nodes;
  - UpdateAlias to two targets: the alias names one of them;
  - CreateAlias of one new name on both: exactly one succeeds, the other gets
    AlreadyExistsException (409), and the alias names the winner's target;
  - UpdateAlias on one, DeleteAlias on the other: the delete succeeds, the
    update succeeds (it came first) or gets NotFoundException (it came
    second), and either way the alias is gone;
  - all along, the raced key rotates on its schedule every second (day_seconds
    = 1, rotation period 1 day) on both nodes at once: AUTOMATIC versions are
    at least a period apart;
  - a scheduled rotation due on both nodes at once makes exactly ONE version
    (test_scheduled_rotation_due_on_both_nodes_makes_one_version: 100 keys
    due in the same second, until both nodes are seen preparing the same
    rotations).

At the end each node's token holds exactly one AES key, the root, and every
blob made during the test decrypts on both nodes.
"""

import base64
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

BOUND = 2.0  # seconds: refresh_ms (0.05 s) plus a read, with ample room to spare
POLL_PAUSE = 0.02
ROUNDS = int(os.environ.get("P11KMS_MULTINODE_ROUNDS") or "100")
NODE_SETTINGS = {
    # Short, so that the nodes' polls for due work often land in each
    # other's (see test_scheduled_rotation_due_on_both_nodes_makes_one_version).
    "refresh_ms": "50",
    "day_seconds": "1",
    "rotation_min_days": "1",
    "max_on_demand_rotations": "100000",
    # /metrics lists each enabled key held (p11kms_key_version_uses_reserved).
    "metrics_key_ids": "true",
}
ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
STATE_NAMES = {0: "Enabled", 1: "Disabled", 2: "PendingDeletion"}
ROTATION_NAMES = {1: "AUTOMATIC", 2: "ON_DEMAND"}
ROOT_PREFIX = "p11kms-root:"
AUDIT_KEY_LABEL = "p11kms-audit-key"
# Keys made due in the same second by the scheduled-rotation test (one page of
# a node's due work): enough that one node is often still working through
# them when the other's poll comes.
DUE_KEYS = 100
MIN_DUE_KEYS = 12    # the fewest keys an attempt makes due at once
MIN_CONCLUSIVE = 30  # keys whose one rotation, made on either node, is checked exactly


class Ctx:
    ws = None
    tokens = {}  # node name -> its copy of the token
    principal = None
    db = None         # the database file both nodes share
    a = None          # node A (a harness.Server)
    b = None          # node B
    nginx = None      # harness.Nginx in front of both nodes
    names = {}        # endpoint -> "A", "B", "nginx"
    delays = []       # (what, seconds) of every propagation measured
    blobs = []        # (what, blob, plaintext, context, key id) to decrypt at the end
    root = None       # (CKA_ID, label) of the root key


C = Ctx()


# ---- set-up and tear-down ------------------------------------------------------


def setup():
    C.ws = h.Workspace()
    token = h.make_token(C.ws.sub("token"), "p11kms-multinode")
    C.principal = h.new_principal("multinode")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.principal])
    C.db = C.ws.sub("p11kms.db")
    # The database and the root key, once, before either node starts.
    h.init_database(h.write_config(C.ws.sub("init.conf"), token, creds,
                                   database="sqlite:" + C.db, **NODE_SETTINGS), token)
    objects = token_objects(token)
    eq(len(objects), 1, "objects in the token after p11kmsd init (the root key only)")
    C.root = check_root(objects[0], "after p11kmsd init")
    for name in ("a", "b"):
        # Each node its own copy of the token with the root key, its own
        # configuration and audit log; both the same database.
        C.tokens[name] = h.copy_token(token, C.ws.sub("token-%s" % name))
        conf = h.write_config(C.ws.sub("node-%s.conf" % name), C.tokens[name], creds,
                              database="sqlite:" + C.db, **NODE_SETTINGS)
        setattr(C, name, h.start_config_server(conf, C.tokens[name],
                                               C.ws.sub("node-%s.log" % name), init=False))
    C.nginx = h.Nginx(C.ws.sub("nginx"), [C.a.port, C.b.port]).start()
    C.names = {C.a.endpoint: "A", C.b.endpoint: "B", nginx_endpoint(): "nginx"}
    h.diag("node A %s, node B %s, nginx %s" % (C.a.endpoint, C.b.endpoint, nginx_endpoint()))


def teardown():
    try:
        try:
            if C.nginx:
                C.nginx.stop()
        finally:
            for name, node in (("A", C.a), ("B", C.b)):
                if node and T.failed:
                    h.diag("node %s's log (tail):\n%s" % (name, node.stderr_text()[-6000:]))
            try:
                if C.a:
                    C.a.stop()
            finally:
                if C.b:
                    C.b.stop()
    finally:
        if C.ws:
            C.ws.close()


def nginx_endpoint():
    return C.nginx.endpoint


# ---- the database and the token, read from outside -------------------------------


def db_rows(sql, args=()):
    """Rows of one query on the shared database, opened read-only (the nodes
    keep writing it: WAL lets a reader in)."""
    conn = sqlite3.connect("file:%s?mode=ro" % C.db, uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def key_row(key):
    cols = ("state", "rotation_enabled", "rotation_days", "rotation_seconds", "next_rotation",
            "current_vid", "on_demand", "token_resident")
    rows = db_rows("SELECT %s FROM keys WHERE id = ?" % ", ".join(cols), (uuid.UUID(key).bytes,))
    check(len(rows) <= 1, "at most one keys row for %s" % key)
    return dict(zip(cols, rows[0])) if rows else None


def version_rows(key):
    """The key's versions rows in ordinal order: (n, vid, created, rotation,
    root_id, length(wrapped))."""
    return db_rows("SELECT n, vid, created, rotation, root_id, length(wrapped) FROM versions "
                   "WHERE key_id = ? ORDER BY n", (uuid.UUID(key).bytes,))


def check_version_rows(key, what):
    """Ordinals 1..N without gaps or repeats, distinct version ids, the first
    version the only one without a rotation, each wrapped (40 bytes) under the
    root. Returns the rows."""
    rows = version_rows(key)
    eq([r[0] for r in rows], list(range(1, len(rows) + 1)), "%s: ordinals of %s" % (what, key))
    eq(len({r[1] for r in rows}), len(rows), "%s: distinct version ids of %s" % (what, key))
    eq([r[3] for r in rows][:1], [0], "%s: the first version is no rotation" % what)
    check(all(r[3] in (1, 2) for r in rows[1:]), "%s: rotation types %r" % (what, rows))
    for r in rows:
        eq((r[4], r[5]), (1, 40), "%s: version n %d of %s: root id, wrapped length"
           % (what, r[0], key))
    return rows


def db_aliases():
    return sorted((n, str(uuid.UUID(bytes=bytes(t))), c, u)
                  for n, t, c, u in db_rows("SELECT name, target, created, updated FROM aliases"))


def db_alias_target(name):
    rows = db_rows("SELECT target FROM aliases WHERE name = ?", (name,))
    return str(uuid.UUID(bytes=bytes(rows[0][0]))) if rows else None


_TOKEN_OBJECTS = r"""
import json, sys, PyKCS11
lib = PyKCS11.PyKCS11Lib()
lib.load(sys.argv[1])
slots = [s for s in lib.getSlotList(tokenPresent=True)
         if lib.getTokenInfo(s).label.strip() == sys.argv[2]]
if len(slots) != 1:
    sys.exit("slots holding token %s: %d" % (sys.argv[2], len(slots)))
session = lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION)
session.login(sys.stdin.read().strip())
flags = (PyKCS11.CKA_TOKEN, PyKCS11.CKA_PRIVATE, PyKCS11.CKA_SENSITIVE,
         PyKCS11.CKA_EXTRACTABLE, PyKCS11.CKA_ENCRYPT, PyKCS11.CKA_DECRYPT,
         PyKCS11.CKA_WRAP, PyKCS11.CKA_UNWRAP, PyKCS11.CKA_SIGN, PyKCS11.CKA_VERIFY)
out = []
for o in session.findObjects([]):
    cls = session.getAttributeValue(o, [PyKCS11.CKA_CLASS])[0]
    label, cka_id = session.getAttributeValue(o, [PyKCS11.CKA_LABEL, PyKCS11.CKA_ID],
                                              allAsBinary=True)
    d = {"class": cls, "type": None,
         "label": bytes(label or b"").decode("utf-8", "replace"),
         "id": bytes(cka_id or b"").hex(), "app": None, "flags": None}
    if cls == PyKCS11.CKO_SECRET_KEY:
        d["type"] = session.getAttributeValue(o, [PyKCS11.CKA_KEY_TYPE])[0]
        d["flags"] = [bool(x) for x in session.getAttributeValue(o, list(flags))]
    if cls == PyKCS11.CKO_DATA:
        d["app"] = bytes(session.getAttributeValue(o, [PyKCS11.CKA_APPLICATION],
                                                   allAsBinary=True)[0]).hex()
    out.append(d)
session.logout()
session.closeSession()
print(json.dumps(out))
"""


def token_objects(token):
    """Every object in a token, read through PyKCS11 as the user, in a child
    process (SoftHSM2 reads its configuration, so which copy of the token it
    sees, once per process): a list of dicts (class, key type, label, id,
    application and, for a secret key, its flags)."""
    r = subprocess.run(["/usr/bin/python3", "-c", _TOKEN_OBJECTS, h.SOFTHSM_MODULE, token.label],
                       input=token.user_pin().encode(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=dict(os.environ, SOFTHSM2_CONF=token.conf),
                       timeout=60)
    eq(r.returncode, 0, "PyKCS11 listing of %s (stderr %r)" % (token.dir, r.stderr))
    out = json.loads(r.stdout)
    for d in out:
        d["id"] = bytes.fromhex(d["id"])
        d["app"] = None if d["app"] is None else bytes.fromhex(d["app"])
        d["flags"] = None if d["flags"] is None else tuple(d["flags"])
    return out


def check_root(o, what):
    """The root key: AES-256 token object, private, sensitive, not
    extractable, wrap and unwrap only, labelled p11kms-root:<seconds>, a
    16-byte CKA_ID; the database's one current root. Returns (id, label)."""
    import PyKCS11

    eq((o["class"], o["type"]), (PyKCS11.CKO_SECRET_KEY, PyKCS11.CKK_AES), what + ": root's class")
    check(o["label"].startswith(ROOT_PREFIX) and o["label"][len(ROOT_PREFIX):].isdigit(),
          "%s: root's label %r" % (what, o["label"]))
    eq(len(o["id"]), 16, what + ": root's CKA_ID length")
    eq(o["flags"], (True, True, True, False, False, False, True, True, False, False),
       what + ": root's token, private, sensitive, extractable, encrypt, decrypt, wrap, unwrap, "
       "sign, verify")
    eq(db_rows("SELECT id, cka_id, label, state FROM roots"), [(1, o["id"], o["label"], 1)],
       what + ": the database's roots")
    return o["id"], o["label"]


def check_token(what):
    """In each node's copy of the token: exactly one AES key, the root made by
    p11kmsd init; besides it only that node's audit log's HMAC key (each
    node's audit head is a row of the database)."""
    import PyKCS11

    for node, token in sorted(C.tokens.items()):
        where = "%s, node %s's token" % (what, node.upper())
        objects = token_objects(token)
        aes = [o for o in objects if o["type"] == PyKCS11.CKK_AES]
        eq(len(aes), 1, where + ": AES keys (the root only)")
        eq(check_root(aes[0], where), C.root, where + ": the root is the one p11kmsd init made")
        rest = sorted((o["class"], o["type"], o["label"] if o["app"] is None else "", o["app"])
                      for o in objects if o is not aes[0])
        eq(rest, [(PyKCS11.CKO_SECRET_KEY, PyKCS11.CKK_GENERIC_SECRET, AUDIT_KEY_LABEL, None)],
           where + ": its other objects (its audit key)")


def wraps(ep):
    """C_WrapKey calls a node has made: one for each key version it made in
    the token, stored or not."""
    r = h.get_metrics(ep)
    eq(r.status, 200, "GET /metrics on %s" % name(ep))
    return promtext.value(promtext.parse(r.body.decode()), "p11kms_token_call_seconds_count",
                          function="C_WrapKey")


def node_keys_in_memory(ep):
    """{key id: current version} of the keys a node holds in memory, from its
    /metrics (p11kms_key_version_uses_reserved lists each enabled key held)."""
    r = h.get_metrics(ep)
    eq(r.status, 200, "GET /metrics on %s" % name(ep))
    out = {}
    for (sample, labels), _ in promtext.parse(r.body.decode()).items():
        if sample == "p11kms_key_version_uses_reserved":
            labels = dict(labels)
            out[labels["key_id"]] = int(labels["version"])
    return out


# ---- requests ------------------------------------------------------------------


def b64(data):
    return base64.b64encode(data).decode()


def arn(key_id):
    return ARN_PREFIX + "key/" + key_id


def name(ep):
    return C.names.get(ep, ep)


def call(ep, op, body):
    return h.kms_call(ep, op, body, C.principal)


def expect_ok(r, what):
    if r.status != 200:
        raise AssertionError("%s: HTTP %d %r" % (what, r.status, r.body[:400]))
    return r.json() if r.body else {}


def ok(ep, op, body):
    return expect_ok(call(ep, op, body), "%s on %s" % (op, name(ep)))


def is_error(r, error_type, status):
    """True when r is exactly that error (checked in full); False on 200;
    anything else fails."""
    if r.status == 200:
        return False
    h.check_error_response(r, error_type, status)
    return True


def create_key(ep, description):
    md = ok(ep, "CreateKey", {"Description": description})["KeyMetadata"]
    eq(md["KeyState"], "Enabled", "new key's KeyState")
    return md["KeyId"]


def blob_key(blob):
    return str(uuid.UUID(bytes=bytes(blob[1:17])))


def blob_vid(blob):
    return int.from_bytes(blob[17:21], "big")


def check_gdk(r, what, key_id=None):
    """A GenerateDataKey answer: 200, KeyId the ARN of the blob's key (of
    key_id when given), 32-byte plaintext. Returns (blob, plaintext, key id)."""
    doc = expect_ok(r, what)
    eq(sorted(doc), ["CiphertextBlob", "KeyId", "Plaintext"], what + " members")
    blob = base64.b64decode(doc["CiphertextBlob"])
    plaintext = base64.b64decode(doc["Plaintext"])
    eq(len(plaintext), 32, what + " plaintext length")
    eq(len(blob), 1 + 16 + 4 + 12 + 32 + 16, what + " blob length")
    kid = blob_key(blob)
    if key_id is not None:
        eq(kid, key_id, what + " blob's key")
    eq(doc["KeyId"], arn(kid), what + " KeyId")
    check(blob_vid(blob) != 0, what + ": the blob names a non-zero version id")
    return blob, plaintext, kid


def gdk_request(ep, ref, context):
    return call(ep, "GenerateDataKey", {"KeyId": ref, "NumberOfBytes": 32,
                                        "EncryptionContext": context})


def gdk(ep, ref, context, key_id=None, record=True):
    what = "GenerateDataKey(%s) on %s" % (ref, name(ep))
    blob, plaintext, kid = check_gdk(gdk_request(ep, ref, context), what, key_id)
    if record:
        C.blobs.append((what, blob, plaintext, dict(context), kid))
    return blob, plaintext


def decrypt(ep, blob, context, key_id, plaintext, what=""):
    doc = ok(ep, "Decrypt", {"CiphertextBlob": b64(blob), "EncryptionContext": context})
    eq(doc, {"KeyId": arn(key_id), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
             "Plaintext": b64(plaintext)}, "Decrypt on %s %s" % (name(ep), what))


def describe(ep, ref):
    return ok(ep, "DescribeKey", {"KeyId": ref})["KeyMetadata"]


def list_rotations(ep, key_id):
    out, marker = [], None
    while True:
        body = {"KeyId": key_id, "Limit": 1000}
        if marker:
            body["Marker"] = marker
        doc = ok(ep, "ListKeyRotations", body)
        for e in doc["Rotations"]:
            eq(sorted(e), ["KeyId", "RotationDate", "RotationType"], "rotation entry members")
            eq(e["KeyId"], arn(key_id), "rotation entry KeyId")
            check(e["RotationType"] in ("AUTOMATIC", "ON_DEMAND"), "RotationType %r" % e)
        out += [(e["RotationDate"], e["RotationType"]) for e in doc["Rotations"]]
        if not doc["Truncated"]:
            check("NextMarker" not in doc, "no NextMarker when not truncated")
            return out
        marker = doc["NextMarker"]


def list_aliases(ep):
    doc = ok(ep, "ListAliases", {"Limit": 100})
    eq(doc["Truncated"], False, "ListAliases Truncated")
    return sorted((a["AliasName"], a["TargetKeyId"], a["CreationDate"], a["LastUpdatedDate"])
                  for a in doc["Aliases"])


def within_bound(what, since, probe):
    """Calls probe() until it returns a true value and asserts that this
    happens within BOUND of `since` (a time.monotonic() taken when the change
    was acknowledged). Returns (value, delay)."""
    tries = 0
    while True:
        tries += 1
        value = probe()
        now = time.monotonic()
        if value:
            C.delays.append((what, now - since))
            return value, now - since
        if now - since > BOUND:
            raise AssertionError("%s: not visible within %.1f s (%d tries)" % (what, BOUND, tries))
        time.sleep(POLL_PAUSE)


# ---- 0. one database, a token each --------------------------------------------------


@test
def test_one_database_and_a_token_each():
    eq(db_rows("PRAGMA journal_mode"), [("wal",)], "the database's journal mode")
    check(db_rows("PRAGMA user_version")[0][0] >= 1, "the schema is initialised")
    eq(db_rows("SELECT count(*) FROM keys")[0][0], 0, "keys rows before any CreateKey")
    # The audit key is the first node's; each node keeps its own audit head in the database.
    check_token("with both nodes serving")
    eq(db_rows("SELECT count(DISTINCT node), count(DISTINCT log) FROM audit_heads")[0], (2, 2),
       "audit heads: one per node, each naming that node's log")
    for ep in (C.a.endpoint, C.b.endpoint):
        eq(node_keys_in_memory(ep), {}, "keys %s holds before any CreateKey" % name(ep))


# ---- 1. data keys across nodes ---------------------------------------------------


@test
def test_data_keys_cross_nodes_and_nginx():
    a, b, n = C.a.endpoint, C.b.endpoint, nginx_endpoint()
    key = create_key(a, "multinode: made on A")
    row = key_row(key)
    eq((row["state"], row["rotation_enabled"], row["on_demand"], row["token_resident"]),
       (0, 0, 0, 0), "the new key's row")
    rows = check_version_rows(key, "a key made on A")
    eq(len(rows), 1, "versions rows of the new key")
    eq(rows[0][1], row["current_vid"], "the current version is the first")
    check(key not in node_keys_in_memory(b), "B has not seen the key made on A")

    # B has never seen the key: it reads it from the database at once.
    blob, _, _ = check_gdk(gdk_request(b, key, {"probe": "first-on-b"}),
                           "GenerateDataKey on B of a key made on A, first try", key)
    eq(blob_vid(blob), row["current_vid"], "B's data key is under the key's current version")
    eq(node_keys_in_memory(b).get(key), row["current_vid"], "B now holds the key")

    for maker, reader in ((a, b), (b, a)):
        ctx = {"made-on": name(maker), "read-on": name(reader)}
        blob, pt = gdk(maker, key, ctx, key)
        decrypt(reader, blob, ctx, key, pt)
        decrypt(n, blob, ctx, key, pt, "(through nginx)")
    for i in range(6):
        ctx = {"made-through": "nginx", "i": str(i)}
        blob, pt = gdk(n, key, ctx, key)
        for ep in (a, b, n):
            decrypt(ep, blob, ctx, key, pt)
    # nginx spread those requests over both nodes, and passed Host through
    # unchanged (every signed request answered 200).
    upstreams = [u for _, tried, _ in C.nginx.access() for u in tried]
    eq(sorted(set(upstreams)), sorted(["127.0.0.1:%d" % C.a.port, "127.0.0.1:%d" % C.b.port]),
       "upstreams nginx used")
    eq(len(version_rows(key)), 1, "versions rows after the data keys (no version was made)")


@test
def test_decrypt_of_unseen_key_and_version_at_once():
    a, b = C.a.endpoint, C.b.endpoint
    for attempt in range(3):
        key = create_key(a, "multinode: unseen by B %d" % attempt)
        ctx = {"attempt": str(attempt)}
        blob, pt = gdk(a, key, ctx, key)
        check(key not in node_keys_in_memory(b), "B does not hold a key it never used")
        # First try, no polling: B looks a key up in the database when it has not seen it.
        decrypt(b, blob, ctx, key, pt,
                "of a blob under a key B had not seen (attempt %d)" % attempt)
        eq(node_keys_in_memory(b).get(key), blob_vid(blob), "B holds the key after the Decrypt")

    # A version B has not seen: B holds the key (a data key of its own), A
    # rotates and makes a data key under the new version, B decrypts it at once.
    unseen = 0
    for attempt in range(5):
        b_vid = blob_vid(gdk(b, key, {"b-before-rotation": str(attempt)}, key)[0])
        ok(a, "RotateKeyOnDemand", {"KeyId": key})
        ctx = {"after-rotation": str(attempt)}
        blob, pt = gdk(a, key, ctx, key)
        check(blob_vid(blob) != b_vid, "A's data key after RotateKeyOnDemand uses a new version")
        eq(key_row(key)["current_vid"], blob_vid(blob), "the database's current version")
        held = node_keys_in_memory(b).get(key)
        decrypt(b, blob, ctx, key, pt, "of a blob under a version B had not seen")
        if held == b_vid:
            unseen += 1
            if unseen >= 2:
                break
    check(unseen >= 1, "B had read every new version before the Decrypt: the path of an unseen "
          "version was not exercised")
    h.diag("%d Decrypts on B of a version it held the key without" % unseen)
    rows = check_version_rows(key, "after the rotations on A")
    eq([r[3] for r in rows], [0] + [2] * (len(rows) - 1), "rotation types")
    # A made-up version of that key is refused on B like any blob that does not open.
    made_up = bytearray(blob)
    made_up[17:21] = ((blob_vid(blob) + 1) % 2**32 or 1).to_bytes(4, "big")
    r = call(b, "Decrypt", {"CiphertextBlob": b64(bytes(made_up)), "EncryptionContext": ctx})
    doc = h.check_error_response(r, "InvalidCiphertextException", 400)
    eq(doc["message"], "The ciphertext, its key or its encryption context is not valid",
       "a made-up version's message")


# ---- 2. changes propagate within the bound ----------------------------------------


@test
def test_lifecycle_changes_propagate():
    a, b = C.a.endpoint, C.b.endpoint
    key = create_key(a, "multinode: lifecycle")
    other = create_key(a, "multinode: alias target")

    # RotateKeyOnDemand on A: B's data keys use the new version.
    old = blob_vid(gdk(b, key, {"step": "before-rotation"}, key)[0])
    eq(blob_vid(gdk(a, key, {"step": "before-rotation-a"}, key)[0]), old, "both nodes' version")
    eq(ok(a, "RotateKeyOnDemand", {"KeyId": key}), {"KeyId": arn(key)}, "RotateKeyOnDemand")
    acked = time.monotonic()
    new = blob_vid(gdk(a, key, {"step": "after-rotation-a"}, key)[0])
    check(new != old, "A's data key uses a new version right after its own rotation")
    eq(key_row(key)["current_vid"], new, "the database's current version after the rotation")
    eq([(r[1], r[3]) for r in check_version_rows(key, "after the rotation")],
       [(old, 0), (new, 2)], "versions rows (vid, rotation) after the rotation")

    def b_uses_new():
        vid = blob_vid(gdk(b, key, {"step": "poll-rotation"}, key)[0])
        check(vid in (old, new), "B's version %d is the old or the new one" % vid)
        return vid == new

    _, d = within_bound("rotation on A seen by B's GenerateDataKey", acked, b_uses_new)
    h.diag("rotation on A: B used the new version after %.3f s" % d)
    eq(list_rotations(b, key), [(r[2], "ON_DEMAND") for r in version_rows(key)[1:]],
       "B's ListKeyRotations against the versions rows")

    # DisableKey on A: B refuses with DisabledException.
    expect_ok(call(a, "DisableKey", {"KeyId": key}), "DisableKey on A")
    acked = time.monotonic()
    eq(key_row(key)["state"], 1, "the database's state after DisableKey")
    check(is_error(gdk_request(a, key, {}), "DisabledException", 409), "A refuses at once")

    def b_refuses():
        r = gdk_request(b, key, {"step": "poll-disable"})
        if is_error(r, "DisabledException", 409):
            return True
        check_gdk(r, "GenerateDataKey on B before the disable reaches it", key)
        return False

    _, d = within_bound("DisableKey on A seen by B", acked, b_refuses)
    h.diag("disable on A: B refused after %.3f s" % d)
    eq(describe(b, key)["KeyState"], "Disabled", "B's KeyState")

    # EnableKey on B: A serves again.
    expect_ok(call(b, "EnableKey", {"KeyId": key}), "EnableKey on B")
    acked = time.monotonic()
    eq(key_row(key)["state"], 0, "the database's state after EnableKey")
    gdk(b, key, {"step": "enabled-b"}, key)

    def a_serves():
        r = gdk_request(a, key, {"step": "poll-enable"})
        if is_error(r, "DisabledException", 409):
            return False
        blob, pt, _ = check_gdk(r, "GenerateDataKey on A after EnableKey on B", key)
        C.blobs.append(("poll-enable on A", blob, pt, {"step": "poll-enable"}, key))
        return True

    _, d = within_bound("EnableKey on B seen by A", acked, a_serves)
    h.diag("enable on B: A served after %.3f s" % d)
    eq(describe(a, key)["KeyState"], "Enabled", "A's KeyState")

    # UpdateAlias on B: A resolves the alias to the new target.
    alias = "alias/multinode-switch"
    expect_ok(call(a, "CreateAlias", {"AliasName": alias, "TargetKeyId": key}), "CreateAlias on A")
    eq(db_alias_target(alias), key, "the alias row after CreateAlias")
    # B never resolved the alias: it reads it from the database at once.
    eq(describe(b, alias)["KeyId"], key, "B resolves the alias made on A at once")
    expect_ok(call(b, "UpdateAlias", {"AliasName": alias, "TargetKeyId": other}),
              "UpdateAlias on B")
    acked = time.monotonic()
    eq(db_alias_target(alias), other, "the alias row after UpdateAlias")
    eq(describe(b, alias)["KeyId"], other, "B resolves the alias to the new key at once")
    _, d = within_bound("UpdateAlias on B seen by A", acked,
                        lambda: describe(a, alias)["KeyId"] == other)
    h.diag("alias update on B: A resolved it to the new key after %.3f s" % d)
    gdk(a, alias, {"step": "alias-on-a"}, other)
    mine = [x for x in db_aliases() if x[0] == alias]
    eq([x for x in list_aliases(a) if x[0] == alias], mine, "the alias as A lists it")
    eq([x for x in list_aliases(b) if x[0] == alias], mine, "the alias as B lists it")


# ---- 3. concurrent changes on both nodes --------------------------------------------


# A round lasts at least this long, so that the raced key sees several
# scheduled rotations (one a second) racing on both nodes.
ROUND_SECONDS = 0.35
KINDS = ("rotate", "disable-enable", "alias-update", "alias-create", "alias-update-delete")


class Race:
    key = None        # the raced key: scheduled rotation every "day" (1 s)
    enabled_at = 0    # when its rotation was enabled (epoch seconds, the database's)
    acked = 0         # RotateKeyOnDemand calls answered 200
    x = None          # the raced aliases' two targets
    y = None
    alias = "alias/multinode-race"
    fresh = None      # the alias the last alias-create round made
    missing_alias_message = None  # UpdateAlias's message for a missing alias, %s its name
    kinds = {}
    waits = []        # seconds until both nodes and the database agreed, per round
    agree_tries = []
    findings = []     # every disagreement or lost change seen, with details


R = Race()


def snapshot(ep):
    """What one node says about the raced key and the aliases."""
    md = describe(ep, R.key)
    snap = {"KeyState": md["KeyState"], "aliases": list_aliases(ep),
            "rotations": list_rotations(ep, R.key), "version": None}
    if md["KeyState"] == "Enabled":
        ctx = {"agree-on": name(ep), "t": repr(time.monotonic())}
        r = gdk_request(ep, R.key, ctx)
        if not is_error(r, "DisabledException", 409):
            blob, pt, _ = check_gdk(r, "GenerateDataKey on %s (agreement)" % name(ep), R.key)
            C.blobs.append(("agreement on %s" % name(ep), blob, pt, ctx, R.key))
            snap["version"] = blob_vid(blob)
        else:
            snap["version"] = "Disabled"
    return snap


def db_snapshot():
    """The same, from the database."""
    row = key_row(R.key)
    return {"KeyState": STATE_NAMES[row["state"]], "aliases": db_aliases(),
            "rotations": [(r[2], ROTATION_NAMES[r[3]]) for r in version_rows(R.key)[1:]],
            "version": row["current_vid"] if row["state"] == 0 else None}


def in_parallel(*fns):
    """Runs the callables at the same moment (a barrier) and returns their
    results, re-raising the first exception."""
    results = [None] * len(fns)
    errors = [None] * len(fns)
    barrier = threading.Barrier(len(fns))

    def run(i):
        try:
            barrier.wait(timeout=30)
            results[i] = fns[i]()
        except BaseException as e:  # noqa: B902 - re-raised below
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in errors:
        if e is not None:
            raise e
    return results


def difference(x, y):
    """What differs between two values of a snapshot, compactly: for lists,
    the common length and the entries only one side has."""
    if isinstance(x, list) and isinstance(y, list):
        sx, sy = set(x), set(y)
        return {"first only": sorted(sx - sy), "second only": sorted(sy - sx),
                "lengths": (len(x), len(y))}
    return (x, y)


def agree(what, since):
    """Waits until both nodes report the same snapshot as the database
    holds; returns it."""
    a, b = C.a.endpoint, C.b.endpoint
    last = [None]
    tries = [0]

    def probe():
        tries[0] += 1
        sa, sb = in_parallel(lambda: snapshot(a), lambda: snapshot(b))
        sd = db_snapshot()
        last[0] = (sa, sb, sd)
        return sa if sa == sb == sd else None

    try:
        snap, delay = within_bound(what, since, probe)
    except AssertionError:
        if last[0] is None:
            raise
        sa, sb, sd = last[0]
        diff = {"A/B": {k: difference(sa[k], sb[k]) for k in sa if sa[k] != sb[k]},
                "A/database": {k: difference(sa[k], sd[k]) for k in sa if sa[k] != sd[k]}}
        R.findings.append("%s: disagreement after %.1f s: %r" % (what, BOUND, diff))
        raise AssertionError("%s: the nodes and the database still disagree after %.1f s: %r"
                             % (what, BOUND, diff))
    R.waits.append(delay)
    R.agree_tries.append(tries[0])
    return snap


def check_raced_versions(what):
    """The raced key's versions rows: ordinals 1..N, one ON_DEMAND row per
    acknowledged RotateKeyOnDemand, AUTOMATIC rows at least a period (1 s)
    apart, the first not before a period after rotation was enabled.
    Returns (ON_DEMAND rows, AUTOMATIC rows)."""
    rows = check_version_rows(R.key, what)
    on_demand = [r for r in rows if r[3] == 2]
    automatic = [r for r in rows if r[3] == 1]
    if len(on_demand) != R.acked:
        R.findings.append("%s: %d ON_DEMAND rows, %d RotateKeyOnDemand acknowledged"
                          % (what, len(on_demand), R.acked))
    eq(len(on_demand), R.acked, "%s: ON_DEMAND versions rows == acknowledged RotateKeyOnDemand "
       "calls" % what)
    eq(key_row(R.key)["on_demand"], R.acked, what + ": the key's on-demand count")
    dates = [R.enabled_at] + [r[2] for r in automatic]
    for prev, cur in zip(dates, dates[1:]):
        if cur - prev < 1:
            R.findings.append("%s: AUTOMATIC rotations at %d and %d" % (what, prev, cur))
        check(cur - prev >= 1, "%s: AUTOMATIC rotations %d s apart (%r, %r): one due rotation "
              "was made twice" % (what, cur - prev, prev, cur))
    return on_demand, automatic


def round_ops(i):
    """The two concurrent changes of round i: (kind, op on A, op on B)."""
    kind = KINDS[i % len(KINDS)]
    flip = (i // len(KINDS)) % 2
    if kind == "rotate":
        op = ("RotateKeyOnDemand", {"KeyId": R.key})
        return kind, op, op
    if kind == "disable-enable":
        off, on = ("DisableKey", {"KeyId": R.key}), ("EnableKey", {"KeyId": R.key})
        return (kind, off, on) if not flip else (kind, on, off)
    if kind == "alias-update":
        tx, ty = (R.x, R.y) if not flip else (R.y, R.x)
        return (kind, ("UpdateAlias", {"AliasName": R.alias, "TargetKeyId": tx}),
                ("UpdateAlias", {"AliasName": R.alias, "TargetKeyId": ty}))
    if kind == "alias-create":
        R.fresh = "alias/multinode-race-%d" % i
        return (kind, ("CreateAlias", {"AliasName": R.fresh, "TargetKeyId": R.x}),
                ("CreateAlias", {"AliasName": R.fresh, "TargetKeyId": R.y}))
    update = ("UpdateAlias", {"AliasName": R.fresh, "TargetKeyId": R.key})
    delete = ("DeleteAlias", {"AliasName": R.fresh})
    return (kind, update, delete) if not flip else (kind, delete, update)


def outcome(kind, what):
    R.kinds[kind + " -> " + what] = R.kinds.get(kind + " -> " + what, 0) + 1


def run_round(i):
    a, b = C.a.endpoint, C.b.endpoint
    kind, op_a, op_b = round_ops(i)
    gdk_ref = R.alias if kind == "alias-update" else R.key
    ctx_a = {"round": str(i), "gdk-on": "A"}
    ctx_b = {"round": str(i), "gdk-on": "B"}
    before = len([r for r in version_rows(R.key) if r[3] == 2])
    ra, rb, ga, gb = in_parallel(lambda: call(a, *op_a), lambda: call(b, *op_b),
                                 lambda: gdk_request(a, gdk_ref, ctx_a),
                                 lambda: gdk_request(b, gdk_ref, ctx_b))
    done = time.monotonic()
    what = "round %d (%s)" % (i, kind)
    answers = {op_a[0] + " on A": ra, op_b[0] + " on B": rb}
    if kind == "alias-create":
        # Exactly one CreateAlias succeeds; the other is AlreadyExists.
        won = [n for n, r in answers.items() if r.status == 200]
        if len(won) != 1:
            R.findings.append("%s: %d CreateAlias answered 200" % (what, len(won)))
        eq(len(won), 1, what + ": CreateAlias calls that succeeded")
        lost = [r for r in answers.values() if r.status != 200][0]
        doc = h.check_error_response(lost, "AlreadyExistsException", 409)
        eq(doc["message"], "An alias with the name %s%s already exists" % (ARN_PREFIX, R.fresh),
           what + ": AlreadyExists message")
        winner = R.x if won[0].endswith("on A") else R.y
        eq(db_alias_target(R.fresh), winner, what + ": the alias row names the winner's target")
        outcome(kind, "A won" if winner == R.x else "B won")
    elif kind == "alias-update-delete":
        deleted = [r for n, r in answers.items() if n.startswith("DeleteAlias")][0]
        updated = [r for n, r in answers.items() if n.startswith("UpdateAlias")][0]
        expect_ok(deleted, what + ": DeleteAlias")
        if is_error(updated, "NotFoundException", 404):
            # As an UpdateAlias of an alias that never was is answered, whether
            # the delete came before the update's authorization or after.
            eq(updated.json()["message"], R.missing_alias_message % R.fresh,
               what + ": UpdateAlias after the delete: message")
            outcome(kind, "delete first")
        else:
            outcome(kind, "update first")
        eq(db_alias_target(R.fresh), None, what + ": the alias row is gone")
    else:
        for n, r in answers.items():
            if r.status != 200:
                R.findings.append("%s: %s answered %d %r" % (what, n, r.status, r.body))
            expect_ok(r, "%s: %s" % (what, n))
    for r, ctx, node in ((ga, ctx_a, "A"), (gb, ctx_b, "B")):
        gwhat = "%s: GenerateDataKey on %s" % (what, node)
        if kind == "disable-enable" and is_error(r, "DisabledException", 409):
            continue
        if r.status != 200:
            R.findings.append("%s answered %d %r" % (gwhat, r.status, r.body))
        blob, pt, kid = check_gdk(r, gwhat, None if kind == "alias-update" else R.key)
        if kind == "alias-update":
            check(kid in (R.x, R.y), "%s: the blob is under one of the alias's targets" % gwhat)
        C.blobs.append((gwhat, blob, pt, ctx, kid))
    if kind == "rotate":
        R.acked += 2
        after = len([r for r in version_rows(R.key) if r[3] == 2])
        eq(after - before, 2, what + ": new ON_DEMAND versions rows")
    snap = agree(what, done)
    check_raced_versions(what)
    eq(snap["version"] is not None, snap["KeyState"] == "Enabled", what + ": version when Enabled")
    if kind == "disable-enable":
        state = snap["KeyState"]
        check(state in ("Enabled", "Disabled"), "%s: KeyState %s is one of the two "
              "acknowledged" % (what, state))
        if state == "Disabled":
            # The next rounds need the key in use again.
            expect_ok(call(a if i % 2 else b, "EnableKey", {"KeyId": R.key}), "EnableKey")
            snap = agree(what + " re-enabled", time.monotonic())
            eq(snap["KeyState"], "Enabled", what + ": KeyState after EnableKey")
        outcome(kind, state)
    if kind == "alias-update":
        target = [t for n, t, _, _ in snap["aliases"] if n == R.alias]
        eq(len(target), 1, what + ": the raced alias is listed once")
        check(target[0] in (R.x, R.y), "%s: the alias names one of the two targets" % what)
        outcome(kind, "x" if target[0] == R.x else "y")
    if kind == "alias-create":
        eq([t for n, t, _, _ in snap["aliases"] if n == R.fresh], [db_alias_target(R.fresh)],
           what + ": both nodes list the new alias as the database holds it")
    if kind == "alias-update-delete":
        eq([n for n, _, _, _ in snap["aliases"] if n == R.fresh], [],
           what + ": neither node lists the deleted alias")
        for ep in (a, b):
            r = call(ep, "DescribeKey", {"KeyId": R.fresh})
            check(is_error(r, "NotFoundException", 404),
                  "%s: DescribeKey of the deleted alias on %s" % (what, name(ep)))
    return kind, snap


@test
def test_race_rounds():
    a, b = C.a.endpoint, C.b.endpoint
    R.x = create_key(a, "multinode: raced alias target x")
    R.y = create_key(b, "multinode: raced alias target y")
    expect_ok(call(a, "CreateAlias", {"AliasName": R.alias, "TargetKeyId": R.x}), "CreateAlias")
    R.key = create_key(a, "multinode: raced")
    never = "alias/multinode-never-made"
    r = call(b, "UpdateAlias", {"AliasName": never, "TargetKeyId": R.key})
    R.missing_alias_message = h.check_error_response(r, "NotFoundException", 404)[
        "message"].replace(never, "%s")
    check(R.missing_alias_message.count("%s") == 1, "UpdateAlias of a missing alias: message "
          "%r names it" % R.missing_alias_message)
    t0 = int(time.time())
    expect_ok(call(b, "EnableKeyRotation", {"KeyId": R.key, "RotationPeriodInDays": 1}),
              "EnableKeyRotation on B")
    row = key_row(R.key)
    eq((row["rotation_enabled"], row["rotation_days"], row["rotation_seconds"]), (1, 1, 1),
       "the raced key's rotation settings in the database")
    R.enabled_at = row["next_rotation"] - 1
    check(t0 <= R.enabled_at <= int(time.time()), "next_rotation %d is a period after the "
          "EnableKeyRotation" % row["next_rotation"])
    enabled = time.monotonic()
    for ep in (a, b):
        def status(ep=ep):
            st = ok(ep, "GetKeyRotationStatus", {"KeyId": R.key})
            return (st["KeyRotationEnabled"], st.get("RotationPeriodInDays")) == (True, 1)
        within_bound("rotation enabled on B known to %s" % name(ep), enabled, status)
    agree("raced key set up", enabled)

    started = time.monotonic()
    for i in range(ROUNDS):
        began = time.monotonic()
        run_round(i)
        time.sleep(max(0.0, ROUND_SECONDS - (time.monotonic() - began)))
    elapsed = time.monotonic() - started

    # Both nodes still agree with the database once the rounds are over.
    final = agree("after the rounds", time.monotonic())
    on_demand, automatic = check_raced_versions("after the rounds")
    eq(len([x for x in final["rotations"] if x[1] == "ON_DEMAND"]), R.acked,
       "ON_DEMAND rotations both nodes list")
    check(len(automatic) >= min(ROUNDS // 10, 10), "%d scheduled rotations made; rotation was "
          "due every second for %.0f s" % (len(automatic), elapsed))
    eq(db_aliases(), sorted(x for x in db_aliases() if not x[0].startswith(R.alias + "-")),
       "no alias of the create/delete rounds is left")
    waits = sorted(R.waits)
    versions = len(version_rows(R.key))
    # The raced key rotates no more: the next test counts every version made.
    expect_ok(call(a, "DisableKeyRotation", {"KeyId": R.key}), "DisableKeyRotation")
    h.diag("%d rounds in %.1f s (%.0f ms a round with its agreement poll); the raced key "
           "has %d versions" % (ROUNDS, elapsed, 1000 * elapsed / max(ROUNDS, 1), versions))
    h.diag("agreement after a round: median %.3f s, worst %.3f s, tries up to %d"
           % (waits[len(waits) // 2], waits[-1], max(R.agree_tries)))
    h.diag("versions rows: %d ON_DEMAND (as many acknowledged), %d AUTOMATIC"
           % (len(on_demand), len(automatic)))
    h.diag("outcomes: %r" % sorted(R.kinds.items()))


def at(when):
    """Sleeps until the wall clock reads when (epoch seconds)."""
    while True:
        left = when - time.time()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))


@test
def test_scheduled_rotation_due_on_both_nodes_makes_one_version():
    """DUE_KEYS keys, rotation every day (1 s) enabled within one second s:
    all fall due at s + 1 on both nodes, which work through the due keys at
    every poll; rotation is disabled again before s + 2 (the next due time,
    a period after the rotation). Each key then has exactly one AUTOMATIC
    version, made at s + 1. An attempt whose enables do not fit in one second,
    or whose disables are not all acknowledged before s + 2 (a loaded
    machine), does not count for the keys concerned and is made again with
    half as many keys (MIN_DUE_KEYS at least); MIN_CONCLUSIVE keys in all
    must be checked exactly (a quiet machine checks DUE_KEYS in one attempt).

    That the race happened is seen in the nodes' metrics: versions made in
    the token (C_WrapKey calls, both nodes) beyond the versions rows stored
    are rotations a node prepared and then found made by the other when it
    took the database's write lock. Attempts go on (8 at most) until one
    such race is seen. A node takes up to 100 due keys a poll (DUE_PAGE in
    src/keystore/background.c), which takes it a good part of refresh_ms
    (50 ms); and the node that did the work polls that much later from then
    on, so the two nodes' polls move against each other by about that much
    every attempt, and one lands in the other's work within a few attempts
    (measured: at the first to the fourth)."""
    a, b = C.a.endpoint, C.b.endpoint
    conclusive, attempts, made, settled, total = 0, 0, 0, 0, 0
    count = DUE_KEYS  # halved after an attempt a loaded machine left mostly inconclusive
    while attempts < 10 and (attempts < 2 or conclusive < DUE_KEYS or settled == 0):
        attempts += 1
        before = conclusive
        keys = [create_key((a, b)[i % 2], "multinode: due %d.%d" % (attempts, i))
                for i in range(count)]
        total += count
        wa, wb = wraps(a), wraps(b)
        wraps_before = wa + wb
        versions_before = db_rows("SELECT count(*) FROM versions")[0][0]
        at(int(time.time()) + 1.02)
        s = int(time.time())

        def enable(part, ep):
            for key in part:
                expect_ok(call(ep, "EnableKeyRotation", {"KeyId": key, "RotationPeriodInDays": 1}),
                          "EnableKeyRotation on %s" % name(ep))
            return time.time()

        ends = in_parallel(lambda: enable(keys[0::2], a), lambda: enable(keys[1::2], b))
        if int(max(ends)) != s:
            h.diag("attempt %d: the enables took until %.3f, past second %d; again"
                   % (attempts, max(ends), s))
            for key in keys:
                expect_ok(call(a, "DisableKeyRotation", {"KeyId": key}), "DisableKeyRotation")
            count = max(MIN_DUE_KEYS, count // 2)
            continue
        for key in keys:
            row = key_row(key)
            # Read before s + 1: not due yet. Read later (a loaded machine), a node may
            # already have made the rotation due at s + 1, and the next is at s + 2.
            due = (s + 1,) if time.time() < s + 1 else (s + 1, s + 2)
            eq((row["rotation_enabled"], row["rotation_seconds"]), (1, 1),
               "%s: rotation settings in the database" % key)
            check(row["next_rotation"] in due, "%s: next rotation %d in the database, not in %r"
                  % (key, row["next_rotation"], due))
        at(s + 1.5)  # due at s + 1: each node has polled several times since

        def disable(part, ep):
            acked = {}
            for key in part:
                expect_ok(call(ep, "DisableKeyRotation", {"KeyId": key}),
                          "DisableKeyRotation on %s" % name(ep))
                acked[key] = time.time()
            return acked

        acked = {}
        for part in in_parallel(lambda: disable(keys[0::2], b), lambda: disable(keys[1::2], a)):
            acked.update(part)
        time.sleep(0.5)  # any rotation a node had begun has committed or given up
        # Versions made in the token and not stored: a node found the rotation
        # made by the other when it took the write lock.
        vain = (wraps(a) + wraps(b) - wraps_before
                - (db_rows("SELECT count(*) FROM versions")[0][0] - versions_before))
        h.diag("attempt %d: A made %d versions in the token, B %d; %d stored"
               % (attempts, wraps(a) - wa, wraps(b) - wb,
                  db_rows("SELECT count(*) FROM versions")[0][0] - versions_before))
        check(vain >= 0, "versions stored (%d more) than made in the token" % -vain)
        settled += vain
        for key in keys:
            rows = check_version_rows(key, "due key %s" % key)
            auto = [r for r in rows if r[3] == 1]
            eq(len(rows), 1 + len(auto), "%s: versions rows other than AUTOMATIC" % key)
            made += len(auto)
            if acked[key] >= s + 2:
                # Later due times passed before the disable (a slow, sanitized run): one
                # rotation each was allowed, never more; not conclusive.
                due_times = int(acked[key]) - s
                check(len(auto) <= due_times, "%s: %d AUTOMATIC versions for %d due times"
                      % (key, len(auto), due_times))
                continue
            if not auto:
                continue  # neither node got to it before the disable: not conclusive
            if len(auto) != 1:
                R.findings.append("due key %s: %d AUTOMATIC versions %r" % (key, len(auto), auto))
            eq(len(auto), 1, "%s: AUTOMATIC versions of one due time, on two nodes" % key)
            eq(auto[0][2], s + 1, "%s: the rotation's date" % key)
            row = key_row(key)
            eq((row["rotation_enabled"], row["next_rotation"], row["current_vid"]),
               (0, s + 2, auto[0][1]), "%s: the key's row after its rotation" % key)
            conclusive += 1
        for ep in (a, b):
            key = keys[-1]
            if acked[key] < s + 2:
                eq(list_rotations(ep, key), [(s + 1, "AUTOMATIC")],
                   "ListKeyRotations of %s on %s" % (key, name(ep)))
        if conclusive - before < count // 2:
            count = max(MIN_DUE_KEYS, count // 2)
    h.diag("%d attempts, %d keys due on both nodes in the same second, %d checked exactly, %d "
           "AUTOMATIC versions stored, %d made by the other node too and not stored"
           % (attempts, total, conclusive, made, settled))
    # On a quiet machine every key of an attempt is conclusive (DUE_KEYS in one or two
    # attempts); a loaded or sanitized run gets fewer per attempt and asks for fewer.
    check(conclusive >= MIN_CONCLUSIVE, "keys checked exactly: %d" % conclusive)
    check(settled >= 1, "in %d attempts, never did both nodes make the version of one due "
          "rotation: the race this test is about did not happen" % attempts)


@test
def test_every_blob_decrypts_on_both_nodes():
    a, b = C.a.endpoint, C.b.endpoint
    # Every key in use again, so that every blob can be decrypted.
    for key in {kid for _, _, _, _, kid in C.blobs}:
        if describe(a, key)["KeyState"] != "Enabled":
            expect_ok(call(a, "EnableKey", {"KeyId": key}), "EnableKey")
    since = time.monotonic()
    for key in {kid for _, _, _, _, kid in C.blobs}:
        within_bound("key enabled on both nodes", since,
                     lambda key=key: describe(b, key)["KeyState"] == "Enabled")
    blobs = list(C.blobs)
    failures = []
    lock = threading.Lock()

    def worker(part):
        for what, blob, pt, ctx, kid in part:
            for ep in (a, b):
                try:
                    decrypt(ep, blob, ctx, kid, pt, "of %s" % what)
                except AssertionError as e:
                    with lock:
                        failures.append(str(e))

    parts = [blobs[i::4] for i in range(4)]
    threads = [threading.Thread(target=worker, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    h.diag("%d blobs decrypted on both nodes" % len(blobs))
    if failures:
        R.findings.append("%d Decrypt failures; first: %s" % (len(failures), failures[0]))
    eq(failures, [], "Decrypt failures")
    # Every blob names a version the database holds.
    for what, blob, _, _, kid in blobs:
        check(blob_vid(blob) in {r[1] for r in version_rows(kid)},
              "%s: the blob's version is a versions row of its key" % what)


@test
def test_token_and_database_at_the_end():
    check_token("after the test")
    eq(db_rows("PRAGMA integrity_check"), [("ok",)], "the database's integrity check")
    eq(db_rows("PRAGMA foreign_key_check"), [], "the database's foreign keys")
    eq(db_rows("SELECT count(*) FROM versions WHERE wrapped IS NULL OR root_id IS NULL")[0][0], 0,
       "versions not wrapped under the root (every key here was made in the database)")
    eq(db_rows("SELECT count(*) FROM keys k WHERE NOT EXISTS (SELECT 1 FROM versions v "
               "WHERE v.key_id = k.id AND v.vid = k.current_vid)")[0][0], 0,
       "keys whose current version has no row")
    keys, versions = db_rows("SELECT (SELECT count(*) FROM keys), "
                             "(SELECT count(*) FROM versions)")[0]
    for ep in (C.a.endpoint, C.b.endpoint):
        listed = ok(ep, "ListKeys", {"Limit": 1000})
        eq(len(listed["Keys"]), keys, "keys %s lists" % name(ep))
    h.diag("the database holds %d keys and %d versions; the token one AES key" % (keys, versions))
    for name_, node in (("A", C.a), ("B", C.b)):
        log = node.stderr_text()
        for bad in ("scheduled rotation failed", "could not reserve", "reading the change",
                    "reading the keys due"):
            check(bad not in log, "node %s's log says %r" % (name_, bad))


@test
def test_propagation_report():
    """Not a check of its own: the propagation delays seen, and any finding."""
    worst = max(C.delays, key=lambda x: x[1]) if C.delays else ("none", 0.0)
    h.diag("propagation delays measured: %d, worst %.3f s (%s), bound %.1f s"
           % (len(C.delays), worst[1], worst[0], BOUND))
    for f in R.findings:
        h.diag("finding: " + f)
    check(worst[1] <= BOUND, "worst propagation delay within the bound")


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
