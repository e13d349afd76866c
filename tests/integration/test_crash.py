#!/usr/bin/python3
"""Crash safety (DESIGN §5: a change is one database transaction, usage
counters are reserved in blocks before they are spent, "a crash wastes a
block, never reuses one"): one token and one SQLite database, one p11kmsd
killed with SIGKILL at a random instant of a burst of CreateKey,
RotateKeyOnDemand and CreateAlias/UpdateAlias/DeleteAlias calls, with
GenerateDataKey and Encrypt running throughout, P11KMS_CRASH_ROUNDS times
(default 100), restarted on the same token and database (without p11kmsd
init: as a supervisor would) and checked after every restart:

- every blob whose answer reached the client decrypts to its plaintext;
- ListKeys holds every key whose CreateKey answered, and each alias points at
  a target that an answered or a cut call set (or is gone, when that was a
  DeleteAlias);
- `PRAGMA integrity_check` says ok; every key row has its current version;
  every version row holds a 40-byte wrapped key under the one root;
- the token holds exactly one AES key (the root the database names) and the
  audit key: no key version ever becomes a token object;
- every change the database holds has an intent line in the audit log and an
  outcome or recovery line saying "committed", and no such line names a
  change the database lacks;
- no two blobs share an IV under one key version, no version wrapped more
  than usage_bound times, and each version's `reserved` is at least the
  blobs seen under it and never goes down from one restart to the next.

TAP output. P11KMS_CRASH_SEED fixes the random choices (kill delays, targets,
alias operations); the interleaving with the server still varies.
"""

import base64
import concurrent.futures
import http.client
import os
import random
import re
import secrets
import sqlite3
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

ROUNDS = int(os.environ.get("P11KMS_CRASH_ROUNDS") or 100)
SEED = int(os.environ.get("P11KMS_CRASH_SEED") or secrets.randbits(32))
SETTINGS = {
    "refresh_ms": "200",
    "day_seconds": "1",
    "rotation_min_days": "1",
    "max_on_demand_rotations": "100000",
    "usage_bound": "50",   # a version's bound is reached within a few rounds: rotations at it
    "usage_block": "3",    # a reservation (a database write) every third wrap
    "rate_manage": "0",    # unlimited: the burst's management calls outrun the default rate
}
USAGE_BOUND = int(SETTINGS["usage_bound"])
ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
ALIASES = ["alias/crash-%d" % i for i in range(4)]
INITIAL_KEYS = 3
KILL_DELAY_MS = (20, 400)
CREATE_PAUSE = (0.08, 0.2)  # seconds between CreateKey calls of a burst
ROTATE_PAUSE = (0.01, 0.05)
WRAP_PAUSE = (0.01, 0.04)   # between GenerateDataKey or Encrypt calls
ALIAS_PAUSE = (0.0, 0.02)
ALIAS_DELETE_SHARE = 0.25   # of the moves of an existing alias
VERIFY_THREADS = 8
ROOT_PREFIX = "p11kms-root:"
AUDIT_KEY_LABEL = "p11kms-audit-key"
WRAPPED_LEN = 40  # an AES-256 key under CKM_AES_KEY_WRAP_PAD


class Ctx:
    ws = None
    token = None
    principal = None
    config = None
    database = None
    server = None
    rng = None
    lock = None
    keys = None       # key ids whose CreateKey was answered 200
    blobs = None      # [(key id, blob bytes, plaintext bytes, context dict)]
    uses = None       # key uuid bytes || version id -> wraps answered under it
    ivs = None        # key uuid bytes || version id -> {IV: count}
    reserved = None   # (key uuid bytes, vid) -> versions.reserved read at the last restart
    aliases = None    # name -> AliasState
    p11 = None        # PyKCS11 library, loaded once
    root_cka_id = None
    stats = None


C = Ctx()


class AliasState:
    """What an alias may point at: the target last seen or confirmed (None: no
    alias), plus what the calls a kill caught in flight would have set."""

    def __init__(self):
        self.confirmed = None
        self.in_flight = set()

    def allowed(self):
        return {self.confirmed} | self.in_flight


def setup():
    C.ws = h.Workspace(prefix="p11kms-crash-")
    C.principal = h.new_principal("crasher")
    C.token, C.config = h.token_and_config(C.ws, "p11kms-crash", C.principal, **SETTINGS)
    C.database = C.config + ".db"
    C.rng = random.Random(SEED)
    C.lock = threading.Lock()
    C.keys = []
    C.blobs = []
    C.uses = {}
    C.ivs = {}
    C.reserved = {}
    C.aliases = {name: AliasState() for name in ALIASES}
    C.stats = {"kills": 0, "decrypts_verified": 0, "gdk_verified": 0, "in_flight": 0, "refused": 0,
               "answered": {}, "cut": {}, "alias_moves_resolved_new": 0,
               "alias_moves_resolved_old": 0, "max_versions": 0}
    h.diag("P11KMS_CRASH_SEED=%d P11KMS_CRASH_ROUNDS=%d" % (SEED, ROUNDS))
    h.init_database(C.config, C.token)


def teardown():
    if T.failed and C.server is None and C.ws:
        # finish() shows the log of a running server only
        try:
            with open(C.ws.sub("p11kmsd.log"), "rb") as f:
                h.diag("p11kmsd's log (last 200 lines):\n" + "\n".join(
                    f.read().decode("utf-8", "replace").splitlines()[-200:]))
        except OSError:
            pass
    h.finish(T, C.ws, C.server)


def start():
    # No p11kmsd init after a crash: the server must start on what the kill left.
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"), init=False)
    return C.server.endpoint


def crash():
    status = C.server.sigkill()
    C.server = None
    eq(status, -9, "p11kmsd's exit status: killed by our SIGKILL, not dead before it")
    C.stats["kills"] += 1


def b64(data):
    return base64.b64encode(data).decode()


def call(endpoint, op, params):
    """One signed request on a fresh connection; raises OSError or
    http.client.HTTPException when the server is gone."""
    return h.kms_call(endpoint, op, params, C.principal)


def ok(r, what):
    if r.status != 200:
        raise AssertionError("%s: HTTP %d %r" % (what, r.status, r.body[:300]))
    return r.json()


def arn(key_id):
    return ARN_PREFIX + "key/" + key_id


def count_use(blob):
    """Counts a wrap under the blob's key version and its IV (caller holds C.lock).
    Blob: format 1 byte, key uuid 16, version 4, IV 12, ciphertext, tag 16."""
    version = blob[1:21]
    C.uses[version] = C.uses.get(version, 0) + 1
    ivs = C.ivs.setdefault(version, {})
    iv = blob[21:33]
    ivs[iv] = ivs.get(iv, 0) + 1


# ---- verification -------------------------------------------------------------


def verify_blob(endpoint, item):
    key_id, blob, plaintext, context = item
    doc = ok(call(endpoint, "Decrypt", {"CiphertextBlob": b64(blob), "EncryptionContext": context}),
             "Decrypt of a blob under %s (context %r)" % (key_id, context))
    eq(doc.get("KeyId"), arn(key_id), "Decrypt KeyId")
    eq(base64.b64decode(doc["Plaintext"]), plaintext, "plaintext of a blob under %s" % key_id)


def verify_key(endpoint, key_id):
    doc = ok(call(endpoint, "GenerateDataKey", {"KeyId": key_id, "KeySpec": "AES_256"}),
             "GenerateDataKey on %s" % key_id)
    eq(doc.get("KeyId"), arn(key_id), "GenerateDataKey KeyId")
    eq(len(base64.b64decode(doc["Plaintext"])), 32, "data key length")
    blob = base64.b64decode(doc["CiphertextBlob"])
    eq(len(blob), 1 + 16 + 4 + 12 + 32 + 16, "blob length")
    eq(blob[1:17], uuid.UUID(key_id).bytes, "the blob names its key")
    with C.lock:
        count_use(blob)


def verify_alias(endpoint, name):
    r = call(endpoint, "DescribeKey", {"KeyId": name})
    if r.status == 404:
        h.check_error_response(r, "NotFoundException", 404)
        return name, None
    return name, ok(r, "DescribeKey %s" % name)["KeyMetadata"]["KeyId"]


def list_keys(endpoint):
    ids, marker = [], None
    while True:
        params = {"Limit": 1000}
        if marker:
            params["Marker"] = marker
        doc = ok(call(endpoint, "ListKeys", params), "ListKeys")
        ids += [k["KeyId"] for k in doc["Keys"]]
        if not doc.get("Truncated"):
            return ids
        marker = doc["NextMarker"]


def verify_token():
    """Exactly the root key and the audit key in the token: versions never go there."""
    import PyKCS11
    if C.p11 is None:
        os.environ["SOFTHSM2_CONF"] = C.token.conf
        C.p11 = PyKCS11.PyKCS11Lib()
        C.p11.load(h.SOFTHSM_MODULE)
    lib = C.p11
    slots = [s for s in lib.getSlotList(tokenPresent=True)
             if lib.getTokenInfo(s).label.strip() == C.token.label]
    eq(len(slots), 1, "slots holding token %s" % C.token.label)
    session = lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION)
    session.login(C.token.user_pin())
    try:
        secret = []
        for o in session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]):
            label, cka_id = session.getAttributeValue(o, [PyKCS11.CKA_LABEL, PyKCS11.CKA_ID],
                                                      allAsBinary=True)
            key_type = session.getAttributeValue(o, [PyKCS11.CKA_KEY_TYPE])[0]
            secret.append((bytes(label).decode("utf-8", "replace"), bytes(cka_id), key_type))
        others = [len(session.findObjects([(PyKCS11.CKA_CLASS, cls)]))
                  for cls in (PyKCS11.CKO_PRIVATE_KEY, PyKCS11.CKO_PUBLIC_KEY)]
        records = len(session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA),
                                           (PyKCS11.CKA_APPLICATION, "p11kms")]))
    finally:
        session.logout()
        session.closeSession()
    aes = [(label, cka_id) for label, cka_id, kt in secret if kt == PyKCS11.CKK_AES]
    eq(len(aes), 1, "AES keys in the token (the root only; labels %r)"
       % sorted(label for label, _ in aes)[:10])
    check(re.match(r"^%s\d+$" % ROOT_PREFIX, aes[0][0]), "the root key's label: %r" % aes[0][0])
    eq(len(aes[0][1]), 16, "the root key's CKA_ID length")
    eq(aes[0][1], C.root_cka_id, "the token's root key is the one the database names")
    eq(sorted((label, kt) for label, _, kt in secret if kt != PyKCS11.CKK_AES),
       [(AUDIT_KEY_LABEL, PyKCS11.CKK_GENERIC_SECRET)], "the token's other secret keys")
    eq(others, [0, 0], "private and public key objects in the token")
    eq(records, 0, "data objects of the old record layout (CKA_APPLICATION p11kms)")


def verify_database():
    """The database after a crash: sound, complete rows, counters not gone back."""
    db = sqlite3.connect("file:%s?mode=ro" % C.database, uri=True, timeout=30)
    try:
        eq(db.execute("PRAGMA integrity_check").fetchall(), [("ok",)], "PRAGMA integrity_check")
        eq(db.execute("PRAGMA foreign_key_check").fetchall(), [], "PRAGMA foreign_key_check")
        roots = db.execute("SELECT id, cka_id, state FROM roots").fetchall()
        eq(len(roots), 1, "roots rows")
        root_id, C.root_cka_id, state = roots[0][0], bytes(roots[0][1]), roots[0][2]
        eq(state, 1, "the root's state (current)")
        versions = db.execute("SELECT key_id, vid, reserved, bound, root_id, length(wrapped), "
                              "typeof(wrapped) FROM versions").fetchall()
        # every key has the version its row calls current (no half-made key, no lost version)
        headless = db.execute("SELECT hex(id) FROM keys WHERE state <> 3 AND NOT EXISTS "
                              "(SELECT 1 FROM versions WHERE key_id = keys.id AND "
                              "vid = keys.current_vid)").fetchall()
        per_key = db.execute("SELECT max(c) FROM (SELECT count(*) AS c FROM versions "
                             "GROUP BY key_id)").fetchone()[0] or 0
    finally:
        db.close()
    eq(headless, [], "keys whose current version has no row")
    bad = [(uuid.UUID(bytes=bytes(k)).hex, vid, n, t) for k, vid, _, _, _, n, t in versions
           if (t, n) != ("blob", WRAPPED_LEN)]
    eq(bad[:5], [], "versions rows without a %d-byte wrapped value" % WRAPPED_LEN)
    eq(sorted({r[4] for r in versions}), [root_id], "roots the versions are wrapped under")
    eq(sorted({r[3] for r in versions}), [USAGE_BOUND], "versions' bound")
    now = {(bytes(k), vid): reserved for k, vid, reserved, _, _, _, _ in versions}
    with C.lock:
        uses = dict(C.uses)
    short = {}
    for version, n in uses.items():
        key, vid = version[:16], int.from_bytes(version[16:20], "big")
        if now.get((key, vid), -1) < n:
            short["%s/%d" % (uuid.UUID(bytes=key), vid)] = (now.get((key, vid)), n)
    eq(short, {}, "versions whose reserved (read, seen issued) is below the blobs issued under "
       "them")
    back = {"%s/%d" % (uuid.UUID(bytes=k), vid): (was, now.get((k, vid)))
            for (k, vid), was in C.reserved.items() if now.get((k, vid), -1) < was}
    eq(back, {}, "versions whose reserved went down since the last restart (was, now)")
    C.reserved = now
    C.stats["max_versions"] = max(C.stats["max_versions"], per_key)


def verify(endpoint, every_listed_key=False):
    """Every recorded blob decrypts to its plaintext, every key answers
    GenerateDataKey, every alias points where it may, the database and the
    token hold what they should; returns the key ids ListKeys answers."""
    # No change without its audit record: the start settled what the kill left open.
    h.check_audit_changes([C.config + ".audit.log"], C.database)
    listed = list_keys(endpoint)
    missing = sorted(set(C.keys) - set(listed))
    eq(missing, [], "keys created (answered 200) but missing from ListKeys")
    verify_database()
    verify_token()
    keys = listed if every_listed_key else list(C.keys)
    with concurrent.futures.ThreadPoolExecutor(VERIFY_THREADS) as pool:
        blobs = [pool.submit(verify_blob, endpoint, b) for b in C.blobs]
        gdks = [pool.submit(verify_key, endpoint, k) for k in keys]
        aliases = [pool.submit(verify_alias, endpoint, a) for a in ALIASES]
        for f in blobs + gdks:
            f.result()
        seen = dict(f.result() for f in aliases)
    C.stats["decrypts_verified"] += len(blobs)
    C.stats["gdk_verified"] += len(gdks)
    for name in ALIASES:
        st = C.aliases[name]
        allowed = st.allowed()
        check(seen[name] in allowed, "%s points at %s; allowed: %r (confirmed %s, in flight %r)"
              % (name, seen[name], allowed, st.confirmed, st.in_flight))
        if st.in_flight:
            key = "alias_moves_resolved_old" if seen[name] == st.confirmed else \
                "alias_moves_resolved_new"
            C.stats[key] += 1
        st.confirmed = seen[name]
        st.in_flight = set()
    # Uses are reserved durably before they are spent, so no crash lets a
    # version wrap more than usage_bound times (nor reuses a reservation).
    over = {v.hex(): n for v, n in C.uses.items() if n > USAGE_BOUND}
    eq(over, {}, "key versions that wrapped more than usage_bound = %d times" % USAGE_BOUND)
    shared = {v.hex(): sum(n for n in ivs.values() if n > 1)
              for v, ivs in C.ivs.items() if any(n > 1 for n in ivs.values())}
    eq(shared, {}, "key versions under which two blobs share an IV")
    return listed


# ---- the burst ----------------------------------------------------------------


class Burst:
    """Worker threads sending requests until the server dies under them."""

    def __init__(self, endpoint, round_no, seed):
        self.endpoint = endpoint
        self.round = round_no
        self.seed = seed
        self.errors = []      # answers other than 200: none are expected
        self.threads = []

    def run(self, fn, n, pause=None):
        """Runs fn(rng, n) for n = 0, 1, ... in a thread, pausing a random
        time in pause (seconds) between calls."""
        rng = random.Random("%d-%s-%d" % (self.seed, fn.__name__, n))
        t = threading.Thread(target=self._loop, args=(fn, rng, pause), daemon=True)
        self.threads.append(t)
        t.start()

    def _loop(self, fn, rng, pause):
        n = 0
        while True:
            if n and pause:
                time.sleep(rng.uniform(*pause))
            try:
                if not fn(rng, n):
                    return
            except ConnectionRefusedError:
                with C.lock:
                    C.stats["refused"] += 1
                return  # sent after the kill: never reached the server
            except (OSError, http.client.HTTPException):
                with C.lock:
                    C.stats["in_flight"] += 1
                    name = fn.__name__.split("_crash")[0]
                    C.stats["cut"][name] = C.stats["cut"].get(name, 0) + 1
                return  # the kill cut this request
            except BaseException as e:  # noqa: B902 - reported by the round
                self.errors.append("%s: %r" % (fn.__name__, e))
                return
            n += 1

    def answered(self, op, r):
        with C.lock:
            C.stats["answered"][op] = C.stats["answered"].get(op, 0) + 1
        if r.status != 200:
            self.errors.append("%s answered HTTP %d %r" % (op, r.status, r.body[:300]))
            return None
        return r.json() if r.body else {}

    def some_key(self, rng):
        with C.lock:
            return rng.choice(C.keys)

    def context(self, rng, n):
        return {"round": str(self.round), "n": str(n), "r": "%08x" % rng.getrandbits(32)}

    # one function per kind of work; each returns False to stop its thread

    def create_key(self, rng, n):
        doc = self.answered("CreateKey", call(self.endpoint, "CreateKey",
                                              {"Description": "crash round %d" % self.round}))
        if doc is None:
            return False
        with C.lock:
            C.keys.append(doc["KeyMetadata"]["KeyId"])
        return True

    def rotate(self, rng, n):
        key = self.some_key(rng)
        doc = self.answered("RotateKeyOnDemand",
                            call(self.endpoint, "RotateKeyOnDemand", {"KeyId": key}))
        if doc is None:
            return False
        eq(doc.get("KeyId"), arn(key), "RotateKeyOnDemand KeyId")
        return True

    def generate(self, rng, n):
        key = self.some_key(rng)
        ctx = self.context(rng, n)
        params = {"KeyId": rng.choice([key, arn(key)]), "KeySpec": "AES_256",
                  "EncryptionContext": ctx}
        doc = self.answered("GenerateDataKey", call(self.endpoint, "GenerateDataKey", params))
        if doc is None:
            return False
        eq(doc["KeyId"], arn(key), "GenerateDataKey KeyId")
        blob = base64.b64decode(doc["CiphertextBlob"])
        eq(blob[1:17], uuid.UUID(key).bytes, "the blob names its key")
        with C.lock:
            count_use(blob)
            C.blobs.append((key, blob, base64.b64decode(doc["Plaintext"]), ctx))
        return True

    def encrypt(self, rng, n):
        key = self.some_key(rng)
        ctx = self.context(rng, n)
        plaintext = rng.randbytes(rng.randint(1, 64))
        doc = self.answered("Encrypt", call(self.endpoint, "Encrypt", {
            "KeyId": key, "Plaintext": b64(plaintext), "EncryptionContext": ctx}))
        if doc is None:
            return False
        eq(doc["KeyId"], arn(key), "Encrypt KeyId")
        blob = base64.b64decode(doc["CiphertextBlob"])
        eq(blob[1:17], uuid.UUID(key).bytes, "the blob names its key")
        with C.lock:
            count_use(blob)
            C.blobs.append((key, blob, plaintext, ctx))
        return True

    def move_aliases(self, names):
        """One thread per group of aliases, so an alias has at most one change
        in flight and the order of its confirmed changes is known."""
        def alias_change(rng, n):
            name = names[n % len(names)]
            st = C.aliases[name]
            target = self.some_key(rng)
            if st.confirmed is None:
                op, params = "CreateAlias", {"AliasName": name, "TargetKeyId": target}
            elif rng.random() < ALIAS_DELETE_SHARE:
                op, params, target = "DeleteAlias", {"AliasName": name}, None
            else:
                op, params = "UpdateAlias", {"AliasName": name, "TargetKeyId": target}
            st.in_flight.add(target)
            try:
                r = call(self.endpoint, op, params)
            except ConnectionRefusedError:
                st.in_flight.discard(target)  # not sent: cannot have landed
                raise
            doc = self.answered(op, r)
            if doc is None:
                return False
            eq(doc, {}, "%s answers an empty body" % op)
            st.confirmed = target
            st.in_flight = set()
            return True
        alias_change.__name__ = "alias_change_" + "_".join(n.split("/")[1] for n in names)
        return alias_change

    def start_all(self):
        # Key creations, rotations, alias changes and the reservations of
        # GenerateDataKey and Encrypt (every usage_block uses) keep the
        # database busy with write transactions; the pauses only bound how
        # many keys, versions and blobs each round adds, as every later round
        # checks them all.
        self.run(self.create_key, 0, CREATE_PAUSE)
        self.run(self.rotate, 0, ROTATE_PAUSE)
        self.run(self.generate, 0, WRAP_PAUSE)
        self.run(self.generate, 1, WRAP_PAUSE)
        self.run(self.encrypt, 0, WRAP_PAUSE)
        self.run(self.move_aliases(ALIASES[0::2]), 0, ALIAS_PAUSE)
        self.run(self.move_aliases(ALIASES[1::2]), 0, ALIAS_PAUSE)

    def join(self):
        for t in self.threads:
            t.join(40)
            check(not t.is_alive(), "a burst thread did not end after the kill")


# ---- tests ----------------------------------------------------------------------


@test
def test_initial_keys():
    endpoint = start()
    for _ in range(INITIAL_KEYS):
        doc = ok(call(endpoint, "CreateKey", {"Description": "crash initial"}), "CreateKey")
        C.keys.append(doc["KeyMetadata"]["KeyId"])
    verify(endpoint)
    C.server.stop()
    C.server = None


@test
def test_kill_during_writes():
    started = time.monotonic()
    for n in range(ROUNDS):
        if n and n % 10 == 0:
            h.diag("round %d: %.1f s, %d keys, %d blobs, %d versions reserved under"
                   % (n, time.monotonic() - started, len(C.keys), len(C.blobs), len(C.reserved)))
        endpoint = start()
        try:
            verify(endpoint)
        except BaseException:
            h.diag("verification failed after kill %d (round %d)" % (C.stats["kills"], n))
            raise
        burst = Burst(endpoint, n, C.rng.getrandbits(32))
        burst.start_all()
        time.sleep(C.rng.uniform(*KILL_DELAY_MS) / 1000.0)
        crash()
        burst.join()
        eq(burst.errors, [], "answers other than 200 in round %d" % n)
    h.diag("kills %d; requests cut by a kill %d (%r), refused after it %d; answered %r" % (
        C.stats["kills"], C.stats["in_flight"], C.stats["cut"], C.stats["refused"],
        C.stats["answered"]))


@test
def test_final_restart_and_verification():
    endpoint = start()
    listed = verify(endpoint, every_listed_key=True)
    # A key beyond the answered ones can only come from a CreateKey a kill cut.
    extra = set(listed) - set(C.keys)
    check(len(extra) <= C.stats["cut"].get("create_key", 0),
          "%d keys listed that no CreateKey answered, %d CreateKey calls cut"
          % (len(extra), C.stats["cut"].get("create_key", 0)))
    h.diag("after the final start: %d keys listed (%d answered), %d blobs, aliases %r"
           % (len(listed), len(C.keys), len(C.blobs),
              {a: C.aliases[a].confirmed for a in ALIASES}))
    h.diag("%d key versions wrapped under, at most %d times each (usage_bound %d); at most %d "
           "versions per key" % (len(C.uses), max(C.uses.values()), USAGE_BOUND,
                                 C.stats["max_versions"]))
    wasted = sum(C.reserved.get((v[:16], int.from_bytes(v[16:20], "big")), 0) - n
                 for v, n in C.uses.items())
    # Expected to be large: every start loses the unspent rest of each key's
    # block, and each verification's GenerateDataKey reserves a new one.
    h.diag("uses reserved beyond the blobs seen issued (the rest of blocks lost at a kill or a "
           "stop, requests cut): %d" % wasted)
    # What the server logged over all runs, numbers blanked, with counts.
    kinds = {}
    for line in C.server.stderr_text().splitlines():
        text = line.split(" p11kmsd ", 1)[-1]
        text = re.sub(r"\b[0-9a-f]{8}(-[0-9a-f-]{27}|\.\.\.)|\b\d+\b", "#", text)
        if not re.match(r"info: (token opened|ready on|stopping on|key store opened|audit log)",
                        text):
            kinds[text] = kinds.get(text, 0) + 1
    h.diag("p11kmsd's log over all runs, besides start and stop lines:\n" + "\n".join(
        "%5d x %s" % (n, text[:160]) for text, n in sorted(kinds.items())[:30]))
    h.diag("verified: %d decrypts, %d GenerateDataKey on keys; alias changes cut by a kill: "
           "%d landed, %d did not" % (C.stats["decrypts_verified"], C.stats["gdk_verified"],
                                       C.stats["alias_moves_resolved_new"],
                                       C.stats["alias_moves_resolved_old"]))


@test
def test_clean_stop_after_all():
    """The last server stops cleanly on SIGTERM, and a start after that
    (without init) still finds everything."""
    check(C.server is not None, "the final p11kmsd is running")
    C.server.stop()
    C.server = None
    endpoint = start()
    verify(endpoint)
    C.server.stop()
    C.server = None


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
