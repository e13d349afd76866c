#!/usr/bin/python3
"""A flood of bad signatures from one address is bounded (docs/security.md,
"Threat model"), against one p11kmsd on a fresh SoftHSM2 token with the
server's default per-address limits. TAP output.

The attacker, from FLOOD_THREADS (4) threads of another process, each with
its own connection from 127.0.0.2, sends GenerateDataKey requests signed with
a wrong secret for a real access key, as fast as p11kmsd answers. Principal
"victim", from 127.0.0.1, calls GenerateDataKey over one keep-alive
connection in windows alternating with the flood's (quiet, flood, quiet, ...:
WINDOWS of each, WINDOW_CALLS calls a window), as tests/integration/
test_flood.py does.

What is asserted:

  - every answer the attacker gets is exactly 400 InvalidSignatureException
    or 429 ThrottlingException ("Too many failed authentications from this
    address ..." with Retry-After); at most burst (20) + 1 + FLOOD_THREADS - 1
    InvalidSignatureException answers in all (the requests already past the
    address check when the bucket ran dry), the rest refused before any
    signature work, for the whole flood (the cool-down, 30 s, outlasts it);
  - the victim's latency bound, as in test_flood.py:

        p99 of the victim's GenerateDataKey under the flood
            <= 2 x its p99 without the flood + 2 ms

  - the audit log: the attacker's first failure has its own line (with its
    port); every other answer is counted in summary lines ("count", source
    "127.0.0.2" without a port), at most one per address and
    auth_failure_audit_interval_s, and the own lines plus the counts add up
    to exactly the answers the attacker got. The log still verifies
    (p11kms-audit verify).
  - per_ip_connections (256 by default): an address's 257th connection is
    closed unanswered while its others and other addresses are served.
  - the growth bound. Goal: ten minutes of such a flood grow the audit log by
    at most 1 MB. The test's flood lasts F seconds in all (WINDOWS flood
    windows, 10-20 s). Its own audit lines (the first failure's and the
    summaries; B bytes, written from the first "go" to the last summary
    after the flood) are extrapolated to ten minutes as B / F x 600, plus
    the checkpoints ten minutes of them alone would bring (at most one per
    audit_checkpoint_seconds, 60 s: 11 x the longest checkpoint line), and
    that must stay below 1 MB / 2 (a margin of 2). It is conservative: B
    includes the summaries written while the attacker paused (the quiet
    windows, the final wait), and the test sets
    auth_failure_audit_interval_s to INTERVAL (5 s), so summaries come twelve
    times as often as with the default of 60 s. One summary (~360 bytes) per
    5 s is about 43 KB per ten minutes (measured with checkpoints: about
    100 KB); before the summaries (one line per request, ~360 bytes each at
    about 1,200 requests a second) the same flood wrote about 25 MB a minute. The victim's own lines (and the checkpoints they
    bring) are not the flood's doing and are left out.
"""

import json
import os
import re
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

ATTACKER_ADDRESS = "127.0.0.2"
CROWD_ADDRESS = "127.0.0.3"
PER_IP_CONNECTIONS = 256   # the server's default
FLOOD_THREADS = 4
ATTACKER_NICE = 5          # as in test_flood.py: its Python client alone takes a core
WINDOWS = 10
WINDOW_CALLS = 1000        # 1-2 s a window: a flood of 10-20 s in all
INTERVAL = 5               # auth_failure_audit_interval_s for this test (default 60)
BURST = 20                 # the server's defaults, which this test does not set
COOLDOWN = 30
TEN_MINUTES = 600
GOAL_BYTES = 1 << 20       # 1 MB per ten minutes
MARGIN = 2
REFUSED = re.compile(r"^Too many failed authentications from this address; its requests are "
                     r"refused for (\d+) more seconds$")
BAD_SIGNATURE = ("The request signature we calculated does not match the signature you "
                 "provided. Check your AWS Secret Access Key and signing method.")


class Ctx:
    ws = None
    token = None
    config = None
    server = None
    admin = None
    victim = None
    mallory = None
    key = None


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.admin = h.new_principal("admin")
    C.victim = h.new_principal("victim")
    C.mallory = h.new_principal("mallory")
    C.token = h.make_token(C.ws.sub("token"), "p11kms-it-authflood")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.admin, C.victim, C.mallory])
    # The per-address defaults (the harness turns them off for the other tests),
    # with summaries every INTERVAL seconds instead of 60.
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, creds, admin_principals="admin",
                              auth_failures_per_minute=None,
                              auth_failure_audit_interval_s=str(INTERVAL))
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))
    r = h.kms_call(C.server.endpoint, "CreateKey", {}, C.admin)
    eq(r.status, 200, "CreateKey")
    C.key = r.json()["KeyMetadata"]["KeyId"]


def teardown():
    h.finish(T, C.ws, C.server)


def audit_path():
    return C.config + ".audit.log"


def audit_lines(offset=0):
    """(raw bytes, parsed) of each line from offset on."""
    with open(audit_path(), "rb") as f:
        f.seek(offset)
        return [(raw, json.loads(raw)) for raw in f.read().splitlines()]


def gdk_request(principal):
    return h.sign(C.server.endpoint, "TrentService.GenerateDataKey",
                  {"KeyId": C.key, "NumberOfBytes": 32}, principal)


def wrong_secret():
    return h.Principal(C.mallory.access_key, "x" * 40, C.mallory.name)


def send_from(address, headers, body):
    import http.client
    conn = http.client.HTTPConnection(C.server.host, C.server.port, timeout=30,
                                      source_address=(address, 0))
    try:
        conn.request("POST", "/", body=body, headers=headers)
        r = conn.getresponse()
        return h.RawResponse(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


ATTACKER = r"""
import json, os, sys, threading, time, http.client
sys.dont_write_bytecode = True
sys.path.insert(0, sys.argv[1])
import harness as h

os.nice(int(sys.argv[2]))
cfg = json.loads(sys.stdin.readline())
me = h.Principal(cfg["access_key"], "x" * 40, "mallory")   # a wrong secret

go = threading.Event()
quit_ = threading.Event()
lock = threading.Condition()
busy = [0]
stats = {}

def reset():
    stats.clear()
    stats.update({"count": 0, "answers": {}, "bad": [], "connections": 0})

def connect():
    with lock:
        stats["connections"] += 1
    return http.client.HTTPConnection(cfg["host"], cfg["port"], timeout=30,
                                      source_address=(cfg["address"], 0))

def one(conn):
    headers, data = h.sign(cfg["endpoint"], "TrentService.GenerateDataKey",
                           {"KeyId": cfg["key"], "NumberOfBytes": 32}, me)
    conn.request("POST", "/", body=data, headers=headers)
    r = conn.getresponse()
    raw = r.read()
    try:
        doc = json.loads(raw)
        got = "%d %s | %s" % (r.status, doc["__type"], doc["message"])
        if r.status == 429:
            got = "%d %s | %s | Retry-After %s" % (r.status, doc["__type"], doc["message"],
                                                    r.getheader("Retry-After"))
    except (ValueError, KeyError):
        got = "%d %r" % (r.status, raw[:200])
    with lock:
        stats["count"] += 1
        stats["answers"][got] = stats["answers"].get(got, 0) + 1
    return r.will_close

def worker(n):
    conn = connect()
    while True:
        go.wait()
        if quit_.is_set():
            break
        with lock:
            if not go.is_set():
                continue
            busy[0] += 1
        try:
            if one(conn):
                conn.close()
                conn = connect()
        except Exception as e:
            with lock:
                if len(stats["bad"]) < 5:
                    stats["bad"].append(repr(e))
            conn.close()
            conn = connect()
        finally:
            with lock:
                busy[0] -= 1
                lock.notify_all()
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
    """The attacker's process: FLOOD_THREADS threads, each with a connection
    from ATTACKER_ADDRESS, sending badly signed requests while told to."""

    def __init__(self):
        cfg = {"access_key": C.mallory.access_key, "endpoint": C.server.endpoint,
               "host": C.server.host, "port": C.server.port, "threads": FLOOD_THREADS,
               "address": ATTACKER_ADDRESS, "key": C.key}
        super().__init__(ATTACKER, cfg, ATTACKER_NICE)


def victim_window(conn, n):
    """n GenerateDataKey calls of the victim; the seconds each took."""
    out = []
    for _ in range(n):
        headers, data = gdk_request(C.victim)
        t0 = time.perf_counter()
        conn.request("POST", "/", body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        out.append(time.perf_counter() - t0)
        if r.status != 200:
            raise AssertionError("the victim's GenerateDataKey answered %d: %r" % (r.status, raw))
    return out


def p99(samples):
    s = sorted(samples)
    return s[min(len(s) - 1, int(len(s) * 0.99))]


@test
def test_a_bad_signature_before_the_flood():
    """One bad signature from the attacker's address: the usual answer, and
    an audit line of its own with the client's port."""
    headers, body = gdk_request(wrong_secret())
    r = send_from(ATTACKER_ADDRESS, headers, body)
    h.check_error_response(r, "InvalidSignatureException", 400)
    eq(r.json()["message"], BAD_SIGNATURE, "message")
    mine = [l for _, l in audit_lines() if l.get("type") == "request"
            and l["source"].startswith(ATTACKER_ADDRESS + ":")]
    eq([(l["outcome"], l["principal"], l["operation"], "count" in l) for l in mine],
       [("InvalidSignatureException", "", "none", False)], "its audit line")
    eq(mine[0]["request_id"], r.header("x-amzn-RequestId"), "the line's request id")


@test
def test_flood_of_bad_signatures_is_bounded():
    import http.client

    # Wait out the interval of the line above, so the flood starts afresh.
    time.sleep(INTERVAL + 1.5)
    size0 = os.path.getsize(audit_path())
    began = time.monotonic()
    conn = http.client.HTTPConnection(C.server.host, C.server.port, timeout=30)
    attacker = Attacker()
    quiet, flood, results = [], [], []
    try:
        victim_window(conn, WINDOW_CALLS)  # warm-up
        for _ in range(WINDOWS):
            quiet += victim_window(conn, WINDOW_CALLS)
            attacker.go()
            try:
                flood += victim_window(conn, WINDOW_CALLS)
            finally:
                results.append(attacker.stop())
        # While the address is blocked, even a good signature from it is refused early;
        # the victim's own address is not.
        headers, body = gdk_request(C.victim)
        r = send_from(ATTACKER_ADDRESS, headers, body)
        h.check_error_response(r, "ThrottlingException", 429)
        check(REFUSED.match(r.json()["message"]), "message %r" % r.json()["message"])
        wait = int(REFUSED.match(r.json()["message"]).group(1))
        eq(r.header("Retry-After"), str(wait), "Retry-After")
        check(1 <= wait <= COOLDOWN, "Retry-After %d within the cool-down" % wait)
        eq(send_from("127.0.0.1", *gdk_request(C.victim)).status, 200,
           "the victim from 127.0.0.1 meanwhile")
    finally:
        conn.close()
        attacker.close()
    flood_seconds = sum(r["seconds"] for r in results)
    # The last summary: at most INTERVAL after the previous line, found by the
    # once-a-second sweep.
    time.sleep(INTERVAL + 2.5)
    wall = time.monotonic() - began
    growth = os.path.getsize(audit_path()) - size0
    raw_new = audit_lines(size0)
    new = [l for _, l in raw_new]

    count = sum(r["count"] for r in results)
    answers = {}
    for r in results:
        for k, v in r["answers"].items():
            answers[k] = answers.get(k, 0) + v
    bad = [b for r in results for b in r["bad"]]
    h.diag("attacker: %d answers in %.1f s of flood (%.0f/s from %d threads, %d connections)"
           % (count, flood_seconds, count / flood_seconds, FLOOD_THREADS,
              sum(r["connections"] for r in results)))
    for k, v in sorted(answers.items(), key=lambda kv: -kv[1])[:8]:
        h.diag("  %6d x %s" % (v, k))
    eq(bad, [], "attacker connection errors")
    # A flood worth the name: four attacker threads against one victim connection send about
    # as many requests as it makes (0.95x in a CI run on a machine busy with other tests);
    # under half would mean the attacker was starved and the bounds below proved little.
    check(count >= len(flood) // 2, "the flood sent %d requests while the victim made %d calls"
          % (count, len(flood)))

    # Every answer exact: the bad signature's, or the early refusal's.
    invalid = answers.pop("400 InvalidSignatureException | " + BAD_SIGNATURE, 0)
    refused = 0
    for k, v in answers.items():
        m = re.match(r"^429 ThrottlingException \| (.*) \| Retry-After (\d+)$", k)
        check(m and REFUSED.match(m.group(1)) and m.group(2) == REFUSED.match(m.group(1)).group(1),
              "attacker answer %r (x %d)" % (k, v))
        refused += v
    # After each cool-down the bucket refills from empty: one more failure (and those
    # of the threads already past the check) blocks the address again.
    most = BURST + FLOOD_THREADS * (1 + int(wall // COOLDOWN))
    check(BURST + 1 <= invalid <= most, "signatures checked for the attacker: %d, not %d to %d"
          % (invalid, BURST + 1, most))
    eq(invalid + refused, count, "answers")

    # The audit log: one line of its own, the rest in summaries, adding up exactly.
    mine = [l for l in new if l.get("type") == "request" and l["principal"] == ""]
    own = [l for l in mine if "count" not in l]
    summaries = [l for l in mine if "count" in l]
    eq([(l["outcome"], l["source"].startswith(ATTACKER_ADDRESS + ":")) for l in own],
       [("InvalidSignatureException", True)], "lines of their own")
    eq({(l["source"], l["operation"]) for l in summaries}, {(ATTACKER_ADDRESS, "none")},
       "summary lines' source and operation")
    # ... and the victim's request from the attacker's address, refused at the end.
    eq(len(own) + sum(l["count"] for l in summaries), count + 1,
       "failures audited on their own line plus the summaries' counts")
    check(1 <= len(summaries) <= wall / INTERVAL + 1,
          "%d summaries in %.1f s (one per %d s at most)" % (len(summaries), wall, INTERVAL))
    others = [l for l in new if l.get("type") == "request" and l["principal"] != ""]
    check(all(l["principal"] == "victim" for l in others), "no other principal's lines")

    # The growth bound, extrapolated to ten minutes (see the docstring): the flood's own
    # lines (the first failure's and the summaries), per second of flood, times 600; plus
    # the checkpoints ten minutes of them alone would bring: one per
    # audit_checkpoint_seconds (60) at most, as they are far fewer than
    # audit_checkpoint_lines (1000). The checkpoints here come mostly from the victim's
    # 20,000 lines, and neither they nor the victim's lines are the flood's doing.
    flood_bytes = sum(len(raw) + 1 for raw, l in raw_new
                      if l.get("type") == "request" and l["principal"] == "")
    checkpoint = max([len(raw) + 1 for raw, l in raw_new if l.get("type") == "checkpoint"] + [0])
    check(checkpoint > 0, "a checkpoint was written")
    per_ten_minutes = flood_bytes / flood_seconds * TEN_MINUTES + (TEN_MINUTES // 60 + 1) * checkpoint
    h.diag("audit log: +%d bytes in %.1f s of flood (%.1f s from the first go to the last "
           "summary): %d lines, %d of them the flood's (%d bytes), %d summaries; %.0f bytes per "
           "ten minutes of flood; bound %d"
           % (growth, flood_seconds, wall, len(new), len(mine), flood_bytes, len(summaries),
              per_ten_minutes, GOAL_BYTES // MARGIN))
    check(per_ten_minutes <= GOAL_BYTES / MARGIN,
          "the flood's audit lines: %d bytes in %.1f s, %.0f per ten minutes > %d"
          % (flood_bytes, flood_seconds, per_ten_minutes, GOAL_BYTES // MARGIN))

    # The victim's latency bound.
    qp99, fp99 = p99(quiet), p99(flood)
    bound = 2 * qp99 + 0.002
    h.diag("victim GenerateDataKey p99: quiet %.3f ms, under flood %.3f ms; bound %.3f ms"
           % (1e3 * qp99, 1e3 * fp99, 1e3 * bound))
    check(fp99 <= bound, "victim's p99 under flood %.3f ms > 2 x quiet p99 %.3f ms + 2 ms"
          % (1e3 * fp99, 1e3 * qp99))


@test
def test_connections_per_address_are_capped():
    """per_ip_connections, 256 by default: one address holding 256 (idle)
    connections has its next one closed at once, unanswered; the connections
    it holds are still served, and so is another address. p11kms_connections_open
    counts them, and goes back to 1 (the scrape's own) once they close."""
    import socket
    held = []
    probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    try:
        for _ in range(PER_IP_CONNECTIONS):
            held.append(socket.create_connection((C.server.host, C.server.port), timeout=10,
                                                 source_address=(CROWD_ADDRESS, 0)))
        time.sleep(1.0)  # libmicrohttpd has accepted them all
        extra = socket.create_connection((C.server.host, C.server.port), timeout=10,
                                         source_address=(CROWD_ADDRESS, 0))
        try:
            try:
                extra.sendall(probe)
                got = extra.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                got = b""
            eq(got, b"", "the 257th connection from one address: closed without an answer")
        finally:
            extra.close()
        # p11kms_connections_open: the address's connections and the scrape's own (the
        # refused one is closed at once, counted or not).
        connections_open_becomes(PER_IP_CONNECTIONS + 1)
        for i in (0, PER_IP_CONNECTIONS - 1):
            held[i].sendall(probe)
            check(held[i].recv(65536).startswith(b"HTTP/1.1 200"),
                  "connection %d of the address still served" % (i + 1))
        eq(h.raw_request(C.server.endpoint, "GET", "/healthz").status, 200,
           "another address meanwhile")
    finally:
        for s in held:
            s.close()
    connections_open_becomes(1)


def connections_open_becomes(n, timeout=10.0):
    """Waits until p11kms_connections_open, scraped from another address, is n (libmicrohttpd
    sees a client's close at its next poll)."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        r = h.get_metrics(C.server.endpoint)
        eq(r.status, 200, "GET /metrics")
        m = re.search(r"^p11kms_connections_open (\S+)$", r.body.decode(), re.M)
        check(m, "p11kms_connections_open in /metrics")
        seen.append(float(m.group(1)))
        if seen[-1] == n:
            return
        if time.monotonic() > deadline:
            raise AssertionError("p11kms_connections_open: %r, never %d" % (seen[-10:], n))
        time.sleep(0.05)


@test
def test_the_log_verifies():
    """Stopped, the server's log (summaries and all) verifies."""
    server, C.server = C.server, None
    server.stop()
    build = os.environ.get("P11KMS_BUILDDIR") or os.path.join(h.HERE, "..", "..")
    r = subprocess.run([os.path.join(build, "p11kms-audit"), "verify", "--config", C.config,
                        audit_path()], env=h.server_env({"SOFTHSM2_CONF": C.token.conf}),
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=60)
    eq(r.returncode, 0, "p11kms-audit verify: %s %s" % (r.stdout, r.stderr))


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
