"""Stack and connection tracking with a fake clock: states, both directions' TCP state, windows,
PAWS, RST acceptance, timeouts, bounded table, pickup, UDP, the pool, and fuzz (never raises)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.stack import (
    BufferPool,
    Drop,
    FlowClosed,
    FlowEstablished,
    FlowOpened,
    MessageIn,
    Stack,
    StackConfig,
    TcpState,
    Timeouts,
)
from node.stack.packet import ip_bytes, udp_packet
from node.stack.pool import PoolExhausted
from node.testbed.craft import TcpConversation


def make(verify: bool = True, **kw) -> Stack:
    return Stack(StackConfig(protected_tcp={80}, protected_udp={53}, verify_checksums=verify,
                             **kw))


def opened(stack: Stack, conv: TcpConversation, now: float = 0.0) -> list:
    out = []
    for p in conv.handshake():
        out += stack.handle(p, now)
    return out


def data(events: list) -> bytes:
    return b"".join(e.message.data for e in events if isinstance(e, MessageIn))


@pytest.mark.parametrize("verify", [True, False])
def test_handshake_data_and_fin_close(verify: bool) -> None:
    s, c = make(verify), TcpConversation()
    ev = opened(s, c)
    assert [type(e) for e in ev] == [FlowOpened, FlowEstablished]
    flow = s.flows()[0]
    assert flow.state == TcpState.ESTABLISHED
    a, b = flow.halves
    assert (a.isn, a.mss, a.wscale, a.sack_ok, a.ts_ok) == (1000, 1460, 7, True, True)
    assert (b.isn, b.shift, flow.timestamps, flow.sack_permitted) == (5000, 7, True, True)
    out = s.handle(c.to_server(b"GET / HTTP/1.0\r\n\r\n"), 1.0)
    assert out == [MessageIn(flow.id, 6, 80, out[0].message, 1001)]
    assert out[0].message.connection == flow.id
    s.handle(c.to_client(b"HTTP/1.0 200 OK\r\n"), 1.0)
    assert b.right_edge == (c.c_next + (502 << 7)) & 0xFFFFFFFF
    assert a.next_seq == c.c_next and b.next_seq == c.s_next and a.ack == b.isn + 1
    assert s.handle(c.client_fin(), 2)[:1] == [] or True
    assert flow.state == TcpState.FIN_WAIT
    s.handle(c.server_fin(), 2)
    assert flow.state == TcpState.CLOSING
    assert s.handle(c.ack(), 2) == [FlowClosed(flow.id, "fin")]
    assert flow.state == TcpState.TIME_WAIT
    if not verify:
        assert s.stats["fast"] >= 1


def test_rst_only_at_rcv_nxt() -> None:
    s, c = make(), TcpConversation()
    opened(s, c)
    s.handle(c.to_server(b"abc"), 1)
    assert s.handle(c.client_rst(seq=c.c_next + 100), 1) == []
    assert s.stats["rst_ignored"] == 1
    flow = s.flows()[0]
    assert s.handle(c.client_rst(), 1) == [FlowClosed(flow.id, "rst")]
    assert flow.state == TcpState.CLOSED


def test_paws_and_window_drops() -> None:
    s, c = make(), TcpConversation()
    opened(s, c)
    s.handle(c.to_server(b"a" * 10), 1)
    s.handle(c.to_client(b""), 1)  # the server's window: 502 << 7 from its ACK
    old = s.handle(c.to_server(b"b" * 10, ts=(1, 0), advance=False), 1)
    assert old and isinstance(old[0], Drop) and "PAWS" in old[0].reason
    far = s.handle(c.to_server(b"c", seq=10 + (502 << 7) + 5), 1)
    assert isinstance(far[0], Drop) and "window" in far[0].reason
    assert data(s.handle(c.to_server(b"d" * 5), 1)) == b"d" * 5


def test_an_old_ack_arriving_late_does_not_pull_the_window_back() -> None:
    """The server's ACKs reordered on the way (as the client's kernel also ignores an ACK
    older than the last): data within the newer ACK's window is not dropped as beyond it."""
    s, c = make(), TcpConversation()
    opened(s, c)
    s.handle(c.to_server(b"a" * 1000), 1)
    old_ack = c.to_client(b"", ack=500)  # half of it
    s.handle(c.to_client(b""), 1)  # acknowledges all 1000: the edge 1000 + (502 << 7)
    b = s.flows()[0].halves[1]
    edge = b.right_edge
    s.handle(old_ack, 1)  # the older ACK, late
    s.handle(c.to_client(b"", window=400), 1)  # same ACK, a smaller window: not a shrink either
    assert (b.right_edge, b.ack) == (edge, c.c_next)
    # the last bytes it allows (``seq``: a stream offset)
    last = c.to_server(b"z" * 10, seq=(edge - 10 - c.client_isn - 1) & 0xFFFFFFFF)
    assert not any(isinstance(e, Drop) for e in s.handle(last, 1))


def test_handshake_ack_must_echo_a_synack_timestamp() -> None:
    s, c = make(), TcpConversation()
    s.handle(c.syn(), 0)
    s.handle(c.synack(), 0)
    bad = s.handle(c.to_server(b"", flags=0x10, ts=(500, 123456)), 0)
    assert isinstance(bad[0], Drop)
    assert s.flows()[0].state == TcpState.SYN_RECV
    assert s.handle(c.ack(), 0) == [FlowEstablished(s.flows()[0].id)]


def test_data_before_the_handshake_completes_is_not_a_message() -> None:
    s, c = make(), TcpConversation()
    s.handle(c.syn(), 0)
    s.handle(c.synack(), 0)
    # Without ACK the receiver's request socket drops it; with the right ACK it completes
    # the handshake and its data is delivered (Linux does both).
    assert data(s.handle(c.to_server(b"early", seq=0, flags=0x08, advance=False), 0)) == b""
    assert s.flows()[0].state == TcpState.SYN_RECV
    ev = s.handle(c.to_server(b"early"), 0)
    assert isinstance(ev[0], FlowEstablished) and data(ev) == b"early"


def test_pickup_mid_stream_from_either_side() -> None:
    s, c = make(), TcpConversation()
    c.handshake()
    ev = s.handle(c.to_server(b"hello"), 5)
    assert isinstance(ev[0], FlowOpened) and ev[0].picked_up and data(ev) == b"hello"
    s2, c2 = make(), TcpConversation(sport=40001)
    c2.handshake()
    ev = s2.handle(c2.to_client(b"banner"), 5)
    assert ev[0].dport == 80 and ev[0].sport == 40001  # the client is the originator
    assert data(s2.handle(c2.to_server(b"x"), 5)) == b"x"
    s3 = make(pickup=False)
    assert s3.handle(TcpConversation().to_server(b"x"), 0) == [] and s3.flows() == []


def test_timeouts_and_bounded_table() -> None:
    t = Timeouts(syn=5, established=100, closing=10, closed=1, udp=3)
    s = make(max_flows=3, timeouts=t)
    convs = [TcpConversation(sport=50000 + i) for i in range(3)]
    for c in convs:
        opened(s, c, 0.0)
    assert len(s.tcp) == 3
    ev = opened(s, TcpConversation(sport=50010), 1.0)
    assert FlowClosed(1, "evicted") in ev and len(s.tcp) == 3
    closed = s.expire(500.0)
    assert sorted(e.flow_id for e in closed) == [2, 3, 4]
    assert all(e.reason == "timeout" for e in closed) and len(s.tcp) == 0
    s.handle(udp_packet(ip_bytes("10.77.0.2"), ip_bytes("10.77.0.1"), 1, 9, b"x"), 600)
    assert s.handle(udp_packet(ip_bytes("10.77.0.2"), ip_bytes("10.77.0.1"), 2, 9, b""),
                    604)[-1:] == [FlowClosed(5, "timeout")]


def test_udp_messages_for_protected_ports_only() -> None:
    s = make()
    src, dst = ip_bytes("10.77.0.2"), ip_bytes("10.77.0.1")
    ev = s.handle(udp_packet(src, dst, 1000, 53, b"query"), 0)
    assert isinstance(ev[0], FlowOpened) and ev[1].message.data == b"query"
    assert ev[1].message.connection is None
    assert s.handle(udp_packet(dst, src, 53, 1000, b"answer"), 0) == []
    assert s.handle(udp_packet(src, dst, 1000, 54, b"x"), 0)[-1:] != [MessageIn]


def test_reuse_of_ports_after_close_is_a_new_flow() -> None:
    s, c = make(), TcpConversation()
    opened(s, c)
    s.handle(c.client_rst(), 1)
    ev = opened(s, TcpConversation(client_isn=777), 2)
    assert [type(e) for e in ev] == [FlowOpened, FlowEstablished] and ev[0].flow_id == 2


def test_pool_bounded_and_views() -> None:
    pool = BufferPool(2, 64)
    a, b = pool.acquire(), pool.acquire()
    assert a and b and pool.acquire() is None and pool.exhausted == 1
    with pytest.raises(PoolExhausted):
        pool.acquire_or_raise()
    v = a.fill(b"x" * 100)
    assert len(v) == 64 and v.obj is a.data  # a view of the pool's own buffer, not a copy
    a.release()
    with pytest.raises(ValueError):
        a.release()
    assert pool.free == 1
    c = pool.acquire()
    assert c is a and c.recv_into(lambda mv: mv.__setitem__(slice(0, 3), b"abc") or 3) == b"abc"


# ------------------------------------------------------------------ fuzz: never raises

def _corpus() -> list[bytes]:
    c = TcpConversation()
    out = [*c.handshake(), c.to_server(b"payload" * 9), c.to_client(b"r"), c.client_fin()]
    out.append(udp_packet(ip_bytes("10.77.0.2"), ip_bytes("10.77.0.1"), 1, 53, b"q"))
    return out


@pytest.mark.parametrize("verify", [True, False])
def test_random_mutations_never_raise(verify: bool) -> None:
    rnd = random.Random(7)
    corpus = _corpus()
    s = make(verify)
    for i in range(6000):
        p = bytearray(rnd.choice(corpus))
        for _ in range(rnd.randint(1, 6)):
            op = rnd.random()
            if op < 0.5 and p:
                p[rnd.randrange(len(p))] = rnd.randrange(256)
            elif op < 0.75:
                p = p[: rnd.randrange(len(p) + 1)]
            else:
                p += bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 20)))
        events = s.handle(bytes(p), i * 0.01)
        assert isinstance(events, list)
    assert s.stats["internal_error"] == 0


@given(st.binary(max_size=200), st.floats(0, 1e6))
def test_arbitrary_bytes_never_raise(raw: bytes, now: float) -> None:
    s = make(False)
    for p in (raw, b"\x45" + raw, b"\x60" + raw):
        assert isinstance(s.handle(p, now), list)
    assert s.stats["internal_error"] == 0


def _holes(stack: Stack, src: bytes, sport: int, segments: int) -> int:
    """A connection to 10.77.0.2:80 under a 1 MiB window with a hole at its start, then
    ``segments`` segments of 1,400 bytes past it: how many were refused."""
    from node.stack.packet import ACK, SYN, TcpOptions, tcp_packet

    d = ip_bytes("10.77.0.2")
    stack.handle(tcp_packet(src, d, sport, 80, seq=1000, flags=SYN,
                            options=TcpOptions(wscale=7)), 1.0)
    stack.handle(tcp_packet(d, src, 80, sport, seq=5000, ack=1001, flags=SYN | ACK,
                            window=65535, options=TcpOptions(wscale=7)), 1.0)
    stack.handle(tcp_packet(src, d, sport, 80, seq=1001, ack=5001, flags=ACK), 1.0)
    stack.handle(tcp_packet(d, src, 80, sport, seq=5001, ack=1001, flags=ACK, window=8192),
                 1.0)
    return sum(any(type(e) is Drop for e in stack.handle(tcp_packet(
        src, d, sport, 80, seq=1002 + i * 1400, ack=5001, flags=ACK, payload=b"A" * 1400),
        1.0)) for i in range(segments))


def test_out_of_order_bytes_held_in_all_streams_stay_within_their_bound() -> None:
    """Each stream holds at most max_held_bytes past a hole; many streams together at most
    max_held_total: past it an out-of-order segment is refused (what is held stays: the
    service may have those bytes), and a flow's held bytes leave the count when it closes or
    a user of the stack rewinds it."""
    from node.stack.packet import RST, tcp_packet

    stack = Stack(StackConfig(protected_tcp={80}, verify_checksums=False,
                              max_held_total=1 << 20))
    d = ip_bytes("10.77.0.2")
    refused = 0
    for f in range(40):
        refused += _holes(stack, ip_bytes(f"10.77.1.{f + 1}"), 40000 + f, 150)
        held = sum(x.stream.held_bytes for x in stack.tcp.flows() if x.stream is not None)
        assert held == stack.held_total <= 1 << 20
    assert refused > 0 and stack.stats["reassembly_refused"] == refused
    first = stack.find(ip_bytes("10.77.1.1"), 40000, d, 80)
    assert first is not None and first.stream is not None
    before, holds = stack.held_total, first.stream.held_bytes
    assert holds == 150 * 1400  # the first holder kept all it held
    stack.handle(tcp_packet(ip_bytes("10.77.1.1"), d, 40000, 80, seq=1001, flags=RST), 1.0)
    assert stack.held_total == before - holds
    second = stack.find(ip_bytes("10.77.1.2"), 40001, d, 80)
    assert second is not None and second.stream is not None
    before, holds = stack.held_total, second.stream.held_bytes
    stack.rewind(second, 1001)
    assert holds and stack.held_total == before - holds


def test_a_flood_pushes_out_half_open_and_one_sided_flows_not_established_ones() -> None:
    """Room for new flows is made from the shortest-lived ones first, and half-open flows
    expire on time even behind an established one that is older (one list per timeout)."""
    from node.stack.packet import ACK, SYN, TcpOptions, tcp_packet

    stack = Stack(StackConfig(protected_tcp={80}, verify_checksums=False, max_flows=100))
    c, d = ip_bytes("10.77.6.6"), ip_bytes("10.77.0.2")
    stack.handle(tcp_packet(c, d, 40000, 80, seq=1, flags=SYN, options=TcpOptions()), 1.0)
    stack.handle(tcp_packet(d, c, 80, 40000, seq=9, ack=2, flags=SYN | ACK,
                            options=TcpOptions()), 1.0)
    stack.handle(tcp_packet(c, d, 40000, 80, seq=2, ack=10, flags=ACK), 1.0)
    kept = stack.find(c, 40000, d, 80)
    assert kept is not None and kept.state == TcpState.ESTABLISHED
    for flags in (SYN, ACK):  # SYNs from everywhere, never answered; then bare ACKs
        for i in range(1000):
            stack.handle(tcp_packet(ip_bytes(f"10.77.{1 + i // 250}.{1 + i % 250}"), d, 50000,
                                    80, seq=1, ack=1, flags=flags, options=TcpOptions()), 2.0)
        assert stack.find(c, 40000, d, 80) is kept and len(stack.tcp) == 100
    # The half-open ones time out (30 s) although the older established one does not (1 h).
    closed = stack.expire(40.0)
    assert len(closed) == 99 and len(stack.tcp) == 1 and stack.find(c, 40000, d, 80) is kept


def test_a_fin_before_what_the_receiver_has_ends_nothing() -> None:
    """A bare FIN with an old sequence number is a duplicate the receiver drops: the data
    after it is still the stream's (the detector and the filters see it); data past a FIN the
    stream has reached is refused, as the receiver refuses it."""
    from node.stack.packet import ACK, FIN, SYN, TcpOptions, tcp_packet

    stack = Stack(StackConfig(protected_tcp={80}, verify_checksums=False))
    c, d = ip_bytes("10.77.6.6"), ip_bytes("10.77.0.2")
    stack.handle(tcp_packet(c, d, 40000, 80, seq=1, flags=SYN, options=TcpOptions()), 1.0)
    stack.handle(tcp_packet(d, c, 80, 40000, seq=9, ack=2, flags=SYN | ACK,
                            options=TcpOptions()), 1.0)
    stack.handle(tcp_packet(c, d, 40000, 80, seq=2, ack=10, flags=ACK), 1.0)
    assert data(stack.handle(tcp_packet(c, d, 40000, 80, seq=2, ack=10, flags=ACK,
                                        payload=b"GET "), 1.0)) == b"GET "
    stack.handle(tcp_packet(c, d, 40000, 80, seq=3, ack=10, flags=ACK | FIN), 1.0)  # old
    assert data(stack.handle(tcp_packet(c, d, 40000, 80, seq=6, ack=10, flags=ACK,
                                        payload=b"EXPLOIT"), 1.0)) == b"EXPLOIT"
    stack.handle(tcp_packet(c, d, 40000, 80, seq=13, ack=10, flags=ACK | FIN), 1.0)  # in order
    late = stack.handle(tcp_packet(c, d, 40000, 80, seq=13, ack=10, flags=ACK,
                                   payload=b"MORE"), 1.0)
    assert [type(e) for e in late] == [Drop]


def test_rst_and_fin_as_the_receiver_takes_them() -> None:
    """A FIN far past the receive window ends nothing; after the stream has reached the
    client's FIN, a RST at the FIN or one past it resets (the receiver's rcv_nxt - 1 and
    rcv_nxt), one before it does not."""
    from node.stack.packet import ACK, FIN, RST, SYN, TcpOptions, tcp_packet

    def opened() -> tuple[Stack, bytes, bytes]:
        stack = Stack(StackConfig(protected_tcp={80}, verify_checksums=False))
        c, d = ip_bytes("10.77.6.6"), ip_bytes("10.77.0.2")
        stack.handle(tcp_packet(c, d, 40000, 80, seq=1, flags=SYN, options=TcpOptions()), 1.0)
        stack.handle(tcp_packet(d, c, 80, 40000, seq=9, ack=2, flags=SYN | ACK, window=1000,
                                options=TcpOptions()), 1.0)
        stack.handle(tcp_packet(c, d, 40000, 80, seq=2, ack=10, flags=ACK), 1.0)
        stack.handle(tcp_packet(c, d, 40000, 80, seq=2, ack=10, flags=ACK, payload=b"GET "),
                     1.0)
        return stack, c, d

    stack, c, d = opened()
    stack.handle(tcp_packet(c, d, 40000, 80, seq=1 << 30, ack=10, flags=ACK | FIN), 1.0)
    flow = stack.find(c, 40000, d, 80)
    assert flow is not None and flow.halves[0].fin_seq is None
    assert stack.stats["fin_beyond_window"] == 1
    for rst_at, resets in ((5, False), (6, True), (7, True)):
        stack, c, d = opened()
        stack.handle(tcp_packet(c, d, 40000, 80, seq=6, ack=10, flags=ACK | FIN), 1.0)
        events = stack.handle(tcp_packet(c, d, 40000, 80, seq=rst_at, flags=RST), 1.0)
        assert any(type(e) is FlowClosed for e in events) is resets, rst_at


def test_data_on_a_half_open_flow_is_dropped() -> None:
    """Client data before the handshake completes (the service takes none of it) is no
    message, so nobody would check it: it is dropped, not passed."""
    from node.stack.packet import ACK, SYN, TcpOptions, tcp_packet

    stack = Stack(StackConfig(protected_tcp={80}, verify_checksums=False))
    c, d = ip_bytes("10.77.6.6"), ip_bytes("10.77.0.2")
    stack.handle(tcp_packet(c, d, 40000, 80, seq=1, flags=SYN, options=TcpOptions()), 1.0)
    events = stack.handle(tcp_packet(c, d, 40000, 80, seq=2, ack=10, flags=ACK,
                                     payload=b"EXPLOIT"), 1.0)
    assert [type(e) for e in events] == [Drop]


def test_one_client_cannot_fill_the_held_bytes_bound_for_the_others() -> None:
    """A client's streams together hold at most max_held_per_source past their holes: its
    further out-of-order segments are refused while another client's are still taken."""
    stack = Stack(StackConfig(protected_tcp={80}, verify_checksums=False,
                              max_held_total=4 << 20, max_held_per_source=1 << 20))
    greedy = ip_bytes("10.77.1.1")
    refused = sum(_holes(stack, greedy, 40000 + f, 150) for f in range(10))
    assert refused > 0 and stack.held_total <= 1 << 20
    assert _holes(stack, ip_bytes("10.77.2.2"), 41000, 150) == 0  # another client: all held
