"""The user-space half of filters on the stack's queue path.

``FilterGate`` sees the stack's events for each queued packet and says whether to drop it: a
datagram that a user-space filter matches, or the segment with which a TCP connection's
reassembled stream comes to match one. From then on every packet of that connection is dropped
(retransmissions included: the stack has already counted them as delivered, so they bring no
event), so nothing of a matched request reaches the service, however it is segmented. Its
semantics are exactly those of ``filters.condition`` (one model, two back ends).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from filters.userspace import UserspaceFilters
from node.stack.events import Event, FlowClosed, MessageIn
from node.stack.packet import PacketError, parse_ipv6
from node.stack.stack import Stack

MAX_STREAM = 64 * 1024  # a filter's condition lies within the alert's 64 KiB
MAX_STREAM_BYTES = 64 << 20  # every stream kept, together: the oldest flows' go first
MAX_BLOCKED = 65536


def tcp_key(p: bytes) -> bytes | None:
    """Addresses and ports of a TCP packet, IPv4 or IPv6, as one key (the stack's own flow
    key)."""
    if len(p) >= 24 and p[0] >> 4 == 4 and p[9] == 6:
        ihl = (p[0] & 0x0F) * 4
        return bytes(p[12:20]) + bytes(p[ihl:ihl + 4])
    if len(p) >= 44 and p[0] >> 4 == 6:
        try:
            ip = parse_ipv6(p)
        except PacketError:
            return None
        if ip.proto == 6 and len(ip.payload) >= 4:
            return ip.src + ip.dst + bytes(ip.payload[:4])
    return None


@dataclass
class FilterGate:
    filters: UserspaceFilters
    # Per TCP flow with user-space filters on its port, oldest first: its stream from the
    # start (MAX_STREAM at most), and where each filter's scan resumes.
    streams: dict[int, bytes] = field(default_factory=dict)
    scans: dict[int, dict[str, int]] = field(default_factory=dict)
    stream_bytes: int = 0
    # Matched TCP connections (tcp_key -> flow id) whose every packet is dropped until the
    # flow closes; bounded, the oldest forgotten first.
    blocked: dict[bytes, int] = field(default_factory=dict)
    hits: int = 0
    # The stack whose events these are: a matched message's bytes count there as never
    # delivered, so once the bound below has forgotten its connection a resend is checked
    # again instead of passing as a duplicate.
    stack: Stack | None = None
    _blocked_keys: dict[int, bytes] = field(default_factory=dict)
    # Flows whose stream was let go (MAX_STREAM_BYTES): where their new bytes lie is unknown.
    _lost: dict[int, None] = field(default_factory=dict)
    _full: dict[int, None] = field(default_factory=dict)  # streams at MAX_STREAM, oldest first

    def blocks(self, packet: bytes) -> bool:
        """A packet of a matched connection: dropped before the stack sees it, so nothing
        the client sends (a FIN, a RST, a SYN) ends the block; the server's close, the flow's
        timeout or the bound on the list does."""
        return bool(self.blocked) and tcp_key(packet) in self.blocked

    def __call__(self, packet: bytes, events: list[Event]) -> bool:
        """Drop ``packet``? To be called with every packet's events, also of the packets whose
        verdict is given elsewhere (their answer unused): a flow's state goes with its close,
        whichever packet brings it."""
        drop = False
        for e in events:
            if type(e) is MessageIn:
                drop |= self._message(e, packet)
            elif type(e) is FlowClosed:
                self._forget(e.flow_id)
                self._unblock(e.flow_id)
        return drop

    def _forget(self, flow_id: int, lost: bool = False) -> None:
        self._full.pop(flow_id, None)
        data = self.streams.pop(flow_id, None)
        if data is not None:
            self.stream_bytes -= len(data)
        self.scans.pop(flow_id, None)
        if lost:
            self._lost[flow_id] = None
            if len(self._lost) > MAX_BLOCKED:
                del self._lost[next(iter(self._lost))]
        else:
            self._lost.pop(flow_id, None)

    def _unblock(self, flow_id: int) -> None:
        key = self._blocked_keys.pop(flow_id, None)
        if key is not None:
            self.blocked.pop(key, None)

    def _message(self, e: MessageIn, packet: bytes) -> bool:
        proto = "udp" if e.message.connection is None else "tcp"
        if (17 if proto == "udp" else 6, e.dport) not in self.filters:
            return False  # nothing to check there: no state kept either
        if proto == "udp":
            hit = self.filters.check(proto, e.dport, e.message.data)
        else:
            hit = self._stream(e)
        if hit is None:
            return False
        self.hits += 1
        if proto == "tcp":
            key = tcp_key(packet)  # only for a hit: an IPv6 packet's takes a parse
            fd = (self.stack.tcp.table.get(key) if self.stack is not None and key is not None
                  else None)
            if fd is not None:
                self.stack.rewind(fd.flow, e.seq)  # type: ignore[union-attr]
            if key is not None:
                self.blocked[key] = e.flow_id
                self._blocked_keys[e.flow_id] = key
                if len(self.blocked) > MAX_BLOCKED:
                    self._unblock(next(iter(self.blocked.values())))
        return True

    def _stream(self, e: MessageIn) -> Any:
        chunk = e.message.data
        if e.flow_id in self._lost:
            return self.filters.check("tcp", e.dport, chunk, anywhere=True)
        old = self.streams.pop(e.flow_id, b"")
        past = len(old) + len(chunk) > MAX_STREAM  # some bytes past the bound
        data = old if len(old) >= MAX_STREAM else (old + chunk)[:MAX_STREAM]
        self.streams[e.flow_id] = data  # the newest last
        self.stream_bytes += len(data) - len(old)
        if len(data) >= MAX_STREAM:
            self._full[e.flow_id] = None
        while self.stream_bytes > MAX_STREAM_BYTES:
            # A stream at its bound goes first (nothing in it is checked again), else the
            # oldest: its later bytes are checked as past the bound.
            full = next(iter(self._full), None)
            self._forget(next(iter(self.streams)) if full is None else full, lost=True)
        scans = self.scans.setdefault(e.flow_id, {})
        # At the bound the scan resumes where it stopped: only a filter added since looks.
        hit = self.filters.check("tcp", e.dport, data, scans)
        if hit is None and past:
            hit = self.filters.check("tcp", e.dport, chunk, anywhere=True)
        if hit is not None and e.flow_id in self.streams:
            # The chunk counts as never delivered (the stack rewinds to it): the stream is
            # what came before it, and its resend is scanned afresh should the block go.
            self.streams[e.flow_id] = old
            self.stream_bytes -= len(data) - len(old)
            self.scans[e.flow_id] = {}
            if len(old) < MAX_STREAM:
                self._full.pop(e.flow_id, None)
        return hit
