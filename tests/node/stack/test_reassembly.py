"""Reassembly rules (see node.stack.reassembly): what Linux delivers, with a fake stream."""

from __future__ import annotations

import random

from node.stack.reassembly import BEYOND, DUPLICATE, FULL, HELD, IN_ORDER, Reassembler


def feed(r: Reassembler, segs: list[tuple[int, bytes]], base: int = 0) -> bytes:
    out = b""
    for off, data in segs:
        _, chunk = r.add((base + off) & 0xFFFFFFFF, data)
        out += chunk
    return out


def test_in_order_and_out_of_order() -> None:
    r = Reassembler(100)
    assert r.add(100, b"abc") == (IN_ORDER, b"abc")
    assert r.add(106, b"ghi") == (HELD, b"")
    assert r.holes() == [(103, 106)]
    assert r.add(103, b"def") == (IN_ORDER, b"defghi")
    assert r.next_seq == 109 and r.held == [] and r.held_bytes == 0 and r.delivered == 9


def test_retransmission_of_delivered_bytes_keeps_the_first() -> None:
    r = Reassembler(0)
    assert feed(r, [(0, b"AAAA"), (0, b"BBBB"), (2, b"CCCCCC")]) == b"AAAACCCC"
    assert r.add(1, b"x") == (DUPLICATE, b"")


def test_held_lowest_start_wins_even_if_later() -> None:
    r = Reassembler(0)
    # Held [10,20) 'A'; later [5,15) 'B' starts lower: B wins 10..15.
    assert feed(r, [(10, b"A" * 10), (5, b"B" * 10), (0, b"C" * 5)]) == \
        b"C" * 5 + b"B" * 10 + b"A" * 5


def test_same_start_longer_replaces_shorter_does_not() -> None:
    r = Reassembler(0)
    assert feed(r, [(10, b"A" * 5), (10, b"B" * 10), (0, b"C" * 10)]) == b"C" * 10 + b"B" * 10
    r = Reassembler(0)
    assert feed(r, [(10, b"A" * 10), (10, b"B" * 5), (0, b"C" * 10)]) == b"C" * 10 + b"A" * 10


def test_contained_segments() -> None:
    r = Reassembler(0)
    assert feed(r, [(10, b"A" * 20), (15, b"B" * 5), (0, b"C" * 10)]) == b"C" * 10 + b"A" * 20
    r = Reassembler(0)
    assert feed(r, [(15, b"A" * 5), (10, b"B" * 20), (0, b"C" * 10)]) == b"C" * 10 + b"B" * 20


def test_sequence_wrap() -> None:
    base = 0xFFFFFFF0
    r = Reassembler(base)
    assert feed(r, [(20, b"c" * 10), (0, b"a" * 10), (10, b"b" * 10)], base) == \
        b"a" * 10 + b"b" * 10 + b"c" * 10
    assert r.next_seq == (base + 30) & 0xFFFFFFFF


def test_bounds() -> None:
    r = Reassembler(0, max_held_bytes=100, max_held_segments=3)
    assert r.add(10, b"x" * 60)[0] == HELD
    assert r.add(100, b"y" * 50)[0] == FULL  # bytes bound
    assert r.add(80, b"y" * 10)[0] == HELD
    assert r.add(95, b"z")[0] == HELD
    assert r.add(97, b"z")[0] == FULL  # segment bound
    assert r.add(1 << 31 - 1, b"far")[0] in (BEYOND, FULL)
    r2 = Reassembler(0, max_ahead=1000)
    assert r2.add(5000, b"far")[0] == BEYOND
    assert r.add(0, b"q" * 10)[0] == IN_ORDER  # filling frees the held bytes
    assert r.held_bytes == 0 or r.held


def model(segs: list[tuple[int, bytes]]) -> bytes:
    """The rule stated in the module doc, computed directly: bytes below rcv_nxt fixed; among
    held segments the lowest start (then longer, then first) covers a byte."""
    delivered = bytearray()
    held: list[tuple[int, int, int, bytes]] = []  # (start, -len, arrival, data)
    for i, (s, d) in enumerate(segs):
        pos = len(delivered)
        if s <= pos:
            delivered += d[pos - s:] if s + len(d) > pos else b""
        else:
            held.append((s, -len(d), i, d))
        changed = True
        while changed:
            changed = False
            for h in sorted(held):
                if h[0] <= len(delivered):
                    held.remove(h)
                    p = len(delivered)
                    if h[0] + len(h[3]) > p:
                        delivered += h[3][p - h[0]:]
                    changed = True
                    break
    return bytes(delivered)


def test_random_segmentations_match_the_rule() -> None:
    rnd = random.Random(4)
    for _ in range(400):
        segs = []
        for k in range(rnd.randint(1, 12)):
            s = rnd.randint(0, 40)
            segs.append((s, bytes([65 + k]) * rnd.randint(1, 15)))
        r = Reassembler(0)
        assert feed(r, segs) == model(segs), segs
