"""The kernel driver: NFQUEUE in, raw socket out, the user-level endpoints in between.

``TakeoverQueue`` reads the takeover queue (``rules.Q_TAKEOVER``): the packets of the ports that
``takeover`` filters watch and of flows already taken over, in both directions. For each packet:

1. the engine is offered it first: a packet of a flow it owns is consumed (dropped in the kernel,
   handled by the endpoints);
2. otherwise the watch stack (``node.stack.Stack``) tracks it, keeps short tails of the bytes in
   flight each way (so a taken-over endpoint can resend what a peer lost), and checks each new
   in-order chunk of a client's stream against the filters. A match is the *trigger*: the engine
   takes the flow over with that very packet (which never reaches the server);
3. a client segment that arrives out of order is dropped rather than forwarded: the server must
   never hold bytes the node has not released in order, or a takeover could not remove them
   (the client resends it; with SACK that costs one round trip);
4. everything else is accepted at once.

``TakeoverEngine`` is herdwall's takeover (``proxy.Proxy`` per flow, segments out through a raw
socket marked ``TAKEOVER_OWN``, timers on the loop); ``repair.RepairEngine`` and
``reset.ResetEngine`` are the baselines, driven by the same queue and trigger.

The daemon's own path (a flow flagged on the stack's queue by the detector): call
``TakeoverEngine.take_over(flow, seq, data, packet, handle)`` from the stack queue's gate with
the packet that carried the message (and return "drop"), and offer every later packet of the
stack queue to ``TakeoverEngine.offer`` first; the engine adds the flow to ``takeover_flows`` so
its packets come to the takeover queue from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from node.kernel.nfqueue import Handle, QueueAdapter
from node.kernel.sockets import mark_socket
from node.stack.conntrack import Flow
from node.stack.events import Drop, FlowClosed, MessageIn
from node.stack.packet import ACK, FIN, RST, SYN, PacketError
from node.stack.stack import Stack, StackConfig
from node.takeover import rules, wire
from node.takeover.policy import Policy, Scrub
from node.takeover.proxy import Proxy
from node.takeover.seed import StreamTail, first_ack, seeds
from node.takeover.tcp import Config, Segment, State, seq_add, seq_lt
from node.takeover.wire import ack_packet

log = logging.getLogger(__name__)

MAX_STREAM = 64 * 1024  # a filter's condition lies within an alert's 64 KiB


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


class Engine(Protocol):
    def start(self, loop: asyncio.AbstractEventLoop) -> None: ...
    def close(self) -> None: ...
    def offer(self, payload: bytes, handle: Handle, now: float) -> bool: ...
    def trigger(self, t: Trigger, handle: Handle, now: float) -> None: ...


Detect = Callable[[Flow, bytes, bytes], Any]  # (flow, new chunk, stream so far) -> hit or None


def _addr(a: bytes, port: int) -> tuple[str, int]:
    return socket.inet_ntoa(a), port


_TCP_HDR = struct.Struct("!HHIIBB")


def _header(p: bytes) -> tuple[bytes, int, int, int, int, int] | None:
    """(flow key, IP header length, seq, ack, flags, payload length) of an IPv4 TCP packet, or
    None: one ``struct`` read instead of a full parse (the stack parses it anyway)."""
    n = len(p)
    if n < 40 or p[0] >> 4 != 4 or p[9] != 6:
        return None
    ihl = (p[0] & 15) * 4
    total = (p[2] << 8) | p[3]
    if ihl < 20 or n < ihl + 20 or total > n:
        return None
    _sp, _dp, seq, ack, off, flags = _TCP_HDR.unpack_from(p, ihl)
    plen = total - ihl - (off >> 4) * 4
    if plen < 0:
        return None
    return bytes(p[12:20]) + bytes(p[ihl:ihl + 4]), ihl, seq, ack, flags, plen


class TakeoverQueue:
    def __init__(self, engine: Engine, *, detect: Detect | None = None,
                 filters: Any = None, ports: set[int] | None = None,
                 queue_num: int = rules.Q_TAKEOVER, netns: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, fail_open: bool = True,
                 max_len: int = 4096, tail_limit: int = 256 * 1024) -> None:
        """``filters``: a ``filters.userspace.UserspaceFilters`` (its TCP filters trigger);
        ``detect``: any other trigger; ``ports``: the TCP ports watched (the filters' too)."""
        self.engine = engine
        self.filters = filters
        self.detect = detect
        ports = set(ports or ())
        if filters is not None:
            ports |= {p for proto, p in filters.ports() if proto == "tcp"}
        self.stack = Stack(StackConfig(protected_tcp=ports, verify_checksums=False))
        self.tail_limit = tail_limit
        self.tails: dict[int, tuple[StreamTail, StreamTail]] = {}
        self.streams: dict[int, bytes] = {}
        self.stats: Counter[str] = Counter()
        self.triggers: list[Trigger] = []
        self.netns = netns
        self._loop = loop
        self.queue = QueueAdapter(queue_num, self._on_packet, netns=netns, loop=loop,
                                  fail_open=fail_open, max_len=max_len)

    def watch(self, port: int) -> None:
        self.stack.protected_tcp.add(port)

    def start(self) -> TakeoverQueue:
        self.queue.start()
        self._loop = self.queue._loop
        assert self._loop is not None
        self.engine.start(self._loop)
        return self

    def close(self) -> None:
        self.queue.close()
        self.engine.close()

    async def __aenter__(self) -> TakeoverQueue:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ per packet

    def _on_packet(self, payload: bytes, handle: Handle) -> None:
        now = self._loop.time()  # type: ignore[union-attr]
        if self.engine.offer(payload, handle, now):
            self.stats["owned"] += 1
            return
        hdr = _header(payload)
        if hdr is None:
            self.stats["not_tcp"] += 1
            handle.accept()
            return
        key, ihl, seq, ack, flags, plen = hdr
        events = self.stack.handle(payload, now)
        fd = self.stack.tcp.table.get(key)
        drop = False
        for e in events:
            if type(e) is MessageIn and fd is not None:
                if self._message(e, fd.flow, payload, handle, now):
                    return  # taken over: the engine gave the verdict
            elif type(e) is Drop:
                drop = True
            elif type(e) is FlowClosed:
                self.tails.pop(e.flow_id, None)
                self.streams.pop(e.flow_id, None)
        if fd is not None:
            drop |= self._track(fd.dir, fd.flow, payload, ihl, seq, ack, flags, plen, events)
        if drop:
            self.stats["dropped"] += 1
            handle.drop()
        else:
            handle.accept()

    def _tails(self, flow: Flow) -> tuple[StreamTail, StreamTail]:
        tails = self.tails.get(flow.id)
        if tails is None:
            tails = self.tails[flow.id] = (StreamTail(self.tail_limit),
                                           StreamTail(self.tail_limit))
        return tails

    def _track(self, direction: int, flow: Flow, payload: bytes, ihl: int, seq: int, ack: int,
               flags: int, plen: int, events: list[Any]) -> bool:
        """Tails of both directions; True to drop an out-of-order client segment."""
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
        if seq_lt(stream.next_seq, seq):  # held by the stack: not for the server yet
            self.stats["ooo_dropped"] += 1
            return True
        return False

    def _message(self, e: MessageIn, flow: Flow, payload: bytes, handle: Handle,
                 now: float) -> bool:
        data = e.message.data
        tails = self._tails(flow)
        stream = (self.streams.get(flow.id, b"") + data)[-MAX_STREAM:]
        self.streams[flow.id] = stream
        hit = self._check(flow, data, stream)
        if hit is None:
            tails[0].add(e.seq, data)
            return False
        self.stats["triggers"] += 1
        c = flow.halves[0]  # the stack has just taken the trigger: its fields are this packet's
        fin = FIN if c.fin_seq is not None and c.fin_seq == seq_add(e.seq, len(data)) else 0
        seg = Segment(e.seq, c.ack or 0, ACK | fin, c.window, data, c.ts_val, c.ts_ecr)
        t = Trigger(flow, e.seq, data, seg, payload, _addr(*flow.orig), _addr(*flow.resp),
                    tails[0], tails[1], hit)
        self.triggers.append(t)
        del self.triggers[:-64]
        self.streams.pop(flow.id, None)
        try:
            self.engine.trigger(t, handle, now)
        except Exception:
            # The message is known bad: whatever failed, it must not reach the server (the
            # queue's fail-open default would forward it). The client will resend it, and it
            # triggers again.
            self.stats["trigger_errors"] += 1
            log.exception("takeover of flow %d failed", flow.id)
            handle.drop()
        return True

    def _check(self, flow: Flow, data: bytes, stream: bytes) -> Any:
        if self.detect is not None:
            hit = self.detect(flow, data, stream)
            if hit is not None:
                return hit
        if self.filters is not None:
            port = flow.resp[1]
            return self.filters.check("tcp", port, data) or \
                self.filters.check("tcp", port, stream)
        return None


# ---------------------------------------------------------------------- herdwall's takeover

PolicyFor = Callable[[Trigger], Policy]


def open_raw_socket(netns: str | None) -> socket.socket:
    """An IPv4 raw socket (``IPPROTO_RAW``: we write the IP header) marked ``TAKEOVER_OWN``,
    non-blocking, opened in ``netns``."""

    def make() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        mark_socket(s, rules.TAKEOVER_OWN)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setblocking(False)
        return s

    if netns is None:
        return make()
    from node.testbed.netns import Namespace

    with Namespace.attach(netns).enter():
        return make()


class TakeoverEngine:
    """Flows taken over into user-level endpoint pairs (see the module docstring)."""

    def __init__(self, *, netns: str | None = None, policy: PolicyFor | None = None,
                 config: Config | None = None, nft: rules.NftText | None = None,
                 mark_flows: bool = True, idle_timeout: float = 3600.0,
                 on_done: Callable[[Proxy], None] | None = None) -> None:
        self.netns = netns
        self.policy = policy or (lambda t: Scrub())
        self.config = config
        self.nft = nft
        self.mark_flows = mark_flows and nft is not None
        self.idle_timeout = idle_timeout
        self.on_done = on_done
        self.proxies: dict[bytes, Proxy] = {}  # both directions' flow keys
        self.finished: list[Proxy] = []
        self.stats: Counter[str] = Counter()
        self.sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timers: dict[int, tuple[float, asyncio.TimerHandle]] = {}
        self._dirty: set[Proxy] = set()
        self._flush_scheduled = False
        self._dst: dict[bytes, str] = {}
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._addrs: dict[int, tuple[tuple[str, int], tuple[str, int]]] = {}

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if self.sock is None:
            self.sock = open_raw_socket(self.netns)

    def close(self) -> None:
        for _, h in self._timers.values():
            h.cancel()
        self._timers.clear()
        for proxy in {id(p): p for p in self.proxies.values()}.values():
            self._unmark(proxy)
        self.proxies.clear()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # ------------------------------------------------------------------ taking over

    def trigger(self, t: Trigger, handle: Handle, now: float) -> None:
        self.take_over(t.flow, t.seq, t.data, t.seg, now, handle=handle, c2s=t.c2s, s2c=t.s2c,
                       policy=self.policy(t))

    def take_over(self, flow: Flow, seq: int, data: bytes, seg: Segment, now: float, *,
                  handle: Handle | None = None, policy: Policy | None = None,
                  c2s: StreamTail | None = None, s2c: StreamTail | None = None) -> Proxy:
        """Take ``flow`` over at the client message ``data`` that starts at ``seq`` and came in
        the segment ``seg`` (its packet, if still held, is ``handle``: dropped here). The first
        segments go out before this returns; the flow's set elements follow on the loop."""
        # Acknowledge the trigger at once, from the tracked state alone: every policy consumes
        # it, and the client's stack learns nothing unusual. Then the endpoints.
        (caddr, cport), (saddr, sport) = flow.orig, flow.resp
        first = first_ack(flow, seq, len(data), seg.tsval)
        self._sendto(caddr, ack_packet(saddr, caddr, sport, cport, first))
        to_client, to_server = seeds(flow, seq, c2s=c2s, s2c=s2c)
        proxy = Proxy(flow.orig, flow.resp, to_client, to_server, policy or Scrub(), now,
                      config=self.config, idle_timeout=self.idle_timeout, defer_server=True)
        proxy.start(Segment(seq, seg.ack, seg.flags & ~SYN, seg.window, data, seg.tsval,
                            seg.tsecr), now)
        proxy.a.sent_ack(first)
        self._send(proxy, now, flush=True)  # FIN or reply to the client (close, respond)
        if handle is not None:
            handle.drop()
        proxy.connect_server(now)
        self._send(proxy, now, flush=True)
        (c, cp), (s, sp) = flow.orig, flow.resp
        ckey = c + s + cp.to_bytes(2, "big") + sp.to_bytes(2, "big")
        skey = s + c + sp.to_bytes(2, "big") + cp.to_bytes(2, "big")
        self.proxies[ckey] = self.proxies[skey] = proxy
        self._keys[id(proxy)] = (ckey, skey)
        self._addrs[id(proxy)] = (_addr(c, cp), _addr(s, sp))
        self.stats["taken_over"] += 1
        self._arm(proxy)
        if self.mark_flows and self._loop is not None:
            self._loop.call_soon(self._mark, proxy)
        return proxy

    def offer(self, payload: bytes, handle: Handle, now: float) -> bool:
        """A queued packet: if it belongs to a taken-over flow, handle it and drop it in the
        kernel (True); else leave it alone (False)."""
        if self.consume(payload, now):
            handle.drop()
            return True
        return False

    def consume(self, payload: bytes, now: float) -> bool:
        """``offer`` without the verdict, for a caller that drops the packet itself when this
        returns True (``TakeoverGate`` on the stack's queue)."""
        if not self.proxies or len(payload) < 40:
            return False
        ihl = (payload[0] & 15) * 4
        key = payload[12:20] + payload[ihl:ihl + 4]
        proxy = self.proxies.get(key)
        if proxy is None:
            return False
        try:
            p = wire.parse(payload)
        except PacketError:
            return True
        seg = p.seg
        from_client = key == self._keys[id(proxy)][0]
        if seg.flags & SYN and not seg.flags & ACK and from_client and proxy.a.state in (
                State.TIME_WAIT, State.CLOSED):
            self._finish(proxy)  # a new connection on the same ports: not ours any more
            return False
        if seg.flags & RST:
            self.stats["rst_in"] += 1
        proxy.receive(from_client, seg, now)
        self._send(proxy, now, flush=False)
        self._dirty.add(proxy)
        if not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return True

    # ------------------------------------------------------------------ output and timers

    def _sendto(self, dst: bytes, pkt: bytes) -> None:
        if self.sock is None:
            return  # closed
        d = self._dst.get(dst)
        if d is None:
            d = self._dst[dst] = socket.inet_ntoa(dst)
        try:
            self.sock.sendto(pkt, (d, 0))
            self.stats["sent"] += 1
        except OSError as exc:  # ENOBUFS and kin: the endpoint's timer resends it
            self.stats["send_errors"] += 1
            log.debug("raw send: %s", exc)

    def _send(self, proxy: Proxy, now: float, flush: bool) -> None:
        if self.sock is None:
            return
        for dst, pkt in proxy.packets(now, flush=flush):
            self._sendto(dst, pkt)
        if proxy.done:
            self._finish(proxy)
        else:
            self._arm(proxy)

    def _flush(self) -> None:
        self._flush_scheduled = False
        now = self._loop.time()  # type: ignore[union-attr]
        dirty, self._dirty = self._dirty, set()
        for proxy in dirty:
            if id(proxy) in self._keys:
                self._send(proxy, now, flush=True)

    def _arm(self, proxy: Proxy) -> None:
        if self._loop is None:
            return
        d = proxy.deadline()
        if d is None:
            return
        cur = self._timers.get(id(proxy))
        if cur is not None:
            if cur[0] <= d:
                return  # fires earlier; it re-arms for the later deadline then
            cur[1].cancel()
        self._timers[id(proxy)] = (d, self._loop.call_at(d, self._on_timer, proxy))

    def _on_timer(self, proxy: Proxy) -> None:
        self._timers.pop(id(proxy), None)
        if id(proxy) in self._keys:
            self._send(proxy, self._loop.time(), flush=True)  # type: ignore[union-attr]

    def _finish(self, proxy: Proxy) -> None:
        keys = self._keys.pop(id(proxy), None)
        if keys is None:
            return
        for k in keys:
            self.proxies.pop(k, None)
        t = self._timers.pop(id(proxy), None)
        if t is not None:
            t[1].cancel()
        self._unmark(proxy)
        self._addrs.pop(id(proxy), None)
        self.finished.append(proxy)
        del self.finished[:-256]
        self.stats["finished"] += 1
        if self.on_done is not None:
            self.on_done(proxy)

    def _mark(self, proxy: Proxy) -> None:
        addrs = self._addrs.get(id(proxy))
        if addrs is None or self.nft is None:
            return
        try:
            self.nft.apply(rules.add_flow(*addrs))
            self.stats["flows_marked"] += 1
        except RuntimeError as exc:
            self.stats["mark_errors"] += 1
            log.warning("takeover: could not mark flow %s: %s", addrs, exc)

    def _unmark(self, proxy: Proxy) -> None:
        addrs = self._addrs.get(id(proxy))
        if addrs is None or self.nft is None or not self.mark_flows:
            return
        # never added (closed before the loop ran it) or already gone: nothing to do
        with contextlib.suppress(RuntimeError):
            self.nft.apply(rules.delete_flow(*addrs))

    def owned(self) -> list[Proxy]:
        return list({id(p): p for p in self.proxies.values()}.values())


# ---------------------------------------------------------------------- the daemon's path

Flag = Callable[[Flow, MessageIn, bytes], Policy | None]  # (flow, message, stream) -> policy


class TakeoverGate:
    """A ``gate`` for ``node.kernel.inline.StackQueue``: the daemon's stack queue takes flows
    over itself. For each packet (after the stack has seen it): a packet of a taken-over flow
    is handled by the engine and dropped; a message that ``flag`` answers with a policy is the
    trigger (its packet dropped, the flow taken over). The port must be one of the queue's
    ``inline_ports``, or the packet would have its verdict before the gate runs. The engine adds
    the flow to ``takeover_flows``, so its later packets reach the takeover queue instead (read
    by a ``TakeoverQueue`` on the same engine)."""

    def __init__(self, engine: TakeoverEngine, stack: Stack, flag: Flag) -> None:
        self.engine = engine
        self.stack = stack
        self.flag = flag
        self.streams: dict[int, bytes] = {}
        self.stats: Counter[str] = Counter()

    def __call__(self, packet: bytes, events: list[Any]) -> bool:
        loop = self.engine._loop
        now = loop.time() if loop is not None else 0.0
        if self.engine.consume(packet, now):
            return True
        for e in events:
            if type(e) is FlowClosed:
                self.streams.pop(e.flow_id, None)
            if type(e) is not MessageIn or e.message.connection is None:
                continue
            hdr = _header(packet)
            fd = self.stack.tcp.table.get(hdr[0]) if hdr is not None else None
            if fd is None or fd.dir != 0:
                continue
            flow = fd.flow
            data = e.message.data
            stream = (self.streams.get(flow.id, b"") + data)[-MAX_STREAM:]
            self.streams[flow.id] = stream
            policy = self.flag(flow, e, stream)
            if policy is None:
                continue
            self.streams.pop(flow.id, None)
            c = flow.halves[0]
            seg = Segment(e.seq, c.ack or 0, ACK, c.window, data, c.ts_val, c.ts_ecr)
            try:
                self.engine.take_over(flow, e.seq, data, seg, now, policy=policy)
                self.stats["taken_over"] += 1
            except Exception:
                self.stats["errors"] += 1
                log.exception("takeover of flow %d failed", flow.id)
            return True  # the trigger never reaches the server
        return False
