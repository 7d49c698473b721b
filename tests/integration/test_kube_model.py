"""The Kubernetes source and directory mode give the same model for the same objects.

The objects go into the fake API server; the Kubernetes source lists and
watches them (through changes, a dropped connection and a 410 relist); the
same objects, as the server holds them, are written as YAML files and read by
the directory source. Both object sets go through the one translator, and the
snapshots must be equal.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fakes.kubeapi import FakeKubeApi
from ztunnel_py.controller import kube
from ztunnel_py.controller.directory import DirectoryLoader
from ztunnel_py.controller.translate import KubeObject, Translation, translate

TD, ROOT = "cluster.local", "istio-system"


def objects() -> list[dict[str, Any]]:
    ambient = {"istio.io/dataplane-mode": "ambient"}
    out: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {
            "name": "shop", "labels": {**ambient, "istio.io/use-waypoint": "shop-waypoint"}}},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "legacy"}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "web", "namespace": "shop"}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "shop-waypoint", "namespace": "shop"},
         "spec": {"gatewayClassName": "istio-waypoint", "listeners": [
             {"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "web"},
                  "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "deny-legacy", "namespace": "shop"},
         "spec": {"action": "DENY", "rules": [{"from": [{"source": {
             "namespaces": ["legacy"]}}]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
         "metadata": {"name": "default", "namespace": "istio-system"},
         "spec": {"mtls": {"mode": "STRICT"}}},
        {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
         "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"host": "web.shop.svc.cluster.local", "subsets": [
             {"name": "v1", "labels": {"version": "v1"}}]}},
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
         "metadata": {"name": "web", "namespace": "shop"},
         "spec": {"hosts": ["web.shop.svc.cluster.local"], "http": [{"route": [
             {"destination": {"host": "web.shop.svc.cluster.local", "subset": "v1"}}]}]}},
    ]
    for i, node in enumerate(("node-1", "node-2")):
        out.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"web-{i}", "namespace": "shop",
                         "labels": {"app": "web", "version": "v1"}},
            "spec": {"nodeName": node, "serviceAccountName": "web", "containers": [
                {"name": "web", "image": "x", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": f"10.0.{i}.10",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        })
    out.append({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "legacy", "labels": {"app": "client"}},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "x"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.99"},
    })
    return out


def endpoint_slice(fake: FakeKubeApi) -> dict[str, Any]:
    pods = [o for (g, p, _, _), o in fake.objects.items() if p == "pods"
            and o["metadata"]["namespace"] == "shop"]
    return {
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "web-abc", "namespace": "shop",
                     "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": [p["status"]["podIP"]], "conditions": {"ready": True},
                       "nodeName": p["spec"]["nodeName"],
                       "targetRef": {"kind": "Pod", "name": p["metadata"]["name"],
                                     "namespace": "shop", "uid": p["metadata"]["uid"]}}
                      for p in sorted(pods, key=lambda p: p["metadata"]["name"])],
    }


def directory_model(fake: FakeKubeApi, root: Path) -> Translation:
    """What directory mode makes of the server's current objects."""
    root.mkdir(parents=True, exist_ok=True)
    for old in root.glob("*.yaml"):
        old.unlink()
    with fake.cond:
        stored = [copy.deepcopy(o) for o in fake.objects.values()]
    for i, body in enumerate(stored):
        (root / f"{i:03d}-{body['kind'].lower()}.yaml").write_text(yaml.safe_dump(body))
    loaded, problems = DirectoryLoader(root).load()
    assert not problems, problems
    return translate(loaded, trust_domain=TD, root_namespace=ROOT)


def kube_model(source: kube.KubernetesSource) -> Translation:
    return translate(source.objects(), trust_domain=TD, root_namespace=ROOT)


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as api:
        for body in objects():
            api.apply(body)
        api.apply(endpoint_slice(api))
        yield api


async def converged(source: kube.KubernetesSource, fake: FakeKubeApi, root: Path) -> None:
    """Wait until the source's model equals directory mode's (bounded), then check it."""
    want = directory_model(fake, root)
    deadline = time.monotonic() + 10
    got = kube_model(source)
    while got.snapshot != want.snapshot and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        got = kube_model(source)
    assert got.snapshot == want.snapshot
    assert [p.message for p in got.problems] == [p.message for p in want.problems]


async def test_same_model_as_directory_mode_through_churn(
    fake: FakeKubeApi, tmp_path: Path
) -> None:
    api = kube.KubeApi(kube.load_api_client(fake.write_kubeconfig()))
    source = kube.KubernetesSource(api, settings=kube.SourceSettings(
        page_size=3, backoff_initial_s=0.05, backoff_max_s=0.2))
    await source.start(sync_timeout_s=10)
    try:
        first = kube_model(source)
        # a meaningful model, not two empty ones
        assert not first.errors, first.errors
        snap = first.snapshot
        assert {w.name for w in snap.workloads if w.enrolled} == {"web-0", "web-1"}
        assert [s.key for s in snap.services] == ["shop/web"]
        assert len(snap.services[0].endpoints) == 2
        assert [p.key for p in snap.authorization_policies] == ["shop/deny-legacy"]
        assert len(snap.routing) >= 3
        await converged(source, fake, tmp_path / "d0")

        # watch events: relabel a pod out of ambient, add a policy, delete the VS
        web1 = copy.deepcopy(fake.objects[("", "pods", "shop", "web-1")])
        web1["metadata"]["labels"]["istio.io/dataplane-mode"] = "none"
        fake.apply(web1)
        fake.apply({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": {"name": "allow-web", "namespace": "shop"},
                    "spec": {"selector": {"matchLabels": {"app": "web"}}, "rules": [
                        {"to": [{"operation": {"ports": ["8080"]}}]}]}})
        fake.delete("VirtualService", "shop", "web", api_version="networking.istio.io/v1")
        await converged(source, fake, tmp_path / "d1")
        snap = kube_model(source).snapshot
        assert {w.name for w in snap.workloads if w.enrolled} == {"web-0"}

        # a dropped connection and a compaction while away: 410, relist, reconcile
        with fake.offline():
            fake.delete("Pod", "shop", "web-0")
            fake.delete("AuthorizationPolicy", "shop", "deny-legacy",
                        api_version="security.istio.io/v1")
            fake.compact()
        await converged(source, fake, tmp_path / "d2")
        snap = kube_model(source).snapshot
        assert [p.key for p in snap.authorization_policies] == ["shop/allow-web"]
        assert "web-0" not in {w.name for w in snap.workloads}
        assert source.reflectors["pods"].relists_on_gone == 1
    finally:
        await source.stop()


def test_origins_name_the_object(fake: FakeKubeApi) -> None:
    """Problems point at the object in the cluster, as directory mode points at a file."""
    broken = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "bad", "namespace": "shop"},
              "spec": {"action": "NOT-AN-ACTION"}}
    stored = fake.apply(broken)
    cache = kube.ResourceCache(next(r for r in kube.RESOURCES
                                    if r.kind == "AuthorizationPolicy"))
    (change,) = cache.replace([stored], "1")
    result = translate([KubeObject(change.origin, change.body)], trust_domain=TD,
                       root_namespace=ROOT)
    assert [p.origin for p in result.errors] == ["kubernetes:AuthorizationPolicy/shop/bad"]
