#!/usr/bin/env bash
# Builds the operator image without a Docker daemon, with buildah (Debian package `buildah`).
#
#   scripts/build-image.sh [TAG]                      FROM the Dockerfile's python:3.11-slim base
#   scripts/build-image.sh --debian-base [TAG]        FROM a stand-in base made from Debian packages
#
# --debian-base is for machines that reach Debian's and PyPI's mirrors but no container
# registry: debootstrap makes a bookworm root filesystem with python3 (3.11) and pip, this
# machine's CA bundle (so pip trusts the same proxies it does) and PIP_BREAK_SYSTEM_PACKAGES
# (Debian's Python refuses pip installs into it otherwise), and the Dockerfile builds on it
# unchanged. Such an image is for trying the build, not for release: release images use the
# pinned python:3.11-slim.
set -euo pipefail

cd "$(dirname "$0")/.."
buildah=(buildah --storage-driver vfs)
debian_base=0
if [[ "${1:-}" == "--debian-base" ]]; then debian_base=1; shift; fi
tag="${1:-localhost/mpu-janitor:dev}"
args=(--build-arg "REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)"
      --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")

if ((debian_base)); then
  base=localhost/mpu-janitor-debian-python:3.11
  if ! "${buildah[@]}" inspect --type image "$base" >/dev/null 2>&1; then
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv \
      bookworm "$rootfs" http://deb.debian.org/debian >&2
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
    container=$("${buildah[@]}" from scratch)
    "${buildah[@]}" copy "$container" "$rootfs" / >/dev/null
    "${buildah[@]}" config \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env PIP_BREAK_SYSTEM_PACKAGES=1 \
      --env PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
      --cmd python3 "$container"
    "${buildah[@]}" commit -q "$container" "$base" >/dev/null
    "${buildah[@]}" rm "$container" >/dev/null
  fi
  args+=(--pull=never --build-arg "PYTHON_IMAGE=$base")
fi

"${buildah[@]}" bud --isolation chroot "${args[@]}" -t "$tag" .
echo "built $tag" >&2
