"""NFQUEUE for an asyncio loop, through the ``netfilterqueue`` binding.

``QueueAdapter(queue_num, on_packet)`` binds the queue, registers its netlink socket with
``loop.add_reader`` and, when it is readable, calls the binding's ``run(block=False)``, which
reads with ``MSG_DONTWAIT`` until the socket is empty and calls back once per packet. For each
packet ``on_packet(payload: bytes, handle: Handle)`` runs; it may give the verdict at once
(``handle.accept()``, ``handle.accept(mark=M)``, ``handle.drop()``) or keep the handle and give
it later from any callback of the same loop (``loop.call_later`` for a delay queue): a packet
without a verdict when ``on_packet`` returns is ``retain()``ed and held by the kernel meanwhile
(a held SYN is not retransmitted). Held packets count against the queue's ``max_len``.

If ``on_packet`` raises, the packet gets the default verdict (accept when ``fail_open``, the
default, else drop; always drop with ``drop_on_error``, for a queue that checks what it passes)
and ``errors`` counts it: a bug in a callback never stalls the queue.
``close()`` gives every held packet the default verdict before unbinding, since the kernel would
otherwise drop them when the reader goes.

``netns``: open the queue's netlink socket inside that namespace (the calling thread enters it
for the moment of creation; the loop may run anywhere afterwards).

``thread=True``: the queue is read by a thread of its own, blocked in ``recv`` on the queue's
socket, and ``on_packet`` runs on that thread. A packet reaches it sooner: an idle process woken
straight out of ``recv`` skips epoll and the loop's dispatch (60-70 µs of 250 on the shared VM,
``scripts/bench_takeover.py``). Whatever ``on_packet`` schedules goes on the queue's
``clock`` (a ``ThreadClock``: ``time``, ``call_soon``, ``call_at``, ``call_later`` as on a
loop), run on the reader thread between reads; ``clock.loop`` is the asyncio loop the queue was
started from, for work that belongs there (``call_soon_threadsafe``). The thread holds the
interpreter lock only while it handles packets or callbacks; idle, it sleeps in ``recv`` with a
timeout that is the clock's next deadline (no polling). ``priority``: the reader thread runs
``SCHED_FIFO`` at that priority (woken by a packet, it preempts ordinary tasks instead of waiting
for a busy CPU's time slice, while the kernel holds the packet for its verdict); where that is
not permitted it stays on the normal policy (a warning). The kernel's real-time throttling
(95% of a CPU by default) still bounds a reader that never sleeps. ``cpus``: the reader thread
runs on these CPUs only (the reader of one of a range of queues fanned out by CPU, pinned to the
CPU whose packets it gets: woken where the packet was handled, not by an interrupt to another).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import os
import socket
import struct
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from node.kernel.marks import with_mark

log = logging.getLogger(__name__)


class Handle:
    """The verdict for one queued packet. Exactly one verdict counts; later ones return
    False."""

    __slots__ = ("_adapter", "_pkt", "done", "hook", "id", "indev", "mark", "outdev",
                 "peeked", "rewrite", "source_mac")

    def __init__(self, adapter: QueueAdapter, pkt: Any) -> None:
        self._adapter = adapter
        self._pkt = pkt
        self.done = False
        self.rewrite: bytes | None = None  # what accept() sends on instead, when set
        self.id: int = pkt.id
        self.mark: int = pkt.mark  # the mark the packet arrived with
        self.hook: int = pkt.hook  # netfilter hook number (1 input, 2 forward, 3 output)
        self.indev: int = pkt.indev
        self.outdev: int = pkt.outdev
        # The link-layer address the packet came from (None: sent by this host, or no hardware
        # header). Read here, not in a property: a takeover reads it on the trigger's path,
        # where a call costs ~10 µs on a node woken from sleep.
        hw = pkt.get_hw() if self.indev else None
        self.source_mac: bytes | None = hw[:6] if hw else None
        # What the queue's ``peek`` returned for this packet (None: nothing).
        self.peeked: Any = adapter._peeked.pop(self.id, None) if adapter._peeked else None

    def accept(self, mark: int | None = None, payload: bytes | None = None) -> bool:
        """Let the packet go on; with ``mark``, herdwall's mark bits become ``mark`` (the other
        bits are kept); with ``payload``, these bytes go on instead of the queued packet (a
        router that marks packets rewrites their header)."""
        if self.done:
            return False
        if mark is not None:
            self._pkt.set_mark(with_mark(self.mark, mark))
        if payload is None:
            payload = self.rewrite
        if payload is not None:
            self._pkt.set_payload(payload)
        return self._verdict(self._pkt.accept)

    def drop(self) -> bool:
        if self.done:
            return False
        return self._verdict(self._pkt.drop)

    def _verdict(self, fn: Callable[[], None]) -> bool:
        self.done = True
        self._adapter._held.discard(self)
        try:
            fn()
        except RuntimeError as exc:  # queue already unbound: the kernel has dropped it
            self._adapter.stale += 1
            log.debug("verdict after unbind: %s", exc)
            return False
        self._adapter.verdicts += 1
        return True

    @property
    def payload(self) -> bytes:
        return self._pkt.get_payload()


OnPacket = Callable[[bytes, Handle], None]


class Scheduler(Protocol):
    """What a packet callback may schedule with: an asyncio loop, or a ``ThreadClock``."""

    def time(self) -> float: ...
    def call_soon(self, callback: Callable[..., Any], *args: Any) -> Any: ...
    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Any: ...
    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Any: ...


class TimerHandle:
    __slots__ = ("args", "callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: TimerHandle) -> bool:
        return self.when < other.when


class ThreadClock:
    """The callbacks of a queue read by its own thread, on that thread (only it may schedule).
    Times are ``time.monotonic()``, asyncio's clock."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None  # set when the queue starts
        self._ready: deque[TimerHandle] = deque()
        self._timers: list[TimerHandle] = []
        # The reader sleeps until ``awaited``; something scheduled sooner calls ``interrupt``
        # (once: it sets ``awaited`` to -inf until the reader sleeps again).
        self.awaited = -math.inf
        self.interrupt: Callable[[], None] | None = None

    # The C function itself (no Python frame: the packet callback reads it first thing).
    time = staticmethod(time.monotonic)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        h = TimerHandle(0.0, callback, args)
        self._ready.append(h)
        if self.awaited != -math.inf and self.interrupt is not None:
            self.interrupt()
        return h

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        h = TimerHandle(when, callback, args)
        heapq.heappush(self._timers, h)
        if len(self._timers) > 256 and sum(t.cancelled for t in self._timers) * 2 > len(
                self._timers):  # re-armed timers leave cancelled ones behind
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
        if when < self.awaited and self.interrupt is not None:
            self.interrupt()
        return h

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        return self.call_at(time.monotonic() + delay, callback, *args)

    def delay(self) -> float | None:
        """Seconds until something is due (0: now), None: nothing scheduled."""
        if self._ready:
            return 0.0
        timers = self._timers
        while timers and timers[0].cancelled:
            heapq.heappop(timers)
        return max(0.0, timers[0].when - time.monotonic()) if timers else None

    def run_due(self) -> None:
        """The ready callbacks and the timers due, each logged and skipped if it raises."""
        now = time.monotonic()
        timers = self._timers
        while timers and (timers[0].cancelled or timers[0].when <= now):
            h = heapq.heappop(timers)
            if not h.cancelled:
                self._ready.append(h)
        for _ in range(len(self._ready)):  # what these schedule runs on the next round
            h = self._ready.popleft()
            if h.cancelled:
                continue
            try:
                h.callback(*h.args)
            except Exception:
                log.exception("callback %r failed", h.callback)


# How much of a packet the kernel copies to the queue. The binding reads each message into 4096
# bytes and caps the copy at 4016, leaving 80 for the attributes; a forwarded, marked packet's
# take 84 (more with timestamps, physdev, VLAN), and a message that recv cuts is lost without a
# verdict: the kernel holds its packet until the queue is full. With 256 bytes of room every
# longer packet reaches the callback, cut here (its IP total length says so: callbacks that
# must check it drop it; honest TCP senders' segments fit, node.takeover.rules.MSS_CLAMP).
COPY_RANGE = 4096 - 256
# The largest MSS whose segments fit COPY_RANGE: IP header 60 at most (IPv4 with options; IPv6's
# is 40), TCP header 60 at most, and 20 to spare. The kernel chains of queued TCP ports set a
# SYN's larger MSS option to this (node.kernel.nft.clamp_mss).
MSS_CLAMP = COPY_RANGE - 140
NLMSG_NOOP = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4


_NOOP = struct.pack("=IHHII", 16, NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, 0, 0)


class QueueAdapter:
    def __init__(self, queue_num: int, on_packet: OnPacket, *, netns: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, max_len: int = 1024,
                 fail_open: bool = True, thread: bool = False,
                 priority: int | None = None, cpus: set[int] | None = None,
                 drop_on_error: bool = False) -> None:
        self.queue_num = queue_num
        self.on_packet = on_packet
        self.netns = netns
        self.max_len = max_len
        self.fail_open = fail_open
        self.drop_on_error = drop_on_error
        self._loop = loop
        self._q: Any = None
        self._fd = -1
        self._held: set[Handle] = set()
        self.thread = thread
        self.priority = priority  # the reader thread's SCHED_FIFO priority (thread=True)
        self.cpus = cpus  # the CPUs the reader thread runs on (thread=True; None: any)
        self.clock = ThreadClock() if thread else None  # what on_packet schedules with
        self._sock: socket.socket | None = None  # the reader thread's handle on the socket
        self._thread: threading.Thread | None = None
        self._stop = False
        # With ``thread``: called as ``peek(fd, block)`` before each read, it waits for the next
        # message on the queue's socket (blocking as the binding would, unless ``block`` is
        # false) and leaves it there; what it returns, ``(packet id, ...)`` or None, becomes that
        # packet's ``Handle.peeked`` (``node.takeover.fastack``).
        self.peek: Callable[[int, bool], Any] | None = None
        self._peeked: dict[int, Any] = {}
        self.received = 0
        self.verdicts = 0
        self.errors = 0
        self.stale = 0

    # -- life cycle

    def start(self) -> QueueAdapter:
        from netfilterqueue import NetfilterQueue

        if self._q is not None:
            return self
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop

        def make() -> Any:
            q = NetfilterQueue()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # rcvbuf smaller than asked
                q.bind(self.queue_num, self._callback, max_len=self.max_len, range=COPY_RANGE)
            return q

        if self.netns is None:
            q = make()
        else:
            from node.testbed.netns import Namespace

            with Namespace.attach(self.netns).enter():
                q = make()
        self._q = q
        self._fd = q.get_fd()
        if not self.thread:
            loop.add_reader(self._fd, self._readable)
            return self
        assert self.clock is not None
        self.clock.loop = loop
        self._stop = False
        # A socket object on a duplicate of the binding's descriptor (the same socket and file
        # description): the read timeout, non-blocking when interrupted, the wake-up at close.
        self._sock = socket.socket(fileno=os.dup(self._fd))
        self._sock.setblocking(True)
        self.clock.interrupt = self._interrupt
        self._thread = threading.Thread(target=self._run, name=f"nfqueue-{self.queue_num}",
                                        daemon=True)
        self._thread.start()
        return self

    async def __aenter__(self) -> QueueAdapter:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Default verdict for held packets, stop reading, unbind."""
        if self._q is None:
            return
        if self._thread is not None:
            self._stop_thread()
        for h in list(self._held):
            self._default(h)
        if self._loop is not None and self._fd >= 0 and not self.thread:
            self._loop.remove_reader(self._fd)
        self._q.unbind()
        self._q = None  # the binding closes its netlink socket when freed
        self._fd = -1

    @property
    def held(self) -> int:
        """Packets waiting for a verdict."""
        return len(self._held)

    # -- reading

    def _readable(self) -> None:
        try:
            self._q.run(block=False)
        except OSError as exc:  # recv failed: log and go on; the socket stays registered
            self.errors += 1
            log.warning("nfqueue %d: %s", self.queue_num, exc)

    def _run(self) -> None:
        """The reader thread: packets, then what they scheduled, until ``close``. Idle, it
        sleeps in the binding's own ``recv`` (C, no Python on the way to the packet callback)
        with a timeout that is the clock's next deadline; a callback that schedules something
        sooner makes the socket non-blocking, so the binding returns once the queue is empty."""
        assert self._sock is not None and self.clock is not None
        sock, clock, q = self._sock, self.clock, self._q
        if self.priority is not None:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.priority))
            except OSError as exc:  # no CAP_SYS_NICE, a cgroup without real-time time, ...
                log.warning("nfqueue %d: reader stays on the normal policy: %s",
                            self.queue_num, exc)
        if self.cpus is not None:
            try:
                os.sched_setaffinity(0, self.cpus)
            except OSError as exc:  # CPUs outside the process's cpuset, or offline
                log.warning("nfqueue %d: reader not pinned to CPUs %s: %s", self.queue_num,
                            sorted(self.cpus), exc)
        timeout: float | None = -1.0
        while not self._stop:
            clock.run_due()
            delay = clock.delay()
            if self._stop:
                break
            if delay == 0.0:
                clock.awaited = -math.inf
            else:
                # Rounded up to a millisecond, so that a timer is not woken for a moment too
                # early and the option is rarely set again.
                t = None if delay is None else (int(delay * 1000) + 1) / 1000
                if t != timeout:
                    sec = 0 if t is None else int(t)
                    usec = 0 if t is None else round((t - sec) * 1e6)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                    struct.pack("@ll", sec, usec))
                    timeout = t
                clock.awaited = math.inf if t is None else time.monotonic() + t
                if not sock.getblocking():  # interrupted before
                    sock.setblocking(True)
            try:
                if self.peek is None:
                    q.run(block=delay != 0.0)  # returns at EAGAIN: the timeout, or non-blocking
                else:
                    got = self.peek(self._fd, delay != 0.0)
                    if got is not None:
                        if len(self._peeked) >= 64:  # the binding never read those
                            self._peeked.clear()
                        self._peeked[got[0]] = got
                    q.run(block=False)
            except OSError as exc:  # as on the loop: log and go on
                self.errors += 1
                log.warning("nfqueue %d: %s", self.queue_num, exc)
                time.sleep(0.01)  # a socket that keeps failing must not spin

    def _interrupt(self) -> None:
        """Something is due before the reader's timeout: the binding returns when the socket
        is empty (the reader makes it blocking again before it sleeps)."""
        assert self._sock is not None and self.clock is not None
        self.clock.awaited = -math.inf
        self._sock.setblocking(False)

    def _stop_thread(self) -> None:
        assert self._thread is not None and self._sock is not None
        self._stop = True
        if self._thread is not threading.current_thread():
            # A blocked ``recv`` returns (the kernel acknowledges a no-op to this socket) and
            # the next finds the socket non-blocking; again, should the reader have made it
            # blocking meanwhile.
            for _ in range(100):
                try:
                    self._sock.setblocking(False)
                    self._sock.send(_NOOP)
                except OSError as exc:
                    log.warning("nfqueue %d: wake-up: %s", self.queue_num, exc)
                    break
                self._thread.join(0.05)
                if not self._thread.is_alive():
                    break
            if self._thread.is_alive():
                log.warning("nfqueue %d: reader thread did not stop", self.queue_num)
        self._sock.close()
        self._sock = None
        self._thread = None

    def _default(self, h: Handle) -> None:
        if self.fail_open:
            h.accept()
        else:
            h.drop()

    def _callback(self, pkt: Any) -> None:
        self.received += 1
        h = Handle(self, pkt)
        try:
            self.on_packet(pkt.get_payload(), h)
        except Exception:
            self.errors += 1
            log.exception("nfqueue %d: on_packet failed", self.queue_num)
            if self.drop_on_error:
                h.drop()
            else:
                self._default(h)
            return
        if not h.done:
            pkt.retain()  # the kernel holds it; we keep the handle for a later verdict
            self._held.add(h)
            if h.done:  # given its verdict meanwhile, by another queue's reader
                self._held.discard(h)
