#!/usr/bin/python3
"""Key lifecycle against p11kmsd from a configuration file on a fresh SoftHSM2
token, with short test periods (one "day" is one second): versions and
on-demand rotation, scheduled rotation, usage-bounded rotation (a second
server on its own token), key states, deletion, aliases, ReEncrypt, and a
restart on the same token and database. The database is read directly
(sqlite3, read-only): each version the API shows is one `versions` row
wrapped under the root, ordinals 1..N without gaps, ListKeyRotations is the
rows after the first, a deleted key leaves a tombstone row without versions
or aliases. The token is read through PyKCS11 (in a child process, so each
look sees it afresh): whatever keys and versions were made, it holds only
the root key and the audit log's objects. TAP output."""

import base64
import collections
import itertools
import json
import math
import os
import re
import sqlite3
import subprocess
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

ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
BLOB_OVERHEAD = 1 + 16 + 4 + 12 + 16
# Short periods: one "day" is a second; refresh often.
KNOBS = {
    "day_seconds": "1",
    "rotation_min_days": "1",
    "pending_min_days": "1",
    "refresh_ms": "200",
    "max_on_demand_rotations": "20",
}


class Ctx:
    ws = None
    token = None
    principal = None
    config = None
    server = None
    keys = {}        # name -> key id (the main server's keys)
    blobs = []       # every blob made on the main server: dicts key, blob, ctx, pt
    deleted = set()  # ids of keys deleted on the main server
    current = {}     # name -> the current version id last seen


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.principal = h.new_principal("tester")
    C.token, C.config = h.token_and_config(C.ws, "p11kms-it-life", C.principal, **KNOBS)
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))
    h.diag("p11kmsd serving %s" % C.server.endpoint)


def teardown():
    h.finish(T, C.ws, C.server)


# ---- requests -----------------------------------------------------------------


def arn(key_id):
    return ARN_PREFIX + "key/" + key_id


def b64(data):
    return base64.b64encode(data).decode()


def unb64(text):
    return base64.b64decode(text, validate=True)


def call(op, body=None, server=None):
    """A signed request that must succeed; returns the answer's JSON ({} for
    an empty body, which is what operations without output answer)."""
    server = server or C.server
    r = h.kms_call(server.endpoint, op, body or {}, C.principal)
    if r.status != 200:
        raise AssertionError("%s %r answered %d: %r" % (op, body, r.status, r.body))
    eq((r.header("Content-Type") or "").split(";")[0], h.JSON_TYPE, "%s Content-Type" % op)
    eq(r.header("X-Amzn-ErrorType"), None, "%s X-Amzn-ErrorType" % op)
    return r.json() if r.body else {}


def call_empty(op, body, server=None):
    """An operation whose AWS answer has no members."""
    eq(call(op, body, server), {}, "%s answer" % op)


def fails(op, body, error_type, status, what="", server=None):
    server = server or C.server
    r = h.kms_call(server.endpoint, op, body, C.principal)
    if r.status == 200:
        raise AssertionError("%s %s succeeded (%r); expected %s %d"
                             % (op, what or body, r.body[:200], error_type, status))
    try:
        return h.check_error_response(r, error_type, status)
    except AssertionError as e:
        raise AssertionError("%s %s: %s" % (op, what or body, e))


def create_key(name, description="", server=None):
    md = call("CreateKey", {"Description": description or ("lifecycle " + name)},
              server)["KeyMetadata"]
    check(h.UUID_RE.match(md["KeyId"]), "KeyId %r is a UUID" % md["KeyId"])
    if server is None:
        C.keys[name] = md["KeyId"]
    return md["KeyId"]


def vid_of(blob):
    return blob[17:21]


def gdk(key, ctx=None, ref=None, server=None, record=True):
    """GenerateDataKey; checks the blob's header and that it decrypts.
    Returns (blob, plaintext)."""
    body = {"KeyId": ref or key, "KeySpec": "AES_256"}
    if ctx is not None:
        body["EncryptionContext"] = ctx
    a = call("GenerateDataKey", body, server)
    eq(sorted(a), ["CiphertextBlob", "KeyId", "Plaintext"], "GenerateDataKey members")
    eq(a["KeyId"], arn(key), "GenerateDataKey KeyId")
    blob, pt = unb64(a["CiphertextBlob"]), unb64(a["Plaintext"])
    eq(len(pt), 32, "data key length")
    eq(len(blob), BLOB_OVERHEAD + 32, "blob length")
    eq(blob[0], 1, "blob format")
    eq(blob[1:17], uuid.UUID(key).bytes, "blob key id")
    check(vid_of(blob) != b"\0\0\0\0", "the version id is not 0")
    if record and server is None:
        C.blobs.append({"key": key, "blob": blob, "ctx": ctx, "pt": pt})
    return blob, pt


def decrypt(blob, ctx=None, server=None, key_ref=None):
    body = {"CiphertextBlob": b64(blob)}
    if ctx is not None:
        body["EncryptionContext"] = ctx
    if key_ref is not None:
        body["KeyId"] = key_ref
    a = call("Decrypt", body, server)
    eq(sorted(a), ["EncryptionAlgorithm", "KeyId", "Plaintext"], "Decrypt members")
    eq(a["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT", "Decrypt EncryptionAlgorithm")
    return unb64(a["Plaintext"]), a["KeyId"]


def check_decrypts(blob, ctx, pt, key, server=None, what="blob"):
    got, key_arn = decrypt(blob, ctx, server)
    eq(got, pt, "%s decrypts to its plaintext" % what)
    eq(key_arn, arn(key), "%s: Decrypt KeyId" % what)


def describe(key, server=None):
    return call("DescribeKey", {"KeyId": key}, server)["KeyMetadata"]


def rotations(key, server=None):
    """All of ListKeyRotations, page by page (Limit 100)."""
    out, marker = [], None
    for _ in range(50):
        body = {"KeyId": key}
        if marker:
            body["Marker"] = marker
        page = call("ListKeyRotations", body, server)
        out += page["Rotations"]
        eq("NextMarker" in page, page["Truncated"], "ListKeyRotations: NextMarker iff Truncated")
        if not page["Truncated"]:
            return out
        marker = page["NextMarker"]
    raise AssertionError("ListKeyRotations does not end")


def all_aliases(server=None, **filters):
    out, marker = [], None
    for _ in range(50):
        body = dict(filters)
        if marker:
            body["Marker"] = marker
        page = call("ListAliases", body, server)
        out += page["Aliases"]
        if not page["Truncated"]:
            return out
        marker = page["NextMarker"]
    raise AssertionError("ListAliases does not end")


def alias_names(server=None, **filters):
    return [a["AliasName"] for a in all_aliases(server, **filters)]


def listed_keys(server=None):
    out, marker = [], None
    for _ in range(50):
        page = call("ListKeys", {"Marker": marker} if marker else {}, server)
        out += [k["KeyId"] for k in page["Keys"]]
        if not page["Truncated"]:
            return out
        marker = page["NextMarker"]
    raise AssertionError("ListKeys does not end")


def within(value, lo, hi, what):
    check(lo <= value <= hi, "%s: %r not within [%r, %r]" % (what, value, lo, hi))


def wait_for(fn, timeout, what, interval=0.1):
    """Polls fn until it returns something true; returns it."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("%s: not within %.1f s" % (what, timeout))
        time.sleep(interval)


# ---- the database, read-only through sqlite3 ------------------------------------

ROTATION_NAMES = {1: "AUTOMATIC", 2: "ON_DEMAND"}
STATE_CODES = {"Enabled": 0, "Disabled": 1, "PendingDeletion": 2, "Destroyed": 3}


def db_path(config):
    """harness.write_config names the database <config path>.db."""
    return config + ".db"


def db_query(config, sql, args=()):
    """Rows of one query on the server's database, opened read-only (the
    server keeps writing it: WAL lets a reader in)."""
    db = sqlite3.connect("file:%s?mode=ro" % db_path(config), uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def key_row(key, config=None):
    """The key's `keys` row as a dict (None when there is none)."""
    cols = ("state", "deletion_date", "rotation_enabled", "rotation_days", "rotation_seconds",
            "next_rotation", "current_vid", "on_demand", "token_resident", "description")
    rows = db_query(config or C.config, "SELECT %s FROM keys WHERE id = ?" % ", ".join(cols),
                    (uuid.UUID(key).bytes,))
    eq(len(rows) <= 1, True, "at most one keys row for %s" % key)
    return dict(zip(cols, rows[0])) if rows else None


def version_rows(key, config=None):
    """The key's `versions` rows in ordinal order: dicts vid (bytes, as in a
    blob), n, created, rotation, reserved, bound, root_id, wrapped_len."""
    rows = db_query(config or C.config,
                    "SELECT vid, n, created, rotation, reserved, bound, root_id, length(wrapped) "
                    "FROM versions WHERE key_id = ? ORDER BY n", (uuid.UUID(key).bytes,))
    cols = ("vid", "n", "created", "rotation", "reserved", "bound", "root_id", "wrapped_len")
    out = [dict(zip(cols, r)) for r in rows]
    for v in out:
        v["vid"] = vid_bytes(v["vid"])
    return out


def check_versions(key, vids, rotation_types, config=None, server=None):
    """The key's versions in the database are exactly vids (blob version ids, in
    the order they were made): one row each, ordinals 1..N without gaps, each
    wrapped under root 1 (RFC 5649 wraps AES-256 to 40 bytes); rotation types
    (0 for the first version, then 1 AUTOMATIC / 2 ON_DEMAND); and
    ListKeyRotations answers exactly the rows with n >= 2. Returns the rows."""
    rows = version_rows(key, config)
    eq([v["vid"] for v in rows], list(vids), "the versions rows of %s (vids by ordinal)" % key)
    eq([v["n"] for v in rows], list(range(1, len(vids) + 1)), "ordinals 1..%d" % len(vids))
    for v in rows:
        eq((v["wrapped_len"], v["root_id"]), (40, 1),
           "version %s (n %d): wrapped length and root id" % (v["vid"].hex(), v["n"]))
    eq([v["rotation"] for v in rows], list(rotation_types), "rotation types by ordinal")
    check_rotations_match_rows(key, rows, server)
    return rows


def check_rotations_match_rows(key, rows, server=None):
    want = [{"KeyId": arn(key), "RotationDate": v["created"],
             "RotationType": ROTATION_NAMES[v["rotation"]]} for v in rows if v["n"] >= 2]
    eq(rotations(key, server), want, "ListKeyRotations of %s against its versions rows" % key)


def db_dump(config=None):
    """keys, versions and aliases, every column, in a stable order."""
    config = config or C.config
    return {
        "keys": db_query(config, "SELECT * FROM keys ORDER BY id"),
        "versions": db_query(config, "SELECT * FROM versions ORDER BY key_id, n"),
        "aliases": db_query(config, "SELECT * FROM aliases ORDER BY name"),
    }


# ---- the token, read through PyKCS11 in a child process ------------------------

_INSPECT = r"""
import json, sys
import PyKCS11
from PyKCS11 import PyKCS11Error
module, label, pin_file = sys.argv[1:4]
with open(pin_file) as f:
    pin = f.read().strip()
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slots = [s for s in lib.getSlotList(tokenPresent=True)
         if lib.getTokenInfo(s).label.strip() == label]
if len(slots) != 1:
    sys.exit("%d slots hold token %s" % (len(slots), label))
session = lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION)
session.login(pin)
out = {"secret_keys": [], "data": []}
flags = [("token", PyKCS11.CKA_TOKEN), ("private", PyKCS11.CKA_PRIVATE),
         ("sensitive", PyKCS11.CKA_SENSITIVE), ("extractable", PyKCS11.CKA_EXTRACTABLE),
         ("encrypt", PyKCS11.CKA_ENCRYPT), ("decrypt", PyKCS11.CKA_DECRYPT),
         ("wrap", PyKCS11.CKA_WRAP), ("unwrap", PyKCS11.CKA_UNWRAP),
         ("sign", PyKCS11.CKA_SIGN), ("verify", PyKCS11.CKA_VERIFY)]
try:
    for k in session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]):
        try:
            cid = bytes(session.getAttributeValue(k, [PyKCS11.CKA_ID], allAsBinary=True)[0])
            lab, kt = session.getAttributeValue(k, [PyKCS11.CKA_LABEL, PyKCS11.CKA_KEY_TYPE])
            vals = session.getAttributeValue(k, [a for _, a in flags])
        except PyKCS11Error:
            continue  # removed by p11kmsd between the find and the read
        entry = {"id": cid.hex(), "label": lab, "key_type": PyKCS11.CKK[kt]}
        entry.update({n: bool(v) for (n, _), v in zip(flags, vals)})
        out["secret_keys"].append(entry)
    for d in session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA)]):
        try:
            lab, app = session.getAttributeValue(d, [PyKCS11.CKA_LABEL, PyKCS11.CKA_APPLICATION])
        except PyKCS11Error:
            continue  # an audit checkpoint replaced between the find and the read
        out["data"].append({"label": lab, "application": app})
finally:
    session.logout()
    session.closeSession()
print(json.dumps(out))
"""


def inspect_token(token):
    env = dict(os.environ, SOFTHSM2_CONF=token.conf)
    r = subprocess.run(["/usr/bin/python3", "-c", _INSPECT, h.SOFTHSM_MODULE, token.label,
                        token.pin_file], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    if r.returncode != 0:
        raise AssertionError("reading the token failed (%d): %s"
                             % (r.returncode, r.stderr.decode("utf-8", "replace")))
    return json.loads(r.stdout)


def check_token(token, config):
    """Whatever keys and versions the server made, the token holds one AES key,
    the root the database names (private, sensitive, not extractable, wrap and
    unwrap only), the audit log's HMAC key, and CKO_DATA objects of the audit
    log only: no key versions, no metadata records."""
    view = inspect_token(token)
    roots = db_query(config, "SELECT id, hex(cka_id), label, state FROM roots")
    eq(len(roots), 1, "roots rows: %r" % roots)
    rid, cka_id, label, state = roots[0]
    eq((rid, state), (1, 1), "the root's id and state")
    check(re.match(r"^p11kms-root:\d+$", label), "root label %r" % label)
    eq(len(cka_id), 32, "the root's CKA_ID is 16 bytes")
    aes = [k for k in view["secret_keys"] if k["key_type"] == "CKK_AES"]
    others = [k for k in view["secret_keys"] if k["key_type"] != "CKK_AES"]
    eq([(k["id"], k["label"]) for k in aes], [(cka_id.lower(), label)],
       "the token's AES keys: only the root")
    root = aes[0]
    eq({n: root[n] for n in ("token", "private", "sensitive", "extractable", "encrypt",
                             "decrypt", "wrap", "unwrap", "sign", "verify")},
       {"token": True, "private": True, "sensitive": True, "extractable": False,
        "encrypt": False, "decrypt": False, "wrap": True, "unwrap": True, "sign": False,
        "verify": False}, "the root's attributes")
    eq([(k["label"], k["key_type"]) for k in others],
       [("p11kms-audit-key", "CKK_GENERIC_SECRET")], "the other secret keys: the audit key")
    eq(sorted({d["application"] for d in view["data"]}), ["p11kms-audit"] if view["data"] else [],
       "the CKO_DATA objects are the audit log's checkpoints")
    return view


def vid_bytes(vid_int):
    return vid_int.to_bytes(4, "big")


# ---- 1. versions and on-demand rotation ----------------------------------------


@test
def test_versions_and_on_demand_rotation():
    key = create_key("rot")
    t0 = math.floor(time.time())
    blob_a, pt_a = gdk(key)
    a = call("RotateKeyOnDemand", {"KeyId": key})
    eq(a, {"KeyId": arn(key)}, "RotateKeyOnDemand answer")
    blob_b, pt_b = gdk(key)
    eq(call("RotateKeyOnDemand", {"KeyId": arn(key)}), {"KeyId": arn(key)},
       "RotateKeyOnDemand by ARN")
    blob_c, pt_c = gdk(key)
    t1 = math.ceil(time.time())
    vids = [vid_of(b) for b in (blob_a, blob_b, blob_c)]
    eq(len(set(vids)), 3, "three distinct version ids %r" % vids)
    for what, blob, pt in (("A", blob_a, pt_a), ("B", blob_b, pt_b), ("C", blob_c, pt_c)):
        check_decrypts(blob, None, pt, key, what="blob " + what)
        # and naming the key
        eq(decrypt(blob, key_ref=key)[0], pt, "blob %s with KeyId" % what)
    for _ in range(3):
        eq(vid_of(gdk(key)[0]), vids[2], "a new data key's version id is the current one")
    e = call("Encrypt", {"KeyId": key, "Plaintext": b64(b"hello")})
    eq(vid_of(unb64(e["CiphertextBlob"])), vids[2], "Encrypt uses the current version")

    whole = call("ListKeyRotations", {"KeyId": key})
    eq(sorted(whole), ["Rotations", "Truncated"], "ListKeyRotations members")
    eq(whole["Truncated"], False, "Truncated")
    rots = whole["Rotations"]
    eq(len(rots), 2, "two rotations: %r" % rots)
    for r in rots:
        eq(sorted(r), ["KeyId", "RotationDate", "RotationType"], "rotation members")
        eq(r["KeyId"], arn(key), "rotation KeyId")
        eq(r["RotationType"], "ON_DEMAND", "RotationType")
        within(r["RotationDate"], t0, t1, "RotationDate")
    check(rots[0]["RotationDate"] <= rots[1]["RotationDate"], "rotation dates do not decrease")

    p1 = call("ListKeyRotations", {"KeyId": key, "Limit": 1})
    eq((len(p1["Rotations"]), p1["Truncated"]), (1, True), "Limit=1, first page")
    check(isinstance(p1.get("NextMarker"), str) and p1["NextMarker"], "first page NextMarker")
    p2 = call("ListKeyRotations", {"KeyId": key, "Limit": 1, "Marker": p1["NextMarker"]})
    eq((len(p2["Rotations"]), p2["Truncated"]), (1, False), "Limit=1, second page")
    check("NextMarker" not in p2, "the last page has no NextMarker")
    eq(p1["Rotations"] + p2["Rotations"], rots, "the pages make up the whole list")
    p = call("ListKeyRotations", {"KeyId": key, "Limit": 2})
    eq((p["Rotations"], p["Truncated"]), (rots, False), "Limit=2")
    for bad in ("not-a-marker", "0", "-1"):
        fails("ListKeyRotations", {"KeyId": key, "Marker": bad}, "InvalidMarkerException", 400,
              "Marker %r" % bad)
    fails("ListKeyRotations", {"KeyId": key, "Marker": ""}, "ValidationException", 400,
          "an empty Marker")
    fails("ListKeyRotations", {"KeyId": key, "Limit": 0}, "ValidationException", 400, "Limit 0")
    fails("ListKeyRotations", {"KeyId": str(uuid.uuid4())}, "NotFoundException", 404,
          "a key that does not exist")
    fails("RotateKeyOnDemand", {"KeyId": str(uuid.uuid4())}, "NotFoundException", 404,
          "a key that does not exist")

    # the database holds exactly the three versions, wrapped; the token none of them
    check_versions(key, vids, [0, 2, 2])
    row = key_row(key)
    eq((row["state"], row["current_vid"], row["on_demand"], row["token_resident"]),
       (0, int.from_bytes(vids[2], "big"), 2, 0), "the keys row: Enabled, current, 2 on demand")
    check_token(C.token, C.config)


@test
def test_on_demand_rotation_limit():
    """max_on_demand_rotations = 20: the 21st is refused."""
    key = create_key("limit")
    vids = [vid_of(gdk(key)[0])]
    for i in range(20):
        eq(call("RotateKeyOnDemand", {"KeyId": key}), {"KeyId": arn(key)}, "rotation %d" % (i + 1))
        vids.append(vid_of(gdk(key)[0]))
    eq(len(set(vids)), 21, "21 distinct versions")
    fails("RotateKeyOnDemand", {"KeyId": key}, "LimitExceededException", 400, "the 21st rotation")
    check_versions(key, vids, [0] + [2] * 20)
    eq(key_row(key)["on_demand"], 20, "the keys row counts 20 on-demand rotations")
    rots = rotations(key)
    eq(len(rots), 20, "ListKeyRotations entries")
    eq({r["RotationType"] for r in rots}, {"ON_DEMAND"}, "rotation types")
    # pages of 7: 7, 7, 6, in the same order
    pages, marker = [], None
    while True:
        body = {"KeyId": key, "Limit": 7}
        if marker:
            body["Marker"] = marker
        page = call("ListKeyRotations", body)
        pages.append(page["Rotations"])
        if not page["Truncated"]:
            break
        marker = page["NextMarker"]
    eq([len(p) for p in pages], [7, 7, 6], "page sizes")
    eq(sum(pages, []), rots, "pages in order")
    gdk(key)


# ---- 2. scheduled rotation ------------------------------------------------------


@test
def test_scheduled_rotation():
    key = create_key("sched")
    blob0, _ = gdk(key)
    vid0 = vid_of(blob0)
    for days in (0, 2561, -1):
        fails("EnableKeyRotation", {"KeyId": key, "RotationPeriodInDays": days},
              "ValidationException", 400, "RotationPeriodInDays %d" % days)
    eq(call("GetKeyRotationStatus", {"KeyId": key}),
       {"KeyRotationEnabled": False, "KeyId": arn(key)}, "status before")

    before = math.floor(time.time())
    call_empty("EnableKeyRotation", {"KeyId": key, "RotationPeriodInDays": 2})
    after = math.ceil(time.time())
    st = call("GetKeyRotationStatus", {"KeyId": key})
    eq(sorted(st), ["KeyId", "KeyRotationEnabled", "NextRotationDate", "RotationPeriodInDays"],
       "GetKeyRotationStatus members")
    eq((st["KeyRotationEnabled"], st["KeyId"], st["RotationPeriodInDays"]), (True, arn(key), 2),
       "status")
    within(st["NextRotationDate"], before + 2, after + 2, "NextRotationDate (now + 2 s)")
    first_due = st["NextRotationDate"]

    # within ~6 s a new version appears without any request for one
    rots = wait_for(lambda: rotations(key), 6.0, "a scheduled rotation", 0.2)
    eq(rots[0]["RotationType"], "AUTOMATIC", "RotationType")
    eq(rots[0]["KeyId"], arn(key), "KeyId")
    within(rots[0]["RotationDate"], first_due, math.ceil(time.time()), "RotationDate")
    blob1, _ = gdk(key)
    check(vid_of(blob1) != vid0, "a data key made after the rotation carries a new version id")
    # NextRotationDate moved on to the last rotation + 2 s (read until stable)
    for _ in range(20):
        r1 = rotations(key)
        st = call("GetKeyRotationStatus", {"KeyId": key})
        if rotations(key) == r1:
            eq(st["NextRotationDate"], r1[-1]["RotationDate"] + 2, "NextRotationDate after")
            break
    else:
        raise AssertionError("the rotation list never held still")

    call_empty("DisableKeyRotation", {"KeyId": key})
    eq(call("GetKeyRotationStatus", {"KeyId": key}),
       {"KeyRotationEnabled": False, "KeyId": arn(key)}, "status after DisableKeyRotation")
    settled = rotations(key)
    check(all(r["RotationType"] == "AUTOMATIC" for r in settled), "only AUTOMATIC rotations")
    current = vid_of(gdk(key)[0])
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        time.sleep(0.5)
        eq(rotations(key), settled, "no rotation after DisableKeyRotation")
    eq(vid_of(gdk(key)[0]), current, "the current version is unchanged")
    rows = version_rows(key)
    check_versions(key, [v["vid"] for v in rows], [0] + [1] * len(settled))
    eq((rows[0]["vid"], rows[-1]["vid"]), (vid0, current), "the first and the current version")
    row = key_row(key)
    eq((row["rotation_enabled"], row["current_vid"]), (0, int.from_bytes(current, "big")),
       "the keys row after DisableKeyRotation")
    for b in C.blobs:
        if b["key"] == key:
            check_decrypts(b["blob"], b["ctx"], b["pt"], key, what="a blob of the rotated key")

    # a long period (the default, 365 "days") on another key, kept for the restart test
    key2 = create_key("sched365")
    before = math.floor(time.time())
    call_empty("EnableKeyRotation", {"KeyId": key2})
    after = math.ceil(time.time())
    st = call("GetKeyRotationStatus", {"KeyId": key2})
    eq((st["KeyRotationEnabled"], st["RotationPeriodInDays"]), (True, 365), "default period")
    within(st["NextRotationDate"], before + 365, after + 365, "NextRotationDate (now + 365 s)")
    # enabling again with the same period does not move the date
    call_empty("EnableKeyRotation", {"KeyId": key2, "RotationPeriodInDays": 365})
    eq(call("GetKeyRotationStatus", {"KeyId": key2}), st, "status after the same period again")
    row = key_row(key2)
    eq((row["rotation_enabled"], row["rotation_days"], row["rotation_seconds"],
        row["next_rotation"]), (1, 365, 365, st["NextRotationDate"]), "the keys row of key 2")
    gdk(key2)


# ---- 3. usage-bounded rotation (own server, own token) -------------------------


@test
def test_usage_bounded_rotation():
    ws = h.Workspace()
    server = None
    try:
        token, config = h.token_and_config(ws, "p11kms-it-usage", C.principal, usage_bound="5",
                                           usage_block="2", **KNOBS)
        server = h.start_config_server(config, token, ws.sub("p11kmsd.log"))
        try:
            _usage_checks(server, token, config)
        except BaseException:
            h.diag("usage server's log:\n" + server.stderr_text())
            raise
    finally:
        try:
            if server:
                server.stop()
        finally:
            ws.close()


def _usage_checks(server, token, config):
    key = create_key("usage", server=server)
    made = [gdk(key, ctx={"n": str(i)}, server=server) for i in range(6)]
    vids = [vid_of(b) for b, _ in made]
    eq(len(set(vids[:5])), 1, "the first five data keys share one version id")
    check(vids[5] != vids[0], "the sixth carries a new version id")
    rots = rotations(key, server)
    eq([r["RotationType"] for r in rots], ["AUTOMATIC"], "one AUTOMATIC rotation")
    eq(rots[0]["KeyId"], arn(key), "rotation KeyId")
    for i, (blob, pt) in enumerate(made):
        check_decrypts(blob, {"n": str(i)}, pt, key, server, "data key %d" % i)

    rows = check_versions(key, [vids[0], vids[5]], [0, 1], config, server)
    eq([v["bound"] for v in rows], [5, 5], "bound")
    eq({v["vid"]: v["reserved"] for v in rows}, {vids[0]: 5, vids[5]: 2},
       "reservations: the first version used up, one block of the next")
    eq(vid_bytes(key_row(key, config)["current_vid"]), vids[5], "current version")

    # 14 data keys on a fresh key, one at a time: 5, 5, 4 per version, in order
    key2 = create_key("usage2", server=server)
    seq = [vid_of(gdk(key2, server=server)[0]) for _ in range(14)]
    runs = [len(list(g)) for _, g in itertools.groupby(seq)]
    eq(runs, [5, 5, 4], "uses per version, in order")
    eq(len(set(seq)), 3, "three versions")
    eq(len(rotations(key2, server)), 2, "two rotations")
    check_versions(key2, [v for v, _ in itertools.groupby(seq)], [0, 1, 1], config, server)

    # 40 data keys from 8 threads at once, on five keys one after the other
    for r in range(5):
        _concurrent_uses(server, config, "usage3-%d" % r)

    # a disabled key refuses to wrap
    call_empty("DisableKey", {"KeyId": key}, server)
    fails("GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"}, "DisabledException", 409,
          server=server)
    fails("Encrypt", {"KeyId": key, "Plaintext": b64(b"x")}, "DisabledException", 409,
          server=server)
    call_empty("EnableKey", {"KeyId": key}, server)
    blob, _ = gdk(key, server=server)
    eq(vid_of(blob), vids[5], "after EnableKey the current version's reserved block is used")
    check_token(token, config)


def _concurrent_uses(server, config, name):
    """40 data keys from 8 threads at once: no version wraps more than 5 times."""
    key = create_key(name, server=server)
    results, errors = [], []
    lock = threading.Lock()

    def worker(n):
        try:
            for i in range(n):
                blob, pt = gdk(key, ctx={"i": str(i)}, server=server)
                with lock:
                    results.append((blob, pt, i))
        except BaseException as e:  # noqa: B902 - reported below
            with lock:
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(5,)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    eq(errors, [], "errors from concurrent GenerateDataKey")
    eq(len(results), 40, "data keys made")
    uses = collections.Counter(vid_of(b) for b, _, _ in results)
    check(max(uses.values()) <= 5, "a version wrapped more than 5 times: %r" % uses)
    rows = version_rows(key, config)
    top = {v["vid"]: v for v in rows}
    for vid, n in uses.items():
        check(vid in top, "version %s has a versions row" % vid.hex())
        check(n <= top[vid]["reserved"] <= top[vid]["bound"] == 5,
              "version %s: %d uses, %d reserved, bound %d"
              % (vid.hex(), n, top[vid]["reserved"], top[vid]["bound"]))
    for blob, pt, i in results:
        check_decrypts(blob, {"i": str(i)}, pt, key, server, "concurrent data key")
    # One node serialises a key's uses: nothing reserved is thrown away and no rotation is
    # made for nothing, so 40 uses are exactly 8 versions of 5.
    eq(sorted(uses.values()), [5] * 8, "uses per version")
    eq(sorted(top), sorted(uses), "the key's versions rows")
    check_versions(key, [v["vid"] for v in rows], [0] + [1] * 7, config, server)
    rots = rotations(key, server)
    eq([r["RotationType"] for r in rots], ["AUTOMATIC"] * 7, "seven AUTOMATIC rotations")


# ---- 4. states ----------------------------------------------------------------


@test
def test_states():
    key = create_key("states")
    other = create_key("states-other")
    blob, pt = gdk(key, ctx={"s": "1"})
    enc = unb64(call("Encrypt", {"KeyId": key, "Plaintext": b64(b"state secret")})["CiphertextBlob"])
    C.blobs.append({"key": key, "blob": enc, "ctx": None, "pt": b"state secret"})

    # State and rotation operations take a key id or key ARN, not an alias (as AWS).
    call_empty("CreateAlias", {"AliasName": "alias/lc-states", "TargetKeyId": key})
    for op in ("DisableKey", "EnableKey", "ScheduleKeyDeletion", "CancelKeyDeletion",
               "EnableKeyRotation", "DisableKeyRotation", "GetKeyRotationStatus",
               "RotateKeyOnDemand", "ListKeyRotations"):
        for ref in ("alias/lc-states", ARN_PREFIX + "alias/lc-states"):
            fails(op, {"KeyId": ref}, "NotFoundException", 404, "%s by alias %s" % (op, ref))
    eq(describe(key)["KeyState"], "Enabled", "refused calls by alias changed nothing")

    call_empty("DisableKey", {"KeyId": key})
    md = describe(key)
    eq((md["KeyState"], md["Enabled"]), ("Disabled", False), "DescribeKey after DisableKey")
    eq(key_row(key)["state"], STATE_CODES["Disabled"], "the keys row after DisableKey")
    check("DeletionDate" not in md, "no DeletionDate")
    call_empty("DisableKey", {"KeyId": key})  # again: no change, no error
    dis = ("DisabledException", 409)
    fails("GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"}, *dis)
    fails("GenerateDataKeyWithoutPlaintext", {"KeyId": key, "KeySpec": "AES_256"}, *dis)
    fails("Encrypt", {"KeyId": key, "Plaintext": b64(b"x")}, *dis)
    fails("Decrypt", {"CiphertextBlob": b64(blob), "EncryptionContext": {"s": "1"}}, *dis)
    fails("ReEncrypt", {"CiphertextBlob": b64(blob), "SourceEncryptionContext": {"s": "1"},
                        "DestinationKeyId": other}, *dis, "ReEncrypt from the disabled key")
    fails("EnableKeyRotation", {"KeyId": key}, *dis)
    fails("RotateKeyOnDemand", {"KeyId": key}, *dis)
    eq(call("GetKeyRotationStatus", {"KeyId": key}),
       {"KeyRotationEnabled": False, "KeyId": arn(key)}, "GetKeyRotationStatus of a disabled key")

    call_empty("EnableKey", {"KeyId": key})
    md = describe(key)
    eq((md["KeyState"], md["Enabled"]), ("Enabled", True), "DescribeKey after EnableKey")
    check_decrypts(blob, {"s": "1"}, pt, key, what="old blob after EnableKey")
    gdk(key)

    # deletion window bounds: pending_min_days 1, pending_max_days 30
    for days in (0, 31, -3):
        fails("ScheduleKeyDeletion", {"KeyId": key, "PendingWindowInDays": days},
              "ValidationException", 400, "PendingWindowInDays %d" % days)
    eq(describe(key)["KeyState"], "Enabled", "still Enabled")

    # Everything up to CancelKeyDeletion happens within the 3 s window.
    before = math.floor(time.time())
    a = call("ScheduleKeyDeletion", {"KeyId": key, "PendingWindowInDays": 3})
    scheduled = time.monotonic()
    after = math.ceil(time.time())
    eq(sorted(a), ["DeletionDate", "KeyId", "KeyState", "PendingWindowInDays"],
       "ScheduleKeyDeletion members")
    eq((a["KeyId"], a["KeyState"], a["PendingWindowInDays"]), (arn(key), "PendingDeletion", 3),
       "ScheduleKeyDeletion answer")
    within(a["DeletionDate"], before + 3, after + 3, "DeletionDate (now + 3 s)")
    md = describe(key)
    eq((md["KeyState"], md["Enabled"], md.get("DeletionDate")),
       ("PendingDeletion", False, a["DeletionDate"]), "DescribeKey while pending")
    row = key_row(key)
    eq((row["state"], row["deletion_date"]), (STATE_CODES["PendingDeletion"], a["DeletionDate"]),
       "the keys row while pending")
    inv = ("KMSInvalidStateException", 409)
    fails("GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"}, *inv)
    fails("Encrypt", {"KeyId": key, "Plaintext": b64(b"x")}, *inv)
    fails("Decrypt", {"CiphertextBlob": b64(blob), "EncryptionContext": {"s": "1"}}, *inv)
    fails("EnableKey", {"KeyId": key}, *inv)
    fails("DisableKey", {"KeyId": key}, *inv)
    fails("ScheduleKeyDeletion", {"KeyId": key, "PendingWindowInDays": 7}, *inv, "again")
    fails("RotateKeyOnDemand", {"KeyId": key}, *inv)
    fails("EnableKeyRotation", {"KeyId": key}, *inv)
    eq(call("CancelKeyDeletion", {"KeyId": key}), {"KeyId": arn(key)}, "CancelKeyDeletion answer")
    check(time.monotonic() - scheduled < 3.0,
          "the pending-state checks took %.1f s, longer than the window"
          % (time.monotonic() - scheduled))
    md = describe(key)
    eq((md["KeyState"], md["Enabled"]), ("Disabled", False), "after CancelKeyDeletion")
    eq(key_row(key)["state"], STATE_CODES["Disabled"], "the keys row after CancelKeyDeletion")
    check("DeletionDate" not in md, "no DeletionDate after CancelKeyDeletion")
    fails("GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"}, *dis, "after the cancel")
    fails("CancelKeyDeletion", {"KeyId": key}, *inv, "a key not pending deletion")
    call_empty("EnableKey", {"KeyId": key})
    check_decrypts(blob, {"s": "1"}, pt, key, what="old blob after the cancel")
    check_decrypts(enc, None, b"state secret", key, what="old Encrypt blob after the cancel")
    gdk(key)
    # past the original deletion date the key is still there
    time.sleep(max(0.0, a["DeletionDate"] + 1.3 - time.time()))
    eq(describe(key)["KeyState"], "Enabled", "past the cancelled deletion date")
    fails("CancelKeyDeletion", {"KeyId": key}, *inv, "an Enabled key")

    # without PendingWindowInDays: pending_max_days (30)
    before = math.floor(time.time())
    a = call("ScheduleKeyDeletion", {"KeyId": other})
    after = math.ceil(time.time())
    eq((a["KeyState"], a["PendingWindowInDays"]), ("PendingDeletion", 30), "default window")
    within(a["DeletionDate"], before + 30, after + 30, "DeletionDate (now + 30 s)")
    eq(call("CancelKeyDeletion", {"KeyId": arn(other)}), {"KeyId": arn(other)}, "cancel by ARN")
    # left Disabled, for the restart test
    eq(describe(other)["KeyState"], "Disabled", "the other key")


# ---- 5. deletion -----------------------------------------------------------------


@test
def test_deletion():
    key = create_key("doomed")
    keep = create_key("survivor")
    call_empty("CreateAlias", {"AliasName": "alias/lc-doomed", "TargetKeyId": key})
    blob1, pt1 = gdk(key, ctx={"d": "1"}, record=False)
    vids = [vid_of(blob1)]
    for _ in range(15):
        call("RotateKeyOnDemand", {"KeyId": key})
        vids.append(vid_of(gdk(key)[0]))
    blob2, pt2 = gdk(key, ctx={"d": "2"}, record=False)
    check(vid_of(blob1) != vid_of(blob2), "two versions")
    for b in ({"key": key, "blob": blob1, "ctx": {"d": "1"}, "pt": pt1},
              {"key": key, "blob": blob2, "ctx": {"d": "2"}, "pt": pt2}):
        C.blobs.append(b)
    check_versions(key, vids, [0] + [2] * 15)
    keep_rows = version_rows(keep)
    eq(len(keep_rows), 1, "the other key's versions rows")
    eq(sorted(r[0] for r in db_query(C.config, "SELECT name FROM aliases WHERE target = ?",
                                     (uuid.UUID(key).bytes,))),
       ["alias/lc-doomed"], "the key's aliases rows before the deletion")

    before = math.floor(time.time())
    a = call("ScheduleKeyDeletion", {"KeyId": key, "PendingWindowInDays": 1})
    eq((a["KeyId"], a["KeyState"], a["PendingWindowInDays"]), (arn(key), "PendingDeletion", 1),
       "ScheduleKeyDeletion answer")
    within(a["DeletionDate"], before + 1, math.ceil(time.time()) + 1, "DeletionDate")
    C.deleted.add(key)

    def gone():
        r = h.kms_call(C.server.endpoint, "DescribeKey", {"KeyId": key}, C.principal)
        return r.status == 404

    wait_for(gone, 5.0, "the key is deleted", 0.1)
    doc = fails("DescribeKey", {"KeyId": key}, "NotFoundException", 404)
    eq(doc["message"], "Key '%s' does not exist" % arn(key), "NotFound message")
    fails("DescribeKey", {"KeyId": arn(key)}, "NotFoundException", 404)
    fails("DescribeKey", {"KeyId": "alias/lc-doomed"}, "NotFoundException", 404, "by its alias")
    for blob, ctx in ((blob1, {"d": "1"}), (blob2, {"d": "2"})):
        fails("Decrypt", {"CiphertextBlob": b64(blob), "EncryptionContext": ctx},
              "NotFoundException", 404, "a blob of the deleted key")
    fails("ReEncrypt", {"CiphertextBlob": b64(blob1), "SourceEncryptionContext": {"d": "1"},
                        "DestinationKeyId": keep}, "NotFoundException", 404, "ReEncrypt")
    for op in ("GenerateDataKey", "ScheduleKeyDeletion", "CancelKeyDeletion", "EnableKey",
               "DisableKey", "ListKeyRotations", "GetKeyRotationStatus", "RotateKeyOnDemand"):
        body = {"KeyId": key}
        if op == "GenerateDataKey":
            body["KeySpec"] = "AES_256"
        fails(op, body, "NotFoundException", 404, "%s of the deleted key" % op)
    check(key not in listed_keys(), "ListKeys no longer lists the key")
    check(keep in listed_keys(), "ListKeys lists the other key")
    check("alias/lc-doomed" not in alias_names(), "ListAliases no longer lists its alias")
    fails("CreateAlias", {"AliasName": "alias/lc-x", "TargetKeyId": key}, "NotFoundException", 404,
          "an alias for the deleted key")

    # its versions rows (the wrapped key material) and aliases are gone; its keys row
    # remains as a tombstone (state 3), so its blobs answer NotFound, not InvalidCiphertext
    eq(version_rows(key), [], "the deleted key's versions rows")
    eq(db_query(C.config, "SELECT name FROM aliases WHERE target = ?", (uuid.UUID(key).bytes,)),
       [], "the deleted key's aliases rows")
    eq(key_row(key)["state"], STATE_CODES["Destroyed"],
       "the deleted key's keys row is a tombstone (state 3)")
    eq(version_rows(keep), keep_rows, "the other key's versions rows are untouched")
    check_token(C.token, C.config)

    # a blob naming a key that never existed
    fake = bytearray(blob1)
    fake[1:17] = uuid.uuid4().bytes
    fails("Decrypt", {"CiphertextBlob": b64(bytes(fake)), "EncryptionContext": {"d": "1"}},
          "InvalidCiphertextException", 400, "a blob of a key that never existed")
    fake = bytearray(os.urandom(len(blob1)))
    fake[0] = 1
    fails("Decrypt", {"CiphertextBlob": b64(bytes(fake))}, "InvalidCiphertextException", 400,
          "random bytes with a valid format byte")
    # a version that never existed, of a key that does
    b, _ = gdk(keep, record=False)
    fake = bytearray(b)
    fake[17:21] = (int.from_bytes(b[17:21], "big") ^ 0x5A5A5A5A).to_bytes(4, "big")
    fails("Decrypt", {"CiphertextBlob": b64(bytes(fake))}, "InvalidCiphertextException", 400,
          "a version that never existed")

    # The key's alias went with it (as in AWS): it cannot be updated or deleted, and its
    # name is free again.
    fails("UpdateAlias", {"AliasName": "alias/lc-doomed", "TargetKeyId": keep},
          "NotFoundException", 404, "UpdateAlias of the deleted key's alias")
    fails("DeleteAlias", {"AliasName": "alias/lc-doomed"}, "NotFoundException", 404,
          "DeleteAlias of the deleted key's alias")
    check("alias/lc-doomed" not in alias_names(), "the refused UpdateAlias revived nothing")
    call_empty("CreateAlias", {"AliasName": "alias/lc-doomed", "TargetKeyId": keep})
    eq(describe("alias/lc-doomed")["KeyId"], keep, "the reused alias names the other key")
    eq(alias_names(KeyId=keep), ["alias/lc-doomed"], "ListAliases of the other key")


# ---- 6. aliases ------------------------------------------------------------------


@test
def test_aliases():
    ka = create_key("alias-a")
    kb = create_key("alias-b")
    name = "alias/lc-main"
    call_empty("CreateAlias", {"AliasName": name, "TargetKeyId": ka})
    eq(gdk(ka, ref=name)[0][1:17], uuid.UUID(ka).bytes, "GenerateDataKey via the alias")
    eq(describe(name)["KeyId"], ka, "DescribeKey via the alias")
    eq(alias_names(KeyId=ka), [name], "ListAliases(KeyId=a)")
    fails("CreateAlias", {"AliasName": name, "TargetKeyId": kb}, "AlreadyExistsException", 409,
          "an existing name")
    fails("CreateAlias", {"AliasName": "alias/aws/x", "TargetKeyId": ka},
          "InvalidAliasNameException", 400, "alias/aws/x")
    fails("UpdateAlias", {"AliasName": "alias/aws/x", "TargetKeyId": ka},
          "InvalidAliasNameException", 400, "UpdateAlias alias/aws/x")

    call_empty("UpdateAlias", {"AliasName": name, "TargetKeyId": arn(kb)})
    a = call("GenerateDataKey", {"KeyId": name, "KeySpec": "AES_256"})
    eq(a["KeyId"], arn(kb), "GenerateDataKey via the alias uses the other key")
    eq(unb64(a["CiphertextBlob"])[1:17], uuid.UUID(kb).bytes, "blob key id")
    C.blobs.append({"key": kb, "blob": unb64(a["CiphertextBlob"]), "ctx": None,
                    "pt": unb64(a["Plaintext"])})
    eq(describe(ARN_PREFIX + name)["KeyId"], kb, "DescribeKey via the alias ARN")
    eq(alias_names(KeyId=ka), [], "ListAliases(KeyId=a) after the update")
    eq(alias_names(KeyId=kb), [name], "ListAliases(KeyId=b) after the update")
    entry = [x for x in all_aliases() if x["AliasName"] == name]
    eq(len(entry), 1, "one entry")
    eq((entry[0]["AliasArn"], entry[0]["TargetKeyId"]), (ARN_PREFIX + name, kb), "entry")
    check(entry[0]["LastUpdatedDate"] >= entry[0]["CreationDate"], "LastUpdatedDate")

    call_empty("DeleteAlias", {"AliasName": name})
    fails("DescribeKey", {"KeyId": name}, "NotFoundException", 404, "the deleted alias")
    fails("GenerateDataKey", {"KeyId": name, "KeySpec": "AES_256"}, "NotFoundException", 404,
          "GenerateDataKey via the deleted alias")
    check(name not in alias_names(), "ListAliases no longer shows it")
    eq(alias_names(KeyId=kb), [], "ListAliases(KeyId=b) after the delete")
    for op, body in (("UpdateAlias", {"AliasName": name, "TargetKeyId": ka}),
                     ("DeleteAlias", {"AliasName": name}),
                     ("UpdateAlias", {"AliasName": "alias/lc-never", "TargetKeyId": ka}),
                     ("DeleteAlias", {"AliasName": "alias/lc-never"})):
        fails(op, body, "NotFoundException", 404, "%s %s" % (op, body["AliasName"]))
    check("alias/lc-never" not in alias_names(), "UpdateAlias made nothing")
    # the name can be taken again
    call_empty("CreateAlias", {"AliasName": name, "TargetKeyId": ka})
    eq(describe(name)["KeyId"], ka, "re-created alias")

    # targets pending deletion (left pending, for the restart test)
    kp = create_key("pending")
    call_empty("CreateAlias", {"AliasName": "alias/lc-pending", "TargetKeyId": kp})
    call("ScheduleKeyDeletion", {"KeyId": kp, "PendingWindowInDays": 30})
    inv = ("KMSInvalidStateException", 409)
    fails("CreateAlias", {"AliasName": "alias/lc-to-pending", "TargetKeyId": kp}, *inv)
    fails("UpdateAlias", {"AliasName": name, "TargetKeyId": kp}, *inv)
    eq(describe(name)["KeyId"], ka, "the refused update changed nothing")
    check("alias/lc-to-pending" not in alias_names(), "the refused create made nothing")
    eq(alias_names(KeyId=kp), ["alias/lc-pending"], "an alias made before the deletion was scheduled")

    # pagination over at least 3 aliases
    for i in (3, 1, 2):
        call_empty("CreateAlias", {"AliasName": "alias/lc-page-%d" % i, "TargetKeyId": kb})
    whole = call("ListAliases", {})
    eq(whole["Truncated"], False, "one page")
    names = [x["AliasName"] for x in whole["Aliases"]]
    eq(names, sorted(names), "aliases in name order")
    check(len(names) >= 5, "at least five aliases: %r" % names)
    eq(len(set(names)), len(names), "no alias twice")
    for limit in (1, 2):
        seen, pages, marker = [], 0, None
        while True:
            body = {"Limit": limit}
            if marker:
                body["Marker"] = marker
            page = call("ListAliases", body)
            pages += 1
            check(len(page["Aliases"]) <= limit, "page size")
            seen += [x["AliasName"] for x in page["Aliases"]]
            eq("NextMarker" in page, page["Truncated"], "NextMarker iff Truncated")
            if not page["Truncated"]:
                break
            eq(len(page["Aliases"]), limit, "a truncated page is full")
            marker = page["NextMarker"]
            check(pages <= len(names), "too many pages")
        eq(seen, names, "Limit=%d: every alias exactly once, in order" % limit)
    eq(alias_names(KeyId=kb), ["alias/lc-page-1", "alias/lc-page-2", "alias/lc-page-3"],
       "ListAliases(KeyId=b)")
    p = call("ListAliases", {"KeyId": kb, "Limit": 2})
    eq(([x["AliasName"] for x in p["Aliases"]], p["Truncated"]),
       (["alias/lc-page-1", "alias/lc-page-2"], True), "ListAliases(KeyId=b, Limit=2)")
    p = call("ListAliases", {"KeyId": kb, "Limit": 2, "Marker": p["NextMarker"]})
    eq(([x["AliasName"] for x in p["Aliases"]], p["Truncated"]), (["alias/lc-page-3"], False),
       "ListAliases(KeyId=b, Limit=2), second page")


# ---- 7. ReEncrypt ---------------------------------------------------------------------


@test
def test_re_encrypt():
    k1 = create_key("re-1")
    k2 = create_key("re-2")
    x, y = {"ctx": "X", "tenant": "a"}, {"ctx": "Y"}
    blob, pt = gdk(k1, ctx=x)
    a = call("ReEncrypt", {"CiphertextBlob": b64(blob), "SourceEncryptionContext": x,
                           "DestinationKeyId": k2, "DestinationEncryptionContext": y})
    eq(sorted(a), ["CiphertextBlob", "DestinationEncryptionAlgorithm", "KeyId",
                   "SourceEncryptionAlgorithm", "SourceKeyId"], "ReEncrypt members")
    eq((a["SourceKeyId"], a["KeyId"], a["SourceEncryptionAlgorithm"],
        a["DestinationEncryptionAlgorithm"]),
       (arn(k1), arn(k2), "SYMMETRIC_DEFAULT", "SYMMETRIC_DEFAULT"), "ReEncrypt answer")
    new = unb64(a["CiphertextBlob"])
    eq(new[1:17], uuid.UUID(k2).bytes, "the new blob is under key 2")
    eq(len(new), len(blob), "same length")
    check_decrypts(new, y, pt, k2, what="the re-encrypted blob under Y")
    C.blobs.append({"key": k2, "blob": new, "ctx": y, "pt": pt})
    bad = ("InvalidCiphertextException", 400)
    fails("Decrypt", {"CiphertextBlob": b64(new), "EncryptionContext": x}, *bad, "new blob under X")
    fails("Decrypt", {"CiphertextBlob": b64(new)}, *bad, "new blob without a context")
    check_decrypts(blob, x, pt, k1, what="the original blob")
    fails("ReEncrypt", {"CiphertextBlob": b64(blob), "SourceEncryptionContext": y,
                        "DestinationKeyId": k2}, *bad, "the wrong source context")
    fails("ReEncrypt", {"CiphertextBlob": b64(blob), "DestinationKeyId": k2}, *bad,
          "no source context")
    fails("ReEncrypt", {"CiphertextBlob": b64(blob), "SourceEncryptionContext": x,
                        "SourceKeyId": k2, "DestinationKeyId": k2},
          "IncorrectKeyException", 400, "SourceKeyId naming the wrong key")
    # the right SourceKeyId, by ARN; back to key 1 with no context
    a = call("ReEncrypt", {"CiphertextBlob": b64(new), "SourceEncryptionContext": y,
                           "SourceKeyId": arn(k2), "DestinationKeyId": arn(k1)})
    eq((a["SourceKeyId"], a["KeyId"]), (arn(k2), arn(k1)), "ReEncrypt back")
    back = unb64(a["CiphertextBlob"])
    check_decrypts(back, None, pt, k1, what="re-encrypted back")
    C.blobs.append({"key": k1, "blob": back, "ctx": None, "pt": pt})

    call_empty("DisableKey", {"KeyId": k2})
    fails("ReEncrypt", {"CiphertextBlob": b64(blob), "SourceEncryptionContext": x,
                        "DestinationKeyId": k2}, "DisabledException", 409, "a disabled destination")
    call_empty("EnableKey", {"KeyId": k2})
    a = call("ReEncrypt", {"CiphertextBlob": b64(blob), "SourceEncryptionContext": x,
                           "DestinationKeyId": k2})
    eq(a["KeyId"], arn(k2), "ReEncrypt after EnableKey")


# ---- 8. restart ------------------------------------------------------------------------


def snapshot():
    keys = listed_keys()
    per_key = {}
    for k in keys:
        per_key[k] = {
            "describe": describe(k),
            "rotation": call("GetKeyRotationStatus", {"KeyId": k}),
            "rotations": rotations(k),
        }
    return {"keys": keys, "per_key": per_key, "aliases": all_aliases()}


def restart_keys():
    """Keys in every state the restart must keep, made here so that the restart
    test does not depend on the tests before it having passed: Disabled,
    PendingDeletion, rotation enabled, and rotated on demand (its current
    version is not its first)."""
    made = {}
    for name in ("restart-disabled", "restart-pending", "restart-scheduled", "restart-rotated"):
        made[name] = create_key(name)
        gdk(made[name], ctx={"restart": name})
    call("RotateKeyOnDemand", {"KeyId": made["restart-rotated"]})
    gdk(made["restart-rotated"], ctx={"restart": "after the rotation"})
    call_empty("EnableKeyRotation", {"KeyId": made["restart-scheduled"]})
    call_empty("DisableKey", {"KeyId": made["restart-disabled"]})
    call("ScheduleKeyDeletion", {"KeyId": made["restart-pending"], "PendingWindowInDays": 30})
    return made


@test
def test_restart():
    made = restart_keys()
    before = snapshot()
    states = collections.Counter(v["describe"]["KeyState"] for v in before["per_key"].values())
    eq(sorted(states), ["Disabled", "Enabled", "PendingDeletion"], "the key states on the token")
    check(any(v["rotation"]["KeyRotationEnabled"] for v in before["per_key"].values()),
          "a key with rotation enabled")
    destroyed = {str(uuid.UUID(bytes=r[0]))
                 for r in db_query(C.config, "SELECT id FROM keys WHERE state = 3")}
    check(C.deleted <= destroyed, "the keys deleted here are tombstones in the database")
    check(not destroyed & set(before["keys"]), "deleted keys are not listed")
    eq(sorted(before["keys"]), sorted(set(C.keys.values()) - destroyed),
       "ListKeys lists every key made and not deleted")
    eq(sorted(before["keys"]),
       sorted(str(uuid.UUID(bytes=r[0]))
              for r in db_query(C.config, "SELECT id FROM keys WHERE state <> 3")),
       "ListKeys lists the keys rows not destroyed")
    eq(sorted((a["AliasName"], a["TargetKeyId"]) for a in before["aliases"]),
       sorted((r[0], str(uuid.UUID(bytes=r[1])))
              for r in db_query(C.config, "SELECT name, target FROM aliases")),
       "ListAliases against the aliases rows")
    for k in before["keys"]:
        check_rotations_match_rows(k, version_rows(k))
    rows_before = db_dump()

    C.server.stop()
    C.server = None
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd-2.log"))
    h.diag("p11kmsd restarted, serving %s" % C.server.endpoint)
    after = snapshot()
    eq(after["keys"], before["keys"], "ListKeys after the restart")
    for k in before["keys"]:
        for what in ("describe", "rotation", "rotations"):
            eq(after["per_key"][k][what], before["per_key"][k][what], "%s of %s" % (what, k))
    eq(after["aliases"], before["aliases"], "ListAliases after the restart")
    eq(db_dump(), rows_before, "the keys, versions and aliases rows after the restart")

    n = 0
    for b in C.blobs:
        if b["key"] in destroyed:
            body = {"CiphertextBlob": b64(b["blob"])}
            if b["ctx"] is not None:
                body["EncryptionContext"] = b["ctx"]
            fails("Decrypt", body, "NotFoundException", 404, "a blob of the deleted key")
        elif before["per_key"][b["key"]]["describe"]["KeyState"] == "Enabled":
            check_decrypts(b["blob"], b["ctx"], b["pt"], b["key"], what="blob %d" % n)
        n += 1
    h.diag("%d blobs checked after the restart" % n)
    for name in ("restart-disabled", "restart-pending"):
        blob = [b for b in C.blobs if b["key"] == made[name]][0]
        fails("Decrypt", {"CiphertextBlob": b64(blob["blob"]), "EncryptionContext": blob["ctx"]},
              *{"restart-disabled": ("DisabledException", 409),
                "restart-pending": ("KMSInvalidStateException", 409)}[name], name)
    # every Enabled key's new data keys use the current version the database names
    current = {k: vid_bytes(key_row(k)["current_vid"]) for k in before["keys"]}
    eq(version_rows(made["restart-rotated"])[-1]["vid"], current[made["restart-rotated"]],
       "the rotated key's current version is its second")
    for k in before["keys"]:
        if before["per_key"][k]["describe"]["KeyState"] == "Enabled":
            eq(vid_of(gdk(k)[0]), current[k], "a new data key of %s uses the same current version"
               % k)
    check_token(C.token, C.config)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
