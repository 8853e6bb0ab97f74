#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: Debian packages for the real LMTP peers
# (swaks, Postfix's smtp-source), a venv with the test extra, then ruff, mypy and pytest.
# Extra arguments go to pytest, e.g. `./test.sh -k swaks -x`.
set -euo pipefail
cd "$(dirname "$0")"

need=()
command -v swaks >/dev/null || need+=(swaks)
[ -x /usr/sbin/smtp-source ] || need+=(postfix)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "test.sh: installing Debian packages: ${need[*]}"
    $sudo apt-get update -qq
    # Postfix only for its smtp-source and smtp-sink tools: no configuration, no daemon.
    echo "postfix postfix/main_mailer_type select No configuration" | $sudo debconf-set-selections
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi

. ./scripts/venv.sh test

echo "== ruff"
.venv/bin/ruff check .
echo "== mypy"
.venv/bin/mypy bridge
echo "== pytest"
.venv/bin/python -m pytest "$@"
