"""The sandbox process pools, one lane per kind of work so that none waits behind another.

- ``fast``: verification of received alerts (about a millisecond each) and their specific
  filters: an alert relayed through this node never waits behind a taint replay.
- ``detect`` (detector nodes only): taint replays of submitted traffic, and on a detection the
  alert's generation and its specific filter: the path to the first alert.
- ``filters``: general-filter generation (tens to hundreds of sandbox replays per alert). Its
  workers run at a lower CPU priority (nice 10), so on a busy host the kernel gives the CPU to
  detection and verification first; a general filter is a refinement and can wait.

Workers come from a ``forkserver`` that has imported ``node.daemon.worker`` once: forking the
daemon itself would copy its threads' locks (store, nft, metrics) mid-use. Each worker boots
its sandboxes in the initializer (``worker.init``) and keeps them.

A worker that dies (a crash in the emulator on hostile input) breaks its pool; the lane is
rebuilt and the job reported as failed. A job past its timeout is abandoned and its lane
rebuilt, killing the stuck process: the sandbox has its own budgets, so this is the last line.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, TypeVar

from . import worker

T = TypeVar("T")

ExecutorFactory = Callable[[str, int, list[str], bool, int], concurrent.futures.Executor]

FILTERS_NICE = 10  # general-filter workers yield the CPU to detection and verification


class JobFailed(RuntimeError):
    """A pool job did not finish: its worker died or it ran past its timeout."""


def process_executor(lane: str, workers: int, manifests: list[str], detectors: bool,
                     nice: int) -> concurrent.futures.Executor:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["node.daemon.worker"])
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=ctx, initializer=worker.init,
        initargs=(manifests, detectors, nice))


def _kill(executor: concurrent.futures.Executor) -> None:
    # ProcessPoolExecutor cannot cancel a running job; its processes are killed instead.
    procs = getattr(executor, "_processes", None) or {}
    for p in list(procs.values()):
        with contextlib.suppress(Exception):
            p.kill()
    with contextlib.suppress(Exception):
        executor.shutdown(wait=False, cancel_futures=True)


class Lane:
    def __init__(self, name: str, workers: int, manifests: list[str], detectors: bool,
                 factory: ExecutorFactory, nice: int = 0) -> None:
        self.name = name
        self.workers = workers
        self._args = (name, workers, manifests, detectors, nice)
        self._factory = factory
        self.executor = factory(*self._args)
        self.busy = 0
        self.done = 0
        self.failures = 0
        self.restarts = 0

    def _rebuild(self, broken: concurrent.futures.Executor) -> None:
        if broken is self.executor:
            _kill(broken)
            self.executor = self._factory(*self._args)
            self.restarts += 1

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        executor = self.executor
        self.busy += 1
        try:
            fut = asyncio.wrap_future(executor.submit(fn, *args))
            try:
                result = await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                self.failures += 1
                self._rebuild(executor)
                raise JobFailed(f"{self.name} lane: job ran past {timeout} s; "
                                "its worker was stopped") from None
            except BrokenProcessPool:
                self.failures += 1
                self._rebuild(executor)
                raise JobFailed(f"{self.name} lane: a sandbox worker died; lane restarted"
                                ) from None
            self.done += 1
            return result
        finally:
            self.busy -= 1

    async def warm(self) -> list[int]:
        """Start every worker (the initializer boots its sandboxes); their pids."""
        return list(await asyncio.gather(*(self.run(worker.ping, timeout=120)
                                           for _ in range(self.workers))))

    def status(self) -> dict[str, Any]:
        return {"workers": self.workers, "busy": self.busy, "done": self.done,
                "failures": self.failures, "restarts": self.restarts}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.executor.shutdown(wait=True, cancel_futures=True)


class Pools:
    def __init__(self, manifests: Sequence[Path | str], *, fast_workers: int = 1,
                 detect_workers: int = 1, filter_workers: int = 1, detectors: bool = False,
                 factory: ExecutorFactory = process_executor) -> None:
        paths = [str(m) for m in manifests]
        self.fast = Lane("fast", fast_workers, paths, False, factory)
        self.detect = Lane("detect", detect_workers, paths, True, factory) if detectors else None
        self.filters = Lane("filters", filter_workers, paths, False, factory, nice=FILTERS_NICE)

    def lanes(self) -> list[Lane]:
        return [lane for lane in (self.fast, self.detect, self.filters) if lane is not None]

    @property
    def busy(self) -> int:
        return sum(lane.busy for lane in self.lanes())

    async def warm(self) -> None:
        await asyncio.gather(*(lane.warm() for lane in self.lanes()))

    def status(self) -> dict[str, Any]:
        return {lane.name: lane.status() for lane in self.lanes()}

    def close(self) -> None:
        for lane in self.lanes():
            lane.close()
