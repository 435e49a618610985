"""The sandbox process pools, one lane per kind of work so that none waits behind another.

- ``fast``: verification of received alerts (about a millisecond each) and their specific
  filters: an alert relayed through this node never waits behind a taint replay.
- ``detect`` (detector nodes only): taint replays of submitted traffic, and on a detection the
  alert's generation and its specific filter: the path to the first alert.
- ``filters``: general-filter generation (tens to hundreds of sandbox replays per alert). Its
  workers run at a lower CPU priority (nice 10), so on a busy host the kernel gives the CPU to
  detection and verification first; a general filter is a refinement and can wait.

Each worker is a process of its own from a ``forkserver`` that has imported
``node.daemon.worker`` once (forking the daemon itself would copy its threads' locks: store, nft,
metrics, mid-use), joined to the daemon by a pipe that the event loop watches: a job is one
pickled message out and one back, about 0.1 ms, where ``concurrent.futures``' process pool takes
0.5-1 ms through its feeder and manager threads, on every hop of every alert. Each worker boots
its sandboxes once in ``worker.init`` and keeps them.

A worker that dies (a crash in the emulator on hostile input) is replaced and its job reported
as failed. A job past its timeout is abandoned and its worker killed and replaced: the sandbox
has its own budgets, so this is the last line. A job whose caller gave up (cancelled) runs to
its end; its worker takes the next job once the stale answer is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import pickle
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from . import worker

T = TypeVar("T")

FILTERS_NICE = 10  # general-filter workers yield the CPU to detection and verification


class JobFailed(RuntimeError):
    """A pool job did not finish: its worker died or it ran past its timeout."""


class _Died(Exception):
    pass


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["node.daemon.worker"])
    return ctx


class _Worker:
    """One sandbox process and the parent's end of its pipe."""

    def __init__(self, lane: str, args: tuple[Any, ...]) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker.serve, args=(child, *args), daemon=True,
                                name=f"herdwall-{lane}")
        self.proc.start()
        child.close()
        self.answer: asyncio.Future[Any] | None = None
        self.stale = False  # its caller gave up: the next answer is thrown away
        self.watching: asyncio.AbstractEventLoop | None = None

    def watch(self, lane: Lane) -> None:
        """Have the running loop read the answer (registered per job: a pool outlives loops
        in tools and tests)."""
        self.watching = asyncio.get_running_loop()
        self.watching.add_reader(self.conn.fileno(), self.readable, lane)

    def unwatch(self) -> None:
        if self.watching is not None:
            with contextlib.suppress(Exception):
                self.watching.remove_reader(self.conn.fileno())
            self.watching = None

    def readable(self, lane: Lane) -> None:
        self.unwatch()
        try:
            kind, value = self.conn.recv()
        except (EOFError, OSError, pickle.UnpicklingError) as e:
            lane.detach(self)
            if self.answer is not None and not self.answer.done():
                self.answer.set_exception(_Died(repr(e)))
            return
        if self.stale:
            self.stale = False
            lane.release(self)
            return
        if self.answer is not None and not self.answer.done():
            self.answer.set_result((kind, value))

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.conn.close()
        with contextlib.suppress(Exception):
            self.proc.join(1)


class Lane:
    def __init__(self, name: str, workers: int, manifests: list[str], detectors: bool,
                 nice: int = 0, priority: int = 0) -> None:
        self.name = name
        self.workers = workers
        self._args = (manifests, detectors, nice, priority)
        self._idle: list[_Worker] = []
        self._all: set[_Worker] = set()
        self._waiting: deque[asyncio.Future[_Worker]] = deque()
        self._running: dict[object, _Worker] = {}  # key given to run() -> its worker
        self.busy = 0
        self.done = 0
        self.failures = 0
        self.restarts = 0
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        w = _Worker(self.name, self._args)
        self._all.add(w)
        self.release(w)

    def release(self, w: _Worker) -> None:
        """``w`` is free: hand it to the longest waiting job, else keep it idle."""
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(w)
                return
        self._idle.append(w)

    def detach(self, w: _Worker) -> None:
        """``w`` is gone (died or killed): stop watching it and start another in its place."""
        if w not in self._all:
            return
        self._all.discard(w)
        with contextlib.suppress(ValueError):
            self._idle.remove(w)
        w.unwatch()
        w.kill()
        self.restarts += 1
        self._spawn()

    async def _acquire(self) -> _Worker:
        if self._idle:
            return self._idle.pop()
        # A worker whose abandoned job was left to a loop that has ended since (a tool or test
        # running one loop after another) is read from this one instead.
        loop = asyncio.get_running_loop()
        for w in self._all:
            if w.stale and w.watching is not loop:
                w.watch(self)
        fut: asyncio.Future[_Worker] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(fut.result())  # handed over just as we gave up: pass it on
            raise

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                  key: object = None) -> T:
        """``fn(*args)`` in a worker. ``key``: a name ``interrupt`` can stop the job by."""
        w = await self._acquire()
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        w.answer = answer
        self.busy += 1
        if key is not None:
            self._running[key] = w
        try:
            try:
                w.watch(self)
                w.conn.send((fn, args))
                kind, value = await asyncio.wait_for(answer, timeout)
            except TimeoutError:
                self.failures += 1
                self.detach(w)
                raise JobFailed(f"{self.name} lane: job ran past {timeout} s; "
                                "its worker was stopped") from None
            except (_Died, OSError, ValueError):
                self.failures += 1
                self.detach(w)
                raise JobFailed(f"{self.name} lane: a sandbox worker died; "
                                "it was replaced") from None
            except asyncio.CancelledError:
                if w in self._all:
                    w.stale = True  # it is still working: its answer frees it
                raise
            self.done += 1
            self.release(w)
            if kind != "ok":
                raise value  # what the job itself raised, in the worker
            return value  # type: ignore[no-any-return]
        finally:
            self.busy -= 1
            w.answer = None
            if key is not None and self._running.get(key) is w:
                del self._running[key]

    def interrupt(self, key: object) -> bool:
        """Ask the worker running the job started with ``key`` to stop it early (a job that
        polls for it, such as a taint replay, then answers with what it has; one that ended
        meanwhile leaves the request to be skipped). False if no such job runs."""
        w = self._running.get(key)
        if w is None:
            return False
        try:
            w.conn.send(worker.STOP)
        except (OSError, ValueError):
            return False
        return True

    async def warm(self) -> list[int]:
        """Wait until every worker is up (the initializer boots its sandboxes); their pids."""
        return list(await asyncio.gather(*(self.run(worker.ping, timeout=120)
                                           for _ in range(self.workers))))

    def status(self) -> dict[str, Any]:
        return {"workers": self.workers, "busy": self.busy, "done": self.done,
                "failures": self.failures, "restarts": self.restarts}

    def close(self) -> None:
        for w in list(self._all):
            w.unwatch()
            with contextlib.suppress(Exception):
                w.conn.send(None)  # asks it to exit
            with contextlib.suppress(Exception):
                w.conn.close()
        for w in list(self._all):
            w.proc.join(5)
            if w.proc.is_alive():
                w.kill()
        self._all.clear()
        self._idle.clear()


class Pools:
    def __init__(self, manifests: Sequence[Path | str], *, fast_workers: int = 1,
                 detect_workers: int = 1, filter_workers: int = 1,
                 detectors: bool = False, fast_priority: int = 0) -> None:
        paths = [str(m) for m in manifests]
        # ``fast_priority``: the verification workers' SCHED_FIFO priority (``realtime``).
        self.fast = Lane("fast", fast_workers, paths, False, priority=fast_priority)
        self.detect = Lane("detect", detect_workers, paths, True) if detectors else None
        self.filters = Lane("filters", filter_workers, paths, False, nice=FILTERS_NICE)

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
