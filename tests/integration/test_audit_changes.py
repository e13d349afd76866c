#!/usr/bin/python3
"""No change without its audit record (src/server/audit.h: intent, outcome
and recovery lines; the request id stored in change_requests by the change's
transaction), against a real p11kmsd on a fresh SoftHSM2 token and SQLite
database:

- the audit log cannot be written at the moment of a change (rotated onto
  /dev/full, which takes no byte): CreateKey, DisableKey, CreateAlias and
  PutKeyPolicy are refused with 503 DependencyTimeoutException and the
  database holds none of them; once the log can be written they go through;
- p11kmsd killed with SIGKILL at a random instant of bursts of changes
  (CreateKey, aliases, Enable/DisableKey, PutKeyPolicy, on-demand rotations,
  deletion scheduled and cancelled) and of GenerateDataKey calls that rotate
  keys at their usage bound (the server's own changes), then restarted,
  P11KMS_AUDIT_CRASH_ROUNDS times (default 12): after each start every change
  the database holds has an intent line and an outcome or recovery line
  saying "committed", every line saying "committed" names a change the
  database holds and none saying "not committed" does; `p11kms-audit verify
  --config` finds the log intact.

TAP output. P11KMS_AUDIT_CRASH_SEED fixes the random choices.
"""

import json
import os
import random
import secrets
import signal
import sqlite3
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

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.normpath(os.path.join(HERE, "..", ".."))
AUDIT = os.environ.get("P11KMS_AUDIT") or os.path.join(BUILD, "p11kms-audit")
ROUNDS = int(os.environ.get("P11KMS_AUDIT_CRASH_ROUNDS") or 12)
SEED = int(os.environ.get("P11KMS_AUDIT_CRASH_SEED") or secrets.randbits(32))
SETTINGS = {
    "day_seconds": "1",
    "pending_min_days": "1",
    "max_on_demand_rotations": "100000",
    "usage_bound": "12",  # GenerateDataKey rotates keys at their bound: the server's own changes
    "usage_block": "3",
    "rate_manage": "0",   # unlimited: the bursts outrun the default management rate
    "rate_crypto": "0",
    "refresh_ms": "200",
}
KILL_DELAY_MS = (30, 500)
ALIASES = ["alias/audit-%d" % i for i in range(3)]


class Ctx:
    ws = None
    token = None
    principal = None
    config = None
    database = None
    log = None
    server = None
    rng = None
    keys = None
    policy = None  # the keys' default policy, put back as it is by PutKeyPolicy
    stats = None


C = Ctx()


def setup():
    C.ws = h.Workspace(prefix="p11kms-auditchg-")
    C.principal = h.new_principal("auditor")
    C.token, C.config = h.token_and_config(C.ws, "p11kms-audit-changes", C.principal, **SETTINGS)
    C.database = C.config + ".db"
    C.log = C.config + ".audit.log"
    C.rng = random.Random(SEED)
    C.keys = []
    C.stats = {"kills": 0, "recovery": 0, "intents": 0, "answered": 0, "refused": 0}
    h.diag("P11KMS_AUDIT_CRASH_SEED=%d P11KMS_AUDIT_CRASH_ROUNDS=%d" % (SEED, ROUNDS))
    h.init_database(C.config, C.token)


def teardown():
    h.finish(T, C.ws, C.server)


def start():
    if C.server:  # left running by a test that failed
        C.server.kill()
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"), init=False)
    return C.server.endpoint


def call(endpoint, op, params):
    return h.kms_call(endpoint, op, params, C.principal)


def ok(r, what):
    if r.status != 200:
        raise AssertionError("%s: HTTP %d %r" % (what, r.status, r.body[:300]))
    return r.json() if r.body else {}


def db_one(sql, *args):
    db = sqlite3.connect("file:%s?mode=ro" % C.database, uri=True, timeout=30)
    try:
        return db.execute(sql, args).fetchone()
    finally:
        db.close()


def log_files():
    """The log's files, oldest first (audit.log.N ... audit.log)."""
    d, base = os.path.split(C.log)
    rotated = sorted((int(n[len(base) + 1:]), n) for n in os.listdir(d)
                     if n.startswith(base + ".") and n[len(base) + 1:].isdigit())
    return [os.path.join(d, n) for _, n in reversed(rotated)] + [C.log]


def verify_log():
    env = h.server_env({"SOFTHSM2_CONF": C.token.conf})
    r = subprocess.run([AUDIT, "verify", "--config", C.config] + log_files(), env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=120)
    eq(r.returncode, 0, "p11kms-audit verify --config (stdout %r, stderr %r)"
       % (r.stdout[-600:], r.stderr[-600:]))
    check(r.stdout.startswith("intact: "), "verify: %r" % r.stdout[:300])
    return r.stdout


def last_kind(path):
    with open(path) as f:
        lines = f.readlines()
    d = json.loads(lines[-1]) if lines else {}
    return d.get("type"), d.get("kind")


# ---- the log cannot be written ------------------------------------------------


@test
def test_unwritable_log_refuses_changes():
    endpoint = start()
    key = ok(call(endpoint, "CreateKey", {"Description": "before"}), "CreateKey")["KeyMetadata"]
    C.keys.append(key["KeyId"])
    C.policy = ok(call(endpoint, "GetKeyPolicy", {"KeyId": key["KeyId"], "PolicyName": "default"}),
                  "GetKeyPolicy")["Policy"]
    key_before = db_one("SELECT state, policy, rev FROM keys")
    keys_before = db_one("SELECT count(*) FROM keys")[0]
    changes_before = db_one("SELECT count(*) FROM change_requests")[0]
    eq((keys_before, changes_before), (1, 1), "keys and recorded changes after one CreateKey")
    # Rotated onto a device that takes no byte: every write fails with ENOSPC.
    os.rename(C.log, C.log + ".1")
    os.symlink("/dev/full", C.log)
    try:
        C.server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and last_kind(C.log + ".1") != ("checkpoint", "rotate"):
            time.sleep(0.05)
        eq(last_kind(C.log + ".1"), ("checkpoint", "rotate"), "the old file sealed on SIGHUP")
        refused = [
            ("CreateKey", {"Description": "during"}),
            ("DisableKey", {"KeyId": key["KeyId"]}),
            ("CreateAlias", {"AliasName": "alias/refused", "TargetKeyId": key["KeyId"]}),
            ("PutKeyPolicy", {"KeyId": key["KeyId"], "PolicyName": "default", "Policy": C.policy}),
        ]
        for op, params in refused:
            r = call(endpoint, op, params)
            eq((r.status, r.json().get("__type")), (503, "DependencyTimeoutException"),
               "%s while the log cannot be written" % op)
        eq(db_one("SELECT count(*) FROM keys")[0], keys_before, "keys in the database")
        eq(db_one("SELECT count(*) FROM change_requests")[0], changes_before,
           "changes recorded in the database")
        eq(db_one("SELECT count(*) FROM aliases")[0], 0, "aliases in the database")
        eq(db_one("SELECT state, policy, rev FROM keys"), key_before,
           "the key's row as it was (Enabled, its policy, its revision)")
    finally:
        os.unlink(C.log)
    # Writable again: the same changes go through, each with its lines.
    for op, params in [("CreateKey", {"Description": "after"}),
                       ("CreateAlias", {"AliasName": "alias/after", "TargetKeyId": key["KeyId"]}),
                       ("DisableKey", {"KeyId": key["KeyId"]}),
                       ("EnableKey", {"KeyId": key["KeyId"]})]:
        doc = ok(call(endpoint, op, params), op + " once the log is written again")
        if op == "CreateKey":
            C.keys.append(doc["KeyMetadata"]["KeyId"])
    seen, committed = h.check_audit_changes(log_files(), C.database)
    eq(len(committed), changes_before + 4, "changes recorded in the database")
    eq(sorted(e["intent"] for e in seen.values()), [1] * len(committed),
       "one intent line each, none for the refused changes")
    C.server.stop()
    C.server = None
    verify_log()


# ---- SIGKILL at random instants -------------------------------------------------


class Burst:
    """Threads making changes (and wrapping under keys) until the server dies."""

    def __init__(self, endpoint, seed):
        self.endpoint = endpoint
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.threads = []
        self.lock = threading.Lock()
        self.unexpected = []

    def _loop(self, fn, seed):
        rng = random.Random(seed)
        while not self.stop.is_set():
            try:
                r = fn(rng)
            except Exception:  # the server is gone (OSError, http.client's)
                return
            with self.lock:
                if r is None:
                    continue
                if r.status == 200:
                    C.stats["answered"] += 1
                elif r.status in (400, 404, 409) and r.json().get("__type") in (
                        "KMSInvalidStateException", "AlreadyExistsException", "NotFoundException",
                        "DisabledException"):
                    C.stats["refused"] += 1  # a race between the threads' changes
                else:
                    self.unexpected.append((r.status, r.body[:200]))
            time.sleep(rng.uniform(0.0, 0.03))

    def key(self, rng):
        return rng.choice(C.keys)

    def create(self, rng):
        r = call(self.endpoint, "CreateKey", {"Description": "burst"})
        if r.status == 200:
            with self.lock:
                C.keys.append(r.json()["KeyMetadata"]["KeyId"])
        return r

    def alias(self, rng):
        name, target = rng.choice(ALIASES), self.key(rng)
        op = rng.choice(["CreateAlias", "UpdateAlias", "DeleteAlias"])
        params = {"AliasName": name} if op == "DeleteAlias" else \
            {"AliasName": name, "TargetKeyId": target}
        return call(self.endpoint, op, params)

    def state(self, rng):
        op = rng.choice(["DisableKey", "EnableKey", "EnableKey", "PutKeyPolicy",
                         "RotateKeyOnDemand", "ScheduleKeyDeletion", "CancelKeyDeletion"])
        params = {"KeyId": self.key(rng)}
        if op == "PutKeyPolicy":
            params.update(PolicyName="default", Policy=C.policy)
        if op == "ScheduleKeyDeletion":
            params["PendingWindowInDays"] = 1  # a second: the server deletes it itself
        return call(self.endpoint, op, params)

    def wrap(self, rng):
        return call(self.endpoint, "GenerateDataKey", {"KeyId": self.key(rng),
                                                       "KeySpec": "AES_256"})

    def start(self):
        for fn in (self.create, self.alias, self.state, self.state, self.wrap, self.wrap):
            t = threading.Thread(target=self._loop, args=(fn, self.rng.getrandbits(32)),
                                 daemon=True)
            t.start()
            self.threads.append(t)

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)


def check_after_start():
    # The server's own changes (a deletion falling due) may be under way: a
    # change between its commit and its outcome line is seen again a moment later.
    for attempt in range(4):
        try:
            seen, committed = h.check_audit_changes(log_files(), C.database)
            break
        except AssertionError:
            if attempt == 3:
                raise
            time.sleep(0.5)
    C.stats["intents"] = sum(e["intent"] for e in seen.values())
    C.stats["recovery"] = sum(e["recovery"] for e in seen.values())
    verify_log()
    return seen, committed


def own_changes(endpoint):
    """The server's own changes, made for certain (the bursts spread their data keys over
    many keys and make them only by chance): a key used past its bound twice over rotates
    itself twice, and a key scheduled for deletion a second ahead is deleted by the server."""
    bound = int(SETTINGS["usage_bound"])
    key = ok(call(endpoint, "CreateKey", {"Description": "own rotations"}), "CreateKey")
    key = key["KeyMetadata"]["KeyId"]
    for i in range(2 * bound + 1):
        ok(call(endpoint, "GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"}),
           "GenerateDataKey %d" % i)
    doomed = ok(call(endpoint, "CreateKey", {"Description": "own deletion"}), "CreateKey")
    doomed = doomed["KeyMetadata"]["KeyId"]
    ok(call(endpoint, "ScheduleKeyDeletion", {"KeyId": doomed, "PendingWindowInDays": 1}),
       "ScheduleKeyDeletion")
    deadline = time.monotonic() + 20
    while call(endpoint, "DescribeKey", {"KeyId": doomed}).status != 404:
        check(time.monotonic() < deadline, "the key scheduled for deletion was deleted")
        time.sleep(0.2)


@test
def test_sigkill_at_random_instants():
    for n in range(ROUNDS):
        endpoint = start()
        check_after_start()
        burst = Burst(endpoint, C.rng.getrandbits(32))
        burst.start()
        time.sleep(C.rng.uniform(*KILL_DELAY_MS) / 1000.0)
        status = C.server.sigkill()
        C.server = None
        eq(status, -9, "p11kmsd killed by our SIGKILL in round %d" % n)
        C.stats["kills"] += 1
        burst.join()
        eq(burst.unexpected[:3], [], "answers other than 200 or a race's refusal in round %d" % n)
    endpoint = start()
    own_changes(endpoint)
    seen, committed = check_after_start()
    ops = {}
    for path in log_files():
        with open(path) as f:
            for line in f:
                d = json.loads(line)
                if d["type"] == "intent":
                    name = d["operation"] + (" (the server's own)" if d["source"] == "p11kmsd"
                                             else "")
                    ops[name] = ops.get(name, 0) + 1
    h.diag("%d kills; %d changes committed, %d intents, %d recovery lines; %d answered, %d "
           "refused by races; intents: %r" % (
               C.stats["kills"], len(committed), C.stats["intents"], C.stats["recovery"],
               C.stats["answered"], C.stats["refused"], sorted(ops.items())))
    check(len(committed) > ROUNDS, "changes were made: %d" % len(committed))
    # The server's own changes (rotations at the usage bound, deletions) are audited too.
    check(ops.get("RotateKey (the server's own)", 0) > 0, "rotations at the usage bound")
    check(ops.get("DeleteKey (the server's own)", 0) > 0, "deletions at their date")
    C.server.stop()
    C.server = None
    check_after_start()


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
