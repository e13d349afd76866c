#!/usr/bin/python3
"""JWE interoperability (DESIGN §8): our envelopes against python3-jwcrypto, a
standard JOSE library, and the whole path through p11kmsd. TAP output.

  - jwcrypto decrypts what tests/unit/jwe_tool seals with src/client/jwe.c
    (compact and flattened JSON), given the data key: the payload and every
    protected-header member (alg, enc, kid, p11kms_blob, p11kms_ctx) read back;
    so does RFC 7516 §5.2 done by hand with cryptography's AES-GCM (and for
    the empty payload, which jwcrypto 1.1 cannot open even when it made it);
  - jwe_tool opens what jwcrypto seals with the same protected header, in both
    serializations, and refuses what jwcrypto seals with another alg or enc,
    an altered token and another encryption context;
  - through p11kmsd: p11kms_seal / p11kms_open round trips; with the cache on,
    twenty seals cost one GenerateDataKey and twenty opens one Decrypt, as the
    server's /metrics count them, and without the cache one of each per
    message; a token p11kms_seal made opens in jwcrypto with the data key that
    boto3's Decrypt of its p11kms_blob gives; examples/seal_open runs.
"""

import base64
import json
import os
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from jwcrypto import jwe, jwk  # noqa: E402

import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.path.normpath(os.path.join(HERE, "..", ".."))
JWE_TOOL = os.environ.get("P11KMS_JWE_TOOL") or os.path.join(BUILD, "tests", "unit", "jwe_tool")
SEAL_OPEN = os.environ.get("P11KMS_SEAL_OPEN") or os.path.join(BUILD, "examples", "seal_open")
ARN = "arn:aws:kms:us-east-1:123456789012:key/6f1c2a9e-5304-4b1d-8a77-30c2e5194df0"
CTX = {"tenant": "acm\u00e9", "purpose": "interop", "path": "a/b \"quoted\""}


class Ctx:
    ws = None
    principal = None
    token = None
    server = None
    kms = None
    key_arn = None


C = Ctx()


def b64u(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def unb64u(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def tool(args, stdin, env=None, timeout=60):
    check(os.access(JWE_TOOL, os.X_OK), "%s is not built (make check builds it)" % JWE_TOOL)
    r = subprocess.run([JWE_TOOL] + list(args), input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env, timeout=timeout)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def our_seal(key, blob, ctx, payload, flattened=False):
    rc, out, err = tool(["seal-json" if flattened else "seal", key.hex(),
                         base64.b64encode(blob).decode(), ARN, json.dumps(ctx)], payload)
    eq(rc, 0, "jwe_tool seal status (stderr %r)" % err)
    return out.decode("ascii")


def our_open(key, token, ctx=None):
    args = ["open", key.hex()] + ([json.dumps(ctx)] if ctx is not None else [])
    return tool(args, token.encode("ascii") if isinstance(token, str) else token)


def their_open(key, token):
    t = jwe.JWE()
    t.deserialize(token, key=jwk.JWK(kty="oct", k=b64u(key)))
    return t.payload, json.loads(t.objects["protected"])


def rfc_open(key, token):
    """RFC 7516 §5.2 by hand with cryptography's AES-GCM: AAD is the base64url
    protected header as it stands in the token."""
    if token.startswith("{"):
        j = json.loads(token)
        prot, iv, ct, tag = j["protected"], j["iv"], j["ciphertext"], j["tag"]
    else:
        prot, ek, iv, ct, tag = token.split(".")
        eq(ek, "", "encrypted key segment")
    pt = AESGCM(key).decrypt(unb64u(iv), unb64u(ct) + unb64u(tag), prot.encode("ascii"))
    return pt, json.loads(unb64u(prot))


def their_seal(key, header, payload, compact=True):
    t = jwe.JWE(payload, protected=json.dumps(header))
    t.add_recipient(jwk.JWK(kty="oct", k=b64u(key)))
    return t.serialize(compact=compact)


def header_for(blob, ctx, **extra):
    hdr = {"alg": "dir", "enc": "A256GCM", "kid": ARN, "p11kms_blob": b64u(blob),
           "p11kms_ctx": ctx}
    hdr.update(extra)
    return hdr


PAYLOADS = [b"", b'{"hello":"world"}', bytes(range(256)) * 400]


# ---- the `jose` package from npm (tests/interop, installed by `npm ci`) ---------------

INTEROP = os.path.join(h.SRCDIR, "tests", "interop")
NODE = shutil.which("node") or "/usr/bin/node"


def jose_ready():
    return os.path.isdir(os.path.join(INTEROP, "node_modules", "jose")) and os.access(NODE, os.X_OK)


def jose(args, stdin):
    r = subprocess.run([NODE, os.path.join(INTEROP, "jose_tool.mjs")] + list(args), input=stdin,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    return r.returncode, r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace")


@test
def test_npm_jose_opens_ours_and_we_open_its():
    if not jose_ready():
        # A release tarball carries no node_modules: scripts/test.sh runs `npm ci` in the
        # source tree, so the main CI run always has it.
        raise h.Skip("the npm package jose is not installed (npm ci --prefix tests/interop)")
    key, blob = os.urandom(32), os.urandom(70)
    ctx = {"tenant": "acme", "purpose": "jose"}
    for payload in (b"x", b'{"hello":"world"}', bytes(range(256)) * 40):
        token = our_seal(key, blob, ctx, payload)
        rc, out, err = jose(["open", key.hex()], token.encode())
        eq((rc, err), (0, ""), "jose opens our token")
        got = json.loads(out)
        eq(base64.b64decode(got["payload"]), payload, "jose's plaintext")
        eq(got["header"], header_for(blob, ctx), "jose reads our protected header")
        rc, theirs, err = jose(["seal", key.hex(), json.dumps(header_for(blob, ctx))], payload)
        eq((rc, err), (0, ""), "jose seals")
        rc, out, err = our_open(key, theirs.strip(), ctx)
        eq((rc, out), (0, payload), "we open jose's token (stderr %r)" % err)
    # jose refuses ours altered, and a wrong key
    token = our_seal(key, blob, ctx, b"payload")
    parts = token.split(".")
    parts[3] = b64u(bytes([unb64u(parts[3])[0] ^ 1]) + unb64u(parts[3])[1:])
    rc, _, err = jose(["open", key.hex()], ".".join(parts).encode())
    eq(rc, 1, "jose refuses an altered ciphertext (%s)" % err.strip())
    rc, _, err = jose(["open", os.urandom(32).hex()], token.encode())
    eq(rc, 1, "jose refuses another key (%s)" % err.strip())


# ---- offline: jwe.c against jwcrypto ------------------------------------------------


@test
def test_jwcrypto_opens_ours():
    for flattened in (False, True):
        for ctx in ({}, CTX):
            for payload in PAYLOADS:
                key, blob = os.urandom(32), os.urandom(81)
                token = our_seal(key, blob, ctx, payload, flattened)
                check(token.startswith("{") == flattened, "serialization of %r" % token[:20])
                # jwcrypto 1.1 cannot open an empty payload, even its own ("No
                # recipient matched ... ['Success']"): that one is checked by hand.
                got, hdr = their_open(key, token) if payload else rfc_open(key, token)
                eq(got, payload, "payload through jwcrypto")
                eq(rfc_open(key, token), (got, hdr), "RFC 7516 by hand")
                eq(hdr, {"alg": "dir", "enc": "A256GCM", "kid": ARN, "p11kms_blob": b64u(blob),
                         "p11kms_ctx": ctx}, "protected header")
                eq(unb64u(hdr["p11kms_blob"]), blob, "p11kms_blob")
                # The context's keys are in byte order, the header compact.
                raw = unb64u(token.split(".")[0] if not flattened
                             else json.loads(token)["protected"]).decode("utf-8")
                eq(list(json.loads(raw)["p11kms_ctx"]), sorted(ctx), "context key order")
                check(", " not in raw and ": " not in raw, "compact header JSON: %r" % raw)


@test
def test_we_open_theirs():
    for compact in (True, False):
        for ctx in ({}, CTX):
            for payload in PAYLOADS:
                key, blob = os.urandom(32), os.urandom(81)
                token = their_seal(key, header_for(blob, ctx), payload, compact)
                rc, out, err = our_open(key, token, ctx)
                eq((rc, err), (0, ""), "jwe_tool open of jwcrypto's token")
                eq(out, payload, "payload")
    # Members a JOSE library may add are ignored; non-ASCII in the header is fine.
    key, blob = os.urandom(32), os.urandom(40)
    token = their_seal(key, header_for(blob, CTX, typ="JOSE", cty="application/json"), b"x")
    eq(our_open(key, token, CTX)[:2], (0, b"x"), "token with typ and cty")


@test
def test_we_refuse_what_is_not_ours():
    key, blob = os.urandom(32), os.urandom(81)
    payload = b'{"secret":"s3cr3t"}'
    token = their_seal(key, header_for(blob, CTX), payload)

    rc, out, err = our_open(key, token, {"tenant": "other"})
    eq((rc, out), (1, b""), "another context")
    check("DecryptionFailed" in err or "Decrypt" in err, "another context: %r" % err)

    other = bytes([key[0] ^ 1]) + key[1:]
    rc, out, err = our_open(other, token, CTX)
    eq((rc, out), (1, b""), "another key")

    segs = token.split(".")
    ct = bytearray(unb64u(segs[3]))
    ct[0] ^= 0x80
    altered = ".".join(segs[:3] + [b64u(bytes(ct))] + segs[4:])
    rc, out, err = our_open(key, altered, CTX)
    eq((rc, out), (1, b""), "altered ciphertext")

    # Key wrapping, compression, other content encryption: not what we accept.
    wrapped = jwe.JWE(payload, protected=json.dumps(dict(header_for(blob, CTX), alg="A256KW")))
    wrapped.add_recipient(jwk.JWK(kty="oct", k=b64u(key)))
    rc, out, err = our_open(key, wrapped.serialize(compact=True), CTX)
    eq((rc, out), (1, b""), "alg A256KW")
    check("Malformed" in err, "alg A256KW: %r" % err)
    for what, hdr, k in (("enc A128GCM", dict(header_for(blob, CTX), enc="A128GCM"), key[:16]),
                         ("zip DEF", dict(header_for(blob, CTX), zip="DEF"), key)):
        rc, out, err = our_open(key, their_seal(k, hdr, payload), CTX)
        eq((rc, out), (1, b""), what)
        check("Malformed" in err, "%s: %r" % (what, err))


@test
def test_jwcrypto_refuses_altered_ours():
    key, blob = os.urandom(32), os.urandom(81)
    token = our_seal(key, blob, CTX, b"payload")
    segs = token.split(".")
    # Another context in the protected header: the AAD changes, the tag fails.
    hdr = json.loads(unb64u(segs[0]))
    hdr["p11kms_ctx"] = {"tenant": "other"}
    forged = ".".join([b64u(json.dumps(hdr).encode())] + segs[1:])
    try:
        their_open(key, forged)
    except Exception as e:  # noqa: B902 - jwcrypto's InvalidJWEData
        h.diag("jwcrypto: %s" % e)
    else:
        raise AssertionError("jwcrypto opened a token whose header was changed")
    eq(our_open(key, forged)[0], 1, "jwe_tool open of the forged token")


# ---- through p11kmsd -----------------------------------------------------------------


def server():
    if C.server is None:
        C.ws = h.Workspace()
        C.principal = h.new_principal("jwe")
        C.token, config = h.token_and_config(C.ws, "p11kms-jwe", C.principal)
        C.server = h.start_config_server(config, C.token, C.ws.sub("p11kmsd.log"))
        C.kms = h.kms_client(C.server.endpoint, C.principal)
        C.key_arn = C.kms.create_key(Description="jwe interop")["KeyMetadata"]["Arn"]
        h.diag("p11kmsd serving %s" % C.server.endpoint)
    return C.server


def client_env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(P11KMS_ENDPOINT=C.server.endpoint, AWS_REGION=h.REGION,
               AWS_ACCESS_KEY_ID=C.principal.access_key,
               AWS_SECRET_ACCESS_KEY=C.principal.secret)
    return env


def op_requests(operation):
    r = h.get_metrics(C.server.endpoint)
    eq(r.status, 200, "GET /metrics")
    parsed = promtext.parse(r.body.decode("utf-8"))
    return sum(v for (name, labels), v in parsed.items()
               if name == "p11kms_requests_total" and ("operation", operation) in labels)


def service_round_trip(n, max_age, payload):
    before = {op: op_requests(op) for op in ("GenerateDataKey", "Decrypt")}
    rc, out, err = tool(["service", C.key_arn, str(n), str(max_age), json.dumps(CTX)], payload,
                        env=client_env(), timeout=120)
    eq((rc, err), (0, ""), "jwe_tool service")
    tokens = out.decode("ascii").split()
    eq(len(tokens), n, "tokens")
    after = {op: op_requests(op) for op in ("GenerateDataKey", "Decrypt")}
    return tokens, {op: after[op] - before[op] for op in after}


@test
def test_service_round_trip_with_cache():
    server()
    payload = b'{"card":"4111111111111111","amount":"42.00"}'
    tokens, calls = service_round_trip(20, 300, payload)
    eq(calls, {"GenerateDataKey": 1, "Decrypt": 1}, "service calls for 20 seals and 20 opens")
    eq(len(set(tokens)), 20, "distinct tokens")
    blobs = {json.loads(unb64u(t.split(".")[0]))["p11kms_blob"] for t in tokens}
    eq(len(blobs), 1, "one data key for all (cached)")
    ivs = {t.split(".")[2] for t in tokens}
    eq(len(ivs), 20, "a fresh IV for each message under the one data key")


@test
def test_service_round_trip_without_cache():
    server()
    tokens, calls = service_round_trip(5, 0, b"no cache")
    eq(calls, {"GenerateDataKey": 5, "Decrypt": 5}, "service calls for 5 seals and 5 opens")
    blobs = {json.loads(unb64u(t.split(".")[0]))["p11kms_blob"] for t in tokens}
    eq(len(blobs), 5, "a data key per message")


@test
def test_jwcrypto_opens_a_service_token():
    """A standard JOSE library opens p11kms_seal's output once the data key is
    known: here from boto3's Decrypt of the header's blob and context."""
    server()
    payload = b'{"opened":"by jwcrypto"}'
    tokens, _ = service_round_trip(1, 0, payload)
    hdr = json.loads(unb64u(tokens[0].split(".")[0]))
    eq(hdr["kid"], C.key_arn, "kid is the key ARN")
    eq(hdr["p11kms_ctx"], CTX, "p11kms_ctx")
    answer = C.kms.decrypt(CiphertextBlob=unb64u(hdr["p11kms_blob"]),
                           EncryptionContext=hdr["p11kms_ctx"])
    eq(answer["KeyId"], C.key_arn, "Decrypt's KeyId")
    got, _ = their_open(answer["Plaintext"], tokens[0])
    eq(got, payload, "payload")


@test
def test_example_program():
    server()
    check(os.access(SEAL_OPEN, os.X_OK), "%s is not built (make check builds it)" % SEAL_OPEN)
    payload = '{"example":true}'
    r = subprocess.run([SEAL_OPEN, C.key_arn, payload], env=client_env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    eq(r.returncode, 0, "seal_open status (stderr %r)" % r.stderr)
    lines = r.stdout.decode().splitlines()
    eq(len(lines), 2, "seal_open output")
    eq(lines[1], payload, "opened payload")
    eq(len(lines[0].split(".")), 5, "a compact JWE")


def teardown():
    h.finish(T, C.ws, C.server)


if __name__ == "__main__":
    sys.exit(T.run(None, teardown))
