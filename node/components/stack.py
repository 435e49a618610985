"""The user-level stack as a daemon component.

Protected services' ports are queued to the stack (``NftTable.protect`` plus the static
NFQUEUE rules). Every packet goes through ``Stack.handle``; ports that have user-space filter
checks get their verdict after the ``FilterGate``, the rest at once (see
``node.kernel.inline``). On a detector node, what each flow delivers to a protected service is
offered to the pipeline for taint replay, with the raw packets that carried it.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from node.filtering import FilterGate
from node.kernel.inline import StackQueue
from node.kernel.queue_rules import QueueRules
from node.stack import Stack, StackConfig
from node.stack.events import Event, FlowClosed, MessageIn
from sca.alert import MAX_MESSAGES, MAX_TOTAL_BYTES, Message

if TYPE_CHECKING:
    from node.daemon.node import Node

class _Flow:
    """A connection's chunks so far, each with the packet that carried it (an alert keeps
    them: traceback needs the raw packets)."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: deque[tuple[Message, bytes]] = deque()
        self.size = 0


class StackComponent:
    name = "stack"

    def __init__(self, node: Node) -> None:
        self.node = node
        self.queue: StackQueue | None = None
        self.rules: QueueRules | None = None
        self.gate = FilterGate(node.filters.userspace)
        self.flows: dict[int, _Flow] = {}
        self.submitted = 0

    async def start(self) -> None:
        node = self.node
        if node.nft is None:
            raise RuntimeError("the kernel is disabled in the config ([kernel] enabled = false)")
        tcp = {i.port for i in node.images if i.proto == "tcp"}
        udp = {i.port for i in node.images if i.proto == "udp"}
        self.rules = QueueRules(fail_open=node.config.kernel.fail_open)
        self.rules.install()
        for image in node.images:
            node.nft.protect(image.proto, image.port)
        stack = Stack(StackConfig(protected_tcp=tcp, protected_udp=udp, verify_checksums=False))
        self.gate.stack = stack
        detect = node.config.detector.enabled
        self.queue = StackQueue(
            stack, gate=self.gate, inline_ports=node.filters.userspace,
            on_packet_events=self._on_packet_events if detect else None,
            fail_open=node.config.kernel.fail_open, max_len=node.config.kernel.queue_max_len)
        self.queue.start()

    async def stop(self) -> None:
        if self.queue is not None:
            self.queue.close()
        # The static queue rules stay: they fail open with no reader (--queue-bypass), and
        # `herdwall node teardown` removes them.

    def status(self) -> dict[str, Any]:
        q = self.queue
        return {"packets": q.stack.packets if q else 0, "dropped": q.dropped if q else 0,
                "filter_hits": self.gate.hits, "flows": len(self.flows),
                "submitted": self.submitted}

    def _on_packet_events(self, payload: bytes, events: list[Event]) -> None:
        for e in events:
            if type(e) is MessageIn:
                self._message(e, payload)
            elif type(e) is FlowClosed:
                self.flows.pop(e.flow_id, None)

    def _message(self, e: MessageIn, payload: bytes) -> None:
        pipeline = self.node.pipeline
        service = pipeline.service_for(e.proto, e.dport)
        if service is None:
            return
        if e.message.connection is None:  # a datagram is a message of its own
            pipeline.submit_messages(service, [e.message], [[payload]])
            self.submitted += 1
            return
        flow = self.flows.get(e.flow_id)
        if flow is None:
            flow = self.flows[e.flow_id] = _Flow()
        flow.chunks.append((Message(e.message.data, 0), bytes(payload)))
        flow.size += len(e.message.data)
        # The replay needs the connection from its start; past the alert's bounds the oldest
        # chunks go (an exploit must fit in an alert anyway).
        while len(flow.chunks) > MAX_MESSAGES or flow.size > MAX_TOTAL_BYTES:
            flow.size -= len(flow.chunks.popleft()[0].data)
        pipeline.submit_messages(service, [m for m, _ in flow.chunks],
                                 [[raw] for _, raw in flow.chunks], flow=e.flow_id)
        self.submitted += 1
