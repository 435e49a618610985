"""The trigger's first ACK from C (``node.takeover._fastack``): byte for byte what
``seed.first_ack`` builds from the same state, sent only for an armed flow's next in-order
chunk that matches a pattern, never for anything else, and never a crash on a hostile message.

C reads the queue's netlink messages with ``MSG_PEEK`` and writes frames to a link socket: here
both are datagram socket pairs, so the unit is exercised without a kernel queue (the namespace
tests run it on real queues)."""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from filters.condition import Field, Filter, General, Overflow, Pin, Specific
from filters.userspace import UserspaceFilters
from node.stack.conntrack import Flow, TcpState
from node.stack.packet import ACK, FIN, RST, SYN, URG
from node.stack.reassembly import Reassembler
from node.takeover import fastack
from node.takeover.harness import starts_with
from node.takeover.seed import first_ack
from node.takeover.tcp import Segment
from node.takeover.wire import build

if not fastack.available():  # built by `pip install -e .` (scripts/setup)
    if os.environ.get("CI"):
        raise RuntimeError("node.takeover._fastack is not built")
    pytest.skip("node.takeover._fastack is not built (pip install -e .)",
                allow_module_level=True)

C, S = bytes([10, 77, 1, 2]), bytes([10, 77, 2, 2])
CP, SP = 40000, 8080
PEER_MAC, OUR_MAC = bytes.fromhex("02000000aa01"), bytes.fromhex("02000000bb02")
IFINDEX = 3
MAX_STREAM = 64 * 1024


def _attr(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def nfq_message(packet: bytes, *, packet_id: int = 7, indev: int = IFINDEX,
                mac: bytes | None = PEER_MAC, kind: int = 0x0300) -> bytes:
    """An nfnetlink_queue packet message as the kernel sends it."""
    attrs = _attr(1, struct.pack("!IHB", packet_id, 0x0800, 2)) + \
        _attr(5, struct.pack("!I", indev))
    if mac is not None:
        attrs += _attr(9, struct.pack("!HH8s", len(mac), 0, mac))
    body = struct.pack("!BBH", 2, 0, 0) + attrs + _attr(10, packet)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


class Rig:
    """A FastAck whose queue socket and link socket are socket pairs."""

    def __init__(self, detect: object = None, filters: UserspaceFilters | None = None) -> None:
        self.queue, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.link, self.wire = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.wire.setblocking(False)
        self.fast = fastack.FastAck({IFINDEX: (self.link.fileno(), OUR_MAC)}, MAX_STREAM)
        self.fast.watch(detect, filters)

    def feed(self, message: bytes) -> tuple[fastack.Peeked | None, bytes | None]:
        """C's answer to one message and the frame it sent, if any; the message must still be
        in the queue socket afterwards (the binding reads it next)."""
        self.kernel.send(message)
        got = self.fast.wait(self.queue.fileno(), False)
        try:
            frame: bytes | None = self.wire.recv(256)
        except BlockingIOError:
            frame = None
        assert self.queue.recv(1 << 17) == message
        return got, frame

    def close(self) -> None:
        for s in (self.queue, self.kernel, self.link, self.wire):
            s.close()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig(starts_with(b"EXPLOIT"))
    yield r
    r.close()


def flow_at(cseq: int, sseq: int, *, window: int = 502, ts: tuple[int, int] | None = None,
            pos: int = 0, server_fin: bool = False, flow_id: int = 1) -> Flow:
    """A flow whose client's next byte is ``cseq`` and server's ``sseq``."""
    flow = Flow(flow_id, 6, (C, CP), (S, SP), 0.0)
    flow.state = TcpState.ESTABLISHED
    c, s = flow.halves
    flow.stream = Reassembler(cseq)
    c.next_seq, c.ack, s.next_seq, s.window = cseq, sseq, sseq, window
    if server_fin:
        s.fin_seq = sseq
    if ts is not None:
        c.ts_val, s.ts_val = ts
    return flow


def client_data(seq: int, ack: int, data: bytes, *, flags: int = ACK,
                tsval: int | None = None) -> bytes:
    return build(C, S, CP, SP, Segment(seq, ack, flags, 501, data, tsval,
                                       None if tsval is None else 9))


@settings(max_examples=300)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 65535),
       st.one_of(st.none(), st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))),
       st.booleans(), st.integers(-2**31 + 1, 2**31 - 1),
       st.one_of(st.none(), st.integers(0, 2**32 - 1)), st.binary(max_size=40))
def test_the_ack_is_first_acks_byte_for_byte(cseq: int, sseq: int, window: int,
                                             ts: tuple[int, int] | None, server_fin: bool,
                                             ahead: int, tsval: int | None,
                                             rest: bytes) -> None:
    rig = Rig(starts_with(b"EXPLOIT"))
    try:
        flow = flow_at(cseq, sseq, window=window, ts=ts, server_fin=server_fin)
        rig.fast.arm(flow, 0)
        cack = (sseq + ahead) % 2**32  # the client's ACK may be ahead of the server's data
        data = b"EXPLOIT" + rest
        got, frame = rig.feed(nfq_message(client_data(cseq, cack, data, tsval=tsval)))
        pkt, fields = first_ack(flow, cseq, len(data), tsval, cack)
        assert frame == PEER_MAC + OUR_MAC + b"\x08\x00" + pkt
        assert got is not None and got[0] == 7 and rig.fast.fields(got) == fields
        assert rig.fast.origin(got) == "match"
    finally:
        rig.close()


def test_only_the_armed_flows_next_chunk_that_matches_is_answered(rig: Rig) -> None:
    flow = flow_at(1000, 5000)
    exploit = b"EXPLOIT " + b"A" * 100
    assert rig.feed(nfq_message(client_data(1000, 5000, exploit))) == (None, None)  # not armed
    rig.fast.arm(flow, 0)
    assert rig.fast.responder.armed == 1
    for pkt in [
        client_data(1000, 5000, b"GET / HTTP/1.0\r\n"),  # no match
        client_data(999, 5000, b"x" + exploit),  # not the next chunk
        client_data(1001, 5000, exploit),
        *(client_data(1000, 5000, exploit, flags=ACK | f) for f in (SYN, RST, FIN, URG)),
        client_data(1000, 5000, exploit, flags=0),  # no ACK
        client_data(1000, 5000, b"EXPLOI"),  # shorter than the prefix
        build(S, C, SP, CP, Segment(5000, 1000, ACK, 501, exploit)),  # the server's way
    ]:
        assert rig.feed(nfq_message(pkt)) == (None, None)
    good = client_data(1000, 5000, exploit)
    frag = bytearray(good)
    frag[6] |= 0x20  # more fragments
    for msg in [nfq_message(good, mac=None), nfq_message(good, indev=IFINDEX + 1),
                nfq_message(good, mac=b"\x01" * 8), nfq_message(good, kind=0x0301),
                nfq_message(bytes(frag)), nfq_message(good + b"\0\0")]:  # longer than its IP
        assert rig.feed(msg) == (None, None)
    got, frame = rig.feed(nfq_message(good, packet_id=99))
    assert got is not None and got[0] == 99 and frame is not None
    assert rig.fast.responder.answered == 1
    rig.fast.disarm(flow.id)
    assert rig.feed(nfq_message(good)) == (None, None)
    assert rig.fast.responder.armed == 0


def test_what_python_would_not_answer_early_is_not_armed(rig: Rig) -> None:
    good = nfq_message(client_data(1000, 5000, b"EXPLOIT"))
    blocked = flow_at(1000, 5000)
    rig.fast.arm(blocked, None)
    held = flow_at(1000, 5000)
    assert held.stream is not None
    held.stream.held.append((1010, 1020, b"x" * 10))
    silent = flow_at(1000, 5000)
    silent.halves[1].next_seq = None
    taken = flow_at(1000, 5000)
    for flow, owned in [(blocked, None), (held, None), (silent, None),
                        (taken, {fastack.client_key(taken): object()})]:
        rig.fast.arm(flow_at(1000, 5000), 0)  # armed, then the state that disarms it
        rig.fast.arm(flow, None if flow is blocked else 0, owned)
        assert rig.fast.responder.armed == 0
        assert rig.feed(good) == (None, None)
    v6 = Flow(2, 6, (b"\xfd" + b"\0" * 15, CP), (b"\xfd" + b"\0" * 14 + b"\1", SP), 0.0)
    v6.stream = Reassembler(1)
    rig.fast.arm(v6, 0)
    assert rig.fast.responder.armed == 0


def test_specific_filters_are_checked_where_they_lie_wholly_in_the_chunk() -> None:
    value = b"\x90" * 8 + b"\xde\xad\xbe\xef"
    f = Filter(b"\1" * 32, "httpd", "tcp", SP, Specific(20, value))
    other_port = Filter(b"\1" * 32, "httpd", "tcp", SP + 1, Specific(0, b"GET"))
    rig = Rig(None, UserspaceFilters([f, other_port]))
    try:
        assert list(rig.fast.origins.values()) == [f, other_port]
        flow = flow_at(1000, 5000)
        chunk = b"x" * 4 + value + b"tail"  # at stream offset 16
        rig.fast.arm(flow, 16)
        got, frame = rig.feed(nfq_message(client_data(1000, 5000, chunk)))
        assert got is not None and rig.fast.origin(got) is f and frame is not None
        # At offset 20 only: elsewhere in the chunk, split across chunks, or past the stream
        # that the Python check keeps, it is the Python check's (which decides the same).
        for pos, data in [(20, chunk), (22, value[2:] + b"tail"), (MAX_STREAM, value)]:
            rig.fast.arm(flow, pos)
            assert rig.feed(nfq_message(client_data(1000, 5000, data))) == (None, None)
        rig.fast.arm(flow, 0)
        assert rig.feed(nfq_message(client_data(1000, 5000, b"GET /"))) == (None, None)
    finally:
        rig.close()


def test_patterns_follow_the_filters_at_once() -> None:
    """A filter added or removed changes C's patterns before the call returns (a removed one
    never answers again); with none left a flow is disarmed at its next packet; what C cannot
    take (a general filter, a value too long) stays with the Python check."""
    filters = UserspaceFilters()
    rig = Rig(None, filters)
    try:
        flow = flow_at(1000, 5000)
        rig.fast.arm(flow, 0)
        assert rig.fast.responder.armed == 0  # nothing to check: nothing armed
        f = Filter(b"\1" * 32, "httpd", "tcp", SP, Specific(0, b"EVIL"))
        filters.add(f)
        rig.fast.arm(flow, 0)
        got, _ = rig.feed(nfq_message(client_data(1000, 5000, b"EVIL!")))
        assert got is not None and rig.fast.origin(got) is f
        filters.remove(f.filter_id)
        assert not rig.fast.origins  # the flow stays armed until its next packet, unanswered
        assert rig.feed(nfq_message(client_data(1000, 5000, b"EVIL!"))) == (None, None)
        rig.fast.arm(flow, 0)
        assert rig.fast.responder.armed == 0
        assert rig.fast.origin(got) == "a removed fastack pattern"
        general = General((Pin(0, 0x45),), Overflow("terminated", Field(1), 10, (0x0A,)))
        for cond in (Specific(0, b"A" * 65536), general):
            filters.add(Filter(b"\1" * 32, "httpd", "tcp", SP, cond))
        assert not rig.fast.origins
        rig.fast.unwatch(filters)
        filters.add(f)
        assert not rig.fast.origins
    finally:
        rig.close()


def test_many_flows_come_and_go(rig: Rig) -> None:
    flows = [flow_at(1000 + i, 5000, flow_id=i) for i in range(2000)]
    for i, f in enumerate(flows):
        f.orig = (C, 10000 + i)
        rig.fast.arm(f, 0)
    for f in flows[::2]:
        rig.fast.disarm(f.id)
    assert rig.fast.responder.armed == 1000
    for i in (0, 1, 2, 3, 1998, 1999):
        pkt = build(C, S, 10000 + i, SP, Segment(1000 + i, 5000, ACK, 501, b"EXPLOIT"))
        got, _ = rig.feed(nfq_message(pkt))
        assert (got is not None) == bool(i % 2)


@settings(max_examples=300)
@given(st.binary(max_size=300), st.integers(0, 400))
def test_hostile_messages_are_left_alone(junk: bytes, cut: int) -> None:
    """Random bytes, and a real trigger's message cut anywhere or with junk for attributes:
    never answered wrongly, never a crash, and the message stays for the binding."""
    rig = Rig(starts_with(b"EXPLOIT"))
    try:
        rig.fast.arm(flow_at(1000, 5000), 0)
        pkt = client_data(1000, 5000, b"EXPLOIT")
        good = nfq_message(pkt)
        whole = len(good) - (-len(pkt) % 4)  # the attribute's padding is not read
        for msg in (junk, good[:cut], good[:20] + junk, good[:cut] + junk):
            if not msg:
                continue
            got, frame = rig.feed(msg)
            assert got is None or msg[:whole] == good[:whole]
            assert (frame is None) == (got is None)
    finally:
        rig.close()


def test_wait_blocks_as_the_socket_does_and_reports_errors(rig: Rig) -> None:
    rig.queue.settimeout(0.05)  # SO_RCVTIMEO: the reader's deadline
    assert rig.fast.wait(rig.queue.fileno(), True) is None
    assert rig.fast.wait(rig.queue.fileno(), False) is None
    fd = os.dup(rig.queue.fileno())
    os.close(fd)
    with pytest.raises(OSError):
        rig.fast.wait(fd, False)


class _Handle:
    indev = 0
    source_mac = None

    def __init__(self, peeked: fastack.Peeked | None = None) -> None:
        self.peeked = peeked
        self.verdict = ""

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


@pytest.mark.parametrize("still_matches", [True, False])
def test_a_flow_c_answered_is_taken_over_without_a_second_ack(rig: Rig,
                                                              still_matches: bool) -> None:
    """Python is told the ACK is out: the engine sends none of its own, and the flow is taken
    over even when Python's check no longer matches (a filter removed meanwhile: the client
    was answered, so its bytes are the node's)."""
    import asyncio

    from node.takeover.adapter import TakeoverQueue
    from node.takeover.engine import TakeoverEngine

    loop = asyncio.new_event_loop()
    try:
        engine = TakeoverEngine()

        def answer(*args: object) -> None:
            raise AssertionError("the engine answered the trigger again")

        engine.answer = answer  # type: ignore[method-assign]
        q = TakeoverQueue(engine, detect=starts_with(b"EXPLOIT") if still_matches else None,
                          ports={SP}, loop=loop)
        q.fast = rig.fast
        rig.fast.origins = {0: "the filter C matched"}
        for client, seq, ack, flags in [(True, 100, 0, SYN), (False, 500, 101, SYN | ACK),
                                        (True, 101, 501, ACK)]:
            src, dst, sp, dp = (C, S, CP, SP) if client else (S, C, SP, CP)
            q._on_packet(build(src, dst, sp, dp, Segment(seq, ack, flags, 501)),  # type: ignore[arg-type]
                         _Handle())
        flow = q.stack.tcp.table[C + S + struct.pack("!HH", CP, SP)].flow
        _, fields = first_ack(flow, 101, 8, None, 501)
        h = _Handle((5, 0, *fields))  # C's answer, with its pattern id
        q._on_packet(client_data(101, 501, b"EXPLOIT!"), h)  # type: ignore[arg-type]
        assert h.verdict == "drop" and q.stats["triggers"] == 1
        assert engine.stats["sent_fast"] == 1
        assert q.triggers[-1].hit == ("match" if still_matches else "the filter C matched")
        assert q.stats["fast_unconfirmed"] == (0 if still_matches else 1)
        proxy = engine.proxies[C + S + struct.pack("!HH", CP, SP)]
        assert proxy.a.snd_nxt == fields[0]  # the client-facing endpoint goes on from it
    finally:
        loop.close()


def _watched_queue(rig: Rig) -> tuple[Any, Callable[..., _Handle]]:
    """A takeover queue (on no kernel queue) with ``rig``'s FastAck, and ``send(client, cport,
    seq, ack, flags, data, peeked=None)`` through its fast path, giving the handle back."""
    import asyncio

    from node.takeover.adapter import TakeoverQueue
    from node.takeover.engine import TakeoverEngine

    q = TakeoverQueue(TakeoverEngine(), detect=starts_with(b"EXPLOIT"), ports={SP},
                      loop=asyncio.new_event_loop())
    q.fast = rig.fast

    def send(client: bool, cport: int, seq: int, ack: int, flags: int, data: bytes = b"",
             peeked: fastack.Peeked | None = None) -> _Handle:
        src, dst, sp, dp = (C, S, cport, SP) if client else (S, C, SP, cport)
        h = _Handle(peeked)
        q._on_packet_fast(build(src, dst, sp, dp, Segment(seq, ack, flags, 501, data)),
                          h)  # type: ignore[arg-type]
        return h

    return q, send


def _open(send: Callable[..., _Handle], cport: int) -> None:
    send(True, cport, 100, 0, SYN)
    send(False, cport, 500, 101, SYN | ACK)
    send(True, cport, 101, 501, ACK)
    send(True, cport, 101, 501, ACK, b"GET /\n")
    send(False, cport, 501, 107, ACK)


def test_closed_and_forgotten_flows_do_not_stay_armed(rig: Rig,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that ends (FIN both ways, or a RST) is disarmed for good; one that the
    stack forgets without an event is disarmed by the once-a-second sweep; a new connection on
    the same ports keeps its own arming."""
    q, send = _watched_queue(rig)
    for cport in range(41000, 41040):
        _open(send, cport)
        assert rig.fast.responder.armed == 1
        if cport % 2:
            send(True, cport, 107, 501, ACK | FIN)
            send(False, cport, 501, 108, ACK | FIN)
            send(True, cport, 108, 502, ACK)
        else:
            send(True, cport, 107, 501, RST)
        assert rig.fast.responder.armed == 0, cport
    _open(send, 42000)
    key = C + S + struct.pack("!HH", 42000, SP)
    del q.stack.tcp.table[key]  # gone without an event (as an evicted flow)
    monkeypatch.setattr(fastack, "SWEEP", 2)  # a sweep looks at this many, oldest first
    _open(send, 42001)
    _open(send, 42002)
    for _ in range(2):
        q._next_expiry = 0.0
        send(True, 43000, 100, 0, SYN)  # a packet without data runs the expiry
    assert rig.fast.responder.armed == 2 and len(rig.fast._keys) == 2
    old, new = flow_at(1000, 5000, flow_id=1), flow_at(2000, 6000, flow_id=2)
    rig.fast.arm(old, 0)
    rig.fast.arm(new, 0)  # the same ports
    rig.fast.disarm(old.id)
    assert rig.fast.responder.armed == 3  # 42001, 42002 and the new one
    assert rig.feed(nfq_message(client_data(2000, 6000, b"EXPLOIT")))[0] is not None


def test_a_flow_taken_over_is_disarmed(rig: Rig) -> None:
    q, send = _watched_queue(rig)
    _open(send, 41000)
    assert rig.fast.responder.armed == 1
    assert send(True, 41000, 107, 501, ACK, b"EXPLOIT!").verdict == "drop"
    assert q.stats["triggers"] == 1 and rig.fast.responder.armed == 0


def test_an_answer_the_python_path_did_not_take_is_counted(rig: Rig) -> None:
    """Two readers raced (only a client sending other bytes at one sequence number can make
    them): C answered a packet that Python then found to be a resend over checked bytes."""
    q, send = _watched_queue(rig)
    _open(send, 41000)
    h = send(True, 41000, 101, 501, ACK, b"EXPLOIT!", peeked=(9, 0, 501, 109, 501, None, None))
    assert q.stats["fast_ignored"] == 1 and q.stats["triggers"] == 0
    assert h.verdict == "accept"  # bytes the server has acknowledged: a plain duplicate


def test_answers_go_out_after_the_callers_link_socket_is_closed(rig: Rig) -> None:
    """C keeps its own descriptor: a link socket closed by its owner (the engine, at close)
    never leaves C sending to whatever reuses the number."""
    rig.fast.arm(flow_at(1000, 5000), 0)
    rig.link.close()
    got, frame = rig.feed(nfq_message(client_data(1000, 5000, b"EXPLOIT")))
    assert got is not None and frame is not None


def test_nothing_is_answered_after_close(rig: Rig) -> None:
    rig.fast.arm(flow_at(1000, 5000), 0)
    rig.fast.responder.close()  # the queue's close: C's copies of the link sockets go
    assert rig.feed(nfq_message(client_data(1000, 5000, b"EXPLOIT"))) == (None, None)
    with pytest.raises(RuntimeError):
        rig.fast.responder.add_link(IFINDEX, rig.link.fileno(), OUR_MAC)  # waited already
