#!/usr/bin/python3
"""libp11kms and the p11kms CLI with asymmetric and HMAC keys against a real
p11kmsd on a fresh SoftHSM2 token, through the C driver tests/client/driver.c
(public API only) and the CLI, each result checked by OpenSSL or python3
cryptography rather than by the service itself: Sign/Verify round trips with
ECDSA, RSA-PSS and RSA-PKCS#1 (a one-bit change in the signature or the
message is KMSInvalidSignatureException), signatures verifying with OpenSSL
on GetPublicKey's key, GenerateMac/VerifyMac and the authenticated-headers
helper (its canonical form rebuilt here from the spec in docs/client.md; a
tampered value, an added field or reordered duplicates are
KMSInvalidMacException), DeriveSharedSecret equal to OpenSSL's ECDH with an
ephemeral key, GenerateDataKeyPair's private key matching its public key
and its blob decrypting back to it, RSAES-OAEP both ways, and the CLI's
sign, verify, mac, verify-mac, get-public-key and keys create --key-spec
(exit codes, PEM, files never overwriting the input). TAP output."""

import json
import os
import struct
import subprocess
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding  # noqa: E402

T = h.TapRunner()
test = T.test

OPENSSL = "/usr/bin/openssl"
TIMEOUT = 120
MESSAGE = b"the quick brown fox jumps over the lazy dog\n" * 20  # 900 bytes


class Ctx:
    ws = None
    server = None
    alice = None
    keys = {}  # name -> KeyMetadata from keys create


C = Ctx()

KEYS = {
    # name: (KeySpec, KeyUsage); None: CreateKey's defaults
    "ecc": ("ECC_NIST_P256", "SIGN_VERIFY"),
    "rsa_sign": ("RSA_2048", "SIGN_VERIFY"),
    "rsa_enc": ("RSA_2048", "ENCRYPT_DECRYPT"),
    "hmac384": ("HMAC_384", "GENERATE_VERIFY_MAC"),
    "hmac256": ("HMAC_256", "GENERATE_VERIFY_MAC"),
    "ecdh": ("ECC_NIST_P256", "KEY_AGREEMENT"),
    "sym": None,
}


def tool_path(var, *rel):
    path = os.environ.get(var) or os.path.normpath(os.path.join(h.HERE, *rel))
    if not os.access(path, os.X_OK):
        raise RuntimeError("%s is not built (make check builds it)" % path)
    return path


def env():
    """The driver's and the CLI's environment: endpoint and alice's credentials only."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("AWS_") and not k.startswith("P11KMS_")
         and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    e.update(P11KMS_ENDPOINT=C.server.endpoint, AWS_ACCESS_KEY_ID=C.alice.access_key,
             AWS_SECRET_ACCESS_KEY=C.alice.secret, AWS_REGION=h.REGION,
             HOME=C.ws.sub("home"), AWS_CONFIG_FILE="/dev/null",
             AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    return e


def cli(args, stdin=b""):
    """Runs p11kms; returns (exit status, stdout bytes, stderr text)."""
    r = subprocess.run([tool_path("P11KMS_CLI", "..", "..", "p11kms")] + list(args), env=env(),
                       input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       timeout=TIMEOUT)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def cli_ok(args, stdin=b""):
    rc, out, err = cli(args, stdin)
    eq((rc, err), (0, ""), "p11kms %s" % " ".join(args))
    return out


def driver(*args):
    """Runs the driver; returns {what: (status, message)} and the other lines' fields."""
    r = subprocess.run([tool_path("P11KMS_CLIENT_DRIVER", "..", "client", "driver")] + list(args),
                       env=env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=TIMEOUT)
    out = r.stdout.decode("utf-8", "replace")
    if r.returncode != 0:
        raise AssertionError("driver %s exited %d\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(args), r.returncode, out, r.stderr.decode()))
    results, info = {}, {}
    for line in out.splitlines():
        f = line.split("\t")
        if len(f) == 4 and f[2].replace(".", "").isdigit():
            results[f[0]] = (f[1], f[3])
        else:
            info[f[0]] = f[1:]
    return results, info


def status(*args):
    """The status of the driver's one call."""
    results, _ = driver(*args)
    eq(len(results), 1, "one call: %r" % results)
    return list(results.values())[0][0]


def ok(*args):
    results, info = driver(*args)
    for what, (st, msg) in results.items():
        eq(st, "OK", "%s (%s)" % (what, msg))
    return info


def path(name):
    return C.ws.sub("files", name)


def write(name, data):
    with open(path(name), "wb") as f:
        f.write(data)
    return path(name)


def read(name):
    with open(path(name), "rb") as f:
        return f.read()


def flip(data, bit=0):
    """data with one bit changed."""
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def key(name):
    return C.keys[name]["KeyId"]


def openssl(*args, stdin=None):
    r = subprocess.run([OPENSSL] + list(args), input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=60)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def public_der(name):
    """GetPublicKey through the library: the DER and (spec, usage, arn)."""
    info = ok("public-key", key(name), path(name + ".der"))
    return read(name + ".der"), tuple(info["public_key_info"])


def setup():
    C.ws = h.Workspace()
    os.makedirs(C.ws.sub("files"))
    os.makedirs(C.ws.sub("home"))
    C.alice = h.new_principal("alice")
    token, config = h.token_and_config(C.ws, "p11kms-it-asym", C.alice)
    C.server = h.start_config_server(config, token, C.ws.sub("p11kmsd.log"))
    h.diag("p11kmsd serving %s" % C.server.endpoint)
    for name, spec in KEYS.items():
        args = ["--json", "keys", "create", "--description", "asym " + name]
        if spec:
            args += ["--key-spec", spec[0], "--key-usage", spec[1]]
        C.keys[name] = json.loads(cli_ok(args))["KeyMetadata"]


def teardown():
    h.finish(T, C.ws, C.server)


# ---- the library -------------------------------------------------------------------


@test
def test_keys_created_with_spec_and_usage():
    for name, spec in KEYS.items():
        meta = C.keys[name]
        want = spec or ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
        eq((meta.get("KeySpec"), meta.get("KeyUsage")), want, name)


@test
def test_sign_verify_round_trip_and_one_bit():
    msg = write("msg", MESSAGE)
    for name, alg in [("ecc", "ECDSA_SHA_256"), ("rsa_sign", "RSASSA_PSS_SHA_256"),
                      ("rsa_sign", "RSASSA_PKCS1_V1_5_SHA_512")]:
        sig = path("%s-%s.sig" % (name, alg))
        ok("sign", key(name), alg, "raw", msg, sig)
        eq(status("verify", key(name), alg, "raw", msg, sig), "OK", "%s %s" % (name, alg))
        good = open(sig, "rb").read()
        for bit in (0, len(good) * 4, len(good) * 8 - 1):
            bad = write("bad.sig", flip(good, bit))
            eq(status("verify", key(name), alg, "raw", msg, bad), "KMSInvalidSignatureException",
               "%s %s, signature bit %d changed" % (name, alg, bit))
        other = write("other", flip(MESSAGE, 5))
        eq(status("verify", key(name), alg, "raw", other, sig), "KMSInvalidSignatureException",
           "%s %s, message bit changed" % (name, alg))
        # a digest signed through DIGEST verifies as the message through RAW
        md = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}[alg[-3:]]
        hh = hashes.Hash(md)
        hh.update(MESSAGE)
        digest = write("digest", hh.finalize())
        ok("sign", key(name), alg, "digest", digest, sig)
        eq(status("verify", key(name), alg, "raw", msg, sig), "OK", "digest-signed, %s" % alg)
    # the wrong usage: an encryption key does not sign
    eq(status("sign", key("rsa_enc"), "RSASSA_PSS_SHA_256", "raw", msg, path("x")),
       "InvalidKeyUsageException")


@test
def test_signatures_verify_with_the_public_key():
    """The library's signatures checked by python3 cryptography, not by the service."""
    msg = write("msg", MESSAGE)
    der, (spec, usage, arn) = public_der("ecc")
    eq((spec, usage), ("ECC_NIST_P256", "SIGN_VERIFY"))
    eq(arn, C.keys["ecc"]["Arn"])
    pub = serialization.load_der_public_key(der)
    ok("sign", key("ecc"), "ECDSA_SHA_256", "raw", msg, path("e.sig"))
    pub.verify(read("e.sig"), MESSAGE, ec.ECDSA(hashes.SHA256()))
    der, (spec, usage, _) = public_der("rsa_sign")
    eq((spec, usage), ("RSA_2048", "SIGN_VERIFY"))
    pub = serialization.load_der_public_key(der)
    eq(pub.key_size, 2048)
    ok("sign", key("rsa_sign"), "RSASSA_PSS_SHA_384", "raw", msg, path("p.sig"))
    pub.verify(read("p.sig"), MESSAGE,
               padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48), hashes.SHA384())
    ok("sign", key("rsa_sign"), "RSASSA_PKCS1_V1_5_SHA_256", "raw", msg, path("k.sig"))
    pub.verify(read("k.sig"), MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    # GetPublicKey of a symmetric key: AWS's answer
    eq(status("public-key", key("sym"), path("none.der")), "UnsupportedOperationException")


@test
def test_mac_round_trip_and_one_bit():
    msg = write("msg", MESSAGE)
    ok("mac", key("hmac384"), "HMAC_SHA_384", msg, path("t.mac"))
    tag = read("t.mac")
    eq(len(tag), 48, "HMAC-SHA-384")
    eq(status("verify-mac", key("hmac384"), "HMAC_SHA_384", msg, path("t.mac")), "OK")
    for bit in (0, 200, 383):
        bad = write("bad.mac", flip(tag, bit))
        eq(status("verify-mac", key("hmac384"), "HMAC_SHA_384", msg, bad),
           "KMSInvalidMacException", "tag bit %d" % bit)
    other = write("other", flip(MESSAGE, 9))
    eq(status("verify-mac", key("hmac384"), "HMAC_SHA_384", other, path("t.mac")),
       "KMSInvalidMacException", "message bit changed")
    # the same tag again (HMAC is deterministic), and another key's is another tag
    ok("mac", key("hmac384"), "HMAC_SHA_384", msg, path("t2.mac"))
    eq(read("t2.mac"), tag, "deterministic")
    ok("mac", key("hmac256"), "HMAC_SHA_256", msg, path("t3.mac"))
    eq(len(read("t3.mac")), 32)
    eq(status("verify-mac", key("hmac256"), "HMAC_SHA_256", msg, path("t.mac")),
       "KMSInvalidMacException", "another key's tag")


def canonical(fields):
    """docs/client.md's canonical form, written from the spec, not from headers.c."""
    order = sorted(((n.lower().encode(), i, v.encode()) for i, (n, v) in enumerate(fields)))
    out = b"p11kms-headers-v1\0" + struct.pack(">I", len(order))
    for name, _, value in order:
        out += struct.pack(">I", len(name)) + name + struct.pack(">I", len(value)) + value
    return out


HEADERS = [("Content-Type", "application/json"), ("X-Request-Id", "r-1"),
           ("Date", "Sun, 06 Dec 2026 10:00:00 GMT"), ("x-request-id", "r-2"),
           ("X-Empty", "")]


def hargs(fields):
    return ["%s=%s" % f for f in fields]


@test
def test_headers_mac_round_trip_and_tampering():
    k = key("hmac384")
    tag = path("h.mac")
    ok("headers-mac", k, "-", tag, *hargs(HEADERS))
    eq(len(read("h.mac")), 48, "HMAC_SHA_384 by default")
    eq(status("headers-verify", k, "-", tag, *hargs(HEADERS)), "OK")
    # the form is the documented one: the tag is VerifyMac's of those bytes
    ok("headers-canonical", path("h.canon"), *hargs(HEADERS))
    eq(read("h.canon"), canonical(HEADERS), "canonical form")
    eq(status("verify-mac", k, "HMAC_SHA_384", path("h.canon"), tag), "OK", "VerifyMac of the form")
    # the same list otherwise written: names' case, the order of different names
    same = [("content-type", "application/json"), ("DATE", "Sun, 06 Dec 2026 10:00:00 GMT"),
            ("x-empty", ""), ("X-Request-ID", "r-1"), ("x-request-id", "r-2")]
    eq(status("headers-verify", k, "-", tag, *hargs(same)), "OK", "case and order of names")
    tampered = [
        ("a value changed", [(n, "r-3" if v == "r-2" else v) for n, v in HEADERS]),
        ("a value's case changed", [(n, v.upper() if n == "Content-Type" else v)
                                    for n, v in HEADERS]),
        ("duplicates reordered", [(n, {"r-1": "r-2", "r-2": "r-1"}.get(v, v))
                                  for n, v in HEADERS]),
        ("a field added", HEADERS + [("X-Extra", "1")]),
        ("a field removed", HEADERS[:-1]),
        ("an empty value filled", [(n, v or "x") for n, v in HEADERS]),
        ("a value moved into a name", [("X-Request-Idr", "-1") if v == "r-1" else (n, v)
                                       for n, v in HEADERS]),
    ]
    for what, fields in tampered:
        eq(status("headers-verify", k, "-", tag, *hargs(fields)), "KMSInvalidMacException", what)
    bad = write("hbad.mac", flip(read("h.mac"), 77))
    eq(status("headers-verify", k, "-", bad, *hargs(HEADERS)), "KMSInvalidMacException", "tag")
    # another algorithm explicitly, on a key of that size
    ok("headers-mac", key("hmac256"), "HMAC_SHA_256", path("h256.mac"), *hargs(HEADERS))
    eq(len(read("h256.mac")), 32)
    eq(status("headers-verify", key("hmac256"), "HMAC_SHA_256", path("h256.mac"),
              *hargs(HEADERS)), "OK")
    # refused before the service: a header that is not one
    eq(status("headers-mac", k, "-", tag, "bad name=1"), "InvalidArgument")
    eq(status("headers-mac", k, "-", tag, "x= padded "), "InvalidArgument")


@test
def test_derive_shared_secret_equals_openssl_ecdh():
    der, (spec, usage, _) = public_der("ecdh")
    eq((spec, usage), ("ECC_NIST_P256", "KEY_AGREEMENT"))
    kms_pub = serialization.load_der_public_key(der)
    for i in range(3):
        eph = ec.generate_private_key(ec.SECP256R1())
        peer = write("peer.der", eph.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        ok("derive", key("ecdh"), peer, path("secret"))
        want = eph.exchange(ec.ECDH(), kms_pub)
        eq(read("secret"), want, "ECDH with ephemeral key %d" % i)
    # a peer on another curve is refused
    eph = ec.generate_private_key(ec.SECP384R1())
    peer = write("peer384.der", eph.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
    eq(status("derive", key("ecdh"), peer, path("secret")), "ValidationException", "P-384 peer")
    # a signing key does not agree
    eq(status("derive", key("ecc"), path("peer.der"), path("secret")),
       "InvalidKeyUsageException")


@test
def test_data_key_pair_private_matches_public():
    for spec in ("ECC_NIST_P256", "RSA_2048"):
        info = ok("pair", key("sym"), spec, path("priv.der"), path("pub.der"), path("blob"))
        eq(info["pair_info"], [spec, C.keys["sym"]["Arn"]], spec)
        eq(info["pair_blob_match"], ["1"], "the blob decrypts to the private key (%s)" % spec)
        priv = serialization.load_der_private_key(read("priv.der"), password=None)
        eq(priv.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo),
           read("pub.der"), "the private key's public half is PublicKey (%s)" % spec)
        rc, _, err = openssl("pkey", "-inform", "DER", "-in", path("priv.der"), "-noout")
        eq(rc, 0, "openssl reads the PKCS#8 (%s)" % err)
    info = ok("pair-no-plaintext", key("sym"), "ECC_NIST_P384", path("pub.der"), path("blob"))
    eq(info["private_key_null"], ["1"])
    eq(serialization.load_der_public_key(read("pub.der")).curve.name, "secp384r1")


@test
def test_rsa_oaep_both_ways():
    pt = write("pt", b"a secret of forty bytes, more or less..")
    ok("rsa-encrypt", key("rsa_enc"), "-", pt, path("ct"))
    eq(len(read("ct")), 256, "RSA_2048")
    ok("rsa-decrypt", key("rsa_enc"), "-", path("ct"), path("pt2"))
    eq(read("pt2"), read("pt"))
    # made by OpenSSL's library on GetPublicKey's key, opened in the token
    der, _ = public_der("rsa_enc")
    pub = serialization.load_der_public_key(der)
    for md, alg in ((hashes.SHA256(), "RSAES_OAEP_SHA_256"), (hashes.SHA1(), "RSAES_OAEP_SHA_1")):
        ct = write("ct_ext", pub.encrypt(read("pt"), padding.OAEP(mgf=padding.MGF1(md),
                                                                  algorithm=md, label=None)))
        ok("rsa-decrypt", key("rsa_enc"), alg, ct, path("pt3"))
        eq(read("pt3"), read("pt"), alg)
    eq(status("rsa-decrypt", key("rsa_enc"), "RSAES_OAEP_SHA_1", path("ct"), path("pt4")),
       "InvalidCiphertextException", "the other digest")


# ---- the CLI ---------------------------------------------------------------------


@test
def test_cli_sign_verify_and_openssl():
    msg = write("cmsg", MESSAGE)
    sig = path("c.sig")
    cli_ok(["sign", "--key", key("ecc"), "--algorithm", "ECDSA_SHA_256", "-i", msg, "-o", sig])
    out = cli_ok(["verify", "--key", key("ecc"), "--algorithm", "ECDSA_SHA_256",
                  "--signature", sig, "-i", msg])
    eq(out, b"SignatureValid: valid\n")
    got = json.loads(cli_ok(["--json", "verify", "-k", key("ecc"), "-a", "ECDSA_SHA_256",
                             "-s", sig, "-i", msg]))
    eq(got["SignatureValid"], True)
    # invalid: exit 1 and a message that says so
    write("c.bad", flip(open(sig, "rb").read(), 100))
    rc, out, err = cli(["verify", "-k", key("ecc"), "-a", "ECDSA_SHA_256", "-s", path("c.bad"),
                        "-i", msg])
    eq(rc, 1, "an invalid signature (%r)" % err)
    check(err.startswith("p11kms: KMSInvalidSignatureException: the signature in ") and
          "not valid" in err, err)
    rc, out, err = cli(["verify", "-k", key("ecc"), "-a", "ECDSA_SHA_256", "-s", sig],
                       stdin=flip(MESSAGE, 3))
    eq(rc, 1, "another message on stdin (%r)" % err)
    # the PEM: openssl parses it and verifies the CLI's signature with it
    pem = path("ecc.pem")
    cli_ok(["get-public-key", "--key", key("ecc"), "-o", pem])
    text = open(pem).read()
    check(text.startswith("-----BEGIN PUBLIC KEY-----\n") and
          text.endswith("-----END PUBLIC KEY-----\n"), text)
    check(all(len(x) <= 64 for x in text.splitlines()), "lines of at most 64")
    rc, out, err = openssl("pkey", "-pubin", "-in", pem, "-noout", "-text")
    eq(rc, 0, "openssl pkey -pubin: %s" % err)
    check(b"NIST CURVE: P-256" in out or b"prime256v1" in out, out)
    rc, out, err = openssl("dgst", "-sha256", "-verify", pem, "-signature", sig, msg)
    eq((rc, out.strip()), (0, b"Verified OK"), "openssl dgst -verify (%s)" % err)
    # PEM on stdout is the same; --der is the library's DER
    eq(cli_ok(["get-public-key", "-k", key("ecc")]), text.encode())
    eq(cli_ok(["get-public-key", "-k", key("ecc"), "--der"]), public_der("ecc")[0])
    # RSA-PSS from the CLI, checked by openssl pkeyutl on the digest
    pem = path("rsa.pem")
    cli_ok(["get-public-key", "--key", key("rsa_sign"), "--pem", "-o", pem])
    digest = write("cdigest", openssl("dgst", "-sha256", "-binary", msg)[1])
    cli_ok(["sign", "-k", key("rsa_sign"), "-a", "RSASSA_PSS_SHA_256", "--digest", "-i", digest,
            "-o", path("pss.sig")])
    rc, out, err = openssl("pkeyutl", "-verify", "-pubin", "-inkey", pem, "-in", digest,
                           "-sigfile", path("pss.sig"), "-pkeyopt", "digest:sha256",
                           "-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32")
    eq(rc, 0, "openssl pkeyutl -verify, PSS (%s %s)" % (out, err))
    # the digest-signed signature verifies as the message
    cli_ok(["verify", "-k", key("rsa_sign"), "-a", "RSASSA_PSS_SHA_256", "-s", path("pss.sig"),
            "-i", msg])
    # --json summary of sign writing a file
    got = json.loads(cli_ok(["--json", "sign", "-k", key("rsa_sign"), "-a", "RSASSA_PSS_SHA_512",
                             "-i", msg, "-o", path("j.sig")]))
    eq((got["SigningAlgorithm"], got["Output"], got["SignatureBytes"]),
       ("RSASSA_PSS_SHA_512", path("j.sig"), 256))


@test
def test_cli_mac_verify_mac():
    msg = write("mmsg", MESSAGE[:100])
    cli_ok(["mac", "--key", key("hmac384"), "-i", msg, "-o", path("c.mac")])  # the key's algorithm
    eq(len(read("c.mac")), 48)
    ok("verify-mac", key("hmac384"), "HMAC_SHA_384", msg, path("c.mac"))
    eq(cli_ok(["verify-mac", "-k", key("hmac384"), "--mac", path("c.mac"), "-i", msg]),
       b"MacValid: valid\n")
    cli_ok(["verify-mac", "-k", key("hmac384"), "-a", "HMAC_SHA_384", "-m", path("c.mac"),
            "-i", msg])
    write("c.badmac", flip(read("c.mac"), 1))
    rc, _, err = cli(["verify-mac", "-k", key("hmac384"), "-m", path("c.badmac"), "-i", msg])
    eq(rc, 1, err)
    check(err.startswith("p11kms: KMSInvalidMacException: the MAC in ") and "not valid" in err,
          err)
    # stdin and stdout, and HMAC_256 found from the key
    tag = cli_ok(["mac", "-k", key("hmac256")], stdin=MESSAGE[:100])
    eq(len(tag), 32)
    # a key that is not an HMAC key, without --algorithm
    rc, _, err = cli(["mac", "-k", key("ecc"), "-i", msg])
    eq(rc, 1, err)
    check("not an HMAC key" in err, err)


@test
def test_cli_refusals():
    msg = write("rmsg", MESSAGE)
    rc, _, err = cli(["sign", "-k", key("ecc"), "-a", "ECDSA_SHA_256", "-i", msg, "-o", msg])
    eq(rc, 2, "-o is the input (%r)" % err)
    eq(read("rmsg"), MESSAGE, "the input is intact")
    rc, _, err = cli(["mac", "-k", key("hmac384"), "-i", msg, "-o", msg])
    eq(rc, 2, err)
    eq(read("rmsg"), MESSAGE, "the input is intact")
    big = write("big", b"x" * 4097)
    rc, _, err = cli(["sign", "-k", key("ecc"), "-a", "ECDSA_SHA_256", "-i", big])
    eq(rc, 2, err)
    check("over 4096 bytes" in err and "--digest" in err, err)
    rc, _, err = cli(["sign", "-k", key("ecc"), "-a", "ECDSA_SHA_256", "--digest", "-i", msg])
    eq(rc, 2, "a digest of the wrong length (%r)" % err)
    rc, _, err = cli(["sign", "-k", key("ecc"), "-a", "ECDSA_SHA_999", "-i", msg])
    eq(rc, 2, err)
    rc, _, err = cli(["sign", "-k", key("ecc"), "-i", msg])
    eq(rc, 2, "no --algorithm (%r)" % err)
    rc, _, err = cli(["verify", "-k", key("ecc"), "-a", "ECDSA_SHA_256", "-i", msg])
    eq(rc, 2, "no --signature (%r)" % err)
    rc, _, err = cli(["verify", "-k", key("ecc"), "-a", "ECDSA_SHA_256", "-s", "-"], stdin=MESSAGE)
    eq(rc, 2, "signature and message both on stdin (%r)" % err)
    rc, _, err = cli(["verify-mac", "-k", key("hmac384"), "-m", "-", "-i", "-"], stdin=MESSAGE)
    eq(rc, 2, "MAC and message both on stdin (%r)" % err)
    rc, _, err = cli(["get-public-key", "-k", key("ecc"), "--pem", "--der"])
    eq(rc, 2, err)
    rc, _, err = cli(["get-public-key", "-k", "alias/none"])
    eq(rc, 1, err)
    check(err.startswith("p11kms: NotFoundException: "), err)
    rc, _, err = cli(["keys", "create", "--key-spec", "RSA_1024"])
    eq(rc, 1, err)
    check(err.startswith("p11kms: ValidationException: "), err)
    rc, _, err = cli(["sign", "-k", key("ecc"), "-a", "ECDSA_SHA_256", "-i", path("missing")])
    eq(rc, 5, err)
    rc, _, err = cli(["sign", "-k", key("ecc"), "-a", "ECDSA_SHA_256", "-i", write("empty", b"")])
    eq(rc, 2, err)


@test
def test_cli_help():
    for c in ("sign", "verify", "mac", "verify-mac", "get-public-key"):
        rc, out, err = cli([c, "--help"])
        eq((rc, err), (0, ""), c)
        text = out.decode()
        check(("p11kms [global options] %s" % c) in text, text)
        for line in text.splitlines():
            check(len(line) <= 80, "%s --help: %d columns: %r" % (c, len(line), line))
    rc, out, _ = cli(["--help"])
    for c in ("sign", "verify", "mac", "verify-mac", "get-public-key"):
        check(("\n  %s " % c) in out.decode(), "--help lists %s" % c)
    rc, out, _ = cli(["keys", "create", "--help"])
    check("--key-spec" in out.decode() and "--key-usage" in out.decode(), out)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
