"""The node alone in a process: ``python -m node.takeover.runner --netns NS --engine NAME``.

Benchmarks run the node here so that nothing else (clients, servers, capture) shares its
interpreter lock. It prints ``ready`` once its queue is bound, runs until its standard input
closes, then prints one JSON line: the engine's and the queue's counters and, per trigger, the
wall-clock times (``time.time()``) at which the trigger packet reached the queue callback (the
queue's monotonic clock, shifted) and the engine's work ended.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from node.takeover.engine import TakeoverEngine
from node.takeover.harness import Node, starts_with
from node.takeover.repair import RepairEngine
from node.takeover.reset import ResetEngine
from node.takeover.rules import NftText
from node.testbed.netns import Namespace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--netns", required=True)
    ap.add_argument("--engine", choices=("takeover", "tcp_repair", "reset"), required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", default="EXPLOIT")
    ap.add_argument("--readers", type=int, default=None,
                    help="queue reader threads, one per CPU's queue (default: "
                         "rules.TAKEOVER_READERS)")
    args = ap.parse_args()
    ns = Namespace.attach(args.netns)
    engine: Any
    if args.engine == "takeover":
        engine = TakeoverEngine(netns=ns.name, nft=NftText(ns.name))
    elif args.engine == "tcp_repair":
        engine = RepairEngine(netns=ns.name, nft=NftText(ns.name))
    else:
        engine = ResetEngine(netns=ns.name)
    times: list[tuple[float, float]] = []
    inner = engine.trigger

    # Nothing is wrapped before the first segment is out: ``trigger`` runs after the engine's
    # early ``answer``, and its ``now`` is the queue's clock read as the packet reached the
    # callback (a wrapper there would cost the trigger's path a cold call, ~10 µs).
    def trigger(t: Any, handle: Any, now: float) -> None:
        inner(t, handle, now)
        end = time.time()
        times.append((now + (end - time.monotonic()), end))

    engine.trigger = trigger
    node = Node(ns, engine, args.port, detect=starts_with(args.prefix.encode()),
                readers=args.readers)
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        node.close()
    print(json.dumps({"engine": dict(engine.stats), "queue": dict(node.queue.stats),
                      "stack": dict(node.queue.stack.stats),
                      "times": times}), flush=True)


if __name__ == "__main__":
    main()
