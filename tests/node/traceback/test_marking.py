"""The per-hop rule: who logs, who marks, the last hop clears; checksums stay right; along a
path the hops log alternately starting at the ingress."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.stack.packet import ip_bytes, parse_ipv4, udp_packet
from node.traceback.marking import (
    DF,
    LOGGED,
    MARKED,
    MF,
    Mark,
    atomic,
    decide,
    decode,
    encode,
    set_ident,
)
from node.traceback.sim import SimNet

ME, UP = 202, 201


def test_encode_decode() -> None:
    assert decode(encode(5, True)) == Mark(5, True)
    assert decode(encode(0x3FFF, False)) == Mark(0x3FFF, False)
    assert decode(0x1234) is None  # not marked: a sender's identification
    for bad in (-1, 0x4000):
        with pytest.raises(ValueError):
            encode(bad, False)


@pytest.mark.parametrize(("word", "expect"), [(DF, True), (0, False), (DF | MF, False),
                                              (DF | 5, False), (MF, False), (0x8000 | DF, True)])
def test_only_atomic_datagrams_are_marked(word: int, expect: bool) -> None:
    assert atomic(word) is expect
    d = decide(frag_word=word, ident=0x1234, my_id=ME, upstream_id=UP, last_hop=False)
    if expect:
        assert d.ident is not None
    else:  # fragments and maybe-fragmented packets: identification untouched, always logged
        assert d.log and d.ident is None


def test_rule_table() -> None:
    def run(ident: int, upstream: int | None, last: bool = False) -> tuple[bool, int | None]:
        d = decide(frag_word=DF, ident=ident, my_id=ME, upstream_id=upstream, last_hop=last)
        return d.log, d.ident

    # From hosts (edge link): untrusted, logged, marked "logged".
    assert run(0, None) == (True, MARKED | LOGGED | ME)
    # A host forging a mark gains nothing: the link faces hosts.
    assert run(encode(UP, True), None) == (True, MARKED | LOGGED | ME)
    # Trusted upstream that logged: mark only.
    assert run(encode(UP, True), UP) == (False, MARKED | ME)
    # Trusted upstream that only marked: log.
    assert run(encode(UP, False), UP) == (True, MARKED | LOGGED | ME)
    # A router link but a wrong id or no mark (that neighbour is down): log.
    assert run(encode(UP + 1, True), UP) == (True, MARKED | LOGGED | ME)
    assert run(0x1234, UP) == (True, MARKED | LOGGED | ME)
    # The last hop clears, and logs only what it cannot trust (the walk starts there anyway).
    assert run(encode(UP, True), UP, last=True) == (False, 0)
    assert run(encode(UP, False), UP, last=True) == (False, 0)
    assert run(0x1234, UP, last=True) == (True, 0)
    assert run(0, None, last=True) == (True, 0)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(1, 255),
       st.binary(max_size=40))
def test_set_ident_keeps_the_checksum_right(old: int, new: int, ttl: int,
                                            payload: bytes) -> None:
    pkt = bytearray(udp_packet(ip_bytes("10.77.1.2"), ip_bytes("10.77.2.2"), 5, 6, payload,
                               ttl=ttl, ident=old))
    set_ident(pkt, new)
    ip = parse_ipv4(pkt, verify=True)  # raises on a bad header checksum
    assert ip.ident == new


@pytest.mark.parametrize("hops", range(1, 9))
def test_alternation_along_a_chain(hops: int) -> None:
    """Ingress logs, then every other hop, the last hop does not: floor(n/2) logs for n >= 2
    (one for a one-router path); the victim sees no mark."""
    routers = [f"r{i}" for i in range(hops)]
    net = SimNet(list(itertools.pairwise(routers)),
                 {"atk": routers[0], "vic": routers[-1]})
    pkt = udp_packet(ip_bytes("10.77.9.9"), ip_bytes(net.host_addr["vic"]), 1, 2, b"x",
                     ident=encode(7, True))  # a forged mark from the attacker
    got = net.send(pkt, "atk", "vic", now=1.0)
    logged = [net.cores[r].stats.logged for r in routers]
    assert logged == [1 - i % 2 for i in range(hops - 1)] + [int(hops == 1)]
    assert sum(logged) == max(1, hops // 2)
    assert struct.unpack_from("!H", got, 4)[0] == 0
    parse_ipv4(got, verify=True)


def test_non_atomic_packets_are_logged_everywhere_and_keep_their_id() -> None:
    routers = ["a", "b", "c", "d"]
    net = SimNet(list(itertools.pairwise(routers)), {"atk": "a", "vic": "d"})
    pkt = bytearray(udp_packet(ip_bytes("10.77.9.9"), ip_bytes("10.77.2.2"), 1, 2, b"x",
                               ident=0x4242))
    struct.pack_into("!H", pkt, 6, 0)  # DF off
    pkt[10:12] = b"\0\0"
    from node.stack.checksum import checksum

    struct.pack_into("!H", pkt, 10, checksum(pkt[:20]))
    got = net.send(bytes(pkt), "atk", "vic", now=1.0)
    assert [net.cores[r].stats.logged for r in routers] == [1, 1, 1, 1]
    assert struct.unpack_from("!H", got, 4)[0] == 0x4242


def test_core_passes_what_it_cannot_parse() -> None:
    net = SimNet([("a", "b")], {"atk": "a", "vic": "b"})
    core = net.cores["a"]
    for junk in (b"", b"\x60" + b"\0" * 39, b"\x45" + b"\0" * 10, b"\x45\0\xff\xff" + b"\0" * 16):
        assert core.forward(junk, "h-atk", "to-b", 1.0) is None
    assert core.stats.malformed == 4 and core.stats.logged == 0
    # An interface missing from the config counts as untrusted: logged under its own name.
    pkt = udp_packet(ip_bytes("10.77.9.9"), ip_bytes("10.77.2.2"), 1, 2, b"x")
    assert core.forward(pkt, "eth7", "to-b", 1.0) is not None
    assert "eth7" in core.store.tables
