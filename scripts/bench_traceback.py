"""Benchmark hybrid IP traceback: digest storage per forwarded packet, time to trace a 6-hop
path, how often the true path and ingress are found, false branches, and the per-packet cost
of logging/marking. A table, then one JSON line.

Two parts, both with the same topology: a chain of six routers c1..c6 from the far edge to
the victim's gateway c6, with side routers s2..s5 hanging off c2..c5 (ten routers), an
attacker host behind c1 and behind every side router, bystander hosts, the victim behind c6.

- **testbed**: the routers are network namespaces (``hw-<pid>-...``, deleted afterwards, also on
  failure) running the router role on NFQUEUE; a child process sends background UDP between
  random host pairs (DF set, as Linux sends it) for a warm-up and throughout; then ``--trials``
  times an attacker sends a spoofed-source packet (random source, random attacker), the victim
  captures it and traces it, asking the routers over the overlay: every router and the
  victim run a real ``Overlay`` (joined into one overlay), the query is the authenticated
  traceback RPC. Measured: ``bytes_per_packet`` (all routers'
  digest storage, every slice at its final size and open ones at full size, over all packets
  they forwarded), ``traceback_s`` (median over trials from the 6-hop positions c1 and s2),
  ``path_found``, ``false_branches``.
- **sim**: the same routers as sans-I/O cores, many more packets: ``bytes_per_packet_sim``,
  ``fp_per_table_lookup`` (measured: packets never sent, looked up in every table with the
  trace window), and ``logging_cost_us`` (``RouterCore.forward`` per forwarded packet at the
  busiest router, logging, marking and clearing as they come, about half logged) with
  ``logging_cost_logged_us`` (per logged packet: digest plus Bloom insert), best of five.

    .venv/bin/python scripts/bench_traceback.py [--trials 100] [--warmup 10] [--rate 1500]

``false_branches`` per trial: wrong ingress candidates plus unresolved ends in the
reconstructed graph (``extra_edges``: graph edges off the true path).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.stack.packet import ip_bytes, udp_packet
from node.traceback.bloom import BloomConfig, optimal_bytes_per_packet
from node.traceback.digest import invariant_key
from node.traceback.netbed import RouterNet, wait_for
from node.traceback.query import AttackGraph, trace
from node.traceback.sim import SimNet
from sca.keys import NodeKey

LINKS = [(f"c{i}", f"c{i + 1}") for i in range(1, 6)] + [(f"s{i}", f"c{i}") for i in range(2, 6)]
ATTACKERS = {"a1": "c1", "a2": "s2", "a3": "s3", "a4": "s4", "a5": "s5"}
HOSTS = ATTACKERS | {"b1": "c1", "b3": "c3", "b4": "s4", "vic": "c6"}
SIX_HOP = ("a1", "a2")
SINK_PORT = 9
ATTACK_PORT = 80
KEY = NodeKey.from_private_bytes(b"\x77" * 32)

NOISE_CHILD = """
import random, socket, sys, time, json
sys.path.insert(0, {root!r})
from node.testbed.netns import Namespace
cfg = json.loads(sys.argv[1])
rng = random.Random(cfg["seed"])
socks = [(Namespace.attach(ns).call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)),
          addr) for ns, addr in cfg["hosts"]]
end = time.monotonic() + cfg["seconds"]
sent, period, t = 0, 1.0 / cfg["rate"], time.monotonic()
while time.monotonic() < end:
    (a, src), (_, dst) = rng.sample(socks, 2)
    try:
        a.sendto(rng.randbytes(rng.randrange(16, 200)), (dst, {port}))
        sent += 1
    except OSError:
        pass
    t += period
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)
print(sent)
"""


def true_edges(path: list[str]) -> set[tuple[str, str]]:
    return set(pairwise(path))


def score(g: AttackGraph, name_of, path: list[str], ingress: tuple[str, str]) -> dict:  # type: ignore[no-untyped-def]
    paths = [[name_of(p) for p in pp] for pp in g.paths()]
    ingresses = [(name_of(i.router), i.link) for i in g.ingresses]
    edges = {(name_of(u), name_of(d)) for u, d in g.edges}
    return {"found": path in paths and ingress in ingresses,
            "false": len([i for i in ingresses if i != ingress]) + len(g.unresolved),
            "extra_edges": len(edges - true_edges(path)), "elapsed": g.elapsed_s,
            "queries": g.queries}


# --------------------------------------------------------------------------- testbed

def queue_drops(ns) -> int:  # type: ignore[no-untyped-def]
    """Packets the kernel dropped at the router's NFQUEUE (queue full or netlink overrun)."""
    text = ns.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    return sum(int(f[5]) + int(f[6]) for f in (line.split() for line in text.splitlines())
               if len(f) >= 7)


def run_testbed(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    bloom = BloomConfig(fp_rate=args.fp, slice_s=args.slice)
    with (RouterNet(LINKS, HOSTS, tag="bt") as net, net.run_routers(bloom=bloom) as rr,
          net.querier("vic", KEY) as victim):
        # Sinks: background traffic lands on a bound socket (no ICMP errors back).
        sinks = [net.hosts[h].ns.call(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                 for h in net.hosts]
        for s, h in zip(sinks, net.hosts, strict=True):
            s.bind((net.hosts[h].addr, SINK_PORT))
        sinks.append(net.hosts["vic"].ns.call(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)))
        sinks[-1].bind((net.hosts["vic"].addr, ATTACK_PORT))
        cfg = {"hosts": [[h.ns.name, h.addr] for h in net.hosts.values()], "rate": args.rate,
               "seconds": args.warmup + 600, "seed": args.seed}
        child = subprocess.Popen(
            [sys.executable, "-c", NOISE_CHILD.format(root=str(Path(__file__).parents[1]),
                                                      port=SINK_PORT), json.dumps(cfg)],
            stdout=subprocess.PIPE, text=True)
        try:
            time.sleep(args.warmup)
            results = []
            for _ in range(args.trials):
                atk = rng.choice(list(ATTACKERS))
                spoof = f"10.77.{rng.randrange(1, 99)}.{rng.randrange(1, 254)}"
                if spoof == net.hosts["vic"].addr:
                    spoof = "10.77.250.1"
                token = os.urandom(12)
                pkt = udp_packet(ip_bytes(spoof), ip_bytes(net.hosts["vic"].addr), 40000,
                                 ATTACK_PORT, b"WORM" + token)
                with net.capture("vic") as cap:
                    net.send_raw(atk, pkt)
                    got, at = wait_for(cap, token)
                sent = victim.asker.sent
                g = victim.trace(got, at=at)
                path = net.path(atk, "vic")
                r = score(g, net.by_key, path, (HOSTS[atk], f"h-{atk}"))
                r["hops"] = len(path)
                r["sent"] = victim.asker.sent - sent
                if not r["found"]:
                    print(f"not found: {atk} path {path}: got "
                          f"{[[net.by_key(p) for p in pp] for pp in g.paths()]}, ingresses "
                          f"{[(net.by_key(i.router), i.link) for i in g.ingresses]}, "
                          f"unanswered {[u.router_id for u in g.unanswered]}, "
                          f"{g.queries} queries in {g.elapsed_s:.3f} s", file=sys.stderr)
                results.append(r)
                time.sleep(rng.uniform(0, 0.05))
            # Cold: as herdwall alert trace asks, from an overlay client no router has met
            # (each router answers the retry, after saying hello to it), 6-hop paths.
            cold = []
            for i in range(args.cold):
                with net.querier("vic", KEY, client=True) as client:
                    atk = SIX_HOP[i % 2]
                    got, at = net.attack(atk, "vic", spoof="10.77.250.2")
                    g = client.trace(got, at=at)
                    r = score(g, net.by_key, net.path(atk, "vic"), (HOSTS[atk], f"h-{atk}"))
                    r["sent"] = client.asker.sent
                    cold.append(r)
        finally:
            child.send_signal(signal.SIGTERM)
            child.wait(10)
            for s in sinks:
                s.close()
        drops = sum(queue_drops(net.routers[n].ns) for n in net.routers)
        if args.verbose:
            for n in net.routers:
                print(n, rr.core(n).stats, rr.core(n).store.stats, file=sys.stderr)
        forwarded = sum(rr.core(n).stats.forwarded for n in net.routers)
        logged = sum(rr.core(n).stats.logged for n in net.routers)
        allocated = sum(rr.core(n).store.stats.bytes_allocated for n in net.routers)
        held = sum(rr.core(n).store.stats.bytes_now for n in net.routers)
        closed = sum(rr.core(n).store.stats.bytes_closed_total for n in net.routers)
        in_closed = sum(rr.core(n).store.stats.logged_closed for n in net.routers)
    six = [r["elapsed"] for r in results if r["hops"] == 6]
    return {
        "trials": len(results), "forwarded": forwarded, "logged": logged,
        "logged_share": logged / forwarded, "bytes_allocated": allocated, "bytes_held": held,
        "bytes_per_packet": allocated / forwarded,
        "bytes_per_logged": allocated / logged,
        # Steady state: what closed slices cost per packet in them, times the share logged
        # (the open slices at the end are a fixed cost that a longer run spreads thinner).
        "bytes_per_packet_steady": closed / in_closed * logged / forwarded,
        "traceback_s": statistics.median(six) if six else None,
        "traceback_max_s": max(six) if six else None,
        "six_hop_trials": len(six),
        "path_found": sum(r["found"] for r in results) / len(results),
        "false_branches": statistics.mean(r["false"] for r in results),
        "extra_edges": statistics.mean(r["extra_edges"] for r in results),
        "queries": statistics.mean(r["queries"] for r in results),
        # RPCs sent per trace: queries plus retries (a router that had not met the victim's
        # node yet answers the retry, after its hello), and the first trace's time (cold).
        "rpcs_sent": statistics.mean(r["sent"] for r in results),
        "first_trace_s": results[0]["elapsed"] if results else None,
        "cold_s": statistics.median(r["elapsed"] for r in cold) if cold else None,
        "cold_found": sum(r["found"] for r in cold) / len(cold) if cold else None,
        "cold_rpcs_sent": statistics.mean(r["sent"] for r in cold) if cold else None,
        "queue_drops": drops,
    }


# --------------------------------------------------------------------------- sim

def run_sim(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed + 1)
    net = SimNet(LINKS, HOSTS, bloom=BloomConfig(fp_rate=args.fp, slice_s=args.slice),
                 seed=args.seed)
    hosts = list(HOSTS)
    n, rate = args.sim_packets, args.sim_rate
    pkts = []
    for i in range(n):
        a, b = rng.sample(hosts, 2)
        p = udp_packet(ip_bytes(net.host_addr[a]), ip_bytes(net.host_addr[b]),
                       rng.randrange(1024, 65535), SINK_PORT, rng.randbytes(rng.randrange(8, 64)))
        pkts.append((p, a, b, net.route(a, b), i / rate))
    t0 = time.perf_counter()
    for p, a, b, path, t in pkts:
        net.send(p, a, b, t, path=path)
    send_s = time.perf_counter() - t0
    cores = net.cores.values()
    forwarded = sum(c.stats.forwarded for c in cores)
    logged = sum(c.stats.logged for c in cores)
    allocated = sum(c.store.stats.bytes_allocated for c in cores)

    # Per-table false positives: invariant keys never sent, looked up over the trace window.
    fp_hits = lookups = 0
    span = n / rate
    for _ in range(2000):
        t = rng.uniform(0.2 * span, 0.9 * span)
        inv = invariant_key(udp_packet(ip_bytes("10.77.251.1"), ip_bytes("10.77.252.1"),
                                       rng.randrange(65535), 1, rng.randbytes(8)))
        for c in cores:
            tables = len(c.store.tables)
            lookups += tables
            fp_hits += len({h.link for h in c.lookup(inv, t - 1.0, t + 0.5)})
    # Trials over the sim, with the same window as the testbed.
    found = false = 0
    trials = 1000
    for _ in range(trials):
        atk = rng.choice(list(ATTACKERS))
        t = rng.uniform(0.2 * span, 0.9 * span)
        pkt = udp_packet(ip_bytes("10.77.77.7"), ip_bytes(net.host_addr["vic"]), 40000,
                         ATTACK_PORT, rng.randbytes(16))
        got = net.send(pkt, atk, "vic", t)
        net.now = t
        g = asyncio.run(trace(got, at=t, key=KEY, gateway=net.ref("c6"), ask=net.ask,
                              clock=lambda t=t: t))
        r = score(g, net.name_of, net.route(atk, "vic"), (HOSTS[atk], f"h-{atk}"))
        found += r["found"]
        false += r["false"]

    # The per-packet cost of the router role, sans-I/O, on a fresh core of the busiest router.
    busy = SimNet(LINKS, HOSTS, bloom=BloomConfig(fp_rate=args.fp, slice_s=args.slice))
    stream = []
    for p, a, b, path, t in pkts[:50_000]:
        if "c3" in path:
            i = path.index("c3")
            pre = busy.send(p, a, b, t, path=path[:i]) if i else p
            stream.append((pre, f"h-{a}" if i == 0 else f"to-{path[i - 1]}",
                           f"h-{b}" if i == len(path) - 1 else f"to-{path[i + 1]}", t))
    # Best of five runs on fresh cores (timeit's rule: the minimum is the cost, the rest is
    # other load on a shared machine).
    per_fwd = per_log = float("inf")
    invs = [invariant_key(p) for p, *_ in stream]
    for _ in range(5):
        core = SimNet(LINKS, HOSTS, bloom=BloomConfig(fp_rate=args.fp, slice_s=args.slice),
                      seed=args.seed).cores["c3"]
        fwd = core.forward
        t0 = time.perf_counter()
        for p, i, o, t in stream:
            fwd(p, i, o, t)
        per_fwd = min(per_fwd, (time.perf_counter() - t0) / len(stream) * 1e6)
        core = SimNet(LINKS, HOSTS, bloom=BloomConfig(fp_rate=args.fp, slice_s=args.slice),
                      seed=args.seed).cores["c3"]
        digest, insert = core.digester.hashes, core.store.insert
        t0 = time.perf_counter()
        for k, (_, i, _, t) in zip(invs, stream, strict=True):
            insert(i, digest(k), t)
        per_log = min(per_log, (time.perf_counter() - t0) / len(stream) * 1e6)
    return {
        "sim_forwarded": forwarded, "sim_logged_share": logged / forwarded,
        "bytes_per_packet_sim": allocated / forwarded,
        "bytes_per_logged_sim": allocated / logged,
        "fp_per_table_lookup": fp_hits / lookups,
        "path_found_sim": found / trials, "false_branches_sim": false / trials,
        "logging_cost_us": per_fwd, "logging_cost_logged_us": per_log,
        "sim_send_us_per_hop": send_s / forwarded * 1e6,
        "c3_packets": len(stream),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of background first")
    ap.add_argument("--rate", type=float, default=1500.0, help="background packets/s")
    ap.add_argument("--fp", type=float, default=0.01, help="Bloom false-positive rate")
    ap.add_argument("--slice", type=float, default=BloomConfig.slice_s,
                    help="slice length, seconds")
    ap.add_argument("--sim-packets", type=int, default=200_000)
    ap.add_argument("--sim-rate", type=float, default=10_000.0)
    ap.add_argument("--cold", type=int, default=10,
                    help="traces from a fresh overlay client, as the CLI makes them")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-testbed", action="store_true", help="the sim part only")
    ap.add_argument("--verbose", action="store_true", help="per-router statistics on stderr")
    args = ap.parse_args()

    sim = run_sim(args)
    tb = run_testbed(args) if not args.no_testbed else {}
    floor = optimal_bytes_per_packet(args.fp)
    rows = [
        ("Bloom floor per logged packet (B)", floor),
        ("testbed: packets forwarded (all hops)", tb.get("forwarded")),
        ("testbed: share logged", tb.get("logged_share")),
        ("testbed: bytes per forwarded packet", tb.get("bytes_per_packet")),
        ("testbed: bytes per logged packet", tb.get("bytes_per_logged")),
        ("testbed: bytes per forwarded packet, steady", tb.get("bytes_per_packet_steady")),
        ("testbed: trials / of them 6-hop", f"{tb.get('trials')} / {tb.get('six_hop_trials')}"),
        ("testbed: traceback 6 hops, median s", tb.get("traceback_s")),
        ("testbed: traceback 6 hops, max s", tb.get("traceback_max_s")),
        ("testbed: queries per trace", tb.get("queries")),
        ("testbed: overlay RPCs sent per trace", tb.get("rpcs_sent")),
        ("testbed: first trace, s", tb.get("first_trace_s")),
        ("testbed: cold client (as the CLI), median s", tb.get("cold_s")),
        ("testbed: cold client, RPCs sent per trace", tb.get("cold_rpcs_sent")),
        ("testbed: cold client, path found", tb.get("cold_found")),
        ("testbed: path found", tb.get("path_found")),
        ("testbed: false branches per trial", tb.get("false_branches")),
        ("testbed: extra edges per trial", tb.get("extra_edges")),
        ("testbed: NFQUEUE drops (all routers)", tb.get("queue_drops")),
        ("sim: packets forwarded (all hops)", sim["sim_forwarded"]),
        ("sim: share logged", sim["sim_logged_share"]),
        ("sim: bytes per forwarded packet", sim["bytes_per_packet_sim"]),
        ("sim: bytes per logged packet", sim["bytes_per_logged_sim"]),
        ("sim: FP per table lookup (window 1.5 s)", sim["fp_per_table_lookup"]),
        ("sim: path found (1,000 trials)", sim["path_found_sim"]),
        ("sim: false branches per trial", sim["false_branches_sim"]),
        ("core: forward() per packet, us", sim["logging_cost_us"]),
        ("core: digest + insert per logged packet, us", sim["logging_cost_logged_us"]),
        ("machine load average (1 min)", os.getloadavg()[0]),
    ]
    for name, v in rows:
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        print(f"{name:<46} {text}")
    out = {
        "bytes_per_packet": round(tb["bytes_per_packet"], 4) if tb else None,
        "traceback_s": round(tb["traceback_s"], 4) if tb.get("traceback_s") else None,
        "path_found": tb.get("path_found"),
        "false_branches": round(tb["false_branches"], 3) if tb else None,
        "logging_cost_us": round(sim["logging_cost_us"], 2),
        "logging_cost_logged_us": round(sim["logging_cost_logged_us"], 2),
        "bytes_per_logged": round(tb["bytes_per_logged"], 4) if tb else None,
        "bytes_per_packet_steady": round(tb["bytes_per_packet_steady"], 4) if tb else None,
        "logged_share": round(tb["logged_share"], 4) if tb else None,
        "traceback_max_s": round(tb["traceback_max_s"], 4) if tb.get("traceback_max_s") else None,
        "extra_edges": round(tb["extra_edges"], 3) if tb else None,
        "rpcs_sent": round(tb["rpcs_sent"], 2) if tb else None,
        "first_trace_s": round(tb["first_trace_s"], 4) if tb.get("first_trace_s") else None,
        "cold_s": round(tb["cold_s"], 4) if tb.get("cold_s") else None,
        "cold_rpcs_sent": round(tb["cold_rpcs_sent"], 2) if tb.get("cold_rpcs_sent") else None,
        "cold_found": tb.get("cold_found"),
        "trials": tb.get("trials"),
        "queue_drops": tb.get("queue_drops"),
        "bytes_per_packet_sim": round(sim["bytes_per_packet_sim"], 4),
        "fp_per_table_lookup": round(sim["fp_per_table_lookup"], 5),
        "path_found_sim": sim["path_found_sim"],
        "false_branches_sim": round(sim["false_branches_sim"], 3),
        "fp_rate": args.fp,
        # Timings on a shared 2-core machine: the load says how far to trust them.
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
