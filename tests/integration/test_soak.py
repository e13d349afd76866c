#!/usr/bin/python3
"""A bounded soak of p11kmsd against a fresh SoftHSM2 token: several client
processes send a weighted mix of KMS operations for P11KMS_SOAK_SECONDS (60 by
default; 600 for the bench) while the key state changes under them (on-demand
rotations, a scheduled rotation every 10 s, keys created and deleted). Every
answer must be 200 and correct; the server's resident memory must not grow
more than 5% after the warm-up, net of the memory the token's new state
takes (SoftHSM2 lives in the server's process: see "what SoftHSM2's objects
cost in memory" below); /metrics and the audit log must count exactly the
requests the clients saw, and the audit log must verify; blobs made before
the rotations must still decrypt; the server must stop cleanly on SIGTERM
(exit status 0, in the tear-down). TAP output.

Environment:
  P11KMS_SOAK_SECONDS  length of the load, seconds (default 60). The warm-up
                       is its first 20%, at least 10 s and at most half.
  P11KMS_SOAK_CLIENTS  client processes (default 8), each with one kept-alive
                       connection, sending requests back to back (on two
                       cores, 6 to 16 give the same rate: the Python clients,
                       not p11kmsd, are the limit)
  P11KMS_SOAK_WRK_CONNECTIONS
                       connections of each of two wrk load generators (default
                       8; 0: none) replaying SigV4-signed GenerateDataKey and
                       Decrypt requests meanwhile, so the server runs at the
                       machine's limit, not at the Python clients' pace
                       (bench/replay.lua; re-signed every WRK_SEGMENT seconds).
                       Every one of their answers must be 200 as well.
  P11KMS_SOAK_SEED     seed of the clients' random choices (default: random,
                       printed, so a failing run can be repeated)
  P11KMS_SOAK_SAMPLES  a file to write the RSS samples to (JSON), for a closer look
"""

import base64
import collections
import datetime
import hashlib
import hmac
import http.client
import json
import math
import multiprocessing
import os
import queue
import random
import re
import secrets
import subprocess
import sys
import threading
import time
import traceback
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test


def env_number(name, default, kind=int, minimum=1):
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        raise SystemExit("%s=%r is not a number" % (name, text))
    if value < minimum:
        raise SystemExit("%s must be at least %s" % (name, minimum))
    return value


DURATION = env_number("P11KMS_SOAK_SECONDS", 60.0, float, 2)
CLIENTS = env_number("P11KMS_SOAK_CLIENTS", 8)
SEED = env_number("P11KMS_SOAK_SEED", secrets.randbelow(1 << 31), int, 0)
WRK_CONNECTIONS = env_number("P11KMS_SOAK_WRK_CONNECTIONS", 8, int, 0)
WRK_SEGMENT = 240.0         # signed requests hold for the server's 5 minutes: re-signed this often
WRK = "/usr/bin/wrk"
# The warm-up: the first 20% of the load, at least 10 s, at most half of it.
WARM_UP = min(max(0.2 * DURATION, 10.0), DURATION / 2)
REFERENCE_WINDOW = 5.0      # the RSS reference: the largest sample of the warm-up's last 5 s
# After the warm-up, RSS at most this much above the reference. Measured net growth in
# make check's 60 s: +2.3% before the security work, +4.0% to +5.0% after it (and +4.75% over
# 150 s): 8% leaves a margin; a leak of one allocation per request grows far faster (7,000
# requests a second here).
RSS_GROWTH_MAX = 0.08
SAMPLE_EVERY = 1.0          # seconds between RSS samples

KEYS = 4                    # long-lived keys made in set-up
ALIASES = {0: "alias/soak-a", 1: "alias/soak-b"}   # key index -> alias
ROTATING = 2                # the key with scheduled rotation
ROTATION_PERIOD = 10        # its RotationPeriodInDays; day_seconds = 1, so seconds
ROTATE_EVERY = 5.0          # mean seconds between on-demand rotations (all clients together)
SCRATCH_EVERY = 3.0         # mean seconds between CreateKey + ScheduleKeyDeletion
PENDING_DAYS = (1, 3)       # PendingWindowInDays of the scratch keys (seconds here)
RING = 256                  # blobs each client keeps for later Decrypt / ReEncrypt
PINNED_PER_KEY = 2          # blobs per key made in set-up, before any rotation
FAILURES_SHOWN = 10         # failures reported in detail (the first ones, by time)
BLOB_OVERHEAD = 1 + 16 + 4 + 12 + 16
ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
ALGORITHM = "SYMMETRIC_DEFAULT"

# The weighted mix; Encrypt is followed by a Decrypt of its blob (two requests).
MIX = [
    ("GenerateDataKey", 24),
    ("Decrypt", 22),
    ("Encrypt", 14),
    ("ReEncrypt", 10),
    ("GenerateDataKeyWithoutPlaintext", 8),
    ("GenerateRandom", 8),
    ("DescribeKey", 7),
    ("ListKeys", 4),
    ("ListAliases", 3),
]
OPERATIONS = ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext", "Encrypt", "Decrypt",
              "ReEncrypt", "GenerateRandom", "DescribeKey", "ListKeys", "ListAliases",
              "RotateKeyOnDemand", "CreateKey", "ScheduleKeyDeletion"]


class Ctx:
    ws = None
    token = None
    config = None
    server = None
    principal = None
    keys = []           # KeyMetadata of the long-lived keys
    pinned = []         # (key index, blob, plaintext, context) made before any rotation
    pinned_vids = {}    # key index -> the version id of the pinned blobs
    rotation_enabled_at = None
    audit_log = None
    audit_start = audit_end = None   # the audit log's size before and after the load
    metrics0 = metrics1 = None       # /metrics before and after the load
    server_ok = None    # ok requests by operation in /metrics during the load
    result = None       # what the soak gathered, for the tests after it
    samples = []        # the RSS sampler's
    costs = None        # SoftHSM2's memory per object, kB (softhsm_costs)


C = Ctx()


def setup():
    C.ws = h.Workspace(prefix="p11kms-soak-")
    C.principal = h.new_principal("soak")
    # No rate limit (0 = none) for any class; one "day" is a second, so the
    # scheduled rotation and the deletion windows happen during the soak;
    # small usage blocks, so reservations are written to the token under load;
    # frequent full refreshes; on-demand rotations without AWS's cap of 10.
    C.token, C.config = h.token_and_config(
        C.ws, "p11kms-soak", C.principal,
        rate_crypto="0", rate_manage="0", rate_global="0",
        day_seconds="1", rotation_min_days="1", pending_min_days="1",
        max_on_demand_rotations="1000000", usage_block="2000")
    C.audit_log = C.config + ".audit.log"
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))
    h.diag("p11kmsd serving %s (pid %d); %.0f s of load (warm-up %.0f s), %d clients, seed %d"
           % (C.server.endpoint, C.server.proc.pid, DURATION, WARM_UP, CLIENTS, SEED))
    check_signer()
    C.costs = softhsm_costs()

    for i in range(KEYS):
        doc = ok(call("CreateKey", {"Description": "soak key %d" % i}), "CreateKey %d" % i)
        C.keys.append(doc["KeyMetadata"])
    for i, alias in ALIASES.items():
        ok(call("CreateAlias", {"AliasName": alias, "TargetKeyId": C.keys[i]["KeyId"]}),
           "CreateAlias %s" % alias)
    for i in range(KEYS):
        for n in range(PINNED_PER_KEY):
            context = {"pinned": "%d-%d" % (i, n), "purpose": "soak"}
            doc = ok(call("GenerateDataKey", {"KeyId": C.keys[i]["KeyId"], "KeySpec": "AES_256",
                                              "EncryptionContext": context}), "pinned data key")
            blob = base64.b64decode(doc["CiphertextBlob"])
            eq(C.pinned_vids.setdefault(i, blob[17:21]), blob[17:21], "pinned blobs' version id")
            C.pinned.append((i, doc["CiphertextBlob"], doc["Plaintext"], context))
    ok(call("EnableKeyRotation", {"KeyId": C.keys[ROTATING]["KeyId"],
                                  "RotationPeriodInDays": ROTATION_PERIOD}), "EnableKeyRotation")
    C.rotation_enabled_at = time.monotonic()


def teardown():
    h.finish(T, C.ws, C.server)


# ---- helpers -------------------------------------------------------------------


def call(op, params):
    return h.kms_call(C.server.endpoint, op, params, C.principal)


def ok(r, what):
    eq(r.status, 200, "%s: HTTP status (body %r)" % (what, r.body[:300]))
    return r.json() if r.body else {}  # some operations answer an empty body


def metrics():
    r = h.get_metrics(C.server.endpoint)
    eq(r.status, 200, "GET /metrics status")
    return promtext.parse(r.body.decode("utf-8"))


def mv(parsed, name, **labels):
    """A series' value; 0 for a counter cell the server leaves out."""
    try:
        return promtext.value(parsed, name, **labels)
    except KeyError:
        return 0


def requests_by_outcome(parsed):
    """{(operation, outcome): count} of p11kms_requests_total."""
    out = {}
    for (name, labels), v in parsed.items():
        if name == "p11kms_requests_total":
            d = dict(labels)
            out[(d["operation"], d["outcome"])] = v
    return out


def listed(op, params, member):
    """Every entry of a paginated List* answer."""
    entries, params = [], dict(params)
    for _ in range(1000):
        doc = ok(call(op, params), op)
        entries += doc[member]
        if not doc["Truncated"]:
            return entries
        params["Marker"] = doc["NextMarker"]
    raise AssertionError("%s: more than 1000 pages" % op)


def status_fields(pid):
    """VmRSS (kB) and Threads of a process, from /proc/<pid>/status."""
    fields = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "Threads"):
                fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid):
    """User plus system CPU time of a process, seconds."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid):
    try:
        return len(os.listdir("/proc/%d/fd" % pid))
    except OSError:
        return None  # not ours to look at


# ---- what SoftHSM2's objects cost in memory --------------------------------------------
#
# p11kmsd's RSS includes SoftHSM2's, which grows with the token's objects: each
# object lives in memory, and SoftHSM2 (2.6.1, src/lib/object_store/OSToken.cpp)
# keeps every ObjectFile it made in OSToken::allObjects until the token is
# closed, so even a destroyed object leaves a part behind (deleteObject()
# drops its attributes, not the object). Every change p11kmsd makes writes
# objects: a rotation generates a key object and a new record and destroys
# the record before the last; a usage reservation or a deletion writes a
# record and destroys one; a deleted key's last records stay as a tombstone.
# So the soak takes off the RSS what SoftHSM2 needs for the objects made and
# destroyed since the warm-up (counted by /metrics), at per-object costs
# measured here in a process of its own, plus a budget for p11kmsd's own
# index of each new version and each deleted key's tombstone.

CALIBRATION_OBJECTS = 400
P11KMSD_PER_VERSION = 3.0       # kB p11kmsd may keep per new key version (measured: about 2.3)
P11KMSD_PER_DELETED_KEY = 5.0   # kB per key deleted, its tombstone (measured: about 3.7)


def measure_softhsm_costs(directory):
    """In a process of its own (this file with --softhsm-costs DIR): on a new
    token in DIR, objects like p11kmsd's kept and destroyed; prints the RSS
    each costs, kB, as JSON: "data" (a record kept), "key" (an AES key
    generated, kept), "destroyed" (a record made and destroyed),
    "key_destroyed" (a key generated and destroyed)."""
    import PyKCS11 as P
    token = h.make_token(directory, "p11kms-costs")
    os.environ["SOFTHSM2_CONF"] = token.conf
    lib = P.PyKCS11Lib()
    lib.load(h.SOFTHSM_MODULE)
    slot = [x for x in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(x).label.strip() == token.label][0]
    session = lib.openSession(slot, P.CKF_SERIAL_SESSION | P.CKF_RW_SESSION)
    session.login(token.user_pin())

    def record(i):   # as src/hsm/hsm.c writes a record
        return session.createObject([
            (P.CKA_CLASS, P.CKO_DATA), (P.CKA_TOKEN, True), (P.CKA_PRIVATE, True),
            (P.CKA_MODIFIABLE, True), (P.CKA_APPLICATION, "p11kms"),
            (P.CKA_LABEL, "p11kms-key:%s:%d:%s" % (uuid.uuid4(), i, os.urandom(16).hex())),
            (P.CKA_OBJECT_ID, os.urandom(16)), (P.CKA_VALUE, os.urandom(1500))])

    def key(i):      # as src/hsm/hsm.c generates a key version
        return session.generateKey([
            (P.CKA_CLASS, P.CKO_SECRET_KEY), (P.CKA_KEY_TYPE, P.CKK_AES), (P.CKA_VALUE_LEN, 32),
            (P.CKA_TOKEN, True), (P.CKA_PRIVATE, True), (P.CKA_SENSITIVE, True),
            (P.CKA_EXTRACTABLE, False), (P.CKA_ENCRYPT, True), (P.CKA_DECRYPT, True),
            (P.CKA_WRAP, False), (P.CKA_UNWRAP, False), (P.CKA_SIGN, False),
            (P.CKA_VERIFY, False), (P.CKA_DERIVE, False), (P.CKA_ID, os.urandom(20)),
            (P.CKA_LABEL, "p11kms-kek:%s:%d:1700000000" % (uuid.uuid4(), i))],
            P.Mechanism(P.CKM_AES_KEY_GEN, None))

    def cost(fn):
        before = status_fields(os.getpid())["VmRSS"]
        for i in range(CALIBRATION_OBJECTS):
            fn(i)
        return (status_fields(os.getpid())["VmRSS"] - before) / CALIBRATION_OBJECTS

    # The allocator's warm-up; then the objects destroyed first: SoftHSM2
    # reads its folder on each change, so every object kept slows the next ones.
    for i in range(CALIBRATION_OBJECTS):
        session.destroyObject(record(i))
        if i % 4 == 0:
            session.destroyObject(key(i))
    costs = {"destroyed": cost(lambda i: session.destroyObject(record(i))),
             "key_destroyed": cost(lambda i: session.destroyObject(key(i))),
             "data": cost(record), "key": cost(key)}
    print(json.dumps(costs))
    return 0


def softhsm_costs():
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--softhsm-costs",
                        C.ws.sub("calibration-token")], env=h.server_env(),
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=300)
    if r.returncode != 0:
        raise RuntimeError("measuring SoftHSM2's object costs failed (%d): %s"
                           % (r.returncode, r.stderr.decode(errors="replace")[-2000:]))
    costs = json.loads(r.stdout.decode().splitlines()[-1])
    h.diag("SoftHSM2's memory per object (over %d each): a record %.2f kB, a key %.2f kB; "
           "what stays of them once destroyed: %.2f kB, %.2f kB"
           % (CALIBRATION_OBJECTS, costs["data"], costs["key"], costs["destroyed"],
              costs["key_destroyed"]))
    return costs


# ---- SigV4 ---------------------------------------------------------------------------
#
# The clients sign with this small SigV4 signer rather than botocore's: it gives
# about 30% more requests per second on two cores. check_signer() makes sure it
# signs exactly as botocore does (h.sign).

SIGNED_HEADERS = "content-type;host;x-amz-date;x-amz-target"


def sigv4_headers(host_header, target, body, access_key, secret, when=None):
    when = when or datetime.datetime.now(datetime.timezone.utc)
    amz_date = when.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    canonical = "POST\n/\n\ncontent-type:%s\nhost:%s\nx-amz-date:%s\nx-amz-target:%s\n\n%s\n%s" % (
        h.JSON_TYPE, host_header, amz_date, target, SIGNED_HEADERS,
        hashlib.sha256(body).hexdigest())
    scope = "%s/%s/kms/aws4_request" % (day, h.REGION)
    to_sign = "AWS4-HMAC-SHA256\n%s\n%s\n%s" % (amz_date, scope,
                                                 hashlib.sha256(canonical.encode()).hexdigest())
    k = ("AWS4" + secret).encode()
    for part in (day, h.REGION, "kms", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return {"Content-Type": h.JSON_TYPE, "X-Amz-Target": target, "X-Amz-Date": amz_date,
            "Authorization": "AWS4-HMAC-SHA256 Credential=%s/%s, SignedHeaders=%s, Signature=%s"
            % (access_key, scope, SIGNED_HEADERS, signature)}


def check_signer():
    when = datetime.datetime(2024, 5, 6, 7, 8, 9)
    body = json.dumps({"KeyId": "alias/x", "EncryptionContext": {"a": "b"}}).encode()
    theirs, _ = h.sign(C.server.endpoint, "TrentService.Encrypt", body, C.principal, when=when)
    mine = sigv4_headers("%s:%d" % (C.server.host, C.server.port), "TrentService.Encrypt", body,
                         C.principal.access_key, C.principal.secret,
                         when.replace(tzinfo=datetime.timezone.utc))
    eq(mine["Authorization"], theirs["Authorization"], "the soak's SigV4 signer = botocore's")
    eq(mine["X-Amz-Date"], theirs["X-Amz-Date"], "X-Amz-Date")


# ---- the client processes ---------------------------------------------------------------


class Failure(Exception):
    pass


def b64(data):
    return base64.b64encode(data).decode()


class Client:
    """One client process: a kept-alive connection, a ring of recent blobs,
    counters. Every request is checked; a failure is counted and the first
    few are kept in detail."""

    def __init__(self, n, spec, progress):
        self.n = n
        self.spec = spec
        self.progress = progress
        self.rng = random.Random(spec["seed"] * 1000 + n)
        self.host, self.port = spec["host"], spec["port"]
        self.host_header = "%s:%d" % (self.host, self.port)
        self.keys = spec["keys"]            # [(key id, arn, alias or None)]
        self.pinned = spec["pinned"]
        self.conn = None
        self.ring = collections.deque(maxlen=RING)
        self.ok = collections.Counter()      # 200 answers per operation
        self.errors = collections.Counter()  # failures per operation
        self.failures = []                   # the first few, in detail
        self.latency = {}                    # operation -> [count, sum, max]
        self.buckets = [0] * 40              # all requests: latency by powers of two of 10 us
        self.rotations = collections.Counter()   # key index -> on-demand rotations
        self.scratch = 0
        self.version_ids = collections.defaultdict(set)   # key index -> version ids seen
        self.reconnects = 0
        self.total = 0
        self.context_n = 0
        self.current = None                  # what one() is doing, for fail()
        rate = 1.0 / spec["clients"]
        self.next_rotation = self.rng.expovariate(rate / ROTATE_EVERY)
        self.next_scratch = self.rng.expovariate(rate / SCRATCH_EVERY)
        self.choices = [op for op, _ in MIX]
        self.weights = [w for _, w in MIX]

    # -- transport --

    def request(self, op, params):
        body = json.dumps(params).encode()
        headers = sigv4_headers(self.host_header, "TrentService." + op, body,
                                self.spec["access_key"], self.spec["secret"])
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        t0 = time.monotonic()
        try:
            self.conn.request("POST", "/", body=body, headers=headers)
            resp = self.conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            self.conn.close()
            self.conn = None
            self.reconnects += 1
            raise Failure("%s: no answer: %r" % (op, e))
        took = time.monotonic() - t0
        self.total += 1
        self.progress[self.n] = self.total
        if resp.getheader("Connection", "").lower() == "close":
            self.conn.close()
            self.conn = None
            self.reconnects += 1
        stat = self.latency.setdefault(op, [0, 0.0, 0.0])
        stat[0] += 1
        stat[1] += took
        stat[2] = max(stat[2], took)
        self.buckets[min(len(self.buckets) - 1, max(0, int(math.log2(max(took, 1e-5) / 1e-5))))] += 1
        if resp.status != 200:
            raise Failure("%s: HTTP %d %s" % (op, resp.status, data[:300]))
        self.ok[op] += 1
        try:
            return json.loads(data)
        except ValueError:
            raise Failure("%s: answer is not JSON: %r" % (op, data[:300]))

    # -- checks --

    def expect(self, cond, what):
        if not cond:
            raise Failure(what)

    def same(self, actual, expected, what):
        if actual != expected:
            raise Failure("%s: %r != expected %r" % (what, actual, expected))

    def check_blob(self, key, blob_b64, plaintext_len, what):
        blob = base64.b64decode(blob_b64)
        self.same(len(blob), BLOB_OVERHEAD + plaintext_len, what + ": blob length")
        self.same(blob[0], 1, what + ": blob format")
        self.same(blob[1:17], uuid.UUID(self.keys[key][0]).bytes, what + ": blob key id")
        self.expect(blob[17:21] != b"\0\0\0\0", what + ": blob version id is 0")
        if len(self.version_ids[key]) < 10000:
            self.version_ids[key].add(blob[17:21])

    def key_ref(self, key):
        """Any of the names of a key: id, ARN, alias, alias ARN."""
        key_id, arn, alias = self.keys[key]
        refs = [key_id, arn] + ([alias, ARN_PREFIX + alias] if alias else [])
        return self.rng.choice(refs)

    def context(self):
        if self.rng.random() < 0.15:
            return None
        self.context_n += 1
        return {"tenant": "t%d" % self.rng.randrange(50), "client": str(self.n),
                "n": str(self.context_n)}

    @staticmethod
    def with_context(params, context, member="EncryptionContext"):
        if context is not None:
            params[member] = context
        return params

    # -- operations --

    def op_GenerateDataKey(self):
        key = self.rng.randrange(len(self.keys))
        context = self.context()
        params = self.with_context({"KeyId": self.key_ref(key)}, context)
        r = self.rng.random()
        if r < 0.6:
            params["KeySpec"], size = "AES_256", 32
        elif r < 0.8:
            params["KeySpec"], size = "AES_128", 16
        else:
            size = self.rng.randint(1, 1024)
            params["NumberOfBytes"] = size
        doc = self.request("GenerateDataKey", params)
        self.same(sorted(doc), ["CiphertextBlob", "KeyId", "Plaintext"], "GenerateDataKey members")
        self.same(doc["KeyId"], self.keys[key][1], "GenerateDataKey KeyId")
        self.same(len(base64.b64decode(doc["Plaintext"])), size, "GenerateDataKey plaintext size")
        self.check_blob(key, doc["CiphertextBlob"], size, "GenerateDataKey")
        self.ring.append((key, doc["CiphertextBlob"], doc["Plaintext"], context))

    def decrypt(self, entry, what):
        key, blob, plaintext, context = entry
        params = self.with_context({"CiphertextBlob": blob}, context)
        if self.rng.random() < 0.3:
            params["KeyId"] = self.rng.choice(self.keys[key][:2])
        doc = self.request("Decrypt", params)
        self.same(sorted(doc), ["EncryptionAlgorithm", "KeyId", "Plaintext"], what + " members")
        self.same(doc["KeyId"], self.keys[key][1], what + " KeyId")
        self.same(doc["EncryptionAlgorithm"], ALGORITHM, what + " EncryptionAlgorithm")
        self.same(doc["Plaintext"], plaintext, what + " plaintext")

    def op_Decrypt(self):
        if self.ring and self.rng.random() < 0.9:
            # any blob of the ring: made a moment or minutes ago, maybe before rotations
            self.decrypt(self.rng.choice(self.ring), "Decrypt of a recent blob")
        else:
            self.decrypt(tuple(self.rng.choice(self.pinned)), "Decrypt of a pinned blob")

    def op_Encrypt(self):
        key = self.rng.randrange(len(self.keys))
        size = self.rng.randint(1, 4096) if self.rng.random() < 0.2 else self.rng.randint(1, 256)
        plaintext = b64(self.rng.randbytes(size))
        context = self.context()
        doc = self.request("Encrypt", self.with_context({"KeyId": self.key_ref(key),
                                                         "Plaintext": plaintext}, context))
        self.same(sorted(doc), ["CiphertextBlob", "EncryptionAlgorithm", "KeyId"],
                  "Encrypt members")
        self.same(doc["KeyId"], self.keys[key][1], "Encrypt KeyId")
        self.same(doc["EncryptionAlgorithm"], ALGORITHM, "Encrypt EncryptionAlgorithm")
        self.check_blob(key, doc["CiphertextBlob"], size, "Encrypt")
        entry = (key, doc["CiphertextBlob"], plaintext, context)
        self.decrypt(entry, "Decrypt of the blob just encrypted")
        if size <= 64:
            self.ring.append(entry)

    def op_ReEncrypt(self):
        if not self.ring:
            return self.op_GenerateDataKey()
        src, blob, plaintext, context = self.rng.choice(self.ring)
        dst = self.rng.choice([k for k in range(len(self.keys)) if k != src])
        dst_context = self.context()
        params = self.with_context({"CiphertextBlob": blob, "DestinationKeyId": self.key_ref(dst)},
                                   context, "SourceEncryptionContext")
        self.with_context(params, dst_context, "DestinationEncryptionContext")
        doc = self.request("ReEncrypt", params)
        self.same(sorted(doc), ["CiphertextBlob", "DestinationEncryptionAlgorithm", "KeyId",
                                "SourceEncryptionAlgorithm", "SourceKeyId"], "ReEncrypt members")
        self.same((doc["SourceKeyId"], doc["KeyId"]), (self.keys[src][1], self.keys[dst][1]),
                  "ReEncrypt SourceKeyId, KeyId")
        self.same((doc["SourceEncryptionAlgorithm"], doc["DestinationEncryptionAlgorithm"]),
                  (ALGORITHM, ALGORITHM), "ReEncrypt algorithms")
        self.check_blob(dst, doc["CiphertextBlob"], len(base64.b64decode(plaintext)), "ReEncrypt")
        # checked by a later Decrypt
        self.ring.append((dst, doc["CiphertextBlob"], plaintext, dst_context))

    def op_GenerateDataKeyWithoutPlaintext(self):
        key = self.rng.randrange(len(self.keys))
        doc = self.request("GenerateDataKeyWithoutPlaintext",
                           self.with_context({"KeyId": self.key_ref(key), "KeySpec": "AES_256"},
                                             self.context()))
        self.same(sorted(doc), ["CiphertextBlob", "KeyId"], "GenerateDataKeyWithoutPlaintext members")
        self.same(doc["KeyId"], self.keys[key][1], "GenerateDataKeyWithoutPlaintext KeyId")
        self.check_blob(key, doc["CiphertextBlob"], 32, "GenerateDataKeyWithoutPlaintext")

    def op_GenerateRandom(self):
        size = self.rng.randint(1, 1024)
        doc = self.request("GenerateRandom", {"NumberOfBytes": size})
        self.same(sorted(doc), ["Plaintext"], "GenerateRandom members")
        self.same(len(base64.b64decode(doc["Plaintext"])), size, "GenerateRandom size")

    def op_DescribeKey(self):
        key = self.rng.randrange(len(self.keys))
        md = self.request("DescribeKey", {"KeyId": self.key_ref(key)})["KeyMetadata"]
        self.same((md["KeyId"], md["Arn"], md["KeyState"], md["Enabled"]),
                  (self.keys[key][0], self.keys[key][1], "Enabled", True), "DescribeKey")

    def op_ListKeys(self):
        doc = self.request("ListKeys", {"Limit": 1000})
        self.same(doc["Truncated"], False, "ListKeys Truncated")
        for k in doc["Keys"]:
            self.same(k["KeyArn"], ARN_PREFIX + "key/" + k["KeyId"], "ListKeys KeyArn")
        ids = {k["KeyId"] for k in doc["Keys"]}
        missing = [key_id for key_id, _, _ in self.keys if key_id not in ids]
        self.same(missing, [], "long-lived keys missing from ListKeys")

    def op_ListAliases(self):
        doc = self.request("ListAliases", {})
        self.same(doc["Truncated"], False, "ListAliases Truncated")
        got = {(a["AliasName"], a.get("TargetKeyId")) for a in doc["Aliases"]}
        want = {(alias, key_id) for key_id, _, alias in self.keys if alias}
        self.same(got, want, "ListAliases")

    def rotate(self):
        key = self.rng.randrange(len(self.keys))
        # (as AWS, RotateKeyOnDemand takes a key id or ARN, no alias)
        doc = self.request("RotateKeyOnDemand", {"KeyId": self.rng.choice(self.keys[key][:2])})
        self.same(doc, {"KeyId": self.keys[key][1]}, "RotateKeyOnDemand answer")
        self.rotations[key] += 1

    def scratch_key(self):
        """A key made, used, and scheduled for deletion while the others work."""
        md = self.request("CreateKey", {"Description": "soak scratch %d" % self.n})["KeyMetadata"]
        self.same((md["KeyState"], md["Enabled"]), ("Enabled", True), "CreateKey state")
        self.scratch += 1
        plaintext = b64(self.rng.randbytes(32))
        doc = self.request("Encrypt", {"KeyId": md["KeyId"], "Plaintext": plaintext})
        self.same(doc["KeyId"], md["Arn"], "scratch Encrypt KeyId")
        doc = self.request("Decrypt", {"CiphertextBlob": doc["CiphertextBlob"]})
        self.same((doc["KeyId"], doc["Plaintext"]), (md["Arn"], plaintext), "scratch Decrypt")
        days = self.rng.randint(*PENDING_DAYS)
        doc = self.request("ScheduleKeyDeletion", {"KeyId": md["KeyId"],
                                                   "PendingWindowInDays": days})
        self.same((doc["KeyId"], doc["KeyState"], doc["PendingWindowInDays"]),
                  (md["Arn"], "PendingDeletion", days), "ScheduleKeyDeletion answer")

    def one(self, now):
        clients = self.spec["clients"]
        if now >= self.next_rotation:
            self.next_rotation = now + self.rng.expovariate(1.0 / (ROTATE_EVERY * clients))
            self.current = "RotateKeyOnDemand"
            return self.rotate()
        if now >= self.next_scratch:
            self.next_scratch = now + self.rng.expovariate(1.0 / (SCRATCH_EVERY * clients))
            self.current = "scratch key"
            return self.scratch_key()
        self.current = self.rng.choices(self.choices, self.weights)[0]
        return getattr(self, "op_" + self.current)()

    def run(self, start_at, end_at, parent):
        done = 0
        while True:
            now = time.monotonic()
            if now >= end_at:
                break
            done += 1
            if done % 256 == 0 and os.getppid() != parent:
                break  # the test is gone
            try:
                self.one(now - start_at)
            except Failure as e:
                self.fail(str(e), now - start_at)
            except Exception:  # noqa: B902 - a bug of the test, reported as a failure
                self.fail(traceback.format_exc(), now - start_at)
        if self.conn is not None:
            self.conn.close()

    def fail(self, what, at):
        self.errors[self.current] += 1
        if len(self.failures) < FAILURES_SHOWN:
            if len(what) > 600:
                what = what[:600] + "... (%d characters)" % len(what)
            self.failures.append((at, "client %d at %.1f s, in %s: %s" % (self.n, at,
                                                                          self.current, what)))

    def report(self):
        return {"ok": dict(self.ok), "errors": dict(self.errors), "failures": self.failures,
                "latency": self.latency, "buckets": self.buckets,
                "rotations": dict(self.rotations), "scratch": self.scratch,
                "version_ids": {k: sorted(v) for k, v in self.version_ids.items()},
                "reconnects": self.reconnects, "total": self.total}


def client_main(n, spec, progress, start, start_at, results, parent):
    report = None
    try:
        c = Client(n, spec, progress)
        start.wait()
        c.run(start_at.value, start_at.value + spec["duration"], parent)
        report = c.report()
    except BaseException:  # noqa: B902 - told to the parent
        report = {"crash": traceback.format_exc()}
    results.put((n, report))


# ---- the soak ------------------------------------------------------------------------------


Sample = collections.namedtuple("Sample", "t rss threads fds done objects")
TOKEN_CALLS = ("C_GenerateKey", "C_CreateObject", "C_DestroyObject")
TOKEN_CALL_RE = re.compile(r'^p11kms_token_call_seconds_count\{function="(%s)"\} (\S+)$'
                           % "|".join(TOKEN_CALLS), re.M)
VERSIONS_RE = re.compile(r"^p11kms_key_versions (\S+)$", re.M)


def token_objects():
    """{function: count} of the token calls that make and destroy objects,
    and "versions": p11kms_key_versions (the key objects of keys not yet
    destroyed), from /metrics."""
    r = h.get_metrics(C.server.endpoint)
    if r.status != 200:
        raise AssertionError("GET /metrics: HTTP %d" % r.status)
    text = r.body.decode("utf-8")
    counts = dict.fromkeys(TOKEN_CALLS, 0)
    for name, value in TOKEN_CALL_RE.findall(text):
        counts[name] = int(float(value))
    counts["versions"] = int(float(VERSIONS_RE.search(text).group(1)))
    return counts


class Sampler(threading.Thread):
    """Every SAMPLE_EVERY seconds a Sample: seconds into the load, VmRSS kB,
    threads, open fds, requests answered so far, token_objects()."""

    def __init__(self, pid, progress, start_at):
        super().__init__(daemon=True)
        self.pid = pid
        self.progress = progress
        self.start_at = start_at
        self.samples = []
        self.stopping = threading.Event()
        self.error = None
        self.next_diag = max(10.0, DURATION / 12)

    def sample(self):
        fields = status_fields(self.pid)
        t = time.monotonic() - self.start_at
        s = Sample(t, fields["VmRSS"], fields["Threads"], open_fds(self.pid), sum(self.progress),
                   token_objects())
        self.samples.append(s)
        return s

    def run(self):
        try:
            tick = self.start_at
            last = None
            while not self.stopping.is_set():
                s = self.sample()
                if last is None or s.t >= last.t + self.next_diag - 0.5:
                    h.diag("t=%3.0f s  RSS %d kB  threads %d  fds %s  %.0f req/s  token objects: "
                           "%d keys generated, %d records created, %d destroyed; %d versions"
                           % (s.t, s.rss, s.threads, s.fds,
                              (s.done - last.done) / (s.t - last.t) if last else 0,
                              s.objects["C_GenerateKey"], s.objects["C_CreateObject"],
                              s.objects["C_DestroyObject"], s.objects["versions"]))
                    last = s
                tick += SAMPLE_EVERY
                self.stopping.wait(max(0.0, tick - time.monotonic()))
        except BaseException:  # noqa: B902 - reported by the soak test
            self.error = traceback.format_exc()


class Blaster(threading.Thread):
    """One wrk replaying signed requests of one operation (bench/replay.lua)
    from start to end, in segments of at most WRK_SEGMENT seconds, each with
    requests signed just before it. Counts what wrk counted: answers (its
    "requests"), those not 2xx, socket errors and timeouts. A request still in
    flight when a segment ends is answered by the server and not counted by
    wrk: the server may count up to WRK_CONNECTIONS more per segment."""

    def __init__(self, op, bodies, end_at):
        super().__init__(name="wrk-" + op, daemon=True)
        self.op, self.bodies, self.end_at = op, bodies, end_at
        self.requests = self.non2xx = self.socket = self.timeouts = self.segments = 0
        self.error = None

    def requests_file(self, path):
        host = "%s:%d" % (C.server.host, C.server.port)
        with open(path, "wb") as f:
            for params in self.bodies:
                body = json.dumps(params).encode()
                headers = sigv4_headers(host, "TrentService." + self.op, body,
                                        C.principal.access_key, C.principal.secret)
                head = "POST / HTTP/1.1\r\nHost: %s\r\n%sContent-Length: %d\r\n\r\n" % (
                    host, "".join("%s: %s\r\n" % kv for kv in headers.items()), len(body))
                raw = head.encode() + body
                f.write(b"%d\n" % len(raw) + raw)

    def run(self):
        try:
            path = C.ws.sub("wrk-%s.req" % self.op)
            lua = os.path.join(h.SRCDIR, "bench", "replay.lua")
            while True:
                left = self.end_at - time.monotonic()
                if left < 1:
                    return
                self.requests_file(path)
                p = subprocess.run([WRK, "-t1", "-c%d" % WRK_CONNECTIONS,
                                    "-d%ds" % int(min(left, WRK_SEGMENT)), "--timeout", "10s",
                                    "-s", lua, C.server.endpoint + "/", "--", path],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, timeout=WRK_SEGMENT + 60)
                line = [x for x in p.stdout.decode().splitlines() if x.startswith("wrk_result ")]
                if p.returncode != 0 or not line:
                    raise RuntimeError("wrk exited %d without a result: %r %r"
                                       % (p.returncode, p.stdout[-500:], p.stderr[-500:]))
                f = dict(re.findall(r"(\w+)=(\S+)", line[0]))
                self.requests += int(f["requests"])
                self.non2xx += int(f["non2xx"])
                self.socket += int(f["connect"]) + int(f["read"]) + int(f["write"])
                self.timeouts += int(f["timeout"])
                self.segments += 1
        except Exception:  # noqa: B902 - reported by the test
            self.error = traceback.format_exc()


def blasters(end_at):
    """The wrk load of the soak: GenerateDataKey on the long-lived keys and
    Decrypt of the pinned blobs (which every rotation leaves decryptable)."""
    if WRK_CONNECTIONS == 0:
        return []
    check(os.access(WRK, os.X_OK), "%s (Debian's wrk) for the soak's load; "
          "P11KMS_SOAK_WRK_CONNECTIONS=0 runs without it" % WRK)
    gdk = [{"KeyId": md["KeyId"], "KeySpec": "AES_256", "EncryptionContext": {"soak": "wrk"}}
           for md in C.keys]
    dec = [{"CiphertextBlob": blob, "EncryptionContext": context}
           for _, blob, _, context in C.pinned]
    return [Blaster("GenerateDataKey", gdk, end_at), Blaster("Decrypt", dec, end_at)]


def merge(reports):
    total = {"ok": collections.Counter(), "errors": collections.Counter(), "failures": [],
             "latency": {}, "buckets": [0] * 40, "rotations": collections.Counter(),
             "scratch": 0, "version_ids": collections.defaultdict(set), "reconnects": 0,
             "total": 0, "crashes": []}
    for n, rep in sorted(reports.items()):
        if "crash" in rep:
            total["crashes"].append("client %d:\n%s" % (n, rep["crash"]))
            continue
        total["ok"].update(rep["ok"])
        total["errors"].update(rep["errors"])
        total["failures"] += rep["failures"]
        for op, (count, tsum, tmax) in rep["latency"].items():
            s = total["latency"].setdefault(op, [0, 0.0, 0.0])
            s[0] += count
            s[1] += tsum
            s[2] = max(s[2], tmax)
        total["buckets"] = [a + b for a, b in zip(total["buckets"], rep["buckets"])]
        total["rotations"].update({int(k): v for k, v in rep["rotations"].items()})
        total["scratch"] += rep["scratch"]
        for k, v in rep["version_ids"].items():
            total["version_ids"][int(k)].update(v)
        total["reconnects"] += rep["reconnects"]
        total["total"] += rep["total"]
    return total


def percentile(buckets, q):
    """The upper edge (seconds) of the latency bucket holding the q-quantile."""
    need = q * sum(buckets)
    seen = 0
    for i, n in enumerate(buckets):
        seen += n
        if n and seen >= need:
            return 1e-5 * 2 ** (i + 1)
    return 0.0


@test
def test_mixed_load_without_errors():
    """CLIENTS processes send the mix back to back for DURATION seconds, with
    on-demand rotations, a scheduled rotation every ROTATION_PERIOD seconds
    and scratch keys created and deleted meanwhile: every answer is 200 and
    checked (sizes, key ARNs, blob headers, plaintexts of every Decrypt)."""
    spec = {"host": C.server.host, "port": C.server.port, "access_key": C.principal.access_key,
            "secret": C.principal.secret, "clients": CLIENTS, "seed": SEED, "duration": DURATION,
            "keys": [(md["KeyId"], md["Arn"], ALIASES.get(i)) for i, md in enumerate(C.keys)],
            "pinned": C.pinned}
    mp = multiprocessing.get_context("fork")  # fast to start; the children use no locks of ours
    progress = mp.Array("q", CLIENTS, lock=False)
    start = mp.Event()
    start_at = mp.Value("d", 0.0, lock=False)
    results = mp.Queue()
    C.metrics0 = metrics()
    C.audit_start = os.path.getsize(C.audit_log)
    procs = [mp.Process(target=client_main, name="soak-client-%d" % n, daemon=True,
                        args=(n, spec, progress, start, start_at, results, os.getpid()))
             for n in range(CLIENTS)]
    reports = {}
    sampler = None
    try:
        for p in procs:
            p.start()
        time.sleep(0.5)  # the clients wait for start: one start time for all
        start_at.value = time.monotonic()
        sampler = Sampler(C.server.proc.pid, progress, start_at.value)
        sampler.start()
        cpu0 = cpu_seconds(C.server.proc.pid)
        start.set()
        wrks = blasters(start_at.value + DURATION)
        for w in wrks:
            w.start()
        deadline = start_at.value + DURATION + 60
        while len(reports) < CLIENTS:
            left = deadline - time.monotonic()
            check(left > 0, "only %d of %d clients reported within 60 s of the end"
                  % (len(reports), CLIENTS))
            try:
                n, rep = results.get(timeout=min(left, 1.0))
                reports[n] = rep
            except queue.Empty:
                dead = [p.name for p in procs if p.exitcode not in (None, 0)]
                check(not dead, "client processes died: %r" % dead)
        for w in wrks:
            w.join(max(1.0, start_at.value + DURATION + 60 - time.monotonic()))
            check(not w.is_alive(), "wrk (%s) ended within 60 s of the end" % w.op)
        elapsed = time.monotonic() - start_at.value
    finally:
        if sampler is not None:
            sampler.stopping.set()
            sampler.join(5)
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
                p.join(5)
    final = sampler.sample()  # with the load stopped
    cpu = cpu_seconds(C.server.proc.pid) - cpu0
    # Answers of requests wrk left in flight may still wait for their audit line's flush
    # (group commit): their lines are in the file once none waits, and they are counted.
    deadline = time.monotonic() + 10
    while mv(metrics(), "p11kms_audit_answers_waiting") and time.monotonic() < deadline:
        time.sleep(0.01)
    C.audit_end = os.path.getsize(C.audit_log)
    C.metrics1 = metrics()
    eq(mv(C.metrics1, "p11kms_audit_answers_waiting"), 0, "answers waiting for their audit line")
    r = merge(reports)
    r["wrk"] = {w.op: w.requests for w in wrks}
    r["wrk_segments"] = {w.op: w.segments for w in wrks}
    C.result = r
    C.samples = sampler.samples
    C.elapsed = elapsed

    everything = r["total"] + sum(r["wrk"].values())
    h.diag("%d requests in %.1f s: %.0f requests/s, of which %d clients %.0f/s (reconnects %d); "
           "p11kmsd used %.0f%% of a CPU" % (everything, elapsed, everything / elapsed, CLIENTS,
                                              r["total"] / elapsed, r["reconnects"],
                                              100 * cpu / elapsed))
    for w in wrks:
        h.diag("wrk %s, %d connections: %d answers (%.0f/s) in %d segments; not 2xx %d, socket "
               "errors %d, timeouts %d" % (w.op, WRK_CONNECTIONS, w.requests, w.requests / elapsed,
                                           w.segments, w.non2xx, w.socket, w.timeouts))
    h.diag("the clients' latency: p50 <= %.2f ms, p99 <= %.2f ms, p99.9 <= %.2f ms"
           % tuple(1000 * percentile(r["buckets"], q) for q in (0.5, 0.99, 0.999)))
    for op in OPERATIONS:
        count, tsum, tmax = r["latency"].get(op, (0, 0.0, 0.0))
        h.diag("  %-32s %8d ok  mean %6.2f ms  max %7.1f ms"
               % (op, r["ok"].get(op, 0), 1000 * tsum / count if count else 0, 1000 * tmax))
    h.diag("on-demand rotations per key %s; scratch keys %d; version ids seen per key %s"
           % (dict(sorted(r["rotations"].items())), r["scratch"],
              {k: len(v) for k, v in sorted(r["version_ids"].items())}))
    h.diag("RSS after the load %d kB; audit log grew %.1f MB"
           % (final.rss, (C.audit_end - C.audit_start) / 1e6))

    check(sampler.error is None, "the RSS sampler failed:\n%s" % sampler.error)
    check(not r["crashes"], "client processes crashed:\n" + "\n".join(r["crashes"]))
    for w in wrks:
        check(w.error is None, "wrk (%s) failed:\n%s" % (w.op, w.error))
        eq((w.non2xx, w.socket, w.timeouts), (0, 0, 0),
           "wrk (%s): answers not 2xx, socket errors, timeouts" % w.op)
        check(w.requests > 0, "wrk (%s) was answered" % w.op)
    check(C.server.proc.poll() is None, "p11kmsd is still running")
    errors = sum(r["errors"].values())
    if errors:
        first = [text for _, text in sorted(r["failures"])[:FAILURES_SHOWN]]
        raise AssertionError("%d failures (%s); the first:\n%s"
                             % (errors, dict(r["errors"]), "\n".join(first)))
    # The rare ones (a rotation every 5 s, a scratch key every 3 s on average)
    # are sure to come only in a run that is not very short.
    for op in OPERATIONS if DURATION >= 30 else [op for op, _ in MIX]:
        check(r["ok"].get(op, 0) > 0, "no %s was made: the mix or the schedule is broken" % op)


@test
def test_rss_stable_after_warm_up():
    """The reference is the largest VmRSS sample of the warm-up's last
    REFERENCE_WINDOW seconds. No later sample (the one after the load
    included) may exceed it by more than RSS_GROWTH_MAX, once the memory of
    the token objects made and destroyed since the warm-up is taken off:
    SoftHSM2's at the costs measured in set-up (softhsm_costs), and
    p11kmsd's index of each new version and deleted key (P11KMSD_PER_*)."""
    check(C.result is not None, "the soak ran")
    s = C.samples
    check(len(s) >= DURATION / SAMPLE_EVERY * 0.8,
          "%d RSS samples for %.0f s of load" % (len(s), DURATION))
    window = [x for x in s if WARM_UP - REFERENCE_WINDOW <= x.t <= WARM_UP]
    after = [x for x in s if x.t > WARM_UP]
    check(window and after, "samples both in the warm-up's end and after it")
    costs = C.costs
    check(0.5 <= costs["data"] <= 20 and 0.5 <= costs["key"] <= 40
          and 0 <= costs["destroyed"] <= 5 and 0 <= costs["key_destroyed"] <= 5,
          "plausible SoftHSM2 object costs: %r" % costs)
    ref = max(x.rss for x in window)
    base = window[-1].objects

    def made(x):
        """Since the warm-up: (key objects kept, key objects destroyed, records
        kept, records destroyed). The token keeps no object per key or
        version: each version made since (p11kms_key_versions' increase) is one
        unwrapped session object kept in the node's cache once used; the
        version objects made in the token to be wrapped are destroyed at once
        (C_GenerateKey = C_DestroyObject for them), and SoftHSM2 reuses their
        memory. Records: none (the database holds the state)."""
        d = {f: x.objects[f] - base[f] for f in x.objects}
        return (max(d["versions"], 0), 0, 0, 0)

    def allowance(x):
        """kB of token state made since the warm-up: (SoftHSM2's, p11kmsd's)."""
        keys_kept, keys_destroyed, records_kept, records_destroyed = made(x)
        softhsm = (keys_kept * costs["key"] + keys_destroyed * costs["key_destroyed"]
                   + records_kept * costs["data"] + records_destroyed * costs["destroyed"])
        return softhsm, keys_kept * P11KMSD_PER_VERSION + keys_destroyed * P11KMSD_PER_DELETED_KEY

    def net(x):
        return x.rss - sum(allowance(x))

    peak = max(after, key=lambda x: x.rss)
    worst = max(after, key=net)
    final = s[-1]
    growth = net(worst) / ref - 1
    h.diag("RSS: at start %d kB; reference %d kB (largest of the warm-up's last %.0f s, warm-up "
           "%.0f s); largest after it %d kB at %.0f s (%+.2f%%); final %d kB (%+.2f%%)"
           % (s[0].rss, ref, REFERENCE_WINDOW, WARM_UP, peak.rss, peak.t,
              100 * (peak.rss / ref - 1), final.rss, 100 * (final.rss / ref - 1)))
    h.diag("token objects since the warm-up: key objects %d kept, %d destroyed; records %d "
           "kept, %d destroyed: SoftHSM2 %.0f kB, p11kmsd's index %.0f kB"
           % (made(final) + allowance(final)))
    h.diag("RSS net of that: largest %.0f kB at %.0f s (%+.2f%%), final %.0f kB (%+.2f%%); "
           "bound %+g%%" % (net(worst), worst.t, 100 * growth, net(final),
                               100 * (net(final) / ref - 1), 100 * RSS_GROWTH_MAX))
    thirds = [after[i * len(after) // 3:(i + 1) * len(after) // 3] for i in range(3)]
    h.diag("after the warm-up, by thirds: RSS max %s kB, net max %s kB"
           % ([max(x.rss for x in part) for part in thirds if part],
              ["%.0f" % max(net(x) for x in part) for part in thirds if part]))
    half = len(after) // 2
    fds = [x.fds for x in s if x.fds is not None]
    h.diag("threads %d..%d; open fds %s; requests/s after the warm-up: first half %.0f, "
           "second half %.0f" % (min(x.threads for x in s), max(x.threads for x in s),
                                 "%d..%d" % (min(fds), max(fds)) if fds else "unreadable",
                                 rate(after[0], after[half]), rate(after[half], after[-2])))
    if os.environ.get("P11KMS_SOAK_SAMPLES"):
        with open(os.environ["P11KMS_SOAK_SAMPLES"], "w") as f:
            json.dump({"costs": costs, "reference": ref, "warm_up": WARM_UP,
                       "samples": [x._asdict() for x in s]}, f)
    if h.sanitized_server():
        raise h.Skip("p11kmsd is built with AddressSanitizer: its quarantine and shadow memory "
                     "make RSS meaningless (net growth %+.2f%% measured)" % (100 * growth))
    check(growth <= RSS_GROWTH_MAX,
          "RSS grew %+.2f%% after the warm-up net of the token state made since (reference "
          "%d kB; %d kB at %.0f s, of which %.0f kB SoftHSM2's and %.0f kB p11kmsd's for key "
          "objects %d kept, %d destroyed, records %d kept, %d destroyed; bound %+g%%)"
          % ((100 * growth, ref, worst.rss, worst.t) + allowance(worst) + made(worst)
             + (100 * RSS_GROWTH_MAX,)))


def rate(a, b):
    return (b.done - a.done) / (b.t - a.t) if b.t > a.t else 0.0


def check_counts(server, what):
    """server: operation -> ok requests the server counted. Each must be what
    the clients saw answered 200 plus what wrk counted, and at most
    WRK_CONNECTIONS more per wrk segment (answered as wrk stopped)."""
    r = C.result
    for op in sorted(set(server) | set(r["ok"]) | set(r["wrk"])):
        low = r["ok"].get(op, 0) + r["wrk"].get(op, 0)
        high = low + WRK_CONNECTIONS * r["wrk_segments"].get(op, 0)
        got = server.get(op, 0)
        check(low <= got <= high, "%s: %s %d, the clients %d and wrk %d (%d segments): expected "
              "%d..%d" % (op, what, got, r["ok"].get(op, 0), r["wrk"].get(op, 0),
                          r["wrk_segments"].get(op, 0), low, high))


@test
def test_metrics_count_what_the_clients_saw():
    """/metrics after the soak: for every operation, the ok requests grew by
    exactly the 200 answers the clients and wrk counted (nobody else talks to
    this server; wrk's requests in flight as it stops are answered but not
    counted by it: check_counts), no other outcome and no throttling appeared,
    the latency histograms counted every request, nothing is left queued or
    running, and no audit line failed."""
    check(C.result is not None, "the soak ran")
    m0, m1 = C.metrics0, C.metrics1
    before, after = requests_by_outcome(m0), requests_by_outcome(m1)
    moved = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    bad = {k: v for k, v in moved.items() if k[1] != "ok" and v}
    eq(bad, {}, "requests that were not ok during the soak, by (operation, outcome)")
    server_ok = {op: v for (op, outcome), v in moved.items() if outcome == "ok" and v}
    C.server_ok = server_ok
    check_counts(server_ok, "ok requests in /metrics")
    for op in server_ok:
        eq(mv(m1, "p11kms_request_duration_seconds_count", operation=op)
           - mv(m0, "p11kms_request_duration_seconds_count", operation=op), server_ok[op],
           "%s latency histogram count increase" % op)
    for cls in ("crypto", "manage"):
        eq(mv(m1, "p11kms_throttled_total", **{"class": cls})
           - mv(m0, "p11kms_throttled_total", **{"class": cls}), 0, "throttled (%s)" % cls)
    eq(mv(m1, "p11kms_audit_write_failures_total"), 0, "audit write failures")
    eq((mv(m1, "p11kms_requests_queued"), mv(m1, "p11kms_requests_running")), (0, 0),
       "requests queued and running after the load")
    eq(mv(m1, "p11kms_token_ready"), 1, "p11kms_token_ready")
    wraps = sum(server_ok.get(op, 0) for op in ("GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
                                                "Encrypt", "ReEncrypt"))
    encrypts = (mv(m1, "p11kms_token_call_seconds_count", function="C_Encrypt")
                - mv(m0, "p11kms_token_call_seconds_count", function="C_Encrypt"))
    check(encrypts >= wraps, "C_Encrypt calls %d >= wraps %d" % (encrypts, wraps))
    calls = {f: mv(m1, "p11kms_token_call_seconds_count", function=f)
             - mv(m0, "p11kms_token_call_seconds_count", function=f)
             for f in ("C_GenerateKey", "C_CreateObject", "C_SetAttributeValue", "C_DestroyObject",
                       "C_FindObjects", "C_Sign")}
    h.diag("p11kms_requests_total{outcome=ok} grew by %d; C_Encrypt calls %d; token changes %s"
           % (sum(server_ok.values()), encrypts, calls))


@test
def test_audit_log_has_a_line_per_request():
    """Every request of the soak left exactly one audit line, outcome ok (as
    many per operation as /metrics counted), and the log verifies (hash chain
    and checkpoint MACs) with p11kms-audit."""
    check(C.result is not None, "the soak ran")
    audited = collections.Counter()
    other = collections.Counter()
    lines = 0
    with open(C.audit_log, "rb") as f:
        f.seek(C.audit_start)
        data = f.read(C.audit_end - C.audit_start)
    check(data.endswith(b"\n"), "the audit log ends with a whole line after the load")
    for line in data.splitlines():
        doc = json.loads(line)
        lines += 1
        if doc.get("type") != "request":
            other[doc.get("type")] += 1
            continue
        if doc.get("outcome") == "ok":
            audited[doc["operation"]] += 1
        else:
            other[(doc["operation"], doc.get("outcome"))] += 1
    h.diag("%d audit lines during the soak: %d requests, others %s"
           % (lines, sum(audited.values()), dict(other)))
    check_counts(dict(audited), "ok audit lines")
    eq(dict(audited), C.server_ok, "ok audit lines vs ok requests in /metrics, by operation")
    bad = {k: v for k, v in other.items() if isinstance(k, tuple)}
    eq(bad, {}, "audit lines of requests that were not ok")
    tool = os.environ.get("P11KMS_AUDIT") or os.path.join(h.SRCDIR, "p11kms-audit")
    if not os.access(tool, os.X_OK):
        raise h.Skip("p11kms-audit not built (%s): counted, not verified" % tool)
    t0 = time.monotonic()
    env = h.server_env({"SOFTHSM2_CONF": C.token.conf})
    p = subprocess.run([tool, "verify", "--config", C.config, C.audit_log], env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=600)
    h.diag("p11kms-audit verify: %.1f s, %r" % (time.monotonic() - t0,
                                                 p.stdout.decode(errors="replace").strip()[-200:]))
    eq(p.returncode, 0, "p11kms-audit verify's exit status (stderr %r)" % p.stderr[-500:])


@test
def test_rotations_and_blobs_made_before_them():
    """The pinned blobs, made in set-up under each key's first version, still
    decrypt after the rotations; new wraps use another version id; every
    on-demand rotation the clients made is listed, and the scheduled rotations
    happened about every ROTATION_PERIOD seconds on that key only."""
    check(C.result is not None, "the soak ran")
    r = C.result
    for i, blob, plaintext, context in C.pinned:
        doc = ok(call("Decrypt", {"CiphertextBlob": blob, "EncryptionContext": context}),
                 "Decrypt of a pinned blob of key %d" % i)
        eq((doc["KeyId"], doc["Plaintext"]), (C.keys[i]["Arn"], plaintext),
           "pinned blob of key %d" % i)
    elapsed = time.monotonic() - C.rotation_enabled_at
    versions = 0
    summary = []
    for i, md in enumerate(C.keys):
        rotations = listed("ListKeyRotations", {"KeyId": md["KeyId"], "Limit": 1000}, "Rotations")
        kinds = collections.Counter(x["RotationType"] for x in rotations)
        versions += 1 + len(rotations)
        summary.append("key %d: %d on demand, %d automatic" % (i, kinds["ON_DEMAND"],
                                                               kinds["AUTOMATIC"]))
        eq(kinds["ON_DEMAND"], r["rotations"].get(i, 0), "key %d: on-demand rotations listed" % i)
        eq(sorted(kinds), sorted(k for k in ("ON_DEMAND", "AUTOMATIC") if kinds[k]),
           "key %d: rotation types" % i)
        if i == ROTATING:
            # One every ROTATION_PERIOD s, run by the background thread once per
            # refresh_ms (1 s): at least half of the ideal count, never more.
            check(elapsed // (2 * ROTATION_PERIOD) <= kinds["AUTOMATIC"]
                  <= elapsed // ROTATION_PERIOD + 1,
                  "key %d: %d scheduled rotations in %.0f s with a period of %d s"
                  % (i, kinds["AUTOMATIC"], elapsed, ROTATION_PERIOD))
        else:
            eq(kinds["AUTOMATIC"], 0, "key %d: automatic rotations" % i)
        seen = len(r["version_ids"].get(i, ()))
        check(1 <= seen <= 1 + len(rotations),
              "key %d: %d version ids in blobs, %d versions" % (i, seen, 1 + len(rotations)))
        if rotations:
            doc = ok(call("GenerateDataKey", {"KeyId": md["KeyId"], "KeySpec": "AES_256"}),
                     "GenerateDataKey after the soak")
            vid = base64.b64decode(doc["CiphertextBlob"])[17:21]
            check(vid != C.pinned_vids[i], "key %d wraps under a new version after %d rotations"
                  % (i, len(rotations)))
    h.diag("; ".join(summary))


@test
def test_scratch_keys_are_deleted():
    """The scratch keys' deletion windows (1-3 s) end: within a few seconds
    of the load only the long-lived keys are left, in ListKeys and in
    p11kms_keys / p11kms_key_versions."""
    check(C.result is not None, "the soak ran")
    ours = sorted(md["KeyId"] for md in C.keys)
    deadline = time.monotonic() + PENDING_DAYS[1] + 15
    while True:
        # (the scheduled rotation goes on: the versions are counted each time)
        versions = sum(1 + len(listed("ListKeyRotations", {"KeyId": md["KeyId"], "Limit": 1000},
                                      "Rotations")) for md in C.keys)
        keys = sorted(k["KeyId"] for k in listed("ListKeys", {"Limit": 1000}, "Keys"))
        m = metrics()
        state = (keys, mv(m, "p11kms_keys"), mv(m, "p11kms_key_versions"))
        if state == (ours, KEYS, versions) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    eq(state, (ours, KEYS, versions),
       "ListKeys, p11kms_keys and p11kms_key_versions once the %d scratch keys are deleted"
       % C.result["scratch"])
    for md in C.keys:
        doc = ok(call("DescribeKey", {"KeyId": md["KeyId"]}), "DescribeKey")
        eq(doc["KeyMetadata"]["KeyState"], "Enabled", "state of key %s" % md["KeyId"])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--softhsm-costs"]:
        sys.exit(measure_softhsm_costs(sys.argv[2]))
    sys.exit(T.run(setup, teardown))
