#!/usr/bin/python3
"""p11kmsd --dev: the state folder it makes, the README's aws CLI flow, and a
restart on the same state folder. TAP output."""

import base64
import json
import os
import pwd
import re
import stat
import subprocess
import sys
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import botocore.exceptions  # noqa: E402
import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

DEV_ACCOUNT = "111122223333"
ENV_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL",
             "P11KMS_ENDPOINT")
PRIVATE_FILES = ("softhsm2.conf", "so.pin", "user.pin", "credentials", "env", "p11kms.db")
MANY_KEYS = 1000
CONTEXT = {"app": "readme", "run": "1"}


class Ctx:
    ws = None
    state = None
    server = None
    env = None          # the variables DIR/env exports, first run
    files = None        # contents of the state files, first run
    key_id = None
    first = None        # the first run's generate-data-key answer (decoded)


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.state = C.ws.sub("state")          # made by p11kmsd itself
    C.server = h.start_dev_server(C.state, C.ws.sub("p11kmsd-1.log"))
    h.diag("p11kmsd --dev serving %s" % C.server.endpoint)


def teardown():
    h.finish(T, C.ws, C.server)


def path(name):
    return os.path.join(C.state, name)


def read(name):
    with open(path(name)) as f:
        return f.read()


def clean_env():
    """The environment for the aws CLI: nothing AWS_* from outside, no config files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null", AWS_PAGER="")
    return env


def sourced_env(state=None):
    """What `. DIR/env` sets, read back through bash."""
    script = '. "$1" && for n in %s; do printf "%%s=%%s\\0" "$n" "${!n-<unset>}"; done' % " ".join(
        ENV_NAMES + ("AWS_REGION",))
    r = subprocess.run(["bash", "-c", script, "bash", os.path.join(state or C.state, "env")],
                       env=clean_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)
    eq((r.returncode, r.stderr), (0, b""), "sourcing DIR/env")
    return dict(item.split("=", 1) for item in r.stdout.decode().split("\0") if item)


def readme_cli(command):
    """Runs a shell line after `. DIR/env`, as the README does; returns its JSON output."""
    line = '. "$STATE/env"; ' + command
    env = dict(clean_env(), STATE=C.state)
    r = subprocess.run(["bash", "-c", line], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=60)
    if r.returncode != 0:
        raise AssertionError("%r failed (%d): %s" % (command, r.returncode, r.stderr.decode()))
    return json.loads(r.stdout)


def principal_from_env(env):
    return h.Principal(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], "dev")


@test
def test_state_folder_files_and_modes():
    eq(stat.S_IMODE(os.stat(C.state).st_mode), 0o700, "state folder mode")
    eq(stat.S_IMODE(os.stat(path("tokens")).st_mode), 0o700, "tokens folder mode")
    check(os.listdir(path("tokens")), "the tokens folder holds a token")
    for name in PRIVATE_FILES:
        st = os.stat(path(name))
        check(stat.S_ISREG(st.st_mode), "%s is a regular file" % name)
        eq(stat.S_IMODE(st.st_mode), 0o600, "mode of %s" % name)
    for name in ("so.pin", "user.pin"):
        eq(re.match(r"^[0-9a-f]{32}$", read(name)) is not None, True, "%s is 32 hex digits" % name)
    check(read("so.pin") != read("user.pin"), "two different PINs")
    conf = read("softhsm2.conf")
    check("directories.tokendir = %s\n" % path("tokens") in conf,
          "softhsm2.conf names the tokens folder: %r" % conf)
    leftovers = [n for n in os.listdir(C.state) if n.endswith(".tmp")]
    eq(leftovers, [], "no temporary files left")
    C.files = {name: read(name) for name in PRIVATE_FILES if name not in ("env", "p11kms.db")}


@test
def test_env_file():
    env = sourced_env()
    for name in ENV_NAMES:
        check(env.get(name) not in (None, "", "<unset>"), "DIR/env sets %s" % name)
    eq(env["AWS_DEFAULT_REGION"], "us-east-1", "AWS_DEFAULT_REGION")
    eq(env["AWS_ENDPOINT_URL"], C.server.endpoint, "AWS_ENDPOINT_URL")
    eq(env["P11KMS_ENDPOINT"], C.server.endpoint, "P11KMS_ENDPOINT")
    check(re.match(r"^AKIA[A-Z2-7]{16}$", env["AWS_ACCESS_KEY_ID"]), "access key id format")
    creds = [line.split() for line in read("credentials").splitlines()
             if line.strip() and not line.startswith("#")]
    eq(creds, [[env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], "dev"]],
       "credentials file against DIR/env")
    eq(C.server.stdout_lines[0],
       "p11kmsd: serving %s (key alias alias/dev)" % C.server.endpoint, "first stdout line")
    C.env = env


@test
def test_dev_key():
    kms = h.kms_client(C.server.endpoint, principal_from_env(C.env))
    md = kms.describe_key(KeyId="alias/dev")["KeyMetadata"]
    check(h.UUID_RE.match(md["KeyId"]), "KeyId is a UUID")
    eq(md["Arn"], "arn:aws:kms:us-east-1:%s:key/%s" % (DEV_ACCOUNT, md["KeyId"]), "Arn")
    eq(md["KeyState"], "Enabled", "KeyState")
    eq([k["KeyId"] for k in kms.list_keys()["Keys"]], [md["KeyId"]], "exactly one key")
    aliases = kms.list_aliases()["Aliases"]
    eq([(a["AliasName"], a["TargetKeyId"]) for a in aliases], [("alias/dev", md["KeyId"])], "aliases")
    C.key_id = md["KeyId"]


def key_arn():
    return "arn:aws:kms:us-east-1:%s:key/%s" % (DEV_ACCOUNT, C.key_id)


@test
def test_metrics_open_on_loopback():
    """--dev on its loopback listener: /metrics without a token (a production
    server needs metrics_token_file), and no key ids in it."""
    r = h.raw_request(C.server.endpoint, "GET", "/metrics")
    eq(r.status, 200, "GET /metrics in --dev mode: %r" % r.body[:200])
    text = r.body.decode()
    check("p11kms_keys 1\n" in text, "p11kms_keys counts alias/dev's key")
    check("key_id=" not in text and C.key_id not in text, "no key ids")


@test
def test_readme_flow_with_aws_cli():
    out = readme_cli('/usr/bin/aws kms generate-data-key --endpoint-url "$AWS_ENDPOINT_URL" '
                     '--key-id alias/dev --key-spec AES_256')
    eq(sorted(out), ["CiphertextBlob", "KeyId", "Plaintext"], "generate-data-key members")
    plaintext = base64.b64decode(out["Plaintext"], validate=True)
    blob = base64.b64decode(out["CiphertextBlob"], validate=True)
    eq(len(plaintext), 32, "Plaintext length")
    eq(out["KeyId"], key_arn(), "KeyId")
    eq(len(blob), 1 + 16 + 4 + 12 + 32 + 16, "CiphertextBlob length")
    eq(blob[1:17], uuid.UUID(C.key_id).bytes, "the blob names the dev key")

    with open(C.ws.sub("blob.bin"), "wb") as f:
        f.write(blob)
    dec = readme_cli('/usr/bin/aws kms decrypt --endpoint-url "$AWS_ENDPOINT_URL" '
                     '--ciphertext-blob fileb://%s' % C.ws.sub("blob.bin"))
    eq(base64.b64decode(dec["Plaintext"]), plaintext, "aws kms decrypt")
    eq(dec["KeyId"], key_arn(), "decrypt KeyId")
    eq(dec["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT", "decrypt EncryptionAlgorithm")

    # with an encryption context, through the CLI's JSON argument
    ctx = json.dumps(CONTEXT)
    out = readme_cli("/usr/bin/aws kms generate-data-key --endpoint-url \"$AWS_ENDPOINT_URL\" "
                     "--key-id alias/dev --key-spec AES_256 --encryption-context '%s'" % ctx)
    with open(C.ws.sub("blob-ctx.bin"), "wb") as f:
        f.write(base64.b64decode(out["CiphertextBlob"]))
    dec = readme_cli("/usr/bin/aws kms decrypt --endpoint-url \"$AWS_ENDPOINT_URL\" "
                     "--ciphertext-blob fileb://%s --encryption-context '%s'"
                     % (C.ws.sub("blob-ctx.bin"), ctx))
    eq(dec["Plaintext"], out["Plaintext"], "decrypt with the context")
    status, _, errtext = h.aws(["kms", "decrypt", "--endpoint-url", C.server.endpoint,
                                "--ciphertext-blob", "fileb://" + C.ws.sub("blob-ctx.bin")],
                               dict(clean_env(), **{k: C.env[k] for k in ENV_NAMES[:3]}))
    eq(status, 254, "aws kms decrypt without the context exits 254 (stderr %r)" % errtext)
    check("InvalidCiphertextException" in errtext, "the CLI reports InvalidCiphertextException")

    C.first = {"plaintext": plaintext, "blob": blob, "ctx_blob": base64.b64decode(out["CiphertextBlob"]),
               "ctx_plaintext": base64.b64decode(out["Plaintext"])}


def token_objects(state):
    """(class, label) of every object a dev token holds, read with the user PIN; the
    audit log's checkpoint object is relabelled as the log grows: its label is cut to
    its kind and log id."""
    import PyKCS11
    os.environ["SOFTHSM2_CONF"] = os.path.join(state, "softhsm2.conf")
    lib = PyKCS11.PyKCS11Lib()
    lib.load(h.SOFTHSM_MODULE)
    slot = [s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == "p11kms-dev"][0]
    session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
    with open(os.path.join(state, "user.pin")) as f:
        session.login(f.read().strip())
    try:
        out = []
        for o in session.findObjects([]):
            cls, label = session.getAttributeValue(o, [PyKCS11.CKA_CLASS, PyKCS11.CKA_LABEL])
            label = label if isinstance(label, str) else bytes(label).decode()
            if label.startswith("p11kms-audit:"):
                label = ":".join(label.split(":")[:2])
            out.append((PyKCS11.CKO[cls], label))
        return sorted(out)
    finally:
        session.logout()
        session.closeSession()


@test
def test_many_keys_leave_the_token_small():
    """A dev server that made 1,000 keys (and used each): the token holds the root key and
    the audit log's objects, nothing per key; the database holds 1,000 more keys, each
    version a wrapped row."""
    state = C.ws.sub("many")
    server = h.start_dev_server(state, C.ws.sub("p11kmsd-many.log"))
    try:
        _many_keys(state, server)
    finally:
        server.stop()


def _create_key_paced(kms, description):
    """CreateKey as a well-behaved client makes it: 1,000 of them cost 10,000 tokens of the
    default management budget (1,000/s, burst 2,000), so a fast machine is throttled; a
    ThrottlingException is waited out and the call made again."""
    for _ in range(200):
        try:
            return kms.create_key(Description=description)["KeyMetadata"]["KeyId"]
        except botocore.exceptions.ClientError as e:
            if e.response["Error"]["Code"] != "ThrottlingException":
                raise
            time.sleep(0.05)
    raise AssertionError("CreateKey still throttled after 10 s")


def _many_keys(state, server):
    import sqlite3
    creds = [line.split() for line in open(os.path.join(state, "credentials"))
             if line.strip() and not line.startswith("#")][0]
    kms = h.kms_client(server.endpoint, h.Principal(creds[0], creds[1], creds[2]))
    before = token_objects(state)
    for i in range(MANY_KEYS):
        key = _create_key_paced(kms, "key %d" % i)
        if i % 100 == 0:
            blob = kms.encrypt(KeyId=key, Plaintext=b"x")["CiphertextBlob"]
            eq(kms.decrypt(CiphertextBlob=blob)["Plaintext"], b"x", "key %d works" % i)
    after = token_objects(state)
    eq(after, before, "the token's objects are the same before and after 1,000 keys")
    roots = [label for cls, label in after if label.startswith("p11kms-root:")]
    eq(len(roots), 1, "one root key")
    check(len(after) <= 8, "a handful of objects in the token: %r" % (after,))
    db = sqlite3.connect("file:%s?mode=ro" % os.path.join(state, "p11kms.db"), uri=True)
    try:
        keys = db.execute("SELECT count(*) FROM keys").fetchone()[0]
        wrapped = db.execute("SELECT count(*) FROM versions WHERE length(wrapped) = 40 AND "
                             "root_id = 1").fetchone()[0]
    finally:
        db.close()
    eq(keys, MANY_KEYS + 1, "keys in the database (alias/dev's key and the 1,000)")
    eq(wrapped, MANY_KEYS + 1, "one wrapped version each")
    h.diag("token objects after %d keys: %d (%s)" % (MANY_KEYS, len(after),
                                                     ", ".join(c for c, _ in after)))


@test
def test_restart_on_same_state_folder():
    old_endpoint = C.server.endpoint
    server, C.server = C.server, None
    server.stop()
    C.server = h.start_dev_server(C.state, C.ws.sub("p11kmsd-2.log"))
    h.diag("restarted: %s (was %s)" % (C.server.endpoint, old_endpoint))

    for name, text in C.files.items():
        eq(read(name), text, "%s unchanged by the restart" % name)
    env = sourced_env()
    eq(env["AWS_ACCESS_KEY_ID"], C.env["AWS_ACCESS_KEY_ID"], "same access key id")
    eq(env["AWS_SECRET_ACCESS_KEY"], C.env["AWS_SECRET_ACCESS_KEY"], "same secret")
    eq(env["AWS_ENDPOINT_URL"], C.server.endpoint, "AWS_ENDPOINT_URL names the new port")
    eq(stat.S_IMODE(os.stat(path("env")).st_mode), 0o600, "env mode after the rewrite")

    kms = h.kms_client(C.server.endpoint, principal_from_env(env))
    eq(kms.describe_key(KeyId="alias/dev")["KeyMetadata"]["KeyId"], C.key_id, "same alias/dev key")
    keys = kms.list_keys()
    eq([k["KeyId"] for k in keys["Keys"]], [C.key_id], "still exactly one key")
    eq(keys["Truncated"], False, "ListKeys Truncated")
    eq([a["AliasName"] for a in kms.list_aliases()["Aliases"]], ["alias/dev"], "still one alias")

    # the first run's blobs, through the CLI and through boto3
    dec = readme_cli('/usr/bin/aws kms decrypt --endpoint-url "$AWS_ENDPOINT_URL" '
                     '--ciphertext-blob fileb://%s' % C.ws.sub("blob.bin"))
    eq(base64.b64decode(dec["Plaintext"]), C.first["plaintext"], "first run's blob (aws CLI)")
    eq(dec["KeyId"], key_arn(), "KeyId")
    d = kms.decrypt(CiphertextBlob=C.first["ctx_blob"], EncryptionContext=CONTEXT)
    eq(d["Plaintext"], C.first["ctx_plaintext"], "first run's blob with context (boto3)")


# ---- state folders it must not trust ---------------------------------------------


def dev_refused(state, message):
    """p11kmsd --dev on state must exit 1 naming the problem, and serve nothing."""
    env = h.server_env()
    env.pop("SOFTHSM2_CONF", None)
    status, out, err = h.run_failing(["--dev", "--state-dir", state, "--listen", "127.0.0.1:0"],
                                     env)
    eq(status, 1, "exit status (stderr %r)" % err)
    check(message in err, "stderr says %r: %r" % (message, err))
    check("serving" not in out, "nothing served: %r" % out)


def fresh_state(name, mode=0o700):
    state = C.ws.sub(name)
    os.mkdir(state)
    os.chmod(state, mode)
    return state


def nobody():
    return pwd.getpwnam("nobody").pw_uid


@test
def test_state_folder_writable_by_others_refused():
    for mode in (0o777, 0o770, 0o702):
        state = fresh_state("loose-%04o" % mode, mode)
        dev_refused(state, "state folder %s is writable by its group or others (mode %04o): "
                           "chmod 700 %s" % (state, mode, state))
        eq(os.listdir(state), [], "nothing made in the %04o folder" % mode)


@test
def test_state_folder_of_another_user_refused():
    if os.geteuid() == 0:
        state = fresh_state("nobodys")
        os.chown(state, nobody(), -1)
        owner = nobody()
    else:
        state, owner = "/", 0  # root's, and we cannot give a folder away
    dev_refused(state, "state folder %s belongs to uid %d, not to uid %d that p11kmsd runs as" % (
        state, owner, os.geteuid()))


@test
def test_state_folder_under_a_folder_others_may_write_refused():
    """Another user who may write a folder above the state folder could swap the checked
    folder for their own before p11kmsd (and SoftHSM2) open its files by name; a sticky
    folder (as /tmp) is fine."""
    parent = C.ws.sub("shared-parent")
    os.mkdir(parent)
    os.chmod(parent, 0o777)
    state = os.path.join(parent, "state")
    os.mkdir(state, 0o700)
    dev_refused(state, "folder %s above the state folder is writable by its group or others "
                       "(mode 0777): another user could replace the state folder"
                % os.path.realpath(parent))
    eq(os.listdir(state), [], "nothing made under the open folder")
    os.chmod(parent, 0o1777)  # sticky: others may not rename what is ours
    server = h.start_dev_server(state, C.ws.sub("sticky-parent.log"))
    server.stop()


@test
def test_planted_symlink_refused():
    state = fresh_state("planted-link")
    theirs = C.ws.sub("their-credentials")
    with open(theirs, "w") as f:
        f.write("AKIAIOSFODNN7EXAMPLE wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY dev\n")
    os.chmod(theirs, 0o600)
    os.symlink(theirs, os.path.join(state, "credentials"))
    dev_refused(state, "state file %s/credentials is a symbolic link: p11kmsd does not follow "
                       "links in its state folder" % state)
    # the tokens folder too
    state = fresh_state("planted-tokens")
    os.mkdir(C.ws.sub("their-tokens"), 0o700)
    os.symlink(C.ws.sub("their-tokens"), os.path.join(state, "tokens"))
    dev_refused(state, "tokens folder %s/tokens is a symbolic link or not a folder: p11kmsd does "
                       "not follow links in its state folder" % state)


@test
def test_loose_or_foreign_state_file_refused():
    state = fresh_state("loose-file")
    conf = os.path.join(state, "softhsm2.conf")
    with open(conf, "w") as f:
        f.write("directories.tokendir = %s/tokens\nobjectstore.backend = file\n" % state)
    os.chmod(conf, 0o666)
    dev_refused(state, "state file %s has mode 0666: only its owner may read or write it "
                       "(chmod 600 %s)" % (conf, conf))
    os.chmod(conf, 0o640)
    dev_refused(state, "state file %s has mode 0640: only its owner may read or write it "
                       "(chmod 600 %s)" % (conf, conf))
    if os.geteuid() == 0:
        os.chmod(conf, 0o600)
        os.chown(conf, nobody(), -1)
        dev_refused(state, "state file %s belongs to uid %d, not to uid 0 that p11kmsd runs as" % (
            conf, nobody()))
    else:
        h.diag("not root: a state file of another user is not tried")


@test
def test_first_start_in_an_existing_private_folder():
    # an empty folder of ours, 0750 (readable by the group, writable by no one else): used
    state = fresh_state("existing-0750", 0o750)
    server = h.start_dev_server(state, C.ws.sub("p11kmsd-0750.log"))
    try:
        kms = h.kms_client(server.endpoint, principal_from_env(sourced_env(state)))
        eq(kms.describe_key(KeyId="alias/dev")["KeyMetadata"]["KeyState"], "Enabled",
           "alias/dev in a fresh 0750 folder")
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
