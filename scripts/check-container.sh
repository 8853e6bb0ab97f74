#!/usr/bin/env bash
# The container image, for real: hadolint, then build the Dockerfile with daemonless podman
# (scripts/podman-build.sh: podman from Debian, a Python base image made with debootstrap) and
# run it the way the README says: uid 10001, read-only root filesystem, /tmp a tmpfs, all
# capabilities dropped. Checks the ENTRYPOINT and the venv's imports, /readyz and the HEALTHCHECK
# on the published metrics port, one LMTP delivery through the published LMTP port to a webhook
# receiver in a second container (sharing the bridge's network namespace), the delivery's
# signature, the spool on /tmp, and that SIGTERM stops the bridge with exit code 0.
# Needs root (podman's storage, debootstrap). Nothing outside the repository.
# Env: WORK (podman state, default /tmp/lmtp-bridge-podman), SUITE (base release, bookworm).
set -euo pipefail
cd "$(dirname "$0")/.."
export WORK=${WORK:-/tmp/lmtp-bridge-podman}
export IMAGE=localhost/lmtp-bridge:ci
say() { echo "[check-container] $*"; }
t0=$SECONDS

say "hadolint Dockerfile"
.venv/bin/hadolint Dockerfile

bash scripts/podman-build.sh
eval "$(bash scripts/podman-build.sh --env)"
say "built in $((SECONDS - t0)) s; image user: $(podman image inspect -f '{{.Config.User}}' "$IMAGE")"

# The ENTRYPOINT runs; the venv imports what the bridge and the demo load lazily.
podman run --rm "$IMAGE" --version
podman run --rm --entrypoint python "$IMAGE" -c \
    'import importlib, sys; [importlib.import_module(m) for m in sys.argv[1:]]' \
    bridge.app bridge.demo httpx trio pydantic_settings || { say "FAILED: imports"; exit 1; }

http_get() {   # URL -> body on stdout; fails unless 2xx (no need for curl)
    .venv/bin/python -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())' "$1"
}
free_port() {
    .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
LMTP_PORT=$(free_port)
METRICS_PORT=$(free_port)
BRIDGE=lmtp-bridge-smoke-$$
RECEIVER=lmtp-receiver-smoke-$$
cleanup() { podman rm -f -t 0 "$RECEIVER" "$BRIDGE" >/dev/null 2>&1 || true; }
trap cleanup EXIT
show_logs() {
    echo "--- bridge log"; podman logs "$BRIDGE" 2>&1 | tail -40 || true
    echo "--- receiver log"; podman logs "$RECEIVER" 2>&1 | tail -40 || true
}
fail() { echo "[check-container] FAILED: $*" >&2; show_logs; exit 1; }

# The bridge, hardened as in docker-compose.yml and the Helm chart; every message is spooled
# (SPOOL_THRESHOLD=0), so a delivery proves the spool works on the tmpfs.
podman run -d --name "$BRIDGE" --network slirp4netns \
    -p "127.0.0.1:$LMTP_PORT:2424" -p "127.0.0.1:$METRICS_PORT:9464" \
    --read-only --tmpfs /tmp:rw,nosuid,nodev,size=64m,mode=1777 --read-only-tmpfs=false \
    --cap-drop ALL --security-opt no-new-privileges \
    -v "$PWD/deploy/webhook-secret.example:/run/secrets/webhook_secret:ro" \
    -e LMTP_BRIDGE_WEBHOOK_URL=http://127.0.0.1:8025/hook \
    -e LMTP_BRIDGE_WEBHOOK_SECRET_FILE=/run/secrets/webhook_secret \
    -e LMTP_BRIDGE_SPOOL_THRESHOLD=0 \
    -e LMTP_BRIDGE_HOSTNAME=bridge.smoke.test \
    "$IMAGE" >/dev/null
# The receiver: the same image, the demo receiver of deploy/, in the bridge's network namespace.
podman run -d --name "$RECEIVER" --network "container:$BRIDGE" \
    --read-only --cap-drop ALL --security-opt no-new-privileges \
    -v "$PWD/deploy:/deploy:ro" --entrypoint python "$IMAGE" \
    /deploy/demo_receiver.py --listen 127.0.0.1:8025 --secret-file /deploy/webhook-secret.example \
    >/dev/null

say "user and filesystem"
uid=$(podman exec "$BRIDGE" id -u)
[ "$uid" = 10001 ] || fail "the bridge runs as uid $uid, not 10001"
[ "$(podman inspect -f '{{.HostConfig.ReadonlyRootfs}}' "$BRIDGE")" = true ] || fail "root fs not read-only"
if podman exec "$BRIDGE" python -c 'open("/opt/lmtp-bridge/x", "w")' 2>/dev/null; then
    fail "the root filesystem is writable"
fi
podman exec "$BRIDGE" python -c 'import tempfile; tempfile.TemporaryFile(dir="/tmp").write(b"x")' \
    || fail "/tmp is not writable"

say "/readyz on the published metrics port 127.0.0.1:$METRICS_PORT"
ready=0
for _ in $(seq 1 60); do
    if http_get "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null 2>&1; then ready=1; break; fi
    [ "$(podman inspect -f '{{.State.Running}}' "$BRIDGE")" = true ] || break
    sleep 0.5
done
[ "$ready" = 1 ] || fail "/readyz never answered 200"
say "HEALTHCHECK: $(podman inspect -f '{{json .Config.Healthcheck.Test}}' "$BRIDGE")"
podman healthcheck run "$BRIDGE" || fail "the image's HEALTHCHECK failed"

say "LMTP delivery through the published port 127.0.0.1:$LMTP_PORT"
delivered=0
for _ in $(seq 1 20); do   # until the receiver listens (before that: 451, the mail would wait)
    if out=$(.venv/bin/lmtp-bridge send --server "127.0.0.1:$LMTP_PORT" --subject "container smoke" \
             --to bob@example.org 2>&1); then delivered=1; break; fi
    sleep 0.5
done
echo "$out"
[ "$delivered" = 1 ] && grep -q "250 2.0.0" <<<"$out" || fail "no 250 for the delivery"
rlog=$(podman logs "$RECEIVER" 2>&1)
grep -q "to:          bob@example.org" <<<"$rlog" || fail "the receiver did not get the message"
grep -q "subject:     container smoke" <<<"$rlog" || fail "the receiver did not get the subject"
grep -q "signature:   verified" <<<"$rlog" || fail "the signature (secret from a file) did not verify"
metrics=$(http_get "http://127.0.0.1:$METRICS_PORT/metrics")
grep -q 'lmtp_bridge_recipients_total{result="delivered",route="default",stage="data"} 1.0' <<<"$metrics" \
    || fail "the delivered counter is not 1"

say "SIGTERM"
podman stop -t 30 "$BRIDGE" >/dev/null
code=$(podman inspect -f '{{.State.ExitCode}}' "$BRIDGE")
blog=$(podman logs "$BRIDGE" 2>&1)
grep -q '"draining".*SIGTERM' <<<"$blog" || fail "no 'draining' log line naming SIGTERM"
grep -q '"lmtp-bridge stopped"' <<<"$blog" || fail "no 'lmtp-bridge stopped' log line"
[ "$code" = 0 ] || fail "exit code $code after SIGTERM, not 0"
say "OK in $((SECONDS - t0)) s: uid 10001, read-only root, /readyz, HEALTHCHECK, delivery, signature, SIGTERM -> exit 0"
