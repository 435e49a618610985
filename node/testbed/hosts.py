"""Testbed layouts for the worm runs: who is where, and which roles the hosts play.

``WormBed``: hosts on one bridge (``node.testbed.netns.Testbed``), addresses 10.77.0.<i+1>:
the attacker's machine (the worm's seed), a benign client, the detectors and the vulnerable
hosts. The scan pool is 10.77.0.0/24. With ``dark=True`` the detectors also own every address of
the pool that no host has (Potemkin's honeyfarm answering a whole dark range, Vigilante's
detectors): a random scanner then meets a detector far more often than a vulnerable host, as
on the Internet, where most scanned addresses are empty. Both worm runs (without and with
herdwall) use the same layout, so the comparison is fair.

``Chain``: Vigilante's five-host experiment. A detector, three relays and a vulnerable host in
a line, each pair on a point-to-point link of its own (link i is 10.77.(100+i).0/24, .1 on the
left, .2 on the right), plus the attacker before the detector and a client after the vulnerable
host::

    atk -- det -- r1 -- r2 -- r3 -- vul -- cli

By default nothing forwards (``ip_forward=0`` everywhere), so a host reaches only its
neighbours and an alert can get from the detector to the vulnerable host only by being relayed,
and so verified, by r1, r2 and r3 in turn: the route is pinned by the wiring itself. With
``routed=True`` the relays forward IP packets instead and every host has routes along the line
(the IP path is then atk/det → r1 → r2 → r3 → vul).

Both build everything inside namespaces of their own (``hw…`` names, 10.77.0.0/16 only, no
default route) and delete them on ``close()``, also when building fails half way.
"""

from __future__ import annotations

import contextlib
import ipaddress
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from node.testbed.daemons import NodeSpec
from node.testbed.netns import Namespace, NetnsError, Testbed, _check_testbed_addr, _ip
from node.testbed.worm import HostSpec

Settings = dict[str, dict[str, Any]]

POOL = "10.77.0.0/24"
CHAIN = ("atk", "det", "r1", "r2", "r3", "vul", "cli")


def add_addresses(ns: Namespace, dev: str, cidrs: Sequence[str]) -> None:
    """Many addresses at once (``ip -batch``: a few ms for hundreds), each checked first."""
    for c in cidrs:
        _check_testbed_addr(c)
    if not cidrs:
        return
    batch = "".join(f"addr add {c} dev {dev}\n" for c in cidrs)
    r = subprocess.run(["ip", "-n", ns.name, "-batch", "-"], input=batch, capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        raise NetnsError(f"ip -batch in {ns.name}: {r.stderr.strip()[:300]}")


def sysctl(ns: Namespace, key: str, value: str) -> None:
    """Set a per-namespace sysctl by writing /proc/sys from inside the namespace."""
    path = "/proc/sys/" + key.replace(".", "/")

    def write() -> None:
        with open(path, "w") as f:
            f.write(value)

    ns.call(write)


@dataclass
class Role:
    name: str  # attacker, client, detector, vulnerable
    ns: Namespace
    addr: str

    @property
    def worm_role(self) -> str:
        return {"attacker": "seed", "client": "client", "detector": "sink",
                "vulnerable": "vulnerable"}[self.name]

    def spec(self) -> HostSpec:
        return HostSpec(self.ns.name, self.addr, self.worm_role)


@dataclass
class WormBed:
    """``vulnerable`` hosts, ``detectors`` detectors, an attacker and a client on a bridge."""

    vulnerable: int = 16
    detectors: int = 2
    dark: bool = True
    client: bool = True
    tag: str = "w"
    testbed: Testbed | None = None
    roles: list[Role] = field(default_factory=list)
    dark_addrs: dict[str, list[str]] = field(default_factory=dict)  # detector addr -> extra

    def __post_init__(self) -> None:
        n = 1 + int(self.client) + self.detectors + self.vulnerable
        if self.vulnerable < 1 or self.detectors < 0 or n > 250:
            raise NetnsError("a worm bed has 1 to 246 vulnerable hosts, 0 or more detectors")
        try:
            self.testbed = Testbed(n, tag=self.tag)
            names = (["attacker"] + ["client"] * int(self.client) + ["detector"] * self.detectors
                     + ["vulnerable"] * self.vulnerable)
            self.roles = [Role(name, h.ns, h.addr) for name, h in zip(names, self.testbed.hosts,
                                                                       strict=True)]
            if self.dark and self.detectors:
                self._add_dark()
        except BaseException:
            self.close()
            raise

    def _add_dark(self) -> None:
        used = {r.addr for r in self.roles}
        free = [str(a) for a in ipaddress.IPv4Network(POOL).hosts() if str(a) not in used]
        dets = self.of("detector")
        for d in dets:
            self.dark_addrs[d.addr] = []
        for i, a in enumerate(free):
            self.dark_addrs[dets[i % len(dets)].addr].append(a)
        for d in dets:
            add_addresses(d.ns, "eth0", [f"{a}/16" for a in self.dark_addrs[d.addr]])

    def of(self, name: str) -> list[Role]:
        return [r for r in self.roles if r.name == name]

    def specs(self) -> list[HostSpec]:
        return [r.spec() for r in self.roles]

    def node_specs(self, settings: Settings | None = None) -> list[NodeSpec]:
        """A node on every detector and vulnerable host (the attacker and the client run
        none). Every node joins through the detectors (the first detector through the
        second, if any): a small, well-known set of bootstrap peers."""
        dets = self.of("detector")
        boots = [f"{d.addr}:7400" for d in dets] or [f"{self.of('vulnerable')[0].addr}:7400"]
        out = []
        for r in self.roles:
            if r.name not in ("detector", "vulnerable"):
                continue
            peers = [b for b in boots if not b.startswith(f"{r.addr}:")]
            out.append(NodeSpec(r.ns.name, r.addr, detector=r.name == "detector",
                                bootstrap=peers, settings=dict(settings or {})))
        return out

    def namespaces(self) -> list[str]:
        return self.testbed.namespaces() if self.testbed else []

    def wait_ready(self, timeout: float = 10.0) -> None:
        assert self.testbed is not None
        self.testbed.wait_ready(timeout)

    def close(self) -> None:
        if self.testbed is not None:
            self.testbed.close()

    def __enter__(self) -> WormBed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ChainHost:
    name: str
    ns: Namespace
    left: str | None = None  # address on the link towards the attacker
    right: str | None = None  # address on the link towards the client

    @property
    def addrs(self) -> list[str]:
        return [a for a in (self.left, self.right) if a]


@dataclass
class Chain:
    """atk -- det -- r1 .. rN -- vul -- cli on point-to-point links (see the module doc)."""

    relays: int = 3
    routed: bool = False
    tag: str = "c"
    hosts: list[ChainHost] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 <= self.relays <= 20:
            raise NetnsError("a chain has 0 to 20 relays")
        names = ["atk", "det", *[f"r{i + 1}" for i in range(self.relays)], "vul", "cli"]
        try:
            for name in names:
                self.hosts.append(ChainHost(name, Namespace(f"{self.tag}{name}")))
            for i, (a, b) in enumerate(zip(self.hosts, self.hosts[1:], strict=False)):
                self._link(i, a, b)
            for h in self.hosts:
                sysctl(h.ns, "net.ipv4.ip_forward",
                       "1" if self.routed and h.name not in ("atk", "cli") else "0")
            if self.routed:
                self._routes()
        except BaseException:
            self.close()
            raise

    def _link(self, i: int, a: ChainHost, b: ChainHost) -> None:
        net = f"10.77.{100 + i}"
        # Both ends made straight inside their namespaces, as Testbed does.
        _ip("link", "add", f"to-{b.name}", "netns", a.ns.name, "type", "veth",
            "peer", "name", f"to-{a.name}", "netns", b.ns.name)
        a.ns.add_address(f"to-{b.name}", f"{net}.1/24")
        b.ns.add_address(f"to-{a.name}", f"{net}.2/24")
        a.ns.ip("link", "set", f"to-{b.name}", "up")
        b.ns.ip("link", "set", f"to-{a.name}", "up")
        a.right, b.left = f"{net}.1", f"{net}.2"

    def _routes(self) -> None:
        """Every host: the subnets beyond its neighbours through that neighbour (a line has
        one path, so this pins it). Only 10.77 subnets; never a default route."""
        n = len(self.hosts)
        for i, h in enumerate(self.hosts):
            for link in range(n - 1):
                net = f"10.77.{100 + link}.0/24"
                if link < i - 1:  # to the left, through the left neighbour
                    via = self.hosts[i - 1].right
                elif link > i:  # to the right, through the right neighbour
                    via = self.hosts[i + 1].left
                else:
                    continue  # directly connected
                assert via is not None
                h.ns.ip("route", "add", net, "via", via)

    def __getitem__(self, name: str) -> ChainHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    @property
    def relay_hosts(self) -> list[ChainHost]:
        return [h for h in self.hosts if h.name.startswith("r")]

    def neighbours(self, name: str) -> list[str]:
        """The addresses ``name``'s neighbours have on the links they share with it."""
        i = next(k for k, h in enumerate(self.hosts) if h.name == name)
        out = []
        if i > 0 and self.hosts[i - 1].right:
            out.append(self.hosts[i - 1].right)
        if i + 1 < len(self.hosts) and self.hosts[i + 1].left:
            out.append(self.hosts[i + 1].left)
        return [a for a in out if a]

    def namespaces(self) -> list[str]:
        return [h.ns.name for h in self.hosts]

    def node_specs(self, settings: Settings | None = None) -> list[NodeSpec]:
        """Nodes on the detector, the relays and the vulnerable host, bootstrapping through
        their neighbours on the line. Strict: each binds its overlay on all of its addresses
        and names each neighbour by the address on their shared link (it can reach no one
        else). Routed: each node has one overlay address, its left one, reachable from
        everywhere, so every node is known by one address only. Relays protect the service
        too: they verify before forwarding."""
        nodes = [h for h in self.hosts if h.name not in ("atk", "cli")]
        out = []
        for i, h in enumerate(nodes):
            if self.routed:
                near = [n.left for n in (nodes[i - 1] if i else None,
                                         nodes[i + 1] if i + 1 < len(nodes) else None) if n]
            else:
                near = [a for a in self.neighbours(h.name)
                        if a not in (self["atk"].right, self["cli"].left)]
            spec = NodeSpec(h.ns.name, (h.left or "") if self.routed else "0.0.0.0",
                            detector=h.name == "det", bootstrap=[f"{a}:7400" for a in near],
                            settings=dict(settings or {}))
            out.append(spec)
        return out

    def close(self) -> None:
        for h in self.hosts:
            with contextlib.suppress(Exception):
                h.ns.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
