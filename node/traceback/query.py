"""Path reconstruction: walk upstream from the victim's last hop, asking routers which of them
saw the attack packet and from which neighbour (sans-I/O ``PathWalk``, driven by ``trace``).

The walk follows the hybrid scheme (``node.traceback.marking``) backwards. Visiting router R,
reached from its downstream D (none at the victim's gateway):

- R's answer names tables holding the packet: R *logged* it, and each table is an upstream
  neighbour. An edge link means R is an **ingress** and that link is where the packet entered.
  A router link means that neighbour forwarded it; go there next.
- R holds nothing, and R is known to be on the path (it is the gateway, or a logger just named
  it as its upstream): R only *marked* it, so its upstream logged it. Ask every other router
  neighbour of R (the seed's "RPF manner"); only those that logged it count.
- R holds nothing, and R was only a candidate neighbour: R is not on the path; prune.

Packets that were not atomic (fragments, no DF) are logged at every hop, so there a router
that holds nothing is never on the path. Every ingress logs (an arrival from hosts is
untrusted), so every true path ends in a logged edge hit; at the end, branches that reach no
ingress (Bloom-filter false positives that died out) are dropped from the graph and counted as
``dead_ends``. Hits are also pruned by time: a packet cannot have passed an upstream router
after the time its downstream last logged it (plus ``skew``), and a packet never entered on an
edge link whose prefix holds its own destination.

Answers are cached per router, so a router reached twice is asked once. Each answer must be
signed by the key its downstream neighbour (or, for the gateway, the caller) vouched for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from node.traceback.config import EDGE, ROUTER, Link, RouterRef
from node.traceback.digest import describe_key, invariant_key
from node.traceback.marking import atomic
from node.traceback.wire import TracebackAnswer, WireError, make_query, read_answer
from sca.keys import NodeKey

MAX_ROUTERS = 256
MAX_PATHS = 64


@dataclass(frozen=True)
class Ingress:
    router: bytes  # public key
    router_id: int
    link: str
    prefix: str | None


@dataclass
class Hop:
    ref: RouterRef
    logged: bool | None  # True: a digest confirms it; False: inferred (marked only);
    # None: named by a neighbour but did not answer


@dataclass
class AttackGraph:
    """What the walk found. Keys are routers' public keys; edges go upstream -> downstream."""

    gateway: bytes
    hops: dict[bytes, Hop] = field(default_factory=dict)
    edges: set[tuple[bytes, bytes]] = field(default_factory=set)
    ingresses: list[Ingress] = field(default_factory=list)
    dead_ends: int = 0
    queries: int = 0
    unanswered: list[RouterRef] = field(default_factory=list)
    elapsed_s: float = 0.0
    packet: dict[str, object] = field(default_factory=dict)
    atomic: bool = True

    def paths(self, limit: int = MAX_PATHS) -> list[list[bytes]]:
        """Router paths from each ingress to the gateway (ingress first)."""
        down: dict[bytes, list[bytes]] = {}
        for up, dn in sorted(self.edges):
            down.setdefault(up, []).append(dn)
        out: list[list[bytes]] = []

        def walk(path: list[bytes]) -> None:
            if len(out) >= limit:
                return
            here = path[-1]
            if here == self.gateway:
                out.append(list(path))
                return
            for nxt in down.get(here, []):
                if nxt not in path:
                    walk([*path, nxt])

        for ing in dict.fromkeys(i.router for i in self.ingresses):
            walk([ing])
        return out

    def router_id(self, pub: bytes) -> int | None:
        hop = self.hops.get(pub)
        return hop.ref.router_id if hop else None


@dataclass(frozen=True)
class _Visit:
    ref: RouterRef
    down: bytes | None  # downstream router's key; None at the gateway
    need_log: bool  # only on the path if it logged the packet
    t_max: float  # the packet was here no later than this


class PathWalk:
    """The walk as a state machine: ``wanted()`` names routers to ask, ``feed()`` takes each
    answer (or None when a router did not answer), until ``done``; then ``graph()``."""

    def __init__(self, inv: bytes, *, atomic: bool, t_from: float, t_to: float,
                 gateway: RouterRef, skew: float = 0.5, max_routers: int = MAX_ROUTERS) -> None:
        self.inv = inv
        self.atomic = atomic
        self.t_from, self.t_to = t_from, t_to
        self.skew = skew
        self.max_routers = max_routers
        self._dst = ipaddress.IPv4Address(inv[8:12])
        self._answers: dict[bytes, TracebackAnswer | None] = {}
        self._to_ask: dict[bytes, RouterRef] = {}
        self._asked: set[bytes] = set()
        self._waiting: dict[bytes, list[_Visit]] = {}
        self._seen: set[tuple[bytes, bytes | None, bool]] = set()
        self._g = AttackGraph(gateway.public_key, atomic=atomic)
        self._visit(_Visit(gateway, None, False, t_to))

    # -- driving

    def wanted(self) -> list[RouterRef]:
        refs = list(self._to_ask.values())
        self._asked.update(self._to_ask)
        self._to_ask.clear()
        return refs

    @property
    def done(self) -> bool:
        return not self._to_ask and not self._waiting

    def feed(self, pub: bytes, answer: TracebackAnswer | None) -> None:
        self._answers[pub] = answer
        self._g.queries += 1
        for v in self._waiting.pop(pub, []):
            self._process(v, answer)

    def graph(self) -> AttackGraph:
        """The graph with branches that reach no ingress removed (if any ingress was found)."""
        g = self._g
        if not g.ingresses:
            return g
        keep: set[bytes] = set()
        stack = [i.router for i in g.ingresses]
        down: dict[bytes, list[bytes]] = {}
        for up, dn in g.edges:
            down.setdefault(up, []).append(dn)
        while stack:
            n = stack.pop()
            if n not in keep:
                keep.add(n)
                stack += down.get(n, [])
        g.dead_ends = len(set(g.hops) - keep)
        g.hops = {k: v for k, v in g.hops.items() if k in keep}
        g.edges = {(u, d) for u, d in g.edges if u in keep and d in keep}
        return g

    # -- the walk

    def _visit(self, v: _Visit) -> None:
        pub = v.ref.public_key
        key = (pub, v.down, v.need_log)
        if key in self._seen:
            return
        self._seen.add(key)
        if pub in self._answers:
            self._process(v, self._answers[pub])
            return
        if pub not in self._asked and pub not in self._to_ask:
            if len(self._asked) + len(self._to_ask) >= self.max_routers:
                return  # bounded: a hostile or huge topology cannot make us ask forever
            self._to_ask[pub] = v.ref
        self._waiting.setdefault(pub, []).append(v)

    def _add_hop(self, v: _Visit, ref: RouterRef, logged: bool | None) -> None:
        pub = ref.public_key
        hop = self._g.hops.get(pub)
        if hop is None:
            self._g.hops[pub] = Hop(ref, logged)
        elif logged and not hop.logged:
            hop.logged = logged
        if v.down is not None:
            self._g.edges.add((pub, v.down))

    def _impossible(self, lk: Link, down: bytes | None) -> bool:
        """A packet never came in from its downstream, nor from its own destination's side."""
        if lk.kind == ROUTER:
            return lk.peer is not None and lk.peer.public_key == down
        return lk.prefix is not None and self._dst in ipaddress.IPv4Network(lk.prefix)

    def _process(self, v: _Visit, ans: TracebackAnswer | None) -> None:
        if ans is None or ans.status != "ok":
            if not v.need_log:  # named by a logger (or the gateway): on the path, silent
                self._add_hop(v, v.ref, None)
                if v.ref not in self._g.unanswered:
                    self._g.unanswered.append(v.ref)
            return
        ref = RouterRef(v.ref.addr, v.ref.public_key, ans.router_id)
        pub = ref.public_key
        hits = []
        for h in ans.hits:
            if h.first > v.t_max + self.skew:
                continue
            lk = ans.link(h.link)
            if lk is not None and self._impossible(lk, v.down):
                continue
            hits.append((h, lk))
        if hits:
            self._add_hop(v, ref, True)
            for h, lk in hits:
                if lk is None or lk.kind == EDGE or lk.peer is None:
                    ing = Ingress(pub, ans.router_id, h.link, lk.prefix if lk else None)
                    if ing not in self._g.ingresses:
                        self._g.ingresses.append(ing)
                else:
                    self._visit(_Visit(lk.peer, pub, not self.atomic, min(v.t_max, h.last)))
        elif not v.need_log:
            self._add_hop(v, ref, False)
            for lk in ans.links:
                if lk.kind == ROUTER and lk.peer is not None and lk.peer.public_key != v.down:
                    self._visit(_Visit(lk.peer, pub, True, v.t_max))


# --------------------------------------------------------------------------- the driver

Ask = Callable[[RouterRef, bytes], Awaitable[bytes | None]]


async def trace(packet: bytes, *, at: float, key: NodeKey, gateway: RouterRef, ask: Ask,
                before: float = 5.0, after: float = 1.0, skew: float = 0.5,
                clock: Callable[[], float] = time.time) -> AttackGraph:
    """Trace one attack packet (raw IPv4 bytes as the victim received them, ``at`` the time it
    was captured): query routers through ``ask`` (a transport: ref and query bytes in, answer
    bytes or None out), level by level, in parallel within a level."""
    started = time.perf_counter()
    inv = invariant_key(packet)
    frag_word = (packet[6] << 8) | packet[7]
    t_from, t_to = at - before, at + after
    walk = PathWalk(inv, atomic=atomic(frag_word), t_from=t_from, t_to=t_to, gateway=gateway,
                    skew=skew)

    async def one(ref: RouterRef) -> tuple[bytes, TracebackAnswer | None]:
        q, data = make_query(key, inv, t_from, t_to, clock())
        raw = await ask(ref, data)
        if raw is None:
            return ref.public_key, None
        try:
            ans = read_answer(raw)
        except WireError:
            return ref.public_key, None
        if ans.router != ref.public_key or ans.nonce != q.nonce or (
                ref.router_id is not None and ans.router_id != ref.router_id):
            return ref.public_key, None  # not the router its neighbour vouched for
        return ref.public_key, ans

    while not walk.done:
        refs = walk.wanted()
        if not refs:
            break
        for pub, ans in await asyncio.gather(*(one(r) for r in refs)):
            walk.feed(pub, ans)
    g = walk.graph()
    g.elapsed_s = time.perf_counter() - started
    g.packet = describe_key(inv)
    return g
