"""Events: the in-process bus, the JSON-lines event log, and per-second rates.

Every event is one flat JSON object, as in Suricata's eve.json::

    {"timestamp": "2026-01-02T03:04:05.123456+00:00", "timestamp_s": 1767323045.123456,
     "event_type": "alert.verified", "alert_id": "…", "service": "resolver", …}

``EventBus.emit`` stamps it, writes it to the log (one line, flushed, so ``tail -f`` and a
kill -9 both see whole lines), hands it to subscribers (the store writer, the control socket's
event streams, metrics) and counts it in the rate series. Each event type has a token bucket:
a flood of one type (say, malformed alerts from a hostile peer) is cut to a summary
``events.suppressed`` event instead of filling the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

Record = dict[str, Any]
Subscriber = Callable[[Record], None]

RATE_WINDOW_S = 60
# Per event type: steady rate and burst; beyond them events are counted, not recorded.
EVENT_RATE = 50.0
EVENT_BURST = 200.0
MAX_FIELD_CHARS = 4096


def _plain(v: Any) -> Any:
    """A JSON-safe, size-bounded copy of a field value (events carry hostile strings too)."""
    if v is None or isinstance(v, bool | int | float):
        return v
    if isinstance(v, bytes):
        return v[:MAX_FIELD_CHARS // 2].hex()
    if isinstance(v, str):
        return v[:MAX_FIELD_CHARS]
    if isinstance(v, dict):
        return {str(k)[:128]: _plain(x) for k, x in list(v.items())[:64]}
    if isinstance(v, list | tuple | set | frozenset):
        return [_plain(x) for x in list(v)[:256]]
    return str(v)[:MAX_FIELD_CHARS]


def make_record(event_type: str, now: float, fields: dict[str, Any]) -> Record:
    stamp = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="microseconds")
    rec: Record = {"timestamp": stamp, "timestamp_s": round(now, 6), "event_type": event_type}
    for k, v in fields.items():
        if k not in rec:
            rec[k] = _plain(v)
    return rec


class Rates:
    """Counts per second over the last ``window`` seconds, per name. Sans-I/O: every call
    takes ``now`` (seconds)."""

    def __init__(self, window: int = RATE_WINDOW_S) -> None:
        self.window = window
        self._series: dict[str, deque[int]] = {}
        self._second: dict[str, int] = {}

    def _roll(self, name: str, now: float) -> deque[int]:
        sec = int(now)
        q = self._series.get(name)
        if q is None:
            q = self._series[name] = deque([0] * self.window, maxlen=self.window)
            self._second[name] = sec
        gap = sec - self._second[name]
        if gap > 0:
            q.extend([0] * min(gap, self.window))
            self._second[name] = sec
        return q

    def add(self, name: str, now: float, n: int = 1) -> None:
        q = self._roll(name, now)
        q[-1] += n

    def series(self, name: str, now: float) -> list[int]:
        """Counts for the last ``window`` whole seconds, oldest first (the current second
        last)."""
        return list(self._roll(name, now)) if name in self._series else [0] * self.window

    def names(self) -> list[str]:
        return sorted(self._series)

    def snapshot(self, now: float) -> dict[str, list[int]]:
        return {n: self.series(n, now) for n in self.names()}


class EventLog:
    """Appends records as JSON lines to ``path`` (mode 0600), rotated like a syslog file.

    Past ``max_bytes`` (0: never) the file becomes ``path.1``, the older ones shift up to
    ``path.<backups>`` and the oldest is deleted, so a node that runs for months keeps a bounded
    log and every line stays whole in exactly one file. A write error (disk full, file removed
    by hand) is reported once on stderr and the log stops: the node goes on.
    """

    def __init__(self, path: Path, max_bytes: int = 0, backups: int = 5) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.written = 0
        self.rotations = 0
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._f: TextIO | None = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        self._size = os.fstat(fd).st_size
        self._f = os.fdopen(fd, "a", encoding="utf-8", buffering=1)

    def _rotate(self) -> None:
        self.close()
        name = str(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{name}.{self.backups}" if self.backups else name)
        for i in range(self.backups - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(f"{name}.{i}", f"{name}.{i + 1}")
        if self.backups:
            with contextlib.suppress(FileNotFoundError):
                os.replace(name, f"{name}.1")
        self.rotations += 1
        self._open()

    def write(self, record: Record) -> None:
        if self._f is None:
            return
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=True, default=str) + "\n"
        try:
            if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
                if self._f is None:
                    return
            self._f.write(line)
            self._size += len(line)  # ASCII only: characters are bytes
            self.written += 1
        except (OSError, ValueError) as e:
            print(f"herdwall: event log {self.path} disabled: {e}", file=sys.stderr)
            self.close()

    def close(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError, ValueError):
                self._f.close()
            self._f = None


class _Bucket:
    __slots__ = ("at", "suppressed", "tokens")

    def __init__(self, now: float) -> None:
        self.tokens = EVENT_BURST
        self.at = now
        self.suppressed = 0


class EventBus:
    """Emit events; subscribers are plain callables run on the loop (they must not block)."""

    def __init__(self, log: EventLog | None = None, *, clock: Callable[[], float] = time.time,
                 recent: int = 200) -> None:
        self.log = log
        self.clock = clock
        self.rates = Rates()
        self.recent: deque[Record] = deque(maxlen=recent)
        self.counts: dict[str, int] = {}
        self.subscriber_errors = 0
        self._subs: list[Subscriber] = []
        self._buckets: dict[str, _Bucket] = {}

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subs.append(fn)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subs.remove(fn)
        return unsubscribe

    def count(self, name: str, n: int = 1) -> None:
        """Count something in the rate series without making an event of it."""
        self.rates.add(name, self.clock(), n)

    def _admit(self, event_type: str, now: float) -> bool:
        b = self._buckets.get(event_type)
        if b is None:
            if len(self._buckets) > 1024:  # types come from code, but stay bounded anyway
                self._buckets.clear()
            b = self._buckets[event_type] = _Bucket(now)
        b.tokens = min(EVENT_BURST, b.tokens + (now - b.at) * EVENT_RATE)
        b.at = now
        if b.tokens >= 1:
            b.tokens -= 1
            if b.suppressed:
                n, b.suppressed = b.suppressed, 0
                self._deliver(make_record("events.suppressed", now,
                                          {"suppressed_type": event_type, "count": n}))
            return True
        b.suppressed += 1
        return False

    def emit(self, event_type: str, **fields: Any) -> Record | None:
        """Record an event; returns it, or None if its type is over its rate."""
        now = self.clock()
        self.counts[event_type] = self.counts.get(event_type, 0) + 1
        self.rates.add(event_type, now)
        if not self._admit(event_type, now):
            return None
        rec = make_record(event_type, now, fields)
        self._deliver(rec)
        return rec

    def _deliver(self, rec: Record) -> None:
        if self.log is not None:
            self.log.write(rec)
        self.recent.append(rec)
        for fn in list(self._subs):
            try:
                fn(rec)
            except Exception:
                # A broken subscriber must not stop the others or the emitter.
                self.subscriber_errors += 1

    def stream(self, maxsize: int = 1000) -> EventStream:
        return EventStream(self, maxsize)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()


class EventStream:
    """A bounded queue of events for one consumer (a control-socket client). A consumer too
    slow to keep up loses the oldest events, counted in ``dropped``, never stalls the bus."""

    def __init__(self, bus: EventBus, maxsize: int) -> None:
        self.queue: asyncio.Queue[Record] = asyncio.Queue(maxsize)
        self.dropped = 0
        self._unsubscribe = bus.subscribe(self._put)

    def _put(self, rec: Record) -> None:
        if self.queue.full():
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(rec)

    async def get(self) -> Record:
        return await self.queue.get()

    def close(self) -> None:
        self._unsubscribe()
