#!/usr/bin/env bash
# The main job on the embedded local default: builds what is missing, starts a local control
# plane and MinIO on 127.0.0.1, the operator, seeds stale uploads, applies a policy, shows the
# result (kubectl get ulp, status, Events, metrics) and cleans up after itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/env.sh
bash scripts/build-binaries.sh etcd kube-apiserver kube-controller-manager kubectl minio
exec python scripts/demo.py
