"""The node alone in a process: ``python -m node.takeover.runner --netns NS --engine NAME``.

Benchmarks run the node here so that nothing else (clients, servers, capture) shares its
interpreter lock. It prints ``ready`` once its queue is bound, runs until its standard input
closes, then prints one JSON line: the engine's and the queue's counters and, per trigger, the
wall-clock times (``time.time()``) at which the trigger packet reached the queue callback, and
the engine's work began and ended.
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
    args = ap.parse_args()
    ns = Namespace.attach(args.netns)
    engine: Any
    if args.engine == "takeover":
        engine = TakeoverEngine(netns=ns.name, nft=NftText(ns.name))
    elif args.engine == "tcp_repair":
        engine = RepairEngine(netns=ns.name, nft=NftText(ns.name))
    else:
        engine = ResetEngine(netns=ns.name)
    times: list[tuple[float, float, float]] = []
    last_in = [0.0]
    answered = [0.0]
    inner, inner_answer = engine.trigger, engine.answer

    # The engine's work starts where it is first told of the trigger (``answer``, before the
    # stack takes the packet) and ends when ``trigger`` returns.
    def answer(*a: Any) -> None:
        answered[0] = time.time()
        inner_answer(*a)

    def trigger(*a: Any) -> None:
        t0 = answered[0] or time.time()
        answered[0] = 0.0
        inner(*a)
        times.append((last_in[0], t0, time.time()))

    engine.answer = answer
    engine.trigger = trigger
    node = Node(ns, engine, args.port, detect=starts_with(args.prefix.encode()))
    on_packet = node.queue.queue.on_packet

    def timed(payload: bytes, handle: Any) -> None:
        last_in[0] = time.time()
        on_packet(payload, handle)

    node.queue.queue.on_packet = timed
    print("ready", flush=True)
    try:
        sys.stdin.read()
    finally:
        node.close()
    print(json.dumps({"engine": dict(engine.stats), "queue": dict(node.queue.stats),
                      "times": times}), flush=True)


if __name__ == "__main__":
    main()
