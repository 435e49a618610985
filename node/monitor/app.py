"""The monitor's loop: poll the node's status, follow its event stream, read keys, redraw.

The status is polled every ``interval`` seconds (at most 1 s) on the main thread; the event
stream is followed by a background thread so events show up between polls. Keys are read from
the terminal in cbreak mode (no echo, no line buffering, Ctrl-C still a signal) and the
terminal is always restored, also on errors. With no node running the frame says so and the
monitor keeps retrying, so it can be started before the node.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from node.daemon.control import ControlClient, ControlError, NoNode

from .render import Snapshot, render

NOT_RUNNING = 3  # --once exit status with no node (1: a node there gave no status)


class EventFollower(threading.Thread):
    """Keeps the newest events of the node's stream in ``events`` (reconnecting as needed)."""

    def __init__(self, socket: Path, keep: int = 50) -> None:
        super().__init__(name="monitor-events", daemon=True)
        self.socket = socket
        self.events: deque[dict[str, Any]] = deque(maxlen=keep)
        self.connected = False
        self._stop = threading.Event()
        self._client: ControlClient | None = None

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self._client = ControlClient(self.socket, timeout=5).connect()
                first = True
                for ev in self._client.events(recent=20, timeout=None):
                    if first:
                        self.events.clear()  # the replayed recent ones start a fresh view
                        first = False
                    self.connected = True
                    self.events.append(ev)
                    if self._stop.is_set():
                        break
            except (NoNode, ControlError, OSError, ValueError):
                pass
            finally:
                self.connected = False
                if self._client is not None:
                    self._client.close()
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        client = self._client
        if client is not None and client._sock is not None:
            with contextlib.suppress(OSError):
                client._sock.shutdown(2)  # wakes the blocked recv


def poll(socket: Path, client: ControlClient | None) -> tuple[dict[str, Any] | None, str, bool,
                                                              ControlClient | None]:
    """One status request, reusing the connection; (status or None, error, whether a node
    answered (with the error), client)."""
    try:
        if client is None:
            client = ControlClient(socket, timeout=5).connect()
        return client.request("status"), "", False, client
    except (NoNode, ControlError, OSError) as e:
        if client is not None:
            client.close()
        return None, str(e) if not isinstance(e, NoNode) else "", isinstance(e, ControlError), \
            None


@contextlib.contextmanager
def cbreak() -> Iterator[bool]:
    """The terminal in cbreak mode while inside; yields whether keys can be read."""
    if not sys.stdin.isatty():
        yield False
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    old = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)


def wait_key(timeout: float, keys: bool) -> str | None:
    """A key pressed within ``timeout`` seconds, or None."""
    if not keys:
        time.sleep(timeout)
        return None
    ready, _, _ = select.select([sys.stdin], [], [], timeout)
    if not ready:
        return None
    data = os.read(sys.stdin.fileno(), 32)
    return data.decode("utf-8", "replace")[:1] if data else "q"  # EOF on stdin: quit


def run_monitor(socket: Path, *, interval: float = 1.0, once: bool = False,
                console: Console | None = None) -> int:
    console = console or Console()
    if once or not console.is_terminal:  # piped: one frame, not an endless silent wait
        status, error, busy, client = poll(socket, None)
        if client is not None:
            client.close()
        console.print(render(Snapshot(socket, status, error, busy, now=time.time(),
                                      interval=interval, width=console.width, live=False)))
        return 0 if status is not None else 1 if busy else NOT_RUNNING
    follower = EventFollower(socket)
    follower.start()
    client: ControlClient | None = None
    try:
        with cbreak() as keys, Live(console=console, auto_refresh=False,
                                    screen=console.is_terminal, transient=False,
                                    redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                status, error, busy, client = poll(socket, client)
                events = list(follower.events) if follower.connected else []
                live.update(render(Snapshot(socket, status, error, busy, events, time.time(),
                                            interval, console.width)), refresh=True)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    key = wait_key(left, keys)
                    if key in ("q", "Q", "\x1b"):
                        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        follower.stop()
        if client is not None:
            client.close()
