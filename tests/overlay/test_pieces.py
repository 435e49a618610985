"""Unit tests of the overlay's small pieces: wire formats, msgpack subset, token buckets,
seen-cache, signed hello, neighbour cache, RPC schemas."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from collections.abc import Callable

import pytest
import umsgpack
from hypothesis import given
from hypothesis import strategies as st

from overlay import hello, mpack, neighbours, wire
from overlay.dht import Peer, PeerBook, valid_node_list
from overlay.limits import KeyedBuckets, Rate, TokenBucket
from overlay.seen import SeenCache
from sca.keys import NodeKey

# --- wire -----------------------------------------------------------------------------------


def test_wire_roundtrip() -> None:
    aid = bytes(range(32))
    masks = ((bytes(range(20)), 1 << 159 | 5), (b"\xff" * 20, 0))
    for msg in (wire.Announce(aid, 0), wire.Announce(aid, 160, 255, 1),
                wire.Announce(aid, 7, 3, 1, (1 << 160) - 1, masks),
                wire.Announce(aid, 1, token=b"12345678"),
                wire.Ack(aid, wire.AckStatus.CANNOT_VERIFY), wire.Ack(aid, 0, b"\xff" * 8),
                wire.IHave(()),
                wire.IHave((aid,) * 16, True)):
        assert wire.decode(wire.encode(msg)) == msg
    assert len(wire.encode(wire.Announce(aid, 3))) == wire.ANNOUNCE_LEN
    assert len(wire.encode(wire.Announce(aid, 3, refs=masks))) == wire.ANNOUNCE_LEN + 80
    for bad in (wire.Announce(aid, 3, uncovered=1 << 160), wire.Announce(aid, 3, refs=(
            (bytes(19), 1),)), wire.Announce(aid, 3, refs=masks * 3),
            wire.Announce(aid, 3, token=b"short"), wire.Ack(aid, 0, b"long" * 3)):
        with pytest.raises(wire.WireError):
            wire.encode(bad)
    assert wire.decode_fetch_request(wire.encode_fetch_request(aid, 7400)) == (aid, 7400)
    # One announcement's encoding with other limits and tokens: everything else as it was.
    ann = wire.Announce(aid, 7, 3, 1, 5, masks, b"body", b"token..."[:8])
    for limit in (0, 8, 160):
        assert wire.decode(wire.with_limit(wire.encode(ann), limit)) == dataclasses.replace(
            ann, limit=limit)
    assert wire.decode(wire.with_token(wire.encode(ann), b"\x01" * 8)) == dataclasses.replace(
        ann, token=b"\x01" * 8)
    with pytest.raises(wire.WireError):
        wire.with_limit(wire.encode(ann), 161)
    with pytest.raises(wire.WireError):
        wire.with_token(wire.encode(ann), b"\x01" * 9)


def test_a_body_rides_in_an_announcement_only_within_a_datagram() -> None:
    aid = bytes(range(32))
    masks = ((bytes(range(20)), 5),) * 4
    room = wire.MAX_DATAGRAM - wire.ANNOUNCE_LEN - 2
    for refs, n in (((), 1), ((), room), (masks, room - 160)):
        msg = wire.Announce(aid, 3, 1, 0, 9, refs, b"b" * n)
        data = wire.encode(msg)
        assert wire.decode(data) == msg and len(data) <= wire.MAX_DATAGRAM
        assert wire.fits(n, len(refs))
        assert wire.decode(wire.with_limit(data, 7)) == dataclasses.replace(msg, limit=7)
        if n > 1:  # the most that fits
            assert not wire.fits(n + 1, len(refs))
            with pytest.raises(wire.WireError):
                wire.encode(dataclasses.replace(msg, body=b"b" * (n + 1)))
    head = wire.encode(wire.Announce(aid, 3))
    for tail in (b"\x00", b"\x00\x00", b"\x00\x02x", b"\x00\x01xy",
                 (room + 1).to_bytes(2, "big") + bytes(room + 1)):
        with pytest.raises(wire.WireError):
            wire.decode(head + tail)


V = bytes((wire.VERSION,))


@pytest.mark.parametrize("data", [
    b"", b"\x10", b"\x10\x09" + bytes(64), b"\x10" + V + bytes(63), b"\x10" + V + bytes(65),
    b"\x10" + V + bytes(40) + b"\xa1\x00\x00" + bytes(21),
    b"\x10" + V + bytes(40) + b"\x00\x00\x09" + bytes(21),
    b"\x10" + V + bytes(63) + b"\x01",  # one older mask announced, none there
    b"\x10" + V + bytes(63) + b"\x05" + bytes(200),  # more older masks than allowed
    b"\x11" + V + bytes(40) + b"\x09", b"\x11" + V + bytes(32) + b"\x00",  # no token
    b"\x12" + V + b"\x00\x11" + bytes(32 * 17),
    b"\x12" + V + b"\x00\x02" + bytes(32), b"\x12" + V + b"\x80\x00", b"\x13" + V,
])
def test_wire_refuses(data: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.decode(data)


@given(st.binary(max_size=600))
def test_wire_never_raises_other_errors(data: bytes) -> None:
    with contextlib.suppress(wire.WireError):
        wire.decode(data)


def test_fetch_reply_head() -> None:
    assert wire.decode_fetch_reply_head(wire.encode_fetch_reply(None), 100) is None
    assert wire.decode_fetch_reply_head(wire.encode_fetch_reply(b"x" * 10)[:5], 100) == 10
    with pytest.raises(wire.WireError):
        wire.decode_fetch_reply_head(wire.encode_fetch_reply(b"x" * 101)[:5], 100)
    with pytest.raises(wire.WireError):
        wire.decode_fetch_reply_head(b"\x07\x00\x00\x00\x01", 100)
    with pytest.raises(wire.WireError):
        wire.decode_fetch_request(b"HWX" + bytes(35))


# --- msgpack subset -------------------------------------------------------------------------

_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=300)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=20), max_leaves=40)


@given(_values)
def test_mpack_matches_umsgpack(value: object) -> None:
    try:
        ours = mpack.packb(value)
    except mpack.MpackError:  # deeper than the RPCs ever go
        return
    assert ours == umsgpack.packb(value)
    assert mpack.unpackb(ours) == umsgpack.unpackb(ours)


@given(st.binary(max_size=200))
def test_mpack_hostile_input_only_mpack_error(data: bytes) -> None:
    with contextlib.suppress(mpack.MpackError):
        mpack.unpackb(data)


@pytest.mark.parametrize("data", [
    b"\x91" * 10 + b"\xc0",  # too deep
    b"\xdd\xff\xff\xff\xff",  # a 4-billion-item array in 5 bytes
    b"\xc6\xff\xff\xff\xff",  # a 4 GB byte string
    b"\xca\x00\x00\x00\x00",  # float
    b"\x80",  # map
    b"\xd4\x01\x00",  # ext
    b"\xa2\xff\xfe",  # bad UTF-8
    b"\xc0\xc0",  # trailing bytes
])
def test_mpack_refuses(data: bytes) -> None:
    with pytest.raises(mpack.MpackError):
        mpack.unpackb(data)


# --- limits and seen-cache ------------------------------------------------------------------


def test_token_bucket() -> None:
    b = TokenBucket(Rate(10, 5), 0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.take(0.1)  # one token back after 0.1 s
    assert not b.take(0.1)
    b.charge(0.1, 100)
    assert not b.take(1.0)  # in debt
    assert b.take(10.0)


def test_keyed_buckets_bounded() -> None:
    kb = KeyedBuckets(Rate(1, 1), max_keys=10)
    for i in range(100):
        assert kb.take(f"ip{i}", 0.0)
    assert len(kb) == 10
    assert not kb.take("ip99", 0.0)
    assert kb.dropped == 1


def test_seen_cache_ttl_bound_and_bodies() -> None:
    c: SeenCache[str] = SeenCache(ttl=10, max_entries=3, max_body_bytes=10)
    c.put(b"a", "A", 0.0, body=b"12345")
    c.put(b"b", "B", 1.0, body=b"12345")
    c.put(b"c", "C", 2.0, body=b"12345")  # over the body budget: a's body goes
    assert c.get(b"a", 2.0) == "A" and c.body(b"a", 2.0) is None
    assert c.body(b"c", 2.0) == b"12345"
    c.put(b"d", "D", 3.0)
    assert b"a" not in c and len(c) == 3  # oldest out
    assert c.get(b"b", 11.5) is None  # expired
    assert c.recent(5.0, window=3.5, limit=10) == [b"d", b"c"]


# --- hello ----------------------------------------------------------------------------------


def test_hello_checks() -> None:
    key = NodeKey.generate()
    book = hello.NonceBook()
    nonce = book.issue(0.0)
    h = hello.make_hello(key, "127.0.0.5", 7400, nonce, hello.FLAG_SUPER_PEER)
    wire_form = hello.parse_hello(h.wire())
    assert hello.check_hello(wire_form, "127.0.0.5", 7400, nonce, key.node_id) == key.node_id
    assert book.redeem(nonce, 1.0) and not book.redeem(nonce, 1.0)  # once only
    with pytest.raises(hello.HelloError):  # another address
        hello.check_hello(wire_form, "127.0.0.6", 7400, nonce)
    with pytest.raises(hello.HelloError):  # another nonce
        hello.check_hello(wire_form, "127.0.0.5", 7400, bytes(16))
    with pytest.raises(hello.HelloError):  # someone else's id
        hello.check_hello(wire_form, "127.0.0.5", 7400, nonce, NodeKey.generate().node_id)
    flipped = hello.Hello(h.public_key, h.signature, 0)  # flags are signed too
    with pytest.raises(hello.HelloError):
        hello.check_hello(flipped, "127.0.0.5", 7400, nonce)
    for bad in ([h.public_key, h.signature], [b"x", h.signature, 0], "hello",
                [h.public_key, h.signature, 256]):
        with pytest.raises(hello.HelloError):
            hello.parse_hello(bad)
    old = book.issue(0.0)
    assert not book.redeem(old, hello.NONCE_TTL + 1)


def test_peer_book_caps_ids_per_ip() -> None:
    book = PeerBook(max_ids_per_ip=2, max_peers=100)
    ids = [bytes([i]) * 20 for i in range(5)]
    assert book.room_for(ids[0], ("10.0.0.1", 1))
    book.add(Peer(ids[0], ("10.0.0.1", 1), 0))
    book.add(Peer(ids[1], ("10.0.0.1", 2), 0))
    assert not book.room_for(ids[2], ("10.0.0.1", 3))
    # A new key at a known address replaces the old one (a restarted node).
    assert book.room_for(ids[3], ("10.0.0.1", 2))
    gone = book.add(Peer(ids[3], ("10.0.0.1", 2), 0))
    assert [p.node_id for p in gone] == [ids[1]]
    assert book.by_addr(("10.0.0.1", 2)).node_id == ids[3]  # type: ignore[union-attr]


# --- RPC schemas ----------------------------------------------------------------------------


def test_valid_node_list() -> None:
    good = [[bytes(20), "127.0.0.1", 7400], [b"\x01" * 20, "::1", 1]]
    assert valid_node_list(good, 20) == [tuple(x) for x in good]
    for bad in (None, {}, "x", [[bytes(19), "127.0.0.1", 1]], [[bytes(20), "localhost", 1]],
                [[bytes(20), "127.1", 1]], [[bytes(20), "127.0.0.1", 0]],
                [[bytes(20), "127.0.0.1", 70000]], [[bytes(20), "127.0.0.1"]],
                [[bytes(20), "127.0.0.1", True]], [good[0]] * 21):
        assert valid_node_list(bad, 20) is None


# --- neighbour cache ------------------------------------------------------------------------


def test_neighbour_cache_roundtrip_and_refusals(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(1)
    ns = [neighbours.Neighbour(rng.randbytes(20), f"127.0.0.{i}", 7000 + i) for i in range(5)]
    path = neighbours.save(tmp_path, b"\x01" * 20, ns)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert neighbours.load(tmp_path) == ns
    doc = json.loads(path.read_text())
    for corrupt in ("{", "[]", json.dumps({**doc, "version": 2}),
                    json.dumps({**doc, "neighbours": [{"id": "zz", "host": "h", "port": 1}]}),
                    json.dumps({**doc, "neighbours": [{**doc["neighbours"][0], "port": -1}]}),
                    json.dumps({**doc, "neighbours": doc["neighbours"] * 20}),
                    "x" * (neighbours.MAX_FILE_BYTES + 1), "\udcff"):
        path.write_bytes(corrupt.encode("utf-8", "surrogateescape"))
        assert neighbours.load(tmp_path) == []
    assert "ignor" in caplog.text
    assert neighbours.load(tmp_path / "missing") == []


# --- kernel socket filter -------------------------------------------------------------------


def test_kernel_filter_drops_banned_and_oversized() -> None:
    import socket

    from overlay import kfilter
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.9.77.1", 0))
    rx.settimeout(0.2)
    good = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    good.bind(("127.9.77.2", 0))
    bad = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    bad.bind(("127.9.77.3", 0))
    try:
        if not kfilter.attach(rx, 100, ["127.9.77.3", "not-an-ip", "::1"]):
            pytest.skip("this kernel takes no socket filters")

        def arrives(sock: socket.socket, size: int) -> bool:
            sock.sendto(b"x" * size, rx.getsockname())
            try:
                return len(rx.recv(4096)) == size
            except TimeoutError:
                return False
        assert arrives(good, 100)
        assert not arrives(good, 101)
        assert not arrives(bad, 10)
        assert kfilter.attach(rx, 100, [])  # replaced whole: the ban is lifted
        assert arrives(bad, 10)
    finally:
        for s in (rx, good, bad):
            s.close()


# --- fetch client ---------------------------------------------------------------------------


def test_fetch_gives_up_at_its_deadline_and_ends_once() -> None:
    """A server that accepts and never answers: the fetch fails (nobody's fault) once its
    timeout is up, not before, and its socket is closed; a fetch that got its body is not
    ended a second time when its deadline passes."""
    import asyncio
    import socket

    from overlay.fetch import FetchServer, start_fetch

    body = b"b" * 300

    async def main() -> None:
        loop = asyncio.get_running_loop()
        mute = socket.socket()
        mute.bind(("127.9.78.1", 0))
        mute.listen(8)  # the kernel completes connections; nobody reads them
        server = FetchServer(lambda ip: True, lambda ip, req: wire.encode_fetch_reply(body))
        await server.start("127.9.78.2", 0)
        assert server.sock is not None
        results: dict[str, list[tuple[bytes | None, wire.Fault, float]]] = {"mute": [],
                                                                          "good": []}
        t0 = loop.time()

        def done(name: str) -> Callable[[bytes | None, wire.Fault], None]:
            return lambda b, f: results[name].append((b, f, loop.time() - t0))
        slow = start_fetch(mute.getsockname(), b"a" * 32, 7400, done("mute"),
                           local_ip="127.9.78.3", max_body=1000, timeout=0.3, loop=loop)
        start_fetch(server.sock.getsockname(), b"a" * 32, 7400, done("good"),
                    local_ip="127.9.78.3", max_body=1000, timeout=0.2, loop=loop)
        await asyncio.sleep(0.6)
        assert [r[:2] for r in results["good"]] == [(body, wire.Fault.NONE)]
        assert [r[:2] for r in results["mute"]] == [(None, wire.Fault.NONE)]
        assert results["mute"][0][2] >= 0.3
        assert slow.sock is not None and slow.sock.fileno() == -1
        mute.close()
        await server.close()

    asyncio.run(main())


def test_a_fetch_tells_not_here_from_a_reply_that_is_none() -> None:
    """"Not here" may answer an announcement forged in the peer's name; a malformed reply is
    the peer's own doing: the broadcast core strikes only the second."""
    import asyncio
    import socket

    from overlay.fetch import FetchServer, start_fetch

    async def main() -> None:
        loop = asyncio.get_running_loop()
        empty = FetchServer(lambda ip: True, lambda ip, req: wire.encode_fetch_reply(None))
        await empty.start("127.9.79.1", 0)
        garbage = socket.socket()
        garbage.bind(("127.9.79.2", 0))
        garbage.listen(8)
        garbage.setblocking(False)
        got: dict[str, list[wire.Fault]] = {"empty": [], "garbage": []}
        assert empty.sock is not None
        for name, where in (("empty", empty.sock.getsockname()),
                            ("garbage", garbage.getsockname())):
            start_fetch(where, b"a" * 32, 7400, lambda b, f, name=name: got[name].append(f),
                        local_ip="127.9.79.3", max_body=1000, timeout=1.0, loop=loop)
        conn, _ = await loop.sock_accept(garbage)
        await loop.sock_sendall(conn, b"\x07" * 16)  # no fetch reply starts like this
        await asyncio.sleep(0.3)
        assert got == {"empty": [wire.Fault.NOT_HERE], "garbage": [wire.Fault.MALFORMED]}
        conn.close()
        garbage.close()
        await empty.close()

    asyncio.run(main())


def test_only_a_sustained_flood_is_reported_for_a_ban(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst over the datagram rate, forged in a peer's name, takes milliseconds: nobody is
    reported for it. A flood that keeps over the rate for abuse_sustained_s is."""
    import asyncio

    from kademlia.node import Node

    import overlay.dht as dht

    clock = [100.0]
    monkeypatch.setattr(dht.time, "monotonic", lambda: clock[0])
    key = NodeKey.generate()
    reported: list[str] = []

    async def main() -> None:
        proto = dht.HardenedProtocol(Node(key.node_id), None, 20, key=key,
                                     config=dht.DhtConfig())
        proto.on_abuse = reported.append
        junk = b"\x00" + bytes(20) + mpack.packb(["ping", [b"\x07" * 20]])
        for _ in range(1000):  # a burst: 600 over the rate, all at one moment
            proto._datagram(junk, ("10.0.0.5", 7400))
        assert reported == [] and proto.stats["drop_rate"] >= 200
        for _ in range(5 * 50):  # then 1000 a second for 5 s
            clock[0] += 0.02
            for _ in range(20):
                proto._datagram(junk, ("10.0.0.5", 7400))
        assert reported == ["10.0.0.5"]

    asyncio.run(main())
