#!/usr/bin/python3
"""Two p11kmsd nodes on one SoftHSM2 token, with nginx in front of them
(DESIGN §5 and §10): data keys cross nodes, lifecycle changes made on one node
reach the other within a stated bound, and concurrent changes fired at both
nodes at the same moment are neither lost nor duplicated. TAP output.

The propagation bound this test asserts:

    A change acknowledged by one node is visible on the other within BOUND
    (2 s): each node polls the token's change marker every refresh_ms
    (200 ms here) and then re-reads what changed, so the bound is refresh_ms
    plus one re-read (plus, on SoftHSM2, up to BUMP_INTERVAL: see
    heal_softhsm_index), with ample room for a loaded machine. A Decrypt of a
    blob naming a key or a key version the node has not seen yet does not
    wait for that poll at all: the node re-reads that key at once, so such a
    Decrypt succeeds on its first try.

Rounds of the race test: P11KMS_MULTINODE_ROUNDS (default 100).
"""

import base64
import os
import shutil
import signal
import socket
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

BOUND = 2.0  # seconds: refresh_ms (0.2 s) plus a re-read, with room to spare
POLL_PAUSE = 0.02
ROUNDS = int(os.environ.get("P11KMS_MULTINODE_ROUNDS") or "100")
NODE_SETTINGS = {
    "refresh_ms": "200",
    "day_seconds": "1",
    "rotation_min_days": "1",
    "max_on_demand_rotations": "100000",
    "full_refresh_seconds": "5",
}
ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/bin/nginx")


class Ctx:
    ws = None
    token = None
    principal = None
    a = None          # node A (a harness.Server)
    b = None          # node B
    nginx = None      # the nginx subprocess
    bumper = None     # the token generation bumper (heal_softhsm_index)
    nginx_port = None
    nginx_dir = None
    names = {}        # endpoint -> "A", "B", "nginx"
    delays = []       # (what, seconds) of every propagation measured
    blobs = []        # (what, blob, plaintext, context, key id) to decrypt at the end


C = Ctx()


# ---- set-up and tear-down ------------------------------------------------------


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_binary():
    for path in NGINX_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    path = shutil.which("nginx")
    if path:
        return path
    raise RuntimeError("nginx is not installed (scripts/deps.sh installs the Debian package)")


def nginx_config(port):
    d = C.nginx_dir
    lines = [
        "# p11kms multi-node integration test: nginx in front of two p11kmsd nodes",
        "daemon off;",
        "worker_processes 1;",
        "pid %s;" % os.path.join(d, "nginx.pid"),
        "error_log %s warn;" % os.path.join(d, "error.log"),
    ]
    if os.geteuid() == 0:
        # The workspace is private to this user; nginx's workers must reach it.
        lines.append("user root;")
    lines += [
        "events { worker_connections 256; }",
        "http {",
        "    log_format upstreams '$upstream_addr $status';",
        "    access_log %s upstreams;" % os.path.join(d, "access.log"),
        "    client_body_temp_path %s;" % os.path.join(d, "client_body"),
        "    proxy_temp_path %s;" % os.path.join(d, "proxy"),
        "    fastcgi_temp_path %s;" % os.path.join(d, "fastcgi"),
        "    uwsgi_temp_path %s;" % os.path.join(d, "uwsgi"),
        "    scgi_temp_path %s;" % os.path.join(d, "scgi"),
        "    upstream p11kms {",
        "        server 127.0.0.1:%d;" % C.a.port,
        "        server 127.0.0.1:%d;" % C.b.port,
        "    }",
        "    server {",
        "        listen 127.0.0.1:%d;" % port,
        "        location / {",
        "            proxy_pass http://p11kms;",
        # SigV4 signs the Host header: the client signed for nginx's address.
        "            proxy_set_header Host $http_host;",
        "            proxy_http_version 1.1;",
        "            proxy_set_header Connection \"\";",
        "        }",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def start_nginx():
    binary = nginx_binary()
    C.nginx_dir = C.ws.sub("nginx")
    os.mkdir(C.nginx_dir, 0o700)
    last = None
    for _ in range(5):  # the free port may be taken between the probe and nginx's bind
        port = free_port()
        conf = h.write_private(os.path.join(C.nginx_dir, "nginx.conf"), nginx_config(port))
        stderr = open(os.path.join(C.nginx_dir, "stderr.log"), "ab")
        try:
            proc = subprocess.Popen([binary, "-p", C.nginx_dir, "-c", conf,
                                     "-e", os.path.join(C.nginx_dir, "error.log")],
                                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                    preexec_fn=h._die_with_parent)
        finally:
            stderr.close()
        deadline = time.monotonic() + h.READY_TIMEOUT
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                C.nginx, C.nginx_port = proc, port
                return
            except OSError:
                time.sleep(0.05)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        last = nginx_log()
    raise RuntimeError("nginx did not start:\n%s" % last)


def nginx_log():
    text = ""
    for name in ("stderr.log", "error.log"):
        try:
            with open(os.path.join(C.nginx_dir, name), "rb") as f:
                text += f.read().decode("utf-8", "replace")
        except OSError:
            pass
    return text


def stop_nginx():
    proc, C.nginx = C.nginx, None
    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGQUIT)  # graceful shutdown
        try:
            status = proc.wait(timeout=h.STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("nginx did not stop within %.0f s" % h.STOP_TIMEOUT)
    else:
        status = proc.returncode
    if status != 0:
        raise AssertionError("nginx exited with status %d:\n%s" % (status, nginx_log()))


# The token generation "bumper": see heal_softhsm_index below.
BUMPER = r"""
import sys, time, PyKCS11
module, label, pin_file = sys.argv[1:4]
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slot = [s for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.strip() == label][0]
session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
with open(pin_file) as f:
    session.login(f.read().strip())
template = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA), (PyKCS11.CKA_TOKEN, True),
            (PyKCS11.CKA_PRIVATE, True), (PyKCS11.CKA_APPLICATION, "p11kms-test-bumper"),
            (PyKCS11.CKA_LABEL, "p11kms-test-bumper")]
print("ready", flush=True)
while True:
    session.destroyObject(session.createObject(template))
    time.sleep(float(sys.argv[4]))
"""
BUMP_INTERVAL = 0.05


def heal_softhsm_index():
    """Works around a defect of SoftHSM2's file object store (2.6.1, Debian
    12), not of p11kms: a process re-reads the token's list of objects only
    when the token's generation file holds another number than the one it
    last saw, and when it creates or destroys an object it takes the file's
    new number as seen. So when node B creates or destroys an object after
    node A changed the token and before B's next look, B does not see A's new
    objects (and keeps seeing A's removed ones) until some other process
    changes the token again: a key made on A stays unknown to B, B's scans
    miss records, B writes generations on a stale base. A third process that
    creates and destroys an object of its own every BUMP_INTERVAL makes every
    node re-read the list within that time, as objects on a real shared HSM
    are seen at once (DESIGN §5). Its objects are not p11kms's (another
    CKA_APPLICATION), so no node ever reads them."""
    env = dict(os.environ, SOFTHSM2_CONF=C.token.conf)
    C.bumper = subprocess.Popen(
        [sys.executable, "-c", BUMPER, h.SOFTHSM_MODULE, C.token.label, C.token.pin_file,
         str(BUMP_INTERVAL)],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=h._die_with_parent)
    line = C.bumper.stdout.readline()
    if line.strip() != b"ready":
        raise RuntimeError("the token bumper did not start: %r %r" % (line, C.bumper.stderr.read()))


def stop_bumper():
    proc, C.bumper = C.bumper, None
    if proc is None:
        return
    if proc.poll() is not None:
        raise AssertionError("the token bumper died: %r" % proc.stderr.read())
    proc.terminate()
    proc.wait(timeout=h.STOP_TIMEOUT)
    proc.stdout.close()
    proc.stderr.close()


def setup():
    C.ws = h.Workspace()
    C.token = h.make_token(C.ws.sub("token"), "p11kms-multinode")
    heal_softhsm_index()
    C.principal = h.new_principal("multinode")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.principal])
    servers = []
    for name in ("a", "b"):
        # One configuration file per node, both naming the same module, token
        # and PIN; start_config_server hands both the fixture's SOFTHSM2_CONF.
        conf = h.write_config(C.ws.sub("node-%s.conf" % name), C.token, creds, **NODE_SETTINGS)
        servers.append(h.start_config_server(conf, C.token, C.ws.sub("node-%s.log" % name)))
        setattr(C, name, servers[-1])
    start_nginx()
    C.names = {C.a.endpoint: "A", C.b.endpoint: "B", nginx_endpoint(): "nginx"}
    h.diag("node A %s, node B %s, nginx %s" % (C.a.endpoint, C.b.endpoint, nginx_endpoint()))


def teardown():
    try:
        try:
            try:
                stop_nginx()
            finally:
                stop_bumper()
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
    return "http://127.0.0.1:%d" % C.nginx_port


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


# ---- 1. data keys across nodes ---------------------------------------------------


@test
def test_data_keys_cross_nodes_and_nginx():
    a, b, n = C.a.endpoint, C.b.endpoint, nginx_endpoint()
    key = create_key(a, "multinode: made on A")
    made = time.monotonic()

    def usable_on_b():
        r = gdk_request(b, key, {"probe": "usable-on-b"})
        if is_error(r, "NotFoundException", 404):
            return None
        return check_gdk(r, "GenerateDataKey on B of a key made on A", key)

    _, delay = within_bound("key made on A usable on B", made, usable_on_b)
    h.diag("a key made on A served GenerateDataKey on B after %.3f s" % delay)

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
    with open(os.path.join(C.nginx_dir, "access.log")) as f:
        upstreams = [line.split()[0] for line in f if line.strip()]
    eq(sorted(set(upstreams)), sorted(["127.0.0.1:%d" % C.a.port, "127.0.0.1:%d" % C.b.port]),
       "upstreams nginx used")


@test
def test_decrypt_of_unseen_key_and_version_at_once():
    a, b = C.a.endpoint, C.b.endpoint
    unseen = 0
    for attempt in range(5):
        key = create_key(a, "multinode: unseen by B %d" % attempt)
        ctx = {"attempt": str(attempt)}
        blob, pt = gdk(a, key, ctx, key)
        r = call(b, "DescribeKey", {"KeyId": key})
        not_seen = is_error(r, "NotFoundException", 404)
        # First try, no polling: B re-reads a key a blob names when it has not seen it.
        decrypt(b, blob, ctx, key, pt, "of a blob under a key B had not seen (attempt %d)" % attempt)
        unseen += not_seen
        if unseen >= 2:
            break
    check(unseen >= 1, "B had already seen every new key before the Decrypt: the path of an "
          "unseen key was not exercised")
    h.diag("%d of the keys were unknown to B right before its Decrypt" % unseen)

    # A version B has not seen: rotate on A, a data key on A under the new
    # version, and a Decrypt on B at once.
    new_version_unseen = 0
    for attempt in range(5):
        before = blob_vid(gdk(a, key, {"before-rotation": str(attempt)}, key)[0])
        ok(a, "RotateKeyOnDemand", {"KeyId": key})
        ctx = {"after-rotation": str(attempt)}
        blob, pt = gdk(a, key, ctx, key)
        check(blob_vid(blob) != before, "A's data key after RotateKeyOnDemand uses a new version")
        b_vid = blob_vid(gdk(b, key, {"b-before-decrypt": str(attempt)}, key)[0])
        decrypt(b, blob, ctx, key, pt, "of a blob under a version B had not seen")
        if b_vid != blob_vid(blob):
            new_version_unseen += 1
            # B re-read the whole key for that Decrypt: it now uses the new version too.
            after = blob_vid(gdk(b, key, {"b-after-decrypt": str(attempt)}, key)[0])
            h.diag("B's data key right after that Decrypt: version %s the new one"
                   % ("is" if after == blob_vid(blob) else "is NOT"))
            break
    check(new_version_unseen >= 1, "B had seen every new version before the Decrypt: the path "
          "of an unseen version was not exercised")


# ---- 2. changes propagate within the bound ----------------------------------------


@test
def test_lifecycle_changes_propagate():
    a, b = C.a.endpoint, C.b.endpoint
    key = create_key(a, "multinode: lifecycle")
    other = create_key(a, "multinode: alias target")
    made = time.monotonic()
    for k in (key, other):
        within_bound("key made on A known to B", made,
                     lambda k=k: not is_error(call(b, "DescribeKey", {"KeyId": k}),
                                              "NotFoundException", 404))

    # RotateKeyOnDemand on A: B's data keys use the new version.
    old = blob_vid(gdk(b, key, {"step": "before-rotation"}, key)[0])
    eq(blob_vid(gdk(a, key, {"step": "before-rotation-a"}, key)[0]), old, "both nodes' version")
    eq(ok(a, "RotateKeyOnDemand", {"KeyId": key}), {"KeyId": arn(key)}, "RotateKeyOnDemand")
    acked = time.monotonic()
    new = blob_vid(gdk(a, key, {"step": "after-rotation-a"}, key)[0])
    check(new != old, "A's data key uses a new version right after its own rotation")

    def b_uses_new():
        vid = blob_vid(gdk(b, key, {"step": "poll-rotation"}, key)[0])
        check(vid in (old, new), "B's version %d is the old or the new one" % vid)
        return vid == new

    _, d = within_bound("rotation on A seen by B's GenerateDataKey", acked, b_uses_new)
    h.diag("rotation on A: B used the new version after %.3f s" % d)

    # DisableKey on A: B refuses with DisabledException.
    expect_ok(call(a, "DisableKey", {"KeyId": key}), "DisableKey on A")
    acked = time.monotonic()
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
    acked = time.monotonic()
    within_bound("CreateAlias on A seen by B", acked,
                 lambda: describe(b, alias)["KeyId"] == key
                 if call(b, "DescribeKey", {"KeyId": alias}).status == 200 else False)
    expect_ok(call(b, "UpdateAlias", {"AliasName": alias, "TargetKeyId": other}),
              "UpdateAlias on B")
    acked = time.monotonic()
    eq(describe(b, alias)["KeyId"], other, "B resolves the alias to the new key at once")
    _, d = within_bound("UpdateAlias on B seen by A", acked,
                        lambda: describe(a, alias)["KeyId"] == other)
    h.diag("alias update on B: A resolved it to the new key after %.3f s" % d)
    gdk(a, alias, {"step": "alias-on-a"}, other)
    eq([x for x in list_aliases(a) if x[0] == alias], [x for x in list_aliases(b) if x[0] == alias],
       "the alias as both nodes list it")


# ---- 3. concurrent changes on both nodes --------------------------------------------


# One raced key for all the rounds: it ends with over 100 versions (two
# on-demand rotations every third round, a scheduled one every second), while
# its record stays small (old versions move to history objects). That matters
# on SoftHSM2 2.6.1 (file store), which permanently loses, in a process
# reading the token, about 1% of the objects larger than its 4 KB stdio buffer
# that another process writes meanwhile (reproduced without p11kms: one
# process creating 12 KB data objects, another finding objects).
MIN_VERSIONS = 100
# A round lasts at least this long, so that each raced key sees several
# scheduled rotations (one a second) racing on both nodes.
ROUND_SECONDS = 0.35


class Race:
    key = None        # the raced key: scheduled rotation every "day" (1 s)
    keys = []         # every raced key, the current one last
    acked = {}        # raced key -> RotateKeyOnDemand calls answered 200
    x = None          # the raced alias's two targets
    y = None
    alias = "alias/multinode-race"
    kinds = {}
    waits = []        # seconds until both nodes agreed, per round
    agree_tries = []
    out_of_order = 0  # rotation lists whose dates were not in list order
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
        return {"A only": sorted(sx - sy), "B only": sorted(sy - sx), "lengths": (len(x), len(y))}
    return (x, y)


def agree(what, since):
    """Waits until both nodes report the same snapshot; returns it."""
    a, b = C.a.endpoint, C.b.endpoint
    last = [None]
    tries = [0]

    def probe():
        tries[0] += 1
        sa, sb = in_parallel(lambda: snapshot(a), lambda: snapshot(b))
        last[0] = (sa, sb)
        return sa if sa == sb else None

    try:
        snap, delay = within_bound(what, since, probe)
    except AssertionError:
        if last[0] is None:
            raise
        sa, sb = last[0]
        diff = {k: difference(sa[k], sb[k]) for k in sa if sa[k] != sb[k]}
        R.findings.append("%s: nodes disagree after %.1f s: %r" % (what, BOUND, diff))
        raise AssertionError("%s: the nodes still disagree after %.1f s: %r" % (what, BOUND, diff))
    R.waits.append(delay)
    R.agree_tries.append(tries[0])
    return snap


def check_rotations(rotations, what, key=None):
    """Every acknowledged on-demand rotation is listed exactly once, and
    scheduled rotations racing on both nodes gave one AUTOMATIC entry per
    period (consecutive AUTOMATIC entries at least 1 s apart)."""
    acked = R.acked[key or R.key]
    on_demand = sum(1 for _, t in rotations if t == "ON_DEMAND")
    if on_demand != acked:
        R.findings.append("%s: %d ON_DEMAND entries listed, %d RotateKeyOnDemand acknowledged"
                          % (what, on_demand, acked))
    eq(on_demand, acked,
       "%s: ON_DEMAND entries == acknowledged RotateKeyOnDemand calls" % what)
    # One AUTOMATIC entry per due time: at least a period (1 s) between any two.
    # (The list is in version order; a rotation's date is when its node began
    # it, so two rotations made at once can be listed a second out of order.)
    dates = sorted(d for d, t in rotations if t == "AUTOMATIC")
    for prev, cur in zip(dates, dates[1:]):
        if cur - prev < 1:
            R.findings.append("%s: AUTOMATIC rotations %d and %d less than a period apart"
                              % (what, prev, cur))
        check(cur - prev >= 1, "%s: two AUTOMATIC rotations %d s apart (%r, %r): one due "
              "rotation was made twice" % (what, cur - prev, prev, cur))
    listed = [d for d, _ in rotations]
    if listed != sorted(listed):
        R.out_of_order += 1


def round_ops(i):
    """The two concurrent changes of round i: (kind, op on A, op on B)."""
    kind = ("rotate", "disable-enable", "alias")[i % 3]
    flip = (i // 3) % 2
    if kind == "rotate":
        op = ("RotateKeyOnDemand", {"KeyId": R.key})
        return kind, op, op
    if kind == "disable-enable":
        off, on = ("DisableKey", {"KeyId": R.key}), ("EnableKey", {"KeyId": R.key})
        return (kind, off, on) if not flip else (kind, on, off)
    tx, ty = (R.x, R.y) if not flip else (R.y, R.x)
    return (kind, ("UpdateAlias", {"AliasName": R.alias, "TargetKeyId": tx}),
            ("UpdateAlias", {"AliasName": R.alias, "TargetKeyId": ty}))


def run_round(i):
    a, b = C.a.endpoint, C.b.endpoint
    kind, op_a, op_b = round_ops(i)
    gdk_ref = R.alias if kind == "alias" else R.key
    ctx_a = {"round": str(i), "gdk-on": "A"}
    ctx_b = {"round": str(i), "gdk-on": "B"}
    ra, rb, ga, gb = in_parallel(lambda: call(a, *op_a), lambda: call(b, *op_b),
                                 lambda: gdk_request(a, gdk_ref, ctx_a),
                                 lambda: gdk_request(b, gdk_ref, ctx_b))
    done = time.monotonic()
    what = "round %d (%s)" % (i, kind)
    for r, op, node in ((ra, op_a, "A"), (rb, op_b, "B")):
        if r.status != 200:
            R.findings.append("%s: %s on %s answered %d %r" % (what, op[0], node, r.status, r.body))
        expect_ok(r, "%s: %s on %s" % (what, op[0], node))
    for r, ctx, node in ((ga, ctx_a, "A"), (gb, ctx_b, "B")):
        gwhat = "%s: GenerateDataKey on %s" % (what, node)
        if kind == "disable-enable" and is_error(r, "DisabledException", 409):
            continue
        if r.status != 200:
            R.findings.append("%s answered %d %r" % (gwhat, r.status, r.body))
        blob, pt, kid = check_gdk(r, gwhat, None if kind == "alias" else R.key)
        if kind == "alias":
            check(kid in (R.x, R.y), "%s: the blob is under one of the alias's targets" % gwhat)
        C.blobs.append((gwhat, blob, pt, ctx, kid))
    if kind == "rotate":
        R.acked[R.key] += 2
    snap = agree(what, done)
    check_rotations(snap["rotations"], what)
    eq(snap["version"] is not None, snap["KeyState"] == "Enabled", what + ": version when Enabled")
    if kind == "disable-enable":
        state = snap["KeyState"]
        check(snap["KeyState"] in ("Enabled", "Disabled"), "%s: KeyState %s is one of the two "
              "acknowledged" % (what, snap["KeyState"]))
        if snap["KeyState"] == "Disabled":
            # The next rounds need the key in use again.
            expect_ok(call(a if i % 2 else b, "EnableKey", {"KeyId": R.key}), "EnableKey")
            snap = agree(what + " re-enabled", time.monotonic())
            eq(snap["KeyState"], "Enabled", what + ": KeyState after EnableKey")
        outcome = kind + " -> " + state
        R.kinds[outcome] = R.kinds.get(outcome, 0) + 1
    if kind == "alias":
        target = [t for n, t, _, _ in snap["aliases"] if n == R.alias]
        eq(len(target), 1, what + ": the raced alias is listed once")
        check(target[0] in (R.x, R.y), "%s: the alias names one of the two targets" % what)
        outcome = "alias -> " + ("x" if target[0] == R.x else "y")
        R.kinds[outcome] = R.kinds.get(outcome, 0) + 1
    return kind, snap


def start_raced_key():
    """A new raced key, made on A, rotation every day (1 s) enabled on B."""
    a, b = C.a.endpoint, C.b.endpoint
    key = create_key(a, "multinode: raced %d" % len(R.keys))
    made = time.monotonic()
    within_bound("raced key made on A known to B", made,
                 lambda: not is_error(call(b, "DescribeKey", {"KeyId": key}),
                                      "NotFoundException", 404))
    expect_ok(call(b, "EnableKeyRotation", {"KeyId": key, "RotationPeriodInDays": 1}),
              "EnableKeyRotation on B")
    enabled = time.monotonic()
    R.key = key
    R.keys.append(key)
    R.acked[key] = 0
    agree("raced key %d set up" % len(R.keys), enabled)
    for ep in (a, b):
        def status(ep=ep):
            st = ok(ep, "GetKeyRotationStatus", {"KeyId": key})
            return (st["KeyRotationEnabled"], st.get("RotationPeriodInDays")) == (True, 1)
        within_bound("rotation enabled on B known to %s" % name(ep), enabled, status)


@test
def test_race_rounds():
    a, b = C.a.endpoint, C.b.endpoint
    R.x = create_key(a, "multinode: raced alias target x")
    R.y = create_key(a, "multinode: raced alias target y")
    made = time.monotonic()
    for k in (R.x, R.y):
        within_bound("alias target made on A known to B", made,
                     lambda k=k: not is_error(call(b, "DescribeKey", {"KeyId": k}),
                                              "NotFoundException", 404))
    expect_ok(call(a, "CreateAlias", {"AliasName": R.alias, "TargetKeyId": R.x}), "CreateAlias")

    started = time.monotonic()
    start_raced_key()
    for i in range(ROUNDS):
        began = time.monotonic()
        run_round(i)
        time.sleep(max(0.0, ROUND_SECONDS - (time.monotonic() - began)))
    elapsed = time.monotonic() - started

    # Both nodes still agree once the rounds are over, on every raced key.
    final = agree("after the rounds", time.monotonic())
    check_rotations(final["rotations"], "after the rounds")
    since = time.monotonic()
    automatic = 0
    for n, key in enumerate(R.keys):
        rotations, _ = within_bound(
            "raced key %d: both nodes list the same rotations" % n, since,
            lambda key=key: (lambda ra, rb: ra if ra == rb else None)(
                list_rotations(a, key), list_rotations(b, key)))
        check_rotations(rotations, "raced key %d after the rounds" % n, key)
        automatic += sum(1 for _, t in rotations if t == "AUTOMATIC")
    check(automatic >= min(ROUNDS // 10, 10), "%d scheduled rotations listed; rotation was due "
          "every second for %.0f s" % (automatic, elapsed))
    versions = len(final["rotations"]) + 1
    if ROUNDS >= 100:
        check(versions >= MIN_VERSIONS, "the raced key has %d versions" % versions)
    waits = sorted(R.waits)
    h.diag("%d rounds in %.1f s (%.0f ms a round with its agreement poll); the raced key "
           "has %d versions" % (ROUNDS, elapsed, 1000 * elapsed / max(ROUNDS, 1), versions))
    h.diag("agreement after a round: median %.3f s, worst %.3f s, tries up to %d"
           % (waits[len(waits) // 2], waits[-1], max(R.agree_tries)))
    h.diag("rotations listed: %d ON_DEMAND (as many acknowledged), %d AUTOMATIC"
           % (sum(R.acked.values()), automatic))
    h.diag("outcomes: %r" % sorted(R.kinds.items()))
    h.diag("rotation lists with dates out of list order: %d" % R.out_of_order)


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
