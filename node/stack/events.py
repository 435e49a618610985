"""What ``Stack.handle`` reports. Plain slot dataclasses (no behaviour) so adapters, the
detector and tests can match on them."""

from __future__ import annotations

from dataclasses import dataclass

from sca.alert import Message


@dataclass(slots=True)
class FlowOpened:
    """A new flow: ``src``:``sport`` is the originator (the client), addresses are raw bytes.
    ``picked_up`` if it was first seen mid-stream (no SYN)."""

    flow_id: int
    proto: int
    src: bytes
    sport: int
    dst: bytes
    dport: int
    picked_up: bool = False


@dataclass(slots=True)
class FlowEstablished:
    """The TCP three-way handshake completed."""

    flow_id: int


@dataclass(slots=True)
class FlowClosed:
    """The flow ended: ``reason`` is ``"fin"``, ``"rst"``, ``"timeout"`` or ``"evicted"``."""

    flow_id: int
    reason: str


@dataclass(slots=True)
class MessageIn:
    """Bytes that a protected service receives, in the order its kernel delivers them.

    ``message`` is an ``sca.alert.Message``: for TCP a chunk of the stream with
    ``connection == flow_id`` (chunks of one flow concatenate to exactly what the service's
    socket reads), for UDP one datagram with ``connection is None``. ``seq`` is the TCP sequence
    number of the chunk's first byte (0 for UDP)."""

    flow_id: int
    proto: int
    dport: int
    message: Message
    seq: int = 0


@dataclass(slots=True)
class Drop:
    """Advice for an inline adapter: drop this packet. Malformed packets, packets the stack
    cannot follow (reassembly bounds, beyond the receive window, PAWS) and internal errors. The
    receiving kernel drops almost all of these itself; dropping the rest keeps the stack's view
    and the receiver's the same (the sender retransmits)."""

    reason: str
    flow_id: int | None = None


Event = FlowOpened | FlowEstablished | FlowClosed | MessageIn | Drop
