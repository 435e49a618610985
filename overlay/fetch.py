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
connect to last byte (given up at most 50 ms after it), and gets None for anything else
(refused, reset, slow, oversized, malformed): to the broadcast core a failed fetch is just a
failed fetch, though it learns whether the peer was to blame (``wire.Fault``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import logging
import select
import socket
import weakref
from collections.abc import Callable

from overlay import wire
from overlay.dht import set_mark
from overlay.wire import Fault

log = logging.getLogger(__name__)

Addr = tuple[str, int]
_WOULD_BLOCK = (BlockingIOError, InterruptedError)


class _Conn:
    """One accepted connection: read the request, write the reply, close. The request is
    usually there by the time the connection is accepted: it is read at once, and only a
    slow one gets a reader and a timer."""

    __slots__ = ("buf", "loop", "out", "peer_ip", "server", "sock", "timer", "watched")

    def __init__(self, server: FetchServer, sock: socket.socket, peer_ip: str) -> None:
        self.server = server
        self.sock = sock
        self.peer_ip = peer_ip
        self.buf = b""
        self.out = b""
        assert server.loop is not None
        self.loop = server.loop
        self.timer: asyncio.TimerHandle | None = None
        self.watched = False  # a reader or writer is registered for the socket

    def start(self) -> None:
        self.readable()
        if self.sock.fileno() >= 0 and not self.watched:  # still waiting for the request
            self.timer = self.loop.call_later(self.server.timeout, self.close)
            self.loop.add_reader(self.sock.fileno(), self.readable)
            self.watched = True

    def readable(self) -> None:
        try:
            data = self.sock.recv(wire.FETCH_REQUEST_LEN + 1, socket.MSG_DONTWAIT)
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
        if self.watched:
            self.loop.remove_reader(self.sock.fileno())
            self.watched = False
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
            sent = self.sock.send(self.out, socket.MSG_DONTWAIT)
        except _WOULD_BLOCK:
            sent = 0
        except OSError:
            self.close()
            return
        self.out = self.out[sent:]
        if self.out:
            if not self.watched:
                if self.timer is None:
                    self.timer = self.loop.call_later(self.server.timeout, self.close)
                self.loop.add_writer(self.sock.fileno(), self.writable)
                self.watched = True
            return
        self.close()

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watched:
            with contextlib.suppress(Exception):
                fd = self.sock.fileno()
                if fd >= 0:
                    self.loop.remove_reader(fd)
                    self.loop.remove_writer(fd)
            self.watched = False
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
            # Left in blocking mode (one system call less): it is only read and written with
            # MSG_DONTWAIT.
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
            c = _Conn(self, conn, peer[0])
            self.conns.add(c)
            c.start()

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


class _Deadlines:
    """The deadlines of every fetch on one loop, under one timer. A timer per fetch (made,
    pushed onto the loop's heap of timers, cancelled, popped off again: Python comparisons
    all the way) cost more than the rest of a fetch's bookkeeping with a thousand nodes on
    one loop; here a fetch costs a tuple pushed onto a heap, and one timer gives up, at once,
    every fetch past its deadline (each within ``SLACK`` seconds after it). Fetches are held
    by weak references, so that nothing here keeps a loop (each fetch refers to its loop)
    alive: a fetch under way is held by its loop's ``_Poller``."""

    SLACK = 0.05

    __slots__ = ("heap", "seq", "timer")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, weakref.ref[Fetching]]] = []
        self.seq = 0
        self.timer: asyncio.TimerHandle | None = None

    def add(self, loop: asyncio.AbstractEventLoop, deadline: float, job: Fetching) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (deadline, self.seq, weakref.ref(job)))
        if self.timer is None:
            self.timer = loop.call_at(deadline + self.SLACK, self._expire)

    def _expire(self) -> None:
        self.timer = None
        heap = self.heap
        loop = asyncio.get_running_loop()
        now = loop.time()
        # A finished fetch stays here until its deadline (a pop then, not a search now).
        while heap and heap[0][0] <= now:
            job = heapq.heappop(heap)[2]()
            if job is not None and not job.over:
                job.finish(None, Fault.NONE)
        if heap:
            self.timer = loop.call_at(heap[0][0] + self.SLACK, self._expire)


_deadlines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Deadlines] = (
    weakref.WeakKeyDictionary())


def _deadlines_of(loop: asyncio.AbstractEventLoop) -> _Deadlines:
    found = _deadlines.get(loop)
    if found is None:
        found = _deadlines[loop] = _Deadlines()
    return found


class _Poller:
    """The sockets of every fetch on one loop in one epoll set of their own, itself a single
    reader on the loop. The loop's ``add_reader``/``remove_reader`` per fetch (a handle, a
    selector key, two ``epoll_ctl`` calls and their bookkeeping: ~25 µs) were a good part of a
    fetch's cost with a thousand nodes on one loop; here a socket is registered once, one-shot
    (re-armed when it is to be waited on again), and closing it takes it out of the set."""

    __slots__ = ("ep", "jobs")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ep = select.epoll()
        self.jobs: dict[int, Fetching] = {}  # by socket fd
        loop.add_reader(self.ep.fileno(), self._ready)

    def watch(self, fd: int, job: Fetching, events: int) -> None:
        self.jobs[fd] = job
        try:
            self.ep.register(fd, events | select.EPOLLONESHOT)
        except FileExistsError:  # registered before, disarmed since it fired
            self.ep.modify(fd, events | select.EPOLLONESHOT)

    def _ready(self) -> None:
        for fd, _ in self.ep.poll(0, 256):
            # A finished fetch is gone from ``jobs`` (its socket closed, so out of the set).
            job = self.jobs.get(fd)
            if job is not None:
                job.ready()


_pollers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Poller] = (
    weakref.WeakKeyDictionary())


def _poller_of(loop: asyncio.AbstractEventLoop) -> _Poller:
    found = _pollers.get(loop)
    if found is None:
        found = _pollers[loop] = _Poller(loop)
    return found


class Fetching:
    """One outgoing fetch as loop callbacks (no task, no future): ``done(body, fault)`` is
    called exactly once, from the event loop and never from inside ``start_fetch``, unless
    ``cancel`` comes first."""

    __slots__ = ("__weakref__", "buf", "done", "loop", "max_body", "need", "opening", "over",
                 "poller", "request", "sock", "writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes, max_body: int,
                 timeout: float, done: Callable[[bytes | None, Fault], None]) -> None:
        self.loop = loop
        self.sock: socket.socket | None = None
        self.request = request
        self.max_body = max_body
        self.buf = bytearray()
        self.need: int | None = None
        self.done: Callable[[bytes | None, Fault], None] | None = done
        self.opening = True
        self.over = False  # finished (or cancelled)
        self.poller: _Poller | None = None  # set once the socket is watched
        self.writing = False  # waiting for the connection, not the reply
        _deadlines_of(loop).add(loop, loop.time() + timeout, self)

    def open(self, addr: Addr, local_ip: str | None, mark: int | None) -> None:
        try:
            # Non-blocking from the start: no separate system call to make it so.
            self.sock = sock = socket.socket(
                socket.AF_INET6 if ":" in addr[0] else socket.AF_INET,
                socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError:  # out of file descriptors, say: a failed fetch, nobody's fault
            self.finish(None, Fault.NONE)
            return
        try:
            set_mark(sock, mark)
            if local_ip:
                # Our own address, so the server sees the IP it knows us by (on a host with
                # many addresses, or on loopback, the kernel would otherwise pick another).
                sock.bind((local_ip, 0))
            err = sock.connect_ex(addr)
        except OSError as exc:
            self.finish(None, Fault.REFUSED if exc.errno == errno.ECONNREFUSED else Fault.NONE)
            return
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            self.finish(None, Fault.REFUSED if err == errno.ECONNREFUSED else Fault.NONE)
            return
        self.send_request()

    def send_request(self) -> None:
        # On loopback or a fast link the handshake is often through already: sending at once
        # saves a wake-up and a look at SO_ERROR (a connect still under way says EAGAIN).
        assert self.sock is not None
        try:
            self.sock.send(self.request)  # 38 bytes into an empty buffer: never partial
        except _WOULD_BLOCK:
            self.writing = True
            self._watch(select.EPOLLOUT)
            return
        except OSError as exc:
            # Refused: nobody listens where the announcement came from.
            self.finish(None, Fault.REFUSED if exc.errno == errno.ECONNREFUSED else Fault.NONE)
            return
        self._watch(select.EPOLLIN)

    def _watch(self, events: int) -> None:
        assert self.sock is not None
        if self.poller is None:
            self.poller = _poller_of(self.loop)
        self.poller.watch(self.sock.fileno(), self, events)

    def ready(self) -> None:
        """The poller's call: the socket is writable (connected) or readable."""
        if self.writing:
            self.writing = False
            self.connected()
            return
        self.readable()
        if not self.over:
            self._watch(select.EPOLLIN)  # more to read: one-shot, so armed again

    def connected(self) -> None:
        assert self.sock is not None
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.finish(None, Fault.REFUSED if err == errno.ECONNREFUSED else Fault.NONE)
            return
        self.send_request()

    def readable(self) -> None:
        assert self.sock is not None
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
                    self.finish(None, Fault.NOT_HERE)
                    return
                self.need = wire.FETCH_REPLY_HEAD + length
            if len(self.buf) > self.need:
                self.finish(None, Fault.MALFORMED)  # trailing bytes: not a reply we accept
            elif len(self.buf) == self.need:
                self.finish(bytes(self.buf[wire.FETCH_REPLY_HEAD:]), Fault.NONE)
        except wire.WireError:
            self.finish(None, Fault.MALFORMED)

    def finish(self, body: bytes | None, fault: Fault) -> None:
        if self.over:
            return
        self.over = True
        sock = self.sock
        if sock is not None:
            if self.poller is not None:
                self.poller.jobs.pop(sock.fileno(), None)
            sock.close()  # which takes it out of the poller's epoll set
        done, self.done = self.done, None
        if done is not None:
            if self.opening:  # the caller is still in start_fetch: not inside it
                self.loop.call_soon(done, body, fault)
            else:
                done(body, fault)

    def cancel(self) -> None:
        """Stop at once, without calling ``done``."""
        self.done = None
        self.finish(None, Fault.NONE)


def start_fetch(addr: Addr, alert_id: bytes, my_port: int,
                done: Callable[[bytes | None, Fault], None], *, local_ip: str | None,
                max_body: int, timeout: float = 2.0, mark: int | None = None,
                loop: asyncio.AbstractEventLoop | None = None) -> Fetching:
    """Fetch what ``addr`` serves for ``alert_id``: ``done(body, fault)`` gets the envelope
    bytes, or None for any failure and whether the failure was the peer's doing
    (``Fault.REFUSED``: nobody listens where it announced from; ``Fault.NOT_HERE``: it has no
    such alert; ``Fault.MALFORMED``: a reply that is none) rather than the network's
    (``Fault.NONE``).

    Callbacks, not a coroutine: a task and a future per fetch were a good part of its cost
    with a thousand nodes in one process."""
    request = wire.encode_fetch_request(alert_id, my_port)
    job = Fetching(loop or asyncio.get_running_loop(), request, max_body, timeout, done)
    job.open(addr, local_ip, mark)
    job.opening = False
    return job
