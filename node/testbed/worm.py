"""The worm harness: vulnerable hosts whose service runs in the emulator, and the scanner.

This is a *harness*, not a worm. Nothing here is self-propagating code: the sample service
(``sca/services/resolver``, the Slammer-class SSRP responder on UDP 1434) only ever runs in
herdwall's emulator, and infection is bookkeeping. For each host of a testbed the harness binds a
real UDP socket inside the host's network namespace and feeds every datagram it receives to a
flash clone of the service (``node.testbed.emulated``):

- the service answers (a benign lookup): its real replies go back to the sender;
- the run shows the service hijacked (the taint tracker's detection is the ground truth): the
  harness marks the host **infected** and starts that host's **scanner**, which sends the very
  datagram that infected it (Slammer carried itself in one datagram) to random addresses of the
  scan pool at a set rate, from a socket in the host's namespace, until the run ends.

Roles: ``vulnerable`` (as above), ``sink`` (a detector's honeypot: takes datagrams, records
exploits, is never infected and never scans: in Vigilante the detector's own replay is
instrumented, and herdwall's detector runs in the node daemon, not here), ``seed`` (the
attacker's machine, infected from the release on: the worm enters the testbed from there) and
``client`` (sends benign lookups to the vulnerable hosts and counts the replies).

Safety, checked here and not only assumed: every scan target and client target lies in
10.77.0.0/16 (``check_target``), and a socket is only ever made in a namespace named ``hw…``
whose network namespace is not the machine's own (``ns_socket``), so even a wrong address has no
route out. Testbed namespaces have no default route anyway.

Reports are JSON lines (``Reporter``), one object per event, with ``t`` in wall-clock seconds
(the node daemons stamp their events the same way, so the two can be compared):
``ready``, ``released``, ``infected``, ``exploit`` (first at each sink), ``client``,
``host`` (one per host at the end, with its counters) and ``stopped``.

Run it in this process (``HarnessThread``, for tests) or as a program, e.g. by the demo::

    python -m node.testbed.worm --spec spec.json [--out events.jsonl] [--duration 20]

``spec.json``: ``{"hosts": [{"ns": "hw-…", "addr": "10.77.0.2", "role": "vulnerable"}, …],
"pool": ["10.77.0.0/24"], "rate": 20, "seed": 1, "client_rate": 5,
"stop_when_all_infected": true, "release": true}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from node.testbed.emulated import EmulatedService, Verdict
from node.testbed.netns import PREFIX, TESTBED_NET, Namespace

SERVICE = "resolver"
PORT = 1434
DEFAULT_RATE = 20.0  # datagrams per second per infected host (Slammer did thousands)
MAX_POOL = 1 << 16
ROLES = ("vulnerable", "sink", "seed", "client")


__all__ = ["EmulatedService", "Harness", "HarnessError", "HarnessThread", "HostSpec",
           "Reporter", "Verdict", "check_target", "expand_pool", "ns_socket"]


class HarnessError(RuntimeError):
    """The harness was asked for something unsafe or impossible."""


# --- safety ---------------------------------------------------------------------------------


def check_target(addr: str) -> str:
    """``addr`` if it is an IPv4 unicast address in the testbed network, else HarnessError.

    The /16's own network and broadcast addresses are refused too: a scanner sends unicast."""
    try:
        ip = ipaddress.IPv4Address(addr)
    except ValueError:
        raise HarnessError(f"{addr!r} is not an IPv4 address") from None
    if ip not in TESTBED_NET or ip in (TESTBED_NET.network_address,
                                       TESTBED_NET.broadcast_address):
        raise HarnessError(f"{addr}: the harness only sends to {TESTBED_NET}")
    return str(ip)


def expand_pool(spec: Iterable[str]) -> list[str]:
    """Scan-pool entries (addresses or CIDRs inside 10.77.0.0/16) as a list of addresses, host
    parts only, without duplicates, in a stable order."""
    out: dict[str, None] = {}
    for entry in spec:
        try:
            net = ipaddress.IPv4Network(entry, strict=False)
        except ValueError:
            raise HarnessError(f"scan pool entry {entry!r} is not an address or CIDR") from None
        if not net.subnet_of(TESTBED_NET):
            raise HarnessError(f"scan pool entry {entry}: outside {TESTBED_NET}")
        if net.num_addresses > MAX_POOL:
            raise HarnessError(f"scan pool entry {entry}: more than {MAX_POOL} addresses")
        addrs = [net.network_address] if net.prefixlen == 32 else list(net.hosts())
        for a in addrs:
            out[check_target(str(a))] = None
        if len(out) > MAX_POOL:
            raise HarnessError(f"scan pool: more than {MAX_POOL} addresses")
    if not out:
        raise HarnessError("the scan pool is empty")
    return list(out)


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


# The namespace this process started in (the machine's own, for anything run by hand):
# recorded at import, before any thread could have moved.
_HOME_NETNS = _netns_inode("/proc/self/ns/net")


def ns_socket(ns_name: str, bind: tuple[str, int]) -> socket.socket:
    """A non-blocking UDP socket made inside namespace ``ns_name`` and bound to ``bind``.

    Refuses a namespace that is not a testbed's (``hw…``) or that turns out to be the machine's
    own network namespace: the harness must never open a socket there."""
    if not ns_name.startswith(PREFIX.rstrip("-")):
        raise HarnessError(f"{ns_name}: not a testbed namespace (names start with {PREFIX})")
    if bind[0] != "0.0.0.0":
        check_target(bind[0])

    def make() -> socket.socket:
        here = _netns_inode("/proc/thread-self/ns/net")
        # /proc/1 may be unreadable in a container; the process's own start is checked always.
        if here is None or here in (_HOME_NETNS, _netns_inode("/proc/1/ns/net")):
            raise HarnessError(f"{ns_name}: not a namespace of its own; no socket made")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.setblocking(False)
            # A busy host drops datagrams like a real one, but not for want of a tiny buffer.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            s.bind(bind)
        except BaseException:
            s.close()
            raise
        return s

    return Namespace.attach(ns_name).call(make)


# --- reports --------------------------------------------------------------------------------


class Reporter:
    """JSON lines, one per event, flushed at once (a reader tails the file while we run); the
    events are kept in memory too (bounded) for in-process use."""

    def __init__(self, out: TextIO | None = None, keep: int = 100_000) -> None:
        self.out = out
        self.keep = keep
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        rec = {"event": event, "t": round(time.time(), 6), **fields}
        line = json.dumps(rec, separators=(",", ":"))
        with self._lock:
            if len(self.events) < self.keep:
                self.events.append(rec)
            if self.out is not None:
                self.out.write(line + "\n")
                self.out.flush()
        return rec

    def of(self, event: str) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.events if e["event"] == event]


# --- hosts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HostSpec:
    ns: str
    addr: str
    role: str = "vulnerable"

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise HarnessError(f"role {self.role!r}: one of {', '.join(ROLES)}")
        check_target(self.addr)


@dataclass
class Counters:
    received: int = 0
    benign: int = 0
    replies: int = 0
    exploits: int = 0  # hijacking datagrams received
    crashes: int = 0  # runs that ended badly without a hijack
    scans: int = 0
    scan_errors: int = 0
    first_exploit_t: float | None = None
    last_exploit_t: float | None = None
    infected_t: float | None = None
    infected_by: str | None = None
    emu_ms: float = 0.0


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, host: WormHost) -> None:
        self.host = host

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.host.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for earlier sends: nothing to do


class WormHost:
    """One host of the harness: its service socket, and its scanner once infected."""

    def __init__(self, spec: HostSpec, harness: Harness, index: int) -> None:
        self.spec = spec
        self.harness = harness
        self.rng = random.Random(f"{harness.seed}:{index}")
        self.c = Counters()
        self.transport: asyncio.DatagramTransport | None = None
        self.scan_transport: asyncio.DatagramTransport | None = None
        self.scanner: asyncio.Task[None] | None = None
        self.payload: bytes | None = None

    @property
    def addr(self) -> str:
        return self.spec.addr

    @property
    def infected(self) -> bool:
        return self.c.infected_t is not None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.spec.role in ("vulnerable", "sink"):
            # A sink takes the port on every address of its host: a detector may own a whole
            # dark range besides its own address (see node.testbed.hosts.WormBed).
            bind = "0.0.0.0" if self.spec.role == "sink" else self.addr
            sock = ns_socket(self.spec.ns, (bind, PORT))
            self.transport, _ = await loop.create_datagram_endpoint(
                lambda: _Proto(self), sock=sock)
        if self.spec.role in ("vulnerable", "seed"):
            # The scanner's own socket, ephemeral port (as Slammer's were): its datagrams are
            # new outgoing flows for the host's throttle.
            sock = ns_socket(self.spec.ns, (self.addr, 0))
            self.scan_transport, _ = await loop.create_datagram_endpoint(
                asyncio.DatagramProtocol, sock=sock)

    def on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        c = self.c
        c.received += 1
        if self.spec.role == "sink":
            # A sink never runs the service; it just tells exploits from the rest, cheaply.
            if self.harness.is_exploit(data):
                self._exploit_seen(addr[0], data)
            return
        v = self.harness.service.handle(data)
        c.emu_ms += v.ms
        if v.hijacked:
            self._exploit_seen(addr[0], data)
            if not self.infected:
                self.infect(addr[0], data, v.detail)
            return
        if v.outcome != "blocked":
            c.crashes += 1
        c.benign += 1
        if self.transport is not None:
            for reply in v.replies:
                self.transport.sendto(reply, addr)
                c.replies += 1

    def _exploit_seen(self, src: str, data: bytes) -> None:
        now = time.time()
        c = self.c
        c.exploits += 1
        c.last_exploit_t = now
        if c.first_exploit_t is None:
            c.first_exploit_t = now
            if self.spec.role == "sink":
                self.harness.reporter.emit("exploit", host=self.addr, ns=self.spec.ns,
                                           role="sink", src=src, size=len(data))

    def infect(self, src: str, payload: bytes, detail: str = "") -> None:
        """Mark this host infected and start its scanner with ``payload``."""
        self.c.infected_t = time.time()
        self.c.infected_by = src
        self.payload = payload
        self.harness.on_infected(self, src, detail)
        if self.harness.scanning:
            self.start_scanner()

    def start_scanner(self) -> None:
        if self.scanner is None and self.payload is not None and self.scan_transport:
            self.scanner = asyncio.get_running_loop().create_task(
                self._scan(), name=f"scan-{self.addr}")

    async def _scan(self) -> None:
        """Send the payload to random pool addresses at the harness's rate, paced against a
        deadline so a slow loop does not make the scanner burst to catch up."""
        h = self.harness
        pool = [a for a in h.pool if a != self.addr]
        if not pool or self.payload is None or self.scan_transport is None:
            return
        interval = 1.0 / h.rate
        next_at = time.monotonic()
        while True:
            target = self.rng.choice(pool)
            try:
                self.scan_transport.sendto(self.payload, (target, PORT))
                self.c.scans += 1
            except OSError:
                self.c.scan_errors += 1
            next_at = max(next_at + interval, time.monotonic() - interval)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def stop(self) -> None:
        if self.scanner is not None:
            self.scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.scanner
        for t in (self.transport, self.scan_transport):
            if t is not None:
                t.close()

    def report(self) -> dict[str, Any]:
        c = self.c
        return {"host": self.addr, "ns": self.spec.ns, "role": self.spec.role,
                "infected": self.infected, **{k: v for k, v in c.__dict__.items()
                                              if k != "emu_ms"},
                "emu_ms": round(c.emu_ms, 3)}


class BenignClient:
    """Benign lookups (the resolver's own traffic generator) to the vulnerable hosts at a set
    rate; a reply counts as answered. The first datagram of a benign session always gets a
    reply from a healthy resolver, so only those are sent."""

    def __init__(self, spec: HostSpec, harness: Harness, targets: Sequence[str],
                 rate: float) -> None:
        self.spec = spec
        self.harness = harness
        self.targets = [check_target(t) for t in targets]
        self.rate = rate
        self.rng = random.Random(f"{harness.seed}:client:{spec.addr}")
        self.sent = 0
        self.answered = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sock = ns_socket(self.spec.ns, (self.spec.addr, 0))
        client = self

        class Proto(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if data[:1] in (b"\x05", b"\x0a"):
                    client.answered += 1

        self.transport, _ = await loop.create_datagram_endpoint(Proto, sock=sock)
        if self.targets and self.rate > 0:
            self.task = loop.create_task(self._run(), name="benign-client")

    async def _run(self) -> None:
        from sca.services import traffic

        gen = traffic(SERVICE)
        assert self.transport is not None
        while True:
            datagram = gen.benign(self.rng)[0].data
            try:
                self.transport.sendto(datagram, (self.rng.choice(self.targets), PORT))
                self.sent += 1
            except OSError:
                pass
            await asyncio.sleep(1.0 / self.rate)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            await asyncio.sleep(0.2)  # replies still in flight
        if self.transport is not None:
            self.transport.close()
        self.harness.reporter.emit("client", host=self.spec.addr, sent=self.sent,
                                   answered=self.answered)


# --- the harness ----------------------------------------------------------------------------


@dataclass
class Harness:
    """All hosts of one testbed on one asyncio loop (sockets live in their hosts' namespaces;
    a socket stays in the namespace it was made in, whichever thread uses it)."""

    hosts: Sequence[HostSpec]
    pool: Sequence[str] = ("10.77.0.0/24",)
    rate: float = DEFAULT_RATE
    seed: int = 1
    reporter: Reporter = field(default_factory=Reporter)
    client_rate: float = 5.0
    confirm: str = "auto"
    stop_when_all_infected: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 10_000:
            raise HarnessError("rate: 0 < datagrams per second <= 10000")
        if self.confirm not in ("auto", "always"):
            raise HarnessError("confirm is 'auto' or 'always'")
        self.pool = expand_pool(self.pool)
        addrs = [h.addr for h in self.hosts]
        if len(set(addrs)) != len(addrs):
            raise HarnessError("two hosts share an address")
        self.service = EmulatedService(SERVICE, self.confirm)
        self.members = [WormHost(s, self, i) for i, s in enumerate(self.hosts)
                        if s.role != "client"]
        vulnerable = [s.addr for s in self.hosts if s.role == "vulnerable"]
        self.clients = [BenignClient(s, self, vulnerable, self.client_rate)
                        for s in self.hosts if s.role == "client"]
        self.scanning = False
        self.released_t: float | None = None
        self.all_infected = asyncio.Event()
        from sca.services import traffic

        self._exploits = {m.data for m in traffic(SERVICE).exploit()}

    def is_exploit(self, data: bytes) -> bool:
        """For sinks: the worm's datagram, or anything the service would be hijacked by."""
        return data in self._exploits or (data[:1] == b"\x04" and len(data) > 64
                                          and self.service.handle(data).hijacked)

    def host(self, addr: str) -> WormHost:
        for h in self.members:
            if h.addr == addr:
                return h
        raise KeyError(addr)

    @property
    def vulnerable(self) -> list[WormHost]:
        return [h for h in self.members if h.spec.role == "vulnerable"]

    async def start(self) -> None:
        for h in self.members:
            await h.start()
        for c in self.clients:
            await c.start()
        self.reporter.emit("ready", hosts=[{"host": h.addr, "role": h.spec.role}
                                           for h in self.members],
                           pool=len(self.pool), rate=self.rate)

    def release(self) -> None:
        """The worm enters: the seeds start infected and scanning (with the canonical exploit,
        Slammer's one datagram), and so does every host already infected."""
        from sca.services import traffic

        payload = traffic(SERVICE).exploit()[0].data
        self.scanning = True
        self.released_t = time.time()
        self.reporter.emit("released", seeds=[h.addr for h in self.members
                                              if h.spec.role == "seed"])
        for h in self.members:
            if h.spec.role == "seed" and not h.infected:
                h.payload = payload
                h.c.infected_t = self.released_t
                h.start_scanner()
            elif h.infected:
                h.start_scanner()

    def on_infected(self, host: WormHost, src: str, detail: str) -> None:
        since = (time.time() - self.released_t) if self.released_t else None
        vul = self.vulnerable
        n = sum(h.infected for h in vul)
        self.reporter.emit("infected", host=host.addr, ns=host.spec.ns, src=src, detail=detail,
                           since_release_s=round(since, 6) if since is not None else None,
                           infected=n, vulnerable=len(vul))
        if self.stop_when_all_infected and n == len(vul):
            self.all_infected.set()

    async def stop(self) -> None:
        self.scanning = False
        for h in self.members:
            if h.scanner is not None:
                h.scanner.cancel()
        for c in self.clients:
            await c.stop()
        for h in self.members:
            await h.stop()
        for h in self.members:
            self.reporter.emit("host", **h.report())
        vul = self.vulnerable
        self.reporter.emit("stopped", infected=sum(h.infected for h in vul),
                           vulnerable=len(vul), runs=self.service.runs,
                           taint_runs=self.service.taint_runs)

    async def run(self, duration: float | None = None, stop: asyncio.Event | None = None,
                  release: bool = True) -> None:
        """start, release, wait for ``duration`` / ``stop`` / all infected (if asked), stop."""
        await self.start()
        try:
            if release:
                self.release()
            waits = [asyncio.ensure_future(self.all_infected.wait())]
            if stop is not None:
                waits.append(asyncio.ensure_future(stop.wait()))
            await asyncio.wait(waits, timeout=duration, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            if self.all_infected.is_set():
                await asyncio.sleep(0.2)  # a little more, so the summary shows the scanners
        finally:
            await self.stop()


class HarnessThread:
    """A harness on a loop in a thread of this process (tests): ``start()`` binds the sockets,
    ``release()`` lets the worm in, ``stop()`` ends the run (idempotent)."""

    def __init__(self, harness: Harness) -> None:
        self.harness = harness
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="worm-harness",
                                       daemon=True)
        self.thread.start()
        self._stopped = False

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.call(self.harness.start())

    def release(self) -> None:
        async def go() -> None:
            self.harness.release()

        self.call(go())

    def infected(self) -> list[str]:
        async def get() -> list[str]:
            return [h.addr for h in self.harness.vulnerable if h.infected]

        return self.call(get())  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            self.call(self.harness.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()

    def __enter__(self) -> HarnessThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the program ----------------------------------------------------------------------------


def load_spec(path: Path) -> dict[str, Any]:
    """The run's spec, checked: hosts (ns, addr, role), pool, rate, seed, client_rate."""
    if path.stat().st_size > 1 << 20:
        raise HarnessError(f"{path}: larger than 1 MiB")
    spec = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(spec, dict) or not isinstance(spec.get("hosts"), list):
        raise HarnessError(f"{path}: a JSON object with a 'hosts' list")
    return spec


def harness_from_spec(spec: dict[str, Any], reporter: Reporter) -> Harness:
    hosts = [HostSpec(str(h["ns"]), str(h["addr"]), str(h.get("role", "vulnerable")))
             for h in spec["hosts"]]
    return Harness(hosts, pool=[str(p) for p in spec.get("pool", ["10.77.0.0/24"])],
                   rate=float(spec.get("rate", DEFAULT_RATE)), seed=int(spec.get("seed", 1)),
                   reporter=reporter, client_rate=float(spec.get("client_rate", 5.0)),
                   confirm=str(spec.get("confirm", "auto")),
                   stop_when_all_infected=bool(spec.get("stop_when_all_infected", False)))


async def _main(spec_path: Path, out: TextIO, duration: float | None) -> None:
    spec = load_spec(spec_path)
    harness = harness_from_spec(spec, Reporter(out))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # "release": false serves the vulnerable hosts (benign replies, infection by hand-sent
    # exploits) without letting the seeds scan: a testbed that is up, waiting for a person.
    await harness.run(duration, stop, release=bool(spec.get("release", True)))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m node.testbed.worm",
                                 description="Run the worm harness on testbed namespaces.")
    ap.add_argument("--spec", type=Path, required=True, help="the run's spec (JSON)")
    ap.add_argument("--out", type=Path, help="JSON-lines report (default: stdout)")
    ap.add_argument("--duration", type=float, help="seconds from the release to the end")
    args = ap.parse_args(argv)
    try:
        with contextlib.ExitStack() as stack:
            out = (stack.enter_context(args.out.open("a", encoding="utf-8"))
                   if args.out else sys.stdout)
            asyncio.run(_main(args.spec, out, args.duration))
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
