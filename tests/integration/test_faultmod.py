#!/usr/bin/python3
"""The fault-injecting PKCS#11 module (tests/faultmod/faultmod.c) on its own,
loaded through PyKCS11 in front of a fresh SoftHSM2 token: calls pass through
untouched; rules fail exactly the calls they name (nth, from, probability, a
wildcard); stalls hold a call for a time or until the rule is cleared without
holding anything else; clearing restores service; P11KMS_FAULTS works; the
statistics count exactly. TAP output.

PyKCS11 keeps the GIL during a PKCS#11 call, so the call that must stay held
while this thread carries on is made through ctypes, which releases it.
"""

import ctypes
import hashlib
import json
import os
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import PyKCS11  # noqa: E402
from PyKCS11 import LowLevel  # noqa: E402

import faultmod as fm  # noqa: E402
import harness as h  # noqa: E402
from faultmod import CKR, Counts  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

LABEL = "faultmod"
AAD = b"p11kms faultmod test"
PLAINTEXT = b"forty-two bytes of plaintext for AES-GCM!!"
OK = CKR["CKR_OK"]
# GCM test case 14 (McGrew & Viega): AES-256, zero key, zero IV, 16 zero bytes, no AAD.
KAT_CIPHERTEXT = bytes.fromhex("cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919")
STALL_TIMEOUT = 10.0


class Ctx:
    module = None
    ws = None
    token = None
    fc = None
    lib = None
    slot = None
    session = None
    key = None
    pid = os.getpid()
    ivs = 0


C = Ctx()


def setup():
    C.module = fm.faultmod_module()
    C.ws = h.Workspace()
    C.token = h.make_token(C.ws.sub("token"), LABEL)
    C.fc = fm.FaultControl(C.ws.sub("faults"))
    for name in ("P11KMS_FAULTS", "P11KMS_FAULT_SEED"):
        os.environ.pop(name, None)
    os.environ.update(C.fc.env())
    os.environ["SOFTHSM2_CONF"] = C.token.conf
    C.lib = PyKCS11.PyKCS11Lib()
    C.lib.load(C.module)
    slots = [s for s in C.lib.getSlotList(tokenPresent=True)
             if C.lib.getTokenInfo(s).label.strip() == LABEL]
    eq(len(slots), 1, "slots holding token %s" % LABEL)
    C.slot = slots[0]
    C.session = C.lib.openSession(C.slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)


def teardown():
    try:
        if C.fc:
            C.fc.clear()  # releases a call still held by a failed test
        if C.session:
            C.session.closeSession()
    finally:
        C.session = None
        C.lib = None  # PyKCS11Lib.__del__: C_Finalize through the module, then dlclose
        if C.ws:
            C.ws.close()


# ---- helpers -----------------------------------------------------------------


def low():
    """The low-level library and the session handle: calls that return the CK_RV."""
    return C.session.lib, C.session.session


def gcm(iv):
    return PyKCS11.AES_GCM_Mechanism(iv, AAD, 128)


def next_iv():
    C.ivs += 1
    return C.ivs.to_bytes(12, "big")


def encrypt_rvs(plaintext, iv):
    """C_EncryptInit, then C_Encrypt twice (the length, then the data), as
    PyKCS11's encrypt does, stopping at the first failure.
    Returns (the CK_RVs in order, the ciphertext or None)."""
    lib, sh = low()
    mech = gcm(iv)
    rvs = [lib.C_EncryptInit(sh, mech.to_native(), C.key)]
    data, out = PyKCS11.ckbytelist(plaintext), PyKCS11.ckbytelist()
    while rvs[-1] == OK and len(rvs) < 3:
        rvs.append(lib.C_Encrypt(sh, data, out))
    return rvs, bytes(out) if rvs[-1] == OK else None


def round_trip(plaintext=PLAINTEXT):
    """An AES-GCM encryption and decryption through PyKCS11 with C.key."""
    iv = next_iv()
    ciphertext = bytes(C.session.encrypt(C.key, plaintext, gcm(iv)))
    eq(len(ciphertext), len(plaintext) + 16, "ciphertext length")
    eq(bytes(C.session.decrypt(C.key, ciphertext, gcm(iv))), plaintext, "decrypted text")


def random_rvs(n, size=16):
    lib, sh = low()
    return [lib.C_GenerateRandom(sh, PyKCS11.ckbytelist([0] * size)) for _ in range(n)]


def session_info_rv():
    lib, sh = low()
    return lib.C_GetSessionInfo(sh, LowLevel.CK_SESSION_INFO())


def stats():
    return C.fc.stats(C.pid)


class FunctionList(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (name, ctypes.c_void_p) for name in fm.FUNCTIONS]


def ctypes_generate_random():
    """C_GenerateRandom from the module's own function list, through ctypes
    (which lets go of the GIL while the call is held)."""
    dll = ctypes.CDLL(C.module)  # the copy PyKCS11 loaded: same state, same SoftHSM2
    fl = ctypes.POINTER(FunctionList)()
    eq(dll.C_GetFunctionList(ctypes.byref(fl)), OK, "C_GetFunctionList")
    proto = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong)
    return proto(fl.contents.C_GenerateRandom)


# ---- tests -------------------------------------------------------------------


@test
def test_pass_through():
    C.fc.clear()
    info = C.lib.getInfo()
    eq((info.manufacturerID.strip(), info.cryptokiVersion), ("SoftHSM", (2, 40)),
       "C_GetInfo answered by SoftHSM2")
    C.session.login(C.token.user_pin())
    eq(C.session.getSessionInfo().state, PyKCS11.CKS_RW_USER_FUNCTIONS, "session state")
    # A known key gives the known answer: the data goes through unchanged.
    kat_key = C.session.createObject([
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
        (PyKCS11.CKA_VALUE, bytes(32)), (PyKCS11.CKA_TOKEN, False),
        (PyKCS11.CKA_ENCRYPT, True), (PyKCS11.CKA_DECRYPT, True)])
    kat = PyKCS11.AES_GCM_Mechanism(bytes(12), b"", 128)
    eq(bytes(C.session.encrypt(kat_key, bytes(16), kat)), KAT_CIPHERTEXT, "GCM test case 14")
    eq(bytes(C.session.decrypt(kat_key, KAT_CIPHERTEXT, kat)), bytes(16), "its decryption")
    C.key = C.session.generateKey([
        (PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_AES),
        (PyKCS11.CKA_VALUE_LEN, 32), (PyKCS11.CKA_TOKEN, False), (PyKCS11.CKA_SENSITIVE, True),
        (PyKCS11.CKA_EXTRACTABLE, False), (PyKCS11.CKA_ENCRYPT, True),
        (PyKCS11.CKA_DECRYPT, True)])
    round_trip()
    eq(stats(), {
        "C_GetInfo": Counts(1, 0, 0, 0),
        "C_Login": Counts(1, 0, 0, 0),
        "C_GetSessionInfo": Counts(1, 0, 0, 0),
        "C_CreateObject": Counts(1, 0, 0, 0),
        "C_GenerateKey": Counts(1, 0, 0, 0),
        "C_EncryptInit": Counts(2, 0, 0, 0),
        "C_Encrypt": Counts(4, 0, 0, 0),
        "C_DecryptInit": Counts(2, 0, 0, 0),
        "C_Decrypt": Counts(4, 0, 0, 0),
    }, "statistics of the pass-through calls")
    info = C.fc.process_stats(C.pid)
    eq((info["pid"], info["serial"], info["bad_lines"], info["error"]),
       (C.pid, C.fc.serial, 0, "-"), "statistics header")


@test
def test_nth_call_fails():
    C.fc.set("C_Encrypt", rv="CKR_DEVICE_ERROR", nth=2)
    first = encrypt_rvs(PLAINTEXT, next_iv())
    eq(first, ([OK, OK, CKR["CKR_DEVICE_ERROR"]], None), "first encryption: 2nd C_Encrypt fails")
    # C_EncryptInit works again: the failed C_Encrypt ended the real operation,
    # as a failure does on a real token (else CKR_OPERATION_ACTIVE).
    iv = next_iv()
    rvs, ciphertext = encrypt_rvs(PLAINTEXT, iv)
    eq(rvs, [OK, OK, OK], "second encryption (C_Encrypt calls 3 and 4)")
    eq(bytes(C.session.decrypt(C.key, ciphertext, gcm(iv))), PLAINTEXT, "its decryption")
    eq(encrypt_rvs(PLAINTEXT, next_iv())[0], [OK, OK, OK], "third encryption")
    eq(stats().get("C_Encrypt"), Counts(6, 1, 0, 0), "C_Encrypt statistics")
    eq(stats().get("C_EncryptInit"), Counts(3, 0, 0, 0), "C_EncryptInit statistics")

    C.fc.set("C_GenerateRandom", rv="CKR_DEVICE_REMOVED", start=3)
    eq(random_rvs(5), [OK, OK] + [CKR["CKR_DEVICE_REMOVED"]] * 3, "C_GenerateRandom from=3")
    eq(stats().get("C_GenerateRandom"), Counts(5, 3, 0, 0), "C_GenerateRandom statistics")
    C.fc.clear()


def digest_rvs(parts):
    """A multi-part SHA-256: C_DigestInit, C_DigestUpdate per part, then
    C_DigestFinal twice (the length, then the digest), stopping at the first
    failure. Returns (the CK_RVs in order, the digest or None)."""
    lib, sh = low()
    mech = PyKCS11.Mechanism(PyKCS11.CKM_SHA256, None)
    rvs = [lib.C_DigestInit(sh, mech.to_native())]
    for part in parts:
        if rvs[-1] == OK:
            rvs.append(lib.C_DigestUpdate(sh, PyKCS11.ckbytelist(part)))
    out = PyKCS11.ckbytelist()
    while rvs[-1] == OK and len(rvs) < len(parts) + 3:
        rvs.append(lib.C_DigestFinal(sh, out))
    return rvs, bytes(out) if rvs[-1] == OK else None


@test
def test_injected_update_and_final_end_the_operation():
    parts = [b"fault", b"module"]
    want = hashlib.sha256(b"faultmodule").digest()
    C.fc.set("C_DigestUpdate", rv="CKR_DEVICE_ERROR", nth=2)
    eq(digest_rvs(parts), ([OK, OK, CKR["CKR_DEVICE_ERROR"]], None), "2nd C_DigestUpdate fails")
    # C_DigestInit works again (else CKR_OPERATION_ACTIVE), and the digest is right.
    eq(digest_rvs(parts), ([OK, OK, OK, OK, OK], want), "the next digest")
    eq(stats().get("C_DigestUpdate"), Counts(4, 1, 0, 0), "C_DigestUpdate statistics")
    C.fc.clear().set("C_DigestFinal", rv="CKR_GENERAL_ERROR", nth=1)
    eq(digest_rvs(parts), ([OK, OK, OK, CKR["CKR_GENERAL_ERROR"]], None), "C_DigestFinal fails")
    eq(digest_rvs(parts), ([OK, OK, OK, OK, OK], want), "the digest after it")
    eq(stats().get("C_DigestInit"), Counts(2, 0, 0, 0), "C_DigestInit statistics")
    C.fc.clear()


@test
def test_probability_one_and_zero():
    C.fc.set("C_Encrypt", rv="CKR_FUNCTION_FAILED", probability=1.0)
    for i in range(5):
        eq(encrypt_rvs(PLAINTEXT, next_iv()), ([OK, CKR["CKR_FUNCTION_FAILED"]], None),
           "encryption %d with probability 1.0" % i)
    eq(stats().get("C_Encrypt"), Counts(5, 5, 0, 0), "C_Encrypt statistics, probability 1.0")
    eq(stats().get("C_EncryptInit"), Counts(5, 0, 0, 0), "C_EncryptInit statistics")

    C.fc.set("C_Encrypt", rv="CKR_FUNCTION_FAILED", probability=0.0)
    for _ in range(5):
        round_trip()
    eq(stats().get("C_Encrypt"), Counts(10, 0, 0, 0), "C_Encrypt statistics, probability 0.0")

    # In between, the counts and the answers agree exactly.
    C.fc.set("C_GenerateRandom", rv="CKR_DEVICE_MEMORY", probability=0.5)
    rvs = random_rvs(200)
    failed = rvs.count(CKR["CKR_DEVICE_MEMORY"])
    eq(failed + rvs.count(OK), 200, "answers other than CKR_OK or CKR_DEVICE_MEMORY")
    eq(stats().get("C_GenerateRandom"), Counts(200, failed, 0, 0), "statistics, probability 0.5")
    check(50 <= failed <= 150, "%d of 200 calls failed with probability 0.5" % failed)
    C.fc.clear()


@test
def test_wildcard_numeric_rv_and_bad_lines():
    C.fc.set("*", rv=0x30)
    eq(random_rvs(1), [CKR["CKR_DEVICE_ERROR"]], "C_GenerateRandom under '*'")
    eq(session_info_rv(), CKR["CKR_DEVICE_ERROR"], "C_GetSessionInfo under '*'")
    eq(encrypt_rvs(PLAINTEXT, next_iv()), ([CKR["CKR_DEVICE_ERROR"]], None), "C_EncryptInit")
    eq(stats(), {"C_GenerateRandom": Counts(1, 1, 0, 0), "C_GetSessionInfo": Counts(1, 1, 0, 0),
                 "C_EncryptInit": Counts(1, 1, 0, 0)}, "statistics under '*'")

    C.fc.clear()
    h.diag("five 'line ignored' messages from p11kms-faultmod on stderr are expected")
    C.fc.add("C_Nope rv=CKR_DEVICE_ERROR")
    C.fc.add("C_GenerateRandom rv=CKR_BOGUS")
    C.fc.add("C_GenerateRandom rv=CKR_OK")
    C.fc.add("C_GenerateRandom nth=2")
    C.fc.add("C_GenerateRandom rv=CKR_DEVICE_ERROR nth=1 prob=0.5")
    C.fc.add("C_GenerateRandom rv=CKR_HOST_MEMORY nth=1  # a comment")
    eq(random_rvs(2), [CKR["CKR_HOST_MEMORY"], OK], "the one good line applies")
    info = C.fc.process_stats(C.pid)
    eq((info["serial"], info["bad_lines"]), (C.fc.serial, 5), "lines refused")
    eq(info["error"], "%s:7: more than one of every, nth=, from=, prob=: prob=0.5" % C.fc.path,
       "last error")
    C.fc.clear()
    eq(C.fc.process_stats(C.pid)["bad_lines"], 5, "no call since the change: old statistics")
    eq(random_rvs(1), [OK], "after clearing")
    eq((C.fc.process_stats(C.pid)["bad_lines"], C.fc.process_stats(C.pid)["error"]), (0, "-"),
       "bad lines once the file is good again")


@test
def test_timed_stall():
    C.fc.stall("C_GenerateRandom", ms=400)
    t0 = time.monotonic()
    eq(len(C.session.generateRandom(16)), 16, "random bytes after the stall")
    took = time.monotonic() - t0
    check(0.4 <= took < 5, "C_GenerateRandom took %.3f s with stall=400" % took)
    eq(stats().get("C_GenerateRandom"), Counts(1, 0, 1, 0), "statistics, stall then forward")

    C.fc.stall("C_GenerateRandom", ms=200, rv="CKR_DEVICE_ERROR")
    t0 = time.monotonic()
    eq(random_rvs(1), [CKR["CKR_DEVICE_ERROR"]], "stall, then the injected rv")
    took = time.monotonic() - t0
    check(0.2 <= took < 5, "C_GenerateRandom took %.3f s with stall=200" % took)
    eq(stats().get("C_GenerateRandom"), Counts(1, 1, 1, 0), "statistics, stall then fail")
    C.fc.clear()


@test
def test_stall_until_cleared():
    generate_random = ctypes_generate_random()
    other = C.lib.openSession(C.slot, PyKCS11.CKF_SERIAL_SESSION)
    result = {}

    def held_call():
        buf = ctypes.create_string_buffer(32)
        rv = generate_random(other.session.value(), buf, 32)
        result.update(rv=rv, returned=time.monotonic(), size=len(buf.raw))

    C.fc.stall("C_GenerateRandom")
    thread = threading.Thread(target=held_call, daemon=True)
    thread.start()
    try:
        C.fc.wait_stalling("C_GenerateRandom", 1, timeout=STALL_TIMEOUT, pid=C.pid)
        # Nothing else waits for the held call: a whole round trip goes through.
        t0 = time.monotonic()
        round_trip()
        took = time.monotonic() - t0
        check(took < 5, "a round trip took %.3f s while C_GenerateRandom was held" % took)
        time.sleep(0.3)
        check(thread.is_alive(), "C_GenerateRandom returned before the rule was cleared: %r"
              % result)
        eq(stats().get("C_GenerateRandom"), Counts(1, 0, 1, 1), "statistics while held")
        cleared = time.monotonic()
        C.fc.clear()
        thread.join(STALL_TIMEOUT)
        check(not thread.is_alive(), "C_GenerateRandom still held %.0f s after the rule was "
              "cleared" % STALL_TIMEOUT)
    finally:
        if thread.is_alive():
            C.fc.clear()
            thread.join(STALL_TIMEOUT)
        other.closeSession()
    eq((result["rv"], result["size"]), (OK, 32), "the held call's answer")
    waited = result["returned"] - cleared
    check(0 <= waited < 2, "C_GenerateRandom returned %.3f s after the rule was cleared" % waited)
    eq(C.fc.stalling("C_GenerateRandom", pid=C.pid), 0, "calls held after the release")


@test
def test_clear_restores_service():
    C.fc.set("C_Encrypt", rv="CKR_DEVICE_ERROR")
    C.fc.set("C_Decrypt", rv="CKR_SESSION_HANDLE_INVALID")
    C.fc.set("C_GenerateRandom", rv="CKR_TOKEN_NOT_PRESENT")
    eq(encrypt_rvs(PLAINTEXT, next_iv()), ([OK, CKR["CKR_DEVICE_ERROR"]], None), "encryption")
    eq(random_rvs(2), [CKR["CKR_TOKEN_NOT_PRESENT"]] * 2, "C_GenerateRandom")
    eq(stats(), {"C_EncryptInit": Counts(1, 0, 0, 0), "C_Encrypt": Counts(1, 1, 0, 0),
                 "C_GenerateRandom": Counts(2, 2, 0, 0)}, "statistics with the rules")
    C.fc.clear()
    round_trip()
    eq(random_rvs(3), [OK] * 3, "C_GenerateRandom after clearing")
    eq(session_info_rv(), OK, "C_GetSessionInfo after clearing")
    eq(stats(), {"C_EncryptInit": Counts(1, 0, 0, 0), "C_Encrypt": Counts(2, 0, 0, 0),
                 "C_DecryptInit": Counts(1, 0, 0, 0), "C_Decrypt": Counts(2, 0, 0, 0),
                 "C_GenerateRandom": Counts(3, 0, 0, 0), "C_GetSessionInfo": Counts(1, 0, 0, 0)},
       "statistics after clearing")


CHILD = r"""
import json, os, sys
import PyKCS11
from PyKCS11 import LowLevel
lib = PyKCS11.PyKCS11Lib()
try:
    lib.load(sys.argv[1])
except PyKCS11.PyKCS11Error as e:
    print(json.dumps({"load": e.value}))
    sys.exit(0)
slot = [s for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.strip() == sys.argv[2]][0]
session = lib.openSession(slot)
low, sh = session.lib, session.session
out = {"load": 0,
       "random": [low.C_GenerateRandom(sh, PyKCS11.ckbytelist([0] * 8)) for _ in range(3)],
       "info": low.C_GetSessionInfo(sh, LowLevel.CK_SESSION_INFO())}
session.closeSession()
print(json.dumps(out))
"""


def run_child(extra_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("P11KMS_FAULT")}
    env.update(SOFTHSM2_CONF=C.token.conf, P11KMS_FAULT_TARGET=fm.SOFTHSM_MODULE)
    env.update(extra_env)
    r = subprocess.run(["/usr/bin/python3", "-c", CHILD, C.module, LABEL], env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    eq(r.returncode, 0, "child status (stderr %r)" % r.stderr)
    return json.loads(r.stdout), r.stderr.decode("utf-8", "replace")


@test
def test_rules_from_environment():
    out, err = run_child({"P11KMS_FAULTS": "C_GenerateRandom rv=CKR_DEVICE_MEMORY nth=2;"
                                           " C_GetSessionInfo rv=CKR_SESSION_CLOSED"})
    eq(out, {"load": OK, "random": [OK, CKR["CKR_DEVICE_MEMORY"], OK],
             "info": CKR["CKR_SESSION_CLOSED"]}, "answers under P11KMS_FAULTS")
    eq(err, "", "child's stderr")
    out, err = run_child({"P11KMS_FAULTS": "C_GenerateRandom stall; C_GetSessionInfo rv=0x31"})
    eq(out, {"load": OK, "random": [OK, OK, OK], "info": CKR["CKR_DEVICE_MEMORY"]},
       "a stall without end is refused in P11KMS_FAULTS")
    eq(err, "p11kms-faultmod: P11KMS_FAULTS:1: a stall without end cannot be cleared in "
            "P11KMS_FAULTS (line ignored)\n", "child's stderr")
    out, err = run_child({"P11KMS_FAULT_TARGET": C.ws.sub("no-such-module.so")})
    eq(out, {"load": CKR["CKR_GENERAL_ERROR"]}, "loading with a missing target")
    check(err.startswith("p11kms-faultmod: cannot load %s: " % C.ws.sub("no-such-module.so")),
          "child's stderr: %r" % err)


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
