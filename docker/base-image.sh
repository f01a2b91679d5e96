#!/usr/bin/env bash
# Makes a local Debian base image (default tag pdserve-base:bookworm) for
# machines that reach no image registry: debootstrap a minimal bookworm with
# Python from the machine's own Debian mirror, then `docker import` it.
# Users with a registry never need this: the Dockerfile defaults to python:3.11-slim.
# Idempotent: an existing image with the tag is left alone.
set -euo pipefail
TAG=${1:-pdserve-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "==> base image $TAG already present"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }

root=$(mktemp -d /tmp/pdserve-rootfs.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "==> debootstrap bookworm from $MIRROR into $root (a few minutes)"
debootstrap --variant=minbase \
  --include=python3,python3-venv,python3-pip,ca-certificates \
  bookworm "$root" "$MIRROR" >/tmp/pdserve-debootstrap.log 2>&1 \
  || { tail -20 /tmp/pdserve-debootstrap.log >&2; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
echo "==> docker import as $TAG"
tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "==> base image $TAG ready"
