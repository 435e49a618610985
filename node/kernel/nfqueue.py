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
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Callable
from typing import Any

from node.kernel.marks import with_mark

log = logging.getLogger(__name__)


class Handle:
    """The verdict for one queued packet. Exactly one verdict counts; later ones return
    False."""

    __slots__ = ("_adapter", "_pkt", "done", "hook", "id", "indev", "mark", "outdev")

    def __init__(self, adapter: QueueAdapter, pkt: Any) -> None:
        self._adapter = adapter
        self._pkt = pkt
        self.done = False
        self.id: int = pkt.id
        self.mark: int = pkt.mark  # the mark the packet arrived with
        self.hook: int = pkt.hook  # netfilter hook number (1 input, 2 forward, 3 output)
        self.indev: int = pkt.indev
        self.outdev: int = pkt.outdev

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

    @property
    def source_mac(self) -> bytes | None:
        """The link-layer address the packet came from (None: sent by this host, or no
        hardware header)."""
        hw = self._pkt.get_hw() if self.indev else None
        return bytes(hw[:6]) if hw else None


OnPacket = Callable[[bytes, Handle], None]


class QueueAdapter:
    def __init__(self, queue_num: int, on_packet: OnPacket, *, netns: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, max_len: int = 1024,
                 fail_open: bool = True) -> None:
        self.queue_num = queue_num
        self.on_packet = on_packet
        self.netns = netns
        self.max_len = max_len
        self.fail_open = fail_open
        self._loop = loop
        self._q: Any = None
        self._fd = -1
        self._held: set[Handle] = set()
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
        loop.add_reader(self._fd, self._readable)
        return self

    async def __aenter__(self) -> QueueAdapter:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Default verdict for held packets, stop reading, unbind."""
        if self._q is None:
            return
        for h in list(self._held):
            self._default(h)
        if self._loop is not None and self._fd >= 0:
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
