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
see docs/performance.md), P11KMS_BENCH_CONNECTIONS (32),
P11KMS_BENCH_BASELINE (unset: the previous release's p11kmsd, the token-only
one of commit 51c3115, measured with 10 keys in the same rounds; unset, its
rows say "not measured").

The 100,000-key database is made once by bench/make_keys (the key store's own
CreateKey into a SQLite database and a token holding its root key, and for
each key a blob Decrypt replays; about two minutes) and kept in --cache
(default $P11KMS_BENCH_CACHE, else BUILDDIR/bench/.cache/db-100k). It is
never written after: each run works on a copy. A later run reuses it when its
manifest matches this script (layout version, key count, encryption context)
and p11kmsd starts on a copy (so the schema version is the binary's, and the
root key is in the token) and Decrypts its first, middle and last blobs; it
is rebuilt otherwise. --prepare-only just makes sure it is there.
P11KMS_BENCH_LARGE_KEYS (100000) is only for trying the script quickly (its
cache is then db-N).

Exit status 0 when the table was printed, bars met or not; 1 when something
broke (an unexpected non-2xx answer, a socket error, a program failing); 2 on
a usage error. Needs /usr/bin/wrk (Debian's wrk), openssl and python3-boto3.
"""

import argparse
import base64
import fcntl
import http.client
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

KEYS_SMALL = 10
KEYS_LARGE = int(os.environ.get("P11KMS_BENCH_LARGE_KEYS") or 100000)  # fewer only to try the script
# A hot set that fits the key cache, and one ten times the cache.
HOT_FIT, CACHE_FIT = 2000, 4096
HOT_BIG, CACHE_BIG = 10000, 1000
COLD_KEYS = 20
# Made-up blobs of the flood: twice the default negative cache (8192 ids), so
# most of them are not remembered as unknown from the pass before.
FLOOD_IDS = 16384
CONTEXT = {"purpose": "bench", "tenant": "p11kms-bench-0001"}
# Far above anything one node serves, so nothing is throttled (the limiter still runs).
UNTHROTTLED = {
    "rate_crypto": "100000000", "burst_crypto": "100000000",
    "rate_manage": "100000000", "burst_manage": "100000000",
}
CACHE_VERSION = 3
# p11_ceiling's thread counts, one session each: one, and one per core of the 2-core
# machine; the better is the token's ceiling (docs/performance.md, "The ceilings").
CEILING_THREADS = (1, 2)
BASELINE_ENV = "P11KMS_BENCH_BASELINE"
INVALID_CIPHERTEXT = "InvalidCiphertextException"


def thousands(n):
    return "{:,}".format(n)


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


def build_args(description, more=None):
    """--builddir, --srcdir (default: this folder's parent) and --module, and
    what more(parser) adds; the folders made absolute."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--builddir", required=True)
    p.add_argument("--srcdir")
    p.add_argument("--module")
    if more:
        more(p)
    a = p.parse_args()
    a.builddir = os.path.abspath(a.builddir)
    a.srcdir = os.path.abspath(a.srcdir or os.path.join(os.path.dirname(__file__), ".."))
    return a


def args_and_harness():
    def more(p):
        p.add_argument("--cache")
        p.add_argument("--prepare-only", action="store_true")

    a = build_args("p11kmsd benchmark (docs/performance.md)", more)
    name = "db-100k" if KEYS_LARGE == 100000 else "db-%d" % KEYS_LARGE
    a.cache = os.path.abspath(a.cache or os.environ.get("P11KMS_BENCH_CACHE") or
                              os.path.join(a.builddir, "bench", ".cache", name))
    a.baseline = os.environ.get(BASELINE_ENV) or None
    if a.baseline and not os.access(a.baseline, os.X_OK):
        sys.exit("bench: %s=%s is not an executable" % (BASELINE_ENV, a.baseline))
    if KEYS_LARGE < COLD_KEYS + 10:
        sys.exit("bench: P11KMS_BENCH_LARGE_KEYS must be at least %d" % (COLD_KEYS + 10))
    load_harness(a)
    return a


def load_harness(a):
    """Imports the integration harness as H, pointed at a.builddir's p11kmsd,
    a.srcdir and a.module (bench_asym.py's entry too)."""
    os.environ["P11KMS_SRCDIR"] = a.srcdir
    os.environ["P11KMSD"] = os.path.join(a.builddir, "p11kmsd")
    if a.module:
        os.environ["SOFTHSM_MODULE"] = a.module
    sys.path.insert(0, os.path.join(a.srcdir, "tests", "integration"))
    global H
    import harness as H  # noqa: E402 - needs the environment above
    return H


class ReadyServer:
    """p11kmsd --config (binary: another p11kmsd, the baseline), started by
    the harness's Server but timed from exec to the first 200 from GET
    /readyz, polled every 5 ms."""

    def __init__(self, config, token, log_path, binary=None):
        env = H.server_env({"SOFTHSM2_CONF": token.conf})
        self.server = H.Server(["--config", config, "--listen", "127.0.0.1:0"], env, log_path)
        if binary:
            self.server.args = [binary, "--config", config, "--listen", "127.0.0.1:0"]
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
                if s.scheme == "https":  # a throw-away certificate (bench_speed.py's TLS run)
                    c = http.client.HTTPSConnection(s.host, s.port, timeout=2,
                                                    context=ssl._create_unverified_context())
                else:
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
        try:
            self.server.start(timeout=timeout)
        except RuntimeError as e:
            raise Broken(str(e))
        return self

    @property
    def endpoint(self):
        return self.server.endpoint

    @property
    def pid(self):
        return self.server.proc.pid

    def rss_kib(self):
        """VmRSS from /proc (the server's own process: no valgrind wrapper)."""
        with open("/proc/%d/status" % self.pid) as f:
            m = re.search(r"^VmRSS:\s+(\d+) kB", f.read(), re.M)
        if not m:
            raise Broken("no VmRSS for p11kmsd")
        return int(m.group(1))

    def stop(self, what="p11kmsd"):
        t0 = time.monotonic()
        try:
            self.server.stop()
        except AssertionError as e:
            raise Broken("%s: %s" % (what, e))
        if time.monotonic() - t0 > 2:
            log("  (%s took %.1f s to stop)" % (what, time.monotonic() - t0))


# Settings of the harness's configuration that the token-only release does not know.
BASELINE_UNKNOWN = ("database", "metrics_token_file", "auth_failures_per_minute",
                    "auth_failure_audit_interval_s", "decrypt_breaker_failures")


def config_for(path, token, credentials, audit_log, baseline=False, **extra):
    """The harness's configuration, unthrottled and without the decryption
    breaker; baseline: without the settings the token-only release does not
    know (BASELINE_UNKNOWN)."""
    settings = dict(UNTHROTTLED, audit_log=audit_log)
    if not baseline:
        # The flood of made-up blobs measures the server with nothing to stop it.
        settings["decrypt_breaker_failures"] = "0"
    settings.update(extra)
    H.write_config(path, token, credentials, **settings)
    if baseline:
        with open(path) as f:
            text = "".join(line for line in f if line.split(" =")[0] not in BASELINE_UNKNOWN)
        H.write_private(path, text)
    return path


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


def generate_blobs(endpoint, principal, key_ids):
    """One GenerateDataKey per key: the CiphertextBlobs Decrypt replays."""
    return {kid: call(endpoint, principal, "GenerateDataKey", gdk_body(kid))["CiphertextBlob"]
            for kid in key_ids}


def first_uses(endpoint, principal, key_ids):
    """One GenerateDataKey per key, one after another, each signed before its
    clock starts: the first of each key since the server started (the key's
    entry read from the database, its version unwrapped, a block of its uses
    reserved: a database write). Their latencies in ms, each a new connection."""
    took = []
    for kid in key_ids:
        headers, body = H.sign(endpoint, "TrentService.GenerateDataKey", gdk_body(kid), principal)
        t0 = time.monotonic()
        r = H.raw_request(endpoint, headers=headers, body=body)
        took.append(1000 * (time.monotonic() - t0))
        if r.status != 200:
            raise Broken("GenerateDataKey of %s answered %d: %s" % (kid, r.status, r.body[:300]))
    return took


def gdk_body(key_id):
    return {"KeyId": key_id, "KeySpec": "AES_256", "EncryptionContext": CONTEXT}


def decrypt_body(blob):
    return {"CiphertextBlob": blob, "EncryptionContext": CONTEXT}


def made_up_blob(rng):
    """A blob of the real layout and length (src/common/blob.h: version 1,
    key uuid, key version 1, IV, 32 bytes of ciphertext, tag) naming a random
    (version-4) key id no database holds."""
    kid = bytearray(rng.getrandbits(128).to_bytes(16, "big"))
    kid[6] = (kid[6] & 0x0F) | 0x40
    kid[8] = (kid[8] & 0x3F) | 0x80
    rest = rng.getrandbits(8 * 60).to_bytes(60, "big")  # IV, ciphertext, tag
    return base64.b64encode(b"\x01" + bytes(kid) + b"\x00\x00\x00\x01" + rest).decode()


def requests_total(endpoint, operation, outcome):
    """p11kms_requests_total{operation, outcome} from GET /metrics."""
    host, port = urllib.parse.urlsplit(endpoint).netloc.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        c.request("GET", "/metrics", headers={"Authorization": "Bearer " + H.METRICS_TOKEN})
        r = c.getresponse()
        text = r.read().decode("utf-8", "replace")
    finally:
        c.close()
    if r.status != 200:
        raise Broken("GET /metrics answered %d" % r.status)
    for line in text.splitlines():
        if line.startswith("p11kms_requests_total{") and ('operation="%s"' % operation) in line \
                and ('outcome="%s"' % outcome) in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


# ---- the 100,000-key database, kept in the cache ----------------------------------


class LargeDB:
    """cache/: token/ (make-token.sh's, holding the root key), keys.db (the
    SQLite database make_keys filled), credentials, blobs.txt (make_keys
    --blobs: "KEY-ID BLOB" per key), manifest.json (layout version, key count,
    context, principal, schema version, how long the build took). Built in
    cache.partial/ and renamed when complete; never written after: every run
    copies token/ and keys.db into its workspace (p11kmsd reserves uses in the
    database and adds audit objects to the token)."""

    LABEL = "bench100k"

    def __init__(self, cache, tools):
        self.cache = cache
        self.tools = tools
        self.partial = cache + ".partial"

    @staticmethod
    def _principal(doc):
        return H.Principal(doc["access_key"], doc["secret"], doc["name"])

    def _token_at(self, d):
        """The token in d, its softhsm2.conf pointed at where it now is."""
        with open(os.path.join(H.SRCDIR, "softhsm-fixtures", "softhsm2.conf.in")) as f:
            text = f.read().replace("@TOKENDIR@", os.path.join(d, "tokens"))
        H.write_private(os.path.join(d, "softhsm2.conf"), text)
        return H.Token(d, self.LABEL)

    def stale(self):
        """Why the cache cannot be used as it is (None: it may be)."""
        try:
            with open(os.path.join(self.cache, "manifest.json")) as f:
                m = json.load(f)
        except (OSError, ValueError) as e:
            return "no manifest (%s)" % e
        want = {"version": CACHE_VERSION, "keys": KEYS_LARGE, "context": CONTEXT}
        for k, v in want.items():
            if m.get(k) != v:
                return "its %s is %r, not %r" % (k, m.get(k), v)
        for name in ("token", "keys.db", "credentials", "blobs.txt"):
            if not os.path.exists(os.path.join(self.cache, name)):
                return "%s is missing" % name
        return None

    def working_copy(self, dest):
        """Copies the token and the database to dest; returns what the runs use."""
        with open(os.path.join(self.cache, "manifest.json")) as f:
            m = json.load(f)
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.makedirs(dest, mode=0o700)
        shutil.copytree(os.path.join(self.cache, "token"), os.path.join(dest, "token"))
        for name in ("keys.db", "keys.db-wal"):
            if os.path.exists(os.path.join(self.cache, name)):
                shutil.copy2(os.path.join(self.cache, name), os.path.join(dest, name))
        shutil.copy2(os.path.join(self.cache, "credentials"), os.path.join(dest, "credentials"))
        keys, blobs = [], {}
        with open(os.path.join(self.cache, "blobs.txt")) as f:
            for line in f:
                kid, blob = line.split()
                keys.append(kid)
                blobs[kid] = blob
        return {"token": self._token_at(os.path.join(dest, "token")),
                "database": "sqlite:" + os.path.join(dest, "keys.db"),
                "credentials": os.path.join(dest, "credentials"),
                "principal": self._principal(m["principal"]), "manifest": m, "keys": keys,
                "blobs": blobs}

    def check(self, ws, large):
        """Raises Broken unless p11kmsd starts on the copy and Decrypts its
        first, middle and last blobs with their own keys."""
        if len(large["keys"]) != KEYS_LARGE:
            raise Broken("blobs.txt has %d keys, not %d" % (len(large["keys"]), KEYS_LARGE))
        conf = config_for(ws.sub("check.conf"), large["token"], large["credentials"],
                          ws.sub("check.audit.log"), database=large["database"])
        srv = ReadyServer(conf, large["token"], ws.sub("check.log")).start()
        try:
            keys = large["keys"]
            for kid in (keys[0], keys[KEYS_LARGE // 2], keys[-1]):
                got = call(srv.endpoint, large["principal"], "Decrypt",
                           decrypt_body(large["blobs"][kid]))
                if got["KeyId"].rsplit("/", 1)[-1] != kid:
                    raise Broken("Decrypt named another key")
        finally:
            srv.stop("the check's p11kmsd")

    def build(self, ws):
        """Makes the database in cache.partial with bench/make_keys (keys and a
        blob for each), then moves it to cache."""
        part = self.partial
        if os.path.isdir(part):
            log("discarding an unfinished build in %s" % part)
            shutil.rmtree(part)
        os.makedirs(part, mode=0o700)
        H.make_token(os.path.join(part, "token"), self.LABEL)
        p = H.new_principal("bench")
        H.write_credentials(os.path.join(part, "credentials"), [p])
        token = self._token_at(os.path.join(part, "token"))
        db = os.path.join(part, "keys.db")
        conf = config_for(ws.sub("build.conf"), token, os.path.join(part, "credentials"),
                          ws.sub("build.audit.log"), database="sqlite:" + db)
        # The key store's own CreateKey (bench/make_keys.c), which makes the
        # database and its root key, then a blob per key.
        log("making %s keys with make_keys" % thousands(KEYS_LARGE))
        blobs_file = os.path.join(part, "blobs.txt")
        args = [self.tools.make_keys, "--config", conf, "--count", str(KEYS_LARGE), "--blobs", blobs_file]
        for k, v in sorted(CONTEXT.items()):
            args += ["--context", "%s=%s" % (k, v)]
        out, _ = run(args, env=dict(os.environ, SOFTHSM2_CONF=token.conf), timeout=3600)
        f = fields(out)
        with open(blobs_file) as bf:
            lines = sum(1 for _ in bf)
        if lines != KEYS_LARGE or int(f.get("keys", -1)) != KEYS_LARGE:
            raise Broken("make_keys made %d blobs, not %d:\n%s" % (lines, KEYS_LARGE, out))
        # The write-ahead log folded into keys.db, so that the copies are one file.
        con = sqlite3.connect(db)
        try:
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            schema = con.execute("PRAGMA user_version").fetchone()[0]
        finally:
            con.close()
        seconds = float(f["seconds"])
        m = {"version": CACHE_VERSION, "keys": KEYS_LARGE, "context": CONTEXT,
             "principal": {"access_key": p.access_key, "secret": p.secret, "name": p.name},
             "schema": schema, "create_seconds": seconds, "keys_per_second": int(f["made"]) / seconds,
             "built": time.strftime("%Y-%m-%d %H:%M:%S")}
        H.write_private(os.path.join(part, "manifest.json"), json.dumps(m))
        log("%s keys and a blob for each made in %.0f s (make_keys, %.0f keys/s)" %
            (thousands(KEYS_LARGE), seconds, m["keys_per_second"]))
        if os.path.isdir(self.cache):
            shutil.rmtree(self.cache)
        os.rename(part, self.cache)

    def get(self, ws):
        """The working copy, after building the cache if it is stale. One bench
        at a time checks or builds it."""
        os.makedirs(os.path.dirname(self.cache), exist_ok=True)
        lock = open(self.cache + ".lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log("another bench holds %s.lock: waiting for it" % self.cache)
            fcntl.flock(lock, fcntl.LOCK_EX)
        self._lock = lock  # held until this process exits
        dest = ws.sub("large")
        why = self.stale()
        if why is None:
            try:
                large = self.working_copy(dest)
                self.check(ws, large)
                return large
            except (OSError, ValueError, KeyError, Broken) as e:
                why = str(e).splitlines()[0]
        log("the cached database in %s is not usable (%s): rebuilding it" % (self.cache, why))
        if os.path.isdir(self.cache):
            shutil.rmtree(self.cache)
        self.build(ws)
        large = self.working_copy(dest)
        self.check(ws, large)
        large["manifest"]["fresh"] = True
        return large


# ---- the programs ---------------------------------------------------------------


class Tools:
    """The programs; need: the bench programs the caller runs (all of them for bench.py)."""

    ALL = ("p11_ceiling", "mhd_canned", "client_open", "stream_rss", "make_keys")

    def __init__(self, a, need=ALL):
        b = a.builddir
        self.p11_ceiling = os.path.join(b, "bench", "p11_ceiling")
        self.mhd_canned = os.path.join(b, "bench", "mhd_canned")
        self.client_open = os.path.join(b, "bench", "client_open")
        self.stream_rss = os.path.join(b, "bench", "stream_rss")
        self.make_keys = os.path.join(b, "bench", "make_keys")
        self.lua = os.path.join(a.srcdir, "bench", "replay.lua")
        self.wrk = shutil.which("wrk") or "/usr/bin/wrk"
        self.openssl = shutil.which("openssl") or "/usr/bin/openssl"
        missing = [x for x in [getattr(self, n) for n in need] + [self.wrk, self.openssl, H.p11kmsd_path()]
                   if not os.access(x, os.X_OK)]
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
    if not endpoint.startswith("http://"):
        raise Broken("not sent again over %s" % endpoint.split(":", 1)[0])
    with open(path, "rb") as f:
        data = f.read()
    n, rest = data.split(b"\n", 1)
    head, body = rest[:int(n)].split(b"\r\n\r\n", 1)
    headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    headers.pop("Host", None)
    headers.pop("Content-Length", None)
    r = H.raw_request(endpoint, headers=headers, body=body)
    return r.status, r.body[:300]


def fresh_server(ws, name, binary=None, **settings):
    """A fresh token (and, for this build, database) in ws/name and a server
    on it (binary: the baseline's p11kmsd; settings: added to config_for's,
    audit_log=None: no audit log). Returns the started ReadyServer, the
    principal the credentials hold and the token."""
    d = ws.sub(name)
    os.makedirs(d, mode=0o700)
    token = H.make_token(os.path.join(d, "token"), "bench-" + name)
    principal = H.new_principal("bench")
    creds = H.write_credentials(os.path.join(d, "credentials"), [principal])
    audit_log = settings.pop("audit_log", os.path.join(d, "audit.log"))
    conf = config_for(os.path.join(d, "p11kmsd.conf"), token, creds, audit_log,
                      baseline=binary is not None, **settings)
    if binary is None:
        try:
            H.init_database(conf, token)
        except RuntimeError as e:
            raise Broken(str(e))
    return ReadyServer(conf, token, os.path.join(d, "p11kmsd.log"), binary).start(), principal, token


def small_setup(ws, name, binary=None):
    """fresh_server and 10 keys made with CreateKey; one GenerateDataKey per
    key, timed one after another ("first GenerateDataKey" with 10 keys), and a
    Decrypt blob per key."""
    server, principal, token = fresh_server(ws, name, binary)
    try:
        keys = create_keys(server.endpoint, principal, KEYS_SMALL)
        first = statistics.median(first_uses(server.endpoint, principal, keys))
        blobs = generate_blobs(server.endpoint, principal, keys)
    except BaseException:
        server.server.kill()
        raise
    return {"server": server, "principal": principal, "token": token, "keys": keys,
            "blobs": [blobs[k] for k in keys], "first": first}


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

    def report(self, table_text, started, load_before):
        """Prints the table, a BROKEN line per problem and the elapsed time;
        returns the exit status (1 when anything broke)."""
        print(table_text)
        for problem in self.problems:
            print("BROKEN: " + problem.splitlines()[0])
        # Other work on the machine moves every figure: the load average says whether there was any.
        print("elapsed: %.0f s (%d rounds, %s); load average %.2f before, %.2f after" % (
            time.monotonic() - started, self.rounds, time.strftime("%Y-%m-%d %H:%M"), load_before,
            os.getloadavg()[0]))
        sys.stdout.flush()
        for problem in self.problems:
            log(problem)
        return 1 if self.problems else 0

    # -- load ------------------------------------------------------------------

    def wrk_start(self, endpoint, reqfile, connections=None, once=None):
        """wrk over reqfile for P11KMS_BENCH_SECONDS; once: until that many
        answers instead (one wrk thread, replay.lua's ONCE)."""
        args = [self.t.wrk, "-t%d" % (1 if once else self.wrk_threads),
                "-c%d" % (connections or self.connections),
                "-d%ds" % 900 if once else "-d%gs" % self.seconds, "--timeout", "5s",
                "-s", self.t.lua, endpoint + "/", "--", reqfile]
        if once:
            args.append(str(once))
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)

    def wrk_finish(self, what, endpoint, reqfile, proc, refused=False):
        """The result of a wrk_start; refused: every answer must be an error
        (a flood of made-up blobs)."""
        try:
            out, err = proc.communicate(timeout=(960 if "-d900s" in proc.args else self.seconds + 60))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise Broken("%s: wrk did not finish" % what)
        out = out.decode("utf-8", "replace")
        line = [x for x in out.splitlines() if x.startswith("wrk_result ")]
        if proc.returncode != 0 or not line:
            raise Broken("%s: wrk (status %d) printed no result:\n%s%s" % (
                what, proc.returncode, out, err.decode("utf-8", "replace")))
        f = fields(line[0])
        r = {"rps": float(f["rps"]), "requests": int(f["requests"]),
             "seconds": int(f["duration_us"]) / 1e6,
             "p50": int(f["p50_us"]) / 1000.0, "p99": int(f["p99_us"]) / 1000.0,
             "p999": int(f["p999_us"]) / 1000.0, "max": int(f["max_us"]) / 1000.0,
             "non2xx": int(f["non2xx"]), "timeouts": int(f["timeout"]),
             "socket": int(f["connect"]) + int(f["read"]) + int(f["write"])}
        log("  %-30s %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms  p99.9 %6.2f ms  max %7.1f ms%s" % (
            what, r["rps"], r["p50"], r["p99"], r["p999"], r["max"],
            "  non-2xx %d socket errors %d timeouts %d" % (r["non2xx"], r["socket"], r["timeouts"])
            if r["non2xx"] or r["socket"] or r["timeouts"] else ""))
        wrong = r["requests"] - r["non2xx"] if refused else r["non2xx"]
        if wrong or r["socket"] or r["requests"] == 0:
            # Reported, and the run exits 1; the figure is what was answered as expected.
            status = ""
            try:
                status = "; the first request now gets %d %r" % first_answer(endpoint, reqfile)
            except (OSError, ValueError, Broken) as e:
                status = "; the first request cannot be sent again (%s)" % e
            problem = ("%s: %d answers %s, %d socket errors in %d requests%s" %
                       (what, wrong, "2xx (all should be refused)" if refused else "not 2xx",
                        r["socket"], r["requests"], status))
            self.problems.append("round %d: %s" % (len(self.results), problem))
            log("  BROKEN: %s" % problem)
            r["rps"] = (r["requests"] - wrong) / r["seconds"]
        return r

    def wrk(self, what, endpoint, reqfile, connections=None, once=None, refused=False):
        return self.wrk_finish(what, endpoint, reqfile,
                               self.wrk_start(endpoint, reqfile, connections, once), refused)

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

    def ceiling_run(self, token, threads, modes):
        """p11_ceiling with threads sessions on token's own session-object keys:
        for each mode (its --mode names) the rate and the CPU seconds per call."""
        env = dict(os.environ, SOFTHSM2_CONF=token.conf, SOFTHSM_MODULE=H.SOFTHSM_MODULE)
        out, _ = run([self.t.p11_ceiling, "--token", token.label, "--pin-file", token.pin_file,
                      "--module", H.SOFTHSM_MODULE, "--threads", str(threads), "--seconds",
                      "%g" % self.short, "--mode", ",".join(modes)], env=env,
                     timeout=2 * len(modes) * self.short + 60)
        r = {}
        for line in out.splitlines():
            name, f = line.split(" ", 1)[0], fields(line)
            if name[4:] in modes and name.startswith("p11_"):
                r[name[4:]] = {"rate": float(f["ops_per_s"]),
                               "cpu": float(f["cpu_seconds"]) / max(1, int(f["ops"]))}
        if set(r) != set(modes):
            raise Broken("p11_ceiling printed no rates:\n%s" % out)
        log("  token, %d thread%s        %s" % (threads, "s" if threads > 1 else " ", "  ".join(
            "%s %8.0f/s (%.1f us CPU each)" % (m, r[m]["rate"], r[m]["cpu"] * 1e6) for m in modes)))
        return r

    def token_ceiling(self, token, threads, modes=("wrap", "unwrap")):
        """ceiling_run's rate of each mode."""
        return {m: v["rate"] for m, v in self.ceiling_run(token, threads, modes).items()}

    # -- the 100,000-key database ---------------------------------------------------

    def large_server(self, large, name, key_cache):
        """p11kmsd on the working copy of the database, with key_cache."""
        conf = config_for(self.ws.sub(name + ".conf"), large["token"], large["credentials"],
                          self.ws.sub(name + ".audit.log"), database=large["database"],
                          key_cache=str(key_cache))
        # The audit logs of the runs so far on their way to disk would compete
        # with the start-up.
        os.sync()
        return ReadyServer(conf, large["token"], self.ws.sub(name + ".log")).start()

    def large_stop(self, srv, name):
        try:
            srv.stop("the %s-key server (%s)" % (thousands(KEYS_LARGE), name))
        finally:
            audit_log = self.ws.sub(name + ".audit.log")
            if os.path.exists(audit_log):
                os.unlink(audit_log)

    def fit_runs(self, large, rng):
        """key_cache 4096: start-up; GenerateDataKey and Decrypt on random keys
        of a hot set of 2,000; the first GenerateDataKey of 20 other keys; the
        flood."""
        srv = self.large_server(large, "fit", CACHE_FIT)
        out = {"startup": srv.startup}
        log("  start-up, %s keys          %6.3f s" % (thousands(KEYS_LARGE), srv.startup))
        try:
            ep, p, blobs = srv.endpoint, large["principal"], large["blobs"]
            nhot = min(HOT_FIT, KEYS_LARGE - COLD_KEYS)
            chosen = rng.sample(large["keys"], nhot + COLD_KEYS)
            hot, cold = chosen[:nhot], chosen[nhot:]
            # Not measured: every hot key used once (its entry read from the
            # database, its version unwrapped, its first block of uses reserved).
            self.wrk("warm-up: hot set, each once", ep, presign(
                self.ws.sub("warm.req"), ep, p, "GenerateDataKey", [gdk_body(k) for k in hot]),
                once=len(hot) + self.connections)
            draws = [rng.choice(hot) for _ in range(4 * nhot)]
            gdk_req = presign(self.ws.sub("gdkfit.req"), ep, p, "GenerateDataKey",
                              [gdk_body(k) for k in draws])
            out["gdk"] = self.wrk("GenerateDataKey, hot %d" % nhot, ep, gdk_req)
            out["dec"] = self.wrk("Decrypt, hot %d" % nhot, ep, presign(
                self.ws.sub("decfit.req"), ep, p, "Decrypt", [decrypt_body(blobs[k]) for k in draws]))
            took = first_uses(ep, p, cold)
            out["cold"] = statistics.median(took)
            log("  first GenerateDataKey of %d cold keys: median %.2f ms (%.2f to %.2f)" %
                (len(cold), out["cold"], min(took), max(took)))
            out.update(self.flood(ep, p, gdk_req, rng))
        finally:
            self.large_stop(srv, "fit")
        return out

    def flood(self, ep, p, gdk_req, rng):
        """GenerateDataKey from half the connections alone (quiet), then again
        while the other half sends Decrypts of made-up blobs."""
        half = max(1, self.connections // 2)
        flood_req = presign(self.ws.sub("flood.req"), ep, p, "Decrypt",
                            [decrypt_body(made_up_blob(rng)) for _ in range(FLOOD_IDS)])
        status, body = first_answer(ep, flood_req)
        if status != 400 or INVALID_CIPHERTEXT.encode() not in body:
            raise Broken("a made-up blob answered %d %r, not 400 %s" % (status, body, INVALID_CIPHERTEXT))
        before = requests_total(ep, "Decrypt", INVALID_CIPHERTEXT)
        out = {"quiet": self.wrk("GenerateDataKey -c%d, quiet" % half, ep, gdk_req, connections=half)}
        g = self.wrk_start(ep, gdk_req, connections=half)
        f = self.wrk_start(ep, flood_req, connections=half)
        try:
            out["flooded"] = self.wrk_finish("GenerateDataKey -c%d, flood" % half, ep, gdk_req, g)
        finally:
            out["flood"] = self.wrk_finish("flood: made-up blobs -c%d" % half, ep, flood_req, f,
                                           refused=True)
        refused = requests_total(ep, "Decrypt", INVALID_CIPHERTEXT) - before
        if refused < out["flood"]["requests"]:
            raise Broken("the flood: %d answers, but p11kmsd counted %d %s" %
                         (out["flood"]["requests"], refused, INVALID_CIPHERTEXT))
        return out

    def big_runs(self, large, rng):
        """key_cache 1000: Decrypt, then GenerateDataKey (after one of each
        hot key, not measured), on random keys of a hot set of 10,000."""
        srv = self.large_server(large, "big", CACHE_BIG)
        out = {}
        try:
            ep, p, blobs = srv.endpoint, large["principal"], large["blobs"]
            nhot = min(HOT_BIG, KEYS_LARGE)
            hot = rng.sample(large["keys"], nhot)
            draws = [rng.choice(hot) for _ in range(nhot)]
            out["dec"] = self.wrk("Decrypt, hot %d, cache %d" % (nhot, CACHE_BIG), ep, presign(
                self.ws.sub("decbig.req"), ep, p, "Decrypt", [decrypt_body(blobs[k]) for k in draws]))
            # Not measured: each hot key's first GenerateDataKey since the start
            # reserves its first block of uses (a database write); after it, a
            # miss takes back the uses its key left (docs/keystore.md).
            self.wrk("warm-up: hot set, each once", ep, presign(
                self.ws.sub("warmbig.req"), ep, p, "GenerateDataKey", [gdk_body(k) for k in hot]),
                once=len(hot) + self.connections)
            out["gdk"] = self.wrk("GenerateDataKey, hot %d, cache %d" % (nhot, CACHE_BIG), ep, presign(
                self.ws.sub("gdkbig.req"), ep, p, "GenerateDataKey", [gdk_body(k) for k in draws]))
        finally:
            self.large_stop(srv, "big")
        return out

    def rss_run(self, large):
        """key_cache 100,000: VmRSS at start, then after a Decrypt of every
        key's blob (each key's first use: every key cached)."""
        srv = self.large_server(large, "rss", KEYS_LARGE)
        try:
            out = {"start": srv.rss_kib()}
            ep, p = srv.endpoint, large["principal"]
            req = presign(self.ws.sub("decall.req"), ep, p, "Decrypt",
                          [decrypt_body(large["blobs"][k]) for k in large["keys"]])
            before = requests_total(ep, "Decrypt", "ok")
            out["fill"] = self.wrk("Decrypt, every key once", ep, req, once=KEYS_LARGE + self.connections)
            done = requests_total(ep, "Decrypt", "ok") - before
            if done < KEYS_LARGE:
                raise Broken("only %d Decrypts of the %d keys answered" % (done, KEYS_LARGE))
            out["full"] = srv.rss_kib()
            os.unlink(req)
            log("  RSS with %s keys cached: %.1f MiB (%.1f MiB at start)" %
                (thousands(KEYS_LARGE), out["full"] / 1024, out["start"] / 1024))
        finally:
            self.large_stop(srv, "rss")
        return out

    # -- the client library ------------------------------------------------------

    def client_open(self, endpoint, principal, key_id):
        env = H.server_env({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": principal.access_key,
                            "AWS_SECRET_ACCESS_KEY": principal.secret, "AWS_DEFAULT_REGION": H.REGION,
                            "P11KMS_METRICS_TOKEN": H.METRICS_TOKEN})
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

    def round(self, small, base, large):
        n = len(self.results) + 1
        r = {}
        self.results.append(r)
        log("round %d of %d" % (n, self.rounds))
        rng = random.Random(n)  # the hot sets and draws: other keys each round, the same each run
        ep, p = small["server"].endpoint, small["principal"]
        # The canned server answers anything: the 10-key GenerateDataKey requests.
        self.step(r, "http", self.mhd, presign(self.ws.sub("canned.req"), ep, p, "GenerateDataKey",
                                               [gdk_body(k) for k in small["keys"]]))
        for threads in CEILING_THREADS:
            self.step(r, "token%d" % threads, self.token_ceiling, small["token"], threads)
        # 10 keys: this build, then the previous release, for each operation.
        for op, key, bodies in (("GenerateDataKey", "gdk", lambda s: [gdk_body(k) for k in s["keys"]]),
                                ("Decrypt", "dec", lambda s: [decrypt_body(b) for b in s["blobs"]])):
            for tag, s in (("", small), ("old", base)):
                if s is None:
                    continue
                e = s["server"].endpoint
                self.step(r, key + "10" + tag, self.wrk, "%s 10%s" % (op, ", previous" if tag else ""), e,
                          presign(self.ws.sub(key + "10" + tag + ".req"), e, s["principal"], op, bodies(s)))
        # The 100,000-key servers only run for their own runs.
        self.step(r, "fit", self.fit_runs, large, rng)
        self.step(r, "big", self.big_runs, large, rng)
        if n == self.rounds:
            self.step(r, "rss", self.rss_run, large)  # once a run
        self.step(r, "client", self.client_open, ep, p, small["keys"][0])
        self.step(r, "stream", self.stream)
        self.step(r, "openssl", self.openssl_speed)


# ---- the table ------------------------------------------------------------------


def rate(v):
    return "{:,.0f}/s".format(v)


def ms(v):
    return "%.2f ms" % v


def mib(kib):
    return "%.1f MiB" % (kib / 1024)


class Table:
    def __init__(self, results):
        self.results = results
        self.rows = []
        self.unmeasured = 0

    def median(self, fn):
        """The median over the rounds of fn(round), None when no round has it."""
        vals = []
        for r in self.results:
            try:
                vals.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                pass
        if vals and isinstance(vals[0], tuple):
            return tuple(statistics.median(v[i] for v in vals) for i in range(len(vals[0])))
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
        out.append("bars met: %d of %d%s" % (bars.count("yes"), len(bars),
                                             "; %d not measured" % self.unmeasured
                                             if self.unmeasured else ""))
        return "\n".join(out)


def best_wrap(r):
    return max(r["token%d" % n]["wrap"] for n in CEILING_THREADS)


def best_unwrap(r):
    return max(r["token%d" % n]["unwrap"] for n in CEILING_THREADS)


def ceiling(http, token):
    return 1.0 / (1.0 / http + 1.0 / token)


def make_table(results, large_manifest, first_small, baseline):
    t = Table(results)
    for mode in ("wrap", "unwrap"):
        for n in CEILING_THREADS:
            t.figure("token: AES-256-GCM %s of 32 bytes, %d thread%s" % (mode, n, "s" if n > 1 else ""),
                     lambda r, m=mode, n=n: r["token%d" % n][m], rate, "p11_ceiling, a session object")
    t.figure("HTTP: canned 274-byte answer, mhd_canned", lambda r: r["http"]["rps"], rate,
             ref_fn=lambda r: r["http"]["p99"], ref_fmt=lambda v: "p99 " + ms(v))
    t.figure("combined ceiling, GenerateDataKey", lambda r: ceiling(r["http"]["rps"], best_wrap(r)),
             rate, "1/(1/HTTP + 1/best wrap)")
    t.figure("combined ceiling, Decrypt", lambda r: ceiling(r["http"]["rps"], best_unwrap(r)),
             rate, "1/(1/HTTP + 1/best unwrap)")
    ops = (("GenerateDataKey", "gdk"), ("Decrypt", "dec"))
    for op, key in ops:
        t.figure("%s, 10 keys" % op, lambda r, k=key: r[k + "10"]["rps"], rate,
                 ref_fn=lambda r, b=best_wrap if key == "gdk" else best_unwrap: ceiling(r["http"]["rps"], b(r)),
                 ratio_fn=lambda r, k=key, b=best_wrap if key == "gdk" else best_unwrap:
                 r[k + "10"]["rps"] / ceiling(r["http"]["rps"], b(r)),
                 bar=">= 0.80 x ceiling", check=lambda v, q: q >= 0.8)
        t.figure("%s, 10 keys, p99 latency" % op, lambda r, k=key: r[k + "10"]["p99"], ms,
                 ref_fn=lambda r, k=key: (r[k + "10"]["p50"], r[k + "10"]["p999"]),
                 ref_fmt=lambda v: "p50 %.2f, p99.9 %.2f ms" % v,
                 bar="<= 2 ms", check=lambda v, q: v <= 2.0)
    for op, key in ops:
        name = "%s, 10 keys, against the previous release" % op
        if baseline:
            t.figure(name, lambda r, k=key: r[k + "10"]["rps"], rate,
                     ref_fn=lambda r, k=key: r[k + "10old"]["rps"],
                     ref_fmt=lambda v: rate(v) + " previous release",
                     ratio_fn=lambda r, k=key: r[k + "10"]["rps"] / r[k + "10old"]["rps"],
                     bar=">= 1.30 x previous", check=lambda v, q: q >= 1.3)
        else:
            t.add(name, "not measured (set %s)" % BASELINE_ENV, bar=">= 1.30 x previous")
            t.unmeasured += 1
    n = thousands(KEYS_LARGE)
    t.figure("start-up with %s keys (exec to /readyz 200)" % n, lambda r: r["fit"]["startup"],
             lambda v: "%.3f s" % v, bar="<= 1 s", check=lambda v, q: v <= 1.0)
    nfit = thousands(min(HOT_FIT, KEYS_LARGE - COLD_KEYS))
    for op, key in ops:
        t.figure("%s, %s keys, hot set %s (key_cache %s)" % (op, n, nfit, thousands(CACHE_FIT)),
                 lambda r, k=key: r["fit"][k]["rps"], rate,
                 ref_fn=lambda r, k=key: r[k + "10"]["rps"], ref_fmt=lambda v: rate(v) + " with 10 keys",
                 ratio_fn=lambda r, k=key: r["fit"][k]["rps"] / r[k + "10"]["rps"],
                 bar=">= 0.90 x 10 keys", check=lambda v, q: q >= 0.9)
        t.figure("%s, hot set %s, p99.9 latency" % (op, nfit), lambda r, k=key: r["fit"][k]["p999"], ms,
                 ref_fn=lambda r, k=key: (r["fit"][k]["p50"], r["fit"][k]["p99"]),
                 ref_fmt=lambda v: "p50 %.2f, p99 %.2f ms" % v,
                 ratio_fn=lambda r, k=key: r["fit"][k]["p999"] / r["fit"][k]["p50"],
                 bar="<= 10 x p50", check=lambda v, q: q <= 10)
    nbig = thousands(min(HOT_BIG, KEYS_LARGE))
    for op, key in ops:
        t.figure("%s, %s keys, hot set %s (key_cache %s)" % (op, n, nbig, thousands(CACHE_BIG)),
                 lambda r, k=key: r["big"][k]["rps"], rate,
                 ref_fn=lambda r, k=key: (r["big"][k]["p50"], r["big"][k]["p99"]),
                 ref_fmt=lambda v: "p50 %.2f, p99 %.2f ms" % v,
                 ratio_fn=lambda r, k=key: r["big"][k]["rps"] / r[k + "10"]["rps"])
    t.figure("first GenerateDataKey of a cold key, %s keys (median of %d)" % (n, COLD_KEYS),
             lambda r: r["fit"]["cold"], ms, ref_fn=lambda r: first_small,
             ref_fmt=lambda v: "%.2f ms first with 10 keys" % v, bar="<= 5 ms", check=lambda v, q: v <= 5.0)
    half = "-c%d" % max(1, env_number("P11KMS_BENCH_CONNECTIONS", 32, int) // 2)
    t.figure("GenerateDataKey p99 during a flood of made-up blobs (%s each)" % half,
             lambda r: r["fit"]["flooded"]["p99"], ms,
             ref_fn=lambda r: r["fit"]["quiet"]["p99"], ref_fmt=lambda v: "p99 %.2f ms without" % v,
             ratio_fn=lambda r: r["fit"]["flooded"]["p99"] / r["fit"]["quiet"]["p99"],
             bar="<= 2 x without", check=lambda v, q: q <= 2.0)
    t.figure("  the flood: Decrypt of %s made-up blobs, all refused" % thousands(FLOOD_IDS),
             lambda r: r["fit"]["flood"]["rps"], rate,
             ref_fn=lambda r: (r["fit"]["flooded"]["rps"], r["fit"]["quiet"]["rps"]),
             ref_fmt=lambda v: "GenerateDataKey %s alongside, %s without" % (rate(v[0]), rate(v[1])))
    t.figure("RSS of p11kmsd, %s keys cached (key_cache %s)" % (n, n), lambda r: r["rss"]["full"], mib,
             ref_fn=lambda r: r["rss"]["start"], ref_fmt=lambda v: mib(v) + " at start")
    t.figure("  Decrypt of each of the %s keys once (filling the cache)" % n,
             lambda r: r["rss"]["fill"]["rps"], rate,
             ref_fn=lambda r: r["rss"]["fill"]["seconds"], ref_fmt=lambda v: "%.1f s" % v)
    t.figure("client: cache-hit p11kms_open, 1 KiB", lambda r: r["client"]["hit"], rate,
             ref_fn=lambda r: r["client"]["raw"], ref_fmt=lambda v: rate(v) + " raw: OpenSSL base64+EVP",
             ratio_fn=lambda r: r["client"]["hit"] / r["client"]["raw"], bar=">= 0.50 x raw",
             check=lambda v, q: q >= 0.5)
    mibs = lambda v: "%.0f MiB/s" % (v / 1048576)
    t.figure("client: streaming encryption of 1 GiB", lambda r: r["stream"]["rate"], mibs,
             ref_fn=lambda r: r["openssl"], ref_fmt=lambda v: mibs(v) + " openssl speed 16 KiB",
             ratio_fn=lambda r: r["stream"]["rate"] / r["openssl"], bar=">= 0.70 x OpenSSL",
             check=lambda v, q: q >= 0.7)
    t.figure("client: streaming round trip of 1 GiB (pipe, two threads)", lambda r: r["stream"]["trip"],
             mibs)
    t.figure("client: streaming, max RSS", lambda r: r["stream"]["rss_kib"], mib,
             bar="<= 16 MiB", check=lambda v, q: v <= 16 * 1024)
    m = large_manifest
    t.add("setup: make_keys of %s keys into the database%s" % (n, "" if m.get("fresh") else " (cached)"),
          "{:,.0f} keys/s".format(m["keys_per_second"]),
          "%.0f s, built %s, schema %s" % (m["create_seconds"], m.get("built", "?"), m.get("schema", "?")))
    return t


def begin(args_and_harness):
    """A bench script's start: its clock and the load average, then its
    arguments and the harness (args_and_harness()), and the signals that stop
    it cleanly. Returns the arguments, the start time and the load."""
    started, load_before = time.monotonic(), os.getloadavg()[0]
    a = args_and_harness()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, H._interrupt)
    return a, started, load_before


def main():
    a, started, load_before = begin(args_and_harness)
    tools = Tools(a)
    ws = H.Workspace("p11kms-bench-")
    servers = []
    try:
        large = LargeDB(a.cache, tools).get(ws)
        manifest = large["manifest"]
        if a.prepare_only:
            log("the %s-key database is ready in %s (make_keys: %.0f s, %.0f keys/s)" %
                (thousands(KEYS_LARGE), a.cache, manifest["create_seconds"], manifest["keys_per_second"]))
            return 0
        small = small_setup(ws, "small")
        servers.append(small["server"])
        base = None
        if a.baseline:
            base = small_setup(ws, "base", a.baseline)
            servers.append(base["server"])

        b = Bench(a, ws, tools)
        log("%d rounds; wrk -t%d -c%d, %g s per run; %g s per p11_ceiling mode and client_open half; "
            "previous release: %s" % (b.rounds, b.wrk_threads, b.connections, b.seconds, b.short,
                                      a.baseline or "not measured"))
        for _ in range(b.rounds):
            b.round(small, base, large)
        while servers:
            try:
                servers.pop().stop("a 10-key server")
            except Broken as e:
                b.problems.append(str(e))

        text = make_table(b.results, manifest, small["first"], base is not None).text()
        if a.baseline:
            text += "\nprevious release: %s" % a.baseline
        return b.report(text, started, load_before)
    except Broken as e:
        log(str(e))
        return 1
    finally:
        for s in servers:
            s.server.kill()
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
