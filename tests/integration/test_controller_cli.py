"""The real commands, as processes: ``ztunnel-py controller`` (TLS from its CA, bootstrap
tokens) and ``ztunnel-py agent``, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_controller import namespace_yaml, pod_yaml
from ztunnel_py.telemetry.admin import get_json


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def process(*args: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ztunnel_py", *args], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "LOG_LEVEL": "info"})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def fetch(port: int, path: str) -> Any:
    async with asyncio.timeout(5):
        return await get_json("127.0.0.1", port, path)


async def wait_for(port: int, path: str, check: Any, log: Path, limit_s: float = 30) -> Any:
    deadline = time.monotonic() + limit_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            last = await fetch(port, path)
            if check(last):
                return last
        await asyncio.sleep(0.1)
    pytest.fail(f"{path} on :{port} never satisfied the check; last={last!r}\n{tail(log)}")


def whole(log: Path) -> str:
    return log.read_text()


def tail(log: Path) -> str:
    return whole(log)[-3000:]


def private(path: Path) -> bool:
    return path.stat().st_mode & 0o077 == 0


def run_cli(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "ztunnel_py", *args], check=True,
                          capture_output=True, text=True, timeout=60).stdout


@pytest.mark.slow
async def test_controller_and_agent_commands_over_tls(tmp_path: Path) -> None:
    config, state = tmp_path / "config", tmp_path / "state"
    config.mkdir()
    (config / "ns.yaml").write_text(namespace_yaml())
    (config / "pods.yaml").write_text(pod_yaml("web-1", "10.1.0.1", "node-a"))
    grpc_port, cadmin, aadmin = free_port(), free_port(), free_port()
    token_file = Path(run_cli("controller", "--state-dir", str(state),
                              "--issue-token", "node-a").strip())
    assert token_file == state / "tokens" / "node-a.token"
    assert private(token_file)
    with process("controller", "--config-dir", str(config), "--state-dir", str(state),
                 "--grpc-address", f"127.0.0.1:{grpc_port}",
                 "--admin-address", f"127.0.0.1:{cadmin}", log=tmp_path / "controller.log"):
        await wait_for(cadmin, "/config_dump", lambda d: d.get("version"),
                       tmp_path / "controller.log")
        assert (state / "roots.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE")
        env_agent = ("agent", "--node", "node-a", "--controller", f"127.0.0.1:{grpc_port}",
                     "--controller-ca", str(state / "roots.pem"),
                     "--token-file", str(token_file),
                     "--admin-address", f"127.0.0.1:{aadmin}", "--capture", "none")
        with process(*env_agent, log=tmp_path / "agent.log"):
            dump = await wait_for(aadmin, "/config_dump",
                                  lambda d: [w["name"] for w in d["workload"]] == ["web-1"],
                                  tmp_path / "agent.log")
            assert dump["workload"][0]["enrolled"] is True
            (config / "pods.yaml").write_text(pod_yaml("web-2", "10.1.0.2", "node-a"))
            await wait_for(aadmin, "/config_dump",
                           lambda d: [w["name"] for w in d["workload"]] == ["web-2"],
                           tmp_path / "agent.log")
            agents = await wait_for(
                cadmin, "/agents",
                lambda a: [x["acked_version"] for x in a["agents"]] == [a["latest_version"]],
                tmp_path / "controller.log")
            assert agents["agents"][0]["node"] == "node-a"
            assert "PRIVATE KEY" not in whole(tmp_path / "controller.log")


def test_help_documents_environment_variables() -> None:
    controller = run_cli("controller", "--help")
    assert "--config-dir" in controller and "ZTUNNEL_CONFIG_DIR" in controller
    agent = run_cli("agent", "--help")
    assert "--node" in agent and "NODE_NAME" in agent and "ZTUNNEL_CONTROLLER" in agent


def test_agent_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "ztunnel_py", "agent", "--node", "n1"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--controller-ca" in out.stdout and "--token-file" in out.stdout
