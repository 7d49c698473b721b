"""``ztunnel-py analyze DIR``: validate a directory of manifests the way the controller will.

Prints every problem with file, document, object, field and a fix hint, like
``istioctl analyze``; exits 1 if any is an error, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

from ztunnel_py.config import DEFAULT_TRUST_DOMAIN
from ztunnel_py.controller.directory import SourceError, load_directory
from ztunnel_py.controller.translate import Problem, translate


def analyze(root: Path, *, trust_domain: str = DEFAULT_TRUST_DOMAIN,
            root_namespace: str = "istio-system") -> list[Problem]:
    """The source's problems (YAML syntax) and the translator's, in file order."""
    objects, problems = load_directory(root)
    translation = translate(objects, trust_domain=trust_domain, root_namespace=root_namespace)
    return [*problems, *translation.problems]


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        problems = analyze(Path(args.dir), trust_domain=args.trust_domain,
                           root_namespace=args.root_namespace)
    except SourceError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    shown = [p for p in problems if p.severity == "error" or not args.errors_only]
    if args.json:
        json.dump([p.__dict__ for p in shown], out, indent=1)
        out.write("\n")
    else:
        for p in shown:
            print(p, file=out)
        errors = sum(p.severity == "error" for p in problems)
        warnings = len(problems) - errors
        if not problems:
            print(f"✔ No problems found in {args.dir}", file=out)
        else:
            print(f"{errors} error(s), {warnings} warning(s) in {args.dir}", file=out)
    return 1 if any(p.severity == "error" for p in problems) else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="validate a directory of Kubernetes/Istio YAML the way the controller will",
        description=(
            "Reads every *.yaml/*.yml under DIR (recursively), translates it exactly as the "
            "controller does and prints each problem with file#document, object, field and a "
            "hint. Exit status: 0 no errors, 1 errors found, 2 the directory is unreadable."
        ),
    )
    parser.add_argument("dir", metavar="DIR", help="directory of manifests")
    parser.add_argument("--trust-domain", default=DEFAULT_TRUST_DOMAIN)
    parser.add_argument("--root-namespace", default="istio-system")
    parser.add_argument("--json", action="store_true", help="print problems as JSON")
    parser.add_argument("--errors-only", action="store_true", help="hide warnings")
    parser.set_defaults(func=run)
