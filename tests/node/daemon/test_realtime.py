"""The alert path's real-time scheduling (``node.daemon.realtime``): in a real daemon, the
event loop's thread and the verification worker run SCHED_FIFO at the configured priority;
everything else (its other threads, the taint and filter workers) at normal priority."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from node.daemon import realtime

from .daemon_proc import manifest


def _policy(tid: int) -> tuple[int, int]:
    """(policy without the reset-on-fork flag, real-time priority) of a thread or process."""
    return (os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK,
            os.sched_getparam(tid).sched_priority)


def _children(pid: int) -> list[int]:
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(k) for k in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except OSError:
            continue
    return out


def _workers(pid: int) -> list[int]:
    """The sandbox workers: children of the daemon's multiprocessing fork server."""
    servers = [c for c in _children(pid)
               if b"forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
    return [w for s in servers for w in _children(s)]


def test_a_thread_enters_and_reports_its_priority_others_keep_theirs() -> None:
    got: list[Any] = []

    def run() -> None:
        got.append(realtime.enter(3))
        got.append(realtime.current())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if os.geteuid() == 0:
        assert got == [None, 3]
    else:  # refused, and said why
        assert got[0] and got[1] == 0
    assert realtime.current() == 0  # the test's own thread is untouched
    assert realtime.enter(0) is None and realtime.current() == 0


def test_the_daemon_runs_its_loop_and_verifier_real_time_and_the_rest_normal(
        daemon_factory: Any) -> None:
    d = daemon_factory(sections={
        "services": {"manifests": [manifest("resolver")]},
        "detector": {"enabled": True, "workers": 2},
        "verifier": {"workers": 1, "realtime_priority": 3},
        "filters": {"workers": 1}}).start()
    assert d.proc is not None
    pid = d.proc.pid
    if os.geteuid() != 0:  # no CAP_SYS_NICE: it runs on, at normal priority, and says so
        assert "real-time scheduling unavailable" in d.stderr()
        assert d.request("status")["node"]["realtime_priority"] == 0
        return
    assert d.request("status")["node"]["realtime_priority"] == 3
    threads = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    assert _policy(pid) == (os.SCHED_FIFO, 3)
    assert len(threads) > 1  # the store's and the filters' threads, at least
    assert all(_policy(t) == (os.SCHED_OTHER, 0) for t in threads if t != pid)
    workers = d.wait_for(lambda: w if len(w := _workers(pid)) >= 4 else None,
                         what="the sandbox workers")
    policies = sorted(_policy(p) for p in workers)
    # One verification worker real-time; two taint replay and one filter worker normal.
    assert policies.count((os.SCHED_FIFO, 3)) == 1
    assert policies.count((os.SCHED_OTHER, 0)) == len(policies) - 1 == 3
