"""Invariant keys and keyed digests: what changes on the way is left out, what identifies the
packet is kept, hostile bytes only ever raise PacketError."""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.stack.checksum import checksum
from node.stack.packet import PacketError, ip_bytes, tcp_packet, udp_packet
from node.traceback.digest import INVARIANT_LEN, Digester, describe_key, invariant_key

SRC, DST = ip_bytes("10.77.1.2"), ip_bytes("10.77.2.2")


def rewrite(pkt: bytes, *, tos: int | None = None, ttl: int | None = None,
            ident: int | None = None, frag: int | None = None) -> bytes:
    """What routers do to a header: change mutable fields and fix the checksum."""
    b = bytearray(pkt)
    if tos is not None:
        b[1] = tos
    if ident is not None:
        struct.pack_into("!H", b, 4, ident)
    if frag is not None:
        struct.pack_into("!H", b, 6, frag)
    if ttl is not None:
        b[8] = ttl
    b[10:12] = b"\0\0"
    struct.pack_into("!H", b, 10, checksum(b[:20]))
    return bytes(b)


@given(st.binary(max_size=64), st.integers(0, 255), st.integers(0, 255),
       st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_invariant_under_mutable_fields(payload: bytes, tos: int, ttl: int, ident: int,
                                        frag: int) -> None:
    pkt = udp_packet(SRC, DST, 1000, 53, payload)
    assert invariant_key(rewrite(pkt, tos=tos, ttl=ttl, ident=ident, frag=frag)) == \
        invariant_key(pkt)


def test_identifying_fields_change_the_key() -> None:
    base = udp_packet(SRC, DST, 1000, 53, b"abcdefgh-tail")
    key = invariant_key(base)
    assert len(key) == INVARIANT_LEN
    others = [
        udp_packet(ip_bytes("10.77.1.3"), DST, 1000, 53, b"abcdefgh-tail"),  # source
        udp_packet(SRC, ip_bytes("10.77.2.3"), 1000, 53, b"abcdefgh-tail"),  # destination
        udp_packet(SRC, DST, 1001, 53, b"abcdefgh-tail"),  # first payload bytes (port)
        udp_packet(SRC, DST, 1000, 53, b"abcdefgh-tai"),  # length (and UDP length)
        tcp_packet(SRC, DST, 1000, 53, payload=b"abcdefgh-tail"),  # protocol
    ]
    assert all(invariant_key(o) != key for o in others)
    # Past the first 8 transport bytes the payload does not count (SPIE's choice).
    assert invariant_key(udp_packet(SRC, DST, 1000, 53, b"abcdefgh-TAIL"))[:12] == key[:12]


def test_payload_after_options_and_short_payloads() -> None:
    pkt = bytearray(udp_packet(SRC, DST, 1, 2, b"xyz"))
    # Add 4 bytes of options (NOPs) and fix lengths: the 8 bytes come after them.
    with_opts = bytearray(pkt[:20]) + b"\x01\x01\x01\x00" + pkt[20:]
    with_opts[0] = 0x46
    struct.pack_into("!H", with_opts, 2, len(with_opts))
    k1, k2 = invariant_key(pkt), invariant_key(bytes(with_opts))
    assert k1[12:] == k2[12:] == bytes(pkt[20:28])
    short = udp_packet(SRC, DST, 1, 2)  # 8 bytes of UDP header only
    assert invariant_key(short)[12:] == short[20:28]
    assert describe_key(k1) == {"proto": 17, "total_len": 31, "src": "10.77.1.2",
                                "dst": "10.77.2.2"}


def test_link_padding_is_ignored() -> None:
    pkt = udp_packet(SRC, DST, 1, 2, b"")
    assert invariant_key(pkt + b"\0" * 18) == invariant_key(pkt)


@given(st.binary(max_size=80))
def test_hostile_bytes_only_raise_packet_error(data: bytes) -> None:
    with contextlib.suppress(PacketError):
        assert len(invariant_key(data)) == INVARIANT_LEN


@pytest.mark.parametrize("data", [b"", b"\x45" * 19, b"\x60" + b"\0" * 39,
                                  b"\x4f" + b"\0" * 19, b"\x45\0\0\x10" + b"\0" * 16])
def test_malformed(data: bytes) -> None:
    with pytest.raises(PacketError):
        invariant_key(data)


def test_digester_is_keyed() -> None:
    inv = invariant_key(udp_packet(SRC, DST, 1, 2, b"x"))
    a, b = Digester(b"k" * 16), Digester(b"j" * 16)
    assert a.hashes(inv) == Digester(b"k" * 16).hashes(inv)
    assert a.hashes(inv) != b.hashes(inv)
    assert a.hashes(inv)[1] & 1  # odd step: probes cover a power-of-two filter
    with pytest.raises(ValueError):
        Digester(b"")
