"""Connection tracking: flows keyed by addresses and ports, TCP state of both directions.

Sans-I/O: every call takes ``now`` (seconds, any monotonic origin) and nothing reads a clock.
For TCP each direction keeps what is needed to take the connection over later (next sequence
number, last acknowledgement, window and its scale, MSS, timestamps, SACK permitted), and the
flow walks a small state machine::

    SYN_SENT --SYN/ACK--> SYN_RECV --ACK--> ESTABLISHED --FIN--> FIN_WAIT --FIN--> CLOSING
        --ACK of both FINs--> TIME_WAIT;   an acceptable RST from either side --> CLOSED

A flow first seen mid-stream (the node started after it opened) is picked up as ESTABLISHED
with what its packets show; its window scales are unknown (``wscale is None``).

Bounded: at most ``max_flows`` flows. Each flow has a deadline (``now`` + the timeout of its
state, refreshed by its packets). ``expire(now)`` removes flows from the least recently active
end while they are past their deadline; closed flows sit in a FIFO with one timeout and leave in
order; a lookup that finds a flow past its deadline treats it as gone; when the table is full
the least recently active flow is evicted.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from node.stack.reassembly import Reassembler


class TcpState(IntEnum):
    NONE = 0  # UDP and other datagram flows
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4  # one side sent FIN
    CLOSING = 5  # both sides sent FIN
    TIME_WAIT = 6  # both FINs acknowledged
    CLOSED = 7  # reset


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds of silence after which a flow in each state is forgotten (Linux conntrack uses
    longer ones; a node only needs flows it may still act on)."""

    syn: float = 30.0
    established: float = 3600.0
    closing: float = 60.0
    closed: float = 10.0
    udp: float = 30.0

    def of(self, state: TcpState) -> float:
        if state == TcpState.ESTABLISHED:
            return self.established
        if state in (TcpState.SYN_SENT, TcpState.SYN_RECV):
            return self.syn
        if state in (TcpState.FIN_WAIT, TcpState.CLOSING):
            return self.closing
        if state == TcpState.NONE:
            return self.udp
        return self.closed


class TcpHalf:
    """What one endpoint has sent: enough to rebuild its socket (see TCP_REPAIR)."""

    __slots__ = ("ack", "bytes", "fin_seq", "isn", "mss", "next_seq", "packets", "right_edge",
                 "sack_ok", "shift", "ts_ecr", "ts_ok", "ts_val", "window", "wscale")

    def __init__(self) -> None:
        self.isn: int | None = None  # initial sequence number, if its SYN was seen
        self.next_seq: int | None = None  # highest seq + length sent (SYN/FIN count 1)
        self.ack: int | None = None  # last acknowledgement number sent
        self.window = 0  # last raw (unscaled) window field
        self.wscale: int | None = None  # the window-scale option on its SYN, if any
        # Shift applied to the windows it advertises after the handshake: its wscale if both SYNs
        # carried the option, else 0; None while unknown (SYN not seen: flow picked up).
        self.shift: int | None = None
        self.mss: int | None = None
        self.sack_ok = False
        self.ts_ok = False  # it sent the timestamp option on its SYN
        self.ts_val: int | None = None  # last TSval it sent
        self.ts_ecr: int | None = None
        self.fin_seq: int | None = None  # sequence number of its FIN
        self.right_edge: int | None = None  # ack + scaled window: the most it lets the peer send
        self.packets = 0
        self.bytes = 0

    def scaled_window(self) -> int | None:
        """Its last window in bytes (None if the scale is unknown)."""
        return None if self.shift is None else self.window << self.shift

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}


class Flow:
    """One tracked flow. ``halves[0]`` is what the originator sent, ``halves[1]`` the
    responder. ``stream`` reassembles originator-to-responder data when the responder's port
    is protected (the messages a service receives)."""

    __slots__ = ("created", "deadline", "dirs", "ext", "halves", "id", "in_closing", "keys",
                 "last_seen", "orig", "picked_up", "proto", "resp", "state", "stream",
                 "synack_ts", "timeout", "ts_recent")

    def __init__(self, flow_id: int, proto: int, orig: tuple[bytes, int],
                 resp: tuple[bytes, int], now: float) -> None:
        self.id = flow_id
        self.proto = proto
        self.orig = orig  # (address, port) of the side that sent the first packet
        self.resp = resp
        self.state = TcpState.NONE
        self.created = now
        self.last_seen = now
        self.deadline = now
        self.halves = (TcpHalf(), TcpHalf())
        self.stream: Reassembler | None = None
        self.picked_up = False
        self.ts_recent: int | None = None  # responder's PAWS reference for originator data
        self.synack_ts: tuple[int, int] | None = None  # first and last TSval of its SYN/ACKs
        self.keys: tuple[bytes, bytes] = (b"", b"")
        self.dirs: tuple[FlowDir, FlowDir] | None = None
        self.in_closing = False
        self.timeout = 0.0  # its state's timeout: which of the table's activity lists holds it
        # What a user of the stack keeps with the flow: it lives exactly as long as the flow
        # is tracked (a close event may come while packets still do), and goes with it.
        self.ext: Any = None

    @property
    def window_scaling(self) -> bool:
        """Both SYNs carried window scale (else neither window is scaled)."""
        return self.halves[0].wscale is not None and self.halves[1].wscale is not None

    @property
    def sack_permitted(self) -> bool:
        return self.halves[0].sack_ok and self.halves[1].sack_ok

    @property
    def timestamps(self) -> bool:
        return self.halves[0].ts_ok and self.halves[1].ts_ok

    def __repr__(self) -> str:
        return (f"Flow({self.id}, proto={self.proto}, {self.orig} -> {self.resp}, "
                f"{self.state.name})")


class FlowDir:
    """A flow seen from one direction: what the lookup of a packet's key returns."""

    __slots__ = ("dir", "flow", "rcv", "snd")

    def __init__(self, flow: Flow, direction: int) -> None:
        self.flow = flow
        self.dir = direction  # 0: originator to responder
        self.snd = flow.halves[direction]
        self.rcv = flow.halves[1 - direction]


def flow_key(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The key of a packet's direction: for IPv4 this equals bytes 12..24 of a packet without IP
    options (addresses then ports), which lets the stack's fast path slice it."""
    return src + dst + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")


class ConnTrack:
    """Flows of one transport protocol (the stack keeps one table for TCP, one for UDP)."""

    def __init__(self, proto: int, *, max_flows: int = 65536,
                 timeouts: Timeouts | None = None) -> None:
        self.proto = proto
        self.max_flows = max_flows
        self.timeouts = timeouts or Timeouts()
        self.table: dict[bytes, FlowDir] = {}
        # Open flows by their state's timeout, each list least recently active first, so its
        # deadlines come in order: expiry stops at the first flow still in time without a
        # long-lived flow holding back short-lived ones behind it.
        self.active: dict[float, OrderedDict[int, Flow]] = {}
        self.closing: deque[Flow] = deque()  # closed flows, oldest first (one timeout for all)
        self.next_id = 1
        self.evicted = 0

    def __len__(self) -> int:
        return sum(map(len, self.active.values())) + len(self.closing)

    def _timeout(self, flow: Flow) -> float:
        """Its state's timeout; a flow picked up mid-stream that only one side has spoken in
        yet (a spoofed segment makes one) lives no longer than a handshake."""
        if flow.picked_up and not (flow.halves[0].packets and flow.halves[1].packets):
            return self.timeouts.syn
        return self.timeouts.of(flow.state)

    def _victim(self) -> Flow:
        """The flow to forget for room: a closed one, else the stalest of the shortest-lived
        open ones (half-open handshakes and one-sided pickups before established connections:
        a flood of spoofed SYNs or ACKs does not push out the connections a filter follows)."""
        if self.closing:
            return self.closing[0]
        return next(iter(self.active[min(t for t, fs in self.active.items() if fs)].values()))

    def get(self, key: bytes, now: float) -> FlowDir | None:
        """The flow a packet belongs to; None also for a flow past its deadline (``expire``
        reports and removes it; a new flow with the same key may replace it meanwhile)."""
        fd = self.table.get(key)
        if fd is not None and fd.flow.deadline < now:
            return None
        return fd

    def create(self, src: bytes, sport: int, dst: bytes, dport: int, now: float,
               state: TcpState, flow_id: int | None = None) -> tuple[FlowDir, list[Flow]]:
        """A new flow originated by (src, sport); returns its originator view and the flows
        evicted to make room."""
        evicted = []
        while len(self) >= self.max_flows:
            victim = self._victim()
            was_open = not victim.in_closing
            self.remove(victim)
            if was_open:  # closed flows were reported when they closed
                evicted.append(victim)
                self.evicted += 1
        if flow_id is None:
            flow_id = self.next_id
            self.next_id += 1
        flow = Flow(flow_id, self.proto, (src, sport), (dst, dport), now)
        flow.state = state
        flow.timeout = self._timeout(flow)
        flow.deadline = now + flow.timeout
        fwd, rev = FlowDir(flow, 0), FlowDir(flow, 1)
        flow.dirs = (fwd, rev)
        flow.keys = (flow_key(src, dst, sport, dport), flow_key(dst, src, dport, sport))
        self.table[flow.keys[0]] = fwd
        self.table[flow.keys[1]] = rev
        self.active.setdefault(flow.timeout, OrderedDict())[flow.id] = flow
        return fwd, evicted

    def touch(self, flow: Flow, now: float) -> None:
        """Activity: refresh the deadline and move to the recently active end."""
        flow.last_seen = now
        if flow.in_closing:
            return
        timeout = self._timeout(flow)
        flow.deadline = now + timeout
        if timeout == flow.timeout:
            self.active[timeout].move_to_end(flow.id)
        else:
            del self.active[flow.timeout][flow.id]
            flow.timeout = timeout
            self.active.setdefault(timeout, OrderedDict())[flow.id] = flow

    def close(self, flow: Flow, now: float) -> None:
        """The flow is over (reset, or both FINs acknowledged): keep it a short while so late
        packets still match it, then forget it."""
        if flow.in_closing:
            return
        self.active[flow.timeout].pop(flow.id, None)
        flow.in_closing = True
        flow.deadline = now + self.timeouts.closed
        self.closing.append(flow)

    def remove(self, flow: Flow) -> None:
        for k in flow.keys:
            fd = self.table.get(k)
            if fd is not None and fd.flow is flow:
                del self.table[k]
        if flow.in_closing:
            with contextlib.suppress(ValueError):
                self.closing.remove(flow)
        else:
            self.active[flow.timeout].pop(flow.id, None)

    def expire(self, now: float, budget: int = 256) -> list[Flow]:
        """Forget flows past their deadline (at most ``budget`` of each kind per call); return
        the ones that timed out while still open (closed ones were reported when they closed)."""
        out: list[Flow] = []
        n = 0
        while self.closing and self.closing[0].deadline < now and n < budget:
            flow = self.closing.popleft()
            flow.in_closing = False  # already out of the deque
            self.remove(flow)
            n += 1
        for flows in self.active.values():
            while flows and len(out) < budget:
                flow = next(iter(flows.values()))
                if flow.deadline >= now:
                    break
                self.remove(flow)
                out.append(flow)
        return out

    def flows(self) -> list[Flow]:
        return [f for flows in self.active.values() for f in flows.values()] + [*self.closing]
