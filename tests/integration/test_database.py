#!/usr/bin/python3
"""The key store's SQLite database (DESIGN §5) when it is wrong or failing:
each case ends in a clear start-up error naming the problem (exit status 1,
nothing served), or in 503 DependencyTimeoutException / 500
KMSInternalException in the AWS error form, never in a wrong answer or a
change half applied; the log says what failed ("database") and holds no
secret.

- start-up: the database missing, not a database, a schema newer than the
  binary, a root key the token does not hold, a directory that cannot be
  written; `p11kmsd init` twice makes one root key;
- run time: the database locked by another process (writes answer 503 within
  database_timeout_ms, keys already in use keep working); the database's
  filesystem full; pages of the database overwritten under a running server;
- backup: `p11kmsd backup` while the server makes keys, and a restore from it.
  Restoring a backup is what losing the database after that backup means:
  every blob issued before the backup decrypts; keys made after it are gone
  (DescribeKey NotFoundException, their blobs InvalidCiphertextException, for
  ever: their key material existed only in the lost database), as are the
  versions of rotations after it (blobs under them InvalidCiphertextException)
  and aliases made after it; the usage counters go back to the backup's
  values, so uses spent after the backup are counted again.

TAP output. Needs root only for the tmpfs cases (full disk, read-only
filesystem), which say in a diag line when mounting is impossible.
"""

import base64
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
INVALID_BLOB = "InvalidCiphertextException"
ANSWER_BOUND = 20.0  # seconds: "within a few seconds", generous for 2 shared cores
SETTINGS = {"usage_block": "1000"}  # a key's first block covers every use a case makes
BULK_KEYS = 300  # with 4000-byte descriptions: a database of more than 256 pages


class Ctx:
    ws = None
    token = None        # token A: every case but those that need a fresh one
    principal = None
    credentials = None
    servers = None      # every server started, stopped in tear-down
    mounts = None       # tmpfs mount points, unmounted in tear-down
    secrets = None      # strings no log may hold


C = Ctx()


def setup():
    C.ws = h.Workspace(prefix="p11kms-db-")
    C.principal = h.new_principal("dbtester")
    C.token = h.make_token(C.ws.sub("token-a"), "p11kms-db-a")
    C.credentials = h.write_credentials(C.ws.sub("credentials"), [C.principal])
    C.servers = []
    C.mounts = []
    C.secrets = [C.principal.secret, C.token.user_pin()]


def teardown():
    try:
        for s in C.servers or []:
            if s.proc is not None:
                if T.failed:
                    h.diag("p11kmsd's log (%s):\n%s" % (s.log_path, s.stderr_text()[-6000:]))
                s.kill()
    finally:
        for m in reversed(C.mounts or []):
            subprocess.call(["umount", "-l", m])
        h.finish(T, C.ws, None)


# ---- helpers ------------------------------------------------------------------


def config(name, token=None, database=None, **settings):
    """A configuration in the workspace named name, its database name.db
    beside it unless database (a path) is given."""
    token = token or C.token
    path = C.ws.sub(name + ".conf")
    db = database or C.ws.sub(name + ".db")
    extra = dict(SETTINGS, **settings)
    extra["database"] = "sqlite:" + db
    h.write_config(path, token, C.credentials, **extra)
    return path, db


def env_for(token):
    return h.server_env({"SOFTHSM2_CONF": token.conf})


def start(cfg, token=None, init=True, log=None):
    token = token or C.token
    s = h.start_config_server(cfg, token, log or cfg + ".log", init=init)
    C.servers.append(s)
    return s


def refused_start(cfg, token=None, command=()):
    """p11kmsd [command] --config cfg, which must refuse: returns its stderr."""
    args = list(command) + ["--config", cfg]
    if not command:
        args += ["--listen", "127.0.0.1:0"]
    status, out, err = h.run_failing(args, env_for(token or C.token))
    eq(status, 1, "exit status of p11kmsd %s (stderr %r)" % (" ".join(command) or "serve", err))
    check("serving" not in out, "nothing served: %r" % out)
    no_secrets(err + out, "p11kmsd's output")
    clear_errors(err)
    return err


def clear_errors(text):
    """Each error line says something after its last colon, and says it once."""
    for line in text.splitlines():
        m = re.match(r"^\S+ p11kmsd error: (.*)$", line)
        if not m:
            continue
        msg = m.group(1)
        check(not re.search(r":\s*$", msg), "an error line that ends without its reason: %r" % line)
        for part in set(re.findall(r"cannot use the database \S+", msg)):
            eq(msg.count(part), 1, "times %r appears in one error line %r" % (part, line))


def no_secrets(text, what, extra=()):
    for s in list(C.secrets) + list(extra):
        check(s not in text, "%s holds a secret (%r...)" % (what, s[:6]))


def call(server, op, params):
    return h.kms_call(server.endpoint, op, params, C.principal)


def ok(r, what):
    if r.status != 200:
        raise AssertionError("%s: HTTP %d %r" % (what, r.status, r.body[:300]))
    return r.json() if r.body else {}


def error(r, error_type, status, what):
    try:
        return h.check_error_response(r, error_type, status)
    except AssertionError as e:
        raise AssertionError("%s: %s" % (what, e))


def arn(key_id):
    return ARN_PREFIX + "key/" + key_id


def b64(data):
    return base64.b64encode(data).decode()


def create_key(server, description="database test"):
    doc = ok(call(server, "CreateKey", {"Description": description}), "CreateKey")
    return doc["KeyMetadata"]["KeyId"]


def encrypt(server, key, context=None):
    """A blob under key: (key, blob, plaintext, context)."""
    plaintext = os.urandom(24)
    context = context or {"case": "database", "n": uuid.uuid4().hex[:8]}
    doc = ok(call(server, "Encrypt", {"KeyId": key, "Plaintext": b64(plaintext),
                                       "EncryptionContext": context}), "Encrypt under %s" % key)
    eq(doc["KeyId"], arn(key), "Encrypt KeyId")
    return key, base64.b64decode(doc["CiphertextBlob"]), plaintext, context


def generate(server, key):
    doc = ok(call(server, "GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"}),
             "GenerateDataKey on %s" % key)
    eq(doc["KeyId"], arn(key), "GenerateDataKey KeyId")
    return key, base64.b64decode(doc["CiphertextBlob"]), base64.b64decode(doc["Plaintext"]), None


def decrypt_ok(server, item):
    key, blob, plaintext, context = item
    params = {"CiphertextBlob": b64(blob)}
    if context:
        params["EncryptionContext"] = context
    doc = ok(call(server, "Decrypt", params), "Decrypt of a blob under %s" % key)
    eq(doc["KeyId"], arn(key), "Decrypt KeyId")
    eq(base64.b64decode(doc["Plaintext"]), plaintext, "plaintext of a blob under %s" % key)


def decrypt_error(server, item, error_type, status):
    key, blob, _, context = item
    params = {"CiphertextBlob": b64(blob)}
    if context:
        params["EncryptionContext"] = context
    return error(call(server, "Decrypt", params), error_type, status,
                 "Decrypt of a blob under %s" % key)


def list_keys(server):
    ids, marker = [], None
    while True:
        params = {"Limit": 1000}
        if marker:
            params["Marker"] = marker
        doc = ok(call(server, "ListKeys", params), "ListKeys")
        ids += [k["KeyId"] for k in doc["Keys"]]
        if not doc.get("Truncated"):
            return sorted(ids)
        marker = doc["NextMarker"]


def describe(server, ref):
    return ok(call(server, "DescribeKey", {"KeyId": ref}), "DescribeKey %s" % ref)["KeyMetadata"]


def log_since(server, mark):
    return server.stderr_text()[mark:]


def check_log(text, *words, extra_secrets=()):
    """The log names the database and each word (case-insensitive), without secrets."""
    lines = [l for l in text.splitlines() if " p11kmsd warn: " in l or " p11kmsd error: " in l]
    check(any("database" in l for l in lines),
          "no warning or error line names the database; the log:\n%s" % text[-3000:])
    for w in words:
        check(any(w.lower() in l.lower() for l in lines),
              "no warning or error line says %r; the log:\n%s" % (w, text[-3000:]))
    no_secrets(text, "p11kmsd's log", extra_secrets)
    clear_errors(text)
    kinds = []
    for l in lines:
        l = l.split(" p11kmsd ", 1)[-1]
        if l not in kinds:
            kinds.append(l)
    h.diag("the log said:\n  " + "\n  ".join(k[:200] for k in kinds[:8]))


def plaintexts(items):
    return [b64(i[2]) for i in items]


def db_connect(path, readonly=True):
    if readonly:
        return sqlite3.connect("file:%s?mode=ro" % path, uri=True, timeout=30)
    return sqlite3.connect(path, timeout=30, isolation_level=None)


def db_sound(path):
    """integrity_check ok, and every key has the version its row names current."""
    db = db_connect(path)
    try:
        eq(db.execute("PRAGMA integrity_check").fetchall(), [("ok",)], "PRAGMA integrity_check")
        headless = db.execute("SELECT hex(id) FROM keys WHERE state <> 3 AND NOT EXISTS "
                              "(SELECT 1 FROM versions WHERE key_id = keys.id AND "
                              "vid = keys.current_vid)").fetchall()
        eq(headless, [], "keys whose current version has no row")
        bad = db.execute("SELECT count(*) FROM versions WHERE length(wrapped) IS NOT 40").fetchone()
        eq(bad[0], 0, "versions rows without a 40-byte wrapped value")
    finally:
        db.close()


def token_secret_keys(token):
    """(label, key type) of every secret key in the token, through PyKCS11 in a child
    (one token per process: PyKCS11 reads SOFTHSM2_CONF once)."""
    code = r"""
import sys, PyKCS11
lib = PyKCS11.PyKCS11Lib(); lib.load(sys.argv[1])
slot = [s for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.strip() == sys.argv[2]]
assert len(slot) == 1, slot
s = lib.openSession(slot[0], PyKCS11.CKF_SERIAL_SESSION); s.login(sys.argv[3])
for o in s.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]):
    label, cka_id = s.getAttributeValue(o, [PyKCS11.CKA_LABEL, PyKCS11.CKA_ID], allAsBinary=True)
    kt = s.getAttributeValue(o, [PyKCS11.CKA_KEY_TYPE])[0]
    print("%s %s %s" % (bytes(label).decode(), PyKCS11.CKK[kt], bytes(cka_id).hex()))
s.logout(); s.closeSession()
"""
    r = subprocess.run(["/usr/bin/python3", "-c", code, h.SOFTHSM_MODULE, token.label,
                        token.user_pin()], env=dict(os.environ, SOFTHSM2_CONF=token.conf),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    eq(r.returncode, 0, "PyKCS11 listing of %s (stderr %r)" % (token.label, r.stderr))
    return sorted(tuple(l.split(" ")) for l in r.stdout.decode().splitlines())


def mount_tmpfs(path, size):
    """A tmpfs at path (made); None when it cannot be mounted (said in a diag by the caller)."""
    os.makedirs(path, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%s,mode=0700" % size, "tmpfs", path],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if r.returncode != 0:
        return r.stderr.decode(errors="replace").strip() or "mount exit status %d" % r.returncode
    C.mounts.append(path)
    return None


def umount(path):
    r = subprocess.run(["umount", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    eq(r.returncode, 0, "umount %s (%r)" % (path, r.stderr))
    C.mounts.remove(path)


# ---- start-up -------------------------------------------------------------------


@test
def test_missing_database_refused():
    cfg, db = config("missing")
    err = refused_start(cfg)
    check("p11kmsd init" in err, "stderr says to run p11kmsd init: %r" % err)
    check(db in err, "stderr names the database %s: %r" % (db, err))
    check(not os.path.exists(db), "the refused start made no database file")


@test
def test_not_a_database_refused():
    cfg, db = config("garbage")
    junk = random.Random(7).randbytes(3 * 4096)
    with open(db, "wb") as f:
        f.write(junk)
    os.chmod(db, 0o600)
    for command in ((), ("init",)):
        err = refused_start(cfg, command=command)
        check(db in err, "stderr of %r names the file %s: %r" % (command, db, err))
        check("not a database" in err, "stderr of %r says it is not a database: %r"
              % (command, err))
        with open(db, "rb") as f:
            eq(f.read() == junk, True, "the file is left as it was (after %r)" % (command,))
    eq(sorted(n for n in os.listdir(C.ws.path) if n.startswith("garbage.db")), ["garbage.db"],
       "no -wal or -shm file made beside it")


@test
def test_newer_schema_refused():
    cfg, db = config("newer")
    h.init_database(cfg, C.token)
    conn = db_connect(db, readonly=False)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    for command in ((), ("init",)):
        err = refused_start(cfg, command=command)
        check("newer" in err, "stderr of %r says the schema is newer: %r" % (command, err))
        check(db in err and "99" in err, "stderr of %r names %s and version 99: %r"
              % (command, db, err))
    conn = db_connect(db)
    eq(conn.execute("PRAGMA user_version").fetchone()[0], 99, "schema version left as it was")
    conn.close()


@test
def test_root_key_not_in_token_refused():
    cfg_a, db = config("tokens-a")
    h.init_database(cfg_a, C.token)
    token_b = h.make_token(C.ws.sub("token-b"), "p11kms-db-b")
    cfg_b, _ = config("tokens-b", token=token_b, database=db)
    conn = db_connect(db)
    label = conn.execute("SELECT label FROM roots").fetchone()[0]
    conn.close()
    err = refused_start(cfg_b, token=token_b)
    check("root key" in err and label in err, "stderr names the missing root key %s: %r"
          % (label, err))
    check(db in err, "stderr names the database %s: %r" % (db, err))
    err = refused_start(cfg_b, token=token_b, command=("init",))
    check(label in err and "token" in err, "init on token B names the missing root key: %r" % err)
    eq([k for k in token_secret_keys(token_b) if k[1] == "CKK_AES"], [],
       "AES keys p11kmsd made in token B")
    # token A still serves it
    s = start(cfg_a, init=False)
    create_key(s)
    s.stop()


@test
def test_unwritable_directory_refused():
    tried = 0
    if os.geteuid() != 0:
        d = C.ws.sub("ro-dir")
        os.mkdir(d)
        cfg, db = config("readonly-dir", database=os.path.join(d, "p11kms.db"))
        h.init_database(cfg, C.token)
        os.chmod(d, 0o500)
        try:
            err = refused_start(cfg)
        finally:
            os.chmod(d, 0o700)
        check(db in err, "stderr names the database %s: %r" % (db, err))
        tried += 1
    else:
        h.diag("running as root: the read-only directory case (chmod 0500) is not tried")
    # A read-only filesystem stops root too.
    mnt = C.ws.sub("ro-mount")
    why = mount_tmpfs(mnt, "4m")
    if why:
        h.diag("cannot mount a tmpfs (%s): the read-only filesystem case is not tried" % why)
    else:
        cfg, db = config("readonly-fs", database=os.path.join(mnt, "p11kms.db"))
        h.init_database(cfg, C.token)
        r = subprocess.run(["mount", "-o", "remount,ro", mnt], stderr=subprocess.PIPE)
        eq(r.returncode, 0, "remount read-only (%r)" % r.stderr)
        err = refused_start(cfg)
        check(db in err, "stderr names the database %s: %r" % (db, err))
        r = subprocess.run(["mount", "-o", "remount,rw", mnt], stderr=subprocess.PIPE)
        eq(r.returncode, 0, "remount read-write (%r)" % r.stderr)
        s = start(cfg, init=False)  # the same database, writable again
        create_key(s)
        s.stop()
        umount(mnt)
        tried += 1
    if not tried:
        raise h.Skip("neither the directory nor the filesystem can be made read-only here")


@test
def test_init_twice_one_root():
    token = h.make_token(C.ws.sub("token-c"), "p11kms-db-c")
    cfg, db = config("twice", token=token)
    first = h.init_database(cfg, token)
    second = h.init_database(cfg, token)
    for r in (first, second):
        no_secrets(r.stdout.decode() + r.stderr.decode(), "p11kmsd init's output")
    check("made root key p11kms-root:" in first.stderr.decode(),
          "the first init made the root key: %r" % first.stderr)
    check("made root key" not in second.stderr.decode()
          and "its root key is in the token" in second.stderr.decode(),
          "the second init made none: %r" % second.stderr)
    conn = db_connect(db)
    roots = conn.execute("SELECT hex(cka_id), label, state FROM roots").fetchall()
    conn.close()
    eq(len(roots), 1, "roots rows after two inits")
    aes = [k for k in token_secret_keys(token) if k[1] == "CKK_AES"]
    eq(aes, [(roots[0][1], "CKK_AES", roots[0][0].lower())],
       "AES keys in the token: the one root the database names")


# ---- run time -------------------------------------------------------------------


@test
def test_locked_database():
    cfg, db = config("locked", database_timeout_ms="300")
    s = start(cfg)
    key = create_key(s, "in use")
    other = create_key(s, "disabled")
    ok(call(s, "DisableKey", {"KeyId": other}), "DisableKey")
    ok(call(s, "CreateAlias", {"AliasName": "alias/db-kept", "TargetKeyId": key}), "CreateAlias")
    blobs = [encrypt(s, key), encrypt(s, key), generate(s, key)]
    before = list_keys(s)
    mark = len(s.stderr_text())
    failed = db_failures(s)

    holder = db_connect(db, readonly=False)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held by another process
    try:
        for op, params in (("CreateKey", {"Description": "while locked"}),
                           ("CreateAlias", {"AliasName": "alias/db-locked", "TargetKeyId": key}),
                           ("EnableKey", {"KeyId": other}),
                           ("UpdateAlias", {"AliasName": "alias/db-kept", "TargetKeyId": other}),
                           ("DeleteAlias", {"AliasName": "alias/db-kept"})):
            t0 = time.monotonic()
            r = call(s, op, params)
            took = time.monotonic() - t0
            error(r, "DependencyTimeoutException", 503, "%s while the database is locked" % op)
            check(took < ANSWER_BOUND, "%s answered after %.1f s" % (op, took))
        # the key in use: its block of uses is reserved; reads do not wait on a writer (WAL)
        for item in blobs:
            decrypt_ok(s, item)
        fresh = [generate(s, key), encrypt(s, key)]
        for item in fresh:
            decrypt_ok(s, item)
        blobs += fresh
        eq(describe(s, key)["KeyState"], "Enabled", "DescribeKey of the cached key")
        eq(describe(s, "alias/db-kept")["KeyId"], key, "DescribeKey through the alias")
        eq(describe(s, other)["KeyState"], "Disabled", "the key EnableKey could not change")
        eq(list_keys(s), before, "ListKeys while locked")
        now = db_failures(s)
        # The five refused writes at least (the key store's own work may add some); reads go on.
        check(now["write"] - failed["write"] >= 5,
              "p11kms_database_failures_total{kind=write} from %d to %d" % (failed["write"],
                                                                            now["write"]))
        eq(now["read"], failed["read"], "p11kms_database_failures_total{kind=read}")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    check_log(log_since(s, mark), "locked", extra_secrets=plaintexts(blobs))

    # nothing half done, and everything works again
    error(call(s, "DescribeKey", {"KeyId": "alias/db-locked"}), "NotFoundException", 404,
          "the alias whose CreateAlias answered 503")
    eq(describe(s, "alias/db-kept")["KeyId"], key, "the alias UpdateAlias and DeleteAlias left")
    eq(describe(s, other)["KeyState"], "Disabled", "the key EnableKey left")
    eq(list_keys(s), before, "ListKeys after the lock: no key from the refused CreateKey")
    made = create_key(s, "after the lock")
    ok(call(s, "CreateAlias", {"AliasName": "alias/db-locked", "TargetKeyId": made}),
       "CreateAlias after the lock")
    ok(call(s, "EnableKey", {"KeyId": other}), "EnableKey after the lock")
    eq(describe(s, other)["KeyState"], "Enabled", "EnableKey after the lock")
    eq(list_keys(s), sorted(before + [made]), "ListKeys after one more CreateKey")
    for item in blobs + [encrypt(s, made), encrypt(s, other)]:
        decrypt_ok(s, item)
    s.stop()
    db_sound(db)


def db_failures(server):
    """p11kms_database_failures_total by kind."""
    parsed = promtext.parse(h.get_metrics(server.endpoint).body.decode())
    return {k: promtext.value(parsed, "p11kms_database_failures_total", kind=k)
            for k in ("read", "write")}


def fill(directory):
    """Fills the filesystem of directory with one file; returns its path."""
    path = os.path.join(directory, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            data = b"\0" * chunk
            while True:
                try:
                    if os.write(fd, data) < chunk:
                        break
                except OSError:
                    break
        os.fsync(fd)
    finally:
        os.close(fd)
    eq(os.statvfs(directory).f_bavail, 0, "free blocks left on the filled filesystem")
    return path


@test
def test_full_disk():
    mnt = C.ws.sub("full-mount")
    why = mount_tmpfs(mnt, "8m")
    if why:
        h.diag("cannot mount a tmpfs (%s): the full-disk case is not tried" % why)
        raise h.Skip("no tmpfs")
    cfg, db = config("full", database=os.path.join(mnt, "p11kms.db"))
    s = start(cfg)
    try:
        key = create_key(s, "before the disk filled")
        ok(call(s, "CreateAlias", {"AliasName": "alias/db-full", "TargetKeyId": key}),
           "CreateAlias")
        blobs = [encrypt(s, key), generate(s, key)]
        before = list_keys(s)
        mark = len(s.stderr_text())
        failed = db_failures(s)
        filler = fill(mnt)
        # The write-ahead log may still have room for a transaction or two it
        # reuses; a write that needs a new page must fail, whole.
        landed, failure = [], None
        for n in range(20):
            r = call(s, "CreateKey", {"Description": "on a full disk %d" % n})
            if r.status == 200:
                landed.append(r.json()["KeyMetadata"]["KeyId"])
                continue
            doc = h.check_error_response(r, r.json().get("__type"), r.status)
            check((r.status, doc["__type"]) in ((500, "KMSInternalException"),
                                                (503, "DependencyTimeoutException")),
                  "CreateKey on a full disk: HTTP %d %r" % (r.status, doc))
            failure = doc
            break
        check(failure is not None, "20 CreateKey calls on a full disk all answered 200")
        h.diag("CreateKey on a full disk: %d answered 200 before one answered %s"
               % (len(landed), failure["__type"]))
        r = call(s, "CreateAlias", {"AliasName": "alias/db-full-2", "TargetKeyId": key})
        alias_landed = r.status == 200
        if not alias_landed:
            doc = h.check_error_response(r, r.json().get("__type"), r.status)
            check(r.status in (500, 503), "CreateAlias on a full disk: %d %r" % (r.status, doc))
        # The writes the full disk refused failed a statement or the commit: counted.
        now = db_failures(s)
        h.diag("p11kms_database_failures_total: %r, then %r" % (failed, now))
        check(now["write"] - failed["write"] >= (1 if alias_landed else 2),
              "p11kms_database_failures_total{kind=write} counts the refused writes: %r, then %r"
              % (failed, now))
        # the key in use needs no write
        fresh = [generate(s, key), encrypt(s, key)]
        for item in blobs + fresh:
            decrypt_ok(s, item)
        blobs += fresh
        eq(list_keys(s), sorted(before + landed), "ListKeys on a full disk")
        check_log(log_since(s, mark), "full", extra_secrets=plaintexts(blobs))
        os.unlink(filler)
        eq(list_keys(s), sorted(before + landed), "ListKeys after space is freed: no half-made key")
        if alias_landed:
            eq(describe(s, "alias/db-full-2")["KeyId"], key, "the alias that landed")
        else:
            error(call(s, "DescribeKey", {"KeyId": "alias/db-full-2"}), "NotFoundException", 404,
                  "the alias whose CreateAlias failed")
        made = create_key(s, "after space is freed")
        blobs.append(encrypt(s, made))
        for k in landed:
            blobs.append(encrypt(s, k))
        for item in blobs:
            decrypt_ok(s, item)
        db_sound(db)
        s.stop()
        # and after a restart, from what is on the disk
        s = start(cfg, init=False)
        eq(list_keys(s), sorted(before + landed + [made]), "ListKeys after a restart")
        for item in blobs:
            decrypt_ok(s, item)
        s.stop()
    finally:
        s.kill()
        umount(mnt)


def pages_of(db, tables):
    """The page numbers of tables and their indexes (dbstat)."""
    conn = db_connect(db)
    try:
        names = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_schema WHERE tbl_name IN (%s)" % ",".join("?" * len(tables)),
            tables)]
        pages = sorted({r[0] for r in conn.execute(
            "SELECT pageno FROM dbstat WHERE name IN (%s)" % ",".join("?" * len(names)), names)})
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    finally:
        conn.close()
    return pages, page_size


@test
def test_corrupt_at_run_time():
    # refresh_ms of a minute: no background read of the overwritten tables meanwhile, so the
    # database failures counted below are the requests'.
    cfg, db = config("corrupt", key_cache="4", refresh_ms="60000")
    s = start(cfg)
    keys = [create_key(s, "corrupt case %d %s" % (n, "x" * 300)) for n in range(40)]
    for n in range(10):
        ok(call(s, "CreateAlias", {"AliasName": "alias/db-c%d" % n, "TargetKeyId": keys[n]}),
           "CreateAlias")
    blobs = {k: encrypt(s, k) for k in keys}
    cached = keys[-4:]  # the last used: in the key cache of 4, their versions unwrapped
    for k in cached:
        decrypt_ok(s, blobs[k])
    # Writes stopped: the log checkpointed into the file, then pages of the
    # keys, versions and aliases tables overwritten.
    conn = db_connect(db, readonly=False)
    busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    conn.close()
    eq(busy, 0, "the checkpoint was not blocked")
    pages, page_size = pages_of(db, ["keys", "versions", "aliases"])
    check(1 not in pages and len(pages) >= 3, "pages to overwrite: %r" % pages)
    rng = random.Random(11)
    fd = os.open(db, os.O_WRONLY)
    try:
        for p in pages:
            os.pwrite(fd, rng.randbytes(page_size), (p - 1) * page_size)
        os.fsync(fd)
    finally:
        os.close(fd)
    # A write of the header page alone tells the server's connections their
    # cached pages are stale (it touches no overwritten page).
    conn = db_connect(db, readonly=False)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    conn.execute("PRAGMA user_version = %d" % version)
    conn.close()
    h.diag("overwrote %d pages of %d bytes: %r" % (len(pages), page_size, pages))
    mark = len(s.stderr_text())

    internal = ("KMSInternalException", 500)
    # cached keys: no database read; blobs open only when they are right
    for k in cached[:3]:
        decrypt_ok(s, blobs[k])
        item = generate(s, k)
        decrypt_ok(s, item)
        key, blob, pt, ctx = blobs[k]
        tampered = blob[:-1] + bytes([blob[-1] ^ 1])
        decrypt_error(s, (key, tampered, pt, ctx), INVALID_BLOB, 400)
        decrypt_error(s, (key, blob, pt, dict(ctx, case="other")), INVALID_BLOB, 400)
        eq(describe(s, k)["KeyId"], k, "DescribeKey of a cached key")
    # anything that reads or writes the overwritten tables: 500, never a wrong answer
    failed = db_failures(s)
    for op, params in (("ListKeys", {}),
                       ("CreateKey", {"Description": "on a corrupt database"}),
                       ("DescribeKey", {"KeyId": keys[0]}),
                       ("DescribeKey", {"KeyId": "alias/db-c1"}),
                       ("ListAliases", {}),
                       ("CreateAlias", {"AliasName": "alias/db-new", "TargetKeyId": cached[0]}),
                       ("DisableKey", {"KeyId": cached[3]}),
                       ("GenerateDataKey", {"KeyId": keys[1], "KeySpec": "AES_256"})):
        error(call(s, op, params), *internal, what="%s on a corrupt database" % op)
    for k in keys[:3]:  # not cached: read again, from the corrupt pages
        decrypt_error(s, blobs[k], *internal)
    # The DisableKey that failed changed nothing: the cached key still opens its blobs.
    decrypt_ok(s, blobs[cached[3]])
    made_up = bytearray(blobs[keys[0]][1])
    made_up[1:17] = uuid.uuid4().bytes
    decrypt_error(s, (keys[0], bytes(made_up), None, blobs[keys[0]][3]), *internal)
    # Each of those 12 answers is a transaction the database failed (a statement, not the
    # begin or the commit): p11kms_database_failures_total counts them.
    now = db_failures(s)
    h.diag("p11kms_database_failures_total: %r, then %r" % (failed, now))
    eq({k: now[k] - failed[k] for k in now}, {"read": 9, "write": 3},
       "p11kms_database_failures_total's growth: the 9 failed reads and 3 failed writes")
    check_log(log_since(s, mark), "malformed", extra_secrets=plaintexts(blobs.values()))
    s.stop()

    # A start on it: refused with a clear message, or served with the same 500s.
    log = cfg + ".restart.log"
    try:
        s = start(cfg, init=False, log=log)
    except RuntimeError as e:
        with open(log, encoding="utf-8", errors="replace") as f:
            err = f.read()
        check("exited with status 1 " in str(e), "a start on the corrupt database: %s" % e)
        check(db in err and "malformed" in err, "stderr names %s and says malformed: %r"
              % (db, err))
        no_secrets(err, "p11kmsd's output")
        clear_errors(err)
    else:
        h.diag("p11kmsd started on the corrupt database")
        error(call(s, "ListKeys", {}), *internal, what="ListKeys after a restart")
        decrypt_error(s, blobs[cached[0]], *internal)
        s.stop()


# ---- backup ---------------------------------------------------------------------


class Maker(threading.Thread):
    """Makes keys and blobs under them until stopped; records when each
    request was sent and answered."""

    def __init__(self, server, old_key):
        super().__init__(daemon=True)
        self.server = server
        self.old_key = old_key
        self.items = []   # (sent, answered, key id, blob item)
        self.errors = []
        self.stopping = threading.Event()

    def run(self):
        try:
            while not self.stopping.is_set():
                sent = time.monotonic()
                key = create_key(self.server, "made by the maker")
                self.items.append((sent, time.monotonic(), key, None))
                for target in (key, self.old_key):
                    sent = time.monotonic()
                    item = generate(self.server, target)
                    self.items.append((sent, time.monotonic(), target, item))
        except BaseException as e:  # noqa: B902 - reported by the test
            self.errors.append(repr(e))


def backup(cfg, out):
    r = subprocess.run([h.p11kmsd_path(), "backup", "--config", cfg, out], env=h.server_env(),
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=120)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


@test
def test_backup_and_restore():
    cfg, db = config("backup", rate_manage="0")  # the bulk keys come faster than the default
    out = C.ws.sub("backup-copy.db")
    s = start(cfg)
    old = [create_key(s, "before the backup %d" % n) for n in range(3)]
    ok(call(s, "CreateAlias", {"AliasName": "alias/db-before", "TargetKeyId": old[0]}),
       "CreateAlias")
    early = [encrypt(s, k) for k in old] + [generate(s, k) for k in old]
    # More pages than one step of the online backup copies (256), so that it
    # takes several steps while the maker writes.
    bulk = [create_key(s, "bulk %d %s" % (n, "b" * 4000)) for n in range(BULK_KEYS)]
    conn = db_connect(db)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.close()
    check(pages > 256, "the database has %d pages, fewer than one backup step" % pages)
    maker = Maker(s, old[1])
    maker.start()
    deadline = time.monotonic() + 60
    while len([i for i in maker.items if i[3] is None]) < 5 and not maker.errors:
        check(time.monotonic() < deadline, "the maker made 5 keys in 60 s")
        time.sleep(0.05)
    t0 = time.monotonic()
    status, stdout, stderr = backup(cfg, out)
    t1 = time.monotonic()
    h.diag("p11kmsd backup took %.2f s of a database of %d pages while the maker wrote"
           % (t1 - t0, pages))
    eq(status, 0, "p11kmsd backup's exit status (stderr %r)" % stderr)
    eq(stdout.strip(), "p11kmsd: backup of sqlite:%s written to %s" % (db, out), "its output")
    no_secrets(stdout + stderr, "p11kmsd backup's output")
    time.sleep(0.5)  # the maker goes on after the backup
    maker.stopping.set()
    maker.join(60)
    eq(maker.errors, [], "the maker's calls while the backup ran")
    before = [i for i in maker.items if i[1] < t0]
    after = [i for i in maker.items if i[0] > t1]
    check(after, "the maker made something after the backup")
    # changes after the backup
    late_alias = "alias/db-after"
    ok(call(s, "CreateAlias", {"AliasName": late_alias, "TargetKeyId": old[2]}), "CreateAlias")
    ok(call(s, "RotateKeyOnDemand", {"KeyId": old[2]}), "RotateKeyOnDemand")
    rotated = encrypt(s, old[2])  # under the version the rotation made
    eq(rotated[1][17:21] != early[2][1][17:21], True, "the blob after rotation names a new version")
    late_keys = sorted({i[2] for i in after if i[3] is None})
    late_blobs = [i[3] for i in after if i[3] is not None and i[2] in late_keys]

    # the copy: one sound file, not overwritten by a second backup
    eq(os.path.exists(out + "-wal"), False, "a -wal file beside the backup")
    conn = db_connect(db)
    try:
        live_version = conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()
    check(live_version >= 4, "the live database's schema version %d" % live_version)
    conn = db_connect(out)
    try:
        eq(conn.execute("PRAGMA integrity_check").fetchall(), [("ok",)], "the backup's integrity")
        eq(conn.execute("PRAGMA user_version").fetchone()[0], live_version,
           "the backup's schema version: the live database's")
        eq(conn.execute("PRAGMA journal_mode").fetchone()[0], "delete", "the backup's journal mode")
    finally:
        conn.close()
    eq(os.stat(out).st_mode & 0o077, 0, "the backup's mode: private")
    with open(out, "rb") as f:
        copy = f.read()
    status, stdout, stderr = backup(cfg, out)
    eq(status, 1, "exit status of a backup onto an existing file (stderr %r)" % stderr)
    check(out in stderr and "exists" in stderr, "stderr says %s exists: %r" % (out, stderr))
    with open(out, "rb") as f:
        eq(f.read() == copy, True, "the existing file is left as it was")

    # restore: stop, put the copy in place, start
    s.stop()
    shutil.copyfile(out, db)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(db + suffix):
            os.unlink(db + suffix)
    s = start(cfg, init=False)
    for item in early + [i[3] for i in before if i[3] is not None]:
        decrypt_ok(s, item)
    listed = list_keys(s)
    for k in old + bulk + [i[2] for i in before if i[3] is None]:
        check(k in listed, "key %s made before the backup is listed" % k)
    for k in late_keys:
        check(k not in listed, "key %s made after the backup is listed" % k)
        error(call(s, "DescribeKey", {"KeyId": k}), "NotFoundException", 404,
              "DescribeKey of a key made after the backup")
    for item in late_blobs:
        decrypt_error(s, item, INVALID_BLOB, 400)
    decrypt_error(s, rotated, INVALID_BLOB, 400)  # the rotation after the backup is lost
    error(call(s, "DescribeKey", {"KeyId": late_alias}), "NotFoundException", 404,
          "an alias made after the backup")
    eq(describe(s, "alias/db-before")["KeyId"], old[0], "an alias made before the backup")
    for k in old:
        decrypt_ok(s, encrypt(s, k))
    h.diag("restored: %d keys listed; %d keys and %d blobs from after the backup gone"
           % (len(listed), len(late_keys), len(late_blobs) + 1))
    s.stop()
    db_sound(db)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
