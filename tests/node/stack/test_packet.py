"""Parsers and builders against scapy (scapy only here), checksums, options, malformed input."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import ICMP as SICMP
from scapy.layers.inet import IP
from scapy.layers.inet import TCP as STCP
from scapy.layers.inet import UDP as SUDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

from node.stack.checksum import checksum, verify
from node.stack.packet import (
    ACK,
    PSH,
    SYN,
    PacketError,
    TcpOptions,
    build_icmp,
    icmp_packet,
    ip_bytes,
    ip_str,
    parse_icmp,
    parse_ip,
    parse_ipv4,
    parse_ipv6,
    parse_tcp,
    parse_tcp_options,
    parse_udp,
    tcp_packet,
    udp_packet,
)

C, S = ip_bytes("10.77.0.2"), ip_bytes("10.77.0.1")
C6, S6 = ip_bytes("fd77::2"), ip_bytes("fd77::1")

SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None),
            ("WScale", 7)]


def test_parse_scapy_syn_with_all_options() -> None:
    raw = bytes(IP(src="10.77.0.2", dst="10.77.0.1", id=7, ttl=61) /
                STCP(sport=40000, dport=80, seq=1000, flags="S", window=64240,
                     options=SYN_OPTS))
    ip = parse_ipv4(raw)
    assert (ip.src, ip.dst, ip.ttl, ip.ident, ip.proto) == (C, S, 61, 7, 6)
    tcp = parse_tcp(ip)
    assert (tcp.sport, tcp.dport, tcp.seq, tcp.flags, tcp.window) == (40000, 80, 1000, SYN,
                                                                      64240)
    o = tcp.options
    assert (o.mss, o.sack_ok, o.ts, o.wscale) == (1460, True, (123456, 0), 7)
    assert tcp.seg_len == 1


def test_parse_scapy_sack_blocks_and_payload() -> None:
    raw = bytes(IP(src="10.77.0.2", dst="10.77.0.1") /
                STCP(sport=1, dport=2, flags="PA", options=[
                    ("NOP", None), ("NOP", None), ("SAck", (10, 20, 30, 40))]) / b"data")
    tcp = parse_tcp(parse_ipv4(raw))
    assert tcp.options.sack == ((10, 20), (30, 40))
    assert bytes(tcp.payload) == b"data"


@pytest.mark.parametrize("payload", [b"", b"x", b"hello world!" * 50])
def test_built_tcp_equals_scapy(payload: bytes) -> None:
    opts = TcpOptions(mss=1460, sack_ok=True, ts=(5, 6), wscale=7)
    ours = tcp_packet(C, S, 40000, 80, seq=1, ack=2, flags=ACK | PSH, window=502,
                      options=opts, payload=payload, ident=9)
    ref = IP(src="10.77.0.2", dst="10.77.0.1", id=9, flags="DF") / STCP(
        sport=40000, dport=80, seq=1, ack=2, flags="PA", window=502,
        options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (5, 6)), ("NOP", None),
                 ("WScale", 7)]) / payload
    assert ours == bytes(ref)
    tcp = parse_tcp(parse_ipv4(ours))  # checksums verified
    assert tcp.options == opts


def test_built_udp_and_icmp_equal_scapy() -> None:
    assert udp_packet(C, S, 5353, 53, b"query") == bytes(
        IP(src="10.77.0.2", dst="10.77.0.1", id=0, flags="DF") / SUDP(sport=5353, dport=53)
        / b"query")
    assert icmp_packet(C, S, 8, 0, 0x00010002, b"ping") == bytes(
        IP(src="10.77.0.2", dst="10.77.0.1", id=0, flags="DF", proto=1) /
        SICMP(type=8, code=0, id=1, seq=2) / b"ping")
    assert build_icmp(0, 0, 0, b"") == bytes(SICMP(type=0, code=0, id=0, seq=0))


def test_udp_and_icmp_parse() -> None:
    u = parse_udp(parse_ipv4(bytes(IP(src="10.77.0.2", dst="10.77.0.1") /
                                   SUDP(sport=1, dport=2) / b"abc")))
    assert (u.sport, u.dport, bytes(u.payload)) == (1, 2, b"abc")
    i = parse_icmp(parse_ipv4(bytes(IP(src="10.77.0.2", dst="10.77.0.1") /
                                    SICMP(type=8, id=3, seq=4) / b"x")))
    assert (i.type, i.code, i.rest, bytes(i.payload)) == (8, 0, (3 << 16) | 4, b"x")


def test_ipv6_parsed_through_extension_headers() -> None:
    raw = bytes(IPv6(src="fd77::2", dst="fd77::1", hlim=9) / IPv6ExtHdrHopByHop() /
                STCP(sport=1, dport=2, flags="S") )
    ip = parse_ip(raw)
    assert (ip.version, ip.src, ip.dst, ip.proto, ip.hop_limit) == (6, C6, S6, 6, 9)
    assert parse_tcp(ip).dport == 2
    frag = bytes(IPv6(src="fd77::2", dst="fd77::1") / IPv6ExtHdrFragment(m=1) /
                 SUDP(sport=1, dport=2) / b"x")
    assert parse_ipv6(frag).is_fragment
    echo = bytes(IPv6(src="fd77::2", dst="fd77::1") / ICMPv6EchoRequest(id=1, seq=1))
    ip6 = parse_ip(echo)
    assert parse_icmp(ip6).type == 128  # ICMPv6 checksum over the pseudo-header verified
    assert icmp_packet(C6, S6, 128, 0, 0x00010001) == echo
    assert parse_tcp(parse_ip(tcp_packet(C6, S6, 1, 2, flags=SYN))).flags == SYN
    assert ip_str(C6) == "fd77::2" and ip_str(C) == "10.77.0.2"


def test_checksum_helpers() -> None:
    hdr = bytes(IP(src="10.77.0.2", dst="10.77.0.1"))[:20]
    assert verify(hdr)
    zeroed = hdr[:10] + b"\0\0" + hdr[12:]
    assert checksum(zeroed) == int.from_bytes(hdr[10:12], "big")
    assert checksum(b"\xff\xff") == 0 and checksum(b"") == 0xFFFF


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b[:10], "truncated"),
    (lambda b: bytes([0x46]) + b[1:], "header length"),  # IHL 6 with no options: bad checksum
    (lambda b: b[:2] + (9999).to_bytes(2, "big") + b[4:], "total length"),
    (lambda b: b[:24] + bytes([b[24] ^ 0xFF]) + b[25:], "checksum"),  # TCP bytes changed
    (lambda b: b[:32] + bytes([0x10]) + b[33:], "data offset"),
])
def test_malformed_raise_packet_error(mutate, message) -> None:
    good = tcp_packet(C, S, 1, 2, flags=ACK, payload=b"abcdef")
    bad = mutate(good)
    with pytest.raises(PacketError):
        parse_tcp(parse_ipv4(bad))


@pytest.mark.parametrize("raw", [
    b"\x02", b"\x02\x05\x05\xb4", b"\x03\x02\x07", b"\x08\x0a\x00", b"\x05\x03\x00",
    b"\x04\x03\x00", b"\x02\x01",
])
def test_bad_options_raise(raw: bytes) -> None:
    with pytest.raises(PacketError):
        parse_tcp_options(raw)


def test_unknown_options_skipped_and_eol_stops() -> None:
    o = parse_tcp_options(b"\x1e\x04\x00\x00\x02\x04\x05\xb4\x00\xff\xff")
    assert o.mss == 1460
    assert TcpOptions().encode() == b""
    with pytest.raises(PacketError):
        TcpOptions(mss=1, sack_ok=True, ts=(1, 1), wscale=1, sack=((1, 2),) * 3).encode()


def test_the_addresses_of_a_packet_cut_by_a_queues_copy() -> None:
    from node.stack.packet import cut_addresses, is_cut

    v4 = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 6028, 0, 0, 64, 17, 0, bytes([10, 77, 1, 2]),
                     bytes([10, 77, 9, 9])) + b"x" * 3820
    assert cut_addresses(v4) == (bytes([10, 77, 1, 2]), bytes([10, 77, 9, 9]))
    v6 = struct.pack("!IHBB16s16s", 6 << 28, 6000, 17, 64, b"\xfd" + b"\1" * 15,
                     b"\xfd" + b"\2" * 15) + b"x" * 3800
    assert cut_addresses(v6) == (b"\xfd" + b"\1" * 15, b"\xfd" + b"\2" * 15)
    whole = v4[:20] + b"x" * (6028 - 20)
    assert cut_addresses(whole) is None  # not cut: parse_ip's
    assert cut_addresses(v4[:19]) is None and cut_addresses(v6[:39]) is None
    assert cut_addresses(b"\x40" + v4[1:]) is None  # IHL 0
    assert is_cut(v4) and is_cut(v6) and not is_cut(whole) and not is_cut(b"")
