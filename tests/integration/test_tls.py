#!/usr/bin/python3
"""TLS and process hygiene (issue: access control, TLS, audit, hygiene):
p11kmsd over HTTPS with certificates made here by the openssl CLI, checked
with openssl s_client, curl and boto3 — TLS 1.3 only by default, 1.2 when
allowed, client certificates required and bound to principals — plain HTTP
refused off loopback, a group-readable key file refused, core dumps off,
memory locked, and require_locked_memory refusing to start when it cannot
be. TAP output."""

import json
import os
import ssl
import subprocess
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

OPENSSL = "/usr/bin/openssl"
CURL = "/usr/bin/curl"


class Ctx:
    ws = None
    token = None
    alice = None      # bound to client certificate A
    bob = None        # not bound
    creds = None
    pki = {}          # name -> path
    servers = []


C = Ctx()


def run(args, timeout=30, **kw):
    return subprocess.run(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, **kw)


def openssl(*args):
    r = run([OPENSSL] + list(args))
    if r.returncode != 0:
        raise AssertionError("openssl %s: %s" % (" ".join(args), r.stderr.decode()))


def make_pki(d):
    """A CA; a server certificate for 127.0.0.1; client certificates A and B from the CA
    (no Extended Key Usage); from the CA too, certificates whose Extended Key Usage is
    serverAuth only (srvonly), clientAuth (cliauth), and both (both); a self-signed client
    certificate the CA never signed."""
    eku = {"srvonly": "serverAuth", "cliauth": "clientAuth", "both": "serverAuth, clientAuth"}
    p = {k: os.path.join(d, k) for k in (
        "ca.key", "ca.pem", "server.key", "server.csr", "server.pem", "ext.cnf",
        "a.key", "a.csr", "a.pem", "b.key", "b.csr", "b.pem", "rogue.key", "rogue.pem")
        + tuple(n + x for n in eku for x in (".key", ".csr", ".pem", ".cnf"))}
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", p["ca.key"], "-out", p["ca.pem"], "-days", "2",
            "-subj", "/CN=p11kms test CA")
    with open(p["ext.cnf"], "w") as f:
        f.write("subjectAltName = IP:127.0.0.1\nextendedKeyUsage = serverAuth\n")
    openssl("req", *key, "-keyout", p["server.key"], "-out", p["server.csr"],
            "-subj", "/CN=127.0.0.1")
    openssl("x509", "-req", "-in", p["server.csr"], "-CA", p["ca.pem"], "-CAkey", p["ca.key"],
            "-CAcreateserial", "-out", p["server.pem"], "-days", "2", "-extfile", p["ext.cnf"])
    for name in ("a", "b"):
        openssl("req", *key, "-keyout", p[name + ".key"], "-out", p[name + ".csr"],
                "-subj", "/CN=client " + name)
        openssl("x509", "-req", "-in", p[name + ".csr"], "-CA", p["ca.pem"], "-CAkey",
                p["ca.key"], "-CAcreateserial", "-out", p[name + ".pem"], "-days", "2")
    for name, usage in eku.items():
        with open(p[name + ".cnf"], "w") as f:
            f.write("extendedKeyUsage = %s\n" % usage)
        openssl("req", *key, "-keyout", p[name + ".key"], "-out", p[name + ".csr"],
                "-subj", "/CN=client " + name)
        openssl("x509", "-req", "-in", p[name + ".csr"], "-CA", p["ca.pem"], "-CAkey",
                p["ca.key"], "-CAcreateserial", "-out", p[name + ".pem"], "-days", "2",
                "-extfile", p[name + ".cnf"])
    openssl("req", "-x509", *key, "-keyout", p["rogue.key"], "-out", p["rogue.pem"],
            "-days", "2", "-subj", "/CN=rogue")
    for k in p:
        if k.endswith(".key"):
            os.chmod(p[k], 0o600)
    return p


def fingerprint(pem):
    r = run([OPENSSL, "x509", "-in", pem, "-noout", "-fingerprint", "-sha256"])
    return r.stdout.decode().strip().split("=", 1)[1].replace(":", "").lower()


def setup():
    C.ws = h.Workspace()
    C.alice = h.new_principal("alice")
    C.bob = h.new_principal("bob")
    C.token = h.make_token(C.ws.sub("token"), "p11kms-it-tls")
    C.creds = h.write_credentials(C.ws.sub("credentials"), [C.alice, C.bob])
    os.makedirs(C.ws.sub("pki"))
    C.pki = make_pki(C.ws.sub("pki"))


def teardown():
    for s in C.servers[:-1]:
        s.stop()
    h.finish(T, C.ws, C.servers[-1] if C.servers else None)


def config(name, **extra):
    settings = {"tls_cert_file": C.pki["server.pem"], "tls_key_file": C.pki["server.key"]}
    settings.update(extra)
    return h.write_config(C.ws.sub(name + ".conf"), C.token, C.creds, **settings)


def start(name, **extra):
    srv = h.start_config_server(config(name, **extra), C.token, C.ws.sub(name + ".log"),
                                ca_file=C.pki["ca.pem"])
    C.servers.append(srv)
    return srv


def s_client(srv, version, cert=None):
    """openssl s_client with one protocol version: (handshake ok, negotiated protocol)."""
    args = [OPENSSL, "s_client", "-connect", "%s:%d" % (srv.host, srv.port), "-CAfile",
            C.pki["ca.pem"], "-verify_return_error", "-" + version]
    if cert:
        args += ["-cert", C.pki[cert + ".pem"], "-key", C.pki[cert + ".key"]]
    r = subprocess.run(args, input=b"Q\n", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=20)
    out = r.stdout.decode("utf-8", "replace")
    proto = None
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Protocol") and ":" in line:
            proto = line.split(":", 1)[1].strip()
        elif line.startswith("New, ") and ", Cipher is" in line:
            proto = proto or line.split(",")[1].strip()
    handshake = r.returncode == 0 and "Cipher is (NONE)" not in out and proto is not None
    return handshake, proto


def curl(srv, path="/healthz", args=()):
    r = run([CURL, "-sS", "--max-time", "10", "--cacert", C.pki["ca.pem"], "-o", "-",
             "-w", "\n%{http_code}"] + list(args) + [srv.endpoint + path])
    body, _, code = r.stdout.decode("utf-8", "replace").rpartition("\n")
    return r.returncode, int(code or 0), body


def signed_curl(srv, principal, op, params, cert=None):
    """A SigV4-signed KMS request sent by curl (with a client certificate when given)."""
    headers, body = h.sign(srv.endpoint, "TrentService." + op, params, principal)
    args = ["-X", "POST", "--data-binary", "@-"]
    for k, v in headers.items():
        args += ["-H", "%s: %s" % (k, v)]
    if cert:
        args += ["--cert", C.pki[cert + ".pem"], "--key", C.pki[cert + ".key"]]
    r = subprocess.run([CURL, "-sS", "--max-time", "10", "--cacert", C.pki["ca.pem"], "-o", "-",
                        "-w", "\n%{http_code}"] + args + [srv.endpoint + "/"], input=body,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    text, _, code = r.stdout.decode("utf-8", "replace").rpartition("\n")
    return r.returncode, int(code or 0), text


@test
def test_tls13_only_by_default():
    srv = start("tls13")
    eq(srv.endpoint.split(":")[0], "https", "the server says it serves https")
    ok13, proto13 = s_client(srv, "tls1_3")
    eq((ok13, proto13), (True, "TLSv1.3"), "openssl s_client -tls1_3")
    ok12, proto12 = s_client(srv, "tls1_2")
    eq(ok12, False, "openssl s_client -tls1_2 is refused (negotiated %r)" % proto12)
    rc, code, body = curl(srv, args=["--tlsv1.2", "--tls-max", "1.2"])
    check(rc != 0 and code == 0, "curl limited to TLS 1.2 fails (exit %d, HTTP %d)" % (rc, code))
    rc, code, body = curl(srv, args=["--tlsv1.3"])
    eq((rc, code, body), (0, 200, "ok\n"), "curl --tlsv1.3 /healthz")
    # boto3 over https, verifying the server against the CA
    kms = h.kms_client(srv.endpoint, C.bob, ca_file=C.pki["ca.pem"])
    key = kms.create_key()["KeyMetadata"]["KeyId"]
    d = kms.generate_data_key(KeyId=key, KeySpec="AES_256", EncryptionContext={"t": "1"})
    back = kms.decrypt(CiphertextBlob=d["CiphertextBlob"], EncryptionContext={"t": "1"})
    eq(back["Plaintext"], d["Plaintext"], "GenerateDataKey and Decrypt over TLS 1.3")
    # plain HTTP on the TLS port is not served
    r = run([CURL, "-sS", "--max-time", "5", "-o", "/dev/null", "-w", "%{http_code}",
             "http://%s:%d/healthz" % (srv.host, srv.port)])
    check(r.stdout.decode() in ("000", "400"), "plain HTTP to the TLS port: %r" % r.stdout)
    srv.stop()


@test
def test_tls12_when_allowed():
    srv = start("tls12", tls_min_version="1.2")
    eq(s_client(srv, "tls1_2"), (True, "TLSv1.2"), "openssl s_client -tls1_2")
    eq(s_client(srv, "tls1_3"), (True, "TLSv1.3"), "openssl s_client -tls1_3")
    ok11, _ = s_client(srv, "tls1_1")
    eq(ok11, False, "TLS 1.1 is never served")
    srv.stop()


@test
def test_client_certificates():
    srv = start("mtls", tls_client_ca_file=C.pki["ca.pem"],
                **{"client_cert.alice": fingerprint(C.pki["a.pem"])})
    # health probes need no certificate; everything else does
    eq(curl(srv, "/healthz"), (0, 200, "ok\n"), "/healthz without a client certificate")
    eq(curl(srv, "/readyz"), (0, 200, "ready\n"), "/readyz without a client certificate")
    rc, code, body = curl(srv, "/metrics")
    eq((rc, code, json.loads(body)["__type"]), (0, 400, "AccessDeniedException"),
       "/metrics without a client certificate")
    rc, code, body = signed_curl(srv, C.bob, "ListKeys", {})
    eq((rc, code), (0, 400), "a signed request without a client certificate")
    eq(json.loads(body), {"__type": "AccessDeniedException",
                          "message": "A client certificate is required"}, "its answer")
    rc, code, body = signed_curl(srv, C.bob, "ListKeys", {}, cert="rogue")
    eq((rc, code), (0, 400), "a certificate the CA did not sign")
    eq(json.loads(body), {"__type": "AccessDeniedException",
                          "message": "The client certificate is not trusted"}, "its answer")
    # bob (not bound) with either trusted certificate
    for cert in ("a", "b"):
        rc, code, body = signed_curl(srv, C.bob, "ListKeys", {}, cert=cert)
        eq((rc, code), (0, 200), "bob with certificate %s: %s" % (cert, body))
    # The certificate's purpose, as OpenSSL's check: an Extended Key Usage that does not
    # allow clientAuth is refused before any operation; none at all (a, b) is fine.
    rc, code, body = signed_curl(srv, C.bob, "ListKeys", {}, cert="srvonly")
    eq((rc, code), (0, 400), "a certificate for serverAuth only: %s" % body)
    eq(json.loads(body), {"__type": "AccessDeniedException",
                          "message": "The client certificate's Extended Key Usage does not "
                                     "allow client authentication"}, "its answer")
    for cert in ("cliauth", "both"):
        rc, code, body = signed_curl(srv, C.bob, "ListKeys", {}, cert=cert)
        eq((rc, code), (0, 200), "bob with certificate %s: %s" % (cert, body))
    # alice is bound to certificate A
    rc, code, body = signed_curl(srv, C.alice, "ListKeys", {}, cert="a")
    eq((rc, code), (0, 200), "alice with her certificate: %s" % body)
    rc, code, body = signed_curl(srv, C.alice, "ListKeys", {}, cert="b")
    eq(code, 400, "alice with another trusted certificate")
    eq(json.loads(body), {"__type": "AccessDeniedException",
                          "message": "alice must connect with the client certificate bound to it"},
       "its answer")
    # boto3 with a client certificate
    kms = h.kms_client(srv.endpoint, C.alice, ca_file=C.pki["ca.pem"],
                       client_cert=(C.pki["a.pem"], C.pki["a.key"]))
    eq(kms.generate_random(NumberOfBytes=16)["ResponseMetadata"]["HTTPStatusCode"], 200,
       "boto3 with alice's certificate")
    srv.stop()


@test
def test_refusals_at_start():
    """Settings p11kmsd refuses before it listens."""
    env = h.server_env({"SOFTHSM2_CONF": C.token.conf})
    cases = [
        ("plain HTTP off loopback", {"tls_cert_file": None, "tls_key_file": None},
         ["--listen", "0.0.0.0:0"], "plain HTTP is served on loopback only"),
        ("a certificate without its key", {"tls_key_file": None}, [],
         "tls_cert_file and tls_key_file go together"),
        ("client certificates without TLS",
         {"tls_cert_file": None, "tls_key_file": None, "tls_client_ca_file": C.pki["ca.pem"]},
         [], "client certificates need TLS"),
        ("TLS 1.1", {"tls_min_version": "1.1"}, [], "tls_min_version must be 1.3 or 1.2"),
    ]
    for what, settings, args, message in cases:
        s = {"tls_cert_file": C.pki["server.pem"], "tls_key_file": C.pki["server.key"]}
        s.update(settings)
        path = C.ws.sub("refused.conf")
        h.write_config(path, C.token, C.creds, **{k: v for k, v in s.items() if v is not None})
        status, _, err = h.run_failing(["--config", path] + args, env)
        check(status not in (0, None), "%s: exit status %r" % (what, status))
        check(message in err, "%s: %r not in %r" % (what, message, err))
    # a key file others may read
    os.chmod(C.pki["server.key"], 0o640)
    try:
        path = C.ws.sub("readable.conf")
        h.write_config(path, C.token, C.creds, tls_cert_file=C.pki["server.pem"],
                       tls_key_file=C.pki["server.key"])
        status, _, err = h.run_failing(["--config", path], env)
        check(status not in (0, None), "a group-readable key file: exit status %r" % status)
        check("server.key holds secrets but group or others may access it (mode 640)" in err,
              "the refusal names the file: %r" % err)
    finally:
        os.chmod(C.pki["server.key"], 0o600)


def proc_field(pid, name, path="status"):
    with open("/proc/%d/%s" % (pid, path)) as f:
        for line in f:
            if line.startswith(name):
                return line[len(name):].strip()
    return None


@test
def test_core_dumps_off_and_memory_locked():
    srv = start("hygiene")
    pid = srv.proc.pid
    limits = proc_field(pid, "Max core file size", "limits").split()
    eq(limits[:2], ["0", "0"], "core file size limit (soft, hard)")
    if h.sanitized_server():
        srv.stop()
        h.diag("AddressSanitizer makes mlockall a no-op: memory locking not checked here")
        return
    locked = int(proc_field(pid, "VmLck:").split()[0])
    check(locked > 0, "VmLck %d kB: memory is locked" % locked)
    check("memory is NOT locked" not in srv.stderr_text(), "no warning when memory is locked")
    srv.stop()


@test
def test_require_locked_memory():
    """Without CAP_IPC_LOCK and with a tiny RLIMIT_MEMLOCK, mlockall fails: a warning by
    default, a refusal to start with require_locked_memory = true."""
    if h.sanitized_server():
        raise h.Skip("AddressSanitizer makes mlockall a no-op")
    setpriv = ["/usr/bin/setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock", "--"]
    prlimit = ["/usr/bin/prlimit", "--memlock=65536:65536", "--"]
    path = config("nolock")
    h.init_database(path, C.token)
    env = h.server_env({"SOFTHSM2_CONF": C.token.conf})
    srv = h.Server([], env, C.ws.sub("nolock.log"))
    srv.args = prlimit + setpriv + [h.p11kmsd_path(), "--config", path, "--listen", "127.0.0.1:0"]
    srv.ssl_context = ssl.create_default_context(cafile=C.pki["ca.pem"])
    srv.start()
    C.servers.append(srv)
    check("memory is NOT locked" in srv.stderr_text(), "the warning: %r" % srv.stderr_text())
    eq(curl(srv, "/readyz"), (0, 200, "ready\n"), "it serves nonetheless")
    srv.stop()
    C.servers.remove(srv)
    path = config("mustlock", require_locked_memory="true")
    r = run(prlimit + setpriv + [h.p11kmsd_path(), "--config", path], env=env, timeout=30)
    err = r.stderr.decode("utf-8", "replace")
    check(r.returncode != 0, "require_locked_memory: exit status %d" % r.returncode)
    check("cannot lock memory" in err and "require_locked_memory" in err,
          "the refusal explains itself: %r" % err)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
