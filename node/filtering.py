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

from filters.userspace import UserspaceFilters
from node.stack.events import Event, FlowClosed, MessageIn
from node.stack.stack import Stack

MAX_STREAM = 64 * 1024  # a filter's condition lies within the alert's 64 KiB


MAX_BLOCKED = 65536


def tcp_key(p: bytes) -> bytes | None:
    """Addresses and ports of an IPv4 TCP packet, as one key (the stack's own flow key)."""
    if len(p) >= 24 and p[0] >> 4 == 4 and p[9] == 6:
        ihl = (p[0] & 0x0F) * 4
        return bytes(p[12:20]) + bytes(p[ihl:ihl + 4])
    return None


@dataclass
class FilterGate:
    filters: UserspaceFilters
    streams: dict[int, bytes] = field(default_factory=dict)
    scans: dict[int, dict[str, int]] = field(default_factory=dict)  # per flow: where to resume
    # TCP connections (tcp_key) to drop, oldest first: bounded, the oldest forgotten first.
    blocked: dict[bytes, None] = field(default_factory=dict)
    hits: int = 0
    # The stack whose events these are: a matched message's bytes count there as never
    # delivered, so once the bound below has forgotten its connection a resend is checked
    # again instead of passing as a duplicate.
    stack: Stack | None = None

    def __call__(self, packet: bytes, events: list[Event]) -> bool:
        key = tcp_key(packet)
        if key is not None and key in self.blocked:
            return True
        drop = False
        for e in events:
            if type(e) is MessageIn:
                drop |= self._message(e, key)
            elif type(e) is FlowClosed:
                self.streams.pop(e.flow_id, None)
                self.scans.pop(e.flow_id, None)
        return drop

    def _message(self, e: MessageIn, key: bytes | None) -> bool:
        proto = "udp" if e.message.connection is None else "tcp"
        if proto == "udp":
            hit = self.filters.check(proto, e.dport, e.message.data)
        else:
            data = self.streams.get(e.flow_id, b"")
            past = len(data) + len(e.message.data) > MAX_STREAM  # some bytes past the bound
            if len(data) < MAX_STREAM:
                data = (data + e.message.data)[:MAX_STREAM]
                self.streams[e.flow_id] = data
            # At the bound the scan resumes where it stopped: only a filter added since looks.
            hit = self.filters.check(proto, e.dport, data, self.scans.setdefault(e.flow_id, {}))
            if hit is None and past:
                hit = self.filters.check(proto, e.dport, e.message.data, anywhere=True)
        if hit is None:
            return False
        self.hits += 1
        if proto == "tcp":
            self.streams.pop(e.flow_id, None)
            self.scans.pop(e.flow_id, None)
            fd = (self.stack.tcp.table.get(key) if self.stack is not None and key is not None
                  else None)
            if fd is not None and fd.flow.stream is not None:
                fd.flow.stream.rewind(e.seq)
            if key is not None:
                self.blocked[key] = None
                if len(self.blocked) > MAX_BLOCKED:
                    del self.blocked[next(iter(self.blocked))]
        return True
