"""The condition model's stream scan: the same answers as a whole check, each position once."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filters.condition import (
    Field,
    Filter,
    General,
    Overflow,
    Pin,
    Specific,
    condition_from_json,
)
from filters.userspace import UserspaceFilters

ALPHABET = b"/?ab \x00"


@st.composite
def conditions(draw: st.DrawFn) -> General:
    pins = tuple(Pin(o, draw(st.sampled_from(ALPHABET)))
                 for o in sorted(draw(st.sets(st.integers(0, 4), max_size=2))))
    delimiter = draw(st.sampled_from([None, ord("?"), ord(" ")]))
    stops = tuple(draw(st.sets(st.sampled_from(b"\x00 "), max_size=1)))
    tokens = tuple(draw(st.sets(st.sampled_from([b"", b"a", b"ab", b"/"]), max_size=2)))
    fld = Field(draw(st.integers(0, 3)), delimiter, draw(st.integers(1, 2)), stops, tokens)
    if draw(st.booleans()):
        over = Overflow("terminated", fld, draw(st.integers(1, 6)),
                        tuple(draw(st.sets(st.sampled_from(ALPHABET), min_size=1, max_size=2))))
    else:
        over = Overflow("length", fld, draw(st.integers(1, 300)),
                        size=draw(st.sampled_from([1, 2])), little_endian=draw(st.booleans()))
    return General(pins, over, sliding=True)


@settings(max_examples=300, deadline=None)
@given(conditions(), st.binary(max_size=40).map(lambda b: bytes(ALPHABET[x % len(ALPHABET)]
                                                                for x in b)),
       st.lists(st.integers(1, 7), max_size=12))
def test_a_resumed_scan_answers_as_a_whole_check(cond: General, stream: bytes,
                                                  cuts: list[int]) -> None:
    """Fed in any segmentation, resuming where the last scan stopped, the scan matches exactly
    when some position of the stream so far matches from scratch."""
    def whole(m: bytes) -> bool:
        return any(cond._at(m, b) == 1 for b in range(len(m) + 1))

    resume, end = 0, 0
    for cut in [*cuts, len(stream)]:
        end = min(len(stream), end + cut)
        hit, resume = cond.scan(stream[:end], resume)
        assert hit == whole(stream[:end])
        if hit:
            break
        assert 0 <= resume <= max(end, 1) + 4


def test_a_stream_fed_byte_by_byte_costs_each_position_about_once() -> None:
    """A general filter whose first pin is every byte of the stream: the checks of the growing
    stream look at each position a bounded number of times, not once per segment (before, a
    64 KiB stream of such bytes cost seconds of the node's loop)."""
    cond = General((Pin(5, ord("/")),), Overflow("terminated", Field(0, ord("?")), 200, (0,)),
                   sliding=True)
    f = Filter(b"\x01" * 32, "svc", "tcp", 80, cond)
    calls = 0
    at = General._at

    def counted(self: General, m: bytes, base: int) -> int:
        nonlocal calls
        calls += 1
        return at(self, m, base)

    us = UserspaceFilters([f])
    resume: dict[str, int] = {}
    stream = b""
    General._at = counted  # type: ignore[method-assign]
    try:
        for _ in range(4096):
            stream += b"/"
            assert us.check("tcp", 80, stream, resume) is None
    finally:
        General._at = at  # type: ignore[method-assign]
    assert calls <= 2 * len(stream)
    assert us.check("tcp", 80, stream + b"?" + b"x" * 200, resume) is f


def test_specific_and_datagram_conditions_scan_as_they_match() -> None:
    spec = Specific(2, b"ab")
    assert spec.scan(b"xxab") == (True, 0) and spec.scan(b"xxa") == (False, 0)
    dgram = General((Pin(0, 1),), Overflow("terminated", Field(1), 2, (0,)))
    assert dgram.scan(b"\x01xy") == (True, 0) and dgram.scan(b"x\x01xy")[0] is False


def test_a_field_after_a_delimiter_with_stop_bytes_and_tokens() -> None:
    query = Field(4, ord("?"), stops=(0x20,))
    assert query.start(b"GET /a?x") == 7
    assert query.start(b"GET /a HTTP/1.0\r\nReferer: /b?x") == -1  # a stop byte first
    assert query.start(b"GET /abc") is None  # the delimiter may still come
    assert query.start(b"GET /a b") == -1  # it may, but after a stop byte it does not count
    command = Field(1, ord(" "), 2, tokens=(b"status", b"who"))
    assert command.start(b"RUN status AAAA") == 11 and command.start(b"RUN who A") == 8
    assert command.start(b"RUN reboot AAAA") == -1
    assert command.start(b"xRUN who A", base=1) == 9


def test_stop_bytes_and_tokens_round_trip_and_leave_older_filter_ids_alone() -> None:
    over = Overflow("terminated", Field(4, ord("?")), 10, (0,))
    plain = Filter(b"\x01" * 32, "svc", "tcp", 80, General((), over, True))
    assert "stops" not in json.dumps(plain.to_json())  # ids of filters made before them
    for fld in (Field(4, ord("?"), stops=(0x20, 0x0D)), Field(1, 0x20, 2, tokens=(b"a", b"bc"))):
        f = Filter(b"\x01" * 32, "svc", "tcp", 80,
                   General((), dataclasses.replace(over, field=fld), True))
        back = condition_from_json(json.loads(json.dumps(f.to_json()["condition"])))
        assert back == f.condition
    for bad in ({"stops": [256]}, {"tokens": "00"}, {"tokens": ["zz"]}, {"tokens": ["00" * 65]}):
        d = {"general": {"pins": [], "overflow": {"kind": "terminated", "reach": 1, "field": {
            "offset": 0, "delimiter": 63, **bad}}}}
        with pytest.raises(ValueError):
            condition_from_json(d)
