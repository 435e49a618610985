"""Baseline 2: migrate the connection into the OS stack with TCP_REPAIR and IP_TRANSPARENT.

From the same observed state the user-level takeover uses, the node builds two kernel sockets in
repair mode: one bound to the server's address and port and "connected" to the client (it is the
server towards the client), one bound to the client's and connected to the server. Both need
IP_TRANSPARENT (the addresses are not the node's) and only work for a node in the path: on the
server's own host the server's socket already holds that 4-tuple. The flow's packets are then
policy-routed to the node itself (mark ``REPAIR_LOCAL`` at prerouting, ``ip rule fwmark ...
lookup local-table``) where the kernel's socket lookup finds the repaired sockets; a splice
relays between them through the same policy.

Order: the client-facing socket is restored, the redirect added, and that socket made live
before the server-facing one is built (as the user-level takeover answers the client first).
The repair order within a socket (field notes, and Linux's checks in ``do_tcp_setsockopt``):
repair on, bind, sequence numbers of both queues, connect (no SYN in repair mode), options (MSS,
window scale, SACK, timestamps), the timestamp offset, queue contents, the window LAST (its
checks compare ``rcv_wup`` with ``rcv_nxt``, which the receive queue moves), then repair off,
which makes the kernel send a window probe: the first segment the new owner emits.

This needs routing changes, so :class:`RepairEngine` only acts inside a namespace (tests and
benchmarks); it never touches the machine's own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import struct
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from node.kernel.nfqueue import Handle, Scheduler
from node.kernel.sockets import mark_socket
from node.stack.conntrack import Flow
from node.takeover import rules
from node.takeover.adapter import Link, Trigger
from node.takeover.policy import Policy, Scrub
from node.takeover.seed import StreamTail, seeds
from node.takeover.tcp import seq_add, seq_diff

log = logging.getLogger(__name__)

SOL_TCP = socket.IPPROTO_TCP
SOL_IP = socket.IPPROTO_IP
TCP_REPAIR = 19
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_SEND_QUEUE = 0, 1, 2
TCP_REPAIR_ON, TCP_REPAIR_OFF, TCP_REPAIR_OFF_NO_WP = 1, 0, -1
IP_TRANSPARENT = 19
TCPOPT_MSS, TCPOPT_WINDOW, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP = 2, 3, 4, 8

ROUTE_TABLE = 177
REDIRECT = "repair_flows"


@dataclass(slots=True)
class RepairState:
    """One repaired socket: ``local`` impersonated, ``remote`` its peer."""

    local: tuple[str, int]
    remote: tuple[str, int]
    snd_seq: int  # first sequence number of the send queue (snd_una)
    send_queue: bytes  # [snd_una, snd_nxt): sent, not acknowledged (must be complete)
    rcv_seq: int  # rcv_nxt before ``recv_queue``
    recv_queue: bytes  # bytes received and not yet read (the trigger message)
    mss: int
    snd_wscale: int  # the peer's shift
    rcv_wscale: int  # ours
    sack: bool
    ts_val: int | None  # our TSval now (None: no timestamps)
    snd_wnd: int  # the peer's window, bytes
    rcv_wnd: int  # the window we advertised, bytes
    rcv_wup: int  # rcv_nxt when we advertised it


def states(flow: Flow, trigger_seq: int, trigger_data: bytes, *,
           c2s: StreamTail | None = None, s2c: StreamTail | None = None
           ) -> tuple[RepairState, RepairState]:
    """(to_client, to_server) from the observed flow, like ``seed.seeds``. A send queue whose
    bytes the node does not have is left out (the socket starts at snd_nxt)."""
    a, b = seeds(flow, trigger_seq, c2s=c2s, s2c=s2c)
    (c, cp), (s, sp) = flow.orig, flow.resp
    client = (socket.inet_ntoa(c), cp)
    server = (socket.inet_ntoa(s), sp)
    out = []
    for seed, local, remote, data in ((a, server, client, trigger_data),
                                      (b, client, server, b"")):
        unacked = seed.unacked or b""
        gap = seq_diff(seed.snd_nxt, seed.snd_una)
        if len(unacked) != gap:  # a hole: the kernel would need every byte
            snd_seq, queue = seed.snd_nxt, b""
        else:
            snd_seq, queue = seed.snd_una, unacked
        shift_in = seed.rcv_shift or 0
        rcv_wnd = seq_diff(seed.rcv_adv, seed.rcv_nxt) if seed.rcv_adv is not None else (
            seed.rcv_raw << shift_in)
        out.append(RepairState(
            local=local, remote=remote, snd_seq=snd_seq, send_queue=queue,
            rcv_seq=seed.rcv_nxt, recv_queue=data,
            mss=seed.mss + (12 if seed.ts_val is not None else 0),
            snd_wscale=seed.snd_shift or 0, rcv_wscale=shift_in,
            sack=flow.sack_permitted, ts_val=seed.ts_val,
            snd_wnd=seed.snd_wnd, rcv_wnd=max(rcv_wnd, 0), rcv_wup=seed.rcv_nxt))
    return out[0], out[1]


def _u32(v: int) -> bytes:
    """An unsigned 32-bit option value (Python's int form is a signed C int)."""
    return struct.pack("=I", v & 0xFFFFFFFF)


def repair(st: RepairState, *, mark: int = rules.TAKEOVER_OWN, off: bool = True,
           probe: bool = True) -> socket.socket:
    """A kernel socket in the observed state (in the calling thread's namespace)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(SOL_IP, IP_TRANSPARENT, 1)
        mark_socket(s, mark)
        s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_ON)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(st.local)
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _u32(st.snd_seq))
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        s.setsockopt(SOL_TCP, TCP_QUEUE_SEQ, _u32(st.rcv_seq))
        s.connect(st.remote)  # repair mode: no SYN, straight to ESTABLISHED
        opts = [TCPOPT_MSS, st.mss, TCPOPT_WINDOW, st.snd_wscale | (st.rcv_wscale << 16)]
        if st.sack:
            opts += [TCPOPT_SACK_PERM, 0]
        if st.ts_val is not None:
            opts += [TCPOPT_TIMESTAMP, 0]
        s.setsockopt(SOL_TCP, TCP_REPAIR_OPTIONS, struct.pack(f"={len(opts)}I", *opts))
        if st.ts_val is not None:
            s.setsockopt(SOL_TCP, TCP_TIMESTAMP, _u32(st.ts_val))
        if st.send_queue:
            s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            s.sendall(st.send_queue)
        if st.recv_queue:
            s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
            s.sendall(st.recv_queue)
        s.setsockopt(SOL_TCP, TCP_REPAIR_QUEUE, TCP_NO_QUEUE)
        rcv_nxt = seq_add(st.rcv_seq, len(st.recv_queue))
        # snd_wl1 must not lie past rcv_nxt + rcv_wnd; the last window update came with the
        # peer's segment at rcv_nxt.
        window = struct.pack("=5I", rcv_nxt, st.snd_wnd, max(st.snd_wnd, 1), st.rcv_wnd,
                             st.rcv_wup & 0xFFFFFFFF)
        s.setsockopt(SOL_TCP, TCP_REPAIR_WINDOW, window)
        if off:
            s.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF if probe else TCP_REPAIR_OFF_NO_WP)
    except BaseException:
        s.close()
        raise
    return s


def redirect_setup(ns_name: str) -> list[str]:
    """nft statements for the redirect set and its prerouting chain (before routing)."""
    t = rules.TABLE
    return [
        f"add set {t} {REDIRECT} {{ type ipv4_addr . inet_service . ipv4_addr . inet_service; }}",
        f"add chain {t} repair_pre {{ type filter hook prerouting priority -150; "
        "policy accept; }",
        f"flush chain {t} repair_pre",
        f"add rule {t} repair_pre meta l4proto tcp ip saddr . tcp sport . ip daddr . "
        f"tcp dport @{REDIRECT} {rules.set_mark(rules.REPAIR_LOCAL)} counter",
    ]


def policy_route(ns_name: str) -> None:
    """``ip rule fwmark REPAIR_LOCAL lookup 177`` + a local default route in table 177, in the
    namespace ``ns_name`` only."""
    mark = f"{rules.REPAIR_LOCAL:#x}/{0x000F0000:#x}"
    for argv in (["rule", "add", "fwmark", mark, "lookup", str(ROUTE_TABLE), "pref", "100"],
                 ["route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", str(ROUTE_TABLE)]):
        r = subprocess.run(["ip", "-n", ns_name, *argv], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0 and "File exists" not in r.stderr:
            raise RuntimeError(f"ip {' '.join(argv)}: {r.stderr.strip()}")


@dataclass
class Migrated:
    to_client: socket.socket
    to_server: socket.socket
    client: tuple[str, int]
    server: tuple[str, int]
    timings: dict[str, float]
    policy: Policy
    c2s_bytes: int = 0
    s2c_bytes: int = 0
    dropped: int = 0
    done: bool = False


class RepairEngine:
    """The baseline on the same queue and trigger as ``TakeoverEngine``."""

    def __init__(self, *, netns: str, nft: rules.NftText,
                 policy: Callable[[Trigger], Policy] | None = None, splice: bool = True) -> None:
        if not netns:
            raise ValueError("the TCP_REPAIR baseline changes routing: namespaces only")
        self.netns = netns
        self.nft = nft
        self.policy = policy or (lambda t: Scrub())
        self.splice = splice
        self.migrated: list[Migrated] = []
        self.stats: Counter[str] = Counter()
        self._sched: Scheduler | None = None
        self._tasks: set[concurrent.futures.Future[None]] = set()

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        """The asyncio loop the relays run on (a reader thread's clock names its loop)."""
        return getattr(self._sched, "loop", self._sched)  # type: ignore[return-value]

    def start(self, loop: Scheduler) -> None:
        self._sched = loop
        self.nft.apply(redirect_setup(self.netns))
        policy_route(self.netns)

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for m in self.migrated:
            for s in (m.to_client, m.to_server):
                with contextlib.suppress(OSError):
                    s.close()

    def offer(self, payload: bytes, handle: Handle, now: float) -> bool:
        return False  # after migration the flow's packets go to the kernel's sockets

    def answer(self, flow: Flow, seq: int, n: int, ack: int, tsval: int | None,
               link: Link | None, now: float) -> None:
        """Nothing to send yet: the kernel's socket needs the state with the trigger in it."""

    def trigger(self, t: Trigger, handle: Handle, now: float) -> None:
        from node.testbed.netns import Namespace

        tm: dict[str, float] = {"start": time.perf_counter()}
        to_client, to_server = states(t.flow, t.seq, t.data, c2s=t.c2s, s2c=t.s2c)
        # The client-facing socket first and live as soon as its packets can reach it (the
        # redirect must exist before it answers, or the client's reply would be forwarded to
        # the server); the server-facing one after (the client's bytes wait in the first
        # socket's receive queue meanwhile). The same order the user-level takeover uses.
        ns = Namespace.attach(self.netns)
        with ns.enter():
            a = repair(to_client, off=False)
        tm["socket_a"] = time.perf_counter()
        self.nft.apply(f"add element {rules.TABLE} {REDIRECT} "
                       f"{{ {rules.flow_elements(t.client, t.server)} }}")
        tm["redirect"] = time.perf_counter()
        a.setsockopt(SOL_TCP, TCP_REPAIR, TCP_REPAIR_OFF)  # window probe: the first segment
        tm["live_a"] = time.perf_counter()
        with ns.enter():
            b = repair(to_server)
        tm["live_b"] = time.perf_counter()
        handle.drop()  # its bytes are in the client-facing socket's receive queue
        m = Migrated(a, b, t.client, t.server, tm, self.policy(t))
        self.migrated.append(m)
        self.stats["migrated"] += 1
        if self.splice and self._loop is not None:
            # Safe from the queue's reader thread as from the loop itself.
            task = asyncio.run_coroutine_threadsafe(self._relay(m, len(t.data)), self._loop)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _relay(self, m: Migrated, trigger_len: int) -> None:
        """The splice: client -> policy -> server and server -> client."""
        loop = self._loop
        assert loop is not None
        a, b = m.to_client, m.to_server
        a.setblocking(False)
        b.setblocking(False)
        first = True
        pending = trigger_len

        async def up() -> None:
            nonlocal first, pending
            while True:
                data = await loop.sock_recv(a, 1 << 16)
                if not data:
                    break
                if first:
                    trig, data = data[:pending], data[pending:]
                    pending -= len(trig)
                    if pending == 0:
                        first = False
                        v = m.policy.trigger(trig)
                        await self._apply(m, v)
                    if not data:
                        continue
                await self._apply(m, m.policy.client(data))
            with contextlib.suppress(OSError):
                b.shutdown(socket.SHUT_WR)

        async def down() -> None:
            while True:
                data = await loop.sock_recv(b, 1 << 16)
                if not data:
                    break
                out = m.policy.server(data)
                if out:
                    await loop.sock_sendall(a, out)
                    m.s2c_bytes += len(out)
            with contextlib.suppress(OSError):
                a.shutdown(socket.SHUT_WR)

        try:
            await asyncio.gather(up(), down())
        except OSError as exc:
            self.stats["relay_errors"] += 1
            log.debug("repair relay: %s", exc)
        finally:
            m.done = True
            a.close()
            b.close()

    async def _apply(self, m: Migrated, v: object) -> None:
        from node.takeover.policy import Verdict

        assert isinstance(v, Verdict)
        m.dropped += v.dropped
        if v.forward:
            await self._loop.sock_sendall(m.to_server, v.forward)  # type: ignore[union-attr]
            m.c2s_bytes += len(v.forward)
        if v.reply:
            await self._loop.sock_sendall(m.to_client, v.reply)  # type: ignore[union-attr]
        if v.close_server:
            with contextlib.suppress(OSError):
                m.to_server.shutdown(socket.SHUT_WR)
        if v.close_client:
            with contextlib.suppress(OSError):
                m.to_client.shutdown(socket.SHUT_WR)
