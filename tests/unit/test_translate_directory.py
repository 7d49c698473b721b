"""The directory source's reading rules (the first step of translation in directory mode)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ztunnel_py.controller.directory import DirectoryLoader, SourceError, parse_documents

POD = """apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: demo}}
status: {{podIP: {ip}}}
"""


def names(objects: list) -> list[str]:  # type: ignore[type-arg]
    return [o.body["metadata"]["name"] for o in objects]


def touch_later(path: Path, text: str) -> None:
    """Write ``text`` and make sure the mtime moves even on a coarse-clock filesystem."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    if path.stat().st_mtime_ns == before:
        os.utime(path, ns=(before + 1_000_000, before + 1_000_000))


def test_multi_document_recursive_with_origins(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.yaml").write_text(POD.format(name="a", ip="10.0.0.1") + "---\n---\n"
                                     + POD.format(name="b", ip="10.0.0.2"))
    (tmp_path / "sub" / "c.yml").write_text(POD.format(name="c", ip="10.0.0.3"))
    (tmp_path / "notes.txt").write_text("kind: Pod")
    (tmp_path / ".hidden.yaml").write_text(POD.format(name="h", ip="10.0.0.4"))
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.yaml").write_text(POD.format(name="g", ip="10.0.0.5"))
    objects, problems = DirectoryLoader(tmp_path).load()
    assert problems == []
    assert [o.origin for o in objects] == ["a.yaml#doc1", "a.yaml#doc3", "sub/c.yml#doc1"]
    assert names(objects) == ["a", "b", "c"]


def test_a_file_that_stops_parsing_keeps_its_last_good_objects(tmp_path: Path) -> None:
    f = tmp_path / "a.yaml"
    f.write_text(POD.format(name="a", ip="10.0.0.1"))
    loader = DirectoryLoader(tmp_path)
    first, _ = loader.load()
    touch_later(f, "kind: Pod\nmetadata: {name: [\n")
    objects, problems = loader.load()
    assert objects == first and objects[0] is first[0]
    assert [p.severity for p in problems] == ["error", "warning"]
    assert problems[0].origin == "a.yaml" and "line 3" in problems[0].field
    assert "keeping this file's last good objects (1)" in problems[1].message
    # fixed again: the new content applies and the problems go away
    touch_later(f, POD.format(name="a2", ip="10.0.0.1"))
    objects, problems = loader.load()
    assert names(objects) == ["a2"] and problems == []


def test_a_new_bad_file_contributes_nothing_but_a_problem(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(": : :\n")
    objects, problems = DirectoryLoader(tmp_path).load()
    assert objects == [] and len(problems) == 1 and problems[0].severity == "error"


def test_unchanged_files_are_not_read_again_and_deletions_count(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(POD.format(name="a", ip="10.0.0.1"))
    (tmp_path / "b.yaml").write_text(POD.format(name="b", ip="10.0.0.2"))
    loader = DirectoryLoader(tmp_path)
    first, _ = loader.load()
    generation = loader.generation
    again, _ = loader.load()
    assert loader.generation == generation
    assert all(x is y for x, y in zip(first, again, strict=True))  # the same objects
    (tmp_path / "b.yaml").unlink()
    objects, _ = loader.load()
    assert names(objects) == ["a"] and objects[0] is first[0]
    assert loader.generation == generation + 1


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        DirectoryLoader(tmp_path / "nope").load()


def test_parse_documents_names_the_line() -> None:
    objects, problems = parse_documents("a: 1\nb: [\n", "x.yaml")
    assert objects == [] and problems[0].origin == "x.yaml"
    assert problems[0].field.startswith("line ")
