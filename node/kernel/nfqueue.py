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
default, else drop) and ``errors`` counts it: a bug in a callback never stalls the queue.
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
timeout that is the clock's next deadline (no polling).
"""

from __future__ import annotations

import asyncio
import errno
import heapq
import logging
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
                 "source_mac")

    def __init__(self, adapter: QueueAdapter, pkt: Any) -> None:
        self._adapter = adapter
        self._pkt = pkt
        self.done = False
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

    def accept(self, mark: int | None = None, payload: bytes | None = None) -> bool:
        """Let the packet go on; with ``mark``, herdwall's mark bits become ``mark`` (the other
        bits are kept); with ``payload``, these bytes go on instead of the queued packet (a
        router that marks packets rewrites their header)."""
        if self.done:
            return False
        if mark is not None:
            self._pkt.set_mark(with_mark(self.mark, mark))
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

    # The C function itself (no Python frame: the packet callback reads it first thing).
    time = staticmethod(time.monotonic)

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        h = TimerHandle(0.0, callback, args)
        self._ready.append(h)
        return h

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> TimerHandle:
        h = TimerHandle(when, callback, args)
        heapq.heappush(self._timers, h)
        if len(self._timers) > 256 and sum(t.cancelled for t in self._timers) * 2 > len(
                self._timers):  # re-armed timers leave cancelled ones behind
            self._timers = [t for t in self._timers if not t.cancelled]
            heapq.heapify(self._timers)
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


NLMSG_NOOP = 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4


class _Recv:
    """What the binding's ``run_socket`` reads from on the reader thread: packets already
    queued, else a blocking ``recv`` until the clock's next deadline; EAGAIN (``run_socket``
    returns) when callbacks are due or the queue closes."""

    def __init__(self, adapter: QueueAdapter, sock: socket.socket) -> None:
        self.adapter = adapter
        self.sock = sock
        self._timeout: float | None = None

    def recv(self, n: int) -> bytes:
        try:
            return self.sock.recv(n, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        a = self.adapter
        delay = a.clock.delay() if a.clock is not None else None
        if a._stop or delay == 0.0:
            raise BlockingIOError(errno.EAGAIN, "callbacks due")
        # Rounded up to a millisecond, so that a timer is not woken for a moment too early
        # and the option is rarely set again.
        timeout = None if delay is None else (int(delay * 1000) + 1) / 1000
        if timeout != self._timeout:
            sec = 0 if timeout is None else int(timeout)
            usec = 0 if timeout is None else round((timeout - sec) * 1e6)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                                 struct.pack("@ll", sec, usec))
            self._timeout = timeout
        return self.sock.recv(n)  # EAGAIN at the timeout

    def wake(self) -> None:
        """Make a blocked ``recv`` return: the kernel acknowledges a no-op to this socket."""
        self.sock.send(struct.pack("=IHHII", 16, NLMSG_NOOP, NLM_F_REQUEST | NLM_F_ACK, 0, 0))


class QueueAdapter:
    def __init__(self, queue_num: int, on_packet: OnPacket, *, netns: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, max_len: int = 1024,
                 fail_open: bool = True, thread: bool = False) -> None:
        self.queue_num = queue_num
        self.on_packet = on_packet
        self.netns = netns
        self.max_len = max_len
        self.fail_open = fail_open
        self._loop = loop
        self._q: Any = None
        self._fd = -1
        self._held: set[Handle] = set()
        self.thread = thread
        self.clock = ThreadClock() if thread else None  # what on_packet schedules with
        self._reader: _Recv | None = None
        self._thread: threading.Thread | None = None
        self._stop = False
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
                q.bind(self.queue_num, self._callback, max_len=self.max_len)
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
        # A socket object on a duplicate of the binding's descriptor (the same socket): blocking
        # reads with a timeout, and the wake-up at close.
        sock = socket.socket(fileno=os.dup(self._fd))
        sock.setblocking(True)
        self._reader = _Recv(self, sock)
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
        """The reader thread: packets, then what they scheduled, until ``close``."""
        assert self._reader is not None and self.clock is not None
        while not self._stop:
            try:
                self._q.run_socket(self._reader)
            except OSError as exc:  # as on the loop: log and go on
                self.errors += 1
                log.warning("nfqueue %d: %s", self.queue_num, exc)
                time.sleep(0.01)  # a socket that keeps failing must not spin
            self.clock.run_due()

    def _stop_thread(self) -> None:
        assert self._thread is not None and self._reader is not None
        self._stop = True
        if self._thread is not threading.current_thread():
            try:
                self._reader.wake()
            except OSError as exc:
                log.warning("nfqueue %d: wake-up: %s", self.queue_num, exc)
            self._thread.join(5)
            if self._thread.is_alive():
                log.warning("nfqueue %d: reader thread did not stop", self.queue_num)
        self._reader.sock.close()
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
            self._default(h)
            return
        if not h.done:
            pkt.retain()  # the kernel holds it; we keep the handle for a later verdict
            self._held.add(h)
