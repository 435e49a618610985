"""The overlay as a daemon component: join through the configured bootstrap peers, verify
received alerts through the node's pipeline (its sandbox pool), publish the node's own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node.daemon.components import PeerInfo
from node.kernel.marks import PASS
from overlay.dht import DhtConfig
from overlay.node import Overlay, OverlayConfig

if TYPE_CHECKING:
    from node.daemon.node import Node


class OverlayComponent:
    name = "overlay"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.overlay: Overlay | None = None

    async def start(self) -> None:
        node, cfg = self.node, self.node.config.overlay
        self.overlay = Overlay(node.key, cfg.bind, list(cfg.bootstrap),
                               verify_body=node.pipeline.overlay_verify_body,
                               on_alert=node.pipeline.overlay_on_alert,
                               on_ban=lambda ip, s: node.bus.emit("overlay.ban", address=ip,
                                                                  seconds=s),
                               state_dir=node.config.state_dir,
                               # Its own sockets carry PASS: never queued or throttled here.
                               config=OverlayConfig(dht=DhtConfig(socket_mark=PASS)))
        await self.overlay.start()
        node.set_broadcast(self.overlay.publish)
        node.set_handoff(self.overlay.handed_over)
        node.set_peers(self._peers)

    async def stop(self) -> None:
        self.node.set_broadcast(None)
        self.node.set_handoff(None)
        if self.overlay is not None:
            await self.overlay.stop()

    def _peers(self) -> list[PeerInfo]:
        if self.overlay is None:
            return []
        return [PeerInfo(p.node_id.hex(), p.addr[0], p.addr[1]) for p in self.overlay.peers()]

    def status(self) -> dict[str, Any]:
        # The overlay's counters (datagrams, fetches, acknowledgement timeouts, drops, bans):
        # what an operator looks at when alerts arrive late or not at all.
        stats = self.overlay.stats() if self.overlay is not None else {}
        return {"peers": len(self._peers()), "stats": stats}
