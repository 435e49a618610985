"""Running takeover in namespaces: the node on a loop thread, a line server, kernel counters.

Used by the netns tests and ``scripts/bench_takeover.py``; everything acts inside namespaces
that a ``topo`` made (never in the caller's).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from node.kernel.nft import NftTable
from node.kernel.queue_rules import QueueRules
from node.takeover import rules
from node.takeover.adapter import Engine, TakeoverQueue
from node.testbed.netns import Namespace


class LoopThread:
    """An asyncio loop running in a thread of its own (the node's loop in tests)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._t = threading.Thread(target=self.loop.run_forever, name="takeover-loop",
                                   daemon=True)
        self._t.start()

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10) -> Any:
        """Run ``fn`` on the loop and wait for its result."""
        fut: asyncio.Future[Any] = asyncio.run_coroutine_threadsafe(self._wrap(fn, *args),
                                                                    self.loop)
        return fut.result(timeout)

    @staticmethod
    async def _wrap(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._t.join(5)
        self.loop.close()


class Node:
    """The node's kernel side in ``ns``: table ``inet herdwall``, the takeover chains with a
    watch on ``port``, the static NFQUEUE rule, and a ``TakeoverQueue`` on its own loop (read
    by a thread of its own, as the daemon's, unless ``thread=False``)."""

    def __init__(self, ns: Namespace, engine: Engine, port: int, *,
                 detect: Callable[..., Any] | None = None, watch: bool = True,
                 extra_rules: list[str] | None = None, thread: bool = True,
                 readers: int | None = None, fast: bool = True, filters: Any = None) -> None:
        self.ns = ns
        NftTable(ns.name).ensure()
        self.nft = rules.NftText(ns.name)
        lines = rules.setup()
        if watch:
            lines += rules.watch_rules(port, "hw:test-watch")
        self.nft.apply(lines + (extra_rules or []))
        readers = (readers or rules.TAKEOVER_READERS) if thread else 1
        self.queue_rules = QueueRules(netns=ns.name, queues=rules.queues(readers))
        self.queue_rules.install()
        self.lt = LoopThread()
        self.engine = engine
        self.queue = TakeoverQueue(engine, detect=detect, filters=filters, ports={port},
                                   netns=ns.name,
                                   loop=self.lt.loop, thread=thread, readers=readers,
                                   fast=fast)
        self.lt.call(self.queue.start)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.lt.call(fn, *args)

    def close(self) -> None:
        try:
            self.lt.call(self.queue.close)
        finally:
            self.lt.stop()


def starts_with(prefix: bytes) -> Callable[..., Any]:
    """A detector: a client chunk that starts with ``prefix`` triggers."""

    def detect(flow: Any, chunk: bytes, stream: bytes) -> Any:
        return "match" if chunk.startswith(prefix) else None

    detect.chunk_prefix = (prefix, "match")  # type: ignore[attr-defined]  # C checks it too
    return detect


@dataclass
class Conn:
    """What the server side of one connection saw."""

    received: bytearray = field(default_factory=bytearray)
    error: str | None = None
    eof: bool = False
    done: threading.Event = field(default_factory=threading.Event)


class LineServer:
    """Accepts connections on (addr, port) in ``ns``; for each line received replies
    ``ok <n>\\n`` (with ``echo``: the line back); records everything; closes after EOF."""

    def __init__(self, ns: Namespace, addr: str, port: int, *, echo: bool = False,
                 sink: bool = False, backlog: int = 64) -> None:
        self.echo = echo
        self.sink = sink
        self.conns: list[Conn] = []
        self.ls = ns.call(socket.create_server, (addr, port), backlog=backlog)
        self.ls.settimeout(0.2)
        self._stop = False
        self._t = threading.Thread(target=self._accept, daemon=True)
        self._t.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn = Conn()
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(c, conn), daemon=True).start()

    def _serve(self, c: socket.socket, conn: Conn) -> None:
        n = 0
        buf = b""
        c.settimeout(30)
        try:
            with c:
                while True:
                    d = c.recv(1 << 16)
                    if not d:
                        conn.eof = True
                        break
                    conn.received += d
                    if self.sink:
                        continue
                    buf += d
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        n += 1
                        c.sendall(line + b"\n" if self.echo else b"ok %d\n" % n)
        except OSError as exc:
            conn.error = type(exc).__name__
        finally:
            conn.done.set()

    def wait(self, n: int = 1, timeout: float = 10) -> list[Conn]:
        deadline = time.monotonic() + timeout
        while len(self.conns) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        for c in self.conns[:n]:
            c.done.wait(max(0.0, deadline - time.monotonic()))
        return self.conns[:n]

    def close(self) -> None:
        self._stop = True
        self.ls.close()
        self._t.join(2)


def recv_until(s: socket.socket, suffix: bytes, timeout: float = 5) -> bytes:
    s.settimeout(timeout)
    out = b""
    while not out.endswith(suffix):
        d = s.recv(1 << 16)
        if not d:
            break
        out += d
    return out


def tcp_counters(ns: Namespace) -> dict[str, int]:
    """The namespace's TCP MIB counters (``/proc/net/snmp`` Tcp and ``/proc/net/netstat``
    TcpExt), e.g. ``RetransSegs``, ``OutRsts``, ``EstabResets``, ``TCPLostRetransmit``."""
    out: dict[str, int] = {}
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        lines = ns.run(["cat", path]).stdout.splitlines()
        for head, vals in zip(lines[::2], lines[1::2], strict=False):
            kind, names = head.split(":", 1)
            _, values = vals.split(":", 1)
            if kind in ("Tcp", "TcpExt"):
                for k, v in zip(names.split(), values.split(), strict=False):
                    out[k] = int(v)
    return out


def delta(after: dict[str, int], before: dict[str, int], *keys: str) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys}
