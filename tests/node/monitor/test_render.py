"""The monitor's frames, headless: rich's recording console, no terminal, no node."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from node.daemon.control import ControlServer
from node.daemon.events import EventBus
from node.monitor.app import run_monitor
from node.monitor.render import Snapshot, render, spark

NOW = 1_800_000_000.0


def status(**over: Any) -> dict[str, Any]:
    series = [0] * 50 + [1, 3, 0, 7, 2, 0, 0, 4, 1, 9]
    s: dict[str, Any] = {
        "node": {"id": "ab" * 20, "state": "running", "pid": 4242, "uptime_s": 3725.0,
                 "overlay_bind": "0.0.0.0:7400", "bootstrap": []},
        "kernel": {"enabled": True, "ok": True, "error": ""},
        "components": [{"name": "overlay", "state": "running"}],
        "peers": [{"node_id": "cd" * 20, "host": "10.77.0.2", "port": 7400, "live": True}],
        "alerts": {"received": 0, "verified": 3, "refuted": 2, "forwarded": 4, "detected": 1,
                   "total": 9, "from_peers": 8, "verified_total": 7},
        "filters": {"installed": 2, "userspace": 1, "kernel_errors": 0, "last_error": "",
                    "list": [{"filter_id": "1122334455667788", "kind": "specific",
                              "service": "resolver", "proto": "udp", "port": 1434,
                              "packets": 1234, "bytes": 99999},
                             {"filter_id": "99aabbccddeeff00", "kind": "general",
                              "service": "httpd", "proto": "tcp", "port": 80,
                              "packets": 0, "bytes": 0}]},
        "detector": {"enabled": True, "queue": 3, "capacity": 256, "depth": {"resolver": 3},
                     "offered": 500, "queued": 400, "replaced": 50, "sampled_out": 50,
                     "duplicates": 0, "analysed": 397, "detections": 1, "alerts": 1,
                     "errors": 0, "last_ms": 12.5, "avg_ms": 20.0, "last_service": "resolver",
                     "last_at": NOW - 3, "busy": 1},
        "verifier": {"runs": 8, "verified": 6, "refuted": 2, "cached": 4, "last_ms": 0.61,
                     "avg_ms": 0.7, "busy": 0},
        "services": [{"name": "resolver", "proto": "udp", "port": 1434}],
        "throttle": {"wired": True, "flags": [{"host": "10.77.0.66"}], "delayed": 120,
                     "sources": [{"host": "10.77.0.5", "working_set": ["10.77.0.9"],
                                  "queue": 0, "flagged": False},
                                 {"host": "10.77.0.66", "working_set": ["a", "b", "c", "d",
                                                                        "e"],
                                  "queue": 120, "flagged": True}]},
        "rates": {"alert.verified": series, "filter.hits": series, "alerts.received": series,
                  "detector.analysed": series},
        "events": [{"event_type": "alert.verified", "timestamp_s": NOW - 1,
                    "alert_id": "ef" * 32, "service": "resolver"}],
    }
    s.update(over)
    return s


def frame(snap: Snapshot, width: int = 160) -> str:
    console = Console(record=True, width=width, file=open("/dev/null", "w"),  # noqa: SIM115
                      color_system=None)
    console.print(render(snap))
    return console.export_text()


def test_full_frame_shows_every_part() -> None:
    text = frame(Snapshot(Path("/run/hw.sock"), status(), now=NOW))
    for want in ("herdwall monitor", "ab" * 20, "up 1h02m", "identity and peers",
                 "10.77.0.2:7400", "overlay running",
                 "alerts (last minute)", "received", "verified", "refuted", "forwarded",
                 "detected here", "27/min",
                 "filters", "1122334455667788", "1234", "2 installed (1 user space)",
                 "detector", "3/256 (resolver 3), 1 replaying", "sampled out", "397",
                 "last 12.5 ms", "resolver 3s ago", "verifier", "6 verified",
                 "throttle", "10.77.0.66", "FLAGGED", "120 attempt(s) delayed", "1 flagged",
                 "events", "alert.verified", "q quit", "/run/hw.sock"):
        assert want in text, want
    assert "█" in text  # sparklines drawn


def test_no_node_says_so_plainly() -> None:
    text = frame(Snapshot(Path("/x/control.sock"), None, now=NOW))
    assert "No herdwall node is running" in text and "/x/control.sock" in text
    assert "herdwall node run" in text


def test_a_busy_node_is_not_called_absent_and_one_frame_promises_no_retry() -> None:
    text = frame(Snapshot(Path("/x/control.sock"), None, "too many clients", busy=True,
                          now=NOW))
    assert "did not give its status: too many clients" in text and "No herdwall" not in text
    once = frame(Snapshot(Path("/x/control.sock"), None, now=NOW, live=False))
    assert "No herdwall node is running" in once
    assert "retrying" not in once and "q quit" not in once


def test_quiet_node_and_missing_parts() -> None:
    s = status(peers=[], components=[], rates={}, events=[],
               throttle={"wired": False, "flags": []},
               detector={"enabled": False}, filters={"installed": 0, "list": []})
    text = frame(Snapshot(Path("s"), s, now=NOW), width=100)
    assert "not wired into this node yet" in text
    assert "not a detector node" in text and "no events yet" in text
    assert "none wired yet" in text


def test_hostile_strings_are_shown_not_interpreted() -> None:
    evil = "[bold red]pwn[/bold red]\x1b[2J"
    s = status(services=[{"name": evil, "proto": "udp", "port": 1}],
               events=[{"event_type": evil, "timestamp_s": NOW, "x": evil}])
    s["filters"]["list"][0]["service"] = evil
    text = frame(Snapshot(Path("s"), s, now=NOW), width=200)
    assert "[bold red]pwn" in text


def test_sparkline_scale() -> None:
    assert str(spark([0, 1, 8], width=3)) == "·▁█"
    assert str(spark([], width=4)) == "····"
    assert len(str(spark(list(range(100)), width=30))) == 30


class FakeNode:
    """A control socket answering ``status`` from a dict, on its own loop and thread."""

    def __init__(self, path: Path, st: dict[str, Any]) -> None:
        self.path, self.st = path, st
        self.loop = asyncio.new_event_loop()
        self.bus = EventBus()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def handle(cmd: str, args: dict[str, Any]) -> Any:
            return self.st if cmd == "status" else "pong"

        async def start() -> ControlServer:
            srv = ControlServer(path, handle, self.bus)
            await srv.start()
            return srv

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def fake_node(tmp_path: Path) -> Iterator[FakeNode]:
    n = FakeNode(tmp_path / "c.sock", status(node={**status()["node"], "uptime_s": 5}))
    yield n
    n.close()


def test_run_once_against_a_socket(fake_node: FakeNode) -> None:
    console = Console(record=True, width=150, file=open("/dev/null", "w"))  # noqa: SIM115
    assert run_monitor(fake_node.path, once=True, console=console) == 0
    assert "1122334455667788" in console.export_text()


def test_run_once_with_no_node(tmp_path: Path) -> None:
    console = Console(record=True, width=120, file=open("/dev/null", "w"))  # noqa: SIM115
    assert run_monitor(tmp_path / "none.sock", once=True, console=console) == 3
    assert "No herdwall node is running" in console.export_text()


def test_live_loop_refreshes_and_stops_on_ctrl_c(fake_node: FakeNode,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop redraws every interval; a KeyboardInterrupt ends it cleanly."""
    import node.monitor.app as app

    frames = []
    real_render = app.render

    def counting(snap: Snapshot) -> Any:
        frames.append(time.monotonic())
        if len(frames) == 3:
            raise KeyboardInterrupt
        return real_render(snap)

    monkeypatch.setattr(app, "render", counting)
    console = Console(record=True, width=150, force_terminal=True,
                      file=open("/dev/null", "w"))  # noqa: SIM115
    assert run_monitor(fake_node.path, interval=0.2, console=console) == 0
    assert len(frames) == 3 and frames[2] - frames[0] < 2.0


def test_no_terminal_gets_one_frame_not_an_endless_silent_wait(fake_node: FakeNode) -> None:
    console = Console(record=True, width=150, file=io.StringIO())
    start = time.monotonic()
    assert run_monitor(fake_node.path, interval=0.2, console=console) == 0
    assert time.monotonic() - start < 5
    text = console.export_text()
    assert "q quit" not in text and str(fake_node.path) in text


def test_narrow_terminal_stacks_the_panels() -> None:
    text = frame(Snapshot(Path("s"), status(), now=NOW, width=80), width=80)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 80
    identity = next(i for i, line in enumerate(lines) if "identity and peers" in line)
    alerts = next(i for i, line in enumerate(lines) if "alerts (last minute)" in line)
    assert alerts > identity  # one below the other, not side by side
    assert "1122334455667788" in text and "FLAGGED" in text
