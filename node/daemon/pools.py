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

A worker that dies (a crash in the emulator on hostile input), or sends back what is no
answer, is replaced and its job reported as failed; answers are unpickled with their own types
and the built-in exceptions only (``_Answer``), so a sandbox gone wrong cannot make the daemon
call anything. A job past its timeout is abandoned and its worker killed and replaced: the sandbox
has its own budgets, so this is the last line. A job whose caller gave up (cancelled) runs to
its end; its worker takes the next job once the stale answer is read.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import io
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
MAX_ANSWER_BYTES = 16 << 20  # an answer is a few KiB; a worker sending more is replaced


class JobFailed(RuntimeError):
    """A pool job did not finish: its worker died, it ran past its timeout, or its lane was
    closed."""


def _context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["node.daemon.worker"])
    return ctx


_ANSWER_TYPES = {("node.daemon.worker", t.__name__): t
                 for t in (worker.DetectOutcome, worker.VerifyOutcome, worker.FiltersOutcome)}


class _Answer(pickle.Unpickler):
    """A worker's answer, unpickled with nothing but the answers' own types and the built-in
    exceptions: a sandbox process runs hostile input, and a pickle from one gone wrong could
    otherwise make the daemon call any function it names."""

    def find_class(self, module: str, name: str) -> Any:
        found = _ANSWER_TYPES.get((module, name))
        if found is None and module == "builtins":
            found = getattr(builtins, name, None)
            if not (isinstance(found, type) and issubclass(found, Exception)):
                found = None
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not in an answer")
        return found


class _Job:
    """One job: what to run, and the future its caller holds."""

    __slots__ = ("args", "counted", "fn", "key", "result", "timeout", "timer")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float | None,
                 key: object, result: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.args = args
        self.timeout = timeout
        self.key = key
        self.result = result
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False  # in the lane's ``busy``: sent, and its caller waits


class _Worker:
    """One sandbox process and the parent's end of its pipe."""

    def __init__(self, lane: str, args: tuple[Any, ...]) -> None:
        ctx = _context()
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker.serve, args=(child, *args), daemon=True,
                                name=f"herdwall-{lane}")
        self.proc.start()
        child.close()
        # The job sent and not answered yet (its caller may have given up on it since: the
        # answer then only frees the worker).
        self.job: _Job | None = None
        self.watching: asyncio.AbstractEventLoop | None = None

    def watch(self, lane: Lane) -> None:
        """Have the running loop read the answer (registered per job: a pool outlives loops
        in tools and tests)."""
        self.watching = asyncio.get_running_loop()
        self.watching.add_reader(self.conn.fileno(), lane.readable, self)

    def unwatch(self) -> None:
        if self.watching is not None:
            with contextlib.suppress(Exception):
                self.watching.remove_reader(self.conn.fileno())
            self.watching = None

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
        self._queue: deque[_Job] = deque()  # jobs waiting for a worker, in order
        self._running: dict[object, _Worker] = {}  # key given to submit() -> its worker
        self.busy = 0  # jobs sent whose callers wait for them
        self.done = 0
        self.failures = 0
        self.restarts = 0
        self.closed = False
        for _ in range(workers):
            self._spawn()

    def _spawn(self) -> None:
        w = _Worker(self.name, self._args)
        self._all.add(w)
        self.release(w)

    def release(self, w: _Worker) -> None:
        """``w`` is free: give it the longest waiting job, else keep it idle."""
        while self._queue:
            job = self._queue.popleft()
            if not job.result.done():  # not given up while it waited
                self._send(w, job)
                return
        self._idle.append(w)

    def detach(self, w: _Worker) -> None:
        """``w`` is gone (died or killed): stop watching it and start another in its place
        (none once the lane is shut down)."""
        if w not in self._all:
            return
        self._all.discard(w)
        with contextlib.suppress(ValueError):
            self._idle.remove(w)
        w.unwatch()
        w.kill()
        if self.closed:
            return
        self.restarts += 1
        self._spawn()

    def submit(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
               key: object = None) -> asyncio.Future[T]:
        """``fn(*args)`` in a worker: a future of what it returns (or raises; ``JobFailed`` when
        its worker died or it ran past ``timeout`` and its worker was stopped). The job goes
        out now when a worker is free, not a round of the loop later as from a task (a hop
        of an alert is a few of those rounds); else when one frees up, in order. ``key``: a
        name ``interrupt`` can stop the job by. Cancelling the future gives up on the job:
        one still waiting is dropped, one running runs to its end and its worker takes the
        next job once that stale answer is read."""
        loop = asyncio.get_running_loop()
        job = _Job(fn, args, timeout, key, loop.create_future())
        if self.closed:
            job.result.set_exception(JobFailed(f"{self.name} lane: closed"))
        elif self._idle:
            self._send(self._idle.pop(), job)
        else:
            # A worker whose abandoned job was left to a loop that has ended since (a tool or
            # test running one loop after another) is read from this one instead.
            for w in self._all:
                if w.job is not None and w.watching is not loop:
                    w.watch(self)
            self._queue.append(job)
        return job.result

    async def run(self, fn: Callable[..., T], *args: Any, timeout: float | None = None,
                  key: object = None) -> T:
        """``submit``, awaited."""
        return await self.submit(fn, *args, timeout=timeout, key=key)

    def _send(self, w: _Worker, job: _Job) -> None:
        w.job = job
        job.counted = True
        self.busy += 1
        if job.key is not None:
            self._running[job.key] = w
        job.result.add_done_callback(lambda f: self._uncount(job) if f.cancelled() else None)
        try:
            w.watch(self)
            w.conn.send((job.fn, job.args))
        except (OSError, ValueError):
            self._failed(w, job, "a sandbox worker died; it was replaced")
            return
        except Exception as e:  # the job itself cannot be sent (pickling): the worker is fine
            w.unwatch()
            self._finished(w, job)
            self.release(w)
            job.result.set_exception(e)
            return
        if job.timeout is not None:
            job.timer = asyncio.get_running_loop().call_later(job.timeout, self._timed_out, w,
                                                              job)

    def readable(self, w: _Worker) -> None:
        """The answer to ``w``'s job (or its end) is there."""
        w.unwatch()
        job = w.job
        try:
            kind, value = _Answer(io.BytesIO(w.conn.recv_bytes(MAX_ANSWER_BYTES))).load()
            if kind != "ok" and not (kind == "err" and isinstance(value, Exception)):
                raise ValueError(f"not an answer: {kind!r}")
            if isinstance(value, StopIteration | StopAsyncIteration):
                value = RuntimeError(f"the job raised {value!r}")  # no future can hold these
        except Exception:  # it died, or sent what is no answer (a sandbox gone wrong)
            if job is not None:
                self._failed(w, job, "a sandbox worker died or sent no answer; it was replaced")
            else:
                self.detach(w)
            return
        if job is None:  # an answer nobody asked for: a worker out of step is replaced
            self.detach(w)
            return
        self._finished(w, job)
        self.done += 1
        self.release(w)
        if job.result.done():  # its caller gave up
            return
        if kind != "ok":
            job.result.set_exception(value)  # what the job itself raised, in the worker
        else:
            job.result.set_result(value)

    def _finished(self, w: _Worker, job: _Job) -> None:
        w.job = None
        if job.timer is not None:
            job.timer.cancel()
        self._uncount(job)
        if job.key is not None and self._running.get(job.key) is w:
            del self._running[job.key]

    def _failed(self, w: _Worker, job: _Job, why: str) -> None:
        self._finished(w, job)
        self.failures += 1
        self.detach(w)
        if not job.result.done():
            job.result.set_exception(JobFailed(f"{self.name} lane: {why}"))

    def _timed_out(self, w: _Worker, job: _Job) -> None:
        if w.job is job:
            self._failed(w, job, f"job ran past {job.timeout} s; its worker was stopped")

    def _uncount(self, job: _Job) -> None:
        # Answered, failed, or given up (a job still running then: its answer frees the
        # worker, its timeout still stops a worker that never answers).
        if job.counted:
            job.counted = False
            self.busy -= 1

    def interrupt(self, key: object) -> bool:
        """Ask the worker running the job submitted with ``key`` to stop it early (a job that
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

    def shutdown(self) -> None:
        """Stop taking jobs: those waiting or running fail with ``JobFailed`` (their callers
        would wait forever otherwise), as does any submitted later, and the workers are asked
        to exit. On the jobs' loop, this is one step no submit or answer can cut into (the
        daemon calls it there, then ``close`` in a thread); from elsewhere, each job is failed
        on its own loop."""
        if self.closed:
            return
        self.closed = True
        left = [*self._queue, *(w.job for w in self._all if w.job is not None)]
        self._queue.clear()
        for job in left:
            self._uncount(job)
            _fail_soon(job.result, f"{self.name} lane: closed")
        for w in list(self._all):
            w.unwatch()
            if w.job is not None and w.job.timer is not None:
                w.job.timer.cancel()
            with contextlib.suppress(Exception):
                w.conn.send(None)  # asks it to exit
            with contextlib.suppress(Exception):
                w.conn.close()

    def close(self) -> None:
        """``shutdown``, then wait for the workers to exit (killed after 5 s): blocking."""
        self.shutdown()
        for w in list(self._all):
            w.proc.join(5)
            if w.proc.is_alive():
                w.kill()
        self._all.clear()
        self._idle.clear()


def _fail_soon(result: asyncio.Future[Any], why: str) -> None:
    """Fail ``result`` with ``JobFailed`` on its own loop, from whichever thread."""
    def fail() -> None:
        if not result.done():
            result.set_exception(JobFailed(why))

    with contextlib.suppress(RuntimeError):  # its loop has ended: nobody awaits it any more
        result.get_loop().call_soon_threadsafe(fail)


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

    def shutdown(self) -> None:
        """Every lane's ``shutdown``: on the loop, before ``close`` in a thread."""
        for lane in self.lanes():
            lane.shutdown()

    def close(self) -> None:
        for lane in self.lanes():
            lane.close()
