#!/usr/bin/env bash
# Build the Dockerfile into a local image without a Docker engine and without a registry:
# daemonless podman from Debian's packages, on a Python base image made here with debootstrap
# (python3, venv, pip, ca-certificates: what the Dockerfile's BASE_IMAGE needs). Debian 12 or
# newer, as root. Used by scripts/check-container.sh; also by hand:
#     scripts/podman-build.sh                 # -> localhost/lmtp-bridge:local
#     . <(scripts/podman-build.sh --env)      # podman's private config, to run the image yourself
# Env: IMAGE (localhost/lmtp-bridge:local), WORK (all podman state: /tmp/lmtp-bridge-podman),
#      SUITE (the base image's Debian release: bookworm = Python 3.11, trixie = 3.13),
#      MIRROR (Debian mirror for debootstrap; default: the one apt on this machine uses),
#      STORAGE_DRIVER (overlay or vfs; default overlay when this kernel mounts it).
# Nothing here starts a daemon, touches iptables or writes outside $WORK (except apt-get).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-localhost/lmtp-bridge:local}
WORK=${WORK:-/tmp/lmtp-bridge-podman}
SUITE=${SUITE:-bookworm}
BASE=localhost/lmtp-bridge-base:$SUITE
CONF=$WORK/etc
note() { echo "[podman-build] $*" >&2; }
die() { echo "[podman-build] error: $*" >&2; exit 1; }
start=$SECONDS
elapsed() { echo "$((SECONDS - start)) s"; }

write_config() {
    # Own config files, so the host's podman setup (if any) is neither needed nor changed:
    # runc and cgroupfs (work on hybrid cgroup hosts without systemd), slirp4netns as the default
    # network (root's default bridge network would add iptables rules), ulimits no higher than
    # the host's hard limits (no CAP_SYS_RESOURCE in many CI sandboxes), storage under $WORK.
    mkdir -p "$CONF" "$WORK/tmp"
    local nofile nproc driver=${STORAGE_DRIVER:-}
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    # buildah's RUN steps start with at most 32768 processes: asking for more fails (EPERM)
    [[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
    [[ $nofile == unlimited || $nofile -gt 1048576 ]] && nofile=1048576
    if [[ -z $driver ]]; then
        driver=vfs   # always works; overlay is much faster where the kernel allows it
        local probe=$WORK/overlay-probe
        mkdir -p "$probe"/{lower,upper,work,merged}
        if mount -t overlay overlay \
                -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work" \
                "$probe/merged" 2>/dev/null; then
            umount "$probe/merged"
            driver=overlay
        fi
        rm -rf "$probe"
    fi
    cat >"$CONF/containers.conf" <<EOF
[containers]
netns = "slirp4netns"
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "$WORK/tmp"
EOF
    cat >"$CONF/storage.conf" <<EOF
[storage]
driver = "$driver"
graphroot = "$WORK/storage"
runroot = "$WORK/run"
EOF
    note "podman state in $WORK (storage driver $driver)"
}

if [[ ${1:-} == --env ]]; then   # print the exports that point podman at this config
    echo "export CONTAINERS_CONF=$CONF/containers.conf CONTAINERS_STORAGE_CONF=$CONF/storage.conf"
    exit 0
fi
[[ $(id -u) == 0 ]] || die "run as root (podman's storage, debootstrap and apt-get need it)"

# 1. Tools, from Debian (only the missing ones are installed).
missing=()
for tool in podman:podman runc:runc slirp4netns:slirp4netns debootstrap:debootstrap \
            fuse-overlayfs:fuse-overlayfs catatonit:catatonit uidmap:newuidmap; do
    command -v "${tool#*:}" >/dev/null || missing+=("${tool%%:*}")
done
if ((${#missing[@]})); then
    note "installing Debian packages: ${missing[*]}"
    # waits for another apt/dpkg run to finish rather than failing on its lock
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
fi

write_config
export CONTAINERS_CONF=$CONF/containers.conf CONTAINERS_STORAGE_CONF=$CONF/storage.conf

# 2. The base image, made once per $WORK: a minimal Debian with Python, imported as an image.
apt_mirror() {   # the Debian mirror apt uses on this machine (deb822 or one-line sources)
    local uri
    uri=$(sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' \
              /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -n1 || true)
    if [[ -z $uri ]]; then
        uri=$(grep -hE '^deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
                  2>/dev/null | grep -v security | grep -oE '[a-z]+://[^[:space:]]+' | head -n1 || true)
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}
if ! podman image exists "$BASE"; then
    mirror=${MIRROR:-$(apt_mirror)}
    rootfs=$WORK/rootfs-$SUITE
    log=$WORK/debootstrap.log
    rm -rf "$rootfs"
    note "debootstrap $SUITE (python3, venv, pip) - a few minutes, once per $WORK"
    if ! debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
            "$SUITE" "$rootfs" "$mirror" >"$log" 2>&1; then
        tail -n 15 "$log" | sed -E 's#[a-z]+://[^ /]+#<mirror>#g' >&2   # no mirror host in CI logs
        die "debootstrap $SUITE failed (log: $log)"
    fi
    # Like the python:*-slim images: no apt lists or caches, pip usable in a venv or as root,
    # `python` on PATH. Nothing that names this machine's mirror stays in the image.
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/* \
           "$rootfs"/etc/apt/sources.list "$rootfs"/etc/apt/sources.list.d/*
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    tar -C "$rootfs" --numeric-owner -cf - . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >/dev/null
    rm -rf "$rootfs" "$log"
    note "base image $BASE ready after $(elapsed)"
fi

# 3. The build. chroot isolation (no nested user namespaces needed), the host's network (pip
#    reaches PyPI or the proxy the host uses); the host's CA bundle is mounted for the RUN steps
#    only, so pip trusts what the host trusts. The docker format keeps the HEALTHCHECK.
ca_mount=()
[[ -f /etc/ssl/certs/ca-certificates.crt ]] \
    && ca_mount=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
note "building $IMAGE from Dockerfile (BASE_IMAGE=$BASE)"
podman build --pull=never --isolation chroot --network host --format docker \
    "${ca_mount[@]}" --build-arg BASE_IMAGE="$BASE" \
    --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    -t "$IMAGE" . 2>&1 | sed -E 's#(https?://)[^/ ]+#\1<host>#g' >&2
note "built $IMAGE after $(elapsed)"
