"""Passive AF_PACKET mode: a capture of host 0's interface fed into the stack reassembles what
the server received, without touching the traffic."""

from __future__ import annotations

import asyncio

import pytest

from node.kernel.passive import PassiveReader
from node.stack import MessageIn, Stack, StackConfig
from node.stack.pool import BufferPool
from node.testbed import Testbed

pytestmark = pytest.mark.netns


def _roundtrip(tb: Testbed, port: int, data: bytes) -> bytes:
    import socket
    import threading

    ls = tb[0].ns.call(socket.create_server, ("10.77.0.1", port))
    got = bytearray()

    def serve() -> None:
        conn, _ = ls.accept()
        with conn:
            while d := conn.recv(65536):
                got.extend(d)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with tb[1].ns.call(socket.create_connection, ("10.77.0.1", port), 5) as c:
        c.sendall(data)
    t.join(10)
    ls.close()
    return bytes(got)


def test_passive_capture_reassembles_the_stream() -> None:
    stack = Stack(StackConfig(protected_tcp={7000}))  # checksums checked unless trusted
    events: list = []
    data = bytes(range(256)) * 300
    pool = BufferPool(64, 65600)

    async def main(tb: Testbed) -> bytes:
        async with PassiveReader("eth0", stack, events.extend, netns=tb[0].name,
                                 pool=pool) as r:
            got = await asyncio.to_thread(_roundtrip, tb, 7000, data)
            await asyncio.sleep(0.2)
            assert r.packets > 0 and r.pool_drops == 0
        return got

    with Testbed(2, tag="psv") as tb:
        tb.wait_ready()
        got = asyncio.run(main(tb))
    assert got == data
    assert b"".join(e.message.data for e in events if isinstance(e, MessageIn)) == data
    assert stack.stats["malformed"] == 0 and pool.free == len(pool)
