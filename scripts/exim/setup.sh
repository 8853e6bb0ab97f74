#!/bin/bash
# setup.sh [DIR]: unpack Debian 12's Exim (exim4-daemon-light) under DIR/root as a private LMTP
# client for tests/test_exim.py (see /work/shared/EXIM_BDAT.md). Not installed as the system
# MTA: that would remove Postfix, which other tests need. Idempotent; run as root.
# System changes: installs libidn12 and creates the system user/group Debian-exim.
set -euo pipefail
SRC=$(cd "$(dirname "$0")" && pwd)
DIR=${1:-/tmp/lmtp-bridge-exim}
mkdir -p "$DIR/debs"
DIR=$(cd "$DIR" && pwd)
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

if [ -x "$DIR/root/usr/sbin/exim4" ] && getent passwd Debian-exim >/dev/null \
    && dpkg-query -W -f '${Status}' libidn12 2>/dev/null | grep -q 'ok installed' \
    && cmp -s "$SRC/exim.conf" "$DIR/exim.conf.src"; then
    exit 0   # already done
fi
ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1 || $sudo apt-get update -qq
if ! ls "$DIR"/debs/exim4-daemon-light_*.deb >/dev/null 2>&1; then
    chown _apt "$DIR/debs" 2>/dev/null || true          # avoids apt's "unsandboxed" warning
    (cd "$DIR/debs" && apt-get download -q exim4-daemon-light exim4-base >/dev/null) \
        || { $sudo apt-get update -qq; (cd "$DIR/debs" && apt-get download -q exim4-daemon-light exim4-base >/dev/null); }
fi
dpkg-query -W -f '${Status}' libidn12 2>/dev/null | grep -q 'ok installed' \
    || $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libidn12 >/dev/null
getent passwd Debian-exim >/dev/null \
    || $sudo adduser --system --group --quiet --home /var/spool/exim4 --no-create-home \
               --disabled-login --force-badname Debian-exim

rm -rf "$DIR/root"; mkdir -p "$DIR/root"
for d in "$DIR"/debs/*.deb; do dpkg-deb -x "$d" "$DIR/root"; done
chmod u-s "$DIR/root/usr/sbin/exim4"    # root invokes it; deliveries run as Debian-exim
sed -e "s|^EXIM_ROOT = .*|EXIM_ROOT = $DIR/root|" "$SRC/exim.conf" > "$DIR/exim.conf"
chmod 644 "$DIR/exim.conf"
cp "$SRC/exim.conf" "$DIR/exim.conf.src"
"$DIR/root/usr/sbin/exim4" -C "$DIR/exim.conf" -DWORK=/tmp -bV | sed -n 1p
