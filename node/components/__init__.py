"""The daemon's packet and peer components (see ``node.daemon.components``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.daemon.components import Component
    from node.daemon.node import Node


def build(node: Node) -> list[Component]:
    """A real node's components in start order: the overlay first (alerts can arrive while the
    kernel parts come up), then the throttle, the stack, the takeover and the traceback router
    role, each as the config enables it."""
    out: list[Component] = []
    cfg = node.config
    overlay = None
    if cfg.overlay.enabled:
        from .overlay import OverlayComponent

        overlay = OverlayComponent(node)
        out.append(overlay)
    if cfg.kernel.enabled and cfg.throttle.enabled:
        from .throttle import ThrottleComponent

        out.append(ThrottleComponent(node))
    if cfg.kernel.enabled and node.images:
        from .stack import StackComponent

        out.append(StackComponent(node))
    if cfg.kernel.enabled and cfg.filters.tcp_action == "takeover":
        from .takeover import TakeoverComponent

        out.append(TakeoverComponent(node))
    if cfg.traceback.router:
        from .traceback import TracebackComponent

        # Without the overlay or the kernel parts it refuses to start (reported, not fatal).
        out.append(TracebackComponent(node, overlay))
    return out
