"""``bench.hbone.hop_times``: per-hop delays from the captures of both nodes."""

from __future__ import annotations

import pytest

from bench.hbone import HOPS, hop_times

# one request and its response crossing: client veth c0 and underlay u1 on node1,
# underlay u2 and server veth s0 on node2 (tcpdump -i any -n -tt -q lines, one clock)
LINES = """\
tcpdump: data link type LINUX_SLL2
100.000100 c0 In  IP 10.0.1.2.4000 > 10.0.1.1.15102: tcp 36
100.000160 u1 Out IP 172.30.0.11.3000 > 172.30.0.12.15008: tcp 67
100.000170 u2 In  IP 172.30.0.11.3000 > 172.30.0.12.15008: tcp 67
100.000250 s0 Out IP 10.0.2.1.5000 > 10.0.2.2.8080: tcp 36
100.000300 s0 In  IP 10.0.2.2.8080 > 10.0.2.1.5000: tcp 66
100.000340 u2 Out IP 172.30.0.12.15008 > 172.30.0.11.3000: tcp 97
100.000345 u1 In  IP 172.30.0.12.15008 > 172.30.0.11.3000: tcp 97
100.000400 c0 Out IP 10.0.1.1.15102 > 10.0.1.2.4000: tcp 66
""".splitlines()


def test_each_hop_is_the_wait_for_the_next_point_on_the_path() -> None:
    got = hop_times(LINES, "c0", "u1", "u2", "s0")
    want = [60.0, 10.0, 80.0, 50.0, 40.0, 5.0, 55.0]
    assert list(got) == list(HOPS)
    assert [round(v[0], 3) for v in got.values()] == want


def test_a_coalesced_write_counts_for_every_request_it_carries() -> None:
    lines = ["1.000000 c0 In  IP a > b: tcp 36", "1.000020 c0 In  IP a > b: tcp 36",
             "1.000050 u1 Out IP a > b: tcp 112"]  # two requests, one TLS write
    got = hop_times(lines, "c0", "u1", "u2", "s0")
    assert got["node1 proxy, request"] == pytest.approx([50.0, 30.0])
    assert got["underlay, request"] == []  # nothing seen on node2


def test_each_rounds_ratio_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.hbone import print_rounds

    nan = float("nan")
    row = dict.fromkeys(("tput_1_gbps", "tput_4_gbps", "rps_16", "conn_per_s"), nan)
    print_rounds({
        "agents": [{**row, "p50_ms": 0.30}, {**row, "p50_ms": 0.33}],
        "haproxy": [{**row, "p50_ms": 0.25}, {**row, "p50_ms": 0.30}],
    })
    out = capsys.readouterr().out
    assert "p50 latency" in out and "1.20x 1.10x" in out
    assert "throughput" not in out  # not measured: no line
