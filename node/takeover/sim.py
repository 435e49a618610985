"""A fake clock and a lossy wire for the sans-I/O endpoints (unit tests, property checks).

``Wire`` connects two parties that speak ``Segment`` (endpoints, or a proxy's two faces). Every
step polls both, carries what they emitted to the other side after ``delay`` seconds, and lets a
``drop`` predicate lose any segment; when nothing is in flight the clock jumps to the earliest
deadline. Everything is deterministic: same inputs, same run.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from node.takeover.proxy import Proxy
from node.takeover.tcp import Config, Endpoint, Seed, Segment


class Party(Protocol):
    def receive(self, seg: Segment, now: float) -> None: ...
    def poll(self, now: float, *, flush: bool = True) -> list[Segment]: ...
    def deadline(self) -> float | None: ...


Drop = Callable[[int, Segment], bool]  # (direction 0: a->b / 1: b->a, segment) -> lose it


@dataclass
class Wire:
    a: Party
    b: Party
    delay: float = 0.0005
    drop: Drop | None = None
    now: float = 0.0
    tap: Callable[[int, Segment, float], None] | None = None  # sees every delivered segment
    sent: list[list[Segment]] = field(default_factory=lambda: [[], []])
    lost: list[list[Segment]] = field(default_factory=lambda: [[], []])
    _q: list[tuple[float, int, int, Segment]] = field(default_factory=list)
    _n: itertools.count = field(default_factory=itertools.count)

    def _emit(self) -> bool:
        any_out = False
        for d, p in ((0, self.a), (1, self.b)):
            for seg in p.poll(self.now):
                any_out = True
                self.sent[d].append(seg)
                if self.drop is not None and self.drop(d, seg):
                    self.lost[d].append(seg)
                    continue
                heapq.heappush(self._q, (self.now + self.delay, next(self._n), d, seg))
        return any_out

    def step(self) -> bool:
        """Poll, deliver the next arrival (advancing the clock), or jump to a deadline. False
        when nothing at all remains to happen."""
        if self._emit():
            return True
        if self._q:
            t, _, d, seg = heapq.heappop(self._q)
            self.now = max(self.now, t)
            if self.tap is not None:
                self.tap(d, seg, self.now)
            (self.b if d == 0 else self.a).receive(seg, self.now)
            return True
        ds = [x for x in (self.a.deadline(), self.b.deadline()) if x is not None]
        if not ds:
            return False
        self.now = max(self.now, min(ds))
        return True

    def run(self, until: Callable[[], bool] | None = None, *, max_time: float = 600.0,
            max_steps: int = 2_000_000) -> None:
        for _ in range(max_steps):
            if until is not None and until():
                return
            if self.now > max_time or not self.step():
                return
        raise RuntimeError("simulation did not settle")


def pair(*, a_isn: int = 1000, b_isn: int = 9_000_000, shift: int | None = 7,
         window: int = 64 * 1024, mss: int = 1448, ts: bool = True,
         config: Config | None = None, now: float = 0.0,
         b_config: Config | None = None, sack: bool = True) -> tuple[Endpoint, Endpoint]:
    """Two endpoints seeded as the two sides of one established connection."""
    raw = window >> (shift or 0)

    def seed(mine: int, theirs: int, my_ts: int, their_ts: int) -> Seed:
        return Seed(snd_una=mine, snd_nxt=mine, rcv_nxt=theirs, snd_wnd=window,
                    snd_shift=shift, rcv_shift=shift, rcv_adv=theirs + window, rcv_raw=raw,
                    mss=mss, ts_val=my_ts if ts else None, ts_recent=their_ts if ts else None,
                    sack_ok=sack)

    a = Endpoint(seed(a_isn, b_isn, 500, 70_000), now, config)
    b = Endpoint(seed(b_isn, a_isn, 70_000, 500), now, b_config or config)
    return a, b


ChainDrop = Callable[[int, Segment], bool]  # hops: 0 client->proxy, 1 proxy->client,
# 2 proxy->server, 3 server->proxy


@dataclass
class Chain:
    """client -- proxy -- server on one fake clock (the proxy in the middle of a taken-over
    connection)."""

    client: Endpoint
    proxy: Proxy
    server: Endpoint
    now: float = 0.0
    delay: float = 0.0005
    drop: ChainDrop | None = None
    sent: list[list[Segment]] = field(default_factory=lambda: [[], [], [], []])
    _q: list[tuple[float, int, int, Segment]] = field(default_factory=list)
    _n: itertools.count = field(default_factory=itertools.count)

    def _send(self, hop: int, seg: Segment) -> None:
        self.sent[hop].append(seg)
        if self.drop is not None and self.drop(hop, seg):
            return
        heapq.heappush(self._q, (self.now + self.delay, next(self._n), hop, seg))

    def _emit(self) -> bool:
        n = sum(len(x) for x in self.sent)
        for seg in self.client.poll(self.now):
            self._send(0, seg)
        for to_client, seg in self.proxy.poll(self.now):
            self._send(1 if to_client else 2, seg)
        for seg in self.server.poll(self.now):
            self._send(3, seg)
        return sum(len(x) for x in self.sent) != n

    def step(self) -> bool:
        if self._emit():
            return True
        if self._q:
            t, _, hop, seg = heapq.heappop(self._q)
            self.now = max(self.now, t)
            if hop == 0:
                self.proxy.receive(True, seg, self.now)
            elif hop == 1:
                self.client.receive(seg, self.now)
            elif hop == 2:
                self.server.receive(seg, self.now)
            else:
                self.proxy.receive(False, seg, self.now)
            return True
        ds = [x for x in (self.client.deadline(), self.server.deadline(),
                          None if self.proxy.done else self.proxy.deadline()) if x is not None]
        if not ds:
            return False
        self.now = max(self.now, min(ds))
        return True

    def run(self, until: Callable[[], bool] | None = None, *, max_time: float = 600.0,
            max_steps: int = 2_000_000) -> None:
        for _ in range(max_steps):
            if until is not None and until():
                return
            if self.now > max_time or not self.step():
                return
        raise RuntimeError("simulation did not settle")
