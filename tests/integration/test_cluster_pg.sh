#!/bin/sh
# tests/integration/test_cluster_pg.py (three p11kmsd nodes on one PostgreSQL, nginx in front,
# a node killed and the database crashed under load) against a throw-away server
# tests/pgserver.sh starts (and stops and removes). A server that cannot start fails this
# test (exit 99), never skips it. P11KMS_CLUSTER_SECONDS: how long the load runs (20).
srcdir=${P11KMS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
exec "$srcdir/tests/pgserver.sh" run /usr/bin/python3 "$srcdir/tests/integration/test_cluster_pg.py"
