#!/usr/bin/env bash
# Installs the Debian packages of a real Ceph (one mon, one OSD, the RADOS Gateway and the CLI
# tools) that the Ceph tests run on 127.0.0.1. Installs only when a binary is missing; a failed
# install exits non-zero (the tests never skip a missing Ceph). Starts no service: the test
# fixture runs its own throwaway cluster (tests/support/ceph.py).
set -euo pipefail

PACKAGES=(ceph-mon ceph-osd radosgw ceph-common)
BINARIES=(ceph-mon ceph-osd radosgw radosgw-admin ceph monmaptool)

log() { printf '[install-ceph] %s\n' "$*" >&2; }

missing=()
for bin in "${BINARIES[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || missing+=("$bin")
done
((${#missing[@]})) || exit 0

log "missing ${missing[*]}: installing ${PACKAGES[*]}"
as_root=()
if [[ "$(id -u)" != 0 ]]; then
  command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: cannot install ${PACKAGES[*]}"; exit 1; }
  as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update
"${as_root[@]}" apt-get install -y --no-install-recommends "${PACKAGES[@]}"

for bin in "${BINARIES[@]}"; do
  command -v "$bin" >/dev/null 2>&1 || { log "$bin still missing after the install"; exit 1; }
done
log "installed: $(ceph --version)"
