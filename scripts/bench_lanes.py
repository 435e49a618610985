#!/usr/bin/env python3
"""The daemon's sandbox lanes: what a job costs on top of its own work.

A relay verifies every alert it receives in a lane's worker process (``node.daemon.pools``),
so the round trip is on the path of every hop. Measured: an empty job's round trip through a
lane (the pipe, both wake-ups, pickling), the same through ``concurrent.futures``'
ProcessPoolExecutor (what the lanes used before), and a resolver alert's verification through
a lane against the same verification in process.

Prints a table, then one JSON object on the last line.

    .venv/bin/python scripts/bench_lanes.py [--jobs 400]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.daemon import worker
from node.daemon.pools import Lane
from sca.codec import encode_alert
from sca.emu.image import load_image
from sca.generate import Detector
from sca.services import manifest_path, traffic
from sca.verify import Verifier


def p50_us(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e6, 1)


def p90_us(xs: list[float]) -> float:
    return round(sorted(xs)[int(len(xs) * 0.9)] * 1e6, 1)


async def timed(call: object, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        await call()  # type: ignore[operator]
        out.append(time.perf_counter() - t)
    return out


async def measure(jobs: int, alert_bytes: bytes) -> dict[str, float]:
    res: dict[str, float] = {}
    lane = Lane("bench", 1, [str(manifest_path("resolver"))], False)
    try:
        await lane.warm()
        await timed(lambda: lane.run(os.getpid, timeout=30), 50)
        ping = await timed(lambda: lane.run(os.getpid, timeout=30), jobs)
        res["lane_roundtrip_p50_us"], res["lane_roundtrip_p90_us"] = p50_us(ping), p90_us(ping)
        await timed(lambda: lane.run(worker.verify, alert_bytes, timeout=30), 20)
        ver = await timed(lambda: lane.run(worker.verify, alert_bytes, timeout=30), jobs)
        res["lane_verify_p50_us"] = p50_us(ver)
    finally:
        lane.close()
    ctx = multiprocessing.get_context("forkserver")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
        def submit() -> asyncio.Future[int]:
            return asyncio.wrap_future(ex.submit(os.getpid))
        await timed(submit, 50)
        ppe = await timed(submit, jobs)
        res["ppe_roundtrip_p50_us"], res["ppe_roundtrip_p90_us"] = p50_us(ppe), p90_us(ppe)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=400, help="jobs timed per measure")
    args = ap.parse_args()
    image = load_image(manifest_path("resolver"))
    det = Detector(image)
    msgs = tuple(traffic("resolver").exploit())
    gen = det.generate(msgs, det.inspect(msgs).detection, Verifier([image]))  # type: ignore[arg-type]
    assert gen is not None
    alert_bytes = encode_alert(gen.alert)
    verifier = Verifier([image])
    for _ in range(20):
        verifier.verify(gen.alert)
    inproc = []
    for _ in range(args.jobs):
        t = time.perf_counter()
        verifier.verify(gen.alert)
        inproc.append(time.perf_counter() - t)
    res = asyncio.run(measure(args.jobs, alert_bytes))
    res["inprocess_verify_p50_us"] = p50_us(inproc)
    res["load_avg_1m"] = round(os.getloadavg()[0], 2)
    rows = [
        ("empty job through a lane (pipe)", res["lane_roundtrip_p50_us"],
         res["lane_roundtrip_p90_us"]),
        ("empty job through ProcessPoolExecutor", res["ppe_roundtrip_p50_us"],
         res["ppe_roundtrip_p90_us"]),
        ("verify a resolver alert, in a lane", res["lane_verify_p50_us"], None),
        ("verify a resolver alert, in process", res["inprocess_verify_p50_us"], None),
    ]
    print(f"{'measure':<42} {'p50 us':>10} {'p90 us':>10}")
    for what, a, b in rows:
        print(f"{what:<42} {a:>10.1f} {'' if b is None else f'{b:.1f}':>10}")
    print(f"load average {res['load_avg_1m']}")
    print(json.dumps(res, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
