"""The router role on the kernel path: forwarded IPv4 packets through NFQUEUE into
``RouterCore`` (log, mark, clear), the verdict carrying the rewritten packet, and the
periodic tick, on one asyncio loop. Queries reach the same core over the overlay
(``node.traceback.rpc.QueryService``).

    service = RouterService(RouterCore(config, key), netns="hw-...")   # netns=None: here
    await service.start()
    ...
    await service.stop()        # removes everything it put in the kernel

Kernel pieces, following ``node.kernel``'s layout (every decision in ``inet herdwall``, one
static iptables rule per queue):

- a base chain ``traceback`` in ``inet herdwall`` on the forward hook at priority -159, just
  after the table's own chains (-160) and before iptables' mangle (-150), with one rule:
  IPv4 and no herdwall mark yet -> mark ``QUEUE_TRACE``;
- ``iptables -t mangle -A FORWARD -m mark --mark QUEUE_TRACE/MASK -j NFQUEUE --queue-num
  Q_TRACE --queue-bypass``: a stopped router forwards unlogged rather than blackholing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from typing import Any

from node.kernel.marks import MASK, Q_TRACE, QUEUE_TRACE
from node.kernel.nfqueue import Handle, QueueAdapter
from node.kernel.nft import FAMILY, TABLE, NftTable, mark_is, meta, set_mark
from node.kernel.queue_rules import QueueRules
from node.traceback.core import RouterCore

log = logging.getLogger(__name__)

CHAIN = "traceback"
CHAIN_PRIORITY = -159


def interface_names(netns: str | None) -> dict[int, str]:
    def names() -> dict[int, str]:
        return {i: n for i, n in socket.if_nameindex()}

    if netns is None:
        return names()
    from node.testbed.netns import Namespace

    return Namespace.attach(netns).call(names)


class RouterService:
    def __init__(self, core: RouterCore, *, netns: str | None, queue_num: int = Q_TRACE,
                 mark: int = QUEUE_TRACE, tick_s: float | None = None) -> None:
        if mark & ~MASK or not mark:
            raise ValueError("the queue mark must lie within herdwall's mark bits")
        self.core = core
        self.netns = netns
        self.queue_num = queue_num
        self.mark = mark
        self.tick_s = tick_s if tick_s is not None else min(core.config.bloom.slice_s, 1.0)
        self._names: dict[int, str] = {}
        self._queue: QueueAdapter | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._nft: NftTable | None = None
        self._made_table = False
        self._rules: QueueRules | None = None

    # -- life cycle

    async def start(self) -> RouterService:
        self._names = interface_names(self.netns)
        try:
            self._install()
            self._queue = QueueAdapter(self.queue_num, self._on_packet, netns=self.netns)
            self._queue.start()
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._queue is not None:
            self._queue.close()
            self._queue = None
        self._uninstall()

    async def __aenter__(self) -> RouterService:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def queue(self) -> QueueAdapter | None:
        return self._queue

    # -- kernel

    def _chain(self) -> dict[str, Any]:
        return {"family": FAMILY, "table": TABLE, "name": CHAIN}

    def _install(self) -> None:
        nft = self._nft = NftTable(self.netns)
        self._made_table = nft.ensure()
        nft.apply([
            {"add": {"chain": {**self._chain(), "type": "filter", "hook": "forward",
                               "prio": CHAIN_PRIORITY, "policy": "accept"}}},
            {"flush": {"chain": self._chain()}},
            {"add": {"rule": {"family": FAMILY, "table": TABLE, "chain": CHAIN,
                              "comment": "traceback: forwarded IPv4 to the router role",
                              "expr": [{"match": {"op": "==", "left": meta("nfproto"),
                                                  "right": "ipv4"}},
                                       mark_is(0), set_mark(self.mark)]}}},
        ])
        self._rules = QueueRules(netns=self.netns, queues={self.mark: self.queue_num},
                                 chains=("FORWARD",), tools=("iptables",))
        self._rules.install()

    def _uninstall(self) -> None:
        if self._rules is not None:
            self._rules.remove()
            self._rules = None
        if self._nft is not None:
            if self._made_table:
                self._nft.teardown()
            else:
                with contextlib.suppress(Exception):
                    self._nft.apply([{"delete": {"chain": self._chain()}}])
            self._nft = None

    # -- packets

    def _on_packet(self, payload: bytes, handle: Handle) -> None:
        names = self._names
        in_link = names.get(handle.indev) or self._rename(handle.indev)
        out_link = names.get(handle.outdev) or self._rename(handle.outdev)
        handle.accept(payload=self.core.forward(payload, in_link, out_link, time.time()))

    def _rename(self, index: int) -> str:
        # An interface that appeared after start: look the names up again once.
        names = interface_names(self.netns)
        names.setdefault(index, f"if{index}")  # unknown for good: do not look again
        self._names = names
        return names[index]

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.core.tick(time.time())
            except Exception:  # a bug in a tick must not stop the router
                log.exception("traceback tick failed")
