"""The demo's config directory (apply/delete like kubectl) and its world's manifests."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from ztunnel_py.demo import configdir
from ztunnel_py.demo.configdir import ManifestError
from ztunnel_py.demo.httpservice import Request, parse_head, respond
from ztunnel_py.demo.world import DEFAULT_WORLD, manifests, topology_spec
from ztunnel_py.topology import plan

POLICY = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-client
  namespace: demo
spec:
  action: ALLOW
---
---
apiVersion: v1
kind: Namespace
metadata:
  name: extra
  namespace: ignored-for-cluster-scoped
"""


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_apply_is_idempotent_and_reports_like_kubectl(tmp_path: Path) -> None:
    cfg = tmp_path / "config"
    f = _write(tmp_path / "policy.yaml", POLICY)
    assert configdir.apply_paths(cfg, [f]) == [
        "authorizationpolicy.security.istio.io/allow-client -n demo created",
        "namespace/extra created",
    ]
    assert sorted(p.name for p in cfg.iterdir()) == [
        "_cluster--namespace--extra.yaml",
        "demo--authorizationpolicy.security.istio.io--allow-client.yaml",
    ]
    stored = yaml.safe_load((cfg / "_cluster--namespace--extra.yaml").read_text())
    assert stored["metadata"]["name"] == "extra"
    assert configdir.apply_paths(cfg, [f])[0].endswith("unchanged")
    _write(tmp_path / "policy.yaml", POLICY.replace("ALLOW", "DENY"))
    assert configdir.apply_paths(cfg, [f])[0].endswith("configured")
    assert configdir.delete_paths(cfg, [f]) == [
        "authorizationpolicy.security.istio.io/allow-client -n demo deleted",
        "namespace/extra deleted",
    ]
    assert list(cfg.iterdir()) == []
    assert configdir.delete_paths(cfg, [f])[0].endswith("not found")


def test_a_directory_and_lists_and_default_namespace(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "a.yaml", "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sa1}\n")
    _write(
        src / "b.json",
        '{"apiVersion": "v1", "kind": "List", "items": ['
        '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "x"}}]}',
    )
    _write(src / "notes.txt", "ignored")
    lines = configdir.apply_paths(tmp_path / "cfg", [str(src)])
    assert lines == ["serviceaccount/sa1 -n default created", "configmap/c -n x created"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: Foo\n  bad: [\n", "not valid YAML (line 2"),
        ("- just\n- a list\n", "expected a mapping"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {}\n", "missing metadata.name"),
        ("kind: Pod\nmetadata: {name: p}\n", "missing apiVersion"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: ../x}\n", "not a valid object name"),
        ("", "no Kubernetes objects"),
        ("apiVersion: v1\nkind: List\nitems: 3\n", "needs a list of items"),
    ],
)
def test_bad_input_names_the_file_and_writes_nothing(
    tmp_path: Path, text: str, message: str
) -> None:
    good = _write(tmp_path / "good.yaml", POLICY)
    bad = _write(tmp_path / "bad.yaml", text)
    cfg = tmp_path / "cfg"
    with pytest.raises(ManifestError, match=re.escape(message)) as err:
        configdir.apply_paths(cfg, [good, bad])
    assert str(tmp_path / "bad.yaml") in str(err.value)
    assert not cfg.exists() or list(cfg.iterdir()) == []


def test_missing_path_and_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file"):
        configdir.load_objects([str(tmp_path / "nope.yaml")])
    with pytest.raises(ManifestError, match=re.escape("no *.yaml")):
        configdir.load_objects([str(tmp_path)])


def test_world_manifests_carry_ips_nodes_and_vips() -> None:
    layout = plan(topology_spec(DEFAULT_WORLD, "zdtest01"))
    objs = manifests(DEFAULT_WORLD, layout)
    by = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs}
    hw1 = by[("Pod", "demo", "helloworld-v1")]
    assert hw1["spec"]["nodeName"] == "node2"
    assert hw1["spec"]["serviceAccountName"] == "helloworld"
    assert hw1["status"]["podIP"] == layout.pod("helloworld-v1").ip
    assert hw1["status"]["podIPs"] == [{"ip": layout.pod("helloworld-v1").ip}]
    assert hw1["metadata"]["labels"] == {"app": "helloworld", "version": "v1"}
    assert hw1["spec"]["containers"][0]["ports"][0]["containerPort"] == 8080
    svc = by[("Service", "demo", "helloworld")]
    assert svc["spec"]["clusterIP"] == "10.96.0.10"
    assert svc["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}
    ]
    assert svc["spec"]["selector"] == {"app": "helloworld"}
    # `demo` starts outside the mesh (the story labels it); `other` is ambient from the start
    assert "istio.io/dataplane-mode" not in by[("Namespace", None, "demo")]["metadata"]["labels"]
    other = by[("Namespace", None, "other")]
    assert other["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    assert ("ServiceAccount", "other", "visitor") in by
    node_of = {p.name: p.node for p in layout.pods}
    assert node_of["client"] != node_of["helloworld-v1"]  # the demo's request crosses nodes
    # Every object gets its own file in the config dir.
    refs = {configdir.ref_of(o, "world").filename for o in objs}
    assert len(refs) == len(objs)


def test_httpservice_answers_with_pod_and_version() -> None:
    method, target, version, headers = parse_head(b"GET /headers HTTP/1.1\r\nHost: x\r\nX-Test: 1")
    req = Request(method, target, version, headers, b"")
    status, ctype, body = respond(req, "hw", "v2")
    assert (status, ctype) == (200, "application/json")
    assert b'"x-test": "1"' in body
    plain = respond(Request("GET", "/", "HTTP/1.1", (), b""), "hw", "v2")
    assert plain[2] == b"Hello version: v2, instance: hw\n"
    assert respond(Request("GET", "/status/503", "HTTP/1.1", (), b""), "hw", "v2")[0] == 503
    assert not Request("GET", "/", "HTTP/1.0", (), b"").keep_alive
