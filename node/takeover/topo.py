"""Namespace topologies for takeover tests and benchmarks (built on ``node.testbed.netns``).

- ``PathTopo``: client -- router -- server, the node in the router (a node in the path)::

      client eth0 10.77.1.2/24 -- ethc 10.77.1.1/24 [router]
                                  [router] eths 10.77.2.1/24 -- eth0 10.77.2.2/24 server

- ``HostTopo``: client -- server, the node on the server's host::

      client eth0 10.77.3.2/24 -- eth0 10.77.3.1/24 server (+ node)

Both ends of every veth are created straight inside their namespaces, the only routes are the
two /24s of the testbed (no default route), and ``close()`` deletes every namespace (also when
construction fails half-way). Nothing is made in the caller's namespace.
"""

from __future__ import annotations

import subprocess

from node.testbed.netns import Namespace, NetnsError


def _veth(a: Namespace, a_dev: str, b: Namespace, b_dev: str) -> None:
    r = subprocess.run(["ip", "link", "add", a_dev, "netns", a.name, "type", "veth", "peer",
                        "name", b_dev, "netns", b.name], capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        raise NetnsError(f"veth {a.name}/{a_dev} -- {b.name}/{b_dev}: {r.stderr.strip()}")
    a.ip("link", "set", a_dev, "up")
    b.ip("link", "set", b_dev, "up")


def _sysctl(ns: Namespace, key: str, value: str) -> None:
    ns.run(["sysctl", "-qw", f"{key}={value}"])


class _Topo:
    names: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._made: list[Namespace] = []

    def _ns(self, tag: str) -> Namespace:
        ns = Namespace(tag)
        self._made.append(ns)
        return ns

    def close(self) -> None:
        for ns in reversed(self._made):
            ns.close()
        self._made.clear()

    def __enter__(self) -> _Topo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PathTopo(_Topo):
    client_addr = "10.77.1.2"
    router_c = "10.77.1.1"
    router_s = "10.77.2.1"
    server_addr = "10.77.2.2"
    client_if = "ethc"  # the router's interfaces
    server_if = "eths"

    def __init__(self, tag: str = "tk") -> None:
        super().__init__()
        try:
            self.client = self._ns(f"{tag}c")
            self.router = self._ns(f"{tag}r")
            self.server = self._ns(f"{tag}s")
            _veth(self.client, "eth0", self.router, self.client_if)
            _veth(self.server, "eth0", self.router, self.server_if)
            self.client.add_address("eth0", f"{self.client_addr}/24")
            self.router.add_address(self.client_if, f"{self.router_c}/24")
            self.router.add_address(self.server_if, f"{self.router_s}/24")
            self.server.add_address("eth0", f"{self.server_addr}/24")
            self.client.ip("route", "add", "10.77.2.0/24", "via", self.router_c)
            self.server.ip("route", "add", "10.77.1.0/24", "via", self.router_s)
            _sysctl(self.router, "net.ipv4.ip_forward", "1")
        except BaseException:
            self.close()
            raise

    @property
    def node(self) -> Namespace:
        return self.router

    def __enter__(self) -> PathTopo:
        return self


class HostTopo(_Topo):
    client_addr = "10.77.3.2"
    server_addr = "10.77.3.1"
    client_if = "eth0"  # the node's interface towards the client (in the server's namespace)

    def __init__(self, tag: str = "tk") -> None:
        super().__init__()
        try:
            self.client = self._ns(f"{tag}c")
            self.server = self._ns(f"{tag}s")
            _veth(self.client, "eth0", self.server, "eth0")
            self.client.add_address("eth0", f"{self.client_addr}/24")
            self.server.add_address("eth0", f"{self.server_addr}/24")
        except BaseException:
            self.close()
            raise

    @property
    def node(self) -> Namespace:
        return self.server

    def __enter__(self) -> HostTopo:
        return self
