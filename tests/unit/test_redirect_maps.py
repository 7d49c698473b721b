"""Typed map wrappers over the dict-backed twin, and the BPF source handling."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest

from ztunnel_py.redirect.hooks import DEFAULT_BPF_DIR, HOOKS, SourceError, expand, source_hash
from ztunnel_py.redirect.maps import (
    CaptureMaps,
    CaptureSettings,
    DictBackend,
    PodCounters,
    Reason,
    ReasonsMap,
)


def test_config_layout_matches_struct_zt_config() -> None:
    maps = CaptureMaps.fake()
    settings = CaptureSettings(0x539, 0x5D1, "0.0.0.0", 15001, 15006, 15008)
    maps.config.set(settings)
    raw = maps.config._b.lookup(struct.pack("=i", 0))  # type: ignore[attr-defined]
    assert raw is not None and len(raw) == 20  # sizeof(struct zt_config)
    # marks in host order, ports as packets carry them (network order), ready flag last
    assert struct.unpack_from("=II", raw) == (0x539, 0x5D1)
    assert raw[12:14] == b"\x3a\x99"  # 15001 big-endian
    assert raw[16:18] == b"\x3a\xa0"  # 15008
    assert struct.unpack_from("=H", raw, 18) == (1,)
    assert maps.config.get() == settings


def test_config_missing_reads_as_none() -> None:
    assert CaptureMaps.fake().config.get() is None


def test_pods_and_node_ips() -> None:
    maps = CaptureMaps.fake()
    maps.pods.put("10.244.1.2", 7)
    maps.pods.put("10.244.1.3", 8)
    maps.pods.put("10.244.1.2", 9)
    assert maps.pods.items() == {"10.244.1.2": 9, "10.244.1.3": 8}
    assert maps.pods.remove("10.244.1.3") is True
    assert maps.pods.remove("10.244.1.3") is False
    maps.node_ips.replace({"127.0.0.1", "172.30.0.11"})
    maps.node_ips.replace({"172.30.0.11", "10.244.1.1"})
    assert maps.node_ips.items() == {"172.30.0.11", "10.244.1.1"}


def test_reasons_are_summed_over_cpus() -> None:
    backend = DictBackend(4, 8 * 3)  # three CPUs
    backend.update(struct.pack("=i", Reason.DROP_NO_LISTENER), struct.pack("=QQQ", 1, 2, 4))
    totals = ReasonsMap(backend).totals()
    assert totals["drop_no_listener"] == 7
    assert totals["out_captured"] == 0
    assert set(totals) == {r.name.lower() for r in Reason}


def test_pod_stats_ensure_keeps_counts() -> None:
    maps = CaptureMaps.fake()
    maps.pod_stats.ensure("10.244.1.2")
    key = bytes([10, 244, 1, 2])
    maps.pod_stats._b.update(key, struct.pack("=QQQQ", 3, 0, 5, 1))  # type: ignore[attr-defined]
    maps.pod_stats.ensure("10.244.1.2")  # a second reconcile must not reset
    assert maps.pod_stats.get("10.244.1.2") == PodCounters(3, 0, 5, 1)
    assert maps.pod_stats.items() == {"10.244.1.2": PodCounters(3, 0, 5, 1)}


def test_dict_backend_checks_sizes_and_capacity() -> None:
    b = DictBackend(4, 8, max_entries=1)
    with pytest.raises(ValueError, match="key of 3 bytes"):
        b.update(b"abc", b"\0" * 8)
    with pytest.raises(ValueError, match="value of 2 bytes"):
        b.update(b"abcd", b"\0\0")
    b.update(b"abcd", b"\0" * 8)
    with pytest.raises(OSError, match="full"):
        b.update(b"efgh", b"\0" * 8)


def test_reason_enum_matches_the_c_header() -> None:
    header = (DEFAULT_BPF_DIR / "include" / "types.h").read_text()
    for reason in Reason:
        assert f"ZT_R_{reason.name} = {reason.value}," in header


def test_expand_inlines_project_headers_once_and_keeps_kernel_includes() -> None:
    text = expand(DEFAULT_BPF_DIR / "tc_pod_ingress.c", DEFAULT_BPF_DIR / "include")
    assert '#include "' not in text
    assert "#include <uapi/linux/bpf.h>" in text
    assert text.count("BPF_TABLE_PINNED(\"hash\", __u32, struct zt_pod, zt_pods") == 1
    assert "int zt_pod_ingress(struct __sk_buff *skb)" in text


def test_every_hook_names_its_function_and_maps_fit_kernel_names() -> None:
    for hook in HOOKS:
        assert len(hook.name) <= 15
        source = (DEFAULT_BPF_DIR / hook.source).read_text()
        assert f"int {hook.name}(struct __sk_buff *skb)" in source
    maps_h = (DEFAULT_BPF_DIR / "include" / "maps.h").read_text()
    names = re.findall(r"BPF_TABLE_PINNED\([^,]+,[^,]+,[^,]+,\s*(\w+)", maps_h)
    assert len(names) == 5 and all(len(n) <= 15 for n in names)


def test_missing_header_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "include").mkdir()
    src = tmp_path / "x.c"
    src.write_text('#include "nope.h"\n')
    with pytest.raises(SourceError, match=r"x.c:1: 'nope.h' not found"):
        expand(src, tmp_path / "include")


def test_source_hash_follows_content(tmp_path: Path) -> None:
    copy = tmp_path / "bpf"
    shutil.copytree(DEFAULT_BPF_DIR, copy)
    assert source_hash(copy) == source_hash(DEFAULT_BPF_DIR)
    maps_h = copy / "include" / "maps.h"
    maps_h.write_text(maps_h.read_text() + "\n/* changed */\n")
    assert source_hash(copy) != source_hash(DEFAULT_BPF_DIR)
