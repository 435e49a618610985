"""Time-sliced Bloom filters: one digest table per upstream neighbour, bounded memory.

A *slice* is one Bloom filter covering the packets of one table for a stretch of time. Sizes
are powers of two, so the k probe positions are ``(h1 + i*h2) & (m-1)`` and a filter can be
*folded*: OR-ing its upper half onto its lower half gives exactly the filter the same packets
would have made with m/2 bits. That is what keeps storage close to the Bloom-filter optimum
(-ln p / ln² 2 bits a packet, 1.2 bytes at p = 1%) whatever the traffic rate:

- a slice closes when it holds its *capacity* (the most packets for which its false-positive
  rate stays at or under ``slice_fp``) or when it is ``slice_s`` old, whichever comes first;
  ``slice_fp`` is ``fp_rate`` shared among the slices one lookup's time window touches, so a
  lookup, not just one slice, stays at ``fp_rate``;
- the next slice of a table is sized from the last one so that, at the rate seen, it fills
  up in between slice_s/2 and slice_s (grown to fit the rate if the last filled sooner,
  halved until it fits if the last ran out of time). Tables follow their neighbour's rate,
  and under steady traffic slices close *full*, where a Bloom filter costs exactly its
  optimum;
- a slice closed by time, part-full (the rate fell), is folded while its measured
  false-positive rate (fill^k) stays at or under ``slice_fp``: idle tables do not keep big
  empty filters.

Memory is bounded per store (one router): when slices would take more than ``max_bytes``,
the oldest closed slices go first (the store forgets the distant past before the present),
and slices older than ``max_age_s`` go anyway.

Everything takes ``now`` (seconds, wall clock: slices are compared with other routers' times
in a query); nothing here reads a clock.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice, takewhile
from operator import attrgetter

MIN_BITS = 64


@dataclass(frozen=True)
class BloomConfig:
    fp_rate: float = 0.01  # per table lookup (all the slices a query window touches)
    # How many slices a query window touches, about: each slice is built for
    # fp_rate / lookup_slices, so a lookup stays at fp_rate. A window of 1.5 s over slices of
    # 1-2 s touches two or three (measured by scripts/bench_traceback.py).
    lookup_slices: float = 2.5
    slice_s: float = 2.0  # a slice covers at most this long
    min_bits: int = 1 << 8  # first slice of a new table (32 B): it doubles as it fills
    max_bits: int = 1 << 23  # largest slice (1 MiB)
    max_bytes: int = 64 << 20  # all tables of one router together
    max_age_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 0 < self.fp_rate < 0.5:
            raise ValueError("fp_rate must lie in (0, 0.5)")
        if not 1 <= self.lookup_slices <= 64:
            raise ValueError("lookup_slices must lie in [1, 64]")
        if not self.slice_s > 0 or not self.max_age_s > 0:
            raise ValueError("slice_s and max_age_s must be positive")
        for name in ("min_bits", "max_bits"):
            v = getattr(self, name)
            if v < MIN_BITS or v & (v - 1):
                raise ValueError(f"{name} must be a power of two >= {MIN_BITS}")
        if self.min_bits > self.max_bits:
            raise ValueError("min_bits > max_bits")
        if self.max_bytes < self.max_bits // 8:
            raise ValueError("max_bytes must hold at least one slice of max_bits")

    @property
    def slice_fp(self) -> float:
        """The false-positive rate each slice is built for."""
        return self.fp_rate / self.lookup_slices

    @property
    def k(self) -> int:
        return hashes_for(self.slice_fp)


def hashes_for(fp_rate: float) -> int:
    """The number of probes that minimises size at ``fp_rate``: log2(1/p), rounded."""
    return max(1, round(math.log2(1 / fp_rate)))


def capacity(m_bits: int, k: int, fp_rate: float) -> int:
    """The most packets an m-bit filter with k probes takes with its expected false-positive
    rate (1 - e^(-kn/m))^k at or under ``fp_rate``."""
    return max(1, math.floor(-m_bits / k * math.log(1 - fp_rate ** (1 / k))))


def optimal_bytes_per_packet(fp_rate: float) -> float:
    """The Bloom-filter floor: -ln p / ln² 2 bits a packet."""
    return -math.log(fp_rate) / math.log(2) ** 2 / 8


class BloomFilter:
    """m bits (a power of two), k probes by double hashing."""

    __slots__ = ("bits", "count", "k", "mask")

    def __init__(self, m_bits: int, k: int) -> None:
        if m_bits < MIN_BITS or m_bits & (m_bits - 1):
            raise ValueError("filter size must be a power of two >= 64 bits")
        self.bits = bytearray(m_bits >> 3)
        self.mask = m_bits - 1
        self.k = k
        self.count = 0

    @property
    def m(self) -> int:
        return self.mask + 1

    @property
    def nbytes(self) -> int:
        return len(self.bits)

    def add(self, h1: int, h2: int) -> None:
        bits, mask, x = self.bits, self.mask, h1
        for _ in range(self.k):
            i = x & mask
            bits[i >> 3] |= 1 << (i & 7)
            x += h2
        self.count += 1

    def __contains__(self, hashes: tuple[int, int]) -> bool:
        h1, h2 = hashes
        bits, mask, x = self.bits, self.mask, h1
        for _ in range(self.k):
            i = x & mask
            if not bits[i >> 3] & (1 << (i & 7)):
                return False
            x += h2
        return True

    def fill(self) -> float:
        """Share of bits set."""
        return int.from_bytes(self.bits, "little").bit_count() / self.m

    def fp_now(self) -> float:
        """The false-positive rate of a lookup now: fill^k."""
        return self.fill() ** self.k

    def folded(self) -> BloomFilter:
        """The same set in half the bits (index i becomes i mod m/2)."""
        if self.m <= MIN_BITS:
            raise ValueError("filter too small to fold")
        half = len(self.bits) // 2
        lo = int.from_bytes(self.bits[:half], "little")
        hi = int.from_bytes(self.bits[half:], "little")
        out = BloomFilter(self.m // 2, self.k)
        out.bits[:] = (lo | hi).to_bytes(half, "little")
        out.count = self.count
        return out


class Slice:
    """One filter with the wall-clock span of the packets in it."""

    __slots__ = ("capacity", "filter", "t_first", "t_last", "t_open")

    def __init__(self, m_bits: int, cfg: BloomConfig, now: float) -> None:
        self.filter = BloomFilter(m_bits, cfg.k)
        self.capacity = capacity(m_bits, cfg.k, cfg.slice_fp)
        self.t_open = now
        self.t_first = math.inf
        self.t_last = -math.inf

    @property
    def nbytes(self) -> int:
        return self.filter.nbytes

    def overlaps(self, t_from: float, t_to: float) -> bool:
        return self.t_first <= t_to and self.t_last >= t_from


_T_LAST = attrgetter("t_last")


class DigestTable:
    """The slices of one upstream neighbour, oldest first; the last one is open."""

    def __init__(self, name: str, cfg: BloomConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.closed: deque[Slice] = deque()
        self.open: Slice | None = None
        self.next_bits = cfg.min_bits
        self.logged = 0
        # Whether the closed slices' spans come in time order (the clock never went back):
        # a lookup then skips to its window instead of asking every slice.
        self.ordered = True

    def slices(self) -> Iterator[Slice]:
        yield from self.closed
        if self.open is not None:
            yield self.open

    def lookup(self, hashes: tuple[int, int], t_from: float, t_to: float) -> list[Slice]:
        """The slices overlapping [t_from, t_to] that say they hold the packet."""
        closed: Iterable[Slice] = self.closed
        if self.ordered:
            # An hour of slices is thousands: asking each cost a query ~2 ms of the loop.
            first = bisect_left(self.closed, t_from, key=_T_LAST)
            closed = takewhile(lambda s: s.t_first <= t_to, islice(self.closed, first, None))
        out = [s for s in closed if s.overlaps(t_from, t_to) and hashes in s.filter]
        s = self.open
        if s is not None and s.overlaps(t_from, t_to) and hashes in s.filter:
            out.append(s)
        return out

    def due(self, now: float) -> bool:
        s = self.open
        return s is not None and (s.filter.count >= s.capacity
                                  or now - s.t_open >= self.cfg.slice_s)

    def close(self, now: float) -> tuple[Slice, int]:
        """Close the open slice (folding it if it was closed part-full); return it and the
        bytes it released by folding. Sizes the next slice so that at the rate seen it fills
        up between slice_s/2 and slice_s: a slice that closes full costs exactly the Bloom
        optimum, so steady traffic closes slices full and only a falling rate leaves a
        part-full one (which folding then shrinks)."""
        s = self.open
        assert s is not None
        self.open = None
        before = s.nbytes
        cfg = self.cfg
        if s.filter.count >= s.capacity:
            age = s.t_last - s.t_open
            bits = s.filter.m
            if age < cfg.slice_s / 2:
                # Filled early: jump straight to the size that takes about 3/4 of a slice at
                # this rate, so a burst makes two or three slices, not one per doubling (each
                # slice a lookup's window touches adds its false positives).
                want = s.filter.count / max(age, 1e-3) * cfg.slice_s * 0.75
                bits *= 2
                while bits < cfg.max_bits and capacity(bits, cfg.k, cfg.slice_fp) < want:
                    bits *= 2
            self.next_bits = min(bits, cfg.max_bits)
        else:
            f = s.filter
            while f.m > MIN_BITS:
                smaller = f.folded()
                if smaller.fp_now() > cfg.slice_fp:
                    break
                f = smaller
            s.filter = f
            s.capacity = f.count  # closed: nothing more goes in
            bits = cfg.max_bits
            while bits > cfg.min_bits and capacity(bits, cfg.k, cfg.slice_fp) > s.filter.count:
                bits //= 2
            self.next_bits = bits
        if self.closed and (s.t_first < self.closed[-1].t_last or s.t_last < s.t_first):
            self.ordered = False  # the clock went back: every lookup asks every slice
        self.closed.append(s)
        return s, before - s.nbytes


@dataclass
class StoreStats:
    logged: int = 0  # packets inserted
    slices_made: int = 0
    slices_dropped: int = 0  # for memory or age
    bytes_now: int = 0  # held in all slices now
    bytes_open: int = 0  # of which in open slices
    bytes_closed_total: int = 0  # final sizes of every slice ever closed (after folding)
    logged_closed: int = 0  # packets in those slices

    @property
    def bytes_allocated(self) -> int:
        """Storage the packets logged so far have cost: every closed slice at its final size
        plus the open ones at their full size (not yet folded)."""
        return self.bytes_closed_total + self.bytes_open


class DigestStore:
    """All digest tables of one router, with the memory bound across them."""

    def __init__(self, cfg: BloomConfig | None = None) -> None:
        self.cfg = cfg or BloomConfig()
        self.tables: dict[str, DigestTable] = {}
        self.stats = StoreStats()
        # Every closed slice in closing order, for dropping the oldest first.
        self._order: deque[tuple[DigestTable, Slice]] = deque()

    def table(self, name: str) -> DigestTable:
        t = self.tables.get(name)
        if t is None:
            t = self.tables[name] = DigestTable(name, self.cfg)
        return t

    def insert(self, name: str, hashes: tuple[int, int], now: float) -> None:
        t = self.tables.get(name) or self.table(name)
        s = t.open
        if s is None or s.filter.count >= s.capacity or now - s.t_open >= self.cfg.slice_s:
            if s is not None:
                self._close(t, now)
            s = self._open(t, now)
        s.filter.add(*hashes)
        if now < s.t_first:
            s.t_first = now
        if now > s.t_last:
            s.t_last = now
        t.logged += 1
        self.stats.logged += 1

    def lookup(self, hashes: tuple[int, int], t_from: float,
               t_to: float) -> list[tuple[str, float, float]]:
        """``(table, t_first, t_last)`` of every slice overlapping the window that says it
        holds the packet (several per table when the window spans slices)."""
        out = []
        for name, t in self.tables.items():
            out += [(name, s.t_first, s.t_last) for s in t.lookup(hashes, t_from, t_to)]
        return out

    def tick(self, now: float) -> None:
        """Close slices that have run their time (so they fold while memory is still fresh)
        and forget slices past ``max_age_s``."""
        for t in self.tables.values():
            if t.due(now):
                self._close(t, now)
        horizon = now - self.cfg.max_age_s
        while self._order and self._order[0][1].t_last < horizon:
            self._drop_oldest()

    # -- internals

    def _open(self, t: DigestTable, now: float) -> Slice:
        bits = t.next_bits
        # Make room: the oldest closed slices go; if that is not enough, a smaller slice.
        while self.stats.bytes_now + bits // 8 > self.cfg.max_bytes and self._order:
            self._drop_oldest()
        while self.stats.bytes_now + bits // 8 > self.cfg.max_bytes and bits > MIN_BITS:
            bits //= 2
        s = t.open = Slice(bits, self.cfg, now)
        self.stats.slices_made += 1
        self.stats.bytes_now += s.nbytes
        self.stats.bytes_open += s.nbytes
        return s

    def _close(self, t: DigestTable, now: float) -> None:
        open_bytes = t.open.nbytes if t.open is not None else 0
        s, released = t.close(now)
        self.stats.bytes_open -= open_bytes
        self.stats.bytes_now -= released
        self.stats.bytes_closed_total += s.nbytes
        self.stats.logged_closed += s.filter.count
        self._order.append((t, s))

    def _drop_oldest(self) -> None:
        t, s = self._order.popleft()
        # Slices close in time order, so a table's oldest closed slice is the store's.
        assert t.closed[0] is s
        t.closed.popleft()
        self.stats.bytes_now -= s.nbytes
        self.stats.slices_dropped += 1
