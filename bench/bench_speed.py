#!/usr/bin/python3
"""p11kmsd against a peer KMS, against its ceilings, each feature's cost and
the cores it scales over (issue 24, docs/performance.md). `make bench` runs it
after bench_asym.py; `make bench-speed` runs it alone:

    bench_speed.py --builddir DIR [--srcdir DIR] [--module PATH]

Servers, all on 127.0.0.1, each on a fresh token and database with 10 keys
made by CreateKey (bench.py's 10-key server, bench.fresh_server: audit log
on, rate limits far above anything served, default key policies):

  all on    the configuration of bench.py, and an ECC_NIST_P256 SIGN_VERIFY
            and an HMAC_384 key (the asym and hmac limits raised as well)
  no audit  the same without audit_log
  no limits every rate_*/burst_* at 0 (docs/operations.md: 0 = no limit)
  TLS       tls_cert_file/tls_key_file: a self-signed P-256 certificate made
            by openssl for the run; wrk speaks https
  local-kms the peer, $P11KMS_BENCH_PEER (a mock of AWS KMS; it ignores the
            signature): its own 10 keys by CreateKey, its Decrypt blobs by its
            own GenerateDataKey, the same JSON bodies and encryption context

Each round, under bench.py's wrk (-t1 -c32, keep-alive, replay.lua, requests
signed right before each run; wrk unpinned): the canned HTTP server
(bench/mhd_canned) with the GenerateDataKey requests; p11_ceiling with 1 and
2 threads, modes wrap, unwrap, ecdsa_sign and hmac_sha384 on the all-on
server's token; then GenerateDataKey on local-kms, on p11kmsd all on, no
audit, no limits, TLS, and all on again with every thread of the server
moved to core 0 (taskset -a -p -c 0) and back; Decrypt on local-kms and
p11kmsd; then Encrypt (32 bytes), ReEncrypt (to the next key),
GenerateDataKeyWithoutPlaintext, Sign (ECDSA_SHA_256, DIGEST) and GenerateMac
(HMAC_SHA_384, 64 bytes) on p11kmsd. The CPU time p11kmsd and local-kms spend
a request is read from /proc/PID/stat over each GenerateDataKey and Decrypt
run (and on the server without an audit log), and the all-on server's audit
lines a flush (group commit) from its /metrics around them. A figure is the median over the rounds, a ratio the median of the
rounds' ratios (bench.py's Table). The ceiling of an operation is
1/(1/HTTP + 1/token) with the best of 1 and 2 threads of its token calls:
wrap (GenerateDataKey, Encrypt, GenerateDataKeyWithoutPlaintext), unwrap
(Decrypt), unwrap and wrap (ReEncrypt: 1/(1/HTTP + 1/unwrap + 1/wrap)),
ecdsa_sign, hmac_sha384.

Environment, exit status and table as bench.py's: P11KMS_BENCH_SECONDS (8),
P11KMS_BENCH_ROUNDS (3), P11KMS_BENCH_CEILING_SECONDS (3: each p11_ceiling
mode and thread count), P11KMS_BENCH_WRK_THREADS (1),
P11KMS_BENCH_CONNECTIONS (32), and P11KMS_BENCH_PEER: the local-kms binary;
unset or not executable, its rows say "not measured" and the rest runs.
Needs wrk, openssl, taskset, python3-boto3, SoftHSM2 and bench/p11_ceiling
and bench/mhd_canned built (make bench-speed builds them).
"""

import base64
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402 - bench.py's servers, wrk runs, request files and table
import bench_asym as A  # noqa: E402 - the asym limits, the ECDSA and MAC requests' shape, cpu_seconds

H = None  # the harness, imported once the environment names this build
log, Broken, rate = B.log, B.Broken, B.rate
PEER_ENV = "P11KMS_BENCH_PEER"
REQUESTS = 32  # Sign and GenerateMac bodies, replayed round robin
MODES = ("wrap", "unwrap", "ecdsa_sign", "hmac_sha384")
# Every limit off: rate 0 is no limit (docs/operations.md, "Limits and overload").
LIMITS_OFF = {"%s_%s" % (k, c): "0" for k in ("rate", "burst")
              for c in ("crypto", "manage", "asym", "hmac", "global")}
# name: the server's settings beside bench.fresh_server's (the all-on one's first)
VARIANTS = {
    "all": dict(A.UNTHROTTLED),
    "noaudit": dict(A.UNTHROTTLED, audit_log=None),
    "nolimits": dict(LIMITS_OFF),
    "tls": dict(A.UNTHROTTLED),  # and the certificate
}
# (result name, operation, the bodies' name, token modes of the ceiling, label)
OPS = (
    ("enc", "Encrypt", "enc", ("wrap",), "Encrypt, 32 bytes"),
    ("reenc", "ReEncrypt", "reenc", ("unwrap", "wrap"), "ReEncrypt, to another key"),
    ("gdkwp", "GenerateDataKeyWithoutPlaintext", "gdk", ("wrap",), "GenerateDataKeyWithoutPlaintext"),
    ("sign", "Sign", "sign", ("ecdsa_sign",), "Sign, ECDSA_SHA_256, ECC_NIST_P256, digest"),
    ("mac", "GenerateMac", "mac", ("hmac_sha384",), "GenerateMac, HMAC_SHA_384, 64 bytes"),
)
MODE_NAMES = {"wrap": "wrap", "unwrap": "unwrap", "ecdsa_sign": "CKM_ECDSA",
              "hmac_sha384": "CKM_SHA384_HMAC"}


def b64(data):
    return base64.b64encode(data).decode()


def args_and_harness():
    a = B.build_args("p11kmsd against local-kms, its ceilings, each feature's cost and the cores "
                     "(docs/performance.md)")
    global H
    H = B.load_harness(a)
    a.peer = os.environ.get(PEER_ENV) or None
    if a.peer and not os.access(a.peer, os.X_OK):
        log("%s=%s is not an executable: local-kms is not measured" % (PEER_ENV, a.peer))
        a.peer = None
    return a


class Peer:
    """local-kms on a free loopback port (it binds 0.0.0.0), its data and log in folder."""

    def __init__(self, binary, folder):
        os.makedirs(os.path.join(folder, "data"), mode=0o700)
        self.port = H.free_port()
        self.ep = "http://127.0.0.1:%d" % self.port
        self.log = open(os.path.join(folder, "local-kms.log"), "ab")
        env = dict(os.environ, PORT=str(self.port), KMS_DATA_PATH=os.path.join(folder, "data"),
                   KMS_SEED_PATH="/nonexistent")
        self.proc = subprocess.Popen([binary], env=env, cwd=folder, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=H._die_with_parent)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise Broken("local-kms exited with status %s (its log: %s)" % (
                    self.proc.returncode, self.log.name))
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise Broken("local-kms did not listen on port %d in 20 s" % self.port)
                time.sleep(0.05)

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Target:
    """One server: its endpoint, principal, process id and request bodies."""

    def __init__(self, name, ep, principal, pid, token=None):
        self.name, self.ep, self.principal, self.pid, self.token = name, ep, principal, pid, token
        self.bodies = {}


class Setup:
    """The servers, their keys and bodies, each operation's answer checked once."""

    def __init__(self, ws, tools):
        self.ws, self.tools = ws, tools
        self.servers, self.peer, self.t = [], None, {}

    def build(self, peer):
        for name, settings in VARIANTS.items():
            self.start(name, settings)
        self.all_on_bodies()
        if peer:
            self.peer = Peer(peer, self.ws.sub("local-kms"))
            t = self.t["peer"] = Target("local-kms", self.peer.ep, self.t["all"].principal, self.peer.pid)
            self.symmetric(t, lambda op, body: B.call(t.ep, t.principal, op, body))

    def start(self, name, settings):
        settings = dict(settings)
        cert = None
        if name == "tls":
            cert, key = self.ws.sub("tls.pem"), self.ws.sub("tls.key")
            B.run([self.tools.openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                   "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert, "-days", "1",
                   "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"], timeout=60)
            settings.update(tls_cert_file=cert, tls_key_file=key)
        server, principal, token = B.fresh_server(self.ws, name, **settings)
        self.servers.append(server)
        t = self.t[name] = Target(name, server.endpoint, principal, server.pid, token)
        if cert:  # bench.call speaks plain HTTP only: boto3 over TLS, trusting the certificate
            client = H.kms_client(t.ep, principal, ca_file=cert)
            self.symmetric(t, lambda op, body: getattr(client, {
                "CreateKey": "create_key", "GenerateDataKey": "generate_data_key"}[op])(**body))
        else:
            self.symmetric(t, lambda op, body: B.call(t.ep, principal, op, body))

    @staticmethod
    def symmetric(t, call):
        """10 keys by CreateKey, a GenerateDataKey body per key and its blob's Decrypt body."""
        t.keys = [call("CreateKey", {})["KeyMetadata"]["KeyId"] for _ in range(B.KEYS_SMALL)]
        t.bodies["gdk"] = [B.gdk_body(k) for k in t.keys]
        t.blobs = [call("GenerateDataKey", body)["CiphertextBlob"] for body in t.bodies["gdk"]]
        if isinstance(t.blobs[0], bytes):
            t.blobs = [b64(blob) for blob in t.blobs]
        t.bodies["dec"] = [B.decrypt_body(blob) for blob in t.blobs]

    def all_on_bodies(self):
        """Encrypt, ReEncrypt, Sign and GenerateMac bodies for the all-on server, each sent once."""
        t = self.t["all"]
        call = lambda op, body: B.call(t.ep, t.principal, op, body)  # noqa: E731
        rng = random.Random(24)
        ks = t.keys
        t.bodies["enc"] = [{"KeyId": k, "Plaintext": b64(rng.randbytes(32)),
                            "EncryptionContext": B.CONTEXT} for k in ks]
        t.bodies["reenc"] = [{"CiphertextBlob": blob, "SourceEncryptionContext": B.CONTEXT,
                              "DestinationKeyId": ks[(i + 1) % len(ks)],
                              "DestinationEncryptionContext": B.CONTEXT} for i, blob in enumerate(t.blobs)]
        ec, hmac = (call("CreateKey", {"KeySpec": A.KEYS[n][0], "KeyUsage": A.KEYS[n][1]})
                    ["KeyMetadata"]["KeyId"] for n in ("ec_sign", "hmac"))
        t.bodies["sign"] = [{"KeyId": ec, "Message": b64(rng.randbytes(A.DIGEST)), "MessageType": "DIGEST",
                             "SigningAlgorithm": "ECDSA_SHA_256"} for _ in range(REQUESTS)]
        t.bodies["mac"] = [{"KeyId": hmac, "Message": b64(rng.randbytes(A.MAC_MESSAGE)),
                            "MacAlgorithm": "HMAC_SHA_384"} for _ in range(REQUESTS)]
        plain = base64.b64decode(t.bodies["enc"][0]["Plaintext"])
        blob = call("Encrypt", t.bodies["enc"][0])["CiphertextBlob"]
        if base64.b64decode(call("Decrypt", B.decrypt_body(blob))["Plaintext"]) != plain:
            raise Broken("Decrypt of Encrypt's blob did not give back the plaintext")
        moved = call("ReEncrypt", t.bodies["reenc"][0])
        if moved["KeyId"].rsplit("/", 1)[-1] != ks[1] or moved["SourceKeyId"].rsplit("/", 1)[-1] != ks[0]:
            raise Broken("ReEncrypt did not move the blob from the first key to the second")
        if "Plaintext" in call("GenerateDataKeyWithoutPlaintext", t.bodies["gdk"][0]):
            raise Broken("GenerateDataKeyWithoutPlaintext answered a plaintext")
        sig = call("Sign", t.bodies["sign"][0])["Signature"]
        if call("Verify", dict(t.bodies["sign"][0], Signature=sig)).get("SignatureValid") is not True:
            raise Broken("Verify did not find Sign's ECDSA signature valid")
        if len(base64.b64decode(call("GenerateMac", t.bodies["mac"][0])["Mac"])) != 48:
            raise Broken("GenerateMac's MAC is not 48 bytes")

    def stop(self):
        """Stops everything started; returns the problems."""
        problems = []
        if self.peer:
            self.peer.stop()
            self.peer = None
        while self.servers:
            try:
                self.servers.pop().stop("p11kmsd")
            except Broken as e:
                problems.append(str(e))
        return problems

    def kill(self):
        if self.peer:
            self.peer.stop()
        for s in self.servers:
            s.server.kill()


class SpeedBench(B.Bench):
    def __init__(self, a, ws, tools):
        super().__init__(a, ws, tools)
        self.taskset = shutil.which("taskset") or "/usr/bin/taskset"
        self.cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))

    def run(self, t, op, body, what=None):
        """wrk on t with its op requests (body: their bodies' name), signed now;
        with the CPU time t's process spent a request meanwhile, and on the
        all-on server the audit lines its flushes covered on average."""
        req = B.presign(self.ws.sub("%s.%s.req" % (t.name, body)), t.ep, t.principal, op, t.bodies[body])
        flushes = audit_flushes(t) if t.name == "all" else None
        before = A.cpu_seconds(t.pid)
        r = self.wrk(what or "%s, %s" % (op, t.name), t.ep, req)
        r["cpu"] = (A.cpu_seconds(t.pid) - before) / max(1, r["requests"])
        if flushes:
            after = audit_flushes(t)
            r["lines_a_flush"] = (after[1] - flushes[1]) / max(1, after[0] - flushes[0])
        return r

    def pin(self, pid, cpus):
        B.run([self.taskset, "-a", "-p", "-c", cpus, str(pid)], timeout=30)

    def one_core(self, t):
        """GenerateDataKey with every thread of p11kmsd on core 0, then back on all."""
        self.pin(t.pid, "0")
        try:
            return self.run(t, "GenerateDataKey", "gdk", "GenerateDataKey, p11kmsd on core 0")
        finally:
            self.pin(t.pid, self.cpus)

    def round(self, s):
        r = {}
        self.results.append(r)
        log("round %d of %d" % (len(self.results), self.rounds))
        t = s.t["all"]
        # The canned server answers anything: the GenerateDataKey requests.
        self.step(r, "http", self.mhd, B.presign(self.ws.sub("canned.req"), t.ep, t.principal,
                                                 "GenerateDataKey", t.bodies["gdk"]))
        for n in B.CEILING_THREADS:
            self.step(r, "token%d" % n, self.token_ceiling, t.token, n, MODES)
        peer = s.t.get("peer")
        # GenerateDataKey on every server one after the other, then Decrypt, then the rest.
        if peer:
            self.step(r, "gdk_peer", self.run, peer, "GenerateDataKey", "gdk")
        for name in VARIANTS:
            self.step(r, "gdk_" + name, self.run, s.t[name], "GenerateDataKey", "gdk")
        self.step(r, "gdk_core0", self.one_core, t)
        if peer:
            self.step(r, "dec_peer", self.run, peer, "Decrypt", "dec")
        self.step(r, "dec_all", self.run, t, "Decrypt", "dec")
        for key, op, body, _, _ in OPS:
            self.step(r, key, self.run, t, op, body)


def audit_flushes(t):
    """(flushes, lines) of t's audit log's group commit, from its /metrics."""
    r = H.get_metrics(t.ep)
    if r.status != 200:
        raise Broken("GET /metrics answered %d" % r.status)
    values = {}
    for line in r.body.decode().splitlines():
        if line.startswith("p11kms_audit_flush"):
            name, value = line.split()
            values[name] = float(value)
    return values["p11kms_audit_flushes_total"], values["p11kms_audit_flushed_lines_total"]


def best(r, mode):
    return max(r["token%d" % n][mode] for n in B.CEILING_THREADS)


def ceiling(r, modes):
    """1/(1/HTTP + the sum of 1/token over the modes)."""
    return 1.0 / (1.0 / r["http"]["rps"] + sum(1.0 / best(r, m) for m in modes))


def make_table(results, peer):
    t = B.Table(results)
    us = lambda v: "%.0f us" % (v * 1e6)  # noqa: E731
    t.figure("HTTP: canned 274-byte answer, mhd_canned", lambda r: r["http"]["rps"], rate,
             ref_fn=lambda r: r["http"]["p99"], ref_fmt=lambda v: "p99 " + B.ms(v))
    for mode in MODES:
        t.figure("token: %s, best of 1 and 2 threads" % MODE_NAMES[mode], lambda r, m=mode: best(r, m),
                 rate, "p11_ceiling --mode " + mode)
    # Goal 1.
    for op, key, modes in (("GenerateDataKey", "gdk", ("wrap",)), ("Decrypt", "dec", ("unwrap",))):
        own = lambda r, k=key: r[k + "_all"]["rps"]  # noqa: E731
        if peer:
            t.figure("%s, 10 keys, against local-kms" % op, own, rate,
                     ref_fn=lambda r, k=key: r[k + "_peer"]["rps"], ref_fmt=lambda v: rate(v) + " local-kms",
                     ratio_fn=lambda r, k=key, f=own: f(r) / r[k + "_peer"]["rps"],
                     bar=">= 1.50 x local-kms", check=lambda v, q: q >= 1.5)
        else:
            t.add("%s, 10 keys, against local-kms" % op, "not measured (set %s)" % PEER_ENV,
                  bar=">= 1.50 x local-kms")
            t.unmeasured += 1
        t.figure("  against the combined ceiling 1/(1/HTTP + 1/%s)" % modes[0], own, rate,
                 ref_fn=lambda r, m=modes: ceiling(r, m),
                 ratio_fn=lambda r, f=own, m=modes: f(r) / ceiling(r, m),
                 bar=">= 0.80 x ceiling", check=lambda v, q: q >= 0.8)
        t.figure("  p99 latency, against the canned server's", lambda r, k=key: r[k + "_all"]["p99"], B.ms,
                 ref_fn=lambda r: r["http"]["p99"], ref_fmt=lambda v: "p99 %s canned" % B.ms(v),
                 ratio_fn=lambda r, k=key: r[k + "_all"]["p99"] / r["http"]["p99"],
                 bar="<= 2 x canned p99", check=lambda v, q: q <= 2.0)
        t.figure("  CPU time a request, p11kmsd", lambda r, k=key: r[k + "_all"]["cpu"], us,
                 ref_fn=(lambda r, k=key: r[k + "_peer"]["cpu"]) if peer else None,
                 reference="" if peer else "local-kms not measured",
                 ref_fmt=lambda v: us(v) + " local-kms",
                 ratio_fn=(lambda r, k=key: r[k + "_all"]["cpu"] / r[k + "_peer"]["cpu"]) if peer else None)
        t.figure("  audit lines a flush (group commit)", lambda r, k=key: r[k + "_all"]["lines_a_flush"],
                 lambda v: "%.1f" % v, "p11kms_audit_flushed_lines_total / _flushes_total")
    # Goal 2.
    for key, _, _, modes, label in OPS:
        name = " + ".join("1/" + m for m in modes)
        t.figure(label, lambda r, k=key: r[k]["rps"], rate,
                 ref_fn=lambda r, m=modes: ceiling(r, m), ref_fmt=lambda v, n=name: "%s 1/(1/HTTP + %s)" % (
                     rate(v), n), ratio_fn=lambda r, k=key, m=modes: r[k]["rps"] / ceiling(r, m),
                 bar=">= 0.70 x ceiling", check=lambda v, q: q >= 0.7)
    # Goal 4: each feature's cost, GenerateDataKey against the all-on server of the same round.
    allon = lambda r: r["gdk_all"]["rps"]  # noqa: E731
    for name, label in (("noaudit", "audit log off"), ("nolimits", "rate limits off (rate_* = 0)")):
        t.figure("GenerateDataKey, %s" % label, lambda r, n=name: r["gdk_" + n]["rps"], rate,
                 ref_fn=allon, ref_fmt=lambda v: rate(v) + " all on",
                 ratio_fn=lambda r, n=name: r["gdk_" + n]["rps"] / allon(r))
    t.figure("  CPU time a request, audit log off", lambda r: r["gdk_noaudit"]["cpu"], us,
             ref_fn=lambda r: r["gdk_all"]["cpu"], ref_fmt=lambda v: us(v) + " all on",
             ratio_fn=lambda r: r["gdk_all"]["cpu"] / r["gdk_noaudit"]["cpu"])
    t.add("GenerateDataKey, key policies off", "not measured", "no setting turns key policies off")
    t.figure("GenerateDataKey, TLS on (TLS 1.3, P-256 certificate)", lambda r: r["gdk_tls"]["rps"], rate,
             ref_fn=allon, ref_fmt=lambda v: rate(v) + " all on, plain HTTP",
             ratio_fn=lambda r: r["gdk_tls"]["rps"] / allon(r))
    # Goal 5: cores.
    t.figure("GenerateDataKey, p11kmsd on both cores against core 0", allon, rate,
             ref_fn=lambda r: r["gdk_core0"]["rps"], ref_fmt=lambda v: rate(v) + " taskset -c 0",
             ratio_fn=lambda r: allon(r) / r["gdk_core0"]["rps"])
    t.figure("token: wrap, 2 threads against 1", lambda r: r["token2"]["wrap"], rate,
             ref_fn=lambda r: r["token1"]["wrap"], ref_fmt=lambda v: rate(v) + " 1 thread",
             ratio_fn=lambda r: r["token2"]["wrap"] / r["token1"]["wrap"])
    return t


def main():
    a, started, load_before = B.begin(args_and_harness)
    tools = B.Tools(a, need=("p11_ceiling", "mhd_canned"))
    ws = H.Workspace("p11kms-bench-speed-")
    s = None
    try:
        s = Setup(ws, tools)
        s.build(a.peer)
        b = SpeedBench(a, ws, tools)
        log("%d rounds; wrk -t%d -c%d (unpinned), %g s per run; %g s per p11_ceiling mode and "
            "thread count; local-kms: %s" % (b.rounds, b.wrk_threads, b.connections, b.seconds,
                                             b.short, a.peer or "not measured"))
        for _ in range(b.rounds):
            b.round(s)
        b.problems += s.stop()
        return b.report(make_table(b.results, a.peer is not None).text(), started, load_before)
    except Broken as e:
        log(str(e))
        return 1
    finally:
        if s is not None:
            s.kill()
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
