#!/usr/bin/env bash
# A throw-away PostgreSQL server for the tests (DESIGN §5: "PostgreSQL tests start a real
# server"): initdb into a fresh temporary folder, pg_ctl start on 127.0.0.1 and a free port,
# one database, password authentication; stopped and removed at the end, failure included.
#
#   pgserver.sh run COMMAND [ARG...]   start a server, run COMMAND with
#                                      P11KMS_TEST_PG_URL   postgresql://p11kms:PASSWORD@127.0.0.1:PORT/p11kms
#                                      P11KMS_TEST_PG_DIR   the server's folder (for the two below)
#                                      P11KMS_TEST_PG_SERVER this script
#                                      then stop and remove it; exits with COMMAND's status,
#                                      or 99 (a hard error) when the server cannot start
#   pgserver.sh crash DIR              stop it as a crash would (pg_ctl stop -m immediate)
#   pgserver.sh start DIR              start it again, on the same port
#
# initdb refuses to run as root: as root the server runs as the postgres system user (or
# nobody), which owns the folder. PG_BIN names PostgreSQL's bin folder (default: the newest
# /usr/lib/postgresql/*/bin). A server that cannot start is an error, never a skip.
set -euo pipefail

fail() {
    echo "pgserver.sh: $*" >&2
    exit 99
}

pg_bin() {
    if [ -n "${PG_BIN:-}" ]; then
        echo "$PG_BIN"
        return
    fi
    local newest
    newest=$(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
    [ -d "$newest" ] || fail "PostgreSQL's server is not installed (Debian: apt-get install postgresql)"
    echo "$newest"
}

# Runs a PostgreSQL program as the folder's owner: the postgres user (or nobody) under root.
as_owner() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "$(owner)" -- "$@"
    else
        "$@"
    fi
}

owner() {
    if getent passwd postgres >/dev/null; then echo postgres; else echo nobody; fi
}

# Waits up to 120 s for the server to accept connections: a loaded CI machine can take
# far longer than an idle one to start a fresh cluster.
pg_start() {
    local dir=$1
    as_owner "$(pg_bin)/pg_ctl" -D "$dir/data" -l "$dir/log" -w -t 120 start >/dev/null
}

pg_crash() {
    local dir=$1
    as_owner "$(pg_bin)/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null
}

# A port nobody listens on (the server's own bind is the final check).
free_port() {
    local port
    for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return
        fi
    done
    fail "no free port found"
}

cmd_run() {
    [ $# -ge 1 ] || fail "usage: pgserver.sh run COMMAND [ARG...]"
    local bin password port started=0
    bin=$(pg_bin)
    if ! { [ -x "$bin/initdb" ] && [ -x "$bin/pg_ctl" ] && [ -x "$bin/psql" ]; }; then
        fail "initdb, pg_ctl or psql missing in $bin"
    fi
    # Global: the EXIT trap reads it.
    dir=$(mktemp -d "${TMPDIR:-/tmp}/p11kms-pg-XXXXXX")
    # Stopped and removed however this ends.
    trap 'pg_crash "$dir" 2>/dev/null || true; rm -rf "$dir"' EXIT
    trap 'exit 130' INT TERM
    [ "$(id -u)" -ne 0 ] || chown "$(owner)" "$dir"
    chmod 700 "$dir"
    password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    (umask 077 && echo "$password" >"$dir/pwfile")
    [ "$(id -u)" -ne 0 ] || chown "$(owner)" "$dir/pwfile"
    as_owner "$bin/initdb" -D "$dir/data" -U p11kms --pwfile="$dir/pwfile" -A scram-sha-256 \
        -E UTF8 --no-locale --no-sync --no-instructions >"$dir/initdb.log" 2>&1 ||
        { cat "$dir/initdb.log" >&2; fail "initdb failed"; }
    rm -f "$dir/pwfile"
    for _ in 1 2 3; do
        port=$(free_port)
        # Loopback only, the socket in the folder. fsync off: a commit reaches the kernel,
        # not the disk, which survives the server's crash (pg_ctl stop -m immediate), not the
        # machine's. synchronous_commit stays on: a crash must not lose what was committed.
        cat >>"$dir/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
fsync = off
full_page_writes = off
max_connections = 60
shared_buffers = 16MB
EOF
        if pg_start "$dir" 2>>"$dir/pg_ctl.log"; then
            started=1
            break
        fi
        # A start that timed out may leave a postmaster behind, which would refuse the
        # next attempt (its lock file): stop it first.
        pg_crash "$dir" 2>/dev/null || true
    done
    if [ "$started" -ne 1 ]; then
        cat "$dir/pg_ctl.log" >&2 || true
        tail -n 20 "$dir/log" >&2 || true
        fail "the server did not start"
    fi
    PGPASSWORD=$password "$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U p11kms \
        -d postgres -c "CREATE DATABASE p11kms" >/dev/null || fail "CREATE DATABASE failed"
    export P11KMS_TEST_PG_URL="postgresql://p11kms:$password@127.0.0.1:$port/p11kms"
    export P11KMS_TEST_PG_DIR=$dir
    export P11KMS_TEST_PG_SERVER
    P11KMS_TEST_PG_SERVER=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
    local status=0
    "$@" || status=$?
    exit "$status"
}

case "${1:-}" in
run)
    shift
    cmd_run "$@"
    ;;
crash)
    [ $# -eq 2 ] || fail "usage: pgserver.sh crash DIR"
    pg_crash "$2"
    ;;
start)
    [ $# -eq 2 ] || fail "usage: pgserver.sh start DIR"
    pg_start "$2"
    ;;
*)
    fail "usage: pgserver.sh run COMMAND [ARG...] | crash DIR | start DIR"
    ;;
esac
