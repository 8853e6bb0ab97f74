#!/bin/bash
# Install what the benchmark harness needs (Debian 12, as root). Idempotent.
#   postfix (only for /usr/sbin/smtp-source and /usr/sbin/smtp-sink; "No configuration",
#   its master daemon is not started), nginx + echo module (webhook sink), swaks, wrk,
#   and the Python venv $BENCH_VENV (default /tmp/lmtp-bench-venv) with aiosmtpd, httpx, trio.
set -euo pipefail

BENCH_VENV=${BENCH_VENV:-/tmp/lmtp-bench-venv}
need=()
for p in postfix nginx libnginx-mod-http-echo swaks wrk curl; do
    dpkg-query -W -f '${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if ((${#need[@]})); then
    apt-get update
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi
# The packages' own services must not run (no systemd here; policy-rc.d refuses starts anyway).
for f in /run/nginx.pid /var/spool/postfix/pid/master.pid; do
    [[ -s $f ]] && echo "warning: $f exists - a system nginx/postfix may be running" >&2
done
if [[ ! -x $BENCH_VENV/bin/python ]]; then
    python3 -m venv "$BENCH_VENV"
fi
"$BENCH_VENV/bin/pip" install -q aiosmtpd httpx trio
"$BENCH_VENV/bin/python" -c 'import aiosmtpd, httpx, trio; print("venv ok: aiosmtpd", aiosmtpd.__version__, "httpx", httpx.__version__, "trio", trio.__version__)'
