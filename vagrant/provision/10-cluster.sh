#!/usr/bin/env bash
# A kind cluster of three nodes. The nodes are containers on this VM's kernel, so the
# agent's eBPF programs run on the VM kernel; its headers and modules are mounted into
# every node (the DaemonSet mounts them on into the agent pods).
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

NODE_IMAGE="kindest/node:${KUBERNETES_VERSION:-v1.31.0}"

if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "cluster $CLUSTER exists"
else
  log "creating kind cluster $CLUSTER ($NODE_IMAGE)"
  config=$(mktemp)
  {
    echo "kind: Cluster"
    echo "apiVersion: kind.x-k8s.io/v1alpha4"
    echo "nodes:"
    for role in control-plane worker worker; do
      echo "  - role: $role"
      echo "    extraMounts:"
      echo "      - {hostPath: /lib/modules, containerPath: /lib/modules, readOnly: true}"
      echo "      - {hostPath: /usr/src, containerPath: /usr/src, readOnly: true}"
      echo "      - {hostPath: /sys/fs/bpf, containerPath: /sys/fs/bpf, propagation: HostToContainer}"
    done
  } >"$config"
  kind create cluster --name "$CLUSTER" --image "$NODE_IMAGE" --config "$config" --wait 180s
  rm -f "$config"
fi
mkdir -p "$(dirname "$KUBECONFIG")"
kind get kubeconfig --name "$CLUSTER" >"$KUBECONFIG"
kubectl get nodes -o wide
