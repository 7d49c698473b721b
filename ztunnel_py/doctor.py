"""``ztunnel-py doctor``: can this host run the agent?

Each check is a small probe returning a :class:`Result` (status, what was
found, how to fix it). Probes touch the host; everything else (choosing the
header directory, the table, the exit status) is pure and unit-tested. Probes
that need a network namespace make an anonymous one (``unshare --net``) that
disappears with the probe, so the doctor never leaves anything behind.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ztunnel_py.topology import TopologyError, cgroup2_root

OK, FAIL, WARN = "ok", "FAIL", "warn"
DEFAULT_HEADERS = Path("/opt/ztunnel-py/kernel-headers")
CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF = 12, 21, 39
PROBE_TIMEOUT = 20.0
# bpf(2) syscall numbers by machine.
BPF_SYSCALL = {"x86_64": 321, "aarch64": 280, "ppc64le": 361, "s390x": 351, "riscv64": 280}


@dataclass(frozen=True)
class Result:
    check: str
    status: str  # OK, FAIL or WARN
    detail: str
    fix: str = ""
    required: bool = True


Probe = Callable[[Mapping[str, str]], Result]


# -- pure decisions -----------------------------------------------------------


def caps_from_status(status_text: str) -> int:
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def privileges_result(euid: int, cap_eff: int) -> Result:
    has = {
        n: bool(cap_eff >> bit & 1)
        for n, bit in (("CAP_BPF", CAP_BPF), ("CAP_NET_ADMIN", CAP_NET_ADMIN))
    }
    if euid == 0 or all(has.values()):
        who = "root" if euid == 0 else "not root"
        return Result("privileges", OK, f"{who}; CapEff={cap_eff:#x}")
    missing = ", ".join(n for n, v in has.items() if not v)
    return Result(
        "privileges",
        FAIL,
        f"uid {euid}, missing {missing}",
        "run as root, or grant CAP_BPF,CAP_NET_ADMIN (and CAP_SYS_ADMIN for cgroup hooks)",
    )


def choose_headers(env: Mapping[str, str], release: str) -> tuple[Path, str]:
    """The kernel-header tree bcc will use, and why: same order as bcc plus our default."""
    if env.get("BCC_KERNEL_SOURCE"):
        return Path(env["BCC_KERNEL_SOURCE"]), "BCC_KERNEL_SOURCE"
    build = Path(f"/lib/modules/{release}/build")
    if build.exists():
        return build, f"/lib/modules/{release}/build"
    return DEFAULT_HEADERS, "the default of `make setup`"


def headers_result(path: Path, source: str) -> Result:
    fix = (
        "run `make setup` (merges Debian's linux-headers into /opt/ztunnel-py/kernel-headers), "
        "then export BCC_KERNEL_SOURCE=/opt/ztunnel-py/kernel-headers"
    )
    if source == "BCC_KERNEL_SOURCE":
        fix = (
            f"BCC_KERNEL_SOURCE={path} is not a kernel header tree: point it at one "
            "(export BCC_KERNEL_SOURCE=/opt/ztunnel-py/kernel-headers after `make setup`) "
            "or unset it"
        )
    needed = ("include/linux/kconfig.h", "include/generated/autoconf.h")
    if not path.is_dir():
        return Result("kernel headers", FAIL, f"{path} (from {source}) does not exist", fix)
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        return Result(
            "kernel headers", FAIL, f"{path} (from {source}) lacks {', '.join(missing)}", fix
        )
    return Result("kernel headers", OK, f"{path} (from {source})")


def exit_status(results: Sequence[Result]) -> int:
    return 1 if any(r.status == FAIL and r.required for r in results) else 0


def render_table(results: Sequence[Result]) -> str:
    rows = [("CHECK", "STATUS", "DETAIL", "FIX")]
    rows += [(r.check, r.status, r.detail, r.fix or "-") for r in results]
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    failed = [r for r in results if r.status == FAIL and r.required]
    lines.append("")
    lines.append(
        f"{len(failed)} required check(s) failed: this host cannot run the agent yet"
        if failed
        else "all required checks passed"
    )
    return "\n".join(lines)


# -- probes (touch the host) ----------------------------------------------------


def _run(argv: Sequence[str], env: Mapping[str, str] | None = None) -> tuple[int, str]:
    try:
        done = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
            env=dict(env) if env is not None else None,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, str(exc)
    return done.returncode, (done.stderr or done.stdout).strip()


def probe_privileges(env: Mapping[str, str]) -> Result:
    status = Path("/proc/self/status").read_text()
    return privileges_result(os.geteuid(), caps_from_status(status))


def probe_bpf_syscall(env: Mapping[str, str]) -> Result:
    nr = BPF_SYSCALL.get(platform.machine())
    if nr is None:
        return Result("bpf syscall", WARN, f"unknown machine {platform.machine()}; not probed")
    # union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
    attr = (ctypes.c_uint32 * 32)(2, 4, 4, 1)  # BPF_MAP_TYPE_ARRAY
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(nr, 0, ctypes.byref(attr), ctypes.sizeof(attr))  # 0 = BPF_MAP_CREATE
    if fd < 0:
        err = ctypes.get_errno()
        return Result(
            "bpf syscall",
            FAIL,
            f"BPF_MAP_CREATE failed: {os.strerror(err)}",
            "needs CAP_BPF/root; check kernel.unprivileged_bpf_disabled and seccomp "
            "(containers: --privileged)",
        )
    os.close(fd)
    return Result("bpf syscall", OK, "created and closed an array map")


def probe_btf(env: Mapping[str, str]) -> Result:
    btf = Path("/sys/kernel/btf/vmlinux")
    if btf.is_file() and os.access(btf, os.R_OK):
        return Result("BTF", OK, f"{btf} ({btf.stat().st_size // 1024} KiB)")
    return Result("BTF", FAIL, f"{btf} missing", "use a kernel built with CONFIG_DEBUG_INFO_BTF=y")


def probe_netns(env: Mapping[str, str]) -> Result:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return Result(
            "netns", FAIL, "unshare or ip not found", "apt-get install util-linux iproute2"
        )
    rc, out = _run(["unshare", "--net", "ip", "link", "add", "zd0", "type", "veth", "peer", "zd1"])
    if rc != 0:
        return Result(
            "netns", FAIL, f"cannot make a netns with a veth: {out}",
            "needs root/CAP_SYS_ADMIN and CONFIG_NET_NS, CONFIG_VETH",
        )  # fmt: skip
    return Result("netns", OK, "made a throw-away netns with a veth pair")


def probe_tc_clsact(env: Mapping[str, str]) -> Result:
    script = (
        "ip link add zd0 type veth peer name zd1 && tc qdisc add dev zd0 clsact && "
        "tc qdisc show dev zd0"
    )
    rc, out = _run(["unshare", "--net", "sh", "-c", script])
    if rc != 0 or "clsact" not in out:
        return Result(
            "tc clsact", FAIL, f"cannot add a clsact qdisc: {out}",
            "needs CONFIG_NET_SCH_INGRESS (sch_ingress module: modprobe sch_ingress) and tc",
        )  # fmt: skip
    return Result("tc clsact", OK, "added clsact to a veth in a throw-away netns")


def probe_cgroup2(env: Mapping[str, str]) -> Result:
    try:
        root = cgroup2_root()
    except TopologyError as exc:
        return Result("cgroup v2", FAIL, str(exc), "mount -t cgroup2 none /sys/fs/cgroup/unified")
    return Result("cgroup v2", OK, f"mounted at {root}")


def probe_bpffs(env: Mapping[str, str]) -> Result:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "/sys/fs/bpf" and parts[2] == "bpf":
            return Result("bpffs", OK, "mounted at /sys/fs/bpf")
    return Result(
        "bpffs", FAIL, "/sys/fs/bpf is not a bpf filesystem", "mount -t bpf bpf /sys/fs/bpf"
    )


def probe_headers(env: Mapping[str, str]) -> Result:
    path, source = choose_headers(env, platform.release())
    return headers_result(path, source)


TRIAL_PROGRAM = "int trial(void *ctx) { return 0; }"


def probe_bcc(env: Mapping[str, str]) -> Result:
    """Import bcc and compile a trivial program, in a child (a bad compile can crash)."""
    path, _ = choose_headers(env, platform.release())
    child_env = {**env, "BCC_KERNEL_SOURCE": str(path)}
    code = f"from bcc import BPF; BPF(text={TRIAL_PROGRAM!r}); print('compiled')"
    rc, out = _run([sys.executable, "-c", code], env=child_env)
    if rc == 0:
        return Result("bcc", OK, f"imported and compiled a trial program (headers {path})")
    last = out.splitlines()[-1] if out else f"exit {rc}"
    if "No module named 'bcc'" in out:
        return Result(
            "bcc", FAIL, "cannot import bcc",
            "apt-get install python3-bpfcc, then `make setup` (links it into .venv)",
        )  # fmt: skip
    return Result(
        "bcc", FAIL, f"trial compile failed with headers {path}: {last}",
        "fix the kernel headers check first (BCC_KERNEL_SOURCE=/opt/ztunnel-py/kernel-headers)",
    )  # fmt: skip


PROBES: tuple[Probe, ...] = (
    probe_privileges,
    probe_bpf_syscall,
    probe_btf,
    probe_netns,
    probe_tc_clsact,
    probe_cgroup2,
    probe_bpffs,
    probe_headers,
    probe_bcc,
)


def _guarded(probe: Probe, env: Mapping[str, str]) -> Result:
    try:
        return probe(env)
    except Exception as exc:  # a probe's own bug must not hide the other checks
        name = probe.__name__.removeprefix("probe_")
        return Result(name, FAIL, f"probe crashed: {type(exc).__name__}: {exc}")


def run_checks(
    env: Mapping[str, str] | None = None, probes: Sequence[Probe] = PROBES
) -> list[Result]:
    """Every probe, concurrently (the whole run takes about a second)."""
    env = dict(os.environ if env is None else env)
    with ThreadPoolExecutor(max_workers=len(probes)) as pool:
        return list(pool.map(lambda p: _guarded(p, env), probes))


# -- CLI --------------------------------------------------------------------------


def _main(args: argparse.Namespace) -> int:
    results = run_checks()
    if args.json:
        print(
            json.dumps(
                {"ok": exit_status(results) == 0, "checks": [asdict(r) for r in results]},
                indent=2,
            )
        )
    else:
        print(render_table(results))
    return exit_status(results)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check this host for what the agent needs (BPF, BTF, tc, cgroup v2, bcc, headers)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=_main)
