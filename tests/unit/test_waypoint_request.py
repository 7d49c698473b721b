"""The request value: the hot-path constructor builds the same frozen value."""

from __future__ import annotations

import dataclasses

import pytest

from waypoint.request import Peer, Request, make_request


def _sample() -> Request:
    return Request("POST", "/a?b=1", "reviews:9080", (("x-a", "1"),), 9080, "https",
                   Peer("10.0.0.9", "spiffe://cluster.local/ns/a/sa/b", None), True,
                   "10.96.0.10", True)


def test_make_request_is_the_dataclass_value_field_for_field() -> None:
    want = _sample()
    got = make_request(*(getattr(want, f.name) for f in dataclasses.fields(Request)))
    assert got == want and hash(got) == hash(want)
    # every field set (a field added to Request but not to make_request fails here)
    assert vars(got) == {f.name: getattr(want, f.name) for f in dataclasses.fields(Request)}


def test_make_request_value_stays_frozen() -> None:
    req = _sample().with_port(80)
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.port = 81  # type: ignore[misc]


def test_with_port_and_with_headers_change_only_that_field() -> None:
    base = _sample()
    assert base.with_port(9080) is base and base.with_headers(base.headers) is base
    assert base.with_port(80) == dataclasses.replace(base, port=80)
    hdrs = (("x-b", "2"),)
    assert base.with_headers(hdrs) == dataclasses.replace(base, headers=hdrs)
