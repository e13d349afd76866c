#!/bin/sh
# make-token.sh DIR LABEL
#
# Makes a throw-away SoftHSM2 token for tests: DIR/tokens, DIR/softhsm2.conf
# (from softhsm2.conf.in next to this script), random PINs in DIR/so.pin and
# DIR/user.pin (mode 0600), and a token labelled LABEL in a free slot.
# Prints nothing but errors; exits non-zero on failure.
#
# softhsm2-util only takes PINs as arguments, so they are briefly visible in
# the process list: acceptable for a token that lives as long as one test run.
set -eu

if [ $# -ne 2 ] || [ -z "$1" ] || [ -z "$2" ]; then
    echo "usage: $0 DIR LABEL" >&2
    exit 2
fi
dir=$1
label=$2
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
template=$here/softhsm2.conf.in
util=${SOFTHSM2_UTIL:-softhsm2-util}

[ -r "$template" ] || { echo "$0: cannot read $template" >&2; exit 1; }
command -v "$util" >/dev/null 2>&1 || { echo "$0: $util not found" >&2; exit 1; }

umask 077
mkdir -p -- "$dir/tokens"
dir=$(CDPATH= cd -- "$dir" && pwd)
case $dir in
*'|'* | *'&'* | *'\'*) echo "$0: unsupported characters in $dir" >&2; exit 1 ;;
esac
sed "s|@TOKENDIR@|$dir/tokens|" "$template" > "$dir/softhsm2.conf"

# 32 hex digits (128 bits) each, from the kernel's generator.
random_pin() {
    od -An -N16 -tx1 /dev/urandom | tr -d ' \n'
}
so_pin=$(random_pin)
user_pin=$(random_pin)
[ ${#so_pin} -eq 32 ] && [ ${#user_pin} -eq 32 ] || { echo "$0: cannot make PINs" >&2; exit 1; }
printf '%s\n' "$so_pin" > "$dir/so.pin"
printf '%s\n' "$user_pin" > "$dir/user.pin"
chmod 600 "$dir/so.pin" "$dir/user.pin" "$dir/softhsm2.conf"

SOFTHSM2_CONF=$dir/softhsm2.conf
export SOFTHSM2_CONF
if [ -n "${SOFTHSM_MODULE:-}" ]; then
    set -- --module "$SOFTHSM_MODULE"
else
    set --
fi
# softhsm2-util reports success on stdout and failure on stderr.
"$util" "$@" --init-token --free --label "$label" --so-pin "$so_pin" --pin "$user_pin" >/dev/null
