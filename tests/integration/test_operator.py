#!/usr/bin/python3
"""What an operator sees of p11kmsd and p11kms, against real servers on fresh
SoftHSM2 tokens: `p11kmsd --check-config` (every problem with its line, a
valid file said to be so, nothing made or changed), the log as JSON objects in
a file reopened on SIGHUP (request lines that match the x-amzn-RequestId the
client got and the audit log's line), the text log's start-up lines (one per
fact), --help within 80 columns for every program and command, and the CLI's
dates as ISO 8601 while --json keeps AWS's epoch numbers. TAP output."""

import calendar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test


class Ctx:
    ws = None
    alice = None
    token = None  # the JSON server's token
    conf = None  # its configuration
    server = None  # log_format = json, log_requests, log_file
    log_file = None


C = Ctx()

ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3})?Z$")


def builddir():
    return os.environ.get("P11KMS_BUILDDIR") or os.path.normpath(os.path.join(h.HERE, "..", ".."))


def check_config(conf, token, env=None):
    """p11kmsd --check-config conf: (status, stdout, stderr). Its warning that memory cannot
    be locked is left out: it depends on who runs the suite (RLIMIT_MEMLOCK), not on conf."""
    full = h.server_env(dict(env or {}, SOFTHSM2_CONF=token.conf))
    r = subprocess.run([h.p11kmsd_path(), "--check-config", conf], env=full,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    err = "".join(line for line in r.stderr.decode().splitlines(True)
                  if not line.startswith("%s: warning: memory cannot be locked here" % conf))
    return r.returncode, r.stdout.decode(), err


def lines_of(conf, key):
    """The lines (1-based) of conf that set key (a line without '=': the whole line)."""
    with open(conf) as f:
        found = [n for n, text in enumerate(f, 1) if text.split("=", 1)[0].strip() == key]
    if not found:
        raise AssertionError("%s sets no %s" % (conf, key))
    return found


def line_of(conf, key):
    """The last line of conf that sets key: the one whose value is used."""
    return lines_of(conf, key)[-1]


def append(conf, text):
    with open(conf, "a") as f:
        f.write(text)


def fresh(name, **settings):
    """A token, credentials and a configuration in a folder of their own."""
    ws = h.Workspace()
    token = h.make_token(ws.sub("token"), name)
    creds = h.write_credentials(ws.sub("credentials"), [C.alice])
    conf = h.write_config(ws.sub("p11kmsd.conf"), token, creds, **settings)
    return ws, token, conf


def tree_state(top):
    """Every file under top and its size: a token object is a file of its own. (SoftHSM2
    counts log-ins in token.object, so its bytes change, not its size.)"""
    out = {}
    for d, _, files in os.walk(top):
        for name in files:
            out[os.path.join(d, name)] = os.stat(os.path.join(d, name)).st_size
    return out


# ---- p11kmsd --check-config ---------------------------------------------------


@test
def test_check_config_valid_file():
    ws, token, conf = fresh("cc-valid")
    try:
        h.init_database(conf, token)
        status, out, err = check_config(conf, token)
        eq(err, "", "stderr")
        eq(out, "p11kmsd: %s: configuration is valid\n" % conf, "stdout")
        eq(status, 0, "exit status")
    finally:
        ws.close()


@test
def test_check_config_reports_every_problem_with_its_line():
    ws, token, conf = fresh("cc-lines")
    try:
        h.init_database(conf, token)
        os.chmod(token.pin_file, 0o644)
        with open(conf) as f:
            text = f.read()
        text = text.replace("region = %s\n" % h.REGION, "")
        text += "threads = lots\nbogus_setting = 1\nno equals sign here\nthreads = 8\n"
        h.write_private(conf, text)
        status, out, err = check_config(conf, token)
        threads = lines_of(conf, "threads")
        expected = [
            "%s:%d: threads must be a number from 1 to 256" % (conf, threads[1]),
            "%s:%d: unknown setting 'bogus_setting'" % (conf, line_of(conf, "bogus_setting")),
            "%s:%d: expected 'key = value'" % (conf, line_of(conf, "no equals sign here")),
            "%s:%d: warning: threads is set again (line %d set it too); this line's value is used"
            % (conf, threads[2], threads[0]),
            "%s: the configuration needs 'region'" % conf,
            "%s:%d: %s holds secrets but group or others may access it (mode 644); chmod 600 it"
            % (conf, line_of(conf, "pin_file"), token.pin_file),
            "p11kmsd: %s: 5 problems" % conf,
        ]
        eq(err.splitlines(), expected, "stderr")
        eq(out, "", "stdout")
        eq(status, 1, "exit status")
    finally:
        ws.close()


@test
def test_check_config_changes_nothing():
    """No database, audit log or root key is made; the token's files stay as they were."""
    ws, token, conf = fresh("cc-nothing")
    try:
        db = conf + ".db"
        before = tree_state(token.dir)
        status, out, err = check_config(conf, token)
        eq(err.splitlines(), [
            "%s:%d: the database sqlite:%s does not exist: run p11kmsd init --config FILE"
            % (conf, line_of(conf, "database"), db),
            "p11kmsd: %s: 1 problem" % conf,
        ], "stderr")
        eq(status, 1, "exit status")
        check(not os.path.exists(db), "no database was made")
        check(not os.path.exists(conf + ".audit.log"), "no audit log was made")
        eq(tree_state(token.dir), before, "the token's files")
    finally:
        ws.close()


@test
def test_check_config_token_database_tls_listen():
    ws, token, conf = fresh("cc-deps")
    other = h.Workspace()
    busy = socket.socket()
    try:
        h.init_database(conf, token)
        # A database whose root key is in another token.
        token2 = h.make_token(other.sub("token"), "cc-other")
        conf2 = h.write_config(other.sub("p11kmsd.conf"), token2, conf + ".unused",
                               database="sqlite:" + conf + ".db")
        status, _, err = check_config(conf2, token2)
        lines = err.splitlines()
        check(lines[0].startswith("%s:%d: credentials_file " % (conf2, line_of(conf2,
                                                                               "credentials_file")))
              or lines[0].startswith("%s:%d: cannot open %s" % (conf2, line_of(conf2,
                                                                                "credentials_file"),
                                                                conf + ".unused")),
              "the missing credentials file on its line: %r" % lines)
        check(lines[1].startswith("%s:%d: the token does not hold root key p11kms-root:"
                                  % (conf2, line_of(conf2, "database"))), "root key: %r" % lines)
        eq(lines[2:], ["p11kmsd: %s: 2 problems" % conf2], "the rest of stderr")
        eq(status, 1, "exit status")

        # A wrong PIN, a TLS key others may read, and a listen address in use (a warning).
        h.write_private(token.pin_file, "999999\n")
        key, cert = other.sub("tls.key"), other.sub("tls.crt")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "1", "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
        os.chmod(key, 0o644)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        append(conf, "tls_cert_file = %s\ntls_key_file = %s\nlisten = 127.0.0.1:%d\n"
               % (cert, key, port))
        status, out, err = check_config(conf, token)
        lines = err.splitlines()
        eq(lines[0], "%s:%d: warning: listen is set again (line %d set it too); this line's value "
           "is used" % (conf, line_of(conf, "listen"), lines_of(conf, "listen")[0]),
           "the second listen")
        check(lines[1].startswith("%s:%d: " % (conf, line_of(conf, "tls_cert_file")))
              and "tls.key" in lines[1] and "600" in lines[1],
              "the TLS key's mode on tls_cert_file's line: %r" % lines[1])
        eq(lines[2], "%s:%d: warning: listen 127.0.0.1:%d is in use now (by a running p11kmsd?): "
           "a server started while it is would not start" % (conf, line_of(conf, "listen"), port),
           "the address in use")
        eq(lines[3], "%s:%d: cannot log in to the token %s as its user: check the PIN (pin_file or "
       "P11KMS_PIN) and that the token is initialised" % (conf, line_of(conf, "token"),
                                                           token.label), "the wrong PIN")
        eq(lines[4:], ["p11kmsd: %s: 2 problems" % conf], "the rest of stderr")
        eq(status, 1, "exit status")
    finally:
        busy.close()
        other.close()
        ws.close()


@test
def test_check_config_needs_its_file():
    status, out, err = check_config("/nonexistent/p11kmsd.conf", h.Token("/nonexistent", "x"))
    eq(err.splitlines(), [
        "/nonexistent/p11kmsd.conf: cannot open /nonexistent/p11kmsd.conf: No such file or "
        "directory",
        "p11kmsd: /nonexistent/p11kmsd.conf: 1 problem"], "stderr")
    eq(status, 1, "exit status")
    r = subprocess.run([h.p11kmsd_path(), "--check-config"], capture_output=True, timeout=20)
    eq(r.returncode, 2, "no FILE: a usage error")


# ---- logs ---------------------------------------------------------------------


def log_objects():
    with open(C.log_file) as f:
        return [json.loads(line) for line in f]


def audit_lines():
    with open(C.conf + ".audit.log") as f:
        return [json.loads(line) for line in f]


def request_line(objects, request_id):
    found = [o for o in objects if o.get("request_id") == request_id]
    eq(len(found), 1, "log lines of request %s" % request_id)
    return found[0]


@test
def test_json_log_lines_for_requests():
    kms = h.kms_client(C.server.endpoint, C.alice)
    key = kms.create_key(Description="operator")["KeyMetadata"]
    ok = kms.generate_data_key(KeyId=key["KeyId"], KeySpec="AES_256")
    try:
        kms.describe_key(KeyId="alias/missing")
        raise AssertionError("DescribeKey of a missing alias succeeded")
    except kms.exceptions.NotFoundException as e:
        missing = e.response
    objects = log_objects()
    for o in objects:
        check(ISO_RE.match(o["time"]), "time %r is ISO 8601 UTC" % o["time"])
        check(o["level"] in ("error", "warn", "info", "debug", "alert"), "level %r" % o["level"])
        check(isinstance(o["message"], str) and o["message"], "a message")

    rid = ok["ResponseMetadata"]["RequestId"]
    line = request_line(objects, rid)
    eq(line["level"], "info", "level")
    eq(line["principal"], "alice", "principal")
    eq(line["operation"], "GenerateDataKey", "operation")
    eq(line["key"], key["Arn"], "key")
    eq(line["status"], 200, "status")
    check("error" not in line, "no error member on a success")
    check(isinstance(line["duration_ms"], float) and 0 < line["duration_ms"] < 30000,
          "duration_ms %r" % line["duration_ms"])
    eq(line["message"], "GenerateDataKey by alice: 200 ok", "message")
    audited = [a for a in audit_lines() if a.get("request_id") == rid]
    eq([a["operation"] for a in audited], ["GenerateDataKey"], "the audit line of the request")

    rid = missing["ResponseMetadata"]["RequestId"]
    line = request_line(objects, rid)
    eq(line["status"], missing["ResponseMetadata"]["HTTPStatusCode"], "status of the refusal")
    eq(line["error"], "NotFoundException", "error")
    eq(line["operation"], "DescribeKey", "operation")
    check("key" not in line, "no key: the alias names none")
    eq([a["outcome"] for a in audit_lines() if a.get("request_id") == rid], ["NotFoundException"],
       "the refusal's audit line")


@test
def test_json_log_file_reopened_on_sighup():
    kms = h.kms_client(C.server.endpoint, C.alice)
    moved = C.log_file + ".1"
    os.rename(C.log_file, moved)
    C.server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not os.path.exists(C.log_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    check(os.path.exists(C.log_file), "the log file is made again after SIGHUP")
    rid = kms.list_keys()["ResponseMetadata"]["RequestId"]
    eq(request_line(log_objects(), rid)["operation"], "ListKeys", "the new file's request line")
    with open(moved) as f:
        check(rid not in f.read(), "the moved file does not get the new request's line")
    eq(os.stat(C.log_file).st_mode & 0o777, 0o640, "the new file's mode")


@test
def test_text_log_one_line_per_fact():
    """The default: text lines, no request lines, and each start-up fact said once."""
    ws, token, conf = fresh("log-text")
    try:
        server = h.start_config_server(conf, token, ws.sub("server.log"))
        kms = h.kms_client(server.endpoint, C.alice)
        kms.list_keys()
        server.stop()
        lines = server.stderr_text().splitlines()
        for line in lines:
            check(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ p11kmsd (info|warn|error|debug): ",
                           line), "a text line: %r" % line)
        facts = [line.split(" ", 1)[1] for line in lines]
        eq(len(facts), len(set(facts)), "each line once")
        audit = [line for line in facts if conf + ".audit.log" in line]
        eq(len(audit), 1, "start-up lines naming the audit log: %r" % audit)
        check(not any("ListKeys" in line for line in facts), "no request line by default")
    finally:
        ws.close()


# ---- metrics the dashboard plots ---------------------------------------------------


def metric(name, **labels):
    parsed = promtext.parse(h.get_metrics(C.server.endpoint).body.decode())
    return promtext.value(parsed, name, **labels)


@test
def test_key_cache_and_database_metrics():
    kms = h.kms_client(C.server.endpoint, C.alice)
    key = kms.create_key(Description="cache")["KeyMetadata"]["KeyId"]
    kms.describe_key(KeyId=key)
    hits, misses = (metric("p11kms_key_cache_lookups_total", result=r) for r in ("hit", "miss"))
    reads = metric("p11kms_database_transaction_seconds_count", kind="read")
    for _ in range(5):
        kms.describe_key(KeyId=key)
    eq(metric("p11kms_key_cache_lookups_total", result="hit") - hits, 5, "hits of 5 DescribeKey")
    eq(metric("p11kms_key_cache_lookups_total", result="miss") - misses, 0, "misses")
    missing = "00000000-0000-4000-8000-000000000001"
    for _ in range(2):
        try:
            kms.describe_key(KeyId=missing)
            raise AssertionError("DescribeKey of a key that does not exist succeeded")
        except kms.exceptions.NotFoundException:
            pass
    eq(metric("p11kms_key_cache_lookups_total", result="miss") - misses, 1,
       "the unknown key read from the database once")
    eq(metric("p11kms_key_cache_lookups_total", result="hit") - hits, 6,
       "then known not to exist")
    check(metric("p11kms_database_transaction_seconds_count", kind="read") > reads,
          "the miss's read transaction is counted")
    eq(metric("p11kms_database_failures_total", kind="read"), 0, "no read failed")


# ---- programs' help and the CLI's dates -----------------------------------------


def p11kms_commands(cli):
    """[(group, command)] from `p11kms help GROUP`, and the top-level commands."""
    out = subprocess.run([cli, "--help"], capture_output=True, text=True, check=True).stdout
    groups = re.findall(r"^  ([a-z-]+): ", out, re.M)
    single = re.findall(r"^  ([a-z-]+) +[A-Z]", out, re.M)
    check(len(groups) >= 5 and len(single) >= 10, "groups %r, commands %r" % (groups, single))
    pairs = [(g, None) for g in groups] + [(None, c) for c in single]
    for g in groups:
        text = subprocess.run([cli, "help", g], capture_output=True, text=True, check=True).stdout
        pairs += [(g, c) for c in re.findall(r"^  ([a-z-]+)\s", text, re.M)]
    return pairs


@test
def test_help_within_80_columns():
    top = builddir()
    cli = os.path.join(top, "p11kms")
    runs = [[h.p11kmsd_path(), "--help"], [os.path.join(top, "p11kms-audit"), "--help"],
            [cli, "--help"]]
    for group, command in p11kms_commands(cli):
        runs.append([cli] + [w for w in (group, command) if w] + ["--help"])
    for args in runs:
        r = subprocess.run(args, capture_output=True, text=True, timeout=20)
        eq(r.returncode, 0, "%s exit status" % " ".join(args[1:]))
        check(len(r.stdout.splitlines()) >= 3, "%s prints help" % args)
        wide = [line for line in r.stdout.splitlines() if len(line) > 80]
        eq(wide, [], "lines over 80 columns of %s" % " ".join(args))
    check(len(runs) > 30, "every command's help was read (%d)" % len(runs))


def cli(args):
    env = h.server_env({"AWS_ACCESS_KEY_ID": C.alice.access_key,
                        "AWS_SECRET_ACCESS_KEY": C.alice.secret, "AWS_REGION": h.REGION,
                        "P11KMS_ENDPOINT": C.server.endpoint, "AWS_CONFIG_FILE": "/dev/null",
                        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    r = subprocess.run([os.path.join(builddir(), "p11kms")] + args, env=env, capture_output=True,
                       text=True, timeout=60)
    eq(r.returncode, 0, "p11kms %s: %s" % (" ".join(args), r.stderr))
    return r.stdout


@test
def test_cli_dates_iso_8601():
    made = json.loads(cli(["--json", "keys", "create", "--description", "dates"]))["KeyMetadata"]
    epoch = made["CreationDate"]
    check(isinstance(epoch, (int, float)) and epoch > 1.7e9, "--json keeps the epoch: %r" % epoch)
    described = json.loads(cli(["--json", "keys", "describe", "--key", made["KeyId"]]))
    eq(described["KeyMetadata"]["CreationDate"], epoch, "--json describe's CreationDate")
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(epoch)))
    human = cli(["keys", "describe", "--key", made["KeyId"]])
    eq(re.findall(r"^\s*CreationDate: (.*)$", human, re.M), [iso], "the human CreationDate")
    check(calendar.timegm(time.strptime(iso, "%Y-%m-%dT%H:%M:%SZ")) == int(epoch),
          "the ISO date is the epoch's")
    cli(["keys", "rotate", "--key", made["KeyId"]])
    rows = cli(["keys", "rotations", "--key", made["KeyId"]]).splitlines()
    eq(len(rows), 1, "one rotation: %r" % rows)
    check(ISO_RE.match(rows[0].split()[0]), "the rotation's date is ISO 8601: %r" % rows[0])


def setup():
    C.alice = h.new_principal("alice")
    C.ws, C.token, C.conf = fresh("log-json", log_format="json", log_requests="true")
    C.log_file = C.ws.sub("p11kmsd.log")
    append(C.conf, "log_file = %s\n" % C.log_file)
    C.server = h.start_config_server(C.conf, C.token, C.ws.sub("server.stderr"))


def teardown():
    if C.server and T.failed and C.log_file and os.path.exists(C.log_file):
        h.diag("log file:\n" + open(C.log_file).read())
    h.finish(T, C.ws, C.server)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
