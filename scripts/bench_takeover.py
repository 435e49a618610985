#!/usr/bin/env python3
"""Takeover of a live TCP connection, side by side with its baselines (namespaces only).

Topology: client -- router (the node) -- server, built fresh for each path. The node watches
the service port on its takeover queue; a client message starting with ``EXPLOIT`` is the
trigger. The same trigger is handled by:

1. ``reset``: reset injection (RST to both sides);
2. ``tcp_repair``: migration into the OS stack (two TCP_REPAIR + IP_TRANSPARENT sockets from
   the observed state, a policy-routed redirect, a splice);
3. ``takeover``: herdwall's user-level endpoints (scrub policy).

Each path is timed the same way: from the trigger packet arriving on the router's
client-facing interface to the first segment the new owner emits on that interface, both from
one tcpdump capture's kernel timestamps (nanoseconds); the node runs in a process of its own.
Two conditions: an idle node, and a node that a benign client of the same service keeps busy
(an idle process first has to be woken, which costs both paths the same). Each condition runs
in rounds (``--rounds``, a fresh topology and node process each, warm-up included), the paths'
order alternating (ABBA), so that a change in the shared machine's load meets both paths alike;
the p50s are over all rounds' timed samples. ``proxy_mbps`` is a
bulk upload through a taken-over connection (``proxy_down_mbps`` the other way);
``watch_mbps`` a benign upload through the node's watch (checked, not taken over), with
``watch_dropped`` (its segments the node dropped) and ``watch_held`` (out of order, held for
their turn); ``forward_mbps`` the same transfer forwarded by the kernel with no node, for
scale. ``--readers``: the node's queue readers (one per CPU's queue).

``cold_call_us``: one empty Python call on this machine after 0.1 ms and after 10 ms asleep, for
scale: every step of the idle node's path runs that much colder than the loaded node's. That is
why herdwall's first segment goes out from C (``node.takeover.fastack``), before the queue's
Python callback runs: its ``out`` stage is negative, and ``fast_answered`` counts the triggers
answered that way (the rest went the Python way). TCP_REPAIR has no such shortcut: its first
segment comes from the kernel socket that its engine has to build from the state first.

The JSON's ``takeover_us``, ``tcp_repair_us`` and ``speedup`` are the idle node's; the
``*_loaded_*`` fields the busy node's; ``stages_us`` splits both paths' p50s into stages (see the
table's notes).

Prints a table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.takeover import rules
from node.takeover.capture import Tcpdump, trigger_times
from node.takeover.harness import LineServer, recv_until, tcp_counters
from node.takeover.topo import PathTopo

PORT = 8080
EXPLOIT = b"EXPLOIT " + b"A" * 200 + b"\n"


REPO = Path(__file__).resolve().parent.parent


class NodeProcess:
    """The node in a process of its own (``node.takeover.runner``): it shares no interpreter
    lock with the clients, servers and capture of the benchmark."""

    def __init__(self, netns: str, engine: str, readers: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "node.takeover.runner", "--netns", netns, "--engine",
             engine, "--port", str(PORT), "--readers", str(readers)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"node runner failed: {line!r}")

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        out = self.proc.stdout.read().strip().splitlines()
        self.proc.wait(10)
        return json.loads(out[-1]) if out else {}


class Background:
    """A benign client of the same service, a line every ``1/rate`` s through the node's
    watch queue: a node protecting a service in use is awake when the trigger comes."""

    def __init__(self, ns: Any, addr: str, rate: float) -> None:
        self.rate = rate
        self.round_trips = 0
        self._stop = threading.Event()
        self.sock = ns.call(socket.create_connection, (addr, PORT), 5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._t = threading.Thread(target=self._run, daemon=True)
        self.started = time.monotonic()
        self._t.start()

    def _run(self) -> None:
        gap = 1.0 / self.rate
        nxt = time.monotonic()
        try:
            while not self._stop.is_set():
                self.sock.sendall(b"background\n")
                recv_until(self.sock, b"\n", 5)
                self.round_trips += 1
                nxt += gap
                time.sleep(max(0.0, nxt - time.monotonic()))
        except OSError:
            pass

    def stop(self) -> float:
        """Round trips per second achieved."""
        self._stop.set()
        self._t.join(5)
        self.sock.close()
        return self.round_trips / max(time.monotonic() - self.started, 1e-9)


def latency(name: str, n: int, warmup: int, pcap: Path, readers: int,
            background: float = 0.0) -> dict[str, Any]:
    with PathTopo("bt") as t:
        node = NodeProcess(t.router.name, name, readers)
        stats: dict[str, Any] = {}
        srv = LineServer(t.server, t.server_addr, PORT)
        bg = Background(t.client, t.server_addr, background) if background else None
        bg_rate = 0.0
        dump = Tcpdump(t.router.name, t.client_if, PORT, pcap)
        client = socket.inet_aton(t.client_addr)
        before = (tcp_counters(t.client), tcp_counters(t.server))
        ok = errors = 0
        try:
            for _ in range(warmup + n):
                c = t.client.call(socket.create_connection, (t.server_addr, PORT), 5)
                c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    c.sendall(b"GET /a benign-1\n")
                    recv_until(c, b"ok 1\n")
                    time.sleep(0.01)  # quiet: everything acknowledged
                    c.sendall(EXPLOIT)
                    time.sleep(0.02)
                    if name != "reset":
                        c.sendall(b"GET /b benign-2\n")
                        got = recv_until(c, b"ok 2\n", 3)
                        c.shutdown(socket.SHUT_WR)
                        recv_until(c, b"\x00", 3)
                        ok += got == b"ok 2\n"
                    else:
                        recv_until(c, b"\x00", 3)
                except OSError:
                    errors += 1
                finally:
                    c.close()
            if bg is not None:
                bg_rate = bg.stop()
            conns = [x for x in srv.wait(warmup + n + (bg is not None), 10)
                     if not x.received.startswith(b"background")]
            clean = sum(bytes(x.received) == b"GET /a benign-1\nGET /b benign-2\n"
                        for x in conns)
            time.sleep(0.3)
            after = (tcp_counters(t.client), tcp_counters(t.server))
        finally:
            packets = dump.close()
            stats = node.stop()
            srv.close()
    pairs = trigger_times(packets, b"EXPLOIT", client)
    times = stats.get("times", [])
    # Stages: the trigger on the wire -> the queue's callback (kernel, wake-up, binding) ->
    # the first segment on the wire; the engine's work, from the callback to its end.
    staged = list(zip(pairs, times, strict=False))[warmup:]
    retrans = [after[k].get("RetransSegs", 0) - before[k].get("RetransSegs", 0)
               for k in (0, 1)]
    return {
        "us": [(o - inn) * 1e6 for inn, o in pairs][warmup:],
        "queue": [(tq - inn) * 1e6 for (inn, _), (tq, _) in staged],
        "out": [(o - tq) * 1e6 for (_, o), (tq, _) in staged],
        "engine": [(t1 - tq) * 1e6 for _, (tq, t1) in staged],
        "server_clean": clean, "client_ok": ok, "client_errors": errors,
        "fast_answered": stats.get("engine", {}).get("sent_fast", 0),
        "client_resets": after[0].get("EstabResets", 0) - before[0].get("EstabResets", 0),
        "retrans_client": retrans[0], "retrans_server": retrans[1],
        "iterations": warmup + n, "engine_stats": stats.get("engine", {}),
        "background_rps": bg_rate,
    }


def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's rounds together: p50s over all their timed samples, counts summed."""
    def p50(xs: list[float]) -> float | None:
        return statistics.median(xs) if xs else None

    us = [x for r in rounds for x in r["us"]]
    out: dict[str, Any] = {
        "n": len(us), "p50_us": p50(us),
        "p90_us": sorted(us)[int(0.9 * (len(us) - 1))] if us else None,
        "min_us": min(us) if us else None,
        **{f"{k}_us": p50([x for r in rounds for x in r[k]])
           for k in ("queue", "out", "engine")},
        **{k: sum(r[k] for r in rounds) for k in (
            "server_clean", "client_ok", "client_errors", "client_resets", "retrans_client",
            "retrans_server", "iterations", "fast_answered")},
        "background_rps": min(r["background_rps"] for r in rounds),
        "engine": dict(sum((Counter(r["engine_stats"]) for r in rounds), Counter())),
    }
    return out


class Blaster:
    """A server that sends ``size`` bytes to whoever connects and sends a line."""

    def __init__(self, ns: Any, addr: str, port: int, size: int) -> None:
        self.ls = ns.call(socket.create_server, (addr, port))
        self.size = size
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        c, _ = self.ls.accept()
        with c:
            recv_until(c, b"\n", 10)
            c.sendall(bytes(range(256)) * (self.size // 256))
        self.ls.close()


def throughput(mode: str, size: int, readers: int) -> dict[str, Any]:
    """Bulk transfer through a taken-over connection (``mode`` up/down), a benign upload
    through the node's watch (``watch``: checked, not taken over; the out-of-order segments the
    queue held or dropped), or forwarded by the kernel with no node (``forward``)."""
    with PathTopo("bp") as t:
        node = NodeProcess(t.router.name, "takeover", readers) if mode != "forward" else None
        stats: dict[str, Any] = {}
        data = bytes(range(256)) * (size // 256)
        before = (tcp_counters(t.client), tcp_counters(t.server))
        try:
            if mode == "down":
                Blaster(t.server, t.server_addr, PORT, size)
                c = t.client.call(socket.create_connection, (t.server_addr, PORT), 5)
                c.sendall(EXPLOIT)  # the takeover, then the request the server answers
                time.sleep(0.05)
                c.sendall(b"GET /big\n")
                t0 = time.perf_counter()
                got = 0
                c.settimeout(30)
                while got < len(data):
                    d = c.recv(1 << 20)
                    if not d:
                        break
                    got += len(d)
                el = time.perf_counter() - t0
                c.close()
                good = got == len(data)
            else:
                srv = LineServer(t.server, t.server_addr, PORT, sink=True)
                c = t.client.call(socket.create_connection, (t.server_addr, PORT), 5)
                c.settimeout(120)  # sendall's timeout bounds the whole transfer
                if mode == "up":
                    c.sendall(EXPLOIT)
                    time.sleep(0.05)
                t0 = time.perf_counter()
                c.sendall(data)
                c.shutdown(socket.SHUT_WR)
                conn = srv.wait(1, 120)[0]
                el = time.perf_counter() - t0
                c.close()
                good = bytes(conn.received) == data
                srv.close()
            time.sleep(0.2)
            after = (tcp_counters(t.client), tcp_counters(t.server))
        finally:
            if node is not None:
                stats = node.stop()
    queue = stats.get("queue", {})
    return {"mbps": len(data) * 8 / el / 1e6, "seconds": el, "intact": good,
            "retrans_client": after[0]["RetransSegs"] - before[0]["RetransSegs"],
            "retrans_server": after[1]["RetransSegs"] - before[1]["RetransSegs"],
            "taken_over": stats.get("engine", {}).get("taken_over", 0),
            **{k: queue.get(k, 0) for k in ("ooo_held", "ooo_dropped", "held_dropped",
                                            "ooo_expired", "dropped")}}


SKIPPED: dict[str, Any] = {  # a path left out with --paths
    **{f"{k}_us": None for k in ("p50", "queue", "out", "engine")},
    "server_clean": 0, "client_resets": 0, "background_rps": 0.0, "fast_answered": 0,
    "iterations": 0}


def _row(name: str, r: dict[str, Any]) -> str:
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.0f}"

    it = r["iterations"]
    return (f"{name:<12}{f(r['p50_us']):>9}{f(r['p90_us']):>9}{f(r['min_us']):>9}"
            f"{f(r['queue_us']):>8}{f(r['out_us']):>8}"
            f"{f(r['engine_us']):>9}"
            f"{r['server_clean']:>7}/{it:<4}{r['client_ok']:>7}/{it:<4}"
            f"{r['client_resets']:>8}{r['retrans_client']:>6}/{r['retrans_server']:<4}")


def _nothing() -> None:
    pass


def cold_call_us(gap_s: float, n: int = 40) -> float:
    """p50 of one empty Python call after ``gap_s`` asleep, on this machine: what being idle
    does to every step of an idle node's path (the idle condition's quiet gap is 10 ms)."""
    times = []
    for _ in range(n):
        time.sleep(gap_s)
        t0 = time.perf_counter_ns()
        _nothing()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return round(statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=40, help="timed takeovers per path and condition")
    ap.add_argument("--warmup", type=int, default=5,
                    help="untimed takeovers at the start of each round (a fresh node process)")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds per condition, each path's n split among them, the paths' "
                         "order alternating (ABBA): a change in the machine's load meets "
                         "both paths alike")
    ap.add_argument("--bulk-mb", type=int, default=20, help="0: no bulk transfers")
    ap.add_argument("--readers", type=int, default=rules.TAKEOVER_READERS,
                    help="the node's queue readers (one per CPU's queue; 1: one queue)")
    ap.add_argument("--background", type=float, default=1000.0,
                    help="round trips/s of a benign client in the loaded condition (0: skip)")
    ap.add_argument("--paths", default="reset,tcp_repair,takeover",
                    help="comma-separated paths to time (the JSON's speedup needs tcp_repair "
                         "and takeover)")
    args = ap.parse_args()

    paths = tuple(p for p in ("reset", "tcp_repair", "takeover") if p in args.paths.split(","))
    conditions = [0.0] + ([args.background] if args.background else [])
    lat: dict[float, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="hw-bench-takeover-") as tmp:
        for bg in conditions:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
            for i in range(args.rounds):  # ABBA: the paths meet the machine's load alike
                for name in paths if i % 2 == 0 else paths[::-1]:
                    share = args.n // args.rounds + (i < args.n % args.rounds)
                    pcap = Path(tmp) / f"{name}-{bg:g}-{i}.pcap"  # a new file: see Tcpdump
                    runs[name].append(latency(name, share, args.warmup, pcap, args.readers,
                                              bg))
            lat[bg] = {name: summary(runs[name]) if name in paths else SKIPPED
                       for name in ("reset", "tcp_repair", "takeover")}
    size = args.bulk_mb * 1_000_000
    bulk = {mode: throughput(mode, size, args.readers) if size else None
            for mode in ("up", "down", "watch", "forward")}

    head = (f"{'path':<12}{'p50 µs':>9}{'p90 µs':>9}{'min µs':>9}{'queue':>8}"
            f"{'out':>8}{'engine':>9}{'server ok':>12}{'client ok':>12}{'resets':>8}"
            f"{'retx c/s':>11}")
    for bg in conditions:
        rate = max(r["background_rps"] for r in lat[bg].values())
        busy = f"loaded node (a benign client, {rate:.0f} round trips/s)"
        print(f"\n{busy if bg else 'idle node'}")
        print(head)
        for name in paths:
            print(_row(name, lat[bg][name]))
    print("\ntimed from the trigger arriving on the router's client-facing interface to the first "
          "segment out to the client\n(tcpdump kernel timestamps); stage p50s in µs: queue = "
          "trigger on the wire -> the queue's callback\n(kernel, wake-up, binding; the node's "
          "clock read there); out = callback -> first segment on the wire (header\nreads, the "
          "check, the engine; the TCP_REPAIR engine after the stack's bookkeeping, its sockets "
          "need the\ntrigger in the state; negative: the segment left from C before the "
          "callback ran); engine = callback -> the engine's\nwork done. server ok: the server "
          "got exactly the benign bytes.")
    for bg in conditions if "takeover" in paths else ():
        t = lat[bg]["takeover"]
        print(f"{'loaded' if bg else 'idle'}: {t['fast_answered']} of {t['iterations']} "
              "takeover triggers answered from C (node.takeover.fastack)")
    up, down, watch, fwd = bulk["up"], bulk["down"], bulk["watch"], bulk["forward"]
    if up and down and watch and fwd:
        print(f"\nbulk {args.bulk_mb} MB through a taken-over connection: up {up['mbps']:.1f} "
              f"Mbit/s (intact={up['intact']}, retx c/s {up['retrans_client']}/"
              f"{up['retrans_server']}), down {down['mbps']:.1f} Mbit/s (intact="
              f"{down['intact']}, retx c/s {down['retrans_client']}/{down['retrans_server']});"
              f"\na benign upload through the node's watch: {watch['mbps']:.1f} Mbit/s (intact="
              f"{watch['intact']}, retx c/s {watch['retrans_client']}/{watch['retrans_server']}"
              f", out-of-order segments held {watch['ooo_held']}, dropped "
              f"{watch['ooo_dropped'] + watch['held_dropped'] + watch['ooo_expired']}, dropped "
              f"by the stack {watch['dropped']});\nthe same upload forwarded by the kernel with "
              f"no node: {fwd['mbps']:.1f} Mbit/s")
    print(f"node: {args.readers} queue reader(s)")
    cold = {"0.1ms": cold_call_us(0.0001), "10ms": cold_call_us(0.01)}
    print(f"this machine: an empty Python call takes {cold['0.1ms']} µs after 0.1 ms asleep, "
          f"{cold['10ms']} µs after 10 ms (the idle node's gap before the trigger)")

    def r1(x: float | None) -> float | None:
        return None if x is None else round(x, 1)

    idle = lat[0.0]
    result: dict[str, Any] = {
        "takeover_us": r1(idle["takeover"]["p50_us"]),
        "tcp_repair_us": r1(idle["tcp_repair"]["p50_us"]),
        "reset_us": r1(idle["reset"]["p50_us"]),
        # timed takeovers behind each p50 (a trigger whose first segment was not captured
        # has none)
        "takeover_n": idle["takeover"].get("n", 0), "tcp_repair_n": idle["tcp_repair"].get("n", 0),
        # takeover triggers whose first ACK went out from C, of all (warm-ups included)
        "fast_answered": idle["takeover"].get("fast_answered", 0),
    }
    t_us, r_us = idle["takeover"]["p50_us"], idle["tcp_repair"]["p50_us"]
    result["speedup"] = round(r_us / t_us, 2) if t_us and r_us else None
    if args.background:
        ld = lat[args.background]
        lt, lr = ld["takeover"]["p50_us"], ld["tcp_repair"]["p50_us"]
        result.update({
            "takeover_loaded_us": r1(lt), "tcp_repair_loaded_us": r1(lr),
            "reset_loaded_us": r1(ld["reset"]["p50_us"]),
            "speedup_loaded": round(lr / lt, 2) if lt and lr else None,
            "fast_answered_loaded": ld["takeover"].get("fast_answered", 0),
            "background_rps": round(max(r["background_rps"] for r in ld.values()), 1),
        })
    result.update({
        "takeover_engine_us": r1(idle["takeover"]["engine_us"]),
        "tcp_repair_engine_us": r1(idle["tcp_repair"]["engine_us"]),
        "queue_us": r1(idle["takeover"]["queue_us"]),
        "stages_us": {f"{name}{'_loaded' if bg else ''}": {
            k: r1(lat[bg][name][f"{k}_us"]) for k in ("queue", "out", "engine")}
            for bg in conditions for name in ("tcp_repair", "takeover")},
        "proxy_mbps": r1(up["mbps"]) if up else None,
        "proxy_down_mbps": r1(down["mbps"]) if down else None,
        "forward_mbps": r1(fwd["mbps"]) if fwd else None,
        "watch_mbps": r1(watch["mbps"]) if watch else None,
        # a benign upload's segments the node dropped: out of order past the hold's bounds,
        # held then dropped, or refused by the stack (each makes the client resend)
        "watch_dropped": watch["ooo_dropped"] + watch["held_dropped"] + watch["ooo_expired"]
        + watch["dropped"] if watch else None,
        "watch_held": watch["ooo_held"] if watch else None,
        "watch_retrans": watch["retrans_client"] if watch else None,
        "readers": args.readers, "cold_call_us": cold,
        "takeover_server_clean": sum(lat[b]["takeover"]["server_clean"] for b in conditions),
        "tcp_repair_server_clean": sum(lat[b]["tcp_repair"]["server_clean"]
                                       for b in conditions),
        "takeover_client_resets": sum(lat[b]["takeover"]["client_resets"] for b in conditions),
        "reset_client_resets": sum(lat[b]["reset"]["client_resets"] for b in conditions),
        "iterations": sum(lat[b]["takeover"].get("iterations", 0) for b in conditions),
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
