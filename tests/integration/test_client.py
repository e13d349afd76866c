#!/usr/bin/python3
"""libp11kms against a real p11kmsd on fresh SoftHSM2 tokens, through the C
driver tests/client/driver.c (public API only, linked against libp11kms):
generate/decrypt round trips with encryption contexts, service errors mapped
to their statuses with the server's messages, the endpoint, region and
credentials taken from the environment, 429s honoured and retried, 5xx
retried (a fault injected in the token), keep-alive connection reuse, a
stopped server giving TransportError and then CircuitOpen fast with one
probe after the cool-down, 8 threads sharing one client, and HTTPS with a
CA file and client certificates. TAP output."""

import os
import queue
import subprocess
import sys
import threading
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultmod  # noqa: E402
import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

OPENSSL = "/usr/bin/openssl"
DRIVER_TIMEOUT = 120
SLOW_RATE, SLOW_BURST = 2, 2
THREADS, PAIRS = 8, 200
FAIL_FAST_MS = 50.0


class Ctx:
    ws = None
    token = None
    config = None
    server = None
    alice = None   # the defaults
    slow = None    # rate_crypto 2/s, burst 2
    key = None     # a key id
    alias = "alias/client-test"
    others = []    # more servers, stopped at the end
    fc = None      # the fault module's control


C = Ctx()


def driver_path():
    path = os.environ.get("P11KMS_CLIENT_DRIVER") or os.path.normpath(
        os.path.join(h.HERE, "..", "client", "driver"))
    if not os.access(path, os.X_OK):
        raise RuntimeError("the client driver is not built at %s (make check builds it)" % path)
    return path


def setup():
    C.ws = h.Workspace()
    C.alice = h.new_principal("alice")
    C.slow = h.new_principal("slow")
    C.token = h.make_token(C.ws.sub("token"), "p11kms-it-client")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.alice, C.slow])
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, creds, **{
        "rate_crypto.slow": str(SLOW_RATE), "burst_crypto.slow": str(SLOW_BURST)})
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))
    h.diag("p11kmsd serving %s" % C.server.endpoint)
    kms = h.kms_client(C.server.endpoint, C.alice)
    C.key = kms.create_key(Description="client library test")["KeyMetadata"]["KeyId"]
    kms.create_alias(AliasName=C.alias, TargetKeyId=C.key)


def teardown():
    try:
        for srv in C.others:
            if srv.proc is not None:
                if T.failed:
                    h.diag("%s's log:\n%s" % (srv.log_path, srv.stderr_text()))
                srv.kill()
    finally:
        h.finish(T, C.ws, C.server)


# ---- helpers -------------------------------------------------------------------------


def client_env(principal, endpoint=None, **extra):
    """The driver's environment: the endpoint in P11KMS_ENDPOINT and the
    principal's credentials in AWS_*, nothing inherited that could point
    elsewhere. extra: more variables; a value of None removes one."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and k != "P11KMS_ENDPOINT"
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    env.update({"P11KMS_ENDPOINT": endpoint or C.server.endpoint,
                "AWS_ACCESS_KEY_ID": principal.access_key,
                "AWS_SECRET_ACCESS_KEY": principal.secret,
                "AWS_REGION": h.REGION})
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


class Line:
    """One result line of the driver: what, status, milliseconds, message."""

    def __init__(self, text):
        parts = text.split("\t")
        self.fields = parts
        self.what = parts[0]
        self.status = parts[1] if len(parts) > 1 else ""
        self.ms = float(parts[2]) if len(parts) > 2 and parts[2].replace(".", "").isdigit() \
            else None
        self.message = parts[3] if len(parts) > 3 else ""

    def __repr__(self):
        return "\t".join(self.fields)


def run_driver(args, env, timeout=DRIVER_TIMEOUT, prefix=()):
    r = subprocess.run(list(prefix) + [driver_path()] + list(args), env=env,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=timeout)
    out = r.stdout.decode("utf-8", "replace")
    err = r.stderr.decode("utf-8", "replace")
    if r.returncode != 0:
        raise AssertionError("driver %s exited %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(args), r.returncode, out, err))
    return [Line(x) for x in out.splitlines() if x], err


def by_what(lines):
    return {x.what: x for x in lines}


def metrics(endpoint=None):
    r = h.get_metrics(endpoint or C.server.endpoint)
    eq(r.status, 200, "GET /metrics")
    return promtext.parse(r.body.decode("utf-8"))


def requests(parsed, operation, outcome):
    try:
        return promtext.value(parsed, "p11kms_requests_total", operation=operation,
                              outcome=outcome)
    except KeyError:
        return 0


def arn(key_id):
    return "arn:aws:kms:%s:%s:key/%s" % (h.REGION, h.ACCOUNT, key_id)


def check_roundtrip(lines, key_id, what):
    got = by_what(lines)
    eq(got["generate"].status, "OK", "%s: generate (%r)" % (what, got["generate"]))
    key = got["key"].fields
    eq((key[1], key[3]), ("32", arn(key_id)), "%s: data key length and ARN" % what)
    check(int(key[2]) > 32, "%s: a blob" % what)
    eq(got["decrypt"].status, "OK", "%s: decrypt (%r)" % (what, got["decrypt"]))
    eq(got["match"].fields[1:], ["1", arn(key_id)], "%s: decrypted key and ARN" % what)
    eq(got["decrypt_reordered"].status, "OK", "%s: context in another order" % what)
    eq(got["match_reordered"].fields[1], "1", "%s: same key, context reordered" % what)
    eq(got["decrypt_other_context"].status, "InvalidCiphertextException",
       "%s: another context (%r)" % (what, got["decrypt_other_context"]))
    check(got["decrypt_other_context"].message, "%s: the server's message" % what)
    eq(got["cleared"].fields[1], "1", "%s: no plaintext handed out on failure" % what)
    eq(got["decrypt_no_context"].status, "InvalidCiphertextException",
       "%s: no context" % what)


class Repl:
    """The driver's repl: one client kept across commands (and server restarts)."""

    def __init__(self, args, env):
        self.proc = subprocess.Popen([driver_path()] + list(args) + ["repl"], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        ready = self._next().split("\t")
        eq(ready[0], "ready", "the driver's repl starts")
        self.memory_locked = ready[1] == "1"

    def _read(self):
        for raw in self.proc.stdout:
            self.lines.put(raw.decode("utf-8", "replace").rstrip("\n"))
        self.lines.put(None)

    def _next(self, timeout=60):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("the driver said nothing in %d s" % timeout)
        if line is None:
            raise AssertionError("the driver exited: %s" % self.proc.stderr.read().decode())
        return line

    def send(self, command):
        self.proc.stdin.write((command + "\n").encode())
        self.proc.stdin.flush()
        return Line(self._next())

    def gen(self, key):
        return self.send("gen " + key)

    def close(self):
        try:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            eq(self.proc.wait(timeout=30), 0, "the driver's exit status")
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def tcp_peers(port):
    """The ports at the other end of TCP connections (any state) to or from port."""
    peers = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    local = int(fields[1].rsplit(":", 1)[1], 16)
                    remote = int(fields[2].rsplit(":", 1)[1], 16)
                    if local == port and remote != 0:
                        peers.add(remote)
                    elif remote == port:
                        peers.add(local)
        except FileNotFoundError:
            pass
    return peers


# ---- 1. data keys ---------------------------------------------------------------------


@test
def test_generate_and_decrypt_round_trip():
    """GenerateDataKey then Decrypt with the same context (in either order)
    gives the same key; another context or none is InvalidCiphertextException
    and hands out nothing."""
    lines, _ = run_driver(["roundtrip", C.key], client_env(C.alice))
    check_roundtrip(lines, C.key, "by key id")
    lines, _ = run_driver(["roundtrip", C.alias], client_env(C.alice))
    check_roundtrip(lines, C.key, "by alias")
    lines, _ = run_driver(["roundtrip", arn(C.key)], client_env(C.alice))
    check_roundtrip(lines, C.key, "by ARN")


@test
def test_service_errors_map_with_the_servers_message():
    """A key that does not exist is NotFoundException with the server's own
    message (what boto3 shows), asked once: a 4xx is not retried."""
    missing = str(uuid.uuid4())
    kms = h.kms_client(C.server.endpoint, C.alice)
    code, status, message = h.client_error(kms.generate_data_key, KeyId=missing,
                                           KeySpec="AES_256")
    eq((code, status), ("NotFoundException", 404), "boto3's view")
    before = requests(metrics(), "GenerateDataKey", "NotFoundException")
    lines, _ = run_driver(["generate", missing, "1"], client_env(C.alice))
    eq((lines[0].status, lines[0].message), ("NotFoundException", message),
       "the driver's status and message")
    eq(requests(metrics(), "GenerateDataKey", "NotFoundException") - before, 1,
       "one request: client errors are not retried")

    lines, _ = run_driver(["generate", "alias/nothing-here", "1"], client_env(C.alice))
    eq(lines[0].status, "NotFoundException", "an alias that does not exist")
    wrong = h.Principal(C.alice.access_key, C.alice.secret[::-1], "alice")
    lines, _ = run_driver(["generate", C.key, "1"], client_env(wrong))
    eq(lines[0].status, "InvalidSignatureException", "a wrong secret")
    check("signature" in lines[0].message.lower(), "its message: %r" % lines[0].message)
    stranger = h.new_principal("stranger")
    lines, _ = run_driver(["generate", C.key, "1"], client_env(stranger))
    eq(lines[0].status, "UnrecognizedClientException", "an unknown access key")
    lines, _ = run_driver(["generate", C.key, "1"], client_env(C.alice, AWS_REGION="eu-west-1"))
    eq(lines[0].status, "InvalidSignatureException", "a region the server does not serve")


@test
def test_endpoint_region_and_credentials_from_the_environment():
    """P11KMS_ENDPOINT before AWS_ENDPOINT_URL; AWS_ENDPOINT_URL alone works;
    AWS_DEFAULT_REGION when AWS_REGION is unset; AWS_SESSION_TOKEN is sent as
    X-Amz-Security-Token and signed (the server verifies the signature over
    it); nothing set is ConfigurationError."""
    nowhere = "http://127.0.0.1:9"  # the discard port: nothing answers there
    env = client_env(C.alice, AWS_ENDPOINT_URL=nowhere)
    lines, _ = run_driver(["generate", C.key, "1"], env)
    eq(lines[0].status, "OK", "P11KMS_ENDPOINT wins over AWS_ENDPOINT_URL")
    env = client_env(C.alice, P11KMS_ENDPOINT=None, AWS_ENDPOINT_URL=C.server.endpoint)
    lines, _ = run_driver(["generate", C.key, "1"], env)
    eq(lines[0].status, "OK", "AWS_ENDPOINT_URL alone")
    env = client_env(C.alice, AWS_REGION=None, AWS_DEFAULT_REGION=h.REGION)
    lines, _ = run_driver(["generate", C.key, "1"], env)
    eq(lines[0].status, "OK", "AWS_DEFAULT_REGION")
    env = client_env(C.alice, AWS_REGION=None, AWS_DEFAULT_REGION="eu-west-1")
    lines, _ = run_driver(["generate", C.key, "1"], env)
    eq(lines[0].status, "InvalidSignatureException", "AWS_DEFAULT_REGION is used")
    env = client_env(C.alice, AWS_SESSION_TOKEN="FwoGZXIvYXdzEXAMPLETOKEN//+=")
    lines, _ = run_driver(["roundtrip", C.key], env)
    check_roundtrip(lines, C.key, "with a session token")

    for what, env in (("no endpoint", client_env(C.alice, P11KMS_ENDPOINT=None)),
                      ("no secret", client_env(C.alice, AWS_SECRET_ACCESS_KEY=None))):
        r = subprocess.run([driver_path(), "generate", C.key, "1"], env=env,
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=DRIVER_TIMEOUT)
        eq(r.returncode, 1, "%s: the client is not made" % what)
        eq(Line(r.stdout.decode().strip()).status, "ConfigurationError", what)


# ---- 2. retries --------------------------------------------------------------------------


@test
def test_throttling_is_retried_after_retry_after():
    """slow may make 2 crypto calls a second (burst 2). Six data keys in a
    row: the server throttles some (429, Retry-After: 1) and the client waits
    Retry-After and retries, so all six succeed."""
    time.sleep(1.5)  # a full bucket
    before = metrics()
    lines, _ = run_driver(["generate", C.key, "6"], client_env(C.slow))
    after = metrics()
    eq([x.status for x in lines], ["OK"] * 6, "six data keys (%r)" % lines)
    throttled = (requests(after, "GenerateDataKey", "ThrottlingException")
                 - requests(before, "GenerateDataKey", "ThrottlingException"))
    passed = requests(after, "GenerateDataKey", "ok") - requests(before, "GenerateDataKey", "ok")
    h.diag("server: %d throttled, %d answered; client: %s ms"
           % (throttled, passed, [x.ms for x in lines]))
    check(throttled > 0, "the server throttled some calls")
    eq(passed, 6, "six answered")
    # Retry-After (1 s) was honoured: a throttled call took about a second,
    # and so each was throttled about once, not hammered.
    check(max(x.ms for x in lines) >= 900, "a throttled call waited Retry-After")
    check(throttled <= 6, "%d throttled answers for 6 calls: Retry-After honoured" % throttled)


@test
def test_5xx_is_retried():
    """A token fault on one call is KeyUnavailableException (500): the client
    retries and gets its key. A lasting fault exhausts max_attempts and gives
    the service's status and message."""
    fws = C.ws.sub("faults")
    os.makedirs(fws)
    C.fc = faultmod.FaultControl(os.path.join(fws, "control"))
    token = h.make_token(os.path.join(fws, "token"), "p11kms-it-client-f")
    creds = h.write_credentials(os.path.join(fws, "credentials"), [C.alice])
    config = h.write_config(os.path.join(fws, "p11kmsd.conf"), token, creds,
                            module=faultmod.faultmod_module())
    srv = h.start_config_server(config, token, os.path.join(fws, "p11kmsd.log"),
                                env=C.fc.env())
    C.others.append(srv)
    key = h.kms_client(srv.endpoint, C.alice).create_key()["KeyMetadata"]["KeyId"]

    C.fc.set("C_Encrypt", rv="CKR_DEVICE_ERROR", nth=1)
    before = metrics(srv.endpoint)
    lines, _ = run_driver(["generate", key, "1"], client_env(C.alice, endpoint=srv.endpoint))
    after = metrics(srv.endpoint)
    eq(lines[0].status, "OK", "a single 500 is retried (%r)" % lines)
    eq(requests(after, "GenerateDataKey", "KeyUnavailableException")
       - requests(before, "GenerateDataKey", "KeyUnavailableException"), 1, "one 500 answered")

    C.fc.set("C_Encrypt", rv="CKR_DEVICE_ERROR", start=1)
    before = metrics(srv.endpoint)
    lines, _ = run_driver(["--max-attempts", "3", "--retry-base-ms", "10", "generate", key, "1"],
                          client_env(C.alice, endpoint=srv.endpoint))
    after = metrics(srv.endpoint)
    C.fc.clear()
    eq(lines[0].status, "KeyUnavailableException", "a lasting fault (%r)" % lines)
    check(lines[0].message, "the server's message")
    eq(requests(after, "GenerateDataKey", "KeyUnavailableException")
       - requests(before, "GenerateDataKey", "KeyUnavailableException"), 3,
       "max_attempts requests")
    srv.stop()


# ---- 3. connections and threads -------------------------------------------------------------


@test
def test_connections_are_kept_alive():
    """30 calls in a row open one connection, not 30."""
    before = tcp_peers(C.server.port)
    lines, _ = run_driver(["generate", C.key, "30"], client_env(C.alice))
    eq([x.status for x in lines], ["OK"] * 30, "30 data keys")
    new = tcp_peers(C.server.port) - before
    h.diag("connections opened for 30 calls: %d" % len(new))
    check(1 <= len(new) <= 2, "%d connections for 30 calls" % len(new))


@test
def test_threads_share_one_client():
    """8 threads, one client, 200 generate/decrypt pairs each: all succeed
    with the right keys."""
    before = metrics()
    lines, _ = run_driver(["threads", C.key, str(THREADS), str(PAIRS)], client_env(C.alice),
                          timeout=600)
    after = metrics()
    failures = [x for x in lines if x.what == "failure"]
    eq(failures, [], "no thread failed")
    done = by_what(lines)["pairs_ok"].fields
    eq(int(done[1]), THREADS * PAIRS, "pairs right")
    for op in ("GenerateDataKey", "Decrypt"):
        eq(requests(after, op, "ok") - requests(before, op, "ok"), THREADS * PAIRS,
           "%s requests the server answered" % op)
    # the same through the data-key cache (every decrypt a miss, then a put)
    lines, _ = run_driver(["--cache-age", "60", "threads", C.key, str(THREADS), str(PAIRS)],
                          client_env(C.alice), timeout=600)
    eq([x for x in lines if x.what == "failure"], [], "no thread failed, cache on")
    eq(int(by_what(lines)["pairs_ok"].fields[1]), THREADS * PAIRS, "pairs right, cache on")
    h.diag("%d pairs in %.1f s" % (THREADS * PAIRS, float(done[2]) / 1000))


# ---- 4. the circuit breaker --------------------------------------------------------------------


@test
def test_stopped_server_opens_the_breaker():
    """With the server stopped, calls fail with TransportError; after
    breaker_threshold of them, CircuitOpen at once. After the cool-down one
    probe goes (and fails: open again); with the server back, the next probe
    succeeds and closes the breaker."""
    threshold, cooldown_ms = 3, 700
    port = C.server.port
    repl = Repl(["--threshold", str(threshold), "--cooldown-ms", str(cooldown_ms),
                 "--max-attempts", "2", "--retry-base-ms", "10", "--connect-timeout-ms", "1000"],
                client_env(C.alice))
    try:
        eq(repl.gen(C.key).status, "OK", "a call while the server runs")
        C.server.stop()
        for i in range(threshold):
            r = repl.gen(C.key)
            eq(r.status, "TransportError", "call %d with the server stopped (%r)" % (i + 1, r))
        t0 = time.monotonic()
        for i in range(20):
            r = repl.gen(C.key)
            eq(r.status, "CircuitOpen", "call %d past the threshold (%r)" % (i + 1, r))
            check(r.ms < FAIL_FAST_MS, "failed fast: %.1f ms" % r.ms)
        took = time.monotonic() - t0
        h.diag("20 calls with the breaker open: %.1f ms in all (driver round trips included)"
               % (took * 1000))
        time.sleep(cooldown_ms / 1000 + 0.2)
        r = repl.gen(C.key)
        eq(r.status, "TransportError", "the probe, server still down (%r)" % r)
        r = repl.gen(C.key)
        eq(r.status, "CircuitOpen", "open again after the failed probe (%r)" % r)
        check(r.ms < FAIL_FAST_MS, "failed fast: %.1f ms" % r.ms)

        C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd-2.log"),
                                         extra_args=["--listen", "127.0.0.1:%d" % port])
        eq(C.server.port, port, "the server is back on its port")
        time.sleep(cooldown_ms / 1000 + 0.2)
        r = repl.gen(C.key)
        eq(r.status, "OK", "the probe with the server back (%r)" % r)
        for i in range(5):
            r = repl.gen(C.key)
            eq(r.status, "OK", "closed again: call %d (%r)" % (i + 1, r))
    finally:
        repl.close()


@test
def test_cache_decrypts_while_the_service_is_down():
    """With the cache on, a decrypted key is served from it without asking
    the service; once the service cannot be reached a key past its age is
    still served for cache_grace_s (and only with a grace period)."""
    cws = C.ws.sub("cache")
    os.makedirs(cws)
    token = h.make_token(os.path.join(cws, "token"), "p11kms-it-client-c")
    creds = h.write_credentials(os.path.join(cws, "credentials"), [C.alice])
    config = h.write_config(os.path.join(cws, "p11kmsd.conf"), token, creds)
    srv = h.start_config_server(config, token, os.path.join(cws, "p11kmsd.log"))
    C.others.append(srv)
    key = h.kms_client(srv.endpoint, C.alice).create_key()["KeyMetadata"]["KeyId"]
    env = client_env(C.alice, endpoint=srv.endpoint)
    age_s = 3
    common = ["--cache-age", str(age_s), "--max-attempts", "1", "--connect-timeout-ms", "1000"]
    with_grace = Repl(common + ["--grace", "60"], env)
    without = Repl(common, env)
    try:
        h.diag("memory locked: %s" % with_grace.memory_locked)
        for repl in (with_grace, without):
            eq(repl.gen(key).status, "OK", "a data key")
        before = requests(metrics(srv.endpoint), "Decrypt", "ok")
        for repl in (with_grace, without):
            eq(repl.send("dec").status, "OK", "decrypted by the service")
        t_put = time.monotonic()
        for repl in (with_grace, without):
            for i in range(3):
                r = repl.send("dec")
                eq((r.what, r.status), ("dec", "OK"), "from the cache (%r)" % r)
        eq(requests(metrics(srv.endpoint), "Decrypt", "ok") - before, 2,
           "the service saw one Decrypt per client")

        srv.stop()
        if time.monotonic() - t_put < age_s - 0.5:
            for repl in (with_grace, without):
                r = repl.send("dec")
                eq((r.what, r.status), ("dec", "OK"), "fresh in the cache, service down (%r)" % r)
        time.sleep(max(0.0, age_s + 0.5 - (time.monotonic() - t_put)))
        r = with_grace.send("dec")
        eq((r.what, r.status), ("dec", "OK"), "past its age, within the grace period (%r)" % r)
        r = without.send("dec")
        eq(r.status, "TransportError", "past its age, no grace period (%r)" % r)
    finally:
        with_grace.close()
        without.close()


# ---- 5. HTTPS ---------------------------------------------------------------------------------


def openssl(*args):
    r = subprocess.run([OPENSSL] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=30)
    if r.returncode != 0:
        raise AssertionError("openssl %s: %s" % (" ".join(args), r.stderr.decode()))
    return r.stdout.decode()


def make_pki(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate from it."""
    p = {k: os.path.join(d, k) for k in ("ca.key", "ca.pem", "server.key", "server.csr",
                                         "server.pem", "ext.cnf", "a.key", "a.csr", "a.pem")}
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", p["ca.key"], "-out", p["ca.pem"], "-days", "2",
            "-subj", "/CN=p11kms client test CA")
    with open(p["ext.cnf"], "w") as f:
        f.write("subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n")
    openssl("req", *key, "-keyout", p["server.key"], "-out", p["server.csr"],
            "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", p["server.csr"], "-CA", p["ca.pem"], "-CAkey", p["ca.key"],
            "-CAcreateserial", "-out", p["server.pem"], "-days", "2", "-extfile", p["ext.cnf"])
    openssl("req", *key, "-keyout", p["a.key"], "-out", p["a.csr"], "-subj", "/CN=client a")
    openssl("x509", "-req", "-in", p["a.csr"], "-CA", p["ca.pem"], "-CAkey", p["ca.key"],
            "-CAcreateserial", "-out", p["a.pem"], "-days", "2")
    for k in p:
        if k.endswith(".key"):
            os.chmod(p[k], 0o600)
    return p


def fingerprint(pem):
    out = openssl("x509", "-in", pem, "-noout", "-fingerprint", "-sha256")
    return out.strip().split("=", 1)[1].replace(":", "").lower()


def tls_server(name, pki, **extra):
    tws = C.ws.sub(name)
    os.makedirs(tws)
    token = h.make_token(os.path.join(tws, "token"), "p11kms-it-cl-" + name)
    creds = h.write_credentials(os.path.join(tws, "credentials"), [C.alice])
    settings = {"tls_cert_file": pki["server.pem"], "tls_key_file": pki["server.key"]}
    settings.update(extra)
    config = h.write_config(os.path.join(tws, "p11kmsd.conf"), token, creds, **settings)
    srv = h.start_config_server(config, token, os.path.join(tws, "p11kmsd.log"),
                                ca_file=pki["ca.pem"])
    C.others.append(srv)
    eq(srv.scheme, "https", "%s serves HTTPS" % name)
    return srv


@test
def test_https_verifies_the_server():
    """Over HTTPS the client verifies the server against ca_file; without it
    (the system's CAs) the handshake fails: TransportError, not retried, no
    plaintext fallback."""
    pki_dir = C.ws.sub("pki")
    os.makedirs(pki_dir)
    pki = make_pki(pki_dir)
    srv = tls_server("tls", pki)
    key = h.kms_client(srv.endpoint, C.alice, ca_file=pki["ca.pem"]).create_key()[
        "KeyMetadata"]["KeyId"]
    env = client_env(C.alice, endpoint=srv.endpoint)
    lines, _ = run_driver(["--ca-file", pki["ca.pem"], "roundtrip", key], env)
    check_roundtrip(lines, key, "over HTTPS")
    lines, _ = run_driver(["generate", key, "1"], env)
    eq(lines[0].status, "TransportError", "without the CA (%r)" % lines)
    check("certificate" in lines[0].message.lower(), "says why: %r" % lines[0].message)
    check("attempts" not in lines[0].message, "not retried: %r" % lines[0].message)
    lines, _ = run_driver(["--ca-file", pki["a.pem"], "generate", key, "1"], env)
    eq(lines[0].status, "TransportError", "another CA file (%r)" % lines)
    http = srv.endpoint.replace("https://", "http://")
    lines, _ = run_driver(["--ca-file", pki["ca.pem"], "--max-attempts", "1", "generate", key,
                           "1"], client_env(C.alice, endpoint=http))
    check(lines[0].status != "OK", "plain HTTP to the TLS port fails (%r)" % lines)
    srv.stop()

    # client certificates: required by the server and bound to alice
    msrv = tls_server("mtls", pki, tls_client_ca_file=pki["ca.pem"],
                      **{"client_cert.alice": fingerprint(pki["a.pem"])})
    env = client_env(C.alice, endpoint=msrv.endpoint)
    lines, _ = run_driver(["--ca-file", pki["ca.pem"], "generate", "alias/none", "1"], env)
    eq((lines[0].status, lines[0].message),
       ("AccessDeniedException", "A client certificate is required"), "without a certificate")
    key = h.kms_client(msrv.endpoint, C.alice, ca_file=pki["ca.pem"],
                       client_cert=(pki["a.pem"], pki["a.key"])).create_key()[
        "KeyMetadata"]["KeyId"]
    lines, _ = run_driver(["--ca-file", pki["ca.pem"], "--cert", pki["a.pem"], "--key",
                           pki["a.key"], "roundtrip", key], env)
    check_roundtrip(lines, key, "with alice's client certificate")
    msrv.stop()


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
