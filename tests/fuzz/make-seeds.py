#!/usr/bin/env python3
"""Writes the seed corpora under tests/fuzz/corpus/<target>/ from the project's
own vectors (tests/unit/test_sigv4.c, test_jwe.c, docs/format.md, docs/policy.md,
tests/unit/test_config.c). Re-run after a format change; seeds found by
fuzzing (crash reproducers) are added by hand and are not touched here."""
import os
import sys

top = os.path.dirname(os.path.abspath(__file__))
corpus = os.path.join(top, "corpus")


def put(target, name, data):
    d = os.path.join(corpus, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# ---- blob: version | uuid | key version (BE) | IV | ciphertext | tag ----
jwe_blob = bytes(range(1, 82))  # the blob of tests/unit/test_jwe.c's vector
put("blob", "jwe-vector-blob", jwe_blob)
uuid = bytes([0xF0, 0xE1, 0xD2, 0xC3, 0xB4, 0xA5, 0x96, 0x87, 0x78, 0x69, 0x5A, 0x4B, 0x3C, 0x2D, 0x1E, 0x0F])
put("blob", "minimal", b"\x01" + uuid + b"\x01\x02\x03\x04" + bytes(12) + b"x" + bytes(16))
put("blob", "data-key", b"\x01" + uuid + b"\x00\x00\x00\x01" + bytes(range(12)) + bytes(32) + bytes(16))
put("blob", "bad-too-short", b"\x01" + uuid + b"\x00\x00\x00\x01" + bytes(12) + bytes(16))
put("blob", "bad-format", b"\x02" + uuid + b"\x00\x00\x00\x01" + bytes(12) + b"x" + bytes(16))
put("blob", "bad-version-zero", b"\x01" + uuid + bytes(4) + bytes(12) + b"x" + bytes(16))
put("blob", "empty", b"")

# ---- sigv4: Authorization line, then header lines (tests/unit/test_sigv4.c) ----
scope = "20150830/us-east-1/service/aws4_request"
pre = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/" + scope + ", "
host = "Host:example.amazonaws.com\nX-Amz-Date:20150830T123600Z\n"
put("sigv4", "get-vanilla", pre + "SignedHeaders=host;x-amz-date, "
    "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31\n" + host)
put("sigv4", "post-x-www-form-urlencoded", pre + "SignedHeaders=content-type;host;x-amz-date, "
    "Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a\n"
    "Content-Type:application/x-www-form-urlencoded\n" + host)
put("sigv4", "get-header-value-trim", pre + "SignedHeaders=host;my-header1;my-header2;x-amz-date, "
    "Signature=acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736\n"
    "Host:example.amazonaws.com\nMy-Header1: value1\nMy-Header2: \"a   b   c\"\n"
    "X-Amz-Date:20150830T123600Z\n")
put("sigv4", "repeated-header", pre + "SignedHeaders=host;my-header1;x-amz-date, "
    "Signature=" + "0" * 64 + "\nHost:example.amazonaws.com\nMy-Header1:a\nmy-header1: b \n"
    "X-Amz-Date:20150830T123600Z\n")
put("sigv4", "bad-missing-signed-header", pre + "SignedHeaders=content-type;host;x-amz-date, "
    "Signature=" + "a" * 64 + "\n" + host)
put("sigv4", "bad-order", "AWS4-HMAC-SHA256 Signature=abcd,SignedHeaders=host,"
    "Credential=AKIDEXAMPLE/" + scope + "\n" + host)
put("sigv4", "bad-empty-credential", "AWS4-HMAC-SHA256 Credential=, SignedHeaders=host;x-amz-date, "
    "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31\n" + host)

# ---- config: configuration and credentials files (tests/unit/test_config.c) ----
put("config", "every-key", "# p11kmsd test configuration\n"
    "module = /usr/lib/softhsm/libsofthsm2.so\ntoken=kms-test\n\n"
    "   pin_file   =   /etc/p11kms/pin   \ncredentials_file = /etc/p11kms/credentials\n"
    "\t# an indented comment\nlisten = [::1]:8443\nregion = eu-west-1\naccount = 123456789012\n"
    "threads = 8\nsessions = 16\nsession_timeout_ms = 5000   # trailing comment\nmax_body = 131072")
put("config", "tls", "module = m.so\ntoken = t\ncredentials_file = /c\nlisten = 0.0.0.0:8443\n"
    "region = r\naccount = 000000000000\ntls_cert_file = /etc/p11kms/cert.pem\n"
    "tls_key_file = /etc/p11kms/key.pem\ntls_client_ca_file = /etc/p11kms/ca.pem\n"
    "client_cert.alice = " + "ab" * 32 + "\nadmin_principals = alice, bob\n"
    "default_key_policy = creator\n")
put("config", "bad-unknown-key", "module = m\n# comment\nmodel = x\n")
put("config", "bad-number", "threads = 12x\n")
put("config", "credentials", "# ACCESS_KEY_ID SECRET NAME\n"
    "AKIDEXAMPLE wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY alice\n\n   # indented comment\n"
    "\tAKIDSECOND\ts3cr3t+/=\t bob   # trailing comment\r\n")
put("config", "bad-credentials-twice", "AK1 s1 alice\nAK1 s2 bob\n")
put("config", "bad-credentials-name", "AK1 s1 al!ce\n")

# ---- policy: documents of docs/policy.md ----
put("policy", "example", open(os.path.join(top, "..", "..", "docs", "policy.md")).read()
    .split("```json\n")[1].split("```")[0])
put("policy", "default", '{"Version":"2012-10-17","Id":"key-default-1","Statement":[{"Sid":"Default",'
    '"Effect":"Allow","Principal":{"AWS":["arn:aws:iam::111122223333:user/alice"]},'
    '"Action":"kms:*","Resource":"*"}]}')
put("policy", "conditions", '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":'
    '{"AWS":"arn:aws:iam::111122223333:root"},"Action":["kms:Decrypt","kms:Encrypt"],"Resource":"*",'
    '"Condition":{"StringLike":{"kms:EncryptionContext:tenant":"ac?*"},'
    '"StringEqualsIgnoreCase":{"aws:username":"ORDERS-APP"},'
    '"ForAnyValue:StringEquals":{"kms:EncryptionContextKeys":["order"]}}}]}')
put("policy", "bad-statments", '{"Version":"2012-10-17","Statments":[]}')
put("policy", "bad-duplicate", '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Effect":"Deny"}]}')
put("policy", "bad-not-principal", '{"Version":"2012-10-17","Statement":[{"Effect":"Allow",'
    '"NotPrincipal":"*","Action":"kms:*","Resource":"*"}]}')

# ---- jwe: tests/unit/test_jwe.c's vector, compact and flattened ----
vector = ("eyJhbGciOiJkaXIiLCJlbmMiOiJBMjU2R0NNIiwia2lkIjoiYXJuOmF3czprbXM6dXMtZWFzdC0xOjEyMzQ1Njc4OTAx"
          "MjprZXkvNmYxYzJhOWUtNTMwNC00YjFkLThhNzctMzBjMmU1MTk0ZGYwIiwicDExa21zX2Jsb2IiOiJBUUlEQkFVR0J3"
          "Z0pDZ3NNRFE0UEVCRVNFeFFWRmhjWUdSb2JIQjBlSHlBaElpTWtKU1luS0NrcUt5d3RMaTh3TVRJek5EVTJOemc1T2pz"
          "OFBUNF9RRUZDUTBSRlJrZElTVXBMVEUxT1QxQlIiLCJwMTFrbXNfY3R4Ijp7InBhdGgiOiJhL2IiLCJwdXJwb3NlIjoi"
          "dGVzdCIsInRlbmFudCI6ImFjbcOpIn19"
          "..oKGio6Slpqeoqaqr.nToUSCmnbZ1YR_C8dRak_A0.LiusE9tFTraxqI8YE1IpfQ")
put("jwe", "vector-compact", vector)
h, ek, iv, ct, tag = vector.split(".")
put("jwe", "vector-flattened", '{"protected":"%s","iv":"%s","ciphertext":"%s","tag":"%s"}' % (h, iv, ct, tag))
put("jwe", "bad-tag", vector[:-2] + ("Q" if vector[-2] != "Q" else "A") + vector[-1])
put("jwe", "bad-four-parts", ".".join([h, ek, iv, ct]))
put("jwe", "bad-encrypted-key", ".".join([h, "AAAA", iv, ct, tag]))

# ---- stream: docs/format.md's worked example (226 bytes) ----
stream = bytes.fromhex(
    "503131530100000004a0a1a2a3a4a5a6ffa57b35e2b36ef32e3f874e2946c58364a55334433f1b09828db994"
    "dabd4c9a004b61726e3a6177733a6b6d733a75732d656173742d313a3132333435363738393031323a6b6579"
    "2f36663163326139652d353330342d346231642d386137372d33306332653531393464663000280102030405"
    "060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728"
    "62b470c5bd24989b078b74216d133301802a1567"
    "3ec260a8a479d1fff73464402750607580488596"
    "93c1e5e3781854b738baeca36c929caa3743b8")
assert len(stream) == 226, len(stream)
put("stream", "format-example", stream)
put("stream", "header-only", stream[:167])
put("stream", "truncated-chunk", stream[:167 + 20 + 10])
put("stream", "dropped-final", stream[:167 + 40])
put("stream", "bad-magic", b"P11X" + stream[4:])
put("stream", "bad-chunk-size", stream[:5] + b"\x01\x00\x00\x01" + stream[9:])
put("stream", "no-arn", stream[:48] + b"\x00\x00" + stream[48 + 2 + 75:167] + stream[167:])

# ---- request: operation bodies as the AWS SDKs send them ----
put("request", "encrypt", '{"KeyId":"alias/orders","Plaintext":"aGVsbG8=",'
    '"EncryptionContext":{"tenant":"acme","order":"o-1"},"GrantTokens":["t1"],'
    '"EncryptionAlgorithm":"SYMMETRIC_DEFAULT"}')
put("request", "decrypt", '{"CiphertextBlob":"AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyAhIiMkJSYnKCkqKywtLi8w",'
    '"KeyId":"arn:aws:kms:us-east-1:111122223333:key/6f1c2a9e-5304-4b1d-8a77-30c2e5194df0"}')
put("request", "generate-data-key", '{"KeyId":"6f1c2a9e-5304-4b1d-8a77-30c2e5194df0","NumberOfBytes":32,'
    '"KeySpec":"AES_256"}')
put("request", "list-keys", '{"Limit":100,"Marker":"abc"}')
put("request", "create-key", '{"Description":"orders","Policy":"{}","PendingWindowInDays":7,'
    '"AliasName":"alias/x"}')
put("request", "bad-types", '{"KeyId":5,"NumberOfBytes":"32","EncryptionContext":{"a":1},'
    '"GrantTokens":"t","Plaintext":"!!"}')
put("request", "bad-nul", '{"KeyId":"a\\u0000b","EncryptionContext":{"a\\u0000":"b"}}')
put("request", "bad-duplicate", '{"KeyId":"a","KeyId":"b"}')
put("request", "empty", "{}")
# asymmetric and HMAC keys: the algorithm members, one of each usage
put("request", "sign", '{"KeyId":"alias/signer","Message":"aGVsbG8=","MessageType":"RAW",'
    '"SigningAlgorithm":"ECDSA_SHA_256","GrantTokens":["t1"]}')
put("request", "verify-mac", '{"KeyId":"alias/mac","Message":"aGVsbG8=",'
    '"Mac":"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=","MacAlgorithm":"HMAC_SHA_256"}')
put("request", "derive", '{"KeyId":"alias/agree","KeyAgreementAlgorithm":"ECDH",'
    '"PublicKey":"MFkwEwYHKoZIzj0CAQ=="}')
put("request", "bad-algorithms", '{"EncryptionAlgorithm":"RSAES_OAEP_SHA_256",'
    '"SigningAlgorithm":"HMAC_SHA_256","MacAlgorithm":5,"KeyAgreementAlgorithm":"ecdh"}')
