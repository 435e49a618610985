"""Token buckets, sans-I/O: every call takes ``now`` (seconds, any monotonic origin).

Used on receipt, before anything is parsed: a datagram or a connection that finds its peer's
bucket empty is dropped having cost one dict lookup and a little arithmetic. ``KeyedBuckets``
keeps one bucket per key (an IP address) in a bounded LRU table, so a flood of source
addresses cannot grow it without limit; a forgotten key starts again with a full bucket, which
is the price of the bound (an attacker with that many addresses gets a burst from each anyway).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rate:
    """``per_s`` tokens a second, at most ``burst`` saved up."""

    per_s: float
    burst: float

    def __post_init__(self) -> None:
        if self.per_s < 0 or self.burst < 1:
            raise ValueError(f"bad rate {self.per_s}/s burst {self.burst}")


class TokenBucket:
    __slots__ = ("level", "rate", "stamp")

    def __init__(self, rate: Rate, now: float) -> None:
        self.rate = rate
        self.level = rate.burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.rate.burst, self.level + (now - self.stamp) * self.rate.per_s)
            self.stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if there are that many; False (and take nothing) if not."""
        self._refill(now)
        if self.level >= cost:
            self.level -= cost
            return True
        return False

    def charge(self, now: float, cost: float) -> None:
        """Take ``cost`` tokens unconditionally; the level may go below zero (a debt that
        refills at the normal rate). Used to make malformed input expensive for its sender."""
        self._refill(now)
        self.level = max(self.level - cost, -self.rate.burst * 4)


class KeyedBuckets:
    """One ``TokenBucket`` per key, at most ``max_keys`` of them (least recently used go)."""

    def __init__(self, rate: Rate, max_keys: int = 4096) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self.rate = rate
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self.dropped = 0

    def _bucket(self, key: Hashable, now: float) -> TokenBucket:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket

    def take(self, key: Hashable, now: float, cost: float = 1.0) -> bool:
        ok = self._bucket(key, now).take(now, cost)
        if not ok:
            self.dropped += 1
        return ok

    def charge(self, key: Hashable, now: float, cost: float) -> None:
        self._bucket(key, now).charge(now, cost)

    def __len__(self) -> int:
        return len(self._buckets)
