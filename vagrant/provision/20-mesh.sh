#!/usr/bin/env bash
# Build the image from the Containerfile, load it into the kind nodes, check the
# manifests against the real API server (server-side dry run, Istio's samples against
# our CRDs), then deploy the mesh and wait for it.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

log "building $IMAGE"
docker build -t "$IMAGE" -f "$REPO/Containerfile" "$REPO"
kind load docker-image --name "$CLUSTER" "$IMAGE"

# A server-side dry run does not create the namespace, so the objects inside it would be
# refused as "namespace not found" on a fresh cluster: create the namespace first.
log "server-side dry run of daemonset/"
kubectl apply -f "$REPO/daemonset/base/namespace.yaml"
kubectl apply --dry-run=server -k "$REPO/daemonset" >/dev/null \
  || die "kubectl apply --dry-run=server -k daemonset/ was refused"

log "applying daemonset/"
kubectl apply -k "$REPO/daemonset"
kubectl wait --for=condition=Established --timeout=60s \
  crd/authorizationpolicies.security.istio.io crd/virtualservices.networking.istio.io

log "Istio's bookinfo samples against our CRDs (server-side dry run)"
kubectl apply --dry-run=server -n default -f "$REPO/vagrant/manifests/istio-samples.yaml" \
  || die "the CRDs in daemonset/ refused Istio's published samples"

log "waiting for the controller and the agents"
kubectl -n ztunnel-py-system rollout status deployment/ztunnel-py-controller --timeout=180s
kubectl -n ztunnel-py-system rollout status daemonset/ztunnel-py-agent --timeout=300s
kubectl -n ztunnel-py-system get pods -o wide
