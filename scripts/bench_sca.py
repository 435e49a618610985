#!/usr/bin/env python3
"""Sandbox benchmark: alert verification, detection per sample, taint speed, clone restore.

Prints a table, then one JSON line of figures. Targets from the design card: verify p50 <= 1 ms,
Slammer-class detection <= 5 ms, >= 200,000 tainted instructions/s, clone restore <= 50 us.
"""

from __future__ import annotations

import json
import statistics
import time

from rich.console import Console
from rich.table import Table

from sca.emu.image import load_image
from sca.generate import Detector
from sca.services import SAMPLES, manifest_path, traffic
from sca.verify import Verifier

ROUNDS = 50
DETECT_NAMES = {"resolver": "slammer", "httpd": "codered", "rpcd": "blaster", "mgmtd": "mgmtd"}


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    figures: dict[str, float] = {}
    images = [load_image(manifest_path(n)) for n in SAMPLES]
    verifier = Verifier(images)
    all_verify: list[float] = []
    instr = tainted_time = 0.0
    for image in images:
        t = traffic(image.name)
        start = time.perf_counter()
        detector = Detector(image)
        figures[f"boot_{image.name}_ms"] = (time.perf_counter() - start) * 1000
        messages = tuple(t.exploit())
        run = detector.inspect(messages)  # warm the decode cache and translated blocks
        assert run.detection is not None, f"{image.name}: exploit not detected"
        times = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            run = detector.inspect(messages)
            times.append(time.perf_counter() - start)
        figures[f"detect_{DETECT_NAMES[image.name]}_ms"] = p50(times) * 1000
        instr += run.instructions * ROUNDS
        tainted_time += sum(times)
        generated = detector.generate(messages, run.detection, verifier)
        assert generated is not None, f"{image.name}: no alert verified"
        verify_times = []
        for _ in range(ROUNDS * 2):
            verdict = verifier.verify(generated.alert)
            assert verdict.verified
            verify_times.append(verdict.elapsed_s)
        figures[f"verify_{image.name}_p50_ms"] = p50(verify_times) * 1000
        all_verify += verify_times
    figures["verify_p50_ms"] = p50(all_verify) * 1000
    # Instructions per second over the exploit replays, every one of them hooked by taint.
    figures["taint_instr_per_s"] = instr / tainted_time
    sb = verifier.sandbox(images[0].service_id)
    assert sb is not None
    restores = []
    for _ in range(1000):
        start = time.perf_counter()
        sb.restore()
        restores.append(time.perf_counter() - start)
    figures["clone_restore_us"] = p50(restores) * 1e6

    targets = {"verify_p50_ms": ("<=", 1.0), "detect_slammer_ms": ("<=", 5.0),
               "taint_instr_per_s": (">=", 200_000), "clone_restore_us": ("<=", 50.0)}
    table = Table(title="herdwall sandbox (p50; exploit replays of the four samples)")
    for col in ("figure", "value", "target", "met"):
        table.add_column(col)
    for name, value in figures.items():
        target = targets.get(name)
        met = "" if target is None else (
            "yes" if (value <= target[1] if target[0] == "<=" else value >= target[1]) else "NO")
        table.add_row(name, f"{value:,.3f}", "" if target is None else f"{target[0]} {target[1]:,}",
                      met)
    Console().print(table)
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
