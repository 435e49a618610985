"""Fixtures for the daemon tests: sample images, real sandbox pools (shared per module: their
workers take about a second to boot), a recording kernel filter table, store runners."""

from __future__ import annotations

import asyncio
import importlib.util
import random
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filters.condition import Filter
from filters.nft import Installed
from node.daemon.events import EventBus
from node.daemon.filters import FilterManager
from node.daemon.pools import Pools
from node.daemon.store import Store, StoreRunner
from sca.emu.image import ServiceImage, load_image
from sca.services import manifest_path

HERE = Path(__file__).resolve().parent


def _load_helper() -> Any:
    spec = importlib.util.spec_from_file_location("daemon_proc", HERE / "daemon_proc.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["daemon_proc"] = mod
    spec.loader.exec_module(mod)
    return mod


daemon_proc = _load_helper()

SERVICES = ("resolver", "mgmtd")


class FakeTable:
    """A FilterTable-like recorder (the real one is exercised in the namespace tests)."""

    queue_mark = 0x20000
    mark_mask = 0xF0000

    def __init__(self) -> None:
        self.installed: dict[str, Filter] = {}
        self.calls: list[tuple[str, Any]] = []
        self.fail = False
        self.knows_table = False  # FilterTable's: whether an install is one short batch
        self.threads: list[str] = []  # the thread each install ran on
        self.hold: threading.Event | None = None  # list() waits for it (a slow kernel)

    def install(self, filters: Any, look: bool = True) -> list[Any]:
        fs = list(filters)
        self.calls.append(("install", [f.filter_id for f in fs]))
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise RuntimeError("nft refused the batch")
        for f in fs:
            self.installed[f.filter_id] = f
        return []

    def remove(self, ids: Any) -> None:
        ids = list(ids)
        self.calls.append(("remove", ids))
        if self.fail:
            raise RuntimeError("nft refused the batch")
        for i in ids:
            self.installed.pop(i, None)

    def sync(self, desired: Any) -> None:
        fs = list(desired)
        self.calls.append(("sync", [f.filter_id for f in fs]))
        if self.fail:
            raise RuntimeError("nft refused the batch")
        self.installed = {f.filter_id: f for f in fs}

    def list(self) -> list[Installed]:
        if self.hold is not None:
            self.hold.wait(10)
        return [Installed(i, 3, 300) for i in self.installed]


@pytest.fixture
def fake_table() -> FakeTable:
    return FakeTable()


@pytest.fixture(scope="module")
def images() -> list[ServiceImage]:
    return [load_image(manifest_path(n)) for n in SERVICES]


@pytest.fixture(scope="module")
def pools() -> Iterator[Pools]:
    p = Pools([manifest_path(n) for n in SERVICES], detectors=True)
    asyncio.run(p.warm())
    yield p
    p.close()


@pytest.fixture
def rng() -> random.Random:
    return random.Random(7)


class Parts:
    """Store, bus, recording table and filter manager of one in-process node."""

    def __init__(self, path: Path) -> None:
        self.db = StoreRunner(Store(path))
        self.store = self.db.store
        self.bus = EventBus()
        self.events: list[dict[str, Any]] = []
        self.bus.subscribe(self.events.append)
        self.table = FakeTable()
        self.filters = FilterManager(self.table, self.db, self.bus)

    def types(self) -> list[str]:
        return [e["event_type"] for e in self.events]

    def close(self) -> None:
        self.filters.close()
        self.db.close()


@pytest.fixture
def parts_factory(tmp_path: Path) -> Iterator[Any]:
    made: list[Parts] = []

    def make(name: str = "node") -> Parts:
        p = Parts(tmp_path / f"{name}.db")
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Any]:
    """``make(netns=None, sections={...})`` -> a started-on-demand ``Daemon``; all stopped
    after the test."""
    made: list[Any] = []

    def make(netns: str | None = None, sections: dict[str, dict[str, Any]] | None = None,
             tag: str = "d") -> Any:
        d = tmp_path / f"{tag}{len(made)}"
        d.mkdir()
        daemon = daemon_proc.Daemon(d, netns=netns, sections=sections)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.close()
