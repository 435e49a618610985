"""herdwall's takeover engine: flows taken over into user-level endpoint pairs.

``TakeoverEngine`` owns the taken-over flows: a ``proxy.Proxy`` each, segments out through a raw
socket marked ``TAKEOVER_OWN`` (``adapter.open_raw_socket``), the endpoints' timers on the
queue's scheduler (the loop, or the clock of the queue's reader thread), the flows' elements in
``takeover_flows``. It is driven by a ``adapter.TakeoverQueue``
(the watch queue and the flows' own packets) and, on the daemon's stack queue, by a
:class:`TakeoverGate`.

On a trigger the client's ACK goes out first, then the client-facing endpoint, then the
server-facing one: the server-facing set-up and the flow's set elements are off the critical
path. That ACK normally leaves from C before any Python runs (``fastack``: the takeover queue's
readers wait there, and C sends what ``seed.first_ack`` would build from a copy of the tracked
state; ``answered`` then records it). Otherwise the takeover queue calls ``answer`` before its
stack has even taken the trigger packet; either way the ACK goes back onto the interface the
trigger came in on, to the MAC address it came from (``adapter.LinkSocket``: no routing, no
netfilter hooks on the way out); the raw socket is the fallback (a trigger sent by this host, or
a link send that fails).

Where an idle takeover's time went before the C answer (ftrace on the shared 2-core VM: the
trigger on the interface, the reader's wake-up and switch-in, its system calls, the segment's
transmit), ~140-250 µs in all: the kernel from the trigger to waking the reader ~42-57 µs, the
reader running ~15 later (it runs ``SCHED_FIFO``, pinned to the CPU whose queue the packet was
fanned out to, so it is never woken by an interrupt to a halted vCPU), ``recv`` back ~10 later;
then ~80-170 µs of user space with no system call, page fault or interrupt, to the ``send``.
That user-space stretch takes ~40-60 µs on a node kept busy: idle, everything runs cold (a small
Python function ~4-10 µs instead of ~0.2; ``bench_takeover``'s ``cold_call_us``), so its length
was the number of Python steps on the way. Calls were cut (``first_ack`` in one, the send inline,
the MAC address read with the packet, the TSval in the header's ``struct`` call), and floors were
measured: a fixed packet sent first thing in the binding's callback gave a p50 of ~125 µs, so no
Python path could reach the 8x target (~120 µs against TCP_REPAIR's ~1 ms) on an idle node.
Tried and left out: a netlink reader in Python (~10 µs more than the binding's C), no garbage
collection, the heap on transparent huge pages. Not done: keeping the path warm with synthetic
packets while idle (it would measure a node that is not idle). The C answer takes the user-space
stretch down to a few cache lines: idle p50 ~35 µs, busy ~22 µs.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

from node.kernel.nfqueue import Handle, Scheduler
from node.stack.conntrack import Flow
from node.stack.events import FlowClosed, MessageIn
from node.stack.packet import ACK, RST, SYN, PacketError
from node.stack.stack import Stack
from node.takeover import rules, wire
from node.takeover.adapter import (
    MAX_BLOCKED,
    MAX_STREAM,
    Link,
    LinkSocket,
    Trigger,
    addr_text,
    open_raw_socket,
    tcp_header,
)
from node.takeover.policy import Policy, Scrub
from node.takeover.proxy import Proxy
from node.takeover.seed import AckFields, StreamTail, first_ack, seeds
from node.takeover.tcp import Config, Segment, State, seq_add

log = logging.getLogger(__name__)

PolicyFor = Callable[[Trigger], Policy]


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
        self.link: LinkSocket | None = None  # the first segment's way out
        self._loop: Scheduler | None = None  # the queue's (a reader thread's clock or a loop)
        self._timers: dict[int, tuple[float, Any]] = {}
        self._dirty: set[Proxy] = set()
        self._flush_scheduled = False
        self._dst: dict[bytes, str] = {}
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._addrs: dict[int, tuple[tuple[str, int], tuple[str, int]]] = {}
        self._answered: dict[int, AckFields] = {}  # flow id -> the trigger's ACK, sent early

    def start(self, loop: Scheduler) -> None:
        self._loop = loop
        if self.sock is None:
            self.sock = open_raw_socket(self.netns)
        if self.link is None:
            self.link = LinkSocket(self.netns)

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
        if self.link is not None:
            self.link.close()
            self.link = None

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
        first = self._answered.pop(flow.id, None)
        if first is None or first[1] != seq_add(seq, len(data)):
            self.answer(flow, seq, len(data), None, seg.tsval, None, now)  # the stack's halves
            first = self._answered.pop(flow.id)
        to_client, to_server = seeds(flow, seq, c2s=c2s, s2c=s2c)
        proxy = Proxy(flow.orig, flow.resp, to_client, to_server, policy or Scrub(), now,
                      config=self.config, idle_timeout=self.idle_timeout, defer_server=True)
        proxy.start(Segment(seq, seg.ack, seg.flags & ~SYN, seg.window, data, seg.tsval,
                            seg.tsecr), now)
        proxy.a.sent_ack(Segment(first[0], first[1], ACK, first[2], b"", first[3], first[4]))
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
        self._addrs[id(proxy)] = (addr_text(c, cp), addr_text(s, sp))
        self.stats["taken_over"] += 1
        self._arm(proxy)
        if self.mark_flows and self._loop is not None:
            self._loop.call_soon(self._mark, proxy)
        return proxy

    def answer(self, flow: Flow, seq: int, n: int, ack: int | None, tsval: int | None,
               link: Link | None, now: float) -> None:
        """The trigger's ACK before the stack has even taken its packet (``take_over`` follows
        and uses it): what the client waits for leaves first, with ``link`` (where the trigger
        came from) straight back onto that interface. ``ack``: the trigger's acknowledgement
        number (None: the stack has taken the trigger; its client half's)."""
        pkt, first = first_ack(flow, seq, n, tsval, ack)
        # ``LinkSocket.send`` inline for an interface it has bound (the trigger's path: a call
        # less, ~10 µs on a node woken from sleep).
        if link is not None and self.link is not None:
            way = self.link.bound.get(link[0])
            try:
                if way is not None:
                    way[0].send(link[1] + way[1] + pkt)
                else:
                    self.link.send(pkt, link)
            except OSError as exc:
                self.stats["link_errors"] += 1
                log.debug("link send: %s", exc)
                link = None
            else:
                self.stats["sent"] += 1
                self.stats["sent_link"] += 1
        if link is None or self.link is None:
            self._sendto(flow.orig[0], pkt)
        self._remember(flow, first)

    def answered(self, flow: Flow, fields: AckFields) -> None:
        """The trigger's ACK went out from C (``fastack``): ``answer`` without the send."""
        self.stats["sent"] += 1
        self.stats["sent_link"] += 1
        self.stats["sent_fast"] += 1
        self._remember(flow, fields)

    def _remember(self, flow: Flow, fields: AckFields) -> None:
        """The trigger's ACK, for ``take_over`` to tell its client-facing endpoint."""
        self._answered[flow.id] = fields
        if len(self._answered) > 64:  # a trigger whose take_over failed leaves one behind
            self._answered.pop(next(iter(self._answered)))

    def fast_links(self) -> dict[int, tuple[int, bytes]]:
        """The link sockets ``answer`` uses, for ``fastack.FastAck``: ifindex -> (descriptor,
        our MAC address). Valid from ``start`` to ``close``."""
        if self.link is None:
            return {}
        return {i: (sock.fileno(), hdr[:6]) for i, (sock, hdr) in self.link.bound.items()}

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
        t = self._timers.pop(id(proxy), None)
        if t is not None:
            t[1].cancel()
        # The kernel's mark goes first: a flow ``owned()`` no longer lists is undone there too.
        self._unmark(proxy)
        for k in keys:
            self.proxies.pop(k, None)
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
        """Safe from another thread than the queue's (``tuple`` copies the values at once)."""
        return list({id(p): p for p in tuple(self.proxies.values())}.values())


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
        self.blocked: dict[int, None] = {}  # flows whose takeover failed at the trigger
        self.stats: Counter[str] = Counter()

    def blocks(self, packet: bytes) -> bool:
        """A client packet with data of a flow whose takeover failed at its trigger."""
        if not self.blocked:
            return False
        hdr = tcp_header(packet)
        fd = self.stack.tcp.table.get(hdr[0]) if hdr is not None and hdr[5] else None
        if fd is not None and fd.dir == 0 and fd.flow.id in self.blocked:
            self.stats["blocked"] += 1
            return True
        return False

    def __call__(self, packet: bytes, events: list[Any]) -> bool:
        loop = self.engine._loop
        now = loop.time() if loop is not None else 0.0
        if self.engine.consume(packet, now):
            return True
        for e in events:
            if type(e) is FlowClosed:
                self.streams.pop(e.flow_id, None)
                self.blocked.pop(e.flow_id, None)
            if type(e) is not MessageIn or e.message.connection is None:
                continue
            hdr = tcp_header(packet)
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
                # As on the takeover queue: the stack counted the message as delivered, so
                # the flow's later client data is dropped (its resend would pass unchecked).
                self.stats["errors"] += 1
                log.exception("takeover of flow %d failed", flow.id)
                self.stack.rewind(flow, e.seq)  # a resend is checked again once unblocked
                self.blocked[flow.id] = None
                if len(self.blocked) > MAX_BLOCKED:
                    self.blocked.pop(next(iter(self.blocked)))
            return True  # the trigger never reaches the server
        return False
