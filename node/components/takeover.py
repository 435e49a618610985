"""Connection takeover as a daemon component (``[filters] tcp_action = "takeover"``).

With that action a TCP filter does not reset the flows it matches: its rules
(``node.takeover.rules.compile_takeover``, installed by the filter table) send its port's
packets to the takeover queue, where a ``TakeoverQueue`` tracks every flow from its handshake,
checks each new in-order chunk of a client's stream against the node's user-space filters (all
TCP filters are, under this action), and at the first match hands the flow to the
``TakeoverEngine``: the trigger packet never reaches the server, the connection goes on through
a user-level endpoint pair with the configured policy (``[takeover] policy``). IPv6 flows are
checked the same way but not taken over: a match is dropped and the flow's later client data
with it.

Each takeover is a ``takeover.started`` event (flow, filter, policy) and each finished one a
``takeover.finished`` (bytes removed, inserted, how it ended); ``status()`` counts them for
``herdwall node status --json`` and the monitor.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from node.kernel.queue_rules import QueueRules
from node.takeover import rules
from node.takeover.adapter import TakeoverQueue, Trigger, addr_text, check_filters
from node.takeover.engine import TakeoverEngine
from node.takeover.policy import Policy, make_policy
from node.takeover.proxy import Proxy

if TYPE_CHECKING:
    from node.daemon.node import Node


def _flow_text(client: tuple[str, int], server: tuple[str, int]) -> str:
    return f"{client[0]}:{client[1]} -> {server[0]}:{server[1]}"


class TakeoverComponent:
    name = "takeover"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.engine: TakeoverEngine | None = None
        self.queue: TakeoverQueue | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        node = self.node
        if node.nft is None:
            raise RuntimeError("the kernel is disabled in the config ([kernel] enabled = false)")
        kernel = node.config.kernel
        # A libnftables context of its own (the filter manager's lives on its thread); the
        # chains may exist already (a filter installed at reconcile brings them): idempotent.
        nft = rules.NftText()
        nft.apply(rules.setup())
        QueueRules(fail_open=kernel.fail_open,
                   queues=rules.queues()).install()
        self._loop = asyncio.get_running_loop()
        self.engine = TakeoverEngine(policy=self._policy, nft=nft, on_done=self._done)
        # Read by a thread of its own: a trigger reaches the engine sooner (the callbacks below
        # run on that thread).
        self.queue = TakeoverQueue(self.engine, filters=node.filters.userspace,
                                   fail_open=kernel.fail_open, max_len=kernel.queue_max_len,
                                   on_trigger=self._triggered, thread=True)
        self.queue.start()

    async def stop(self) -> None:
        if self.queue is not None:
            self.queue.close()  # the engine's flows leave takeover_flows
        # The chains and the queue rules stay, as the stack's do: with no reader the rules fail
        # open (or closed, as configured), and `herdwall node teardown` removes the table.

    def _policy(self, t: Trigger) -> Policy:
        cfg = self.node.config.takeover
        filters, port = self.node.filters.userspace, t.server[1]

        # Scrub also drops a later chunk that a filter which may hold anywhere flags on its own
        # (a specific filter's offset counts from the connection's start, which that is not).
        def matcher(data: bytes) -> bool:
            return check_filters(filters, port, data, anywhere=True) is not None

        return make_policy(cfg.policy, reply=cfg.reply.encode("utf-8", "surrogatepass"),
                           matcher=matcher)

    # The events are emitted on the loop (these run on the queue's reader thread), from its next
    # turn: an event is a log write.
    def _triggered(self, t: Trigger) -> None:
        hit = t.hit
        fields = {"flow": _flow_text(t.client, t.server),
                  "filter_id": getattr(hit, "filter_id", None),
                  "service": getattr(hit, "service_name", None),
                  "policy": self.node.config.takeover.policy, "bytes": len(t.data)}
        self._emit("takeover.started", fields)

    def _done(self, proxy: Proxy) -> None:
        fields = {"flow": _flow_text(addr_text(*proxy.client), addr_text(*proxy.server)),
                  "removed": proxy.c2s_removed, "inserted": proxy.s2c_inserted,
                  "expired": proxy.expired,
                  "seconds": round(proxy.last_activity - proxy.started, 3)}
        self._emit("takeover.finished", fields)

    def _emit(self, kind: str, fields: dict[str, Any]) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self.node.bus.emit(kind, **fields))

    def status(self) -> dict[str, Any]:
        e, q = self.engine, self.queue
        if e is None or q is None:
            return {"taken_over": 0, "active": 0}
        return {"taken_over": e.stats["taken_over"], "active": len(e.owned()),
                "finished": e.stats["finished"], "policy": self.node.config.takeover.policy,
                "watched_ports": sorted(q.stack.protected_tcp),
                "trigger_errors": q.stats["trigger_errors"],
                "send_errors": e.stats["send_errors"]}
