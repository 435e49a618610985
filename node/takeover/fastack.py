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
of the ACK. Only an established connection that Python would answer early is armed (not
blocked, taken over, closing, holding bytes out of order, unseeded by the server, or IPv6); a
close disarms it, and a sweep once a second disarms what the stack forgot without an event.
Patterns are those that C decides exactly as Python does: a detector that declares
``chunk_prefix`` (``(prefix, verdict)``: it hits when a chunk starts with ``prefix``), and the TCP
specific filters (bytes at a stream offset) when they lie wholly in the chunk; they follow the
filters as these are added and removed (``UserspaceFilters.watchers``). General filters, a
specific filter split across segments, and every packet C leaves alone (SYN, RST, FIN, URG,
fragments, no link socket) go the Python way, which answers itself. C checks the patterns one
by one (about 18 µs a chunk with 10,000 of them, against 7 with one).

Python takes the flow over whenever C answered its packet at the place it expected: even if a
filter was removed between C's check and Python's (the client was answered). Two readers can
race where a client sends other bytes at one sequence number on two CPUs at once (TCP never
does); then C may have answered bytes that Python drops as a rewrite, which only confuses that
client's own connection (``fast_ignored`` counts it).

Without the extension (a tree not installed with ``pip install -e .``) ``available()`` is False
and the Python path answers every trigger.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from itertools import islice
from typing import Any

from filters.condition import Filter, Specific
from node.stack.conntrack import Flow, TcpState
from node.takeover.seed import AckFields

log = logging.getLogger(__name__)

try:
    from node.takeover import _fastack
except ImportError:  # not built: the Python path answers
    _fastack = None

NO_POS = 0xFFFFFFFF  # the chunk's stream position is past what the stream keeps
MAX_PATTERN = 0xFFFF  # the longest pattern C takes
SWEEP = 1024  # armed flows a sweep looks at (it runs under the queue's lock, once a second)
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
    ``AF_PACKET`` socket's descriptor bound to that interface, our MAC address there; C keeps
    a duplicate); ``max_stream``: how much of a stream the Python check keeps (a specific
    filter past it is not checked there either)."""

    def __init__(self, links: dict[int, tuple[int, bytes]], max_stream: int) -> None:
        if _fastack is None:
            raise RuntimeError("node.takeover._fastack is not built (pip install -e .)")
        self.responder = _fastack.Responder(max_stream)
        for ifindex, (fd, mac) in links.items():
            self.responder.add_link(ifindex, fd, mac)
        self.max_stream = max_stream
        self.origins: dict[int, Any] = {}  # pattern id -> the hit it stands for
        self._ids: dict[str, int] = {}  # filter id -> its pattern's id
        self._next_id = 0
        self._keys: dict[int, bytes] = {}  # flow id -> its armed key
        self._by_key: dict[bytes, int] = {}  # armed key -> its flow id
        self.wait = self.responder.wait  # the readers' peek (QueueAdapter.peek)

    def watch(self, detect: Any, filters: Any) -> None:
        """Patterns from a detector's ``chunk_prefix`` and from the TCP specific filters in
        ``filters`` (a ``UserspaceFilters`` or None), now and as they come and go."""
        prefix = getattr(detect, "chunk_prefix", None)
        if prefix is not None and not 0 < len(prefix[0]) <= MAX_PATTERN:
            log.warning("fastack: a detector's prefix of %d bytes is left to Python",
                        len(prefix[0]))
        elif prefix is not None:
            pid = self._new_id()
            self.origins[pid] = prefix[1]
            self.responder.add_prefix(pid, -1, prefix[0])
        if filters is not None:
            for f in filters:
                self.filter_changed(f, True)
            filters.watchers.append(self.filter_changed)

    def unwatch(self, filters: Any) -> None:
        if filters is not None and self.filter_changed in filters.watchers:
            filters.watchers.remove(self.filter_changed)

    def filter_changed(self, f: Filter, added: bool) -> None:
        """A filter added to or removed from the watched filters (on the thread that changed
        them): its pattern follows at once, so C never answers for a filter that is gone."""
        c = f.condition
        if f.proto != "tcp" or not isinstance(c, Specific) or \
                not 0 < len(c.value) <= MAX_PATTERN or c.offset + len(c.value) > self.max_stream:
            return  # not a pattern: the Python path checks it
        try:
            if added and f.filter_id not in self._ids:
                pid = self._ids[f.filter_id] = self._new_id()
                self.origins[pid] = f
                self.responder.add_bytes(pid, f.port, c.offset, c.value)
            elif not added and f.filter_id in self._ids:
                pid = self._ids.pop(f.filter_id)
                self.responder.remove_pattern(pid)
                del self.origins[pid]
                # Armed flows stay in C (with no pattern they answer nothing); the readers
                # disarm them at their next packet: only they touch the flow maps.
        except Exception:  # the filters' owner must not fail for this copy (MemoryError)
            log.exception("fastack: pattern of filter %s", f.filter_id)

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def arm(self, flow: Flow, pos: int | None, owned: Any = None) -> None:
        """After a packet of ``flow``: its next client chunk is checked in C at stream
        position ``pos`` (None: not at all; the flow is blocked), unless it is in ``owned``
        (the engine's flows, by key) or Python would not answer it early either. Only an open
        connection is armed: its close disarms it (``disarm``), and nothing that the stack
        forgets without telling stays armed."""
        stream = flow.stream
        c, s = flow.halves
        key = self._keys.get(flow.id) or client_key(flow)
        if key is None:
            return
        if pos is None or not self.origins or stream is None or stream.held or \
                s.next_seq is None or flow.state != TcpState.ESTABLISHED or flow.in_closing \
                or (owned is not None and key in owned):
            self.disarm(flow.id)
            return
        old = self._by_key.get(key)
        if old is not None and old != flow.id:  # a new connection on the same ports
            self._keys.pop(old, None)
        self._keys[flow.id] = key
        self._by_key[key] = flow.id
        nxt, fin = (s.fin_seq, True) if s.fin_seq is not None else (s.next_seq, False)
        ts = s.ts_val & 0xFFFFFFFF if c.ts_val is not None and s.ts_val is not None else -1
        self.responder.arm(key, stream.next_seq, pos if pos < self.max_stream else NO_POS,
                           nxt & 0xFFFFFFFF, fin, s.window & 0xFFFF, ts)

    def disarm(self, flow_id: int) -> None:
        key = self._keys.pop(flow_id, None)
        if key is not None and self._by_key.get(key) == flow_id:
            del self._by_key[key]
            self.responder.disarm(key)

    def sweep(self, table: Mapping[bytes, Any]) -> None:
        """Disarm the flows that ``table`` (the stack's, key -> ``FlowDir``) no longer has
        (forgotten without an event: evicted, or expired in a way that tells no one): the
        ``SWEEP`` longest-armed, each call, those still there going to the back."""
        for fid in list(islice(self._keys, SWEEP)):
            key = self._keys.pop(fid)
            fd = table.get(key)
            if fd is not None and fd.flow.id == fid:
                self._keys[fid] = key
            elif self._by_key.get(key) == fid:
                del self._by_key[key]
                self.responder.disarm(key)

    @staticmethod
    def fields(peeked: Peeked) -> AckFields:
        """The ACK C sent, as ``seed.first_ack`` gives its fields."""
        return peeked[2], peeked[3], peeked[4], peeked[5], peeked[6]

    def origin(self, peeked: Peeked) -> Any:
        """The hit that the pattern C matched stands for (a filter removed since: its name)."""
        return self.origins.get(peeked[1], "a removed fastack pattern")
