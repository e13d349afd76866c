"""Integration-test harness for p11kmsd: real SoftHSM2 tokens, a real server on
loopback (port chosen by the server), boto3 / the aws CLI / raw SigV4 requests,
and a small TAP runner for automake's tap-driver.

Only Debian-packaged modules are used (python3-boto3, python3-pykcs11), so the
tests run under /usr/bin/python3.
"""

import base64
import ctypes
import datetime
import http.client
import json
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.config
import botocore.credentials

HERE = os.path.dirname(os.path.abspath(__file__))
SRCDIR = os.environ.get("P11KMS_SRCDIR") or os.path.normpath(os.path.join(HERE, "..", ".."))
MAKE_TOKEN = os.path.join(SRCDIR, "softhsm-fixtures", "make-token.sh")
SOFTHSM_MODULE = os.environ.get("SOFTHSM_MODULE") or "/usr/lib/softhsm/libsofthsm2.so"
AWS_CLI = "/usr/bin/aws"
REGION = "us-east-1"
ACCOUNT = "123456789012"
JSON_TYPE = "application/x-amz-json-1.1"
# Under valgrind (P11KMS_SERVER_WRAPPER) p11kmsd starts and stops ~20 times slower.
READY_TIMEOUT = 120.0 if "valgrind" in os.environ.get("P11KMS_SERVER_WRAPPER", "") else 20.0
STOP_TIMEOUT = 120.0 if "valgrind" in os.environ.get("P11KMS_SERVER_WRAPPER", "") else 15.0
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def p11kmsd_path():
    """$P11KMSD (set by `make check`), else the binary two levels up."""
    path = os.environ.get("P11KMSD") or os.path.normpath(os.path.join(HERE, "..", "..", "p11kmsd"))
    if not os.access(path, os.X_OK):
        raise RuntimeError("p11kmsd not found or not executable at %s (set P11KMSD)" % path)
    return path


# ---- TAP --------------------------------------------------------------------


def server_wrapper():
    """$P11KMS_SERVER_WRAPPER split into words: a command every p11kmsd started
    through Server runs under (valgrind in CI's memcheck step), else []."""
    return shlex.split(os.environ.get("P11KMS_SERVER_WRAPPER", ""))


def under_valgrind():
    return any(os.path.basename(w) == "valgrind" for w in server_wrapper())


def diag(text):
    for line in str(text).splitlines() or [""]:
        print("# " + line)
    sys.stdout.flush()


class Skip(Exception):
    """Raised by a test that cannot run in this build or on this machine."""


def sanitized_server():
    """True when p11kmsd is built with AddressSanitizer (which makes mlockall a no-op)."""
    with open(p11kmsd_path(), "rb") as f:
        return b"__asan_init" in f.read()


class TapRunner:
    """Runs test functions in order, printing TAP. A test is a callable; it
    passes when it returns. The exit status is 0 only if every test passed."""

    def __init__(self):
        self.tests = []
        self.failed = 0

    def add(self, name, fn):
        self.tests.append((name, fn))

    def test(self, fn):
        """Decorator: registers fn under its name without the test_ prefix."""
        name = fn.__name__
        if name.startswith("test_"):
            name = name[5:]
        self.add(name, fn)
        return fn

    def run(self, setup=None, teardown=None):
        """setup() and teardown() run around all tests; a failure in either
        fails the run (teardown always runs)."""
        started = time.monotonic()
        # A SIGTERM or SIGHUP (a test-suite timeout) interrupts the run so that
        # the tear-down still stops the servers and removes the temporary files.
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        print("1..%d" % len(self.tests))
        sys.stdout.flush()
        failed = 0
        setup_error = None
        if setup:
            try:
                setup()
            except BaseException:  # noqa: B902 - reported below as TAP
                setup_error = traceback.format_exc()
                diag("set-up failed:")
                diag(setup_error)
        for n, (name, fn) in enumerate(self.tests, 1):
            if setup_error is not None:
                print("not ok %d - %s" % (n, name))
                diag("not run: set-up failed")
                failed += 1
                continue
            t0 = time.monotonic()
            try:
                fn()
            except Skip as e:
                print("ok %d - %s # SKIP %s" % (n, name, e))
            except BaseException as e:  # noqa: B902
                failed += 1
                self.failed = failed
                print("not ok %d - %s" % (n, name))
                diag(traceback.format_exc())
                if isinstance(e, KeyboardInterrupt):
                    break
            else:
                print("ok %d - %s" % (n, name))
                diag("%.2f s" % (time.monotonic() - t0))
            sys.stdout.flush()
        if teardown:
            try:
                teardown()
            except BaseException:  # noqa: B902
                # Every test already has its line; the plan is fixed, so a
                # tear-down failure (e.g. a bad exit status) is a "Bail out!".
                diag(traceback.format_exc())
                print("Bail out! tear-down failed")
                failed += 1
        diag("total %.1f s" % (time.monotonic() - started))
        sys.stdout.flush()
        return 0 if failed == 0 else 1


def finish(runner, workspace, server):
    """The common tear-down: stops the server (showing its log when a test
    failed) and then removes the workspace, whatever happens."""
    try:
        if server:
            if runner.failed:
                diag("p11kmsd's log:\n" + server.stderr_text())
            server.stop()
    finally:
        if workspace:
            workspace.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


# ---- assertions ---------------------------------------------------------------


def eq(actual, expected, what=""):
    if actual != expected:
        raise AssertionError("%s%r != expected %r" % (what + ": " if what else "", actual, expected))


def check(cond, what):
    if not cond:
        raise AssertionError(what)


# ---- fixtures -----------------------------------------------------------------


class Workspace:
    """A temporary folder removed by close()."""

    def __init__(self, prefix="p11kms-it-"):
        self.path = tempfile.mkdtemp(prefix=prefix)
        os.chmod(self.path, 0o700)

    def sub(self, *names):
        return os.path.join(self.path, *names)

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)


class Token:
    def __init__(self, directory, label):
        self.dir = directory
        self.label = label
        self.conf = os.path.join(directory, "softhsm2.conf")
        self.so_pin_file = os.path.join(directory, "so.pin")
        self.pin_file = os.path.join(directory, "user.pin")

    def user_pin(self):
        with open(self.pin_file) as f:
            return f.read().strip()


def make_token(directory, label):
    """A fresh SoftHSM2 token through softhsm-fixtures/make-token.sh."""
    env = dict(os.environ, SOFTHSM_MODULE=SOFTHSM_MODULE)
    r = subprocess.run(["/bin/sh", MAKE_TOKEN, directory, label], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    if r.returncode != 0 or r.stdout or r.stderr:
        raise RuntimeError("make-token.sh failed (%d): stdout %r stderr %r"
                           % (r.returncode, r.stdout, r.stderr))
    return Token(directory, label)


class Flooder:
    """A flooding client in a process of its own (python3 -c script HERE nice), driven on its
    stdin: the JSON configuration, then "go", "stop" (it answers its results as one JSON
    line) and "quit". It says "ready" once configured and "flooding" once started."""

    def __init__(self, script, cfg, nice):
        self.proc = subprocess.Popen([sys.executable, "-c", script, HERE, str(nice)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
        self.send(json.dumps(cfg))
        self.expect("ready")

    def expect(self, word):
        line = self.proc.stdout.readline().decode().strip()
        if line != word:
            raise AssertionError("the attacker said %r, not %r: %s" % (line, word, self.errors()))

    def errors(self):
        """What the attacker wrote on stderr, after ending it (for failures)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stderr.read().decode("utf-8", "replace")[-4000:]

    def send(self, cmd):
        self.proc.stdin.write((cmd + "\n").encode())
        self.proc.stdin.flush()

    def go(self):
        self.send("go")
        self.expect("flooding")

    def stop(self):
        self.send("stop")
        line = self.proc.stdout.readline().decode()
        try:
            return json.loads(line)
        except ValueError:
            raise AssertionError("the attacker's results: %r %s" % (line, self.errors()))

    def close(self):
        proc, self.proc = self.proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    proc.stdin.write(b"quit\n")
                    proc.stdin.flush()
                except OSError:
                    pass
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            for f in (proc.stdin, proc.stdout, proc.stderr):
                try:
                    f.close()
                except OSError:
                    pass


def under_pgserver(script):
    """Runs script again under tests/pgserver.sh (a throw-away PostgreSQL server on
    loopback) unless it already runs under one: how make check and a run by hand both
    start it. A server that cannot start ends the run with status 99, a failure, never
    a skip."""
    if not os.environ.get("P11KMS_TEST_PG_DIR"):
        pg = os.path.join(HERE, "..", "pgserver.sh")
        os.execv(pg, [pg, "run", sys.executable, os.path.abspath(script)])


def pgserver(action):
    """pgserver.sh crash|start on the server this run is under."""
    r = subprocess.run([os.environ["P11KMS_TEST_PG_SERVER"], action,
                        os.environ["P11KMS_TEST_PG_DIR"]], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    if r.returncode != 0:
        raise AssertionError("pgserver.sh %s failed (%d): %s"
                             % (action, r.returncode, r.stderr.decode(errors="replace")))


def free_port():
    """A TCP port free on loopback at the moment (a caller binding it later retries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """nginx on loopback in front of p11kmsd nodes, in its own folder: round
    robin over the upstream ports, Host passed through unchanged (SigV4 signs
    it), HTTP/1.1 keep-alive to the nodes. Each access log line is
    "$msec $upstream_addr $status" (several upstreams, comma-separated, when
    nginx moved on from one). upstream_options go on each server line,
    location_extra lines into the location."""

    CANDIDATES = ("/usr/sbin/nginx", "/usr/bin/nginx")

    def __init__(self, directory, ports, upstream_options="", location_extra=()):
        self.dir = directory
        self.ports = list(ports)
        self.upstream_options = upstream_options
        self.location_extra = list(location_extra)
        self.proc = None
        self.port = None

    @classmethod
    def binary(cls):
        for path in cls.CANDIDATES:
            if os.access(path, os.X_OK):
                return path
        path = shutil.which("nginx")
        if path:
            return path
        raise RuntimeError("nginx is not installed (scripts/deps.sh installs the Debian package)")

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.port

    def _path(self, name):
        return os.path.join(self.dir, name)

    def config(self, port):
        options = " " + self.upstream_options if self.upstream_options else ""
        lines = ["daemon off;", "worker_processes 1;", "pid %s;" % self._path("nginx.pid"),
                 "error_log %s warn;" % self._path("error.log")]
        if os.geteuid() == 0:
            lines.append("user root;")  # the workspace is private to this user
        lines += ["events { worker_connections 512; }", "http {",
                  "    log_format upstreams '$msec $upstream_addr $status';",
                  "    access_log %s upstreams;" % self._path("access.log")]
        lines += ["    %s_temp_path %s;" % (t, self._path(t))
                  for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")]
        lines += ["    upstream p11kms {"]
        lines += ["        server 127.0.0.1:%d%s;" % (p, options) for p in self.ports]
        lines += ["    }", "    server {", "        listen 127.0.0.1:%d;" % port,
                  "        client_max_body_size 1m;", "        location / {",
                  "            proxy_pass http://p11kms;",
                  "            proxy_set_header Host $http_host;",
                  "            proxy_http_version 1.1;",
                  "            proxy_set_header Connection \"\";"]
        lines += ["            %s" % line for line in self.location_extra]
        lines += ["        }", "    }", "}"]
        return "\n".join(lines) + "\n"

    def start(self):
        binary = self.binary()
        os.mkdir(self.dir, 0o700)
        last = None
        for _ in range(5):  # the free port may be taken between the probe and nginx's bind
            port = free_port()
            conf = write_private(self._path("nginx.conf"), self.config(port))
            with open(self._path("stderr.log"), "ab") as stderr:
                proc = subprocess.Popen([binary, "-p", self.dir, "-c", conf,
                                         "-e", self._path("error.log")],
                                        stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                                        preexec_fn=_die_with_parent)
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    self.proc, self.port = proc, port
                    return self
                except OSError:
                    time.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            last = self.log()
        raise RuntimeError("nginx did not start:\n%s" % last)

    def log(self):
        """nginx's own messages (stderr and error log)."""
        text = ""
        for name in ("stderr.log", "error.log"):
            try:
                with open(self._path(name), "rb") as f:
                    text += f.read().decode("utf-8", "replace")
            except OSError:
                pass
        return text

    def access(self):
        """The access log: (time, [upstream addresses tried], status) per request."""
        out = []
        with open(self._path("access.log")) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3:
                    tried = [a.strip() for a in " ".join(parts[1:-1]).split(",")]
                    out.append((float(parts[0]), tried, parts[-1]))
        return out

    def stop(self):
        """Graceful stop (SIGQUIT); nginx must exit 0 within STOP_TIMEOUT."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)
            try:
                status = proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("nginx did not stop within %.0f s" % STOP_TIMEOUT)
        else:
            status = proc.returncode
        if status != 0:
            raise AssertionError("nginx exited with status %d:\n%s" % (status, self.log()))


def copy_token(src, dst):
    """A copy of a SoftHSM2 token folder (tokens, PINs) with its own
    softhsm2.conf naming the copy's tokens folder: the root key cloned, as an
    HSM cluster clones its keys to its members (one copy per node)."""
    shutil.copytree(src.dir, dst, symlinks=True)
    with open(src.conf) as f:
        text = f.read()
    old, new = os.path.join(src.dir, "tokens"), os.path.join(dst, "tokens")
    if old not in text:
        raise AssertionError("softhsm2.conf of %s does not name %s" % (src.dir, old))
    write_private(os.path.join(dst, "softhsm2.conf"), text.replace(old, new))
    return Token(dst, src.label)


def write_private(path, text, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)
    return path


class Principal:
    def __init__(self, access_key, secret, name):
        self.access_key = access_key
        self.secret = secret
        self.name = name


def new_principal(name):
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
    akid = "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16))
    secret = base64.b64encode(secrets.token_bytes(30)).decode()
    return Principal(akid, secret, name)


def write_credentials(path, principals, mode=0o600):
    lines = ["# access-key-id secret-access-key principal"]
    lines += ["%s %s %s" % (p.access_key, p.secret, p.name) for p in principals]
    return write_private(path, "\n".join(lines) + "\n", mode)


# The bearer token GET /metrics needs on the servers write_config configures.
METRICS_TOKEN = "p11kms-test-metrics-token-0123456789"


def write_config(path, token, credentials_file, **extra):
    """A configuration file; extra settings override the defaults below, and a
    setting given as None is left out (metrics_token_file=None: /metrics off)."""
    settings = {
        "module": SOFTHSM_MODULE,
        "token": token.label,
        "pin_file": token.pin_file,
        "credentials_file": credentials_file,
        "listen": "127.0.0.1:0",
        "region": REGION,
        "account": ACCOUNT,
        "threads": "4",
        "audit_log": path + ".audit.log",
        "database": "sqlite:" + path + ".db",
        "metrics_token_file": write_private(path + ".metrics-token", METRICS_TOKEN + "\n"),
        # The suite makes many deliberate signature failures, all from 127.0.0.1, and
        # looks for each one's audit line: no per-address limit nor summaries here.
        # test_authflood.py runs with the server's defaults.
        "auth_failures_per_minute": "0",
        "auth_failure_audit_interval_s": "0",
        # Nor a decryption breaker: tests refuse hundreds of made-up blobs on purpose.
        # test_breaker.py sets its own.
        "decrypt_breaker_failures": "0",
    }
    settings.update(extra)
    text = "# p11kmsd integration-test configuration\n"
    text += "".join("%s = %s\n" % kv for kv in settings.items() if kv[1] is not None)
    return write_private(path, text)


# ---- the server ---------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def token_and_config(ws, label, principal, **settings):
    """A fresh token in ws, a credentials file for principal and a
    configuration naming both (settings as for write_config)."""
    token = make_token(ws.sub("token"), label)
    creds = write_credentials(ws.sub("credentials"), [principal])
    return token, write_config(ws.sub("p11kmsd.conf"), token, creds, **settings)


def _die_with_parent():
    """In the child before exec: SIGTERM p11kmsd if the test process dies
    without stopping it (killed by a timeout, say)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


SERVING_RE = re.compile(r"^p11kmsd: serving (https?)://([^:/\s]+|\[[^\]]+\]):(\d+)")


class Server:
    """A running p11kmsd. stop() sends SIGTERM and asserts exit status 0."""

    def __init__(self, args, env, log_path):
        self.args = server_wrapper() + [p11kmsd_path()] + list(args)
        self.env = env
        self.log_path = log_path
        self.proc = None
        self.port = None
        self.host = None
        self.stdout_lines = []
        self._lines = queue.Queue()
        self._stderr = None
        self.scheme = "http"
        self.ssl_context = None  # for https: trusts the server's CA

    @property
    def endpoint(self):
        return "%s://%s:%d" % (self.scheme, self.host, self.port)

    def start(self, timeout=READY_TIMEOUT):
        self._stderr = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, env=self.env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self._stderr,
                                     preexec_fn=_die_with_parent)
        threading.Thread(target=self._read_stdout, daemon=True).start()
        deadline = time.monotonic() + timeout
        try:
            while self.port is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError("p11kmsd printed no 'serving' line in %.0f s" % timeout)
                try:
                    line = self._lines.get(timeout=min(left, 0.5))
                except queue.Empty:
                    line = ""
                if line is None:
                    raise RuntimeError("p11kmsd exited with status %s before serving:\n%s"
                                       % (self.proc.wait(), self.stderr_text()))
                m = SERVING_RE.match(line)
                if m:
                    self.scheme, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
            self.wait_ready(deadline)
        except BaseException:
            self.kill()
            raise
        return self

    def _read_stdout(self):
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            self.stdout_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, deadline):
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("p11kmsd exited with status %s:\n%s"
                                   % (self.proc.returncode, self.stderr_text()))
            try:
                with urllib.request.urlopen(self.endpoint + "/readyz", timeout=2,
                                            context=self.ssl_context) as r:
                    if r.status == 200:
                        return
                    last = r.status
            except urllib.error.HTTPError as e:
                last = e.code
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise RuntimeError("GET /readyz did not answer 200 in time (last: %r)" % (last,))

    def stderr_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        """SIGTERM; returns the exit status after asserting it is 0."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                status = proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("p11kmsd did not stop within %.0f s of SIGTERM" % STOP_TIMEOUT)
        finally:
            self._close()
        if status != 0:
            raise AssertionError("p11kmsd exited with status %d on SIGTERM; stderr:\n%s"
                                 % (status, self.stderr_text()))
        return status

    def sigkill(self):
        """A crash: SIGKILL, then reap. Returns the exit status (-SIGKILL when
        the process was still running; anything else means it had died)."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        try:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=STOP_TIMEOUT)
        finally:
            self._close()

    def kill(self):
        """For failure paths: make sure the process is gone."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._close()

    def _close(self):
        if self._stderr:
            self._stderr.close()
            self._stderr = None


def server_env(extra=None):
    env = dict(os.environ)
    for k in ("P11KMS_PIN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        env.pop(k, None)
    if extra:
        env.update(extra)
    return env


def init_database(config_path, token, env=None, extra_args=()):
    """p11kmsd init --config: the database and the token's root key (idempotent)."""
    env = server_env(dict(env or {}, SOFTHSM2_CONF=token.conf))
    r = subprocess.run([p11kmsd_path(), "init", "--config", config_path] + list(extra_args),
                       env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    if r.returncode != 0:
        raise RuntimeError("p11kmsd init failed (%d): %s" % (r.returncode,
                                                             r.stderr.decode(errors="replace")))
    return r


def start_config_server(config_path, token, log_path, extra_args=(), env=None, ca_file=None,
                        init=True):
    """p11kmsd --config on token, after p11kmsd init (unless init=False); env:
    more environment variables for it; ca_file: the CA that signed its TLS
    certificate (for https)."""
    if init:
        init_database(config_path, token, env, [a for a in extra_args if a.startswith("--database")])
    env = server_env(dict(env or {}, SOFTHSM2_CONF=token.conf))
    server = Server(["--config", config_path, "--listen", "127.0.0.1:0"] + list(extra_args),
                    env, log_path)
    if ca_file:
        server.ssl_context = ssl.create_default_context(cafile=ca_file)
    return server.start()


def start_dev_server(state_dir, log_path, extra_args=()):
    env = server_env()
    env.pop("SOFTHSM2_CONF", None)
    return Server(["--dev", "--state-dir", state_dir, "--listen", "127.0.0.1:0"] + list(extra_args),
                  env, log_path).start()


def run_failing(args, env, timeout=20):
    """Runs p11kmsd expecting it to refuse to start; returns (status, stdout, stderr)."""
    r = subprocess.run([p11kmsd_path()] + list(args), env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


# ---- clients ------------------------------------------------------------------


def kms_client(endpoint, principal, region=REGION, ca_file=None, client_cert=None):
    """boto3's KMS client; for https, ca_file verifies the server and
    client_cert is a (certificate file, key file) pair to present."""
    session = boto3.session.Session(aws_access_key_id=principal.access_key,
                                    aws_secret_access_key=principal.secret, region_name=region)
    return session.client("kms", endpoint_url=endpoint, verify=ca_file if ca_file else None,
                          config=botocore.config.Config(retries={"max_attempts": 1},
                                                        connect_timeout=5, read_timeout=30,
                                                        client_cert=client_cert))


def aws(args, env, timeout=60):
    """Runs /usr/bin/aws with env; returns (status, stdout, stderr)."""
    full = dict(env)
    full.setdefault("AWS_PAGER", "")
    full.setdefault("AWS_CONFIG_FILE", "/dev/null")
    full.setdefault("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    r = subprocess.run([AWS_CLI] + list(args), env=full, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


def client_error(fn, *args, **kwargs):
    """Calls a boto3 operation that must fail on the server; returns
    (error code, HTTP status, message)."""
    import botocore.exceptions
    try:
        fn(*args, **kwargs)
    except botocore.exceptions.ClientError as e:
        return (e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"],
                e.response["Error"].get("Message"))
    raise AssertionError("the call succeeded; an error was expected")


# ---- raw signed requests ------------------------------------------------------


class _FixedTimeSigV4(botocore.auth.SigV4Auth):
    """SigV4 with a chosen signing time (botocore always signs with now)."""

    def __init__(self, credentials, service, region, when):
        super().__init__(credentials, service, region)
        self._when = when

    def add_auth(self, request):
        request.context["timestamp"] = self._when.strftime(botocore.auth.SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        string_to_sign = self.string_to_sign(request, canonical)
        self._inject_signature_to_request(request, self.signature(string_to_sign, request))


class RawResponse:
    def __init__(self, status, headers, body):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def sign(endpoint, target, body, principal, region=REGION, when=None, headers=None):
    """Returns (headers dict, body bytes) of a SigV4-signed KMS request."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    hdrs = {"Content-Type": JSON_TYPE}
    if target is not None:
        hdrs["X-Amz-Target"] = target
    if headers:
        hdrs.update(headers)
    req = botocore.awsrequest.AWSRequest(method="POST", url=endpoint + "/", data=body, headers=hdrs)
    creds = botocore.credentials.Credentials(principal.access_key, principal.secret)
    if when is None:
        botocore.auth.SigV4Auth(creds, "kms", region).add_auth(req)
    else:
        _FixedTimeSigV4(creds, "kms", region, when).add_auth(req)
    return dict(req.headers.items()), body


def raw_request(endpoint, method="POST", path="/", headers=None, body=b"", timeout=30):
    """One HTTP request with exactly these headers (plus Host, Content-Length,
    which http.client adds). Returns a RawResponse."""
    m = re.match(r"^http://([^:/]+):(\d+)$", endpoint)
    conn = http.client.HTTPConnection(m.group(1), int(m.group(2)), timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if method == "POST" or body:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        if body:
            try:
                conn.send(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server may answer (413) before reading all of it
        r = conn.getresponse()
        return RawResponse(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


def get_metrics(endpoint, token=METRICS_TOKEN, timeout=30):
    """GET /metrics with the bearer token of write_config's servers."""
    return raw_request(endpoint, "GET", "/metrics",
                       headers={"Authorization": "Bearer " + token}, timeout=timeout)


def signed_request(endpoint, target, body, principal, **kw):
    """Signs and sends; kw: region, when, headers (for sign), send_body (sent
    instead of the signed body)."""
    send_body = kw.pop("send_body", None)
    headers, signed_body = sign(endpoint, target, body, principal, **kw)
    return raw_request(endpoint, headers=headers,
                       body=signed_body if send_body is None else send_body)


def kms_call(endpoint, operation, params, principal, **kw):
    return signed_request(endpoint, "TrentService." + operation, params, principal, **kw)


def kms_ok(endpoint, operation, params, principal):
    """kms_call that must answer 200: its JSON document ({} for an empty body)."""
    r = kms_call(endpoint, operation, params, principal)
    if r.status != 200:
        raise AssertionError("%s by %s answered %d: %r"
                             % (operation, principal.name, r.status, r.body))
    return r.json() if r.body else {}


def check_error_response(r, error_type, status):
    """An error answer: exact HTTP status, JSON with __type and message, and
    X-Amzn-ErrorType equal to __type."""
    try:
        doc = r.json()
    except ValueError:
        raise AssertionError("error body is not JSON: status %d body %r" % (r.status, r.body))
    eq((r.status, doc.get("__type")), (status, error_type), "HTTP status and __type (body %r)" % doc)
    eq(sorted(doc), ["__type", "message"], "error document members")
    check(isinstance(doc["message"], str) and doc["message"], "message is a non-empty string")
    eq(r.header("X-Amzn-ErrorType"), error_type, "X-Amzn-ErrorType header")
    eq((r.header("Content-Type") or "").split(";")[0], JSON_TYPE, "Content-Type")
    return doc


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


# ---- the audit log and the database -------------------------------------------


def audit_changes(paths):
    """The change records of audit log files: {request id: {"intent": n,
    "committed": n, "not committed": n, "recovery": n}} (counts of lines)."""
    seen = {}
    for path in paths:
        with open(path) as f:
            for line in f:
                try:
                    d = json.loads(line)
                except ValueError:
                    continue
                kind = d.get("type")
                if kind not in ("intent", "outcome", "recovery"):
                    continue
                entry = seen.setdefault(d["request_id"], {"intent": 0, "committed": 0,
                                                          "not committed": 0, "recovery": 0})
                if kind == "intent":
                    entry["intent"] += 1
                else:
                    entry[d["result"]] += 1
                    entry["recovery"] += kind == "recovery"
    return seen


def check_audit_changes(paths, database):
    """No change without its audit record: every change the (SQLite) database
    holds has an intent line and an outcome or recovery line saying
    "committed"; every such line's change is in the database, and no change
    said "not committed" is. Returns (the records, the committed request ids)."""
    import sqlite3
    seen = audit_changes(paths)
    db = sqlite3.connect("file:%s?mode=ro" % database, uri=True, timeout=30)
    try:
        committed = {r[0] for r in db.execute("SELECT request_id FROM change_requests")}
    finally:
        db.close()
    no_intent = sorted(r for r in committed if seen.get(r, {}).get("intent", 0) == 0)
    eq(no_intent[:5], [], "changes in the database without an intent line (%d)" % len(no_intent))
    unsaid = sorted(r for r in committed if seen[r]["committed"] == 0)
    eq(unsaid[:5], [], "changes in the database without an outcome or recovery line saying "
       "committed (%d)" % len(unsaid))
    false = sorted(r for r, e in seen.items() if e["committed"] and r not in committed)
    eq(false[:5], [], "lines saying committed of a change the database lacks (%d)" % len(false))
    wrong = sorted(r for r, e in seen.items() if e["not committed"] and r in committed)
    eq(wrong[:5], [], "lines saying not committed of a change the database holds (%d)"
       % len(wrong))
    both = sorted(r for r, e in seen.items() if e["committed"] and e["not committed"])
    eq(both[:5], [], "changes said both committed and not committed")
    return seen, committed
