"""Williamson's virus throttle as a sans-I/O state machine.

Per source, a working set of recently contacted destinations (least recently used out). An
attempt to a destination in the set passes. An attempt to a new destination waits in a delay
queue that lets one new destination out per interval; every attempt counts, retries included, so
a retrying worm fills its queue faster, not slower. A queue that grows past the threshold means
the source scans like a worm: it is flagged and its new flows are blocked until an operator
clears it. Destinations on the allowlist are never delayed.

Nothing here reads a clock or touches a socket: every call takes ``now`` (seconds, any epoch,
non-decreasing) and returns events (``node.throttle.events``). The adapter calls ``tick(now)``
at ``next_deadline()`` to let the queue release; ``attempt`` also releases whatever is due first,
so a late timer never lets a newcomer overtake the queue.

The same core serves connections (source and destination addresses) and e-mail (sender and
recipient); both are just hashable keys here.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Container, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from node.throttle.events import (
    Blocked,
    Cleared,
    Event,
    Flagged,
    Passed,
    PassReason,
    Queued,
    Released,
    WorkingSetAdded,
    WorkingSetRemoved,
)


@dataclass(frozen=True)
class ThrottleConfig:
    """Williamson's parameters: a working set of 5, one new destination a second, flag at 100."""

    working_set_size: int = 5
    release_rate: float = 1.0  # new destinations let out per second, per source
    threshold: int | None = 100  # flag when more attempts than this wait; None: never flag
    # Sources remembered; past this the stalest idle one (nothing waiting, not flagged) is
    # forgotten: it only loses its working set.
    max_sources: int = 65536

    def __post_init__(self) -> None:
        if self.working_set_size < 1:
            raise ValueError("working_set_size must be at least 1")
        if not self.release_rate > 0:
            raise ValueError("release_rate must be positive")
        if self.threshold is not None and self.threshold < 1:
            raise ValueError("threshold must be at least 1 (or None)")
        if self.max_sources < 1:
            raise ValueError("max_sources must be at least 1")

    @property
    def interval(self) -> float:
        return 1.0 / self.release_rate


class _Source:
    """Throttle state of one source."""

    __slots__ = ("depth", "due", "infected", "last_admit", "queue", "working_set")

    def __init__(self) -> None:
        self.working_set: OrderedDict[Hashable, None] = OrderedDict()  # oldest use first
        # Destinations in the order they were first queued, each with its waiting attempts:
        # releasing a destination releases all its attempts (it is in the working set now).
        self.queue: OrderedDict[Hashable, list[tuple[Any, float]]] = OrderedDict()
        self.depth = 0  # attempts waiting, retries included
        self.last_admit: float | None = None  # when the last new destination was let out
        self.due: float | None = None  # when the queue's head goes, if the queue is not empty
        self.infected = False


class ThrottleCore:
    """The throttle for any number of sources. See the module docstring."""

    def __init__(self, config: ThrottleConfig | None = None,
                 allowlist: Container[Any] | None = None) -> None:
        self.config = config or ThrottleConfig()
        # Any container: a set of exact destinations, or the adapter's prefix matcher.
        self.allowlist: Container[Any] = allowlist if allowlist is not None else set()
        self._sources: dict[Hashable, _Source] = {}
        self._timers: list[tuple[float, int, Hashable]] = []  # (due, seq, src); stale ones skipped
        self._seq = 0

    # -- inputs -------------------------------------------------------------------------------

    def attempt(self, src: Hashable, dst: Hashable, now: float, flow: Any = None) -> list[Event]:
        """A new outgoing flow (TCP SYN, new UDP flow, SMTP recipient) from src to dst."""
        events: list[Event] = []
        if self._timers and self._timers[0][0] <= now:
            self._release_due(now, events)
        if dst in self.allowlist:
            events.append(Passed(src, dst, flow, PassReason.ALLOWLIST))
            return events
        s = self._sources.pop(src, None)
        if s is None:
            s = _Source()
        self._sources[src] = s  # the most recently active last
        if len(self._sources) > self.config.max_sources:
            self._forget_idle(src, events)
        if s.infected:
            events.append(Blocked(src, dst, flow))
            return events
        ws = s.working_set
        if dst in ws:
            ws.move_to_end(dst)
            events.append(Passed(src, dst, flow, PassReason.WORKING_SET))
            return events
        if not s.queue:
            if len(ws) < self.config.working_set_size:
                # Williamson: while the working set is not full a new destination just joins it.
                events.append(Passed(src, dst, flow, PassReason.NEW))
                self._admit(src, s, dst, events)
                return events
            if s.last_admit is None or now - s.last_admit >= self.config.interval:
                # The queue is empty and its release slot is free: the queue would let this
                # destination out at this very instant, so waiting for a clock tick would only
                # delay benign traffic without letting a scanner go any faster.
                s.last_admit = now
                events.append(Passed(src, dst, flow, PassReason.NEW))
                self._admit(src, s, dst, events)
                return events
        waiting = s.queue.get(dst)
        if waiting is None:
            s.queue[dst] = [(flow, now)]
        else:
            waiting.append((flow, now))  # a retry, or another flow to the same destination
        s.depth += 1
        events.append(Queued(src, dst, flow, s.depth))
        if s.due is None:
            last = s.last_admit
            s.due = now if last is None else max(now, last + self.config.interval)
            self._push_timer(s.due, src)
        threshold = self.config.threshold
        if threshold is not None and s.depth > threshold:
            self._flag(src, s, now, events)
        return events

    def tick(self, now: float) -> list[Event]:
        """Release whatever is due at ``now``; call it at ``next_deadline()``."""
        events: list[Event] = []
        self._release_due(now, events)
        return events

    def next_deadline(self) -> float | None:
        """When ``tick`` next has work, or None while nothing waits."""
        timers = self._timers
        while timers:
            due, _, src = timers[0]
            s = self._sources.get(src)
            if s is not None and s.due == due:
                return due
            heapq.heappop(timers)
        return None

    def clear(self, src: Hashable) -> list[Event]:
        """Operator: the source is clean again; its new flows are throttled, not blocked."""
        s = self._sources.get(src)
        if s is None or not s.infected:
            return []
        s.infected = False
        return [Cleared(src)]

    def touch(self, src: Hashable, dsts: Iterable[Hashable]) -> None:
        """Mark destinations as just used, oldest first.

        Flows to working-set destinations pass in the kernel without reaching the core; the
        kernel adapter reports their use here so least-recently-used stays true.
        """
        s = self._sources.get(src)
        if s is None:
            return
        for dst in dsts:
            if dst in s.working_set:
                s.working_set.move_to_end(dst)

    # -- queries ------------------------------------------------------------------------------

    def is_infected(self, src: Hashable) -> bool:
        s = self._sources.get(src)
        return s is not None and s.infected

    def working_set(self, src: Hashable) -> list[Hashable]:
        """The source's working set, least recently used first."""
        s = self._sources.get(src)
        return list(s.working_set) if s is not None else []

    def queue_depth(self, src: Hashable) -> int:
        s = self._sources.get(src)
        return s.depth if s is not None else 0

    def queued(self, src: Hashable) -> list[Hashable]:
        """Destinations waiting, in release order."""
        s = self._sources.get(src)
        return list(s.queue) if s is not None else []

    def sources(self) -> list[Hashable]:
        return list(self._sources)

    # -- internals ----------------------------------------------------------------------------

    def _forget_idle(self, current: Hashable, events: list[Event]) -> None:
        """Forget the stalest source with nothing waiting and no flag, never ``current``; its
        working set leaves the kernel too. A waiting or flagged source met on the way goes to
        the recent end, so a few of them cannot hold the bound off."""
        sources = self._sources
        for _ in range(32):
            key = next(iter(sources))
            if key == current:
                return  # the only one not waiting or flagged
            s = sources[key]
            if not s.queue and not s.infected:
                del sources[key]
                events.extend(WorkingSetRemoved(key, dst) for dst in s.working_set)
                return
            sources[key] = sources.pop(key)

    def _push_timer(self, due: float, src: Hashable) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (due, self._seq, src))

    def _admit(self, src: Hashable, s: _Source, dst: Hashable, events: list[Event]) -> None:
        ws = s.working_set
        ws[dst] = None
        events.append(WorkingSetAdded(src, dst))
        if len(ws) > self.config.working_set_size:
            old, _ = ws.popitem(last=False)
            events.append(WorkingSetRemoved(src, old))

    def _release_due(self, now: float, events: list[Event]) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            due, _, src = heapq.heappop(timers)
            s = self._sources.get(src)
            if s is None or s.due != due or not s.queue:
                continue  # stale: the queue was emptied (flagged) or rescheduled
            dst, waiting = s.queue.popitem(last=False)
            s.depth -= len(waiting)
            # The interval counts from the actual release, so a late timer never lets two
            # destinations out closer together than one interval.
            s.last_admit = now
            self._admit(src, s, dst, events)
            for flow, queued_at in waiting:
                events.append(Released(src, dst, flow, queued_at, now))
            if s.queue:
                s.due = now + self.config.interval
                self._push_timer(s.due, src)
            else:
                s.due = None

    def _flag(self, src: Hashable, s: _Source, now: float, events: list[Event]) -> None:
        s.infected = True
        events.append(Flagged(src, s.depth, now))
        # The backlog is the scan itself: block it rather than release it at one a second.
        for dst, waiting in s.queue.items():
            for flow, _ in waiting:
                events.append(Blocked(src, dst, flow))
        s.queue.clear()
        s.depth = 0
        s.due = None
