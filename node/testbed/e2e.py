"""End-to-end containment on Vigilante's five hosts: the exploit reaches the detector, the alert
travels through three verifying relays, the specific filter becomes active at the vulnerable
host. Used by ``scripts/bench_e2e.py`` and the end-to-end test.

``ChainRun`` builds the strict chain (``node.testbed.hosts.Chain``: a host reaches only its
neighbours, so the overlay must relay), starts a node on the detector, the relays and the
vulnerable host (all protect the resolver and httpd, so every relay can verify), gives the
detector's ports something that listens (a UDP socket, a TCP server that reads and closes: the
exploit is then delivered as it would be to a real server, and the node sees it through its
stack), and waits until every node has an overlay peer.

``measure(service, rng)`` sends one exploit variant from the attacker and returns the time from
the moment the exploit's last packet left the attacker (it reaches the detector some tens of
microseconds later over the veth) to the ``filter.installed`` event of the vulnerable host's
node for the specific filter of *that* alert (the node emits it once its nft batch is applied),
and, when asked, to the general filter too. Between samples the filters of the alert are removed
by operator command on every node, so the next variant meets no filter on its way (an operator
removal is remembered: a general filter taken away is not put back by the next alert).

``inject="control"`` skips the wire and the detector's stack: the exploit's messages are handed
to the detector's pipeline over its control socket (``detector.submit``) — for when the stack
component is missing, and to see how much of the time the capture path takes.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from node.testbed.daemons import Fleet, NodeProc
from node.testbed.hosts import Chain
from node.testbed.netns import Namespace
from node.testbed.worm import Harness, HarnessThread, HostSpec
from sca.alert import Message
from sca.services import load_manifest, traffic

SERVICES = ("resolver", "httpd")


@dataclass
class Sample:
    service: str
    alert_id: str
    specific_ms: float
    general_ms: float | None = None
    detect_ms: float | None = None  # exploit sent -> alert.detected at the detector
    relays_verified: int = 0  # relays whose node verified this alert before it reached vul
    via: str = ""  # the vulnerable node's peer that delivered it, if the event says
    # When each node had it, ms after the exploit: detected at det, verified at the others.
    arrivals: dict[str, float] = field(default_factory=dict)


class Sinks:
    """Listeners on the detector's service ports inside its namespace: a UDP socket that
    drains datagrams and a TCP server that accepts, reads to the end and closes."""

    def __init__(self, ns: Namespace, addr: str, ports: dict[str, tuple[str, int]]) -> None:
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        for proto, port in ports.values():
            kind = socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM

            def make(kind: int = kind, port: int = port) -> socket.socket:
                s = socket.socket(socket.AF_INET, kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((addr, port))
                if kind == socket.SOCK_STREAM:
                    s.listen(64)
                s.settimeout(0.2)
                return s

            s = ns.call(make)
            self._socks.append(s)
            t = threading.Thread(target=self._udp if kind == socket.SOCK_DGRAM else self._tcp,
                                 args=(s,), daemon=True)
            t.start()
            self._threads.append(t)

    def _udp(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                s.recv(65535)

    def _tcp(self, s: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = s.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                while conn.recv(65536):
                    pass

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(1)
        for s in self._socks:
            s.close()


@dataclass
class ChainRun:
    """The chain with its nodes up (a context manager: everything is removed on exit)."""

    relays: int = 3
    routed: bool = False  # True: the relays forward IP and every node reaches every other
    join_s: float = 30.0
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    root: Path | None = None
    chain: Chain | None = None
    fleet: Fleet | None = None
    sinks: Sinks | None = None
    notes: list[str] = field(default_factory=list)
    last_alert: tuple[str, float] | None = None  # (alert id, sent at) of the last sample
    services: bool = False  # the emulated resolver at vul (on its client-side address)
    harness: HarnessThread | None = None

    def __enter__(self) -> ChainRun:
        try:
            self.chain = Chain(self.relays, routed=self.routed, tag="e2e")
            if self.services:
                vul, cli = self.chain["vul"], self.chain["cli"]
                hosts = [HostSpec(vul.ns.name, vul.right or "", "vulnerable"),
                         HostSpec(cli.ns.name, cli.left or "", "client")]
                self.harness = HarnessThread(Harness(hosts, pool=[vul.right or ""],
                                                     client_rate=0))
                self.harness.start()
            specs = [replace(s, services=SERVICES) for s in self.chain.node_specs(self.settings)]
            self.fleet = Fleet(specs, root=self.root)
            self.fleet.start()
            det = self.chain["det"]
            ports = {n: (str(m["proto"]), int(m["port"]))
                     for n in SERVICES for m in [load_manifest(n)]}
            self.sinks = Sinks(det.ns, det.left or "", ports)
            self.wait_overlay()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.harness is not None:
            self.harness.stop()
        if self.sinks is not None:
            self.sinks.close()
        if self.fleet is not None:
            self.fleet.close()
        if self.chain is not None:
            self.chain.close()

    def node(self, name: str) -> NodeProc:
        assert self.chain is not None and self.fleet is not None
        ns = self.chain[name].ns.name
        return next(n for n in self.fleet if n.spec.ns == ns)

    def components(self) -> list[str]:
        with contextlib.suppress(Exception):
            st = self.node("det").request("status", timeout=5)
            return [c["name"] for c in st.get("components", []) if c.get("state") == "running"]
        return []

    def wait_overlay(self) -> None:
        """Until every node has its neighbours on the line as overlay peers (strict: the line
        is connected end to end), or every other node (routed), or ``join_s``."""
        assert self.fleet is not None
        comps = self.components()
        if not any("overlay" in c for c in comps):
            self.notes.append(f"no overlay in the nodes (components: {', '.join(comps) or 'none'})"
                              ": alerts cannot travel")
            return
        deadline = time.monotonic() + self.join_s
        assert self.chain is not None
        binds = {n.spec.ns: n.spec.addr for n in self.fleet}
        want = {self.node(h.name).spec.ns: set(self.chain.neighbours(h.name))
                - {self.chain["atk"].right, self.chain["cli"].left}
                for h in self.chain.hosts if h.name not in ("atk", "cli")}
        if self.routed:  # everyone reaches everyone, each by its one overlay address
            want = {ns: {a for other, a in binds.items() if other != ns} for ns in binds}
        waiting = list(self.fleet)
        while waiting and time.monotonic() < deadline:
            waiting = [n for n in waiting
                       if not want[n.spec.ns] <= {str(p.get("host")) for p in _peers(n)}]
            if waiting:
                time.sleep(0.2)
        if waiting:
            self.notes.append(f"{len(waiting)} node(s) without their neighbours as peers after "
                              f"{self.join_s:.0f} s (components: "
                              f"{', '.join(self.components()) or 'none'})")

    # --- one sample ---------------------------------------------------------------------------

    def send(self, service: str, messages: list[Message]) -> float:
        """Deliver the exploit from the attacker to the detector over the wire; returns the
        wall-clock time just before the exploit's last packet was sent."""
        assert self.chain is not None
        atk, det = self.chain["atk"], self.chain["det"]
        proto, port = str(load_manifest(service)["proto"]), int(load_manifest(service)["port"])
        target = (det.left or "", port)

        def udp() -> float:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for m in messages[:-1]:
                    s.sendto(m.data, target)
                t = time.time()
                s.sendto(messages[-1].data, target)
                return t

        def tcp() -> float:
            t = 0.0
            conns: dict[int, list[bytes]] = {}
            for m in messages:
                conns.setdefault(m.connection or 0, []).append(m.data)
            order = list(conns)
            for c in order:
                with socket.create_connection(target, timeout=5) as s:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    for i, chunk in enumerate(conns[c]):
                        if c == order[-1] and i == len(conns[c]) - 1:
                            t = time.time()
                        s.sendall(chunk)
                    s.shutdown(socket.SHUT_WR)
            return t

        return atk.ns.call(udp if proto == "udp" else tcp)

    def inject(self, service: str, messages: list[Message]) -> float:
        """The same messages straight into the detector's pipeline (control socket)."""
        t = time.time()
        self.node("det").request("detector.submit", service=service,
                                 messages=[[m.connection, m.data.hex()] for m in messages])
        return t

    def measure(self, service: str, rng: random.Random | None, *, general: bool = False,
                inject: str = "wire", timeout: float = 10.0) -> Sample:
        msgs = variant(service, rng) if rng is not None else list(traffic(service).exploit())
        t0 = (self.send if inject == "wire" else self.inject)(service, msgs)
        det, vul = self.node("det"), self.node("vul")
        detected = _wait_for(det, "alert.detected", t0, timeout, service=service)
        aid = str(detected["alert_id"])
        try:
            spec = _wait_for(vul, "filter.installed", t0, timeout, alert_id=aid,
                             kind="specific")
        finally:
            self.last_alert = (aid, t0)
        gen = None
        if general:
            gen = _wait_for(vul, "filter.installed", t0, timeout * 3, kind="general",
                            service=service)
        assert self.chain is not None
        # When it happened (a node's event may wait for the alert's hand-off to its peers).
        arrivals = {"det": (detected.get("detected_at_s", detected["timestamp_s"]) - t0) * 1e3}
        # The event is written after the node's own work on the alert, which may end after
        # the vulnerable host's filter: wait a moment for it.
        for h in [*self.chain.relay_hosts, self.chain["vul"]]:
            try:
                rec = _wait_for(self.node(h.name), "alert.verified", t0, 1.0, alert_id=aid)
            except TimeoutError:
                continue
            arrivals[h.name] = (rec.get("verdict_at_s", rec["timestamp_s"]) - t0) * 1e3
        relays = sum(1 for r in self.chain.relay_hosts
                     if r.name in arrivals and arrivals[r.name] <= arrivals.get("vul", 1e18))
        via = next((str(e.get("from_peer", "")) for e in vul.events()
                    if e.get("alert_id") == aid and e.get("from_peer")), "")
        return Sample(service, aid, (spec["timestamp_s"] - t0) * 1e3,
                      (gen["timestamp_s"] - t0) * 1e3 if gen else None,
                      arrivals["det"], relays, via, arrivals)

    def settle(self, alert_id: str, since: float, timeout: float = 30.0) -> None:
        """Until every node that took ``alert_id`` has finished deriving its general filter
        (installed, skipped or failed): samples then start from idle nodes, not while the
        previous one's filter generation takes the CPU."""
        assert self.fleet is not None
        done = ("filter.skipped", "filter.error", "detector.error")
        deadline = time.monotonic() + timeout
        for n in self.fleet:
            while time.monotonic() < deadline:
                evs = [e for e in n.events() if e.get("timestamp_s", 0) >= since
                       and e.get("alert_id") == alert_id]
                if not evs or any(e.get("event_type") in done or (
                        e.get("event_type") == "filter.installed"
                        and e.get("kind") == "general") for e in evs):
                    break
                time.sleep(0.05)

    def ask_vul(self, data: bytes, timeout: float = 1.0) -> bytes | None:
        """One datagram from the client to the vulnerable host's resolver; its reply, or None
        (no reply: dropped by a filter, or a datagram the resolver does not answer)."""
        assert self.chain is not None
        cli, vul = self.chain["cli"], self.chain["vul"]

        def go() -> bytes | None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(timeout)
                s.sendto(data, (vul.right or "", 1434))
                try:
                    return s.recv(4096)
                except TimeoutError:
                    return None

        return cli.ns.call(go)

    def clear_filters(self) -> None:
        """Remove every installed filter on every node (operator removal: remembered)."""
        assert self.fleet is not None
        for n in self.fleet:
            with contextlib.suppress(Exception):
                ids = [f["filter_id"] for f in n.request("filters", timeout=5)]
                if ids:
                    n.request("filter.remove", timeout=10, ids=ids)


TARGET_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


def variant(service: str, rng: random.Random) -> list[Message]:
    """A random exploit variant whose hijack target differs too (random letters and digits,
    which no parser stops at). The sample generators keep the target fixed and vary the
    rest, but the specific filter is made from the target's bytes: every variant of theirs
    has the same specific filter, and a sample's filter would already be in place for the
    next one. Another target is another exploit, with a specific filter of its own."""
    gen = traffic(service)
    case = gen.exploit_case(rng)
    verification = case.verification
    refs = getattr(verification, "target", ())[:gen.TARGET_BYTES]
    data = [bytearray(m.data) for m in case.messages]
    for ref in refs:
        data[ref.message][ref.offset] = rng.choice(TARGET_ALPHABET)
    return [Message(bytes(d), m.connection) for d, m in zip(data, case.messages, strict=True)]


def _peers(n: NodeProc) -> list[Any]:
    try:
        return list(n.request("status", timeout=3).get("peers") or [])
    except Exception:
        return []


def _wait_for(node: NodeProc, event_type: str, since: float, timeout: float,
              **fields: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        rec = node.first(event_type, since=since - 0.001, **fields)
        if rec is not None:
            return rec
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {event_type} {fields or ''} at {node.spec.ns} within "
                               f"{timeout:.0f} s")
        time.sleep(0.002)


@contextlib.contextmanager
def chain_run(**kwargs: Any) -> Iterator[ChainRun]:
    with ChainRun(**kwargs) as run:
        yield run
