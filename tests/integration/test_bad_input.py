#!/usr/bin/python3
"""p11kmsd against a battery of bad requests over raw HTTP, on a fresh SoftHSM2
token: malformed JSON bodies, wrongly typed members for every operation,
out-of-range and invalid values, oversized bodies, headers and members,
protocol errors (method, path, X-Amz-Target, Content-Type), unsigned and
badly signed requests, stale and malformed X-Amz-Date, and signed requests
replayed to another operation. Each case asserts the exact HTTP status and
__type of a JSON error body (libmicrohttpd's own 400/431 pages, which are
HTML, only their status); every refusal p11kmsd reads as a KMS request has
its audit line with that outcome. The battery runs twice: the second pass
gets the same answers and the server's resident memory does not grow beyond
a bound. Then no audit line holds a plaintext or data key, normal requests
are still served and nothing the bad requests named was changed. TAP output."""

import base64
import hashlib
import datetime
import http.client
import json
import os
import re
import secrets
import socket
import sys
import time
import uuid

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import botocore.auth  # noqa: E402
import botocore.awsrequest  # noqa: E402
import botocore.credentials  # noqa: E402

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

MAX_BODY = 65536          # the defaults the server keeps
MAX_HEADER = 16384
MAX_SKEW = 5 * 60         # seconds X-Amz-Date may be off the server's clock
MIN_CASES = 200
WARM_UP = 50
RSS_BOUND = 2 << 20       # bytes the second pass may add to the resident set
RATE_MANAGE, BURST_MANAGE = 1000, 2000   # the default management rate limit
MANAGE_BUDGET = 1500      # management rate tokens one pass may take
ALIAS = "alias/bad-input-main"
MISSING_KEY = "6d1f7c4e-2b7a-4f0e-9a51-0c3e8d2b9f10"   # no such key on the token
MARKER = b"PLAINTEXT-MARKER-" + secrets.token_hex(16).encode()
CONTEXT = {"purpose": "bad-input", "tenant": "acme"}
ARN_PREFIX = "arn:aws:kms:%s:%s:" % (h.REGION, h.ACCOUNT)

SIG_MISMATCH = ("The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method.")
NOT_JSON = "The request body is not valid JSON"
NOT_OBJECT = "The request body must be a JSON object"
WRONG_CONTENT_TYPE = "Content-Type must be " + h.JSON_TYPE
NOT_SERVED = "Only POST / and GET /healthz, /readyz, /metrics are served"


class Ctx:
    ws = None
    principal = None
    config = None
    server = None
    kms = None
    key = None          # the main key's id (alias ALIAS)
    scratch = None      # a second key, the one lifecycle operations name
    blob = None         # base64 blob of MARKER under key, with CONTEXT
    policy = None       # scratch's policy text
    cases = None
    results = {}        # pass number -> list of (status, __type, message, request id)
    rss = {}            # "warm" / 1 / 2 -> bytes
    secrets = []        # plaintexts (bytes) the test made: none may be audited
    data_keys = 0


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.principal = h.new_principal("tester")
    token, C.config = h.token_and_config(C.ws, "p11kms-bad-input", C.principal)
    C.server = h.start_config_server(C.config, token, C.ws.sub("p11kmsd.log"))
    C.kms = h.kms_client(C.server.endpoint, C.principal)
    h.diag("p11kmsd serving %s" % C.server.endpoint)
    C.key = C.kms.create_key(Description="bad-input main")["KeyMetadata"]["KeyId"]
    C.scratch = C.kms.create_key(Description="bad-input scratch")["KeyMetadata"]["KeyId"]
    C.kms.create_alias(AliasName=ALIAS, TargetKeyId=C.key)
    C.policy = C.kms.get_key_policy(KeyId=C.scratch, PolicyName="default")["Policy"]
    blob = C.kms.encrypt(KeyId=C.key, Plaintext=MARKER, EncryptionContext=CONTEXT)
    C.blob = b64(blob["CiphertextBlob"])
    C.secrets.append(MARKER)


def teardown():
    h.finish(T, C.ws, C.server)


def b64(data):
    return base64.b64encode(data).decode()


# ---- requests ----------------------------------------------------------------------


class Req:
    """One HTTP request: headers is a list of (name, value), sent in order."""

    def __init__(self, method, path, headers, body=b"", host=None):
        self.method = method
        self.path = path
        self.headers = list(headers)
        self.body = body
        self.host = host

    def replace(self, name, value):
        """Sets header name (removing every other of that name); value None drops it."""
        out = [(k, v) for k, v in self.headers if k.lower() != name.lower()]
        if value is not None:
            out.append((name, value))
        self.headers = out
        return self

    def get(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


class _Signer(botocore.auth.SigV4Auth):
    """SigV4 at a chosen time, optionally leaving headers out of SignedHeaders."""

    def __init__(self, credentials, service, region, when, drop):
        super().__init__(credentials, service, region)
        self._when = when
        self._drop = drop

    def headers_to_sign(self, request):
        hs = super().headers_to_sign(request)
        for name in self._drop:
            del hs[name]
        return hs

    def add_auth(self, request):
        request.context["timestamp"] = self._when.strftime(botocore.auth.SIGV4_TIMESTAMP)
        self._modify_request_before_signing(request)
        canonical = self.canonical_request(request)
        string_to_sign = self.string_to_sign(request, canonical)
        self._inject_signature_to_request(request, self.signature(string_to_sign, request))


def host_header():
    return "%s:%d" % (C.server.host, C.server.port)


def encode(body):
    if isinstance(body, (dict, list)):
        return json.dumps(body).encode()
    return body


def signed(op, body, principal=None, when=None, region=h.REGION, service="kms",
           content_type=h.JSON_TYPE, target=None, drop=(), extra=()):
    """A POST / signed as botocore signs it. op names TrentService.<op>
    (target overrides the whole X-Amz-Target; False leaves it out)."""
    principal = principal or C.principal
    body = encode(body)
    headers = {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if target is None:
        target = "TrentService." + op
    if target is not False:
        headers["X-Amz-Target"] = target
    for k, v in extra:
        headers[k] = v
    req = botocore.awsrequest.AWSRequest(method="POST", url="http://%s/" % host_header(),
                                         data=body, headers=headers)
    creds = botocore.credentials.Credentials(principal.access_key, principal.secret)
    _Signer(creds, service, region, when or h.utcnow(), drop).add_auth(req)
    return Req("POST", "/", req.headers.items(), body)


def unsigned(op, body, content_type=h.JSON_TYPE, method="POST", path="/"):
    headers = [("Content-Type", content_type)] if content_type else []
    if op:
        headers.append(("X-Amz-Target", "TrentService." + op))
    return Req(method, path, headers, encode(body))


def put_request(conn, req):
    conn.putrequest(req.method, req.path, skip_host=True, skip_accept_encoding=True)
    conn.putheader("Host", req.host or host_header())
    for k, v in req.headers:
        conn.putheader(k, v)
    if req.body or req.method == "POST":
        conn.putheader("Content-Length", str(len(req.body)))
    conn.endheaders()


class Connection:
    """A kept-alive connection, opened again when the server closes it."""

    def __init__(self):
        self.conn = None

    def send(self, req):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(C.server.host, C.server.port, timeout=30)
        try:
            put_request(self.conn, req)
            if req.body:
                self.conn.send(req.body)
            r = self.conn.getresponse()
            body = r.read()
        except BaseException:
            self.close()
            raise
        if r.will_close:
            self.close()
        return h.RawResponse(r.status, r.getheaders(), body)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def send_fresh(req):
    """On a connection of its own; the server may answer (413) and close
    before it has read the whole body."""
    conn = http.client.HTTPConnection(C.server.host, C.server.port, timeout=30)
    try:
        put_request(conn, req)
        try:
            conn.send(req.body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        r = conn.getresponse()
        return h.RawResponse(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


class RawBytes:
    """Bytes written as they are on a fresh socket (bad framing, huge headers)."""

    def __init__(self, parts, method="POST"):
        self.parts = parts
        self.method = method


def send_raw(raw):
    s = socket.create_connection((C.server.host, C.server.port), timeout=30)
    try:
        try:
            for part in raw.parts:
                s.sendall(part)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered early: the answer is read below
        resp = http.client.HTTPResponse(s, method=raw.method)
        resp.begin()
        return h.RawResponse(resp.status, resp.getheaders(), resp.read())
    finally:
        s.close()


def head_bytes(req):
    lines = ["%s %s HTTP/1.1" % (req.method, req.path), "Host: %s" % (req.host or host_header())]
    lines += ["%s: %s" % kv for kv in req.headers]
    return ("\r\n".join(lines) + "\r\n").encode()


def chunked(req, chunk=16384):
    """req with Transfer-Encoding: chunked instead of Content-Length."""
    parts = [head_bytes(req) + b"Transfer-Encoding: chunked\r\n\r\n"]
    for i in range(0, len(req.body), chunk):
        part = req.body[i:i + chunk]
        parts.append(b"%x\r\n" % len(part) + part + b"\r\n")
    parts.append(b"0\r\n\r\n")
    return RawBytes(parts)


# ---- the cases ---------------------------------------------------------------------

# Where a case is refused decides its audit line: "auth" before the principal
# is known (principal "" and operation "none"), "route" an unknown operation
# (the principal, operation "none"), "op" by the operation (the principal and
# the operation's name), "size" a body above max_body (as "auth"); "http" is
# answered before any of that (wrong method or path) and "mhd" by
# libmicrohttpd itself: neither is audited.
AUDITED = ("auth", "route", "op", "size")


class Case:
    def __init__(self, category, name, build, etype, status, stage="op", op=None, message=None,
                 send="keep", varying=False, on_ok=None):
        self.category = category
        self.name = name
        self.build = build
        self.etype = etype          # None: a valid request (status 200)
        self.status = status
        self.stage = stage
        self.op = op
        self.message = message      # exact text, a compiled pattern, or None
        self.send = send            # "keep", "fresh" or "raw"
        self.varying = varying      # the message differs between passes (it names a date)
        self.on_ok = on_ok          # for valid requests: checks the answer document

    def __repr__(self):
        return "%s/%s" % (self.category, self.name)


def op_case(category, name, op, body, etype, status=400, message=None, **kw):
    """A signed request to op, refused by the operation."""
    return Case(category, name, lambda: signed(op, body), etype, status, "op", op, message, **kw)


def b64_of_size(n, fill=b"A"):
    return b64((fill * n)[:n])


def grant_token(body):
    """A grant token as p11kms makes them (docs/api.md#grants): well formed, naming no grant."""
    return base64.urlsafe_b64encode(body + hashlib.sha256(body).digest()[:4]).decode().rstrip("=")


GRANT_TOKEN = grant_token(b"\x01" + b"\x00" * 48)
NO_GRANT = "0" * 64


# The members of each operation, with a valid value. The lifecycle operations
# name the scratch key; requests built from these are only ever sent with a
# member made wrong, so nothing changes.
def base_bodies():
    return {
        "CreateKey": {"Description": "bad-input never created"},
        "DescribeKey": {"KeyId": C.key, "GrantTokens": [GRANT_TOKEN]},
        "ListKeys": {"Limit": 10, "Marker": C.key},
        "ListResourceTags": {"KeyId": C.scratch, "Limit": 10, "Marker": "dGVhbQ=="},
        "TagResource": {"KeyId": C.scratch, "Tags": [{"TagKey": "bad-input", "TagValue": "no"}]},
        "UntagResource": {"KeyId": C.scratch, "TagKeys": ["bad-input-never"]},
        "CreateAlias": {"AliasName": "alias/bad-input-never", "TargetKeyId": C.scratch},
        "ListAliases": {"Limit": 10, "KeyId": C.key, "Marker": ALIAS},
        "UpdateAlias": {"AliasName": ALIAS, "TargetKeyId": C.scratch},
        "DeleteAlias": {"AliasName": ALIAS},
        "GenerateDataKey": {"KeyId": C.key, "KeySpec": "AES_256", "EncryptionContext": CONTEXT,
                            "GrantTokens": [GRANT_TOKEN]},
        "GenerateDataKeyWithoutPlaintext": {"KeyId": C.key, "NumberOfBytes": 32,
                                            "EncryptionContext": CONTEXT},
        "Encrypt": {"KeyId": C.key, "Plaintext": b64(MARKER), "EncryptionContext": CONTEXT,
                    "EncryptionAlgorithm": "SYMMETRIC_DEFAULT", "GrantTokens": [GRANT_TOKEN]},
        "Decrypt": {"CiphertextBlob": C.blob, "EncryptionContext": CONTEXT, "KeyId": C.key,
                    "EncryptionAlgorithm": "SYMMETRIC_DEFAULT", "GrantTokens": [GRANT_TOKEN]},
        "GenerateRandom": {"NumberOfBytes": 32},
        "ReEncrypt": {"CiphertextBlob": C.blob, "SourceEncryptionContext": CONTEXT,
                      "DestinationKeyId": C.scratch, "SourceKeyId": C.key,
                      "DestinationEncryptionContext": {"to": "scratch"},
                      "SourceEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                      "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                      "GrantTokens": [GRANT_TOKEN]},
        "EnableKey": {"KeyId": C.scratch},
        "DisableKey": {"KeyId": C.scratch},
        "ScheduleKeyDeletion": {"KeyId": C.scratch, "PendingWindowInDays": 7},
        "CancelKeyDeletion": {"KeyId": C.scratch},
        "EnableKeyRotation": {"KeyId": C.scratch, "RotationPeriodInDays": 365},
        "DisableKeyRotation": {"KeyId": C.scratch},
        "GetKeyRotationStatus": {"KeyId": C.scratch},
        "RotateKeyOnDemand": {"KeyId": C.scratch},
        "ListKeyRotations": {"KeyId": C.scratch, "Limit": 10},
        "PutKeyPolicy": {"KeyId": C.scratch, "PolicyName": "default", "Policy": C.policy},
        "GetKeyPolicy": {"KeyId": C.scratch, "PolicyName": "default"},
        "ListKeyPolicies": {"KeyId": C.scratch},
        # asymmetric and HMAC keys: refused for the member made wrong before the key is looked at
        "GetPublicKey": {"KeyId": C.key, "GrantTokens": [GRANT_TOKEN]},
        "Sign": {"KeyId": C.key, "Message": b64(b"m"), "MessageType": "RAW",
                 "SigningAlgorithm": "ECDSA_SHA_256", "GrantTokens": [GRANT_TOKEN]},
        "Verify": {"KeyId": C.key, "Message": b64(b"m"), "MessageType": "RAW",
                   "Signature": b64(b"s" * 64), "SigningAlgorithm": "ECDSA_SHA_256",
                   "GrantTokens": [GRANT_TOKEN]},
        "GenerateMac": {"KeyId": C.key, "Message": b64(b"m"), "MacAlgorithm": "HMAC_SHA_256",
                        "GrantTokens": [GRANT_TOKEN]},
        "VerifyMac": {"KeyId": C.key, "Message": b64(b"m"), "Mac": b64(b"x" * 32),
                      "MacAlgorithm": "HMAC_SHA_256", "GrantTokens": [GRANT_TOKEN]},
        "DeriveSharedSecret": {"KeyId": C.key, "KeyAgreementAlgorithm": "ECDH",
                               "PublicKey": b64(b"\x30" * 91), "GrantTokens": [GRANT_TOKEN]},
        "GenerateDataKeyPair": {"KeyId": C.key, "KeyPairSpec": "ECC_NIST_P256",
                                "EncryptionContext": CONTEXT, "GrantTokens": [GRANT_TOKEN]},
        "GenerateDataKeyPairWithoutPlaintext": {"KeyId": C.key, "KeyPairSpec": "RSA_2048",
                                                "EncryptionContext": CONTEXT,
                                                "GrantTokens": [GRANT_TOKEN]},
        # ---- grants ----
        "CreateGrant": {"KeyId": C.scratch, "GranteePrincipal": "bad-input",
                        "Operations": ["Decrypt"], "Name": "bad-input-never",
                        "GrantTokens": [GRANT_TOKEN]},
        "ListGrants": {"KeyId": C.scratch, "Limit": 10},
        "ListRetirableGrants": {"RetiringPrincipal": "bad-input", "Limit": 10},
        "RetireGrant": {"KeyId": C.scratch, "GrantId": NO_GRANT},
        "RevokeGrant": {"KeyId": C.scratch, "GrantId": NO_GRANT},
    }


def with_member(body, name, value):
    out = dict(body)
    out[name] = value
    return out


def without(body, *names):
    return {k: v for k, v in body.items() if k not in names}


# ---- 1. malformed JSON ---------------------------------------------------------------


def malformed_json_cases():
    key = json.dumps(C.key)
    bodies = [
        ("truncated after the brace", b"{", NOT_JSON),
        ("truncated in a string", b'{"KeyId": "' + C.key[:8].encode(), NOT_JSON),
        ("truncated after a name", b'{"KeyId"', NOT_JSON),
        ("truncated after the colon", b'{"KeyId":', NOT_JSON),
        ("truncated in an escape", b'{"KeyId": "\\u00', NOT_JSON),
        ("trailing garbage", b'{"KeyId": %s} x' % key.encode(), NOT_JSON),
        ("a second object", b'{"KeyId": %s}{}' % key.encode(), NOT_JSON),
        ("an extra brace", b'{"KeyId": %s}}' % key.encode(), NOT_JSON),
        ("trailing comma", b'{"KeyId": %s,}' % key.encode(), NOT_JSON),
        ("single quotes", b"{'KeyId': '%s'}" % C.key.encode(), NOT_JSON),
        ("unquoted name", b"{KeyId: %s}" % key.encode(), NOT_JSON),
        ("a comment", b'{"KeyId": %s /* c */}' % key.encode(), NOT_JSON),
        ("NaN", b'{"NumberOfBytes": NaN}', NOT_JSON),
        ("Infinity", b'{"NumberOfBytes": Infinity}', NOT_JSON),
        ("hex number", b'{"NumberOfBytes": 0x20}', NOT_JSON),
        ("leading zero", b'{"NumberOfBytes": 032}', NOT_JSON),
        ("plus sign", b'{"NumberOfBytes": +32}', NOT_JSON),
        ("integer overflow", b'{"NumberOfBytes": 99999999999999999999999}', NOT_JSON),
        ("real overflow", b'{"NumberOfBytes": 1e999}', NOT_JSON),
        ("whitespace only", b" \r\n\t ", NOT_JSON),
        ("byte order mark", b'\xef\xbb\xbf{"KeyId": %s}' % key.encode(), NOT_JSON),
        ("invalid UTF-8", b'{"KeyId": "\xff\xfe"}', NOT_JSON),
        ("overlong UTF-8", b'{"KeyId": "\xc0\xaf"}', NOT_JSON),
        ("UTF-8 surrogate", b'{"KeyId": "\xed\xa0\x80"}', NOT_JSON),
        ("truncated UTF-8", b'{"KeyId": "\xe2\x82"}', NOT_JSON),
        ("lone surrogate escape", b'{"KeyId": "\\ud800"}', NOT_JSON),
        ("bad escape", b'{"KeyId": "\\q"}', NOT_JSON),
        ("raw control character", b'{"KeyId": "a\x01b"}', NOT_JSON),
        ("NUL in a string", b'{"KeyId": "a\x00b"}', NOT_JSON),
        ("NUL after the object", b'{"KeyId": %s}\x00' % key.encode(), NOT_JSON),
        ("escaped NUL in a value", b'{"KeyId": "a\\u0000b"}', NOT_JSON),
        ("escaped NUL in a name", b'{"Key\\u0000Id": %s}' % key.encode(), NOT_JSON),
        ("duplicate member", b'{"KeyId": %s, "KeyId": %s}' % (key.encode(), key.encode()),
         NOT_JSON),
        ("nested 3000 deep", b"[" * 3000 + b"]" * 3000, NOT_JSON),
        ("member nested 2100 deep", b'{"x": ' + b"[" * 2100 + b"]" * 2100 + b"}", NOT_JSON),
        ("objects nested 2100 deep", b'{"a":' * 2100 + b"1" + b"}" * 2100, NOT_JSON),
        ("an array", b"[]", NOT_OBJECT),
        ("an array holding the object", b"[{\"KeyId\": %s}]" % key.encode(), NOT_OBJECT),
        ("a string", b'"KeyId"', NOT_OBJECT),
        ("a number", b"42", NOT_OBJECT),
        ("null", b"null", NOT_OBJECT),
        ("true", b"true", NOT_OBJECT),
    ]
    # Parsing comes after routing: every operation answers alike; spread them
    # (over cheap ones: the rate limit takes its tokens before the parse).
    ops = ["DescribeKey", "Encrypt", "Decrypt", "GenerateDataKey", "GenerateRandom",
           "ReEncrypt", "ListKeys", "ListAliases", "GetKeyRotationStatus",
           "GenerateDataKeyWithoutPlaintext", "ListKeyRotations", "GetKeyPolicy",
           "ListKeyPolicies", "GetKeyPolicy", "DescribeKey", "ListKeys"]
    cases = []
    for i, (name, body, message) in enumerate(bodies):
        for op in (ops[i % len(ops)], ops[(i * 7 + 3) % len(ops)]):
            cases.append(op_case("malformed_json", "%s: %s" % (op, name), op, body,
                                 "SerializationException", 400, message))
    return cases


# ---- 2. wrongly typed members ----------------------------------------------------------

STRING_BAD = [5, 1.5, True, False, [], ["x"], {}, {"a": "b"}]
INT_BAD = ["32", "x", 32.5, 1e3, True, [], {}, [32]]
BLOB_BAD = [5, True, [], {}, ["AAAA"]]
BASE64_BAD = ["not base64!", "AAA", "AAAAA", "AB==", "A===", "====", "AA=A", "AAAA\n",
              "-_-_", "\u00e9AAA"]
CONTEXT_BAD = [[], "a=b", 5, True, [["a", "b"]]]
CONTEXT_VALUE_BAD = [{"a": 1}, {"a": None}, {"a": ["x"]}, {"a": {"b": "c"}}, {"a": True}]
TOKENS_BAD = ["tok", 5, {"a": "b"}, True]
TOKEN_ITEMS_BAD = [[1], [None], [["x"]], [{}], ["ok", 2]]
TAGS_BAD = ["k=v", 5, {"TagKey": "k", "TagValue": "v"}, [1], [["k", "v"]], True]
TAG_KEYS_BAD = ["k", 5, {"k": "v"}, True]
TAG_KEY_ITEMS_BAD = [[1], ["ok", 2], [["x"]], [{}]]  # a null item is a missing one (400 Validation)

# member -> (kind, required)
MEMBERS = {
    "CreateKey": [("Description", "string"), ("Policy", "string"), ("KeyUsage", "string"),
                  ("KeySpec", "string"), ("CustomerMasterKeySpec", "string"),
                  ("Origin", "string")],
    "DescribeKey": [("KeyId", "string!"), ("GrantTokens", "tokens")],
    "ListKeys": [("Limit", "int"), ("Marker", "string")],
    "ListResourceTags": [("KeyId", "string!"), ("Limit", "int"), ("Marker", "string")],
    "TagResource": [("KeyId", "string!"), ("Tags", "tags!")],
    "UntagResource": [("KeyId", "string!"), ("TagKeys", "tagkeys!")],
    "CreateAlias": [("AliasName", "string!"), ("TargetKeyId", "string!")],
    "ListAliases": [("Limit", "int"), ("Marker", "string"), ("KeyId", "string")],
    "UpdateAlias": [("AliasName", "string!"), ("TargetKeyId", "string!")],
    "DeleteAlias": [("AliasName", "string!")],
    "GenerateDataKey": [("KeyId", "string!"), ("KeySpec", "string"), ("GrantTokens", "tokens"),
                        ("EncryptionContext", "context")],
    "GenerateDataKeyWithoutPlaintext": [("KeyId", "string!"), ("NumberOfBytes", "int"),
                                        ("EncryptionContext", "context")],
    "Encrypt": [("KeyId", "string!"), ("Plaintext", "blob!"), ("EncryptionContext", "context"),
                ("EncryptionAlgorithm", "string"), ("GrantTokens", "tokens")],
    "Decrypt": [("CiphertextBlob", "blob!"), ("EncryptionContext", "context"),
                ("KeyId", "string"), ("EncryptionAlgorithm", "string"),
                ("GrantTokens", "tokens")],
    "GenerateRandom": [("NumberOfBytes", "int!")],
    "ReEncrypt": [("CiphertextBlob", "blob!"), ("DestinationKeyId", "string!"),
                  ("SourceKeyId", "string"), ("SourceEncryptionAlgorithm", "string"),
                  ("DestinationEncryptionAlgorithm", "string"), ("GrantTokens", "tokens"),
                  ("SourceEncryptionContext", "context"),
                  ("DestinationEncryptionContext", "context")],
    "EnableKey": [("KeyId", "string!")],
    "DisableKey": [("KeyId", "string!")],
    "ScheduleKeyDeletion": [("KeyId", "string!"), ("PendingWindowInDays", "int")],
    "CancelKeyDeletion": [("KeyId", "string!")],
    "EnableKeyRotation": [("KeyId", "string!"), ("RotationPeriodInDays", "int")],
    "DisableKeyRotation": [("KeyId", "string!")],
    "GetKeyRotationStatus": [("KeyId", "string!")],
    "RotateKeyOnDemand": [("KeyId", "string!")],
    "ListKeyRotations": [("KeyId", "string!"), ("Limit", "int"), ("Marker", "string")],
    "PutKeyPolicy": [("KeyId", "string!"), ("PolicyName", "string"), ("Policy", "string!")],
    "GetKeyPolicy": [("KeyId", "string!"), ("PolicyName", "string")],
    "ListKeyPolicies": [("KeyId", "string!")],
    "GetPublicKey": [("KeyId", "string!"), ("GrantTokens", "tokens")],
    "Sign": [("KeyId", "string!"), ("Message", "blob!"), ("MessageType", "string"),
             ("SigningAlgorithm", "string!"), ("GrantTokens", "tokens")],
    "Verify": [("KeyId", "string!"), ("Message", "blob!"), ("MessageType", "string"),
               ("Signature", "blob!"), ("SigningAlgorithm", "string!"), ("GrantTokens", "tokens")],
    "GenerateMac": [("KeyId", "string!"), ("Message", "blob!"), ("MacAlgorithm", "string!"),
                    ("GrantTokens", "tokens")],
    "VerifyMac": [("KeyId", "string!"), ("Message", "blob!"), ("Mac", "blob!"),
                  ("MacAlgorithm", "string!"), ("GrantTokens", "tokens")],
    "DeriveSharedSecret": [("KeyId", "string!"), ("KeyAgreementAlgorithm", "string!"),
                           ("PublicKey", "blob!"), ("GrantTokens", "tokens")],
    "GenerateDataKeyPair": [("KeyId", "string!"), ("KeyPairSpec", "string!"),
                            ("EncryptionContext", "context"), ("GrantTokens", "tokens")],
    "GenerateDataKeyPairWithoutPlaintext": [("KeyId", "string!"), ("KeyPairSpec", "string!"),
                                            ("EncryptionContext", "context")],
    # ---- grants ----
    "CreateGrant": [("KeyId", "string!"), ("GranteePrincipal", "string!"),
                    ("RetiringPrincipal", "string"), ("Name", "string"),
                    ("GrantTokens", "tokens")],
    "ListGrants": [("KeyId", "string!"), ("Limit", "int"), ("Marker", "string"),
                   ("GrantId", "string"), ("GranteePrincipal", "string")],
    "ListRetirableGrants": [("RetiringPrincipal", "string!"), ("Limit", "int"),
                            ("Marker", "string")],
    "RetireGrant": [("GrantToken", "string"), ("KeyId", "string"), ("GrantId", "string")],
    "RevokeGrant": [("KeyId", "string!"), ("GrantId", "string!")],
}

WANT = {"string": "a string", "int": "an integer", "blob": "a base64 string",
        "tokens": "a list of strings", "context": "an object of strings",
        "tags": "a list of {TagKey, TagValue}", "tagkeys": "a list of strings"}


def pick(values, n, seed):
    """n of values, a different slice for each seed, so that every value is used."""
    return [values[(seed + i) % len(values)] for i in range(min(n, len(values)))]


def wrong_type_cases():
    bodies = base_bodies()
    cases = []
    seed = 0
    for op, members in MEMBERS.items():
        for name, kind in members:
            required = kind.endswith("!")
            kind = kind.rstrip("!")
            seed += 1
            bad = {"string": pick(STRING_BAD, 2, seed), "int": pick(INT_BAD, 3, seed),
                   "blob": pick(BLOB_BAD, 2, seed), "tokens": pick(TOKENS_BAD, 1, seed),
                   "context": pick(CONTEXT_BAD, 2, seed), "tags": pick(TAGS_BAD, 2, seed),
                   "tagkeys": pick(TAG_KEYS_BAD, 2, seed)}[kind]
            for value in bad:
                message = "%s must be %s" % (name, WANT[kind])
                cases.append(op_case("wrong_type", "%s.%s = %s" % (op, name, json.dumps(value)),
                                     op, with_member(bodies[op], name, value),
                                     "SerializationException", 400, message))
            if kind == "context":
                for value in pick(CONTEXT_VALUE_BAD, 2, seed):
                    message = "%s must be %s" % (name, WANT[kind])
                    cases.append(op_case("wrong_type", "%s.%s = %s" % (op, name, json.dumps(value)),
                                         op, with_member(bodies[op], name, value),
                                         "SerializationException", 400, message))
            if kind == "tokens":
                for value in pick(TOKEN_ITEMS_BAD, 1, seed):
                    cases.append(op_case("wrong_type", "%s.%s = %s" % (op, name, json.dumps(value)),
                                         op, with_member(bodies[op], name, value),
                                         "SerializationException", 400,
                                         "GrantTokens must be a list of strings"))
            if kind == "tagkeys":
                for value in pick(TAG_KEY_ITEMS_BAD, 2, seed):
                    cases.append(op_case("wrong_type", "%s.%s = %s" % (op, name, json.dumps(value)),
                                         op, with_member(bodies[op], name, value),
                                         "SerializationException", 400,
                                         "tagKeys.%d.member must be a string"
                                         % (1 + next(i for i, x in enumerate(value)
                                                     if not isinstance(x, str)))))
            if kind == "blob":
                for value in pick(BASE64_BAD, 4, seed):
                    cases.append(op_case("wrong_type", "%s.%s = %s" % (op, name, json.dumps(value)),
                                         op, with_member(bodies[op], name, value),
                                         "SerializationException", 400,
                                         "%s is not valid base64" % name))
            if required:
                # null is no value: a required member is then missing.
                lower = name[0].lower() + name[1:]
                cases.append(op_case(
                    "wrong_type", "%s.%s = null" % (op, name), op,
                    with_member(bodies[op], name, None), "ValidationException", 400,
                    "1 validation error detected: Value null at '%s' failed to satisfy "
                    "constraint: Member must not be null" % lower))
    # Members checked only with others.
    policy_body = bodies["PutKeyPolicy"]
    for value in ("yes", 1, [], {"a": 1}):
        cases.append(op_case("wrong_type", "PutKeyPolicy.BypassPolicyLockoutSafetyCheck = %r"
                             % (value,), "PutKeyPolicy",
                             with_member(policy_body, "BypassPolicyLockoutSafetyCheck", value),
                             "SerializationException", 400,
                             "BypassPolicyLockoutSafetyCheck must be a boolean"))
    create = {"Description": "bad-input never created", "Policy": C.policy}
    for value, body in (("true", create), (0, create), ("x", {"Description": "never created"})):
        cases.append(op_case("wrong_type", "CreateKey.BypassPolicyLockoutSafetyCheck = %r%s"
                             % (value, "" if "Policy" in body else " without a Policy"),
                             "CreateKey", with_member(body, "BypassPolicyLockoutSafetyCheck", value),
                             "SerializationException", 400,
                             "BypassPolicyLockoutSafetyCheck must be a boolean"))
    # MultiRegion: anything but false (or absent) is a feature p11kms lacks.
    for value in ("x", 1, []):
        cases.append(op_case("wrong_type", "CreateKey.MultiRegion = %r" % (value,), "CreateKey",
                             {"MultiRegion": value}, "UnsupportedOperationException", 400,
                             "Multi-Region keys are not supported"))
    return cases


# ---- 3. invalid values -----------------------------------------------------------------


def validation_between(member, value, low, high):
    return ("1 validation error detected: Value '%d' at '%s' failed to satisfy constraint: "
            "Member must have value between %d and %d" % (value, member, low, high))


def int_bound(member, value, bound, above):
    return ("1 validation error detected: Value '%d' at '%s' failed to satisfy constraint: "
            "Member must have value %s than or equal to %d"
            % (value, member, "less" if above else "greater", bound))


def length_bound(member, bound, above):
    return ("1 validation error detected: Value at '%s' failed to satisfy constraint: "
            "Member must have length %s than or equal to %d"
            % (member, "less" if above else "greater", bound))


def key_refs():
    """KeyId values that name no key: (label, value, __type, status)."""
    nf, arn = ("NotFoundException", 404), ("InvalidArnException", 400)
    return [
        ("unknown key id", MISSING_KEY) + nf,
        ("unknown alias", "alias/bad-input-nope") + nf,
        ("unknown alias ARN", ARN_PREFIX + "alias/bad-input-nope") + nf,
        ("key ARN of another account",
         "arn:aws:kms:%s:999999999999:key/%s" % (h.REGION, C.key)) + nf,
        ("key ARN of another region", "arn:aws:kms:eu-west-1:%s:key/%s" % (h.ACCOUNT, C.key)) + nf,
        ("not a key id", "1234") + nf,
        ("key id with braces", "{%s}" % C.key) + nf,
        ("key id with a trailing blank", C.key + " ") + nf,
        ("key id without dashes", C.key.replace("-", "")) + nf,
        ("an IAM ARN", "arn:aws:iam::%s:user/bob" % h.ACCOUNT) + arn,
        ("a KMS ARN of another resource", ARN_PREFIX + "grant/x") + arn,
        ("a bare arn:", "arn:") + arn,
    ]


def invalid_value_cases():
    B = base_bodies()
    cases = []

    def add(name, op, body, etype, status=400, message=None):
        cases.append(op_case("invalid_value", name, op, body, etype, status, message))

    # KeyId forms, spread over the operations that take one.
    alias_ops = ["DescribeKey", "GenerateDataKey", "Encrypt", "GenerateDataKeyWithoutPlaintext"]
    refs = key_refs()
    for i, (label, ref, etype, status) in enumerate(refs):
        for op in (alias_ops[i % 4], ["EnableKey", "GetKeyRotationStatus", "ListKeyPolicies",
                                      "ListKeyRotations", "GetKeyPolicy"][i % 5]):
            add("%s: KeyId %s" % (op, label), op, with_member(B[op], "KeyId", ref), etype, status)
    # Operations that take a key id or ARN only: an existing alias is no key.
    for op in ("EnableKey", "DisableKey", "ScheduleKeyDeletion", "CancelKeyDeletion",
               "EnableKeyRotation", "DisableKeyRotation", "GetKeyRotationStatus",
               "RotateKeyOnDemand", "ListKeyRotations", "PutKeyPolicy", "GetKeyPolicy"):
        add("%s: KeyId an alias" % op, op, with_member(B[op], "KeyId", ALIAS),
            "NotFoundException", 404,
            "Key '%s' does not exist: this operation takes a key id or key ARN" % ALIAS)
    add("CreateAlias: TargetKeyId an alias", "CreateAlias",
        with_member(B["CreateAlias"], "TargetKeyId", ALIAS), "NotFoundException", 404)
    add("CreateAlias: TargetKeyId unknown", "CreateAlias",
        with_member(B["CreateAlias"], "TargetKeyId", MISSING_KEY), "NotFoundException", 404)
    add("ListAliases: KeyId unknown", "ListAliases", {"KeyId": MISSING_KEY},
        "NotFoundException", 404)
    add("DescribeKey: KeyId empty", "DescribeKey", {"KeyId": ""}, "ValidationException", 400,
        length_bound("keyId", 1, False))

    # Data keys and random bytes.
    gdk = {"KeyId": C.key}
    for spec in ("AES_512", "aes_256", "RSA_2048", "SYMMETRIC_DEFAULT", ""):
        add("GenerateDataKey: KeySpec %r" % spec, "GenerateDataKey",
            with_member(gdk, "KeySpec", spec), "ValidationException")
    for n in (0, -1, 1025, 4096, 2 ** 40):
        add("GenerateDataKey: NumberOfBytes %d" % n, "GenerateDataKey",
            with_member(gdk, "NumberOfBytes", n), "ValidationException", 400,
            int_bound("numberOfBytes", n, 1 if n < 1 else 1024, n > 1))
    add("GenerateDataKey: KeySpec and NumberOfBytes", "GenerateDataKey",
        dict(gdk, KeySpec="AES_256", NumberOfBytes=32), "ValidationException", 400,
        "Please specify either number of bytes or key spec.")
    add("GenerateDataKeyWithoutPlaintext: neither KeySpec nor NumberOfBytes",
        "GenerateDataKeyWithoutPlaintext", gdk, "ValidationException", 400,
        "Please specify either number of bytes or key spec.")
    add("GenerateDataKey: Recipient", "GenerateDataKey",
        dict(gdk, KeySpec="AES_256", Recipient={"AttestationDocument": "AAAA"}),
        "UnsupportedOperationException")
    for n in (0, -5, 1025):
        add("GenerateRandom: NumberOfBytes %d" % n, "GenerateRandom", {"NumberOfBytes": n},
            "ValidationException", 400, int_bound("numberOfBytes", n, 1 if n < 1 else 1024,
                                                  n > 1))
    add("GenerateRandom: no NumberOfBytes", "GenerateRandom", {}, "ValidationException")
    add("GenerateRandom: CustomKeyStoreId", "GenerateRandom",
        {"NumberOfBytes": 8, "CustomKeyStoreId": "cks-1234567890abcdef0"},
        "UnsupportedOperationException")

    # Encrypt, Decrypt, ReEncrypt.
    enc = {"KeyId": C.key, "Plaintext": b64(MARKER)}
    add("Encrypt: empty Plaintext", "Encrypt", with_member(enc, "Plaintext", ""),
        "ValidationException", 400, length_bound("plaintext", 1, False))
    for alg in ("symmetric_default", "SM2PKE"):
        add("Encrypt: EncryptionAlgorithm %s" % alg, "Encrypt",
            with_member(enc, "EncryptionAlgorithm", alg), "ValidationException", 400,
            "1 validation error detected: Value '%s' at 'encryptionAlgorithm' failed to satisfy "
            "constraint: Member must satisfy enum value set: [SYMMETRIC_DEFAULT, "
            "RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256]" % alg)
    add("Encrypt: EncryptionAlgorithm RSAES_OAEP_SHA_256 with a symmetric key", "Encrypt",
        with_member(enc, "EncryptionAlgorithm", "RSAES_OAEP_SHA_256"), "InvalidKeyUsageException",
        400, "Algorithm RSAES_OAEP_SHA_256 is incompatible with key spec SYMMETRIC_DEFAULT and "
        "key usage ENCRYPT_DECRYPT of %skey/%s." % (ARN_PREFIX, C.key))
    blob = base64.b64decode(C.blob)
    dec = {"CiphertextBlob": C.blob, "EncryptionContext": CONTEXT}

    def blob_case(name, data, etype="InvalidCiphertextException", **extra):
        add("Decrypt: %s" % name, "Decrypt", dict(dec, CiphertextBlob=b64(data), **extra), etype)

    blob_case("a 10-byte blob", os.urandom(10))
    blob_case("format byte 2", b"\x02" + blob[1:])
    blob_case("key version 0", blob[:17] + b"\x00\x00\x00\x00" + blob[21:])
    blob_case("an unknown key version", blob[:17] + bytes(x ^ 0x5a for x in blob[17:21])
              + blob[21:])
    blob_case("an unknown key", blob[:1] + uuid.UUID(MISSING_KEY).bytes + blob[17:])
    blob_case("the tag altered", blob[:-1] + bytes([blob[-1] ^ 1]))
    blob_case("the ciphertext altered", blob[:40] + bytes([blob[40] ^ 1]) + blob[41:])
    blob_case("cut short by one byte", blob[:-1])
    blob_case("the header only", blob[:21])
    add("Decrypt: another context", "Decrypt", dict(dec, EncryptionContext={"purpose": "x"}),
        "InvalidCiphertextException")
    add("Decrypt: no context", "Decrypt", {"CiphertextBlob": C.blob},
        "InvalidCiphertextException")
    add("Decrypt: a context pair added", "Decrypt",
        dict(dec, EncryptionContext=dict(CONTEXT, extra="1")), "InvalidCiphertextException")
    add("Decrypt: KeyId of another key", "Decrypt", dict(dec, KeyId=C.scratch),
        "IncorrectKeyException")
    add("Decrypt: KeyId unknown", "Decrypt", dict(dec, KeyId=MISSING_KEY), "NotFoundException",
        404)
    add("Decrypt: empty CiphertextBlob", "Decrypt", dict(dec, CiphertextBlob=""),
        "ValidationException", 400, length_bound("ciphertextBlob", 1, False))
    add("Decrypt: Recipient", "Decrypt", dict(dec, Recipient={}), "UnsupportedOperationException")
    add("Decrypt: EncryptionAlgorithm RSAES_OAEP_SHA_1", "Decrypt",
        dict(dec, EncryptionAlgorithm="RSAES_OAEP_SHA_1"), "ValidationException")
    rex = {"CiphertextBlob": C.blob, "SourceEncryptionContext": CONTEXT,
           "DestinationKeyId": C.scratch}
    add("ReEncrypt: no DestinationKeyId", "ReEncrypt", without(rex, "DestinationKeyId"),
        "ValidationException", 400, "1 validation error detected: Value null at "
        "'destinationKeyId' failed to satisfy constraint: Member must not be null")
    add("ReEncrypt: DestinationKeyId unknown", "ReEncrypt",
        dict(rex, DestinationKeyId=MISSING_KEY), "NotFoundException", 404)
    add("ReEncrypt: SourceKeyId of another key", "ReEncrypt", dict(rex, SourceKeyId=C.scratch),
        "IncorrectKeyException")
    add("ReEncrypt: another source context", "ReEncrypt",
        dict(rex, SourceEncryptionContext={"a": "b"}), "InvalidCiphertextException")
    add("ReEncrypt: a garbage blob", "ReEncrypt", dict(rex, CiphertextBlob=b64(b"\x01" * 40)),
        "InvalidCiphertextException")
    add("ReEncrypt: SourceEncryptionAlgorithm RSAES_OAEP_SHA_256 without SourceKeyId",
        "ReEncrypt", dict(rex, SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256"),
        "ValidationException", 400, "SourceKeyId is required with SourceEncryptionAlgorithm "
        "RSAES_OAEP_SHA_256: an asymmetric ciphertext does not name its KMS key")
    add("ReEncrypt: SourceEncryptionAlgorithm RSAES_OAEP_SHA_1 with a symmetric SourceKeyId",
        "ReEncrypt", dict(rex, SourceKeyId=C.key, SourceEncryptionAlgorithm="RSAES_OAEP_SHA_1"),
        "InvalidKeyUsageException", 400, "Algorithm RSAES_OAEP_SHA_1 is incompatible with key "
        "spec SYMMETRIC_DEFAULT and key usage ENCRYPT_DECRYPT of %skey/%s." % (ARN_PREFIX, C.key))
    add("ReEncrypt: DestinationEncryptionAlgorithm x", "ReEncrypt",
        dict(rex, DestinationEncryptionAlgorithm="x"), "ValidationException")

    # Keys.
    for member, value in (("Origin", "EXTERNAL"), ("Origin", "AWS_CLOUDHSM")):
        add("CreateKey: %s %s" % (member, value), "CreateKey", {member: value},
            "UnsupportedOperationException", 400,
            "%s %s is not supported; only AWS_KMS" % (member, value))
    # Key specs and usages (docs/api.md#asymmetric-and-hmac-keys): none of these makes a key.
    for body, etype, message in (
            ({"KeySpec": "AES_256"}, "ValidationException", re.compile(
                r"^1 validation error detected: Value 'AES_256' at 'keySpec' failed to satisfy "
                r"constraint: Member must satisfy enum value set: \[RSA_2048, ")),
            ({"KeySpec": "RSA_2048", "KeyUsage": "GENERATE_VERIFY_MAC"}, "ValidationException",
             "KeyUsage GENERATE_VERIFY_MAC is not compatible with KeySpec RSA_2048: it takes "
             "ENCRYPT_DECRYPT or SIGN_VERIFY"),
            ({"CustomerMasterKeySpec": "ECC_NIST_P256"}, "ValidationException",
             "KeyUsage ENCRYPT_DECRYPT is not compatible with KeySpec ECC_NIST_P256: it takes "
             "SIGN_VERIFY or KEY_AGREEMENT (KeyUsage defaults to ENCRYPT_DECRYPT)"),
            ({"KeyUsage": "SIGN_VERIFY"}, "ValidationException",
             "KeyUsage SIGN_VERIFY is not compatible with KeySpec SYMMETRIC_DEFAULT: it takes "
             "ENCRYPT_DECRYPT"),
            ({"KeyUsage": "GENERATE_VERIFY_MAC"}, "ValidationException",
             "KeyUsage GENERATE_VERIFY_MAC is not compatible with KeySpec SYMMETRIC_DEFAULT: it "
             "takes ENCRYPT_DECRYPT"),
            ({"KeySpec": "ECC_SECG_P256K1", "KeyUsage": "SIGN_VERIFY"},
             "UnsupportedOperationException", "KeySpec ECC_SECG_P256K1 is not supported by p11kms"),
            ({"KeySpec": "HMAC_256", "CustomerMasterKeySpec": "HMAC_384"}, "ValidationException",
             "KeySpec HMAC_256 and CustomerMasterKeySpec HMAC_384 differ. CustomerMasterKeySpec "
             "is deprecated: specify KeySpec only.")):
        add("CreateKey: %s" % json.dumps(body, sort_keys=True), "CreateKey", body, etype, 400,
            message)
    add("CreateKey: MultiRegion true", "CreateKey", {"MultiRegion": True},
        "UnsupportedOperationException", 400, "Multi-Region keys are not supported")
    add("CreateKey: CustomKeyStoreId", "CreateKey", {"CustomKeyStoreId": "cks-1"},
        "UnsupportedOperationException", 400, "Custom key stores are not supported")
    add("CreateKey: empty KeySpec", "CreateKey", {"KeySpec": ""}, "ValidationException", 400,
        length_bound("keySpec", 1, False))
    add("CreateKey: empty Policy", "CreateKey", {"Policy": ""}, "ValidationException", 400,
        length_bound("policy", 1, False))
    for label, policy in (("not JSON", "not json"), ("an empty object", "{}"),
                          ("no statement", '{"Version": "2012-10-17", "Statement": []}')):
        add("CreateKey: Policy %s" % label, "CreateKey", {"Policy": policy},
            "MalformedPolicyDocumentException")
        add("PutKeyPolicy: Policy %s" % label, "PutKeyPolicy",
            dict(B["PutKeyPolicy"], Policy=policy), "MalformedPolicyDocumentException")
    add("PutKeyPolicy: PolicyName other", "PutKeyPolicy",
        dict(B["PutKeyPolicy"], PolicyName="other"), "NotFoundException", 404,
        'A key has one policy, named "default"')
    add("GetKeyPolicy: PolicyName other", "GetKeyPolicy",
        dict(B["GetKeyPolicy"], PolicyName="other"), "NotFoundException", 404,
        'A key has one policy, named "default"')
    add("CancelKeyDeletion: key not pending deletion", "CancelKeyDeletion",
        {"KeyId": C.scratch}, "KMSInvalidStateException", 409)
    for days in (6, 31, 0, 1):
        msg = validation_between("pendingWindowInDays", days, 7, 30) if days else (
            "1 validation error detected: Value '0' at 'pendingWindowInDays' failed to "
            "satisfy constraint: Member must have value greater than or equal to 1")
        add("ScheduleKeyDeletion: PendingWindowInDays %d" % days, "ScheduleKeyDeletion",
            {"KeyId": C.scratch, "PendingWindowInDays": days}, "ValidationException", 400, msg)
    for days in (-1, 366):
        add("ScheduleKeyDeletion: PendingWindowInDays %d" % days, "ScheduleKeyDeletion",
            {"KeyId": C.scratch, "PendingWindowInDays": days}, "ValidationException", 400,
            int_bound("pendingWindowInDays", days, 0 if days < 0 else 365, days > 0))
    for days in (89, 2561, 1):
        add("EnableKeyRotation: RotationPeriodInDays %d" % days, "EnableKeyRotation",
            {"KeyId": C.scratch, "RotationPeriodInDays": days}, "ValidationException", 400,
            validation_between("rotationPeriodInDays", days, 90, 2560))
    for days in (0, -1, 100001):
        add("EnableKeyRotation: RotationPeriodInDays %d" % days, "EnableKeyRotation",
            {"KeyId": C.scratch, "RotationPeriodInDays": days}, "ValidationException", 400,
            int_bound("rotationPeriodInDays", days, 1 if days < 1 else 100000, days > 1))

    # Aliases.
    for name, etype in (("orders", "ValidationException"), ("alias/", "ValidationException"),
                        ("alias", "ValidationException"), ("ALIAS/x", "ValidationException"),
                        ("alias/has space", "ValidationException"),
                        ("alias/caf\u00e9", "ValidationException"),
                        ("alias/a*b", "ValidationException"),
                        ("alias/aws/x", "InvalidAliasNameException"),
                        ("alias/aws/", "InvalidAliasNameException")):
        add("CreateAlias: AliasName %r" % name, "CreateAlias",
            dict(B["CreateAlias"], AliasName=name), etype)
    add("CreateAlias: an alias in use", "CreateAlias", dict(B["CreateAlias"], AliasName=ALIAS),
        "AlreadyExistsException", 409)
    add("CreateAlias: empty AliasName", "CreateAlias", dict(B["CreateAlias"], AliasName=""),
        "ValidationException", 400, length_bound("aliasName", 1, False))
    add("UpdateAlias: unknown alias", "UpdateAlias",
        dict(B["UpdateAlias"], AliasName="alias/bad-input-nope"), "NotFoundException", 404)
    add("UpdateAlias: reserved alias", "UpdateAlias",
        dict(B["UpdateAlias"], AliasName="alias/aws/kms"), "InvalidAliasNameException")
    add("UpdateAlias: TargetKeyId unknown", "UpdateAlias",
        dict(B["UpdateAlias"], TargetKeyId=MISSING_KEY), "NotFoundException", 404)
    add("UpdateAlias: AliasName without prefix", "UpdateAlias",
        dict(B["UpdateAlias"], AliasName="bad-input-main"), "ValidationException")
    add("DeleteAlias: unknown alias", "DeleteAlias", {"AliasName": "alias/bad-input-nope"},
        "NotFoundException", 404)
    add("DeleteAlias: reserved alias", "DeleteAlias", {"AliasName": "alias/aws/ebs"},
        "InvalidAliasNameException")
    add("DeleteAlias: without prefix", "DeleteAlias", {"AliasName": "bad-input-main"},
        "ValidationException")

    # Lists.
    # AWS's ranges of Limit: ListAliases 1-100, ListResourceTags 1-50, the others 1-1000.
    for op, most in (("ListKeys", 1000), ("ListAliases", 100), ("ListKeyRotations", 1000),
                     ("ListResourceTags", 50)):
        base = {"KeyId": C.scratch} if op in ("ListKeyRotations", "ListResourceTags") else {}
        for limit in (0, -1, most + 1):
            add("%s: Limit %d" % (op, limit), op, dict(base, Limit=limit), "ValidationException",
                400, int_bound("limit", limit, 1 if limit < 1 else most, limit > 1))
    # A marker no page answered: InvalidMarkerException, as AWS's model lists it.
    for marker in ("garbage", C.key + "x", "00000000-0000-0000-0000-00000000000g"):
        add("ListKeys: Marker %r" % marker, "ListKeys", {"Marker": marker},
            "InvalidMarkerException", 400, "Marker is not valid")
    for marker in ("1", "0", "abc", "-2", "4294967296", "2x"):
        add("ListKeyRotations: Marker %r" % marker, "ListKeyRotations",
            {"KeyId": C.scratch, "Marker": marker}, "InvalidMarkerException", 400,
            "Marker is not valid")
    for marker in ("garbage", "alias/", "alias/aws/x", "a" * 300):
        add("ListAliases: Marker %r" % marker[:20], "ListAliases", {"Marker": marker},
            "InvalidMarkerException", 400, "Marker is not valid")
    add("ListResourceTags: Marker not base64", "ListResourceTags",
        {"KeyId": C.scratch, "Marker": "not base64!"}, "InvalidMarkerException", 400,
        "Marker is not valid")
    add("ListKeys: empty Marker", "ListKeys", {"Marker": ""}, "ValidationException", 400,
        length_bound("marker", 1, False))
    return cases


# ---- 4. oversized ----------------------------------------------------------------------


def padded(body, size):
    body = encode(body)
    return body + b" " * (size - len(body))


def oversized_cases():
    cases = []
    too_large = "The request body is larger than %d bytes" % MAX_BODY

    def big(name, build, send):
        cases.append(Case("oversized", name, build, "ValidationException", 413, "size",
                          message=too_large, send=send))

    big("DescribeKey body of max_body + 1 bytes",
        lambda: signed("DescribeKey", padded({"KeyId": C.key}, MAX_BODY + 1)), "fresh")
    big("GenerateDataKey body of 2 MiB",
        lambda: signed("GenerateDataKey", padded({"KeyId": C.key}, 2 << 20)), "fresh")
    big("unsigned body of 1 MiB", lambda: unsigned("Encrypt", padded({}, 1 << 20)), "fresh")
    big("chunked body of max_body + 1 bytes",
        lambda: chunked(signed("DescribeKey", padded({"KeyId": C.key}, MAX_BODY + 1))), "raw")
    big("chunked body of 2 MiB",
        lambda: chunked(signed("Encrypt", padded({"KeyId": C.key}, 2 << 20)), 65536), "raw")

    # Headers above max_header: libmicrohttpd answers 431 itself, with an HTML
    # page (no JSON) and no audit line; only the status is asserted.
    def huge_header(method, path, size):
        req = Req(method, path, [("X-Filler", "a" * size)])
        return lambda: RawBytes([head_bytes(req) + b"\r\n"], method)

    for method, path, size in (("POST", "/", MAX_HEADER + 4096), ("POST", "/", 64 << 10),
                               ("GET", "/healthz", MAX_HEADER + 1)):
        cases.append(Case("oversized", "%s %s with a %d-byte header" % (method, path, size),
                          huge_header(method, path, size), None, 431, "mhd", send="raw"))

    def signed_with_huge_header():
        req = signed("DescribeKey", {"KeyId": C.key}, extra=[("X-Filler", "b" * MAX_HEADER)])
        return RawBytes([head_bytes(req) + b"Content-Length: %d\r\n\r\n" % len(req.body)
                         + req.body])

    cases.append(Case("oversized", "signed request with a header of max_header bytes",
                      signed_with_huge_header, None, 431, "mhd", send="raw"))

    def many_headers(n):
        def build():
            req = signed("DescribeKey", {"KeyId": C.key})
            req.headers += [("X-Filler-%03d" % i, "v") for i in range(n)]
            return req
        return build

    # p11kmsd reads at most 64 header fields; libmicrohttpd refuses (431)
    # what does not fit in max_header, its bookkeeping included.
    for n in (64, 120):
        cases.append(Case("oversized", "signed request with %d more headers" % n,
                          many_headers(n), "ValidationException", 400, "auth",
                          message="The request has too many headers"))
    cases.append(Case("oversized", "signed request with 250 more headers", many_headers(250),
                      None, 431, "mhd", send="fresh"))
    cases.append(Case("oversized", "an 8 KiB X-Amz-Target",
                      lambda: signed(None, {}, target="TrentService." + "X" * 8192),
                      "UnknownOperationException", 400, "route",
                      message="Unknown operation TrentService." + "X" * 115))
    cases.append(Case("oversized", "a 12 KiB Authorization",
                      lambda: signed("DescribeKey", {"KeyId": C.key}).replace(
                          "Authorization", "AWS4-HMAC-SHA256 Credential=" + "A" * 12000),
                      "IncompleteSignatureException", 400, "auth",
                      message="Authorization header requires 'SignedHeaders' parameter"))

    B = base_bodies()

    def member(name, op, body, low_member, bound):
        cases.append(op_case("oversized", name, op, body, "ValidationException", 400,
                             length_bound(low_member, bound, True)))

    member("CreateKey: Description of 8193 characters", "CreateKey",
           {"Description": "d" * 8193}, "description", 8192)
    member("CreateKey: Policy of 32769 bytes", "CreateKey", {"Policy": " " * 32769}, "policy",
           32768)
    member("PutKeyPolicy: Policy of 32769 bytes", "PutKeyPolicy",
           dict(B["PutKeyPolicy"], Policy=" " * 32769), "policy", 32768)
    member("DescribeKey: KeyId of 2049 characters", "DescribeKey", {"KeyId": "k" * 2049},
           "keyId", 2048)
    member("Encrypt: KeyId of 4000 characters", "Encrypt",
           {"KeyId": "alias/" + "k" * 3994, "Plaintext": b64(MARKER)}, "keyId", 2048)
    member("CreateAlias: AliasName of 257 characters", "CreateAlias",
           dict(B["CreateAlias"], AliasName="alias/" + "a" * 251), "aliasName", 256)
    member("DeleteAlias: AliasName of 300 characters", "DeleteAlias",
           {"AliasName": "alias/" + "a" * 294}, "aliasName", 256)
    member("Encrypt: Plaintext of 4097 bytes", "Encrypt",
           {"KeyId": C.key, "Plaintext": b64_of_size(4097)}, "plaintext", 4096)
    member("Encrypt: Plaintext of 40000 bytes", "Encrypt",
           {"KeyId": C.key, "Plaintext": b64_of_size(40000)}, "plaintext", 4096)
    member("Decrypt: CiphertextBlob of 6145 bytes", "Decrypt",
           {"CiphertextBlob": b64_of_size(6145)}, "ciphertextBlob", 6144)
    member("ReEncrypt: CiphertextBlob of 45000 bytes", "ReEncrypt",
           {"CiphertextBlob": b64_of_size(45000), "DestinationKeyId": C.key}, "ciphertextBlob",
           6144)
    member("ListKeys: Marker of 1025 characters", "ListKeys", {"Marker": "m" * 1025}, "marker",
           1024)
    member("ListKeyRotations: Marker of 1025 characters", "ListKeyRotations",
           {"KeyId": C.scratch, "Marker": "9" * 1025}, "marker", 1024)
    member("GenerateDataKey: KeySpec of 17 characters", "GenerateDataKey",
           {"KeyId": C.key, "KeySpec": "AES_256" + "0" * 10}, "keySpec", 16)
    member("Encrypt: EncryptionAlgorithm of 65 characters", "Encrypt",
           dict(B["Encrypt"], EncryptionAlgorithm="S" * 65), "encryptionAlgorithm", 64)
    member("GetKeyPolicy: PolicyName of 129 characters", "GetKeyPolicy",
           dict(B["GetKeyPolicy"], PolicyName="p" * 129), "policyName", 128)
    for op in ("DescribeKey", "Encrypt", "GenerateDataKey"):
        cases.append(op_case("oversized", "%s: 11 GrantTokens" % op, op,
                             dict(B[op], GrantTokens=["t"] * 11), "ValidationException", 400,
                             "1 validation error detected: Value at 'grantTokens' failed to "
                             "satisfy constraint: Member must have length less than or equal "
                             "to 10"))
    for label, ctx in (("a value of 8193 bytes", {"k": "v" * 8193}),
                       ("a key of 8193 bytes", {"k" * 8193: "v"}),
                       ("500 pairs", {"key%03d" % i: "v" * 10 for i in range(500)})):
        for op, body in (("Encrypt", dict(B["Encrypt"], EncryptionContext=ctx)),
                         ("GenerateDataKey", dict(B["GenerateDataKey"], EncryptionContext=ctx))):
            cases.append(op_case("oversized", "%s: EncryptionContext with %s" % (op, label), op,
                                 body, "ValidationException", 400,
                                 "The encryption context is too large"))
    return cases


# ---- 5. protocol ---------------------------------------------------------------------


def protocol_cases():
    cases = []
    for method, path in (("GET", "/"), ("PUT", "/"), ("DELETE", "/"), ("PATCH", "/"),
                         ("OPTIONS", "/"), ("BREW", "/"), ("POST", "/foo"),
                         ("POST", "/healthz"), ("POST", "/metrics"), ("POST", "//"),
                         ("POST", "/index.html"), ("GET", "/nope"), ("GET", "/metrics/x"),
                         ("GET", "/healthz/"), ("POST", "/TrentService.DescribeKey")):
        for signed_too in (False, True) if method in ("PUT", "POST") else (False,):
            def build(method=method, path=path, signed_too=signed_too):
                req = signed("DescribeKey", {"KeyId": C.key}) if signed_too else \
                    unsigned("DescribeKey", {"KeyId": C.key})
                req.method, req.path = method, path
                return req
            cases.append(Case("protocol", "%s %s%s" % (method, path,
                                                       " (signed)" if signed_too else ""),
                              build, "UnknownOperationException", 400, "http",
                              message=NOT_SERVED))
    for label, target in (("none", False), ("empty", ""), ("the prefix only", "TrentService."),
                          ("lower-case operation", "TrentService.describekey"),
                          ("lower-case service", "trentservice.DescribeKey"),
                          ("a suffix", "TrentService.DescribeKeyX"),
                          ("a dotted suffix", "TrentService.DescribeKey.Extra"),
                          ("the prefix twice", "TrentService.TrentService.DescribeKey"),
                          ("no prefix", "DescribeKey"),
                          ("DynamoDB", "DynamoDB_20120810.ListTables"),
                          ("SSM", "AmazonSSM.GetParameter"),
                          ("KMS under another prefix", "TrentService2.DescribeKey"),
                          ("UpdatePrimaryRegion", "TrentService.UpdatePrimaryRegion"),
                          ("createGrant (case matters)", "TrentService.createGrant"),
                          ("ReplicateKey", "TrentService.ReplicateKey"),
                          ("GetParametersForImport", "TrentService.GetParametersForImport"),
                          ("ImportKeyMaterial", "TrentService.ImportKeyMaterial"),
                          ("a DEL character", "TrentService.Describe\x7fKey")):
        message = ("The request names no operation (X-Amz-Target)" if target is False
                   else "Unknown operation %s" % target)
        cases.append(Case("protocol", "X-Amz-Target %s" % label,
                          lambda target=target: signed(None, {"KeyId": C.key}, target=target),
                          "UnknownOperationException", 400, "route", message=message))
    for label, ctype in (("none", None), ("application/json", "application/json"),
                         ("text/plain", "text/plain"),
                         ("form", "application/x-www-form-urlencoded"),
                         ("multipart", "multipart/form-data; boundary=x"),
                         ("truncated", "application/x-amz-json"),
                         ("JSON 1.2", "application/x-amz-json-1.2"),
                         ("with a suffix", h.JSON_TYPE + "garbage"),
                         ("1.1 with a dot more", h.JSON_TYPE + ".1"),
                         ("CBOR", "application/x-amz-cbor-1.1")):
        for op in ("DescribeKey", "GenerateRandom"):
            body = {"KeyId": C.key} if op == "DescribeKey" else {"NumberOfBytes": 8}
            cases.append(Case("protocol", "%s with Content-Type %s" % (op, label),
                              lambda op=op, body=body, ctype=ctype:
                              signed(op, body, content_type=ctype),
                              "SerializationException", 400, "op", op, WRONG_CONTENT_TYPE))
    # Bad framing: libmicrohttpd's own 400 page (HTML); the connection closes.
    framing = [
        ("a chunk size that is not hex",
         lambda: RawBytes([head_bytes(signed("DescribeKey", {"KeyId": C.key}))
                           + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"])),
        ("a header line without a colon",
         lambda: RawBytes([head_bytes(unsigned("DescribeKey", {}))
                           + b"Bad Header Line\r\nContent-Length: 0\r\n\r\n"])),
    ]
    for name, build in framing:
        cases.append(Case("protocol", name, build, None, 400, "mhd", send="raw"))

    # Two Content-Length headers: which one ends the body is in doubt (a proxy
    # may have read the other), so p11kmsd refuses before reading it.
    def two_lengths(second):
        req = signed("DescribeKey", {"KeyId": C.key})
        n = len(req.body)
        return RawBytes([head_bytes(req) + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                         % (n, second(n)) + req.body])

    for label, second in (("differing", lambda n: n + 1), ("equal", lambda n: n)):
        cases.append(Case("protocol", "two Content-Length headers, %s" % label,
                          lambda second=second: two_lengths(second), "ValidationException", 400,
                          "http", message="The request has more than one Content-Length header",
                          send="raw"))
    return cases


# ---- 6. authentication -----------------------------------------------------------------


def auth_parts(req):
    """(credential, signed headers, signature) of req's Authorization."""
    m = re.match(r"^AWS4-HMAC-SHA256 Credential=([^,]+), SignedHeaders=([^,]+), "
                 r"Signature=([0-9a-f]{64})$", req.get("Authorization"))
    return m.group(1), m.group(2), m.group(3)


def with_auth(fn, op="DescribeKey", body=None):
    """A valid signed request whose Authorization is replaced by fn(credential,
    signed headers, signature)."""
    def build():
        req = signed(op, {"KeyId": C.key} if body is None else body)
        return req.replace("Authorization", fn(*auth_parts(req)))
    return build


def with_scope(fn):
    """As with_auth, with the credential's parts (access key, date, region,
    service, terminator) changed by fn."""
    def change(cred, sh, sig):
        return "AWS4-HMAC-SHA256 Credential=%s, SignedHeaders=%s, Signature=%s" % (
            "/".join(fn(cred.split("/"))), sh, sig)
    return with_auth(change)


def swap(parts, i, value):
    parts = list(parts)
    parts[i] = value
    return parts


def auth_cases():
    cases = []
    incomplete, invalid = "IncompleteSignatureException", "InvalidSignatureException"

    def add(name, build, etype, message, stage="auth"):
        cases.append(Case("auth", name, build, etype, 400, stage, message=message))

    missing = "Request is missing Authentication Token"
    for op, body in (("DescribeKey", {"KeyId": C.key}), ("Encrypt", {"KeyId": C.key,
                                                                       "Plaintext": b64(MARKER)}),
                     ("CreateKey", {}), ("ScheduleKeyDeletion", {"KeyId": C.scratch}),
                     ("ListKeys", {}), ("GenerateRandom", {"NumberOfBytes": 8}),
                     ("Decrypt", {"CiphertextBlob": C.blob}), (None, {}), ("NoSuchOp", {})):
        add("unsigned %s" % op, lambda op=op, body=body: unsigned(op, body),
            "MissingAuthenticationTokenException", missing)
    add("unsigned with a malformed body", lambda: unsigned("DescribeKey", b"{"),
        "MissingAuthenticationTokenException", missing)
    add("unsigned without Content-Type", lambda: unsigned("DescribeKey", {}, content_type=None),
        "MissingAuthenticationTokenException", missing)
    add("signature headers without Authorization",
        lambda: signed("DescribeKey", {"KeyId": C.key}).replace("Authorization", None),
        "MissingAuthenticationTokenException", missing)

    must_use = "Authorization header must use AWS4-HMAC-SHA256"
    for label, fn in (
            ("empty", lambda c, s, g: ""),
            ("the algorithm only", lambda c, s, g: "AWS4-HMAC-SHA256"),
            ("SHA-512", lambda c, s, g: "AWS4-HMAC-SHA512 Credential=%s, SignedHeaders=%s, "
                                        "Signature=%s" % (c, s, g)),
            ("lower-case algorithm", lambda c, s, g: "aws4-hmac-sha256 Credential=%s, "
                                                     "SignedHeaders=%s, Signature=%s" % (c, s, g)),
            ("SigV2", lambda c, s, g: "AWS %s:%s" % (C.principal.access_key, g)),
            ("Basic", lambda c, s, g: "Basic dGVzdGVyOnNlY3JldA=="),
            ("Bearer", lambda c, s, g: "Bearer abc.def.ghi")):
        add("Authorization %s" % label, with_auth(fn), incomplete, must_use)
    for label, fn, message in (
            ("without Credential", lambda c, s, g: "AWS4-HMAC-SHA256 SignedHeaders=%s, "
                                                   "Signature=%s" % (s, g), "Credential"),
            ("without SignedHeaders", lambda c, s, g: "AWS4-HMAC-SHA256 Credential=%s, "
                                                      "Signature=%s" % (c, g), "SignedHeaders"),
            ("without Signature", lambda c, s, g: "AWS4-HMAC-SHA256 Credential=%s, "
                                                  "SignedHeaders=%s" % (c, s), "Signature"),
            ("empty Credential", lambda c, s, g: "AWS4-HMAC-SHA256 Credential=, "
                                                 "SignedHeaders=%s, Signature=%s" % (s, g),
             "Credential"),
            ("empty SignedHeaders", lambda c, s, g: "AWS4-HMAC-SHA256 Credential=%s, "
                                                    "SignedHeaders=, Signature=%s" % (c, g),
             "SignedHeaders"),
            ("empty Signature", lambda c, s, g: "AWS4-HMAC-SHA256 Credential=%s, "
                                                "SignedHeaders=%s, Signature=" % (c, s),
             "Signature"),
            ("nothing after the algorithm", lambda c, s, g: "AWS4-HMAC-SHA256 ", "Credential")):
        add("Authorization %s" % label, with_auth(fn), incomplete,
            "Authorization header requires '%s' parameter" % message)
    malformed = "Credential is malformed"
    for label, fn, etype, message in (
            ("a credential without scope", lambda p: p[:1], incomplete, malformed),
            ("a credential with 3 parts", lambda p: p[:3], incomplete, malformed),
            ("a credential with 6 parts", lambda p: p + ["x"], incomplete, malformed),
            ("an empty access key", lambda p: swap(p, 0, ""), incomplete, malformed),
            ("a 7-digit date", lambda p: swap(p, 1, p[1][:7]), incomplete, malformed),
            ("an empty region", lambda p: swap(p, 2, ""), incomplete, malformed),
            ("an empty service", lambda p: swap(p, 3, ""), incomplete, malformed),
            ("a non-digit date", lambda p: swap(p, 1, p[1][:6] + "ab"), incomplete,
             "Credential date is malformed"),
            ("terminator aws4_reques", lambda p: swap(p, 4, "aws4_reques"), incomplete,
             "Credential should be scoped with a valid terminator: 'aws4_request'"),
            ("terminator aws4_request2", lambda p: swap(p, 4, "aws4_request2"), incomplete,
             "Credential should be scoped with a valid terminator: 'aws4_request'"),
            ("terminator AWS4_REQUEST", lambda p: swap(p, 4, "AWS4_REQUEST"), incomplete,
             "Credential should be scoped with a valid terminator: 'aws4_request'"),
            ("region eu-west-1", lambda p: swap(p, 2, "eu-west-1"), invalid,
             "Credential should be scoped to a valid region: '%s'." % h.REGION),
            ("region US-EAST-1", lambda p: swap(p, 2, "US-EAST-1"), invalid,
             "Credential should be scoped to a valid region: '%s'." % h.REGION),
            ("service s3", lambda p: swap(p, 3, "s3"), invalid,
             "Credential should be scoped to correct service: 'kms'."),
            ("service KMS", lambda p: swap(p, 3, "KMS"), invalid,
             "Credential should be scoped to correct service: 'kms'."),
            ("yesterday's date", lambda p: swap(p, 1, yesterday(p[1])), invalid,
             "Credential date does not match X-Amz-Date"),
            ("an unknown access key", lambda p: swap(p, 0, "AKIA" + "Z" * 16),
             "UnrecognizedClientException", "The security token included in the request is "
                                             "invalid."),
            ("the access key in lower case", lambda p: swap(p, 0, p[0].lower()),
             "UnrecognizedClientException", "The security token included in the request is "
                                             "invalid.")):
        add("scope with %s" % label, with_scope(fn), etype, message)

    # Signatures that do not match.
    stranger = h.new_principal("stranger")
    wrong_secret = h.Principal(C.principal.access_key, stranger.secret, "tester")
    add("an unknown access key, properly signed",
        lambda: signed("DescribeKey", {"KeyId": C.key}, principal=stranger),
        "UnrecognizedClientException",
        "The security token included in the request is invalid.")
    for op, body in (("DescribeKey", {"KeyId": C.key}), ("GenerateDataKey",
                                                          {"KeyId": C.key, "KeySpec": "AES_256"})):
        add("%s signed with a wrong secret" % op,
            lambda op=op, body=body: signed(op, body, principal=wrong_secret), invalid,
            SIG_MISMATCH)
    for label, fn in (("all zero", lambda g: "0" * 64), ("upper case", lambda g: g.upper()),
                      ("one digit changed", lambda g: g[:-1] + ("0" if g[-1] != "0" else "1")),
                      ("cut short", lambda g: g[:63]), ("one digit more", lambda g: g + "0"),
                      ("base64", lambda g: base64.b64encode(bytes.fromhex(g)).decode())):
        add("signature %s" % label, with_auth(
            lambda c, s, g, fn=fn: "AWS4-HMAC-SHA256 Credential=%s, SignedHeaders=%s, "
                                   "Signature=%s" % (c, s, fn(g))), invalid, SIG_MISMATCH)

    def body_changed(send_body):
        def build():
            req = signed("DescribeKey", {"KeyId": C.key})
            req.body = send_body
            return req
        return build

    for label, send_body in (("another key", encode({"KeyId": C.scratch})),
                             ("a blank added", encode({"KeyId": C.key}) + b" "),
                             ("no body", b""),
                             ("the members reordered", encode({"GrantTokens": [],
                                                               "KeyId": C.key}))):
        add("signature over a different body: %s" % label, body_changed(send_body), invalid,
            SIG_MISMATCH)
    add("x-amz-content-sha256 of another body",
        lambda: signed("DescribeKey", {"KeyId": C.key}, extra=[
            ("X-Amz-Content-Sha256", "0" * 64)]), invalid,
        "The provided 'x-amz-content-sha256' header does not match what was computed.")
    add("SignedHeaders without host",
        lambda: signed("DescribeKey", {"KeyId": C.key}, drop=("host",)), invalid,
        "'Host' must be a signed header")
    add("SignedHeaders without x-amz-date",
        lambda: signed("DescribeKey", {"KeyId": C.key}, drop=("x-amz-date",)), invalid,
        "'X-Amz-Date' must be a signed header")
    add("SignedHeaders naming a header not sent", with_auth(
        lambda c, s, g: "AWS4-HMAC-SHA256 Credential=%s, SignedHeaders=%s;x-not-sent, "
                        "Signature=%s" % (c, s, g)), incomplete,
        "A signed header is missing from the request")
    add("SignedHeaders with an empty name", with_auth(
        lambda c, s, g: "AWS4-HMAC-SHA256 Credential=%s, SignedHeaders=host;;x-amz-date, "
                        "Signature=%s" % (c, g)), incomplete, "SignedHeaders is malformed")
    add("a signed header removed", lambda: signed("DescribeKey", {"KeyId": C.key}).replace(
        "Content-Type", None), incomplete, "A signed header is missing from the request")
    return cases


def yesterday(day):
    d = datetime.datetime.strptime(day, "%Y%m%d") - datetime.timedelta(days=1)
    return d.strftime("%Y%m%d")


# ---- 7. dates ----------------------------------------------------------------------------


def stale_cases():
    cases = []
    expired = re.compile(r"^Signature expired: \d{8}T\d{6}Z is not within 5 minutes of the "
                         r"server's time$")
    for label, seconds in (("10 minutes old", -600), ("10 minutes ahead", 600),
                           ("an hour old", -3600), ("a day ahead", 86400),
                           ("a year old", -365 * 86400), ("5 minutes and 30 s old", -330),
                           ("5 minutes and 30 s ahead", 330)):
        for op, body in (("DescribeKey", {"KeyId": C.key}), ("Encrypt",
                                                              {"KeyId": C.key,
                                                               "Plaintext": b64(MARKER)})):
            cases.append(Case(
                "stale", "%s signed %s" % (op, label),
                lambda op=op, body=body, seconds=seconds: signed(
                    op, body, when=h.utcnow() + datetime.timedelta(seconds=seconds)),
                "InvalidSignatureException", 400, "auth", message=expired, varying=True))
    for value in ("19700101T000000Z", "99991231T235959Z"):
        cases.append(Case("stale", "X-Amz-Date %s" % value,
                          lambda value=value: signed("DescribeKey", {"KeyId": C.key}).replace(
                              "X-Amz-Date", value), "InvalidSignatureException", 400, "auth",
                          message="Signature expired: %s is not within 5 minutes of the "
                                  "server's time" % value))
    form = "X-Amz-Date must be in the form YYYYMMDD'T'HHMMSS'Z'"
    for value in ("", "20240101", "2024-01-01T00:00:00Z", "20240101T000000", "20241301T000000Z",
                  "20240100T000000Z", "20240132T000000Z", "20240101T240000Z",
                  "20240101T006000Z", "2024010aT000000Z", "20240101 000000Z",
                  "Mon, 01 Jan 2024 00:00:00 GMT", "20240101T000000ZZ"):
        cases.append(Case("stale", "X-Amz-Date %r" % value,
                          lambda value=value: signed("DescribeKey", {"KeyId": C.key}).replace(
                              "X-Amz-Date", value), "IncompleteSignatureException", 400, "auth",
                          message=form))
    cases.append(Case("stale", "no X-Amz-Date",
                      lambda: signed("DescribeKey", {"KeyId": C.key}).replace("X-Amz-Date",
                                                                              None),
                      "IncompleteSignatureException", 400, "auth",
                      message="Authorization header requires existence of a 'X-Amz-Date' "
                              "header."))
    cases.append(Case("stale", "X-Amz-Date moved by a minute",
                      lambda: redated(signed("DescribeKey", {"KeyId": C.key}), -60),
                      "InvalidSignatureException", 400, "auth", message=SIG_MISMATCH))
    return cases


def redated(req, seconds):
    when = datetime.datetime.strptime(req.get("X-Amz-Date"), "%Y%m%dT%H%M%SZ")
    when += datetime.timedelta(seconds=seconds)
    return req.replace("X-Amz-Date", when.strftime("%Y%m%dT%H%M%SZ"))


# ---- 8. replayed to another operation ---------------------------------------------------


def replay_cases():
    """A request signed for one operation, sent as another: the X-Amz-Target
    (and body) differ from what the signature covers."""
    enc = {"KeyId": C.key, "Plaintext": b64(MARKER)}
    pairs = [
        ("DescribeKey", {"KeyId": C.scratch}, "DisableKey", None),
        ("DescribeKey", {"KeyId": C.scratch}, "ScheduleKeyDeletion",
         {"KeyId": C.scratch, "PendingWindowInDays": 7}),
        ("GetKeyRotationStatus", {"KeyId": C.scratch}, "EnableKeyRotation", None),
        ("GetKeyRotationStatus", {"KeyId": C.scratch}, "RotateKeyOnDemand", None),
        ("ListKeyPolicies", {"KeyId": C.scratch}, "PutKeyPolicy",
         {"KeyId": C.scratch, "PolicyName": "default", "Policy": C.policy}),
        ("ListKeys", {}, "CreateKey", None),
        ("ListAliases", {}, "DeleteAlias", {"AliasName": ALIAS}),
        ("ListAliases", {}, "CreateAlias", {"AliasName": "alias/bad-input-replayed",
                                            "TargetKeyId": C.scratch}),
        ("Encrypt", enc, "Decrypt", {"CiphertextBlob": C.blob, "EncryptionContext": CONTEXT}),
        ("Encrypt", enc, "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256"}),
        ("GenerateDataKeyWithoutPlaintext", {"KeyId": C.key, "KeySpec": "AES_256"},
         "GenerateDataKey", None),
        ("GenerateRandom", {"NumberOfBytes": 16}, "GenerateDataKey",
         {"KeyId": C.key, "NumberOfBytes": 16}),
        ("Decrypt", {"CiphertextBlob": C.blob, "EncryptionContext": CONTEXT}, "ReEncrypt",
         {"CiphertextBlob": C.blob, "SourceEncryptionContext": CONTEXT,
          "DestinationKeyId": C.scratch}),
        ("GetKeyPolicy", {"KeyId": C.scratch, "PolicyName": "default"}, "PutKeyPolicy", None),
        ("DescribeKey", {"KeyId": C.key}, "NoSuchOperation", None),
    ]
    cases = []
    for a, body_a, b, body_b in pairs:
        def build(a=a, body_a=body_a, b=b, body_b=body_b):
            req = signed(a, body_a).replace("X-Amz-Target", "TrentService." + b)
            if body_b is not None:
                req.body = encode(body_b)
            return req
        cases.append(Case("replay", "%s replayed as %s%s" % (
            a, b, " with its body" if body_b is not None else ""), build,
            "InvalidSignatureException", 400, "auth", message=SIG_MISMATCH))

    def stale_replay():
        req = signed("DescribeKey", {"KeyId": C.scratch},
                     when=h.utcnow() - datetime.timedelta(seconds=600))
        return req.replace("X-Amz-Target", "TrentService.DisableKey")

    cases.append(Case("replay", "a 10-minute-old DescribeKey replayed as DisableKey",
                      stale_replay, "InvalidSignatureException", 400, "auth",
                      message=re.compile(r"^Signature expired: "), varying=True))

    # Signed without X-Amz-Target in SignedHeaders: the same signature would
    # serve any operation, so the server requires the target to be signed.
    def unsigned_target(b=None):
        req = signed("DescribeKey", {"KeyId": C.scratch}, drop=("x-amz-target",))
        return req.replace("X-Amz-Target", "TrentService." + b) if b else req

    for b in (None, "DisableKey", "ScheduleKeyDeletion"):
        cases.append(Case("replay", "DescribeKey signed without its target%s" % (
            ", replayed as " + b if b else ""), lambda b=b: unsigned_target(b),
            "InvalidSignatureException", 400, "auth",
            message="'X-Amz-Target' must be a signed header"))

    def twice_target():
        req = signed("DescribeKey", {"KeyId": C.scratch})
        req.headers.append(("X-Amz-Target", "TrentService.DisableKey"))
        return req

    cases.append(Case("replay", "a second X-Amz-Target added", twice_target,
                      "InvalidSignatureException", 400, "auth", message=SIG_MISMATCH))

    def other_host():
        req = signed("DescribeKey", {"KeyId": C.key})
        req.host = "localhost:%d" % C.server.port
        return req

    cases.append(Case("replay", "sent with another Host", other_host,
                      "InvalidSignatureException", 400, "auth", message=SIG_MISMATCH))

    def query_added():
        req = signed("DescribeKey", {"KeyId": C.key})
        req.path = "/?Action=DisableKey"
        return req

    cases.append(Case("replay", "sent with a query string", query_added,
                      "InvalidSignatureException", 400, "auth", message=SIG_MISMATCH))
    cases.append(Case("replay", "sent with Content-Type 1.0", lambda: signed(
        "DescribeKey", {"KeyId": C.key}).replace("Content-Type", "application/x-amz-json-1.0"),
        "InvalidSignatureException", 400, "auth", message=SIG_MISMATCH))
    return cases


# ---- 9. Encrypt with a marker plaintext ----------------------------------------------------


def marker_cases():
    """Encrypt requests whose Plaintext is the marker, refused for another
    member. (The valid ones are in valid_cases.)"""
    m = b64(MARKER)
    bad = [
        ("KeyId 5", {"KeyId": 5, "Plaintext": m}, "SerializationException", 400),
        ("EncryptionContext []", {"KeyId": C.key, "Plaintext": m, "EncryptionContext": []},
         "SerializationException", 400),
        ("EncryptionContext {a: 1}", {"KeyId": C.key, "Plaintext": m,
                                      "EncryptionContext": {"a": 1}},
         "SerializationException", 400),
        ("GrantTokens 'x'", {"KeyId": C.key, "Plaintext": m, "GrantTokens": "x"},
         "SerializationException", 400),
        ("EncryptionAlgorithm RSAES_OAEP_SHA_1", {"KeyId": C.key, "Plaintext": m,
                                                  "EncryptionAlgorithm": "RSAES_OAEP_SHA_1"},
         "InvalidKeyUsageException", 400),
        ("unknown key", {"KeyId": MISSING_KEY, "Plaintext": m}, "NotFoundException", 404),
        ("unknown alias", {"KeyId": "alias/bad-input-nope", "Plaintext": m},
         "NotFoundException", 404),
        ("no KeyId", {"Plaintext": m}, "ValidationException", 400),
        ("an IAM ARN", {"KeyId": "arn:aws:iam::%s:root" % h.ACCOUNT, "Plaintext": m},
         "InvalidArnException", 400),
        ("the marker as text, not base64", {"KeyId": C.key, "Plaintext": MARKER.decode()},
         "SerializationException", 400),
        ("the marker repeated past 4096 bytes",
         {"KeyId": C.key, "Plaintext": b64(MARKER * (4097 // len(MARKER) + 1))},
         "ValidationException", 400),
    ]
    cases = [op_case("marker", "Encrypt of the marker with %s" % label, "Encrypt", body, etype,
                     status) for label, body, etype, status in bad]
    cases.append(Case("marker", "the marker in a malformed body", lambda: signed(
        "Encrypt", b'{"KeyId": "%s", "Plaintext": "%s"' % (C.key.encode(), m.encode())),
        "SerializationException", 400, "op", "Encrypt", NOT_JSON))
    cases.append(Case("marker", "the marker unsigned", lambda: unsigned(
        "Encrypt", {"KeyId": C.key, "Plaintext": m}), "MissingAuthenticationTokenException",
        400, "auth"))
    cases.append(Case("marker", "the marker with a wrong signature", with_auth(
        lambda c, s, g: "AWS4-HMAC-SHA256 Credential=%s, SignedHeaders=%s, Signature=%s"
        % (c, s, "f" * 64), "Encrypt", {"KeyId": C.key, "Plaintext": m}),
        "InvalidSignatureException", 400, "auth", message=SIG_MISMATCH))
    return cases


# ---- valid requests among the bad ones ------------------------------------------------------


def check_encrypt(doc):
    eq(sorted(doc), ["CiphertextBlob", "EncryptionAlgorithm", "KeyId"], "Encrypt members")
    eq(doc["KeyId"], ARN_PREFIX + "key/" + C.key, "Encrypt KeyId")


def check_data_key(doc):
    eq(sorted(doc), ["CiphertextBlob", "KeyId", "Plaintext"], "GenerateDataKey members")
    C.secrets.append(base64.b64decode(doc["Plaintext"], validate=True))
    C.data_keys += 1


def check_decrypt(doc):
    eq(base64.b64decode(doc["Plaintext"]), MARKER, "the marker decrypted")


def check_describe(doc):
    eq(doc["KeyMetadata"]["KeyId"], C.key, "DescribeKey KeyId")


def valid_cases():
    m = b64(MARKER)
    ok = [
        ("Encrypt of the marker", "Encrypt", {"KeyId": C.key, "Plaintext": m}, check_encrypt),
        ("Encrypt of the marker by alias with a context", "Encrypt",
         {"KeyId": ALIAS, "Plaintext": m, "EncryptionContext": CONTEXT}, check_encrypt),
        ("Encrypt of the marker with an empty context key", "Encrypt",
         {"KeyId": C.key, "Plaintext": m, "EncryptionContext": {"": "x"}}, check_encrypt),
        ("GenerateDataKey AES_256", "GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256"},
         check_data_key),
        ("GenerateDataKey of 64 bytes with a context", "GenerateDataKey",
         {"KeyId": ALIAS, "NumberOfBytes": 64, "EncryptionContext": CONTEXT}, check_data_key),
        ("Decrypt of the marker blob", "Decrypt",
         {"CiphertextBlob": C.blob, "EncryptionContext": CONTEXT}, check_decrypt),
        ("DescribeKey with unknown members", "DescribeKey",
         {"KeyId": C.key, "Unknown": [1, {"x": None}], "GrantTokens": []}, check_describe),
        ("DescribeKey with null for an optional member", "DescribeKey",
         {"KeyId": C.key, "GrantTokens": None}, check_describe),
    ]
    cases = [Case("valid", name, lambda op=op, body=body: signed(op, body), None, 200, "op", op,
                  on_ok=fn) for name, op, body, fn in ok]
    cases.append(Case("valid", "DescribeKey signed 4 minutes ago",
                      lambda: signed("DescribeKey", {"KeyId": C.key},
                                     when=h.utcnow() - datetime.timedelta(seconds=240)),
                      None, 200, "op", "DescribeKey", on_ok=check_describe))
    cases.append(Case("valid", "DescribeKey with Content-Type 1.0",
                      lambda: signed("DescribeKey", {"KeyId": C.key},
                                     content_type="application/x-amz-json-1.0"),
                      None, 200, "op", "DescribeKey", on_ok=check_describe))
    return cases


def all_cases():
    return (malformed_json_cases() + wrong_type_cases() + invalid_value_cases()
            + oversized_cases() + protocol_cases() + auth_cases() + stale_cases()
            + replay_cases() + marker_cases() + valid_cases())


# ---- running the battery --------------------------------------------------------------------

MANAGE_COST = {"CreateKey": 10, "RotateKeyOnDemand": 10, "DescribeKey": 1, "ListKeys": 1,
               "ListAliases": 1, "GetKeyRotationStatus": 1, "ListKeyRotations": 1,
               "GetKeyPolicy": 1, "ListKeyPolicies": 1, "ListGrants": 1,
               "ListRetirableGrants": 1}
CRYPTO = ("Encrypt", "Decrypt", "GenerateDataKey", "GenerateDataKeyWithoutPlaintext",
          "GenerateRandom", "ReEncrypt",
          # not management either: the asym and hmac classes
          "GetPublicKey", "Sign", "Verify", "DeriveSharedSecret", "GenerateDataKeyPair",
          "GenerateDataKeyPairWithoutPlaintext", "GenerateMac", "VerifyMac")


def documented_operations():
    """The operations of docs/api.md's table ("EnableKey / DisableKey" is two)."""
    with open(os.path.join(h.SRCDIR, "docs", "api.md")) as f:
        text = f.read()
    table = text.split("## Operations", 1)[1].split("\n## ", 1)[0]
    ops = set()
    for line in table.splitlines():
        cells = [x.strip() for x in line.split("|")]
        if len(cells) > 2 and re.match(r"^[A-Z]\w+( / [A-Z]\w+)*$", cells[1]) \
                and cells[1] != "Operation":
            ops.update(cells[1].split(" / "))
    check(len(ops) >= 20, "docs/api.md lists the operations: %r" % sorted(ops))
    return ops


def manage_cost(cases):
    """The management rate tokens the cases admitted past routing take."""
    return sum(MANAGE_COST.get(c.op, 5) for c in cases if c.stage == "op" and c.op not in CRYPTO)


def check_answer(case, r):
    """Asserts r is case's answer; returns (status, __type, message, request id)."""
    if case.stage == "mhd":
        # libmicrohttpd's own page: the status is all there is to check.
        eq(r.status, case.status, "HTTP status (body %r)" % r.body[:200])
        check(not r.body.startswith(b"{"), "libmicrohttpd's page is not JSON: %r" % r.body[:200])
        return (r.status, None, None, None)
    request_id = r.header("x-amzn-RequestId")
    check(request_id and h.UUID_RE.match(request_id), "x-amzn-RequestId %r" % request_id)
    if case.etype is None:
        eq(r.status, 200, "HTTP status (body %r)" % r.body[:300])
        doc = r.json()
        check(isinstance(doc, dict), "the answer is a JSON object")
        case.on_ok(doc)
        return (200, None, None, request_id)
    doc = h.check_error_response(r, case.etype, case.status)
    if isinstance(case.message, str):
        eq(doc["message"], case.message, "message")
    elif case.message is not None:
        check(case.message.search(doc["message"]), "message %r does not match %r"
              % (doc["message"], case.message.pattern))
    return (r.status, doc["__type"], doc["message"], request_id)


def run_battery(cases, number):
    conn = Connection()
    results, failures = [], []
    t0 = time.monotonic()
    try:
        for case in cases:
            req = case.build()
            try:
                if case.send == "raw":
                    r = send_raw(req)
                elif case.send == "fresh":
                    r = send_fresh(req)
                else:
                    r = conn.send(req)
                results.append(check_answer(case, r))
            except Exception as e:  # noqa: B902 - collected, reported below
                results.append(None)
                failures.append("%r: %s: %s" % (case, type(e).__name__, e))
    finally:
        conn.close()
    took = time.monotonic() - t0
    h.diag("pass %d: %d requests in %.2f s, %d failed" % (number, len(cases), took,
                                                         len(failures)))
    check(C.server.proc.poll() is None, "p11kmsd is still running after pass %d" % number)
    if failures:
        raise AssertionError("%d of %d cases failed:\n%s" % (
            len(failures), len(cases), "\n".join(failures[:60])))
    return results


def vm_rss():
    """The server's resident set in bytes, from /proc/<pid>/status; None when unreadable."""
    try:
        with open("/proc/%d/status" % C.server.proc.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    fields = line.split()
                    eq(fields[2], "kB", "VmRSS unit")
                    return int(fields[1]) * 1024
    except OSError:
        return None
    return None


def audit_lines():
    with open(C.config + ".audit.log", "rb") as f:
        raw = f.read()
    lines = [json.loads(x) for x in raw.decode("utf-8").splitlines()]
    return raw, lines


# ---- tests ------------------------------------------------------------------------------------


@test
def test_table_holds_200_bad_requests():
    """The table: at least 200 bad requests, names unique, each category many."""
    C.cases = all_cases()
    bad = [c for c in C.cases if c.etype is not None or c.stage == "mhd"]
    names = [repr(c) for c in C.cases]
    eq(len(set(names)), len(names), "case names are unique")
    counts = {}
    for c in C.cases:
        counts[c.category] = counts.get(c.category, 0) + 1
    for cat in sorted(counts):
        h.diag("%-15s %4d" % (cat, counts[cat]))
    h.diag("%-15s %4d bad, %d valid" % ("total", len(bad), len(C.cases) - len(bad)))
    check(len(bad) >= MIN_CASES, "%d bad requests, at least %d" % (len(bad), MIN_CASES))
    for cat in ("malformed_json", "wrong_type", "invalid_value", "oversized", "protocol",
                "auth", "stale", "replay", "marker"):
        check(counts.get(cat, 0) >= 10, "category %s has %d cases" % (cat, counts.get(cat, 0)))
    for c in bad:
        check(400 <= c.status < 500, "%r expects a 4xx, not %d" % (c, c.status))
    # Every operation the server implements (docs/api.md's table) gets
    # wrongly typed members.
    typed = {c.op for c in C.cases if c.category == "wrong_type"}
    eq(sorted(typed), sorted(documented_operations()), "operations with wrongly typed members")
    cost = manage_cost(C.cases)
    h.diag("management rate tokens per pass: %d" % cost)
    check(cost <= MANAGE_BUDGET, "a pass takes %d management tokens, at most %d so that the "
          "default rate limit (burst %d, %d/s) never answers 429"
          % (cost, MANAGE_BUDGET, BURST_MANAGE, RATE_MANAGE))


def warm_up_round(i):
    """5 valid requests on a connection of their own (so that every HTTP
    thread serves some), large bodies among them: a data key decrypted, the
    marker padded to 4096 bytes encrypted, a DescribeKey of max_body bytes."""
    conn = Connection()
    try:
        r = conn.send(signed("GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256"}))
        eq(r.status, 200, "warm-up GenerateDataKey (body %r)" % r.body[:200])
        doc = r.json()
        check_data_key(doc)
        r = conn.send(signed("Decrypt", {"CiphertextBlob": doc["CiphertextBlob"]}))
        eq(r.status, 200, "warm-up Decrypt (body %r)" % r.body[:200])
        eq(r.json()["Plaintext"], doc["Plaintext"], "warm-up data key decrypted")
        plain = (MARKER * (4096 // len(MARKER) + 1))[:4096]
        r = conn.send(signed("Encrypt", {"KeyId": C.key, "Plaintext": b64(plain)}))
        eq(r.status, 200, "warm-up Encrypt (body %r)" % r.body[:200])
        r = conn.send(signed("DescribeKey", padded({"KeyId": C.key}, MAX_BODY)))
        eq(r.status, 200, "warm-up DescribeKey of max_body bytes (body %r)" % r.body[:200])
        r = conn.send(signed("ListKeys", {"Limit": 1 + i % 3}))
        eq(r.status, 200, "warm-up ListKeys (body %r)" % r.body[:200])
    finally:
        conn.close()


@test
def test_first_pass_answers_each_case():
    """A warm-up of valid requests, then every case once: its exact status,
    __type and message."""
    check(C.cases, "the table was built")
    for i in range(WARM_UP // 5):
        warm_up_round(i)
    C.rss["warm"] = vm_rss()
    C.results[1] = run_battery(C.cases, 1)
    C.rss[1] = vm_rss()


def check_audit(number):
    """Every request of pass number read as a KMS request has one audit line,
    under the answer's x-amzn-RequestId, with its outcome (the __type), its
    principal ("" when the signature was not accepted) and operation ("none"
    before one was picked); wrong methods and paths are answered before that,
    and libmicrohttpd's own refusals before p11kmsd sees them: none of those
    has a line."""
    _, lines = audit_lines()
    by_id = {}
    for line in lines:
        if line.get("type") == "request":
            check(line["request_id"] not in by_id, "request id %s audited once"
                  % line["request_id"])
            by_id[line["request_id"]] = line
    audited = refused = 0
    for case, res in zip(C.cases, C.results[number]):
        _, etype, _, request_id = res
        if case.stage not in AUDITED:
            check(request_id is None or request_id not in by_id, "%r is not audited" % case)
            continue
        line = by_id.get(request_id)
        check(line is not None, "%r: an audit line with request id %s" % (case, request_id))
        authenticated = case.stage in ("route", "op")
        want = {"outcome": etype or "ok",
                "principal": C.principal.name if authenticated else "",
                "operation": case.op if case.stage == "op" else "none"}
        eq({k: line[k] for k in want}, want, "%r: audit line" % case)
        audited += 1
        refused += etype is not None
    expected = sum(1 for c in C.cases if c.etype is not None and c.stage in AUDITED)
    h.diag("pass %d: %d audit lines checked, %d of them refusals" % (number, audited, refused))
    eq(refused, expected, "refusals audited in pass %d" % number)
    check(refused >= MIN_CASES, "at least %d refusals audited" % MIN_CASES)


@test
def test_refusals_are_audited():
    """The first pass's requests in the audit log (check_audit)."""
    check(1 in C.results, "the first pass ran")
    check_audit(1)


@test
def test_second_pass_answers_alike():
    """The battery again: the same status, __type and message for every case
    (messages naming a date aside)."""
    check(1 in C.results, "the first pass ran")
    # The rate limit takes its tokens before a body is parsed: wait until the
    # bucket holds a pass's worth again (it fills at RATE_MANAGE a second).
    time.sleep(manage_cost(C.cases) / RATE_MANAGE + 0.2)
    C.results[2] = run_battery(C.cases, 2)
    C.rss[2] = vm_rss()
    for case, a, b in zip(C.cases, C.results[1], C.results[2]):
        if case.varying:
            eq(b[:2], a[:2], "%r: second answer" % case)
        else:
            eq(b[:3], a[:3], "%r: second answer" % case)
        check(a[3] is None or a[3] != b[3], "%r: a fresh request id" % case)
    check_audit(2)


@test
def test_memory_does_not_grow_with_bad_input():
    """The resident set after the second pass exceeds the one after the first
    by less than RSS_BOUND: repeated bad input does not leak."""
    check(2 in C.results, "both passes ran")
    if any(C.rss.get(k) is None for k in ("warm", 1, 2)):
        raise h.Skip("/proc/%d/status is not readable" % C.server.proc.pid)
    mib = 1 << 20
    h.diag("VmRSS after warm-up %.2f MiB, after pass 1 %.2f MiB, after pass 2 %.2f MiB "
           "(pass 2 added %+d KiB)" % (C.rss["warm"] / mib, C.rss[1] / mib, C.rss[2] / mib,
                                       (C.rss[2] - C.rss[1]) // 1024))
    if h.sanitized_server():
        # ASan's quarantine keeps freed memory resident (up to 256 MiB), so
        # the resident set grows with every allocation, leaked or not;
        # LeakSanitizer checks leaks at exit instead.
        raise h.Skip("p11kmsd is built with AddressSanitizer: its quarantine makes RSS "
                     "grow without leaks (LeakSanitizer checks at exit)")
    if h.under_valgrind():
        # memcheck's own bookkeeping lives in the process; it reports leaks at exit.
        raise h.Skip("p11kmsd runs under valgrind, whose bookkeeping makes RSS grow "
                     "(memcheck reports leaks at exit)")
    check(C.rss[2] - C.rss[1] < RSS_BOUND,
          "VmRSS grew by %d bytes in the second pass (bound %d)"
          % (C.rss[2] - C.rss[1], RSS_BOUND))


@test
def test_still_serving_and_nothing_changed():
    """After the battery: GenerateDataKey and Decrypt round-trip through boto3,
    /readyz answers 200, and the keys and aliases the bad requests named are
    as they were."""
    r = C.kms.generate_data_key(KeyId=ALIAS, KeySpec="AES_256", EncryptionContext=CONTEXT)
    C.secrets.append(r["Plaintext"])
    eq(len(r["Plaintext"]), 32, "data key length")
    d = C.kms.decrypt(CiphertextBlob=r["CiphertextBlob"], EncryptionContext=CONTEXT)
    eq(d["Plaintext"], r["Plaintext"], "the data key decrypted")
    eq(d["KeyId"], ARN_PREFIX + "key/" + C.key, "Decrypt KeyId")
    eq(C.kms.decrypt(CiphertextBlob=base64.b64decode(C.blob),
                     EncryptionContext=CONTEXT)["Plaintext"], MARKER, "the marker blob")
    ready = h.raw_request(C.server.endpoint, "GET", "/readyz")
    eq((ready.status, ready.body), (200, b"ready\n"), "GET /readyz")
    for key_id in (C.key, C.scratch):
        md = C.kms.describe_key(KeyId=key_id)["KeyMetadata"]
        eq((md["KeyState"], md["Enabled"]), ("Enabled", True), "state of %s" % key_id)
        eq(C.kms.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"], False,
           "rotation of %s" % key_id)
        r = h.kms_call(C.server.endpoint, "ListKeyRotations", {"KeyId": key_id}, C.principal)
        eq((r.status, r.json().get("Rotations")), (200, []), "rotations of %s" % key_id)
    eq(C.kms.get_key_policy(KeyId=C.scratch, PolicyName="default")["Policy"], C.policy,
       "scratch key's policy")
    aliases = C.kms.list_aliases()["Aliases"]
    eq([(a["AliasName"], a["TargetKeyId"]) for a in aliases], [(ALIAS, C.key)], "aliases")
    eq(sorted(k["KeyId"] for k in C.kms.list_keys()["Keys"]), sorted([C.key, C.scratch]),
       "keys")
    check(C.server.proc.poll() is None, "p11kmsd is still running")



# ---- framing: nothing smuggled past a proxy ----------------------------------------

SMUGGLED = b"GET /healthz HTTP/1.1\r\nHost: smuggled\r\n\r\n"
OURS = "ours"   # p11kmsd's 400 ValidationException (JSON, Connection: close)
MHD = "mhd"     # libmicrohttpd's own page (HTML), status as given


def read_to_eof(data, timeout=10):
    """Sends data on a fresh connection and reads until the server closes it;
    fails when it stays open. Returns every byte the server sent."""
    s = socket.create_connection((C.server.host, C.server.port), timeout=timeout)
    got = b""
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before all was sent: what came back is read below
        deadline = time.monotonic() + timeout
        while True:
            if time.monotonic() > deadline:
                raise AssertionError("the connection is still open after %r" % got[:300])
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            except socket.timeout:
                raise AssertionError("the connection is still open after %r" % got[:300])
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    return got


def parse_answers(raw):
    """The answers in raw, each (status, headers dict with lower-case names,
    body), framed by Content-Length."""
    out = []
    while raw:
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError("a partial answer: %r" % raw[:300])
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:n]))
        raw = rest[n:]
    return out


def framing_cases():
    """(name, bytes, who answers): each request is followed on its connection
    by a smuggled GET /healthz, which must never be answered."""
    req = signed("DescribeKey", {"KeyId": C.key})
    body = req.body
    n = len(body)
    head = head_bytes(req)
    chunked_body = b"%x\r\n" % n + body + b"\r\n0\r\n\r\n"

    def chunk_size(size):
        return head + b"Transfer-Encoding: chunked\r\n\r\n" + size + b"\r\n" + body + \
            b"\r\n0\r\n\r\n"

    cases = [
        ("Content-Length, then Transfer-Encoding",
         head + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(chunked_body)
         + chunked_body, OURS, "The request has both Content-Length and Transfer-Encoding"),
        ("Transfer-Encoding, then Content-Length",
         head + b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n\r\n" % n + chunked_body,
         OURS, "The request has both Content-Length and Transfer-Encoding"),
        ("Content-Length 0 beside Transfer-Encoding",
         head + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked_body,
         OURS, "The request has both Content-Length and Transfer-Encoding"),
        ("two Content-Length, equal",
         head + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (n, n) + body, OURS,
         "The request has more than one Content-Length header"),
        ("two Content-Length, differing",
         head + b"Content-Length: %d\r\nContent-Length: %d\r\n\r\n" % (n, 0) + body, OURS,
         "The request has more than one Content-Length header"),
        ("two Transfer-Encoding",
         head + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
         + chunked_body, OURS, "The request has more than one Transfer-Encoding header"),
        ("Transfer-Encoding gzip, chunked",
         head + b"Transfer-Encoding: gzip, chunked\r\n\r\n" + chunked_body, OURS,
         "The request's Transfer-Encoding is not chunked"),
        ("Transfer-Encoding chunked, chunked",
         head + b"Transfer-Encoding: chunked, chunked\r\n\r\n" + chunked_body, OURS,
         "The request's Transfer-Encoding is not chunked"),
    ]
    # libmicrohttpd refuses these itself, before p11kmsd sees the request.
    for value in (b"+%d" % n, b"0x%x" % n, b"%d,%d" % (n, n), b"%d.0" % n, b"-1", b"%de0" % n,
                  b"%d abc" % n, b""):
        cases.append(("Content-Length %r" % value.decode(),
                      head + b"Content-Length: " + value + b"\r\n\r\n" + body, MHD, 400))
    cases.append(("Content-Length of 21 digits",
                  head + b"Content-Length: " + b"1" * 21 + b"\r\n\r\n" + body, MHD, 413))
    for size in (b"zz", b"0x%x" % n, b"-%x" % n, b"+%x" % n, b"", b" %x" % n, b"%x " % n):
        cases.append(("chunk size %r" % size.decode(), chunk_size(size), MHD, 400))
    cases.append(("a chunk size of 20 hex digits", chunk_size(b"f" * 20), MHD, 413))
    return cases


@test
def test_framing_is_never_in_doubt():
    """Raw sockets: a request whose body's end is in doubt (RFC 9112 sections
    6.1, 6.3) gets exactly one answer, 400, and the connection closes; the
    request smuggled after it is never answered."""
    for name, data, who, expected in framing_cases():
        raw = read_to_eof(data + SMUGGLED)
        if who == OURS:
            answers = parse_answers(raw)
            eq([a[0] for a in answers], [400], "%s: the answers' statuses" % name)
            status, headers, body = answers[0]
            doc = json.loads(body)
            eq(doc, {"__type": "ValidationException", "message": expected}, "%s: answer" % name)
            eq(headers.get("x-amzn-errortype"), "ValidationException", "%s: X-Amzn-ErrorType"
               % name)
            eq(headers.get("connection", "").lower(), "close", "%s: Connection" % name)
        else:
            # libmicrohttpd 0.9.75 writes its error answer's header block twice before
            # the page: one answer all the same, and nothing after it.
            check(raw.startswith(b"HTTP/1.1 %d " % expected), "%s: %r" % (name, raw[:200]))
            eq(re.findall(rb"HTTP/1\.1 (\d+) ", raw), [b"%d" % expected] * len(
                re.findall(rb"HTTP/1\.1 (\d+) ", raw)), "%s: every status line" % name)
            check(raw.endswith(b"</html>"), "%s: ends with its page: %r" % (name, raw[-100:]))
            check(b"ok\n" not in raw, "%s: the smuggled request is not answered" % name)
    # Well framed, the same bytes are two requests on one connection, both answered.
    req = signed("DescribeKey", {"KeyId": C.key})
    good = head_bytes(req) + b"Content-Length: %d\r\n\r\n" % len(req.body) + req.body
    s = socket.create_connection((C.server.host, C.server.port), timeout=10)
    try:
        s.sendall(good + SMUGGLED.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        got = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    finally:
        s.close()
    eq([a[0] for a in parse_answers(got)], [200, 200], "a well-framed pair")


@test
def test_no_plaintext_in_audit_log():
    """Neither the marker (raw, base64, hex), nor any data key this test was
    given (warm-up, battery, boto3 round trip), appears in the audit log or
    the server's log; and the log holds the Encrypt requests that carried
    the marker."""
    check(2 in C.results, "both passes ran")
    raw, lines = audit_lines()
    log = C.server.stderr_text().encode()
    check(len(C.secrets) >= 1 + WARM_UP // 5, "data keys collected: %d" % len(C.secrets))
    for secret in C.secrets:
        forms = [secret, base64.b64encode(secret), secret.hex().encode(),
                 base64.b64encode(secret).rstrip(b"=")]
        if secret == MARKER:
            forms.append(b64(MARKER).encode().replace(b"/", b"\\/"))
        for form in forms:
            check(form not in raw, "the audit log holds a secret (%r...)" % form[:12])
            check(form not in log, "the server's log holds a secret (%r...)" % form[:12])
    marker_ops = [x for x in lines if x.get("operation") == "Encrypt"]
    check(len(marker_ops) >= 2 * sum(1 for c in C.cases if c.op == "Encrypt"),
          "the Encrypt requests are audited: %d lines" % len(marker_ops))
    h.diag("%d audit lines, %d secrets looked for" % (len(lines), len(C.secrets)))


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
