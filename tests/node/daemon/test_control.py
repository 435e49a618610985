"""The control socket on a real Unix socket: queries, the event stream, hostile input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from node.daemon.control import (
    AlreadyRunning,
    CommandError,
    ControlClient,
    ControlError,
    ControlServer,
    NoNode,
    node_running,
)
from node.daemon.events import EventBus


class Server:
    """A ControlServer on its own loop in a thread, with a small handler."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.bus = EventBus()
        self.loop = asyncio.new_event_loop()
        self.server: ControlServer | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def handle(self, cmd: str, args: dict[str, Any]) -> Any:
        if cmd == "ping":
            return "pong"
        if cmd == "echo":
            return args
        if cmd == "boom":
            raise RuntimeError("handler bug")
        if cmd == "emit":
            self.bus.emit(args.get("type", "t.x"), n=args.get("n", 0))
            return None
        raise CommandError(f"unknown command {cmd!r}")

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> Server:
        async def go() -> None:
            self.server = ControlServer(self.path, self.handle, self.bus, max_clients=4,
                                        idle_s=1.0)
            await self.server.start()
        self.call(go())
        return self

    def emit(self, event_type: str, **fields: Any) -> None:
        self.loop.call_soon_threadsafe(lambda: self.bus.emit(event_type, **fields))

    def stop(self) -> None:
        if self.server is not None:
            self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    s = Server(d / "control.sock").start()
    yield s
    s.stop()


def ping(path: Path) -> Any:
    with ControlClient(path) as c:
        return c.request("ping")


def raw(path: Path, data: bytes, read: bool = True) -> list[dict[str, Any]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(path))
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    out = b""
    while read:
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    s.close()
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_socket_is_private(server: Server) -> None:
    mode = os.stat(server.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600


def test_requests_and_errors(server: Server) -> None:
    with ControlClient(server.path) as c:
        assert c.request("ping") == "pong"
        assert c.request("echo", a=[1, "x"]) == {"a": [1, "x"]}
        with pytest.raises(ControlError, match="unknown command 'nope'"):
            c.request("nope")
        with pytest.raises(ControlError, match="internal error"):
            c.request("boom")
        assert c.request("ping") == "pong"  # the connection survives both
    assert node_running(server.path)


@pytest.mark.parametrize(("line", "message"), [
    (b"not json\n", "Expecting value"),
    (b"[1, 2]\n", "a request is a JSON object"),
    (b'{"cmd": 5}\n', "cmd must be a short string"),
    (b'{"cmd": ""}\n', "cmd must be a short string"),
    (b'{"cmd": "ping", "args": []}\n', "args must be an object"),
    (b'{"cmd": "ping", "id": {"x": 1}}\n', "id must be"),
    (b'{"cmd": "ping", "id": true}\n', "id must be"),
    (b"\xff\xfe\x00\x01\n", "decode"),
    (b'{"cmd": "' + b"x" * 100 + b'"}\n', "cmd must be a short string"),
])
def test_garbage_gets_an_error_not_a_crash(server: Server, line: bytes, message: str) -> None:
    replies = raw(server.path, line + b'{"id": 9, "cmd": "ping"}\n')
    assert replies[0]["ok"] is False and message in replies[0]["error"]
    assert replies[1] == {"id": 9, "ok": True, "result": "pong"}


def test_overlong_line_closes_the_connection(server: Server) -> None:
    replies = raw(server.path, b"{" + b" " * (70 * 1024) + b"}\n" + b'{"cmd": "ping"}\n')
    assert len(replies) == 1 and "longer than" in replies[0]["error"]
    assert ping(server.path) == "pong"


def test_too_many_errors_closes_the_connection(server: Server) -> None:
    replies = raw(server.path, b"x\n" * 100)
    assert len(replies) == 16 and all(not r["ok"] for r in replies)


def test_binary_flood_and_abrupt_close(server: Server) -> None:
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(server.path))
        s.sendall(os.urandom(5000))  # no newline, then gone
        s.close()
    deadline = time.monotonic() + 5
    while True:  # the server may not have seen all five go yet (client limit 4)
        try:
            assert ping(server.path) == "pong"
            break
        except ControlError as e:
            assert "too many clients" in str(e)
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_stalled_clients_are_closed_and_cannot_lock_the_operator_out(server: Server) -> None:
    stalled = []
    for _ in range(4):  # the whole client limit, each with half a request
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect(str(server.path))
        s.sendall(b'{"id": 1,')
        stalled.append(s)
    time.sleep(0.2)
    with pytest.raises((ControlError, NoNode), match=r"too many clients|closed"):
        ping(server.path)
    time.sleep(1.2)  # past the server's idle time (1 s here, 60 s by default)
    assert all(s.recv(100) == b"" for s in stalled)  # closed by the node
    assert ping(server.path) == "pong"
    for s in stalled:
        s.close()


def test_json_nested_too_deep_is_bad_input_not_an_internal_error(server: Server) -> None:
    replies = raw(server.path, b"[" * 50_000 + b"\n" + b'{"id": 2, "cmd": "ping"}\n')
    assert replies[0] == {"id": None, "ok": False, "error": "request nested too deeply"}
    assert replies[1]["result"] == "pong"
    assert not [r for r in server.bus.recent if r.get("event_type") == "control.error"]


def test_client_limit(server: Server) -> None:
    held = [ControlClient(server.path).connect() for _ in range(4)]
    for c in held:
        assert c.request("ping") == "pong"
    with ControlClient(server.path) as extra, \
            pytest.raises((ControlError, NoNode), match=r"too many clients|closed"):
        extra.request("ping")
    for c in held:
        c.close()


def test_event_stream(server: Server) -> None:
    server.emit("alert.old", n=0)
    with ControlClient(server.path) as c:
        events = c.events(types=["alert."], recent=10, timeout=5)
        first = next(events)
        assert first["event_type"] == "alert.old"  # the recent past comes first
        server.emit("filter.installed", n=1)  # filtered out
        server.emit("alert.verified", n=2)
        nxt = next(events)
        assert nxt["event_type"] == "alert.verified" and nxt["n"] == 2
        assert "timestamp" in nxt
    # A second stream, and a plain request afterwards: the server is fine.
    with ControlClient(server.path) as c:
        events = c.events(timeout=5)
        server.emit("x.y")
        assert next(events)["event_type"] == "x.y"
    assert ping(server.path) == "pong"


def test_an_event_while_subscribing_comes_once(server: Server) -> None:
    """An event emitted while the node answers a subscription is in the recent past it sends
    or in the stream after it, not in both."""
    import node.daemon.control as control

    real_send = control._send

    async def send_then_emit(writer: Any, obj: Any) -> None:
        await real_send(writer, obj)
        if obj.get("result") == "subscribed":
            server.bus.emit("t.during")

    control._send = send_then_emit  # type: ignore[assignment]
    try:
        with ControlClient(server.path) as c:
            events = c.events(recent=10, timeout=1)
            got = []
            with contextlib.suppress(TimeoutError):
                for e in events:
                    got.append(e["event_type"])
    finally:
        control._send = real_send  # type: ignore[assignment]
    assert got == ["t.during"]


def test_stale_socket_is_replaced_and_a_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, never listening: what a killed node leaves
    s.close()
    first = Server(path).start()
    try:
        assert ping(path) == "pong"
        second = Server(path)
        with pytest.raises(AlreadyRunning, match="already running"):
            second.start()
        second.stop()
        assert ping(path) == "pong"
    finally:
        first.stop()
    assert not path.exists()  # removed on stop


def test_a_regular_file_in_the_way_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("mine")
    s = Server(path)
    with pytest.raises(OSError, match="not a socket"):
        s.start()
    s.stop()
    assert path.read_text() == "mine"


def test_no_node(tmp_path: Path) -> None:
    with pytest.raises(NoNode, match="no node is running"):
        ControlClient(tmp_path / "nothing.sock").connect()
    assert not node_running(tmp_path / "nothing.sock")
