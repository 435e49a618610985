"""Real-time scheduling for the alert path: the daemon's event loop and its verifiers.

An alert crosses every relay as a chain of wake-ups: the datagram wakes the daemon, the job
wakes a verification worker, the verdict wakes the daemon again, which forwards and installs.
On a host whose CPUs are shared (or halted while idle), each woken process may wait for
another task's time slice before it runs; over the four relays of bench_e2e's strict chain
those waits were most of the spread of its samples. Run ``SCHED_FIFO`` at a low real-time
priority, a woken loop or verifier preempts ordinary tasks at once (bench_e2e's strict chain,
interleaved: e2e_udp p50 26.0 / 33.6 ms at normal priority, 21.0 / 23.2 with this; per hop
4.2-6.6 against 3.2-3.9 ms).

Only that path: the loop's own thread (threads and processes it starts later begin at normal
priority, ``SCHED_RESET_ON_FORK``) and the verification lane, whose jobs are short and come at
the overlay's bounded rate. Taint replays and filter generation, whose amount an attacker's
traffic decides, stay at normal priority, so a flood of exploit attempts cannot take a CPU
from the host. Even a real-time loop that spun would leave other tasks 5% of its CPU (the
kernel's ``sched_rt_runtime_us``). Priority 4 is below the takeover queue's readers (10), which
hold packets in the forwarding path, and far below the kernel's own real-time threads.
"""

from __future__ import annotations

import os

PRIORITY = 4  # the config's default ([verifier] realtime_priority)
MAX_PRIORITY = 49  # the kernel's threaded interrupt handlers run at 50


def enter(priority: int) -> str | None:
    """Make the calling thread ``SCHED_FIFO`` at ``priority`` (0: leave it as it is). Returns
    why it could not (no CAP_SYS_NICE, no real-time budget in this cgroup), or None."""
    if not priority:
        return None
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK,
                              os.sched_param(priority))
    except OSError as e:
        return e.strerror or str(e)
    return None


def current() -> int:
    """The calling thread's real-time priority, 0 when it is not ``SCHED_FIFO``."""
    if os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK != os.SCHED_FIFO:
        return 0
    return os.sched_getparam(0).sched_priority
