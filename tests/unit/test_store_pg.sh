#!/bin/sh
# tests/unit/test_store on PostgreSQL: the same suite, plus the engine's own tests, against a
# throw-away server tests/pgserver.sh starts (and stops and removes). A server that cannot
# start fails this test (exit 99), never skips it.
srcdir=${P11KMS_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
builddir=${P11KMS_BUILDDIR:-$(pwd)}
P11KMS_TEST_ENGINE=postgresql
export P11KMS_TEST_ENGINE
exec "$srcdir/tests/pgserver.sh" run "$builddir/tests/unit/test_store"
