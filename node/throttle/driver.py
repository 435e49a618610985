"""Drive a throttle core from an asyncio loop: ``now`` is ``loop.time()``, and one
``call_at`` timer fires at the core's next deadline. Shared by the kernel adapter and the e-mail
relay, which differ only in what they do with the events (``apply``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Any

from node.throttle.core import ThrottleCore
from node.throttle.events import Event


class CoreDriver:
    def __init__(self, core: ThrottleCore, loop: asyncio.AbstractEventLoop,
                 apply: Callable[[list[Event]], None],
                 on_event: Callable[[Event], None] | None = None,
                 before: Callable[[float], None] | None = None) -> None:
        self.core = core
        # Called with `now` before every core call that may admit a destination (the kernel
        # adapter brings the core's least-recently-used order up to date there).
        self.before = before
        self.loop = loop
        self._apply = apply
        self.on_event = on_event
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due: float | None = None

    def attempt(self, src: Hashable, dst: Hashable, flow: Any = None) -> list[Event]:
        now = self.loop.time()
        if self.before is not None:
            self.before(now)
        return self.feed(self.core.attempt(src, dst, now, flow))

    def attempts(self, items: list[tuple[Hashable, Hashable, Any]]) -> list[Event]:
        """Several attempts at one instant, applied together (one message's recipients)."""
        now = self.loop.time()
        if self.before is not None:
            self.before(now)
        events: list[Event] = []
        for src, dst, flow in items:
            events += self.core.attempt(src, dst, now, flow)
        return self.feed(events)

    def clear(self, src: Hashable) -> list[Event]:
        return self.feed(self.core.clear(src))

    def feed(self, events: list[Event]) -> list[Event]:
        """Apply events the core returned, tell the listener, and re-arm the timer."""
        if events:
            self._apply(events)
            if self.on_event is not None:
                for e in events:
                    self.on_event(e)
        self._arm()
        return events

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_due = None, None

    def _arm(self) -> None:
        due = self.core.next_deadline()
        if due == self._timer_due:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_due = due
        if due is not None:
            self._timer = self.loop.call_at(due, self._fire)

    def _fire(self) -> None:
        # call_at may fire a hair before the deadline; ticking at the deadline itself keeps the
        # core from answering "not yet" and the timer from never being re-armed.
        now = max(self.loop.time(), self._timer_due or 0.0)
        self._timer, self._timer_due = None, None
        if self.before is not None:
            self.before(now)
        self.feed(self.core.tick(now))
