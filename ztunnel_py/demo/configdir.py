"""The demo's config directory, managed the way ``kubectl apply`` manages a cluster.

One file per object, named after the object's identity
(``<namespace>--<kind>[.<group>]--<name>.yaml``; ``_cluster`` for cluster-scoped
kinds), so applying an object again replaces it and deleting it removes exactly
it, whichever file it came from. Files are written atomically (temp + rename)
so that a watcher never sees half a manifest. Input is validated completely
before anything is written: a bad document names its file and position.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "Node",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "GatewayClass",
        "PersistentVolume",
        "StorageClass",
        "ValidatingWebhookConfiguration",
        "MutatingWebhookConfiguration",
    }
)
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(ValueError):
    """A manifest can't be applied; the message names the file and the document."""


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    namespace: str | None
    name: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0] if "/" in self.api_version else ""

    @property
    def filename(self) -> str:
        kind = self.kind.lower() + (f".{self.group}" if self.group else "")
        return f"{self.namespace or '_cluster'}--{kind}--{self.name}.yaml"

    def __str__(self) -> str:
        kind = self.kind.lower() + (f".{self.group}" if self.group else "")
        where = f" -n {self.namespace}" if self.namespace else ""
        return f"{kind}/{self.name}{where}"


def ref_of(obj: Any, where: str) -> ObjectRef:
    """The identity of one parsed document; :class:`ManifestError` if it has none."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: expected a mapping (a Kubernetes object), got {obj!r:.60}")
    missing = [k for k in ("apiVersion", "kind") if not isinstance(obj.get(k), str)]
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        missing.append("metadata.name")
    if missing:
        raise ManifestError(f"{where}: missing {', '.join(missing)}")
    assert isinstance(meta, dict)
    name = meta["name"]
    if "/" in name or name.startswith("."):
        raise ManifestError(f"{where}: metadata.name {name!r} is not a valid object name")
    kind = obj["kind"]
    ns = meta.get("namespace")
    if kind in CLUSTER_SCOPED:
        ns = None
    elif ns is None:
        ns = "default"
    elif not isinstance(ns, str) or not ns or "/" in ns:
        raise ManifestError(f"{where}: metadata.namespace {ns!r} is not a valid namespace")
    return ObjectRef(obj["apiVersion"], kind, ns, name)


def parse_manifests(text: str, source: str) -> list[tuple[ObjectRef, dict[str, Any]]]:
    """Every object in a YAML (or JSON) stream; ``List`` kinds are expanded."""
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(f"{source}: not valid YAML{at}: {problem}") from exc
    out: list[tuple[ObjectRef, dict[str, Any]]] = []
    for i, doc in enumerate(docs, start=1):
        if doc is None:
            continue  # an empty document between '---' separators
        where = f"{source}: document {i}"
        if isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List"):
            items = doc.get("items")
            if not isinstance(items, list):
                raise ManifestError(f"{where}: a {doc['kind']} needs a list of items")
            for j, item in enumerate(items):
                out.append((ref_of(item, f"{where} item {j}"), item))
            continue
        out.append((ref_of(doc, where), doc))
    if not out:
        raise ManifestError(f"{source}: no Kubernetes objects in it")
    return out


def expand_paths(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(source name, text) for each ``-f``: files, directories of manifests, or ``-`` (stdin)."""
    sources: list[tuple[str, str]] = []
    for p in paths:
        if p == "-":
            sources.append(("<stdin>", sys.stdin.read()))
            continue
        path = Path(p)
        if path.is_dir():
            files = sorted(f for f in path.iterdir() if f.suffix in MANIFEST_SUFFIXES)
            if not files:
                raise ManifestError(f"{path}: no *.yaml, *.yml or *.json files in this directory")
        elif path.exists():
            files = [path]
        else:
            raise ManifestError(f"{path}: no such file or directory")
        for f in files:
            try:
                sources.append((str(f), f.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as exc:
                raise ManifestError(f"{f}: cannot read: {exc}") from exc
    return sources


def load_objects(paths: Sequence[str]) -> list[tuple[ObjectRef, dict[str, Any]]]:
    """Parse and validate every ``-f`` argument before anything is written."""
    objs: list[tuple[ObjectRef, dict[str, Any]]] = []
    for source, text in expand_paths(paths):
        objs += parse_manifests(text, source)
    return objs


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dump(obj: dict[str, Any]) -> str:
    return yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)


def write_objects(config_dir: Path, objs: Iterable[tuple[ObjectRef, dict[str, Any]]]) -> list[str]:
    """Apply: one line per object, ``<ref> created|configured|unchanged``."""
    config_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for ref, obj in objs:
        path = config_dir / ref.filename
        text = dump(obj)
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old == text:
            lines.append(f"{ref} unchanged")
            continue
        _write_atomic(path, text)
        lines.append(f"{ref} {'configured' if old is not None else 'created'}")
    return lines


def delete_objects(config_dir: Path, refs: Iterable[ObjectRef]) -> list[str]:
    """Delete: one line per object, ``<ref> deleted`` or ``... not found``."""
    lines = []
    for ref in refs:
        path = config_dir / ref.filename
        try:
            path.unlink()
            lines.append(f"{ref} deleted")
        except FileNotFoundError:
            lines.append(f"{ref} not found")
    return lines


def apply_paths(config_dir: Path, paths: Sequence[str]) -> list[str]:
    return write_objects(config_dir, load_objects(paths))


def delete_paths(config_dir: Path, paths: Sequence[str]) -> list[str]:
    return delete_objects(config_dir, (ref for ref, _ in load_objects(paths)))
