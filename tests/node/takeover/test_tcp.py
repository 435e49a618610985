"""The sans-I/O TCP endpoint on a fake clock: transfer, ACKs, retransmission, windows, FIN, RST
in every state, timestamps and window scale. Two endpoints seeded as the sides of one
established connection talk over ``node.takeover.sim.Wire``."""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.stack.packet import ACK, FIN, PSH, RST, SYN
from node.takeover.sim import Wire, pair
from node.takeover.tcp import Config, Endpoint, Seed, Segment, State, seq_add, seq_diff


def pump(wire: Wire, src: Endpoint, dst: Endpoint, data: bytes) -> bytes:
    """Send ``data`` from src, read everything at dst."""
    got = bytearray()
    todo = memoryview(data)

    def feed() -> bool:
        nonlocal todo
        n = min(len(todo), src.send_space())
        if n:
            src.write(bytes(todo[:n]))
            todo = todo[n:]
        got.extend(dst.read())
        return not todo and len(got) == len(data)

    wire.run(feed)
    return bytes(got)


def no_rst(wire: Wire) -> bool:
    return not any(s.flags & RST for d in wire.sent for s in d)


def test_bulk_both_directions_exact_and_without_retransmissions() -> None:
    a, b = pair()
    w = Wire(a, b)
    data = random.Random(1).randbytes(1_000_000)
    assert pump(w, a, b, data) == data
    back = random.Random(2).randbytes(300_000)
    assert pump(w, b, a, back) == back
    assert a.stats["retransmits"] == b.stats["retransmits"] == 0
    assert no_rst(w)
    # every data segment fits the MSS and carries timestamps
    assert all(len(s.payload) <= 1448 and s.tsval is not None for s in w.sent[0])


def test_ack_numbers_cover_what_was_received_and_windows_are_scaled() -> None:
    a, b = pair(shift=7)
    w = Wire(a, b)
    pump(w, a, b, b"x" * 5000)
    w.run(lambda: a.in_flight == 0)
    last = w.sent[1][-1]
    assert last.ack == seq_add(1000, 5000)
    # the raw window field is the free buffer shifted by 7
    assert last.window == (256 * 1024) >> 7


def test_right_edge_never_moves_left() -> None:
    _a, b = pair(shift=0, window=60000, config=Config(rcvbuf=8000))
    # b's seed advertised 60000 bytes: even with an 8000-byte buffer it must keep that edge
    seg = b.poll(0.0, flush=True)
    assert not seg
    b.receive(Segment(1000, 9_000_000, ACK | PSH, 500, b"z" * 1000, 600, 70_000), 0.0)
    out = b.poll(0.0)
    assert out and seq_add(out[0].ack, out[0].window) == seq_add(1000, 60000)


def test_single_loss_is_repaired_by_fast_retransmit() -> None:
    a, b = pair()
    lost = []

    def drop(d: int, s: Segment) -> bool:
        if d == 0 and s.payload and s.seq == seq_add(1000, 3 * 1448) and not lost:
            lost.append(s)
            return True
        return False

    w = Wire(a, b, drop=drop)
    data = bytes(range(256)) * 400
    assert pump(w, a, b, data) == data
    assert lost and a.stats["fast_retransmits"] == 1
    assert a.stats["retransmits"] == 1 and a.stats["timeouts"] == 0
    assert b.stats["ooo_held"] >= 1


def test_tail_loss_is_repaired_by_the_retransmission_timer() -> None:
    a, b = pair()
    lost = []

    def drop(d: int, s: Segment) -> bool:
        if d == 0 and s.payload and not lost:
            lost.append(s)
            return True
        return False

    w = Wire(a, b, drop=drop)
    assert pump(w, a, b, b"only segment") == b"only segment"
    assert a.stats["timeouts"] == 1 and a.stats["retransmits"] == 1
    assert w.now == pytest.approx(Config().rto_init, abs=0.01)


def test_backoff_doubles_then_resets_on_progress() -> None:
    a, b = pair()
    blackout = [True]

    def drop(d: int, s: Segment) -> bool:
        return d == 0 and blackout[0]

    w = Wire(a, b, drop=drop)
    a.write(b"hello")
    times: list[float] = []
    w.run(lambda: len(w.lost[0]) >= 4)
    times = [w.now]
    assert a.retries == 3 and a.rto == pytest.approx(Config().rto_init * 8)
    blackout[0] = False
    w.run(lambda: b.readable() == 5)
    assert b.read() == b"hello"
    w.run(lambda: a.in_flight == 0)
    assert a.retries == 0 and times[0] > 1.0


def test_gives_up_quietly_after_max_retries() -> None:
    a, b = pair(config=Config(max_retries=3))
    w = Wire(a, b, drop=lambda d, s: d == 0)
    a.write(b"x")
    w.run(lambda: a.closed)
    assert a.aborted and a.state == State.CLOSED
    assert no_rst(w)
    assert a.deadline() is None


def test_rtt_samples_follow_karn() -> None:
    a, b = pair()
    w = Wire(a, b, delay=0.01)
    pump(w, a, b, b"a" * 20000)
    assert a.srtt == pytest.approx(0.02, rel=0.2)
    assert a.rto == pytest.approx(Config().rto_min)


def test_zero_window_probe_and_resume() -> None:
    a, b = pair(shift=0, window=4000, config=Config(rcvbuf=4000))
    w = Wire(a, b)
    a.write(b"q" * 20000)
    w.run(lambda: a.snd_wnd == 0 and a.in_flight == 0, max_time=1)
    assert b.readable() == 4000
    w.run(lambda: a.stats["window_probes"] >= 2, max_time=30)
    probe = [s for s in w.sent[0] if not s.payload and s.seq == seq_add(a.snd_una, -1)]
    assert probe, "Linux-style probes at snd_una - 1"
    got = bytearray()

    def drain() -> bool:
        got.extend(b.read())
        return len(got) == 20000

    w.run(drain, max_time=120)
    assert bytes(got) == b"q" * 20000


def test_active_close_then_passive_close() -> None:
    a, b = pair()
    w = Wire(a, b)
    a.write(b"bye")
    a.shutdown()
    w.run(lambda: b.eof)
    assert b.read() == b"bye" and b.state == State.CLOSE_WAIT
    w.run(lambda: a.state == State.FIN_WAIT_2)
    b.shutdown()
    w.run(lambda: b.closed)
    assert a.state == State.TIME_WAIT
    w.run(lambda: a.closed)
    assert w.now >= Config().time_wait
    assert no_rst(w)
    # the FIN rode on the data segment
    assert w.sent[0][0].flags & FIN and w.sent[0][0].payload == b"bye"


def test_simultaneous_close() -> None:
    a, b = pair()
    w = Wire(a, b, delay=0.01)
    a.shutdown()
    b.shutdown()
    w.run(lambda: a.state == State.TIME_WAIT and b.state == State.TIME_WAIT)
    assert a.stats["segs_out"] >= 2
    w.run(lambda: a.closed and b.closed)


def test_lost_fin_is_retransmitted() -> None:
    a, b = pair()
    lost = []

    def drop(d: int, s: Segment) -> bool:
        if d == 0 and s.flags & FIN and not lost:
            lost.append(s)
            return True
        return False

    w = Wire(a, b, drop=drop)
    a.shutdown()
    w.run(lambda: b.eof)
    assert a.stats["retransmits"] == 1


def test_retransmitted_fin_in_time_wait_is_acked_again() -> None:
    a, b = pair()
    w = Wire(a, b)
    a.shutdown()
    b.shutdown()
    w.run(lambda: a.state in (State.TIME_WAIT, State.CLOSED) and b.closed)
    fin = next(s for s in w.sent[1] if s.flags & FIN)
    before = a.stats["segs_out"]
    if a.state == State.TIME_WAIT:
        a.receive(fin, w.now)
        assert a.poll(w.now) and a.stats["segs_out"] == before + 1


def _to_state(state: State) -> tuple[Endpoint, Endpoint, Wire]:
    a, b = pair()
    w = Wire(a, b, delay=0.01)
    if state == State.FIN_WAIT_1:
        a.shutdown()
        w.sent = [[], []]
        a.poll(0.0)  # FIN out, never delivered
    elif state == State.FIN_WAIT_2:
        a.shutdown()
        w.run(lambda: a.state == State.FIN_WAIT_2)
    elif state == State.CLOSE_WAIT:
        b.shutdown()
        w.run(lambda: a.state == State.CLOSE_WAIT)
    elif state == State.LAST_ACK:
        b.shutdown()
        w.run(lambda: a.state == State.CLOSE_WAIT)
        a.shutdown()
        a.poll(w.now)
    elif state == State.CLOSING:
        a.shutdown()
        a.poll(0.0)
        b.shutdown()
        fin = b.poll(0.0)[0]
        a.receive(fin, 0.0)
    elif state == State.TIME_WAIT:
        a.shutdown()
        b.shutdown()
        w.run(lambda: a.state == State.TIME_WAIT)
    assert a.state == state
    return a, b, w


STATES = [State.ESTABLISHED, State.FIN_WAIT_1, State.FIN_WAIT_2, State.CLOSE_WAIT,
          State.LAST_ACK, State.CLOSING, State.TIME_WAIT]


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.name)
def test_rst_at_rcv_nxt_closes_in_every_state(state: State) -> None:
    a, _, w = _to_state(state)
    seq = a.rcv_nxt if not a.eof else seq_add(a.rcv_nxt, -1)
    a.receive(Segment(seq, 0, RST, 0), w.now)
    assert a.state == State.CLOSED and a.reset
    assert a.poll(w.now + 100) == [] and a.deadline() is None


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.name)
def test_rst_in_window_earns_one_challenge_ack_per_interval(state: State) -> None:
    a, _, w = _to_state(state)
    a.poll(w.now)
    before = a.state
    t = w.now + 0.01  # before any retransmission timer (it would carry the ACK itself)
    a.receive(Segment(seq_add(a.rcv_nxt, 10), 0, RST, 0), t)
    out = a.poll(t)
    assert a.state == before and len(out) == 1 and out[0].flags == ACK
    assert out[0].ack == a.rcv_nxt
    a.receive(Segment(seq_add(a.rcv_nxt, 20), 0, RST, 0), t + 0.01)
    assert a.poll(t + 0.01) == [] or a.state != before  # rate limited
    assert a.stats["challenge_acks"] == 1


@pytest.mark.parametrize("state", STATES, ids=lambda s: s.name)
def test_rst_outside_window_is_ignored(state: State) -> None:
    a, _, w = _to_state(state)
    a.poll(w.now)
    before = a.state
    a.receive(Segment(seq_add(a.rcv_nxt, 1 << 30), 0, RST, 0), w.now)
    a.receive(Segment(seq_add(a.rcv_nxt, -100000), 0, RST, 0), w.now)
    assert a.state == before and a.stats["rst_ignored"] == 2


def test_syn_on_established_connection_gets_a_challenge_ack() -> None:
    a, _ = pair()
    a.receive(Segment(12345, 0, SYN, 1000), 1.0)
    out = a.poll(1.0)
    assert len(out) == 1 and out[0].flags == ACK and a.state == State.ESTABLISHED


def test_paws_drops_old_timestamps_with_a_duplicate_ack() -> None:
    a, _b = pair()
    a.receive(Segment(9_000_000, 1000, ACK | PSH, 500, b"new", 80_000, 600), 0.0)
    assert a.read() == b"new" and a.ts_recent == 80_000
    a.poll(0.0)
    a.receive(Segment(seq_add(9_000_000, 3), 1000, ACK | PSH, 500, b"old", 79_000, 600), 0.1)
    assert a.readable() == 0 and a.stats["paws"] == 1
    out = a.poll(0.1)
    assert out and out[0].ack == seq_add(9_000_000, 3)


def test_timestamps_continue_the_impersonated_clock_and_echo_ts_recent() -> None:
    a, _ = pair()  # a's TS clock starts at 500, peer's last TSval 70_000
    a.write(b"x")
    seg = a.poll(2.5)[0]
    assert seg.tsval == 500 + 2500 and seg.tsecr == 70_000
    a.receive(Segment(9_000_000, seq_add(1000, 1), ACK, 500, b"", 71_000, seg.tsval), 2.6)
    assert a.ts_recent == 71_000


def test_ts_recent_not_updated_by_a_segment_past_the_last_ack() -> None:
    a, _ = pair()
    # out of order: seq beyond rcv_wup
    a.receive(Segment(seq_add(9_000_000, 100), 1000, ACK, 500, b"late", 99_999, 500), 0.0)
    assert a.ts_recent == 70_000 and a.stats["ooo_held"] == 1


def test_old_data_is_acknowledged_again() -> None:
    a, b = pair()
    w = Wire(a, b)
    pump(w, b, a, b"abc")
    a.poll(w.now)
    a.receive(Segment(9_000_000, 1000, ACK | PSH, 500, b"abc", 70_100, 500), w.now + 1)
    out = a.poll(w.now + 1)
    assert out and out[0].ack == seq_add(9_000_000, 3) and a.readable() == 0


def test_ack_of_unsent_data_is_dropped() -> None:
    a, _ = pair()
    a.receive(Segment(9_000_000, seq_add(1000, 5000), ACK | PSH, 500, b"data", 70_001, 500), 0)
    assert a.readable() == 0 and a.stats["ack_unsent"] == 1


def test_out_of_order_segments_are_held_and_delivered() -> None:
    a, _ = pair()
    base = 9_000_000
    a.receive(Segment(seq_add(base, 4), 1000, ACK, 500, b"EFGH", 70_001, 500), 0)
    a.receive(Segment(seq_add(base, 8), 1000, ACK, 500, b"IJ", 70_001, 500), 0)
    assert a.readable() == 0
    dup = a.poll(0)
    assert dup and dup[0].ack == base  # duplicate ACKs for the peer's fast retransmit
    a.receive(Segment(base, 1000, ACK, 500, b"ABCD", 70_001, 500), 0)
    assert a.read() == b"ABCDEFGHIJ"


def test_hole_in_the_seeded_send_buffer_is_never_invented() -> None:
    # The impersonated side sent 100 bytes the node never saw; the peer has not acked them.
    seed = Seed(snd_una=1000, snd_nxt=1100, rcv_nxt=5000, snd_wnd=65535, snd_shift=0,
                rcv_shift=0, rcv_adv=70535, rcv_raw=65535, mss=1000, ts_val=None,
                ts_recent=None, unacked=b"k" * 40)
    e = Endpoint(seed, 0.0)
    assert e.stats["hole_bytes"] == 60
    e.write(b"new")
    out = e.poll(0.0)
    assert out[0].seq == 1100 and out[0].payload == b"new"
    # the timer fires: go back to snd_una, which lies in the hole: a bare ACK, no bytes
    out = e.poll(1.0)
    assert out and not out[0].payload and e.stats["hole_stalls"] == 1
    # the peer acknowledges the unknown bytes after all: the known ones follow
    e.receive(Segment(5000, 1060, ACK, 65535), 1.1)
    e.poll(3.0)
    e.receive(Segment(5000, 1060, ACK, 65535), 3.0)
    out = e.poll(10.0)
    assert any(s.seq == 1060 and s.payload == b"k" * 40 + b"new" for s in out)


def test_known_unacked_bytes_are_retransmitted() -> None:
    seed = Seed(snd_una=1000, snd_nxt=1010, rcv_nxt=5000, snd_wnd=65535, snd_shift=0,
                rcv_shift=0, rcv_adv=70535, rcv_raw=65535, mss=1000, ts_val=None,
                ts_recent=None, unacked=b"0123456789")
    e = Endpoint(seed, 0.0)
    out = e.poll(1.0)
    assert out[0].seq == 1000 and out[0].payload == b"0123456789"
    assert e.stats["retransmits"] == 1


def test_unknown_scale_reads_windows_unscaled_and_repeats_the_raw_window() -> None:
    seed = Seed(snd_una=1, snd_nxt=1, rcv_nxt=2, snd_wnd=1000, snd_shift=None,
                rcv_shift=None, rcv_adv=None, rcv_raw=502, mss=500, ts_val=None,
                ts_recent=None)
    e = Endpoint(seed, 0.0)
    e.write(b"a" * 5000)
    out = e.poll(0.0)
    assert sum(len(s.payload) for s in out) == 1000  # conservative: 1000 bytes, unscaled
    assert all(s.window == 502 for s in out)


def test_seeded_peer_fin_starts_in_close_wait() -> None:
    seed = Seed(snd_una=1, snd_nxt=1, rcv_nxt=2, snd_wnd=1000, snd_shift=0, rcv_shift=0,
                rcv_adv=1002, rcv_raw=1000, mss=500, ts_val=None, ts_recent=None,
                peer_fin=True)
    e = Endpoint(seed, 0.0)
    assert e.state == State.CLOSE_WAIT and e.eof
    e.shutdown()
    assert e.poll(0.0)[0].flags & FIN and e.state == State.LAST_ACK


def test_sequence_numbers_wrap() -> None:
    a, b = pair(a_isn=0xFFFFFF00, b_isn=0xFFFFFFF0)
    w = Wire(a, b)
    data = bytes(range(256)) * 100
    assert pump(w, a, b, data) == data
    assert pump(w, b, a, data) == data
    assert seq_diff(a.snd_una, 0xFFFFFF00) == len(data)


@settings(max_examples=40)
@given(seed=st.integers(0, 2**32 - 1), loss=st.floats(0.0, 0.2), size=st.integers(1, 200_000),
       delay=st.floats(0.0001, 0.05))
def test_random_loss_still_delivers_everything_in_order(seed: int, loss: float, size: int,
                                                        delay: float) -> None:
    rng = random.Random(seed)
    a, b = pair(a_isn=rng.getrandbits(32), b_isn=rng.getrandbits(32))
    w = Wire(a, b, delay=delay, drop=lambda d, s: rng.random() < loss)
    data = rng.randbytes(size)
    got = pump(w, a, b, data)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
    a.shutdown()
    b.shutdown()
    w.run(lambda: a.closed and b.closed, max_time=w.now + 3600)
    assert a.closed and b.closed and not a.aborted and no_rst(w)
    # no storm: with SACK, about one retransmission per segment lost
    assert a.stats["retransmits"] <= 2 * len(w.lost[0]) + 5


def test_sack_blocks_report_held_data_and_the_sender_skips_it() -> None:
    a, b = pair()
    lost = []

    def drop(d: int, s: Segment) -> bool:
        if d == 0 and s.payload and s.seq == seq_add(1000, 1448) and not lost:
            lost.append(s)
            return True
        return False

    w = Wire(a, b, drop=drop)
    a.write(b"s" * 1448 * 8)
    w.run(lambda: bool(b.stats["ooo_held"]) and bool(w.sent[1]) and bool(w.sent[1][-1].sack))
    left, right = w.sent[1][-1].sack[0]
    assert left == seq_add(1000, 2 * 1448) and seq_diff(right, left) % 1448 == 0
    w.run(lambda: b.readable() == 1448 * 8)
    assert a.stats["retransmits"] == 1  # only the lost one, not the SACKed ones after it


def test_after_a_timeout_sacked_segments_are_not_resent() -> None:
    a, b = pair()
    lost: list[Segment] = []

    def drop(d: int, s: Segment) -> bool:
        # lose the first segment twice (so the timer fires) and the dupacks' fast retransmit
        if d == 0 and s.payload and s.seq == 1000 and len(lost) < 2:
            lost.append(s)
            return True
        return False

    w = Wire(a, b, drop=drop)
    a.write(b"t" * 1448 * 6)
    w.run(lambda: b.readable() == 1448 * 6)
    assert a.stats["timeouts"] >= 1
    assert a.stats["retransmits"] == 2 and a.stats["sack_skipped"] >= 1


def test_without_sack_permitted_no_blocks_are_sent() -> None:
    _a, b = pair(sack=False)
    b.receive(Segment(seq_add(1000, 100), 9_000_000, ACK, 512, b"x" * 10, 600, 70_000), 0.0)
    out = b.poll(0.0)
    assert out and out[0].sack == ()


@pytest.mark.parametrize("seed", range(12))
def test_fin_queued_behind_data_under_loss_comes_only_at_the_end(seed: int) -> None:
    rng = random.Random(seed)
    a, b = pair(a_isn=rng.getrandbits(32), b_isn=rng.getrandbits(32))
    w = Wire(a, b, delay=rng.choice([0.0005, 0.01]), drop=lambda d, s: rng.random() < 0.08)
    data = rng.randbytes(200_000)
    a.write(data)
    a.shutdown()  # FIN queued behind everything, before any of it is sent
    got = bytearray()

    def read() -> bool:
        got.extend(b.read())
        return b.eof

    w.run(read, max_time=1e5)
    assert bytes(got) == data
    end = seq_add(a._sbase, len(a.sendq))
    assert all(s.seq + len(s.payload) & 0xFFFFFFFF == end for s in w.sent[0] if s.flags & FIN)
