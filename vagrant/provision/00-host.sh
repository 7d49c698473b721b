#!/usr/bin/env bash
# The VM: Docker (kind's node runtime), kind, kubectl, the kernel headers bcc compiles
# against (mounted into the kind nodes, hence into the agent pods), tcpdump.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

KIND_VERSION=${KIND_VERSION:-v0.24.0}
KUBECTL_VERSION=${KUBERNETES_VERSION:-v1.31.0}

export DEBIAN_FRONTEND=noninteractive
log "apt packages"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  docker.io curl ca-certificates tcpdump jq "linux-headers-$(uname -r)" >/dev/null
systemctl enable --now docker

mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

if ! command -v kind >/dev/null; then
  log "kind $KIND_VERSION"
  curl -fsSLo /usr/local/bin/kind \
    "https://kind.sigs.k8s.io/dl/${KIND_VERSION}/kind-linux-amd64"
  chmod +x /usr/local/bin/kind
fi
if ! command -v kubectl >/dev/null; then
  log "kubectl $KUBECTL_VERSION"
  curl -fsSLo /usr/local/bin/kubectl \
    "https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/amd64/kubectl"
  chmod +x /usr/local/bin/kubectl
fi
kind version
kubectl version --client
