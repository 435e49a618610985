"""The virus throttle as a daemon component: the core on the kernel path (``KernelThrottle``),
its flags reported to the node, and the operator's status / clear / quarantine."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING, Any

from node.kernel import nft as K
from node.throttle.core import ThrottleConfig, ThrottleCore
from node.throttle.events import Cleared, Event, Flagged
from node.throttle.kernel import Allowlist, KernelThrottle

if TYPE_CHECKING:
    from node.daemon.node import Node

QUARANTINE = {4: "quarantine4", 6: "quarantine6"}


def _addr(raw: Any) -> str:
    return str(ipaddress.ip_address(raw)) if isinstance(raw, bytes) else str(raw)


class ThrottleComponent:
    name = "throttle"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.core: ThrottleCore | None = None
        self.kernel: KernelThrottle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        node, cfg = self.node, self.node.config.throttle
        if node.nft is None:
            raise RuntimeError("the kernel is disabled in the config ([kernel] enabled = false)")
        self.core = ThrottleCore(ThrottleConfig(cfg.working_set_size, cfg.release_rate,
                                                cfg.threshold), Allowlist(cfg.allowlist))
        self.kernel = KernelThrottle(self.core, node.nft, on_event=self._on_event,
                                     fail_open=node.config.kernel.fail_open,
                                     max_len=node.config.kernel.queue_max_len)
        self.kernel.install()
        self._install_quarantine()
        self.kernel.start()
        node.set_throttle(self)

    async def stop(self) -> None:
        self.node.set_throttle(None)
        if self.kernel is not None:
            self.kernel.close()
            # A stopped node does not throttle: its part of the table goes (filters stay).
            self.kernel.uninstall()

    def _install_quarantine(self) -> None:
        nft = self.node.nft
        cmds: list[K.Json] = []
        for v, name in QUARANTINE.items():
            addr_type = "ipv4_addr" if v == 4 else "ipv6_addr"
            cmds.append({"add": {"set": {"family": K.FAMILY, "table": K.TABLE, "name": name,
                                         "type": addr_type}}})
        nft.apply(cmds)
        # After the PASS rules (add_rule appends): the node's own traffic still flows.
        for v, name in QUARANTINE.items():
            saddr = {"payload": {"protocol": "ip" if v == 4 else "ip6", "field": "saddr"}}
            for chain in ("output", "forward"):
                nft.add_rule(chain, [K.in_set(saddr, name), K.DROP], comment="quarantine")

    def _on_event(self, e: Event) -> None:
        if type(e) is Flagged:
            coro = self.node.host_flagged(_addr(e.src), f"{e.depth} attempts waiting")
        elif type(e) is Cleared:
            coro = self.node.host_cleared(_addr(e.src))
        else:
            return
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- ThrottleHooks ------------------------------------------------------------------------

    def throttle_status(self) -> dict[str, Any]:
        core = self.core
        if core is None:
            return {"sources": [], "delayed": 0, "flagged": [], "allowlist": []}
        sources = [{"host": _addr(s), "working_set": [_addr(d) for d in core.working_set(s)],
                    "queue": core.queue_depth(s), "flagged": core.is_infected(s)}
                   for s in core.sources()]
        return {"sources": sources, "delayed": sum(s["queue"] for s in sources),
                "flagged": [s["host"] for s in sources if s["flagged"]],
                "allowlist": [str(n) for n in self.kernel.allowlist.nets] if self.kernel else []}

    def clear(self, host: str) -> Any:
        if self.kernel is None or self.core is None:
            raise ValueError("the throttle is not running")
        raw = ipaddress.ip_address(host).packed
        if not self.core.is_infected(raw):
            raise ValueError(f"{host} is not flagged")
        nft = self.node.nft
        v = ipaddress.ip_address(host).version
        if host in self._quarantined():
            nft.apply([nft.element_cmd("delete", QUARANTINE[v], [host])])
        return self.kernel.clear(host)

    def quarantine(self, host: str) -> Any:
        nft = self.node.nft
        v = ipaddress.ip_address(host).version
        nft.apply([nft.element_cmd("add", QUARANTINE[v], [host])])

    def _quarantined(self) -> set[str]:
        nft = self.node.nft
        return {str(e) for name in QUARANTINE.values() for e in nft.list_set(name)}
