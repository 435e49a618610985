"""Parsers and builders for IPv4, IPv6 (parsed), TCP (with every option the stack tracks), UDP and
ICMP/ICMPv6, written with ``struct`` and ``memoryview`` for the hot path (scapy is for tests).

Parsers take any buffer (``bytes``, ``bytearray``, ``memoryview`` of a pool buffer) and return
small slot objects whose ``payload`` is a ``memoryview`` into the same buffer: nothing is copied
on the way up. Every malformed input (truncated, inconsistent lengths, bad checksums when asked
to verify, bad options, fuzz) raises :class:`PacketError` and nothing else; callers that must
never raise (``node.stack.stack.Stack.handle``) catch exactly that.

Addresses are raw ``bytes`` (4 or 16 long): they are dictionary keys on the hot path and
``socket.inet_ntop`` turns them into text when a human needs it.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from node.stack.checksum import Buffer, checksum, ones_sum, pseudo_header_sum

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58

FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# IPv6 extension headers walked to find the upper layer (hop-by-hop, routing, fragment,
# destination options); anything else is the upper-layer protocol.
_IPV6_EXT = {0, 43, 44, 60}
_IPV6_FRAGMENT = 44
_MAX_IPV6_EXT = 8  # hostile chains of extension headers stop here

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_UDP = struct.Struct("!HHHH")
_ICMP = struct.Struct("!BBHI")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_TS = struct.Struct("!II")


class PacketError(ValueError):
    """A packet is malformed: truncated, inconsistent, failing a checksum, or unsupported.
    The only exception the parsers raise."""


def ip_str(addr: bytes) -> str:
    """Text form of a 4- or 16-byte address."""
    return socket.inet_ntop(socket.AF_INET if len(addr) == 4 else socket.AF_INET6, addr)


def ip_bytes(addr: str) -> bytes:
    """Raw form of an IPv4 or IPv6 address in text."""
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


# --------------------------------------------------------------------------- TCP options

@dataclass(slots=True)
class TcpOptions:
    """TCP options the connection tracker needs to take a flow over later."""

    mss: int | None = None
    wscale: int | None = None
    sack_ok: bool = False
    ts: tuple[int, int] | None = None  # (TSval, TSecr)
    sack: tuple[tuple[int, int], ...] = ()  # SACK blocks (left, right)

    def encode(self) -> bytes:
        """Encode in the order Linux sends them, NOP-padded to a multiple of 4 bytes."""
        out = bytearray()
        if self.mss is not None:
            out += struct.pack("!BBH", 2, 4, self.mss)
        if self.sack_ok and self.ts is not None:
            out += struct.pack("!BBBBII", 4, 2, 8, 10, *self.ts)
        else:
            if self.sack_ok:
                out += b"\x01\x01\x04\x02"
            if self.ts is not None:
                out += struct.pack("!BBBBII", 1, 1, 8, 10, *self.ts)
        if self.wscale is not None:
            out += struct.pack("!BBBB", 1, 3, 3, self.wscale)
        if self.sack:
            out += struct.pack("!BBBB", 1, 1, 5, 2 + 8 * len(self.sack))
            for left, right in self.sack:
                out += struct.pack("!II", left, right)
        if len(out) > 40:
            raise PacketError("TCP options longer than 40 bytes")
        out += b"\x01" * (-len(out) % 4)
        return bytes(out)


_TS_FAST = b"\x01\x01\x08\x0a"  # NOP NOP TS: what Linux puts on every segment with timestamps


def parse_tcp_options(raw: Buffer) -> TcpOptions:
    """Parse a TCP option area. Wrong lengths raise ``PacketError``; unknown kinds are skipped
    (the receiving kernel skips them too)."""
    mv = memoryview(raw)
    n = len(mv)
    opts = TcpOptions()
    # Fast path: only NOP NOP TS (every data segment of a Linux flow with timestamps).
    if n == 12 and mv[:4] == _TS_FAST:
        opts.ts = _TS.unpack_from(mv, 4)
        return opts
    i = 0
    while i < n:
        kind = mv[i]
        if kind == 0:  # end of option list
            break
        if kind == 1:  # NOP
            i += 1
            continue
        if i + 1 >= n:
            raise PacketError("TCP option without length")
        length = mv[i + 1]
        if length < 2 or i + length > n:
            raise PacketError(f"TCP option {kind} with bad length {length}")
        if kind == 2:
            if length != 4:
                raise PacketError("MSS option length")
            opts.mss = _U16.unpack_from(mv, i + 2)[0]
        elif kind == 3:
            if length != 3:
                raise PacketError("window scale option length")
            opts.wscale = mv[i + 2]
        elif kind == 4:
            if length != 2:
                raise PacketError("SACK-permitted option length")
            opts.sack_ok = True
        elif kind == 5:
            if (length - 2) % 8 or length == 2:
                raise PacketError("SACK option length")
            opts.sack = tuple(_TS.unpack_from(mv, j) for j in range(i + 2, i + length, 8))
        elif kind == 8:
            if length != 10:
                raise PacketError("timestamp option length")
            opts.ts = _TS.unpack_from(mv, i + 2)
        i += length
    return opts


# --------------------------------------------------------------------------- network layer

class IPv4:
    """A parsed IPv4 header; ``payload`` is a view of the transport bytes (``total_len``
    bounded, link padding cut)."""

    __slots__ = ("dst", "flags", "frag_offset", "header_len", "ident", "payload", "proto",
                 "src", "tos", "total_len", "ttl")
    version = 4

    def __init__(self, src: bytes, dst: bytes, proto: int, ttl: int, tos: int, ident: int,
                 flags: int, frag_offset: int, header_len: int, total_len: int,
                 payload: memoryview) -> None:
        self.src = src
        self.dst = dst
        self.proto = proto
        self.ttl = ttl
        self.tos = tos
        self.ident = ident
        self.flags = flags
        self.frag_offset = frag_offset
        self.header_len = header_len
        self.total_len = total_len
        self.payload = payload

    @property
    def is_fragment(self) -> bool:
        return bool(self.flags & 1) or self.frag_offset != 0


class IPv6:
    """A parsed IPv6 header with its extension headers walked; ``proto`` is the upper-layer
    protocol and ``payload`` its bytes."""

    __slots__ = ("dst", "flow_label", "hop_limit", "is_fragment", "payload", "proto", "src",
                 "traffic_class")
    version = 6

    def __init__(self, src: bytes, dst: bytes, proto: int, hop_limit: int, traffic_class: int,
                 flow_label: int, is_fragment: bool, payload: memoryview) -> None:
        self.src = src
        self.dst = dst
        self.proto = proto
        self.hop_limit = hop_limit
        self.traffic_class = traffic_class
        self.flow_label = flow_label
        self.is_fragment = is_fragment
        self.payload = payload


IP = IPv4 | IPv6


def parse_ipv4(buf: Buffer, verify: bool = True) -> IPv4:
    mv = memoryview(buf)
    n = len(mv)
    if n < 20:
        raise PacketError("IPv4 header truncated")
    vihl, tos, total, ident, ff, ttl, proto, _csum, src, dst = _IP4.unpack_from(mv)
    if vihl >> 4 != 4:
        raise PacketError("not IPv4")
    hl = (vihl & 15) * 4
    if hl < 20 or hl > n:
        raise PacketError("IPv4 header length")
    if total < hl or total > n:
        raise PacketError("IPv4 total length")
    if verify and ones_sum(mv[:hl]) != 0:
        raise PacketError("IPv4 header checksum")
    return IPv4(src, dst, proto, ttl, tos, ident, ff >> 13, ff & 0x1FFF, hl, total,
                mv[hl:total])


def parse_ipv6(buf: Buffer) -> IPv6:
    mv = memoryview(buf)
    n = len(mv)
    if n < 40:
        raise PacketError("IPv6 header truncated")
    vtf, plen, nh, hlim, src, dst = _IP6.unpack_from(mv)
    if vtf >> 28 != 6:
        raise PacketError("not IPv6")
    end = 40 + plen
    if end > n:
        raise PacketError("IPv6 payload length")
    off = 40
    fragment = False
    for _ in range(_MAX_IPV6_EXT + 1):  # up to _MAX_IPV6_EXT headers, then the transport's
        if nh not in _IPV6_EXT:
            break
        if off + 8 > end:
            raise PacketError("IPv6 extension header truncated")
        next_nh = mv[off]
        if nh == _IPV6_FRAGMENT:
            fragment = True
            size = 8
        else:
            size = (mv[off + 1] + 1) * 8
        if off + size > end:
            raise PacketError("IPv6 extension header length")
        nh, off = next_nh, off + size
    else:
        raise PacketError("too many IPv6 extension headers")
    return IPv6(src, dst, nh, hlim, (vtf >> 20) & 0xFF, vtf & 0xFFFFF, fragment, mv[off:end])


def parse_ip(buf: Buffer, verify: bool = True) -> IPv4 | IPv6:
    """IPv4 or IPv6 by the version nibble."""
    mv = memoryview(buf)
    if not len(mv):
        raise PacketError("empty packet")
    version = mv[0] >> 4
    if version == 4:
        return parse_ipv4(mv, verify)
    if version == 6:
        return parse_ipv6(mv)
    raise PacketError(f"IP version {version}")


def is_cut(p: bytes) -> bool:
    """An IP packet whose header is whole but whose length is more than ``p`` holds (cut by a
    queue's copy range, which ``parse_ip`` refuses)."""
    n = len(p)
    if n >= 20 and p[0] >> 4 == 4:
        return p[0] & 15 >= 5 and (p[2] << 8 | p[3]) > n
    return n >= 40 and p[0] >> 4 == 6 and 40 + (p[4] << 8 | p[5]) > n


def cut_addresses(p: bytes) -> tuple[bytes, bytes] | None:
    """The source and destination of a packet ``is_cut`` says is cut, else None."""
    if not is_cut(p):
        return None
    return (p[12:16], p[16:20]) if p[0] >> 4 == 4 else (p[8:24], p[24:40])


def _pseudo(ip: IPv4 | IPv6, proto: int, length: int) -> int:
    return pseudo_header_sum(ip.src, ip.dst, proto, length)


# --------------------------------------------------------------------------- transport layer

class TCP:
    """A parsed TCP header. ``options`` is parsed on first use; ``options_raw`` and ``payload``
    are views."""

    __slots__ = ("_options", "ack", "checksum", "dport", "flags", "header_len", "options_raw",
                 "payload", "seq", "sport", "urgent", "window")

    def __init__(self, sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
                 checksum: int, urgent: int, header_len: int, options_raw: memoryview,
                 payload: memoryview) -> None:
        self.sport = sport
        self.dport = dport
        self.seq = seq
        self.ack = ack
        self.flags = flags
        self.window = window
        self.checksum = checksum
        self.urgent = urgent
        self.header_len = header_len
        self.options_raw = options_raw
        self.payload = payload
        self._options: TcpOptions | None = None

    @property
    def options(self) -> TcpOptions:
        """The options (raises ``PacketError`` if they are malformed)."""
        if self._options is None:
            self._options = parse_tcp_options(self.options_raw)
        return self._options

    @property
    def seg_len(self) -> int:
        """Sequence space taken: payload plus one for SYN and for FIN."""
        return len(self.payload) + (self.flags & SYN and 1) + (self.flags & FIN and 1)


class UDP:
    __slots__ = ("checksum", "dport", "length", "payload", "sport")

    def __init__(self, sport: int, dport: int, length: int, checksum: int,
                 payload: memoryview) -> None:
        self.sport = sport
        self.dport = dport
        self.length = length
        self.checksum = checksum
        self.payload = payload


class ICMP:
    """ICMP or ICMPv6: type, code, the 4 bytes after the checksum (``rest``), and the rest."""

    __slots__ = ("checksum", "code", "payload", "rest", "type")

    def __init__(self, type: int, code: int, checksum: int, rest: int,
                 payload: memoryview) -> None:
        self.type = type
        self.code = code
        self.checksum = checksum
        self.rest = rest
        self.payload = payload


def parse_tcp(ip: IPv4 | IPv6, verify: bool = True) -> TCP:
    mv = ip.payload
    n = len(mv)
    if n < 20:
        raise PacketError("TCP header truncated")
    sport, dport, seq, ack, off, flags, window, csum, urg = _TCP.unpack_from(mv)
    hl = (off >> 4) * 4
    if hl < 20 or hl > n:
        raise PacketError("TCP data offset")
    if verify and ones_sum(mv, _pseudo(ip, IPPROTO_TCP, n)) != 0:
        raise PacketError("TCP checksum")
    return TCP(sport, dport, seq, ack, flags, window, csum, urg, hl, mv[20:hl], mv[hl:])


def parse_udp(ip: IPv4 | IPv6, verify: bool = True) -> UDP:
    mv = ip.payload
    n = len(mv)
    if n < 8:
        raise PacketError("UDP header truncated")
    sport, dport, length, csum = _UDP.unpack_from(mv)
    if length < 8 or length > n:
        raise PacketError("UDP length")
    # Checksum 0 means "none" over IPv4 only; IPv6 makes it mandatory.
    if verify and (csum or ip.version == 6) and \
            ones_sum(mv[:length], _pseudo(ip, IPPROTO_UDP, length)) != 0:
        raise PacketError("UDP checksum")
    return UDP(sport, dport, length, csum, mv[8:length])


def parse_icmp(ip: IPv4 | IPv6, verify: bool = True) -> ICMP:
    mv = ip.payload
    n = len(mv)
    if n < 8:
        raise PacketError("ICMP header truncated")
    typ, code, csum, rest = _ICMP.unpack_from(mv)
    if verify:
        initial = _pseudo(ip, IPPROTO_ICMPV6, n) if ip.version == 6 else 0
        if ones_sum(mv, initial) != 0:
            raise PacketError("ICMP checksum")
    return ICMP(typ, code, csum, rest, mv[8:])


# --------------------------------------------------------------------------- builders

def build_ipv4(src: bytes, dst: bytes, proto: int, payload: Buffer, *, ttl: int = 64,
               ident: int = 0, tos: int = 0, df: bool = True) -> bytes:
    """An IPv4 packet (no options) around ``payload``, header checksum filled in."""
    total = 20 + len(payload)
    if total > 0xFFFF:
        raise PacketError("IPv4 packet too long")
    hdr = bytearray(_IP4.pack(0x45, tos, total, ident, 0x4000 if df else 0, ttl, proto, 0,
                              src, dst))
    hdr[10:12] = _U16.pack(checksum(hdr))
    return bytes(hdr) + bytes(payload)


def build_ipv6(src: bytes, dst: bytes, next_header: int, payload: Buffer, *,
               hop_limit: int = 64) -> bytes:
    if len(payload) > 0xFFFF:
        raise PacketError("IPv6 payload too long")
    return _IP6.pack(6 << 28, len(payload), next_header, hop_limit, src, dst) + bytes(payload)


def build_tcp(src: bytes, dst: bytes, sport: int, dport: int, *, seq: int = 0, ack: int = 0,
              flags: int = ACK, window: int = 65535, options: TcpOptions | bytes | None = None,
              payload: Buffer = b"", urgent: int = 0) -> bytes:
    """A TCP segment with its checksum over the IPv4/IPv6 pseudo-header of ``src``/``dst``."""
    raw_opts = options.encode() if isinstance(options, TcpOptions) else (options or b"")
    if len(raw_opts) % 4 or len(raw_opts) > 40:
        raise PacketError("TCP options must be a multiple of 4 bytes, at most 40")
    hl = 20 + len(raw_opts)
    seg = bytearray(_TCP.pack(sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, (hl // 4) << 4,
                              flags, window, 0, urgent))
    seg += raw_opts
    seg += payload
    seg[16:18] = _U16.pack(checksum(seg, pseudo_header_sum(src, dst, IPPROTO_TCP, len(seg))))
    return bytes(seg)


def build_udp(src: bytes, dst: bytes, sport: int, dport: int, payload: Buffer = b"") -> bytes:
    length = 8 + len(payload)
    dgram = bytearray(_UDP.pack(sport, dport, length, 0)) + bytes(payload)
    csum = checksum(dgram, pseudo_header_sum(src, dst, IPPROTO_UDP, length))
    dgram[6:8] = _U16.pack(csum or 0xFFFF)  # 0 would mean "no checksum"
    return bytes(dgram)


def build_icmp(type: int, code: int, rest: int = 0, payload: Buffer = b"", *,
               src: bytes | None = None, dst: bytes | None = None) -> bytes:
    """An ICMP message; with 16-byte ``src``/``dst`` an ICMPv6 one (pseudo-header summed)."""
    msg = bytearray(_ICMP.pack(type, code, 0, rest)) + bytes(payload)
    initial = 0
    if src is not None and dst is not None and len(src) == 16:
        initial = pseudo_header_sum(src, dst, IPPROTO_ICMPV6, len(msg))
    msg[2:4] = _U16.pack(checksum(msg, initial))
    return bytes(msg)


def _ip_wrap(src: bytes, dst: bytes, proto: int, payload: bytes, **kw: int) -> bytes:
    if len(src) == 16:
        return build_ipv6(src, dst, proto, payload, hop_limit=kw.get("ttl", 64))
    return build_ipv4(src, dst, proto, payload, **kw)


def tcp_packet(src: bytes, dst: bytes, sport: int, dport: int, *, ttl: int = 64,
               ident: int = 0, **tcp: object) -> bytes:
    """A whole IPv4 (or IPv6) packet carrying ``build_tcp(src, dst, sport, dport, **tcp)``."""
    seg = build_tcp(src, dst, sport, dport, **tcp)  # type: ignore[arg-type]
    return _ip_wrap(src, dst, IPPROTO_TCP, seg, ttl=ttl, ident=ident)


def udp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: Buffer = b"", *,
               ttl: int = 64, ident: int = 0) -> bytes:
    return _ip_wrap(src, dst, IPPROTO_UDP, build_udp(src, dst, sport, dport, payload),
                    ttl=ttl, ident=ident)


def icmp_packet(src: bytes, dst: bytes, type: int, code: int, rest: int = 0,
                payload: Buffer = b"", *, ttl: int = 64) -> bytes:
    proto = IPPROTO_ICMPV6 if len(src) == 16 else IPPROTO_ICMP
    msg = build_icmp(type, code, rest, payload, src=src, dst=dst)
    return _ip_wrap(src, dst, proto, msg, ttl=ttl)


def clear_urgent(packet: bytes, at: int) -> bytes:
    """``packet`` with its TCP segment (at offset ``at``) no longer urgent: URG and the urgent
    pointer cleared, the checksum updated for the two changed words (RFC 1624). A server
    application that does not read urgent data inline (no SO_OOBINLINE, the default) takes the
    urgent byte out of the stream, which splits what the node checked ("EXPL" + urgent "X" +
    "OIT" reaches it as "EXPLOIT"); not urgent, every byte stays in the stream the node checks.
    Urgent data has no other use left (RFC 6093). Used by both queues that pass protected TCP
    traffic (``node.kernel.inline``, ``node.takeover.adapter``)."""
    b = bytearray(packet)
    w1, w2 = (b[at + 12] << 8) | b[at + 13], (b[at + 18] << 8) | b[at + 19]
    b[at + 13] &= ~URG & 0xFF
    b[at + 18] = b[at + 19] = 0
    s = (~((b[at + 16] << 8) | b[at + 17]) & 0xFFFF) + (~w1 & 0xFFFF) + \
        ((b[at + 12] << 8) | b[at + 13]) + (~w2 & 0xFFFF)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    s = ~s & 0xFFFF
    b[at + 16], b[at + 17] = s >> 8, s & 0xFF
    return bytes(b)
