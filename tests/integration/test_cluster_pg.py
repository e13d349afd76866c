#!/usr/bin/python3
"""Three p11kmsd nodes on one PostgreSQL database, nginx in front, under load
and faults (issue 19, item 6; DESIGN §5 and §10). TAP output.

Run by tests/integration/test_cluster_pg.sh under tests/pgserver.sh, which
starts a throw-away PostgreSQL server (initdb + pg_ctl on loopback) and
exports P11KMS_TEST_PG_URL, P11KMS_TEST_PG_DIR and P11KMS_TEST_PG_SERVER; run
by hand, this file starts itself under pgserver.sh the same way. A server that
cannot start fails the test (pgserver.sh exits 99, a hard error), never skips it.

The cluster: `p11kmsd init` once (the schema and the root key), then the
SoftHSM2 token folder is copied three times, one copy per node with its own
softhsm2.conf (the root key cloned, as an HSM cluster clones its keys). Nodes
A, B and C name the same database URL and poll its change sequence every
refresh_ms = 50: nothing here depends on LISTEN/NOTIFY (the change feed may
make propagation faster; the poll alone must be enough). database_timeout_ms
is 2000 and the rate limits are off (the load is above the default
management quota). nginx balances the three, round robin; a node it cannot
connect to is skipped for a second and the request goes to the next one.

The load, for P11KMS_CLUSTER_SECONDS (20 in make check; 60 for a longer run):

  - three client threads through nginx: CreateKey; CreateAlias, UpdateAlias
    and DeleteAlias on a few shared alias names; RotateKeyOnDemand on shared
    keys; DisableKey/EnableKey on shared keys; PutKeyPolicy of a valid policy
    of ~8 KB on shared keys;
  - GenerateDataKey on node A directly, and Decrypt of each of its blobs on
    node B directly, as they come; a quarter of them under a "quiet" key that
    nothing changes, which A and B hold in memory.

The faults, while that runs:

  - at 30 % of the run, node C is killed (SIGKILL) while three more threads
    fire RotateKeyOnDemand at it directly (rotations in flight), and started
    again two seconds later with the same configuration and token copy;
  - at 60 %, PostgreSQL is crashed (pg_ctl stop -m immediate) and started
    again 1.5 s later.

Every answer is classified. Allowed besides 200, each counted by type:

  - a refusal the operation's semantics call for, which changes nothing:
    CreateAlias AlreadyExistsException (409), UpdateAlias and DeleteAlias
    NotFoundException (404), RotateKeyOnDemand DisabledException (409) of a
    key another thread disabled;
  - 503 DependencyTimeoutException of a request in flight while the
    database was down (from the crash until 2 s after pg_ctl start returned),
    except under the quiet key: GenerateDataKey and Decrypt of a key held in
    memory never wait on the database (DESIGN §5), so they keep answering;
  - nginx's 502 of a request it had passed to node C when C was killed
    (nginx does not send a POST to another node once sent: it is not
    idempotent); a connection refused by nginx never happens;
  - on the calls made to C directly: a reset connection of a request in flight
    when it was killed, or a refused one made just after.

Anything else fails the test. A 503, a 502 or a reset leaves the change
unknown (it may have committed): such a change is "ambiguous" below, except
a 503 begun after the server had stopped and answered before it was started
again, which cannot have committed anything. The run must also show the
faults at work: 503s while the database was down, changes acknowledged after
it came back, calls under the quiet key answered meanwhile, nginx passing a
request C refused to the next node, and C answering again after its restart.

Afterwards the nodes get up to CONVERGE (5 s) to agree, and these counts
must be exactly 0, each node asked directly, not through nginx:

  - acknowledged changes not visible on every node: every key a CreateKey
    returned is listed and described; each key's KeyState, policy
    (GetKeyPolicy) and each alias's target (ListAliases, and DescribeKey of
    the alias name) is what the change acknowledged last left, or what a
    concurrent or ambiguous change wrote: the value of one of the changes to
    that object that no acknowledged change began after (real-time order; an
    ambiguous change ended before its answer, since its worker did, and one
    whose COMMIT the server still had when its node died holds the rows it
    wrote locked, so a later change to the object commits after it; only a
    503 of the request timeout stays possible for ever), or the initial
    value when none was acknowledged; each key's ListKeyRotations
    holds at least as many ON_DEMAND rotations as were acknowledged, and no
    more than that plus the ambiguous ones;
  - differences between the three nodes' ListKeys, ListAliases,
    DescribeKey, ListKeyRotations and GetKeyPolicy answers (normalized JSON);
  - blobs (every GenerateDataKey that answered 200) that do not decrypt, to
    their plaintext, on any of the three nodes;
  - disagreements with the database, read with psql: keys and their states,
    policies and aliases; versions rows per key = 1 + the rotations listed,
    ordinals 1..N, the ON_DEMAND count.
"""

import base64
import hashlib
import json
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import harness as h  # noqa: E402

h.under_pgserver(__file__)
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

SECONDS = float(os.environ.get("P11KMS_CLUSTER_SECONDS") or "20")
if SECONDS < 10:
    # The database crashes at 0.6 of the run and must be back, with changes acknowledged
    # after it, before the end.
    sys.exit("test_cluster_pg: P11KMS_CLUSTER_SECONDS must be at least 10, not %g" % SECONDS)
CONVERGE = 5.0      # seconds the nodes get to agree once the load stops
PG_DOWN = 1.5       # seconds PostgreSQL stays down
NODE_DOWN = 2.0     # seconds node C stays down (nginx tries it again after 1 s)
PG_SLACK = 2.0      # a 503 may end this long after PostgreSQL is back
NODE_SETTINGS = {
    "refresh_ms": "50",
    "max_on_demand_rotations": "1000000",
    "database_timeout_ms": "2000",
    # The load is far above the default management quota (200 changes a second).
    "rate_crypto": "0",
    "rate_manage": "0",
    "rate_global": "0",
    # Behind nginx every connection comes from its address (docs/operations.md).
    "per_ip_connections": "0",
}
NODES = ("A", "B", "C")
DATA_KEYS = 3       # GenerateDataKey, rotation, policies; never disabled
STATE_KEYS = 3      # DisableKey/EnableKey, rotation, policies
ALIASES = ["alias/cluster-%d" % i for i in range(4)]
POLICY_BYTES = 8000
ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
# Operations through nginx, by weight.
OPS = (("CreateKey", 1), ("CreateAlias", 3), ("UpdateAlias", 4), ("DeleteAlias", 1),
       ("RotateKeyOnDemand", 4), ("DisableKey", 3), ("EnableKey", 3), ("PutKeyPolicy", 3))
# The refusals an operation may answer, which change nothing.
REFUSALS = {
    "CreateAlias": {("AlreadyExistsException", 409)},
    "UpdateAlias": {("NotFoundException", 404)},
    "DeleteAlias": {("NotFoundException", 404)},
    "RotateKeyOnDemand": {("DisabledException", 409)},  # a STATE key only (checked)
}


class Ctx:
    ws = None
    principal = None
    pg_url = None
    token0 = None      # the token p11kmsd init made the root key in
    tokens = {}        # node -> its copy (harness.Token)
    confs = {}         # node -> configuration file
    ports = {}         # node -> its fixed port (nginx's upstream)
    nodes = {}         # node -> harness.Server
    nginx = None       # harness.Nginx in front of the nodes
    data_keys = []
    state_keys = []
    quiet_key = None   # GenerateDataKey and Decrypt only: never changed
    initial_policy = {}  # key -> its policy before any PutKeyPolicy
    records = []       # every call of the load (Rec)
    blobs = []         # (blob, plaintext, context, key id) of every GenerateDataKey 200
    created = []       # key ids of CreateKey calls answered 200 (made during the load)
    events = {}        # fault name -> monotonic time
    final = {}         # node -> its last snapshot
    converged_after = None
    findings = []


C = Ctx()
LOCK = threading.Lock()


# ---- set-up and tear-down ------------------------------------------------------


def endpoint(node):
    return "http://127.0.0.1:%d" % C.ports[node]


def nginx_endpoint():
    return C.nginx.endpoint


def start_node(node, tries=5):
    """Node on its fixed port (nginx's upstream names it): its own
    configuration and token copy. A port just freed by a killed node may
    take a moment to be bound again."""
    last = None
    for attempt in range(tries):
        env = h.server_env({"SOFTHSM2_CONF": C.tokens[node].conf})
        server = h.Server(["--config", C.confs[node]], env, C.ws.sub("node-%s.log" % node))
        try:
            server.start()
        except RuntimeError as e:
            last = e
            time.sleep(0.5)
            continue
        eq(server.port, C.ports[node], "node %s's port" % node)
        C.nodes[node] = server
        return server
    raise RuntimeError("node %s did not start (%d tries): %s" % (node, tries, last))


def setup():
    C.pg_url = os.environ["P11KMS_TEST_PG_URL"]
    C.ws = h.Workspace()
    C.principal = h.new_principal("cluster")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.principal])
    C.token0 = h.make_token(C.ws.sub("token-init"), "p11kms-cluster")
    init_conf = h.write_config(C.ws.sub("init.conf"), C.token0, creds, database=C.pg_url)
    # The schema and the root key, once, before any node starts.
    h.init_database(init_conf, C.token0)
    for node in NODES:
        C.tokens[node] = h.copy_token(C.token0, C.ws.sub("token-%s" % node))
        C.ports[node] = h.free_port()
        C.confs[node] = h.write_config(
            C.ws.sub("node-%s.conf" % node), C.tokens[node], creds, database=C.pg_url,
            pin_file=C.tokens[node].pin_file, listen="127.0.0.1:%d" % C.ports[node],
            **NODE_SETTINGS)
    for node in NODES:
        start_node(node)
    # A node that refused a connection is skipped for a second (nginx counts whole seconds);
    # a connection error or timeout moves to the next node, never a POST already sent (not
    # idempotent), never an HTTP status.
    C.nginx = h.Nginx(C.ws.sub("nginx"), [C.ports[n] for n in NODES],
                      upstream_options="max_fails=1 fail_timeout=1s",
                      location_extra=["proxy_connect_timeout 2s;",
                                      "proxy_next_upstream error timeout;"]).start()
    u = urllib.parse.urlsplit(C.pg_url)  # named without its password
    h.diag("nodes %s, nginx %s, database postgresql://%s@%s:%d%s"
           % (", ".join("%s %s" % (n, endpoint(n)) for n in NODES), nginx_endpoint(),
              u.username, u.hostname, u.port, u.path))


def teardown():
    try:
        try:
            if C.nginx:
                C.nginx.stop()
        finally:
            errors = []
            for node in NODES:
                server = C.nodes.get(node)
                if server and T.failed:
                    h.diag("node %s's log (tail):\n%s" % (node, server.stderr_text()[-5000:]))
                try:
                    if server:
                        server.stop()
                except AssertionError as e:
                    errors.append(e)
            if errors:
                raise errors[0]
    finally:
        if C.ws:
            C.ws.close()


# ---- requests ------------------------------------------------------------------


def b64(data):
    return base64.b64encode(data).decode()


def arn(key_id):
    return ARN_PREFIX + "key/" + key_id


def call(ep, op, body):
    return h.kms_call(ep, op, body, C.principal)


def expect_ok(r, what):
    if r.status != 200:
        raise AssertionError("%s: HTTP %d %r" % (what, r.status, r.body[:400]))
    return r.json() if r.body else {}


def ok(ep, op, body):
    return expect_ok(call(ep, op, body), "%s on %s" % (op, ep))


def create_key(ep, description):
    md = ok(ep, "CreateKey", {"Description": description})["KeyMetadata"]
    eq(md["KeyState"], "Enabled", "new key's KeyState")
    return md["KeyId"]


def big_policy(tag):
    """A valid key policy of POLICY_BYTES or a little more: the test's
    principal may do anything (the first statement), and readers that do not
    exist may use the key under conditions (the padding). Id names the change."""
    statements = [{"Sid": "ClusterTest", "Effect": "Allow",
                   "Principal": {"AWS": C.principal.name}, "Action": "kms:*", "Resource": "*"}]
    doc = {"Version": "2012-10-17", "Id": tag, "Statement": statements}
    i = 0
    while len(json.dumps(doc)) < POLICY_BYTES:
        statements.append({
            "Sid": "Reader%02d" % i, "Effect": "Allow",
            "Principal": {"AWS": ["reader-%02d" % i, "arn:aws:iam::%s:user/auditor-%02d"
                                  % (h.ACCOUNT, i)]},
            "Action": ["kms:Decrypt", "kms:DescribeKey", "kms:GenerateDataKey*"],
            "Resource": "*",
            "Condition": {"StringEquals": {"kms:EncryptionContext:tenant":
                                           ["tenant-%02d-a" % i, "tenant-%02d-b" % i]}}})
        i += 1
    text = json.dumps(doc)
    check(len(statements) <= 100 and len(text) <= 32768, "the policy is within the limits")
    return text


class Rec:
    """One call of the load: what it was to change, and how it ended."""
    __slots__ = ("op", "via", "obj", "value", "start", "end", "status", "etype", "message",
                 "exc", "body", "kind", "why")

    def __init__(self, op, via, obj, value):
        self.op, self.via, self.obj, self.value = op, via, obj, value
        self.start = self.end = None
        self.status = self.etype = self.message = self.exc = self.body = None
        self.kind = None  # after classify(): ok, refused, ambiguous, not-applied, unexpected
        self.why = None


def timed_call(rec, ep, body):
    """Sends the call, recording when it began and ended and how."""
    rec.start = time.monotonic()
    try:
        r = call(ep, rec.op, body)
    except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
            socket.timeout, OSError, Exception) as e:  # noqa: B902 - classified later
        rec.end = time.monotonic()
        rec.exc = e
        with LOCK:
            C.records.append(rec)
        return None
    rec.end = time.monotonic()
    rec.status = r.status
    if r.status != 200:
        rec.body = r.body[:600]
        try:
            doc = h.check_error_response(r, r.json().get("__type"), r.status)
            rec.etype, rec.message = doc["__type"], doc["message"]
        except Exception:  # noqa: B902 - not a KMS error document: nginx's, say
            rec.etype = None
    with LOCK:
        C.records.append(rec)
    return r


# ---- the load -------------------------------------------------------------------


def client(index, stop):
    """One of three clients through nginx: changes on shared objects."""
    rng = random.Random(1000 + index)
    names, weights = zip(*OPS)
    ep = nginx_endpoint()
    n = 0
    while not stop.is_set():
        n += 1
        op = rng.choices(names, weights)[0]
        shared = C.data_keys + C.state_keys
        if op == "CreateKey":
            rec = Rec(op, "nginx", None, None)
            r = timed_call(rec, ep, {"Description": "cluster: made by client %d (%d)" % (index, n)})
            if r is not None and r.status == 200:
                kid = r.json()["KeyMetadata"]["KeyId"]
                rec.obj = ("create", kid)
                with LOCK:
                    C.created.append(kid)
        elif op in ("CreateAlias", "UpdateAlias", "DeleteAlias"):
            name = rng.choice(ALIASES)
            body = {"AliasName": name}
            target = None
            if op != "DeleteAlias":
                with LOCK:
                    targets = shared + C.created[-20:]
                target = rng.choice(targets)
                body["TargetKeyId"] = target
            rec = Rec(op, "nginx", ("alias", name), target)
            timed_call(rec, ep, body)
        elif op == "RotateKeyOnDemand":
            key = rng.choice(shared)
            rec = Rec(op, "nginx", ("rotation", key), None)
            timed_call(rec, ep, {"KeyId": key})
        elif op in ("DisableKey", "EnableKey"):
            key = rng.choice(C.state_keys)
            rec = Rec(op, "nginx", ("state", key), "Disabled" if op == "DisableKey" else "Enabled")
            timed_call(rec, ep, {"KeyId": key})
        else:
            key = rng.choice(shared)
            text = big_policy("cluster-%d-%d" % (index, n))
            rec = Rec(op, "nginx", ("policy", key), text)
            timed_call(rec, ep, {"KeyId": key, "PolicyName": "default", "Policy": text})
        # A client backs off a little after a failure (the database is down, say).
        failed = rec.exc is not None or rec.status not in (200, 404, 409)
        time.sleep(0.02 if failed else rng.uniform(0, 0.004))


def data_keys_on_a(stop, blobs_q):
    """GenerateDataKey on node A directly; each blob goes to the Decrypt thread."""
    rng = random.Random(7)
    ep = endpoint("A")
    n = 0
    while not stop.is_set():
        n += 1
        key = C.quiet_key if n % 4 == 0 else rng.choice(C.data_keys)
        ctx = {"tenant": "cluster", "n": str(n)}
        rec = Rec("GenerateDataKey", "A", ("blob", key), None)
        r = timed_call(rec, ep, {"KeyId": key, "NumberOfBytes": 32, "EncryptionContext": ctx})
        if r is not None and r.status == 200:
            doc = r.json()
            blob = base64.b64decode(doc["CiphertextBlob"])
            pt = base64.b64decode(doc["Plaintext"])
            if doc["KeyId"] != arn(key) or len(pt) != 32:
                rec.kind, rec.why = "unexpected", "answer %r" % {k: doc[k] for k in ("KeyId",)}
            item = (blob, pt, ctx, key)
            with LOCK:
                C.blobs.append(item)
            blobs_q.put(item)
        time.sleep(0.02)


def decrypt_on_b(stop, blobs_q):
    """Decrypt of each blob on node B directly, as it comes."""
    ep = endpoint("B")
    while not stop.is_set() or not blobs_q.empty():
        try:
            blob, pt, ctx, key = blobs_q.get(timeout=0.1)
        except queue.Empty:
            continue
        rec = Rec("Decrypt", "B", ("blob", key), None)
        r = timed_call(rec, ep, {"CiphertextBlob": b64(blob), "EncryptionContext": ctx})
        if r is not None and r.status == 200:
            doc = r.json()
            if doc != {"KeyId": arn(key), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                       "Plaintext": b64(pt)}:
                rec.kind, rec.why = "unexpected", "Decrypt answered %r" % doc
        if stop.is_set():
            break  # the rest are decrypted at the end, on every node


def rotations_on_c(index, stop):
    """RotateKeyOnDemand on node C directly until it is killed: rotations in flight."""
    rng = random.Random(100 + index)
    ep = endpoint("C")
    while not stop.is_set():
        key = rng.choice(C.data_keys + C.state_keys)
        rec = Rec("RotateKeyOnDemand", "C", ("rotation", key), None)
        if timed_call(rec, ep, {"KeyId": key}) is None:
            return


def start_thread(fn, *args):
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    return t


def kill_and_restart_c():
    stop = threading.Event()
    threads = [start_thread(rotations_on_c, i, stop) for i in range(3)]
    time.sleep(0.4)
    stop.set()  # whatever is sent from here on finds C dead or refusing
    C.events["kill"] = time.monotonic()
    status = C.nodes["C"].sigkill()
    C.events["killed"] = time.monotonic()
    eq(status, -signal.SIGKILL, "node C's exit status (killed while serving)")
    for t in threads:
        t.join(timeout=30)
    time.sleep(NODE_DOWN)
    C.events["c-restart"] = time.monotonic()
    start_node("C")
    C.events["c-back"] = time.monotonic()


def crash_and_restart_pg():
    C.events["pg-crash"] = time.monotonic()
    h.pgserver("crash")
    C.events["pg-down"] = time.monotonic()
    time.sleep(PG_DOWN)
    C.events["pg-start"] = time.monotonic()
    h.pgserver("start")
    C.events["pg-back"] = time.monotonic()


# ---- classification -------------------------------------------------------------


def classify(rec):
    """Sets rec.kind: ok, refused (changed nothing), ambiguous (may have
    changed it), not-applied (never reached a node), unexpected."""
    if rec.kind == "unexpected":
        return
    ev = C.events
    overlaps_pg = rec.start <= ev["pg-back"] + PG_SLACK and rec.end >= ev["pg-crash"]
    in_flight_at_kill = rec.start <= ev["killed"] and rec.end >= ev["kill"]
    if rec.exc is not None:
        if rec.via == "C" and isinstance(rec.exc, ConnectionRefusedError) \
                and rec.start >= ev["kill"]:
            rec.kind = "not-applied"  # sent after the kill: nobody listened
        elif rec.via == "C" and in_flight_at_kill:
            rec.kind = "ambiguous"    # in flight when C was killed
        else:
            rec.kind, rec.why = "unexpected", "%s: %r" % (type(rec.exc).__name__, rec.exc)
        return
    if rec.status == 200:
        rec.kind = "ok"
        return
    quiet = rec.obj is not None and rec.obj == ("blob", C.quiet_key)
    if rec.status == 503 and rec.etype == "DependencyTimeoutException" and overlaps_pg \
            and not quiet:
        # Begun once the server was dead and answered before it was started again,
        # by a worker that ran to its end (not a request timeout, whose worker
        # may go on): it cannot have committed anything.
        dead = ev["pg-down"] <= rec.start and rec.end <= ev["pg-start"]
        expired = "did not answer within" in (rec.message or "")
        rec.kind = "not-applied" if dead and not expired else "ambiguous"
        return
    if rec.status == 502 and rec.via == "nginx" and rec.etype is None and in_flight_at_kill:
        rec.kind = "ambiguous"
        return
    refusal = (rec.etype, rec.status) in REFUSALS.get(rec.op, ())
    if refusal and rec.op == "RotateKeyOnDemand" and rec.obj[1] not in C.state_keys:
        refusal = False  # data keys are never disabled
    if refusal:
        rec.kind = "refused"
        return
    rec.kind, rec.why = "unexpected", "HTTP %d %s %r" % (rec.status, rec.etype, rec.body)


def outcome_name(rec):
    if rec.kind == "ok":
        return "200"
    if rec.exc is not None:
        return "%s (%s)" % (type(rec.exc).__name__, rec.kind)
    if rec.etype:
        return "%d %s (%s)" % (rec.status, rec.etype, rec.kind)
    return "%d from nginx (%s)" % (rec.status, rec.kind)


def changes_of(kind):
    """{object: [records]} of the changes to objects of one kind (alias,
    state, policy, rotation)."""
    out = {}
    for rec in C.records:
        if rec.obj and rec.obj[0] == kind and rec.op not in ("GenerateDataKey", "Decrypt"):
            out.setdefault(rec.obj[1], []).append(rec)
    return out


def unbounded(rec):
    """An ambiguous call whose change may still come after its answer: a 503
    of the request timeout, whose worker goes on. Any other ended with its
    worker (a 503 of the database, a node killed under it), so whatever it
    changed, it changed before its answer."""
    return rec.kind == "ambiguous" and "did not answer within" in (rec.message or "")


def candidates(recs, initial):
    """The values an object may hold after these changes, by real-time
    order: those of the acknowledged and ambiguous changes no acknowledged
    change began after (an ambiguous change ended before its answer too), of
    any unbounded one, and the initial value when none was acknowledged."""
    done = [r for r in recs if r.kind == "ok"]
    out = set() if done else {initial}
    for r in recs:
        if r.kind not in ("ok", "ambiguous"):
            continue
        if unbounded(r) or not any(o.start > r.end for o in done):
            out.add(r.value)
    return out


# ---- snapshots --------------------------------------------------------------------


def list_all(ep, op, member, body):
    out, marker = [], None
    while True:
        b = dict(body)
        if marker:
            b["Marker"] = marker
        doc = ok(ep, op, b)
        out += doc[member]
        if not doc["Truncated"]:
            check("NextMarker" not in doc, "%s: no NextMarker when not truncated" % op)
            return out
        marker = doc["NextMarker"]


def snapshot(node):
    """What one node says, asked directly: ListKeys, ListAliases, and per key
    DescribeKey, ListKeyRotations and GetKeyPolicy; per alias name, the key
    DescribeKey resolves it to (None: NotFound)."""
    ep = endpoint(node)
    keys = sorted(k["KeyId"] for k in list_all(ep, "ListKeys", "Keys", {"Limit": 1000}))
    aliases = sorted((a["AliasName"], a.get("TargetKeyId"), a.get("CreationDate"),
                      a.get("LastUpdatedDate"))
                     for a in list_all(ep, "ListAliases", "Aliases", {"Limit": 100}))
    per_key = {}
    for k in keys:
        per_key[k] = {
            "describe": ok(ep, "DescribeKey", {"KeyId": k})["KeyMetadata"],
            "rotations": list_all(ep, "ListKeyRotations", "Rotations", {"KeyId": k, "Limit": 1000}),
            "policy": ok(ep, "GetKeyPolicy", {"KeyId": k, "PolicyName": "default"})["Policy"],
        }
    resolve = {}
    for name in ALIASES:
        r = call(ep, "DescribeKey", {"KeyId": name})
        if r.status == 200:
            resolve[name] = r.json()["KeyMetadata"]["KeyId"]
        else:
            h.check_error_response(r, "NotFoundException", 404)
            resolve[name] = None
    return {"keys": keys, "aliases": aliases, "per_key": per_key, "resolve": resolve}


def norm(x):
    return json.dumps(x, sort_keys=True)


def differences(snaps):
    """Items on which a node's answer differs from node A's: [(what, node)]."""
    out = []
    a = snaps["A"]
    for node in NODES[1:]:
        s = snaps[node]
        for part in ("keys", "aliases"):
            if norm(s[part]) != norm(a[part]):
                out.append(("%s" % part, node))
        for k in sorted(set(a["per_key"]) | set(s["per_key"])):
            for part in ("describe", "rotations", "policy"):
                x = a["per_key"].get(k, {}).get(part)
                y = s["per_key"].get(k, {}).get(part)
                if norm(x) != norm(y):
                    out.append(("%s of %s" % (part, k), node))
        for name in ALIASES:
            if a["resolve"].get(name) != s["resolve"].get(name):
                out.append(("DescribeKey(%s)" % name, node))
    return out


def in_parallel(fns):
    results, errors = [None] * len(fns), [None] * len(fns)

    def run(i):
        try:
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


def psql(sql):
    """Rows of one query on the test's database (tab-separated fields)."""
    u = urllib.parse.urlsplit(C.pg_url)
    binary = shutil.which("psql") or "/usr/bin/psql"
    env = dict(os.environ, PGPASSWORD=urllib.parse.unquote(u.password or ""),
               PGCONNECT_TIMEOUT="10")
    r = subprocess.run([binary, "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
                        "-h", u.hostname, "-p", str(u.port), "-U", urllib.parse.unquote(u.username),
                        "-d", u.path.lstrip("/"), "-c", sql],
                       env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    if r.returncode != 0:
        raise AssertionError("psql failed (%d): %s"
                             % (r.returncode, r.stderr.decode(errors="replace")))
    return [line.split("\t") for line in r.stdout.decode().splitlines() if line]


def hex_uuid(x):
    return str(uuid.UUID(hex=x))


# ---- tests --------------------------------------------------------------------------


@test
def test_three_nodes_one_database_copied_tokens():
    # One root in the database; each node's token is a copy holding it.
    roots = psql("SELECT id, encode(cka_id, 'hex'), state FROM roots")
    eq(len(roots), 1, "roots rows after p11kmsd init")
    eq(psql("SELECT count(*) FROM keys")[0][0], "0", "keys before any CreateKey")
    for node in NODES:
        check(os.path.realpath(C.tokens[node].dir) != os.path.realpath(C.token0.dir),
              "node %s has a token folder of its own" % node)
    # The shared objects of the load, made on different nodes.
    for i in range(DATA_KEYS):
        C.data_keys.append(create_key(endpoint(NODES[i % 3]), "cluster: data key %d" % i))
    for i in range(STATE_KEYS):
        C.state_keys.append(create_key(endpoint(NODES[(i + 1) % 3]), "cluster: state key %d" % i))
    C.quiet_key = create_key(endpoint("C"), "cluster: quiet key")
    for k in C.data_keys + C.state_keys:
        C.initial_policy[k] = ok(endpoint("A"), "GetKeyPolicy", {"KeyId": k})["Policy"]
    # A blob made on each node opens on the others: the versions are wrapped
    # under one root, which every copy of the token holds.
    for maker in NODES:
        key = C.data_keys[0]
        ctx = {"made-on": maker}
        doc = ok(endpoint(maker), "GenerateDataKey", {"KeyId": key, "NumberOfBytes": 32,
                                                       "EncryptionContext": ctx})
        blob, pt = base64.b64decode(doc["CiphertextBlob"]), base64.b64decode(doc["Plaintext"])
        C.blobs.append((blob, pt, ctx, key))
        for reader in NODES + ("nginx",):
            ep = nginx_endpoint() if reader == "nginx" else endpoint(reader)
            eq(ok(ep, "Decrypt", {"CiphertextBlob": b64(blob), "EncryptionContext": ctx}),
               {"KeyId": arn(key), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "Plaintext": b64(pt)},
               "Decrypt on %s of a blob made on %s" % (reader, maker))
    policy = big_policy("size-check")
    check(len(policy) >= POLICY_BYTES, "the policy is %d bytes" % len(policy))
    h.diag("policies of %d bytes (%d statements)"
           % (len(policy), len(json.loads(policy)["Statement"])))


@test
def test_load_with_a_node_killed_and_the_database_crashed():
    stop = threading.Event()
    blobs_q = queue.Queue()
    C.events["start"] = time.monotonic()
    threads = [start_thread(client, i, stop) for i in range(3)]
    threads += [start_thread(data_keys_on_a, stop, blobs_q), start_thread(decrypt_on_b, stop,
                                                                          blobs_q)]
    try:
        time.sleep(max(0.0, C.events["start"] + 0.3 * SECONDS - time.monotonic()))
        kill_and_restart_c()
        time.sleep(max(0.0, C.events["start"] + 0.6 * SECONDS - time.monotonic()))
        crash_and_restart_pg()
        time.sleep(max(0.0, C.events["start"] + SECONDS - time.monotonic()))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    C.events["end"] = time.monotonic()
    check(not any(t.is_alive() for t in threads), "every load thread ended")
    t0 = C.events["start"]
    h.diag("run %.1f s; C killed at %.2f s, serving again at %.2f s; PostgreSQL crashed at "
           "%.2f s, started again %.2f s-%.2f s"
           % (C.events["end"] - t0, C.events["kill"] - t0, C.events["c-back"] - t0,
              C.events["pg-crash"] - t0, C.events["pg-start"] - t0, C.events["pg-back"] - t0))

    died = []
    for node in NODES:
        status = C.nodes[node].proc.poll() if C.nodes[node].proc else None
        if status is not None:
            died.append("node %s exited with status %d%s during the load"
                        % (node, status, " (SIGSEGV)" if status == -signal.SIGSEGV else ""))
    for line in died:
        h.diag(line)
        C.findings.append(line)
    for rec in C.records:
        classify(rec)
    table = {}
    for rec in C.records:
        key = "%s via %s: %s" % (rec.op, rec.via, outcome_name(rec))
        table[key] = table.get(key, 0) + 1
    for line in sorted(table):
        h.diag("  %6d  %s" % (table[line], line))
    changes = [r for r in C.records if r.kind == "ok" and r.op not in ("GenerateDataKey",
                                                                          "Decrypt")]
    amb = [r for r in C.records if r.kind == "ambiguous"]
    h.diag("changes acknowledged (200): %d; calls that may or may not have changed something: "
           "%d; blobs: %d" % (len(changes), len(amb), len(C.blobs)))
    unexpected = [r for r in C.records if r.kind == "unexpected"]
    shown = {}
    for r in unexpected:
        shown[outcome_name(r)] = shown.get(outcome_name(r), 0) + 1
        if shown[outcome_name(r)] > 5:
            continue  # five of each kind
        h.diag("unexpected: %s via %s at %.3f-%.3f s: %s"
               % (r.op, r.via, r.start - t0, r.end - t0, r.why))
        C.findings.append("unexpected answer: %s via %s: %s" % (r.op, r.via, r.why))

    # What the faults did.
    in_flight = [r for r in C.records if r.via == "C" and r.kind == "ambiguous"]
    h.diag("rotations in flight on C when it was killed: %d" % len(in_flight))
    down = [r for r in C.records if r.status == 503 and r.kind in ("ambiguous", "not-applied")]
    after = [r for r in changes if r.start > C.events["pg-back"]]
    gdk_down = [r for r in C.records if r.op == "GenerateDataKey" and r.kind == "ok"
                and r.start >= C.events["pg-down"] and r.end <= C.events["pg-start"]]
    quiet_down = [r for r in C.records if r.obj == ("blob", C.quiet_key) and r.kind == "ok"
                  and r.start >= C.events["pg-down"] and r.end <= C.events["pg-start"]]
    h.diag("503 DependencyTimeoutException while PostgreSQL was down: %d (%d of them begun and "
           "answered while it was down: nothing committed); changes acknowledged after it came "
           "back: %d" % (len(down), len([r for r in down if r.kind == "not-applied"]), len(after)))
    h.diag("while PostgreSQL was down: GenerateDataKey on A answered 200 %d times, %d of them "
           "and %d Decrypts on B under the quiet key (cached, never changed)"
           % (len(gdk_down), len([r for r in quiet_down if r.op == "GenerateDataKey"]),
              len([r for r in quiet_down if r.op == "Decrypt"])))
    # nginx: a request C refused went to the next node; C served again after its restart.
    retried, c_after = 0, 0
    c_addr = "127.0.0.1:%d" % C.ports["C"]
    wall_back = time.time() - (time.monotonic() - C.events["c-back"])
    for when, tried, status in C.nginx.access():
        if len(tried) > 1 and tried[0] == c_addr:
            retried += 1
        if tried[-1] == c_addr and when > wall_back and status == "200":
            c_after += 1
    h.diag("nginx: %d requests refused by C and passed to the next node; C answered %d after "
           "its restart" % (retried, c_after))

    eq(died, [], "nodes that died (C was killed on purpose and started again)")
    eq(len(unexpected), 0, "answers of a type not allowed")
    check(down, "no call failed while PostgreSQL was down (%.1f s)" % PG_DOWN)
    check(after, "no change was acknowledged after PostgreSQL came back")
    check(quiet_down, "no call under the quiet key was answered while PostgreSQL was down")
    check(retried >= 1, "nginx passed no request to the next node while C was down")
    check(c_after >= 1, "C answered nothing through nginx after its restart")


@test
def test_nodes_agree_within_the_bound():
    """Snapshots of the three nodes, asked directly, until they agree; 0
    differences allowed in a snapshot begun CONVERGE after the load stopped
    (a second one is taken anyway when the first took longer: a slow
    machine's, or valgrind's)."""
    deadline = C.events["end"] + CONVERGE
    time.sleep(0.2)  # a few of the nodes' polls (refresh_ms)
    rounds = 0
    while True:
        rounds += 1
        began = time.monotonic()
        snaps = dict(zip(NODES, in_parallel([lambda n=n: snapshot(n) for n in NODES])))
        diff = differences(snaps)
        if not diff or (time.monotonic() >= deadline and rounds >= 2):
            break
        time.sleep(0.1)
    C.final = snaps
    C.converged_after = began - C.events["end"] if not diff else None
    keys = len(snaps["A"]["keys"])
    h.diag("%d keys, %d aliases; %d snapshot rounds; %d differences between the nodes%s"
           % (keys, len(snaps["A"]["aliases"]), rounds, len(diff),
              "" if diff else " (agreeing snapshot begun %.2f s after the load)"
              % C.converged_after))
    for what, node in diff[:20]:
        h.diag("difference: %s on %s" % (what, node))
        C.findings.append("%s differs on %s" % (what, node))
    eq(len(diff), 0, "differences between the nodes' answers")


@test
def test_every_acknowledged_change_is_visible_on_every_node():
    check(C.final, "the nodes' snapshots were taken")
    lost = []
    ok_changes = {}
    for rec in C.records:
        if rec.kind == "ok" and rec.op not in ("GenerateDataKey", "Decrypt"):
            ok_changes[rec.op] = ok_changes.get(rec.op, 0) + 1
    # Keys a CreateKey returned.
    for kid in C.created:
        for node in NODES:
            s = C.final[node]
            if kid not in s["keys"] or s["per_key"][kid]["describe"]["KeyId"] != kid:
                lost.append("CreateKey %s: not listed on %s" % (kid, node))
    extra = len(C.final["A"]["keys"]) - len(C.created) - DATA_KEYS - STATE_KEYS - 1
    amb_creates = len([r for r in C.records if r.op == "CreateKey" and r.kind == "ambiguous"])
    check(0 <= extra <= amb_creates, "%d keys besides those acknowledged; %d CreateKey calls "
          "ended unknown" % (extra, amb_creates))
    # State, policy, alias: the value left by the last acknowledged change, or a concurrent one's.
    states, policies, aliases = changes_of("state"), changes_of("policy"), changes_of("alias")
    for key in C.state_keys:
        cands = candidates(states.get(key, []), "Enabled")
        for node in NODES:
            got = C.final[node]["per_key"][key]["describe"]["KeyState"]
            if got not in cands:
                lost.append("KeyState of %s on %s: %s, expected one of %s" % (key, node, got,
                                                                             sorted(cands)))
    for key in C.data_keys + C.state_keys:
        cands = candidates(policies.get(key, []), C.initial_policy[key])
        for node in NODES:
            got = C.final[node]["per_key"][key]["policy"]
            if got not in cands:
                lost.append("policy of %s on %s: Id %r, expected one of %r"
                             % (key, node, json.loads(got).get("Id"),
                                sorted(json.loads(c).get("Id") or "" for c in cands)))
    for name in ALIASES:
        cands = candidates(aliases.get(name, []), None)
        for node in NODES:
            s = C.final[node]
            listed = [t for n, t, _, _ in s["aliases"] if n == name]
            got = listed[0] if listed else None
            if len(listed) > 1 or got not in cands:
                lost.append("alias %s on %s: %r, expected one of %r" % (name, node, listed, cands))
            if s["resolve"][name] != got:
                lost.append("alias %s on %s: DescribeKey resolves it to %s, ListAliases says %s"
                            % (name, node, s["resolve"][name], got))
    exact = sum(1 for recs, init in
                [(states.get(k, []), "Enabled") for k in C.state_keys]
                + [(policies.get(k, []), C.initial_policy[k]) for k in C.data_keys + C.state_keys]
                + [(aliases.get(n, []), None) for n in ALIASES]
                if len(candidates(recs, init)) == 1)
    h.diag("states, policies and aliases whose last value was known exactly from the real-time "
           "order of the answers: %d of %d (the others: one of a few concurrent changes)"
           % (exact, len(C.state_keys) + DATA_KEYS + STATE_KEYS + len(ALIASES)))
    h.diag("calls ending unknown whose change could come after their answer (request timeout): "
           "%d" % len([r for r in C.records if unbounded(r)]))
    # Rotations: every acknowledged one listed, none beyond the ambiguous ones.
    rotations = changes_of("rotation")
    acked_rotations = 0
    for key in C.data_keys + C.state_keys:
        recs = rotations.get(key, [])
        acked = len([r for r in recs if r.kind == "ok"])
        maybe = len([r for r in recs if r.kind == "ambiguous"])
        acked_rotations += acked
        for node in NODES:
            listed = [e for e in C.final[node]["per_key"][key]["rotations"]
                      if e["RotationType"] == "ON_DEMAND"]
            if len(listed) < acked:
                lost.append("ListKeyRotations of %s on %s: %d ON_DEMAND, %d acknowledged"
                            % (key, node, len(listed), acked))
            if len(listed) > acked + maybe:
                lost.append("ListKeyRotations of %s on %s: %d ON_DEMAND, only %d acknowledged "
                            "and %d unknown" % (key, node, len(listed), acked, maybe))
            if len(listed) != len(C.final[node]["per_key"][key]["rotations"]):
                lost.append("ListKeyRotations of %s on %s: rotations other than ON_DEMAND"
                            % (key, node))
    h.diag("changes acknowledged: %s"
           % ", ".join("%s %d" % kv for kv in sorted(ok_changes.items())))
    h.diag("%d acknowledged changes not visible on every node" % len(lost))
    for line in lost[:20]:
        h.diag("lost: " + line)
        C.findings.append(line)
    eq(len(lost), 0, "acknowledged changes not visible on every node")
    check(acked_rotations > 0 and ok_changes.get("PutKeyPolicy", 0) > 0
          and ok_changes.get("UpdateAlias", 0) > 0 and ok_changes.get("DisableKey", 0) > 0
          and ok_changes.get("CreateKey", 0) > 0, "every kind of change was acknowledged at "
          "least once: %r" % ok_changes)


@test
def test_every_blob_decrypts_on_every_node():
    blobs = list(C.blobs)
    failures = []

    def worker(part):
        for blob, pt, ctx, key in part:
            for node in NODES:
                r = call(endpoint(node), "Decrypt", {"CiphertextBlob": b64(blob),
                                                     "EncryptionContext": ctx})
                want = {"KeyId": arn(key), "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                        "Plaintext": b64(pt)}
                if r.status != 200 or r.json() != want:
                    with LOCK:
                        failures.append("blob under %s (version %d) on %s: HTTP %d %r"
                                        % (key, int.from_bytes(blob[17:21], "big"), node,
                                           r.status, r.body[:200]))

    in_parallel([lambda p=blobs[i::6]: worker(p) for i in range(6)])
    versions = {(key, int.from_bytes(b[17:21], "big")) for b, _, _, key in blobs}
    h.diag("%d blobs under %d key versions, decrypted on each of the %d nodes: %d failures"
           % (len(blobs), len(versions), len(NODES), len(failures)))
    for f in failures[:20]:
        h.diag("failed: " + f)
        C.findings.append(f)
    eq(len(failures), 0, "blobs that do not decrypt on every node")


@test
def test_database_agrees():
    check(C.final, "the nodes' snapshots were taken")
    s = C.final["A"]
    keys = {hex_uuid(r[0]): r[1:] for r in psql(
        "SELECT encode(id, 'hex'), state, on_demand, current_vid, coalesce(md5(policy), '') "
        "FROM keys WHERE state <> 3")}
    versions = {hex_uuid(r[0]): [int(x) for x in r[1:]] for r in psql(
        "SELECT encode(v.key_id, 'hex'), count(*), max(v.n), "
        "count(*) FILTER (WHERE v.rotation = 2), count(*) FILTER (WHERE v.rotation = 1), "
        "count(*) FILTER (WHERE v.vid = k.current_vid AND v.n = (SELECT max(n) FROM versions w "
        "WHERE w.key_id = v.key_id)) "
        "FROM versions v JOIN keys k ON k.id = v.key_id GROUP BY v.key_id")}
    aliases = sorted((r[0], hex_uuid(r[1])) for r in psql(
        "SELECT name, encode(target, 'hex') FROM aliases ORDER BY name"))
    bad = []
    if sorted(keys) != s["keys"]:
        bad.append("keys: the database has %d, the nodes list %d" % (len(keys), len(s["keys"])))
    state_names = {"0": "Enabled", "1": "Disabled", "2": "PendingDeletion"}
    for k in s["keys"]:
        if k not in keys or k not in versions:
            continue
        state, on_demand, _, policy_md5 = keys[k]
        count, max_n, od_rows, auto_rows, current_is_last = versions[k]
        listed = s["per_key"][k]["rotations"]
        if state_names.get(state) != s["per_key"][k]["describe"]["KeyState"]:
            bad.append("%s: state %s in the database" % (k, state))
        if policy_md5 != hashlib.md5(s["per_key"][k]["policy"].encode()).hexdigest():
            bad.append("%s: another policy in the database" % k)
        if count != 1 + len(listed):
            bad.append("%s: %d versions rows, %d rotations listed" % (k, count, len(listed)))
        if max_n != count:
            bad.append("%s: ordinals up to %d for %d rows" % (k, max_n, count))
        if od_rows != int(on_demand) or od_rows != len(listed) or auto_rows != 0:
            bad.append("%s: %d ON_DEMAND rows, on_demand %s, %d AUTOMATIC rows"
                       % (k, od_rows, on_demand, auto_rows))
        if current_is_last != 1:
            bad.append("%s: the current version is not the last" % k)
    if aliases != sorted((n, t) for n, t, _, _ in s["aliases"]):
        bad.append("aliases: database %r, nodes %r" % (aliases, s["aliases"]))
    rows = sum(v[0] for v in versions.values())
    h.diag("the database: %d keys, %d versions rows, %d aliases; %d disagreements with the nodes"
           % (len(keys), rows, len(aliases), len(bad)))
    for b in bad[:20]:
        h.diag("database: " + b)
        C.findings.append(b)
    eq(len(bad), 0, "disagreements between the database and the nodes")


@test
def test_nodes_logs():
    """No node logged stored key material that does not unwrap, a missing
    token object or a sanitizer's report; every node is still running."""
    for node in NODES:
        log = C.nodes[node].stderr_text()
        for bad in ("does not unwrap", "token object is missing", "AddressSanitizer",
                    "runtime error"):
            check(bad not in log, "node %s's log says %r" % (node, bad))
        check(C.nodes[node].proc is not None and C.nodes[node].proc.poll() is None,
              "node %s is running" % node)


@test
def test_report():
    """Not a check of its own: the figures, and any finding."""
    counts = {}
    for rec in C.records:
        counts[rec.kind] = counts.get(rec.kind, 0) + 1
    h.diag("calls: %s" % ", ".join("%s %d" % kv for kv in sorted(counts.items())))
    for f in C.findings:
        h.diag("finding: " + f)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
