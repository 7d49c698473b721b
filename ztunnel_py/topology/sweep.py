"""Find and remove what a run with a given prefix left behind (after a crash)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ztunnel_py.topology import host
from ztunnel_py.topology.spec import IFACE_SUFFIX, check_prefix


def _root_links(prefix: str) -> list[str]:
    out = host.ip("-o", "link", "show", check=False)
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        name = parts[1].strip().split("@", 1)[0]
        if name.startswith(prefix) and IFACE_SUFFIX.match(name[len(prefix) :]):
            names.append(name)
    return names


def _netns(prefix: str) -> list[str]:
    return [n for n in host.list_netns() if n.startswith(prefix + "-")]


def _cgroup(prefix: str) -> Path | None:
    try:
        return host.cgroup2_root() / prefix
    except host.TopologyError:
        return None


BPFFS = Path("/sys/fs/bpf")


def bpf_pin_dir(prefix: str) -> Path:
    """Where a run's agents pin their eBPF programs and maps (``--bpf-pin-root``)."""
    check_prefix(prefix)
    return BPFFS / prefix


def leftovers(prefix: str) -> list[str]:
    """Everything on this host that carries ``prefix``: empty after a clean teardown."""
    check_prefix(prefix)
    found = [f"netns {n}" for n in _netns(prefix)]
    found += [f"link {n}" for n in _root_links(prefix)]
    cg = _cgroup(prefix)
    if cg is not None and cg.exists():
        found.append(f"cgroup {cg}")
    if bpf_pin_dir(prefix).exists():
        found.append(f"bpf pins {bpf_pin_dir(prefix)}")
    return found


def sweep(prefix: str) -> list[str]:
    """Remove every process, netns, root-namespace link and cgroup of ``prefix``.

    Processes are found by PID inside the run's own cgroups and namespaces.
    Each step runs even if an earlier one failed; returns the errors (empty
    when everything is gone).
    """
    check_prefix(prefix)
    errors: list[str] = []
    cg = _cgroup(prefix)
    names = _netns(prefix)
    pids: list[int] = []
    if cg is not None:
        pids += host.cgroup_pids(cg)
    for n in names:
        pids += host.netns_pids(n)
    host.kill_unrecorded(pids)
    for n in names:
        try:
            host.ip("netns", "del", n)
        except host.TopologyError as exc:
            errors.append(str(exc))
    for link in _root_links(prefix):
        try:
            host.ip("link", "del", link)
        except host.TopologyError as exc:
            errors.append(str(exc))
    if cg is not None:
        try:
            host.remove_cgroup_tree(cg)
        except host.TopologyError as exc:
            errors.append(str(exc))
    pins = bpf_pin_dir(prefix)
    if pins.exists():  # programs whose interfaces went with the namespaces; unlinking frees them
        try:
            shutil.rmtree(pins)
        except OSError as exc:
            errors.append(f"removing {pins}: {exc}")
    return errors
