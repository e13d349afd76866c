#!/usr/bin/env bash
# Adds up the test results automake's TAP driver left in the .trs files under
# each given build tree and prints "N passed, M failed".
set -euo pipefail
passed=0 failed=0
for dir in "$@"; do
    while IFS= read -r line; do
        case "$line" in
            ":test-result: PASS"*|":test-result: XFAIL"*) passed=$((passed + 1)) ;;
            ":test-result: FAIL"*|":test-result: XPASS"*|":test-result: ERROR"*) failed=$((failed + 1)) ;;
        esac
    done < <(find "$dir" -name '*.trs' -path '*tests*' -exec cat {} + 2>/dev/null)
done
echo "$passed passed, $failed failed"
