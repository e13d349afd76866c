#!/usr/bin/python3
"""p11kmsd's benchmark (issue 11, docs/performance.md): `make bench` runs

    bench.py --builddir DIR [--srcdir DIR] [--module PATH] [--cache DIR] [--prepare-only]

and prints one table: every figure next to the reference it is measured
against in the same round, the ratio (the median of the rounds' ratios), the
bar and whether it is met, then "bars met: K of N" and the elapsed time.

Environment: P11KMS_BENCH_SECONDS (8: seconds per wrk run),
P11KMS_BENCH_ROUNDS (3: interleaved rounds; medians are taken over them),
P11KMS_BENCH_CEILING_SECONDS (3: seconds per p11_ceiling mode and thread
count, and per client_open half), P11KMS_BENCH_WRK_THREADS (1: wrk threads,
see docs/performance.md), P11KMS_BENCH_CONNECTIONS (32).

The 10,000-key token is made once by bench/make_keys (the key store's own
CreateKey as the token's sole user, and for each key a blob Decrypt replays;
about two minutes) and kept in --cache (default $P11KMS_BENCH_CACHE, else
BUILDDIR/bench/.cache/token-10k). Later runs reuse it when p11kmsd still opens
it and Decrypts with it, and rebuild it otherwise. --prepare-only just makes
sure it is there.
P11KMS_BENCH_LARGE_KEYS (10000) is only for trying the script quickly (with
its own --cache).

Exit status 0 when the table was printed, bars met or not; 1 when something
broke (a non-2xx answer, a socket error, a program failing); 2 on a usage
error. Needs /usr/bin/wrk (Debian's wrk), openssl and python3-boto3.
"""

import argparse
import fcntl
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

KEYS_SMALL = 10
KEYS_LARGE = int(os.environ.get("P11KMS_BENCH_LARGE_KEYS") or 10000)  # fewer only to try the script
CONTEXT = {"purpose": "bench", "tenant": "p11kms-bench-0001"}
# Far above anything one node serves, so nothing is throttled (the limiter still runs).
UNTHROTTLED = {
    "rate_crypto": "100000000", "burst_crypto": "100000000",
    "rate_manage": "100000000", "burst_manage": "100000000",
}
CACHE_VERSION = 2


class Broken(Exception):
    """Something that must not happen in a benchmark run: the run stops, exit 1."""


class Busy(Broken):
    """503: p11kmsd's key store did not answer in time (request_timeout_ms)."""


def log(text):
    sys.stderr.write("bench: %s\n" % text)
    sys.stderr.flush()


def env_number(name, default, kind=float):
    value = os.environ.get(name)
    if not value:
        return default
    try:
        v = kind(value)
    except ValueError:
        sys.exit("bench: %s must be a number" % name)
    if v <= 0:
        sys.exit("bench: %s must be above 0" % name)
    return v


# ---- setting up ---------------------------------------------------------------


def args_and_harness():
    p = argparse.ArgumentParser(description="p11kmsd benchmark (docs/performance.md)")
    p.add_argument("--builddir", required=True)
    p.add_argument("--srcdir")
    p.add_argument("--module")
    p.add_argument("--cache")
    p.add_argument("--prepare-only", action="store_true")
    a = p.parse_args()
    a.builddir = os.path.abspath(a.builddir)
    a.srcdir = os.path.abspath(a.srcdir or os.path.join(os.path.dirname(__file__), ".."))
    a.cache = os.path.abspath(a.cache or os.environ.get("P11KMS_BENCH_CACHE") or
                              os.path.join(a.builddir, "bench", ".cache", "token-10k"))
    os.environ["P11KMS_SRCDIR"] = a.srcdir
    os.environ["P11KMSD"] = os.path.join(a.builddir, "p11kmsd")
    if a.module:
        os.environ["SOFTHSM_MODULE"] = a.module
    sys.path.insert(0, os.path.join(a.srcdir, "tests", "integration"))
    global H
    import harness as H  # noqa: E402 - needs the environment above
    return a


class ReadyServer:
    """p11kmsd --config, started by the harness's Server but timed from exec
    to the first 200 from GET /readyz, polled every 5 ms."""

    def __init__(self, config, token, log_path):
        env = H.server_env({"SOFTHSM2_CONF": token.conf})
        self.server = H.Server(["--config", config, "--listen", "127.0.0.1:0"], env, log_path)
        self.server.wait_ready = self._wait_ready
        self.token = token
        self.startup = None

    def _wait_ready(self, deadline):
        s = self.server
        while time.monotonic() < deadline:
            if s.proc.poll() is not None:
                raise Broken("p11kmsd exited with status %s:\n%s" % (s.proc.returncode,
                                                                    s.stderr_text()))
            try:
                c = http.client.HTTPConnection(s.host, s.port, timeout=2)
                c.request("GET", "/readyz")
                status = c.getresponse().status
                c.close()
                if status == 200:
                    self.startup = time.monotonic() - self._t0
                    return
            except OSError:
                pass
            time.sleep(0.005)
        raise Broken("GET /readyz did not answer 200 in time")

    def start(self, timeout=600):
        self._t0 = time.monotonic()
        self.server.start(timeout=timeout)
        return self

    @property
    def endpoint(self):
        return self.server.endpoint

    def stop(self):
        self.server.stop()


def config_for(path, token, credentials, audit_log, **extra):
    settings = dict(UNTHROTTLED, audit_log=audit_log)
    settings.update(extra)
    return H.write_config(path, token, credentials, **settings)


def call(endpoint, principal, operation, params):
    r = H.kms_call(endpoint, operation, params, principal)
    if r.status == 503:
        raise Busy("%s answered 503: %s" % (operation, r.body[:300]))
    if r.status != 200:
        raise Broken("%s answered %d: %s" % (operation, r.status, r.body[:300]))
    return r.json()


def create_keys(endpoint, principal, count, threads=4, progress=None):
    """count CreateKey calls from threads threads; returns the new key ids."""
    ids, errors, lock = [], [], threading.Lock()
    left = [count]

    def work():
        while True:
            with lock:
                if left[0] == 0 or errors:
                    return
                left[0] -= 1
            try:
                kid = call(endpoint, principal, "CreateKey", {})["KeyMetadata"]["KeyId"]
            except BaseException as e:  # noqa: B902 - reported below
                with lock:
                    errors.append(e)
                return
            with lock:
                ids.append(kid)
                if progress:
                    progress(len(ids))

    ts = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return ids


def list_keys(endpoint, principal):
    ids, marker = [], None
    while True:
        params = {"Limit": 1000}
        if marker:
            params["Marker"] = marker
        page = call(endpoint, principal, "ListKeys", params)
        ids += [k["KeyId"] for k in page["Keys"]]
        if not page.get("Truncated"):
            return ids
        marker = page["NextMarker"]


def generate_blobs(endpoint, principal, key_ids, blobs, threads=4, progress=None):
    """One GenerateDataKey per key id not yet in blobs (a dict, filled in):
    the CiphertextBlobs Decrypt replays."""
    todo = [k for k in key_ids if k not in blobs]
    errors, lock = [], threading.Lock()

    def work():
        while True:
            with lock:
                if not todo or errors:
                    return
                kid = todo.pop()
            try:
                blob = call(endpoint, principal, "GenerateDataKey", gdk_body(kid))["CiphertextBlob"]
            except BaseException as e:  # noqa: B902
                with lock:
                    errors.append(e)
                return
            with lock:
                blobs[kid] = blob
                if progress:
                    progress(len(blobs))

    ts = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return blobs


def first_uses(endpoint, principal, key_ids):
    """One GenerateDataKey per key, one after another: the first of each key
    since the server started, which reserves a block of its uses (a record
    write, src/keystore/crypto.c). Their latencies in ms."""
    took = []
    for kid in key_ids:
        t0 = time.monotonic()
        call(endpoint, principal, "GenerateDataKey", gdk_body(kid))
        took.append(1000 * (time.monotonic() - t0))
    return took


def gdk_body(key_id):
    return {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": CONTEXT}


def decrypt_body(blob):
    return {"CiphertextBlob": blob, "EncryptionContext": CONTEXT}


# ---- the 10,000-key token, kept in the cache ------------------------------------


class LargeToken:
    """cache/: token/ (make-token.sh's), credentials, manifest.json (principal,
    key ids, one blob per key, how long the build took). Built in cache.partial/
    and renamed when complete."""

    def __init__(self, cache, tools):
        self.cache = cache
        self.tools = tools
        self.partial = cache + ".partial"

    @staticmethod
    def _principal(doc):
        return H.Principal(doc["access_key"], doc["secret"], doc["name"])

    def _load(self, where):
        with open(os.path.join(where, "manifest.json")) as f:
            m = json.load(f)
        if m.get("version") != CACHE_VERSION:
            raise ValueError("cache version %r" % m.get("version"))
        return m

    def _save(self, where, manifest):
        H.write_private(os.path.join(where, "manifest.json.new"), json.dumps(manifest))
        os.replace(os.path.join(where, "manifest.json.new"), os.path.join(where, "manifest.json"))

    def token(self, where=None):
        """The token, its softhsm2.conf pointed at where it now is (the build
        happens in cache.partial, and a build folder may move)."""
        d = os.path.join(where or self.cache, "token")
        with open(os.path.join(H.SRCDIR, "softhsm-fixtures", "softhsm2.conf.in")) as f:
            text = f.read().replace("@TOKENDIR@", os.path.join(d, "tokens"))
        H.write_private(os.path.join(d, "softhsm2.conf"), text)
        return H.Token(d, "bench10k")

    def usable(self, ws):
        """The manifest, when p11kmsd opens the cached token and Decrypts with
        its first, middle and last keys; None otherwise."""
        if not os.path.isdir(self.cache):
            return None
        try:
            m = self._load(self.cache)
            p = self._principal(m["principal"])
            conf = config_for(ws.sub("check.conf"), self.token(), os.path.join(self.cache, "credentials"),
                              ws.sub("check.audit.log"))
            srv = ReadyServer(conf, self.token(), ws.sub("check.log")).start()
            try:
                if len(m["keys"]) != KEYS_LARGE or sorted(m["blobs"]) != m["keys"]:
                    raise ValueError("not %d keys with a blob each" % KEYS_LARGE)
                for kid in (m["keys"][0], m["keys"][KEYS_LARGE // 2], m["keys"][-1]):
                    got = call(srv.endpoint, p, "Decrypt", decrypt_body(m["blobs"][kid]))
                    if got["KeyId"].rsplit("/", 1)[-1] != kid:
                        raise ValueError("Decrypt named another key")
            finally:
                srv.stop()
            return m
        except (OSError, ValueError, KeyError, IndexError, Broken, AssertionError, RuntimeError) as e:
            log("the cached 10,000-key token in %s is not usable (%s): rebuilding it" % (self.cache, e))
            return None

    def build(self, ws):
        """Makes the token in cache.partial with bench/make_keys (keys and a
        blob for each), then moves it to cache. Returns the manifest."""
        part = self.partial
        if os.path.isdir(part):
            log("discarding an unfinished build in %s" % part)
            shutil.rmtree(part)
        os.makedirs(part, mode=0o700)
        H.make_token(os.path.join(part, "token"), "bench10k")
        p = H.new_principal("bench")
        H.write_credentials(os.path.join(part, "credentials"), [p])
        token = self.token(part)
        conf = config_for(ws.sub("build.conf"), token, os.path.join(part, "credentials"),
                          ws.sub("build.audit.log"))
        # The key store's own CreateKey, as the token's sole user (bench/make_keys.c):
        # through p11kmsd each new key costs a search linear in the token's objects.
        log("making %d keys with make_keys" % KEYS_LARGE)
        blobs_file = os.path.join(part, "blobs.txt")
        args = [self.tools.make_keys, "--config", conf, "--count", str(KEYS_LARGE), "--blobs", blobs_file]
        for k, v in sorted(CONTEXT.items()):
            args += ["--context", "%s=%s" % (k, v)]
        out, _ = run(args, env=dict(os.environ, SOFTHSM2_CONF=token.conf), timeout=3600)
        blobs = {}
        with open(blobs_file) as f:
            for line in f:
                kid, blob = line.split()
                blobs[kid] = blob
        os.unlink(blobs_file)
        if len(blobs) != KEYS_LARGE:
            raise Broken("make_keys made %d blobs, not %d:\n%s" % (len(blobs), KEYS_LARGE, out))
        m = {"version": CACHE_VERSION, "principal": {"access_key": p.access_key, "secret": p.secret,
                                                     "name": p.name},
             "create_seconds": float(fields(out)["seconds"]), "keys": sorted(blobs), "blobs": blobs,
             "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        self._save(part, m)
        log("%d keys and a blob for each made in %.0f s (make_keys)" % (KEYS_LARGE, m["create_seconds"]))
        if os.path.isdir(self.cache):
            shutil.rmtree(self.cache)
        os.rename(part, self.cache)
        self.token()  # its softhsm2.conf follows it
        return m

    def get(self, ws):
        """One bench at a time builds or checks the cache (it changes the token)."""
        os.makedirs(os.path.dirname(self.cache), exist_ok=True)
        lock = open(self.cache + ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log("another bench holds %s.lock: waiting for it" % self.cache)
            fcntl.flock(lock, fcntl.LOCK_EX)
        self._lock = lock  # held until this process exits
        m = self.usable(ws)
        if m is None:
            if os.path.isdir(self.cache):
                shutil.rmtree(self.cache)
            m = self.build(ws)
            m["fresh"] = True
        return m


# ---- the programs ---------------------------------------------------------------


class Tools:
    def __init__(self, a):
        b = a.builddir
        self.p11_ceiling = os.path.join(b, "bench", "p11_ceiling")
        self.mhd_canned = os.path.join(b, "bench", "mhd_canned")
        self.client_open = os.path.join(b, "bench", "client_open")
        self.stream_rss = os.path.join(b, "bench", "stream_rss")
        self.make_keys = os.path.join(b, "bench", "make_keys")
        self.lua = os.path.join(a.srcdir, "bench", "replay.lua")
        self.wrk = shutil.which("wrk") or "/usr/bin/wrk"
        self.openssl = shutil.which("openssl") or "/usr/bin/openssl"
        missing = [x for x in (self.p11_ceiling, self.mhd_canned, self.client_open, self.stream_rss,
                               self.make_keys, self.wrk, self.openssl, H.p11kmsd_path()) if not os.access(x, os.X_OK)]
        if missing:
            sys.exit("bench: not found or not executable: %s (make check builds bench/*; "
                     "wrk is Debian's package wrk)" % ", ".join(missing))


def run(args, env=None, timeout=120, ok_codes=(0,)):
    r = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=timeout)
    out = r.stdout.decode("utf-8", "replace")
    if r.returncode not in ok_codes:
        raise Broken("%s exited with status %d:\n%s%s" % (os.path.basename(args[0]), r.returncode, out,
                                                         r.stderr.decode("utf-8", "replace")))
    return out, r.returncode


def fields(line):
    return {k: v for k, v in re.findall(r"(\w+)=(\S+)", line)}


def raw_request(host, headers, body):
    lines = ["POST / HTTP/1.1", "Host: " + host]
    lines += ["%s: %s" % (k, v) for k, v in headers.items() if k.lower() not in ("host", "content-length")]
    lines.append("Content-Length: %d" % len(body))
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def presign(path, endpoint, principal, operation, bodies):
    """Signs one request per body now (valid for the server's 5 minutes) and
    writes them for replay.lua."""
    host = urllib.parse.urlsplit(endpoint).netloc
    with open(path, "wb") as f:
        for body in bodies:
            headers, data = H.sign(endpoint, "TrentService." + operation, body, principal)
            req = raw_request(host, headers, data)
            f.write(b"%d\n" % len(req))
            f.write(req)
    return path


def first_answer(endpoint, path):
    """The status and body of the first request in a replay file, sent once:
    for the message when a run was refused."""
    with open(path, "rb") as f:
        data = f.read()
    n, rest = data.split(b"\n", 1)
    head, body = rest[:int(n)].split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    headers.pop("Host", None)
    headers.pop("Content-Length", None)
    r = H.raw_request(endpoint, headers=headers, body=body)
    return r.status, r.body[:300]


class Bench:
    def __init__(self, a, ws, tools):
        self.a, self.ws, self.t = a, ws, tools
        self.seconds = env_number("P11KMS_BENCH_SECONDS", 8.0)
        self.rounds = env_number("P11KMS_BENCH_ROUNDS", 3, int)
        self.short = env_number("P11KMS_BENCH_CEILING_SECONDS", 3.0)
        self.wrk_threads = env_number("P11KMS_BENCH_WRK_THREADS", 1, int)
        self.connections = env_number("P11KMS_BENCH_CONNECTIONS", 32, int)
        self.results = []  # one dict per round: figure -> measurement
        self.problems = []

    # -- load ------------------------------------------------------------------

    def wrk(self, what, endpoint, reqfile):
        out, _ = run([self.t.wrk, "-t%d" % self.wrk_threads, "-c%d" % self.connections,
                      "-d%gs" % self.seconds, "--timeout", "5s", "-s", self.t.lua, endpoint + "/",
                      "--", reqfile], timeout=self.seconds + 60)
        line = [x for x in out.splitlines() if x.startswith("wrk_result ")]
        if not line:
            raise Broken("%s: wrk printed no result:\n%s" % (what, out))
        f = fields(line[0])
        r = {"rps": float(f["rps"]), "requests": int(f["requests"]),
             "p50": int(f["p50_us"]) / 1000.0, "p99": int(f["p99_us"]) / 1000.0,
             "p999": int(f["p999_us"]) / 1000.0, "max": int(f["max_us"]) / 1000.0,
             "non2xx": int(f["non2xx"]), "timeouts": int(f["timeout"]),
             "socket": int(f["connect"]) + int(f["read"]) + int(f["write"])}
        log("  %-22s %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms  p99.9 %6.2f ms  max %7.1f ms%s" % (
            what, r["rps"], r["p50"], r["p99"], r["p999"], r["max"],
            "  non-2xx %d socket errors %d timeouts %d" % (r["non2xx"], r["socket"], r["timeouts"])
            if r["non2xx"] or r["socket"] or r["timeouts"] else ""))
        if r["non2xx"] or r["socket"] or r["requests"] == 0:
            # Reported, and the run exits 1; the figure is what was answered 2xx.
            status = ""
            try:
                status = "; the first request now gets %d %r" % first_answer(endpoint, reqfile)
            except (OSError, ValueError, Broken) as e:
                status = "; the first request cannot be sent again (%s)" % e
            problem = ("%s: %d answers not 2xx, %d socket errors in %d requests%s" %
                       (what, r["non2xx"], r["socket"], r["requests"], status))
            self.problems.append("round %d: %s" % (len(self.results), problem))
            log("  BROKEN: %s" % problem)
            r["rps"] = (r["requests"] - r["non2xx"]) / (int(f["duration_us"]) / 1e6)
        return r

    def mhd(self, reqfile):
        proc = subprocess.Popen([self.t.mhd_canned], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=H._die_with_parent)
        try:
            line = proc.stdout.readline().decode()
            m = re.match(r"serving (http://\S+)", line)
            if not m:
                raise Broken("mhd_canned did not start: %r %s" % (line, proc.stderr.read()))
            return self.wrk("HTTP ceiling (canned)", m.group(1), reqfile)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                status = "killed"
            if status != 0:
                raise Broken("mhd_canned exited with status %s" % status)

    def token_ceiling(self, token, threads):
        env = dict(os.environ, SOFTHSM2_CONF=token.conf, SOFTHSM_MODULE=H.SOFTHSM_MODULE)
        out, _ = run([self.t.p11_ceiling, "--token", token.label, "--pin-file", token.pin_file,
                      "--module", H.SOFTHSM_MODULE, "--threads", str(threads), "--seconds",
                      "%g" % self.short, "--token-object"], env=env, timeout=4 * self.short + 60)
        r = {}
        for line in out.splitlines():
            name = line.split(" ", 1)[0]
            if name in ("p11_wrap", "p11_unwrap"):
                r[name[4:]] = float(fields(line)["ops_per_s"])
        if set(r) != {"wrap", "unwrap"}:
            raise Broken("p11_ceiling printed no rates:\n%s" % out)
        log("  token, %d thread%s        wrap %8.0f/s  unwrap %8.0f/s" %
            (threads, "s" if threads > 1 else " ", r["wrap"], r["unwrap"]))
        return r

    # -- the client library ------------------------------------------------------

    def client_open(self, endpoint, principal, key_id):
        env = H.server_env({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": principal.access_key,
                            "AWS_SECRET_ACCESS_KEY": principal.secret, "AWS_DEFAULT_REGION": H.REGION})
        env.pop("P11KMS_ENDPOINT", None)
        env.pop("AWS_REGION", None)
        out, _ = run([self.t.client_open, "--key", key_id, "--seconds", "%g" % self.short], env=env,
                     timeout=2 * self.short + 60)
        r = {}
        for line in out.splitlines():
            name = line.split(" ", 1)[0]
            if name in ("client_open_hit", "raw_evp_b64"):
                r[name] = float(fields(line)["ops_per_s"])
        if len(r) != 2:
            raise Broken("client_open printed no rates:\n%s" % out)
        log("  client open (1 KiB)    hit %9.0f/s  raw %9.0f/s" % (r["client_open_hit"], r["raw_evp_b64"]))
        return {"hit": r["client_open_hit"], "raw": r["raw_evp_b64"]}

    def stream(self):
        # Through sh, which forks it: a child exec'd straight from this process
        # would report this process's RSS as its ru_maxrss (Linux carries the
        # high-water mark of the forked copy across exec).
        out, code = run(["/bin/sh", "-c", '"$0"; exit $?', self.t.stream_rss], timeout=600,
                        ok_codes=(0, 1))
        m = re.search(r"stream_rss: (\d+) MiB, chunk \d+: encrypt (\S+), decrypt (\S+), output (\S+), "
                      r"([\d.]+) s .*encrypt alone (\S+), ([\d.]+) s .*max RSS (\d+) KiB", out)
        if not m or m.group(2, 3, 4, 6) != ("OK", "OK", "matches", "OK"):
            raise Broken("stream_rss failed (status %d):\n%s" % (code, out))
        mib, trip, alone, rss = int(m.group(1)), float(m.group(5)), float(m.group(7)), int(m.group(8))
        r = {"rate": mib * 1048576 / alone, "trip": mib * 1048576 / trip, "rss_kib": rss}
        log("  stream (%d MiB)        encrypt %6.0f MiB/s, round trip %6.0f MiB/s, max RSS %d KiB" %
            (mib, r["rate"] / 1048576, r["trip"] / 1048576, rss))
        return r

    def openssl_speed(self):
        out, _ = run([self.t.openssl, "speed", "-evp", "aes-256-gcm", "-bytes", "16384", "-seconds",
                      "%d" % max(1, round(self.short))], timeout=60)
        m = re.search(r"^AES-256-GCM\s+([\d.]+)k\s*$", out, re.M)
        if not m:
            raise Broken("cannot read openssl speed's AES-256-GCM rate:\n%s" % out)
        rate = float(m.group(1)) * 1000.0
        log("  openssl speed (16 KiB) %6.0f MiB/s" % (rate / 1048576))
        return rate

    # -- one round -----------------------------------------------------------------

    def step(self, r, name, fn, *args):
        try:
            r[name] = fn(*args)
        except Broken as e:
            self.problems.append("round %d: %s" % (len(self.results), e))
            log("  BROKEN: %s" % e)

    def round(self, small, large):
        n = len(self.results) + 1
        r = {}
        self.results.append(r)
        log("round %d of %d" % (n, self.rounds))
        ep, p = small["server"].endpoint, small["principal"]
        # The canned server answers anything: the 10-key GenerateDataKey requests.
        self.step(r, "http", self.mhd, presign(self.ws.sub("canned.req"), ep, p, "GenerateDataKey",
                                               [gdk_body(k) for k in small["keys"]]))
        for threads in (1, 2):
            self.step(r, "token%d" % threads, self.token_ceiling, small["token"], threads)
        self.step(r, "gdk10", self.wrk, "GenerateDataKey 10", ep, presign(
            self.ws.sub("gdk10.req"), ep, p, "GenerateDataKey", [gdk_body(k) for k in small["keys"]]))
        self.step(r, "dec10", self.wrk, "Decrypt 10", ep, presign(
            self.ws.sub("dec10.req"), ep, p, "Decrypt", [decrypt_body(b) for b in small["blobs"]]))
        # The 10,000-key server only runs for its own runs: its start is the
        # start-up figure, and its once-a-minute full re-read stays out of the others.
        self.step(r, "large", self.large_runs, large)
        self.step(r, "client", self.client_open, ep, p, small["keys"][0])
        self.step(r, "stream", self.stream)
        self.step(r, "openssl", self.openssl_speed)

    def large_runs(self, large):
        audit_log = self.ws.sub("large.audit.log")
        conf = config_for(self.ws.sub("large.conf"), large["token"], large["credentials"], audit_log)
        # The audit logs of the runs so far (hundreds of MB) on their way to disk would
        # compete with the start-up's reading of the token's 40,000 files.
        os.sync()
        srv = ReadyServer(conf, large["token"], self.ws.sub("large.log")).start()
        out = {"startup": srv.startup}
        log("  start-up, %d keys   %6.2f s" % (KEYS_LARGE, srv.startup))
        try:
            ep, p, m = srv.endpoint, large["principal"], large["manifest"]
            # Decrypt first: GenerateDataKey's first use of each key after a
            # start writes its record, and what is still queued at the end of
            # that run would land in the next.
            out["dec"] = self.wrk("Decrypt %d" % KEYS_LARGE, ep, presign(
                self.ws.sub("dec10k.req"), ep, p, "Decrypt", [decrypt_body(m["blobs"][k]) for k in m["keys"]]))
            # GenerateDataKey on 10 keys spread over the 10,000, each used once first:
            # a key's first use after a start reserves a block of its uses, a record
            # write with two token searches (linear in the objects), so 10,000 keys'
            # first uses would measure those writes, not the steady state.
            sample = m["keys"][::KEYS_LARGE // KEYS_SMALL][:KEYS_SMALL]
            out["first"] = statistics.median(first_uses(ep, p, sample))
            log("  first GenerateDataKey of a key, %d keys: median %.1f ms" % (KEYS_LARGE, out["first"]))
            out["gdk"] = self.wrk("GenerateDataKey %d" % KEYS_LARGE, ep, presign(
                self.ws.sub("gdk10k.req"), ep, p, "GenerateDataKey", [gdk_body(k) for k in sample]))
        finally:
            t0 = time.monotonic()
            try:
                srv.stop()
            except AssertionError as e:
                raise Broken("the %d-key server: %s" % (KEYS_LARGE, e))
            if time.monotonic() - t0 > 2:
                log("  (the %d-key server took %.1f s to stop)" % (KEYS_LARGE, time.monotonic() - t0))
            if os.path.exists(audit_log):
                os.unlink(audit_log)
        return out
# ---- the table ------------------------------------------------------------------


def rate(v):
    return "{:,.0f}/s".format(v)


def ms(v):
    return "%.2f ms" % v


class Table:
    def __init__(self, results):
        self.results = results
        self.rows = []

    def median(self, fn):
        """The median over the rounds of fn(round), None when no round has it."""
        vals = []
        for r in self.results:
            try:
                vals.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                pass
        return statistics.median(vals) if vals else None

    def add(self, figure, value, reference="", ratio=None, bar="", met=None):
        self.rows.append([figure, value, reference, "" if ratio is None else "%.2f" % ratio, bar,
                          "" if met is None else ("yes" if met else "NO")])

    def figure(self, figure, fn, fmt, reference="", ref_fn=None, ref_fmt=None, ratio_fn=None,
               bar="", check=None):
        """A row of medians; with check (value, ratio -> bool) it is a bar."""
        v = self.median(fn)
        ref = self.median(ref_fn) if ref_fn else None
        ratio = self.median(ratio_fn) if ratio_fn else None
        met = None
        if check:
            met = v is not None and (ratio_fn is None or ratio is not None) and check(v, ratio)
        self.add(figure, "n/a" if v is None else fmt(v),
                 reference if ref_fn is None else ("n/a" if ref is None else (ref_fmt or fmt)(ref)),
                 ratio, bar, met)

    def text(self):
        head = ["figure", "value", "reference", "ratio", "bar", "met?"]
        widths = [max(len(row[i]) for row in self.rows + [head]) for i in range(len(head))]
        line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
        out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(row) for row in self.rows]
        bars = [row[5] for row in self.rows if row[5]]
        out.append("")
        out.append("bars met: %d of %d" % (bars.count("yes"), len(bars)))
        return "\n".join(out)


def best_wrap(r):
    return max(r["token1"]["wrap"], r["token2"]["wrap"])


def best_unwrap(r):
    return max(r["token1"]["unwrap"], r["token2"]["unwrap"])


def ceiling(http, token):
    return 1.0 / (1.0 / http + 1.0 / token)


def make_table(results, large_manifest, first_small):
    t = Table(results)
    for mode in ("wrap", "unwrap"):
        for n in (1, 2):
            t.figure("token: AES-256-GCM %s of 32 bytes, %d thread%s" % (mode, n, "s" if n > 1 else ""),
                     lambda r, m=mode, n=n: r["token%d" % n][m], rate, "p11_ceiling --token-object")
    t.figure("HTTP: canned 274-byte answer, mhd_canned", lambda r: r["http"]["rps"], rate,
             ref_fn=lambda r: r["http"]["p99"], ref_fmt=lambda v: "p99 " + ms(v))
    t.figure("combined ceiling, GenerateDataKey", lambda r: ceiling(r["http"]["rps"], best_wrap(r)),
             rate, "1/(1/HTTP + 1/best wrap)")
    t.figure("combined ceiling, Decrypt", lambda r: ceiling(r["http"]["rps"], best_unwrap(r)),
             rate, "1/(1/HTTP + 1/best unwrap)")
    for op, key, best in (("GenerateDataKey", "gdk", best_wrap), ("Decrypt", "dec", best_unwrap)):
        t.figure("%s, 10 keys" % op, lambda r, k=key: r[k + "10"]["rps"], rate,
                 ref_fn=lambda r, b=best: ceiling(r["http"]["rps"], b(r)),
                 ratio_fn=lambda r, k=key, b=best: r[k + "10"]["rps"] / ceiling(r["http"]["rps"], b(r)),
                 bar=">= 0.80 x ceiling", check=lambda v, q: q >= 0.8)
        t.figure("%s, 10 keys, p99 latency" % op, lambda r, k=key: r[k + "10"]["p99"], ms,
                 ref_fn=lambda r, k=key: (r[k + "10"]["p50"], r[k + "10"]["p999"]),
                 ref_fmt=lambda v: "p50 %.2f, p99.9 %.2f ms" % v,
                 bar="<= 2 ms", check=lambda v, q: v <= 2.0)
    for op, key, which in (("GenerateDataKey", "gdk", " (10 of them)"), ("Decrypt", "dec", " (all)")):
        t.figure("%s, %s keys%s" % (op, "{:,}".format(KEYS_LARGE), which),
                 lambda r, k=key: r["large"][k]["rps"],
                 rate, ref_fn=lambda r, k=key: r[k + "10"]["rps"],
                 ratio_fn=lambda r, k=key: r["large"][k]["rps"] / r[k + "10"]["rps"],
                 bar=">= 0.90 x 10 keys", check=lambda v, q: q >= 0.9)
        t.figure("%s, %s keys, p99 latency" % (op, "{:,}".format(KEYS_LARGE)),
                 lambda r, k=key: r["large"][k]["p99"], ms,
                 ref_fn=lambda r, k=key: (r["large"][k]["p50"], r["large"][k]["p999"]),
                 ref_fmt=lambda v: "p50 %.2f, p99.9 %.2f ms" % v)
    t.figure("first GenerateDataKey of a key after start, %s keys" % "{:,}".format(KEYS_LARGE),
             lambda r: r["large"]["first"], ms, ref_fn=lambda r: first_small,
             ref_fmt=lambda v: "%.1f ms with 10 keys" % v)
    t.figure("start-up with %s keys (exec to /readyz 200)" % "{:,}".format(KEYS_LARGE),
             lambda r: r["large"]["startup"], lambda v: "%.2f s" % v, bar="<= 2 s",
             check=lambda v, q: v <= 2.0)
    t.figure("client: cache-hit p11kms_open, 1 KiB", lambda r: r["client"]["hit"], rate,
             ref_fn=lambda r: r["client"]["raw"], ref_fmt=lambda v: rate(v) + " raw: OpenSSL base64+EVP",
             ratio_fn=lambda r: r["client"]["hit"] / r["client"]["raw"], bar=">= 0.50 x raw",
             check=lambda v, q: q >= 0.5)
    mib = lambda v: "%.0f MiB/s" % (v / 1048576)
    t.figure("client: streaming encryption of 1 GiB", lambda r: r["stream"]["rate"], mib,
             ref_fn=lambda r: r["openssl"], ref_fmt=lambda v: mib(v) + " openssl speed 16 KiB",
             ratio_fn=lambda r: r["stream"]["rate"] / r["openssl"], bar=">= 0.70 x OpenSSL",
             check=lambda v, q: q >= 0.7)
    t.figure("client: streaming round trip of 1 GiB (pipe, two threads)", lambda r: r["stream"]["trip"],
             mib)
    t.figure("client: streaming, max RSS", lambda r: r["stream"]["rss_kib"],
             lambda v: "%.1f MiB" % (v / 1024), bar="<= 16 MiB", check=lambda v, q: v <= 16 * 1024)
    made = large_manifest.get("create_seconds")
    t.add("setup: make_keys of %s keys%s" % ("{:,}".format(KEYS_LARGE),
                                             "" if large_manifest.get("fresh") else " (cached)"),
          "%.0f s" % made if made is not None else "n/a",
          "built %s" % large_manifest.get("built", "?"))
    return t


def main():
    started = time.monotonic()
    a = args_and_harness()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, H._interrupt)
    tools = Tools(a)
    ws = H.Workspace("p11kms-bench-")
    small_server = None
    try:
        cache = LargeToken(a.cache, tools)
        manifest = cache.get(ws)
        if a.prepare_only:
            log("the %d-key token is ready in %s (make_keys took %.0f s)" %
                (KEYS_LARGE, a.cache, manifest["create_seconds"]))
            return 0
        large = {"token": cache.token(), "credentials": os.path.join(a.cache, "credentials"),
                 "principal": cache._principal(manifest["principal"]), "manifest": manifest}

        principal = H.new_principal("bench")
        token, conf = H.token_and_config(ws, "bench10", principal, **UNTHROTTLED)
        small_server = ReadyServer(conf, token, ws.sub("small.log")).start()
        keys = create_keys(small_server.endpoint, principal, KEYS_SMALL)
        first = statistics.median(first_uses(small_server.endpoint, principal, keys))
        blobs = generate_blobs(small_server.endpoint, principal, keys, {})
        small = {"server": small_server, "principal": principal, "token": token, "keys": keys,
                 "blobs": [blobs[k] for k in keys]}

        b = Bench(a, ws, tools)
        log("%d rounds; wrk -t%d -c%d, %g s per run; %g s per p11_ceiling mode and client_open half" %
            (b.rounds, b.wrk_threads, b.connections, b.seconds, b.short))
        for _ in range(b.rounds):
            b.round(small, large)
        server, small_server = small_server, None
        try:
            server.stop()
        except AssertionError as e:
            b.problems.append("the 10-key server: %s" % e)

        print(make_table(b.results, manifest, first).text())
        for problem in b.problems:
            print("BROKEN: " + problem.splitlines()[0])
        print("elapsed: %.0f s (%d rounds, %s)" % (time.monotonic() - started, b.rounds,
                                                  time.strftime("%Y-%m-%d %H:%M")))
        sys.stdout.flush()
        for problem in b.problems:
            log(problem)
        return 1 if b.problems else 0
    except Broken as e:
        log(str(e))
        return 1
    finally:
        if small_server:
            small_server.server.kill()
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
