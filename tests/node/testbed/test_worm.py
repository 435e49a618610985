"""The worm harness: the emulated resolver behind real sockets in host namespaces, infection by
the exploit, the scanner that hits other testbed hosts, and the safety rules (nothing leaves
10.77.0.0/16, sockets only in hw- namespaces, no namespace left behind)."""

from __future__ import annotations

import ipaddress
import os
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.testbed import Namespace, Testbed, leftovers
from node.testbed.hosts import WormBed
from node.testbed.runner import HarnessProc, summarize
from node.testbed.worm import (
    PORT,
    EmulatedService,
    Harness,
    HarnessError,
    HarnessThread,
    HostSpec,
    Reporter,
    check_target,
    expand_pool,
    ns_socket,
)
from sca.services import traffic

TESTBED_NET = ipaddress.IPv4Network("10.77.0.0/16")
RESOLVER = traffic("resolver")


# --- no namespaces needed -------------------------------------------------------------------


@pytest.mark.parametrize("addr", ["8.8.8.8", "10.78.0.1", "10.77.0.0", "10.77.255.255",
                                  "127.0.0.1", "::1", "nonsense"])
def test_targets_outside_the_testbed_are_refused(addr: str) -> None:
    with pytest.raises(HarnessError):
        check_target(addr)


def test_pool_expansion_stays_inside_the_testbed() -> None:
    assert expand_pool(["10.77.0.0/30", "10.77.0.1", "10.77.9.9/32"]) == [
        "10.77.0.1", "10.77.0.2", "10.77.9.9"]
    assert len(expand_pool(["10.77.0.0/24"])) == 254
    for bad in (["10.0.0.0/8"], ["192.168.1.0/24"], ["10.77.0.0/15"], [], ["x"]):
        with pytest.raises(HarnessError):
            expand_pool(bad)


def test_sockets_only_in_testbed_namespaces() -> None:
    with pytest.raises(HarnessError, match="not a testbed namespace"):
        ns_socket("default", ("0.0.0.0", 0))
    with pytest.raises(HarnessError):
        ns_socket("hw-x", ("8.8.8.8", 0))


def test_emulated_service_answers_benign_and_is_hijacked_by_exploits() -> None:
    svc = EmulatedService()
    rng = random.Random(7)
    for _ in range(20):
        v = svc.handle(RESOLVER.benign(rng)[0].data)
        assert not v.hijacked and v.outcome == "blocked" and v.replies
    v = svc.handle(b"\x04MSSQLSERVER\x00")
    assert v.replies[0].startswith(b"\x05") and b"MSSQLSERVER" in v.replies[0]
    assert svc.handle(b"\x0a").replies == (b"\x0a",)
    canonical = RESOLVER.exploit()[0].data
    v = svc.handle(canonical)
    assert v.hijacked and not v.replies and "tainted control transfer" in v.detail
    # Variants with random filler and trailers, each a datagram of its own, are caught too.
    for _ in range(5):
        msgs = RESOLVER.exploit(random.Random(rng.random()))
        assert svc.handle(msgs[-1].data).hijacked
    taint_runs = svc.taint_runs
    assert svc.handle(canonical).hijacked and svc.taint_runs == taint_runs  # cached verdict


def test_strict_mode_replays_everything_with_taint() -> None:
    svc = EmulatedService(confirm="always")
    assert not svc.handle(b"\x02").hijacked and svc.taint_runs == 1
    assert svc.handle(RESOLVER.exploit()[0].data).hijacked


# --- in namespaces --------------------------------------------------------------------------


class Capture:
    """Every IPv4 destination seen on the testbed's switch (AF_PACKET on all the bridge's
    ports, in the switch namespace), to check that nothing is addressed outside the testbed."""

    def __init__(self, switch: Namespace) -> None:
        def make() -> socket.socket:
            # Unbound: every interface of the switch namespace (the bridge itself only sees
            # frames addressed to it; its ports see everything that crosses the switch).
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
            s.settimeout(0.2)
            return s

        self.sock = switch.call(make)
        self.dests: set[str] = set()
        self.udp_to_port: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if frame[12:14] == b"\x08\x00" and len(frame) >= 38:
                self.dests.add(socket.inet_ntoa(frame[30:34]))
                ihl = (frame[14] & 0x0F) * 4
                if frame[23] == 17:
                    port = int.from_bytes(frame[14 + ihl + 2:14 + ihl + 4], "big")
                    self.udp_to_port[port] = self.udp_to_port.get(port, 0) + 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def bed(testbed_factory) -> Testbed:  # type: ignore[no-untyped-def]
    return testbed_factory(6, tag="wm")


@pytest.fixture
def capture(bed: Testbed) -> Iterator[Capture]:
    assert bed.switch is not None
    cap = Capture(bed.switch)
    yield cap
    cap.close()


def _send_from(ns: Namespace, src: str, dst: str, data: bytes,
               want_reply: bool = False) -> bytes | None:
    def go() -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((src, 0))
            s.settimeout(2)
            s.sendto(data, (dst, PORT))
            return s.recv(4096) if want_reply else None

    return ns.call(go)


def _wait(cond, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


@pytest.mark.netns
def test_benign_client_gets_real_replies(bed: Testbed) -> None:
    hosts = [HostSpec(bed[1].name, bed[1].addr, "vulnerable")]
    with HarnessThread(Harness(hosts, pool=["10.77.0.0/29"], client_rate=0)) as ht:
        ht.start()
        reply = _send_from(bed[0].ns, bed[0].addr, bed[1].addr, b"\x04SQLEXPRESS\x00", True)
        assert reply is not None and reply.startswith(b"\x05")
        assert b"InstanceName;SQLEXPRESS;" in reply and b"tcp;1533;;" in reply
        reply = _send_from(bed[0].ns, bed[0].addr, bed[1].addr, b"\x02", True)
        assert reply is not None and reply.count(b"ServerName;") == 4
        assert ht.infected() == []


@pytest.mark.netns
def test_an_exploit_infects_and_the_scanner_hits_other_testbed_hosts(
        bed: Testbed, capture: Capture) -> None:
    # 0 sends the exploit by hand; 1 is vulnerable; 2 and 3 are sinks (detectors); 4 is a
    # client; 5 is vulnerable too. No seed: the worm enters only through the hand-sent datagram.
    hosts = [HostSpec(bed[1].name, bed[1].addr, "vulnerable"),
             HostSpec(bed[2].name, bed[2].addr, "sink"),
             HostSpec(bed[3].name, bed[3].addr, "sink"),
             HostSpec(bed[4].name, bed[4].addr, "client"),
             HostSpec(bed[5].name, bed[5].addr, "vulnerable")]
    pool = [h.addr for h in bed.hosts[1:4]] + [bed[5].addr, "10.77.0.200"]  # one empty address
    reporter = Reporter()
    h = Harness(hosts, pool=pool, rate=50, reporter=reporter, client_rate=10)
    with HarnessThread(h) as ht:
        ht.start()
        ht.release()  # no seeds: scanning is allowed, but only infected hosts scan
        time.sleep(0.3)
        assert ht.infected() == []
        _send_from(bed[0].ns, bed[0].addr, bed[1].addr, RESOLVER.exploit()[0].data)
        assert _wait(lambda: len(ht.infected()) == 2, 10), ht.infected()
        assert _wait(lambda: len(reporter.of("exploit")) == 2, 10)
        time.sleep(0.3)
    infected = {e["host"]: e for e in reporter.of("infected")}
    assert infected[bed[1].addr]["src"] == bed[0].addr  # by hand
    assert infected[bed[5].addr]["src"] == bed[1].addr  # by the first host's scanner
    assert {e["host"] for e in reporter.of("exploit")} == {bed[2].addr, bed[3].addr}
    hosts_end = {e["host"]: e for e in reporter.of("host")}
    assert hosts_end[bed[1].addr]["scans"] > 10 and hosts_end[bed[2].addr]["exploits"] > 0
    client = reporter.of("client")[0]
    assert client["sent"] > 3 and client["answered"] == client["sent"]
    # Nothing addressed outside the testbed, and the scans were on the service's port.
    link_local_mcast = ipaddress.IPv4Network("224.0.0.0/24")  # IGMP reports: never routed
    assert len(capture.dests) > 3 and all(
        ipaddress.IPv4Address(d) in TESTBED_NET or ipaddress.IPv4Address(d) in link_local_mcast
        for d in capture.dests), capture.dests
    assert capture.udp_to_port.get(PORT, 0) > 10
    # The scanners stopped with the run.
    before = capture.udp_to_port.get(PORT, 0)
    time.sleep(0.3)
    assert capture.udp_to_port.get(PORT, 0) == before


@pytest.mark.netns
def test_hosts_have_no_route_out(bed: Testbed) -> None:
    for host in bed.hosts:
        routes = host.ns.run(["ip", "route"]).stdout
        assert "default" not in routes and "10.77.0.0/16" in routes
        r = host.ns.run(["ip", "route", "get", "8.8.8.8"], check=False)
        assert r.returncode != 0  # unreachable: no route out of the testbed


@pytest.mark.netns
def test_without_herdwall_the_worm_infects_the_vulnerable_hosts(tmp_path: Path) -> None:
    """The harness as a child process, as the demo runs it: the seed scans, the vulnerable
    hosts fall one after another, the sink sees the worm, and the bed is gone afterwards."""
    with WormBed(vulnerable=6, detectors=1, dark=False, tag="wr") as wb:
        names = wb.namespaces()
        wb.wait_ready()
        pool = [r.addr for r in wb.roles]  # only live hosts: a fast, short run
        proc = HarnessProc(tmp_path, wb.specs(), pool=pool, rate=30, client_rate=5,
                           stop_when_all_infected=True, duration=30)
        proc.start()
        try:
            assert proc.wait(40) == 0, proc.stderr()
        finally:
            proc.stop()
        s = summarize(proc.events())
    assert s["vulnerable"] == 6 and s["infected"] == 6 and s["infected_frac"] == 1.0
    assert s["first_detector_hit_s"] is not None
    assert s["benign_answered"] > 0
    assert not set(names) & set(leftovers())


@pytest.mark.netns
def test_nothing_is_left_behind_when_a_run_fails() -> None:
    mine = f"hw-{os.getpid()}-wf"
    with pytest.raises(RuntimeError, match="on purpose"), WormBed(vulnerable=2, detectors=1,
                                                                  tag="wf") as wb:
        assert len([n for n in leftovers() if n.startswith(mine)]) == len(wb.namespaces())
        raise RuntimeError("on purpose")
    assert not [n for n in leftovers() if n.startswith(mine)]
