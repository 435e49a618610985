"""Alert bodies over TCP: a tiny server and client on raw non-blocking sockets and the event
loop's reader/writer callbacks.

A fetch is one connection, one 38-byte request, one reply, and every node makes one per alert:
with asyncio transports and protocols a fetch cost ~575 µs of CPU (both ends, loopback), most
of it in transport machinery (and, oddly, in ``socket.family`` enum conversions inside
``create_connection``); on bare sockets it costs a fraction of that, which matters when a
thousand nodes share one process.

The server asks ``admit(ip)`` the moment a connection is accepted, before reading a byte, so a
peer over its fetch bucket costs one accept and a close. The request must arrive whole within
``timeout`` and be exactly ``FETCH_REQUEST_LEN`` bytes; the reply is written and the connection
closed. The client reads a 5-byte head and at most ``max_body`` bytes, within ``timeout`` from
connect to last byte, and gets None for anything else (refused, reset, slow, oversized,
malformed): to the broadcast core a failed fetch is just a failed fetch, though it learns
whether the peer was to blame (``wire.Fault``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Callable

from overlay import wire
from overlay.dht import set_mark
from overlay.wire import Fault

log = logging.getLogger(__name__)

Addr = tuple[str, int]
_WOULD_BLOCK = (BlockingIOError, InterruptedError)


class _Conn:
    """One accepted connection: read the request, write the reply, close."""

    __slots__ = ("buf", "loop", "out", "peer_ip", "server", "sock", "timer")

    def __init__(self, server: FetchServer, sock: socket.socket, peer_ip: str) -> None:
        self.server = server
        self.sock = sock
        self.peer_ip = peer_ip
        self.buf = b""
        self.out = b""
        self.loop = server.loop
        assert self.loop is not None
        self.timer = self.loop.call_later(server.timeout, self.close)
        self.loop.add_reader(sock.fileno(), self.readable)

    def readable(self) -> None:
        try:
            data = self.sock.recv(wire.FETCH_REQUEST_LEN + 1)
        except _WOULD_BLOCK:
            return
        except OSError:
            self.close()
            return
        if not data:
            self.close()
            return
        self.buf += data
        if len(self.buf) < wire.FETCH_REQUEST_LEN:
            return
        self.loop.remove_reader(self.sock.fileno())
        try:
            reply = (self.server.serve(self.peer_ip, self.buf)
                     if len(self.buf) == wire.FETCH_REQUEST_LEN else None)
        except Exception:
            log.debug("fetch serve failed", exc_info=True)
            reply = None
        if reply is None:
            self.close()
            return
        self.out = reply
        self.writable()

    def writable(self) -> None:
        try:
            sent = self.sock.send(self.out)
        except _WOULD_BLOCK:
            sent = 0
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if self.out:
            self.loop.add_writer(self.sock.fileno(), self.writable)
            return
        self.close()

    def close(self) -> None:
        self.timer.cancel()
        with contextlib.suppress(Exception):
            fd = self.sock.fileno()
            if fd >= 0:
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
        self.sock.close()
        self.server.conns.discard(self)


class FetchServer:
    def __init__(self, admit: Callable[[str], bool], serve: Callable[[str, bytes], bytes | None],
                 timeout: float = 2.0, backlog: int = 512, max_conns: int = 256,
                 mark: int | None = None) -> None:
        self.mark = mark
        self.admit = admit
        self.serve = serve
        self.timeout = timeout
        self.backlog = backlog
        self.max_conns = max_conns
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.conns: set[_Conn] = set()

    async def start(self, host: str, port: int) -> None:
        self.loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        try:
            set_mark(sock, self.mark)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.sock = sock
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        assert self.sock is not None
        for _ in range(64):  # drain a burst, but give the loop back now and then
            try:
                conn, peer = self.sock.accept()
            except _WOULD_BLOCK:
                return
            except OSError:
                # Out of file descriptors (or memory): the listening socket stays readable, so
                # stop listening for a moment instead of spinning on it.
                self._pause()
                return
            conn.setblocking(False)
            try:
                ok = len(self.conns) < self.max_conns and self.admit(peer[0])
            except Exception:
                ok = False
            if not ok:
                # Before reading a byte: an RST, so the peer does not wait for a reply.
                with contextlib.suppress(OSError):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    b"\x01\x00\x00\x00\x00\x00\x00\x00")
                conn.close()
                continue
            self.conns.add(_Conn(self, conn, peer[0]))

    def _pause(self, seconds: float = 0.2) -> None:
        if self.sock is None or self.loop is None:
            return
        self.loop.remove_reader(self.sock.fileno())

        def resume() -> None:
            if self.sock is not None and self.loop is not None:
                self.loop.add_reader(self.sock.fileno(), self._accept)
        self.loop.call_later(seconds, resume)

    async def close(self) -> None:
        if self.sock is not None and self.loop is not None:
            with contextlib.suppress(Exception):
                self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        for conn in list(self.conns):
            conn.close()


class _Fetch:
    """One outgoing fetch as loop callbacks; resolves ``done`` with (body, fault)."""

    __slots__ = ("buf", "done", "loop", "max_body", "need", "request", "sock", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, request: bytes,
                 max_body: int, timeout: float) -> None:
        self.loop = loop
        self.sock = sock
        self.request = request
        self.max_body = max_body
        self.buf = bytearray()
        self.need: int | None = None
        self.done: asyncio.Future[tuple[bytes | None, Fault]] = loop.create_future()
        self.timer = loop.call_later(timeout, self.finish, None, Fault.NONE)

    def connected(self) -> None:
        self.loop.remove_writer(self.sock.fileno())
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            # Refused: nobody listens where the announcement came from.
            self.finish(None, Fault.REFUSED if err == errno.ECONNREFUSED else Fault.NONE)
            return
        try:
            self.sock.send(self.request)  # 38 bytes into an empty buffer: never partial
        except OSError:
            self.finish(None, Fault.NONE)
            return
        self.loop.add_reader(self.sock.fileno(), self.readable)

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except _WOULD_BLOCK:
            return
        except OSError:
            self.finish(None, Fault.NONE)
            return
        if not data:
            self.finish(None, Fault.NONE)  # closed early: rate-limited or slow, not proven lying
            return
        self.buf += data
        try:
            if self.need is None:
                if len(self.buf) < wire.FETCH_REPLY_HEAD:
                    return
                length = wire.decode_fetch_reply_head(bytes(self.buf[:wire.FETCH_REPLY_HEAD]),
                                                      self.max_body)
                if length is None:
                    self.finish(None, Fault.LIED)  # "not here", for an id it announced
                    return
                self.need = wire.FETCH_REPLY_HEAD + length
            if len(self.buf) > self.need:
                self.finish(None, Fault.LIED)  # trailing bytes: not a reply we accept
            elif len(self.buf) == self.need:
                self.finish(bytes(self.buf[wire.FETCH_REPLY_HEAD:]), Fault.NONE)
        except wire.WireError:
            self.finish(None, Fault.LIED)

    def finish(self, body: bytes | None, fault: Fault) -> None:
        self.timer.cancel()
        with contextlib.suppress(Exception):
            fd = self.sock.fileno()
            if fd >= 0:
                self.loop.remove_reader(fd)
                self.loop.remove_writer(fd)
        self.sock.close()
        if not self.done.done():
            self.done.set_result((body, fault))


async def fetch(addr: Addr, alert_id: bytes, my_port: int, *, local_ip: str | None,
                max_body: int, timeout: float = 2.0,
                mark: int | None = None) -> tuple[bytes | None, Fault]:
    """``(body, fault)``: the envelope bytes ``addr`` serves for ``alert_id``, or None for any
    failure, and whether the failure was the peer's doing (``Fault.REFUSED``: nobody listens
    where it announced from; ``Fault.LIED``: "not here", a malformed reply) rather than the
    network's (``Fault.NONE``)."""
    loop = asyncio.get_running_loop()
    request = wire.encode_fetch_request(alert_id, my_port)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET,
                             socket.SOCK_STREAM)
    except OSError:  # out of file descriptors, say: a failed fetch, nobody's fault
        return None, Fault.NONE
    sock.setblocking(False)
    try:
        set_mark(sock, mark)
        if local_ip:
            # Our own address, so the server sees the IP it knows us by (on a host with many
            # addresses, or on loopback, the kernel would otherwise pick another).
            sock.bind((local_ip, 0))
        err = sock.connect_ex(addr)
    except OSError as exc:
        sock.close()
        return None, Fault.REFUSED if exc.errno == errno.ECONNREFUSED else Fault.NONE
    if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
        sock.close()
        return None, Fault.REFUSED if err == errno.ECONNREFUSED else Fault.NONE
    job = _Fetch(loop, sock, request, max_body, timeout)
    loop.add_writer(sock.fileno(), job.connected)
    try:
        return await job.done
    finally:
        if not job.done.done():  # cancelled
            job.finish(None, Fault.NONE)
