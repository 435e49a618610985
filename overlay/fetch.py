"""Alert bodies over TCP: a tiny server and client on asyncio protocols (no streams: a fetch is
one connection, one 38-byte request, one reply, and a node may make a thousand of them).

The server asks ``admit(ip)`` the moment a connection is accepted, before reading a byte, so a
peer over its fetch bucket costs one accept and a close. The request must arrive whole within
``timeout`` and be exactly ``FETCH_REQUEST_LEN`` bytes; the reply is written and the connection
closed. The client reads a 5-byte head and at most ``max_body`` bytes, within ``timeout`` from
connect to last byte, and returns None for anything else (refused, reset, slow, oversized,
malformed): to the broadcast core a failed fetch is just a failed fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable

from overlay import wire

log = logging.getLogger(__name__)

Addr = tuple[str, int]


class _ServeOne(asyncio.Protocol):
    def __init__(self, admit: Callable[[str], bool], serve: Callable[[str, bytes], bytes | None],
                 timeout: float) -> None:
        self._admit = admit
        self.serve = serve
        self._timeout = timeout
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.peer_ip = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        try:
            peer = transport.get_extra_info("peername")
            self.peer_ip = peer[0]
            if not self._admit(self.peer_ip):
                transport.abort()  # type: ignore[attr-defined]
                return
            self.timer = asyncio.get_running_loop().call_later(self._timeout, transport.abort)  # type: ignore[attr-defined]
        except Exception:
            log.debug("fetch accept failed", exc_info=True)
            transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.buf += data
        if len(self.buf) < wire.FETCH_REQUEST_LEN:
            return
        try:
            reply = (self.serve(self.peer_ip, self.buf)
                     if len(self.buf) == wire.FETCH_REQUEST_LEN else None)
        except Exception:
            log.debug("fetch serve failed", exc_info=True)
            reply = None
        if reply is None:
            transport.abort()
            return
        transport.write(reply)
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.transport = None


class _FetchOne(asyncio.Protocol):
    def __init__(self, request: bytes, max_body: int, done: asyncio.Future[bytes | None]) -> None:
        self.request = request
        self.max_body = max_body
        self.done = done
        self.buf = bytearray()
        self.need: int | None = None
        self.transport: asyncio.Transport | None = None
        self.blame = False  # the peer's fault: "not here" or a malformed reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(self.request)  # type: ignore[union-attr]

    def _finish(self, body: bytes | None, blame: bool = False) -> None:
        self.blame = blame
        if not self.done.done():
            self.done.set_result(body)
        if self.transport is not None:
            if body is None:
                self.transport.abort()
            else:
                self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        self.buf += data
        try:
            if self.need is None:
                if len(self.buf) < wire.FETCH_REPLY_HEAD:
                    return
                length = wire.decode_fetch_reply_head(bytes(self.buf[:wire.FETCH_REPLY_HEAD]),
                                                      self.max_body)
                if length is None:
                    self._finish(None, blame=True)
                    return
                self.need = wire.FETCH_REPLY_HEAD + length
            if len(self.buf) > self.need:
                self._finish(None, blame=True)  # trailing bytes: not a reply we accept
            elif len(self.buf) == self.need:
                self._finish(bytes(self.buf[wire.FETCH_REPLY_HEAD:]))
        except wire.WireError:
            self._finish(None, blame=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)
        self.transport = None


class FetchServer:
    def __init__(self, admit: Callable[[str], bool], serve: Callable[[str, bytes], bytes | None],
                 timeout: float = 2.0, backlog: int = 512) -> None:
        self.admit = admit
        self.serve = serve
        self.timeout = timeout
        self.backlog = backlog
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: _ServeOne(self.admit, self.serve, self.timeout), host, port,
            backlog=self.backlog, reuse_address=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)
            self.server = None


async def fetch(addr: Addr, alert_id: bytes, my_port: int, *, local_ip: str | None,
                max_body: int, timeout: float = 2.0) -> tuple[bytes | None, bool]:
    """``(body, blame)``: the envelope bytes ``addr`` serves for ``alert_id``, or None for any
    failure, and whether the failure was the peer's doing (refused connection: nobody listens
    where it announced from; "not here"; a malformed reply) rather than the network's."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[bytes | None] = loop.create_future()
    request = wire.encode_fetch_request(alert_id, my_port)
    transport: asyncio.BaseTransport | None = None
    proto: _FetchOne | None = None

    def make() -> _FetchOne:
        nonlocal proto
        proto = _FetchOne(request, max_body, done)
        return proto

    try:
        async with asyncio.timeout(timeout):
            # Bind to our own address so the server sees the IP it knows us by (on a host with
            # many addresses, or on loopback, the kernel would otherwise pick another).
            family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
            transport, _ = await loop.create_connection(
                make, addr[0], addr[1], family=family,
                local_addr=(local_ip, 0) if local_ip else None)
            body = await done
            return body, body is None and proto is not None and proto.blame
    except ConnectionRefusedError:
        return None, True
    except (OSError, TimeoutError):
        return None, False
    finally:
        if transport is not None and not transport.is_closing():
            transport.abort()  # type: ignore[attr-defined]
