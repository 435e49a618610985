"""The user-level stack inline on NFQUEUE.

Two paths per packet, chosen by its protocol and port (a header read, no parse):

- **inline** for ports where a verdict depends on the content (user-space filter checks): the
  packet goes through ``Stack.handle`` first and is dropped if the stack advises it (``Drop``)
  or the ``gate`` says so;
- **verdict first** for the rest (detection replays copies, it never needs to hold a packet):
  the packet is accepted at once and then handed to the stack. The kernel's time per verdict
  grows with the time the reader spends before giving it (measured: 25 µs bare, 63 µs with
  the stack in front), so answering first keeps protected traffic near the bare rate.

The packet bytes the binding hands over are passed to the stack as they are (no copy into a
pool buffer: that would add one); the stack's views point into them and whatever it keeps
(reassembly, messages) it copies. Checksums are left to the kernel (see ``node.stack.stack``),
so the stack runs with ``verify_checksums=False`` unless told otherwise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Container
from typing import Protocol

from node.kernel.marks import Q_STACK
from node.kernel.nfqueue import Handle, QueueAdapter
from node.stack.events import Drop, Event, FlowClosed
from node.stack.packet import URG, clear_urgent, is_cut
from node.stack.stack import Stack

OnEvents = Callable[[list[Event]], None]
OnPacketEvents = Callable[[bytes, list[Event]], None]


class Gate(Protocol):
    def blocks(self, packet: bytes) -> bool:
        """Drop this packet unseen: the stack must not see it either (a blocked connection's
        FIN or RST that the service never gets must not end its flow here)."""

    def __call__(self, packet: bytes, events: list[Event]) -> bool:
        """Drop this packet, given its events?"""


def urgent_at(p: bytes) -> int | None:
    """Where the TCP header of an urgent IPv4/IPv6 segment starts, else None."""
    if len(p) >= 40 and p[0] >> 4 == 4 and p[9] == 6:
        at = (p[0] & 0x0F) * 4
    elif len(p) >= 60 and p[0] >> 4 == 6 and p[6] == 6:
        at = 40
    else:
        return None
    return at if len(p) >= at + 20 and p[at + 13] & URG else None


def dest_port(p: bytes) -> tuple[int, int] | None:
    """(IP protocol, destination port) of an IPv4/IPv6 TCP or UDP packet, or None."""
    if len(p) >= 24 and p[0] >> 4 == 4:
        ihl = (p[0] & 0x0F) * 4
        proto = p[9]
        if proto in (6, 17) and len(p) >= ihl + 4:
            return proto, int.from_bytes(p[ihl + 2:ihl + 4], "big")
    elif len(p) >= 44 and p[0] >> 4 == 6 and p[6] in (6, 17):
        return p[6], int.from_bytes(p[42:44], "big")
    return None


class StackQueue:
    def __init__(self, stack: Stack, on_events: OnEvents | None = None, *,
                 queue_num: int = Q_STACK, netns: str | None = None,
                 loop: asyncio.AbstractEventLoop | None = None, fail_open: bool = True,
                 max_len: int = 1024, gate: Gate | None = None,
                 inline_ports: Container[tuple[int, int]] | None = None,
                 on_packet_events: OnPacketEvents | None = None) -> None:
        """``inline_ports``: (IP protocol, destination port) pairs whose packets get their
        verdict after the stack and the ``gate`` (any container, asked per packet); ``None``
        means every packet (the stack's own ``Drop`` advice then applies to all).
        ``on_packet_events`` also gets the packet's bytes (the detector keeps them)."""
        self.stack = stack
        self.on_events = on_events
        self.on_packet_events = on_packet_events
        self.gate = gate
        self.inline_ports = inline_ports
        self.dropped = 0
        self.cut = 0  # verdict-first packets dropped, cut by the queue's copy range
        self._loop = loop
        self.queue = QueueAdapter(queue_num, self._on_packet, netns=netns, loop=loop,
                                  fail_open=fail_open, max_len=max_len)

    def start(self) -> StackQueue:
        self.queue.start()
        self._loop = self.queue._loop
        return self

    def close(self) -> None:
        self.queue.close()

    async def __aenter__(self) -> StackQueue:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _on_packet(self, payload: bytes, handle: Handle) -> None:
        at = urgent_at(payload)
        if at is not None:
            # Not urgent on the way on: the service keeps every byte the stack (and with it
            # the gate and the detector) sees (``node.stack.packet.clear_urgent``).
            payload = handle.rewrite = clear_urgent(payload, at)
        to = dest_port(payload) if self.inline_ports is not None else None
        inline = self.inline_ports is None or to in self.inline_ports
        if not inline:
            if to is not None and is_cut(payload) and to[1] in (
                    self.stack.protected_tcp if to[0] == 6 else self.stack.protected_udp):
                # To a service, longer than the queue copies (nfqueue.COPY_RANGE): the stack
                # and the detector would see only its start, so the service must not get it
                # either (a TCP peer is told an MSS that fits: nft.clamp_mss). A service's own
                # long replies go on.
                self.cut += 1
                handle.drop()
                return
            handle.accept()
        elif self.gate is not None and self.gate.blocks(payload):
            self.dropped += 1
            handle.drop()
            return
        events = self.stack.handle(payload, self._loop.time())  # type: ignore[union-attr]
        if inline:
            # The gate first, also for a packet the stack drops: it may bring a close.
            gated = self.gate is not None and self.gate(payload, events)
            if gated or any(type(e) is Drop for e in events):
                self.dropped += 1
                handle.drop()
            else:
                handle.accept()
        elif self.gate is not None and events:
            # A flow's close (its end, a timeout, an eviction) comes on whatever packet the
            # stack saw then: the gate's state for the flow goes with it.
            closed = [e for e in events if type(e) is FlowClosed]
            if closed:
                self.gate(payload, closed)
        if events:
            if self.on_events is not None:
                self.on_events(events)
            if self.on_packet_events is not None:
                self.on_packet_events(payload, events)
