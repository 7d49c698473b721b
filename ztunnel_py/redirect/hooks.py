"""The capture programs: one :class:`Hook` per C file in bpf/, and their sources.

bcc rewrites map calls (``zt_pods.lookup(...)``) only in the file it is handed,
not in included headers, so :func:`expand` inlines the project's own
``#include "..."`` headers (kernel ``<...>`` headers stay includes). The
result is keyed by :func:`source_hash`, which names the pin directory: a
changed program gets fresh pins, an unchanged one reuses what is pinned.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DEFAULT_BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


@dataclass(frozen=True)
class Hook:
    name: str  # program function, pin name and tc filter name (<= 15 chars)
    source: str  # file in bpf/
    direction: Literal["ingress", "egress"]
    where: Literal["pod", "underlay"]


POD_INGRESS = Hook("zt_pod_ingress", "tc_pod_ingress.c", "ingress", "pod")
POD_EGRESS = Hook("zt_pod_egress", "tc_pod_egress.c", "egress", "pod")
UNDERLAY_INGRESS = Hook("zt_underlay_in", "tc_underlay_ingress.c", "ingress", "underlay")
HOOKS = (POD_INGRESS, POD_EGRESS, UNDERLAY_INGRESS)
POD_HOOKS = (POD_INGRESS, POD_EGRESS)


class SourceError(ValueError):
    """A bpf/ source is missing or includes a header that is not in bpf/include/."""


def expand(path: Path, include_dir: Path, _seen: set[Path] | None = None) -> str:
    """``path`` with every quoted include from ``include_dir`` inlined once."""
    seen = set() if _seen is None else _seen
    try:
        text = path.read_text()
    except OSError as exc:
        raise SourceError(f"cannot read BPF source {path}: {exc.strerror}") from None
    out: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        m = _INCLUDE.match(line)
        if not m:
            out.append(line)
            continue
        header = (include_dir / m.group(1)).resolve()
        if not header.is_file():
            raise SourceError(f"{path}:{lineno}: {m.group(1)!r} not found in {include_dir}")
        if header not in seen:
            seen.add(header)
            out.append(f"/* --- {m.group(1)} --- */")
            out.append(expand(header, include_dir, seen))
    return "\n".join(out) + "\n"


def source_hash(bpf_dir: Path = DEFAULT_BPF_DIR) -> str:
    """A short digest of every hook's expanded source: it names the pin directory."""
    digest = hashlib.sha256()
    for hook in HOOKS:
        digest.update(hook.name.encode() + b"\0")
        digest.update(expand(bpf_dir / hook.source, bpf_dir / "include").encode())
    return digest.hexdigest()[:16]
