#!/usr/bin/python3
"""CMS AuthEnvelopedData (docs/format.md) between libp11kms, through the p11kms
CLI and a real p11kmsd on a fresh SoftHSM2 token, and `openssl cms`, a
standard CMS implementation. TAP output.

  - openssl cms -encrypt (AES-256-GCM) to a certificate made, by a test CA,
    for a KMS key's public half: an RSA_2048 ENCRYPT_DECRYPT key (RSAES-OAEP
    with SHA-256, and with SHA-1) and an ECC_NIST_P256 KEY_AGREEMENT key
    (ECDH, X9.63 KDF with SHA-256 and with OpenSSL's default SHA-1) opens with
    p11kms decrypt --key through the service, the private key staying in the
    token; without --key it is a usage error, and another key cannot open it;
  - p11kms encrypt --format cms to local certificates and bare keys (RSA and
    EC, one envelope to all of them) opens with openssl cms -decrypt given each
    private key, and with p11kms decrypt --private-key;
  - to a symmetric KMS key (KEKRecipientInfo): p11kms decrypt opens it through
    the service, and openssl cms -decrypt -secretkey opens it given the data
    key that boto3's Decrypt of the blob in the kekid returns;
  - to a KMS RSA key and a KMS EC key (their public halves): p11kms decrypt
    --key opens it through the service;
  - a SIGN_VERIFY key is InvalidKeyUsageException; a tampered envelope, a
    truncated one and an EnvelopedData (AES-CBC) are refused with no output.
"""

import os
import subprocess
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

OPENSSL = "/usr/bin/openssl"
TIMEOUT = 120
PAYLOAD = b"CMS interop payload \x00\xff" * 100
KEKRI_OID = "2.25.76451068817883183688253925779633734942"


class Ctx:
    ws = None
    server = None
    alice = None
    kms = None
    keys = {}  # name -> KeyMetadata


C = Ctx()

KEYS = {
    "rsa_enc": ("RSA_2048", "ENCRYPT_DECRYPT"),
    "rsa_enc2": ("RSA_2048", "ENCRYPT_DECRYPT"),
    "ecdh": ("ECC_NIST_P256", "KEY_AGREEMENT"),
    "rsa_sign": ("RSA_2048", "SIGN_VERIFY"),
    "sym": None,
}


def path(name):
    return os.path.join(C.ws.sub("files"), name)


def write(name, data):
    with open(path(name), "wb") as f:
        f.write(data)
    return path(name)


def read(name):
    with open(path(name), "rb") as f:
        return f.read()


def env():
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("AWS_") and not k.startswith("P11KMS_")
         and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    e.update(P11KMS_ENDPOINT=C.server.endpoint, AWS_ACCESS_KEY_ID=C.alice.access_key,
             AWS_SECRET_ACCESS_KEY=C.alice.secret, AWS_REGION=h.REGION,
             HOME=C.ws.sub("home"), AWS_CONFIG_FILE="/dev/null",
             AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    return e


def p11kms():
    p = os.environ.get("P11KMS_CLI") or os.path.normpath(os.path.join(h.HERE, "..", "..", "p11kms"))
    check(os.access(p, os.X_OK), "%s is not built" % p)
    return p


def cli(args, stdin=b""):
    r = subprocess.run([p11kms()] + list(args), env=env(), input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=TIMEOUT)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def cli_ok(args, stdin=b""):
    rc, out, err = cli(args, stdin)
    eq((rc, err), (0, ""), "p11kms %s" % " ".join(args))
    return out


def ossl(args, stdin=b"", ok=True):
    r = subprocess.run([OPENSSL] + list(args), input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, timeout=TIMEOUT)
    if ok:
        eq(r.returncode, 0, "openssl %s: %s" % (" ".join(args), r.stderr.decode()))
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def arn(name):
    return C.keys[name]["Arn"]


def decrypt_fails(args, want, what):
    """p11kms decrypt args: fails with status want, writes no output file."""
    out = path("refused.out")
    if os.path.exists(out):
        os.unlink(out)
    rc, _, err = cli(["decrypt"] + list(args) + ["-o", out])
    check(rc != 0, "%s: p11kms decrypt succeeded" % what)
    check(any(w in err for w in want.split("|")), "%s: want %s, stderr %r" % (what, want, err))
    check(not os.path.exists(out) or os.path.getsize(out) == 0, "%s: output written" % what)


def make_ca():
    ossl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
          "-out", path("ca.key")])
    ossl(["req", "-new", "-x509", "-key", path("ca.key"), "-subj", "/CN=p11kms test CA",
          "-days", "2", "-out", path("ca.pem")])


def cert_for_public(name, pub_pem):
    """A certificate, signed by the test CA, for a public key whose private half we lack."""
    ossl(["req", "-new", "-key", path("ca.key"), "-subj", "/CN=" + name, "-out", path(name + ".csr")])
    ossl(["x509", "-req", "-in", path(name + ".csr"), "-CA", path("ca.pem"), "-CAkey",
          path("ca.key"), "-CAcreateserial", "-days", "2", "-force_pubkey", pub_pem,
          "-out", path(name + ".crt")])
    return path(name + ".crt")


def local_key(name, algorithm_args):
    ossl(["genpkey"] + algorithm_args + ["-out", path(name + ".key")])
    ossl(["req", "-new", "-x509", "-key", path(name + ".key"), "-subj", "/CN=" + name, "-days",
          "2", "-out", path(name + ".crt")])
    ossl(["pkey", "-in", path(name + ".key"), "-pubout", "-out", path(name + ".pub")])


def kms_public_pem(name):
    pub = C.kms.get_public_key(KeyId=arn(name))["PublicKey"]
    _, pem, _ = ossl(["pkey", "-pubin", "-inform", "DER", "-outform", "PEM"], pub)
    return write(name + ".kms.pub", pem)


def der_children(data):
    """The TLVs inside one DER value: [(tag byte, header+content bytes, content bytes)]."""
    out, i = [], 0
    while i < len(data):
        tag = data[i]
        n = data[i + 1]
        hl = 2
        if n & 0x80:
            k = n & 0x7f
            n = int.from_bytes(data[i + 2:i + 2 + k], "big")
            hl = 2 + k
        out.append((tag, data[i:i + hl + n], data[i + hl:i + hl + n]))
        i += hl + n
    return out


def kekri_blob(der):
    """The CiphertextBlob in the first KEKRecipientInfo's kekid.other."""
    ci = der_children(der)[0][2]                # ContentInfo
    aed = der_children(der_children(ci)[1][2])[0][2]  # [0] -> AuthEnvelopedData
    ris = [c for c in der_children(aed) if c[0] == 0x31][0][2]
    for tag, _, body in der_children(ris):
        if tag == 0xa2:                          # [2] KEKRecipientInfo
            kekid = der_children(body)[1][2]
            other = der_children(kekid)[-1][2]   # OtherKeyAttribute
            oid, attr = der_children(other)
            eq(attr[0], 0x04, "keyAttr is an OCTET STRING")
            return der_children(kekid)[0][2], oid[1], attr[2]
    raise AssertionError("no KEKRecipientInfo")


def setup():
    C.ws = h.Workspace()
    os.makedirs(C.ws.sub("files"))
    os.makedirs(C.ws.sub("home"))
    C.alice = h.new_principal("alice")
    token, config = h.token_and_config(C.ws, "p11kms-it-cms", C.alice)
    C.server = h.start_config_server(config, token, C.ws.sub("p11kmsd.log"))
    h.diag("p11kmsd serving %s" % C.server.endpoint)
    C.kms = h.kms_client(C.server.endpoint, C.alice)
    for name, spec in KEYS.items():
        kw = {"Description": "cms " + name}
        if spec:
            kw.update(KeySpec=spec[0], KeyUsage=spec[1])
        C.keys[name] = C.kms.create_key(**kw)["KeyMetadata"]
    make_ca()
    local_key("lrsa", ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
    local_key("lec", ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"])
    write("payload", PAYLOAD)


def teardown():
    h.finish(T, C.ws, C.server)


# ---- (a) openssl seals to a KMS key's certificate, the service opens ----------------


@test
def test_openssl_to_kms_rsa_opens_through_service():
    crt = cert_for_public("kmsrsa", kms_public_pem("rsa_enc"))
    for md in ("sha256", "sha1"):
        ossl(["cms", "-encrypt", "-aes-256-gcm", "-binary", "-in", path("payload"), "-outform",
              "DER", "-out", path("a-rsa.der"), "-recip", crt, "-keyopt",
              "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:" + md, "-keyopt",
              "rsa_mgf1_md:" + md])
        cli_ok(["decrypt", "--key", arn("rsa_enc"), "-i", path("a-rsa.der"), "-o",
                path("a-rsa.out")])
        eq(read("a-rsa.out"), PAYLOAD, "OAEP with " + md)
    # PEM too
    ossl(["cms", "-encrypt", "-aes-256-gcm", "-binary", "-in", path("payload"), "-outform", "PEM",
          "-out", path("a-rsa.pem"), "-recip", crt, "-keyopt", "rsa_padding_mode:oaep",
          "-keyopt", "rsa_oaep_md:sha256"])
    cli_ok(["decrypt", "--key", arn("rsa_enc"), "-i", path("a-rsa.pem"), "-o", path("a-rsa.out")])
    eq(read("a-rsa.out"), PAYLOAD, "PEM")
    # no key named: a KTRI names no KMS key
    decrypt_fails(["-i", path("a-rsa.pem")], "give key_id", "no --key")
    # another RSA key of the service cannot open it
    decrypt_fails(["--key", arn("rsa_enc2"), "-i", path("a-rsa.pem")], "DecryptionFailed",
                  "another KMS key")


@test
def test_openssl_to_kms_ec_opens_through_service():
    crt = cert_for_public("kmsec", kms_public_pem("ecdh"))
    for keyopt in (["-keyopt", "ecdh_kdf_md:sha256"], []):
        ossl(["cms", "-encrypt", "-aes-256-gcm", "-binary", "-in", path("payload"), "-outform",
              "DER", "-out", path("a-ec.der"), "-recip", crt] + keyopt)
        cli_ok(["decrypt", "--key", arn("ecdh"), "-i", path("a-ec.der"), "-o", path("a-ec.out")])
        eq(read("a-ec.out"), PAYLOAD, "KARI %r" % keyopt)
    decrypt_fails(["--key", arn("rsa_enc"), "-i", path("a-ec.der")], "DecryptionFailed",
                  "an RSA key for a KARI")


# ---- (b) libp11kms seals to local keys, openssl opens ------------------------------


@test
def test_p11kms_to_local_keys_opens_in_openssl():
    cli_ok(["encrypt", "--format", "cms", "--to-pem", path("lrsa.crt"), "--to-pem",
            path("lec.crt"), "--to-pem", path("lrsa.pub"), "--to-pem", path("lec.pub"),
            "-i", path("payload"), "-o", path("b.der")])
    for name in ("lrsa", "lec"):
        _, out, _ = ossl(["cms", "-decrypt", "-inform", "DER", "-in", path("b.der"), "-inkey",
                          path(name + ".key"), "-recip", path(name + ".crt")])
        eq(out, PAYLOAD, "openssl cms -decrypt -recip %s.crt" % name)
        _, out, _ = ossl(["cms", "-decrypt", "-inform", "DER", "-in", path("b.der"), "-inkey",
                          path(name + ".key")])
        eq(out, PAYLOAD, "openssl cms -decrypt %s.key (no certificate)" % name)
        cli_ok(["decrypt", "--private-key", path(name + ".key"), "-i", path("b.der"), "-o",
                path("b.out")])
        eq(read("b.out"), PAYLOAD, "p11kms decrypt --private-key %s" % name)
    _, text, _ = ossl(["cms", "-cmsout", "-print", "-inform", "DER", "-in", path("b.der")])
    text = text.decode()
    for want in ("id-smime-ct-authEnvelopedData", "rsaesOaep", "mgf1",
                 "dhSinglePass-stdDH-sha256kdf-scheme", "id-aes256-wrap", "aes-256-gcm",
                 "d.issuerAndSerialNumber", "d.subjectKeyIdentifier", "d.rKeyId"):
        check(want in text, "cmsout lacks %s" % want)


# ---- (c) KEKRecipientInfo to a symmetric KMS key -----------------------------------


@test
def test_kekri_through_service_and_openssl():
    cli_ok(["encrypt", "--format", "cms", "--key", arn("sym"), "-i", path("payload"), "-o",
            path("c.der")])
    cli_ok(["decrypt", "-i", path("c.der"), "-o", path("c.out")])
    eq(read("c.out"), PAYLOAD, "KEKRI through the service")
    cli_ok(["decrypt", "--key", C.keys["sym"]["KeyId"], "-i", path("c.der"), "-o", path("c.out")])
    eq(read("c.out"), PAYLOAD, "KEKRI, --key the bare key id")
    decrypt_fails(["--key", arn("rsa_enc"), "-i", path("c.der")], "DecryptionFailed",
                  "KEKRI, --key another key")
    key_id, oid_der, blob = kekri_blob(read("c.der"))
    eq(key_id, arn("sym").encode(), "kekid.keyIdentifier is the key ARN")
    _, asn1, _ = ossl(["asn1parse", "-inform", "DER"], oid_der)
    check(KEKRI_OID in asn1.decode(), "keyAttrId %r" % asn1)
    dk = C.kms.decrypt(CiphertextBlob=blob)["Plaintext"]
    eq(len(dk), 32, "the data key")
    _, out, _ = ossl(["cms", "-decrypt", "-inform", "DER", "-in", path("c.der"), "-secretkey",
                      dk.hex(), "-secretkeyid", key_id.hex()])
    eq(out, PAYLOAD, "openssl cms -decrypt -secretkey")


@test
def test_kekri_by_alias():
    C.kms.create_alias(AliasName="alias/cms-sym", TargetKeyId=C.keys["sym"]["KeyId"])
    cli_ok(["encrypt", "--format", "cms", "--key", "alias/cms-sym", "-i", path("payload"), "-o",
            path("c2.der")])
    eq(kekri_blob(read("c2.der"))[0], arn("sym").encode(), "kekid.keyIdentifier is the key ARN")
    cli_ok(["decrypt", "--key", "alias/cms-sym", "-i", path("c2.der"), "-o", path("c2.out")])
    eq(read("c2.out"), PAYLOAD, "opened naming the alias")


@test
def test_openssl_streamed_ber_opens():
    """openssl cms -stream writes BER with indefinite lengths: it opens as well."""
    ossl(["cms", "-encrypt", "-aes-256-gcm", "-stream", "-binary", "-in", path("payload"),
          "-outform", "DER", "-out", path("s.ber"), "-recip", path("lrsa.crt"), "-keyopt",
          "rsa_padding_mode:oaep", "-keyopt", "rsa_oaep_md:sha256"])
    eq(read("s.ber")[:2], b"\x30\x80", "indefinite length")
    cli_ok(["decrypt", "--private-key", path("lrsa.key"), "-i", path("s.ber"), "-o",
            path("s.out")])
    eq(read("s.out"), PAYLOAD, "streamed BER")
    # PKCS#1 v1.5 key transport (openssl's default) is not accepted
    ossl(["cms", "-encrypt", "-aes-256-gcm", "-binary", "-in", path("payload"), "-outform", "DER",
          "-out", path("v15.der"), "-recip", path("lrsa.crt")])
    decrypt_fails(["--private-key", path("lrsa.key"), "-i", path("v15.der")], "RSAES-OAEP",
                  "PKCS#1 v1.5 key transport")


@test
def test_kms_asymmetric_recipients_through_service():
    cli_ok(["encrypt", "--format", "cms", "--key", arn("rsa_enc"), "--key", arn("ecdh"),
            "--key", arn("sym"), "-i", path("payload"), "-o", path("d.der")])
    for name in ("rsa_enc", "ecdh", "sym"):
        cli_ok(["decrypt", "--key", arn(name), "-i", path("d.der"), "-o", path("d.out")])
        eq(read("d.out"), PAYLOAD, "opened with " + name)
    decrypt_fails(["--key", arn("rsa_enc2"), "-i", path("d.der")], "DecryptionFailed",
                  "a key that is no recipient")


# ---- (d) refusals -------------------------------------------------------------------


@test
def test_refusals():
    rc, _, err = cli(["encrypt", "--format", "cms", "--key", arn("rsa_sign"), "-i",
                      path("payload"), "-o", path("e.der")])
    check(rc != 0 and "InvalidKeyUsageException" in err, "SIGN_VERIFY key: %r" % err)
    # opening with one: the service's answer comes back as it is
    decrypt_fails(["--key", arn("rsa_sign"), "-i", path("a-rsa.der")],
                  "InvalidKeyUsageException", "opened with a SIGN_VERIFY key")
    cli_ok(["encrypt", "--format", "cms", "--key", arn("sym"), "--to-pem", path("lrsa.crt"),
            "-i", path("payload"), "-o", path("e.der")])
    good = read("e.der")
    for where in (len(good) - 5, len(good) - 40, len(good) // 2):
        bad = bytearray(good)
        bad[where] ^= 0x01
        write("e.bad", bytes(bad))
        decrypt_fails(["-i", path("e.bad")], "DecryptionFailed|MalformedEnvelope",
                      "bit flipped at %d" % where)
        decrypt_fails(["--private-key", path("lrsa.key"), "-i", path("e.bad")],
                      "DecryptionFailed|MalformedEnvelope",
                      "bit flipped at %d, local key" % where)
    write("e.short", good[:len(good) - 1])
    decrypt_fails(["-i", path("e.short")], "MalformedEnvelope", "truncated")
    ossl(["cms", "-encrypt", "-aes-256-cbc", "-binary", "-in", path("payload"), "-outform", "DER",
          "-out", path("e.cbc"), "-recip", path("lrsa.crt")])
    decrypt_fails(["--private-key", path("lrsa.key"), "-i", path("e.cbc")], "not AuthEnveloped",
                  "EnvelopedData")


if __name__ == "__main__":
    T.run(setup, teardown)
