"""The user-level network stack (sans-I/O): packet buffers, parsers and builders, connection
tracking, TCP reassembly the way the receiving Linux host does it, and their composition
``Stack.handle(packet, now) -> list[Event]``."""

from node.stack.conntrack import ConnTrack, Flow, TcpHalf, TcpState, Timeouts
from node.stack.events import Drop, Event, FlowClosed, FlowEstablished, FlowOpened, MessageIn
from node.stack.packet import PacketError, TcpOptions
from node.stack.pool import Buffer, BufferPool
from node.stack.reassembly import Reassembler
from node.stack.stack import Stack, StackConfig

__all__ = [
    "Buffer",
    "BufferPool",
    "ConnTrack",
    "Drop",
    "Event",
    "Flow",
    "FlowClosed",
    "FlowEstablished",
    "FlowOpened",
    "MessageIn",
    "PacketError",
    "Reassembler",
    "Stack",
    "StackConfig",
    "TcpHalf",
    "TcpOptions",
    "TcpState",
    "Timeouts",
]
