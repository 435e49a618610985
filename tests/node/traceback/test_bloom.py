"""Bloom filters and time-sliced digest tables: the configured false-positive rate holds, no
false negatives (also after folding), memory stays bounded, storage stays near the optimum."""

from __future__ import annotations

import random

import pytest

from node.traceback.bloom import (
    BloomConfig,
    BloomFilter,
    DigestStore,
    capacity,
    hashes_for,
    optimal_bytes_per_packet,
)

R = random.Random(7)


def rand_hashes(n: int, rng: random.Random = R) -> list[tuple[int, int]]:
    return [(rng.getrandbits(64), rng.getrandbits(64) | 1) for _ in range(n)]


@pytest.mark.parametrize("p", [0.01, 0.001, 0.05])
def test_false_positive_rate_at_capacity(p: float) -> None:
    k = hashes_for(p)
    m = 1 << 16
    n = capacity(m, k, p)
    f = BloomFilter(m, k)
    members = rand_hashes(n)
    for h in members:
        f.add(*h)
    assert all(h in f for h in members)
    probes = rand_hashes(60_000)
    fp = sum(h in f for h in probes) / len(probes)
    assert fp <= p * 1.25
    assert f.fp_now() <= p * 1.1
    # Within 1% of the Bloom-filter optimum (-ln p / ln^2 2 bits a packet).
    assert m / 8 / n <= optimal_bytes_per_packet(p) * 1.01


def test_fold_is_the_smaller_filter() -> None:
    hs = rand_hashes(300)
    big, small = BloomFilter(1 << 14, 7), BloomFilter(1 << 13, 7)
    for h in hs:
        big.add(*h)
        small.add(*h)
    folded = big.folded()
    assert folded.bits == small.bits and folded.count == 300
    assert all(h in folded for h in hs)


def test_filter_rejects_bad_sizes() -> None:
    for m in (0, 63, 100, 1000):
        with pytest.raises(ValueError):
            BloomFilter(m, 3)
    with pytest.raises(ValueError):
        BloomFilter(64, 3).folded()


@pytest.mark.parametrize("kw", [{"fp_rate": 0}, {"fp_rate": 0.7}, {"slice_s": 0},
                                {"lookup_slices": 0.5}, {"min_bits": 1000},
                                {"min_bits": 1 << 20, "max_bits": 1 << 12},
                                {"max_bytes": 10}])
def test_config_validation(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BloomConfig(**kw)  # type: ignore[arg-type]


def test_slices_rotate_by_capacity_and_time_and_windows_select_them() -> None:
    cfg = BloomConfig(slice_s=1.0, min_bits=1 << 12, max_bits=1 << 14)
    store = DigestStore(cfg)
    cap = capacity(1 << 12, cfg.k, cfg.slice_fp)
    early = rand_hashes(cap + 10)
    for i, h in enumerate(early):  # all within 0.1 s: rotation by capacity
        store.insert("to-r1", h, 100.0 + i * 0.1 / len(early))
    t = store.tables["to-r1"]
    assert len(t.closed) == 1 and t.closed[0].filter.count == cap
    assert t.next_bits == 1 << 14  # it filled early: the next one fits the rate (max_bits)
    late = rand_hashes(5)
    for h in late:
        store.insert("to-r1", h, 105.0)  # > slice_s later: time rotation
    assert len(t.closed) == 2
    # A lookup only sees the slices overlapping its window.
    assert [x[0] for x in store.lookup(early[0], 99.0, 100.2)] == ["to-r1"]
    assert store.lookup(early[0], 104.0, 106.0) == [] or early[0] in t.open.filter
    assert store.lookup(late[0], 104.9, 105.1)[0][1:] == (105.0, 105.0)
    assert store.lookup(late[0], 90.0, 99.0) == []


def test_a_burst_makes_few_slices() -> None:
    """10,000 packets in 50 ms into a new table: sizes jump to fit the rate, so only a
    handful of slices (each one a lookup's window touches adds its false positives)."""
    store = DigestStore(BloomConfig())
    for i, h in enumerate(rand_hashes(10_000)):
        store.insert("to-r1", h, 10.0 + i * 5e-6)
    assert len(store.tables["to-r1"].closed) <= 3


def test_no_false_negatives_through_folding_and_closing() -> None:
    cfg = BloomConfig(slice_s=1.0, min_bits=1 << 15)
    store = DigestStore(cfg)
    hs = rand_hashes(200)
    for h in hs:
        store.insert("h-atk", h, 10.0)
    store.tick(12.0)  # closed by time, part-full: folded
    s = store.tables["h-atk"].closed[0]
    assert s.filter.m < 1 << 15 and s.filter.fp_now() <= cfg.slice_fp
    assert all(store.lookup(h, 9.0, 11.0) for h in hs)
    assert store.stats.bytes_now == s.nbytes


def test_memory_bound_drops_oldest_first() -> None:
    cfg = BloomConfig(slice_s=1.0, min_bits=1 << 12, max_bits=1 << 12, max_bytes=2048)
    store = DigestStore(cfg)  # room for four 512-byte slices
    cap = capacity(1 << 12, cfg.k, cfg.slice_fp)
    batches = [rand_hashes(cap) for _ in range(8)]
    for i, batch in enumerate(batches):
        for h in batch:
            store.insert(f"to-r{i % 2}", h, 100.0 + i)
        assert store.stats.bytes_now <= cfg.max_bytes
    assert store.stats.slices_dropped >= 4
    # The newest packets are there, the oldest are gone.
    assert store.lookup(batches[-1][0], 0, 200)
    assert all(not store.lookup(h, 0, 200) for h in batches[0][:50]) or \
        sum(bool(store.lookup(h, 0, 200)) for h in batches[0]) < len(batches[0]) * 0.1


def test_old_slices_expire() -> None:
    store = DigestStore(BloomConfig(max_age_s=60))
    h = rand_hashes(1)[0]
    store.insert("to-r1", h, 0.0)
    store.tick(2.0)
    assert store.lookup(h, 0, 1)
    store.tick(100.0)
    assert not store.lookup(h, 0, 1) and store.stats.bytes_now == 0


@pytest.mark.parametrize(("rate", "slack"), [(50, 1.35), (300, 1.06), (3000, 1.06),
                                             (30000, 1.06)])
def test_steady_traffic_storage_near_optimum(rate: int, slack: float) -> None:
    """Whatever the rate, the tables size themselves and slices close full: storage per logged
    packet within a few per cent of the Bloom floor (small slices at low rates cost more)."""
    cfg = BloomConfig(slice_s=1.0)
    store = DigestStore(cfg)
    n = rate * 8
    for i, h in enumerate(rand_hashes(n)):
        store.insert("to-r1", h, i / rate)
    store.tick(n / rate + 2)
    per = store.stats.bytes_closed_total / store.stats.logged
    assert per <= optimal_bytes_per_packet(cfg.slice_fp) * slack
    assert store.stats.bytes_allocated == store.stats.bytes_closed_total


@pytest.mark.parametrize("clock_back", [False, True])
def test_a_lookup_skips_to_its_window_and_finds_what_asking_every_slice_finds(
        clock_back: bool) -> None:
    """Lookups skip the slices before their window (an hour of them made each query cost ~2 ms
    of the loop); with a clock that went back they ask every slice. Either way they answer
    exactly as asking every slice does."""
    store = DigestStore(BloomConfig(slice_s=1.0))
    rng = random.Random(3)
    packets = []
    now = 1000.0
    for i in range(3000):
        now += 0.4 if not (clock_back and i == 1500) else -50.0
        h = rand_hashes(1, rng)[0]
        store.insert("up", h, now)
        packets.append((h, now))
    table = store.tables["up"]
    assert table.ordered is not clock_back and len(table.closed) > 500
    for h, t in rng.sample(packets, 200):
        for lo, hi in ((t - 0.75, t + 0.75), (t - 40, t + 3), (t - 5000, t + 5000)):
            every = [s for s in table.slices() if s.overlaps(lo, hi) and h in s.filter]
            assert table.lookup(h, lo, hi) == every
            assert table.lookup(h, lo, hi)  # never a false negative
