"""The kernel driver: NFQUEUE in, raw socket out, the user-level endpoints in between.

``TakeoverQueue`` reads the takeover queues (``rules.queues()``: one per CPU, each read by a
thread pinned there): the packets of the ports that ``takeover`` filters watch and of flows
already taken over, in both directions. For each packet:

1. the engine is offered it first: a packet of a flow it owns is consumed (dropped in the kernel,
   handled by the endpoints);
2. otherwise the watch stack (``node.stack.Stack``) tracks it, keeps short tails of the bytes in
   flight each way (so a taken-over endpoint can resend what a peer lost), and checks each new
   in-order chunk of a client's stream against the filters. A match is the *trigger*: the engine
   takes the flow over with that very packet (which never reaches the server);
3. a client segment that arrives out of order is *held*: its verdict waits (the kernel keeps
   the packet) until the hole before it fills, and once the bytes up to its end are delivered
   and checked it is accepted, after the packet that filled the hole, in stream order. The
   server must never hold bytes the node has not released in order, or a takeover could not
   remove them. A flow taken over or blocked meanwhile has its held packets dropped (their bytes
   went to the engine with the trigger, or must not pass); past ``HOLD_PACKETS`` a flow,
   ``HOLD_TOTAL`` in all or ``HOLD_TIMEOUT`` seconds (or the stack's ``HOLD_BYTES``), the
   flow's hole is given up: its held segments are dropped and the stack forgets the bytes it
   held past the hole, so the client's resends are checked anew. Readers fanned out by CPU see
   a sender that moves between CPUs out of order (each queue's reader races the others):
   dropping those cost a benign 20 MB upload 609-2297 segments and half its throughput;
4. client bytes sent again over bytes the node passed and the server has not acknowledged
   (the c2s tail) must be the same bytes: TCP never sends others, and a server that lost or
   discarded the first copy would take them unchecked. Others are dropped;
5. everything else is accepted at once.

A trigger that cannot be taken over (the engine failed; a flow picked up at the trigger with
nothing seen of the server; IPv6, which the engines do not speak) is dropped and its flow
*blocked*: its later client data is dropped too, since the stack counted the message as
delivered and would let a resend of it through unchecked.

``engine.TakeoverEngine`` is herdwall's takeover (``proxy.Proxy`` per flow, segments out through
a raw socket marked ``TAKEOVER_OWN``, timers on the loop); ``repair.RepairEngine`` and
``reset.ResetEngine`` are the baselines, driven by the same queue and trigger.

The daemon's own path (a flow flagged on the stack's queue by the detector): give the stack
queue an ``engine.TakeoverGate`` (``StackQueue(stack, gate=TakeoverGate(engine, stack, flag))``):
it takes the flow over with the packet that carried the flagged message (which the queue then
drops) and consumes the flow's packets that still come that way; the engine adds the flow to
``takeover_flows``, so its later packets reach a ``TakeoverQueue`` on the same engine.
``engine.TakeoverEngine.take_over`` is the call underneath, for any other trigger.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from node.kernel.nfqueue import Handle, QueueAdapter, Scheduler, ThreadClock
from node.kernel.sockets import mark_socket
from node.stack.conntrack import Flow, flow_key
from node.stack.events import Drop, FlowClosed, MessageIn
from node.stack.packet import (
    ACK,
    FIN,
    RST,
    SYN,
    URG,
    PacketError,
    clear_urgent,
    is_cut,
    parse_ipv6,
)
from node.stack.stack import Stack, StackConfig
from node.takeover import fastack, rules
from node.takeover.fastack import FastAck
from node.takeover.seed import StreamTail
from node.takeover.tcp import Segment, seq_add, seq_diff, seq_lt

log = logging.getLogger(__name__)

MAX_STREAM = 64 * 1024  # a filter's condition lies within an alert's 64 KiB
MAX_BLOCKED = 4096
# The takeover queue's reader thread runs SCHED_FIFO at this priority (below the kernel's own
# real-time threads at 50 and 99): every packet of a watched port waits in the kernel for its
# verdict, so the reader is on the forwarding path; a trigger on a busy node no longer waits
# for another task's time slice (bench_takeover, loaded node: 168-286 -> 80-100 µs).
READER_PRIORITY = 10
# Out-of-order client segments held for their turn (point 3 above). Held packets count against
# the kernel queue's length (``max_len``, 4096), so both bounds stay under it; a hole the client
# has to fill by a resend lasts its RTO (200 ms at least), so a held packet waits a second
# before it is given up (the client resends it too). A 20 MB upload whose sender hops CPUs,
# read by per-CPU readers, had up to 239-313 segments (~450 KB) of a flow out of order at once:
# HOLD_PACKETS is the stack's own bound on held segments, and HOLD_BYTES (its held bytes, 256
# KiB by default, which refused 155 segments of such an upload) is raised to match.
HOLD_PACKETS = 512
HOLD_BYTES = 1 << 20
HOLD_TOTAL = 2048
HOLD_TIMEOUT = 1.0
T = TypeVar("T")


@dataclass(slots=True)
class Trigger:
    """A flow to take over, at the message that made it match."""

    flow: Flow
    seq: int  # sequence number of the message's first byte
    data: bytes  # the message (the bytes the trigger packet made deliverable)
    seg: Segment  # the trigger packet's segment (its ACK, window, timestamps)
    packet: bytes  # the trigger packet as queued
    client: tuple[str, int]
    server: tuple[str, int]
    c2s: StreamTail | None = None
    s2c: StreamTail | None = None
    hit: Any = None  # what matched (a filters.condition.Filter, or the detector's verdict)


@dataclass(slots=True)
class Held:
    """An out-of-order client segment waiting for its verdict."""

    seq: int
    end: int  # the sequence number after its last byte
    handle: Handle
    since: float
    data: bytes  # its payload, compared at release with the bytes the node checked there


@dataclass(slots=True)
class Hold:
    """A flow's held segments, in arrival order; ``armed``: its expiry timer is set."""

    flow: Flow
    packets: list[Held]
    armed: bool = False


class Engine(Protocol):
    # ``loop``: the queue's scheduler (its reader thread's clock with ``thread=True``).
    def start(self, loop: Scheduler) -> None: ...
    def close(self) -> None: ...
    def offer(self, payload: bytes, handle: Handle, now: float) -> bool: ...
    def trigger(self, t: Trigger, handle: Handle, now: float) -> None: ...
    # Told of a trigger before the stack takes its packet (``trigger`` follows right after):
    # an engine that can answer the client from the tracked state alone does so here.
    def answer(self, flow: Flow, seq: int, n: int, ack: int, tsval: int | None,
               link: Link | None, now: float) -> None: ...


Detect = Callable[[Flow, bytes, bytes], Any]  # (flow, new chunk, stream so far) -> hit or None


def addr_text(a: bytes, port: int) -> tuple[str, int]:
    return socket.inet_ntoa(a), port


_TCP_HDR = struct.Struct("!HHIIBB")
_TCP_TS = struct.Struct("!HHIIBBHHHBBBBI")  # ... then Linux's options: NOP NOP TS 10 TSval


def tcp_header(p: bytes) -> tuple[bytes, int, int, int, int, int, int | None] | None:
    """(flow key, IP header length, seq, ack, flags, payload length, TSval) of an IPv4 TCP
    packet, or None: one ``struct`` read instead of a full parse (the stack parses it anyway).
    The TSval is read in the same call when the options start the way Linux sends them, else
    it is None (``tcp_tsval`` reads any layout)."""
    n = len(p)
    if n < 40 or p[0] >> 4 != 4 or p[9] != 6:
        return None
    ihl = (p[0] & 15) * 4
    total = (p[2] << 8) | p[3]
    if ihl < 20 or n < ihl + 20 or total > n:
        return None
    if n >= ihl + 32:
        _sp, _dp, seq, ack, off, flags, _w, _s, _u, nop, nop2, kind, size, tsval = \
            _TCP_TS.unpack_from(p, ihl)
        if off < 0x80 or nop != 1 or nop2 != 1 or kind != 8 or size != 10:
            tsval = None
    else:
        _sp, _dp, seq, ack, off, flags = _TCP_HDR.unpack_from(p, ihl)
        tsval = None
    plen = total - ihl - (off >> 4) * 4
    if plen < 0:
        return None
    return p[12:20] + p[ihl:ihl + 4], ihl, seq, ack, flags, plen, tsval


def tcp_tsval(p: bytes, ihl: int) -> int | None:
    """The TSval of a TCP packet's timestamp option, or None (``tcp_header`` checked the
    fixed header; the options may still be cut short)."""
    end = min(ihl + (p[ihl + 12] >> 4) * 4, len(p))
    i = ihl + 20
    if end - i >= 12 and p[i] == 1 and p[i + 1] == 1 and p[i + 2] == 8:  # Linux's NOP NOP TS
        return int.from_bytes(p[i + 4:i + 8], "big")
    while i + 1 < end:
        kind = p[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        size = p[i + 1]
        if size < 2:
            break
        if kind == 8 and size == 10 and i + 10 <= end:
            return int.from_bytes(p[i + 2:i + 6], "big")
        i += size
    return None


class TakeoverQueue:
    def __init__(self, engine: Engine, *, detect: Detect | None = None,
                 filters: Any = None, ports: set[int] | None = None,
                 queue_num: int = rules.Q_TAKEOVER, netns: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, fail_open: bool = True,
                 max_len: int = 4096, tail_limit: int = HOLD_BYTES,
                 on_trigger: Callable[[Trigger], None] | None = None,
                 thread: bool = False, priority: int | None = READER_PRIORITY,
                 readers: int | None = None, fast: bool = True) -> None:
        """``filters``: a ``filters.userspace.UserspaceFilters`` (its TCP filters trigger; a
        filter added later is watched from its port's next packet on, a connection already open
        picked up mid-stream); ``detect``: any other trigger;
        ``ports``: the TCP ports watched (the filters' too); ``on_trigger``: told of each flow
        taken over, after the engine has its first segments out.

        ``thread``: the queue is read by a thread of its own (``QueueAdapter(thread=True)``),
        which runs everything here and the engine's timers: a trigger reaches the engine
        60-70 µs sooner on an idle node. ``on_trigger``, ``detect`` and the engine's callbacks
        then run on that thread (post to a loop with ``call_soon_threadsafe``), and the engine
        must not be driven from elsewhere too (a ``TakeoverGate`` on the loop's stack queue
        needs ``thread=False``). ``priority``: that thread's ``SCHED_FIFO`` priority (None: the
        normal policy; see ``READER_PRIORITY``).

        ``readers`` (with ``thread``; default ``rules.TAKEOVER_READERS``, one per CPU): queues
        ``queue_num`` on, one reader thread each, pinned to the CPUs whose packets the queue
        rules (``rules.queues(readers)``, which must agree) send it: a watched flow's packet goes
        to the queue of the CPU that handled it (``--queue-cpu-fanout``), so its reader wakes
        there and not by an interrupt to another CPU, which cost an idle node's trigger ~100 µs
        (bench_takeover, client and reader on one CPU or on two: p50 160-182 against 250-373
        µs); a taken-over flow's packets all go to the first queue, in order. The readers take
        turns under one lock; the engine's timers run on the reader that set them.

        ``fast`` (with ``thread``, an engine with ``fast_links`` and the extension built): the
        readers wait in C, which sends a trigger's first ACK before any Python runs
        (``fastack``; the detector's ``chunk_prefix`` and the specific filters)."""
        self.engine = engine
        self.on_trigger = on_trigger
        self.filters = filters
        self.detect = detect
        ports = set(ports or ())
        if filters is not None:
            ports |= {p for proto, p in filters.ports() if proto == "tcp"}
        self.stack = Stack(StackConfig(protected_tcp=ports, verify_checksums=False,
                                       max_held_bytes=HOLD_BYTES))
        self.tail_limit = tail_limit
        self.streams: dict[int, bytes] = {}
        self.scans: dict[int, dict[str, int]] = {}  # per flow: where each filter's scan resumes
        self.blocked: dict[int, None] = {}  # flows whose trigger was dropped, not taken over
        self.holds: dict[int, Hold] = {}  # flow id -> its out-of-order client segments
        self._held = 0  # packets in self.holds
        self._closing = False
        self._next_expiry = 0.0
        self.stats: Counter[str] = Counter()
        self.triggers: list[Trigger] = []
        self.netns = netns
        self._loop: Scheduler | None = loop
        self._time: Callable[[], float] = time.monotonic  # the scheduler's, at start
        self._owned: Mapping[bytes, Any] | None = getattr(engine, "proxies", None)
        n = max(1, rules.TAKEOVER_READERS if readers is None else readers) if thread else 1
        cpus = range(os.cpu_count() or 1)
        self._lock = threading.Lock()
        self.queues = [QueueAdapter(queue_num + i, self._on_packet, netns=netns, loop=loop,
                                    fail_open=fail_open, max_len=max_len, thread=thread,
                                    drop_on_error=True,  # what it could not check must not pass
                                    priority=priority if thread else None,
                                    cpus={c for c in cpus if c % n == i} if n > 1 else None)
                       for i in range(n)]
        self.queue = self.queues[0]
        self._fast_wanted = fast and thread
        self.fast: FastAck | None = None

    def watch(self, port: int) -> None:
        self.stack.protected_tcp.add(port)

    def start(self) -> TakeoverQueue:
        # The engine starts before the first packet can reach it (on the reader thread).
        self._loop = self.queue.clock or self.queue._loop or asyncio.get_running_loop()
        if self.queue.clock is not None:  # reader threads: timers take the lock, as packets do
            clocks = ReaderClocks(self._lock, self.queue.clock)
            for q in self.queues:  # each reader names its clock first thing
                q.clock.call_soon(clocks.bind, q.clock)  # type: ignore[union-attr]
            self._loop = clocks
        self._time = self._loop.time
        self.engine.start(self._loop)
        links = getattr(self.engine, "fast_links", None)
        if self._fast_wanted and links is not None and not fastack.available():
            log.warning("node.takeover._fastack is not built (pip install -e .): a trigger's "
                        "first ACK waits for the Python path")
        elif self._fast_wanted and links is not None:
            self.fast = FastAck(links(), MAX_STREAM)
            self.fast.watch(self.detect, self.filters)
            for q in self.queues:
                q.peek = self.fast.wait
                q.on_packet = self._on_packet_fast
        for q in self.queues:
            q.start()
        return self

    def close(self) -> None:
        # Held segments are dropped, not given the queues' default verdict at their close
        # (fail-open would pass bytes the node has not checked in order); the client resends.
        with self._lock:
            self._closing = True
            for fid in list(self.holds):
                self._drop_held(fid)
        for q in self.queues:
            q.close()
        if self.fast is not None:
            try:
                self.fast.unwatch(self.filters)
            finally:
                self.fast.responder.close()  # its link sockets' copies (they hold the netns)
        self.engine.close()

    async def __aenter__(self) -> TakeoverQueue:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ per packet

    # Every call and attribute on the way to the engine's ``answer`` counts: a node woken from
    # sleep runs cold, ~10 µs a small function on the shared VM (bench_takeover's stages).
    def _on_packet(self, payload: bytes, handle: Handle) -> None:
        # One packet at a time, whichever CPU's reader has it (a lock nobody else holds costs
        # next to nothing; the engine's timers take it too).
        with self._lock:
            now = self._time()
            hdr = tcp_header(payload)
            owned = self._owned
            # An engine that files its flows by this key is offered only its own packets.
            if (owned is None or (hdr is not None and hdr[0] in owned)) and \
                    self.engine.offer(payload, handle, now):
                self.stats["owned"] += 1
                return
            if hdr is None:
                if payload[:1] and payload[0] >> 4 == 6:
                    self._ipv6(payload, handle, now)
                    return
                if is_cut(payload):
                    # Longer than the queue's copy range (nfqueue.COPY_RANGE: a jumbo segment,
                    # reassembled fragments): the bytes past it cannot be checked, so it must
                    # not pass (honest senders' segments fit: rules.MSS_CLAMP).
                    self.stats["truncated"] += 1
                    handle.drop()
                    return
                self.stats["not_tcp"] += 1
                handle.accept()
                return
            key, ihl, seq, ack, flags, plen, tsval = hdr
            if flags & URG:
                payload = handle.rewrite = clear_urgent(payload, ihl)
                flags &= ~URG
            if not plen and now >= self._next_expiry:  # never on a trigger's path
                self._expire_flows(now)
            if plen and flags & (SYN | ACK) == SYN:
                self._syn_data(handle)
                return
            if self.filters is not None:
                self._watch_new(key[8:10], key[10:12])
            fd = self.stack.tcp.table.get(key)
            if plen and fd is not None and fd.dir == 0:
                if fd.flow.id in self.blocked:
                    self.stats["blocked"] += 1  # its message was dropped: no more to the server
                    handle.drop()
                    return
                stream = fd.flow.stream
                if stream is not None and seq_lt(seq, stream.next_seq) and \
                        self._rewrites(fd.flow, seq, payload[len(payload) - plen:]):
                    handle.drop()
                    return
            # The next in-order chunk of a client's stream is checked before the stack takes the
            # packet: it is exactly what the stack would deliver, and on a match the engine can
            # answer the client from the tracked state at once (the stack's bookkeeping follows).
            early: Any = None
            checked = False
            if plen and fd is not None and fd.dir == 0 and not flags & (SYN | RST):
                stream = fd.flow.stream
                if stream is not None and not stream.held and stream.next_seq == seq:
                    checked = True
                    data = payload[len(payload) - plen:]
                    history = self.streams.get(fd.flow.id)
                    early = self._check_chunk(fd.flow, data)
                    peeked = handle.peeked  # its ACK is out already (fastack)
                    if peeked is not None and early is None:
                        # C's pattern is gone here (a filter removed meanwhile): its client was
                        # answered, so the flow is taken over all the same.
                        self.stats["fast_unconfirmed"] += 1
                        early = self.fast.origin(peeked)  # type: ignore[union-attr]
                    if early is not None and fd.flow.halves[1].next_seq is not None:
                        if peeked is not None:
                            handle.peeked = None  # taken: see _on_packet_fast
                            self.engine.answered(  # type: ignore[attr-defined]
                                fd.flow, FastAck.fields(peeked))
                        else:
                            mac = handle.source_mac  # the way back: where the trigger came from
                            self.engine.answer(
                                fd.flow, seq, plen, ack,
                                tcp_tsval(payload, ihl) if tsval is None else tsval,
                                (handle.indev, mac) if mac else None, now)
            events = self.stack.handle(payload, now)
            if fd is None:
                fd = self.stack.tcp.table.get(key)
            elif early is not None:
                self._take(fd.flow, seq, data, early, payload, handle, now)
                return
            drop = False
            for e in events:
                if type(e) is MessageIn and fd is not None:
                    if self._message(e, fd.flow, payload, handle, now, checked):
                        return  # taken over: the engine gave the verdict
                elif type(e) is Drop:
                    drop = True
                elif type(e) is FlowClosed:
                    self._closed(e.flow_id)
            ahead = fd is not None and self._track(fd.dir, fd.flow, payload, ihl, seq, ack,
                                                   flags, plen, events)
            if drop:
                self.stats["dropped"] += 1
                handle.drop()
                if checked:  # not delivered after all (PAWS, window): not in the stream either
                    self.scans.pop(fd.flow.id, None)  # type: ignore[union-attr]  # from 0 again
                    if history is None:
                        self.streams.pop(fd.flow.id, None)  # type: ignore[union-attr]
                    else:
                        self.streams[fd.flow.id] = history  # type: ignore[union-attr]
            elif ahead:
                self._hold(fd.flow, seq, payload[len(payload) - plen:], handle,  # type: ignore[union-attr]
                           now)
            else:
                handle.accept()
                if self.holds and fd is not None and fd.flow.id in self.holds:
                    self._release(fd.flow)  # after this packet: it may have filled the hole

    def _on_packet_fast(self, payload: bytes, handle: Handle) -> None:
        """``_on_packet``, then C's copy of the packet's flow (``fastack``)."""
        self._on_packet(payload, handle)
        with self._lock:
            if handle.peeked is not None:
                # C answered it, the Python path did not take it (see fastack: two readers
                # raced with other bytes at one sequence number, only a client's own doing).
                self.stats["fast_ignored"] += 1
            if len(payload) < 40 or payload[0] >> 4 != 4:
                return
            ihl = (payload[0] & 15) * 4
            key = payload[12:20] + payload[ihl:ihl + 4]
            owned = self._owned
            if owned is not None and key in owned:  # taken over: disarmed when it was taken
                return
            fd = self.stack.tcp.table.get(key)
            if fd is None:
                return
            flow = fd.flow
            try:
                self.fast.arm(flow, None if flow.id in self.blocked else  # type: ignore[union-attr]
                              len(self.streams.get(flow.id, b"")), owned)
            except Exception:  # the packet has its verdict: nothing here may take it back
                self.stats["fast_errors"] += 1
                log.exception("fastack: arming a flow")

    def _syn_data(self, handle: Handle) -> None:
        """A client's SYN that carries data (TCP Fast Open): the stack checks a stream from
        the handshake on, so these bytes would reach the server unchecked. Dropped: the
        client's kernel sends the SYN again without them and the data after the handshake."""
        self.stats["syn_data_dropped"] += 1
        handle.drop()

    def _expire_flows(self, now: float) -> None:
        """Once a second, on a packet without data: flows idle past their timeout and closed
        ones past their grace are forgotten, with what they keep (``Flow.ext``)."""
        self._next_expiry = now + 1.0
        for e in self.stack.expire(now):
            self._closed(e.flow_id)  # type: ignore[attr-defined]
        if self.fast is not None:
            self.fast.sweep(self.stack.tcp.table)

    def _closed(self, flow_id: int) -> None:
        if self.fast is not None:
            self.fast.disarm(flow_id)
        self.streams.pop(flow_id, None)
        self.scans.pop(flow_id, None)
        self.blocked.pop(flow_id, None)
        if flow_id in self.holds:
            self._drop_held(flow_id)

    def _watch_new(self, *ports: bytes) -> None:
        """A filter installed since the queue started: its port's flows are tracked from now on
        (from the handshake, or picked up mid-stream by the stack)."""
        protected = self.stack.protected_tcp
        for raw in ports:
            port = int.from_bytes(raw, "big")
            if port not in protected and (6, port) in self.filters:
                protected.add(port)

    def _ipv6(self, payload: bytes, handle: Handle, now: float) -> None:
        """The engines speak IPv4 only: an IPv6 flow is tracked and checked like any other,
        but a match is dropped and the flow blocked instead of taken over (the message never
        reaches the server; the connection stalls)."""
        try:
            ip = parse_ipv6(payload)
        except PacketError:
            # Queued because the kernel found TCP to a watched port in it: what our parser
            # refuses (a hostile chain of extension headers) must not pass unchecked.
            self.stats["malformed"] += 1
            handle.drop()
            return
        if ip.proto != 6 or len(ip.payload) < 20:
            self.stats["not_tcp"] += 1
            handle.accept()
            return
        tcp = ip.payload
        if tcp[13] & URG:
            payload = handle.rewrite = clear_urgent(payload, len(payload) - len(tcp))
            tcp = memoryview(payload)[len(payload) - len(tcp):]
        if tcp[13] & (SYN | ACK) == SYN and len(tcp) > (tcp[12] >> 4) * 4:
            self._syn_data(handle)
            return
        if self.filters is not None:
            self._watch_new(tcp[0:2], tcp[2:4])
        key = flow_key(ip.src, ip.dst, (tcp[0] << 8) | tcp[1], (tcp[2] << 8) | tcp[3])
        data_len = len(tcp) - (tcp[12] >> 4) * 4
        data = tcp[len(tcp) - data_len:] if data_len > 0 else b""
        seq = int.from_bytes(tcp[4:8], "big")
        if not data_len and now >= self._next_expiry:
            self._expire_flows(now)
        fd = self.stack.tcp.table.get(key)
        if data_len > 0 and fd is not None and fd.dir == 0:
            if fd.flow.id in self.blocked:
                self.stats["blocked"] += 1
                handle.drop()
                return
            stream = fd.flow.stream
            if stream is not None and seq_lt(seq, stream.next_seq) and \
                    self._rewrites(fd.flow, seq, data):
                handle.drop()
                return
        events = self.stack.handle(payload, now)
        if fd is None:
            fd = self.stack.tcp.table.get(key)
        if fd is not None and fd.dir == 1 and tcp[13] & ACK:
            self._tails(fd.flow)[0].trim(int.from_bytes(tcp[8:12], "big"))
        drop = False
        for e in events:
            if type(e) is MessageIn and fd is not None and fd.dir == 0:
                if self._check_chunk(fd.flow, e.message.data) is not None:
                    self.stats["ipv6_blocked"] += 1
                    self._block(fd.flow, handle, e.seq)
                    return
                self._tails(fd.flow)[0].add(e.seq, e.message.data)
            elif type(e) is Drop:
                drop = True
            elif type(e) is FlowClosed:
                self._closed(e.flow_id)
        stream = fd.flow.stream if fd is not None and fd.dir == 0 and data_len > 0 else None
        if drop:
            handle.drop()
        elif stream is not None and not any(type(e) is MessageIn for e in events) and \
                seq_lt(stream.next_seq, seq):  # out of order: held, as on IPv4
            self._hold(fd.flow, seq, data, handle, now)  # type: ignore[union-attr]
        else:
            handle.accept()
            if self.holds and fd is not None and fd.flow.id in self.holds:
                self._release(fd.flow)

    def _tails(self, flow: Flow) -> tuple[StreamTail, StreamTail]:
        """The flow's c2s and s2c tails, kept on the flow (``Flow.ext``): they last while the
        stack tracks it, through a close the server may not have taken (a client RST past
        bytes it lost), and go with it."""
        tails = flow.ext
        if tails is None:
            tails = flow.ext = (StreamTail(self.tail_limit), StreamTail(self.tail_limit))
        return tails

    def _track(self, direction: int, flow: Flow, payload: bytes, ihl: int, seq: int, ack: int,
               flags: int, plen: int, events: list[Any]) -> bool:
        """Tails of both directions; True for an out-of-order client segment (to hold)."""
        c2s, s2c = self._tails(flow)
        if flags & ACK:
            (s2c if direction == 0 else c2s).trim(ack)
        if not plen:
            return False
        if direction == 1:
            s2c.add(seq, memoryview(payload)[len(payload) - plen:])
            return False
        stream = flow.stream
        if stream is None or any(type(e) is MessageIn for e in events):
            return False
        # Held by the stack (or a resend of held bytes): not for the server yet.
        return seq_lt(stream.next_seq, seq)

    def _hold(self, flow: Flow, seq: int, data: bytes, handle: Handle, now: float) -> None:
        """Keep an out-of-order client segment's verdict until its turn (point 3 of the
        module docstring); past the bounds, give up the flow's hole."""
        hold = self.holds.get(flow.id)
        if hold is None:
            hold = self.holds[flow.id] = Hold(flow, [])
        hold.packets.append(Held(seq, seq_add(seq, len(data)), handle, now, data))
        self._held += 1
        if self._held > HOLD_TOTAL:
            # The flow that holds the most gives way (not whoever comes next: one client's
            # flows filling the total must not cost everyone else their reordered segments).
            most = max(self.holds.values(), key=lambda h: len(h.packets))
            self.stats["ooo_dropped"] += len(most.packets)
            self._give_up(most)
            if most is hold:
                return
        if len(hold.packets) > HOLD_PACKETS or self._closing:
            self.stats["ooo_dropped"] += len(hold.packets)
            self._give_up(hold)
            return
        self.stats["ooo_held"] += 1
        if len(hold.packets) > self.stats["held_max"]:  # the deepest a flow's hold has been
            self.stats["held_max"] = len(hold.packets)
        if not hold.armed and self._loop is not None:
            hold.armed = True
            self._loop.call_later(HOLD_TIMEOUT, self._expire, flow.id, hold)

    def _release(self, flow: Flow) -> None:
        """Accept the held segments whose bytes have all been delivered (checked), after the
        packet that filled the hole, in the order that makes the server's kernel keep the same
        bytes as the stack did (Linux's rule, ``node.stack.reassembly``): by start, the longer
        first, else as they came. In stream order, the server acknowledges them as they come;
        held ones first would each draw a duplicate ACK, and the client's fast retransmits
        (bench_takeover's watched upload: 694 retransmissions, a third of its throughput).
        A held segment whose bytes differ from those the stack kept there is dropped. The
        server may still discard some (its PAWS check, when the filler was a resend with a
        newer timestamp): their resends are compared with the bytes checked (``_rewrites``)."""
        hold = self.holds[flow.id]
        stream = flow.stream
        if stream is None:
            return
        nxt = stream.next_seq
        due = [h for h in hold.packets if not seq_lt(nxt, h.end)]
        if not due:
            return
        hold.packets = [h for h in hold.packets if seq_lt(nxt, h.end)]
        self._held -= len(due)
        if not hold.packets and not hold.armed:
            del self.holds[flow.id]
        due.sort(key=lambda h: (stream.offset(h.seq), -stream.offset(h.end)))
        for h in due:
            if self._rewrites(flow, h.seq, h.data):
                h.handle.drop()
            else:
                h.handle.accept()
                self.stats["ooo_released"] += 1

    def _rewrites(self, flow: Flow, seq: int, data: bytes) -> bool:
        """Whether client bytes at ``seq`` differ from those the node checked and passed there
        (which the server has not acknowledged yet: the tail keeps them). TCP never sends
        other bytes for a sequence number again, so this is evasion: a server that lost or
        discarded the first copy would otherwise get the second unchecked, as a resend of
        bytes already delivered. Dropped (counted ``rewrites_dropped``)."""
        tails = flow.ext
        start = tails[0].start if tails is not None else None
        if start is None:
            return False
        tail = tails[0].data  # type: ignore[index]
        lo = seq_diff(seq, start)  # where ``data`` starts in the tail
        a, b = max(lo, 0), min(lo + len(data), len(tail))
        if a < b and tail[a:b] != data[a - lo:b - lo]:
            self.stats["rewrites_dropped"] += 1
            return True
        acked = flow.halves[1].ack
        if lo < 0 and acked is not None and seq_lt(acked, start) and \
                seq_lt(acked, seq_add(seq, len(data))) and \
                self._check_chunk(flow, data, alone=True) is not None:
            # Bytes the server has not acknowledged but the tail no longer holds (more than
            # its limit in flight): they cannot be compared, so they are checked on their own.
            self.stats["rewrites_dropped"] += 1
            return True
        return False

    def _give_up(self, hold: Hold) -> None:
        """Drop a flow's held segments and make the stack forget the bytes it holds ahead of
        the hole, so the client's resends are checked anew; else a resend with other bytes
        would pass as a duplicate of bytes the server never got."""
        self._drop_held(hold.flow.id)
        self.stack.forget_held(hold.flow)

    def _drop_held(self, flow_id: int) -> None:
        """Drop a flow's held segments (taken over, blocked, closed, given up)."""
        hold = self.holds.pop(flow_id, None)
        if hold is None:
            return
        for h in hold.packets:
            h.handle.drop()
        self._held -= len(hold.packets)
        self.stats["held_dropped"] += len(hold.packets)

    def _expire(self, flow_id: int, hold: Hold) -> None:
        """The hold timer (on the queue's scheduler, which serialises it with the packets):
        a hole still open ``HOLD_TIMEOUT`` after a segment was held is given up (the client
        resends)."""
        if self.holds.get(flow_id) is not hold:
            return  # dropped meanwhile (a later hold of the flow has a timer of its own)
        if hold.packets and self._time() - hold.packets[0].since >= HOLD_TIMEOUT:
            self.stats["ooo_expired"] += len(hold.packets)
            self._give_up(hold)
        elif hold.packets and self._loop is not None:
            self._loop.call_at(hold.packets[0].since + HOLD_TIMEOUT, self._expire, flow_id,
                               hold)
        else:
            del self.holds[flow_id]

    def _message(self, e: MessageIn, flow: Flow, payload: bytes, handle: Handle,
                 now: float, checked: bool) -> bool:
        """A chunk the stack delivered; ``checked``: the early check passed it already."""
        data = e.message.data
        hit = None if checked else self._check_chunk(flow, data)
        if hit is None:
            self._tails(flow)[0].add(e.seq, data)
            return False
        self._take(flow, e.seq, data, hit, payload, handle, now)
        return True

    def _check_chunk(self, flow: Flow, data: bytes, alone: bool = False) -> Any:
        """The check of a client's new chunk: of its stream from the connection's start (64 KiB
        at most, as ``node.filtering`` keeps it; each filter's scan resumes where it stopped),
        and of bytes past that bound on their own against the filters that may hold anywhere.
        ``alone``: of these bytes only (their place unknown), the stream left as it is. One
        call on the trigger's path (a call more cost an idle node's takeover ~10-15 µs)."""
        if alone:
            stream, past = data, True
        else:
            stream = self.streams.get(flow.id, b"")
            past = len(stream) + len(data) > MAX_STREAM
            if len(stream) < MAX_STREAM:
                stream = (stream + data)[:MAX_STREAM]
                self.streams[flow.id] = stream
        if self.detect is not None:
            hit = self.detect(flow, data, stream)
            if hit is not None:
                return hit
        filters = self.filters
        if filters is None:
            return None
        port = flow.resp[1]
        scans = None if alone else self.scans.setdefault(flow.id, {})
        try:
            hit = None if alone else filters.check("tcp", port, stream, scans)
            return hit or (filters.check("tcp", port, data, anywhere=True) if past else None)
        except RuntimeError:  # changed by the loop meanwhile (on a reader thread)
            hit = None if alone else check_filters(filters, port, stream, scans)
            return hit or (check_filters(filters, port, data, anywhere=True) if past else None)

    def _take(self, flow: Flow, seq: int, data: bytes, hit: Any, payload: bytes,
              handle: Handle, now: float) -> None:
        """The trigger: the stack has taken its packet, so the client half's fields are its."""
        self.stats["triggers"] += 1
        if flow.halves[1].next_seq is None:
            # Picked up at the trigger itself (a filter installed mid-connection, the server
            # silent since): nothing seen of the server to speak for it with. The message is
            # dropped all the same and the flow blocked.
            self.stats["unseeded_drops"] += 1
            self._block(flow, handle, seq)
            return
        if flow.id in self.holds:  # their bytes are the trigger's: the engine has them now
            self._drop_held(flow.id)
        tails = self._tails(flow)
        c = flow.halves[0]
        fin = FIN if c.fin_seq is not None and c.fin_seq == seq_add(seq, len(data)) else 0
        seg = Segment(seq, c.ack or 0, ACK | fin, c.window, data, c.ts_val, c.ts_ecr)
        t = Trigger(flow, seq, data, seg, payload, addr_text(*flow.orig), addr_text(*flow.resp),
                    tails[0], tails[1], hit)
        self.triggers.append(t)
        del self.triggers[:-64]
        self.streams.pop(flow.id, None)
        try:
            self.engine.trigger(t, handle, now)
        except Exception:
            # The message is known bad: whatever failed, it must not reach the server (the
            # queue's fail-open default would forward it).
            self.stats["trigger_errors"] += 1
            log.exception("takeover of flow %d failed", flow.id)
            self._block(flow, handle, seq)
            return
        self.scans.pop(flow.id, None)  # after the trigger's first segment is out
        if self.fast is not None:  # the engine's now (its packets skip the arming)
            self.fast.disarm(flow.id)
        if self.on_trigger is not None:
            self.on_trigger(t)

    def _block(self, flow: Flow, handle: Handle, seq: int) -> None:
        """Drop the trigger and every later client segment with data: the stack has counted
        the message as delivered, so the client's resend of it would pass unchecked. The
        connection stalls (the server never acknowledges it) instead of carrying it."""
        handle.drop()
        self.streams.pop(flow.id, None)
        self.scans.pop(flow.id, None)
        if flow.id in self.holds:
            self._drop_held(flow.id)
        # Its bytes count as never delivered: should the flow's block be forgotten (a close,
        # the bound below), a resend is checked again, not passed as a duplicate.
        self.stack.rewind(flow, seq)
        self.blocked[flow.id] = None
        if len(self.blocked) > MAX_BLOCKED:  # flows that vanished without a close event
            self.blocked.pop(next(iter(self.blocked)))


class ReaderClocks:
    """The engine's scheduler when reader threads run the queue: a callback goes on the
    clock of the reader that schedules it (that reader wakes for it) and runs under the
    queue's lock, as packets do. Scheduled from another thread, it goes on the first's."""

    time = staticmethod(time.monotonic)

    def __init__(self, lock: threading.Lock, first: ThreadClock) -> None:
        self._lock = lock
        self._first = first
        self._by_thread: dict[int, ThreadClock] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The asyncio loop the queues were started from, for work that belongs there."""
        return self._first.loop

    def bind(self, clock: ThreadClock) -> None:
        """Run by each reader on its own thread."""
        self._by_thread[threading.get_ident()] = clock

    def _clock(self) -> ThreadClock:
        return self._by_thread.get(threading.get_ident(), self._first)

    def _locked(self, callback: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            callback(*args)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Any:
        return self._clock().call_soon(self._locked, callback, *args)

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Any:
        return self._clock().call_at(when, self._locked, callback, *args)

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Any:
        return self.call_at(time.monotonic() + delay, callback, *args)


def check_filters(filters: Any, port: int, data: bytes, resume: dict[str, int] | None = None,
                  *, anywhere: bool = False) -> Any:
    """``filters.check("tcp", port, data, ...)`` from a queue's reader thread while the loop
    may change the filters: a dict resized during the check raises, and the check runs again
    (a packet must not pass unchecked on the queue's fail-open default; a scan's state only
    ever moves past what is decided, so a retry may start from it)."""
    for _ in range(3):
        try:
            return filters.check("tcp", port, data, resume, anywhere=anywhere)
        except RuntimeError:
            continue
    return filters.check("tcp", port, data, resume, anywhere=anywhere)


def _in_netns(netns: str | None, make: Callable[[], T]) -> T:
    if netns is None:
        return make()
    from node.testbed.netns import Namespace

    with Namespace.attach(netns).enter():
        return make()


def open_raw_socket(netns: str | None) -> socket.socket:
    """An IPv4 raw socket (``IPPROTO_RAW``: we write the IP header) marked ``TAKEOVER_OWN``,
    non-blocking, opened in ``netns``."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        mark_socket(s, rules.TAKEOVER_OWN)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setblocking(False)
        return s

    return _in_netns(netns, make)


SIOCGIFNAME = 0x8910
SIOCGIFHWADDR = 0x8927
ARPHRD_ETHER = 1
ETH_P_IP = 0x0800

Link = tuple[int, bytes]  # (interface index, next hop's MAC address)


class LinkSocket:
    """``AF_PACKET`` sockets in ``netns``: an IPv4 packet straight onto an interface, to a MAC
    address, past the node's routing and netfilter hooks (which would only pass it: the node's
    own segments are untracked and never queued). The first segment of a takeover goes back the
    way the trigger came, to the hop it came from. Each Ethernet interface there at the start
    gets a raw socket bound to it, with our MAC in a ready link header (one ``send``); another
    goes through a datagram socket that names it (the kernel resolves the name and builds the
    header on every send). Send-only sockets (protocol 0 receives nothing)."""

    def __init__(self, netns: str | None) -> None:
        def make() -> tuple[socket.socket, dict[int, tuple[socket.socket, bytes]]]:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            s.setblocking(False)
            bound: dict[int, tuple[socket.socket, bytes]] = {}
            for ifindex, name in socket.if_nameindex():
                hw = fcntl.ioctl(s.fileno(), SIOCGIFHWADDR,
                                 struct.pack("16s", name.encode()).ljust(40, b"\0"))
                if struct.unpack_from("=H", hw, 16)[0] != ARPHRD_ETHER:  # sa_family
                    continue
                b = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                b.setblocking(False)
                b.bind((name, 0))
                bound[ifindex] = (b, bytes(hw[18:24]) + ETH_P_IP.to_bytes(2, "big"))
            return s, bound

        # ifindex -> (its raw socket, our MAC and the IPv4 type): ``send`` and the engine's
        # first segment (inline there)
        self.sock, self.bound = _in_netns(netns, make)
        self._names: dict[int, str] = {}

    def _name(self, ifindex: int) -> str:
        """The interface's name in the socket's namespace (``if_indextoname`` would ask the
        calling thread's)."""
        name = self._names.get(ifindex)
        if name is None:
            out = fcntl.ioctl(self.sock.fileno(), SIOCGIFNAME,
                              struct.pack("16si", b"", ifindex).ljust(40, b"\0"))
            name = self._names[ifindex] = out[:16].split(b"\0", 1)[0].decode()
        return name

    def send(self, packet: bytes, link: Link) -> None:
        """Raises OSError (the caller falls back to the raw socket)."""
        bound = self.bound.get(link[0])
        if bound is not None:
            bound[0].send(link[1] + bound[1] + packet)
        else:
            self.sock.sendto(packet, (self._name(link[0]), ETH_P_IP, 0, 0, link[1]))

    def close(self) -> None:
        self.sock.close()
        for b, _ in self.bound.values():
            b.close()
        self.bound.clear()
