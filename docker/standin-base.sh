#!/usr/bin/env bash
# A stand-in for python:3.11-slim-bookworm, built from Debian bookworm packages with debootstrap,
# for machines that reach a Debian mirror and PyPI but no container registry.
#
#   sudo docker/standin-base.sh [IMAGE]        # default localhost/python:3.11-bookworm-standin
#
# The image has what the Dockerfiles use from the official one: python3.11 with venv at
# /usr/local/bin/python(3), ca-certificates, and passwd (groupadd/useradd). It is built once:
# when IMAGE exists already, nothing happens (remove it with `buildah rmi IMAGE` to rebuild).
# Needs root, buildah and debootstrap; the mirror is MIRROR or http://deb.debian.org/debian.
set -euo pipefail
IMAGE=${1:-localhost/python:3.11-bookworm-standin}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
PACKAGES=python3.11,python3.11-venv,python3-distutils,ca-certificates,passwd

if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "stand-in base $IMAGE exists: kept"
  exit 0
fi
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found: apt-get install $tool" >&2; exit 2; }
done
work=$(mktemp -d /var/tmp/standin-base.XXXXXX)
container=""
cleanup() {
  [ -n "$container" ] && buildah rm "$container" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
echo "debootstrap bookworm ($PACKAGES) from $MIRROR into $work/rootfs"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$work/rootfs" "$MIRROR" >"$work/log" 2>&1 \
  || { tail -n 20 "$work/log" >&2; echo "error: debootstrap failed (log above)" >&2; exit 1; }
# The official image's paths; apt lists and caches are not needed at run time.
ln -sf /usr/bin/python3.11 "$work/rootfs/usr/local/bin/python"
ln -sf /usr/bin/python3.11 "$work/rootfs/usr/local/bin/python3"
rm -rf "$work/rootfs/var/lib/apt/lists/"* "$work/rootfs/var/cache/apt/"*.bin "$work/rootfs/var/cache/apt/archives/"*.deb
tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
container=$(buildah from scratch)
buildah add "$container" "$work/rootfs.tar" / >/dev/null
buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 --cmd python3 \
  --label org.opencontainers.image.description="stand-in for python:3.11-slim-bookworm (debootstrap)" \
  "$container"
buildah commit --rm "$container" "$IMAGE" >/dev/null
container=""
echo "stand-in base $IMAGE built"
