#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: the Debian packages of
# scripts/debian-packages.txt (real LMTP peers such as swaks and Postfix), a venv with the test
# extra, then ruff, mypy, every scripts/check-*.sh (e.g. the container image) and pytest.
# Extra arguments go to pytest only, e.g. `./test.sh -k swaks -x` (then no check-*.sh runs).
set -euo pipefail
cd "$(dirname "$0")"

need=()
while read -r package proof; do
    case "$package" in ''|'#'*) continue ;; esac
    if [[ $proof == /* ]]; then [ -e "$proof" ] || need+=("$package")
    else command -v "$proof" >/dev/null || need+=("$package"); fi
done < scripts/debian-packages.txt
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "test.sh: installing Debian packages: ${need[*]}"
    $sudo apt-get update -qq
    # Postfix only for its tools and private test instances: no system configuration, no daemon.
    echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
    # prometheus only for promtool and the private instances of tests/test_monitoring.py: no
    # system daemon (its package starts one where systemd runs)
    if command -v systemctl >/dev/null && [[ " ${need[*]} " == *" prometheus "* ]]; then
        $sudo systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

. ./scripts/venv.sh test

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy bridge
if [ $# -eq 0 ]; then
    for check in scripts/check-*.sh; do
        [ -e "$check" ] || continue
        echo "== $check"
        bash "$check"
    done
fi
echo "== pytest"   # last, so that its summary line closes the run
.venv/bin/python -m pytest "$@"
