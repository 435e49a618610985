"""The traceback router role as a daemon component (``[traceback] router = true``).

A node that forwards traffic between a testbed's router namespaces logs a digest of, or
marks, every IPv4 packet it forwards (``node.traceback.router.RouterService`` on NFQUEUE
``Q_TRACE``, its chain in the node's ``inet herdwall`` table) and answers traceback queries
from overlay peers on the node's own overlay (``node.traceback.rpc.QueryService``): the
victim's node walks upstream asking routers by their overlay address, each answer signed with
the router's node key.

Safety: it starts only inside a testbed namespace (``hw-*``), never in a machine's own; it
needs the overlay (to be asked) and the kernel parts (to see forwarded packets). Forwarded
packets another herdwall part has already queued (the throttle's) are not logged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.testbed.netns import PREFIX
from node.traceback.config import ConfigError, RouterConfig
from node.traceback.core import RouterCore
from node.traceback.router import RouterService
from node.traceback.rpc import QueryService

if TYPE_CHECKING:
    from node.daemon.config import TracebackConfig
    from node.daemon.node import Node

    from .overlay import OverlayComponent

NETNS_DIR = Path("/var/run/netns")


def testbed_namespace() -> str | None:
    """The name of the testbed namespace (``hw-*``) this thread runs in, or None."""
    me = os.stat("/proc/thread-self/ns/net")
    try:
        names = sorted(p for p in NETNS_DIR.iterdir() if p.name.startswith(PREFIX))
    except OSError:
        return None
    for p in names:
        try:
            st = p.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
            return p.name
    return None


def router_config(tb: TracebackConfig) -> RouterConfig:
    """The router role's config from the node config's ``[traceback]`` section."""
    return RouterConfig.from_dict({
        "router_id": tb.router_id, "links": list(tb.links),
        "bloom": {"fp_rate": tb.fp_rate, "slice_s": tb.slice_s, "max_bytes": tb.max_bytes},
        "queriers": list(tb.queriers) or None})


class TracebackComponent:
    name = "traceback"

    def __init__(self, node: Node, overlay: OverlayComponent | None) -> None:
        self.node = node
        self._overlay = overlay
        self.service: RouterService | None = None
        self.queries: QueryService | None = None
        self.netns: str | None = None

    async def start(self) -> None:
        cfg = self.node.config
        overlay = self._overlay.overlay if self._overlay is not None else None
        if overlay is None or not cfg.kernel.enabled:
            raise RuntimeError("the traceback router role needs overlay.enabled and "
                               "kernel.enabled")
        self.netns = testbed_namespace()
        if self.netns is None:
            raise RuntimeError(f"the traceback router role runs only inside a testbed router "
                               f"namespace ({PREFIX}*), not in this one")
        try:
            rc = router_config(cfg.traceback)
        except ConfigError as e:
            raise RuntimeError(f"[traceback]: {e}") from None
        core = RouterCore(rc, self.node.key)
        # netns=None: the daemon already runs inside the router's namespace.
        self.service = await RouterService(core, netns=None).start()
        self.queries = QueryService(overlay, core)
        self.node.bus.emit("traceback.router", router_id=rc.router_id, links=len(rc.links),
                           netns=self.netns)

    async def stop(self) -> None:
        if self.queries is not None:
            self.queries.close()
        if self.service is not None:
            await self.service.stop()
            self.service = None

    def status(self) -> dict[str, Any]:
        if self.service is None:
            return {"running": False}
        core = self.service.core
        st, bs = core.stats, core.store.stats
        return {"running": True, "router_id": core.config.router_id, "netns": self.netns,
                "forwarded": st.forwarded, "logged": st.logged, "marked": st.marked,
                "cleared": st.cleared, "queries": st.queries,
                "queries_refused": st.queries_refused, "digest_bytes": bs.bytes_now}
