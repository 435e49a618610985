"""A takeover's first ACK, sent from C before any Python runs (the ``_fastack`` extension).

On an idle node every Python step of a trigger's path runs cold (``bench_takeover``'s
``cold_call_us``), and the user-level stack's answer to the trigger, the ACK that
``seed.first_ack`` builds from the tracked state, waited for all of them. A queue reader thread
now waits in C instead (``Responder.wait``: ``recv`` with ``MSG_PEEK`` on its queue's netlink
socket, the interpreter lock released). For a packet that is the next in-order chunk of an armed
flow and matches a pattern, C sends that same ACK at once; then the binding reads the message as
before and the Python path takes the flow over, told (``Handle.peeked``) that the ACK is out.

What C knows is a copy that ``adapter.TakeoverQueue`` keeps after every packet of a flow
(``FastAck.arm``): the client's next sequence number and stream position, and the server's side
of the ACK; a flow that Python would not answer early (blocked, taken over, bytes held out of
order, nothing seen of the server, IPv6) is not armed. Patterns are those that C decides exactly
as Python does: a detector that declares ``chunk_prefix`` (``(prefix, verdict)``: it hits when a
chunk starts with ``prefix``), and the TCP specific filters (bytes at a stream offset), when they
lie wholly in the chunk. General filters, a specific filter split across segments, and every
packet C leaves alone (SYN, RST, FIN, URG, fragments, no link socket) go the Python way, which
answers itself. A pattern that Python no longer holds when it sees the packet (a filter removed
meanwhile) still has the flow taken over: its client was answered.

Without the extension (a tree not installed with ``pip install -e .``) ``available()`` is False
and the Python path answers every trigger.
"""

from __future__ import annotations

from typing import Any

from filters.condition import Specific
from node.stack.conntrack import Flow
from node.takeover.seed import AckFields

try:
    from node.takeover import _fastack
except ImportError:  # not built: the Python path answers
    _fastack = None

NO_POS = 0xFFFFFFFF  # the chunk's stream position is past what the stream keeps
# What ``Responder.wait`` returns for a packet it answered.
Peeked = tuple[int, int, int, int, int, int | None, int | None]  # id, pattern, AckFields


def available() -> bool:
    return _fastack is not None


def client_key(flow: Flow) -> bytes | None:
    """The flow's key as its client's packets carry it (addresses, ports); None for IPv6."""
    (ca, cp), (sa, sp) = flow.orig, flow.resp
    if len(ca) != 4:
        return None
    return ca + sa + cp.to_bytes(2, "big") + sp.to_bytes(2, "big")


class FastAck:
    """The C side's flows and patterns (see the module docstring). ``links``: ifindex -> (an
    ``AF_PACKET`` socket's descriptor bound to that interface, our MAC address there);
    ``max_stream``: how much of a stream the Python check keeps (a specific filter past it is
    not checked there either)."""

    def __init__(self, links: dict[int, tuple[int, bytes]], max_stream: int) -> None:
        if _fastack is None:
            raise RuntimeError("node.takeover._fastack is not built (pip install -e .)")
        self.responder = _fastack.Responder(max_stream)
        for ifindex, (fd, mac) in links.items():
            self.responder.add_link(ifindex, fd, mac)
        self.max_stream = max_stream
        self.origins: list[Any] = []  # per pattern: the hit it stands for
        self.version: int | None = None  # the filters' version the patterns are from
        self._keys: dict[int, bytes] = {}  # flow id -> its armed key
        self.wait = self.responder.wait  # the readers' peek (QueueAdapter.peek)

    def patterns(self, detect: Any, filters: Any) -> None:
        """The patterns from a detector's ``chunk_prefix`` and the TCP specific filters in
        ``filters`` (a ``UserspaceFilters`` or None); flows stay armed."""
        r = self.responder
        r.clear_patterns()
        origins: list[Any] = []
        prefix = getattr(detect, "chunk_prefix", None)
        if prefix is not None:
            r.add_prefix(-1, prefix[0])
            origins.append(prefix[1])
        if filters is not None:
            self.version = filters.version
            for f in filters:
                c = f.condition
                if f.proto == "tcp" and isinstance(c, Specific) and c.value and \
                        c.offset + len(c.value) <= self.max_stream:
                    r.add_bytes(f.port, c.offset, c.value)
                    origins.append(f)
        self.origins = origins
        if not origins:
            self.disarm_all()

    def arm(self, flow: Flow, pos: int | None, owned: Any = None) -> None:
        """After a packet of ``flow``: its next client chunk is checked in C at stream
        position ``pos`` (None: not at all; the flow is blocked), unless it is in ``owned``
        (the engine's flows, by key) or Python would not answer it early either."""
        stream = flow.stream
        c, s = flow.halves
        key = self._keys.get(flow.id) or client_key(flow)
        if key is None:
            return
        if pos is None or not self.origins or stream is None or stream.held or \
                s.next_seq is None or (owned is not None and key in owned):
            self.disarm(flow.id)
            return
        self._keys[flow.id] = key
        nxt, fin = (s.fin_seq, True) if s.fin_seq is not None else (s.next_seq, False)
        ts = s.ts_val & 0xFFFFFFFF if c.ts_val is not None and s.ts_val is not None else -1
        self.responder.arm(key, stream.next_seq, pos if pos < self.max_stream else NO_POS,
                           nxt & 0xFFFFFFFF, fin, s.window & 0xFFFF, ts)

    def disarm(self, flow_id: int) -> None:
        key = self._keys.pop(flow_id, None)
        if key is not None:
            self.responder.disarm(key)

    def disarm_all(self) -> None:
        for fid in list(self._keys):
            self.disarm(fid)

    @staticmethod
    def fields(peeked: Peeked) -> AckFields:
        """The ACK C sent, as ``seed.first_ack`` gives its fields."""
        return peeked[2], peeked[3], peeked[4], peeked[5], peeked[6]

    def origin(self, peeked: Peeked) -> Any:
        """The hit that the pattern C matched stands for (the patterns may have changed since:
        then any pattern's)."""
        i = peeked[1]
        return self.origins[i] if i < len(self.origins) else "fastack pattern"
