#!/usr/bin/python3
"""The import of the earlier release's token-only layout (DESIGN §5, migration),
on tests/fixtures/v1-state: a `p11kmsd --dev` state folder the first release
left (six keys, 29 versions as token objects, CKO_DATA records and history
objects, aliases, 63 blobs it issued; see its README.md and expected.json).

Each part works on its own copy of the fixture (SoftHSM2 rewrites the token
on every login, so the fixture itself is never used in place):

- `p11kmsd --dev --state-dir COPY` imports it by itself: every blob decrypts
  with its context to its plaintext (those of the Disabled key C and the
  PendingDeletion key D answer DisabledException / KMSInvalidStateException,
  and decrypt after EnableKey / CancelKeyDeletion + EnableKey); the keys'
  states, descriptions, rotation status, rotations, policies and the aliases
  read back as recorded (alias/gone stays deleted); the database holds the
  keys as token-resident (versions rows without wrapped material, the token
  objects still there, the token's only other AES key the root); new keys are
  made wrapped as usual; a restart imports nothing twice;
- `p11kmsd migrate --config FILE` on a second copy, run twice, gives the same
  database (and the same keys, versions and aliases rows as --dev's import);
  a server on that configuration decrypts every blob;
- a migrated key cannot be rotated on demand (UnsupportedOperationException)
  and scheduled rotation leaves it alone: on a third copy whose database is
  moved on past D's deletion date and B's next rotation date (as a run after
  those dates would find it), D is destroyed (its blobs NotFound, its rows
  and token object gone) and B is not rotated, while a wrapped key on the
  same server rotates on schedule.

The fixture's two absolute dates (D's DeletionDate, B's NextRotationDate) may
have passed when this runs: the --dev part expects D destroyed after its date,
and B unrotated either way. TAP output."""

import base64
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

FIXTURE = os.path.join(h.SRCDIR, "tests", "fixtures", "v1-state")
with open(os.path.join(FIXTURE, "expected.json")) as _f:
    EXPECTED = json.load(_f)
KEYS = EXPECTED["keys"]
ACCOUNT = EXPECTED["account"]
REGION = EXPECTED["region"]
ARN_PREFIX = "arn:aws:kms:%s:%s:" % (REGION, ACCOUNT)
IMPORT_TEXT = "%d keys, %d versions, %d aliases" % (
    len(KEYS), sum(k["versions"] for k in KEYS.values()), len(EXPECTED["aliases"]))
IMPORTED_LOG = "imported the token's earlier layout"
# Short periods on the configuration servers: one "day" is a second.
KNOBS = {"day_seconds": "1", "rotation_min_days": "1", "refresh_ms": "200",
         "account": ACCOUNT, "region": REGION}
STATE_NAMES = {0: "Enabled", 1: "Disabled", 2: "PendingDeletion", 3: "Destroyed"}


class Ctx:
    ws = None
    principal = None
    dev_dir = None
    dev = None            # the --dev server on the first copy
    dev_rows = None       # its keys/versions/aliases rows right after the import
    config_rows = None    # the migrate copy's, after `p11kmsd migrate`
    servers = []          # every server started, for the tear-down


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.principal = principal_of(os.path.join(FIXTURE, "credentials"))
    h.diag("fixture %s: %s; now %s" % (FIXTURE, IMPORT_TEXT, time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                           time.gmtime())))


def teardown():
    errors = []
    try:
        for s in C.servers:
            if T.failed:
                h.diag("p11kmsd's log (%s):\n%s" % (s.log_path, s.stderr_text()))
            try:
                s.stop()
            except AssertionError as e:
                errors.append(str(e))
    finally:
        C.ws.close()
    eq(errors, [], "servers stopped cleanly")


# ---- the fixture ------------------------------------------------------------------


def principal_of(path):
    """The credentials file's one principal (`# comment`, then AKID SECRET NAME)."""
    with open(path) as f:
        for line in f:
            words = line.split()
            if words and not words[0].startswith("#"):
                return h.Principal(words[0], words[1], words[2])
    raise AssertionError("no principal in %s" % path)


def copy_fixture(name):
    """A scratch copy of the fixture's state (its README, expected.json and
    generator stay behind) with its own softhsm2.conf, private files 0600."""
    d = C.ws.sub(name)
    os.mkdir(d, 0o700)
    shutil.copytree(os.path.join(FIXTURE, "tokens"), os.path.join(d, "tokens"), symlinks=True)
    for f in ("user.pin", "so.pin", "credentials"):
        shutil.copy2(os.path.join(FIXTURE, f), os.path.join(d, f))
        os.chmod(os.path.join(d, f), 0o600)
    h.write_private(os.path.join(d, "softhsm2.conf"),
                    "directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n"
                    "slots.removable = false\n" % os.path.join(d, "tokens"))
    return d


def token_of(copy):
    return h.Token(copy, EXPECTED["token_label"])


def config_for(copy, **extra):
    """A configuration naming the copy's token, PIN and credentials, and a
    database beside it (<config>.db)."""
    settings = dict(KNOBS)
    settings.update(extra)
    return h.write_config(os.path.join(copy, "p11kmsd.conf"), token_of(copy),
                          os.path.join(copy, "credentials"), **settings)


def start_dev(copy, log_name):
    s = h.start_dev_server(copy, os.path.join(C.ws.path, log_name))
    C.servers.append(s)
    return s


def start_config(config, copy, log_name):
    s = h.start_config_server(config, token_of(copy), os.path.join(C.ws.path, log_name))
    C.servers.append(s)
    return s


def stop(server):
    C.servers.remove(server)
    server.stop()


def blob_bytes(b):
    return base64.b64decode(b["ciphertext_b64"])


def plaintext(b):
    return base64.b64decode(b["plaintext_b64"])


def blobs_of(name):
    return [b for b in EXPECTED["blobs"] if b["key"] == name]


def d_deletion_passed():
    return time.time() >= KEYS["D"]["DeletionDate"]


# ---- requests -----------------------------------------------------------------------


def kms(server):
    return h.kms_client(server.endpoint, C.principal, region=REGION)


def raw(server, op, params):
    """A signed request that must succeed (for the members boto3 1.26's model
    lacks: RotationType, RotationPeriodInDays, RotateKeyOnDemand)."""
    r = h.kms_call(server.endpoint, op, params, C.principal, region=REGION)
    if r.status != 200:
        raise AssertionError("%s %r answered %d: %r" % (op, params, r.status, r.body))
    return r.json() if r.body else {}


def raw_fails(server, op, params, error_type, status, what=""):
    r = h.kms_call(server.endpoint, op, params, C.principal, region=REGION)
    if r.status == 200:
        raise AssertionError("%s %s succeeded (%r); expected %s %d"
                             % (op, what or params, r.body[:200], error_type, status))
    try:
        return h.check_error_response(r, error_type, status)
    except AssertionError as e:
        raise AssertionError("%s %s: %s" % (op, what or params, e))


def rotations(server, key_id):
    out, marker = [], None
    for _ in range(50):
        body = {"KeyId": key_id}
        if marker:
            body["Marker"] = marker
        page = raw(server, "ListKeyRotations", body)
        out += page["Rotations"]
        if not page["Truncated"]:
            return out
        marker = page["NextMarker"]
    raise AssertionError("ListKeyRotations does not end")


def decrypt_ok(client, b, what=""):
    out = client.decrypt(CiphertextBlob=blob_bytes(b), EncryptionContext=b["encryption_context"])
    eq(out["Plaintext"], plaintext(b), "blob %d%s decrypts to its plaintext" % (b["n"], what))
    eq(out["KeyId"], b["key_arn"], "blob %d%s: Decrypt KeyId" % (b["n"], what))


def decrypt_fails(client, b, error_type, status, what=""):
    code, http, _ = h.client_error(client.decrypt, CiphertextBlob=blob_bytes(b),
                                   EncryptionContext=b["encryption_context"])
    eq((code, http), (error_type, status), "blob %d (key %s)%s" % (b["n"], b["key"], what))


def check_every_blob(server, states, what=""):
    """Each blob decrypts when its key is Enabled, else fails as its state
    says (a destroyed key's blobs: NotFoundException). Returns the count."""
    client = kms(server)
    errors = {"Disabled": ("DisabledException", 409),
              "PendingDeletion": ("KMSInvalidStateException", 409),
              "Destroyed": ("NotFoundException", 404)}
    eq({s: e and errors[s][0] for s, e in EXPECTED["decrypt_error_by_state"].items()},
       EXPECTED["decrypt_error_by_state"], "the errors the fixture recorded")
    for b in EXPECTED["blobs"]:
        blob = blob_bytes(b)
        eq((blob[0], blob[1:17], int.from_bytes(blob[17:21], "big")),
           (1, uuid.UUID(b["key_id"]).bytes, b["vid"]), "blob %d's header" % b["n"])
        state = states[b["key"]]
        if state == "Enabled":
            decrypt_ok(client, b, what)
        else:
            decrypt_fails(client, b, *errors[state], what=what)
    return len(EXPECTED["blobs"])


# ---- the database and the token ------------------------------------------------------


def query(db, sql, args=()):
    con = sqlite3.connect("file:%s?mode=ro" % db, uri=True, timeout=10)
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


def dump(db, tables=("keys", "versions", "aliases")):
    order = {"keys": "id", "versions": "key_id, n", "aliases": "name", "roots": "id",
             "meta": "name", "changes": "seq"}
    return {t: query(db, "SELECT * FROM %s ORDER BY %s" % (t, order[t])) for t in tables}


def key_row(db, name):
    cols = ("state", "description", "deletion_date", "rotation_enabled", "rotation_days",
            "next_rotation", "current_vid", "on_demand", "token_resident")
    rows = query(db, "SELECT %s FROM keys WHERE id = ?" % ", ".join(cols),
                 (uuid.UUID(KEYS[name]["key_id"]).bytes,))
    return dict(zip(cols, rows[0])) if rows else None


def version_rows(db, key_id):
    """(vid, n, rotation, root_id, wrapped length or None) by ordinal."""
    return query(db, "SELECT vid, n, rotation, root_id, length(wrapped) FROM versions "
                     "WHERE key_id = ? ORDER BY n", (uuid.UUID(key_id).bytes,))


def expected_versions(name):
    k = KEYS[name]
    return [(k["vids"][str(n)], n, 0 if n == 1 else 2, None, None)
            for n in range(1, k["versions"] + 1)]


def check_imported_rows(db, states):
    """The database holds the fixture's keys as token-resident keys: their rows,
    their versions (no wrapped material, no root) and their aliases."""
    rotation_types = {}
    eq(sorted(str(uuid.UUID(bytes=r[0])) for r in query(db, "SELECT id FROM keys")),
       sorted(k["key_id"] for k in KEYS.values()), "the keys rows are the fixture's keys")
    for name, k in KEYS.items():
        row = key_row(db, name)
        state = states[name]
        eq((STATE_NAMES[row["state"]], row["description"], row["token_resident"]),
           (state, k["Description"], 1), "key %s: state, description, token-resident" % name)
        eq((row["rotation_enabled"], row["current_vid"]),
           (int(k["KeyRotationEnabled"]), k["vids"][str(k["versions"])]),
           "key %s: rotation enabled, current version" % name)
        eq(row["on_demand"], k["rotations"] if "ON_DEMAND" in k["rotation_types"] else 0,
           "key %s: on-demand rotations" % name)
        if "RotationPeriodInDays" in k:
            eq((row["rotation_days"], row["next_rotation"]),
               (k["RotationPeriodInDays"], k["NextRotationDate"]), "key %s: rotation" % name)
        if state == "PendingDeletion":
            eq(row["deletion_date"], k["DeletionDate"], "key %s: deletion date" % name)
        rows = version_rows(db, k["key_id"])
        want = [] if state == "Destroyed" else expected_versions(name)
        eq([r[:2] + r[3:] for r in rows], [r[:2] + r[3:] for r in want],
           "key %s: versions rows (vid, n, root, wrapped)" % name)
        rotation_types[name] = ([r[2] for r in rows], [r[2] for r in want])
    live = {n for n, s in states.items() if s != "Destroyed"}
    want = {a: t for a, t in EXPECTED["aliases"].items()
            if any(KEYS[n]["key_id"] == t for n in live)}
    eq({r[0]: str(uuid.UUID(bytes=r[1])) for r in query(db, "SELECT name, target FROM aliases")},
       want, "the aliases rows")
    eq(query(db, "SELECT value FROM meta WHERE name = 'migrated_token_layout'"), [(IMPORT_TEXT,)],
       "the import's mark")
    # last, so that the checks above run whatever this finds: 0 for a key's first version
    # (wherever the old layout kept it: record or history object), 2 for on-demand rotations
    for name, (got, want) in rotation_types.items():
        eq(got, want, "key %s: the versions rows' rotation types by ordinal" % name)


_INSPECT = r"""
import json, sys
import PyKCS11
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
out = []
try:
    for k in session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]):
        cid = bytes(session.getAttributeValue(k, [PyKCS11.CKA_ID], allAsBinary=True)[0])
        lab, kt = session.getAttributeValue(k, [PyKCS11.CKA_LABEL, PyKCS11.CKA_KEY_TYPE])
        out.append({"id": cid.hex(), "label": lab, "key_type": PyKCS11.CKK[kt]})
finally:
    session.logout()
    session.closeSession()
print(json.dumps(out))
"""


def token_secret_keys(copy):
    """The token's secret keys, read in a child process (the token afresh)."""
    token = token_of(copy)
    env = dict(os.environ, SOFTHSM2_CONF=token.conf)
    r = subprocess.run(["/usr/bin/python3", "-c", _INSPECT, h.SOFTHSM_MODULE, token.label,
                        token.pin_file], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    if r.returncode != 0:
        raise AssertionError("reading the token failed (%d): %s"
                             % (r.returncode, r.stderr.decode("utf-8", "replace")))
    return json.loads(r.stdout)


def check_token(copy, db):
    """The token keeps a token object for every token-resident versions row
    (CKA_ID = key uuid || vid), holds the root the database names, and no
    other AES key but those."""
    keys = token_secret_keys(copy)
    aes = sorted(k["id"] for k in keys if k["key_type"] == "CKK_AES")
    resident = [uuid.UUID(bytes=r[0]).bytes.hex() + r[1].to_bytes(4, "big").hex()
                for r in query(db, "SELECT v.key_id, v.vid FROM versions v JOIN keys k "
                                   "ON k.id = v.key_id WHERE k.token_resident = 1")]
    roots = query(db, "SELECT id, hex(cka_id), label FROM roots")
    eq([(r[0], len(r[1])) for r in roots], [(1, 32)], "one root row, CKA_ID 16 bytes")
    eq(aes, sorted(resident + [roots[0][1].lower()]),
       "the token's AES keys: one per token-resident version, and the root")
    eq([k["label"] for k in keys if k["id"] == roots[0][1].lower()], [roots[0][2]],
       "the root's label")
    eq(sorted(k["label"] for k in keys if k["key_type"] != "CKK_AES"), ["p11kms-audit-key"],
       "the token's other secret keys")


def token_calls(server):
    """C_GenerateKey and C_WrapKey calls so far, from /metrics."""
    r = h.get_metrics(server.endpoint, timeout=10)
    eq(r.status, 200, "GET /metrics")
    text = r.body.decode()
    check("# TYPE p11kms_token_call_seconds histogram" in text, "/metrics times token calls")
    out = {}
    for fn in ("C_GenerateKey", "C_WrapKey"):
        # a function not called yet has no series
        m = re.search(r'^p11kms_token_call_seconds_count\{function="%s"\} (\d+)$' % fn, text, re.M)
        out[fn] = int(m.group(1)) if m else 0
    return out


def run_migrate(config, copy):
    env = h.server_env({"SOFTHSM2_CONF": token_of(copy).conf})
    r = subprocess.run([h.p11kmsd_path(), "migrate", "--config", config], env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    out, err = r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")
    eq(r.returncode, 0, "p11kmsd migrate's exit status (stderr %r)" % err)
    eq(out, "p11kmsd: migrate done: sqlite:%s.db\n" % config, "p11kmsd migrate's output")
    return err


def wait_for(fn, timeout, what, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("%s: not within %.1f s" % (what, timeout))
        time.sleep(interval)


def dev_states():
    """The key states the --dev copy should have now: as recorded, but D
    destroyed once its deletion date has passed."""
    states = {n: k["KeyState"] for n, k in KEYS.items()}
    if d_deletion_passed():
        states["D"] = "Destroyed"
    return states


def wait_destroyed(server, copy, name):
    """A key past its deletion date is destroyed at the server's first look:
    DescribeKey answers NotFound, then (after the commit) its token objects go."""
    wait_for(lambda: h.kms_call(server.endpoint, "DescribeKey", {"KeyId": KEYS[name]["key_id"]},
                                C.principal, region=REGION).status == 404,
             10.0, "%s destroyed after its deletion date" % name)
    prefix = uuid.UUID(KEYS[name]["key_id"]).bytes.hex()
    wait_for(lambda: not [k for k in token_secret_keys(copy) if k["id"].startswith(prefix)],
             10.0, "%s's token object removed" % name)


def wait_settled(server, copy, states):
    if states["D"] == "Destroyed":
        h.diag("D's deletion date has passed: D must be destroyed")
        wait_destroyed(server, copy, "D")


# ---- 1. --dev imports the fixture by itself ---------------------------------------------


@test
def test_dev_imports_by_itself():
    C.dev_dir = copy_fixture("dev")
    db = os.path.join(C.dev_dir, "p11kms.db")
    check(not os.path.exists(db), "the fixture has no database")
    C.dev = start_dev(C.dev_dir, "dev-1.log")
    check(IMPORTED_LOG + ": " + IMPORT_TEXT in C.dev.stderr_text(),
          "the log says what was imported (%s):\n%s" % (IMPORT_TEXT, C.dev.stderr_text()))
    states = dev_states()
    wait_settled(C.dev, C.dev_dir, states)
    C.dev_rows = dump(db)
    check_token(C.dev_dir, db)
    check_imported_rows(db, states)
    # --dev made no key of its own: alias/dev is the fixture's
    eq(kms(C.dev).describe_key(KeyId="alias/dev")["KeyMetadata"]["KeyId"], KEYS["dev"]["key_id"],
       "alias/dev names the fixture's dev key")


@test
def test_dev_blobs_decrypt():
    states = dev_states()
    n = check_every_blob(C.dev, states)
    client = kms(C.dev)
    # naming the key too, and a wrong context refused as for any blob
    for b in EXPECTED["blobs"]:
        if states[b["key"]] == "Enabled":
            out = client.decrypt(CiphertextBlob=blob_bytes(b), KeyId=b["key_arn"],
                                 EncryptionContext=b["encryption_context"])
            eq(out["Plaintext"], plaintext(b), "blob %d with KeyId" % b["n"])
            wrong = dict(b["encryption_context"], extra="x")
            eq(h.client_error(client.decrypt, CiphertextBlob=blob_bytes(b),
                              EncryptionContext=wrong)[:2],
               ("InvalidCiphertextException", 400), "blob %d under another context" % b["n"])
    h.diag("%d blobs checked" % n)


@test
def test_dev_metadata():
    states = dev_states()
    client = kms(C.dev)
    live = [n for n in KEYS if states[n] != "Destroyed"]
    listed = [k["KeyId"] for p in client.get_paginator("list_keys").paginate() for k in p["Keys"]]
    eq(sorted(listed), sorted(KEYS[n]["key_id"] for n in live), "ListKeys")
    for name in live:
        k = KEYS[name]
        md = client.describe_key(KeyId=k["key_id"])["KeyMetadata"]
        eq((md["KeyId"], md["Arn"], md["KeyState"], md["Enabled"], md["Description"]),
           (k["key_id"], k["key_arn"], k["KeyState"], k["Enabled"], k["Description"]),
           "DescribeKey %s" % name)
        if "DeletionDate" in k:
            eq(int(md["DeletionDate"].timestamp()), k["DeletionDate"], "%s DeletionDate" % name)
        else:
            check("DeletionDate" not in md, "%s has no DeletionDate" % name)
        st = raw(C.dev, "GetKeyRotationStatus", {"KeyId": k["key_id"]})
        want = {"KeyId": k["key_arn"], "KeyRotationEnabled": k["KeyRotationEnabled"]}
        for f in ("RotationPeriodInDays", "NextRotationDate"):
            if f in k:
                want[f] = k[f]
        eq(st, want, "GetKeyRotationStatus %s" % name)
        rots = rotations(C.dev, k["key_id"])
        eq((len(rots), sorted({r["RotationType"] for r in rots})),
           (k["rotations"], k["rotation_types"]), "ListKeyRotations %s: count and types" % name)
        rows = version_rows(os.path.join(C.dev_dir, "p11kms.db"), k["key_id"])
        eq([(r["KeyId"], r["RotationType"]) for r in rots],
           [(k["key_arn"], "ON_DEMAND" if v[2] == 2 else "AUTOMATIC") for v in rows[1:]],
           "ListKeyRotations %s against its versions rows" % name)
        eq(client.get_key_policy(KeyId=k["key_id"], PolicyName="default")["Policy"], k["policy"],
           "GetKeyPolicy %s" % name)
    aliases = {a["AliasName"]: a.get("TargetKeyId")
               for p in client.get_paginator("list_aliases").paginate() for a in p["Aliases"]}
    eq(aliases, {a: t for a, t in EXPECTED["aliases"].items()
                 if any(KEYS[n]["key_id"] == t for n in live)}, "ListAliases")
    for gone in EXPECTED["deleted_aliases"]:
        eq(h.client_error(client.describe_key, KeyId=gone)[:2], ("NotFoundException", 404),
           "DescribeKey %s (deleted before the import)" % gone)
        eq(h.client_error(client.delete_alias, AliasName=gone)[:2], ("NotFoundException", 404),
           "DeleteAlias %s" % gone)


@test
def test_dev_enable_and_cancel():
    """C's blobs decrypt after EnableKey; D's after CancelKeyDeletion + EnableKey."""
    client = kms(C.dev)
    db = os.path.join(C.dev_dir, "p11kms.db")
    c, d = KEYS["C"]["key_id"], KEYS["D"]["key_id"]
    client.enable_key(KeyId=c)
    eq(key_row(db, "C")["state"], 0, "C's keys row after EnableKey")
    for b in blobs_of("C"):
        decrypt_ok(client, b, " after EnableKey")
    if d_deletion_passed():
        eq(h.client_error(client.cancel_key_deletion, KeyId=d)[:2], ("NotFoundException", 404),
           "CancelKeyDeletion of D after its deletion date")
        for b in blobs_of("D"):
            decrypt_fails(client, b, "NotFoundException", 404, " (D destroyed)")
        return
    eq(client.cancel_key_deletion(KeyId=d)["KeyId"], KEYS["D"]["key_arn"], "CancelKeyDeletion D")
    eq(client.describe_key(KeyId=d)["KeyMetadata"]["KeyState"], "Disabled", "D after the cancel")
    for b in blobs_of("D"):
        decrypt_fails(client, b, "DisabledException", 409, " after CancelKeyDeletion")
    client.enable_key(KeyId=d)
    eq(key_row(db, "D")["state"], 0, "D's keys row after EnableKey")
    for b in blobs_of("D"):
        decrypt_ok(client, b, " after CancelKeyDeletion and EnableKey")


@test
def test_dev_new_keys_and_data_keys():
    """New keys are wrapped keys as usual; the migrated keys make new data keys
    under their current (token) version."""
    client = kms(C.dev)
    db = os.path.join(C.dev_dir, "p11kms.db")
    key = client.create_key(Description="made after the import")["KeyMetadata"]["KeyId"]
    d = client.generate_data_key(KeyId=key, KeySpec="AES_256", EncryptionContext={"new": "1"})
    eq(client.decrypt(CiphertextBlob=d["CiphertextBlob"], EncryptionContext={"new": "1"})
       ["Plaintext"], d["Plaintext"], "a data key of the new key decrypts")
    rows = version_rows(db, key)
    eq([(r[1], r[2], r[3], r[4]) for r in rows], [(1, 0, 1, 40)],
       "the new key's version: n 1, wrapped under root 1 (40 bytes)")
    eq(int.from_bytes(d["CiphertextBlob"][17:21], "big"), rows[0][0], "the blob's version id")
    eq(query(db, "SELECT token_resident FROM keys WHERE id = ?", (uuid.UUID(key).bytes,)),
       [(0,)], "the new key is not token-resident")
    for name in ("A", "E", "dev"):
        k = KEYS[name]
        before = version_rows(db, k["key_id"])
        d = client.generate_data_key(KeyId=k["key_id"], KeySpec="AES_256")
        eq(int.from_bytes(d["CiphertextBlob"][17:21], "big"), k["vids"][str(k["versions"])],
           "a new data key of %s uses its current version" % name)
        eq(client.decrypt(CiphertextBlob=d["CiphertextBlob"])["Plaintext"], d["Plaintext"],
           "a new data key of %s decrypts" % name)
        eq(version_rows(db, k["key_id"]), before, "%s's versions rows after a new data key" % name)
        eq(len(before), k["versions"], "%s's versions rows" % name)
    check_token(C.dev_dir, db)


@test
def test_dev_no_on_demand_rotation():
    """A migrated key keeps its material in the token: RotateKeyOnDemand is
    refused and leaves no version behind (in the database or the token)."""
    db = os.path.join(C.dev_dir, "p11kms.db")
    before = dump(db)
    tokens_before = token_secret_keys(C.dev_dir)
    for name in ("A", "B", "dev"):
        k = KEYS[name]
        doc = raw_fails(C.dev, "RotateKeyOnDemand", {"KeyId": k["key_id"]},
                        "UnsupportedOperationException", 400, "of migrated key %s" % name)
        check(k["key_id"] in doc["message"], "the message names the key: %r" % doc["message"])
        eq(len(rotations(C.dev, k["key_id"])), k["rotations"], "%s's rotations" % name)
    eq(dump(db), before, "the keys, versions and aliases rows after the refusals")
    eq(sorted(x["id"] for x in token_secret_keys(C.dev_dir)),
       sorted(x["id"] for x in tokens_before), "the token's secret keys after the refusals")


@test
def test_dev_restart_imports_nothing_twice():
    db = os.path.join(C.dev_dir, "p11kms.db")
    before = dump(db, ("keys", "versions", "aliases", "roots", "meta"))
    stop(C.dev)
    C.dev = start_dev(C.dev_dir, "dev-2.log")
    check(IMPORTED_LOG not in C.dev.stderr_text(),
          "the restarted server imported again:\n" + C.dev.stderr_text())
    eq(dump(db, ("keys", "versions", "aliases", "roots", "meta")), before,
       "the keys, versions, aliases, roots and meta rows after the restart")
    # whatever the tests before left them in (C and D Enabled when they passed)
    states = {n: STATE_NAMES[key_row(db, n)["state"]] for n in KEYS}
    h.diag("key states: %r" % states)
    h.diag("%d blobs checked after the restart" % check_every_blob(C.dev, states, " (restart)"))
    check_token(C.dev_dir, db)


# ---- 2. p11kmsd migrate --config ---------------------------------------------------------


@test
def test_migrate_command_twice():
    copy = copy_fixture("config")
    config = config_for(copy)
    db = config + ".db"
    err = run_migrate(config, copy)
    check(IMPORTED_LOG + ": " + IMPORT_TEXT in err, "the first run's log: %r" % err)
    everything = ("keys", "versions", "aliases", "roots", "meta", "changes")
    first = dump(db, everything)
    err = run_migrate(config, copy)
    check(IMPORTED_LOG not in err and "imported already" in err, "the second run's log: %r" % err)
    eq(dump(db, everything), first, "the whole database after the second run")
    C.config_rows = dump(db)
    # the same import as --dev's (same records, same rows; only the root differs)
    if C.dev_rows is not None and not d_deletion_passed():
        eq(C.config_rows, C.dev_rows, "the keys, versions and aliases rows of --dev's import")
    # D's deletion is the server's to carry out: migrate imports it PendingDeletion
    check_token(copy, db)

    server = start_config(config, copy, "config-1.log")
    states = dev_states()
    wait_settled(server, copy, states)
    h.diag("%d blobs checked" % check_every_blob(server, states))
    for name in ("A", "C"):
        k = KEYS[name]
        md = kms(server).describe_key(KeyId=k["key_id"])["KeyMetadata"]
        eq((md["Arn"], md["KeyState"]), (k["key_arn"], k["KeyState"]), "DescribeKey %s" % name)
    stop(server)
    check_imported_rows(db, {n: k["KeyState"] for n, k in KEYS.items()}
                        if not d_deletion_passed() else dev_states())


# ---- 3. scheduled rotation and deletion after the fixture's dates ---------------------


@test
def test_later_dates():
    """A run after D's deletion date and B's next rotation date, simulated by
    moving both into the past in the migrated database: D is destroyed, B (a
    migrated key) is not rotated, while a wrapped key rotates on schedule."""
    copy = copy_fixture("later")
    config = config_for(copy)
    db = config + ".db"
    run_migrate(config, copy)
    past = int(time.time()) - 5
    con = sqlite3.connect(db)
    try:
        with con:
            for name, column in (("B", "next_rotation"), ("D", "deletion_date")):
                con.execute("UPDATE keys SET %s = ? WHERE id = ?" % column,
                            (past, uuid.UUID(KEYS[name]["key_id"]).bytes))
    finally:
        con.close()
    b_rows = version_rows(db, KEYS["B"]["key_id"])
    server = start_config(config, copy, "later-1.log")
    client = kms(server)
    # A wrapped key rotating every second: once it has rotated twice, the
    # scheduler has looked at B (due earlier) at least twice. Meanwhile the
    # token generates and wraps a version for the control key's creation and
    # each of its rotations, and none for B.
    made0 = token_calls(server)
    control = client.create_key(Description="control")["KeyMetadata"]["KeyId"]
    raw(server, "EnableKeyRotation", {"KeyId": control, "RotationPeriodInDays": 1})
    wait_for(lambda: len(rotations(server, control)) >= 2, 20.0, "two scheduled rotations")
    made1 = token_calls(server)
    n = len(rotations(server, control))
    eq({r["RotationType"] for r in rotations(server, control)}, {"AUTOMATIC"}, "control rotations")

    b = KEYS["B"]
    eq(rotations(server, b["key_id"]), [], "B (migrated) is not rotated on schedule")
    eq(version_rows(db, b["key_id"]), b_rows, "B's versions rows")
    eq(b_rows, expected_versions("B"), "B's versions rows as imported")
    st = raw(server, "GetKeyRotationStatus", {"KeyId": b["key_id"]})
    eq((st["KeyRotationEnabled"], st["RotationPeriodInDays"]), (True, 90), "B's rotation status")
    d = client.generate_data_key(KeyId=b["key_id"], KeySpec="AES_256")
    eq(int.from_bytes(d["CiphertextBlob"][17:21], "big"), b["vids"]["1"],
       "B's new data keys use its one version")

    # D: destroyed at the server's first look, its token object removed; a tombstone
    # row without versions
    wait_destroyed(server, copy, "D")
    eq(key_row(db, "D")["state"], 3, "D's keys row is a tombstone")
    eq(version_rows(db, KEYS["D"]["key_id"]), [], "D's versions rows")
    for x in blobs_of("D"):
        decrypt_fails(client, x, "NotFoundException", 404, " (D destroyed)")
    check_token(copy, db)
    states = dict(dev_states(), D="Destroyed")
    h.diag("%d blobs checked" % check_every_blob(server, states))
    stop(server)
    for fn in ("C_GenerateKey", "C_WrapKey"):
        # one more than listed: a rotation whose version is made but not yet stored
        check(1 + n <= made1[fn] - made0[fn] <= 2 + n,
              "%s calls while the control key was made and rotated %d times: %d (B is due: "
              "scheduled rotation must not make versions for a token-resident key)"
              % (fn, n, made1[fn] - made0[fn]))


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
