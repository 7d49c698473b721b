"""What crossed the underlay: a tcpdump on the underlay bridge during a request.

Used by the demo (and its end-to-end test) to show that a request between
enrolled pods travels as TLS on port 15008 and that none of its plaintext
bytes appear between the nodes.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ztunnel_py.config import CONTROLLER_GRPC_PORT
from ztunnel_py.topology import Topology, host

# A TCP connection attempt from one node to another's discard port (answered with a
# reset) proves the capture is live before the block runs; not counted.
PROBE_PORT = 9
PCAP_HEADER = 24
_PORTS = re.compile(r"\b\d+\.\d+\.\d+\.\d+\.(\d+) > \d+\.\d+\.\d+\.\d+\.(\d+):")


@dataclass
class WireCapture:
    pcap: Path
    packets_by_port: Counter[int] = field(default_factory=Counter)
    raw: bytes = b""

    def saw(self, marker: str) -> bool:
        return marker.encode() in self.raw

    @property
    def ports(self) -> set[int]:
        return set(self.packets_by_port)

    def only_port(self, port: int) -> bool:
        return bool(self.packets_by_port) and self.ports == {port}


@contextlib.contextmanager
def capture(topo: Topology, ignore: tuple[int, ...] = (CONTROLLER_GRPC_PORT,)
            ) -> Iterator[WireCapture]:
    """tcpdump (TCP only) on the underlay bridge while the block runs.

    Ports in `ignore` are left out by the capture filter itself: by default the
    control plane (agents on other nodes keep their xDS-like stream to the
    controller open, and its keepalives or a push may cross during the block).
    """
    ul = topo.underlay
    bpf_filter = " and ".join(["tcp", *(f"not port {p}" for p in ignore)])
    with tempfile.TemporaryDirectory(prefix="ztunnel-demo-wire-") as tmp:
        pcap = Path(tmp) / "underlay.pcap"
        proc = subprocess.Popen(
            # --immediate-mode: packets reach the file as they come, not per ring block
            host.in_netns(ul.netns, ["tcpdump", "-i", ul.bridge, "--immediate-mode", "-U",
                                     "-s", "0", "-n", "-w", str(pcap), bpf_filter]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            wait_started(proc)
            _wait_live(topo, pcap)
            result = WireCapture(pcap)
            yield result
        finally:
            time.sleep(0.3)  # the last packets of the request's teardown
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stderr is not None:
                proc.stderr.close()
        if pcap.exists():
            result.raw = pcap.read_bytes()
            text = subprocess.run(["tcpdump", "-r", str(pcap), "-nn", "tcp"],
                                  capture_output=True, text=True, timeout=30).stdout
            for line in text.splitlines():
                m = _PORTS.search(line)
                if m:
                    port = min(int(m.group(1)), int(m.group(2)))
                    if port != PROBE_PORT:
                        result.packets_by_port[port] += 1


def wait_started(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Until tcpdump (stderr piped) says it is listening: the capture is live only from
    then on. Other lines before it (a library's noise after fork) are passed over."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = b""
    while b"listening on" not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"tcpdump did not start: {seen.decode(errors='replace')}")
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"tcpdump exited: {seen.decode(errors='replace')}")
            seen += chunk
    time.sleep(0.2)


def _wait_live(topo: Topology, pcap: Path, timeout: float = 5.0) -> None:
    """Until a probe packet between two nodes is in the file (tcpdump's "listening"
    comes a little before packets are really delivered, more so on a loaded host)."""
    nodes = topo.nodes
    if len(nodes) < 2:
        time.sleep(0.5)
        return
    probe = ["bash", "-c", f"exec 3<>/dev/tcp/{nodes[1].underlay_ip}/{PROBE_PORT}"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topo.run(nodes[0], probe, timeout=5)
        if pcap.stat().st_size > PCAP_HEADER:
            return
        time.sleep(0.1)
    raise RuntimeError("the underlay capture saw no probe packet; is tcpdump capturing?")
