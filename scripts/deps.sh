#!/usr/bin/env bash
# Installs the Debian packages p11kms needs to build, run and test, when missing.
# Idempotent: packages already installed are left alone.
set -euo pipefail

packages=(
    # build
    build-essential autoconf automake libtool pkg-config
    # libraries
    libp11-kit-dev p11-kit libssl-dev libmicrohttpd-dev libgnutls28-dev libjansson-dev libcurl4-openssl-dev libcmocka-dev libsqlite3-dev
    # the database's own tool, for operators and the tests (sqlite3 .dump, integrity_check)
    sqlite3
    # the database of several nodes: libpq to build, a server for the tests
    # (tests/pgserver.sh runs initdb and pg_ctl from /usr/lib/postgresql/*/bin)
    libpq-dev postgresql
    # the development and test token
    softhsm2
    # integration tests: real AWS clients and a PKCS#11 binding
    awscli python3 python3-boto3 python3-pykcs11 python3-prometheus-client python3-jwcrypto python3-cryptography curl openssl
    # fuzzing (make fuzz): clang and its libFuzzer runtime
    clang libclang-rt-dev
    # integration tests with p11kmsd under memcheck (scripts/valgrind-tests.sh)
    valgrind
    # multi-node integration test: two servers on one token behind a load balancer
    nginx
    # the soak's high load and make bench: a load generator replaying signed requests
    wrk
    # operator files checked by the suite: the man pages (groff, man -l), the alert
    # rules and dashboard queries (promtool), the systemd unit (systemd-analyze)
    groff-base man-db prometheus python3-yaml systemd
)

# interop tests: JavaScript JOSE (npm's jose, pinned in tests/interop/package-lock.json)
command -v node >/dev/null && command -v npm >/dev/null || packages+=(nodejs npm)

missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "deps.sh: run as root to install: ${missing[*]}" >&2; exit 1; }
    SUDO=sudo
else
    SUDO=
fi
echo "deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
