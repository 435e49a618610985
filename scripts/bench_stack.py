"""Benchmark the user-level stack: parse cost, and the NFQUEUE verdict rate with the stack inline
against bare accept of the same traffic in the same run. A table, then one JSON line.

Everything kernel-side happens in namespaces this script makes (``hw-<pid>-bench...``) and
deletes, also on failure. Traffic: one TCP connection from a client process in host 1 to a
server process in host 0 (each its own process, so neither takes this process's GIL), port 5000
protected, so both directions are queued (data in, ACKs out). Runs alternate bare / stack.

    .venv/bin/python scripts/bench_stack.py [--seconds 3] [--rounds 3]

Fields: ``parse_us`` (IPv4+TCP header parse of a 1,448-byte timestamped segment, general
parsers), ``fast_path_us`` (``Stack.handle`` of an established data segment, sans-I/O: parse,
conntrack, reassembly, event), ``checksum_us`` (verifying that segment's TCP checksum in
Python, which the inline path leaves to the kernel), ``bare_pps``, ``stack_pps``,
``stack_vs_bare`` (target >= 0.85), ``split_pps`` and ``split_vs_single`` (the stack in a worker
thread fed through a queue, verdicts given before the stack runs, seed 003's per-layer workers),
``throttle_decision_us`` if ``node.throttle`` is there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.kernel.marks import Q_STACK
from node.kernel.nfqueue import Handle, QueueAdapter
from node.kernel.nft import NftTable
from node.kernel.queue_rules import QueueRules
from node.stack import Stack, StackConfig
from node.stack.checksum import pseudo_header_sum as phs
from node.stack.checksum import verify
from node.stack.packet import parse_ipv4, parse_tcp
from node.testbed import Testbed
from node.testbed.craft import TcpConversation

PORT = 5000
SERVER = "10.77.0.1"

SERVER_PY = f"""
import socket
s = socket.create_server(("{SERVER}", {PORT}))
c, _ = s.accept()
while c.recv(1 << 20):
    pass
"""

CLIENT_PY = f"""
import socket, time, sys
end = time.monotonic() + float(sys.argv[1])
for _ in range(100):  # the server process may still be starting on a loaded machine
    try:
        s = socket.create_connection(("{SERVER}", {PORT}))
        break
    except ConnectionRefusedError:
        time.sleep(0.05)
buf = b"x" * 65536
while time.monotonic() < end:
    s.sendall(buf)
s.close()
"""


def per_call_us(fn: Callable[[], object], n: int) -> float:
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, time.perf_counter() - t)
    return best / n * 1e6


def micro() -> dict[str, float]:
    conv = TcpConversation(dport=PORT)
    stack = Stack(StackConfig(protected_tcp={PORT}, verify_checksums=False))
    for p in conv.handshake():
        stack.handle(p, 0.0)
    seg = conv.to_server(b"y" * 1448)
    parse_us = per_call_us(lambda: parse_tcp(parse_ipv4(seg, False), False), 20000)
    ip = parse_ipv4(seg, False)
    init = phs(ip.src, ip.dst, 6, len(ip.payload))
    checksum_us = per_call_us(lambda: verify(ip.payload, init), 5000)
    # The same segment over and over is a duplicate after the first: feed fresh ones.
    segs = [conv.to_server(b"y" * 1448) for _ in range(20000)]
    it = iter(segs)
    n = len(segs) // 5
    fast_us = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(n):
            stack.handle(next(it), 1.0)
        fast_us = min(fast_us, (time.perf_counter() - t) / n * 1e6)
    assert stack.stats["fast"] >= len(segs) - 1
    return {"parse_us": parse_us, "fast_path_us": fast_us, "checksum_us": checksum_us}


class Counter:
    def __init__(self) -> None:
        self.n = 0


async def measure(tb: Testbed, mode: str, seconds: float) -> tuple[float, dict[str, object]]:
    """Verdicts per second over the middle of a ``seconds``-long transfer."""
    count = Counter()
    info: dict[str, object] = {}
    loop = asyncio.get_running_loop()
    stack = Stack(StackConfig(protected_tcp={PORT}, verify_checksums=False))
    work: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
    worker_done = Counter()

    if mode == "bare":
        def on_packet(payload: bytes, h: Handle) -> None:
            count.n += 1
            h.accept()
    elif mode == "inline":  # verdict after the stack (ports with user-space filter checks)
        def on_packet(payload: bytes, h: Handle) -> None:
            count.n += 1
            events = stack.handle(payload, loop.time())
            if events and any(type(e).__name__ == "Drop" for e in events):
                h.drop()
            else:
                h.accept()
    elif mode == "stack":  # StackQueue's default: verdict first, then the stack, one thread
        def on_packet(payload: bytes, h: Handle) -> None:
            count.n += 1
            h.accept()
            stack.handle(payload, loop.time())
    else:  # split: verdict first, the stack in a worker thread behind a queue
        def on_packet(payload: bytes, h: Handle) -> None:
            count.n += 1
            h.accept()
            work.put(payload)

        def worker() -> None:
            while (p := work.get()) is not None:
                stack.handle(p, time.monotonic())
                worker_done.n += 1

        wt = threading.Thread(target=worker, daemon=True)
        wt.start()

    server = tb[0].ns.popen([sys.executable, "-c", SERVER_PY])
    try:
        await asyncio.sleep(0.3)
        async with QueueAdapter(Q_STACK, on_packet, netns=tb[0].name, max_len=4096) as q:
            client = tb[1].ns.popen([sys.executable, "-c", CLIENT_PY, str(seconds + 1.0)])
            try:
                await asyncio.sleep(0.5)  # ramp up
                c0, t0 = count.n, time.perf_counter()
                await asyncio.sleep(seconds)
                c1, t1 = count.n, time.perf_counter()
            finally:
                await asyncio.to_thread(client.wait, 30)
            info["errors"] = q.errors
    finally:
        server.kill()
        server.wait()
    if mode == "split":
        backlog = work.qsize()
        work.put(None)
        info["worker_backlog"] = backlog
        info["worker_done"] = worker_done.n
    if mode != "bare":
        info["stack_stats"] = dict(stack.stats)
    return (c1 - c0) / (t1 - t0), info


def nfqueue_runs(seconds: float, rounds: int) -> dict[str, object]:
    with Testbed(2, tag="bench") as tb:
        tb.wait_ready()
        nft = NftTable(tb[0].name)
        rules = QueueRules(netns=tb[0].name)
        try:
            nft.ensure()
            nft.protect("tcp", PORT)
            rules.install()
            rates: dict[str, list[float]] = {"bare": [], "stack": [], "inline": [], "split": []}
            infos: dict[str, dict[str, object]] = {}
            for _ in range(rounds):
                for mode in ("bare", "stack", "inline", "split"):
                    pps, info = asyncio.run(measure(tb, mode, seconds))
                    rates[mode].append(pps)
                    infos[mode] = info
        finally:
            rules.remove()
            nft.teardown()
    bare = statistics.median(rates["bare"])
    stack = statistics.median(rates["stack"])
    split = statistics.median(rates["split"])
    inline = statistics.median(rates["inline"])
    return {"bare_pps": bare, "stack_pps": stack, "split_pps": split, "inline_pps": inline,
            "stack_vs_bare": stack / bare, "split_vs_single": split / stack,
            "inline_vs_bare": inline / bare,
            "runs": rates, "info": infos}


def throttle_us() -> float | None:
    try:
        from node.throttle.measure import throttle_decision_us
    except ImportError:
        return None
    return throttle_decision_us()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_stack: needs root for namespaces", file=sys.stderr)
        return 1
    m = micro()
    q = nfqueue_runs(args.seconds, args.rounds)
    thr = throttle_us()
    rows = [
        ("IPv4+TCP parse (general parsers)", f"{m['parse_us']:.2f} µs"),
        ("Stack.handle, established data (fast path)", f"{m['fast_path_us']:.2f} µs"),
        ("TCP checksum verify, 1,448 B (left to the kernel)", f"{m['checksum_us']:.2f} µs"),
        ("NFQUEUE bare accept", f"{q['bare_pps']:,.0f} pps"),
        ("NFQUEUE with the stack inline", f"{q['stack_pps']:,.0f} pps"),
        ("stack / bare (target >= 0.85), verdict first", f"{q['stack_vs_bare']:.3f}"),
        ("stack inline (verdict after it) / bare", f"{q['inline_vs_bare']:.3f}"),
        ("stack in a worker thread (split)", f"{q['split_pps']:,.0f} pps"),
        ("split / single thread", f"{q['split_vs_single']:.3f}"),
        ("split worker backlog at the end", str(q["info"]["split"].get("worker_backlog"))),
        ("throttle decision", f"{thr:.2f} µs" if thr is not None else "node.throttle absent"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, val in rows:
        print(f"{name:<{width}}  {val}")
    print(f"runs (pps): {json.dumps({k: [round(x) for x in v] for k, v in q['runs'].items()})}")
    out: dict[str, object] = {
        "parse_us": round(m["parse_us"], 3),
        "fast_path_us": round(m["fast_path_us"], 3),
        "checksum_us": round(m["checksum_us"], 3),
        "bare_pps": round(q["bare_pps"]),
        "stack_pps": round(q["stack_pps"]),
        "stack_vs_bare": round(q["stack_vs_bare"], 3),
        "inline_vs_bare": round(q["inline_vs_bare"], 3),
        "split_pps": round(q["split_pps"]),
        "split_vs_single": round(q["split_vs_single"], 3),
        "split_worker_backlog": q["info"]["split"].get("worker_backlog"),
    }
    if thr is not None:
        out["throttle_decision_us"] = round(thr, 3)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
