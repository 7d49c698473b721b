"""The Kubernetes source against a fake API server speaking list/watch over HTTP.

The real ``kubernetes`` client (kubeconfig or in-cluster configuration, its
auth, TLS and connection pool) talks to ``tests.fakes.kubeapi``; the tests
script the cluster and check what the source's cache and change feed say.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from tests.fakes.kubeapi import BUILTINS, GATEWAY_API, ISTIO, Collection, FakeKubeApi
from ztunnel_py.controller import kube

FAST = kube.SourceSettings(
    page_size=2, watch_timeout_s=30, retry_missing_s=0.3, backoff_initial_s=0.05,
    backoff_max_s=0.2,
)


def pod(name: str, ns: str = "demo", node: str = "node-1", ip: str = "10.0.0.1",
        labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {"app": name}},
        "spec": {"nodeName": node, "serviceAccountName": "default",
                 "containers": [{"name": "app", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    }


def namespace(name: str, ambient: bool = True) -> dict[str, Any]:
    labels = {"istio.io/dataplane-mode": "ambient"} if ambient else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def authz(name: str, ns: str = "demo", version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": f"security.istio.io/{version}", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {
                "principals": ["cluster.local/ns/demo/sa/bad"]}}]}]}}


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    with FakeKubeApi() as api:
        yield api


class Recorder:
    def __init__(self) -> None:
        self.changes: list[kube.Change] = []

    def __call__(self, changes: Sequence[kube.Change]) -> None:
        self.changes.extend(changes)

    def of(self, kind: kube.ChangeType) -> list[str]:
        return [c.origin for c in self.changes if c.type is kind]


async def eventually(pred: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within_s:.1f}s")
        await asyncio.sleep(0.02)


async def started(fake: FakeKubeApi, settings: kube.SourceSettings = FAST,
                  resources: Sequence[kube.Resource] = kube.RESOURCES
                  ) -> tuple[kube.KubernetesSource, Recorder]:
    api = kube.KubeApi(kube.load_api_client(fake.write_kubeconfig()))
    source = kube.KubernetesSource(api, resources=resources, settings=settings)
    rec = Recorder()
    source.add_listener(rec)
    await source.start(sync_timeout_s=10)
    return source, rec


@pytest.fixture
async def source_for(fake: FakeKubeApi) -> AsyncIterator[Callable[..., Any]]:
    made: list[kube.KubernetesSource] = []

    async def make(**kw: Any) -> tuple[kube.KubernetesSource, Recorder]:
        src, rec = await started(fake, **kw)
        made.append(src)
        return src, rec

    yield make
    for s in made:
        await s.stop()


def origins(source: kube.KubernetesSource) -> set[str]:
    return {o.origin for o in source.objects()}


async def test_initial_list_is_paged_and_items_get_their_kind(
    fake: FakeKubeApi, source_for: Callable[..., Any]
) -> None:
    fake.apply(namespace("demo"))
    for i in range(5):
        fake.apply(pod(f"p{i}", ip=f"10.0.0.{i + 1}"))
    fake.apply(authz("deny-bad"))

    source, _ = await source_for()

    assert origins(source) == {
        "kubernetes:Namespace/demo", "kubernetes:AuthorizationPolicy/demo/deny-bad",
        *(f"kubernetes:Pod/demo/p{i}" for i in range(5)),
    }
    # page_size=2: three list calls for five pods, the later ones with a continue token
    lists = fake.list_requests("pods")
    assert [r.query.get("continue") for r in lists] == [None, "2", "4"]
    assert all(r.query["limit"] == "2" for r in lists)
    bodies = {o.origin: o.body for o in source.objects()}
    p0 = bodies["kubernetes:Pod/demo/p0"]
    assert (p0["kind"], p0["apiVersion"]) == ("Pod", "v1")  # list items carry neither
    ap = bodies["kubernetes:AuthorizationPolicy/demo/deny-bad"]
    assert ap["apiVersion"] == "security.istio.io/v1"
    # every kind watches from its list's version, with bookmarks
    await eventually(lambda: bool(fake.watch_requests("pods")))
    watch = fake.watch_requests("pods")[0]
    assert watch.query["allowWatchBookmarks"] == "true"
    assert watch.query["resourceVersion"] == str(fake.rv)  # the list's version


async def test_added_modified_deleted_flow_through(
    fake: FakeKubeApi, source_for: Callable[..., Any]
) -> None:
    fake.apply(namespace("demo"))
    source, rec = await source_for()

    fake.apply(pod("web"))
    await eventually(lambda: "kubernetes:Pod/demo/web" in origins(source))
    relabelled = pod("web", labels={"app": "web", "istio.io/dataplane-mode": "none"})
    fake.apply(relabelled)
    await eventually(lambda: source.get("Pod", "demo", "web") is not None and source.get(
        "Pod", "demo", "web")["metadata"]["labels"].get("istio.io/dataplane-mode") == "none")
    fake.delete("Pod", "demo", "web")
    await eventually(lambda: "kubernetes:Pod/demo/web" not in origins(source))
    # the cache is the reflector thread's; changes reach listeners through the loop after
    await eventually(lambda: bool(rec.of(kube.ChangeType.DELETE)))

    assert rec.of(kube.ChangeType.UPSERT).count("kubernetes:Pod/demo/web") == 2
    assert rec.of(kube.ChangeType.DELETE) == ["kubernetes:Pod/demo/web"]
    assert len(fake.list_requests("pods")) == 1  # never relisted


async def test_dropped_connection_resumes_from_last_version(
    fake: FakeKubeApi, source_for: Callable[..., Any]
) -> None:
    source, _ = await source_for()
    fake.apply(pod("a"))
    await eventually(lambda: "kubernetes:Pod/demo/a" in origins(source))
    last = source.reflectors["pods"].cache.resource_version

    with fake.offline():  # connection cut; "b" is created while we are away
        fake.apply(pod("b"))
    await eventually(lambda: "kubernetes:Pod/demo/b" in origins(source))

    watches = fake.watch_requests("pods")
    assert len(watches) == 2
    assert watches[1].query["resourceVersion"] == last
    assert len(fake.list_requests("pods")) == 1  # resumed, not relisted


async def test_bookmark_moves_the_resume_version_on(
    fake: FakeKubeApi, source_for: Callable[..., Any]
) -> None:
    source, rec = await source_for()
    fake.apply(namespace("other"))  # moves the server's version, not the pods'
    fake.apply(namespace("other2"))
    before = source.reflectors["pods"].cache.resource_version
    fake.bookmark()
    await eventually(lambda: source.reflectors["pods"].cache.resource_version != before)
    bookmarked = source.reflectors["pods"].cache.resource_version
    assert int(bookmarked) == fake.rv
    assert not [c for c in rec.changes if c.resource.kind == "Pod"]  # a bookmark is no change

    with fake.offline():
        pass
    await eventually(lambda: len(fake.watch_requests("pods")) == 2)
    assert fake.watch_requests("pods")[1].query["resourceVersion"] == bookmarked


async def test_gone_forces_a_relist_that_reconciles_deletions(
    fake: FakeKubeApi, source_for: Callable[..., Any]
) -> None:
    fake.apply(pod("stays"))
    fake.apply(pod("vanishes"))
    source, rec = await source_for()
    assert {"kubernetes:Pod/demo/stays", "kubernetes:Pod/demo/vanishes"} <= origins(source)
    assert "kubernetes:Pod/demo/stays" in rec.of(kube.ChangeType.UPSERT)  # the initial list
    rec.changes.clear()

    with fake.offline():  # while away: one delete, one add, and the history is compacted
        fake.delete("Pod", "demo", "vanishes")
        fake.apply(pod("new"))
        fake.compact()

    await eventually(lambda: "kubernetes:Pod/demo/new" in origins(source))
    # (the relist's changes reach listeners through the loop, after the cache has them)
    await eventually(lambda: "kubernetes:Pod/demo/new" in rec.of(kube.ChangeType.UPSERT))
    assert "kubernetes:Pod/demo/vanishes" not in origins(source)
    assert source.reflectors["pods"].relists_on_gone == 1
    assert len(fake.list_requests("pods")) >= 2
    # the relist emitted a deletion for the object that vanished, not a full reset
    assert rec.of(kube.ChangeType.DELETE) == ["kubernetes:Pod/demo/vanishes"]
    assert "kubernetes:Pod/demo/stays" not in rec.of(kube.ChangeType.UPSERT)


async def test_missing_crd_is_skipped_with_one_warning_and_picked_up_later(
    source_for: Callable[..., Any]
) -> None:
    with FakeKubeApi(BUILTINS) as fake, structlog.testing.capture_logs() as logs:
        fake.apply(pod("a"))
        source, _ = await started(fake)
        try:
            assert source.synced  # start() did not wait for CRDs that are not there
            assert "kubernetes:Pod/demo/a" in origins(source)
            await asyncio.sleep(1.0)  # a few retry periods (0.3 s)
            assert len(fake.list_requests("authorizationpolicies")) >= 6  # v1+v1beta1 per try

            fake.install(ISTIO[0])
            fake.apply(authz("late"))
            await eventually(lambda: "kubernetes:AuthorizationPolicy/demo/late" in origins(source))
        finally:
            await source.stop()
    warnings = [e for e in logs if e["log_level"] == "warning"
                and e.get("resource") == "authorizationpolicies.security.istio.io"]
    assert len(warnings) == 1, warnings
    assert "CRD not installed" in warnings[0]["event"]


async def test_older_served_version_is_used_when_v1_is_absent() -> None:
    only_beta = Collection("AuthorizationPolicy", "authorizationpolicies", "security.istio.io",
                           ("v1beta1",))
    with FakeKubeApi((*BUILTINS, only_beta)) as fake:
        fake.apply(authz("old", version="v1beta1"))
        source, _ = await started(fake)
        try:
            body = source.get("AuthorizationPolicy", "demo", "old")
            assert body is not None
            assert body["apiVersion"] == "security.istio.io/v1beta1"
            assert fake.watch_requests("authorizationpolicies")[0].path == (
                "/apis/security.istio.io/v1beta1/authorizationpolicies")
        finally:
            await source.stop()


async def test_server_errors_back_off_and_recover(
    fake: FakeKubeApi, source_for: Callable[..., Any]
) -> None:
    fake.fail_next["/api/v1/services"] = 403
    fake.apply({"apiVersion": "v1", "kind": "Service",
                "metadata": {"name": "web", "namespace": "demo"},
                "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
    with structlog.testing.capture_logs() as logs:
        source, _ = await source_for()
    assert "kubernetes:Service/demo/web" in origins(source)
    forbidden = [e for e in logs if e.get("status") == 403]
    assert forbidden and "RBAC" in forbidden[0]["event"]


async def test_in_cluster_configuration_with_tls_and_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeKubeApi(BUILTINS + ISTIO + GATEWAY_API, tls=True, token="sa-token-1") as fake:
        from kubernetes.config import incluster_config

        token = tmp_path / "token"
        token.write_text("sa-token-1")
        assert fake.ca_file is not None
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(fake.ca_file))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(fake.port))
        fake.apply(pod("a"))

        source = kube.KubernetesSource(kube.KubeApi(kube.load_api_client()), settings=FAST)
        await source.start(sync_timeout_s=10)
        try:
            assert "kubernetes:Pod/demo/a" in origins(source)
            assert fake.requests[0].headers["authorization"].lower() == "bearer sa-token-1"
        finally:
            await source.stop()


def test_no_configuration_gives_a_helpful_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(kube.KubeConfigError, match="KUBECONFIG"):
        kube.load_api_client(tmp_path / "missing-kubeconfig")


async def test_stop_is_prompt_with_watches_open(
    fake: FakeKubeApi
) -> None:
    source, _ = await started(fake, settings=kube.SourceSettings(watch_timeout_s=600))
    await eventually(lambda: fake.open_watches == len(kube.RESOURCES))
    t0 = time.monotonic()
    await source.stop()
    assert time.monotonic() - t0 < 5.0
    assert all(not r._thread.is_alive() for r in source.reflectors.values())


async def test_feed_hands_the_whole_set_on_every_change(
    fake: FakeKubeApi, source_for: Callable[..., Any]
) -> None:
    fake.apply(pod("a"))
    source, _ = await source_for()
    submitted: list[set[str]] = []
    task = asyncio.create_task(source.feed(
        lambda objs, problems: submitted.append({o.origin for o in objs})))
    try:
        await eventually(lambda: len(submitted) == 1)
        assert "kubernetes:Pod/demo/a" in submitted[0]
        fake.apply(pod("b"))
        await eventually(lambda: any("kubernetes:Pod/demo/b" in s for s in submitted))
        fake.bookmark()  # not a change: nothing more is submitted
        await asyncio.sleep(0.3)
        assert "kubernetes:Pod/demo/b" in submitted[-1] and len(submitted) == 2
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_watches_that_end_at_once_back_off(
    fake: FakeKubeApi, source_for: Callable[..., Any]
) -> None:
    source, _ = await source_for(settings=kube.SourceSettings(
        backoff_initial_s=0.2, backoff_max_s=0.4))
    fake.watch_max_s = 0  # every watch ends at once, empty
    with fake.offline():  # cut the watches opened before
        pass
    before = len(fake.watch_requests("pods"))
    await asyncio.sleep(1.5)
    rewatches = len(fake.watch_requests("pods")) - before
    assert 1 <= rewatches <= 10, rewatches  # not a tight loop of hundreds
    fake.watch_max_s = None
    fake.apply(pod("after"))
    await eventually(lambda: "kubernetes:Pod/demo/after" in origins(source))


async def test_http_410_on_watch_start_also_relists(
    fake: FakeKubeApi, source_for: Callable[..., Any]
) -> None:
    """Some servers answer a too-old watch with HTTP 410 rather than an ERROR event."""
    source, _ = await source_for()
    with fake.offline():
        fake.fail_next["/api/v1/pods"] = 410
        fake.apply(pod("while-away"))
    await eventually(lambda: "kubernetes:Pod/demo/while-away" in origins(source))
    assert source.reflectors["pods"].relists_on_gone == 1
    assert len(fake.list_requests("pods")) == 2


async def test_a_missing_builtin_kind_is_an_error_not_an_absent_crd() -> None:
    builtins_without_slices = tuple(c for c in BUILTINS if c.plural != "endpointslices")
    with FakeKubeApi(builtins_without_slices + ISTIO + GATEWAY_API) as fake, \
            structlog.testing.capture_logs() as logs:
        api = kube.KubeApi(kube.load_api_client(fake.write_kubeconfig()))
        source = kube.KubernetesSource(api, settings=FAST)
        with pytest.raises(kube.KubeError, match="endpointslices"):
            await source.start(sync_timeout_s=1.0)  # never synced: no partial first model
        await source.stop()
    failures = [e for e in logs if e.get("resource") == "endpointslices.discovery.k8s.io"
                and e["log_level"] == "warning"]
    assert failures and all(e.get("status") == 404 for e in failures)
    assert not any("CRD not installed" in e["event"] for e in failures)
