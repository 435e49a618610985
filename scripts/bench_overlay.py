#!/usr/bin/env python3
"""Overlay benchmark: join time, broadcast coverage, time to reach everyone, messages and
memory per node, with 0% and 10% dead nodes and with 10% of nodes flooding junk.

Every node is a real ``overlay.Overlay`` on its own loopback address (127.x.y.z; all of
127/8 is loopback on Linux, so per-address limits mean what they say), with its own key, UDP
socket and TCP fetch server. Alerts are real: generated from the ``resolver`` sample's exploit
by ``sca.generate``, signed, and checked at every node by the real signature check and the real
sandbox verifier (``sca.verify.Verifier``). As in the daemon, which verifies in a process pool,
the sandbox runs in a worker process (one per benchmark process, ``VerifyWorker``): every node
sends it the envelope of every alert it receives and waits for its own verdict; nothing is
cached or shared between requests. The worker checks the envelope's signature first, then
parses the alert and runs the sandbox (``Overlay(verify_body=...)``): one round trip instead of
a signature check on the nodes' loop plus a round trip, and the alert is parsed once per node,
there, not also on the nodes' loop. ``--inline-verify`` runs all of it inside the node process
instead (``Overlay(verify=...)``, the signature checked and the alert parsed by the node).

Two runs:
- one process: ``--nodes`` (1,000) nodes on one asyncio loop;
- several processes: ``--procs`` worker processes with ``--proc-nodes`` nodes each, driven by
  JSON lines on their stdin (``--worker``; the overlay's integration tests use this mode too).

Scenarios, each with a fresh alert published by a random live node:
- ``dead0``: every node alive;
- ``dead10``: 10% of nodes stopped without a word (their addresses stay in routing tables);
- ``flood10``: on top of that, another 10% of nodes turn hostile: their overlays stop and a
  separate flooder process takes over their addresses and sends junk at full rate (random
  bytes, oversized and truncated datagrams, wrong-shaped RPCs, announcements and digests of
  made-up alert ids) to the nodes in their old routing tables.

Messages per node count every datagram any live node sent (RPCs, replies, announcements,
acknowledgements, digests) and every fetch it made, from the moment of publishing until one
second after the last node got the alert, divided by the live nodes. The flooders' junk is
reported separately (as are the kernel's UDP receive drops in the namespace: full socket
buffers, datagrams its socket filter dropped). Time to 100% is measured from the publish
call to the last delivery (``on_alert``), on the machine's clock, across processes too.

Prints a table, then one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import resource
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from overlay import wire  # noqa: E402
from overlay.broadcast import Outcome  # noqa: E402
from overlay.dht import DhtConfig  # noqa: E402
from overlay.node import Overlay, OverlayConfig  # noqa: E402
from sca.codec import encode_alert  # noqa: E402
from sca.emu.image import load_image  # noqa: E402
from sca.envelope import seal  # noqa: E402
from sca.generate import Detector  # noqa: E402
from sca.keys import NodeKey  # noqa: E402
from sca.services import manifest_path, traffic  # noqa: E402
from sca.verify import Verifier  # noqa: E402

SERVICE = "resolver"
PORT = 7400


def node_addr(prefix: int, i: int) -> tuple[str, int]:
    """Node ``i``'s own loopback address under 127.<prefix>.0.0/16."""
    return f"127.{prefix}.{i // 250}.{i % 250 + 1}", PORT


def udp_errors() -> dict[str, int]:
    """The kernel's UDP receive error counters (this network namespace): datagrams it dropped
    because a socket's receive buffer was full, or for lack of memory."""
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    table = dict(zip(rows[0][1:], map(int, rows[1][1:]), strict=True))
    return {k: table.get(k, 0) for k in ("RcvbufErrors", "InErrors", "MemErrors")}


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def make_alerts(count: int, seed: int = 2026) -> list[bytes]:
    """``count`` distinct verified resolver alerts (random exploit variants, minimised)."""
    image = load_image(manifest_path(SERVICE))
    detector = Detector(image)
    verifier = Verifier([image])
    rng = random.Random(seed)
    out: list[bytes] = []
    while len(out) < count:
        messages = tuple(traffic(SERVICE).exploit(rng))
        run = detector.inspect(messages)
        if run.detection is None:
            continue
        generated = detector.generate(messages, run.detection, verifier)
        if generated is None:
            continue
        encoded = encode_alert(generated.alert)
        if encoded not in out:
            out.append(encoded)
    return out


# --- sandbox verification in a worker process ---------------------------------------------------


class VerifyWorker:
    """The real sandbox verifier in a process of its own, as the daemon runs it (its ``fast``
    pool lane): each node's ``verify`` sends its own alert there and awaits its own verdict;
    nothing is cached or shared between requests. A ``ProcessPoolExecutor`` cost the calling
    process ~0.35 ms per call (feeder threads, pickling, wake-ups), as much as verifying
    inline; here the requests go over a socketpair as length-prefixed frames (the encoded
    alert out, one verdict byte back), ~0.05 ms per call on this side. Two workers (each
    request to the one with fewer waiting) were no faster at 1,000 nodes (t100 0.86-1.00 s
    against 0.85-0.90 s, interleaved): the verdict's mean ~55 ms round trip is mostly the
    nodes' busy loop getting round to it, not a queue at the worker."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--verify-worker",
             str(theirs.fileno())], pass_fds=(theirs.fileno(),))
        theirs.close()
        ours.setblocking(False)
        self.sock = ours
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: dict[int, asyncio.Future[Any]] = {}
        self.seq = 0
        self.inbuf = bytearray()
        self.outbuf = bytearray()

    def verify_body(self, body: bytes) -> asyncio.Future[Any]:
        """``Overlay(verify_body=...)``: the worker checks the envelope's signature, then
        parses and verifies its alert; the verdict comes as a future the overlay waits on with
        a callback (no task)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.sock.fileno(), self._readable)
        self.seq += 1
        data = body
        fut = self.loop.create_future()
        self.waiting[self.seq] = fut
        self._send(_FRAME.pack(len(data) + 4, self.seq) + data)
        return fut

    def _send(self, frame: bytes) -> None:
        assert self.loop is not None
        if self.outbuf:
            self.outbuf += frame
            return
        try:
            sent = self.sock.send(frame)
        except BlockingIOError:
            sent = 0
        if sent < len(frame):
            self.outbuf += frame[sent:]
            self.loop.add_writer(self.sock.fileno(), self._writable)

    def _writable(self) -> None:
        assert self.loop is not None
        try:
            sent = self.sock.send(self.outbuf)
        except BlockingIOError:
            return
        del self.outbuf[:sent]
        if not self.outbuf:
            self.loop.remove_writer(self.sock.fileno())

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except BlockingIOError:
            return
        if not data:
            raise RuntimeError("the verify worker exited")
        self.inbuf += data
        n = len(self.inbuf) // _VERDICT.size * _VERDICT.size
        for seq, verdict in _VERDICT.iter_unpack(self.inbuf[:n]):
            fut = self.waiting.pop(seq, None)
            if fut is not None and not fut.done():
                fut.set_result(_VERDICTS.get(verdict))
        del self.inbuf[:n]

    def cpu_s(self) -> float:
        """CPU seconds the worker has used (it works for the nodes: counted with them)."""
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        if self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self.proc.wait(10)


_FRAME = struct.Struct(">II")  # frame length (after these 4 bytes), request number
_VERDICT = struct.Struct(">IB")  # request number, then one of _VERDICTS' codes
_VERDICTS: dict[int, Any] = {0: False, 1: True, 2: None, 3: Outcome.FORGED}  # refuted, verified,
# cannot tell, bad signature


def verify_worker(fd: int) -> None:
    """The worker's side: for every envelope that comes, check its signature, then parse and
    verify its alert (a signed body that is no alert is refuted); answer each in turn."""
    from sca.codec import FormatError, decode_alert
    from sca.envelope import decode_envelope
    image = load_image(manifest_path(SERVICE))
    verifier = Verifier([image])
    verifier.sandbox(image.service_id)
    sock = socket.socket(fileno=fd)
    buf = bytearray()
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return
        buf += data
        while len(buf) >= 4:
            size = int.from_bytes(buf[:4], "big")
            if len(buf) < 4 + size:
                break
            seq = int.from_bytes(buf[4:8], "big")
            try:
                envelope = decode_envelope(bytes(buf[8:4 + size]))
                envelope.check()
            except Exception:
                code = 3
            else:
                try:
                    verdict = verifier.verify(decode_alert(envelope.alert_bytes))
                    code = (1 if verdict.verified else 2 if verdict.reason == "unknown-service"
                            else 0)
                except FormatError:
                    code = 0
                except Exception:
                    code = 2
            # Each verdict as soon as it is known: a node waiting on the first of a batch
            # should not wait for the whole batch (tens of ms when many arrive at once).
            sock.sendall(_VERDICT.pack(seq, code))
            del buf[:4 + size]


# --- a process's worth of nodes --------------------------------------------------------------


@dataclass
class Host:
    """Nodes in this process: ``first`` is the global index of the first one."""

    prefix: int
    first: int
    count: int
    seed_addr: tuple[str, int]
    concurrency: int = 32
    verify_worker: bool = True
    nodes: list[Overlay] = field(default_factory=list)
    delivered: list[dict[str, float]] = field(default_factory=list)
    arrivals: Counter[str] = field(default_factory=Counter)  # deliveries per alert id
    dead: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        image = load_image(manifest_path(SERVICE))
        self.verifier = Verifier([image])
        self.verifier.sandbox(image.service_id)  # boot the clone before timing anything
        self.worker = VerifyWorker() if self.verify_worker else None
        # With the worker, the signature is checked and the alert parsed there too (one round
        # trip instead of a signature check and a parse on this loop and a round trip); inline,
        # all of it runs here.
        verify = ({"verify_body": self.worker.verify_body} if self.worker is not None
                  else {"verify": self.verifier.verify})
        self.rss_before = rss_kb()
        # Each node's first refresh pass (a minute after joining, on its own; the early passes
        # a few seconds after) is run for all of them at once after the join (``settle``): a
        # thousand joins squeezed into a few minutes of one process should not also run a
        # thousand refresh passes among them.
        config = OverlayConfig(dht=DhtConfig(first_refresh_s=3600.0, early_refresh_s=0.0))
        for k in range(self.count):
            i = self.first + k
            got: dict[str, float] = {}
            self.delivered.append(got)

            def on_alert(envelope: Any, alert: Any, got: dict[str, float] = got) -> None:
                aid = envelope_id(envelope)
                got[aid] = time.time()
                self.arrivals[aid] += 1

            addr = node_addr(self.prefix, i)
            boot = [] if addr == self.seed_addr else [f"{self.seed_addr[0]}:{self.seed_addr[1]}"]
            self.nodes.append(Overlay(NodeKey.generate(), bind=addr, bootstrap=boot,
                                      **verify, on_alert=on_alert,
                                      config=config))

    async def start_seed(self) -> None:
        for node in self.nodes:
            if node.bind == self.seed_addr:
                await node.start(join=False)

    async def join(self) -> float:
        # No garbage collection until the refresh pass is over (``settle``): full collections
        # over a thousand nodes' growing heap were a fifth of the join's time (41 of them,
        # 28 s of 202 s) and 19 s of the refresh pass; a real node's heap is a thousandth of
        # this one's. What the nodes allocate is freed by reference counting as usual.
        gc.disable()
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(self.concurrency)

        async def one(node: Overlay) -> None:
            async with sem:
                await node.start()

        await asyncio.gather(*(one(n) for n in self.nodes if n.core is None))
        return time.perf_counter() - t0

    async def settle(self) -> float:
        """One prefix-group refresh pass on every node: what each node does by itself about a
        minute after joining (``DhtConfig.first_refresh_s``), done here at once instead of
        waiting for it."""
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(self.concurrency)

        async def one(node: Overlay) -> None:
            async with sem:
                await node.server.refresh_groups()

        await asyncio.gather(*(one(n) for n in self.nodes))
        took = time.perf_counter() - t0
        # What the nodes hold from now on is scanned by no garbage collection either (a full
        # one took a second or two, and struck in the middle of a broadcast now and then);
        # what they allocate from now on is collected, but in larger batches: at Python's
        # default (a young collection every 700 allocations) a broadcast to a thousand nodes
        # in one process ran ~45 young and ~5 middle collections, 55-130 ms of the process's
        # ~1 s; every 20,000 allocations, one or two, 10-16 ms. (A daemon allocates for one
        # node, a thousandth of this.)
        gc.collect()
        gc.freeze()
        gc.set_threshold(20000, 10, 10)
        gc.enable()
        return took

    def local(self, i: int) -> Overlay:
        return self.nodes[i - self.first]

    async def kill(self, idxs: Sequence[int]) -> None:
        for i in idxs:
            self.dead.add(i)
        await asyncio.gather(*(self.local(i).stop() for i in idxs))

    async def publish(self, i: int, envelope: bytes) -> None:
        await self.local(i).publish(envelope)

    def missing(self, aid: str, publisher: int) -> int:
        """Live nodes (other than the publisher) that have not delivered ``aid``, asked every
        20 ms: counted as they deliver, so asking costs nothing (a walk over a thousand nodes'
        deliveries took some 8% of the CPU while they broadcast). Nodes are stopped before
        an alert is published and never deliver their own, so every arrival is a live
        node's."""
        ours = self.first <= publisher < self.first + self.count
        return self.count - len(self.dead) - ours - self.arrivals[aid]

    def counts(self, contacts: bool = False) -> dict[str, Any]:
        per_node = []
        for k, node in enumerate(self.nodes):
            stats = node.stats()
            tx = {key[len("dht.tx_"):]: v for key, v in stats.items()
                  if key.startswith("dht.tx_0x")}
            per_node.append({"i": self.first + k, "tx": tx,
                             "fetches": stats.get("node.fetches", 0),
                             "dead": (self.first + k) in self.dead,
                             "contacts": len(node.peers()) if contacts and node.core else 0,
                             "drops": {key: v for key, v in stats.items()
                                       if "drop" in key or "refused" in key or "errors" in key},
                             "delivered": self.delivered[k]})
        return {"nodes": per_node, "rss_kb": rss_kb(), "rss_before_kb": self.rss_before,
                "cpu_s": time.process_time() + self.worker_cpu_s(),
                "worker_cpu_s": self.worker_cpu_s()}

    def worker_cpu_s(self) -> float:
        return self.worker.cpu_s() if self.worker is not None else 0.0

    def flood_plan(self, idxs: Sequence[int]) -> list[dict[str, Any]]:
        plan = []
        for i in idxs:
            node = self.local(i)
            plan.append({"bind": list(node.bind),
                         "targets": [list(p.addr) for p in node.peers()]})
        return plan

    async def close(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)
        if self.worker is not None:
            self.worker.close()


def envelope_id(envelope: Any) -> str:
    import hashlib
    return hashlib.sha256(envelope.alert_bytes).hexdigest()


# --- clusters: the same calls in this process or through workers -----------------------------


class LocalCluster:
    def __init__(self, n: int, prefix: int, concurrency: int, worker: bool = True) -> None:
        self.n = n
        self.host = Host(prefix, 0, n, node_addr(prefix, 0), concurrency, worker)

    async def join(self) -> float:
        await self.host.start_seed()
        return await self.host.join()

    async def settle(self) -> float:
        return await self.host.settle()

    async def kill(self, idxs: Sequence[int]) -> None:
        await self.host.kill(idxs)

    async def publish(self, i: int, envelope: bytes) -> None:
        await self.host.publish(i, envelope)

    async def counts(self, contacts: bool = False) -> list[dict[str, Any]]:
        return [self.host.counts(contacts)]

    async def missing(self, aid: str, publisher: int) -> int:
        return self.host.missing(aid, publisher)

    async def flood_plan(self, idxs: Sequence[int]) -> list[dict[str, Any]]:
        plan = self.host.flood_plan(idxs)
        await self.host.kill(idxs)
        return plan

    async def close(self) -> None:
        await self.host.close()


class ProcCluster:
    def __init__(self, procs: int, per_proc: int, prefix: int, concurrency: int,
                 worker: bool = True) -> None:
        self.n = procs * per_proc
        self.per_proc = per_proc
        self.procs: list[asyncio.subprocess.Process] = []
        self.spec = (procs, per_proc, prefix, concurrency)
        self.worker = worker

    async def _ask(self, k: int, msg: dict[str, Any]) -> Any:
        proc = self.procs[k]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(msg) + "\n").encode())
        await proc.stdin.drain()
        line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {k} exited")
        return json.loads(line)

    async def join(self) -> float:
        procs, per_proc, prefix, concurrency = self.spec
        seed = node_addr(prefix, 0)
        for k in range(procs):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(Path(__file__).resolve()), "--worker",
                "--first", str(k * per_proc), "--proc-nodes", str(per_proc),
                "--prefix", str(prefix), "--seed", f"{seed[0]}:{seed[1]}",
                "--join-concurrency", str(max(1, concurrency // procs)),
                *([] if self.worker else ["--inline-verify"]),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                limit=64 << 20)
            self.procs.append(proc)
        for k in range(procs):
            await self._ask(k, {"cmd": "hello"})  # each has booted its verifier
        await self._ask(0, {"cmd": "seed"})
        t0 = time.perf_counter()
        await asyncio.gather(*(self._ask(k, {"cmd": "join"}) for k in range(procs)))
        return time.perf_counter() - t0

    async def settle(self) -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(self._ask(k, {"cmd": "settle"}) for k in range(len(self.procs))))
        return time.perf_counter() - t0

    def _owner(self, i: int) -> int:
        return i // self.per_proc

    async def kill(self, idxs: Sequence[int]) -> None:
        by: dict[int, list[int]] = {}
        for i in idxs:
            by.setdefault(self._owner(i), []).append(i)
        await asyncio.gather(*(self._ask(k, {"cmd": "kill", "idx": v}) for k, v in by.items()))

    async def publish(self, i: int, envelope: bytes) -> None:
        await self._ask(self._owner(i), {"cmd": "publish", "idx": i, "env": envelope.hex()})

    async def counts(self, contacts: bool = False) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._ask(k, {"cmd": "counts", "contacts": contacts})
                                           for k in range(len(self.procs)))))

    async def missing(self, aid: str, publisher: int) -> int:
        return sum(await asyncio.gather(*(
            self._ask(k, {"cmd": "missing", "aid": aid, "publisher": publisher})
            for k in range(len(self.procs)))))

    async def flood_plan(self, idxs: Sequence[int]) -> list[dict[str, Any]]:
        by: dict[int, list[int]] = {}
        for i in idxs:
            by.setdefault(self._owner(i), []).append(i)
        plans = await asyncio.gather(*(self._ask(k, {"cmd": "flood_plan", "idx": v})
                                       for k, v in by.items()))
        return [p for plan in plans for p in plan]

    async def close(self) -> None:
        for k, proc in enumerate(self.procs):
            try:
                await asyncio.wait_for(self._ask(k, {"cmd": "quit"}), 30)
            except Exception:
                proc.kill()
        for proc in self.procs:
            await proc.wait()


async def worker(args: argparse.Namespace) -> None:
    host_ip, port = args.seed.rsplit(":", 1)
    host = Host(args.prefix, args.first, args.proc_nodes, (host_ip, int(port)),
                args.join_concurrency, not args.inline_verify)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj: Any) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    while True:
        line = await reader.readline()
        if not line:
            break
        msg = json.loads(line)
        cmd = msg["cmd"]
        if cmd == "hello":
            reply({"ok": True})
        elif cmd == "seed":
            await host.start_seed()
            reply({"ok": True})
        elif cmd == "join":
            reply({"seconds": await host.join()})
        elif cmd == "settle":
            reply({"seconds": await host.settle()})
        elif cmd == "kill":
            await host.kill(msg["idx"])
            reply({"ok": True})
        elif cmd == "publish":
            await host.publish(msg["idx"], bytes.fromhex(msg["env"]))
            reply({"ok": True})
        elif cmd == "counts":
            reply(host.counts(msg.get("contacts", False)))
        elif cmd == "missing":
            reply(host.missing(msg["aid"], msg["publisher"]))
        elif cmd == "flood_plan":
            plan = host.flood_plan(msg["idx"])
            await host.kill(msg["idx"])
            reply(plan)
        elif cmd == "quit":
            await host.close()
            reply({"ok": True})
            break


# --- the flooder -----------------------------------------------------------------------------


def junk_pool(rng: random.Random) -> list[bytes]:
    """Datagrams a hostile node might send: every kind of wrong, plus well-formed nonsense."""
    from overlay import mpack
    pool: list[bytes] = []
    for _ in range(40):
        pool.append(rng.randbytes(rng.randint(1, 1400)))  # random bytes
    for _ in range(10):
        pool.append(rng.randbytes(rng.randint(1401, 4000)))  # oversized
    frame = b"\x00" + rng.randbytes(20) + mpack.packb(["find_node", [rng.randbytes(20)] * 2])
    for cut in range(1, len(frame), 3):
        pool.append(frame[:cut])  # truncated msgpack
    shapes: list[Any] = [["find_node", [1, 2]], ["ping", []], ["hello", [b"x", 5, "a"]],
                         ["store", [b"k" * 20, b"k" * 20, b"v"]], ["find_node", "x"], [1, 2, 3],
                         ["ping", [b"\x00" * 21]], ["hello", [b"n" * 16, "localhost", 1]]]
    for shape in shapes:
        pool.append(b"\x00" + rng.randbytes(20) + mpack.packb(shape))
    for _ in range(10):  # hostile replies to requests nobody made
        pool.append(b"\x01" + rng.randbytes(20) + mpack.packb(
            [[rng.randbytes(20), "127.0.0.1", 1]] * 20))
    pool.append(b"\x00" + rng.randbytes(20) + b"\xdd\xff\xff\xff\xff")  # huge array head
    for _ in range(40):  # announcements and digests of made-up alert ids
        pool.append(wire.encode(wire.Announce(rng.randbytes(32), rng.randint(0, 160))))
        pool.append(wire.encode(wire.IHave(tuple(rng.randbytes(32) for _ in range(16)), True)))
        pool.append(wire.encode(wire.Ack(rng.randbytes(32), wire.AckStatus.TAKEN)))
    return pool


def flooder(plan: list[dict[str, Any]], duration: float, ready_file: str) -> None:
    """Send junk from every planned address to its targets as fast as this process can."""
    rng = random.Random(7)
    pool = junk_pool(rng)
    socks = []
    for entry in plan:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(tuple(entry["bind"]))
        s.setblocking(False)
        targets = [tuple(t) for t in entry["targets"]] or [tuple(entry["bind"])]
        socks.append((s, targets))
    Path(ready_file).write_text("ready")
    sent = 0
    errors = 0
    end = time.monotonic() + duration
    k = 0
    while time.monotonic() < end:
        for s, targets in socks:
            for _ in range(8):
                k += 1
                try:
                    s.sendto(pool[k % len(pool)], targets[k % len(targets)])
                    sent += 1
                except OSError:
                    errors += 1
    print(json.dumps({"sent": sent, "errors": errors, "seconds": duration}), flush=True)


# --- scenarios -------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    live: int
    coverage: float
    t100_s: float | None
    msgs_per_node: float
    breakdown: dict[str, float]
    junk_sent: int = 0
    junk_per_s: float = 0.0
    drops: dict[str, int] = field(default_factory=dict)
    kernel_udp_drops: dict[str, int] = field(default_factory=dict)
    # CPU of every node process and verify worker, publish to last delivery
    cpu_ms_per_node: float = 0.0
    worker_cpu_ms_per_node: float = 0.0  # the part of it spent in the verify workers


def _flatten(reports: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [n for r in reports for n in r["nodes"]]


def _totals(nodes: list[dict[str, Any]]) -> Counter[str]:
    c: Counter[str] = Counter()
    for n in nodes:
        if n["dead"]:
            continue
        for kind, v in n["tx"].items():
            c[kind] += v
        c["fetch"] += n["fetches"]
    return c


KIND_NAMES = {"0x00": "rpc_request", "0x01": "rpc_reply", "0x10": "announce", "0x11": "ack",
              "0x12": "digest"}


async def scenario(cluster: LocalCluster | ProcCluster, name: str, envelope: bytes,
                   rng: random.Random, timeout: float = 20.0,
                   flood: dict[str, Any] | None = None) -> Result:
    import hashlib

    from sca.envelope import decode_envelope
    aid = hashlib.sha256(decode_envelope(envelope).alert_bytes).hexdigest()
    before_reports = await cluster.counts()
    before = _flatten(before_reports)
    live = [n["i"] for n in before if not n["dead"]]
    publisher = rng.choice(live)
    start = _totals(before)
    kernel_before = udp_errors()
    t0 = time.time()
    await cluster.publish(publisher, envelope)
    while time.time() - t0 < timeout:
        await asyncio.sleep(0.02)
        if await cluster.missing(aid, publisher) == 0:
            break
    done = await cluster.counts()
    kernel = {k: v - kernel_before[k] for k, v in udp_errors().items()}
    cpu = sum(r["cpu_s"] for r in done) - sum(r["cpu_s"] for r in before_reports)
    worker_cpu = (sum(r["worker_cpu_s"] for r in done)
                  - sum(r["worker_cpu_s"] for r in before_reports))
    await asyncio.sleep(1.0)
    last = _flatten(await cluster.counts())
    others = [n for n in last if not n["dead"] and n["i"] != publisher]
    got = [n["delivered"][aid] for n in others if aid in n["delivered"]]
    coverage = len(got) / len(others)
    t100 = (max(got) - t0) if len(got) == len(others) else None
    end = _totals(last)
    delta = {k: end[k] - start[k] for k in end}
    n_live = len(others) + 1
    breakdown = {KIND_NAMES.get(k, k): round(v / n_live, 3) for k, v in sorted(delta.items())}
    drops: Counter[str] = Counter()
    for n in last:
        drops.update(n["drops"])
    result = Result(name, n_live, coverage, t100, sum(delta.values()) / n_live, breakdown,
                    drops=dict(drops), kernel_udp_drops=kernel,
                    cpu_ms_per_node=1000 * cpu / n_live,
                    worker_cpu_ms_per_node=1000 * worker_cpu / n_live)
    print(f"  {name}: coverage {coverage:.4f}, t100 {t100}, {result.msgs_per_node:.2f} msgs "
          f"and {result.cpu_ms_per_node:.2f} CPU ms per node", file=sys.stderr, flush=True)
    return result


async def run(cluster: LocalCluster | ProcCluster, label: str, envelopes: list[bytes],
              seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    print(f"[{label}] {cluster.n} nodes: joining...", file=sys.stderr, flush=True)
    join_s = await cluster.join()
    print(f"[{label}] joined in {join_s:.1f} s; one refresh pass...", file=sys.stderr,
          flush=True)
    settle_s = await cluster.settle()
    reports = await cluster.counts(contacts=True)
    nodes = _flatten(reports)
    contacts = [n["contacts"] for n in nodes]
    gc.collect()
    mem = sum(r["rss_kb"] - r["rss_before_kb"] for r in reports) / cluster.n
    print(f"[{label}] settled in {settle_s:.1f} s; contacts min {min(contacts)} "
          f"mean {sum(contacts) / len(contacts):.0f}", file=sys.stderr, flush=True)
    results = [await scenario(cluster, "dead0", envelopes[0], rng)]
    ids = list(range(cluster.n))
    rng.shuffle(ids)
    tenth = cluster.n // 10
    await cluster.kill(ids[:tenth])
    await asyncio.sleep(0.5)
    results.append(await scenario(cluster, "dead10", envelopes[1], rng))
    plan = await cluster.flood_plan(ids[tenth:2 * tenth])
    ready = f"/tmp/hw-bench-flood-{os.getpid()}-{label}"
    Path(ready).unlink(missing_ok=True)
    duration = 22.0  # long enough for anti-entropy (every ~10 s) to repair what the flood cost
    flood_proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--flooder", ready, str(duration)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert flood_proc.stdin is not None
    flood_proc.stdin.write(json.dumps(plan))
    flood_proc.stdin.close()
    while not Path(ready).exists() and flood_proc.poll() is None:
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # let the flood build up before publishing
    flood_result = await scenario(cluster, "flood10", envelopes[2], rng, timeout=duration - 3)
    assert flood_proc.stdout is not None
    out = await asyncio.to_thread(flood_proc.stdout.read)
    await asyncio.to_thread(flood_proc.wait)
    Path(ready).unlink(missing_ok=True)
    junk = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"sent": 0}
    flood_result.junk_sent = junk["sent"]
    flood_result.junk_per_s = junk["sent"] / duration
    results.append(flood_result)
    await cluster.close()
    return {"label": label, "nodes": cluster.n, "join_s": join_s, "settle_s": settle_s,
            "mem_kb": mem,
            "contacts_mean": sum(contacts) / len(contacts), "contacts_min": min(contacts),
            "results": results}


def table(runs: list[dict[str, Any]]) -> None:
    print(f"{'run':<10}{'scenario':<10}{'live':>6}{'coverage':>10}{'t100 s':>9}"
          f"{'msgs/node':>11}{'cpu ms/node':>13}{'(worker)':>10}  breakdown per node")
    for r in runs:
        for res in r["results"]:
            t = f"{res.t100_s:.3f}" if res.t100_s is not None else "n/a"
            bd = " ".join(f"{k}={v}" for k, v in res.breakdown.items() if v)
            print(f"{r['label']:<10}{res.name:<10}{res.live:>6}{res.coverage:>10.4f}{t:>9}"
                  f"{res.msgs_per_node:>11.2f}{res.cpu_ms_per_node:>13.2f}"
                  f"{res.worker_cpu_ms_per_node:>10.2f}  {bd}")
            if res.junk_sent:
                dropped = {k: v for k, v in res.drops.items() if v}
                print(f"{'':<20}junk sent {res.junk_sent} ({res.junk_per_s:.0f}/s); "
                      f"drops at nodes: {dropped}")
            if any(res.kernel_udp_drops.values()):
                print(f"{'':<20}kernel UDP receive drops, publish to last delivery: "
                      f"{res.kernel_udp_drops}")
        print(f"{r['label']:<10}join {r['join_s']:.1f} s (+ refresh pass {r['settle_s']:.1f} s) "
              f"for {r['nodes']} nodes; contacts "
              f"mean {r['contacts_mean']:.0f} min {r['contacts_min']}; memory "
              f"{r['mem_kb']:.0f} KB per node")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000, help="nodes in the one-process run (0: skip)")
    p.add_argument("--procs", type=int, default=4, help="worker processes (0: skip that run)")
    p.add_argument("--proc-nodes", type=int, default=250, help="nodes per worker process")
    p.add_argument("--join-concurrency", type=int, default=16)
    p.add_argument("--seed", default="", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--prefix", type=int, default=40, help=argparse.SUPPRESS)
    p.add_argument("--inline-verify", action="store_true",
                   help="run the sandbox in the node processes, not in a worker process")
    p.add_argument("--verify-worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--flooder", nargs=2, metavar=("READY", "SECONDS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    if args.verify_worker is not None:
        verify_worker(args.verify_worker)
        return 0
    if args.flooder:
        flooder(json.loads(sys.stdin.read()), float(args.flooder[1]), args.flooder[0])
        return 0
    if args.worker:
        import logging
        logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
        asyncio.run(worker(args))
        return 0
    import logging
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    load = os.getloadavg()
    alerts = make_alerts(6)
    key = NodeKey.generate()
    runs: list[dict[str, Any]] = []

    def envelopes(offset: int) -> list[bytes]:
        return [seal(a, key, time.time()).encode() for a in alerts[offset:offset + 3]]

    if args.nodes:
        cluster = LocalCluster(args.nodes, 40, args.join_concurrency, not args.inline_verify)
        runs.append(asyncio.run(run(cluster, "1proc", envelopes(0), seed=1)))
    if args.procs:
        pc = ProcCluster(args.procs, args.proc_nodes, 41, args.join_concurrency,
                         not args.inline_verify)
        runs.append(asyncio.run(run(pc, f"{args.procs}procs", envelopes(3), seed=2)))
    table(runs)
    verify = "inline" if args.inline_verify else "worker process"
    print(f"sandbox verification: {verify}; load average (1 min) at the start "
          f"{load[0]:.2f}, at the end {os.getloadavg()[0]:.2f}; {os.cpu_count()} CPUs")
    summary: dict[str, Any] = {"verify": verify, "load_1m_start": round(load[0], 2),
                               "load_1m_end": round(os.getloadavg()[0], 2)}
    for r in runs:
        pre = "" if r["label"] == "1proc" else "mp_"
        by = {res.name: res for res in r["results"]}
        summary[f"{pre}nodes"] = r["nodes"]
        summary[f"{pre}bootstrap_s"] = round(r["join_s"], 2)
        summary[f"{pre}refresh_pass_s"] = round(r["settle_s"], 2)
        summary[f"{pre}mem_per_node_kb"] = round(r["mem_kb"], 1)
        for name, res in by.items():
            summary[f"{pre}cov_{name}"] = round(res.coverage, 4)
            summary[f"{pre}t100_{name}_s"] = (None if res.t100_s is None
                                              else round(res.t100_s, 3))
            summary[f"{pre}msgs_per_node_{name}"] = round(res.msgs_per_node, 2)
            summary[f"{pre}cpu_ms_per_node_{name}"] = round(res.cpu_ms_per_node, 2)
            summary[f"{pre}worker_cpu_ms_per_node_{name}"] = round(res.worker_cpu_ms_per_node, 2)
        summary[f"{pre}msgs_per_node"] = round(max(res.msgs_per_node
                                                   for res in by.values()
                                                   if res.name != "flood10"), 2)
        summary[f"{pre}flood_junk_per_s"] = round(by["flood10"].junk_per_s)
    if args.procs:
        summary["mp_procs"] = args.procs
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
