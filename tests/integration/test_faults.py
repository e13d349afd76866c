#!/usr/bin/python3
"""Token faults (DESIGN §6): p11kmsd on the fault-injecting PKCS#11 module
(tests/faultmod), which forwards to a fresh SoftHSM2 token. Each listed CK_RV
injected into each listed function gives the right AWS error and never a 2xx;
once the fault stops, the next requests succeed without a restart; faults at
random never give a 2xx with a wrong answer; with inline_requests = 0 a hung
token call is answered with 503 by request_timeout_ms while requests that do
not need the token go on; by default (HTTP threads run token calls
themselves) the call caught by a hang waits for the token, the token counts
as slow and every request after it goes to a worker and is answered 503 in
time; /readyz follows the token. TAP output."""

import base64
import os
import sys
import threading
import time

sys.dont_write_bytecode = True  # keep __pycache__ out of the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faultmod  # noqa: E402
import harness as h  # noqa: E402
import promtext  # noqa: E402
from harness import check, eq  # noqa: E402

T = h.TapRunner()
test = T.test

REQUEST_TIMEOUT_MS = 1500
SESSION_TIMEOUT_MS = 500
WORKERS = 3

# The CK_RVs a token answers when it, a session or the login is lost.
FAULTS = ("CKR_DEVICE_ERROR", "CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_CLOSED",
          "CKR_USER_NOT_LOGGED_IN", "CKR_TOKEN_NOT_PRESENT", "CKR_DEVICE_REMOVED")
# Every one of them is KeyUnavailableException (500): the key material could not be used.
EXPECTED = ("KeyUnavailableException", 500)


class Ctx:
    ws = None
    token = None
    principal = None
    server = None
    faults = None
    key = None
    blob = None       # a GenerateDataKey blob made before any fault
    plaintext = None  # its data key
    ep = None
    strict = None  # a second server, inline_requests = 0
    ws_strict = None
    strict_key = None


C = Ctx()


def setup():
    C.ws = h.Workspace()
    C.principal = h.new_principal("faulted")
    C.faults = faultmod.FaultControl(C.ws.sub("faults"))
    C.token, config = h.token_and_config(
        C.ws, "p11kms-it-faults", C.principal, module=faultmod.faultmod_module(),
        request_timeout_ms=str(REQUEST_TIMEOUT_MS), session_timeout_ms=str(SESSION_TIMEOUT_MS),
        workers=str(WORKERS), threads="2", queue_max="8",
        refresh_ms="1000")
    C.server = h.start_config_server(config, C.token, C.ws.sub("p11kmsd.log"),
                                     env=C.faults.env())
    C.ep = C.server.endpoint
    C.key = ok("CreateKey", {})["KeyMetadata"]["KeyId"]
    gdk = ok("GenerateDataKey", {"KeyId": C.key, "KeySpec": "AES_256"})
    C.blob = gdk["CiphertextBlob"]
    C.plaintext = gdk["Plaintext"]
    h.diag("p11kmsd on the fault module, serving %s" % C.ep)


def teardown():
    if C.faults:
        C.faults.clear()
    if C.strict:
        try:
            h.finish(T, C.ws_strict, C.strict)
        finally:
            C.strict = None
    h.finish(T, C.ws, C.server)


def call(op, body, ep=None):
    return h.kms_call(ep or C.ep, op, body, C.principal)


def ok(op, body, ep=None):
    r = call(op, body, ep)
    if r.status != 200:
        raise AssertionError("%s answered %d: %r" % (op, r.status, r.body))
    return r.json()


# The request that makes the token run each function, and how to check its answer.
def req_generate_data_key(ep=None, key=None):
    return call("GenerateDataKey", {"KeyId": key or C.key, "KeySpec": "AES_256"}, ep)


def req_decrypt():
    return call("Decrypt", {"CiphertextBlob": C.blob})


def req_generate_random():
    return call("GenerateRandom", {"NumberOfBytes": 32})


def req_create_key():
    return call("CreateKey", {"Description": "made while the token fails"})


def req_first_use():
    """GenerateDataKey on a key just made: its version is unwrapped from the database first."""
    key = ok("CreateKey", {"Description": "unwrapped at its first use"})["KeyMetadata"]["KeyId"]
    return call("GenerateDataKey", {"KeyId": key, "KeySpec": "AES_256"})


REQUESTS = {
    "C_EncryptInit": ("GenerateDataKey", req_generate_data_key),
    "C_Encrypt": ("GenerateDataKey", req_generate_data_key),
    "C_Decrypt": ("Decrypt", req_decrypt),
    # CreateKey generates the new version in the token, then wraps it under the root key.
    "C_GenerateKey": ("CreateKey", req_create_key),
    "C_WrapKey": ("CreateKey", req_create_key),
    # A version this node has not used yet is unwrapped into a session object first.
    "C_UnwrapKey": ("GenerateDataKey", req_first_use),
    "C_GenerateRandom": ("GenerateRandom", req_generate_random),
}


def answer_is_right(op, r):
    """A 200 answer of op: the exact shape, and a data key that decrypts (checked later)."""
    doc = r.json()
    if op == "GenerateDataKey":
        eq(sorted(doc), ["CiphertextBlob", "KeyId", "Plaintext"], "GenerateDataKey members")
        eq(len(base64.b64decode(doc["Plaintext"])), 32, "data key length")
    elif op == "Decrypt":
        eq(doc["Plaintext"], C.plaintext, "Decrypt gives the data key")
    elif op == "GenerateRandom":
        eq(len(base64.b64decode(doc["Plaintext"])), 32, "random bytes")
    elif op == "CreateKey":
        eq(doc["KeyMetadata"]["KeyState"], "Enabled", "the new key's state")
    return doc


def metrics(ep=None):
    r = h.get_metrics(ep or C.ep)
    eq(r.status, 200, "/metrics status")
    return promtext.parse(r.body.decode())


def token_errors():
    """{rv: p11kms_token_errors_total{rv}} of the live /metrics."""
    out = {}
    for (name, labels), v in metrics().items():
        if name == "p11kms_token_errors_total":
            out[dict(labels)["rv"]] = v
    eq(sorted(FAULTS + ("other",)), sorted(set(FAULTS + ("other",)) & set(out)),
       "p11kms_token_errors_total has a series for each fault and for other")
    return out


@test
def test_each_fault_in_each_function():
    """42 cases: the request fails with KeyUnavailableException (500) while the fault lasts,
    the module saw the injected call, and with the fault gone the next requests succeed."""
    cases = 0
    for fn, (op, request) in REQUESTS.items():
        for rv in FAULTS:
            what = "%s in %s (%s)" % (rv, fn, op)
            before = token_errors()
            C.faults.set(fn, rv=rv)
            for attempt in range(2):
                r = request()
                check(r.status != 200, "%s: answered 200 while the token fails" % what)
                h.check_error_response(r, *EXPECTED)
            injected = C.faults.injected(fn)
            check(injected >= 2, "%s: the module injected %d faults" % (what, injected))
            # p11kms_token_errors_total counts each failed call under its return value.
            after = token_errors()
            eq({k: after[k] - before[k] for k in after if after[k] != before[k]},
               {rv: injected}, "%s: p11kms_token_errors_total's changes" % what)
            C.faults.clear()
            for attempt in range(3):
                r = request()
                if r.status != 200:
                    raise AssertionError("%s: after the fault, attempt %d answered %d %r"
                                         % (what, attempt + 1, r.status, r.body))
                answer_is_right(op, r)
            cases += 1
    eq(cases, len(REQUESTS) * len(FAULTS), "cases run")
    m = metrics()
    check(promtext.value(m, "p11kms_requests_total", operation="GenerateDataKey",
                         outcome="KeyUnavailableException") >= 2 * 2 * len(FAULTS),
          "the failures are counted by outcome")


@test
def test_random_faults_never_give_a_wrong_answer():
    """With C_Encrypt and C_Decrypt failing at random, every 200 is right."""
    C.faults.set("C_Encrypt", rv="CKR_DEVICE_ERROR", probability=0.3)
    made, failed = [], 0
    for i in range(60):
        r = req_generate_data_key()
        if r.status == 200:
            made.append(answer_is_right("GenerateDataKey", r))
        else:
            h.check_error_response(r, *EXPECTED)
            failed += 1
    C.faults.clear()
    C.faults.set("C_Decrypt", rv="CKR_SESSION_HANDLE_INVALID", probability=0.3)
    decrypted, refused = 0, 0
    for doc in made:
        r = call("Decrypt", {"CiphertextBlob": doc["CiphertextBlob"]})
        if r.status == 200:
            eq(r.json()["Plaintext"], doc["Plaintext"], "a Decrypt answered 200 is right")
            decrypted += 1
        else:
            h.check_error_response(r, *EXPECTED)
            refused += 1
    C.faults.clear()
    # what failed while the faults lasted decrypts now
    for doc in made:
        eq(ok("Decrypt", {"CiphertextBlob": doc["CiphertextBlob"]})["Plaintext"], doc["Plaintext"],
           "Decrypt after the faults")
    h.diag("GenerateDataKey: %d answered, %d failed; Decrypt: %d answered, %d failed"
           % (len(made), failed, decrypted, refused))
    check(failed > 0 and made, "faults at 30%% gave both outcomes (%d, %d)" % (len(made), failed))
    check(refused > 0 and decrypted > 0, "faults at 30%% gave both outcomes (%d, %d)"
          % (decrypted, refused))


@test
def test_token_gone_and_back():
    """Every call fails as if the token were removed: requests fail, /readyz says so; when
    it is back, both recover by themselves."""
    C.faults.add("* rv=CKR_DEVICE_REMOVED")
    r = h.raw_request(C.ep, method="GET", path="/readyz")
    eq((r.status, r.body), (503, b"token not ready\n"), "/readyz while the token is gone")
    for request, op in ((req_generate_data_key, "GenerateDataKey"), (req_decrypt, "Decrypt")):
        h.check_error_response(request(), *EXPECTED)
    eq(ok("DescribeKey", {"KeyId": C.key})["KeyMetadata"]["KeyId"], C.key,
       "DescribeKey is served from the index meanwhile")
    eq(promtext.value(metrics(), "p11kms_token_ready"), 0.0, "p11kms_token_ready")
    C.faults.clear()
    r = h.raw_request(C.ep, method="GET", path="/readyz")
    eq((r.status, r.body), (200, b"ready\n"), "/readyz once the token is back")
    for _ in range(2 * WORKERS + 2):  # every session has been dropped: each must recover
        answer_is_right("GenerateDataKey", req_generate_data_key())
        eq(ok("Decrypt", {"CiphertextBlob": C.blob})["Plaintext"], C.plaintext, "Decrypt")
    eq(promtext.value(metrics(), "p11kms_token_ready"), 1.0, "p11kms_token_ready")


def token_calls(function):
    try:
        return promtext.value(metrics(), "p11kms_token_call_seconds_count", function=function)
    except KeyError:
        return 0


@test
def test_lost_holder_session_reunwraps():
    """The session that holds the unwrapped keys is lost (the token says its handle is
    invalid): p11kmsd closes it for real, so its session objects are gone; it opens a new
    one and unwraps each key again at its next use, transparently. Old blobs still open."""
    eq(answer_is_right("GenerateDataKey", req_generate_data_key())["KeyId"].endswith(C.key),
       True, "the key is in use (unwrapped)")
    unwraps = token_calls("C_UnwrapKey")
    # The next look at the holder session (before an unwrap) is told it is gone.
    C.faults.set("C_GetSessionInfo", rv="CKR_SESSION_HANDLE_INVALID", nth=1)
    fresh = req_first_use()
    eq(fresh.status, 200, "a new key's first use after the holder session was lost (%r)"
       % fresh.body)
    eq(C.faults.injected("C_GetSessionInfo"), 1, "the holder session was found lost once")
    C.faults.clear()
    for _ in range(3):
        answer_is_right("GenerateDataKey", req_generate_data_key())
        eq(ok("Decrypt", {"CiphertextBlob": C.blob})["Plaintext"], C.plaintext,
           "Decrypt of a blob made before")
    eq(token_calls("C_UnwrapKey") - unwraps, 2,
       "unwrapped twice: the new key, then the old key once (its handle went with the session)")


def strict_server():
    """A second server on the same fault module (and token faults), configured as
    test_faults's but with inline_requests = 0: every token request goes to a worker.
    Returns its endpoint and a key on it."""
    if C.strict is None:
        ws = h.Workspace()
        C.ws_strict = ws
        token, config = h.token_and_config(
            ws, "p11kms-it-faults-strict", C.principal, module=faultmod.faultmod_module(),
            request_timeout_ms=str(REQUEST_TIMEOUT_MS), session_timeout_ms=str(SESSION_TIMEOUT_MS),
            workers=str(WORKERS), threads="2", queue_max="8", inline_requests="0")
        C.strict = h.start_config_server(config, token, ws.sub("p11kmsd.log"), env=C.faults.env())
        C.strict_key = ok("CreateKey", {}, C.strict.endpoint)["KeyMetadata"]["KeyId"]
        ok("GenerateDataKey", {"KeyId": C.strict_key, "KeySpec": "AES_256"}, C.strict.endpoint)
    return C.strict.endpoint, C.strict_key


def concurrently(n, fn):
    """Runs fn() on n threads at once; returns their (answer, seconds) and the threads."""
    results = [None] * n

    def one(i):
        t0 = time.monotonic()
        r = fn()
        results[i] = (r, time.monotonic() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return results, threads


def describe_key_does_not_wait(key, ep=None):
    """DescribeKey (served from the index) answered in under a second while the token hangs."""
    t0 = time.monotonic()
    eq(ok("DescribeKey", {"KeyId": key}, ep)["KeyMetadata"]["KeyId"], key,
       "DescribeKey while the token hangs")
    check(time.monotonic() - t0 < 1.0, "DescribeKey did not wait for the token")


def all_refused_in_time(results, threads, what):
    """Every one of concurrently()'s requests answered 503 DependencyTimeoutException within
    request_timeout_ms and a second; returns the slowest answer's seconds."""
    for t in threads:
        t.join(timeout=30)
    check(not any(t.is_alive() for t in threads), "every %s was answered" % what)
    bound = REQUEST_TIMEOUT_MS / 1000.0 + 1.0
    for r, took in results:
        h.check_error_response(r, "DependencyTimeoutException", 503)
        check(took < bound, "answered after %.2f s, bound %.1f s" % (took, bound))
    return max(t for _, t in results)


@test
def test_hung_token_answers_503_in_time():
    """inline_requests = 0 and C_Encrypt hangs: every request that needs it gets 503
    DependencyTimeoutException within request_timeout_ms (plus a margin), requests served
    from the index go on, and once the token answers again the server serves normally."""
    ep, key = strict_server()
    C.faults.stall("C_Encrypt")
    results, threads = concurrently(WORKERS + 4, lambda: req_generate_data_key(ep, key))
    C.faults.wait_stalling("C_Encrypt", n=1, timeout=10)
    describe_key_does_not_wait(key, ep)
    slowest = all_refused_in_time(results, threads, "request")
    h.diag("hung token: %d requests answered 503 within %.2f s (bound %.1f s)"
           % (len(results), slowest, REQUEST_TIMEOUT_MS / 1000.0 + 1.0))
    m = metrics(ep)
    check(promtext.value(m, "p11kms_requests_running") >= 1, "requests stuck in the token")
    eq(promtext.value(m, "p11kms_requests_inline"), 0, "no request on an HTTP thread")
    C.faults.clear()
    deadline = time.monotonic() + 10
    while promtext.value(metrics(ep), "p11kms_requests_running") > 0:
        check(time.monotonic() < deadline, "stuck requests end once the token answers")
        time.sleep(0.05)
    for _ in range(2 * WORKERS):
        r = req_generate_data_key(ep, key)
        eq(r.status, 200, "GenerateDataKey after the hang")


@test
def test_hung_token_with_inline_requests():
    """The default (threads 2, so inline_requests 1): the first GenerateDataKey is caught
    inline by a hanging C_Encrypt. A stall time later the token counts as slow, so the
    requests after it go to the workers and get 503 within request_timeout_ms; DescribeKey
    on a new connection is answered at once (one HTTP thread stays free). When the token
    answers, the caught request gets its data key, and a second later requests run inline
    again."""
    C.faults.stall("C_Encrypt")
    caught, caught_threads = concurrently(1, req_generate_data_key)
    C.faults.wait_stalling("C_Encrypt", n=1, timeout=10)
    m = metrics()
    eq(promtext.value(m, "p11kms_requests_inline"), 1, "the request caught on its HTTP thread")
    eq(promtext.value(m, "p11kms_requests_running"), 0, "no worker has it")
    time.sleep(0.4)  # past the stall time, min(request_timeout_ms / 4, 250 ms)
    eq(promtext.value(metrics(), "p11kms_token_slow"), 1, "the token counts as slow")
    describe_key_does_not_wait(C.key)
    results, threads = concurrently(WORKERS + 2, req_generate_data_key)
    slowest = all_refused_in_time(results, threads, "later request")
    check(caught_threads[0].is_alive(), "the caught request waits for the token")
    C.faults.clear()
    caught_threads[0].join(timeout=30)
    r, took = caught[0]
    eq(r.status, 200, "the caught request's answer once the token answers")
    answer_is_right("GenerateDataKey", r)
    h.diag("caught inline for %.2f s; %d later requests answered 503 within %.2f s"
           % (took, len(results), slowest))
    deadline = time.monotonic() + 15
    while True:
        m = metrics()
        if (promtext.value(m, "p11kms_requests_running") == 0 and
                promtext.value(m, "p11kms_token_slow") == 0):
            break
        check(time.monotonic() < deadline, "the workers' stuck calls end and the token is prompt")
        time.sleep(0.05)
    eq(promtext.value(m, "p11kms_requests_inline"), 0, "nothing left on an HTTP thread")
    for _ in range(2 * WORKERS):
        answer_is_right("GenerateDataKey", req_generate_data_key())


@test
def test_overload_fails_fast():
    """More token requests than workers and queue while the token is slow: the excess is
    refused at once with 503, the rest are served."""
    C.faults.stall("C_Encrypt", ms=400)
    n = WORKERS + 8 + 6  # workers busy, queue_max = 8 waiting, the rest refused
    results = [None] * n
    barrier = threading.Barrier(n)

    def one(i):
        barrier.wait(timeout=10)
        t0 = time.monotonic()
        r = req_generate_data_key()
        results[i] = (r, time.monotonic() - t0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    C.faults.clear()
    served = [x for x in results if x[0].status == 200]
    refused = [x for x in results if x[0].status != 200]
    for r, took in refused:
        doc = h.check_error_response(r, "DependencyTimeoutException", 503)
        check(took < REQUEST_TIMEOUT_MS / 1000.0 + 1.0, "a refusal took %.2f s" % took)
        check(doc["message"], "message")
    for r, _ in served:
        answer_is_right("GenerateDataKey", r)
    h.diag("overload: %d served, %d refused with 503" % (len(served), len(refused)))
    check(len(refused) >= 1, "some requests were refused (%d served)" % len(served))
    check(len(served) >= WORKERS, "the workers' requests were served (%d)" % len(served))


if __name__ == "__main__":
    sys.exit(T.run(setup, teardown))
