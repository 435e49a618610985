"""IPv4 TCP packets to and from the endpoint's ``Segment`` on the hot path.

Parsing reads the fixed headers with one ``struct`` call each and the options only when they are
not the NOP NOP TS block Linux puts on every segment; building packs both headers and the
timestamp option at once and sums the checksum with ``node.stack.checksum`` (no scapy, no
intermediate objects). IPv6 is not handled here (see the package notes).
"""

from __future__ import annotations

import struct

from node.stack.checksum import ones_sum
from node.stack.packet import PacketError, parse_tcp_options
from node.takeover.tcp import Segment

_IP = struct.Struct("!BBHHHBBH4s4s")
_TCP = struct.Struct("!HHIIBBHHH")
_TS = struct.Struct("!BBBBII")
_II = struct.Struct("!II")
_TS_FAST = b"\x01\x01\x08\x0a"


class Parsed:
    """A TCP segment with its addresses: ``key`` is the stack's flow key of its direction
    (source, destination, ports)."""

    __slots__ = ("dport", "dst", "key", "seg", "sport", "src")

    def __init__(self, src: bytes, dst: bytes, sport: int, dport: int, seg: Segment) -> None:
        self.src = src
        self.dst = dst
        self.sport = sport
        self.dport = dport
        self.seg = seg
        self.key = src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")


def parse(p: bytes | memoryview) -> Parsed:
    """An IPv4 TCP packet (checksums are the kernel's business on the queue path). Raises
    ``PacketError`` for anything else or anything malformed."""
    n = len(p)
    if n < 40 or p[0] >> 4 != 4 or p[9] != 6:
        raise PacketError("not an IPv4 TCP packet")
    ihl = (p[0] & 15) * 4
    total = (p[2] << 8) | p[3]
    if ihl < 20 or total > n or total < ihl + 20:
        raise PacketError("IPv4 lengths")
    if p[6] & 0x3F or p[7]:
        raise PacketError("IP fragment")
    src = bytes(p[12:16])
    dst = bytes(p[16:20])
    sport, dport, seq, ack, off, flags, window, _c, _u = _TCP.unpack_from(p, ihl)
    doff = (off >> 4) * 4
    if doff < 20 or ihl + doff > total:
        raise PacketError("TCP data offset")
    tsval = tsecr = None
    if doff == 32 and p[ihl + 20:ihl + 24] == _TS_FAST:
        tsval, tsecr = _II.unpack_from(p, ihl + 24)
    sack: tuple[tuple[int, int], ...] = ()
    if doff > 20 and tsval is None:
        opts = parse_tcp_options(p[ihl + 20:ihl + doff])
        if opts.ts is not None:
            tsval, tsecr = opts.ts
        sack = opts.sack
    payload = bytes(p[ihl + doff:total])
    return Parsed(src, dst, sport, dport,
                  Segment(seq, ack, flags, window, payload, tsval, tsecr, sack))


def build(src: bytes, dst: bytes, sport: int, dport: int, seg: Segment, *, ident: int = 0,
          ttl: int = 64) -> bytes:
    """The IPv4 packet carrying ``seg`` (DF set, TS option when the segment has one)."""
    payload = seg.payload
    if seg.tsval is not None:
        opts = _TS.pack(1, 1, 8, 10, seg.tsval & 0xFFFFFFFF, (seg.tsecr or 0) & 0xFFFFFFFF)
    else:
        opts = b""
    if seg.sack:
        blocks = seg.sack[:3 if opts else 4]
        opts += struct.pack(f"!BBBB{2 * len(blocks)}I", 1, 1, 5, 2 + 8 * len(blocks),
                            *(x & 0xFFFFFFFF for b in blocks for x in b))
    doff = 20 + len(opts)
    tcp_len = doff + len(payload)
    total = 20 + tcp_len
    if total > 0xFFFF:
        raise PacketError("packet too long")
    tcp = bytearray(_TCP.pack(sport, dport, seg.seq & 0xFFFFFFFF, seg.ack & 0xFFFFFFFF,
                              (doff // 4) << 4, seg.flags, seg.window & 0xFFFF, 0, 0))
    tcp += opts
    tcp += payload
    pseudo = (int.from_bytes(src, "big") + int.from_bytes(dst, "big") + 6 + tcp_len) % 0xFFFF
    # ones_sum is the sum modulo 0xFFFF, where 0 stands for 0xFFFF too: both complements
    # (0xFFFF or 0) verify the same at the receiver.
    tcp[16:18] = (~ones_sum(tcp, pseudo) & 0xFFFF).to_bytes(2, "big")
    ip = bytearray(_IP.pack(0x45, 0, total, ident & 0xFFFF, 0x4000, ttl, 6, 0, src, dst))
    ip[10:12] = (~ones_sum(ip) & 0xFFFF).to_bytes(2, "big")
    return bytes(ip + tcp)
