#!/usr/bin/env bash
# The end-to-end smoke check on the kind cluster:
#  1. a request from a pod on one worker to a Service whose pod is on the other succeeds;
#  2. on the wire between the two nodes it is encrypted: a marker sent in the request
#     never appears in a capture of the inter-node traffic, and HBONE (15008) does;
#  3. the pods, the service and a policy created with kubectl appear in the agents'
#     config_dump;
#  4. an AuthorizationPolicy denying the client's identity makes the request fail;
#  5. a pod relabelled out of ambient leaves the mesh (config_dump says not enrolled);
#  6. the controller's log has no "forbidden": the RBAC in daemonset/ is enough.
# shellcheck source-path=SCRIPTDIR
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"

W1=${CLUSTER}-worker
W2=${CLUSTER}-worker2
marker="ztunnel-smoke-$RANDOM$RANDOM"
capture=$(mktemp /tmp/smoke-XXXX.pcap)
trap 'rm -f "$capture"' EXIT

node_ip() { kubectl get node "$1" -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}'; }
config_dump() { docker exec "$1" curl -fsS http://127.0.0.1:15000/config_dump; }
request() {
  kubectl -n demo exec client -- curl -sS -m 5 -H "X-Smoke: $marker" \
    "http://server.demo/echo?msg=$marker"
}
request_ok() { [ "$(request 2>/dev/null)" = "$marker" ]; }

log "deploying the demo workloads"
kubectl apply -f "$REPO/vagrant/manifests/demo.yaml"
kubectl -n demo delete authorizationpolicy deny-client --ignore-not-found
kubectl -n demo label pod server istio.io/dataplane-mode- >/dev/null 2>&1 || true
kubectl -n demo wait --for=condition=Ready pod/server pod/client --timeout=180s

# Everything between the kind nodes crosses the "kind" Docker bridge on this VM (pod to
# pod traffic is routed there without encapsulation), so a capture on it sees what an
# observer on the network between the nodes would see.
log "1+2. cross-node request, captured on the kind bridge between $W1 and $W2"
bridge="br-$(docker network inspect kind -f '{{.Id}}' | cut -c1-12)"
ip1=$(node_ip "$W1")
ip2=$(node_ip "$W2")
log "   nodes $ip1 and $ip2, bridge $bridge"
timeout 20 tcpdump -i "$bridge" -nn -s 0 -U -w "$capture" tcp >/dev/null 2>&1 &
dump=$!
sleep 2
retry 20 3 request_ok || die "the cross-node request did not succeed"
sleep 1
kill "$dump" 2>/dev/null || true
wait "$dump" 2>/dev/null || true
if tcpdump -nn -A -r "$capture" 2>/dev/null | grep -q "$marker"; then
  die "the marker crossed the nodes in plaintext"
fi
hbone=$(tcpdump -nn -r "$capture" 'tcp port 15008' 2>/dev/null | wc -l)
[ "$hbone" -gt 0 ] || die "no HBONE (15008) packets between the nodes"
log "   ok: request served; $hbone HBONE packets between the nodes, marker never in clear"

log "3. what kubectl created is in the agents' config_dump"
kubectl apply -f "$REPO/vagrant/manifests/deny-client.yaml"
has_policy() { config_dump "$W2" | grep -q '"deny-client"'; }
retry 20 1 has_policy || die "the policy never reached the agent on $W2"
config_dump "$W1" | grep -q '"server"' || die "the server pod is not in $W1's config_dump"

log "4. the DENY policy refuses the client"
denied() { ! request_ok; }
retry 20 1 denied || die "the request still succeeds under a DENY policy"
kubectl -n demo delete authorizationpolicy deny-client
retry 20 1 request_ok || die "the request does not recover after removing the policy"
log "   ok: denied under the policy, allowed again without it"

log "5. relabelling the server out of ambient"
kubectl -n demo label pod server istio.io/dataplane-mode=none --overwrite
not_enrolled() {
  config_dump "$W2" | jq -e '[.. | objects | select(.name? == "server" and .namespace? == "demo")]
    | all(.enrolled != true)' >/dev/null
}
retry 20 1 not_enrolled || die "the relabelled pod is still enrolled in $W2's config_dump"
kubectl -n demo label pod server istio.io/dataplane-mode- >/dev/null
log "   ok: the pod left the mesh"

log "6. the controller's RBAC is enough"
if kubectl -n ztunnel-py-system logs deployment/ztunnel-py-controller | grep -qi forbidden; then
  die "the controller's log has forbidden errors: the RBAC in daemonset/ is not enough"
fi
log "SMOKE CHECK PASSED"
