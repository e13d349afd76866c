"""Drives the fault-injecting PKCS#11 module (tests/faultmod/faultmod.c) from
integration tests: writes its control file and reads the statistics it writes
next to it. The control syntax and the exact meaning of each count are in the
header comment of faultmod.c.

    fc = FaultControl(ws.sub("faults"))      # an empty control file
    env.update(fc.env())                     # for p11kmsd, or os.environ before loading
    # module = faultmod_module() in the p11kmsd configuration
    fc.set("C_Encrypt", rv="CKR_DEVICE_ERROR", nth=3)
    fc.set("C_Decrypt", rv="CKR_SESSION_HANDLE_INVALID", probability=0.25)
    fc.stall("C_FindObjectsInit", ms=2000)   # ms=None: until the rule is cleared
    fc.clear("C_FindObjectsInit")            # or fc.clear() for every rule
    fc.calls("C_Encrypt"), fc.injected("C_Encrypt")

Each write replaces the file atomically and carries a new serial, so the
module restarts its counts (rules and statistics) on its next call after the
write. Counts are therefore "since the last change", and a process that has
made no call since then has counts of zero, which is what the readers here
return for it.
"""

import collections
import os
import time
import uuid

SOFTHSM_MODULE = os.environ.get("SOFTHSM_MODULE") or "/usr/lib/softhsm/libsofthsm2.so"

# The CK_RVs the tests use most, by name (the module knows more names).
CKR = {
    "CKR_OK": 0x00,
    "CKR_HOST_MEMORY": 0x02,
    "CKR_GENERAL_ERROR": 0x05,
    "CKR_FUNCTION_FAILED": 0x06,
    "CKR_DEVICE_ERROR": 0x30,
    "CKR_DEVICE_MEMORY": 0x31,
    "CKR_DEVICE_REMOVED": 0x32,
    "CKR_OPERATION_ACTIVE": 0x90,
    "CKR_OPERATION_NOT_INITIALIZED": 0x91,
    "CKR_SESSION_CLOSED": 0xB0,
    "CKR_SESSION_HANDLE_INVALID": 0xB3,
    "CKR_TOKEN_NOT_PRESENT": 0xE0,
    "CKR_USER_NOT_LOGGED_IN": 0x101,
}

# CK_FUNCTION_LIST of PKCS#11 2.40 after its version, in order (for ctypes).
FUNCTIONS = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo", "C_InitToken",
    "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession", "C_CloseAllSessions",
    "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState", "C_Login", "C_Logout",
    "C_CreateObject", "C_CopyObject", "C_DestroyObject", "C_GetObjectSize", "C_GetAttributeValue",
    "C_SetAttributeValue", "C_FindObjectsInit", "C_FindObjects", "C_FindObjectsFinal",
    "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate", "C_EncryptFinal", "C_DecryptInit",
    "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal", "C_DigestInit", "C_Digest",
    "C_DigestUpdate", "C_DigestKey", "C_DigestFinal", "C_SignInit", "C_Sign", "C_SignUpdate",
    "C_SignFinal", "C_SignRecoverInit", "C_SignRecover", "C_VerifyInit", "C_Verify",
    "C_VerifyUpdate", "C_VerifyFinal", "C_VerifyRecoverInit", "C_VerifyRecover",
    "C_DigestEncryptUpdate", "C_DecryptDigestUpdate", "C_SignEncryptUpdate",
    "C_DecryptVerifyUpdate", "C_GenerateKey", "C_GenerateKeyPair", "C_WrapKey", "C_UnwrapKey",
    "C_DeriveKey", "C_SeedRandom", "C_GenerateRandom", "C_GetFunctionStatus", "C_CancelFunction",
    "C_WaitForSlotEvent",
)

Counts = collections.namedtuple("Counts", "calls injected stalled stalling")
ZERO = Counts(0, 0, 0, 0)


def faultmod_module():
    """The module's path: $P11KMS_FAULTMOD, which `make check` sets."""
    path = os.environ.get("P11KMS_FAULTMOD")
    if not path or not os.path.isfile(path):
        raise RuntimeError("the fault module is not built or P11KMS_FAULTMOD is not set (%r)"
                           % path)
    return path


def _rv_word(rv):
    if isinstance(rv, int):
        if rv == 0:
            raise ValueError("rv=CKR_OK cannot be injected")
        return "rv=0x%x" % rv
    if not isinstance(rv, str) or not rv.startswith("CKR_") or rv == "CKR_OK":
        raise ValueError("rv must be a CKR_ name other than CKR_OK, or a number: %r" % (rv,))
    return "rv=" + rv


def _trigger_words(nth, probability, start):
    given = [w for w in (nth is not None and "nth=%d" % nth,
                         probability is not None and "prob=%r" % float(probability),
                         start is not None and "from=%d" % start) if w]
    if len(given) > 1:
        raise ValueError("give at most one of nth, probability, start")
    if nth is not None and nth < 1 or start is not None and start < 1:
        raise ValueError("nth and start count from 1")
    if probability is not None and not 0.0 <= probability <= 1.0:
        raise ValueError("probability must be from 0 to 1")
    return given


class FaultControl:
    """One control file; its rules are kept here and written out whole."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.serial = None
        self._rules = []        # (function, line), in file order
        self._count = 0
        self._prefix = uuid.uuid4().hex[:12]
        self._write()

    def env(self, target=None):
        """The variables that point the module at this file and at its target."""
        return {"P11KMS_FAULT_CONTROL": self.path,
                "P11KMS_FAULT_TARGET": target or SOFTHSM_MODULE}

    # ---- rules ----

    def set(self, fn, rv, nth=None, probability=None, start=None):
        """fn fails with rv: on the nth call only, with a probability, from the
        start-th call on, or (none given) on every call. Replaces fn's rule."""
        return self._put(fn, [_rv_word(rv)] + _trigger_words(nth, probability, start))

    def stall(self, fn, ms=None, rv=None, nth=None, probability=None, start=None):
        """fn's calls wait ms milliseconds (ms=None: until this rule is cleared),
        then go on to the token, or fail with rv when one is given."""
        words = [_rv_word(rv)] if rv is not None else []
        words += _trigger_words(nth, probability, start)
        words.append("stall" if ms is None else "stall=%d" % ms)
        return self._put(fn, words)

    def add(self, line):
        """Appends a raw line (for rules the methods do not spell, or bad ones)."""
        self._rules.append((None, line))
        self._write()
        return self

    def clear(self, fn=None):
        """Removes fn's rules, or every rule."""
        self._rules = [r for r in self._rules if fn is not None and r[0] != fn]
        self._write()
        return self

    def _put(self, fn, words):
        self._rules = [r for r in self._rules if r[0] != fn]
        self._rules.append((fn, " ".join([fn] + words)))
        self._write()
        return self

    def _write(self):
        self._count += 1
        self.serial = "%s-%d" % (self._prefix, self._count)
        text = "serial %s\n# written by tests/integration/faultmod.py\n" % self.serial
        text += "".join(line + "\n" for _, line in self._rules)
        tmp = "%s.new.%d" % (self.path, os.getpid())
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self.path)

    # ---- statistics ----

    def stats_files(self):
        """{pid: path} of every process that wrote statistics for this file."""
        folder, base = os.path.split(self.path)
        prefix = base + ".stats."
        out = {}
        for name in os.listdir(folder):
            rest = name[len(prefix):]
            if name.startswith(prefix) and rest.isdigit():
                out[int(rest)] = os.path.join(folder, name)
        return out

    def process_stats(self, pid):
        """The parsed statistics file of one process: a dict with pid, serial,
        loads, bad_lines, error and functions ({name: Counts}); None if the
        process wrote none."""
        path = self.stats_files().get(pid)
        if path is None:
            return None
        info = {"functions": {}}
        with open(path) as f:
            for line in f:
                key, _, rest = line.rstrip("\n").partition(" ")
                if key.startswith("C_"):
                    fields = dict(w.split("=", 1) for w in rest.split())
                    info["functions"][key] = Counts(*(int(fields[k]) for k in Counts._fields))
                elif key in ("pid", "loads", "bad_lines"):
                    info[key] = int(rest)
                else:
                    info[key] = rest
        return info

    def stats(self, pid=None):
        """{function: Counts} since the current version of the file, summed over
        every process (or for one pid). A process whose statistics still name
        an older serial has made no call since: its counts are zero, but for
        the "stalling" gauge."""
        total = {}
        pids = [pid] if pid is not None else list(self.stats_files())
        for p in pids:
            info = self.process_stats(p)
            if info is None:
                continue
            current = info.get("serial") == self.serial
            for fn, c in info["functions"].items():
                if not current:
                    c = Counts(0, 0, 0, c.stalling)
                total[fn] = Counts(*(a + b for a, b in zip(total.get(fn, ZERO), c)))
        return total

    def counts(self, fn, pid=None):
        return self.stats(pid).get(fn, ZERO)

    def calls(self, fn, pid=None):
        return self.counts(fn, pid).calls

    def injected(self, fn, pid=None):
        return self.counts(fn, pid).injected

    def stalled(self, fn, pid=None):
        return self.counts(fn, pid).stalled

    def stalling(self, fn, pid=None):
        return self.counts(fn, pid).stalling

    def wait_stalling(self, fn, n=1, timeout=10.0, pid=None):
        """Waits until n calls of fn are held by a stall; returns the time
        waited. Raises AssertionError after timeout seconds."""
        t0 = time.monotonic()
        while self.stalling(fn, pid) < n:
            if time.monotonic() - t0 > timeout:
                raise AssertionError("%d call(s) of %s not stalled after %.1f s (stats %r)"
                                     % (n, fn, timeout, self.stats(pid)))
            time.sleep(0.01)
        return time.monotonic() - t0
