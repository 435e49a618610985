"""Network namespaces for tests, benchmarks and the demo.

Everything here builds its own namespaces and never touches the caller's: a ``Namespace`` gets a
unique ``hw-<pid>-<hex>`` name (a leftover is easy to spot and the test session's clean-up finds
it by the ``hw-<pid>-`` prefix), loopback up, addresses only in 10.77.0.0/16 and **no route
out** (no default route is ever added). ``Testbed`` puts N hosts on a bridge that lives in a
namespace of its own, so not even the bridge exists in the machine's namespace.

Two ways to act inside a namespace:

- ``run(argv)``: ``ip netns exec NAME argv`` in a child process (iptables, nft, ping, servers);
- ``enter()``: a context manager that moves the *calling thread* into the namespace with
  ``setns(2)`` and back out on exit. Linux keeps the network namespace per thread, and a socket
  stays in the namespace it was created in, so a helper thread (or the main thread, briefly) can
  open NFQUEUE, libnftables, raw or ordinary sockets in the namespace and then use them from
  anywhere. ``call(fn)`` runs ``fn`` in a fresh thread inside the namespace and returns its
  result, which keeps the caller's own thread out of it entirely.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

PREFIX = "hw-"
TESTBED_NET = ipaddress.IPv4Network("10.77.0.0/16")
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


class NetnsError(RuntimeError):
    """A namespace could not be made, entered or configured."""


def setns(fd: int) -> None:
    """Move the calling thread into the network namespace open at ``fd``."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsError(f"setns: {os.strerror(err)}")


def unique_name(tag: str = "") -> str:
    """``hw-<pid>-[tag-]<hex>``, at most 15 characters of tag so names stay readable."""
    tag = "".join(c for c in tag if c.isalnum())[:15]
    return f"{PREFIX}{os.getpid()}-{tag + '-' if tag else ''}{secrets.token_hex(3)}"


def _check_testbed_addr(cidr: str) -> None:
    iface = ipaddress.ip_interface(cidr)
    if iface.version != 4 or iface.ip not in TESTBED_NET:
        raise NetnsError(f"{cidr}: testbed addresses must lie in {TESTBED_NET}")


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


class Namespace:
    """One network namespace, deleted on ``close()`` (or leaving the ``with`` block)."""

    def __init__(self, tag: str = "") -> None:
        self.name = unique_name(tag)
        _ip("netns", "add", self.name)
        self._closed = False
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    @classmethod
    def attach(cls, name: str) -> Namespace:
        """A handle on an existing namespace made elsewhere; ``close()`` leaves it alone."""
        ns = cls.__new__(cls)
        ns.name = name
        ns._closed = True
        return ns

    def __enter__(self) -> Namespace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Namespace({self.name!r})"

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True,
                           timeout=30)

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def ip(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``ip -n NAME ARGS``: iproute2 acting inside the namespace; raises on failure."""
        return _ip("-n", self.name, *args)

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a program inside the namespace and wait for it."""
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True,
                              text=True, check=check, timeout=timeout, input=input)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a program inside the namespace (the caller waits for or kills it)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **kwargs)

    def set_mtu(self, mtu: int) -> None:
        """Every link but loopback gets this MTU (jumbo frames in a testbed)."""
        for line in self.ip("-o", "link", "show").stdout.splitlines():
            dev = line.split(":")[1].strip().split("@")[0]
            if dev != "lo":
                self.ip("link", "set", dev, "mtu", str(mtu))

    def add_address(self, dev: str, cidr: str) -> None:
        _check_testbed_addr(cidr)
        self.ip("addr", "add", cidr, "dev", dev)

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        """Move the calling thread into this namespace for the ``with`` block.

        Only the calling thread moves. If moving back fails the thread would be stranded in a
        namespace about to be deleted, so that raises (and the thread should end)."""
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(self.path, os.O_RDONLY)
            try:
                setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                setns(home)
        finally:
            os.close(home)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a new thread inside this namespace; return its result
        or raise its exception."""
        box: dict[str, Any] = {}

        def body() -> None:
            try:
                with self.enter():
                    box["result"] = fn(*args, **kwargs)
            except BaseException as exc:
                box["error"] = exc

        t = threading.Thread(target=body, name=f"in-{self.name}", daemon=True)
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["result"]


@dataclass
class Host:
    """A host of a ``Testbed``: its namespace, interface and address."""

    ns: Namespace
    dev: str
    addr: str  # without prefix length
    index: int

    @property
    def name(self) -> str:
        return self.ns.name


@dataclass
class Testbed:
    """N hosts (``eth0`` each, 10.77.0.<i+1>/16) on one bridge inside a switch namespace.

    ``mtu`` is set on every link. (NFQUEUE hands user space GSO packets already segmented, since
    the queue is not bound with the GSO flag, so offloads need not be turned off.)"""

    __test__ = False  # not a pytest test class, despite the name

    n: int = 2
    mtu: int = 1500
    tag: str = "tb"
    hosts: list[Host] = field(default_factory=list)
    switch: Namespace | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.n <= 250:
            raise NetnsError("a testbed has 1 to 250 hosts")
        try:
            self.switch = Namespace(f"{self.tag}sw")
            self.switch.ip("link", "add", "br0", "type", "bridge")
            self.switch.ip("link", "set", "br0", "mtu", str(self.mtu), "up")
            for i in range(self.n):
                self._add_host(i)
        except BaseException:
            self.close()
            raise

    def _add_host(self, i: int) -> None:
        assert self.switch is not None
        ns = Namespace(f"{self.tag}{i}")
        self.hosts.append(Host(ns, "eth0", f"10.77.0.{i + 1}", i))
        port = f"p{i}"
        # Both ends are created straight inside their namespaces: nothing appears, even for a
        # moment, in the namespace this process runs in.
        _ip("link", "add", "eth0", "netns", ns.name, "mtu", str(self.mtu), "type", "veth",
            "peer", "name", port, "netns", self.switch.name)
        self.switch.ip("link", "set", port, "master", "br0", "mtu", str(self.mtu), "up")
        ns.add_address("eth0", f"10.77.0.{i + 1}/16")
        ns.ip("link", "set", "eth0", "up")

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def close(self) -> None:
        for h in self.hosts:
            h.ns.close()
        if self.switch is not None:
            self.switch.close()

    def namespaces(self) -> list[str]:
        names = [h.name for h in self.hosts]
        return [*names, self.switch.name] if self.switch else names

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Wait until every host reaches host 0: a TCP connect to a closed port there comes back
        refused once ARP and the bridge work (no ``ping`` needed on the machine)."""
        if self.n < 2:
            return
        target = self.hosts[0].addr

        def probe() -> None:
            deadline = time.monotonic() + timeout
            while True:
                with socket.socket() as s:
                    s.settimeout(0.5)
                    try:
                        s.connect((target, 9))
                        return
                    except ConnectionRefusedError:
                        return
                    except OSError:
                        if time.monotonic() > deadline:
                            raise NetnsError(f"{target} unreachable in the testbed") from None
                time.sleep(0.05)

        for h in self.hosts[1:]:
            h.ns.call(probe)


def leftovers(prefix: str = PREFIX) -> list[str]:
    """Names of namespaces starting with ``prefix`` (for clean-up checks)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=30).stdout
    return [w.split()[0] for w in out.splitlines() if w.split() and w.startswith(prefix)]
