#!/usr/bin/python3
"""JWE to public keys (RSA-OAEP-256, ECDH-ES+A256KW, A256GCM) between libp11kms,
driven through the p11kms CLI (encrypt --format jwe|jwe-json, decrypt), and
python3-jwcrypto, against a real p11kmsd on a fresh SoftHSM2 token:

(a) sealed by libp11kms to local keys (RSA-2048, P-256, P-384, X25519; PEM
    and JWK recipient files), opened by jwcrypto with the private keys,
    compact and general JSON;
(b) sealed by jwcrypto to local keys, opened by libp11kms with the private
    key (PEM and JWK);
(c) KMS keys (RSA_2048/RSA_4096 ENCRYPT_DECRYPT, ECC_NIST_P256/P384
    KEY_AGREEMENT): jwcrypto seals to GetPublicKey's key (boto3) with the
    key's ARN as kid and libp11kms opens through the service (Decrypt with
    RSAES_OAEP_SHA_256, DeriveSharedSecret); libp11kms seals to --key and
    opens through the service; a SIGN_VERIFY key is InvalidKeyUsageException
    and a principal without kms:Decrypt / kms:DeriveSharedSecret is
    AccessDeniedException; an altered JWE exits 4. TAP output."""

import json
import os
import subprocess
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, rsa, x25519  # noqa: E402
from jwcrypto import jwe, jwk  # noqa: E402

T = h.TapRunner()
test = T.test

TIMEOUT = 120
PAYLOAD = "{\"order\":42,\"note\":\"caf\u00e9\"}".encode() * 10
ALGS = ["RSA-OAEP-256", "ECDH-ES+A256KW", "A256GCM"]


class Ctx:
    ws = None
    server = None
    alice = None
    bob = None
    kms = None
    keys = {}   # name -> KeyMetadata
    local = {}  # name -> pyca private key


C = Ctx()

KMS_KEYS = {
    "rsa2048": ("RSA_2048", "ENCRYPT_DECRYPT"),
    "rsa4096": ("RSA_4096", "ENCRYPT_DECRYPT"),
    "p256": ("ECC_NIST_P256", "KEY_AGREEMENT"),
    "p384": ("ECC_NIST_P384", "KEY_AGREEMENT"),
    "rsa_sign": ("RSA_2048", "SIGN_VERIFY"),
    "ec_sign": ("ECC_NIST_P256", "SIGN_VERIFY"),
}


def user(name):
    return "arn:aws:iam::%s:user/%s" % (h.ACCOUNT, name)


def policy():
    """alice may do anything; bob may read the public key but not open."""
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "alice", "Effect": "Allow", "Principal": {"AWS": user("alice")},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "bob", "Effect": "Allow", "Principal": {"AWS": user("bob")},
         "Action": ["kms:GetPublicKey", "kms:DescribeKey"], "Resource": "*"}]})


def env(who=None):
    who = who or C.alice
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("AWS_") and not k.startswith("P11KMS_")
         and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    e.update(P11KMS_ENDPOINT=C.server.endpoint, AWS_ACCESS_KEY_ID=who.access_key,
             AWS_SECRET_ACCESS_KEY=who.secret, AWS_REGION=h.REGION,
             HOME=C.ws.sub("home"), AWS_CONFIG_FILE="/dev/null",
             AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    return e


def cli_path():
    p = os.environ.get("P11KMS_CLI") or os.path.normpath(os.path.join(h.HERE, "..", "..",
                                                                      "p11kms"))
    if not os.access(p, os.X_OK):
        raise RuntimeError("%s is not built" % p)
    return p


def cli(args, stdin=b"", who=None):
    """Runs p11kms; returns (exit status, stdout bytes, stderr text)."""
    r = subprocess.run([cli_path(), "--quiet"] + list(args), env=env(who), input=stdin,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=TIMEOUT)
    return r.returncode, r.stdout, r.stderr.decode("utf-8", "replace")


def cli_ok(args, stdin=b"", who=None):
    rc, out, err = cli(args, stdin, who)
    eq((rc, err), (0, ""), "p11kms %s" % " ".join(args))
    return out


def path(name):
    return C.ws.sub("files", name)


def write(name, data):
    if isinstance(data, str):
        data = data.encode()
    with open(path(name), "wb") as f:
        f.write(data)
    return path(name)


def seal(fmt, recipients):
    """libp11kms' JWE of PAYLOAD; recipients: ("--key", id) / ("--to-pem", file) pairs."""
    args = ["encrypt", "--format", fmt]
    for opt, val in recipients:
        args += [opt, val]
    out = cli_ok(args, PAYLOAD).decode().strip()
    check("\n" not in out, "one line")
    return out


def p11_open(token, *args, who=None):
    return cli(["decrypt"] + list(args), token.encode() + b"\n", who)


def p11_open_ok(token, *args, who=None):
    rc, out, err = p11_open(token, *args, who=who)
    eq((rc, err), (0, ""), "decrypt %s" % " ".join(args))
    eq(out, PAYLOAD, "the payload")


def pem_private(k):
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def pem_public(k):
    return k.public_key().public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)


def to_jwk(k):
    """A pyca key as a jwcrypto JWK (jwcrypto 1.1 imports no pyca X25519 object)."""
    raw = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(k, x25519.X25519PrivateKey):
        return jwk.JWK(kty="OKP", crv="X25519",
                       x=jwk.base64url_encode(k.public_key().public_bytes(*raw)),
                       d=jwk.base64url_encode(k.private_bytes(
                           serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                           serialization.NoEncryption())))
    if isinstance(k, x25519.X25519PublicKey):
        return jwk.JWK(kty="OKP", crv="X25519", x=jwk.base64url_encode(k.public_bytes(*raw)))
    return jwk.JWK.from_pyca(k)


def jwcrypto_open(token, k):
    """jwcrypto's plaintext of token with pyca private key k."""
    t = jwe.JWE()
    t.allowed_algs = ALGS
    t.deserialize(token, key=to_jwk(k))
    return t.payload


def jwcrypto_seal(recipients, compact, protected=None):
    """jwcrypto's JWE to [(JWK, header dict)]."""
    if compact:
        (key, header), = recipients
        prot = dict(header, enc="A256GCM")
        t = jwe.JWE(PAYLOAD, protected=json.dumps(prot))
        t.allowed_algs = ALGS
        t.add_recipient(key)
        return t.serialize(compact=True)
    t = jwe.JWE(PAYLOAD, protected=json.dumps(protected or {"enc": "A256GCM"}))
    t.allowed_algs = ALGS
    for key, header in recipients:
        t.add_recipient(key, header=json.dumps(header))
    return t.serialize()


def alg_of(k):
    return "RSA-OAEP-256" if isinstance(k, rsa.RSAPublicKey) else "ECDH-ES+A256KW"


def kms_public(name):
    """GetPublicKey (boto3) of a KMS key as a JWK with the key's ARN as kid."""
    der = C.kms.get_public_key(KeyId=C.keys[name]["KeyId"])["PublicKey"]
    pub = serialization.load_der_public_key(der)
    return to_jwk(pub), {"alg": alg_of(pub), "kid": C.keys[name]["Arn"]}


def setup():
    C.ws = h.Workspace()
    os.makedirs(C.ws.sub("files"))
    os.makedirs(C.ws.sub("home"))
    C.alice = h.new_principal("alice")
    C.bob = h.new_principal("bob")
    token = h.make_token(C.ws.sub("token"), "p11kms-it-jwe-pk")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.alice, C.bob])
    config = h.write_config(C.ws.sub("p11kmsd.conf"), token, creds)
    C.server = h.start_config_server(config, token, C.ws.sub("p11kmsd.log"))
    h.diag("p11kmsd serving %s" % C.server.endpoint)
    C.kms = h.kms_client(C.server.endpoint, C.alice)
    for name, (spec, usage) in KMS_KEYS.items():
        C.keys[name] = h.kms_ok(C.server.endpoint, "CreateKey",
                                {"KeySpec": spec, "KeyUsage": usage, "Policy": policy(),
                                 "Description": "jwe-pk " + name}, C.alice)["KeyMetadata"]
    C.keys["sym"] = h.kms_ok(C.server.endpoint, "CreateKey", {"Description": "jwe-pk sym"},
                             C.alice)["KeyMetadata"]
    C.local = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "x25519": x25519.X25519PrivateKey.generate(),
    }
    for name, k in C.local.items():
        write(name + ".key", pem_private(k))
        write(name + ".pub", pem_public(k))
        write(name + ".jwk", to_jwk(k).export_private())
        write(name + ".pub.jwk", to_jwk(k.public_key()).export_public())


def teardown():
    h.finish(T, C.ws, C.server)


# ---- (a) libp11kms seals to local keys, jwcrypto opens ------------------------------


@test
def test_a_compact_to_each_local_key_opens_in_jwcrypto():
    for name, k in C.local.items():
        for suffix in (".pub", ".pub.jwk"):
            token = seal("jwe", [("--to-pem", path(name + suffix))])
            eq(token.count("."), 4, "compact")
            eq(jwcrypto_open(token, k), PAYLOAD, name + suffix)
            hdr = json.loads(jwk.base64url_decode(token.split(".")[0]))
            eq(hdr["enc"], "A256GCM")
            eq(hdr["alg"], "RSA-OAEP-256" if name == "rsa" else "ECDH-ES+A256KW", name)
            if name != "rsa":
                eq(hdr["epk"]["crv"], {"p256": "P-256", "p384": "P-384",
                                       "x25519": "X25519"}[name])
                check("d" not in hdr["epk"], "no private member in the epk")


@test
def test_a_json_to_four_local_keys_opens_in_jwcrypto_with_each():
    token = seal("jwe-json", [("--to-pem", path(n + ".pub")) for n in C.local])
    doc = json.loads(token)
    eq(len(doc["recipients"]), 4)
    eq(json.loads(jwk.base64url_decode(doc["protected"])), {"enc": "A256GCM"})
    for name, k in C.local.items():
        eq(jwcrypto_open(token, k), PAYLOAD, name)
    # and libp11kms opens it with each private key too
    for name in C.local:
        p11_open_ok(token, "--private-key", path(name + ".key"))


# ---- (b) jwcrypto seals to local keys, libp11kms opens ------------------------------


@test
def test_b_jwcrypto_compact_opens_in_libp11kms():
    for name, k in C.local.items():
        pub = to_jwk(k.public_key())
        token = jwcrypto_seal([(pub, {"alg": alg_of(k.public_key()) if name == "rsa"
                                      else "ECDH-ES+A256KW", "kid": "local-" + name})], True)
        p11_open_ok(token, "--private-key", path(name + ".key"))
        p11_open_ok(token, "--private-key", path(name + ".jwk"))
        # another key of a type that could open it: not a recipient (exit 4)
        other = "p384" if name == "p256" else "p256" if name != "rsa" else None
        if other:
            rc, out, err = p11_open(token, "--private-key", path(other + ".key"))
            eq((rc, out), (4, b""), "%s opened with %s" % (name, other))
            check("MalformedEnvelope" in err or "epk is on" in err, err)


@test
def test_b_jwcrypto_json_opens_in_libp11kms_with_each_key():
    recips = [(to_jwk(k.public_key()),
               {"alg": "RSA-OAEP-256" if n == "rsa" else "ECDH-ES+A256KW"})
              for n, k in C.local.items()]
    token = jwcrypto_seal(recips, False)
    eq(len(json.loads(token)["recipients"]), 4)
    for name in C.local:
        p11_open_ok(token, "--private-key", path(name + ".key"))
    # a key that is no recipient: exit 4, nothing on stdout
    stranger = ec.generate_private_key(ec.SECP256R1())
    rc, out, _ = p11_open(token, "--private-key", write("stranger.key", pem_private(stranger)))
    eq((rc, out), (4, b""), "a stranger's key")


@test
def test_b_altered_jwe_never_opens():
    k = C.local["p256"]
    token = jwcrypto_seal([(to_jwk(k.public_key()), {"alg": "ECDH-ES+A256KW"})], True)
    parts = token.split(".")
    for i in (0, 1, 2, 3, 4):
        if not parts[i]:
            continue
        p = list(parts)
        c = p[i][len(p[i]) // 2]
        p[i] = p[i][:len(p[i]) // 2] + ("A" if c != "A" else "B") + p[i][len(p[i]) // 2 + 1:]
        rc, out, _ = p11_open(".".join(p), "--private-key", path("p256.key"))
        eq((rc, out), (4, b""), "segment %d altered" % i)


# ---- (c) through the service ----------------------------------------------------------


@test
def test_c_jwcrypto_seals_to_kms_keys_libp11kms_opens_through_the_service():
    for name in ("rsa2048", "rsa4096", "p256", "p384"):
        key, header = kms_public(name)
        token = jwcrypto_seal([(key, header)], True)
        p11_open_ok(token)                                     # the kid names the key
        p11_open_ok(token, "--key", C.keys[name]["KeyId"])     # or the caller does
        token = jwcrypto_seal([(key, header)], False)
        p11_open_ok(token)


@test
def test_c_json_to_several_kms_keys_and_a_local_one():
    recips = [kms_public(n) for n in ("rsa2048", "p256", "p384")]
    local = C.local["x25519"]
    recips.append((to_jwk(local.public_key()), {"alg": "ECDH-ES+A256KW"}))
    token = jwcrypto_seal(recips, False)
    p11_open_ok(token)  # the first recipient whose kid names a key
    for name in ("rsa2048", "p256", "p384"):
        p11_open_ok(token, "--key", C.keys[name]["Arn"])
    p11_open_ok(token, "--private-key", path("x25519.key"))
    # a KMS key that is not among the recipients: none names it
    rc, out, _ = p11_open(token, "--key", C.keys["rsa4096"]["KeyId"])
    eq((rc, out), (4, b""), "not a recipient")


@test
def test_c_libp11kms_seals_to_kms_keys_and_opens_through_the_service():
    for name in ("rsa2048", "rsa4096", "p256", "p384"):
        token = seal("jwe", [("--key", C.keys[name]["KeyId"])])
        hdr = json.loads(jwk.base64url_decode(token.split(".")[0]))
        eq(hdr["kid"], C.keys[name]["Arn"], "the kid is the key's ARN")
        p11_open_ok(token)
        p11_open_ok(token, "--key", C.keys[name]["KeyId"])
    # a local key that is not the recipient's, and the client: the service opens it
    token = seal("jwe", [("--key", C.keys["p256"]["KeyId"])])
    p11_open_ok(token, "--private-key", path("p384.key"))
    p11_open_ok(token, "--private-key", path("p256.key"))
    token = seal("jwe-json", [("--key", C.keys["rsa2048"]["KeyId"]),
                              ("--key", C.keys["p384"]["KeyId"]),
                              ("--to-pem", path("p256.pub"))])
    eq(len(json.loads(token)["recipients"]), 3)
    p11_open_ok(token)
    p11_open_ok(token, "--key", C.keys["p384"]["KeyId"])
    p11_open_ok(token, "--private-key", path("p256.key"))
    # p11kms_seal's own "dir" JWE still opens through the same command
    token = seal("jwe", [("--key", C.keys["sym"]["KeyId"])])
    eq(json.loads(jwk.base64url_decode(token.split(".")[0]))["alg"], "dir")
    p11_open_ok(token)


@test
def test_c_sign_verify_key_is_invalid_key_usage():
    for name in ("rsa_sign", "ec_sign"):
        key, header = kms_public(name)
        token = jwcrypto_seal([(key, header)], True)
        rc, out, err = p11_open(token)
        eq((rc, out), (1, b""), name)
        check("InvalidKeyUsageException" in err, "%s: %s" % (name, err))
    # and sealing to it is refused before anything is written
    rc, out, err = cli(["encrypt", "--format", "jwe", "--key", C.keys["rsa_sign"]["KeyId"]],
                       PAYLOAD)
    check(rc != 0 and out == b"" and "InvalidKeyUsageException" in err, err)


@test
def test_c_without_decrypt_or_derive_access_denied():
    for name in ("rsa2048", "p256"):
        # bob may read the public key, so sealing works for him
        token = seal("jwe", [("--key", C.keys[name]["KeyId"])])
        rc, out, err = p11_open(token, who=C.bob)
        eq((rc, out), (1, b""), name)
        check("AccessDeniedException" in err, "%s: %s" % (name, err))
        rc, _, err = cli(["encrypt", "--format", "jwe", "--key", C.keys[name]["KeyId"]],
                         PAYLOAD, who=C.bob)
        eq((rc, err), (0, ""), "bob seals to %s" % name)


@test
def test_c_altered_jwe_through_the_service_exits_4():
    token = seal("jwe", [("--key", C.keys["p256"]["KeyId"])])
    p = token.split(".")
    p[3] = p[3][:5] + ("A" if p[3][5] != "A" else "B") + p[3][6:]
    rc, out, _ = p11_open(".".join(p))
    eq((rc, out), (4, b""), "ciphertext altered")
    p = token.split(".")
    p[1] = p[1][:5] + ("A" if p[1][5] != "A" else "B") + p[1][6:]
    rc, out, _ = p11_open(".".join(p))
    eq((rc, out), (4, b""), "encrypted key altered")


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
