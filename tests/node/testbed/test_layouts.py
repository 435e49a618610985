"""Testbed layouts: the 5-host Vigilante chain (detector → 3 relays → vulnerable host), pinned
by its wiring or routed along the line; the worm bed's roles and the detectors' dark space."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from node.testbed import Namespace, leftovers
from node.testbed.hosts import POOL, Chain, WormBed

pytestmark = pytest.mark.netns
IP_RECVTTL = 12  # not in Python's socket module


def _probe(src: Namespace, dst: Namespace, dst_addr: str) -> tuple[str, int | None, str]:
    """Send one UDP datagram from ``src`` to ``dst_addr`` (in ``dst``); return the send
    outcome, the TTL it arrived with (None: it did not arrive) and the source address seen."""

    def rx() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((dst_addr, 5555))
        s.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
        s.settimeout(0.5)
        return s

    def tx() -> str:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                s.sendto(b"probe", (dst_addr, 5555))
                return "sent"
            except OSError as e:
                return os.strerror(e.errno or 0)

    r = dst.call(rx)
    try:
        sent = src.call(tx)
        try:
            _data, anc, _flags, addr = r.recvmsg(64, 64)
        except TimeoutError:
            return sent, None, ""
        ttl = int.from_bytes(anc[0][2][:4], "little")
        return sent, ttl, addr[0]
    finally:
        r.close()


def test_strict_chain_only_neighbours_reach_each_other() -> None:
    with Chain() as ch:
        names = ch.namespaces()
        assert [h.name for h in ch.hosts] == ["atk", "det", "r1", "r2", "r3", "vul", "cli"]
        det = ch["det"]
        # det reaches r1 over their link, and nothing beyond it: no forwarding, no routes.
        assert _probe(det.ns, ch["r1"].ns, ch["r1"].left or "")[1] == 64
        for far in ("r2", "r3", "vul"):
            sent, ttl, _ = _probe(det.ns, ch[far].ns, ch[far].left or "")
            assert ttl is None and sent == "Network is unreachable"
        # Each node's bootstrap peers are its neighbours on the line (never atk or cli).
        specs = {s.ns: s for s in ch.node_specs()}
        assert [s.ns for s in ch.node_specs()] == [ch[n].ns.name for n in
                                                   ("det", "r1", "r2", "r3", "vul")]
        assert specs[det.ns.name].bootstrap == [f"{ch['r1'].left}:7400"]
        assert specs[det.ns.name].detector and not specs[ch["r2"].ns.name].detector
        assert specs[ch["r2"].ns.name].bootstrap == [f"{ch['r1'].right}:7400",
                                                      f"{ch['r3'].left}:7400"]
        assert specs[ch["vul"].ns.name].bootstrap == [f"{ch['r3'].right}:7400"]
        for h in ch.hosts:
            routes = h.ns.run(["ip", "route"]).stdout
            assert "default" not in routes and "via" not in routes
    assert not set(names) & set(leftovers())


def test_routed_chain_goes_detector_through_three_relays_to_the_vulnerable_host() -> None:
    with Chain(routed=True) as ch:
        det, vul = ch["det"], ch["vul"]
        sent, ttl, src = _probe(det.ns, vul.ns, vul.left or "")
        assert sent == "sent" and ttl == 64 - 3  # three routers: r1, r2, r3
        assert src == det.right  # det's address on the link to r1
        # The kernel's own answer: the path to the vulnerable host leaves det towards r1.
        route = det.ns.run(["ip", "route", "get", vul.left or ""]).stdout
        assert f"via {ch['r1'].left}" in route and "dev to-r1" in route
        for relay in ("r1", "r2", "r3"):
            fwd = ch[relay].ns.call(Path("/proc/sys/net/ipv4/ip_forward").read_text)
            assert fwd.strip() == "1"
        # The attacker reaches the vulnerable host only across det and the three relays.
        assert _probe(ch["atk"].ns, vul.ns, vul.left or "")[1] == 64 - 4
        # Nodes: one overlay address each (the left one, routed to from everywhere), and the
        # neighbours on the line as bootstrap peers.
        specs = ch.node_specs()
        assert [s.addr for s in specs] == [ch[n].left for n in ("det", "r1", "r2", "r3", "vul")]
        assert specs[2].bootstrap == [f"{ch['r1'].left}:7400", f"{ch['r3'].left}:7400"]
        assert _probe(vul.ns, det.ns, det.left or "")[1] == 64 - 3
        for h in ch.hosts:
            assert "default" not in h.ns.run(["ip", "route"]).stdout


def test_worm_bed_roles_and_dark_space() -> None:
    with WormBed(vulnerable=5, detectors=2, tag="wl") as wb:
        wb.wait_ready()
        roles = [r.name for r in wb.roles]
        assert roles == ["attacker", "client", "detector", "detector"] + ["vulnerable"] * 5
        assert [r.addr for r in wb.roles] == [f"10.77.0.{i}" for i in range(1, 10)]
        dark = [a for addrs in wb.dark_addrs.values() for a in addrs]
        assert len(dark) == 254 - 9 and len(set(dark)) == len(dark)
        assert set(dark).isdisjoint(r.addr for r in wb.roles)
        det = wb.of("detector")[0]
        got = det.ns.run(["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        assert all(f"inet {a}/16" in got for a in wb.dark_addrs[det.addr])
        # A datagram to a dark address reaches the detector that owns it.
        target = wb.dark_addrs[det.addr][-1]
        assert _probe(wb.of("attacker")[0].ns, det.ns, target)[1] == 64
        assert [s.role for s in wb.specs()][:4] == ["seed", "client", "sink", "sink"]
        specs = wb.node_specs()
        assert len(specs) == 7 and sum(s.detector for s in specs) == 2
        assert specs[0].bootstrap == [f"{wb.of('detector')[1].addr}:7400"]
        assert specs[-1].bootstrap == [f"{d.addr}:7400" for d in wb.of("detector")]
        assert POOL == "10.77.0.0/24"
