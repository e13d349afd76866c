#!/usr/bin/env bash
# Checks for simple mistakes and formatting. Exits non-zero on any finding.
set -uo pipefail
cd "$(dirname "$0")/.."
status=0
files=$(git ls-files 'src/*.c' 'src/*.h' 'include/*.h' 'tests/*.c')

# Banned calls: unbounded string writes.
if grep -nE '\b(strcpy|strcat|sprintf|vsprintf|gets)\s*\(' $files; then
    echo "lint: use snprintf / bounded copies instead" >&2
    status=1
fi
# Secrets compared with memcmp leak timing: tags and signatures use CRYPTO_memcmp.
if grep -nE 'memcmp\([^)]*(tag|sig|mac|secret)' $files | grep -v CRYPTO_memcmp; then
    echo "lint: compare tags, signatures and MACs with CRYPTO_memcmp" >&2
    status=1
fi
# realloc would leave a copy of a secret behind in the freed block.
if grep -nE '\brealloc\s*\(' src/common/buf.c src/common/json_alloc.c; then
    echo "lint: buffers that may hold secrets must not use realloc" >&2
    status=1
fi
# Formatting.
if command -v clang-format >/dev/null; then
    for f in $files; do
        if ! clang-format --dry-run --Werror "$f" >/dev/null 2>&1; then
            echo "lint: $f is not clang-formatted (clang-format -i $f)" >&2
            status=1
        fi
    done
else
    echo "lint: clang-format not installed" >&2
    status=1
fi
exit $status
