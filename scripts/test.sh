#!/usr/bin/env bash
# Every check and every test, from nothing: the virtualenv (uv + the locked requirements), the
# Go-built binaries (etcd, kube-apiserver, kube-controller-manager, kubectl, helm, helm-docs,
# minio, promtool, toxiproxy; cached by version), Debian's Ceph packages, lint, types, then the
# test tiers (unit, integration, e2e, reliability).
# Extra arguments go to pytest (e.g. scripts/test.sh tests/unit -x).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
started=$(date +%s)
source scripts/env.sh
echo "== binaries" >&2
bash scripts/build-binaries.sh
bash scripts/install-ceph.sh
echo "== lint and types ($(( $(date +%s) - started ))s)" >&2
ruff check .
ruff format --check .
mypy
echo "== tests ($(( $(date +%s) - started ))s)" >&2
python -m pytest -ra "$@"
echo "== done in $(( $(date +%s) - started ))s" >&2
