"""The control socket: a Unix stream socket (mode 0600, in the 0700 state directory), JSON
lines both ways. The CLI and the monitor talk to a running node through it.

Requests and responses, one JSON object per line::

    -> {"id": 1, "cmd": "status"}
    <- {"id": 1, "ok": true, "result": {...}}
    -> {"id": 2, "cmd": "filter.remove", "args": {"ids": ["3f2a…"]}}
    <- {"id": 2, "ok": false, "error": "no installed filter with id 3f2a…"}

``{"cmd": "subscribe", "args": {"types": ["alert.", "filter."], "recent": 20}}`` turns the
connection into an event stream: after the ``ok`` response, one ``{"event": {...}}`` line per
event whose type starts with one of ``types`` (all if absent), starting with up to ``recent``
past ones, until the client closes. A client too slow to read loses the oldest events
(``{"dropped": n}`` says how many), never stalls the node.

Everything on the socket is hostile input: a line is at most 64 KiB, must be a JSON object with
a string ``cmd``; anything else gets an error response, and after 16 errors (or an overlong
line) the connection is closed. At most 32 clients at a time, so a client that holds one
without a whole request for 60 s (half a line, or nothing), or does not read its responses for
10 s, is closed: stalled clients cannot lock the operator out. No request can crash the node:
a handler's exception becomes an error response and a ``control.error`` event (JSON nested too
deep to parse is bad input like any other).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from .events import EventBus

MAX_LINE = 64 * 1024
MAX_CLIENTS = 32
MAX_ERRORS = 16
IDLE_S = 60.0  # a connection's wait for its next whole request (the monitor asks every second)
WRITE_S = 10.0  # for a client to take a response off the socket
MAX_RESPONSE = 64 * 1024 * 1024  # a client refuses a longer line (10,000 filters fit easily)

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class ControlError(RuntimeError):
    """The node answered a request with an error."""


class NoNode(ConnectionError):
    """No node answers on the control socket."""


class CommandError(ValueError):
    """A handler's refusal of a request (bad arguments, unknown ids): sent as the error."""


class AlreadyRunning(RuntimeError):
    pass


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":"), default=str) + "\n").encode()


async def _send(writer: asyncio.StreamWriter, obj: Any) -> None:
    writer.write(_dumps(obj))
    await asyncio.wait_for(writer.drain(), WRITE_S)


class ControlServer:
    def __init__(self, path: Path, handler: Handler, bus: EventBus, *,
                 max_clients: int = MAX_CLIENTS, idle_s: float = IDLE_S) -> None:
        self.path = Path(path)
        self.handler = handler
        self.bus = bus
        self.max_clients = max_clients
        self.idle_s = idle_s
        self.clients = 0
        self.requests = 0
        self.errors = 0
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._inode: tuple[int, int] | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if len(os.fsencode(self.path)) >= 108:
            raise OSError(f"control socket path too long for a Unix socket: {self.path}")
        self._clear_stale()
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path),
                                                       limit=MAX_LINE)
        # The state directory is 0700, so there is no window in which another user could
        # connect before this chmod; the mode is for when the socket is put elsewhere.
        os.chmod(self.path, 0o600)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(f"{self.path} exists and is not a socket; move it away")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            s.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)  # left by a node that was killed
            return
        except OSError:
            os.unlink(self.path)
            return
        finally:
            s.close()
        raise AlreadyRunning(f"a node is already running (its control socket {self.path} "
                             "answers); stop it first")

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._conns):
                t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        # Only our own socket: a new node may have taken the path over already.
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        self.clients += 1
        try:
            if self.clients > self.max_clients:
                await _send(writer, {"id": None, "ok": False, "error": "too many clients"})
                return
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError,
                TimeoutError):  # TimeoutError: idle past idle_s, or not reading its responses
            pass
        except Exception as e:  # never let a client take the node down
            self.bus.emit("control.error", error=repr(e))
        finally:
            self.clients -= 1
            if task is not None:
                self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _session(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        errors = 0
        while True:
            try:
                line = await asyncio.wait_for(reader.readuntil(b"\n"), self.idle_s)
            except asyncio.LimitOverrunError:
                await _send(writer, {"id": None, "ok": False,
                                     "error": f"request line longer than {MAX_LINE} bytes"})
                return
            except asyncio.IncompleteReadError:
                return  # the client closed (a partial last line is dropped)
            if not line.strip():
                continue
            rid, reply = None, None
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise CommandError("a request is a JSON object")
                rid = req.get("id")
                if isinstance(rid, bool) or (rid is not None and not isinstance(rid, int | str)):
                    rid = None
                    raise CommandError("id must be an integer or a string")
                cmd = req.get("cmd")
                args = req.get("args", {})
                if not isinstance(cmd, str) or not cmd or len(cmd) > 64:
                    raise CommandError("cmd must be a short string")
                if not isinstance(args, dict):
                    raise CommandError("args must be an object")
                self.requests += 1
                if cmd == "subscribe":
                    await self._stream(rid, args, reader, writer)
                    return
                result = await self.handler(cmd, args)
                reply = {"id": rid, "ok": True, "result": result}
            except (ValueError, UnicodeDecodeError) as e:  # bad JSON, CommandError
                reply = {"id": rid, "ok": False, "error": str(e)[:500]}
            except RecursionError:  # JSON nested deeper than the parser goes
                reply = {"id": rid, "ok": False, "error": "request nested too deeply"}
            except Exception as e:
                self.bus.emit("control.error", error=repr(e)[:500])
                reply = {"id": rid, "ok": False, "error": f"internal error: {e!r}"[:500]}
            if not reply["ok"]:
                self.errors += 1
                errors += 1
            await _send(writer, reply)
            if errors >= MAX_ERRORS:
                return

    async def _stream(self, rid: int | str | None, args: dict[str, Any],
                      reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        types = args.get("types")
        if not (isinstance(types, list) and all(isinstance(t, str) for t in types)):
            types = None
        recent = args.get("recent", 0)
        recent = recent if isinstance(recent, int) and not isinstance(recent, bool) else 0

        def wanted(rec: dict[str, Any]) -> bool:
            return types is None or any(str(rec.get("event_type", "")).startswith(t)
                                        for t in types)

        # The stream and the past it starts with, in one step before the answer: no event
        # after the answer is missed, none is sent twice.
        stream = self.bus.stream()
        past = list(self.bus.recent)[-max(0, min(recent, 1000)):] if recent else []
        try:
            await _send(writer, {"id": rid, "ok": True, "result": "subscribed"})
            for rec in past:
                if wanted(rec):
                    writer.write(_dumps({"event": rec}))
            await asyncio.wait_for(writer.drain(), WRITE_S)
            closed = asyncio.ensure_future(reader.read(1))  # EOF (or anything) ends it
            get: asyncio.Future[Any] | None = None
            dropped = 0
            try:
                while True:
                    get = asyncio.ensure_future(stream.get())
                    done, _ = await asyncio.wait({get, closed},
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if closed in done:
                        return
                    rec = get.result()
                    if stream.dropped != dropped:
                        writer.write(_dumps({"dropped": stream.dropped - dropped}))
                        dropped = stream.dropped
                    if wanted(rec):
                        writer.write(_dumps({"event": rec}))
                        await asyncio.wait_for(writer.drain(), WRITE_S)
            finally:
                # Both helpers end with the stream (also when the server stops and cancels it),
                # not later on a loop that may be closed by then.
                pending = [t for t in (get, closed) if t is not None and not t.done()]
                for t in pending:
                    t.cancel()
                if pending:
                    await asyncio.gather(*pending, return_exceptions=True)
        finally:
            stream.close()


# --- the client (blocking; the CLI and the monitor) ----------------------------------------


class ControlClient:
    def __init__(self, path: Path | str, *, timeout: float = 10.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next = 0

    def connect(self) -> ControlClient:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            raise NoNode(f"no node is running (no control socket answers at {self.path})"
                         ) from e
        except PermissionError as e:
            s.close()
            raise NoNode(f"no permission to use the control socket {self.path} "
                         "(run as the node's user, root)") from e
        except OSError as e:
            s.close()
            raise NoNode(f"cannot reach the node at {self.path}: {e.strerror}") from e
        self._sock = s
        return self

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> ControlClient:
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _readline(self) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_RESPONSE:
                raise ControlError("response too long")
            try:
                chunk = self._sock.recv(1 << 16)
            except TimeoutError:
                raise ControlError(f"the node did not answer within {self.timeout} s") from None
            except ConnectionError:
                raise NoNode("the node closed the control connection") from None
            if not chunk:
                raise NoNode("the node closed the control connection")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        try:
            obj = json.loads(line)
        except ValueError:
            raise ControlError("the node sent a line that is not JSON") from None
        if not isinstance(obj, dict):
            raise ControlError("the node sent something other than a JSON object")
        return obj

    def request(self, cmd: str, **args: Any) -> Any:
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        self._next += 1
        rid = self._next
        try:
            self._sock.sendall(_dumps({"id": rid, "cmd": cmd, "args": args}))
        except OSError:
            # Closed on us (client limit, node stopping): its reason may be waiting to be read.
            try:
                reply = self._readline()
            except OSError:
                raise NoNode("the node closed the control connection") from None
            raise ControlError(str(reply.get("error", "connection closed by the node"))
                               ) from None
        reply = self._readline()
        if reply.get("id") is None and not reply.get("ok"):  # refused before reading ours
            raise ControlError(str(reply.get("error", "unknown error")))
        if reply.get("id") != rid:
            raise ControlError("the node answered out of order")
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "unknown error")))
        return reply.get("result")

    def events(self, types: list[str] | None = None, recent: int = 0,
               timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Subscribe now (events from this moment on are not missed); iterate the result for
        event records until closed. ``timeout``: seconds to wait for each (None: forever);
        TimeoutError when it passes."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        args: dict[str, Any] = {"recent": recent}
        if types is not None:
            args["types"] = types
        self.request("subscribe", **args)
        self._sock.settimeout(timeout)
        return self._event_lines()

    def _event_lines(self) -> Iterator[dict[str, Any]]:
        while True:
            try:
                msg = self._readline()
            except ControlError as e:
                if "did not answer" in str(e):
                    raise TimeoutError("no event in time") from None
                raise
            if "event" in msg:
                yield msg["event"]
            elif "dropped" in msg:
                yield {"event_type": "stream.dropped", "count": msg["dropped"]}


def node_running(path: Path | str) -> bool:
    try:
        with ControlClient(path, timeout=2) as c:
            c.request("ping")
        return True
    except (NoNode, ControlError, OSError):
        return False
