#!/usr/bin/env python3
"""Filter benchmark (run as root; builds its own namespaces and deletes them).

- generate_ms per sample service, fp_benign over >= 10,000 benign messages per service, and
  block_mutants over 1,000 exploit mutants per service, each confirmed in the sandbox first;
- install_10k_ms: 10,000 specific filters (typed-set elements) in one atomic batch;
- fwd_ratio_10k: UDP forwarding rate through a router namespace with those 10,000 filters in
  its forward path over the rate with none, in one run.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from filters.generate import generate_filters
from sca.emu.image import load_image
from sca.generate import Detector
from sca.services import SAMPLES, manifest_path, traffic
from sca.verify import Verifier

MUTANTS = 1000
BENIGN_MIN = 10_000
FORWARD_SECONDS = 2.0
ROOT = Path(__file__).resolve().parents[1]


def streams(messages) -> list[bytes]:  # type: ignore[no-untyped-def]
    if messages[0].connection is None:
        return [m.data for m in messages]
    conns: dict[object, bytes] = {}
    for m in messages:
        conns[m.connection] = conns.get(m.connection, b"") + m.data
    return list(conns.values())


def generation(figures: dict[str, float]) -> None:
    fp_total = blocked_total = confirmed_total = 0
    for name in SAMPLES:
        image = load_image(manifest_path(name))
        det, ver = Detector(image), Verifier([image])
        t = traffic(name)
        msgs = tuple(t.exploit())
        g = det.generate(msgs, det.inspect(msgs).detection, ver)  # type: ignore[arg-type]
        assert g is not None
        start = time.perf_counter()
        corpus_rng = random.Random(99)  # a small benign log, not the messages checked below
        corpus = [m for _ in range(30) for m in t.benign(corpus_rng)]
        gen = generate_filters(g.alert, image, detector=det, verifier=ver, benign=corpus)
        figures[f"generate_{name}_ms"] = (time.perf_counter() - start) * 1000
        general = gen.general
        rng = random.Random(1)
        benign: list[bytes] = []
        while len(benign) < BENIGN_MIN:
            benign += streams(t.benign(rng))
        fp = sum(bool(general and general.matches(b)) for b in benign)
        blocked = confirmed = 0
        for i in range(MUTANTS):
            mutant = t.exploit(random.Random(50_000 + i))
            if det.inspect(tuple(mutant)).detection is None:
                continue
            confirmed += 1
            blocked += bool(general and any(general.matches(s) for s in streams(mutant)))
        figures[f"fp_benign_{name}"] = fp
        figures[f"block_mutants_{name}"] = blocked / max(confirmed, 1)
        figures[f"benign_{name}"] = len(benign)
        fp_total += fp
        blocked_total += blocked
        confirmed_total += confirmed
    figures["fp_benign"] = fp_total
    figures["block_mutants"] = blocked_total / max(confirmed_total, 1)


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


def in_ns(ns: str, code: str, timeout: float = 60) -> str:
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                         capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(out.stderr)
    return out.stdout


INSTALL = """
import json, time
from filters.condition import Filter, Specific
from filters.nft import FilterTable
from node.kernel.marks import MASK, QUEUE_STACK
from node.kernel.nft import NftTable
nft = NftTable()
t = FilterTable(nft.apply_text, nft.query_text, queue_mark=QUEUE_STACK, mark_mask=MASK)
fs = [Filter(b"\\x01" * 32, "bench", "udp", 1434, Specific(73, (i + 1).to_bytes(4, "big")))
      for i in range(10_000)]
start = time.perf_counter()
t.install(fs)
print(json.dumps({"ms": (time.perf_counter() - start) * 1000, "n": len(t.list())}))
"""

SEND = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
payload = b"\\x04" + b"MSSQLSERVER" + b"\\x00" * 60
end = time.perf_counter() + {secs}
n = 0
while time.perf_counter() < end:
    s.sendto(payload, ("10.77.2.2", 1434)); n += 1
print(n)
"""

RECV = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(("10.77.2.2", 1434)); s.settimeout(0.5)
n = 0
start = time.perf_counter()
while True:
    try:
        s.recv(2048); n += 1
    except TimeoutError:
        break
print(n)
"""


def forwarding(figures: dict[str, float]) -> None:
    tag = secrets.token_hex(3)
    a, r, b = f"hwbfa{tag}", f"hwbfr{tag}", f"hwbfb{tag}"
    try:
        for ns in (a, r, b):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "ra",
           "netns", r)
        sh("ip", "-n", b, "link", "add", "vb", "type", "veth", "peer", "name", "rb",
           "netns", r)
        for ns, dev, addr in ((a, "va", "10.77.1.2/24"), (r, "ra", "10.77.1.1/24"),
                              (r, "rb", "10.77.2.1/24"), (b, "vb", "10.77.2.2/24")):
            sh("ip", "-n", ns, "addr", "add", addr, "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        # Routes only inside the testbed: each end reaches the other through the router.
        sh("ip", "-n", a, "route", "add", "10.77.2.0/24", "via", "10.77.1.1")
        sh("ip", "-n", b, "route", "add", "10.77.1.0/24", "via", "10.77.2.1")
        sh("ip", "netns", "exec", r, "sysctl", "-qw", "net.ipv4.ip_forward=1")

        def rate() -> float:
            recv = subprocess.Popen(["ip", "netns", "exec", b, sys.executable, "-c", RECV],
                                    stdout=subprocess.PIPE, text=True, cwd=ROOT)
            time.sleep(0.3)
            sent = int(in_ns(a, SEND.format(secs=FORWARD_SECONDS)))
            got = int(recv.communicate(timeout=30)[0])
            return got / FORWARD_SECONDS if sent else 0.0

        base = rate()
        out = json.loads(in_ns(r, INSTALL))
        with_filters = rate()
        figures["install_10k_ms"] = out["ms"]
        figures["installed"] = out["n"]
        figures["fwd_pps_none"] = base
        figures["fwd_pps_10k"] = with_filters
        figures["fwd_ratio_10k"] = with_filters / base if base else 0.0
    finally:
        for ns in (a, r, b):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def main() -> None:
    figures: dict[str, float] = {}
    forwarding(figures)
    generation(figures)
    targets = {"install_10k_ms": ("<=", 60), "fwd_ratio_10k": (">=", 0.9),
               "fp_benign": ("==", 0), "block_mutants": ("==", 1.0)}
    table = Table(title="herdwall filters")
    for col in ("figure", "value", "target", "met"):
        table.add_column(col)
    for k, v in figures.items():
        tgt = targets.get(k)
        met = ""
        if tgt:
            op, x = tgt
            met = "yes" if (v <= x if op == "<=" else v >= x if op == ">=" else v == x) else "NO"
        table.add_row(k, f"{v:,.3f}", f"{tgt[0]} {tgt[1]}" if tgt else "", met)
    Console().print(table)
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
