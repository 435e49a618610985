"""The takeover's header reads and writes on the critical path: the TSval of any option layout,
nothing raised by a packet whose options are cut short or malformed, and the first ACK built
in one call byte for byte as the general builder builds it."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.stack.conntrack import Flow
from node.stack.packet import ACK, RST, SYN
from node.takeover.adapter import TakeoverQueue, tcp_header, tcp_tsval
from node.takeover.seed import first_ack
from node.takeover.tcp import Segment
from node.takeover.wire import build, parse

SRC, DST = bytes([10, 77, 1, 2]), bytes([10, 77, 2, 2])


def _with_options(options: bytes, payload: bytes = b"x") -> bytes:
    """An IPv4 TCP packet with these option bytes (padded to a multiple of 4)."""
    options += b"\0" * (-len(options) % 4)
    doff = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", 40000, 8080, 1, 2, doff << 4, ACK, 500, 0, 0) + options
    total = 20 + len(tcp) + len(payload)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 0, 0x4000, 64, 6, 0, SRC, DST)
    return ip + tcp + payload


def test_tsval_of_the_usual_and_other_layouts() -> None:
    p = build(SRC, DST, 40000, 8080, Segment(1, 2, ACK, 500, b"data", 123456, 7))
    assert tcp_tsval(p, 20) == 123456
    ts = struct.pack("!BBII", 8, 10, 0xDEADBEEF, 5)
    # MSS first, the timestamp option unaligned, then a SACK-permitted option.
    assert tcp_tsval(_with_options(struct.pack("!BBH", 2, 4, 1460) + ts + b"\x04\x02"),
                     20) == 0xDEADBEEF
    assert tcp_tsval(_with_options(b"\x01" + ts), 20) == 0xDEADBEEF
    assert tcp_tsval(_with_options(b""), 20) is None
    assert tcp_tsval(_with_options(b"\x00" + ts), 20) is None  # after end-of-options


@given(st.binary(max_size=40), st.integers(0, 15), st.integers(0, 44))
def test_malformed_options_never_raise(options: bytes, doff: int, cut: int) -> None:
    p = bytearray(_with_options(options, b""))
    p[32] = doff << 4  # whatever the header claims
    p = p[:max(40, len(p) - cut)]
    v = tcp_tsval(bytes(p), 20)
    assert v is None or 0 <= v < 1 << 32
    # The header read gives the same TSval when it reads one (Linux's layout) and no other.
    hdr = tcp_header(bytes(p))
    assert hdr is None or hdr[6] is None or hdr[6] == v


def test_the_header_read_gives_the_usual_layouts_tsval_at_once() -> None:
    p = build(SRC, DST, 40000, 8080, Segment(1, 2, ACK, 500, b"data", 123456, 7))
    assert tcp_header(p) == (SRC + DST + struct.pack("!HH", 40000, 8080), 20, 1, 2, ACK, 4,
                             123456)
    other = _with_options(struct.pack("!BBH", 2, 4, 1460) + struct.pack("!BBII", 8, 10, 9, 5))
    hdr = tcp_header(other)
    assert hdr is not None and hdr[6] is None and tcp_tsval(other, 20) == 9


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 65535),
       st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.integers(0, 2**32 - 1),
       st.integers(0, 1500))
def test_the_first_ack_is_what_build_makes(caddr: bytes, saddr: bytes, cport: int, sport: int,
                                           seq: int, cack: int, snext: int, window: int,
                                           tsval: int | None, tsecr: int, n: int) -> None:
    flow = Flow(1, 6, (caddr, cport), (saddr, sport), 0.0)
    c, s = flow.halves
    c.ack, c.ts_val = cack, None if tsval is None else 1
    s.next_seq, s.window, s.ts_val = snext, window, tsval
    pkt, (aseq, ack, win, tv, te) = first_ack(flow, seq, n, tsecr)
    seg = Segment(aseq, ack, ACK, win, b"", tv, te)
    assert pkt == build(saddr, caddr, sport, cport, seg)
    p = parse(pkt)
    assert (p.src, p.dst, p.sport, p.dport) == (saddr, caddr, sport, cport)
    assert p.seg.ack == (seq + n) % 2**32 and p.seg.flags == ACK and p.seg.window == window
    assert p.seg.tsval == tsval and p.seg.tsecr == (None if tsval is None else tsecr)


class _Verdicts:
    """Records the verdict the queue gives one packet (the unit under test is the queue's
    per-packet decision; the kernel side is exercised in the namespace tests)."""

    indev = 0
    source_mac = None
    peeked = None

    def __init__(self) -> None:
        self.verdict = ""

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


C6, S6 = bytes.fromhex("fd77" + "00" * 13 + "02"), bytes.fromhex("fd77" + "00" * 13 + "01")


def _v6(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int,
        data: bytes = b"") -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + data
    return struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src, dst) + tcp


def test_ipv6_flows_are_checked_and_a_match_blocked_not_taken_over() -> None:
    """The engines speak IPv4 only: on IPv6 the exploit is dropped and the flow's later client
    data with it; benign bytes before it pass."""

    from node.takeover.adapter import TakeoverQueue
    from node.takeover.engine import TakeoverEngine
    from node.takeover.harness import starts_with

    loop = asyncio.new_event_loop()
    try:
        q = TakeoverQueue(TakeoverEngine(), detect=starts_with(b"EXPLOIT"), ports={8080},
                          loop=loop)
        cp, sp = 40000, 8080
        script = [
            (_v6(C6, S6, cp, sp, 100, 0, SYN), "accept"),
            (_v6(S6, C6, sp, cp, 500, 101, SYN | ACK), "accept"),
            (_v6(C6, S6, cp, sp, 101, 501, ACK), "accept"),
            (_v6(C6, S6, cp, sp, 101, 501, ACK, b"GET /a\n"), "accept"),
            (_v6(S6, C6, sp, cp, 501, 108, ACK, b"ok 1\n"), "accept"),
            (_v6(C6, S6, cp, sp, 108, 506, ACK, b"EXPLOIT now\n"), "drop"),
            (_v6(C6, S6, cp, sp, 108, 506, ACK, b"EXPLOIT now\n"), "drop"),  # its resend
            (_v6(C6, S6, cp, sp, 120, 506, ACK, b"GET /b\n"), "drop"),
            (_v6(S6, C6, sp, cp, 506, 108, ACK), "accept"),
        ]
        got = []
        for pkt, _ in script:
            h = _Verdicts()
            q._on_packet(pkt, h)  # type: ignore[arg-type]
            got.append(h.verdict)
        assert got == [want for _, want in script]
        assert q.stats["ipv6_blocked"] == 1 and q.stats["blocked"] == 2
    finally:
        loop.close()


class _Logged(_Verdicts):
    """A verdict that also goes into a shared log, to see the order they were given in."""

    def __init__(self, log: list[tuple[bytes, str]], data: bytes) -> None:
        super().__init__()
        self.log, self.data = log, data

    def accept(self) -> None:
        super().accept()
        self.log.append((self.data, "accept"))

    def drop(self) -> None:
        super().drop()
        self.log.append((self.data, "drop"))


def _segment(v6: bool, client: bool, seq: int, ack: int, flags: int, data: bytes = b"") -> bytes:
    if v6:
        src, dst = (C6, S6) if client else (S6, C6)
        sport, dport = (40000, 8080) if client else (8080, 40000)
        return _v6(src, dst, sport, dport, seq, ack, flags, data)
    src, dst, sport, dport = (SRC, DST, 40000, 8080) if client else (DST, SRC, 8080, 40000)
    return build(src, dst, sport, dport, Segment(seq, ack, flags, 65535, data, None, None))


def _queue(v6: bool, loop: asyncio.AbstractEventLoop
           ) -> tuple[TakeoverQueue, list[tuple[bytes, str]], Callable[..., str]]:
    """A takeover queue watching port 8080 for ``EXPLOIT`` with a flow set up, its verdict
    log, and ``send(client, seq, ack, flags, data)`` giving the verdict."""
    from node.takeover.engine import TakeoverEngine
    from node.takeover.harness import starts_with

    q = TakeoverQueue(TakeoverEngine(), detect=starts_with(b"EXPLOIT"), ports={8080},
                      loop=loop)
    log: list[tuple[bytes, str]] = []

    def send(client: bool, seq: int, ack: int, flags: int, data: bytes = b"") -> str:
        h = _Logged(log, data)
        q._on_packet(_segment(v6, client, seq, ack, flags, data), h)  # type: ignore[arg-type]
        return h.verdict

    assert send(True, 100, 0, SYN) == "accept"
    assert send(False, 500, 101, SYN | ACK) == "accept"
    assert send(True, 101, 501, ACK) == "accept"
    log.clear()
    return q, log, send


@pytest.mark.parametrize("v6", [False, True])
def test_out_of_order_client_segments_wait_and_go_on_in_stream_order(v6: bool) -> None:
    """A client segment past a hole gets no verdict until the hole fills; then the filler
    goes first and the held ones after it by start, the longer first (the server's kernel
    then keeps the bytes the node checked). Past an exploit split by the hole, the held part
    is dropped with the message."""
    loop = asyncio.new_event_loop()
    try:
        q, log, send = _queue(v6, loop)
        assert send(True, 105, 501, ACK, b"bbbb") == ""  # held: 101-104 missing
        assert send(True, 105, 501, ACK, b"bbbbcc") == ""  # a longer resend of it, held too
        assert send(True, 101, 501, ACK, b"aaaa") == "accept"
        assert log == [(b"aaaa", "accept"), (b"bbbbcc", "accept"), (b"bbbb", "accept")]
        assert q.stats["ooo_held"] == q.stats["ooo_released"] == 2
        assert not any(h.packets for h in q.holds.values())
        log.clear()
        assert send(True, 115, 501, ACK, b"OIT now\n") == ""  # 111-114 missing
        send(True, 111, 501, ACK, b"EXPL")  # the whole message matches
        assert (b"OIT now\n", "drop") in log and not q.holds
        assert q.stats["held_dropped"] == 1
        assert q.stats["ipv6_blocked" if v6 else "triggers"] == 1
    finally:
        loop.close()


def test_a_hole_never_filled_has_its_held_segments_dropped_in_time(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The client resends what the node gave up on: a hole still open ``HOLD_TIMEOUT`` after
    its first segment was held is given up, with every segment held past it."""

    from node.takeover import adapter
    from node.takeover.engine import TakeoverEngine

    monkeypatch.setattr(adapter, "HOLD_TIMEOUT", 0.05)
    loop = asyncio.new_event_loop()
    try:
        q = adapter.TakeoverQueue(TakeoverEngine(), ports={8080}, loop=loop)
        hs = [_Verdicts() for _ in range(5)]
        for h, (client, seq, ack, flags, data) in zip(hs[:4], [
                (True, 100, 0, SYN, b""), (False, 500, 101, SYN | ACK, b""),
                (True, 101, 501, ACK, b""), (True, 105, 501, ACK, b"late")], strict=True):
            q._on_packet(_segment(False, client, seq, ack, flags, data), h)  # type: ignore[arg-type]
        assert hs[3].verdict == ""
        loop.run_until_complete(asyncio.sleep(0.03))
        q._on_packet(_segment(False, True, 110, 501, ACK, b"later"), hs[4])  # type: ignore[arg-type]
        assert (hs[3].verdict, hs[4].verdict) == ("", "")
        loop.run_until_complete(asyncio.sleep(0.04))
        assert (hs[3].verdict, hs[4].verdict) == ("drop", "drop")
        assert q.stats["ooo_expired"] == 2 and not q.holds
    finally:
        loop.close()


@pytest.mark.parametrize("v6", [False, True])
def test_other_bytes_sent_again_where_checked_bytes_went_are_dropped(v6: bool) -> None:
    """TCP never sends other bytes for a sequence number again: a resend that differs from
    bytes the node checked and passed (not yet acknowledged by the server, which may have lost
    them) is dropped, else it would reach the server unchecked as a duplicate. The same bytes
    again pass; once the server has acknowledged them nothing is compared."""
    loop = asyncio.new_event_loop()
    try:
        q, _, send = _queue(v6, loop)
        assert send(True, 101, 501, ACK, b"GET /a\n") == "accept"
        assert send(True, 101, 501, ACK, b"EXPLOIT") == "drop"
        assert send(True, 105, 501, ACK, b"/a\n") == "accept"  # a true resend of a part
        assert q.stats["rewrites_dropped"] == 1
        assert send(False, 501, 108, ACK) == "accept"  # the server has them all
        assert send(True, 101, 501, ACK, b"EXPLOI") == "accept"  # old: its kernel drops it
        assert q.stats["rewrites_dropped"] == 1
    finally:
        loop.close()


@pytest.mark.parametrize("v6", [False, True])
def test_held_segments_that_disagree_on_bytes_only_the_checked_ones_go_on(v6: bool) -> None:
    """Two held segments carrying other bytes for the same sequence numbers: at release only
    the one whose bytes the node checked goes on (the stack keeps the first, as Linux does),
    the other is dropped."""
    loop = asyncio.new_event_loop()
    try:
        q, log, send = _queue(v6, loop)
        assert send(True, 105, 501, ACK, b"bbbb") == ""
        assert send(True, 105, 501, ACK, b"XPLO") == ""
        assert send(True, 101, 501, ACK, b"aaaa") == "accept"
        assert log == [(b"aaaa", "accept"), (b"bbbb", "accept"), (b"XPLO", "drop")]
        assert q.stats["rewrites_dropped"] == 1
    finally:
        loop.close()


def test_bytes_resent_after_their_hold_was_given_up_are_checked_anew(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The node gives up a hole (its held segments are dropped): the stack forgets the bytes
    it held past it, so a resend there, whatever it carries, is checked as new bytes (an
    exploit in it is caught), not passed as a duplicate of bytes the server never got."""

    from node.takeover import adapter

    monkeypatch.setattr(adapter, "HOLD_TIMEOUT", 0.02)
    loop = asyncio.new_event_loop()
    try:
        q, log, send = _queue(False, loop)
        assert send(True, 105, 501, ACK, b"late") == ""
        loop.run_until_complete(asyncio.sleep(0.05))
        assert log == [(b"late", "drop")]
        assert send(True, 101, 501, ACK, b"aaaa") == "accept"
        assert send(True, 105, 501, ACK, b"EXPLOIT now\n") == "drop"
        assert q.stats["triggers"] == 1 and q.stats["rewrites_dropped"] == 0
    finally:
        loop.close()


def test_past_its_bounds_a_flows_hold_is_given_up_whole(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One segment more than ``HOLD_PACKETS`` past a hole: all of them are dropped (the client
    resends), none waits alone for a hole the stack no longer remembers."""

    from node.takeover import adapter

    monkeypatch.setattr(adapter, "HOLD_PACKETS", 3)
    loop = asyncio.new_event_loop()
    try:
        q, log, send = _queue(False, loop)
        for i in range(4):
            send(True, 105 + 4 * i, 501, ACK, b"%04d" % i)
        assert [v for _, v in log] == ["drop"] * 4 and not q.holds
        assert q.stats["ooo_dropped"] == 4
        assert send(True, 101, 501, ACK, b"aaaa") == "accept"
        assert send(True, 105, 501, ACK, b"EXPLOIT now\n") == "drop"  # checked anew
        assert q.stats["triggers"] == 1
    finally:
        loop.close()


@given(st.lists(st.one_of(
    st.binary(max_size=120),
    st.builds(lambda b, d: _v6(C6, S6, 40000, 8080, 1, 2, b[0] if b else 0x10, d),
              st.binary(max_size=1), st.binary(max_size=40)),
    st.builds(lambda f, d: build(SRC, DST, 40000, 8080, Segment(1, 2, f, 500, d, 1, 2)),
              st.sampled_from([0x02, 0x10, 0x11, 0x18, 0x04]), st.binary(max_size=40))),
    max_size=20))
def test_any_packet_gets_a_verdict_and_nothing_raises(packets: list[bytes]) -> None:

    from node.takeover.adapter import TakeoverQueue
    from node.takeover.engine import TakeoverEngine
    from node.takeover.harness import starts_with

    loop = asyncio.new_event_loop()
    try:
        q = TakeoverQueue(TakeoverEngine(), detect=starts_with(b"EXPLOIT"), ports={8080},
                          loop=loop)
        handles = []
        for p in packets:
            handles.append(_Verdicts())
            q._on_packet(p, handles[-1])  # type: ignore[arg-type]
        q.close()  # a segment held for its turn gets its verdict at the latest here
        assert all(h.verdict in ("accept", "drop") for h in handles)
    finally:
        loop.close()


def test_the_reader_threads_clock_runs_what_is_due_in_order_and_nothing_cancelled() -> None:
    """``QueueAdapter(thread=True)``'s clock, which runs the engine's timers on the reader
    thread: due timers by deadline after the callbacks already ready, a cancelled one never,
    one scheduled by a callback on the next round, a future one not yet."""
    import time

    from node.kernel.nfqueue import ThreadClock

    clock = ThreadClock()
    ran: list[str] = []
    now = time.monotonic()
    clock.call_at(now - 0.001, ran.append, "late")
    clock.call_at(now - 0.002, ran.append, "later")
    clock.call_soon(lambda: clock.call_soon(ran.append, "next round"))
    clock.call_at(now - 0.003, ran.append, "cancelled").cancel()
    clock.call_later(60, ran.append, "future")
    assert clock.delay() == 0.0
    clock.run_due()
    assert ran == ["later", "late"]
    clock.run_due()
    assert ran == ["later", "late", "next round"]
    delay = clock.delay()
    assert delay is not None and 50 < delay <= 60


@pytest.mark.parametrize("v6", [False, True])
def test_a_blocked_message_sent_again_is_checked_again_whatever_became_of_the_block(
        v6: bool) -> None:
    """A match that cannot be taken over is dropped and its flow blocked; its bytes count as
    never delivered, so a client RST past them does not close the flow (the server, still
    waiting for them, would not take it either), and once the block is forgotten (the bound
    on blocked flows) a resend is checked again and dropped again, not passed as a duplicate
    of bytes the server never got."""
    loop = asyncio.new_event_loop()
    try:
        q, _, send = _queue(v6, loop)
        assert send(True, 101, 501, ACK, b"GET /a\n") == "accept"
        if not v6:  # IPv4 blocks a flow whose server it has not heard since the handshake
            q.stack.tcp.table[next(iter(q.stack.tcp.table))].flow.halves[1].next_seq = None
        assert send(True, 108, 501, ACK, b"EXPLOIT now\n") == "drop"
        assert send(True, 108, 501, ACK, b"EXPLOIT now\n") == "drop"  # blocked
        send(True, 120, 501, RST | ACK)
        assert send(True, 108, 501, ACK, b"EXPLOIT now\n") == "drop"
        q.blocked.clear()  # as when MAX_BLOCKED later flows have pushed it out
        assert send(True, 108, 501, ACK, b"EXPLOIT now\n") == "drop"  # checked again
        assert q.stats["ipv6_blocked" if v6 else "unseeded_drops"] == 2
    finally:
        loop.close()


@pytest.mark.parametrize("v6", [False, True])
def test_a_clients_syn_with_data_is_dropped_and_its_plain_resend_goes_on(v6: bool) -> None:
    """TCP Fast Open: bytes in a SYN would reach the server before the stream the node checks
    begins. The SYN is dropped; the client's kernel sends it again without them."""
    loop = asyncio.new_event_loop()
    try:
        from node.takeover.adapter import TakeoverQueue
        from node.takeover.engine import TakeoverEngine

        q = TakeoverQueue(TakeoverEngine(), ports={8080}, loop=loop)
        h = _Verdicts()
        q._on_packet(_segment(v6, True, 100, 0, SYN, b"EXPLOIT"), h)  # type: ignore[arg-type]
        assert h.verdict == "drop" and q.stats["syn_data_dropped"] == 1
        h = _Verdicts()
        q._on_packet(_segment(v6, True, 100, 0, SYN), h)  # type: ignore[arg-type]
        assert h.verdict == "accept"
    finally:
        loop.close()


def test_an_ipv6_packet_the_parser_refuses_is_dropped_not_passed() -> None:
    from node.stack.packet import parse_ipv6
    from node.takeover.adapter import TakeoverQueue
    from node.takeover.engine import TakeoverEngine

    def with_options(n: int) -> bytes:
        tcp = struct.pack("!HHIIBBHHH", 40000, 8080, 1, 1, 5 << 4, ACK, 65535, 0, 0) + b"x"
        ext = b"".join(bytes((60 if i < n - 1 else 6, 0)) + bytes(6) for i in range(n))
        return struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(tcp), 60, 64, C6, S6) + \
            ext + tcp

    assert parse_ipv6(with_options(8)).proto == 6  # the most a packet may carry: parsed
    loop = asyncio.new_event_loop()
    try:
        q = TakeoverQueue(TakeoverEngine(), ports={8080}, loop=loop)
        h = _Verdicts()
        q._on_packet(with_options(9), h)  # type: ignore[arg-type]
        assert h.verdict == "drop" and q.stats["malformed"] == 1
    finally:
        loop.close()


def test_past_the_total_bound_the_flow_holding_most_gives_way(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One client's flows filling the queue's total of held segments cost their own holds,
    not the reordered segments of whoever comes next."""
    from node.takeover import adapter
    from node.takeover.engine import TakeoverEngine

    monkeypatch.setattr(adapter, "HOLD_TOTAL", 4)
    loop = asyncio.new_event_loop()
    try:
        q = adapter.TakeoverQueue(TakeoverEngine(), ports={8080}, loop=loop)

        def send(cport: int, seq: int, flags: int, data: bytes = b"",
                 client: bool = True) -> _Verdicts:
            h = _Verdicts()
            src, dst, sp, dp = (SRC, DST, cport, 8080) if client else (DST, SRC, 8080, cport)
            ack = 501 if client else 101
            q._on_packet(build(src, dst, sp, dp, Segment(seq, ack if flags != SYN else 0, flags,
                                                         65535, data, None, None)), h)  # type: ignore[arg-type]
            return h

        for cport in (40001, 40002):
            send(cport, 100, SYN)
            send(cport, 500, SYN | ACK, client=False)
            send(cport, 101, ACK)
        hog = [send(40001, 105 + 2 * i, ACK, b"h") for i in range(4)]  # holes at 101-104
        assert all(h.verdict == "" for h in hog)
        benign = send(40002, 105, ACK, b"late")  # the fifth held: over the total
        assert [h.verdict for h in hog] == ["drop"] * 4 and benign.verdict == ""
        assert send(40002, 101, ACK, b"aaaa").verdict == "accept" and benign.verdict == "accept"
    finally:
        loop.close()


def test_a_segment_the_stack_refuses_leaves_no_trace_in_the_stream_it_checks() -> None:
    """A chunk checked early and then refused by the stack (PAWS: an old timestamp) never
    reaches the server: it must not sit in the stream history between the real bytes, where
    it would split a pattern the server does receive whole."""
    from node.takeover.adapter import TakeoverQueue
    from node.takeover.engine import TakeoverEngine

    loop = asyncio.new_event_loop()
    try:
        q = TakeoverQueue(TakeoverEngine(), ports={8080}, loop=loop,
                          detect=lambda flow, chunk, stream: "hit" if b"EXPLOIT" in stream
                          else None)

        def send(client: bool, seq: int, ack: int, flags: int, data: bytes,
                 ts: tuple[int, int]) -> str:
            seg = Segment(seq, ack, flags, 65535, data, *ts)
            h = _Verdicts()
            q._on_packet(build(SRC, DST, 40000, 8080, seg) if client else  # type: ignore[arg-type]
                         build(DST, SRC, 8080, 40000, seg), h)
            return h.verdict

        send(True, 100, 0, SYN, b"", (1000, 0))
        send(False, 500, 101, SYN | ACK, b"", (7000, 1000))
        send(True, 101, 501, ACK, b"", (1001, 7000))
        assert send(True, 101, 501, ACK, b"EXPL", (1002, 7000)) == "accept"
        assert send(True, 105, 501, ACK, b"zzzz", (900, 7000)) == "drop"  # PAWS
        assert send(True, 105, 501, ACK, b"OIT now", (1003, 7000)) == "drop"  # caught whole
        assert q.stats["triggers"] == 1
    finally:
        loop.close()


@pytest.mark.parametrize("v6", [False, True])
def test_a_close_the_server_may_not_take_keeps_the_bytes_to_compare(v6: bool) -> None:
    """Bytes the node passed that the server lost: a client RST at the node's next sequence
    number closes the flow here, but the server (still waiting for the lost bytes) answers it
    with a challenge ACK and keeps the connection. Other bytes sent over the lost ones are
    still compared and dropped: what the node checked lives as long as the flow is tracked."""
    loop = asyncio.new_event_loop()
    try:
        q, _, send = _queue(v6, loop)
        assert send(True, 101, 501, ACK, b"GET /a b c\n") == "accept"  # lost past the node
        assert send(True, 101, 501, ACK, b"EXPLOIT now") == "drop"
        assert send(True, 112, 501, RST | ACK) == "accept"
        assert send(True, 101, 501, ACK, b"EXPLOIT now") == "drop"
        assert q.stats["rewrites_dropped"] == 2
    finally:
        loop.close()


def test_unacknowledged_bytes_past_the_tails_reach_are_checked_on_their_own() -> None:
    """More unacknowledged bytes in flight than the tail keeps: a resend over the oldest of
    them cannot be compared, so it is checked on its own (an exploit in it is dropped; the
    true bytes again pass)."""
    from node.takeover.engine import TakeoverEngine
    from node.takeover.harness import starts_with

    loop = asyncio.new_event_loop()
    try:
        q = TakeoverQueue(TakeoverEngine(), detect=starts_with(b"EXPLOIT"), ports={8080},
                          loop=loop, tail_limit=16)

        def send(client: bool, seq: int, ack: int, flags: int, data: bytes = b"") -> str:
            h = _Verdicts()
            q._on_packet(_segment(False, client, seq, ack, flags, data), h)  # type: ignore[arg-type]
            return h.verdict

        send(True, 100, 0, SYN)
        send(False, 500, 101, SYN | ACK)
        send(True, 101, 501, ACK)
        for i in range(3):  # 30 bytes the server has not acknowledged; the tail keeps 16
            assert send(True, 101 + 10 * i, 501, ACK, b"benign %03d" % i) == "accept"
        assert send(True, 101, 501, ACK, b"EXPLOIT!!!") == "drop"
        assert send(True, 101, 501, ACK, b"benign 000") == "accept"
        assert q.stats["rewrites_dropped"] == 1
    finally:
        loop.close()


def test_the_daemons_gate_checks_a_message_again_once_its_failed_takeover_is_forgotten() -> None:
    """``TakeoverGate`` on the stack's own queue: a takeover that fails at the trigger blocks
    the flow, and the message's bytes count as never delivered, so once the block is
    forgotten a resend is flagged again instead of passing as a duplicate."""
    from node.stack.stack import Stack, StackConfig
    from node.takeover.engine import TakeoverEngine, TakeoverGate

    stack = Stack(StackConfig(protected_tcp={8080}, verify_checksums=False))
    gate = TakeoverGate(TakeoverEngine(), stack,  # not started: its takeovers fail
                        lambda flow, e, stream: "scrub" if b"EXPLOIT" in stream else None)

    def send(client: bool, seq: int, ack: int, flags: int, data: bytes = b"") -> bool:
        p = _segment(False, client, seq, ack, flags, data)
        return gate(p, stack.handle(p, 0.0))  # True: dropped

    assert not send(True, 100, 0, SYN)
    assert not send(False, 500, 101, SYN | ACK)
    assert not send(True, 101, 501, ACK)
    assert send(True, 101, 501, ACK, b"EXPLOIT now")
    assert gate.stats["errors"] == 1
    gate.blocked.clear()  # as when MAX_BLOCKED later flows have pushed it out
    assert send(True, 101, 501, ACK, b"EXPLOIT now")
    assert gate.stats["errors"] == 2


def test_closed_flows_are_forgotten_after_their_grace_with_what_they_keep() -> None:
    """The queue's stack expires flows (once a second, on a packet without data): a flow
    closed by a RST is still tracked for its grace (its bytes still compared), then gone."""
    loop = asyncio.new_event_loop()
    try:
        q, _, send = _queue(False, loop)
        clock = [q._time()]
        q._time = lambda: clock[0]
        assert send(True, 101, 501, ACK, b"GET /a\n") == "accept"
        assert send(True, 108, 501, RST | ACK) == "accept"
        assert len(q.stack.tcp.table) == 2  # both directions of the closed flow, in grace
        clock[0] += 11.0  # past the closed state's 10 s
        h = _Verdicts()
        q._on_packet(build(SRC, DST, 40001, 8080, Segment(7, 0, SYN, 65535, b"", None, None)),
                     h)  # type: ignore[arg-type]
        assert h.verdict == "accept"
        assert all(fd.flow.orig[1] == 40001 for fd in q.stack.tcp.table.values())
    finally:
        loop.close()


def test_an_urgent_segment_goes_on_not_urgent_with_a_checksum_that_holds() -> None:
    """A client's urgent byte: the server application (no SO_OOBINLINE) would take it out of
    the stream the node checked. The segment goes on with URG and the urgent pointer cleared
    and its checksum updated: the kernel's full check of the rewritten segment holds."""
    from node.stack.checksum import ones_sum, pseudo_header_sum, verify
    from node.stack.packet import URG, clear_urgent

    pkt = bytearray(build(SRC, DST, 40000, 8080,
                          Segment(101, 501, ACK | URG, 65535, b"EXPLXOIT", None, None)))
    tcp = 20
    pkt[tcp + 18:tcp + 20] = (5).to_bytes(2, "big")  # the urgent pointer: after the "X"
    pkt[tcp + 16:tcp + 18] = b"\0\0"
    pseudo = pseudo_header_sum(SRC, DST, 6, len(pkt) - tcp)
    pkt[tcp + 16:tcp + 18] = (~ones_sum(pkt[tcp:], pseudo) & 0xFFFF).to_bytes(2, "big")
    assert verify(pkt[tcp:], pseudo)
    out = clear_urgent(bytes(pkt), tcp)
    assert not out[tcp + 13] & URG and out[tcp + 18:tcp + 20] == b"\0\0"
    assert out[tcp + 20:] == b"EXPLXOIT" and verify(out[tcp:], pseudo)

    loop = asyncio.new_event_loop()
    try:
        q = _queue(False, loop)[0]
        h = _Verdicts()
        q._on_packet(bytes(pkt), h)  # type: ignore[arg-type]
        assert h.verdict == "accept" and h.rewrite == out  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_a_specific_filter_on_the_takeover_queue_counts_from_the_streams_start() -> None:
    """A benign upload whose second segment holds a specific filter's bytes at the filter's
    offset within that segment is no trigger; the stream that holds them at that offset from
    its start is one (as on the stack's path, ``node.filtering``)."""
    from filters.condition import Filter, Specific
    from filters.userspace import UserspaceFilters

    spec = Filter(b"\x01" * 32, "svc", "tcp", 8080, Specific(172, b"-" * 32))
    first = b"POST /upload HTTP/1.0\r\n\r\n" + b"x" * 300
    loop = asyncio.new_event_loop()
    try:
        for segments, trigger in (
                ([first, b"y" * 172 + b"-" * 40 + b"z" * 100], False),
                ([first[:172] + b"-" * 32 + first[204:], b"y" * 100], True)):
            q, _, send = _queue(False, loop)
            q.detect, q.filters = None, UserspaceFilters([spec])
            seq, verdicts = 101, []
            for data in segments:
                verdicts.append(send(True, seq, 501, ACK, data))
                seq += len(data)
            assert verdicts == (["drop", "drop"] if trigger else ["accept", "accept"])
            assert q.stats["triggers"] == trigger
    finally:
        loop.close()


@pytest.mark.parametrize("v6", [False, True])
def test_a_segment_cut_by_the_queues_copy_range_is_dropped(v6: bool) -> None:
    """A segment longer than what the kernel copies to the queue (a jumbo frame, reassembled
    fragments) cannot be checked past the cut: dropped, not passed as 'not TCP'."""
    from node.kernel.nfqueue import COPY_RANGE

    loop = asyncio.new_event_loop()
    try:
        q, _, send = _queue(v6, loop)
        whole = _segment(v6, True, 101, 501, ACK, b"GET " + b"A" * 6000 + b"EXPLOIT\n")
        for cut in (COPY_RANGE, 100, 60):
            h = _Verdicts()
            q._on_packet(whole[:cut], h)  # type: ignore[arg-type]
            assert h.verdict == "drop", cut
        if not v6:
            assert q.stats["truncated"] == 3
        assert q.stats["not_tcp"] == 0
        assert send(True, 101, 501, ACK, b"GET /a\n") == "accept"  # the flow goes on
    finally:
        loop.close()
