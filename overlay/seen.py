"""A bounded seen-cache with a time-to-live, sans-I/O.

Keys are alert ids. An entry lives ``ttl`` seconds from when it was put, and the cache keeps at
most ``max_entries`` of them (the oldest go first), so no sender can make it grow without bound.
Entries may carry a body (the envelope bytes, to serve fetches); ``max_body_bytes`` bounds
their sum, and over it the oldest bodies are dropped while their ids stay remembered.

The broadcast core keeps two of these, one for verified alerts and one for everything that was
turned down, so a flood of bogus ids can push out only other bogus ids, never a verified one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

V = TypeVar("V")


class _Slot(Generic[V]):
    __slots__ = ("body", "expires", "value")

    def __init__(self, value: V, expires: float, body: bytes | None) -> None:
        self.value = value
        self.expires = expires
        self.body = body


class SeenCache(Generic[V]):
    def __init__(self, ttl: float, max_entries: int, max_body_bytes: int = 16 << 20) -> None:
        if ttl <= 0 or max_entries < 1 or max_body_bytes < 0:
            raise ValueError("ttl and max_entries must be positive")
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_body_bytes = max_body_bytes
        self._slots: OrderedDict[bytes, _Slot[V]] = OrderedDict()
        self._body_bytes = 0

    def _drop(self, key: bytes) -> None:
        slot = self._slots.pop(key)
        if slot.body is not None:
            self._body_bytes -= len(slot.body)

    def expire(self, now: float) -> None:
        """Forget entries whose time is up (oldest first, so this stops at the first live one)."""
        while self._slots:
            key, slot = next(iter(self._slots.items()))
            if slot.expires > now:
                break
            self._drop(key)

    def get(self, key: bytes, now: float) -> V | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        if slot.expires <= now:
            self._drop(key)
            return None
        return slot.value

    def __contains__(self, key: bytes) -> bool:
        return key in self._slots

    def body(self, key: bytes, now: float) -> bytes | None:
        slot = self._slots.get(key)
        if slot is None or slot.expires <= now:
            return None
        return slot.body

    def put(self, key: bytes, value: V, now: float, body: bytes | None = None) -> None:
        """Insert or replace ``key``; its time-to-live starts again."""
        if key in self._slots:
            self._drop(key)
        self.expire(now)
        self._slots[key] = _Slot(value, now + self.ttl, body)
        if body is not None:
            self._body_bytes += len(body)
        while len(self._slots) > self.max_entries:
            self._drop(next(iter(self._slots)))
        if self._body_bytes > self.max_body_bytes:
            self._trim_bodies(keep=key)

    def _trim_bodies(self, keep: bytes) -> None:
        for key, slot in self._slots.items():
            if self._body_bytes <= self.max_body_bytes:
                return
            if slot.body is not None and key != keep:
                self._body_bytes -= len(slot.body)
                slot.body = None

    def recent(self, now: float, window: float, limit: int) -> list[bytes]:
        """Up to ``limit`` keys put within the last ``window`` seconds, newest first."""
        out: list[bytes] = []
        cutoff = now - window + self.ttl  # put time = expires - ttl
        for key in reversed(self._slots):
            slot = self._slots[key]
            if slot.expires <= now:
                break
            if slot.expires < cutoff:
                break
            out.append(key)
            if len(out) >= limit:
                break
        return out

    def discard(self, key: bytes) -> None:
        if key in self._slots:
            self._drop(key)

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._slots)

    @property
    def body_bytes(self) -> int:
        return self._body_bytes
