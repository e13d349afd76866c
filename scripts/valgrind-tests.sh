#!/usr/bin/env bash
# Runs integration tests with every p11kmsd they start under valgrind memcheck
# (through the harness's P11KMS_SERVER_WRAPPER). Any invalid read or write, use
# of uninitialised memory, bad free, or definite/indirect leak makes p11kmsd
# exit 99 instead of 0 at SIGTERM, which fails the test that stops it; the
# report is in the test's log. Writes OUT/tests/<test>.log and .trs (automake's
# form, for scripts/count-results.sh). Run from a built tree.
# Usage: scripts/valgrind-tests.sh OUT [TEST ...]   (default: the list below)
set -uo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: valgrind-tests.sh OUT [TEST ...]}
shift
# Left out: test_crash and test_multinode, whose kill -9 loop and 2 s
# propagation bound assume native speed (under valgrind a kill can land before
# an alias is ever made, and propagation takes longer than the bound), and
# test_soak, which measures RSS. Every request path runs in the others.
tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=(kms dev lifecycle policy audit bad_input faults limits tls
    client cli interop_aws jwe_interop interop_js)

command -v valgrind >/dev/null || { echo "valgrind-tests.sh: valgrind is not installed" >&2; exit 1; }
mkdir -p "$out/tests"
export P11KMSD=$top/p11kmsd P11KMS_SRCDIR=$top
export SOFTHSM_MODULE=${SOFTHSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
export P11KMS_FAULTMOD=$top/tests/faultmod/.libs/libp11kms-faultmod.so
export P11KMS_AUDIT=$top/p11kms-audit P11KMS_AUDIT_WRITER=$top/tests/unit/audit_writer
export P11KMS_CLIENT_DRIVER=$top/tests/client/driver P11KMS_CLI=$top/p11kms
export P11KMS_JWE_TOOL=$top/tests/unit/jwe_tool P11KMS_SEAL_OPEN=$top/examples/seal_open
export P11KMS_SERVER_WRAPPER="valgrind --quiet --error-exitcode=99 --leak-check=full
    --show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect
    --num-callers=30"

status=0
for t in "${tests[@]}"; do
    log=$out/tests/test_$t.log
    started=$(date +%s)
    /usr/bin/python3 "$top/tests/integration/test_$t.py" >"$log" 2>&1
    rc=$?
    sed -n 's/^ok .*# SKIP.*/:test-result: SKIP/p; t; s/^ok .*/:test-result: PASS/p;
            s/^not ok .*/:test-result: FAIL/p; s/^Bail out!.*/:test-result: ERROR/p' \
        "$log" >"${log%.log}.trs"
    # A run that failed without a "not ok" line (set-up, a crash) still counts once.
    [ "$rc" -eq 0 ] || grep -q "^not ok" "$log" || echo ":test-result: ERROR" >>"${log%.log}.trs"
    printf '%-12s %3d passed, %d failed, exit %d, %ds\n' "$t" "$(grep -c '^ok' "$log")" \
        "$(grep -c '^not ok' "$log")" "$rc" $(($(date +%s) - started))
    if [ "$rc" -ne 0 ] || grep -q "^not ok\|==[0-9]*== " "$log"; then
        status=1
        echo "--- $log"
        grep -B2 -A30 "==[0-9]*== \|^not ok" "$log" | head -n 80
    fi
done
exit $status
