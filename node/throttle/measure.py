"""The per-decision cost of the throttle core, for benchmarks (``throttle_decision_us``)."""

from __future__ import annotations

import random
import time

from node.throttle.core import ThrottleConfig, ThrottleCore


def throttle_decision_us(decisions: int = 200_000, seed: int = 1) -> float:
    """Mean microseconds per ``attempt`` over a mix of decisions, timers included.

    The mix is what a busy host produces: 50 sources, mostly destinations in their working sets,
    one attempt in five to a new destination (queued, released by the timer, now and then a
    destination evicted). The clock advances 1 ms per decision, so releases and evictions
    happen all along; flagging is off so the queue logic is measured, not the blocked path.
    """
    rng = random.Random(seed)
    core = ThrottleCore(ThrottleConfig(threshold=None))
    sources = [f"10.77.0.{i}" for i in range(1, 51)]
    common = [f"10.77.1.{i}" for i in range(1, 6)]
    calls = []
    for i in range(decisions):
        src = sources[i % len(sources)]
        if rng.random() < 0.2:
            dst = f"10.77.{2 + rng.randrange(200)}.{rng.randrange(1, 255)}"
        else:
            dst = common[rng.randrange(len(common))]
        calls.append((src, dst, i * 0.001))
    attempt = core.attempt
    start = time.perf_counter()
    for src, dst, now in calls:
        attempt(src, dst, now)
    elapsed = time.perf_counter() - start
    return elapsed / decisions * 1e6
