#!/usr/bin/python3
"""p11kmsd's key store on PostgreSQL, one node and three: the second part of
`make bench` (`make bench-pg` runs it alone), as

    tests/pgserver.sh run bench_pg.py --builddir DIR [--srcdir DIR] [--module PATH]

tests/pgserver.sh starts a throw-away PostgreSQL server on loopback and
removes it at the end; run without it, this script starts itself under it.
Nodes are configured as tests/integration/test_postgres.py configures them:
`database = postgresql://...` with its password in the configuration (mode
0600), `p11kmsd init` once, then each node on its own copy of the token
folder made after init. Each round (P11KMS_BENCH_ROUNDS) measures, one thing
at a time:

  - GenerateDataKey and Decrypt on 10 keys under wrk, as bench.py measures
    them (presigned requests, bench/replay.lua), on a node on SQLite and on
    node A on PostgreSQL, the same configuration otherwise; which goes first
    alternates between rounds. Bar: PostgreSQL >= 0.95 x SQLite, since a key
    in the node's cache is served without the database. The database's
    transactions during the PostgreSQL runs are counted too;
  - CreateKey, RotateKeyOnDemand (over 60 keys made beforehand) and
    UpdateAlias (36 aliases moving over 4 targets) per second under wrk: on
    the SQLite node, on node A alone, and on nodes A, B and C at once, the
    same connections spread over the three, each node working on its own
    third of the keys and aliases;
  - change propagation: DisableKey or EnableKey on node A, then
    GenerateDataKey on node B back to back until B answers accordingly (as
    test_postgres does), P11KMS_BENCH_PROPAGATION samples with the default
    refresh_ms and with refresh_ms = 5000 (so that the figure is the change
    feed's LISTEN/NOTIFY, not the timer's poll). Bars: median <= 100 ms, p99
    <= 500 ms.

The rate limits are raised as in bench.py and max_on_demand_rotations is at
its maximum, so that the store is measured, not the limiter. After the rounds,
tests/integration/test_cluster_pg.sh runs for P11KMS_CLUSTER_SECONDS (three
nodes behind nginx on a PostgreSQL server of its own, a node killed and the
database crashed under load) and its counts are rows of the table: changes
acknowledged, blobs, lost changes, differences between the nodes, blobs that
fail, disagreements with the database (bars: 0), and its TAP result.

One table like bench.py's is printed: figure, value (the median over the
rounds), reference, ratio (the median of the rounds' ratios), bar, met; then
the elapsed time and the load average. Each run's numbers go to stderr.

Environment: P11KMS_BENCH_SECONDS (8: seconds per wrk run),
P11KMS_BENCH_ROUNDS (3), P11KMS_BENCH_WRK_THREADS (1: wrk threads per wrk),
P11KMS_BENCH_CONNECTIONS (32: wrk connections; on three nodes, a third of
them on each), P11KMS_BENCH_PROPAGATION (50: changes timed per round and
refresh_ms), P11KMS_CLUSTER_SECONDS (60: test_cluster_pg's load).

Exit status 0 when the table was printed and the cluster test passed, bars
met or not; 1 when something broke (an unexpected answer, a socket error, a
node or program failing, the cluster test failing); 2 on a usage error.
Needs /usr/bin/wrk, nginx, PostgreSQL's server (tests/pgserver.sh) and
python3-boto3.
"""

import argparse
import glob
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
HERE = os.path.dirname(os.path.abspath(__file__))

if not os.environ.get("P11KMS_TEST_PG_URL"):
    # Under a throw-away server, as make bench runs it.
    _pg = os.path.join(HERE, "..", "tests", "pgserver.sh")
    os.execv(_pg, [_pg, "run", sys.executable, os.path.abspath(__file__)] + sys.argv[1:])

sys.path.insert(0, HERE)
import bench as B  # noqa: E402 - bench.py's wrk runs, request files, servers and table

H = None  # the harness, imported once the environment names this build
KEYS = B.KEYS_SMALL
ROTATED_KEYS = 60  # RotateKeyOnDemand round robin over them: no two in flight on one key
TARGETS = 4
ALIASES = 36  # more than the connections on a node of three: no two in flight on one alias
NODES = ("A", "B", "C")
# bench.py's limits are added by config_for; rotations per key at settings.c's maximum.
SETTINGS = {"max_on_demand_rotations": "1000000"}
SLOW_REFRESH_MS = 5000
MEDIAN_BAR_MS, P99_BAR_MS = 100.0, 500.0
CRYPTO_BAR = 0.95
MANAGE_OPS = ("CreateKey", "RotateKeyOnDemand", "UpdateAlias")
DISABLED = "DisabledException"
log = B.log


# ---- setting up -----------------------------------------------------------------


def args_and_harness():
    p = argparse.ArgumentParser(description="p11kmsd benchmark on PostgreSQL (run under "
                                            "tests/pgserver.sh)")
    p.add_argument("--builddir", required=True)
    p.add_argument("--srcdir")
    p.add_argument("--module")
    a = p.parse_args()
    a.builddir = os.path.abspath(a.builddir)
    a.srcdir = os.path.abspath(a.srcdir or os.path.join(HERE, ".."))
    os.environ["P11KMS_SRCDIR"] = a.srcdir
    os.environ["P11KMSD"] = os.path.join(a.builddir, "p11kmsd")
    if a.module:
        os.environ["SOFTHSM_MODULE"] = a.module
    sys.path.insert(0, os.path.join(a.srcdir, "tests", "integration"))
    global H
    import harness as H  # noqa: E402 - needs the environment above
    B.H = H  # bench.py's functions use the harness its own main would have imported
    return a


class Tools:
    """What bench.Bench's wrk runs use, and what the cluster test needs."""

    def __init__(self, a):
        self.wrk = shutil.which("wrk") or "/usr/bin/wrk"
        self.lua = os.path.join(a.srcdir, "bench", "replay.lua")
        self.cluster = os.path.join(a.srcdir, "tests", "integration", "test_cluster_pg.sh")
        missing = [x for x in (self.wrk, self.cluster, os.environ["P11KMSD"]) if not os.access(x, os.X_OK)]
        if not os.path.exists(self.lua):
            missing.append(self.lua)
        if not (shutil.which("nginx") or os.access("/usr/sbin/nginx", os.X_OK)):
            missing.append("nginx")
        if missing:
            sys.exit("bench_pg: not found or not executable: %s (wrk and nginx are Debian's "
                     "packages)" % ", ".join(missing))


class Database:
    """The PostgreSQL server pgserver.sh started, asked through psql."""

    def __init__(self, url):
        self.url = url
        u = urllib.parse.urlsplit(url)
        self.args = ["-X", "-q", "-A", "-t", "-h", u.hostname, "-p", str(u.port), "-U", u.username,
                     "-d", u.path.lstrip("/")]
        self.env = dict(os.environ, PGPASSWORD=urllib.parse.unquote(u.password or ""),
                        PGCONNECT_TIMEOUT="5")

    @staticmethod
    def psql():
        """The psql beside the server pgserver.sh runs ($PG_BIN, else the newest installed)."""
        if os.environ.get("PG_BIN"):
            return os.path.join(os.environ["PG_BIN"], "psql")
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"),
                       key=lambda p: [int(x) if x.isdigit() else x for x in p.split("/")])
        return found[-1] if found else "psql"

    def one(self, sql):
        out, _ = B.run([self.psql()] + self.args + ["-c", sql], env=self.env, timeout=30)
        return out.strip()

    def transactions(self):
        """Commits and rollbacks in the database so far. PostgreSQL's statistics
        reach the view with a delay (a busy connection reports at most once a
        second), so a difference is right to within a few."""
        return int(self.one("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                            "WHERE datname = current_database()"))


class Node:
    """One p11kmsd: its token, database and configuration; started and stopped
    as the runs need it (refresh_ms: None for the default)."""

    def __init__(self, ws, name, token, credentials, database):
        self.ws, self.name, self.token = ws, name, token
        self.credentials, self.database = credentials, database
        self.server = None

    def config(self, refresh_ms=None):
        extra = dict(SETTINGS, database=self.database)
        if refresh_ms:
            extra["refresh_ms"] = str(refresh_ms)
        path = self.ws.sub("%s%s.conf" % (self.name, "-refresh%d" % refresh_ms if refresh_ms else ""))
        # One audit log per node, whichever configuration it runs with.
        return B.config_for(path, self.token, self.credentials, self.ws.sub(self.name + ".audit.log"),
                            **extra)

    def start(self, refresh_ms=None):
        self.server = B.ReadyServer(self.config(refresh_ms), self.token,
                                    self.ws.sub(self.name + ".log")).start()
        return self

    def stop(self):
        server, self.server = self.server, None
        if server:
            server.stop("node %s" % self.name)

    def kill(self):
        server, self.server = self.server, None
        if server:
            server.server.kill()

    @property
    def endpoint(self):
        return self.server.endpoint


def init(node):
    try:
        H.init_database(node.config(), node.token)
    except RuntimeError as e:
        raise B.Broken(str(e))


def call_empty(endpoint, principal, operation, params):
    """A call whose answer has no body (CreateAlias, DisableKey, EnableKey)."""
    r = H.kms_call(endpoint, operation, params, principal)
    if r.status != 200:
        raise B.Broken("%s answered %d: %s" % (operation, r.status, r.body[:300]))


def make_objects(node, principal, with_propagation_key):
    """The keys, blobs and aliases the runs use, made through node."""
    ep = node.endpoint
    keys = B.create_keys(ep, principal, KEYS)
    blobs = B.generate_blobs(ep, principal, keys)
    objects = {"keys": keys, "blobs": [blobs[k] for k in keys],
               "rotated": B.create_keys(ep, principal, ROTATED_KEYS),
               "targets": B.create_keys(ep, principal, TARGETS),
               "aliases": ["alias/bench-pg-%02d" % i for i in range(ALIASES)]}
    for i, name in enumerate(objects["aliases"]):
        call_empty(ep, principal, "CreateAlias",
                   {"AliasName": name, "TargetKeyId": objects["targets"][i % TARGETS]})
    if with_propagation_key:
        objects["propagation"] = B.create_keys(ep, principal, 1)[0]
    return objects


def manage_bodies(op, objects, part, parts):
    """The requests of one management run on node part of parts: its own
    share of the keys and aliases, so that the nodes do not wait on each
    other's row locks."""
    if op == "CreateKey":
        return [{"Description": "bench_pg"}]
    if op == "RotateKeyOnDemand":
        return [{"KeyId": k} for k in objects["rotated"][part::parts]]
    names = objects["aliases"][part::parts]
    # Consecutive requests name different aliases; each alias moves to another target each time.
    return [{"AliasName": name, "TargetKeyId": objects["targets"][(i + step) % TARGETS]}
            for step in range(1, TARGETS + 1) for i, name in enumerate(names)]


def p99(samples):
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]


# ---- the rounds --------------------------------------------------------------------


class PgBench(B.Bench):
    def __init__(self, a, ws, tools, url):
        super().__init__(a, ws, tools)
        self.samples = B.env_number("P11KMS_BENCH_PROPAGATION", 50, int)
        self.db = Database(url)
        self.principal = H.new_principal("bench")
        creds = H.write_credentials(ws.sub("credentials"), [self.principal])
        self.sqlite = Node(ws, "sqlite", H.make_token(ws.sub("token-sqlite"), "bench-sqlite"), creds,
                           "sqlite:" + ws.sub("sqlite.db"))
        self.pg_token = H.make_token(ws.sub("token-pg"), "bench-pg")
        self.pg_init = Node(ws, "init", self.pg_token, creds, url)
        self.nodes = {}
        self.objects = {}

    def all_nodes(self):
        return [self.sqlite] + list(self.nodes.values())

    def setup(self):
        """Both databases initialised, then each PostgreSQL node's copy of the
        token (the root key init made, cloned), then the objects of the runs."""
        init(self.sqlite)
        init(self.pg_init)
        for name in NODES:
            token = H.copy_token(self.pg_token, self.ws.sub("token-" + name))
            self.nodes[name] = Node(self.ws, name, token, self.sqlite.credentials, self.db.url)
        for key, node in (("sqlite", self.sqlite), ("pg", self.nodes["A"])):
            node.start()
            try:
                self.objects[key] = make_objects(node, self.principal, key == "pg")
            finally:
                node.stop()
        log("%d keys for the data-key runs, %d rotated, %d aliases over %d targets on each "
            "database" % (KEYS, ROTATED_KEYS, ALIASES, TARGETS))

    def stop_all(self):
        for node in self.all_nodes():
            try:
                node.stop()
            except B.Broken as e:
                self.problems.append("round %d: %s" % (len(self.results), e))
                log("  BROKEN: %s" % e)

    def kill_all(self):
        for node in self.all_nodes():
            node.kill()

    # -- data keys -------------------------------------------------------------

    def warm(self, node, objects):
        """Not measured: each key's first use since the start (its row read,
        its version unwrapped, its first block of uses reserved)."""
        B.generate_blobs(node.endpoint, self.principal, objects["keys"])

    def crypto_run(self, op, node, objects):
        ep = node.endpoint
        if op == "GenerateDataKey":
            bodies = [B.gdk_body(k) for k in objects["keys"]]
        else:
            bodies = [B.decrypt_body(b) for b in objects["blobs"]]
        req = B.presign(self.ws.sub("%s-%s.req" % (op, node.name)), ep, self.principal, op, bodies)
        if node is self.sqlite:
            return self.wrk("%s, SQLite" % op, ep, req)
        before = self.db.transactions()
        r = self.wrk("%s, PostgreSQL" % op, ep, req)
        r["transactions"] = self.db.transactions() - before
        log("  %d database transactions during the run" % r["transactions"])
        return r

    def crypto(self, r, n):
        pairs = [("sqlite", self.sqlite), ("pg", self.nodes["A"])]
        if n % 2 == 0:
            pairs.reverse()  # neither database always gets the first, or the second, turn
        for op, key in (("GenerateDataKey", "gdk"), ("Decrypt", "dec")):
            for tag, node in pairs:
                self.step(r, "%s_%s" % (key, tag), self.crypto_run, op, node, self.objects[tag])

    # -- management calls -------------------------------------------------------

    def manage(self, nodes, objects):
        """Each management operation under wrk on every node of nodes at once,
        the connections spread over them; the rates added up."""
        per_node = max(1, int(round(self.connections / len(nodes))))
        where = "+".join(n.name for n in nodes)
        out = {}
        for op in MANAGE_OPS:
            runs = []
            # p11kmsd accepts a signed request again within its 5-minute window, so
            # that the one CreateKey request makes a new key each time it is sent.
            for i, node in enumerate(nodes):
                req = B.presign(self.ws.sub("%s-%s.req" % (op, node.name)), node.endpoint,
                                self.principal, op, manage_bodies(op, objects, i, len(nodes)))
                runs.append((node, req, self.wrk_start(node.endpoint, req, per_node)))
            results, broken = [], None
            for node, req, proc in runs:  # every wrk waited for, even after one broke
                try:
                    results.append(self.wrk_finish("%s on %s" % (op, node.name), node.endpoint, req, proc))
                except B.Broken as e:
                    broken = broken or e
            if broken:
                raise broken
            out[op] = {"rps": sum(x["rps"] for x in results), "p50": max(x["p50"] for x in results),
                       "p99": max(x["p99"] for x in results)}
            if len(nodes) > 1:
                log("  %-30s %8.0f req/s on %s together" % (op, out[op]["rps"], where))
        return out

    # -- propagation -------------------------------------------------------------

    def wait_seen(self, node, key, disabled, limit):
        """Seconds until GenerateDataKey on node is refused as disabled or, with
        disabled False, answered again; asked back to back."""
        t0 = time.monotonic()
        while True:
            got = H.kms_call(node.endpoint, "GenerateDataKey", B.gdk_body(key), self.principal)
            elapsed = time.monotonic() - t0
            if got.status == 409 and DISABLED.encode() in got.body:
                if disabled:
                    return elapsed
            elif got.status != 200:
                raise B.Broken("GenerateDataKey on node %s answered %d: %s" %
                               (node.name, got.status, got.body[:300]))
            elif not disabled:
                return elapsed
            if elapsed > limit:
                raise B.Broken("node %s did not see the change within %.1f s" % (node.name, limit))
            time.sleep(0.002)

    def change(self, a, b, key, disabled, limit):
        call_empty(a.endpoint, self.principal, "DisableKey" if disabled else "EnableKey", {"KeyId": key})
        return self.wait_seen(b, key, disabled, limit)

    def propagation(self, a, b, refresh_ms):
        """DisableKey and EnableKey in turn on a, each timed until b honours it (ms)."""
        key = self.objects["pg"]["propagation"]
        limit = (refresh_ms or 1000) / 1000.0 + 5.0  # the timer's poll covers a lost announcement
        # Not measured: the key enabled (a round that broke may have left it
        # disabled) and so cached on b, then one change each way, so that a
        # node's first announcement after its start is not a sample; logged all the same.
        first = [self.change(a, b, key, d, limit) * 1000 for d in (False, True, False)][1:]
        samples = [self.change(a, b, key, i % 2 == 0, limit) * 1000 for i in range(self.samples)]
        if self.samples % 2:
            self.change(a, b, key, False, limit)
        out = {"median": statistics.median(samples), "p99": p99(samples), "min": min(samples),
               "max": max(samples)}
        log("  propagation %s -> %s, refresh_ms %s: median %.1f ms, p99 %.1f ms, min %.1f, max %.1f "
            "(the first two, not counted: %.1f, %.1f ms)" % (
                a.name, b.name, refresh_ms or "default", out["median"], out["p99"], out["min"],
                out["max"], first[0], first[1]))
        return out

    # -- one round ----------------------------------------------------------------

    def round(self):
        n = len(self.results) + 1
        r = {}
        self.results.append(r)
        log("round %d of %d" % (n, self.rounds))
        a, b, c = (self.nodes[x] for x in NODES)
        try:
            self.sqlite.start()
            a.start()
            self.warm(self.sqlite, self.objects["sqlite"])
            self.warm(a, self.objects["pg"])
            self.crypto(r, n)
            self.step(r, "manage_sqlite", self.manage, [self.sqlite], self.objects["sqlite"])
            self.sqlite.stop()
            self.step(r, "manage_pg1", self.manage, [a], self.objects["pg"])
            b.start()
            c.start()
            self.step(r, "manage_pg3", self.manage, [a, b, c], self.objects["pg"])
            self.step(r, "propagation", self.propagation, a, b, None)
        finally:
            self.stop_all()
        try:
            a.start(SLOW_REFRESH_MS)
            b.start(SLOW_REFRESH_MS)
            self.step(r, "propagation_slow", self.propagation, a, b, SLOW_REFRESH_MS)
        finally:
            self.stop_all()


# ---- the cluster test --------------------------------------------------------------

CLUSTER_COUNTS = {
    "acknowledged": r"changes acknowledged \(200\): (\d+)",
    "unknown": r"calls that may or may not have changed something: (\d+)",
    "blobs": r"; blobs: (\d+)",
    "lost": r"(\d+) acknowledged changes not visible on every node",
    "diffs": r"(\d+) differences between the nodes",
    "failed": r"decrypted on each of the \d+ nodes: (\d+) failures",
    "database": r"(\d+) disagreements with the nodes",
}


def cluster_test(tools, seconds):
    """test_cluster_pg.sh (under a PostgreSQL server of its own) with seconds
    of load; its counts from its diagnostic lines, and its TAP result."""
    env = dict(os.environ, P11KMS_CLUSTER_SECONDS="%g" % seconds)
    for name in ("P11KMS_TEST_PG_URL", "P11KMS_TEST_PG_DIR", "P11KMS_TEST_PG_SERVER"):
        env.pop(name, None)  # the bench's server is not the test's
    log("test_cluster_pg.sh with P11KMS_CLUSTER_SECONDS=%g" % seconds)
    t0 = time.monotonic()
    # Its own session: an interrupted bench stops the test's nginx, nodes and server with it.
    proc = subprocess.Popen([tools.cluster], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=3 * seconds + 600)
    except BaseException as e:  # noqa: B902 - the timeout or an interrupt: stop it, then report
        os.killpg(proc.pid, signal.SIGTERM)
        proc.communicate()
        if isinstance(e, subprocess.TimeoutExpired):
            raise B.Broken("test_cluster_pg.sh did not finish in %.0f s" % (3 * seconds + 600))
        raise
    text = out.decode("utf-8", "replace")
    result = {"status": proc.returncode, "seconds": time.monotonic() - t0, "load": seconds}
    for name, pattern in CLUSTER_COUNTS.items():
        m = re.search(pattern, text)
        result[name] = int(m.group(1)) if m else None
    plan = re.search(r"^1\.\.(\d+)$", text, re.M)
    result["tests"] = int(plan.group(1)) if plan else None
    result["ok"] = len(re.findall(r"^ok \d+", text, re.M))
    result["passed"] = (proc.returncode == 0 and result["tests"] is not None
                        and result["ok"] == result["tests"])
    for line in text.splitlines():
        if not result["passed"] or not line.startswith("# "):
            log("  " + line)  # the whole output when it failed, else its diagnostics
    log("  test_cluster_pg.sh: status %d, %d of %s tests ok, %.0f s" % (
        proc.returncode, result["ok"], result["tests"], result["seconds"]))
    return result


# ---- the table -----------------------------------------------------------------------


def ms1(v):
    return "%.1f ms" % v


def count(v):
    return "n/a" if v is None else B.thousands(v)


def crypto_rows(t):
    for op, key in (("GenerateDataKey", "gdk"), ("Decrypt", "dec")):
        t.figure("%s, 10 keys, PostgreSQL" % op, lambda r, k=key: r[k + "_pg"]["rps"], B.rate,
                 ref_fn=lambda r, k=key: r[k + "_sqlite"]["rps"], ref_fmt=lambda v: B.rate(v) + " on SQLite",
                 ratio_fn=lambda r, k=key: r[k + "_pg"]["rps"] / r[k + "_sqlite"]["rps"],
                 bar=">= %.2f x SQLite" % CRYPTO_BAR, check=lambda v, q: q >= CRYPTO_BAR)
        t.figure("%s, 10 keys, PostgreSQL, p99 latency" % op, lambda r, k=key: r[k + "_pg"]["p99"], B.ms,
                 ref_fn=lambda r, k=key: r[k + "_sqlite"]["p99"], ref_fmt=lambda v: B.ms(v) + " on SQLite",
                 ratio_fn=lambda r, k=key: r[k + "_pg"]["p99"] / r[k + "_sqlite"]["p99"])
        t.figure("  database transactions during that run", lambda r, k=key: r[k + "_pg"]["transactions"],
                 lambda v: "%.0f" % v,
                 ref_fn=lambda r, k=key: 1e4 * r[k + "_pg"]["transactions"] / r[k + "_pg"]["requests"],
                 ref_fmt=lambda v: "%.2f per 10,000 requests" % v)


def manage_rows(t):
    for op in MANAGE_OPS:
        t.figure("%s, 1 node, SQLite" % op, lambda r, o=op: r["manage_sqlite"][o]["rps"], B.rate,
                 ref_fn=lambda r, o=op: (r["manage_sqlite"][o]["p50"], r["manage_sqlite"][o]["p99"]),
                 ref_fmt=lambda v: "p50 %.2f, p99 %.2f ms" % v)
        t.figure("%s, 1 node, PostgreSQL" % op, lambda r, o=op: r["manage_pg1"][o]["rps"], B.rate,
                 ref_fn=lambda r, o=op: r["manage_sqlite"][o]["rps"],
                 ref_fmt=lambda v: B.rate(v) + " on SQLite",
                 ratio_fn=lambda r, o=op: r["manage_pg1"][o]["rps"] / r["manage_sqlite"][o]["rps"])
        t.figure("%s, 3 nodes, PostgreSQL" % op, lambda r, o=op: r["manage_pg3"][o]["rps"], B.rate,
                 ref_fn=lambda r, o=op: r["manage_pg1"][o]["rps"], ref_fmt=lambda v: B.rate(v) + " on 1 node",
                 ratio_fn=lambda r, o=op: r["manage_pg3"][o]["rps"] / r["manage_pg1"][o]["rps"])


def propagation_rows(t, samples):
    for key, what in (("propagation_slow", "refresh_ms %d (NOTIFY)" % SLOW_REFRESH_MS),
                      ("propagation", "default refresh_ms")):
        t.figure("change propagation A -> B, %s, median of %d" % (what, samples),
                 lambda r, k=key: r[k]["median"], ms1,
                 ref_fn=lambda r, k=key: (r[k]["min"], r[k]["max"]),
                 ref_fmt=lambda v: "min %.1f, max %.1f ms" % v,
                 bar="<= %.0f ms" % MEDIAN_BAR_MS, check=lambda v, q: v <= MEDIAN_BAR_MS)
        t.figure("change propagation A -> B, %s, p99" % what, lambda r, k=key: r[k]["p99"], ms1,
                 bar="<= %.0f ms" % P99_BAR_MS, check=lambda v, q: v <= P99_BAR_MS)


def cluster_rows(t, c):
    name = "cluster test (%g s of load)" % c["load"]
    t.add(name + ": changes acknowledged", count(c["acknowledged"]),
          "%s ended unknown" % count(c["unknown"]))
    t.add(name + ": blobs made", count(c["blobs"]))
    for key, what in (("lost", "acknowledged changes lost"), ("diffs", "differences between the nodes"),
                      ("failed", "blobs that fail on a node"),
                      ("database", "disagreements with the database")):
        t.add("%s: %s" % (name, what), count(c[key]), bar="0",
              met=c[key] == 0 if c[key] is not None else False)
    t.add(name + ": TAP", "%d of %s ok" % (c["ok"], c["tests"] if c["tests"] is not None else "?"),
          "exit status %d, %.0f s" % (c["status"], c["seconds"]), bar="all ok", met=c["passed"])


def make_table(results, samples, cluster):
    t = B.Table(results)
    crypto_rows(t)
    manage_rows(t)
    propagation_rows(t, samples)
    if cluster:
        cluster_rows(t, cluster)
    return t


def main():
    a, started, load_before = B.begin(args_and_harness)
    tools = Tools(a)
    cluster_seconds = B.env_number("P11KMS_CLUSTER_SECONDS", 60.0)
    ws = H.Workspace("p11kms-bench-pg-")
    b = None
    try:
        b = PgBench(a, ws, tools, os.environ["P11KMS_TEST_PG_URL"])
        log("%d rounds; wrk -t%d -c%d (a third of them on each of three nodes), %g s per run; "
            "%d propagation samples; cluster test %g s" % (b.rounds, b.wrk_threads, b.connections,
                                                          b.seconds, b.samples, cluster_seconds))
        b.setup()
        for _ in range(b.rounds):
            b.round()
        cluster = None
        try:
            cluster = cluster_test(tools, cluster_seconds)
        except B.Broken as e:
            b.problems.append(str(e))
        if cluster and not cluster["passed"]:
            b.problems.append("test_cluster_pg.sh failed (status %d)" % cluster["status"])

        return b.report(make_table(b.results, b.samples, cluster).text(), started, load_before)
    except B.Broken as e:
        log(str(e))
        return 1
    finally:
        if b:
            b.kill_all()
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
