"""The whole takeover without a kernel: a client and a server endpoint talk while the user-level
stack observes them (handshake included); a malicious message triggers the takeover; the seeds
come from the stack's conntrack; the proxy sits in between from then on. Checks what each side
received, in order, with and without loss, under scrub, close and respond."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from node.stack import MessageIn, Stack, StackConfig, TcpOptions
from node.stack.packet import ACK, RST, SYN, ip_bytes, tcp_packet
from node.takeover.policy import (
    Close,
    Policy,
    Respond,
    Scrub,
    Verdict,
    line_framer,
    make_policy,
)
from node.takeover.proxy import Proxy
from node.takeover.seed import StreamTail, seeds
from node.takeover.sim import Chain, Wire, pair
from node.takeover.tcp import Endpoint, Segment, State, seq_add
from node.takeover.wire import build, parse

C, S = ip_bytes("10.77.1.2"), ip_bytes("10.77.2.2")
CP, SP = 40000, 80
MALICIOUS = b"EXPLOIT " + b"A" * 300 + b"\n"


class Setup:
    """A connection observed by a stack, ready to be taken over."""

    def __init__(self, *, shift: int | None = 7, ts: bool = True, isn: tuple[int, int] = (
            1000, 9_000_000), lose_after_node: Callable[[int, Segment], bool] | None = None
                 ) -> None:
        window = 64 * 1024 if shift else 65535
        self.client, self.server = pair(a_isn=isn[0], b_isn=isn[1], shift=shift, ts=ts,
                                        window=window)
        self.stack = Stack(StackConfig(protected_tcp={SP}))
        self.c2s, self.s2c = StreamTail(), StreamTail()
        wopt = {"wscale": shift} if shift is not None else {}
        syn = tcp_packet(C, S, CP, SP, seq=isn[0] - 1, flags=SYN, window=64240,
                         options=TcpOptions(mss=1460, sack_ok=True,
                                            ts=(499, 0) if ts else None, **wopt))
        synack = tcp_packet(S, C, SP, CP, seq=isn[1] - 1, ack=isn[0], flags=SYN | ACK,
                            window=65160, options=TcpOptions(
                                mss=1460, sack_ok=True, ts=(69_999, 499) if ts else None,
                                **wopt))
        for p in (syn, synack):
            assert not any(type(e).__name__ == "Drop" for e in self.stack.handle(p, 0.0))
        first = self.client.poll(0.0)  # nothing to say yet: send the handshake ACK by hand
        assert not first
        raw = window >> (shift or 0)
        ack = tcp_packet(C, S, CP, SP, seq=isn[0], ack=isn[1], flags=ACK, window=raw,
                         options=TcpOptions(ts=(500, 69_999)) if ts else None)
        self.stack.handle(ack, 0.0)
        self.lost_after_node = lose_after_node
        self.wire = Wire(self.client, self.server, tap=self._tap,
                         drop=self._drop if lose_after_node else None)
        self.got_server = bytearray()
        self.got_client = bytearray()

    def _observe(self, d: int, seg: Segment, now: float) -> None:
        pkt = build(C, S, CP, SP, seg) if d == 0 else build(S, C, SP, CP, seg)
        self.stack.handle(pkt, now)
        (self.c2s if d == 0 else self.s2c).add(seg.seq, seg.payload)
        (self.s2c if d == 0 else self.c2s).trim(seg.ack)

    def _tap(self, d: int, seg: Segment, now: float) -> None:
        self._observe(d, seg, now)

    def _drop(self, d: int, seg: Segment) -> bool:
        assert self.lost_after_node is not None
        if self.lost_after_node(d, seg):
            self._observe(d, seg, self.wire.now)  # the node saw it; the link after it lost it
            return True
        return False

    def talk(self, client_bytes: bytes, reply: bytes) -> None:
        """Before takeover: the client sends, the server replies, all acknowledged."""
        self.client.write(client_bytes)
        n = len(self.got_server) + len(client_bytes)
        self.wire.run(lambda: self._read() and len(self.got_server) >= n)
        self.server.write(reply)
        m = len(self.got_client) + len(reply)
        self.wire.run(lambda: self._read() and len(self.got_client) >= m)
        self.wire.run(lambda: self.client.in_flight == 0 and self.server.in_flight == 0)

    def _read(self) -> bool:
        self.got_server += self.server.read()
        self.got_client += self.client.read()
        return True

    def take_over(self, policy: Policy, message: bytes = MALICIOUS, *,
                  tails: bool = True) -> Chain:
        now = self.wire.now + 0.001
        self.client.write(message)
        segs = self.client.poll(now)
        assert len(segs) == 1
        seg = segs[0]
        events = self.stack.handle(build(C, S, CP, SP, seg), now)
        msg = next(e for e in events if isinstance(e, MessageIn))
        assert msg.message.data == message
        flow = self.stack.find(C, CP, S, SP)
        assert flow is not None
        to_client, to_server = seeds(flow, msg.seq, c2s=self.c2s if tails else None,
                                     s2c=self.s2c if tails else None)
        self.proxy = Proxy((C, CP), (S, SP), to_client, to_server, policy, now)
        self.proxy.start(Segment(msg.seq, seg.ack, seg.flags, seg.window, msg.message.data,
                                 seg.tsval, seg.tsecr), now)
        self.chain = Chain(self.client, self.proxy, self.server, now=now)
        # whatever the old wire still carried is delivered through the proxy's faces
        return self.chain

    def run(self, until: Callable[[], bool], **kw: float) -> None:
        self.chain.run(lambda: self._read() and until(), **kw)

    def no_rst(self) -> bool:
        return not any(s.flags & RST for hop in self.chain.sent for s in hop)


def test_scrub_drops_the_message_and_passes_benign_bytes_before_and_after() -> None:
    t = Setup()
    t.talk(b"GET /a benign-1\n", b"ok 1\n")
    t.take_over(Scrub())
    # the client learns nothing: its malicious segment is acknowledged like any other
    first = t.chain.sent
    t.run(lambda: t.client.in_flight == 0)
    assert first[1] and first[1][0].ack == seq_add(t.client.snd_una, 0)
    t.client.write(b"GET /b benign-2\n")
    t.run(lambda: t.got_server.endswith(b"benign-2\n"))
    t.server.write(b"ok 2\n")
    t.run(lambda: t.got_client.endswith(b"ok 2\n"))
    assert bytes(t.got_server) == b"GET /a benign-1\nGET /b benign-2\n"
    assert bytes(t.got_client) == b"ok 1\nok 2\n"
    assert t.proxy.translation == (len(MALICIOUS), 0)
    # clean shutdown through the proxy
    t.client.shutdown()
    t.run(lambda: t.server.eof)
    t.server.shutdown()
    t.run(lambda: t.client.eof)
    t.run(lambda: t.proxy.done and t.client.closed and t.server.closed, max_time=1e4)
    assert t.no_rst()
    assert t.client.stats["retransmits"] == t.server.stats["retransmits"] == 0


def test_sequence_translation_is_visible_in_the_numbers() -> None:
    t = Setup()
    t.talk(b"hello\n", b"hi\n")
    t.take_over(Scrub())
    t.client.write(b"after\n")
    t.run(lambda: t.got_server.endswith(b"after\n"))
    to_server = next(s for s in t.chain.sent[2] if s.payload == b"after\n")
    from_client = next(s for s in t.chain.sent[0] if s.payload == b"after\n")
    assert (from_client.seq - to_server.seq) & 0xFFFFFFFF == len(MALICIOUS)


def test_close_finishes_both_sides_with_fins() -> None:
    t = Setup()
    t.talk(b"GET /a\n", b"ok 1\n")
    t.take_over(Close())
    t.run(lambda: t.client.eof and t.server.eof)
    assert bytes(t.got_server) == b"GET /a\n" and bytes(t.got_client) == b"ok 1\n"
    # the client keeps talking for a moment: its bytes go nowhere, it sees no reset
    t.client.write(b"more")
    t.client.shutdown()
    t.server.shutdown()
    t.run(lambda: t.proxy.done and t.client.closed and t.server.closed, max_time=1e4)
    assert bytes(t.got_server) == b"GET /a\n"
    assert t.no_rst() and not t.client.reset and not t.server.reset


def test_respond_sends_the_reply_then_closes() -> None:
    t = Setup()
    t.talk(b"GET /a\n", b"ok 1\n")
    t.take_over(Respond(reply=b"HTTP/1.0 403 Forbidden\r\n\r\n"))
    t.run(lambda: t.client.eof)
    assert bytes(t.got_client) == b"ok 1\nHTTP/1.0 403 Forbidden\r\n\r\n"
    assert t.proxy.translation == (len(MALICIOUS), 26)
    t.run(lambda: t.server.eof)
    assert bytes(t.got_server) == b"GET /a\n"
    assert t.no_rst()


def test_scrub_with_frames_keeps_benign_lines_of_the_same_segment() -> None:
    t = Setup()
    t.talk(b"A\n", b"a\n")
    matcher = (lambda f: f.startswith(b"EXPLOIT"))  # noqa: E731
    t.take_over(Scrub(matcher, line_framer()), message=b"B\n" + MALICIOUS + b"C\nD")
    t.client.write(b"-tail\nEXPLOIT again\nE\n")
    t.run(lambda: t.got_server.endswith(b"E\n"))
    assert bytes(t.got_server) == b"A\nB\nC\nD-tail\nE\n"


def test_scrub_with_frames_drops_an_unfinished_malicious_frame_to_its_end() -> None:
    p = Scrub(None, line_framer())
    v = p.trigger(b"EXPLOIT part one ")
    assert v.dropped == 17 and not v.forward
    v = p.client(b"part two\nnext\n")
    assert v.forward == b"next\n" and v.dropped == 9


def test_scrub_overlong_frames_are_not_held_forever() -> None:
    p = Scrub(lambda f: False, line_framer(), max_frame=100)
    v = p.trigger(b"x\n")
    v = p.client(b"y" * 150)
    assert v.forward == b"y" * 150


def test_make_policy() -> None:
    assert isinstance(make_policy("scrub"), Scrub)
    assert isinstance(make_policy("close"), Close)
    assert make_policy("respond", reply=b"no").trigger(b"x") == Verdict(
        reply=b"no", close_client=True, close_server=True, dropped=1)
    with pytest.raises(ValueError):
        make_policy("reset")


@pytest.mark.parametrize("shift", [7, 0, None], ids=["wscale7", "wscale0", "no-wscale"])
@pytest.mark.parametrize("ts", [True, False], ids=["ts", "no-ts"])
def test_bulk_both_ways_through_a_taken_over_connection(shift: int | None, ts: bool) -> None:
    t = Setup(shift=shift, ts=ts)
    t.talk(b"hi\n", b"hello\n")
    t.take_over(Scrub())
    rng = random.Random(7)
    up, down = rng.randbytes(400_000), rng.randbytes(300_000)
    todo = [memoryview(up), memoryview(down)]

    def feed() -> bool:
        for ep, i in ((t.client, 0), (t.server, 1)):
            n = min(len(todo[i]), ep.send_space())
            if n:
                ep.write(bytes(todo[i][:n]))
                todo[i] = todo[i][n:]
        return len(t.got_server) >= 3 + len(up) and len(t.got_client) >= 6 + len(down)

    t.run(feed)
    assert bytes(t.got_server) == b"hi\n" + up and bytes(t.got_client) == b"hello\n" + down
    assert t.no_rst()
    # timestamps carried on every proxied segment, exactly when the connection uses them
    assert all((s.tsval is not None) == ts for hop in (1, 2) for s in t.chain.sent[hop])


@pytest.mark.parametrize("seed", range(6))
def test_loss_on_every_hop_after_takeover(seed: int) -> None:
    rng = random.Random(seed)
    t = Setup(isn=(rng.getrandbits(32), rng.getrandbits(32)))
    t.talk(b"GET /a\n", b"ok 1\n")
    t.take_over(Scrub())
    t.chain.drop = lambda hop, s: rng.random() < 0.05
    data = rng.randbytes(150_000)
    t.client.write(data[:100_000])
    t.run(lambda: len(t.got_server) >= 7 + 100_000, max_time=1e4)
    t.server.write(data)
    t.run(lambda: len(t.got_client) >= 5 + len(data), max_time=1e4)
    assert bytes(t.got_server) == b"GET /a\n" + data[:100_000]
    assert bytes(t.got_client) == b"ok 1\n" + data
    assert t.no_rst()
    # no storm: each side retransmits about what was lost on its hops
    lost = len(t.chain.sent[0]) + len(t.chain.sent[3])
    assert t.client.stats["retransmits"] + t.server.stats["retransmits"] < lost * 0.3 + 10


def test_server_data_lost_after_the_node_is_resent_from_the_tail() -> None:
    lost: list[Segment] = []

    def lose(d: int, seg: Segment) -> bool:
        # the server's last reply segment reaches the node, then dies on the client's link
        if d == 1 and seg.payload.startswith(b"LOST") and not lost:
            lost.append(seg)
            return True
        return False

    t = Setup(lose_after_node=lose)
    t.talk(b"GET /a\n", b"ok 1\n")
    t.server.write(b"LOST reply\n")
    t.wire.run(lambda: bool(lost))
    t.take_over(Scrub())
    t.run(lambda: t.got_client.endswith(b"LOST reply\n"), max_time=100)
    assert bytes(t.got_client) == b"ok 1\nLOST reply\n"
    assert t.proxy.a.stats["retransmits"] >= 1 and t.proxy.a.stats["hole_stalls"] == 0


def test_without_tails_the_lost_bytes_are_a_hole_never_invented() -> None:
    lost: list[Segment] = []

    def lose(d: int, seg: Segment) -> bool:
        if d == 1 and seg.payload.startswith(b"LOST") and not lost:
            lost.append(seg)
            return True
        return False

    t = Setup(lose_after_node=lose)
    t.talk(b"GET /a\n", b"ok 1\n")
    t.server.write(b"LOST reply\n")
    t.wire.run(lambda: bool(lost))
    t.take_over(Scrub(), tails=False)
    t.run(lambda: t.proxy.a.stats["hole_stalls"] >= 2, max_time=100)
    assert bytes(t.got_client) == b"ok 1\n"  # nothing made up
    assert all(b"\x00" not in s.payload for s in t.chain.sent[1])


def test_client_reset_finishes_the_server_with_a_fin() -> None:
    t = Setup()
    t.talk(b"GET /a\n", b"ok 1\n")
    t.take_over(Scrub())
    t.run(lambda: t.client.in_flight == 0)
    t.proxy.receive(True, Segment(t.client.snd_nxt, 0, RST, 0), t.chain.now)
    assert t.proxy.a.state == State.CLOSED
    t.run(lambda: t.server.eof)
    assert t.proxy.stats["client_gone"] == 1
    assert not any(s.flags & RST for s in t.chain.sent[2])


def test_server_reset_finishes_the_client_with_a_fin() -> None:
    t = Setup()
    t.talk(b"GET /a\n", b"ok 1\n")
    t.take_over(Scrub())
    t.run(lambda: t.client.in_flight == 0)
    t.proxy.receive(False, Segment(t.server.snd_nxt, 0, RST, 0), t.chain.now)
    t.run(lambda: t.client.eof)
    assert not any(s.flags & RST for s in t.chain.sent[1]) and not t.client.reset


def test_idle_proxy_expires() -> None:
    t = Setup()
    t.talk(b"GET /a\n", b"ok 1\n")
    t.take_over(Scrub())
    t.run(lambda: t.client.in_flight == 0)
    assert not t.proxy.done
    assert t.proxy.packets(t.chain.now + 4000) == [] and t.proxy.done


def test_wire_build_and_parse_round_trip_with_valid_checksums() -> None:
    from node.stack.packet import parse_ip, parse_tcp

    seg = Segment(0xFFFFFFF0, 12345, ACK, 501, b"payload" * 100, 7, 8)
    pkt = build(C, S, CP, SP, seg, ident=9)
    tcp = parse_tcp(parse_ip(pkt, verify=True), verify=True)  # raises on a bad checksum
    assert tcp.seq == seg.seq and tcp.options.ts == (7, 8)
    p = parse(pkt)
    assert p.seg == seg and p.key == C + S + CP.to_bytes(2, "big") + SP.to_bytes(2, "big")
    sacked = Segment(5, 6, ACK, 7, b"", 8, 9, ((100, 200), (300, 400), (500, 600)))
    raw = build(C, S, CP, SP, sacked)
    assert parse_tcp(parse_ip(raw, verify=True), verify=True).options.sack == sacked.sack
    assert parse(raw).seg == sacked
    bare = build(C, S, CP, SP, Segment(1, 2, ACK, 3))
    assert parse_tcp(parse_ip(bare, verify=True), verify=True).header_len == 20
    for n in range(64):  # every checksum value shape, odd lengths included
        raw = build(C, S, CP, SP, Segment(n, n * 7, ACK, n, bytes([n]) * n, n, n))
        parse_tcp(parse_ip(raw, verify=True), verify=True)


def test_seeds_follow_the_observed_state() -> None:
    t = Setup()
    t.talk(b"GET /a\n", b"ok 1\n")
    flow = t.stack.find(C, CP, S, SP)
    assert flow is not None
    c, s = flow.halves
    to_client, to_server = seeds(flow, c.next_seq)
    assert to_client.snd_nxt == s.next_seq and to_client.rcv_nxt == c.next_seq
    assert to_server.snd_nxt == c.next_seq and to_server.rcv_nxt == s.next_seq
    assert to_client.snd_shift == c.shift == 7 and to_client.rcv_shift == s.shift
    assert to_client.ts_val == s.ts_val and to_client.ts_recent == c.ts_val
    assert to_server.ts_val == c.ts_val and to_server.ts_recent == s.ts_val
    assert to_client.mss == to_server.mss == 1448
    e = Endpoint(to_client, 0.0)
    assert e.rcv_adv == s.right_edge


def test_first_ack_matches_what_the_client_facing_endpoint_would_send() -> None:
    from node.takeover.seed import first_ack

    t = Setup()
    t.talk(b"GET /a\n", b"ok 1\n")
    flow = t.stack.find(C, CP, S, SP)
    assert flow is not None
    seq = flow.halves[0].next_seq
    to_client, _ = seeds(flow, seq)
    e = Endpoint(to_client, 0.0)
    e.receive(Segment(seq, to_client.snd_nxt, ACK, 512, b"x" * 10, 600, 70_000), 0.0)
    want = e.poll(0.0)[0]
    pkt, (aseq, ack, window, tsval, tsecr) = first_ack(flow, seq, 10, 600)
    got = Segment(aseq, ack, ACK, window, b"", tsval, tsecr)
    assert (got.seq, got.ack, got.tsval, got.tsecr) == (want.seq, want.ack, want.tsval,
                                                         want.tsecr)
    assert pkt == build(S, C, SP, CP, got)
    e2 = Endpoint(to_client, 0.0)
    e2.receive(Segment(seq, to_client.snd_nxt, ACK, 512, b"x" * 10, 600, 70_000), 0.0)
    e2.sent_ack(got)
    assert e2.poll(0.0) == []  # not sent twice


def test_deferred_server_endpoint_holds_what_it_must_send() -> None:
    t = Setup()
    t.talk(b"GET /a\n", b"ok 1\n")
    flow = t.stack.find(C, CP, S, SP)
    assert flow is not None
    seq = flow.halves[0].next_seq
    a, b = seeds(flow, seq)
    p = Proxy((C, CP), (S, SP), a, b, Close(), 1.0, defer_server=True)
    p.start(Segment(seq, a.snd_nxt, ACK, 512, MALICIOUS, 600, 70_000), 1.0)
    out = p.poll(1.0)
    assert out and all(to_client for to_client, _ in out) and p.b is None
    p.connect_server(1.0)
    out = p.poll(1.0)
    assert any(not to_client and s.flags & 1 for to_client, s in out)  # FIN to the server
