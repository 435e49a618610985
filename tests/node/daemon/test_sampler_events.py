"""The detector's sampling policy and the event bus, log and rates (no I/O but the log file)."""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from node.daemon.events import EVENT_BURST, EventBus, EventLog, Rates
from node.daemon.sampler import (
    DUPLICATE,
    QUEUED,
    REPLACED,
    SAMPLED_OUT,
    SUPERSEDED,
    Job,
    Sampler,
)
from sca.alert import Message


def job(service: str, n: int) -> Job:
    return Job(service, (Message(f"{service}-{n}".encode()),))


def test_bounded_fifo_below_capacity() -> None:
    s = Sampler(4, rng=random.Random(1))
    assert [s.offer(job("a", i)) for i in range(4)] == [QUEUED] * 4
    assert len(s) == 4
    assert [s.take().messages[0].data for _ in range(4)] == [b"a-0", b"a-1", b"a-2", b"a-3"]
    assert s.take() is None


def test_duplicates_dropped_waiting_and_recent() -> None:
    s = Sampler(4)
    assert s.offer(job("a", 1)) == QUEUED
    assert s.offer(job("a", 1)) == DUPLICATE
    s.take()
    assert s.offer(job("a", 1)) == DUPLICATE  # replayed recently
    s.forget([job("a", 1).digest])
    assert s.offer(job("a", 1)) == QUEUED
    assert s.stats.duplicates == 2


def test_a_flood_on_one_service_does_not_crowd_out_another() -> None:
    s = Sampler(8, rng=random.Random(2))
    for i in range(1000):
        s.offer(job("flood", i))
    assert len(s) == 8 and s.stats.sampled_out > 900
    assert s.offer(job("quiet", 0)) == REPLACED  # below its fair share: takes a slot
    assert s.depth() == {"flood": 7, "quiet": 1}
    taken = [s.take().service for _ in range(2)]
    assert "quiet" in taken  # round-robin: not behind the flood's queue


def test_every_submission_of_a_flood_has_the_same_chance() -> None:
    # Algorithm R: after N offers to a full queue of k, each was kept with probability k/N,
    # whether it came first, in the middle or last.
    kept: Counter[int] = Counter()
    rounds, n, k = 2000, 40, 4
    rng = random.Random(3)
    for _ in range(rounds):
        s = Sampler(k, rng=rng)
        for i in range(n):
            s.offer(job("a", i))
        while (j := s.take()) is not None:
            kept[int(j.messages[0].data.split(b"-")[1])] += 1
    expect = rounds * k / n  # 200
    for pos in (0, 1, n // 2, n - 1):
        assert 0.7 * expect < kept[pos] < 1.3 * expect, (pos, kept[pos])
    assert sum(kept.values()) == rounds * k


def test_sampled_out_is_counted() -> None:
    s = Sampler(1, rng=random.Random(4))
    outcomes = Counter(s.offer(job("a", i)) for i in range(100))
    assert outcomes[QUEUED] == 1
    assert outcomes[SAMPLED_OUT] + outcomes[REPLACED] == 99
    assert s.stats.offered == 100 and len(s) == 1


def test_a_longer_history_of_a_connection_takes_the_waiting_ones_place() -> None:
    chunks = [Message(b"GET /", 0), Message(b"x" * 300, 0), Message(b"\r\n\r\n", 0)]

    def history(n: int, flow: object = ("10.77.0.1", 4000)) -> Job:
        return Job("httpd", tuple(chunks[:n]), flow=flow)

    s = Sampler(8)
    assert s.offer(job("resolver", 0)) == QUEUED
    assert s.offer(history(1)) == QUEUED
    assert s.offer(history(2)) == SUPERSEDED
    other = Job("httpd", (Message(b"POST /", 0),), flow=("10.77.0.2", 4000))
    assert s.offer(other) == QUEUED  # another connection
    assert s.offer(history(3)) == SUPERSEDED
    assert len(s) == 3 and s.stats.superseded == 2
    # A history whose oldest chunks were cut does not hold the waiting one: both replay.
    assert s.offer(Job("httpd", tuple(chunks[1:]), flow=("10.77.0.1", 4000))) == QUEUED
    taken = [s.take() for _ in range(4)]
    assert [len(j.messages) for j in taken if j.service == "httpd"] == [3, 1, 2]
    assert s.take() is None
    # Taken, it is no longer waiting: the next history of that connection queues anew, and
    # the one replayed counts as a duplicate.
    assert s.offer(history(3)) == DUPLICATE
    assert s.offer(Job("httpd", (*chunks, Message(b"more", 0)),
                       flow=("10.77.0.1", 4000))) == QUEUED


# --- events ------------------------------------------------------------------------------


def test_event_log_lines_are_eve_like(tmp_path: Path) -> None:
    path = tmp_path / "ev" / "events.jsonl"
    bus = EventBus(EventLog(path), clock=lambda: 1767323045.5)
    got: list[dict] = []
    bus.subscribe(got.append)
    bus.emit("alert.verified", alert_id="ab", service="resolver", data=b"\x01", weird={1: {2}})
    bus.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert rec["timestamp"] == "2026-01-02T03:04:05.500000+00:00"
    assert rec["event_type"] == "alert.verified" and rec["alert_id"] == "ab"
    assert rec["data"] == "01" and rec["weird"] == {"1": [2]}
    assert got == [rec]
    assert oct(path.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("backups", [3, 0])
def test_event_log_rotates_keeping_whole_lines(tmp_path: Path, backups: int) -> None:
    path = tmp_path / "events.jsonl"
    log = EventLog(path, max_bytes=2000, backups=backups)
    for i in range(200):
        log.write({"event_type": "flow.delayed", "seq": i, "pad": "x" * 40})
    log.close()
    # A restarted node goes on from the size already on disk.
    log = EventLog(path, max_bytes=2000, backups=backups)
    for i in range(200, 230):
        log.write({"event_type": "flow.delayed", "seq": i, "pad": "x" * 40})
    log.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["events.jsonl", *[f"events.jsonl.{i}" for i in range(1, backups + 1)]]
    seqs: list[int] = []
    for name in [f"events.jsonl.{i}" for i in range(backups, 0, -1)] + ["events.jsonl"]:
        f = tmp_path / name
        assert f.stat().st_size <= 2000
        seqs += [json.loads(line)["seq"] for line in f.read_text().splitlines()]
    # oldest first across the files, nothing repeated, the newest kept, the oldest dropped
    assert seqs == list(range(seqs[0], 230)) and seqs[0] > 0
    assert log.rotations >= 1


def test_a_flood_of_one_type_is_summarised() -> None:
    now = [1000.0]
    bus = EventBus(clock=lambda: now[0])
    got: list[dict] = []
    bus.subscribe(got.append)
    for _ in range(int(EVENT_BURST) + 500):
        bus.emit("alert.malformed", error="x")
    bus.emit("alert.verified")  # other types are not affected
    assert sum(e["event_type"] == "alert.malformed" for e in got) == EVENT_BURST
    assert got[-1]["event_type"] == "alert.verified"
    now[0] += 10
    bus.emit("alert.malformed")
    summary = [e for e in got if e["event_type"] == "events.suppressed"]
    assert summary == [summary[0]] and summary[0]["count"] == 500
    assert bus.counts["alert.malformed"] == EVENT_BURST + 501


def test_a_broken_subscriber_does_not_stop_the_others() -> None:
    bus = EventBus()
    got: list[dict] = []

    def broken(rec: dict) -> None:
        raise RuntimeError("boom")

    bus.subscribe(broken)
    bus.subscribe(got.append)
    bus.emit("x")
    assert len(got) == 1 and bus.subscriber_errors == 1


def test_rates_per_second_over_a_minute() -> None:
    r = Rates(window=60)
    r.add("a", 100.2)
    r.add("a", 100.9, 2)
    r.add("a", 103.0)
    s = r.series("a", 103.5)
    assert len(s) == 60 and s[-1] == 1 and s[-4] == 3 and sum(s) == 4
    assert sum(r.series("a", 200.0)) == 0  # all rolled out
    assert r.series("never", 1.0) == [0] * 60


def test_slow_stream_loses_oldest_not_the_bus() -> None:
    async def main() -> None:
        bus = EventBus()
        stream = bus.stream(maxsize=3)
        for i in range(10):
            bus.emit("t", n=i)
        assert stream.dropped == 7
        assert [(await stream.get())["n"] for _ in range(3)] == [7, 8, 9]
        stream.close()
        bus.emit("t")
        assert stream.queue.empty()

    asyncio.run(main())
