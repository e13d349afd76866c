#!/usr/bin/python3
"""Crash safety (DESIGN §5: "a kill -9 at any instant leaves every key usable
and every blob ever issued decryptable"): one token, one p11kmsd killed with
SIGKILL in the middle of a burst of concurrent writes, P11KMS_CRASH_ROUNDS
times (default 50), restarted on the same token and checked after every
restart; finally the token itself is read through PyKCS11 for abandoned key
objects and left-over record generations. TAP output.

P11KMS_CRASH_SEED fixes the random choices (kill delays, operations, targets);
the interleaving with the server still varies from run to run.
"""

import base64
import concurrent.futures
import hashlib
import http.client
import os
import random
import re
import secrets
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

ROUNDS = int(os.environ.get("P11KMS_CRASH_ROUNDS") or 50)
SEED = int(os.environ.get("P11KMS_CRASH_SEED") or secrets.randbits(32))
SETTINGS = {
    "refresh_ms": "200",
    "day_seconds": "1",
    "rotation_min_days": "1",
    "max_on_demand_rotations": "100000",
    "usage_bound": "50",
    "usage_block": "3",
    "orphan_grace_seconds": "0",  # one node: an abandoned object may go at once
    "full_refresh_seconds": "1",
}
USAGE_BOUND = int(SETTINGS["usage_bound"])
ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
ALIASES = ["alias/crash-%d" % i for i in range(4)]
INITIAL_KEYS = 3
KILL_DELAY_MS = (20, 400)
CREATE_PAUSE = (0.08, 0.2)  # seconds between CreateKey calls of a burst
WRAP_PAUSE = (0.01, 0.04)   # between GenerateDataKey or Encrypt calls
VERIFY_THREADS = 8
KEK_PREFIX = "p11kms-kek:"
MAX_RECORDS = 3  # per key or alias


class Ctx:
    ws = None
    token = None
    principal = None
    config = None
    server = None
    rng = None
    lock = None
    keys = None       # key ids whose CreateKey was answered 200
    blobs = None      # [(key id, blob bytes, plaintext bytes, context dict)]
    uses = None       # key uuid bytes || version id -> wraps answered under it
    aliases = None    # name -> AliasState
    stats = None


C = Ctx()


class AliasState:
    """What an alias may point at: the target last seen or confirmed, plus the
    targets of moves that got no answer (a kill caught them in flight)."""

    def __init__(self):
        self.confirmed = None  # key id, or None while the alias does not exist
        self.in_flight = set()

    def allowed(self):
        return {self.confirmed} | self.in_flight


def setup():
    C.ws = h.Workspace(prefix="p11kms-crash-")
    C.principal = h.new_principal("crasher")
    C.token, C.config = h.token_and_config(C.ws, "p11kms-crash", C.principal, **SETTINGS)
    C.rng = random.Random(SEED)
    C.lock = threading.Lock()
    C.keys = []
    C.blobs = []
    C.uses = {}
    C.aliases = {name: AliasState() for name in ALIASES}
    C.stats = {"kills": 0, "decrypts_verified": 0, "gdk_verified": 0, "in_flight": 0, "refused": 0,
               "answered": {}, "alias_moves_resolved_new": 0, "alias_moves_resolved_old": 0}
    h.diag("P11KMS_CRASH_SEED=%d P11KMS_CRASH_ROUNDS=%d" % (SEED, ROUNDS))


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
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))
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


def count_use(blob):
    """Counts a wrap under the blob's key version (caller holds C.lock)."""
    version = blob[1:21]
    C.uses[version] = C.uses.get(version, 0) + 1


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


def verify(endpoint, every_listed_key=False):
    """Every recorded blob decrypts to its plaintext, every key answers
    GenerateDataKey, every alias points where it may; returns the key ids
    ListKeys answers."""
    listed = list_keys(endpoint)
    missing = sorted(set(C.keys) - set(listed))
    eq(missing, [], "keys created (answered 200) but missing from ListKeys")
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
    return listed


# ---- the burst ----------------------------------------------------------------


class Burst:
    """Worker threads sending writes until the server dies under them."""

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
        with C.lock:
            count_use(blob)
            C.blobs.append((key, blob, plaintext, ctx))
        return True

    def move_aliases(self, names):
        """One thread per group of aliases, so an alias has at most one move
        in flight and the order of its confirmed moves is known."""
        def move_alias(rng, n):
            name = names[n % len(names)]
            st = C.aliases[name]
            target = self.some_key(rng)
            op = "CreateAlias" if st.confirmed is None else "UpdateAlias"
            st.in_flight.add(target)
            try:
                r = call(self.endpoint, op, {"AliasName": name, "TargetKeyId": target})
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
        move_alias.__name__ = "move_alias_" + "_".join(n.split("/")[1] for n in names)
        return move_alias

    def start_all(self):
        # Rotations, alias moves and the reservations of GenerateDataKey and
        # Encrypt (every usage_block uses) keep the token busy with writes;
        # the pauses only bound how many keys and blobs each round adds, as
        # every later round checks them all.
        self.run(self.create_key, 0, CREATE_PAUSE)
        self.run(self.rotate, 0)
        self.run(self.generate, 0, WRAP_PAUSE)
        self.run(self.generate, 1, WRAP_PAUSE)
        self.run(self.encrypt, 0, WRAP_PAUSE)
        self.run(self.move_aliases(ALIASES[0::2]), 0)
        self.run(self.move_aliases(ALIASES[1::2]), 0)

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
            h.diag("round %d: %.1f s, %d keys, %d blobs" % (n, time.monotonic() - started,
                                                           len(C.keys), len(C.blobs)))
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
    h.diag("kills %d; requests cut by a kill %d, refused after it %d; answered %r" % (
        C.stats["kills"], C.stats["in_flight"], C.stats["refused"], C.stats["answered"]))


@test
def test_final_restart_and_verification():
    endpoint = start()
    listed = verify(endpoint, every_listed_key=True)
    h.diag("after the final start: %d keys listed (%d confirmed), %d blobs, aliases %r"
           % (len(listed), len(C.keys), len(C.blobs),
              {a: C.aliases[a].confirmed for a in ALIASES}))
    h.diag("%d key versions wrapped under, at most %d times each (usage_bound %d)"
           % (len(C.uses), max(C.uses.values()), USAGE_BOUND))
    # What the server logged over all runs, numbers blanked, with counts.
    kinds = {}
    for line in C.server.stderr_text().splitlines():
        text = line.split(" p11kmsd ", 1)[-1]
        text = re.sub(r"\b[0-9a-f]{8}(-[0-9a-f-]{27}|\.\.\.)|\b\d+\b", "#", text)
        if not re.match(r"info: (token opened|ready on|stopping on)", text):
            kinds[text] = kinds.get(text, 0) + 1
    h.diag("p11kmsd's log over all runs, besides start and stop lines:\n" + "\n".join(
        "%5d x %s" % (n, text[:160]) for text, n in sorted(kinds.items())[:30]))
    h.diag("verified: %d decrypts, %d GenerateDataKey on keys; alias moves cut by a kill: "
           "%d landed, %d did not" % (C.stats["decrypts_verified"], C.stats["gdk_verified"],
                                       C.stats["alias_moves_resolved_new"],
                                       C.stats["alias_moves_resolved_old"]))


def token_objects(session):
    import PyKCS11
    keks = []
    for o in session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]):
        label, cka_id = session.getAttributeValue(o, [PyKCS11.CKA_LABEL, PyKCS11.CKA_ID],
                                                  allAsBinary=True)
        keks.append((bytes(label).decode("utf-8", "replace"), bytes(cka_id)))
    data = []
    for o in session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA),
                                  (PyKCS11.CKA_APPLICATION, "p11kms")]):
        label, oid = session.getAttributeValue(o, [PyKCS11.CKA_LABEL, PyKCS11.CKA_OBJECT_ID],
                                               allAsBinary=True)
        data.append((bytes(label).decode("utf-8", "replace"), bytes(oid)))
    return keks, data


@test
def test_token_holds_no_orphans():
    import PyKCS11

    check(C.server is not None, "the final p11kmsd is running")
    listed = set(list_keys(C.server.endpoint))
    os.environ["SOFTHSM2_CONF"] = C.token.conf
    lib = PyKCS11.PyKCS11Lib()
    lib.load(h.SOFTHSM_MODULE)
    slots = [s for s in lib.getSlotList(tokenPresent=True)
             if lib.getTokenInfo(s).label.strip() == C.token.label]
    eq(len(slots), 1, "slots holding token %s" % C.token.label)
    # The start-up refresh already swept (orphan_grace_seconds = 0); the
    # full refresh every second sweeps again: poll a little in case.
    deadline = time.monotonic() + 5
    while True:
        session = lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION)
        session.login(C.token.user_pin())
        try:
            keks, data = token_objects(session)
        finally:
            session.logout()
            session.closeSession()
        orphans = []
        for label, cka_id in keks:
            if not label.startswith(KEK_PREFIX):
                continue
            parts = label.split(":")
            eq(len(parts), 4, "KEK label %r" % label)
            eq(cka_id, uuid.UUID(parts[1]).bytes + int(parts[2]).to_bytes(4, "big"),
               "CKA_ID of %s" % label)
            if parts[1] not in listed:
                orphans.append(label)
        if not orphans or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    eq(orphans, [], "key objects of keys ListKeys does not know")
    # Records: a change removes the generations it read, so a kill leaves at
    # most a few behind, and the next change of that key or alias removes them.
    per_key, per_alias, history, markers = {}, {}, {}, 0
    for label, oid in data:
        if label.startswith("p11kms-key:"):
            key_id = label.split(":")[1]
            eq(oid, uuid.UUID(key_id).bytes, "CKA_OBJECT_ID of %s" % label)
            per_key[key_id] = per_key.get(key_id, 0) + 1
        elif label.startswith("p11kms-alias:"):
            name = label[len("p11kms-alias:"):].rsplit(":", 2)[0]
            eq(oid, hashlib.sha256(b"p11kms alias\n" + name.encode()).digest()[:16],
               "CKA_OBJECT_ID of %s" % label)
            per_alias[name] = per_alias.get(name, 0) + 1
        elif label.startswith("p11kms-history:"):
            # a key's old versions (a crash between writing one and the record change that
            # drops them from the record leaves a duplicate, which readers merge)
            key_id = label.split(":")[1]
            eq(oid, hashlib.sha256(b"p11kms history\n" + uuid.UUID(key_id).bytes).digest()[:16],
               "CKA_OBJECT_ID of %s" % label)
            history[key_id] = history.get(key_id, 0) + 1
        else:
            check(label.startswith("p11kms-marker:"), "unknown p11kms data object %r" % label)
            markers += 1
    eq(sorted(set(per_key) - listed), [], "records of keys ListKeys does not know")
    eq(sorted(set(history) - listed), [], "history objects of keys ListKeys does not know")
    eq(sorted(per_alias), sorted(ALIASES), "aliases with records")
    h.diag("token: %d KEK objects for %d keys; records: %d of keys (at most %d per key), "
           "%d of aliases (at most %d per alias); %d history objects; %d change marker(s)"
           % (sum(1 for lab, _ in keks if lab.startswith(KEK_PREFIX)), len(listed),
              sum(per_key.values()), max(per_key.values()), sum(per_alias.values()),
              max(per_alias.values()), sum(history.values()), markers))
    crowded = {k: n for k, n in list(per_key.items()) + list(per_alias.items())
               if n > MAX_RECORDS}
    eq(crowded, {}, "keys or aliases with more than %d records (old generations left)"
       % MAX_RECORDS)

if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
