"""The sandbox lanes' process handling with real worker processes (no services loaded: the jobs
here are plain functions): queueing past the worker count, a dead worker, a job past its timeout,
a caller that gives up, and what a job raises."""

from __future__ import annotations

import _thread
import asyncio
import os
import pickle
import struct
import time
from pathlib import Path
from typing import Any

import pytest

from node.daemon.pools import JobFailed, Lane


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


@pytest.fixture
def lane():  # type: ignore[no-untyped-def]
    lane = Lane("test", 2, [], False)
    yield lane
    lane.close()


def test_jobs_past_the_worker_count_wait_their_turn(lane: Lane) -> None:
    async def main() -> list[int]:
        pids = await lane.warm()
        assert len(set(pids)) == 2 and os.getpid() not in pids
        results = await asyncio.gather(*(lane.run(pow, 2, i, timeout=30) for i in range(20)))
        assert results == [2 ** i for i in range(20)]
        return pids

    run(main())
    assert lane.done >= 22 and lane.busy == 0 and lane.failures == 0


def test_a_dead_worker_is_replaced_and_its_job_fails(lane: Lane) -> None:
    async def main() -> None:
        with pytest.raises(JobFailed, match="died"):
            await lane.run(os._exit, 3, timeout=30)
        # both workers still answer, the new one included
        pids = await asyncio.gather(*(lane.run(os.getpid, timeout=60) for _ in range(2)))
        assert len(set(pids)) == 2

    run(main())
    assert lane.restarts == 1 and lane.failures == 1


class _Calls:
    """Pickles as a call of ``fn(*args)``: what a sandbox gone wrong could send back."""

    def __init__(self, fn: Any, *args: Any) -> None:
        self.call = (fn, args)

    def __reduce__(self) -> Any:
        return self.call


@pytest.mark.parametrize("what", ["no pair", "a call"])
def test_a_worker_that_answers_garbage_is_replaced_and_its_job_fails(
        lane: Lane, tmp_path: Path, what: str) -> None:
    """What comes back from a sandbox is not trusted: a message that is no answer (a pickled
    7), or a pickle that would call a function in the daemon (here: make a directory), written
    into the worker's own pipe by the job itself ahead of its real answer, fails the job with
    JobFailed at once, calls nothing, and the worker is replaced."""
    made = tmp_path / "made"
    junk = pickle.dumps(7 if what == "no pair" else ("ok", _Calls(os.mkdir, str(made))))

    async def main() -> None:
        await lane.warm()
        fd = await lane.run(eval, "__import__('node.daemon.worker').daemon.worker._conn.fileno()",
                            timeout=30)
        with pytest.raises(JobFailed, match="sent no answer"):
            await lane.run(os.write, fd, struct.pack("!i", len(junk)) + junk, timeout=30)
        assert await lane.run(abs, -5, timeout=30) == 5

    run(main())
    assert not made.exists()
    assert lane.restarts == 1 and lane.failures == 1


def test_a_job_past_its_timeout_is_stopped(lane: Lane) -> None:
    async def main() -> None:
        before = set(await lane.warm())
        with pytest.raises(JobFailed, match="ran past"):
            await lane.run(time.sleep, 30, timeout=0.3)
        after = set(await asyncio.gather(*(lane.run(os.getpid, timeout=60) for _ in range(2))))
        assert len(after - before) == 1  # the stuck worker was replaced

    run(main())
    assert lane.restarts == 1


def test_a_caller_that_gives_up_leaves_the_worker_usable() -> None:
    lane = Lane("test", 1, [], False)
    try:
        async def main() -> None:
            pid = (await lane.warm())[0]
            slow = asyncio.ensure_future(lane.run(time.sleep, 0.3, timeout=30))
            await asyncio.sleep(0.05)
            slow.cancel()
            # the next job waits for the stale answer, then gets the same worker
            assert await lane.run(os.getpid, timeout=30) == pid

        run(main())
        assert lane.restarts == 0
    finally:
        lane.close()


def test_a_submitted_job_goes_out_before_the_loop_runs_again(lane: Lane) -> None:
    """With a worker free, ``submit`` sends the job at once: it runs while the caller still
    holds the loop (here: blocks it for 0.3 s), not a round of the loop later."""
    async def main() -> None:
        await lane.warm()
        before = time.monotonic()
        started = lane.submit(time.monotonic, timeout=30)
        assert lane.busy == 1
        time.sleep(0.3)  # the loop is held: a job sent from a task would not be out yet
        assert before <= await started < before + 0.25

    run(main())


def test_a_job_given_up_while_it_waits_never_runs(lane: Lane, tmp_path: Path) -> None:
    """Past the workers, jobs wait their turn; one cancelled meanwhile is dropped, and the
    lane's count of busy work comes back to nothing."""
    marker = tmp_path / "ran"

    async def main() -> None:
        await lane.warm()
        slow = [lane.submit(time.sleep, 0.3, timeout=30) for _ in range(2)]
        dropped = lane.submit(marker.write_text, "x", timeout=30)
        dropped.cancel()
        await asyncio.gather(*slow)
        assert await lane.run(abs, -3, timeout=30) == 3

    run(main())
    assert not marker.exists()
    assert lane.busy == 0 and lane.failures == 0 and lane.restarts == 0


def test_closing_a_lane_fails_its_jobs_instead_of_leaving_them_waiting() -> None:
    lane = Lane("test", 1, [], False)

    async def main() -> None:
        await lane.warm()
        running = lane.submit(time.sleep, 30, timeout=60)
        waiting = lane.submit(pow, 2, 3, timeout=60)  # no worker free for it
        await asyncio.to_thread(lane.close)  # from a thread, as the daemon's stop does
        for job in (running, waiting):
            with pytest.raises(JobFailed, match="closed"):
                await asyncio.wait_for(job, 5)
        with pytest.raises(JobFailed, match="closed"):
            await lane.run(pow, 2, 3, timeout=5)
        assert lane.busy == 0  # nothing left counted: a stopping pipeline is idle

    try:
        run(main())
    finally:
        lane.close()


def test_what_a_job_raises_comes_back(lane: Lane) -> None:
    async def main() -> None:
        with pytest.raises(ZeroDivisionError):
            await lane.run(divmod, 1, 0, timeout=30)
        with pytest.raises(RuntimeError, match="StopIteration"):  # no future can hold one
            await lane.run(next, iter(()), timeout=30)
        with pytest.raises(RuntimeError, match="cannot be sent back"):
            await lane.run(_thread.allocate_lock, timeout=30)  # a lock does not pickle
        assert await lane.run(abs, -4, timeout=30) == 4

    run(main())
    assert lane.restarts == 0


def test_a_pool_serves_one_event_loop_after_another(lane: Lane) -> None:
    for i in range(3):
        assert run(lane.run(abs, -i, timeout=30)) == i


def test_an_answer_left_behind_by_an_ended_loop_does_not_lose_the_worker() -> None:
    lane = Lane("test", 1, [], False)
    try:
        async def give_up() -> None:
            await lane.warm()
            job = asyncio.ensure_future(lane.run(time.sleep, 0.2, timeout=30))
            await asyncio.sleep(0.05)
            job.cancel()  # and the loop ends before the answer comes

        run(give_up())
        assert run(lane.run(abs, -7, timeout=30)) == 7
        assert lane.restarts == 0
    finally:
        lane.close()


def test_a_lowered_lane_yields_across_sessions_too() -> None:
    """nice alone ranks a worker only within its session's autogroup: a niced lane's workers
    get a session and an autogroup of their own, niced as well."""
    lane = Lane("low", 1, [], False, nice=10)
    try:
        (pid,) = run(lane.warm())
        assert os.getsid(pid) == pid != os.getsid(0)
        assert os.getpriority(os.PRIO_PROCESS, pid) >= 10
        group = Path(f"/proc/{pid}/autogroup")  # only with the kernel's autogroups
        if group.exists():
            assert group.read_text().split()[-1] == "10"
        assert run(lane.run(pow, 3, 3, timeout=30)) == 27
    finally:
        lane.close()
