"""Path reconstruction: walk upstream from the victim's last hop, asking routers which of them
saw the attack packet and from which neighbour (sans-I/O ``PathWalk``, driven by ``trace``).

The walk reads the hybrid scheme (``node.traceback.marking``) backwards. An answer names the
tables holding the packet, one per upstream link: a hit means the router *logged* it and says
where it came from (an edge link: this router is an **ingress** and that link is where the
packet entered). What else is known about a router depends on how the walk got there, its
*mode*:

- ``gateway``: the victim's last hop. On the path; it logged only an untrusted arrival. Follow
  its hits, and ask its router neighbours as ``maybe`` (its upstream logged, or only marked
  after a logger).
- ``marker``: a logger's trusted table named it. On the path, and it did *not* log: the logger
  logged because this router's mark said "not logged". Its own hits can only be false
  positives and are ignored; its upstream logged, so ask its other neighbours as candidates
  (the seed's "RPF manner").
- ``either``: a logger's *untrusted* table named it (its mark was missing or wrong: it was
  down, bypassed under load, or misconfigured). On the path, status unknown: follow its hits,
  and ask its neighbours as ``maybe`` (its upstream may have logged or only marked).
- ``candidate``: a neighbour of a router that did not log. On the path only if it logged.
- ``maybe``: a neighbour of the gateway or of a transparent router: it logged, or only marked
  after a logger. Follow its hits (if any), keep it tentatively, and ask its other neighbours
  as candidates (a hit here may be a false positive that hides the second case).

Packets that were not atomic (fragments, no DF) are logged at every hop: then a router named
by a logger (``named``) must have logged it too (else that hit was a false positive), and the
gateway asks no neighbours.

Every ingress logs (an arrival from hosts is untrusted), so every true path starts with a
logged edge hit, unless a router on it did not answer (an *unresolved* end). At the end,
branches that reach neither an ingress nor an unresolved end are dropped from the graph and
counted as ``dead_ends`` (Bloom-filter false positives that died out). Hits are also pruned by
time: each visit carries a window, the gateway's from the caller, an upstream's the span of the
downstream's matching slices moved ``skew`` earlier (link latency and clock offset), and only
slices overlapping it count. And by direction (never from the downstream it went to), and
by address (never in over an edge link whose prefix holds its own destination).

Answers are cached per router, so a router reached twice is asked once. Each answer must be
signed by the key its downstream neighbour (or, for the gateway, the caller) vouched for.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
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

    @property
    def unresolved(self) -> list[bytes]:
        """Routers on the path that did not answer: the trail ends there."""
        return [r.public_key for r in self.unanswered if r.public_key in self.hops]

    def paths(self, limit: int = MAX_PATHS) -> list[list[bytes]]:
        """Router paths from each ingress, then from each unresolved end, to the gateway
        (upstream end first)."""
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

        for start in dict.fromkeys([i.router for i in self.ingresses] + self.unresolved):
            walk([start])
        return out

    def router_id(self, pub: bytes) -> int | None:
        hop = self.hops.get(pub)
        return hop.ref.router_id if hop else None


GATEWAY, MARKER, EITHER, CANDIDATE, MAYBE = "gateway", "marker", "either", "candidate", "maybe"
NAMED = "named"  # not atomic: a logger named it, so it logged too (or that hit was false)
_ON_PATH = (GATEWAY, MARKER, EITHER, NAMED)  # a silent one is an unresolved end


@dataclass(frozen=True)
class _Visit:
    ref: RouterRef
    down: bytes | None  # downstream router's key; None at the gateway
    mode: str
    t_min: float  # the packet was here no earlier than this
    t_max: float  # and no later than this


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
        self._seen: dict[tuple[bytes, bytes | None, str], tuple[float, float]] = {}
        self._silent: set[bytes] = set()
        self._g = AttackGraph(gateway.public_key, atomic=atomic)
        self._visit(_Visit(gateway, None, GATEWAY, t_from, t_to))

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
        """The graph without the branches that reach neither an ingress nor an unresolved end
        (kept whole when it has neither)."""
        g = self._g
        starts = [i.router for i in g.ingresses] + [p for p in self._silent if p in g.hops]
        if not starts:
            return g
        down: dict[bytes, list[bytes]] = {}
        for up, dn in g.edges:
            down.setdefault(up, []).append(dn)
        keep: set[bytes] = set()
        stack = list(starts)
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
        key = (pub, v.down, v.mode)
        seen = self._seen.get(key)
        if seen is not None and seen[0] <= v.t_min and seen[1] >= v.t_max:
            return  # already walked from here with a window at least this wide
        self._seen[key] = (min(v.t_min, seen[0]), max(v.t_max, seen[1])) if seen else (
            v.t_min, v.t_max)
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

    def _hits(self, v: _Visit, ans: TracebackAnswer
              ) -> dict[tuple[str, bool], tuple[float, float]]:
        """(link, untrusted) -> the span of the matching slices that fit the visit's window
        (give or take ``skew``), after pruning."""
        out: dict[tuple[str, bool], tuple[float, float]] = {}
        for h in ans.hits:
            if h.first > v.t_max + self.skew or h.last < v.t_min - self.skew:
                continue
            lk = ans.link(h.link)
            if lk is not None and self._impossible(lk, v.down):
                continue
            k = (h.link, h.untrusted)
            lo, hi = out.get(k, (math.inf, -math.inf))
            out[k] = (min(lo, h.first), max(hi, h.last))
        return out

    def _process(self, v: _Visit, ans: TracebackAnswer | None) -> None:
        if ans is None or ans.status != "ok":
            if v.mode in _ON_PATH:  # named by a logger (or the gateway): on the path, silent
                self._add_hop(v, v.ref, None)
                self._silent.add(v.ref.public_key)
                if v.ref not in self._g.unanswered:
                    self._g.unanswered.append(v.ref)
            return
        ref = RouterRef(v.ref.addr, v.ref.public_key, ans.router_id)
        hits = {} if v.mode == MARKER else self._hits(v, ans)
        if hits:
            self._add_hop(v, ref, True)
            self._follow(v, ref, ans, hits)
        elif v.mode in (CANDIDATE, NAMED):
            return  # did not log: not its upstream (for NAMED: the logger's hit was false)
        else:
            self._add_hop(v, ref, False)
        probe = {GATEWAY: MAYBE if self.atomic else None, MARKER: CANDIDATE,
                 EITHER: MAYBE, MAYBE: CANDIDATE}.get(v.mode)
        if probe is not None:
            for lk in ans.links:
                if lk.kind == ROUTER and lk.peer is not None and lk.peer.public_key != v.down:
                    # One hop further up: up to ``skew`` earlier.
                    self._visit(_Visit(lk.peer, ref.public_key, probe, v.t_min - self.skew,
                                       v.t_max))

    def _follow(self, v: _Visit, ref: RouterRef, ans: TracebackAnswer,
                hits: dict[tuple[str, bool], tuple[float, float]]) -> None:
        for (name, untrusted), (first, last) in hits.items():
            lk = ans.link(name)
            if lk is None or lk.kind == EDGE or lk.peer is None:
                ing = Ingress(ref.public_key, ans.router_id, name, lk.prefix if lk else None)
                if ing not in self._g.ingresses:
                    self._g.ingresses.append(ing)
                continue
            # Not atomic: every hop logs these, so the upstream must have logged too.
            mode = NAMED if not self.atomic else EITHER if untrusted else MARKER
            # The upstream saw it before this router did, by at most ``skew`` (link latency
            # and clock offset): within the matching slices' span, moved that much earlier.
            self._visit(_Visit(lk.peer, ref.public_key, mode,
                               max(v.t_min, first) - self.skew, min(v.t_max, last)))


# --------------------------------------------------------------------------- the driver

Ask = Callable[[RouterRef, bytes], Awaitable[bytes | None]]


async def trace(packet: bytes, *, at: float, key: NodeKey, gateway: RouterRef, ask: Ask,
                before: float = 1.0, after: float = 0.5, skew: float = 0.5,
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
