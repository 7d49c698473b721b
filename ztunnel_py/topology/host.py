"""The host seam: iproute2 commands, cgroup v2 directories, processes by PID.

Everything that touches the machine for the topology goes through here, with
errors wrapped into :class:`TopologyError` subclasses that say what to check.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")
CMD_TIMEOUT = 15.0


class TopologyError(Exception):
    """Base of the topology's errors."""


class CommandError(TopologyError):
    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr.strip()
        hint = ""
        if os.geteuid() != 0:
            hint = " (network namespaces need root)"
        elif "File exists" in self.stderr:
            hint = " (a leftover of an earlier run? sweep its prefix)"
        super().__init__(
            f"`{' '.join(self.argv)}` failed (exit {returncode}): {self.stderr or '-'}{hint}"
        )


def cmd(argv: Sequence[str], *, timeout: float = CMD_TIMEOUT, check: bool = True) -> str:
    """Run a short host command; its stdout, or :class:`CommandError`."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandError(argv, None, str(exc)) from exc
    if check and done.returncode != 0:
        raise CommandError(argv, done.returncode, done.stderr)
    return done.stdout


def ip(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(("-n", netns) if netns else ()), *args]
    return cmd(argv, check=check)


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run in ``netns`` (network namespace only: /sys and bpffs
    stay the host's, which the agent needs; unlike ``ip netns exec``)."""
    return ["nsenter", f"--net={netns_path(netns)}", "--", *argv]


def list_netns() -> list[str]:
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def netns_pids(netns: str) -> list[int]:
    out = ip("netns", "pids", netns, check=False)
    return [int(x) for x in out.split() if x.isdigit()]


def sysctl(netns: str, *settings: str) -> None:
    cmd(in_netns(netns, ["sysctl", "-q", "-w", *settings]))


# -- cgroup v2 ------------------------------------------------------------------


def cgroup2_root() -> Path:
    """Where cgroup v2 is mounted (``/sys/fs/cgroup/unified`` on hybrid hosts)."""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return Path(parts[1])
    raise TopologyError(
        "no cgroup v2 mount found in /proc/self/mounts; "
        "mount one: mount -t cgroup2 none /sys/fs/cgroup/unified"
    )


def cgroup_pids(path: Path) -> list[int]:
    """PIDs in the cgroup at ``path`` and every cgroup below it."""
    pids: list[int] = []
    if not path.is_dir():
        return pids
    for procs in sorted(path.rglob("cgroup.procs")):
        with contextlib.suppress(OSError):
            pids.extend(int(x) for x in procs.read_text().split())
    return pids


def remove_cgroup_tree(path: Path, timeout: float = 3.0) -> None:
    """rmdir ``path`` and its children, deepest first, waiting for exiting tasks."""
    if not path.is_dir():
        return
    deadline = time.monotonic() + timeout
    dirs = sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for d in [*dirs, path]:
        while True:
            try:
                d.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise TopologyError(f"cannot remove cgroup {d}: {exc}") from exc
                time.sleep(0.05)


def in_cgroup(path: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to start inside the cgroup at ``path``: a shell moves itself there
    and execs it (the same PID). Not a ``preexec_fn``: Python code between fork and exec
    forces a plain fork, and in a process with threads (gRPC's, in the tests and the demo)
    the child can deadlock there, in gRPC's at-fork handler or on a lock, and never exec."""
    return ["sh", "-c", 'echo 0 > "$0/cgroup.procs" && exec "$@"', str(path), *argv]


# -- processes, by PID --------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), or None if it's gone.

    Stored next to a PID so that a later ``kill`` never hits a recycled PID.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


@dataclass(frozen=True)
class ProcessRecord:
    pid: int
    start: int | None
    target: str  # pod or node name
    argv: tuple[str, ...]
    log: str | None = None

    def alive(self) -> bool:
        now = start_ticks(self.pid)
        if now is None or (self.start is not None and now != self.start):
            return False
        with contextlib.suppress(OSError):
            state = Path(f"/proc/{self.pid}/stat").read_text()
            if state[state.rindex(")") + 2] == "Z":
                return False
        return True


def kill_pids(records: Sequence[ProcessRecord], grace: float = 2.0) -> list[str]:
    """SIGTERM, then SIGKILL after ``grace`` seconds, exactly these processes.

    Returns error strings (never raises): teardown goes on regardless.
    """
    errors: list[str] = []
    live = [r for r in records if r.alive()]
    for r in live:
        try:
            os.kill(r.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        except OSError as exc:
            errors.append(f"kill {r.pid} ({r.target}): {exc}")
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(r.alive() for r in live):
        time.sleep(0.05)
    for r in live:
        if r.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(r.pid, signal.SIGKILL)
    return errors


def kill_unrecorded(pids: Sequence[int], grace: float = 1.0) -> None:
    """Kill processes found inside our own namespaces/cgroups (children of ours)."""
    records = [ProcessRecord(p, start_ticks(p), "?", ()) for p in set(pids) if p != os.getpid()]
    kill_pids(records, grace)
