#!/usr/bin/python3
"""The p11kms command-line client against a real p11kmsd on a fresh SoftHSM2
token: every command's --json output checked field by field, exit codes
(NotFound 1, usage 2, no server 3, wrong context 4), encrypt/decrypt round
trips through files and pipes in both formats, a truncated stream leaving no
output file, --help for every command, progress only on a terminal, profiles
from a credentials file, and the README's CLI example run verbatim against a
development server. TAP output."""

import json
import os
import pty
import re
import select
import subprocess
import sys
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

TIMEOUT = 120
MIB = 1 << 20


class Ctx:
    ws = None
    server = None
    dev = None
    alice = None
    key = None  # KeyMetadata of the key made by keys create


C = Ctx()


def cli_path():
    path = os.environ.get("P11KMS_CLI") or os.path.normpath(os.path.join(h.HERE, "..", "..",
                                                                          "p11kms"))
    if not os.access(path, os.X_OK):
        raise RuntimeError("p11kms is not built at %s" % path)
    return path


def base_env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AWS_") and not k.startswith("P11KMS_")}
    env.update(HOME=C.ws.sub("home"), AWS_CONFIG_FILE="/dev/null",
               AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    return env


def cli_env(endpoint=None, principal=None):
    env = base_env()
    p = principal or C.alice
    env.update(AWS_ACCESS_KEY_ID=p.access_key, AWS_SECRET_ACCESS_KEY=p.secret,
               AWS_REGION=h.REGION, P11KMS_ENDPOINT=endpoint or C.server.endpoint)
    return env


def run(args, env=None, stdin=b"", **kw):
    """Runs p11kms; returns (exit status, stdout bytes, stderr text)."""
    r = subprocess.run([cli_path()] + list(args), env=env or cli_env(), input=stdin,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT, **kw)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def ok_json(args, **kw):
    rc, out, err = run(["--json"] + list(args), **kw)
    eq((rc, err), (0, ""), "p11kms %s" % " ".join(args))
    return json.loads(out)


def fails(args, code, error_type, **kw):
    """Runs with --json expecting exit `code` and the error `error_type` on stderr and stdout."""
    rc, out, err = run(["--json"] + list(args), **kw)
    eq(rc, code, "exit status of p11kms %s (stderr %r)" % (" ".join(args), err))
    check(err.startswith("p11kms: %s: " % error_type), "stderr names %s: %r" % (error_type, err))
    if out:
        eq(json.loads(out)["error"]["type"], error_type, "the JSON error")
    return err


def setup():
    C.ws = h.Workspace()
    C.alice = h.new_principal("alice")
    token, config = h.token_and_config(C.ws, "p11kms-it-cli", C.alice)
    C.server = h.start_config_server(config, token, C.ws.sub("p11kmsd.log"))
    os.makedirs(C.ws.sub("home"), exist_ok=True)
    h.diag("p11kmsd serving %s" % C.server.endpoint)


def teardown():
    try:
        if C.dev is not None and C.dev.proc is not None:
            C.dev.stop()
    finally:
        h.finish(T, C.ws, C.server)


# ---- keys ---------------------------------------------------------------------------


@test
def test_keys_create_describe_list():
    made = ok_json(["keys", "create", "--description", "cli test"])["KeyMetadata"]
    C.key = made
    check(re.fullmatch(r"[0-9a-f-]{36}", made["KeyId"]), "a UUID: %r" % made["KeyId"])
    eq(made["Arn"], "arn:aws:kms:%s:%s:key/%s" % (h.REGION, h.ACCOUNT, made["KeyId"]), "Arn")
    eq((made["Description"], made["Enabled"], made["KeyState"]), ("cli test", True, "Enabled"))
    got = ok_json(["keys", "describe", "--key", made["KeyId"]])["KeyMetadata"]
    eq((got["KeyId"], got["Arn"], got["Description"]),
       (made["KeyId"], made["Arn"], "cli test"), "describe")
    listed = ok_json(["keys", "list"])
    eq(list(listed), ["Keys"], "the list's members")
    check({"KeyId": made["KeyId"], "KeyArn": made["Arn"]} in listed["Keys"],
          "list has the key: %r" % listed)
    # the human form: one line per key
    rc, out, err = run(["keys", "list"])
    eq(rc, 0)
    check(("%s  %s" % (made["KeyId"], made["Arn"])) in out.decode().splitlines(), out)


@test
def test_keys_list_paginates():
    for _ in range(3):
        ok_json(["keys", "create"])
    boto = h.kms_client(C.server.endpoint, C.alice)
    all_ids = [k["KeyId"] for k in boto.list_keys(Limit=1000)["Keys"]]
    page = boto.list_keys(Limit=1)
    check(page.get("Truncated"), "the service pages with Limit=1")
    ids = [k["KeyId"] for k in ok_json(["keys", "list", "--page-size", "1"])["Keys"]]
    eq(sorted(ids), sorted(all_ids), "every key once, one per page")
    ids = [k["KeyId"] for k in ok_json(["keys", "list"])["Keys"]]
    eq(sorted(ids), sorted(all_ids), "every key once")


@test
def test_keys_enable_disable():
    k = C.key["KeyId"]
    eq(ok_json(["keys", "disable", "--key", k]), {}, "disable answers {}")
    eq(ok_json(["keys", "describe", "--key", k])["KeyMetadata"]["KeyState"], "Disabled")
    fails(["encrypt", "--key", k], 1, "DisabledException")
    eq(ok_json(["keys", "enable", "--key", k]), {}, "enable answers {}")
    eq(ok_json(["keys", "describe", "--key", k])["KeyMetadata"]["KeyState"], "Enabled")


@test
def test_keys_rotation():
    k = C.key["KeyId"]
    eq(ok_json(["keys", "rotations", "--key", k]), {"Rotations": []}, "no rotations yet")
    got = ok_json(["keys", "rotate", "--key", k])
    eq(got, {"KeyId": C.key["Arn"]}, "rotate")
    rot = ok_json(["keys", "rotations", "--key", k])["Rotations"]
    eq(len(rot), 1, "one rotation: %r" % rot)
    eq((rot[0]["KeyId"], rot[0]["RotationType"]), (C.key["Arn"], "ON_DEMAND"))
    ok_json(["keys", "rotate", "--key", k])
    eq(len(ok_json(["keys", "rotations", "--key", k])["Rotations"]), 2, "two rotations")
    eq(ok_json(["keys", "rotations", "--key", k, "--page-size", "1"]),
       ok_json(["keys", "rotations", "--key", k]), "one per page, the same")
    eq(ok_json(["keys", "enable-rotation", "--key", k, "--period", "90"]), {})
    st = ok_json(["keys", "rotation-status", "--key", k])
    eq((st["KeyRotationEnabled"], st["RotationPeriodInDays"]), (True, 90), "enabled, 90 days")
    eq(ok_json(["keys", "disable-rotation", "--key", k]), {})
    eq(ok_json(["keys", "rotation-status", "--key", k])["KeyRotationEnabled"], False)
    fails(["keys", "enable-rotation", "--key", k, "--period", "ninety"], 2, "UsageError")


@test
def test_keys_deletion():
    k = ok_json(["keys", "create"])["KeyMetadata"]["KeyId"]
    got = ok_json(["keys", "schedule-deletion", "--key", k, "--days", "7"])
    eq((got["KeyId"], got["KeyState"], got["PendingWindowInDays"]),
       ("arn:aws:kms:%s:%s:key/%s" % (h.REGION, h.ACCOUNT, k), "PendingDeletion", 7))
    check(isinstance(got["DeletionDate"], (int, float)), "a DeletionDate: %r" % got)
    got = ok_json(["keys", "cancel-deletion", "--key", k])
    eq(got, {"KeyId": "arn:aws:kms:%s:%s:key/%s" % (h.REGION, h.ACCOUNT, k)}, "cancel")
    eq(ok_json(["keys", "describe", "--key", k])["KeyMetadata"]["KeyState"], "Disabled",
       "a cancelled deletion leaves the key disabled, as AWS does")


# ---- aliases and policies -----------------------------------------------------------


@test
def test_aliases():
    k = C.key["KeyId"]
    other = ok_json(["keys", "create"])["KeyMetadata"]["KeyId"]
    eq(ok_json(["aliases", "create", "--name", "alias/cli", "--key", k]), {})
    listed = ok_json(["aliases", "list"])["Aliases"]
    mine = [a for a in listed if a["AliasName"] == "alias/cli"]
    eq(len(mine), 1, "listed once: %r" % listed)
    eq((mine[0]["TargetKeyId"], mine[0]["AliasArn"]),
       (k, "arn:aws:kms:%s:%s:alias/cli" % (h.REGION, h.ACCOUNT)), "the alias")
    eq(ok_json(["keys", "describe", "--key", "alias/cli"])["KeyMetadata"]["KeyId"], k)
    eq(ok_json(["aliases", "update", "--name", "alias/cli", "--key", other]), {})
    eq([a["AliasName"] for a in ok_json(["aliases", "list", "--key", other])["Aliases"]],
       ["alias/cli"], "list --key")
    fails(["aliases", "create", "--name", "alias/cli", "--key", k], 1, "AlreadyExistsException")
    eq(ok_json(["aliases", "delete", "--name", "alias/cli"]), {})
    check(all(a["AliasName"] != "alias/cli" for a in ok_json(["aliases", "list"])["Aliases"]),
          "gone")
    fails(["aliases", "delete", "--name", "alias/cli"], 1, "NotFoundException")


@test
def test_policies_put_get():
    k = C.key["KeyId"]
    doc = {"Version": "2012-10-17", "Statement": [{
        "Sid": "cli", "Effect": "Allow",
        "Principal": {"AWS": "arn:aws:iam::%s:root" % h.ACCOUNT},
        "Action": "kms:*", "Resource": "*"}]}
    path = C.ws.sub("policy.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    eq(ok_json(["policies", "put", "--key", k, "--file", path]), {}, "put")
    got = ok_json(["policies", "get", "--key", k])
    eq(sorted(got), ["Policy", "PolicyName"])
    eq(got["PolicyName"], "default")
    eq(json.loads(got["Policy"]), doc, "round trip")
    # from stdin, and the human form prints the document itself
    doc["Statement"][0]["Sid"] = "stdin"
    eq(ok_json(["policies", "put", "--key", k, "--file", "-"],
               stdin=json.dumps(doc).encode()), {})
    rc, out, err = run(["policies", "get", "--key", k])
    eq((rc, json.loads(out)), (0, doc), "human get")
    path = C.ws.sub("bad-policy.json")
    with open(path, "w") as f:
        f.write("{not json")
    fails(["policies", "put", "--key", k, "--file", path], 1, "MalformedPolicyDocumentException")


# ---- data keys ----------------------------------------------------------------------


@test
def test_data_keys():
    k = C.key["KeyId"]
    got = ok_json(["data-keys", "generate", "--key", k, "--context", "tenant=acme"])
    eq(sorted(got), ["CiphertextBlob", "KeyId", "Plaintext"], "members")
    eq(got["KeyId"], C.key["Arn"])
    import base64
    eq(len(base64.b64decode(got["Plaintext"])), 32, "AES-256")
    dec = ok_json(["data-keys", "decrypt", "--blob", got["CiphertextBlob"],
                   "--context", "tenant=acme"])
    eq((dec["Plaintext"], dec["KeyId"]), (got["Plaintext"], C.key["Arn"]), "decrypt")
    fails(["data-keys", "decrypt", "--blob", got["CiphertextBlob"], "--context", "tenant=evil"],
          4, "InvalidCiphertextException")
    bare = ok_json(["data-keys", "generate", "--key", k, "--no-plaintext"])
    eq(sorted(bare), ["CiphertextBlob", "KeyId"], "without plaintext")


# ---- errors and exit codes ----------------------------------------------------------


@test
def test_exit_codes():
    err = fails(["keys", "describe", "--key", "alias/none"], 1, "NotFoundException")
    check("alias/none" in err, err)
    fails(["keys", "describe"], 2, "UsageError")
    fails(["keys", "frobnicate"], 2, "UsageError")
    fails(["keys", "list", "--no-such-option"], 2, "UsageError")
    fails(["encrypt", "--key", "alias/x", "--context", "novalue"], 2, "UsageError")
    fails(["encrypt", "--key", "alias/x", "--format", "zip"], 2, "UsageError")
    rc, out, err = run([])
    eq(rc, 2, "no command")
    # nothing listening: TransportError, exit 3
    fails(["keys", "list"], 3, "TransportError", env=cli_env(endpoint="http://127.0.0.1:9"))
    # no credentials: a local configuration error, exit 5
    env = base_env()
    env["P11KMS_ENDPOINT"] = C.server.endpoint
    rc, out, err = run(["keys", "list"], env=env)
    eq(rc, 5, "no credentials (%r)" % err)
    # a wrong secret: the service refuses
    bad = h.Principal(C.alice.access_key, "x" * 40, "alice")
    fails(["keys", "list"], 1, "InvalidSignatureException", env=cli_env(principal=bad))
    # no secrets on the command line, ever
    fails(["keys", "list", "--secret", "x"], 2, "UsageError")
    rc, out, _ = run(["--version"])
    eq((rc, out.decode().split()[0]), (0, "p11kms"), "--version")


@test
def test_help_for_every_command():
    rc, out, err = run(["--help"])
    eq(rc, 0)
    text = out.decode()
    groups = {"keys": ["create", "describe", "list", "enable", "disable", "rotate", "rotations",
                       "rotation-status", "enable-rotation", "disable-rotation",
                       "schedule-deletion", "cancel-deletion"],
              "aliases": ["create", "update", "delete", "list"],
              "policies": ["get", "put"], "data-keys": ["generate", "decrypt"]}
    for g, cmds in groups.items():
        check(g in text, "--help names %s" % g)
        rc, out, err = run([g, "--help"])
        eq(rc, 0, "%s --help" % g)
        for c in cmds:
            check(c in out.decode(), "%s --help names %s" % (g, c))
            rc, out2, err = run([g, c, "--help"], env=base_env())
            eq((rc, err), (0, ""), "%s %s --help" % (g, c))
            check(("p11kms [global options] %s %s" % (g, c)) in out2.decode(), out2)
            rc, out3, _ = run(["help", g, c], env=base_env())
            eq((rc, out3), (0, out2), "help %s %s" % (g, c))
    for c in ["encrypt", "decrypt"]:
        rc, out, err = run([c, "--help"], env=base_env())
        eq(rc, 0)
        check(("p11kms [global options] %s" % c) in out.decode() and "--context" in out.decode(),
              out)


@test
def test_profile():
    creds = C.ws.sub("home", "creds")
    h.write_private(creds, "[default]\naws_access_key_id = AKIAWRONGWRONGWRONG0\n"
                           "aws_secret_access_key = nope\n\n[ops]\naws_access_key_id = %s\n"
                           "aws_secret_access_key = %s\n" % (C.alice.access_key, C.alice.secret))
    env = base_env()
    env.update(AWS_SHARED_CREDENTIALS_FILE=creds, AWS_REGION=h.REGION,
               P11KMS_ENDPOINT=C.server.endpoint)
    rc, out, err = run(["--json", "--profile", "ops", "keys", "list"], env=env)
    eq((rc, err), (0, ""), "--profile ops")
    env["AWS_PROFILE"] = "ops"
    eq(run(["keys", "list"], env=env)[0], 0, "AWS_PROFILE=ops")
    del env["AWS_PROFILE"]
    eq(run(["keys", "list"], env=env)[0], 1, "the default profile's credentials are used")
    eq(run(["--profile", "none", "keys", "list"], env=env)[0], 5, "an unknown profile")


# ---- encrypt and decrypt ------------------------------------------------------------


def payloads():
    return {"empty": b"", "small": b"hello, world\n", "3MiB": os.urandom(3 * MIB + 17)}


@test
def test_round_trips_files():
    k = C.key["Arn"]
    for fmt in ["stream", "jwe"]:
        for name, data in payloads().items():
            if fmt == "jwe" and len(data) > MIB:
                continue
            src, enc, dec = (C.ws.sub("%s-%s.%s" % (name, fmt, ext)) for ext in ("in", "enc",
                                                                                  "out"))
            with open(src, "wb") as f:
                f.write(data)
            got = ok_json(["encrypt", "--key", k, "--context", "tenant=acme", "-c", "app=cli",
                           "--format", fmt, "-i", src, "-o", enc])
            eq(got, {"Format": fmt, "PlaintextBytes": len(data), "Output": enc}, "summary")
            eq(oct(os.stat(enc).st_mode & 0o777), oct(0o600), "written 0600")
            got = ok_json(["decrypt", "-c", "app=cli", "--context", "tenant=acme", "-i", enc,
                           "-o", dec])
            eq(got, {"Format": fmt, "PlaintextBytes": len(data), "Output": dec}, "summary")
            with open(dec, "rb") as f:
                check(f.read() == data, "%s %s round trip" % (fmt, name))
            fails(["decrypt", "-c", "tenant=evil", "-c", "app=cli", "-i", enc,
                   "-o", dec + ".x"], 4, "DecryptionFailed")
            check(not os.path.exists(dec + ".x"), "no output file after a wrong context")
            check(not [n for n in os.listdir(C.ws.sub()) if ".p11kms-" in n],
                  "no temporary file left")


@test
def test_round_trips_pipes():
    for fmt in ["stream", "jwe"]:
        for name, data in payloads().items():
            if fmt == "jwe" and len(data) > MIB:
                continue
            rc, enc, err = run(["encrypt", "--key", C.key["KeyId"],
                                "--format", fmt, "--context", "k=v"], stdin=data)
            eq((rc, err), (0, ""), "encrypt %s %s" % (fmt, name))
            check(enc != data or not data, "not the plaintext")
            rc, out, err = run(["decrypt", "--context", "k=v"], stdin=enc)
            eq((rc, err), (0, ""), "decrypt %s %s" % (fmt, name))
            check(out == data, "%s %s round trip through pipes" % (fmt, name))


@test
def test_jwe_limit():
    fails(["encrypt", "--key", C.key["KeyId"], "--format", "jwe"], 2, "UsageError",
          stdin=b"x" * (MIB + 1))


@test
def test_truncated_stream():
    data = os.urandom(4 * MIB)
    rc, enc, err = run(["encrypt", "--key", C.key["KeyId"]], stdin=data)
    eq(rc, 0, err)
    for cut in [len(enc) // 2, len(enc) - 1, 100]:
        path = C.ws.sub("cut.enc")
        with open(path, "wb") as f:
            f.write(enc[:cut])
        out = C.ws.sub("cut.out")
        rc, _, err = run(["decrypt", "-i", path, "-o", out])
        eq(rc, 4, "a stream cut at %d (%r)" % (cut, err))
        check(not os.path.exists(out), "no output file for a stream cut at %d" % cut)
        check(not [n for n in os.listdir(C.ws.sub()) if ".p11kms-" in n], "no temporary file")
    # to stdout: what verified is out, and the error says so
    rc, out, err = run(["decrypt"], stdin=enc[:len(enc) // 2])
    eq(rc, 4, err)
    check(data.startswith(out) and len(out) < len(data), "only verified plaintext on stdout")
    # altered
    bad = bytearray(enc)
    bad[len(bad) // 2] ^= 1
    rc, out, err = run(["decrypt", "-o", C.ws.sub("bad.out")], stdin=bytes(bad))
    eq(rc, 4, err)
    check(not os.path.exists(C.ws.sub("bad.out")), "no output for an altered stream")
    # not an envelope at all
    eq(run(["decrypt"], stdin=b"hello")[0], 4, "not an envelope")


@test
def test_no_progress_without_terminal():
    data = os.urandom(8 * MIB)
    env = dict(cli_env(), P11KMS_PROGRESS_DELAY_MS="0")
    rc, enc, err = run(["encrypt", "--key", C.key["KeyId"]], stdin=data, env=env)
    eq((rc, err), (0, ""), "nothing on stderr when it is not a terminal")
    rc, out, err = run(["decrypt"], stdin=enc, env=env)
    eq((rc, err, out == data), (0, "", True), "nor when decrypting")


def run_on_pty(args, data, env):
    """Runs p11kms with stderr on a pseudo-terminal; returns (status, what the terminal got)."""
    master, slave = pty.openpty()
    src = C.ws.sub("pty.in")
    with open(src, "wb") as f:
        f.write(data)
    p = subprocess.Popen([cli_path()] + args + ["-i", src, "-o", C.ws.sub("pty.out")], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    got = b""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        r, _, _ = select.select([master], [], [], 0.5)
        if r:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        elif p.poll() is not None:
            break
    p.wait(timeout=TIMEOUT)
    os.close(master)
    return p.returncode, got.decode("utf-8", "replace")


@test
def test_progress_on_terminal():
    data = os.urandom(16 * MIB)
    env = dict(cli_env(), P11KMS_PROGRESS_DELAY_MS="0")
    rc, tty = run_on_pty(["encrypt", "--key", C.key["KeyId"]], data, env)
    eq(rc, 0, tty)
    check(re.search(r"encrypting [0-9.]+ MiB / 16\.0 MiB \(\d+%\), [0-9.]+ \S+/s", tty),
          "a progress line with size, rate and ETA: %r" % tty)
    check("ETA" in tty, "an ETA when the size is known: %r" % tty)
    rc, tty = run_on_pty(["--quiet", "encrypt", "--key", C.key["KeyId"]], data, env)
    eq((rc, tty), (0, ""), "--quiet: no progress")


# ---- the README against a development server -----------------------------------------


def readme_block():
    """The shell block of the README's "Encrypting a file with the CLI"."""
    with open(os.path.join(h.HERE, "..", "..", "README.md")) as f:
        text = f.read()
    m = re.search(r"### Encrypting a file with the CLI\n.*?```sh\n(.*?)```", text, re.S)
    check(m, "the README has the CLI example")
    return m.group(1)


@test
def test_readme_example():
    block = readme_block()
    work = C.ws.sub("readme")
    os.makedirs(work)
    C.dev = h.start_dev_server(os.path.join(work, ".p11kms-dev"), C.ws.sub("dev.log"))
    os.symlink(cli_path(), os.path.join(work, "p11kms"))
    with open(os.path.join(h.HERE, "..", "..", "README.md"), "rb") as f:
        readme = f.read()
    with open(os.path.join(work, "README.md"), "wb") as f:
        f.write(readme)
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=work, env=base_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
    eq((r.returncode, r.stderr.decode()), (0, ""), "the README's commands (%r)" % block)
    # the server stopped: exit 3
    env = dict(base_env())
    env_file = os.path.join(work, ".p11kms-dev", "env")
    C.dev.stop()
    r = subprocess.run(["bash", "-c", '. "$1"; ./p11kms keys list', "bash", env_file], cwd=work,
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
    eq(r.returncode, 3, "a stopped server (%r)" % r.stderr)
    check(r.stderr.decode().startswith("p11kms: TransportError: "), r.stderr)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
