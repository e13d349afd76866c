#!/bin/sh
# Writes tests/fuzz/corpus/envelope/: envelopes sealed to the fixed P-256 key of
# fuzz_envelope.c by other implementations (python3-jwcrypto, openssl cms), so
# the seeds reach the key unwrap and the tag check. Needs python3-jwcrypto and
# openssl. Re-run after a format change; reproducers are added by hand.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=$here/corpus/envelope
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
sed -n '/-----BEGIN PRIVATE KEY-----/,/-----END PRIVATE KEY-----/p' "$here/fuzz_envelope.c" |
    sed 's/^[^"]*"//; s/\\n".*$//; s/\\n";$//' >"$tmp/key.pem"
openssl ec -in "$tmp/key.pem" -pubout -out "$tmp/pub.pem" 2>/dev/null
openssl req -x509 -new -key "$tmp/key.pem" -subj /CN=fuzz -days 3650 -out "$tmp/cert.pem" 2>/dev/null
printf 'a payload for the fuzzer' >"$tmp/msg"
openssl cms -encrypt -binary -aes-256-gcm -recip "$tmp/cert.pem" -outform DER \
    -in "$tmp/msg" -out "$out/cms-kari.der"
openssl cms -encrypt -binary -aes-256-gcm -recip "$tmp/cert.pem" -outform PEM \
    -in "$tmp/msg" -out "$out/cms-kari.pem"
openssl cms -encrypt -binary -aes-256-gcm -stream -recip "$tmp/cert.pem" -outform DER \
    -in "$tmp/msg" -out "$out/cms-kari-ber.der"
/usr/bin/python3 - "$tmp/pub.pem" "$out" <<'PY'
import sys
from jwcrypto import jwe, jwk
pub = jwk.JWK.from_pem(open(sys.argv[1], "rb").read())
out = sys.argv[2]
def seal(alg, compact, name, kid=None):
    hdr = {"alg": alg, "enc": "A256GCM"}
    if kid:
        hdr["kid"] = kid
    if compact:
        t = jwe.JWE(b"a payload for the fuzzer", protected=hdr)
        t.add_recipient(pub)
        data = t.serialize(compact=True)
    else:
        t = jwe.JWE(b"a payload for the fuzzer", protected={"enc": "A256GCM"})
        t.add_recipient(pub, header={"alg": alg, "kid": kid or "fuzz"})
        t.add_recipient(pub, header={"alg": alg})
        data = t.serialize()
    open(out + "/" + name, "w").write(data)
seal("ECDH-ES+A256KW", True, "jwe-ecdh-compact", kid="fuzz")
seal("ECDH-ES+A256KW", False, "jwe-ecdh-json")
PY
printf '{"protected":"e30","ciphertext":"","iv":"","tag":""}' >"$out/bad-json"
printf '0\200' >"$out/bad-der"
