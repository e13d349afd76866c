#!/usr/bin/python3
"""Asymmetric and HMAC keys against p11kmsd on a fresh SoftHSM2 token, through
Debian's boto3 and aws CLI (unmodified) and raw SigV4 calls (DeriveSharedSecret,
which botocore 1.29 does not know), every result checked with OpenSSL (the
`cryptography` module): CreateKey's specs and usages and DescribeKey's lists,
GetPublicKey, Sign and Verify (RSA PSS and PKCS #1 v1.5, ECDSA on each NIST
curve, RAW and DIGEST), RSAES-OAEP Encrypt and Decrypt, GenerateMac and
VerifyMac, DeriveSharedSecret against an ephemeral OpenSSL key,
GenerateDataKeyPair(WithoutPlaintext); the errors with their exact types,
statuses and messages; rotation refused, disabled keys, a policy allowing only
Verify, the asym and hmac rate-limit classes, and an audit log that names keys
but holds no message, signature, MAC, secret or private key. TAP output."""

import base64
import hashlib
import json
import os
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils  # noqa: E402

import harness as h  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

ARN_PREFIX = "arn:aws:kms:%s:%s:key/" % (h.REGION, h.ACCOUNT)
CONTEXT = {"tenant": "acme"}
HASHES = {"SHA_256": hashes.SHA256, "SHA_384": hashes.SHA384, "SHA_512": hashes.SHA512,
          "SHA_224": hashes.SHA224, "SHA_1": hashes.SHA1}
RSA_SIGNING = ["RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512",
               "RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384",
               "RSASSA_PKCS1_V1_5_SHA_512"]
CURVES = {"ECC_NIST_P256": (ec.SECP256R1, "ECDSA_SHA_256"),
          "ECC_NIST_P384": (ec.SECP384R1, "ECDSA_SHA_384"),
          "ECC_NIST_P521": (ec.SECP521R1, "ECDSA_SHA_512")}
HMACS = {"HMAC_224": "HMAC_SHA_224", "HMAC_256": "HMAC_SHA_256", "HMAC_384": "HMAC_SHA_384",
         "HMAC_512": "HMAC_SHA_512"}
ALGORITHM_LISTS = ("EncryptionAlgorithms", "SigningAlgorithms", "MacAlgorithms",
                   "KeyAgreementAlgorithms")


class Ctx:
    ws = None
    server = None
    audit_log = None
    user = None      # the admin; uses every key through the account's default policy
    verifier = None  # allowed only kms:Verify and kms:GetPublicKey on the policy key
    slow = None      # rate_asym.slow: one asymmetric call, then throttled
    kms = None
    keys = {}        # name -> KeyMetadata
    secrets = []     # bytes the audit log must never hold (messages, signatures, MACs, ...)


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.user = h.new_principal("asym")
    C.verifier = h.new_principal("verifier")
    C.slow = h.new_principal("slow")
    token = h.make_token(C.ws.sub("token"), "p11kms-it-asym")
    creds = h.write_credentials(C.ws.sub("credentials"), [C.user, C.verifier, C.slow])
    # An RSA-4096 key pair takes SoftHSM2 from under a second to well over 5 s (the prime
    # search), longer on a loaded machine: the server's default keygen_timeout_ms (60 s, not
    # request_timeout_ms's 5 s) covers it; test_rsa_key_generation_has_its_own_deadline shows it.
    config = h.write_config(C.ws.sub("p11kmsd.conf"), token, creds,
                            admin_principals=C.user.name,
                            **{"rate_asym.slow": "0.01", "burst_asym.slow": "1"})
    C.audit_log = config + ".audit.log"
    C.server = h.start_config_server(config, token, C.ws.sub("p11kmsd.log"))
    C.kms = h.kms_client(C.server.endpoint, C.user)


def teardown():
    h.finish(T, C.ws, C.server)


# ---- helpers --------------------------------------------------------------------


def b64(data):
    return base64.b64encode(data).decode()


def call(operation, params, who=None):
    """A raw signed call; bytes values are sent as base64."""
    body = {k: b64(v) if isinstance(v, bytes) else v for k, v in params.items()}
    return h.kms_call(C.server.endpoint, operation, body, who or C.user)


def ok(operation, params, who=None):
    r = call(operation, params, who)
    if r.status != 200:
        raise AssertionError("%s answered %d: %r" % (operation, r.status, r.body))
    return r.json()


def error(operation, params, error_type, status, message=None, who=None, contains=None):
    """The call fails with exactly this type and status (and message, when given)."""
    doc = h.check_error_response(call(operation, params, who), error_type, status)
    if message is not None:
        eq(doc["message"], message, "%s's message" % operation)
    if contains is not None:
        check(contains in doc["message"], "%s's message %r names %r"
              % (operation, doc["message"], contains))
    return doc["message"]


def boto_error(fn, code, status, **kw):
    got = h.client_error(fn, **kw)
    eq(got[:2], (code, status), "%s: error code and status (message %r)" % (fn.__name__, got[2]))
    return got[2]


def key(name):
    return C.keys[name]["KeyId"]


def arn(name):
    return C.keys[name]["Arn"]


def public_key(name):
    return serialization.load_der_public_key(C.kms.get_public_key(KeyId=key(name))["PublicKey"])


def hash_of(alg):
    """The hash an algorithm name ends in: RSASSA_PSS_SHA_384 -> SHA-384."""
    return HASHES[alg[alg.index("SHA_"):]]()


def rsa_padding(alg, hash_):
    if alg.startswith("RSASSA_PSS"):
        return padding.PSS(mgf=padding.MGF1(hash_), salt_length=hash_.digest_size)
    return padding.PKCS1v15()


def verify_locally(pub, alg, message, signature, digest=False):
    """OpenSSL's word on a signature made by the token."""
    hash_ = hash_of(alg)
    algorithm = utils.Prehashed(hash_) if digest else hash_
    if isinstance(pub, rsa.RSAPublicKey):
        pub.verify(signature, message, rsa_padding(alg, hash_), algorithm)
    else:
        pub.verify(signature, message, ec.ECDSA(algorithm))


def digest_of(alg, message):
    d = hashes.Hash(hash_of(alg))
    d.update(message)
    return d.finalize()


def cli(who, *args):
    env = {"AWS_ACCESS_KEY_ID": who.access_key, "AWS_SECRET_ACCESS_KEY": who.secret,
           "AWS_DEFAULT_REGION": h.REGION, "AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "standard",
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    status, out, err = h.aws(["kms", "--endpoint-url", C.server.endpoint, "--output", "json"]
                             + list(args), env)
    eq(status, 0, "aws kms %s (stderr %r)" % (args[0], err))
    return json.loads(out)


def cli_file(name, data):
    path = C.ws.sub(name)
    with open(path, "wb") as f:
        f.write(data)
    return "fileb://" + path


def create(name, spec, usage=None, **kw):
    """boto3's CreateKey; a KEY_AGREEMENT key's by a raw call, as botocore 1.29 drops the
    KeyAgreementAlgorithms it does not know from KeyMetadata."""
    params = {"KeySpec": spec, "Description": name}
    if usage:
        params["KeyUsage"] = usage
    params.update(kw)
    if usage == "KEY_AGREEMENT":
        C.keys[name] = ok("CreateKey", params)["KeyMetadata"]
    else:
        C.keys[name] = C.kms.create_key(**params)["KeyMetadata"]
    return C.keys[name]


# ---- keys -----------------------------------------------------------------------


@test
def test_create_keys_and_describe_them():
    create("sym", "SYMMETRIC_DEFAULT")
    C.kms.create_alias(AliasName="alias/asym-sym", TargetKeyId=key("sym"))
    create("rsa-sign", "RSA_2048", "SIGN_VERIFY")
    create("rsa-enc", "RSA_2048", "ENCRYPT_DECRYPT")
    create("rsa4096-enc", "RSA_4096", "ENCRYPT_DECRYPT")
    # CustomerMasterKeySpec is KeySpec's old name; KeyUsage defaults to ENCRYPT_DECRYPT
    C.keys["rsa3072-default"] = C.kms.create_key(CustomerMasterKeySpec="RSA_3072")["KeyMetadata"]
    for spec in CURVES:
        create(spec, spec, "SIGN_VERIFY")
    create("agree-256", "ECC_NIST_P256", "KEY_AGREEMENT")
    create("agree-384", "ECC_NIST_P384", "KEY_AGREEMENT")
    for spec in HMACS:
        create(spec, spec, "GENERATE_VERIFY_MAC")
    want = {
        "sym": ("SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", "EncryptionAlgorithms",
                ["SYMMETRIC_DEFAULT"]),
        "rsa-sign": ("RSA_2048", "SIGN_VERIFY", "SigningAlgorithms", RSA_SIGNING),
        "rsa-enc": ("RSA_2048", "ENCRYPT_DECRYPT", "EncryptionAlgorithms",
                    ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]),
        "rsa4096-enc": ("RSA_4096", "ENCRYPT_DECRYPT", "EncryptionAlgorithms",
                        ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]),
        "rsa3072-default": ("RSA_3072", "ENCRYPT_DECRYPT", "EncryptionAlgorithms",
                            ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"]),
        "agree-256": ("ECC_NIST_P256", "KEY_AGREEMENT", "KeyAgreementAlgorithms", ["ECDH"]),
        "agree-384": ("ECC_NIST_P384", "KEY_AGREEMENT", "KeyAgreementAlgorithms", ["ECDH"]),
    }
    for spec, (_, alg) in CURVES.items():
        want[spec] = (spec, "SIGN_VERIFY", "SigningAlgorithms", [alg])
    for spec, alg in HMACS.items():
        want[spec] = (spec, "GENERATE_VERIFY_MAC", "MacAlgorithms", [alg])
    for name, (spec, usage, member, algs) in want.items():
        described = [("DescribeKey", ok("DescribeKey", {"KeyId": key(name)})["KeyMetadata"])]
        if usage != "KEY_AGREEMENT":
            described.append(("boto3's DescribeKey",
                              C.kms.describe_key(KeyId=key(name))["KeyMetadata"]))
        for source, m in [("CreateKey", C.keys[name])] + described:
            what = "%s of %s" % (source, name)
            eq((m["KeySpec"], m["CustomerMasterKeySpec"], m["KeyUsage"]), (spec, spec, usage),
               what + ": KeySpec, CustomerMasterKeySpec, KeyUsage")
            eq(m[member], algs, what + ": " + member)
            eq(sorted(x for x in ALGORITHM_LISTS if x in m), [member],
               what + ": only the list that applies")
            eq((m["KeyState"], m["Enabled"], m["Origin"]), ("Enabled", True, "AWS_KMS"), what)
    # the same through the aws CLI
    m = cli(C.user, "describe-key", "--key-id", key("ECC_NIST_P384"))["KeyMetadata"]
    eq((m["KeySpec"], m["KeyUsage"], m["SigningAlgorithms"]),
       ("ECC_NIST_P384", "SIGN_VERIFY", ["ECDSA_SHA_384"]), "aws kms describe-key")
    m = cli(C.user, "create-key", "--key-spec", "HMAC_256", "--key-usage",
            "GENERATE_VERIFY_MAC")["KeyMetadata"]
    eq((m["KeySpec"], m["MacAlgorithms"]), ("HMAC_256", ["HMAC_SHA_256"]), "aws kms create-key")


@test
def test_create_key_refusals():
    cases = [
        ({"KeySpec": "ECC_NIST_P256"}, "ValidationException",
         "KeyUsage ENCRYPT_DECRYPT is not compatible with KeySpec ECC_NIST_P256: it takes "
         "SIGN_VERIFY or KEY_AGREEMENT (KeyUsage defaults to ENCRYPT_DECRYPT)"),
        ({"KeySpec": "HMAC_384"}, "ValidationException",
         "KeyUsage ENCRYPT_DECRYPT is not compatible with KeySpec HMAC_384: it takes "
         "GENERATE_VERIFY_MAC (KeyUsage defaults to ENCRYPT_DECRYPT)"),
        ({"KeySpec": "HMAC_256", "KeyUsage": "SIGN_VERIFY"}, "ValidationException",
         "KeyUsage SIGN_VERIFY is not compatible with KeySpec HMAC_256: it takes "
         "GENERATE_VERIFY_MAC"),
        ({"KeySpec": "RSA_2048", "KeyUsage": "KEY_AGREEMENT"}, "ValidationException",
         "KeyUsage KEY_AGREEMENT is not compatible with KeySpec RSA_2048: it takes "
         "ENCRYPT_DECRYPT or SIGN_VERIFY"),
        ({"KeyUsage": "SIGN_VERIFY"}, "ValidationException",
         "KeyUsage SIGN_VERIFY is not compatible with KeySpec SYMMETRIC_DEFAULT: it takes "
         "ENCRYPT_DECRYPT"),
        ({"KeySpec": "RSA_2048", "KeyUsage": "DECRYPT"}, "ValidationException",
         "1 validation error detected: Value 'DECRYPT' at 'keyUsage' failed to satisfy "
         "constraint: Member must satisfy enum value set: [SIGN_VERIFY, ENCRYPT_DECRYPT, "
         "GENERATE_VERIFY_MAC, KEY_AGREEMENT]"),
        ({"KeySpec": "RSA_1024", "KeyUsage": "SIGN_VERIFY"}, "ValidationException",
         "1 validation error detected: Value 'RSA_1024' at 'keySpec' failed to satisfy "
         "constraint: Member must satisfy enum value set: [RSA_2048, RSA_3072, RSA_4096, "
         "ECC_NIST_P256, ECC_NIST_P384, ECC_NIST_P521, ECC_SECG_P256K1, ECC_NIST_EDWARDS25519, "
         "X25519, SYMMETRIC_DEFAULT, HMAC_224, HMAC_256, HMAC_384, HMAC_512, SM2, ML_DSA_44, "
         "ML_DSA_65, ML_DSA_87]"),
        ({"KeySpec": "RSA_2048", "CustomerMasterKeySpec": "RSA_3072", "KeyUsage": "SIGN_VERIFY"},
         "ValidationException",
         "KeySpec RSA_2048 and CustomerMasterKeySpec RSA_3072 differ. CustomerMasterKeySpec is "
         "deprecated: specify KeySpec only."),
        ({"KeySpec": "ECC_SECG_P256K1", "KeyUsage": "SIGN_VERIFY"}, "UnsupportedOperationException",
         "KeySpec ECC_SECG_P256K1 is not supported by p11kms"),
        ({"KeySpec": "SM2", "KeyUsage": "SIGN_VERIFY"}, "UnsupportedOperationException",
         "KeySpec SM2 is not supported by p11kms"),
        ({"CustomerMasterKeySpec": "ML_DSA_65", "KeyUsage": "SIGN_VERIFY"},
         "UnsupportedOperationException", "KeySpec ML_DSA_65 is not supported by p11kms"),
    ]
    before = len(C.kms.list_keys(Limit=1000)["Keys"])
    for params, error_type, message in cases:
        error("CreateKey", params, error_type, 400, message)
    # X25519 needs CKM_EC_MONTGOMERY_KEY_PAIR_GEN, which SoftHSM2 2.6.1 lacks: the answer says so
    error("CreateKey", {"KeySpec": "X25519", "KeyUsage": "KEY_AGREEMENT"},
          "UnsupportedOperationException", 400, "The key store's token does not offer "
          "CKM_EC_MONTGOMERY_KEY_PAIR_GEN, which X25519 keys need")
    # SoftHSM2 2.6.1 makes Ed25519 keys but cannot wrap their private halves
    error("CreateKey", {"KeySpec": "ECC_NIST_EDWARDS25519", "KeyUsage": "SIGN_VERIFY"},
          "UnsupportedOperationException", 400, "The key store's token cannot wrap "
          "ECC_NIST_EDWARDS25519 private keys (C_WrapKey with CKM_AES_KEY_WRAP_PAD)")
    error("CreateKey", {"KeySpec": "ECC_NIST_EDWARDS25519", "KeyUsage": "KEY_AGREEMENT"},
          "ValidationException", 400, "KeyUsage KEY_AGREEMENT is not compatible with KeySpec "
          "ECC_NIST_EDWARDS25519: it takes SIGN_VERIFY")
    eq(len(C.kms.list_keys(Limit=1000)["Keys"]), before, "no key was made by a refused CreateKey")
    # both names, equal: as KeySpec alone
    m = ok("CreateKey", {"KeySpec": "HMAC_224", "CustomerMasterKeySpec": "HMAC_224",
                         "KeyUsage": "GENERATE_VERIFY_MAC"})["KeyMetadata"]
    eq((m["KeySpec"], m["KeyUsage"]), ("HMAC_224", "GENERATE_VERIFY_MAC"), "KeySpec given twice")


@test
def test_get_public_key():
    for name, (curve, alg) in CURVES.items():
        for got in (C.kms.get_public_key(KeyId=key(name)),
                    cli(C.user, "get-public-key", "--key-id", key(name))):
            pub = got["PublicKey"]
            if isinstance(pub, str):  # the CLI's JSON
                pub = base64.b64decode(pub)
            loaded = serialization.load_der_public_key(pub)
            check(isinstance(loaded, ec.EllipticCurvePublicKey), "%s: an EC key" % name)
            eq(loaded.curve.name, curve.name, "%s: the curve" % name)
            eq(loaded.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo), pub,
               "%s: DER SubjectPublicKeyInfo, as OpenSSL writes it" % name)
            eq({k: got[k] for k in got if k not in ("PublicKey", "ResponseMetadata")},
               {"KeyId": arn(name), "KeySpec": name, "CustomerMasterKeySpec": name,
                "KeyUsage": "SIGN_VERIFY", "SigningAlgorithms": [alg]},
               "%s: GetPublicKey's members" % name)
    got = C.kms.get_public_key(KeyId=key("rsa4096-enc"))
    pub = serialization.load_der_public_key(got["PublicKey"])
    eq((pub.key_size, pub.public_numbers().e), (4096, 65537), "RSA_4096's public key")
    eq(got["EncryptionAlgorithms"], ["RSAES_OAEP_SHA_1", "RSAES_OAEP_SHA_256"],
       "RSA ENCRYPT_DECRYPT's EncryptionAlgorithms")
    check("SigningAlgorithms" not in got, "no SigningAlgorithms for an ENCRYPT_DECRYPT key")
    got = ok("GetPublicKey", {"KeyId": key("agree-384")})
    eq((got["KeyUsage"], got["KeyAgreementAlgorithms"]), ("KEY_AGREEMENT", ["ECDH"]),
       "KEY_AGREEMENT key's GetPublicKey")
    # by alias too
    C.kms.create_alias(AliasName="alias/asym-signer", TargetKeyId=key("rsa-sign"))
    eq(C.kms.get_public_key(KeyId="alias/asym-signer")["KeyId"], arn("rsa-sign"), "by alias")
    for name, spec in (("sym", "SYMMETRIC_DEFAULT"), ("HMAC_256", "HMAC_256")):
        error("GetPublicKey", {"KeyId": key(name)}, "UnsupportedOperationException", 400,
              "%s has no public key: its KeySpec is %s. GetPublicKey takes an asymmetric KMS "
              "key." % (arn(name), spec))


# ---- signatures -----------------------------------------------------------------


@test
def test_rsa_signatures_verify_with_openssl():
    pub = public_key("rsa-sign")
    message = b"rsa message " + os.urandom(16)
    C.secrets.append(message)
    for alg in RSA_SIGNING:
        for digest in (False, True):
            body = digest_of(alg, message) if digest else message
            got = C.kms.sign(KeyId=key("rsa-sign"), Message=body, SigningAlgorithm=alg,
                             MessageType="DIGEST" if digest else "RAW")
            eq((got["KeyId"], got["SigningAlgorithm"]), (arn("rsa-sign"), alg), alg)
            eq(len(got["Signature"]), 256, "%s: a 2048-bit signature" % alg)
            C.secrets.append(got["Signature"])
            verify_locally(pub, alg, message, got["Signature"])
            # a DIGEST and a RAW signature verify either way
            verify_locally(pub, alg, digest_of(alg, message), got["Signature"], digest=True)
            v = C.kms.verify(KeyId=key("rsa-sign"), Message=body, Signature=got["Signature"],
                             SigningAlgorithm=alg, MessageType="DIGEST" if digest else "RAW")
            eq((v["SignatureValid"], v["KeyId"], v["SigningAlgorithm"]),
               (True, arn("rsa-sign"), alg), "Verify of %s" % alg)
            bad = bytearray(got["Signature"])
            bad[-1] ^= 1
            boto_error(C.kms.verify, "KMSInvalidSignatureException", 400, KeyId=key("rsa-sign"),
                       Message=body, Signature=bytes(bad), SigningAlgorithm=alg,
                       MessageType="DIGEST" if digest else "RAW")
            try:
                verify_locally(pub, alg, message, bytes(bad))
                raise AssertionError("OpenSSL verified a changed signature")
            except InvalidSignature:
                pass
    # PSS is randomized, PKCS #1 v1.5 is not
    sigs = [C.kms.sign(KeyId=key("rsa-sign"), Message=message, SigningAlgorithm=a)["Signature"]
            for a in ("RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_256", "RSASSA_PKCS1_V1_5_SHA_256",
                      "RSASSA_PKCS1_V1_5_SHA_256")]
    check(sigs[0] != sigs[1], "two PSS signatures differ")
    eq(sigs[2], sigs[3], "two PKCS #1 v1.5 signatures of one message")


@test
def test_ecdsa_signatures_verify_with_openssl():
    message = b"ec message " + os.urandom(16)
    C.secrets.append(message)
    for name, (curve, alg) in CURVES.items():
        pub = public_key(name)
        for digest in (False, True):
            body = digest_of(alg, message) if digest else message
            got = C.kms.sign(KeyId=key(name), Message=body, SigningAlgorithm=alg,
                             MessageType="DIGEST" if digest else "RAW")
            eq((got["KeyId"], got["SigningAlgorithm"]), (arn(name), alg), name)
            r, s = utils.decode_dss_signature(got["Signature"])  # DER ECDSA-Sig-Value
            check(0 < r and 0 < s, "%s: a DER signature" % name)
            C.secrets.append(got["Signature"])
            verify_locally(pub, alg, message, got["Signature"])
            v = C.kms.verify(KeyId=key(name), Message=body, Signature=got["Signature"],
                             SigningAlgorithm=alg, MessageType="DIGEST" if digest else "RAW")
            eq(v["SignatureValid"], True, "%s: Verify" % name)
        # a signature by OpenSSL with another key of the curve is not the key's
        other = ec.generate_private_key(curve())
        forged = other.sign(message, ec.ECDSA(hash_of(alg)))
        boto_error(C.kms.verify, "KMSInvalidSignatureException", 400, KeyId=key(name),
                   Message=message, Signature=forged, SigningAlgorithm=alg)
        # and a signature of another message neither
        boto_error(C.kms.verify, "KMSInvalidSignatureException", 400, KeyId=key(name),
                   Message=message + b"!", Signature=got["Signature"], SigningAlgorithm=alg)


@test
def test_sign_and_verify_through_the_cli():
    message = cli_file("cli-message", b"signed by the aws CLI")
    got = cli(C.user, "sign", "--key-id", key("ECC_NIST_P256"), "--message", message,
              "--message-type", "RAW", "--signing-algorithm", "ECDSA_SHA_256")
    eq((got["KeyId"], got["SigningAlgorithm"]), (arn("ECC_NIST_P256"), "ECDSA_SHA_256"), "sign")
    signature = base64.b64decode(got["Signature"])
    verify_locally(public_key("ECC_NIST_P256"), "ECDSA_SHA_256", b"signed by the aws CLI",
                   signature)
    got = cli(C.user, "verify", "--key-id", key("ECC_NIST_P256"), "--message", message,
              "--signature", cli_file("cli-signature", signature), "--signing-algorithm",
              "ECDSA_SHA_256")
    eq(got["SignatureValid"], True, "aws kms verify")


@test
def test_sign_refusals():
    msg = b"x" * 32
    p256 = key("ECC_NIST_P256")
    cases = [
        # DIGEST of the wrong length
        ("Sign", {"KeyId": p256, "Message": b"x" * 31, "MessageType": "DIGEST",
                  "SigningAlgorithm": "ECDSA_SHA_256"}, "ValidationException",
         "Digest is invalid length for algorithm ECDSA_SHA_256: it must be 32 bytes, not 31."),
        ("Verify", {"KeyId": key("rsa-sign"), "Message": msg, "MessageType": "DIGEST",
                    "SigningAlgorithm": "RSASSA_PSS_SHA_512", "Signature": b"s" * 256},
         "ValidationException",
         "Digest is invalid length for algorithm RSASSA_PSS_SHA_512: it must be 64 bytes, not "
         "32."),
        # a message over 4096 bytes
        ("Sign", {"KeyId": p256, "Message": b"m" * 4097, "SigningAlgorithm": "ECDSA_SHA_256"},
         "ValidationException",
         "1 validation error detected: Value at 'message' failed to satisfy constraint: Member "
         "must have length less than or equal to 4096"),
        ("Sign", {"KeyId": p256, "Message": b"", "SigningAlgorithm": "ECDSA_SHA_256"},
         "ValidationException",
         "1 validation error detected: Value at 'message' failed to satisfy constraint: Member "
         "must have length greater than or equal to 1"),
        ("Sign", {"KeyId": p256, "Message": msg}, "ValidationException",
         "1 validation error detected: Value null at 'signingAlgorithm' failed to satisfy "
         "constraint: Member must not be null"),
        ("Sign", {"KeyId": p256, "Message": msg, "SigningAlgorithm": "ECDSA_SHA_1"},
         "ValidationException",
         "1 validation error detected: Value 'ECDSA_SHA_1' at 'signingAlgorithm' failed to "
         "satisfy constraint: Member must satisfy enum value set: [RSASSA_PSS_SHA_256, "
         "RSASSA_PSS_SHA_384, RSASSA_PSS_SHA_512, RSASSA_PKCS1_V1_5_SHA_256, "
         "RSASSA_PKCS1_V1_5_SHA_384, RSASSA_PKCS1_V1_5_SHA_512, ECDSA_SHA_256, ECDSA_SHA_384, "
         "ECDSA_SHA_512, ED25519_SHA_512]"),
        ("Sign", {"KeyId": p256, "Message": msg, "MessageType": "PREHASHED",
                  "SigningAlgorithm": "ECDSA_SHA_256"}, "ValidationException",
         "1 validation error detected: Value 'PREHASHED' at 'messageType' failed to satisfy "
         "constraint: Member must satisfy enum value set: [RAW, DIGEST, EXTERNAL_MU]"),
        ("Sign", {"KeyId": p256, "Message": msg, "MessageType": "EXTERNAL_MU",
                  "SigningAlgorithm": "ECDSA_SHA_256"}, "UnsupportedOperationException",
         "MessageType EXTERNAL_MU is for ML-DSA keys, which p11kms does not have"),
        ("Sign", {"KeyId": p256, "Message": msg, "SigningAlgorithm": "SM2DSA"},
         "UnsupportedOperationException", "SigningAlgorithm SM2DSA is not supported by p11kms"),
        # an algorithm the key does not take
        ("Sign", {"KeyId": p256, "Message": msg, "SigningAlgorithm": "ECDSA_SHA_384"},
         "InvalidKeyUsageException",
         "Algorithm ECDSA_SHA_384 is incompatible with key spec ECC_NIST_P256 and key usage "
         "SIGN_VERIFY of %s." % arn("ECC_NIST_P256")),
        ("Sign", {"KeyId": key("rsa-sign"), "Message": msg, "SigningAlgorithm": "ECDSA_SHA_256"},
         "InvalidKeyUsageException",
         "Algorithm ECDSA_SHA_256 is incompatible with key spec RSA_2048 and key usage "
         "SIGN_VERIFY of %s." % arn("rsa-sign")),
        ("Verify", {"KeyId": p256, "Message": msg, "Signature": b"s" * 64,
                    "SigningAlgorithm": "RSASSA_PSS_SHA_256"}, "InvalidKeyUsageException",
         "Algorithm RSASSA_PSS_SHA_256 is incompatible with key spec ECC_NIST_P256 and key "
         "usage SIGN_VERIFY of %s." % arn("ECC_NIST_P256")),
        # keys of another usage
        ("Sign", {"KeyId": key("rsa-enc"), "Message": msg,
                  "SigningAlgorithm": "RSASSA_PSS_SHA_256"}, "InvalidKeyUsageException",
         "%s key usage is ENCRYPT_DECRYPT which is not valid for Sign." % arn("rsa-enc")),
        ("Sign", {"KeyId": key("sym"), "Message": msg, "SigningAlgorithm": "ECDSA_SHA_256"},
         "InvalidKeyUsageException",
         "%s key usage is ENCRYPT_DECRYPT which is not valid for Sign." % arn("sym")),
        ("Verify", {"KeyId": key("agree-256"), "Message": msg, "Signature": b"s" * 64,
                    "SigningAlgorithm": "ECDSA_SHA_256"}, "InvalidKeyUsageException",
         "%s key usage is KEY_AGREEMENT which is not valid for Verify." % arn("agree-256")),
        ("Sign", {"KeyId": key("HMAC_256"), "Message": msg, "SigningAlgorithm": "ECDSA_SHA_256"},
         "InvalidKeyUsageException",
         "%s key usage is GENERATE_VERIFY_MAC which is not valid for Sign." % arn("HMAC_256")),
        ("Sign", {"KeyId": "alias/none-such", "Message": msg,
                  "SigningAlgorithm": "ECDSA_SHA_256"}, "NotFoundException", None),
    ]
    for operation, params, error_type, message in cases:
        error(operation, params, error_type, 404 if error_type == "NotFoundException" else 400,
              message)


# ---- RSAES-OAEP -------------------------------------------------------------------


@test
def test_openssl_oaep_ciphertexts_decrypt():
    for name, bits in (("rsa-enc", 2048), ("rsa4096-enc", 4096)):
        pub = public_key(name)
        for alg, hash_ in (("RSAES_OAEP_SHA_256", hashes.SHA256), ("RSAES_OAEP_SHA_1", hashes.SHA1)):
            limit = bits // 8 - 2 * hash_.digest_size - 2
            for plaintext in (b"p", os.urandom(limit)):
                if len(plaintext) > 16:
                    C.secrets.append(plaintext)
                ct = pub.encrypt(plaintext, padding.OAEP(mgf=padding.MGF1(hash_()),
                                                         algorithm=hash_(), label=None))
                got = C.kms.decrypt(KeyId=key(name), CiphertextBlob=ct, EncryptionAlgorithm=alg)
                eq((got["Plaintext"], got["KeyId"], got["EncryptionAlgorithm"]),
                   (plaintext, arn(name), alg), "%s %s of %d bytes" % (name, alg, len(plaintext)))
            # and the other way: KMS encrypts with the public key, OpenSSL cannot decrypt
            # (no private key) but KMS can
            got = C.kms.encrypt(KeyId=key(name), Plaintext=b"q" * limit, EncryptionAlgorithm=alg)
            eq((len(got["CiphertextBlob"]), got["EncryptionAlgorithm"], got["KeyId"]),
               (bits // 8, alg, arn(name)), "Encrypt's answer")
            eq(C.kms.decrypt(KeyId=key(name), CiphertextBlob=got["CiphertextBlob"],
                             EncryptionAlgorithm=alg)["Plaintext"], b"q" * limit, "round trip")
            error("Encrypt", {"KeyId": key(name), "Plaintext": b"q" * (limit + 1),
                              "EncryptionAlgorithm": alg}, "ValidationException", 400,
                  "Plaintext of %d bytes is too long for %s with a RSA_%d key: at most %d bytes"
                  % (limit + 1, alg, bits, limit))
    # the aws CLI
    ct = public_key("rsa-enc").encrypt(b"from the CLI", padding.OAEP(
        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    got = cli(C.user, "decrypt", "--key-id", key("rsa-enc"), "--ciphertext-blob",
              cli_file("cli-oaep", ct), "--encryption-algorithm", "RSAES_OAEP_SHA_256")
    eq(base64.b64decode(got["Plaintext"]), b"from the CLI", "aws kms decrypt")


@test
def test_oaep_refusals():
    pub = public_key("rsa-enc")
    ct = pub.encrypt(b"secret", padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                             algorithm=hashes.SHA256(), label=None))
    rsa_enc, sym = key("rsa-enc"), key("sym")
    cases = [
        ("Decrypt", {"CiphertextBlob": ct, "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"},
         "ValidationException",
         "KeyId is required with EncryptionAlgorithm RSAES_OAEP_SHA_256: an asymmetric "
         "ciphertext does not name its KMS key"),
        ("Decrypt", {"KeyId": sym, "CiphertextBlob": ct,
                     "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"}, "InvalidKeyUsageException",
         "Algorithm RSAES_OAEP_SHA_256 is incompatible with key spec SYMMETRIC_DEFAULT and key "
         "usage ENCRYPT_DECRYPT of %s." % arn("sym")),
        ("Encrypt", {"KeyId": sym, "Plaintext": b"x", "EncryptionAlgorithm": "RSAES_OAEP_SHA_1"},
         "InvalidKeyUsageException",
         "Algorithm RSAES_OAEP_SHA_1 is incompatible with key spec SYMMETRIC_DEFAULT and key "
         "usage ENCRYPT_DECRYPT of %s." % arn("sym")),
        ("Encrypt", {"KeyId": rsa_enc, "Plaintext": b"x"}, "InvalidKeyUsageException",
         "Algorithm SYMMETRIC_DEFAULT is incompatible with key spec RSA_2048 and key usage "
         "ENCRYPT_DECRYPT of %s." % arn("rsa-enc")),
        ("Encrypt", {"KeyId": key("rsa-sign"), "Plaintext": b"x",
                     "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"}, "InvalidKeyUsageException",
         "%s key usage is SIGN_VERIFY which is not valid for Encrypt." % arn("rsa-sign")),
        ("Encrypt", {"KeyId": key("HMAC_512"), "Plaintext": b"x"}, "InvalidKeyUsageException",
         "%s key usage is GENERATE_VERIFY_MAC which is not valid for Encrypt." % arn("HMAC_512")),
        ("Encrypt", {"KeyId": rsa_enc, "Plaintext": b"x", "EncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                     "EncryptionContext": CONTEXT}, "ValidationException",
         "EncryptionContext is not valid with an asymmetric KMS key (%s has KeySpec RSA_2048): an "
         "encryption context is supported only with symmetric encryption KMS keys"
         % arn("rsa-enc")),
        ("Decrypt", {"KeyId": rsa_enc, "CiphertextBlob": ct, "EncryptionAlgorithm":
                     "RSAES_OAEP_SHA_256", "EncryptionContext": CONTEXT}, "ValidationException",
         "EncryptionContext is not valid with an asymmetric KMS key (%s has KeySpec RSA_2048): an "
         "encryption context is supported only with symmetric encryption KMS keys"
         % arn("rsa-enc")),
        ("Encrypt", {"KeyId": rsa_enc, "Plaintext": b"x", "EncryptionAlgorithm": "RSAES_OAEP_SHA_384"},
         "ValidationException",
         "1 validation error detected: Value 'RSAES_OAEP_SHA_384' at 'encryptionAlgorithm' failed "
         "to satisfy constraint: Member must satisfy enum value set: [SYMMETRIC_DEFAULT, "
         "RSAES_OAEP_SHA_1, RSAES_OAEP_SHA_256]"),
        # a ciphertext that is not the modulus' length, one made with another hash
        ("Decrypt", {"KeyId": rsa_enc, "CiphertextBlob": ct[:-1],
                     "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"}, "InvalidCiphertextException",
         None),
        ("Decrypt", {"KeyId": rsa_enc, "CiphertextBlob": ct,
                     "EncryptionAlgorithm": "RSAES_OAEP_SHA_1"}, "InvalidCiphertextException", None),
    ]
    for operation, params, error_type, message in cases:
        error(operation, params, error_type, 400, message)
    # the ciphertext still opens: nothing above spent it
    eq(C.kms.decrypt(KeyId=rsa_enc, CiphertextBlob=ct,
                     EncryptionAlgorithm="RSAES_OAEP_SHA_256")["Plaintext"], b"secret", "after all")


@test
def test_re_encrypt_with_rsa_keys():
    secret = os.urandom(100)
    C.secrets.append(secret)
    oaep256 = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                           label=None)
    ct = public_key("rsa-enc").encrypt(secret, oaep256)
    # RSA -> symmetric, with a context on the destination
    got = C.kms.re_encrypt(CiphertextBlob=ct, SourceKeyId=key("rsa-enc"),
                           SourceEncryptionAlgorithm="RSAES_OAEP_SHA_256",
                           DestinationKeyId="alias/asym-sym", DestinationEncryptionContext=CONTEXT)
    eq({k: v for k, v in got.items() if k not in ("CiphertextBlob", "ResponseMetadata")},
       {"SourceKeyId": arn("rsa-enc"), "KeyId": arn("sym"),
        "SourceEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
        "DestinationEncryptionAlgorithm": "SYMMETRIC_DEFAULT"}, "RSA to symmetric")
    eq(C.kms.decrypt(CiphertextBlob=got["CiphertextBlob"], EncryptionContext=CONTEXT)["Plaintext"],
       secret, "the blob holds the RSA ciphertext's plaintext")
    # symmetric -> RSA: OpenSSL has no private key, so Decrypt checks it
    blob = got["CiphertextBlob"]
    got = C.kms.re_encrypt(CiphertextBlob=blob, SourceEncryptionContext=CONTEXT,
                           DestinationKeyId=key("rsa4096-enc"),
                           DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_1")
    eq((got["SourceKeyId"], got["KeyId"], got["SourceEncryptionAlgorithm"],
        got["DestinationEncryptionAlgorithm"], len(got["CiphertextBlob"])),
       (arn("sym"), arn("rsa4096-enc"), "SYMMETRIC_DEFAULT", "RSAES_OAEP_SHA_1", 512),
       "symmetric to RSA")
    eq(C.kms.decrypt(KeyId=key("rsa4096-enc"), CiphertextBlob=got["CiphertextBlob"],
                     EncryptionAlgorithm="RSAES_OAEP_SHA_1")["Plaintext"], secret, "RSA_4096")
    # RSA -> RSA
    got = C.kms.re_encrypt(CiphertextBlob=got["CiphertextBlob"], SourceKeyId=key("rsa4096-enc"),
                           SourceEncryptionAlgorithm="RSAES_OAEP_SHA_1",
                           DestinationKeyId=key("rsa-enc"),
                           DestinationEncryptionAlgorithm="RSAES_OAEP_SHA_256")
    eq(C.kms.decrypt(KeyId=key("rsa-enc"), CiphertextBlob=got["CiphertextBlob"],
                     EncryptionAlgorithm="RSAES_OAEP_SHA_256")["Plaintext"], secret, "RSA to RSA")
    # the refusals
    sym_blob = C.kms.encrypt(KeyId=key("sym"), Plaintext=b"r" * 191)["CiphertextBlob"]
    cases = [
        ({"CiphertextBlob": ct, "SourceEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
          "DestinationKeyId": key("sym")}, "ValidationException",
         "SourceKeyId is required with SourceEncryptionAlgorithm RSAES_OAEP_SHA_256: an "
         "asymmetric ciphertext does not name its KMS key"),
        ({"CiphertextBlob": ct, "SourceKeyId": key("rsa-enc"), "SourceEncryptionAlgorithm":
          "RSAES_OAEP_SHA_256", "SourceEncryptionContext": CONTEXT, "DestinationKeyId": key("sym")},
         "ValidationException",
         "SourceEncryptionContext is not valid with an asymmetric KMS key (%s has KeySpec "
         "RSA_2048): an encryption context is supported only with symmetric encryption KMS keys"
         % arn("rsa-enc")),
        ({"CiphertextBlob": ct, "SourceKeyId": key("sym"), "SourceEncryptionAlgorithm":
          "RSAES_OAEP_SHA_256", "DestinationKeyId": key("sym")}, "InvalidKeyUsageException",
         "Algorithm RSAES_OAEP_SHA_256 is incompatible with key spec SYMMETRIC_DEFAULT and key "
         "usage ENCRYPT_DECRYPT of %s." % arn("sym")),
        ({"CiphertextBlob": sym_blob, "DestinationKeyId": key("rsa-enc")},
         "InvalidKeyUsageException",
         "Algorithm SYMMETRIC_DEFAULT is incompatible with key spec RSA_2048 and key usage "
         "ENCRYPT_DECRYPT of %s." % arn("rsa-enc")),
        ({"CiphertextBlob": sym_blob, "DestinationKeyId": key("rsa-enc"),
          "DestinationEncryptionAlgorithm": "RSAES_OAEP_SHA_256"}, "ValidationException",
         "Plaintext of 191 bytes is too long for RSAES_OAEP_SHA_256 with a RSA_2048 key: at most "
         "190 bytes"),
        ({"CiphertextBlob": sym_blob, "DestinationKeyId": key("rsa-enc"),
          "DestinationEncryptionAlgorithm": "RSAES_OAEP_SHA_1",
          "DestinationEncryptionContext": CONTEXT}, "ValidationException",
         "DestinationEncryptionContext is not valid with an asymmetric KMS key (%s has KeySpec "
         "RSA_2048): an encryption context is supported only with symmetric encryption KMS keys"
         % arn("rsa-enc")),
        ({"CiphertextBlob": sym_blob, "DestinationKeyId": key("HMAC_256")},
         "InvalidKeyUsageException",
         "%s key usage is GENERATE_VERIFY_MAC which is not valid for ReEncrypt." % arn("HMAC_256")),
        ({"CiphertextBlob": ct, "SourceKeyId": key("rsa-sign"), "SourceEncryptionAlgorithm":
          "RSAES_OAEP_SHA_256", "DestinationKeyId": key("sym")}, "InvalidKeyUsageException",
         "%s key usage is SIGN_VERIFY which is not valid for ReEncrypt." % arn("rsa-sign")),
        ({"CiphertextBlob": ct[:-1], "SourceKeyId": key("rsa-enc"), "SourceEncryptionAlgorithm":
          "RSAES_OAEP_SHA_256", "DestinationKeyId": key("sym")}, "InvalidCiphertextException",
         None),
    ]
    for params, error_type, message in cases:
        error("ReEncrypt", params, error_type, 400, message)


# ---- MACs -------------------------------------------------------------------------


@test
def test_generate_and_verify_mac():
    message = b"authenticated header: value"
    C.secrets.append(message)
    for spec, alg in HMACS.items():
        got = C.kms.generate_mac(KeyId=key(spec), Message=message, MacAlgorithm=alg)
        size = {"HMAC_224": 28, "HMAC_256": 32, "HMAC_384": 48, "HMAC_512": 64}[spec]
        eq((got["KeyId"], got["MacAlgorithm"], len(got["Mac"])), (arn(spec), alg, size), spec)
        C.secrets.append(got["Mac"])
        again = C.kms.generate_mac(KeyId=key(spec), Message=message, MacAlgorithm=alg)["Mac"]
        eq(again, got["Mac"], "%s: HMAC is deterministic" % spec)
        other = C.kms.generate_mac(KeyId=key(spec), Message=message + b".", MacAlgorithm=alg)
        check(other["Mac"] != got["Mac"], "%s: another message, another MAC" % spec)
        v = C.kms.verify_mac(KeyId=key(spec), Message=message, Mac=got["Mac"], MacAlgorithm=alg)
        eq((v["MacValid"], v["KeyId"], v["MacAlgorithm"]), (True, arn(spec), alg), "VerifyMac")
        for bit in (0, 7, size * 8 - 1):
            bad = bytearray(got["Mac"])
            bad[bit // 8] ^= 1 << (bit % 8)
            boto_error(C.kms.verify_mac, "KMSInvalidMacException", 400, KeyId=key(spec),
                       Message=message, Mac=bytes(bad), MacAlgorithm=alg)
        boto_error(C.kms.verify_mac, "KMSInvalidMacException", 400, KeyId=key(spec),
                   Message=message, Mac=got["Mac"][:-1], MacAlgorithm=alg)
        boto_error(C.kms.verify_mac, "KMSInvalidMacException", 400, KeyId=key(spec),
                   Message=message + b"!", Mac=got["Mac"], MacAlgorithm=alg)
    # two HMAC_256 keys, two MACs
    a = C.kms.generate_mac(KeyId=key("HMAC_256"), Message=message, MacAlgorithm="HMAC_SHA_256")
    other = C.kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC")["KeyMetadata"]
    b = C.kms.generate_mac(KeyId=other["KeyId"], Message=message, MacAlgorithm="HMAC_SHA_256")
    check(a["Mac"] != b["Mac"], "each key its own secret")
    error("VerifyMac", {"KeyId": key("HMAC_256"), "Message": message, "Mac": b["Mac"],
                        "MacAlgorithm": "HMAC_SHA_256"}, "KMSInvalidMacException", 400,
          "The MAC is not valid for this message, KMS key and MAC algorithm")
    # the aws CLI
    got = cli(C.user, "generate-mac", "--key-id", key("HMAC_384"), "--message",
              cli_file("cli-mac-message", message), "--mac-algorithm", "HMAC_SHA_384")
    mac = base64.b64decode(got["Mac"])
    eq(mac, C.kms.generate_mac(KeyId=key("HMAC_384"), Message=message,
                               MacAlgorithm="HMAC_SHA_384")["Mac"], "aws kms generate-mac")
    got = cli(C.user, "verify-mac", "--key-id", key("HMAC_384"), "--message",
              cli_file("cli-mac-message", message), "--mac-algorithm", "HMAC_SHA_384", "--mac",
              cli_file("cli-mac", mac))
    eq(got["MacValid"], True, "aws kms verify-mac")


@test
def test_mac_refusals():
    msg = b"m"
    cases = [
        ("GenerateMac", {"KeyId": key("HMAC_256"), "Message": msg, "MacAlgorithm": "HMAC_SHA_384"},
         "InvalidKeyUsageException",
         "Algorithm HMAC_SHA_384 is incompatible with key spec HMAC_256 and key usage "
         "GENERATE_VERIFY_MAC of %s." % arn("HMAC_256")),
        ("GenerateMac", {"KeyId": key("sym"), "Message": msg, "MacAlgorithm": "HMAC_SHA_256"},
         "InvalidKeyUsageException",
         "%s key usage is ENCRYPT_DECRYPT which is not valid for GenerateMac." % arn("sym")),
        ("VerifyMac", {"KeyId": key("rsa-sign"), "Message": msg, "Mac": b"x" * 32,
                       "MacAlgorithm": "HMAC_SHA_256"}, "InvalidKeyUsageException",
         "%s key usage is SIGN_VERIFY which is not valid for VerifyMac." % arn("rsa-sign")),
        ("GenerateMac", {"KeyId": key("HMAC_256"), "Message": b"m" * 4097,
                         "MacAlgorithm": "HMAC_SHA_256"}, "ValidationException",
         "1 validation error detected: Value at 'message' failed to satisfy constraint: Member "
         "must have length less than or equal to 4096"),
        ("GenerateMac", {"KeyId": key("HMAC_256"), "Message": msg, "MacAlgorithm": "HMAC_MD5"},
         "ValidationException",
         "1 validation error detected: Value 'HMAC_MD5' at 'macAlgorithm' failed to satisfy "
         "constraint: Member must satisfy enum value set: [HMAC_SHA_224, HMAC_SHA_256, "
         "HMAC_SHA_384, HMAC_SHA_512]"),
        ("VerifyMac", {"KeyId": key("HMAC_256"), "Message": msg, "MacAlgorithm": "HMAC_SHA_256"},
         "ValidationException",
         "1 validation error detected: Value null at 'mac' failed to satisfy constraint: Member "
         "must not be null"),
        ("GenerateDataKey", {"KeyId": key("HMAC_256"), "NumberOfBytes": 32},
         "InvalidKeyUsageException",
         "%s key usage is GENERATE_VERIFY_MAC which is not valid for GenerateDataKey."
         % arn("HMAC_256")),
        ("GenerateDataKey", {"KeyId": key("rsa-enc"), "KeySpec": "AES_256"},
         "InvalidKeyUsageException",
         "%s key spec is RSA_2048 which is not valid for GenerateDataKey: it takes a symmetric "
         "encryption key (SYMMETRIC_DEFAULT)." % arn("rsa-enc")),
        ("GenerateDataKeyWithoutPlaintext", {"KeyId": key("ECC_NIST_P256"), "KeySpec": "AES_256"},
         "InvalidKeyUsageException",
         "%s key usage is SIGN_VERIFY which is not valid for GenerateDataKeyWithoutPlaintext."
         % arn("ECC_NIST_P256")),
    ]
    for operation, params, error_type, message in cases:
        error(operation, params, error_type, 400, message)


# ---- key agreement ------------------------------------------------------------------


def spki(public):
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


@test
def test_derive_shared_secret_equals_openssl_ecdh():
    for name, curve in (("agree-256", ec.SECP256R1), ("agree-384", ec.SECP384R1)):
        mine = ec.generate_private_key(curve())
        got = ok("DeriveSharedSecret", {"KeyId": key(name), "KeyAgreementAlgorithm": "ECDH",
                                        "PublicKey": spki(mine.public_key())})
        secret = base64.b64decode(got["SharedSecret"])
        expected = mine.exchange(ec.ECDH(), public_key(name))
        eq(secret, expected, "%s: the shared secret is OpenSSL's ECDH" % name)
        eq(len(secret), curve.key_size // 8 + (1 if curve.key_size % 8 else 0), "its length")
        eq({k: v for k, v in got.items() if k != "SharedSecret"},
           {"KeyId": arn(name), "KeyAgreementAlgorithm": "ECDH", "KeyOrigin": "AWS_KMS"},
           "%s: DeriveSharedSecret's members" % name)
        C.secrets.append(secret)
        # another ephemeral key, another secret
        again = ok("DeriveSharedSecret", {"KeyId": key(name), "KeyAgreementAlgorithm": "ECDH",
                                          "PublicKey": spki(ec.generate_private_key(curve())
                                                            .public_key())})
        check(base64.b64decode(again["SharedSecret"]) != secret, "another peer, another secret")


@test
def test_derive_shared_secret_refusals():
    p384_peer = spki(ec.generate_private_key(ec.SECP384R1()).public_key())
    p256_peer = spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    rsa_peer = spki(rsa.generate_private_key(65537, 2048).public_key())
    agree = key("agree-256")
    cases = [
        # a peer on another curve, not an EC key, not a key
        ({"KeyId": agree, "KeyAgreementAlgorithm": "ECDH", "PublicKey": p384_peer},
         "ValidationException",
         "The peer's public key is on secp384r1, the key's curve is prime256v1"),
        ({"KeyId": agree, "KeyAgreementAlgorithm": "ECDH", "PublicKey": rsa_peer},
         "ValidationException",
         "The peer's public key is RSA, not an EC key; the key's curve is prime256v1"),
        ({"KeyId": agree, "KeyAgreementAlgorithm": "ECDH", "PublicKey": b"\x30\x03\x02\x01\x01"},
         "ValidationException", "The peer's public key is not a DER SubjectPublicKeyInfo"),
        ({"KeyId": agree, "KeyAgreementAlgorithm": "ECDH", "PublicKey": p256_peer + b"\x00"},
         "ValidationException", "The peer's public key is not a DER SubjectPublicKeyInfo"),
        ({"KeyId": agree, "PublicKey": p256_peer}, "ValidationException",
         "1 validation error detected: Value null at 'keyAgreementAlgorithm' failed to satisfy "
         "constraint: Member must not be null"),
        ({"KeyId": agree, "KeyAgreementAlgorithm": "ECDHE", "PublicKey": p256_peer},
         "ValidationException",
         "1 validation error detected: Value 'ECDHE' at 'keyAgreementAlgorithm' failed to "
         "satisfy constraint: Member must satisfy enum value set: [ECDH]"),
        ({"KeyId": agree, "KeyAgreementAlgorithm": "ECDH"}, "ValidationException",
         "1 validation error detected: Value null at 'publicKey' failed to satisfy constraint: "
         "Member must not be null"),
        ({"KeyId": key("ECC_NIST_P256"), "KeyAgreementAlgorithm": "ECDH", "PublicKey": p256_peer},
         "InvalidKeyUsageException",
         "%s key usage is SIGN_VERIFY which is not valid for DeriveSharedSecret."
         % arn("ECC_NIST_P256")),
        ({"KeyId": key("sym"), "KeyAgreementAlgorithm": "ECDH", "PublicKey": p256_peer},
         "InvalidKeyUsageException",
         "%s key usage is ENCRYPT_DECRYPT which is not valid for DeriveSharedSecret."
         % arn("sym")),
        ({"KeyId": agree, "KeyAgreementAlgorithm": "ECDH", "PublicKey": p256_peer,
          "Recipient": {"AttestationDocument": "AAAA"}}, "UnsupportedOperationException",
         "Recipient (Nitro Enclaves attestation) is not supported"),
    ]
    for params, error_type, message in cases:
        error("DeriveSharedSecret", params, error_type, 400, message)
    # and P-384 the other way round
    error("DeriveSharedSecret", {"KeyId": key("agree-384"), "KeyAgreementAlgorithm": "ECDH",
                                 "PublicKey": p256_peer}, "ValidationException", 400,
          "The peer's public key is on prime256v1, the key's curve is secp384r1")


# ---- data key pairs ---------------------------------------------------------------


@test
def test_generate_data_key_pair():
    for spec in ("RSA_2048", "ECC_NIST_P256", "ECC_NIST_P384"):
        got = C.kms.generate_data_key_pair(KeyId=key("sym"), KeyPairSpec=spec,
                                           EncryptionContext=CONTEXT)
        eq(sorted(k for k in got if k != "ResponseMetadata"),
           ["KeyId", "KeyPairSpec", "PrivateKeyCiphertextBlob", "PrivateKeyPlaintext",
            "PublicKey"], "%s: GenerateDataKeyPair's members" % spec)
        eq((got["KeyId"], got["KeyPairSpec"]), (arn("sym"), spec), spec)
        private = serialization.load_der_private_key(got["PrivateKeyPlaintext"], None)
        eq(spki(private.public_key()), got["PublicKey"], "%s: the private key is the public "
           "key's" % spec)
        C.secrets.append(got["PrivateKeyPlaintext"])
        opened = C.kms.decrypt(CiphertextBlob=got["PrivateKeyCiphertextBlob"],
                               EncryptionContext=CONTEXT)
        eq((opened["Plaintext"], opened["KeyId"]), (got["PrivateKeyPlaintext"], arn("sym")),
           "%s: PrivateKeyCiphertextBlob decrypts to the private key" % spec)
        boto_error(C.kms.decrypt, "InvalidCiphertextException", 400,
                   CiphertextBlob=got["PrivateKeyCiphertextBlob"])
        if spec == "RSA_2048":
            eq(private.key_size, 2048, "RSA_2048's size")
        else:
            eq(private.curve.name, {"ECC_NIST_P256": "secp256r1",
                                    "ECC_NIST_P384": "secp384r1"}[spec], "the curve")
        # the key pair works: sign with the private key, verify with the public one
        public = serialization.load_der_public_key(got["PublicKey"])
        if spec == "RSA_2048":
            sig = private.sign(b"pair", padding.PKCS1v15(), hashes.SHA256())
            public.verify(sig, b"pair", padding.PKCS1v15(), hashes.SHA256())
        else:
            sig = private.sign(b"pair", ec.ECDSA(hashes.SHA256()))
            public.verify(sig, b"pair", ec.ECDSA(hashes.SHA256()))
    got = C.kms.generate_data_key_pair_without_plaintext(KeyId="alias/asym-sym",
                                                         KeyPairSpec="ECC_NIST_P521")
    eq(sorted(k for k in got if k != "ResponseMetadata"),
       ["KeyId", "KeyPairSpec", "PrivateKeyCiphertextBlob", "PublicKey"],
       "GenerateDataKeyPairWithoutPlaintext's members")
    private = serialization.load_der_private_key(
        C.kms.decrypt(CiphertextBlob=got["PrivateKeyCiphertextBlob"])["Plaintext"], None)
    eq(spki(private.public_key()), got["PublicKey"], "the blob's private key is PublicKey's")
    # through the aws CLI
    got = cli(C.user, "generate-data-key-pair", "--key-id", key("sym"), "--key-pair-spec",
              "ECC_NIST_P256")
    private = serialization.load_der_private_key(base64.b64decode(got["PrivateKeyPlaintext"]),
                                                 None)
    eq(spki(private.public_key()), base64.b64decode(got["PublicKey"]), "aws kms "
       "generate-data-key-pair")
    got = cli(C.user, "generate-data-key-pair-without-plaintext", "--key-id", key("sym"),
              "--key-pair-spec", "RSA_3072")
    eq((got["KeyPairSpec"], "PrivateKeyPlaintext" in got), ("RSA_3072", False),
       "aws kms generate-data-key-pair-without-plaintext")


@test
def test_generate_data_key_pair_refusals():
    cases = [
        ({"KeyId": key("rsa-enc"), "KeyPairSpec": "RSA_2048"}, "InvalidKeyUsageException",
         "%s key spec is RSA_2048 which is not valid for GenerateDataKeyPair: it takes a "
         "symmetric encryption key (SYMMETRIC_DEFAULT)." % arn("rsa-enc")),
        ({"KeyId": key("HMAC_256"), "KeyPairSpec": "RSA_2048"}, "InvalidKeyUsageException",
         "%s key usage is GENERATE_VERIFY_MAC which is not valid for GenerateDataKeyPair."
         % arn("HMAC_256")),
        ({"KeyId": key("sym"), "KeyPairSpec": "ECC_SECG_P256K1"}, "UnsupportedOperationException",
         "KeyPairSpec ECC_SECG_P256K1 is not supported by p11kms"),
        ({"KeyId": key("sym"), "KeyPairSpec": "SM2"}, "UnsupportedOperationException",
         "KeyPairSpec SM2 is not supported by p11kms"),
        ({"KeyId": key("sym"), "KeyPairSpec": "RSA_1024"}, "ValidationException",
         "1 validation error detected: Value 'RSA_1024' at 'keyPairSpec' failed to satisfy "
         "constraint: Member must satisfy enum value set: [RSA_2048, RSA_3072, RSA_4096, "
         "ECC_NIST_P256, ECC_NIST_P384, ECC_NIST_P521, ECC_SECG_P256K1, SM2, "
         "ECC_NIST_EDWARDS25519]"),
        ({"KeyId": key("sym")}, "ValidationException",
         "1 validation error detected: Value null at 'keyPairSpec' failed to satisfy "
         "constraint: Member must not be null"),
        ({"KeyId": key("sym"), "KeyPairSpec": "RSA_2048",
          "Recipient": {"AttestationDocument": "AAAA"}}, "UnsupportedOperationException",
         "Recipient (Nitro Enclaves attestation) is not supported"),
    ]
    for params, error_type, message in cases:
        error("GenerateDataKeyPair", params, error_type, 400, message)
    error("GenerateDataKeyPairWithoutPlaintext", {"KeyId": key("ECC_NIST_P256"),
                                                  "KeyPairSpec": "RSA_2048"},
          "InvalidKeyUsageException", 400,
          "%s key usage is SIGN_VERIFY which is not valid for "
          "GenerateDataKeyPairWithoutPlaintext." % arn("ECC_NIST_P256"))


# ---- states, rotation, policy, limits ------------------------------------------------


@test
def test_asymmetric_keys_are_not_rotated():
    for name in ("rsa-sign", "HMAC_256", "agree-256"):
        for operation, params in (("EnableKeyRotation", {}),
                                  ("EnableKeyRotation", {"RotationPeriodInDays": 90}),
                                  ("DisableKeyRotation", {}), ("GetKeyRotationStatus", {}),
                                  ("RotateKeyOnDemand", {}), ("ListKeyRotations", {})):
            spec = C.keys[name]["KeySpec"]
            error(operation, dict(params, KeyId=key(name)), "UnsupportedOperationException", 400,
                  "%s is not supported for %s: it has KeySpec %s, and asymmetric and HMAC KMS "
                  "keys are not rotated" % (operation, arn(name), spec))
    boto_error(C.kms.enable_key_rotation, "UnsupportedOperationException", 400,
               KeyId=key("ECC_NIST_P521"))
    # a symmetric key still rotates
    C.kms.enable_key_rotation(KeyId=key("sym"))
    eq(C.kms.get_key_rotation_status(KeyId=key("sym"))["KeyRotationEnabled"], True, "sym")


@test
def test_disabled_keys():
    msg = b"d" * 32
    C.kms.disable_key(KeyId=key("rsa-sign"))
    C.kms.disable_key(KeyId=key("HMAC_256"))
    C.kms.disable_key(KeyId=key("agree-256"))
    C.kms.disable_key(KeyId=key("rsa-enc"))
    try:
        peer = spki(ec.generate_private_key(ec.SECP256R1()).public_key())
        for operation, params in (
                ("Sign", {"KeyId": key("rsa-sign"), "Message": msg,
                          "SigningAlgorithm": "RSASSA_PSS_SHA_256"}),
                ("Verify", {"KeyId": key("rsa-sign"), "Message": msg, "Signature": b"s" * 256,
                            "SigningAlgorithm": "RSASSA_PSS_SHA_256"}),
                ("GetPublicKey", {"KeyId": key("rsa-sign")}),
                ("GenerateMac", {"KeyId": key("HMAC_256"), "Message": msg,
                                 "MacAlgorithm": "HMAC_SHA_256"}),
                ("VerifyMac", {"KeyId": key("HMAC_256"), "Message": msg, "Mac": b"m" * 32,
                               "MacAlgorithm": "HMAC_SHA_256"}),
                ("DeriveSharedSecret", {"KeyId": key("agree-256"), "KeyAgreementAlgorithm":
                                        "ECDH", "PublicKey": peer}),
                ("Encrypt", {"KeyId": key("rsa-enc"), "Plaintext": b"x",
                             "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"}),
                ("Decrypt", {"KeyId": key("rsa-enc"), "CiphertextBlob": b"c" * 256,
                             "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"})):
            error(operation, params, "DisabledException", 409)
    finally:
        for name in ("rsa-sign", "HMAC_256", "agree-256", "rsa-enc"):
            C.kms.enable_key(KeyId=key(name))
    C.kms.sign(KeyId=key("rsa-sign"), Message=msg, SigningAlgorithm="RSASSA_PSS_SHA_256")


@test
def test_policy_allowing_only_verify_refuses_sign():
    policy = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "Owner", "Effect": "Allow",
         "Principal": {"AWS": "arn:aws:iam::%s:user/%s" % (h.ACCOUNT, C.user.name)},
         "Action": "kms:*", "Resource": "*"},
        {"Sid": "VerifierVerifies", "Effect": "Allow",
         "Principal": {"AWS": "arn:aws:iam::%s:user/%s" % (h.ACCOUNT, C.verifier.name)},
         "Action": ["kms:Verify", "kms:GetPublicKey"], "Resource": "*"}]})
    m = C.kms.create_key(KeySpec="ECC_NIST_P256", KeyUsage="SIGN_VERIFY", Policy=policy)
    kid = m["KeyMetadata"]["KeyId"]
    message = b"only the owner signs"
    sig = C.kms.sign(KeyId=kid, Message=message, SigningAlgorithm="ECDSA_SHA_256")["Signature"]
    verifier = h.kms_client(C.server.endpoint, C.verifier)
    eq(verifier.verify(KeyId=kid, Message=message, Signature=sig,
                       SigningAlgorithm="ECDSA_SHA_256")["SignatureValid"], True,
       "the verifier verifies")
    eq(len(verifier.get_public_key(KeyId=kid)["PublicKey"]), 91, "and reads the P-256 key")
    error("Sign", {"KeyId": kid, "Message": message, "SigningAlgorithm": "ECDSA_SHA_256"},
          "AccessDeniedException", 400,
          "User: verifier is not authorized to perform: kms:Sign on resource: %s because no "
          "statement of the key policy allows it" % m["KeyMetadata"]["Arn"], who=C.verifier)
    boto_error(verifier.sign, "AccessDeniedException", 400, KeyId=kid, Message=message,
               SigningAlgorithm="ECDSA_SHA_256")
    boto_error(verifier.describe_key, "AccessDeniedException", 400, KeyId=kid)


@test
def test_admins_manage_but_do_not_use_keys_without_a_statement():
    """The admin (C.user) manages every key but signs, MACs, derives or makes key pairs
    only when the key's policy says so; a public key, like DescribeKey, it may read."""
    only_verifier = json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "VerifierOnly", "Effect": "Allow",
         "Principal": {"AWS": "arn:aws:iam::%s:user/%s" % (h.ACCOUNT, C.verifier.name)},
         "Action": ["kms:Verify", "kms:VerifyMac", "kms:GetPublicKey"], "Resource": "*"}]})
    signer = C.kms.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY",
                              Policy=only_verifier)["KeyMetadata"]
    mac = C.kms.create_key(KeySpec="HMAC_256", KeyUsage="GENERATE_VERIFY_MAC",
                           Policy=only_verifier)["KeyMetadata"]
    agree = ok("CreateKey", {"KeySpec": "ECC_NIST_P256", "KeyUsage": "KEY_AGREEMENT",
                             "Policy": only_verifier})["KeyMetadata"]
    sym = C.kms.create_key(Policy=only_verifier)["KeyMetadata"]
    peer = spki(ec.generate_private_key(ec.SECP256R1()).public_key())

    def denied(operation, action, m, params):
        error(operation, dict(params, KeyId=m["KeyId"]), "AccessDeniedException", 400,
              "User: %s is not authorized to perform: %s on resource: %s because no statement "
              "of the key policy allows it" % (C.user.name, action, m["Arn"]))

    denied("Sign", "kms:Sign", signer, {"Message": b"m", "SigningAlgorithm": "ECDSA_SHA_384"})
    denied("Verify", "kms:Verify", signer, {"Message": b"m", "Signature": b"s" * 96,
                                            "SigningAlgorithm": "ECDSA_SHA_384"})
    denied("GenerateMac", "kms:GenerateMac", mac, {"Message": b"m",
                                                   "MacAlgorithm": "HMAC_SHA_256"})
    denied("VerifyMac", "kms:VerifyMac", mac, {"Message": b"m", "Mac": b"x" * 32,
                                               "MacAlgorithm": "HMAC_SHA_256"})
    denied("DeriveSharedSecret", "kms:DeriveSharedSecret", agree,
           {"KeyAgreementAlgorithm": "ECDH", "PublicKey": peer})
    denied("GenerateDataKeyPair", "kms:GenerateDataKeyPair", sym, {"KeyPairSpec": "RSA_2048"})
    denied("GenerateDataKeyPairWithoutPlaintext", "kms:GenerateDataKeyPairWithoutPlaintext", sym,
           {"KeyPairSpec": "ECC_NIST_P256"})
    # managing is the admin's, and so is reading the public key
    eq(C.kms.get_public_key(KeyId=signer["KeyId"])["KeySpec"], "ECC_NIST_P384", "GetPublicKey")
    eq(C.kms.describe_key(KeyId=mac["KeyId"])["KeyMetadata"]["MacAlgorithms"], ["HMAC_SHA_256"],
       "DescribeKey")
    C.kms.disable_key(KeyId=signer["KeyId"])
    C.kms.enable_key(KeyId=signer["KeyId"])


@test
def test_asym_and_hmac_rate_classes():
    slow = h.kms_client(C.server.endpoint, C.slow)
    slow.get_public_key(KeyId=key("ECC_NIST_P256"))  # the one asym token
    code, status, message = h.client_error(slow.sign, KeyId=key("ECC_NIST_P256"), Message=b"x",
                                           SigningAlgorithm="ECDSA_SHA_256")
    eq((code, status, message), ("ThrottlingException", 429, "Rate exceeded"), "asym throttled")
    code, status, _ = h.client_error(slow.generate_data_key_pair, KeyId=key("sym"),
                                     KeyPairSpec="ECC_NIST_P256")
    eq((code, status), ("ThrottlingException", 429), "GenerateDataKeyPair is asym")
    # crypto (RSA Encrypt included) and hmac have buckets of their own
    slow.encrypt(KeyId=key("rsa-enc"), Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256")
    slow.generate_mac(KeyId=key("HMAC_256"), Message=b"x", MacAlgorithm="HMAC_SHA_256")
    slow.generate_data_key(KeyId=key("sym"), NumberOfBytes=16)


@test
def test_audit_log_names_keys_and_holds_no_secrets():
    with open(C.audit_log, "rb") as f:
        raw = f.read()
    lines = [json.loads(line) for line in raw.splitlines()]
    requests = [d for d in lines if d.get("type") == "request"]
    by_op = {}
    for d in requests:
        by_op.setdefault(d["operation"], []).append(d)
    for op in ("GetPublicKey", "Sign", "Verify", "GenerateMac", "VerifyMac", "DeriveSharedSecret",
               "GenerateDataKeyPair", "GenerateDataKeyPairWithoutPlaintext"):
        oks = [d for d in by_op.get(op, []) if d["outcome"] == "ok"]
        check(oks, "%s: audit lines of successful calls" % op)
        for d in oks:
            check(d.get("key_arn", "").startswith(ARN_PREFIX), "%s names its key: %r" % (op, d))
            check(d.get("key_version", 0) > 0, "%s names the key's version: %r" % (op, d))
    signs = {d["key_arn"] for d in by_op["Sign"] if d["outcome"] == "ok"}
    check(arn("rsa-sign") in signs and arn("ECC_NIST_P384") in signs, "Sign's keys")
    pairs = [d for d in by_op["GenerateDataKeyPair"] if d["outcome"] == "ok"]
    eq({d["key_arn"] for d in pairs}, {arn("sym")}, "GenerateDataKeyPair names the KMS key")
    check(any("context_digest" in d for d in pairs), "and digests its encryption context")
    refused = [d for d in by_op["Verify"] if d["outcome"] == "KMSInvalidSignatureException"]
    check(refused, "a refused Verify is audited with its outcome")
    denied = [d for d in by_op["Sign"] if d["outcome"] == "AccessDeniedException"]
    check(denied and {d["principal"] for d in denied} == {"verifier", C.user.name},
          "the refused Signs: the verifier's and the admin's")
    eq(len(C.secrets) > 20, True, "secrets were collected")
    for secret in C.secrets:
        for form in (secret, base64.b64encode(secret), secret.hex().encode(),
                     hashlib.sha256(secret).hexdigest().encode()):
            check(form not in raw, "the audit log holds no message, signature, MAC, secret or "
                  "private key (found %r)" % form[:40])


@test
def test_rsa_key_generation_has_its_own_deadline():
    """With request_timeout_ms at 50 ms, CreateKey of an RSA-2048 key (generated in the
    token: about 200 ms on SoftHSM2) and GenerateDataKeyPair of an RSA-4096 pair (in the
    process: hundreds of milliseconds in OpenSSL) still answer 200: their deadline is
    keygen_timeout_ms. Without it both would be answered 503."""
    ws = h.Workspace()
    server = None
    try:
        token = h.make_token(ws.sub("token"), "p11kms-it-keygen")
        creds = h.write_credentials(ws.sub("credentials"), [C.user])
        config = h.write_config(ws.sub("p11kmsd.conf"), token, creds, request_timeout_ms="50",
                                admin_principals=C.user.name)
        server = h.start_config_server(config, token, ws.sub("p11kmsd.log"))
        kms = h.kms_client(server.endpoint, C.user)
        made = kms.create_key(KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")["KeyMetadata"]
        eq(made["KeySpec"], "RSA_2048", "the RSA key made within keygen_timeout_ms")
        sym = None
        for _ in range(20):  # a symmetric CreateKey has only the 50 ms: it may take longer
            r = h.kms_call(server.endpoint, "CreateKey", {}, C.user)
            if r.status == 200:
                sym = r.json()["KeyMetadata"]["KeyId"]
                break
            h.check_error_response(r, "DependencyTimeoutException", 503)
        check(sym is not None, "a symmetric key made within 50 ms in 20 tries")
        pair = kms.generate_data_key_pair(KeyId=sym, KeyPairSpec="RSA_4096")
        eq(pair["KeyPairSpec"], "RSA_4096", "the RSA data key pair made within keygen_timeout_ms")
    finally:
        if server:
            server.stop()
        ws.close()


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
