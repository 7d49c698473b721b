"""``python -m ztunnel_py.topology list | sweep PREFIX...``: find and remove leftovers."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ztunnel_py.topology import host
from ztunnel_py.topology.sweep import leftovers, sweep


def prefixes() -> list[str]:
    """Run prefixes that have network namespaces on this host (``<prefix>-<name>``)."""
    return sorted({n.split("-", 1)[0] for n in host.list_netns() if n.endswith("-ul")})


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ztunnel_py.topology", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="topologies present on this host (by their underlay netns)")
    sw = sub.add_parser("sweep", help="remove everything carrying these prefixes")
    sw.add_argument("prefix", nargs="+")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for prefix in prefixes():
            print(f"{prefix}: {len(leftovers(prefix))} item(s)")
        return 0
    failed = 0
    for prefix in args.prefix:
        errors = sweep(prefix)
        for e in errors:
            print(f"{prefix}: {e}", file=sys.stderr)
        failed += bool(errors)
        print(f"{prefix}: {'swept' if not errors else 'errors'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
