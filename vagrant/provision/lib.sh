#!/usr/bin/env bash
# Shared helpers for the provisioning scripts (sourced, not run).
set -euo pipefail

REPO=${REPO:-/ztunnel-py}
CLUSTER=${CLUSTER:-ztunnel-py}
IMAGE=${IMAGE:-localhost/ztunnel-py:0.1.0}
export KUBECONFIG=${KUBECONFIG:-/root/.kube/config}

log() { printf '\033[1m[%s]\033[0m %s\n' "$(basename "$0")" "$*"; }
die() { printf '[%s] FAILED: %s\n' "$(basename "$0")" "$*" >&2; exit 1; }

# retry N SECONDS CMD...: run CMD until it succeeds, at most N times, SECONDS apart.
retry() {
  local n=$1 pause=$2 i
  shift 2
  for ((i = 1; i <= n; i++)); do
    if "$@"; then return 0; fi
    sleep "$pause"
  done
  return 1
}
