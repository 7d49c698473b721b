"""The request value: its copy-with-one-field helpers."""

from __future__ import annotations

import dataclasses

from waypoint.request import Peer, Request


def _sample() -> Request:
    return Request("POST", "/a?b=1", "reviews:9080", (("x-a", "1"),), 9080, "https",
                   Peer("10.0.0.9", "spiffe://cluster.local/ns/a/sa/b", None), True,
                   "10.96.0.10", True)


def test_with_port_and_with_headers_change_only_that_field() -> None:
    base = _sample()
    assert base.with_port(9080) is base and base.with_headers(base.headers) is base
    assert base.with_port(80) == dataclasses.replace(base, port=80)
    hdrs = (("x-b", "2"),)
    assert base.with_headers(hdrs) == dataclasses.replace(base, headers=hdrs)
