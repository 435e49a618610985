"""How the stack, the throttle and the overlay plug into the daemon.

The daemon (``node.daemon.node.Node``) owns the config, key, store, event bus, filters and the
alert pipeline. Everything that touches packets or peers is a **component**: an object with
``name`` and two coroutines, ``start()`` and ``stop()``, built by a factory that gets the
``Node`` and may use its public attributes:

==========================  =================================================================
``node.config``             the validated ``Config``
``node.key``                the node's ``NodeKey``
``node.images``             the protected ``ServiceImage`` list
``node.bus``                ``EventBus``: ``emit(type, **fields)``, ``count(name)``
``node.nft``                ``node.kernel.nft.NftTable`` (table ensured) or None (kernel off)
``node.filters.userspace``  ``filters.userspace.UserspaceFilters`` the stack's queue path checks
``node.pipeline``           ``submit_messages(service, messages, raw_packets, flow=None) -> str``,
                            ``service_for(proto, port) -> str | None``,
                            ``on_overlay_alert(envelope_bytes, from_peer) -> Decision``,
                            ``mark_forwarded(alert_id)``,
                            ``overlay_verify_body(envelope_bytes)`` /
                            ``overlay_on_alert(envelope, alert)`` (``overlay.Overlay``'s
                            ``verify_body=`` and ``on_alert=``)
``node.set_broadcast(fn)``  ``fn(envelope_bytes)`` (may be async): publish our own alerts
``node.set_handoff(fn)``    ``Overlay.handed_over``: a verified alert's own filter and rows wait
                            for the fetches it invited (``overlay.serve_first_ms``)
``node.set_peers(fn)``      ``fn() -> iterable of PeerInfo`` (live overlay contacts)
``node.set_throttle(t)``    a ``ThrottleHooks`` for status / clear / quarantine
``node.host_flagged(host, detail)``  coroutine: the throttle flagged a host as infected;
                            records it, emits ``throttle.flagged``, quarantines by config
``node.host_cleared(host)`` coroutine: a flag was cleared (by the throttle itself)
==========================  =================================================================

Settings for them are in ``node.config``: ``overlay`` (enabled, bind, bootstrap,
serve_first_ms), ``kernel`` (enabled, fail_open, queue_max_len), ``throttle`` (enabled,
working_set_size, release_rate, threshold, allowlist, quarantine_infected),
``detector.enabled``, ``services``.

The overlay, for instance, plugs in like this (``overlay.Overlay``'s API as it is)::

    class OverlayComponent:
        name = "overlay"

        def __init__(self, node: Node) -> None:
            c, p = node.config.overlay, node.pipeline
            self.node = node
            self.overlay = Overlay(node.key, bind=c.bind, bootstrap=c.bootstrap,
                                   verify_body=p.overlay_verify_body,
                                   on_alert=p.overlay_on_alert,
                                   state_dir=node.config.state_dir)

        async def start(self) -> None:
            await self.overlay.start()
            self.node.set_broadcast(self.overlay.publish)  # our own detections go out here
            self.node.set_handoff(self.overlay.handed_over)
            self.node.set_peers(self.overlay.peers)         # overlay.Peer objects are fine

        async def stop(self) -> None:
            await self.overlay.stop()

and the stack hands what a protected service receives to
``node.pipeline.submit_messages(node.pipeline.service_for(proto, dport), messages,
raw_packets)`` and checks ``node.filters.userspace.check(proto, dport, data)`` on the queue
path; the throttle calls ``await node.host_flagged(host, detail)`` on a ``Flagged`` event.

Components start in list order after the store, the control socket, the kernel table, the
filters and the pools are up, and stop in reverse order before them. A component whose
``start()`` raises is reported (``component.error`` event, ``status``) and the node runs on
without it: a node that lost its throttle still verifies alerts and installs filters.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .node import Node


@runtime_checkable
class Component(Protocol):
    name: str

    async def start(self) -> None: ...
    async def stop(self) -> None: ...


@runtime_checkable
class HasStatus(Protocol):
    """Optional: a component with ``status()`` has it shown under ``components`` in
    ``herdwall node status --json`` and the monitor."""

    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class PeerInfo:
    node_id: str  # hex
    host: str
    port: int


class ThrottleHooks(Protocol):
    """What the daemon asks of the throttle (through the control socket's ``throttle`` and
    ``throttle.clear`` commands and on flags).

    ``throttle_status()`` returns::

        {"sources": [{"host": "10.77.0.5", "working_set": ["10.77.0.9", ...],
                      "queue": 3, "flagged": False}, ...],
         "delayed": 3,                 # attempts waiting in all delay queues
         "flagged": ["10.77.0.7"],     # hosts whose new flows are blocked
         "allowlist": ["10.77.0.0/24"]}

    ``clear(host)`` unblocks a flagged host (may be async; raises ValueError for a host that
    is not flagged); ``quarantine(host)`` blocks all of its outgoing traffic but the node's
    own (called when ``throttle.quarantine_infected`` is set)."""

    def throttle_status(self) -> dict[str, Any]: ...
    def clear(self, host: str) -> Awaitable[Any] | Any: ...
    def quarantine(self, host: str) -> Awaitable[Any] | Any: ...


ComponentFactory = Callable[["Node"], Iterable[Component]]


def build_components(node: Node) -> list[Component]:
    """The components of a real node, in start order (``node.components.build``)."""
    from node.components import build

    return build(node)
