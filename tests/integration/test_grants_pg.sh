#!/bin/sh
# tests/integration/test_grants.py with both nodes on PostgreSQL (its change feed) against a
# throw-away server tests/pgserver.sh starts (and stops and removes). A server that cannot
# start fails this test (exit 99), never skips it.
srcdir=${P11KMS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
exec "$srcdir/tests/pgserver.sh" run /usr/bin/python3 "$srcdir/tests/integration/test_grants.py"
