"""``ztunnel-py waypoint``: argument handling (the serving path is covered by the
integration tests of ``waypoint.mesh`` and ``waypoint.proxy``)."""

from __future__ import annotations

import pytest

from ztunnel_py.cli import build_parser


def test_waypoint_subcommand_is_registered_with_its_flags() -> None:
    args = build_parser().parse_args(
        ["waypoint", "--name", "wp", "--namespace", "bookinfo", "--node", "n1",
         "--controller", "10.0.0.1:15012", "--listen", "127.0.0.1:15008"])
    assert (args.name, args.namespace, args.node, args.listen) == \
        ("wp", "bookinfo", "n1", "127.0.0.1:15008")
    assert args.func.__module__ == "ztunnel_py.waypoint_cli"


def test_missing_identity_material_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("NODE_NAME", "ZTUNNEL_CONTROLLER_CA", "ZTUNNEL_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    args = build_parser().parse_args(["waypoint", "--name", "wp", "--namespace", "ns"])
    assert args.func(args) == 2
    out = capsys.readouterr().out
    assert "--node" in out and "--controller-ca" in out and "--token-file" in out


def test_bad_listen_address_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["waypoint", "--name", "wp", "--namespace", "ns",
                                      "--listen", "nonsense"])
    assert args.func(args) == 2
    assert "--listen" in capsys.readouterr().out
