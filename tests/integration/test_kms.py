#!/usr/bin/python3
"""p11kmsd from a configuration file, against a fresh SoftHSM2 token: the KMS
operations through boto3, their errors, SigV4 through raw HTTP, the KEK's
PKCS#11 attributes, and the credentials-file permission check. TAP output."""

import base64
import datetime
import json
import os
import sys
import sqlite3
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import botocore.exceptions  # noqa: E402

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test


class Ctx:
    ws = None
    token = None
    principal = None
    config = None
    server = None
    kms = None
    key = None       # KeyMetadata of the main key
    other = None     # KeyMetadata of a second key


C = Ctx()
ALIAS = "alias/it-main"
ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)
CONTEXT = {"purpose": "integration-test", "tenant": "acme"}
BLOB_OVERHEAD = 1 + 16 + 4 + 12 + 16
VERSION_IDS = {}  # key id -> the 4-byte version id its blobs carry


def setup():
    C.ws = h.Workspace()
    C.principal = h.new_principal("tester")
    C.token, C.config = h.token_and_config(C.ws, "p11kms-it", C.principal)
    C.database = C.config + ".db"
    C.server = h.start_config_server(C.config, C.token, C.ws.sub("p11kmsd.log"))
    C.kms = h.kms_client(C.server.endpoint, C.principal)
    h.diag("p11kmsd serving %s" % C.server.endpoint)


def teardown():
    h.finish(T, C.ws, C.server)


def arn(key_id):
    return ARN_PREFIX + "key/" + key_id


def err(fn, **kw):
    code, status, _ = h.client_error(fn, **kw)
    return code, status


def raw_or_boto_error(operation, params, boto_fn, boto_params):
    """Calls through boto3; when botocore refuses the parameters itself, sends
    the request raw (signed) so the server's own answer is checked. Returns
    (code, status)."""
    try:
        return err(boto_fn, **boto_params)
    except botocore.exceptions.ParamValidationError:
        h.diag("botocore validated %s client-side; sending it raw" % operation)
        r = h.kms_call(C.server.endpoint, operation, params, C.principal)
        doc = h.check_error_response(r, r.json().get("__type"), r.status)
        return doc["__type"], r.status


def b64(data):
    return base64.b64encode(data).decode()


# ---- keys and aliases -----------------------------------------------------------


@test
def test_create_key_metadata():
    before = datetime.datetime.now(datetime.timezone.utc)
    md = C.kms.create_key(Description="integration main key")["KeyMetadata"]
    check(h.UUID_RE.match(md["KeyId"]), "KeyId %r is a lower-case UUID" % md["KeyId"])
    eq(md["Arn"], "arn:aws:kms:us-east-1:%s:key/%s" % (h.ACCOUNT, md["KeyId"]), "Arn")
    eq(md["AWSAccountId"], h.ACCOUNT, "AWSAccountId")
    eq(md["KeyState"], "Enabled", "KeyState")
    eq(md["Enabled"], True, "Enabled")
    eq(md["KeySpec"], "SYMMETRIC_DEFAULT", "KeySpec")
    eq(md["CustomerMasterKeySpec"], "SYMMETRIC_DEFAULT", "CustomerMasterKeySpec")
    eq(md["KeyUsage"], "ENCRYPT_DECRYPT", "KeyUsage")
    eq(md["EncryptionAlgorithms"], ["SYMMETRIC_DEFAULT"], "EncryptionAlgorithms")
    eq(md["Origin"], "AWS_KMS", "Origin")
    eq(md["KeyManager"], "CUSTOMER", "KeyManager")
    eq(md["Description"], "integration main key", "Description")
    eq(md["MultiRegion"], False, "MultiRegion")
    created = md["CreationDate"]
    check(before - datetime.timedelta(seconds=5) <= created
          <= datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=5),
          "CreationDate %s is now" % created)
    C.key = md
    C.other = C.kms.create_key(Description="integration other key")["KeyMetadata"]
    check(C.other["KeyId"] != md["KeyId"], "two keys have two ids")


@test
def test_create_and_list_alias():
    resp = C.kms.create_alias(AliasName=ALIAS, TargetKeyId=C.key["KeyId"])
    eq(resp["ResponseMetadata"]["HTTPStatusCode"], 200, "CreateAlias status")
    eq(sorted(k for k in resp if k != "ResponseMetadata"), [], "CreateAlias answers nothing")
    aliases = C.kms.list_aliases()["Aliases"]
    mine = [a for a in aliases if a["AliasName"] == ALIAS]
    eq(len(mine), 1, "ListAliases entries named %s" % ALIAS)
    eq(mine[0]["TargetKeyId"], C.key["KeyId"], "TargetKeyId")
    eq(mine[0]["AliasArn"], ARN_PREFIX + ALIAS, "AliasArn")
    eq(sorted(a["AliasName"] for a in aliases), [ALIAS], "all aliases on the token")
    # filtered by key, by id and by ARN
    for ref in (C.key["KeyId"], C.key["Arn"]):
        listed = C.kms.list_aliases(KeyId=ref)
        eq([a["AliasName"] for a in listed["Aliases"]], [ALIAS], "ListAliases(KeyId=%s)" % ref)
        eq(listed["Truncated"], False, "Truncated")
    eq(C.kms.list_aliases(KeyId=C.other["KeyId"])["Aliases"], [], "aliases of the other key")


@test
def test_describe_key_by_every_name():
    refs = [C.key["KeyId"], C.key["Arn"], ALIAS, ARN_PREFIX + ALIAS]
    for ref in refs:
        md = C.kms.describe_key(KeyId=ref)["KeyMetadata"]
        eq(md["KeyId"], C.key["KeyId"], "DescribeKey(%s).KeyId" % ref)
        eq(md["Arn"], C.key["Arn"], "DescribeKey(%s).Arn" % ref)
        eq(md["Description"], "integration main key", "DescribeKey(%s).Description" % ref)


@test
def test_create_alias_errors():
    eq(err(C.kms.create_alias, AliasName=ALIAS, TargetKeyId=C.key["KeyId"]),
       ("AlreadyExistsException", 409), "the same alias again")
    eq(err(C.kms.create_alias, AliasName=ALIAS, TargetKeyId=C.other["KeyId"]),
       ("AlreadyExistsException", 409), "the alias for another key")
    eq(err(C.kms.create_alias, AliasName="alias/aws/x", TargetKeyId=C.key["KeyId"]),
       ("InvalidAliasNameException", 400), "alias/aws/x")
    for bad in ("alias/has space", "alias/caf\u00e9", "orders", "alias/", "alias/a*b"):
        eq(err(C.kms.create_alias, AliasName=bad, TargetKeyId=C.key["KeyId"]),
           ("ValidationException", 400), "alias name %r" % bad)
    eq(err(C.kms.create_alias, AliasName="alias/it-" + "x" * 248, TargetKeyId=C.key["KeyId"]),
       ("ValidationException", 400), "a 257-character alias name")
    eq(err(C.kms.create_alias, AliasName="alias/it-nokey", TargetKeyId=str(uuid.uuid4())),
       ("NotFoundException", 404), "an alias for a key that does not exist")
    # nothing of that was created
    eq(sorted(a["AliasName"] for a in C.kms.list_aliases()["Aliases"]), [ALIAS], "aliases")


# ---- data keys, encrypt, decrypt ------------------------------------------------


def check_blob_header(blob, key_id, plaintext_len):
    eq(len(blob), BLOB_OVERHEAD + plaintext_len, "blob length")
    eq(blob[0], 1, "blob format version")
    eq(blob[1:17], uuid.UUID(key_id).bytes, "blob key id")
    # The version field is the version's random 32-bit id: never 0, and one
    # value for every blob made under the key's (single) version.
    vid = blob[17:21]
    check(vid != b"\x00\x00\x00\x00", "blob key version id is not 0")
    eq(VERSION_IDS.setdefault(key_id, vid), vid, "blob key version id of %s" % key_id)


@test
def test_generate_data_key_and_decrypt():
    for ref in (C.key["KeyId"], ALIAS, C.key["Arn"], ARN_PREFIX + ALIAS):
        r = C.kms.generate_data_key(KeyId=ref, KeySpec="AES_256", EncryptionContext=CONTEXT)
        eq(r["KeyId"], C.key["Arn"], "GenerateDataKey(%s).KeyId" % ref)
        eq(len(r["Plaintext"]), 32, "AES_256 data key length")
        check_blob_header(r["CiphertextBlob"], C.key["KeyId"], 32)
        d = C.kms.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext=CONTEXT)
        eq(d["Plaintext"], r["Plaintext"], "decrypted data key")
        eq(d["KeyId"], C.key["Arn"], "Decrypt.KeyId")
        eq(d["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT", "Decrypt.EncryptionAlgorithm")
        # Decrypt naming the right key, by every name
        d = C.kms.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext=CONTEXT, KeyId=ref)
        eq(d["Plaintext"], r["Plaintext"], "decrypted with KeyId=%s" % ref)
        eq(d["KeyId"], C.key["Arn"], "Decrypt(KeyId=%s).KeyId" % ref)

    r = C.kms.generate_data_key(KeyId=ALIAS, NumberOfBytes=64, EncryptionContext=CONTEXT)
    eq(len(r["Plaintext"]), 64, "NumberOfBytes=64")
    eq(r["KeyId"], C.key["Arn"], "KeyId")
    check_blob_header(r["CiphertextBlob"], C.key["KeyId"], 64)
    eq(C.kms.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext=CONTEXT)["Plaintext"],
       r["Plaintext"], "64-byte data key")

    r = C.kms.generate_data_key(KeyId=ALIAS, KeySpec="AES_128")
    eq(len(r["Plaintext"]), 16, "AES_128 data key length")
    eq(C.kms.decrypt(CiphertextBlob=r["CiphertextBlob"])["Plaintext"], r["Plaintext"],
       "no context")

    keys = {C.kms.generate_data_key(KeyId=ALIAS, KeySpec="AES_256")["Plaintext"] for _ in range(8)}
    eq(len(keys), 8, "distinct data keys")

    eq(err(C.kms.generate_data_key, KeyId=ALIAS, KeySpec="AES_256", NumberOfBytes=32),
       ("ValidationException", 400), "both KeySpec and NumberOfBytes")
    eq(err(C.kms.generate_data_key, KeyId=ALIAS), ("ValidationException", 400),
       "neither KeySpec nor NumberOfBytes")
    eq(err(C.kms.generate_data_key, KeyId=ALIAS, NumberOfBytes=1025),
       ("ValidationException", 400), "NumberOfBytes=1025")


def flip(blob, i, bit=0x01):
    b = bytearray(blob)
    b[i] ^= bit
    return bytes(b)


@test
def test_decrypt_refuses_tampering():
    r = C.kms.generate_data_key(KeyId=ALIAS, KeySpec="AES_256", EncryptionContext=CONTEXT)
    blob = r["CiphertextBlob"]
    invalid = ("InvalidCiphertextException", 400)

    contexts = {
        "a value differing in its last byte": dict(CONTEXT, tenant="acmf"),
        "a value differing in its first byte": dict(CONTEXT, tenant="bcme"),
        "a key differing in one byte": {"purpose": "integration-test", "tenanT": "acme"},
        "an extra pair": dict(CONTEXT, extra="1"),
        "a pair missing": {"purpose": "integration-test"},
        "an empty context": {},
        "key and value swapped across pairs": {"purpose": "acme", "tenant": "integration-test"},
    }
    for what, ctx in contexts.items():
        eq(err(C.kms.decrypt, CiphertextBlob=blob, EncryptionContext=ctx), invalid, what)
    eq(err(C.kms.decrypt, CiphertextBlob=blob), invalid, "no context")

    n = len(blob)
    positions = {
        "format version": 0, "key id (first byte)": 1, "key id (last byte)": 16,
        "key version (high byte)": 17, "key version (low byte)": 20,
        "IV (first byte)": 21, "IV (last byte)": 32,
        "body (first byte)": 33, "body (last byte)": n - 17,
        "tag (first byte)": n - 16, "tag (last byte)": n - 1,
    }
    for what, i in positions.items():
        for bit in (0x01, 0x80):
            eq(err(C.kms.decrypt, CiphertextBlob=flip(blob, i, bit), EncryptionContext=CONTEXT),
               invalid, "bit 0x%02x of the %s (offset %d) flipped" % (bit, what, i))

    for length in (1, 20, 21, 33, BLOB_OVERHEAD, BLOB_OVERHEAD + 1, n - 1):
        eq(err(C.kms.decrypt, CiphertextBlob=blob[:length], EncryptionContext=CONTEXT), invalid,
           "blob truncated to %d of %d bytes" % (length, n))
    eq(err(C.kms.decrypt, CiphertextBlob=blob + b"\x00", EncryptionContext=CONTEXT), invalid,
       "one byte appended")
    eq(err(C.kms.decrypt, CiphertextBlob=os.urandom(n), EncryptionContext=CONTEXT), invalid,
       "random bytes")
    eq(err(C.kms.decrypt, CiphertextBlob=blob + os.urandom(6145 - n), EncryptionContext=CONTEXT),
       ("ValidationException", 400), "a 6145-byte blob (over the 6144-byte limit)")

    # the untouched blob still decrypts
    eq(C.kms.decrypt(CiphertextBlob=blob, EncryptionContext=CONTEXT)["Plaintext"], r["Plaintext"],
       "original blob")


@test
def test_decrypt_with_another_key_id():
    r = C.kms.generate_data_key(KeyId=ALIAS, KeySpec="AES_256")
    for ref in (C.other["KeyId"], C.other["Arn"]):
        eq(err(C.kms.decrypt, CiphertextBlob=r["CiphertextBlob"], KeyId=ref),
           ("IncorrectKeyException", 400), "Decrypt with KeyId=%s" % ref)
    eq(err(C.kms.decrypt, CiphertextBlob=r["CiphertextBlob"], KeyId=str(uuid.uuid4())),
       ("NotFoundException", 404), "Decrypt naming a key that does not exist")


@test
def test_generate_data_key_without_plaintext():
    r = C.kms.generate_data_key_without_plaintext(KeyId=ALIAS, KeySpec="AES_256",
                                                  EncryptionContext=CONTEXT)
    eq(sorted(k for k in r if k != "ResponseMetadata"), ["CiphertextBlob", "KeyId"], "members")
    eq(r["KeyId"], C.key["Arn"], "KeyId")
    check_blob_header(r["CiphertextBlob"], C.key["KeyId"], 32)
    d = C.kms.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext=CONTEXT)
    eq(len(d["Plaintext"]), 32, "decrypted length")
    eq(d["KeyId"], C.key["Arn"], "Decrypt.KeyId")
    r = C.kms.generate_data_key_without_plaintext(KeyId=C.key["KeyId"], NumberOfBytes=7)
    eq(len(C.kms.decrypt(CiphertextBlob=r["CiphertextBlob"])["Plaintext"]), 7, "NumberOfBytes=7")


@test
def test_encrypt_decrypt_round_trip():
    for size in (1, 4096):
        pt = os.urandom(size)
        e = C.kms.encrypt(KeyId=ALIAS, Plaintext=pt, EncryptionContext={"size": str(size)})
        eq(e["KeyId"], C.key["Arn"], "Encrypt.KeyId")
        eq(e["EncryptionAlgorithm"], "SYMMETRIC_DEFAULT", "Encrypt.EncryptionAlgorithm")
        check_blob_header(e["CiphertextBlob"], C.key["KeyId"], size)
        d = C.kms.decrypt(CiphertextBlob=e["CiphertextBlob"], EncryptionContext={"size": str(size)})
        eq(d["Plaintext"], pt, "%d-byte round trip" % size)
        eq(d["KeyId"], C.key["Arn"], "Decrypt.KeyId")
        eq(err(C.kms.decrypt, CiphertextBlob=e["CiphertextBlob"]),
           ("InvalidCiphertextException", 400), "without the context")
    # the same plaintext twice gives two different blobs (random IVs)
    a = C.kms.encrypt(KeyId=ALIAS, Plaintext=b"same")["CiphertextBlob"]
    b = C.kms.encrypt(KeyId=ALIAS, Plaintext=b"same")["CiphertextBlob"]
    check(a != b and a[21:33] != b[21:33], "two encryptions differ in IV and body")

    too_big = os.urandom(4097)
    eq(raw_or_boto_error("Encrypt", {"KeyId": ALIAS, "Plaintext": b64(too_big)},
                         C.kms.encrypt, {"KeyId": ALIAS, "Plaintext": too_big}),
       ("ValidationException", 400), "4097-byte plaintext")
    eq(raw_or_boto_error("Encrypt", {"KeyId": ALIAS, "Plaintext": ""},
                         C.kms.encrypt, {"KeyId": ALIAS, "Plaintext": b""}),
       ("ValidationException", 400), "empty plaintext")
    # and the same through a raw request, for the server's exact answer
    r = h.kms_call(C.server.endpoint, "Encrypt", {"KeyId": ALIAS, "Plaintext": b64(too_big)},
                   C.principal)
    h.check_error_response(r, "ValidationException", 400)


@test
def test_unknown_key_is_not_found():
    missing = str(uuid.uuid4())
    refs = [missing, arn(missing), "alias/nope", ARN_PREFIX + "alias/nope"]
    for ref in refs:
        eq(err(C.kms.describe_key, KeyId=ref), ("NotFoundException", 404), "DescribeKey(%s)" % ref)
        eq(err(C.kms.generate_data_key, KeyId=ref, KeySpec="AES_256"), ("NotFoundException", 404),
           "GenerateDataKey(%s)" % ref)
        eq(err(C.kms.encrypt, KeyId=ref, Plaintext=b"x"), ("NotFoundException", 404),
           "Encrypt(%s)" % ref)
    r = h.kms_call(C.server.endpoint, "DescribeKey", {"KeyId": "alias/nope"}, C.principal)
    h.check_error_response(r, "NotFoundException", 404)
    for ref in (missing, arn(missing)):
        r = h.kms_call(C.server.endpoint, "DescribeKey", {"KeyId": ref}, C.principal)
        doc = h.check_error_response(r, "NotFoundException", 404)
        eq(doc["message"], "Key '%s' does not exist" % arn(missing), "NotFound message names the key ARN")


@test
def test_generate_random():
    for n in (1, 2, 16, 32, 1000, 1024):
        r = C.kms.generate_random(NumberOfBytes=n)
        eq(len(r["Plaintext"]), n, "GenerateRandom(%d) length" % n)
    outs = {C.kms.generate_random(NumberOfBytes=32)["Plaintext"] for _ in range(4)}
    eq(len(outs), 4, "four 32-byte outputs are distinct")
    for n in (0, 1025):
        eq(raw_or_boto_error("GenerateRandom", {"NumberOfBytes": n}, C.kms.generate_random,
                             {"NumberOfBytes": n}), ("ValidationException", 400),
           "NumberOfBytes=%d" % n)
        r = h.kms_call(C.server.endpoint, "GenerateRandom", {"NumberOfBytes": n}, C.principal)
        h.check_error_response(r, "ValidationException", 400)
    r = h.kms_call(C.server.endpoint, "GenerateRandom", {}, C.principal)
    h.check_error_response(r, "ValidationException", 400)


@test
def test_list_keys_pagination():
    """A second server on its own fresh token holding exactly three keys."""
    ws = h.Workspace()
    server = None
    try:
        token, config = h.token_and_config(ws, "p11kms-it-list", C.principal)
        server = h.start_config_server(config, token, ws.sub("p11kmsd.log"))
        kms = h.kms_client(server.endpoint, C.principal)
        eq(kms.list_keys()["Keys"], [], "a fresh token lists no keys")
        made = [kms.create_key()["KeyMetadata"] for _ in range(3)]
        expected = {m["KeyId"]: m["Arn"] for m in made}
        eq(len(expected), 3, "three distinct keys")

        whole = kms.list_keys()
        eq(whole["Truncated"], False, "one page: Truncated")
        check("NextMarker" not in whole, "one page: no NextMarker")
        eq({k["KeyId"]: k["KeyArn"] for k in whole["Keys"]}, expected, "one page: the keys")

        seen, pages, marker = [], [], None
        while True:
            args = {"Limit": 1}
            if marker:
                args["Marker"] = marker
            page = kms.list_keys(**args)
            pages.append(page)
            eq(len(page["Keys"]), 1, "page %d size" % len(pages))
            seen.extend(page["Keys"])
            check(len(pages) <= 3, "more than three pages")
            if not page["Truncated"]:
                check("NextMarker" not in page, "last page has no NextMarker")
                break
            check(isinstance(page.get("NextMarker"), str) and page["NextMarker"],
                  "a truncated page has a NextMarker")
            marker = page["NextMarker"]
        eq([p["Truncated"] for p in pages], [True, True, False], "Truncated per page")
        eq(sorted(k["KeyId"] for k in seen), sorted(expected), "every key exactly once")
        for k in seen:
            eq(k["KeyArn"], expected[k["KeyId"]], "KeyArn of %s" % k["KeyId"])
        eq([k["KeyId"] for k in seen], [k["KeyId"] for k in whole["Keys"]],
           "the pages in the order of the whole list")

        page = kms.list_keys(Limit=2)
        eq((len(page["Keys"]), page["Truncated"]), (2, True), "Limit=2 first page")
        page = kms.list_keys(Limit=2, Marker=page["NextMarker"])
        eq((len(page["Keys"]), page["Truncated"]), (1, False), "Limit=2 second page")
        eq(kms.list_keys(Limit=3)["Truncated"], False, "Limit=3")
        eq(err(kms.list_keys, Limit=1001), ("ValidationException", 400), "Limit=1001")

        # ListAliases pages the same way: three aliases, one per page, in name order
        names = ["alias/page-c", "alias/page-a", "alias/page-b"]
        for name, m in zip(names, made):
            kms.create_alias(AliasName=name, TargetKeyId=m["KeyId"])
        seen, truncated, marker = [], [], None
        for _ in range(4):
            page = kms.list_aliases(Limit=1, **({"Marker": marker} if marker else {}))
            eq(len(page["Aliases"]), 1, "ListAliases page size")
            seen += [(a["AliasName"], a["TargetKeyId"]) for a in page["Aliases"]]
            truncated.append(page["Truncated"])
            eq("NextMarker" in page, page["Truncated"], "NextMarker iff Truncated")
            if not page["Truncated"]:
                break
            marker = page["NextMarker"]
        eq(truncated, [True, True, False], "ListAliases Truncated per page")
        eq(seen, sorted(zip(names, (m["KeyId"] for m in made))), "every alias once, by name")
        eq(err(kms.list_keys, Marker="not-a-marker"), ("InvalidMarkerException", 400), "bad Marker")
    finally:
        try:
            if server:
                server.stop()
        finally:
            ws.close()


# ---- raw HTTP: SigV4, errors, limits ------------------------------------------


def describe_body():
    return {"KeyId": C.key["KeyId"]}


@test
def test_raw_signed_request_succeeds():
    r = h.kms_call(C.server.endpoint, "DescribeKey", describe_body(), C.principal)
    eq(r.status, 200, "status")
    eq(r.json()["KeyMetadata"]["KeyId"], C.key["KeyId"], "KeyId")
    eq(r.header("Content-Type"), h.JSON_TYPE, "Content-Type")
    check(h.UUID_RE.match(r.header("x-amzn-RequestId") or ""), "x-amzn-RequestId is a UUID")
    eq(r.header("X-Amzn-ErrorType"), None, "no X-Amzn-ErrorType on success")


@test
def test_unsigned_request():
    body = json.dumps(describe_body()).encode()
    r = h.raw_request(C.server.endpoint, headers={"Content-Type": h.JSON_TYPE,
                                                  "X-Amz-Target": "TrentService.DescribeKey"},
                      body=body)
    h.check_error_response(r, "MissingAuthenticationTokenException", 400)


@test
def test_wrong_secret():
    wrong = h.Principal(C.principal.access_key, C.principal.secret[:-1] + (
        "A" if C.principal.secret[-1] != "A" else "B"), "x")
    r = h.kms_call(C.server.endpoint, "DescribeKey", describe_body(), wrong)
    h.check_error_response(r, "InvalidSignatureException", 400)
    code = err(h.kms_client(C.server.endpoint, wrong).describe_key, KeyId=C.key["KeyId"])
    eq(code, ("InvalidSignatureException", 400), "through boto3")


@test
def test_unknown_access_key():
    stranger = h.new_principal("stranger")
    r = h.kms_call(C.server.endpoint, "DescribeKey", describe_body(), stranger)
    h.check_error_response(r, "UnrecognizedClientException", 400)
    code = err(h.kms_client(C.server.endpoint, stranger).describe_key, KeyId=C.key["KeyId"])
    eq(code, ("UnrecognizedClientException", 400), "through boto3")


@test
def test_stale_and_future_dates():
    now = h.utcnow()
    for what, when in (("10 minutes old", now - datetime.timedelta(minutes=10)),
                       ("10 minutes ahead", now + datetime.timedelta(minutes=10))):
        r = h.kms_call(C.server.endpoint, "DescribeKey", describe_body(), C.principal, when=when)
        h.check_error_response(r, "InvalidSignatureException", 400)
    # a minute off is within the allowed skew
    r = h.kms_call(C.server.endpoint, "DescribeKey", describe_body(), C.principal,
                   when=now - datetime.timedelta(minutes=1))
    eq(r.status, 200, "signed a minute ago")


@test
def test_body_changed_after_signing():
    signed = json.dumps(describe_body()).encode()
    changed = json.dumps({"KeyId": C.other["KeyId"]}).encode()
    eq(len(changed), len(signed), "same length")
    r = h.kms_call(C.server.endpoint, "DescribeKey", describe_body(), C.principal, send_body=changed)
    h.check_error_response(r, "InvalidSignatureException", 400)
    r = h.kms_call(C.server.endpoint, "DescribeKey", describe_body(), C.principal,
                   send_body=signed + b" ")
    h.check_error_response(r, "InvalidSignatureException", 400)


@test
def test_other_signature_faults():
    # a header changed after signing
    headers, body = h.sign(C.server.endpoint, "TrentService.DescribeKey", describe_body(),
                           C.principal)
    headers["X-Amz-Target"] = "TrentService.ListKeys"
    h.check_error_response(h.raw_request(C.server.endpoint, headers=headers, body=body),
                           "InvalidSignatureException", 400)
    # signed for another region
    r = h.kms_call(C.server.endpoint, "DescribeKey", describe_body(), C.principal, region="eu-west-1")
    h.check_error_response(r, "InvalidSignatureException", 400)


@test
def test_unknown_operation():
    r = h.kms_call(C.server.endpoint, "NoSuchOperation", {}, C.principal)
    h.check_error_response(r, "UnknownOperationException", 400)
    r = h.signed_request(C.server.endpoint, "OtherService.DescribeKey", describe_body(), C.principal)
    h.check_error_response(r, "UnknownOperationException", 400)


@test
def test_body_over_64k():
    body = json.dumps({"KeyId": ALIAS, "Plaintext": "A" * (64 * 1024)}).encode()
    check(len(body) > 64 * 1024, "body is over 64 KiB")
    r = h.kms_call(C.server.endpoint, "Encrypt", json.loads(body), C.principal)
    eq(r.status, 413, "signed, over 64 KiB")
    h.check_error_response(r, "ValidationException", 413)
    r = h.raw_request(C.server.endpoint, headers={"Content-Type": h.JSON_TYPE,
                                                  "X-Amz-Target": "TrentService.Encrypt"},
                      body=b"{" + b" " * (64 * 1024) + b"}")
    eq(r.status, 413, "unsigned, over 64 KiB")
    # the server still serves afterwards
    eq(C.kms.describe_key(KeyId=ALIAS)["KeyMetadata"]["KeyId"], C.key["KeyId"], "still serving")


@test
def test_health_endpoints():
    for path, text in (("/healthz", b"ok\n"), ("/readyz", b"ready\n")):
        r = h.raw_request(C.server.endpoint, method="GET", path=path)
        eq((r.status, r.body), (200, text), "GET %s" % path)
    r = h.raw_request(C.server.endpoint, method="GET", path="/")
    check(r.status >= 400, "GET / is refused (got %d)" % r.status)
    doc = r.json()
    eq(r.header("X-Amzn-ErrorType"), doc["__type"], "X-Amzn-ErrorType of GET /")


# ---- the token ----------------------------------------------------------------


@test
def test_root_key_in_token_versions_wrapped_in_database():
    """Reads the token through PKCS#11 while p11kmsd runs."""
    import PyKCS11
    from PyKCS11 import LowLevel

    os.environ["SOFTHSM2_CONF"] = C.token.conf
    lib = PyKCS11.PyKCS11Lib()
    lib.load(h.SOFTHSM_MODULE)
    slots = [s for s in lib.getSlotList(tokenPresent=True)
             if lib.getTokenInfo(s).label.strip() == C.token.label]
    eq(len(slots), 1, "slots holding token %s" % C.token.label)
    session = lib.openSession(slots[0], PyKCS11.CKF_SERIAL_SESSION)
    session.login(C.token.user_pin())
    try:
        # the audit log's HMAC key: generic secret, sign/verify only, never leaves the token
        audit = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                                     (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_GENERIC_SECRET)])
        eq(len(audit), 1, "the audit key")
        attrs = [PyKCS11.CKA_LABEL, PyKCS11.CKA_SENSITIVE, PyKCS11.CKA_EXTRACTABLE,
                 PyKCS11.CKA_SIGN, PyKCS11.CKA_VERIFY, PyKCS11.CKA_ENCRYPT, PyKCS11.CKA_DECRYPT]
        eq(session.getAttributeValue(audit[0], attrs),
           ["p11kms-audit-key", True, False, True, True, False, False], "the audit key's attributes")
        keys = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY),
                                    (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES)])
        # the token holds the root key only: the keys' versions live wrapped in the database
        eq(len(keys), 1, "AES secret keys on the token (the root key)")
        root = keys[0]
        attrs = [PyKCS11.CKA_VALUE_LEN, PyKCS11.CKA_TOKEN, PyKCS11.CKA_PRIVATE,
                 PyKCS11.CKA_SENSITIVE, PyKCS11.CKA_EXTRACTABLE, PyKCS11.CKA_ALWAYS_SENSITIVE,
                 PyKCS11.CKA_NEVER_EXTRACTABLE, PyKCS11.CKA_LOCAL, PyKCS11.CKA_WRAP,
                 PyKCS11.CKA_UNWRAP, PyKCS11.CKA_ENCRYPT, PyKCS11.CKA_DECRYPT, PyKCS11.CKA_SIGN,
                 PyKCS11.CKA_VERIFY, PyKCS11.CKA_DERIVE]
        eq(session.getAttributeValue(root, attrs),
           [32, True, True, True, False, True, True, True, True, True, False, False, False, False,
            False],
           "the root key: AES-256, private, sensitive, never extractable, made in the token, "
           "wrap/unwrap only")
        label = bytes(session.getAttributeValue(root, [PyKCS11.CKA_LABEL], allAsBinary=True)[0])
        check(label.startswith(b"p11kms-root:"), "the root key's label: %r" % label)
        # CKA_VALUE must be refused: straight through the low-level call, since
        # PyKCS11's getAttributeValue turns CKR_ATTRIBUTE_SENSITIVE into None.
        template = LowLevel.ckattrlist(1)
        template[0].SetType(PyKCS11.CKA_VALUE)
        rv = session.lib.C_GetAttributeValue(session.session, root, template)
        eq(rv, PyKCS11.CKR_ATTRIBUTE_SENSITIVE,
           "C_GetAttributeValue(CKA_VALUE) (%s)" % PyKCS11.CKR.get(rv, rv))
        # the server's unwrapped versions are session objects of its own: not visible here
        eq(len(session.findObjects([(PyKCS11.CKA_TOKEN, False)])), 0,
           "another process sees no session object of the server")
    finally:
        session.logout()
        session.closeSession()
    # the database holds each version wrapped (RFC 5649: 40 bytes for AES-256), under the root
    db = sqlite3.connect("file:%s?mode=ro" % C.database, uri=True)
    try:
        rows = db.execute("SELECT hex(key_id), vid, length(wrapped), root_id FROM versions").fetchall()
    finally:
        db.close()
    by_key = {}
    for key_hex, vid, wrapped_len, root_id in rows:
        eq((wrapped_len, root_id), (40, 1), "version %d: wrapped length and root" % vid)
        by_key.setdefault(str(uuid.UUID(hex=key_hex)), set()).add(vid)
    eq(set(by_key), {C.key["KeyId"], C.other["KeyId"]}, "the versions belong to this run's keys")
    for owner, vid in VERSION_IDS.items():
        check(int.from_bytes(vid, "big") in by_key.get(owner, ()),
              "the blob's version id names a stored version of %s" % owner)
    # the server is unaffected by the second process on its token
    r = C.kms.generate_data_key(KeyId=ALIAS, KeySpec="AES_256")
    eq(C.kms.decrypt(CiphertextBlob=r["CiphertextBlob"])["Plaintext"], r["Plaintext"],
       "server still works")


# ---- start-up checks ----------------------------------------------------------


@test
def test_group_readable_credentials_refused():
    creds = h.write_credentials(C.ws.sub("credentials-0644"), [C.principal], mode=0o644)
    eq(os.stat(creds).st_mode & 0o777, 0o644, "file mode")
    config = h.write_config(C.ws.sub("p11kmsd-0644.conf"), C.token, creds)
    env = h.server_env({"SOFTHSM2_CONF": C.token.conf})
    status, out, errtext = h.run_failing(["--config", config, "--listen", "127.0.0.1:0"], env)
    eq(status, 1, "exit status (stderr %r)" % errtext)
    check(creds in errtext, "stderr names %s: %r" % (creds, errtext))
    check("serving" not in out, "nothing served: %r" % out)
    check(C.principal.secret not in errtext + out, "the secret is not printed")

    os.chmod(creds, 0o640)
    status, _, errtext = h.run_failing(["--config", config, "--listen", "127.0.0.1:0"], env)
    eq(status, 1, "exit status with mode 0640 (stderr %r)" % errtext)
    check(creds in errtext, "stderr names the file (0640)")


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
