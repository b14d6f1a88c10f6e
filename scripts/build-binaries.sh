#!/usr/bin/env bash
# Builds the real components the tests and the demo run (kube-apiserver, kube-controller-manager,
# kubectl, etcd, helm, helm-docs, minio, promtool, toxiproxy) from the Go module proxy, once per
# pinned version, into
# ${XDG_CACHE_HOME:-$HOME/.cache}/mpu-janitor/bin. Builds only what is missing; a failed build
# exits non-zero (the tests never skip a missing binary).
# Optional, built only when named: rclone (the peer bench/bench_side_by_side.py compares with;
# long to build, and no test needs it).
#
# Usage: scripts/build-binaries.sh [NAME...]   (default: all but the optional ones)
#        scripts/build-binaries.sh --print-dir
set -euo pipefail

KUBE_VERSION=v1.35.4
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0
# The Kubernetes version helm assumes without a cluster (`helm template`, `helm lint`): the
# minor of the k8s.io/client-go that HELM_VERSION requires, as helm's Makefile sets it.
HELM_KUBE_VERSION=v1.37
HELM_DOCS_VERSION=v1.14.2
MINIO_VERSION=v0.0.0-20260212201848-7aac2a2c5b7c
# Prometheus 3.15.0 (the module is tagged v0.<major><minor>.<patch>), for promtool.
PROMETHEUS_VERSION=v0.315.0
# toxiproxy's server, for the reliability tier (faults between the engine and MinIO).
TOXIPROXY_VERSION=v2.5.0
# rclone, optional: only the side-by-side benchmark runs it.
RCLONE_VERSION=v1.76.0

CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/mpu-janitor"
BIN_DIR="$CACHE_ROOT/bin"
WORK_DIR="$CACHE_ROOT/build"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
mkdir -p "$BIN_DIR" "$WORK_DIR"

if [[ "${1:-}" == "--print-dir" ]]; then echo "$BIN_DIR"; exit 0; fi

log() { printf '[build-binaries] %s\n' "$*" >&2; }

# Binary file names carry the version, so a pin change rebuilds instead of reusing a stale file.
bin_path() {
  case "$1" in
    kube-apiserver|kube-controller-manager|kubectl) echo "$BIN_DIR/$1-$KUBE_VERSION" ;;
    etcd) echo "$BIN_DIR/etcd-$ETCD_VERSION" ;;
    helm) echo "$BIN_DIR/helm-$HELM_VERSION-kube$HELM_KUBE_VERSION" ;;
    helm-docs) echo "$BIN_DIR/helm-docs-$HELM_DOCS_VERSION" ;;
    minio) echo "$BIN_DIR/minio-$MINIO_VERSION" ;;
    promtool) echo "$BIN_DIR/promtool-$PROMETHEUS_VERSION" ;;
    toxiproxy) echo "$BIN_DIR/toxiproxy-$TOXIPROXY_VERSION" ;;
    rclone) echo "$BIN_DIR/rclone-$RCLONE_VERSION" ;;
    *) log "unknown binary: $1"; exit 2 ;;
  esac
}

# One build of a component at a time (a test run may ask while another build runs): wait for the
# other build, then look again at what is missing. The lock is released when the subshell that
# runs the build exits (see the loop at the end).
lock_build() {
  local fd
  exec {fd}>"$WORK_DIR/$1.lock"
  flock "$fd"
}

build_kube() {
  local wanted=() name
  lock_build "kubernetes-$KUBE_VERSION"
  for name in kube-apiserver kube-controller-manager kubectl; do
    [[ -x "$(bin_path "$name")" ]] || wanted+=("$name")
  done
  ((${#wanted[@]})) || return 0
  log "building ${wanted[*]} $KUBE_VERSION (long on a cold cache)"
  local dir="$WORK_DIR/kubernetes-$KUBE_VERSION" minor="${KUBE_VERSION#v1.}"
  minor="${minor%%.*}"
  local staging="v0.${KUBE_VERSION#v1.}"
  mkdir -p "$dir"
  (
    cd "$dir"
    # The marker, written last, tells a complete module from one an interrupted run left behind.
    if [[ ! -f .module-ready ]]; then
      rm -f go.mod go.sum tools.go
      go mod init mpu-janitor.dev/kube-build >/dev/null 2>&1
      local gomod
      gomod=$(go mod download -json "k8s.io/kubernetes@$KUBE_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
      # k/k replaces its staging modules with ./staging/...; point them at the published tags.
      local mod
      for mod in $(awk '$2 == "=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod"); do
        go mod edit -replace="$mod=$mod@$staging"
      done
      grep -E '^godebug ' "$gomod" >>go.mod || true
      cat >tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
      go get "k8s.io/kubernetes@$KUBE_VERSION" >/dev/null
      go mod tidy -e >/dev/null 2>&1 || true
      go get "k8s.io/kubernetes/cmd/kube-apiserver@$KUBE_VERSION" "k8s.io/kubernetes/cmd/kube-controller-manager@$KUBE_VERSION" "k8s.io/kubernetes/cmd/kubectl@$KUBE_VERSION" >/dev/null
      touch .module-ready
    fi
    local date ld="" pkg
    date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
      ld+=" -X $pkg.gitVersion=$KUBE_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
      ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
    done
    for name in "${wanted[@]}"; do
      log "go build $name"
      go build -trimpath -ldflags "-s -w $ld" -o "$(bin_path "$name").tmp" "k8s.io/kubernetes/cmd/$name"
      mv "$(bin_path "$name").tmp" "$(bin_path "$name")"
    done
  )
}

build_etcd() {
  local out; out=$(bin_path etcd)
  lock_build "etcd-$ETCD_VERSION"
  [[ -x "$out" ]] && return 0
  log "building etcd $ETCD_VERSION"
  local dir="$WORK_DIR/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  (
    cd "$dir"
    if [[ ! -f .module-ready ]]; then
      rm -f go.mod go.sum main.go
      go mod init mpu-janitor.dev/etcd-build >/dev/null 2>&1
      cat >main.go <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
      go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >/dev/null
      go mod tidy >/dev/null
      touch .module-ready
    fi
    go build -trimpath -ldflags "-s -w" -o "$out.tmp" .
    mv "$out.tmp" "$out"
  )
}

# Built as helm's Makefile builds a release: the version, and the Kubernetes version that
# templates see as .Capabilities.KubeVersion without a cluster (without it helm assumes 1.20,
# and a chart's kubeVersion constraint fails `helm template`). The binary's name carries both.
build_helm() {
  local out; out=$(bin_path helm)
  lock_build "helm-$HELM_VERSION"
  [[ -x "$out" ]] && return 0
  log "building helm $HELM_VERSION (Kubernetes $HELM_KUBE_VERSION)"
  local dir="$WORK_DIR/helm-$HELM_VERSION" gomod client_go
  mkdir -p "$dir"
  gomod=$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  # The Makefile's rule: client-go v0.<minor>.<patch> is Kubernetes 1.<minor>.
  client_go=$(awk '$1 == "k8s.io/client-go" {print $2}' "$gomod")
  client_go="${client_go#v0.}"
  if [[ "v1.${client_go%%.*}" != "$HELM_KUBE_VERSION" ]]; then
    log "helm $HELM_VERSION uses k8s.io/client-go v0.$client_go: set HELM_KUBE_VERSION=v1.${client_go%%.*}"
    exit 1
  fi
  local major="${HELM_KUBE_VERSION#v}" minor="${HELM_KUBE_VERSION#v*.}" ld="-s -w" pkg
  major="${major%%.*}"
  ld+=" -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ld+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
  done
  GOBIN="$dir" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$dir/helm" "$out"
}

# helm-docs writes the chart README's values table from the `# --` comments of values.yaml.
build_helm_docs() {
  local out; out=$(bin_path helm-docs)
  lock_build "helm-docs-$HELM_DOCS_VERSION"
  [[ -x "$out" ]] && return 0
  log "building helm-docs $HELM_DOCS_VERSION"
  local dir="$WORK_DIR/helm-docs-$HELM_DOCS_VERSION"
  mkdir -p "$dir"
  GOBIN="$dir" go install -trimpath -ldflags "-s -w -X main.version=${HELM_DOCS_VERSION#v}" \
    "github.com/norwoodj/helm-docs/cmd/helm-docs@$HELM_DOCS_VERSION"
  mv "$dir/helm-docs" "$out"
}

build_minio() {
  local out; out=$(bin_path minio)
  lock_build "minio-$MINIO_VERSION"
  [[ -x "$out" ]] && return 0
  log "building minio $MINIO_VERSION"
  local dir="$WORK_DIR/minio"
  mkdir -p "$dir"
  GOBIN="$dir" go install -trimpath -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION"
  mv "$dir/minio" "$out"
}

# promtool checks and unit-tests the chart's alerting rules. Prometheus's go.mod has a replace
# directive, so `go install pkg@version` refuses it: build from a throwaway module that mirrors
# the replaces.
build_promtool() {
  local out; out=$(bin_path promtool)
  lock_build "promtool-$PROMETHEUS_VERSION"
  [[ -x "$out" ]] && return 0
  log "building promtool $PROMETHEUS_VERSION"
  local dir="$WORK_DIR/promtool-$PROMETHEUS_VERSION" tag="${PROMETHEUS_VERSION#v0.}"
  local release="$((${tag%%.*} / 100)).$((${tag%%.*} % 100)).${tag#*.}"
  mkdir -p "$dir"
  (
    cd "$dir"
    if [[ ! -f .module-ready ]]; then
      rm -f go.mod go.sum tools.go
      go mod init mpu-janitor.dev/promtool-build >/dev/null 2>&1
      local gomod replace
      gomod=$(go mod download -json "github.com/prometheus/prometheus@$PROMETHEUS_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
      for replace in $(awk '$1 == "replace" && $3 == "=>" {print $2 "=" $4 "@" $5}' "$gomod"); do
        go mod edit -replace="$replace"
      done
      cat >tools.go <<'GO'
//go:build tools

package tools

import _ "github.com/prometheus/prometheus/cmd/promtool"
GO
      go get "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" >/dev/null
      touch .module-ready
    fi
    go build -trimpath -ldflags "-s -w -X github.com/prometheus/common/version.Version=$release" \
      -o "$out.tmp" github.com/prometheus/prometheus/cmd/promtool
    mv "$out.tmp" "$out"
  )
}

# Only the server: the tests drive it through its HTTP API, not its CLI.
build_toxiproxy() {
  local out; out=$(bin_path toxiproxy)
  lock_build "toxiproxy-$TOXIPROXY_VERSION"
  [[ -x "$out" ]] && return 0
  log "building toxiproxy $TOXIPROXY_VERSION"
  local dir="$WORK_DIR/toxiproxy-$TOXIPROXY_VERSION"
  mkdir -p "$dir"
  GOBIN="$dir" go install -trimpath \
    -ldflags "-s -w -X github.com/Shopify/toxiproxy/v2.Version=$TOXIPROXY_VERSION" \
    "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION"
  mv "$dir/server" "$out"
}

# rclone's version string comes from its fs package (as its Makefile sets it).
build_rclone() {
  local out; out=$(bin_path rclone)
  lock_build "rclone-$RCLONE_VERSION"
  [[ -x "$out" ]] && return 0
  log "building rclone $RCLONE_VERSION (several minutes)"
  local dir="$WORK_DIR/rclone-$RCLONE_VERSION"
  mkdir -p "$dir"
  GOBIN="$dir" go install -trimpath \
    -ldflags "-s -w -X github.com/rclone/rclone/fs.Version=$RCLONE_VERSION" \
    "github.com/rclone/rclone@$RCLONE_VERSION"
  mv "$dir/rclone" "$out"
}

targets=("$@")
((${#targets[@]})) || targets=(etcd minio helm helm-docs promtool toxiproxy kube-apiserver kube-controller-manager kubectl)
need_kube=0
# Each build runs in a subshell, so its lock is released as soon as that component is built
# (not when the whole script ends): a run asking for minio alone never waits for kubernetes.
for t in "${targets[@]}"; do
  case "$t" in
    etcd) (build_etcd) ;;
    helm) (build_helm) ;;
    helm-docs) (build_helm_docs) ;;
    minio) (build_minio) ;;
    promtool) (build_promtool) ;;
    toxiproxy) (build_toxiproxy) ;;
    rclone) (build_rclone) ;;
    kube-apiserver|kube-controller-manager|kubectl) need_kube=1 ;;
    *) log "unknown binary: $t"; exit 2 ;;
  esac
done
if ((need_kube)); then (build_kube); fi
# Stable names (symlinks to the pinned versions) for the fixtures and the demo.
for t in "${targets[@]}"; do
  ln -sfn "$(basename "$(bin_path "$t")")" "$BIN_DIR/$t"
  [[ -x "$BIN_DIR/$t" ]] || { log "missing after build: $t"; exit 1; }
done
log "ready in $BIN_DIR: ${targets[*]}"
