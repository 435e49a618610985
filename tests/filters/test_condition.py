"""The condition model's stream scan: the same answers as a whole check, each position once."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from filters.condition import Field, Filter, General, Overflow, Pin, Specific
from filters.userspace import UserspaceFilters

ALPHABET = b"/?ab \x00"


@st.composite
def conditions(draw: st.DrawFn) -> General:
    pins = tuple(Pin(o, draw(st.sampled_from(ALPHABET)))
                 for o in sorted(draw(st.sets(st.integers(0, 4), max_size=2))))
    delimiter = draw(st.sampled_from([None, ord("?"), ord(" ")]))
    fld = Field(draw(st.integers(0, 3)), delimiter, draw(st.integers(1, 2)))
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
