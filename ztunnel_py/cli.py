"""``ztunnel-py``: one command, one subcommand per part.

Each subcommand lives beside the code it drives and exposes
``register(subparsers)``; this module only collects them. Handlers receive the
parsed ``argparse.Namespace`` and return an exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ztunnel_py import __version__

# (module exposing register(subparsers)); order is the order in --help.
SUBCOMMAND_MODULES = (
    "ztunnel_py.demo.cli",
    "ztunnel_py.controller.cli",
    "ztunnel_py.agent_cli",
    "ztunnel_py.waypoint_cli",
    "ztunnel_py.controller.analyze",
    "ztunnel_py.ctl",
    "ztunnel_py.doctor",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ztunnel-py",
        description=(
            "An eBPF-accelerated, ambient-mode service mesh: a per-node agent with eBPF "
            "capture and an HBONE (mTLS HTTP/2 CONNECT) tunnel, waypoint L7 proxies, and a "
            "controller that issues identities and pushes configuration."
        ),
    )
    parser.add_argument("--version", action="version", version=f"ztunnel-py {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
