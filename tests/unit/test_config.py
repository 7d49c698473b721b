from __future__ import annotations

from pathlib import Path

import pytest

from ztunnel_py.config import AgentConfig, ConfigError, ControllerConfig, as_dict, describe, load


def test_defaults() -> None:
    cfg = load(AgentConfig, env={})
    assert cfg.hbone.max_streams_per_connection == 100
    assert cfg.admin_address == "127.0.0.1:15000"


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node: from-file\nhbone:\n  max_streams_per_connection: 7\n")
    env = {"NODE_NAME": "from-env"}
    assert load(AgentConfig, env={}, file=f).node == "from-file"
    assert load(AgentConfig, env=env, file=f).node == "from-env"
    assert load(AgentConfig, env=env, file=f, flags={"node": "from-flag"}).node == "from-flag"
    assert load(AgentConfig, env=env, file=f).hbone.max_streams_per_connection == 7


def test_parse_error_names_variable_and_value() -> None:
    with pytest.raises(ConfigError, match=r"ZTUNNEL_HBONE_MAX_STREAMS='lots'"):
        load(AgentConfig, env={"ZTUNNEL_HBONE_MAX_STREAMS": "lots"})
    with pytest.raises(ConfigError, match="ZTUNNEL_KUBERNETES"):
        load(ControllerConfig, env={"ZTUNNEL_KUBERNETES": "maybe"})


def test_unknown_file_setting(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("nodee: typo\n")
    with pytest.raises(ConfigError, match="nodee"):
        load(AgentConfig, env={}, file=f)


def test_describe_and_dump() -> None:
    rows = {path: env for path, env, _h, _d in describe(AgentConfig)}
    assert rows["hbone.stream_window"] == "ZTUNNEL_HBONE_STREAM_WINDOW"
    dumped = as_dict(load(ControllerConfig, env={}))
    assert dumped["state_dir"] == "/var/lib/ztunnel-py/controller"
