#!/usr/bin/env python3
"""End-to-end containment benchmark (root: it builds network namespaces).

1. Vigilante's five hosts (``node.testbed.e2e``): attacker → detector → r1 → r2 → r3 →
   vulnerable host, point to point with no forwarding, so the alert can only be relayed, and
   verified, by each relay in turn. Real node daemons (``herdwall node run``) in every host.
   For each sample an exploit variant goes from the attacker to the detector over the wire;
   measured from the moment its last packet leaves the attacker to the ``filter.installed``
   event of the vulnerable host's node for that alert's specific filter:
   ``e2e_udp_p50_ms`` (resolver, Slammer-class; target ≤ 20) and ``e2e_http_p50_ms`` (httpd,
   CodeRed-class; target ≤ 60); ``e2e_general_ms`` until the general filter is active there
   too (first sample); ``hops`` (overlay hops from the detector to the vulnerable host).
2. The worm on about 20 hosts (``node.demo_worm``), once without herdwall and once with it:
   ``infected_frac_without`` and ``infected_frac_with`` (target ≤ 0.05), the fraction of the
   vulnerable hosts infected.

Prints a table, then one JSON object on the last line. A part that cannot be measured here
(a daemon component missing) gives null and says why in ``missing``.

    .venv/bin/python scripts/bench_e2e.py [--samples 11] [--skip-worm] [--skip-chain]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console
from rich.table import Table

from node.demo_worm import View, WormDemoConfig, preflight, run_with, run_without
from node.testbed.e2e import ChainRun, Sample
from node.testbed.hosts import WormBed


def p50(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def chain_part(samples: int, inject: str, out: dict[str, Any], missing: list[str],
               rows: list[tuple[str, str, str]]) -> None:
    t0 = time.monotonic()
    with ChainRun() as run:
        missing += run.notes
        rows.append(("chain up", f"{time.monotonic() - t0:.1f} s",
                     f"components: {', '.join(run.components()) or 'none'}"))
        rng = random.Random(2026)
        for service, key, target in (("resolver", "udp", 20), ("httpd", "http", 60)):
            got: list[Sample] = []
            errors: list[str] = []
            for i in range(samples):
                try:
                    got.append(run.measure(service, random.Random(rng.random()),
                                           general=(i == 0), inject=inject))
                except (TimeoutError, OSError, RuntimeError) as e:
                    errors.append(str(e))
                    if len(errors) >= 2 and not got:
                        break  # nothing gets through: no use trying every sample
                run.clear_filters()
            spec = [s.specific_ms for s in got]
            out[f"e2e_{key}_p50_ms"] = p50(spec)
            out[f"e2e_{key}_samples"] = len(spec)
            out[f"e2e_{key}_detect_p50_ms"] = p50([s.detect_ms for s in got
                                                    if s.detect_ms is not None])
            if service == "resolver":
                out["e2e_general_ms"] = (round(got[0].general_ms, 3)
                                         if got and got[0].general_ms is not None else None)
                out["relays_verified"] = min((s.relays_verified for s in got), default=0)
            if errors:
                missing.append(f"{service}: {len(errors)} sample(s) failed: {errors[0]}")
            rows.append((f"e2e {service} p50 (target ≤ {target} ms)",
                         f"{out[f'e2e_{key}_p50_ms']} ms",
                         f"{len(spec)} samples; detect p50 "
                         f"{out[f'e2e_{key}_detect_p50_ms']} ms; max "
                         f"{round(max(spec), 2) if spec else None} ms"))
        rows.append(("e2e general filter at vul", f"{out.get('e2e_general_ms')} ms",
                     "first resolver sample"))
        out["hops"] = run.relays + 1
        out["relays"] = run.relays


def worm_part(out: dict[str, Any], missing: list[str], rows: list[tuple[str, str, str]],
              with_herdwall: bool) -> None:
    cfg = WormDemoConfig()
    log = io.StringIO()
    view = View(Console(file=log, width=160))  # plain progress lines, kept out of the table
    work = Path(tempfile.mkdtemp(prefix="hw-bench-e2e-"))
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        bed = stack.enter_context(WormBed(cfg.vulnerable, cfg.detectors, tag="be2e"))
        bed.wait_ready()
        view.board.hosts = [r.addr for r in bed.of("vulnerable")]
        without = run_without(bed, cfg, work, view)
        out["infected_frac_without"] = without.summary["infected_frac"]
        rows.append(("worm without herdwall", f"{without.summary['infected']}/"
                     f"{without.summary['vulnerable']} infected",
                     f"last infection {without.summary['last_infection_s']} s"))
        if with_herdwall:
            w = run_with(bed, cfg, work, view)
            out["infected_frac_with"] = w.summary["infected_frac"]
            out["worm_detection_ms"] = (round(w.detection_s * 1e3, 1)
                                        if w.detection_s is not None else None)
            out["worm_containment_ms"] = (round(w.containment_s * 1e3, 1)
                                          if w.containment_s is not None else None)
            missing += w.notes
            rows.append(("worm with herdwall (target ≤ 5%)",
                         f"{w.summary['infected']}/{w.summary['vulnerable']} infected",
                         f"alert {out['worm_detection_ms']} ms, contained "
                         f"{out['worm_containment_ms']} ms, {w.protected} protected"))
    out["worm_vulnerable"] = cfg.vulnerable
    out["worm_detectors"] = cfg.detectors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=11, help="exploit variants per service")
    ap.add_argument("--inject", choices=["wire", "control"], default="wire",
                    help="wire: the exploit crosses the network into the detector's stack; "
                         "control: handed to the detector's pipeline over its control socket")
    ap.add_argument("--skip-chain", action="store_true")
    ap.add_argument("--skip-worm", action="store_true")
    ap.add_argument("--without-only", action="store_true",
                    help="worm part: only the run without herdwall")
    args = ap.parse_args()
    why = preflight()
    if why:
        print(json.dumps({"error": why}))
        return 1
    out: dict[str, Any] = {"e2e_udp_p50_ms": None, "e2e_http_p50_ms": None,
                           "e2e_general_ms": None, "hops": None,
                           "infected_frac_with": None, "infected_frac_without": None}
    missing: list[str] = []
    rows: list[tuple[str, str, str]] = []
    t0 = time.monotonic()
    if not args.skip_chain:
        try:
            chain_part(args.samples, args.inject, out, missing, rows)
        except Exception as e:
            missing.append(f"chain: {type(e).__name__}: {e}")
    if not args.skip_worm:
        try:
            worm_part(out, missing, rows, not args.without_only)
        except Exception as e:
            missing.append(f"worm: {type(e).__name__}: {e}")
    table = Table(title="herdwall end to end", title_justify="left")
    for col in ("what", "value", "detail"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    Console(width=160).print(table)
    for m in missing:
        print(f"missing: {m}")
    out["inject"] = args.inject
    out["missing"] = missing
    out["elapsed_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
