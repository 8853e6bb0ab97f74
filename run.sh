#!/usr/bin/env bash
# Run lmtp-bridge from this checkout. With no arguments: `lmtp-bridge demo`, the bridge on
# 127.0.0.1:2424 plus a built-in webhook receiver that prints every delivery.
# With arguments: `./run.sh serve --webhook-url https://...`, `./run.sh send --to a@example.org`, ...
set -euo pipefail
cd "$(dirname "$0")"
. ./scripts/venv.sh ""
if [ $# -eq 0 ]; then
    exec .venv/bin/lmtp-bridge demo
fi
exec .venv/bin/lmtp-bridge "$@"
