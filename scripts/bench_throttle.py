#!/usr/bin/env python3
"""The virus throttle on a benign trace and a worm trace, through the sans-I/O core (no kernel).

Benign trace (fixed parameters, printed): 200 hosts, 8 hours each; sessions arrive as a Poisson
process at 1 per 30 s per host; each session picks a destination from Zipf(1.2) over 2,000
destinations and opens a burst of 1–8 connections (uniform) to it, the connections of a burst
spaced by exponential gaps of mean 0.25 s. A connection is *delayed* when the core queues it.

Worm trace: a host whose working set is already full from its own benign use starts scanning
uniformly random new destinations at 100 a second. ``worm_new_dest_per_s`` is measured with the
infected flag off (so the rate limiter alone is measured, not the block) over 300 s from the first
scan: distinct destinations let out per second. ``time_to_flag_s`` is, with the default threshold
of 100, the time from the first scan to the Flagged event.

Timers fire exactly at ``next_deadline()``, as the asyncio adapter's call_later does.

Prints a human table, then one JSON object on the last line:
``{"benign_delayed_frac": ..., "worm_new_dest_per_s": ..., "time_to_flag_s": ...,
"throttle_decision_us": ..., ...}``.

Usage: .venv/bin/python scripts/bench_throttle.py [--hours H] [--hosts N] [--seed S]
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from node.throttle import (
    Flagged,
    Passed,
    PassReason,
    Queued,
    Released,
    ThrottleConfig,
    ThrottleCore,
)
from node.throttle.measure import throttle_decision_us


@dataclass(frozen=True)
class TraceParams:
    hosts: int = 200
    hours: float = 8.0
    session_mean_gap_s: float = 30.0  # Poisson sessions: 1 per 30 s
    zipf_s: float = 1.2
    destinations: int = 2000
    burst_min: int = 1
    burst_max: int = 8
    burst_gap_mean_s: float = 0.25
    seed: int = 42


def benign_host_trace(p: TraceParams, rng: random.Random,
                      cum_weights: list[float]) -> list[tuple[float, int]]:
    """One host's connections: (time, destination rank), in time order."""
    end = p.hours * 3600.0
    conns: list[tuple[float, int]] = []
    t = rng.expovariate(1.0 / p.session_mean_gap_s)
    ranks = range(p.destinations)
    while t < end:
        dst = rng.choices(ranks, cum_weights=cum_weights)[0]
        c = t
        for _ in range(rng.randint(p.burst_min, p.burst_max)):
            conns.append((c, dst))
            c += rng.expovariate(1.0 / p.burst_gap_mean_s)
        t += rng.expovariate(1.0 / p.session_mean_gap_s)
    conns.sort()
    return conns


@dataclass
class BenignResult:
    working_set_size: int
    connections: int
    delayed: int
    delays_s: list[float]

    @property
    def frac(self) -> float:
        return self.delayed / self.connections if self.connections else 0.0


def replay_benign(traces: list[list[tuple[float, int]]], ws: int) -> BenignResult:
    res = BenignResult(ws, 0, 0, [])
    for host, trace in enumerate(traces):
        # One core per host: sources are independent, and each host's clock starts at 0.
        core = ThrottleCore(ThrottleConfig(working_set_size=ws))
        for now, dst in trace:
            while (due := core.next_deadline()) is not None and due <= now:
                for e in core.tick(due):
                    if isinstance(e, Released):
                        res.delays_s.append(e.at - e.queued_at)
            for e in core.attempt(host, dst, now):
                if isinstance(e, Queued):
                    res.delayed += 1
        while (due := core.next_deadline()) is not None:
            for e in core.tick(due):
                if isinstance(e, Released):
                    res.delays_s.append(e.at - e.queued_at)
        res.connections += len(trace)
    return res


def warmed_core(config: ThrottleConfig, src: str, warm: list[tuple[float, int]]) -> tuple[
        ThrottleCore, float]:
    """A core whose working set for src is full from benign use; returns it and the end time."""
    core = ThrottleCore(config)
    now = 0.0
    for now, dst in warm:
        while (due := core.next_deadline()) is not None and due <= now:
            core.tick(due)
        core.attempt(src, ("benign", dst), now)
    while (due := core.next_deadline()) is not None:
        core.tick(due)
        now = max(now, due)
    return core, now + 10.0  # a quiet moment, then the worm starts


def worm_scan(core: ThrottleCore, src: str, start: float, rate: float, seconds: float,
              rng: random.Random) -> tuple[int, float | None]:
    """Scan at `rate` new destinations/s for `seconds`; distinct destinations let out in the
    window [start, start + seconds), and when the source was flagged (None if never)."""
    out: set[object] = set()
    flagged_at: float | None = None
    n = int(rate * seconds)

    def note(events: list) -> None:
        nonlocal flagged_at
        for e in events:
            if isinstance(e, Released) or (isinstance(e, Passed) and e.reason is PassReason.NEW):
                if e.dst[0] == "worm" and (e.at if isinstance(e, Released) else now) < end:
                    out.add(e.dst)
            elif isinstance(e, Flagged) and flagged_at is None:
                flagged_at = e.at

    end = start + seconds
    for i in range(n):
        now = start + i / rate
        while (due := core.next_deadline()) is not None and due <= now:
            note(core.tick(due))
        note(core.attempt(src, ("worm", rng.getrandbits(24)), now))
    while (due := core.next_deadline()) is not None and due < end:
        now = due
        note(core.tick(due))
    return len(out), flagged_at


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", type=int, default=TraceParams.hosts)
    ap.add_argument("--hours", type=float, default=TraceParams.hours)
    ap.add_argument("--seed", type=int, default=TraceParams.seed)
    args = ap.parse_args()
    p = TraceParams(hosts=args.hosts, hours=args.hours, seed=args.seed)
    console = Console()
    console.print(f"benign trace parameters: {p}")
    console.print("worm: uniform random new destinations over 2^24 at 100/s; working set warmed "
                  "by 1 h of the host's benign trace; rate window 300 s, flag off; "
                  "time to flag with threshold 100")

    rng = random.Random(p.seed)
    cum = list(itertools.accumulate(1.0 / (k ** p.zipf_s) for k in range(1, p.destinations + 1)))
    t0 = time.perf_counter()
    traces = [benign_host_trace(p, rng, cum) for _ in range(p.hosts)]
    console.print(f"generated {sum(map(len, traces)):,} benign connections in "
                  f"{time.perf_counter() - t0:.1f} s")

    sizes = [5, 6, 7, 8, 10, 15, 20, 30, 50, 100]
    results: list[BenignResult] = []
    for ws in sizes:
        r = replay_benign(traces, ws)
        results.append(r)
        if r.frac <= 0.01:
            break
    default = results[0]
    meeting = next((r for r in results if r.frac <= 0.01), None)

    warm = benign_host_trace(TraceParams(hours=1.0), random.Random(p.seed + 1), cum)
    core, start = warmed_core(ThrottleConfig(threshold=None), "worm-host", warm)
    let_out, _ = worm_scan(core, "worm-host", start, 100.0, 300.0, random.Random(p.seed + 2))
    worm_rate = let_out / 300.0
    core, start = warmed_core(ThrottleConfig(), "worm-host", warm)
    _, flagged_at = worm_scan(core, "worm-host", start, 100.0, 10.0, random.Random(p.seed + 3))
    time_to_flag = None if flagged_at is None else flagged_at - start
    # A cold host (empty working set) too: its first five destinations go free.
    core = ThrottleCore(ThrottleConfig(threshold=None))
    cold_out, _ = worm_scan(core, "cold", 0.0, 100.0, 300.0, random.Random(p.seed + 4))

    decision_us = min(throttle_decision_us() for _ in range(3))

    table = Table(title="virus throttle (core replay)")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    for r in results:
        delays = sorted(r.delays_s)
        p99 = delays[int(0.99 * (len(delays) - 1))] if delays else 0.0
        med = statistics.median(delays) if delays else 0.0
        table.add_row(f"benign delayed, working set {r.working_set_size}",
                      f"{r.frac:.4f} ({r.delayed:,}/{r.connections:,}; delay p50 {med:.2f} s, "
                      f"p99 {p99:.2f} s)", "≤ 0.01")
    table.add_row("worm new destinations/s (warm host, 300 s)", f"{worm_rate:.3f}", "≤ 1.0")
    table.add_row("worm new destinations/s (cold host, 300 s)", f"{cold_out / 300:.3f}", "")
    table.add_row("time to flag, 100/s scanner (s)",
                  "never" if time_to_flag is None else f"{time_to_flag:.3f}", "")
    table.add_row("decision cost (µs)", f"{decision_us:.2f}", "≤ 15")
    console.print(table)
    if meeting is None:
        console.print(f"no working set up to {sizes[-1]} reaches benign_delayed_frac ≤ 0.01")
    elif meeting is not default:
        console.print(f"the default working set of 5 gives {default.frac:.4f}; the smallest "
                      f"that meets ≤ 0.01 here is {meeting.working_set_size} "
                      f"({meeting.frac:.4f})")

    out = {
        "benign_delayed_frac": round(default.frac, 5),
        "benign_connections": default.connections,
        "benign_working_set": default.working_set_size,
        "benign_delayed_frac_meeting_target": None if meeting is None else round(meeting.frac, 5),
        "benign_working_set_meeting_target": None if meeting is None
        else meeting.working_set_size,
        "worm_new_dest_per_s": round(worm_rate, 4),
        "worm_new_dest_per_s_cold_host": round(cold_out / 300, 4),
        "time_to_flag_s": None if time_to_flag is None else round(time_to_flag, 4),
        "throttle_decision_us": round(decision_us, 3),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
