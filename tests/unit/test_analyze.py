"""``ztunnel-py analyze``: the controller's problems, printed with file, field and hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from ztunnel_py.cli import main


def write(root: Path, name: str, text: str) -> None:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


GOOD = """
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo}
spec: {nodeName: n1}
status: {podIP: 10.0.0.1}
"""


def test_clean_directory_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "ok.yaml", GOOD)
    assert main(["analyze", str(tmp_path)]) == 0
    assert "No problems found" in capsys.readouterr().out


def test_errors_are_printed_with_file_document_field_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, "ok.yaml", GOOD)
    write(tmp_path, "sub/vs.yml", """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r, namespace: demo}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews, subset: v9}
      wieght: 5
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: r2, namespace: demo}
spec:
  http:
  - route:
    - destination: {host: reviews, subset: v9}
""")
    write(tmp_path, "broken.yaml", "kind: Pod\nmetadata: {name: [\n")
    write(tmp_path, "z-dup.yaml", GOOD.split("---")[1].replace("name: a", "name: b"))
    assert main(["analyze", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert ("Error [sub/vs.yml#doc1] VirtualService demo/r spec.http[0].route[0].wieght: "
            "unknown field 'wieght' in HTTPRouteDestination (hint: did you mean 'weight'?)") in out
    assert "Error [sub/vs.yml#doc2] VirtualService demo/r2 " \
           "spec.http[0].route[0].destination.subset: subset 'v9'" in out
    assert "Error [broken.yaml] line 3, column 1:" in out and "YAML does not parse" in out
    assert "Error [z-dup.yaml#doc1] Pod demo/b status.podIP: IP 10.0.0.1 is already used by " \
           "Pod demo/a (ok.yaml#doc2)" in out
    assert "4 error(s)" in out


def test_warnings_only_exit_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tmp_path, "a.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\n"
          "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: d}\n"
          "spec: {nodeName: n1}\n")
    assert main(["analyze", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Warning [a.yaml#doc2] Pod d/p status.podIP: pod has no IP address yet" in out
    assert "ConfigMap" not in out


def test_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    write(tmp_path, "a.yaml", "apiVersion: v1\nkind: Gizmo\nmetadata: {name: c}\n")
    assert main(["analyze", "--json", str(tmp_path)]) == 1
    (p,) = json.loads(capsys.readouterr().out)
    assert p["origin"] == "a.yaml#doc1" and p["field"] == "kind" and p["severity"] == "error"


def test_missing_directory_exits_two(tmp_path: Path) -> None:
    assert main(["analyze", str(tmp_path / "nope")]) == 2
