# lmtp-bridge container image. Build: docker build -t lmtp-bridge .
# Any Debian-like image with python3 (>= 3.11), its venv module and useradd works as the base:
#   docker build --build-arg BASE_IMAGE=python:3.11-slim-bookworm -t lmtp-bridge .
ARG BASE_IMAGE=python:3.13-slim-trixie

# ---- builder: the project and its dependencies in a venv at the path it runs from ----
FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/lmtp-bridge
WORKDIR /src
COPY pyproject.toml README.md ./
COPY bridge ./bridge
# pip byte-compiles everything here: the runtime's root filesystem is read-only.
RUN /opt/lmtp-bridge/bin/pip install . \
    && /opt/lmtp-bridge/bin/pip uninstall --yes pip \
    && /opt/lmtp-bridge/bin/lmtp-bridge --version

# ---- runtime: the base image, the venv, a numeric non-root user ----
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="lmtp-bridge" \
      org.opencontainers.image.description="LMTP server (RFC 2033) that POSTs each recipient's copy of a message to an HTTP webhook" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.source="https://github.com/lmtp-bridge/lmtp-bridge" \
      org.opencontainers.image.documentation="https://github.com/lmtp-bridge/lmtp-bridge/blob/main/docs/deploy.md"
RUN groupadd --gid 10001 lmtp-bridge \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin lmtp-bridge
COPY --from=builder /opt/lmtp-bridge /opt/lmtp-bridge
# Inside a container the bridge listens on every interface; the spool (spool_dir unset) is
# the temp dir: mount a tmpfs at /tmp and run with a read-only root filesystem.
ENV PATH=/opt/lmtp-bridge/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LMTP_BRIDGE_LISTEN=0.0.0.0:2424 \
    LMTP_BRIDGE_METRICS_LISTEN=0.0.0.0:9464 \
    LMTP_BRIDGE_LOG_FORMAT=json
USER 10001:10001
WORKDIR /tmp
EXPOSE 2424 9464
# No curl in the image: the venv's python asks /healthz on the configured metrics port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('LMTP_BRIDGE_METRICS_LISTEN', ':9464').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=4)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["lmtp-bridge"]
CMD ["serve"]
