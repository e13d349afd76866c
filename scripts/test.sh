#!/usr/bin/env bash
# Quick start: install what is missing, build, and run the whole test suite
# (unit tests and integration tests against a fresh SoftHSM2 token and a real
# p11kmsd on loopback). Ends with a line "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh || exit 1
scripts/build.sh || exit 1
# The JavaScript side of the interop tests, exactly as locked.
[ -d tests/interop/node_modules/jose ] && [ -d tests/interop/node_modules/@aws-sdk/client-kms ] &&
    [ -d tests/interop/node_modules/@aws-crypto/client-node ] ||
    (cd tests/interop && npm ci --no-audit --no-fund --loglevel=error) || exit 1
make -j"$(nproc)" check
status=$?
# Name every test that did not pass, with the end of its log.
for trs in tests/*/*.trs; do
    grep -q '^:test-result: \(FAIL\|ERROR\|XPASS\)' "$trs" 2>/dev/null || continue
    log=${trs%.trs}.log
    echo "--- $log"
    grep '^:test-result: \(FAIL\|ERROR\|XPASS\)' "$trs"
    tail -n 80 "$log"
done
scripts/count-results.sh .
exit $status
