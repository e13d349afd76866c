#!/usr/bin/python3
"""The asymmetric and HMAC operations against the token's raw rate (issue 21,
docs/performance.md). `make bench` runs it after bench.py:

    bench_asym.py --builddir DIR [--srcdir DIR] [--module PATH]

On a fresh token, database and p11kmsd configured as bench.py configures its
10-key server (bench.fresh_server: every feature on, the rate limits far
above anything served), it makes one key of each kind with CreateKey
(KeySpec, KeyUsage), checks one answer of each operation below against
OpenSSL, then in each round measures, one operation after another, the
reference and then p11kmsd under wrk (bench.py's -t1 -c32, requests signed
right before each run):

  Sign, RSASSA_PSS_SHA_256, MessageType DIGEST, RSA_2048 SIGN_VERIFY
        p11_ceiling rsa_pss_sign: CKM_RSA_PKCS_PSS of the digest
  Verify of those signatures, the same key
        openssl speed -elapsed rsa2048, verify/s: p11kmsd verifies with the
        public key in the process, so the token has no call to compare with
  Decrypt, RSAES_OAEP_SHA_256 (openssl pkeyutl's ciphertexts), RSA_2048 ENCRYPT_DECRYPT
        p11_ceiling rsa_decrypt: CKM_RSA_X_509, the token's part when p11kmsd
        removes the OAEP padding itself (SoftHSM2 2.6.1 has OAEP with SHA-1 only)
  DeriveSharedSecret, ECDH with a P-256 peer's SubjectPublicKeyInfo, ECC_NIST_P256 KEY_AGREEMENT
        p11_ceiling ecdh_derive: CKM_ECDH1_DERIVE, the secret read and destroyed
  GenerateMac, HMAC_SHA_384 of 64 bytes, HMAC_384
        p11_ceiling hmac_sha384
  Sign, ECDSA_SHA_256, MessageType DIGEST, ECC_NIST_P256 SIGN_VERIFY
        p11_ceiling ecdsa_sign: CKM_ECDSA of the digest

A token reference is the best of p11_ceiling with 1 and 2 sessions (bench.py's
CEILING_THREADS: one, and one per core) and as many as p11kmsd has workers
(4), on the server's token; OpenSSL's the best of as many concurrent openssl
speed processes, their rates summed (not -multi, whose children start late).
The bar is 0.70 of the reference (issue 21). Each round also runs the canned
HTTP server (bench/mhd_canned) under the same wrk. Each operation's second
row is 1/(1/HTTP + 1/reference): the rate a request costing the canned
server's HTTP work plus one reference call would reach on the same two cores;
its third, the CPU time p11kmsd spent a request (/proc/PID/stat over the wrk
run) against the CPU time of one reference call (p11_ceiling's cpu_seconds,
the fewest of the thread counts; openssl speed's own CPU-time rate): rates
follow the CPU the machine's other work leaves, CPU time does not.

Environment, exit status and table as bench.py's: P11KMS_BENCH_SECONDS (8),
P11KMS_BENCH_ROUNDS (3), P11KMS_BENCH_CEILING_SECONDS (3: each p11_ceiling
mode and thread count, each openssl speed half), P11KMS_BENCH_WRK_THREADS (1),
P11KMS_BENCH_CONNECTIONS (32). Needs wrk, openssl, python3-boto3, SoftHSM2
and bench/p11_ceiling and bench/mhd_canned built (make bench builds them).
"""

import base64
import os
import random
import re
import subprocess
import sys

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench as B  # noqa: E402 - bench.py's servers, wrk runs, request files and table

H = None  # the harness, imported once the environment names this build
log, Broken, rate = B.log, B.Broken, B.rate
BAR = 0.70
REQUESTS = 32  # distinct requests per operation, replayed round robin
CIPHERTEXTS = 16  # openssl pkeyutl runs: fewer
DIGEST = 32  # SHA-256
MAC_MESSAGE = 64
# name: CreateKey's KeySpec and KeyUsage
KEYS = {
    "rsa_sign": ("RSA_2048", "SIGN_VERIFY"),
    "rsa_decrypt": ("RSA_2048", "ENCRYPT_DECRYPT"),
    "ecdh": ("ECC_NIST_P256", "KEY_AGREEMENT"),
    "ec_sign": ("ECC_NIST_P256", "SIGN_VERIFY"),
    "hmac": ("HMAC_384", "GENERATE_VERIFY_MAC"),
}
# The asym and hmac rate classes (Sign, Verify, DeriveSharedSecret; GenerateMac) beside
# bench.py's crypto and manage, as far out of the way (asym's default is 5,000/s).
UNTHROTTLED = {"%s_%s" % (k, c): "100000000" for k in ("rate", "burst") for c in ("asym", "hmac")}
VERIFY = "openssl"  # the reference of Verify: OpenSSL's own rate, not a token mode
# (name in the results, operation, p11_ceiling mode or VERIFY, the table's label)
OPS = (
    ("sign_pss", "Sign", "rsa_pss_sign", "Sign, RSASSA_PSS_SHA_256, RSA_2048, digest"),
    ("verify_pss", "Verify", VERIFY, "Verify, RSASSA_PSS_SHA_256, RSA_2048, digest"),
    ("decrypt", "Decrypt", "rsa_decrypt", "Decrypt, RSAES_OAEP_SHA_256, RSA_2048"),
    ("derive", "DeriveSharedSecret", "ecdh_derive", "DeriveSharedSecret, ECDH, ECC_NIST_P256"),
    ("mac", "GenerateMac", "hmac_sha384", "GenerateMac, HMAC_SHA_384, 64 bytes"),
    ("sign_ecdsa", "Sign", "ecdsa_sign", "Sign, ECDSA_SHA_256, ECC_NIST_P256, digest"),
)
REFERENCE = {
    "rsa_pss_sign": "token CKM_RSA_PKCS_PSS",
    VERIFY: "OpenSSL rsa2048 verify, in the process",
    "rsa_decrypt": "token CKM_RSA_X_509",
    "ecdh_derive": "token CKM_ECDH1_DERIVE",
    "hmac_sha384": "token CKM_SHA384_HMAC",
    "ecdsa_sign": "token CKM_ECDSA",
}


def b64(data):
    return base64.b64encode(data).decode()


def args_and_harness():
    a = B.build_args("p11kmsd's asymmetric and HMAC operations against the token "
                     "(docs/performance.md)")
    global H
    H = B.load_harness(a)
    return a


class OpenSSL:
    """The openssl command for what the checks and requests need, on files in folder."""

    def __init__(self, binary, folder):
        self.binary, self.folder = binary, folder

    def path(self, name):
        return os.path.join(self.folder, name)

    def __call__(self, *args, data=None):
        r = subprocess.run([self.binary] + list(args), input=data, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=60)
        if r.returncode != 0:
            raise Broken("openssl %s exited with status %d: %s" % (
                args[0], r.returncode, r.stderr.decode("utf-8", "replace").strip()))
        return r.stdout

    def save(self, name, data):
        with open(self.path(name), "wb") as f:
            f.write(data)
        return self.path(name)

    def verify(self, spki, digest, sig, *opts):
        """Raises Broken unless sig is a signature of digest (SHA-256) under spki (DER)."""
        pkeyopts = [x for o in ("digest:sha256",) + opts for x in ("-pkeyopt", o)]
        self("pkeyutl", "-verify", "-pubin", "-keyform", "DER", "-inkey", spki, "-sigfile",
             self.save("sig.bin", sig), *pkeyopts, data=digest)


def server_workers(config):
    """p11kmsd's workers under config: workers, else threads, else 4 (settings.c)."""
    with open(config) as f:
        settings = dict(re.findall(r"^\s*(\w+)\s*=\s*(\S+)", f.read(), re.M))
    return int(settings.get("workers") or settings.get("threads") or 4)


class Setup:
    """The server, its keys and a list of request bodies per operation, each
    operation's answer checked once."""

    def __init__(self, ws, tools):
        self.server, self.principal, self.token = B.fresh_server(ws, "asym", **UNTHROTTLED)
        try:
            d = ws.sub("asym")
            self.workers = server_workers(os.path.join(d, "p11kmsd.conf"))
            self.ossl = OpenSSL(tools.openssl, d)
            self.ep = self.server.endpoint
            self.keys = {n: self.call("CreateKey", {"KeySpec": spec, "KeyUsage": usage})
                         ["KeyMetadata"]["KeyId"] for n, (spec, usage) in KEYS.items()}
            self.spki = {n: self.ossl.save(n + ".der", base64.b64decode(
                self.call("GetPublicKey", {"KeyId": self.keys[n]})["PublicKey"]))
                for n in KEYS if n != "hmac"}
            self.bodies = {}
            rng = random.Random(21)
            self.signing(rng)
            self.decrypting(rng)
            self.deriving()
            self.macs(rng)
        except BaseException:
            self.server.server.kill()
            raise

    def call(self, operation, params):
        return B.call(self.ep, self.principal, operation, params)

    def signing(self, rng):
        """Sign bodies for both signing keys, and for Verify the RSA key's own
        signatures; a signature of each key checked with openssl, and a Verify."""
        for name, key, alg in (("sign_pss", "rsa_sign", "RSASSA_PSS_SHA_256"),
                               ("sign_ecdsa", "ec_sign", "ECDSA_SHA_256")):
            self.bodies[name] = [{"KeyId": self.keys[key], "Message": b64(rng.randbytes(DIGEST)),
                                  "MessageType": "DIGEST", "SigningAlgorithm": alg}
                                 for _ in range(REQUESTS)]
        sigs = [self.call("Sign", body)["Signature"] for body in self.bodies["sign_pss"]]
        self.bodies["verify_pss"] = [dict(body, Signature=sig)
                                     for body, sig in zip(self.bodies["sign_pss"], sigs)]
        self.check_signature("rsa_sign", self.bodies["verify_pss"][0], "rsa_padding_mode:pss",
                             "rsa_pss_saltlen:32", "rsa_mgf1_md:sha256")
        ecdsa = self.bodies["sign_ecdsa"][0]
        self.check_signature("ec_sign", dict(ecdsa, Signature=self.call("Sign", ecdsa)["Signature"]))
        if self.call("Verify", self.bodies["verify_pss"][0]).get("SignatureValid") is not True:
            raise Broken("Verify did not find a signature of Sign valid")

    def check_signature(self, key, body, *opts):
        """openssl pkeyutl -verify of body's Signature of its Message (a SHA-256 digest)."""
        self.ossl.verify(self.spki[key], base64.b64decode(body["Message"]),
                         base64.b64decode(body["Signature"]), *opts)

    def decrypting(self, rng):
        """Ciphertexts of random 32-byte plaintexts made by openssl under the
        key's public half; the first Decrypt checked."""
        plain = [rng.randbytes(32) for _ in range(CIPHERTEXTS)]
        cts = [self.ossl("pkeyutl", "-encrypt", "-pubin", "-keyform", "DER", "-inkey",
                         self.spki["rsa_decrypt"], "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt",
                         "rsa_oaep_md:sha256", "-pkeyopt", "rsa_mgf1_md:sha256", data=p) for p in plain]
        self.bodies["decrypt"] = [{"KeyId": self.keys["rsa_decrypt"], "CiphertextBlob": b64(c),
                                   "EncryptionAlgorithm": "RSAES_OAEP_SHA_256"} for c in cts]
        got = self.call("Decrypt", self.bodies["decrypt"][0])["Plaintext"]
        if base64.b64decode(got) != plain[0]:
            raise Broken("Decrypt did not give back openssl's plaintext")

    def deriving(self):
        """A P-256 peer made for this run; the secret checked against openssl's."""
        peer = self.ossl.save("peer.pem", self.ossl("genpkey", "-algorithm", "EC", "-pkeyopt",
                                                    "ec_paramgen_curve:P-256"))
        peer_spki = self.ossl("pkey", "-in", peer, "-pubout", "-outform", "DER")
        self.bodies["derive"] = [{"KeyId": self.keys["ecdh"], "KeyAgreementAlgorithm": "ECDH",
                                  "PublicKey": b64(peer_spki)}]
        want = self.ossl("pkeyutl", "-derive", "-inkey", peer, "-peerkey", self.spki["ecdh"],
                         "-peerform", "DER")
        got = self.call("DeriveSharedSecret", self.bodies["derive"][0])["SharedSecret"]
        if base64.b64decode(got) != want:
            raise Broken("DeriveSharedSecret gave another secret than openssl pkeyutl -derive")

    def macs(self, rng):
        """Random 64-byte messages; the first MAC checked with VerifyMac."""
        self.bodies["mac"] = [{"KeyId": self.keys["hmac"], "Message": b64(rng.randbytes(MAC_MESSAGE)),
                               "MacAlgorithm": "HMAC_SHA_384"} for _ in range(REQUESTS)]
        mac = self.call("GenerateMac", self.bodies["mac"][0])["Mac"]
        if len(base64.b64decode(mac)) != 48 or self.call("VerifyMac", dict(
                self.bodies["mac"][0], Mac=mac)).get("MacValid") is not True:
            raise Broken("GenerateMac's MAC is not 48 bytes that VerifyMac takes")


def cpu_seconds(pid):
    """The process's CPU time so far (utime + stime of /proc/PID/stat), all its threads."""
    with open("/proc/%d/stat" % pid) as f:
        after_name = f.read().rsplit(")", 1)[1].split()
    return (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")


class AsymBench(B.Bench):
    def __init__(self, a, ws, tools, workers):
        super().__init__(a, ws, tools)
        # bench.py's counts (one, and one per core) and the server's workers: the
        # most token calls, or verifications, p11kmsd has in flight.
        self.counts = tuple(sorted(set(B.CEILING_THREADS) | {workers}))

    def token_mode(self, token, mode):
        """The best rate of the counts, and the fewest CPU seconds a call."""
        each = {n: self.ceiling_run(token, n, (mode,))[mode] for n in self.counts}
        return {"best": max(v["rate"] for v in each.values()),
                "cpu": min(v["cpu"] for v in each.values()), "each": each}

    def openssl_speed(self, procs, elapsed=True):
        """RSA-2048 verifications per second of procs concurrent `openssl speed`
        processes, summed; elapsed: per second of wall-clock time (as wrk
        counts), else per second of the process's own CPU time."""
        args = [self.t.openssl, "speed", "-seconds", "%d" % max(1, round(self.short))]
        args += ["-elapsed", "rsa2048"] if elapsed else ["rsa2048"]
        ps = [subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL) for _ in range(procs)]
        total = 0.0
        for p in ps:
            try:
                out = p.communicate(timeout=4 * self.short + 60)[0].decode("utf-8", "replace")
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()
                out = ""
            m = re.search(r"^rsa 2048 bits\s+\S+\s+\S+\s+[\d.]+\s+([\d.]+)\s*$", out, re.M)
            if p.returncode != 0 or not m:
                raise Broken("cannot read openssl speed's rsa2048 verify rate:\n%s" % out)
            total += float(m.group(1))
        log("  openssl speed rsa2048, %d process%s  verify %8.0f/s%s" % (
            procs, "es" if procs > 1 else "  ", total, "" if elapsed else " of CPU time"))
        return total

    def openssl_verify(self):
        """As token_mode, for OpenSSL's own verification."""
        each = {n: self.openssl_speed(n) for n in self.counts}
        return {"best": max(each.values()), "cpu": 1.0 / self.openssl_speed(1, elapsed=False),
                "each": each}

    def server_run(self, s, name, operation):
        """wrk on p11kmsd, and p11kmsd's CPU seconds a request meanwhile."""
        req = B.presign(self.ws.sub(name + ".req"), s.ep, s.principal, operation, s.bodies[name])
        before = cpu_seconds(s.server.pid)
        r = self.wrk("%s (%s)" % (operation, name), s.ep, req)
        r["cpu"] = (cpu_seconds(s.server.pid) - before) / max(1, r["requests"])
        return r

    def round(self, s):
        r = {}
        self.results.append(r)
        log("round %d of %d" % (len(self.results), self.rounds))
        # The canned server answers anything: GenerateMac requests, of about the same size.
        self.step(r, "http", self.mhd, B.presign(self.ws.sub("canned.req"), s.ep, s.principal,
                                                 "GenerateMac", s.bodies["mac"]))
        for name, operation, mode, _ in OPS:
            if mode == VERIFY:
                self.step(r, "ref_" + name, self.openssl_verify)
            else:
                self.step(r, "ref_" + name, self.token_mode, s.token, mode)
            self.step(r, name, self.server_run, s, name, operation)


def make_table(results):
    t = B.Table(results)
    t.figure("HTTP: canned 274-byte answer, mhd_canned", lambda r: r["http"]["rps"], rate,
             ref_fn=lambda r: r["http"]["p99"], ref_fmt=lambda v: "p99 " + B.ms(v))
    us = lambda v: "%.0f us" % (v * 1e6)  # noqa: E731
    for name, _, mode, label in OPS:
        ref = lambda r, n=name: r["ref_" + n]["best"]  # noqa: E731
        what = "token" if mode != VERIFY else "OpenSSL"
        t.figure(label, lambda r, n=name: r[n]["rps"], rate, ref_fn=ref,
                 ref_fmt=lambda v, m=mode: "%s %s" % (rate(v), REFERENCE[m]),
                 ratio_fn=lambda r, n=name, f=ref: r[n]["rps"] / f(r),
                 bar=">= %.2f x %s" % (BAR, what), check=lambda v, q: q >= BAR)
        combined = lambda r, f=ref: B.ceiling(r["http"]["rps"], f(r))  # noqa: E731
        t.figure("  combined ceiling 1/(1/HTTP + 1/%s)" % what, combined, rate,
                 ref_fn=lambda r, n=name: (r[n]["p50"], r[n]["p99"]),
                 ref_fmt=lambda v: "p11kmsd p50 %.2f, p99 %.2f ms" % v,
                 ratio_fn=lambda r, n=name, c=combined: r[n]["rps"] / c(r))
        t.figure("  CPU time a request, p11kmsd", lambda r, n=name: r[n]["cpu"], us,
                 ref_fn=lambda r, n=name: r["ref_" + n]["cpu"],
                 ref_fmt=lambda v, w=what: "%s a call, %s" % (us(v), w),
                 ratio_fn=lambda r, n=name: r["ref_" + n]["cpu"] / r[n]["cpu"])
    return t


def main():
    a, started, load_before = B.begin(args_and_harness)
    tools = B.Tools(a, need=("p11_ceiling", "mhd_canned"))
    ws = H.Workspace("p11kms-bench-asym-")
    s = None
    try:
        s = Setup(ws, tools)
        b = AsymBench(a, ws, tools, s.workers)
        log("%d rounds; wrk -t%d -c%d, %g s per run; %g s per p11_ceiling mode and thread count "
            "(%s) and openssl speed half" % (b.rounds, b.wrk_threads, b.connections, b.seconds,
                                             b.short, ", ".join(map(str, b.counts))))
        for _ in range(b.rounds):
            b.round(s)
        server, s = s.server, None
        try:
            server.stop("the asymmetric keys' server")
        except Broken as e:
            b.problems.append(str(e))
        return b.report(make_table(b.results).text(), started, load_before)
    except Broken as e:
        log(str(e))
        return 1
    finally:
        if s is not None:
            s.server.server.kill()
        ws.close()


if __name__ == "__main__":
    sys.exit(main())
