"""Router testbeds: router namespaces joined by point-to-point links, hosts on edge links, and
the traceback router role running in each router (for tests, the benchmark and demos).

    net = RouterNet([("r1", "r2"), ("r2", "r3")], hosts={"atk": "r1", "vic": "r3"})
    with net:                              # namespaces made; deleted on exit, also on failure
        with net.run_routers() as routers: # overlay + router role in every router
            with net.querier("vic", key) as q:  # the victim's overlay node
                graph = q.trace(packet, at=when)

Each router runs what a daemon with ``[traceback] router = true`` runs: an ``Overlay`` bound
to its address (``OVERLAY_PORT``), the router role on NFQUEUE (``RouterService``) and the
query served on the overlay (``QueryService``), on a loop thread of its own that lives inside
the router's namespace (so every socket it makes is there). The overlays join through the
first router, as overlay peers do; the querier joins too (``client=True``: a fresh client as
``herdwall alert trace`` runs, which no router has met). ``run_daemons`` runs real
``herdwall node run`` processes in the routers instead, and ``victim_node`` sets up what the
victim's node has after a detection (key, store with the alert's packets, config).

Addresses follow the testbed rules (``node.testbed.netns``): all in 10.77.0.0/16; link i is
10.77.(100+i).0/24 (.1 on the first router named, .2 on the second), host j sits on
10.77.(1+j).0/24 (router .1, host .2). Routers get a route to every subnet by shortest path;
hosts get 10.77.0.0/16 via their router. There is no default route anywhere, and forwarding
and reverse-path filtering are set per namespace (the sysctls are per network namespace), so
spoofed sources reach the victim: nothing leaves the testbed.

Interfaces are named after what is on the other end: ``to-r2`` on a router, ``h-atk`` for a
host's edge link; every host has ``eth0``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Coroutine, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from node.stack.checksum import checksum
from node.stack.packet import SYN, ip_bytes, tcp_packet, udp_packet
from node.testbed.netns import TESTBED_NET, Namespace, NetnsError, _ip
from node.testbed.runner import stop_process
from node.traceback.bloom import BloomConfig
from node.traceback.config import EDGE, ROUTER, Link, RouterConfig, RouterRef
from node.traceback.core import RouterCore
from node.traceback.query import AttackGraph, trace
from node.traceback.router import RouterService
from node.traceback.rpc import OverlayAsker, QueryService, client_key, query_overlay
from overlay.node import Overlay
from sca.keys import NodeKey

T = TypeVar("T")
OVERLAY_PORT = 7400
FIRST_ID = 101
# Topologies the tests use: six routers in a row, and nine in a tree below t0 (leaves t4, t5,
# t7 and t8, up to four hops below it).
CHAIN6 = [(f"r{i}", f"r{i + 1}") for i in range(1, 6)]
TREE9 = [("t1", "t0"), ("t2", "t0"), ("t3", "t1"), ("t4", "t1"), ("t5", "t2"), ("t6", "t2"),
         ("t7", "t3"), ("t8", "t6")]
TREE9_LEAVES = ["t4", "t5", "t7", "t8"]


@dataclass
class RouterNode:
    name: str
    router_id: int
    ns: Namespace
    key: NodeKey
    links: list[Link] = field(default_factory=list)
    addr: str = ""  # its overlay address (its first link's), where it answers queries

    @property
    def ref(self) -> RouterRef:
        return RouterRef((self.addr, OVERLAY_PORT), self.key.public_bytes, self.router_id)


@dataclass
class HostNode:
    name: str
    ns: Namespace
    addr: str
    router: str
    gateway: str  # the router's address on this host's link
    prefix: str
    link: str  # the router's interface towards this host


class LoopThread:
    """An asyncio loop in a daemon thread that lives inside network namespace ``netns``
    (every socket made on the loop is there); ``run(coro)`` waits for a coroutine's result."""

    def __init__(self, netns: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._body, args=(netns,), daemon=True,
                                        name=f"loop-{netns}")
        self._thread.start()

    def _body(self, netns: str) -> None:
        with Namespace.attach(netns).enter():
            self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return self.submit(coro).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


class RouterNet:
    def __init__(self, links: Sequence[tuple[str, str]], hosts: dict[str, str], *,
                 tag: str = "tb") -> None:
        names = list(dict.fromkeys([r for pair in links for r in pair] + list(hosts.values())))
        if len(links) > 150 or len(hosts) > 99:
            raise NetnsError("at most 150 links and 99 hosts")
        self.link_pairs = list(links)
        self.host_routers = dict(hosts)
        self.tag = tag
        self.routers: dict[str, RouterNode] = {}
        self.hosts: dict[str, HostNode] = {}
        self._router_names = names
        self._made: list[Namespace] = []
        self.bootstrap: tuple[str, int] | None = None  # while routers run: whom to join

    # -- building

    def __enter__(self) -> RouterNet:
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for ns in reversed(self._made):
            ns.close()
        self._made.clear()

    def _ns(self, tag: str) -> Namespace:
        ns = Namespace(f"{self.tag}{tag}")
        self._made.append(ns)
        return ns

    def build(self) -> None:
        for i, name in enumerate(self._router_names):
            ns = self._ns(name)
            for conf in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                         "net.ipv4.conf.default.rp_filter=0"):
                ns.run(["sysctl", "-qw", conf])
            self.routers[name] = RouterNode(name, FIRST_ID + i, ns, NodeKey.generate())
        for i, (a, b) in enumerate(self.link_pairs):
            net = f"10.77.{100 + i}"
            ra, rb = self.routers[a], self.routers[b]
            _ip("link", "add", f"to-{b}", "netns", ra.ns.name, "type", "veth", "peer", "name",
                f"to-{a}", "netns", rb.ns.name)
            for r, dev, host in ((ra, f"to-{b}", 1), (rb, f"to-{a}", 2)):
                r.ns.add_address(dev, f"{net}.{host}/24")
                r.ns.ip("link", "set", dev, "up")
                r.addr = r.addr or f"{net}.{host}"
        for j, (hname, rname) in enumerate(self.host_routers.items()):
            net = f"10.77.{1 + j}"
            r = self.routers[rname]
            ns = self._ns(hname)
            dev = f"h-{hname}"[:15]
            _ip("link", "add", dev, "netns", r.ns.name, "type", "veth", "peer", "name", "eth0",
                "netns", ns.name)
            r.ns.add_address(dev, f"{net}.1/24")
            r.ns.ip("link", "set", dev, "up")
            ns.add_address("eth0", f"{net}.2/24")
            ns.ip("link", "set", "eth0", "up")
            ns.ip("route", "add", "10.77.0.0/16", "via", f"{net}.1")
            r.addr = r.addr or f"{net}.1"
            self.hosts[hname] = HostNode(hname, ns, f"{net}.2", rname, f"{net}.1",
                                         f"{net}.0/24", dev)
        self._routes()
        self._links()

    def _neighbours(self) -> dict[str, list[tuple[str, str]]]:
        """router -> [(neighbour, neighbour's address on the shared link)]."""
        nb: dict[str, list[tuple[str, str]]] = {r: [] for r in self.routers}
        for i, (a, b) in enumerate(self.link_pairs):
            nb[a].append((b, f"10.77.{100 + i}.2"))
            nb[b].append((a, f"10.77.{100 + i}.1"))
        return nb

    def _routes(self) -> None:
        nb = self._neighbours()
        owned: dict[str, list[str]] = {r: [] for r in self.routers}  # directly attached
        for i, (a, b) in enumerate(self.link_pairs):
            owned[a].append(f"10.77.{100 + i}.0/24")
            owned[b].append(f"10.77.{100 + i}.0/24")
        for j, rname in enumerate(self.host_routers.values()):
            owned[rname].append(f"10.77.{1 + j}.0/24")
        for src in self.routers:
            # BFS from src: the first hop towards every other router.
            first: dict[str, tuple[str, str]] = {}
            queue = deque([src])
            seen = {src}
            while queue:
                here = queue.popleft()
                for there, addr in nb[here]:
                    if there in seen:
                        continue
                    seen.add(there)
                    first[there] = (there, addr) if here == src else first[here]
                    queue.append(there)
            mine = set(owned[src])
            done: set[str] = set()
            for dst, (_, via) in first.items():
                for prefix in owned[dst]:
                    if prefix in mine or prefix in done:
                        continue
                    done.add(prefix)
                    self.routers[src].ns.ip("route", "add", prefix, "via", via)

    def _links(self) -> None:
        for a, b in self.link_pairs:
            ra, rb = self.routers[a], self.routers[b]
            ra.links.append(Link(f"to-{b}", ROUTER, peer=rb.ref))
            rb.links.append(Link(f"to-{a}", ROUTER, peer=ra.ref))
        for h in self.hosts.values():
            self.routers[h.router].links.append(Link(h.link, EDGE, prefix=h.prefix))

    # -- the router role

    def config(self, name: str, bloom: BloomConfig | None = None) -> RouterConfig:
        r = self.routers[name]
        return RouterConfig(r.router_id, tuple(r.links), bloom or BloomConfig())

    @contextlib.contextmanager
    def run_routers(self, bloom: BloomConfig | None = None,
                    only: Sequence[str] | None = None) -> Iterator[RunningRouters]:
        """Start an overlay node and the router role in the routers (all, or ``only``), each
        on a loop thread in its namespace, and join them into one overlay; stop them all on
        exit."""
        running = RunningRouters(self, {})
        try:
            for name in only if only is not None else self.routers:
                r = self.routers[name]
                rr = RunningRouter(LoopThread(r.ns.name))
                running.routers[name] = rr
                rr.overlay = query_overlay(r.key, (r.addr, OVERLAY_PORT))
                rr.loop.run(rr.overlay.start(join=False))
                rr.service = RouterService(RouterCore(self.config(name, bloom), r.key),
                                           netns=r.ns.name)
                rr.loop.run(rr.service.start())
                rr.queries = QueryService(rr.overlay, rr.service.core)
            if running.routers:
                self.bootstrap = self.routers[next(iter(running.routers))].ref.addr
                self._join([(rr.loop, rr.overlay) for rr in running.routers.values()
                            if rr.overlay is not None])
            yield running
        finally:
            self.bootstrap = None
            running.stop()

    def _join(self, nodes: Sequence[tuple[LoopThread, Overlay]]) -> None:
        """Join all at once through the first running router, as overlay peers would."""
        assert self.bootstrap is not None
        futures = [lt.submit(ov.join([self.bootstrap])) for lt, ov in nodes]
        for f in futures:
            f.result(60)

    @contextlib.contextmanager
    def querier(self, host: str, key: NodeKey, *, client: bool = False) -> Iterator[Querier]:
        """The victim's overlay node in ``host``'s namespace, joined to the routers' overlay,
        to trace from; or with ``client``, what ``herdwall alert trace`` runs: an overlay
        client (identity ``client_key(key)``, a fresh port) that no router has met yet."""
        h = self.hosts[host]
        lt = LoopThread(h.ns.name)
        overlay = query_overlay(client_key(key), (h.addr, 0)) if client else \
            query_overlay(key, (h.addr, OVERLAY_PORT))
        try:
            lt.run(overlay.start(join=False))
            if not client and self.bootstrap is not None:
                self._join([(lt, overlay)])
            yield Querier(lt, overlay, key, self.gateway_of(host), OverlayAsker(overlay))
        finally:
            with contextlib.suppress(Exception):
                lt.run(overlay.stop())
            lt.close()

    # -- real daemons

    def daemon_config(self, name: str, state_dir: Path, bloom: BloomConfig | None = None
                      ) -> str:
        """``herdwall node run``'s config for router ``name``: the overlay on the router's
        address, joined through the first router; the kernel parts on (the router role reads
        NFQUEUE); no throttle, no services; the router role with its links."""
        r = self.routers[name]
        b = bloom or BloomConfig()
        first = next(iter(self.routers.values())).ref.addr
        links = ", ".join("{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in
                                          lk.to_dict().items()) + "}" for lk in r.links)
        return "\n".join([
            f"state_dir = {json.dumps(str(state_dir))}",
            "[overlay]", f'bind = "{r.addr}:{OVERLAY_PORT}"',
            f'bootstrap = ["{first[0]}:{first[1]}"]' if first != r.ref.addr else "",
            "[kernel]", "enabled = true", "[throttle]", "enabled = false",
            "[traceback]", "router = true", f"router_id = {r.router_id}",
            f"links = [{links}]", f"fp_rate = {b.fp_rate!r}", f"slice_s = {b.slice_s!r}",
            f"max_bytes = {b.max_bytes}", ""])

    @contextlib.contextmanager
    def run_daemons(self, root: Path, bloom: BloomConfig | None = None
                    ) -> Iterator[dict[str, Path]]:
        """A real node (``herdwall node run``) in every router, with the router's key and
        ``daemon_config``; yields each one's state directory (control socket, events) once
        all are running; stops them all on exit (SIGTERM, then SIGKILL to the session)."""
        procs: dict[str, subprocess.Popen[bytes]] = {}
        states: dict[str, Path] = {}
        try:
            for name, r in self.routers.items():
                d = root / name
                states[name] = d / "state"
                r.key.save(states[name])
                (d / "node.toml").write_text(self.daemon_config(name, states[name], bloom))
                with open(d / "node.out", "wb") as out:  # the child keeps its own copy
                    procs[name] = r.ns.popen(
                        [sys.executable, "-m", "node", "node", "run", "--config",
                         str(d / "node.toml")], stdout=out, stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL, start_new_session=True)
            for name, p in procs.items():
                _wait_running(p, states[name], root / name / "node.out")
            yield states
        finally:
            for p in procs.values():
                stop_process(p, 10, lambda p=p: os.killpg(p.pid, signal.SIGKILL))

    def victim_node(self, host: str, directory: Path, key: NodeKey, alert_id: str,
                    packets: Sequence[bytes], recorded: float) -> list[str]:
        """What the victim's node in ``host`` has after detecting an alert: its key, a store
        holding the alert with the raw ``packets`` that carried it (recorded at ``recorded``),
        a config naming its last-hop router. Returns the ``herdwall alert trace`` command
        line for that alert, to run in ``host``'s namespace."""
        from node.daemon.store import Store

        state = directory / "state"
        key.save(state)
        with Store(state / "herdwall.db") as store:
            store.record_alert(alert_id=alert_id, service_id="00" * 32, service="web",
                               type="exploit", alert=b"-", origin="detected",
                               state="verified", packets=packets, now=recorded)
        gw = self.gateway_of(host)
        conf = directory / "node.toml"
        conf.write_text(f'[traceback]\ngateway = "{gw.addr[0]}:{gw.addr[1]}"\n'
                        f'gateway_key = "{gw.public_key.hex()}"\n')
        herdwall = str(Path(sys.executable).with_name("herdwall"))
        return ["ip", "netns", "exec", self.hosts[host].ns.name, herdwall, "alert", "trace",
                alert_id[:12], "--config", str(conf), "--state-dir", str(state)]

    def gateway_of(self, host: str) -> RouterRef:
        h = self.hosts[host]
        r = self.routers[h.router]
        return r.ref

    def path(self, src_host: str, dst_host: str) -> list[str]:
        """Router names on the (shortest) path from one host's router to another's."""
        nb = self._neighbours()
        a, b = self.host_routers[src_host], self.host_routers[dst_host]
        prev: dict[str, str | None] = {a: None}
        queue = deque([a])
        while queue:
            here = queue.popleft()
            for there, _ in nb[here]:
                if there not in prev:
                    prev[there] = here
                    queue.append(there)
        out: list[str] = []
        node: str | None = b
        while node is not None:
            out.append(node)
            node = prev[node]
        return out[::-1]

    # -- traffic (raw sockets live in the hosts' namespaces: nothing leaves the testbed)

    def raw_sender(self, host: str) -> socket.socket:
        """A raw IPv4 socket in ``host`` that sends whole packets as given (any source)."""
        return self.hosts[host].ns.call(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW))

    def send_raw(self, host: str, packet: bytes) -> None:
        dst = socket.inet_ntoa(packet[16:20])
        if ipaddress.IPv4Address(dst) not in TESTBED_NET:
            raise NetnsError(f"{dst}: packets stay inside the testbed")
        with self.raw_sender(host) as s:
            s.sendto(packet, (dst, 0))

    def capture(self, host: str, proto: int = socket.IPPROTO_UDP) -> socket.socket:
        """A raw socket in ``host`` that receives a copy of every incoming ``proto`` packet,
        IP header included, as delivered (after the last hop cleared the mark)."""
        return self.hosts[host].ns.call(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, proto))

    def noise(self, count: int, rng: random.Random, hosts: Sequence[str] | None = None,
              port: int = 9) -> None:
        """``count`` ordinary UDP datagrams (DF set, as Linux sends them) between random
        pairs of ``hosts``, to a port nobody listens on: background traffic for the tables."""
        names = list(hosts or self.hosts)
        socks = {h: self.hosts[h].ns.call(
            lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM)) for h in names}
        try:
            for _ in range(count):
                a, b = rng.sample(names, 2)
                with contextlib.suppress(OSError):  # ICMP errors from earlier sends
                    socks[a].sendto(rng.randbytes(rng.randrange(8, 200)),
                                    (self.hosts[b].addr, port))
        finally:
            for s in socks.values():
                s.close()

    def attack(self, src_host: str, dst_host: str, spoof: str, *, df: bool = True,
               proto: str = "udp") -> tuple[bytes, float]:
        """Send one packet from ``src_host`` with the source address ``spoof`` (UDP, or a
        TCP SYN; DF set or not); return it as ``dst_host`` received it, and when."""
        token = os.urandom(12)
        dst = ip_bytes(self.hosts[dst_host].addr)
        if proto == "udp":
            pkt = udp_packet(ip_bytes(spoof), dst, 31337, 80, b"EXPLOIT" + token, ident=0x7777)
        else:
            pkt = tcp_packet(ip_bytes(spoof), dst, 31337, 80, flags=SYN, seq=1234,
                             payload=token, ident=0x7777)
        if not df:
            b = bytearray(pkt)
            b[6:8] = b[10:12] = b"\0\0"  # no DF; the checksum over again
            struct.pack_into("!H", b, 10, checksum(b[:20]))
            pkt = bytes(b)
        with self.capture(dst_host, socket.IPPROTO_UDP if proto == "udp"
                          else socket.IPPROTO_TCP) as cap:
            self.send_raw(src_host, pkt)
            return wait_for(cap, token)

    def by_key(self, pub: bytes) -> str:
        for r in self.routers.values():
            if r.key.public_bytes == pub:
                return r.name
        raise KeyError(pub.hex())


@dataclass
class RunningRouter:
    loop: LoopThread
    overlay: Overlay | None = None
    service: RouterService | None = None
    queries: QueryService | None = None

    def stop(self) -> None:
        if self.queries is not None:
            self.queries.close()
        for part in (self.service, self.overlay):
            if part is not None:
                with contextlib.suppress(Exception):
                    self.loop.run(part.stop())
        self.loop.close()


@dataclass
class RunningRouters:
    net: RouterNet
    routers: dict[str, RunningRouter]

    def core(self, name: str) -> RouterCore:
        svc = self.routers[name].service
        assert svc is not None
        return svc.core

    def stop(self) -> None:
        for rr in self.routers.values():
            rr.stop()


@dataclass
class Querier:
    loop: LoopThread
    overlay: Overlay
    key: NodeKey
    gateway: RouterRef
    asker: OverlayAsker  # ``asker.sent``: RPCs sent so far, retries included

    def trace(self, packet: bytes, *, at: float, **kwargs: Any) -> AttackGraph:
        """``query.trace`` from this node, asking over its overlay."""
        return self.loop.run(trace(packet, at=at, key=self.key, gateway=self.gateway,
                                   ask=self.asker, **kwargs))


def _wait_running(p: subprocess.Popen[bytes], state: Path, out: Path,
                  timeout: float = 60) -> None:
    from node.daemon.control import ControlClient, ControlError, NoNode

    deadline = time.monotonic() + timeout
    while True:
        if p.poll() is not None or time.monotonic() > deadline:
            tail = out.read_text(errors="replace")[-600:]
            raise NetnsError(f"node did not come up ({p.returncode}): {tail}")
        try:
            with ControlClient(state / "control.sock", timeout=2) as c:
                if c.request("status")["node"]["state"] == "running":
                    return
        except (NoNode, ControlError, OSError):
            pass
        time.sleep(0.1)


def wait_for(sock: socket.socket, needle: bytes, timeout: float = 5.0) -> tuple[bytes, float]:
    """The first packet on ``sock`` that contains ``needle``, and when it arrived."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the packet did not arrive")
        sock.settimeout(left)
        data = sock.recv(65535)
        if needle in data:
            return data, time.time()
