"""The overlay as the daemon uses it: membership, broadcast, fetches and the neighbour cache on
one asyncio loop, behind a small API.

    overlay = Overlay(key, bind=("10.0.0.5", 7400), bootstrap=["10.0.0.1:7400"],
                      verify=verifier.verify, on_alert=install_filters, state_dir=state)
    await overlay.start()                 # listen, authenticate, join, fill the table
    alert_id = await overlay.publish(envelope_bytes)
    overlay.peers()                       # authenticated contacts in the routing table
    await overlay.stop()

``verify`` is injected (``overlay`` never imports the sandbox). It takes a decoded ``Alert`` and
returns, or returns an awaitable of: True (verified), False (refuted), None (no image for this
service here: cannot tell), or an object with ``verified`` and ``reason`` attributes such as
``sca.verify.Verdict`` (reason ``"unknown-service"`` counts as None), so ``Verifier.verify`` can
be passed as it is. A verifier that raises counts as "cannot tell": the alert is neither
forwarded nor held against anyone.

``verify_envelope`` may be given instead: ``verify_envelope(envelope_bytes, alert)`` checks the
envelope's signature and then verifies the alert, both off the event loop (in a worker
process, say), and answers like ``verify`` or with ``Outcome.FORGED`` for a bad signature (the
announcer is blamed and another is asked). This node then does not check signatures itself
(``BroadcastConfig.signature_by_verifier``): with many nodes in one process, one round trip to
the worker costs less than the signature check on the loop.

``verify_body`` may be given instead of both: ``verify_body(envelope_bytes)`` is
``verify_envelope`` for a verifier that also parses the alert out of the envelope itself (and
refutes a signed body that is not an alert): this node then parses no alert at all
(``BroadcastConfig.alert_by_verifier``; the envelope's format, its hash to the announced id
and its age are still checked here), and ``on_alert`` gets None for the alert.

``on_alert(envelope, alert)`` is called once per alert this node verified that came from
elsewhere (not for alerts it published itself), after the verdict and before the alert is
forwarded to anyone (``alert`` is None with ``verify_body``).

The UDP port carries Kademlia RPCs and broadcast datagrams; the TCP port with the same number
serves alert bodies. Every datagram sent and every fetch made is counted in ``stats()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import heapq
import inspect
import logging
import socket
import time
import weakref
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from overlay import hello as hello_mod
from overlay import neighbours
from overlay.broadcast import (
    Action,
    BroadcastConfig,
    BroadcastCore,
    Contact,
    Deliver,
    Fetch,
    Outcome,
    PublishError,
    Send,
    Unresponsive,
    Verify,
)
from overlay.dht import Addr, DhtConfig, HardenedServer, Peer
from overlay.fetch import Fetching, FetchServer, start_fetch
from overlay.wire import Fault
from sca.alert import Alert
from sca.envelope import MAX_ENVELOPE_BYTES, Envelope
from sca.keys import NodeKey

log = logging.getLogger(__name__)

VerifyFn = Callable[[Alert], Any]
VerifyEnvelopeFn = Callable[[bytes, Alert], Any]
VerifyBodyFn = Callable[[bytes], Any]
OnAlert = Callable[[Envelope, Alert | None], Any]
OnBan = Callable[[str, float], None]  # an address banned now, for this many seconds

__all__ = ["Overlay", "OverlayConfig", "Peer", "PublishError", "parse_peer"]


@dataclass(frozen=True)
class OverlayConfig:
    dht: DhtConfig = field(default_factory=DhtConfig)
    broadcast: BroadcastConfig = field(default_factory=BroadcastConfig)
    fetch_timeout: float = 2.0
    join_timeout: float = 30.0
    save_every_s: float = 600.0


def parse_peer(text: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"[v6]:port"`` or a (host, port) pair; ValueError if malformed."""
    if isinstance(text, tuple):
        host, port = text
    else:
        if not isinstance(text, str) or ":" not in text:
            raise ValueError(f"a peer is host:port, got {text!r}")
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"a peer is [v6 address]:port, got {text!r}")
            port_text = rest
        else:
            host, _, port_text = text.rpartition(":")
        if not port_text.isdigit():
            raise ValueError(f"bad port in {text!r}")
        port = int(port_text)
    if not host or not isinstance(port, int) or not 0 < port <= 0xFFFF:
        raise ValueError(f"bad peer {text!r}")
    return host, port


Verdict = bool | None | Literal[Outcome.FORGED]


def _verdict_of(result: Any) -> Verdict:
    if result is None or isinstance(result, bool) or result is Outcome.FORGED:
        return result
    verified = getattr(result, "verified", None)
    if isinstance(verified, bool):
        if verified:
            return True
        return None if str(getattr(result, "reason", "")) == "unknown-service" else False
    log.warning("verifier returned %r; counting it as 'cannot tell'", type(result).__name__)
    return None


class _Wakeups:
    """The next deadline of every overlay on one loop, under one timer of the loop's. A timer
    per node (``call_at``, and a ``cancel`` whenever its deadline moved earlier) kept a
    thousand handles on the loop's heap with a thousand nodes in one process, compared in
    Python (``TimerHandle.__lt__``) at every push and pop; here a deadline is a tuple on a
    heap of its own, and an overlay whose deadline moved earlier leaves the older entry behind,
    skipped when it comes up. Overlays are held by weak references; when the last one on the
    loop stops, the heap is dropped and the timer cancelled."""

    __slots__ = ("at", "heap", "members", "seq", "timer")

    def __init__(self) -> None:
        self.heap: list[tuple[float, int, weakref.ref[Overlay]]] = []
        self.seq = 0
        self.members = 0  # overlays started on this loop and not stopped
        self.timer: asyncio.TimerHandle | None = None
        self.at = float("inf")

    def add(self, loop: asyncio.AbstractEventLoop, when: float, overlay: Overlay) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (when, self.seq, weakref.ref(overlay)))
        if when < self.at:
            if self.timer is not None:
                self.timer.cancel()
            self.at = when
            self.timer = loop.call_at(when, self._fire)

    def leave(self) -> None:
        self.members -= 1
        if self.members <= 0:
            self.heap.clear()
            if self.timer is not None:
                self.timer.cancel()
            self.timer, self.at = None, float("inf")

    def _fire(self) -> None:
        self.timer, self.at = None, float("inf")
        loop = asyncio.get_running_loop()
        heap = self.heap
        now = loop.time()
        while heap and heap[0][0] <= now:
            when, _, ref = heapq.heappop(heap)
            overlay = ref()
            if overlay is not None and overlay._timer_at == when:  # not superseded
                try:
                    overlay._on_timer()  # which may add (and so set the timer) again
                except Exception:
                    log.warning("overlay timer failed", exc_info=True)
        # One timer, always: the earliest entry's (the adds above may have set it already).
        if heap and heap[0][0] < self.at:
            if self.timer is not None:
                self.timer.cancel()
            self.at = heap[0][0]
            self.timer = loop.call_at(self.at, self._fire)


_wakeups: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Wakeups] = (
    weakref.WeakKeyDictionary())


class _PeerBookOf:
    """The server's authenticated peers (its protocol's ``PeerBook``, once it listens), for
    the broadcast core's ``peers``."""

    def __init__(self, server: HardenedServer) -> None:
        self.server = server

    def has_ip(self, ip: str) -> bool:
        protocol = self.server.protocol
        return protocol is not None and protocol.peers.has_ip(ip)

    def by_addr(self, addr: Addr) -> object | None:
        protocol = self.server.protocol
        return None if protocol is None else protocol.peers.by_addr(addr)


class Overlay:
    def __init__(self, key: NodeKey, bind: tuple[str, int] = ("0.0.0.0", 0),
                 bootstrap: Sequence[str | tuple[str, int]] = (), *,
                 verify: VerifyFn | None = None,
                 verify_envelope: VerifyEnvelopeFn | None = None,
                 verify_body: VerifyBodyFn | None = None,
                 on_alert: OnAlert | None = None, on_ban: OnBan | None = None,
                 state_dir: Path | str | None = None, super_peer: bool = False,
                 config: OverlayConfig | None = None) -> None:
        cfg = config or OverlayConfig()
        if super_peer and not cfg.dht.super_peer:
            cfg = dataclasses.replace(cfg, dht=dataclasses.replace(cfg.dht, super_peer=True))
        if sum(f is not None for f in (verify, verify_envelope, verify_body)) != 1:
            raise TypeError("give one of verify=, verify_envelope= and verify_body=")
        if verify is None:
            cfg = dataclasses.replace(cfg, broadcast=dataclasses.replace(
                cfg.broadcast, signature_by_verifier=True,
                alert_by_verifier=verify_body is not None))
        self.config = cfg
        self.key = key
        self.bind = parse_peer(bind) if not isinstance(bind, tuple) else bind
        self.bootstrap_peers = [parse_peer(p) for p in bootstrap]
        self._verify = verify
        self._verify_envelope = verify_envelope
        self._verify_body = verify_body
        self._on_alert = on_alert
        self._on_ban = on_ban
        self._banned: set[str] = set()  # as last told to the kernel filter (and to on_ban)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.server = HardenedServer(key, cfg.dht, on_broadcast=self._on_broadcast)
        self.core: BroadcastCore | None = None
        self.fetch_server: FetchServer | None = None
        self.address: Addr | None = None
        self.counters: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeups: _Wakeups | None = None  # this loop's, once started
        self._timer_at = float("inf")  # when it is to wake this overlay (inf: not at all)
        self._ban_epoch = 0
        self._contacts_cache: tuple[int, list[Contact]] | None = None
        self._contact_objs: dict[bytes, Contact] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._fetches: set[Fetching] = set()
        self._handoffs: dict[bytes, list[asyncio.Future[bool]]] = {}  # see handed_over
        self._stopping = False

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def node_id(self) -> bytes:
        return self.key.node_id

    async def start(self, join: bool = True) -> None:
        loop = self._loop = asyncio.get_running_loop()
        wakeups = _wakeups.get(loop)
        if wakeups is None:
            wakeups = _wakeups[loop] = _Wakeups()
        wakeups.members += 1
        self._wakeups = wakeups
        self.core = BroadcastCore(self.key.node_id, self._contacts, self.config.broadcast,
                                  now=loop.time(), peers=_PeerBookOf(self.server))
        host, port = self.bind
        await self.server.listen(port, host)
        assert self.server.transport is not None and self.server.protocol is not None
        core = self.core
        self.server.protocol.banned = lambda ip: core.banned(ip, loop.time())
        self.server.protocol.on_abuse = self._on_abuse
        self.server.protocol.on_rtt = core.rtt_sample
        self.server.protocol.on_unreachable = lambda addr: self._run(
            core.unreachable(addr, loop.time()))
        port = self.server.transport.get_extra_info("sockname")[1]
        self.address = (host, port)
        self.fetch_server = FetchServer(self._admit_fetch, self._serve_fetch,
                                        timeout=self.config.fetch_timeout,
                                        mark=self.config.dht.socket_mark)
        await self.fetch_server.start(host, port)
        self._arm()
        if self.state_dir is not None:
            self._spawn(self._save_forever())
        if join:
            await self.join()

    async def join(self, extra: Sequence[str | tuple[str, int]] = ()) -> int:
        """Authenticate and look up through the bootstrap peers, cached neighbours and
        ``extra``; returns how many contacts the routing table holds afterwards."""
        wanted = [*self.bootstrap_peers, *(parse_peer(p) for p in extra)]
        if self.state_dir is not None:
            wanted += [(n.host, n.port) for n in neighbours.load(self.state_dir)]
        addrs: list[Addr] = []
        for host, port in wanted:
            with contextlib.suppress(OSError, ValueError):
                addr = await self._resolve(host, port)
                if addr != self.address and addr not in addrs:
                    addrs.append(addr)
        if addrs:
            # Retried with backoff until some peer has answered: a bootstrap peer may be slow
            # to answer or not up yet, and a node alone in its table can do nothing.
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.join_timeout
            delay = 0.5
            while True:
                try:
                    async with asyncio.timeout(max(0.1, deadline - loop.time())):
                        await self.server.bootstrap(addrs)
                except TimeoutError:
                    pass
                if self.peers() or loop.time() + delay >= deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 8.0)
            if not self.peers():
                log.warning("overlay join: no peer answered within %.0f s",
                            self.config.join_timeout)
        self.save_neighbours()
        return len(self.peers())

    async def _resolve(self, host: str, port: int) -> Addr:
        loop = asyncio.get_running_loop()
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            return host, port
        except OSError:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
            return infos[0][4][0], port

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(Exception):
            self.save_neighbours()
        self._timer_at = float("inf")
        if self._wakeups is not None:
            self._wakeups.leave()
        if self.fetch_server is not None:
            await self.fetch_server.close()
        for job in list(self._fetches):
            job.cancel()
        self._fetches.clear()
        for waiting in self._handoffs.values():
            for fut in waiting:
                if not fut.done():
                    fut.set_result(False)
        self._handoffs.clear()
        await self.server.aclose()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def save_neighbours(self) -> None:
        if self.state_dir is None or self.server.protocol is None:
            return
        nodes = self.server.protocol.router.find_neighbors(self.server.node,
                                                           neighbours.MAX_NEIGHBOURS)
        if nodes:
            neighbours.save(self.state_dir, self.node_id,
                            [neighbours.Neighbour(n.id, n.ip, n.port) for n in nodes])

    async def _save_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.save_every_s)
            with contextlib.suppress(OSError):
                self.save_neighbours()

    # --- API ---------------------------------------------------------------------------------

    async def publish(self, envelope_bytes: bytes) -> bytes:
        """Verify our own alert like any other, then broadcast it to everyone; returns its id.
        ``PublishError`` if the envelope is bad or our own sandbox does not verify it."""
        core, loop = self._ready()
        alert_id, actions = core.publish(envelope_bytes, loop.time(), time.time())
        for action in actions:
            if isinstance(action, Verify):
                self._verdict(action, await self._judge(action))
            else:
                self._run([action])
        status = core.status(alert_id, loop.time())
        if status is not Outcome.VERIFIED:
            raise PublishError(f"this node's own sandbox did not verify it ({status})")
        return alert_id

    async def handed_over(self, alert_id: bytes, timeout: float) -> bool:
        """Wait until every contact this node announced ``alert_id`` to has fetched or
        acknowledged it (True; at once if it was announced to nobody), or ``timeout`` seconds
        (False, as on stop); an alert still being verified here is waited for too. For a
        node's own work on an alert that can wait a moment: started after the hand-off, it
        does not hold up the fetches of the nodes downstream."""
        core, loop = self._ready()
        if core.unsettled(alert_id, loop.time()) == 0:
            return True
        if self._stopping:
            return False
        fut: asyncio.Future[bool] = loop.create_future()
        self._handoffs.setdefault(alert_id, []).append(fut)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return False
        finally:
            waiting = self._handoffs.get(alert_id)
            if waiting is not None and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._handoffs[alert_id]

    def _check_handoffs(self) -> None:
        core, loop = self._ready()
        now = loop.time()
        for aid in [a for a in self._handoffs if core.unsettled(a, now) == 0]:
            for fut in self._handoffs.pop(aid):
                if not fut.done():
                    fut.set_result(True)

    def peers(self) -> list[Peer]:
        protocol = self.server.protocol
        if protocol is None:
            return []
        out = []
        for n in protocol.contacts():
            known = protocol.peers.get(n.id)
            out.append(Peer(n.id, (n.ip, n.port), known.flags if known else 0))
        return out

    def serve_rpc(self, name: str, check: Callable[[list[Any]], tuple[Any, ...] | None],
                  handler: Callable[..., Any]) -> None:
        """Serve an extra RPC on the overlay's port to authenticated peers (see
        ``HardenedProtocol.serve``); call after ``start()``."""
        protocol = self.server.protocol
        if protocol is None:
            raise RuntimeError("start() the overlay first")
        protocol.serve(name, check, handler)

    async def call_rpc(self, addr: tuple[str, int], name: str, *args: Any,
                       attempts: int = 2) -> Any | None:
        """Ask the node at ``addr`` an extra RPC; its reply, or None when none came in time.

        It answers only peers whose hello has checked out; one that does not know this node yet
        authenticates it on the first request, so the second attempt is answered.
        """
        protocol = self.server.protocol
        if protocol is None:
            raise RuntimeError("start() the overlay first")
        for _ in range(attempts):
            ok, reply = await protocol.call(name, addr, *args)
            if ok:
                return reply
        return None

    def status(self, alert_id: bytes) -> str | None:
        core, loop = self._ready()
        s = core.status(alert_id, loop.time())
        return None if s is None else str(s)

    def stats(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        if self.server.protocol is not None:
            out.update({f"dht.{k}": v for k, v in self.server.protocol.stats.items()})
        if self.core is not None:
            out.update({f"bcast.{k}": v for k, v in self.core.stats.items()})
        out.update({f"node.{k}": v for k, v in self.counters.items()})
        return dict(out)

    # --- plumbing ----------------------------------------------------------------------------

    def _ready(self) -> tuple[BroadcastCore, asyncio.AbstractEventLoop]:
        if self.core is None or self._loop is None:
            raise RuntimeError("start() the overlay first")
        return self.core, self._loop

    def _contacts(self) -> list[Contact]:
        protocol = self.server.protocol
        if protocol is None:
            return []
        version = protocol.router.version
        if self._contacts_cache is not None and self._contacts_cache[0] == version:
            return self._contacts_cache[1]
        # The table changes a contact or two at a time: the others' Contact objects are kept
        # (rebuilding every one was a good share of a node's work on an alert's path).
        old = self._contact_objs
        objs: dict[bytes, Contact] = {}
        flags = hello_mod.FLAG_SUPER_PEER
        for n in protocol.contacts():
            known = protocol.peers.get(n.id)
            sp = known is not None and bool(known.flags & flags)
            c = old.get(n.id)
            if c is None or c.addr[0] != n.ip or c.addr[1] != n.port or c.super_peer != sp:
                c = Contact(n.id, (n.ip, n.port), sp, n.long_id)
            objs[n.id] = c
        out = list(objs.values())
        self._contact_objs = objs
        self._contacts_cache = (version, out)
        return out

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.counters["task_errors"] += 1
            log.warning("overlay task failed: %r", task.exception())

    def _on_broadcast(self, data: bytes, addr: Addr) -> None:
        if self.core is None or self._loop is None:
            return
        self._run(self.core.on_datagram(addr, data, self._loop.time(), time.time()))

    def _admit_fetch(self, ip: str) -> bool:
        return (self.core is not None and self._loop is not None
                and self.core.admit_fetch(ip, self._loop.time()))

    def _serve_fetch(self, ip: str, request: bytes) -> bytes | None:
        if self.core is None or self._loop is None:
            return None
        reply = self.core.serve_fetch(ip, request, self._loop.time())
        if self._handoffs:
            self._check_handoffs()  # its waiters run after the reply is written
        return reply

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            try:
                self._do(action)
            except Exception:
                self.counters["action_errors"] += 1
                log.warning("overlay action %s failed", type(action).__name__, exc_info=True)
        # The core adds a timer only along with an announcement (a purge timer without one
        # just runs late): with no actions there is nothing to re-arm, only bans to follow.
        if actions:
            self._arm()
        elif self.core is not None and self.core.ban_epoch != self._ban_epoch:
            self._sync_bans()
        if self._handoffs:
            self._check_handoffs()

    def _do(self, action: Action) -> None:
        protocol = self.server.protocol
        if isinstance(action, Send):
            if protocol is not None:
                protocol.send_datagram(action.data, action.addr)
        elif isinstance(action, Fetch):
            self.counters["fetches"] += 1
            self._fetch(action.addr, action.alert_id)
        elif isinstance(action, Verify):
            self._verify_now(action)
        elif isinstance(action, Deliver):
            self.counters["delivered"] += 1
            self._deliver(action)
        elif isinstance(action, Unresponsive) and protocol is not None:
            protocol.note_miss(action.contact.node_id)

    def _fetch(self, addr: Addr, alert_id: bytes) -> None:
        assert self.address is not None
        local = self.address[0] if self.address[0] not in ("0.0.0.0", "::") else None
        job: Fetching | None = None

        def done(body: bytes | None, fault: Fault) -> None:
            if job is not None:
                self._fetches.discard(job)
            if self._stopping:
                return
            if body is None:
                self.counters["fetch_failed_peer" if fault else "fetch_failed_net"] += 1
            # The core hears about every fetch it asked for, or its bookkeeping (pending ids,
            # fetches per peer) would leak.
            core, loop = self._ready()
            self._run(core.on_fetched(alert_id, addr, body, loop.time(), time.time(), fault))

        try:
            job = start_fetch(addr, alert_id, self.address[1], done, local_ip=local,
                              max_body=MAX_ENVELOPE_BYTES, timeout=self.config.fetch_timeout,
                              mark=self.config.dht.socket_mark, loop=self._loop)
        except Exception:  # a failed fetch like any other
            self.counters["fetch_errors"] += 1
            log.debug("fetch from %s failed", addr, exc_info=True)
            self._ready()[1].call_soon(done, None, Fault.NONE)
            return
        self._fetches.add(job)

    def _ask_verifier(self, action: Verify) -> Any:
        if self._verify_body is not None:
            return self._verify_body(action.body)
        assert action.alert is not None  # parsed here for the other two
        if self._verify_envelope is not None:
            return self._verify_envelope(action.body, action.alert)
        assert self._verify is not None
        return self._verify(action.alert)

    async def _judge(self, action: Verify) -> Verdict:
        try:
            result = self._ask_verifier(action)
            if inspect.isawaitable(result):
                result = await result
        except Exception:
            self.counters["verifier_errors"] += 1
            log.warning("verifier raised; counting the alert as 'cannot tell'", exc_info=True)
            return None
        return _verdict_of(result)

    def _verify_now(self, action: Verify) -> None:
        # A synchronous verifier: the verdict right away. A future (such as a worker's
        # answer): a callback when it is done. Any other awaitable: a task.
        try:
            result = self._ask_verifier(action)
        except Exception:
            self.counters["verifier_errors"] += 1
            log.warning("verifier raised; counting the alert as 'cannot tell'", exc_info=True)
            result = None
        if isinstance(result, asyncio.Future):
            def answered(fut: asyncio.Future[Any]) -> None:
                if fut.cancelled() or fut.exception() is not None:
                    self.counters["verifier_errors"] += 1
                    self._verdict(action, None)
                else:
                    self._verdict(action, _verdict_of(fut.result()))
            result.add_done_callback(answered)
        elif result is not None and not isinstance(result, bool) and inspect.isawaitable(result):
            async def later(awaitable: Any = result) -> None:
                try:
                    verdict = _verdict_of(await awaitable)
                except Exception:
                    self.counters["verifier_errors"] += 1
                    verdict = None
                self._verdict(action, verdict)
            self._spawn(later())
        else:
            self._verdict(action, _verdict_of(result))

    def _verdict(self, action: Verify, verdict: Verdict) -> None:
        if self._stopping:
            return
        core, loop = self._ready()
        if verdict is Outcome.FORGED:
            self._run(core.on_verdict(action.alert_id, False, loop.time(), forged=True))
        else:
            self._run(core.on_verdict(action.alert_id, verdict, loop.time()))

    def _deliver(self, action: Deliver) -> None:
        if self._on_alert is None:
            return
        try:
            result = self._on_alert(action.envelope, action.alert)
        except Exception:
            self.counters["on_alert_errors"] += 1
            log.warning("on_alert raised", exc_info=True)
            return
        if inspect.isawaitable(result):
            self._spawn(result)

    def _on_abuse(self, ip: str) -> None:
        """The DHT layer saw ``ip`` flood or send garbage: ban it, in the kernel too."""
        if self.core is None or self._loop is None:
            return
        self.core.ban(ip, self._loop.time())
        self._sync_bans()

    def _sync_bans(self) -> None:
        # Banned addresses go into the kernel's socket filter, so their floods stop costing
        # this process anything at all.
        assert self.core is not None and self._loop is not None
        ips = self.core.banned_ips(self._loop.time())
        self._ban_epoch = self.core.ban_epoch
        self.server.set_banned([ip for ip in ips if ":" not in ip])
        new = [ip for ip in ips if ip not in self._banned]
        self._banned = set(ips)
        if self._on_ban is not None:
            for ip in new:  # an operator should hear of a peer cut off, not find a counter
                self._on_ban(ip, self.core.cfg.ban_s)

    def _arm(self) -> None:
        core = self.core
        if core is None or self._loop is None or self._stopping:
            return
        if core.ban_epoch != self._ban_epoch:
            self._sync_bans()
        deadline = core.next_deadline()
        if deadline >= self._timer_at or self._wakeups is None:
            return
        self._timer_at = deadline
        self._wakeups.add(self._loop, deadline, self)

    def _on_timer(self) -> None:
        self._timer_at = float("inf")
        if self.core is None or self._loop is None or self._stopping:
            return
        self.core.banned_ips(self._loop.time())  # lets expired bans go (and the filter follow)
        self._run(self.core.tick(self._loop.time()))
        self._arm()  # the next tick (anti-entropy's, at least), whatever tick() returned
