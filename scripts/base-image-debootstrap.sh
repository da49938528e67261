#!/usr/bin/env bash
# A stand-in for the Dockerfile's base image (python:3.11-slim-bookworm) where Docker Hub cannot be
# reached but a Debian mirror can (air-gapped builders; this project's development machines): Debian
# bookworm (minbase) with its Python 3.11, the headers triton's launcher compiles against, and a
# virtual environment at /usr/local, so that `pip` and `python` are on PATH as in the python image.
# The host's CA bundle goes in and pip uses it (PIP_CERT), for builders behind a TLS-inspecting proxy.
# Needs root, debootstrap and podman (or docker: set CONTAINER_ENGINE).
#
#   bash scripts/base-image-debootstrap.sh            # -> localhost/videogen-base:bookworm
#   BUILD_ARGS="--build-arg BASE_IMAGE=localhost/videogen-base:bookworm" make image-smoke
set -euo pipefail
TAG=${1:-localhost/videogen-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
read -r -a ENGINE <<<"${CONTAINER_ENGINE:-podman}"
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT
debootstrap --variant=minbase bookworm "$ROOT" "$MIRROR"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
chroot "$ROOT" /bin/sh -c 'apt-get update -q \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
       python3 python3-venv python3-dev ca-certificates \
    && python3 -m venv /usr/local && rm -rf /var/lib/apt/lists/*'
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
: >"$ROOT/etc/resolv.conf"
tar -C "$ROOT" -c . | "${ENGINE[@]}" import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$TAG"
echo "base image: $TAG"
