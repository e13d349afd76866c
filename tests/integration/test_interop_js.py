#!/usr/bin/python3
"""JavaScript clients against p11kmsd (issue 9). TAP output.

  - the AWS SDK for JavaScript v3 (@aws-sdk/client-kms, tests/interop/kms_sdk.mjs):
    CreateKey, DescribeKey, CreateAlias / ListAliases, GenerateDataKey / Decrypt /
    Encrypt / ReEncrypt with an encryption context; EnableKeyRotation with
    RotationPeriodInDays, GetKeyRotationStatus showing it, RotateKeyOnDemand and
    ListKeyRotations paged with Limit and Marker; the SDK's error classes and HTTP
    statuses (NotFoundException 404, DisabledException 409, KMSInvalidStateException 409,
    ValidationException 400, AlreadyExistsException 409, LimitExceededException 400);
    asymmetric and HMAC keys: Sign/Verify, GenerateMac/VerifyMac, GetPublicKey and
    DeriveSharedSecret (which botocore 1.29 lacks), checked against OpenSSL;
    its default retry strategy riding out ThrottlingException for a principal limited
    to one crypto call a second, with /metrics counting the throttled answers;
  - the AWS Encryption SDK for JavaScript (@aws-crypto/client-node,
    tests/interop/esdk_tool.mjs) with a KmsKeyringNode whose clientProvider gives a
    KMS client for p11kmsd: encrypt / decrypt with an encryption context, a generator
    key plus two more keys (GenerateDataKey, then Encrypt for each), decrypt through
    any one of them (Decrypt with KeyId), and a message made before RotateKeyOnDemand
    decrypting after it.

The packages come from tests/interop/package-lock.json (`npm ci`, which scripts/test.sh
runs); without tests/interop/node_modules (a release tarball) every case is skipped.
"""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

INTEROP = os.path.join(h.SRCDIR, "tests", "interop")
NODE = shutil.which("node") or "/usr/bin/node"
MODULES = ("@aws-sdk/client-kms", "@aws-crypto/client-node")
ROTATION_MIN_DAYS = 30
MAX_ON_DEMAND = 12
THROTTLED = "throttled"
CTX = {"tenant": "acm\u00e9", "purpose": "js-interop"}


class Ctx:
    ws = None
    principal = None
    throttled = None
    server = None
    kms = None
    started = False


C = Ctx()


def b64(b):
    return base64.b64encode(b).decode()


def unb64(s):
    return base64.b64decode(s)


def node_ready():
    return os.access(NODE, os.X_OK) and all(
        os.path.isdir(os.path.join(INTEROP, "node_modules", m)) for m in MODULES)


def lock_versions():
    with open(os.path.join(INTEROP, "package-lock.json")) as f:
        pkgs = json.load(f)["packages"]
    return {m: pkgs["node_modules/" + m]["version"] for m in MODULES + ("jose",)}


def server():
    """The shared p11kmsd, started by the first case that needs it; a case
    without the npm packages skips before getting here."""
    if not node_ready():
        raise h.Skip("the npm packages %s are not installed (npm ci --prefix tests/interop)"
                     % ", ".join(MODULES))
    if not C.started:
        C.started = True
        C.ws = h.Workspace()
        C.principal = h.new_principal("interop")
        C.throttled = h.new_principal(THROTTLED)
        token = h.make_token(C.ws.sub("token"), "p11kms-js")
        creds = h.write_credentials(C.ws.sub("credentials"), [C.principal, C.throttled])
        config = h.write_config(C.ws.sub("p11kmsd.conf"), token, creds, **{
            "rotation_min_days": str(ROTATION_MIN_DAYS),
            "max_on_demand_rotations": str(MAX_ON_DEMAND),
            "rate_crypto." + THROTTLED: "1",
            "burst_crypto." + THROTTLED: "1",
        })
        C.server = h.start_config_server(config, token, C.ws.sub("p11kmsd.log"))
        C.kms = h.kms_client(C.server.endpoint, C.principal)
        h.diag("p11kmsd serving %s" % C.server.endpoint)
        r = subprocess.run([NODE, "--version"], stdout=subprocess.PIPE, timeout=30)
        h.diag("node %s; %s" % (r.stdout.decode().strip(), ", ".join(
            "%s %s" % kv for kv in sorted(lock_versions().items()))))
    if C.server is None:
        raise AssertionError("p11kmsd did not start (see the first case)")
    return C.server


def node(tool, doc, timeout=120):
    # The SDK warns on stderr that its releases from 2027 on need node 22 (Debian 12 has
    # 20); the switch is the SDK's own. No shared AWS configuration is read.
    env = h.server_env({"AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED": "true",
                        "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"})
    r = subprocess.run([NODE, os.path.join(INTEROP, tool)], input=json.dumps(doc).encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=timeout)
    err = r.stderr.decode("utf-8", "replace")
    eq((r.returncode, err), (0, ""), "%s exit status and stderr" % tool)
    return json.loads(r.stdout)


def creds(principal):
    return {"endpoint": server().endpoint, "region": h.REGION,
            "accessKeyId": principal.access_key, "secretAccessKey": principal.secret}


def sdk(calls, principal=None, retry="off"):
    """Runs (op, input) pairs through @aws-sdk/client-kms; returns the results."""
    doc = dict(creds(principal or C.principal), retry=retry,
               calls=[{"op": op, "input": inp} for op, inp in calls])
    res = node("kms_sdk.mjs", doc)["results"]
    eq(len(res), len(calls), "results")
    return res


def ok(op, inp, **kw):
    (r,) = sdk([(op, inp)], **kw)
    check("ok" in r, "%s failed: %r" % (op, r.get("error")))
    eq((r["status"], r["attempts"]), (200, 1), "%s status and attempts" % op)
    return r["ok"]


def fails(op, inp, name, status):
    (r,) = sdk([(op, inp)])
    check("error" in r, "%s succeeded: %r; %s expected" % (op, r.get("ok"), name))
    e = r["error"]
    eq((e["name"], e["status"], e["fault"], e["attempts"]), (name, status, "client", 1),
       "%s: err.name, $metadata.httpStatusCode, $fault, attempts (message %r)"
       % (op, e["message"]))
    check(e["message"], "a message")
    return e


def arn_of(key_id):
    return "arn:aws:kms:%s:%s:key/%s" % (h.REGION, h.ACCOUNT, key_id)


def new_key(description):
    md = ok("CreateKey", {"Description": description})["KeyMetadata"]
    check(h.UUID_RE.match(md["KeyId"]), "KeyId is a UUID")
    eq(md["Arn"], arn_of(md["KeyId"]), "Arn")
    return md["Arn"]


def metrics():
    r = h.get_metrics(server().endpoint)
    eq(r.status, 200, "GET /metrics")
    return promtext.parse(r.body.decode("utf-8"))


def count_requests(after, before, operation, outcome):
    """p11kms_requests_total{operation, outcome} from before to after (an absent
    series is 0: only non-zero pairs are listed)."""
    def one(parsed):
        try:
            return promtext.value(parsed, "p11kms_requests_total", operation=operation,
                                  outcome=outcome)
        except KeyError:
            return 0
    return one(after) - one(before)


# ---- @aws-sdk/client-kms ------------------------------------------------------------------


@test
def test_sdk_describe_alias_data_keys():
    server()
    t0 = time.time()
    md = ok("CreateKey", {"Description": "js sdk"})["KeyMetadata"]
    t1 = time.time()
    arn = md["Arn"]
    check(t0 - 1 <= md["CreationDate"] <= t1 + 1, "CreationDate %r is now" % md["CreationDate"])
    got = ok("DescribeKey", {"KeyId": arn})["KeyMetadata"]
    eq(got, md, "DescribeKey's KeyMetadata equals CreateKey's")
    eq({k: got[k] for k in ("AWSAccountId", "Description", "Enabled", "KeyState", "KeyUsage",
                            "KeySpec", "CustomerMasterKeySpec", "Origin", "KeyManager",
                            "EncryptionAlgorithms", "MultiRegion")},
       {"AWSAccountId": h.ACCOUNT, "Description": "js sdk", "Enabled": True,
        "KeyState": "Enabled", "KeyUsage": "ENCRYPT_DECRYPT", "KeySpec": "SYMMETRIC_DEFAULT",
        "CustomerMasterKeySpec": "SYMMETRIC_DEFAULT", "Origin": "AWS_KMS",
        "KeyManager": "CUSTOMER", "EncryptionAlgorithms": ["SYMMETRIC_DEFAULT"],
        "MultiRegion": False}, "KeyMetadata members")

    eq(ok("CreateAlias", {"AliasName": "alias/js-orders", "TargetKeyId": md["KeyId"]}), {},
       "CreateAlias output")
    aliases = ok("ListAliases", {"KeyId": arn})
    eq(aliases["Truncated"], False, "Truncated")
    eq([(a["AliasName"], a["AliasArn"], a["TargetKeyId"]) for a in aliases["Aliases"]],
       [("alias/js-orders", "arn:aws:kms:%s:%s:alias/js-orders" % (h.REGION, h.ACCOUNT),
         md["KeyId"])], "ListAliases")
    eq(ok("DescribeKey", {"KeyId": "alias/js-orders"})["KeyMetadata"]["Arn"], arn,
       "DescribeKey by alias")

    dk = ok("GenerateDataKey", {"KeyId": "alias/js-orders", "KeySpec": "AES_256",
                                "EncryptionContext": CTX})
    eq(sorted(dk), ["CiphertextBlob", "KeyId", "Plaintext"], "GenerateDataKey members")
    eq((dk["KeyId"], len(unb64(dk["Plaintext"]))), (arn, 32), "GenerateDataKey KeyId, key size")
    eq(ok("Decrypt", {"CiphertextBlob": dk["CiphertextBlob"], "EncryptionContext": CTX,
                      "KeyId": arn}),
       {"KeyId": arn, "Plaintext": dk["Plaintext"], "EncryptionAlgorithm": "SYMMETRIC_DEFAULT"},
       "Decrypt of the data key")
    eq(len(unb64(ok("GenerateDataKey", {"KeyId": arn, "NumberOfBytes": 17})["Plaintext"])),
       17, "NumberOfBytes")

    secret = os.urandom(100)
    enc = ok("Encrypt", {"KeyId": md["KeyId"], "Plaintext": b64(secret), "EncryptionContext": CTX})
    eq((enc["KeyId"], enc["EncryptionAlgorithm"]), (arn, "SYMMETRIC_DEFAULT"), "Encrypt")
    other = new_key("js sdk re-encrypt target")
    re = ok("ReEncrypt", {"CiphertextBlob": enc["CiphertextBlob"], "SourceEncryptionContext": CTX,
                          "DestinationKeyId": other,
                          "DestinationEncryptionContext": {"moved": "yes"}})
    eq({k: re[k] for k in re if k != "CiphertextBlob"},
       {"SourceKeyId": arn, "KeyId": other, "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
        "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT"}, "ReEncrypt")
    eq(ok("Decrypt", {"CiphertextBlob": re["CiphertextBlob"],
                      "EncryptionContext": {"moved": "yes"}})["Plaintext"], b64(secret),
       "Decrypt after ReEncrypt")
    # And boto3 reads what the JavaScript SDK made.
    eq(C.kms.decrypt(CiphertextBlob=unb64(enc["CiphertextBlob"]),
                     EncryptionContext=CTX)["Plaintext"], secret, "boto3 Decrypt")


@test
def test_sdk_rotation_period_on_demand_and_pages():
    server()
    arn = new_key("js rotation")
    before = ok("Encrypt", {"KeyId": arn, "Plaintext": b64(b"before rotations")})
    eq(ok("GetKeyRotationStatus", {"KeyId": arn}), {"KeyRotationEnabled": False, "KeyId": arn},
       "rotation status before")
    period = ROTATION_MIN_DAYS + 7
    t0 = time.time()
    eq(ok("EnableKeyRotation", {"KeyId": arn, "RotationPeriodInDays": period}), {},
       "EnableKeyRotation output")
    t1 = time.time()
    st = ok("GetKeyRotationStatus", {"KeyId": arn})
    eq(sorted(st), ["KeyId", "KeyRotationEnabled", "NextRotationDate", "RotationPeriodInDays"],
       "GetKeyRotationStatus members")
    eq((st["KeyId"], st["KeyRotationEnabled"], st["RotationPeriodInDays"]), (arn, True, period),
       "GetKeyRotationStatus")
    check(t0 - 2 + period * 86400 <= st["NextRotationDate"] <= t1 + 2 + period * 86400,
          "NextRotationDate %r is %d days from now" % (st["NextRotationDate"], period))
    fails("EnableKeyRotation", {"KeyId": arn, "RotationPeriodInDays": ROTATION_MIN_DAYS - 1},
          "ValidationException", 400)

    n = 5
    for _ in range(n):
        eq(ok("RotateKeyOnDemand", {"KeyId": arn}), {"KeyId": arn}, "RotateKeyOnDemand")
    pages, marker = [], None
    while True:
        page = ok("ListKeyRotations", dict({"KeyId": arn, "Limit": 2},
                                           **({"Marker": marker} if marker else {})))
        pages.append(page)
        if not page["Truncated"]:
            check("NextMarker" not in page, "no NextMarker on the last page")
            break
        check(page["NextMarker"], "NextMarker on a truncated page")
        marker = page["NextMarker"]
    eq([len(p["Rotations"]) for p in pages], [2, 2, 1], "page sizes")
    rots = [r for p in pages for r in p["Rotations"]]
    eq({(r["KeyId"], r["RotationType"]) for r in rots}, {(arn, "ON_DEMAND")}, "rotations")
    dates = [r["RotationDate"] for r in rots]
    check(all(isinstance(d, (int, float)) and abs(d - time.time()) < 60 for d in dates),
          "RotationDate is now: %r" % dates)
    eq(dates, sorted(dates), "rotations listed oldest first")
    whole = ok("ListKeyRotations", {"KeyId": arn})
    eq((whole["Rotations"], whole["Truncated"]), (rots, False), "one page equals the pages")
    # The blob made under the first version still decrypts.
    eq(ok("Decrypt", {"CiphertextBlob": before["CiphertextBlob"]})["Plaintext"],
       b64(b"before rotations"), "Decrypt across rotations")
    eq(ok("GetKeyRotationStatus", {"KeyId": arn})["RotationPeriodInDays"], period,
       "the period after on-demand rotations")


@test
def test_sdk_asymmetric_and_hmac_keys():
    """The SDK's own commands for asymmetric and HMAC keys, DeriveSharedSecret among them
    (botocore 1.29 and aws CLI 2.9 do not have it): CreateKey with KeySpec and KeyUsage,
    GetPublicKey, Sign and Verify (ECDSA, RAW), GenerateMac and VerifyMac (HMAC_SHA_384),
    DeriveSharedSecret equal to OpenSSL's ECDH with an ephemeral key; a one-bit change of
    the signature or the MAC is KMSInvalidSignatureException or KMSInvalidMacException."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    server()
    sign = ok("CreateKey", {"KeySpec": "ECC_NIST_P256", "KeyUsage": "SIGN_VERIFY"})["KeyMetadata"]
    eq((sign["KeySpec"], sign["KeyUsage"], sign["SigningAlgorithms"]),
       ("ECC_NIST_P256", "SIGN_VERIFY", ["ECDSA_SHA_256"]), "the signing key's metadata")
    message = b"js interop: signed"
    sig = ok("Sign", {"KeyId": sign["KeyId"], "Message": b64(message), "MessageType": "RAW",
                      "SigningAlgorithm": "ECDSA_SHA_256"})
    pub = serialization.load_der_public_key(unb64(ok("GetPublicKey", {"KeyId": sign["KeyId"]})[
        "PublicKey"]))
    pub.verify(unb64(sig["Signature"]), message, ec.ECDSA(hashes.SHA256()))  # raises if not
    got = ok("Verify", {"KeyId": sign["KeyId"], "Message": b64(message), "MessageType": "RAW",
                        "Signature": sig["Signature"], "SigningAlgorithm": "ECDSA_SHA_256"})
    eq(got["SignatureValid"], True, "Verify of Sign's signature")
    bad = bytearray(unb64(sig["Signature"]))
    bad[-1] ^= 1
    fails("Verify", {"KeyId": sign["KeyId"], "Message": b64(message), "MessageType": "RAW",
                     "Signature": b64(bytes(bad)), "SigningAlgorithm": "ECDSA_SHA_256"},
          "KMSInvalidSignatureException", 400)

    mac_key = ok("CreateKey", {"KeySpec": "HMAC_384", "KeyUsage": "GENERATE_VERIFY_MAC"})[
        "KeyMetadata"]["KeyId"]
    mac = ok("GenerateMac", {"KeyId": mac_key, "Message": b64(message),
                             "MacAlgorithm": "HMAC_SHA_384"})
    eq(len(unb64(mac["Mac"])), 48, "an HMAC-SHA-384 tag")
    eq(ok("VerifyMac", {"KeyId": mac_key, "Message": b64(message), "Mac": mac["Mac"],
                        "MacAlgorithm": "HMAC_SHA_384"})["MacValid"], True, "VerifyMac")
    bad = bytearray(unb64(mac["Mac"]))
    bad[0] ^= 0x80
    fails("VerifyMac", {"KeyId": mac_key, "Message": b64(message), "Mac": b64(bytes(bad)),
                        "MacAlgorithm": "HMAC_SHA_384"}, "KMSInvalidMacException", 400)

    agree = ok("CreateKey", {"KeySpec": "ECC_NIST_P256", "KeyUsage": "KEY_AGREEMENT"})[
        "KeyMetadata"]["KeyId"]
    kms_pub = serialization.load_der_public_key(
        unb64(ok("GetPublicKey", {"KeyId": agree})["PublicKey"]))
    mine = ec.generate_private_key(ec.SECP256R1())
    peer = mine.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    got = ok("DeriveSharedSecret", {"KeyId": agree, "KeyAgreementAlgorithm": "ECDH",
                                    "PublicKey": b64(peer)})
    eq(unb64(got["SharedSecret"]), mine.exchange(ec.ECDH(), kms_pub),
       "DeriveSharedSecret equals OpenSSL's ECDH")
    eq((got["KeyId"], got["KeyAgreementAlgorithm"], got["KeyOrigin"]),
       (arn_of(agree), "ECDH", "AWS_KMS"), "DeriveSharedSecret's other members")


@test
def test_sdk_error_names_and_statuses():
    server()
    missing = arn_of(str(uuid.uuid4()))
    fails("DescribeKey", {"KeyId": missing}, "NotFoundException", 404)
    fails("Encrypt", {"KeyId": "alias/js-none", "Plaintext": b64(b"x")}, "NotFoundException", 404)
    arn = new_key("js errors")
    fails("GenerateDataKey", {"KeyId": arn, "NumberOfBytes": 1025}, "ValidationException", 400)
    fails("GenerateDataKey", {"KeyId": arn}, "ValidationException", 400)
    fails("Decrypt", {"CiphertextBlob": b64(b"\x01" + os.urandom(60))},
          "InvalidCiphertextException", 400)
    ok("CreateAlias", {"AliasName": "alias/js-taken", "TargetKeyId": arn})
    fails("CreateAlias", {"AliasName": "alias/js-taken", "TargetKeyId": arn},
          "AlreadyExistsException", 409)
    blob = ok("Encrypt", {"KeyId": arn, "Plaintext": b64(b"y")})["CiphertextBlob"]
    ok("DisableKey", {"KeyId": arn})
    fails("Encrypt", {"KeyId": arn, "Plaintext": b64(b"x")}, "DisabledException", 409)
    fails("Decrypt", {"CiphertextBlob": blob}, "DisabledException", 409)
    ok("EnableKey", {"KeyId": arn})
    ok("ScheduleKeyDeletion", {"KeyId": arn, "PendingWindowInDays": 7})
    fails("Encrypt", {"KeyId": arn, "Plaintext": b64(b"x")}, "KMSInvalidStateException", 409)
    ok("CancelKeyDeletion", {"KeyId": arn})
    # On-demand rotations beyond max_on_demand_rotations.
    ok("EnableKey", {"KeyId": arn})
    res = sdk([("RotateKeyOnDemand", {"KeyId": arn})] * (MAX_ON_DEMAND + 1))
    eq([("ok" in r) for r in res], [True] * MAX_ON_DEMAND + [False], "rotations allowed")
    e = res[-1]["error"]
    eq((e["name"], e["status"], e["attempts"]), ("LimitExceededException", 400, 1),
       "the rotation over the limit")


@test
def test_sdk_default_retry_rides_out_throttling():
    server()
    name = "GenerateRandom"
    before = metrics()
    t0 = time.monotonic()
    res = sdk([(name, {"NumberOfBytes": 16})] * 4, principal=C.throttled, retry="default")
    took = time.monotonic() - t0
    h.diag("attempts %r in %.1f s" % ([r.get("attempts") for r in res], took))
    for r in res:
        check("ok" in r, "a call failed: %r" % r.get("error"))
        eq((r["status"], len(unb64(r["ok"]["Plaintext"]))), (200, 16), "GenerateRandom")
    check(any(r["attempts"] > 1 for r in res), "the SDK retried at least once")
    after = metrics()
    throttled = count_requests(after, before, name, "ThrottlingException")
    eq(throttled, sum(r["attempts"] - 1 for r in res),
       "ThrottlingException answers counted = the SDK's retries")
    check(throttled > 0, "throttled answers counted")
    eq(count_requests(after, before, name, "ok"), 4, "ok answers counted")
    # With retries off the same burst shows the SDK's error class and status.
    res = sdk([(name, {"NumberOfBytes": 16})] * 3, principal=C.throttled, retry="off")
    errs = [r["error"] for r in res if "error" in r]
    check(errs, "a throttled call with retries off")
    eq({(e["name"], e["status"], e["attempts"]) for e in errs},
       {("ThrottlingException", 429, 1)}, "ThrottlingException with retries off")


# ---- @aws-crypto/client-node ----------------------------------------------------------------


def esdk(op, data, generator=None, key_ids=(), context=None, principal=None):
    doc = dict(creds(principal or C.principal), op=op, input=b64(data), keyIds=list(key_ids))
    if generator:
        doc["generatorKeyId"] = generator
    if context is not None:
        doc["context"] = context
    return node("esdk_tool.mjs", doc)


def esdk_ok(*args, **kw):
    r = esdk(*args, **kw)
    check("error" not in r, "Encryption SDK failed: %r (KMS calls %r)" % (r.get("error"), r["kms"]))
    return r


@test
def test_esdk_encrypt_decrypt_with_context():
    server()
    arn = new_key("esdk single")
    payload = os.urandom(5000)
    m = esdk_ok("encrypt", payload, generator=arn, context=CTX)
    eq(m["keys"], [{"providerId": "aws-kms", "providerInfo": arn}], "encrypted data keys")
    eq({k: v for k, v in m["context"].items() if k != "aws-crypto-public-key"}, CTX,
       "the message's encryption context")
    eq([c["op"] for c in m["kms"]], ["GenerateDataKey"], "KMS calls on encrypt")
    eq((m["kms"][0]["KeyId"], m["kms"][0]["context"]), (arn, m["context"]),
       "GenerateDataKey's KeyId and EncryptionContext")
    d = esdk_ok("decrypt", unb64(m["output"]), key_ids=[arn], context=CTX)
    eq(unb64(d["output"]), payload, "plaintext")
    eq(d["context"], m["context"], "decrypted message's context")
    eq([(c["op"], c["KeyId"]) for c in d["kms"]], [("Decrypt", arn)], "KMS calls on decrypt")
    # The ESDK for JavaScript takes no expected context on decrypt: the caller compares
    # the message's (esdk_tool.mjs does, as the ESDK's documentation shows).
    bad = esdk("decrypt", unb64(m["output"]), key_ids=[arn], context={"tenant": "other"})
    eq(bad.get("error", {}).get("name"), "EncryptionContextMismatch", "another context")
    # An altered body fails the SDK's own check; a changed context pair in the header
    # changes what KMS authenticates (the EDK's context), so p11kmsd refuses the Decrypt.
    raw = bytearray(unb64(m["output"]))
    raw[-200] ^= 1
    bad = esdk("decrypt", bytes(raw), key_ids=[arn])
    check("error" in bad, "an altered message decrypted")
    raw = unb64(m["output"])
    i = raw.find(b"js-interop")
    check(i > 0, "the context value in the header")
    before = metrics()
    bad = esdk("decrypt", raw[:i] + b"js-interoq" + raw[i + 10:], key_ids=[arn])
    h.diag("ESDK error: %s" % (bad.get("error") or {}).get("message", "").splitlines()[:3])
    eq([c["op"] for c in bad["kms"]], ["Decrypt"], "KMS calls")
    check("error" in bad and "InvalidCiphertextException" in bad["error"]["message"],
          "the ESDK's error names KMS's InvalidCiphertextException: %r" % bad.get("error"))
    eq(count_requests(metrics(), before, "Decrypt", "InvalidCiphertextException"), 1,
       "p11kmsd answered InvalidCiphertextException")


@test
def test_esdk_generator_and_more_keys():
    server()
    gen, k2, k3 = (new_key("esdk multi %d" % i) for i in range(3))
    payload = b"several keys " * 100
    m = esdk_ok("encrypt", payload, generator=gen, key_ids=[k2, k3], context=CTX)
    eq([k["providerInfo"] for k in m["keys"]], [gen, k2, k3], "encrypted data keys in order")
    eq([(c["op"], c["KeyId"]) for c in m["kms"]],
       [("GenerateDataKey", gen), ("Encrypt", k2), ("Encrypt", k3)], "KMS calls on encrypt")
    for k in (gen, k2, k3):
        d = esdk_ok("decrypt", unb64(m["output"]), key_ids=[k])
        eq(unb64(d["output"]), payload, "plaintext through %s" % k)
        eq([(c["op"], c["KeyId"]) for c in d["kms"]], [("Decrypt", k)], "KMS calls on decrypt")
    # A keyring naming only a key the message was not made for cannot decrypt.
    other = new_key("esdk other")
    bad = esdk("decrypt", unb64(m["output"]), key_ids=[other])
    check("error" in bad, "decrypt through an unrelated key succeeded")
    eq(bad["kms"], [], "no KMS call for an unrelated key")


@test
def test_esdk_message_before_rotation_decrypts_after():
    server()
    arn = new_key("esdk rotation")
    payload = b"made under version 1"
    m = esdk_ok("encrypt", payload, generator=arn, context=CTX)
    eq(ok("RotateKeyOnDemand", {"KeyId": arn}), {"KeyId": arn}, "RotateKeyOnDemand")
    eq(len(ok("ListKeyRotations", {"KeyId": arn})["Rotations"]), 1, "one rotation")
    d = esdk_ok("decrypt", unb64(m["output"]), key_ids=[arn], context=CTX)
    eq(unb64(d["output"]), payload, "plaintext after rotation")
    # And a message made after the rotation, under the new version.
    m2 = esdk_ok("encrypt", payload, generator=arn, context=CTX)
    eq(unb64(esdk_ok("decrypt", unb64(m2["output"]), key_ids=[arn])["output"]), payload,
       "new message")


def teardown():
    h.finish(T, C.ws, C.server)


if __name__ == "__main__":
    sys.exit(T.run(None, teardown))
