#!/usr/bin/python3
"""p11kmsd's limits and operational surface, against fresh SoftHSM2 tokens:
per-principal rate limits (429 ThrottlingException with Retry-After, crypto
and management classes apart, one principal's burst not touching another's),
oversized bodies (Content-Length and chunked) and headers, idle and slowloris
connections, the Prometheus /metrics counters, SIGHUP reloads of the
credentials and the rate limits (a broken file refused), and SIGTERM draining
the requests in flight (held in the token by the fault-injecting module),
bounded by drain_timeout_ms when the token never answers. TAP output."""

import base64
import http.client
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultmod as fm  # noqa: E402
import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

MAX_BODY = 65536           # the default, which the main server keeps
MAX_HEADER = 16384         # likewise
PROMPT = 5.0               # seconds a request may take while connections pile up
IDLE_CONNECTIONS = 1000
SLOW_CONNECTIONS = 200
DRAIN_REQUESTS = 8
DRAIN_TIMEOUT_MS = 15000
LOG_TIMEOUT = 10.0
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Ctx:
    ws = None
    token = None
    creds = None
    config = None
    server = None
    alice = None     # rate_crypto.alice = 1, burst_crypto.alice = 5
    bob = None       # the defaults
    carol = None     # added by the SIGHUP test
    key = None       # a key id
    keys_made = 0
    drain_servers = []


C = Ctx()
ALICE_RATE, ALICE_BURST = 1, 5      # the main server's override for alice
CAROL_RATE, CAROL_BURST = 0.5, 3    # carol's, from the SIGHUP test on


def setup():
    # The connection tests hold about 1,200 sockets open.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = IDLE_CONNECTIONS + SLOW_CONNECTIONS + 100
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    check(soft == resource.RLIM_INFINITY or soft >= need,
          "open files limit %d is below the %d the test needs" % (soft, need))
    C.ws = h.Workspace()
    C.alice = h.new_principal("alice")
    C.bob = h.new_principal("bob")
    C.carol = h.new_principal("carol")
    C.token = h.make_token(C.ws.sub("token"), "p11kms-limits")
    C.creds = h.write_credentials(C.ws.sub("credentials"), [C.alice, C.bob])
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, C.creds, **{
        "rate_crypto.alice": str(ALICE_RATE), "burst_crypto.alice": str(ALICE_BURST),
        # 1,200 idle and slow connections from 127.0.0.1 below; key ids in /metrics
        "per_ip_connections": "0", "metrics_key_ids": "true"})
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))
    h.diag("p11kmsd serving %s" % C.server.endpoint)
    C.key = create_key(C.bob)


def teardown():
    try:
        for srv in C.drain_servers:
            if srv.proc is not None:
                if T.failed:
                    h.diag("drain server's log:\n" + srv.stderr_text())
                srv.kill()
    finally:
        h.finish(T, C.ws, C.server)


# ---- helpers -------------------------------------------------------------------


def call(op, params, principal, endpoint=None):
    return h.kms_call(endpoint or C.server.endpoint, op, params, principal)


def ok(r, what):
    eq(r.status, 200, "%s: HTTP status (body %r)" % (what, r.body[:300]))
    return r.json()


def create_key(principal, endpoint=None):
    doc = ok(call("CreateKey", {"Description": "limits test"}, principal, endpoint), "CreateKey")
    if endpoint is None:
        C.keys_made += 1
    return doc["KeyMetadata"]["KeyId"]


def gdk(principal, key_id=None, endpoint=None):
    return call("GenerateDataKey", {"KeyId": key_id or C.key, "KeySpec": "AES_256"}, principal,
                endpoint)


def check_data_key(doc, key_id, what):
    """A GenerateDataKey answer: the key's ARN, a 32-byte plaintext, a blob."""
    eq(sorted(doc), ["CiphertextBlob", "KeyId", "Plaintext"], "%s: members" % what)
    eq(doc["KeyId"], "arn:aws:kms:%s:%s:key/%s" % (h.REGION, h.ACCOUNT, key_id),
       "%s: KeyId" % what)
    eq(len(base64.b64decode(doc["Plaintext"], validate=True)), 32, "%s: plaintext length" % what)
    check(len(base64.b64decode(doc["CiphertextBlob"], validate=True)) > 32,
          "%s: a ciphertext blob" % what)


def check_throttled(r, retry_after, what):
    """A 429 ThrottlingException whose Retry-After is retry_after, or one of
    them (a tuple: the bucket's fill, and so the wait, depends on how long
    the calls before took)."""
    doc = h.check_error_response(r, "ThrottlingException", 429)
    eq(doc["message"], "Rate exceeded", "%s: message" % what)
    allowed = retry_after if isinstance(retry_after, tuple) else (retry_after,)
    check(r.header("Retry-After") in [str(x) for x in allowed],
          "%s: Retry-After %r, expected one of %r" % (what, r.header("Retry-After"), allowed))


def metrics(endpoint=None):
    r = h.get_metrics(endpoint or C.server.endpoint)
    eq(r.status, 200, "GET /metrics status")
    eq(r.header("Content-Type"), METRICS_TYPE, "GET /metrics Content-Type")
    return promtext.parse(r.body.decode("utf-8"))


def mv(parsed, name, **labels):
    """A series' value; 0 for a counter cell the server leaves out (it shows
    only non-zero cells)."""
    try:
        return promtext.value(parsed, name, **labels)
    except KeyError:
        return 0


def op_requests(parsed, operation):
    """p11kms_requests_total of one operation, summed over its outcomes."""
    return sum(v for (name, labels), v in parsed.items()
               if name == "p11kms_requests_total" and ("operation", operation) in labels)


def still_serving(what):
    check(C.server.proc.poll() is None, "%s: p11kmsd is still running" % what)
    r = h.raw_request(C.server.endpoint, "GET", "/healthz")
    eq((r.status, r.body), (200, b"ok\n"), "%s: GET /healthz" % what)
    check_data_key(ok(gdk(C.bob), "%s: GenerateDataKey" % what), C.key, what)


def wait_log(server, text, count=1, timeout=LOG_TIMEOUT):
    """Waits until server's log holds text count times; returns the log."""
    deadline = time.monotonic() + timeout
    while True:
        log = server.stderr_text()
        if log.count(text) >= count:
            return log
        if time.monotonic() > deadline:
            raise AssertionError("%r not logged %d time(s) in %.0f s; log:\n%s"
                                 % (text, count, timeout, log))
        time.sleep(0.05)


def read_response(sock, method="POST"):
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    return h.RawResponse(resp.status, resp.getheaders(), resp.read())


def held_connections(pid, port, socks):
    """How many of socks (our ends of connections to port) p11kmsd holds as
    open file descriptors: accepted, not merely waiting in the listen queue."""
    inodes = set()
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    ours = {s.getsockname()[1] for s in socks}
    held = set()
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == port and remote_port in ours and fields[9] in inodes:
                held.add(fields[9])
    return len(held)


def wait_held(pid, port, socks, timeout=10.0):
    """held_connections once it reaches len(socks) (a read of /proc/net/tcp is
    no snapshot: a table changing meanwhile can skip lines), or after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        n = held_connections(pid, port, socks)
        if n == len(socks) or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def signed_on(conn, endpoint, op, params, principal):
    """A signed request on an open http.client connection (keep-alive)."""
    headers, body = h.sign(endpoint, "TrentService." + op, params, principal)
    conn.request("POST", "/", body=body, headers=headers)
    r = conn.getresponse()
    return h.RawResponse(r.status, r.getheaders(), r.read())


def timed_request(what):
    t0 = time.monotonic()
    r = gdk(C.bob)
    took = time.monotonic() - t0
    check_data_key(ok(r, what), C.key, what)
    check(took < PROMPT, "%s answered in %.2f s (bound %.0f s)" % (what, took, PROMPT))
    return took


# ---- 1. rate limits ---------------------------------------------------------------


@test
def test_burst_above_rate_is_throttled_per_principal():
    """alice: rate_crypto 1/s, burst 5. Her bucket starts full: 5 data keys
    pass, the 6th is refused with Retry-After 1 (one token at 1/s). bob, on
    the defaults, and alice's management class are untouched; refused
    requests take nothing, so after Retry-After seconds alice passes again."""
    for i in range(ALICE_BURST):
        check_data_key(ok(gdk(C.alice), "alice's data key %d" % (i + 1)), C.key, "alice")
    r = gdk(C.alice)
    check_throttled(r, 1, "alice's data key %d" % (ALICE_BURST + 1))

    # Everything up to the sleep below must take well under a second, alice's
    # refill time: a few dozen milliseconds here.
    for i in range(5):
        check_data_key(ok(gdk(C.bob), "bob's data key %d" % (i + 1)), C.key, "bob")
    doc = ok(call("DescribeKey", {"KeyId": C.key}, C.alice), "alice's DescribeKey")
    eq(doc["KeyMetadata"]["KeyId"], C.key, "DescribeKey KeyId")
    ok(call("ListKeys", {}, C.alice), "alice's ListKeys")

    # Refused requests, many of them, take nothing from the bucket.
    for i in range(10):
        r = gdk(C.alice)
        check_throttled(r, 1, "alice's refused data key %d" % (i + 1))
    time.sleep(int(r.header("Retry-After")))
    check_data_key(ok(gdk(C.alice), "alice after Retry-After"), C.key, "alice")
    # The refill is one token a second: the next one right after is refused.
    check_throttled(gdk(C.alice), 1, "alice right after her refilled token")
    # Encrypt and GenerateRandom are the crypto class too.
    check_throttled(call("Encrypt", {"KeyId": C.key, "Plaintext": "AAAA"}, C.alice), 1,
                    "alice's Encrypt")
    check_throttled(call("GenerateRandom", {"NumberOfBytes": 16}, C.alice), 1,
                    "alice's GenerateRandom")


# ---- 2. oversized requests ------------------------------------------------------


def padded(params, size):
    """params as JSON padded with blanks to exactly size bytes."""
    body = json.dumps(params).encode()
    check(len(body) <= size, "padding room")
    return body + b" " * (size - len(body))


def chunked_request(endpoint, headers, body, chunk=65536):
    """A POST with Transfer-Encoding: chunked over a plain socket."""
    s = socket.create_connection((C.server.host, C.server.port), timeout=30)
    try:
        head = "POST / HTTP/1.1\r\nHost: %s:%d\r\nTransfer-Encoding: chunked\r\n" % (
            C.server.host, C.server.port)
        head += "".join("%s: %s\r\n" % kv for kv in headers.items()
                        if kv[0].lower() not in ("host", "content-length"))
        s.sendall((head + "\r\n").encode())
        try:
            for i in range(0, len(body), chunk):
                part = body[i:i + chunk]
                s.sendall(b"%x\r\n" % len(part) + part + b"\r\n")
            s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered early: the answer is read below
        return read_response(s)
    finally:
        s.close()


@test
def test_oversized_body_and_header():
    """max_body (65536 by default): a body of exactly that size is served, one
    byte more is 413 with a JSON ValidationException, as are 2 MB bodies with
    Content-Length and chunked (counted as outcome RequestTooLarge); a header
    above max_header gets libmicrohttpd's 431. The server serves normally
    after each."""
    m0 = metrics()
    params = {"KeyId": C.key}
    headers, body = h.sign(C.server.endpoint, "TrentService.DescribeKey",
                           padded(params, MAX_BODY), C.bob)
    r = h.raw_request(C.server.endpoint, headers=headers, body=body)
    eq(ok(r, "DescribeKey with a %d-byte body" % MAX_BODY)["KeyMetadata"]["KeyId"], C.key,
       "KeyId")

    expected_message = "The request body is larger than %d bytes" % MAX_BODY
    headers, body = h.sign(C.server.endpoint, "TrentService.DescribeKey",
                           padded(params, MAX_BODY + 1), C.bob)
    r = h.raw_request(C.server.endpoint, headers=headers, body=body)
    doc = h.check_error_response(r, "ValidationException", 413)
    eq(doc["message"], expected_message, "413 message (max_body + 1)")
    still_serving("after a body of max_body + 1 bytes")

    big = padded({"KeyId": C.key}, 2 << 20)
    headers, body = h.sign(C.server.endpoint, "TrentService.GenerateDataKey", big, C.bob)
    r = h.raw_request(C.server.endpoint, headers=headers, body=body)
    doc = h.check_error_response(r, "ValidationException", 413)
    eq(doc["message"], expected_message, "413 message (2 MB, Content-Length)")
    eq(r.header("Connection"), "close", "Connection after an early 413 (body left unread)")
    still_serving("after a 2 MB body with Content-Length")

    r = chunked_request(C.server.endpoint, headers, big)
    doc = h.check_error_response(r, "ValidationException", 413)
    eq(doc["message"], expected_message, "413 message (2 MB, chunked)")
    still_serving("after a 2 MB chunked body")
    # The three 413s are counted under operation "none" (no operation is read).
    m1 = metrics()
    eq(mv(m1, "p11kms_requests_total", operation="none", outcome="RequestTooLarge")
       - mv(m0, "p11kms_requests_total", operation="none", outcome="RequestTooLarge"), 3,
       "p11kms_requests_total{operation=none,outcome=RequestTooLarge} increase")

    # A request line and headers above max_header: libmicrohttpd answers 431
    # itself (an HTML body) and closes the connection.
    for method, path in (("GET", "/healthz"), ("POST", "/")):
        s = socket.create_connection((C.server.host, C.server.port), timeout=30)
        try:
            req = "%s %s HTTP/1.1\r\nHost: %s:%d\r\nX-Filler: %s\r\n\r\n" % (
                method, path, C.server.host, C.server.port, "a" * (MAX_HEADER + 4096))
            try:
                s.sendall(req.encode())
            except (BrokenPipeError, ConnectionResetError):
                pass
            r = read_response(s, method)
        finally:
            s.close()
        eq(r.status, 431, "%s with a %d-byte header: status" % (method, MAX_HEADER + 4096))
        eq(r.header("Connection"), "close", "Connection after 431")
        still_serving("after an oversized %s header" % method)


# ---- 3. connections ---------------------------------------------------------------


def slowloris(socks, stop, sent):
    """One byte of a never-ending header on every socket, each second."""
    line = b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 4096
    i = 0
    while not stop.wait(0 if i == 0 else 1.0):
        byte = line[i:i + 1] if i < len(line) else b"a"
        for s in socks:
            try:
                s.send(byte)
            except OSError:
                sent["errors"] += 1
        sent["bytes"] = i + 1
        i += 1


@test
def test_idle_and_slow_connections_do_not_block_requests():
    """1,000 connections that never send anything, then 200 that send one
    header byte a second: p11kmsd accepts them all (holds each as an open
    socket) and still answers a signed request within 5 s."""
    pid, port = C.server.proc.pid, C.server.port
    idle, slow = [], []
    stop = threading.Event()
    sent = {"bytes": 0, "errors": 0}
    writer = None
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection((C.server.host, C.server.port), timeout=10))
        eq(wait_held(pid, port, idle), IDLE_CONNECTIONS, "idle connections p11kmsd accepted")
        h.diag("with %d idle connections: %.3f s" % (
            IDLE_CONNECTIONS, timed_request("a request among idle connections")))

        for _ in range(SLOW_CONNECTIONS):
            slow.append(socket.create_connection((C.server.host, C.server.port), timeout=10))
        writer = threading.Thread(target=slowloris, args=(slow, stop, sent), daemon=True)
        writer.start()
        t0 = time.monotonic()
        worst = 0.0
        n = 0
        while time.monotonic() - t0 < 4.0:
            worst = max(worst, timed_request("a request among slow connections"))
            n += 1
            time.sleep(0.2)
        check(sent["bytes"] >= 3, "the slow connections sent a byte a second (%d)" % sent["bytes"])
        h.diag("%d requests among %d slow connections (%d bytes each): worst %.3f s"
               % (n, SLOW_CONNECTIONS, sent["bytes"], worst))
        eq(sent["errors"], 0, "sends on the slow connections that failed")
        eq(wait_held(pid, port, idle + slow), IDLE_CONNECTIONS + SLOW_CONNECTIONS,
           "idle and slow connections p11kmsd still holds")
        # The idle ones are still open on the server's side too: nothing to read, no EOF.
        idle[0].setblocking(False)
        try:
            data = idle[0].recv(1)
            raise AssertionError("an idle connection got %r from the server" % data)
        except BlockingIOError:
            pass
    finally:
        stop.set()
        if writer:
            writer.join(5)
        for s in idle + slow:
            s.close()
    still_serving("after the idle and slow connections closed")


# ---- 4. metrics -------------------------------------------------------------------


@test
def test_metrics_counters_move():
    """/metrics is strict Prometheus text and its counters move by exactly the
    requests made: ok and NotFoundException outcomes, throttled requests, the
    token's C_Encrypt calls, the latency histogram, the key count."""
    m0 = metrics()
    key2 = create_key(C.bob)
    n = 12
    for i in range(n):
        check_data_key(ok(gdk(C.bob, key2), "data key %d" % (i + 1)), key2, "bob")
    missing = str(uuid.uuid4())
    h.check_error_response(gdk(C.bob, missing), "NotFoundException", 404)
    h.check_error_response(call("DescribeKey", {"KeyId": missing}, C.bob), "NotFoundException",
                           404)
    # alice's crypto bucket (1/s, burst 5): ask until refused, counting.
    alice_ok = alice_throttled = 0
    while alice_throttled < 3:
        r = gdk(C.alice)
        if r.status == 200:
            alice_ok += 1
            check(alice_ok <= ALICE_BURST + 3, "alice throttled at last")
        else:
            check_throttled(r, 1, "alice")
            alice_throttled += 1
    m1 = metrics()

    def delta(name, **labels):
        return mv(m1, name, **labels) - mv(m0, name, **labels)

    eq(delta("p11kms_requests_total", operation="GenerateDataKey", outcome="ok"), n + alice_ok,
       "GenerateDataKey ok")
    eq(delta("p11kms_requests_total", operation="GenerateDataKey", outcome="NotFoundException"),
       1, "GenerateDataKey NotFoundException")
    eq(delta("p11kms_requests_total", operation="DescribeKey", outcome="NotFoundException"), 1,
       "DescribeKey NotFoundException")
    eq(delta("p11kms_requests_total", operation="GenerateDataKey",
             outcome="ThrottlingException"), alice_throttled, "GenerateDataKey throttled")
    eq(delta("p11kms_requests_total", operation="CreateKey", outcome="ok"), 1, "CreateKey ok")
    eq(delta("p11kms_throttled_total", **{"class": "crypto"}), alice_throttled,
       "p11kms_throttled_total{class=crypto}")
    eq(delta("p11kms_throttled_total", **{"class": "manage"}), 0,
       "p11kms_throttled_total{class=manage}")
    encrypts = delta("p11kms_token_call_seconds_count", function="C_Encrypt")
    check(encrypts >= n + alice_ok, "C_Encrypt calls %d >= data keys %d" % (encrypts, n + alice_ok))
    for parsed, when in ((m0, "before"), (m1, "after")):
        for op in ("GenerateDataKey", "DescribeKey", "CreateKey"):
            eq(mv(parsed, "p11kms_request_duration_seconds_count", operation=op),
               op_requests(parsed, op), "%s latency count = its requests (%s)" % (op, when))
    eq(mv(m1, "p11kms_keys"), C.keys_made, "p11kms_keys")
    eq(mv(m1, "p11kms_key_versions"), C.keys_made, "p11kms_key_versions (none rotated)")
    eq(mv(m1, "p11kms_token_ready"), 1, "p11kms_token_ready")
    eq((mv(m1, "p11kms_requests_queued"), mv(m1, "p11kms_requests_running")), (0, 0),
       "requests queued and running when idle")
    eq(mv(m1, "p11kms_audit_write_failures_total"), 0, "audit write failures")
    for key_id in (C.key, key2):
        series = [labels for (name, labels), _ in m1.items()
                  if name == "p11kms_key_version_uses_reserved" and ("key_id", key_id) in labels]
        eq(len(series), 1, "uses_reserved series of key %s" % key_id)


@test
def test_metrics_need_their_token():
    """GET /metrics: only with the bearer token of metrics_token_file (401 and
    WWW-Authenticate without it, whatever else is sent); without that setting
    never (403), token or not."""
    ep = C.server.endpoint
    denied = "GET /metrics needs the bearer token of metrics_token_file"
    t = h.METRICS_TOKEN
    for what, headers in (("no Authorization", {}),
                          ("a token one character short", {"Authorization": "Bearer " + t[:-1]}),
                          ("a token one character long", {"Authorization": "Bearer " + t + "x"}),
                          ("the token without its scheme", {"Authorization": t}),
                          ("the token as Basic", {"Authorization": "Basic " + t}),
                          ("Bearer and nothing", {"Authorization": "Bearer "}),
                          ("a SigV4 signature", h.sign(ep, None, b"", C.bob)[0])):
        r = h.raw_request(ep, "GET", "/metrics", headers=headers)
        doc = h.check_error_response(r, "AccessDeniedException", 401)
        eq(doc["message"], denied, "%s: message" % what)
        eq(r.header("WWW-Authenticate"), 'Bearer realm="p11kms metrics"',
           "%s: WWW-Authenticate" % what)
        check(b"p11kms_" not in r.body, "%s: no metrics in the answer" % what)
    r = h.raw_request(ep, "GET", "/metrics", headers={"Authorization": "bearer " + t})
    eq(r.status, 200, "the scheme's name in lower case (RFC 9110: case-insensitive)")
    check(promtext.parse(r.body.decode()), "metrics")

    token = h.make_token(C.ws.sub("no-metrics-token"), "p11kms-no-metrics")
    config = h.write_config(C.ws.sub("no-metrics.conf"), token, C.creds, metrics_token_file=None)
    srv = h.start_config_server(config, token, C.ws.sub("no-metrics.log"))
    C.drain_servers.append(srv)
    for headers in ({}, {"Authorization": "Bearer " + t}):
        r = h.raw_request(srv.endpoint, "GET", "/metrics", headers=headers)
        doc = h.check_error_response(r, "AccessDeniedException", 403)
        eq(doc["message"], "GET /metrics is served only with metrics_token_file set",
           "without metrics_token_file")
    eq(h.raw_request(srv.endpoint, "GET", "/healthz").status, 200, "/healthz meanwhile")
    srv.stop()


# ---- 6. SIGHUP ----------------------------------------------------------------------


@test
def test_sighup_reloads_credentials_and_limits():
    """SIGHUP with carol added to the credentials and the limits changed
    (alice's override gone, carol's 0.5/s burst 3): carol can call and is
    limited, ReEncrypt costing 2; alice is back on the defaults. Then a broken
    configuration: "reload refused" is logged and everything stays."""
    h.check_error_response(gdk(C.carol), "UnrecognizedClientException", 400)
    blob = ok(gdk(C.bob), "bob's data key")["CiphertextBlob"]

    h.write_credentials(C.creds, [C.alice, C.bob, C.carol])
    h.write_config(C.config, C.token, C.creds, **{
        "rate_crypto.carol": str(CAROL_RATE), "burst_crypto.carol": str(CAROL_BURST),
        "per_ip_connections": "0", "metrics_key_ids": "true"})
    C.server.proc.send_signal(signal.SIGHUP)
    log = wait_log(C.server, "reloaded: 3 principals, rate limits")
    check("reload refused" not in log, "no refusal logged")

    # carol: burst 3, 0.5/s. ReEncrypt costs 2, GenerateDataKey 1.
    answer = ok(call("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": C.key}, C.carol),
                "carol's ReEncrypt")
    eq(sorted(answer), ["CiphertextBlob", "DestinationEncryptionAlgorithm", "KeyId",
                        "SourceEncryptionAlgorithm", "SourceKeyId"], "ReEncrypt members")
    # 1 token left (plus what 0.5/s added meanwhile): a second ReEncrypt needs
    # one more token, 2 s at 0.5/s.
    check_throttled(call("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": C.key},
                         C.carol), 2, "carol's second ReEncrypt")
    check_data_key(ok(gdk(C.carol), "carol's data key"), C.key, "carol")
    check_throttled(gdk(C.carol), 2, "carol's second data key")
    # alice's override is gone: the default crypto limit (50,000/s) applies.
    for i in range(ALICE_BURST * 2):
        check_data_key(ok(gdk(C.alice), "alice on the defaults %d" % (i + 1)), C.key, "alice")

    # A broken configuration (its first line would lift carol's limit) and
    # credentials without carol: refused as a whole.
    h.write_credentials(C.creds, [C.alice, C.bob])
    with open(C.config, "a") as f:
        f.write("rate_crypto.carol = 0\nrate_crypto = plenty\n")
    C.server.proc.send_signal(signal.SIGHUP)
    log = wait_log(C.server, "reload refused")
    line = [x for x in log.splitlines() if "reload refused" in x][0]
    check("rate_crypto" in line, "the refusal names the bad setting: %r" % line)
    check(C.server.proc.poll() is None, "p11kmsd still runs after a refused reload")
    # carol still authenticates (a throttled answer comes after the signature
    # check) and is still limited: her bucket is nearly empty (a token takes
    # 2 s at 0.5/s), and after Retry-After it holds less than 2 tokens, not
    # the unlimited rate the refused file would have given her.
    r = gdk(C.carol)
    check_throttled(r, (1, 2), "carol after the refused reload")
    time.sleep(int(r.header("Retry-After")))
    statuses = []
    for _ in range(CAROL_BURST + 3):
        r = gdk(C.carol)
        if r.status != 200:
            check_throttled(r, (1, 2), "carol after the refused reload")
        statuses.append(r.status)
    check(statuses[0] == 200 and statuses.count(200) <= 2,
          "carol served and limited as before the refused reload: %r" % statuses)
    still_serving("after the refused reload")


# ---- 5. SIGTERM (a server of its own, on the fault module) ----------------------------


@test
def test_sigterm_answers_requests_in_flight():
    """8 GenerateDataKey requests held in C_Encrypt by the fault module, then
    SIGTERM: no new connections, /readyz 503 on a kept-alive connection, the
    8 answered 200 (with Connection: close) once the token lets go, exit 0
    within drain_timeout_ms. A new server on the token and database decrypts all 8.
    inline_requests = 0: all 8 on workers (p11kms_requests_running), none holding an HTTP
    thread with the kept-alive connection."""
    token = h.make_token(C.ws.sub("drain-token"), "p11kms-drain")
    creds = h.write_credentials(C.ws.sub("drain-credentials"), [C.bob])
    fc = fm.FaultControl(C.ws.sub("drain-faults"))
    config = h.write_config(C.ws.sub("drain.conf"), token, creds, module=fm.faultmod_module(),
                            workers=str(DRAIN_REQUESTS), request_timeout_ms="30000",
                            inline_requests="0",
                            drain_timeout_ms=str(DRAIN_TIMEOUT_MS))
    srv = h.start_config_server(config, token, C.ws.sub("drain.log"), env=fc.env())
    C.drain_servers.append(srv)
    ep = srv.endpoint
    key_id = create_key(C.bob, ep)
    check_data_key(ok(gdk(C.bob, key_id, ep), "warm-up data key"), key_id, "warm-up")

    keep = http.client.HTTPConnection(srv.host, srv.port, timeout=30)
    results = [None] * DRAIN_REQUESTS
    threads = []
    try:
        r = signed_on(keep, ep, "DescribeKey", {"KeyId": key_id}, C.bob)
        ok(r, "DescribeKey on the kept-alive connection")
        eq(r.header("Connection"), None, "Connection header before SIGTERM")

        fc.stall("C_Encrypt")  # until cleared

        def one(i):
            try:
                results[i] = gdk(C.bob, key_id, ep)
            except Exception as e:  # noqa: B902 - reported below
                results[i] = e

        for i in range(DRAIN_REQUESTS):
            threads.append(threading.Thread(target=one, args=(i,), daemon=True))
            threads[-1].start()
        fc.wait_stalling("C_Encrypt", DRAIN_REQUESTS, timeout=15)
        m = metrics(ep)
        eq(mv(m, "p11kms_requests_running"), DRAIN_REQUESTS, "requests running while held")

        t_term = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        wait_log(srv, "stopping on signal 15")

        # A new connection is refused once the listening socket is closed.
        refused = False
        deadline = time.monotonic() + 5
        while not refused and time.monotonic() < deadline:
            try:
                socket.create_connection((srv.host, srv.port), timeout=2).close()
                time.sleep(0.05)
            except ConnectionRefusedError:
                refused = True
        check(refused, "a new connection after SIGTERM is refused")

        # The kept-alive connection is still served: not ready, and closing.
        check(keep.sock is not None, "the kept-alive connection is still open")
        keep.request("GET", "/readyz")
        resp = keep.getresponse()
        eq((resp.status, resp.read()), (503, b"shutting down\n"), "GET /readyz while draining")
        eq(resp.getheader("Connection"), "close", "Connection of /readyz while draining")

        check(srv.proc.poll() is None, "p11kmsd waits for the requests in flight")
        eq(fc.stalling("C_Encrypt"), DRAIN_REQUESTS, "requests still held in C_Encrypt")
        check(all(x is None for x in results), "no answer while the token holds them")
    finally:
        t_clear = time.monotonic()
        fc.clear()
        for t in threads:
            t.join(30)
        keep.close()

    for i, r in enumerate(results):
        check(isinstance(r, h.RawResponse), "request %d answered: %r" % (i + 1, r))
        check_data_key(ok(r, "held request %d" % (i + 1)), key_id, "held request %d" % (i + 1))
        eq(r.header("Connection"), "close", "held request %d: Connection" % (i + 1))
    try:
        status = srv.proc.wait(timeout=DRAIN_TIMEOUT_MS / 1000.0 + 5)
    except subprocess.TimeoutExpired:
        raise AssertionError("p11kmsd still running %.1f s after SIGTERM"
                             % (time.monotonic() - t_term))
    took, after_clear = time.monotonic() - t_term, time.monotonic() - t_clear
    eq(status, 0, "exit status after SIGTERM (log:\n%s)" % srv.stderr_text())
    check(took < DRAIN_TIMEOUT_MS / 1000.0 + 5, "exited %.1f s after SIGTERM" % took)
    check(after_clear < 5, "exited %.1f s after the last request was answered" % after_clear)
    srv.stop()
    log = srv.stderr_text()
    check("every request begun was answered; stopping" in log,
          "drain logged as complete:\n" + log)
    h.diag("exit %.2f s after SIGTERM, %.2f s after the token let go" % (took, after_clear))

    # The 8 blobs decrypt to their plaintexts on a new server on the same token and database.
    plain = h.write_config(C.ws.sub("drain-plain.conf"), token, creds,
                           database="sqlite:" + config + ".db")
    srv2 = h.start_config_server(plain, token, C.ws.sub("drain-plain.log"))
    C.drain_servers.append(srv2)
    for i, r in enumerate(results):
        doc = r.json()
        out = ok(h.kms_call(srv2.endpoint, "Decrypt", {"CiphertextBlob": doc["CiphertextBlob"]},
                            C.bob), "Decrypt of held request %d's blob" % (i + 1))
        eq(out["Plaintext"], doc["Plaintext"], "held request %d's plaintext" % (i + 1))
    srv2.stop()


@test
def test_sigterm_with_a_hung_token_is_bounded_by_drain_timeout():
    """Two requests held in C_Encrypt for good (request_timeout_ms above
    drain_timeout_ms, so no watchdog answer comes first), then SIGTERM: the
    server stops drain_timeout_ms later all the same, with exit status 0.
    The held requests may get a 503 or a closed connection. inline_requests = 0: both on
    workers, which the drain can answer for."""
    token = h.make_token(C.ws.sub("hung-token"), "p11kms-hung")
    creds = h.write_credentials(C.ws.sub("hung-credentials"), [C.bob])
    fc = fm.FaultControl(C.ws.sub("hung-faults"))
    drain_ms = 1000
    config = h.write_config(C.ws.sub("hung.conf"), token, creds, module=fm.faultmod_module(),
                            request_timeout_ms="30000", drain_timeout_ms=str(drain_ms),
                            inline_requests="0")
    srv = h.start_config_server(config, token, C.ws.sub("hung.log"), env=fc.env())
    C.drain_servers.append(srv)
    ep = srv.endpoint
    key_id = create_key(C.bob, ep)
    check_data_key(ok(gdk(C.bob, key_id, ep), "warm-up data key"), key_id, "warm-up")
    results = [None, None]
    threads = []
    try:
        fc.stall("C_Encrypt")

        def one(i):
            try:
                results[i] = gdk(C.bob, key_id, ep)
            except Exception as e:  # noqa: B902 - reported below
                results[i] = e

        for i in range(len(results)):
            threads.append(threading.Thread(target=one, args=(i,), daemon=True))
            threads[-1].start()
        fc.wait_stalling("C_Encrypt", len(results), timeout=15)
        t_term = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            status = srv.proc.wait(timeout=drain_ms / 1000.0 + 5)
        except subprocess.TimeoutExpired:
            raise AssertionError("p11kmsd still running %.1f s after SIGTERM (drain_timeout_ms %d)"
                                 % (time.monotonic() - t_term, drain_ms))
        took = time.monotonic() - t_term
        for t in threads:
            t.join(10)
    finally:
        fc.clear()
    log = srv.stderr_text()
    h.diag("exit status %d %.2f s after SIGTERM; answers %r" % (status, took, [
        r.status if isinstance(r, h.RawResponse) else type(r).__name__ for r in results]))
    eq(status, 0, "exit status after SIGTERM with requests stuck in the token (log:\n%s)" % log)
    check(took >= drain_ms / 1000.0 - 0.05, "waited drain_timeout_ms (%.2f s)" % took)
    check("requests still in flight after %d ms: answering them 503" % drain_ms in log,
          "the unfinished drain is logged")
    check("2 workers are stuck in token calls" in log, "the stuck workers are logged")
    for i, r in enumerate(results):
        check(isinstance(r, h.RawResponse), "held request %d was answered, not %r" % (i + 1, r))
        h.check_error_response(r, "DependencyTimeoutException", 503)
    srv.stop()


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
