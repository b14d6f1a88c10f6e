#!/usr/bin/env bash
# Pins the Dockerfile's base image (ARG PYTHON_IMAGE) to the current digest of its tag, so a
# release build is reproducible. The digest is the image index's (every platform), looked up
# with skopeo (Debian package `skopeo`), or given with --digest.
#
# Usage: scripts/pin-base-image.sh [--digest sha256:<64 hex>] [--dockerfile PATH]
set -euo pipefail

dockerfile="$(dirname "$0")/../Dockerfile"
digest=""
while (($#)); do
  case "$1" in
    --digest) digest="$2"; shift 2 ;;
    --dockerfile) dockerfile="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

current=$(sed -n 's/^ARG PYTHON_IMAGE=//p' "$dockerfile")
[[ -n "$current" ]] || { echo "$dockerfile: no ARG PYTHON_IMAGE line" >&2; exit 1; }
tag="${current%%@*}"
if [[ -z "$digest" ]]; then
  # The digest of the manifest list as the registry serves it: sha256 of its exact bytes.
  digest="sha256:$(skopeo inspect --raw "docker://docker.io/library/$tag" | sha256sum | cut -d' ' -f1)"
fi
if [[ ! "$digest" =~ ^sha256:[0-9a-f]{64}$ ]]; then
  echo "not a sha256 digest: $digest" >&2
  exit 1
fi
sed -i "s|^ARG PYTHON_IMAGE=.*\$|ARG PYTHON_IMAGE=$tag@$digest|" "$dockerfile"
echo "pinned $tag@$digest in $dockerfile" >&2
