#!/usr/bin/env bash
# Builds p11kms in the source tree (configure once, then make). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x configure ] || ./autogen.sh >/dev/null
# CI turns warnings into errors; a user's newer compiler should not stop the quick start.
[ -f Makefile ] || ./configure ${CI:+--enable-strict} "$@" >/dev/null
make -j"$(nproc)" >/dev/null
