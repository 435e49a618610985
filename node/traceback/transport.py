"""The traceback query over plain UDP: a server for routers, an ``ask`` for the victim.

This is the stand-in until the overlay carries the RPC (see the package docstring): the
messages are already signed end to end (``node.traceback.wire``), so the transport only has to
move datagrams. A query is under 200 bytes and an answer a few hundred, one datagram each.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

from node.traceback.config import RouterRef
from node.traceback.core import RouterCore
from node.traceback.wire import MAX_ANSWER_BYTES, MAX_QUERY_BYTES


def _in_netns(netns: str | None, make: Callable[[], socket.socket]) -> socket.socket:
    if netns is None:
        return make()
    from node.testbed.netns import Namespace

    with Namespace.attach(netns).enter():
        return make()


class QueryServer(asyncio.DatagramProtocol):
    """Answers queries with ``core.answer``; oversized datagrams are dropped unread."""

    def __init__(self, core: RouterCore, clock: Callable[[], float] = time.time) -> None:
        self.core = core
        self.clock = clock
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > MAX_QUERY_BYTES or self.transport is None:
            return
        reply = self.core.answer(data, addr[0], self.clock())
        if reply is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP errors: nothing to do
        pass

    @classmethod
    async def start(cls, core: RouterCore, bind: tuple[str, int] | None = None, *,
                    netns: str | None = None) -> QueryServer:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(bind or core.config.listen)
            s.setblocking(False)
            return s

        sock = _in_netns(netns, make)
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_datagram_endpoint(lambda: cls(core), sock=sock)
        return proto

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class UdpAsker:
    """``await asker(ref, query_bytes)``: the answer bytes, or None after ``tries`` sends
    without one, the wait doubling from ``timeout`` each time (a busy router or a lost
    datagram costs one short wait; a router that is gone costs about 2^tries timeouts). Each
    ask uses its own connected socket, so only datagrams from the router asked are read; the
    signed nonce then ties the answer to the query (a retry sends the same bytes, and the router
    answers a retry with the same answer)."""

    def __init__(self, *, timeout: float = 0.25, tries: int = 4,
                 netns: str | None = None) -> None:
        self.timeout = timeout
        self.tries = tries
        self.netns = netns
        self.sent = 0

    async def __call__(self, ref: RouterRef, query: bytes) -> bytes | None:
        loop = asyncio.get_running_loop()

        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setblocking(False)
            s.connect(ref.addr)
            return s

        sock = _in_netns(self.netns, make)
        try:
            wait = self.timeout
            for _ in range(self.tries):
                self.sent += 1
                with contextlib.suppress(OSError):  # ICMP unreachable from an earlier try
                    sock.send(query)
                try:
                    return await asyncio.wait_for(loop.sock_recv(sock, MAX_ANSWER_BYTES), wait)
                except TimeoutError:
                    wait *= 2
                except OSError:  # refused (nobody listens there yet): wait before the next
                    await asyncio.sleep(wait)
                    wait *= 2
            return None
        finally:
            sock.close()
