#!/usr/bin/env bash
# Build a local base image from a Debian root filesystem, with no container registry:
#   debootstrap (minbase) + python3 + python3-venv + ca-certificates  ->  tar  ->  docker import
#
#   docker/build-base.sh [TAG]        (default kvzip-base:bookworm; FORCE=1 rebuilds)
#   PACKAGES=redis-server docker/build-base.sh kvzip-redis:bookworm   (the Redis servers)
#
# Both images take it as their base: --build-arg BASE_IMAGE=kvzip-base:bookworm (see
# docs/deploy.md). The Debian mirror is the one this machine's apt already uses, unless
# MIRROR is set; downloaded packages are kept in build/debootstrap-cache for the next run.
# Needs root and the debootstrap package.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${1:-kvzip-base:bookworm}
SUITE=${SUITE:-bookworm}
ROOTFS=${ROOTFS:-build/rootfs-${TAG//[:\/]/-}}
CACHE=${CACHE:-$PWD/build/debootstrap-cache}
DOCKER=${DOCKER:-docker}
PACKAGES=${PACKAGES:-python3,python3-venv,ca-certificates}

if [[ -z "${FORCE:-}" ]] && "$DOCKER" image inspect "$TAG" >/dev/null 2>&1; then
  echo "base: $TAG exists (FORCE=1 rebuilds)"
  exit 0
fi

apt_mirror() {
  # the first URI of this machine's Debian sources (deb822 or one-line format)
  local uri
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  if [[ -z "$uri" ]]; then
    uri=$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
      2>/dev/null || true)
  fi
  echo "$uri"
}
MIRROR=${MIRROR:-$(apt_mirror)}
[[ -n "$MIRROR" ]] || { echo "base: no Debian mirror found; set MIRROR" >&2; exit 1; }
command -v debootstrap >/dev/null || { echo "base: needs debootstrap (apt-get install debootstrap)" >&2; exit 1; }

start=$(date +%s)
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS" "$CACHE"
echo "base: debootstrap $SUITE ($PACKAGES) into $ROOTFS"
debootstrap --variant=minbase --cache-dir="$CACHE" --include="$PACKAGES" "$SUITE" "$ROOTFS" \
  "$MIRROR" >"$ROOTFS.log" 2>&1 \
  || { tail -20 "$ROOTFS.log" >&2; exit 1; }
# what an image does not need: package caches, lists, docs, man pages
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/* \
  "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
  "$ROOTFS"/var/log/*.log "$ROOTFS"/var/cache/debconf/*-old
echo "base: docker import -> $TAG"
tar -C "$ROOTFS" --numeric-owner -c . | "$DOCKER" import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  - "$TAG" >/dev/null
rm -rf "$ROOTFS"
echo "base: $TAG built in $(( $(date +%s) - start )) s, $("$DOCKER" image inspect -f '{{.Size}}' "$TAG") bytes"
