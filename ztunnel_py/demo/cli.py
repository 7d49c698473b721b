"""``ztunnel-py demo up | down | status [--json] | apply -f F | delete -f F``."""

from __future__ import annotations

import argparse
import io
import json
import sys

from ztunnel_py.demo.configdir import ManifestError, apply_paths, delete_paths
from ztunnel_py.demo.mesh import MeshError, ztunnel
from ztunnel_py.demo.run import AlreadyUp, DemoError, DemoRun, state_dir_from_env
from ztunnel_py.topology import TopologyError


def _err(msg: str) -> int:
    print(f"ztunnel-py demo: {msg}", file=sys.stderr)
    return 1


def _run(args: argparse.Namespace) -> DemoRun:
    return DemoRun(args.state_dir or state_dir_from_env())


def _up(args: argparse.Namespace) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):  # the story draws stars: never die on them
        sys.stdout.reconfigure(errors="replace")
    run = _run(args)
    try:
        topo = run.up(mesh=not args.no_mesh)
    except AlreadyUp as exc:
        print(exc)
        return 0 if run.show_request(run.topology()) else 1
    except (DemoError, TopologyError, MeshError) as exc:
        return _err(f"{exc}\n(clean up with `ztunnel-py demo down`)")
    if args.no_mesh:
        if not run.show_request(topo):
            return _err("the demo is up but the cross-node request failed; see `demo status`")
    else:
        from ztunnel_py.demo import bookinfo_story, scenario  # the story: only for `up`

        step = scenario.Steps(scenario.STEPS + bookinfo_story.STEPS, print)
        l4 = scenario.tell(topo, run.mesh(topo), run.world, run.config_dir, print, step)
        l7 = bookinfo_story.tell(topo, run.world, run.config_dir, step, print)
        if not (l4.ok and l7.ok):
            return _err(f"the mesh did not behave as the story says; logs in {run.logs_dir}")
    print("\nnext: `ztunnel-py demo status --json`, `ztunnel-py demo ctl node1 workloads`, "
          "then `ztunnel-py demo down`")
    return 0


def _ctl(args: argparse.Namespace) -> int:
    run = _run(args)
    try:
        topo = run.topology()
        topo.node(args.node)
    except (DemoError, KeyError, TopologyError) as exc:
        return _err(f"{exc}")
    done = topo.run(args.node, ztunnel("ctl", *args.ctl_args), timeout=30)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


def _down(args: argparse.Namespace) -> int:
    try:
        errors = _run(args).down()
    except DemoError as exc:
        return _err(str(exc))
    for e in errors:
        print(e, file=sys.stderr)
    return 1 if errors else 0


def _status(args: argparse.Namespace) -> int:
    try:
        st = _run(args).status()
    except DemoError as exc:
        return _err(str(exc))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0 if st["up"] else 1
    if not st["up"]:
        print(f"the demo is not up (state dir {st['state_dir']}, phase {st.get('phase')})")
        return 1
    print(f"demo {st['prefix']} is up; state in {st['state_dir']}, config in {st['config_dir']}")
    print(f"underlay: netns {st['underlay']['netns']} ({st['underlay']['cidr']})")
    for n in st["nodes"]:
        print(f"node {n['name']:<8} netns {n['netns']:<22} ip {n['ip']:<14} "
              f"underlay iface {n['underlay_iface']}  pods {n['pod_cidr']}")  # fmt: skip
    for p in st["pods"]:
        print(f"pod  {p['namespace'] + '/' + p['name']:<30} node {p['node']:<6} "
              f"ip {p['ip']:<12} netns {p['netns']}  sa {p['service_account']}")  # fmt: skip
    for s in st["services"]:
        ports = ", ".join(f"{sp['port']}->{sp['target_port']}" for sp in s["ports"])
        print(f"svc  {s['namespace'] + '/' + s['name']:<30} vip {s['vip']:<12} ports {ports}")
    for w in st.get("waypoints", []):
        print(f"waypoint {w['namespace'] + '/' + w['name']:<18} pod {w['pod']} on {w['node']}, "
              f"HBONE {w['ip']}:{w['hbone_port']}; used by namespace(s) "
              f"{', '.join(w['used_by']) or '-'}")
    dead = [p for p in st["processes"] if not p["alive"]]
    if dead:
        print(f"WARNING: {len(dead)} process(es) exited; logs: " + ", ".join(
            str(p["log"]) for p in dead))  # fmt: skip
    return 0


def _apply(args: argparse.Namespace) -> int:
    run = _run(args)
    if not run.is_up():
        return _err(f"no demo is up (state dir {run.state_dir}); run `ztunnel-py demo up` first")
    try:
        lines = (apply_paths if args.action == "apply" else delete_paths)(run.config_dir, args.f)
    except ManifestError as exc:
        done = "applied" if args.action == "apply" else "deleted"
        return _err(f"nothing {done}: {exc}")
    for line in lines:
        print(line)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="run the demo: nodes and pods in network namespaces on this machine",
        description="Two nodes and their pods (helloworld, and a small bookinfo behind a "
        "waypoint), all in network namespaces on this machine (root). `up` starts the "
        "controller, an agent per node and the waypoint, then shows the mesh at work: "
        "capture and encryption, policy, metrics, a canary split, request routing and a "
        "fault.",
    )
    demo.add_argument(
        "--state-dir",
        help="where the demo keeps its state, config and logs "
        "(default $ZTUNNEL_DEMO_DIR or /run/ztunnel-py/demo)",
    )
    sub = demo.add_subparsers(dest="demo_command", metavar="ACTION", required=True)
    up = sub.add_parser("up", help="bring the demo up and show the mesh at work")
    up.add_argument("--no-mesh", action="store_true",
                    help="only the nodes, pods and services: no controller, agents or waypoint")
    up.set_defaults(func=_up)
    ctl = sub.add_parser("ctl", help="run `ztunnel-py ctl ARGS` inside a node (its admin port)")
    ctl.add_argument("node", help="node1, node2, ...")
    ctl.add_argument("ctl_args", nargs=argparse.REMAINDER, help="ctl's arguments")
    ctl.set_defaults(func=_ctl)
    sub.add_parser("down", help="tear everything of the demo down").set_defaults(func=_down)
    st = sub.add_parser("status", help="what is running where")
    st.add_argument("--json", action="store_true", help="machine-readable")
    st.set_defaults(func=_status)
    for action, text in (
        ("apply", "put manifests into the demo's config (like kubectl apply)"),
        ("delete", "take the objects in these manifests out of the demo's config"),
    ):
        p = sub.add_parser(action, help=text)
        p.add_argument(
            "-f",
            action="append",
            required=True,
            metavar="FILE",
            help="a YAML/JSON file, a directory of them, or - for stdin (repeatable)",
        )
        p.set_defaults(func=_apply, action=action)
