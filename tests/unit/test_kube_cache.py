"""The sans-IO parts of the Kubernetes source: the reflector's cache, line framing, backoff."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from ztunnel_py.controller import kube

PODS = next(r for r in kube.RESOURCES if r.kind == "Pod")
NAMESPACES = next(r for r in kube.RESOURCES if r.kind == "Namespace")


def pod(name: str, rv: str, ns: str = "demo", **extra: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv}, **extra}


def test_replace_fills_kind_and_api_version_and_reconciles() -> None:
    cache = kube.ResourceCache(PODS)
    first = cache.replace([pod("a", "1"), pod("b", "2")], "2")
    assert [(c.type, c.origin) for c in first] == [
        (kube.ChangeType.UPSERT, "kubernetes:Pod/demo/a"),
        (kube.ChangeType.UPSERT, "kubernetes:Pod/demo/b"),
    ]
    assert first[0].body["kind"] == "Pod" and first[0].body["apiVersion"] == "v1"
    assert cache.synced and cache.resource_version == "2"

    # a relist: "a" unchanged (no change emitted), "b" gone, "c" new
    second = cache.replace([pod("a", "1"), pod("c", "7")], "9")
    assert [(c.type, c.origin) for c in second] == [
        (kube.ChangeType.DELETE, "kubernetes:Pod/demo/b"),
        (kube.ChangeType.UPSERT, "kubernetes:Pod/demo/c"),
    ]
    assert [k for k, _ in cache.objects()] == [("demo", "a"), ("demo", "c")]
    assert cache.resource_version == "9"


def test_events_move_the_version_and_bookmarks_change_nothing() -> None:
    cache = kube.ResourceCache(PODS)
    cache.replace([], "10")
    added = cache.apply("ADDED", {"kind": "Pod", "apiVersion": "v1", **pod("a", "11")})
    assert added is not None and added.type is kube.ChangeType.UPSERT
    assert cache.apply("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "50"}}) is None
    assert cache.resource_version == "50"
    assert len(cache) == 1
    modified = cache.apply("MODIFIED", pod("a", "51", spec={"nodeName": "n2"}))
    assert modified is not None and modified.body["spec"] == {"nodeName": "n2"}
    # a repeated event with the same content is not a change
    assert cache.apply("MODIFIED", pod("a", "51", spec={"nodeName": "n2"})) is None
    deleted = cache.apply("DELETED", pod("a", "52"))
    assert deleted is not None and deleted.type is kube.ChangeType.DELETE
    assert len(cache) == 0 and cache.resource_version == "52"


def test_error_410_raises_gone_and_other_errors_raise_api_error() -> None:
    cache = kube.ResourceCache(PODS)
    with pytest.raises(kube.Gone):
        cache.apply("ERROR", {"kind": "Status", "code": 410, "message": "too old"})
    with pytest.raises(kube.ApiError) as err:
        cache.apply("ERROR", {"kind": "Status", "code": 500, "message": "etcd down"})
    assert not isinstance(err.value, kube.Gone)
    assert "etcd down" in str(err.value)


def test_cluster_scoped_origin_has_no_namespace() -> None:
    cache = kube.ResourceCache(NAMESPACES)
    (change,) = cache.replace([{"metadata": {"name": "demo", "resourceVersion": "3"}}], "3")
    assert change.origin == "kubernetes:Namespace/demo"


def test_not_installed_empties_the_cache() -> None:
    cache = kube.ResourceCache(PODS)
    cache.replace([pod("a", "1")], "1")
    changes = cache.mark_not_installed()
    assert [c.type for c in changes] == [kube.ChangeType.DELETE]
    assert cache.synced and not cache.installed and len(cache) == 0


def test_line_buffer_frames_events_split_anywhere() -> None:
    events = [{"type": "ADDED", "object": {"metadata": {"name": f"p{i}"}}} for i in range(3)]
    wire = b"".join(json.dumps(e).encode() + b"\n" for e in events)
    rng = random.Random(7)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(wire)), 5))
        framing = kube.LineBuffer()
        got: list[dict[str, Any]] = []
        for a, b in zip([0, *cuts], [*cuts, len(wire)], strict=True):
            got += framing.feed(wire[a:b])
        assert got == events


def test_line_buffer_rejects_garbage() -> None:
    with pytest.raises(kube.ApiError, match="undecodable"):
        kube.LineBuffer().feed(b"{not json\n")


def test_backoff_grows_caps_and_resets() -> None:
    b = kube.Backoff(initial_s=1.0, max_s=8.0, rng=random.Random(1))
    delays = [b.next() for _ in range(6)]
    ceilings = [1, 2, 4, 8, 8, 8]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    b.reset()
    assert b.next() <= 1.0


def test_resource_paths() -> None:
    assert PODS.path("v1") == "/api/v1/pods"
    ap = next(r for r in kube.RESOURCES if r.kind == "AuthorizationPolicy")
    assert ap.path("v1beta1") == "/apis/security.istio.io/v1beta1/authorizationpolicies"
    assert ap.api_version("v1") == "security.istio.io/v1"
    assert ap.optional and not PODS.optional
