#!/usr/bin/python3
"""The tamper-evident audit log (src/server/audit.c) against a fresh SoftHSM2
token, through tests/unit/audit_writer (opens the log, writes records, reopens,
closes) and `p11kms-audit verify`: an untouched log verifies, and each kind of
tampering is named at its line; the log fails closed when it cannot be written
and recovers when it can; rotation, restarts, timed checkpoints and the token
objects. TAP output."""

import hashlib
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultmod  # noqa: E402
import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.normpath(os.path.join(HERE, "..", ".."))
AUDIT = os.environ.get("P11KMS_AUDIT") or os.path.join(BUILD, "p11kms-audit")
WRITER = os.environ.get("P11KMS_AUDIT_WRITER") or os.path.join(BUILD, "tests", "unit",
                                                               "audit_writer")
SECRET_VALUES = ("secret-tenant-acme", "audit-test")  # the writer's context values
HEX64 = re.compile(r"^[0-9a-f]{64}$")
REQUEST_FIELDS = {"context_digest", "context_keys", "decision", "key_arn", "key_version",
                  "latency_us", "log", "operation", "outcome", "prev", "principal", "request_id",
                  "seq", "source", "time", "type", "v"}


class Ctx:
    ws = None
    token = None
    config = None
    base = None      # the lines (with '\n') of a log written once in set-up
    base_id = None   # its log id


C = Ctx()


class Writer:
    """tests/unit/audit_writer on C.token: one command, one answer."""

    def __init__(self, path, lines=1000, seconds=3600, config=None, token=None, env=None):
        token = token or C.token
        env = h.server_env(dict(env or {}, SOFTHSM2_CONF=token.conf))
        self.proc = subprocess.Popen([WRITER, config or C.config, path, str(lines), str(seconds)],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        first = self.proc.stdout.readline().strip()
        if not first.startswith("open "):
            self.proc.kill()
            raise AssertionError("audit_writer did not open the log: %r %r"
                                 % (first, self.proc.stderr.read()))
        self.log_id = first[5:]

    def cmd(self, text):
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def ok(self, text):
        eq(self.cmd(text), "ok", text)

    def fails_closed(self, text):
        answer = self.cmd(text)
        check(answer.startswith("error KMSInternalException "),
              "%s fails with KMSInternalException: %r" % (text, answer))
        return answer

    def close(self):
        out, err = self.proc.communicate("close\n", timeout=30)
        eq((self.proc.returncode, out.strip()), (0, "closed"), "audit_writer closed (stderr %r)"
           % err)
        return err


def verify(*paths, config=True, env_token=None, args=()):
    args = [AUDIT, "verify"] + (["--config", config if isinstance(config, str) else C.config]
                                if config else []) + list(args) + list(paths)
    env = h.server_env({"SOFTHSM2_CONF": (env_token or C.token).conf})
    r = subprocess.run(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=60)
    return r.returncode, r.stdout.strip(), r.stderr.strip()


def read_lines(path):
    with open(path) as f:
        return f.readlines()


def write_lines(name, lines):
    path = C.ws.sub(name)
    with open(path, "w") as f:
        f.writelines(lines)
    return path


def expect_problem(name, lines, report, config=True):
    """Writes lines to a file, verifies it and checks the report, which must
    begin with "FILE: " + report."""
    path = write_lines(name, lines)
    status, out, err = verify(path, config=config)
    h.diag(out)
    eq(status, 1, "verify's exit status (stdout %r, stderr %r)" % (out, err))
    check(out.startswith(path + ": " + report), "report %r starts with %r" % (out, report))


def expect_intact(*paths, config=True):
    status, out, err = verify(*paths, config=config)
    eq(status, 0, "verify's exit status (stdout %r, stderr %r)" % (out, err))
    check(out.startswith("intact: "), "intact: %r" % out)
    return out


def node_of(path):
    """The default audit_node of a log file: host name and path."""
    return "%s:%s" % (socket.gethostname(), path)


def database():
    return C.config + ".db"


def kinds(lines):
    """(type, kind or reason) of each line."""
    out = []
    for line in lines:
        d = json.loads(line)
        out.append((d["type"], d.get("kind") or d.get("reason")))
    return out


def setup():
    C.ws = h.Workspace()
    C.token = h.make_token(C.ws.sub("token"), "p11kms-audit-it")
    C.config = h.write_config(C.ws.sub("p11kmsd.conf"), C.token, C.ws.sub("credentials"))
    # 34 lines: the opening checkpoint, 12 records, a checkpoint (line 14), 12
    # records, a checkpoint (line 27), 6 records, the closing checkpoint.
    path = C.ws.sub("base.log")
    w = Writer(path)
    C.base_id = w.log_id
    w.ok("write 12")
    w.ok("checkpoint")
    w.ok("write 12")
    w.ok("checkpoint")
    w.ok("write 6")
    w.close()
    C.base = read_lines(path)


def teardown():
    h.finish(T, C.ws, None)


# ---- the untouched log and its format -------------------------------------------


@test
def test_untouched_log_verifies():
    eq(len(C.base), 34, "lines in the base log")
    out = expect_intact(C.ws.sub("base.log"))
    check(out.startswith("intact: 34 lines, 1 logs, 4 checkpoints; 4 checkpoint MACs verified"),
          "summary with --config: %r" % out)
    out = expect_intact(C.ws.sub("base.log"), config=False)
    check("checkpoint MACs, missing runs and truncation not checked" in out,
          "summary without --config: %r" % out)


@test
def test_line_format():
    k = kinds(C.base)
    eq(k[0], ("checkpoint", "open"), "line 1")
    eq((k[13], k[26], k[33]), (("checkpoint", "periodic"),) * 2 + (("checkpoint", "close"),),
       "lines 14, 27, 34")
    prev = "0" * 64
    for n, line in enumerate(C.base, 1):
        d = json.loads(line)
        eq((d["v"], d["seq"], d["log"]), (1, n, C.base_id), "line %d: v, seq, log" % n)
        eq(d["prev"], prev, "line %d: prev is the SHA-256 of line %d" % (n, n - 1))
        prev = hashlib.sha256(line.rstrip("\n").encode()).hexdigest()
        check(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", d["time"]),
              "line %d: time %r" % (n, d["time"]))
        if d["type"] == "request":
            body = line.rstrip("\n")
            eq(json.dumps(d, sort_keys=True, separators=(",", ":")), body,
               "line %d: compact JSON with sorted keys" % n)
        else:
            check(line.rstrip("\n").endswith('"mac":"%s"}' % d["mac"]),
                  "line %d: mac is the last member" % n)
            check(HEX64.match(d["mac"]), "line %d: mac is hex" % n)
    r = json.loads(C.base[1])
    eq(set(r), REQUEST_FIELDS, "a request line's members")
    eq((r["principal"], r["source"], r["operation"], r["outcome"], r["decision"],
        r["key_version"]), ("tester", "127.0.0.1:40000", "Encrypt", "ok", "allow #0", 3),
       "record fields")
    eq(r["context_keys"], ["purpose", "tenant"], "context key names, in canonical order")
    check(HEX64.match(r["context_digest"]), "context digest is 64 hex")
    # Keyed: not a plain SHA-256 of the canonical context, and the same within one log.
    canonical = b"".join([(2).to_bytes(4, "big"),
                          (7).to_bytes(4, "big"), b"purpose", (10).to_bytes(4, "big"),
                          b"audit-test", (6).to_bytes(4, "big"), b"tenant",
                          (18).to_bytes(4, "big"), b"secret-tenant-acme"])
    check(r["context_digest"] != hashlib.sha256(canonical).hexdigest(),
          "the digest is not a plain SHA-256 of the context")
    digests = {json.loads(x).get("context_digest") for x in C.base} - {None}
    eq(len(digests), 1, "one digest for one context within a log")
    # a record without a context, and a denied one
    d = json.loads(C.base[3])
    check("context_keys" not in d and "context_digest" not in d, "no context members: %r" % d)
    d = json.loads(C.base[4])
    eq((d["outcome"], d["decision"]), ("AccessDeniedException", "deny (implicit)"), "denied")


@test
def test_no_secrets_in_the_log():
    text = "".join(C.base)
    for value in SECRET_VALUES + (C.token.user_pin(),):
        check(value not in text, "%r is not in the log" % value)


# ---- tampering --------------------------------------------------------------------


@test
def test_edit_a_field():
    lines = list(C.base)
    lines[6] = lines[6].replace('"principal":"tester"', '"principal":"admin"')
    check(lines[6] != C.base[6], "line 7 edited")
    expect_problem("edit.log", lines, "line 7: changed (its hash does not match line 8's prev)")
    expect_problem("edit.log", lines, "line 7: changed", config=False)
    # the last record before a checkpoint: the checkpoint's MAC vouches for its prev
    lines = list(C.base)
    lines[12] = lines[12].replace('"principal":"tester"', '"principal":"admin"')
    check(lines[12] != C.base[12], "line 13 edited")
    expect_problem("edit13.log", lines, "line 13: changed (its hash does not match line 14's prev)")
    # the prev member itself
    lines = list(C.base)
    d = json.loads(lines[9])
    lines[9] = lines[9].replace(d["prev"], "f" * 64)
    expect_problem("edit-prev.log", lines, "line 10: changed (its prev does not match line 9)")
    # the seq member
    lines = list(C.base)
    lines[9] = lines[9].replace('"seq":10,', '"seq":12,')
    expect_problem("edit-seq.log", lines, "line 10: changed (seq 12 where 10 was expected")


@test
def test_edit_a_checkpoint():
    lines = list(C.base)
    lines[13] = lines[13].replace('"kind":"periodic"', '"kind":"close"')
    expect_problem("edit-cp.log", lines, "line 14: checkpoint MAC does not verify")
    expect_problem("edit-cp.log", lines, "line 14: changed", config=False)
    # the last line: only its MAC can tell
    lines = list(C.base)
    lines[33] = lines[33].replace('"kind":"close"', '"kind":"periodic"')
    expect_problem("edit-last.log", lines, "line 34: checkpoint MAC does not verify")
    # a checkpoint naming a key the token does not hold
    lines = list(C.base)
    key = json.loads(lines[13])["key"]
    lines[13] = lines[13].replace(key, "0" * 32)
    expect_problem("edit-key.log", lines, "line 14: checkpoint made with key %s, which the token "
                   "does not hold" % ("0" * 32))


@test
def test_delete_a_line():
    lines = list(C.base)
    del lines[8]
    expect_problem("delete.log", lines,
                   "line 9: a line is missing before it (seq 9 expected, 10 found)")
    expect_problem("delete.log", lines, "line 9: a line is missing before it", config=False)
    lines = list(C.base)
    del lines[8:11]
    expect_problem("delete3.log", lines,
                   "line 9: lines are missing before it (seq 9 expected, 12 found)")
    expect_problem("delete-first.log", C.base[1:], "line 1: lines are missing before it")
    expect_problem("delete-last.log", C.base[:-1],
                   "line 34: missing (the file ends at line 33 with seq 33 of log %s, but the "
                   "database's head of node %s records its checkpoint seq 34)"
                   % (C.base_id, node_of(C.ws.sub("base.log"))))


@test
def test_swap_two_lines():
    lines = list(C.base)
    lines[19], lines[20] = lines[20], lines[19]
    expect_problem("swap.log", lines, "line 20: out of order (seq 21 where 20 was expected; seq 20 "
                   "is at line 21)")
    expect_problem("swap.log", lines, "line 20: out of order", config=False)
    # a line moved further down
    lines = list(C.base)
    moved = lines.pop(4)
    lines.insert(9, moved)
    expect_problem("move.log", lines, "line 5: out of order (seq 6 where 5 was expected; seq 5 is "
                   "at line 10)")


@test
def test_truncate_after_a_checkpoint():
    lines = C.base[:27]  # ends with the checkpoint on line 27
    eq(kinds(lines)[-1], ("checkpoint", "periodic"), "the last line left")
    expect_problem("truncated.log", lines,
                   "line 28: missing (the file ends at line 27 with seq 27 of log %s, but the "
                   "database's head of node %s records its checkpoint seq 34)"
                   % (C.base_id, node_of(C.ws.sub("base.log"))))
    # without the token the chain is whole: the tool says what it could not check
    path = write_lines("truncated.log", lines)
    status, out, _ = verify(path, config=False)
    eq(status, 0, "without --config")
    check("truncation not checked" in out, "says truncation was not checked: %r" % out)


@test
def test_insert_a_copied_line():
    lines = list(C.base)
    lines.insert(10, C.base[4])
    expect_problem("insert.log", lines, "line 11: inserted (seq 5 repeats line 5)")
    lines = list(C.base)
    lines.insert(5, C.base[4])
    expect_problem("insert-adjacent.log", lines, "line 6: inserted (a copy of line 5)")
    # a made-up line that chains correctly to the line before it: the next line skips it
    lines = list(C.base)
    fake = json.loads(C.base[5])
    fake["principal"] = "mallory"
    fake["prev"] = hashlib.sha256(C.base[4].rstrip("\n").encode()).hexdigest()
    lines.insert(5, json.dumps(fake, sort_keys=True, separators=(",", ":")) + "\n")
    expect_problem("insert-fake.log", lines, "line 6: inserted")


@test
def test_not_an_audit_line():
    lines = list(C.base)
    lines[3] = "this is not JSON\n"
    expect_problem("garbage.log", lines, "line 4: not JSON")
    lines = list(C.base)
    lines[3] = '{"hello":"world"}\n'
    expect_problem("alien.log", lines, "line 4: not an audit line")


@test
def test_wrong_token():
    other = h.make_token(C.ws.sub("token2"), "p11kms-audit-other")
    creds = h.write_credentials(C.ws.sub("other-credentials"), [h.new_principal("other")])
    config = h.write_config(C.ws.sub("other.conf"), other, creds)
    h.init_database(config, other)
    status, out, err = verify(C.ws.sub("base.log"), config=config, env_token=other)
    eq(status, 1, "exit status (%r %r)" % (out, err))
    check(": line 1: checkpoint made with key " in out and "does not hold" in out,
          "the key is not in that token: %r" % out)


# ---- restarts, rotation, checkpoints --------------------------------------------------


@test
def test_restart_appends_to_the_chain():
    path = C.ws.sub("restart.log")
    shutil.copy(C.ws.sub("base.log"), path)
    w = Writer(path)
    w.ok("write 3")
    w.close()
    lines = read_lines(path)
    eq(len(lines), 34 + 5, "lines after the second run")
    second = json.loads(lines[34])
    eq((second["type"], second["kind"], second["seq"]), ("checkpoint", "open", 1), "line 35")
    eq(second["prev"], hashlib.sha256(lines[33].rstrip("\n").encode()).hexdigest(),
       "the second log chains to the first log's last line")
    out = expect_intact(path)
    check(out.startswith("intact: 39 lines, 2 logs"), "two logs: %r" % out)
    # the end of the first run removed: the token knows where it ended
    cut = lines[:33] + lines[34:]
    expect_problem("restart-cut.log", cut, "line 34: lines are missing before it (log %s ends at "
                   "line 33 with seq 33, but the database's head of node %s records its "
                   "checkpoint seq 34)" % (C.base_id, node_of(C.ws.sub("base.log"))))
    # the whole second run removed but for its opening line
    expect_problem("restart-tail.log", lines[:35], "line 36: missing")


@test
def test_a_line_torn_by_a_crash_is_cut_at_the_next_start():
    """A SIGKILL can stop a write(2) at a page boundary: the file then ends inside a line that
    was never answered for. The next start cuts those bytes off (whole lines stay) and chains
    to the last whole line, so the log still verifies."""
    path = C.ws.sub("torn.log")
    shutil.copy(C.ws.sub("base.log"), path)
    whole = read_lines(path)
    with open(path, "a") as f:
        f.write(whole[5][:40])  # a line's first bytes, no newline
    w = Writer(path)
    w.ok("write 3")
    err = w.close()
    lines = read_lines(path)
    eq(lines[:34], whole, "the whole lines of the first run, unchanged")
    eq(len(lines), 34 + 5, "lines after the second run: the torn bytes are gone")
    eq(json.loads(lines[34])["prev"], hashlib.sha256(whole[33].rstrip("\n").encode()).hexdigest(),
       "the second run chains to the first run's last whole line")
    check("ended with 40 bytes of a line cut short by a crash; they are removed" in err,
          "the start says so: %r" % err)
    out = expect_intact(path)
    check(out.startswith("intact: 39 lines, 2 logs"), "two logs: %r" % out)


@test
def test_rotation_and_sighup():
    d = C.ws.sub("rot")
    os.mkdir(d)
    path = os.path.join(d, "audit.log")
    w = Writer(path)
    w.ok("write 5")
    w.ok("reopen")  # nothing rotated: nothing happens
    eq(len(read_lines(path)), 6, "a reopen without rotation writes nothing")
    os.rename(path, path + ".1")
    w.ok("write 2")  # still to the moved file, as until SIGHUP
    w.ok("reopen")
    w.ok("write 4")
    w.close()
    old, new = read_lines(path + ".1"), read_lines(path)
    eq(kinds(old)[-1], ("checkpoint", "rotate"), "the old file ends with a rotate checkpoint")
    eq(kinds(new)[0], ("reopen", "sighup"), "the new file begins with a reopen line")
    eq(json.loads(new[0])["prev"], hashlib.sha256(old[-1].rstrip("\n").encode()).hexdigest(),
       "the new file chains to the old one")
    expect_intact(path + ".1", path)
    expect_intact(path)
    out = expect_intact(path + ".1")
    check("goes on in a later file" in out, "the old file alone says so: %r" % out)
    # the new file with its head cut
    expect_problem("rot-head.log", new[2:], "line 1: lines are missing before it")
    # the files out of order
    status, out, _ = verify(path, path + ".1")
    eq(status, 1, "files given newest first: %r" % out)


@test
def test_timed_checkpoint():
    path = C.ws.sub("timed.log")
    w = Writer(path, lines=1000, seconds=1)
    w.ok("write 1")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(read_lines(path)) < 3:
        time.sleep(0.1)
    eq(kinds(read_lines(path)), [("checkpoint", "open"), ("request", None),
                                 ("checkpoint", "periodic")], "a checkpoint a second after a line")
    time.sleep(1.5)
    eq(len(read_lines(path)), 3, "no checkpoints while idle")
    # the token already records it: cutting it off is seen while the writer still runs
    expect_problem("timed-cut.log", read_lines(path)[:2], "line 3: missing")
    w.close()
    expect_intact(path)


@test
def test_checkpoint_every_n_lines():
    path = C.ws.sub("counted.log")
    w = Writer(path, lines=5, seconds=3600)
    for _ in range(12):
        w.ok("write 1")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and kinds(read_lines(path)).count(("checkpoint",
                                                                         "periodic")) < 2:
        time.sleep(0.05)
        w.ok("write 1")
    w.close()
    k = kinds(read_lines(path))
    check(k.count(("checkpoint", "periodic")) >= 2, "periodic checkpoints: %r" % k)
    expect_intact(path)


@test
def test_concurrent_writers():
    path = C.ws.sub("threads.log")
    w = Writer(path, lines=50, seconds=1)
    w.ok("threads 8 250")
    os.rename(path, path + ".1")  # rotated while lines keep coming
    w.cmd("reopen")
    w.ok("threads 8 250")
    w.close()
    old, new = read_lines(path + ".1"), read_lines(path)
    k = kinds(old) + kinds(new)
    eq(k.count(("request", None)), 4000, "every record written once")
    check(k.count(("checkpoint", "periodic")) >= 2, "periodic checkpoints among them")
    eq([json.loads(x)["seq"] for x in old + new], list(range(1, len(k) + 1)),
       "seq follows the order of the lines")
    expect_intact(path + ".1", path)


@test
def test_hung_token_does_not_stop_lines():
    faults = faultmod.FaultControl(C.ws.sub("faults"))
    config = h.write_config(C.ws.sub("faulted.conf"), C.token, C.ws.sub("credentials"),
                            module=faultmod.faultmod_module())
    path = C.ws.sub("hung.log")
    w = Writer(path, lines=5, seconds=3600, config=config, env=faults.env())
    w.ok("write 2")
    faults.stall("C_Sign")  # until cleared
    w.ok("write 3")  # the 5th line since the opening checkpoint wakes the checkpoint thread
    faults.wait_stalling("C_Sign", n=1, timeout=10)
    t0 = time.monotonic()
    w.ok("threads 4 25")
    took = time.monotonic() - t0
    check(took < 2, "lines are written while the token hangs in a checkpoint (%.2f s)" % took)
    eq(kinds(read_lines(path)).count(("checkpoint", "periodic")), 0, "no checkpoint yet")
    faults.clear()
    w.close()
    k = kinds(read_lines(path))
    check(("checkpoint", "periodic") in k, "the checkpoint was written once the token answered")
    expect_intact(path)


# ---- one node's runs and its head in the database -----------------------------------


def node_config(node):
    """A configuration naming one node, so that runs in several files are that
    node's; and a database of its own (node.conf.db)."""
    path = C.ws.sub(node + ".conf")
    if not os.path.exists(path):
        h.write_config(path, C.token, C.ws.sub("credentials"), audit_node=node)
    return path


def node_db(node):
    return node_config(node) + ".db"


def nverify(node, *paths, args=()):
    return verify(*paths, config=node_config(node), args=args)


def three_runs():
    """Three runs of node runs-node, each in its own file (made once)."""
    if getattr(C, "runs", None):
        return C.runs
    config = node_config("runs-node")
    files, ids = [], []
    for i in range(3):
        path = C.ws.sub("run%d.log" % (i + 1))
        w = Writer(path, config=config)
        w.ok("write 4")
        if i == 2:
            w.ok("checkpoint")
            w.ok("write 3")
        w.close()
        files.append(path)
        ids.append(w.log_id)
    C.runs = files, ids
    return C.runs


def head_row(node):
    db = sqlite3.connect("file:%s?mode=ro" % node_db(node), uri=True)
    try:
        return db.execute("SELECT log, seq, hash, mac FROM audit_heads WHERE node = ?",
                          (node,)).fetchone()
    finally:
        db.close()


@test
def test_runs_name_the_runs_before():
    files, ids = three_runs()
    first = [json.loads(read_lines(p)[0]) for p in files]
    eq([d.get("after_log") for d in first], [None, ids[0], ids[1]],
       "each run's opening checkpoint names the run before it on the node")
    eq([d.get("after_seq") for d in first[1:]], [6, 6], "... at its last line (its close)")
    eq(first[1]["after_hash"], hashlib.sha256(read_lines(files[0])[-1].rstrip("\n").encode())
       .hexdigest(), "... by its hash")
    eq([d["node"] for d in first], ["runs-node"] * 3, "the node of each run")
    eq([d["prev"] for d in first], ["0" * 64] * 3, "each begins a new file")
    eq(head_row("runs-node")[:2], (ids[2], 10), "the node's head: the last run's close")
    out = expect_intact(*files, config=node_config("runs-node"))
    check(out.startswith("intact: 22 lines, 3 logs"), "the untouched runs: %r" % out)


@test
def test_a_missing_run_is_named():
    files, ids = three_runs()
    # the middle run's file deleted
    status, out, err = nverify("runs-node", files[0], files[2])
    eq(status, 1, "exit status (%r %r)" % (out, err))
    eq(out, "%s: line 1: lines are missing before it (the run before it on node runs-node, log %s "
       "up to seq 6, is not among the files given)" % (files[2], ids[1]), "the report")
    # the first run's file deleted: named too, unless the files begin with run 2 on purpose
    status, out, _ = nverify("runs-node", files[1], files[2])
    eq((status, out), (1, "%s: line 1: lines are missing before it (the run before it on node "
                          "runs-node, log %s up to seq 6, is not among the files given)"
                       % (files[1], ids[0])), "the first run left out")
    status, out, _ = nverify("runs-node", files[1], files[2], args=("--since", ids[1]))
    eq(status, 0, "--since the second run: %r" % out)
    # the newest run's file deleted: the node's head names it
    status, out, _ = nverify("runs-node", files[0], files[1])
    eq(status, 1, "exit status: %r" % out)
    eq(out, "%s: line 7: missing (the database's head of node runs-node names log %s at seq 10, "
       "which is not among the files given: that run's file is missing)" % (files[1], ids[2]),
       "the report")


@test
def test_a_cut_tail_is_found():
    files, ids = three_runs()
    last = read_lines(files[2])
    eq(kinds(last)[5], ("checkpoint", "periodic"), "run 3's line 6")
    for keep in (8, 6):  # two lines cut; cut exactly after a checkpoint
        cut = write_lines("run3-cut%d.log" % keep, last[:keep])
        status, out, _ = nverify("runs-node", files[0], files[1], cut)
        eq(status, 1, "exit status: %r" % out)
        eq(out, "%s: line %d: missing (the file ends at line %d with seq %d of log %s, but the "
           "database's head of node runs-node records its checkpoint seq 10)"
           % (cut, keep + 1, keep, keep, ids[2]), "the report")


@test
def test_an_altered_head_is_found():
    files, ids = three_runs()
    row = head_row("runs-node")
    for change in ("seq = seq - 2", "hash = '%s'" % ("0" * 64), "mac = '%s'" % ("1" * 64)):
        db = sqlite3.connect(node_db("runs-node"))
        try:
            db.execute("UPDATE audit_heads SET %s WHERE node = 'runs-node'" % change)
            db.commit()
        finally:
            db.close()
        status, out, _ = nverify("runs-node", *files)
        eq(status, 1, "%s: exit status (%r)" % (change, out))
        check(out.startswith("database: the audit head of node runs-node does not verify: it was "
                             "altered"), "%s: %r" % (change, out))
        db = sqlite3.connect(node_db("runs-node"))
        try:
            db.execute("UPDATE audit_heads SET log = ?, seq = ?, hash = ?, mac = ? "
                       "WHERE node = 'runs-node'", row)
            db.commit()
        finally:
            db.close()
    expect_intact(*files, config=node_config("runs-node"))


@test
def test_a_crashed_run_is_linked_by_its_head():
    config = node_config("crash-node")
    a = C.ws.sub("crashed.log")
    w = Writer(a, config=config)
    w.ok("write 3")
    w.ok("checkpoint")
    w.ok("write 2")
    eq(w.cmd("crash"), "", "the writer died")
    eq(w.proc.wait(timeout=10), 3, "its exit status")
    eq(head_row("crash-node")[:2], (w.log_id, 5), "the head: the run's last checkpoint")
    b = C.ws.sub("after-crash.log")
    w2 = Writer(b, config=config)
    w2.ok("write 1")
    w2.close()
    d = json.loads(read_lines(b)[0])
    eq((d["after_log"], d["after_seq"]), (w.log_id, 5),
       "a run in another file names the run before by its head")
    expect_intact(a, b, config=config)
    # the crashed run's lines after its checkpoint removed: its head cannot tell, the chain does
    status, out, _ = verify(write_lines("crashed-cut.log", read_lines(a)[:4]), b, config=config)
    eq(status, 1, "the checkpoint itself cut: %r" % out)
    check("but the run after it says it reached seq 5" in out, "the report: %r" % out)


def insert_change(node, request_id):
    """As the change's transaction does: its request id in change_requests."""
    db = sqlite3.connect(node_db(node))
    try:
        db.execute("INSERT INTO change_requests (request_id, at) VALUES (?, 0)", (request_id,))
        db.commit()
    finally:
        db.close()


@test
def test_intents_are_settled_at_the_next_start():
    config = node_config("intent-node")
    path = C.ws.sub("intents.log")
    w = Writer(path, config=config)
    w.ok("intent r-committed")
    w.ok("intent r-lost")
    w.ok("intent r-done")
    w.ok("outcome r-done 1")
    w.ok("checkpoint")
    w.ok("intent r-after")
    for rid in ("r-committed", "r-done", "r-after"):
        insert_change("intent-node", rid)
    eq(w.cmd("crash"), "", "the writer died between commits and outcomes")
    w.proc.wait(timeout=10)
    lines = read_lines(path)
    cp = json.loads(lines[5])
    eq((cp["type"], cp["open"]), ("checkpoint", ["r-committed", "r-lost"]),
       "the checkpoint lists the intents still open")
    # p11kms-audit verify settles them from the database before any restart
    status, out, _ = nverify("intent-node", path)
    eq(status, 0, "verify: %r" % out)
    check("3 without an outcome line" in out, "the summary: %r" % out)
    for rid, said in (("r-committed", "committed"), ("r-lost", "not committed"),
                      ("r-after", "committed")):
        check("request %s: an intent without its outcome line; the database says: %s\n" % (rid, said)
              in out + "\n", "%s: %r" % (rid, out))
    # the next start writes recovery lines
    w2 = Writer(path, config=config)
    w2.close()
    new = [json.loads(x) for x in read_lines(path)[len(lines):]]
    eq(new[0]["open"], ["r-committed", "r-lost", "r-after"],
       "the next run's opening checkpoint lists them")
    eq([(d["type"], d["request_id"], d["result"]) for d in new[1:4]],
       [("recovery", "r-committed", "committed"), ("recovery", "r-lost", "not committed"),
        ("recovery", "r-after", "committed")], "then one recovery line each")
    eq("open" in new[-1], False, "none open at the close")
    h.check_audit_changes([path], node_db("intent-node"))
    out = expect_intact(path, config=config)
    check("4 changes: 3 committed, 1 not committed, 0 without" in out, "the summary: %r" % out)


@test
def test_outcome_written_once_the_log_can_be():
    config = node_config("pending-node")
    d = C.ws.sub("pending")
    os.mkdir(d, 0o700)
    path = os.path.join(d, "audit.log")
    w = Writer(path, config=config)
    w.ok("intent r-pending")
    insert_change("pending-node", "r-pending")
    os.rename(path, path + ".1")
    os.symlink("/dev/full", path)
    w.fails_closed("reopen")
    w.ok("outcome r-pending 1")  # not written: the log cannot be
    answer = w.cmd("intent r-refused")
    check(answer.startswith("error DependencyTimeoutException "), "an intent now: %r" % answer)
    os.unlink(path)
    w.ok("write 1")  # the outcome goes first
    w.close()
    k = [(x["type"], x.get("request_id")) for x in map(json.loads, read_lines(path))]
    eq(k[:3], [("reopen", None), ("outcome", "r-pending"), ("request", k[2][1])],
       "the outcome is written before the next line")
    h.check_audit_changes([path + ".1", path], node_db("pending-node"))
    expect_intact(path + ".1", path, config=config)


# ---- failing closed -----------------------------------------------------------------


@test
def test_unwritable_directory_fails_closed():
    d = C.ws.sub("closed")
    os.mkdir(d, 0o700)
    path = os.path.join(d, "audit.log")
    w = Writer(path)
    w.ok("write 3")
    files = []
    # Rotated, and the new file cannot be made: here a directory in its place,
    # which stops root too.
    os.rename(path, path + ".1")
    files.append(path + ".1")
    os.mkdir(path)
    w.fails_closed("reopen")
    w.fails_closed("write 1")
    w.fails_closed("write 1")
    os.rmdir(path)
    w.ok("write 2")
    if os.geteuid() != 0:
        # and the directory itself read-only (root would write anyway)
        os.rename(path, path + ".2")
        files.append(path + ".2")
        os.chmod(d, 0o500)
        try:
            w.fails_closed("reopen")
            w.fails_closed("write 1")
        finally:
            os.chmod(d, 0o700)
        w.ok("write 1")
    else:
        h.diag("running as root: the read-only directory case is not tried")
    # the log removed while the directory cannot take a new one
    os.rename(path, path + ".3")
    files.append(path + ".3")
    os.unlink(path + ".3")  # its lines are gone: keep a copy for the chain check
    os.rename(d, d + "-away")
    open(d, "w").close()  # a file where the directory was: nothing can be opened below it
    # The writer learns of the removal from the kernel (inotify, read by its
    # watcher thread), not by looking before every line: give it the moment.
    time.sleep(0.2)
    try:
        w.fails_closed("write 1")
    finally:
        os.unlink(d)
        os.rename(d + "-away", d)
    w.ok("write 1")
    err = w.close()
    check("requests fail until it can be written" in err, "the failure is logged: %r" % err)
    first = read_lines(files[0])
    eq(kinds(first)[-1], ("checkpoint", "rotate"), "the first file was sealed")
    expect_intact(*files[:-1])
    new = read_lines(path)
    eq(kinds(new)[0], ("reopen", "recover"), "the file made after the failure begins so")
    expect_intact(path)


@test
def test_write_error_fails_closed():
    d = C.ws.sub("full")
    os.mkdir(d, 0o700)
    path = os.path.join(d, "audit.log")
    w = Writer(path)
    w.ok("write 2")
    # Rotated onto a device that takes no bytes (ENOSPC): opened, but every write fails.
    os.rename(path, path + ".1")
    os.symlink("/dev/full", path)
    w.fails_closed("reopen")
    w.fails_closed("write 1")
    w.fails_closed("write 3")
    os.unlink(path)
    w.ok("write 2")
    w.close()
    new = read_lines(path)
    eq(kinds(new), [("reopen", "recover"), ("request", None), ("request", None),
                    ("checkpoint", "close")], "the new file")
    eq(json.loads(new[0])["seq"], json.loads(read_lines(path + ".1")[-1])["seq"] + 1,
       "the chain did not advance on failed writes")
    expect_intact(path + ".1", path)


@test
def test_group_commit():
    """kms_audit_wait: lines written before their waits share one flush; a rotated file is
    flushed as it is let go, so the next flush covers only the new file's lines."""
    path = C.ws.sub("group.log")
    w = Writer(path)
    eq(w.cmd("durable 200"), "ok 1 200", "200 lines, then their waits: one flush")
    eq(w.cmd("durable 1"), "ok 1 1", "one line: one flush")
    w.ok("write 5")
    os.rename(path, path + ".1")
    w.ok("reopen")
    eq(w.cmd("durable 3"), "ok 1 4",
       "after the rotation: one flush for the reopen line and 3 lines, not the 5 before")
    w.close()
    expect_intact(path + ".1", path)


@test
def test_cannot_open_at_start():
    d = C.ws.sub("nodir")
    path = os.path.join(d, "missing", "audit.log")
    env = h.server_env({"SOFTHSM2_CONF": C.token.conf})
    r = subprocess.run([WRITER, C.config, path], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    eq(r.returncode, 1, "the log does not open (stdout %r)" % r.stdout)
    check(r.stdout.startswith("error KMSInternalException cannot open the audit log " + path),
          "the error names the file: %r" % r.stdout)


# ---- the token's objects and the tool ------------------------------------------------


@test
def test_token_objects():
    import PyKCS11

    lib = PyKCS11.PyKCS11Lib()
    os.environ["SOFTHSM2_CONF"] = C.token.conf
    lib.load(h.SOFTHSM_MODULE)
    slot = [s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == C.token.label][0]
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
    session.login(C.token.user_pin())
    try:
        keys = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)])
        eq(len(keys), 1, "secret keys: the audit key only, made once for every run")
        attrs = [PyKCS11.CKA_LABEL, PyKCS11.CKA_KEY_TYPE, PyKCS11.CKA_VALUE_LEN,
                 PyKCS11.CKA_TOKEN, PyKCS11.CKA_PRIVATE, PyKCS11.CKA_SENSITIVE,
                 PyKCS11.CKA_EXTRACTABLE, PyKCS11.CKA_ALWAYS_SENSITIVE,
                 PyKCS11.CKA_NEVER_EXTRACTABLE, PyKCS11.CKA_SIGN, PyKCS11.CKA_VERIFY,
                 PyKCS11.CKA_ENCRYPT, PyKCS11.CKA_DECRYPT, PyKCS11.CKA_WRAP, PyKCS11.CKA_UNWRAP,
                 PyKCS11.CKA_DERIVE]
        got = session.getAttributeValue(keys[0], attrs)
        eq(got[:3], ["p11kms-audit-key", PyKCS11.CKK_GENERIC_SECRET, 32],
           "the audit key's label, type and length")
        eq([bool(x) for x in got[3:]],
           [True, True, True, False, True, True, True, True, False, False, False, False, False],
           "the audit key's flags: token, private, sensitive, not extractable, always sensitive, "
           "never extractable, sign and verify only")
        eq(session.getAttributeValue(keys[0], [PyKCS11.CKA_VALUE])[0], None, "CKA_VALUE")
        key_id = bytes(session.getAttributeValue(keys[0], [PyKCS11.CKA_ID],
                                                 allAsBinary=True)[0]).hex()
        eq(json.loads(C.base[0])["key"], key_id, "checkpoints name the key by CKA_ID")

        # The log's head is in the database now: the token keeps no record of it.
        eq(session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_DATA)]), [], "data objects")
        db = sqlite3.connect("file:%s?mode=ro" % database(), uri=True)
        try:
            row = db.execute("SELECT log, seq, hash, key, length(mac) FROM audit_heads "
                             "WHERE node = ?", (node_of(C.ws.sub("base.log")),)).fetchone()
        finally:
            db.close()
        eq(row, (C.base_id, 34, hashlib.sha256(C.base[33].rstrip("\n").encode()).hexdigest(),
                 key_id, 64), "the base log's head: its closing checkpoint, MAC'd by the key")
    finally:
        session.logout()
        session.closeSession()


@test
def test_tool_usage():
    env = h.server_env({"SOFTHSM2_CONF": C.token.conf})

    def run(args):
        r = subprocess.run([AUDIT] + args, env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
        return r.returncode, r.stdout, r.stderr

    eq(run([])[0], 2, "no command")
    eq(run(["verify"])[0], 2, "no file")
    eq(run(["check", "x"])[0], 2, "unknown command")
    status, out, _ = run(["--help"])
    eq(status, 0, "--help")
    check("verify" in out, "usage text")
    status, _, err = run(["verify", C.ws.sub("no-such.log")])
    eq(status, 2, "a missing file")
    check("no-such.log" in err, "names the file: %r" % err)
    status, _, err = run(["verify", "--config", C.ws.sub("no-such.conf"), C.ws.sub("base.log")])
    eq(status, 2, "a missing configuration")
    empty = write_lines("empty.log", [])
    eq(run(["verify", empty])[0], 1, "an empty log")


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
