#!/usr/bin/python3
"""The audit log's group commit (DESIGN §7): no answer leaves p11kmsd before its
audit line is on disk, and many lines share one flush. p11kmsd runs with
tests/syncshim preloaded, a stand-in for fdatasync that a test can hold (a very
slow disk) or make fail (EIO). While a flush is held, a request's line is in
the file and its answer waits; once the flush returns, the answer is the 200
the line records. A failed flush fails the successful answers it covered
closed (500 KMSInternalException, no plaintext; an error keeps its own answer);
the next flush that works serves again.
Lines written while a flush is held share the next one. Both ways a request
runs: on its HTTP thread (the default) and on a worker (inline_requests = 0).
TAP output."""

import base64
import json
import os
import sys
import threading
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

SHIM = os.environ.get("P11KMS_SYNCSHIM") or os.path.join(
    h.SRCDIR, "tests", "syncshim", ".libs", "libp11kms-syncshim.so")


class Node:
    """One p11kmsd with the shim, its audit log and a key."""

    def __init__(self, name, **settings):
        self.ws = h.Workspace()
        self.principal = h.new_principal(name)
        self.control = self.ws.sub("syncshim")
        os.makedirs(self.control)
        self.token, self.config = h.token_and_config(self.ws, "p11kms-it-" + name,
                                                     self.principal, **settings)
        self.log = self.config + ".audit.log"
        asan = os.environ.get("ASAN_OPTIONS", "")
        env = {"LD_PRELOAD": SHIM, "P11KMS_SYNCSHIM_DIR": self.control,
               # The shim comes before a sanitizer's runtime in the list of libraries.
               "ASAN_OPTIONS": (asan + ":" if asan else "") + "verify_asan_link_order=0"}
        self.server = h.start_config_server(self.config, self.token,
                                            self.ws.sub("p11kmsd.log"), env=env)
        self.ep = self.server.endpoint
        self.key = self.ok("CreateKey", {})["KeyMetadata"]["KeyId"]

    def call(self, op, body):
        return h.kms_call(self.ep, op, body, self.principal)

    def ok(self, op, body):
        return h.kms_ok(self.ep, op, body, self.principal)

    def gdk(self):
        return self.call("GenerateDataKey", {"KeyId": self.key, "KeySpec": "AES_256"})

    def flag(self, name, on):
        path = os.path.join(self.control, name)
        if on:
            open(path, "w").close()
        elif os.path.exists(path):
            os.unlink(path)

    def records(self, op):
        """The request lines of op in the log, in order."""
        out = []
        with open(self.log) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("type") == "request" and rec.get("operation") == op:
                    out.append(rec)
        return out

    def wait_records(self, op, n, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.records(op)
            if len(got) >= n:
                return got
            time.sleep(0.02)
        raise AssertionError("%d %s lines in the log after %.0f s, wanted %d"
                             % (len(self.records(op)), op, timeout, n))

    def wait_metric(self, name, value, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.metric(name) == value:
                return
            time.sleep(0.02)
        raise AssertionError("%s is %r after %.0f s, wanted %r"
                             % (name, self.metric(name), timeout, value))

    def metric(self, name):
        r = h.get_metrics(self.ep)
        eq(r.status, 200, "GET /metrics")
        return promtext.value(promtext.parse(r.body.decode()), name)

    def close(self):
        self.flag("hold", False)
        self.flag("fail", False)
        h.finish(T, self.ws, self.server)


class Ctx:
    nodes = {}


C = Ctx()


def setup():
    check(os.path.exists(SHIM), "the fdatasync shim is built: %s" % SHIM)
    C.nodes["inline"] = Node("sync-inline")
    C.nodes["worker"] = Node("sync-worker", inline_requests="0")
    h.diag("two servers with the fdatasync shim: %s, %s"
           % (C.nodes["inline"].ep, C.nodes["worker"].ep))


def teardown():
    for n in C.nodes.values():
        n.close()


class Call(threading.Thread):
    """One request on a thread of its own; .result once it is answered."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.result = None

    def run(self):
        self.result = self.fn()


def flush_times(n):
    """(flushes timed, of which longer than 0.25 s, seconds in all) of
    p11kms_audit_flush_seconds."""
    r = h.get_metrics(n.ep)
    eq(r.status, 200, "GET /metrics")
    m = promtext.parse(r.body.decode())
    count = promtext.value(m, "p11kms_audit_flush_seconds_count")
    return (count, count - promtext.value(m, "p11kms_audit_flush_seconds_bucket", le="0.25"),
            promtext.value(m, "p11kms_audit_flush_seconds_sum"))


def answer_waits_for_its_line(n):
    before = len(n.records("GenerateDataKey"))
    times = flush_times(n)
    n.flag("hold", True)
    try:
        c = Call(n.gdk)
        c.start()
        line = n.wait_records("GenerateDataKey", before + 1)[before]
        eq(line["outcome"], "ok", "the line written while the flush is held")
        time.sleep(0.5)
        check(c.is_alive() and c.result is None,
              "no answer while the line's flush is held (answer %r)" % (c.result,))
    finally:
        n.flag("hold", False)
    c.join(10)
    check(not c.is_alive(), "answered once the flush returned")
    eq(c.result.status, 200, "the answer after the flush")
    eq(c.result.header("x-amzn-RequestId"), line["request_id"],
       "the answer is the request the line records")
    eq(len(base64.b64decode(c.result.json()["Plaintext"])), 32, "the data key")
    # p11kms_audit_flush_seconds timed the held flush (held for 0.5 s after its line was
    # seen, its timing begun just after the line was written): one more above 0.25 s.
    after = flush_times(n)
    check(after[0] >= times[0] + 1, "flushes timed: %r, then %r" % (times[0], after[0]))
    check(after[1] >= times[1] + 1, "flushes longer than 0.25 s: %r, then %r (the one held)"
          % (times[1], after[1]))
    check(after[2] - times[2] >= 0.25, "seconds in flushes grew by the held one's: %r, then %r"
          % (times[2], after[2]))


@test
def test_answer_waits_for_its_line_on_disk():
    answer_waits_for_its_line(C.nodes["inline"])


@test
def test_answer_waits_for_its_line_on_disk_worker():
    answer_waits_for_its_line(C.nodes["worker"])


def failed_flush_fails_closed(n):
    blob = n.ok("GenerateDataKey", {"KeyId": n.key, "KeySpec": "AES_256"})["CiphertextBlob"]
    failures = n.metric("p11kms_audit_write_failures_total")
    n.flag("fail", True)
    try:
        for op, body in (("GenerateDataKey", {"KeyId": n.key, "KeySpec": "AES_256"}),
                         ("Decrypt", {"CiphertextBlob": blob})):
            before = len(n.records(op))
            r = n.call(op, body)
            eq(r.status, 500, "%s while flushes fail" % op)
            doc = r.json()
            eq(doc["__type"], "KMSInternalException", "%s error type" % op)
            eq(doc["message"], "The request could not be audited", "%s message" % op)
            check("Plaintext" not in doc, "%s gives no plaintext" % op)
            line = n.records(op)[before]
            eq(line["request_id"], r.header("x-amzn-RequestId"),
               "%s: the line written before the failed flush is the refused request's" % op)
        # An error gives nothing away: it keeps its own answer.
        r = n.call("DescribeKey", {"KeyId": "alias/no-such-key"})
        eq((r.status, r.json()["__type"]), (404, "NotFoundException"),
           "an error while flushes fail")
    finally:
        n.flag("fail", False)
    eq(n.metric("p11kms_audit_write_failures_total"), failures + 3,
       "p11kms_audit_write_failures_total counts the three")
    r = n.gdk()
    eq(r.status, 200, "GenerateDataKey once flushes work again")


@test
def test_failed_flush_fails_closed():
    failed_flush_fails_closed(C.nodes["inline"])


@test
def test_failed_flush_fails_closed_worker():
    failed_flush_fails_closed(C.nodes["worker"])


@test
def test_lines_share_a_flush():
    """16 requests while a flush is held: one or two flushes make all 16 lines durable."""
    n = C.nodes["inline"]
    flushes = n.metric("p11kms_audit_flushes_total")
    lines = n.metric("p11kms_audit_flushed_lines_total")
    n.flag("hold", True)
    try:
        calls = [Call(n.gdk) for _ in range(16)]
        for c in calls:
            c.start()
        n.wait_metric("p11kms_audit_answers_waiting", 16)
        time.sleep(0.2)
        eq(sum(1 for c in calls if c.result is not None), 0, "answers while the flush is held")
    finally:
        n.flag("hold", False)
    for c in calls:
        c.join(10)
    eq(sorted(c.result.status for c in calls), [200] * 16, "the 16 answers")
    eq(n.metric("p11kms_audit_answers_waiting"), 0, "answers waiting once the flushes are done")
    grew = n.metric("p11kms_audit_flushes_total") - flushes
    check(1 <= grew <= 2, "16 lines took %d flushes (at most 2: the held one, then the rest)"
          % grew)
    check(n.metric("p11kms_audit_flushed_lines_total") - lines >= 16,
          "the flushes made the 16 lines durable")


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
