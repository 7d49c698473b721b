"""Compile the capture programs with bcc in a short-lived child, and pin them.

A bcc compile costs ~0.7 s of CPU and leaves ~75 MB (LLVM) in the process that
ran it, so the agent never imports bcc: :func:`compile_in_child` runs this
module as ``python -m ztunnel_py.redirect.compile``, which compiles each hook,
lets the maps pin themselves (``BPF_TABLE_PINNED`` in bpf/include/maps.h) and
pins each program, all under a temporary directory renamed into place at the
end, so a crash never leaves a half-made pin directory behind.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from ztunnel_py.redirect import bpfsys
from ztunnel_py.redirect.hooks import DEFAULT_BPF_DIR, HOOKS, expand

DEFAULT_KERNEL_HEADERS = Path("/opt/ztunnel-py/kernel-headers")
COMPILE_TIMEOUT_S = 120.0


class CompileError(RuntimeError):
    """bcc could not compile or load a program; the message carries its output."""


def compile_in_child(pin_dir: Path, bpf_dir: Path = DEFAULT_BPF_DIR,
                     timeout: float = COMPILE_TIMEOUT_S) -> None:
    """Compile every hook into ``pin_dir`` (which must not exist yet)."""
    env = dict(os.environ)
    if "BCC_KERNEL_SOURCE" not in env and DEFAULT_KERNEL_HEADERS.is_dir():
        env["BCC_KERNEL_SOURCE"] = str(DEFAULT_KERNEL_HEADERS)
    argv = [sys.executable, "-m", "ztunnel_py.redirect.compile",
            "--bpf-dir", str(bpf_dir), "--pin-dir", str(pin_dir)]
    try:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise CompileError(f"compiling {bpf_dir} took more than {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise CompileError(
            f"compiling the capture programs from {bpf_dir} failed (exit {proc.returncode}); "
            f"are kernel headers at BCC_KERNEL_SOURCE (scripts/setup.sh makes them)?\n{tail}"
        )


def _compile(bpf_dir: Path, pin_dir: Path) -> None:
    from bcc import BPF  # the only import of bcc in the project, in this child

    tmp = pin_dir.with_name(f"{pin_dir.name}-tmp{os.getpid()}")  # bpffs: no dots
    tmp.mkdir(parents=True)
    try:
        for hook in HOOKS:
            text = expand(bpf_dir / hook.source, bpf_dir / "include")
            module = BPF(text=text.encode(), cflags=[f'-DZT_PIN_DIR="{tmp}"'])
            fn = module.load_func(hook.name.encode(), BPF.SCHED_CLS)
            bpfsys.obj_pin(fn.fd, tmp / hook.name)
            module.cleanup()
        tmp.rename(pin_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ztunnel_py.redirect.compile")
    parser.add_argument("--bpf-dir", type=Path, default=DEFAULT_BPF_DIR)
    parser.add_argument("--pin-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.pin_dir.exists():
        print(f"{args.pin_dir} exists already", file=sys.stderr)
        return 1
    _compile(args.bpf_dir, args.pin_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
