#!/usr/bin/env bash
# Quick start: install what is missing, build, and run the development server
# in the foreground. State (token, PINs, credentials, env) is kept in
# ${P11KMS_STATE_DIR:-.p11kms-dev} and reused on the next start.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
scripts/build.sh
exec ./p11kmsd --dev --state-dir "${P11KMS_STATE_DIR:-$PWD/.p11kms-dev}" "$@"
