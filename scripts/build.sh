#!/usr/bin/env bash
# Builds p11kms in the source tree (configure once, then make). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x configure ] || ./autogen.sh >/dev/null
[ -f Makefile ] || ./configure --enable-strict "$@" >/dev/null
make -j"$(nproc)" >/dev/null
