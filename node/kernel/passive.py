"""Passive mode: read a mirror of the traffic (a SPAN port, a tap, or the node's own interface)
from an ``AF_PACKET`` socket into the same ``Stack``. Nothing is held or dropped: ``Drop``
events are only counted, since the packets have gone on already.

Packets are received straight into buffers of a ``BufferPool`` (``recvmsg_into``) and the stack
gets a ``memoryview`` of the buffer, which goes back to the pool once the stack is done: no copy
on the way in. ``PACKET_AUXDATA`` tells per packet whether the kernel has its checksum still to
compute (``TP_STATUS_CSUMNOTREADY``: sent from this host, or a veth peer's offload) or knows it
good (``TP_STATUS_CSUM_VALID``); those are handed over as ``trusted``, every other packet's
checksums are checked in Python.

Limits: IP fragments on a mirror are counted and skipped (no IP reassembly); a mirror that drops
packets leaves holes that reassembly waits for until its bounds are hit.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

from node.stack.events import Drop, Event
from node.stack.pool import BufferPool
from node.stack.stack import Stack

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
SOL_PACKET = 263
PACKET_AUXDATA = 8
TP_STATUS_CSUMNOTREADY = 1 << 3
TP_STATUS_CSUM_VALID = 1 << 7
_AUX = struct.Struct("=IIIHHHH")
BATCH = 64  # packets per wake-up, so a flood cannot starve the loop

OnEvents = Callable[[list[Event]], None]


class PassiveReader:
    def __init__(self, iface: str, stack: Stack, on_events: OnEvents | None = None, *,
                 netns: str | None = None, loop: asyncio.AbstractEventLoop | None = None,
                 pool: BufferPool | None = None) -> None:
        self.iface = iface
        self.stack = stack
        self.on_events = on_events
        self.netns = netns
        self.pool = pool or BufferPool(256, 65536 + 64)
        self._loop = loop
        self._sock: socket.socket | None = None
        self.packets = 0
        self.pool_drops = 0
        self.drop_advice = 0

    def start(self) -> PassiveReader:
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop

        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            s.bind((self.iface, 0))
            s.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
            s.setblocking(False)
            return s

        if self.netns is None:
            self._sock = make()
        else:
            from node.testbed.netns import Namespace

            with Namespace.attach(self.netns).enter():
                self._sock = make()
        loop.add_reader(self._sock.fileno(), self._readable)
        return self

    def close(self) -> None:
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    async def __aenter__(self) -> PassiveReader:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _readable(self) -> None:
        sock = self._sock
        assert sock is not None and self._loop is not None
        for _ in range(BATCH):
            buf = self.pool.acquire()
            if buf is None:  # every buffer busy: read and forget one packet
                self.pool_drops += 1
                try:
                    sock.recv(1)
                except BlockingIOError:
                    return
                continue
            try:
                try:
                    n, anc, _flags, addr = sock.recvmsg_into([buf.data],
                                                             socket.CMSG_SPACE(_AUX.size))
                except BlockingIOError:
                    return
                if addr[1] not in (ETH_P_IP, ETH_P_IPV6):
                    continue
                trusted = False
                for level, kind, data in anc:
                    if level == SOL_PACKET and kind == PACKET_AUXDATA and len(data) >= 4:
                        status = _AUX.unpack_from(data.ljust(_AUX.size, b"\0"))[0]
                        trusted = bool(status & (TP_STATUS_CSUMNOTREADY | TP_STATUS_CSUM_VALID))
                buf.length = n
                self.packets += 1
                events = self.stack.handle(buf.view, self._loop.time(), trusted=trusted)
            finally:
                buf.release()
            if events:
                self.drop_advice += sum(1 for e in events if type(e) is Drop)
                if self.on_events is not None:
                    self.on_events(events)
